"""The δ logits processor on vLLM's V1 interface, driven the way vLLM's batch drives it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: run `make test`, which installs it")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from offset import DeltaSpec, OffsetModels, OffsetPair  # noqa: E402
from offset.delta_args import delta_extra_args, parse_delta_args  # noqa: E402
from offset.vllm_processor import DeltaLogitsProcessor  # noqa: E402
from tests.offset.conftest import EOS, delta_processor  # noqa: E402

V_BIG = 80  # the engine pads its vocabulary beyond the small models' 64


def _processor(dtype: torch.dtype | None = None) -> DeltaLogitsProcessor:
    return delta_processor(dtype)  # type: ignore[no-any-return]


def _params(spec: DeltaSpec | None, prompt: list[int]) -> SamplingParams:
    extra = delta_extra_args([spec], prompt) if spec is not None else None
    return SamplingParams(extra_args=extra)


def _update(
    added: list[tuple[int, SamplingParams, list[int] | None, list[int]]] = (),  # type: ignore[assignment]
    removed: list[int] = (),  # type: ignore[assignment]
    moved: list[tuple[int, int, MoveDirectionality]] = (),  # type: ignore[assignment]
    size: int = 3,
) -> BatchUpdate:
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


@pytest.fixture
def spec(tiny_llama_dir) -> DeltaSpec:
    return DeltaSpec(str(tiny_llama_dir("unlearned", seed=1)), str(tiny_llama_dir("base")), 0.5)


def _expected(spec: DeltaSpec, tokens: list[int]) -> torch.Tensor:
    pair = OffsetPair.from_folders(spec.unlearned, spec.base)
    return spec.alpha * pair.full_offsets(tokens)[-1]  # (V_small,)


def test_adds_the_offset_to_delta_rows_only_and_follows_new_tokens(spec: DeltaSpec) -> None:
    proc = _processor()
    prompt, output = [5, 9, 12], []  # vLLM appends to `output` in place as tokens are sampled
    proc.update_state(
        _update(added=[(0, _params(None, [3]), [3], []), (1, _params(spec, prompt), None, output)])
    )
    for new_token in (None, 17, 4):
        if new_token is not None:
            output.append(new_token)
            proc.update_state(None)
        logits = torch.randn(2, V_BIG)
        before = logits.clone()
        out = proc.apply(logits)
        torch.testing.assert_close(out[0], before[0])  # no δ arguments: untouched
        want = before[1].clone()
        want[:64] += _expected(spec, prompt + output)
        torch.testing.assert_close(out[1], want, rtol=1e-5, atol=1e-5)


def test_several_delta_rows_decode_in_one_batched_step_each(spec: DeltaSpec) -> None:
    proc = _processor()
    prompts = [[5, 9, 12], [7], [3, 3, 8, 1, 6]]
    outputs: list[list[int]] = [[], [], []]
    added = [(row, _params(spec, p), None, outputs[row]) for row, p in enumerate(prompts)]
    proc.update_state(_update(added=added))
    pair = proc._models.pair(spec)
    shapes: list[tuple[int, ...]] = []
    pair.base.register_forward_hook(
        lambda _m, _args, kwargs, _out: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    for step, new_tokens in enumerate((None, (17, 4, 9), (4, 30, 2))):
        if new_tokens is not None:
            for out, token in zip(outputs, new_tokens, strict=True):
                out.append(token)
            proc.update_state(None)
        result = proc.apply(torch.zeros(3, V_BIG))
        for row, prompt in enumerate(prompts):
            want = _expected(spec, prompt + outputs[row])
            torch.testing.assert_close(result[row, :64], want, rtol=1e-4, atol=1e-4)
        if step > 0:  # the three requests' decode step ran as one (3, 1) batch
            assert shapes[-1] == (3, 1)
    assert [s for s in shapes if s[1] == 1] == [(1, 1), (3, 1), (3, 1)]  # prompt [7], then steps


def test_engine_prompt_ids_win_over_the_extra_args(spec: DeltaSpec) -> None:
    proc = _processor()
    proc.update_state(_update(added=[(0, _params(spec, [1, 1, 1]), [5, 9], [])]))
    out = proc.apply(torch.zeros(1, V_BIG))
    torch.testing.assert_close(out[0, :64], _expected(spec, [5, 9]), rtol=1e-5, atol=1e-5)


def test_moves_swaps_and_removals_keep_rows_with_their_requests(spec: DeltaSpec) -> None:
    proc = _processor()
    proc.update_state(
        _update(added=[(0, _params(spec, [5]), None, []), (2, _params(None, [1]), [1], [])])
    )
    proc.update_state(_update(moved=[(0, 2, MoveDirectionality.SWAP)]))
    out = proc.apply(torch.zeros(3, V_BIG))
    assert out[0].abs().sum() == 0 and out[1].abs().sum() == 0
    torch.testing.assert_close(out[2, :64], _expected(spec, [5]), rtol=1e-5, atol=1e-5)
    proc.update_state(_update(moved=[(2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.apply(torch.zeros(3, V_BIG))[1].abs().sum() > 0
    proc.update_state(_update(removed=[1]))
    assert proc.apply(torch.zeros(3, V_BIG)).abs().sum() == 0


def test_a_vanished_model_fails_the_request_closed(spec: DeltaSpec, tmp_path: Path) -> None:
    """If the offset cannot be computed the row ends the answer instead of leaking."""
    proc = _processor()
    broken = SamplingParams(extra_args=delta_extra_args([spec], [5]))
    Path(spec.unlearned, "model.safetensors").unlink()
    proc.update_state(_update(added=[(0, broken, None, [])]))
    out = proc.apply(torch.zeros(1, V_BIG))
    assert int(out[0].argmax()) == EOS and torch.isinf(out[0]).sum() == V_BIG - 1


def test_malformed_arguments_are_rejected_before_the_engine(
    spec: DeltaSpec, tmp_path: Path
) -> None:
    assert parse_delta_args(None) is None and parse_delta_args({"other": 1}) is None
    specs, prompt = parse_delta_args(delta_extra_args([spec], [4, 5]))  # type: ignore[misc]
    assert specs == [spec] and prompt == [4, 5]
    for bad in (
        {"obliviate_delta": []},
        {"obliviate_delta": {"offsets": [{"unlearned": spec.unlearned}]}},
        {
            "obliviate_delta": {
                "offsets": [{"unlearned": str(tmp_path), "base": spec.base, "alpha": 1}]
            }
        },
        {"obliviate_delta": {"offsets": [], "prompt_token_ids": ["a"]}},
    ):
        with pytest.raises(ValueError):
            DeltaLogitsProcessor.validate_params(SamplingParams(extra_args=bad))


def test_offsets_are_computed_beside_the_forward_pass(
    spec: DeltaSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the helper on, update_state starts the small models; apply only waits for them."""
    import threading

    monkeypatch.setenv("OBLIVIATE_DELTA_OVERLAP", "1")
    proc = _processor()
    assert proc._helper is not None
    prompts = [[5, 9, 12], [3, 3, 8, 1]]
    outputs: list[list[int]] = [[], []]
    added = [(row, _params(spec, p), None, outputs[row]) for row, p in enumerate(prompts)]
    proc.update_state(_update(added=added))
    pair = proc._models.pair(spec)
    threads: list[str] = []
    pair.unlearned.register_forward_hook(lambda *_: threads.append(threading.current_thread().name))
    for new_tokens in (None, (17, 4), (4, 30)):
        if new_tokens is not None:
            for out, token in zip(outputs, new_tokens, strict=True):
                out.append(token)
            proc.update_state(None)
        result = proc.apply(torch.zeros(2, V_BIG))
        for row, prompt in enumerate(prompts):
            want = _expected(spec, prompt + outputs[row])
            torch.testing.assert_close(result[row, :64], want, rtol=1e-4, atol=1e-4)
    assert threads and all(name.startswith("obliviate-delta") for name in threads)
    # Tokens that changed after update_state (not how vLLM drives it) are recomputed in apply.
    outputs[0].append(7)
    result = proc.apply(torch.zeros(2, V_BIG))
    want = _expected(spec, prompts[0] + outputs[0])
    torch.testing.assert_close(result[0, :64], want, rtol=1e-4, atol=1e-4)
    assert threads[-1] == threading.current_thread().name
    monkeypatch.setenv("OBLIVIATE_DELTA_OVERLAP", "0")
    assert _processor()._helper is None


def test_small_models_run_in_the_engines_dtype(spec: DeltaSpec) -> None:
    """A bfloat16 engine gets bfloat16 small models (float32 ones cost 4x the big model's step on
    a CPU with native bf16); the offset is the bf16 pair's, added to the row."""
    proc = _processor(torch.bfloat16)
    prompt: list[int] = [5, 9, 12]
    proc.update_state(_update(added=[(0, _params(spec, prompt), None, [])], size=1))
    logits = torch.zeros(1, V_BIG)
    out = proc.apply(logits.clone())
    pair = proc._models.pair(spec)
    assert next(pair.unlearned.parameters()).dtype == torch.bfloat16
    assert next(pair.base.parameters()).dtype == torch.bfloat16
    bf16 = OffsetModels("cpu", torch.bfloat16).pair(spec)  # loaded as the processor loads them
    want = spec.alpha * bf16.full_offsets(prompt)[-1]  # (V_small,)
    torch.testing.assert_close(out[0, :64], want, rtol=0, atol=1e-6)
    fp32 = _expected(spec, prompt)
    assert not torch.equal(out[0, :64], fp32)  # really computed in bf16, not float32
    assert _processor()._models.dtype == torch.float32  # no dtype given: float32
