"""δ-unlearning offsets and the SNAP trainer that makes the small unlearned model."""

from .delta import OffsetPair, offset_logits
from .swd import sliced_wasserstein, snapshot_parameters, swd_penalty

__all__ = [
    "OffsetPair",
    "offset_logits",
    "sliced_wasserstein",
    "snapshot_parameters",
    "swd_penalty",
]
