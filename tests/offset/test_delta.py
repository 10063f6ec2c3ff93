import pytest
import torch

from offset.delta import OffsetPair, offset_logits


def test_offset_logits_adds_scaled_difference() -> None:
    big = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    su = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    sb = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    out = offset_logits(big, su, sb, alpha=2.0)
    assert torch.equal(out, torch.tensor([[3.0, 2.0, 3.0], [0.0, 2.0, -2.0]]))


def test_offset_logits_keeps_dtype_and_padded_columns() -> None:
    big = torch.zeros(2, 5, dtype=torch.bfloat16)
    su = torch.ones(2, 3)
    out = offset_logits(big, su, torch.zeros(2, 3), alpha=1.0)
    assert out.dtype == torch.bfloat16
    assert out[:, :3].eq(1).all() and out[:, 3:].eq(0).all()


def test_offset_logits_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        offset_logits(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), alpha=1.0)
    with pytest.raises(ValueError):
        offset_logits(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), alpha=1.0)
    with pytest.raises(ValueError):
        offset_logits(torch.zeros(2, 3), torch.zeros(1, 3), torch.zeros(1, 3), alpha=1.0)


def test_incremental_offsets_match_a_full_forward(tiny_llama_dir) -> None:
    pair = OffsetPair.from_folders(tiny_llama_dir("unlearned", seed=1), tiny_llama_dir("base"))
    tokens = [1, 5, 9, 13, 17, 21, 4, 8]
    full = pair.full_offsets(tokens)  # (T, V)
    assert full.abs().max() > 0
    # prompt of 3, then one token at a time, then a jump of 2 tokens
    for end in (3, 4, 5, 6, 8):
        got = pair.offset("a", tokens[:end])
        torch.testing.assert_close(got, full[end - 1], atol=1e-4, rtol=1e-4)
    # a repeated call returns the cached offset; a diverging sequence starts over
    torch.testing.assert_close(pair.offset("a", tokens), full[-1], atol=1e-4, rtol=1e-4)
    other = [1, 5, 9, 30]
    torch.testing.assert_close(
        pair.offset("a", other), pair.full_offsets(other)[-1], atol=1e-4, rtol=1e-4
    )
    batch = pair.offsets([("a", other), ("b", tokens[:2])])
    assert batch.shape == (2, 64)
    torch.testing.assert_close(batch[1], full[1], atol=1e-4, rtol=1e-4)
    pair.release("a")
    pair.release("missing")


def test_offsets_along_a_draft_match_full_forwards_and_cut_rejected_tokens(tiny_llama_dir) -> None:
    """A speculative draft's positions in one pass (row j: after the first T − n + 1 + j tokens);
    a later call that drops the draft's tail cuts it from the caches instead of starting over."""
    pair = OffsetPair.from_folders(tiny_llama_dir("unlearned", seed=1), tiny_llama_dir("base"))
    prompt, draft = [1, 5, 9, 13], [17, 21, 4, 8]
    full = pair.full_offsets(prompt + draft)  # (T, V)
    got = pair.offsets_along("a", prompt + draft[:-1], len(draft))  # (4, V)
    assert got.shape == (4, 64)
    torch.testing.assert_close(got, full[len(prompt) - 1 : -1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the premise: positions differ
    # two draft tokens stood, the third was replaced: the caches keep 6 tokens and feed 2
    replaced = prompt + draft[:2] + [30, 31]
    fed: list[int] = []
    hook = pair.unlearned.register_forward_pre_hook(
        lambda _m, args, kwargs: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    got = pair.offsets_along("a", replaced, 2)
    hook.remove()
    assert fed == [2]
    torch.testing.assert_close(got, pair.full_offsets(replaced)[-2:], atol=1e-4, rtol=1e-4)
    # back to a prefix of what the caches hold: cut, one token fed
    torch.testing.assert_close(
        pair.offset("a", prompt + draft[:1]), full[len(prompt)], atol=1e-4, rtol=1e-4
    )
    with pytest.raises(ValueError, match="n must be"):
        pair.offsets_along("a", prompt, 5)


def test_decode_steps_of_several_sequences_run_batched_and_match_full_forwards(
    tiny_llama_dir,
) -> None:
    pair = OffsetPair.from_folders(tiny_llama_dir("unlearned", seed=1), tiny_llama_dir("base"))
    seqs = {
        "a": [1, 5, 9, 13, 17, 21, 4, 8],
        "b": [3, 7, 11, 2, 6, 8],
        "c": [10, 20, 30, 40, 50, 60],
    }
    lengths = {"a": 4, "b": 2, "c": 3}  # different cache lengths: the batch is left-padded
    for seq_id, n in lengths.items():
        pair.offset(seq_id, seqs[seq_id][:n])
    calls: list[tuple[int, ...]] = []
    pair.unlearned.register_forward_hook(
        lambda _m, _args, kwargs, _out: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    for _ in range(3):  # three decode steps, plus one sequence that starts in the middle
        batch = [(k, seqs[k][: lengths[k] + 1]) for k in lengths]
        batch.append(("new", [5, 6, 7]))
        got = pair.offsets(batch)  # (4, V)
        for row, (seq_id, ids) in enumerate(batch):
            want = pair.full_offsets(ids)[-1]
            torch.testing.assert_close(got[row], want, atol=1e-4, rtol=1e-4, msg=seq_id)
        lengths = {k: n + 1 for k, n in lengths.items()}
        pair.release("new")
    steps = [shape for shape in calls if shape[1] == 1]  # full_offsets' calls are (1, T)
    assert steps == [(3, 1)] * 3  # a, b and c stepped together, once per step


def test_identical_models_give_zero_offset(tiny_llama_dir) -> None:
    folder = tiny_llama_dir("same")
    pair = OffsetPair.from_folders(folder, folder, max_sequences=1)
    assert pair.offset(0, [1, 2, 3]).abs().max().item() == 0.0
    assert pair.offset(1, [4, 5]).abs().max().item() == 0.0
    assert len(pair._states) == 1


def test_missing_folder_names_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="local model folder"):
        OffsetPair.from_folders(tmp_path / "nope", tmp_path / "nope")


def _close_to_full(pair: OffsetPair, got: torch.Tensor, ids: list[int], msg: object) -> None:
    torch.testing.assert_close(got, pair.full_offsets(ids)[-1], atol=1e-4, rtol=1e-4, msg=msg)


def test_decode_batch_persists_across_steps_and_follows_membership(tiny_llama_dir) -> None:
    """Steady decoding reuses one batch (no re-padding); joins, leaves, jumps rebuild it once."""
    pair = OffsetPair.from_folders(tiny_llama_dir("unlearned", seed=1), tiny_llama_dir("base"))
    gen = torch.Generator().manual_seed(3)
    lengths = {"a": 5, "b": 9, "c": 3}
    seqs = {k: torch.randint(3, 64, (n,), generator=gen).tolist() for k, n in lengths.items()}
    for k, ids in seqs.items():  # prompts: each on its own
        _close_to_full(pair, pair.offset(k, ids), ids, k)

    def step(keys: str) -> torch.Tensor:
        for k in keys:
            seqs[k] = seqs[k] + [int(torch.randint(3, 64, (1,), generator=gen))]
        got = pair.offsets([(k, seqs[k]) for k in keys])
        for row, k in enumerate(keys):
            _close_to_full(pair, got[row], seqs[k], k)
        return got

    for _ in range(4):
        step("abc")
    assert pair.rebuilds == 1  # built once, then grown in place step after step
    pair.release("b")  # finished: dropped from the batch
    step("ac")
    step("ac")
    assert pair.rebuilds == 1  # dropping a row needs no rebuild of the rest
    seqs["d"] = [7, 8, 9, 10]
    _close_to_full(pair, pair.offset("d", seqs["d"]), seqs["d"], "d")
    step("acd")  # d joins after its prompt
    step("acd")
    assert pair.rebuilds == 2
    # A repeat returns the kept offset without running the models.
    again = pair.offsets([("a", seqs["a"]), ("c", seqs["c"]), ("d", seqs["d"])])
    _close_to_full(pair, again[0], seqs["a"], "repeat")
    # A jump of two tokens leaves the batch and is computed on its own; the others step on.
    seqs["a"] = seqs["a"] + [11, 12]
    for k in "cd":
        seqs[k] = seqs[k] + [13]
    got = pair.offsets([(k, seqs[k]) for k in "acd"])
    for row, k in enumerate("acd"):
        _close_to_full(pair, got[row], seqs[k], k)
    step("acd")  # a is back in step with the others
    for k in "acd":
        pair.release(k)
    assert pair._batch is None and not pair._states
