"""Named cohort workflows: a pairing rule, a default method, and a typed ``plan`` / ``run``.

The top layer of the house (see ``DESIGN.md``): a workflow plans a run without a cluster (checks
the method config, the pairing and the store's provenance, makes the pair table) and runs the plan
through :func:`pipeline.runner.run_pairs`. The ``cohortreg`` command line and the demo call these;
nothing in ``pipeline`` imports ``workflows``. The groupwise template is :mod:`workflows.template`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.ingest import IngestReport, ingest, ingested_subjects
from pipeline.manifest import Subject
from pipeline.pairs import Pair, make_pairs, read_pairs
from pipeline.runner import Progress, RunSummary, run_pairs
from pipeline.store import stored_attrs
from regcore import InputError, method_config

from .labels import write_propagated_labels

__all__ = ["Workflow", "WORKFLOWS", "get_workflow", "RunPlan"]


@dataclass
class RunPlan:
    """Everything a run needs, checked without a cluster."""

    store: Path
    workflow: str
    subjects: list[Subject] | None   # to ingest first; None: those already in the store
    pairs: list[Pair]
    method: str | dict
    config: Any
    pairing: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workflow:
    """A pairing rule (see :mod:`pipeline.pairs`) with its default method and direction."""

    name: str
    pairs: str
    method: str
    direction: str = "to-atlas"
    description: str = ""
    #: called with the plan and the run's summary once the pairs are done; returns the files it wrote
    post_step: Callable[[RunPlan, RunSummary], list[Path]] | None = None

    def plan(self, store: str | Path, *, subjects: Sequence[Subject] | None = None, method: str | dict | None = None,
             config: dict | str | Path | None = None, pairs: str | None = None, atlas: str | None = None,
             direction: str | None = None, pair_list: str | Path | None = None) -> RunPlan:
        """Check the method config and the pairing and make the pair table (no cluster needed).

        Provenance: on a store that holds results, the store's method is kept unless ``method``
        is given (``config`` alone is merged over the store's recorded config), and its pairing
        rule, atlas and direction unless new ones are given; ``subjects`` that grew add pairs.

        Args:
            store: the cohort store (a directory; need not exist yet).
            subjects: the cohort to ingest first; None uses the subjects already in the store.
            method, config: a regcore preset or full config, and overrides.
            pairs, atlas, direction, pair_list: the pairing (default: the workflow's, or the store's).
        """
        store = Path(store)
        if store.exists() and not store.is_dir():
            raise InputError(f"store {str(store)!r} is a file, not a store directory")
        stored = stored_attrs(store)
        chosen = method or stored.get("config") or self.method
        method_config(chosen, config)  # validated now, not after a cluster has started
        old = stored.get("pairing") or {}
        pairing = {"rule": pairs or old.get("rule") or self.pairs, "atlas": atlas or old.get("atlas"),
                   "direction": direction or old.get("direction") or self.direction,
                   "pair_list": str(pair_list) if pair_list else old.get("pair_list")}
        if subjects is None and stored and not old and not (pairs or atlas):  # a store from before pairings were recorded
            table = read_pairs(store / "pairs.csv")
            pairing = {}  # its table is the pairing: record none, so the next run reads the table again
        else:
            cohort = list(subjects) if subjects is not None else ingested_subjects(store)
            table = make_pairs(cohort, pairing["rule"], atlas=pairing["atlas"], direction=pairing["direction"],
                               pair_list=pairing["pair_list"])
        return RunPlan(store, self.name, list(subjects) if subjects is not None else None, table, chosen, config,
                       pairing)

    def run(self, plan: RunPlan, client: Any, *, force: bool = False, window: int | None = None, retries: int = 1,
            gpu: bool = False, progress: Progress | None = None, allow_removed: bool = False,
            on_ingest: Callable[[IngestReport], None] | None = None, batch_size: int | str | None = 1) -> RunSummary:
        """Ingest the plan's subjects (if any) and register its pairs on the cluster behind ``client``
        (``batch_size``: pairs sharing a fixed image per task, see :func:`pipeline.runner.plan_tasks`)."""
        if plan.subjects is not None:
            report = ingest(plan.subjects, plan.store, client)
            if on_ingest:
                on_ingest(report)
        summary = run_pairs(client, plan.store, plan.pairs, plan.method, plan.config, window=window, retries=retries,
                            gpu=gpu, force=force, progress=progress, allow_removed=allow_removed,
                            batch_size=batch_size, root_attrs={"workflow": self.name, "pairing": plan.pairing})
        if self.post_step is not None:
            summary.outputs = [str(p) for p in self.post_step(plan, summary)]
        return summary


WORKFLOWS: dict[str, Workflow] = {
    w.name: w
    for w in (
        Workflow("atlas", "atlas", "affine+syn", "to-atlas",
                 "every subject to the atlas: fields on the atlas grid (stacked along pair), subject labels "
                 "warped into atlas space"),
        Workflow("atlas-labels", "atlas", "affine+syn", "from-atlas",
                 "the atlas to every subject: atlas labels propagated onto each subject's grid (segmentation), "
                 "written as STORE/labels/<subject>.nii.gz", post_step=write_propagated_labels),
        Workflow("pairwise", "all", "affine+syn", description="all ordered pairs of subjects"),
        Workflow("longitudinal", "longitudinal", "affine+syn",
                 description="each later session to the first session of the same subject"),
    )
}


def get_workflow(name: str) -> Workflow:
    if name not in WORKFLOWS:
        raise InputError(f"unknown workflow {name!r}; available: {', '.join(WORKFLOWS)}")
    return WORKFLOWS[name]
