"""The runner: pairs -> Dask futures through a bounded window; resumable, failure-isolating.

``run_pairs`` initialises the results store (driver only), works out which pairs still need work
(a pair is skipped when it is ``complete`` with the same method-config hash and the same input
content hashes), submits them with ``client.submit`` (``retries`` for infrastructure failures,
``resources={"GPU": 1}`` on GPU clusters) keeping at most ``window`` in flight, and records every
outcome. A pair whose future fails (its worker died, its task was lost) is marked ``failed`` in the
store by the driver with the exception; the run goes on. Every run writes a JSON-lines log and a
Dask performance report under ``STORE/logs/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence

import zarr

from regcore import InputError, method_config
from regcore.config import MethodConfig, config_hash

from .pairs import Pair
from .store import init_results, mark_failed, read_status
from .task import inputs_hash, register_pair
from .zarrio import grid_from_attrs

__all__ = ["RunSummary", "run_pairs", "plan_pairs", "package_versions"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, int], dict[str, Any] | None], None]


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("cohortreg", "torch", "SimpleITK", "zarr", "dask", "distributed", "xarray", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


@dataclass
class RunSummary:
    """Outcome of one run over a store."""

    store: str
    total: int
    submitted: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    complete: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    wall_s: float = 0.0
    log_path: str = ""
    report_path: str = ""
    dashboard: str = ""

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "submitted": len(self.submitted), "skipped": len(self.skipped),
                "complete": len(self.complete), "failed": len(self.failed)}

    def text(self) -> str:
        c = self.counts()
        return (f"{c['total']} pairs: {c['complete']} registered, {c['skipped']} already complete (skipped), "
                f"{c['failed']} failed, in {self.wall_s:.1f} s")


def _subject_attrs(store: str | Path) -> dict[str, dict[str, Any]]:
    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    if "images" not in root:
        raise InputError(f"store {str(store)!r}: nothing ingested (run `cohortreg ingest` first)")
    return {key: dict(g.attrs) for key, g in root["images"].groups()}


def plan_pairs(store: str | Path, pairs: Sequence[Pair], cfg: MethodConfig,
               root_attrs: dict[str, Any] | None = None, force: bool = False) -> tuple[list[int], list[int]]:
    """Initialise the results for ``pairs`` and split them into (to run, to skip)."""
    subjects = _subject_attrs(store)
    missing = sorted({k for p in pairs for k in (p.fixed, p.moving)} - set(subjects))
    if missing:
        raise InputError(f"pairs refer to images that were never ingested: {', '.join(missing[:5])}")
    ok = {k: a for k, a in subjects.items() if a.get("status") == "ok"}
    fixed_grids = {p.fixed: (grid_from_attrs(ok[p.fixed]) if p.fixed in ok else None) for p in pairs}
    labels = sorted({int(v) for p in pairs for k in (p.fixed, p.moving) if k in ok for v in ok[k].get("labels", [])})
    moving_labels = any(ok.get(p.moving, {}).get("labels") and ok.get(p.fixed, {}).get("labels") for p in pairs)
    n_levels = sum(stage.pyramid.n_levels for stage in cfg.stages)
    chash = config_hash(cfg)
    attrs = {"method": cfg.name, "config": json.loads(cfg.model_dump_json()), "config_hash": chash,
             "versions": package_versions(), **(root_attrs or {})}
    init_results(store, pairs, fixed_grids, labels, n_levels, bool(moving_labels), attrs)
    state = read_status(store)
    todo, skip = [], []
    for i, p in enumerate(pairs):
        expected = (inputs_hash(ok[p.fixed]["content_sha256"], ok[p.moving]["content_sha256"])
                    if p.fixed in ok and p.moving in ok else None)
        done = (state["status"][i] == "complete" and state["config_hash"][i] == chash
                and expected is not None and state["inputs_hash"][i] == expected)
        (skip if done and not force else todo).append(i)
    return todo, skip


def run_pairs(
    client: Any,
    store: str | Path,
    pairs: Sequence[Pair],
    method: str | dict | MethodConfig,
    config: dict | str | Path | None = None,
    *,
    window: int | None = None,
    retries: int = 1,
    gpu: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    root_attrs: dict[str, Any] | None = None,
    performance_report: bool = True,
) -> RunSummary:
    """Register ``pairs`` of an ingested ``store`` on the cluster behind ``client``.

    Args:
        method, config: a regcore preset (or full config) and overrides; hashed per pair.
        window: futures in flight at once (default: 2 x the workers' task slots).
        retries: Dask retries per task for infrastructure failures (a dead worker).
        gpu: annotate tasks with ``resources={"GPU": 1}``.
        force: rerun pairs even when complete with the same config.
        progress: called with the counts (and the finished pair's result dict) after each event.
    """
    from distributed import as_completed, performance_report as perf_report

    t0 = time.perf_counter()
    cfg = method_config(method, config)
    chash = config_hash(cfg)
    todo, skip = plan_pairs(store, pairs, cfg, root_attrs, force)
    logs = Path(store) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    summary = RunSummary(str(store), len(pairs), submitted=list(todo), skipped=list(skip),
                         log_path=str(logs / f"run-{stamp}.jsonl"), dashboard=str(getattr(client, "dashboard_link", "")))
    slots = sum(getattr(client, "nthreads", lambda: {})().values()) if todo else 1
    window = max(1, window or 2 * max(1, slots))
    counts = {"done": 0, "failed": 0, "skipped": len(skip), "running": 0, "total": len(pairs)}
    cfg_dict = json.loads(cfg.model_dump_json())
    report_cm: Any = contextlib.nullcontext()
    if performance_report and todo:
        summary.report_path = str(logs / f"run-{stamp}-dask-report.html")
        report_cm = perf_report(filename=summary.report_path)
    with open(summary.log_path, "w") as logf, report_cm:
        def event(kind: str, **data: Any) -> None:
            logf.write(json.dumps({"time": datetime.now(timezone.utc).isoformat(), "event": kind, **data}, default=str) + "\n")
            logf.flush()

        event("start", store=str(store), method=cfg.name, config_hash=chash, pairs=len(pairs), to_run=len(todo),
              skipped=len(skip), window=window, retries=retries, gpu=gpu, dashboard=summary.dashboard,
              versions=package_versions())
        if progress:
            progress(dict(counts), None)
        queue = list(todo)
        futures: dict[Any, int] = {}
        annotations = {"resources": {"GPU": 1}} if gpu else {}

        def submit(i: int) -> Any:
            fut = client.submit(register_pair, str(store), i, cfg_dict, key=f"pair-{i}-{chash[:12]}-{stamp}",
                                retries=retries, pure=False, **annotations)
            futures[fut] = i
            return fut

        ac = as_completed([submit(queue.pop(0)) for _ in range(min(window, len(queue)))])
        counts["running"] = len(futures)
        for fut in ac:
            i = futures.pop(fut)
            try:
                res = fut.result()
            except Exception as exc:  # the task never finished: a dead worker, a lost task, a store failure
                msg = f"{pairs[i].pair_id}: task lost ({type(exc).__name__}: {exc})"
                log.error(msg)
                with contextlib.suppress(Exception):
                    mark_failed(store, i, msg, "".join(traceback.format_exception(exc)))
                res = {"index": i, "pair_id": pairs[i].pair_id, "status": "failed", "error": msg}
            fut.release()
            summary.results[i] = res
            if res["status"] == "complete":
                summary.complete.append(i)
                counts["done"] += 1
            else:
                summary.failed.append(i)
                summary.errors[i] = res.get("error", "")
                counts["failed"] += 1
            event("pair", **res)
            if queue:
                ac.add(submit(queue.pop(0)))
            counts["running"] = len(futures)
            if progress:
                progress(dict(counts), res)
        summary.wall_s = time.perf_counter() - t0
        event("end", **summary.counts(), wall_s=summary.wall_s)
    return summary
