"""The supervision tour: ``python -m microkernel.tour``.

Starts a real ``microkerneld`` with an embedded configuration holding a plug-in service (the
example ``Greeter``, two replicas), then drives it the way an operator would, through ``mkctl``:
status, calls over the data plane, the event stream, a crash (``kill -9`` of a replica) and its
supervised restart, scaling, and a clean shutdown. Every command is printed before its output.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

CONFIG = """\
[kernel]
heartbeat_interval = "1s"

[services.greeter]
entry = "services.examples.greeter:Greeter"
replicas = 2
restart = "permanent"

[services.greeter.config]
greeting = "Hello"
"""

READY_LINE = "microkernel ready"
CEILING_S = 30.0


class Session:
    """One daemon in a private runtime directory, driven through mkctl (the tour and the demo)."""

    def __init__(self, workdir: Path, verbose: bool, config: str = CONFIG) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.runtime_dir = workdir / "rt"
        self.config = workdir / "kernel.toml"
        self.config.write_text(config)
        self.log_path = workdir / "microkerneld.log"
        self.daemon: subprocess.Popen[bytes] | None = None

    def run(self) -> None:
        """What the session does with its daemon (the tour, the demo)."""
        raise NotImplementedError

    def step(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def start_daemon(self) -> None:
        cmd = [sys.executable, "-m", "microkernel", "--config", str(self.config), "--runtime-dir", str(self.runtime_dir)]
        print(f"$ microkerneld --config {self.config}", flush=True)
        self.daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ready = threading.Event()

        def pump() -> None:
            assert self.daemon is not None and self.daemon.stdout is not None
            with open(self.log_path, "wb") as log:
                for line in iter(self.daemon.stdout.readline, b""):
                    log.write(line)
                    log.flush()
                    if self.verbose:
                        sys.stderr.write("  | " + line.decode(errors="replace"))
                    if READY_LINE.encode() in line:
                        ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(CEILING_S) or self.daemon.poll() is not None:
            raise SystemExit(f"the daemon did not start; see {self.log_path}")
        print(f"daemon up (pid {self.daemon.pid}), runtime dir {self.runtime_dir}", flush=True)

    def mkctl(self, *args: str, show: bool = True, check: bool = True) -> str:
        cmd = [sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(self.runtime_dir), *args]
        if show:
            print("$ mkctl " + " ".join(shlex.quote(a) for a in args), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if show and proc.stdout:
            print(proc.stdout.rstrip(), flush=True)
        if proc.stderr and (show or proc.returncode):
            print(proc.stderr.rstrip(), file=sys.stderr, flush=True)
        if check and proc.returncode != 0:
            raise SystemExit(f"mkctl {' '.join(args)} failed with exit code {proc.returncode}")
        return proc.stdout

    def follow_events(self, *patterns: str, count: int) -> tuple[subprocess.Popen[str], threading.Event]:
        """Start ``mkctl events`` in the background; returns once its subscription is live."""
        cmd = [sys.executable, "-m", "microkernel.cli", "--runtime-dir", str(self.runtime_dir),
               "events", *patterns, "-n", str(count)]
        print(f"$ mkctl events {' '.join(patterns)} -n {count} &", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        live = threading.Event()

        def watch_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if "following" in line:
                    live.set()
            live.set()

        threading.Thread(target=watch_stderr, daemon=True).start()
        if not live.wait(CEILING_S):
            raise SystemExit("mkctl events did not subscribe")
        return proc, live

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=CEILING_S)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def shutdown(self) -> int:
        """``mkctl shutdown``, then wait for the daemon; returns its exit code."""
        self.mkctl("shutdown")
        assert self.daemon is not None
        code = self.daemon.wait(timeout=CEILING_S)
        leftovers = sorted(p.name for p in self.runtime_dir.iterdir()) if self.runtime_dir.exists() else []
        print(f"daemon exited with code {code}; runtime dir now holds {leftovers or 'nothing'}", flush=True)
        return code


class Tour(Session):
    """Supervision through mkctl: calls, events, a crash and its restart, scaling, shutdown."""

    def run(self) -> None:
        started = time.monotonic()
        self.step("1. Start the daemon with a plug-in service (2 replicas)")
        self.start_daemon()
        self.mkctl("start", "greeter")  # already autostarted: waits until both replicas are ready
        self.mkctl("status")

        self.step("2. Call the service over the direct data plane (ZeroMQ load-balances the replicas)")
        events, _ = self.follow_events("greeter.*", count=3)
        for name in ("world", "Ada", "Linus"):
            self.mkctl("call", "greeter", "greet", f'{{"name": "{name}"}}')
        out, _ = events.communicate(timeout=CEILING_S)
        print("-- the greetings as events on the bus:")
        print(out.rstrip(), flush=True)

        print("-- the same from Python: one client, calls spread over the replicas:")
        from microkernel.client import Client

        with Client(runtime_dir=self.runtime_dir, name="tour") as client:
            replicas = [client.call("greeter", "greet", name=f"caller-{i}")["replica"] for i in range(8)]
        print(f">>> [client.call('greeter', 'greet', name=...)['replica'] for 8 calls] -> {replicas}", flush=True)

        self.step("3. Crash a replica (kill -9) and watch the supervisor restart it")
        pid = self._replica_pid(0)
        events, _ = self.follow_events("service.exited", "service.ready", count=2)
        print(f"$ kill -9 {pid}", flush=True)
        os.kill(pid, signal.SIGKILL)
        out, _ = events.communicate(timeout=CEILING_S)
        print(out.rstrip(), flush=True)
        self.mkctl("status", "greeter")

        self.step("4. Scale to 3 replicas and call again")
        self.mkctl("scale", "greeter", "3")
        self.mkctl("call", "greeter", "stats")
        self.mkctl("status")

        self.step("5. Shut down cleanly (services stop in reverse dependency order)")
        code = self.shutdown()
        print(f"\ntour finished in {time.monotonic() - started:.1f}s (daemon log: {self.log_path})", flush=True)
        if code != 0:
            raise SystemExit(code)

    def _replica_pid(self, replica: int) -> int:
        import json

        status = json.loads(self.mkctl("--json", "status", "greeter", show=False))
        service = next(s for s in status["services"] if s["name"] == "greeter")
        return int(service["replicas"][replica]["pid"])



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m microkernel.tour", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="also show the daemon's log as it runs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config and log)")
    args = parser.parse_args(argv)
    return run_in_workdir(lambda workdir: Tour(workdir, verbose=args.verbose), prefix="mk-tour-", keep=args.keep)


def run_in_workdir(make: Callable[[Path], Session], *, prefix: str, keep: bool) -> int:
    """Run a session in a fresh temporary directory; stop its daemon and remove the directory after."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    session = make(workdir)
    try:
        session.run()
    finally:
        session.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
