"""The optimisation of one pyramid level for a batch of independent pairs: closures, evaluation
cache, objective scaling, stopping, best iterate, per pair.

Generic over transforms: the caller passes each pair's parameters and an ``evaluate(active)``
returning the losses of the pairs ``active`` at their current values. Works with any
``torch.optim`` optimiser (one per pair); one pair is a batch of one.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

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


Evaluate = Callable[[list[int]], tuple[torch.Tensor, list[dict[str, float]]]]


class _PairFailed(Exception):
    """Internal: the pair being stepped failed during a re-evaluation (recorded in ``failures``)."""


def optimize_level(
    records: Sequence[LevelRecord],
    stage: StageConfig,
    params: Sequence[list[torch.nn.Parameter]],
    evaluate: Evaluate,
    max_iter: int,
    level: int,
    callback: Callback | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict[int, Exception]:
    """Minimise the loss of each of B independent pairs over its own ``params[b]`` with the
    stage's optimiser and stopping rules; fills ``records[b]``.

    ``evaluate(active)`` returns the losses of the pairs ``active`` (positions ``b``) at their
    current parameters, ``(len(active),)`` with autograd graphs, and one ``{term: value}`` per
    pair: the pairs are evaluated together (one batched evaluation per iteration) and the
    gradient of the sum of their scaled losses gives each pair its own gradient. Every pair has
    its own optimiser, objective scale, stopping rule and best iterate; a converged pair stops
    changing while the others go on. Optimisers that evaluate more than once per step (LBFGS's
    line search) re-evaluate the pair being stepped alone. ``after_step(b)`` runs after each of
    pair ``b``'s steps (e.g. demons smoothing of its field).

    Returns:
        ``{b: exception}`` for the pairs that failed (non-finite loss, moved out of view); their
        records stop where they failed. The others end at their best iterate.
    """
    t0 = time.perf_counter()
    n = len(records)
    optimizers = [build_optimizer(stage.optimizer, ps) for ps in params]
    scale = [1.0] * n
    cache: list[dict[str, Any]] = [{} for _ in range(n)]
    evaluations = [0] * n
    failures: dict[int, Exception] = {}

    def key_of(b: int) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in params[b]])

    def current(b: int) -> bool:
        return "key" in cache[b] and torch.equal(cache[b]["key"], key_of(b))

    def run(active: list[int]) -> None:
        """Evaluate ``active`` together; their losses, parts and gradients go to ``cache``."""
        for b in active:
            for p in params[b]:
                p.grad = None
        losses, parts = evaluate(active)
        values = losses.detach().tolist()
        weights = torch.as_tensor([scale[b] if math.isfinite(v) else 0.0 for b, v in zip(active, values)],
                                  dtype=losses.dtype, device=losses.device)
        total = torch.where(torch.isfinite(losses.detach()), losses, torch.zeros_like(losses)) * weights
        if total.requires_grad:
            total.sum().backward()
        for j, b in enumerate(active):
            if not math.isfinite(values[j]):
                failures[b] = RegistrationError(f"non-finite loss ({values[j]}) at stage {records[b].stage}, level {level}")
                continue
            evaluations[b] += 1
            cache[b] = {"key": key_of(b), "loss": values[j] * scale[b], "parts": parts[j],
                        "grads": [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params[b]]}

    def closure_for(b: int) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            """Pair ``b``'s scaled loss at its current parameters, its gradient in ``.grad``."""
            if not current(b):  # a line search probing a new point: this pair alone
                run([b])
                if b in failures:
                    raise _PairFailed()
            for p, g in zip(params[b], cache[b]["grads"]):
                p.grad = g.clone()
            return torch.tensor(cache[b]["loss"])
        return closure

    def refresh(pairs: list[int]) -> None:
        pending = [b for b in pairs if b not in failures and not current(b)]
        if pending:
            run(pending)

    # Scale each objective so that its largest initial gradient component is 1 (linear parameters
    # are in physical-shift units, so 1 per mm): the first LBFGS step then moves at most ~1 mm,
    # SGD learning rates read as mm, and float32 losses stay well resolved. Same optimum.
    run(list(range(n)))
    for b in range(n):
        if b in failures:
            continue
        gmax = max((float(g.abs().max()) for g in cache[b]["grads"]), default=0.0)
        if gmax > 0 and math.isfinite(gmax):
            scale[b] = 1.0 / gmax
            cache[b] = {}
    closures = [closure_for(b) for b in range(n)]
    plateaus = [Plateau(stage.stopping) for _ in range(n)]
    lowest = [math.inf] * n
    best = [[p.detach().clone() for p in ps] for ps in params]
    for record in records:
        record.stop_reason = "max_iterations"
    active = [b for b in range(n) if b not in failures]
    for it in range(max_iter):
        if not active:
            break
        refresh(active)  # one batched evaluation of every active pair
        still = []
        for b in active:
            if b in failures:
                continue
            start = [p.detach().clone() for p in params[b]]
            try:  # torch optimisers return the closure's value at the parameters the step started from
                loss = float(optimizers[b].step(closures[b]).detach()) / scale[b]
            except _PairFailed:
                continue
            if after_step is not None:
                after_step(b)
            record = records[b]
            record.losses.append(loss)
            record.iterations = it + 1
            if callback is not None:
                callback({"event": "iteration", "pair": b, "stage": record.stage, "level": level,
                          "factor": record.factor, "iteration": it, "loss": loss, "terms": cache[b].get("parts", {})})
            if loss < lowest[b]:
                lowest[b], best[b] = loss, start
            if plateaus[b].update(loss):
                record.stop_reason = "converged"
            else:
                still.append(b)
        active = still
    live = [b for b in range(n) if b not in failures]
    refresh(live)  # the loss at the final parameters (cached when just evaluated)
    worse = [b for b in live if b not in failures and cache[b]["loss"] / scale[b] > lowest[b]]
    with torch.no_grad():  # a last step that made things worse (a failed line search): keep the best iterate
        for b in worse:
            for p, value in zip(params[b], best[b]):
                p.copy_(value)
    refresh(worse)
    for b in live:
        if b in failures:
            continue
        record = records[b]
        final = cache[b]["loss"] / scale[b]
        if final >= OUT_OF_VIEW_LOSS:
            failures[b] = RegistrationError(
                f"stage {record.stage} level {level}: the transform moved the moving image out of the fixed field of view")
            continue
        record.losses.append(final)
        record.seconds = time.perf_counter() - t0
        record.evaluations = evaluations[b]
        log.debug("stage %d level %d (x%g) pair %d: %d iterations, %d evaluations, loss %.6g, %s", record.stage, level,
                  record.factor, b, record.iterations, record.evaluations, final, record.stop_reason)
        if callback is not None:
            callback({"event": "level", "pair": b, **asdict(record)})
    return failures
