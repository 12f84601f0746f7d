r"""Regularisers of displacement (or velocity) fields, as pure differentiable functions.

Conventions shared by every function in this module (see :mod:`regcore.grid`):

* A field ``u`` is a tensor ``(N, D, *spatial)`` with ``D = 2`` (spatial ``(Y, X)``) or ``D = 3``
  (spatial ``(Z, Y, X)``). Its channels are the *world* components ``(x, y[, z])`` in mm, i.e.
  in the reverse order of the spatial tensor dims. Any floating dtype, any device; every helper
  tensor is created on ``u``'s device with ``u``'s dtype.
* ``spacing`` is the voxel size in mm in ITK ``(x, y[, z])`` order (a scalar is used for every
  axis); default all ones. Index axis ``k`` (``x = 0, y = 1, z = 2``) is tensor dim
  ``2 + (D - 1 - k)``.
* ``direction`` (only where the measure depends on it) is the ``D x D`` matrix, row-major
  (nested sequence, numpy array, tensor or a flat sequence of ``D * D`` values), whose *columns*
  are the world directions of the index axes; default identity. It is treated as a constant
  (no gradient flows into it).
* ``mask`` is an optional float weight tensor broadcastable to ``(N, 1, *spatial)``, values in
  ``[0, 1]``. It only weights the average: derivatives are always computed on the full field.
  Each batch element must have a positive total weight, otherwise
  :class:`~regcore.errors.InputError` (a :class:`ValueError`) is raised.
* Every regulariser returns a 0-dim tensor: a per-voxel quantity (summed over components and
  derivative directions) averaged over the voxels of each batch element (mask-weighted), then
  averaged over the batch.

Finite-difference schemes (exact, to rounding, for every affine field *everywhere*, borders
included; the second derivatives are also exact for every quadratic field everywhere):

* First derivative along an index axis: central difference ``(u[i+1] - u[i-1]) / 2`` in the
  interior, first-order one-sided difference at the two ends (as ``numpy.gradient`` with
  ``edge_order=1`` and :func:`regcore.losses.functional.spatial_gradient`), divided by the
  spacing of that axis. An axis of size 1 has zero derivative.
* Pure second derivative along an axis: compact ``u[i+1] - 2 u[i] + u[i-1]`` divided by the
  squared spacing in the interior; each end voxel takes the value of its neighbour (i.e. the
  one-sided ``u[0] - 2 u[1] + u[2]``). Zero along an axis with fewer than 3 voxels.
* Mixed second derivative ``d^2 / d xi_j d xi_k`` (``j != k``): the first-derivative operator
  along ``j`` applied to the first derivative along ``k`` (the two commute).

Here ``xi_k`` is the physical distance (mm) along index axis ``k``. Derivatives w.r.t. world
coordinates are ``du/dx = (du/d index) @ inv(direction @ diag(spacing))
= (du/d xi) @ inv(direction)``. :func:`diffusion`, :func:`total_variation` and
:func:`bending_energy` are invariant under an orthonormal change of coordinates, so they are
computed from the ``xi`` derivatives and need no ``direction`` (they equal their world-coordinate
values whenever ``direction`` is orthonormal, which it is for every real image).
:func:`total_variation_anisotropic` is not rotation invariant and is defined on the ``xi``
derivatives. :func:`spatial_jacobian`, :func:`jacobian_determinant`, :func:`jacobian_stats`
and :func:`folding_penalty` use the full world Jacobian (any invertible ``direction``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from regcore.errors import InputError
from regcore.masks import prepare_mask

__all__ = [
    "spatial_jacobian",
    "jacobian_determinant",
    "jacobian_stats",
    "diffusion",
    "total_variation",
    "total_variation_anisotropic",
    "sparsity",
    "bending_energy",
    "folding_penalty",
]

FloatOrSeq = Union[float, Sequence[float], Tensor]
MatrixLike = Union[Sequence[Sequence[float]], Sequence[float], np.ndarray, Tensor]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_field(u: Tensor, name: str = "u") -> int:
    """Validate a field ``(N, D, *spatial)`` and return ``D``."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {u.dtype}")
    if u.dim() not in (4, 5):
        raise InputError(
            f"{name} must have shape (N, D, *spatial) with D = 2 or 3 spatial dims, "
            f"got shape {tuple(u.shape)}"
        )
    ndim = u.dim() - 2
    if u.shape[1] != ndim:
        raise InputError(
            f"{name} has {u.shape[1]} channels but {ndim} spatial dims; a {ndim}D field needs "
            f"{ndim} channels (x, y[, z] components), got shape {tuple(u.shape)}"
        )
    return ndim


def _spacing(spacing: Optional[FloatOrSeq], ndim: int) -> tuple[float, ...]:
    """Spacing in (x, y, z) order as floats, validated."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, Tensor):
        spacing = spacing.detach().cpu().reshape(-1).tolist()
        if len(spacing) == 1:
            spacing = spacing[0]
    if isinstance(spacing, (int, float)):
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise InputError(f"spacing must be a scalar or have {ndim} entries, got {values}")
    if any(not (s > 0 and math.isfinite(s)) for s in values):
        raise InputError(f"spacing must be positive and finite, got {values}")
    return values


def _direction(direction: Optional[MatrixLike], ndim: int) -> Optional[np.ndarray]:
    """``D x D`` float64 direction matrix, or ``None`` for the identity."""
    if direction is None:
        return None
    if isinstance(direction, Tensor):
        direction = direction.detach().cpu().double().numpy()
    mat = np.asarray(direction, dtype=np.float64)
    if mat.size != ndim * ndim:
        raise InputError(
            f"direction must be a {ndim} x {ndim} matrix, got {mat.size} values "
            f"(shape {mat.shape})"
        )
    mat = mat.reshape(ndim, ndim)
    if not np.all(np.isfinite(mat)) or abs(np.linalg.det(mat)) < 1e-6:
        raise InputError(f"direction must be an invertible matrix, got {mat.tolist()}")
    return mat


def _prepare_mask(mask: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """Broadcast ``mask`` to ``(N, *spatial)`` on ``like``'s device/dtype and validate it."""
    weight = prepare_mask(mask, like)
    return None if weight is None else weight[:, 0]


def _weighted_mean(values: Tensor, weight: Optional[Tensor]) -> Tensor:
    """Mean over the voxels of each batch element (weighted), then over the batch.

    Args:
        values: ``(N, *spatial)``.
        weight: ``(N, *spatial)`` non-negative weights or ``None``.

    Returns:
        0-dim tensor.
    """
    if weight is None:
        return values.mean()
    num = (values * weight).flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    return (num / den).mean()


# --------------------------------------------------------------------------------------------
# finite differences
# --------------------------------------------------------------------------------------------


def _diff1(x: Tensor, dim: int) -> Tensor:
    """First difference along ``dim`` per voxel: central inside, one-sided at the ends (voxel
    units). Zero for an axis of size 1."""
    size = x.shape[dim]
    if size < 2:
        return torch.zeros_like(x)
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    last = x.narrow(dim, size - 1, 1) - x.narrow(dim, size - 2, 1)
    if size == 2:
        return torch.cat([first, last], dim=dim)
    interior = (x.narrow(dim, 2, size - 2) - x.narrow(dim, 0, size - 2)) * 0.5
    return torch.cat([first, interior, last], dim=dim)


def _diff2(x: Tensor, dim: int) -> Tensor:
    """Second difference along ``dim`` per voxel: ``x[i+1] - 2 x[i] + x[i-1]`` inside, the end
    voxels copy their neighbour's value (voxel units). Zero for fewer than 3 voxels."""
    size = x.shape[dim]
    if size < 3:
        return torch.zeros_like(x)
    inner = x.narrow(dim, 2, size - 2) - 2 * x.narrow(dim, 1, size - 2) + x.narrow(dim, 0, size - 2)
    return torch.cat([inner.narrow(dim, 0, 1), inner, inner.narrow(dim, size - 3, 1)], dim=dim)


def _axis_dim(u: Tensor, axis: int) -> int:
    """Tensor dim of index axis ``axis`` (x = 0, y = 1, z = 2)."""
    return u.dim() - 1 - axis


def _physical_gradient(u: Tensor, sp: Sequence[float]) -> Tensor:
    """``du_i / d xi_k`` (xi_k: mm along index axis k), shape ``(N, D, D, *spatial)``:
    dim 1 the component ``i``, dim 2 the index axis ``k`` in (x, y, z) order."""
    ndim = len(sp)
    return torch.stack(
        [_diff1(u, _axis_dim(u, k)) / sp[k] for k in range(ndim)], dim=2
    )


# --------------------------------------------------------------------------------------------
# Jacobians
# --------------------------------------------------------------------------------------------


def spatial_jacobian(
    u: Tensor, spacing: Optional[FloatOrSeq] = None, direction: Optional[MatrixLike] = None
) -> Tensor:
    """Jacobian of the field w.r.t. world coordinates.

    Args:
        u: Field ``(N, D, *spatial)``, components ``(x, y[, z])`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        direction: ``D x D`` direction matrix (columns = world directions of the index axes).

    Returns:
        ``(N, *spatial, D, D)`` with ``J[..., i, j] = d u_i / d x_j`` (dimensionless, mm/mm),
        ``x_j`` the world coordinate ``j``. Exact for affine fields at every voxel.
    """
    ndim = _check_field(u)
    sp = _spacing(spacing, ndim)
    mat = _direction(direction, ndim)
    grad = _physical_gradient(u, sp)  # (N, i, k, *spatial)
    perm = (0, *range(3, 3 + ndim), 1, 2)
    jac = grad.permute(perm)  # (N, *spatial, i, k)
    if mat is None:
        return jac.contiguous()
    inv = torch.as_tensor(np.linalg.inv(mat), dtype=u.dtype, device=u.device)
    return jac @ inv


def _determinant(mat: Tensor) -> Tensor:
    """Determinant of ``(..., D, D)`` matrices, D = 2 or 3, by explicit cofactor formulas
    (any dtype, differentiable)."""
    if mat.shape[-1] == 2:
        return mat[..., 0, 0] * mat[..., 1, 1] - mat[..., 0, 1] * mat[..., 1, 0]
    a, b, c = mat[..., 0, 0], mat[..., 0, 1], mat[..., 0, 2]
    d, e, f = mat[..., 1, 0], mat[..., 1, 1], mat[..., 1, 2]
    g, h, i = mat[..., 2, 0], mat[..., 2, 1], mat[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_determinant(
    u: Tensor, spacing: Optional[FloatOrSeq] = None, direction: Optional[MatrixLike] = None
) -> Tensor:
    """Jacobian determinant ``det(I + du/dx)`` of the map ``x -> x + u(x)``.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        direction: ``D x D`` direction matrix.

    Returns:
        ``(N, *spatial)``, dimensionless: 1 for the identity (``u = 0``), ``<= 0`` where the map
        folds, the local volume ratio otherwise.
    """
    jac = spatial_jacobian(u, spacing, direction)
    ndim = jac.shape[-1]
    eye = torch.eye(ndim, dtype=jac.dtype, device=jac.device)
    return _determinant(jac + eye)


def jacobian_stats(
    u: Tensor,
    spacing: Optional[FloatOrSeq] = None,
    direction: Optional[MatrixLike] = None,
    mask: Optional[Tensor] = None,
) -> dict[str, float]:
    """Summary statistics of :func:`jacobian_determinant` (no gradient).

    Voxels of all batch elements are pooled. With a ``mask``, ``min``/``max`` are taken over the
    voxels of positive weight and the other statistics are weighted by it.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        direction: ``D x D`` direction matrix.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

    Returns:
        Dict of Python floats: ``min``, ``max``, ``mean`` of the determinant;
        ``fraction_nonpositive``, the (weighted) fraction of voxels with ``det <= 0``;
        ``std_log``, the (weighted, population) standard deviation of ``log det`` over the
        voxels with ``det > 0`` (``nan`` if there are none).
    """
    with torch.no_grad():
        det = jacobian_determinant(u.detach(), spacing, direction).to(torch.float64)
        weight = _prepare_mask(mask, u)
        if weight is None:
            w = torch.ones_like(det)
        else:
            w = weight.detach().to(torch.float64)
        det = det.flatten()
        w = w.flatten()
        sel = w > 0
        d_sel = det[sel]
        w_sel = w[sel]
        total = w_sel.sum()
        positive = d_sel > 0
        stats = {
            "min": float(d_sel.min()),
            "max": float(d_sel.max()),
            "mean": float((d_sel * w_sel).sum() / total),
            "fraction_nonpositive": float(w_sel[~positive].sum() / total),
        }
        if bool(positive.any()):
            logs = torch.log(d_sel[positive])
            wp = w_sel[positive]
            mean_log = (logs * wp).sum() / wp.sum()
            var_log = ((logs - mean_log).square() * wp).sum() / wp.sum()
            stats["std_log"] = float(torch.sqrt(var_log))
        else:
            stats["std_log"] = math.nan
    return stats


# --------------------------------------------------------------------------------------------
# regularisers
# --------------------------------------------------------------------------------------------


def diffusion(
    u: Tensor, spacing: Optional[FloatOrSeq] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """Diffusion (membrane) energy: mean of ``sum_{i,j} (du_i / dx_j)^2``.

    Computed from the derivatives along the index axes in mm; the squared Frobenius norm of the
    Jacobian is rotation invariant, so this equals the world-coordinate value for any orthonormal
    direction matrix. For ``u(x) = A x + b`` it is exactly ``||A||_F^2``.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

    Returns:
        0-dim tensor (dimensionless, (mm/mm)^2); scales as ``1 / spacing^2``.
    """
    ndim = _check_field(u)
    weight = _prepare_mask(mask, u)
    grad = _physical_gradient(u, _spacing(spacing, ndim))
    return _weighted_mean(grad.square().sum(dim=(1, 2)), weight)


def total_variation(
    u: Tensor,
    spacing: Optional[FloatOrSeq] = None,
    mask: Optional[Tensor] = None,
    eps: float = 1e-6,
) -> Tensor:
    """Isotropic (vectorial) total variation: mean of ``sqrt(sum_{i,j} (du_i/dx_j)^2 + eps^2)``.

    The Frobenius norm of the whole Jacobian is taken at each voxel (one square root per voxel,
    coupling the components; rotation invariant, so computed from the index-axis derivatives in
    mm). ``eps`` (mm/mm) makes it differentiable at zero gradient: a constant field gives
    ``eps``.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.
        eps: Smoothing constant (``>= 0``).

    Returns:
        0-dim tensor (dimensionless); scales as ``1 / spacing`` when ``eps`` is negligible.
    """
    ndim = _check_field(u)
    if not eps >= 0:
        raise InputError(f"eps must be non-negative, got {eps}")
    weight = _prepare_mask(mask, u)
    grad = _physical_gradient(u, _spacing(spacing, ndim))
    return _weighted_mean(torch.sqrt(grad.square().sum(dim=(1, 2)) + eps * eps), weight)


def total_variation_anisotropic(
    u: Tensor, spacing: Optional[FloatOrSeq] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """Anisotropic total variation: mean of ``sum_{i,k} |du_i / d xi_k|``.

    ``xi_k`` is the distance in mm along index axis ``k``; ``u_i`` the world component ``i``.
    (Not rotation invariant; with an identity direction the ``xi`` are the world axes.)

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

    Returns:
        0-dim tensor (dimensionless); scales as ``1 / spacing``.
    """
    ndim = _check_field(u)
    weight = _prepare_mask(mask, u)
    grad = _physical_gradient(u, _spacing(spacing, ndim))
    return _weighted_mean(grad.abs().sum(dim=(1, 2)), weight)


def sparsity(u: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """L1 norm of the field: mean of ``sum_i |u_i|``.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

    Returns:
        0-dim tensor in mm.
    """
    _check_field(u)
    weight = _prepare_mask(mask, u)
    return _weighted_mean(u.abs().sum(dim=1), weight)


def bending_energy(
    u: Tensor, spacing: Optional[FloatOrSeq] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """Bending energy: mean of ``sum_i sum_{j,k} (d^2 u_i / dx_j dx_k)^2``.

    Mixed derivatives are counted twice (``j, k`` and ``k, j``). The schemes (module docstring)
    make it exactly 0 for affine fields and exactly the analytic value for quadratic fields, at
    every voxel including the borders. Computed along the index axes in mm; the Frobenius norm
    of the Hessian is rotation invariant, so this is the world value for an orthonormal
    direction matrix.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.

    Returns:
        0-dim tensor in mm^-2; scales as ``1 / spacing^4``.
    """
    ndim = _check_field(u)
    weight = _prepare_mask(mask, u)
    sp = _spacing(spacing, ndim)
    energy = torch.zeros_like(u[:, 0])
    first = [_diff1(u, _axis_dim(u, k)) / sp[k] for k in range(ndim)]
    for j in range(ndim):
        pure = _diff2(u, _axis_dim(u, j)) / (sp[j] * sp[j])
        energy = energy + pure.square().sum(dim=1)
        for k in range(j + 1, ndim):
            mixed = _diff1(first[k], _axis_dim(u, j)) / sp[j]
            energy = energy + 2 * mixed.square().sum(dim=1)
    return _weighted_mean(energy, weight)


def folding_penalty(
    u: Tensor,
    spacing: Optional[FloatOrSeq] = None,
    direction: Optional[MatrixLike] = None,
    mask: Optional[Tensor] = None,
    eps: float = 0.0,
) -> Tensor:
    """Folding penalty: mean of ``relu(eps - det(I + du/dx))^2``.

    Zero wherever the Jacobian determinant is at least ``eps``; grows quadratically below it.
    The square makes it continuously differentiable (its gradient vanishes at ``det = eps``).
    With the default ``eps = 0`` only negative determinants are penalised (``det = 0`` itself
    gives 0); use a small positive ``eps`` (e.g. 0.01) to also push away from ``det = 0``.

    Args:
        u: Field ``(N, D, *spatial)`` in mm.
        spacing: Voxel size in mm, ``(x, y[, z])`` order.
        direction: ``D x D`` direction matrix.
        mask: Optional weights broadcastable to ``(N, 1, *spatial)``.
        eps: Determinant threshold (dimensionless).

    Returns:
        0-dim tensor (dimensionless), 0 for the identity and for any field with ``det >= eps``.
    """
    det = jacobian_determinant(u, spacing, direction)
    weight = _prepare_mask(mask, u)
    return _weighted_mean(torch.relu(eps - det).square(), weight)
