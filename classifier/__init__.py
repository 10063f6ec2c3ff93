"""Prompt classifier: flags prompts about registered forget targets (ECO-style guard).

Two stages per target: static token embeddings + alias cues clear most traffic in well under a
millisecond; all-MiniLM-L6-v2 + alias cues decide the rest, at a conformally calibrated
false-positive rate. `find_spans` gives the character spans that name a target.
"""

from typing import TYPE_CHECKING, Any

from .bank import ClassifierBank, Decision
from .calibrate import CalibrationReport, conformal_threshold
from .conversation import (
    TextPiece,
    content_text,
    conversation_pieces,
    conversation_text,
    message_texts,
    tool_strings,
)
from .embed import Embedder, EmbedderNotFoundError, EncodingStopped, default_model_path
from .model import ArtifactError, TargetClassifier, TargetSpec
from .spans import alias_kind, find_spans
from .stream import Mention, StreamScanner

if TYPE_CHECKING:
    from .train import TargetTrainer, TrainConfig, train_target, warm_up

_LAZY = frozenset({"TargetTrainer", "TrainConfig", "train_target", "warm_up"})


def __getattr__(name: str) -> Any:
    # `train` is imported on first use, so `python -m classifier.train` runs it only once.
    if name in _LAZY:
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "alias_kind",
    "ArtifactError",
    "CalibrationReport",
    "ClassifierBank",
    "Decision",
    "Embedder",
    "EmbedderNotFoundError",
    "EncodingStopped",
    "Mention",
    "StreamScanner",
    "TargetClassifier",
    "TargetSpec",
    "TargetTrainer",
    "TextPiece",
    "TrainConfig",
    "conformal_threshold",
    "content_text",
    "conversation_pieces",
    "conversation_text",
    "default_model_path",
    "find_spans",
    "message_texts",
    "tool_strings",
    "train_target",
    "warm_up",
]
