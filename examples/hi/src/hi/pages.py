"""The `/` and `/krillin` pages: what the seed's page showed (self, nodes, service),
plus singleton holders and job runs. Server-rendered; every value is escaped."""

from __future__ import annotations

import json
from html import escape
from typing import Any

# The page re-fetches itself every 2 s and swaps <main>: the server stays the
# only renderer (and the only escaper), and the page works without JS too.
_REFRESH = """
<script>
setInterval(async () => {
  try {
    const response = await fetch(location.href, {cache: "no-store"});
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    document.querySelector("main").replaceWith(page.querySelector("main"));
  } catch (error) {
    document.querySelector("#updated").textContent = "node unreachable";
  }
}, 2000);
</script>
"""

_STYLE = """
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 56rem;
       padding: 0 1rem; color: #1d2330; }
h1 { margin-bottom: .2rem; } .sub { color: #5b6475; margin-top: 0; }
section { margin: 1.4rem 0; } h2 { font-size: 1.05rem; margin-bottom: .4rem; }
table { border-collapse: collapse; width: 100%; }
td, th { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #e3e6ec; }
code { background: #f2f4f8; padding: .05rem .3rem; border-radius: 3px; }
.ok { color: #137333; } .bad { color: #b3261e; } .muted { color: #8a93a5; }
</style>
"""


def render_page(cluster: dict[str, Any], route: str) -> str:
    """The whole HTML page for `route` ("/" or "/krillin") from a /cluster snapshot."""
    service = escape(str(cluster.get("service", "")))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>hi · {service}</title>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"{_STYLE}</head><body><main>{_main(cluster, route)}</main>{_REFRESH}</body></html>"
    )


def _main(cluster: dict[str, Any], route: str) -> str:
    node = escape(str(cluster.get("node", "")))
    service = escape(str(cluster.get("service", "")))
    ready = (
        '<span class="ok">ready</span>'
        if cluster.get("ready")
        else '<span class="bad">not ready</span>'
    )
    peers = cluster.get("nodes") or []
    peer_items = "".join(f"<li><code>{escape(str(p))}</code></li>" for p in peers)
    return (
        f"<h1>hi from <code>{node}</code></h1>"
        f'<p class="sub">service <b>{service}</b> · route <code>{escape(route)}</code>'
        f" · {ready} · cookie <code>{escape(str(cluster.get('cookie', '')))}</code></p>"
        "<section><h2>This node</h2>"
        f"<p id=self><code>{node}</code></p></section>"
        f"<section><h2>Connected nodes ({len(peers)})</h2>"
        + (f"<ul id=nodes>{peer_items}</ul>" if peers else '<p class="muted">none</p>')
        + "</section><section><h2>Singletons</h2>"
        + _singletons(cluster.get("singletons") or {})
        + "</section><section><h2>Jobs</h2>"
        + _jobs(cluster.get("jobs") or [])
        + "</section><section><h2>Recent runs</h2>"
        + _runs(cluster.get("jobs") or [])
        + '</section><p class="muted" id=updated>refreshes every 2 s</p>'
    )


def _singletons(singletons: dict[str, Any]) -> str:
    if not singletons:
        return '<p class="muted">none registered</p>'
    rows = "".join(
        f"<tr><td>{escape(str(name))}</td><td><code>{escape(str(holder or '-'))}</code></td></tr>"
        for name, holder in sorted(singletons.items())
    )
    return f"<table><tr><th>name</th><th>holder</th></tr>{rows}</table>"


# The job columns a person reads; the rest stays in /cluster.
_JOB_COLUMNS = (
    ("name", "job"),
    ("schedule", "schedule"),
    ("last_run", "last run"),
    ("ran_on", "ran on"),
    ("last_status", "status"),
    ("next_run", "next run"),
    ("runs", "runs"),
)


def _jobs(jobs: list[Any]) -> str:
    if not jobs:
        return '<p class="muted">none scheduled</p>'
    head = "".join(f"<th>{escape(title)}</th>" for _, title in _JOB_COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(job.get(key))}</td>" for key, _ in _JOB_COLUMNS) + "</tr>"
        for job in jobs
        if isinstance(job, dict)
    )
    return f"<table id=jobs><tr>{head}</tr>{rows}</table>"


RECENT_RUNS = 10


def _runs(jobs: list[Any]) -> str:
    """The newest runs of every job, on any node (each job row carries its history)."""
    runs = [
        run
        for job in jobs
        if isinstance(job, dict)
        for run in job.get("history") or []
        if isinstance(run, dict)
    ]
    runs.sort(key=lambda run: str(run.get("started_at")), reverse=True)
    if not runs:
        return '<p class="muted">none yet</p>'
    rows = "".join(
        f"<tr><td>{_cell(run.get('job'))}</td><td>{_cell(run.get('tick'))}</td>"
        f"<td><code>{_cell(run.get('node'))}</code></td>"
        f"<td>{_cell(round(float(run.get('duration') or 0) * 1000, 1))} ms</td>"
        f"<td>{_cell(run.get('status'))}</td>"
        f"<td>{_cell(_attempts(run.get('attempts')))}</td><td>{_cell(run.get('error'))}</td></tr>"
        for run in runs[:RECENT_RUNS]
    )
    head = "".join(
        f"<th>{t}</th>" for t in ("job", "tick", "node", "took", "status", "tries", "error")
    )
    return f"<table id=runs><tr>{head}</tr>{rows}</table>"


def _attempts(value: Any) -> str:
    return f"{value} attempt" + ("" if value == 1 else "s")


def _cell(value: Any) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if isinstance(value, str) and len(value) >= 19 and value[10] == "T":
        text = value[11:19] + " UTC"  # an ISO time stamp: the time of day is what changes
    return escape(text)
