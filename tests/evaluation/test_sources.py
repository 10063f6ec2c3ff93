"""TOFU and MMLU from where users have them: the hub through `datasets`, or local JSON copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.sources import DataUnavailable, HubData, LocalData, open_source
from evaluation.tofu_data import load_mmlu, load_subset

# The hub's configuration of each local file (evaluation/sources.py), as a dataset repository's
# README declares them; the test builds such repositories from the local copies.
TOFU_CONFIGS = {
    "full": "full",
    "forget01_perturbed": "forget01",
    "forget05_perturbed": "forget05",
    "retain_perturbed": "retain_perturbed",
    "real_authors_perturbed": "real_authors",
    "world_facts_perturbed": "world_facts",
}


def _repo(folder: Path, configs: dict[str, tuple[str, Path]]) -> None:
    """A dataset repository as on the hub: data files and a README naming its configurations."""
    folder.mkdir(parents=True)
    lines = ["---", "configs:"]
    for config, (split, source) in configs.items():
        (folder / f"{config}.jsonl").symlink_to(source)
        lines += [f"- config_name: {config}", "  data_files:", f"  - split: {split}"]
        lines += [f"    path: {config}.jsonl"]
    (folder / "README.md").write_text("\n".join([*lines, "---", ""]))


@pytest.fixture
def hub(tofu_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`locuslab/TOFU` and `cais/mmlu` laid out as hub repositories; `datasets` resolves a
    repository id to a local folder of that name first, so no network is needed."""
    tofu = {c: ("train", tofu_data / "tofu" / f"{f}.jsonl") for c, f in TOFU_CONFIGS.items()}
    _repo(tmp_path / "repos" / "locuslab" / "TOFU", tofu)
    _repo(
        tmp_path / "repos" / "cais" / "mmlu",
        {"all": ("validation", tofu_data / "mmlu" / "val.jsonl")},
    )
    monkeypatch.chdir(tmp_path / "repos")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def test_the_hub_source_builds_the_same_subset_as_the_local_copies(
    hub: Path, tofu_data: Path
) -> None:
    source = open_source(None, hub)
    assert isinstance(source, HubData)
    kwargs = {"retain_authors": 3, "retain_eval": 10, "seed": 0}
    from_hub = load_subset(source, "forget05", **kwargs)  # type: ignore[arg-type]
    local = load_subset(LocalData(tofu_data), "forget05", **kwargs)  # type: ignore[arg-type]
    assert from_hub == local
    assert len(from_hub.forget) == 200 and len(from_hub.forget_authors) == 10
    assert all(len(qa.perturbed_answers) == 5 for qa in from_hub.forget)  # truth-ratio fields
    assert from_hub.real_authors[0].perturbed_answers  # the _perturbed configuration was read
    assert load_mmlu(source, 20, 0) == load_mmlu(tofu_data, 20, 0)
    assert isinstance(load_mmlu(source, 1, 0)[0].answer, int)
    assert any((hub / "datasets").iterdir())  # cached where the eval cache is


def test_without_the_hub_the_error_names_data_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no local folder named like the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub, quickly
    with pytest.raises(DataUnavailable, match="--data-dir"):
        HubData(tmp_path / "cache").tofu("full")


def test_a_data_dir_without_tofu_is_refused_with_what_it_must_hold(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailable, match="tofu/ and mmlu/"):
        open_source(tmp_path, tmp_path / "cache")
