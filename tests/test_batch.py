"""regcore.batch: B pairs sharing a fixed image registered as one batched problem equal B single
runs; a bad pair fails alone; the padded moving stack samples each image exactly; memory sizing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_image, rotation_direction
from regcore import Grid, Image, InputError, register
from regcore.batch import RegistrationFailure, estimate_pair_bytes, is_out_of_memory, max_batch_size, register_batch
from regcore.evaluation import mean_dice
from regcore.losses.local_cc import local_cc
from regcore.moving_stack import MovingStack
from regcore.sampling import inside_weight, sample_normalized, sample_world

# the default chain, shortened for a 32^3 2 mm image
CHAIN = "affine+syn"
SHORT = {"stages": [{}, {}, {"pyramid": {"spacing_mm": [8, 4, 2], "iterations": [30, 20, 10]}}]}


def _warp(image: Image, grid: Grid, shift: np.ndarray, amplitude: float, mode: str = "linear") -> Image:
    """``image`` resampled on ``grid`` through ``x -> x - shift - a sin(...)`` (a smooth deformation)."""
    pts = grid.world_points(dtype=torch.float64)
    wave = amplitude * torch.sin(pts[..., [1, 2, 0]] / 9.0)
    src = pts - torch.as_tensor(shift) - wave
    data = sample_world(image, src, mode=mode, padding="border")
    return Image(data, grid)


@pytest.fixture(scope="module")
def cohort():
    """A fixed blob image with 3 labels and 4 moving images, deformed copies on different grids."""
    fixed = make_image((32, 32, 32), spacing=(2.0, 2.0, 2.0), seed=3, n=16)
    labels = Image(torch.bucketize(fixed.data, torch.tensor([0.25, 0.45, 0.65])).to(torch.int64), fixed.grid)
    grids = [
        Grid((32, 32, 32), (2.0, 2.0, 2.0)),
        Grid((36, 30, 34), (2.0, 2.0, 2.0), origin=(-6.0, 3.0, -2.0)),
        Grid((28, 33, 30), (2.2, 2.0, 2.1), origin=(4.0, 0.0, 2.0), direction=rotation_direction(3, 8.0)),
        Grid((34, 34, 31), (1.9, 1.9, 2.0), origin=(-2.0, -3.0, 0.0)),
    ]
    movings, moving_labels = [], []
    for k, grid in enumerate(grids):
        shift = np.array([3.0 - k, 1.5 * k - 2.0, 2.0])
        movings.append(_warp(fixed, grid, shift, 2.0 + 0.5 * k))
        moving_labels.append(_warp(labels, grid, shift, 2.0 + 0.5 * k, mode="nearest"))
    return fixed, labels, movings, moving_labels


def _dice(result, fixed_labels: Image, moving_labels: Image) -> float:
    pts = fixed_labels.grid.world_points(dtype=torch.float64) + torch.movedim(result.displacement.data.double(), 0, -1)
    return float(mean_dice(fixed_labels.data, sample_world(moving_labels, pts, mode="nearest")))


def test_a_batch_equals_single_runs(cohort, single_thread):
    fixed, labels, movings, moving_labels = cohort
    singles = [register(fixed, m, CHAIN, config=SHORT) for m in movings]
    batch = register_batch(fixed, movings, CHAIN, config=SHORT)
    assert len(batch) == 4 and all(r.ok for r in batch)
    iterations = set()
    for s, b, ml in zip(singles, batch, moving_labels):
        diff = (s.displacement.data - b.displacement.data).norm(dim=0)
        assert float(diff.mean()) < 0.1  # mm, over the fixed grid
        assert abs(_dice(s, labels, ml) - _dice(b, labels, ml)) < 0.005
        assert _dice(b, labels, ml) > _dice_identity(labels, ml) + 0.1  # it registered
        # each pair stops by its own rule: the same iterations per level as alone
        assert [lvl.iterations for lvl in b.levels] == [lvl.iterations for lvl in s.levels]
        iterations.add(tuple(lvl.iterations for lvl in b.levels))
    assert len(iterations) > 1  # the pairs did stop at different iterations within the batch


def _dice_identity(labels: Image, moving_labels: Image) -> float:
    pts = labels.grid.world_points(dtype=torch.float64)
    return float(mean_dice(labels.data, sample_world(moving_labels, pts, mode="nearest")))


def test_a_bad_pair_fails_alone(cohort, single_thread):
    fixed, _, movings, _ = cohort
    bad = movings[1].data.clone()
    bad[0, 3, 4, 5] = math.nan
    with_bad = [movings[0], Image(bad, movings[1].grid), movings[2], movings[3]]
    constant = Image(torch.ones_like(movings[2].data), movings[2].grid)
    results = register_batch(fixed, with_bad[:2] + [constant, movings[3]], "affine")
    assert isinstance(results[1], RegistrationFailure) and not results[1].ok
    assert "NaN" in results[1].message and "moving 1" in results[1].message
    assert isinstance(results[2], RegistrationFailure) and "constant" in results[2].message
    clean = register_batch(fixed, [movings[0], movings[3]], "affine")
    for got, want in zip((results[0], results[3]), clean):
        assert got.ok
        assert torch.allclose(got.displacement.data, want.displacement.data, atol=1e-4)
    with pytest.raises(InputError, match="NaN"):  # one pair: register raises what the batch records
        register(fixed, with_bad[1], "affine")


def test_pairs_of_other_deformable_transforms_run_in_the_batch_one_by_one():
    fixed = make_image((40, 44), spacing=(1.0, 1.0), seed=1)
    movings = [make_image((40, 44), spacing=(1.0, 1.0), origin=(o, -o), seed=1) for o in (1.5, -2.0)]
    cfg = {"stages": [{}, {"pyramid": {"spacing_mm": [4, 2], "iterations": [15, 10]}}]}
    batch = register_batch(fixed, movings, "rigid+svf", config=cfg)
    singles = [register(fixed, m, "rigid+svf", config=cfg) for m in movings]
    for b, s in zip(batch, singles):
        assert torch.allclose(b.displacement.data, s.displacement.data, atol=1e-3)


def test_moving_stack_samples_each_image_as_alone():
    images = [make_image((10, 12, 9), seed=1), make_image((7, 15, 11), spacing=(1.5, 1.0, 2.0), seed=2),
              make_image((12, 9, 13), seed=3)]
    stack = MovingStack(images)
    assert stack.data.shape == (3, 1, 12, 15, 13) and stack.padded
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand((3, 5, 6, 7, 3), generator=gen) * 2.6 - 1.3  # inside and outside each box
    for padding in ("border", "zeros"):
        got = stack.sample(coords, padding=padding)
        for b, image in enumerate(images):
            want = sample_normalized(image.data, coords[b], padding=padding)
            weight = stack.inside_weight(coords[b:b + 1], [b])[0]
            assert torch.allclose(weight, inside_weight(coords[b], image.grid.size))
            if padding == "border":
                assert torch.allclose(got[b], want, atol=1e-5)
            else:  # zeros: equal wherever the point is inside its own image
                inside = weight > 0
                assert torch.allclose(got[b][:, inside], want[:, inside], atol=1e-5)
    sub = stack.sample(coords[[2, 0]], [2, 0], padding="border")
    assert torch.allclose(sub[0], stack.sample(coords, padding="border")[2])


def test_local_cc_per_sample_values_and_gradients_are_each_pairs_own():
    gen = torch.Generator().manual_seed(1)
    fixed = torch.rand((3, 1, 9, 10, 11), generator=gen)
    moving = (fixed + 0.3 * torch.rand((3, 1, 9, 10, 11), generator=gen)).requires_grad_(True)
    values = local_cc(fixed, moving, per_sample=True)
    assert values.shape == (3,)
    (grad,) = torch.autograd.grad(values.sum(), moving)
    for n in range(3):
        m = moving[n:n + 1].detach().clone().requires_grad_(True)
        alone = local_cc(fixed[n:n + 1], m)
        (g,) = torch.autograd.grad(alone, m)
        assert torch.allclose(values[n], alone, atol=1e-7)
        assert torch.allclose(grad[n:n + 1], g, atol=1e-9, rtol=1e-5)


def test_batch_size_from_memory(monkeypatch):
    grid = Grid((182, 218, 182), (1.0, 1.0, 1.0))
    per_pair = estimate_pair_bytes(grid, grid, CHAIN)
    assert 2e8 < per_pair < 2e9  # a 1 mm brain: a few hundred MB per pair
    coarse = estimate_pair_bytes(Grid((91, 109, 91), (2.0, 2.0, 2.0)), None, CHAIN)
    assert coarse < per_pair
    assert max_batch_size(grid, grid, CHAIN, "cpu") == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * per_pair, 80 * 2**30))
    assert max_batch_size(grid, grid, CHAIN, "cuda:0") == 8  # 80 % of 10 pairs' worth
    assert max_batch_size(grid, grid, CHAIN, "cuda:0", limit=4) == 4
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(InputError("bad"))


def test_deterministic_interpolation_equals_grid_sample_values_and_gradients():
    import torch.nn.functional as F

    from regcore.sampling import interpolate_linear

    gen = torch.Generator().manual_seed(2)
    for shape in ((2, 3, 7, 8, 9), (1, 2, 6, 5)):
        d = len(shape) - 2
        data = torch.rand(shape, generator=gen, dtype=torch.float64)
        coords = (torch.rand((2, *(4, 5, 6)[:d], d), generator=gen, dtype=torch.float64) * 2.8 - 1.4).requires_grad_(True)
        for padding in ("zeros", "border"):
            want = F.grid_sample(data.expand(2, *shape[1:]), coords, mode="bilinear", padding_mode=padding,
                                 align_corners=True)
            got = interpolate_linear(data, coords, padding)
            (g_want,) = torch.autograd.grad(want.sum(), coords)
            (g_got,) = torch.autograd.grad(got.sum(), coords)
            assert torch.allclose(got, want, atol=1e-12) and torch.allclose(g_got, g_want, atol=1e-10)


def test_deterministic_option_gives_the_same_registration(cohort, single_thread, monkeypatch):
    import regcore.moving_stack as moving_stack

    calls = []
    original = moving_stack.interpolate_linear
    monkeypatch.setattr(moving_stack, "interpolate_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    fixed, _, movings, _ = cohort
    plain = register_batch(fixed, movings[:2], "affine")
    assert not calls  # grid_sample by default
    steady = register_batch(fixed, movings[:2], "affine", deterministic=True)
    assert calls  # the differentiated warps went through the deterministic interpolation
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is restored
    for a, b in zip(plain, steady):
        assert float((a.displacement.data - b.displacement.data).norm(dim=0).mean()) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_cuda_runs_repeat_bit_for_bit(cohort):
    fixed, _, movings, _ = cohort
    runs = [register_batch(fixed, movings, CHAIN, config=SHORT, device="cuda", deterministic=True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a.displacement.data, b.displacement.data)
