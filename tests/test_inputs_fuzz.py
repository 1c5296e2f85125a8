"""Property-based: arbitrary bytes and arbitrary YAML at every file-reading entry point.

Whatever a file holds, the command answers with exit 0 (it was valid) or 2 and a message,
never a traceback, and within bounded time (hypothesis' deadline, generous) and memory
(tracemalloc's peak: a CPU range like 0-99999999999 must be refused, not expanded).
"""
from __future__ import annotations

import tracemalloc

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sysfs_tree import write_sysfs_tree

from numabench.cli import cli
from numabench.errors import NumabenchError
from numabench.experiments.spec import ALL_KEYS
from numabench.launcher.launch import read_texts
from numabench.plans.presets import PRESET_KEYS, TIER_KEYS
from numabench.plans.yamlio import INSTANCE_KEYS, PLAN_KEYS

MEMORY_BOUND = 64 << 20  # bytes of Python allocations one bad file may cost
FUZZ = settings(max_examples=40, deadline=10_000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Values that reach deep into the readers: CPU lists (some absurd), numbers at the edges.
TRICKY = st.sampled_from([
    "0-3", "0-99999999999", "0-8192", "3-1", "0-7:2/4", "1,1", "-1", "nan", "inf", ".inf",
    "auto", "node", "1e400", "0x10", "", "~", "!!binary AAAA", "9" * 5000,
    1, 0, -1, 10**30, 1.5, float("nan"), float("inf"), True, None,
])
KEYS = st.sampled_from(sorted(set(PLAN_KEYS + INSTANCE_KEYS + ALL_KEYS + PRESET_KEYS + TIER_KEYS
                                  + ("min", "max", "x"))))
SCALARS = st.one_of(TRICKY, st.integers(), st.floats(), st.text(max_size=20), st.booleans())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)), max_leaves=25)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=8).map(
    lambda d: {"version": 1, **d} if "version" not in d else d)


def yaml_text(doc) -> bytes:
    return yaml.safe_dump(doc, allow_unicode=True).encode()


CONTENTS = st.one_of(
    st.binary(max_size=400),  # arbitrary bytes: non-UTF-8, NUL, empty
    DOCUMENTS.map(yaml_text),  # arbitrary YAML of the right shape
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"", b"\xff\xfe\x00", b"[" * 5000, b"&a [*a]", b"a: !!python/object:os.system x",
                     b"version: 1\ninstances: [{cpus: 0-99999999999}]\n"]),
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_sysfs_tree(tmp_path_factory.mktemp("tree"), sockets=2, cores_per_node=2)


@pytest.fixture(scope="module")
def cgroup_tree(tmp_path_factory):
    return write_sysfs_tree(tmp_path_factory.mktemp("cgtree"), sockets=2, cores_per_node=2,
                            cgroup_cpus="0-3")


def run_cli(args):
    tracemalloc.start()
    try:
        result = CliRunner().invoke(cli, args, catch_exceptions=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def assert_answered(result, peak, path):
    out = result.output
    assert result.exit_code in (0, 2), (result.exit_code, out, result.exception)
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    if result.exit_code == 2:
        assert "error: " in out.lower(), out
    assert peak < MEMORY_BOUND, f"{peak >> 20} MiB for one file"


@FUZZ
@given(content=CONTENTS)
def test_plan_files(tmp_path, tree, content):
    path = tmp_path / "plan.yaml"
    path.write_bytes(content)
    assert_answered(*run_cli(["plan", "validate", str(path), "--root", str(tree)]), path)


@FUZZ
@given(content=CONTENTS)
def test_preset_files(tmp_path, tree, content):
    path = tmp_path / "preset.yaml"
    path.write_bytes(content)
    assert_answered(*run_cli(["plan", "--preset", str(path), "--root", str(tree)]), path)


@FUZZ
@given(content=CONTENTS.map(lambda b: b.replace(b"version: 1\n", b"version: 1\nkind: grid\n", 1)))
def test_experiment_files(tmp_path, content):
    path = tmp_path / "exp.yaml"
    path.write_bytes(content)
    assert_answered(*run_cli(["sweep", str(path), "--dry-run"]), path)


@FUZZ
@given(content=CONTENTS)
def test_lscpu_files(tmp_path, tree, content):
    path = tmp_path / "lscpu.txt"
    path.write_bytes(content)
    assert_answered(*run_cli(["topology", "--root", str(tree), "--lscpu", str(path)]), path)


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), TRICKY.map(lambda v: str(v).encode())),
       which=st.sampled_from(["sys/devices/system/cpu/online",
                              "sys/devices/system/node/node1/cpulist",
                              "sys/devices/system/cpu/cpu1/topology/core_cpus_list",
                              "sys/devices/system/cpu/cpu0/topology/thread_siblings",
                              "proc/self/status", "proc/self/mounts", "proc/self/cgroup",
                              "sys/fs/cgroup/numabench.slice/job/cpuset.cpus.effective"]))
def test_topology_tree_files(cgroup_tree, content, which):
    path = cgroup_tree / which
    original = path.read_bytes() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    try:
        assert_answered(*run_cli(["topology", "--root", str(cgroup_tree), "--json"]), path)
    finally:  # one tree for all examples: put the file back
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)


@FUZZ
@given(content=st.binary(max_size=400))
def test_text_files(tmp_path, content):
    path = tmp_path / "texts.txt"
    path.write_bytes(content)
    try:
        lines = read_texts(str(path))
    except NumabenchError as e:
        assert str(e).startswith(str(path))
    else:
        assert all(line == line.strip() and line for line in lines)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b"version: 1\n\xff\xfe name\n"),  # not UTF-8
    lambda p: p.write_bytes(b""),  # empty
    lambda p: p.mkdir(),  # a folder
])
def test_unreadable_files_are_messages_naming_the_file(tmp_path, tree, make):
    path = tmp_path / "x.yaml"
    make(path)
    for args in (["plan", "validate", str(path), "--root", str(tree)],
                 ["plan", "--preset", str(path), "--root", str(tree)],
                 ["topology", "--root", str(tree), "--lscpu", str(path)]):
        result, _ = run_cli(args)
        assert result.exit_code == 2 and str(path) in result.output, (args, result.output)
        assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["launch", "--model", "minilm", "--backend", "noop",
                                      "--text", str(path), "-o", str(tmp_path / "nope" / "r.json")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_text_file_not_utf8_is_a_message(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"hello\n\xff world\n")
    with pytest.raises(NumabenchError, match=r"t.txt:2: --text file is not UTF-8 text"):
        read_texts(str(path))
