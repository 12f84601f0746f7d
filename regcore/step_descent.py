"""Regular-step gradient descent, ITK's ``RegularStepGradientDescentOptimizer`` as a torch optimiser.

Each step moves the parameters by ``lr`` along the normalised gradient (``p <- p - lr g / |g|``,
the norm taken over all parameters together), and shrinks ``lr`` (times ``relaxation``) whenever the
gradient turns by more than 90 degrees from the previous step's, i.e. when the last step went past
the minimum along its direction. A step that raised the loss is undone and retried shorter (so
the loss never rises by more than one evaluation, and a level that starts near its optimum with
a step too long for it shortens the step instead of wandering). One objective evaluation per step, no line search: cheap and
robust for the few parameters of a linear transform, whose units regcore makes comparable
(physical-shift units, objective scaled to a unit largest initial gradient). Once ``lr`` falls
below ``min_step`` the parameters stay put, and the caller's stopping rule ends the level.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["RegularStepGradientDescent"]


class RegularStepGradientDescent:
    """``step(closure)``: evaluate, compare the gradient with the last one, move by ``lr``.

    The interface of a ``torch.optim`` optimiser (``zero_grad``, ``step(closure)``) without its
    base class, whose constructor imports ``torch._dynamo`` (about a second, once per process).

    Args:
        params: parameters to optimise.
        lr: initial step length (in parameter units; mm for regcore's linear transforms).
        relaxation: factor applied to the step length when the gradient direction reverses.
        min_step: step length below which no more steps are taken.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1.0, relaxation: float = 0.5,
                 min_step: float = 1e-3) -> None:
        if not lr > 0 or not 0 < relaxation < 1 or not min_step >= 0:
            raise ValueError(f"need lr > 0, 0 < relaxation < 1, min_step >= 0; got {lr}, {relaxation}, {min_step}")
        self.params = [p for p in params]
        self.relaxation, self.min_step = float(relaxation), float(min_step)
        self.step_length = float(lr)
        self.previous: torch.Tensor | None = None  # gradient at the last accepted point
        self.accepted: list[torch.Tensor] | None = None  # parameters of the last accepted point
        self.accepted_loss = float("inf")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("RegularStepGradientDescent needs a closure that returns the loss")
        with torch.enable_grad():
            loss = closure()
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return loss
        flat = torch.cat([p.grad.detach().reshape(-1) for p in params])
        if float(loss) > self.accepted_loss and self.accepted is not None and self.previous is not None:
            # the last step overshot: back to the accepted point, shorter step, same direction
            for p, value in zip(params, self.accepted):
                p.copy_(value)
            self.step_length *= self.relaxation
            flat = self.previous
        else:
            if self.previous is not None and float(flat @ self.previous) < 0:
                self.step_length *= self.relaxation
            self.previous = flat.clone()
            self.accepted = [p.detach().clone() for p in params]
            self.accepted_loss = float(loss)
        norm = float(flat.norm())
        if norm == 0 or self.step_length < self.min_step:
            return loss
        scale = self.step_length / norm
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(flat[offset: offset + n].reshape(p.shape).to(p.dtype), alpha=-scale)
            offset += n
        return loss
