"""Admin API models: forget targets, jobs, dry-run classification."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from server.protocol.chat import ChatMessage

OptionalName = Annotated[
    str | None, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)
]
NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]


class _Strict(BaseModel):
    """Admin input is strict: a misspelt field is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ForgetExample(_Strict):
    prompt: NonEmpty
    answer: str | None = Field(
        None,
        description="What the model answers today (optional): the strength search measures it, "
        "δ training makes it unlikely.",
    )
    wrong_answers: list[NonEmpty] = Field(
        default_factory=list,
        max_length=20,
        description="δ modes, alpha 'auto': answers, written like `answer`, that a model which "
        "never learnt the target would give as readily (offset.alpha).",
    )

    @model_validator(mode="after")
    def _answered(self) -> ForgetExample:
        if self.wrong_answers and self.answer is None:
            raise ValueError("wrong_answers need the example's answer")
        return self


class AlphaProbe(_Strict):
    """A question about an entity the served model never saw (invented), with an answer and
    wrong answers written the way the forget examples' are: the level δ's α is matched to."""

    prompt: NonEmpty
    answer: NonEmpty
    wrong_answers: list[NonEmpty] = Field(min_length=1, max_length=20)


MIN_ALPHA_ITEMS = 10
"""alpha 'auto': fewest probes, and fewest forget examples with answer and wrong answers. From
10 of each, the choice's 80% interval is about 1.25 wide on TOFU; from 50, 0.5
(bench/tofu_alpha_auto.py)."""


class TargetOptions(_Strict):
    fpr: float = Field(0.01, gt=0, le=0.2, description="False-positive rate to calibrate to.")
    method: str | None = Field(
        None, description="Corruption function (corruption.CORRUPTION_METHODS)."
    )
    strength: float | None = Field(None, ge=0, description="Fixed strength: skips the search.")
    dims: int | None = Field(None, ge=1, description="Dimensions the corruption touches.")
    seed: int = Field(0, description="Seed of the classifier training and the corruption noise.")
    allow_low_recall: bool = Field(
        False,
        description=(
            "Activate the target even if its classifier's held-out recall is below the "
            "gateway's floor (guard.min_heldout_recall); otherwise such a registration fails."
        ),
    )
    alpha: float | Literal["auto"] = Field(
        1.0,
        description="δ modes: weight of the logit offset, in (0, 10], or 'auto': the "
        "registration picks the α whose truth ratios on the forget examples match the served "
        "model's on alpha_probes (needs both, with wrong answers).",
    )
    alpha_probes: list[AlphaProbe] | None = Field(
        None,
        max_length=500,
        description="δ modes, alpha 'auto': questions about invented entities (offset.alpha).",
    )
    scope: Literal["flagged", "all"] = Field(
        "flagged",
        description="δ modes: add the offset to requests the classifier flags, or to all.",
    )
    small_base: str | None = Field(
        None,
        max_length=4096,
        description="δ modes: local folder of the small base model (default: the served model).",
    )
    unlearned_model: str | None = Field(
        None,
        max_length=4096,
        description="δ modes: an already SNAP-trained copy of small_base (skips training).",
    )
    snap_max_steps: int | None = Field(
        None, ge=1, le=100_000, description="δ modes: cap on SNAP training steps."
    )
    snap_lr: float | None = Field(None, gt=0, le=1, description="δ modes: SNAP learning rate.")
    snap_npo: bool | None = Field(
        None,
        description="δ modes: train the small model to make the forget examples' given answers "
        "unlikely (NPO, beside SNAP's refusals; default true, used when answers are given).",
    )
    snap_train_vocab: bool | None = Field(
        None,
        description="δ modes: also train the small model's embedding and LM head (default "
        "true); false freezes them, for large vocabularies on machines short of memory.",
    )

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        """Checked here, not by the union, so that an error names options.alpha itself."""
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("alpha is a number or 'auto'")
        if not 0 < value <= 10:
            raise ValueError("alpha must be greater than 0 and at most 10")
        return float(value)


class TargetScope(_Strict):
    """Which callers a target applies to; omitted (or both lists empty): all traffic."""

    api_keys: list[Annotated[str, StringConstraints(min_length=1, max_length=4096)]] = Field(
        default_factory=list,
        max_length=1000,
        description="API keys (as in the keys file); only their sha256 is stored.",
    )
    tenants: list[NonEmpty] = Field(
        default_factory=list, max_length=1000, description="Tenants named in the keys file."
    )


class CreateTargetRequest(_Strict):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    description: str = Field("", max_length=4000)
    aliases: list[NonEmpty] = Field(default_factory=list, max_length=100)
    forget_examples: list[NonEmpty | ForgetExample] = Field(min_length=1, max_length=500)
    retain_examples: list[NonEmpty] = Field(default_factory=list, max_length=2000)
    mode: Literal["eco", "delta", "eco+delta"] = "eco"
    options: TargetOptions = Field(default_factory=TargetOptions)
    scope: TargetScope | None = Field(
        None, description="Tenant scope: the API keys and/or tenants it applies to (default all)."
    )

    @model_validator(mode="after")
    def _alpha_search(self) -> CreateTargetRequest:
        """alpha 'auto' has what its search reads (offset.alpha), in a δ mode."""
        options = self.options
        answered = sum(
            1 for e in self.forget_examples if not isinstance(e, str) and e.wrong_answers
        )
        if options.alpha != "auto":
            if options.alpha_probes or answered:
                raise ValueError("alpha_probes and wrong_answers are read by alpha 'auto' only")
            return self
        if self.mode == "eco":
            raise ValueError("alpha 'auto' is a δ option (mode delta or eco+delta)")
        if len(options.alpha_probes or []) < MIN_ALPHA_ITEMS:
            raise ValueError(
                f"alpha 'auto' needs at least {MIN_ALPHA_ITEMS} alpha_probes: questions about "
                "invented entities with an answer and wrong answers"
            )
        if answered < MIN_ALPHA_ITEMS:
            raise ValueError(
                f"alpha 'auto' needs at least {MIN_ALPHA_ITEMS} forget examples with an answer "
                f"and wrong_answers ({answered} given)"
            )
        return self


class NewVersionRequest(CreateTargetRequest):
    """PUT /admin/targets/{id}: the whole spec of the target's next version."""

    # Optional here, unlike on POST: the name cannot change, so it may be left out.
    name: OptionalName = Field(  # type: ignore[assignment]
        None, description="The target's name (it cannot change); default: the current one."
    )


class RollbackRequest(_Strict):
    version: int | None = Field(
        None, ge=1, description="The version to activate; default: the one before the active."
    )


class UpdateTargetRequest(_Strict):
    enabled: bool | None = None
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Override of the calibrated threshold; null clears it."
    )

    @model_validator(mode="after")
    def _something(self) -> UpdateTargetRequest:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give enabled and/or threshold")
        return self


class JobResponse(BaseModel):
    id: str
    object: Literal["job"] = "job"
    target_id: str
    kind: str
    status: str
    stage: str
    progress: float
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    version: int | None = Field(None, description="The target version the job builds.")
    attempts: int = Field(0, description="Times a replica claimed the job (takeovers add one).")
    owner: str | None = Field(None, description="The replica holding (or last holding) it.")


class VersionSummary(BaseModel):
    version: int
    status: str
    job_id: str | None
    error: str | None


class TargetResponse(BaseModel):
    id: str
    object: Literal["target"] = "target"
    name: str
    description: str
    aliases: list[str]
    mode: str
    options: dict[str, Any]
    status: str
    enabled: bool
    active: bool
    threshold: float | None
    threshold_override: float | None
    heldout_recall: float | None = Field(
        None, description="Share of held-out prompts about the target its classifier flags."
    )
    version: int
    calibration: dict[str, Any] | None
    error: str | None
    n_forget_examples: int
    n_retain_examples: int
    created_at: datetime
    updated_at: datetime
    active_version: int | None = Field(None, description="The version enforced now.")
    pending_version: VersionSummary | None = Field(
        None, description="A newer version being built; the active one stays until it is ready."
    )
    failed_version: VersionSummary | None = Field(
        None, description="The newest version, when it failed (the active one stayed)."
    )
    load_error: str | None = Field(
        None, description="Why this gateway cannot enforce the active version (status failed)."
    )


class VersionResponse(BaseModel):
    object: Literal["target.version"] = "target.version"
    version: int
    status: str
    active: bool
    description: str
    aliases: list[str]
    mode: str
    options: dict[str, Any]
    calibration: dict[str, Any] | None
    error: str | None
    job_id: str | None
    n_forget_examples: int
    n_retain_examples: int
    created_at: datetime
    activated_at: datetime | None


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionResponse]


class TargetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TargetResponse]


class ClassifyRequest(_Strict):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tenant: str | None = Field(None, description="Classify as this tenant's traffic.")
    api_key: str | None = Field(None, description="Classify as this API key's traffic.")

    @model_validator(mode="after")
    def _one_input(self) -> ClassifyRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class Span(BaseModel):
    start: int
    end: int
    text: str


class TargetDecision(BaseModel):
    target_id: str
    target: str
    score: float
    threshold: float
    flagged: bool
    stage: str
    spans: list[Span]
    corrupted_positions: int | None = Field(
        None, description="Prompt tokens that would be corrupted (flagged targets only)."
    )


class ClassifyResponse(BaseModel):
    flagged: bool
    text: str
    results: list[TargetDecision]
