"""Scalar searches for the weakest corruption strength whose objective reaches a target.

Two derivative-free searches over one strength s, both stopping at the first probe with
f(s) <= target and returning the weakest such strength they found:

- `search_strength`: ECO's zeroth-order search, g = (f(s + eps) - f(s - eps)) / 2 eps,
  s <- clip(s - lr * g, min_strength, max_strength), then geometric bisection back from an
  overshooting step (`refine_steps`).
- `bracket_strength`: the one registration jobs use. Warm-started at `initial` (4x the embedding
  table's std, where the search lands for SmolLM2), it brackets the level by geometric steps of
  `expand`, then narrows the bracket with a safeguarded secant step in log-strength, probing
  just below and just above the estimated crossing in one batched evaluation (only one of the
  two where the other could not narrow the bracket past the tolerance), until the weakest
  passing strength is within a factor `tolerance` of the strongest failing one. An objective
  that evaluates several strengths in one batch (`evaluate(strengths) -> values`) pays one
  forward pass per round, not one per strength: on a GPU two strengths cost about one. On a CPU
  they cost two, so there (`paired=False`) a round probes the lower of the two alone, and the
  upper one is not spent when the lower passes. Both searches assume f is monotone between the
  probes they compare.

`bracket_strength(..., warm=WarmStart(...))` starts instead where earlier searches on the same
model crossed the level (their probes: `WarmStart.from_probes`). It probes there; then, taking the
new objective to be an earlier one shifted along log-strength, it probes the smallest step that
closes a bracket (a factor just under `tolerance`) when the prediction lies within it, else the
pair around the prediction in one round. Whatever those probes leave open is finished by the
same bracketing and narrowing as without a warm start, so the result satisfies the same criterion
(a passing strength within `tolerance` of a failing one); only the probes leading there differ.
"""

from __future__ import annotations

import logging
import math
import statistics
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
    paired: bool = True
    """`bracket_strength`: narrow by the pair of probes around the estimated crossing in one
    batched evaluation (where two strengths cost about one, as on a GPU: fewer rounds), or,
    False, by the lower of the two alone (where an evaluation costs in proportion to the
    strengths it holds, as on a CPU: the upper probe is wasted whenever the lower passes)."""

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
    guess = _log_interp(other, f.values[other], last, f.values[last], config.target)
    if guess is None:
        return config.expand
    factor = (guess / last if up else last / guess) * math.sqrt(config.tolerance)
    return min(max(factor, config.expand), config.expand**4)


Curve = tuple[tuple[float, float], ...]
"""One earlier search's probes: (strength, f) pairs by strength."""


def _log_interp(a: float, f_a: float, b: float, f_b: float, value: float) -> float | None:
    """Where the line through (log a, f_a) and (log b, f_b) reaches `value`; None if flat."""
    if f_a == f_b or a <= 0 or b <= 0:
        return None
    log_s = math.log(a) + (f_a - value) / (f_a - f_b) * (math.log(b) - math.log(a))
    return math.exp(min(max(log_s, -100.0), 100.0))  # far beyond any bound all the same


def _crossing_of(curve: Curve, target: float) -> tuple[int, float] | None:
    """Where a search's probes cross `target`: the segment's index (its weakest passing probe
    and the strongest failing one below it, as `bracket_strength` reports them) and the secant
    crossing in log-strength between them."""
    passing = [i for i, (_, v) in enumerate(curve) if v <= target]
    if not passing or passing[0] == 0 or curve[0][0] <= 0:
        return None
    i = passing[0]
    (lo, f_lo), (hi, f_hi) = curve[i - 1], curve[i]
    crossing = _log_interp(lo, f_lo, hi, f_hi, target)
    return (i, crossing) if crossing is not None else None


def _shifted_crossing(curve: Curve, target: float, strength: float, value: float) -> float | None:
    """Take the new objective to be this curve shifted along log-strength: the shift that puts
    `value` at `strength`, applied to the curve's crossing. Uses the falling segment of the curve
    that spans `value` (the one nearest the crossing if several do), else extends the falling
    segment whose values come nearest to it (the crossing's if none falls)."""
    found = _crossing_of(curve, target)
    if found is None:
        return None
    i, crossing = found

    def miss(k: int) -> float:  # how far `value` lies outside segment k's values
        low, high = sorted((curve[k - 1][1], curve[k][1]))
        return max(low - value, value - high, 0.0)

    falling = [k for k in range(1, len(curve)) if curve[k][1] < curve[k - 1][1]]
    j = min(falling, key=lambda k: (miss(k), abs(k - i))) if falling else i
    (a, f_a), (b, f_b) = curve[j - 1], curve[j]
    at = _log_interp(a, f_a, b, f_b, value)
    if at is None or not math.isfinite(at) or at <= 0:
        return None
    return strength * crossing / at


@dataclass(frozen=True)
class WarmStart:
    """Earlier searches on the same model, to start the next one where they crossed the level.

    Each curve is one search's probes, (strength, f) by strength, in the units the search runs
    in (scale with `in_units`). Taking the new objective to have an earlier one's shape along
    log-strength, after one probe each curve shifted to pass through it predicts where the new
    objective crosses (`predict`). That held for versions of one target; targets on one model
    crossed too far apart for it (docs/results/performance.md), so the gateway passes only the
    same target's earlier searches.
    """

    curves: tuple[Curve, ...]

    def __post_init__(self) -> None:
        if not self.curves:
            raise ValueError("a warm start needs at least one earlier search")
        for curve in self.curves:
            if any(s <= 0 or not math.isfinite(s) or not math.isfinite(v) for s, v in curve):
                raise ValueError("curve points must be positive, finite strengths and values")

    @classmethod
    def from_probes(
        cls, searches: Sequence[Sequence[tuple[float, float]]], target: float = 0.0
    ) -> WarmStart | None:
        """From earlier searches' probes (`StrengthSearchResult.values`); only those that
        crossed `target` (a failing probe below a passing one) count. None when none did."""
        curves = []
        for probes in searches:
            points = [(float(s), float(v)) for s, v in probes]
            if not all(s > 0 and math.isfinite(s) and math.isfinite(v) for s, v in points):
                continue
            curve = tuple(sorted(points))
            if _crossing_of(curve, target) is not None:
                curves.append(curve)
        return cls(tuple(curves)) if curves else None

    def in_units(self, unit: float) -> WarmStart:
        """The same curves with strengths multiplied by `unit` (e.g. std units to absolute)."""
        return WarmStart(tuple(tuple((s * unit, v) for s, v in c) for c in self.curves))

    def guess(self, target: float = 0.0) -> float:
        """The median of the earlier crossings: the first probe."""
        crossings = [c for curve in self.curves if (c := _crossing_of(curve, target))]
        return statistics.median(x for _, x in crossings)

    def predict(self, strength: float, value: float, target: float = 0.0) -> float | None:
        """Where the objective that has `value` at `strength` crosses `target`: the median over
        the curves shifted through that point; None when no curve can tell."""
        guesses = [_shifted_crossing(c, target, strength, value) for c in self.curves]
        known = [g for g in guesses if g is not None]
        return statistics.median(known) if known else None


def _warm_probes(f: _Memo, warm: WarmStart, config: StrengthSearchConfig) -> None:
    """Probe the warm start's guess, then the step that closes a bracket with it (a factor just
    under `tolerance`), or, when the curves put the crossing beyond that step, the pair around
    their prediction (`predict`) in one round."""
    target = config.target
    p = min(max(warm.guess(target), config.min_strength), config.max_strength)
    value = f(p)
    passing = value <= target
    near = config.tolerance * 0.98  # a closing probe's ratio to `p` stays under tolerance
    close = min(max(p / near if passing else p * near, config.min_strength), config.max_strength)
    if close == p:
        return  # at a bound: nothing to close on this side
    predicted = warm.predict(p, value, target)
    if predicted is not None and ((predicted < close) if passing else (predicted > close)):
        half = math.sqrt(config.tolerance) * 0.98  # the pair's own ratio stays under tolerance
        low, high = (config.min_strength, p) if passing else (p, config.max_strength)
        pair = sorted({min(max(x, low), high) for x in (predicted / half, predicted * half)} - {p})
        if pair:
            f.many(pair)
            return
    f(close)


def _bracket_from(f: _Memo, target: float) -> tuple[float | None, float | None]:
    """The weakest passing probe and the strongest failing one below it (f taken monotone)."""
    passing = [s for s, v in f.values.items() if v <= target]
    hi = min(passing) if passing else None
    failing = [s for s, v in f.values.items() if v > target and (hi is None or s < hi)]
    return (max(failing) if failing else None), hi


def _outward_until_bracket(
    f: _Memo,
    config: StrengthSearchConfig,
    lo: float | None,
    hi: float | None,
    started: float,
    spent: int = 0,
) -> tuple[float, float] | StrengthSearchResult:
    """From a failing `lo` step up, or from a passing `hi` step down, by `expand` or by as far
    as the line through the last two probes puts the crossing (up to expand**4), until a probe
    lands on the other side: the bracket, or the result when a bound or `max_steps` probes
    (beyond the `spent` ones) come first.
    """
    target = config.target
    while hi is None:
        assert lo is not None
        up = min(lo * _outward(f, lo, config, up=True), config.max_strength)
        if up <= lo or len(f.values) - spent >= config.max_steps:
            best = min(f.values, key=lambda s: (f.values[s], s))
            return _result(f, best, False, started, config)
        if f(up) <= target:
            hi = up
        else:
            lo = up
    while lo is None:
        down = max(hi / _outward(f, hi, config, up=False), config.min_strength)
        if down >= hi or len(f.values) - spent >= config.max_steps:
            return _result(f, hi, True, started, config)  # passes at the weakest strength tried
        if f(down) > target:
            lo = down
        else:
            hi = down
    return lo, hi


def _cold_bracket(
    f: _Memo, config: StrengthSearchConfig, started: float
) -> tuple[float, float] | StrengthSearchResult:
    """The bracket from `config.initial` (today's start), with `max_steps` probes of its own;
    probes already in `f` count as known values."""
    spent = len(f.values)
    s0 = min(max(config.initial, config.min_strength), config.max_strength)
    if s0 <= 0:  # a geometric search needs a positive start: try 0 itself, then eps
        if f(0.0) <= config.target:
            return _result(f, 0.0, True, started, config)
        s0 = min(config.eps, config.max_strength)
    f(s0)
    lo, hi = _bracket_from(f, config.target)
    if lo is not None and hi is not None:
        return lo, hi
    return _outward_until_bracket(f, config, lo, hi, started, spent)


def _needed(probes: list[float], lo: float, hi: float, tolerance: float) -> list[float]:
    """Of a round's two probes (ascending), the one whose outcome settles the bracket, when the
    other's adds nothing the tolerance asks for: when (lower, hi] is already within it, the upper
    probe could only move the answer inside the tolerance (the lower failing) or not at all (the
    lower passing); when (lo, upper] is, the lower one likewise (and fails if the upper does,
    f being monotone between the probes, as the module assumes: where it is not, the search
    goes on above the upper probe and still ends bracketed by a failing and a passing one)."""
    if len(probes) != 2:
        return probes
    lower, upper = probes
    if hi / lower <= tolerance:
        return [lower]
    if upper / lo <= tolerance:
        return [upper]
    return probes


def bracket_strength(
    objective: BatchObjective | Callable[[float], float],
    config: StrengthSearchConfig,
    *,
    batched: bool = True,
    warm: WarmStart | None = None,
) -> StrengthSearchResult:
    """The weakest strength with f <= target, to within `config.tolerance` (see module doc).

    `objective` takes a list of strengths and returns their values (`batched=True`), or one
    strength at a time (`batched=False`). Strengths must be > 0 (the search is geometric).
    `warm` replaces `config.initial` and the first steps (module doc): when its probes bracket
    nothing and stepping outward from them reaches nothing either, the search starts over from
    `config.initial` as without it (every probe kept). The criterion is the same either way.
    """
    started = time.perf_counter()
    f = _Memo(objective if batched else _one_at_a_time(objective))  # type: ignore[arg-type]
    target = config.target
    found: tuple[float, float] | StrengthSearchResult | None = None
    if warm is not None:
        _warm_probes(f, warm, config)
        lo, hi = _bracket_from(f, target)
        found = (lo, hi) if lo is not None and hi is not None else None
        if found is None:
            found = _outward_until_bracket(f, config, lo, hi, started)
            if isinstance(found, StrengthSearchResult) and not found.reached:
                logger.info("warm start missed: searching from %.4g", config.initial)
                found = None
    if found is None:
        found = _cold_bracket(f, config, started)
    if isinstance(found, StrengthSearchResult):
        return found
    lo, hi = found
    # Narrow: probe just below and just above the estimated crossing, both in one round.
    for _ in range(config.max_steps):
        if hi / lo <= config.tolerance:
            break
        guess = _crossing(lo, f.values[lo], hi, f.values[hi], target)
        half = math.sqrt(config.tolerance) * 0.98  # the pair's own ratio stays under tolerance
        probes = sorted({min(max(guess / half, lo), hi), min(max(guess * half, lo), hi)})
        probes = [p for p in probes if lo < p < hi] or [math.sqrt(lo * hi)]
        probes = _needed(probes, lo, hi, config.tolerance)
        if not config.paired:
            probes = probes[:1]
        for p, v in zip(probes, f.many(probes), strict=True):  # ascending
            if v <= target:
                hi = p  # the weakest passing probe; any above it adds nothing
                break
            lo = p
        logger.info("strength bracket (%.4g, %.4g]", lo, hi)
    return _result(f, hi, True, started, config)
