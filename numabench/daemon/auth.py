"""CURVE keys for TCP clients: only someone who can read the owner's runtime folder connects.

On first start the daemon creates, in `<runtime>/curve/` (0700, like the runtime folder):
`server.key` / `server.key_secret` (the daemon's pair) and `client.key` / `client.key_secret`
(the pair the owner's tools use), and `clients/client.key`, the public keys the daemon accepts.
A ZAP handler (zmq.auth) checks each TCP connection's key against `clients/`; a client without
an accepted key never gets a message through. ipc sockets need no key: they live in the
private folder and are 0600. Another machine's client: copy `client.key*` and `server.key`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from numabench.daemon import endpoints
from numabench.errors import NumabenchError

CURVE_DIR = "curve"


@dataclass(frozen=True)
class Keys:
    folder: Path

    @property
    def clients(self) -> Path:
        return self.folder / "clients"

    def server_pair(self) -> tuple[bytes, bytes]:
        return _load(self.folder / "server.key_secret")

    def client_pair(self) -> tuple[bytes, bytes]:
        return _load(self.folder / "client.key_secret")

    def server_public(self) -> bytes:
        return _load(self.folder / "server.key")[0]


def _load(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise NumabenchError(f"cannot read the CURVE key {path}: {e}; remove {path.parent} and "
                             "restart the daemon to make new keys") from None
    return public, secret


def key_folder(runtime: Path | None = None) -> Path:
    return (runtime or endpoints.runtime_dir()) / CURVE_DIR


def ensure_keys(runtime: Path | None = None) -> Keys:
    """The key folder, with the server and client pairs made on first use (0700 / 0600)."""
    if not zmq.has("curve"):
        raise NumabenchError("this pyzmq/libzmq has no CURVE support, needed for tcp:// "
                             "endpoints; use the default ipc:// endpoint")
    folder = key_folder(runtime)
    endpoints.make_private_dir(folder)
    if not (folder / "server.key_secret").exists() or not (folder / "client.key_secret").exists():
        old = os.umask(0o077)  # the secret files must not be readable by anyone else
        try:
            zmq.auth.create_certificates(str(folder), "server")
            zmq.auth.create_certificates(str(folder), "client")
        finally:
            os.umask(old)
    keys = Keys(folder)
    endpoints.make_private_dir(keys.clients)
    if not (keys.clients / "client.key").exists():
        shutil.copy(folder / "client.key", keys.clients / "client.key")
    return keys


def client_keys(runtime: Path | None = None) -> Keys:
    """The owner's keys for a client; a clear error where there are none."""
    folder = key_folder(runtime)
    if not (folder / "client.key_secret").exists():
        raise NumabenchError(f"no CURVE client key in {folder}: a tcp:// daemon needs one; start "
                             "the daemon as this user (it makes the keys), or copy its keys here")
    return Keys(folder)


def secure_server(sock: zmq.Socket, keys: Keys) -> None:
    public, secret = keys.server_pair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: Keys) -> None:
    public, secret = keys.client_pair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = keys.server_public()


def start_authenticator(ctx: zmq.Context, keys: Keys):
    """A ZAP handler thread accepting the public keys in `keys.clients` (stop() it at close)."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.clients))
    return auth
