"""Where TOFU and MMLU come from: the Hugging Face hub as users have them, or local JSON copies.

`HubData` loads the datasets `locuslab/TOFU` and `cais/mmlu` through `datasets` (cached under
the eval cache); `LocalData` reads `<dir>/tofu/<split>.jsonl` and `<dir>/mmlu/<split>.jsonl`
(the layout of `../shared/data`, which the tests and machines without a hub use). Both answer
with plain records under the local file names, so the rest of the evaluation never knows which
one it reads.

The hub's configuration names differ from the local files where TOFU keeps the truth-ratio
fields (paraphrased and perturbed answers) in a `_perturbed` configuration:

    local file           hub configuration of locuslab/TOFU
    full                 full
    forget01/05/10       forget01/05/10_perturbed
    retain_perturbed     retain_perturbed
    real_authors         real_authors_perturbed
    world_facts          world_facts_perturbed
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

TOFU_HUB = "locuslab/TOFU"
MMLU_HUB = "cais/mmlu"
_HUB_CONFIG = {
    "forget01": "forget01_perturbed",
    "forget05": "forget05_perturbed",
    "forget10": "forget10_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}
_MMLU_SPLIT = {"val": "validation", "dev": "dev", "test": "test"}


class DataUnavailable(RuntimeError):
    """The data cannot be read from the source asked for (the message says what to pass)."""


class DataSource(Protocol):
    """TOFU and MMLU records, by the local file names (`full`, `forget05`, `val`, ...)."""

    def describe(self) -> str: ...

    def tofu(self, name: str) -> list[dict[str, Any]]: ...

    def mmlu(self, split: str) -> list[dict[str, Any]]: ...


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class LocalData:
    """JSON Lines copies: `<root>/tofu/<name>.jsonl` and `<root>/mmlu/<split>.jsonl`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / "tofu" / "full.jsonl").is_file():
            raise DataUnavailable(
                f"{root}/tofu/full.jsonl not found: --data-dir takes a folder holding tofu/ and "
                "mmlu/ as JSON Lines (one record a line, the field names of the hub datasets); "
                "without --data-dir the data comes from the Hugging Face hub"
            )

    def describe(self) -> str:
        return f"local JSON Lines in {self.root}"

    def tofu(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.root / "tofu" / f"{name}.jsonl")

    def mmlu(self, split: str) -> list[dict[str, Any]]:
        return read_jsonl(self.root / "mmlu" / f"{split}.jsonl")


class HubData:
    """`locuslab/TOFU` and `cais/mmlu` from the Hugging Face hub through `datasets`, cached in
    `cache_dir` (the second run reads the cache, also offline)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def describe(self) -> str:
        return f"Hugging Face hub ({TOFU_HUB}, {MMLU_HUB}), cached in {self.cache_dir}"

    def tofu(self, name: str) -> list[dict[str, Any]]:
        return self._load(TOFU_HUB, _HUB_CONFIG.get(name, name), "train")

    def mmlu(self, split: str) -> list[dict[str, Any]]:
        return self._load(MMLU_HUB, "all", _MMLU_SPLIT.get(split, split))

    def _load(self, path: str, config: str, split: str) -> list[dict[str, Any]]:
        try:
            import datasets
        except ImportError as exc:
            raise DataUnavailable(
                "reading TOFU and MMLU from the Hugging Face hub needs the `datasets` package "
                "(pip install 'obliviate[eval]'), or pass --data-dir with local JSON copies"
            ) from exc
        try:
            rows = datasets.load_dataset(path, config, split=split, cache_dir=str(self.cache_dir))
        except Exception as exc:  # no network, no hub, unknown config: say what to do instead
            raise DataUnavailable(
                f"could not load {path} ({config}, {split}) from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}); pass --data-dir with a folder holding tofu/ "
                "and mmlu/ as JSON Lines (for example ../shared/data)"
            ) from exc
        return [dict(r) for r in rows]


def open_source(data_dir: Path | None, cache_dir: Path) -> DataSource:
    """Local copies when `data_dir` is given, else the hub (cached under `cache_dir`)."""
    if data_dir is not None:
        return LocalData(data_dir)
    return HubData(cache_dir / "datasets")
