"""The client channel: the worker protocol's framing (JSON header + raw array frames, never
pickle) with its own message types. docs/serve.md describes the fields.

Client -> daemon: INFER, STATUS, STOP, RELOAD, PING.   Daemon -> client: REPLY.
Every message a client sends may carry an "id" (string or integer, echoed in the REPLY); every
REPLY has "status": "ok", "busy" or "error", and "reason" unless ok.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from numabench.workers import protocol

INFER = "INFER"
STATUS = "STATUS"
STOP = "STOP"
RELOAD = "RELOAD"
PING = "PING"
REPLY = "REPLY"
REQUESTS = frozenset({INFER, STATUS, STOP, RELOAD, PING})
TYPES = REQUESTS | {REPLY}

OK, BUSY, ERROR = "ok", "busy", "error"
WANTS = ("summary", "outputs")
ProtocolError = protocol.ProtocolError


def encode(msg_type: str, header: dict[str, Any] | None = None,
           arrays: dict[str, np.ndarray] | None = None) -> list[Any]:
    return protocol.encode(msg_type, header, arrays, types=TYPES)


def decode(frames: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    return protocol.decode(frames, types=TYPES)
