"""vLLM `AsyncLLM` in the gateway's process: the embedded default engine.

Prompts are templated and tokenized here exactly as vLLM's own OpenAI server does (HF chat
template with the generation prompt, then token ids), and sampling defaults follow the same
precedence (request, then the model's generation_config, then OpenAI's), so unflagged requests
come out byte-identical to `vllm serve` on the same model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from offset.delta_args import FQCN, delta_extra_args
from server.engine.base import (
    ChatPrompt,
    ChoiceDelta,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    PromptEmbeds,
    RenderedPrompt,
    SamplingOptions,
    TextPrompt,
    TokenLogprob,
    TokenPrompt,
    TopLogprob,
)
from server.engine.prompt_logprobs import prompt_logprobs
from server.engine.templating import render_prompt
from server.engine.tool_parsing import ToolParserConfig, ToolParsing, ToolStream
from server.errors import ContextLengthError, EngineError, InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

# OpenAI's defaults, applied last (vLLM's `_DEFAULT_SAMPLING_PARAMS`).
_OPENAI_DEFAULTS: dict[str, float | int] = {
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
}


@dataclass(frozen=True)
class VllmEngineConfig:
    """What the engine is built from; filled by the app factory from `Settings.vllm`."""

    model_path: Path
    served_model_name: str
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_num_seqs: int | None = None
    max_logprobs: int = 20
    seed: int = 0
    logits_processors: tuple[str, ...] = ()
    disable_log_stats: bool = True
    tools: ToolParserConfig = ToolParserConfig()


def resolve_device(device: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; asking for cuda without one fails."""
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device == "cuda" and not has_cuda:
        raise RuntimeError(
            "vllm.device=cuda but torch sees no CUDA device; install the CUDA vLLM build "
            "(`pip install obliviate[gpu]`) on a GPU machine, or use vllm.device=cpu"
        )
    return device


class VllmLocalEngine:
    """`Engine` over an in-process `vllm.v1.engine.async_llm.AsyncLLM`."""

    def __init__(self, config: VllmEngineConfig) -> None:
        self._config = config
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._defaults: dict[str, Any] = {}
        self._max_model_len = config.max_model_len
        self._tool_parsing: ToolParsing | None = None

    @property
    def model(self) -> ModelCard:
        return ModelCard(
            id=self._config.served_model_name,
            max_model_len=self._max_model_len,
            root=str(self._config.model_path),
        )

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def running(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0

    @property
    def tokenizer(self) -> Any:
        """The served model's HF tokenizer (available once started)."""
        return self._tokenizer

    async def start(self) -> None:
        """Build the engine off the event loop so /health answers while it loads (~25 s)."""
        self._llm = await asyncio.to_thread(self._build)
        self._tokenizer = self._llm.get_tokenizer()
        model_config = self._llm.model_config
        self._defaults = model_config.get_diff_sampling_param()
        self._max_model_len = model_config.max_model_len
        self._tool_parsing = ToolParsing(self._config.tools, self._tokenizer)
        if self._defaults:
            logger.info("Sampling defaults from the model's generation_config: %s", self._defaults)

    def _build(self) -> AsyncLLM:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        config = self._config
        device = resolve_device(config.device)
        args = AsyncEngineArgs(
            model=str(config.model_path),
            served_model_name=config.served_model_name,
            dtype=config.dtype,  # type: ignore[arg-type]
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            enable_prompt_embeds=True,
            max_logprobs=config.max_logprobs,
            seed=config.seed,
            max_num_seqs=config.max_num_seqs,
            disable_log_stats=config.disable_log_stats,
            logits_processors=list(config.logits_processors) or None,
        )
        if device == "cpu":
            args.kv_cache_memory_bytes = int(config.kv_cache_gib * 2**30)
        else:
            args.gpu_memory_utilization = config.gpu_memory_utilization
            args.tensor_parallel_size = config.tensor_parallel_size
        logger.info("Starting vLLM on %s with %s", device, config.model_path)
        # The server's usage context: its defaults (max_num_seqs, max_num_batched_tokens) differ
        # from the library's on large GPUs (1024 sequences instead of 128 on an H100).
        return AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    def render(self, prompt: ChatPrompt | TextPrompt) -> RenderedPrompt:
        """Template + tokenize as vLLM's server does."""
        return render_prompt(self._require_tokenizer(), prompt)

    async def tokenize(
        self,
        prompt: ChatPrompt | TextPrompt,
        add_special_tokens: bool | None = None,
        token_strs: bool = False,
    ) -> RenderedPrompt:
        """/tokenize: the prompt's token ids as this engine reads them."""
        tokenizer = self._require_tokenizer()
        rendered = self.render(prompt)
        default = isinstance(prompt, TextPrompt)
        if add_special_tokens is not None and add_special_tokens != default:
            ids = tokenizer.encode(rendered.text, add_special_tokens=add_special_tokens)
            rendered = RenderedPrompt(text=rendered.text, token_ids=ids)
        if token_strs:
            strs = [str(t) for t in tokenizer.convert_ids_to_tokens(rendered.token_ids)]
            rendered = replace(rendered, token_strs=strs)
        return rendered

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """/detokenize: token ids -> text (ids outside the vocabulary: 400, as vLLM)."""
        tokenizer = self._require_tokenizer()
        size = len(tokenizer)
        bad = next((t for t in token_ids if t >= size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Token id {bad} is out of vocabulary (size {size})", param="tokens"
            )
        return str(tokenizer.decode(list(token_ids)))

    def _require_tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise UnavailableError("The engine is still loading")
        return self._tokenizer

    def _sampling_params(
        self, options: SamplingOptions, prompt_len: int, stream: bool, every: int = 1
    ) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if prompt_len >= self._max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self._max_model_len} tokens; "
                f"the prompt has {prompt_len} tokens, leaving no room for a completion."
            )
        room = self._max_model_len - prompt_len
        requested = options.max_tokens or self._defaults.get("max_tokens")
        max_tokens = min(room, requested) if requested else room
        given = {
            "repetition_penalty": options.repetition_penalty,
            "presence_penalty": options.presence_penalty,
            "frequency_penalty": options.frequency_penalty,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "top_k": options.top_k,
            "min_p": options.min_p,
        }
        sampling: dict[str, Any] = {
            name: value if (value := given[name]) is not None else self._defaults.get(name, default)
            for name, default in _OPENAI_DEFAULTS.items()
        }
        stop_ids = list(options.stop_token_ids)
        for tid in self._defaults.get("stop_token_ids") or ():  # as vLLM merges them
            if tid not in stop_ids:
                stop_ids.append(tid)
        try:
            return SamplingParams.from_optional(
                n=options.n,
                **sampling,
                seed=options.seed,
                stop=list(options.stop) or None,
                stop_token_ids=stop_ids or None,
                bad_words=list(options.bad_words) or None,
                include_stop_str_in_output=options.include_stop_str_in_output,
                ignore_eos=options.ignore_eos,
                logprobs=options.logprobs,
                prompt_logprobs=options.prompt_logprobs,
                max_tokens=max_tokens,
                min_tokens=options.min_tokens,
                skip_special_tokens=options.skip_special_tokens,
                spaces_between_special_tokens=options.spaces_between_special_tokens,
                logit_bias=options.logit_bias,
                allowed_token_ids=(
                    list(options.allowed_token_ids) if options.allowed_token_ids else None
                ),
                structured_outputs=_structured(options.structured),
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
                stream_interval=every if stream and every > 1 else None,
                extra_args=options.extra_args,
            )
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e

    def _engine_prompt(self, prompt: GenerationRequest) -> tuple[dict[str, Any], list[int]]:
        """vLLM's prompt dict and the prompt's token ids."""
        p = prompt.prompt
        if isinstance(p, PromptEmbeds):
            # Embeddings only: vLLM 0.32 reads positions from prompt_token_ids whenever they are
            # given without a prompt_is_token_ids mask, which would silently undo the corruption.
            if prompt.sampling.prompt_logprobs is None:
                return {"prompt_embeds": p.embeds}, list(p.token_ids)
            # Prompt logprobs need the ids as targets; the all-False mask keeps every position
            # read from the (corrupted) embeddings, so the logprobs are those of what it read.
            ids = list(p.token_ids)
            return {
                "prompt_embeds": p.embeds,
                "prompt_token_ids": ids,
                "prompt_is_token_ids": [False] * len(ids),
            }, ids
        ids = list(p.token_ids) if isinstance(p, TokenPrompt) else self.render(p).token_ids
        return {"prompt_token_ids": ids}, ids

    def _with_offsets(self, request: GenerationRequest, prompt_ids: list[int]) -> SamplingOptions:
        """δ requests carry their offset models and prompt ids to the logits processor."""
        options = request.sampling
        if not request.offsets:
            return options
        if FQCN not in self._config.logits_processors:
            raise UnavailableError(
                "This request needs δ mode, but the engine was started without its logits "
                "processor (delta.enabled=false)."
            )
        extra = {**(options.extra_args or {}), **delta_extra_args(request.offsets, prompt_ids)}
        return replace(options, extra_args=extra)

    def _tool_stream(self, request: GenerationRequest) -> tuple[ToolStream | None, SamplingOptions]:
        """Tool calls: vLLM's checks, its constraint for the tool choice, and its parsing."""
        options = request.sampling
        if request.tools is None or self._tool_parsing is None:
            return None, options
        self._tool_parsing.check(request.tools)
        chat = request.prompt if isinstance(request.prompt, ChatPrompt) else None
        session = self._tool_parsing.session(chat, request.tools, options.structured)
        return ToolStream(session, request.stream), replace(options, structured=session.constraint)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream `RequestOutput` deltas as `GenerationChunk`s."""
        llm = self._llm
        if llm is None:
            raise UnavailableError("The engine is still loading")
        engine_prompt, prompt_ids = self._engine_prompt(request)
        prompt_len = len(prompt_ids)
        tools, options = self._tool_stream(request)
        options = self._with_offsets(replace(request, sampling=options), prompt_ids)
        params = self._sampling_params(options, prompt_len, request.stream, request.stream_every)
        completion_tokens = 0
        first = True
        tok = self._tokenizer
        try:
            async for out in llm.generate(engine_prompt, params, request.request_id):  # type: ignore[arg-type]
                deltas = []
                for o in out.outputs:
                    ids = list(o.token_ids)
                    completion_tokens += len(ids)
                    delta: ChoiceDelta | None = ChoiceDelta(
                        index=o.index,
                        text=o.text,
                        token_ids=ids,
                        logprobs=_logprobs(ids, o.logprobs, request.sampling.logprobs, tok),
                        finish_reason=_finish(o.finish_reason),
                        stop_reason=o.stop_reason,
                    )
                    if tools is not None and delta is not None:
                        delta = tools.apply(delta, prompt_ids)
                    if delta is not None:
                        deltas.append(delta)
                chunk = GenerationChunk(deltas, prompt_len, completion_tokens)
                if first and options.prompt_logprobs is not None:
                    chunk.prompt_logprobs = prompt_logprobs(out.prompt_logprobs, prompt_ids, tok)
                    chunk.prompt_token_ids = prompt_ids
                first = False
                yield chunk
        except ValueError as e:  # vLLM's own request validation
            raise InvalidRequestError(str(e)) from e
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            if type(e).__name__ in ("VLLMValidationError", "VLLMClientError"):
                raise InvalidRequestError(str(e)) from e
            logger.exception("vLLM failed request %s", request.request_id)
            raise EngineError(f"The engine failed: {type(e).__name__}") from e


def _structured(constraint: Mapping[str, Any] | None) -> Any:
    """vLLM's StructuredOutputsParams for a constraint (None: unconstrained)."""
    if not constraint:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    try:
        return StructuredOutputsParams(**constraint)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(str(e), param="response_format") from e


def _finish(reason: str | None) -> FinishReason | None:
    if reason in ("stop", "length", "abort"):
        return reason  # type: ignore[return-value]
    return None if reason is None else "stop"


def _logprobs(
    ids: list[int], positions: Any, top_n: int | None, tokenizer: Any
) -> list[TokenLogprob] | None:
    if top_n is None or positions is None:
        return None
    result = []
    for token_id, position in zip(ids, positions, strict=False):
        if position is None:
            continue

        def text(tid: int, lp: Any) -> str:
            return str(lp.decoded_token if lp.decoded_token is not None else tokenizer.decode(tid))

        chosen = position[token_id]
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
        top = tuple(
            TopLogprob(text(tid, lp), max(lp.logprob, -9999.0))
            for tid, lp in ranked
            if lp.rank is not None and lp.rank <= top_n
        )[:top_n]
        result.append(TokenLogprob(text(token_id, chosen), max(chosen.logprob, -9999.0), top))
    return result
