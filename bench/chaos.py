"""Chaos soak: the daemon and its services under client load while things keep breaking.

Usage::

    .venv/bin/python bench/chaos.py --minutes 5 --seed 7     # a soak
    .venv/bin/python bench/chaos.py --minutes 1              # what CI runs

One daemon (``bench.harness.Daemon``, a short temp dir) runs store, loader, inferencer (2 replicas,
a 4-wide linear model from a safetensors file), trainer, echo (2 replicas), a memory hog with a
hard 256 MiB budget and a lease-churn service on two declared fake GPUs. Client threads keep it
busy (``bench/chaos_load.py``): echo calls with deadlines, store writes and verified reads,
inference with checked results, client-held leases, training jobs. Meanwhile a chaos driver,
seeded, at random intervals: ``kill -9``s a random ready replica, SIGSTOPs one past heartbeat
liveness (the kernel must kill it) or briefly (it must survive), pushes the hog over its budget,
and every ~30 s ``kill -9``s the daemon itself and starts a new one on the same config, runtime
dir and store root (clients keep their ``Client`` and must reconnect).

At the end: load stops, every acknowledged write is read back, the daemon gets SIGTERM, and what
is left is counted. One JSON line on stdout (progress on stderr); the keys are described in
``docs/reliability.md``. Every wait has a ceiling; SIGTERM/Ctrl-C tear everything down.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil

from bench.chaos_load import EchoWorker, InferWorker, LeaseWorker, StoreLedger, StoreWorker, Tally, TrainerWorker, Worker
from bench.chaos_watch import EventMonitor, Lifetime, RunState, Sampler, check_leases, our_segments
from bench.harness import PYTHON, READY_LINE, REPO, Daemon, emit, exit_cleanly_on_sigterm, log, render_config
from microkernel.client import Client, KernelUnavailable
from protocols import handover
from protocols.errors import MicrokernelError

HEARTBEAT_S = 1.0
LIVENESS = 3
# Restarts stay cheap and nothing ever gives up: the soak measures recovery, not the policy.
POLICY: dict[str, Any] = {"backoff": {"initial": "100ms", "max": "2s"}, "intensity": 100000, "period": "60s",
                          "start_timeout": "90s"}
HOG_BUDGET_MIB = 256
DEVICES = """
[[gpu.device]]
uuid = "GPU-chaos-0"
name = "fake-16g"
memory = "16GiB"

[[gpu.device]]
uuid = "GPU-chaos-1"
name = "fake-8g"
memory = "8GiB"
"""
# The linear model served by the inferencers: y = W x + b over 4 floats.
WEIGHT = [[0.5, -1.0, 0.25, 2.0], [1.5, 0.0, -0.5, 1.0], [-2.0, 0.75, 1.0, 0.0], [0.0, 1.0, 1.0, -1.0]]
BIAS = [0.1, -0.2, 0.3, 0.0]

READY_CEILING_S = 240.0  # all services ready after a (re)start: torch imports on 2 busy cores
TREE_GONE_CEILING_S = 20.0  # a killed daemon's children must be gone by then
STOP_CEILING_S = 60.0
LATE_KILL_CEILING_S = 10.0  # a replica hung past liveness that outlived the hang: killed late, or never?


def expected(x: list[float]) -> list[float]:
    """What the inferencers must answer for ``x``."""
    return [sum(w * v for w, v in zip(row, x)) + b for row, b in zip(WEIGHT, BIAS)]


def write_weights(path: str) -> None:
    """The inferencers' model as a safetensors file (numpy only: the bench never imports torch)."""
    import numpy as np

    from services.store.safetensors import dumps

    tensors = {"weight": np.array(WEIGHT, dtype=np.float32), "bias": np.array(BIAS, dtype=np.float32)}
    with open(path, "wb") as f:
        f.write(dumps(tensors, {"arch": "tests.fixtures.models:LINEAR", "config": json.dumps({"width": 4})}))


def services_config(weights: str, seed: int) -> dict[str, dict[str, Any]]:
    """The soak's services (``weights``: the inferencers' model file)."""
    return {
        "store": {"entry": "services.store:Store", **POLICY},
        "loader": {"entry": "services.loader:Loader", "depends_on": ["store"], **POLICY},
        "inferencer": {"entry": "services.inferencer:Inferencer", "replicas": 2, "depends_on": ["loader"], **POLICY,
                       "config": {"model": "lin", "weights": weights, "arch": "tests.fixtures.models:LINEAR",
                                  "max_batch_size": 8, "max_queue_delay_ms": 2}},
        "trainer": {"entry": "services.trainer:Trainer", "depends_on": ["store"], **POLICY},
        "echo": {"entry": "tests.fixtures.echo:Echo", "replicas": 2, **POLICY},
        "hog": {"entry": "tests.fixtures.memhog:MemHog", "memory": {"hard": f"{HOG_BUDGET_MIB}MiB"}, **POLICY},
        "leaser": {"entry": "tests.fixtures.chaos_leaser:LeaseChurn", **POLICY, "config": {"seed": seed}},
    }


class ChaosDaemon(Daemon):
    """A ``Daemon`` that can be ``kill -9``ed and started again on the same config and directories."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        with open(self.config_path, "a") as f:
            f.write(DEVICES)

    def _pump(self) -> None:
        # Like Daemon._pump, but appending: every lifetime's output stays in one log.
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "ab") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                if not self._ready.is_set() and READY_LINE.encode() in line:
                    self._ready.set()
        self._ready.set()

    def start(self) -> ChaosDaemon:
        """Start a daemon process (again); returns once it logged readiness."""
        self._ready = threading.Event()
        env = dict(os.environ)
        # No PYTHONPYCACHEPREFIX (unlike the restart benchmarks): with a fresh prefix every
        # torch-importing service would compile torch from source (~12 s instead of ~2.5 s here).
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "microkernel", "--config", self.config_path],
            cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # its own session: signals to the bench never reach it by accident
        )
        self._reader = threading.Thread(target=self._pump, name="daemon-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(self.ready_timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"the daemon did not become ready:\n{self.log_tail()}")
        return self

    def kill9(self) -> None:
        """SIGKILL of the daemon process alone (never its group: its children must die by themselves)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_CEILING_S)
        if self._reader is not None:
            self._reader.join(5)

    def terminate(self) -> int | None:
        """SIGTERM (orderly shutdown), SIGKILL of the daemon alone after the ceiling; its exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_CEILING_S)
        except subprocess.TimeoutExpired:
            log(f"daemon {proc.pid} did not stop within {STOP_CEILING_S:g}s: SIGKILL")
            proc.kill()
            code = proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        return code


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> None:
    """Adopt (and so reap) what a killed daemon leaves, as systemd does for the service it runs.

    Without it the orphans of a ``kill -9``ed daemon go to the nearest subreaper above us — under
    pytest, pytest itself, which reaps only when the test ends — and stay zombies meanwhile, which
    is not what a daemon sees in production (see docs/reliability.md for the bug that showed).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def reap_zombies(keep: set[int]) -> None:
    """Reap our exited children (orphans adopted as subreaper), except the ``keep`` pids (Popen's)."""
    for child in psutil.Process().children():
        if child.pid in keep:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            continue


def wait_all_ready(control: str, names: list[str], ceiling: float) -> float:
    """Seconds until every service is ready (``wait_ready`` on each, one shared ceiling)."""
    t0 = time.monotonic()
    with Client(control, timeout=10.0, name="chaos-ready") as client:
        for name in names:
            left = ceiling - (time.monotonic() - t0)
            client.wait_ready(name, timeout=max(left, 1.0))
    return time.monotonic() - t0


def reap_leftovers(pids: list[dict[str, Any]]) -> None:
    """SIGKILL processes that outlived their daemon, so one leak does not spoil the rest of the run."""
    for entry in pids:
        try:
            os.kill(entry["pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class ChaosDriver(threading.Thread):
    """Breaks things at seeded random intervals; records what it did and what the kernel did about it."""

    def __init__(self, daemon: ChaosDaemon, state: RunState, monitor: EventMonitor, stop: threading.Event,
                 rng: random.Random, *, end_at: float, interval: tuple[float, float], restart_every: float,
                 names: list[str]) -> None:
        super().__init__(name="chaos-driver", daemon=True)
        self.daemon_proc = daemon
        self.state = state
        self.monitor = monitor
        self.stop_event = stop
        self.rng = rng
        self.end_at = end_at
        self.interval = interval
        self.restart_every = restart_every
        self.names = names
        self.actions: Counter[str] = Counter()
        self.hangs: Counter[str] = Counter()
        self.memhog: Counter[str] = Counter()
        self.recoveries_s: list[float] = []
        self.orphans_after_daemon_kill: list[dict[str, Any]] = []
        self.shm_left_by_killed_daemon: list[int] = []
        self.shm_left_after_restart: list[str] = []
        self.hang_survivors: list[str] = []  # hung past liveness, yet alive when the hang ended
        self.stopped: dict[int, float] = {}  # pid -> create time of processes we SIGSTOPped
        self.error: str | None = None
        # The first daemon kill comes within the first half even of a short run (CI's one minute).
        now = time.monotonic()
        self.next_restart = now + min(self._restart_gap(), 0.45 * (end_at - now))

    def _restart_gap(self) -> float:
        return self.rng.uniform(0.6, 1.4) * self.restart_every

    # --- picking victims ---

    def _replicas(self, client: Client, service: str | None = None) -> list[tuple[str, int, int]]:
        out = []
        for svc in client.status().get("services") or ():
            if service is not None and svc["name"] != service:
                continue
            for rep in svc.get("replicas") or ():
                if rep.get("state") == "ready" and rep.get("pid"):
                    out.append((svc["name"], int(rep["replica"]), int(rep["pid"])))
        return out

    # --- actions ---

    def kill_replica(self, client: Client) -> None:
        victims = self._replicas(client)
        if victims:
            name, replica, pid = self.rng.choice(victims)
            log(f"chaos: kill -9 {name}/{replica} (pid {pid})")
            self._signal(pid, signal.SIGKILL)
            self.actions["kill9_replica"] += 1

    def hang_replica(self, client: Client, *, past_liveness: bool) -> None:
        victims = self._replicas(client)
        if not victims:
            return
        name, replica, pid = self.rng.choice(victims)
        hold = HEARTBEAT_S * LIVENESS + 2.5 if past_liveness else HEARTBEAT_S * 0.8
        kind = "sigstop_past_liveness" if past_liveness else "sigstop_brief"
        log(f"chaos: SIGSTOP {name}/{replica} (pid {pid}) for {hold:.1f}s")
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self.stopped[pid] = created
        self._signal(pid, signal.SIGSTOP)
        self.actions[kind] += 1
        interrupted = self.stop_event.wait(hold)  # the hang itself; the soak's end cuts it short
        outcome = "survived" if self._same_process(pid, created) else "killed_by_kernel"
        if interrupted and outcome == "survived":
            outcome = "cut_short"  # ended before its time: too short to tell a kill in time from a late one
        elif past_liveness and outcome == "survived":
            # Late rather than never? Give the kernel a while longer (a ceiling) before resuming it.
            try:
                psutil.Process(pid).wait(LATE_KILL_CEILING_S)
                outcome = "killed_late"
            except psutil.TimeoutExpired:
                pass
            except psutil.NoSuchProcess:
                outcome = "killed_late"
            self.hang_survivors.append(f"{name}/{replica} pid {pid}: {outcome}")
        if outcome in ("survived", "cut_short"):
            self._signal(pid, signal.SIGCONT)
        self.stopped.pop(pid, None)
        self.hangs[f"{kind}:{outcome}"] += 1

    def cross_budget(self, client: Client) -> None:
        victims = self._replicas(client, "hog")
        if not victims:
            return
        _, _, pid = victims[0]
        log(f"chaos: memory hog (pid {pid}) past its {HOG_BUDGET_MIB} MiB budget")
        self.actions["memhog_over_budget"] += 1
        for _ in range(2 * HOG_BUDGET_MIB // 64):
            try:
                client.call("hog", "hog", mib=64, timeout=5.0)
            except MicrokernelError:
                break  # killed under us (the reply never came), as it should be
            if not psutil.pid_exists(pid):
                break
        try:
            psutil.Process(pid).wait(10.0)  # a ceiling: the sampler runs every 250 ms
            self.memhog["killed"] += 1
        except psutil.TimeoutExpired:
            self.memhog["not_killed_within_10s"] += 1
        except psutil.NoSuchProcess:
            self.memhog["killed"] += 1

    def restart_daemon(self) -> None:
        st = self.state
        old = st.current
        log(f"chaos: kill -9 of the daemon (pid {old.pid}, lifetime {old.index})")
        self.monitor.pause()
        st.up.clear()
        tree = st.processes.add_tree(old.pid)
        old.ended = time.monotonic()
        old.end_reason = "kill -9"
        self.daemon_proc.kill9()
        self.actions["kill9_daemon"] += 1
        procs = []
        for pid in tree:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=TREE_GONE_CEILING_S)  # reaps those adopted by us
        reap_zombies(keep=set())
        left = st.processes.alive()
        if left:
            log(f"chaos: {len(left)} process(es) outlived the killed daemon: {left}")
            self.orphans_after_daemon_kill.extend(left)
            reap_leftovers(left)
        # Segments of the dead kernel's replicas are unlinked by the next daemon at its start.
        self.shm_left_by_killed_daemon.append(len(our_segments({old.pid}, set())))
        t0 = time.monotonic()
        self.daemon_proc.start()
        st.lifetimes.append(Lifetime(index=old.index + 1, pid=self.daemon_proc.pid, started=time.monotonic()))
        recovery = wait_all_ready(st.control, self.names, READY_CEILING_S)
        st.current.ready_at = time.monotonic()
        self.recoveries_s.append(round(time.monotonic() - t0, 2))
        self.shm_left_after_restart.extend(our_segments({old.pid}, set()))
        log(f"chaos: new daemon pid {self.daemon_proc.pid}, all services ready after {recovery:.1f}s")
        st.up.set()
        self.monitor.resume()

    # --- helpers ---

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _same_process(pid: int, created: float) -> bool:
        try:
            p = psutil.Process(pid)
            return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def resume_stopped(self) -> None:
        """Never leave a SIGSTOPped process behind (teardown)."""
        for pid, created in list(self.stopped.items()):
            if self._same_process(pid, created):
                self._signal(pid, signal.SIGCONT)
        self.stopped.clear()

    def run(self) -> None:
        client: Client | None = None
        try:
            while not self.stop_event.wait(self.rng.uniform(*self.interval)):
                now = time.monotonic()
                if self.restart_every > 0 and now >= self.next_restart and self.end_at - now > 25.0:  # room to recover
                    if client is not None:
                        client.close()
                        client = None
                    self.restart_daemon()
                    self.next_restart = time.monotonic() + self._restart_gap()
                    continue
                try:
                    if client is None:
                        client = Client(self.state.control, timeout=5.0, name="chaos-driver")
                    action = self.rng.choices(["kill", "hang", "brief", "hog"], weights=[45, 20, 15, 20])[0]
                    if action == "kill":
                        self.kill_replica(client)
                    elif action == "hang":
                        self.hang_replica(client, past_liveness=True)
                    elif action == "brief":
                        self.hang_replica(client, past_liveness=False)
                    else:
                        self.cross_budget(client)
                except (KernelUnavailable, MicrokernelError) as exc:
                    self.actions[f"skipped:{type(exc).__name__}"] += 1
        except BaseException as exc:  # noqa: BLE001 — reported in the result, never a silent thread death
            self.error = f"{type(exc).__name__}: {exc}"
            log(f"chaos driver failed: {self.error}")
        finally:
            self.resume_stopped()
            if client is not None:
                client.close()


def growth_summary(lifetimes: list[Lifetime]) -> tuple[int | None, float | None, list[dict[str, Any]]]:
    """fd and RSS growth of the daemon over its longest measured lifetime, and every lifetime's."""
    measured = [g for g in (lt.growth() for lt in lifetimes) if g is not None]
    if not measured:
        return None, None, []
    longest = max(measured, key=lambda g: g["window_s"])
    return longest["fds"], longest["rss_mib"], measured


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One soak; the result for the JSON line (with ``error`` when something broke the bench itself)."""
    become_subreaper()
    rng = random.Random(args.seed)
    names = ["store", "loader", "inferencer", "trainer", "echo", "hog", "leaser"]
    kernel = {"heartbeat_interval": f"{HEARTBEAT_S:g}s", "heartbeat_liveness": LIVENESS, "event_history": 4096}
    # The services are filled in once the temp dir (where the weights go) exists.
    daemon = ChaosDaemon({}, kernel=kernel, ready_timeout=60.0)
    weights = os.path.join(daemon.tmp, "lin.safetensors")
    write_weights(weights)
    with open(daemon.config_path) as f:
        base = f.read()
    services_text = render_config({}, services_config(weights, args.seed)).split("\n", 1)[1]  # without "[kernel]"
    with open(daemon.config_path, "w") as f:
        f.write(base + services_text)

    state = RunState(control=daemon.control)
    tally = Tally(grace=args.grace)
    ledger = StoreLedger()
    stop_all = threading.Event()
    stop_load = threading.Event()
    stop_chaos = threading.Event()
    result: dict[str, Any] = {"seed": args.seed, "minutes": args.minutes}
    workers: list[Worker] = []
    driver: ChaosDriver | None = None
    t_start = time.monotonic()
    phases: dict[str, float] = {}
    try:
        daemon.start()
        state.lifetimes.append(Lifetime(index=0, pid=daemon.pid, started=time.monotonic()))
        log(f"daemon pid {daemon.pid} in {daemon.tmp}; waiting for every service")
        startup = wait_all_ready(daemon.control, names, READY_CEILING_S)
        state.current.ready_at = time.monotonic()
        state.up.set()
        phases["ready"] = time.monotonic()
        log(f"all services ready after {startup:.1f}s; load and chaos for {args.minutes:g} min")
        monitor = EventMonitor(state, stop_all)
        sampler = Sampler(state, stop_all)
        monitor.start()
        sampler.start()
        seed = args.seed * 100
        workers = [
            EchoWorker("echo-0", daemon.control, tally, stop_load, seed + 1),
            EchoWorker("echo-1", daemon.control, tally, stop_load, seed + 2),
            StoreWorker("store-0", daemon.control, tally, stop_load, seed + 3, ledger=ledger),
            InferWorker("infer-0", daemon.control, tally, stop_load, seed + 4, expected=expected),
            LeaseWorker("lease-0", daemon.control, tally, stop_load, seed + 5),
            TrainerWorker("trainer-0", daemon.control, tally, stop_load, seed + 6),
        ]
        for w in workers:
            w.start()
        end_at = time.monotonic() + args.minutes * 60.0
        driver = ChaosDriver(daemon, state, monitor, stop_chaos, rng, end_at=end_at,
                             interval=(args.min_interval, args.max_interval), restart_every=args.daemon_restart_every,
                             names=names)
        driver.start()
        stop_all.wait(max(0.0, end_at - time.monotonic()))  # the soak itself

        log("stopping chaos and load")
        phases["soak"] = time.monotonic()
        stop_chaos.set()
        driver.join(READY_CEILING_S + STOP_CEILING_S)  # it may be in the middle of a daemon restart
        stop_load.set()
        for w in workers:
            w.join(45.0)  # the longest request timeout (30 s) plus grace
        tally.close_inflight()
        phases["load_stopped"] = time.monotonic()

        log("final checks: services ready, every acknowledged write reads back")
        final_ready = wait_all_ready(daemon.control, names, READY_CEILING_S)
        state.current.ready_at = state.current.ready_at or time.monotonic()
        with Client(daemon.control, timeout=30.0, name="chaos-verify") as client:
            verified = ledger.verify(client, timeout=30.0, ceiling=120.0)
            leases_now = client.leases()
            final_leases = check_leases(leases_now)
        # Leases of the load's client (closed by now) that nobody released: a lease held by a client
        # connection lives until released (docs/resources.md), so each one is a lost reply.
        client_leases_left = [lease for lease in leases_now.get("leases") or ()
                              if str(lease.get("holder", "")).startswith("lease-0@")]
        phases["verified"] = time.monotonic()
        Sampler(state, stop_all).sample_daemon(state.current)  # the end point of this lifetime
        state.current.ended = time.monotonic()
        state.current.end_reason = "SIGTERM"
        stop_all.set()
        monitor.pause(5.0)
        last_pid = daemon.pid
        state.processes.add_tree(last_pid)
        exit_code = daemon.terminate()
        phases["daemon_stopped"] = time.monotonic()
        # Orphans: every process ever seen in a daemon's tree that outlived it (ceiling).
        procs = []
        for entry in state.processes.alive():
            try:
                procs.append(psutil.Process(entry["pid"]))
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=TREE_GONE_CEILING_S)
        reap_zombies(keep=set())
        final_orphans = state.processes.alive()
        reap_leftovers(final_orphans)
        handover.release_all()  # the bench's own pool and unclaimed hand-overs (a client's, not the kernel's)
        gc.collect()
        leaked = our_segments(state.kernel_pids(), state.processes.owner_pids() | {os.getpid()})

        fds_growth, rss_growth, growth = growth_summary(state.lifetimes)
        summary = tally.summary()
        orphans = driver.orphans_after_daemon_kill + final_orphans
        result.update({
            "requests": summary["requests"],
            "succeeded": summary["succeeded"],
            "failed_clear_error": summary["failed_clear_error"],
            "failed_clear_error_by_code": summary["failed_clear_error_by_code"],
            "failed_clear_error_by_op": summary["failed_clear_error_by_op"],
            "hung": summary["hung"],
            "failed_unclear": summary["failed_unclear"],
            "lost_acked_writes": len(verified["lost"]),
            "corrupted_reads": ledger.corrupted_reads + len(verified["corrupted"]),
            "lease_overallocations": len(state.lease_problems) + len(final_leases),
            "orphans": len(orphans),
            "shm_segments_leaked": len(leaked),
            "kernel_fds_growth": fds_growth,
            "kernel_rss_growth_mib": rss_growth,
            "restarts_by_reason": dict(sorted(state.restarts_by_reason.items())),
            "heartbeat_silence_max_s": max(state.heartbeat_silences_s, default=None),
            "daemon_restarts": driver.actions["kill9_daemon"],
            "acked_writes": verified["checked"],
            "unreadable_acked_writes": verified["unreadable"][:5],
            "acked_not_found_midrun": ledger.acked_not_found_midrun,
            "chaos_actions": dict(sorted(driver.actions.items())),
            "hangs": dict(sorted(driver.hangs.items())),
            "memhog": dict(driver.memhog),
            "budget_kills": state.budget_kills,
            "exits_by_service": dict(sorted(state.exits_by_service.items())),
            "daemon_recovery_s": driver.recoveries_s,
            "startup_s": round(startup, 1),
            "final_ready_s": round(final_ready, 1),
            "shm_left_by_killed_daemon": driver.shm_left_by_killed_daemon,
            "shm_left_after_restart": len(driver.shm_left_after_restart),
            "lease_samples": state.lease_samples,
            "leases_seen_max": state.leases_seen_max,
            "client_leases_left": len(client_leases_left),
            "processes_tracked": len(state.processes),
            "kernel_growth_by_lifetime": growth,
            "daemon_exit_code": exit_code,
            "requests_by_op": summary["requests_by_op"],
            "slowest_over_timeout_s": summary["slowest_over_timeout_s"],
            "slowest_op": summary["slowest_op"],
        })
        if summary["failed_clear_error_reasons"]:
            result["failed_clear_error_reasons"] = summary["failed_clear_error_reasons"]
        if summary["failed_unclear_kinds"]:
            result["failed_unclear_kinds"] = summary["failed_unclear_kinds"]
        if summary["hung_calls"]:
            result["hung_calls"] = summary["hung_calls"]
        if driver.hang_survivors:
            result["hang_survivors"] = driver.hang_survivors[:10]
        if orphans:
            result["orphan_processes"] = orphans[:10]
        if leaked:
            result["leaked_segments"] = leaked[:10]
        if state.lease_problems or final_leases:
            result["lease_problems"] = (state.lease_problems + final_leases)[:10]
        if driver.error:
            result["error"] = f"chaos driver: {driver.error}"
    except BaseException as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"chaos run failed: {result['error']}\n--- daemon log tail ---\n{daemon.log_tail()}")
        if isinstance(exc, KeyboardInterrupt):
            result["interrupted"] = True
    finally:
        stop_chaos.set()
        stop_load.set()
        stop_all.set()
        if driver is not None:
            driver.resume_stopped()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.terminate()
        reap_leftovers(state.processes.alive())
        if args.keep:
            log(f"kept {daemon.tmp} (daemon log: {daemon.log_path})")
        else:
            daemon.stop(timeout=5.0)  # already stopped: removes the temp dir (runtime dir, store root)
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    result["phases_s"] = {name: round(t - t_start, 1) for name, t in phases.items()}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long load and chaos run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--grace", type=float, default=2.0,
                        help="seconds past its timeout after which a request counts as hung")
    parser.add_argument("--min-interval", type=float, default=1.0, help="shortest pause between chaos actions (s)")
    parser.add_argument("--max-interval", type=float, default=4.0, help="longest pause between chaos actions (s)")
    parser.add_argument("--daemon-restart-every", type=float, default=30.0,
                        help="mean seconds between kill -9s of the daemon itself (0: never)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, store) for a post-mortem")
    args = parser.parse_args()
    exit_cleanly_on_sigterm()
    result = run(args)
    emit(result)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
