"""Ingest: every image (and label map, mask, landmarks) of a cohort into chunked Zarr, as a Dask job.

One task per subject writes only its own group ``images/<key>`` (see :mod:`pipeline.zarrio`), so
tasks never share a chunk. Ingest is idempotent: a subject whose source files are unchanged (same
paths, sizes and modification times) is skipped, whether it succeeded or failed before. A bad
input (missing or unreadable file, NaNs, a constant image, a label map on another grid) is
recorded in the group (``status="failed"``, ``error``) and the other subjects go on; the pairs
that use it fail alone, with that message.

Each subject's group also records its source files as read (``files``: per kind, the path, size in
bytes and content sha256, streamed), so a result can be traced to the exact bytes it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zarr

from regcore import Image, InputError, read_image
from regcore.integrity import file_digest
from regcore.points import read_points
from regcore.pyramid import downsample

from .manifest import Subject
from .zarrio import grid_attrs, level_name, write_image_array
from .store import open_root

__all__ = ["ingest", "ingest_subject", "IngestReport", "LEVELS", "images_group", "subject_fingerprint", "source_files",
           "ingested_subjects"]

log = logging.getLogger(__name__)

LEVELS = (2.0, 4.0)  # downsampling factors stored beside level 0
INGEST_VERSION = 1


def images_group(store: str | Path) -> zarr.Group:
    """The ``images`` group of a cohort store (created if needed)."""
    root = open_root(store, "a")
    return root.require_group("images")


def _file_stamp(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), "missing"]
    if Path(path).is_dir():  # a DICOM series: stamp the folder's files
        files = sorted(Path(path).iterdir())
        return [str(path), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]]
    return [str(path), st.st_size, st.st_mtime_ns]


def subject_fingerprint(subject: Subject) -> str:
    """sha256 of the subject's source paths, sizes and modification times (and the ingest version)."""
    stamp = {
        "version": INGEST_VERSION,
        "levels": list(LEVELS),
        **{k: _file_stamp(getattr(subject, k)) for k in ("image", "labels", "mask", "landmarks")},
    }
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file; for a folder (a DICOM series) the total size, the
    number of files and the sha256 of its sorted ``name<TAB>bytes<TAB>sha256`` lines."""
    record: dict[str, Any] = {"path": str(path)}
    try:
        if path.is_dir():
            lines, total = [], 0
            files = sorted(f for f in path.iterdir() if f.is_file())
            for f in files:
                size, sha = file_digest(f)
                total += size
                lines.append(f"{f.name}\t{size}\t{sha}\n")
            record.update(bytes=total, files=len(files),
                          sha256=hashlib.sha256("".join(lines).encode()).hexdigest())
        else:
            size, sha = file_digest(path)
            record.update(bytes=size, sha256=sha)
    except OSError as exc:
        record["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    return record


def source_files(subject: Subject) -> dict[str, dict[str, Any]]:
    """Path, size (bytes) and content sha256 of each source file of ``subject``, by kind
    (``image``, ``labels``, ``mask``, ``landmarks``); a file that cannot be read gets ``error``."""
    return {kind: _file_record(Path(getattr(subject, kind))) for kind in ("image", "labels", "mask", "landmarks")
            if getattr(subject, kind) is not None}


def _same_grid(a: Image, b: Image) -> bool:
    ga, gb = a.grid, b.grid
    return ga.size == gb.size and np.allclose(ga.spacing, gb.spacing, rtol=1e-4) and np.allclose(
        ga.origin, gb.origin, atol=1e-3 * max(ga.spacing)) and np.allclose(ga.direction, gb.direction, atol=1e-4)


def _validate_image(image: Image, path: Path) -> None:
    data = image.data
    if not torch.isfinite(data).all():
        raise InputError(f"image {str(path)!r}: contains NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise InputError(f"image {str(path)!r}: no contrast, every voxel is {lo:g}")


def _companion(path: Path, image: Image, what: str) -> Image:
    comp = read_image(path, dtype=None)
    if comp.data.shape[0] != 1:
        raise InputError(f"{what} {str(path)!r}: must have one component, has {comp.data.shape[0]}")
    if not _same_grid(comp, image):
        raise InputError(f"{what} {str(path)!r}: grid {comp.grid.size} spacing {comp.grid.spacing} does not match "
                         f"the image's {image.grid.size} spacing {image.grid.spacing}")
    return comp


def ingest_subject(subject: Subject, store: str | Path, force: bool = False) -> dict[str, Any]:
    """Ingest one subject into ``store/images/<key>``; return ``{"key", "status", "error"}``.

    ``status`` is ``ok``, ``failed`` (bad input, recorded in the group) or ``skipped`` (unchanged).
    Errors other than bad input (the store cannot be written) propagate.
    """
    group_parent = images_group(store)
    key = subject.key
    fingerprint = subject_fingerprint(subject)
    if not force and key in group_parent:
        attrs = dict(group_parent[key].attrs)
        if attrs.get("fingerprint") == fingerprint and attrs.get("status") in ("ok", "failed"):
            return {"key": key, "status": "skipped", "error": attrs.get("error", "")}
    group = group_parent.create_group(key, overwrite=True)
    base_attrs = {"subject": subject.subject, "session": subject.session, "source": str(subject.image),
                  "fingerprint": fingerprint, "files": source_files(subject)}
    group.attrs.update({**base_attrs, "status": "ingesting"})
    try:
        attrs = _write_subject(group, subject)
    except InputError as exc:
        group.attrs.update({**base_attrs, "status": "failed", "error": str(exc)})
        log.warning("ingest %s failed: %s", key, exc)
        return {"key": key, "status": "failed", "error": str(exc)}
    except Exception as exc:  # an unreadable file may raise anything from the reader
        msg = f"image {str(subject.image)!r}: {type(exc).__name__}: {exc}"
        group.attrs.update({**base_attrs, "status": "failed", "error": msg, "traceback": traceback.format_exc()})
        log.warning("ingest %s failed: %s", key, msg)
        return {"key": key, "status": "failed", "error": msg}
    group.attrs.update({**base_attrs, **attrs, "status": "ok"})  # written last
    return {"key": key, "status": "ok", "error": ""}


def _write_subject(group: zarr.Group, subject: Subject) -> dict[str, Any]:
    image = read_image(subject.image)
    _validate_image(image, subject.image)
    digest = hashlib.sha256()
    levels = group.create_group("image")
    write_image_array(levels, "0", image)  # level 0: the original grid
    digest.update(image.data.numpy().tobytes())
    stored = [1.0]
    for factor in LEVELS:
        coarse = downsample(image, factor)
        if coarse.grid.size == image.grid.size:
            break
        write_image_array(levels, level_name(factor), coarse)
        stored.append(factor)
    attrs: dict[str, Any] = {"ndim": image.ndim, "channels": int(image.data.shape[0]), "levels": stored,
                             **grid_attrs(image.grid), "labels": [], "has_mask": False, "landmarks": 0}
    if subject.labels is not None:
        lab = _companion(subject.labels, image, "label map")
        if lab.data.is_floating_point() and not torch.equal(lab.data, lab.data.round()):
            raise InputError(f"label map {str(subject.labels)!r}: holds non-integer values")
        lab = Image(lab.data.round().to(torch.int32), lab.grid)
        write_image_array(group.create_group("labels"), "0", lab, dtype="int32")
        digest.update(lab.data.numpy().tobytes())
        attrs["labels"] = sorted(int(v) for v in torch.unique(lab.data).tolist() if v != 0)
    if subject.mask is not None:
        mask = _companion(subject.mask, image, "mask")
        mask = Image((mask.data > 0).to(torch.uint8), mask.grid)
        if not mask.data.any():
            raise InputError(f"mask {str(subject.mask)!r}: is empty")
        write_image_array(group.create_group("mask"), "0", mask, dtype="uint8")
        digest.update(mask.data.numpy().tobytes())
        attrs["has_mask"] = True
    if subject.landmarks is not None:
        pts = read_points(subject.landmarks, image.grid)
        if pts.shape[1] != image.ndim:
            raise InputError(f"landmarks {str(subject.landmarks)!r}: {pts.shape[1]}D points for a {image.ndim}D image")
        lm = group.create_array("landmarks", shape=pts.shape, dtype="float64", overwrite=True)
        lm[...] = pts
        digest.update(pts.tobytes())
        attrs["landmarks"] = int(pts.shape[0])
    attrs["content_sha256"] = digest.hexdigest()
    return attrs


@dataclass
class IngestReport:
    """What an ingest run did, per subject key."""

    results: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.results)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] == "failed"]

    def summary(self) -> str:
        return (f"ingest: {self.count('ok')} written, {self.count('skipped')} unchanged, "
                f"{self.count('failed')} failed")


def ingest(subjects: Sequence[Subject], store: str | Path, client: Any = None, force: bool = False) -> IngestReport:
    """Ingest a cohort into ``store`` (a Zarr v3 directory), one Dask task per subject.

    Args:
        subjects: from :func:`pipeline.manifest.read_manifest`.
        store: the cohort store path (created if needed).
        client: a ``distributed.Client``; ``None`` runs the tasks in this process.
        force: rewrite subjects even when unchanged.
    """
    keys = [s.key for s in subjects]
    if len(set(keys)) != len(keys):
        raise InputError("two subjects share a key (subject + session must be unique)")
    images_group(store)  # parent groups exist before tasks write into them
    if client is None:
        results = [ingest_subject(s, store, force) for s in subjects]
    else:
        token = uuid.uuid4().hex[:8]  # a fresh key per call: the scheduler may still hold the last call's results
        futures = client.map(ingest_subject, list(subjects), store=str(store), force=force, pure=False,
                             key=[f"ingest-{k}-{token}" for k in keys])
        results = client.gather(futures)
    return IngestReport(list(results))


def ingested_subjects(store: str | Path) -> list[Subject]:
    """The subjects already ingested in ``store`` (their recorded names, sessions and sources)."""
    root = open_root(store, "r") if Path(store).exists() else None
    if root is None or "images" not in root:
        raise InputError(f"store {str(store)!r}: nothing ingested; pass --manifest")
    out = []
    for key, g in sorted(root["images"].groups()):
        a = dict(g.attrs)
        out.append(Subject(a.get("subject", key), Path(a.get("source", "")), session=a.get("session", "")))
    return out
