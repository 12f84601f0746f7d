"""Export transforms and fields in ITK's formats (readable by SimpleITK, ANTs and elastix tools).

* Linear transforms -> ITK ``AffineTransform`` (``T(x) = A (x - c) + c + t``, fixed -> moving
  world points, LPS mm): exactly regcore's own parameterisation, so nothing is converted.
* Displacement fields -> vector images of float64 on the fixed grid, components ``(x, y, z)`` in
  world mm: what ``sitk.DisplacementFieldTransform`` expects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .image import Image
from .io import image_to_sitk
from .transforms.linear import LinearTransform

__all__ = [
    "linear_to_sitk",
    "matrix_to_sitk",
    "write_linear_transform",
    "read_linear_matrix",
    "displacement_to_sitk",
    "displacement_transform",
    "write_displacement",
    "read_displacement",
    "write_field_transform",
]


def matrix_to_sitk(matrix: np.ndarray | torch.Tensor, center: np.ndarray | torch.Tensor | None = None) -> sitk.AffineTransform:
    """An ITK ``AffineTransform`` equal to a homogeneous world matrix (optionally about ``center``)."""
    m = np.asarray(torch.as_tensor(matrix).detach().cpu(), dtype=np.float64)
    d = m.shape[0] - 1
    c = np.zeros(d) if center is None else np.asarray(torch.as_tensor(center).detach().cpu(), dtype=np.float64)
    a, offset = m[:d, :d], m[:d, d]
    tx = sitk.AffineTransform(d)
    tx.SetCenter(c.tolist())
    tx.SetMatrix(a.ravel().tolist())
    tx.SetTranslation((offset + a @ c - c).tolist())  # A(x-c)+c+t == A x + offset
    return tx


def linear_to_sitk(transform: LinearTransform) -> sitk.AffineTransform:
    """The fitted linear transform as an ITK ``AffineTransform`` with the same centre."""
    return matrix_to_sitk(transform.matrix(), transform.center)


def write_linear_transform(transform: LinearTransform | np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write an ITK transform file (``.tfm``/``.txt``/``.h5``/``.mat``) read by SimpleITK and ANTs."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tx = linear_to_sitk(transform) if isinstance(transform, LinearTransform) else matrix_to_sitk(transform)
    sitk.WriteTransform(tx, str(p))
    return p


def read_linear_matrix(path: str | Path) -> np.ndarray:
    """Homogeneous world matrix (fixed -> moving, mm) of an ITK linear transform file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"transform {str(p)!r}: no such file")
    try:
        tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        raise InputError(f"transform {str(p)!r}: cannot be read by SimpleITK ({exc})") from exc
    if tx.GetName() == "CompositeTransform":
        tx = sitk.CompositeTransform(tx)
        if tx.GetNumberOfTransforms() != 1:
            raise InputError(f"transform {str(p)!r}: holds {tx.GetNumberOfTransforms()} transforms; expected one linear")
        tx = tx.GetNthTransform(0)
    d = tx.GetDimension()
    try:
        affine = sitk.AffineTransform(tx)
    except (RuntimeError, TypeError):
        affine = None
    if affine is None:
        raise InputError(f"transform {str(p)!r}: {tx.GetName()} is not a linear transform")
    a = np.asarray(affine.GetMatrix()).reshape(d, d)
    c, t = np.asarray(affine.GetCenter()), np.asarray(affine.GetTranslation())
    m = np.eye(d + 1)
    m[:d, :d] = a
    m[:d, d] = t + c - a @ c
    return m


def displacement_to_sitk(displacement: Image) -> sitk.Image:
    """A ``D``-channel displacement image (mm) as a float64 SimpleITK vector image."""
    if displacement.channels != displacement.ndim:
        raise InputError(f"a displacement field needs {displacement.ndim} channels, got {displacement.channels}")
    return image_to_sitk(displacement, np.float64)


def displacement_transform(displacement: Image) -> sitk.DisplacementFieldTransform:
    """A SimpleITK ``DisplacementFieldTransform`` (linear field interpolation) for ``Resample``."""
    return sitk.DisplacementFieldTransform(displacement_to_sitk(displacement))


def write_displacement(displacement: Image, path: str | Path) -> Path:
    """Write the field as an ITK displacement image (``.nii.gz``, ``.mha``, ``.nrrd``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(displacement_to_sitk(displacement), str(p), useCompression=True)
    return p


def read_displacement(path: str | Path) -> Image:
    """Read a displacement field image back as a ``D``-channel :class:`Image` (float32, mm)."""
    from .io import read_image

    img = read_image(path, dtype=torch.float32)
    if img.channels != img.ndim:
        raise InputError(f"displacement {str(path)!r}: has {img.channels} components, expected {img.ndim}")
    return img


def write_field_transform(displacement: Image, path: str | Path) -> Path:
    """Write the field as an ITK transform file (``.h5``: an HDF5 ``DisplacementFieldTransform``,
    what fMRIPrep's ``*_xfm.h5`` hold), read by ``sitk.ReadTransform`` and ``antsApplyTransforms``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteTransform(displacement_transform(displacement), str(p))
    return p
