"""Protocol requests -> what the guard and the engine read (prompt, sampling, tools).

One place turns each API's fields into engine terms, so chat, completions and responses agree
on what every field means (vLLM's meaning: `vllm/entrypoints/openai/*/protocol.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from server.engine import ChatPrompt, SamplingOptions, TextPrompt, TokenPrompt, ToolOptions
from server.errors import InvalidRequestError
from server.protocol.chat import ChatCompletionRequest, ToolDefinition
from server.protocol.common import ChatMessageParam
from server.protocol.completion import CompletionRequest
from server.protocol.structured import constraint


def template_kwargs(
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    documents: Any = None,
    reasoning_effort: str | None = None,
    user_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The chat template's kwargs as vLLM merges them: the request's `chat_template_kwargs`,
    overridden by the named fields that are set (and `enable_thinking` from the effort)."""
    extra: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "documents": documents,
        "reasoning_effort": reasoning_effort,
    }
    user = dict(user_kwargs or {})
    if reasoning_effort is not None and "enable_thinking" not in user:
        extra["enable_thinking"] = reasoning_effort != "none"
    return user | {k: v for k, v in extra.items() if v not in (None, "auto")}


def tool_dicts(tools: Sequence[ToolDefinition] | None) -> list[dict[str, Any]] | None:
    """Tool definitions as vLLM hands them to the template (unset optional fields dropped)."""
    if not tools:
        return None
    out = []
    for tool in tools:
        f = tool.function
        function: dict[str, Any] = {
            "name": f.name,
            "description": f.description,
            "parameters": f.parameters,
        }
        if f.strict is not None:
            function["strict"] = f.strict
        out.append({"type": "function", "function": function})
    return out


def chat_prompt(req: ChatCompletionRequest) -> ChatPrompt:
    """The conversation, its tools and the template kwargs, as the client sent them."""
    messages: list[ChatMessageParam] = [m.to_param() for m in req.messages]
    return ChatPrompt(
        messages,
        tools=tool_dicts(req.tools),
        template_kwargs=template_kwargs(
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            documents=req.documents,
            reasoning_effort=req.reasoning_effort,
            user_kwargs=req.chat_template_kwargs,
        ),
    )


def chat_tools(req: ChatCompletionRequest) -> ToolOptions | None:
    """Tool calling options (vLLM's default: `auto` when tools are given, else `none`)."""
    if req.tools is None:
        if req.tool_choice not in (None, "none"):
            raise InvalidRequestError(
                "When using `tool_choice`, `tools` must be set.", param="tool_choice"
            )
        return None
    choice: str | Mapping[str, Any]
    if req.tool_choice is None:
        choice = "auto"
    elif isinstance(req.tool_choice, str):
        choice = req.tool_choice
    else:
        choice = req.tool_choice.model_dump(mode="json")
        if choice["function"]["name"] not in {t.function.name for t in req.tools}:
            raise InvalidRequestError(
                "The tool specified in `tool_choice` does not match any of the specified `tools`",
                param="tool_choice",
            )
    return ToolOptions(tool_dicts(req.tools) or [], choice, req.parallel_tool_calls)


def chat_sampling(req: ChatCompletionRequest) -> SamplingOptions:
    """Sampling for a chat request (`max_completion_tokens` wins over `max_tokens`)."""
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    if req.stream and req.prompt_logprobs not in (None, 0):
        raise InvalidRequestError(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is None and req.echo:
        prompt_logprobs = req.top_logprobs or 0  # as vLLM: echo asks the engine for them
    return sampling(
        req,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        prompt_logprobs=prompt_logprobs,
        structured=constraint(req.response_format, req.structured_outputs),
    )


def completion_sampling(req: CompletionRequest) -> SamplingOptions:
    """Sampling for a completions request (echo with logprobs asks for prompt logprobs)."""
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is None and req.echo:
        prompt_logprobs = req.logprobs
    return sampling(
        req,
        # max_tokens=0 with echo: only the prompt (the engine still makes one token, unsent).
        max_tokens=req.max_tokens or 1,
        logprobs=req.logprobs,
        prompt_logprobs=prompt_logprobs,
        structured=constraint(req.response_format, req.structured_outputs),
    )


def sampling(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    structured: Mapping[str, Any] | None,
) -> SamplingOptions:
    """The sampling fields both APIs share."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=stop,
        n=req.n,
        logprobs=logprobs,
        logit_bias=logit_bias(req.logit_bias),
        min_tokens=req.min_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        bad_words=tuple(req.bad_words or ()),
        allowed_token_ids=tuple(req.allowed_token_ids) if req.allowed_token_ids else None,
        prompt_logprobs=prompt_logprobs,
        structured=structured,
    )


def logit_bias(bias: Mapping[str, float] | None) -> dict[int, float] | None:
    """Token-id keyed logit bias (keys must be token ids)."""
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError as e:
        raise InvalidRequestError("logit_bias keys must be token ids", param="logit_bias") from e


def completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]],
) -> list[TextPrompt | TokenPrompt]:
    """One engine prompt per prompt of a completions request."""
    if isinstance(prompt, str):
        return [TextPrompt(prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [TokenPrompt([int(p) for p in prompt])]  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in prompt):
        return [TextPrompt(str(p)) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [TokenPrompt(list(p)) for p in prompt]  # type: ignore[arg-type]
    raise InvalidRequestError(
        "prompt must be a string, strings, token ids or lists of them", param="prompt"
    )
