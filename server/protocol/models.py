"""/v1/models response models."""

from __future__ import annotations

from typing import Literal

from server.protocol.common import StrictModel


class ModelObject(StrictModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "obliviate"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(StrictModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
