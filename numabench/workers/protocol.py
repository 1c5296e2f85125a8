"""The one worker protocol, shared by `launch`, `sweep` and `serve`.

Transport: a ROUTER socket in the coordinator, one DEALER per worker whose ZeroMQ identity is
its instance id (ASCII). Each message is a JSON header frame followed by zero or more raw array
frames; the header's "arrays" lists each frame's name, dtype and shape in order. Never pickle.

Worker -> coordinator:
  HELLO  {instance, pid}                       sent right after connect, before the model loads
  READY  {instance, pid, affinity, mems_allowed, mempolicy, threads, versions, model_info,
          load_ns, warmup_ns, env}              after model load and warm-up on the exact shapes
  RESULT {req, compute_ns, start_ns, end_ns, output}  + optional output arrays
  ERROR  {req|null, message, traceback, fatal}
  BYE    {instance}                             answer to STOP, just before the worker exits
Coordinator -> worker:
  RUN    {req, want: "summary"|"outputs", texts?: [str], seq?: int} + arrays input_ids[, attention_mask]
  STOP   {}

Headers are strict JSON (no NaN/Infinity); a header whose "v" differs from PROTOCOL_VERSION is
refused. docs/protocol.md describes the fields for other implementers.

Timestamps (start_ns, end_ns) are time.monotonic_ns(): CLOCK_MONOTONIC is system-wide on Linux,
so worker and coordinator clocks are comparable on one host.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1

HELLO = "HELLO"
READY = "READY"
RESULT = "RESULT"
ERROR = "ERROR"
BYE = "BYE"
RUN = "RUN"
STOP = "STOP"
MESSAGE_TYPES = frozenset({HELLO, READY, RESULT, ERROR, BYE, RUN, STOP})

# Only plain numeric dtypes cross the wire; anything else is refused rather than guessed.
ALLOWED_DTYPES = frozenset(
    {"int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"}
)
MAX_HEADER_BYTES = 1 << 20
# A RUN's "loops": forward passes of its inputs back to back, each timed (throughput mode); the
# RESULT then holds lists of start_ns and compute_ns, one per pass (~40 bytes each).
MAX_LOOPS = 1000
# dtype objects and names, looked up instead of rebuilt per message (np.dtype.name is slow).
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_NAMES = {dt: name for name, dt in _DTYPES.items()}


class ProtocolError(ValueError):
    """A message that does not follow the protocol (malformed header, bad array frame)."""


def dtype_name(dtype: np.dtype) -> str:
    """dtype.name without its cost (a property that formats a string on every call)."""
    return _NAMES.get(dtype) or dtype.name


def identity(instance_id: int | str) -> bytes:
    return str(instance_id).encode("ascii")


@dataclass(frozen=True)
class PreparedArrays:
    """Array frames encoded once and sent many times (a benchmark resends the same shard)."""

    specs: tuple[dict[str, Any], ...]
    frames: tuple[Any, ...]


def prepare_arrays(arrays: dict[str, np.ndarray] | None) -> PreparedArrays:
    specs, frames = [], []
    for name, arr in (arrays or {}).items():
        # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        dtype = _NAMES.get(arr.dtype)
        if dtype is None:
            raise ProtocolError(f"array {name!r} has dtype {arr.dtype.name}, not allowed on the wire")
        specs.append({"name": name, "dtype": dtype, "shape": list(arr.shape)})
        # Zero-copy: ZeroMQ sends straight from the array's memory.
        frames.append(memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b"")
    return PreparedArrays(tuple(specs), tuple(frames))


def encode(msg_type: str, header: dict[str, Any] | None = None,
           arrays: dict[str, np.ndarray] | PreparedArrays | None = None,
           types: frozenset[str] = MESSAGE_TYPES) -> list[Any]:
    """Build the frames of one message: [header_json, *array_buffers].

    `types`: the message types this channel carries (the daemon's client channel has its own).
    """
    if msg_type not in types:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    prepared = arrays if isinstance(arrays, PreparedArrays) else prepare_arrays(arrays)
    head = dict(header or {})
    head["type"] = msg_type
    head["v"] = PROTOCOL_VERSION
    head["arrays"] = prepared.specs
    try:
        # allow_nan=False: NaN/Infinity are not JSON and other implementations would choke on them.
        raw = json.dumps(head, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{msg_type} header cannot be sent as JSON: {e}") from None
    return [raw, *prepared.frames]


class RequestTemplate:
    """A message sent many times that differs only in its "req": the header is encoded (and
    checked) once, each message then costs one bytes concatenation instead of a json.dumps.
    The bytes are the ones `encode` would give plus a trailing "req" key: the same JSON."""

    def __init__(self, msg_type: str, header: dict[str, Any] | None = None,
                 arrays: dict[str, np.ndarray] | PreparedArrays | None = None):
        if header and "req" in header:
            raise ProtocolError("a template's header must not hold 'req': it is added per message")
        raw, *frames = encode(msg_type, header, arrays)
        # bytes, not the arrays' memoryviews: numpy's buffer export costs microseconds on every
        # send, a copy made once does not
        self.frames = [f if type(f) is bytes else bytes(f) for f in frames]
        self._prefix = raw[:-1] + b',"req":'  # raw always holds type, v and arrays

    def encode(self, req: int) -> list[Any]:
        return [b"%s%d}" % (self._prefix, req), *self.frames]


class RequestDecoder:
    """`decode` for a stream of messages that mostly differ only in a trailing "req" (what a
    RequestTemplate sends): a header whose bytes before `,"req":N}` equal the last fully decoded
    one's reuses its parsed, checked fields and array specs; only the array frames' sizes are
    checked again. Anything else is decoded in full, so the result is always what `decode` gives.

    Array frames received as bytes that repeat the previous message's byte for byte (a benchmark
    resends one shard) give back the very same arrays dict: a memcmp instead of building arrays,
    and a caller may reuse what it derived from them (the worker its input check). Callers must
    not modify the dict."""

    def __init__(self, types: frozenset[str] = MESSAGE_TYPES):
        self.types = types
        self._prefix: bytes | None = None
        self._head: dict[str, Any] = {}
        self._arrays: tuple[tuple[str, np.dtype, tuple[int, ...], int], ...] = ()
        self._frames: tuple[bytes, ...] | None = None  # the last array frames, when all bytes
        self._decoded: dict[str, np.ndarray] = {}  # ... and the arrays decoded from them

    def decode(self, frames: Sequence[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if not frames:
            raise ProtocolError("empty message")
        first = frames[0]
        raw = first if type(first) is bytes else bytes(first.buffer if hasattr(first, "buffer") else first)
        cut = raw.rfind(b',"req":')
        req = raw[cut + 7:-1]
        # A JSON integer: digits without a leading zero (bytes.isdigit is ASCII only).
        if (cut > 0 and raw[:cut] == self._prefix and raw.endswith(b"}") and len(req) <= 20 and req.isdigit()
                and (req[:1] != b"0" or req == b"0") and len(frames) == len(self._arrays) + 1):
            body = tuple(frames[1:])
            head = self._head.copy()
            head["req"] = int(req)
            if body == self._frames:  # bytes only (see _keep): equal means a memcmp each
                return head, self._decoded
            arrays: dict[str, np.ndarray] = {}
            for (name, dt, shape, nbytes), frame in zip(self._arrays, body):
                buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
                if buf.nbytes != nbytes:
                    raise ProtocolError(f"array {name!r}: frame has {buf.nbytes} bytes, shape "
                                        f"{list(shape)} of {dt.name} needs {nbytes}")
                arrays[name] = np.frombuffer(buf.cast("B") if buf.format != "B" else buf,
                                             dtype=dt).reshape(shape)
            self._keep(body, arrays)
            return head, arrays
        head, arrays = decode(frames, self.types)
        self._remember(raw, cut, head, arrays)
        self._keep(tuple(frames[1:]), arrays)
        return head, arrays

    def _keep(self, body: tuple[Any, ...], arrays: dict[str, np.ndarray]) -> None:
        # Only bytes compare by content (a Frame or memoryview may not, or may change under us).
        if all(type(f) is bytes for f in body):
            self._frames, self._decoded = body, arrays
        else:
            self._frames, self._decoded = None, {}

    def _remember(self, raw: bytes, cut: int, head: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Cache `head` when its bytes are a req-less header plus `,"req":N}` (checked by parsing
        the prefix alone: a "req" repeated inside it, or any other shape, is not cached)."""
        self._prefix = None
        if cut <= 0 or type(head.get("req")) is not int or not raw.endswith(b"}"):
            return
        try:
            rest = json.loads(raw[:cut] + b"}")
        except ValueError:
            return
        if not isinstance(rest, dict) or "req" in rest or rest != {k: v for k, v in head.items() if k != "req"}:
            return
        self._head = rest
        self._arrays = tuple((name, a.dtype, a.shape, a.nbytes) for name, a in arrays.items())
        self._prefix = raw[:cut]


def encode_result(req: Any, compute_ns: int | list[int], start_ns: int | list[int], end_ns: int,
                  output: dict[str, Any]) -> list[Any]:
    """A RESULT without array frames, formatted directly: the same JSON as `encode` gives for
    it (modulo key order) at a fraction of its cost on the path of every request. compute_ns and
    start_ns are lists (one per pass) for a RUN with "loops". Its timings come first and the
    rest (`_result_tail`, formatted once per output shape) last, which ResultDecoder relies on."""
    if type(req) is not int or len(output) != 2 or "shape" not in output or output.get("dtype") not in ALLOWED_DTYPES:
        return encode(RESULT, {"req": req, "compute_ns": compute_ns, "start_ns": start_ns,
                               "end_ns": end_ns, "output": output})
    tail = _result_tail(tuple(output["shape"]), output["dtype"])
    if type(compute_ns) is list:
        return [b'{"req":%d,"compute_ns":[%s],"start_ns":[%s],"end_ns":%d%s' % (
            req, ",".join(map(str, compute_ns)).encode(), ",".join(map(str, start_ns)).encode(),  # type: ignore[arg-type]
            end_ns, tail)]
    return [b'{"req":%d,"compute_ns":%d,"start_ns":%d,"end_ns":%d%s' % (req, compute_ns, start_ns, end_ns, tail)]


@functools.lru_cache(maxsize=64)  # a worker sees a few shapes; bounded all the same
def _result_tail(shape: tuple[int, ...], dtype: str) -> bytes:
    """The bytes of a RESULT after its end_ns, for an output of this shape and dtype."""
    return (f',"output":{{"shape":[{",".join(str(int(d)) for d in shape)}],"dtype":"{dtype}"}},'
            f'"type":"RESULT","v":{PROTOCOL_VERSION},"arrays":[]}}').encode()


# A RESULT as encode_result formats it for one pass: four JSON integers, then the tail.
_INT = rb"(0|[1-9][0-9]{0,18})"
_RESULT_HEAD = re.compile(rb'\{"req":%s,"compute_ns":%s,"start_ns":%s,"end_ns":%s(,"output":.*)\Z'
                          % (_INT, _INT, _INT, _INT), re.DOTALL)


class ResultDecoder:
    """`decode` for the RESULTs of a timed run (what encode_result formats for one pass): a
    header whose bytes after its four timings equal those of one fully decoded before (one per
    output shape: instances may differ) reuses that decoded rest and reads the four integers
    directly instead of parsing JSON. Anything else is decoded in full, so the result is always
    what `decode` gives. Callers must not modify the nested values ("output"): they are shared."""

    MAX_TAILS = 64

    def __init__(self, types: frozenset[str] = MESSAGE_TYPES):
        self.types = types
        self._rests: dict[bytes, dict[str, Any]] = {}  # tail bytes -> the header's other keys

    def decode(self, frames: Sequence[Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        first = frames[0] if frames else None
        m = _RESULT_HEAD.match(first) if type(first) is bytes and len(frames) == 1 else None
        if m is not None:
            rest = self._rests.get(m[5])
            if rest is not None:
                head = rest.copy()
                head["req"], head["compute_ns"], head["start_ns"], head["end_ns"] = (
                    int(m[1]), int(m[2]), int(m[3]), int(m[4]))
                return head, {}
        head, arrays = decode(frames, self.types)
        if (m is not None and head["type"] == RESULT and not arrays and len(self._rests) < self.MAX_TAILS
                and (head.get("req"), head.get("compute_ns"), head.get("start_ns"), head.get("end_ns"))
                == (int(m[1]), int(m[2]), int(m[3]), int(m[4]))):
            # The four leading values held: the tail repeats none of those keys.
            self._rests[m[5]] = {k: v for k, v in head.items()
                                 if k not in ("req", "compute_ns", "start_ns", "end_ns")}
        return head, arrays


def decode(frames: Sequence[Any], types: frozenset[str] = MESSAGE_TYPES
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse [header_json, *array_frames] into (header, arrays). Raises ProtocolError.

    `types`: the message types accepted (default: the worker protocol's).
    """
    if not frames:
        raise ProtocolError("empty message")
    raw = bytes(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        head = json.loads(raw)
    # ValueError covers JSONDecodeError, bad UTF-8 and Python's int-digit limit (a 5000-digit number)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"header is not JSON: {str(e)[:200]}") from None
    if not isinstance(head, dict) or not isinstance(head.get("type"), str) or head["type"] not in types:
        raise ProtocolError(f"header has no known 'type': {str(head)[:200]}")
    if head.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {head.get('v')!r}, this side speaks {PROTOCOL_VERSION}")
    specs = head.get("arrays") or []
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise ProtocolError(
            f"header lists {len(specs) if isinstance(specs, list) else '?'} arrays "
            f"but {len(frames) - 1} array frames follow")
    arrays: dict[str, np.ndarray] = {}
    for spec, frame in zip(specs, frames[1:]):
        if not isinstance(spec, dict):
            raise ProtocolError(f"bad array spec {spec!r}")
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or name in arrays:
            raise ProtocolError(f"array name {name!r} is missing, not a string or repeated")
        if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype!r} not allowed")
        if (not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ProtocolError(f"array {name!r}: shape {shape!r} is not a list of non-negative ints")
        buf = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        dt = _DTYPES[dtype]
        expected = math.prod(shape) * dt.itemsize  # Python ints: no overflow on absurd shapes
        if buf.nbytes != expected:
            raise ProtocolError(
                f"array {name!r}: frame has {buf.nbytes} bytes, shape {shape} of {dtype} needs {expected}")
        arrays[name] = np.frombuffer(buf.cast("B") if buf.format != "B" else buf, dtype=dt).reshape(shape)
    return head, arrays
