"""δ-unlearning offsets and the SNAP trainer that makes the small unlearned model."""

from .swd import sliced_wasserstein, snapshot_parameters, swd_penalty

__all__ = ["sliced_wasserstein", "snapshot_parameters", "swd_penalty"]
