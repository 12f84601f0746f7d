"""Image similarity measures (:mod:`.functional`) and the losses built on them (:mod:`.modules`)."""

from regcore.losses.functional import (
    gaussian_kernel1d,
    lncc,
    mse,
    mutual_information,
    ncc,
    ngf,
    normalized_mutual_information,
    separable_filter,
    spatial_gradient,
    ssim,
)
from regcore.losses.modules import (
    LOSSES,
    LNCCLoss,
    MILoss,
    MSELoss,
    NCCLoss,
    NGFLoss,
    NMILoss,
    SimilarityLoss,
    SSIMLoss,
    build_loss,
)

__all__ = [
    "gaussian_kernel1d",
    "separable_filter",
    "spatial_gradient",
    "mse",
    "ncc",
    "lncc",
    "ssim",
    "mutual_information",
    "normalized_mutual_information",
    "ngf",
    "SimilarityLoss",
    "MSELoss",
    "NCCLoss",
    "LNCCLoss",
    "SSIMLoss",
    "MILoss",
    "NMILoss",
    "NGFLoss",
    "LOSSES",
    "build_loss",
]
