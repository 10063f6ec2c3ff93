"""Construction from settings (engine, guard) and FastAPI dependencies for `app.state`."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from offset.delta_args import FQCN as DELTA_FQCN
from server.auth import ApiKeys
from server.engine import Engine
from server.engine.openai_upstream import OpenAIUpstreamEngine, UpstreamConfig
from server.engine.tool_parsing import ToolParserConfig, ToolParsing
from server.engine.upstream_delta import UpstreamDeltaDecoder
from server.errors import AuthenticationError
from server.logs import current_request_id, sane_request_id
from server.metrics import Metrics
from server.registry import Registry
from server.services.corruptor import PromptCorruptor
from server.services.generation import GenerationService
from server.services.guard import EcoGuard
from server.services.jobs import LeaseConfig
from server.services.offsets import OffsetTrainer, SnapDefaults
from server.services.responses import ResponsesService
from server.services.strength import StrengthCalibrator, calibration_dtype
from server.services.targets import TargetService
from server.services.tenancy import Caller
from server.settings import Settings

if TYPE_CHECKING:
    from corruption import EmbeddingTable

logger = logging.getLogger(__name__)


def local_model_dir(settings: Settings) -> Path | None:
    """The served model's local folder, when there is one (for tokenizer and embeddings)."""
    from server.modelstore import resolve_model

    if settings.engine == "openai_upstream" and settings.model is None:
        return None
    return resolve_model(settings.model, settings.model_cache_dir, auto_pull=settings.auto_pull)


def build_engine(settings: Settings) -> tuple[Engine, Path | None]:
    """The engine the settings ask for (not started) and its local model folder."""
    if settings.engine == "openai_upstream":
        up = settings.upstream
        if up.url is None:
            raise ValueError("engine=openai_upstream needs upstream.url")
        model_dir = local_model_dir(settings)
        upstream = OpenAIUpstreamEngine(
            UpstreamConfig(
                base_url=up.url,
                api_key=up.api_key.get_secret_value() if up.api_key else None,
                model=up.model,
                served_model_name=settings.served_model_name,
                connect_timeout_s=up.connect_timeout_s,
                read_timeout_s=up.read_timeout_s,
                max_connections=up.max_connections,
            ),
            delta=_upstream_delta(settings, model_dir) if settings.delta.enabled else None,
            tool_parsing=_upstream_tools(settings, model_dir),
        )
        return upstream, model_dir
    from server.engine.vllm_local import VllmEngineConfig, VllmLocalEngine

    path = local_model_dir(settings)
    assert path is not None  # vllm_local always resolves a folder (or raises)
    v = settings.vllm
    engine = VllmLocalEngine(
        VllmEngineConfig(
            model_path=path,
            served_model_name=settings.served_model_name or path.name,
            dtype=v.dtype,
            max_model_len=v.max_model_len,
            kv_cache_gib=v.kv_cache_gib,
            enforce_eager=v.enforce_eager,
            device=v.device,
            gpu_memory_utilization=v.gpu_memory_utilization,
            tensor_parallel_size=v.tensor_parallel_size,
            max_num_seqs=v.max_num_seqs,
            max_logprobs=v.max_logprobs,
            seed=v.seed,
            logits_processors=(DELTA_FQCN,) if settings.delta.enabled else (),
            tools=_tool_config(settings),
        )
    )
    return engine, path


def _tool_config(settings: Settings) -> ToolParserConfig:
    t = settings.tools
    return ToolParserConfig(t.tool_call_parser, t.enable_auto_tool_choice)


def _upstream_tools(settings: Settings, model_dir: Path | None) -> ToolParsing | None:
    """The upstream's tool parser, here, for flagged requests (they go as prompt embeddings)."""
    if settings.tools.tool_call_parser is None or model_dir is None:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return ToolParsing(_tool_config(settings), tokenizer)


@functools.cache
def embedding_table(model_dir: Path) -> EmbeddingTable:
    """The served model's input embeddings, loaded once per process (engine and guard share)."""
    from corruption import EmbeddingTable

    return EmbeddingTable.from_model_dir(model_dir)


def _config_dtype(model_dir: Path) -> str | None:
    """The dtype a model folder's config.json names. vLLM's `auto` serves a bfloat16 config in
    bfloat16; a float32 one (or none) it may serve in bf16 as well, where the search then stays
    in float32: slower, never looser."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def _upstream_delta(settings: Settings, model_dir: Path | None) -> UpstreamDeltaDecoder:
    """δ for an upstream engine: small models in this process, on the configured device."""
    from offset import OffsetModels
    from server.engine.vllm_local import resolve_device

    table = embedding_table(model_dir) if model_dir is not None else None
    return UpstreamDeltaDecoder(
        OffsetModels(resolve_device(settings.delta.device)),
        top_k=settings.delta.upstream_top_k,
        draft_tokens=settings.delta.upstream_draft_tokens,
        embed=table.lookup if table is not None else None,
    )


def build_guard(
    settings: Settings,
    engine: Engine,
    model_dir: Path | None,
    registry: Registry,
    metrics: Metrics,
) -> tuple[EcoGuard, TargetService]:
    """The ECO guard and the target service over `registry` (targets loaded on start)."""
    import torch
    from threadpoolctl import threadpool_limits

    from classifier import ClassifierBank, Embedder

    # One stage-2 prompt took ~300 ms instead of ~20 ms with 2 threads fighting the engine for
    # 2 cores; the guard's models are small. Process-wide, so it is set here, at the top.
    torch.set_num_threads(settings.guard.torch_threads)
    # numpy's BLAS too: the first stage's matrix products are tiny, and with 2 BLAS threads
    # waiting for a busy core a burst's batch at 100 targets took ~25 ms more
    # (bench/classifier_scaling.py --blas-threads 0). Process-wide and kept (no `with`).
    threadpool_limits(settings.guard.torch_threads, user_api="blas")
    # The shipped negatives' embeddings (the classifier's warm-up) are kept beside the models:
    # a restarted gateway or a new replica on the same volume reads them instead of spending
    # 10-30 s of CPU on them while it serves.
    from server.modelstore import default_cache_dir

    models = settings.model_cache_dir or default_cache_dir()
    embedder = Embedder(
        settings.guard.embedder_path,
        device=settings.guard.device,
        corpus_dir=models / "corpus-embeddings",
    )
    bank = ClassifierBank(embedder)
    corruptor: PromptCorruptor | None = None
    calibrator: StrengthCalibrator | None = None
    if model_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        table = embedding_table(model_dir)
        corruptor = PromptCorruptor(tokenizer, table, bank.find_spans)
        if settings.guard.calibrate_strength:
            served: str | None = settings.vllm.dtype if settings.engine == "vllm_local" else None
            if served == "auto":
                served = _config_dtype(model_dir)
            calibrator = StrengthCalibrator(
                model_dir,
                table,
                workers=settings.guard.calibration_workers,
                dtype=calibration_dtype(settings.guard.calibration_dtype, served),
            )
    else:
        logger.warning(
            "No local copy of the served model (--model PATH): flagged requests will be refused "
            "instead of corrupted"
        )
    guard = EcoGuard(
        bank,
        corruptor,
        metrics,
        log_prompts=settings.log_prompts,
        loop_chars=settings.guard.loop_chars,
        loop_batch=settings.guard.loop_batch,
        loop_batch_chars=settings.guard.loop_batch_chars,
    )
    from server.engine.vllm_local import resolve_device

    offsets = OffsetTrainer(
        settings.data_dir / "offsets",
        model_dir,
        SnapDefaults(max_steps=settings.delta.snap_max_steps, lr=settings.delta.snap_lr),
        blobs=registry.blobs,
        device=resolve_device(settings.delta.device),
    )
    service = TargetService(
        registry,
        guard,
        engine,
        embedder,
        calibrator,
        offsets,
        min_recall=settings.guard.min_heldout_recall,
        metrics=metrics,
        leases=LeaseConfig(settings.jobs.lease_seconds, settings.jobs.poll_interval),
        hidden_size=embedding_table(model_dir).hidden_size if model_dir is not None else None,
    )
    return guard, service


# Dependencies are `async def`: FastAPI runs a plain function on a worker thread, a thread hop
# (and a wait for the GIL behind a busy loop) per dependency per request
# (tests/server/test_no_thread_hops.py).


async def get_generation_service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.generation
    return service


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_request_id(request: Request) -> str:
    """The request's id (RequestIdMiddleware): the client's sane X-Request-Id, else a fresh one."""
    return current_request_id() or sane_request_id(request.headers.get("x-request-id"))


async def get_caller(request: Request) -> Caller:
    """Who is calling, from the API key (the /v1 gate has already refused bad keys; routes
    outside /v1, such as /tokenize, are refused here)."""
    keys: ApiKeys = request.app.state.api_keys
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    caller = keys.caller(token.strip() if scheme.lower() == "bearer" else None)
    if caller is None:
        raise AuthenticationError(
            "Missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key"
        )
    return caller


@dataclass(frozen=True)
class Call:
    """What a generation route needs, in one dependency: FastAPI solves each dependency with
    the whole of its machinery (~10 us apiece), on every request's way to the guard."""

    request_id: str
    """The request's id (`get_request_id`)."""
    caller: Caller
    """Who is calling (`get_caller`)."""
    generation: GenerationService
    responses: ResponsesService


async def get_call(request: Request) -> Call:
    state = request.app.state
    return Call(
        await get_request_id(request), await get_caller(request), state.generation, state.responses
    )


GenerationServiceDep = Annotated[GenerationService, Depends(get_generation_service)]
CallerDep = Annotated[Caller, Depends(get_caller)]
CallDep = Annotated[Call, Depends(get_call)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
