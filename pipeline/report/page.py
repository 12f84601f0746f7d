"""The report page: one self-contained HTML file (bokeh's JS and CSS inline, images as data URIs).

Sections, in order: the flagged pairs (outliers and failures) first, then the runs, the cohort
plots, the pair panels (flagged, requested and worst pairs) and the table of every pair.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr
from bokeh.embed import file_html
from bokeh.resources import INLINE

from ..analysis import SUMMARY_COLUMNS, open_results, status_counts, summary_table, worst_pairs
from ..store import read_layout, stored_attrs
from .flags import MIN_PAIRS, Z_THRESHOLD, MetricStats, flag_order, flag_pairs
from .panels import load_pair_images, render_panel
from .plots import label_heatmap, metric_figure, status_figure
from .provenance import run_summaries, store_summary

__all__ = ["write_html_report", "ReportContent", "report_content"]

log = logging.getLogger(__name__)

REPORT_COLUMNS = SUMMARY_COLUMNS + ("method", "config_hash", "host", "started", "finished")

_CSS = """
main { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 1.2em 2em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
p.counts { color: #444; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #d0d0d0; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #f8d0d0; } tr.failed td.status { color: #a00; font-weight: 600; }
tr.outlier td { background: #fff1c6; } tr.incomplete td { background: #e8e8e8; }
span.flag, span.error { display: block; } span.error { color: #a00; font-family: ui-monospace, monospace; }
ul.runs li { margin-bottom: 0.3em; font-size: 0.9em; } .note { color: #666; font-size: 0.9em; }
div.plots { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure.pair { margin: 1em 0 2em 0; } figure.pair img { border: 1px solid #ddd; }
figure.pair figcaption { font-size: 0.9em; margin-top: 0.3em; max-width: 900px; }
details { margin: 0.5em 0; }
"""

_TEMPLATE = """
{% from macros import embed %}
{% block postamble %}<style>{{ report_css }}</style>{% endblock %}
{% block contents %}
<main>
{% for kind, value in report_blocks %}{% if kind == "html" %}{{ value }}{% else %}{{ embed(roots[value]) }}{% endif %}
{% endfor %}
</main>
{% endblock %}
"""


def _e(v: object) -> str:
    return html.escape(str(v))


def _num(v: object, fmt: str = "{:.4g}") -> str:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return _e(v)
    return "" if not np.isfinite(f) else fmt.format(f)


def _row_class(status: str, outlier: bool) -> str:
    if status == "failed":
        return "failed"
    if status in ("running", "interrupted"):
        return "incomplete"
    return "outlier" if outlier else ""


@dataclass
class ReportContent:
    """What the report shows, before it becomes HTML."""

    ds: xr.Dataset
    table: pd.DataFrame
    flags: pd.DataFrame
    stats: dict[str, MetricStats]
    flagged: list[str]                 # outlier pair ids, most extreme first
    failed: list[str]
    incomplete: list[str]
    shown: dict[str, list[str]] = field(default_factory=dict)  # pair id -> why its panel is shown


def report_content(store: str | Path, metric: str = "dice_after", max_pairs: int = 5,
                   pairs: Sequence[int | str] = ()) -> ReportContent:
    """Flags and the pairs to show (flagged, then ``pairs``, then the ``max_pairs`` worst by ``metric``)."""
    ds = open_results(store)
    layout = read_layout(store)
    table = summary_table(ds, REPORT_COLUMNS)
    flags, stats = flag_pairs(table)
    status = table["status"].astype(str)
    content = ReportContent(ds, table, flags, stats, flag_order(flags),
                            [str(p) for p in table.index[status == "failed"]],
                            [str(p) for p in table.index[status.isin(["running", "interrupted"])]])
    for pid in content.flagged:
        content.shown.setdefault(pid, []).append("flagged")
    for p in pairs:
        pid = layout.pairs[layout.index(int(p) if str(p).isdigit() else p)].pair_id
        content.shown.setdefault(pid, []).append("requested")
    if max_pairs > 0:
        for pid in worst_pairs(ds, metric, max_pairs).index:
            content.shown.setdefault(str(pid), []).append(f"worst {max_pairs} by {metric}")
    return content


# ------------------------------------------------------------------ sections
def _flagged_section(c: ReportContent, anchors: set[str]) -> str:
    out = ["<h2 id='flagged'>Flagged pairs</h2>"]
    n_complete = int((c.table["status"] == "complete").sum())
    if not c.stats:
        out.append(f"<p class='note'>Outlier flags need at least {MIN_PAIRS} complete pairs with a metric; "
                   f"this store has {n_complete} complete pair(s).</p>")
    rows = []
    by_pair = {pid: g for pid, g in c.flags.groupby("pair_id", sort=False)} if len(c.flags) else {}
    for pid in c.flagged + c.failed + c.incomplete:
        r = c.table.loc[pid]
        st = str(r["status"])
        if pid in by_pair:
            why = "".join(f"<span class='flag' data-metric='{_e(f.metric)}'>{_e(f.reason)}</span>"
                          for f in by_pair[pid].itertuples())
        elif st == "failed":
            why = f"<span class='error'>{_e(r.get('error', '') or 'failed (no message)')}</span>"
        else:
            why = f"<span class='flag'>not finished (status {_e(st)}); a rerun redoes it</span>"
        name = f"<a href='#pair-{_e(pid)}'>{_e(pid)}</a>" if pid in anchors else _e(pid)
        rows.append(f"<tr class='{_row_class(st, pid in by_pair)}' data-pair='{_e(pid)}'><td>{name}</td>"
                    f"<td>{_e(r.get('fixed', ''))}</td><td>{_e(r.get('moving', ''))}</td>"
                    f"<td class='status'>{_e(st)}</td><td>{why}</td></tr>")
    if rows:
        out.append("<table id='flagged-pairs'><thead><tr><th>pair</th><th>fixed</th><th>moving</th><th>status</th>"
                   "<th>reason (metric = value, cohort median, robust z) or error</th></tr></thead><tbody>"
                   + "".join(rows) + "</tbody></table>")
    else:
        out.append("<p id='no-flags'>No pair is flagged: no outlier, no failure.</p>")
    if c.stats:
        srows = "".join(
            f"<tr><td>{_e(m)}</td><td>{_e(s.rule.label)}</td><td>{_e(s.rule.side)}</td><td class='num'>{s.n}</td>"
            f"<td class='num'>{_num(s.median)}</td><td class='num'>{_num(s.scale)}</td>"
            f"<td class='num'>{_num(s.lower)}</td><td class='num'>{_num(s.upper)}</td></tr>" for m, s in c.stats.items())
        out.append(
            "<details><summary>How pairs are flagged</summary><p class='note'>Over the complete pairs, each metric's "
            f"robust z-score is (value &minus; median) / s with s = 1.4826 &times; MAD (1.2533 &times; mean absolute "
            f"deviation when the MAD is 0), never below the rule's floor; a pair is flagged when |z| &gt; {Z_THRESHOLD:g} "
            "on the bad side of the metric. Failed and unfinished pairs are listed after the outliers.</p>"
            "<table><thead><tr><th>metric</th><th>meaning</th><th>bad side</th><th>pairs</th><th>median</th>"
            f"<th>scale s</th><th>flag below</th><th>flag above</th></tr></thead><tbody>{srows}</tbody></table></details>")
    return "\n".join(out)


def _runs_section(store: str | Path, table: pd.DataFrame) -> str:
    lines = store_summary(stored_attrs(store), table)
    runs = run_summaries(store)
    out = ["<h2 id='runs'>Runs</h2>", "<ul class='runs'>" + "".join(f"<li>{_e(s)}</li>" for s in lines) + "</ul>"]
    if runs:
        out.append("<ul class='runs' id='run-log'>" + "".join(f"<li>{_e(s)}</li>" for s in runs) + "</ul>")
    else:
        out.append("<p class='note'>No run logs (STORE/logs/run-*.jsonl): the pairs were not registered by "
                   "<code>cohortreg run</code>.</p>")
    return "\n".join(out)


def _figures(c: ReportContent) -> list:
    t = c.table
    flagged_on = {m: set(g["pair_id"]) for m, g in c.flags.groupby("metric")} if len(c.flags) else {}

    def has(m: str) -> bool:
        return m in t and t[m].dtype.kind == "f" and bool(np.isfinite(t[m].to_numpy(dtype=float)).any())

    figs = [status_figure(status_counts(c.ds), name="status")]
    specs = [("dice_after", "mean Dice per pair, before (grey) and after", "dice_before", 1.0, ""),
             ("ncc_after", "NCC per pair, before (grey) and after", "ncc_before", 1.0, ""),
             ("tre_after", "landmark error per pair, before (grey) and after", "tre_before", 1.0, "mm"),
             ("jac_min", "minimum Jacobian determinant", None, 1.0, ""),
             ("jac_nonpositive", "folding voxels (det J <= 0)", None, 100.0, "%"),
             ("runtime_s", "task runtime", None, 1.0, "s")]
    for m, title, before, scale, unit in specs:
        if has(m):
            figs.append(metric_figure(t, m, title, c.stats.get(m), flagged_on.get(m, set()), before, scale, unit,
                                      name=m))
    ds = c.ds
    if "dice_label_after" in ds and ds["dice_label_after"].size and np.isfinite(ds["dice_label_after"].values).any():
        figs.append(label_heatmap(ds["dice_label_after"].values, list(t.index),
                                  [int(v) for v in ds["label"].values], "Dice per label after registration",
                                  name="dice_label_after"))
    return figs


def _caption(pid: str, r: pd.Series, why: list[str], c: ReportContent, notes: list[str]) -> str:
    fold = r.get("jac_nonpositive", np.nan)
    bits = [f"<b>{_e(pid)}</b>: fixed {_e(r.get('fixed', ''))}, moving {_e(r.get('moving', ''))}",
            f"Dice {_num(r.get('dice_before'), '{:.3f}')} &rarr; {_num(r.get('dice_after'), '{:.3f}')}",
            f"NCC after {_num(r.get('ncc_after'), '{:.4f}')}",
            f"folding {_num(float(fold) * 100 if np.isfinite(fold) else np.nan, '{:.3f}')} %",
            f"min det J {_num(r.get('jac_min'), '{:.3f}')}",
            "shown: " + _e(", ".join(why))]
    flags = c.flags[c.flags["pair_id"] == pid] if len(c.flags) else c.flags
    text = " &middot; ".join(bits)
    if len(flags):
        text += "<br>" + "; ".join(_e(f) for f in flags["reason"])
    for n in notes:
        text += f"<br><span class='note'>{_e(n)}</span>"
    return text


def _pairs_section(c: ReportContent, store: str | Path) -> str:
    out = ["<h2 id='pairs'>Pairs</h2>",
           "<p class='note'>Three orthogonal slices through the centre of the fixed grid, with the anatomical "
           "direction at each edge (LPS world, from the grid's direction matrix): the fixed image with the "
           "contours of the warped moving labels, and the Jacobian determinant of x + u(x).</p>"]
    if not c.shown:
        out.append("<p class='note'>No pair selected.</p>")
    layout = read_layout(store)
    index = {p.pair_id: i for i, p in enumerate(layout.pairs)}
    for pid, why in c.shown.items():
        r = c.table.loc[pid]
        st = str(r["status"])
        if st != "complete":
            out.append(f"<figure class='pair' id='pair-{_e(pid)}'><figcaption><b>{_e(pid)}</b>: status {_e(st)}, no "
                       f"field to show. {_e(r.get('error', ''))}</figcaption></figure>")
            continue
        images = load_pair_images(store, index[pid], str(r["fixed"]), str(r["moving"]))
        png = render_panel(images)
        img = (f"<img alt='slices of {_e(pid)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"
               if png else "")
        out.append(f"<figure class='pair' id='pair-{_e(pid)}'>{img}<figcaption>"
                   f"{_caption(pid, r, why, c, images.notes)}</figcaption></figure>")
    return "\n".join(out)


def _table_section(c: ReportContent) -> str:
    t = c.table
    cols = [col for col in t.columns if col not in ("error", "config_hash", "started", "finished", "host")]
    head = "".join(f"<th>{_e(col)}</th>" for col in ["pair_id"] + cols)
    body = []
    flagged = set(c.flagged)
    for pid, r in t.iterrows():
        cells = "".join(f"<td class='num'>{_num(r[col])}</td>" if t[col].dtype.kind in "fiu" else f"<td>{_e(r[col])}</td>"
                        for col in cols)
        body.append(f"<tr class='{_row_class(str(r['status']), str(pid) in flagged)}' data-pair='{_e(pid)}'>"
                    f"<td>{_e(pid)}</td>{cells}</tr>")
    return (f"<h2 id='all-pairs'>All pairs</h2><table id='all-pairs-table'><thead><tr>{head}</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def write_html_report(store: str | Path, out: str | Path, metric: str = "dice_after", max_pairs: int = 5,
                      pairs: Sequence[int | str] = ()) -> Path:
    """Write the report of ``store`` to ``out``: one self-contained HTML file (no network needed).

    Args:
        metric: per-pair metric that picks the worst pairs.
        max_pairs: how many worst pairs get an image panel (besides flagged and requested ones).
        pairs: pair ids or indices whose panels are shown on request.
    """
    t0 = time.perf_counter()
    c = report_content(store, metric, max_pairs, pairs)
    counts = {k: int(v) for k, v in c.table["status"].astype(str).value_counts().items()}
    figs = _figures(c)
    blocks: list[tuple[str, str]] = [
        ("html", f"<h1>cohortreg report: {_e(Path(store).resolve())}</h1>"
                 f"<p class='counts'>{len(c.table)} pairs: " + ", ".join(f"{n} {_e(k or 'pending')}" for k, n in
                                                                         counts.items())
                 + f"; {len(c.flagged)} flagged as outliers, {len(c.failed)} failed.</p>"),
        ("html", _flagged_section(c, set(c.shown))),
        ("html", _runs_section(store, c.table)),
        ("html", "<h2 id='cohort'>Cohort plots</h2><p class='note'>Dashed line: cohort median; dotted red: flag "
                 "threshold; red points: flagged pairs. Hover for the pair.</p><div class='plots'>"),
    ]
    blocks += [("root", str(f.name)) for f in figs]
    blocks += [("html", "</div>"), ("html", _pairs_section(c, store)), ("html", _table_section(c))]
    page = file_html(figs, resources=INLINE, title=f"cohortreg report: {Path(store).name}", template=_TEMPLATE,
                     template_variables={"report_blocks": blocks, "report_css": _CSS})
    path = Path(out)
    path.write_text(page, encoding="utf-8")
    log.info("report of %s written to %s in %.1f s", store, path, time.perf_counter() - t0)
    return path
