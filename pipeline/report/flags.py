"""Automatic flags: the pairs whose metrics are outliers for their own cohort.

A metric's robust z-score is ``z = (x - median) / s`` with ``s = 1.4826 * MAD`` (the standard
deviation of a normal sample; ``|z| > 3.5`` is Iglewicz and Hoaglin's outlier rule, written there as
``0.6745 (x - median) / MAD``). Where more than half the pairs share one value (MAD = 0, e.g. no
folding anywhere) ``s = 1.2533 * mean absolute deviation``; and ``s`` never falls below the rule's
floor, the smallest spread that means something in that metric's units (without it, a cohort of
near-identical values flags differences of a thousandth of a Dice). Only complete pairs count, and
a metric is judged only when at least ``min_pairs`` of them have a value.

Each rule is one-sided where only one direction is bad: low Dice, low NCC, low minimum Jacobian,
high TRE, high folding fraction, long runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd

__all__ = ["OutlierRule", "MetricStats", "FLAG_RULES", "Z_THRESHOLD", "MIN_PAIRS", "robust_z", "flag_pairs",
           "flag_order"]

Z_THRESHOLD = 3.5
MIN_PAIRS = 5
_MAD_TO_SIGMA = 1.4826      # 1 / Phi^-1(3/4)
_MEANAD_TO_SIGMA = 1.2533   # sqrt(pi / 2)


@dataclass(frozen=True)
class OutlierRule:
    """How one per-pair metric is judged.

    Attributes:
        metric: a per-pair variable of the results store.
        side: ``"low"`` (only small values are bad), ``"high"``, or ``"both"``.
        floor: smallest scale ``s`` (metric units).
        rel_floor: smallest scale as a fraction of ``|median|`` (the larger floor wins).
        label: what the metric is, for the report.
    """

    metric: str
    side: Literal["low", "high", "both"]
    floor: float = 0.0
    rel_floor: float = 0.0
    label: str = ""


FLAG_RULES: tuple[OutlierRule, ...] = (
    OutlierRule("dice_after", "low", floor=0.01, label="mean Dice after registration"),
    OutlierRule("ncc_after", "low", floor=0.002, label="NCC after registration"),
    OutlierRule("tre_after", "high", floor=0.1, label="mean landmark error after (mm)"),
    OutlierRule("jac_min", "low", floor=0.02, label="minimum Jacobian determinant"),
    OutlierRule("jac_nonpositive", "high", floor=1e-4, label="fraction of folding voxels (det <= 0)"),
    OutlierRule("runtime_s", "high", floor=1.0, rel_floor=0.1, label="task runtime (s)"),
)


@dataclass(frozen=True)
class MetricStats:
    """A metric's cohort statistics and the values beyond which a pair is flagged."""

    rule: OutlierRule
    n: int
    median: float
    scale: float
    lower: float | None   # flagged below this (low / both rules)
    upper: float | None   # flagged above this (high / both rules)


def robust_z(values: np.ndarray, floor: float = 0.0, rel_floor: float = 0.0) -> tuple[np.ndarray, float, float]:
    """Robust z-scores of ``values`` (NaN stays NaN), with the median and the scale used.

    The scale is ``1.4826 * MAD``, or ``1.2533 * mean |x - median|`` when the MAD is 0, and at least
    ``max(floor, rel_floor * |median|)``. When every finite value is equal and no floor is set, the
    scores are 0.
    """
    x = np.asarray(values, dtype=float)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full_like(x, np.nan), math.nan, math.nan
    med = float(np.median(finite))
    dev = np.abs(finite - med)
    scale = _MAD_TO_SIGMA * float(np.median(dev))
    if scale == 0.0:
        scale = _MEANAD_TO_SIGMA * float(dev.mean())
    scale = max(scale, floor, rel_floor * abs(med))
    if scale == 0.0:
        return np.where(np.isfinite(x), 0.0, np.nan), med, 0.0
    return (x - med) / scale, med, scale


def flag_pairs(table: pd.DataFrame, rules: Sequence[OutlierRule] = FLAG_RULES, threshold: float = Z_THRESHOLD,
               min_pairs: int = MIN_PAIRS) -> tuple[pd.DataFrame, dict[str, MetricStats]]:
    """The outlier flags of a summary table (one row per pair, index ``pair_id``, a ``status`` column).

    Returns:
        flags: one row per (pair, metric) flagged, columns ``pair_id``, ``metric``, ``value``,
            ``median``, ``z``, ``side`` (``low``/``high``), ``reason`` (a sentence), sorted by
            ``|z|`` descending.
        stats: per judged metric, its :class:`MetricStats` (for threshold lines in the plots).
    """
    complete = table[table["status"] == "complete"] if "status" in table else table
    rows: list[dict] = []
    stats: dict[str, MetricStats] = {}
    for rule in rules:
        if rule.metric not in complete or complete[rule.metric].dtype.kind not in "fiu":
            continue
        values = complete[rule.metric].to_numpy(dtype=float)
        n = int(np.isfinite(values).sum())
        if n < min_pairs:
            continue
        z, med, scale = robust_z(values, rule.floor, rule.rel_floor)
        lower = med - threshold * scale if rule.side in ("low", "both") else None
        upper = med + threshold * scale if rule.side in ("high", "both") else None
        stats[rule.metric] = MetricStats(rule, n, med, scale, lower, upper)
        for pid, v, zi in zip(complete.index, values, z):
            if not np.isfinite(zi):
                continue
            low = rule.side in ("low", "both") and zi < -threshold
            high = rule.side in ("high", "both") and zi > threshold
            if low or high:
                rows.append({"pair_id": str(pid), "metric": rule.metric, "value": float(v), "median": med,
                             "z": float(zi), "side": "low" if low else "high",
                             "reason": f"{rule.metric} = {v:.4g} is {'low' if low else 'high'} "
                                       f"(cohort median {med:.4g}, robust z = {zi:+.1f})"})
    flags = pd.DataFrame(rows, columns=["pair_id", "metric", "value", "median", "z", "side", "reason"])
    if len(flags):
        flags = flags.reindex(flags["z"].abs().sort_values(ascending=False).index).reset_index(drop=True)
    return flags, stats


def flag_order(flags: pd.DataFrame) -> list[str]:
    """Pair ids of the flagged pairs, the most extreme (largest ``|z|`` over its metrics) first."""
    if not len(flags):
        return []
    worst = flags.assign(absz=flags["z"].abs()).groupby("pair_id", sort=False)["absz"].max()
    return [str(p) for p in worst.sort_values(ascending=False, kind="stable").index]
