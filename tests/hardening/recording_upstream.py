"""An OpenAI-compatible upstream that streams a short answer and records what it was sent.

    python -m tests.hardening.recording_upstream PORT RECORD_FILE

For every generation it appends one JSON line to RECORD_FILE: the X-Request-Id the gateway sent,
the route, and whether the prompt arrived as embeddings (`prompt_embeds`: the guard corrupted it)
or as text. The chaos test checks every flagged request against it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "stub-model"
CHUNKS = 8
RECORD = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("upstream-record.jsonl")


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "max_model_len": 4096}]})


async def generate(request: Request) -> Response:
    body = await request.json()
    chat = request.url.path.endswith("/chat/completions")
    line = {
        "request_id": request.headers.get("x-request-id", ""),
        "route": "chat" if chat else "completions",
        "embeds": "prompt_embeds" in body,
    }
    with RECORD.open("a") as f:
        f.write(json.dumps(line) + "\n")

    async def events() -> AsyncIterator[str]:
        for i in range(CHUNKS):
            delta = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
            choice = {"index": 0, **delta, "finish_reason": "length" if i == CHUNKS - 1 else None}
            yield f"data: {json.dumps({'id': 'up', 'model': MODEL, 'choices': [choice]})}\n\n"
            await asyncio.sleep(0.03)
        usage = {"prompt_tokens": 5, "completion_tokens": CHUNKS, "total_tokens": 5 + CHUNKS}
        yield f"data: {json.dumps({'id': 'up', 'model': MODEL, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(
    routes=[
        Route("/v1/models", models),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
