"""Tests of regcore.losses: known values, masks, spacing, gradients, batches, devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from regcore.losses import (
    LOSSES,
    LNCCLoss,
    MILoss,
    MSELoss,
    NCCLoss,
    NGFLoss,
    NMILoss,
    SSIMLoss,
    build_loss,
    lncc,
    mse,
    mutual_information,
    ncc,
    ngf,
    normalized_mutual_information,
    spatial_gradient,
    ssim,
)

SHAPES = {2: (24, 20), 3: (10, 12, 14)}


pytestmark = pytest.mark.usefixtures("single_thread")


def smooth_image(shape, seed=0, sigma=1.5, dtype=torch.float64, batch=1):
    """Random smooth image in [0, 1] (numpy/scipy generated), shape (batch, 1, *shape)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        a = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
        out.append((a - a.min()) / (a.max() - a.min()))
    return torch.as_tensor(np.stack(out)[:, None], dtype=dtype)


def noise_image(shape, seed=0, dtype=torch.float64, batch=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 1, *shape), generator=gen, dtype=dtype)


# ---------------------------------------------------------------- independent references


def _np_kernel(kind, size, sigma=None):
    if kind == "box":
        return np.full(size, 1.0 / size)
    sigma = (size - 1) / 4 if sigma is None else sigma
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _np_filter(a, kernels):
    for axis, k in enumerate(kernels):
        a = ndimage.correlate1d(a, k, axis=axis, mode="constant", cval=0.0)
    return a


def _np_local_stats(f, m, w, kernels):
    mass = _np_filter(w, kernels)
    mf = _np_filter(w * f, kernels) / mass
    mm = _np_filter(w * m, kernels) / mass
    vf = np.maximum(_np_filter(w * f * f, kernels) / mass - mf**2, 0)
    vm = np.maximum(_np_filter(w * m * m, kernels) / mass - mm**2, 0)
    cov = _np_filter(w * f * m, kernels) / mass - mf * mm
    return mf, mm, vf, vm, cov


def np_lncc(f, m, window, kind, eps=1e-5):
    kernels = [_np_kernel(kind, window)] * f.ndim
    _, _, vf, vm, cov = _np_local_stats(f, m, np.ones_like(f), kernels)
    return float(np.mean(cov / np.sqrt(vf * vm + eps)))


def np_ssim(f, m, data_range, sigma=1.5, k1=0.01, k2=0.03):
    r = int(3.5 * sigma + 0.5)
    x = np.arange(-r, r + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    kernels = [k / k.sum()] * f.ndim
    mf, mm, vf, vm, cov = _np_local_stats(f, m, np.ones_like(f), kernels)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mf * mm + c1) * (2 * cov + c2)) / ((mf**2 + mm**2 + c1) * (vf + vm + c2))
    return float(s.mean())


def np_parzen_mi(f, m, bins, sigma):
    """Mutual information from an explicitly summed Parzen joint histogram (loops)."""

    def weights(v):
        coord = (v - v.min()) / (v.max() - v.min()) * (bins - 1)
        w = np.exp(-0.5 * ((coord[:, None] - np.arange(bins)[None]) / sigma) ** 2)
        return w / w.sum(1, keepdims=True)

    wf, wm = weights(f.ravel()), weights(m.ravel())
    joint = np.zeros((bins, bins))
    for i in range(wf.shape[0]):
        joint += np.outer(wf[i], wm[i])
    p = joint / joint.sum()
    pf, pm = p.sum(1), p.sum(0)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / np.outer(pf, pm)[nz])))


def dense_parzen_mi(fixed, moving, mask=None, bins=32, fixed_range=None, moving_range=None,
                    sigma=0.5, normalized=False, eps=1e-10):
    """Straightforward torch reference of the Parzen (N)MI: the Gaussian on *every* bin of every
    voxel, ``(V, bins)`` weight matrices and the joint histogram ``(w_f * mask).T @ w_m`` (the
    pre-windowing implementation); differentiable by autograd. One image pair, ``(1, 1, ...)``."""
    f, m = fixed.reshape(-1), moving.reshape(-1)
    w = None if mask is None else torch.broadcast_to(mask, fixed.shape).reshape(-1)

    def weights(v, value_range):
        if value_range is None:
            sel = v.detach() if w is None else v.detach()[w > 0]
            lo, span = sel.min(), sel.max() - sel.min()
        else:
            lo, span = value_range[0], value_range[1] - value_range[0]
        coord = (v - lo) / span * (bins - 1)
        logits = -0.5 * ((coord[:, None] - torch.arange(bins, dtype=v.dtype)) / sigma) ** 2
        return torch.softmax(logits, dim=-1)

    wf, wm = weights(f, fixed_range), weights(m, moving_range)
    if w is not None:
        wf = wf * w[:, None]
    p = wf.T @ wm
    p = p / p.sum()
    pf, pm = p.sum(1), p.sum(0)
    h_f = -(pf * torch.log(pf + eps)).sum()
    h_m = -(pm * torch.log(pm + eps)).sum()
    h_fm = -(p * torch.log(p + eps)).sum()
    return (h_f + h_m) / h_fm if normalized else h_f + h_m - h_fm


# ---------------------------------------------------------------- known values


@pytest.mark.parametrize("ndim", [2, 3])
def test_mse_constant_offset(ndim):
    img = noise_image(SHAPES[ndim])
    assert mse(img, img + 0.3).item() == pytest.approx(0.09, abs=1e-12)
    assert mse(img, img).item() == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_ncc_affine(ndim):
    img = noise_image(SHAPES[ndim])
    assert ncc(img, 2.5 * img + 4).item() == pytest.approx(1.0, abs=1e-5)
    assert ncc(img, -0.7 * img + 1).item() == pytest.approx(-1.0, abs=1e-5)
    # independent noise is nearly uncorrelated; compare with numpy's Pearson coefficient
    other = noise_image(SHAPES[ndim], seed=1)
    ref = np.corrcoef(img.flatten().numpy(), other.flatten().numpy())[0, 1]
    assert ncc(img, other).item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_values(ndim, kernel):
    img = noise_image(SHAPES[ndim])
    assert lncc(img, 3 * img + 2, kernel=kernel).item() == pytest.approx(1.0, abs=1e-3)
    assert lncc(img, -3 * img + 2, kernel=kernel).item() == pytest.approx(-1.0, abs=1e-3)
    other = noise_image(SHAPES[ndim], seed=1)
    value = lncc(img, other, window=5, kernel=kernel).item()
    ref = np_lncc(img[0, 0].numpy(), other[0, 0].numpy(), 5, kernel)
    assert value == pytest.approx(ref, abs=1e-10)
    assert abs(value) < 0.1


def test_lncc_per_dim_window_and_sigma():
    img, other = noise_image((16, 18)), noise_image((16, 18), seed=3)
    f, m = img[0, 0].numpy(), other[0, 0].numpy()
    kernels = [_np_kernel("gaussian", 3, 0.8), _np_kernel("gaussian", 7, 2.0)]
    _, _, vf, vm, cov = _np_local_stats(f, m, np.ones_like(f), kernels)
    ref = float(np.mean(cov / np.sqrt(vf * vm + 1e-5)))
    value = lncc(img, other, window=(3, 7), kernel="gaussian", sigma=(0.8, 2.0)).item()
    assert value == pytest.approx(ref, abs=1e-10)
    with pytest.raises(ValueError):
        lncc(img, other, window=4)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ssim_values(ndim):
    img = smooth_image(SHAPES[ndim])
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-12)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(img.shape, generator=gen, dtype=img.dtype)
    values = [ssim(img, img + s * noise).item() for s in (0.02, 0.1, 0.3)]
    assert values[0] > values[1] > values[2]
    assert values[2] < 0.5
    # matches an independent scipy implementation (data range from fixed)
    f, m = img[0, 0].numpy(), (img + 0.1 * noise)[0, 0].numpy()
    assert values[1] == pytest.approx(np_ssim(f, m, f.max() - f.min()), abs=1e-10)
    assert ssim(img, img + 0.1 * noise, data_range=2.0).item() == pytest.approx(
        np_ssim(f, m, 2.0), abs=1e-10
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_mutual_information_values(ndim):
    shape = {2: (12, 10), 3: (5, 6, 4)}[ndim]
    img = smooth_image(shape, sigma=1.0)
    other = noise_image(shape, seed=2)
    for m in (img, other):
        ref = np_parzen_mi(img[0, 0].numpy(), m[0, 0].numpy(), bins=8, sigma=0.5)
        value = mutual_information(img, m, bins=8, kernel_sigma=0.5).item()
        assert value == pytest.approx(ref, abs=1e-8)  # eps=1e-10 inside the logs


@pytest.mark.parametrize("ndim", [2, 3])
def test_mutual_information_properties(ndim):
    shape = {2: (96, 96), 3: (20, 24, 20)}[ndim]
    img = smooth_image(shape, sigma=2.0)
    mi_self = mutual_information(img, img, bins=16).item()
    gen = torch.Generator().manual_seed(0)
    shuffled = img.flatten()[torch.randperm(img.numel(), generator=gen)].reshape(img.shape)
    mi_shuffled = mutual_information(img, shuffled, bins=16).item()
    assert mi_self > 0.8
    assert 0 <= mi_shuffled < 0.05 * mi_self
    # automatic ranges make MI invariant to affine maps (also decreasing ones)
    assert mutual_information(img, 2 * img + 3, bins=16).item() == pytest.approx(mi_self, 1e-9)
    assert mutual_information(img, 1 - img, bins=16).item() == pytest.approx(mi_self, 1e-9)
    # and nearly invariant to a smooth monotone map
    mi_mono = mutual_information(img, torch.sqrt(img + 0.5), bins=16).item()
    assert mi_mono == pytest.approx(mi_self, rel=0.1)
    nmi_self = normalized_mutual_information(img, img, bins=16).item()
    nmi_noise = normalized_mutual_information(img, shuffled, bins=16).item()
    assert 1.25 < nmi_self <= 2.0
    assert 1.0 - 1e-9 <= nmi_noise < 1.02


@pytest.mark.parametrize("bins", [16, 32, 64])
@pytest.mark.parametrize("sigma", [0.5, 1.3])
@pytest.mark.parametrize("normalized", [False, True], ids=["mi", "nmi"])
def test_mutual_information_matches_dense_reference(bins, sigma, normalized):
    """The windowed histogram (the Gaussian on the bins within ~7 sigma of each voxel, scattered
    into the joint histogram) gives the value and gradients of the plain all-bins computation:
    with and without a fractional mask, automatic ranges and explicit ranges that leave voxels
    outside (their windows clamp to the edge bins)."""
    shape = (9, 11, 13)
    f = smooth_image(shape, sigma=1.0)
    m = (smooth_image(shape, seed=1, sigma=1.0) + 0.5 * f) ** 2
    mask = noise_image(shape, seed=2)
    mask[..., :3] = 0
    fn = normalized_mutual_information if normalized else mutual_information
    cases = [
        dict(),
        dict(mask=mask),
        dict(mask=mask, fixed_range=(0.2, 0.7), moving_range=(-0.5, 1.0)),
    ]
    for kw in cases:
        fr, mr = f.clone().requires_grad_(), m.clone().requires_grad_()
        value = fn(fr, mr, kw.get("mask"), bins=bins, kernel_sigma=sigma,
                   fixed_range=kw.get("fixed_range"), moving_range=kw.get("moving_range"))
        fd, md = f.clone().requires_grad_(), m.clone().requires_grad_()
        ref = dense_parzen_mi(fd, md, kw.get("mask"), bins, kw.get("fixed_range"),
                              kw.get("moving_range"), sigma, normalized)
        assert value.item() == pytest.approx(ref.item(), abs=1e-10), kw.keys()
        value.backward()
        ref.backward()
        scale = md.grad.abs().max().item()
        torch.testing.assert_close(fr.grad, fd.grad, rtol=0, atol=1e-7 * scale)
        torch.testing.assert_close(mr.grad, md.grad, rtol=0, atol=1e-7 * scale)
    # float32 agrees with the float64 reference to float32 precision
    f32 = mutual_information(f.float(), m.float(), bins=bins, kernel_sigma=sigma).item()
    assert f32 == pytest.approx(dense_parzen_mi(f, m, bins=bins, sigma=sigma).item(), abs=1e-5)


def test_mutual_information_far_outside_range_is_finite():
    """Masked-out garbage and values far outside an explicit range stay finite (one-hot edge
    bins) in float32, as in the all-bins softmax."""
    f = smooth_image((12, 10), dtype=torch.float32)
    m = smooth_image((12, 10), seed=1, dtype=torch.float32).requires_grad_()
    garbage = f.clone()
    garbage[..., :3] = torch.tensor([1e30, -1e30, 1e6])
    mask = torch.ones_like(f)
    mask[..., :3] = 0
    value = mutual_information(garbage, m, mask, bins=32)
    assert value.item() == pytest.approx(mutual_information(f[..., 3:], m[..., 3:], bins=32).item(),
                                         abs=1e-5)
    value.backward()
    assert torch.isfinite(m.grad).all()
    out = mutual_information(garbage, m, mask, bins=32, fixed_range=(0.0, 1.0))
    assert math.isfinite(out.item())


def test_mutual_information_sampling_determinism():
    img = smooth_image((40, 40))
    other = smooth_image((40, 40), seed=1)
    full = mutual_information(img, other).item()
    a = mutual_information(img, other, num_samples=500, seed=7).item()
    b = mutual_information(img, other, num_samples=500, seed=7).item()
    c = mutual_information(img, other, num_samples=500, seed=8).item()
    assert a == b
    assert a != c
    assert a != full
    # num_samples >= voxels means "use all voxels"
    assert mutual_information(img, other, num_samples=1600).item() == full
    # a large enough random subset estimates the full-image value
    img = smooth_image((64, 64), sigma=2.0)
    full = mutual_information(img, img ** 2, bins=16).item()
    sampled = mutual_information(img, img ** 2, bins=16, num_samples=2048, seed=3).item()
    assert sampled == pytest.approx(full, rel=0.05)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ngf_values(ndim):
    img = smooth_image(SHAPES[ndim])
    tiny = dict(eps_fixed=1e-8, eps_moving=1e-8)
    assert ngf(img, img, **tiny).item() > 0.99
    assert ngf(img, 3 * img + 1, **tiny).item() > 0.99
    default = ngf(img, img).item()
    assert 0.2 < default < 0.99  # eps = mean gradient magnitude damps weak edges
    assert ngf(img, -img).item() == pytest.approx(default, abs=1e-12)
    # gradients that are everywhere orthogonal: a pattern varying along x vs along y
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in SHAPES[ndim]],
                           indexing="ij")
    along_x = torch.sin(0.7 * grids[-1])[None, None]
    along_y = torch.sin(0.7 * grids[-2])[None, None]
    assert ngf(along_x, along_y).item() == pytest.approx(0.0, abs=1e-12)
    assert ngf(along_x, along_x, **tiny).item() > 0.99


# ---------------------------------------------------------------- spacing


def test_spatial_gradient_spacing_order_3d():
    z, y, x = 4, 5, 6  # non-cubic tensor (Z, Y, X)
    spacing = (2.0, 0.5, 3.0)  # (x, y, z) in mm
    k, j, i = torch.meshgrid(
        *[torch.arange(s, dtype=torch.float64) for s in (z, y, x)], indexing="ij"
    )
    x_mm, y_mm, z_mm = i * spacing[0], j * spacing[1], k * spacing[2]
    ramp = (2 * x_mm)[None, None]
    gx, gy, gz = spatial_gradient(ramp, spacing=(2.0, 1.0, 1.0))
    torch.testing.assert_close(gx, torch.full_like(gx, 2.0))
    assert gy.abs().max() == 0 and gz.abs().max() == 0
    plane = (2 * x_mm + 5 * y_mm + 7 * z_mm)[None, None]
    grads = spatial_gradient(plane, spacing=spacing)
    for g, expected in zip(grads, (2.0, 5.0, 7.0)):
        assert g.shape == plane.shape
        torch.testing.assert_close(g, torch.full_like(g, expected))
    # interior central differences on a quadratic: d(x^2)/dx = 2x exactly
    sq = (x_mm**2)[None, None]
    gx = spatial_gradient(sq, spacing=spacing)[0]
    torch.testing.assert_close(gx[..., 1:-1], 2 * x_mm[None, None, ..., 1:-1])


@pytest.mark.parametrize("ndim", [2, 3])
def test_ngf_anisotropic_spacing(ndim):
    shape = SHAPES[ndim]
    spacing = (2.0, 0.5, 3.0)[:ndim]
    idx = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    x_mm = idx[-1] * spacing[0]
    y_mm = idx[-2] * spacing[1]
    f = (x_mm + y_mm)[None, None]
    m = (x_mm - y_mm)[None, None]  # physically orthogonal gradients
    tiny = dict(eps_fixed=1e-8, eps_moving=1e-8)
    assert ngf(f, m, spacing=spacing, **tiny).item() == pytest.approx(0.0, abs=1e-12)
    assert ngf(f, m, spacing=spacing).item() == pytest.approx(0.0, abs=1e-12)
    # with the wrong (tensor-order) spacing the gradients are no longer orthogonal:
    # (dx, dy) voxel steps (2, 0.5) divided by (0.5, 2) give an angle far from 90 degrees
    wrong = ngf(f, m, spacing=spacing[::-1], **tiny).item()
    assert wrong == pytest.approx({2: (255 / 257) ** 2, 3: (5 / 13) ** 2}[ndim], abs=1e-12)
    loss = NGFLoss(spacing=spacing[::-1])
    assert loss(f, m, spacing=spacing).item() == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- masks


def _half_mask(shape):
    mask = torch.zeros((1, 1, *shape), dtype=torch.float64)
    mask[..., : shape[-1] // 2] = 1
    return mask


@pytest.mark.parametrize("ndim", [2, 3])
def test_mask_equals_subset(ndim):
    shape = SHAPES[ndim]
    f = smooth_image(shape)
    m = smooth_image(shape, seed=1)
    # garbage in the ignored half must not matter
    m_garbage = m.clone()
    m_garbage[..., shape[-1] // 2 :] = 1e3
    mask = _half_mask(shape)
    half = shape[-1] // 2
    fc, mc = f[..., :half], m[..., :half]
    assert mse(f, m_garbage, mask).item() == pytest.approx(mse(fc, mc).item(), abs=1e-12)
    assert ncc(f, m_garbage, mask).item() == pytest.approx(ncc(fc, mc).item(), abs=1e-12)
    for kernel in ("box", "gaussian"):
        assert lncc(f, m_garbage, mask, window=5, kernel=kernel).item() == pytest.approx(
            lncc(fc, mc, window=5, kernel=kernel).item(), abs=1e-10
        )
    assert ssim(f, m_garbage, mask).item() == pytest.approx(ssim(fc, mc).item(), abs=1e-10)
    assert mutual_information(f, m_garbage, mask, bins=8).item() == pytest.approx(
        mutual_information(fc, mc, bins=8).item(), abs=1e-10
    )
    assert normalized_mutual_information(f, m_garbage, mask, bins=8).item() == pytest.approx(
        normalized_mutual_information(fc, mc, bins=8).item(), abs=1e-10
    )


def test_mask_fractional_weights_mse():
    f, m = noise_image((6, 7)), noise_image((6, 7), seed=1)
    w = noise_image((6, 7), seed=2)
    expected = ((f - m) ** 2 * w).sum() / w.sum()
    assert mse(f, m, w).item() == pytest.approx(expected.item(), abs=1e-12)
    # a spatial-only mask broadcasts as well
    assert mse(f, m, w[0, 0]).item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_ngf_mask_is_weighted_mean(ndim):
    shape = SHAPES[ndim]
    f, m = smooth_image(shape), smooth_image(shape, seed=1)
    eps = dict(eps_fixed=0.05, eps_moving=0.05)
    mask = _half_mask(shape)
    n_in, n_all = mask.sum().item(), float(np.prod(shape))
    total = ngf(f, m, **eps).item() * n_all
    inside = ngf(f, m, mask, **eps).item() * n_in
    outside = ngf(f, m, 1 - mask, **eps).item() * (n_all - n_in)
    assert inside + outside == pytest.approx(total, rel=1e-10)
    assert inside / n_in != pytest.approx(total / n_all, rel=1e-3)


MEASURES = {
    "mse": mse,
    "ncc": ncc,
    "lncc": lncc,
    "lncc_gauss": lambda f, m, mask=None, **kw: lncc(f, m, mask, kernel="gaussian", **kw),
    "ssim": ssim,
    "mi": mutual_information,
    "nmi": normalized_mutual_information,
    "ngf": ngf,
}


@pytest.mark.parametrize("name", MEASURES)
def test_zero_mask_raises(name):
    f, m = noise_image((6, 7)), noise_image((6, 7), seed=1)
    with pytest.raises(ValueError, match="mask"):
        MEASURES[name](f, m, torch.zeros(1, 1, 6, 7, dtype=torch.float64))
    # one empty batch element is enough to raise
    fb, mb = noise_image((6, 7), batch=2), noise_image((6, 7), seed=1, batch=2)
    mask = torch.ones(2, 1, 6, 7, dtype=torch.float64)
    mask[1] = 0
    with pytest.raises(ValueError, match="mask"):
        MEASURES[name](fb, mb, mask)


# ---------------------------------------------------------------- gradients

# Options making each measure a fixed smooth function of both inputs (data-derived ranges, data
# range and eps are detached, so they are passed explicitly for gradcheck).
GRAD_KW = {
    "mse": {},
    "ncc": {},
    "lncc": {"window": 3},
    "lncc_gauss": {"window": 5},
    "ssim": {"data_range": 1.0, "sigma": 1.0},
    "mi": {"bins": 6, "fixed_range": (-0.1, 1.1), "moving_range": (-0.1, 1.1)},
    "nmi": {"bins": 6, "fixed_range": (-0.1, 1.1), "moving_range": (-0.1, 1.1)},
    "ngf": {"eps_fixed": 0.1, "eps_moving": 0.2},
}


@pytest.mark.parametrize("normalized", [False, True], ids=["mi", "nmi"])
def test_gradcheck_mi_windowed(normalized):
    """gradcheck where the Parzen windows are narrower than the bins (16 bins, 7-bin windows),
    clamp at both ends (explicit ranges narrower than the data) and the mask is an input too."""
    shape = (7, 8)
    f = smooth_image(shape, seed=1).requires_grad_()
    m = smooth_image(shape, seed=2).requires_grad_()
    mask = (0.2 + noise_image(shape, seed=3)).requires_grad_()
    kw = dict(bins=16, fixed_range=(0.1, 0.9), moving_range=(-0.2, 0.8), normalized=normalized)
    assert torch.autograd.gradcheck(lambda a, b, w: mutual_information(a, b, w, **kw), (f, m, mask))


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("shape", [(7, 8), (5, 6, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_gradcheck(name, shape, masked):
    f = smooth_image(shape, seed=1).requires_grad_()
    m = smooth_image(shape, seed=2).requires_grad_()
    mask = None
    if masked:
        mask = noise_image(shape, seed=3)
        mask[..., :2] = 0
    fn = MEASURES[name]
    kw = GRAD_KW[name]
    assert torch.autograd.gradcheck(
        lambda a, b: fn(a, b, mask, **kw), (f, m), fast_mode=len(shape) == 3
    )


# ---------------------------------------------------------------- batch, modules, devices


@pytest.mark.parametrize("name", MEASURES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_batch_is_mean_of_elements(name, ndim):
    shape = {2: (16, 15), 3: (8, 9, 10)}[ndim]
    f = smooth_image(shape, batch=2)
    m = smooth_image(shape, seed=1, batch=2)
    m[1] = 2 * m[1] + 1  # different ranges per element
    mask = noise_image(shape, seed=4, batch=2)
    fn = MEASURES[name]
    for w in (None, mask):
        batch = fn(f, m, w)
        assert batch.shape == ()
        singles = [fn(f[i : i + 1], m[i : i + 1], None if w is None else w[i : i + 1])
                   for i in range(2)]
        assert batch.item() == pytest.approx(sum(s.item() for s in singles) / 2, abs=1e-10)


def test_modules_match_functionals():
    f, m = smooth_image((16, 16)), smooth_image((16, 16), seed=1)
    mask = _half_mask((16, 16))
    pairs = [
        (MSELoss(), mse(f, m, mask)),
        (NCCLoss(), 1 - ncc(f, m, mask)),
        (LNCCLoss(window=5, kernel="gaussian"), 1 - lncc(f, m, mask, 5, "gaussian")),
        (SSIMLoss(sigma=1.0), 1 - ssim(f, m, mask, sigma=1.0)),
        (MILoss(bins=16), -mutual_information(f, m, mask, bins=16)),
        (NMILoss(bins=16), -normalized_mutual_information(f, m, mask, bins=16)),
        (NGFLoss(spacing=(1.0, 2.0)), 1 - ngf(f, m, mask, spacing=(1.0, 2.0))),
    ]
    for module, expected in pairs:
        assert module(f, m, mask).item() == pytest.approx(expected.item(), abs=1e-12)
    # identical images give the minimum of the bounded losses
    assert NCCLoss()(f, f).item() == pytest.approx(0.0, abs=1e-5)
    assert SSIMLoss()(f, f).item() == pytest.approx(0.0, abs=1e-12)
    # per-call overrides replace stored keyword arguments
    module = LNCCLoss(window=9)
    assert module(f, m, window=3).item() == pytest.approx(1 - lncc(f, m, window=3).item())


def test_build_loss():
    assert set(LOSSES) == {"mse", "ncc", "lncc", "lcc", "ssim", "mi", "nmi", "ngf"}
    loss = build_loss("lncc", window=5)
    assert isinstance(loss, LNCCLoss) and loss.kwargs["window"] == 5
    assert isinstance(build_loss("MI"), MILoss)
    with pytest.raises(ValueError, match="ncc"):
        build_loss("cross_entropy")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        mse(noise_image((5, 6)), noise_image((6, 5)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", MEASURES)
def test_cuda_matches_cpu(name):
    shape = (12, 14, 16)
    # CT-like intensities (HU) in float32: exercises the precision of the local moments
    f = smooth_image(shape, dtype=torch.float32, batch=2) * 2000 - 1000
    m = smooth_image(shape, seed=1, dtype=torch.float32, batch=2) * 1500 - 300
    mask = noise_image(shape, seed=2, dtype=torch.float32, batch=2)
    fn = MEASURES[name]
    cpu = fn(f, m, mask)
    fc, mc = f.cuda().requires_grad_(), m.cuda().requires_grad_()
    gpu = fn(fc, mc, mask.cuda())
    assert gpu.device.type == "cuda"
    assert math.isfinite(gpu.item())
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4, abs=1e-4)
    gpu.backward()
    assert torch.isfinite(mc.grad).all()
