"""The peers of ``bench/peers.py``: a benchmark-only virtualenv with circus and supervisord, their
configuration files, their control clients, and a tear-down that leaves nothing behind.

circus and supervisord are never dependencies of ours: they live in their own virtualenv
(``$MK_PEERS_VENV``, else ``.peers-venv/`` in the repository root), created on first use with
``pip install circus supervisor`` and reused afterwards. The benchmark itself runs in our venv and
speaks to them over their public control interfaces with no code of theirs: circus's ZeroMQ control
endpoint (a DEALER sending the JSON command ``circusctl`` sends) and supervisord's XML-RPC
(``xmlrpc.client`` over its unix socket, as ``supervisorctl`` does).
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import xmlrpc.client
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import zmq

REPO = Path(__file__).resolve().parent.parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"
PEER_PACKAGES = ("circus", "supervisor")


# --- the peers' virtualenv ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PeersVenv:
    """Where circusd and supervisord live, and their versions."""

    path: Path
    circus_version: str
    supervisor_version: str

    @property
    def circusd(self) -> str:
        return str(self.path / "bin" / "circusd")

    @property
    def supervisord(self) -> str:
        return str(self.path / "bin" / "supervisord")


def peers_venv_path() -> Path:
    return Path(os.environ.get("MK_PEERS_VENV") or REPO / ".peers-venv")


def ensure_peers_venv(log: Any) -> PeersVenv:
    """The peers' venv, created (``python -m venv`` + ``pip install circus supervisor``) if missing.

    Raises ``RuntimeError`` with pip's last words when it cannot be made (e.g. no network).
    """
    path = peers_venv_path()
    python = path / "bin" / "python"
    if not ((path / "bin" / "circusd").exists() and (path / "bin" / "supervisord").exists()):
        log(f"creating the peers' virtualenv {path} (pip install {' '.join(PEER_PACKAGES)})")
        # From the base interpreter: a venv made from inside our venv would still be a plain venv,
        # but the base one is the honest "someone installing circus" starting point.
        base = getattr(sys, "_base_executable", sys.executable)
        steps = [[base, "-m", "venv", str(path)],
                 [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_PACKAGES]]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {' | '.join(tail)}")
    probe = subprocess.run(
        [str(python), "-c",
         "from importlib.metadata import version; print(version('circus'), version('supervisor'))"],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise RuntimeError(f"the peers' venv {path} is broken: {probe.stderr.strip()[-300:]}")
    circus_v, supervisor_v = probe.stdout.split()
    return PeersVenv(path=path, circus_version=circus_v, supervisor_version=supervisor_v)


# --- workers -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """One supervised program: ``worker.py NOTIFY TAG [--hog LIMIT]`` under the name ``name``."""

    name: str
    tag: str
    hog_limit: int | None = None

    def argv(self, notify: str) -> list[str]:
        args = [sys.executable, str(WORKER), notify, self.tag]
        if self.hog_limit is not None:
            args += ["--hog", str(self.hog_limit)]
        return args


# --- a peer daemon -----------------------------------------------------------------------------


class PeerDaemon:
    """A supervisor daemon in the foreground, in its own session, with its log in ``tmp``.

    ``stop()`` is SIGTERM (the peer's orderly shutdown), SIGKILL of its process group after a grace,
    and then SIGKILL of every descendant it had (by pid, seen through psutil before the stop), since
    a peer may put its children in other process groups.
    """

    kind = "peer"

    def __init__(self, label: str, tmp: str) -> None:
        self.label = label
        self.tmp = tmp
        os.makedirs(tmp, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(tmp, f"{self.kind}.log")

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> PeerDaemon:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.tmp, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        family = self.descendants() if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        for p in family:
            try:
                p.kill()  # psutil checks the pid still names the same process (create time)
            except psutil.Error:
                pass
        psutil.wait_procs(family, timeout=5)


# --- circus ------------------------------------------------------------------------------------


class Circus(PeerDaemon):
    """``circusd circus.ini`` with one watcher per worker; ``check_delay`` None = circus's default.

    ``memory_plugin`` adds circus's ``resource_watcher`` plugin on the ``--hog`` worker(s):
    ``{"max_mem": "128M", "loop_rate": 0.1}`` (``loop_rate`` None = the plugin's default).
    """

    kind = "circus"

    def __init__(self, label: str, tmp: str, venv: PeersVenv, notify: str, workers: Sequence[WorkerSpec], *,
                 check_delay: float | None = None, memory_plugin: Mapping[str, Any] | None = None) -> None:
        super().__init__(label, tmp)
        self.venv = venv
        self.endpoint = f"ipc://{tmp}/ctl.sock"
        lines = ["[circus]",
                 f"endpoint = {self.endpoint}",
                 f"pubsub_endpoint = ipc://{tmp}/pub.sock",
                 f"logoutput = {tmp}/circusd-own.log"]
        if check_delay is not None:
            lines.append(f"check_delay = {check_delay}")
        for w in workers:
            lines += ["", f"[watcher:{w.name}]", f"cmd = {' '.join(w.argv(notify))}", "numprocesses = 1"]
        if memory_plugin is not None:
            hogs = [w.name for w in workers if w.hog_limit is not None]
            for i, name in enumerate(hogs):
                lines += ["", f"[plugin:memory{i}]", "use = circus.plugins.resource_watcher.ResourceWatcher",
                          f"watcher = {name}",
                          # memory only: CPU and "health" (CPU + memory %) restarts are switched off
                          "max_cpu = 0", "health_threshold = 0"]
                lines += [f"{k} = {v}" for k, v in memory_plugin.items() if v is not None]
        self.config_path = os.path.join(tmp, "circus.ini")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._poller: zmq.Poller | None = None

    def command(self) -> list[str]:
        return [self.venv.circusd, self.config_path]

    def call(self, command: str, timeout: float = 10.0, **props: Any) -> dict[str, Any]:
        """One command on the control endpoint; what ``circusctl`` sends, without its tooling."""
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.linger = 0
            self._sock.connect(self.endpoint)
            self._poller = zmq.Poller()  # one poller per socket, as CircusClient keeps it
            self._poller.register(self._sock, zmq.POLLIN)
        poller = self._poller
        assert poller is not None
        call_id = uuid.uuid4().hex
        self._sock.send(json.dumps({"command": command, "properties": props, "id": call_id}).encode())
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000)):
                raise TimeoutError(f"circus {command!r}: no reply within {timeout:g}s")
            reply = json.loads(self._sock.recv())
            if reply.get("id") == call_id:
                return reply

    def status_fn(self) -> Any:
        """A zero-argument ``status`` call for the latency loop: what circus's own client
        (``CircusClient.call``, behind ``circusctl``) does per call, as ``call`` does it: a fresh id,
        the JSON request, send, poll, receive, the JSON reply decoded and its id checked."""
        assert self._sock is not None, "call() once first"
        return functools.partial(self.call, "status")

    def bytes_status_fn(self) -> Any:
        """``status_fn`` without the client's work: one request encoded once, the reply's bytes
        not decoded. A floor for circus's control path, not a client round trip."""
        sock = self._sock
        assert sock is not None, "call() once first"
        request = json.dumps({"command": "status", "properties": {}, "id": uuid.uuid4().hex}).encode()
        send, recv = sock.send, sock.recv

        def status() -> bytes:
            send(request)
            return recv()

        return status

    def stop(self, grace: float = 15.0) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._poller = None
        super().stop(grace)


# --- supervisord -------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.unix_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    """``xmlrpc.client`` over a unix socket, keeping the connection between calls when allowed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.unix_path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        conn = _UnixHTTPConnection(self.unix_path)
        self._connection = host, conn
        return conn


class Supervisord(PeerDaemon):
    """``supervisord -n -c supervisord.conf`` with one ``[program:x]`` per worker.

    ``startsecs`` None keeps supervisord's default (1 s in STARTING before RUNNING); 0 makes a
    spawned process RUNNING at once.
    """

    kind = "supervisord"

    def __init__(self, label: str, tmp: str, venv: PeersVenv, notify: str, workers: Sequence[WorkerSpec], *,
                 startsecs: int | None = 0) -> None:
        super().__init__(label, tmp)
        self.venv = venv
        self.socket_path = os.path.join(tmp, "supervisor.sock")
        os.makedirs(os.path.join(tmp, "logs"), exist_ok=True)
        lines = ["[unix_http_server]", f"file = {self.socket_path}", "",
                 "[supervisord]", "nodaemon = true", f"logfile = {tmp}/supervisord-own.log",
                 f"pidfile = {tmp}/supervisord.pid", f"childlogdir = {tmp}/logs",
                 "minfds = 4096",  # 200 programs: three pipes and two log files each
                 "", "[rpcinterface:supervisor]",
                 "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface"]
        for w in workers:
            lines += ["", f"[program:{w.name}]", f"command = {' '.join(w.argv(notify))}", "autorestart = true"]
            if startsecs is not None:
                lines.append(f"startsecs = {startsecs}")
        self.config_path = os.path.join(tmp, "supervisord.conf")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._proxy: Any = None

    def command(self) -> list[str]:
        return [self.venv.supervisord, "-n", "-c", self.config_path]

    @property
    def rpc(self) -> Any:
        """``supervisor.*`` of the XML-RPC interface (``xmlrpc.client.ServerProxy``)."""
        if self._proxy is None:
            self._proxy = xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(self.socket_path))
        return self._proxy.supervisor

    def wait_running(self, name: str, pid: int, timeout: float) -> None:
        """Until supervisord reports ``name`` RUNNING with ``pid`` (its STARTING lasts ``startsecs``)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.rpc.getProcessInfo(name)
            if info["statename"] == "RUNNING" and info["pid"] == pid:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"supervisord: {name} not RUNNING as pid {pid} within {timeout:g}s: {info}")
            # Not the measured interval: the next kill waits for a state supervisord decides by a timer.
            time.sleep(0.01)

    def stop(self, grace: float = 15.0) -> None:
        if self._proxy is not None:
            self._proxy("close")()
            self._proxy = None
        super().stop(grace)
