"""δ mode through a black-box upstream: top-k candidates re-ranked by the small models' offset.

The "upstream" is a real (tiny) model behind httpx's MockTransport, answering /v1/completions
with max_tokens=1 and top-k logprobs the way vLLM's server does (`token_id:N` keys).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from offset import DeltaSpec, OffsetModels, OffsetPair
from server.engine import GenerationRequest, SamplingOptions, TokenPrompt
from server.engine.upstream_delta import UpstreamDeltaDecoder
from server.errors import InvalidRequestError
from tests.offset.conftest import tiny_llama, tiny_smollm_folders

VOCAB = 49152
PROMPT = [1, 504, 2115, 314, 7211]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    specs = {"base": (0, VOCAB), "unlearned": (1, VOCAB)}
    return tiny_smollm_folders(tmp_path_factory.mktemp("models"), specs)


def _upstream(model: Any, k_seen: list[int]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["max_tokens"] == 1 and body["return_tokens_as_token_ids"] is True
        k_seen.append(body["logprobs"])
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([body["prompt"]])).logits[0, -1]  # (V,)
        lp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(lp, body["logprobs"])
        entries = {
            f"token_id:{int(i)}": float(v) for v, i in zip(top.values, top.indices, strict=True)
        }
        return httpx.Response(200, json={"choices": [{"logprobs": {"top_logprobs": [entries]}}]})

    return httpx.MockTransport(handle)


async def _run(
    decoder: UpstreamDeltaDecoder, spec: DeltaSpec, big: Any, **sampling: Any
) -> list[int]:
    seen: list[int] = []
    client = httpx.AsyncClient(base_url="http://upstream/v1/", transport=_upstream(big, seen))
    request = GenerationRequest(
        "r1", TokenPrompt(PROMPT), SamplingOptions(**sampling), offsets=(spec,)
    )
    ids: list[int] = []
    async for chunk in decoder.generate(client, "m", request, 2048):
        ids += chunk.choices[0].token_ids
    return ids


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


async def test_top_k_restricts_the_candidates(folders: dict[str, Path]) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 2.0)
    big = tiny_llama(seed=3, vocab_size=VOCAB)
    pair = OffsetPair.from_folders(spec.unlearned, spec.base)

    def restricted(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits, dim=-1)
        keep = torch.topk(lp, 5).indices
        scores = torch.full_like(lp, float("-inf"))
        scores[keep] = lp[keep] + 2.0 * pair.full_offsets(ids)[-1][keep]
        return scores

    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5)
    assert await _run(decoder, spec, big, max_tokens=5, temperature=0.0) == _greedy(
        big, 5, restricted
    )


async def test_logprobs_are_refused_with_a_clear_error(folders: dict[str, Path]) -> None:
    spec = DeltaSpec(str(folders["unlearned"]), str(folders["base"]), 1.0)
    decoder = UpstreamDeltaDecoder(OffsetModels(), top_k=5)
    with pytest.raises(InvalidRequestError, match="logprobs"):
        await _run(decoder, spec, tiny_llama(seed=0, vocab_size=VOCAB), max_tokens=2, logprobs=1)
