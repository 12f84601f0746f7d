"""The stopping rule of a pyramid level, shared by every optimiser loop."""

from __future__ import annotations

import math

from .config import StoppingConfig

__all__ = ["Plateau"]


class Plateau:
    """Counts iterations since the loss last improved by more than ``rel_tol * |best|``;
    :meth:`update` says when ``patience`` such iterations have passed (the level has converged)."""

    def __init__(self, stopping: StoppingConfig) -> None:
        self.rel_tol, self.patience = stopping.rel_tol, stopping.patience
        self.best, self.stale = math.inf, 0

    def update(self, loss: float) -> bool:
        """Record one iteration's loss; True when the level has converged."""
        if not math.isfinite(self.best) or loss < self.best - self.rel_tol * abs(self.best):
            self.best, self.stale = loss, 0
            return False
        self.stale += 1
        return self.stale >= self.patience
