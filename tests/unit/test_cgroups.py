"""cgroup v2 support: detection on this very machine, and the manager against a fake cgroup2 tree.

The manager tests run against a temporary directory laid out like a cgroup2 hierarchy, with the
interface files created by the test (playing the kernel's part: on a real cgroupfs ``mkdir`` creates
them). They exercise the file protocol — which files are read and written, with what — not the
kernel's behaviour (limits, OOM kills, process migration), which needs a delegated cgroup2 that
this machine (cgroup v1 for memory) does not have.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microkernel.resources.cgroups import CgroupError, CgroupManager, CgroupSupport, detect, own_cgroup

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
"""


# --- detection ------------------------------------------------------------------------------------


def test_detection_on_this_machine() -> None:
    support = detect()
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        # No unified hierarchy at the usual place: cgroup v1 only, or a hybrid setup whose cgroup2
        # mount does not offer the memory controller. Either way: unavailable, and it says why.
        assert not support.available
        assert support.reason
    elif not support.available:
        # A unified hierarchy that is not delegated to whoever runs the tests.
        assert support.reason and support.root is not None
    else:
        assert support.reason == "" and "memory" in support.controllers
    status = support.to_status()
    assert status["available"] is support.available and status["reason"] == support.reason


def write_mountinfo(tmp_path: Path, cgroup2_at: Path | None, *, memory_on_v1: bool = False) -> Path:
    lines = ["31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755"]
    if memory_on_v1:
        lines.append("35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory")
    if cgroup2_at is not None:
        escaped = str(cgroup2_at).replace(" ", "\\040")
        lines.append(f"41 31 0:38 / {escaped} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate")
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_proc_cgroup(tmp_path: Path, own: str | None) -> Path:
    path = tmp_path / "cgroup"
    path.write_text("4:memory:/x\n1:name=systemd:/x\n" + (f"0::{own}\n" if own is not None else ""))
    return path


def make_cgroup(path: Path, controllers: str = "cpu io memory pids", procs: str = "") -> Path:
    """Play the kernel: a cgroup directory with the interface files the manager touches."""
    path.mkdir(parents=True, exist_ok=True)
    files = {
        "cgroup.controllers": controllers + "\n",
        "cgroup.subtree_control": "\n",
        "cgroup.procs": procs,
        "memory.high": "max\n",
        "memory.max": "max\n",
        "memory.oom.group": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    }
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_detect_without_cgroup2_mount(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(V1_MOUNTINFO)
    support = detect(mountinfo=mountinfo, proc_cgroup=write_proc_cgroup(tmp_path, "/"))
    assert support == CgroupSupport(available=False, reason="cgroup v1 only (no cgroup2 mount)")
    assert support.to_status()["root"] is None


def test_detect_finds_its_own_cgroup_under_the_cgroup2_mount(tmp_path: Path) -> None:
    mount = tmp_path / "cgroup fs"  # a space, escaped as \040 in mountinfo
    mountinfo = write_mountinfo(tmp_path, mount)
    proc_cgroup = write_proc_cgroup(tmp_path, "/system.slice/mk.service")
    root = mount / "system.slice" / "mk.service"
    assert own_cgroup(proc_cgroup=proc_cgroup, mountinfo=mountinfo) == root

    missing = detect(mountinfo=mountinfo, proc_cgroup=proc_cgroup)
    assert not missing.available and "is not a cgroup v2 directory" in missing.reason

    make_cgroup(root)
    support = detect(mountinfo=mountinfo, proc_cgroup=proc_cgroup)
    assert support.available and support.reason == ""
    assert support.root == root and "memory" in support.controllers and not support.memory_enabled
    (root / "cgroup.subtree_control").write_text("memory pids\n")
    assert detect(root).memory_enabled


def test_detect_hybrid_and_undelegated(tmp_path: Path) -> None:
    mount = tmp_path / "unified"
    make_cgroup(mount, controllers="hugetlb")
    hybrid = detect(mountinfo=write_mountinfo(tmp_path, mount, memory_on_v1=True),
                    proc_cgroup=write_proc_cgroup(tmp_path, "/"))
    assert not hybrid.available and "bound to cgroup v1" in hybrid.reason and hybrid.root == mount
    plain = detect(mount, mountinfo=write_mountinfo(tmp_path, mount))
    assert not plain.available and "not delegated by the parent" in plain.reason
    no_entry = detect(mountinfo=write_mountinfo(tmp_path, mount), proc_cgroup=write_proc_cgroup(tmp_path, None))
    assert not no_entry.available and "no cgroup v2 entry" in no_entry.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write any file: permissions cannot make it undelegated")
def test_detect_unwritable(tmp_path: Path) -> None:
    root = make_cgroup(tmp_path / "cg")
    (root / "cgroup.subtree_control").chmod(0o444)
    support = detect(root, mountinfo=write_mountinfo(tmp_path, tmp_path))
    assert not support.available and "cgroup.subtree_control not writable" in support.reason


# --- the manager, against a fake tree -------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = make_cgroup(tmp_path / "mk.service", procs=f"{os.getpid()}\n")
    # What mkdir would create on a real cgroupfs; enable() uses these directories as they are.
    make_cgroup(root / "kernel")
    make_cgroup(root / "services")
    return root


def test_enable_moves_the_daemon_into_a_leaf_then_enables_memory(tree: Path) -> None:
    manager = CgroupManager(tree)
    manager.enable()
    assert (tree / "kernel" / "cgroup.procs").read_text() == str(os.getpid())
    assert (tree / "cgroup.subtree_control").read_text() == "+memory"
    assert (tree / "services" / "cgroup.subtree_control").read_text() == "+memory"
    assert (manager.root, manager.kernel_leaf, manager.services_dir) == (tree, tree / "kernel", tree / "services")
    manager.enable()  # idempotent


def test_enable_refuses_without_the_memory_controller(tmp_path: Path) -> None:
    root = make_cgroup(tmp_path / "cg", controllers="cpu pids")
    with pytest.raises(CgroupError, match="memory controller is not offered"):
        CgroupManager(root).enable()


def test_enable_failure_names_the_processes_left_behind(tree: Path) -> None:
    (tree / "cgroup.subtree_control").unlink()  # stands in for the kernel refusing the write
    with pytest.raises(CgroupError, match=rf"processes still in .*: \[{os.getpid()}\] \(no internal processes"):
        CgroupManager(tree).enable()


def test_replica_cgroup_lifecycle(tree: Path) -> None:
    manager = CgroupManager(tree)
    path = manager.create("echo", "0.3")
    assert path == tree / "services" / "echo.0.3" and path.is_dir()
    assert manager.create("echo", "0.3") == path  # reuse
    make_cgroup(path)

    manager.set_memory(path, None, 2 * 1024**3)
    assert (path / "memory.high").read_text() == "max"
    assert (path / "memory.max").read_text() == str(2 * 1024**3)
    manager.set_memory(path, 1000, None)
    assert ((path / "memory.high").read_text(), (path / "memory.max").read_text()) == ("1000", "max")
    with pytest.raises(ValueError, match="memory.max must be"):
        manager.set_memory(path, 5, 0)
    assert (path / "memory.high").read_text() == "1000"  # validated before anything is written

    manager.set_oom_group(path)
    assert (path / "memory.oom.group").read_text() == "1"
    manager.add(path, 4242)
    assert (path / "cgroup.procs").read_text() == "4242"
    assert manager.procs(path) == [4242]

    assert manager.oom_kills(path) == 0
    (path / "memory.events").write_text("low 0\nhigh 12\nmax 40\noom 3\noom_kill 2\noom_group_kill 1\n")
    assert manager.oom_kills(path) == 2

    assert manager.remove(path) is False  # not empty (a real cgroup would be EBUSY while populated)
    for child in path.iterdir():
        child.unlink()
    assert manager.remove(path) is True
    assert manager.remove(path) is True  # already gone
    assert manager.oom_kills(path) == 0 and manager.procs(path) == []


def test_limits_need_the_controller_files(tree: Path) -> None:
    path = CgroupManager(tree).create("echo", 1)
    # No memory.max: the controller is off. Writing must fail, not create a regular file.
    with pytest.raises(FileNotFoundError):
        CgroupManager(tree).set_memory(path, None, 1024)
    assert not (path / "memory.max").exists()


@pytest.mark.parametrize(("service", "key"), [("../x", 0), ("a/b", 0), ("", 0), ("echo", ".."), ("echo", "0/1"), ("echo", "")])
def test_create_rejects_names_that_are_not_one_directory(tree: Path, service: str, key: str | int) -> None:
    with pytest.raises(ValueError, match="invalid"):
        CgroupManager(tree).create(service, key)


def test_prune_removes_empty_leftovers_only(tree: Path) -> None:
    manager = CgroupManager(tree)
    stale = manager.create("old", "0.1")
    busy = make_cgroup(manager.create("live", "0.1"), procs="777\n")
    assert manager.prune() == [stale]
    assert busy.is_dir() and not stale.exists()
    assert CgroupManager(tree / "nowhere").prune() == []
    assert "mk.service" in repr(manager)
