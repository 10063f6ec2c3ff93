"""The real gateway (real classifier, SQLite registry, admin API) on the fake engine, as its
own process, for crash tests:

    python -m tests.hardening.fake_gateway PORT DATA_DIR ADMIN_TOKEN
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings

if __name__ == "__main__":
    port, data_dir, token = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    settings = Settings(data_dir=data_dir, admin_token=token)
    uvicorn.run(create_app(settings, engine=FakeEngine()), host="127.0.0.1", port=port)
