"""Per-target corruption strength, searched offline against a local copy of the served model.

The objective and its stopping level are written down in `corruption.strength`: the model's
per-token likelihood of the target's known answers (given, or the bare model's own greedy answers)
must fall to the level of unrelated answers, and the answers generated from the corrupted prompts
must stay fluent (perplexity bound). The weakest strength that gets there is stored.

The copy of the model (float32, as large as the served model) is loaded by each search and
released when it ends: the gateway holds none between registrations.

A search for a new version of a target starts where its earlier versions' searches crossed the
level (`warm_start_from_reports`): their probes, in units of the embedding table's std, are in the
calibration reports the registry keeps, tagged with the model they ran on
(`StrengthCalibrator.model_key`). So the warm start survives restarts, is shared by every
gateway on one registry, and needs no store of its own. Other targets' searches are not used:
targets on one model cross far apart (server/services/targets.py, `_earlier_searches`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from chat import user_turn
from classifier import find_spans
from corruption import (
    CorruptionSpec,
    EmbeddingTable,
    EmbedsGenerator,
    StrengthSearchConfig,
    WarmStart,
    calibrate_strength,
    make_forget_example,
)
from offset.snap import native_bf16

logger = logging.getLogger(__name__)

# Perplexity of the corrupted answers under the clean model: the bare model's own answers score
# ~2, fluent corrupted ones 5-9 (SmolLM2); loops are caught by the distinct-token check.
FLUENCY_BOUND = 20.0
MAX_EXAMPLES = 16
WARM_START_SEARCHES = 8
"""The most recent searches a warm start is built from."""


def model_key(model_dir: Path, std: float) -> str:
    """Which model a search ran on: its folder's name, a hash of its config and the embedding
    table's std (fine-tunes of one architecture share the config, not the std)."""
    config = model_dir / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else "-"
    return f"{model_dir.name}:{digest}:{std:.6g}"


def warm_start_from_reports(reports: Iterable[Mapping[str, Any]], model: str) -> WarmStart | None:
    """The warm start for a search on `model`: the probes (strength in std, f) of the earlier
    searches in `reports` (corruption calibration reports, newest first) that ran on it and
    reached the level; the first `WARM_START_SEARCHES` of them. None when there are none."""
    probes = []
    for report in reports:
        if report.get("model") != model or not report.get("searched") or not report.get("reached"):
            continue
        points = report.get("probes") or []
        try:
            probes.append([(float(u), float(v)) for u, v in points])
        except (TypeError, ValueError):
            continue  # a malformed report counts as no search
        if len(probes) == WARM_START_SEARCHES:
            break
    return WarmStart.from_probes(probes) if probes else None


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3
_SEARCH_MMAP_BYTES = 1 << 20
"""During a search, blocks of 1 MiB or more (every weight matrix of the model copy) get their own
mapping, handed back to the OS when freed. glibc's default raises this threshold (up to 32 MiB)
as large blocks are freed, after which such weights land in the heap and stay there as
fragments: measured on SmolLM2-135M, 190-290 MiB kept after each search against 46-90 MiB."""
_STEADY_MMAP_BYTES = 32 << 20
"""The threshold glibc's own adjustment reaches in a process that frees large tensors."""


def _set_mmap_threshold(nbytes: int) -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise; no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def calibration_dtype(setting: str, served: str | None, device: str = "cpu") -> str:
    """The dtype the strength search runs the model copy in.

    `setting` other than "auto" is taken as is. "auto": the served dtype when it is bfloat16 and
    `device` computes bf16 natively (a GPU, a CPU with avx512_bf16 / amx_bf16: there the search
    runs 2.3x faster than in float32 and scores the model as the engine runs it); float32
    otherwise (an emulated bf16 is slower than float32; `served` None: an upstream engine, whose
    dtype the gateway does not know).
    """
    if setting != "auto":
        return setting
    if served == "bfloat16" and native_bf16(device):
        return "bfloat16"
    return "float32"


class StrengthCalibrator:
    """Runs strength searches on an HF copy of the served model, loaded per search."""

    def __init__(
        self,
        model_dir: Path,
        table: EmbeddingTable,
        device: str = "cpu",
        *,
        workers: int = 1,
        dtype: str = "float32",
    ) -> None:
        self._model_dir = model_dir
        self._table = table
        self.dtype = dtype
        """The model copy's dtype (`calibration_dtype`)."""
        self._device = device
        self._workers = workers
        self._lock = threading.Lock()
        self.model_key = model_key(model_dir, table.std)
        """Tags this calibrator's reports: warm starts use only searches on the same model."""

    def default_spec(self) -> CorruptionSpec:
        """The corruption used when no search can run (noise of ~4x the embeddings' std)."""
        return CorruptionSpec.recommended(self._table.std)

    def _load(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("Loading %s for strength calibration", self._model_dir)
        tokenizer = AutoTokenizer.from_pretrained(self._model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            self._model_dir, dtype=getattr(torch, self.dtype), local_files_only=True
        )
        return model.to(self._device).eval(), tokenizer  # type: ignore[arg-type]

    def calibrate(
        self,
        prompts: list[str],
        answers: list[str] | Callable[[], list[str]],
        aliases: list[str],
        base: CorruptionSpec | None,
        *,
        generate_with: EmbedsGenerator | None = None,
        warm: WarmStart | None = None,
    ) -> tuple[CorruptionSpec, dict[str, Any]]:
        """Search the weakest strength that forgets; returns the spec and a report (with the
        seconds each stage took: loading the model, the search, the fluency check).

        `generate_with` generates the fluency check's answers (the serving engine); without it,
        or when it cannot give token ids, the model copy generates them. `warm` (strengths in
        units of the embedding table's std: `warm_start_from_reports`) starts the search.
        `answers` may be a callable that blocks until they are known: it is called once the
        model is loaded, so that loading overlaps whatever produces them (the engine).
        """
        with self._lock:
            started = time.perf_counter()
            _set_mmap_threshold(_SEARCH_MMAP_BYTES)
            model, tokenizer = self._load()
            try:
                stages = {"load_model": time.perf_counter() - started}
                if callable(answers):
                    loaded = time.perf_counter()
                    answers = answers()
                    stages["wait_answers"] = time.perf_counter() - loaded
                return self._search(
                    model, tokenizer, prompts, answers, aliases, base, stages, generate_with, warm
                )
            finally:
                # Nothing else refers to the model: dropping these frees it (checked by tests).
                del model, tokenizer
                gc.collect()
                _set_mmap_threshold(_STEADY_MMAP_BYTES)
                _trim_heap()

    def _search(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[str],
        answers: list[str],
        aliases: list[str],
        base: CorruptionSpec | None,
        stages: dict[str, float],
        generate_with: EmbedsGenerator | None,
        warm: WarmStart | None,
    ) -> tuple[CorruptionSpec, dict[str, Any]]:
        std = self._table.std
        spec = base or self.default_spec()
        examples = [
            make_forget_example(
                tokenizer, user_turn(tokenizer, p), p, a, spans=find_spans(p, aliases)
            )
            for p, a in zip(prompts, answers, strict=True)
            if a.strip()
        ]
        if len(examples) < 2:
            return spec, {"searched": False, "reason": "fewer than 2 answered examples"}
        result = calibrate_strength(
            model,
            examples[:MAX_EXAMPLES],
            spec,
            StrengthSearchConfig.for_embeddings(std, paired=self._device != "cpu"),
            fluency_bound=FLUENCY_BOUND,
            eos_token_id=tokenizer.eos_token_id,
            generate_with=generate_with,
            workers=self._workers,
            warm=warm.in_units(std) if warm is not None else None,
        )
        search = result.search
        report = {
            "searched": True,
            "model": self.model_key,
            "dtype": self.dtype,
            "warm_start": (
                {"searches": len(warm.curves), "guess_in_std": warm.guess()} if warm else None
            ),
            "strength_in_std": result.spec.strength / std,
            "objective": search.value,
            "reached": search.reached,
            "evaluations": search.evaluations,
            "rounds": search.rounds,
            "failing_below_in_std": (
                search.failing_below / std if search.failing_below is not None else None
            ),
            "probes": [[s / std, v] for s, v in search.values],
            "seconds": search.seconds,
            "fluency_perplexity": result.fluency.perplexity,
            "fluent": result.fluency.fluent,
            "distinct_ratio": result.fluency.distinct_ratio,
            "stage_seconds": {**stages, **result.seconds},
        }
        return result.spec, report
