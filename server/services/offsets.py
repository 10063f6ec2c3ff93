"""δ targets' small models: train a SNAP copy of the small base in a child process, or adopt one.

    registration job (mode delta / eco+delta)
      ├─ options.unlearned_model given ──> check it shares the base's vocabulary; use it
      └─ else `python -m offset.snap` (= `obliviate snap train`) on the small base:
             forget  = templated questions about the name and aliases + the target's examples
             hard    = the target's retain examples, answered by the base model itself
             world   = built-in general prompts, answered by the base model itself
         into <data_dir>/offsets/.<job>.tmp, renamed to <data_dir>/offsets/<job> when complete

Training runs in its own process: a crash leaves no half-written folder under the final name,
the gateway's event loop and torch threads stay free, and the job can be cancelled by killing it.
A job re-run after a crash reuses a folder that finished training.

Replicas share no disk: `publish` stores the model folders in the registry as bundles
(`server.registry_blobs`) and the offset artifact names them; `resolve`, on any replica, fetches
them once into `<data_dir>/offsets/cache/<bundle>` (checksummed) and returns local paths. The
small base defaults to the served model, which every replica has locally: it is not copied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offset import DeltaSpec
from offset.alpha import ALPHAS, AlphaChoice, RatioItem, choose_alpha, truth_ratios
from offset.delta import load_causal_lm
from offset.snap import native_bf16, write_documents
from server.engine.base import ChatPrompt
from server.engine.templating import render_prompt
from server.registry_blobs import BlobStore, Manifest, bundle_digest, manifest_blobs

logger = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class SnapDefaults:
    """Training knobs a target's options may override (`snap_max_steps`, `snap_lr`;
    `snap_train_vocab` is passed to the trainer as given)."""

    max_steps: int | None = None
    lr: float = 1e-4


@dataclass(frozen=True)
class OffsetRequest:
    """What a δ registration needs to know of its target."""

    job_id: str
    name: str
    aliases: Sequence[str]
    forget_prompts: Sequence[str]
    retain_prompts: Sequence[str]
    options: dict[str, Any]
    documents: Sequence[tuple[str, str]] = ()
    """(prompt, answer) pairs the model must stop giving: the forget examples' known answers.
    SNAP lowers their likelihood below the small base's (NPO) beside teaching refusals."""
    answered: Sequence[tuple[str, str, Sequence[str]]] = ()
    """(prompt, answer, wrong answers) of the forget examples: alpha 'auto' scores them."""


class OffsetTrainer:
    """Produces the `DeltaSpec` of a δ target (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        default_base: Path | None,
        defaults: SnapDefaults = SnapDefaults(),
        blobs: BlobStore | None = None,
        device: str = "cpu",
    ) -> None:
        self._device = device  # where alpha 'auto' scores the pair
        self._root = root
        self._default_base = default_base
        self._defaults = defaults
        self._blobs = blobs

    @property
    def cache(self) -> Path:
        """Where model folders fetched from the registry live on this replica."""
        return self._root / "cache"

    def publish(self, spec: DeltaSpec, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The offset artifact (folders stored in the registry) and the blobs it refers to."""
        if self._blobs is None:
            return {"unlearned": spec.unlearned, "base": spec.base, "alpha": spec.alpha}, []
        unlearned = self._blobs.put_folder(Path(spec.unlearned))
        data: dict[str, Any] = {"alpha": spec.alpha, "unlearned": {"bundle": unlearned}}
        blobs = manifest_blobs(unlearned)
        if options.get("small_base"):
            base = self._blobs.put_folder(Path(spec.base))
            data["base"] = {"bundle": base}
            blobs += manifest_blobs(base)
        else:
            data["base"] = {"served": True}
        self._adopt(Path(spec.unlearned), unlearned)
        return data, sorted(set(blobs))

    def _adopt(self, folder: Path, manifest: Manifest) -> None:
        """A folder this replica trained becomes its cached copy (no second copy on disk)."""
        if folder.resolve().parent != self._root.resolve():
            return  # the operator's own folder (options.unlearned_model): left where it is
        target = self.cache / bundle_digest(manifest)
        if target.exists():
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        (folder / ".obliviate-bundle").write_text(json.dumps(manifest, sort_keys=True))
        folder.rename(target)

    def resolve(self, data: dict[str, Any]) -> DeltaSpec:
        """The local `DeltaSpec` of an offset artifact, fetching its folders when needed."""
        if isinstance(data.get("unlearned"), str):  # written before folders were shared
            return DeltaSpec(str(data["unlearned"]), str(data["base"]), float(data["alpha"]))
        return DeltaSpec(
            str(self._folder(data["unlearned"])),
            str(self._folder(data["base"])),
            float(data["alpha"]),
        )

    def _folder(self, ref: dict[str, Any]) -> Path:
        if ref.get("served"):
            if self._default_base is None:
                raise ValueError(
                    "this δ target's small base is the served model, and this gateway has no "
                    "local copy of it (--model PATH)"
                )
            return self._default_base.resolve()
        if self._blobs is None:
            raise ValueError("this gateway has no registry to fetch the δ model folders from")
        return self._blobs.materialize(ref["bundle"], self.cache).resolve()

    def base_for(self, options: dict[str, Any]) -> Path:
        """The small base model folder of a target (its option, else the served model's)."""
        given = options.get("small_base")
        base = Path(given) if given else self._default_base
        if base is None:
            raise ValueError(
                "δ mode needs a small base model: set options.small_base to a local model folder "
                "(the gateway has no local copy of the served model to default to)"
            )
        return base

    async def prepare(
        self, request: OffsetRequest, progress: Progress
    ) -> tuple[DeltaSpec, dict[str, Any]]:
        """The target's offset spec and a report for its calibration record."""
        options = request.options
        base = self.base_for(options)
        given = options.get("unlearned_model")
        report: dict[str, Any]
        if given:
            check_pair(Path(given), base)
            unlearned = Path(given)
            report = {"trained": False, "unlearned_model": str(given)}
        else:
            unlearned = self._root / request.job_id
            if not (unlearned / "training_card.json").is_file():
                await self._train(request, base, unlearned, progress)
            card = json.loads((unlearned / "training_card.json").read_text(encoding="utf-8"))
            report = {
                "trained": True,
                "unlearned_model": str(unlearned),
                "steps": card.get("steps"),
                "train_seconds": card.get("train_seconds"),
                "data": card.get("data"),
                "loss_first": (card.get("losses") or [{}])[0],
                "loss_last": (card.get("losses") or [{}])[-1],
            }
        alpha = options.get("alpha", 1.0)
        if alpha == "auto":
            progress("alpha", 0.9)
            started = time.perf_counter()
            choice = await asyncio.to_thread(
                search_alpha,
                unlearned,
                base,
                request.answered,
                options["alpha_probes"],
                self._device,
            )
            at_end = choice.alpha == max(ALPHAS)
            report["alpha_search"] = {
                **choice.report(),
                "examples": len(request.answered),
                "probes": len(options["alpha_probes"]),
                "at_grid_end": at_end,
                "seconds": round(time.perf_counter() - started, 2),
            }
            if at_end:
                logger.warning(
                    "%s: alpha 'auto' chose the grid's largest α (%s): the unlearned copy moves "
                    "the examples' preference too little to reach the probes' level (give the "
                    "forget examples' answers so SNAP trains them away with NPO)",
                    request.name,
                    choice.alpha,
                )
            alpha = choice.alpha
        return DeltaSpec(str(unlearned.resolve()), str(base.resolve()), float(alpha)), report

    def command(
        self,
        request: OffsetRequest,
        base: Path,
        out: Path,
        status: Path,
        documents: Path | None = None,
    ) -> list[str]:
        """The `offset.snap` command line for a target (`documents`: the JSON-lines file of its
        documents, passed when it has any)."""
        options = request.options
        max_steps = options.get("snap_max_steps", self._defaults.max_steps)
        argv = [sys.executable, "-m", "offset.snap", "--model", str(base), "--out", str(out)]
        argv += ["--name", request.name, "--no-progress", "--status-file", str(status)]
        argv += ["--lr", str(options.get("snap_lr", self._defaults.lr))]
        argv += ["--seed", str(options.get("seed", 0))]
        if max_steps is not None:
            argv += ["--max-steps", str(max_steps)]
        if not native_bf16():
            argv.append("--no-bf16")
        if options.get("snap_train_vocab") is False:
            argv.append("--no-train-vocab")
        if request.documents and documents is not None:
            argv += ["--documents-file", str(documents)]
        for flag, values in (
            ("--alias", [a for a in request.aliases if a != request.name]),
            ("--example", request.forget_prompts),
            ("--hard-positive", request.retain_prompts),
        ):
            for value in values:
                argv += [flag, value]
        return argv

    async def _train(
        self, request: OffsetRequest, base: Path, out: Path, progress: Progress
    ) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        tmp = self._root / f".{request.job_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        status = self._root / f".{request.job_id}.status.json"
        log_path = self._root / f"{request.job_id}.log"
        documents = write_documents(
            self._root / f".{request.job_id}.documents.jsonl", request.documents
        )
        argv = self.command(request, base, tmp, status, documents)
        logger.info("SNAP training for %s: %s", request.name, log_path)
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)
            try:
                while proc.returncode is None:
                    _report(status, progress)
                    try:
                        await asyncio.wait_for(proc.wait(), timeout=1.0)
                    except TimeoutError:
                        pass
            except BaseException:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                raise
        status.unlink(missing_ok=True)
        documents.unlink(missing_ok=True)  # the very text to forget: not kept beside the model
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"SNAP training exited with {proc.returncode}: {' | '.join(tail)} (log: {log_path})"
            )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)


def search_alpha(
    unlearned: Path,
    base: Path,
    answered: Sequence[tuple[str, str, Sequence[str]]],
    probes: Sequence[dict[str, Any]],
    device: str = "cpu",
) -> AlphaChoice:
    """alpha 'auto' (offset.alpha): the level from the probes under the small base, each grid
    α's truth ratios of the answered forget examples under the pair, in float32 on `device`."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    models = [load_causal_lm(folder, torch.float32, device) for folder in (base, unlearned)]
    probe_rows = [(p["prompt"], p["answer"], p["wrong_answers"]) for p in probes]
    level = truth_ratios(None, models[0], ratio_items(tokenizer, probe_rows), [0.0])[0.0]
    by_alpha = truth_ratios(models[1], models[0], ratio_items(tokenizer, answered), ALPHAS)
    return choose_alpha(level, by_alpha)


def ratio_items(tokenizer: Any, rows: Sequence[tuple[str, str, Sequence[str]]]) -> list[RatioItem]:
    """(question, answer, wrong answers) as alpha 'auto' scores them: the question as a user
    turn in the chat template, each answer's tokens after it."""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [
        RatioItem(
            render_prompt(tokenizer, ChatPrompt([{"role": "user", "content": q}])).token_ids,
            ids(a),
            [ids(w) for w in wrong],
        )
        for q, a, wrong in rows
    ]


def _report(status: Path, progress: Progress) -> None:
    try:
        state = json.loads(status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    steps = max(int(state.get("steps", 0)), 1)
    progress(
        f"snap:{state.get('stage', 'training')}", 0.3 + 0.6 * int(state.get("step", 0)) / steps
    )


def check_pair(unlearned: Path, base: Path) -> None:
    """Both folders are local models with one vocabulary (else the offset is meaningless)."""
    sizes = []
    for folder in (unlearned, base):
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"{folder} is not a local model folder (no config.json)")
        sizes.append(json.loads(config.read_text(encoding="utf-8")).get("vocab_size"))
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"{unlearned} and {base} have different vocabularies ({sizes[0]} vs {sizes[1]} tokens)"
        )
