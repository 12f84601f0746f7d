"""The cohort plots of the report (bokeh figures, embedded with their JS inline by :mod:`.page`).

One figure per metric, the pair on the x axis (its position in the store's pair table; ids on the
axis for small cohorts, in the hover tooltip always), flagged pairs in red with their id, the
cohort median and the flag threshold as lines; and a heat map of per-label Dice.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from bokeh.models import BasicTicker, ColorBar, ColumnDataSource, HoverTool, LabelSet, LinearColorMapper, Span
from bokeh.palettes import Viridis256
from bokeh.plotting import figure

from .flags import MetricStats

__all__ = ["metric_figure", "label_heatmap", "status_figure"]

_AFTER, _BEFORE, _FLAG = "#1f77b4", "#b0b0b0", "#d62728"
_MAX_TICK_LABELS = 40


def _tidy(fig: figure, n: int, ids: Sequence[str], axis: str = "x") -> figure:
    fig.toolbar.logo = None
    fig.toolbar_location = "right"
    ax = fig.xaxis if axis == "x" else fig.yaxis
    if n <= _MAX_TICK_LABELS:
        ax.ticker = list(range(n))
        ax.major_label_overrides = {i: str(p) for i, p in enumerate(ids)}
        if axis == "x":
            ax.major_label_orientation = 0.8
    else:
        ax.axis_label = "pair (index in the store's pair table)"
    return fig


def metric_figure(table: pd.DataFrame, metric: str, title: str, stats: MetricStats | None = None,
                  flagged: set[str] = frozenset(), before: str | None = None, scale: float = 1.0,
                  unit: str = "", name: str | None = None, width: int = 520, height: int = 300) -> figure:
    """``metric`` (times ``scale``) per pair; ``before``: the same metric before registration, drawn
    in grey and joined to the after value. ``flagged``: pair ids flagged on this metric."""
    ids = [str(p) for p in table.index]
    n = len(ids)
    after = table[metric].to_numpy(dtype=float) * scale
    data = {"x": np.arange(n), "after": after, "pair_id": ids,
            "fixed": [str(v) for v in table.get("fixed", pd.Series([""] * n))],
            "moving": [str(v) for v in table.get("moving", pd.Series([""] * n))],
            "status": [str(v) for v in table.get("status", pd.Series([""] * n))],
            "colour": [_FLAG if p in flagged else _AFTER for p in ids],
            "tag": [p if p in flagged else "" for p in ids]}
    if before is not None and before in table:
        data["before"] = table[before].to_numpy(dtype=float) * scale
    src = ColumnDataSource(data)
    fig = figure(title=title, width=width, height=height, name=name, tools="pan,box_zoom,wheel_zoom,reset,save",
                 y_axis_label=f"{metric}{f' ({unit})' if unit else ''}")
    if "before" in data:
        fig.segment("x", "before", "x", "after", source=src, color=_BEFORE, line_width=1.5)
        fig.scatter("x", "before", source=src, size=6, color=_BEFORE)
    dots = fig.scatter("x", "after", source=src, size=9, color="colour", line_color="white")
    fig.add_layout(LabelSet(x="x", y="after", text="tag", source=src, x_offset=6, y_offset=2,
                            text_font_size="9pt", text_color=_FLAG))
    tips = [("pair", "@pair_id"), ("fixed", "@fixed"), ("moving", "@moving"), ("status", "@status"),
            (metric, "@after{0.0000}")] + ([(before, "@before{0.0000}")] if "before" in data else [])
    fig.add_tools(HoverTool(renderers=[dots], tooltips=tips))
    if stats is not None:
        fig.add_layout(Span(location=stats.median * scale, dimension="width", line_color="#555555",
                            line_dash="dashed", line_width=1))
        for limit in (stats.lower, stats.upper):
            if limit is not None:
                fig.add_layout(Span(location=limit * scale, dimension="width", line_color=_FLAG,
                                    line_dash="dotted", line_width=1.5))
    return _tidy(fig, n, ids)


def label_heatmap(values: np.ndarray, ids: Sequence[str], labels: Sequence[int], title: str,
                  name: str | None = None) -> figure:
    """Heat map of ``values`` ``(pair, label)`` (Dice, 0 to 1), pairs down, labels across."""
    n, m = values.shape
    xs, ys = np.meshgrid(np.arange(m), np.arange(n))
    src = ColumnDataSource({"x": [str(labels[j]) for j in xs.ravel()], "y": ys.ravel(),
                            "value": values.ravel(), "pair_id": [str(ids[i]) for i in ys.ravel()]})
    mapper = LinearColorMapper(palette=Viridis256, low=0.0, high=1.0, nan_color="#dddddd")
    width = int(np.clip(220 + 48 * m, 420, 1100))
    height = int(np.clip(90 + 18 * n, 260, 900))
    fig = figure(title=title, width=width, height=height, name=name, x_range=[str(v) for v in labels],
                 y_range=(n - 0.5, -0.5), tools="hover,save,reset", x_axis_label="label",
                 tooltips=[("pair", "@pair_id"), ("label", "@x"), ("Dice", "@value{0.000}")])
    fig.rect("x", "y", width=1, height=1, source=src, fill_color={"field": "value", "transform": mapper},
             line_color=None)
    fig.add_layout(ColorBar(color_mapper=mapper, ticker=BasicTicker(desired_num_ticks=6), width=12,
                            title="Dice"), "right")
    fig.grid.visible = False
    return _tidy(fig, n, ids, axis="y")


def status_figure(counts: dict[str, int], name: str | None = None) -> figure:
    """Pairs per status (complete, failed, ...)."""
    keys = [k for k in ("complete", "failed", "running", "interrupted", "pending") if k in counts]
    colours = {"complete": _AFTER, "failed": _FLAG, "running": "#ff7f0e", "interrupted": "#ff7f0e",
               "pending": _BEFORE}
    src = ColumnDataSource({"status": keys, "n": [counts[k] for k in keys], "colour": [colours[k] for k in keys]})
    fig = figure(title="pairs by status", x_range=keys, width=360, height=300, name=name, tools="save",
                 tooltips=[("status", "@status"), ("pairs", "@n")])
    fig.vbar(x="status", top="n", width=0.7, source=src, color="colour")
    fig.y_range.start = 0
    fig.toolbar.logo = None
    return fig
