"""Local squared correlation (ANTs CC) with analytic gradients: values, gradients, windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regcore.errors import InputError
from regcore.losses import build_loss, local_cc, local_cc_gradients, window_sum

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


def _pair(shape=(7, 8, 9), seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, *shape, generator=g, dtype=F64), torch.rand(batch, 1, *shape, generator=g, dtype=F64)


def _reference(fixed, moving, radius, eps=1e-5):
    """The same measure by a ones-kernel convolution (zero padding) and counts."""
    nd = fixed.dim() - 2
    conv = F.conv3d if nd == 3 else F.conv2d
    k = torch.ones((1, 1) + (2 * radius + 1,) * nd, dtype=fixed.dtype)

    def box(x):
        return conv(x, k, padding=radius)

    n = box(torch.ones_like(fixed))
    mi, mj = box(fixed) / n, box(moving) / n
    a = box(fixed * moving) / n - mi * mj
    b = box(fixed * fixed) / n - mi * mi
    c = box(moving * moving) / n - mj * mj
    return torch.where(b * c > eps, a * a / (b * c), torch.zeros_like(a)).mean()


@pytest.mark.parametrize("shape,radius", [((7, 8, 9), 1), ((7, 8, 9), 2), ((12, 10), 3), ((5, 4, 6), 4)])
def test_value_matches_a_convolution_reference(shape, radius):
    fixed, moving = _pair(shape)
    assert float(local_cc(fixed, moving, radius=radius)) == pytest.approx(float(_reference(fixed, moving, radius)), rel=1e-10)


def test_contrast_of_the_moving_image_does_not_change_the_value():
    # no regulariser in the denominator: a contrasted moving image is not preferred to a faint one
    # (the bias that pulled an affine fit off an exact shift), and flat windows count as 0
    fixed, moving = _pair((8, 9, 7))
    assert float(local_cc(fixed, 5.0 * moving + 2.0)) == pytest.approx(float(local_cc(fixed, moving)), rel=1e-12)
    flat = torch.zeros_like(moving)
    flat[..., :4] = torch.rand_like(flat[..., :4])  # half the image flat: its windows count 0
    value = float(local_cc(fixed, flat, radius=1))
    assert value == pytest.approx(float(_reference(fixed, flat, 1)), rel=1e-10)
    assert value < 0.5 * float(local_cc(fixed, fixed.clone(), radius=1))


def test_window_sum_equals_ones_convolution():
    x = torch.rand(2, 9, 10, 11, dtype=F64)
    ref = F.conv3d(x[:, None], torch.ones(1, 1, 5, 5, 5, dtype=F64), padding=2)[:, 0]
    torch.testing.assert_close(window_sum(x, 2, 3), ref)


def test_one_for_an_affine_intensity_map_and_lower_for_noise():
    fixed, moving = _pair((10, 11, 12))
    assert float(local_cc(fixed, 3.0 * fixed - 1.0, radius=2)) > 0.999
    assert float(local_cc(fixed, moving, radius=2)) < 0.2


@pytest.mark.parametrize("masked", [False, True])
def test_exact_gradients_match_finite_differences(masked):
    fixed, moving = _pair((5, 6, 7), seed=1, batch=2)
    mask = (torch.rand(2, 1, 5, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.3).to(F64) if masked else None
    f = fixed.clone().requires_grad_(True)
    m = moving.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: local_cc(a, b, mask, radius=2), (f, m))


def test_centred_window_approximation_points_like_the_exact_gradient():
    fixed, moving = _pair((16, 17, 18), seed=2)
    moving = 0.6 * fixed + 0.4 * moving  # a correlated pair, as during registration
    _, exact, _ = local_cc_gradients(fixed, moving, radius=2, exact=True)
    _, approx, _ = local_cc_gradients(fixed, moving, radius=2, exact=False)
    cosine = float((exact * approx).sum() / (exact.norm() * approx.norm()))
    assert cosine > 0.8


def test_loss_module_and_errors():
    fixed, moving = _pair()
    loss = build_loss("lcc", radius=2)
    assert float(loss(fixed, moving)) == pytest.approx(1 - float(local_cc(fixed, moving)))
    with pytest.raises(InputError, match="radius"):
        local_cc(fixed, moving, radius=0)
    with pytest.raises(InputError, match="shape"):
        local_cc(fixed, moving[..., :-1])
    with pytest.raises(InputError, match="sums to zero"):
        local_cc(fixed, moving, torch.zeros(1, 1, 7, 8, 9, dtype=F64))
