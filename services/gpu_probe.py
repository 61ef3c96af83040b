"""The torch GPU probe: ``python -m services.gpu_probe`` prints the CUDA devices torch sees.

The kernel never imports torch or initialises CUDA itself; when configured to (``[gpu]
probe_torch = true``) and NVML is not available, it runs this module in a child interpreter and
reads one JSON line from its stdout: ``{"ok": true, "devices": [{"index", "uuid", "name",
"memory_total"}]}`` or ``{"ok": false, "reason": "..."}``. It never raises: every failure,
including torch not being installed, becomes an ``ok: false`` line.
"""

from __future__ import annotations

import json
from typing import Any


def probe() -> dict[str, Any]:
    """What torch sees, as the JSON-ready map described above."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {"ok": False, "reason": "torch.cuda.is_available() is False"}
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "uuid": str(getattr(p, "uuid", "")), "name": p.name,
                            "memory_total": int(p.total_memory)})
        return {"ok": True, "devices": devices}
    except Exception as exc:
        return {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    print(json.dumps(probe()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
