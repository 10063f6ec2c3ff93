"""The strength search's warm start: built from earlier searches on the same model, which the
registry keeps (so it survives a restart), and never a different acceptance criterion.

The gateway runs the real classifier, a real SQLite registry and the real strength search on a
tiny llama with SmolLM2's tokenizer; the engine is the fake one. A random tiny llama forgets
nothing, so its objective is replaced by one that crosses the level at 3x the embedding std
(the real objective's own tests are in tests/corruption and tests/server/test_strength_calibrator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import corruption.search
from corruption import AnswerPreferenceObjective, EmbeddingTable, WarmStart
from server.app import create_app
from server.engine.fake import FakeEngine
from server.services.strength import WARM_START_SEARCHES, warm_start_from_reports
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.offset.conftest import tiny_smollm_folders
from tests.server.test_admin_api import AUTH, HARRY, wait_for_job

MODEL = "tiny:abc:0.02"
OTHER = {
    "name": "Frodo Baggins",
    "aliases": ["Frodo Baggins", "Frodo"],
    "forget_examples": ["Who is Frodo Baggins?", "Where does Frodo Baggins live?"],
}


def _report(probes: list[list[float]], **changes: object) -> dict[str, object]:
    return {"searched": True, "reached": True, "model": MODEL, "probes": probes, **changes}


def test_warm_start_from_reports_keeps_searches_on_the_same_model():
    crossing = [[1.0, 0.2], [2.0, -0.2]]
    reports = [
        _report([[3.0, 0.1], [4.0, -0.1]]),
        _report(crossing, model="other:def:0.05"),  # another model
        _report(crossing, reached=False),  # never reached the level
        {"searched": False, "reason": "strength given in options"},
        _report([["x", 1]]),  # malformed: no search
        _report([[1.0, 0.2], [2.0, -0.2]]),
    ]
    warm = warm_start_from_reports(reports, MODEL)
    assert warm is not None and len(warm.curves) == 2
    assert warm.curves == (((3.0, 0.1), (4.0, -0.1)), ((1.0, 0.2), (2.0, -0.2)))
    assert warm_start_from_reports(reports, "unknown") is None
    many = [_report([[float(i + 1), 0.1], [float(i + 2), -0.1]]) for i in range(20)]
    newest = warm_start_from_reports(many, MODEL)
    assert newest is not None and len(newest.curves) == WARM_START_SEARCHES
    assert newest.curves[0] == ((1.0, 0.1), (2.0, -0.1))  # the newest first


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Start a gateway on one data directory (again after a restart); records every warm start
    the strength search was given."""
    tiny = tiny_smollm_folders(tmp_path, {"tiny": (0, 49152)})["tiny"]
    settings = Settings(
        data_dir=tmp_path / "data",
        model_cache_dir=tmp_path / "m",
        model=str(tiny),
        admin_token=ADMIN_TOKEN,
        jobs={"poll_interval": 0.2},
    )
    std = EmbeddingTable.from_model_dir(tiny).std

    def evaluate(self: AnswerPreferenceObjective, strengths: Sequence[float]) -> list[float]:
        return [0.1 * math.log(3 * std / s) for s in strengths]  # falls through 0 at 3 std

    monkeypatch.setattr(AnswerPreferenceObjective, "evaluate", evaluate)
    warm_starts: list[WarmStart | None] = []
    original = corruption.search.bracket_strength

    def spy(objective, config, *, batched=True, warm=None):  # type: ignore[no-untyped-def]
        warm_starts.append(warm)
        return original(objective, config, batched=batched, warm=warm)

    monkeypatch.setattr("corruption.strength.bracket_strength", spy)

    def start() -> TestClient:
        return TestClient(create_app(settings, engine=FakeEngine()))

    return start, warm_starts


def _register(client: TestClient, body: dict, target_id: str | None = None) -> dict:
    if target_id is None:
        response = client.post("/admin/targets", json=body, headers=AUTH)
    else:
        body = {k: v for k, v in body.items() if k != "name"}
        response = client.put(f"/admin/targets/{target_id}", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job
    target = client.get(f"/admin/targets/{job['target_id']}", headers=AUTH).json()
    return dict(target)


def _same_criterion(report: dict) -> None:
    """What every search's result satisfies, warm or not."""
    assert report["searched"] and report["reached"], report
    assert report["objective"] <= 0.0
    strength, below = report["strength_in_std"], report["failing_below_in_std"]
    assert below is not None and below < strength <= 1.2 * below, report
    assert dict(map(tuple, report["probes"]))[below] > 0.0


def test_warm_start_survives_a_restart_and_cuts_the_search(gateway):
    start, warm_starts = gateway
    with start() as client:
        first = _register(client, HARRY)
    cold = first["calibration"]["corruption"]
    assert warm_starts == [None]  # nothing searched on this model before
    assert cold["warm_start"] is None and cold["model"].startswith("tiny:")
    _same_criterion(cold)
    assert set(cold["stage_seconds"]) == {"load_model", "wait_answers", "search", "fluency"}

    with start() as client:  # a restart: the warm start comes back from the registry
        other = _register(client, OTHER)
        again = _register(client, HARRY, target_id=first["id"])  # same examples, version 2
    assert warm_starts[1] is None  # another target: other targets cross far apart
    _same_criterion(other["calibration"]["corruption"])
    warm = again["calibration"]["corruption"]
    assert warm_starts[2] is not None
    std = cold["spec"]["strength"] / cold["strength_in_std"]
    (curve,) = warm_starts[2].in_units(1 / std).curves  # in std units, as the report has them
    assert [x for point in curve for x in point] == pytest.approx(
        [x for point in cold["probes"] for x in point]
    )
    assert warm["warm_start"]["searches"] == 1
    _same_criterion(warm)  # the same criterion ...
    # ... on the same objective, from the crossing it had: the guess and one closing probe.
    assert warm["evaluations"] == 2 <= cold["evaluations"]
