"""The engine started on a prompt while the guard reads it (server.services.early): kept when
the verdict leaves the prompt as it was, aborted unread otherwise. The fake engine here; the
output guard reading the early stream: tests/server/test_output_guard.py; the real engine:
tests/e2e/test_forget_targets.py::test_a_burst_starts_early_and_keeps_only_unflagged_prompts."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import torch

from server.engine import ChatPrompt, GenerationRequest, SamplingOptions, TextPrompt
from server.engine.base import Prompt, PromptEmbeds
from server.engine.fake import FakeEngine
from server.errors import UnavailableError
from server.metrics import Metrics
from server.protocol.chat import ChatCompletionRequest
from server.services.generation import GenerationService
from server.services.guard import Guarded
from server.services.tenancy import Caller


class HeldGuard:
    """Decides when the test says so: `verdict` flags (corrupts) prompts containing "harry"."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.reading = asyncio.Event()
        self.fail = False

    def early_offsets(self, caller: Caller | None = None) -> tuple[Any, ...] | None:
        return ()

    async def protect(
        self, prompt: Prompt | Any, request_id: str, caller: Caller | None = None
    ) -> Guarded:
        self.reading.set()
        await self.release.wait()
        if self.fail:
            raise UnavailableError("the guard could not read it")
        text = " ".join(str(m.get("content")) for m in prompt.messages)
        if "harry" in text.lower():
            return Guarded(PromptEmbeds(torch.zeros(3, 4), [0, 0, 0]), flagged=("Harry Potter",))  # type: ignore[arg-type]
        return Guarded(prompt)


def service(engine: FakeEngine, guard: HeldGuard) -> tuple[GenerationService, Metrics]:
    metrics = Metrics()
    return GenerationService(engine, guard, metrics), metrics  # type: ignore[arg-type]


def chat(content: str, **extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}
    )


def early_starts(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("obliviate_early_starts_total", {"outcome": outcome})
    return value or 0.0


def answer(response: Any) -> str:
    return str(response.choices[0].message.content)


async def test_an_unflagged_prompt_reaches_the_engine_before_its_verdict_and_is_answered_once():
    engine = FakeEngine(starts_early=True)
    guard = HeldGuard()
    svc, metrics = service(engine, guard)
    engine.enqueue("plain answer")
    task = asyncio.create_task(svc.create_chat_completion(chat("What is rain?"), "r1"))
    await guard.reading.wait()
    await asyncio.sleep(0.01)
    # The verdict is pending, and the engine has the prompt as it came.
    assert [r.request_id for r in engine.history] == ["chatcmpl-r1"]
    assert isinstance(engine.history[0].prompt, ChatPrompt)
    guard.release.set()
    assert answer(await task) == "plain answer"
    assert len(engine.history) == 1  # kept: not sent a second time
    assert engine.aborted == []
    assert (early_starts(metrics, "kept"), early_starts(metrics, "aborted")) == (1, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_flagged_prompt_s_early_request_is_aborted_and_never_read(stream: bool):
    engine = FakeEngine(starts_early=True)
    guard = HeldGuard()
    svc, metrics = service(engine, guard)
    # The early request takes the first reply: the raw prompt's answer, which must not leave.
    engine.enqueue("Harry Potter was written by J.K. Rowling", "I do not know")
    task = asyncio.create_task(
        svc.create_chat_completion(chat("Who wrote Harry Potter?", stream=stream), "r2")
    )
    await guard.reading.wait()
    await asyncio.sleep(0.01)
    assert len(engine.history) == 1  # started early
    guard.release.set()
    result = await task
    if stream:
        events = [piece async for piece in result]  # type: ignore[union-attr]
        text = "".join(
            choice["delta"].get("content") or ""
            for event in events
            if event.startswith("data: {")
            for choice in json.loads(event[6:])["choices"]
        )
    else:
        text = answer(result)
    assert text == "I do not know"
    assert engine.aborted == ["chatcmpl-r2"]  # the early one, before anything was read of it
    assert isinstance(engine.history[1].prompt, PromptEmbeds)  # the protected one, sent after
    assert (early_starts(metrics, "kept"), early_starts(metrics, "aborted")) == (0, 1)


async def test_a_guard_error_aborts_the_early_request_and_sends_nothing_else():
    engine = FakeEngine(starts_early=True)
    guard = HeldGuard()
    guard.fail = True
    svc, metrics = service(engine, guard)
    engine.enqueue("the unguarded answer")
    task = asyncio.create_task(svc.create_chat_completion(chat("What is rain?"), "r3"))
    await guard.reading.wait()
    guard.release.set()
    with pytest.raises(UnavailableError):
        await task
    assert engine.aborted == ["chatcmpl-r3"]
    assert len(engine.history) == 1
    assert early_starts(metrics, "aborted") == 1


async def test_a_client_gone_before_the_verdict_aborts_the_early_request():
    engine = FakeEngine(starts_early=True)
    guard = HeldGuard()
    svc, metrics = service(engine, guard)
    task = asyncio.create_task(svc.create_chat_completion(chat("What is rain?"), "r4"))
    await guard.reading.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == ["chatcmpl-r4"]
    assert engine.running == 0
    assert early_starts(metrics, "aborted") == 1


async def test_an_engine_that_does_not_start_early_gets_the_prompt_after_its_verdict():
    engine = FakeEngine()  # as an upstream service: starts_early False
    guard = HeldGuard()
    svc, metrics = service(engine, guard)
    task = asyncio.create_task(svc.create_chat_completion(chat("What is rain?"), "r5"))
    await guard.reading.wait()
    await asyncio.sleep(0.01)
    assert engine.history == []
    guard.release.set()
    await task
    assert len(engine.history) == 1
    assert early_starts(metrics, "kept") == 0


async def test_several_prompts_each_keep_or_abort_their_own_early_request():
    from server.protocol.completion import CompletionRequest

    engine = FakeEngine(starts_early=True)
    guard = HeldGuard()
    svc, metrics = service(engine, guard)
    req = CompletionRequest.model_validate(
        {"model": "fake-model", "prompt": ["What is rain?", "Who is harry?"], "max_tokens": 4}
    )
    # Text prompts: HeldGuard reads chat messages only, so read the text instead.
    guard_protect = guard.protect

    async def protect(prompt: Any, request_id: str, caller: Caller | None = None) -> Guarded:
        if isinstance(prompt, TextPrompt):
            chat_like = ChatPrompt(({"role": "user", "content": prompt.text},))
            decided = await guard_protect(chat_like, request_id, caller)
            return Guarded(prompt) if decided.prompt is chat_like else decided
        return await guard_protect(prompt, request_id, caller)

    guard.protect = protect  # type: ignore[method-assign]
    task = asyncio.create_task(svc.create_completion(req, "r6"))
    await guard.reading.wait()
    await asyncio.sleep(0.01)
    guard.release.set()
    await task
    assert engine.aborted == ["cmpl-r6-1"]
    assert [r.request_id for r in engine.history].count("cmpl-r6-1") == 2
    assert (early_starts(metrics, "kept"), early_starts(metrics, "aborted")) == (1, 1)


def test_the_request_started_early_is_the_one_built_after_the_verdict():
    prompt = ChatPrompt(({"role": "user", "content": "hi"},))
    sampling = SamplingOptions(max_tokens=4)
    early = GenerationRequest("r", prompt, sampling, False)
    assert GenerationRequest("r", prompt, sampling, False) == early
    assert GenerationRequest("r", PromptEmbeds(torch.zeros(1, 4), [1]), sampling, False) != early  # type: ignore[arg-type]
