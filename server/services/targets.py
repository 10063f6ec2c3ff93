"""Forget targets: versioned registrations, leased jobs, isolated loading, dry-run classify.

A registration (POST, version 1) or a new version (PUT) is a job in the registry, run by whichever
replica claims it (`services.jobs`): train the target's classifier (seconds), find its corruption
strength against the served model, train or adopt its δ model, store the artifacts as that
version and make it the active one in one registry transaction. Until then the previous version
stays active; a failed version leaves it active and records why. Rollback re-activates a kept one.

Loading is per target: a target whose artifacts fail their checksum, were made with another
embedder, or whose δ models cannot be fetched is reported as failed on this gateway (admin API,
/metrics) and every other target is enforced as usual. Loaded targets are cached by version,
so a reload after a change elsewhere only loads what changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from classifier import (
    Embedder,
    EncodingStopped,
    TargetClassifier,
    TargetSpec,
    TrainConfig,
    train_target,
    warm_up,
)
from corruption import CORRUPTION_METHODS, CorruptionSpec, EmbedsGenerator
from server.engine import (
    ChatPrompt,
    Engine,
    GenerationRequest,
    PromptEmbeds,
    SamplingOptions,
    TextPrompt,
)
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.metrics import Metrics
from server.protocol.admin import (
    ClassifyResponse,
    Span,
    TargetDecision,
    TargetResponse,
    VersionSummary,
)
from server.protocol.common import ChatMessageParam
from server.registry import (
    Artifact,
    DuplicateTargetError,
    JobRecord,
    Registry,
    RegistryError,
    TargetRecord,
    VersionPendingError,
    VersionRecord,
)
from server.registry_blobs import bundle_digest
from server.services.guard import ActiveTarget, EcoGuard
from server.services.jobs import JobRunner, Lease, LeaseConfig
from server.services.offsets import OffsetRequest, OffsetTrainer, check_pair
from server.services.strength import StrengthCalibrator, warm_start_from_reports
from server.services.tenancy import Caller, TenantScope

logger = logging.getLogger(__name__)
T = TypeVar("T")

SUPPORTED_MODES = ("eco", "delta", "eco+delta")
ECO_MODES = ("eco", "eco+delta")
DELTA_MODES = ("delta", "eco+delta")
PINNING_OPTIONS = ("method", "strength", "dims")


@dataclass(frozen=True)
class NewTarget:
    name: str
    description: str
    aliases: Sequence[str]
    forget_examples: Sequence[KnownExample]
    retain_examples: Sequence[str]
    mode: str
    options: dict[str, Any]


KnownExample = tuple[str, str | None, tuple[str, ...]]
"""A forget example: prompt, known answer (or None), wrong answers (alpha 'auto' reads them)."""


def encode_example(example: KnownExample) -> str:
    """How the registry stores a forget example: [prompt, answer], or with its wrong answers."""
    prompt, answer, wrong = example
    return json.dumps([prompt, answer, list(wrong)] if wrong else [prompt, answer])


def decode_example(stored: str) -> KnownExample:
    prompt, answer, *rest = json.loads(stored)
    return prompt, answer, tuple(rest[0]) if rest else ()


class TargetLoadError(Exception):
    """A target's active version cannot be enforced on this gateway (the message says why)."""


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class TargetService:
    """The admin side of the guard."""

    def __init__(
        self,
        registry: Registry,
        guard: EcoGuard,
        engine: Engine,
        embedder: Embedder,
        calibrator: StrengthCalibrator | None,
        offsets: OffsetTrainer | None = None,
        *,
        min_recall: float = 0.9,
        metrics: Metrics | None = None,
        leases: LeaseConfig | None = None,
        hidden_size: int | None = None,
    ) -> None:
        self._registry = registry
        self._guard = guard
        self._engine = engine
        self._embedder = embedder
        self._calibrator = calibrator
        self._offsets = offsets
        self._min_recall = min_recall
        self._metrics = metrics
        self._hidden_size = hidden_size
        self._write_lock = asyncio.Lock()
        self._loaded: dict[tuple[str, int], ActiveTarget] = {}
        self.load_errors: dict[str, str] = {}
        """Targets this gateway cannot enforce, by id, with the reason."""
        self._stopping = threading.Event()
        self.jobs = JobRunner(
            registry, self._run, config=leases or LeaseConfig(), prepare=self._warm_up
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every active target (each on its own), then start taking jobs."""
        self._stopping.clear()  # started again after a stop: warm up again
        await self.reload()
        self.jobs.start()

    async def stop(self) -> None:
        self._stopping.set()  # a warm-up still running ends at its next batch
        await self.jobs.stop()

    async def _warm_up(self) -> None:
        # Embed the classifier's shipped negatives once per process (10-30 s of CPU) before a
        # job needs them. Shutting down stops it within a batch: the event loop's executor
        # would otherwise wait for the whole of it before the process can exit.
        try:
            await asyncio.to_thread(warm_up, self._embedder, None, self._stopping)
        except EncodingStopped:
            pass

    async def reload(self) -> None:
        """Rebuild the guard's active set from the registry, target by target."""
        records = await asyncio.to_thread(self._registry.list_targets)
        active: list[ActiveTarget] = []
        loaded: dict[tuple[str, int], ActiveTarget] = {}
        errors: dict[str, str] = {}
        for record in records:
            if record.active_version is None or not record.enabled:
                continue
            key = (record.id, record.active_version)
            target = self._loaded.get(key)
            if target is None:
                try:
                    target = await asyncio.to_thread(self._load, record)
                except Exception as e:
                    errors[record.id] = f"{type(e).__name__}: {e}"
                    logger.error(
                        "Target %s (%s) v%d cannot be enforced on this gateway: %s",
                        record.name, record.id, record.active_version, errors[record.id],
                    )  # fmt: skip
                    continue
            loaded[key] = target
            active.append(_with_threshold(target, record.threshold_override))
        self._guard.set_targets(active)
        self._loaded, self.load_errors = loaded, errors
        if self._metrics is not None:
            self._metrics.set_target_health(len(active), errors)

    async def sync(self) -> None:
        """Reload after a change made elsewhere (another gateway), never mid-way through ours."""
        async with self._write_lock:
            await self.reload()

    @property
    def needs_retry(self) -> bool:
        """Some target failed to load: worth trying again even if nothing changed."""
        return bool(self.load_errors)

    def _load(self, record: TargetRecord) -> ActiveTarget:
        assert record.active_version is not None
        artifacts = self._registry.load_artifacts(record.id, record.active_version)
        return self._active(record.id, record.name, record.current, artifacts)

    def _active(
        self, target_id: str, name: str, version: VersionRecord, artifacts: dict[str, Artifact]
    ) -> ActiveTarget:
        """What the guard enforces for one version (TargetLoadError when it cannot be)."""
        if "classifier" not in artifacts:
            raise TargetLoadError(f"version {version.version} has no classifier artifact")
        classifier = TargetClassifier.from_bytes(artifacts["classifier"].data)
        if classifier.embedder_fingerprint != self._embedder.fingerprint:
            raise TargetLoadError(
                f"its classifier was trained with embedder {classifier.embedder_fingerprint}, "
                f"this gateway runs {self._embedder.fingerprint} (guard.embedder_path differs "
                "between replicas?)"
            )
        spec = (
            CorruptionSpec.from_dict(json.loads(artifacts["corruption"].data))
            if "corruption" in artifacts
            else None
        )
        offset = None
        if "offset" in artifacts:
            if self._offsets is None:
                raise TargetLoadError("δ targets need the offset models, not set up here")
            offset = self._offsets.resolve(json.loads(artifacts["offset"].data))
        scope = str(version.options.get("scope", "flagged"))
        return ActiveTarget(
            target_id,
            name,
            version.aliases,
            spec,
            classifier,
            offset=offset,
            scope=scope,
            tenants=TenantScope.from_options(version.options),
        )

    # --- admin operations ------------------------------------------------------------------

    async def register(self, new: NewTarget) -> JobRecord:
        """Record the target and queue the job that builds its version 1 (202)."""
        self._check(new)
        try:
            _, job = await asyncio.to_thread(
                lambda: self._registry.create_target(name=new.name, **_spec(new))
            )
        except DuplicateTargetError as e:
            raise ConflictError(str(e), param="name", code="target_exists") from e
        self.jobs.wake()
        return job

    async def new_version(self, target_id: str, new: NewTarget) -> JobRecord:
        """Queue the next version of a target; the active one stays enforced meanwhile (202)."""
        record = await self.get_target(target_id)
        if new.name != record.name:
            raise InvalidRequestError(
                f"a target's name cannot change ({record.name!r}); register a new target instead",
                param="name",
            )
        self._check(new)
        try:
            job = await asyncio.to_thread(
                lambda: self._registry.create_version(target_id, **_spec(new))
            )
        except VersionPendingError as e:
            raise ConflictError(str(e), param=None, code="version_pending") from e
        if job is None:
            raise NotFoundError(f"No target {target_id}", param="target_id")
        self.jobs.wake()
        return job

    async def rollback(self, target_id: str, version: int | None) -> TargetRecord:
        """Activate an earlier ready version at once (default: the one before the active)."""
        async with self._write_lock:
            try:
                record = await asyncio.to_thread(self._registry.rollback, target_id, version)
            except RegistryError as e:
                raise ConflictError(str(e), param="version", code="no_such_version") from e
            if record is None:
                raise NotFoundError(f"No target {target_id}", param="target_id")
            await self.reload()
        return record

    async def list_versions(self, target_id: str) -> list[VersionRecord]:
        versions = await asyncio.to_thread(self._registry.list_versions, target_id)
        if versions is None:
            raise NotFoundError(f"No target {target_id}", param="target_id")
        return versions

    def _check(self, new: NewTarget) -> None:
        if new.mode not in SUPPORTED_MODES:
            raise InvalidRequestError(
                f"mode {new.mode!r} is not available yet; supported: {', '.join(SUPPORTED_MODES)}",
                param="mode",
            )
        self._check_corruption_options(new.options)
        if new.mode in DELTA_MODES:
            self._check_delta_options(new.options)

    def _check_corruption_options(self, options: dict[str, Any]) -> None:
        method = options.get("method")
        if method is not None and method not in CORRUPTION_METHODS:
            raise InvalidRequestError(
                f"unknown corruption method {method!r}; known: "
                f"{', '.join(sorted(CORRUPTION_METHODS))}",
                param="options.method",
            )
        dims = options.get("dims")
        if dims is not None and self._hidden_size is not None and dims > self._hidden_size:
            raise InvalidRequestError(
                f"options.dims={dims} is more than the model's {self._hidden_size} hidden dims",
                param="options.dims",
            )
        if options.get("strength") is not None and method is not None:
            try:
                CorruptionSpec(method, float(options["strength"]), dims)
            except ValueError as e:
                raise InvalidRequestError(str(e), param="options.strength") from e

    def _check_delta_options(self, options: dict[str, Any]) -> None:
        if self._offsets is None:
            raise InvalidRequestError(
                "δ modes are not available on this gateway (no local model to train on)",
                param="mode",
            )
        try:
            base = self._offsets.base_for(options)
            if options.get("unlearned_model"):
                check_pair(Path(options["unlearned_model"]), base)
            elif not (base / "config.json").is_file():
                raise ValueError(f"{base} is not a local model folder (no config.json)")
        except ValueError as e:
            raise InvalidRequestError(str(e), param="options") from e

    async def list_targets(self) -> list[TargetRecord]:
        return await asyncio.to_thread(self._registry.list_targets)

    async def get_target(self, target_id: str) -> TargetRecord:
        record = await asyncio.to_thread(self._registry.get_target, target_id)
        if record is None:
            raise NotFoundError(f"No target {target_id}", param="target_id")
        return record

    async def get_job(self, job_id: str) -> JobRecord:
        job = await asyncio.to_thread(self._registry.get_job, job_id)
        if job is None:
            raise NotFoundError(f"No job {job_id}", param="job_id")
        return job

    async def list_jobs(self, target_id: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The newest jobs first, all of them or one target's."""
        return await asyncio.to_thread(
            lambda: self._registry.list_jobs(target_id=target_id, limit=limit)
        )

    async def update_target(self, target_id: str, changes: dict[str, Any]) -> TargetRecord:
        """Enable, disable or override the threshold; the guard follows at once."""
        async with self._write_lock:
            record = await asyncio.to_thread(
                lambda: self._registry.update_target(target_id, **changes)
            )
            if record is None:
                raise NotFoundError(f"No target {target_id}", param="target_id")
            await self.reload()
        return record

    async def delete_target(self, target_id: str) -> None:
        async with self._write_lock:
            if not await asyncio.to_thread(self._registry.delete_target, target_id):
                raise NotFoundError(f"No target {target_id}", param="target_id")
            await self.reload()

    def describe(self, record: TargetRecord) -> TargetResponse:
        """The admin view of a target, with the threshold the guard applies now."""
        active = self._guard.active.get(record.name)
        load_error = self.load_errors.get(record.id)
        return TargetResponse(
            id=record.id,
            name=record.name,
            description=record.description,
            aliases=list(record.aliases),
            mode=record.mode,
            options=dict(record.options),
            status="failed" if load_error else record.status,
            enabled=record.enabled,
            active=active is not None and active.id == record.id,
            threshold=active.classifier.threshold if active else None,
            threshold_override=record.threshold_override,
            heldout_recall=_heldout_recall(record),
            version=record.version,
            calibration=dict(record.calibration) if record.calibration else None,
            error=f"cannot be enforced on this gateway: {load_error}"
            if load_error
            else record.error,
            n_forget_examples=len(record.forget_examples),
            n_retain_examples=len(record.retain_examples),
            created_at=record.created_at,
            updated_at=record.updated_at,
            active_version=record.active_version,
            pending_version=_summary(record.pending),
            failed_version=_summary(record.failed),
            load_error=load_error,
        )

    async def dry_run(
        self,
        *,
        prompt: str | None,
        messages: list[ChatMessageParam] | None,
        caller: Caller | None = None,
    ) -> ClassifyResponse:
        """What the guard would decide for this input, target by target (those in the caller's
        tenant scope)."""
        source: ChatPrompt | TextPrompt = (
            ChatPrompt(messages) if messages is not None else TextPrompt(prompt or "")
        )
        texts = self._guard.texts(source)
        text = texts[0]
        decisions = await self._guard.classify(texts)
        named = self._guard.bank.find_spans(text, [d.target for d in decisions if d.flagged])
        in_scope = self._guard.in_scope(caller)
        results = []
        for d in decisions:
            target = in_scope.get(d.target)
            if target is None:
                continue
            positions = None
            if d.flagged and self._guard.corruptor is not None and target.corruption is not None:
                _, positions = await self._guard.corrupt(source, [target])
            results.append(
                TargetDecision(
                    target_id=target.id,
                    target=target.name,
                    score=d.score,
                    threshold=d.threshold,
                    flagged=d.flagged,
                    stage=d.stage,
                    spans=[
                        Span(start=a, end=b, text=text[a:b]) for a, b in named.get(d.target, ())
                    ],
                    corrupted_positions=positions,
                )
            )
        return ClassifyResponse(flagged=any(r.flagged for r in results), text=text, results=results)

    # --- jobs (run by whichever replica holds the lease) -----------------------------------

    async def _run(self, lease: Lease) -> None:
        job = lease.job
        record = await asyncio.to_thread(self._registry.get_target, job.target_id)
        version = (
            await asyncio.to_thread(self._registry.get_version, job.target_id, job.version)
            if record is not None and job.version is not None
            else None
        )
        if record is None or version is None:
            return  # deleted meanwhile
        progress = self._progress(lease)
        artifacts, calibration = await self._build(lease, record.name, version, progress)
        progress("activate", 0.95)
        # Loaded before the switch (δ folders fetched, checks passed), so that this gateway
        # enforces the version as soon as the registry says it is active.
        ready = await asyncio.to_thread(
            self._active, record.id, record.name, version, {a.kind: a for a in artifacts}
        )
        async with self._write_lock:
            # Enforce the version before the registry says the job succeeded: a client that saw
            # it succeed is served with it (checked between the commit and this loop's next
            # turn, the old set would answer). Then re-read the whole set from the registry,
            # which also puts the old set back if the job could not finish (lease lost).
            current = await asyncio.to_thread(self._registry.get_target, record.id)
            self._loaded[(record.id, version.version)] = ready
            others = [t for t in self._guard.active.values() if t.id != record.id]
            if current is not None and current.enabled:
                others.append(_with_threshold(ready, current.threshold_override))
            self._guard.set_targets(others)
            try:
                await asyncio.to_thread(
                    lambda: self._registry.finish_job(
                        job.id,
                        artifacts=artifacts,
                        calibration=calibration,
                        owner=lease.owner,
                        attempt=lease.attempt,
                    )
                )
            finally:
                await self.reload()
        logger.info("Target %s (%s) v%d is active", record.name, record.id, version.version)

    async def _build(
        self,
        lease: Lease,
        name: str,
        version: VersionRecord,
        progress: Callable[[str, float], None],
    ) -> tuple[list[Artifact], dict[str, Any]]:
        """The version's artifacts and calibration report."""
        examples = [decode_example(e) for e in version.forget_examples]
        prompts = [p for p, _, _ in examples]
        options = dict(version.options)
        progress("classifier", 0.05)
        spec = TargetSpec(
            name=name,
            aliases=list(version.aliases),
            forget_examples=prompts,
            retain_examples=list(version.retain_examples),
            description=version.description,
        )
        config = TrainConfig(fpr=float(options.get("fpr", 0.01)), seed=int(options.get("seed", 0)))
        stages: dict[str, float] = {}
        # The classifier trains while the engine answers and the strength is searched: neither
        # needs the other.
        training = asyncio.ensure_future(
            _timed(
                stages, "classifier", asyncio.to_thread(train_target, spec, self._embedder, config)
            )
        )
        try:
            calibration: dict[str, Any] = {}
            artifacts: list[Artifact] = []
            if version.mode in ECO_MODES:
                progress("answers", 0.2)
                loop = asyncio.get_running_loop()

                async def answered() -> list[str]:
                    while not self._engine.ready:  # the bare answers come from the engine
                        await asyncio.sleep(0.5)
                    # All at once: the engine batches them (one at a time took ~1 s each).
                    got = await _timed(
                        stages,
                        "answers",
                        asyncio.gather(*(self._given_or_bare(p, a) for p, a, _ in examples)),
                    )
                    progress("corruption", 0.25)
                    return list(got)

                answers = asyncio.ensure_future(answered())

                async def shielded() -> list[str]:
                    return await asyncio.shield(answers)

                def wait_for_answers() -> list[str]:
                    return asyncio.run_coroutine_threadsafe(shielded(), loop).result()

                # The search loads its model copy while the engine answers; it waits for the
                # answers once loaded (`StrengthCalibrator.calibrate`).
                searching = asyncio.ensure_future(
                    _timed(
                        stages,
                        "corruption",
                        asyncio.to_thread(
                            self._corruption_spec,
                            version.target_id,
                            options,
                            list(version.aliases),
                            prompts,
                            wait_for_answers,
                            self._engine_generator(loop),
                        ),
                    )
                )
                # Both end before the job goes on or fails: the search thread cannot be
                # cancelled, and it releases its model copy when it ends.
                done = await asyncio.gather(answers, searching, return_exceptions=True)
                for outcome in done:
                    if isinstance(outcome, BaseException):
                        raise outcome
                corruption, report = searching.result()
                calibration["corruption"] = {"spec": corruption.to_dict(), **report}
                artifacts.append(
                    Artifact(
                        "corruption",
                        json.dumps(corruption.to_dict()).encode(),
                        {"torch": torch.__version__},
                    )
                )
            classifier = await training
        finally:
            training.cancel()  # a no-op once awaited; after a failure its result is not wanted
        recall = classifier.report.heldout_recall
        if recall < self._min_recall and not options.get("allow_low_recall"):
            raise LowRecallError(
                f"the classifier flags only {recall:.0%} of held-out prompts about "
                f"{name!r} (floor {self._min_recall:.0%}); add aliases (every name it "
                "goes by) and varied forget examples, or set options.allow_low_recall"
            )
        calibration = {"classifier": _report(classifier), **calibration}
        artifacts.insert(
            0, Artifact("classifier", classifier.to_bytes(), {"format": "classifier/npz+json"})
        )
        if version.mode in DELTA_MODES:
            artifact = await _timed(
                stages, "snap", self._offset(lease, name, version, prompts, calibration)
            )
            artifacts.append(artifact)
        calibration["stage_seconds"] = stages  # the classifier overlaps the others
        return artifacts, calibration

    async def _offset(
        self,
        lease: Lease,
        name: str,
        version: VersionRecord,
        prompts: list[str],
        calibration: dict[str, Any],
    ) -> Artifact:
        """Train (or adopt) the δ model and store its folders in the registry, once per job."""
        if self._offsets is None:
            raise RuntimeError("δ modes need a local model to train on")
        offsets = self._offsets
        done = (lease.job.checkpoint or {}).get("offset")
        if done is None:  # a takeover after the upload skips the training
            self._progress(lease)("snap", 0.3)
            known = [decode_example(e) for e in version.forget_examples]
            # Examples with wrong answers are alpha 'auto''s held-out set: SNAP neither refuses
            # nor unlearns them, so the α is chosen on questions the copy never trained on,
            # as users' questions will be (scored on its own training answers, the copy looks
            # far stronger than it is on new questions).
            answered = [(p, a, w) for p, a, w in known if a and w]
            held_out = {p for p, _, _ in answered}
            request = OffsetRequest(
                lease.job.id,
                name,
                version.aliases,
                [p for p in prompts if p not in held_out],
                version.retain_examples,
                dict(version.options),
                documents=[
                    (p, a)
                    for p, a, w in known
                    if a and not w and version.options.get("snap_npo", True)
                ],
                answered=answered,
            )
            spec, report = await offsets.prepare(request, self._progress(lease))
            self._progress(lease)("upload", 0.9)
            data, blobs = await asyncio.to_thread(offsets.publish, spec, dict(version.options))
            local = await asyncio.to_thread(offsets.resolve, data)  # this replica's copy
            report = {**report, "unlearned_model": local.unlearned, "bundles": _bundles(data)}
            done = {"data": data, "blobs": blobs, "report": {**asdict(local), **report}}
            await asyncio.to_thread(
                lambda: self._registry.save_checkpoint(
                    lease.job.id, {"offset": done}, owner=lease.owner, attempt=lease.attempt
                )
            )
        calibration["offset"] = done["report"]
        return Artifact(
            "offset",
            json.dumps(done["data"]).encode(),
            {"format": "offset/json+bundles", "blobs": done["blobs"]},
        )

    def _progress(self, lease: Lease) -> Callable[[str, float], None]:
        def report(stage: str, fraction: float) -> None:
            self._registry.update_job(
                lease.job.id,
                stage=stage,
                progress=fraction,
                owner=lease.owner,
                attempt=lease.attempt,
            )

        return report

    async def _given_or_bare(self, prompt: str, answer: str | None) -> str:
        return answer if answer else await self._bare_answer(prompt)

    async def _bare_answer(self, prompt: str) -> str:
        """What the model says today: the knowledge the corruption must remove."""
        request = GenerationRequest(
            request_id=f"register-{uuid.uuid4().hex}",  # unique: answers run concurrently
            prompt=ChatPrompt([{"role": "user", "content": prompt}]),
            sampling=SamplingOptions(max_tokens=48, temperature=0.0),
            stream=False,
        )
        parts = []
        async for chunk in self._engine.generate(request):
            parts += [c.text for c in chunk.choices]
        return "".join(parts)

    def _default_spec(self) -> CorruptionSpec:
        if self._calibrator is not None:
            return self._calibrator.default_spec()
        corruptor = self._guard.corruptor
        return corruptor.default_spec() if corruptor else CorruptionSpec.recommended(1.0)

    def _engine_generator(self, loop: asyncio.AbstractEventLoop) -> EmbedsGenerator:
        """Greedy generation from prompt embeddings by the serving engine, callable from a
        worker thread (the strength search's fluency check): the answers the guard would serve.
        """

        async def one(embeds: torch.Tensor, ids: list[int], max_new: int) -> list[int]:
            request = GenerationRequest(
                request_id=f"register-{uuid.uuid4().hex}",
                prompt=PromptEmbeds(embeds=embeds, token_ids=ids),
                sampling=SamplingOptions(max_tokens=max_new, temperature=0.0),
                stream=False,
            )
            out: list[int] = []
            async for chunk in self._engine.generate(request):
                for choice in chunk.choices:
                    out += choice.token_ids
            return out

        async def every(
            embeds: list[torch.Tensor], ids: list[list[int]], max_new: int
        ) -> list[list[int]]:
            return list(
                await asyncio.gather(
                    *(one(e, i, max_new) for e, i in zip(embeds, ids, strict=True))
                )
            )

        def generate(
            embeds: list[torch.Tensor], ids: list[list[int]], max_new: int
        ) -> list[list[int]]:
            return asyncio.run_coroutine_threadsafe(every(embeds, ids, max_new), loop).result()

        return generate

    def _corruption_spec(
        self,
        target_id: str,
        options: dict[str, Any],
        aliases: list[str],
        prompts: list[str],
        answers: Callable[[], list[str]],
        generate: EmbedsGenerator | None = None,
    ) -> tuple[CorruptionSpec, dict[str, Any]]:
        """The version's corruption: pinned by its options, else searched (see README).

        `answers` blocks until the forget examples' answers are known (the search loads its
        model first)."""
        pinned = {k: options[k] for k in PINNING_OPTIONS if options.get(k) is not None}
        default = self._default_spec()
        spec = CorruptionSpec(
            method=str(pinned.get("method", default.method)),
            strength=float(pinned.get("strength", default.strength)),
            dims=int(pinned["dims"]) if "dims" in pinned else default.dims,
            seed=int(options.get("seed", default.seed)),
        )
        if "strength" in pinned:
            return spec, {"searched": False, "reason": "strength given in options"}
        if not CORRUPTION_METHODS[spec.method].uses_strength:
            return spec, {"searched": False, "reason": f"{spec.method} has no strength to search"}
        if self._calibrator is None:
            return spec, {"searched": False, "reason": "no local model to calibrate against"}
        warm = warm_start_from_reports(
            self._earlier_searches(target_id), self._calibrator.model_key
        )
        return self._calibrator.calibrate(
            prompts, answers, aliases, spec, generate_with=generate, warm=warm
        )

    def _earlier_searches(self, target_id: str) -> list[dict[str, Any]]:
        """The corruption reports of the target's earlier versions, newest first.

        Only the same target's: other targets on one model cross far apart (1.6, 3.4 and 13.9x
        std for three 5-example targets on SmolLM2), and a warm start from them cost more
        strengths than the cold search (docs/results/performance.md, registration)."""
        versions = self._registry.list_versions(target_id) or []
        out = []
        for version in sorted(versions, key=lambda v: v.version, reverse=True):
            corruption = (version.calibration or {}).get("corruption")
            if isinstance(corruption, dict):
                out.append(corruption)
        return out


def _spec(new: NewTarget) -> dict[str, Any]:
    """A version's spec as the registry stores it."""
    return {
        "description": new.description,
        "aliases": new.aliases,
        "forget_examples": [encode_example(e) for e in new.forget_examples],
        "retain_examples": new.retain_examples,
        "mode": new.mode,
        "options": new.options,
    }


def _bundles(data: dict[str, Any]) -> dict[str, str]:
    """The registry bundles an offset artifact names (for its calibration report)."""
    return {
        role: bundle_digest(ref["bundle"])
        for role, ref in data.items()
        if isinstance(ref, dict) and "bundle" in ref
    }


def _with_threshold(target: ActiveTarget, override: float | None) -> ActiveTarget:
    if override is None:
        return target
    classifier = replace(target.classifier, threshold_logit=_logit(override))
    return replace(target, classifier=classifier)


def _summary(version: VersionRecord | None) -> VersionSummary | None:
    if version is None:
        return None
    return VersionSummary(
        version=version.version, status=version.status, job_id=version.job_id, error=version.error
    )


def _heldout_recall(record: TargetRecord) -> float | None:
    classifier = (record.calibration or {}).get("classifier") or {}
    value = classifier.get("heldout_recall")
    return float(value) if isinstance(value, int | float) else None


class LowRecallError(RuntimeError):
    """A target's classifier would miss too many prompts about it to be activated."""


async def _timed(stages: dict[str, float], stage: str, work: Awaitable[T]) -> T:
    """Await `work`, recording its seconds under `stage`."""
    started = time.perf_counter()
    try:
        return await work
    finally:
        stages[stage] = round(time.perf_counter() - started, 3)


def _report(classifier: TargetClassifier) -> dict[str, Any]:
    """The classifier's calibration report as plain JSON values."""
    report: dict[str, Any] = json.loads(json.dumps(asdict(classifier.report), default=str))
    return report
