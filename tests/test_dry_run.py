"""Dry-runs against another machine's captured sysfs tree (issue 14): `sweep|launch|serve --root
TREE --dry-run` plan and validate, list what would run, flag idle cores, and run nothing; the
article's experiments in plans/ validate against its c5.metal."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sysfs_tree import write_sysfs_tree
from test_plans_support import fixture_tarballs

from numabench.cli import cli
from numabench.launcher.placement import core_use
from numabench.plans import PlanRequest, make_plan
from numabench.topology import read_machine

REPO = Path(__file__).resolve().parents[1]
ARTICLE_EXPERIMENTS = ("batch-scaling", "core-scaling", "smt", "smart-dispatch")
FIXTURE_NAMES = [t.name.removesuffix(".tar.bz2") for t in fixture_tarballs()] or ["(none)"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_core_use_counts_physical_cores_not_cpus(article_tree):
    m = read_machine(article_tree)
    assert core_use(m, make_plan(m, PlanRequest(instances=32, cores_per_instance=1)).cpus).flag() == \
        "leaves 16 of 48 usable physical cores idle"
    # SMT siblings add no core: 24 cores with their siblings still leave 24 idle
    assert core_use(m, [*range(24), *range(48, 72)]).idle == 24
    assert core_use(m, make_plan(m, PlanRequest(instances=2)).cpus).flag() is None


@pytest.mark.parametrize("name", ARTICLE_EXPERIMENTS)
def test_article_experiments_dry_run_on_the_article_machine(name, article_tree, tmp_path):
    r = invoke("sweep", REPO / "plans" / f"experiment-{name}.yaml", "--root", article_tree,
               "--dry-run", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    head, *points = r.output.strip().splitlines()
    assert head.startswith(f"{name} (") and "all valid on Fake CPU @ 2.00GHz" in head
    numbered = [line for line in points if line[:4].strip().isdigit()]
    assert numbered and int(numbered[-1][:4]) == len(numbered)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written
    if name == "batch-scaling":  # 48 cores: 32 x 1 leaves 16 idle, every other split covers them
        flagged = [line for line in numbered if line[4:6] == " !"]
        assert flagged and all("_n32x1" in line for line in flagged)
        # with its baselines: an unpinned twin of every split, one default process per seq
        assert sum("-unpinned_" in line for line in numbered) == 24 and sum("_oob_" in line for line in numbered) == 4
        assert all("leaves 16 of 48 usable physical cores idle" in line for line in flagged)
        assert r.output.strip().endswith(f"! {len(flagged)} of {len(numbered)} points leave usable "
                                         "physical cores idle")
    if name == "smt":  # SMT on/off pairs: the article machine has siblings
        assert sum("-smt_" in line for line in numbered) == len(numbered) // 2


def test_sweep_dry_run_lists_and_flags_idle_points(article_tree, tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("version: 1\nkind: grid\nmodel: bert-tiny\nseq: 8\nbatch: 32\n"
                   "instances: [2, 32]\ncores_per_instance: [24, 1]\n")
    r = invoke("sweep", exp, "--root", article_tree, "--dry-run")
    assert r.exit_code == 2, r.output  # 32 x 24 cannot plan on 48 cores: named, nothing runs
    assert "point 3/4" in r.output
    exp.write_text("version: 1\nkind: grid\nmodel: bert-tiny\nseq: 8\nbatch: 32\n"
                   "instances: [2, 32]\ncores_per_instance: 1\n")
    r = invoke("sweep", exp, "--root", article_tree, "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "(2 x 1 CPUs; leaves 46 of 48 usable physical cores idle)" in lines[1]
    assert "(32 x 1 CPUs; leaves 16 of 48 usable physical cores idle)" in lines[2]


def test_launch_and_serve_dry_run_against_a_tree(article_tree):
    r = invoke("launch", "-n", 32, "-c", 1, "--model", "bert-tiny", "--root", article_tree, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "32 instances on 32 of 48 usable cores (16 idle)" in r.output
    assert "idle cores: the plan leaves 16 of 48 usable physical cores idle" in r.output
    assert "nothing was run" in r.output
    r = invoke("launch", "--plan", REPO / "plans" / "article-4x12.yaml", "--root", article_tree, "--dry-run")
    assert r.exit_code == 0 and "idle cores" not in r.output and "4 instances on 48 of 48" in r.output
    r = invoke("serve", "--plan", REPO / "plans" / "article-smart-dispatch.yaml", "--root",
               article_tree, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "seq range" in r.output and "385-" in r.output and "serve --dry-run" in r.output
    # a workload that cannot run there is refused by the dry-run too
    r = invoke("launch", "-n", 2, "--model", "bert-tiny", "--seq", 100000, "--root", article_tree,
               "--dry-run")
    assert r.exit_code == 2 and "exceeds bert-tiny's maximum" in r.output


@pytest.mark.parametrize("command", [
    ["launch", "-n", "2", "--model", "bert-tiny", "--backend", "noop"],
    ["serve", "-n", "2", "--model", "bert-tiny", "--backend", "noop"],
    ["sweep", str(REPO / "plans" / "experiment-smt.yaml")],
])
def test_root_without_dry_run_is_refused(command, article_tree):
    r = invoke(*command, "--root", article_tree)
    assert r.exit_code == 2
    assert f"{command[0]} --root {article_tree}: a captured tree is another machine's" in r.output
    assert "add --dry-run" in r.output


def test_dry_run_on_a_tree_without_smt_refuses_the_smt_experiment(tmp_path):
    tree = write_sysfs_tree(tmp_path / "nosmt", sockets=1, cores_per_node=8)
    r = invoke("sweep", REPO / "plans" / "experiment-smt.yaml", "--root", tree, "--dry-run")
    assert r.exit_code == 2 and "1 thread per core" in r.output


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_dry_runs_on_each_real_fixture(name, topology_roots, tmp_path):
    if name not in topology_roots:
        pytest.skip(f"fixture {name} not unpacked")
    root = topology_roots[name]
    m = read_machine(root)
    exp = tmp_path / "e.yaml"
    # the planner divides the cores (a fixed cores/instance does not fit every odd machine)
    exp.write_text("version: 1\nkind: grid\nmodel: bert-tiny\nbackend: noop\nseq: 8\nbatch: 8\n"
                   "instances: [1, 2, 3]\n")
    r = invoke("sweep", exp, "--root", root, "--dry-run")
    assert r.exit_code == 0, r.output
    numbered = [line for line in r.output.splitlines() if line[:4].strip().isdigit()]
    assert len(numbered) == 3
    for n, line in zip((1, 2, 3), numbered):
        use = core_use(m, make_plan(m, PlanRequest(instances=n, batch=8)).cpus)
        assert (line[4:6] == " !") == (use.idle > 0), line
        assert (use.flag() or "") in line
    total = len(m.usable_cores())
    r = invoke("launch", "-n", 1, "--model", "bert-tiny", "--root", root, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "nothing was run" in r.output
    assert (f"on {total} of {total} usable cores (0 idle)" in r.output) == ("idle cores" not in r.output)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batch_scaling_on_all_cores_plans_on_each_real_fixture(name, topology_roots, tmp_path):
    """`cores: auto` on a hybrid CPU, a cgroup allowing 4 + 2 cores of two nodes, memory-only
    nodes: every point plans (the planner divides unequal nodes) instead of failing."""
    if name not in topology_roots:
        pytest.skip(f"fixture {name} not unpacked")
    exp = tmp_path / "bs.yaml"
    exp.write_text("version: 1\nkind: batch-scaling\nmodel: bert-tiny\nbackend: noop\nseq: 8\n"
                   "batch: [1, 8]\n")
    r = invoke("sweep", exp, "--root", topology_roots[name], "--dry-run")
    assert r.exit_code == 0, r.output
    numbered = [line for line in r.output.splitlines() if line[:4].strip().isdigit()]
    assert len(numbered) >= 2 and "all valid on" in r.output
