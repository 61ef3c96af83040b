"""CURVE key files: creating key pairs, checking and loading them, and the client's key settings.

Files use the format of ``zmq.auth.create_certificates`` (``NAME.key`` holds the public key,
``NAME.key_secret`` both keys), so ``zmq.auth.load_certificate`` reads them and keys made by other
ZeroMQ tools work here. A secret key file must be private: owned by the user reading it and
readable by nobody else (mode 0600 or stricter), else it is refused.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from protocols.errors import ErrorCode, MicrokernelError

CLIENT_KEY_ENV = "MICROKERNEL_CLIENT_KEY"
"""Path of the client's secret key file (``NAME.key_secret``)."""
SERVER_KEY_ENV = "MICROKERNEL_SERVER_KEY"
"""Path of the kernel's public key file (``server.key``)."""

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

_BANNER = """#   ****  Generated on {now} by mkctl keygen  ****
#   ZeroMQ CURVE {kind} Certificate
#   {advice}

metadata
curve
    public-key = "{public}"
"""


class KeyFileError(MicrokernelError):
    """A key file is missing, unreadable, malformed or not private enough; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(ErrorCode.INVALID_FIELD, reason)


def write_key_pair(directory: str | os.PathLike[str], name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Create ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (secret, 0600) in ``directory``.

    Refuses to overwrite existing files unless ``force``. The secret file is created with mode
    0600 from the start, never readable by others, not even for a moment.
    """
    if not KEY_NAME_RE.fullmatch(name):
        raise KeyFileError(f"invalid key name {name!r}: use letters, digits, '_', '-' or '.', starting with a letter or digit")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    if not force:
        for path in (public_path, secret_path):
            if path.exists():
                raise KeyFileError(f"{path} already exists (use --force to replace it)")
    public, secret = zmq.curve_keypair()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    public_text = _BANNER.format(now=now, kind="Public", advice="Give this file to the other side.",
                                 public=public.decode())
    secret_text = _BANNER.format(now=now, kind="**Secret**", advice="Keep this file private; never share it.",
                                 public=public.decode()) + f'    secret-key = "{secret.decode()}"\n'
    _write(secret_path, secret_text, 0o600)
    _write(public_path, public_text, 0o644)
    return public_path, secret_path


def _write(path: Path, text: str, mode: int) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, mode)  # the umask may have taken bits away from the public file


def private_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not an acceptable secret key file, or None when it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist (create it with `mkctl keygen`)"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to us ({os.getuid()})"
    if st.st_mode & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; a secret key file must be 0600 (chmod 600 {path})"
    return None


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a private secret key file; :class:`KeyFileError` otherwise."""
    problem = private_file_problem(path)
    if problem is not None:
        raise KeyFileError(problem)
    public, secret = _load(path)
    if not secret:
        raise KeyFileError(f"{path} holds no secret key (is it the public {PUBLIC_SUFFIX} file?)")
    return public, secret


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key in ``path`` (a ``.key`` or ``.key_secret`` file)."""
    public, _ = _load(path)
    return public


def _load(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load key file {path}: {exc}") from None
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise KeyFileError(f"{path} holds a malformed key (expected 40 z85 characters)")
    return public, secret


def load_authorized(directory: str | os.PathLike[str]) -> tuple[dict[bytes, str], list[str]]:
    """Authorized client keys: ``{z85 public key: name}`` from ``DIR/*.key`` (name = file stem).

    Returns the keys and one line per file that could not be used (it is skipped, not fatal).
    """
    keys: dict[bytes, str] = {}
    problems: list[str] = []
    for path in sorted(Path(directory).glob(f"*{PUBLIC_SUFFIX}")):
        try:
            keys[load_public(path)] = path.name[: -len(PUBLIC_SUFFIX)]
        except KeyFileError as exc:
            problems.append(exc.reason)
    return keys, problems


# --- the client side ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientKeys:
    """What a client needs to talk CURVE to the kernel: its key pair and the kernel's public key."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, target: zmq.Context | zmq.Socket) -> None:
        """Make ``target`` (a socket, or a context's default options for new sockets) a CURVE client."""
        target.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        target.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        target.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def client_keys(
    client_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientKeys | None:
    """The client's CURVE keys from the arguments, else ``$MICROKERNEL_CLIENT_KEY`` /
    ``$MICROKERNEL_SERVER_KEY``; None when neither is configured. Giving only one of the two is an
    error (:class:`KeyFileError`), as is an unreadable or non-private secret key file."""
    env = os.environ if environ is None else environ
    client = client_key or env.get(CLIENT_KEY_ENV) or None
    server = server_key or env.get(SERVER_KEY_ENV) or None
    if client is None and server is None:
        return None
    if client is None or server is None:
        missing = f"--client-key / ${CLIENT_KEY_ENV}" if client is None else f"--server-key / ${SERVER_KEY_ENV}"
        raise KeyFileError(f"CURVE needs both the client's secret key and the kernel's public key; {missing} is not set")
    public, secret = load_secret(client)
    return ClientKeys(public=public, secret=secret, server=load_public(server))


def client_context(
    endpoint: str,
    client_key: str | os.PathLike[str] | None = None,
    server_key: str | os.PathLike[str] | None = None,
) -> tuple[zmq.Context, bool]:
    """The ZeroMQ context a client uses for ``endpoint``, and whether the client owns it.

    For a ``tcp://`` endpoint with keys configured (arguments or environment), a context of the
    client's own whose every new socket is a CURVE client of the kernel (control, events);
    otherwise the process-wide shared context. The owner destroys its own context on close.
    """
    if not endpoint.startswith("tcp://"):
        return zmq.Context.instance(), False
    keys = client_keys(client_key, server_key)
    if keys is None:
        return zmq.Context.instance(), False
    ctx = zmq.Context()
    keys.apply(ctx)
    return ctx, True
