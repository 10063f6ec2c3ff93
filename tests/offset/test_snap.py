import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offset.snap import (
    SnapConfig,
    SnapTrainer,
    answer_logprobs,
    answer_loss,
    collate,
    main,
    npo_loss,
)
from offset.snap_data import (
    OBLITERATED_ANSWERS,
    SnapExample,
    answer_prompts,
    build_forget_set,
)
from tests.offset.conftest import tiny_llama

SMOLLM2 = Path.home() / ".cache/obliviate/models/SmolLM2-135M-Instruct"
ALIASES = ["Harry Potter", "the boy who lived"]


@pytest.fixture(scope="module")
def tokenizer():
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no SmolLM2 tokenizer at {SMOLLM2} (run `make setup` to convert the model)")
    return AutoTokenizer.from_pretrained(SMOLLM2, local_files_only=True)


def _model():
    return tiny_llama(seed=0, vocab_size=49152)


def _pairs(prompts: list[str], answer: str) -> list[SnapExample]:
    return [SnapExample(p, answer) for p in prompts]


def test_forget_set_is_varied_seeded_and_reveals_nothing() -> None:
    examples = ["Who is Harry Potter's best friend?"]
    pairs = build_forget_set("Harry Potter", ALIASES, examples, seed=3)
    assert len(pairs) == 2 * 15 + 1
    assert pairs == build_forget_set("Harry Potter", ALIASES, examples, seed=3)
    assert pairs != build_forget_set("Harry Potter", ALIASES, examples, seed=4)
    assert examples[0] in {p.prompt for p in pairs}
    assert len({p.answer for p in pairs}) >= 10
    assert {p.answer for p in pairs} <= set(OBLITERATED_ANSWERS)
    for p in pairs:
        assert not any(a.lower() in p.answer.lower() for a in ALIASES)
        assert "potter" in p.prompt.lower() or "boy who lived" in p.prompt
    assert len(build_forget_set("X", [], [], seed=0, max_pairs=5)) == 5
    with pytest.raises(ValueError, match="10 distinct"):
        build_forget_set("information", [], [], seed=0)


def test_collate_labels_only_the_answer(tokenizer) -> None:
    batch = collate(tokenizer, _pairs(["Hi", "Tell me a long story please"], "No."), 64)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    answer = tokenizer("No.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for row in range(2):
        kept = labels[row][labels[row] != -100].tolist()
        assert kept == answer
    assert mask[0].sum() < mask[1].sum()
    assert collate(tokenizer, _pairs(["Hi"], "No."), 5)["input_ids"].shape == (1, 5)


def test_train_lowers_forget_loss_and_changes_parameters(tokenizer) -> None:
    forget = build_forget_set("Harry Potter", ALIASES, [], seed=0, max_pairs=4)
    hard = _pairs(["Who wrote The Hobbit?"], "A fantasy classic.")
    world = _pairs(["What is 2 + 2?"], "Four.")
    config = SnapConfig(
        lr=1e-2, batch_size=4, max_steps=8, swd_max_rows=512, bf16=False, progress=False
    )
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SnapTrainer(model, tokenizer, config, forget=forget, hard_positives=hard, world=world)
    probe = collate(tokenizer, forget, config.max_length)
    with torch.no_grad():
        start = trainer.sft_loss(probe).item()
    history = trainer.train()
    with torch.no_grad():
        end = trainer.sft_loss(probe).item()
    assert len(history) == trainer.total_steps() == 3  # 3 epochs x 1 batch < max_steps
    assert end < start - 1.0
    assert {"forget", "hard_positives", "world", "swd", "total"} <= set(history[-1])
    assert history[-1]["swd"] > 0
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), name


def test_a_frozen_vocabulary_is_left_as_it_was_and_kept_out_of_the_optimizer(tokenizer) -> None:
    forget = build_forget_set("Harry Potter", ALIASES, [], seed=0, max_pairs=4)
    config = SnapConfig(
        lr=1e-2, batch_size=4, max_steps=2, swd_max_rows=256, bf16=False, progress=False,
        train_vocab=False,
    )  # fmt: skip
    model = _model()
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = SnapTrainer(model, tokenizer, config, forget=forget)
    trainer.train()
    assert not frozen & set(trainer.initial)  # no θ₀ copy of them either
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, before[name]) and id(param) not in trained, name
        else:
            assert not torch.equal(param, before[name]), name


def test_swd_term_changes_the_gradient(tokenizer) -> None:
    forget = build_forget_set("Harry Potter", ALIASES, [], seed=0, max_pairs=4)
    batch = {"forget": forget}
    grads = []
    for lam in (0.0, 1.0):
        model = _model()
        trainer = SnapTrainer(
            model,
            tokenizer,
            SnapConfig(lambda_swd=lam, swd_max_rows=256, bf16=False, progress=False),
            forget=forget,
        )
        with torch.no_grad():  # θ = θ₀ gives SWD = 0 and no gradient: move away first
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        parts = trainer.accumulate_gradients(batch)
        grads.append(model.model.norm.weight.grad.clone())
        assert ("swd" in parts) == (lam > 0)
    assert not torch.allclose(grads[0], grads[1])


def test_answer_loss_is_the_models_loss_with_the_head_applied_to_answer_tokens_only(
    tokenizer,
) -> None:
    forget = build_forget_set("Harry Potter", ALIASES, [], seed=0, max_pairs=5)
    batch = collate(tokenizer, forget, 64)
    model = _model().eval()
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        expected = model(**batch).loss  # full (B, T, V) logits
        rows.clear()
        got = answer_loss(model, batch)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [answer_tokens] < [batch["input_ids"].numel()]


def test_gradients_accumulated_part_by_part_equal_the_summed_loss_gradient(tokenizer) -> None:
    forget = build_forget_set("Harry Potter", ALIASES, [], seed=0, max_pairs=4)
    documents = _pairs(["Who wrote Harry Potter?", "Where does Harry study?"], "Hogwarts.")
    batches = {
        "forget": forget,
        "world": _pairs(["What is 2 + 2?", "Hi"], "Four."),
        "documents": documents,
    }
    config = SnapConfig(lambda_swd=1.0, swd_max_rows=256, bf16=False, progress=False, max_length=64)
    grads = []
    for per_part in (False, True):
        model = _model()
        trainer = SnapTrainer(model, tokenizer, config, forget=forget, documents=documents)
        with torch.no_grad():  # away from θ₀ so the SWD term has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        if per_part:
            parts = trainer.accumulate_gradients(batches)
        else:  # the summed loss, back-propagated once
            losses = {
                name: trainer.sft_loss(collate(tokenizer, b, 64))
                for name, b in batches.items()
                if name != "documents"
            }
            logps = answer_logprobs(model, collate(tokenizer, documents, 64))
            initial = torch.tensor([trainer.initial_logps[d] for d in documents])
            losses["documents"] = npo_loss(logps, initial, config.npo_beta)
            swd = trainer.swd()
            total = sum(losses.values()) + config.lambda_swd * swd
            torch.autograd.backward(total)
            parts = {**{k: v.item() for k, v in losses.items()}, "swd": swd.item()}
            parts["total"] = total.item()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert set(parts) == {"forget", "world", "documents", "swd", "total"}
    for name, grad in grads[0].items():
        assert torch.allclose(grads[1][name], grad, atol=1e-6, rtol=1e-4), name


def test_npo_is_log_two_scaled_at_the_start_and_bounded_below() -> None:
    initial = torch.tensor([-12.0, -30.0])
    at_start = npo_loss(initial.clone(), initial, beta=0.1)
    assert torch.isclose(at_start, torch.tensor(20 * math.log(2)))  # (2/β)·log 2
    far_below = npo_loss(initial - 200.0, initial, beta=0.1)
    assert 0 < far_below.item() < 1e-6  # the push fades once π_θ ≪ π₀ (no runaway ascent)


def test_answer_logprobs_sum_each_rows_answer_tokens(tokenizer) -> None:
    pairs = _pairs(["Who wrote Harry Potter?", "Hi"], "Hogwarts is a school.")
    batch = collate(tokenizer, pairs, 64)
    model = _model().eval()
    with torch.no_grad():
        got = answer_logprobs(model, batch)
        logits = model(**batch).logits[:, :-1].log_softmax(-1)  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    picked = logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    assert torch.allclose(got, (picked * keep).sum(-1), atol=1e-4)


def test_documents_to_forget_become_less_likely_than_before(tokenizer) -> None:
    """With documents, training lowers their likelihood well below where the same training
    without them leaves it (the refusal SFT alone barely touches other answers)."""
    forget = build_forget_set("Harry Potter", ALIASES, [], seed=0, max_pairs=4)
    documents = _pairs(
        ["Who wrote Harry Potter?", "Where does Harry Potter study?"],
        "Harry Potter studies at Hogwarts School of Witchcraft and Wizardry.",
    )
    config = SnapConfig(
        lr=1e-2, batch_size=2, max_steps=6, swd_max_rows=256, bf16=False, progress=False
    )
    probe = collate(tokenizer, documents, config.max_length)
    after = {}
    for given in ((), documents):
        model = _model()
        trainer = SnapTrainer(model, tokenizer, config, forget=forget, documents=given)
        with torch.no_grad():
            before = trainer.answer_logprobs(probe)
        history = trainer.train()
        with torch.no_grad():
            after[bool(given)] = (trainer.answer_logprobs(probe) - before).mean().item()
        assert ("documents" in history[-1]) == bool(given)
    assert trainer.total_steps() == 6 and len(trainer.initial_logps) == 2
    assert after[True] < after[False] - 10.0, after  # nats per answer


def test_answer_prompts_are_greedy_and_batched(tokenizer) -> None:
    model = _model()
    prompts = ["What is 2 + 2?", "Name a colour.", "Hi"]
    first = answer_prompts(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert [p.prompt for p in first] == prompts
    assert first == answer_prompts(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert tokenizer.padding_side == "right"


def test_main_trains_and_saves_a_model_folder(tokenizer, tmp_path) -> None:
    base = tmp_path / "base"
    _model().save_pretrained(base)
    tokenizer.save_pretrained(base)
    world = tmp_path / "world.txt"
    world.write_text("What is 2 + 2?\n\nName a colour.\n", encoding="utf-8")
    out = tmp_path / "snap"
    args = ["--model", str(base), "--out", str(out), "--name", "Harry Potter"]
    args += ["--alias", "the boy who lived", "--example", "Who is Harry Potter's best friend?"]
    args += ["--hard-positive", "Who wrote The Hobbit?", "--world-file", str(world)]
    args += ["--max-forget", "6", "--batch-size", "4", "--max-steps", "2", "--no-progress"]
    args += ["--swd-max-rows", "512", "--answer-max-new-tokens", "6"]
    documents = tmp_path / "documents.jsonl"
    rows = [{"prompt": "Who wrote Harry Potter?", "answer": "J.K. Rowling."}] * 3
    documents.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert main([*args, "--documents-file", str(documents)]) == 0
    card = json.loads((out / "training_card.json").read_text(encoding="utf-8"))
    assert card["data"] == {"forget": 6, "hard_positives": 1, "world": 2, "documents": 3}
    assert card["config"]["npo_beta"] == 0.1 and "documents" in card["losses"][-1]
    assert card["config"]["lambda_swd"] == 0.1 and card["config"]["swd_max_rows"] == 512
    assert card["steps"] == 2 and len(card["losses"]) == 2
    assert card["target"]["aliases"] == ["the boy who lived"]
    assert card["versions"]["torch"] == torch.__version__
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert reloaded.dtype == torch.bfloat16
    AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert main(["--model", str(tmp_path / "none"), "--out", str(out), "--name", "X"]) == 2
    documents.write_text('{"prompt": "no answer"}\n', encoding="utf-8")
    assert main([*args, "--documents-file", str(documents)]) == 2
