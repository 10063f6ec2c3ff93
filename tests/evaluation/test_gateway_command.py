"""The command `obliviate eval` starts its gateways with, as the serve CLI parses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_settings import CliApp

from evaluation.gateway import gateway_command
from server.settings import Settings


@pytest.mark.parametrize("token", ["-Rk3vQz9c0bW1xT7yL2mN5pA8s", "Rk3vQz9c0bW1xT7yL2mN5pA8s-"])
def test_any_token_urlsafe_token_reaches_the_gateway(
    token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # secrets.token_urlsafe begins with "-" one time in 64: on argv, argparse took it for a
    # flag and the gateway exited ("--admin-token: expected one argument"), failing a CI run.
    argv, env = gateway_command(
        tmp_path / "model", port=8123, workdir=tmp_path, token=token, dtype="float32"
    )
    assert token not in argv  # argv is readable by every user of the machine (ps)
    assert argv[1:4] == ["-m", "server", "serve"]
    for key, value in env.items():
        if key.startswith("OBLIVIATE_"):
            monkeypatch.setenv(key, value)
    settings = CliApp.run(Settings, cli_args=argv[4:])
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == token
    assert (settings.port, settings.model, settings.vllm.dtype) == (
        8123,
        str(tmp_path / "model"),
        "float32",
    )
