"""The Dask task: read pairs from Zarr, register them with regcore, write each pair's field and metrics.

:func:`register_batch_task` registers pairs that share one fixed image: the fixed subject is read
once, the moving subjects are registered together with :func:`regcore.batch.register_batch` (one
batched optimisation; a batch of one uses :func:`regcore.register`), and every pair is then
evaluated, written, checksummed and marked ``complete`` on its own, its status last, as soon as
its batch is done. :func:`register_pair` is the task of one pair.

Neither raises for a bad pair: registration and input errors are recorded in the store for that
pair alone (status ``failed``, message, traceback, host, device) and returned; the other pairs of
the task go on. Out-of-memory during a batch splits it in halves, recursively, down to single
pairs; the pairs are never marked failed for it. Only infrastructure failures (the store cannot be
read or written, a single pair that still does not fit the device) propagate, so that Dask's
``retries`` apply to them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from regcore import Image, InfrastructureError, InputError, register
from regcore.batch import RegistrationFailure, is_out_of_memory, max_batch_size, register_batch
from regcore.config import MethodConfig, config_hash
from regcore.pair_metrics import evaluate_pair

from .store import PairWriter, open_root, pair_checksum
from .zarrio import grid_from_attrs, level_name, read_image_array

__all__ = ["register_pair", "register_batch_task", "load_subject", "pair_metrics", "inputs_hash", "worker_device", "is_infrastructure_error"]

log = logging.getLogger(__name__)


def worker_device() -> torch.device:
    """The device chosen for this worker by the torch worker plugin, else CUDA if present, else CPU."""
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get("cohortreg-torch")
        if plugin is not None and getattr(plugin, "device", None):
            return torch.device(plugin.device)
    except (ImportError, ValueError):
        pass
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid:{os.getpid()}"


def load_subject(store: str | Path, key: str, role: str) -> dict[str, Any]:
    """An ingested subject: ``image`` (Image), ``levels`` (factor -> downsampled Image, the stored
    pyramid), ``labels``/``mask`` (Image or None), ``landmarks``
    (``(N, D)`` world mm or None) and ``sha`` (content hash). ``role`` names it in errors."""
    root = open_root(store, "r")
    path = f"images/{key}"
    if path not in root:
        raise InputError(f"{role} image {key!r}: not ingested (run `cohortreg ingest`)")
    group = root[path]
    attrs = dict(group.attrs)
    if attrs.get("status") != "ok":
        raise InputError(f"{role} image {key!r}: {attrs.get('error') or 'ingest did not finish'}")
    levels = {float(f): read_image_array(group["image"][level_name(f)]) for f in attrs.get("levels", [])[1:]}
    out: dict[str, Any] = {"image": read_image_array(group["image/0"]), "levels": levels, "labels": None,
                           "mask": None, "landmarks": None, "sha": attrs["content_sha256"]}
    if "labels" in group:
        out["labels"] = read_image_array(group["labels/0"], dtype=torch.int64)
    if "mask" in group:
        out["mask"] = read_image_array(group["mask/0"])
    if "landmarks" in group:
        out["landmarks"] = np.asarray(group["landmarks"][...], dtype=np.float64)
    return out


def inputs_hash(fixed_sha: str, moving_sha: str) -> str:
    """Identifies a pair's inputs (content hashes of both ingested subjects)."""
    return hashlib.sha256(f"{fixed_sha}:{moving_sha}".encode()).hexdigest()


def pair_metrics(fixed: dict[str, Any], moving: dict[str, Any], displacement: Image, labels: list[int],
                 jacobian: Image | None) -> tuple[dict[str, Any], np.ndarray | None]:
    """The store's values of a registered pair (:func:`regcore.pair_metrics.evaluate_pair` on the
    subjects loaded by :func:`load_subject`) and the warped moving labels (``(*spatial)`` int32)."""
    metrics, warped = evaluate_pair(fixed["image"], moving["image"], displacement, fixed_labels=fixed["labels"],
                                    moving_labels=moving["labels"], labels=labels, fixed_points=fixed["landmarks"],
                                    moving_points=moving["landmarks"], jacobian=jacobian)
    return metrics.values(), (warped.cpu().numpy() if warped is not None else None)


def _level_values(result: Any) -> dict[str, list]:
    recs = result.levels
    return {
        "level_loss": [r.losses[-1] if r.losses else float("nan") for r in recs],
        "level_factor": [float(r.factor) for r in recs],
        "level_seconds": [float(r.seconds) for r in recs],
        "level_iterations": [int(r.iterations) for r in recs],
        "level_stage": [int(r.stage) for r in recs],
    }


def is_infrastructure_error(exc: BaseException) -> bool:
    """Failures of the machine, not of the pair: store I/O (``OSError``), memory (CUDA or host
    out-of-memory), :class:`regcore.InfrastructureError`. A retry, elsewhere or later, may succeed."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, (InfrastructureError, OSError, MemoryError) + ((oom,) if oom else ()))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _message(exc: BaseException) -> str:
    """A pair's error message: an input error says it all; other errors name their type."""
    return str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"


@dataclass
class _PairJob:
    """One pair of a task: its writer, its returned dict and its share of the timings."""

    writer: PairWriter
    out: dict[str, Any]
    t0: float                      # perf_counter when the task started
    read_s: float = 0.0            # its share of the fixed read + its own moving read
    moving: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def index(self) -> int:
        return self.writer.index

    @property
    def pair_id(self) -> str:
        return self.writer.pair.pair_id


def _record_failure(job: _PairJob, message: str, tb: str, spent_s: float) -> None:
    """A bad pair, recorded for this pair alone (status ``failed`` last); the task goes on."""
    log.warning("pair %s failed: %s", job.pair_id, message)
    w, i = job.writer, job.index
    w.root["error"][i] = f"{job.pair_id}: {message}"
    w.root["traceback"][i] = tb
    w.root["runtime_s"][i] = spent_s
    w.root["finished"][i] = _now()
    w.finish("failed")
    job.out.update(error=f"{job.pair_id}: {message}", runtime_s=spent_s, t_end=time.time())
    job.moving = None


def _fail_on(job: _PairJob, exc: BaseException, spent_s: float) -> None:
    """Record ``exc`` as the pair's failure, or raise it when it is the machine's (Dask retries)."""
    if is_infrastructure_error(exc):
        log.warning("pair %s: infrastructure error, left to Dask's retries: %s: %s", job.pair_id,
                    type(exc).__name__, exc)
        raise exc
    _record_failure(job, _message(exc), "".join(traceback.format_exception(exc)), spent_s)


def _write_result(job: _PairJob, fixed: dict[str, Any], result: Any, chash: str, regcore_s: float) -> None:
    """Evaluate one registered pair and write it: field, metrics, checksum, then status last."""
    t_eval = time.perf_counter()
    moving = job.moving
    assert moving is not None
    writer = job.writer
    try:
        with torch.no_grad():
            values, warped_labels = pair_metrics(fixed, moving, result.displacement, writer.layout.labels,
                                                 result.jacobian)
    except Exception as exc:  # evaluation of this pair failed: this pair alone
        _fail_on(job, exc, job.read_s + regcore_s + time.perf_counter() - t_eval)
        return
    eval_s = time.perf_counter() - t_eval
    t_w = time.perf_counter()
    field_ = result.displacement.data.detach().to(torch.float32).cpu().numpy()
    writer.write_field(field_, warped_labels)
    values.update(_level_values(result))
    values.update({"regcore_s": regcore_s, "read_s": job.read_s, "iterations": int(result.iterations),
                   "final_loss": float(result.final_loss), "config_hash": chash,
                   "inputs_hash": inputs_hash(fixed["sha"], moving["sha"])})
    values["write_s"] = time.perf_counter() - t_w
    values["runtime_s"] = job.read_s + regcore_s + eval_s + values["write_s"]
    stored = writer.as_stored(values)
    checksum = pair_checksum(stored, field_, warped_labels if writer.has_warped_labels else None)
    writer.write_values({k: v for k, v in stored.items() if k not in ("config_hash", "inputs_hash")})
    writer.write_values({"config_hash": chash, "inputs_hash": values["inputs_hash"], "checksum": checksum,
                         "finished": _now()})
    writer.finish("complete")
    job.out.update(status="complete", checksum=checksum, runtime_s=values["runtime_s"], regcore_s=regcore_s,
                   t_end=time.time())
    job.moving = None


def _register(fixed: dict[str, Any], movings: Sequence[dict[str, Any]], cfg: MethodConfig,
              dev: torch.device) -> list[Any]:
    """One regcore call for ``movings`` against ``fixed``: a result or a RegistrationFailure per pair.
    A single pair goes through :func:`regcore.register` (the one-pair API), more through
    :func:`regcore.batch.register_batch`. Out-of-memory and infrastructure errors are raised."""
    if len(movings) == 1:
        m = movings[0]
        try:
            return [register(fixed["image"], m["image"], cfg, fixed_mask=fixed["mask"], moving_mask=m["mask"],
                             device=dev, fixed_levels=fixed["levels"], moving_levels=m["levels"])]
        except Exception as exc:
            if is_infrastructure_error(exc) or is_out_of_memory(exc):
                raise
            return [RegistrationFailure(0, cfg.name, exc, traceback.format_exc())]
    return register_batch(fixed["image"], [m["image"] for m in movings], cfg, fixed_mask=fixed["mask"],
                          moving_masks=[m["mask"] for m in movings], device=dev, fixed_levels=fixed["levels"],
                          moving_levels=[m["levels"] for m in movings])


def _free_device_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _solve(jobs: list[_PairJob], fixed: dict[str, Any], cfg: MethodConfig, chash: str, dev: torch.device,
           sizes: list[int]) -> None:
    """Register ``jobs`` (moving subjects loaded) as one batch and write each pair; on out-of-memory
    split the batch in halves and solve each (down to single pairs; one pair that still does not
    fit is raised for Dask's retries). ``sizes`` collects the batch sizes actually run."""
    if not jobs:
        return
    t = time.perf_counter()
    out_of_memory = ""
    try:
        results = _register(fixed, [j.moving for j in jobs], cfg, dev)
    except Exception as exc:
        if not is_out_of_memory(exc):
            if is_infrastructure_error(exc):
                raise
            for j in jobs:  # a failure that concerns the whole call (e.g. an invalid config): every pair of it
                _record_failure(j, _message(exc), traceback.format_exc(), j.read_s + time.perf_counter() - t)
            return
        if len(jobs) == 1:
            log.warning("pair %s: out of memory on %s even alone; left to Dask's retries", jobs[0].pair_id, dev)
            if is_infrastructure_error(exc):
                raise
            raise InfrastructureError(f"pair {jobs[0].pair_id}: out of memory on {dev}: {exc}") from exc
        out_of_memory = f"{type(exc).__name__}: {exc}"
    if out_of_memory:  # outside the except block: its traceback (and the tensors its frames hold) is gone
        half = (len(jobs) + 1) // 2
        log.warning("batch of %d pairs (fixed %s) out of memory on %s, split into %d + %d: %s", len(jobs),
                    jobs[0].writer.pair.fixed, dev, half, len(jobs) - half, out_of_memory.splitlines()[0])
        _free_device_memory(dev)
        _solve(jobs[:half], fixed, cfg, chash, dev, sizes)
        _solve(jobs[half:], fixed, cfg, chash, dev, sizes)
        return
    elapsed = time.perf_counter() - t
    sizes.append(len(jobs))
    if len(results) != len(jobs):
        raise RuntimeError(f"register_batch returned {len(results)} results for {len(jobs)} pairs")
    for j, res in zip(jobs, results):
        j.out["batch_size"] = len(jobs)
        # the pair's share of the batch's wall time (one pair: the registration's own time)
        single = len(jobs) == 1 and not isinstance(res, RegistrationFailure)
        regcore_s = float(res.seconds) if single else elapsed / len(jobs)
        if isinstance(res, RegistrationFailure):
            err = res.error
            msg = _message(err)
            _record_failure(j, msg, res.traceback or "".join(traceback.format_exception(err)), j.read_s + regcore_s)
        else:
            _write_result(j, fixed, res, chash, regcore_s)
    del results


def _already_complete(writer: PairWriter, chash: str) -> bool:
    """The pair is complete with ``chash`` and its current inputs (an earlier attempt of this task
    finished it before its worker died or a later pair's write failed)."""
    root, i, pair = writer.root, writer.index, writer.pair
    if str(root["status"][i]) != "complete" or str(root["config_hash"][i]) != chash:
        return False
    try:
        shas = [dict(root[f"images/{k}"].attrs)["content_sha256"] for k in (pair.fixed, pair.moving)]
    except KeyError:
        return False
    return str(root["inputs_hash"][i]) == inputs_hash(*shas)


def _chunk_size(batch_size: int | str | None, fixed: dict[str, Any], jobs: Sequence[_PairJob], cfg: MethodConfig,
                dev: torch.device, store: str | Path) -> int:
    """Pairs per regcore call: all of them (None), at most ``batch_size``, or (``"auto"``) the most
    that :func:`regcore.batch.max_batch_size` finds fit the device (1 on CPU)."""
    n = len(jobs)
    if batch_size is None:
        return max(1, n)
    if batch_size != "auto":
        return max(1, min(n, int(batch_size)))
    root = open_root(store, "r")
    movings = []
    for j in jobs:
        attrs = dict(root[f"images/{j.writer.pair.moving}"].attrs) if f"images/{j.writer.pair.moving}" in root else {}
        if attrs.get("status") == "ok":
            movings.append(grid_from_attrs(attrs))
    largest = max(movings, key=lambda g: g.numel) if movings else None
    return max_batch_size(fixed["image"].grid, largest, cfg, dev, limit=max(1, n))


def register_batch_task(store: str | Path, indices: Sequence[int], config: dict | MethodConfig,
                        device: str | None = None, *, batch_size: int | str | None = None,
                        skip_complete: bool = False) -> list[dict[str, Any]]:
    """Register pairs ``indices`` of ``store`` (all with the same fixed image) with ``config``.

    The fixed subject is read once. The pairs are registered in batches of ``batch_size`` (None:
    all at once; ``"auto"``: as many as :func:`regcore.batch.max_batch_size` finds fit the device,
    1 on CPU), each batch one :func:`regcore.batch.register_batch` call; every pair is written,
    checksummed and marked complete (status last) as soon as its batch is done. A batch that runs
    out of memory is split in halves and retried, recursively; a single pair that still does not
    fit is raised (an infrastructure error: Dask retries the task). A pair whose input cannot be
    read or whose registration fails is recorded as failed, alone.

    Args:
        skip_complete: leave alone a pair that is already complete with this config and its current
            inputs (the runner sets it when not forcing: such a pair was finished by an earlier
            attempt of this very task, which a dead worker or a store error cut short).

    Returns:
        One dict per pair, in the order of ``indices`` (see :func:`register_pair`), plus
        ``batch_size``: the size of the regcore call that registered the pair (0: it never
        reached one: bad input, or already complete).
    """
    t0 = time.perf_counter()
    wall0 = time.time()
    cfg = config if isinstance(config, MethodConfig) else MethodConfig.model_validate(config)
    chash = config_hash(cfg)
    dev = torch.device(device) if device else worker_device()
    host, worker = socket.gethostname(), _worker_name()
    writers = [PairWriter(store, int(i)) for i in indices]
    if not writers:
        return []
    fixed_keys = sorted({w.pair.fixed for w in writers})
    if len(fixed_keys) > 1:
        raise ValueError(f"register_batch_task: the pairs of one task must share the fixed image, got {fixed_keys}")
    outs: dict[int, dict[str, Any]] = {}
    jobs: list[_PairJob] = []
    for w in writers:
        base = {"index": w.index, "pair_id": w.pair.pair_id, "status": "failed", "error": "", "checksum": "",
                "device": str(dev), "host": host, "worker": worker, "runtime_s": float("nan"),
                "regcore_s": float("nan"), "t_start": wall0, "t_end": float("nan"), "batch_size": 0}
        if skip_complete and _already_complete(w, chash):
            base.update(status="complete", checksum=str(w.root["checksum"][w.index]), t_end=time.time(),
                        runtime_s=float(w.root["runtime_s"][w.index]), resumed=True)
            outs[w.index] = base
            continue
        w.begin(host=host, worker=worker, device=str(dev), method=cfg.name, error="", traceback="", finished="",
                started=_now())
        outs[w.index] = base
        jobs.append(_PairJob(w, base, t0))
    if jobs:
        fixed: dict[str, Any] = {}
        fixed_share = 0.0
        try:
            fixed = load_subject(store, fixed_keys[0], "fixed")
        except Exception as exc:  # a bad fixed image fails every pair of the task, each with the message
            if is_infrastructure_error(exc):
                raise
            for j in jobs:
                _record_failure(j, _message(exc), traceback.format_exc(), time.perf_counter() - t0)
            jobs = []
        else:
            fixed_share = (time.perf_counter() - t0) / len(jobs)
        sizes: list[int] = []
        size = _chunk_size(batch_size, fixed, jobs, cfg, dev, store) if jobs else 1
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            ready = []
            for j in chunk:  # the moving subjects of this batch only: memory stays bounded
                t = time.perf_counter()
                try:
                    j.moving = load_subject(store, j.writer.pair.moving, "moving")
                except Exception as exc:
                    _fail_on(j, exc, fixed_share + time.perf_counter() - t)
                    continue
                j.read_s = fixed_share + time.perf_counter() - t
                ready.append(j)
            _solve(ready, fixed, cfg, chash, dev, sizes)
        if sizes:
            log.info("fixed %s: %d pairs registered on %s in batches of %s (%.1f s)", fixed_keys[0], sum(sizes), dev,
                     sizes, time.perf_counter() - t0)
    return [outs[int(i)] for i in indices]


def register_pair(store: str | Path, index: int, config: dict | MethodConfig, device: str | None = None) -> dict[str, Any]:
    """Register pair ``index`` of ``store`` with ``config`` (a full regcore method config): the task
    of one pair (:func:`register_batch_task` with one index).

    Returns a small dict: ``index``, ``pair_id``, ``status`` (``complete``/``failed``), ``error``,
    ``checksum``, ``runtime_s`` (whole task), ``regcore_s`` (registration alone), ``device``,
    ``host``, ``worker``, ``t_start``/``t_end`` (epoch seconds), ``batch_size`` (1, or 0 when the
    pair never reached registration).
    """
    return register_batch_task(store, [index], config, device)[0]
