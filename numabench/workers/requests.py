"""What makes an inference request valid, checked the same way by the daemon and the worker.

Pure functions over a request's header fields and decoded arrays; they raise RequestError naming
what is wrong. The daemon checks a client's INFER before queueing it (with its row limit), the
worker checks a RUN again before computing (it may be talked to directly).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

INPUT_ARRAYS = ("input_ids", "attention_mask")
INT64_MAX = int(np.iinfo(np.int64).max)  # a uint64 id above it would wrap negative when widened
MAX_TEXT_CHARS = 100_000


class RequestError(ValueError):
    """A request that cannot be served as sent; the message says what to change."""


def check_texts(texts: Any, max_rows: int | None = None) -> list[str]:
    """A non-empty list of strings, each at most MAX_TEXT_CHARS, at most `max_rows` of them."""
    if (not isinstance(texts, list) or not texts
            or not all(isinstance(t, str) and len(t) <= MAX_TEXT_CHARS for t in texts)):
        raise RequestError(f"texts must be a non-empty list of strings of at most "
                           f"{MAX_TEXT_CHARS} characters")
    if max_rows is not None and len(texts) > max_rows:
        raise RequestError(f"{len(texts)} texts exceed the limit of {max_rows} per request")
    return texts


def check_seq(seq: int, max_positions: int | None) -> None:
    if max_positions is not None and seq > max_positions:
        raise RequestError(f"sequence length {seq} exceeds the model's {max_positions} positions")


def check_arrays(arrays: Mapping[str, np.ndarray], *, vocab_size: int | None,
                 max_positions: int | None, max_rows: int | None = None,
                 allow_1d: bool = False, widen: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids, attention_mask or None) as int64 (rows, seq), or RequestError.

    `allow_1d`: a (seq,) array is one row (the client API allows it; a RUN does not).
    `widen=False` keeps the arrays as sent (checked, any integer type that int64 holds): the
    daemon queues them compactly and widens only into the padded batch it dispatches."""
    extra = sorted(set(arrays) - set(INPUT_ARRAYS))
    if extra:
        raise RequestError(f"unexpected arrays {extra}; send {', '.join(INPUT_ARRAYS)}")
    ids = arrays.get("input_ids")
    if ids is None:
        raise RequestError("a request needs an input_ids array or texts")
    if allow_1d and ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or 0 in ids.shape:
        raise RequestError(f"input_ids must be a non-empty integer (batch, seq) array, got "
                           f"{ids.dtype} {list(ids.shape)}")
    if max_rows is not None and ids.shape[0] > max_rows:
        raise RequestError(f"{ids.shape[0]} rows exceed the limit of {max_rows} per request")
    check_seq(int(ids.shape[1]), max_positions)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi > INT64_MAX or (vocab_size is not None and hi >= vocab_size):
        raise RequestError(f"token ids span [{lo}, {hi}], outside the vocabulary "
                           f"[0, {vocab_size if vocab_size is not None else '?'})")
    mask = arrays.get("attention_mask")
    if mask is not None:
        if allow_1d and mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape or mask.dtype.kind not in "iub":
            raise RequestError(f"attention_mask must be integers shaped like input_ids "
                               f"{list(ids.shape)}, got {mask.dtype} {list(mask.shape)}")
        if widen:
            mask = mask.astype(np.int64, copy=False)
    return (ids.astype(np.int64, copy=False) if widen else ids), mask


def tokenize(tokenizer: Any, texts: list[str], *, max_length: int,
             padding: str = "longest") -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 of already checked texts."""
    enc = tokenizer(texts, padding=padding, truncation=True, max_length=max_length,
                    return_tensors="np")
    return (np.asarray(enc["input_ids"], dtype=np.int64),
            np.asarray(enc["attention_mask"], dtype=np.int64))


def token_lengths(tokenizer: Any, texts: list[str], *, max_length: int) -> list[int]:
    """Each text's real token count as `tokenize` makes it (special tokens included, truncated
    at `max_length`), before any padding: what padding to max_length or a bucket costs is
    measured against these."""
    enc = tokenizer(texts, padding=False, truncation=True, max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]
