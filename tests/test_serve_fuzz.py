"""Nothing a client sends ends the daemon: fuzzed frames, headers, shapes, dtypes and sizes
against a real daemon (noop backend). Every message gets exactly one reply, PING still works,
and the daemon's memory stays bounded."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import USABLE, Daemon

from numabench.daemon import wire

pytestmark = pytest.mark.skipif(len(USABLE) < 2, reason="needs at least 2 usable CPUs")
MAX_MB = 1  # --max-request-mb: the whole-message limit under test

# A 5000-digit integer: beyond Python's int-parsing limit (4300 digits). Python cannot even
# format one, so strategies hold a marker that `dumps` turns into the digits.
HUGE = "\ue000huge"
HUGE_DIGITS = b"9" * 5000
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                         st.text(max_size=30), st.just(HUGE))


def dumps(x) -> bytes:
    return json.dumps(x).replace(json.dumps(HUGE), HUGE_DIGITS.decode()).encode()
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=12)
dtypes = st.one_of(st.sampled_from(["int64", "int32", "uint8", "float32", "bool", "object", "V8"]),
                   json_values)
dims = st.one_of(st.integers(0, 70), st.integers(-3, 2**70), st.just(HUGE), json_scalars)
specs = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["input_ids", "attention_mask",
                                                                   "x"]), json_values),
                               "dtype": dtypes, "shape": st.one_of(st.lists(dims, max_size=4),
                                                                   json_values)})
types = st.one_of(st.sampled_from(["INFER", "STATUS", "PING", "RELOAD", "REPLY", "FOO"]), json_values)
headers = st.fixed_dictionaries(
    {"type": types},
    optional={"v": st.one_of(st.just(1), json_values), "id": json_values,
              "arrays": st.one_of(st.lists(specs, max_size=3), json_values),
              "want": json_values, "texts": json_values, "plan": json_values})


@st.composite
def messages(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:  # arbitrary frames
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=6))
    if kind == 1:  # a JSON header (possibly huge ints, wrong types) and arbitrary array frames
        head = dumps(draw(headers))
        return [head] + draw(st.lists(st.binary(max_size=512), max_size=4))
    if kind == 2:  # well-formed framing, arbitrary arrays
        arrays = {}
        for name in draw(st.lists(st.sampled_from(["input_ids", "attention_mask", "x"]), max_size=3,
                                  unique=True)):
            dtype = draw(st.sampled_from(["int64", "int32", "uint8", "int8", "float32", "bool"]))
            shape = draw(st.lists(st.integers(0, 70), max_size=3))
            arrays[name] = np.asarray(draw(st.integers(-5, 2000))).astype(dtype) * np.ones(shape, dtype)
        head = draw(st.fixed_dictionaries({}, optional={"id": json_scalars, "want": json_values}))
        return wire.encode(wire.INFER, {k: v for k, v in head.items() if v is not HUGE}, arrays)
    # sizes: several frames, each under the per-frame cap, together over the whole-message limit
    n = draw(st.integers(2, 5))
    frame = b"\0" * ((MAX_MB << 20) // 2)
    spec = [{"name": f"a{i}", "dtype": "uint8", "shape": [len(frame)]} for i in range(n)]
    return [json.dumps({"type": "INFER", "v": 1, "arrays": spec}).encode()] + [frame] * n


class Conversation:
    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def replies_to(self, frames) -> list[dict]:
        """Send one message, then a PING; every reply up to the PING's."""
        self.sock.send_multipart(frames)
        got = []
        assert self.sock.poll(20_000), f"no reply to {[bytes(f)[:80] for f in frames]}"
        got.append(self._recv())
        self.sock.send_multipart(wire.encode(wire.PING, {"id": "ping"}))
        while True:
            assert self.sock.poll(20_000), "the daemon stopped answering PING"
            head = self._recv()
            if head.get("id") == "ping":
                assert head["status"] == "ok"
                return got
            got.append(head)

    def _recv(self) -> dict:
        frames = self.sock.recv_multipart()
        if frames and frames[0] == b"":  # our first frame was empty: answered as a REQ peer
            frames = frames[1:]
        head, _ = wire.decode(frames)
        return head

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fuzz"), "--instances", "1", "--max-request-mb", str(MAX_MB))
    conv = Conversation(d.endpoint)
    yield d, conv
    conv.close()
    d.close()


def rss(d: Daemon) -> int:
    return psutil.Process(d.proc.pid).memory_info().rss


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(frames=messages())
def test_fuzzed_messages_get_one_reply_each_and_the_daemon_lives(daemon, frames):
    d, conv = daemon
    got = conv.replies_to(frames)
    assert len(got) == 1, got
    assert got[0]["status"] in ("ok", "error", "busy") and (got[0]["status"] == "ok" or got[0]["reason"])
    assert d.proc.poll() is None


def test_known_killers_and_hostile_reloads_are_answered(daemon, tmp_path):
    d, conv = daemon
    before = rss(d)
    binary = tmp_path / "plan.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    other = tmp_path / "secret.yaml"
    other.write_text("root:$6$secret:19000:0:99999:7:::\n")
    os.chown(other, 65534, 65534) if os.getuid() == 0 else None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [
        [dumps({"type": "PING", "v": 1, "arrays": [], "id": HUGE})],
        [b'{"type": "INFER", "v": 1, "arrays": [], "x": ' + b"1" * 5000 + b"}"],
        [b"[" * 100_000 + b"]" * 100_000],  # nested beyond the recursion limit
        [dumps({"type": "INFER", "v": 1, "arrays": [
            {"name": "input_ids", "dtype": "int64", "shape": [HUGE, 0]}]}), b""],
        wire.encode(wire.RELOAD, {"plan": str(binary)}),
        wire.encode(wire.RELOAD, {"plan": str(fifo)}),
        wire.encode(wire.RELOAD, {"plan": "/dev/zero"}),
        wire.encode(wire.RELOAD, {"plan": "relative.yaml"}),
        wire.encode(wire.RELOAD, {"plan": str(tmp_path)}),
    ]
    if os.getuid() == 0 or stat.S_IMODE(other.stat().st_mode):
        cases.append(wire.encode(wire.RELOAD, {"plan": str(other)}))
    for frames in cases:
        got = conv.replies_to(frames)
        assert len(got) == 1 and got[0]["status"] == "error", got
        assert "$6$" not in json.dumps(got[0])  # never quotes another user's file
    ok = conv.replies_to(wire.encode(wire.INFER, {"id": "fine"}, {"input_ids": np.ones((1, 4), np.int64)}))
    assert ok[0]["status"] == "ok"
    assert rss(d) - before < 200 << 20


def test_memory_stays_bounded_over_the_fuzzing(daemon):
    d, conv = daemon
    # Many whole-message-limit violations in a row: each is refused, none is kept.
    before = rss(d)
    frame = b"\0" * ((MAX_MB << 20) - 100)
    spec = [{"name": f"a{i}", "dtype": "uint8", "shape": [len(frame)]} for i in range(6)]
    for _ in range(30):
        got = conv.replies_to([json.dumps({"type": "INFER", "v": 1, "arrays": spec}).encode()]
                              + [frame] * 6)
        assert "whole message" in got[0]["reason"]
    assert rss(d) - before < 100 << 20
    status = d.status()
    assert status["rejected"]["too_large"] >= 30 and status["rejected"]["malformed"] >= 1
