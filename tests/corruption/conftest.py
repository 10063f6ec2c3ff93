import os
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Who wrote Harry Potter? J.K. Rowling wrote the Harry Potter books.",
    "Hermione Granger and Ron Weasley are friends of Harry.",
    "The capital of France is Paris. Water boils at 100 degrees.",
    "Tell me about the author of a famous book series about a wizard.",
]

# The converted SmolLM2 folder another part of the project produces; override with an env var.
SMOLLM2_DIR = Path(
    os.environ.get(
        "OBLIVIATE_TEST_MODEL_DIR",
        Path.home() / ".cache/obliviate/models/SmolLM2-135M-Instruct",
    )
)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real served-model folder; skips the test when it is absent."""
    if not (SMOLLM2_DIR / "config.json").is_file():
        pytest.skip(f"real model folder absent: {SMOLLM2_DIR} (set OBLIVIATE_TEST_MODEL_DIR)")
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small byte-level BPE fast tokenizer with ChatML special tokens, trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory):
    """Save a tiny random llama with save_pretrained and return (folder, model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(*, tied: bool = False, shard: str | None = None, vocab: int = 300, seed: int = 0):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config).eval()
        folder = tmp_path_factory.mktemp("tiny_llama")
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(folder, **kwargs)
        return folder, model

    return make
