"""What the output guard's watch of a streamed answer costs the event loop, in one process.

    python bench/stream_watch.py [--targets 20] [--concurrency 32] [--repeats 15]

Builds the alias scanner of the README's Harry Potter target and `--targets` - 1 people
(bench/targets.py) as the gateway does (`build_index`'s word lists -> `AliasIndex` ->
`StreamScanner`), and streams `--concurrency` answers naming none of them token by token (a word
a token, as SmolLM2 writes them) through `OutputGuard._watch` from a scripted engine, every
answer at once on one event loop, as a burst's answers reach the gateway. Each burst's answers
are new text (five of the shipped general questions each, `classifier.negatives`), as a served
model's answers are: the scanner and the alias index remember the words they found clear, and
answers read again would find every word there. The output classifier is off: what is timed is
the per-token work on the loop (the alias scan, what to hold, the release), not MiniLM's reads
of sentence ends (bench/guard_cost.py measures those in the gateway). Prints the median CPU
time of `--repeats` bursts (after one untimed), read bare (the engine's stream as it is) and
watched; fails unless every watched answer goes out as generated.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import HARRY_POTTER, people  # noqa: E402
from classifier import StreamScanner  # noqa: E402
from classifier.embed import Embedder  # noqa: E402
from classifier.lexicon import load_lexicon  # noqa: E402
from classifier.negatives import general_negatives  # noqa: E402
from classifier.spans import AliasIndex  # noqa: E402
from server.engine import (  # noqa: E402
    ChoiceDelta,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TextPrompt,
)
from server.metrics import Metrics  # noqa: E402
from server.services.guard import Guarded  # noqa: E402
from server.services.output_guard import OutputGuard  # noqa: E402

PER_ANSWER = 5  # shipped questions an answer: ~40 tokens


def answers(burst: int, concurrency: int) -> list[list[str]]:
    """Burst `burst`'s answers, a word a token: new text in every burst (until the shipped
    questions run out, after ~20 bursts of 32)."""
    texts = general_negatives().texts
    size = PER_ANSWER * concurrency
    first = (burst * size) % max(1, len(texts) - size)
    chunk = texts[first : first + size]
    joined = [" ".join(chunk[i : i + PER_ANSWER]) for i in range(0, size, PER_ANSWER)]
    return [word_tokens(answer) for answer in joined]


def word_tokens(text: str) -> list[str]:
    """`text` a word a token, each with the spaces before it (as SmolLM2 writes them)."""
    return re.findall(r"\s*\S+", text)


class _Engine:
    """Streams answer `request_id` of `answers` a token at a time."""

    def __init__(self, answers: list[list[str]]) -> None:
        self._answers = answers

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        tokens = self._answers[int(request.request_id)]
        for i, token in enumerate(tokens):
            await asyncio.sleep(0)  # the next token comes in a later pass of the loop
            finish = "length" if i == len(tokens) - 1 else None
            yield GenerationChunk([ChoiceDelta(0, token, [i], finish_reason=finish)], 10, i + 1)


class _Guard:
    """What `OutputGuard` reads of the guard with the classifier off: the bank's scanner."""

    corruptor = None

    def __init__(self, scanner: StreamScanner, names: tuple[str, ...]) -> None:
        self.bank = self
        self._read = (scanner, names)

    def stream_scanner(self) -> tuple[StreamScanner, tuple[str, ...]]:
        return self._read


async def _drain(stream: AsyncIterator[GenerationChunk]) -> str:
    return "".join([d.text async for chunk in stream for d in chunk.choices])


async def _burst(
    scanner: tuple[StreamScanner, tuple[str, ...]] | None, tokens: list[list[str]]
) -> tuple[float, list[str]]:
    """CPU seconds of one burst of `tokens`' answers, and the answers as the client gets them,
    watched by `scanner` (None: the engine's stream as it is)."""
    engine, prompt = _Engine(tokens), TextPrompt("q")
    watch = None
    if scanner is not None:
        watch = OutputGuard(_Guard(*scanner), engine, Metrics(), classify=False)  # type: ignore[arg-type]
    streams = []
    for i in range(len(tokens)):
        request = GenerationRequest(str(i), prompt, SamplingOptions(max_tokens=64))
        if watch is None:
            streams.append(engine.generate(request))
        else:
            streams.append(watch._watch(prompt, Guarded(prompt), request, {}, "-"))
    started = time.process_time()
    answers = await asyncio.gather(*(_drain(s) for s in streams))
    return time.process_time() - started, list(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    targets = [HARRY_POTTER, *people(args.targets - 1)]
    groups = [[t["name"], *t.get("aliases", ())] for t in targets]
    index = AliasIndex(  # as `classifier.model.build_index` builds it, less trained weights
        groups,
        common_words=Embedder().vocabulary_words(),
        name_words=load_lexicon().name_words,
    )
    scanner = (StreamScanner(index), tuple(t["name"] for t in targets))
    cpu: dict[str, list[float]] = {"bare": [], "watched": []}
    tokens = same = 0
    for burst in range(args.repeats + 1):  # the first one untimed
        given = answers(burst, args.concurrency)
        for label, watch in (("bare", None), ("watched", scanner)):
            seconds, got = asyncio.run(_burst(watch, given))
            same += got == ["".join(a) for a in given]
            if burst:
                cpu[label].append(seconds)
        tokens += sum(map(len, given)) if burst else 0
    per_burst = tokens / args.repeats
    for label, runs in cpu.items():
        mid = statistics.median(runs)
        print(
            f"{label:8} {args.targets} targets: {1000 * mid:.1f} ms of CPU a burst of "
            f"{args.concurrency} answers ({per_burst:.0f} tokens), "
            f"{1e6 * mid / per_burst:.1f} us a token (median of {len(runs)} bursts)"
        )
    # What is timed is the watch of answers that name no target: each one goes out whole.
    ok = same == 2 * (args.repeats + 1)
    print("watched answers released as generated:", "yes" if ok else "NO")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
