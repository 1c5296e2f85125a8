"""`numabench system tune` / `reset`: set the knobs that can be set, and restore exactly what was there.

Tune sets every CPU's governor to performance, turbo off (intel_pstate/no_turbo=1 or cpufreq/boost=0)
and, when asked, transparent hugepages. Before writing anything it saves each file's previous text
in a state file; reset writes those values back and removes the state file. A second tune keeps the
first one's originals, so reset always returns to the state before any tune.

On the live system (root "/") this needs root, writes the kernel's word ("powersave") and reads it
back. Under another root (a captured or fake tree of plain files) it writes what the kernel would
then show, and reset writes back the saved bytes, so a tree round-trips byte for byte.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from numabench.errors import NumabenchError
from numabench.system.facts import CPU_DIR, THP_DIR, choice, token

THP_CHOICES = ("always", "madvise", "never")
STATE_SCHEMA = "numabench.system-tune"
LIVE_STATE = Path("/run/numabench/system-tune.json")  # /run is emptied at boot, as the knobs are


class TuneError(NumabenchError):
    exit_code = 1


@dataclass(frozen=True)
class Knob:
    rel: str  # path under the root
    want: str
    kind: str  # "value": the file holds one word; "choice": "a [b] c", the selection in brackets
    label: str


@dataclass(frozen=True)
class Change:
    label: str
    path: str
    before: str | None  # the word that was there
    after: str | None  # the word there now (None: could not change)
    note: str = ""


@dataclass(frozen=True)
class TuneResult:
    changes: tuple[Change, ...]
    problems: tuple[str, ...]  # missing or unwritable knobs: reported, not fatal
    state_file: Path | None
    unchanged: tuple[str, ...] = field(default=())


def is_live(root: str | os.PathLike) -> bool:
    return str(Path(root).resolve()) == "/"


def default_state_file(root: str | os.PathLike) -> Path:
    """/run/numabench/system-tune.json; under a tree root, the same path inside the tree."""
    return LIVE_STATE if is_live(root) else Path(root) / LIVE_STATE.relative_to("/")


def knobs(root: Path, thp: str | None) -> tuple[list[Knob], list[str]]:
    """The knobs this root has, and a note for each kind it lacks."""
    out: list[Knob] = []
    missing: list[str] = []
    cpu_dir = root / CPU_DIR
    cpus = []
    try:
        cpus = sorted(int(p.name[3:]) for p in cpu_dir.iterdir() if re.fullmatch(r"cpu\d+", p.name))
    except OSError:
        pass
    govs = [c for c in cpus if (cpu_dir / f"cpu{c}/cpufreq/scaling_governor").is_file()]
    out += [Knob(f"{CPU_DIR}/cpu{c}/cpufreq/scaling_governor", "performance", "value", f"governor cpu{c}")
            for c in govs]
    if not govs:
        missing.append("governor: no cpufreq/scaling_governor here (common in VMs)")
    if (root / CPU_DIR / "intel_pstate/no_turbo").is_file():
        out.append(Knob(f"{CPU_DIR}/intel_pstate/no_turbo", "1", "value", "turbo (intel_pstate/no_turbo)"))
    elif (root / CPU_DIR / "cpufreq/boost").is_file():
        out.append(Knob(f"{CPU_DIR}/cpufreq/boost", "0", "value", "turbo (cpufreq/boost)"))
    else:
        missing.append("turbo: neither intel_pstate/no_turbo nor cpufreq/boost here")
    if thp is not None:
        if thp not in THP_CHOICES:
            raise TuneError(f"--thp {thp!r}: choose one of {', '.join(THP_CHOICES)}")
        if (root / THP_DIR / "enabled").is_file():
            out.append(Knob(f"{THP_DIR}/enabled", thp, "choice", "transparent hugepages"))
        else:
            missing.append(f"transparent hugepages: no {THP_DIR}/enabled here")
    return out, missing


def _word(text: str, kind: str) -> str | None:
    return choice(text) if kind == "choice" else token(text)


def _tree_view(text: str, kind: str, want: str) -> str:
    """What the kernel shows after `want` is written: the value, or the choice list with brackets moved."""
    if kind == "value":
        return want + "\n"
    words = [w.strip("[]") for w in text.split()]
    return " ".join(f"[{w}]" if w == want else w for w in words) + "\n"


def _check_user(root: Path, euid: int | None, what: str) -> bool:
    live = is_live(root)
    if live and (os.geteuid() if euid is None else euid) != 0:
        raise TuneError(f"numabench system {what} changes kernel settings and needs root: "
                        f"run it as `sudo numabench system {what}` (`numabench system` shows them without root)")
    return live


def _load_state(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TuneError(f"{path}: unreadable tune state ({e}); remove it if the settings were reset by a "
                        "reboot, or pass --state-file") from None
    if not isinstance(doc, dict) or doc.get("schema") != STATE_SCHEMA or not isinstance(doc.get("files"), dict):
        raise TuneError(f"{path}: not a numabench tune state file; pass --state-file with the right one")
    return doc


def _save_state(path: Path, root: Path, files: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"schema": STATE_SCHEMA, "version": 1, "root": str(root.resolve()),
                               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                               "files": files}, indent=1) + "\n")
    os.replace(tmp, path)


def tune(root: str | os.PathLike = "/", thp: str | None = None, state_file: str | os.PathLike | None = None,
         euid: int | None = None) -> TuneResult:
    root = Path(root)
    live = _check_user(root, euid, "tune")
    state_path = Path(state_file) if state_file else default_state_file(root)
    prior = _load_state(state_path)
    if prior is not None and prior.get("root") != str(root.resolve()):
        raise TuneError(f"{state_path} holds settings saved for root {prior.get('root')}, not {root}; "
                        "reset that one first or pass another --state-file")
    saved: dict[str, str] = dict(prior["files"]) if prior else {}
    todo, problems = knobs(root, thp)
    pending: list[tuple[Knob, str, str | None]] = []
    unchanged = []
    for k in todo:
        try:
            text = (root / k.rel).read_bytes().decode("utf-8", errors="replace")
        except OSError as e:
            problems.append(f"{k.label}: cannot read {root / k.rel} ({e.strerror or e})")
            continue
        now = _word(text, k.kind)
        if now == k.want:
            unchanged.append(k.label)
            continue
        if k.kind == "choice" and k.want not in [w.strip("[]") for w in text.split()]:
            problems.append(f"{k.label}: {k.want!r} is not offered by {root / k.rel} ({text.strip()!r})")
            continue
        saved.setdefault(k.rel, text)  # a second tune keeps the first one's original
        pending.append((k, text, now))
    if pending:  # saved before any write: an interrupted tune can still be reset
        _save_state(state_path, root, saved)
    changes = []
    for k, text, now in pending:
        path = root / k.rel
        try:
            path.write_text(k.want if live else _tree_view(text, k.kind, k.want))
            after = _word(path.read_text(errors="replace"), k.kind)
        except OSError as e:
            problems.append(f"{k.label}: cannot write {path} ({e.strerror or e}); left at {now}")
            changes.append(Change(k.label, str(path), now, None, "not writable"))
            continue
        note = "" if after == k.want else f"the kernel kept {after}"
        if note:
            problems.append(f"{k.label}: wrote {k.want} to {path} but {note}")
        changes.append(Change(k.label, str(path), now, after, note))
    return TuneResult(tuple(changes), tuple(problems), state_path if saved else None, tuple(unchanged))


def reset(root: str | os.PathLike = "/", state_file: str | os.PathLike | None = None,
          euid: int | None = None) -> TuneResult:
    root = Path(root)
    live = _check_user(root, euid, "reset")
    state_path = Path(state_file) if state_file else default_state_file(root)
    state = _load_state(state_path)
    if state is None:
        raise TuneError(f"nothing to reset: no tune state at {state_path} (`numabench system tune` writes "
                        "one; after a reboot the kernel's defaults are back anyway)")
    if state.get("root") != str(root.resolve()):
        raise TuneError(f"{state_path} holds settings saved for root {state.get('root')}, not {root}; "
                        f"pass --root {state.get('root')}")
    kinds = {k.rel: k for k in knobs(root, "never")[0]}  # kind and label of each saved path
    problems, changes = [], []
    left: dict[str, str] = {}
    for rel, original in state["files"].items():
        k = kinds.get(rel) or Knob(rel, "", "choice" if rel.startswith(THP_DIR) else "value", rel)
        path = root / rel
        want = _word(original, k.kind)
        try:
            now = _word(path.read_text(errors="replace"), k.kind)
            if live:
                if want is None:
                    raise OSError(f"saved value {original!r} is not a kernel word")
                path.write_text(want)
            else:
                path.write_bytes(original.encode())
            after = _word(path.read_text(errors="replace"), k.kind)
        except OSError as e:
            problems.append(f"{k.label}: cannot restore {path} ({getattr(e, 'strerror', None) or e})")
            left[rel] = original
            continue
        changes.append(Change(k.label, str(path), now, after))
    if left:
        _save_state(state_path, root, left)  # what could not be restored stays for another try
    else:
        state_path.unlink()
    return TuneResult(tuple(changes), tuple(problems), state_path if left else None)
