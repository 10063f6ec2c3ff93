"""Chat templating as vLLM's OpenAI server does it (bottom layer: no project imports)."""

from .template import TemplateError, render_chat, template_conversation, user_turn

__all__ = ["TemplateError", "render_chat", "template_conversation", "user_turn"]
