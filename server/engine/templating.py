"""Chat templating exactly as vLLM's OpenAI server does it (shared by the engine and the guard)."""

from __future__ import annotations

from typing import Any

from server.engine.base import ChatPrompt, RenderedPrompt, TextPrompt
from server.errors import InvalidRequestError


def render_prompt(tokenizer: Any, prompt: ChatPrompt | TextPrompt) -> RenderedPrompt:
    """Chat: HF template + generation prompt, no extra special tokens; text: tokenizer defaults."""
    if isinstance(prompt, TextPrompt):
        return RenderedPrompt(text=prompt.text, token_ids=tokenizer.encode(prompt.text))
    try:
        text = tokenizer.apply_chat_template(
            list(prompt.messages), tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # the template rejects the conversation (roles, order)
        raise InvalidRequestError(
            f"The chat template rejected the messages: {e}", param="messages"
        ) from e
    return RenderedPrompt(text=text, token_ids=tokenizer.encode(text, add_special_tokens=False))
