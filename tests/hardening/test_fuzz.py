"""Schemathesis against the gateway's own OpenAPI schema, every route, on the fake engine: no
5xx, and every error is the OpenAI envelope. Bounded (FUZZ_EXAMPLES per route).

The app runs under uvicorn in a thread of this process (one lifespan for the whole module, real
HTTP on 127.0.0.1); the admin routes get the bearer token.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.e2e.servers import free_port

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))

_root = Path(tempfile.mkdtemp(prefix="obliviate-fuzz-"))
atexit.register(shutil.rmtree, _root, True)
app = create_app(
    Settings(
        data_dir=_root / "data",
        model_cache_dir=_root / "models",
        admin_token=ADMIN_TOKEN,
    ),
    engine=FakeEngine(),
)
schema = schemathesis.openapi.from_dict(app.openapi())
schema.config.generation.update(modes=list(schemathesis.GenerationMode))
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=60)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_5xx_and_every_error_is_the_envelope(case: schemathesis.Case, base_url: str) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = "fake-model"  # get past the model check to the deeper paths
    response = case.call(base_url=base_url, headers=AUTH, timeout=120)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert isinstance(body, dict) and set(body) == {"error"}, where
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
        assert isinstance(error["type"], str), where
        assert error["param"] is None or isinstance(error["param"], str), where
        assert error["code"] is None or isinstance(error["code"], str), where
