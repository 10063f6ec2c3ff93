"""Scalar searches for the weakest corruption strength whose objective reaches a target.

Two derivative-free searches over one strength s, both stopping at the first probe with
f(s) <= target and returning the weakest such strength they found:

- `search_strength`: ECO's zeroth-order search, g = (f(s + eps) - f(s - eps)) / 2 eps,
  s <- clip(s - lr * g, min_strength, max_strength), then geometric bisection back from an
  overshooting step (`refine_steps`).
- `bracket_strength`: the one registration jobs use. Warm-started at `initial` (4x the embedding
  table's std, where the search lands for SmolLM2), it brackets the level by geometric steps of
  `expand`, then narrows the bracket with a safeguarded secant step in log-strength, probing
  just below and just above the estimated crossing in one batched evaluation, until the weakest
  passing strength is within a factor `tolerance` of the strongest failing one. An objective
  that evaluates several strengths in one batch (`evaluate(strengths) -> values`) pays one
  forward pass per round, not one per strength. Both searches assume f is monotone between the
  probes they compare.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

BatchObjective = Callable[[Sequence[float]], Sequence[float]]


@dataclass(frozen=True)
class StrengthSearchConfig:
    """Search settings; strengths in the corruption's own units."""

    initial: float
    lr: float
    eps: float
    target: float = 0.0
    min_strength: float = 0.0
    max_strength: float = math.inf
    max_steps: int = 20
    refine_steps: int = 4
    tolerance: float = 1.2
    """`bracket_strength`: stop once the passing strength is within this factor of a failing one
    (4 geometric bisections of a 16x bracket, the old refinement, reach 1.19)."""
    expand: float = 2.0
    """`bracket_strength`: factor between probes while looking for a bracket."""

    @classmethod
    def for_embeddings(cls, std: float, **overrides: float | int) -> StrengthSearchConfig:
        """Defaults for additive noise, scaled by the embedding table's std (see README)."""
        values: dict[str, float | int] = {
            "initial": 4.0 * std,
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
        if self.tolerance <= 1.0 or self.expand <= 1.0:
            raise ValueError("tolerance and expand must be > 1")


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
    rounds: int = 0
    """Batched evaluations (`bracket_strength`); each may cover several strengths."""
    failing_below: float | None = None
    """The strongest probe under `strength` that missed the target (the bracket's low end)."""
    values: tuple[tuple[float, float], ...] = ()
    """Every (strength, value) evaluated, by strength."""


class _Memo:
    """The objective with every evaluation kept: probes repeat when clipped to the bounds."""

    def __init__(self, objective: BatchObjective) -> None:
        self.objective = objective
        self.values: dict[float, float] = {}
        self.rounds = 0

    def many(self, strengths: Sequence[float]) -> list[float]:
        new = list(dict.fromkeys(s for s in strengths if s not in self.values))
        if new:
            self.rounds += 1
            for s, v in zip(new, self.objective(new), strict=True):
                self.values[s] = float(v)
                logger.debug("objective(%.6g) = %.6g", s, self.values[s])
        return [self.values[s] for s in strengths]

    def __call__(self, strength: float) -> float:
        return self.many([strength])[0]


def _one_at_a_time(objective: Callable[[float], float]) -> BatchObjective:
    return lambda strengths: [objective(s) for s in strengths]


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


def _result(
    f: _Memo,
    strength: float,
    reached: bool,
    started: float,
    config: StrengthSearchConfig,
    trace: Sequence[SearchStep] = (),
) -> StrengthSearchResult:
    value = f(strength)
    failing = [s for s, v in f.values.items() if s < strength and v > config.target]
    return StrengthSearchResult(
        strength=strength,
        value=value,
        reached=reached,
        trace=tuple(trace),
        evaluations=len(f.values),
        seconds=time.perf_counter() - started,
        rounds=f.rounds,
        failing_below=max(failing, default=None),
        values=tuple(sorted(f.values.items())),
    )


def search_strength(
    objective: Callable[[float], float], config: StrengthSearchConfig
) -> StrengthSearchResult:
    """Minimise `objective` over the strength until it reaches `config.target` (ECO's search)."""
    started = time.perf_counter()
    f = _Memo(_one_at_a_time(objective))
    trace: list[SearchStep] = []
    strength = min(max(config.initial, config.min_strength), config.max_strength)
    for _ in range(config.max_steps):
        low = max(strength - config.eps, config.min_strength)
        high = min(strength + config.eps, config.max_strength)
        for probe in (low, high):
            if f(probe) <= config.target:
                return _result(f, _refine(f, probe, config), True, started, config, trace)
        grad = (f(high) - f(low)) / (high - low) if high > low else 0.0
        step = min(max(strength - config.lr * grad, config.min_strength), config.max_strength)
        trace.append(SearchStep(strength, low, high, f(low), f(high), grad, step))
        logger.info("strength %.4g: f in [%.4g, %.4g], g=%.4g", strength, f(low), f(high), grad)
        strength = step
    best = min(f.values, key=lambda s: (f.values[s], s))
    return _result(f, best, False, started, config, trace)


def _crossing(lo: float, f_lo: float, hi: float, f_hi: float, target: float) -> float:
    """Where the line through (log lo, f_lo) and (log hi, f_hi) meets `target`, kept inside the
    middle 80% of the bracket (a secant step that hugs an end shrinks it too slowly)."""
    a, b = math.log(lo), math.log(hi)
    share = (f_lo - target) / (f_lo - f_hi) if f_lo != f_hi else 0.5
    return math.exp(a + min(max(share, 0.1), 0.9) * (b - a))


def _outward(f: _Memo, last: float, config: StrengthSearchConfig, *, up: bool) -> float:
    """The factor to step by from `last` (up or down) while no probe is on the other side.

    With two probes on this side, the line through them in log-strength predicts the crossing;
    step a little past it (so the probe lands across), at least `expand` and at most expand**4.
    """
    side = sorted(s for s in f.values if (s < last) == up and s != last and s > 0)
    if not side or last <= 0:
        return config.expand
    other = side[-1] if up else side[0]  # the previous probe (below when going up), nearest
    guess = _line_crossing(other, f.values[other], last, f.values[last], config.target)
    if guess is None:
        return config.expand
    factor = (guess / last if up else last / guess) * math.sqrt(config.tolerance)
    return min(max(factor, config.expand), config.expand**4)


def _line_crossing(a: float, f_a: float, b: float, f_b: float, target: float) -> float | None:
    """Where the line through (log a, f_a) and (log b, f_b) meets `target`; None if flat."""
    if f_a == f_b or a <= 0 or b <= 0:
        return None
    share = (f_a - target) / (f_a - f_b)
    return math.exp(math.log(a) + share * (math.log(b) - math.log(a)))


def bracket_strength(
    objective: BatchObjective | Callable[[float], float],
    config: StrengthSearchConfig,
    *,
    batched: bool = True,
) -> StrengthSearchResult:
    """The weakest strength with f <= target, to within `config.tolerance` (see module doc).

    `objective` takes a list of strengths and returns their values (`batched=True`), or one
    strength at a time (`batched=False`). Strengths must be > 0 (the search is geometric).
    """
    started = time.perf_counter()
    f = _Memo(objective if batched else _one_at_a_time(objective))  # type: ignore[arg-type]
    target = config.target
    s0 = min(max(config.initial, config.min_strength), config.max_strength)
    if s0 <= 0:  # a geometric search needs a positive start: try 0 itself, then eps
        if f(0.0) <= target:
            return _result(f, 0.0, True, started, config)
        s0 = min(config.eps, config.max_strength)
    lo: float | None = None
    hi: float | None = None
    if f(s0) <= target:
        hi = s0
    else:
        lo = s0
    # Bracket: step down from a passing probe, or up from a failing one, by `expand` or by as
    # far as the line through the last two probes says the crossing is (up to expand**4).
    while hi is None:
        assert lo is not None
        up = min(lo * _outward(f, lo, config, up=True), config.max_strength)
        if up <= lo or len(f.values) >= config.max_steps:
            best = min(f.values, key=lambda s: (f.values[s], s))
            return _result(f, best, False, started, config)
        if f(up) <= target:
            hi = up
        else:
            lo = up
    while lo is None:
        down = max(hi / _outward(f, hi, config, up=False), config.min_strength)
        if down >= hi or len(f.values) >= config.max_steps:
            return _result(f, hi, True, started, config)  # passes at the weakest strength tried
        if f(down) > target:
            lo = down
        else:
            hi = down
    # Narrow: probe just below and just above the estimated crossing, both in one round.
    for _ in range(config.max_steps):
        if hi / lo <= config.tolerance:
            break
        guess = _crossing(lo, f.values[lo], hi, f.values[hi], target)
        half = math.sqrt(config.tolerance) * 0.98  # the pair's own ratio stays under tolerance
        probes = sorted({min(max(guess / half, lo), hi), min(max(guess * half, lo), hi)})
        probes = [p for p in probes if lo < p < hi] or [math.sqrt(lo * hi)]
        for p, v in zip(probes, f.many(probes), strict=True):  # ascending
            if v <= target:
                hi = p  # the weakest passing probe; any above it adds nothing
                break
            lo = p
        logger.info("strength bracket (%.4g, %.4g]", lo, hi)
    return _result(f, hi, True, started, config)
