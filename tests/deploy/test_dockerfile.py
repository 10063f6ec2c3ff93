"""The Dockerfile, parsed (no Docker engine runs here): its set-up step is scripts/setup.sh,
the script `make serve` / `make test` run and CI proves; non-root; HEALTHCHECK on /ready."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]


def _stages() -> dict[str, list[dict[str, str]]]:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    stages: dict[str, list[dict[str, str]]] = {}
    current: list[dict[str, str]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0]
            current = stages.setdefault(name, [])
        current.append(instruction)
    return stages


def _values(stage: list[dict[str, str]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_cpu_and_gpu_targets_exist():
    assert {"cpu-build", "cpu", "gpu-build", "gpu"} <= set(_stages())


@pytest.mark.parametrize("build", ["cpu-build", "gpu-build"])
def test_build_stages_run_the_setup_script(build: str):
    stage = _stages()[build]
    assert "bash scripts/setup.sh" in _values(stage, "RUN")
    copies = {v.split()[0] for v in _values(stage, "COPY")}
    with (ROOT / "pyproject.toml").open("rb") as f:
        packages = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for needed in ("pyproject.toml", "scripts", *packages):  # every package the wheel builds
        assert needed in copies, needed
    engine = "cpu" if build == "cpu-build" else "gpu"
    assert any(f"OBLIVIATE_ENGINE={engine}" in v for v in _values(stage, "ENV"))


def test_the_readme_set_up_runs_the_same_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "bash scripts/setup.sh" in makefile
    assert "serve: setup" in makefile and "test: setup" in makefile
    assert (ROOT / "scripts" / "setup.sh").is_file()


@pytest.mark.parametrize("final", ["cpu", "gpu"])
def test_final_stages_run_as_non_root_with_a_ready_healthcheck(final: str):
    stage = _stages()[final]
    users = _values(stage, "USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    assert any(f"--from={final}-build" in v for v in _values(stage, "COPY"))
    (healthcheck,) = _values(stage, "HEALTHCHECK")
    assert "/ready" in healthcheck and ":8000" in healthcheck
    assert any("8000" in v for v in _values(stage, "EXPOSE"))
    (entrypoint,) = _values(stage, "ENTRYPOINT")
    assert '"obliviate", "serve"' in entrypoint


def test_dockerignore_keeps_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", ".obliviate"):
        assert path in ignored
