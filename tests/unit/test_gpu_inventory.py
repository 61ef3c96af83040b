"""GPU inventory: declared devices, the torch probe (run for real, with stand-in scripts), discovery order, env."""

from __future__ import annotations

import json
import sys
import types

import msgpack
import pytest

from microkernel.resources.gpu import (
    Device,
    GpuConfigError,
    GpuProcess,
    ProbeFailed,
    discover,
    env_for,
    parse_declared_devices,
    parse_probe_output,
    probe_torch,
)
from microkernel.resources.leases import Lease, LeaseMode

GIB = 1024**3


def declared(*totals: int) -> list[Device]:
    return [
        Device(index=i, uuid=f"GPU-decl-{i}", name="declared", memory_total=t, source="declared")
        for i, t in enumerate(totals)
    ]


def probe_script(payload: object, *, noise: str = "") -> str:
    """A stand-in for the torch probe: prints ``noise`` lines, then ``payload`` as the JSON line."""
    lines = [f"print({noise!r})"] if noise else []
    return "\n".join([*lines, "import json", f"print(json.dumps({payload!r}))"]) + "\n"


class FakeNvml:
    """An NVML stand-in implementing the :class:`~microkernel.resources.gpu.Nvml` protocol."""

    def __init__(self, devices: list[Device] | None = None, *, fail: Exception | None = None) -> None:
        self._devices = devices or []
        self._fail = fail

    def devices(self) -> list[Device]:
        if self._fail is not None:
            raise self._fail
        return list(self._devices)

    def compute_processes(self, uuid: str) -> list[GpuProcess]:
        return []


# --- declared devices -----------------------------------------------------------------------------


def test_declared_devices_parse_sizes_names_and_indexes() -> None:
    devices = parse_declared_devices(
        [{"uuid": "GPU-a", "name": "A100", "memory": "40GiB"}, {"uuid": "GPU-b", "memory": 1024}]
    )
    assert devices == [
        Device(index=0, uuid="GPU-a", name="A100", memory_total=40 * GIB, source="declared"),
        Device(index=1, uuid="GPU-b", name="declared", memory_total=1024, source="declared"),
    ]
    assert parse_declared_devices([]) == []


@pytest.mark.parametrize(
    ("value", "path", "words"),
    [
        ({"uuid": "x"}, ("gpu", "device"), "array of tables"),
        (["GPU-a"], ("gpu", "device", 0), "expected a table"),
        ([{"uuid": "GPU-a", "memory": "1GiB", "memroy": 1}], ("gpu", "device", 0, "memroy"), "unknown key"),
        ([{"memory": "1GiB"}], ("gpu", "device", 0, "uuid"), "non-empty string"),
        ([{"uuid": "GPU-a,GPU-b", "memory": "1GiB"}], ("gpu", "device", 0, "uuid"), "without commas"),
        ([{"uuid": " GPU-a", "memory": "1GiB"}], ("gpu", "device", 0, "uuid"), "surrounding spaces"),
        ([{"uuid": "GPU-a", "memory": "1GiB", "name": 3}], ("gpu", "device", 0, "name"), "non-empty string"),
        ([{"uuid": "GPU-a"}], ("gpu", "device", 0, "memory"), "missing"),
        ([{"uuid": "GPU-a", "memory": 0}], ("gpu", "device", 0, "memory"), "> 0"),
        ([{"uuid": "GPU-a", "memory": "1GiB"}, {"uuid": "GPU-b", "memory": "16gib"}],
         ("gpu", "device", 1, "memory"), "case-sensitive"),  # fmt: skip
        ([{"uuid": "GPU-a", "memory": "1GiB"}, {"uuid": "GPU-a", "memory": "1GiB"}],
         ("gpu", "device", 1, "uuid"), "already declared by gpu.device[0]"),  # fmt: skip
    ],
)
def test_declared_device_errors_name_the_index_and_sub_key(
    value: object, path: tuple[str | int, ...], words: str
) -> None:
    with pytest.raises(GpuConfigError) as caught:
        parse_declared_devices(value)
    assert caught.value.path == path
    assert words in str(caught.value)
    dotted = "gpu.device" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[2:])
    assert str(caught.value).startswith(f"{dotted}: ")
    assert isinstance(caught.value, ValueError)


# --- the torch probe --------------------------------------------------------------------------------


def test_probe_output_adds_the_gpu_prefix_torch_leaves_out() -> None:
    out = json.dumps(
        {
            "ok": True,
            "devices": [
                {"index": 0, "uuid": "5f1c0a4e-0000-1111-2222-333344445555", "name": "T4", "memory_total": 16 * GIB},
                {"index": 1, "uuid": "MIG-abc", "name": "A100 MIG", "memory_total": 5 * GIB},
            ],
        }
    )
    devices = parse_probe_output("a warning on stdout\n" + out + "\n")
    assert [d.uuid for d in devices] == ["GPU-5f1c0a4e-0000-1111-2222-333344445555", "MIG-abc"]
    assert devices[0] == Device(
        index=0, uuid=devices[0].uuid, name="T4", memory_total=16 * GIB, source="torch"
    )


@pytest.mark.parametrize(
    ("stdout", "words"),
    [
        ("", "printed nothing"),
        ("Traceback...\n", "no JSON"),
        ("[1, 2]", "expected an object"),
        ('{"ok": false, "reason": "torch.cuda.is_available() is False"}', "is_available() is False"),
        ('{"ok": true, "devices": []}', "no CUDA device"),
        ('{"ok": true, "devices": [{"index": 0, "uuid": "u"}]}', "malformed"),
        ('{"ok": true, "devices": [{"index": 0, "uuid": "", "name": "x", "memory_total": 1}]}', "no UUID"),
    ],
)
def test_probe_output_problems_are_reported(stdout: str, words: str) -> None:
    with pytest.raises(ProbeFailed, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_probe_output(stdout)


def test_probe_runs_a_real_subprocess_and_parses_its_json() -> None:
    payload = {"ok": True, "devices": [{"index": 0, "uuid": "abcd", "name": "Fake GPU", "memory_total": 8 * GIB}]}
    devices = probe_torch(script=probe_script(payload, noise="loading..."), timeout=30.0)
    assert devices == [Device(index=0, uuid="GPU-abcd", name="Fake GPU", memory_total=8 * GIB, source="torch")]


def test_probe_reports_a_crashing_interpreter() -> None:
    with pytest.raises(ProbeFailed, match="status 3"):
        probe_torch(script="import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n", timeout=30.0)


def test_probe_is_killed_at_its_timeout() -> None:
    # The timeout is the behaviour under test (a hung CUDA init): the child blocks until a signal,
    # and subprocess.run kills and reaps it at the timeout.
    script = "import signal\nsignal.pause()\n"
    with pytest.raises(ProbeFailed, match="did not finish"):
        probe_torch(script=script, timeout=0.2)


def test_probe_reports_a_missing_interpreter() -> None:
    with pytest.raises(ProbeFailed, match="cannot run"):
        probe_torch(python="/nonexistent/python3", timeout=30.0)


def test_the_real_probe_finds_no_device_on_this_machine() -> None:
    # No GPU here (and usually no torch): the probe must fail cleanly, never crash or hang.
    with pytest.raises(ProbeFailed):
        probe_torch(python=sys.executable, timeout=60.0)  # python -m services.gpu_probe


# --- discovery order --------------------------------------------------------------------------------


def test_discover_falls_back_to_declared_devices_on_this_machine() -> None:
    inventory = discover(declared(16 * GIB))
    assert inventory.source == "declared"
    assert inventory.devices == tuple(declared(16 * GIB))
    assert inventory.nvml is None
    assert "pynvml" in inventory.skipped["nvml"] or "NVML" in inventory.skipped["nvml"]
    assert inventory.skipped["torch"] == "disabled ([gpu] probe_torch = false)"
    msgpack.packb(inventory.to_wire())


def test_discover_with_nothing_reports_none() -> None:
    inventory = discover([], use_nvml=False)
    assert inventory.source == "none"
    assert inventory.devices == ()
    assert set(inventory.skipped) == {"nvml", "torch", "declared"}


def test_discover_prefers_nvml_and_keeps_its_handle() -> None:
    real = [Device(index=0, uuid="GPU-real", name="H100", memory_total=80 * GIB, source="nvml")]
    nvml = FakeNvml(real)
    inventory = discover(declared(GIB), nvml=nvml, probe=True, probe_script="raise SystemExit(9)")
    assert inventory.source == "nvml"
    assert inventory.devices == tuple(real)
    assert inventory.nvml is nvml
    assert "ignored" in inventory.skipped["declared"]
    assert inventory.total_by_uuid() == {"GPU-real": 80 * GIB}


def test_discover_skips_nvml_that_fails_or_finds_nothing() -> None:
    broken = discover(declared(GIB), nvml=FakeNvml(fail=RuntimeError("GPU is lost")))
    assert broken.source == "declared"
    assert "GPU is lost" in broken.skipped["nvml"]
    empty = discover(declared(GIB), nvml=FakeNvml([]))
    assert empty.source == "declared"
    assert empty.skipped["nvml"] == "NVML reports no device"


def test_discover_uses_the_probe_only_when_enabled() -> None:
    payload = {"ok": True, "devices": [{"index": 0, "uuid": "p0", "name": "probed", "memory_total": 4 * GIB}]}
    script = probe_script(payload)
    disabled = discover(declared(GIB), use_nvml=False, probe=False, probe_script=script)
    assert disabled.source == "declared"
    probed = discover(declared(GIB), use_nvml=False, probe=True, probe_script=script)
    assert probed.source == "torch"
    assert [d.uuid for d in probed.devices] == ["GPU-p0"]
    assert probed.skipped["nvml"] == "disabled ([gpu] nvml = false)"
    assert "ignored" in probed.skipped["declared"]


def test_discover_records_why_a_failed_probe_was_skipped() -> None:
    script = probe_script({"ok": False, "reason": "torch.cuda.is_available() is False"})
    inventory = discover(declared(GIB), use_nvml=False, probe=True, probe_script=script)
    assert inventory.source == "declared"
    assert inventory.skipped["torch"] == "torch.cuda.is_available() is False"


# --- the child environment --------------------------------------------------------------------------


def lease(devices: tuple[str, ...], memory: int, mode: LeaseMode) -> Lease:
    return Lease(id="lease-7", holder="svc/0", pid=None, devices=devices, memory=memory, mode=mode)


def test_no_lease_hides_every_device() -> None:
    hidden = {"CUDA_VISIBLE_DEVICES": "", "MK_GPU_LEASE": "", "MK_GPU_MEMORY_FRACTION": ""}
    assert env_for(None, {"GPU-a": GIB}) == hidden


def test_a_shared_lease_sets_uuids_budgets_and_fractions_in_lease_order() -> None:
    totals = {"GPU-a": 16 * GIB, "GPU-b": 24 * GIB}
    env = env_for(lease(("GPU-b", "GPU-a"), 8 * GIB, LeaseMode.SHARED), totals)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-b,GPU-a"
    assert json.loads(env["MK_GPU_LEASE"]) == {
        "id": "lease-7",
        "devices": ["GPU-b", "GPU-a"],
        "memory": [8 * GIB, 8 * GIB],
        "mode": "shared",
    }
    assert " " not in env["MK_GPU_LEASE"]
    assert env["MK_GPU_MEMORY_FRACTION"] == "0.333333,0.500000"  # rounded down, never above the budget


def test_a_whole_device_exclusive_lease_gets_the_device_total_and_fraction_one() -> None:
    env = env_for(lease(("GPU-a",), 0, LeaseMode.EXCLUSIVE), {"GPU-a": 16 * GIB})
    assert json.loads(env["MK_GPU_LEASE"])["memory"] == [16 * GIB]
    assert json.loads(env["MK_GPU_LEASE"])["mode"] == "exclusive"
    assert env["MK_GPU_MEMORY_FRACTION"] == "1.000000"


# --- the pynvml adapter, over a stand-in module (nvidia-ml-py is not installed here) ----------------


class FakePynvml(types.ModuleType):
    """The handful of pynvml functions the adapter calls; old releases returned bytes, hence the mix."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, init_error: str | None = None) -> None:
        super().__init__("pynvml")
        self.init_error = init_error
        self.initialised = False
        self.procs = {"GPU-n1": [types.SimpleNamespace(pid=42, usedGpuMemory=None)]}

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError(self.init_error)
        self.initialised = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"h{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return {"GPU-n0": "h0", "GPU-n1": "h1"}[uuid]

    def nvmlDeviceGetUUID(self, handle: str) -> str | bytes:
        return b"GPU-n0" if handle == "h0" else "GPU-n1"

    def nvmlDeviceGetName(self, handle: str) -> str | bytes:
        return b"Tesla T4" if handle == "h0" else "A10"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=16 * GIB if handle == "h0" else 24 * GIB, used=0, free=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[types.SimpleNamespace]:
        return self.procs.get({"h0": "GPU-n0", "h1": "GPU-n1"}[handle], [])


def test_discover_through_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inventory = discover(declared(GIB))
    assert fake.initialised
    assert inventory.source == "nvml"
    assert [(d.uuid, d.name, d.memory_total, d.source) for d in inventory.devices] == [
        ("GPU-n0", "Tesla T4", 16 * GIB, "nvml"),
        ("GPU-n1", "A10", 24 * GIB, "nvml"),
    ]
    assert inventory.nvml is not None
    assert inventory.nvml.compute_processes("GPU-n1") == [GpuProcess(pid=42, used_memory=None)]
    assert inventory.nvml.compute_processes("GPU-n0") == []


def test_a_driver_that_fails_to_initialise_means_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakePynvml(init_error="Driver Not Loaded"))
    inventory = discover(declared(GIB))
    assert inventory.source == "declared"
    assert inventory.skipped["nvml"] == "NVML unavailable: NVMLError: Driver Not Loaded"
