"""The small models' linear layers on prepacked oneDNN weights (offset/cpu_gemm.py)."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from offset import DeltaSpec, OffsetModels, OffsetPair, cpu_gemm
from offset.cpu_gemm import PackedLinear, bucket_rows, pack_linears, packable

from .conftest import tiny_llama

pytestmark = pytest.mark.skipif(not packable(torch.float32), reason="torch built without oneDNN")


def untied_llama(seed: int = 0) -> LlamaForCausalLM:
    """Untied LM head, biases on q, k, v and o (as Qwen2's q, k, v have)."""
    return tiny_llama(seed=seed, tied=False, attention_bias=True)


@pytest.mark.parametrize("make", [tiny_llama, untied_llama])
def test_packed_layers_compute_what_the_plain_ones_did(make) -> None:
    plain, packed = make(seed=3), make(seed=3)
    linears = sum(type(m) is nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears == 2 * 7 + 1  # q k v o gate up down per layer + head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == linears
    ids = torch.tensor([[1, 5, 9, 13, 17, 21], [3, 7, 11, 2, 6, 8]])  # (B, T)
    with torch.inference_mode():
        want = plain(input_ids=ids).logits
        got = packed(input_ids=ids).logits
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_plain_weights_are_gone_once_packed() -> None:
    model = untied_llama()
    pack_linears(model)
    # Left as parameters: the embedding and the norms (the linear weights live packed).
    names = {n for n, _ in model.named_parameters()}
    assert names and all("embed_tokens" in n or "norm" in n for n in names), names


@pytest.mark.parametrize("make", [tiny_llama, untied_llama])
def test_the_packed_model_holds_none_of_the_plain_models_memory(make) -> None:
    """A tensor left pointing into the loaded weights (a bias kept as a view) keeps the whole
    file's mapping resident: MiniLM's embedder took 271 MiB instead of 184 that way."""
    model = make()
    weights = list(model.state_dict().values())  # kept alive: their memory is not reused
    plain = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in weights]
    pack_linears(model)
    held = [*model.parameters(), *model.buffers()]
    held += [
        t
        for m in model.modules()
        if isinstance(m, PackedLinear)
        for t in (m.bias,)
        if t is not None
    ]
    inside = [t.shape for t in held if any(lo <= t.data_ptr() < hi for lo, hi in plain)]
    assert not inside, inside


def test_onednn_sees_a_few_row_counts_whatever_the_lengths(monkeypatch) -> None:
    """oneDNN keeps ~2.5 MiB per input shape it has seen (SmolLM2-135M): more than 64 rows are
    padded to a few sizes, so prompts of 150 lengths make 67 shapes, and each row's result is
    unchanged."""
    plain, packed = untied_llama(seed=5), untied_llama(seed=5)
    pack_linears(packed)
    seen: set[int] = set()
    linear = cpu_gemm._linear

    def spy(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.add(rows.shape[0])
        return linear(rows, weight, bias)

    monkeypatch.setattr(cpu_gemm, "_linear", spy)
    with torch.inference_mode():
        for length in range(1, 151):
            ids = torch.arange(length).remainder(64).unsqueeze(0)  # (1, T)
            got = packed(input_ids=ids).logits
            if length in (1, 7, 30, 65, 150):
                torch.testing.assert_close(got, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert seen == {*range(1, 65), 96, 128, 192}
    assert all(bucket_rows(m) >= m for m in range(1, 10_000))


def test_bf16_packs_where_the_cpu_computes_bf16() -> None:
    if not packable(torch.bfloat16):
        assert pack_linears(tiny_llama().to(torch.bfloat16)) == 0  # left as it was
        pytest.skip("no native bf16 on this CPU: bf16 models are left on torch's GEMM")
    plain, packed = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    assert pack_linears(packed) > 0
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.inference_mode():
        torch.testing.assert_close(
            packed(input_ids=ids).logits, plain(input_ids=ids).logits, atol=2e-2, rtol=2e-2
        )


def test_a_dtype_onednn_does_not_take_is_left_alone() -> None:
    model = tiny_llama().to(torch.float16)
    assert not packable(torch.float16)
    assert pack_linears(model) == 0
    assert any(type(m) is nn.Linear for m in model.modules())


def test_offset_models_decode_packed_and_match_plain_full_forwards(tiny_llama_dir) -> None:
    unlearned, base = tiny_llama_dir("unlearned", seed=1), tiny_llama_dir("base")
    models = OffsetModels("cpu", torch.float32)
    pair = models.pair(DeltaSpec(str(unlearned), str(base)))
    assert isinstance(pair.unlearned.lm_head, PackedLinear)
    assert pair.unlearned.config._attn_implementation == "eager"
    reference = OffsetPair.from_folders(unlearned, base)  # transformers' defaults, unpacked
    seqs = {"a": [1, 5, 9, 13, 17, 21, 4, 8], "b": [3, 7, 11, 2, 6, 8, 10, 12]}
    pair.offsets([(k, s[:4]) for k, s in seqs.items()])  # prompts
    for end in range(5, 9):  # decode steps, batched
        got = pair.offsets([(k, s[:end]) for k, s in seqs.items()])
        for row, s in enumerate(seqs.values()):
            want = reference.full_offsets(s[:end])[-1]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4)


def test_packed_models_run_on_two_threads_at_once() -> None:
    """The δ helper thread steps the small models while vLLM's worker runs the big one:
    the packed kernels must not share state across threads (vLLM's `onednn_mm` does, and
    crashed the engine when called from the helper). Each model's logits are its serial
    ones up to the order of float sums: two threads entering OpenMP at once may get teams of
    another size, which splits the sums differently (once in a full suite run, 2026-12-06);
    state shared between the two models would give other numbers."""
    models = [tiny_llama(seed=s) for s in (0, 1)]
    for model in models:
        pack_linears(model)
    batches = [torch.randint(3, 64, (1 + i % 5, 6 + i % 7)) for i in range(200)]

    def run(model: LlamaForCausalLM) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(input_ids=ids).logits for ids in batches]

    serial = [run(m) for m in models]
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(run, models))
    for want, got in zip(serial, concurrent, strict=True):
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
