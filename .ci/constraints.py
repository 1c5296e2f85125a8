"""Print constraints.txt: the exact versions, in the development venv, of numabench's dependencies.

Run with the venv's python (`.venv/bin/python .ci/constraints.py > constraints.txt`) after an
install of numabench with every extra; it follows the requirement tree from setup.cfg, so
packages in the venv that numabench does not need stay out.
"""
import configparser
import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions for development and CI: `pip install -c constraints.txt ...` (the Makefile does).
# setup.cfg has lower bounds only. Regenerate: .venv/bin/python .ci/constraints.py > constraints.txt
# torch is pinned without its local label so pip takes the CPU wheel already on disk (2.13.0+cpu).
"""


def top_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for name, value in cfg["options.extras_require"].items():
        if name != "all":
            lines += value.splitlines()
    return [Requirement(x.strip()) for x in lines if x.strip() and not x.strip().startswith(("#", "%"))]


def main() -> None:
    pins: dict[str, str] = {}
    todo = [(r.name, set(r.extras)) for r in top_requirements()]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), frozenset(extras)) in done:
            continue
        done.add((canonicalize_name(name), frozenset(extras)))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: install numabench with every extra first")
        pins[canonicalize_name(dist.metadata["Name"])] = dist.version.split("+")[0]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, set(req.extras)))
    print(HEADER + "".join(f"{k}=={v}\n" for k, v in sorted(pins.items())), end="")


if __name__ == "__main__":
    main()
