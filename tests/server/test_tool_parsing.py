"""Tool parsing applied by the gateway (flagged chats through an upstream), with vLLM's hermes
parser and the served model's tokenizer."""

from __future__ import annotations

import json
import pathlib

import pytest

from server.engine.base import ChoiceDelta, ToolOptions
from server.engine.tool_parsing import ToolParserConfig, ToolParsing, ToolStream

MODEL = pathlib.Path.home() / ".cache/obliviate/models/SmolLM2-135M-Instruct"
RECORD = {
    "type": "function",
    "function": {
        "name": "record_author",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def parsing() -> ToolParsing:
    pytest.importorskip("vllm")
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip(f"no SmolLM2 tokenizer at {MODEL} (run `make setup` to convert the model)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    return ToolParsing(ToolParserConfig("hermes", True), tokenizer)


def test_a_whole_answer_parsed_from_many_deltas_keeps_all_it_wrote(parsing: ToolParsing) -> None:
    """The output guard reads `raw_text`: for a non-streamed answer it is everything the model
    wrote, not the last delta's piece (which let a tool call's arguments pass unread)."""
    pieces = ['<tool_call>\n{"name": "record_author", ', '"arguments": {"name": "J.R.R. Tol']
    pieces += ['kien"}}\n</tool_call>']
    stream = ToolStream(parsing.session(None, ToolOptions([RECORD], "auto"), None), stream=False)
    out = [
        stream.apply(ChoiceDelta(0, text, token_ids=[i], finish_reason=None), None)
        for i, text in enumerate(pieces[:-1])
    ]
    assert out == [None, None]  # held until the answer is whole
    last = stream.apply(ChoiceDelta(0, pieces[-1], token_ids=[9], finish_reason="stop"), None)
    assert last is not None and last.raw_text == "".join(pieces)
    (call,) = last.tool_calls or []
    assert json.loads(call.arguments or "") == {"name": "J.R.R. Tolkien"}
    assert last.finish_reason == "tool_calls"
