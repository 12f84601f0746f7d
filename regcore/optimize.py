"""The optimisation of one pyramid level: closure, evaluation cache, objective scaling, stopping.

Generic over transforms: the caller passes the parameters and an ``evaluate()`` returning
``(loss, parts)`` at their current values. Works with any ``torch.optim`` optimiser.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .config import StageConfig
from .errors import RegistrationError
from .objective import build_optimizer
from .stopping import Plateau

__all__ = ["LevelRecord", "optimize_level", "OUT_OF_VIEW_LOSS", "Callback"]

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]

#: Loss an ``evaluate()`` returns where the moving image does not overlap the fixed grid at all.
OUT_OF_VIEW_LOSS = 1e3


@dataclass
class LevelRecord:
    """What happened at one pyramid level of one stage.

    ``losses[i]`` is the loss before iteration ``i``; the last entry is the loss at the level's
    final parameters (so ``len(losses) == iterations + 1``). ``evaluations`` counts objective
    evaluations (line searches make several per iteration).
    """

    stage: int
    transform: str
    factor: float
    size: tuple[int, ...]
    losses: list[float] = field(default_factory=list)
    iterations: int = 0
    evaluations: int = 0
    voxels: int = 0
    stop_reason: str = ""
    seconds: float = 0.0


def optimize_level(
    record: LevelRecord,
    stage: StageConfig,
    params: list[torch.nn.Parameter],
    evaluate: Callable[[], tuple[torch.Tensor, dict[str, float]]],
    max_iter: int,
    level: int,
    callback: Callback | None = None,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Minimise ``evaluate()`` over ``params`` with the stage's optimiser and stopping rules.

    ``after_step`` runs after every optimiser step (e.g. demons smoothing of the field). The
    parameters end at the best iterate seen. Fills ``record``.
    """
    t0 = time.perf_counter()
    optimizer = build_optimizer(stage.optimizer, params)
    cache: dict[str, Any] = {"evaluations": 0, "scale": 1.0}

    def closure() -> torch.Tensor:
        """Loss times ``cache['scale']`` with its gradient; raw loss in the cache."""
        # LBFGS re-evaluates the point its line search ended on: answer that from the cache.
        key = torch.cat([p.detach().reshape(-1) for p in params])
        if "key" in cache and torch.equal(cache["key"], key):
            for p, g in zip(params, cache["grads"]):
                p.grad = g.clone()
            return cache["loss"]
        optimizer.zero_grad()
        loss, parts = evaluate()
        if not torch.isfinite(loss):
            raise RegistrationError(f"non-finite loss ({float(loss)}) at stage {record.stage}, level {level}")
        scaled = loss * cache["scale"]
        scaled.backward()
        cache["evaluations"] += 1
        cache.update(key=key, loss=scaled.detach(), parts=parts,
                     grads=[torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params])
        return scaled

    # Scale the objective so that its largest initial gradient component is 1 (linear parameters
    # are in physical-shift units, so 1 per mm): the first LBFGS step then moves at most ~1 mm,
    # SGD learning rates read as mm, and float32 losses stay well resolved. Same optimum.
    closure()
    gmax = max((float(g.abs().max()) for g in cache["grads"]), default=0.0)
    if gmax > 0 and math.isfinite(gmax):
        cache["scale"] = 1.0 / gmax
        cache.pop("key")

    plateau = Plateau(stage.stopping)
    lowest, best_params = math.inf, [p.detach().clone() for p in params]
    record.stop_reason = "max_iterations"
    for it in range(max_iter):
        start = [p.detach().clone() for p in params]
        # torch optimisers return the closure's value at the parameters the step started from
        loss = float(optimizer.step(closure).detach()) / cache["scale"]
        if after_step is not None:
            after_step()
        record.losses.append(loss)
        record.iterations = it + 1
        if callback is not None:
            callback({"event": "iteration", "stage": record.stage, "level": level, "factor": record.factor,
                      "iteration": it, "loss": loss, "terms": cache.get("parts", {})})
        if loss < lowest:
            lowest, best_params = loss, start
        if plateau.update(loss):
            record.stop_reason = "converged"
            break
    final = float(closure().detach()) / cache["scale"]  # loss at the final parameters (cached when just evaluated)
    if final > lowest:  # a last step that made things worse (a failed line search): keep the best iterate
        with torch.no_grad():
            for p, value in zip(params, best_params):
                p.copy_(value)
        final = float(closure().detach()) / cache["scale"]
    if final >= OUT_OF_VIEW_LOSS:
        raise RegistrationError(
            f"stage {record.stage} level {level}: the transform moved the moving image out of the fixed field of view"
        )
    record.losses.append(final)
    record.seconds = time.perf_counter() - t0
    record.evaluations = cache["evaluations"]
    log.debug("stage %d level %d (x%g): %d iterations, %d evaluations, loss %.6g, %s", record.stage, level,
              record.factor, record.iterations, record.evaluations, final, record.stop_reason)
    if callback is not None:
        callback({"event": "level", **asdict(record)})
