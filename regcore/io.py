"""Image IO through SimpleITK (the only file path into regcore) and SimpleITK <-> Image adapters.

Any format SimpleITK reads is accepted (NIfTI, MetaImage, NRRD, PNG/JPEG, ...); a folder is read
as a DICOM series. Geometry (spacing, origin, direction) is carried over unchanged; SimpleITK
already reports it in ITK's LPS world frame. FreeSurfer's MGH files (``.mgh``, ``.mgz``), which
SimpleITK cannot read, are read by nibabel and handed over as a SimpleITK image, their RAS
geometry turned into LPS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .grid import Grid
from .image import Image
from .integrity import check_file, check_finite

__all__ = [
    "read_image",
    "write_image",
    "read_dicom_series",
    "write_dicom_series",
    "image_from_sitk",
    "image_to_sitk",
    "grid_from_sitk",
    "apply_grid_to_sitk",
]

log = logging.getLogger(__name__)

_TORCH_FROM_NUMPY_SAFE = {
    np.dtype("uint16"): np.int32,
    np.dtype("uint32"): np.int64,
    np.dtype("uint64"): np.int64,
    np.dtype("int8"): np.int16,
}


def grid_from_sitk(img: sitk.Image) -> Grid:
    """The :class:`Grid` of a SimpleITK image (2D or 3D)."""
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise InputError(f"only 2D and 3D images are supported, got a {dim}D image of size {img.GetSize()}")
    return Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def apply_grid_to_sitk(img: sitk.Image, grid: Grid) -> sitk.Image:
    """Set spacing, origin and direction of ``img`` from ``grid`` (in place; returns ``img``)."""
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


def image_from_sitk(img: sitk.Image, dtype: torch.dtype | None = torch.float32, scalar: bool = False) -> Image:
    """Convert a SimpleITK image to an :class:`Image` ``(C, *shape)``.

    Args:
        dtype: tensor dtype; ``None`` keeps the pixel type (unsigned types widened for torch).
        scalar: average multi-component pixels (RGB photos, for instance) to one channel.
    """
    grid = grid_from_sitk(img)
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (z, y, x, C)
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
        if scalar:
            arr = arr.astype(np.float64).mean(axis=0, keepdims=True)
    else:
        arr = arr[None]
    if arr.dtype in _TORCH_FROM_NUMPY_SAFE and dtype is None:
        arr = arr.astype(_TORCH_FROM_NUMPY_SAFE[arr.dtype])
    tensor = torch.from_numpy(np.ascontiguousarray(arr))
    if dtype is not None:
        tensor = tensor.to(dtype)
    return Image(tensor, grid)


def image_to_sitk(image: Image, pixel_dtype: np.dtype | type | None = None) -> sitk.Image:
    """Convert an :class:`Image` to SimpleITK; ``C > 1`` becomes a vector image (components last).

    ``pixel_dtype`` casts the numpy data first (``int64`` is stored as ``int32`` unless asked).
    """
    arr = image.numpy()
    if pixel_dtype is not None:
        arr = arr.astype(pixel_dtype)
    elif arr.dtype == np.int64:
        arr = arr.astype(np.int32)
    if image.channels == 1:
        out = sitk.GetImageFromArray(arr[0])
    else:
        out = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
    return apply_grid_to_sitk(out, image.grid)


def _check_path(path: str | Path, what: str = "image") -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r}: no such file or directory")
    return p


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _read_mgh(path: Path) -> sitk.Image:
    """A FreeSurfer MGH/MGZ volume as a SimpleITK image (LPS geometry, the file's voxel type).

    nibabel gives the voxel-to-RAS affine of the header (scanner RAS, ``c_ras`` included);
    ITK's world is LPS, so the affine's first two rows change sign. One frame only.
    """
    import nibabel  # a dependency; imported here so that other formats do not pay for it

    try:
        img = nibabel.load(str(path))
        if not isinstance(img, nibabel.freesurfer.mghformat.MGHImage):
            raise ValueError(f"not an MGH file ({type(img).__name__})")
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many kinds (EOFError, zlib.error, ImageFileError, ...)
        raise InputError(f"image {str(path)!r}: cannot be read as FreeSurfer MGH ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"image {str(path)!r}: only single-frame 3D MGH volumes are supported, got shape {data.shape}")
    affine = _RAS_TO_LPS @ np.asarray(img.affine, dtype=np.float64)[:3]
    linear = affine[:, :3]
    spacing = np.linalg.norm(linear, axis=0)
    data = data.astype(data.dtype.newbyteorder("="), copy=False)  # MGH stores big-endian
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(f"image {str(path)!r}: its vox2ras matrix is sheared (axes not orthogonal); "
                         "resample it onto an orthogonal grid first (e.g. mri_convert)")
    out = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # (x, y, z) -> (z, y, x)
    out.SetSpacing(spacing.tolist())
    out.SetOrigin(affine[:, 3].tolist())
    out.SetDirection(direction.flatten().tolist())
    return out


def read_image(
    path: str | Path, dtype: torch.dtype | None = torch.float32, scalar: bool = False
) -> Image:
    """Read an image file (any SimpleITK format, or FreeSurfer MGH/MGZ) or a DICOM series folder.

    Args:
        path: a file, or a folder holding one DICOM series.
        dtype: tensor dtype (``None`` keeps the file's pixel type, e.g. for label maps).
        scalar: average multi-component pixels to one channel (RGB PNG/JPEG).

    Besides SimpleITK's own checks, the file is checked by :mod:`regcore.integrity`: voxel data
    shorter than the header declares (NIfTI, MetaImage, NRRD; SimpleITK pads a cut NIfTI file with
    zeros) and NaN or infinite voxels (SimpleITK's NIfTI reader silently turns them into 0, so
    float NIfTI files are scanned as stored; float data of every format is scanned once read).

    Raises:
        InputError: the path does not exist, SimpleITK cannot read it, the file is truncated or
            corrupt, it holds NaN or infinite voxels, or it is not 2D/3D.
    """
    p = _check_path(path)
    if p.is_dir():
        return read_dicom_series(p, dtype=dtype, scalar=scalar)
    check_file(p)
    if p.name.lower().endswith((".mgz", ".mgh")):
        img = _read_mgh(p)
    else:
        try:
            img = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            raise InputError(f"image {str(p)!r}: cannot be read by SimpleITK ({first})") from exc
    if img.GetDimension() not in (2, 3):
        raise InputError(f"image {str(p)!r}: only 2D and 3D images are supported, got {img.GetDimension()}D {img.GetSize()}")
    check_finite(sitk.GetArrayViewFromImage(img), p)
    return image_from_sitk(img, dtype=dtype, scalar=scalar)


def read_dicom_series(
    folder: str | Path, series_id: str | None = None, dtype: torch.dtype | None = torch.float32, scalar: bool = False
) -> Image:
    """Read one DICOM series from ``folder`` (slices sorted by GDCM by position)."""
    p = _check_path(folder, "DICOM folder")
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    if not ids:
        raise InputError(f"DICOM folder {str(p)!r}: no DICOM series found")
    if series_id is None:
        if len(ids) > 1:
            raise InputError(f"DICOM folder {str(p)!r}: holds {len(ids)} series {list(ids)}; choose one with series_id")
        series_id = ids[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series_id)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"DICOM folder {str(p)!r}: series {series_id} cannot be read ({exc})") from exc
    check_finite(sitk.GetArrayViewFromImage(img), p, "DICOM folder")
    return image_from_sitk(img, dtype=dtype, scalar=scalar)


def write_image(image: Image, path: str | Path, pixel_dtype: np.dtype | type | None = None) -> Path:
    """Write ``image`` with its geometry to any SimpleITK format chosen by the file extension.

    Parent folders are created. ``pixel_dtype`` casts the data first (e.g. ``np.uint8`` for PNG).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_to_sitk(image, pixel_dtype), str(p), useCompression=True)
    return p


def write_dicom_series(image: Image, folder: str | Path, prefix: str = "slice") -> list[Path]:
    """Write a 3D scalar image as a DICOM series (one file per z slice, int16 pixels).

    Position, orientation and spacing tags are set per slice so that :func:`read_dicom_series`
    reads back the same geometry. Values are rounded to int16 (DICOM CT-style storage).
    """
    if image.ndim != 3 or image.channels != 1:
        raise InputError("write_dicom_series needs a 3D single-channel image")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vol = image_to_sitk(image.with_data(image.data.round()), np.int16)
    d = image.grid.direction_matrix
    orientation = "\\".join(f"{v:.10g}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.75064541463040.2005072610414630768"
    paths = []
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (
            ("0008|0060", "CT"),
            ("0020|000e", uid),
            ("0020|000d", uid + ".1"),
            ("0020|0037", orientation),
            ("0020|0032", "\\".join(f"{v:.10g}" for v in pos)),
            ("0020|0013", str(k + 1)),
            ("0028|0030", f"{image.grid.spacing[1]:.10g}\\{image.grid.spacing[0]:.10g}"),
            ("0018|0050", f"{image.grid.spacing[2]:.10g}"),
        ):
            sl.SetMetaData(tag, value)
        path = out / f"{prefix}{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths
