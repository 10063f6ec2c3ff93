"""Embedding corruption functions (ECO, Liu et al. 2024, arXiv 2406.07933) and their registry.

Every function takes prompt embeddings of shape (B, T, H) or (T, H) and a boolean position mask
of shape (B, T) or (T,), and returns a new tensor of the input's shape and dtype: only masked
positions change, the input is never modified in place. Random functions draw from the explicit
`generator` only, so a seed fixes the result. Arithmetic happens in float32 and is cast back.

`dims=None` means "all hidden dimensions". Strengths are absolute (embedding units); compare them
with `EmbeddingTable.std` of the served model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "CORRUPTION_METHODS",
    "CorruptionMethod",
    "CorruptionSpec",
    "add_constant_first_n",
    "add_noise_first_n",
    "add_noise_random_n",
    "add_noise_top_k",
    "apply_corruption",
    "flip_sign_first_n",
    "flip_sign_top_k",
    "replace_with_noise_first_n",
    "reverse_positions",
    "shuffle_positions",
    "zero_first_n",
    "zero_top_k",
]

Tensor = torch.Tensor
RowEdit = Callable[[Tensor], Tensor]


def _as_batched(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and return (B, T, H) embeddings with a (B, T) bool mask."""
    if embeds.dim() not in (2, 3):
        raise ValueError(f"embeds must be (T, H) or (B, T, H), got {tuple(embeds.shape)}")
    if not embeds.is_floating_point():
        raise ValueError(f"embeds must be floating point, got {embeds.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != embeds.shape[:-1]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match embeds {tuple(embeds.shape)}"
        )
    if embeds.dim() == 2:
        return embeds.unsqueeze(0), mask.unsqueeze(0)  # (1, T, H), (1, T)
    return embeds, mask


def _resolve_dims(dims: int | None, hidden: int) -> int:
    if dims is None:
        return hidden
    if not 0 < dims <= hidden:
        raise ValueError(f"dims must be in 1..{hidden} (or None for all), got {dims}")
    return dims


def _edit_masked_rows(embeds: Tensor, mask: Tensor, edit: RowEdit) -> Tensor:
    """Return a copy of `embeds` whose masked rows (M, H) are replaced by `edit(rows)`."""
    batched, bmask = _as_batched(embeds, mask)
    out = batched.clone()
    bmask = bmask.to(out.device)
    if bool(bmask.any()):
        rows = out[bmask].float()  # (M, H)
        out[bmask] = edit(rows).to(out.dtype)
    return out.reshape(embeds.shape)  # (B, T, H) or (T, H), as given


def _noise(shape: tuple[int, ...], sigma: float, generator: torch.Generator) -> Tensor:
    # Drawn on the generator's device so that a CPU generator works for any tensor device.
    return torch.randn(shape, generator=generator, device=generator.device) * sigma


def _top_k_indices(rows: Tensor, k: int) -> Tensor:
    return rows.abs().topk(k, dim=-1).indices  # (M, k)


def add_noise_first_n(
    embeds: Tensor,
    mask: Tensor,
    *,
    sigma: float,
    dims: int | None,
    generator: torch.Generator,
) -> Tensor:
    """Add N(0, sigma) noise to the first `dims` hidden dims of masked positions."""

    def edit(rows: Tensor) -> Tensor:
        n = _resolve_dims(dims, rows.shape[-1])
        noise = _noise((rows.shape[0], n), sigma, generator).to(rows.device)  # (M, n)
        return torch.cat([rows[:, :n] + noise, rows[:, n:]], dim=-1)  # (M, H)

    return _edit_masked_rows(embeds, mask, edit)


def add_noise_random_n(
    embeds: Tensor,
    mask: Tensor,
    *,
    sigma: float,
    dims: int | None,
    generator: torch.Generator,
) -> Tensor:
    """Add N(0, sigma) noise to `dims` random hidden dims (the same dims at every position)."""

    def edit(rows: Tensor) -> Tensor:
        hidden = rows.shape[-1]
        n = _resolve_dims(dims, hidden)
        chosen = torch.randperm(hidden, generator=generator, device=generator.device)[:n]
        chosen = chosen.to(rows.device)
        noise = _noise((rows.shape[0], n), sigma, generator).to(rows.device)  # (M, n)
        return rows.index_add(-1, chosen, noise)

    return _edit_masked_rows(embeds, mask, edit)


def add_noise_top_k(
    embeds: Tensor,
    mask: Tensor,
    *,
    sigma: float,
    dims: int | None,
    generator: torch.Generator,
) -> Tensor:
    """Add N(0, sigma) noise to each masked position's `dims` largest-|value| dims."""

    def edit(rows: Tensor) -> Tensor:
        k = _resolve_dims(dims, rows.shape[-1])
        idx = _top_k_indices(rows, k)  # (M, k)
        noise = _noise((rows.shape[0], k), sigma, generator).to(rows.device)  # (M, k)
        return rows.scatter_add(-1, idx, noise)

    return _edit_masked_rows(embeds, mask, edit)


def zero_first_n(embeds: Tensor, mask: Tensor, *, dims: int | None) -> Tensor:
    """Set the first `dims` hidden dims of masked positions to zero."""

    def edit(rows: Tensor) -> Tensor:
        n = _resolve_dims(dims, rows.shape[-1])
        return torch.cat([torch.zeros_like(rows[:, :n]), rows[:, n:]], dim=-1)  # (M, H)

    return _edit_masked_rows(embeds, mask, edit)


def zero_top_k(embeds: Tensor, mask: Tensor, *, dims: int | None) -> Tensor:
    """Set each masked position's `dims` largest-|value| dims to zero."""

    def edit(rows: Tensor) -> Tensor:
        idx = _top_k_indices(rows, _resolve_dims(dims, rows.shape[-1]))  # (M, k)
        return rows.scatter(-1, idx, 0.0)

    return _edit_masked_rows(embeds, mask, edit)


def flip_sign_first_n(embeds: Tensor, mask: Tensor, *, dims: int | None) -> Tensor:
    """Negate the first `dims` hidden dims of masked positions."""

    def edit(rows: Tensor) -> Tensor:
        n = _resolve_dims(dims, rows.shape[-1])
        return torch.cat([-rows[:, :n], rows[:, n:]], dim=-1)  # (M, H)

    return _edit_masked_rows(embeds, mask, edit)


def flip_sign_top_k(embeds: Tensor, mask: Tensor, *, dims: int | None) -> Tensor:
    """Negate each masked position's `dims` largest-|value| dims."""

    def edit(rows: Tensor) -> Tensor:
        idx = _top_k_indices(rows, _resolve_dims(dims, rows.shape[-1]))  # (M, k)
        return rows.scatter(-1, idx, -rows.gather(-1, idx))

    return _edit_masked_rows(embeds, mask, edit)


def add_constant_first_n(embeds: Tensor, mask: Tensor, *, value: float, dims: int | None) -> Tensor:
    """Add `value` (negative to subtract) to the first `dims` hidden dims of masked positions."""

    def edit(rows: Tensor) -> Tensor:
        n = _resolve_dims(dims, rows.shape[-1])
        return torch.cat([rows[:, :n] + value, rows[:, n:]], dim=-1)  # (M, H)

    return _edit_masked_rows(embeds, mask, edit)


def replace_with_noise_first_n(
    embeds: Tensor,
    mask: Tensor,
    *,
    sigma: float,
    dims: int | None,
    generator: torch.Generator,
) -> Tensor:
    """Replace the first `dims` hidden dims of masked positions with N(0, sigma) noise."""

    def edit(rows: Tensor) -> Tensor:
        n = _resolve_dims(dims, rows.shape[-1])
        noise = _noise((rows.shape[0], n), sigma, generator).to(rows.device)  # (M, n)
        return torch.cat([noise, rows[:, n:]], dim=-1)  # (M, H)

    return _edit_masked_rows(embeds, mask, edit)


def _permute_masked_positions(
    embeds: Tensor, mask: Tensor, order: Callable[[int], Tensor]
) -> Tensor:
    """Reorder, in each sequence, the masked positions among themselves by `order(count)`."""
    batched, bmask = _as_batched(embeds, mask)
    out = batched.clone()
    for b in range(batched.shape[0]):
        positions = bmask[b].to(batched.device).nonzero().squeeze(-1)  # (M_b,)
        if positions.numel() > 1:
            perm = order(positions.numel()).to(batched.device)
            out[b, positions] = batched[b, positions[perm]]
    return out.reshape(embeds.shape)  # (B, T, H) or (T, H), as given


def reverse_positions(embeds: Tensor, mask: Tensor) -> Tensor:
    """Reverse the order of the masked positions in each sequence (others stay put)."""
    return _permute_masked_positions(embeds, mask, lambda m: torch.arange(m - 1, -1, -1))


def shuffle_positions(embeds: Tensor, mask: Tensor, *, generator: torch.Generator) -> Tensor:
    """Randomly permute the masked positions in each sequence (others stay put)."""
    return _permute_masked_positions(
        embeds, mask, lambda m: torch.randperm(m, generator=generator, device=generator.device)
    )


@dataclass(frozen=True)
class CorruptionSpec:
    """What to do to a flagged prompt's selected positions: stored per target in the registry.

    `strength` is sigma for the noise methods and the constant for the constant methods; other
    methods ignore it. `dims` is n or k (None: all hidden dims). `seed` fixes the random draws,
    so the same prompt is always corrupted the same way (reproducible greedy answers).
    """

    method: str
    strength: float
    dims: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in CORRUPTION_METHODS:
            known = ", ".join(sorted(CORRUPTION_METHODS))
            raise ValueError(f"unknown corruption method {self.method!r}; known: {known}")
        if not math.isfinite(self.strength):
            raise ValueError(f"strength must be finite, got {self.strength}")
        if CORRUPTION_METHODS[self.method].strength_is_scale and self.strength < 0:
            raise ValueError(f"strength of {self.method} is a std, must be >= 0")
        if self.dims is not None and self.dims <= 0:
            raise ValueError(f"dims must be positive or None, got {self.dims}")

    @classmethod
    def recommended(cls, embedding_std: float, *, seed: int = 0) -> CorruptionSpec:
        """The uncalibrated default: N(0, 4 std) on every dim of the target's tokens.

        4x the table's std is where the strength search lands for SmolLM2-135M-Instruct on a
        Harry Potter target (see README); a registration job should calibrate per target.
        """
        return cls("add_noise_first_n", 4.0 * embedding_std, None, seed)

    def with_strength(self, strength: float) -> CorruptionSpec:
        """Return a copy with another strength."""
        return CorruptionSpec(self.method, strength, self.dims, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (the registry's storage form)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorruptionSpec:
        """Build from `to_dict` output; unknown keys are an error."""
        unknown = set(data) - {"method", "strength", "dims", "seed"}
        if unknown:
            raise ValueError(f"unknown CorruptionSpec fields: {sorted(unknown)}")
        dims = data.get("dims")
        missing = {"method", "strength"} - set(data)
        if missing:
            raise ValueError(f"missing CorruptionSpec fields: {sorted(missing)}")
        return cls(
            method=str(data["method"]),
            strength=float(data["strength"]),
            dims=None if dims is None else int(dims),
            seed=int(data.get("seed", 0)),
        )


SpecApplier = Callable[[Tensor, Tensor, CorruptionSpec, torch.Generator], Tensor]


@dataclass(frozen=True)
class CorruptionMethod:
    """A registry entry: how to apply a spec, and which spec fields matter."""

    apply: SpecApplier
    uses_strength: bool
    uses_dims: bool
    random: bool
    strength_is_scale: bool = False


CORRUPTION_METHODS: Mapping[str, CorruptionMethod] = MappingProxyType(
    {
        "add_noise_first_n": CorruptionMethod(
            lambda e, m, s, g: add_noise_first_n(e, m, sigma=s.strength, dims=s.dims, generator=g),
            uses_strength=True,
            uses_dims=True,
            random=True,
            strength_is_scale=True,
        ),
        "add_noise_random_n": CorruptionMethod(
            lambda e, m, s, g: add_noise_random_n(e, m, sigma=s.strength, dims=s.dims, generator=g),
            uses_strength=True,
            uses_dims=True,
            random=True,
            strength_is_scale=True,
        ),
        "add_noise_top_k": CorruptionMethod(
            lambda e, m, s, g: add_noise_top_k(e, m, sigma=s.strength, dims=s.dims, generator=g),
            uses_strength=True,
            uses_dims=True,
            random=True,
            strength_is_scale=True,
        ),
        "replace_with_noise_first_n": CorruptionMethod(
            lambda e, m, s, g: replace_with_noise_first_n(
                e, m, sigma=s.strength, dims=s.dims, generator=g
            ),
            uses_strength=True,
            uses_dims=True,
            random=True,
            strength_is_scale=True,
        ),
        "zero_first_n": CorruptionMethod(
            lambda e, m, s, g: zero_first_n(e, m, dims=s.dims),
            uses_strength=False,
            uses_dims=True,
            random=False,
        ),
        "zero_top_k": CorruptionMethod(
            lambda e, m, s, g: zero_top_k(e, m, dims=s.dims),
            uses_strength=False,
            uses_dims=True,
            random=False,
        ),
        "flip_sign_first_n": CorruptionMethod(
            lambda e, m, s, g: flip_sign_first_n(e, m, dims=s.dims),
            uses_strength=False,
            uses_dims=True,
            random=False,
        ),
        "flip_sign_top_k": CorruptionMethod(
            lambda e, m, s, g: flip_sign_top_k(e, m, dims=s.dims),
            uses_strength=False,
            uses_dims=True,
            random=False,
        ),
        "add_constant_first_n": CorruptionMethod(
            lambda e, m, s, g: add_constant_first_n(e, m, value=s.strength, dims=s.dims),
            uses_strength=True,
            uses_dims=True,
            random=False,
        ),
        "subtract_constant_first_n": CorruptionMethod(
            lambda e, m, s, g: add_constant_first_n(e, m, value=-s.strength, dims=s.dims),
            uses_strength=True,
            uses_dims=True,
            random=False,
        ),
        "reverse_positions": CorruptionMethod(
            lambda e, m, s, g: reverse_positions(e, m),
            uses_strength=False,
            uses_dims=False,
            random=False,
        ),
        "shuffle_positions": CorruptionMethod(
            lambda e, m, s, g: shuffle_positions(e, m, generator=g),
            uses_strength=False,
            uses_dims=False,
            random=True,
        ),
    }
)


def apply_corruption(embeds: Tensor, mask: Tensor, spec: CorruptionSpec) -> Tensor:
    """Apply `spec` to the masked positions of (B, T, H) or (T, H) embeddings; returns a copy."""
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    with torch.inference_mode():
        return CORRUPTION_METHODS[spec.method].apply(embeds, mask, spec, generator)
