from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TinyFactory = Callable[..., LlamaForCausalLM]

EOS = 2
"""The end-of-sequence id the δ processor's engine config names (tiny llamas use it too)."""


def delta_processor(dtype: torch.dtype | None = None) -> Any:
    """A `DeltaLogitsProcessor` on the CPU, with the engine config it reads (dtype, EOS)."""
    from types import SimpleNamespace

    from offset.vllm_processor import DeltaLogitsProcessor

    model_config = SimpleNamespace(hf_text_config=SimpleNamespace(eos_token_id=EOS))
    if dtype is not None:
        model_config.dtype = dtype
    return DeltaLogitsProcessor(
        SimpleNamespace(model_config=model_config), torch.device("cpu"), False
    )


def tiny_llama(
    *, seed: int = 0, vocab_size: int = 64, tied: bool = True, attention_bias: bool = False
) -> LlamaForCausalLM:
    """A randomly initialised 2-layer llama with hidden size 32 (`tied`: LM head = embedding;
    `attention_bias`: q, k, v and o carry biases)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_bias=attention_bias,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Callable[..., Path]:
    """Save a tiny llama under tmp_path and return its folder."""

    def make(name: str, *, seed: int = 0) -> Path:
        folder = tmp_path / name
        tiny_llama(seed=seed).save_pretrained(folder)
        return folder

    return make


SMOLLM2 = Path.home() / ".cache/obliviate/models/SmolLM2-135M-Instruct"


def tiny_smollm_folders(root: Path, specs: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """Tiny llamas saved with SmolLM2's tokenizer: {name: (seed, vocab_size)} -> folders.

    Skips the calling test when the converted SmolLM2 is not in the cache.
    """
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip(f"no SmolLM2 tokenizer at {SMOLLM2} (run `make setup` to convert the model)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, local_files_only=True)
    out = {}
    for name, (seed, vocab) in specs.items():
        tiny_llama(seed=seed, vocab_size=vocab).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out
