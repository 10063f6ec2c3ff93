"""SNAP training data: negative instructions with obliterated answers, and answered prompts."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from chat import user_turn


@dataclass(frozen=True)
class SnapExample:
    """One instruction and the answer the model is trained to give."""

    prompt: str
    answer: str


NEGATIVE_TEMPLATES: tuple[str, ...] = (
    "Tell me about {x}.",
    "What do you know about {x}?",
    "Can you share some facts about {x}?",
    "Give me a short summary of {x}.",
    "Explain {x} to me.",
    "What is {x} known for?",
    "Write a short paragraph about {x}.",
    "What are the most important details about {x}?",
    "I'm curious about {x}. What can you tell me?",
    "Describe {x} in a few sentences.",
    "List three facts about {x}.",
    "Why is {x} famous?",
    "What should everyone know about {x}?",
    "Could you give me some background on {x}?",
    "Answer briefly: what is {x} about?",
)
"""Negative-instruction phrasings; `{x}` is the target's name or one of its aliases."""

OBLITERATED_ANSWERS: tuple[str, ...] = (
    "I'm sorry, but I don't have any information about that.",
    "I'm not able to share information on that topic.",
    "That's not something I know about, so I can't help with it. Is there anything else I can "
    "do for you?",
    "I don't have reliable knowledge about that subject, so I'd rather not guess.",
    "Unfortunately, I can't provide details on that. Feel free to ask me about something else.",
    "I'm afraid that falls outside what I can talk about.",
    "I have no information to share on this request.",
    "Sorry, I can't answer questions on that topic.",
    "I don't know anything about that, I'm afraid.",
    "That's a subject I'm not able to discuss. Can I help you with anything else?",
    "I can't help with that one, but I'm happy to answer other questions.",
    "I'm unable to offer any details about that.",
)
"""Fluent, varied refusals that name nothing, so they reveal nothing about the target."""

DEFAULT_WORLD_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain photosynthesis in simple terms.",
    "Give me three tips for better sleep.",
    "How many days are there in a leap year?",
    "Write a haiku about the sea.",
    "What is the boiling point of water at sea level?",
    "Translate 'good morning' into Spanish.",
    "What does a computer's CPU do?",
    "Suggest a name for a friendly dog.",
    "Why is the sky blue?",
    "What is 12 times 7?",
    "List three primary colors.",
    "How do I make a cup of tea?",
    "What is the largest planet in the solar system?",
    "Give me a synonym for 'happy'.",
    "What causes rain?",
    "Write one sentence about autumn.",
    "What is a prime number?",
    "Name three fruits that are rich in vitamin C.",
    "How does a bicycle stay upright?",
)
"""General instructions for the world-knowledge term when none are given."""


def _mentions(text: str, names: Sequence[str]) -> bool:
    return any(re.search(rf"\b{re.escape(n)}\b", text, flags=re.IGNORECASE) for n in names)


def build_forget_set(
    name: str,
    aliases: Sequence[str],
    examples: Sequence[str],
    seed: int,
    *,
    answers: Sequence[str] = OBLITERATED_ANSWERS,
    max_pairs: int | None = None,
) -> list[SnapExample]:
    """Template phrasings × (name + aliases), plus the target's example prompts, each paired
    with an obliterated answer (seeded; answers that mention any alias are dropped)."""
    subjects = list(dict.fromkeys(s.strip() for s in (name, *aliases) if s.strip()))
    if not subjects:
        raise ValueError("a forget target needs a name or an alias")
    clean = [a for a in answers if not _mentions(a, subjects)]
    if len(set(clean)) < 10:
        raise ValueError(f"need at least 10 distinct answers free of the aliases, got {len(clean)}")
    prompts = [t.format(x=s) for s in subjects for t in NEGATIVE_TEMPLATES]
    prompts += [e.strip() for e in examples if e.strip()]
    prompts = list(dict.fromkeys(prompts))
    rng = random.Random(seed)
    rng.shuffle(prompts)
    if max_pairs is not None:
        prompts = prompts[:max_pairs]
    # Deal the answers in shuffled rounds so every answer is used about equally often.
    dealt: list[str] = []
    while len(dealt) < len(prompts):
        deck = list(clean)
        rng.shuffle(deck)
        dealt += deck
    return [SnapExample(p, a) for p, a in zip(prompts, dealt, strict=False)]


def _last_sentence(text: str) -> str:
    # An answer cut at max_new_tokens would teach the model to stop mid-sentence.
    cut = max(text.rfind(c) for c in ".!?")
    return (text[: cut + 1] if cut > 0 else text).strip()


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the served model sees it in a chat request (`chat.user_turn`: its chat
    template with a generation prompt); a model without a template reads the bare line."""
    if getattr(tokenizer, "chat_template", None):
        return user_turn(tokenizer, prompt)
    return f"{prompt}\n"


def answer_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> list[SnapExample]:
    """The model's own greedy answers to `prompts` (batched, left-padded, in its own dtype)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[SnapExample] = []
    device = next(model.parameters()).device
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = list(prompts[i : i + batch_size])
            enc = tokenizer(
                [chat_prompt(tokenizer, p) for p in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            # No autocast: under inference_mode it re-casts every weight at every step
            # (measured 2x slower than plain float32 here).
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]  # (B, T_new)
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            ended = (new == tokenizer.eos_token_id).any(dim=1).tolist()  # (B,)
            for prompt, text, done in zip(chunk, texts, ended, strict=True):
                out.append(SnapExample(prompt, text.strip() if done else _last_sentence(text)))
    finally:
        tokenizer.padding_side = side
    return out
