"""Post-step of the ``atlas-labels`` workflow: each subject's propagated label map as a file.

The per-pair task already warps the atlas labels onto every subject's grid (the pair's fixed image)
and stores them; this writes them as ``STORE/labels/<subject key>.nii.gz`` (int32, the subject's
geometry), the segmentation a label-propagation user takes away.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.runner import RunSummary
from pipeline.store import read_layout, read_warped_labels
from regcore import Image, write_image

if TYPE_CHECKING:  # pragma: no cover
    from . import RunPlan

__all__ = ["write_propagated_labels"]

log = logging.getLogger(__name__)


def write_propagated_labels(plan: "RunPlan", summary: RunSummary) -> list[Path]:
    """Write the propagated labels of every complete pair of the plan; the paths written."""
    layout = read_layout(plan.store)
    complete = set(summary.complete) | set(summary.skipped)
    planned = set(plan.pairs)
    out = []
    for i, pair in enumerate(layout.pairs):
        if i not in complete or pair not in planned:
            continue
        labels = read_warped_labels(plan.store, i)
        if labels is None:
            log.warning("pair %s: no labels to propagate (the moving image has none)", pair.pair_id)
            continue
        path = plan.store / "labels" / f"{pair.fixed}.nii.gz"
        out.append(write_image(Image(labels.data.to(torch.int32), labels.grid), path))
    return out
