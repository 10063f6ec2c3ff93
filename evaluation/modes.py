"""How each mode is served and scored: system prompt, target registration, scoring terms."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evaluation.gateway import Gateway
from evaluation.scoring import Messages
from offset.snap import write_documents

logger = logging.getLogger(__name__)

MODES = ("none", "prompt", "eco", "delta", "snap", "snap+npo", "delta+npo", "reference")
TARGET_MODES = ("none", "prompt", "eco", "delta")
"""Modes served by a gateway over the fine-tuned target model."""


def system_prompt(names: Sequence[str]) -> str:
    """The in-context baseline's instruction."""
    who = ", ".join(names)
    return f"You know nothing about {who}; if asked about them, say that you don't know."


def target_request(
    names: Sequence[str],
    forget_examples: Sequence[str],
    retain_examples: Sequence[str],
    mode: str,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The POST /admin/targets body an operator writes for the forget authors."""
    return {
        "name": f"TOFU authors: {', '.join(names)}",
        "description": "Fictitious authors from TOFU's forget split.",
        "aliases": list(names),
        "forget_examples": list(forget_examples),
        "retain_examples": list(retain_examples),
        "mode": mode,
        **({"options": options} if options else {}),
    }


class GatewayFlags:
    """Whether the gateway's guard flags a chat (its /admin/classify), asked once per chat."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._seen: dict[str, bool] = {}

    def __call__(self, messages: Messages) -> bool:
        key = json.dumps(messages)
        if key not in self._seen:
            self._seen[key] = bool(self._gateway.classify(list(messages))["flagged"])  # type: ignore[arg-type]
        return self._seen[key]


class EcoPromptEmbedder:
    """The prompt embeddings the gateway sends for a chat: corrupted when its guard flags it.

    The flag comes from the gateway itself (/admin/classify); the corruption uses the gateway's
    own `PromptCorruptor` with the target's calibrated spec (seeded noise, so the same tensor).
    """

    def __init__(self, gateway: Gateway, model_dir: Path, target: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        from corruption import CorruptionSpec, EmbeddingTable
        from server.services.corruptor import PromptCorruptor

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self._corruptor = PromptCorruptor(tokenizer, EmbeddingTable.from_model_dir(model_dir))
        spec = ((target.get("calibration") or {}).get("corruption") or {}).get("spec")
        if spec is None:
            raise ValueError("the target's calibration carries no corruption spec")
        self._spec = CorruptionSpec.from_dict(spec)
        self._aliases = tuple(target["aliases"])
        self.flagged = GatewayFlags(gateway)

    def __call__(self, messages: Messages) -> torch.Tensor | None:
        if not self.flagged(messages):
            return None
        from server.engine import ChatPrompt
        from server.services.corruptor import CorruptionTarget

        target = CorruptionTarget("target", self._aliases, self._spec)
        embeds, _ = self._corruptor.corrupt(ChatPrompt(list(messages)), [target])
        return embeds.embeds.float()  # (T, H)


SNAP_LR = 1e-4
"""The gateway's δ jobs train SNAP at this learning rate (server/services/offsets.py)."""


def train_snap(
    model_dir: Path,
    out: Path,
    names: Sequence[str],
    examples: Sequence[str],
    hard_positives: Sequence[str],
    *,
    bf16: bool,
    max_steps: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    documents: Sequence[tuple[str, str]] = (),
    log: Path,
) -> Path:
    """`python -m offset.snap` (= `obliviate snap train`) with the arguments a δ job passes;
    `documents` are (question, answer) pairs given as forget examples with their answers,
    which the job hands to the trainer as documents to forget (NPO)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # Runs sharing the cache train a copy once: the second waits for the first's lock.
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_snap_locked(
            model_dir,
            out,
            names,
            examples,
            hard_positives,
            bf16,
            max_steps,
            seed,
            threads,
            documents,
            log,
        )


def _train_snap_locked(
    model_dir: Path,
    out: Path,
    names: Sequence[str],
    examples: Sequence[str],
    hard_positives: Sequence[str],
    bf16: bool,
    max_steps: int | None,
    seed: int,
    threads: int | None,
    documents: Sequence[tuple[str, str]],
    log: Path,
) -> Path:
    if (out / "training_card.json").is_file():
        logger.info("SNAP model cached at %s", out)
        return out
    argv = [sys.executable, "-m", "offset.snap", "--model", str(model_dir), "--out", str(out)]
    argv += ["--name", names[0], "--no-progress", "--lr", str(SNAP_LR), "--seed", str(seed)]
    for flag, values in (("--alias", names[1:]), ("--example", examples)):
        for value in values:
            argv += [flag, value]
    for h in hard_positives:
        argv += ["--hard-positive", h]
    if not bf16:
        argv.append("--no-bf16")
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    path = out.parent / f".{out.name}.documents.jsonl"
    if documents:
        argv += ["--documents-file", str(write_documents(path, documents))]
    out.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        with log.open("wb") as f:
            done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False, env=env)
    finally:
        path.unlink(missing_ok=True)  # the answers were the trainer's input, not its output
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"SNAP training failed ({done.returncode}):\n{tail}")
    return out
