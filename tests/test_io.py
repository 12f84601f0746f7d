"""Reading and writing through SimpleITK keeps geometry; bad files give clear errors."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image, InputError, read_image, write_image
from regcore.io import read_dicom_series, write_dicom_series

from conftest import make_image, rotation_direction, shared_data


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
def test_roundtrip_keeps_geometry_and_values(tmp_path, ext):
    img = make_image((6, 7, 8), spacing=(0.8, 1.1, 2.5), origin=(-10.5, 22.25, 3.0), direction=rotation_direction(3, 25).ravel())
    path = write_image(img, tmp_path / f"img{ext}")
    back = read_image(path)
    assert back.grid.size == img.grid.size
    # NIfTI stores the geometry in float32 in its header; the others as text/double.
    atol = 1e-5 if ext.startswith(".nii") else 1e-12
    np.testing.assert_allclose(back.grid.spacing, img.grid.spacing, atol=atol)
    np.testing.assert_allclose(back.grid.origin, img.grid.origin, atol=atol)
    np.testing.assert_allclose(back.grid.direction, img.grid.direction, atol=atol)
    torch.testing.assert_close(back.data, img.data)


def test_vector_image_roundtrip(tmp_path):
    grid = Grid((5, 4, 3), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0), rotation_direction(3).ravel())
    field = Image(torch.randn(3, *grid.shape), grid)
    back = read_image(write_image(field, tmp_path / "f.nii.gz"))
    assert back.channels == 3
    torch.testing.assert_close(back.data, field.data)
    sitk_img = sitk.ReadImage(str(tmp_path / "f.nii.gz"))
    assert sitk_img.GetNumberOfComponentsPerPixel() == 3
    # component 0 of voxel (x=4, y=1, z=2) is channel 0 at tensor [2, 1, 4]
    assert sitk_img.GetPixel(4, 1, 2)[0] == pytest.approx(float(field.data[0, 2, 1, 4]), abs=1e-6)


def test_png_roundtrip_and_rgb_to_scalar(tmp_path):
    arr = (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)
    img = Image(torch.from_numpy(arr), Grid((30, 20)))
    back = read_image(write_image(img, tmp_path / "a.png", np.uint8), dtype=None)
    assert back.grid.size == (30, 20)
    np.testing.assert_array_equal(back.numpy()[0], arr)
    rgb = sitk.GetImageFromArray(np.stack([arr, arr // 2, arr // 4], -1), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    scalar = read_image(tmp_path / "rgb.png", scalar=True)
    assert scalar.channels == 1
    np.testing.assert_allclose(scalar.numpy()[0], (arr.astype(float) + arr // 2 + arr // 4) / 3.0, atol=1e-4)


def test_jpeg_real_slice_reads_as_2d():
    img = read_image(shared_data("brain-slices-2d", "r16slice.jpg"), scalar=True)
    assert img.ndim == 2 and img.grid.size == (256, 256) and img.channels == 1
    assert float(img.data.max()) > 100


def test_dicom_series_roundtrip(tmp_path):
    img = make_image((5, 6, 7), spacing=(0.75, 0.75, 2.0), origin=(-20.0, 10.5, 33.0), direction=rotation_direction(3, 15).ravel())
    img = img.with_data(img.data * 1000)
    write_dicom_series(img, tmp_path / "series")
    back = read_image(tmp_path / "series")  # a folder reads as a DICOM series
    assert back.grid.size == img.grid.size
    np.testing.assert_allclose(back.grid.spacing, img.grid.spacing, atol=1e-5)
    np.testing.assert_allclose(back.grid.origin, img.grid.origin, atol=1e-4)
    np.testing.assert_allclose(back.grid.direction, img.grid.direction, atol=1e-5)
    np.testing.assert_allclose(back.numpy(), img.data.round().numpy(), atol=0.5)
    with pytest.raises(InputError, match="no DICOM series"):
        read_dicom_series(tmp_path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="nope.nii.gz.*no such file"):
        read_image(tmp_path / "nope.nii.gz")
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not an image" * 10))
    with pytest.raises(InputError, match="garbage.nii.gz.*cannot be read"):
        read_image(bad)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(InputError, match="notes.txt"):
        read_image(txt)


def test_4d_image_is_rejected(tmp_path):
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkFloat32), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(InputError, match="4D"):
        read_image(tmp_path / "4d.nii.gz")


def test_nan_check_names_the_image():
    img = make_image((4, 5))
    img.data[0, 1, 1] = float("nan")
    with pytest.raises(InputError, match="scan.nii: 1 of 20 voxels"):
        img.check_finite("scan.nii")


def _freesurfer_affine() -> np.ndarray:
    """A FreeSurfer-conformed-like vox2ras (LIA axes), anisotropic and off-centre (RAS, mm)."""
    return np.array([[-1.0, 0.0, 0.0, 12.5], [0.0, 0.0, 1.2, -30.0], [0.0, -0.9, 0.0, 18.0], [0, 0, 0, 1]])


def test_freesurfer_mgz_reads_like_the_same_nifti(tmp_path):
    """An MGZ volume (read by nibabel) and the same data and affine as NIfTI (read by SimpleITK)
    give one grid and one array: the RAS -> LPS conversion and the axis order are right."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = _freesurfer_affine()
    intensities = rng.uniform(0, 100, (6, 7, 8)).astype(np.float32)
    labels = rng.integers(0, 40, (6, 7, 8)).astype(np.int32)
    brain = rng.integers(0, 255, (6, 7, 8)).astype(np.uint8)  # norm.mgz's usual voxel type
    for name, data, dtype in [("norm", intensities, torch.float32), ("aseg", labels, None), ("brain", brain, None)]:
        nib.save(nib.MGHImage(data, affine), tmp_path / f"{name}.mgz")
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
        mgz, nii = read_image(tmp_path / f"{name}.mgz", dtype=dtype), read_image(tmp_path / f"{name}.nii.gz", dtype=dtype)
        assert mgz.grid.size == (6, 7, 8)
        np.testing.assert_allclose(mgz.grid.spacing, [1.0, 0.9, 1.2], atol=1e-6)
        np.testing.assert_allclose(mgz.grid.spacing, nii.grid.spacing, atol=1e-5)
        np.testing.assert_allclose(mgz.grid.origin, nii.grid.origin, atol=1e-5)
        np.testing.assert_allclose(mgz.grid.origin, [-12.5, 30.0, 18.0], atol=1e-6)  # LPS
        np.testing.assert_allclose(np.asarray(mgz.grid.direction), np.asarray(nii.grid.direction), atol=1e-6)
        assert mgz.data.dtype == nii.data.dtype and torch.equal(mgz.data, nii.data)
    assert not read_image(tmp_path / "aseg.mgz", dtype=None).data.is_floating_point()  # labels stay integer


def test_bad_freesurfer_files_give_clear_errors(tmp_path):
    import nibabel as nib

    data = np.ones((4, 5, 6), np.float32)
    good = tmp_path / "norm.mgh"  # uncompressed: the header is 284 bytes, the voxels 480
    nib.save(nib.MGHImage(data, _freesurfer_affine()), good)
    for name, size in [("header.mgh", 60), ("voxels.mgh", 500)]:
        (tmp_path / name).write_bytes(good.read_bytes()[:size])
        with pytest.raises(InputError, match=f"{name}.*cannot be read as FreeSurfer MGH"):
            read_image(tmp_path / name)
    sheared = _freesurfer_affine()
    sheared[0, 1] = 0.3
    nib.save(nib.MGHImage(data, sheared), tmp_path / "sheared.mgz")
    with pytest.raises(InputError, match="sheared.mgz.*sheared"):
        read_image(tmp_path / "sheared.mgz")
    frames = tmp_path / "frames.mgh"
    nib.save(nib.MGHImage(np.ones((4, 5, 6, 2), np.float32), _freesurfer_affine()), frames)
    with pytest.raises(InputError, match="frames.mgh.*single-frame 3D"):
        read_image(frames)
    data[1, 2, 3] = np.nan
    nib.save(nib.MGHImage(data, _freesurfer_affine()), tmp_path / "nan.mgz")
    with pytest.raises(InputError, match="nan.mgz.*1 NaN or infinite"):
        read_image(tmp_path / "nan.mgz")
