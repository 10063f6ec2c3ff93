"""The δ arguments a request carries to the engine's logits processor (no vLLM import here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .delta import DeltaSpec

DELTA_ARG = "obliviate_delta"
"""Key of the δ arguments in `SamplingParams.extra_args`."""
FQCN = "offset.vllm_processor:DeltaLogitsProcessor"
"""What to pass as vLLM's `logits_processors` to enable δ mode."""


def delta_extra_args(specs: Sequence[DeltaSpec], prompt_token_ids: Sequence[int]) -> dict[str, Any]:
    """The `extra_args` entry that asks the processor for these offsets (JSON-serialisable)."""
    return {
        DELTA_ARG: {
            "offsets": [
                {"unlearned": s.unlearned, "base": s.base, "alpha": s.alpha} for s in specs
            ],
            "prompt_token_ids": [int(t) for t in prompt_token_ids],
        }
    }


def parse_delta_args(
    extra_args: Mapping[str, Any] | None,
) -> tuple[list[DeltaSpec], list[int] | None] | None:
    """The specs and prompt ids of a request, None when it carries no δ; ValueError if malformed."""
    raw = (extra_args or {}).get(DELTA_ARG)
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("offsets"), list):
        raise ValueError(f"extra_args.{DELTA_ARG} must be an object with an 'offsets' list")
    specs = []
    for item in raw["offsets"]:
        try:
            spec = DeltaSpec(str(item["unlearned"]), str(item["base"]), float(item["alpha"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"extra_args.{DELTA_ARG}.offsets items need unlearned, base and alpha: {e}"
            ) from e
        for folder in (spec.unlearned, spec.base):
            if not (Path(folder) / "config.json").is_file():
                raise ValueError(f"δ offset model folder {folder} has no config.json")
        specs.append(spec)
    prompt = raw.get("prompt_token_ids")
    if prompt is not None and not (
        isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
    ):
        raise ValueError(f"extra_args.{DELTA_ARG}.prompt_token_ids must be a list of ints")
    return specs, prompt
