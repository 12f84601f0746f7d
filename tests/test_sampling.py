"""Backward warping in world space: identity is exact, and regcore agrees with SimpleITK's Resample."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image
from regcore.export import displacement_transform, matrix_to_sitk
from regcore.io import image_to_sitk
from regcore.registration import linear_displacement
from regcore.sampling import resample_displacement, sample_world, warp_linear, warp_points_field
from regcore.transforms import Affine, Rigid

from conftest import make_image, rotation_direction


@pytest.mark.parametrize(
    "shape", [(7, 9), (8, 10), (5, 7, 9), (6, 8, 10)], ids=["2d-odd", "2d-even", "3d-odd", "3d-even"]
)
def test_zero_transform_reproduces_input(shape, device):
    dim = len(shape)
    img = make_image(shape, spacing=(0.7, 1.9, 3.1)[:dim], origin=(5.0, -7.5, 100.0)[:dim],
                     direction=rotation_direction(dim, 37).ravel()).to(device)
    warped, inside = warp_linear(img, img.grid, torch.eye(dim + 1, dtype=torch.float64))
    torch.testing.assert_close(warped, img.data, atol=2e-6, rtol=0)
    assert bool(inside.all())
    # the dense path (world points + zero displacement) too
    pts = img.grid.world_points(device=device)
    torch.testing.assert_close(sample_world(img, pts), img.data, atol=2e-5, rtol=0)
    # and a zero transform module
    rigid = Rigid(dim, center=img.grid.center(), length_scale=50.0).to(device)
    torch.testing.assert_close(warp_linear(img, img.grid, rigid.matrix())[0], img.data, atol=2e-6, rtol=0)


def test_integer_shift_along_a_rotated_axis(device):
    """A translation of exactly 2 voxels along index axis x (a rotated world direction)."""
    direction = rotation_direction(3, 30)
    img = make_image((6, 7, 12), spacing=(1.5, 1.0, 2.0), direction=direction.ravel()).to(device)
    m = np.eye(4)
    m[:3, 3] = direction[:, 0] * 1.5 * 2  # two voxels along index x, in world mm
    warped, inside = warp_linear(img, img.grid, m)
    torch.testing.assert_close(warped[..., :-2], img.data[..., 2:], atol=1e-5, rtol=0)
    assert not bool(inside[..., -2:].any()) and bool(inside[..., :-2].all())


def test_nearest_keeps_labels_exact():
    grid = Grid((9, 8, 7), (1.0, 1.2, 1.4), direction=rotation_direction(3).ravel())
    labels = Image(torch.randint(0, 300, (1, *grid.shape)), grid)
    rigid = Rigid(3, center=grid.center(), length_scale=10.0)
    with torch.no_grad():
        rigid.set_angles(torch.tensor([0.05, -0.1, 0.2], dtype=torch.float64))
    warped, _ = warp_linear(labels, grid, rigid.matrix(), mode="nearest")
    assert warped.dtype == labels.data.dtype
    assert set(warped.unique().tolist()) <= set(labels.data.unique().tolist()) | {0}


@pytest.mark.parametrize("dim", [2, 3])
def test_linear_warp_matches_simpleitk_resample_across_grids(dim):
    """Fixed and moving differ in size, spacing, origin and direction; compare with ITK."""
    fixed_grid = Grid((40, 36, 30)[:dim], (1.0, 1.1, 1.3)[:dim], (-20.0, -18.0, -15.0)[:dim], rotation_direction(dim, 10).ravel())
    moving = make_image((26, 30, 34)[3 - dim:], spacing=(1.4, 1.2, 0.9)[:dim], origin=(25.0, -20.0, -16.0)[:dim],
                        direction=np.diag([-1.0, 1.0, 1.0][:dim]).ravel(), seed=3)
    tx = Affine(dim, center=fixed_grid.center(), length_scale=20.0)
    with torch.no_grad():
        tx.matrix_param.copy_(torch.as_tensor(np.random.default_rng(0).normal(0, 0.05, (dim, dim))) * tx.length_scale)
        tx.set_translation(np.linspace(1, 3, dim))
    warped, inside = warp_linear(moving, fixed_grid, tx.matrix().detach())
    ref_img = image_to_sitk(Image(torch.zeros(1, *fixed_grid.shape), fixed_grid))
    itk = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(moving), ref_img, matrix_to_sitk(tx.matrix().detach(), tx.center),
                                               sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    # compare away from the moving image's border (ITK and grid_sample treat the last half voxel differently)
    interior = torch.nn.functional.max_pool3d((1 - inside)[None, None].float() if dim == 3 else (1 - inside)[None, None, None].float(),
                                              3, 1, 1).squeeze() == 0
    assert interior.sum() > 0.15 * interior.numel()
    np.testing.assert_allclose(warped[0][interior].numpy(), itk[interior.numpy()], atol=1e-4)


def test_displacement_field_matches_simpleitk_displacement_transform():
    fixed = make_image((14, 16, 18), spacing=(1.2, 1.0, 0.8), origin=(3.0, 4.0, 5.0), direction=rotation_direction(3, 12).ravel())
    moving = make_image((15, 17, 16), spacing=(1.1, 1.3, 1.0), origin=(2.0, 1.0, 6.0), seed=5)
    tx = Rigid(3, center=fixed.grid.center(), length_scale=10.0)
    with torch.no_grad():
        tx.set_angles(torch.tensor([0.05, 0.02, -0.08], dtype=torch.float64))
        tx.set_translation([0.7, -0.4, 0.3])
    field = linear_displacement(tx.matrix().detach(), fixed)
    warped, inside = warp_linear(moving, fixed.grid, tx.matrix().detach())
    itk = sitk.GetArrayFromImage(sitk.Resample(image_to_sitk(moving), image_to_sitk(fixed), displacement_transform(field),
                                               sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    interior = torch.nn.functional.max_pool3d((1 - inside)[None, None], 3, 1, 1)[0, 0] == 0
    np.testing.assert_allclose(warped[0][interior].numpy(), itk[interior.numpy()], atol=1e-4)


def test_point_warping_by_transform_and_field():
    grid = Grid((10, 11, 12), (1.0, 2.0, 1.5), (5.0, 6.0, 7.0), rotation_direction(3).ravel())
    tx = Rigid(3, center=grid.center(), length_scale=10.0)
    with torch.no_grad():
        tx.set_angles(torch.tensor([0.1, -0.05, 0.2], dtype=torch.float64))
        tx.set_translation([1.0, 2.0, -3.0])
    pts = torch.as_tensor(grid.index_points_to_world(np.array([[2.0, 3.0, 4.0], [7.5, 1.25, 9.0]])))
    field = linear_displacement(tx.matrix().detach(), Image(torch.zeros(1, *grid.shape), grid))
    by_field = warp_points_field(pts, field)
    by_tx = tx(pts).detach()
    torch.testing.assert_close(by_field, by_tx, atol=1e-4, rtol=0)  # linear interpolation of a linear field is exact
    # resampling the field in mm onto another grid keeps the same world mapping
    other = grid.downsample(2)
    torch.testing.assert_close(warp_points_field(pts, resample_displacement(field, other)), by_tx, atol=1e-3, rtol=0)


def test_crop_to_labels_keeps_world_positions():
    """The cropped label map is the original sampled at the crop's world points (non-identity
    direction, anisotropic spacing); the box is the foreground's plus the margin; a factor
    resamples the same box; an empty map is an error."""
    from regcore.synthetic import crop_to_labels

    a = torch.zeros(20, 18, 16, dtype=torch.int64)  # (z, y, x)
    a[5:9, 4:12, 6:10] = 2
    a[10, 7, 3] = 5
    grid = Grid((16, 18, 20), (0.8, 1.1, 2.0), (10.0, -4.0, 7.0), rotation_direction(3))
    labels = Image(a, grid)
    crop = crop_to_labels(labels, margin=2)
    assert crop.data.shape[1:] == (6 + 4, 8 + 4, 7 + 4)  # z 5..10, y 4..11, x 3..9, plus 2 each side
    back = sample_world(labels, crop.grid.world_points(dtype=torch.float64), mode="nearest")
    assert torch.equal(back.to(torch.int64), crop.data)
    assert int((crop.data == 2).sum()) == 4 * 8 * 4 and int((crop.data == 5).sum()) == 1
    half = crop_to_labels(labels, margin=2, factor=2)
    assert half.grid == crop.grid.downsample(2)
    assert torch.equal(half.data, sample_world(labels, half.grid.world_points(dtype=torch.float64), mode="nearest").to(torch.int64))
    with pytest.raises(ValueError, match="no foreground"):
        crop_to_labels(Image(torch.zeros(4, 4, 4, dtype=torch.int64), Grid((4, 4, 4))))
