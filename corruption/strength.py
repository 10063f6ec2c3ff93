"""Offline choice of a target's corruption strength: the objective, its search, a fluency check.

The search (`corruption.search.bracket_strength`) looks for the weakest strength whose objective
is at or below 0, warm-started at 4x the embedding table's std and evaluating its probes in
batches; ECO's zeroth-order search (`search_strength`) is kept for comparison.

The concrete objective (`AnswerPreferenceObjective`, also in corruption/README.md):

    gap(prompts) = mean over forget examples i of
                   [ LL(true answer_i | prompt_i) - mean_j LL(unrelated answer_ij | prompt_i) ]
    f(s)         = gap(prompts corrupted at strength s) - gap(prompts with the target's tokens
                                                            deleted)

LL is the mean per-token log-likelihood (nats). The baseline matters: a famous multi-token answer
("Hogwarts School of Witchcraft and Wizardry") is likelier than an unrelated one after its first
token whatever the question, and the rest of the question ("... Harry Potter's owl?") carries
cues, so the plain gap stays well above 0 even once the answers are gone. Deleting the target's
tokens gives the level of a model that cannot tell which entity is asked about. Target: f <= 0.
Then a fluency check (`measure_fluency`) runs at the chosen strength: the answers generated
greedily from the corrupted prompts, scored as replies to the *uncorrupted* prompts by the same
model, must have a perplexity below a bound, so the guard yields plain text, not gibberish. For
additive noise the weakest strength that forgets is also the most fluent one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from corruption.embeddings import tokenize_prompt
from corruption.functions import CORRUPTION_METHODS, CorruptionSpec, apply_corruption
from corruption.likelihood import left_pad, token_logprobs
from corruption.search import (
    SearchStep,
    StrengthSearchConfig,
    StrengthSearchResult,
    WarmStart,
    bracket_strength,
    search_strength,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "AnswerPreferenceObjective",
    "Calibration",
    "EmbedsGenerator",
    "FluencyReport",
    "ForgetExample",
    "SearchStep",
    "StrengthSearchConfig",
    "StrengthSearchResult",
    "WarmStart",
    "bracket_strength",
    "calibrate_strength",
    "make_forget_example",
    "measure_fluency",
    "search_strength",
]

logger = logging.getLogger(__name__)

# SmolLM2-135M-Instruct, 8 questions: its own answers score 2.1, fluent off-topic answers from
# corrupted prompts 5 to 9; the bound leaves about 2x headroom and catches word salad.
DEFAULT_PERPLEXITY_BOUND = 20.0
# Plain answers have 0.55 to 1.0 distinct tokens per token (first 40), loops 0.15 to 0.3.
DEFAULT_MIN_DISTINCT = 0.5


@dataclass(frozen=True)
class ForgetExample:
    """A forget prompt (templated ids, positions to corrupt), its true and unrelated answers."""

    prompt_ids: list[int]
    mask: torch.Tensor  # (T,) bool over prompt_ids
    answer_ids: list[int]
    alternative_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mask.shape != (len(self.prompt_ids),) or self.mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor with one entry per prompt token")
        if not self.answer_ids or not all(self.alternative_ids):
            raise ValueError("answers must be non-empty token lists")


def make_forget_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    question: str,
    answer: str,
    *,
    spans: Sequence[tuple[int, int]] = (),
    alternatives: Sequence[str] = (),
) -> ForgetExample:
    """`prompt` is `question` as the served model reads it (templated by the caller: the
    gateway's renderer, server/engine/templating.py); mask the `spans` of `question` (char
    offsets in `question`) where it last appears in `prompt`.

    Without spans, every token of the question is corrupted (the gateway's fallback).
    """
    start = prompt.rindex(question)
    tokens = tokenize_prompt(tokenizer, prompt)
    shifted = [(start + a, start + b) for a, b in spans]
    mask = tokens.mask(shifted, fallback=[(start, start + len(question))])

    def ids(text: str) -> list[int]:
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    return ForgetExample(tokens.ids, mask, ids(answer), [ids(a) for a in alternatives])


def _with_default_alternatives(examples: Sequence[ForgetExample]) -> list[ForgetExample]:
    """Fill missing alternatives with the other examples' answers (a rotation, never its own)."""
    out = []
    for i, ex in enumerate(examples):
        alts = ex.alternative_ids
        if not alts:
            alts = [examples[(i + k) % len(examples)].answer_ids for k in range(1, len(examples))][
                :3
            ]
        if not alts:
            raise ValueError("one example without alternatives: give `alternatives`")
        out.append(ForgetExample(ex.prompt_ids, ex.mask, ex.answer_ids, alts))
    return out


def _embed_prompts(
    model: PreTrainedModel, examples: Sequence[ForgetExample], spec: CorruptionSpec | None
) -> list[torch.Tensor]:
    """Input embeddings (T, H) of each prompt, corrupted as the gateway would when `spec`."""
    table = model.get_input_embeddings()
    device = next(model.parameters()).device
    out = []
    for ex in examples:
        embeds = table(torch.tensor(ex.prompt_ids, device=device))  # (T, H)
        out.append(embeds if spec is None else apply_corruption(embeds, ex.mask, spec))
    return out


def _continuation_logprobs(
    model: PreTrainedModel,
    prompts: Sequence[torch.Tensor],
    continuations: Sequence[Sequence[int]],
    owners: Sequence[int],
    *,
    batch_size: int,
) -> list[float]:
    """Mean per-token log-probability of each continuation after the prompt `owners[i]`
    (prompt embeddings (T, H) each; `corruption.likelihood.token_logprobs`)."""
    scores = token_logprobs([(model, 1.0)], prompts, continuations, owners, batch_size=batch_size)
    return [sum(lps) / len(lps) for lps in scores]


def _without_masked_tokens(example: ForgetExample) -> ForgetExample:
    """The same example with the positions to corrupt deleted from the prompt."""
    keep = [i for i, m in zip(example.prompt_ids, example.mask.tolist(), strict=True) if not m]
    none = torch.zeros(len(keep), dtype=torch.bool)
    return ForgetExample(keep, none, example.answer_ids, example.alternative_ids)


Group = tuple[Sequence[ForgetExample], CorruptionSpec | None]


def _parallel_logprobs(
    model: PreTrainedModel,
    prompts: Sequence[torch.Tensor],
    continuations: Sequence[Sequence[int]],
    owners: Sequence[int],
    *,
    batch_size: int,
    workers: int,
) -> list[float]:
    """`_continuation_logprobs` with the continuations split between `workers` threads.

    Each thread runs its share with torch's own thread count (one in the gateway); torch
    releases the GIL inside its kernels, so two threads use two cores. Unlike more intra-op
    threads this degrades gracefully when the cores are busy (no OpenMP spin-waits). The shares
    are runs of continuations (by prompt) of about equal tokens: 5 prompts split 3/2 left one
    thread with 60% of the work; a prompt whose continuations end up in two shares is run by
    both (prompts are a small part of the tokens).
    """
    if workers <= 1 or len(continuations) < 2:
        return _continuation_logprobs(model, prompts, continuations, owners, batch_size=batch_size)
    rows = sorted(range(len(continuations)), key=lambda i: owners[i])
    per_prompt = [0] * len(prompts)
    for i in rows:
        per_prompt[owners[i]] += 1
    cost = [
        len(continuations[i]) + prompts[owners[i]].shape[0] / per_prompt[owners[i]] for i in rows
    ]
    total, spent = sum(cost), 0.0
    parts: list[list[int]] = []
    mine: list[int] = []
    for i, c in zip(rows, cost, strict=True):
        mine.append(i)
        spent += c
        if spent >= total * (len(parts) + 1) / workers and len(parts) < workers - 1:
            parts.append(mine)
            mine = []
    parts = [part for part in [*parts, mine] if part]

    def run(mine: list[int]) -> list[float]:
        needed = sorted({owners[i] for i in mine})
        local = {o: k for k, o in enumerate(needed)}
        with torch.inference_mode():  # per thread
            return _continuation_logprobs(
                model,
                [prompts[o] for o in needed],
                [continuations[i] for i in mine],
                [local[owners[i]] for i in mine],
                batch_size=batch_size,
            )

    with ThreadPoolExecutor(len(parts), thread_name_prefix="strength") as pool:
        results = list(pool.map(run, parts))
    out = [0.0] * len(continuations)
    for part, values in zip(parts, results, strict=True):
        for i, value in zip(part, values, strict=True):
            out[i] = value
    return out


def _answer_gaps(
    model: PreTrainedModel, groups: Sequence[Group], *, batch_size: int, workers: int = 1
) -> list[float]:
    """For each group (examples, corruption or None): the mean over its examples of
    LL(true answer) - mean LL(unrelated answers), nats per token; all groups in one batch."""
    with torch.inference_mode():
        prompts: list[torch.Tensor] = []
        owners: list[int] = []
        conts: list[list[int]] = []
        for examples, spec in groups:
            for ex, embeds in zip(examples, _embed_prompts(model, examples, spec), strict=True):
                for cont in [ex.answer_ids, *ex.alternative_ids]:
                    owners.append(len(prompts))
                    conts.append(cont)
                prompts.append(embeds)
        scores = iter(
            _parallel_logprobs(
                model, prompts, conts, owners, batch_size=batch_size, workers=workers
            )
        )
        out = []
        for examples, _ in groups:
            gaps = []
            for ex in examples:
                true = next(scores)
                alts = [next(scores) for _ in ex.alternative_ids]
                gaps.append(true - sum(alts) / len(alts))
            out.append(sum(gaps) / len(gaps))
    return out


def _answer_gap(
    model: PreTrainedModel,
    examples: Sequence[ForgetExample],
    spec: CorruptionSpec | None,
    *,
    batch_size: int,
    workers: int = 1,
) -> float:
    """Mean over examples of LL(true answer) - mean LL(unrelated answers), nats per token."""
    return _answer_gaps(model, [(examples, spec)], batch_size=batch_size, workers=workers)[0]


@dataclass
class AnswerPreferenceObjective:
    """f(strength) = gap(corrupted prompts) - gap(prompts with the target's tokens deleted).

    gap = mean over examples of LL(true answer) - mean_j LL(unrelated answer j), in nats per
    token. f <= 0: the corrupted name tells the model no more about the true answers than no name
    at all. With `relative_to_deleted=False` the baseline is 0 (plain preference gap).
    `spec` gives method, dims and seed; its strength is replaced by the probed one.
    `evaluate` takes several strengths and runs their prompts (and, the first time, the deleted
    baseline's) through the model together, `batch_size` prompts per forward pass.
    """

    model: PreTrainedModel
    examples: Sequence[ForgetExample]
    spec: CorruptionSpec
    batch_size: int = 16
    relative_to_deleted: bool = True
    workers: int = 1
    """Threads sharing each evaluation's prompts (`_parallel_logprobs`)."""
    _baseline: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("no forget examples")
        self.examples = _with_default_alternatives(self.examples)

    def _deleted(self) -> list[ForgetExample]:
        return [_without_masked_tokens(ex) for ex in self.examples]

    @property
    def baseline(self) -> float:
        """The gap with the target's tokens deleted (computed once), or 0."""
        if self._baseline is None:
            self._baseline = 0.0
            if self.relative_to_deleted:
                self._baseline = _answer_gap(
                    self.model,
                    self._deleted(),
                    None,
                    batch_size=self.batch_size,
                    workers=self.workers,
                )
        return self._baseline

    def evaluate(self, strengths: Sequence[float]) -> list[float]:
        """f at each strength, in one batched pass (with the baseline the first time)."""
        groups: list[Group] = [(self.examples, self.spec.with_strength(s)) for s in strengths]
        with_baseline = self._baseline is None and self.relative_to_deleted
        if with_baseline:
            groups.append((self._deleted(), None))
        gaps = _answer_gaps(self.model, groups, batch_size=self.batch_size, workers=self.workers)
        if with_baseline:
            self._baseline = gaps.pop()
        return [gap - self.baseline for gap in gaps]

    def __call__(self, strength: float) -> float:
        """Return the answer gap at `strength` minus the baseline."""
        return self.evaluate([strength])[0]


EmbedsGenerator = Callable[[list[torch.Tensor], list[list[int]], int], list[list[int]]]
"""(prompt embeddings (T, H) each, their token ids, max new tokens) -> greedy token ids each."""


@dataclass(frozen=True)
class FluencyReport:
    """Greedy answers from corrupted prompts, scored as replies to the clean prompts.

    Perplexity alone misses loops ('The answer is: "The answer is: ...' scores about 5), so the
    mean share of distinct tokens per answer is checked too.
    """

    perplexity: float
    distinct_ratio: float
    answers: list[list[int]]
    fluent: bool


def measure_fluency(
    model: PreTrainedModel,
    examples: Sequence[ForgetExample],
    spec: CorruptionSpec | None,
    *,
    bound: float = DEFAULT_PERPLEXITY_BOUND,
    min_distinct: float = DEFAULT_MIN_DISTINCT,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int = 16,
    generate_with: EmbedsGenerator | None = None,
    workers: int = 1,
) -> FluencyReport:
    """Generate greedily from corrupted prompts; score the answers given the clean prompts.

    `generate_with(embeds, prompt_ids, max_new_tokens)` generates instead of `model.generate`,
    e.g. the serving engine itself: the answers are then the ones the guard would serve.
    The scoring is split between `workers` threads as the objective's is.
    """
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    answers: list[list[int]] = []
    # transformers' stubs resolve `generate` through nn.Module.__getattr__ on some versions.
    generate = cast("Callable[..., torch.Tensor]", model.generate)
    with torch.inference_mode():
        corrupted = _embed_prompts(model, examples, spec)
        rows = (
            generate_with(corrupted, [ex.prompt_ids for ex in examples], max_new_tokens)
            if generate_with is not None
            else []
        )
        if rows and all(t >= 0 for row in rows for t in row):  # ids known (not an upstream's)
            for row in rows:
                cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                answers.append(list(row[:cut]))
            corrupted = []  # generated already
        for first in range(0, len(corrupted), batch_size):
            embeds, attention, _ = left_pad(corrupted[first : first + batch_size])
            generated = generate(
                inputs_embeds=embeds,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=list(stops) or None,
                pad_token_id=next(iter(stops), 0),
            )  # (B, new): with inputs_embeds only new tokens come back
            for row in generated.tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
                answers.append(row[:cut])
        clean = _embed_prompts(model, examples, None)
        owners = [i for i, answer in enumerate(answers) if answer]
        logprobs = _parallel_logprobs(
            model,
            clean,
            [answers[i] for i in owners],
            owners,
            batch_size=batch_size,
            workers=workers,
        )
    perplexity = math.exp(-sum(logprobs) / len(logprobs)) if logprobs else math.inf
    ratios = [len(set(a)) / len(a) for a in answers if a]
    distinct = sum(ratios) / len(ratios) if ratios else 0.0
    return FluencyReport(
        perplexity=perplexity,
        distinct_ratio=distinct,
        answers=answers,
        fluent=perplexity <= bound and distinct >= min_distinct,
    )


@dataclass(frozen=True)
class Calibration:
    """What a registration job stores (`spec`) and what it shows the operator."""

    spec: CorruptionSpec
    search: StrengthSearchResult
    fluency: FluencyReport
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage: `search` (baseline included) and `fluency`."""


def calibrate_strength(
    model: PreTrainedModel,
    examples: Sequence[ForgetExample],
    spec: CorruptionSpec,
    config: StrengthSearchConfig,
    *,
    fluency_bound: float = DEFAULT_PERPLEXITY_BOUND,
    min_distinct: float = DEFAULT_MIN_DISTINCT,
    max_new_tokens: int = 32,
    eos_token_id: int | Sequence[int] | None = None,
    generate_with: EmbedsGenerator | None = None,
    workers: int = 1,
    warm: WarmStart | None = None,
) -> Calibration:
    """Search the weakest strength that forgets (`bracket_strength`, started at `warm` when
    given), then check fluency there.

    A method without a strength (zeroing, sign flips, reordering) has nothing to search: its
    objective is evaluated once, for the report.
    """
    objective = AnswerPreferenceObjective(model, examples, spec, workers=workers)
    started = time.perf_counter()
    if CORRUPTION_METHODS[spec.method].uses_strength:
        search = bracket_strength(objective.evaluate, config, warm=warm)
    else:
        value = objective(spec.strength)
        search = StrengthSearchResult(
            strength=spec.strength,
            value=value,
            reached=value <= config.target,
            trace=(),
            evaluations=1,
            seconds=time.perf_counter() - started,
            rounds=1,
            values=((spec.strength, value),),
        )
    chosen = spec.with_strength(search.strength)
    searched = time.perf_counter()
    fluency = measure_fluency(
        model,
        examples,
        chosen,
        bound=fluency_bound,
        min_distinct=min_distinct,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        generate_with=generate_with,
        workers=workers,
    )
    seconds = {"search": searched - started, "fluency": time.perf_counter() - searched}
    logger.info(
        "calibrated %s: strength %.4g (f=%.3g, reached=%s, %d evaluations in %d rounds, %.1fs), "
        "ppl %.3g, distinct %.2f (%.1fs)",
        spec.method,
        search.strength,
        search.value,
        search.reached,
        search.evaluations,
        search.rounds,
        seconds["search"],
        fluency.perplexity,
        fluency.distinct_ratio,
        seconds["fluency"],
    )
    return Calibration(chosen, search, fluency, seconds)
