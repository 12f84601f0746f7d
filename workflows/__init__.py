"""Named cohort workflows: a pairing rule, a method preset and what the results are for.

Thin by design (see ``DESIGN.md``): everything runs through :func:`pipeline.runner.run_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from regcore import InputError

__all__ = ["Workflow", "WORKFLOWS", "get_workflow"]


@dataclass(frozen=True)
class Workflow:
    """A pairing rule (see :mod:`pipeline.pairs`) with its default method."""

    name: str
    pairs: str
    method: str
    direction: str = "to-atlas"
    description: str = ""


WORKFLOWS: dict[str, Workflow] = {
    w.name: w
    for w in (
        Workflow("atlas", "atlas", "affine+syn", "to-atlas",
                 "every subject to the atlas: fields on the atlas grid (stacked along pair), subject labels "
                 "warped into atlas space"),
        Workflow("atlas-labels", "atlas", "affine+syn", "from-atlas",
                 "the atlas to every subject: atlas labels propagated onto each subject's grid (segmentation)"),
        Workflow("pairwise", "all", "affine+syn", description="all ordered pairs of subjects"),
        Workflow("longitudinal", "longitudinal", "affine+syn",
                 description="each later session to the first session of the same subject"),
    )
}


def get_workflow(name: str) -> Workflow:
    if name not in WORKFLOWS:
        raise InputError(f"unknown workflow {name!r}; available: {', '.join(WORKFLOWS)}")
    return WORKFLOWS[name]
