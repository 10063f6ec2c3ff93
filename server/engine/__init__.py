"""Engines behind one small protocol: in-process vLLM, an OpenAI-compatible upstream, a fake."""

from server.engine.base import (
    ChatPrompt,
    ChoiceDelta,
    Engine,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    PromptEmbeds,
    PromptLogprob,
    RenderedPrompt,
    SamplingOptions,
    TextPrompt,
    TokenLogprob,
    TokenPrompt,
    ToolCallDelta,
    ToolOptions,
    TopLogprob,
)

__all__ = [
    "ChatPrompt",
    "ChoiceDelta",
    "Engine",
    "GenerationChunk",
    "GenerationRequest",
    "ModelCard",
    "PromptEmbeds",
    "PromptLogprob",
    "RenderedPrompt",
    "SamplingOptions",
    "TextPrompt",
    "TokenLogprob",
    "TokenPrompt",
    "ToolCallDelta",
    "ToolOptions",
    "TopLogprob",
]
