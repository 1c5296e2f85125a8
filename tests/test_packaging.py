"""Packaging: `python -m numabench`, lower bounds in setup.cfg, exact versions in constraints.txt."""
from __future__ import annotations

import configparser
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import numabench

REPO = Path(__file__).resolve().parents[1]


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def requirements(text: str) -> list[Requirement]:
    return [Requirement(x.strip()) for x in text.splitlines()
            if x.strip() and not x.strip().startswith(("#", "%"))]


def constraints() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def test_python_dash_m_numabench_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "numabench", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"numabench, version {numabench.__version__}"


def test_install_requires_has_lower_bounds_only():
    reqs = requirements(setup_cfg()["options"]["install_requires"])
    for r in reqs:
        assert not any(s.operator in ("==", "===", "<", "<=", "~=") for s in r.specifier), r
    torch = next(r for r in reqs if r.name == "torch")
    assert str(torch.specifier).startswith(">=") and "2.13.0" in torch.specifier  # the tested version


def test_constraints_pin_every_requirement_and_torch_to_the_cpu_wheel_version():
    pins = constraints()
    cfg = setup_cfg()
    wanted = requirements(cfg["options"]["install_requires"])
    for name, value in cfg["options.extras_require"].items():
        if name != "all":
            wanted += requirements(value)
    for r in wanted:
        assert canonicalize_name(r.name) in pins, f"{r.name} has no exact version in constraints.txt"
        assert pins[canonicalize_name(r.name)] in r.specifier, f"constraints.txt {r.name} breaks setup.cfg's {r}"
    assert pins["torch"] == "2.13.0"


def test_constraints_match_this_environment():
    """The development venv is installed with constraints.txt: a drift in a direct dependency means
    one of them is stale."""
    pins = constraints()
    direct = {canonicalize_name(r.name) for r in requirements(setup_cfg()["options"]["install_requires"])}
    drift = {}
    for name, version in ((n, pins[n]) for n in sorted(direct)):
        try:
            got = md.version(name).split("+")[0]
        except md.PackageNotFoundError:
            continue
        if got != version:
            drift[name] = (version, got)
    assert not drift, f"constraints.txt vs installed: {drift}; regenerate with .ci/constraints.py"


@pytest.mark.skipif(shutil.which("numabench") is None, reason="the numabench script is not on PATH")
def test_bash_completion_script_is_generated():
    env = {**os.environ, "_NUMABENCH_COMPLETE": "bash_source"}
    r = subprocess.run(["numabench"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "_numabench_completion" in r.stdout
