r"""Local (squared) cross-correlation, ANTs' ``CC`` metric, with analytic gradients.

For every voxel ``x`` the window ``W(x)`` is the ``(2 r + 1)^D`` box around it, clipped to the
image (windows near the border hold fewer voxels, ``n(x)`` of them). With the window means
``mu_I, mu_J`` and (co)variances::

    a = mean_W(I J) - mu_I mu_J,   b = mean_W(I^2) - mu_I^2,   c = mean_W(J^2) - mu_J^2,

the local correlation is ``cc(x) = a^2 / (b c)`` in ``[0, 1]``, and the measure is its mean over
the voxels (weighted by a mask). Flat windows, ``b c <= eps`` (squared intensity units squared),
count as ``cc = 0`` (ANTs' rule): with intensities normalised to ``[0, 1]``, ``1e-5`` ignores
windows whose standard deviations are below about 5 % of the range. A threshold, not ``b c + eps``
in the denominator: a regularised denominator rewards pairing a faint fixed window with a
contrasted moving one (``a^2 / (b c + eps)`` grows with ``c``), which pulls an affine fit away
from an exact shift on smooth images.

The window sums are running sums (shifted adds), ``O(r)`` per voxel and axis with no convolution.
The gradients are analytic: with ``t = a / (b c)`` (0 in flat windows), ``alpha = 2 t w / n`` (``w`` the
normalised voxel weight), ``beta_J = alpha t b`` and ``beta_I = alpha t c``::

    d/dJ(x) = I(x) S[alpha](x) - S[alpha mu_I](x) - J(x) S[beta_J](x) + S[beta_J mu_J](x)

(``S`` the same window sum; symmetric in ``I <-> J`` with ``beta_I``). ``exact=False`` keeps only
the window centred on ``x`` (ANTs' approximation, no second pass of window sums):
``n (alpha (I - mu_I) - beta_J (J - mu_J))``, the same direction up to smoothing; it serves the
greedy (normalised-step) optimiser, never a line search.

Shapes follow :mod:`regcore.losses.functional`: ``(N, C, *spatial)`` images, masks broadcastable to
``(N, 1, *spatial)``; the value is averaged over batch elements and channels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from regcore.errors import InputError
from regcore.masks import prepare_mask
from regcore.slabs import along_axis_in_slabs, worth_slabs

__all__ = ["window_sum", "window_count", "local_cc", "local_cc_gradients"]


def window_sum(x: Tensor, radius: int, ndim: int) -> Tensor:
    """Sum of ``x`` over the ``(2 radius + 1)`` box around every voxel of its last ``ndim`` dims
    (zeros outside the image): running sums by shifted in-place adds, ``O(radius)`` per voxel."""
    first = x.dim() - ndim
    for dim in range(first, x.dim()):
        if ndim == 3 and worth_slabs(x):  # the same adds, slab by slab (regcore.slabs)
            x = along_axis_in_slabs(x, dim, first, lambda part, out: _window_sum_axis(part, dim, radius, out))
        else:
            x = _window_sum_axis(x, dim, radius, torch.empty_like(x))
    return x


def _window_sum_axis(x: Tensor, dim: int, radius: int, out: Tensor) -> Tensor:
    """``out[i] = sum_{|j| <= radius} x[i + j]`` along ``dim`` (zeros outside), written into ``out``."""
    n = x.shape[dim]
    out.copy_(x)
    for s in range(1, min(radius, n - 1) + 1):
        out.narrow(dim, s, n - s).add_(x.narrow(dim, 0, n - s))
        out.narrow(dim, 0, n - s).add_(x.narrow(dim, s, n - s))
    return out


def window_count(shape: tuple[int, ...], radius: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Number of image voxels in each voxel's window, ``shape`` (spatial only): outer product of
    the per-axis counts ``min(i + r, n - 1) - max(i - r, 0) + 1``."""
    out: Optional[Tensor] = None
    for axis, n in enumerate(shape):
        i = torch.arange(n, device=device)
        count = ((i + radius).clamp(max=n - 1) - (i - radius).clamp(min=0) + 1).to(dtype)
        view = [1] * len(shape)
        view[axis] = n
        count = count.reshape(view)
        out = count if out is None else out * count
    assert out is not None
    return out


def _check(fixed: Tensor, moving: Tensor, radius: int) -> int:
    if fixed.shape != moving.shape:
        raise InputError(f"local_cc: fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ in shape")
    if fixed.dim() not in (4, 5):
        raise InputError(f"local_cc needs (N, C, *spatial) 2D or 3D images, got shape {tuple(fixed.shape)}")
    if int(radius) != radius or radius < 1:
        raise InputError(f"local_cc radius must be a positive integer (voxels), got {radius!r}")
    return fixed.dim() - 2


def _moments(fixed: Tensor, moving: Tensor, radius: int, ndim: int):
    """Window count and the local means, covariance ``a`` and variances ``b``, ``c``, one
    moment at a time and in place (stacking all five products held about twice the image-sized
    buffers at the peak: the largest allocation of a 1 mm greedy level)."""
    n = window_count(tuple(fixed.shape[2:]), radius, fixed.dtype, fixed.device)

    def mean(x: Tensor) -> Tensor:
        return window_sum(x, radius, ndim).div_(n)

    mu_i, mu_j = mean(fixed), mean(moving)
    b = mean(fixed * fixed).sub_(mu_i * mu_i).clamp_min_(0)
    c = mean(moving * moving).sub_(mu_j * mu_j).clamp_min_(0)
    a = mean(fixed * moving).sub_(mu_i * mu_j)
    return n, mu_i, mu_j, a, b, c


def _weights(weight: Optional[Tensor], like: Tensor, per_sample: bool = False) -> Tensor:
    """Per-voxel weights that sum to 1 over each (batch, channel) and average over them (over the
    channels only, per batch element, with ``per_sample``)."""
    count = like.shape[1] if per_sample else like.shape[0] * like.shape[1]
    dims = tuple(range(2, like.dim()))
    if weight is None:
        return like.new_full((1,) * like.dim(), 1.0 / (count * like[0, 0].numel()))
    return weight / (weight.sum(dim=dims, keepdim=True) * count)


def _per_sample_sum(x: Tensor) -> Tensor:
    """Sum over all but the batch dim, accumulated in float64: a batch element's value then does
    not depend on the batch it was computed in (float32 sums of different shapes round apart)."""
    return x.sum(dim=tuple(range(1, x.dim())), dtype=torch.float64).to(x.dtype)


def _ratio(a: Tensor, b: Tensor, c: Tensor, eps: float) -> Tensor:
    """``a / (b c)`` where ``b c > eps``, else 0 (flat windows carry no correlation)."""
    bc = b * c
    flat = bc <= eps
    return torch.div(a, bc.clamp_min_(eps), out=bc).masked_fill_(flat, 0.0)


def local_cc_gradients(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    radius: int = 2,
    eps: float = 1e-5,
    exact: bool = True,
    wrt_fixed: bool = False,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The measure and its gradients w.r.t. each voxel of ``moving`` (and of ``fixed``).

    Args:
        fixed, moving: ``(N, C, *spatial)``, same shape.
        mask: weights broadcastable to ``(N, 1, *spatial)`` (not differentiated).
        radius: window half-size in voxels (window ``2 r + 1``; ANTs' ``CC[..., r]``).
        eps: windows with ``b c <= eps`` count as uncorrelated (see the module doc).
        exact: the exact gradient (two passes of window sums), or the centred-window
            approximation (see the module doc).
        wrt_fixed: also return ``d/d fixed``.
        per_sample: the value of each batch element on its own, ``(N,)`` (its mean over its
            channels and voxels); the gradients are then those of each element's own value.

    Returns:
        ``(value, d value / d moving, d value / d fixed or None)``: a 0-dim tensor (``(N,)`` with
        ``per_sample``) and tensors shaped like the images (no autograd graph).
    """
    ndim = _check(fixed, moving, radius)
    with torch.no_grad():
        weight = prepare_mask(mask, fixed)
        n, mu_i, mu_j, a, b, c = _moments(fixed, moving, radius, ndim)
        t = _ratio(a, b, c, eps)
        w = _weights(weight, fixed, per_sample)
        if per_sample:  # each element's weights sum to 1 over its channels: its own mean
            value = _per_sample_sum(a * t * w)
        else:
            value = (a * t * w).sum()
        alpha = 2 * t * w
        beta_j = alpha * t * b
        beta_i = alpha * t * c if wrt_fixed else None
        if not exact:
            g_i = (moving - mu_j).mul_(alpha).sub_((fixed - mu_i).mul_(beta_i)) if wrt_fixed else None
            g_j = (fixed - mu_i).mul_(alpha).sub_((moving - mu_j).mul_(beta_j))
            return value, g_j, g_i
        alpha, beta_j = alpha / n, beta_j / n
        chans = [alpha, alpha * mu_i, beta_j, beta_j * mu_j]
        if wrt_fixed:
            beta_i = beta_i / n
            chans += [alpha * mu_j, beta_i, beta_i * mu_i]
        s = window_sum(torch.stack(chans), radius, ndim)
        g_j = fixed * s[0] - s[1] - moving * s[2] + s[3]
        g_i = moving * s[0] - s[4] - fixed * s[5] + s[6] if wrt_fixed else None
    return value, g_j, g_i


class _LocalCC(torch.autograd.Function):
    """``local_cc`` with its analytic backward (no autograd graph through the window sums)."""

    @staticmethod
    def forward(ctx, fixed: Tensor, moving: Tensor, mask: Optional[Tensor], radius: int, eps: float, exact: bool,  # type: ignore[override]
                per_sample: bool = False):
        need_fixed = ctx.needs_input_grad[0]
        need_mask = mask is not None and ctx.needs_input_grad[2]
        if need_mask and per_sample:
            raise InputError("local_cc: per_sample values with a differentiated mask are not supported")
        value, g_j, g_i = local_cc_gradients(fixed, moving, mask, radius, eps, exact, wrt_fixed=need_fixed,
                                             per_sample=per_sample)
        empty = g_j.new_empty(0)
        g_w = empty
        if need_mask:  # value = sum_c w_c cc_c / sum_c w_c per element: d/dw_c = (cc_c - value_e) / sum w
            with torch.no_grad():
                ndim = fixed.dim() - 2
                weight = prepare_mask(mask, fixed)
                _, _, _, a, b, c = _moments(fixed, moving, radius, ndim)
                cc = a * _ratio(a, b, c, eps)
                dims = tuple(range(2, fixed.dim()))
                total = weight.sum(dim=dims, keepdim=True)
                per = (cc * weight).sum(dim=dims, keepdim=True) / total
                g_w = ((cc - per) / total).mean(dim=1, keepdim=True) / fixed.shape[0]
        ctx.save_for_backward(g_j, g_i if g_i is not None else empty, g_w)
        ctx.need_fixed, ctx.need_mask, ctx.mask_shape = need_fixed, need_mask, None if mask is None else mask.shape
        ctx.per_sample = per_sample
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        g_j, g_i, g_w = ctx.saved_tensors
        if ctx.per_sample:  # one upstream gradient per batch element
            grad = grad.reshape(-1, *([1] * (g_j.dim() - 1)))
        d_mask = None
        if ctx.need_mask:
            d_mask = (g_w * grad).sum_to_size(ctx.mask_shape) if g_w.shape != ctx.mask_shape else g_w * grad
        return (g_i * grad if ctx.need_fixed else None), g_j * grad, d_mask, None, None, None, None


def local_cc(
    fixed: Tensor,
    moving: Tensor,
    mask: Optional[Tensor] = None,
    radius: int = 2,
    eps: float = 1e-5,
    exact: bool = True,
    per_sample: bool = False,
) -> Tensor:
    """Mean local squared correlation (ANTs ``CC``), in ``[0, 1]``; 1 for ``moving = a fixed + b``
    on textured images. Differentiable w.r.t. both images by an analytic backward (the gradient
    is computed with the value, so call it under autograd only when a gradient is wanted).

    Args:
        fixed, moving: ``(N, C, *spatial)``, 2D or 3D, same shape.
        mask: weights broadcastable to ``(N, 1, *spatial)``.
        radius: window half-size in voxels (window ``2 radius + 1``).
        eps: flat-window threshold on ``b c`` (see the module doc).
        exact: exact gradient, or the centred-window approximation.
        per_sample: return each batch element's own value, ``(N,)``, instead of their mean.
    """
    needs = fixed.requires_grad or moving.requires_grad or (mask is not None and mask.requires_grad)
    if not needs or not torch.is_grad_enabled():
        ndim = _check(fixed, moving, radius)
        weight = prepare_mask(mask, fixed)
        _, _, _, a, b, c = _moments(fixed, moving, radius, ndim)
        terms = a * _ratio(a, b, c, eps) * _weights(weight, fixed, per_sample)
        if per_sample:
            return _per_sample_sum(terms)
        return terms.sum()
    return _LocalCC.apply(fixed, moving, mask, int(radius), float(eps), bool(exact), bool(per_sample))
