"""δ-unlearning offsets and the SNAP trainer that makes the small unlearned model."""

from .delta import DeltaSpec, OffsetModels, OffsetPair, offset_logits
from .snap import SnapConfig, SnapTrainer
from .snap_data import (
    DEFAULT_WORLD_PROMPTS,
    OBLITERATED_ANSWERS,
    SnapExample,
    answer_prompts,
    build_forget_set,
)
from .swd import sliced_wasserstein, snapshot_parameters, swd_penalty

__all__ = [
    "DEFAULT_WORLD_PROMPTS",
    "OBLITERATED_ANSWERS",
    "SnapConfig",
    "SnapExample",
    "SnapTrainer",
    "answer_prompts",
    "build_forget_set",
    "DeltaSpec",
    "OffsetModels",
    "OffsetPair",
    "offset_logits",
    "sliced_wasserstein",
    "snapshot_parameters",
    "swd_penalty",
]
