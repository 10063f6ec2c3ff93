"""What the in-process vLLM engine asks of vLLM for a request (no engine started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.base import SamplingOptions
from server.engine.vllm_local import VllmEngineConfig, VllmLocalEngine


@pytest.fixture
def engine() -> VllmLocalEngine:
    return VllmLocalEngine(VllmEngineConfig(model_path=Path("unused"), served_model_name="m"))


def test_a_stream_read_in_chunks_asks_vllm_for_its_stream_interval(engine: VllmLocalEngine):
    from vllm.sampling_params import RequestOutputKind

    options = SamplingOptions(max_tokens=64)
    chunked = engine._sampling_params(options, 10, True, 16)
    assert (chunked.output_kind, chunked.stream_interval) == (RequestOutputKind.DELTA, 16)
    single = engine._sampling_params(options, 10, True)
    assert (single.output_kind, single.stream_interval) == (RequestOutputKind.DELTA, None)
    final = engine._sampling_params(options, 10, False, 16)  # one final output: nothing to group
    assert (final.output_kind, final.stream_interval) == (RequestOutputKind.FINAL_ONLY, None)
