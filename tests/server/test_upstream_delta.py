"""δ mode through a black-box upstream: top-k candidates re-ranked by the small models' offset.

The "upstream" is a real (tiny) model behind httpx's MockTransport, answering /v1/completions
with max_tokens=1 and top-k logprobs the way vLLM's server does (`token_id:N` keys).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from offset import DeltaSpec, OffsetModels, OffsetPair
from server.engine import GenerationRequest, SamplingOptions, TokenPrompt
from server.engine.upstream_delta import UpstreamDeltaDecoder
from server.errors import EngineError, InvalidRequestError
from tests.offset.conftest import tiny_llama, tiny_smollm_folders

VOCAB = 49152
PROMPT = [1, 504, 2115, 314, 7211]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    specs = {"base": (0, VOCAB), "unlearned": (1, VOCAB)}
    return tiny_smollm_folders(tmp_path_factory.mktemp("models"), specs)


def _upstream(model: Any, drafts: list[int] | None = None) -> httpx.MockTransport:
    """vLLM's /v1/completions over `model`: the greedy continuation of max_tokens tokens, with
    the top-k logprobs at each position (`token_id:N`); `drafts` records each max_tokens."""

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["temperature"] == 0.0 and body["return_tokens_as_token_ids"] is True
        if drafts is not None:
            drafts.append(body["max_tokens"])
        ids, tokens, tops = list(body["prompt"]), [], []
        for _ in range(body["max_tokens"]):
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,)
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(lp, body["logprobs"])
            tops.append(
                {
                    f"token_id:{int(i)}": float(v)
                    for v, i in zip(top.values, top.indices, strict=True)
                }
            )
            ids.append(int(top.indices[0]))
            tokens.append(f"token_id:{ids[-1]}")
        logprobs = {"tokens": tokens, "top_logprobs": tops}
        return httpx.Response(200, json={"choices": [{"logprobs": logprobs}]})

    return httpx.MockTransport(handle)


async def _answer(
    decoder: UpstreamDeltaDecoder,
    spec: DeltaSpec,
    big: Any,
    drafts: list[int] | None = None,
    **sampling: Any,
) -> tuple[list[int], str, str | None]:
    """Token ids, text and finish reason of one choice (`drafts`: each call's max_tokens)."""
    transport = _upstream(big, drafts)
    client = httpx.AsyncClient(base_url="http://upstream/v1/", transport=transport)
    request = GenerationRequest(
        "r1", TokenPrompt(PROMPT), SamplingOptions(**sampling), offsets=(spec,)
    )
    ids: list[int] = []
    text, finish = "", None
    async for chunk in decoder.generate(client, "m", request, 2048):
        ids += chunk.choices[0].token_ids
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return ids, text, finish


async def _run(
    decoder: UpstreamDeltaDecoder,
    spec: DeltaSpec,
    big: Any,
    drafts: list[int] | None = None,
    **sampling: Any,
) -> list[int]:
    """Token ids of one choice."""
    return (await _answer(decoder, spec, big, drafts, **sampling))[0]


def _greedy(model: Any, steps: int, score: Any = None) -> list[int]:
    ids = list(PROMPT)
    for _ in range(steps):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        ids.append(int((logits if score is None else score(ids, logits)).argmax()))
    return ids[len(PROMPT) :]


async def test_with_every_candidate_it_equals_the_unlearned_model(folders: dict[str, Path]) -> None:
    """big = small base, α = 1, k = V: big + (unlearned − base) ranks like the unlearned model."""
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    base = tiny_llama(seed=0, vocab_size=VOCAB)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=VOCAB)
    got = await _run(decoder, spec, base, max_tokens=6, temperature=0.0)
    assert got == _greedy(tiny_llama(seed=1, vocab_size=VOCAB), 6)
    assert got != _greedy(base, 6)  # the premise: the offset changed the answer


def _restricted(pair: OffsetPair, alpha: float, k: int) -> Any:
    """big + α·offset over big's top k (the rest -inf): the scores a call per token ranks."""

    def score(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits, dim=-1)
        keep = torch.topk(lp, k).indices
        scores = torch.full_like(lp, float("-inf"))
        scores[keep] = lp[keep] + alpha * pair.full_offsets(ids)[-1][keep]
        return scores

    return score


@pytest.mark.parametrize("draft_tokens", [1, 8])
async def test_top_k_restricts_the_candidates(folders: dict[str, Path], draft_tokens: int) -> None:
    """Greedy: drafted or not, the tokens are those of one call per token over the top k."""
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 2.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    pair = OffsetPair.from_folders(spec.unlearned, spec.base)
    want = _greedy(big, 12, _restricted(pair, 2.0, 5))
    assert want != _greedy(big, 12)  # the premise: the offset replaces some drafted tokens
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=draft_tokens)
    drafts: list[int] = []
    assert await _run(decoder, spec, big, drafts, max_tokens=12, temperature=0.0) == want
    if draft_tokens == 1:
        assert set(drafts) == {1}
    else:
        assert max(drafts) > 1


class _EveryOtherPosition:
    """Stands in for OffsetModels: after prefixes of even length the offset lifts big's second
    candidate over its first, after odd ones it is zero, so drafts stand at some positions and
    are replaced at others, and an offset read at the wrong position shows in the tokens."""

    def __init__(self, big: Any) -> None:
        self.big = big

    def pair(self, spec: DeltaSpec) -> _EveryOtherPosition:
        return self

    def release(self, key: str) -> None:
        pass

    def offsets_along(self, key: str, tokens: list[int], n: int) -> torch.Tensor:
        rows = torch.zeros(n, VOCAB)
        for j in range(n):
            prefix = tokens[: len(tokens) - n + 1 + j]
            if len(prefix) % 2 == 0:
                with torch.inference_mode():
                    logits = self.big(input_ids=torch.tensor([prefix])).logits[0, -1]
                first, second = torch.topk(logits.float(), 2).indices.tolist()
                rows[j, second] = 50.0
        return rows


async def test_each_draft_position_is_read_with_its_own_offset(folders: dict[str, Path]) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    ids = list(PROMPT)
    for _ in range(10):
        with torch.inference_mode():
            logits = big(input_ids=torch.tensor([ids])).logits[0, -1].float()
        ids.append(int(torch.topk(logits, 2).indices[1 if len(ids) % 2 == 0 else 0]))
    want = ids[len(PROMPT) :]
    decoder = UpstreamDeltaDecoder(_EveryOtherPosition(big), top_k=5, draft_tokens=8)  # type: ignore[arg-type]
    drafts: list[int] = []
    assert await _run(decoder, spec, big, drafts, max_tokens=10, temperature=0.0) == want
    assert max(drafts) >= 2  # positions after the first of a draft were read


class _SlowPair:
    """Zero offsets after a pause, counting the threads inside it at once and releases made
    while one is inside."""

    def __init__(self) -> None:
        self.inside = 0
        self.most_inside = 0
        self.released_while_busy = 0
        self.entered = threading.Event()
        self._count = threading.Lock()

    def pair(self, spec: DeltaSpec) -> _SlowPair:
        return self

    def release(self, key: str) -> None:
        self.released_while_busy += self.inside

    def offsets_along(self, key: str, tokens: list[int], n: int) -> torch.Tensor:
        with self._count:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.entered.set()
        time.sleep(1.5)
        with self._count:
            self.inside -= 1
        return torch.zeros(n, VOCAB)


async def test_a_cancelled_request_holds_the_small_models_until_its_step_ends(
    folders: dict[str, Path],
) -> None:
    """A client gone mid-step: its thread cannot be stopped, so the next request's step and the
    cancelled one's release wait for it (two steps on the same caches at once would race)."""
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    models = _SlowPair()
    decoder = UpstreamDeltaDecoder(models, top_k=5, draft_tokens=2)  # type: ignore[arg-type]
    first = asyncio.ensure_future(_run(decoder, spec, big, max_tokens=4, temperature=0.0))
    await asyncio.to_thread(models.entered.wait, 10)
    first.cancel()
    second = await _run(decoder, spec, big, max_tokens=4, temperature=0.0)
    assert first.cancelled() and len(second) == 4
    assert models.most_inside == 1
    assert models.released_while_busy == 0


async def test_a_draft_the_offset_leaves_alone_costs_one_call_per_draft(
    folders: dict[str, Path],
) -> None:
    """unlearned = base (no offset): every drafted token stands; drafts grow 2, 4, 8, 8 ..."""
    spec = DeltaSpec(str(folders["base"]), str(folders["base"]), 1.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    drafted = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=8)
    drafts: list[int] = []
    got = await _run(drafted, spec, big, drafts, max_tokens=20, temperature=0.0)
    assert got == _greedy(big, 20)
    assert drafts == [2, 4, 8, 6] and drafted.calls == 4
    one_by_one = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=1)
    assert await _run(one_by_one, spec, big, max_tokens=20, temperature=0.0) == got
    assert one_by_one.calls == 20


async def test_a_sampled_token_read_from_a_draft_follows_the_reranked_distribution(
    folders: dict[str, Path],
) -> None:
    """Speculative sampling with a greedy draft: the first token (read from a 2-token draft) is
    distributed as softmax(big + α·offset) over the top k, not as the draft says."""
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 2.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    pair = OffsetPair.from_folders(spec.unlearned, spec.base)
    with torch.inference_mode():
        logits = big(input_ids=torch.tensor([PROMPT])).logits[0, -1].float()
    scores = _restricted(pair, 2.0, 5)(list(PROMPT), logits)
    p = torch.softmax(scores, dim=-1)  # (V,), zero outside the top 5
    drafted = int(logits.argmax())
    assert 0.1 < float(p[drafted]) < 0.7  # the premise: the draft token is neither sure nor out
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=2)
    runs = 600
    counts: dict[int, int] = {}
    for seed in range(runs):
        first = (await _run(decoder, spec, big, max_tokens=2, temperature=1.0, seed=seed))[0]
        counts[first] = counts.get(first, 0) + 1
    # The drafted token stands with probability p(x) and is never drawn again when replaced:
    # drawing the replacement from all of p would make it p + (1 - p)·p (0.31 where p is 0.17).
    assert abs(counts.get(drafted, 0) / runs - float(p[drafted])) < 0.06, counts
    tv = 0.5 * sum(abs(counts.get(t, 0) / runs - float(p[t])) for t in set(counts) | set(
        torch.nonzero(p).flatten().tolist()
    ))  # fmt: skip
    assert tv < 0.08, (tv, counts, {t: float(p[t]) for t in counts})


@pytest.mark.parametrize(
    "logprobs",
    [
        {"top_logprobs": [{"token_id:5": -0.1}]},  # no tokens
        {"tokens": ["token_id:5"], "top_logprobs": [None]},
        {"tokens": [5], "top_logprobs": [{"token_id:5": -0.1}]},  # ids not as token_id:N
        {"tokens": ["token_id:5"], "top_logprobs": []},
        {"tokens": ["token_id:5"] * 3, "top_logprobs": [{"token_id:5": -0.1}] * 3},  # > asked
        {"tokens": [], "top_logprobs": []},
    ],
)
async def test_an_unreadable_upstream_answer_is_an_engine_error(
    folders: dict[str, Path], logprobs: dict[str, Any]
) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    transport = httpx.MockTransport(
        lambda _: httpx.Response(200, json={"choices": [{"logprobs": logprobs}]})
    )
    client = httpx.AsyncClient(base_url="http://upstream/v1/", transport=transport)
    request = GenerationRequest(
        "r1", TokenPrompt(PROMPT), SamplingOptions(max_tokens=4), offsets=(spec,)
    )
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=2)
    with pytest.raises(EngineError, match="upstream"):
        async for _ in decoder.generate(client, "m", request, 2048):
            pass


EOS = 2
"""SmolLM2's end of text (<|im_end|>), the tiny models' tokenizer's."""


class _EndsEarly(_EveryOtherPosition):
    """An offset that makes EOS the re-ranked choice wherever it is among the candidates, and
    lifts it into them (its logprob from big is -inf otherwise: the mock sends only the top k)."""

    def offsets_along(self, key: str, tokens: list[int], n: int) -> torch.Tensor:
        rows = torch.zeros(n, VOCAB)
        rows[:, EOS] = 100.0
        return rows


def _with_eos(big: Any) -> Any:
    """big, with EOS always among its top 5 (a bias on its logit)."""

    class Wrapped(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> Any:
            out = big(input_ids=input_ids)
            out.logits[..., EOS] = out.logits.max() + 1.0
            return out

    return Wrapped()


async def test_min_tokens_stop_token_ids_and_ignore_eos_are_applied(
    folders: dict[str, Path],
) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    ends = UpstreamDeltaDecoder(_EndsEarly(big), top_k=5, draft_tokens=4)  # type: ignore[arg-type]
    eager = _with_eos(big)
    # the premise: EOS ends the answer at once
    ids, text, finish = await _answer(ends, spec, eager, max_tokens=10, temperature=0.0)
    assert ids == [EOS] and finish == "stop" and text == ""
    # min_tokens: no EOS before 5 tokens, then it ends
    ids, _, finish = await _answer(ends, spec, eager, max_tokens=10, min_tokens=5, temperature=0.0)
    assert len(ids) == 6 and EOS not in ids[:5] and ids[5] == EOS and finish == "stop"
    # ignore_eos: EOS does not end it
    ids, _, finish = await _answer(
        ends, spec, eager, max_tokens=4, ignore_eos=True, temperature=0.0
    )
    assert ids == [EOS] * 4 and finish == "length"
    # skip_special_tokens=False: the special tokens' text is kept
    _, text, _ = await _answer(
        ends, spec, eager, max_tokens=2, ignore_eos=True, skip_special_tokens=False
    )
    assert text == "<|im_end|>" * 2
    # stop_token_ids: the third token of the plain answer ends it, its text left out
    plain = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=4)
    same = DeltaSpec(str(folders["base"]), str(folders["base"]), 1.0)
    full, full_text, _ = await _answer(plain, same, big, max_tokens=6, temperature=0.0)
    stop_at = full[2]
    assert stop_at not in full[:2]  # the premise
    ids, text, finish = await _answer(
        plain, same, big, max_tokens=6, stop_token_ids=(stop_at,), temperature=0.0
    )
    assert ids == full[:3] and finish == "stop"
    assert full_text.startswith(text) and len(text) < len(full_text)


async def test_min_p_keeps_only_the_likely_candidates(folders: dict[str, Path]) -> None:
    """min_p = 0.999 leaves the re-ranked argmax alone: sampling gives the greedy answer."""
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 2.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=4)
    greedy = tuple(await _run(decoder, spec, big, max_tokens=6, temperature=0.0))

    async def sampled(**extra: Any) -> set[tuple[int, ...]]:
        return {
            tuple(await _run(decoder, spec, big, max_tokens=6, temperature=1.0, seed=i, **extra))
            for i in range(8)
        }

    assert await sampled() != {greedy}  # the premise: sampling alone strays from the argmax
    assert await sampled(min_p=0.999) == {greedy}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", 1),
        ("prompt_logprobs", 1),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("repetition_penalty", 1.2),
        ("logit_bias", {5: 3.0}),
        ("bad_words", ("Hedwig",)),
        ("allowed_token_ids", (5, 6)),
        ("structured", {"json": {"type": "object"}}),
        ("include_stop_str_in_output", True),
    ],
)
async def test_fields_the_reranking_cannot_honour_are_refused_by_name(
    folders: dict[str, Path], field: str, value: Any
) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5)
    with pytest.raises(InvalidRequestError) as refused:
        await _run(
            decoder, spec, tiny_llama(seed=0, vocab_size=VOCAB), max_tokens=2, **{field: value}
        )
    param = "response_format" if field == "structured" else field
    assert refused.value.param == param


async def test_logprobs_are_refused_with_a_clear_error(folders: dict[str, Path]) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        await _run(decoder, spec, tiny_llama(seed=0, vocab_size=VOCAB), max_tokens=2, logprobs=1)


def _saying(big: Any, script: list[int]) -> Any:
    """big, made to say `script` after PROMPT (its next token's logit lifted far above the rest),
    then EOS."""

    class Wrapped(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> Any:
            out = big(input_ids=input_ids)
            said = input_ids.shape[-1] - len(PROMPT)
            out.logits[..., -1, script[said] if said < len(script) else EOS] = 1000.0
            return out

    return Wrapped()


@pytest.mark.parametrize("draft_tokens", [1, 8])
async def test_characters_split_over_tokens_reach_the_stream_whole(
    folders: dict[str, Path], draft_tokens: int
) -> None:
    """An emoji and a CJK character take several byte-level tokens each: the streamed pieces add
    up to the whole text, not to replacement characters with the completed ones left out."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["base"])
    said = "Hi 😀 café 日本"
    script = tokenizer(said, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in tokenizer.decode(script[:2])  # the premise: the emoji is split
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=draft_tokens)
    big = _saying(tiny_llama(seed=3, vocab_size=VOCAB), script)
    ids, text, finish = await _answer(decoder, spec, big, max_tokens=20, temperature=0.0)
    assert ids == [*script, EOS] and finish == "stop"
    assert text == said
    # cut by the budget inside the emoji: the last piece is sent as it decodes
    ids, text, finish = await _answer(decoder, spec, big, max_tokens=2, temperature=0.0)
    assert finish == "length" and text == tokenizer.decode(script[:2])


async def test_no_piece_of_a_stop_string_is_sent_before_the_answer_is_cut_at_it(
    folders: dict[str, Path],
) -> None:
    """The stop "é 日" spans two tokens (" café", " 日"): the stream holds the last
    len(stop) - 1 characters back, as vLLM does, so the pieces add up to the text cut before
    the stop."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["base"])
    script = tokenizer("Hi 😀 café 日本", add_special_tokens=False)["input_ids"]
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5, draft_tokens=4)
    big = _saying(tiny_llama(seed=3, vocab_size=VOCAB), script)
    _, text, finish = await _answer(
        decoder, spec, big, max_tokens=20, temperature=0.0, stop=("é 日",)
    )
    assert finish == "stop" and text == "Hi 😀 caf"
    # Two stops in one token's text (" café"): the one it completes earliest wins, as in vLLM,
    # not the first listed.
    _, text, finish = await _answer(
        decoder, spec, big, max_tokens=20, temperature=0.0, stop=("fé", "ca")
    )
    assert finish == "stop" and text == "Hi 😀 "
