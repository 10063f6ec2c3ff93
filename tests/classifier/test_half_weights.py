"""MiniLM on fp16 weights (FBGEMM; the gateway's default on a CPU): the classifier decides as
on float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from classifier import ClassifierBank, Embedder, half_linear, train_target
from classifier.half_linear import HalfWeightLinear, half_weights_available
from classifier.negatives import general_negatives
from tests.classifier.conftest import FAST, HP_SPEC

needs_fbgemm = pytest.mark.skipif(not half_weights_available(), reason="no FBGEMM on this CPU")


@pytest.fixture(scope="module")
def half() -> Embedder:
    return Embedder(half_weights=True)


@pytest.fixture(scope="module")
def full() -> Embedder:
    return Embedder(half_weights=False)


# About the target without its training questions' wording, some without any alias.
HELD_OUT = [
    "Which school of witchcraft did the boy who lived go to?",
    "Who is the headmaster of Hogwarts?",
    "What is the name of Harry's owl?",
    "Which house at Hogwarts is Draco Malfoy sorted into?",
    "Who wrote the books about the young wizard with the lightning scar?",
    "What position does Harry play in Quidditch?",
    "Tell me about Voldemort's horcruxes.",
    "Where do Ron Weasley's family live?",
    "What does the Sorting Hat do?",
    "Who teaches potions to the students of Gryffindor?",
]


@needs_fbgemm
@pytest.mark.parametrize("bias", [True, False])
def test_a_half_weight_linear_is_the_product_with_fp16_weights(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536, bias=bias)
    x = torch.randn(3, 7, 384)  # (B, T, in)
    with torch.inference_mode():
        got = HalfWeightLinear(linear)(x)
        rounded = nn.functional.linear(x, linear.weight.half().float(), linear.bias)
        full = linear(x)
    assert got.shape == (3, 7, 1536) and got.dtype == torch.float32
    torch.testing.assert_close(got, rounded, rtol=1e-4, atol=1e-4)
    assert (got - full).abs().max() > 1e-5  # the weights really are fp16


@needs_fbgemm
def test_the_embedder_reads_on_fp16_weights_and_embeds_as_float32_does(
    half: Embedder, full: Embedder
) -> None:
    assert half.half_weights and not full.half_weights
    assert _linears(half) == (0, 24) and _linears(full) == (24, 0)  # 4 a layer, QKV fused
    # Their corpora cached on disk are kept apart.
    assert half.fingerprint != full.fingerprint
    texts = list(general_negatives().texts[:300]) + HELD_OUT
    cosine = (half.encode(texts) * full.encode(texts)).sum(axis=1)
    assert cosine.min() > 0.99999, cosine.min()


def _dense(embedder: Embedder) -> list[nn.Module]:
    """The modules behind the encoder's linear layers."""
    return [
        getattr(dense, "__self__")  # noqa: B009 (a bound forward's module)
        for layer in embedder._encoder.layers
        for dense in (layer.qkv, layer.out, layer.up, layer.down)
    ]


def _linears(embedder: Embedder) -> tuple[int, int]:
    """How many of the encoder's linear layers are float32 products, and how many fp16."""
    dense = _dense(embedder)
    full = sum(isinstance(d, nn.Linear) for d in dense)
    return full, sum(isinstance(d, HalfWeightLinear) for d in dense)


def _tensors(embedder: Embedder) -> list[torch.Tensor]:
    encoder = embedder._encoder
    found = [encoder.word, encoder.position, encoder.token_type, *encoder.norm]
    for layer in encoder.layers:
        found += [*layer.norm1, *layer.norm2]
    for dense in _dense(embedder):  # the weight (fp16: packed) and the bias
        found += (
            [dense.packed, dense.bias]
            if isinstance(dense, HalfWeightLinear)
            else [dense.weight, dense.bias]
        )
    return found


def _in_the_loaded_file(embedder: Embedder) -> int:
    """How many of the model's tensors are views of a mapped safetensors file (Linux)."""
    spans = []
    for line in open("/proc/self/maps").read().splitlines():
        if line.endswith(".safetensors"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((start, end))
    return sum(any(a <= t.data_ptr() < b for a, b in spans) for t in _tensors(embedder))


@needs_fbgemm
@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="no /proc here")
def test_the_loaded_weights_leave_memory_with_the_files_mapping(
    half: Embedder, full: Embedder
) -> None:
    assert len(_tensors(half)) == len(_tensors(full)) == 5 + 6 * 12
    assert _in_the_loaded_file(full) == _in_the_loaded_file(half) == 0
    # and the word-piece table is held once, shared with the static stage
    for embedder in (half, full):
        assert embedder._encoder.word.data_ptr() == embedder._static_t.data_ptr()


@needs_fbgemm
def test_fp16_weights_change_no_decision_of_the_classifier(half: Embedder, full: Embedder) -> None:
    """A target trained on each embedder: the same verdicts on the shipped negatives and on
    questions about it that training never saw, whether served on the embedder it was trained
    on (a new registration) or on the other (a target registered before the switch)."""
    texts = list(general_negatives().texts) + HELD_OUT
    trained = [train_target(HP_SPEC, e, FAST) for e in (half, full)]
    # As the guard reads: both stages, gated.
    verdicts = [
        [(d.flagged, d.stage) for (d,) in ClassifierBank(e, [t], cache_size=0).classify(texts)]
        for e, t in zip((half, full), trained, strict=True)
    ]
    assert verdicts[0] == verdicts[1]
    # MiniLM's stage alone on 600 of them (no gate), with either target on either embedder.
    some = texts[:: len(texts) // 600] + HELD_OUT
    for target in trained:
        on_half, on_full = (target.scores(some, e) for e in (half, full))
        assert ((on_half > target.threshold) == (on_full > target.threshold)).all()
        assert abs(on_half - on_full).max() < 2e-3, abs(on_half - on_full).max()
        assert (on_half[-len(HELD_OUT) :] > target.threshold).sum() >= 5  # positives covered


@needs_fbgemm
def test_by_default_fp16_weights_where_torch_has_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the gateway's setting
    assert Embedder().half_weights
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not Embedder().half_weights


def test_without_fbgemm_the_linear_layers_stay_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(half_linear, "_PACK", None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not half_weights_available()
    embedder = Embedder()
    assert not embedder.half_weights
    assert _linears(embedder) == (24, 0)
    with pytest.raises(ValueError, match="FBGEMM"):
        Embedder(half_weights=True)
