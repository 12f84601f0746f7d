"""Image similarity measures (:mod:`.functional`) and the losses built on them (:mod:`.modules`)."""

from regcore.losses import functional as _functional, local_cc as _local_cc, modules as _modules
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
from regcore.losses.local_cc import local_cc, local_cc_gradients, window_count, window_sum
from regcore.losses.modules import (
    LOSSES,
    LNCCLoss,
    LocalCCLoss,
    MILoss,
    MSELoss,
    NCCLoss,
    NGFLoss,
    NMILoss,
    SimilarityLoss,
    SSIMLoss,
    build_loss,
)

__all__ = [*_functional.__all__, *_local_cc.__all__, *_modules.__all__]  # what each module exports
