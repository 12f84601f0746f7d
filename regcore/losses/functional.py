r"""Image similarity measures for registration, as pure differentiable functions.

Conventions shared by every function in this module:

* Images are tensors of shape ``(N, C, *spatial)`` with ``spatial = (Y, X)`` in 2D or
  ``(Z, Y, X)`` in 3D (1D ``(X,)`` also works). Any floating dtype, any device; every helper
  tensor is created on the input's device with the input's dtype.
* Measures take ``(fixed, moving, ...)`` where ``moving`` is the moving image already warped onto
  the fixed grid; both have the same shape.
* ``mask`` is an optional float weight tensor broadcastable to ``(N, 1, *spatial)`` with values in
  ``[0, 1]`` (0 = ignore the voxel). Every statistic is weighted by it. Each batch element must
  have a positive total weight, otherwise :class:`~regcore.errors.InputError` (a
  :class:`ValueError`) is raised.
* Each measure returns a 0-dim tensor: its natural value (a similarity, not a loss), computed per
  ``(batch element, channel)`` pair and then averaged over batch and channels, so a batch gives
  the mean of the values of its elements.
* ``spacing`` is given in ITK ``(x, y, z)`` order, i.e. *reversed* relative to the tensor's
  spatial dims; finite differences are divided by it (physical units, mm).
* ``window`` / ``sigma`` of the local measures are in voxels and, when given per dimension, are in
  tensor dim order ``(Z, Y, X)``.

The module-level ``*Loss`` wrappers in :mod:`regcore.losses.modules` turn these into quantities to
minimise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from regcore.errors import InputError
from regcore.masks import prepare_mask as _prepare_mask
from regcore.sampling import stratified_indices

__all__ = [
    "gaussian_kernel1d",
    "separable_filter",
    "spatial_gradient",
    "mse",
    "ncc",
    "lncc",
    "ssim",
    "mutual_information",
    "normalized_mutual_information",
    "ngf",
]

IntOrSeq = Union[int, Sequence[int]]
FloatOrSeq = Union[float, Sequence[float]]
Range = Optional[tuple[float, float]]

#: Default lncc Gaussian sigma is ``(window - 1) / LNCC_GAUSSIAN_WINDOW_SIGMAS``, i.e. the
#: window spans +-2 sigma.
LNCC_GAUSSIAN_WINDOW_SIGMAS = 4.0
#: Default Parzen kernel standard deviation of the (normalised) mutual information, in bins.
MI_DEFAULT_KERNEL_SIGMA = 0.5
#: The Parzen Gaussian is evaluated on the bins within about this many sigmas of a sample: the
#: ``2 R + 1`` bins around the nearest one, ``R = ceil(7 sigma - 1/2)``. Bins left out have
#: weights below ``exp(-24.5) ~ 2e-11`` of the kernel's peak (``R = 3`` for the default sigma).
MI_KERNEL_TRUNCATE = 7.0
#: Default NGF edge parameter: this factor times the (mask-weighted) mean gradient magnitude of
#: the image, the heuristic of Haber & Modersitzki (2006).
NGF_DEFAULT_EPS_FACTOR = 1.0


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _spatial_ndim(x: Tensor, name: str = "image") -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < 3 or x.dim() > 5:
        raise InputError(
            f"{name} must have shape (N, C, *spatial) with 1 to 3 spatial dims, "
            f"got shape {tuple(x.shape)}"
        )
    return x.dim() - 2


def _check_pair(fixed: Tensor, moving: Tensor) -> int:
    ndim = _spatial_ndim(fixed, "fixed")
    _spatial_ndim(moving, "moving")
    if fixed.shape != moving.shape:
        raise InputError(
            f"fixed and moving must have the same shape, got {tuple(fixed.shape)} "
            f"and {tuple(moving.shape)}"
        )
    return ndim


def _per_dim(value: Union[int, float, Sequence], ndim: int, name: str) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        raise InputError(f"{name} must be a scalar or have {ndim} entries, got {value}")
    return value


def _window_sizes(window: IntOrSeq, ndim: int) -> tuple[int, ...]:
    sizes = _per_dim(window, ndim, "window")
    for size in sizes:
        if int(size) != size or size < 1 or size % 2 == 0:
            raise InputError(f"window sizes must be positive odd integers, got {sizes}")
    return tuple(int(s) for s in sizes)


def _spacing(spacing: Optional[FloatOrSeq], ndim: int) -> tuple[float, ...]:
    """Spacing in (x, y, z) order, validated."""
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in _per_dim(spacing, ndim, "spacing"))
    if any(not (s > 0 and math.isfinite(s)) for s in values):
        raise InputError(f"spacing must be positive and finite, got {values}")
    return values


# --------------------------------------------------------------------------------------------
# reductions and filters
# --------------------------------------------------------------------------------------------


def _weighted_mean(values: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Weighted mean over the spatial dims, then plain mean over batch and channels.

    Args:
        values: ``(N, C, *spatial)``.
        weight: ``(N, 1, *spatial)`` non-negative weights, or ``None`` for uniform weights.

    Returns:
        0-dim tensor.
    """
    if weight is None:
        return values.mean()
    num = (values * weight).flatten(2).sum(-1)
    den = weight.flatten(2).sum(-1)
    return (num / den).mean()


def _spatial_weighted_mean(values: Tensor, weight: Optional[Tensor]) -> Tensor:
    """Per ``(n, c)`` weighted mean over the spatial dims, kept as ``(N, C, 1, ...)``."""
    dims = tuple(range(2, values.dim()))
    if weight is None:
        return values.mean(dim=dims, keepdim=True)
    return (values * weight).sum(dim=dims, keepdim=True) / weight.sum(dim=dims, keepdim=True)


def gaussian_kernel1d(
    sigma: float,
    truncate: float = 4.0,
    radius: Optional[int] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> Tensor:
    """Normalised sampled 1D Gaussian kernel.

    Args:
        sigma: Standard deviation in voxels (``>= 0``; 0 gives the identity kernel ``[1]``).
        truncate: Radius in units of ``sigma`` when ``radius`` is not given; the radius is
            ``int(truncate * sigma + 0.5)`` as in :func:`scipy.ndimage.gaussian_filter`.
        radius: Explicit radius in voxels (kernel length ``2 * radius + 1``).
        dtype, device: Of the returned tensor.

    Returns:
        Kernel of shape ``(2 * radius + 1,)`` summing to one.
    """
    if sigma < 0:
        raise InputError(f"sigma must be non-negative, got {sigma}")
    if radius is None:
        radius = int(truncate * sigma + 0.5)
    if radius < 0:
        raise InputError(f"radius must be non-negative, got {radius}")
    if sigma == 0 or radius == 0:
        kernel = torch.zeros(2 * radius + 1, dtype=dtype, device=device)
        kernel[radius] = 1
        return kernel
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _box_filter(y: Tensor, axis: int, radius: int) -> Tensor:
    """Sum over the window ``[i - radius, i + radius]`` along ``axis`` (zeros outside), via a
    cumulative sum: same result as a ones-kernel convolution, much faster on CPU."""
    length = y.shape[axis]
    before = list(y.shape)
    before[axis] = radius + 1
    after = list(y.shape)
    after[axis] = radius
    padded = torch.cat([y.new_zeros(before), y, y.new_zeros(after)], dim=axis)
    cs = padded.cumsum(axis)
    return cs.narrow(axis, 2 * radius + 1, length) - cs.narrow(axis, 0, length)


def separable_filter(x: Tensor, kernels: Sequence[Optional[Tensor]]) -> Tensor:
    """Filter each channel of ``x`` with a separable kernel, zero padding, same output size.

    Args:
        x: ``(N, C, *spatial)`` with 1 to 3 spatial dims.
        kernels: One odd-length 1D kernel (or ``None`` to skip) per spatial dim, in tensor dim
            order (``Z, Y, X``). Applied as a correlation (kernels are meant to be symmetric).

    Returns:
        Filtered tensor of the same shape as ``x``. Values outside the image count as zero; divide
        by the filtered mask/ones image to get a normalised (padding-free) average.
    """
    ndim = _spatial_ndim(x, "x")
    if len(kernels) != ndim:
        raise InputError(f"need {ndim} kernels (one per spatial dim), got {len(kernels)}")
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    y = x.reshape(n * c, 1, *spatial)
    conv = (F.conv1d, F.conv2d, F.conv3d)[ndim - 1]
    for dim, kernel in enumerate(kernels):
        if kernel is None:
            continue
        size = kernel.numel()
        if size % 2 == 0:
            raise InputError(f"kernels must have odd length, got {size} for dim {dim}")
        if size == 1:
            y = y * kernel.reshape(()).to(device=y.device, dtype=y.dtype)
            continue
        if bool((kernel == kernel[0]).all()):  # a box: running sums are O(N) whatever the width
            y = _box_filter(y, 2 + dim, size // 2) * kernel[0].to(device=y.device, dtype=y.dtype)
            continue
        shape = [1] * ndim
        shape[dim] = size
        padding = [0] * ndim
        padding[dim] = size // 2
        weight = kernel.to(device=y.device, dtype=y.dtype).reshape(1, 1, *shape)
        y = conv(y, weight, padding=tuple(padding))
    return y.reshape(n, c, *spatial)


def _local_moments(
    fixed: Tensor, moving: Tensor, weight: Optional[Tensor], kernels: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Local (mask-)weighted means, variances and covariance by normalised convolution.

    Every local statistic is ``filter(w * q) / filter(w)`` with ``w`` the mask (or ones), so
    voxels outside the image or outside the mask never enter a local window (no zero-padding
    bias, no leakage across the mask border).

    Returns:
        ``mean_f, mean_m, var_f, var_m, cov``, each ``(N, C, *spatial)``; variances clamped >= 0.
    """
    n, c = fixed.shape[:2]
    spatial = fixed.shape[2:]
    # Second moments are shift-invariant: filter images centred by their detached per-(n, c)
    # (mask-weighted) mean and add it back to the local means. This avoids catastrophic
    # cancellation in E[x^2] - E[x]^2 for large intensities (e.g. CT in HU), also under TF32
    # convolutions, and keeps values outside the mask out of the arithmetic.
    shift_f = _spatial_weighted_mean(fixed.detach(), weight)
    shift_m = _spatial_weighted_mean(moving.detach(), weight)
    fixed = fixed - shift_f
    moving = moving - shift_m
    if weight is None:
        ones = torch.ones((1, 1, *spatial), dtype=fixed.dtype, device=fixed.device)
        mass = separable_filter(ones, kernels)
        wf, wm = fixed, moving
    else:
        mass = separable_filter(weight, kernels)
        wf, wm = weight * fixed, weight * moving
    stack = torch.stack([wf, wm, wf * fixed, wm * moving, wf * moving], dim=2)
    filt = separable_filter(stack.reshape(n, c * 5, *spatial), kernels)
    filt = filt.reshape(n, c, 5, *spatial)
    # mass is exactly zero only where no weighted voxel is in the window; there the numerators
    # are zero too and the voxel itself has zero weight. The clamp keeps everything finite.
    mass = mass.clamp_min(torch.finfo(fixed.dtype).eps)
    mean_f = filt[:, :, 0] / mass
    mean_m = filt[:, :, 1] / mass
    var_f = (filt[:, :, 2] / mass - mean_f.square()).clamp_min(0)
    var_m = (filt[:, :, 3] / mass - mean_m.square()).clamp_min(0)
    cov = filt[:, :, 4] / mass - mean_f * mean_m
    return mean_f + shift_f, mean_m + shift_m, var_f, var_m, cov


def _central_difference(x: Tensor, dim: int) -> Tensor:
    """Central differences along ``dim`` (one-sided at the two ends), per voxel."""
    size = x.shape[dim]
    if size < 2:
        return torch.zeros_like(x)
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    last = x.narrow(dim, size - 1, 1) - x.narrow(dim, size - 2, 1)
    if size == 2:
        return torch.cat([first, last], dim=dim)
    interior = (x.narrow(dim, 2, size - 2) - x.narrow(dim, 0, size - 2)) * 0.5
    return torch.cat([first, interior, last], dim=dim)


def spatial_gradient(image: Tensor, spacing: Optional[FloatOrSeq] = None) -> tuple[Tensor, ...]:
    """Image gradient in physical units by central finite differences.

    Interior voxels use ``(I[i+1] - I[i-1]) / 2``, the first/last voxel along an axis the
    one-sided difference (as ``numpy.gradient`` with ``edge_order=1``); each difference is
    divided by the spacing of that axis.

    Args:
        image: ``(N, C, *spatial)``, spatial ``(Y, X)`` or ``(Z, Y, X)``.
        spacing: Voxel size in ``(x, y, z)`` order (ITK order, reversed w.r.t. the tensor's
            spatial dims), in mm; default all ones.

    Returns:
        Tuple of ``D`` tensors, each ``(N, C, *spatial)``, ordered ``(dI/dx, dI/dy[, dI/dz])``
        (physical ``x`` is the *last* tensor dim), in intensity units per mm.
    """
    ndim = _spatial_ndim(image)
    sp = _spacing(spacing, ndim)
    return tuple(
        _central_difference(image, image.dim() - 1 - axis) / sp[axis] for axis in range(ndim)
    )


# --------------------------------------------------------------------------------------------
# measures
# --------------------------------------------------------------------------------------------


def mse(fixed: Tensor, moving: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared intensity difference.

    Args:
        fixed, moving: ``(N, C, *spatial)``.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

    Returns:
        0-dim tensor, the (mask-weighted) mean of ``(fixed - moving)**2`` in squared intensity
        units, averaged over batch and channels; 0 for identical images.
    """
    _check_pair(fixed, moving)
    weight = _prepare_mask(mask, fixed)
    return _weighted_mean((fixed - moving).square(), weight)


def ncc(
    fixed: Tensor, moving: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-8
) -> Tensor:
    """Global normalised cross-correlation (Pearson correlation coefficient).

    ``cc = cov(F, M) / sqrt(var(F) * var(M) + eps)`` with (mask-)weighted means, variances and
    covariance over all voxels of each ``(n, c)`` image.

    Args:
        fixed, moving: ``(N, C, *spatial)``.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.
        eps: Added to the variance product (squared intensity units squared).

    Returns:
        0-dim tensor in ``[-1, 1]`` (1: ``moving = a * fixed + b`` with ``a > 0``).
    """
    _check_pair(fixed, moving)
    weight = _prepare_mask(mask, fixed)
    df = fixed - _spatial_weighted_mean(fixed, weight).detach()
    dm = moving - _spatial_weighted_mean(moving, weight).detach()
    # Centring with detached means first improves precision; recompute exactly below.
    mf = _spatial_weighted_mean(df, weight)
    mm = _spatial_weighted_mean(dm, weight)
    df = df - mf
    dm = dm - mm
    cov = _spatial_weighted_mean(df * dm, weight)
    var_f = _spatial_weighted_mean(df.square(), weight)
    var_m = _spatial_weighted_mean(dm.square(), weight)
    cc = cov / torch.sqrt(var_f * var_m + eps)
    return cc.mean()


def _lncc_kernels(
    sizes: Sequence[int],
    kernel: str,
    sigma: Optional[FloatOrSeq],
    dtype: torch.dtype,
    device: torch.device,
) -> list[Tensor]:
    if kernel == "box":
        if sigma is not None:
            raise InputError("sigma is only used with kernel='gaussian'")
        return [torch.full((s,), 1.0 / s, dtype=dtype, device=device) for s in sizes]
    if kernel == "gaussian":
        if sigma is None:
            sigmas = [(s - 1) / LNCC_GAUSSIAN_WINDOW_SIGMAS for s in sizes]
        else:
            sigmas = [float(v) for v in _per_dim(sigma, len(sizes), "sigma")]
        return [
            gaussian_kernel1d(sg, radius=s // 2, dtype=dtype, device=device)
            for sg, s in zip(sigmas, sizes)
        ]
    raise InputError(f"kernel must be 'box' or 'gaussian', got {kernel!r}")


def lncc(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    window: IntOrSeq = 9,
    kernel: str = "box",
    sigma: Optional[FloatOrSeq] = None,
    eps: float = 1e-5,
) -> Tensor:
    """Local normalised cross-correlation.

    Local means, variances and covariance are computed with a separable window by *normalised
    convolution*: every local statistic is ``filter(w * q) / filter(w)`` where ``w`` is the mask
    (or ones). The image is effectively not padded at all: near the border (and near the mask
    border) only voxels inside the image (and inside the mask) are averaged, with the window
    weights renormalised. The local correlation ``cov / sqrt(var_f * var_m + eps)`` (signed) is
    then averaged over voxels, weighted by the mask.

    Args:
        fixed, moving: ``(N, C, *spatial)``, 2D or 3D.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.
        window: Odd window size in voxels, an int or one per spatial dim in tensor order.
        kernel: ``"box"`` (uniform window) or ``"gaussian"`` (separable Gaussian truncated to the
            window).
        sigma: Gaussian standard deviation in voxels (scalar or per dim); default
            ``(window - 1) / 4`` so that the window spans +-2 sigma. Only for ``"gaussian"``.
        eps: Added to the local variance product (squared intensity units squared).

    Returns:
        0-dim tensor in ``[-1, 1]``, ~1 for ``moving = a * fixed + b`` (``a > 0``) on textured
        images (less where the local variance is comparable to ``sqrt(eps)``).
    """
    ndim = _check_pair(fixed, moving)
    weight = _prepare_mask(mask, fixed)
    sizes = _window_sizes(window, ndim)
    kernels = _lncc_kernels(sizes, kernel, sigma, fixed.dtype, fixed.device)
    _, _, var_f, var_m, cov = _local_moments(fixed, moving, weight, kernels)
    cc = cov / torch.sqrt(var_f * var_m + eps)
    return _weighted_mean(cc, weight)


def ssim(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    sigma: FloatOrSeq = 1.5,
    truncate: float = 3.5,
    data_range: Optional[Union[float, Tensor]] = None,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity index (Wang et al. 2004) with a separable Gaussian window.

    Local statistics use the same normalised (padding-free, mask-aware) convolution as
    :func:`lncc`, with population (biased) variances. The SSIM map
    ``(2 mu_f mu_m + C1)(2 cov + C2) / ((mu_f^2 + mu_m^2 + C1)(var_f + var_m + C2))`` with
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` is averaged with the mask weights.

    Args:
        fixed, moving: ``(N, C, *spatial)``, 2D or 3D.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.
        sigma: Gaussian standard deviation in voxels (scalar or per dim in tensor order).
        truncate: Kernel radius in units of sigma (``int(truncate * sigma + 0.5)`` voxels; the
            defaults give the standard 11-tap window).
        data_range: Dynamic range ``L`` (intensity units). Default: ``max - min`` of ``fixed``
            over the voxels with positive mask weight, per batch element (all channels),
            computed without gradient; 1 if that is zero.
        k1, k2: Stabilising constants.

    Returns:
        0-dim tensor, 1 for identical images, lower (down to -1) otherwise.
    """
    ndim = _check_pair(fixed, moving)
    weight = _prepare_mask(mask, fixed)
    sigmas = [float(s) for s in _per_dim(sigma, ndim, "sigma")]
    kernels = [
        gaussian_kernel1d(s, truncate, dtype=fixed.dtype, device=fixed.device) for s in sigmas
    ]
    view = (-1,) + (1,) * (fixed.dim() - 1)
    if data_range is None:
        with torch.no_grad():
            flat = fixed.detach().flatten(1)
            if weight is None:
                lo, hi = flat.amin(1), flat.amax(1)
            else:
                valid = (weight > 0).expand_as(fixed).flatten(1)
                lo = torch.where(valid, flat, torch.full_like(flat, math.inf)).amin(1)
                hi = torch.where(valid, flat, torch.full_like(flat, -math.inf)).amax(1)
            span = hi - lo
            span = torch.where(span > 0, span, torch.ones_like(span))
        big_l = span.reshape(view)
    else:
        big_l = torch.as_tensor(data_range, dtype=fixed.dtype, device=fixed.device)
        if big_l.dim() == 1:
            big_l = big_l.reshape(view)
    c1 = (k1 * big_l) ** 2
    c2 = (k2 * big_l) ** 2
    mean_f, mean_m, var_f, var_m, cov = _local_moments(fixed, moving, weight, kernels)
    num = (2 * mean_f * mean_m + c1) * (2 * cov + c2)
    den = (mean_f.square() + mean_m.square() + c1) * (var_f + var_m + c2)
    return _weighted_mean(num / den, weight)


def _parzen_coords(
    values: Tensor,
    bins: int,
    value_range: Range,
    weight: Optional[Tensor],
    name: str,
) -> Tensor:
    """Intensities mapped linearly to bin coordinates (``min`` -> 0, ``max`` -> ``bins - 1``).

    Args:
        values: ``(B, V)`` intensities.
        weight: ``(B, V)`` sample weights (only used to pick the voxels for the automatic range).

    Returns:
        ``(B, V)`` bin coordinates, differentiable w.r.t. ``values`` (the automatic range is not).
    """
    if value_range is None:
        with torch.no_grad():
            v = values.detach()
            if weight is None:
                lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
            else:
                invalid = weight <= 0
                lo = v.masked_fill(invalid, math.inf).amin(1, keepdim=True)
                hi = v.masked_fill(invalid, -math.inf).amax(1, keepdim=True)
            span = hi - lo
            span = torch.where(span > 0, span, torch.ones_like(span))
    else:
        lo_f, hi_f = (float(r) for r in value_range)
        if not hi_f > lo_f:
            raise InputError(f"{name} must be (min, max) with max > min, got {value_range}")
        lo, span = lo_f, hi_f - lo_f
    return (values - lo) * ((bins - 1) / span)


def _parzen_radius(kernel_sigma: float, bins: int) -> int:
    """Half-width (in bins) of the window of bins a sample's Parzen kernel is evaluated on."""
    radius = max(1, math.ceil(MI_KERNEL_TRUNCATE * kernel_sigma - 0.5))
    return min(radius, bins)  # 2 * radius + 1 >= bins: the window is all the bins


def _parzen_window(coord: Tensor, bins: int, sigma: float, width: int) -> tuple[Tensor, Tensor]:
    """Normalised Gaussian Parzen weights of each sample on its window of ``width`` bins.

    The window is the ``width`` consecutive bins centred on the nearest bin (shifted to stay
    inside ``0 .. bins - 1``), so the bins left out are at least ``(width + 1) / 2`` bins away.

    Args:
        coord: ``(M,)`` bin coordinates (no gradient).

    Returns:
        ``start`` ``(M,)`` int64, the first bin of each window, and ``w`` ``(M, width)``, the
        Gaussian sampled at the window's bin centres, each row summing to one.
    """
    radius = (width - 1) // 2
    start = (torch.round(coord) - radius).clamp_(0, bins - width)
    # position in the window, in bins; beyond 40 sigma outside it the weights are one-hot anyway
    margin = 40.0 * sigma + 1.0
    t = (coord - start).clamp_(-margin, width - 1 + margin).unsqueeze(-1)
    near = t.clamp(0, width - 1)  # nearest point of the window
    offsets = torch.arange(width, dtype=coord.dtype, device=coord.device)
    # (t - a)^2 - (t - near)^2, factored so that samples far outside the range (explicit ranges,
    # masked-out garbage) neither underflow to an all-zero row nor lose it to cancellation
    e = (near - offsets) * (2 * t - offsets - near)
    w = e.mul_(-0.5 / sigma**2).exp_()
    w = w.div_(w.sum(-1, keepdim=True))
    return start.to(torch.int64), w


#: Samples processed at once by the Parzen histogram: bounds the ``(M, width**2)`` temporaries
#: (and keeps them in cache).
_PARZEN_CHUNK = 1 << 14


def _contract(blocks: Tensor, w: Tensor) -> Tensor:
    """``out[m, b] = sum_a w[m, a] * blocks[m, a, b]`` for ``(M, k, k)`` blocks, as ``k`` fused
    multiply-adds over ``(M, k)`` slices (much faster on CPU than ``M`` tiny matrix products)."""
    out = blocks[:, 0] * w[:, :1]
    for a in range(1, w.shape[1]):
        out.addcmul_(blocks[:, a], w[:, a : a + 1])
    return out


class _ParzenJoint(torch.autograd.Function):
    """Unnormalised Parzen joint histogram ``sum_v weight_v * w_f(v) (x) w_m(v)``, ``(B, bins, bins)``.

    Each sample touches only its ``width x width`` block of bins: its outer product is added into
    the histogram with ``index_add_``; the backward pass cuts the incoming gradient into the
    blocks of every pair of window starts (``F.unfold``) and reads each sample's block back with
    ``index_select``. Time and memory are ``O(V * width**2)``
    instead of the ``O(V * bins**2)`` of a dense ``W_f^T W_m`` product. Inputs are bin
    coordinates ``(B, V)`` and optional sample weights ``(B, V)``.
    """

    @staticmethod
    def forward(ctx, coord_f, coord_m, weight, bins, sigma, width):
        cf, cm = coord_f.detach(), coord_m.detach()
        wt = None if weight is None else weight.detach()
        b, v = cf.shape
        span = bins - width + 1  # window starts per axis
        cells = torch.empty((b, v), dtype=torch.int64, device=cf.device)
        w_f = cf.new_empty(b, v, width)
        w_m = cf.new_empty(b, v, width)
        joint = cf.new_zeros(b, bins * bins)
        ar = torch.arange(width, dtype=torch.int32, device=cf.device)
        block = (ar.unsqueeze(-1) * bins + ar).reshape(-1)  # flat offsets of a block in the joint
        for i in range(b):
            for lo in range(0, v, _PARZEN_CHUNK):
                hi = min(lo + _PARZEN_CHUNK, v)
                sf, wf = _parzen_window(cf[i, lo:hi], bins, sigma, width)
                sm, wm = _parzen_window(cm[i, lo:hi], bins, sigma, width)
                cells[i, lo:hi], w_f[i, lo:hi], w_m[i, lo:hi] = sf * span + sm, wf, wm
                if wt is not None:
                    wf = wf * wt[i, lo:hi].unsqueeze(-1)
                outer = (wf.unsqueeze(-1) * wm.unsqueeze(-2)).reshape(-1)
                index = (sf.mul_(bins).add_(sm).to(torch.int32).unsqueeze(-1) + block).reshape(-1)
                # a flat index_add_ is a serial (deterministic) loop on CPU; the row-wise (2D)
                # index_add_/scatter_add_ start a parallel region per row with > 1 thread,
                # two orders of magnitude slower on a busy machine
                joint[i].index_add_(0, index, outer)
        ctx.save_for_backward(cells, w_f, w_m, wt)
        ctx.bins, ctx.sigma = bins, sigma
        return joint.reshape(b, bins, bins)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cells, w_f, w_m, wt = ctx.saved_tensors
        bins, sigma = ctx.bins, ctx.sigma
        need_f, need_m, need_w = ctx.needs_input_grad[:3]
        b, v, width = w_f.shape
        span = bins - width + 1
        # the incoming gradient cut into the blocks of each window-start pair
        gblocks = F.unfold(grad.reshape(b, 1, bins, bins), (width, width))
        gblocks = gblocks.transpose(1, 2).contiguous().reshape(b, span * span, width, width)
        offsets = torch.arange(width, dtype=w_f.dtype, device=w_f.device)
        scale = 1.0 / sigma**2
        g_f = w_f.new_zeros(b, v) if need_f else None
        g_m = w_f.new_zeros(b, v) if need_m else None
        g_w = w_f.new_zeros(b, v) if need_w else None

        def chain(t, w):
            # d w_a / d coord = w_a (a - sum_l w_l l) / sigma^2 for the normalised Gaussian
            tw = t * w
            return (tw @ offsets - tw.sum(-1) * (w @ offsets)) * scale

        for i in range(b):
            for lo in range(0, v, _PARZEN_CHUNK):
                hi = min(lo + _PARZEN_CHUNK, v)
                wf, wm = w_f[i, lo:hi], w_m[i, lo:hi]
                g = gblocks[i].index_select(0, cells[i, lo:hi])  # (M, width, width)
                wgt = None if wt is None else wt[i, lo:hi].unsqueeze(-1)
                if need_f or need_w:
                    t_f = _contract(g.transpose(1, 2), wm)  # sum_b G[a, b] w_m[b]
                    if need_w:
                        g_w[i, lo:hi] = (t_f * wf).sum(-1)
                    if need_f:
                        g_f[i, lo:hi] = chain(t_f if wgt is None else t_f * wgt, wf)
                if need_m:
                    t_m = _contract(g, wf)  # sum_a w_f[a] G[a, b]
                    g_m[i, lo:hi] = chain(t_m if wgt is None else t_m * wgt, wm)
        return g_f, g_m, g_w, None, None, None


def _parzen_entropies(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor],
    bins: int,
    fixed_range: Range,
    moving_range: Range,
    kernel_sigma: Optional[float],
    num_samples: Optional[int],
    seed: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Marginal and joint entropies (nats) of the Parzen joint histogram, each ``(N * C,)``."""
    _check_pair(fixed, moving)
    if int(bins) != bins or bins < 2:
        raise InputError(f"bins must be an integer >= 2, got {bins}")
    bins = int(bins)
    sigma = MI_DEFAULT_KERNEL_SIGMA if kernel_sigma is None else float(kernel_sigma)
    if not sigma > 0:
        raise InputError(f"kernel_sigma must be positive, got {kernel_sigma}")
    weight = _prepare_mask(mask, fixed)
    n, c = fixed.shape[:2]
    f = fixed.reshape(n, c, -1)
    m = moving.reshape(n, c, -1)
    w = None if weight is None else weight.reshape(n, 1, -1)
    num_voxels = f.shape[-1]
    if num_samples is not None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise InputError(f"num_samples must be a positive integer, got {num_samples}")
        if num_samples < num_voxels:
            index = stratified_indices(num_voxels, int(num_samples), int(seed), fixed.device)
            f = f.index_select(-1, index)
            m = m.index_select(-1, index)
            if w is not None:
                w = w.index_select(-1, index)
                if bool((w.detach().flatten(1).sum(1) <= 0).any()):
                    raise InputError(
                        "mask has zero total weight on the sampled voxels of a batch element; "
                        "increase num_samples or change seed"
                    )
    f = f.reshape(n * c, -1)
    m = m.reshape(n * c, -1)
    if w is not None:
        w = w.expand(n, c, -1).reshape(n * c, -1)
    coord_f = _parzen_coords(f, bins, fixed_range, w, "fixed_range")
    coord_m = _parzen_coords(m, bins, moving_range, w, "moving_range")
    width = min(2 * _parzen_radius(sigma, bins) + 1, bins)
    joint = _ParzenJoint.apply(coord_f, coord_m, w, bins, sigma, width)  # (B, bins_f, bins_m)
    p = joint / joint.sum(dim=(1, 2), keepdim=True)
    pf = p.sum(2)
    pm = p.sum(1)
    h_f = -(pf * torch.log(pf + eps)).sum(-1)
    h_m = -(pm * torch.log(pm + eps)).sum(-1)
    h_fm = -(p * torch.log(p + eps)).flatten(1).sum(-1)
    return h_f, h_m, h_fm


def mutual_information(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    bins: int = 32,
    fixed_range: Range = None,
    moving_range: Range = None,
    kernel_sigma: Optional[float] = None,
    num_samples: Optional[int] = None,
    seed: int = 0,
    normalized: bool = False,
    eps: float = 1e-10,
) -> Tensor:
    """Mutual information of a Gaussian Parzen-window joint histogram (differentiable).

    Intensities are mapped linearly to bin coordinates ``0 .. bins - 1`` (``min`` to bin 0,
    ``max`` to the last bin). Each voxel contributes a Gaussian of standard deviation
    ``kernel_sigma`` bins, sampled at the bin centres and normalised to sum to one (so values
    outside the range fall into the edge bins). The joint histogram of each ``(n, c)`` pair is
    ``(w_f * mask).T @ w_m`` with ``w_*`` the ``(voxels, bins)`` kernel weights, normalised to a
    probability table; marginals are its row/column sums.

    The Gaussian is evaluated only on the ``2 R + 1`` bins around each voxel's nearest bin,
    ``R = ceil(MI_KERNEL_TRUNCATE * kernel_sigma - 1/2)`` (all bins when that is at least
    ``bins``): the bins left out weigh less than ``exp(-24.5) ~ 2e-11`` of the peak, far below
    float32 resolution, and the histogram costs ``O(voxels * (2 R + 1)**2)`` (49 per voxel for
    the default sigma) instead of ``O(voxels * bins**2)``. Forward and backward are one custom
    autograd function (first derivatives only); deterministic on CPU (on CUDA the histogram is
    accumulated with atomic adds, so the last bits may vary between runs).

    Args:
        fixed, moving: ``(N, C, *spatial)``; channels are treated as separate image pairs.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``, weighting each voxel's
            histogram contribution.
        bins: Number of bins per image.
        fixed_range, moving_range: ``(min, max)`` intensities mapped to the first/last bin
            centre. ``None``: min/max of the voxels with positive weight, per ``(n, c)``,
            computed without gradient (pass explicit ranges for a fixed binning).
        kernel_sigma: Parzen kernel standard deviation in bins (default 0.5).
        num_samples: If smaller than the voxel count, use a random subset of this many voxels
            (stratified: one voxel drawn uniformly from each of ``num_samples`` equal consecutive
            blocks of the flattened image), drawn with a CPU ``torch.Generator`` seeded by
            ``seed`` and moved to the device; the same voxels for every batch element, so the
            value is deterministic per seed and identical on CPU and GPU.
        seed: Seed of the voxel sampling.
        normalized: Return NMI ``(H(F) + H(M)) / H(F, M)`` instead of MI.
        eps: Added inside the logarithms.

    Returns:
        0-dim tensor: MI in nats (``>= 0``; ``H(F) + H(M) - H(F, M)``), or NMI in ``[1, 2]``.
    """
    h_f, h_m, h_fm = _parzen_entropies(
        fixed, moving, mask, bins, fixed_range, moving_range, kernel_sigma, num_samples, seed, eps
    )
    if normalized:
        return ((h_f + h_m) / h_fm).mean()
    return (h_f + h_m - h_fm).mean()


def normalized_mutual_information(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    bins: int = 32,
    fixed_range: Range = None,
    moving_range: Range = None,
    kernel_sigma: Optional[float] = None,
    num_samples: Optional[int] = None,
    seed: int = 0,
    eps: float = 1e-10,
) -> Tensor:
    """Normalised mutual information ``(H(F) + H(M)) / H(F, M)`` (Studholme), in ``[1, 2]``.

    Same arguments and Parzen histogram as :func:`mutual_information`. Returns a 0-dim tensor:
    1 for independent images, approaching 2 for identical ones (less with Parzen smoothing).
    """
    return mutual_information(
        fixed,
        moving,
        mask=mask,
        bins=bins,
        fixed_range=fixed_range,
        moving_range=moving_range,
        kernel_sigma=kernel_sigma,
        num_samples=num_samples,
        seed=seed,
        normalized=True,
        eps=eps,
    )


def _ngf_eps(
    eps: Optional[Union[float, Tensor]], norm2: Tensor, weight: Optional[Tensor]
) -> Tensor:
    if eps is None:
        with torch.no_grad():
            magnitude = torch.sqrt(norm2.detach())
            value = NGF_DEFAULT_EPS_FACTOR * _spatial_weighted_mean(magnitude, weight)
            value = value.clamp_min(torch.finfo(norm2.dtype).eps)
        return value
    value = torch.as_tensor(eps, dtype=norm2.dtype, device=norm2.device)
    if bool((value < 0).any()):
        raise InputError(f"NGF eps must be non-negative, got {eps}")
    return value


def ngf(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    spacing: Optional[FloatOrSeq] = None,
    eps_fixed: Optional[Union[float, Tensor]] = None,
    eps_moving: Optional[Union[float, Tensor]] = None,
) -> Tensor:
    """Normalised gradient fields (Haber & Modersitzki 2006).

    ``n = grad I / sqrt(|grad I|^2 + eps^2)`` with the gradient of :func:`spatial_gradient`
    (central differences, physical units). The value is the mask-weighted mean of
    ``(n_f . n_m)^2``, computed as ``(g_f . g_m)^2 / ((|g_f|^2 + eps_f^2)(|g_m|^2 + eps_m^2))``.
    Channels are compared channel by channel.

    Args:
        fixed, moving: ``(N, C, *spatial)``.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``. It weights the average;
            gradients are always computed on the full images.
        spacing: Voxel size in ``(x, y, z)`` order (mm), reversed w.r.t. the tensor dims.
        eps_fixed, eps_moving: Edge parameter (intensity per mm). Default: the mask-weighted
            mean gradient magnitude of that image, per ``(n, c)``, without gradient (times
            ``NGF_DEFAULT_EPS_FACTOR = 1``), as suggested by Haber & Modersitzki. Gradients
            much weaker than eps count as flat regions.

    Returns:
        0-dim tensor in ``[0, 1]``; 1 for parallel or anti-parallel gradients (and eps -> 0), 0
        for orthogonal gradients or flat regions.
    """
    _check_pair(fixed, moving)
    weight = _prepare_mask(mask, fixed)
    grad_f = spatial_gradient(fixed, spacing)
    grad_m = spatial_gradient(moving, spacing)
    norm2_f = sum(g.square() for g in grad_f)
    norm2_m = sum(g.square() for g in grad_m)
    dot = sum(gf * gm for gf, gm in zip(grad_f, grad_m))
    e_f = _ngf_eps(eps_fixed, norm2_f, weight)
    e_m = _ngf_eps(eps_moving, norm2_m, weight)
    den = (norm2_f + e_f.square()) * (norm2_m + e_m.square())
    value = dot.square() / den.clamp_min(torch.finfo(den.dtype).tiny)
    return _weighted_mean(value, weight)
