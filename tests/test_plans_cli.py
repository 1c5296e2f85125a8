"""`numabench plan` on generated trees, the shared real-machine fixtures and the live machine;
the example plans in plans/ against the article's machine."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_plans_planner import check_plan_properties
from test_plans_support import fixture_tarballs

from numabench.cli import cli
from numabench.plans import (
    PlanRequest,
    load_plan,
    load_preset,
    make_plan,
    validate_plan,
)
from numabench.topology import read_machine

REPO = Path(__file__).resolve().parents[1]
# plans/ holds example plans and experiments (experiment-*.yaml, tested in test_experiments.py).
EXAMPLES = sorted(p for p in (REPO / "plans").glob("*.yaml") if not p.name.startswith("experiment-"))


def run(*args):
    return CliRunner().invoke(cli, ["plan", *map(str, args)], catch_exceptions=False)


# article_tree (the article's c5.metal): tests/conftest.py


@pytest.fixture(scope="session")
def fixture_roots(topology_roots):
    """Every shared fixture, unpacked once per session by conftest: {tarball stem: root}."""
    return topology_roots


FIXTURE_NAMES = [t.name.removesuffix(".tar.bz2") for t in fixture_tarballs()] or ["(none)"]


# ---- the three forms --------------------------------------------------------------------------


def test_plan_prints_yaml_that_validates(article_tree, tmp_path):
    r = run("--instances", 4, "--batch", 8, "--root", article_tree)
    assert r.exit_code == 0, r.output
    p = load_plan(r.output)
    assert [i.cpus for i in p.instances][2] == tuple(range(24, 36))
    validate_plan(p, read_machine(article_tree))


def test_plan_writes_shows_and_validates_a_file(article_tree, tmp_path):
    out = tmp_path / "p.yaml"
    r = run("--preset", "smart-dispatch", "--batch", 3, "--root", article_tree, "-o", out)
    assert r.exit_code == 0 and out.exists()
    shown = run("show", out, "--root", article_tree)
    assert shown.exit_code == 0 and "385-" in shown.output and "33-384" in shown.output
    ok = run("validate", out, "--root", article_tree)
    assert ok.exit_code == 0 and "ok (3 instances, 48 CPUs, batch 3)" in ok.output
    # --root also works before the subcommand
    assert run("--root", article_tree, "validate", out).exit_code == 0


def test_validate_refuses_with_file_line_and_field(article_tree, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nbatch: 2\ninstances:\n  - cpus: 0-3\n    threads: 5\n  - cpus: 4\n")
    r = CliRunner().invoke(cli, ["plan", "validate", str(bad), "--root", str(article_tree)])
    assert r.exit_code == 2
    assert f"error: {bad}:5: instances[0].threads: threads 5 for 4 CPUs" in r.output


def test_plan_without_options_prints_help_and_bad_requests_are_refused(article_tree):
    r = run()
    assert r.exit_code == 0 and "show PLAN | validate PLAN" in r.output
    r = CliRunner().invoke(cli, ["plan", "--instances", "4", "--batch", "2", "--root",
                                 str(article_tree)])
    assert r.exit_code == 2 and "error: batch 2 cannot be split over 4 instances" in r.output
    r = CliRunner().invoke(cli, ["plan", "--instances", "2", "--cpus", "a-b"])
    assert r.exit_code == 2 and "is not a CPU list" in r.output


def test_restrictions_on_the_command_line(article_tree):
    r = run("--instances", 2, "--nodes", 1, "--smt", "--root", article_tree)
    p = load_plan(r.output)
    assert p.instances[0].cpus == tuple(range(24, 36)) + tuple(range(72, 84)) and p.smt
    r = run("--instances", 2, "--cpus", "0-5", "--leftover", "spread", "--root", article_tree)
    assert [i.cpus for i in load_plan(r.output).instances] == [(0, 1, 2), (3, 4, 5)]


def test_live_machine_two_instances():
    r = CliRunner().invoke(cli, ["plan", "--instances", "2", "--batch", "8"])
    if r.exit_code != 0 and "2 instances need at least 2 cores" in r.output:
        pytest.skip("this machine has fewer than 2 usable cores")
    assert r.exit_code == 0, r.output
    p = load_plan(r.output)
    assert [i.batch for i in p.instances] == [4, 4]
    validate_plan(p, read_machine("/"))


# ---- the example plans --------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_plans_validate_on_the_article_machine(path, article_tree):
    machine = read_machine(article_tree)
    plan = load_plan(path)
    validate_plan(plan, machine)
    assert run("validate", path, "--root", article_tree).exit_code == 0


def test_example_plans_are_what_the_planner_makes(article_tree):
    m = read_machine(article_tree)
    by_name = {load_plan(p).name: load_plan(p) for p in EXAMPLES}
    assert set(by_name) >= {"article-2x24", "article-4x12", "article-smart-dispatch"}
    assert by_name["article-4x12"].instances == make_plan(
        m, PlanRequest(instances=4, batch=8)).instances
    assert by_name["article-2x24"].instances == make_plan(
        m, PlanRequest(instances=2, batch=8)).instances
    assert by_name["article-smart-dispatch"].instances == make_plan(
        m, replace(load_preset("smart-dispatch"), batch=3)).instances


# ---- the shared real-machine fixtures -------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_plan_instances_4_batch_8_on_each_fixture(name, fixture_roots, tmp_path):
    root = fixture_roots[name]
    r = CliRunner().invoke(cli, ["plan", "--instances", "4", "--batch", "8", "--root", str(root)])
    assert r.exit_code == 0, r.output
    plan = load_plan(r.output)
    machine = read_machine(root)
    check_plan_properties(machine, plan)
    assert [i.batch for i in plan.instances] == [2, 2, 2, 2]
    out = tmp_path / "p.yaml"
    out.write_text(r.output)
    assert run("show", out, "--root", root).exit_code == 0


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_properties_over_each_fixture(name, fixture_roots):
    m = read_machine(fixture_roots[name])
    kind = "performance" if "performance" in m.kinds else m.kinds[0]
    total = sum(1 for c in m.usable_cores() if c.kind == kind)
    counts = sorted({*range(1, min(total, 9)), total // 3 or 1, total // 2 or 1, total - 1 or 1,
                     total})  # the small counts, and a few large ones
    for n in counts:
        for leftover in ("idle", "spread"):
            p = make_plan(m, PlanRequest(instances=n, leftover=leftover))
            check_plan_properties(m, p, all_cores=(n == 1))
    check_plan_properties(m, make_plan(m, load_preset("throughput")), all_cores=True)
    check_plan_properties(m, make_plan(m, PlanRequest(instances=1, smt=True)), all_cores=True)
    check_plan_properties(m, make_plan(m, load_preset("per-node")), all_cores=True)
    check_plan_properties(m, make_plan(m, load_preset("per-socket")), all_cores=True)
