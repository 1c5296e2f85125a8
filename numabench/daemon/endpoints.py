"""Where the daemon listens and how clients find it; what a bind address may be.

Default: `ipc://` in a folder only the user can open (0700), so no other user can connect.
Loopback TCP is also accepted, authenticated with CURVE (daemon/auth.py). Anything else (another
interface, an ipc socket in a shared folder) needs an explicit `allow_public=True` and is warned
about.

The running daemon writes its endpoint to a state file (0600) in the same private folder;
`status`, `stop` and `client` read it, so they need no flags.
"""
from __future__ import annotations

import ipaddress
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from numabench.errors import NumabenchError
from numabench.fileio import pid_alive

RUNTIME_ENV = "NUMABENCH_RUNTIME_DIR"  # overrides the private folder (tests, several daemons)
ENDPOINT_ENV = "NUMABENCH_ENDPOINT"  # a client's endpoint without flags or state file
STATE_FILE = "serve.json"
SOCKET_FILE = "serve.sock"
IPC_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


class EndpointError(NumabenchError):
    """A bind address refused, or no running daemon found."""


def runtime_dir(create: bool = True) -> Path:
    """The private folder: $NUMABENCH_RUNTIME_DIR, else $XDG_RUNTIME_DIR/numabench, else
    ~/.cache/numabench. Created 0700 when missing. A folder that exists but is not private to
    this user (a shared 1777 /tmp-like folder) is left as it is: a private `numabench-<uid>`
    folder inside it is used instead."""
    if os.environ.get(RUNTIME_ENV):
        base = Path(os.environ[RUNTIME_ENV])
    elif os.environ.get("XDG_RUNTIME_DIR") and os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "numabench"
    else:
        base = Path.home() / ".cache" / "numabench"
    path = base if not base.exists() or is_private_dir(base) else base / f"numabench-{os.getuid()}"
    if create:
        make_private_dir(path)
    return path


def make_private_dir(path: Path) -> None:
    """Create `path` 0700 if missing; refuse one that is another user's or open to others
    (never chmod a folder numabench did not create)."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = path.stat()
    if st.st_uid != os.getuid():
        raise EndpointError(f"{path} belongs to another user (uid {st.st_uid}); refusing to use it")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise EndpointError(f"{path} can be opened by other users (mode "
                            f"{stat.S_IMODE(st.st_mode):o}); make it 0700 or remove it")


def is_private_dir(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not stat.S_IMODE(st.st_mode) & 0o077


def default_endpoint() -> str:
    return f"ipc://{runtime_dir() / SOCKET_FILE}"


def state_path() -> Path:
    return runtime_dir(create=False) / STATE_FILE


def check_bind(endpoint: str, allow_public: bool = False) -> list[str]:
    """Refuse (EndpointError) or warn about a bind endpoint; returns the warnings."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise EndpointError(f"bind endpoint {endpoint!r} is not a ZeroMQ endpoint "
                            "(ipc:///path/serve.sock or tcp://127.0.0.1:PORT)")
    if scheme == "ipc":
        path = Path(rest)
        if not path.is_absolute():
            raise EndpointError(f"ipc endpoint {endpoint!r}: give an absolute path")
        if len(rest) > IPC_PATH_MAX:
            raise EndpointError(f"ipc path {rest!r} is {len(rest)} characters; the limit is "
                                f"{IPC_PATH_MAX} (a Unix socket path)")
        if is_private_dir(path.parent):
            return []
        why = f"the folder {path.parent} can be opened by other users (or is not yours)"
    elif scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or int(port) > 65535:
            raise EndpointError(f"tcp endpoint {endpoint!r} needs a host and a port, e.g. "
                                "tcp://127.0.0.1:5555 (port 0 picks a free one)")
        host = host.strip("[]")
        if host == "localhost" or _is_loopback(host):
            return []
        why = f"{host} is not a loopback address: other machines may connect"
    else:
        raise EndpointError(f"bind endpoint {endpoint!r}: use ipc:// or tcp://")
    if not allow_public:
        raise EndpointError(f"refusing to bind {endpoint}: {why}. Pass --allow-public-bind to "
                            "bind there anyway")
    return [f"binding {endpoint}: {why}"]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_endpoint(endpoint: str) -> bool:
    """ipc://, or tcp:// to a loopback address (what the load generator may talk to)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return True
    if scheme == "tcp":
        host = rest.rsplit(":", 1)[0].strip("[]")
        return host == "localhost" or _is_loopback(host)
    return False


def write_state(doc: dict[str, Any], path: Path | None = None) -> Path:
    """Write the state file atomically with 0600 permissions."""
    path = path or state_path()
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".serve-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp creates 0600
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_state(path: Path | None = None) -> dict[str, Any] | None:
    path = path or state_path()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def remove_state(pid: int, path: Path | None = None) -> None:
    """Remove the state file if it is still ours (another daemon may have replaced it)."""
    path = path or state_path()
    doc = read_state(path)
    if doc is not None and doc.get("pid") == pid:
        try:
            path.unlink()
        except OSError:
            pass


def process_start(pid: Any) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat), None if gone:
    with the pid, it names one process even after the pid is reused."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        return int(stat_line.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def is_our_daemon(doc: dict[str, Any]) -> bool:
    """The state file's process still runs and is the daemon that wrote it (not a reused pid)."""
    pid = doc.get("pid")
    if not pid_alive(pid):
        return False
    start = process_start(pid)
    return start is not None and start == doc.get("pid_start")


def discover_endpoint(endpoint: str | None = None) -> str:
    """The endpoint a client should use: explicit, $NUMABENCH_ENDPOINT, or the state file."""
    if endpoint:
        return endpoint
    if os.environ.get(ENDPOINT_ENV):
        return os.environ[ENDPOINT_ENV]
    doc = read_state()
    if doc is None or not isinstance(doc.get("endpoint"), str):
        raise EndpointError(f"no running daemon found (no state file {state_path()}); start one "
                            "with `numabench serve`, or give --endpoint")
    if not is_our_daemon(doc):
        raise EndpointError(f"the daemon in {state_path()} (pid {doc.get('pid')}) is not running "
                            "(the pid is gone or now another process); start one with "
                            "`numabench serve`")
    return doc["endpoint"]
