"""The product's torch code paths on a CUDA device, each checked against the same computation on
the CPU (float32 unless said otherwise): δ offsets and their decode batch, SNAP training steps,
the corruption functions, continuation scoring, the strength search and the embedding table.

Run on a GPU machine (no vLLM, FastAPI, network or model weights needed: tiny random llamas are
built here): `python -m pytest tests/gpu --noconftest -q`. Elsewhere the module is skipped;
`OBLIVIATE_TEST_DEVICE=cpu` runs the same checks on the CPU, to check the tests themselves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from corruption import (
    CORRUPTION_METHODS,
    CorruptionSpec,
    EmbeddingTable,
    ForgetExample,
    StrengthSearchConfig,
    apply_corruption,
    calibrate_strength,
    decode_prompt_embeds,
    encode_prompt_embeds,
)
from corruption.likelihood import next_token_logprobs, token_logprobs
from offset.cpu_gemm import PackedLinear, packable
from offset.delta import DeltaSpec, OffsetModels, OffsetPair
from offset.snap import SnapConfig, SnapTrainer, collate, native_bf16
from offset.snap_data import SnapExample, build_forget_set

DEVICE = os.environ.get("OBLIVIATE_TEST_DEVICE", "cuda")
DEV = torch.device(DEVICE)
CPU = torch.device("cpu")

pytestmark = [
    pytest.mark.requires_gpu,
    pytest.mark.skipif(
        DEV.type == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA device (torch.cuda.is_available() is False); "
        "OBLIVIATE_TEST_DEVICE=cpu runs these checks on the CPU",
    ),
]

ON_CUDA = DEV.type == "cuda"


def close(got: Tensor, want: Tensor, msg: str | None = None) -> None:
    """`got` (on DEVICE) is `want` (CPU, float32) up to rounding: nothing more."""
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4, msg=msg)


def on_device(tensor: Tensor) -> bool:
    return tensor.device.type == DEV.type and (
        DEV.index is None or tensor.device.index == DEV.index
    )


def tiny_llama(
    *, seed: int = 0, vocab: int = 64, hidden: int = 32, layers: int = 2, tied: bool = True
) -> Any:
    """A randomly initialised llama (tests/offset/conftest.py's and tests/corruption's shapes)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 8,
        num_key_value_heads=hidden // 16,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model: Any = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    return model.eval()


def corruption_llama(seed: int = 0) -> Any:
    """tests/corruption/conftest.py's tiny llama: vocabulary 300, hidden 16, one layer."""
    return tiny_llama(seed=seed, vocab=300, hidden=16, layers=1, tied=False)


def record_logits_devices(model: nn.Module) -> set[str]:
    """The device types of the logits `model` computes from now on."""
    seen: set[str] = set()
    model.register_forward_hook(lambda _m, _args, out: seen.add(out.logits.device.type))
    return seen


# --- δ: offsets of a small unlearned model against its base ---------------------------------


def test_offsets_and_decode_batch_on_device_match_cpu(tmp_path: Path) -> None:
    unlearned, base = tmp_path / "unlearned", tmp_path / "base"
    tiny_llama(seed=1).save_pretrained(unlearned)
    tiny_llama(seed=0).save_pretrained(base)
    reference = OffsetPair.from_folders(unlearned, base)  # CPU, transformers' defaults

    def want(ids: Sequence[int]) -> Tensor:
        return reference.full_offsets(ids)[-1]

    pair = OffsetModels(DEVICE, torch.float32).pair(DeltaSpec(str(unlearned), str(base)))
    assert on_device(next(pair.unlearned.parameters())) and on_device(next(pair.base.parameters()))
    packed = sum(isinstance(m, PackedLinear) for m in pair.unlearned.modules())
    plain = sum(type(m) is nn.Linear for m in pair.unlearned.modules())
    if ON_CUDA:  # oneDNN packing and eager attention are the CPU's choices only
        assert packed == 0 and plain == 2 * 7 + 1
        assert pair.unlearned.config._attn_implementation != "eager"
    elif packable(torch.float32):
        assert packed == 2 * 7 + 1 and plain == 0

    full = pair.full_offsets([1, 5, 9, 13, 17, 21])
    assert on_device(full) and full.abs().max() > 0.1  # offsets ~0.1: `close` is tight
    close(full, reference.full_offsets([1, 5, 9, 13, 17, 21]))

    gen = torch.Generator().manual_seed(3)
    seqs = {
        k: torch.randint(3, 64, (n,), generator=gen).tolist()
        for k, n in zip("abc", (5, 9, 3), strict=True)
    }
    for k, ids in seqs.items():  # prompts, each on its own (its own KV cache)
        got = pair.offset(k, ids)
        assert on_device(got)
        close(got, want(ids))

    def step(keys: str, extra: dict[str, list[int]] | None = None) -> None:
        for k in keys:
            seqs[k] = seqs[k] + (extra or {}).get(
                k, [int(torch.randint(3, 64, (1,), generator=gen))]
            )
        got = pair.offsets([(k, seqs[k]) for k in keys])  # (B, V)
        assert on_device(got) and got.shape == (len(keys), 64)
        for row, k in enumerate(keys):
            close(got[row], want(seqs[k]), msg=k)

    for _ in range(4):  # decode steps: one left-padded batch, caches grown in place
        step("abc")
    assert pair.rebuilds == 1
    assert pair._batch is not None and on_device(pair._batch.mask)
    pair.release("b")  # leaves the batch
    step("ac")
    seqs["d"] = [7, 8, 9, 10]
    close(pair.offset("d", seqs["d"]), want(seqs["d"]))
    step("acd")  # d joins: the batch is rebuilt once
    assert pair.rebuilds == 2
    step("acd", {"a": [11, 12]})  # a jumps two tokens: computed on its own, c and d step
    step("acd")
    for k in "acd":
        pair.release(k)
    assert pair._batch is None and not pair._states


def test_bf16_offsets_on_device_track_float32(tmp_path: Path) -> None:
    unlearned, base = tmp_path / "unlearned", tmp_path / "base"
    tiny_llama(seed=1).save_pretrained(unlearned)
    tiny_llama(seed=0).save_pretrained(base)
    reference = OffsetPair.from_folders(unlearned, base)
    pair = OffsetModels(DEVICE, torch.bfloat16).pair(DeltaSpec(str(unlearned), str(base)))
    assert next(pair.unlearned.parameters()).dtype == torch.bfloat16
    seqs = {"a": [1, 5, 9, 13], "b": [3, 7]}
    pair.offsets(list(seqs.items()))
    for new in (20, 30, 40):
        seqs = {k: [*ids, new] for k, ids in seqs.items()}
        got = pair.offsets(list(seqs.items()))
        assert on_device(got) and got.dtype == torch.float32
        for row, ids in enumerate(seqs.values()):
            want = reference.full_offsets(ids)[-1]  # offsets are ~0.1: bf16 keeps 2-3 digits
            torch.testing.assert_close(got[row].cpu(), want, atol=1e-2, rtol=0.0)


# --- SNAP training ------------------------------------------------------------------------


class ByteTokenizer:
    """What `SnapTrainer` reads of a tokenizer, over bytes (no chat template: bare prompts)."""

    eos_token_id = 2
    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + b % 61 for b in text.encode()]}


FORGET = build_forget_set("Harry Potter", ["the boy who lived"], [], seed=0, max_pairs=4)


def snap_trainer(device: torch.device, *, bf16: bool, documents: bool = False) -> SnapTrainer:
    """4 steps of SFT on forget, hard-positive and world data + SWD (+ NPO on a document)."""
    config = SnapConfig(lr=1e-2, epochs=4, batch_size=4, swd_max_rows=16, bf16=bf16, progress=False)
    docs = [SnapExample("Who is Harry Potter?", "A wizard at Hogwarts.")] if documents else []
    return SnapTrainer(
        tiny_llama(seed=0).to(device),
        ByteTokenizer(),
        config,
        forget=FORGET,
        hard_positives=[SnapExample("Who wrote The Hobbit?", "A fantasy classic.")],
        world=[SnapExample("What is 2 + 2?", "Four.")],
        documents=docs,
    )


def forget_loss(trainer: SnapTrainer) -> float:
    with torch.no_grad():
        return trainer.sft_loss(collate(trainer.tokenizer, FORGET, 128)).item()


@pytest.mark.parametrize("documents", [False, True], ids=["sft", "sft+npo"])
def test_snap_steps_on_device_match_cpu(documents: bool) -> None:
    trainer = snap_trainer(DEV, bf16=False, documents=documents)
    reference = snap_trainer(CPU, bf16=False, documents=documents)
    assert trainer.device.type == DEV.type and all(on_device(t) for t in trainer.initial.values())
    before = forget_loss(trainer)
    assert before == pytest.approx(forget_loss(reference), rel=1e-5)
    history, expected = trainer.train(), reference.train()
    assert len(history) == len(expected) == 4
    for got, want in zip(history, expected, strict=True):  # forget, ..., documents (NPO), swd
        assert got.keys() == want.keys() and all(math.isfinite(v) for v in got.values())
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert ("documents" in history[-1]) == documents
    after = forget_loss(trainer)
    assert after == pytest.approx(forget_loss(reference), rel=1e-3)
    if not documents:  # NPO on a document pushes its bytes, hence all text, down too
        assert after < before - 0.3
    assert all(on_device(p) and p.dtype == torch.float32 for p in trainer.model.parameters())
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert state and all(on_device(t) for t in state)


def test_snap_bf16_autocast_on_device() -> None:
    bf16 = native_bf16(DEV.type)
    if ON_CUDA:
        assert bf16, "a CUDA GPU without bf16 (`torch.cuda.is_bf16_supported()`)"
    if not bf16:
        pytest.skip(f"no native bf16 on {DEVICE}")
    trainer = snap_trainer(DEV, bf16=True)
    dtypes: set[torch.dtype] = set()
    trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda _m, _args, out: dtypes.add(out.dtype)
    )
    before = forget_loss(trainer)
    assert dtypes == {torch.bfloat16}  # autocast on DEVICE reached the linear layers
    assert before == pytest.approx(forget_loss(snap_trainer(DEV, bf16=False)), rel=2e-2)
    history = trainer.train()
    assert all(math.isfinite(v) for h in history for v in h.values())
    assert forget_loss(trainer) < before - 0.2
    assert all(on_device(p) and p.dtype == torch.float32 for p in trainer.model.parameters())


# --- corruption: functions, continuation scoring, strength search, embedding table --------


@pytest.mark.parametrize("method", sorted(CORRUPTION_METHODS))
def test_corruption_on_device_matches_cpu(method: str) -> None:
    entry = CORRUPTION_METHODS[method]
    spec = CorruptionSpec(method, 0.7 if entry.uses_strength else 0.0, 5, seed=11)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 9, 16, generator=gen)  # (B, T, H)
    mask = torch.rand(2, 9, generator=gen) < 0.5
    mask[:, :2] = True
    want = apply_corruption(embeds, mask, spec)
    assert not torch.equal(want, embeds)
    on_dev = embeds.to(DEV)
    for m in (mask.to(DEV), mask):  # the gateway's masks are built on the CPU
        got = apply_corruption(on_dev, m, spec)
        assert on_device(got) and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(on_dev.cpu(), embeds)  # never in place
    prompt = embeds[0].to(torch.bfloat16)  # (T, H), the served dtype
    got = apply_corruption(prompt.to(DEV), mask[0], spec)
    assert on_device(got) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu(), apply_corruption(prompt, mask[0], spec))


PROMPTS = [[17, 250, 3, 99, 42], [5, 6, 7, 8, 9, 10, 11, 12, 13], [200, 1, 77]]
CONTINUATIONS = [[4, 7, 9], [1], [2, 2], [8, 3, 5, 6], [120, 121, 122, 123, 124]]
OWNERS = [0, 0, 1, 2, 2]


def score(terms: Sequence[tuple[Any, float]], prompts: Sequence[Tensor]) -> list[float]:
    rows = token_logprobs(terms, prompts, CONTINUATIONS, OWNERS, batch_size=2)
    return [lp for row in rows for lp in row]


def scores_close(got: list[float], want: list[float]) -> None:
    """Log-probabilities (~ -6 nats) equal up to float32 rounding."""
    assert got == pytest.approx(want, abs=5e-5)


def test_continuation_scoring_on_device_matches_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = [corruption_llama(seed) for seed in (0, 1, 2)]  # big, small unlearned, small base
    dev = [corruption_llama(seed).to(DEV) for seed in (0, 1, 2)]
    seen = record_logits_devices(dev[0])
    ids = [torch.tensor(p) for p in PROMPTS]
    scores_close(score([(dev[0], 1.0)], ids), score([(cpu[0], 1.0)], ids))
    with torch.inference_mode():  # prompts given as (T, H) embeddings, as a corrupted one is
        embeds = [dev[0].get_input_embeddings()(p.to(DEV)) for p in ids]
        want = score([(cpu[0], 1.0)], [cpu[0].get_input_embeddings()(p) for p in ids])
    scores_close(score([(dev[0], 1.0)], embeds), want)
    # δ: big + α·(unlearned − base), all on DEVICE, or the small models left on the CPU
    weights = (1.0, 0.8, -0.8)
    want = score(list(zip(cpu, weights, strict=True)), ids)
    scores_close(score(list(zip(dev, weights, strict=True)), ids), want)
    scores_close(score([(dev[0], 1.0), (cpu[1], 0.8), (cpu[2], -0.8)], ids), want)
    monkeypatch.setattr("corruption.likelihood.LOGITS_BUDGET", 300 * 2 * 4)  # several passes
    scores_close(score(list(zip(dev, weights, strict=True)), ids), want)
    nxt = next_token_logprobs([(dev[0], 1.0)], ids)
    assert on_device(nxt)
    close(nxt, next_token_logprobs([(cpu[0], 1.0)], ids))
    assert seen == {DEV.type}


def forget_examples() -> list[ForgetExample]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for k, n in enumerate((6, 8, 7)):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[1:4] = True
        ids = torch.randint(0, 300, (n,), generator=gen).tolist()
        out.append(ForgetExample(ids, mask, [5 + k, 6, 7], [[9, 10], [11, 12, 13]]))
    return out


def test_strength_search_on_device_lands_where_cpu_does() -> None:
    cpu, dev = corruption_llama(), corruption_llama().to(DEV)
    seen = record_logits_devices(dev)
    std = float(cpu.get_input_embeddings().weight.detach().std())
    # The crossing of this model lies near 0.2 std: let the search go below 0.25 std.
    config = StrengthSearchConfig.for_embeddings(std, min_strength=0.01 * std)
    spec = CorruptionSpec("add_noise_first_n", 0.0, seed=3)
    fluency: dict[str, Any] = {"fluency_bound": 1e9, "max_new_tokens": 4, "eos_token_id": 0}
    want = calibrate_strength(cpu, forget_examples(), spec, config, **fluency)
    got = calibrate_strength(dev, forget_examples(), spec, config, workers=2, **fluency)
    assert want.search.reached and got.search.reached
    assert want.search.strength < 0.25 * std  # a crossing was bracketed, not a bound hit
    assert got.spec.strength == pytest.approx(want.spec.strength, rel=1e-3)
    assert got.search.rounds == want.search.rounds
    assert len(got.search.values) == len(want.search.values)
    for (s_got, f_got), (s_want, f_want) in zip(got.search.values, want.search.values, strict=True):
        assert s_got == pytest.approx(s_want, rel=1e-3) and f_got == pytest.approx(f_want, abs=2e-5)
    assert got.fluency.answers == want.fluency.answers  # greedy generation from inputs_embeds
    assert got.fluency.perplexity == pytest.approx(want.fluency.perplexity, rel=1e-4)
    assert seen == {DEV.type}


def test_embedding_table_loads_onto_device(tmp_path: Path) -> None:
    model = tiny_llama(seed=4, tied=True)
    model.save_pretrained(tmp_path)
    want = EmbeddingTable.from_model_dir(tmp_path)
    table = EmbeddingTable.from_model_dir(tmp_path, device=DEVICE)
    assert on_device(table.weight) and table.weight.dtype == torch.float32
    assert torch.equal(table.weight.cpu(), want.weight)
    assert torch.equal(want.weight, model.get_input_embeddings().weight.detach())
    assert table.std == pytest.approx(want.std, rel=1e-5)
    ids = [1, 9, 33, 63, 9]
    rows = table.lookup(ids)
    assert on_device(rows) and torch.equal(rows.cpu(), want.lookup(ids))
    half = EmbeddingTable.from_model_dir(tmp_path, device=DEVICE, dtype=torch.bfloat16)
    assert on_device(half.weight) and torch.equal(half.weight.cpu(), want.weight.bfloat16())
    mask = torch.tensor([False, True, True, False, False])
    spec = CorruptionSpec.recommended(table.std, seed=5)
    corrupted = apply_corruption(rows, mask, spec)
    assert on_device(corrupted)
    expected = apply_corruption(want.lookup(ids), mask, spec)
    decoded = decode_prompt_embeds(encode_prompt_embeds(corrupted))
    assert decoded.device == CPU
    torch.testing.assert_close(decoded, expected, atol=1e-6, rtol=1e-6)
