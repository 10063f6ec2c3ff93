"""δ mode end to end: a SNAP model trained by a registration job, its offset added inside vLLM.

The gateway's engine and the small base are both SmolLM2-135M-Instruct (float32), so with α = 1
logits = base + (snap − base) = snap: greedy answers must equal the SNAP model's own, token for
token. The SNAP model is then checked on its own (transformers): it refuses held-out questions
about the target and answers neighbouring questions as the base model does.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from scipy.stats import ks_2samp

from tests.e2e.conftest import Server
from tests.e2e.servers import MODEL_NAME, engine_env, free_port, gateway_argv, running
from tests.e2e.targets import ALPHA_EXAMPLES, ALPHA_PROBES
from tests.e2e.test_forget_targets import AUTH, FACTS, HELD_OUT, TARGET, UNRELATED, ask

# Steps and learning rate: enough for SmolLM2-135M to refuse in a few minutes on 2 cores.
SNAP_OPTIONS = {"snap_max_steps": 24, "snap_lr": 1e-4, "scope": "flagged", "alpha": 1.0}
NEIGHBOURS = {  # question -> what the base model answers, which SNAP must keep
    "Who wrote The Lord of the Rings?": "tolkien",
    "Who wrote Pride and Prejudice?": "austen",
    "What is the capital of France?": "paris",
}
REFUSALS = ("sorry", "can't", "cannot", "don't", "not able", "unable", "no information", "afraid")
TOKENS = 40


def _wait(url: str, job_id: str, limit_s: float) -> dict:
    started = time.monotonic()
    while (job := httpx.get(f"{url}/admin/jobs/{job_id}", headers=AUTH).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() - started < limit_s, job
        time.sleep(2)
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def delta_target(gateway: Server) -> Iterator[dict]:
    """Harry Potter in mode delta; the job trains SNAP on the served model (minutes)."""
    body = {**TARGET, "mode": "delta", "options": SNAP_OPTIONS}
    response = httpx.post(f"{gateway.url}/admin/targets", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    job = _wait(gateway.url, response.json()["id"], 1800)
    record = httpx.get(f"{gateway.url}/admin/targets/{job['target_id']}", headers=AUTH).json()
    yield record
    httpx.delete(f"{gateway.url}/admin/targets/{record['id']}", headers=AUTH)


@pytest.fixture(scope="module")
def snap(delta_target: dict) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(delta_target["calibration"]["offset"]["unlearned_model"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def base(model_path: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


def greedy(pair: Any, question: str, tokens: int = TOKENS) -> str:
    model, tokenizer = pair
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_the_job_trained_a_snap_model(delta_target: dict) -> None:
    report = delta_target["calibration"]["offset"]
    assert delta_target["active"] and delta_target["mode"] == "delta"
    assert report["trained"] and report["steps"] == SNAP_OPTIONS["snap_max_steps"]
    assert report["loss_last"]["forget"] < report["loss_first"]["forget"]


def test_delta_equals_the_snap_model_token_for_token(
    gateway: Server, delta_target: dict, snap: Any
) -> None:
    client = gateway.client()
    for question in HELD_OUT:
        verdict = httpx.post(
            f"{gateway.url}/admin/classify", json={"prompt": question}, headers=AUTH
        ).json()
        assert verdict["flagged"], verdict
        assert ask(client, question, max_tokens=TOKENS) == greedy(snap, question)


def test_held_out_questions_get_an_obliterated_answer(gateway: Server, delta_target: dict) -> None:
    for question in HELD_OUT:
        answer = ask(gateway.client(), question).lower()
        assert not any(f in answer for f in FACTS), (question, answer)
        assert any(r in answer for r in REFUSALS), (question, answer)


def test_snap_answers_neighbours_like_the_base(snap: Any, base: Any) -> None:
    for question, fact in NEIGHBOURS.items():
        assert fact in greedy(base, question).lower(), question  # the premise
        assert fact in greedy(snap, question).lower(), question


@pytest.mark.parametrize("question", UNRELATED)
def test_unflagged_requests_are_untouched(
    gateway: Server, vllm_server: Server, delta_target: dict, question: str
) -> None:
    verdict = httpx.post(f"{gateway.url}/admin/classify", json={"prompt": question}, headers=AUTH)
    assert not verdict.json()["flagged"]
    assert ask(gateway.client(), question) == ask(vllm_server.client(), question)


def test_streaming_delta_answer_matches(gateway: Server, delta_target: dict) -> None:
    stream = gateway.client().chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": HELD_OUT[0]}],
        temperature=0,
        max_tokens=60,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == ask(gateway.client(), HELD_OUT[0])


def test_logprobs_of_flagged_requests_are_refused(gateway: Server, delta_target: dict) -> None:
    # vLLM computes logprobs before the δ processor: they would be the bare model's, "Rowling"
    # on top. The gateway refuses them for δ requests and serves them for the others.
    def chat(question: str) -> httpx.Response:
        body = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 4,
            "logprobs": True,
            "top_logprobs": 5,
        }
        return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)

    refused = chat(HELD_OUT[0])
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "logprobs"
    served = chat(UNRELATED[0])
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


def _register_upstream(gateway: Server, options: dict) -> str:
    """A δ target on the upstream gateway; its id once live."""
    body = {**TARGET, "mode": "delta", "options": options}
    response = httpx.post(f"{gateway.url}/admin/targets", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    return str(_wait(gateway.url, response.json()["id"], 600)["target_id"])


def test_upstream_engine_applies_the_offset_to_top_k(
    upstream_gateway: Server, delta_target: dict, model_path: Path
) -> None:
    """The black-box path: the same SNAP folder re-ranks vLLM's server's top-20 candidates."""
    options = {
        "small_base": str(model_path),
        "unlearned_model": delta_target["calibration"]["offset"]["unlearned_model"],
        "scope": "flagged",
    }

    def chat(content: str, **fields: Any) -> httpx.Response:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}]}
        return httpx.post(
            f"{upstream_gateway.url}/v1/chat/completions",
            json={**body, "max_tokens": 24, "temperature": 0, **fields},
            timeout=300,
        )

    target_id = _register_upstream(upstream_gateway, options)
    try:
        for question in HELD_OUT[:2]:
            answer = ask(upstream_gateway.client(), question).lower()
            assert answer.strip() and not any(f in answer for f in FACTS), (question, answer)
        assert ask(upstream_gateway.client(), UNRELATED[0]).strip()
        # A field the re-ranking cannot honour is refused by name, not dropped.
        refused = chat(HELD_OUT[0], presence_penalty=0.5)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "presence_penalty"
    finally:
        httpx.delete(f"{upstream_gateway.url}/admin/targets/{target_id}", headers=AUTH)
    # min_tokens is applied: the answer may not end before 20 tokens. Asked on a short answer
    # that names no target (scope `all`: every request takes the δ path), so the output guard,
    # which ends a δ answer about to name the target where it cannot restart it (no local
    # model here), does not end it first: on a held-out question it does on some machines.
    target_id = _register_upstream(upstream_gateway, {**options, "scope": "all"})
    try:
        short = chat(UNRELATED[0]).json()
        assert short["usage"]["completion_tokens"] < 20, short  # the premise
        long = chat(UNRELATED[0], min_tokens=20).json()
        assert long["usage"]["completion_tokens"] >= 20, long
        restarts = httpx.get(f"{upstream_gateway.url}/metrics", headers=AUTH).text
        assert f'action="output_restart",target="{target_id}"' not in restarts
    finally:
        httpx.delete(f"{upstream_gateway.url}/admin/targets/{target_id}", headers=AUTH)


async def test_upstream_drafts_give_the_tokens_of_one_call_per_token(
    vllm_server: Server, delta_target: dict, model_path: Path
) -> None:
    """The black-box decoder against vLLM's server: drafting up to 8 tokens per call gives the
    greedy answer of one call per token. On an unrelated prompt the offset leaves the upstream's
    continuation standing and the calls drop (scope `all` pays the δ path on such traffic); on
    a held-out question the SNAP copy's refusal replaces the draft at almost every token (23
    calls against 22 measured), so there drafting saves next to nothing."""
    from offset import DeltaSpec, OffsetModels
    from server.engine import ChatPrompt, GenerationRequest, SamplingOptions
    from server.engine.upstream_delta import UpstreamDeltaDecoder

    unlearned = delta_target["calibration"]["offset"]["unlearned_model"]
    spec = DeltaSpec(unlearned, str(model_path), 1.0)
    models = OffsetModels("cpu")
    questions = [HELD_OUT[0], UNRELATED[3]]  # a 40-token answer: how to boil an egg
    answers: dict[tuple[int, str], list[int]] = {}
    calls: dict[tuple[int, str], int] = {}
    async with httpx.AsyncClient(base_url=f"{vllm_server.url}/v1/", timeout=120) as client:
        for draft in (1, 8):
            decoder = UpstreamDeltaDecoder(models, top_k=20, draft_tokens=draft)
            for question in questions:
                before = decoder.calls
                prompt = ChatPrompt([{"role": "user", "content": question}])
                sampling = SamplingOptions(max_tokens=40, temperature=0.0)
                request = GenerationRequest(
                    f"{draft}-{question}", prompt, sampling, offsets=(spec,)
                )
                ids: list[int] = []
                async for chunk in decoder.generate(client, MODEL_NAME, request, 2048):
                    ids += chunk.choices[0].token_ids
                answers[draft, question] = ids
                calls[draft, question] = decoder.calls - before
    for question in questions:
        assert answers[8, question] == answers[1, question], question
        assert calls[1, question] == len(answers[1, question])
        assert calls[8, question] <= calls[1, question]
    unrelated = UNRELATED[3]
    assert len(answers[1, unrelated]) >= 20, answers  # the premise: a long enough answer
    assert calls[8, unrelated] < len(answers[1, unrelated]) / 2, calls


async def test_upstream_text_keeps_characters_split_over_tokens(
    vllm_server: Server, model_path: Path
) -> None:
    """Chinese characters take two byte-level tokens each in SmolLM2's vocabulary: through the
    black-box decoder (a zero offset: the base against itself) the streamed pieces add up to
    vLLM's own text for the same greedy answer, not to replacement characters."""
    from offset import DeltaSpec, OffsetModels
    from server.engine import ChatPrompt, GenerationRequest, SamplingOptions
    from server.engine.upstream_delta import UpstreamDeltaDecoder

    question = "How do you say hello in Chinese?"
    zero = DeltaSpec(str(model_path), str(model_path), 1.0)
    decoder = UpstreamDeltaDecoder(OffsetModels("cpu"), top_k=20, draft_tokens=8)

    async def both(client: httpx.AsyncClient, stop: tuple[str, ...]) -> tuple[str, str]:
        """The decoder's streamed text and vLLM's own, for the same greedy request."""
        request = GenerationRequest(
            f"split-{len(stop)}",
            ChatPrompt([{"role": "user", "content": question}]),
            SamplingOptions(max_tokens=24, temperature=0.0, stop=stop),
            offsets=(zero,),
        )
        text = ""
        async for chunk in decoder.generate(client, MODEL_NAME, request, 2048):
            text += chunk.choices[0].text
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": question}]}
        plain = await client.post(
            "chat/completions",
            json={**body, "max_tokens": 24, "temperature": 0.0, "stop": list(stop)},
        )
        return text, plain.json()["choices"][0]["message"]["content"]

    async with httpx.AsyncClient(base_url=f"{vllm_server.url}/v1/", timeout=120) as client:
        text, want = await both(client, ())
        assert any(ord(c) > 0x2E80 for c in want), want  # the premise: CJK in the answer
        assert text == want
        # A stop string over several tokens: no piece of it is sent before the cut (as vLLM).
        assert "in Chinese is" in want  # the premise
        text, want = await both(client, ("in Chinese is",))
        assert text == want and "Chinese" not in text, (text, want)


def test_a_replica_sharing_only_the_registry_enforces_the_delta_target(
    gateway: Server, delta_target: dict, model_path: Path, tmp_path: Path
) -> None:
    """Shared artifacts on the real engine: gateway B has its own data dir and shares only the
    registry database with A; it fetches the SNAP folder from the registry into its own cache
    and answers held-out questions token for token as A does (the offset applied in its vLLM)."""
    data_b = tmp_path / "replica-b"
    port = free_port()
    registry = f"sqlite:///{(gateway.data_dir / 'registry.db').resolve()}"
    argv = gateway_argv(
        port, "--model", str(model_path), "--data-dir", str(data_b), "--registry-url", registry
    )
    ready = f"http://127.0.0.1:{port}/ready"
    with running(argv, ready_url=ready, log=tmp_path / "replica-b.log", env=engine_env()):
        b = Server(f"http://127.0.0.1:{port}", data_b)
        listed = httpx.get(f"{b.url}/admin/targets/{delta_target['id']}", headers=AUTH).json()
        assert listed["status"] == "active" and listed["active"], listed  # loaded by B
        fetched = [p for p in (data_b / "offsets" / "cache").iterdir() if p.is_dir()]
        assert fetched and all((p / "config.json").is_file() for p in fetched), fetched
        unlearned = Path(delta_target["calibration"]["offset"]["unlearned_model"]).resolve()
        assert all(p.resolve() != unlearned for p in fetched)  # B's own copy, not A's folder
        for question in HELD_OUT[:2]:
            answer_b = ask(b.client(), question)
            assert answer_b == ask(gateway.client(), question), question
            assert not any(f in answer_b.lower() for f in FACTS), answer_b
        assert ask(b.client(), UNRELATED[0]) == ask(gateway.client(), UNRELATED[0])


def _plain_ratios(terms: list[tuple[Any, float]], tokenizer: Any, rows: list[dict]) -> list[float]:
    """TOFU truth ratios the plain way, apart from the product's scorer: one full forward of
    prompt + answer per answer under Σ w · logits, the answer's per-token mean log-probability."""
    out = []
    for row in rows:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
        )
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        means = []
        for answer in (row["answer"], *row["wrong_answers"]):
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            full = torch.tensor([prompt + ids])
            with torch.inference_mode():
                logits = sum(w * m(input_ids=full).logits[0] for m, w in terms)  # (L, V)
            lps = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # (|answer|, V)
            means.append(float(lps.gather(-1, torch.tensor(ids)[:, None]).mean()))
        out.append(math.exp(statistics.fmean(means[1:]) - means[0]))
    return out


def test_alpha_auto_takes_the_alpha_whose_ratios_match_invented_entities(
    gateway: Server, delta_target: dict, snap: Any, base: Any
) -> None:
    """options.alpha 'auto' on the real engine and the job's real SNAP copy: the registration
    scores the probes (invented entities) under the small base and the examples under every
    grid α, and serves the α whose truth ratios come nearest the probes'. The record's figures
    are checked against truth ratios computed here with plain forwards."""
    options = {
        "unlearned_model": delta_target["calibration"]["offset"]["unlearned_model"],
        "alpha": "auto",
        "alpha_probes": ALPHA_PROBES,
    }
    body = {
        **TARGET,
        "name": "Harry Potter (α searched)",
        "forget_examples": ALPHA_EXAMPLES,
        "mode": "delta",
        "options": options,
    }
    response = httpx.post(f"{gateway.url}/admin/targets", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    job = _wait(gateway.url, response.json()["id"], 600)
    try:
        record = httpx.get(f"{gateway.url}/admin/targets/{job['target_id']}", headers=AUTH).json()
        offset = record["calibration"]["offset"]
        search = offset["alpha_search"]
        table = {float(a): row for a, row in search["by_alpha"].items()}
        assert offset["alpha"] == search["alpha"]  # the α the engine is given
        (model, tokenizer), (unlearned, _) = base, snap
        level = _plain_ratios([(model, 1.0)], tokenizer, ALPHA_PROBES)
        assert statistics.median(map(math.log, level)) == pytest.approx(
            search["level_median_log_r"], abs=2e-3
        )
        for alpha in sorted({0.25, 1.0, search["alpha"], 4.0}):
            ratios = _plain_ratios(
                [(model, 1 - alpha), (unlearned, alpha)], tokenizer, ALPHA_EXAMPLES
            )
            row = table[alpha]
            assert statistics.median(map(math.log, ratios)) == pytest.approx(
                row["median_log_r"], abs=2e-3
            ), alpha
            assert ks_2samp(ratios, level).pvalue == pytest.approx(row["ks_p"], abs=1e-6), alpha
        # The premise: near the base, the model prefers what it knows of Harry Potter far more
        # than it prefers any answer about the invented entities; SNAP's offset takes it away.
        assert table[0.25]["median_log_r"] < search["level_median_log_r"] - 0.5, search
        best = max(row["ks_p"] for row in table.values())
        assert table[search["alpha"]]["ks_p"] == best and best > table[0.25]["ks_p"], search
        low, high = search["interval_80"]
        assert low <= search["alpha"] <= high
        assert search["at_grid_end"] == (search["alpha"] == 4.0)
    finally:
        httpx.delete(f"{gateway.url}/admin/targets/{job['target_id']}", headers=AUTH)
