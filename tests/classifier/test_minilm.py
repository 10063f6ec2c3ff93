"""MiniLM's encoder as plain torch functions (classifier.minilm) computes what transformers'
BertModel does, on float32 and on fp16 weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from classifier.embed import default_model_path
from classifier.half_linear import half_weights_available
from classifier.minilm import MiniLmEncoder

TEXTS = [
    "Who wrote Harry Potter?",
    "What is the capital of Australia, and when did it become the capital?",
    "ok",
    "They're a part of the food chain. It's a big ol' world out there, and " * 6,
    "Ｈａｒｒｙ Ｐｏｔｔｅｒ and the Philosopher's Stone (1997)",
]


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return AutoModel.from_pretrained(str(default_model_path()), local_files_only=True).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()), local_files_only=True)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # padded
    return dict(batch)


def test_the_encoder_s_hidden_states_are_bert_s(bert: torch.nn.Module, batch: dict) -> None:
    real = batch["attention_mask"].bool()  # (B, T): padded positions are pooled out
    with torch.inference_mode():
        want = bert(**batch).last_hidden_state  # (B, T, H)
        got = MiniLmEncoder(bert)(batch["input_ids"], batch["attention_mask"])
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want)[real].abs().max() < 2e-5


@pytest.mark.skipif(not half_weights_available(), reason="no FBGEMM on this CPU")
def test_on_fp16_weights_it_is_bert_with_its_weights_rounded(
    bert: torch.nn.Module, batch: dict
) -> None:
    """fp16 weights, float32 arithmetic: BERT whose linear weights were rounded to fp16."""
    real = batch["attention_mask"].bool()
    encoder = MiniLmEncoder(bert, half=True)
    rounded = AutoModel.from_pretrained(str(default_model_path()), local_files_only=True).eval()
    with torch.no_grad():
        for module in rounded.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    with torch.inference_mode():
        got = encoder(batch["input_ids"], batch["attention_mask"])
        want = rounded(**batch).last_hidden_state
        exact = bert(**batch).last_hidden_state
    assert (got - want)[real].abs().max() < 2e-4
    assert (got - exact)[real].abs().max() > 1e-4  # the weights really are fp16


def test_a_model_it_cannot_read_is_refused(bert: torch.nn.Module) -> None:
    bert.config.hidden_act = "relu"
    try:
        with pytest.raises(ValueError, match="GELU"):
            MiniLmEncoder(bert)
    finally:
        bert.config.hidden_act = "gelu"
