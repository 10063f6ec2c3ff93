"""SNAP trainer: SFT on obliterated answers, hard positives and world data, plus λ·SWD(θ₀, θ),
plus NPO on documents to forget (answers the model gives today) when there are any.

Run as `obliviate snap train --model DIR --out DIR --name NAME --alias A --example "..."`
(or `python -m offset.snap` with the same flags).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor
from tqdm import tqdm

from .snap_data import (
    DEFAULT_WORLD_PROMPTS,
    SnapExample,
    answer_prompts,
    build_forget_set,
    chat_prompt,
)
from .swd import snapshot_parameters, swd_penalty

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]
PARTS = ("forget", "hard_positives", "world", "documents")


@dataclass(frozen=True)
class SnapConfig:
    """Knobs of `SnapTrainer`; the defaults are the SNAP reference's where it has one."""

    lambda_swd: float = 0.1
    """Weight of Σ SWD(θ₀, θ) in the loss (0 turns the regulariser off)."""
    lr: float = 1e-5
    epochs: int = 3
    """Passes over the forget set; hard positives and world data are cycled alongside."""
    batch_size: int = 8
    """Examples per part per step (a step sees one batch of each of the three parts)."""
    max_length: int = 128
    """Tokens per example (prompt with chat template + answer), longer ones are truncated."""
    seed: int = 0
    bf16: bool = True
    """Run forward passes under CPU/GPU bfloat16 autocast; weights stay float32."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (quick runs); None: all epochs."""
    swd_projections: int = 100
    swd_max_rows: int | None = None
    """Compare a random subset of this many rows per matrix (None: all rows, the reference)."""
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    answer_max_new_tokens: int = 48
    """Length of the base model's own answers to hard-positive and world prompts."""
    save_dtype: str = "bfloat16"
    progress: bool = True
    npo_beta: float = 0.1
    """β of the NPO term on documents (Zhang et al. 2024): the loss (2/β)·log(1 + (π_θ/π₀)^β)
    pushes each document's likelihood below the initial model's and fades as it gets there."""
    train_vocab: bool = True
    """Also train the input embedding and the LM head. False freezes them: with a 150k-token
    vocabulary they hold 43% of a 0.5B model's weights, and their gradients, optimizer state
    and θ₀ copy take ~4 GB of its ~16 GB training peak (float32 AdamW)."""


def encode_pair(
    tokenizer: Any, prompt: str, answer: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt + answer + EOS, and labels masking the prompt."""
    prompt_ids: list[int] = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)[
        "input_ids"
    ]
    answer_ids: list[int] = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id])[:max_length]
    return ids, labels


def pad_batch(encoded: Sequence[tuple[list[int], list[int]]], pad: int) -> Batch:
    """Right-padded input_ids, attention_mask and labels (padding is -100) of encoded pairs."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate(tokenizer: Any, examples: Sequence[SnapExample], max_length: int) -> Batch:
    """Right-padded input_ids, attention_mask and labels (prompt and padding are -100)."""
    encoded = [encode_pair(tokenizer, ex.prompt, ex.answer, max_length) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_batch(encoded, pad)


_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
"""Config fields of architectures whose logits are not a plain LM head over the last states."""


def _answer_logits(model: Any, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """The logits at the positions that predict an answer token (N, V) in float32, those tokens
    (N,) and the row each comes from (N,); N = labelled tokens in the batch.

    The LM head is applied only at those positions: with a 150k-token vocabulary the full
    (B, T, V) logits and their gradient were most of a training step's memory, for tokens the
    loss then masks out. Architectures that post-process their logits run the whole model.
    """
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != -100  # (B, T-1)
    head = model.get_output_embeddings()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if head is None or any(getattr(model.config, k, None) for k in _HEAD_EXTRAS):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]  # (N, V)
    else:
        states = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        logits = head(states[:, :-1][keep])  # (N, V)
    rows = keep.nonzero()[:, 0]  # (N,)
    return logits.float(), targets[keep], rows


def answer_loss(model: Any, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens of a batch (the figure
    `model(**batch).loss` gives, with the LM head applied to the answer positions only)."""
    logits, tokens, _ = _answer_logits(model, batch)
    return F.cross_entropy(logits, tokens)


def answer_logprobs(model: Any, batch: Batch) -> Tensor:
    """log π(answer | prompt) of each row: its labelled tokens' log-probabilities summed (B,)."""
    logits, tokens, rows = _answer_logits(model, batch)
    token_logps = -F.cross_entropy(logits, tokens, reduction="none")  # (N,)
    sums = torch.zeros(batch["labels"].shape[0], device=token_logps.device)  # (B,)
    return sums.index_add(0, rows, token_logps)


def npo_loss(logps: Tensor, initial_logps: Tensor, beta: float) -> Tensor:
    """Negative preference optimisation: mean over rows of (2/β)·log(1 + (π_θ/π₀)^β), from
    log π_θ (B,) and log π₀ (B,) of each document. Unlike gradient ascent it is bounded: the
    gradient shrinks as π_θ falls below π₀, so the model is not driven to gibberish."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logps - initial_logps)).mean()


def _cycle(
    examples: Sequence[SnapExample], size: int, rng: random.Random
) -> Iterator[list[SnapExample]]:
    while True:
        order = list(examples)
        rng.shuffle(order)
        for i in range(0, len(order), size):
            yield order[i : i + size]


class SnapTrainer:
    """Fine-tunes `model` in place with the SNAP loss; `train` then `save`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: SnapConfig,
        *,
        forget: Sequence[SnapExample],
        hard_positives: Sequence[SnapExample] = (),
        world: Sequence[SnapExample] = (),
        documents: Sequence[SnapExample] = (),
    ) -> None:
        if not forget:
            raise ValueError("the forget set is empty")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.data = {
            "forget": list(forget),
            "hard_positives": list(hard_positives),
            "world": list(world),
            "documents": list(documents),
        }
        torch.manual_seed(config.seed)
        if not config.train_vocab:
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                if layer is not None:
                    layer.weight.requires_grad_(False)
        self._generator = torch.Generator().manual_seed(config.seed)
        self.initial = snapshot_parameters(model) if config.lambda_swd > 0 else {}
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.initial_logps = self._initial_logps(self.data["documents"])
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.tokens_seen = 0

    @property
    def device(self) -> torch.device:
        """Device of the model being trained."""
        return next(self.model.parameters()).device  # type: ignore[no-any-return]

    def sft_loss(self, batch: Batch) -> Tensor:
        """Mean next-token cross-entropy over the answer tokens of a batch."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            loss = answer_loss(self.model, batch)
        return loss.float()

    def _initial_logps(self, documents: Sequence[SnapExample]) -> dict[SnapExample, float]:
        """log π₀(answer | prompt) of each document under the untrained model (NPO's π₀)."""
        found: dict[SnapExample, float] = {}
        self.model.eval()
        size = self.config.batch_size
        with torch.no_grad():
            for i in range(0, len(documents), size):
                chunk = documents[i : i + size]
                logps = self.answer_logprobs(collate(self.tokenizer, chunk, self.config.max_length))
                found.update(zip(chunk, logps.tolist(), strict=True))
        return found

    def answer_logprobs(self, batch: Batch) -> Tensor:
        """log π_θ(answer | prompt) of each row of a batch (B,), in float32."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            logps = answer_logprobs(self.model, batch)
        return logps.float()

    def npo_loss(self, batch: Batch, documents: Sequence[SnapExample]) -> Tensor:
        """The NPO term on a batch of `documents` (collated), against their log π₀ taken before
        training."""
        initial = torch.tensor([self.initial_logps[d] for d in documents], device=self.device)
        return npo_loss(self.answer_logprobs(batch), initial, self.config.npo_beta)

    def swd(self) -> Tensor:
        """Σ SWD(θ₀, θ) over the trained matrices (unweighted; the loss adds λ times it)."""
        return swd_penalty(
            self.initial,
            self.model,
            projections=self.config.swd_projections,
            max_rows=self.config.swd_max_rows,
            generator=self._generator,
        )

    def accumulate_gradients(self, batches: dict[str, list[SnapExample]]) -> dict[str, float]:
        """Add the gradient of Σ SFT over the parts + NPO on the documents + λ·SWD(θ₀, θ) to
        the parameters' grads, one term at a time; returns each term (SWD unweighted) and the
        total as floats.

        The loss is a sum, so back-propagating each part as soon as it is computed gives the
        same gradient as the summed loss while holding one part's activations at a time
        instead of all of them.
        """
        parts: dict[str, float] = {}
        total = 0.0
        for name, examples in batches.items():
            batch = collate(self.tokenizer, examples, self.config.max_length)
            self.tokens_seen += int(batch["attention_mask"].sum())
            loss = self.npo_loss(batch, examples) if name == "documents" else self.sft_loss(batch)
            torch.autograd.backward(loss)
            parts[name] = loss.item()
            total += parts[name]
        if self.config.lambda_swd > 0:
            swd = self.swd()
            torch.autograd.backward(self.config.lambda_swd * swd)
            parts["swd"] = swd.item()
            total += self.config.lambda_swd * parts["swd"]
        parts["total"] = total
        return parts

    def total_steps(self) -> int:
        """Optimizer steps `train` will take."""
        longest = max(len(self.data["forget"]), len(self.data["documents"]))
        steps = self.config.epochs * math.ceil(longest / self.config.batch_size)
        return steps if self.config.max_steps is None else min(steps, self.config.max_steps)

    def train(self, on_step: Callable[[int], None] | None = None) -> list[dict[str, float]]:
        """Run all steps; returns the per-step losses (also kept in `history`)."""
        cfg = self.config
        rng = random.Random(cfg.seed)
        streams = {
            name: _cycle(examples, cfg.batch_size, rng)
            for name, examples in self.data.items()
            if examples
        }
        steps = self.total_steps()
        self.model.train()
        start = time.perf_counter()
        bar = tqdm(total=steps, desc="snap", unit="step", disable=not cfg.progress)
        for step in range(steps):
            batches = {name: next(stream) for name, stream in streams.items()}
            self.optimizer.zero_grad(set_to_none=True)
            parts = self.accumulate_gradients(batches)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.history.append({"step": float(step + 1), **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.3f}", forget=f"{parts['forget']:.3f}")
            if on_step is not None:
                on_step(step + 1)
        bar.close()
        self.model.eval()
        self.optimizer.zero_grad(set_to_none=True)
        self.train_seconds += time.perf_counter() - start
        logger.info(
            "SNAP: %d steps, %d tokens in %.1f s (%.0f tokens/s)",
            steps,
            self.tokens_seen,
            self.train_seconds,
            self.tokens_seen / max(self.train_seconds, 1e-9),
        )
        return self.history

    def training_card(self, **extra: Any) -> dict[str, Any]:
        """What was trained, on what, how, and with which versions (JSON-serialisable)."""
        return {
            "schema_version": 1,
            "method": "snap",
            **extra,
            "data": {name: len(examples) for name, examples in self.data.items()},
            "config": asdict(self.config),
            "steps": len(self.history),
            "losses": self.history,
            "train_seconds": round(self.train_seconds, 2),
            "tokens": self.tokens_seen,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "obliviate": _version("obliviate"),
            },
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def save(self, out_dir: str | Path, **card: Any) -> Path:
        """Write the model (in `save_dtype`), the tokenizer and `training_card.json`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, self.config.save_dtype)
        # A cast copy (not a state_dict) so the config records the dtype and ties stay tied.
        copy.deepcopy(self.model).to(dtype).save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        text = json.dumps(self.training_card(**card), indent=2, default=str)
        (out / "training_card.json").write_text(text + "\n", encoding="utf-8")
        logger.info("saved the SNAP model to %s", out)
        return out


def native_bf16(device: str | None = None) -> bool:
    """Whether bf16 pays off on `device` ("cpu", "cuda"; None: the GPU if there is one, else the
    CPU): a GPU, or a CPU with avx512_bf16 / amx_bf16 (on other CPUs bf16 is emulated, measured
    5x slower than float32)."""
    if device != "cpu" and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read_lines(path: Path | None) -> list[str]:
    if path is None:
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


_DEFAULTS = SnapConfig()


class SnapJob(BaseModel):
    """Train a SNAP-unlearned copy of a small model for one forget target and save it."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    model: Path
    """Local model folder to start from (saved with save_pretrained; no hub downloads)."""
    out: Path
    """Folder to write the unlearned model and its training_card.json to."""
    name: str
    """The forget target's name."""
    alias: list[str] = []
    """Another name the target goes by (repeatable)."""
    example: list[str] = []
    """A prompt about the target (repeatable); added to the templated forget prompts."""
    hard_positive: list[str] = []
    """A prompt about a neighbouring entity the model must keep answering (repeatable)."""
    hard_positives_file: Path | None = None
    """One hard-positive prompt per line."""
    world_file: Path | None = None
    """One general prompt per line (default: a built-in list)."""
    documents_file: Path | None = None
    """JSON lines {"prompt": ..., "answer": ...}: answers the model gives today that it must
    stop giving (the records to delete, Q&A about the target); trained on with NPO."""
    max_forget: int | None = None
    """Use at most this many forget pairs."""
    lambda_swd: float = _DEFAULTS.lambda_swd
    """Weight of the sliced Wasserstein distance to the initial weights."""
    lr: float = _DEFAULTS.lr
    epochs: int = _DEFAULTS.epochs
    batch_size: int = _DEFAULTS.batch_size
    max_length: int = _DEFAULTS.max_length
    max_steps: int | None = _DEFAULTS.max_steps
    seed: int = _DEFAULTS.seed
    swd_max_rows: int | None = _DEFAULTS.swd_max_rows
    answer_max_new_tokens: int = _DEFAULTS.answer_max_new_tokens
    npo_beta: float = _DEFAULTS.npo_beta
    bf16: bool = _DEFAULTS.bf16
    """bfloat16 autocast for the forward passes (about 2x faster than float32 on a CPU)."""
    train_vocab: bool = _DEFAULTS.train_vocab
    """Also train the embedding and LM head (--no-train-vocab freezes them: less memory)."""
    progress: bool = True
    """Show a progress bar."""
    status_file: Path | None = None
    """Write {"stage", "step", "steps"} JSON here as training goes (for job runners)."""

    def config(self) -> SnapConfig:
        return SnapConfig(
            lambda_swd=self.lambda_swd,
            lr=self.lr,
            epochs=self.epochs,
            batch_size=self.batch_size,
            max_length=self.max_length,
            max_steps=self.max_steps,
            seed=self.seed,
            swd_max_rows=self.swd_max_rows,
            answer_max_new_tokens=self.answer_max_new_tokens,
            npo_beta=self.npo_beta,
            bf16=self.bf16,
            progress=self.progress,
            train_vocab=self.train_vocab,
        )

    def cli_cmd(self) -> None:
        try:
            run_snap(self)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from e


def write_documents(path: Path, documents: Sequence[tuple[str, str]]) -> Path:
    """Write (prompt, answer) pairs as the JSON-lines file `--documents-file` reads."""
    rows = (json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in documents)
    path.write_text("".join(rows), encoding="utf-8")
    return path


def read_documents(path: Path | None) -> list[SnapExample]:
    """The documents of a JSON-lines file ({"prompt": str, "answer": str} per line)."""
    if path is None:
        return []
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            documents.append(SnapExample(str(row["prompt"]), str(row["answer"])))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{path}:{number}: not a {{"prompt", "answer"}} object') from e
    return documents


def _status(path: Path | None, stage: str, step: int = 0, steps: int = 0) -> None:
    if path is not None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stage": stage, "step": step, "steps": steps}), "utf-8")
        tmp.replace(path)


def run_snap(job: SnapJob) -> Path:
    """Build the data, train and save; returns the output folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = job.model
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder} is not a local model folder (no config.json)")
    config = job.config()
    documents = read_documents(job.documents_file)
    _status(job.status_file, "loading")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    forget = build_forget_set(
        job.name, job.alias, job.example, config.seed, max_pairs=job.max_forget
    )
    hard = job.hard_positive + _read_lines(job.hard_positives_file)
    world = _read_lines(job.world_file) or list(DEFAULT_WORLD_PROMPTS)
    model.eval()
    _status(job.status_file, "answers")
    hard_pairs, world_pairs = (
        answer_prompts(
            model,
            tokenizer,
            prompts,
            max_new_tokens=config.answer_max_new_tokens,
            batch_size=config.batch_size,
        )
        for prompts in (hard, world)
    )
    logger.info(
        "data: %d forget, %d hard positives, %d world, %d documents",
        len(forget),
        len(hard_pairs),
        len(world_pairs),
        len(documents),
    )
    trainer = SnapTrainer(
        model,
        tokenizer,
        config,
        forget=forget,
        hard_positives=hard_pairs,
        world=world_pairs,
        documents=documents,
    )
    steps = trainer.total_steps()
    started = time.perf_counter()

    def on_step(step: int) -> None:
        _status(job.status_file, "training", step, steps)
        if step == steps or step % max(1, steps // 10) == 0:
            logger.info("step %d/%d, %.0f s", step, steps, time.perf_counter() - started)

    trainer.train(on_step=on_step)
    _status(job.status_file, "saving", steps, steps)
    return trainer.save(
        job.out,
        target={"name": job.name, "aliases": job.alias, "examples": len(job.example)},
        base_model=str(folder.resolve()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m offset.snap` (the same command as `obliviate snap train`)."""
    from pydantic_settings import CliApp, CliSettingsSource

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source: CliSettingsSource[Any] = CliSettingsSource(
        SnapJob,  # type: ignore[arg-type]  # a plain model works; the stub asks for settings
        cli_prog_name="python -m offset.snap",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )
    job = CliApp.run(
        SnapJob,
        cli_args=list(sys.argv[1:] if argv is None else argv),
        cli_settings_source=source,
        cli_cmd_method_name="_no_cmd",
    )
    try:
        run_snap(job)
    except (FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
