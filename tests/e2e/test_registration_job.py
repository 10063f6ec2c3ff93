"""A registration job on the real engine: its stages are timed in the record, its strength search
is the bracketing one, and the model copy it loads is handed back when it ends."""

from __future__ import annotations

import threading
import time

import httpx
import psutil

from tests.e2e.conftest import Server
from tests.e2e.servers import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TARGET = {
    "name": "Sherlock Holmes",
    "aliases": ["Sherlock Holmes", "Arthur Conan Doyle", "Dr. Watson"],
    "forget_examples": [
        "Who created Sherlock Holmes?",
        "Where does Sherlock Holmes live?",
        "Who is Sherlock Holmes's friend and assistant?",
    ],
    "mode": "eco",
}


def _gateway_process(url: str) -> psutil.Process:
    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            assert conn.pid is not None
            return psutil.Process(conn.pid)
    raise AssertionError(f"nothing listens on {port}")


def _settled_rss_mib(proc: psutil.Process) -> float:
    """The process's RSS once it has been stable for a second (warm-up work may be running)."""
    last = proc.memory_info().rss
    for _ in range(60):
        time.sleep(1)
        now = proc.memory_info().rss
        if abs(now - last) < 8 * 2**20:
            return now / 2**20
        last = now
    return last / 2**20


def test_registration_reports_its_stages_and_returns_the_model_memory(gateway: Server):
    proc = _gateway_process(gateway.url)
    before = _settled_rss_mib(proc)
    samples = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(proc.memory_info().rss / 2**20)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = httpx.post(f"{gateway.url}/admin/targets", json=TARGET, headers=AUTH, timeout=60)
        assert response.status_code == 202, response.text
        job = response.json()
        deadline = time.monotonic() + 600
        while (state := httpx.get(f"{gateway.url}/admin/jobs/{job['id']}", headers=AUTH).json())[
            "status"
        ] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
    finally:
        stop.set()
        sampler.join()
    assert state["status"] == "succeeded", state
    record = httpx.get(f"{gateway.url}/admin/targets/{job['target_id']}", headers=AUTH).json()
    try:
        calibration = record["calibration"]
        assert set(calibration["stage_seconds"]) == {"classifier", "answers", "corruption"}
        corruption = calibration["corruption"]
        stages = {"load_model", "wait_answers", "search", "fluency"}  # loads while answering
        assert set(corruption["stage_seconds"]) == stages
        assert corruption["reached"] and corruption["fluent"], corruption
        # The weakest passing strength, bracketed to within 20% by a failing one.
        strength, below = corruption["strength_in_std"], corruption["failing_below_in_std"]
        assert below is not None and below < strength <= 1.2 * below, corruption
        assert corruption["objective"] <= 0.0
        assert corruption["evaluations"] == len(corruption["probes"])
        # On a CPU each round probes one strength (the pair's upper probe costs a whole one).
        assert corruption["rounds"] == corruption["evaluations"], corruption
        assert corruption["dtype"] == "float32"  # auto: the served dtype here (bf16: if native)
        # The float32 copy of the model (~540 MB) was loaded for the search and handed back.
        # The rise is taken from the lowest reading before the peak: the gateway may hand memory
        # back to the system as the job starts (seen in CI: 1948 -> 1418 MiB before the load).
        after = _settled_rss_mib(proc)
        peak_at = max(range(len(samples)), key=samples.__getitem__)
        trough = min(samples[: peak_at + 1])
        figures = (before, trough, samples[peak_at], after)
        assert samples[peak_at] - trough > 300, figures
        assert samples[peak_at] - after > 300, figures
        assert after - before < 150, figures
    finally:
        httpx.delete(f"{gateway.url}/admin/targets/{record['id']}", headers=AUTH)
