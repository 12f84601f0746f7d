"""The registration loop on synthetic data with known answers; errors; determinism; configs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image, InputError, method_config, register
from regcore.config import config_hash
from regcore.io import image_from_sitk, image_to_sitk
from regcore.export import matrix_to_sitk

from conftest import blobs, make_image

FAST = {"pyramid": {"factors": [2, 1], "iterations": [30, 20]}}


def _moved(fixed: Image, matrix: np.ndarray, grid: Grid | None = None) -> Image:
    """Moving image such that M(T(x)) = F(x) with T = matrix (fixed -> moving world), via ITK."""
    grid = grid or fixed.grid
    ref = image_to_sitk(Image(torch.zeros(1, *grid.shape), grid))
    inverse = np.linalg.inv(matrix)  # moving point y holds fixed content at T^-1(y)
    out = sitk.Resample(image_to_sitk(fixed), ref, matrix_to_sitk(inverse), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    return image_from_sitk(out)


def _translation(t):
    m = np.eye(len(t) + 1)
    m[:-1, -1] = t
    return m


@pytest.mark.parametrize(
    "optimizer",
    [
        {"name": "lbfgs", "lr": 1.0, "params": {"max_iter": 10, "line_search_fn": "strong_wolfe"}},
        {"name": "adam", "lr": 0.05},
        {"name": "sgd", "lr": 0.05, "params": {"momentum": 0.9}},
    ],
    ids=["lbfgs", "adam", "sgd"],
)
def test_2d_translation_recovered_with_each_optimizer(optimizer, device):
    fixed = make_image((64, 72), spacing=(0.9, 1.1))
    moving = _moved(fixed, _translation([3.3, -2.1]))
    iters = [30, 20] if optimizer["name"] == "lbfgs" else [150, 150]
    cfg = {"stages": [{"objective": [{"measure": "mse"}], "optimizer": optimizer, "init": "none",
                       "stopping": {"rel_tol": 1e-9, "patience": 20},
                       "pyramid": {"factors": [2, 1], "iterations": iters}}]}
    res = register(fixed.to(device), moving.to(device), "translation", config=cfg)
    np.testing.assert_allclose(res.transform.translation().detach().cpu().numpy(), [3.3, -2.1], atol=0.1)
    assert res.device.startswith(device)


def test_3d_rigid_across_different_grids():
    """Fixed and moving differ in spacing, size, origin and direction: the world map is recovered."""
    fixed = make_image((40, 44, 48), spacing=(1.0, 1.0, 1.5), origin=(-30.0, -20.0, -25.0), n=20)
    c = fixed.grid.center()
    angles = np.radians([4.0, -3.0, 6.0])
    from regcore.transforms.linear import rotation_matrix
    r = rotation_matrix(torch.as_tensor(angles), 3).numpy()
    truth = np.eye(4)
    truth[:3, :3] = r
    truth[:3, 3] = c - r @ c + [2.0, -1.5, 1.0]
    moving_grid = Grid((36, 40, 34), (1.3, 1.2, 1.6), (25.0, -25.0, -20.0), np.diag([-1.0, 1.0, 1.0]).ravel())
    moving = _moved(fixed, truth, moving_grid)
    res = register(fixed, moving, "rigid", config={"stages": [{"init": "none", **FAST}]})
    corners = fixed.grid.corners()
    got = corners @ res.transform.matrix().detach().numpy()[:3, :3].T + res.transform.matrix().detach().numpy()[:3, 3]
    want = corners @ truth[:3, :3].T + truth[:3, 3]
    assert np.linalg.norm(got - want, axis=1).mean() < 0.3


def test_affine_recovers_scaling_and_shear_2d():
    fixed = make_image((80, 80), n=25)
    truth = np.eye(3)
    truth[:2, :2] = [[1.08, 0.05], [-0.03, 0.94]]
    c = fixed.grid.center()
    truth[:2, 2] = c - truth[:2, :2] @ c + [1.5, -2.0]
    moving = _moved(fixed, truth)
    # the affine preset's local correlation is blind to shifts of these smooth blobs (every 5-pixel
    # window is a ramp) and its regular-step descent trades the last 0.1 mm for speed: recovering
    # the exact matrix asks for the global NCC and LBFGS
    precise = {**FAST, "objective": [{"measure": "ncc"}], "optimizer": {"name": "lbfgs"}}
    res = register(fixed, moving, "affine", config={"stages": [{"init": "none", **precise}, precise]})
    np.testing.assert_allclose(res.transform.matrix().detach().numpy(), truth, atol=0.01 * 80 / 2 / 40 + 0.05)
    np.testing.assert_allclose(res.transform.matrix().detach().numpy()[:2, :2], truth[:2, :2], atol=0.005)


def test_result_contents_and_callback_and_no_prints(capsys):
    fixed = make_image((40, 44))
    moving = _moved(fixed, _translation([1.0, 2.0]))
    events = []
    res = register(fixed, moving, "translation", config={"stages": [FAST]}, callback=events.append)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    iters = [e for e in events if e["event"] == "iteration"]
    assert len(iters) == res.iterations > 0
    assert [e for e in events if e["event"] == "level"][-1]["factor"] == 1
    assert res.warped.grid == fixed.grid and res.displacement.channels == 2
    # displacement = T(x) - x in mm, components (x, y): constant (1, 2) for a translation
    np.testing.assert_allclose(res.displacement.data.mean(dim=(1, 2)).numpy(), [1.0, 2.0], atol=0.05)
    summary = res.summary()
    assert summary["config_hash"] == config_hash(res.config)
    assert len(summary["loss_per_level"]) == 2 and summary["iterations"] == res.iterations


def test_stopping_rules():
    fixed = make_image((40, 44))
    moving = _moved(fixed, _translation([1.0, 2.0]))
    res = register(fixed, moving, "translation", config={"stages": [{"pyramid": {"factors": [1], "iterations": [3]},
                                                                         "stopping": {"rel_tol": 0.0, "patience": 100}}]})
    assert res.levels[0].iterations == 3 and res.levels[0].stop_reason == "max_iterations"
    res = register(fixed, moving, "translation", config={"stages": [{"pyramid": {"factors": [1], "iterations": [500]},
                                                                         "stopping": {"rel_tol": 1e-3, "patience": 2}}]})
    assert res.levels[0].stop_reason == "converged" and res.levels[0].iterations < 500


def test_deterministic_for_a_seed_with_sampled_mi():
    fixed = make_image((48, 52))
    moving = _moved(fixed, _translation([1.2, -0.7]))
    cfg = {"stages": [{"objective": [{"measure": "mi", "params": {"num_samples": 500}}], **FAST}]}
    a = register(fixed, moving, "rigid", config=cfg)
    b = register(fixed, moving, "rigid", config=cfg)
    c = register(fixed, moving, "rigid", config={**cfg, "seed": 7})
    torch.testing.assert_close(a.transform.matrix(), b.transform.matrix(), atol=0, rtol=0)
    assert a.levels[0].losses == b.levels[0].losses
    assert a.levels[0].losses != c.levels[0].losses


def test_masks_restrict_the_similarity():
    """A corrupted region in moving misleads registration unless masked out."""
    fixed = make_image((64, 64), n=20)
    moving = _moved(fixed, _translation([2.0, 1.0]))
    corrupted = moving.data.clone()
    corrupted[:, 20:64, 30:64] = torch.from_numpy(blobs((44, 34), seed=9)).float() * 2  # unrelated content
    moving_bad = moving.with_data(corrupted)
    mask = torch.ones_like(corrupted)
    mask[:, 18:64, 28:64] = 0
    cfg = {"stages": [{"objective": [{"measure": "mse"}], "init": "none", "normalize": "none", **FAST}]}
    masked = register(fixed, moving_bad, "translation", config=cfg, moving_mask=moving.with_data(mask))
    np.testing.assert_allclose(masked.transform.translation().detach().numpy(), [2.0, 1.0], atol=0.1)
    unmasked = register(fixed, moving_bad, "translation", config=cfg)
    assert np.abs(unmasked.transform.translation().detach().numpy() - [2.0, 1.0]).max() > 0.2


def test_config_validation_and_hash():
    a = method_config("rigid")
    b = method_config("rigid", {"seed": 0})
    assert config_hash(a) == config_hash(b)
    c = method_config("rigid", {"stages": [{"objective": [{"measure": "mi"}]}]})
    assert config_hash(c) != config_hash(a) and c.stages[0].objective[0].measure == "mi"
    assert c.stages[0].transform == "rigid"  # merged, not replaced
    with pytest.raises(InputError, match="unknown method 'rigidd'"):
        method_config("rigidd")
    with pytest.raises(InputError, match="measure"):
        method_config("rigid", {"stages": [{"objective": [{"measure": "ncx"}]}]})
    with pytest.raises(InputError, match="optimiser|Extra inputs"):
        method_config("rigid", {"stages": [{"optimiser": {"name": "adam"}}]})
    with pytest.raises(InputError, match="factors but"):
        method_config("rigid", {"stages": [{"pyramid": {"factors": [4, 2, 1], "iterations": [1, 2]}}]})


def test_pyramid_levels_in_mm():
    from regcore.config import PyramidConfig

    mm = PyramidConfig(spacing_mm=[4, 2], iterations=[100, 40])
    assert mm.level_factors((3.0, 3.0, 3.0)) == [(pytest.approx(4 / 3), pytest.approx(4 / 3), 100), (1.0, 1.0, 40)]
    # anisotropic CT: the finest axis sets the factor
    ct = mm.level_factors((1.366, 1.366, 2.5))
    assert [f for f, _, _ in ct] == [pytest.approx(4 / 1.366), pytest.approx(2 / 1.366)]
    # each image gets its own factor: a 1 mm fixed and a 2 mm moving image both reach 4 and 2 mm
    assert mm.level_factors((1.0, 1.0), (2.0, 2.0)) == [(4.0, 2.0, 100), (2.0, 1.0, 40)]
    # never finer than the image; equal levels merge and keep their iterations
    assert mm.level_factors((5.0, 5.0)) == [(1.0, 1.0, 140)]
    # header float noise neither breaks the factor (precomputed levels are looked up by it) nor a merge
    assert mm.level_factors((0.9999999, 1.0)) == [(4.0, 4.0, 100), (2.0, 2.0, 40)]
    assert mm.level_factors((2.0000001, 2.0)) == [(2.0, 2.0, 100), (1.0, 1.0, 40)]
    assert PyramidConfig(spacing_mm=[2, 1.9999999], iterations=[1, 2]).level_factors((3.0,)) == [(1.0, 1.0, 3)]
    # relative factors apply to both images as given
    assert PyramidConfig(factors=[4, 2], iterations=[3, 2]).level_factors((3.0, 3.0), (1.0, 1.0)) == [(4.0, 4.0, 3), (2.0, 2.0, 2)]
    assert PyramidConfig().factors == [4.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="not both"):
        PyramidConfig(factors=[2, 1], spacing_mm=[4, 2], iterations=[1, 1])
    with pytest.raises(ValueError, match="spacing_mm but"):
        PyramidConfig(spacing_mm=[4, 2], iterations=[1])


def test_mm_levels_downsample_each_image_by_its_own_factor():
    """A 1 mm fixed and a 2 mm moving image with levels at 4 and 2 mm: the moving image's levels
    are its factors 2 and 1 (4 and 2 mm), not the fixed image's 4 and 2 (8 and 4 mm). Shown through
    precomputed moving levels: a corrupted factor-2 level changes the result, a corrupted
    factor-4 level (8 mm, which no level needs) does not."""
    data = torch.from_numpy(blobs((32, 32))).float()
    fixed = Image(data, Grid((32, 32), (1.0, 1.0)))
    moving_grid = Grid((16, 16), (2.0, 2.0), (0.5, 0.5))
    moving = Image(torch.nn.functional.avg_pool2d(data[None, None], 2)[0, 0], moving_grid)
    cfg = {"stages": [{"pyramid": {"spacing_mm": [4, 2], "iterations": [5, 3]}}]}

    def corrupted(factor: float) -> dict:
        grid = moving_grid.downsample(factor, min_size=8)
        return {factor: Image(torch.rand(grid.shape, generator=torch.Generator().manual_seed(0)), grid)}

    plain = register(fixed, moving, "svf", config=cfg).displacement.data
    assert [lv.factor for lv in register(fixed, moving, "svf", config=cfg).levels] == [4.0, 2.0]  # fixed's
    at2 = register(fixed, moving, "svf", config=cfg, moving_levels=corrupted(2.0)).displacement.data
    at4 = register(fixed, moving, "svf", config=cfg, moving_levels=corrupted(4.0)).displacement.data
    assert float((plain - at2).abs().max()) > 1e-3
    assert torch.equal(plain, at4)


def test_config_hash_of_factor_pyramids_is_unchanged():
    """The dump leaves out the pyramid spelling not in use: configs that give factors hash as they
    did before spacing_mm existed (stores keep skipping their complete pairs), and the dump
    validates back to the same config."""
    from regcore.config import legacy_config_hash, validate_config

    rigid = method_config("rigid")
    assert "spacing_mm" not in rigid.model_dump()["stages"][0]["pyramid"]
    assert legacy_config_hash(rigid) == "dbf3d675589f489d"  # as computed at 24ee06f, before spacing_mm
    svf = method_config("svf")
    assert "factors" not in svf.model_dump()["stages"][0]["pyramid"]
    assert config_hash(validate_config(svf.model_dump(mode="json"))) == config_hash(svf)


def test_pyramid_override_replaces_the_other_spelling():
    svf = method_config("svf")
    assert svf.stages[0].pyramid.spacing_mm == [4.0, 2.0] and svf.stages[0].pyramid.factors is None
    relative = method_config("svf", {"stages": [{"pyramid": {"factors": [2, 1]}}]})
    assert relative.stages[0].pyramid.factors == [2.0, 1.0] and relative.stages[0].pyramid.spacing_mm is None
    assert relative.stages[0].pyramid.iterations == [100, 40]  # the rest of the preset's pyramid is kept
    rigid_mm = method_config("rigid", {"stages": [{"pyramid": {"spacing_mm": [8, 4, 2]}}]})
    assert rigid_mm.stages[0].pyramid.factors is None and rigid_mm.stages[0].pyramid.spacing_mm == [8.0, 4.0, 2.0]
    assert config_hash(relative) != config_hash(svf)


def test_deformable_levels_follow_the_image_spacing():
    """The svf preset's levels are at 4 and 2 mm: factors 4, 2 on a 1 mm image, 2, 1 on a 2 mm one."""
    for spacing, expected in ((1.0, [4.0, 2.0]), (2.0, [2.0, 1.0]), (4.0, [1.0])):
        fixed = Image(torch.from_numpy(blobs((24, 24))).float(), Grid((24, 24), (spacing, spacing)))
        res = register(fixed, fixed, "svf", config={"stages": [{"pyramid": {"iterations": [2, 2]}}]})
        assert [lv.factor for lv in res.levels] == pytest.approx(expected)


def test_bare_stage_gets_a_safe_lbfgs():
    from regcore.config import validate_config

    cfg = validate_config({"name": "custom", "stages": [{"transform": "rigid"}]})
    assert cfg.stages[0].optimizer.params == {"max_iter": 1, "line_search_fn": "strong_wolfe"}
    adam = validate_config({"name": "custom", "stages": [{"transform": "rigid", "optimizer": {"name": "adam"}}]})
    assert adam.stages[0].optimizer.params == {}


def test_yaml_config_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("stages:\n  - objective:\n      - measure: ngf\n    pyramid:\n      factors: [2, 1]\n      iterations: 7\n")
    cfg = method_config("rigid", path)
    assert cfg.stages[0].objective[0].measure == "ngf" and cfg.stages[0].pyramid.iterations == [7, 7]
    (tmp_path / "bad.yaml").write_text("stages: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml.*YAML"):
        method_config("rigid", tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="no such file"):
        method_config("rigid", tmp_path / "missing.yaml")


def test_bad_inputs_have_clear_errors():
    f2 = make_image((20, 22))
    f3 = make_image((20, 22, 24))
    with pytest.raises(InputError, match="dimension mismatch.*2D.*3D"):
        register(f2, f3, "rigid")
    nan = f2.with_data(f2.data.clone())
    nan.data[0, 3, 3] = float("nan")
    with pytest.raises(InputError, match="moving: 1 of 440 voxels are NaN"):
        register(f2, nan, "rigid")
    with pytest.raises(InputError, match="fixed: image is constant"):
        register(f2.with_data(torch.zeros_like(f2.data)), f2, "rigid")
    far = Image(f2.data, Grid(f2.grid.size, f2.grid.spacing, (500.0, 500.0)))
    with pytest.raises(InputError, match="no overlap in world space"):
        register(f2, far, "rigid", config={"stages": [{"init": "none"}]})
    # centring the images (the presets' default) makes the same pair registrable
    register(f2, far, "translation", config={"stages": [FAST]})
    with pytest.raises(InputError, match="missing.nii.*no such file"):
        register("missing.nii", f2, "rigid")
    with pytest.raises(InputError, match="mask is empty"):
        register(f2, f2, "rigid", fixed_mask=f2.with_data(torch.zeros_like(f2.data)))


def test_registration_runs_on_requested_device(device):
    fixed = make_image((20, 24, 28))
    moving = _moved(fixed, _translation([1.0, 0.5, -0.5]))
    res = register(fixed, moving, "rigid", config={"stages": [FAST]}, device=device)
    assert res.warped.device.type == device and res.device.startswith(device)
    np.testing.assert_allclose(res.transform.translation().detach().cpu().numpy(), [1.0, 0.5, -0.5], atol=0.15)


def test_precomputed_pyramid_levels_are_used_and_match():
    """Levels passed in (as read from a Zarr pyramid) replace the smoothing+resampling of the
    image; with min/max normalisation (a linear window) the result is the same registration."""
    from regcore.pyramid import downsample

    fixed = make_image((40, 36, 32), spacing=(1.2, 1.0, 1.1), seed=4)
    moving = make_image((40, 36, 32), spacing=(1.2, 1.0, 1.1), seed=4, origin=(2.0, -1.5, 1.0))
    cfg = {"name": "t", "stages": [{"transform": "affine", "normalize": "minmax",
                                    "pyramid": {"factors": [4.0, 2.0], "iterations": [10, 5]}}]}
    ref = register(fixed, moving, cfg)
    levels_f = {f: downsample(fixed, f) for f in (2.0, 4.0)}
    levels_m = {f: downsample(moving, f) for f in (2.0, 4.0)}
    got = register(fixed, moving, cfg, fixed_levels=levels_f, moving_levels=levels_m)
    assert torch.allclose(got.transform.matrix(), ref.transform.matrix(), atol=1e-4)
    # the levels are really read: a corrupted coarse level changes the result
    bad = {2.0: levels_f[2.0], 4.0: Image(levels_f[4.0].data.flip(-1), levels_f[4.0].grid)}
    other = register(fixed, moving, cfg, fixed_levels=bad, moving_levels=levels_m)
    assert not torch.allclose(other.transform.matrix(), ref.transform.matrix(), atol=1e-3)


def test_config_hash_covers_params_after_their_defaults():
    from regcore.config import canonical_config

    implicit = method_config("svf", {"stages": [{"objective": [{"measure": "lncc", "params": {}}]}]})
    explicit = method_config("svf", {"stages": [{"objective": [{"measure": "lncc", "params": {"window": 9}}]}]})
    other = method_config("svf", {"stages": [{"objective": [{"measure": "lncc", "params": {"window": 7}}]}]})
    assert config_hash(implicit) == config_hash(explicit) != config_hash(other)
    assert canonical_config(implicit)["stages"][0]["objective"][0]["params"]["window"] == 9  # LNCCLoss's default


def test_component_names_come_from_the_registries():
    """One registry per kind: the config's names, its error messages and the capabilities are the
    registries' (a new measure is one class plus one registration)."""
    from regcore.config import MEASURES, OPTIMIZERS, REGULARIZERS
    from regcore.levels import POINTWISE_MEASURES
    from regcore.losses.modules import LOSSES
    from regcore.optimizers import OPTIMIZERS as OPTIMIZER_CLASSES
    from regcore.regularizers.modules import REGULARIZERS as REGULARIZER_CLASSES

    assert MEASURES == tuple(LOSSES) and REGULARIZERS == tuple(REGULARIZER_CLASSES)
    assert set(OPTIMIZERS) == set(OPTIMIZER_CLASSES) | {"greedy"}
    assert POINTWISE_MEASURES == {"mse", "ncc", "mi", "nmi"}  # from each class's capability
    with pytest.raises(InputError) as err:
        method_config("affine", {"stages": [{"objective": [{"measure": "nope"}]}]})
    assert all(name in str(err.value) for name in LOSSES)
