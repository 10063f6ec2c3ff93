import math

import pytest
import torch

from corruption import (
    AnswerPreferenceObjective,
    CorruptionSpec,
    ForgetExample,
    StrengthSearchConfig,
    WarmStart,
    bracket_strength,
    calibrate_strength,
    make_forget_example,
    measure_fluency,
    search_strength,
)
from corruption.strength import _continuation_logprobs


def test_search_converges_on_convex_objective():
    calls = []

    def f(s):
        calls.append(s)
        return (s - 3.0) ** 2

    result = search_strength(f, StrengthSearchConfig(initial=0.5, lr=0.2, eps=0.05, target=0.01))
    assert result.reached
    assert abs(result.strength - 3.0) <= 0.1
    assert result.value == pytest.approx((result.strength - 3.0) ** 2)
    assert result.evaluations == len(set(calls)) == len(calls)  # every probe evaluated once
    # The trace walks toward the minimum.
    assert [s.strength for s in result.trace] == sorted(s.strength for s in result.trace)
    assert result.trace[0].grad == pytest.approx(-5.0, rel=1e-3)


def test_search_respects_min_and_max_strength():
    # The minimum is below min_strength: the search sits at min_strength.
    result = search_strength(
        lambda s: (s - 1.0) ** 2 + 1.0,
        StrengthSearchConfig(initial=5.0, lr=0.4, eps=0.1, target=0.0, min_strength=2.0),
    )
    assert not result.reached
    assert result.strength == pytest.approx(2.0)
    assert all(step.low >= 2.0 and step.next_strength >= 2.0 for step in result.trace)
    capped = search_strength(
        lambda s: -s,
        StrengthSearchConfig(initial=1.0, lr=10.0, eps=0.1, target=-100.0, max_strength=4.0),
    )
    assert not capped.reached and capped.strength == 4.0
    assert all(step.high <= 4.0 for step in capped.trace)


def test_search_returns_weakest_probe_reaching_target():
    result = search_strength(
        lambda s: 1.0 - s, StrengthSearchConfig(initial=0.0, lr=1.0, eps=0.25, target=0.0)
    )
    assert result.reached and result.strength == pytest.approx(1.0, abs=0.05)
    assert result.value <= 0.0


def test_search_walks_back_after_overshooting():
    config = StrengthSearchConfig(
        initial=0.0, lr=100.0, eps=0.25, max_strength=16.0, refine_steps=12
    )
    result = search_strength(lambda s: 1.0 - s, config)
    assert result.trace[-1].next_strength == 16.0  # the step overshot ...
    assert result.reached and result.strength == pytest.approx(1.0, abs=0.01)  # ... then bisected
    no_refine = search_strength(
        lambda s: 1.0 - s,
        StrengthSearchConfig(initial=0.0, lr=100.0, eps=0.25, max_strength=16.0, refine_steps=0),
    )
    assert no_refine.strength == 15.75


def test_search_config_scaled_by_embedding_std():
    config = StrengthSearchConfig.for_embeddings(0.1, max_steps=3)
    # Warm start at 4x std: where the search lands for SmolLM2 (corruption/README.md).
    assert config.initial == pytest.approx(0.4) and config.lr == pytest.approx(0.1)
    assert config.min_strength == pytest.approx(0.025) and config.max_steps == 3


def test_config_validation():
    with pytest.raises(ValueError):
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.0)
    with pytest.raises(ValueError):
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.1, min_strength=2.0, max_strength=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_llama_factory):
    return tiny_llama_factory()[1]


def test_continuation_logprobs_match_full_forward(tiny):
    g = torch.Generator().manual_seed(0)
    prompts_ids = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 3)]
    conts = [[4, 7, 9], [1], [2, 2], [8, 3, 5, 6]]
    owners = [0, 0, 1, 2]
    with torch.inference_mode():
        table = tiny.get_input_embeddings()
        prompts = [table(torch.tensor(p)) for p in prompts_ids]
        got = _continuation_logprobs(tiny, prompts, conts, owners, batch_size=2)
        for value, cont, owner in zip(got, conts, owners, strict=True):
            ids = torch.tensor([prompts_ids[owner] + cont])
            logprobs = tiny(input_ids=ids).logits[0].log_softmax(-1)  # (L, V)
            t = len(prompts_ids[owner])
            want = logprobs[t - 1 : t - 1 + len(cont)].gather(-1, torch.tensor(cont)[:, None])
            assert value == pytest.approx(float(want.mean()), abs=1e-5)


def _examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for k, n in enumerate((6, 8, 7)):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        mask = torch.zeros(n, dtype=torch.bool)
        mask[1:4] = True
        out.append(ForgetExample(ids, mask, [5 + k, 6, 7], [[9, 10], [11, 12, 13]]))
    return out


def test_objective_reads_corruption_strength(tiny):
    examples = _examples()
    objective = AnswerPreferenceObjective(tiny, examples, CorruptionSpec("add_noise_first_n", 0.0))
    clean, again, noisy = objective(0.0), objective(0.0), objective(50.0)
    # The first call also ran the baseline in its batch: equal up to float rounding.
    assert clean == pytest.approx(again, abs=1e-5) and math.isfinite(noisy) and noisy != clean
    # Without alternatives the other examples' answers stand in.
    bare = [ForgetExample(e.prompt_ids, e.mask, e.answer_ids) for e in examples]
    filled = AnswerPreferenceObjective(
        tiny, bare, CorruptionSpec("add_noise_first_n", 0.0)
    ).examples
    assert all(e.alternative_ids and e.answer_ids not in e.alternative_ids for e in filled)
    # The baseline deletes the masked tokens from the prompt.
    assert objective.baseline != 0.0
    plain = AnswerPreferenceObjective(
        tiny, examples, CorruptionSpec("add_noise_first_n", 0.0), relative_to_deleted=False
    )
    assert plain.baseline == 0.0
    assert plain(0.0) - objective.baseline == pytest.approx(clean, abs=1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        ForgetExample([1, 2], torch.zeros(2, dtype=torch.bool), [])


def test_fluency_and_calibration_run(tiny):
    examples = _examples()
    report = measure_fluency(tiny, examples, None, bound=1e9, max_new_tokens=4, eos_token_id=0)
    assert len(report.answers) == 3 and report.fluent
    assert 0.0 < report.distinct_ratio <= 1.0
    strict = measure_fluency(
        tiny, examples, None, bound=1e9, min_distinct=1.01, max_new_tokens=4, eos_token_id=0
    )
    assert not strict.fluent and strict.answers == report.answers
    assert all(1 <= len(a) <= 4 for a in report.answers)
    config = StrengthSearchConfig(initial=0.0, lr=1.0, eps=0.5, target=1e9, max_steps=2)
    calibration = calibrate_strength(
        tiny,
        examples,
        CorruptionSpec("add_noise_first_n", 0.0, seed=3),
        config,
        fluency_bound=1e9,
        max_new_tokens=3,
    )
    assert calibration.search.reached and calibration.spec.strength == 0.0
    assert calibration.spec.seed == 3


def test_make_forget_example_masks_spans(bpe_tokenizer):
    question = "Who wrote Harry Potter?"
    span = (question.index("Harry"), question.index("?"))
    prompt = f"User: {question}\nAssistant:"  # templated by the caller (the gateway's renderer)
    ex = make_forget_example(
        bpe_tokenizer, prompt, question, "J.K. Rowling", spans=[span], alternatives=["Paris"]
    )
    picked = [i for i, m in zip(ex.prompt_ids, ex.mask.tolist(), strict=True) if m]
    assert bpe_tokenizer.decode(picked).strip() == "Harry Potter"
    assert bpe_tokenizer.decode(ex.answer_ids) == "J.K. Rowling"
    assert len(ex.alternative_ids) == 1
    whole = make_forget_example(bpe_tokenizer, prompt, question, "J.K. Rowling")
    picked = [i for i, m in zip(whole.prompt_ids, whole.mask.tolist(), strict=True) if m]
    assert bpe_tokenizer.decode(picked).strip() == question


# --- bracket_strength: the search registration jobs use --------------------------------------


def _counting(f):
    calls: list[list[float]] = []

    def batch(strengths):
        calls.append(list(strengths))
        return [f(s) for s in strengths]

    return batch, calls


@pytest.mark.parametrize(
    ("f", "root"),
    [
        (lambda s: 1.0 - s, 1.0),  # linear
        (lambda s: 0.3 - math.log(s), math.exp(0.3)),  # linear in log s
        (lambda s: 2.0 / (1.0 + s) - 0.2, 9.0),  # convex, flattening (like the real objective)
        (lambda s: 0.5 - s**3, 0.5 ** (1 / 3)),  # steep
    ],
)
def test_bracket_finds_weakest_passing_strength_within_tolerance(f, root):
    config = StrengthSearchConfig(
        initial=2.0, lr=1.0, eps=0.1, min_strength=0.01, max_strength=64.0, tolerance=1.2
    )
    batch, calls = _counting(f)
    result = bracket_strength(batch, config)
    assert result.reached and result.value <= 0.0
    assert root <= result.strength <= root * 1.2  # passes, and at most 20% above the crossing
    assert result.failing_below is not None and f(result.failing_below) > 0
    assert result.strength / result.failing_below <= 1.2
    assert result.evaluations == len({s for call in calls for s in call})  # never twice
    assert result.rounds == len(calls) <= 7
    assert dict(result.values)[result.strength] == pytest.approx(f(result.strength))


def test_bracket_batches_its_narrowing_probes():
    batch, calls = _counting(lambda s: 1.0 - s)
    config = StrengthSearchConfig(initial=4.0, lr=1.0, eps=0.1, min_strength=0.01, tolerance=1.1)
    bracket_strength(batch, config)
    assert calls[0] == [4.0] and calls[1] == [2.0]  # the warm start passes: step down
    assert any(len(call) == 2 for call in calls[2:])  # then two probes per round


# f against u = strength / std from a registration's bf16 strength search (Sherlock Holmes,
# bench/registration.py); linear between the points.
SHERLOCK_CURVE = [(2.0, 0.0139), (2.4456, 0.0021), (2.8251, -0.0037), (3.2559, -0.0045),
                  (4.0, -0.0092)]  # fmt: skip


def test_bracket_spends_no_probe_inside_the_tolerance_of_its_bracket():
    def f(u: float) -> float:
        pts = SHERLOCK_CURVE
        u = min(max(u, pts[0][0]), pts[-1][0])
        for (u0, f0), (u1, f1) in zip(pts, pts[1:], strict=False):
            if u0 <= u <= u1:
                return f0 + (f1 - f0) * (u - u0) / (u1 - u0)
        raise AssertionError(u)

    batch, calls = _counting(f)
    result = bracket_strength(batch, StrengthSearchConfig.for_embeddings(1.0))
    assert result.reached and result.failing_below is not None
    assert result.strength / result.failing_below <= 1.2
    probed = sorted(s for call in calls for s in call)
    # Bracketed at (2.0, 2.83] after three rounds, the fourth round probed 2.45 and also 2.82,
    # 0.2% under the passing 2.83: a whole evaluation (1.9 s) for nothing the tolerance asks.
    assert all(b / a > 1.01 for a, b in zip(probed, probed[1:], strict=False)), probed
    assert result.evaluations == 5


def _measured(points: list[tuple[float, float]]):
    """f linear in log u between measured points (flat beyond them)."""

    def f(u: float) -> float:
        u = min(max(u, points[0][0]), points[-1][0])
        for (u0, f0), (u1, f1) in zip(points, points[1:], strict=False):
            if u0 <= u <= u1:
                return f0 + (f1 - f0) * math.log(u / u0) / math.log(u1 / u0)
        raise AssertionError(u)

    return f


# The Tolkien target's bf16 search (bench/registration.py, 2026-12-04).
TOLKIEN_CURVE = [(1.0, 0.0990), (1.4058, 0.0081), (1.5797, -0.0041), (1.8206, -0.0268),
                 (2.0, -0.0309), (4.0, -0.0687)]  # fmt: skip


@pytest.mark.parametrize("curve", [SHERLOCK_CURVE, TOLKIEN_CURVE])
def test_one_probe_per_round_spends_no_probe_above_a_passing_one(curve):
    """On a CPU two strengths cost two evaluations: narrowing by the lower probe alone skips
    the upper one wherever the lower passes (both curves' narrowing did), to the same criterion.
    """
    f = _measured(curve)
    results = {}
    for paired in (True, False):
        batch, calls = _counting(f)
        config = StrengthSearchConfig.for_embeddings(1.0, paired=paired)
        results[paired] = bracket_strength(batch, config)
        assert paired or all(len(call) == 1 for call in calls), calls
    for result in results.values():
        assert result.reached and result.failing_below is not None
        assert result.strength / result.failing_below <= 1.2
    assert results[False].strength == pytest.approx(results[True].strength)
    assert results[False].evaluations == results[True].evaluations - 1


# f against u = strength / std, measured on SmolLM2 for 8 Harry Potter questions
# (corruption/README.md); linear in log u between the points.
README_CURVE = [(0.5, 0.77), (1, 0.26), (1.5, 0.15), (2, 0.09), (2.5, 0.05), (3, 0.02),
                (4, -0.005), (5, -0.03), (6, -0.05), (8, -0.02), (16, 0.01)]  # fmt: skip


def _readme_f(std):
    f = _measured(README_CURVE)
    return lambda strength: f(strength / std)


def test_bracket_cheaper_than_gradient_search_and_no_stronger():
    std = 0.1356
    f = _readme_f(std)
    config = StrengthSearchConfig.for_embeddings(std, initial=1.0 * std)  # the old warm start
    slow = search_strength(f, config)
    fast = bracket_strength(f, StrengthSearchConfig.for_embeddings(std), batched=False)
    assert slow.reached and fast.reached and fast.value <= 0.0
    crossing = 3.8 * std  # f(3 std) = 0.02 > 0 >= f(4 std); linear in log u: u = 3.8
    assert crossing <= fast.strength <= crossing * 1.2
    assert fast.strength <= slow.strength * 1.2
    assert fast.evaluations < slow.evaluations


def test_bracket_edges():
    # Never reached: the best value within the bounds, reached=False.
    capped = bracket_strength(
        lambda s: [1.0 / (1 + x) for x in s],
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.1, max_strength=8.0, target=-1.0),
    )
    assert not capped.reached and capped.strength == 8.0
    # Reached already at the weakest strength allowed.
    floor = bracket_strength(
        lambda s: [-1.0 for _ in s],
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.1, min_strength=0.25),
    )
    assert floor.reached and floor.strength == 0.25 and floor.failing_below is None
    # A zero start is tried as such.
    zero = bracket_strength(
        lambda s: [0.0 for _ in s], StrengthSearchConfig(initial=0.0, lr=1.0, eps=0.1)
    )
    assert zero.reached and zero.strength == 0.0 and zero.evaluations == 1
    with pytest.raises(ValueError):
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.1, tolerance=1.0)


def _criterion(result, f, tolerance=1.2):
    """What every bracket_strength result satisfies: f passes at the strength, and a probe
    within `tolerance` below it fails."""
    assert result.reached and result.value <= 0.0 and f(result.strength) <= 0.0
    assert result.failing_below is not None and f(result.failing_below) > 0.0
    assert result.strength / result.failing_below <= tolerance


# Targets on one model: the README curve shifted along log-strength (each crosses at
# 3.8 x std x shift), as different targets' objectives are.
def _shifted(std, shift, scale=1.0):
    base = _readme_f(std)
    return lambda s: scale * base(s / shift)


@pytest.mark.parametrize("shift", [0.8, 0.9, 1.0, 1.1, 1.25, 1.4])
def test_warm_start_from_an_earlier_search_needs_fewer_evaluations(shift):
    std = 0.1356
    config = StrengthSearchConfig.for_embeddings(std)
    first_f = _shifted(std, 1.0)
    first = bracket_strength(first_f, config, batched=False)
    _criterion(first, first_f)
    warm = WarmStart.from_probes([first.values])
    assert warm is not None
    f = _shifted(std, shift)
    cold = bracket_strength(f, config, batched=False)
    hot = bracket_strength(f, config, batched=False, warm=warm)
    _criterion(cold, f)
    _criterion(hot, f)  # the same criterion
    assert hot.evaluations < cold.evaluations
    assert hot.evaluations <= 3
    crossing = 3.776 * std * shift  # README_CURVE: f(3) = 0.02, f(4) = -0.005, linear in log
    assert crossing <= hot.strength <= crossing * 1.2
    if 0.9 <= shift <= 1.1:  # near an earlier crossing: the guess and one closing probe
        assert hot.evaluations == 2


def _curve(*points):
    return WarmStart(((points),))


@pytest.mark.parametrize(
    "warm",
    [
        _curve((0.02, 0.5), (0.03, -0.1)),  # crossed far too weak
        _curve((5.0, 0.5), (6.0, -0.1)),  # crossed far too strong
        _curve((0.4, 0.5), (0.41, -0.5)),  # a steep curve: the prediction stays close
        _curve((0.2, 0.001), (4.0, -0.001)),  # a flat one: the prediction is far away
        _curve((0.001, 1.0), (0.0011, -1.0)),  # below min_strength: clipped
        WarmStart.from_probes([[(0.3, 0.2), (0.5, -0.3)], [(2.0, 0.1), (2.3, -0.1)]]),  # apart
    ],
)
@pytest.mark.parametrize("scale", [1.0, 0.3, 3.0])
def test_bad_warm_start_falls_back_and_meets_the_same_criterion(warm, scale):
    std = 0.1356
    f = _shifted(std, 1.0, scale)
    config = StrengthSearchConfig.for_embeddings(std)
    result = bracket_strength(f, config, batched=False, warm=warm)
    _criterion(result, f)
    crossing = 3.776 * std
    assert crossing <= result.strength <= crossing * 1.2
    assert result.evaluations <= 2 * config.max_steps + 3


@pytest.mark.parametrize(("f", "root"), [(lambda s: 1.0 - s, 1.0), (lambda s: 0.5 - s**3, 0.7937)])
@pytest.mark.parametrize("guess", [0.05, 0.5, 0.9, 1.0, 1.1, 3.0, 30.0])
@pytest.mark.parametrize("steep", [0.2, 1.0, 5.0])
def test_warm_start_anywhere_keeps_the_criterion(f, root, guess, steep):
    config = StrengthSearchConfig(
        initial=2.0, lr=1.0, eps=0.1, min_strength=0.01, max_strength=64.0, tolerance=1.2
    )
    batch, calls = _counting(f)
    warm = _curve((guess / 1.1, 0.1 * steep), (guess * 1.1, -0.1 * steep))
    result = bracket_strength(batch, config, warm=warm)
    _criterion(result, f)
    assert root <= result.strength <= root * 1.2 + 1e-9
    assert result.evaluations == len({s for call in calls for s in call})  # never twice


def test_warm_start_at_the_bounds():
    # Passing already at min_strength: the warm start there returns it, no failing probe needed.
    floor = bracket_strength(
        lambda s: [-1.0 for _ in s],
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.1, min_strength=0.25),
        warm=_curve((0.2, 1.0), (0.25, -1.0)),
    )
    assert floor.reached and floor.strength == 0.25 and floor.evaluations == 1
    # Never reached: the best value within the bounds, reached=False, as without a warm start.
    capped = bracket_strength(
        lambda s: [1.0 / (1 + x) for x in s],
        StrengthSearchConfig(initial=1.0, lr=1.0, eps=0.1, max_strength=8.0, target=-1.0),
        warm=_curve((3.0, 1.0), (4.0, -1.0)),
    )
    assert not capped.reached and capped.strength == 8.0


def test_warm_start_from_probes():
    searches = [
        [(math.e, -0.1), (1.0, 0.1), (8.0, -0.3)],  # crosses at e^0.5 (secant in log-strength)
        [(2.0, 0.2), (2.0 * math.e, -0.2)],  # at 2 e^0.5
        [(1.0, 0.5), (2.0, 0.4)],  # never crossed: left out
        [(0.0, 0.5), (2.0, -0.4)],  # a zero strength: left out
    ]
    warm = WarmStart.from_probes(searches)
    assert warm is not None and len(warm.curves) == 2
    assert warm.guess() == pytest.approx(1.5 * math.sqrt(math.e))  # the median crossing
    assert warm.predict(3.0, 0.0) == pytest.approx(3.0)  # at the level: crosses there
    # The first curve shifted by 2 (its 0.1 moved from 1 to 2): it crosses at 2 e^0.5.
    first = WarmStart(warm.curves[:1])
    assert first.predict(2.0, 0.1) == pytest.approx(2.0 * math.sqrt(math.e))
    assert math.isfinite(first.predict(2.0, 1e6) or math.nan)  # far off any bound: no overflow
    assert warm.in_units(2.0).guess() == pytest.approx(2 * warm.guess())
    assert WarmStart.from_probes([]) is None
    assert WarmStart.from_probes([[(1.0, 0.5), (2.0, 0.4)]]) is None
    with pytest.raises(ValueError):
        WarmStart(())


def test_batched_objective_matches_one_at_a_time(tiny):
    objective = AnswerPreferenceObjective(tiny, _examples(), CorruptionSpec("add_noise_first_n", 0))
    together = objective.evaluate([0.5, 5.0, 50.0])
    apart = [
        AnswerPreferenceObjective(tiny, _examples(), CorruptionSpec("add_noise_first_n", 0))(s)
        for s in (0.5, 5.0, 50.0)
    ]
    assert together == pytest.approx(apart, abs=1e-5)
    assert len(set(together)) == 3  # the strengths really differ


def test_fluency_answers_can_come_from_the_serving_engine(tiny):
    examples = _examples()
    own = measure_fluency(tiny, examples, None, bound=1e9, max_new_tokens=4, eos_token_id=0)
    calls = []

    def engine(embeds, ids, max_new):  # stands in for the engine: same greedy answers
        calls.append((len(embeds), [len(i) for i in ids], max_new))
        assert all(e.shape == (len(i), 16) for e, i in zip(embeds, ids, strict=True))
        return [a + [0, 5] if a[-1:] == [0] else a for a in own.answers]  # past EOS: cut

    served = measure_fluency(
        tiny, examples, None, bound=1e9, max_new_tokens=4, eos_token_id=0, generate_with=engine
    )
    assert calls == [(3, [6, 8, 7], 4)]
    assert served.answers == own.answers
    assert served.perplexity == pytest.approx(own.perplexity, rel=1e-5)
    # An engine that cannot tell token ids (an upstream server: -1) leaves it to the model.
    blind = measure_fluency(
        tiny, examples, None, bound=1e9, max_new_tokens=4, eos_token_id=0,
        generate_with=lambda embeds, ids, n: [[-1] * n for _ in embeds],
    )  # fmt: skip
    assert blind.answers == own.answers


def test_objective_split_between_threads_gives_the_same_values(tiny):
    spec = CorruptionSpec("add_noise_first_n", 0)
    alone = AnswerPreferenceObjective(tiny, _examples(), spec).evaluate([0.5, 5.0])
    shared = AnswerPreferenceObjective(tiny, _examples(), spec, workers=2).evaluate([0.5, 5.0])
    assert shared == pytest.approx(alone, abs=1e-5)


def test_continuations_split_by_tokens_give_the_same_values(tiny):
    from corruption.strength import _parallel_logprobs

    gen = torch.Generator().manual_seed(0)
    table = tiny.get_input_embeddings()
    lengths = [3, 9, 5]
    with torch.inference_mode():
        prompts = [table(torch.randint(0, 100, (n,), generator=gen)) for n in lengths]
    conts = [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (2, 30, 4, 1, 7, 12, 3)]
    owners = [0, 0, 1, 1, 1, 2, 2]
    with torch.inference_mode():
        alone = _continuation_logprobs(tiny, prompts, conts, owners, batch_size=2)
    for workers in (2, 3, 8):  # a prompt's continuations may land in two threads' shares
        shared = _parallel_logprobs(tiny, prompts, conts, owners, batch_size=2, workers=workers)
        assert shared == pytest.approx(alone, abs=1e-5)
