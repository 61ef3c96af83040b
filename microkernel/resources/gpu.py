"""CUDA device inventory, and the environment that makes a device lease real in a child.

Inventory, in order of preference (:func:`discover`):

1. **NVML** through ``pynvml`` (package ``nvidia-ml-py``), imported lazily: the daemon never loads a
   CUDA runtime, and hosts without a driver simply do not have it.
2. **A torch probe**: ``python -c`` in a subprocess that imports torch and lists the devices as JSON.
   Only when enabled (``[gpu] probe_torch = true``), because importing torch costs ~1.5 s; it runs in
   a child so the daemon itself never imports torch nor initialises CUDA.
3. **Declared devices** from the config (``[[gpu.device]]``), for CPU-only hosts and tests.

The :class:`Inventory` records the source used and why each other source was skipped, for status.

Environment contract (what :func:`env_for` sets in a replica; the SDK reads it back):

``CUDA_VISIBLE_DEVICES``
    The leased device UUIDs, comma-joined, in lease order; the empty string when the replica holds
    no lease, which hides every device. Inside the child, ``cuda:i`` is the i-th listed device.
``MK_GPU_LEASE``
    Compact JSON ``{"id": str, "devices": [uuid, ...], "memory": [bytes, ...], "mode":
    "exclusive"|"shared"}`` where ``memory[i]`` is the byte budget on ``devices[i]`` (a whole-device
    exclusive lease has the device's total there). The empty string when there is no lease.
``MK_GPU_MEMORY_FRACTION``
    Comma-joined fractions ``budget / total`` per device, in the same order, rounded down to six
    decimals; the SDK calls ``torch.cuda.set_per_process_memory_fraction(f, i)`` for device ``i``
    before any allocation. Empty when there is no lease. The fraction caps torch's caching allocator
    only; the CUDA context (a few hundred MiB) comes on top, which is why the audit has a slack.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from microkernel.units import UnitError, parse_size

if TYPE_CHECKING:
    from microkernel.resources.leases import Lease

__all__ = [
    "DEVICE_KEYS",
    "ENFORCE_MODES",
    "FREE_TIMEOUT_POLICIES",
    "GPU_KEYS",
    "TORCH_PROBE_MODULE",
    "Device",
    "GpuConfigError",
    "GpuProcess",
    "GpuSettings",
    "Inventory",
    "Nvml",
    "ProbeFailed",
    "discover",
    "env_for",
    "open_nvml",
    "parse_declared_devices",
    "parse_probe_output",
    "probe_torch",
]

DeviceSource = Literal["nvml", "torch", "declared"]

DEVICE_KEYS: Final = ("uuid", "name", "memory")
GPU_KEYS: Final = (
    "nvml", "probe_torch", "probe_python", "probe_timeout", "enforce", "audit_interval",
    "audit_slack", "free_timeout", "on_free_timeout", "device",
)  # fmt: skip
ENFORCE_MODES: Final = ("off", "warn", "kill")
FREE_TIMEOUT_POLICIES: Final = ("start", "fail")

# The torch probe lives in the service side of the project (only ``services`` may load torch) and
# runs as its own interpreter: ``python -m services.gpu_probe`` prints one JSON line.
TORCH_PROBE_MODULE: Final = "services.gpu_probe"


class GpuConfigError(ValueError):
    """An invalid ``[gpu]`` table or per-service ``gpu`` value.

    ``path`` locates the bad value (``("gpu", "device", 1, "memory")``) so the config loader can
    find its line; ``reason`` says what is wrong without repeating the path.
    """

    def __init__(self, path: tuple[str | int, ...], reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{_dotted(path)}: {reason}")


def _dotted(path: Sequence[str | int]) -> str:
    """``("gpu", "device", 1, "memory")`` → ``"gpu.device[1].memory"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """One CUDA device: ``uuid`` is what ``CUDA_VISIBLE_DEVICES`` names, ``memory_total`` is bytes."""

    index: int
    uuid: str
    name: str
    memory_total: int
    source: DeviceSource

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form used in status replies."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory_total": self.memory_total,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuProcess:
    """A process holding a CUDA context on a device, as NVML reports it.

    ``used_memory`` is ``None`` when NVML cannot tell (some MIG and virtualised setups).
    """

    pid: int
    used_memory: int | None


class Nvml(Protocol):
    """The few NVML calls the kernel uses; blocking, so the kernel calls them in its thread pool."""

    def devices(self) -> list[Device]:
        """Every visible device, in NVML index order."""
        ...

    def compute_processes(self, uuid: str) -> list[GpuProcess]:
        """The processes with a compute context on device ``uuid``."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Inventory:
    """The devices the kernel leases out, where they came from, and why other sources were not used.

    ``nvml`` is the live NVML handle when ``source == "nvml"`` (the audit and the restart-after-free
    wait need it), else ``None``.
    """

    devices: tuple[Device, ...]
    source: Literal["nvml", "torch", "declared", "none"]
    skipped: Mapping[str, str] = field(default_factory=dict)
    nvml: Nvml | None = field(default=None, compare=False, repr=False)

    def total_by_uuid(self) -> dict[str, int]:
        """Device UUID → total bytes (what :func:`env_for` needs)."""
        return {d.uuid: d.memory_total for d in self.devices}

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-native form for ``status`` / ``mkctl leases``."""
        return {"source": self.source, "devices": [d.to_wire() for d in self.devices], "skipped": dict(self.skipped)}


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuSettings:
    """The ``[gpu]`` table (keys :data:`GPU_KEYS`; durations in seconds, sizes in bytes).

    ``nvml``/``probe_torch``/``probe_python``/``probe_timeout`` steer :func:`discover`; ``enforce``
    (:data:`ENFORCE_MODES`), ``audit_interval`` and ``audit_slack`` the NVML audit; ``free_timeout``
    and ``on_free_timeout`` (:data:`FREE_TIMEOUT_POLICIES`) the wait for a dead worker's device
    memory before its replacement starts; ``devices`` come from :func:`parse_declared_devices`.
    """

    nvml: bool = True
    probe_torch: bool = False
    probe_python: str | None = None
    probe_timeout: float = 30.0
    enforce: Literal["off", "warn", "kill"] = "warn"
    audit_interval: float = 5.0
    audit_slack: int = 512 * 1024**2
    free_timeout: float = 30.0
    on_free_timeout: Literal["start", "fail"] = "start"
    devices: tuple[Device, ...] = ()


def parse_declared_devices(value: object) -> list[Device]:
    """Validate ``[[gpu.device]]`` tables (keys ``uuid``, ``name``, ``memory``) into devices.

    ``uuid`` is required (it is what ``CUDA_VISIBLE_DEVICES`` carries, so no commas), ``memory`` is
    a size > 0, ``name`` defaults to ``"declared"``. Duplicate UUIDs are rejected. Raises
    :class:`GpuConfigError` naming the index and sub-key, e.g. ``gpu.device[1].memory: ...``.
    """
    if not isinstance(value, list):
        raise GpuConfigError(("gpu", "device"), f"expected an array of tables ([[gpu.device]]), got {value!r}")
    devices: list[Device] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(value):
        where: tuple[str | int, ...] = ("gpu", "device", index)
        if not isinstance(table, Mapping):
            raise GpuConfigError(where, f"expected a table with keys {', '.join(DEVICE_KEYS)}, got {table!r}")
        for key in table:
            if key not in DEVICE_KEYS:
                raise GpuConfigError((*where, key), f"unknown key; expected one of {', '.join(DEVICE_KEYS)}")
        uuid = table.get("uuid")
        if not isinstance(uuid, str) or not uuid.strip() or "," in uuid or uuid != uuid.strip():
            raise GpuConfigError(
                (*where, "uuid"), f"expected a non-empty string without commas or surrounding spaces, got {uuid!r}"
            )
        if uuid in seen:
            raise GpuConfigError((*where, "uuid"), f"{uuid!r} is already declared by gpu.device[{seen[uuid]}]")
        seen[uuid] = index
        name = table.get("name", "declared")
        if not isinstance(name, str) or not name:
            raise GpuConfigError((*where, "name"), f"expected a non-empty string, got {name!r}")
        if "memory" not in table:
            raise GpuConfigError((*where, "memory"), "missing; give the device memory, e.g. '16GiB'")
        try:
            memory = parse_size(table["memory"], key=_dotted((*where, "memory")))
        except UnitError as exc:
            raise GpuConfigError((*where, "memory"), exc.reason) from None
        if memory <= 0:
            raise GpuConfigError((*where, "memory"), f"expected a size > 0, got {table['memory']!r}")
        devices.append(Device(index=index, uuid=uuid, name=name, memory_total=memory, source="declared"))
    return devices


class _PynvmlAdapter:
    """:class:`Nvml` over the ``pynvml`` module (nvidia-ml-py); handles cached per UUID."""

    def __init__(self, pynvml: Any) -> None:
        self._nvml = pynvml
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _text(value: str | bytes) -> str:
        # Old nvidia-ml-py releases return bytes.
        return value.decode() if isinstance(value, bytes) else value

    def devices(self) -> list[Device]:
        n = self._nvml
        out = []
        for index in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(index)
            uuid = self._text(n.nvmlDeviceGetUUID(handle))
            self._handles[uuid] = handle
            name = self._text(n.nvmlDeviceGetName(handle))
            total = int(n.nvmlDeviceGetMemoryInfo(handle).total)
            out.append(Device(index=index, uuid=uuid, name=name, memory_total=total, source="nvml"))
        return out

    def compute_processes(self, uuid: str) -> list[GpuProcess]:
        handle = self._handles.get(uuid)
        if handle is None:
            handle = self._handles[uuid] = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
        return [
            GpuProcess(pid=int(p.pid), used_memory=None if p.usedGpuMemory is None else int(p.usedGpuMemory))
            for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]


def open_nvml() -> tuple[Nvml | None, str]:
    """Initialise NVML; ``(handle, "")`` or ``(None, why not)``. Blocking (loads the driver library)."""
    try:
        import pynvml  # type: ignore[import-not-found]  # optional: nvidia-ml-py
    except ImportError as exc:
        return None, f"nvidia-ml-py (pynvml) is not installed ({exc})"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError and friends: no driver, no library, no permission
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"
    return _PynvmlAdapter(pynvml), ""


class ProbeFailed(Exception):
    """The torch probe found no usable device; the message says why."""


def parse_probe_output(stdout: str) -> list[Device]:
    """Parse the probe's last stdout line (``{"ok", "devices" | "reason"}``) into devices.

    torch reports UUIDs without the ``GPU-`` prefix that ``CUDA_VISIBLE_DEVICES`` and NVML use;
    it is added. Raises :class:`ProbeFailed` for ``ok: false``, malformed output or no devices.
    """
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ProbeFailed("the probe printed nothing")
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise ProbeFailed(f"the probe printed no JSON: {lines[-1][:200]!r}") from None
    if not isinstance(data, dict):
        raise ProbeFailed(f"the probe printed {data!r}, expected an object")
    if not data.get("ok"):
        raise ProbeFailed(str(data.get("reason", "the probe reported failure")))
    devices = []
    try:
        for i, d in enumerate(data["devices"]):
            uuid = str(d["uuid"])
            if not uuid:
                raise ProbeFailed(f"device {i} has no UUID (torch too old to report one?)")
            if not uuid.startswith(("GPU-", "MIG-")):
                uuid = f"GPU-{uuid}"
            index, name, total = int(d["index"]), str(d["name"]), int(d["memory_total"])
            devices.append(Device(index=index, uuid=uuid, name=name, memory_total=total, source="torch"))
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeFailed(f"malformed probe output ({type(exc).__name__}: {exc}): {lines[-1][:200]!r}") from None
    if not devices:
        raise ProbeFailed("torch sees no CUDA device")
    return devices


def probe_torch(*, python: str | None = None, timeout: float = 30.0, script: str | None = None) -> list[Device]:
    """Run the torch probe and parse its devices (blocking; the kernel runs it in its thread pool).

    The probe is ``python -m services.gpu_probe``, or ``python -c script`` when ``script`` is given
    (the same output contract). The child is killed at ``timeout``. Raises :class:`ProbeFailed`.
    """
    interpreter = python or sys.executable
    argv = [interpreter, "-c", script] if script is not None else [interpreter, "-m", TORCH_PROBE_MODULE]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        raise ProbeFailed(f"the torch probe did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise ProbeFailed(f"cannot run {argv[0]}: {exc}") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        raise ProbeFailed(f"the torch probe exited with status {done.returncode}: {tail[0][:200]}")
    return parse_probe_output(done.stdout)


def discover(
    declared: Sequence[Device],
    *,
    nvml: Nvml | None = None,
    use_nvml: bool = True,
    probe: bool = False,
    probe_python: str | None = None,
    probe_timeout: float = 30.0,
    probe_script: str | None = None,
) -> Inventory:
    """Find the devices to lease: NVML, else the torch probe (when ``probe``), else ``declared``.

    ``nvml`` injects an NVML handle (tests); by default ``pynvml`` is imported lazily. Blocking
    (NVML init, probe subprocess): call it in the kernel's thread pool or before the loop starts.
    A source that works but finds no device counts as skipped, with that reason.
    """
    skipped: dict[str, str] = {}
    if not use_nvml:
        skipped["nvml"] = "disabled ([gpu] nvml = false)"
    else:
        handle, why = (nvml, "") if nvml is not None else open_nvml()
        if handle is not None:
            try:
                found = handle.devices()
            except Exception as exc:  # an NVMLError mid-listing: treat the source as unusable
                found, why = [], f"NVML failed listing devices: {type(exc).__name__}: {exc}"
            else:
                why = "NVML reports no device"
            if found:
                if declared:
                    skipped["declared"] = f"ignored: NVML found {len(found)} device(s)"
                skipped["torch"] = "not needed: NVML works"
                return Inventory(devices=tuple(found), source="nvml", skipped=skipped, nvml=handle)
        skipped["nvml"] = why
    if not probe:
        skipped["torch"] = "disabled ([gpu] probe_torch = false)"
    else:
        try:
            probed = probe_torch(python=probe_python, timeout=probe_timeout, script=probe_script)
        except ProbeFailed as exc:
            skipped["torch"] = str(exc)
        else:
            if declared:
                skipped["declared"] = f"ignored: the torch probe found {len(probed)} device(s)"
            return Inventory(devices=tuple(probed), source="torch", skipped=skipped)
    if declared:
        return Inventory(devices=tuple(declared), source="declared", skipped=skipped)
    skipped["declared"] = "no [[gpu.device]] in the config"
    return Inventory(devices=(), source="none", skipped=skipped)


def _fraction(budget: int, total: int) -> str:
    # Rounded down so the child never gets more than its budget.
    return f"{math.floor(min(budget / total, 1.0) * 1e6) / 1e6:.6f}"


def env_for(lease: Lease | None, total_by_uuid: Mapping[str, int]) -> dict[str, str]:
    """The child environment for ``lease`` (see the module docstring for the contract).

    ``total_by_uuid`` is :meth:`Inventory.total_by_uuid`; every leased device must be in it.
    """
    if lease is None:
        return {"CUDA_VISIBLE_DEVICES": "", "MK_GPU_LEASE": "", "MK_GPU_MEMORY_FRACTION": ""}
    budgets = [lease.budget(total_by_uuid[uuid]) for uuid in lease.devices]
    payload = {"id": lease.id, "devices": list(lease.devices), "memory": budgets, "mode": lease.mode}
    return {
        "CUDA_VISIBLE_DEVICES": ",".join(lease.devices),
        "MK_GPU_LEASE": json.dumps(payload, separators=(",", ":")),
        "MK_GPU_MEMORY_FRACTION": ",".join(
            _fraction(b, total_by_uuid[u]) for b, u in zip(budgets, lease.devices, strict=True)
        ),
    }
