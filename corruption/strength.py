"""Offline choice of a target's corruption strength: a scalar zeroth-order search (ECO).

The search is generic: it minimises any `objective(strength) -> float` with central differences,
g = (f(s + eps) - f(s - eps)) / 2 eps, s <- clip(s - lr * g, min_strength, max_strength), and stops
at the first probe whose objective is at or below `target`. Because one large step can overshoot,
it then bisects (geometrically) between the strongest failing strength below and that probe, so
the strength returned is close to the weakest one that reaches the target.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from corruption.embeddings import tokenize_prompt
from corruption.functions import CorruptionSpec, apply_corruption

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "AnswerPreferenceObjective",
    "Calibration",
    "FluencyReport",
    "ForgetExample",
    "SearchStep",
    "StrengthSearchConfig",
    "StrengthSearchResult",
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
class StrengthSearchConfig:
    """Zeroth-order search settings; strengths in the corruption's own units."""

    initial: float
    lr: float
    eps: float
    target: float = 0.0
    min_strength: float = 0.0
    max_strength: float = math.inf
    max_steps: int = 20
    refine_steps: int = 4

    @classmethod
    def for_embeddings(cls, std: float, **overrides: float | int) -> StrengthSearchConfig:
        """Defaults for additive noise, scaled by the embedding table's std (see README)."""
        values: dict[str, float | int] = {
            "initial": 1.0 * std,
            "lr": 10.0 * std * std,
            "eps": 0.25 * std,
            "min_strength": 0.25 * std,
            "max_strength": 16.0 * std,
            "max_steps": 8,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.eps <= 0 or self.lr <= 0 or self.max_steps <= 0:
            raise ValueError("eps, lr and max_steps must be positive")
        if not self.min_strength <= self.max_strength:
            raise ValueError("min_strength must not exceed max_strength")
        if self.refine_steps < 0:
            raise ValueError("refine_steps must be >= 0")


@dataclass(frozen=True)
class SearchStep:
    """One search step: the centre, both probes, the gradient estimate, the next centre."""

    strength: float
    low: float
    high: float
    f_low: float
    f_high: float
    grad: float
    next_strength: float


@dataclass(frozen=True)
class StrengthSearchResult:
    """The chosen strength, its objective value, whether the target was reached, the trace."""

    strength: float
    value: float
    reached: bool
    trace: tuple[SearchStep, ...]
    evaluations: int
    seconds: float


class _Memo:
    """The objective with every evaluation kept: probes repeat when clipped to the bounds."""

    def __init__(self, objective: Callable[[float], float]) -> None:
        self.objective = objective
        self.values: dict[float, float] = {}

    def __call__(self, strength: float) -> float:
        if strength not in self.values:
            self.values[strength] = float(self.objective(strength))
            logger.debug("objective(%.6g) = %.6g", strength, self.values[strength])
        return self.values[strength]


def _refine(f: _Memo, hit: float, config: StrengthSearchConfig) -> float:
    """Bisect between the strongest failing strength below `hit` and `hit` (geometric if > 0).

    A large step can overshoot the level; this walks back toward the weakest strength that
    still reaches it, assuming the objective is monotone in between.
    """
    failing = [s for s, v in f.values.items() if s < hit and v > config.target]
    low = max(failing, default=config.min_strength)
    if low == hit:
        return hit
    if not failing and f(low) <= config.target:
        return low
    for _ in range(config.refine_steps):
        mid = math.sqrt(low * hit) if low > 0 else (low + hit) / 2
        if f(mid) <= config.target:
            hit = mid
        else:
            low = mid
    return hit


def search_strength(
    objective: Callable[[float], float], config: StrengthSearchConfig
) -> StrengthSearchResult:
    """Minimise `objective` over the strength until it reaches `config.target`."""
    started = time.perf_counter()
    f = _Memo(objective)
    trace: list[SearchStep] = []

    def done(strength: float, reached: bool) -> StrengthSearchResult:
        return StrengthSearchResult(
            strength=strength,
            value=f(strength),
            reached=reached,
            trace=tuple(trace),
            evaluations=len(f.values),
            seconds=time.perf_counter() - started,
        )

    strength = min(max(config.initial, config.min_strength), config.max_strength)
    for _ in range(config.max_steps):
        low = max(strength - config.eps, config.min_strength)
        high = min(strength + config.eps, config.max_strength)
        for probe in (low, high):
            if f(probe) <= config.target:
                return done(_refine(f, probe, config), True)
        grad = (f(high) - f(low)) / (high - low) if high > low else 0.0
        step = min(max(strength - config.lr * grad, config.min_strength), config.max_strength)
        trace.append(SearchStep(strength, low, high, f(low), f(high), grad, step))
        logger.info("strength %.4g: f in [%.4g, %.4g], g=%.4g", strength, f(low), f(high), grad)
        strength = step
    best = min(f.values, key=lambda s: (f.values[s], s))
    return done(best, False)


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
    question: str,
    answer: str,
    *,
    spans: Sequence[tuple[int, int]] = (),
    alternatives: Sequence[str] = (),
) -> ForgetExample:
    """Template `question` as one user turn; mask its `spans` (char offsets in `question`).

    Without spans, every token of the question is corrupted (the gateway's fallback).
    """
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(prompt, str):
        raise TypeError("apply_chat_template(tokenize=False) did not return a string")
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


def _left_pad(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (L_i, H) tensors left-padded: embeds (B, L, H), attention mask, position ids."""
    longest = max(s.shape[0] for s in seqs)
    batch = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[1])  # (B, L, H)
    attention = torch.zeros(len(seqs), longest, dtype=torch.long, device=seqs[0].device)
    for row, seq in enumerate(seqs):
        batch[row, longest - seq.shape[0] :] = seq
        attention[row, longest - seq.shape[0] :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return batch, attention, positions


def _continuation_logprobs(
    model: PreTrainedModel,
    prompts: Sequence[torch.Tensor],
    continuations: Sequence[Sequence[int]],
    owners: Sequence[int],
    *,
    batch_size: int,
) -> list[float]:
    """Mean per-token log-probability of each continuation after the prompt `owners[i]`.

    Each prompt runs once; its KV cache is then copied to every continuation that follows it.
    """
    table = model.get_input_embeddings()
    device = prompts[0].device
    means: dict[int, float] = {}
    for first in range(0, len(prompts), batch_size):
        chunk = list(range(first, min(first + batch_size, len(prompts))))
        rows = [i for i, owner in enumerate(owners) if first <= owner < first + len(chunk)]
        if not rows:
            continue
        embeds, attention, positions = _left_pad([prompts[i] for i in chunk])
        out = model(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        first_logprobs = out.logits[:, -1].float().log_softmax(-1)  # (P, V)
        owner_row = torch.tensor([owners[i] - first for i in rows], device=device)  # (C,)
        cache = out.past_key_values
        cache.reorder_cache(owner_row)  # (P, ...) -> (C, ...): one copy per continuation
        longest = max(len(continuations[i]) for i in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)  # (C, L)
        cont_attention = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            ids[r, : len(continuations[i])] = torch.tensor(list(continuations[i]))
            cont_attention[r, : len(continuations[i])] = 1
        lengths = attention.sum(-1)[owner_row]  # (C,) real prompt lengths
        logits = model(
            inputs_embeds=table(ids).to(embeds.dtype),  # (C, L, H)
            attention_mask=torch.cat([attention[owner_row], cont_attention], dim=-1),
            position_ids=lengths[:, None] + torch.arange(longest, device=device),  # (C, L)
            past_key_values=cache,
        ).logits  # (C, L, V): position j predicts token j + 1
        logprobs = logits.float().log_softmax(-1)
        for r, i in enumerate(rows):
            n = len(continuations[i])
            head = first_logprobs[owner_row[r], ids[r, 0]]
            tail = logprobs[r, : n - 1].gather(-1, ids[r, 1:n, None]).squeeze(-1)  # (n - 1,)
            means[i] = float((head + tail.sum()) / n)
    return [means[i] for i in range(len(continuations))]


def _without_masked_tokens(example: ForgetExample) -> ForgetExample:
    """The same example with the positions to corrupt deleted from the prompt."""
    keep = [i for i, m in zip(example.prompt_ids, example.mask.tolist(), strict=True) if not m]
    none = torch.zeros(len(keep), dtype=torch.bool)
    return ForgetExample(keep, none, example.answer_ids, example.alternative_ids)


def _answer_gap(
    model: PreTrainedModel,
    examples: Sequence[ForgetExample],
    spec: CorruptionSpec | None,
    *,
    batch_size: int,
) -> float:
    """Mean over examples of LL(true answer) - mean LL(unrelated answers), nats per token."""
    with torch.inference_mode():
        prompts = _embed_prompts(model, examples, spec)
        owners: list[int] = []
        conts: list[list[int]] = []
        for index, ex in enumerate(examples):
            for cont in [ex.answer_ids, *ex.alternative_ids]:
                owners.append(index)
                conts.append(cont)
        scores = iter(_continuation_logprobs(model, prompts, conts, owners, batch_size=batch_size))
        gaps = []
        for ex in examples:
            true = next(scores)
            alts = [next(scores) for _ in ex.alternative_ids]
            gaps.append(true - sum(alts) / len(alts))
    return sum(gaps) / len(gaps)


@dataclass
class AnswerPreferenceObjective:
    """f(strength) = gap(corrupted prompts) - gap(prompts with the target's tokens deleted).

    gap = mean over examples of LL(true answer) - mean_j LL(unrelated answer j), in nats per
    token. f <= 0: the corrupted name tells the model no more about the true answers than no name
    at all. With `relative_to_deleted=False` the baseline is 0 (plain preference gap).
    `spec` gives method, dims and seed; its strength is replaced by the probed one.
    """

    model: PreTrainedModel
    examples: Sequence[ForgetExample]
    spec: CorruptionSpec
    batch_size: int = 16
    relative_to_deleted: bool = True
    _baseline: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("no forget examples")
        self.examples = _with_default_alternatives(self.examples)

    @property
    def baseline(self) -> float:
        """The gap with the target's tokens deleted (computed once), or 0."""
        if self._baseline is None:
            self._baseline = 0.0
            if self.relative_to_deleted:
                deleted = [_without_masked_tokens(ex) for ex in self.examples]
                self._baseline = _answer_gap(self.model, deleted, None, batch_size=self.batch_size)
        return self._baseline

    def __call__(self, strength: float) -> float:
        """Return the answer gap at `strength` minus the baseline."""
        spec = self.spec.with_strength(strength)
        gap = _answer_gap(self.model, self.examples, spec, batch_size=self.batch_size)
        return gap - self.baseline


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
) -> FluencyReport:
    """Generate greedily from corrupted prompts; score the answers given the clean prompts."""
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    answers: list[list[int]] = []
    # transformers' stubs resolve `generate` through nn.Module.__getattr__ on some versions.
    generate = cast("Callable[..., torch.Tensor]", model.generate)
    with torch.inference_mode():
        corrupted = _embed_prompts(model, examples, spec)
        for first in range(0, len(corrupted), batch_size):
            embeds, attention, _ = _left_pad(corrupted[first : first + batch_size])
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
        logprobs = _continuation_logprobs(
            model, clean, [answers[i] for i in owners], owners, batch_size=batch_size
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
) -> Calibration:
    """Search the weakest strength that forgets, then check fluency there."""
    objective = AnswerPreferenceObjective(model, examples, spec)
    search = search_strength(objective, config)
    chosen = spec.with_strength(search.strength)
    fluency = measure_fluency(
        model,
        examples,
        chosen,
        bound=fluency_bound,
        min_distinct=min_distinct,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
    )
    logger.info(
        "calibrated %s: strength %.4g (f=%.3g, reached=%s, %d evaluations, %.1fs), "
        "ppl %.3g, distinct %.2f",
        spec.method,
        search.strength,
        search.value,
        search.reached,
        search.evaluations,
        search.seconds,
        fluency.perplexity,
        fluency.distinct_ratio,
    )
    return Calibration(chosen, search, fluency)
