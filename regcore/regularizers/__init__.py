"""Regularisers of displacement/velocity fields (:mod:`.functional`) and their modules
(:mod:`.modules`)."""

from regcore.regularizers import functional as _functional, modules as _modules
from regcore.regularizers.functional import (
    bending_energy,
    diffusion,
    folding_penalty,
    jacobian_determinant,
    jacobian_stats,
    sparsity,
    spatial_jacobian,
    total_variation,
    total_variation_anisotropic,
)
from regcore.regularizers.modules import (
    REGULARIZERS,
    AnisotropicTVRegularizer,
    BendingEnergyRegularizer,
    DiffusionRegularizer,
    JacobianRegularizer,
    Regularizer,
    SparsityRegularizer,
    TVRegularizer,
    build_regularizer,
)

__all__ = [*_functional.__all__, *_modules.__all__]  # what each module exports
