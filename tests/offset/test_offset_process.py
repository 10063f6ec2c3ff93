"""The δ small models in a child process: the same offsets bit for bit, failures fail closed."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: run `make test`, which installs it")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402

from offset import DeltaSpec, OffsetModels, OffsetPair  # noqa: E402
from offset.delta_args import delta_extra_args  # noqa: E402
from offset.offset_process import OffsetProcess, OffsetProcessError  # noqa: E402
from offset.vllm_processor import DeltaLogitsProcessor  # noqa: E402
from tests.offset.conftest import EOS, delta_processor  # noqa: E402

V_BIG = 80


@pytest.fixture
def spec(tiny_llama_dir: Any) -> DeltaSpec:
    return DeltaSpec(str(tiny_llama_dir("unlearned", seed=1)), str(tiny_llama_dir("base")), 0.5)


@pytest.fixture
def process() -> Any:
    proc = OffsetProcess(torch.float32)
    yield proc
    proc.close()


# Prompts, decode steps of a batch, a jump (not an extension) and a released sequence reused.
STEPS: list[list[tuple[int, list[int]]]] = [
    [(0, [5, 9, 12])],
    [(0, [5, 9, 12, 17]), (1, [7])],
    [(0, [5, 9, 12, 17, 4]), (1, [7, 30])],
    [(0, [5, 9, 12, 17, 4, 2]), (1, [7, 30, 3])],
    [(1, [7, 30, 3, 8]), (0, [6, 6])],
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_remote_pair_gives_the_in_process_offsets_bit_for_bit(
    spec: DeltaSpec, dtype: torch.dtype
) -> None:
    local = OffsetModels("cpu", dtype).pair(spec)  # as the processor loads them in process
    proc = OffsetProcess(dtype)
    try:
        remote = proc.pair(spec)
        assert proc.alive() and proc._child is not None and proc._child.pid != os.getpid()
        for step in STEPS:
            want, got = local.offsets(step), remote.offsets(step)
            assert got.dtype == want.dtype and got.shape == (len(step), 64)
            assert torch.equal(got, want)
            # and the in-process pair is right to begin with: the full forward pass's last row
            full = OffsetPair.from_folders(spec.unlearned, spec.base, dtype=dtype)
            torch.testing.assert_close(got[0].float(), full.full_offsets(step[0][1])[-1].float(),
                                       rtol=0.02, atol=0.02)  # fmt: skip
        local.release(0)
        remote.release(0)  # rides on the next request
        assert torch.equal(remote.offsets([(0, [5, 9])]), local.offsets([(0, [5, 9])]))
    finally:
        proc.close()
    assert not proc.alive()


def test_a_folder_that_fails_to_load_raises_with_the_childs_reason(
    process: OffsetProcess, tmp_path: Path, spec: DeltaSpec
) -> None:
    with pytest.raises(OffsetProcessError, match="no config.json"):
        process.pair(DeltaSpec(str(tmp_path), spec.base))
    assert process.alive()  # an error in a request does not end the child
    process.pair(spec)


def test_a_dead_child_raises_and_the_next_pair_starts_a_fresh_one(
    process: OffsetProcess, spec: DeltaSpec
) -> None:
    old = process.pair(spec)
    old.offsets([(0, [5, 9])])
    assert process._child is not None
    os.kill(process._child.pid, signal.SIGKILL)
    process._child.wait()
    with pytest.raises(OffsetProcessError):
        old.offsets([(0, [5, 9, 12])])
    fresh = process.pair(spec)
    assert process.alive()
    want = OffsetModels().pair(spec).offsets([(0, [5, 9, 12])])
    assert torch.equal(fresh.offsets([(0, [5, 9, 12])]), want)
    with pytest.raises(OffsetProcessError, match="has stopped"):
        old.offsets([(0, [5, 9, 12, 4])])  # a pair of the dead child never answers again


def test_a_child_that_hangs_is_stopped_after_the_timeout(spec: DeltaSpec) -> None:
    proc = OffsetProcess(torch.float32, timeout=1.0)
    try:
        pair = proc.pair(spec)
        assert proc._child is not None
        child = proc._child
        os.kill(child.pid, signal.SIGSTOP)
        with pytest.raises(OffsetProcessError, match="did not answer"):
            pair.offsets([(0, [5, 9])])
        assert child.poll() is not None and not proc.alive()  # killed, not left hanging
    finally:
        proc.close()


class _GarbledReplies:
    """The parent's end of the socket, its next reply garbled on the way (a torn stream)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def recv(self) -> Any:
        self._conn.recv()
        raise pickle.UnpicklingError("invalid load key, '\\x00'")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_a_reply_that_does_not_unpickle_stops_the_child(
    process: OffsetProcess, spec: DeltaSpec
) -> None:
    pair = process.pair(spec)
    child = process._child
    assert child is not None
    process._conn = _GarbledReplies(process._conn)  # type: ignore[assignment]
    with pytest.raises(OffsetProcessError, match="UnpicklingError"):
        pair.offsets([(0, [5, 9])])
    assert child.poll() is not None and not process.alive()  # no more reads from that stream
    want = OffsetModels().pair(spec).offsets([(0, [5, 9, 12])])
    assert torch.equal(process.pair(spec).offsets([(0, [5, 9, 12])]), want)  # a fresh child


def _processor() -> DeltaLogitsProcessor:
    return delta_processor()  # type: ignore[no-any-return]


def _added(spec: DeltaSpec, rows: list[tuple[int, list[int], list[int]]]) -> BatchUpdate:
    added = [
        (row, SamplingParams(extra_args=delta_extra_args([spec], prompt)), None, output)
        for row, prompt, output in rows
    ]
    return BatchUpdate(batch_size=len(rows), removed=[], added=added, moved=[])


def _counting(offsets: Any, sizes: list[int]) -> Any:
    def counted(batch: Any) -> torch.Tensor:
        sizes.append(len(batch))
        return offsets(batch)  # type: ignore[no-any-return]

    return counted


def test_the_processor_with_a_child_process_adds_the_same_offsets(
    spec: DeltaSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OBLIVIATE_DELTA_PROCESS=1: the small models run in a child; the logits are those of the
    in-process processor exactly, step after step, with the helper thread waiting for it.
    (In process, the models run on the main thread here: torch's thread count is per thread, and
    a helper thread's other reduction order moves the last bit.)"""
    runs: dict[str, list[torch.Tensor]] = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("OBLIVIATE_DELTA_PROCESS", mode)
        monkeypatch.setenv("OBLIVIATE_DELTA_OVERLAP", mode)
        proc = _processor()
        assert isinstance(proc._models, OffsetProcess) == (mode == "1")
        assert (proc._helper is not None) == (mode == "1")
        outputs: list[list[int]] = [[], []]
        proc.update_state(_added(spec, [(0, [5, 9, 12], outputs[0]), (1, [3, 3, 8], outputs[1])]))
        runs[mode] = []
        sizes: list[int] = []
        if isinstance(proc._models, OffsetProcess):
            pair = proc._models.pair(spec)
            assert pair is proc._models.pair(spec)  # one object per pair: its rows batch together
            monkeypatch.setattr(pair, "offsets", _counting(pair.offsets, sizes))
        for new in (None, (17, 4), (4, 30), (9, 9)):
            if new is not None:
                outputs[0].append(new[0])
                outputs[1].append(new[1])
                proc.update_state(None)
            torch.manual_seed(0)
            runs[mode].append(proc.apply(torch.randn(2, V_BIG)))
        if isinstance(proc._models, OffsetProcess):
            assert sizes == [2, 2, 2]  # each decode step: both rows in one request to the child
            proc._models.close()
    for local, remote in zip(runs["0"], runs["1"], strict=True):
        assert torch.equal(local, remote)
    monkeypatch.delenv("OBLIVIATE_DELTA_PROCESS")
    assert not isinstance(_processor()._models, OffsetProcess)  # opt-in only


def test_a_child_that_dies_mid_answer_ends_the_rows_and_new_requests_get_a_fresh_one(
    spec: DeltaSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OBLIVIATE_DELTA_PROCESS", "1")
    proc = _processor()
    assert isinstance(proc._models, OffsetProcess)
    output: list[int] = []
    proc.update_state(_added(spec, [(0, [5, 9, 12], output)]))
    assert proc.apply(torch.zeros(1, V_BIG)).abs().sum() > 0
    child = proc._models._child
    assert child is not None
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    output.append(17)
    proc.update_state(None)
    out = proc.apply(torch.zeros(1, V_BIG))
    assert int(out[0].argmax()) == EOS and torch.isinf(out[0]).sum() == V_BIG - 1  # closed
    proc.update_state(
        BatchUpdate(
            batch_size=1,
            removed=[0],
            added=[(0, SamplingParams(extra_args=delta_extra_args([spec], [5, 9])), None, [])],
            moved=[],
        )
    )
    out = proc.apply(torch.zeros(1, V_BIG))
    want = spec.alpha * OffsetModels().pair(spec).offsets([(0, [5, 9])])
    assert torch.equal(out[0, :64], want[0])
    assert proc._models.alive() and proc._models._child is not child
    proc._models.close()
