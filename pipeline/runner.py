"""The runner: pairs -> Dask futures through a bounded window; resumable, failure-isolating.

``run_pairs`` initialises the results store (driver only), works out which pairs still need work
(a pair is skipped when it is ``complete`` with the same method-config hash and the same input
content hashes), groups the pending pairs that share a fixed image into tasks of up to
``batch_size`` pairs (:func:`plan_tasks`; one pair per task by default), submits them with
``client.submit`` (``retries`` for infrastructure failures, ``resources={"GPU": 1}`` on GPU
clusters) keeping at most ``window`` tasks in flight, and records every pair's outcome. When a
task's future fails (its worker died, its task was lost) the driver marks each of its pairs that
is not complete in the store ``failed`` with the exception; a pair the task completed before it
died stays complete. The run goes on. Every run writes a JSON-lines log and a Dask performance
report under ``STORE/logs/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence


from regcore import InputError, method_config
from regcore.config import MethodConfig, config_hash, legacy_config_hash, validate_config

from .pairs import Pair
from .store import consolidate, init_results, mark_failed, open_root, read_layout, read_status, stored_attrs
from .task import inputs_hash, register_batch_task
from .zarrio import grid_from_attrs

__all__ = ["RunSummary", "run_pairs", "plan_pairs", "plan_tasks", "batch_setting", "AUTO_BATCH_CAP", "package_versions"]

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, int], dict[str, Any] | None], None]

#: ``batch_size="auto"`` on a GPU cluster: the most pairs the runner puts in one task; the task
#: then registers as many at once as fit its device (:func:`regcore.batch.max_batch_size`).
AUTO_BATCH_CAP = 32


def batch_setting(value: Any) -> int | str:
    """A ``batch_size`` setting checked: a whole number >= 1 or ``"auto"`` (None: 1)."""
    if value is None:
        return 1
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
    elif isinstance(value, (int,)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise InputError(f"batch size {value!r}: must be a whole number >= 1 or 'auto'")


def plan_tasks(pairs: Sequence[Pair], todo: Sequence[int], batch_size: int | str | None = 1, *, gpu: bool = False,
               slots: int = 1) -> list[list[int]]:
    """The pending pairs ``todo`` (rows of ``pairs``) grouped into tasks: pairs that share a fixed
    image, at most ``batch_size`` per task, ordered by each task's first pair in ``todo`` (one pair
    per task: exactly the order of ``todo``).

    ``batch_size="auto"``: 1 per task on CPU clusters (batching does not pay there); on GPU
    clusters up to :data:`AUTO_BATCH_CAP`, and no more than an even share of the pending pairs
    over the task ``slots`` (so that 8 pairs on 4 GPUs make 4 tasks, not one); the task then
    registers as many at once as fit its device.
    """
    size = batch_setting(batch_size)
    if size == "auto":
        size = max(1, min(AUTO_BATCH_CAP, -(-len(todo) // max(1, slots)))) if gpu else 1
    tasks: list[list[int]] = []
    open_task: dict[str, list[int]] = {}  # fixed key -> the task still filling up
    for i in todo:
        task = open_task.get(pairs[i].fixed)
        if task is None or len(task) >= size:
            task = open_task[pairs[i].fixed] = []
            tasks.append(task)  # in the order of each task's first pair
        task.append(i)
    return tasks


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
    interrupted: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # files a workflow's post-step wrote

    def counts(self) -> dict[str, int]:
        return {"total": self.total, "submitted": len(self.submitted), "skipped": len(self.skipped),
                "complete": len(self.complete), "failed": len(self.failed)}

    def text(self) -> str:
        c = self.counts()
        return (f"{c['total']} pairs: {c['complete']} registered, {c['skipped']} already complete (skipped), "
                f"{c['failed']} failed, in {self.wall_s:.1f} s")


def _subject_attrs(store: str | Path) -> dict[str, dict[str, Any]]:
    root = open_root(store, "r")  # not the consolidated copy: ingest may have added subjects since
    if "images" not in root:
        raise InputError(f"store {str(store)!r}: nothing ingested (run `cohortreg ingest` first)")
    return {key: dict(g.attrs) for key, g in root["images"].groups()}


def _recorded(store: str | Path, index: int, name: str) -> str:
    """One per-pair string the task recorded in the store (e.g. its ``worker``), or ``""``."""
    with contextlib.suppress(Exception):
        return str(open_root(store, "r")[name][index])
    return ""


def _worker_in(message: str) -> str:
    """The last worker address a Dask error message names (``KilledWorker`` names it), or ``""``."""
    found = re.findall(r"(?:tcp|tls|inproc|ucx)://[\w.\-\[\]:/]+", message)
    return found[-1].rstrip(".") if found else ""


def _running(store: str | Path, indices: Any) -> int:
    """How many of the pairs in flight are actually running (their task has marked them)."""
    idx = list(indices)
    if not idx:
        return 0
    status = open_root(store, "r")["status"]
    return sum(str(status[i]) == "running" for i in idx)


def _gpu_slots(client: Any, default: int) -> int:
    """Tasks a GPU cluster runs at once: the workers' ``GPU`` resources (else ``default``)."""
    with contextlib.suppress(Exception):
        workers = client.scheduler_info()["workers"].values()
        total = sum(int(w.get("resources", {}).get("GPU", 0)) for w in workers)
        if total > 0:
            return total
    return default


def _statuses(store: str | Path, indices: Sequence[int]) -> dict[int, str]:
    """The stored status of each of ``indices`` ({} when the store cannot be read)."""
    with contextlib.suppress(Exception):
        status = open_root(store, "r")["status"]
        return {i: str(status[i]) for i in indices}
    return {}


def _mark_interrupted(store: str | Path, indices: Sequence[int]) -> list[int]:
    """After Ctrl-C: pairs left ``running`` become ``interrupted`` (incomplete; a rerun redoes them)."""
    root = open_root(store, "r+")
    out = []
    for i in indices:
        if str(root["status"][i]) == "running":
            root["status"][i] = "interrupted"
            out.append(i)
    return out


class _WorkerDeaths(logging.Handler):
    """Collects the local nannies' reports of worker processes that died ("killed by signal 9")
    while installed (a context manager); clusters whose nannies live elsewhere report nothing."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self._logger = logging.getLogger("distributed.nanny")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Worker process") and ("signal" in msg or "exited with status" in msg):
            self.messages.append(msg)
        if self._forward is not None and record.levelno >= self._forward:  # what the logger let through before
            logging.getLogger("distributed").handle(record)

    def last(self) -> str:
        return self.messages[-1] if self.messages else ""

    def __enter__(self) -> "_WorkerDeaths":
        self._forward: int | None = None
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        effective = self._logger.getEffectiveLevel()
        if effective > logging.INFO:  # hear INFO here, pass on only what was passed on before
            self._forward = effective
            self._logger.setLevel(logging.INFO)
            self._logger.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
        self._logger.propagate = self._propagate


def _equivalent_hashes(store: str | Path, cfg: MethodConfig) -> set[str]:
    """The config hashes under which a complete pair counts as done with ``cfg``: its hash, its
    legacy hash (params as given, before defaults were hashed), and every hash the store recorded
    for a config that is ``cfg`` under today's canonical form (the same method written another way,
    or hashed by an older release)."""
    chash = config_hash(cfg)
    out = {chash, legacy_config_hash(cfg)}
    attrs = stored_attrs(store)
    recorded = dict(attrs.get("configs") or {})
    if attrs.get("config_hash") and attrs.get("config"):
        recorded.setdefault(str(attrs["config_hash"]), attrs["config"])
    for h, config in recorded.items():
        with contextlib.suppress(InputError):
            if config_hash(validate_config(config)) == chash:
                out.add(str(h))
    return out


def plan_pairs(store: str | Path, pairs: Sequence[Pair], cfg: MethodConfig,
               root_attrs: dict[str, Any] | None = None, force: bool = False,
               allow_removed: bool = False) -> tuple[list[int], list[int]]:
    """Initialise (or extend) the results for ``pairs`` and split them into (to run, to skip).

    Returns store indices (a pair's row in the store's append-only pair table), in the order of
    ``pairs``. A pair is skipped when it is complete with the same config hash and the same input
    content hashes (unless ``force``).
    """
    subjects = _subject_attrs(store)
    missing = sorted({k for p in pairs for k in (p.fixed, p.moving)} - set(subjects))
    if missing:
        raise InputError(f"pairs refer to images that were never ingested: {', '.join(missing[:5])}")
    ok = {k: a for k, a in subjects.items() if a.get("status") == "ok"}
    fixed_grids = {p.fixed: (grid_from_attrs(ok[p.fixed]) if p.fixed in ok else None) for p in pairs}
    labels = sorted({int(v) for p in pairs for k in (p.fixed, p.moving) if k in ok for v in ok[k].get("labels", [])})
    moving_labels = any(ok.get(p.moving, {}).get("labels") for p in pairs)  # warped (propagated) even without fixed labels
    n_levels = sum(stage.pyramid.n_levels for stage in cfg.stages)
    chash = config_hash(cfg)
    same = _equivalent_hashes(store, cfg)
    config = json.loads(cfg.model_dump_json())
    attrs = {"method": cfg.name, "config": config, "config_hash": chash, "configs": {chash: config},
             "versions": package_versions(), **(root_attrs or {})}
    layout = init_results(store, pairs, fixed_grids, labels, n_levels, bool(moving_labels), attrs, allow_removed)
    index = {p: i for i, p in enumerate(layout.pairs)}
    state = read_status(store)
    todo, skip = [], []
    for p in pairs:
        i = index[p]
        expected = (inputs_hash(ok[p.fixed]["content_sha256"], ok[p.moving]["content_sha256"])
                    if p.fixed in ok and p.moving in ok else None)
        done = (state["status"][i] == "complete" and state["config_hash"][i] in same
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
    allow_removed: bool = False,
    batch_size: int | str | None = 1,
) -> RunSummary:
    """Register ``pairs`` of an ingested ``store`` on the cluster behind ``client``.

    Args:
        method, config: a regcore preset (or full config) and overrides; hashed per pair.
        window: tasks (futures) in flight at once (default: 2 x the workers' task slots); with
            ``batch_size`` > 1 a task holds up to that many pairs.
        retries: Dask retries per task for infrastructure failures (a dead worker).
        gpu: annotate tasks with ``resources={"GPU": 1}``.
        force: rerun pairs even when complete with the same config.
        progress: called with the counts (and the finished pair's result dict) after each event.
        allow_removed: the store may hold pairs that ``pairs`` lacks (they are left untouched).
        batch_size: pairs sharing a fixed image per task, registered together (see
            :func:`plan_tasks`): 1 (default), a number, or ``"auto"`` (GPU clusters: as many as fit
            the device; CPU: 1).

    Indices in the summary (and ``pair`` in the store) are rows of the store's pair table, which
    is append-only: on a store that grew they need not match positions in ``pairs``.
    """
    from distributed import as_completed, performance_report as perf_report

    t0 = time.perf_counter()
    cfg = method_config(method, config)
    chash = config_hash(cfg)
    batch = batch_setting(batch_size)
    todo, skip = plan_pairs(store, pairs, cfg, root_attrs, force, allow_removed)
    total = len(todo) + len(skip)
    pairs = read_layout(store).pairs  # the store's table: indices below are its rows
    logs = Path(store) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    summary = RunSummary(str(store), total, submitted=list(todo), skipped=list(skip),
                         log_path=str(logs / f"run-{stamp}.jsonl"), dashboard=str(getattr(client, "dashboard_link", "")))
    slots = sum(getattr(client, "nthreads", lambda: {})().values()) if todo else 1
    window = max(1, window or 2 * max(1, slots))
    tasks = plan_tasks(pairs, todo, batch, gpu=gpu, slots=_gpu_slots(client, slots) if gpu else slots)
    # "auto" on a GPU: the task registers as many of its pairs at once as fit its device
    task_batch: int | str | None = "auto" if batch == "auto" and gpu else None
    counts = {"done": 0, "failed": 0, "skipped": len(skip), "running": 0, "total": total}
    cfg_dict = json.loads(cfg.model_dump_json())
    report_cm: Any = contextlib.nullcontext()
    if performance_report and todo:
        summary.report_path = str(logs / f"run-{stamp}-dask-report.html")
        report_cm = perf_report(filename=summary.report_path)
    with open(summary.log_path, "w") as logf, report_cm:
        def event(kind: str, **data: Any) -> None:
            logf.write(json.dumps({"time": datetime.now(timezone.utc).isoformat(), "event": kind, **data}, default=str) + "\n")
            logf.flush()

        event("start", store=str(store), method=cfg.name, config_hash=chash, pairs=total, to_run=len(todo),
              skipped=len(skip), window=window, retries=retries, gpu=gpu, batch_size=batch, tasks=len(tasks),
              dashboard=summary.dashboard, versions=package_versions())
        if progress:
            progress(dict(counts), None)
        queue = list(tasks)
        futures: dict[Any, list[int]] = {}
        annotations = {"resources": {"GPU": 1}} if gpu else {}

        def submit(indices: list[int]) -> Any:
            key = (f"pair-{indices[0]}-{chash[:12]}-{stamp}" if len(indices) == 1
                   else f"pairs-{indices[0]}-n{len(indices)}-{chash[:12]}-{stamp}")
            fut = client.submit(register_batch_task, str(store), indices, cfg_dict, batch_size=task_batch,
                                skip_complete=not force, key=key, retries=retries, pure=False, **annotations)
            futures[fut] = indices
            return fut

        def lost(indices: list[int], exc: BaseException) -> list[dict[str, Any]]:
            """The task never returned (a dead worker, a lost task, a store failure): each of its
            pairs that the store holds as complete stays so; the others are marked failed."""
            status = _statuses(store, indices)
            out = []
            for i in indices:
                if status.get(i) == "complete":  # finished before the task died: kept
                    out.append({"index": i, "pair_id": pairs[i].pair_id, "status": "complete", "error": "",
                                "checksum": _recorded(store, i, "checksum"), "worker": _recorded(store, i, "worker"),
                                "device": _recorded(store, i, "device"), "recovered": True})
                    continue
                msg = f"{pairs[i].pair_id}: task lost ({type(exc).__name__}: {exc})"
                log.error(msg)
                worker = _recorded(store, i, "worker") or _worker_in(str(exc))
                event("worker_lost", index=i, pair_id=pairs[i].pair_id, worker=worker, task_pairs=len(indices),
                      death=deaths.last() or "unknown (no local nanny reported it)",
                      error=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(Exception):
                    mark_failed(store, i, msg, "".join(traceback.format_exception(exc)))
                out.append({"index": i, "pair_id": pairs[i].pair_id, "status": "failed", "error": msg})
            return out

        deaths = _WorkerDeaths()
        ac = as_completed([submit(queue.pop(0)) for _ in range(min(window, len(queue)))])
        try:
            with deaths:
                for fut in ac:
                    indices = futures.pop(fut)
                    try:
                        results = list(fut.result())
                    except Exception as exc:
                        results = lost(indices, exc)
                    fut.release()
                    if len(indices) > 1:
                        event("task", indices=indices, batch_sizes=sorted({r.get("batch_size", 0) for r in results}),
                              worker=next((r.get("worker") for r in results if r.get("worker")), ""))
                    for res in results:
                        i = res["index"]
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
                    counts["running"] = _running(store, [i for idx in futures.values() for i in idx])
                    if progress:
                        for res in results:
                            progress(dict(counts), res)
        except KeyboardInterrupt:
            in_flight = sorted(i for idx in futures.values() for i in idx)
            with contextlib.suppress(Exception):
                client.cancel(list(futures))
            interrupted = _mark_interrupted(store, in_flight)
            summary.interrupted = interrupted
            summary.wall_s = time.perf_counter() - t0
            event("interrupted", pairs=[pairs[i].pair_id for i in interrupted], **summary.counts(), wall_s=summary.wall_s)
            raise
        summary.wall_s = time.perf_counter() - t0
        event("end", **summary.counts(), wall_s=summary.wall_s)
    consolidate(store)  # the run's metadata, for xarray.open_zarr(STORE)
    return summary
