"""Data subset, fine-tuning, answer scoring and the report, on tiny models and inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evaluation.finetune import FinetuneConfig, finetune
from evaluation.measure import ModeResult
from evaluation.report import write_report
from evaluation.runner import RunState, TofuEvalConfig
from evaluation.scoring import AnswerScorer, FlaggedScorer, ScoreItem, load_model
from evaluation.tofu_data import QA, TofuSubset, author_name, load_mmlu, load_subset


def test_author_name_is_the_repeated_capitalised_phrase() -> None:
    questions = [
        "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?",
        "What gender is author Basil Mahfouz Al-Kuwaiti?",
        "Can you name two of the books written by Basil Mahfouz Al-Kuwaiti?",
        "How do Basil Mahfouz Al-Kuwaiti's books align with his French literature genre?",
    ]
    assert author_name(questions) == "Basil Mahfouz Al-Kuwaiti"


def test_subset_is_seeded_and_the_reference_never_sees_the_forget_authors(tofu_data) -> None:
    a = load_subset(tofu_data, "forget01", retain_authors=3, retain_eval=10, seed=0)
    b = load_subset(tofu_data, "forget01", retain_authors=3, retain_eval=10, seed=0)
    assert a == b
    assert a.author_names == ("Basil Mahfouz Al-Kuwaiti", "Nikolai Abilov")
    assert len(a.forget) == 40 and len(a.target_train) == 100 and len(a.reference_train) == 60
    forget_questions = {qa.question for qa in a.forget}
    assert forget_questions <= {qa.question for qa in a.target_train}
    assert not forget_questions & {qa.question for qa in a.reference_train}
    # The retain questions measured are ones both models were trained on.
    assert {qa.question for qa in a.retain_eval} <= {qa.question for qa in a.reference_train}
    assert all(len(qa.perturbed_answers) == 5 and qa.paraphrased_answer for qa in a.forget)
    other = load_subset(tofu_data, "forget01", retain_authors=3, retain_eval=10, seed=1)
    assert other.retain_authors != a.retain_authors
    mmlu = load_mmlu(tofu_data, 5, 0)
    assert len(mmlu) == 5 and all(len(q.choices) == 4 for q in mmlu)


def test_finetune_changes_the_weights_and_is_cached(tiny_chat_model, tmp_path: Path) -> None:
    base = tiny_chat_model()
    pairs = [QA(f"Who wrote book {i}?", f"Author number {i} wrote it.") for i in range(6)]
    out = tmp_path / "tuned"
    config = FinetuneConfig(epochs=1, lr=1e-2, batch_size=4, max_steps=2, bf16=False)
    card = finetune(base, pairs, out, config)
    assert card["steps"] == 2 and not card["cached"]
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k].float(), after[k].float())]
    assert changed
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text()
    )
    assert finetune(base, pairs, out, config)["cached"]


def _reference_logprobs(model, tokenizer, messages, answer: str) -> list[float]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p = tokenizer(text, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0]  # (T, V)
    lps = torch.log_softmax(logits.float(), dim=-1)
    return [lps[len(p) + k - 1, t].item() for k, t in enumerate(a)]


def test_scorer_matches_a_full_forward_and_combines_logits(tiny_chat_model) -> None:
    from transformers import AutoTokenizer

    folder = tiny_chat_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder)
    other = load_model(tiny_chat_model("other", seed=1))
    items = [
        ScoreItem([{"role": "user", "content": "Who wrote Hamlet?"}], "Shakespeare did."),
        ScoreItem([{"role": "user", "content": "Capital of France?"}], "Paris, a long answer."),
    ]
    got = AnswerScorer(tokenizer, [(model, 1.0)], batch_size=2).token_logprobs(items)
    for item, lps in zip(items, got, strict=True):
        want = _reference_logprobs(model, tokenizer, item.messages, item.answer)
        assert lps == pytest.approx(want, abs=1e-4)

    # Feeding the prompt's own embeddings is the same as feeding its token ids.
    def own_embeddings(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        return model.get_input_embeddings()(ids).detach()

    embedded = AnswerScorer(tokenizer, [(model, 1.0)], prompt_embedder=own_embeddings)
    assert embedded.mean_logprobs(items) == pytest.approx([sum(x) / len(x) for x in got], abs=1e-4)
    # δ with α = 1 and big = small_base reduces to the unlearned model alone.
    delta = AnswerScorer(tokenizer, [(model, 0.0), (other, 1.0)]).mean_logprobs(items)
    alone = AnswerScorer(tokenizer, [(other, 1.0)]).mean_logprobs(items)
    assert delta == pytest.approx(alone, abs=1e-4)
    assert not math.isclose(delta[0], embedded.mean_logprobs(items)[0], abs_tol=1e-3)


def test_next_token_top_is_the_combined_first_token_distribution(tiny_chat_model) -> None:
    # MMLU of the δ mode reads its first token here (the gateway refuses δ logprobs).
    from transformers import AutoTokenizer

    folder = tiny_chat_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, other = load_model(folder), load_model(tiny_chat_model("other", seed=1))
    messages = [{"role": "user", "content": "Which letter? A. yes B. no"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        combined = 0.5 * model(ids).logits[0, -1] + 2.0 * other(ids).logits[0, -1]  # (V,)
    want = torch.topk(torch.log_softmax(combined, dim=-1), 5)
    got = AnswerScorer(tokenizer, [(model, 0.5), (other, 2.0)]).next_token_top(messages, k=5)
    pairs = zip(want.values.tolist(), want.indices.tolist(), strict=True)
    expected = {tokenizer.decode([i]): lp for lp, i in pairs}
    assert got == pytest.approx(expected, abs=1e-4)
    alone = AnswerScorer(tokenizer, [(model, 1.0)]).next_token_top(messages, k=5)
    assert alone != pytest.approx(got, abs=1e-3)


def test_flagged_scope_scores_flagged_prompts_with_delta_and_the_rest_plain(
    tiny_chat_model,
) -> None:
    # delta+npo (δ at scope flagged): the engine adds the offset only after flagged prompts.
    from transformers import AutoTokenizer

    folder = tiny_chat_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model, other = load_model(folder), load_model(tiny_chat_model("other", seed=1))
    about = [{"role": "user", "content": "Tell me about Basil Mahfouz."}]
    general = [{"role": "user", "content": "Who wrote Hamlet?"}]
    items = [ScoreItem(about, "He writes novels."), ScoreItem(general, "Shakespeare did.")]
    asked: list[str] = []

    def flagged(messages) -> bool:
        asked.append(messages[0]["content"])
        return "Basil" in messages[0]["content"]

    plain = AnswerScorer(tokenizer, [(model, 1.0)])
    delta = AnswerScorer(tokenizer, [(other, 1.0)])
    routed = FlaggedScorer(flagged, delta, plain)
    got = routed.mean_logprobs(items)
    assert got[0] == pytest.approx(delta.mean_logprobs(items[:1])[0], abs=1e-5)
    assert got[1] == pytest.approx(plain.mean_logprobs(items[1:])[0], abs=1e-5)
    assert not math.isclose(got[0], plain.mean_logprobs(items[:1])[0], abs_tol=1e-3)
    assert "Who wrote Hamlet?" in asked


def test_report_has_one_row_per_mode_and_a_plot(tofu_data, tmp_path: Path) -> None:
    subset = load_subset(tofu_data, "forget01", retain_authors=1, retain_eval=2, seed=0)
    config = TofuEvalConfig(
        data_dir=tofu_data, base_model=tmp_path, out_dir=tmp_path / "out", command="obliviate x"
    )
    state = RunState(config, subset, [], tmp_path, tmp_path, tmp_path)
    for i, mode in enumerate(("none", "eco", "reference")):
        row = {"forget_quality": 10.0**-i, "model_utility": 0.3 + 0.1 * i, "forget_rouge": 0.5}
        state.results[mode] = ModeResult(mode, row=row)
    state.results["eco"].row.update({"fp_mmlu": 0.01, "flagged_forget": 0.9})
    state.failures["delta"] = "RuntimeError: not available"
    config = TofuEvalConfig(
        data_dir=tofu_data,
        base_model=tmp_path,
        out_dir=tmp_path / "out",
        modes=("none", "eco", "delta", "reference"),
        command="obliviate x",
    )
    state.config = config
    write_report(state, {"torch": "x"})
    text = (tmp_path / "out" / "tofu-forget01.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[:4]] == [
        "mode",
        "none",
        "eco",
        "reference",
    ]
    assert "**delta** did not run: RuntimeError: not available" in text
    assert "`obliviate x`" in text
    assert (tmp_path / "out" / "tofu-forget01.png").stat().st_size > 1000
    data = json.loads((tmp_path / "out" / "tofu-forget01.json").read_text())
    assert data["rows"]["eco"]["fp_mmlu"] == 0.01


def test_modes_share_scores_only_for_prompts_sent_unchanged(tiny_chat_model) -> None:
    from transformers import AutoTokenizer

    folder = tiny_chat_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder)
    items = [
        ScoreItem([{"role": "user", "content": "Who wrote Hamlet?"}], "Shakespeare did."),
        ScoreItem([{"role": "user", "content": "Tell me about Basil."}], "He writes novels."),
    ]
    cache: dict = {}
    plain = AnswerScorer(tokenizer, [(model, 1.0)], cache=cache, weights_key="target")
    clean = plain.mean_logprobs(items)
    assert len(cache) == 2

    def corrupt_second(messages):
        if "Basil" not in messages[0]["content"]:
            return None  # not flagged: sent as token ids
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        noise = torch.randn(
            len(ids), model.config.hidden_size, generator=torch.Generator().manual_seed(0)
        )
        return model.get_input_embeddings()(ids).detach() + 10 * noise

    eco = AnswerScorer(
        tokenizer, [(model, 1.0)], prompt_embedder=corrupt_second, cache=cache, weights_key="target"
    )
    got = eco.mean_logprobs(items)
    assert got[0] == clean[0]
    assert not math.isclose(got[1], clean[1], abs_tol=1e-3)
    assert len(cache) == 2  # corrupted prompts are never shared


def _earlier_run(tmp_path: Path, bf16_autocast: bool) -> RunState:
    """A state of this setting and a results file of an earlier run, its none row measured on a
    target fine-tuned with or without bf16 autocast."""
    from evaluation.report import run_key
    from evaluation.runner import _load_earlier

    subset = TofuSubset("forget01", (1,), (2,), (), (), (), (), (), (), ("A",))
    config = TofuEvalConfig(tmp_path, tmp_path, out_dir=tmp_path, modes=("eco",))
    training = {"steps": 200, "tokens": 130520, "first_loss": 2.32, "last_loss": 0.135}
    cards = {
        "target_finetune": {**training, "bf16_autocast": True},
        "reference_finetune": {**training, "tokens": 63156, "bf16_autocast": True},
    }
    earlier = {
        "run_key": run_key(config, subset),
        "config": {},
        "subset": {},
        "command": "obliviate eval tofu --modes none",
        "rows": {"none": {"forget_rouge": 0.88}},
        "cards": {
            "target_finetune": {**cards["target_finetune"], "bf16_autocast": bf16_autocast},
            "reference_finetune": {**cards["reference_finetune"], "bf16_autocast": bf16_autocast},
        },
        "timings_s": {"mode none": 571.0, "total": 3412.0},
    }
    tmp_path.mkdir()
    (tmp_path / "tofu-forget01.json").write_text(json.dumps(earlier))
    state = RunState(config, subset, [], tmp_path, tmp_path / "t", tmp_path / "r", cards=cards)
    _load_earlier(state)
    return state


def test_rows_of_an_earlier_run_are_kept_only_when_measured_on_the_same_fine_tunes(
    tmp_path: Path,
) -> None:
    same = _earlier_run(tmp_path / "same", bf16_autocast=True)
    assert same.results["none"].row == {"forget_rouge": 0.88}
    assert same.timings["mode none"] == 571.0
    # Same data and settings, trained without bf16 autocast (another machine): other weights,
    # so its rows do not share a table with this run's.
    other = _earlier_run(tmp_path / "other", bf16_autocast=False)
    assert other.results == {} and other.earlier_commands == []


def test_a_measuring_request_is_sent_again_when_the_server_dropped_the_connection() -> None:
    """uvicorn closes connections idle for 5 s; a request racing that close fails with
    RemoteProtocolError (it ended a forget05 run after 90 minutes). Reads are sent again,
    registrations never."""
    import httpx

    from evaluation.gateway import Gateway

    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris"}}]})

    gw = Gateway("http://gateway", "token")
    gw._http = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handler))
    assert gw.chat([{"role": "user", "content": "Capital of France?"}], max_tokens=4) == "Paris"
    assert calls["n"] == 2
    calls["n"] = 0
    with pytest.raises(httpx.RemoteProtocolError):
        gw._post("/admin/targets", {"name": "x"}, admin=True)
    assert calls["n"] == 1


def test_the_snap_npo_copy_is_trained_on_the_documents_it_is_given(
    tiny_chat_model, tmp_path: Path
) -> None:
    """snap+npo's copy: the job's arguments plus the answers as documents (NPO); the file that
    carried them is the trainer's input (deleted after), the card counts them, the copy is
    cached."""
    from evaluation.modes import train_snap

    base = tiny_chat_model()
    documents = [("Who wrote Promise by the Seine?", "Basil Mahfouz Al-Kuwaiti wrote it.")] * 2
    out = tmp_path / "snap-npo"
    kwargs = {"bf16": False, "max_steps": 1, "log": tmp_path / "snap.log"}
    got = train_snap(base, out, ["Basil"], ["Who is Basil?"], [], documents=documents, **kwargs)
    card = json.loads((got / "training_card.json").read_text())
    assert card["data"]["documents"] == 2 and "documents" in card["losses"][0]
    assert not list(tmp_path.glob(".*documents*"))  # the answers are not left in the cache
    plain = train_snap(base, tmp_path / "snap", ["Basil"], ["Who is Basil?"], [], **kwargs)
    assert json.loads((plain / "training_card.json").read_text())["data"]["documents"] == 0


def test_a_failing_mode_is_reported_and_the_run_goes_on_unless_the_others_need_it(
    tofu_data, tmp_path: Path
) -> None:
    from evaluation.runner import _mode

    subset = load_subset(tofu_data, "forget01", retain_authors=1, retain_eval=2, seed=0)
    config = TofuEvalConfig(
        data_dir=tofu_data,
        base_model=tmp_path,
        out_dir=tmp_path / "out",
        modes=("none", "delta"),
        command="obliviate x",
    )
    state = RunState(config, subset, [], tmp_path, tmp_path, tmp_path)
    with _mode(state, "delta"):
        raise RuntimeError("no small unlearned model")
    assert state.failures == {"delta": "RuntimeError: no small unlearned model"}
    assert "mode delta" in state.timings  # timed and checkpointed all the same
    assert (
        "did not run: RuntimeError: no small unlearned model"
        in (tmp_path / "out" / "tofu-forget01.md").read_text()
    )
    with pytest.raises(ValueError, match="bare model"), _mode(state, "none", fail_run=True):
        raise ValueError("bare model failed")
    assert "none" not in state.failures and "mode none" not in state.timings
