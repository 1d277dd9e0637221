"""muon_kernels: a fast, drop-in Muon optimizer for PyTorch.

Swap ``torch.optim.Muon`` for ``muon_kernels.Muon``; parameters that are not matrices are stepped
by AdamW in the same optimizer.
"""

from .backends import available_backends
from .optimizer import Muon
from .ns_config import PRESETS, NSConfig
from .orthogonalize import orthogonalize
from .param_groups import param_groups
from .version import __version__
from .schedules import (
    ConstantBatchSize,
    ConstantLR,
    CosineLR,
    DiminishingLR,
    ExponentialBatchSize,
    PolynomialLR,
    ScheduledBatchSampler,
    split_batch,
)

__all__ = [
    "Muon", "NSConfig", "PRESETS", "available_backends", "orthogonalize", "param_groups",
    "ConstantLR", "CosineLR", "PolynomialLR", "DiminishingLR",
    "ConstantBatchSize", "ExponentialBatchSize", "ScheduledBatchSampler", "split_batch",
    "__version__",
]
