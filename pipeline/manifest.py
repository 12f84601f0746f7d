"""Cohort manifests: a CSV of subjects (or a BIDS folder) -> a list of :class:`Subject` records.

CSV columns: ``subject`` and ``image`` are required; ``labels``, ``landmarks``, ``mask`` and
``session`` are optional. Relative paths are relative to the manifest's folder. Paths are *not*
opened here (a missing file is reported per image at ingest, so one bad file never stops a cohort);
the manifest itself must be well formed.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from regcore import InputError

__all__ = ["Subject", "read_manifest", "read_bids", "write_manifest", "image_key", "OPTIONAL_COLUMNS"]

REQUIRED_COLUMNS = ("subject", "image")
OPTIONAL_COLUMNS = ("labels", "landmarks", "mask", "session")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_key(subject: str, session: str = "") -> str:
    """The store key of a subject (and session): ``sub01`` or ``sub01_ses-2``, path-safe."""
    key = subject if not session else f"{subject}_ses-{session}"
    return _SAFE.sub("-", key)


@dataclass(frozen=True)
class Subject:
    """One image of the cohort and its optional companions (absolute paths)."""

    subject: str
    image: Path
    session: str = ""
    labels: Path | None = None
    landmarks: Path | None = None
    mask: Path | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """Store key, unique in a cohort (see :func:`image_key`)."""
        return image_key(self.subject, self.session)


def read_manifest(path: str | Path) -> list[Subject]:
    """Subjects listed in a manifest CSV.

    Raises:
        InputError: the file is missing or empty, a required column is missing, a row has no
            subject or image, or two rows share a subject and session.
    """
    p = Path(path)
    if p.is_dir():
        return read_bids(p)
    if not p.is_file():
        raise InputError(f"manifest {str(p)!r}: no such file")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise InputError(f"manifest {str(p)!r}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not rows:
        raise InputError(f"manifest {str(p)!r}: no subjects")
    base = p.resolve().parent
    subjects: list[Subject] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not row.get("subject") or not row.get("image"):
            raise InputError(f"manifest {str(p)!r} line {line}: 'subject' and 'image' must not be empty")
        subj = Subject(
            subject=row["subject"],
            session=row.get("session", ""),
            image=_resolve(base, row["image"]),
            labels=_resolve(base, row.get("labels", "")),
            landmarks=_resolve(base, row.get("landmarks", "")),
            mask=_resolve(base, row.get("mask", "")),
            extra={k: v for k, v in row.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS},
        )
        if subj.key in (".", "..") or not subj.key.strip("._-"):
            raise InputError(f"manifest {str(p)!r} line {line}: subject {subj.subject!r} session {subj.session!r} "
                             "cannot name a store folder (use letters or digits)")
        if subj.key in seen:
            raise InputError(f"manifest {str(p)!r} line {line}: subject {subj.subject!r} session {subj.session!r} "
                             f"already listed on line {seen[subj.key]}")
        seen[subj.key] = line
        subjects.append(subj)
    return subjects


def _resolve(base: Path, value: str) -> Path | None:
    if not value:
        return None
    q = Path(value).expanduser()
    return q if q.is_absolute() else (base / q)


def write_manifest(subjects: list[Subject], path: str | Path) -> Path:
    """Write subjects as a manifest CSV (paths relative to the manifest where possible)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.resolve().parent

    def rel(q: Path | None) -> str:
        if q is None:
            return ""
        try:
            return str(Path(q).resolve().relative_to(base))
        except ValueError:
            return str(q)

    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "session", "image", "labels", "landmarks", "mask"])
        for s in subjects:
            w.writerow([s.subject, s.session, rel(s.image), rel(s.labels), rel(s.landmarks), rel(s.mask)])
    return p


def read_bids(root: str | Path, suffix: str = "T1w") -> list[Subject]:
    """Subjects of a BIDS folder: ``sub-*/[ses-*/]anat/*_<suffix>.nii[.gz]`` (one image each).

    Label maps are taken from ``derivatives/*/sub-*/[ses-*/]anat/*_dseg.nii[.gz]`` when present.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"BIDS folder {str(root)!r}: no such folder")
    subjects: list[Subject] = []
    for img in sorted(root.glob(f"sub-*/**/anat/*_{suffix}.nii*")):
        if "derivatives" in img.parts:
            continue
        ents = dict(part.split("-", 1) for part in img.name.split(".")[0].split("_") if "-" in part)
        stem = img.name.split(f"_{suffix}")[0]
        dseg = sorted(root.glob(f"derivatives/*/**/{stem}*_dseg.nii*"))
        subjects.append(Subject(subject=ents.get("sub", img.parent.parent.name), session=ents.get("ses", ""),
                                image=img, labels=dseg[0] if dseg else None))
    if not subjects:
        raise InputError(f"BIDS folder {str(root)!r}: no sub-*/anat/*_{suffix}.nii[.gz] images")
    return subjects
