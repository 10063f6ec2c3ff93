"""Admin API models for operators: job lists, the playground, activity and audit entries."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from server.protocol.admin import ClassifyRequest, ClassifyResponse, JobResponse
from server.protocol.chat import ChatMessage


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobResponse]


class PlaygroundRequest(ClassifyRequest):
    """A prompt (one user turn) or a conversation, answered twice: bare and guarded."""

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    max_tokens: int = Field(64, ge=1, le=512, description="Length of each of the two answers.")


class Refusal(BaseModel):
    """The error a client got instead of an answer."""

    status: int
    type: str
    message: str


class PlaygroundResponse(BaseModel):
    classification: ClassifyResponse
    bare: str = Field(description="The engine's greedy answer to the prompt as it came.")
    guarded: str | None = Field(
        description="The greedy answer through the guard, as a client gets it (None: refused)."
    )
    guarded_error: Refusal | None = Field(None, description="Why the guarded request failed.")
    request_id: str = Field(description="The guarded request's id (audit log, metrics).")


class ActivityPoint(BaseModel):
    """Requests decided in one time bucket, since the previous bucket."""

    start: datetime
    end: datetime
    passed: int
    flagged: dict[str, int] = Field(description="Flagged requests by target id.")


class TargetActivity(BaseModel):
    target_id: str
    name: str | None = Field(description="None once the target was deleted.")
    flagged: int
    by_action: dict[str, int] = Field(description="corrupt / delta, since the gateway started.")


class ActivityResponse(BaseModel):
    """This gateway's own decision counters (the same as /metrics), bucketed over time."""

    since: datetime = Field(description="When this gateway started counting.")
    bucket_seconds: int
    passed: int
    targets: list[TargetActivity]
    series: list[ActivityPoint]


class AuditEntry(BaseModel):
    """One guard decision from the audit log, never with prompt text."""

    time: datetime
    request_id: str
    target_id: str
    target: str | None
    action: str
    score: float | None
    threshold: float | None
    positions: int | None


class AuditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AuditEntry]
