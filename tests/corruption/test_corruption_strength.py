import math

import pytest
import torch

from corruption import (
    AnswerPreferenceObjective,
    CorruptionSpec,
    ForgetExample,
    StrengthSearchConfig,
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
    assert config.initial == pytest.approx(0.1) and config.lr == pytest.approx(0.1)
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
    assert clean == again and math.isfinite(noisy) and noisy != clean
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
    assert plain(0.0) - objective.baseline == pytest.approx(clean)
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
    ex = make_forget_example(
        bpe_tokenizer, question, "J.K. Rowling", spans=[span], alternatives=["Paris"]
    )
    picked = [i for i, m in zip(ex.prompt_ids, ex.mask.tolist(), strict=True) if m]
    assert bpe_tokenizer.decode(picked).strip() == "Harry Potter"
    assert bpe_tokenizer.decode(ex.answer_ids) == "J.K. Rowling"
    assert len(ex.alternative_ids) == 1
    whole = make_forget_example(bpe_tokenizer, question, "J.K. Rowling")
    picked = [i for i, m in zip(whole.prompt_ids, whole.mask.tolist(), strict=True) if m]
    assert bpe_tokenizer.decode(picked).strip() == question
