"""Tests of regcore.regularizers: exact values on affine/quadratic fields, spacing scaling,
folding, masks, gradients, modules, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import DEVICES, rotation_direction
from regcore import Grid, InputError
from regcore.regularizers import (
    REGULARIZERS,
    AnisotropicTVRegularizer,
    BendingEnergyRegularizer,
    DiffusionRegularizer,
    JacobianRegularizer,
    SparsityRegularizer,
    TVRegularizer,
    bending_energy,
    build_regularizer,
    diffusion,
    folding_penalty,
    jacobian_determinant,
    jacobian_stats,
    sparsity,
    spatial_jacobian,
    total_variation,
    total_variation_anisotropic,
)

# tensor-order shapes: odd and even sizes
SHAPES = {2: [(7, 6), (8, 9)], 3: [(5, 6, 7), (6, 5, 4)]}
SPACING = {2: (0.7, 1.3), 3: (0.8, 1.1, 1.6)}
ORIGIN = {2: (-12.0, 5.0), 3: (3.0, -7.0, 20.0)}


pytestmark = pytest.mark.usefixtures("single_thread")


def make_grid(shape, spacing, direction=None, origin=None) -> Grid:
    dim = len(shape)
    return Grid(
        tuple(reversed(shape)),
        spacing,
        origin if origin is not None else ORIGIN[dim],
        None if direction is None else np.asarray(direction).ravel(),
    )


def world_points(grid: Grid) -> torch.Tensor:
    """World coordinates (mm) of the voxel centres, ``(*shape, D)`` float64."""
    return grid.world_points(dtype=torch.float64)


def field_from_points(values: torch.Tensor) -> torch.Tensor:
    """``(*shape, D)`` per-voxel vectors to a field ``(1, D, *shape)``."""
    dim = values.shape[-1]
    return values.permute(dim, *range(dim)).unsqueeze(0).contiguous()


def affine_field(grid: Grid, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    p = world_points(grid)
    vals = p @ torch.as_tensor(a).T + torch.as_tensor(b)
    return field_from_points(vals)


def smooth_field(shape, seed=0, amplitude=1.0, sigma=1.5, batch=1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    dim = len(shape)
    out = np.stack(
        [
            np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(dim)])
            for _ in range(batch)
        ]
    )
    out = out / np.abs(out).max() * amplitude
    return torch.as_tensor(out, dtype=torch.float64)


def reference_gradient(u: torch.Tensor, spacing) -> np.ndarray:
    """numpy.gradient reference: ``(N, D_comp, D_axes, *shape)``, du_i/dxi_k (mm/mm)."""
    arr = u.detach().cpu().numpy()
    dim = arr.ndim - 2
    out = np.empty(arr.shape[:2] + (dim,) + arr.shape[2:])
    for k in range(dim):
        out[:, :, k] = np.gradient(arr, spacing[k], axis=arr.ndim - 1 - k, edge_order=1)
    return out


# ---------------------------------------------------------------- affine fields: exact values


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("which", [0, 1])
def test_affine_field_exact_everywhere(dim, which):
    shape = SHAPES[dim][which]
    rng = np.random.default_rng(10 * dim + which)
    a = rng.uniform(-0.4, 0.4, (dim, dim))
    b = rng.uniform(-5, 5, dim)
    direction = rotation_direction(dim, 25.0 + 10 * which)
    grid = make_grid(shape, SPACING[dim], direction)
    u = affine_field(grid, a, b)

    jac = spatial_jacobian(u, SPACING[dim], direction)
    assert jac.shape == (1, *shape, dim, dim)
    expected = torch.as_tensor(a).expand_as(jac)
    torch.testing.assert_close(jac, expected, rtol=0, atol=1e-11)  # borders included

    det = jacobian_determinant(u, SPACING[dim], direction)
    assert det.shape == (1, *shape)
    torch.testing.assert_close(
        det, torch.full_like(det, float(np.linalg.det(np.eye(dim) + a))), rtol=0, atol=1e-11
    )

    frob2 = float((a**2).sum())
    assert diffusion(u, SPACING[dim]).item() == pytest.approx(frob2, rel=1e-11)
    assert total_variation(u, SPACING[dim], eps=1e-3).item() == pytest.approx(
        math.sqrt(frob2 + 1e-6), rel=1e-11
    )
    assert abs(bending_energy(u, SPACING[dim]).item()) < 1e-20
    assert folding_penalty(u, SPACING[dim], direction).item() == 0.0  # det(I + A) > 0 here

    stats = jacobian_stats(u, SPACING[dim], direction)
    det_a = float(np.linalg.det(np.eye(dim) + a))
    assert stats["min"] == pytest.approx(det_a, abs=1e-11)
    assert stats["max"] == pytest.approx(det_a, abs=1e-11)
    assert stats["mean"] == pytest.approx(det_a, abs=1e-11)
    assert stats["fraction_nonpositive"] == 0.0
    assert stats["std_log"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("dim", [2, 3])
def test_direction_matters_for_jacobian_not_for_index_jacobian(dim):
    """Without the direction the Jacobian of a rotated grid's affine field is A @ R (the index-
    axis derivatives), with it A: the world conversion is really applied."""
    rng = np.random.default_rng(3)
    a = rng.uniform(-0.4, 0.4, (dim, dim))
    direction = rotation_direction(dim, 40.0)
    grid = make_grid(SHAPES[dim][0], SPACING[dim], direction)
    u = affine_field(grid, a, np.zeros(dim))
    jac_index = spatial_jacobian(u, SPACING[dim])
    torch.testing.assert_close(
        jac_index[0].reshape(-1, dim, dim)[0], torch.as_tensor(a @ direction), rtol=0, atol=1e-11
    )


@pytest.mark.parametrize("dim", [2, 3])
def test_non_orthonormal_direction_jacobian(dim):
    """A sheared (non-orthonormal) direction matrix still gives the exact world Jacobian."""
    rng = np.random.default_rng(4)
    a = rng.uniform(-0.3, 0.3, (dim, dim))
    direction = rotation_direction(dim, 15.0) @ (np.eye(dim) + np.triu(np.full((dim, dim), 0.3), 1))
    grid = make_grid(SHAPES[dim][1], SPACING[dim], direction)
    u = affine_field(grid, a, np.ones(dim))
    jac = spatial_jacobian(u, SPACING[dim], torch.as_tensor(direction))  # tensor direction
    torch.testing.assert_close(jac, torch.as_tensor(a).expand_as(jac), rtol=0, atol=1e-11)


@pytest.mark.parametrize("dim", [2, 3])
def test_anisotropic_tv_affine_identity_direction(dim):
    rng = np.random.default_rng(5)
    a = rng.uniform(-0.5, 0.5, (dim, dim))
    grid = make_grid(SHAPES[dim][0], SPACING[dim])
    u = affine_field(grid, a, np.zeros(dim))
    value = total_variation_anisotropic(u, SPACING[dim]).item()
    assert value == pytest.approx(float(np.abs(a).sum()), rel=1e-11)


# ---------------------------------------------------------------- random fields vs numpy


@pytest.mark.parametrize("dim", [2, 3])
def test_random_field_matches_numpy_gradient_reference(dim):
    shape = SHAPES[dim][1]
    u = smooth_field(shape, seed=dim, amplitude=2.0, batch=2)
    sp = SPACING[dim]
    direction = rotation_direction(dim, 30.0)
    grad = reference_gradient(u, sp)  # (N, i, k, *shape)
    g = np.moveaxis(np.moveaxis(grad, 1, -1), 1, -1)  # (N, *shape, i, k)
    jac_ref = g @ np.linalg.inv(direction)
    det_ref = np.linalg.det(np.eye(dim) + jac_ref)

    np.testing.assert_allclose(spatial_jacobian(u, sp, direction).numpy(), jac_ref, atol=1e-12)
    np.testing.assert_allclose(jacobian_determinant(u, sp, direction).numpy(), det_ref, atol=1e-12)
    assert diffusion(u, sp).item() == pytest.approx(float((grad**2).sum(axis=(1, 2)).mean()), rel=1e-12)
    # diffusion is rotation invariant: the world Jacobian gives the same value
    assert diffusion(u, sp).item() == pytest.approx(float((jac_ref**2).sum(axis=(-2, -1)).mean()), rel=1e-12)
    assert total_variation_anisotropic(u, sp).item() == pytest.approx(
        float(np.abs(grad).sum(axis=(1, 2)).mean()), rel=1e-12
    )
    assert total_variation(u, sp, eps=0.01).item() == pytest.approx(
        float(np.sqrt((grad**2).sum(axis=(1, 2)) + 1e-4).mean()), rel=1e-12
    )
    assert sparsity(u).item() == pytest.approx(float(np.abs(u.numpy()).sum(axis=1).mean()), rel=1e-12)
    ref_fold = np.maximum(0.2 - det_ref, 0.0) ** 2
    assert folding_penalty(u, sp, direction, eps=0.2).item() == pytest.approx(float(ref_fold.mean()), rel=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_bending_energy_interior_matches_reference(dim):
    """Interior voxels: compact second differences and products of central differences."""
    shape = SHAPES[dim][0]
    u = smooth_field(shape, seed=7, amplitude=1.5)
    sp = SPACING[dim]
    arr = u[0].numpy()
    interior = tuple(slice(1, -1) for _ in range(dim))
    energy = np.zeros(tuple(s - 2 for s in shape))
    for k in range(dim):
        ax = dim - 1 - k
        d2 = (np.roll(arr, -1, ax + 1) - 2 * arr + np.roll(arr, 1, ax + 1)) / sp[k] ** 2
        energy += (d2[(slice(None),) + interior] ** 2).sum(0)
        for j in range(k + 1, dim):
            axj = dim - 1 - j
            dk = (np.roll(arr, -1, ax + 1) - np.roll(arr, 1, ax + 1)) / (2 * sp[k])
            dkj = (np.roll(dk, -1, axj + 1) - np.roll(dk, 1, axj + 1)) / (2 * sp[j])
            energy += 2 * (dkj[(slice(None),) + interior] ** 2).sum(0)
    mask = torch.zeros((1, 1, *shape), dtype=torch.float64)
    mask[(0, 0) + interior] = 1
    assert bending_energy(u, sp, mask=mask).item() == pytest.approx(float(energy.mean()), rel=1e-12)


# ---------------------------------------------------------------- spacing scaling


@pytest.mark.parametrize("dim", [2, 3])
def test_spacing_scaling(dim):
    u = smooth_field(SHAPES[dim][0], seed=11, amplitude=3.0)
    sp = SPACING[dim]
    sp2 = tuple(2 * s for s in sp)
    assert diffusion(u, sp2).item() == pytest.approx(diffusion(u, sp).item() / 4, rel=1e-12)
    assert bending_energy(u, sp2).item() == pytest.approx(bending_energy(u, sp).item() / 16, rel=1e-12)
    assert total_variation_anisotropic(u, sp2).item() == pytest.approx(
        total_variation_anisotropic(u, sp).item() / 2, rel=1e-12
    )
    assert total_variation(u, sp2, eps=0.0).item() == pytest.approx(
        total_variation(u, sp, eps=0.0).item() / 2, rel=1e-12
    )
    assert sparsity(u).item() > 0
    # anisotropic spacing is applied per axis (x is the last tensor dim): derivative along x only
    ux = torch.zeros((1, dim, *SHAPES[dim][0]), dtype=torch.float64)
    ux[:, 0] = torch.arange(SHAPES[dim][0][-1], dtype=torch.float64) * 3.0  # 3 mm per voxel in x
    assert diffusion(ux, sp).item() == pytest.approx((3.0 / sp[0]) ** 2, rel=1e-12)


# ---------------------------------------------------------------- quadratic fields


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("rotated", [False, True])
def test_bending_energy_quadratic_exact(dim, rotated):
    """u_i = p^T Q_i p + c_i . p: Hessian of u_i is Q_i + Q_i^T everywhere (borders included)."""
    shape = SHAPES[dim][1]
    direction = rotation_direction(dim, 35.0) if rotated else None
    grid = make_grid(shape, SPACING[dim], direction, origin=(0.0,) * dim)
    p = world_points(grid)
    rng = np.random.default_rng(21 + dim)
    qs = rng.uniform(-0.05, 0.05, (dim, dim, dim))
    cs = rng.uniform(-0.5, 0.5, (dim, dim))
    vals = torch.stack(
        [
            torch.einsum("...a,ab,...b->...", p, torch.as_tensor(qs[i]), p) + p @ torch.as_tensor(cs[i])
            for i in range(dim)
        ],
        dim=-1,
    )
    u = field_from_points(vals)
    expected = sum(float(((qs[i] + qs[i].T) ** 2).sum()) for i in range(dim))
    assert bending_energy(u, SPACING[dim]).item() == pytest.approx(expected, rel=1e-9)


def test_bending_energy_simple_quadratic():
    """u_x = a x^2 on a 2D grid with 2 mm spacing along x: d2u_x/dx2 = 2a, energy 4 a^2."""
    a = 0.3
    shape = (6, 9)
    x = torch.arange(shape[1], dtype=torch.float64) * 2.0
    u = torch.zeros((1, 2, *shape), dtype=torch.float64)
    u[:, 0] = a * x**2
    assert bending_energy(u, (2.0, 1.0)).item() == pytest.approx(4 * a * a, rel=1e-12)
    assert bending_energy(u, (1.0, 1.0)).item() == pytest.approx(16 * 4 * a * a, rel=1e-12)


# ---------------------------------------------------------------- folding


def test_identity_jacobian_stats_and_penalty():
    for shape in ((6, 7), (4, 5, 6)):
        u = torch.zeros((2, len(shape), *shape), dtype=torch.float64)
        stats = jacobian_stats(u, SPACING[len(shape)], rotation_direction(len(shape)))
        assert stats["min"] == pytest.approx(1.0, abs=1e-15)
        assert stats["max"] == pytest.approx(1.0, abs=1e-15)
        assert stats["mean"] == pytest.approx(1.0, abs=1e-15)
        assert stats["fraction_nonpositive"] == 0.0
        assert stats["std_log"] == pytest.approx(0.0, abs=1e-15)
        assert folding_penalty(u, eps=0.5).item() == 0.0
        assert JacobianRegularizer()(u).item() == 0.0


def test_global_fold_penalty_exact():
    """u_x = -2 x: det = 1 - 2 = -1 everywhere, penalty (eps + 1)^2."""
    grid = make_grid((6, 7), (1.5, 0.5))
    p = world_points(grid)
    vals = torch.stack([-2 * p[..., 0], torch.zeros_like(p[..., 0])], dim=-1)
    u = field_from_points(vals)
    stats = jacobian_stats(u, (1.5, 0.5))
    assert stats["fraction_nonpositive"] == 1.0
    assert stats["min"] == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(stats["std_log"])
    assert folding_penalty(u, (1.5, 0.5)).item() == pytest.approx(1.0, rel=1e-12)
    assert folding_penalty(u, (1.5, 0.5), eps=0.1).item() == pytest.approx(1.21, rel=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
def test_local_fold_detected(dim):
    """u_x = -2 x inside a box, 0 outside: a folding region; a mild smooth field does not fold."""
    shape = (12,) * dim
    x = torch.arange(shape[-1], dtype=torch.float64)
    u = torch.zeros((1, dim, *shape), dtype=torch.float64)
    box = (slice(None), 0) + (slice(3, 9),) * dim
    u[box] = (-2 * (x - 5.5))[3:9]
    stats = jacobian_stats(u)
    det = jacobian_determinant(u)
    frac = float((det <= 0).double().mean())
    assert stats["fraction_nonpositive"] == pytest.approx(frac, abs=1e-15)
    assert 0.05 < frac < 0.5
    # inside the box the derivative is exactly -2 -> det = -1
    inner = (0,) + (slice(4, 8),) * dim
    torch.testing.assert_close(det[inner], torch.full_like(det[inner], -1.0), rtol=0, atol=1e-12)
    assert stats["min"] <= -1.0
    penalty = folding_penalty(u).item()
    assert penalty == pytest.approx(float(torch.relu(-det).square().mean()), rel=1e-12)
    assert penalty > 0.01

    mild = smooth_field(shape, seed=2, amplitude=0.3, sigma=2.0)
    assert folding_penalty(mild).item() == 0.0
    assert jacobian_stats(mild)["fraction_nonpositive"] == 0.0
    assert jacobian_stats(mild)["min"] > 0.5


# ---------------------------------------------------------------- masks and batches


@pytest.mark.parametrize("dim", [2, 3])
def test_masks_weight_the_mean(dim):
    shape = SHAPES[dim][0]
    u = smooth_field(shape, seed=31, amplitude=2.0, batch=2)
    sp = SPACING[dim]
    rng = np.random.default_rng(1)
    w = torch.as_tensor(rng.uniform(0, 1, (2, 1, *shape)))
    w[0, 0].view(-1)[: w[0, 0].numel() // 2] = 0.0  # half of the first element ignored
    grad = torch.as_tensor(reference_gradient(u, sp))
    per_voxel = {
        "diffusion": (diffusion, grad.square().sum((1, 2))),
        "tv_aniso": (total_variation_anisotropic, grad.abs().sum((1, 2))),
        "l1": (lambda v, s, mask: sparsity(v, mask=mask), u.abs().sum(1)),
    }
    for name, (fn, values) in per_voxel.items():
        ww = w[:, 0]
        expected = ((values * ww).flatten(1).sum(1) / ww.flatten(1).sum(1)).mean().item()
        got = fn(u, sp, mask=w).item()
        assert got == pytest.approx(expected, rel=1e-12), name
        assert got != pytest.approx(fn(u, sp, mask=None).item(), rel=1e-3), name
    # a binary mask gives the plain mean over the selected voxels; broadcast (1, 1, *shape) works
    m = torch.zeros((1, 1, *shape), dtype=torch.float64)
    m[(0, 0) + (slice(1, 3),) * dim] = 1
    sel = grad.square().sum((1, 2))[(slice(None),) + (slice(1, 3),) * dim]
    assert diffusion(u, sp, mask=m).item() == pytest.approx(sel.mean().item(), rel=1e-12)
    # mask weights in jacobian_stats: min/max over the positive-weight voxels
    det = jacobian_determinant(u, sp)[(slice(None),) + (slice(1, 3),) * dim]
    stats = jacobian_stats(u, sp, mask=m)
    assert stats["min"] == pytest.approx(det.min().item(), rel=1e-12)
    assert stats["max"] == pytest.approx(det.max().item(), rel=1e-12)
    assert stats["mean"] == pytest.approx(det.mean().item(), rel=1e-12)
    assert stats["std_log"] == pytest.approx(det.log().std(unbiased=False).item(), rel=1e-9)


def test_zero_mask_and_bad_inputs_raise():
    u = torch.zeros((2, 2, 5, 6), dtype=torch.float64)
    mask = torch.ones((2, 1, 5, 6), dtype=torch.float64)
    mask[1] = 0
    with pytest.raises(InputError, match="zero"):
        diffusion(u, mask=mask)
    with pytest.raises(InputError, match="channels"):
        diffusion(torch.zeros((1, 3, 5, 6)))
    with pytest.raises(InputError, match="spacing"):
        bending_energy(u, spacing=(1.0, 0.0))
    with pytest.raises(InputError, match="spacing"):
        bending_energy(u, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="direction"):
        jacobian_determinant(u, direction=[[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(TypeError):
        sparsity(torch.zeros((1, 2, 4, 4), dtype=torch.int64))


# ---------------------------------------------------------------- gradients


def _gradcheck_cases():
    fns = {
        "diffusion": lambda u, sp, d, m: diffusion(u, sp, mask=m),
        "tv": lambda u, sp, d, m: total_variation(u, sp, mask=m, eps=1e-2),
        "tv_aniso": lambda u, sp, d, m: total_variation_anisotropic(u, sp, mask=m),
        "l1": lambda u, sp, d, m: sparsity(u, mask=m),
        "bending": lambda u, sp, d, m: bending_energy(u, sp, mask=m),
        "folding": lambda u, sp, d, m: folding_penalty(u, sp, d, mask=m, eps=0.5),
        "det": lambda u, sp, d, m: jacobian_determinant(u, sp, d),
    }
    return [(name, dim) for name in fns for dim in (2, 3)], fns


_CASES, _FNS = _gradcheck_cases()


@pytest.mark.parametrize("name,dim", _CASES)
def test_gradcheck(name, dim):
    shape = (4, 5) if dim == 2 else (3, 4, 3)
    gen = torch.Generator().manual_seed(dim)
    u = (torch.randn((1, dim, *shape), generator=gen, dtype=torch.float64) * 0.8).requires_grad_()
    mask = torch.rand((1, 1, *shape), generator=gen, dtype=torch.float64) + 0.1
    sp = SPACING[dim]
    direction = rotation_direction(dim, 20.0)
    fn = _FNS[name]
    if name == "folding":
        det = jacobian_determinant(u.detach(), sp, direction)
        assert bool((det < 0.5).any()) and bool((det > 0.5).any())  # both branches exercised
    assert torch.autograd.gradcheck(lambda v: fn(v, sp, direction, mask), (u,))


# ---------------------------------------------------------------- modules


def test_modules_match_functionals_and_registry():
    dim = 3
    u = smooth_field(SHAPES[dim][0], seed=41, amplitude=3.0)
    sp = SPACING[dim]
    direction = rotation_direction(dim, 30.0)
    mask = torch.rand((1, 1, *SHAPES[dim][0]), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cases = [
        (DiffusionRegularizer(), diffusion(u, sp, mask=mask)),
        (TVRegularizer(eps=0.1), total_variation(u, sp, mask=mask, eps=0.1)),
        (AnisotropicTVRegularizer(), total_variation_anisotropic(u, sp, mask=mask)),
        (SparsityRegularizer(), sparsity(u, mask=mask)),
        (BendingEnergyRegularizer(), bending_energy(u, sp, mask=mask)),
        (JacobianRegularizer(eps=0.9), folding_penalty(u, sp, direction, mask=mask, eps=0.9)),
    ]
    for module, expected in cases:
        got = module(u, spacing=sp, direction=direction, mask=mask)
        assert got.dim() == 0
        assert got.item() == pytest.approx(expected.item(), rel=1e-14), type(module).__name__
    assert cases[-1][1].item() > 0
    assert set(REGULARIZERS) == {"diffusion", "tv", "tv_aniso", "l1", "bending", "jacobian"}
    assert isinstance(build_regularizer("Bending"), BendingEnergyRegularizer)
    assert build_regularizer("jacobian", eps=0.3).kwargs == {"eps": 0.3}
    with pytest.raises(InputError, match="bending, diffusion, jacobian, l1, tv, tv_aniso"):
        build_regularizer("elastic")
    # modules are differentiable end to end
    v = u.clone().requires_grad_()
    build_regularizer("diffusion")(v, spacing=sp).backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


# ---------------------------------------------------------------- dtypes and devices


@pytest.mark.parametrize("device", DEVICES)
def test_devices_and_float32_match_cpu_float64(device):
    dim = 3
    u64 = smooth_field(SHAPES[dim][1], seed=51, amplitude=4.0, batch=2)
    sp = SPACING[dim]
    direction = rotation_direction(dim, 30.0)
    mask = torch.rand((2, 1, *SHAPES[dim][1]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fns = [
        lambda v, m: diffusion(v, sp, mask=m),
        lambda v, m: total_variation(v, sp, mask=m),
        lambda v, m: total_variation_anisotropic(v, sp, mask=m),
        lambda v, m: sparsity(v, mask=m),
        lambda v, m: bending_energy(v, sp, mask=m),
        lambda v, m: folding_penalty(v, sp, direction, mask=m, eps=0.8),
    ]
    for dtype in (torch.float64, torch.float32):
        u = u64.to(device=device, dtype=dtype)
        m = mask.to(device=device, dtype=dtype)
        for fn in fns:
            ref = fn(u64, mask).item()
            got = fn(u, m)
            assert got.device.type == torch.device(device).type and got.dtype == dtype
            assert got.item() == pytest.approx(ref, rel=1e-4 if dtype == torch.float32 else 1e-10)
        det = jacobian_determinant(u, sp, direction)
        assert det.device.type == torch.device(device).type
        torch.testing.assert_close(det.cpu().double(), jacobian_determinant(u64, sp, direction), rtol=1e-4, atol=1e-4)
        stats = jacobian_stats(u, sp, direction, mask=m)
        ref_stats = jacobian_stats(u64, sp, direction, mask=mask)
        for key, value in ref_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
