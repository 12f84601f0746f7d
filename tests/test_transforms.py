"""Linear transforms: parameterisation, centres, gradients, initialisation and ITK export."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image
from regcore.export import linear_to_sitk, read_linear_matrix, write_linear_transform
from regcore.losses import mse
from regcore.sampling import warp_linear
from regcore.transforms import LINEAR_TRANSFORMS, Affine, Rigid, Similarity, Translation, center_of_mass, initialize_linear
from regcore.transforms.linear import rotation_angles, rotation_matrix

from conftest import make_image, rotation_direction


def _randomise(tx, seed=0):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in tx.parameters():
            p.copy_(torch.as_tensor(rng.normal(0, 0.05, p.shape)) * tx.length_scale)
    return tx


def test_rigid_about_center_fixes_the_center():
    c = np.array([10.0, -5.0, 30.0])
    tx = Rigid(3, center=c, length_scale=50.0)
    with torch.no_grad():
        tx.set_angles(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    np.testing.assert_allclose(tx(torch.as_tensor(c)).detach().numpy(), c, atol=1e-12)
    tx.set_translation([1.0, 2.0, 3.0])
    np.testing.assert_allclose(tx(torch.as_tensor(c)).detach().numpy(), c + [1, 2, 3], atol=1e-12)
    r = rotation_matrix(tx.angles().detach(), 3).numpy()
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0)
    np.testing.assert_allclose(rotation_angles(r), [0.3, -0.2, 0.1], atol=1e-12)


def test_2d_rotation_sign():
    tx = Rigid(2)
    with torch.no_grad():
        tx.set_angles([np.pi / 2])
    np.testing.assert_allclose(tx(torch.tensor([1.0, 0.0], dtype=torch.float64)).detach().numpy(), [0.0, 1.0], atol=1e-12)


def test_similarity_scale_and_set_matrix_roundtrip():
    tx = Similarity(3, center=[1.0, 2.0, 3.0], length_scale=20.0)
    _randomise(tx, 1)
    m = tx.matrix().detach()
    other = Similarity(3, center=[1.0, 2.0, 3.0], length_scale=20.0)
    other.set_matrix(m)
    torch.testing.assert_close(other.matrix().detach(), m, atol=1e-12, rtol=0)
    s = torch.linalg.svdvals(m[:3, :3])
    torch.testing.assert_close(s, torch.full((3,), float(tx.scale().detach()), dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(LINEAR_TRANSFORMS))
def test_set_matrix_roundtrip(name):
    tx = _randomise(LINEAR_TRANSFORMS[name](3, center=[4.0, 5.0, 6.0], length_scale=30.0), 2)
    copy = LINEAR_TRANSFORMS[name](3, center=[-1.0, 0.0, 2.0], length_scale=7.0)
    copy.set_matrix(tx.matrix().detach())
    torch.testing.assert_close(copy.matrix().detach(), tx.matrix().detach(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(LINEAR_TRANSFORMS))
def test_parameter_gradients_match_finite_differences(name):
    """Autograd through transform -> affine_grid -> grid_sample -> MSE, checked in float64."""
    fixed = make_image((9, 10, 11), spacing=(1.0, 1.2, 0.9), direction=rotation_direction(3).ravel()).to(dtype=torch.float64)
    moving = make_image((9, 10, 11), spacing=(1.0, 1.2, 0.9), direction=rotation_direction(3).ravel(), seed=1).to(dtype=torch.float64)
    tx = _randomise(LINEAR_TRANSFORMS[name](3, center=fixed.grid.center(), length_scale=5.0), 3)
    names = [n for n, _ in tx.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in tx.parameters())

    def objective(*vals):
        matrix = torch.func.functional_call(_MatrixOf(tx), {"tx." + n: v for n, v in zip(names, vals)}, ())
        warped, inside = warp_linear(moving, fixed.grid, matrix)
        return mse(fixed.batch(), warped[None], inside[None, None])

    assert torch.autograd.gradcheck(objective, values, eps=1e-6, atol=1e-5, rtol=1e-3)


class _MatrixOf(torch.nn.Module):
    def __init__(self, tx):
        super().__init__()
        self.tx = tx

    def forward(self):
        return self.tx.matrix()


@pytest.mark.parametrize("mode", ["geometry", "moments", "none"])
def test_initialisation(mode):
    fixed = make_image((20, 22, 24), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    # moving: the same content on a grid shifted by (5, -3, 2) mm
    moving = Image(fixed.data.clone(), Grid(fixed.grid.size, fixed.grid.spacing, (5.0, -3.0, 2.0)))
    tx = Rigid(3, length_scale=10.0)
    initialize_linear(tx, fixed, moving, mode)
    expected_center = center_of_mass(fixed) if mode == "moments" else fixed.grid.center()
    np.testing.assert_allclose(tx.center.numpy(), expected_center, atol=1e-9)
    expected = [0.0, 0.0, 0.0] if mode == "none" else [5.0, -3.0, 2.0]
    np.testing.assert_allclose(tx.translation().detach().numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".h5"])
def test_itk_transform_file_roundtrip(tmp_path, suffix):
    tx = _randomise(Affine(3, center=[1.0, 2.0, 3.0], length_scale=40.0), 4)
    path = write_linear_transform(tx, tmp_path / f"t{suffix}")
    np.testing.assert_allclose(read_linear_matrix(path), tx.matrix().detach().numpy(), atol=1e-10)
    itk = sitk.ReadTransform(str(path))
    pts = np.random.default_rng(0).normal(0, 50, (5, 3))
    ours = tx(torch.as_tensor(pts)).detach().numpy()
    theirs = np.array([itk.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(theirs, ours, atol=1e-9)


def test_sitk_transform_is_the_same_map_2d():
    tx = _randomise(Similarity(2, center=[3.0, 4.0], length_scale=10.0), 5)
    itk = linear_to_sitk(tx)
    p = np.array([12.0, -7.0])
    np.testing.assert_allclose(itk.TransformPoint(tuple(p)), tx(torch.as_tensor(p)).detach().numpy(), atol=1e-10)


def test_translation_has_only_translation_parameters():
    assert [n for n, _ in Translation(3).named_parameters()] == ["translation_param"]


# ------------------------------------------------------------------ one hierarchy, one registry
def test_every_transform_shares_one_base_and_is_registered_once():
    from regcore.transforms.base import Transform
    from regcore.transforms.registry import DEFORMABLE_TRANSFORMS, TRANSFORMS

    assert set(TRANSFORMS) == set(LINEAR_TRANSFORMS) | set(DEFORMABLE_TRANSFORMS)
    for name, cls in TRANSFORMS.items():
        assert issubclass(cls, Transform) and cls.kind == name
        assert cls.is_linear == (name in LINEAR_TRANSFORMS)
    import regcore.transforms.deformable as deformable_module

    assert not hasattr(deformable_module, "__getattr__")  # no lazy import of its own subclasses


def test_linear_and_deformable_displacements_through_the_common_api():
    from regcore.transforms.base import compose
    from regcore.transforms.registry import build_transform

    grid = Grid((9, 8, 7), (2.0, 1.5, 1.0), origin=(3.0, -2.0, 1.0))
    rigid = build_transform("rigid", grid)
    rigid.set_angles([0.1, -0.05, 0.2])
    rigid.set_translation([1.0, 2.0, -3.0])
    pts = grid.world_points(dtype=torch.float64)
    u = rigid.displacement(grid)
    assert u.shape == (3, 7, 8, 9)
    expected = torch.movedim(rigid(pts) - pts, -1, 0)
    assert torch.allclose(u.double(), expected, atol=1e-4)
    dense = build_transform("dense", grid)
    with torch.no_grad():
        dense.field.normal_(0, 0.5)
    chained = compose(rigid.matrix().detach(), dense.displacement(grid).double(), pts)
    want = torch.movedim(rigid(pts + torch.movedim(dense.displacement(grid).double(), 0, -1)) - pts, -1, 0)
    assert torch.allclose(chained, want, atol=1e-9)


def test_transform_params_are_validated_by_the_registrys_model():
    from regcore import InputError, method_config

    with pytest.raises(InputError, match="accepted: control_spacing_mm"):
        method_config("ffd", {"stages": [{"transform_params": {"control_spacing": 4}}]})
    with pytest.raises(InputError, match="accepted: none"):
        method_config("affine", {"stages": [{"transform_params": {"steps": 4}}]})
    with pytest.raises(InputError, match="choose|literal_error|dense"):
        method_config({"name": "x", "stages": [{"transform": "bspline"}]})
    svf = method_config("svf", {"stages": [{"transform_params": {"control_spacing_mm": 4.0, "steps": 5}}]})
    assert svf.stages[0].transform_params == {"control_spacing_mm": 4.0, "steps": 5}


def test_measure_regulariser_and_initialiser_params_come_from_their_registries():
    from regcore import InputError, method_config
    from regcore.transforms.init import INITIALIZERS

    with pytest.raises(InputError, match=r"measure 'lcc' \(accepted: radius, eps, exact\)"):
        method_config("affine", {"stages": [{"objective": [{"measure": "lcc", "params": {"window": 3}}]}]})
    with pytest.raises(InputError, match=r"regularizer 'tv' \(accepted: eps\)"):
        method_config("ffd", {"stages": [{"regularizers": [{"name": "tv", "params": {"alpha": 1}}]}]})
    with pytest.raises(InputError, match="radius"):  # typed: a radius must be an integer
        method_config("affine", {"stages": [{"objective": [{"measure": "lcc", "params": {"radius": 2.5}}]}]})
    assert set(INITIALIZERS) == {"none", "geometry", "moments"}
    with pytest.raises(InputError, match="moments"):
        method_config("affine", {"stages": [{"init": "centre"}]})


def test_optimiser_params_come_from_the_optimisers_signature():
    from regcore import InputError, method_config

    cfg = method_config("affine", {"stages": [{"optimizer": {"name": "adam", "lr": 0.1, "params": {"betas": [0.9, 0.99]}}}]})
    assert cfg.stages[0].optimizer.params == {"betas": [0.9, 0.99]}
    with pytest.raises(InputError, match=r"optimizer 'adam' \(accepted: betas"):
        method_config("affine", {"stages": [{"optimizer": {"name": "adam", "params": {"momentum": 0.9}}}]})
    with pytest.raises(InputError, match="relaxation, min_step"):
        method_config("affine", {"stages": [{"optimizer": {"name": "rsgd", "params": {"relax": 0.5}}}]})
    with pytest.raises(InputError, match="takes no params"):
        method_config("syn", {"stages": [{"optimizer": {"name": "greedy", "params": {"momentum": 0.9}}}]})
