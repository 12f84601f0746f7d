"""Pairing rules: subjects -> a pair table ``(pair_id, fixed, moving)`` of image keys.

Backward warping throughout: each pair's field lives on the *fixed* image's grid and maps fixed
points into the moving image. The table is frozen next to the results (``pairs.csv`` in the store)
so that a rerun registers exactly the same pairs, in the same order.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from regcore import InputError

from .manifest import Subject

__all__ = ["Pair", "RULES", "make_pairs", "atlas_pairs", "all_pairs", "longitudinal_pairs", "read_pair_list",
           "write_pairs", "append_pairs", "read_pairs"]


@dataclass(frozen=True)
class Pair:
    """One registration: ``moving`` is warped onto ``fixed``'s grid. Keys are ingest keys."""

    pair_id: str
    fixed: str
    moving: str


def _pair(fixed: str, moving: str) -> Pair:
    return Pair(f"{moving}--to--{fixed}", fixed, moving)


def atlas_pairs(keys: Sequence[str], atlas: str, direction: str = "to-atlas") -> list[Pair]:
    """Every subject to the atlas (``to-atlas``: fixed = atlas, fields on the atlas grid), the
    atlas to every subject (``from-atlas``: atlas labels propagated to subjects), or ``both``."""
    if direction not in ("to-atlas", "from-atlas", "both"):
        raise InputError(f"atlas direction must be to-atlas, from-atlas or both, got {direction!r}")
    others = [k for k in keys if k != atlas]
    pairs = []
    if direction in ("to-atlas", "both"):
        pairs += [_pair(atlas, k) for k in others]
    if direction in ("from-atlas", "both"):
        pairs += [_pair(k, atlas) for k in others]
    return pairs


def all_pairs(keys: Sequence[str]) -> list[Pair]:
    """All ordered pairs of distinct images."""
    return [_pair(f, m) for f, m in itertools.permutations(keys, 2)]


def longitudinal_pairs(subjects: Sequence[Subject]) -> list[Pair]:
    """Each later session to the first session of the same subject (sessions sorted as text)."""
    by_subject: dict[str, list[Subject]] = {}
    for s in subjects:
        by_subject.setdefault(s.subject, []).append(s)
    pairs = []
    for subj in by_subject.values():
        ordered = sorted(subj, key=lambda s: s.session)
        pairs += [_pair(ordered[0].key, later.key) for later in ordered[1:]]
    if not pairs:
        raise InputError("longitudinal pairing: no subject has more than one session")
    return pairs


def read_pair_list(path: str | Path, keys: Iterable[str]) -> list[Pair]:
    """An explicit pair list: a CSV with ``fixed`` and ``moving`` columns holding image keys."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"pair list {str(p)!r}: no such file")
    known = set(keys)
    with p.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(f"pair list {str(p)!r}: needs 'fixed' and 'moving' columns")
    pairs = []
    for line, row in enumerate(rows, start=2):
        for col in ("fixed", "moving"):
            if row[col] not in known:
                raise InputError(f"pair list {str(p)!r} line {line}: {col} {row[col]!r} is not a subject key of the cohort")
        pairs.append(_pair(row["fixed"], row["moving"]))
    return pairs


RULES = ("atlas", "all", "longitudinal", "list")


def make_pairs(subjects: Sequence[Subject], rule: str, atlas: str | None = None, direction: str = "to-atlas",
               pair_list: str | Path | None = None) -> list[Pair]:
    """Apply a pairing rule (one of :data:`RULES`) to the cohort; duplicates are refused."""
    keys = [s.key for s in subjects]
    if rule == "atlas":
        if atlas is None or atlas not in keys:
            shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
            what = "needs an atlas key (--atlas)" if atlas is None else f"atlas key {atlas!r} is not in the cohort"
            raise InputError(f"atlas pairing {what}; valid keys: {shown}")
        pairs = atlas_pairs(keys, atlas, direction)
    elif rule == "all":
        pairs = all_pairs(keys)
    elif rule == "longitudinal":
        pairs = longitudinal_pairs(subjects)
    elif rule == "list":
        if pair_list is None:
            raise InputError("pairing rule 'list' needs a pair-list CSV")
        pairs = read_pair_list(pair_list, keys)
    else:
        raise InputError(f"unknown pairing rule {rule!r}; choose from {', '.join(RULES)}")
    ids = [p.pair_id for p in pairs]
    if len(set(ids)) != len(ids):
        raise InputError("pair table holds the same pair twice")
    if not pairs:
        raise InputError(f"pairing rule {rule!r} gave no pairs")
    return pairs


def write_pairs(pairs: Sequence[Pair], path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pair", "pair_id", "fixed", "moving"])
        for i, pair in enumerate(pairs):
            w.writerow([i, pair.pair_id, pair.fixed, pair.moving])
    return p


def append_pairs(pairs: Sequence[Pair], path: str | Path, start: int) -> Path:
    """Append ``pairs`` to a frozen table whose last index is ``start - 1`` (the table is a log:
    rows are only ever added, so every pair keeps its index)."""
    p = Path(path)
    with p.open("a", newline="") as fh:
        w = csv.writer(fh)
        for i, pair in enumerate(pairs, start=start):
            w.writerow([i, pair.pair_id, pair.fixed, pair.moving])
    return p


def read_pairs(path: str | Path) -> list[Pair]:
    with Path(path).open(newline="") as fh:
        return [Pair(r["pair_id"], r["fixed"], r["moving"]) for r in csv.DictReader(fh)]
