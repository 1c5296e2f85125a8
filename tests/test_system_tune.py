"""`numabench system tune` / `reset` on fake sysfs roots: set, record, restore byte for byte."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_system import CPU, THP, put, tree

from numabench.system import tune as tune_mod
from numabench.system.tune import TuneError, reset, tune


def untuned(tmp_path: Path) -> Path:
    root = tree(tmp_path)
    put(root, f"{CPU}/cpu0/cpufreq/scaling_governor", "powersave\n")
    put(root, f"{CPU}/cpu1/cpufreq/scaling_governor", "schedutil")  # no newline: restored as it was
    put(root, f"{CPU}/intel_pstate/no_turbo", "0\n")
    put(root, f"{THP}/enabled", "[always] madvise never\n")
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tune_then_reset_restores_every_file_byte_for_byte(tmp_path):
    root = untuned(tmp_path)
    before = snapshot(root)
    state = tmp_path / "state.json"
    got = tune(root, thp="never", state_file=state)
    assert {c.label: (c.before, c.after) for c in got.changes} == {
        "governor cpu0": ("powersave", "performance"), "governor cpu1": ("schedutil", "performance"),
        "turbo (intel_pstate/no_turbo)": ("0", "1"), "transparent hugepages": ("always", "never")}
    assert got.state_file == state and not got.problems
    # the tree now reads as the kernel would show it
    assert (root / THP / "enabled").read_text() == "always madvise [never]\n"
    assert (root / CPU / "cpu1/cpufreq/scaling_governor").read_text() == "performance\n"
    saved = json.loads(state.read_text())["files"]
    assert saved[f"{CPU}/cpu1/cpufreq/scaling_governor"] == "schedutil"

    # a second tune changes nothing and keeps the first one's originals
    again = tune(root, thp="never", state_file=state)
    assert not again.changes and len(again.unchanged) == 4
    assert json.loads(state.read_text())["files"] == saved

    back = reset(root, state_file=state)
    assert not back.problems and back.state_file is None and not state.exists()
    assert snapshot(root) == before


def test_default_state_file_lives_inside_the_tree(tmp_path):
    root = untuned(tmp_path)
    before = snapshot(root)
    got = tune(root)
    assert got.state_file == root / "run/numabench/system-tune.json"
    assert (root / THP / "enabled").read_bytes() == before[f"{THP}/enabled"]  # THP untouched without --thp
    reset(root)
    after = snapshot(root)
    assert after == before


def test_missing_and_unwritable_knobs_are_reported_not_fatal(tmp_path, monkeypatch):
    root = untuned(tmp_path)
    for c in (0, 1):
        (root / CPU / f"cpu{c}/cpufreq/scaling_governor").unlink()
    (root / CPU / "intel_pstate/no_turbo").unlink()
    real_write = Path.write_text

    def refuse(self, *a, **k):
        if self.name == "enabled":
            raise PermissionError(13, "Permission denied")
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", refuse)
    got = tune(root, thp="madvise", state_file=tmp_path / "s.json")
    text = "\n".join(got.problems)
    assert "governor: no cpufreq" in text and "turbo: neither" in text
    assert f"cannot write {root / THP / 'enabled'} (Permission denied); left at always" in text
    assert (root / THP / "enabled").read_text() == "[always] madvise never\n"


def test_thp_choice_the_kernel_does_not_offer_is_reported(tmp_path):
    root = untuned(tmp_path)
    put(root, f"{THP}/enabled", "[always] never\n")
    got = tune(root, thp="madvise", state_file=tmp_path / "s.json")
    assert any("'madvise' is not offered" in p for p in got.problems)


def test_non_root_is_refused_on_the_live_system(tmp_path):
    with pytest.raises(TuneError, match="needs root: run it as `sudo numabench system tune`"):
        tune("/", euid=1000, state_file=tmp_path / "s.json")
    with pytest.raises(TuneError, match="sudo numabench system reset"):
        reset("/", euid=1000, state_file=tmp_path / "s.json")


def test_reset_without_state_and_with_a_foreign_state_say_what_to_do(tmp_path):
    root = untuned(tmp_path)
    with pytest.raises(TuneError, match="nothing to reset: no tune state at"):
        reset(root, state_file=tmp_path / "none.json")
    state = tmp_path / "s.json"
    tune(root, state_file=state)
    other = untuned(tmp_path / "other")
    with pytest.raises(TuneError, match="saved for root"):
        reset(other, state_file=state)
    state.write_text("{not json")
    with pytest.raises(TuneError, match="unreadable tune state"):
        reset(root, state_file=state)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "numabench", "system", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_round_trip_and_refusal(tmp_path):
    root = untuned(tmp_path)
    before = snapshot(root)
    r = cli("tune", "--root", str(root), "--thp", "madvise")
    assert r.returncode == 0, r.stderr
    assert "governor cpu0: powersave -> performance" in r.stdout and "numabench system reset" in r.stdout
    r = cli("reset", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert snapshot(root) == before
    r = cli("reset", "--root", str(root))
    assert r.returncode == 1 and r.stderr.startswith("error: nothing to reset") and "Traceback" not in r.stderr


def test_cli_refuses_non_root_with_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from numabench.cli import cli as group

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(tune_mod, "LIVE_STATE", tmp_path / "state.json")
    r = CliRunner().invoke(group, ["system", "tune"])
    assert r.exit_code == 1
    assert "needs root" in r.output and "Traceback" not in r.output
