"""The output guard: what the model writes is watched as it streams, like stop strings.

generate(prompt, guarded, request)
  ├─ no active target ──> the engine's stream, untouched
  └─ each choice's text as it comes (token by token; in chunks when the client reads one answer):
       ├─ held back only while its last words could still become an alias ("Harry" before
       │   " Potter"); everything before is released at once
       ├─ it names a target (full alias, a specific part, a typo, an obfuscated form), or so
       │   does a top_logprobs alternative or the stop string (or token) it stopped on, each
       │   read after the text before it, or at a sentence end the target's classifier flags
       │   the recent answer text
       │   ──> the naming tokens are never released; generation restarts from the prompt plus
       │       the text already released, with the targets' spans (or, where the prompt does not
       │       name them, the content of every turn) corrupted, as prompt embeddings; δ targets
       │       (scope `flagged`) switch their offset on; the names are banned (bad_words)
       └─ after `max_restarts` restarts the choice ends there ("stop"), its held text dropped
An error inside the watcher ends the stream with an error: unchecked text is never released.
"""

from __future__ import annotations

import asyncio
import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Protocol

from classifier import StreamScanner, alias_kind
from server.engine import (
    ChoiceDelta,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TokenPrompt,
)
from server.engine.base import Prompt, joined_deltas
from server.errors import EngineError, GatewayError, InvalidRequestError
from server.metrics import Metrics
from server.services.guard import ActiveTarget, EcoGuard, Guarded, PromptIn
from server.services.stops import GatewayStops, StopHit
from server.services.tenancy import Caller

logger = logging.getLogger(__name__)
audit = logging.getLogger("obliviate.audit")

_SENTENCE_END = re.compile(r"[.!?\n]")
_LETTER = re.compile(r"[^\W\d_]")
_CLASSIFY_WINDOW = 400  # characters of answer text the classifier reads at a sentence end
_WORD = re.compile(r"\S+")
_ONE_ANSWER_EVERY = 16  # tokens per engine chunk when the client reads one answer, not a stream
_ORIGINAL = 0
TokenTexts = Callable[[Sequence[int], Sequence[int]], list[str] | None]
"""(the choice's token ids so far, a delta's ids) -> the text each of those ids adds."""


def window_start(text: str, checked: int, min_words: int = 0) -> int:
    """Where the classifier's read of an answer starts at a sentence end: the text since the
    last read (`checked`), at most `_CLASSIFY_WINDOW` characters back; with `min_words`, a
    stretch of fewer words reads that many words, taking them from the text before it (read
    already) within the same bound.

    A short stretch ("The water cycle", "1. Evaporation", an answer cut by max_tokens) tells a
    classifier little on its own; at 20 targets such fragments passed person targets' gates
    and went to MiniLM (docs/results/performance.md). Read with the words before them they
    are read at the same moment, with more of what the answer says."""
    start = max(checked, len(text) - _CLASSIFY_WINDOW)
    if min_words <= 0 or start == 0:
        return start
    bound = max(0, len(text) - _CLASSIFY_WINDOW)
    starts = [m.start() for m in _WORD.finditer(text, bound)]  # of the words in the bound
    new = len(starts) - bisect_left(starts, start)
    if new == 0 or new >= min_words:
        return start  # nothing new to read (the caller reads nothing), or enough of it
    return starts[-min_words] if len(starts) >= min_words else bound


def sentence_read(
    text: str, checked: int, written: str, final: bool, min_words: int = 0
) -> str | None:
    """What the classifier reads of an answer once `written` has been added to `text` (the
    answer so far): None when it reads nothing yet (the answer goes on, and no sentence end
    in `written`, or no letter since the last read: "\n2." of a numbered list, a quarter of
    the reads of a model's answers, is read with the sentence after it); else the text from
    `window_start`, the new `checked` being `len(text)` (a blank window: nothing new to
    read)."""
    if not final and (not _SENTENCE_END.search(written) or not _LETTER.search(text, checked)):
        return None
    return text[window_start(text, checked, min_words) :]


class OutputWatcher(Protocol):
    """Turns a guarded request into the stream the client may see."""

    def generate(
        self,
        prompt: PromptIn,
        guarded: Guarded,
        request: GenerationRequest,
        caller: Caller | None = None,
    ) -> AsyncIterator[GenerationChunk]: ...


class UnwatchedOutput:
    """No output guard: the engine's stream as it is."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def generate(
        self,
        prompt: PromptIn,
        guarded: Guarded,
        request: GenerationRequest,
        caller: Caller | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        return self._engine.generate(request)


@dataclass
class _Choice:
    """One choice's text as generated by its current source, and what was released of it."""

    source: int = _ORIGINAL
    text: str = ""
    released: int = 0  # characters of `text` the client has
    hold: int = 0  # characters of `text` that may be released now
    held: list[ChoiceDelta] = field(default_factory=list)
    released_ids: list[int] = field(default_factory=list)  # token ids the client has
    source_tokens: int = 0  # of those, the ones its current source wrote
    restarts: int = 0
    checked: int = 0  # end of the text the classifier last read
    done: bool = False
    stopped: bool = False  # ended by one of the client's stops, applied here (`stops`)

    @property
    def released_tokens(self) -> int:
        return len(self.released_ids)


class OutputGuard:
    """`OutputWatcher` that keeps the registered targets out of what the model writes."""

    def __init__(
        self,
        guard: EcoGuard,
        engine: Engine,
        metrics: Metrics,
        *,
        max_restarts: int = 2,
        classify: bool = True,
        window_words: int = 0,
    ) -> None:
        self._guard = guard
        self._engine = engine
        self._metrics = metrics
        self._max_restarts = max_restarts
        self._classify = classify
        self._window_words = window_words  # `window_start`'s min_words

    def generate(
        self,
        prompt: PromptIn,
        guarded: Guarded,
        request: GenerationRequest,
        caller: Caller | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        targets = self._guard.in_scope(caller)
        if not targets:
            return self._engine.generate(request)
        tenant = caller.label if caller else "-"
        if request.sampling.prompt_logprobs is None:
            return self._watch(prompt, guarded, request, targets, tenant)
        return self._scored(prompt, guarded, request, targets, tenant)

    async def _scored(
        self,
        prompt: PromptIn,
        guarded: Guarded,
        request: GenerationRequest,
        targets: Mapping[str, ActiveTarget],
        tenant: str,
    ) -> AsyncIterator[GenerationChunk]:
        """A request asking for prompt logprobs: their alternatives are the model's predictions
        at each prompt position, so one naming a target reveals it (" Rowling" after "J.K.")
        though the prompt was not flagged. Such a prompt is sent again protected for those
        targets before anything leaves, as if the classifier had flagged it."""
        try:
            async for chunk in self._watch(prompt, guarded, request, targets, tenant):
                yield chunk
            return
        except _PromptNamesTarget as named:
            found = named.targets
        for target in found:
            self._metrics.decisions.labels(target.id, "prompt_logprobs_restart", tenant).inc()
        eco = [t for t in found if t.corruption is not None]
        if len(eco) < len(found) or self._guard.corruptor is None:
            raise InvalidRequestError(
                "prompt logprobs are not available for this prompt: it concerns a protected "
                "topic answered in a mode whose prompt logprobs would reveal it",
                param="prompt_logprobs",
            )
        involved = self._involved(found, guarded)
        corrupted, _ = await self._guard.corrupt(prompt, list(involved.values()))
        protected = Guarded(corrupted, guarded.offsets, tuple(involved))
        again = replace(request, request_id=f"{request.request_id}-prompt", prompt=corrupted)
        async for chunk in self._watch(prompt, protected, again, targets, tenant, last=True):
            yield chunk

    async def _watch(
        self,
        prompt: PromptIn,
        guarded: Guarded,
        request: GenerationRequest,
        targets: Mapping[str, ActiveTarget],
        tenant: str,
        *,
        last: bool = False,
    ) -> AsyncIterator[GenerationChunk]:
        scanner, names = self._guard.bank.stream_scanner()
        sampling = request.sampling
        side_channels = (
            sampling.logprobs is not None
            or sampling.prompt_logprobs is not None
            or bool(sampling.stop or sampling.stop_token_ids)
        )  # the surnames are read only there: no cost on the plain request path
        surnames = _surnames(targets.values()) if side_channels else {}
        choices = {i: _Choice() for i in range(sampling.n)}
        streams = _Streams()
        # The client's stops end the answer in released text only, never at what the model was
        # about to write (`server.services.stops`); a tool-parsing request keeps them in the
        # engine, whose parser reads the text as the engine ends it.
        stops, engine_sampling = (None, sampling) if request.tools else GatewayStops.take(sampling)
        request = replace(request, sampling=engine_sampling)  # restarts build on it too
        split = self._token_texts(sampling) if stops is not None else None
        if not request.stream and not request.tools and stops is None:
            # Streamed even when the client wants one answer, so text before a name can be kept
            # (a tool-parsing request keeps the engine's mode: its parser depends on it), but
            # `_ONE_ANSWER_EVERY` tokens at a time: each chunk wakes the event loop, and token by
            # token cost ~4 ms of its CPU a 64-token answer under a 32-request burst. The
            # client's stops end the answer at a token, which wants the tokens one by one.
            request = replace(request, stream_every=_ONE_ANSWER_EVERY)
        engine_request = request if request.tools else replace(request, stream=True)
        streams.add(_ORIGINAL, self._engine.generate(engine_request))
        counts: dict[int, tuple[int, int]] = {}  # source -> (prompt tokens, completion tokens)
        next_source = _ORIGINAL + 1
        try:
            while streams:
                source, chunk = await streams.next()
                if chunk is None:
                    continue
                counts[source] = (chunk.prompt_tokens, chunk.completion_tokens)
                if source == _ORIGINAL and chunk.prompt_logprobs:  # the first chunk: none left
                    positions = [(p.token, [a[1] for a in p.top]) for p in chunk.prompt_logprobs]
                    named = _alternatives_naming(scanner, names, "", positions, surnames)
                    found_in_prompt = [
                        targets[n]
                        for n in sorted(named)
                        if n in targets and n not in guarded.flagged
                    ]
                    if found_in_prompt and last:
                        raise InvalidRequestError(
                            "prompt logprobs are not available for this prompt: they would "
                            "reveal a protected topic",
                            param="prompt_logprobs",
                        )
                    if found_in_prompt:
                        raise _PromptNamesTarget(found_in_prompt)
                out: list[ChoiceDelta] = []
                for delta in chunk.choices:
                    index = delta.index if source == _ORIGINAL else streams.choice_of(source)
                    st = choices.get(index)
                    if st is None or st.done or st.source != source:
                        continue  # a choice restarted elsewhere: its old tokens are dropped
                    try:
                        found = await self._check(
                            st, delta, (scanner, names, surnames), targets, guarded, tenant
                        )
                    except _CheckFailed:  # fail closed: the choice ends with what was released
                        found, st.restarts = [], self._max_restarts
                    else:
                        if not found:
                            final = delta.finish_reason is not None
                            released = self._release(
                                st, index, final=final, stops=stops, split=split
                            )
                            if released is not None:
                                out.append(released)
                            if st.stopped and (source != _ORIGINAL or request.sampling.n == 1):
                                counts[source] = (counts[source][0], st.source_tokens)
                                await streams.drop(source)  # the engine writes no further
                            continue
                    restart = await self._restart(
                        prompt, guarded, request, st, index, found, tenant
                    )
                    # A restart stream serves one choice; the original, with n > 1, several.
                    if source != _ORIGINAL or request.sampling.n == 1:
                        await streams.drop(source)
                    if restart is None:
                        st.done = True
                        out.append(ChoiceDelta(index=index, finish_reason="stop"))
                    else:
                        st.source = next_source
                        streams.add(next_source, self._engine.generate(restart), index)
                        next_source += 1
                scored = chunk.prompt_logprobs if source == _ORIGINAL else None
                if out or scored is not None:
                    prompt_tokens = counts[_ORIGINAL][0] if _ORIGINAL in counts else 0
                    completion = sum(c for _, c in counts.values())
                    yield GenerationChunk(
                        out,
                        prompt_tokens,
                        completion,
                        prompt_logprobs=scored,
                        prompt_token_ids=chunk.prompt_token_ids if scored is not None else None,
                    )
        except (GatewayError, _PromptNamesTarget):
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # fail closed: nothing unchecked leaves
            logger.exception("The output guard failed on request %s", request.request_id)
            raise EngineError("The output guard failed; the answer was stopped") from e
        finally:
            await streams.aclose()

    async def _check(
        self,
        st: _Choice,
        delta: ChoiceDelta,
        readers: tuple[StreamScanner, Sequence[str], Mapping[str, str]],
        targets: Mapping[str, ActiveTarget],
        guarded: Guarded,
        tenant: str,
    ) -> list[ActiveTarget]:
        """Add `delta` to the choice; the targets its text now names (nothing released yet).
        `readers`: the alias scanner, the target names by its index, and the surnames."""
        scanner, names, surnames = readers
        st.held.append(delta)
        before = st.text
        st.text += _written(delta)
        final = delta.finish_reason is not None
        mentions, hold = scanner.scan(st.text, st.released, final)
        st.hold = hold
        named = {names[m.target] for m in mentions if m.target < len(names)}
        if delta.logprobs:
            positions = [(lp.token, [a.token for a in lp.top]) for lp in delta.logprobs]
            named |= _alternatives_naming(scanner, names, before, positions, surnames)
        if final and delta.stop_reason is not None:
            # vLLM cuts a matched stop string (or stop token) out of the text and names it in
            # stop_reason: it is what the model wrote next, read after the text before it.
            stop = self._stop_text(delta.stop_reason)
            named |= _named_after(scanner, names, st.text[-scanner.window :], stop)
            named |= {surnames[stop.strip()]} if stop.strip() in surnames else set()
        found = [targets[n] for n in sorted(named) if n in targets]
        if found or not self._classify:
            return found
        window = sentence_read(st.text, st.checked, delta.text, final, self._window_words)
        if window is not None:
            st.checked = len(st.text)
            if window.strip():
                try:
                    decisions = await self._guard.flagged([window])
                except Exception as e:
                    logger.error("The output guard's classifier failed (%s)", type(e).__name__)
                    self._metrics.decisions.labels("none", "output_guard_error", tenant).inc()
                    raise _CheckFailed from e
                found = [
                    targets[d.target]
                    for d in decisions
                    if d.flagged and d.target in targets and d.target not in guarded.flagged
                ]
        return found

    def _involved(self, found: list[ActiveTarget], guarded: Guarded) -> dict[str, ActiveTarget]:
        """The targets a protected prompt is built for: those just found and those the prompt
        was already flagged for, by name."""
        active = self._guard.active
        involved = {t.name: t for t in found}
        involved.update({n: active[n] for n in guarded.flagged if n in active})
        return involved

    def _token_texts(self, sampling: SamplingOptions) -> TokenTexts | None:
        """How to split a delta's text by token (the served model's tokenizer), if known."""
        corruptor = self._guard.corruptor
        if corruptor is None:
            return None
        skip = sampling.skip_special_tokens
        return lambda context, ids: corruptor.token_texts(context, ids, skip_special_tokens=skip)

    def _stop_text(self, stop: str | int) -> str:
        """The text of a stop reason: a stop string, or a stop token decoded (unreadable without
        the model's tokenizer: the choice then ends where it is)."""
        if isinstance(stop, str):
            return stop
        corruptor = self._guard.corruptor
        if corruptor is None:
            raise _CheckFailed("a stop token cannot be read without the model's tokenizer")
        return corruptor.decode([stop])

    @staticmethod
    def _release(
        st: _Choice,
        index: int,
        *,
        final: bool,
        stops: GatewayStops | None = None,
        split: TokenTexts | None = None,
    ) -> ChoiceDelta | None:
        """The held deltas that end before the hold point, merged into one, ended at the first
        of `stops` they hold (None: nothing). `split(context, ids)`: each token's text, to end
        a delta of several tokens at a stop token inside it."""
        cleared = len(st.text) if final else st.hold  # checked: no possible name in it
        # Where each held delta ends in the choice's text (ascending).
        ends = list(accumulate((len(_written(d)) for d in st.held), initial=st.released))[1:]
        hit: StopHit | None = None
        if stops is not None:
            # A stop counts where checked text holds it whole; text up to `stops.buffer`
            # characters before the checked end waits, as a stop may start in it.
            checked = st.held[: bisect_right(ends, cleared)]
            pieces = None
            if split is not None:

                def pieces(k: int) -> list[str] | None:
                    before = [t for d in checked[:k] for t in d.token_ids]
                    return split([*st.released_ids, *before], checked[k].token_ids)

            hit = stops.find(st.text[: st.released], st.released_tokens, checked, pieces)
            if hit is None and not final:
                cleared -= stops.buffer
        k = hit.delta + 1 if hit is not None else bisect_right(ends, cleared)
        if k == 0:
            return None
        pos = ends[k - 1]
        batch, st.held = st.held[:k], st.held[k:]
        if hit is not None:
            batch = [*batch[: hit.delta], _ended(batch[hit.delta], hit.tokens, hit.reason)]
            st.stopped = True
        merged = joined_deltas(index, batch)
        if hit is not None:
            merged.text = merged.text[: hit.text_end - st.released]
        st.released = pos
        st.released_ids += merged.token_ids
        st.source_tokens += len(merged.token_ids)
        if merged.finish_reason is not None:
            st.done = True
        return merged

    async def _restart(
        self,
        prompt: PromptIn,
        guarded: Guarded,
        request: GenerationRequest,
        st: _Choice,
        index: int,
        found: list[ActiveTarget],
        tenant: str,
    ) -> GenerationRequest | None:
        """The request that continues this choice with `found` protected (None: end it)."""
        for target in found:
            self._metrics.decisions.labels(target.id, "output_restart", tenant).inc()
            audit.info(
                "output request_id=%s tenant=%s target_id=%s action=restart restarts=%d "
                "released_chars=%d",
                request.request_id,
                tenant,
                target.id,
                st.restarts,
                st.released,
            )
        corruptor = self._guard.corruptor
        sampling = request.sampling
        left = None if sampling.max_tokens is None else sampling.max_tokens - st.released_tokens
        if (
            st.restarts >= self._max_restarts
            or corruptor is None
            or (left is not None and left < 1)
        ):
            return None
        st.restarts += 1
        st.source_tokens = 0
        released = st.text[: st.released]
        st.text, st.held, st.checked = released, [], len(released)
        involved = self._involved(found, guarded)
        continuation = corruptor.template(prompt).extended(released)
        eco = [t for t in involved.values() if t.corruption is not None]
        offsets = list(guarded.offsets)
        if sampling.logprobs is None:  # logprobs are taken before the offset: none then
            offsets += [t.offset for t in involved.values() if t.offset is not None]
        new_prompt: Prompt
        if eco:
            new_prompt, _ = await self._guard.corrupt(continuation, eco)
        else:
            new_prompt = TokenPrompt(await self._guard.run(corruptor.token_ids, continuation))
        banned = tuple(dict.fromkeys(a for t in found for a in _spellings(t.aliases)))
        return replace(  # tools, structured outputs and the rest carry over
            request,
            request_id=f"{request.request_id}-out{index}-{st.restarts}",
            prompt=new_prompt,
            sampling=replace(
                sampling,
                n=1,
                max_tokens=left,
                min_tokens=max(0, sampling.min_tokens - st.released_tokens),
                bad_words=tuple(dict.fromkeys((*sampling.bad_words, *banned))),
                prompt_logprobs=None,  # the client's prompt was scored by the first request
            ),
            stream=request.stream or not request.tools,
            offsets=tuple(dict.fromkeys(offsets)),
        )


def _ended(delta: ChoiceDelta, tokens: int, stop: str | int) -> ChoiceDelta:
    """`delta` cut to its first `tokens` tokens, finished by the client's stop `stop`."""
    logprobs = delta.logprobs[:tokens] if delta.logprobs is not None else None
    return replace(
        delta,
        token_ids=delta.token_ids[:tokens],
        logprobs=logprobs,
        finish_reason="stop",
        stop_reason=stop,
    )


class _CheckFailed(Exception):
    """The output could not be checked: the choice ends where it is (fail closed)."""


class _PromptNamesTarget(Exception):
    """The prompt logprobs' alternatives name targets the prompt was not protected for."""

    def __init__(self, targets: list[ActiveTarget]) -> None:
        super().__init__(", ".join(t.name for t in targets))
        self.targets = targets


def _named_after(scanner: StreamScanner, names: Sequence[str], context: str, text: str) -> set[str]:
    """The targets `text` names when read right after `context` (a mention must reach into it)."""
    mentions, _ = scanner.scan(context + text, len(context), True)
    return {names[m.target] for m in mentions if m.target < len(names)}


def _alternatives_naming(
    scanner: StreamScanner,
    names: Sequence[str],
    before: str,
    positions: Sequence[tuple[str, Sequence[str]]],
    surnames: Mapping[str, str],
) -> set[str]:
    """The targets an alternative names at some position, read after the text before it, or
    by a surname alone: each position is (the token there, its alternatives). Logprobs
    alternatives are what the model would have written there, and the client reads them (vLLM
    takes them before bad_words and logit_bias apply; a prompt's are its predictions inside the
    prompt)."""
    found: set[str] = set()
    context = before[-scanner.window :]
    for token, alternatives in positions:
        for alternative in alternatives:
            if alternative != token and (word := alternative.strip()):
                found |= _named_after(scanner, names, context, alternative)
                if word in surnames:
                    found.add(surnames[word])
        context = (context + token)[-scanner.window :]
    return found


def _surnames(targets: Iterable[ActiveTarget]) -> dict[str, str]:
    """The last word of each person alias ("J.R.R. Tolkien": "Tolkien") and its target. One
    token the model lists as an alternative (" Tolkien" after "The most famous") or stops on
    names the target alone, though the alias scanner may weigh a lone surname too weakly to call
    it a mention (written text is also read by the classifier; a lone token is not). Person:
    `classifier.alias_kind` (2-4 capitalised words, no title words), the last word alphabetic
    and four letters or more; matched case-sensitively."""
    found: dict[str, str] = {}
    for target in targets:
        for alias in (target.name, *target.aliases):
            words = alias.split()
            if alias_kind(alias) == "person" and len(words[-1]) >= 4 and words[-1].isalpha():
                found.setdefault(words[-1], target.name)
    return found


def _written(delta: ChoiceDelta) -> str:
    """What the model wrote in a delta, tool calls included (the client gets them): the raw text
    where the engine parsed the calls from it, else the text and each call's name and arguments
    (an engine that hands calls already parsed, such as an upstream vLLM server)."""
    if delta.raw_text is not None:
        return delta.raw_text
    if not delta.tool_calls:
        return delta.text
    calls = "".join(
        (f"{c.name} " if c.name else "") + (c.arguments or "") for c in delta.tool_calls
    )
    return delta.text + calls


def _spellings(aliases: Sequence[str]) -> list[str]:
    """The ways the model most likely writes an alias: as registered, capitalised, lower."""
    out: list[str] = []
    for alias in aliases:
        out += [alias, alias.title(), alias.lower()]
        words = alias.split()
        if len(words) > 1 and len(words[-1]) >= 4:
            out.append(words[-1])  # the surname alone ("Rowling")
    return [a for a in out if a.strip()]


class _Streams:
    """The engine streams feeding a response: read directly while there is one, through a
    queue once restarts run beside the original (n > 1)."""

    def __init__(self) -> None:
        self._iters: dict[int, AsyncIterator[GenerationChunk]] = {}
        self._choice: dict[int, int] = {}
        self._queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def __bool__(self) -> bool:
        return bool(self._iters)

    def choice_of(self, source: int) -> int:
        return self._choice.get(source, 0)

    def add(self, key: int, stream: AsyncIterator[GenerationChunk], choice: int = 0) -> None:
        self._iters[key] = aiter(stream)
        self._choice[key] = choice
        if self._queue is None and len(self._iters) > 1:
            self._queue = asyncio.Queue()
            for k in list(self._iters):
                self._pump(k)
        elif self._queue is not None:
            self._pump(key)

    def _pump(self, key: int) -> None:
        queue, stream = self._queue, self._iters[key]
        assert queue is not None

        async def pump() -> None:
            try:
                async for chunk in stream:
                    await queue.put((key, chunk))
                await queue.put((key, None))
            except Exception as e:  # handed to the reader
                await queue.put((key, e))

        self._tasks[key] = asyncio.create_task(pump())

    async def next(self) -> tuple[int, GenerationChunk | None]:
        """The next chunk of any live stream; (key, None) when that stream ended."""
        if self._queue is None:
            key, stream = next(iter(self._iters.items()))
            try:
                return key, await anext(stream)
            except StopAsyncIteration:
                self._iters.pop(key, None)
                return key, None
        while True:
            key, item = await self._queue.get()
            if key not in self._iters:
                continue  # a dropped stream's last words
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self._iters.pop(key, None)
            return key, item

    async def drop(self, key: int) -> None:
        """Stop reading a stream and close it (which aborts its engine request)."""
        stream = self._iters.pop(key, None)
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if stream is not None:
            await _close(stream)

    async def aclose(self) -> None:
        for key in list(self._iters):
            await self.drop(key)


async def _close(stream: AsyncIterator[GenerationChunk]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
