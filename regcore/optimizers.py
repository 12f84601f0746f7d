"""The optimiser registry: name -> class (torch optimisers and regcore's own).

``greedy`` is not here: it is the ``syn`` transform's own update rule (:mod:`regcore.greedy`), named
in configs like an optimiser (:data:`regcore.config.OPTIMIZERS` adds it).
"""

from __future__ import annotations

import torch

from .step_descent import RegularStepGradientDescent

__all__ = ["OPTIMIZERS"]

OPTIMIZERS: dict[str, type] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "lbfgs": torch.optim.LBFGS,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "rsgd": RegularStepGradientDescent,
}
