"""Request fields this server refuses, and why (each refusal is a 400 whose `param` names it).

A field the models below do not declare is refused by pydantic (`extra="forbid"`); this table
gives the reason the client reads. The README's table of refused fields is this one.
"""

from __future__ import annotations

NOT_STORED = "nothing is stored on this server (no stored completions or responses)"
TEXT_ONLY = "the served model reads and writes text only"

REASONS: dict[str, str] = {
    # OpenAI chat completions
    "audio": f"audio output is not available: {TEXT_ONLY}",
    "function_call": "deprecated function calling is not served: use `tools` and `tool_choice`",
    "functions": "deprecated function calling is not served: use `tools` and `tool_choice`",
    "metadata": f"metadata is kept with stored objects, and {NOT_STORED}",
    "moderation": "OpenAI's moderation settings are not available on this server",
    "prediction": "predicted outputs are not available on this server",
    "prompt_cache_options": "prompt-cache settings are not configurable per request",
    "prompt_cache_retention": "prompt-cache retention is not configurable per request",
    "verbosity": "the served model has no verbosity control",
    "web_search_options": "web search is not available on this server",
    # OpenAI completions
    "suffix": "the served model does not support insertion (suffix)",
    # OpenAI responses
    "access_programs": "not available on this server",
    "background": f"background responses need a response store, and {NOT_STORED}",
    "background_options": f"background responses need a response store, and {NOT_STORED}",
    "context_management": "server-side context management is not available",
    "conversation": f"conversations are stored objects, and {NOT_STORED}",
    "image": f"image generation is not available: {TEXT_ONLY}",
    "max_tool_calls": "built-in tools are not available, so there is nothing to cap",
    "previous_response_id": f"previous responses cannot be looked up: {NOT_STORED}",
    "prompt": "stored prompt templates are not available (vLLM refuses them too)",
    # vLLM extras this gateway does not serve
    "chat_template": "a per-request chat template is not accepted (vLLM refuses it by default)",
    "use_beam_search": "beam search is not served through the guard",
    "length_penalty": "beam search is not served through the guard",
    "vllm_xargs": "per-request engine arguments are reserved for the gateway itself",
    "kv_transfer_params": "disaggregated serving parameters are not accepted from clients",
    "ec_transfer_params": "disaggregated serving parameters are not accepted from clients",
    "prompt_embeds": "raw prompt embeddings are not accepted from clients (vLLM can crash on "
    "malformed ones, and they would bypass the guard)",
    "add_special_tokens": "the prompt is tokenized as vLLM's default does; this is not adjustable",
    "truncate_prompt_tokens": "prompts are never truncated: the guard reads the whole prompt",
    "truncation_side": "prompts are never truncated: the guard reads the whole prompt",
    "logprob_token_ids": "logprobs of chosen token ids are not served",
    "return_tokens_as_token_ids": "token-id logprob strings are not served",
    "return_token_ids": "token ids are not returned",
    "return_token_offsets": "token offsets are not returned",
    "return_prompt_text": "the templated prompt text is not returned",
    "media_io_kwargs": TEXT_ONLY,
    "mm_processor_kwargs": TEXT_ONLY,
    "mm_payload": TEXT_ONLY,
    "return_mm_kwargs": TEXT_ONLY,
    "cache_salt": "prefix-cache salting is not configurable per request",
    "priority": "the engine does not run priority scheduling",
    "request_id": "request ids are given in the X-Request-Id header",
    "session_id": "sessions are not tracked",
    "watermarking": "watermarking is not available",
    "repetition_detection": "repetition detection is not available",
    "stream_interval": "streams are sent token by token",
    "thinking_token_budget": "the served model has no reasoning parser",
    "include_reasoning": "the served model has no reasoning parser",
    "enable_response_messages": "raw response messages are not returned",
    "previous_input_messages": f"previous responses cannot be looked up: {NOT_STORED}",
    "routed_experts_prompt_start": "expert routing data is not returned",
}


def reason(field: str) -> str:
    """Why `field` is refused (a generic reason for fields nobody listed)."""
    return REASONS.get(field, "this server does not accept this parameter")
