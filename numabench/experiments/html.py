"""report.html: one self-contained page (inline CSS, inline SVG figures, no scripts, no outside
links) with the machine, the figures, the table and each point's plan; it opens offline and can
be mailed as one file.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from numabench.topology.cpulist import format_cpulist

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1400px; padding: 0 16px; color: #1d1d1f; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px;
     border-bottom: 1px solid #ddd; padding-bottom: 3px; }
.caption, .muted { color: #555; } .note { background: #fff6dd; border-left: 4px solid #e0a800;
     padding: 4px 10px; margin: 6px 0; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; position: sticky; top: 0; } td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #fafafa; } td.warn { color: #a15c00; text-align: left; }
figure { margin: 12px 0 24px; } figure svg { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; } details { margin: 3px 0; } summary { cursor: pointer; }
.wide { overflow-x: auto; }
"""

COLUMNS = (("id", "point", True), ("model", "model", True), ("backend", "backend", True),
           ("precision", "precision", True), ("mode", "mode", True), ("seq", "seq", False),
           ("batch", "batch", False), ("instances", "instances", False),
           ("cores_per_instance", "cores/inst", False), ("idle_cores", "idle cores", False),
           ("smt", "smt", True), ("setup", "setup", True), ("repetition", "rep", False),
           ("status", "status", True),
           ("latency_p50_ms", "latency p50 ms", False), ("max_latency_p50_ms", "max latency p50 ms", False),
           ("max_latency_p90_ms", "max latency p90 ms", False), ("throughput", "samples/s (window)", False),
           ("throughput_sum", "samples/s (sum)", False),
           ("padding_overhead", "padding (padded / real tokens)", False), ("warnings", "warnings", True))


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.3f}"
    return str(v)


def inline_svg(text: str) -> str:
    """An SVG file as an element to inline: no XML prolog, doctype, metadata or namespace URLs
    (the HTML parser needs none of them, and the page must name no outside address)."""
    text = re.sub(r"<\?xml[^>]*\?>", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>", "", text, flags=re.S)
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return text.strip()


def machine_summary(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) facts of the machine a results document recorded."""
    m = doc.get("machine") or {}
    env = doc.get("environment") or {}
    cores = m.get("cores") or []
    cpus = m.get("cpus") or {}
    tpc = max((len(c.get("cpus") or []) for c in cores), default=0)
    out = [("CPU", m.get("model_name") or "unknown"), ("host", env.get("hostname") or "?"),
           ("kernel", env.get("kernel") or "?"), ("packages (sockets)", str(len(m.get("packages") or []))),
           ("physical cores", str(len(cores))), ("threads per core", str(tpc)),
           ("online CPUs", format_cpulist(cpus.get("online") or []) or "?"),
           ("usable CPUs", format_cpulist(cpus.get("usable") or []) or "?"),
           ("L3 domains", str(len(m.get("l3_domains") or [])))]
    for n in m.get("nodes") or []:
        mem = n.get("memory_bytes")
        desc = f"CPUs {format_cpulist(n.get('cpus') or []) or 'none (memory only)'}"
        if mem:
            desc += f", {mem / 2**30:.1f} GiB"
        if n.get("distances"):
            desc += f", distances {' '.join(map(str, n['distances']))}"
        out.append((f"NUMA node {n.get('id')}", desc))
    if m.get("cgroup_cpu_quota"):
        out.append(("cgroup CPU quota", str(m["cgroup_cpu_quota"])))
    vers = env.get("versions") or {}
    if vers:
        out.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))))
    for w in m.get("warnings") or []:
        out.append(("warning", str(w)))
    return out


def _plan_table(doc: dict[str, Any]) -> str:
    plan = doc.get("plan") or {}
    rows = "".join(
        f"<tr><td>{_e(i.get('id'))}</td><td class=l>{_e(i.get('cpus'))}</td>"
        f"<td class=l>{_e(','.join(map(str, i.get('memory_nodes') or [])))}</td>"
        f"<td>{_e(i.get('threads'))}</td><td>{_e(i.get('batch'))}</td></tr>"
        for i in plan.get("instances") or [])
    return ("<table><tr><th>instance</th><th class=l>CPUs</th><th class=l>memory nodes</th>"
            f"<th>threads</th><th>batch</th></tr>{rows}</table>")


def render_html(rs, rows: list[dict[str, Any]], plots, cap: str, out: Path) -> str:
    """The page, from the result set, its rows and the SVG files already written in `out`."""
    name = (rs.manifest or {}).get("name") or rs.folder.resolve().name
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
             f"<meta name=viewport content='width=device-width, initial-scale=1'>"
             f"<title>numabench report: {_e(name)}</title><style>{CSS}</style></head><body>",
             f"<h1>numabench report: {_e(name)}</h1>", f"<p class=caption>{_e(cap)}</p>"]
    if rs.manifest and rs.manifest.get("description"):
        parts.append(f"<p>{_e(rs.manifest['description'])}</p>")
    for note in rs.notes:
        parts.append(f"<p class=note>{_e(note)}</p>")
    parts.append("<h2>Machine</h2><table>" + "".join(
        f"<tr><th class=l>{_e(k)}</th><td class=l>{_e(v)}</td></tr>"
        for k, v in machine_summary(rs.docs[0][1])) + "</table>")
    parts.append("<h2>Figures</h2>")
    if not plots:
        parts.append("<p class=muted>No figure: a figure needs two or more values on its x axis "
                     "(cores or instances).</p>")
    for p in plots:
        svg = (out / f"{p.name}.svg").read_text(encoding="utf-8")
        notes = "; ".join(p.notes)
        parts.append(f"<figure id='fig-{_e(p.name)}'>{inline_svg(svg)}<figcaption>{_e(p.title)}"
                     f"{': ' + _e(notes) if notes else ''}. Also as {_e(p.name)}.png and "
                     f"{_e(p.name)}.svg.</figcaption></figure>")
    head = "".join(f"<th class={'l' if left else 'r'}>{_e(h)}</th>" for _, h, left in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for k, _, left in COLUMNS:
            cls = "warn" if k == "warnings" and r[k] else ("l" if left else "r")
            title = f" title='{_e(r['warning_messages'])}'" if k == "warnings" and r[k] else ""
            cells.append(f"<td class={cls}{title}>{_e(_num(r[k]))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("<h2>Points</h2><p class=muted>Latencies in ms, throughputs in samples/s; max "
                 "latency is a step's (its slowest instance's) latency. Setup: pinned (the plan's "
                 "binding), unpinned (the same split, no binding), out of the box (one process, no "
                 "binding, framework thread defaults). Idle cores: usable physical cores the point "
                 "leaves unused. Hover a warning for the full message.</p>")
    parts.append(f"<div class=wide><table><tr>{head}</tr>{''.join(body)}</table></div>")
    parts.append("<h2>Plans</h2>")
    for (_, doc), r in zip(rs.docs, rows):
        parts.append(f"<details><summary>{_e(r['id'])}: {_e(r['instances'])} instance(s) x "
                     f"{_e(r['cores_per_instance'])} core(s), batch {_e(r['batch'])}, seq "
                     f"{_e(r['seq'])}</summary>{_plan_table(doc)}</details>")
    parts.append("<p class=muted>Written by numabench report; self-contained (no scripts, no "
                 "outside files).</p></body></html>")
    return "\n".join(parts) + "\n"


DISPATCH_HTML_COLUMNS = (("plan", "plan", True), ("shape", "pools (range: instances x cores)", True),
                         ("pad", "pad", True), ("offered_rate", "offered/s", False),
                         ("repetition", "rep", False), ("status", "status", True),
                         ("requests", "requests", False), ("ok", "ok", False), ("busy", "busy", False),
                         ("error", "errors", False), ("lost", "lost", False),
                         ("throughput", "served/s", False), ("latency_p50_ms", "p50 ms", False),
                         ("latency_p90_ms", "p90 ms", False), ("latency_p99_ms", "p99 ms", False),
                         ("padding_overhead", "padding +%", False), ("pools", "per pool", True),
                         ("tags", "warnings", True))


def render_dispatch_html(manifest: dict[str, Any], docs, rows: list[dict[str, Any]], plots,
                         cap: str, notes: list[str], out: Path) -> str:
    """A dispatch experiment's page: caption, machine, the two figures, the table, each plan."""
    name = manifest.get("name") or out.resolve().parent.name
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
             f"<meta name=viewport content='width=device-width, initial-scale=1'>"
             f"<title>numabench report: {_e(name)}</title><style>{CSS}</style></head><body>",
             f"<h1>numabench report: {_e(name)} (dispatch)</h1>", f"<p class=caption>{_e(cap)}</p>"]
    if manifest.get("description"):
        parts.append(f"<p>{_e(manifest['description'])}</p>")
    parts += [f"<p class=note>{_e(n)}</p>" for n in notes]
    parts.append("<h2>Machine</h2><table>" + "".join(
        f"<tr><th class=l>{_e(k)}</th><td class=l>{_e(v)}</td></tr>"
        for k, v in machine_summary(docs[0][1])) + "</table>")
    parts.append("<h2>Figures</h2>")
    for p in plots:
        svg = (out / f"{p.name}.svg").read_text(encoding="utf-8")
        parts.append(f"<figure id='fig-{_e(p.name)}'>{inline_svg(svg)}<figcaption>{_e(p.title)}: "
                     f"{_e('; '.join(p.notes))}. Also as {_e(p.name)}.png and {_e(p.name)}.svg."
                     "</figcaption></figure>")
    head = "".join(f"<th class={'l' if left else 'r'}>{_e(h)}</th>" for _, h, left in DISPATCH_HTML_COLUMNS)
    body = []
    for r in rows:
        cells = []
        for k, _, left in DISPATCH_HTML_COLUMNS:
            if k == "tags" and r[k]:
                cells.append(f"<td class=warn title='{_e(r['warnings'])}'>{_e(r[k])}</td>")
            else:
                cells.append(f"<td class={'l' if left else 'r'}>{_e(_num(r[k]))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("<h2>Points</h2><p class=muted>Latency in ms from each request's scheduled send "
                 "to its reply; served/s over the stream's window; padding: padded tokens over "
                 "the requests' own tokens. Hover a warning for the full message.</p>")
    parts.append(f"<div class=wide><table><tr>{head}</tr>{''.join(body)}</table></div>")
    parts.append("<h2>Plans</h2>")
    seen = set()
    for _, doc in docs:
        plan = doc["point"]["plan"]
        if plan in seen:
            continue
        seen.add(plan)
        parts.append(f"<details><summary>{_e(plan)}: {_e(doc['point'].get('shape'))}</summary>"
                     f"{_plan_table(doc)}</details>")
    parts.append("<p class=muted>Written by numabench report; self-contained (no scripts, no "
                 "outside files).</p></body></html>")
    return "\n".join(parts) + "\n"
