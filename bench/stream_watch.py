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

A served model's own answers instead (lists, numbers, the tokens its tokenizer streams):

    python bench/stream_watch.py --record bench/results/answers.json [--bursts 20]
    python bench/stream_watch.py --answers bench/results/answers.json [--classify]

`--record` starts vLLM's own server on the default model and keeps its greedy answers to
`--bursts` bursts of `bench.workload.unflagged_prompts` (64 tokens); `--answers` streams them as
the model's tokenizer splits them (one token a step), in bursts of `--concurrency`. `--classify`
also times the output classifier's reads at sentence ends, on a bank of the same targets
trained as `bench/classifier_scaling.py` trains them (cached), the static stage on the loop and
MiniLM on the guard's thread as the gateway runs them; the loop's CPU and the process's are
printed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from server.services.guard import EcoGuard, Guarded  # noqa: E402
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


def record(path: Path, bursts: int) -> None:
    """Greedy answers of vLLM's own server to `bursts` bursts of unflagged prompts, to `path`."""
    from bench.workload import run_burst, unflagged_prompts
    from offset.snap import native_bf16
    from server.launch import free_port, running
    from server.modelstore import resolve_model
    from tests.e2e.servers import MODEL_NAME, vllm_server_argv

    model, port = resolve_model(None, auto_pull=True), free_port()
    argv = vllm_server_argv(model, port, dtype="bfloat16" if native_bf16() else "float32")
    url, texts = f"http://127.0.0.1:{port}", []
    with running(argv, ready_url=f"{url}/v1/models", log=path.with_suffix(".log")):
        for burst in range(bursts):
            texts += run_burst(url, MODEL_NAME, unflagged_prompts(32, 9000 + burst), 64,
                               stream=False).texts  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(texts, indent=1))
    print(f"{len(texts)} answers -> {path}")


def model_tokens(texts: list[str]) -> list[list[str]]:
    """Each text as the served model's tokenizer streams it: the text each token adds, as
    vLLM's incremental detokenizer writes it (`streamed_texts`, as the output guard reads a
    delta)."""
    from transformers import AutoTokenizer

    from server.modelstore import resolve_model
    from server.services.corruptor import streamed_texts

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None, auto_pull=True)))
    out = []
    for text in texts:
        pieces = streamed_texts(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])
        if pieces is None:
            raise SystemExit("the served model's tokenizer has no fast (tokenizers) backend")
        out.append(pieces)
    return out


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


def classifying_guard(n: int) -> EcoGuard:
    """The gateway's guard over the Harry Potter target and `n` - 1 people (`targets`), with
    their trained classifiers (no model copy)."""
    import torch

    from bench.classifier_scaling import specs, trained
    from classifier import ClassifierBank
    from server.services.guard import ActiveTarget

    torch.set_num_threads(1)  # as the gateway runs the guard
    embedder = Embedder()
    cache = Path(__file__).resolve().parent / "results" / "trained"
    banked = [trained(spec, embedder, cache) for spec in specs(n)]
    guard = EcoGuard(ClassifierBank(embedder, banked), None, Metrics())
    guard.set_targets([ActiveTarget(f"t{i}", t.name, (), None, t) for i, t in enumerate(banked)])
    return guard


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
    scanner: tuple[StreamScanner, tuple[str, ...]] | EcoGuard | None, tokens: list[list[str]]
) -> tuple[float, float, list[str]]:
    """CPU seconds of one burst of `tokens`' answers (the loop's, the process's), and the
    answers as the client gets them, watched by `scanner` (a guard: with its classifier as
    well; None: the engine's stream as it is)."""
    engine, prompt = _Engine(tokens), TextPrompt("q")
    watch, targets = None, {}
    if isinstance(scanner, EcoGuard):
        watch = OutputGuard(scanner, engine, Metrics(), window_words=12)  # the served default
        targets = dict(scanner.active)
    elif scanner is not None:
        watch = OutputGuard(_Guard(*scanner), engine, Metrics(), classify=False)  # type: ignore[arg-type]
    streams = []
    for i in range(len(tokens)):
        request = GenerationRequest(str(i), prompt, SamplingOptions(max_tokens=64), stream=True)
        if watch is None:
            streams.append(engine.generate(request))
        else:
            streams.append(watch._watch(prompt, Guarded(prompt), request, targets, "-"))
    loop, process = time.thread_time(), time.process_time()
    answers = await asyncio.gather(*(_drain(s) for s in streams))
    return time.thread_time() - loop, time.process_time() - process, list(answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--record", type=Path, help="record a served model's answers there")
    parser.add_argument("--bursts", type=int, default=20, help="bursts of 32 to --record")
    parser.add_argument("--answers", type=Path, help="stream these answers (from --record)")
    parser.add_argument("--classify", action="store_true", help="the output classifier too")
    args = parser.parse_args()
    if args.record is not None:
        record(args.record, args.bursts)
        return
    targets = [HARRY_POTTER, *people(args.targets - 1)]
    recorded = model_tokens(json.loads(args.answers.read_text())) if args.answers else None

    def given_answers(burst: int) -> list[list[str]]:
        if recorded is None:
            return answers(burst, args.concurrency)
        first = (burst * args.concurrency) % len(recorded)
        return (recorded * 2)[first : first + args.concurrency]

    groups = [[t["name"], *t.get("aliases", ())] for t in targets]
    index = AliasIndex(  # as `classifier.model.build_index` builds it, less trained weights
        groups,
        common_words=Embedder().vocabulary_words(),
        name_words=load_lexicon().name_words,
    )
    scanner = (StreamScanner(index), tuple(t["name"] for t in targets))
    watchers: dict[str, tuple[StreamScanner, tuple[str, ...]] | EcoGuard | None] = {
        "bare": None,
        "watched": scanner,
    }
    if args.classify:
        watchers["classified"] = classifying_guard(len(targets))
    cpu: dict[str, list[tuple[float, float]]] = {label: [] for label in watchers}
    tokens = same = 0
    for burst in range(args.repeats + 1):  # the first one untimed
        given = given_answers(burst)
        for label, watch in watchers.items():
            loop, process, got = asyncio.run(_burst(watch, given))
            same += got == ["".join(a) for a in given]
            if burst:
                cpu[label].append((loop, process))
        tokens += sum(map(len, given)) if burst else 0
    per_burst = tokens / args.repeats
    for label, runs in cpu.items():
        mid = statistics.median(p for _, p in runs)
        loop = statistics.median(lo for lo, _ in runs)
        print(
            f"{label:8} {args.targets} targets: {1000 * mid:.1f} ms of CPU a burst of "
            f"{args.concurrency} answers ({per_burst:.0f} tokens), "
            f"{1e6 * mid / per_burst:.1f} us a token (median of {len(runs)} bursts); "
            f"event loop {1000 * loop:.1f} ms"
        )
    # What is timed is the watch of answers that name no target: each one goes out whole.
    ok = same == len(watchers) * (args.repeats + 1)
    print("watched answers released as generated:", "yes" if ok else "NO")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
