"""What the output guard's watch of a streamed answer costs the event loop, in one process.

    python bench/stream_watch.py [--targets 20] [--concurrency 32] [--repeats 20]

Builds the alias scanner of the README's Harry Potter target and `--targets` - 1 people
(bench/targets.py) as the gateway does (`AliasIndex` -> `StreamScanner`), and streams
`--concurrency` answers naming none of them token by token (a word a token, as SmolLM2 writes
them) through `OutputGuard._watch` from a scripted engine, every answer at once on one event
loop, as a burst's answers reach the gateway. The output classifier is off: what is timed is
the per-token work on the loop (the alias scan, what to hold, the release), not MiniLM's reads
of sentence ends (bench/guard_cost.py measures those in the gateway). Prints the CPU time of
the best of `--repeats` bursts, read bare (the engine's stream as it is) and watched.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import HARRY_POTTER, people  # noqa: E402
from classifier import StreamScanner  # noqa: E402
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

ANSWERS = [
    "The capital of France is Paris. It's a big city, known for its art, its food and the "
    "Eiffel Tower. Many people visit it every year, and they're a part of its history too. "
    "The river Seine runs through it, and its bridges are old.",
    "Photosynthesis is how plants turn light into sugar. It happens in the chloroplasts of "
    "their leaves, which hold a green pigment called chlorophyll. In the process, plants take "
    "in carbon dioxide and water and give off oxygen as a by-product.",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is "
    "lower, so it boils at a lower temperature: in a town high in the mountains, pasta takes "
    "longer to cook. In a pressure cooker, the opposite happens.",
]


TOKENS = [re.findall(r"\s*\S+", answer) for answer in ANSWERS]  # a word a token


class _Engine:
    """Streams answer `request_id` (mod their number) a token at a time."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        tokens = TOKENS[int(request.request_id) % len(TOKENS)]
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


async def _burst(watch: OutputGuard | None, concurrency: int) -> tuple[float, list[str]]:
    """CPU seconds of one burst, and the answers as the client gets them."""
    engine, prompt = _Engine(), TextPrompt("q")
    streams = []
    for i in range(concurrency):
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
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    targets = [HARRY_POTTER, *people(args.targets - 1)]
    groups = [[t["name"], *t.get("aliases", ())] for t in targets]
    scanner = StreamScanner(AliasIndex(groups))
    names = tuple(t["name"] for t in targets)
    tokens = sum(len(TOKENS[i % len(TOKENS)]) for i in range(args.concurrency))
    released: dict[str, list[str]] = {}
    for label in ("bare", "watched", "bare", "watched"):
        guard = _Guard(scanner, names)
        watch = None
        if label == "watched":
            watch = OutputGuard(guard, _Engine(), Metrics(), classify=False)  # type: ignore[arg-type]
        runs = [asyncio.run(_burst(watch, args.concurrency)) for _ in range(args.repeats)]
        best = min(cpu for cpu, _ in runs)
        released[label] = runs[-1][1]
        print(
            f"{label:8} {args.targets} targets: {1000 * best:.1f} ms of CPU a burst of "
            f"{args.concurrency} answers ({tokens} tokens), {1e6 * best / tokens:.1f} us a token"
        )
    # What is timed is the watch of answers that name no target: each one goes out whole.
    same = released["watched"] == released["bare"]
    print("watched answers released as generated:", "yes" if same else "NO")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
