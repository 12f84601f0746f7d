"""The per-pair Dask task: read a pair from Zarr, register it with regcore, write field and metrics.

``register_pair`` never raises for a bad pair: registration and input errors are recorded in the
store (status ``failed``, message, traceback, host, device) and returned. Only infrastructure
failures (the store cannot be written) propagate, so that Dask's ``retries`` apply to them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regcore import Image, InfrastructureError, InputError, register
from regcore.config import MethodConfig, config_hash
from regcore.pair_metrics import evaluate_pair

from .store import PairWriter, open_root, pair_checksum
from .zarrio import level_name, read_image_array

__all__ = ["register_pair", "load_subject", "pair_metrics", "inputs_hash", "worker_device", "is_infrastructure_error"]

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


def register_pair(store: str | Path, index: int, config: dict | MethodConfig, device: str | None = None) -> dict[str, Any]:
    """Register pair ``index`` of ``store`` with ``config`` (a full regcore method config).

    Returns a small dict: ``index``, ``pair_id``, ``status`` (``complete``/``failed``), ``error``,
    ``checksum``, ``runtime_s`` (whole task), ``regcore_s`` (registration alone), ``device``,
    ``host``, ``worker``, ``t_start``/``t_end`` (epoch seconds).
    """
    t0 = time.perf_counter()
    wall0 = time.time()
    cfg = config if isinstance(config, MethodConfig) else MethodConfig.model_validate(config)
    chash = config_hash(cfg)
    dev = torch.device(device) if device else worker_device()
    host = socket.gethostname()
    writer = PairWriter(store, index)
    pair = writer.pair
    writer.begin(host=host, worker=_worker_name(), device=str(dev), method=cfg.name, error="", traceback="",
                 finished="", started=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out = {"index": index, "pair_id": pair.pair_id, "status": "failed", "error": "", "checksum": "",
           "device": str(dev), "host": host, "worker": _worker_name(), "runtime_s": float("nan"),
           "regcore_s": float("nan"), "t_start": wall0, "t_end": float("nan")}
    try:
        fixed = load_subject(store, pair.fixed, "fixed")
        moving = load_subject(store, pair.moving, "moving")
        t_read = time.perf_counter() - t0
        result = register(fixed["image"], moving["image"], cfg, fixed_mask=fixed["mask"], moving_mask=moving["mask"],
                          device=dev, fixed_levels=fixed["levels"], moving_levels=moving["levels"])
        t_reg = result.seconds
        with torch.no_grad():
            values, warped_labels = pair_metrics(fixed, moving, result.displacement, writer.layout.labels,
                                                 result.jacobian)
    except Exception as exc:
        if is_infrastructure_error(exc):  # raised: Dask retries the task; the runner records it once retries are spent
            log.warning("pair %s: infrastructure error, left to Dask's retries: %s: %s", pair.pair_id,
                        type(exc).__name__, exc)
            raise
        # a bad pair (input or registration) is recorded, never raised: retrying cannot help it
        msg = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        log.warning("pair %s failed: %s", pair.pair_id, msg)
        writer.root["error"][index] = f"{pair.pair_id}: {msg}"
        writer.root["traceback"][index] = traceback.format_exc()
        writer.root["runtime_s"][index] = time.perf_counter() - t0
        writer.root["finished"][index] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        writer.finish("failed")
        out.update(error=f"{pair.pair_id}: {msg}", runtime_s=time.perf_counter() - t0, t_end=time.time())
        return out
    t_w = time.perf_counter()
    field = result.displacement.data.detach().to(torch.float32).cpu().numpy()
    writer.write_field(field, warped_labels)
    values.update(_level_values(result))
    values.update({"regcore_s": t_reg, "read_s": t_read, "iterations": int(result.iterations),
                   "final_loss": float(result.final_loss), "config_hash": chash,
                   "inputs_hash": inputs_hash(fixed["sha"], moving["sha"])})
    values["write_s"] = time.perf_counter() - t_w
    values["runtime_s"] = time.perf_counter() - t0
    stored = writer.as_stored(values)
    checksum = pair_checksum(stored, field, warped_labels if writer.has_warped_labels else None)
    writer.write_values({k: v for k, v in stored.items() if k not in ("config_hash", "inputs_hash")})
    writer.write_values({"config_hash": chash, "inputs_hash": values["inputs_hash"], "checksum": checksum,
                         "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    writer.finish("complete")
    out.update(status="complete", checksum=checksum, runtime_s=values["runtime_s"], regcore_s=t_reg, t_end=time.time())
    return out
