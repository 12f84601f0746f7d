"""Operations on dense displacement fields: world-space gradients, composition, inversion.

A field ``u`` is a tensor ``(D, *grid.shape)`` of world displacements in mm, components ``(x, y[, z])``
(see :mod:`regcore.grid`); the map it stands for is ``x -> x + u(x)``. Fields on the levels of a
pyramid share their box (:meth:`Grid.downsample` keeps the first and last voxel centres), so
moving a field between levels is an ``align_corners=True`` interpolation (:func:`resize_field`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .grid import Grid
from .image import Image
from .sampling import sample_normalized, sample_world
from .slabs import slab_ranges, worth_slabs

__all__ = [
    "axis_gradient",
    "to_world",
    "to_axes",
    "world_gradient",
    "compose_first_order",
    "invert_displacement",
    "invert_onto",
    "resize_field",
    "FieldSampler",
]


def _signed_permutation(grid: Grid) -> list[tuple[int, float]] | None:
    """For a direction matrix whose columns are +-unit vectors (axis-aligned scans, in any axis
    order): ``[(index axis, sign)]`` per world component; None for an oblique direction."""
    d = grid.direction_matrix
    out = []
    for i in range(grid.ndim):
        j = int(np.argmax(np.abs(d[i])))
        if abs(abs(d[i, j]) - 1.0) > 1e-9:
            return None
        out.append((j, float(np.sign(d[i, j]))))
    return out


def _component_dim(x: torch.Tensor, grid: Grid) -> int:
    """The dim of a field's components: fields are ``(D, *shape)`` or batched ``(..., D, *shape)``."""
    return x.dim() - grid.ndim - 1


def to_world(axes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Vectors given along the index axes ``(..., D, *shape)`` (``(x, y[, z])`` index order, per mm)
    as world components: ``R @ axes`` with ``R`` the direction matrix."""
    c = _component_dim(axes, grid)
    perm = _signed_permutation(grid)
    if perm is not None:
        if all(j == i and s > 0 for i, (j, s) in enumerate(perm)):
            return axes
        return torch.stack([axes.select(c, j) if s > 0 else -axes.select(c, j) for j, s in perm], c)
    rot = grid.direction_matrix
    return torch.stack([sum(float(rot[i, j]) * axes.select(c, j) for j in range(grid.ndim)) for i in range(grid.ndim)], c)


def to_axes(world: torch.Tensor, grid: Grid) -> torch.Tensor:
    """World vectors ``(..., D, *shape)`` expressed along the index axes: ``R^T @ world``."""
    c = _component_dim(world, grid)
    perm = _signed_permutation(grid)
    if perm is not None:
        out: list[torch.Tensor | None] = [None] * grid.ndim
        for i, (j, s) in enumerate(perm):
            out[j] = world.select(c, i) if s > 0 else -world.select(c, i)
        return torch.stack(out, c)  # type: ignore[arg-type]
    rot = grid.direction_matrix
    return torch.stack([sum(float(rot[i, j]) * world.select(c, i) for i in range(grid.ndim)) for j in range(grid.ndim)], c)


def axis_gradient(data: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Derivatives of a scalar image ``(..., *grid.shape)`` along its index axes, per mm:
    ``(..., D, *shape)``, ``(d/di_x, d/di_y[, d/di_z]) / spacing``. Central differences, one-sided at
    the ends."""
    nd = grid.ndim
    first = data.dim() - nd
    spacing = tuple(reversed(grid.spacing))  # tensor dim order
    parts = torch.gradient(data, spacing=spacing, dim=tuple(range(first, data.dim())))
    return torch.stack(tuple(reversed(parts)), first)


def world_gradient(data: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Spatial gradient of a scalar image ``(..., *grid.shape)`` with respect to world coordinates:
    ``(..., D, *grid.shape)``, components ``(d/dx, d/dy[, d/dz])`` in units per mm.

    Central differences along the index axes (one-sided at the ends), divided by the spacing,
    then rotated by the direction matrix (``grad_world = R grad_axes``, ``R`` orthonormal).
    """
    return to_world(axis_gradient(data, grid), grid)


def _central_difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x[i+1] - x[i-1]`` along ``dim`` (twice the one-sided difference at the two ends)."""
    n = x.shape[dim]
    out = torch.empty_like(x)
    if n < 2:
        return out.zero_()
    torch.sub(x.narrow(dim, 2, n - 2), x.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    out.narrow(dim, 0, 1).copy_(x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)).mul_(2)
    out.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1)).mul_(2)
    return out


def compose_first_order(u: torch.Tensor, step: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The displacement of ``(id + u) o (id + step)`` to first order in ``step``:
    ``step(x) + u(x) + (grad u)(x) step(x)``, both ``(D, *grid.shape)`` mm (or batched alike,
    ``(..., D, *grid.shape)``).

    Exact to ``O(|step|^2 |grad^2 u|)``: for the sub-voxel updates of a greedy optimiser this
    matches resampling ``u`` at ``x + step`` (:func:`regcore.transforms.deformable.compose_displacements`)
    at a fraction of the cost (finite differences instead of a trilinear gather). The derivative
    along ``step`` is taken along the index axes, ``(grad_world u) step = (grad_axes u) (R^T step)``,
    by central differences (one-sided at the ends).
    """
    c = _component_dim(u, grid)
    along = to_axes(step, grid)
    out = u + step
    if grid.ndim == 3 and worth_slabs(u):  # the same terms in the same order, slab by slab
        for axes, across in (((0, 1), u.dim() - 3), ((2,), u.dim() - 2)):  # x and y across z, then z across y
            for start, width in slab_ranges(u, across):
                _add_derivative_terms(out.narrow(across, start, width), u.narrow(across, start, width),
                                      along.narrow(across, start, width), c, axes, grid.spacing)
        return out
    _add_derivative_terms(out, u, along, c, range(grid.ndim), grid.spacing)
    return out


def _add_derivative_terms(out: torch.Tensor, u: torch.Tensor, along: torch.Tensor, c: int, axes, spacing) -> None:
    """``out += (d u / d axis_k) along_k`` for the index axes ``k`` in ``axes`` (axis k is the k-th
    tensor dim from the end; central differences, one-sided at the ends)."""
    for k in axes:
        weight = along.select(c, k).unsqueeze(c) * (0.5 / spacing[k])
        out.addcmul_(_central_difference(u, u.dim() - 1 - k), weight)


class FieldSampler:
    """Samples fields ``(C, *source.shape)`` at ``x + u(x)`` for the voxel centres ``x`` of a
    ``target`` grid, through an optional linear world map applied after the displacement:
    ``y = M (x + u(x))`` (so a moving image behind an affine stage is sampled in one pass).

    The normalised coordinates are ``L u`` plus the voxel centres' own coordinates, which are
    affine in the index and kept as one small ramp per axis (:meth:`Grid.index_ramps`), not as a
    dense ``(*target.shape, D)`` array (85 MB for a 1 mm brain).
    """

    def __init__(self, source: Grid, target: Grid, matrix: torch.Tensor | np.ndarray | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        w2n = torch.as_tensor(source.world_to_normalized(), dtype=torch.float64, device=device)
        if matrix is not None:
            w2n = w2n @ torch.as_tensor(matrix, dtype=torch.float64, device=device)
        d = source.ndim
        self.ndim = d
        self.shape = tuple(target.shape)
        self.linear = w2n[:d, :d].tolist()
        index_to_world = torch.as_tensor(target.index_to_world(), dtype=torch.float64, device=device)
        self.ramps = target.index_ramps(w2n @ index_to_world, device, dtype)

    def coords(self, u: torch.Tensor | None) -> torch.Tensor:
        """Normalised source coordinates ``(*target.shape, D)`` of ``M (x + u(x))`` (a new tensor)."""
        ramp = self.ramps[0]
        out = torch.zeros((*self.shape, self.ndim), dtype=ramp.dtype, device=ramp.device)
        if u is not None:
            for i in range(self.ndim):
                for j in range(self.ndim):
                    coef = self.linear[i][j]
                    if coef != 0.0:
                        out[..., i].add_(u[j], alpha=coef)
        for ramp in self.ramps:
            out.add_(ramp)
        return out

    def sample(self, data: torch.Tensor, u: torch.Tensor | None, padding: str = "zeros",
               mode: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
        """``(data at M (x + u(x)), normalised coords)``: ``(C, *target.shape)`` and
        ``(*target.shape, D)``."""
        coords = self.coords(u)
        return sample_normalized(data, coords, mode, padding), coords


def invert_displacement(u: torch.Tensor, grid: Grid, iterations: int = 20, tol_vox: float = 0.001,
                        initial: torch.Tensor | None = None, coarse_start: bool = True) -> torch.Tensor:
    """The inverse field ``v`` of ``u`` on the same grid: ``v(y) = -u(y + v(y))``, so that
    ``(id + u) o (id + v) = id`` (mm); border-clamped outside the grid.

    Fixed-point iteration ``v <- -u(y + v)`` (at most ``iterations``), then Newton's method on
    the voxels it left with a residual ``|v + u(y + v)|`` above ``tol_vox`` voxels (see
    :func:`_fixed_point_then_newton`). The fixed point alone diverges where the map stretches by
    more than 2 along some direction (``|grad u| > 1``) even though it is invertible there: such
    voxels of a SyN half map kept residuals of several mm and made the composed map fold.
    The starting guess is ``initial`` if given; else, with ``coarse_start`` on a grid of at least
    32 voxels per axis, the inverse computed on the grid downsampled by 2 (recursively), so that
    most iterations run on an eighth of the voxels; else ``-u``.
    """
    given = initial is not None
    if not given and coarse_start and min(grid.size) >= 32:
        coarse = grid.downsample(2)
        initial = resize_field(invert_displacement(resize_field(u, grid, coarse), coarse, iterations, tol_vox), coarse, grid)
    return _fixed_point_then_newton(u, grid, grid, -u if initial is None else initial, iterations, tol_vox,
                                    owned=not given)


def invert_onto(u: torch.Tensor, source: Grid, target: Grid, iterations: int = 50,
                tol_vox: float = 0.001) -> torch.Tensor:
    """The inverse of ``T(x) = x + u(x)`` (``u`` on ``source``, mm) as a field on another grid:
    ``w(y) = -u(y + w(y))`` for the voxel centres ``y`` of ``target``, so ``T(y + w(y)) = y``.

    This is how a registration's backward field (fixed grid, fixed -> moving) becomes the
    moving -> fixed transform on the moving grid (what resampling the fixed image onto the
    moving image needs). Fixed-point iteration from ``-u(y)``, then Newton's method where it
    leaves a residual above ``tol_vox`` voxels of ``target`` (:func:`_fixed_point_then_newton`).
    Where ``y + w(y)`` leaves ``source`` the field is clamped (no inverse is known there).
    Returns ``(D, *target.shape)``.
    """
    start = -FieldSampler(source, target, device=u.device, dtype=u.dtype).sample(u, None, padding="border")[0]
    return _fixed_point_then_newton(u, source, target, start, iterations, tol_vox, owned=True)


def _fixed_point_then_newton(u: torch.Tensor, source: Grid, target: Grid, w: torch.Tensor, iterations: int,
                             tol_vox: float, newton_share: float = 0.05, newton_iterations: int = 30,
                             newton_chunk: int = 1 << 16, owned: bool = False) -> torch.Tensor:
    """Solve ``w(y) + u(y + w(y)) = 0`` at the voxel centres ``y`` of ``target`` (``u`` on
    ``source``, ``w`` the start, both mm): the inverse of ``id + u`` as a field on ``target``.

    Fixed-point steps ``w <- -u(y + w)`` run until at most ``newton_share`` of the voxels keep a
    residual ``|w + u(y + w)|`` above ``tol_vox`` voxels of ``target`` (or ``iterations`` have
    run); each step's change is the residual of the field it started from, so the test costs no
    extra sampling. The voxels still above the tolerance then take Newton steps
    (:func:`_newton_inverse_at_points`): a few steps where the fixed point converges slowly or
    not at all (a map that stretches by more than 2 along some direction), and cheap because
    they are few; ``newton_chunk`` points at a time (about 20 MB for the default, float32), so
    memory stays bounded however many are left. ``owned``: ``w`` may be written to (else the caller's
    start is left as it was). The result is differentiable in ``u`` through the steps taken;
    a smaller ``tol_vox`` gives a more accurate gradient. Returns ``(D, *target.shape)``.
    """
    sampler = FieldSampler(source, target, device=u.device, dtype=u.dtype)
    tol = tol_vox * min(target.spacing)
    limit = newton_share * target.numel
    w = w.to(u.dtype)
    for it in range(iterations + 1):
        new = sampler.sample(u, w, padding="border")[0].neg_()
        step = new - w  # minus the residual of w
        above = step.square_().sum(0) > tol * tol
        del step
        count = int(above.sum())
        if count == 0:
            return w if owned else w.clone()  # never the caller's own tensor
        if count <= limit or it == iterations:
            break
        w, owned = new, True
    del new
    points = target.index_points_to_world(above.nonzero().flip(-1)).to(u.dtype)  # nonzero: (z, y, x) order
    start = torch.movedim(w, 0, -1)[above]
    polished = torch.cat([_newton_inverse_at_points(u, source, points[i:i + newton_chunk], start[i:i + newton_chunk],
                                                    tol, newton_iterations) for i in range(0, len(points), newton_chunk)])
    if not owned or w.requires_grad:
        w = w.clone()
    torch.movedim(w, 0, -1)[above] = polished
    return w


def _newton_inverse_at_points(u: torch.Tensor, source: Grid, points: torch.Tensor, w: torch.Tensor,
                              tol_mm: float, iterations: int) -> torch.Tensor:
    """Newton's method for ``r(w) = w + u(p + w) = 0`` at ``N`` world points ``p`` ``(N, D)``
    (mm), from ``w`` ``(N, D)`` mm, in ``u``'s dtype; ``u`` ``(D, *source.shape)`` mm is
    interpolated linearly, border-clamped.

    The Jacobian ``I + grad u`` is taken by central differences of the interpolated ``u`` half a
    voxel either side along each world axis. Each point has its own trust region: a step is at
    most ``radius`` long (one voxel at first); a step that lowers the residual is taken and
    doubles the radius (up to 64 voxels, so a start tens of mm from the root is reached in a
    few steps), one that does not is refused and halves it. A point stops once within
    ``tol_mm`` or when its radius falls below a thousandth of a voxel, so the points do not
    depend on each other and only the unfinished ones are computed. Returns ``(N, D)``.
    """
    d, dev, dtype = source.ndim, u.device, u.dtype
    field = Image(u, source)
    voxel = min(source.spacing)
    offsets = torch.eye(d, dtype=dtype, device=dev) * (0.5 * voxel)
    eye = torch.eye(d, dtype=dtype, device=dev)

    def sample(at: torch.Tensor) -> torch.Tensor:  # (..., D) world -> (..., D) displacement
        return torch.movedim(sample_world(field, at, "linear", "border"), 0, -1)

    points = points.to(dtype)
    w = w.to(dtype).clone()
    r = w + sample(points + w)
    norm = r.norm(dim=-1)
    radius = torch.full_like(norm, voxel)
    active = (norm > tol_mm).nonzero().flatten()
    for _ in range(iterations):
        if active.numel() == 0:
            break
        p, wa, ra, na, rad = points[active], w[active], r[active], norm[active], radius[active]
        x = p + wa
        around = x[:, None, :] + torch.stack([offsets, -offsets])[:, None]  # (2, n, D, D): +-h along axis j
        values = sample(around.reshape(2, -1, d)).reshape(2, -1, d, d)  # [side, n, j, i]
        jac = eye + ((values[0] - values[1]) / voxel).transpose(-1, -2)  # [n, i, j] = d u_i / d x_j
        delta, info = torch.linalg.solve_ex(jac, ra[..., None])
        delta = delta[..., 0]
        delta = torch.where(((info == 0)[:, None]) & torch.isfinite(delta), delta, ra)
        delta = delta * (rad / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)[:, None]
        trial = wa - delta
        rt = trial + sample(p + trial)
        nt = rt.norm(dim=-1)
        better = nt < na
        w[active] = torch.where(better[:, None], trial, wa)
        r[active] = torch.where(better[:, None], rt, ra)
        norm[active] = torch.where(better, nt, na)
        radius[active] = torch.where(better, (rad * 2).clamp(max=64 * voxel), rad * 0.5)
        active = active[(norm[active] > tol_mm) & (radius[active] > 1e-3 * voxel)]
    return w


def resize_field(u: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A field on ``source`` moved to ``target`` (mm stay mm). Grids of one pyramid (same box and
    direction) use ``align_corners=True`` interpolation; other grids a linear, border-clamped
    resampling at ``target``'s voxel centres."""
    if target.same_as(source):
        return u
    same_box = np.allclose(source.origin, target.origin, atol=1e-4) and np.allclose(
        source.direction, target.direction, atol=1e-6) and np.allclose(source.extent(), target.extent(), atol=1e-4)
    if same_box:
        mode = "bilinear" if u.dim() == 3 else "trilinear"
        return F.interpolate(u[None], size=target.shape, mode=mode, align_corners=True)[0]
    sampler = FieldSampler(source, target, device=u.device, dtype=u.dtype)
    return sampler.sample(u, None, padding="border")[0]
