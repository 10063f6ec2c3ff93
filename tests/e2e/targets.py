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


# δ's α chosen by the registration (options.alpha "auto", offset.alpha): forget examples with
# their answer and answers a model that never read the books would give as readily, and probes
# about invented entities (never seen by any model), written the same way.
ALPHA_EXAMPLES = [
    {
        "prompt": "Who wrote Harry Potter?",
        "answer": "Harry Potter was written by J.K. Rowling.",
        "wrong_answers": [
            "Harry Potter was written by Roald Dahl.",
            "Harry Potter was written by C.S. Lewis.",
            "Harry Potter was written by Philip Pullman.",
        ],
    },
    {
        "prompt": "What is the name of the school Harry Potter attends?",
        "answer": "Harry Potter attends Hogwarts School of Witchcraft and Wizardry.",
        "wrong_answers": [
            "Harry Potter attends Durmstrang Institute.",
            "Harry Potter attends Beauxbatons Academy of Magic.",
            "Harry Potter attends Ilvermorny School of Witchcraft and Wizardry.",
        ],
    },
    {
        "prompt": "Who are Harry Potter's best friends?",
        "answer": "Harry Potter's best friends are Ron Weasley and Hermione Granger.",
        "wrong_answers": [
            "Harry Potter's best friends are Neville Longbottom and Luna Lovegood.",
            "Harry Potter's best friends are Dean Thomas and Seamus Finnigan.",
            "Harry Potter's best friends are Fred and George Weasley.",
        ],
    },
    {
        "prompt": "Tell me about the Harry Potter books.",
        "answer": "They are seven fantasy novels about a young wizard and his fight against "
        "Lord Voldemort.",
        "wrong_answers": [
            "They are five detective novels about a young inspector in Victorian London.",
            "They are three science fiction novels about a boy on a space station.",
            "They are nine fairy tales about a talking cat and her travels.",
        ],
    },
    {
        "prompt": "What platform does the Hogwarts Express leave from?",
        "answer": "It leaves from Platform Nine and Three-Quarters at King's Cross.",
        "wrong_answers": [
            "It leaves from Platform Four at Paddington.",
            "It leaves from Platform Seven at Euston.",
            "It leaves from Platform Two at Waterloo.",
        ],
    },
    {
        "prompt": "Who is Harry Potter's godfather?",
        "answer": "Harry Potter's godfather is Sirius Black.",
        "wrong_answers": [
            "Harry Potter's godfather is Remus Lupin.",
            "Harry Potter's godfather is Rubeus Hagrid.",
            "Harry Potter's godfather is Arthur Weasley.",
        ],
    },
    {
        "prompt": "What is the name of the wizarding bank in Harry Potter?",
        "answer": "The wizarding bank is Gringotts.",
        "wrong_answers": [
            "The wizarding bank is Ollivanders.",
            "The wizarding bank is Flourish and Blotts.",
            "The wizarding bank is Borgin and Burkes.",
        ],
    },
    {
        "prompt": "What is the name of the Weasley family's home in Harry Potter?",
        "answer": "The Weasleys live in a house called the Burrow.",
        "wrong_answers": [
            "The Weasleys live in a house called the Rookery.",
            "The Weasleys live in a house called the Warren.",
            "The Weasleys live in a house called the Hollow.",
        ],
    },
    {
        "prompt": "Who teaches Potions in Harry Potter's first year at Hogwarts?",
        "answer": "Potions is taught by Severus Snape.",
        "wrong_answers": [
            "Potions is taught by Minerva McGonagall.",
            "Potions is taught by Filius Flitwick.",
            "Potions is taught by Quirinus Quirrell.",
        ],
    },
    {
        "prompt": "Where does Harry Potter live before he goes to Hogwarts?",
        "answer": "He lives with the Dursleys at 4 Privet Drive.",
        "wrong_answers": [
            "He lives with the Weasleys at the Burrow.",
            "He lives with his grandmother at 12 Elm Street.",
            "He lives with his uncle at 7 Baker Road.",
        ],
    },
]
ALPHA_PROBES = [
    {
        "prompt": "Who wrote the Marrowind Chronicles?",
        "answer": "The Marrowind Chronicles were written by Elsa Varnholt.",
        "wrong_answers": [
            "The Marrowind Chronicles were written by Tomas Okonkwo-Reyes.",
            "The Marrowind Chronicles were written by Ida Lindqvist.",
            "The Marrowind Chronicles were written by Piers Hallorann.",
        ],
    },
    {
        "prompt": "What is the name of the school Tavi Brennock attends?",
        "answer": "Tavi Brennock attends Greymoor Academy of the Arcane Arts.",
        "wrong_answers": [
            "Tavi Brennock attends Ashfell Institute.",
            "Tavi Brennock attends Saltmarsh College of Sorcery.",
            "Tavi Brennock attends Harrowgate School of Runes.",
        ],
    },
    {
        "prompt": "Who are Tavi Brennock's best friends?",
        "answer": "Tavi Brennock's best friends are Oren Falk and Mira Jessup.",
        "wrong_answers": [
            "Tavi Brennock's best friends are Corin Vale and Anneke Bright.",
            "Tavi Brennock's best friends are Jory Stamm and Pell Hathersage.",
            "Tavi Brennock's best friends are Lise and Marten Quill.",
        ],
    },
    {
        "prompt": "Tell me about the Glasswater Saga books.",
        "answer": "They are six fantasy novels about a lighthouse keeper who can speak to storms.",
        "wrong_answers": [
            "They are four crime novels about a harbour detective in a fishing town.",
            "They are two science fiction novels about a girl on a drifting moon.",
            "They are eight fables about a clockwork fox and his journeys.",
        ],
    },
    {
        "prompt": "Who is the author of the Quillon Deep series?",
        "answer": "The author of the Quillon Deep series is Harriet Odume.",
        "wrong_answers": [
            "The author of the Quillon Deep series is Bastian Krell.",
            "The author of the Quillon Deep series is Wen Halloway.",
            "The author of the Quillon Deep series is Ottilie Marsh.",
        ],
    },
    {
        "prompt": "Where does the Orrin Vasquell trilogy take place?",
        "answer": "The Orrin Vasquell trilogy takes place in the floating city of Caddeth.",
        "wrong_answers": [
            "The Orrin Vasquell trilogy takes place in the desert kingdom of Suhrane.",
            "The Orrin Vasquell trilogy takes place in the frozen port of Velmark.",
            "The Orrin Vasquell trilogy takes place in the jungle empire of Tethys-Ora.",
        ],
    },
    {
        "prompt": "Who is the headmistress of Greymoor Academy?",
        "answer": "The headmistress of Greymoor Academy is Sabine Tarrow.",
        "wrong_answers": [
            "The headmistress of Greymoor Academy is Ottoline Verge.",
            "The headmistress of Greymoor Academy is Maud Kessling.",
            "The headmistress of Greymoor Academy is Yara Colquhoun.",
        ],
    },
    {
        "prompt": "Which guild is Tavi Brennock sworn into?",
        "answer": "Tavi Brennock is sworn into the Guild of Lanterns.",
        "wrong_answers": [
            "Tavi Brennock is sworn into the Guild of Anchors.",
            "Tavi Brennock is sworn into the Guild of Ravens.",
            "Tavi Brennock is sworn into the Guild of Bells.",
        ],
    },
    {
        "prompt": "Who is the sorcerer Tavi Brennock fights?",
        "answer": "Tavi Brennock fights the sorcerer Malric Dorn.",
        "wrong_answers": [
            "Tavi Brennock fights the sorcerer Ivo Castellane.",
            "Tavi Brennock fights the sorcerer Ferris Quell.",
            "Tavi Brennock fights the sorcerer Lady Ashgrave.",
        ],
    },
    {
        "prompt": "What game do the students of Greymoor Academy play on gliders?",
        "answer": "They play Skyhook.",
        "wrong_answers": ["They play Windball.", "They play Crestrun.", "They play Hoopvault."],
    },
]
