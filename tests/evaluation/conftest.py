"""Tiny chat models with the default model's tokenizer, and the shared TOFU data."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from tests.conftest import SHARED_DATA

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def tofu_data() -> Path:
    if not (SHARED_DATA / "tofu" / "full.jsonl").is_file():
        pytest.skip(
            f"TOFU data not found at {SHARED_DATA} (the shared/ folder beside the checkout)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def chat_tokenizer_dir() -> Path:
    """The default model's folder (for its tokenizer and chat template)."""
    from server.modelstore import default_cache_dir

    folder = default_cache_dir() / "SmolLM2-135M-Instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the default model is not pulled: run `obliviate models pull`")
    return folder


@pytest.fixture
def tiny_chat_model(tmp_path: Path, chat_tokenizer_dir: Path) -> Callable[..., Path]:
    """A tiny random llama saved with the default model's tokenizer (fast to train and score)."""

    def make(name: str = "tiny", seed: int = 0) -> Path:
        folder = tmp_path / name
        tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir, local_files_only=True)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        LlamaForCausalLM(config).save_pretrained(folder)
        for f in TOKENIZER_FILES:
            if (chat_tokenizer_dir / f).is_file():
                shutil.copy(chat_tokenizer_dir / f, folder / f)
        return folder

    return make
