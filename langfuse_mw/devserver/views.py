"""Server-rendered HTML for the trace viewer; all span content is untrusted and escaped."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from html import escape
from typing import Any

from .store import Store

__all__ = ["render", "render_trace", "render_trace_list"]

PAGE_SIZE = 50
_BACK = '<p><a href="/">All traces</a></p>'

_CSS = """
:root { --fg:#1d2433; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#111827; color:#fff; padding:10px 24px; display:flex; gap:16px;
         align-items:baseline; }
header a { color:#fff; text-decoration:none; font-weight:600; }
header span { color:#9ca3af; font-size:12px; }
main { padding:16px 24px; max-width:1400px; }
h1 { font-size:20px; margin:4px 0 12px; word-break:break-all; }
h2 { font-size:15px; margin:20px 0 8px; }
a { color:var(--accent); }
table { border-collapse:collapse; width:100%; background:#fff; border:1px solid var(--line); }
th, td { text-align:left; padding:7px 10px; border-bottom:1px solid var(--line);
         vertical-align:top; }
th { font-size:12px; text-transform:uppercase; letter-spacing:.03em; color:var(--muted);
     background:#f1f5f9; }
tr:hover td { background:#f8fafc; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
.muted { color:var(--muted); }
.mono { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12px; }
form.filters { display:flex; gap:8px; margin:0 0 12px; align-items:center; flex-wrap:wrap; }
form.filters input { padding:5px 8px; border:1px solid #cbd5e1; border-radius:4px; }
form.filters button { padding:5px 12px; border:0; border-radius:4px; background:var(--accent);
                      color:#fff; cursor:pointer; }
.badge { display:inline-block; padding:1px 7px; border-radius:10px; font-size:11px;
         font-weight:600; background:#e5e7eb; color:#374151; white-space:nowrap; }
.level-ERROR { background:#fee2e2; color:#b91c1c; }
.level-WARNING { background:#fef3c7; color:#92400e; }
.level-DEBUG { background:#f3f4f6; color:#6b7280; }
.level-DEFAULT { background:#dcfce7; color:#166534; }
.type { background:#e0e7ff; color:#3730a3; }
.summary { display:grid; grid-template-columns:max-content 1fr; gap:4px 16px;
           background:#fff; border:1px solid var(--line); padding:12px 16px; }
.summary dt { color:var(--muted); }
.summary dd { margin:0; word-break:break-all; }
pre { background:#0f172a; color:#e2e8f0; padding:10px 12px; border-radius:6px; overflow:auto;
      max-height:360px; margin:4px 0 10px; font-size:12px; white-space:pre-wrap;
      word-break:break-word; }
ul.tree { list-style:none; margin:0; padding-left:0; }
ul.tree ul.tree { padding-left:20px; border-left:1px dashed #cbd5e1; margin-left:8px; }
li.obs > details > summary { list-style:none; cursor:pointer; }
li.obs > details > summary::-webkit-details-marker { display:none; }
.row { display:flex; align-items:center; gap:8px; padding:5px 8px; background:#fff;
       border:1px solid var(--line); border-radius:4px; margin:3px 0; }
.row:hover { border-color:#93c5fd; }
.row .name { flex:1; min-width:0; overflow:hidden; text-overflow:ellipsis;
             white-space:nowrap; font-weight:500; }
.row .dur { width:80px; text-align:right; font-variant-numeric:tabular-nums;
            color:var(--muted); font-size:12px; }
.timeline { position:relative; width:420px; height:12px; background:#f1f5f9;
            border-radius:3px; flex:none; }
.bar { position:absolute; top:1px; bottom:1px; min-width:2px; border-radius:2px;
       background:#60a5fa; }
.bar.level-ERROR { background:#ef4444; }
.bar.level-WARNING { background:#f59e0b; }
.detail { padding:6px 10px 8px; background:#fff; border:1px solid var(--line);
          border-top:0; margin:-3px 0 6px; font-size:13px; }
.pager { margin:12px 0; display:flex; gap:12px; align-items:center; }
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · langfuse-mw devserver</title><style>{_CSS}</style></head>"
        '<body><header><a href="/">langfuse-mw devserver</a>'
        "<span>local Langfuse-compatible receiver</span></header>"
        f"<main>{body}</main></body></html>\n"
    )


def _time(iso: Any) -> str:
    if not isinstance(iso, str):
        return ""
    return iso.replace("T", " ").rstrip("Z")[:23]


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _level(level: Any) -> str:
    text = str(level or "DEFAULT")
    css = text if text in ("ERROR", "WARNING", "DEBUG", "DEFAULT") else "DEFAULT"
    return f'<span class="badge level-{css}">{escape(text)}</span>'


def _json_block(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    return f"<pre>{escape(text)}</pre>"


def _link(path: str, params: Mapping[str, Any]) -> str:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return escape(f"{path}?{query}" if query else path)


def render(store: Store, path: str, query: Mapping[str, str]) -> tuple[int, str]:
    """Route a viewer path to its page: ``/`` or ``/trace/{id}``; 404 otherwise."""
    if path == "/":
        return 200, render_trace_list(store, query)
    if path.startswith("/trace/"):
        trace = store.get_trace(urllib.parse.unquote(path[len("/trace/") :]))
        if trace is not None:
            return 200, render_trace(trace)
        return 404, _page("Not found", f"<h1>Trace not found</h1>{_BACK}")
    return 404, _page("Not found", f"<h1>Not found</h1>{_BACK}")


def render_trace_list(store: Store, query: Mapping[str, str]) -> str:
    """The trace list, newest first, filtered by ``userId`` / ``sessionId`` query params."""
    user, session = query.get("userId") or None, query.get("sessionId") or None
    try:
        page = max(1, int(query.get("page") or 1))
    except ValueError:
        page = 1
    traces, total = store.list_traces(user_id=user, session_id=session, page=page,
                                      limit=PAGE_SIZE)  # fmt: skip
    rows = []
    for trace in traces:
        href = escape("/trace/" + urllib.parse.quote(trace["id"], safe=""))
        name = trace.get("name") or "(unnamed)"
        user_cell = session_cell = '<span class="muted">-</span>'
        if trace.get("userId"):
            user_cell = (f'<a href="{_link("/", {"userId": trace["userId"]})}">'
                         f'{escape(trace["userId"])}</a>')  # fmt: skip
        if trace.get("sessionId"):
            session_cell = (f'<a href="{_link("/", {"sessionId": trace["sessionId"]})}">'
                            f'{escape(trace["sessionId"])}</a>')  # fmt: skip
        rows.append(
            f'<tr class="trace-row" data-trace-id="{escape(trace["id"])}">'
            f'<td class="mono">{escape(_time(trace.get("timestamp")))}</td>'
            f'<td><a class="trace-link" href="{href}">{escape(name)}</a></td>'
            f"<td>{user_cell}</td><td>{session_cell}</td>"
            f"<td>{_level(trace.get('level'))}</td>"
            f'<td class="num">{escape(_duration(trace.get("latency")))}</td>'
            f'<td class="num">{int(trace.get("observationCount") or 0)}</td></tr>'
        )
    table = (
        "<table><thead><tr><th>Time (UTC)</th><th>Name</th><th>User</th><th>Session</th>"
        "<th>Level</th><th>Duration</th><th>Obs.</th></tr></thead><tbody>"
        + ("".join(rows) or '<tr><td colspan="7" class="muted">No traces yet.</td></tr>')
        + "</tbody></table>"
    )
    filters = (
        '<form class="filters" method="get" action="/">'
        f'<input name="userId" placeholder="user id" value="{escape(user or "")}">'
        f'<input name="sessionId" placeholder="session id" value="{escape(session or "")}">'
        '<button type="submit">Filter</button> <a href="/">clear</a>'
        f'<span class="muted">{total} trace(s)</span></form>'
    )
    pages = max(1, -(-total // PAGE_SIZE))
    pager = ""
    if pages > 1:
        base = {"userId": user, "sessionId": session}
        prev = (f'<a href="{_link("/", {**base, "page": page - 1})}">&larr; newer</a>'
                if page > 1 else "")  # fmt: skip
        nxt = (f'<a href="{_link("/", {**base, "page": page + 1})}">older &rarr;</a>'
               if page < pages else "")  # fmt: skip
        pager = f'<div class="pager">{prev}<span>page {page} of {pages}</span>{nxt}</div>'
    return _page("Traces", f"<h1>Traces</h1>{filters}{table}{pager}")


def _children(observations: Sequence[Mapping[str, Any]]) -> dict[str | None, list[Any]]:
    ids = {o["id"] for o in observations}
    children: dict[str | None, list[Any]] = {}
    for obs in sorted(observations, key=lambda o: o.get("startTimeUnixNano") or 0):
        parent = obs.get("parentObservationId")
        # A parent outside this trace (another service, not exported) shows as a root.
        children.setdefault(parent if parent in ids else None, []).append(obs)
    return children


def _observation_detail(obs: Mapping[str, Any]) -> str:
    parts = ['<div class="detail">']
    facts = [
        ("id", obs.get("id")),
        ("start", _time(obs.get("startTime"))),
        ("end", _time(obs.get("endTime"))),
        ("model", obs.get("model")),
        ("status message", obs.get("statusMessage")),
    ]
    parts.append('<dl class="summary">')
    for label, value in facts:
        if value:
            parts.append(f'<dt>{escape(label)}</dt><dd class="mono">{escape(str(value))}</dd>')
    parts.append("</dl>")
    for label, key in (("Input", "input"), ("Output", "output"), ("Metadata", "metadata")):
        if obs.get(key) not in (None, "", {}):
            parts.append(f"<h2>{label}</h2>{_json_block(obs[key])}")
    if obs.get("usageDetails"):
        parts.append(f"<h2>Usage</h2>{_json_block(obs['usageDetails'])}")
    parts.append("</div>")
    return "".join(parts)


def _row(obs: Mapping[str, Any], origin: int, span: int) -> str:
    start = int(obs.get("startTimeUnixNano") or origin)
    end = max(start, int(obs.get("endTimeUnixNano") or start))
    left = 100.0 * (start - origin) / span
    width = max(0.3, 100.0 * (end - start) / span)
    level = str(obs.get("level") or "DEFAULT")
    return (
        '<div class="row">'
        f'<span class="badge type">{escape(str(obs.get("type") or "SPAN"))}</span>'
        f'<span class="name obs-name">{escape(str(obs.get("name") or ""))}</span>'
        f"{_level(level) if level != 'DEFAULT' else ''}"
        f'<span class="dur">{escape(_duration((end - start) / 1e9))}</span>'
        f'<span class="timeline"><span class="bar level-{escape(level)}" '
        f'style="left:{min(left, 99.7):.2f}%;width:{min(width, 100 - left):.2f}%">'
        "</span></span></div>"
    )


def _tree(children: Mapping[str | None, list[Any]], origin: int, span: int) -> str:
    """The observation tree as nested lists, children under their parents.

    Iterative, not recursive: a chain of spans thousands deep (recursive code, or a hostile
    batch) must render, not exhaust the interpreter's stack.
    """
    out: list[str] = []
    # Each frame: the observations still to write at one depth.
    stack: list[tuple[Iterator[Any], int]] = [(iter(children.get(None, [])), 0)]
    if children.get(None):
        out.append('<ul class="tree">')
    while stack:
        pending, depth = stack[-1]
        obs = next(pending, None)
        if obs is None:
            stack.pop()
            out.append("</ul>")
            if stack:
                out.append("</li>")  # the parent whose children these were
            continue
        out.append(
            f'<li class="obs" data-observation-id="{escape(obs["id"])}" data-depth="{depth}">'
            f"<details><summary>{_row(obs, origin, span)}</summary>"
            f"{_observation_detail(obs)}</details>"
        )
        kids = children.get(obs["id"])
        if kids:
            out.append('<ul class="tree">')
            stack.append((iter(kids), depth + 1))
        else:
            out.append("</li>")
    return "".join(out) if children.get(None) else ""


def render_trace(trace: Mapping[str, Any]) -> str:
    """One trace: summary, input/output/metadata, and the observation tree with timing bars."""
    observations = trace.get("observations") or []
    starts = [int(o.get("startTimeUnixNano") or 0) for o in observations]
    ends = [int(o.get("endTimeUnixNano") or 0) for o in observations]
    origin = min(starts) if starts else 0
    span = max(1, max(starts + ends, default=0) - origin)
    facts = [
        ("Trace id", trace.get("id")),
        ("Time (UTC)", _time(trace.get("timestamp"))),
        ("Duration", _duration(trace.get("latency"))),
        ("User", trace.get("userId")),
        ("Session", trace.get("sessionId")),
        ("Environment", trace.get("environment")),
        ("Release", trace.get("release")),
        ("Version", trace.get("version")),
        ("Tags", ", ".join(trace.get("tags") or [])),
    ]
    summary = ['<dl class="summary">']
    for label, value in facts:
        if value:
            summary.append(f"<dt>{escape(label)}</dt><dd>{escape(str(value))}</dd>")
    summary.append(f"<dt>Level</dt><dd>{_level(trace.get('level'))}</dd></dl>")
    io = []
    for label, key in (("Trace input", "input"), ("Trace output", "output"),
                       ("Trace metadata", "metadata")):  # fmt: skip
        if trace.get(key) not in (None, "", {}):
            io.append(f"<h2>{label}</h2>{_json_block(trace[key])}")
    tree = _tree(_children(observations), origin, span)
    body = (
        '<p><a href="/">&larr; all traces</a></p>'
        f"<h1>{escape(str(trace.get('name') or '(unnamed trace)'))}</h1>"
        + "".join(summary)
        + f"<h2>Observations ({len(observations)})</h2>"
        + '<p class="muted">Click an observation for its input, output and metadata.</p>'
        + f'<div id="observations">{tree}</div>'
        + f'<div id="trace-io">{"".join(io)}</div>'
    )
    return _page(str(trace.get("name") or "Trace"), body)
