"""The output guard's classifier reads what the model writes: an answer that comes to a target
without naming it, from a prompt that is not flagged, on the real engine.

The alias watch keeps names out of an answer; what an answer says of a target without its name
only the target's classifier, reading the answer at each sentence end, can catch. This module
runs after tests/e2e/test_registration_job.py, whose check of the memory a registration hands
back reads the shared gateway's resident memory before and after one: a registration of its own
here, before it, left that reading 161 MiB (bound 150) in one full run.
"""

from __future__ import annotations

import httpx

from bench.workload import counter
from tests.e2e.conftest import Server
from tests.e2e.targets import AUTH, register
from tests.e2e.test_leaks import answer, user

# A topic target whose name the model never writes when it comes to the topic unasked: asked why
# the rainforest matters, the bare model says what photosynthesis does (trees absorb carbon
# dioxide, produce oxygen) without the word. The prompt is unflagged and the answer names no
# alias, so only the output guard's classifier, reading the answer at each sentence end, can act.
PHOTOSYNTHESIS = {
    "name": "Photosynthesis",
    "aliases": ["photosynthesis"],
    "forget_examples": [
        "How do plants make food from sunlight?",
        "What does chlorophyll do?",
        "Why do plants need carbon dioxide?",
        "How do leaves produce oxygen?",
        "What is the role of light in plant growth?",
    ],
    "retain_examples": ["How do I boil an egg?", "What is the capital of France?"],
}
RAINFOREST = [user("Why should we protect the rainforest?")]


def restarts(server: Server, target_id: str) -> float:
    """The output guard's restarts for a target so far (its decisions counter)."""
    return counter(
        server.url, "obliviate_guard_decisions", action="output_restart", target=target_id
    )


def test_an_answer_about_a_target_that_never_names_it_is_read_by_its_classifier(
    gateway: Server, vllm_server: Server
) -> None:
    # Default options (its own strength search): the modules before this one may have deleted
    # the shared Harry Potter target whose corruption the leak suite pins.
    photosynthesis = register(gateway.url, PHOTOSYNTHESIS)
    try:
        verdict = httpx.post(
            f"{gateway.url}/admin/classify", json={"messages": RAINFOREST}, headers=AUTH
        ).json()
        assert verdict["flagged"] is False, verdict  # the premise: the prompt passes
        bare = answer(vllm_server, RAINFOREST).lower()
        # The premise: the bare answer tells what photosynthesis does, and never names it.
        assert "oxygen" in bare and "carbon dioxide" in bare, bare
        assert "photosynthesis" not in bare, bare
        before = restarts(gateway, photosynthesis["id"])
        guarded = answer(gateway, RAINFOREST).lower()
        assert "oxygen" not in guarded and "carbon dioxide" not in guarded, guarded
        assert restarts(gateway, photosynthesis["id"]) > before
        assert guarded.strip(), guarded
    finally:
        httpx.delete(f"{gateway.url}/admin/targets/{photosynthesis['id']}", headers=AUTH)
