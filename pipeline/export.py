"""Bulk export of a results store's transforms as files other tools read without conversion.

Every complete pair's field (fixed grid, fixed -> moving, world mm, the linear stage included) is
written as:

* ``itk``: ``OUT/<pair_id>/displacement.nii.gz`` (an ITK/ANTs displacement image: the warp
  ``antsApplyTransforms -t`` and ``sitk.DisplacementFieldTransform`` take) and
  ``OUT/<pair_id>/transform.h5`` (one ITK transform file, ``sitk.ReadTransform``), plus
  ``warped_labels.nii.gz`` when the pair has them;
* ``ants``: ``OUT/<pair_id>/<pair_id>_Warp.nii.gz`` (and ``_InverseWarp.nii.gz``), ANTs' names;
* ``bids``: a BIDS-derivatives dataset: ``dataset_description.json`` and, under the moving
  subject, ``sub-<m>[/ses-<s>]/anat/sub-<m>[_ses-<s>]_from-<moving>_to-<fixed>_mode-image_xfm.h5``
  (fMRIPrep's names: the transform that resamples the moving image into the fixed image's space)
  and ``..._space-<fixed>_dseg.nii.gz`` (the moving labels in the fixed space).

With ``inverse``, the inverse transform (moving -> fixed, on the moving image's grid) is computed
from the field (:func:`regcore.fields.invert_onto`) and written beside it (``inverse_displacement``,
``_InverseWarp``, ``from-<fixed>_to-<moving>``): exact for diffeomorphic methods up to the fixed
point iteration's tolerance, undefined where the moving image lies outside the fixed field of view.
"""

from __future__ import annotations

import json
import logging
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import torch

from regcore import Image, InputError, write_image
from regcore.export import write_displacement, write_field_transform
from regcore.fields import invert_onto

from .store import open_root, read_field, read_layout, read_warped_labels
from .zarrio import grid_from_attrs

__all__ = ["export_store", "FORMATS", "bids_label"]

log = logging.getLogger(__name__)

FORMATS = ("itk", "ants", "bids")


def bids_label(key: str) -> str:
    """A BIDS entity label from a store key: ``sub-01`` -> ``01``, other characters than letters
    and digits dropped (``ses-2`` parts are handled by the caller)."""
    label = re.sub(r"^sub-", "", key)
    label = re.sub(r"[^A-Za-z0-9]", "", label)
    if not label:
        raise InputError(f"subject key {key!r} gives an empty BIDS label")
    return label


def _subject_session(attrs: dict, key: str) -> tuple[str, str]:
    subject = bids_label(str(attrs.get("subject", key)))
    session = re.sub(r"[^A-Za-z0-9]", "", str(attrs.get("session", "")))
    return subject, session


def export_store(store: str | Path, out: str | Path, fmt: str = "itk", inverse: bool = False,
                 pairs: Sequence[int | str] | None = None) -> list[Path]:
    """Write every complete pair's transform (or those in ``pairs``) under ``out``; the paths.

    Args:
        store: a results store.
        out: the output folder (created).
        fmt: ``itk``, ``ants`` or ``bids`` (see the module doc).
        inverse: also write the inverse transforms (moving -> fixed, moving grid).
        pairs: indices or pair ids (default: every complete pair).
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    layout = read_layout(store)
    root = open_root(store, "r")
    status = [str(s) for s in root["status"][...]]
    images = {k: dict(g.attrs) for k, g in root["images"].groups()} if "images" in root else {}
    chosen = [layout.index(p) for p in pairs] if pairs is not None else list(range(len(layout.pairs)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if fmt == "bids":
        written.append(_dataset_description(out, store))
    for i in chosen:
        pair = layout.pairs[i]
        if status[i] != "complete":
            if pairs is not None:
                raise InputError(f"pair {pair.pair_id}: not complete (status {status[i]!r}); nothing to export")
            continue
        field = read_field(store, i)
        labels = read_warped_labels(store, i)
        inv = None
        if inverse:
            attrs = images.get(pair.moving)
            if not attrs or attrs.get("status") != "ok":
                raise InputError(f"pair {pair.pair_id}: the moving image's grid is not in the store; cannot invert")
            moving_grid = grid_from_attrs(attrs)
            inv = Image(invert_onto(field.data.float(), field.grid, moving_grid), moving_grid)
        written += _write_pair(out, fmt, pair, field, labels, inv, images)
        log.info("exported %s", pair.pair_id)
    return written


def _write_pair(out: Path, fmt: str, pair, field: Image, labels: Image | None, inv: Image | None,
                images: dict) -> list[Path]:
    paths: list[Path] = []
    if fmt == "itk":
        folder = out / pair.pair_id
        paths += [write_displacement(field, folder / "displacement.nii.gz"),
                  write_field_transform(field, folder / "transform.h5")]
        if inv is not None:
            paths += [write_displacement(inv, folder / "inverse_displacement.nii.gz"),
                      write_field_transform(inv, folder / "inverse_transform.h5")]
        if labels is not None:
            paths.append(write_image(Image(labels.data.to(torch.int32), labels.grid), folder / "warped_labels.nii.gz"))
    elif fmt == "ants":
        folder = out / pair.pair_id
        paths.append(write_displacement(field, folder / f"{pair.pair_id}_Warp.nii.gz"))
        if inv is not None:
            paths.append(write_displacement(inv, folder / f"{pair.pair_id}_InverseWarp.nii.gz"))
        if labels is not None:
            paths.append(write_image(Image(labels.data.to(torch.int32), labels.grid), folder / "warped_labels.nii.gz"))
    else:  # bids
        sub, ses = _subject_session(images.get(pair.moving, {}), pair.moving)
        fixed_label = bids_label(str(images.get(pair.fixed, {}).get("subject", pair.fixed)))
        moving_label = bids_label(pair.moving)
        folder = out / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
        stem = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
        paths.append(write_field_transform(field, folder / f"{stem}_from-{moving_label}_to-{fixed_label}_mode-image_xfm.h5"))
        if inv is not None:
            paths.append(write_field_transform(inv, folder / f"{stem}_from-{fixed_label}_to-{moving_label}_mode-image_xfm.h5"))
        if labels is not None:
            paths.append(write_image(Image(labels.data.to(torch.int32), labels.grid),
                                     folder / f"{stem}_space-{fixed_label}_dseg.nii.gz"))
    return paths


def _dataset_description(out: Path, store: str | Path) -> Path:
    try:
        ours = version("cohortreg")
    except PackageNotFoundError:  # pragma: no cover
        ours = "unknown"
    attrs = dict(open_root(store, "r").attrs)
    desc = {"Name": "cohortreg registrations", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "cohortreg", "Version": ours,
                             "Description": f"method {attrs.get('method', '?')}, config hash "
                                            f"{str(attrs.get('config_hash', '?'))[:12]}"}]}
    path = out / "dataset_description.json"
    path.write_text(json.dumps(desc, indent=2))
    return path
