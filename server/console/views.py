"""Pure helpers that turn API objects into what the console's templates show."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.protocol.common import ChatMessageParam

ROLES = ("system", "user", "assistant", "tool")
ANSWER_SEPARATOR = " => "

# Registration stages in the order a job runs them (server.services.targets), by mode.
_STAGES = {
    "classifier": "Train the classifier and calibrate its threshold",
    "answers": "Take the model's current answers",
    "corruption": "Search the corruption strength",
    "snap": "Train the small unlearned model (SNAP)",
    "activate": "Store and activate",
}
_MODE_STAGES = {
    "eco": ("classifier", "answers", "corruption", "activate"),
    "delta": ("classifier", "snap", "activate"),
    "eco+delta": ("classifier", "answers", "corruption", "snap", "activate"),
}


# --- formatting filters ---------------------------------------------------------------------


def pct(value: Any, digits: int = 1) -> str:
    return f"{float(value) * 100:.{digits}f}%" if isinstance(value, int | float) else "–"


def num(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, int | float) else "–"


def utc(value: datetime) -> datetime:
    """Registry times are UTC; SQLite gives them back without a zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def when(value: datetime | None) -> str:
    return utc(value).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "–"


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    s = int(round(value))
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min" if s % 60 == 0 else f"{s // 60} min {s % 60:02d} s"


FILTERS: dict[str, Callable[..., str]] = {"pct": pct, "num": num, "when": when, "seconds": seconds}


# --- targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """A target's calibration figures, as the targets table shows them."""

    fpr_target: float | None
    heldout_recall: float | None
    heldout_fpr: float | None
    strength: float | None
    strength_in_std: float | None
    method: str | None
    searched: bool | None


def figures(calibration: Mapping[str, Any] | None) -> Figures:
    calibration = calibration or {}
    classifier = calibration.get("classifier") or {}
    corruption = calibration.get("corruption") or {}
    spec = corruption.get("spec") or {}
    return Figures(
        fpr_target=classifier.get("fpr_target"),
        heldout_recall=classifier.get("heldout_recall"),
        heldout_fpr=classifier.get("heldout_fpr"),
        strength=spec.get("strength"),
        strength_in_std=corruption.get("strength_in_std"),
        method=spec.get("method"),
        searched=corruption.get("searched"),
    )


# --- jobs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    name: str
    label: str
    state: str
    """done, current, failed or todo."""
    detail: str = ""


def job_stages(mode: str, stage: str, status: str) -> list[Stage]:
    """The stages of a registration in order, each marked done, current, failed or todo."""
    names = _MODE_STAGES.get(mode, tuple(_STAGES))
    current, _, detail = stage.partition(":")  # e.g. "snap:training"
    if status == "succeeded":
        return [Stage(n, _STAGES[n], "done") for n in names]
    at = names.index(current) if current in names else (-1 if status == "queued" else 0)
    out = []
    for i, n in enumerate(names):
        if i < at:
            state = "done"
        elif i == at:
            state = "failed" if status == "failed" else "current"
        else:
            state = "todo"
        out.append(Stage(n, _STAGES[n], state, detail if i == at else ""))
    return out


# --- playground -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    text: str
    targets: tuple[str, ...]
    """Names of the targets whose spans cover this piece (empty: plain text)."""


def highlight(text: str, spans: Sequence[tuple[int, int, str]]) -> list[Segment]:
    """Cut `text` at every span border; each piece lists the targets whose spans cover it."""
    cuts = sorted({0, len(text), *(max(0, min(len(text), p)) for s in spans for p in s[:2])})
    out = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a == b:
            continue
        names = tuple(dict.fromkeys(name for s, e, name in spans if s <= a and b <= e))
        out.append(Segment(text[a:b], names))
    return out


_TURN = re.compile(r"^(system|user|assistant|tool)\s*:\s?(.*)$", re.IGNORECASE)


def parse_conversation(text: str) -> list[ChatMessageParam]:
    """What an operator pasted: a JSON list of OpenAI messages, `role: text` turns, or a prompt.

    A line starting with `user:`, `assistant:`, `system:` or `tool:` opens a turn, the lines
    after it belong to that turn; text without such a line is one user turn. ValueError for JSON
    that is not a list of {role, content} messages.
    """
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from e
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in data
        ):
            raise ValueError('give a JSON list of {"role": ..., "content": "..."} messages')
        return [{"role": m["role"], "content": m["content"]} for m in data]
    turns: list[ChatMessageParam] = []
    for line in stripped.splitlines():
        match = _TURN.match(line)
        if match:
            turns.append({"role": match.group(1).lower(), "content": match.group(2)})
        elif turns:
            turns[-1]["content"] += "\n" + line
        else:
            turns.append({"role": "user", "content": line})
    for turn in turns:
        turn["content"] = turn["content"].strip()
    return turns


def parse_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_examples(text: str) -> list[str | dict[str, str]]:
    """One forget example a line; `prompt => answer` gives the answer the model knows today."""
    out: list[str | dict[str, str]] = []
    for line in parse_lines(text):
        prompt, sep, answer = line.partition(ANSWER_SEPARATOR)
        out.append({"prompt": prompt.strip(), "answer": answer.strip()} if sep else line)
    return out


# --- activity -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: int
    label: str


def bars(
    values: Sequence[int], labels: Sequence[str], *, width: float, height: float, top: int
) -> list[Bar]:
    """Bar geometry for a small SVG chart of `values`, scaled so `top` fills the height."""
    if not values:
        return []
    step = width / len(values)
    out = []
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        h = 0.0 if top <= 0 else height * v / top
        if v > 0:
            h = max(h, 2.0)  # one request stays visible next to hundreds
        out.append(Bar(i * step + 1, height - h, max(step - 2, 1.0), h, v, label))
    return out
