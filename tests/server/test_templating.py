"""render_prompt renders a conversation exactly as vLLM's server does (its renderer as oracle).

vLLM's own functions (parse_chat_messages + safe_apply_chat_template, what its chat endpoint
runs) render the same requests on the same tokenizer: the served model's template, a template
that renders tools, tool calls and tool turns, and one that loops over content parts and knows
the developer role. The guard's corruptor renders through render_prompt, so a flagged request
with tools is corrupted over the very text vLLM would read.
"""

from __future__ import annotations

from typing import Any

import pytest

from server.engine import ChatPrompt
from server.engine.templating import render_prompt
from server.protocol.chat import ChatMessage, ToolDefinition
from server.services.requests import template_kwargs, tool_dicts

TOOLS_TEMPLATE = """
{%- if tools %}<|im_start|>system
You may call these tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% endif -%}
{%- for message in messages -%}
<|im_start|>{{ message['role'] }}{% if message.name %} name={{ message.name }}{% endif %}
{% if message.content %}{{ message.content }}{% endif -%}
{%- if message.tool_calls %}{% for call in message.tool_calls -%}
<tool_call>{"name": "{{ call.function.name }}", "arguments": \
{{- call.function.arguments | tojson }}}</tool_call>
{%- endfor %}{% endif -%}
{%- if message.tool_call_id %} (result of {{ message.tool_call_id }}){% endif -%}
{%- if not (loop.last and continue_final_message) %}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
{%- if documents %}[{{ documents | length }} documents]{% endif -%}
{%- if reasoning_effort %}[effort {{ reasoning_effort }}]{% endif -%}
"""

PARTS_TEMPLATE = """
{%- for message in messages -%}
[{{ message['role'] }}]{% for part in message['content'] -%}
({{ part['type'] }}:{{ part['text'] }}){% endfor %}
{% if message['role'] == 'developer' %}(developer turn){% endif %}
{%- endfor -%}
{%- if add_generation_prompt %}[assistant]{% endif -%}
"""

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}

CONVERSATIONS: list[
    tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, dict[str, Any]]
] = [
    (
        "plain",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        None,
        {},
    ),
    (
        "developer merged into system",
        [
            {"role": "system", "content": "One."},
            {"role": "developer", "content": "Two."},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": ""},
        ],
        None,
        {},
    ),
    (
        "tool round trip",
        [
            {"role": "user", "content": "Weather in Paris?", "name": "ann"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [{"type": "text", "text": "sunny"}],
            },
            {"role": "user", "content": "Thanks"},
        ],
        [TOOL],
        {},
    ),
    (
        "invalid and empty arguments",
        [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": "calling",
                "tool_calls": [
                    {**CALL, "function": {"name": "get_weather", "arguments": "{not json"}},
                    {**CALL, "id": "c2", "function": {"name": "get_weather", "arguments": "[1]"}},
                    {**CALL, "id": "c3", "function": {"name": "get_weather", "arguments": ""}},
                ],
            },
        ],
        [TOOL],
        {},
    ),
    (
        "text parts",
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "first"},
                    {"type": "input_text", "text": "second"},
                ],
            }
        ],
        None,
        {},
    ),
    (
        "continue the final message",
        [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}],
        None,
        {"add_generation_prompt": False, "continue_final_message": True},
    ),
    (
        "template kwargs",
        [{"role": "user", "content": "x"}],
        None,
        {"documents": [{"title": "t", "text": "d"}], "reasoning_effort": "low"},
    ),
]


@pytest.fixture(scope="module")
def vllm_render():
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer
    from vllm.config import ModelConfig
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template

    from server.modelstore import resolve_model

    path = resolve_model(None, auto_pull=True)
    model_config = ModelConfig(model=str(path))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def render(template: str, messages, tools, kwargs) -> tuple[Any, str]:
        tokenizer.chat_template = template  # render_prompt reads the tokenizer's template
        # vLLM caches the content format by template text: name the template explicitly.
        fmt = resolve_chat_template_content_format(
            template, tools, "auto", tokenizer, model_config=model_config
        )
        conversation, _, _ = parse_chat_messages(messages, model_config, fmt)
        text = safe_apply_chat_template(
            model_config,
            tokenizer,
            conversation,
            tools=tools,
            chat_template=template,
            tokenize=False,
            **kwargs,
        )
        return tokenizer, text

    original = tokenizer.chat_template
    yield render, original
    tokenizer.chat_template = original


@pytest.mark.parametrize("template", ["served", "tools", "parts"])
@pytest.mark.parametrize(
    ("case", "messages", "tools", "extra"), CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS]
)
def test_render_prompt_matches_vllm(vllm_render, template, case, messages, tools, extra) -> None:
    render, served = vllm_render
    chosen = {"served": served, "tools": TOOLS_TEMPLATE, "parts": PARTS_TEMPLATE}[template]
    kwargs = template_kwargs(
        add_generation_prompt=extra.get("add_generation_prompt", True),
        continue_final_message=extra.get("continue_final_message", False),
        documents=extra.get("documents"),
        reasoning_effort=extra.get("reasoning_effort"),
    )
    tokenizer, expected = render(chosen, messages, tools, kwargs)
    prompt = ChatPrompt(
        [ChatMessage.model_validate(m).to_param() for m in messages],
        tools=tool_dicts([ToolDefinition.model_validate(t) for t in tools] if tools else None),
        template_kwargs=kwargs,
    )
    assert render_prompt(tokenizer, prompt).text == expected


@pytest.mark.parametrize("template", ["served", "tools", "parts"])
def test_snap_training_prompts_are_the_chat_requests_vllm_reads(vllm_render, template) -> None:
    """SNAP trains the small model on prompts it will be served: one user turn rendered as vLLM
    renders that chat request (a template looping over content parts gets a list of parts)."""
    from offset.snap_data import chat_prompt

    render, served = vllm_render
    chosen = {"served": served, "tools": TOOLS_TEMPLATE, "parts": PARTS_TEMPLATE}[template]
    question = "Tell me about Harry Potter."
    kwargs = template_kwargs()
    tokenizer, expected = render(chosen, [{"role": "user", "content": question}], None, kwargs)
    assert chat_prompt(tokenizer, question) == expected
