"""Regularisers of displacement/velocity fields (:mod:`.functional`) and their modules
(:mod:`.modules`)."""

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
    "Regularizer",
    "DiffusionRegularizer",
    "TVRegularizer",
    "AnisotropicTVRegularizer",
    "SparsityRegularizer",
    "BendingEnergyRegularizer",
    "JacobianRegularizer",
    "REGULARIZERS",
    "build_regularizer",
]
