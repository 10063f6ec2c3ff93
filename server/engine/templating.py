"""Prompts rendered for the engine and the guard: chat prompts through `chat.render_chat` (the one
place a chat template is applied, exactly as vLLM's OpenAI server does it; see chat/template.py),
text prompts with the tokenizer's defaults. A template that cannot take the request is the
client's error: a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from chat import TemplateError, render_chat
from server.engine.base import ChatPrompt, RenderedPrompt, TextPrompt
from server.errors import InvalidRequestError


def render_prompt(tokenizer: Any, prompt: ChatPrompt | TextPrompt) -> RenderedPrompt:
    """Chat: HF template + generation prompt, no extra special tokens; text: tokenizer defaults."""
    if isinstance(prompt, TextPrompt):
        return RenderedPrompt(text=prompt.text, token_ids=tokenizer.encode(prompt.text))
    try:
        text = render_chat(
            tokenizer, prompt.messages, tools=prompt.tools, template_kwargs=prompt.template_kwargs
        )
    except TemplateError as e:
        raise InvalidRequestError(str(e), param=e.param) from e
    return RenderedPrompt(text=text, token_ids=tokenizer.encode(text, add_special_tokens=False))
