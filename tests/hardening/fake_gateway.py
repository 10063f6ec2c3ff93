"""The real gateway (real classifier, real registry, admin API) on the fake engine, as its own
process, for crash tests:

    python -m tests.hardening.fake_gateway PORT DATA_DIR ADMIN_TOKEN [--registry-url URL]
        [--lease-seconds S] [--job-poll S] [--registry-poll S]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("token")
    parser.add_argument("--registry-url")
    parser.add_argument("--lease-seconds", type=float, default=3.0)
    parser.add_argument("--job-poll", type=float, default=0.5)
    parser.add_argument("--registry-poll", type=float, default=1.0)
    args = parser.parse_args()
    settings = Settings(
        data_dir=args.data_dir,
        admin_token=args.token,
        registry_url=args.registry_url,
        registry_poll_interval=args.registry_poll,
        jobs={"lease_seconds": args.lease_seconds, "poll_interval": args.job_poll},
    )
    uvicorn.run(create_app(settings, engine=FakeEngine()), host="127.0.0.1", port=args.port)
