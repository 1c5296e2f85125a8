"""Client commands: one function per message type, and the one guard around all of them.

`handle` is the only way a client message reaches the daemon. Whatever happens inside — a
malformed header, a 5000-digit integer, a plan file that is binary, a bug — becomes an error reply
to that client, never the daemon's exit (a bug through the daemon's guard, which also logs and
counts it); every message gets exactly one reply.
The commands talk to the daemon through its public methods (reply, reject, submit, reload,
begin_stop, state, status).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from numabench.daemon import wire
from numabench.errors import NumabenchError
from numabench.workers import requests

log = logging.getLogger("numabench.serve")

MAX_ID_CHARS = 200


class Rejected(Exception):
    """A client message refused; `reason` is the metrics label (malformed, too_large,
    bad_input, no_pool, stopping, reload, internal)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def request_id(rid: Any) -> Any:
    """The client's id if it is one we echo: None, a string, or an int within 64 bits (a huge
    int is refused before str() would have to format thousands of digits)."""
    if rid is None:
        return None
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS:
        return rid
    if isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63:
        return rid
    raise Rejected("malformed", f"id must be a string of at most {MAX_ID_CHARS} characters or a "
                                "64-bit integer")


def short(e: Any, limit: int = 300) -> str:
    text = str(e)
    return text if len(text) <= limit else text[:limit] + "…"


def split_envelope(frames: list[Any]) -> tuple[list[bytes], list[Any]]:
    """(routing envelope, message body): a REQ client's empty delimiter stays in the envelope."""
    envelope = [frames[0].bytes]
    body = frames[1:]
    if len(body) > 1 and len(body[0]) == 0:
        envelope, body = envelope + [b""], body[1:]
    return envelope, body


def handle(daemon: Any, frames: list[Any], refused: str | None = None) -> None:
    """Handle one client message: exactly one reply, whatever happens while handling it. The
    client's mistakes are answered here; anything else (a bug) goes to the daemon's one guard,
    which logs and counts it and answers this client with an "internal" error."""
    envelope, body = split_envelope(frames)
    rid = None

    def answer(message: str) -> None:
        daemon.reject(envelope, rid, "internal", message)

    with daemon.guard("client message", answer):
        try:
            if refused:
                raise Rejected("too_large", refused)
            try:
                head, arrays = wire.decode(body)
            except Exception as e:  # ProtocolError, and ValueErrors of JSON's own limits
                raise Rejected("malformed", f"malformed message: {short(e)}") from None
            kind = head["type"]
            rid = request_id(head.get("id"))
            command = COMMANDS.get(kind)
            if command is None:
                raise Rejected("malformed", f"a client sends {', '.join(sorted(wire.REQUESTS))}, "
                                            f"not {kind}")
            command(daemon, envelope, rid, head, arrays)
        except Rejected as e:
            daemon.reject(envelope, rid, e.reason, str(e))
        except (requests.RequestError, NumabenchError) as e:
            daemon.reject(envelope, rid, "bad_input", str(e))


def ping(daemon: Any, envelope: list[bytes], rid: Any, head: dict, arrays: dict) -> None:
    daemon.reply(envelope, rid, wire.OK, {"pid": os.getpid(), "state": daemon.state()})


def status(daemon: Any, envelope: list[bytes], rid: Any, head: dict, arrays: dict) -> None:
    daemon.reply(envelope, rid, wire.OK, {"daemon": daemon.status()})


def stop(daemon: Any, envelope: list[bytes], rid: Any, head: dict, arrays: dict) -> None:
    daemon.stop_waiters.append((envelope, rid))  # answered once the workers are stopped
    daemon.begin_stop("STOP received")


def reload(daemon: Any, envelope: list[bytes], rid: Any, head: dict, arrays: dict) -> None:
    try:
        result = daemon.reload(head.get("plan"))
    except Rejected:
        raise
    except Exception as e:  # noqa: BLE001 - a plan that does not load is the caller's error
        raise Rejected("reload", f"reload failed: {type(e).__name__}: {short(e)}") from None
    daemon.reply(envelope, rid, wire.OK, result)


def infer(daemon: Any, envelope: list[bytes], rid: Any, head: dict[str, Any],
          arrays: dict[str, np.ndarray]) -> None:
    if not daemon.accepting():
        raise Rejected("stopping", "the daemon is stopping")
    want = head.get("want", "summary")
    if not isinstance(want, str) or want not in wire.WANTS:
        raise Rejected("bad_input", f"want must be one of {', '.join(wire.WANTS)}, "
                                    f"got {short(repr(want), 50)}")
    ids, mask = inputs(head, arrays, tokenizer=daemon.tokenizer, model=daemon.opts.workload.model,
                       max_rows=daemon.opts.max_rows, max_positions=daemon.max_positions,
                       vocab_size=daemon.vocab_size)
    daemon.submit(envelope, rid, want, ids, mask)


def inputs(head: dict[str, Any], arrays: dict[str, np.ndarray], *, tokenizer: Any, model: str,
           max_rows: int, max_positions: int | None, vocab_size: int | None
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked (input_ids, attention_mask or None: all ones), (rows, seq), from arrays or texts.

    Arrays stay as sent (an int8 request queues as int8, not as two int64 copies 16 times its
    size): a full queue of large requests must not multiply the daemon's memory."""
    texts = head.get("texts")
    if texts is not None:
        if arrays:
            raise requests.RequestError("send either texts or input arrays, not both")
        texts = requests.check_texts(texts, max_rows)
        if tokenizer is None:
            raise requests.RequestError(f"model {model!r} has no tokenizer; send input_ids")
        return requests.tokenize(tokenizer, texts, max_length=max_positions or 512)
    return requests.check_arrays(arrays, vocab_size=vocab_size, max_positions=max_positions,
                                 max_rows=max_rows, allow_1d=True, widen=False)


COMMANDS = {wire.INFER: infer, wire.STATUS: status, wire.PING: ping, wire.STOP: stop,
            wire.RELOAD: reload}
