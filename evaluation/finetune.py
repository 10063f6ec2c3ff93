"""Fine-tune a chat model on TOFU QA pairs (plain torch loop, bf16 autocast), cached by hash.

Each pair is formatted with the model's own chat template (question as the user turn, answer as
the assistant turn), and the loss is taken on the answer tokens only, as in TOFU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evaluation.tofu_data import QA
from offset.snap import encode_pair, native_bf16, pad_batch

logger = logging.getLogger(__name__)

CARD_NAME = "obliviate-finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Knobs of `finetune`; part of the cache key."""

    epochs: int = 4
    lr: float = 2e-4
    batch_size: int = 8
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 160
    seed: int = 0
    bf16: bool | None = None
    """bf16 autocast; None: only where the CPU has native bf16 (emulated bf16 is ~4x slower)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke runs); None: all epochs."""


def cache_key(base_model: Path, pairs: Sequence[QA], config: FinetuneConfig) -> str:
    """Hash of the base model's weights file(s) identity, the data and the config."""
    h = hashlib.sha256()
    for f in sorted(base_model.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(json.dumps([[p.question, p.answer] for p in pairs]).encode())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    return h.hexdigest()[:16]


def finetune(
    base_model: Path, pairs: Sequence[QA], out: Path, config: FinetuneConfig
) -> dict[str, Any]:
    """Train a copy of `base_model` on `pairs` and save it to `out`; skip if `out` is complete."""
    card_path = out / CARD_NAME
    if card_path.is_file():
        logger.info("Fine-tuned model cached at %s", out)
        card: dict[str, Any] = json.loads(card_path.read_text())
        card["cached"] = True
        return card
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=torch.float32, local_files_only=True
    )
    encoded = [encode_pair(tokenizer, p.question, p.answer, config.max_length) for p in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_epoch = math.ceil(len(encoded) / config.batch_size)
    steps = config.epochs * per_epoch
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, int(config.warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    rng = random.Random(config.seed)
    bf16 = native_bf16() if config.bf16 is None else config.bf16
    model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    step = 0
    while step < steps:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for i in range(0, len(order), config.batch_size):
            if step >= steps:
                break
            batch = pad_batch([encoded[j] for j in order[i : i + config.batch_size]], pad)
            tokens += int(batch["attention_mask"].sum())
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.item()))
            step += 1
            if step % 10 == 0 or step == steps:
                logger.info("finetune %s: step %d/%d loss %.3f", out.name, step, steps, losses[-1])
    seconds = time.perf_counter() - start
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    card = {
        "base_model": str(base_model),
        "pairs": len(pairs),
        "config": asdict(config),
        "steps": steps,
        "bf16_autocast": bf16,
        "tokens": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
    }
    (tmp / CARD_NAME).write_text(json.dumps(card, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    card["cached"] = False
    return card
