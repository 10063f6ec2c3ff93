"""A small real OpenAI-compatible upstream for fault tests: streams one word every 0.1 s.

    python -m tests.hardening.upstream_stub PORT

It answers GET /v1/models and streaming POST /v1/chat/completions (40 chunks, then [DONE]);
tests kill it with SIGKILL mid-stream and start it again on the same port. STUB_MODE makes it
misbehave instead (see below).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "stub-model"
WORDS = 40
# STUB_MODE=cut: close the stream cleanly after 3 words, without [DONE];
# STUB_MODE=garbage: send a malformed chunk after 3 words.
MODE = os.environ.get("STUB_MODE", "")


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "max_model_len": 2048}]})


async def chat(request: Request) -> Response:
    body = await request.json()

    async def events() -> AsyncIterator[str]:
        for i in range(min(WORDS, int(body.get("max_tokens") or WORDS))):
            chunk = {
                "id": "stub",
                "object": "chat.completion.chunk",
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
            if MODE and i == 2:
                if MODE == "garbage":
                    yield "data: {not json\n\n"
                return
            await asyncio.sleep(0.1)
        last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
        yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(
    routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
