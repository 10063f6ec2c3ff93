"""Forget targets: registration jobs, activation, enable/disable, delete, dry-run classify.

A registration runs as a background job: train the target's classifier (seconds), find its
corruption strength against the served model (offline zeroth-order search), store both as the
target's next version in one registry transaction, then swap the guard's active set. Requests in
flight never see a half-registered target. Jobs a crashed process left unfinished are re-run at
start, from the inputs the registry kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from classifier import Embedder, TargetClassifier, TargetSpec, TrainConfig, train_target, warm_up
from corruption import CorruptionSpec, EmbedsGenerator
from offset import DeltaSpec
from server.engine import (
    ChatPrompt,
    Engine,
    GenerationRequest,
    PromptEmbeds,
    SamplingOptions,
    TextPrompt,
)
from server.errors import ConflictError, InvalidRequestError, NotFoundError
from server.protocol.admin import ClassifyResponse, Span, TargetDecision, TargetResponse
from server.protocol.common import ChatMessageParam
from server.registry import (
    Artifact,
    DuplicateTargetError,
    JobRecord,
    Registry,
    RegistryError,
    TargetRecord,
)
from server.services.guard import ActiveTarget, EcoGuard
from server.services.offsets import OffsetRequest, OffsetTrainer, check_pair
from server.services.strength import StrengthCalibrator

logger = logging.getLogger(__name__)
T = TypeVar("T")

SUPPORTED_MODES = ("eco", "delta", "eco+delta")
ECO_MODES = ("eco", "eco+delta")
DELTA_MODES = ("delta", "eco+delta")


@dataclass(frozen=True)
class NewTarget:
    name: str
    description: str
    aliases: Sequence[str]
    forget_examples: Sequence[tuple[str, str | None]]  # (prompt, known answer or None)
    retain_examples: Sequence[str]
    mode: str
    options: dict[str, Any]


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
    ) -> None:
        self._registry = registry
        self._guard = guard
        self._engine = engine
        self._embedder = embedder
        self._calibrator = calibrator
        self._offsets = offsets
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every active target, re-queue unfinished jobs, start the job worker."""
        await self.reload()
        for job in await asyncio.to_thread(self._registry.unfinished_jobs):
            logger.info("Re-running registration job %s left unfinished", job.id)
            self._queue.put_nowait(job.id)
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def reload(self) -> None:
        """Rebuild the guard's active set from the registry (checksums checked)."""
        records = await asyncio.to_thread(self._registry.list_targets)
        active = []
        for record in records:
            if record.status == "active" and record.enabled:
                active.append(await asyncio.to_thread(self._load, record))
        self._guard.set_targets(active)

    async def sync(self) -> None:
        """Reload after a change made elsewhere (another gateway), never mid-way through ours."""
        async with self._write_lock:
            await self.reload()

    def _load(self, record: TargetRecord) -> ActiveTarget:
        artifacts = self._registry.load_artifacts(record.id, record.version)
        classifier = TargetClassifier.from_bytes(artifacts["classifier"].data)
        if record.threshold_override is not None:
            classifier = replace(classifier, threshold_logit=_logit(record.threshold_override))
        spec = (
            CorruptionSpec.from_dict(json.loads(artifacts["corruption"].data))
            if "corruption" in artifacts
            else None
        )
        offset = None
        if "offset" in artifacts:
            offset = DeltaSpec(**json.loads(artifacts["offset"].data))
        scope = str(record.options.get("scope", "flagged"))
        return ActiveTarget(
            record.id, record.name, record.aliases, spec, classifier, offset=offset, scope=scope
        )

    # --- admin operations ------------------------------------------------------------------

    async def register(self, new: NewTarget) -> JobRecord:
        """Record the target and queue its registration job (202)."""
        if new.mode not in SUPPORTED_MODES:
            raise InvalidRequestError(
                f"mode {new.mode!r} is not available yet; supported: {', '.join(SUPPORTED_MODES)}",
                param="mode",
            )
        if new.mode in DELTA_MODES:
            self._check_delta_options(new.options)
        try:
            _, job = await asyncio.to_thread(
                lambda: self._registry.create_target(
                    name=new.name,
                    description=new.description,
                    aliases=new.aliases,
                    forget_examples=[json.dumps([p, a]) for p, a in new.forget_examples],
                    retain_examples=new.retain_examples,
                    mode=new.mode,
                    options=new.options,
                )
            )
        except DuplicateTargetError as e:
            raise ConflictError(str(e), param="name", code="target_exists") from e
        self._queue.put_nowait(job.id)
        return job

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
        return TargetResponse(
            id=record.id,
            name=record.name,
            description=record.description,
            aliases=list(record.aliases),
            mode=record.mode,
            options=dict(record.options),
            status=record.status,
            enabled=record.enabled,
            active=active is not None and active.id == record.id,
            threshold=active.classifier.threshold if active else None,
            threshold_override=record.threshold_override,
            version=record.version,
            calibration=dict(record.calibration) if record.calibration else None,
            error=record.error,
            n_forget_examples=len(record.forget_examples),
            n_retain_examples=len(record.retain_examples),
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    async def dry_run(
        self, *, prompt: str | None, messages: list[ChatMessageParam] | None
    ) -> ClassifyResponse:
        """What the guard would decide for this input, target by target."""
        source: ChatPrompt | TextPrompt = (
            ChatPrompt(messages) if messages is not None else TextPrompt(prompt or "")
        )
        text = self._guard.prompt_text(source)
        decisions = await self._guard.classify(text)
        results = []
        for d in decisions:
            target = self._guard.active.get(d.target)
            if target is None:
                continue
            positions = None
            if d.flagged and self._guard.corruptor is not None and target.corruption is not None:
                _, positions = await asyncio.to_thread(
                    self._guard.corruptor.corrupt, source, target.aliases, target.corruption
                )
            results.append(
                TargetDecision(
                    target_id=target.id,
                    target=target.name,
                    score=d.score,
                    threshold=d.threshold,
                    flagged=d.flagged,
                    stage=d.stage,
                    spans=[Span(start=a, end=b, text=text[a:b]) for a, b in d.spans],
                    corrupted_positions=positions,
                )
            )
        return ClassifyResponse(flagged=any(r.flagged for r in results), text=text, results=results)

    # --- registration jobs -----------------------------------------------------------------

    async def _work(self) -> None:
        # Embed the classifier's shipped negatives once (10-30 s) before a job needs them.
        await asyncio.to_thread(warm_up, self._embedder)
        while True:
            job_id = await self._queue.get()
            try:
                await self._run(job_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.exception("Registration job %s failed", job_id)
                try:
                    message = f"{type(e).__name__}: {e}"
                    await asyncio.to_thread(self._registry.fail_job, job_id, message)
                except Exception:  # the registry is down too: the job re-runs at the next start
                    logger.exception("Could not record the failure of job %s", job_id)

    async def _run(self, job_id: str) -> None:
        job = await asyncio.to_thread(self._registry.get_job, job_id)
        if job is None or job.status not in ("queued", "running"):
            return
        record = await self.get_target(job.target_id)
        examples = [tuple(json.loads(e)) for e in record.forget_examples]
        progress = self._progress(job_id)
        stages: dict[str, float] = {}

        progress("classifier", 0.05)
        spec = TargetSpec(
            name=record.name,
            aliases=list(record.aliases),
            forget_examples=[p for p, _ in examples],
            retain_examples=list(record.retain_examples),
            description=record.description,
        )
        config = TrainConfig(
            fpr=float(record.options.get("fpr", 0.01)), seed=int(record.options.get("seed", 0))
        )
        # The classifier trains on one core while the engine answers and the strength is
        # searched: neither needs the other.
        training = asyncio.ensure_future(
            _timed(
                stages, "classifier", asyncio.to_thread(train_target, spec, self._embedder, config)
            )
        )
        try:
            prompts = [p for p, _ in examples]
            calibration: dict[str, Any] = {}
            artifacts = []
            if record.mode in ECO_MODES:
                progress("answers", 0.2)
                while not self._engine.ready:  # the bare answers come from the engine
                    await asyncio.sleep(0.5)
                # All at once: the engine batches them (one at a time took ~1 s each).
                answers = list(
                    await _timed(
                        stages,
                        "answers",
                        asyncio.gather(*(self._given_or_bare(p, a) for p, a in examples)),
                    )
                )
                progress("corruption", 0.25)
                generate = self._engine_generator(asyncio.get_running_loop())
                corruption, strength_report = await _timed(
                    stages,
                    "corruption",
                    asyncio.to_thread(self._corruption_spec, record, prompts, answers, generate),
                )
                calibration["corruption"] = {"spec": corruption.to_dict(), **strength_report}
                artifacts.append(
                    Artifact(
                        "corruption",
                        json.dumps(corruption.to_dict()).encode(),
                        {"torch": torch.__version__},
                    )
                )
            if record.mode in DELTA_MODES:
                if self._offsets is None:
                    raise RuntimeError("δ modes need a local model to train on")
                progress("snap", 0.3)
                request = OffsetRequest(
                    job_id,
                    record.name,
                    record.aliases,
                    prompts,
                    record.retain_examples,
                    dict(record.options),
                )
                offset, offset_report = await _timed(
                    stages, "snap", self._offsets.prepare(request, progress)
                )
                calibration["offset"] = {**asdict(offset), **offset_report}
                artifacts.append(
                    Artifact(
                        "offset", json.dumps(asdict(offset)).encode(), {"format": "offset/json"}
                    )
                )
            classifier = await training
        finally:
            training.cancel()  # a no-op once awaited; after a failure its result is not wanted
        calibration = {"classifier": _report(classifier), **calibration}
        artifacts.insert(
            0, Artifact("classifier", classifier.to_bytes(), {"format": "classifier/npz+json"})
        )

        progress("activate", 0.95)
        calibration["stage_seconds"] = stages  # the classifier overlaps the others
        async with self._write_lock:
            try:
                await asyncio.to_thread(
                    lambda: self._registry.finish_job(
                        job_id, artifacts=artifacts, calibration=calibration
                    )
                )
            except RegistryError as e:  # deleted while training: nothing to activate
                logger.info("Job %s: %s", job_id, e)
                return
            await self.reload()
        logger.info("Target %s (%s) is active", record.name, record.id)

    def _progress(self, job_id: str) -> Callable[[str, float], None]:
        def report(stage: str, fraction: float) -> None:
            self._registry.update_job(job_id, stage=stage, progress=fraction)

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
        record: TargetRecord,
        prompts: list[str],
        answers: list[str],
        generate: EmbedsGenerator | None = None,
    ) -> tuple[CorruptionSpec, dict[str, Any]]:
        options = record.options
        base = (
            CorruptionSpec.from_dict(
                {k: options[k] for k in ("method", "strength", "dims", "seed") if k in options}
            )
            if any(k in options for k in ("method", "strength", "dims"))
            else None
        )
        if base is not None and "strength" in options:
            return base, {"searched": False, "reason": "strength given in options"}
        if self._calibrator is None:
            corruptor = self._guard.corruptor
            fallback = corruptor.default_spec() if corruptor else CorruptionSpec.recommended(1.0)
            spec = base or fallback
            return spec, {"searched": False, "reason": "no local model to calibrate against"}
        return self._calibrator.calibrate(
            prompts, answers, list(record.aliases), base, generate_with=generate
        )


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
