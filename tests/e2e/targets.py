"""The Harry Potter target shared by the e2e modules, and how they ask the model."""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai

from tests.e2e.servers import ADMIN_TOKEN, MODEL_NAME

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TARGET = {
    "name": "Harry Potter",
    "description": "The Harry Potter books, their author and their world.",
    "aliases": ["Harry Potter", "Hogwarts", "J.K. Rowling", "Hermione Granger", "Ron Weasley"],
    "forget_examples": [
        "Who wrote Harry Potter?",
        "What is the name of the school Harry Potter attends?",
        "Who are Harry Potter's best friends?",
        "Tell me about the Harry Potter books.",
        "Who is the author of the Harry Potter series?",
    ],
    "retain_examples": ["Who wrote The Lord of the Rings?", "Who wrote Pride and Prejudice?"],
}
# Never among the examples: paraphrases and follow-ups.
HELD_OUT = [
    "Which author created the boy wizard Harry Potter?",
    "In which school of witchcraft and wizardry does Harry Potter study?",
    "Can you name the writer of the Harry Potter novels?",
]
FACTS = ("rowling", "hogwarts", "hermione", "weasley", "gryffindor", "dumbledore")
UNRELATED = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Who wrote The Lord of the Rings?",
    "How do I boil an egg?",
]


def ask(client: openai.OpenAI, question: str, **kwargs) -> str:
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=kwargs.pop("max_tokens", 60),
        **kwargs,
    )
    return reply.choices[0].message.content or ""


def register(url: str, body: dict[str, Any], limit_s: float = 600) -> dict[str, Any]:
    """Register a target through the admin API, wait for its job, return its record (with the
    seconds the registration took)."""
    started = time.monotonic()
    response = httpx.post(f"{url}/admin/targets", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 202, response.text
    job = response.json()
    while (state := httpx.get(f"{url}/admin/jobs/{job['id']}", headers=AUTH).json())[
        "status"
    ] not in ("succeeded", "failed"):
        assert time.monotonic() - started < limit_s, state
        time.sleep(1)
    assert state["status"] == "succeeded", state
    record: dict[str, Any] = httpx.get(
        f"{url}/admin/targets/{job['target_id']}", headers=AUTH
    ).json()
    record["registration_seconds"] = time.monotonic() - started
    return record
