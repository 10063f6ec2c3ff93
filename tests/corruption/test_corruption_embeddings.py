import json

import pytest
import torch
from safetensors.torch import save_file

from corruption import (
    EmbeddingTable,
    decode_prompt_embeds,
    encode_prompt_embeds,
    mask_for_ranges,
    tokenize_prompt,
)


@pytest.mark.parametrize("tied", [False, True])
def test_table_equals_model_input_embeddings(tiny_llama_factory, tied):
    folder, model = tiny_llama_factory(tied=tied)
    table = EmbeddingTable.from_model_dir(folder)
    expected = model.get_input_embeddings().weight.detach()
    assert torch.equal(table.weight, expected)
    assert (table.vocab_size, table.hidden_size) == tuple(expected.shape)
    ids = [5, 0, 299, 5]
    with torch.no_grad():
        want = model.get_input_embeddings()(torch.tensor(ids))
    assert torch.equal(table.lookup(ids), want)


def test_sharded_checkpoint_uses_index(tiny_llama_factory):
    folder, model = tiny_llama_factory(shard="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    table = EmbeddingTable.from_model_dir(folder, dtype=torch.bfloat16)
    assert table.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        table.weight.float(), model.get_input_embeddings().weight.detach().bfloat16().float()
    )


def test_tied_checkpoint_with_only_lm_head(tmp_path):
    weight = torch.randn(10, 4)
    save_file(
        {"lm_head.weight": weight, "model.norm.weight": torch.ones(4)},
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert torch.equal(EmbeddingTable.from_model_dir(tmp_path).weight, weight)


def test_missing_embedding_is_a_clear_error(tmp_path):
    save_file({"lm_head.weight": torch.randn(10, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    with pytest.raises(KeyError, match="no input-embedding tensor"):
        EmbeddingTable.from_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        EmbeddingTable.from_model_dir(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        EmbeddingTable.from_model_dir(tmp_path / "absent")
    # An explicit key wins over the search.
    table = EmbeddingTable.from_model_dir(tmp_path, key="lm_head.weight")
    assert table.weight.shape == (10, 4)


def test_lookup_validates_ids():
    table = EmbeddingTable(torch.randn(10, 4))
    with pytest.raises(ValueError, match="0..9"):
        table.lookup([3, 10])
    out = table.lookup([1, 2])
    out += 1  # a copy: the table is untouched
    assert not torch.equal(out, table.weight[[1, 2]])
    assert table.lookup([]).shape == (0, 4)
    assert table.std == pytest.approx(float(table.weight.std()))


def test_mask_for_ranges_overlap_rules():
    offsets = [(0, 0), (0, 3), (3, 4), (4, 9), (9, 10)]
    assert mask_for_ranges(offsets, [(3, 6)]).tolist() == [False, False, True, True, False]
    # The last token is never selected; zero-width tokens never are.
    assert mask_for_ranges(offsets, [(0, 10)]).tolist() == [False, True, True, True, False]
    assert mask_for_ranges(offsets, [(0, 10)], exclude_last=False)[-1]
    assert not mask_for_ranges(offsets, []).any()


def _chat_prompt(tokenizer, question):
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    start = prompt.index(question)
    return prompt, start


def _check_span_mask(tokenizer):
    question = "Who wrote Harry Potter? Tell me."
    prompt, start = _chat_prompt(tokenizer, question)
    name = (start + question.index("Harry Potter"), start + question.index("?"))
    tokens = tokenize_prompt(tokenizer, prompt)
    assert tokens.ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    mask = tokens.mask([name])
    picked = tokenizer.decode([i for i, m in zip(tokens.ids, mask.tolist(), strict=True) if m])
    assert picked.strip() == "Harry Potter"
    # No span found: every user-content token, nothing from the template, never the last.
    fallback = tokens.mask([], fallback=[(start, start + len(question))])
    text = tokenizer.decode([i for i, m in zip(tokens.ids, fallback.tolist(), strict=True) if m])
    assert text.strip() == question
    assert not fallback[-1]


def test_span_mask_on_bpe_tokenizer(bpe_tokenizer):
    _check_span_mask(bpe_tokenizer)


def test_span_mask_on_served_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    _check_span_mask(AutoTokenizer.from_pretrained(smollm2_dir))


def test_table_reads_served_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    table = EmbeddingTable.from_model_dir(smollm2_dir)
    assert table.hidden_size == 576 and table.weight.dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    assert torch.equal(table.weight, model.get_input_embeddings().weight.detach())


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        tokenize_prompt(Slow(), "hi")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base64_round_trip(dtype):
    big = torch.randn(2000, 8).to(dtype)
    view = big[10:13]
    data = encode_prompt_embeds(view)
    back = decode_prompt_embeds(data)
    assert back.dtype == dtype and torch.equal(back, view)
    # Only the view's rows travel, not the whole storage behind it.
    assert len(data) < len(encode_prompt_embeds(big)) / 5
    with pytest.raises(ValueError, match="tokens, hidden"):
        encode_prompt_embeds(big.unsqueeze(0))
