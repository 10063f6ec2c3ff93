"""The one continuation scorer (corruption/likelihood.py) against plain full forwards."""

from __future__ import annotations

import pytest
import torch

import corruption.likelihood as likelihood
from corruption.likelihood import mixed_token_logprobs, next_token_logprobs, token_logprobs


@pytest.fixture(scope="module")
def pair(tiny_llama_factory):
    """Two tiny llamas with different weights, one vocabulary."""
    return tiny_llama_factory()[1], tiny_llama_factory(seed=1)[1]


def _full(terms, prompt: list[int], cont: list[int]) -> list[float]:
    """Σ w · logits over prompt + continuation in one unpadded forward, read at the
    continuation's tokens."""
    ids = torch.tensor([prompt + cont])
    with torch.inference_mode():
        logits = sum(w * m(input_ids=ids).logits[0] for m, w in terms)  # (L, V)
    lps = logits.log_softmax(-1)
    t = len(prompt)
    return [float(lps[t - 1 + k, tok]) for k, tok in enumerate(cont)]


def _case():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 3)]
    conts = [[4, 7, 9], [1], [2, 2], [8, 3, 5, 6, 11, 40, 2], [7]]
    owners = [0, 0, 1, 2, 2]
    return prompts, conts, owners


@pytest.mark.parametrize("budget", [likelihood.LOGITS_BUDGET, 300 * 3])
def test_token_logprobs_match_full_forwards(pair, monkeypatch, budget) -> None:
    # A budget of 3 positions' logits splits the continuations into several passes: same
    # numbers.
    monkeypatch.setattr(likelihood, "LOGITS_BUDGET", budget)
    model, other = pair
    prompts, conts, owners = _case()
    for terms in ([(model, 1.0)], [(model, 0.5), (other, -2.0)]):
        got = token_logprobs(terms, [torch.tensor(p) for p in prompts], conts, owners, batch_size=2)
        for lps, cont, owner in zip(got, conts, owners, strict=True):
            assert lps == pytest.approx(_full(terms, prompts[owner], cont), abs=1e-5)


@pytest.mark.parametrize("budget", [likelihood.LOGITS_BUDGET, 300 * 3])
def test_mixes_score_like_their_own_terms(pair, monkeypatch, budget) -> None:
    # δ's α sweep: one pass of each model, then each weighting. The mixes include one model
    # alone (its logits not copied), a zero weight, and δ's (1 - α, α); each must match the
    # full forward of its own weighted sum, whatever the order of the mixes (the last one
    # combines in place).
    monkeypatch.setattr(likelihood, "LOGITS_BUDGET", budget)
    model, other = pair
    prompts, conts, owners = _case()
    mixes = [[1.0, 0.0], [-0.5, 1.5], [0.0, 1.0], [1.0, 0.0], [0.25, 0.75]]
    got = mixed_token_logprobs(
        [model, other], mixes, [torch.tensor(p) for p in prompts], conts, owners, batch_size=2
    )
    assert len(got) == len(mixes)
    for mix, scores in zip(mixes, got, strict=True):
        terms = [(m, w) for m, w in zip((model, other), mix, strict=True) if w]
        for lps, cont, owner in zip(scores, conts, owners, strict=True):
            assert lps == pytest.approx(_full(terms, prompts[owner], cont), abs=1e-5)
    with pytest.raises(ValueError, match="one weight per model"):
        mixed_token_logprobs([model, other], [[1.0]], [torch.tensor(prompts[0])], [[1]], [0])


def test_embeddings_score_like_their_ids_and_belong_to_one_model(pair) -> None:
    model, other = pair
    prompts, conts, owners = _case()
    table = model.get_input_embeddings()
    with torch.inference_mode():
        embeds = [table(torch.tensor(p)) for p in prompts]
    by_ids = token_logprobs([(model, 1.0)], [torch.tensor(p) for p in prompts], conts, owners)
    by_embeds = token_logprobs([(model, 1.0)], embeds, conts, owners)
    for a, b in zip(by_ids, by_embeds, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    # A changed embedding changes the scores (the embeddings are what is read).
    shifted = [e + 0.5 for e in embeds]
    assert token_logprobs([(model, 1.0)], shifted, conts, owners)[0] != pytest.approx(
        by_ids[0], abs=1e-3
    )
    with pytest.raises(ValueError, match="one term"):
        token_logprobs([(model, 1.0), (other, 1.0)], embeds, conts, owners)
    with pytest.raises(ValueError, match="at least one token"):
        token_logprobs([(model, 1.0)], embeds, [[1], []], [0, 1])


def test_next_token_logprobs_are_the_combined_last_position(pair) -> None:
    model, other = pair
    prompts, _, _ = _case()
    terms = [(model, 1.0), (other, 0.25)]
    got = next_token_logprobs(terms, [torch.tensor(p) for p in prompts])  # (P, V)
    for row, prompt in enumerate(prompts):
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            want = sum(w * m(input_ids=ids).logits[0, -1] for m, w in terms).log_softmax(-1)
        assert got[row] == pytest.approx(want, abs=1e-5)
