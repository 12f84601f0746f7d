"""The symmetric diffeomorphic transform (``syn``), its field operations and its greedy optimiser.

Grids have rotated or permuted directions and anisotropic spacing, so that a wrong world/index
convention shows up as a wrong displacement.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regcore import Grid, Image, read_image, register
from regcore.config import validate_config
from regcore.errors import InputError
from regcore.evaluation import inverse_consistency, mean_dice
from regcore.fields import _fixed_point_then_newton, compose_first_order, invert_displacement, invert_onto, resize_field, world_gradient
from regcore.methods import method_config
from regcore.regularizers import jacobian_determinant
from regcore.sampling import sample_world
from regcore.transforms.deformable import compose_displacements
from regcore.transforms.registry import deformable_transform_class
from regcore.transforms.syn import SymmetricDiffeomorphism

from conftest import blobs, rotation_direction, shared_data

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64
PERMUTED = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # a sagittal scan's PSR-like axes


def smooth_function(grid: Grid, amplitude_mm: float, seed: int = 0):
    """A smooth displacement as a function of world points ``(..., 3) -> (3, ...)`` (mm):
    low-frequency sines of the position."""
    rng = np.random.default_rng(seed)
    centre = torch.as_tensor(grid.center(), dtype=F64)
    extent = float(np.linalg.norm(grid.extent()))
    waves = []
    for _ in range(3):
        k = torch.as_tensor(rng.normal(0, 1, 3), dtype=F64)
        waves.append((k / k.norm() * (2 * math.pi / extent) * rng.uniform(0.8, 1.5), float(rng.uniform(0, 2 * math.pi))))
    return lambda pts: torch.stack([amplitude_mm * torch.sin((pts.to(F64) - centre) @ k + phase) for k, phase in waves])


def smooth_field(grid: Grid, amplitude_mm: float, seed: int = 0, dtype=F64) -> torch.Tensor:
    """:func:`smooth_function` sampled at the voxel centres, ``(3, *grid.shape)``."""
    return smooth_function(grid, amplitude_mm, seed)(grid.world_points(dtype=F64)).to(dtype)


# --------------------------------------------------------------------------- field operations
@pytest.mark.parametrize("direction", [None, PERMUTED, rotation_direction(3, 25.0)])
def test_world_gradient_of_a_linear_function(direction):
    grid = Grid((10, 12, 14), (1.0, 2.0, 1.5), (3.0, -7.0, 11.0), direction)
    a = torch.tensor([0.3, -0.7, 1.1], dtype=F64)
    g = world_gradient(grid.world_points(dtype=F64) @ a, grid)
    torch.testing.assert_close(g, a[:, None, None, None].expand_as(g))


@pytest.mark.parametrize("direction", [PERMUTED, rotation_direction(3, 25.0)])
def test_first_order_composition_matches_resampling_for_small_steps(direction):
    grid = Grid((24, 22, 20), (1.5, 1.2, 1.8), (0.0, 5.0, -3.0), direction)
    u_of = smooth_function(grid, 3.0, seed=1)
    pts = grid.world_points(dtype=F64)
    u = u_of(pts)
    step = smooth_field(grid, 0.3, seed=2)  # a sub-voxel greedy step
    truth = step + u_of(pts + torch.movedim(step, 0, -1))  # (id + u) o (id + step), analytically
    inner = (slice(None),) + (slice(2, -2),) * 3
    first = (compose_first_order(u, step, grid) - truth)[inner].norm(dim=0)
    resampled = (compose_displacements(step, u, grid) - truth)[inner].norm(dim=0)  # trilinear
    additive = (u + step - truth)[inner].norm(dim=0)
    assert float(first.max()) < 0.02  # mm, against steps of 0.3 mm
    assert float(first.mean()) < 0.1 * float(additive.mean())  # far better than adding the fields
    assert float(first.mean()) < 2 * float(resampled.mean())  # as good as resampling, at the voxel level


def test_invert_displacement_inverts():
    grid = Grid((26, 24, 22), (1.5, 1.5, 2.0), (4.0, 0.0, -9.0), PERMUTED)
    u = smooth_field(grid, 3.0, seed=3)
    v = invert_displacement(u, grid, iterations=50, tol_vox=1e-4)
    ic = inverse_consistency(v, u, grid)  # (id + u) o (id + v) = id
    assert ic["max_mm"] < 0.01


def stretching_field(grid: Grid, stretch: float) -> torch.Tensor:
    """An invertible field whose map stretches world x by up to ``1 + stretch`` in a slab:
    ``u_x = stretch * g(y) * 3 tanh((x - x0) / 3)`` (mm, ``g`` a Gaussian bump in y), so
    ``d(x + u_x)/dx`` lies in ``[1, 1 + stretch]``: the map is one to one."""
    pts = grid.world_points(dtype=F64)
    centre = torch.as_tensor(grid.center(), dtype=F64)
    x, y = pts[..., 0] - centre[0], pts[..., 1] - centre[1]
    u = torch.zeros(3, *grid.shape, dtype=F64)
    u[0] = stretch * torch.exp(-(y / 8.0) ** 2) * 3.0 * torch.tanh(x / 3.0)
    return u.float()


def test_inversion_converges_where_the_fixed_point_diverges():
    """A map that stretches by 3.5: the plain fixed point ``v <- -u(y + v)`` oscillates there
    (``|grad u| > 1``), the Newton steps of :func:`invert_displacement` do not; a SyN map made
    of such a half must not fold."""
    grid = Grid((40, 36, 30), (1.0, 1.0, 1.0), (4.0, 0.0, -9.0), PERMUTED)
    u = stretching_field(grid, 2.5)
    v = -u
    for _ in range(50):  # the fixed point alone
        v = -sample_world(Image(u, grid), grid.world_points() + torch.movedim(v, 0, -1), padding="border")
    plain = inverse_consistency(v, u, grid)["max_mm"]
    assert plain > 0.1  # the case is hard: 50 fixed-point steps leave a tenth of a mm or more
    w = invert_displacement(u, grid, iterations=20, tol_vox=0.01)
    assert inverse_consistency(w, u, grid)["max_mm"] < 0.011  # every voxel within 0.01 voxel
    start = -u.clone()
    whole = _fixed_point_then_newton(u, grid, grid, start, 3, 0.01)  # many voxels left to Newton ...
    assert torch.equal(start, -u)  # (the caller's start is not written to)
    torch.testing.assert_close(_fixed_point_then_newton(u, grid, grid, start, 3, 0.01, newton_chunk=1000), whole)  # ... in chunks
    assert inverse_consistency(whole, u, grid)["max_mm"] < 0.011
    t = SymmetricDiffeomorphism(grid)
    t.set_halves(u, torch.zeros_like(u))  # T = (id + u)^-1: an inverse that failed would fold
    det = jacobian_determinant(t.displacement(grid).detach()[None], spacing=grid.spacing, direction=grid.direction)
    assert float(det.min()) > 0.2  # analytically in [1/3.5, 1]
    other = Grid((30, 24, 20), (1.2, 1.3, 1.1), grid.center() - np.array([15.0, 14.0, 10.0]))  # identity direction
    w = invert_onto(u, grid, other, tol_vox=0.01)  # the same, onto another grid (the export's inverse)
    pts = other.world_points() + torch.movedim(w, 0, -1)
    residual = w + sample_world(Image(u, grid), pts, padding="border")
    assert float(residual.norm(dim=0).max()) < 0.0111  # 0.01 voxel of ``other``


def test_inversion_reaches_roots_far_from_the_fixed_point():
    """A wide slab stretched by 3.5 (2D): the diverging fixed point leaves voxels tens of mm from
    their root, which the Newton steps' growing trust region still reaches. A float64 start for
    a float32 field, and a start that already fits, come back as new float32 fields."""
    grid = Grid((120, 40))
    pts = grid.world_points(dtype=F64)
    centre = torch.as_tensor(grid.center(), dtype=F64)
    u = torch.zeros(2, *grid.shape, dtype=F64)
    u[0] = 2.5 * torch.exp(-((pts[..., 1] - centre[1]) / 8.0) ** 2) * 8.0 * torch.tanh((pts[..., 0] - centre[0]) / 8.0)
    w = invert_displacement(u, grid, iterations=20, tol_vox=0.01)
    assert inverse_consistency(w, u, grid)["max_mm"] < 0.0101
    u32 = u.float()
    start = w.clone()  # float64, already within tolerance
    again = invert_displacement(u32, grid, tol_vox=0.01, initial=start)
    assert again.dtype == torch.float32 and again is not start and torch.equal(start, w)
    assert inverse_consistency(again, u32, grid)["max_mm"] < 0.0101


# --------------------------------------------------------------------------- the transform
def test_registered_as_syn():
    assert deformable_transform_class("syn") is SymmetricDiffeomorphism


def test_zero_halves_are_the_identity_exactly():
    grid = Grid((9, 8, 7), (1.0, 1.3, 2.0), (1.0, 2.0, 3.0), PERMUTED)
    t = SymmetricDiffeomorphism(grid)
    assert torch.equal(t.displacement(grid), torch.zeros(3, *grid.shape))
    assert torch.equal(t.inverse_displacement(grid), torch.zeros(3, *grid.shape))
    coarse = grid.downsample(2, min_size=2)
    t.set_level(coarse)
    assert torch.equal(t.displacement(grid), torch.zeros(3, *grid.shape))
    pts = grid.world_points()
    assert torch.equal(t(pts), pts)


def test_displacement_gradients_match_finite_differences():
    grid = Grid((6, 5, 4), (1.0, 1.2, 1.5), (0.0, 0.0, 0.0), rotation_direction(3, 25.0))
    t = SymmetricDiffeomorphism(grid, inverse_iterations=40, inverse_tol_vox=1e-14, dtype=F64)
    with torch.no_grad():
        t.set_halves(smooth_field(grid, 0.3, seed=4), smooth_field(grid, 0.4, seed=5))
    weights = torch.randn(3, *grid.shape, dtype=F64, generator=torch.Generator().manual_seed(0))

    def objective():
        return (t.displacement(grid) * weights).sum()

    ga, gb = torch.autograd.grad(objective(), [t.to_fixed, t.to_moving])
    rng = np.random.default_rng(1)
    for _ in range(6):  # central differences at random voxels of each half
        for param, grad in ((t.to_fixed, ga), (t.to_moving, gb)):
            idx = tuple(int(rng.integers(0, s)) for s in (3, *grid.shape))
            h = 1e-6
            with torch.no_grad():
                param[idx] += h
                plus = float(objective())
                param[idx] -= 2 * h
                minus = float(objective())
                param[idx] += h
            assert (plus - minus) / (2 * h) == pytest.approx(float(grad[idx]), rel=1e-4, abs=1e-7)


def test_forward_and_inverse_compose_to_the_identity():
    grid = Grid((32, 30, 28), (1.5, 1.5, 1.5), (-20.0, 10.0, 5.0), PERMUTED)
    t = SymmetricDiffeomorphism(grid)
    with torch.no_grad():
        t.set_halves(smooth_field(grid, 2.0, seed=6, dtype=torch.float32), smooth_field(grid, 2.5, seed=7, dtype=torch.float32))
        forward, inverse = t.displacement(grid), t.inverse_displacement(grid)
    assert float(forward.norm(dim=0).mean()) > 2.0  # a real deformation (mm)
    for there, back in ((forward, inverse), (inverse, forward)):
        err, valid = _round_trip(there, back, grid)
        assert int(valid.sum()) > 0.3 * valid.numel()
        assert float(err[valid].max()) < 0.1 * min(grid.spacing)  # 0.1 voxel


def _round_trip(there: torch.Tensor, back: torch.Tensor, grid: Grid, margin: float = 2.0):
    """``|y + back(y) - x|`` with ``y = x + there(x)`` (mm), and where ``y`` stays ``margin``
    voxels inside the grid (outside, fields are border-clamped and no inverse is defined)."""
    pts = grid.world_points(dtype=F64)
    moved = pts + torch.movedim(there.double(), 0, -1)
    index = torch.as_tensor(grid.world_points_to_index(moved))
    size = torch.as_tensor(grid.size, dtype=F64)
    valid = ((index >= margin) & (index <= size - 1 - margin)).all(-1)
    returned = moved + torch.movedim(sample_world(Image(back.double(), grid), moved, padding="border"), 0, -1)
    return (returned - pts).norm(dim=-1), valid


def test_set_halves_checks_shapes():
    grid = Grid((5, 5, 5))
    t = SymmetricDiffeomorphism(grid)
    with pytest.raises(InputError, match="half fields"):
        t.set_halves(torch.zeros(3, 4, 5, 5), torch.zeros(3, 5, 5, 5))
    with pytest.raises(InputError, match="inverse_iterations"):
        SymmetricDiffeomorphism(grid, inverse_iterations=0)


def test_set_halves_takes_over_the_fields_after_release():
    """A level releases the transform's halves while it fits its own copies, then hands them
    back: the transform holds the new tensors (in its own dtype) and maps with them."""
    grid = Grid((6, 5, 4), (1.5, 1.5, 2.0), (0.0, 0.0, 0.0), PERMUTED)
    t = SymmetricDiffeomorphism(grid, dtype=F64)
    t.release_halves()
    assert list(t.parameters()) == []
    u = smooth_field(grid, 1.0, seed=4, dtype=torch.float32)
    t.set_halves(torch.zeros_like(u), u)
    assert t.to_moving.dtype == F64 and [p.shape for p in t.parameters()] == [u.shape, u.shape]
    torch.testing.assert_close(t.displacement(grid).float(), u, atol=1e-6, rtol=0)  # phi_f = id: T = id + u


@pytest.mark.parametrize("spacing, expected_update, expected_field", [
    ((8.0, 8.0, 8.0), [1.25] * 3, [0.5] * 3),        # coarse level: relative (voxel) sigmas
    ((2.0, 2.0, 2.0), [1.25] * 3, [0.5] * 3),        # 2 mm: both rules agree
    ((1.0, 1.0, 1.0), [2.5] * 3, [1.0] * 3),         # 1 mm: the mm floor (2.5 mm, 1 mm)
    ((1.0, 1.0, 2.5), [1.25, 2.5, 2.5], [0.5, 1.0, 1.0]),  # anisotropic: per axis, (z, y, x) order
])
def test_level_sigmas_are_voxels_with_a_floor_in_mm(spacing, expected_update, expected_field):
    from regcore.greedy import level_sigmas

    assert level_sigmas(1.25, 2.5, spacing) == pytest.approx(expected_update)
    assert level_sigmas(0.5, 1.0, spacing) == pytest.approx(expected_field)


def test_greedy_levels_smooth_in_voxels_or_with_the_configured_mm_floor(monkeypatch):
    """The preset smooths every level by 1.25 (updates) and 0.5 (fields) of its own voxels, the
    1 mm level included. mm floors, when configured (``benchmarks/configs/syn-1mm-floors.yaml``),
    reach the greedy optimiser: the 1 mm level then smooths updates by 2.5 voxels and fields by 1
    voxel, the coarse level (>= 2.75 mm here: the image is small) still by 1.25 and 0.5 voxels."""
    import regcore.greedy as greedy

    seen: list[tuple[float, ...]] = []
    real = greedy.gaussian_smooth

    def spy(data, sigma):
        seen.append(tuple(round(float(x), 6) for x in sigma))
        return real(data, sigma)

    monkeypatch.setattr(greedy, "gaussian_smooth", spy)
    shape = (24, 26, 22)
    grid = Grid(tuple(reversed(shape)), (1.0, 1.0, 1.0))
    fixed = Image(torch.from_numpy(blobs(shape, n=20, seed=5, sigma=0.1)).float(), grid)
    moving = Image(torch.roll(fixed.data, 1, dims=-1), grid)
    cfg = method_config("syn").model_dump(mode="json")
    assert cfg["stages"][0]["smoothing"]["update_sigma_mm"] == 0.0 and cfg["stages"][0]["smoothing"]["field_sigma_mm"] == 0.0
    cfg["stages"][0]["pyramid"] = {"spacing_mm": [4, 1], "iterations": [3, 3]}
    register(fixed, moving, cfg)
    assert set(seen) == {(1.25,) * 3, (0.5,) * 3}, sorted(set(seen))
    seen.clear()
    cfg["stages"][0]["smoothing"].update(update_sigma_mm=2.5, field_sigma_mm=1.0)
    register(fixed, moving, cfg)
    assert set(seen) == {(1.25,) * 3, (0.5,) * 3, (2.5,) * 3, (1.0,) * 3}, sorted(set(seen))


# --------------------------------------------------------------------------- configuration
def test_syn_needs_the_greedy_optimizer_and_no_regularizers():
    base = {"name": "x", "stages": [{"transform": "syn", "optimizer": {"name": "greedy", "lr": 0.5}}]}
    validate_config(base)
    with pytest.raises(InputError, match="greedy"):
        validate_config({"name": "x", "stages": [{"transform": "syn"}]})
    with pytest.raises(InputError, match="greedy"):
        validate_config({"name": "x", "stages": [{"transform": "ffd", "optimizer": {"name": "greedy"}}]})
    with pytest.raises(InputError, match="smoothing"):
        validate_config({"name": "x", "stages": [{"transform": "syn", "optimizer": {"name": "greedy"},
                                                  "regularizers": [{"name": "diffusion"}]}]})
    cfg = method_config("affine+syn")
    assert [s.transform for s in cfg.stages] == ["rigid", "affine", "syn"]


# --------------------------------------------------------------------------- registration
def _known_pair(direction, offset=(0.0, 0.0, 0.0)):
    """fixed = blobs; moving(y) = fixed(y + s(y)), so the true fixed -> moving map is the inverse
    of ``id + s``. Returns images, the true displacement, and the fixed image's foreground."""
    shape = (36, 40, 38)
    grid = Grid(tuple(reversed(shape)), (1.5, 1.5, 1.5), (10.0, -20.0, 5.0), direction)
    fixed = Image(torch.from_numpy(blobs(shape, n=40, seed=3, sigma=0.09)).float(), grid)
    s = smooth_field(grid, 2.5, seed=8)
    moving_data = sample_world(fixed, grid.world_points(dtype=F64) + torch.movedim(s, 0, -1)).float()
    moving_grid = Grid(grid.size, grid.spacing, tuple(np.asarray(grid.origin) + np.asarray(offset)), grid.direction)
    moving = Image(moving_data, moving_grid)
    truth = invert_displacement(s, grid, iterations=60, tol_vox=1e-5) + torch.as_tensor(offset, dtype=F64)[:, None, None, None]
    return fixed, moving, truth.float(), fixed.data[0] > 0.15


def test_syn_recovers_a_known_field_3d():
    fixed, moving, truth, fg = _known_pair(PERMUTED)
    res = register(fixed, moving, "syn", config={"stages": [{"pyramid": {"factors": [2, 1], "iterations": [60, 30]}}]})
    before = float(truth.norm(dim=0)[fg].mean())
    error = float((res.displacement.data - truth).norm(dim=0)[fg].mean())
    assert before > 1.5
    assert error < 0.15 * before, (before, error)  # 2.84 mm -> 0.30 mm
    assert float((res.jacobian.data <= 0).float().mean()) == 0.0
    with torch.no_grad():
        ic = inverse_consistency(res.displacement.data, res.deformable.inverse_displacement(fixed.grid), fixed.grid)
    assert ic["mean_mm"] < 0.05


def test_affine_syn_recovers_an_offset_and_the_field():
    """A 15 mm offset between the images (as between native-space scans) on top of the field."""
    fixed, moving, truth, fg = _known_pair(PERMUTED, offset=(15.0, -9.0, 6.0))
    res = register(fixed, moving, "affine+syn", config={"stages": [{}, {}, {"pyramid": {"factors": [2, 1], "iterations": [60, 30]}}]})
    before = float((truth - truth[:, fg].mean(1)[:, None, None, None]).norm(dim=0)[fg].mean())
    error = float((res.displacement.data - truth).norm(dim=0)[fg].mean())
    assert error < 0.4, (before, error)  # mm: the offset is absorbed, the field as without it (0.27 mm)


def test_brain_t1_pair_beats_affine_without_folding():
    """Real inter-subject T1 at 2 mm (native space, permuted directions): the preset chain."""
    d = "brain-t1"
    fixed, moving = (read_image(shared_data(d, f"subj{s}_t1.nii.gz")) for s in ("01", "02"))
    fl = read_image(shared_data(d, "subj01_labels.nii.gz"), dtype=None)
    ml = read_image(shared_data(d, "subj02_labels.nii.gz"), dtype=None)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = register(fixed, moving, "affine+syn")
    finally:
        torch.set_num_threads(previous)
    labels = sorted((set(torch.unique(fl.data).tolist()) & set(torch.unique(ml.data).tolist())) - {0})

    def dice(displacement):
        pts = fl.grid.world_points(dtype=F64) + torch.movedim(displacement.double(), 0, -1)
        return mean_dice(fl.data, sample_world(ml, pts, mode="nearest"), labels)

    from regcore.registration import linear_displacement

    affine = dice(linear_displacement(res.transform.matrix().detach(), fixed).data)
    ours = dice(res.displacement.data)
    assert ours > 0.68 and ours > affine + 0.2, (affine, ours)  # ANTs SyN[s] 0.660, greedy 0.644 on this pair
    assert float((res.jacobian.data <= 0).double().mean()) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_syn_on_cuda_matches_cpu():
    fixed, moving, truth, fg = _known_pair(PERMUTED)
    cfg = {"stages": [{"pyramid": {"factors": [2, 1], "iterations": [30, 10]}}]}
    cpu = register(fixed, moving, "syn", config=cfg)
    gpu = register(fixed.to("cuda"), moving.to("cuda"), "syn", config=cfg, device="cuda")
    diff = (gpu.displacement.data.cpu() - cpu.displacement.data).norm(dim=0)[fg]
    assert float(diff.mean()) < 0.05  # mm: atomics in grid_sample's backward aside, the same steps
