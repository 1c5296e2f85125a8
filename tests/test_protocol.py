"""The wire format: round trips (in memory and over real ZeroMQ) and every refusal."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from numabench.workers import protocol as p


def _header(frames):
    return json.loads(bytes(frames[0]))


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.int64).reshape(2, 3, 4),
    np.array(7, dtype=np.int32),                      # 0-d stays 0-d
    np.zeros((0, 5), dtype=np.float32),               # empty
    np.ones((2, 2), dtype=bool),
    np.linspace(0, 1, 6, dtype=np.float16),
    np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not C-contiguous
    np.arange(5, dtype=np.uint8),
])
def test_round_trip_arrays(array):
    head, arrays = p.decode(p.encode(p.RUN, {"req": 3, "want": "summary"}, {"x": array}))
    assert head["type"] == p.RUN and head["v"] == p.PROTOCOL_VERSION and head["req"] == 3
    out = arrays["x"]
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_round_trip_without_arrays_and_order_kept():
    frames = p.encode(p.READY, {"instance": 1, "affinity": [0, 1]},
                      {"b": np.zeros(2), "a": np.ones(3, dtype=np.int8)})
    head, arrays = p.decode(frames)
    assert [s["name"] for s in head["arrays"]] == ["b", "a"]
    assert list(arrays) == ["b", "a"]
    assert p.decode(p.encode(p.STOP))[0]["type"] == p.STOP


def test_round_trip_over_zeromq_router_dealer():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://proto")
        dealer.setsockopt(zmq.IDENTITY, p.identity(12))
        dealer.connect("inproc://proto")
        ids = np.random.default_rng(0).integers(0, 1000, size=(8, 128), dtype=np.int64)
        dealer.send_multipart(p.encode(p.RUN, {"req": "a"}, {"input_ids": ids}), copy=False)
        assert router.poll(2000)
        frames = router.recv_multipart(copy=False)  # zmq.Frame objects, as the worker gets them
        assert frames[0].bytes == b"12"
        head, arrays = p.decode(frames[1:])
        np.testing.assert_array_equal(arrays["input_ids"], ids)
        assert head["req"] == "a"
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def test_identity():
    assert p.identity(3) == b"3" and p.identity("7") == b"7"


# ---- encode refusals ----

def test_encode_unknown_type():
    with pytest.raises(p.ProtocolError, match="unknown message type"):
        p.encode("HELO")


@pytest.mark.parametrize("array", [np.array(["a"]), np.array([1 + 2j]), np.array([object()])])
def test_encode_refuses_dtype(array):
    with pytest.raises(p.ProtocolError, match="not allowed"):
        p.encode(p.RUN, {}, {"x": array})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object()])
def test_encode_refuses_non_json_header(value):
    with pytest.raises(p.ProtocolError, match="cannot be sent as JSON"):
        p.encode(p.RESULT, {"x": value})


# ---- decode refusals ----

def _frames(head: dict, *arrays: bytes):
    return [json.dumps(head).encode(), *arrays]


GOOD = {"type": "RUN", "v": 1}


@pytest.mark.parametrize("frames, match", [
    ([], "empty message"),
    ([b"x" * (p.MAX_HEADER_BYTES + 1)], "exceeds"),
    ([b"not json"], "not JSON"),
    ([b"\xff\xfe"], "not JSON"),
    ([b"[" * 100_000], "not JSON"),                       # recursion, not a crash
    ([b"[1, 2]"], "no known 'type'"),
    (_frames({"type": "NOPE"}), "no known 'type'"),
    (_frames({"v": 1}), "no known 'type'"),
    (_frames({"type": "RUN", "v": 2}), "protocol version"),
    (_frames({**GOOD, "arrays": []}, b"extra"), "0 arrays but 1 array frames"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": [1]}]}), "1 arrays but 0"),
    (_frames({**GOOD, "arrays": "x"}, b"\x00"), "arrays"),
    (_frames({**GOOD, "arrays": ["x"]}, b"\x00"), "bad array spec"),
    (_frames({**GOOD, "arrays": [{"dtype": "int8", "shape": [1]}]}, b"\x00"), "name"),
    (_frames({**GOOD, "arrays": [{"name": 1, "dtype": "int8", "shape": [1]}]}, b"\x00"), "name"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": [1]}] * 2},
             b"\x00", b"\x00"), "repeated"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "object", "shape": [1]}]}, b"\x00"),
     "not allowed"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": ["int8"], "shape": [1]}]}, b"\x00"),
     "not allowed"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8"}]}, b"\x00"), "shape"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": "1"}]}, b"\x00"), "shape"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": [-1]}]}, b"\x00"), "shape"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": [1.0]}]}, b"\x00"), "shape"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": [True]}]}, b"\x00"), "shape"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int64", "shape": [2]}]}, b"\x00" * 8),
     "needs 16"),
    (_frames({**GOOD, "arrays": [{"name": "x", "dtype": "int8", "shape": [2**62, 4]}]}, b"\x00"),
     "needs"),
])
def test_decode_refuses(frames, match):
    with pytest.raises(p.ProtocolError, match=match):
        p.decode(frames)


def test_protocol_error_is_a_value_error():
    assert issubclass(p.ProtocolError, ValueError)


def test_request_template_gives_what_encode_gives_with_the_req():
    import numpy as np

    from numabench.workers import protocol as p

    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    t = p.RequestTemplate(p.RUN, {"want": "shape", "seq": 4}, p.prepare_arrays({"input_ids": ids}))
    for req in (1, 987654321):
        head, arrays = p.decode(t.encode(req))
        ref, ref_arrays = p.decode(p.encode(p.RUN, {"want": "shape", "seq": 4, "req": req}, {"input_ids": ids}))
        assert head == ref and head["req"] == req
        assert (arrays["input_ids"] == ids).all() and (ref_arrays["input_ids"] == ids).all()
    with pytest.raises(p.ProtocolError):
        p.RequestTemplate(p.RUN, {"req": 1})


@pytest.mark.parametrize("req, output", [
    (7, {"shape": [2, 8, 128], "dtype": "float32"}),
    ("abc", {"shape": [1], "dtype": "float32"}),  # not an int: falls back to json.dumps
    (3, {"shape": [1], "dtype": "float32", "checksum": 1.5}),
])
def test_encode_result_matches_encode(req, output):
    from numabench.workers import protocol as p

    fast = p.decode(p.encode_result(req, 10, 20, 30, output))[0]
    ref = p.decode(p.encode(p.RESULT, {"req": req, "compute_ns": 10, "start_ns": 20, "end_ns": 30,
                                       "output": output}))[0]
    assert fast == ref
    # A RUN with loops: one start and one compute time per pass
    fast = p.decode(p.encode_result(req, [10, 11, 12], [20, 31, 43], 55, output))[0]
    ref = p.decode(p.encode(p.RESULT, {"req": req, "compute_ns": [10, 11, 12], "start_ns": [20, 31, 43],
                                       "end_ns": 55, "output": output}))[0]
    assert fast == ref and fast["compute_ns"] == [10, 11, 12]


@pytest.mark.parametrize("raw", [
    b'{"type": ["RUN"], "v": 1, "arrays": []}',         # unhashable type
    b'{"type": {"a": 1}, "v": 1, "arrays": []}',
    b'{"type": "RUN", "v": 1, "req": ' + b"9" * 5000 + b', "arrays": []}',  # int-digit limit
    b'{"type": "RUN", "v": 1, "arrays": [{"name": "x", "dtype": ["int64"], "shape": [1]}]}',
])
def test_decode_turns_every_malformed_header_into_a_protocol_error(raw):
    with pytest.raises(p.ProtocolError):
        p.decode([raw] + ([b"\0" * 8] if b'"name"' in raw else []))


def test_request_decoder_gives_what_decode_gives():
    """The worker's decoder reuses a checked header when only "req" differs, and only then."""
    import numpy as np

    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    other = np.arange(8, dtype=np.int32).reshape(2, 4)
    t = p.RequestTemplate(p.RUN, {"want": "shape", "seq": 4}, p.prepare_arrays({"input_ids": ids}))
    t2 = p.RequestTemplate(p.RUN, {"want": "shape", "seq": 4}, p.prepare_arrays({"input_ids": other}))
    d = p.RequestDecoder()
    stream = [t.encode(1), t.encode(2), t.encode(0), t2.encode(3), t2.encode(40), t.encode(5),
              p.encode(p.RUN, {"req": "x"}, {"input_ids": ids}), t.encode(6),
              p.encode(p.STOP), t.encode(7)]
    for frames in stream:
        head, arrays = d.decode(frames)
        ref, ref_arrays = p.decode(frames)
        assert head == ref and type(head.get("req")) is type(ref.get("req"))
        assert arrays.keys() == ref_arrays.keys()
        for k in arrays:
            assert arrays[k].dtype == ref_arrays[k].dtype and (arrays[k] == ref_arrays[k]).all()
    raw = t.encode(7)[0]
    assert d._prefix == raw[:raw.rfind(b',"req":')]  # the template's header is the cached one
    # A cached header does not vouch for its frames: a frame of another size is refused.
    with pytest.raises(p.ProtocolError, match="needs 96"):
        d.decode([t.encode(8)[0], b"\0" * 8])
    with pytest.raises(p.ProtocolError, match="arrays"):
        d.decode([t.encode(9)[0]])  # the frame missing altogether


@pytest.mark.parametrize("tail", [b'"007"}', b'007}', b'-3}', b'1.5}', b'1e3}', b'9' * 30 + b'}',
                                  b'1,"req":2}', b'1 }'])
def test_request_decoder_decodes_any_other_req_in_full(tail):
    import numpy as np

    ids = np.zeros((1, 2), dtype=np.int64)
    t = p.RequestTemplate(p.RUN, {"want": "shape"}, p.prepare_arrays({"input_ids": ids}))
    d = p.RequestDecoder()
    d.decode(t.encode(1))  # cached
    frames = [t.encode(1)[0][:-2] + tail, *t.frames]
    try:
        ref = p.decode(frames)[0]
    except p.ProtocolError:
        with pytest.raises(p.ProtocolError):
            d.decode(frames)
        return
    assert d.decode(frames)[0] == ref


def test_request_decoder_does_not_cache_a_header_holding_req_twice():
    raw = b'{"req":1,"type":"RUN","v":1,"arrays":[],"req":2}'
    d = p.RequestDecoder()
    assert d.decode([raw])[0]["req"] == 2
    # Same prefix, so a cached prefix would yield req 3 and keep the first "req": 1 out.
    again = raw[:-2] + b"3}"
    assert d.decode([again])[0] == p.decode([again])[0]


def test_request_decoder_reuses_arrays_only_for_the_same_bytes():
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    t = p.RequestTemplate(p.RUN, {"want": "shape"}, p.prepare_arrays({"input_ids": ids}))
    assert all(type(f) is bytes for f in t.frames)  # sent without numpy's buffer export
    d = p.RequestDecoder()
    first = d.decode(t.encode(1))[1]
    again = d.decode([t.encode(2)[0], bytes(bytearray(t.frames[0]))])[1]  # equal, not identical
    assert again is first
    changed = d.decode([t.encode(3)[0], (ids + 1).tobytes()])[1]
    assert changed is not first and (changed["input_ids"] == ids + 1).all()
    # Frames that are not bytes (zero-copy receives) are never taken as repeats.
    d2 = p.RequestDecoder()
    frames = [t.encode(1)[0], zmq.Frame(t.frames[0])]
    a, b = d2.decode(frames)[1], d2.decode(frames)[1]
    assert a is not b and (b["input_ids"] == ids).all()


def _timings():
    big = st.integers(min_value=0, max_value=10**19)
    return st.tuples(big, big, big, big)


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_result_decoder_gives_what_decode_gives(data):
    """The coordinator's RESULT decoder: same headers as `decode` on encode_result streams,
    mixed shapes, lists for loops, and arbitrary edits of the bytes."""
    d = p.ResultDecoder()
    shapes = [[8, 128], [2, 16], [1]]
    for _ in range(data.draw(st.integers(1, 8))):
        req, c, s, e = data.draw(_timings())
        shape = data.draw(st.sampled_from(shapes))
        if data.draw(st.booleans()):
            frames = p.encode_result(req, c, s, e, {"shape": shape, "dtype": "float32"})
        else:
            frames = p.encode_result(req, [c, c], [s, e], e, {"shape": shape, "dtype": "float32"})
        if data.draw(st.integers(0, 4)) == 0:  # a hostile or damaged reply
            raw = bytearray(frames[0])
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos:pos + 1] = data.draw(st.binary(max_size=3))
            frames = [bytes(raw)]
        try:
            ref = p.decode(frames)
        except p.ProtocolError:
            with pytest.raises(p.ProtocolError):
                d.decode(frames)
            continue
        assert d.decode(frames) == ref


def test_result_decoder_does_not_cache_a_tail_repeating_a_timing():
    raw = b'{"req":1,"compute_ns":2,"start_ns":3,"end_ns":4,"output":{},"type":"RESULT","v":1,"arrays":[],"req":9}'
    d = p.ResultDecoder()
    assert d.decode([raw])[0]["req"] == 9 == p.decode([raw])[0]["req"]
    again = raw.replace(b'"req":1,', b'"req":5,')
    assert d.decode([again])[0] == p.decode([again])[0]
