"""Deformable transforms: dense fields, cubic B-spline FFD, Wendland kernels, SVF and composition.

Every grid here has a non-identity direction and anisotropic spacing, so that mistakes in the
index/world conventions show up as wrong displacements.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regcore import Grid
from regcore.errors import InputError
from regcore.sampling import resample_displacement
from regcore.image import Image
from regcore.transforms.bspline import BSplineTransform, bspline_kernel
from regcore.transforms.deformable import DeformableTransform, DenseDisplacement, compose_displacements
from regcore.transforms.registry import DEFORMABLE_TRANSFORMS, deformable_transform_class
from regcore.transforms.svf import StationaryVelocityField
from regcore.transforms.wendland import WendlandTransform, wendland

from conftest import rotation_direction

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def grid3(size=(14, 11, 9), spacing=(1.0, 1.4, 2.2), origin=(12.0, -30.0, 7.5)) -> Grid:
    return Grid(size, spacing, origin, rotation_direction(3, 25.0))


def grid2(size=(24, 19), spacing=(1.0, 1.6), origin=(-8.0, 21.0)) -> Grid:
    return Grid(size, spacing, origin, rotation_direction(2, 30.0))


def world(grid: Grid, dtype=F64) -> torch.Tensor:
    """Voxel-centre world points ``(*shape, D)``."""
    return grid.world_points(dtype=dtype)


def field_of(fn, grid: Grid, dtype=F64) -> torch.Tensor:
    """``(D, *shape)`` field from a function of world points ``(..., D) -> (..., D)``."""
    return torch.movedim(fn(world(grid, dtype)), -1, 0)


def affine_fn(dim: int, seed: int = 0, scale: float = 0.05):
    rng = np.random.default_rng(seed)
    a = torch.as_tensor(rng.normal(0, scale, (dim, dim)))
    b = torch.as_tensor(rng.normal(0, 2.0, dim))
    return lambda p: p @ a.T.to(p.dtype) + b.to(p.dtype)


def smooth_fn(dim: int, center, amplitude: float = 2.0, width: float = 8.0, seed: int = 0):
    """A smooth (Gaussian-weighted) displacement function of world points (mm)."""
    rng = np.random.default_rng(seed)
    vec = torch.as_tensor(rng.normal(0, 1, dim))
    vec = amplitude * vec / vec.norm()
    c = torch.as_tensor(np.asarray(center, dtype=np.float64))

    def fn(p):
        r2 = ((p - c.to(p.dtype)) ** 2).sum(-1, keepdim=True)
        return torch.exp(-r2 / (2 * width**2)) * vec.to(p.dtype)

    return fn


def permuted_grid(grid: Grid) -> Grid:
    """The same voxel centres with the x and y index axes swapped (a non-separable lattice map)."""
    d = grid.ndim
    perm = [1, 0] + list(range(2, d))
    dmat = grid.direction_matrix[:, perm]
    return Grid([grid.size[k] for k in perm], [grid.spacing[k] for k in perm], grid.origin, dmat)


def swap_xy(field: torch.Tensor) -> torch.Tensor:
    """Tensor layout of a ``(C, ..., Y, X)`` field on :func:`permuted_grid`."""
    return field.transpose(-1, -2)


def random_params(tx: DeformableTransform, seed: int = 0, scale: float = 1.0) -> DeformableTransform:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tx.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype) * scale)
    return tx


def jacobian_det(u: torch.Tensor, grid: Grid) -> np.ndarray:
    """det(I + du/dx) of a displacement ``(D, *shape)`` (mm) by central differences in world mm."""
    d = grid.ndim
    un = u.detach().cpu().numpy().astype(np.float64)
    # du_c / d index_k (index axis k is tensor axis d - 1 - k): (*shape, D_c, D_k)
    dudi = np.stack([np.stack([np.gradient(un[c], axis=d - 1 - k) for k in range(d)], -1) for c in range(d)], -2)
    index_to_world = grid.direction_matrix @ np.diag(grid.spacing)
    jac = np.eye(d) + dudi @ np.linalg.inv(index_to_world)
    return np.linalg.det(jac)


# ------------------------------------------------------------------------------------------------
# registry and the common API
# ------------------------------------------------------------------------------------------------
def test_registry():
    assert set(DEFORMABLE_TRANSFORMS) == {"dense", "ffd", "wendland", "svf", "syn"}
    assert DEFORMABLE_TRANSFORMS["ffd"] is BSplineTransform
    assert deformable_transform_class("wendland") is WendlandTransform
    assert deformable_transform_class("svf") is StationaryVelocityField
    assert deformable_transform_class("dense") is DenseDisplacement
    for name, cls in DEFORMABLE_TRANSFORMS.items():
        assert issubclass(cls, DeformableTransform) and cls.kind == name
    with pytest.raises(InputError):
        deformable_transform_class("nope")


@pytest.mark.parametrize("name", ["dense", "ffd", "wendland", "svf"])
@pytest.mark.parametrize("make_grid", [grid2, grid3])
def test_zero_parameters_give_exact_zero_everywhere(name, make_grid):
    g = make_grid()
    tx = deformable_transform_class(name)(g)
    params = list(tx.parameters())
    assert params and all(p.dtype == torch.float32 for p in params)
    for target in (g, g.downsample(2), g.downsample(1.7), permuted_grid(g)):
        u = tx.displacement(target)
        assert u.shape == (g.ndim, *target.shape) and u.dtype == torch.float32
        assert torch.count_nonzero(u) == 0
        assert torch.count_nonzero(tx.regularization_field(target)) == 0
    pts = torch.randn(5, g.ndim, dtype=torch.float32) * 5 + torch.as_tensor(g.center(), dtype=torch.float32)
    assert torch.equal(tx(pts), pts)
    tx.set_level(g.downsample(2))
    assert torch.count_nonzero(tx.displacement(g)) == 0
    assert tx.describe()["type"] == name


@pytest.mark.parametrize("name", ["dense", "ffd", "wendland", "svf"])
def test_gradients_reach_the_parameters_and_dtype_follows(name):
    g = grid3()
    tx = deformable_transform_class(name)(g).to(F64)
    random_params(tx, 1, 0.3)
    u = tx.displacement(g.downsample(1.5))
    assert u.dtype == F64
    (u**2).sum().backward()
    grads = [p.grad for p in tx.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


@pytest.mark.parametrize("name", ["dense", "ffd", "wendland", "svf"])
def test_points_agree_with_grid_evaluation(name):
    g = grid3()
    tx = random_params(deformable_transform_class(name)(g).to(F64), 2, 0.5)
    u = tx.displacement(g)
    at = tx.displacement_at_points(world(g))
    torch.testing.assert_close(at, u, atol=1e-9, rtol=0)
    pts = world(g)[2:4, 3:6, 1:5]
    torch.testing.assert_close(tx(pts) - pts, torch.movedim(u[:, 2:4, 3:6, 1:5], 0, -1), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------------
# composition
# ------------------------------------------------------------------------------------------------
def test_compose_translations_and_affines():
    g = grid2()
    a = torch.tensor([1.5, -0.7], dtype=F64)
    b = torch.tensor([-0.2, 2.0], dtype=F64)
    first = a[:, None, None].expand(2, *g.shape).clone()
    second = b[:, None, None].expand(2, *g.shape).clone()
    torch.testing.assert_close(compose_displacements(first, second, g), first + second, atol=1e-12, rtol=0)

    # two affine displacements: w(x) = f(x) + s(x + f(x)), exact where x + f(x) stays inside the grid
    f_fn, s_fn = affine_fn(2, 3, 0.02), affine_fn(2, 4, 0.03)
    first, second = field_of(f_fn, g), field_of(s_fn, g)
    x = world(g)
    expected = f_fn(x) + s_fn(x + f_fn(x))
    got = torch.movedim(compose_displacements(first, second, g), 0, -1)
    idx = g.world_points_to_index(x + f_fn(x))
    inside = ((idx >= 0) & (idx <= torch.as_tensor(g.size, dtype=F64) - 1)).all(-1)
    assert inside.sum() > 0.6 * inside.numel()
    torch.testing.assert_close(got[inside], expected[inside], atol=1e-9, rtol=0)
    with pytest.raises(InputError):
        compose_displacements(first, second[:, :-1], g)


# ------------------------------------------------------------------------------------------------
# dense displacement
# ------------------------------------------------------------------------------------------------
def test_dense_returns_parameter_and_resamples_in_world_space():
    g = grid3()
    tx = DenseDisplacement(g, dtype=F64)
    fn = affine_fn(3, 5)
    with torch.no_grad():
        tx.field.copy_(field_of(fn, g))
    assert tx.displacement(g) is tx.field
    coarse = g.downsample(2.2)
    # linear interpolation reproduces an affine field exactly inside the box
    torch.testing.assert_close(tx.displacement(coarse), field_of(fn, coarse), atol=1e-9, rtol=0)
    old_param = tx.field
    tx.set_level(coarse)
    assert tx.field is not old_param and tx.field.shape == (3, *coarse.shape) and tx.field.dtype == F64
    assert tx.field_grid is coarse
    assert tx.displacement(coarse) is tx.field
    torch.testing.assert_close(tx.displacement(g), field_of(fn, g), atol=1e-9, rtol=0)


def test_dense_set_level_keeps_a_smooth_displacement():
    g = grid2(size=(40, 32))
    fn = smooth_fn(2, g.center(), 3.0, 10.0)
    tx = DenseDisplacement(g)
    with torch.no_grad():
        tx.field.copy_(field_of(fn, g, torch.float32))
    before = tx.displacement(g).detach().clone()
    tx.set_level(g.downsample(2))
    after_coarse = tx.displacement(g).detach()
    assert (after_coarse - before).abs().max() < 0.05 * 3.0
    tx.set_level(g)
    assert (tx.displacement(g).detach() - before).abs().max() < 0.05 * 3.0
    assert tx.field.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# cubic B-spline FFD
# ------------------------------------------------------------------------------------------------
def test_bspline_kernel_partition_of_unity_and_linear_precision():
    t = torch.linspace(0, 1, 101, dtype=F64)
    j = torch.arange(-1, 3, dtype=F64)
    w = bspline_kernel(t[:, None] - j[None, :])
    torch.testing.assert_close(w.sum(1), torch.ones_like(t), atol=1e-15, rtol=0)
    torch.testing.assert_close((w * j).sum(1), t, atol=1e-15, rtol=0)
    assert bspline_kernel(torch.tensor([2.0, -2.0, 2.5])).abs().max() == 0


def test_bspline_lattice_spans_the_box():
    g = grid3(size=(21, 15, 9), spacing=(1.0, 1.5, 2.5))
    tx = BSplineTransform(g, control_spacing_mm=(5.0, 5.0, 6.0))
    assert tx.intervals == (4, 4, 3)  # 20 / 5, 21 / 5 -> 4, 20 / 6 -> 3
    assert tx.lattice.size == (7, 7, 6)  # m + 3: one extra node each side
    assert tx.coefficients.shape == (3, 6, 7, 7)
    np.testing.assert_allclose(tx.lattice.spacing, (5.0, 5.25, 20 / 3))
    np.testing.assert_allclose(tx.lattice.direction_matrix, g.direction_matrix)
    first = tx.lattice.index_points_to_world(np.ones(3))
    last = tx.lattice.index_points_to_world(1.0 + np.asarray(tx.intervals, dtype=np.float64))
    np.testing.assert_allclose(first, g.origin, atol=1e-12)
    np.testing.assert_allclose(last, g.index_points_to_world(np.asarray(g.size, dtype=np.float64) - 1), atol=1e-12)
    assert BSplineTransform(g, 7.0).lattice.ndim == 3
    with pytest.raises(InputError):
        BSplineTransform(g, (5.0, 5.0))
    with pytest.raises(InputError):
        BSplineTransform(g, -1.0)


@pytest.mark.parametrize("make_grid", [grid2, grid3])
def test_bspline_partition_of_unity(make_grid):
    g = make_grid()
    tx = BSplineTransform(g, 4.5)
    const = torch.arange(1, g.ndim + 1, dtype=torch.float32) * torch.tensor(-1.3)
    with torch.no_grad():
        tx.coefficients.copy_(const.reshape(-1, *[1] * g.ndim).expand_as(tx.coefficients))
    for target in (g, g.downsample(2), permuted_grid(g)):
        u = tx.displacement(target)
        expected = const.reshape(-1, *[1] * g.ndim).expand_as(u)
        torch.testing.assert_close(u, expected, atol=1e-5, rtol=0)  # float32 rounding


@pytest.mark.parametrize("make_grid", [grid2, grid3])
def test_bspline_reproduces_linear_fields_exactly_including_borders(make_grid):
    g = make_grid()
    fn = affine_fn(g.ndim, 7, 0.2)
    tx = BSplineTransform(g, 3.7, dtype=F64)
    tx.set_coefficients_from_function(fn)
    for target in (g, g.downsample(1.8), permuted_grid(g)):
        torch.testing.assert_close(tx.displacement(target), field_of(fn, target), atol=1e-10, rtol=0)
    # the borders are the first/last voxel centres: checked explicitly
    u = tx.displacement(g)
    ref = field_of(fn, g)
    assert (u[(slice(None),) + (0,) * g.ndim] - ref[(slice(None),) + (0,) * g.ndim]).abs().max() < 1e-10
    assert (u[(slice(None),) + (-1,) * g.ndim] - ref[(slice(None),) + (-1,) * g.ndim]).abs().max() < 1e-10


def test_bspline_downsampled_grid_equals_full_resolution_field():
    g = grid3(size=(30, 26, 14))
    tx = random_params(BSplineTransform(g, 6.0, dtype=F64), 3)
    coarse = g.downsample(2.5)
    u_coarse = tx.displacement(coarse)
    # exact: the spline evaluated at the coarse voxel centres
    torch.testing.assert_close(u_coarse, tx.displacement_at_points(world(coarse)), atol=1e-10, rtol=0)
    # and the full-resolution field sampled there (linear interpolation of a smooth field)
    sampled = resample_displacement(Image(tx.displacement(g), g), coarse).data
    assert (u_coarse - sampled).abs().max() < 0.1 * tx.displacement(g).abs().max()
    # the first and last voxel centres coincide exactly
    torch.testing.assert_close(u_coarse[:, 0, 0, 0], tx.displacement(g)[:, 0, 0, 0], atol=1e-12, rtol=0)
    torch.testing.assert_close(u_coarse[:, -1, -1, -1], tx.displacement(g)[:, -1, -1, -1], atol=1e-12, rtol=0)


def test_bspline_non_aligned_grid_uses_exact_fallback():
    g = grid3()
    tx = random_params(BSplineTransform(g, 5.0, dtype=F64), 4)
    torch.testing.assert_close(tx.displacement(permuted_grid(g)), swap_xy(tx.displacement(g)), atol=1e-10, rtol=0)


def test_bspline_gradcheck():
    g = grid3(size=(6, 5, 4), spacing=(1.0, 1.5, 2.0))
    tx = BSplineTransform(g, 3.0, dtype=F64)
    coef = torch.randn(tx.coefficients.shape, dtype=F64, requires_grad=True)
    for target in (g, g.downsample(1.6, min_size=3), permuted_grid(g)):
        assert torch.autograd.gradcheck(lambda c: _swap(tx, c, target), (coef,), fast_mode=True)


def _swap(tx: DeformableTransform, c: torch.Tensor, target: Grid) -> torch.Tensor:
    """``tx.displacement(target)`` with the parameter replaced by ``c`` (to differentiate w.r.t. ``c``)."""
    (name,) = [n for n, _ in tx.named_parameters()]
    old = getattr(tx, name)
    try:
        delattr(tx, name)
        setattr(tx, name, c)  # a plain tensor attribute, so the graph runs through c
        return tx.displacement(target)
    finally:
        delattr(tx, name)
        setattr(tx, name, old)


# ------------------------------------------------------------------------------------------------
# Wendland kernels
# ------------------------------------------------------------------------------------------------
def wendland_grid() -> Grid:
    # box 20 x 20 x 20 mm, anisotropic voxels; 5 mm control spacing is exact on every axis and the
    # control points fall on voxel centres (x every 5, y every 4, z every 2 voxels)
    return grid3(size=(21, 17, 9), spacing=(1.0, 1.25, 2.5))


def test_wendland_functions():
    r = torch.tensor([0.0, 0.3, 0.99, 1.0, 1.5], dtype=F64)
    for order in ("c2", "c4"):
        phi = wendland(r, order)
        assert phi[0] == 1.0 and phi[3] == 0.0 and phi[4] == 0.0 and (phi[:3] > 0).all()
    torch.testing.assert_close(wendland(r, "c2")[1], torch.tensor(0.7**4 * 2.2, dtype=F64))
    torch.testing.assert_close(wendland(r, "c4")[1], torch.tensor(0.7**6 * (35 * 0.09 + 18 * 0.3 + 3) / 3, dtype=F64))
    with pytest.raises(InputError):
        WendlandTransform(wendland_grid(), 5.0, order="c6")
    with pytest.raises(InputError):
        WendlandTransform(wendland_grid(), 5.0, support=0.0)


@pytest.mark.parametrize("order", ["c2", "c4"])
@pytest.mark.parametrize("support", [2.5, 2.0, 1.3])
def test_wendland_single_coefficient_gives_the_kernel_profile(order, support):
    g = wendland_grid()
    tx = WendlandTransform(g, 5.0, support=support, order=order, dtype=F64)
    e = tx.extension
    assert e == math.ceil(support) - 1
    assert tx.intervals == (4, 4, 4) and tx.lattice.size == (5 + 2 * e,) * 3
    np.testing.assert_allclose(tx.lattice.spacing, 5.0)
    node = (e + 1, e + 2, e + 3)  # ITK order; 1, 2, 3 intervals from the first voxel centre
    c = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    with torch.no_grad():
        tx.coefficients[:, node[2], node[1], node[0]] = c
    p = torch.as_tensor(tx.lattice.index_points_to_world(np.asarray(node, dtype=np.float64)))
    radius = support * 5.0
    rho = (world(g) - p).norm(dim=-1) / radius  # (Z, Y, X)
    u = tx.displacement(g)
    torch.testing.assert_close(u, c[:, None, None, None] * wendland(rho, order), atol=1e-12, rtol=0)
    # value c at the control point (a voxel centre: x index 5, y index 8, z index 6)
    torch.testing.assert_close(g.index_points_to_world(np.array([5.0, 8.0, 6.0])), p.numpy())
    torch.testing.assert_close(u[:, 6, 8, 5], c, atol=1e-12, rtol=0)
    # zero beyond the support radius, non-zero inside
    assert torch.count_nonzero(u[:, rho >= 1]) == 0
    assert (u[0][rho < 1 - 1e-9].abs() > 0).all()


def test_wendland_nodes_beyond_the_box_reach_into_it():
    g = wendland_grid()
    tx = WendlandTransform(g, 5.0, support=2.5, dtype=F64)
    with torch.no_grad():
        tx.coefficients[:, 0, 0, 0] = 1.0  # node at -2 spacings on every axis: distance 2*sqrt(3) > 2.5
    assert torch.count_nonzero(tx.displacement(g)) == 0
    with torch.no_grad():
        tx.coefficients[:, 0, 0, 0] = 0.0
        tx.coefficients[:, 2, 2, 0] = 1.0  # 2 spacings before the box along x only
    u = tx.displacement(g)
    expected = float(wendland(torch.tensor(2.0 / 2.5, dtype=F64)))
    assert float(u[0, 0, 0, 0].detach()) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("order", ["c2", "c4"])
def test_wendland_downsampled_and_non_aligned_grids(order):
    g = grid3(size=(17, 13, 8))
    tx = random_params(WendlandTransform(g, 4.0, support=2.5, order=order, dtype=F64), 5)
    coarse = g.downsample(2.2)
    torch.testing.assert_close(tx.displacement(coarse), tx.displacement_at_points(world(coarse)), atol=1e-10, rtol=0)
    torch.testing.assert_close(tx.displacement(permuted_grid(g)), swap_xy(tx.displacement(g)), atol=1e-10, rtol=0)
    full = tx.displacement(g)
    torch.testing.assert_close(tx.displacement(coarse)[:, -1, -1, -1], full[:, -1, -1, -1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("order", ["c2", "c4"])
def test_wendland_gradcheck(order):
    g = grid3(size=(6, 5, 4), spacing=(1.0, 1.5, 2.0))
    tx = WendlandTransform(g, 3.0, support=1.8, order=order, dtype=F64)
    coef = torch.randn(tx.coefficients.shape, dtype=F64, requires_grad=True)
    for target in (g, permuted_grid(g)):
        assert torch.autograd.gradcheck(lambda c: _swap(tx, c, target), (coef,), fast_mode=True)
    pts = world(g.downsample(1.5))
    assert torch.autograd.gradcheck(lambda c: _swap_points(tx, c, pts), (coef,), fast_mode=True)


def _swap_points(tx, c, pts):
    old = tx.coefficients
    try:
        del tx.coefficients
        tx.coefficients = c
        return tx.displacement_at_points(pts)
    finally:
        del tx.coefficients
        tx.coefficients = old


def test_wendland_c4_is_smoother_than_c2_at_the_origin():
    """``phi_{3,1}(r) = 1 - 10 r^2 + 20 r^3 + ...`` has a kink in its second derivative at the
    centre (``|x|^3`` term); ``phi_{3,2}`` has no cubic term. Estimate the cubic coefficient from
    the field along a line through a control point."""
    g = wendland_grid()
    cubic = {}
    for order in ("c2", "c4"):
        tx = WendlandTransform(g, 5.0, support=2.5, order=order, dtype=F64)
        node = (3, 3, 3)
        with torch.no_grad():
            tx.coefficients[0, node[2], node[1], node[0]] = 1.0
        p = torch.as_tensor(tx.lattice.index_points_to_world(np.asarray(node, dtype=np.float64)))
        direction = torch.tensor([0.3, -0.5, 0.8], dtype=F64)
        direction = direction / direction.norm()
        radius = 12.5
        h = 0.002 * radius
        steps = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=F64) * h
        f = tx.displacement_at_points(p + steps[:, None] * direction)[0]
        s1 = (f[3] + f[1] - 2 * f[2]) / (2 * h**2)
        s2 = (f[4] + f[0] - 2 * f[2]) / (2 * (2 * h) ** 2)
        cubic[order] = float(((s2 - s1) / h).detach()) * radius**3  # in units of r = distance / radius
    assert cubic["c2"] == pytest.approx(20.0, rel=0.05)
    assert abs(cubic["c4"]) < 0.05 * cubic["c2"]


# ------------------------------------------------------------------------------------------------
# stationary velocity field
# ------------------------------------------------------------------------------------------------
def test_svf_constant_velocity_is_a_translation():
    g = grid3()
    for vgrid in (g, g.downsample(2)):
        tx = StationaryVelocityField(g, control_grid=vgrid)
        v = torch.tensor([0.7, -1.1, 0.4])
        with torch.no_grad():
            tx.velocity.copy_(v.reshape(3, 1, 1, 1).expand_as(tx.velocity))
        expected = v.reshape(3, 1, 1, 1).expand(3, *g.shape)
        torch.testing.assert_close(tx.displacement(g), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(tx.inverse_displacement(g), -expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(tx.regularization_field(g), expected, atol=1e-6, rtol=0)


def test_svf_step_choice():
    g = grid2(spacing=(1.0, 1.6))
    tx = StationaryVelocityField(g)
    assert tx.num_steps() == 6  # the minimum
    with torch.no_grad():
        tx.velocity[0, 3, 4] = 6.0
        tx.velocity[1, 3, 4] = 8.0  # |v| = 10 mm, 0.5 * min spacing = 0.5 mm -> 10 / 2^5 <= 0.5
    assert tx.num_steps() == 6
    with torch.no_grad():
        tx.velocity.mul_(10.0)  # 100 mm -> 100 / 2^8 <= 0.5
    assert tx.num_steps() == 8
    with torch.no_grad():
        tx.velocity.mul_(1e4)
    assert tx.num_steps() == 12
    assert StationaryVelocityField(g, steps=7).num_steps() == 7
    with pytest.raises(InputError):
        StationaryVelocityField(g, steps=-1)


def _smooth_velocity(g: Grid, amplitude: float, width: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = world(g)
    v = torch.zeros_like(x)
    c0 = torch.as_tensor(g.center())
    for k in range(4):
        c = c0 + torch.as_tensor(rng.normal(0, width, g.ndim))
        vec = torch.as_tensor(rng.normal(0, 1, g.ndim))
        v = v + torch.exp(-((x - c) ** 2).sum(-1, keepdim=True) / (2 * width**2)) * vec
    v = v / v.norm(dim=-1).max() * amplitude
    return torch.movedim(v, -1, 0)


def test_svf_inverse_consistency():
    g = grid2(size=(48, 36), spacing=(1.0, 1.5))
    tx = StationaryVelocityField(g, dtype=F64)
    with torch.no_grad():
        tx.velocity.copy_(_smooth_velocity(g, 4.0, 8.0))
    fwd, inv = tx.displacement(g).detach(), tx.inverse_displacement(g).detach()
    assert fwd.norm(dim=0).max() > 3.0
    ident1 = compose_displacements(fwd, inv, g)  # x -> exp(v) -> exp(-v)
    ident2 = compose_displacements(inv, fwd, g)
    inner = (slice(None), slice(6, -6), slice(6, -6))
    assert ident1[inner].norm(dim=0).max() < 0.1
    assert ident2[inner].norm(dim=0).max() < 0.1
    assert ident1.norm(dim=0).mean() < 0.02


def test_svf_stays_invertible_where_the_plain_displacement_folds():
    g = grid2(size=(56, 44), spacing=(1.0, 1.3))
    x = world(g)
    c = torch.as_tensor(g.center())
    r = x - c
    sigma = 8.0
    # a strong swirl: rotation by up to ~2.9 rad around the centre
    weight = 2.9 * torch.exp(-(r**2).sum(-1, keepdim=True) / (2 * sigma**2))
    v = torch.movedim(weight * torch.stack([-r[..., 1], r[..., 0]], -1), -1, 0)
    assert jacobian_det(v, g).min() < 0  # x + v folds
    tx = StationaryVelocityField(g, dtype=F64)
    with torch.no_grad():
        tx.velocity.copy_(v)
    assert tx.num_steps() == 6  # max |v| = 2.9 * 8 * exp(-1/2) = 14 mm -> 5, clamped to 6
    u = tx.displacement(g)
    assert u.norm(dim=0).max() > 10.0
    det = jacobian_det(u, g)
    assert det.min() > 0


def test_svf_coarse_control_grid_and_resampling():
    g = grid3(size=(16, 12, 10))
    vgrid = g.downsample(2)
    tx = StationaryVelocityField(g, control_grid=vgrid, dtype=F64)
    assert tx.velocity.shape == (3, *vgrid.shape)
    with torch.no_grad():
        tx.velocity.copy_(_smooth_velocity(vgrid, 2.0, 6.0, 3))
    on_v = tx.exponential(tx.velocity)
    assert torch.equal(tx.displacement(vgrid), on_v)
    torch.testing.assert_close(tx.displacement(g), resample_displacement(Image(on_v, vgrid), g).data)
    torch.testing.assert_close(tx.regularization_field(g), resample_displacement(Image(tx.velocity, vgrid), g).data)
    tx.set_level(g.downsample(1.5))  # the velocity stays where it is
    assert tx.velocity.shape == (3, *vgrid.shape)


def test_svf_gradcheck():
    g = grid2(size=(6, 5), spacing=(1.0, 1.5))
    tx = StationaryVelocityField(g, steps=3, dtype=F64)
    v = (0.5 * torch.randn(tx.velocity.shape, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: _swap(tx, c, g), (v,), fast_mode=True)
    g3 = grid3(size=(5, 4, 4), spacing=(1.0, 1.5, 2.0))
    tx3 = StationaryVelocityField(g3, steps=2, dtype=F64)
    v3 = (0.4 * torch.randn(tx3.velocity.shape, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: _swap(tx3, c, g3.downsample(1.3, min_size=3)), (v3,), fast_mode=True)


@pytest.mark.parametrize("name", ["ffd", "wendland", "svf"])
def test_full_gradcheck_2d(name):
    """Element-by-element gradcheck (not the fast projected one) on a tiny 2D grid."""
    g = grid2(size=(5, 4), spacing=(1.0, 1.5))
    kwargs = {
        "svf": {"steps": 2},
        "ffd": {"control_spacing_mm": 2.0},
        "wendland": {"control_spacing_mm": 2.0, "support": 1.6},
    }
    tx = deformable_transform_class(name)(g, dtype=F64, **kwargs[name])
    (param,) = list(tx.parameters())
    c = (0.3 * torch.randn(param.shape, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: _swap(tx, x, g), (c,))
    assert torch.autograd.gradcheck(lambda x: _swap(tx, x, permuted_grid(g)), (c,))


# ------------------------------------------------------------------------------------------------
# CUDA matches CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("name", ["dense", "ffd", "wendland", "svf"])
def test_cuda_matches_cpu(name):
    g = grid3(size=(20, 16, 12))
    kwargs = {"control_grid": g.downsample(2)} if name == "svf" else {}
    tx = random_params(deformable_transform_class(name)(g, **kwargs), 6, 0.8)
    coarse = g.downsample(1.7)
    cpu = tx.displacement(coarse).detach()
    gpu_tx = tx.to("cuda")
    out = gpu_tx.displacement(coarse)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu, atol=1e-4, rtol=1e-4)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in gpu_tx.parameters())
