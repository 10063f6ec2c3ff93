"""The operators' playground: one prompt, the guard's verdict, and two answers side by side.

The guarded answer is a real chat request through `GenerationService` (so it is decided,
counted and audited like any client's, with a `playground-` request id); the bare answer is the
same prompt sent to the engine untouched, which is what the model would say without obliviate.
Both are greedy, so they differ only where the guard changed the prompt. The bare answer can show
exactly what the model must forget: it exists for administrators, behind the admin token.
"""

from __future__ import annotations

import asyncio
import uuid

from pydantic import ValidationError

from server.engine import ChatPrompt, Engine, GenerationRequest, SamplingOptions
from server.errors import GatewayError, InvalidRequestError, validation_message
from server.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from server.protocol.common import ChatMessageParam
from server.protocol.operations import PlaygroundResponse, Refusal
from server.services.generation import GenerationService
from server.services.targets import TargetService


class PlaygroundService:
    """Dry-run classification plus the bare and the guarded answer of one conversation."""

    def __init__(self, targets: TargetService, generation: GenerationService, engine: Engine):
        self._targets = targets
        self._generation = generation
        self._engine = engine

    async def try_prompt(
        self, messages: list[ChatMessageParam], *, max_tokens: int
    ) -> PlaygroundResponse:
        request_id = f"playground-{uuid.uuid4().hex[:16]}"
        request = self._chat_request(messages, max_tokens)  # refuses what a client would get
        classification = await self._targets.dry_run(prompt=None, messages=messages)
        bare, guarded = await asyncio.gather(
            self._bare(messages, max_tokens, request_id),
            self._guarded(request, request_id),
            return_exceptions=True,
        )
        if isinstance(bare, BaseException):
            raise bare
        refusal = None
        if isinstance(guarded, GatewayError):  # what the client would get: show it, not a 500
            refusal = Refusal(
                status=guarded.status_code, type=guarded.error_type, message=guarded.message
            )
        elif isinstance(guarded, BaseException):
            raise guarded
        return PlaygroundResponse(
            classification=classification,
            bare=bare,
            guarded=None if refusal else guarded,
            guarded_error=refusal,
            request_id=request_id,
        )

    async def _bare(self, messages: list[ChatMessageParam], max_tokens: int, rid: str) -> str:
        request = GenerationRequest(
            request_id=f"{rid}-bare",
            prompt=ChatPrompt(messages),
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0),
            stream=False,
        )
        parts = []
        async for chunk in self._engine.generate(request):
            parts += [c.text for c in chunk.choices]
        return "".join(parts)

    def _chat_request(
        self, messages: list[ChatMessageParam], max_tokens: int
    ) -> ChatCompletionRequest:
        body = {
            "model": self._engine.model.id,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            message, param = validation_message([dict(d) for d in e.errors()])
            raise InvalidRequestError(message, param=param) from e

    async def _guarded(self, request: ChatCompletionRequest, rid: str) -> str:
        response = await self._generation.create_chat_completion(request, rid)
        assert isinstance(response, ChatCompletionResponse)  # stream=False
        return response.choices[0].message.content or ""
