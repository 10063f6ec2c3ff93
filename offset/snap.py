"""SNAP trainer: SFT on obliterated answers, hard positives and world data, plus λ·SWD(θ₀, θ).

Run as `python -m offset.snap --model DIR --out DIR --name NAME --alias A --example "..."`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
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
PARTS = ("forget", "hard_positives", "world")


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


def _encode(tokenizer: Any, ex: SnapExample, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids: list[int] = tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)[
        "input_ids"
    ]
    answer_ids: list[int] = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids + [tokenizer.eos_token_id])[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id])[:max_length]
    return ids, labels


def collate(tokenizer: Any, examples: Sequence[SnapExample], max_length: int) -> Batch:
    """Right-padded input_ids, attention_mask and labels (prompt and padding are -100)."""
    encoded = [_encode(tokenizer, ex, max_length) for ex in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


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
        }
        torch.manual_seed(config.seed)
        self._generator = torch.Generator().manual_seed(config.seed)
        self.initial = snapshot_parameters(model) if config.lambda_swd > 0 else {}
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
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
            loss: Tensor = self.model(**batch).loss
        return loss.float()

    def compute_loss(self, batches: dict[str, Batch]) -> tuple[Tensor, dict[str, float]]:
        """Σ SFT over the given parts + λ·Σ SWD(θ₀, θ); also returns each term as a float."""
        total = torch.zeros((), device=self.device)
        parts: dict[str, float] = {}
        for name, batch in batches.items():
            loss = self.sft_loss(batch)
            parts[name] = loss.item()
            total = total + loss
        if self.config.lambda_swd > 0:
            swd = swd_penalty(
                self.initial,
                self.model,
                projections=self.config.swd_projections,
                max_rows=self.config.swd_max_rows,
                generator=self._generator,
            )
            parts["swd"] = swd.item()
            total = total + self.config.lambda_swd * swd
        parts["total"] = total.item()
        return total, parts

    def total_steps(self) -> int:
        """Optimizer steps `train` will take."""
        steps = self.config.epochs * math.ceil(len(self.data["forget"]) / self.config.batch_size)
        return steps if self.config.max_steps is None else min(steps, self.config.max_steps)

    def train(self) -> list[dict[str, float]]:
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
            batches = {
                name: collate(self.tokenizer, next(stream), cfg.max_length)
                for name, stream in streams.items()
            }
            self.tokens_seen += sum(int(b["attention_mask"].sum()) for b in batches.values())
            loss, parts = self.compute_loss(batches)
            self.optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.history.append({"step": float(step + 1), **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{parts['total']:.3f}", forget=f"{parts['forget']:.3f}")
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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read_lines(path: str | None) -> list[str]:
    if path is None:
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m offset.snap", description=__doc__)
    p.add_argument("--model", required=True, help="local model folder (save_pretrained)")
    p.add_argument("--out", required=True, help="folder to write the unlearned model to")
    p.add_argument("--name", required=True, help="the forget target's name")
    p.add_argument("--alias", action="append", default=[], help="another name (repeatable)")
    p.add_argument("--example", action="append", default=[], help="a prompt about the target")
    p.add_argument("--hard-positive", action="append", default=[], help="a neighbouring prompt")
    p.add_argument("--hard-positives-file", help="one hard-positive prompt per line")
    p.add_argument("--world-file", help="one general prompt per line (default: built-in list)")
    p.add_argument("--max-forget", type=int, help="use at most this many forget pairs")
    d = SnapConfig()
    p.add_argument("--lambda-swd", type=float, default=d.lambda_swd)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--swd-max-rows", type=int, default=d.swd_max_rows)
    p.add_argument("--answer-max-new-tokens", type=int, default=d.answer_max_new_tokens)
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (about 2x slower)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Build the data, train and save; the `obliviate snap train` entry point."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SnapConfig(
        lambda_swd=args.lambda_swd,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.max_steps,
        seed=args.seed,
        swd_max_rows=args.swd_max_rows,
        answer_max_new_tokens=args.answer_max_new_tokens,
        bf16=not args.no_bf16,
        progress=not args.no_progress,
    )
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        logger.error("--model %s is not a local model folder (no config.json)", folder)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    )
    forget = build_forget_set(
        args.name, args.alias, args.example, config.seed, max_pairs=args.max_forget
    )
    hard = args.hard_positive + _read_lines(args.hard_positives_file)
    world = _read_lines(args.world_file) or list(DEFAULT_WORLD_PROMPTS)
    model.eval()
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
        "data: %d forget, %d hard positives, %d world",
        len(forget),
        len(hard_pairs),
        len(world_pairs),
    )
    trainer = SnapTrainer(
        model, tokenizer, config, forget=forget, hard_positives=hard_pairs, world=world_pairs
    )
    trainer.train()
    trainer.save(
        args.out,
        target={"name": args.name, "aliases": args.alias, "examples": len(args.example)},
        base_model=str(folder.resolve()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
