"""The objective of one stage: weighted similarity terms plus weighted regularisers, and optimisers."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .config import OptimizerConfig, StageConfig
from .errors import InputError
from .grid import Grid
from .losses import build_loss
from .regularizers import build_regularizer
from .optimizers import OPTIMIZERS

__all__ = ["Objective", "build_optimizer", "OPTIMIZERS"]



class Objective(nn.Module):
    """``sum_i w_i * similarity_i(fixed, warped, mask) + sum_j l_j * regulariser_j(field)``.

    ``forward`` returns ``(total, {term name: value})``.
    """

    def __init__(self, terms: list[tuple[str, float, nn.Module]], regularizers: list[tuple[str, float, nn.Module]] = ()) -> None:
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([m for _, _, m in terms])
        self._takes_spacing = ["spacing" in inspect.signature(m.forward).parameters for m in self.terms]
        self.reg_names = [n for n, _, _ in regularizers]
        self.reg_weights = [float(w) for _, w, _ in regularizers]
        self.regularizers = nn.ModuleList([m for _, _, m in regularizers])

    @property
    def overlap_only(self) -> bool:
        """True when a similarity term is averaged over the overlap only (see
        :attr:`regcore.losses.modules.SimilarityLoss.overlap_only`): the level then masks out the
        fixed points that map outside the moving image; else every fixed point counts, the moving
        image border-replicated outside its box."""
        return any(getattr(term, "overlap_only", True) for term in self.terms)

    @property
    def has_regularizers(self) -> bool:
        return len(self.regularizers) > 0

    def similarity(
        self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None, spacing: tuple[float, ...]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = fixed.new_zeros(())
        parts: dict[str, float] = {}
        for name, weight, term, takes_spacing in zip(self.names, self.weights, self.terms, self._takes_spacing):
            value = term(fixed, warped, mask, spacing=spacing) if takes_spacing else term(fixed, warped, mask)
            parts[name] = float(value.detach())
            total = total + weight * value
        return total, parts

    def similarity_per_pair(
        self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None, spacing: tuple[float, ...]
    ) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """The similarity of each batch element (an independent pair) on its own: ``(N,)`` losses
        and one ``{term name: value}`` per element. ``fixed`` may have a batch of 1 (shared)."""
        n = warped.shape[0]
        if fixed.shape[0] != n:
            fixed = fixed.expand(n, *fixed.shape[1:])
        total = warped.new_zeros((n,))
        values: list[torch.Tensor] = []
        for weight, term, takes_spacing in zip(self.weights, self.terms, self._takes_spacing):
            value = term.per_sample(fixed, warped, mask, spacing=spacing) if takes_spacing else term.per_sample(fixed, warped, mask)
            values.append(value.detach())
            total = total + weight * value
        table = torch.stack(values, 1).tolist() if values else [[] for _ in range(n)]
        return total, [dict(zip(self.names, row)) for row in table]

    def regularization(self, field: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, dict[str, float]]:
        """Regularisers on ``field`` ``(D, *grid.shape)`` (mm), with the grid's spacing and direction."""
        total = field.new_zeros(())
        parts: dict[str, float] = {}
        direction = torch.as_tensor(grid.direction_matrix, dtype=field.dtype, device=field.device)
        for name, weight, reg in zip(self.reg_names, self.reg_weights, self.regularizers):
            value = reg(field[None], spacing=grid.spacing, direction=direction)
            parts[name] = float(value.detach())
            total = total + weight * value
        return total, parts

    def forward(
        self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None, spacing: tuple[float, ...]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.similarity(fixed, warped, mask, spacing)

    @classmethod
    def from_config(cls, stage: StageConfig, seed: int) -> "Objective":
        terms = []
        for term in stage.objective:
            params = dict(term.params)
            if term.measure in ("mi", "nmi"):
                params.setdefault("seed", seed)
            try:
                terms.append((term.measure, term.weight, build_loss(term.measure, **params)))
            except TypeError as exc:
                raise InputError(f"objective term {term.measure!r}: bad params {term.params} ({exc})") from exc
        regs = []
        for reg in stage.regularizers:
            try:
                regs.append((reg.name, reg.weight, build_regularizer(reg.name, **reg.params)))
            except TypeError as exc:
                raise InputError(f"regulariser {reg.name!r}: bad params {reg.params} ({exc})") from exc
        return cls(terms, regs)


def build_optimizer(config: OptimizerConfig, params) -> torch.optim.Optimizer:
    """A torch optimiser from its config (name, learning rate, extra constructor arguments)."""
    cls = OPTIMIZERS[config.name]
    kwargs = dict(config.params)
    if config.name == "lbfgs":
        # torch's default max_eval (1.25 max_iter) leaves no line-search evaluations when one
        # LBFGS iteration is taken per step, as regcore's loop does
        kwargs.setdefault("max_eval", max(kwargs.get("max_iter", 20) * 5 // 4, 25))
    try:
        return cls(params, lr=config.lr, **kwargs)
    except TypeError as exc:
        raise InputError(f"optimizer {config.name!r}: bad params {config.params} ({exc})") from exc
