"""What the kernel shows under a root prefix: frequency, turbo, THP, SMT, isolation, IRQs, load, quota.

Every reader takes the root prefix (a captured tree works like the live `/`) and returns one Fact.
A file that is missing gives `unknown`; a file that holds something unexpected gives `unknown`
too, never an exception: `read_facts` guards each reader so one odd file cannot hide the rest.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from numabench.system.model import Fact, read_text
from numabench.topology import cgroup
from numabench.topology.cpulist import format_cpulist, parse_cpulist

CPU_DIR = "sys/devices/system/cpu"
THP_DIR = "sys/kernel/mm/transparent_hugepage"
_TOKEN = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
TUNE_FIX = "sudo numabench system tune"
MAX_CPU = 1 << 16  # above any kernel's NR_CPUS

# Load average above this many runnable tasks per online CPU (and at least LOAD_MIN) warns:
# a quiet machine sits near 0; every runnable task beyond the benchmark's own competes for cores.
LOAD_WARN_PER_CPU = 0.1
LOAD_MIN = 0.5


def token(text: str | None) -> str | None:
    """A one-word sysfs value ("performance", "1"), or None when absent or not a plain word."""
    if text is None:
        return None
    t = text.strip()
    return t if _TOKEN.match(t) else None


def choice(text: str | None) -> str | None:
    """The selected word of a kernel choice list ("always [madvise] never" → "madvise")."""
    if text is None:
        return None
    words = text.split()
    picked = [w[1:-1] for w in words if len(w) > 2 and w[0] == "[" and w[-1] == "]"]
    if len(picked) != 1 or not all(_TOKEN.match(w.strip("[]")) for w in words):
        return None
    return picked[0]


def cpus_file(root: Path, rel: str) -> tuple[int, ...] | None:
    """A cpulist file ("0-3,8"); empty or "(null)" is no CPU; None when absent or unparsable."""
    text = read_text(root, rel)
    if text is None:
        return None
    t = text.strip()
    if t in ("", "(null)"):
        return ()
    if any(int(n) > MAX_CPU for n in re.findall(r"\d+", t)):  # "0-4000000000" would fill memory
        return None
    try:
        return parse_cpulist(t)
    except ValueError:
        return None


def _fmt(cpus) -> str:
    return format_cpulist(sorted(cpus)) if cpus else "none"


# --- readers -----------------------------------------------------------------------------------


def governor(root: Path, cpus: tuple[int, ...]) -> Fact:
    by_gov: dict[str, list[int]] = {}
    odd: list[int] = []
    for c in cpus:
        text = read_text(root, f"{CPU_DIR}/cpu{c}/cpufreq/scaling_governor")
        if text is None:
            continue
        g = token(text)
        (by_gov.setdefault(g, []) if g else odd).append(c)
    driver = token(read_text(root, f"{CPU_DIR}/cpu{cpus[0]}/cpufreq/scaling_driver")) if cpus else None
    data = {"governors": {g: list(c) for g, c in by_gov.items()}, "driver": driver, "unreadable": odd}
    if not by_gov:
        return Fact("governor", "unreadable" if odd else "not exposed", "unknown",
                    why="" if odd else "no cpufreq here (common in VMs): the host decides the frequency",
                    data=data)
    value = ", ".join(f"{g} on {_fmt(c)}" for g, c in sorted(by_gov.items())) + (f" ({driver})" if driver else "")
    slow = sorted(g for g in by_gov if g != "performance")
    if not slow and not odd:
        return Fact("governor", value, "ok", data=data)
    return Fact("governor", value, "warn" if slow else "unknown",
                why="the frequency follows the load, so timings vary with what ran just before",
                fix=f"{TUNE_FIX} (or: cpupower frequency-set -g performance)", data=data)


def turbo(root: Path) -> Fact:
    no_turbo = token(read_text(root, f"{CPU_DIR}/intel_pstate/no_turbo"))
    boost = token(read_text(root, f"{CPU_DIR}/cpufreq/boost"))
    data = {"intel_pstate_no_turbo": no_turbo, "cpufreq_boost": boost}
    if no_turbo in ("0", "1"):
        on, src = no_turbo == "0", "intel_pstate/no_turbo"
    elif boost in ("0", "1"):
        on, src = boost == "1", "cpufreq/boost"
    else:
        return Fact("turbo", "not exposed", "unknown", why="no turbo knob here (common in VMs)", data=data)
    if not on:
        return Fact("turbo", f"off ({src})", "ok", data=data)
    return Fact("turbo", f"on ({src})", "warn",
                why="turbo frequency depends on temperature and on how many cores are busy, so "
                    "instances slow each other down beyond sharing",
                fix=TUNE_FIX, data=data)


def thp(root: Path) -> Fact:
    enabled = choice(read_text(root, f"{THP_DIR}/enabled"))
    defrag = choice(read_text(root, f"{THP_DIR}/defrag"))
    data = {"enabled": enabled, "defrag": defrag}
    if enabled is None:
        return Fact("transparent hugepages", "not readable", "unknown", data=data)
    value = f"enabled={enabled}" + (f", defrag={defrag}" if defrag else "")
    why = []
    if enabled == "always":
        why.append("every large allocation may become a huge page or not depending on fragmentation, "
                   "and khugepaged rewrites memory in the background")
    if defrag == "always":
        why.append("defrag=always stalls allocations for compaction")
    if not why:
        return Fact("transparent hugepages", value, "ok", data=data)
    return Fact("transparent hugepages", value, "warn", why="; ".join(why),
                fix=f"{TUNE_FIX} --thp madvise (keep one setting for runs you compare)", data=data)


def smt(root: Path) -> Fact:
    control = token(read_text(root, f"{CPU_DIR}/smt/control"))
    active = token(read_text(root, f"{CPU_DIR}/smt/active"))
    data = {"control": control, "active": active}
    if control is None:
        return Fact("SMT", "not readable", "unknown", data=data)
    value = control + (f" (active={active})" if active is not None else "")
    if control == "on" or active == "1":
        return Fact("SMT", value, "ok", why="plans use one CPU per physical core unless --smt; "
                    "another process on a sibling still shares that core", data=data)
    return Fact("SMT", value, "ok", data=data)


def isolation(root: Path, cpus: tuple[int, ...]) -> list[Fact]:
    out = []
    for name, rel in (("isolated CPUs", f"{CPU_DIR}/isolated"), ("nohz_full CPUs", f"{CPU_DIR}/nohz_full")):
        got = cpus_file(root, rel)
        data = {"cpus": list(got) if got else []}
        if got is None:
            exists = read_text(root, rel) is not None
            out.append(Fact(name, "unreadable" if exists else "not exposed", "unknown" if exists else "ok",
                            data=data))
            continue
        inside = sorted(set(got) & set(cpus))
        if name == "isolated CPUs" and inside:
            out.append(Fact(name, _fmt(got), "warn",
                            why=f"the scheduler does not balance threads over isolated CPUs {_fmt(inside)}: "
                                "an instance spanning several of them runs its threads on one",
                            fix="pin each thread (OMP_PROC_BIND=close OMP_PLACES=cores) or plan one CPU "
                                "per instance there; or drop isolcpus= from the kernel command line",
                            data=data))
        else:
            out.append(Fact(name, _fmt(got), "ok", data=data))
    return out


def irqs(root: Path, cpus: tuple[int, ...], online: tuple[int, ...]) -> Fact:
    """IRQs delivered to the judged CPUs; only a warning when those are a part of the machine."""
    base = root / "proc/irq"
    try:
        names = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
    except OSError:
        return Fact("IRQ affinity", "not readable", "unknown")
    on: list[int] = []
    read = 0
    for n in names:
        aff = cpus_file(root, f"proc/irq/{n}/effective_affinity_list")
        if aff is None:
            aff = cpus_file(root, f"proc/irq/{n}/smp_affinity_list")
        if not aff:
            continue
        read += 1
        # An IRQ allowed on all online CPUs is not steered; one confined to the judged CPUs is.
        if set(aff) <= set(cpus) and set(aff) != set(online):
            on.append(n)
    data = {"irqs": len(names), "readable": read, "on_cpus": on}
    if not read:
        return Fact("IRQ affinity", f"{len(names)} IRQs, affinity not readable", "unknown", data=data)
    if set(cpus) >= set(online):  # judging the whole machine: IRQs have to land somewhere
        return Fact("IRQ affinity", f"{read} IRQs; judge a plan's CPUs (--cpus) to see which reach them",
                    "ok", data=data)
    value = f"{len(on)} of {read} IRQs delivered only to CPUs {_fmt(cpus)}"
    if not on:
        return Fact("IRQ affinity", value, "ok", data=data)
    listed = ", ".join(map(str, on[:10])) + (" ..." if len(on) > 10 else "")
    return Fact("IRQ affinity", value, "warn",
                why=f"interrupts {listed} run on these CPUs and take time from the instances there",
                fix="steer them elsewhere: echo OTHER_CPUS > /proc/irq/N/smp_affinity_list "
                    "(with irqbalance stopped, or banned from these CPUs with IRQBALANCE_BANNED_CPULIST)",
                data=data)


def parse_loadavg(text: str | None) -> tuple[float, float, float] | None:
    try:
        a, b, c = (float(x) for x in (text or "").split()[:3])
    except ValueError:
        return None
    return (a, b, c) if all(v >= 0 and v == v for v in (a, b, c)) else None


def load(root: Path, online: tuple[int, ...]) -> Fact:
    avg = parse_loadavg(read_text(root, "proc/loadavg"))
    if avg is None:
        return Fact("load average", "not readable", "unknown")
    limit = max(LOAD_MIN, LOAD_WARN_PER_CPU * max(len(online), 1))
    value = f"{avg[0]:.2f} {avg[1]:.2f} {avg[2]:.2f} (1, 5, 15 min) on {len(online)} CPUs"
    data = {"loadavg": list(avg), "warn_above": limit}
    if avg[0] <= limit:
        return Fact("load average", value, "ok", data=data)
    return Fact("load average", value, "warn",
                why="other work is running: it competes with the instances for cores, caches and memory "
                    "bandwidth",
                fix="wait for it to finish or stop it; see the busiest processes below", data=data)


def quota(root: Path, cpus: tuple[int, ...]) -> Fact:
    notes: list[str] = []
    limits = cgroup.read_cgroup_limits(root, notes)
    data = {"quota_cpus": limits.quota, "notes": notes}
    if limits.quota is None:
        return Fact("cgroup CPU quota", "none", "unknown" if notes else "ok", data=data)
    value = f"{limits.quota:g} CPUs of time"
    if limits.quota >= len(cpus):
        return Fact("cgroup CPU quota", value, "ok", data=data)
    return Fact("cgroup CPU quota", value, "warn",
                why=f"{len(cpus)} CPUs are usable but the cgroup grants {limits.quota:g} CPUs of time: "
                    "instances on more CPUs than that are throttled in bursts",
                fix="plan at most that many CPUs (--cpus), or raise cpu.max for this cgroup", data=data)


def kernel(root: Path) -> Fact:
    release = token(read_text(root, "proc/sys/kernel/osrelease"))
    if release is None:
        words = (read_text(root, "proc/version") or "").split()
        release = token(words[2]) if len(words) > 2 and words[:2] == ["Linux", "version"] else None
    if release is None:
        return Fact("kernel", "not readable", "unknown")
    return Fact("kernel", release, "ok", data={"release": release})


def guarded(name: str, reader: Callable[[], Fact | list[Fact]]) -> list[Fact]:
    """Run one reader; whatever a strange file does to it becomes an `unknown` fact naming the error."""
    try:
        got = reader()
    except Exception as e:  # noqa: BLE001 - a report must survive any tree; the error is shown
        return [Fact(name, f"could not be read: {type(e).__name__}: {e}", "unknown")]
    return got if isinstance(got, list) else [got]


def read_facts(root: Path, cpus: tuple[int, ...], online: tuple[int, ...]) -> list[Fact]:
    """The machine's facts under `root`, judged for `cpus` (within `online`)."""
    readers: list[tuple[str, Callable[[], Fact | list[Fact]]]] = [
        ("governor", lambda: governor(root, cpus)),
        ("turbo", lambda: turbo(root)),
        ("transparent hugepages", lambda: thp(root)),
        ("SMT", lambda: smt(root)),
        ("isolated CPUs", lambda: isolation(root, cpus)),
        ("IRQ affinity", lambda: irqs(root, cpus, online)),
        ("load average", lambda: load(root, online)),
        ("cgroup CPU quota", lambda: quota(root, cpus)),
        ("kernel", lambda: kernel(root)),
    ]
    return [f for name, r in readers for f in guarded(name, r)]
