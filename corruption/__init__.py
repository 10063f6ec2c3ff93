"""Corrupt prompt embeddings of flagged requests (ECO): functions, embedding table, strength."""

from corruption.functions import (
    CORRUPTION_METHODS,
    CorruptionMethod,
    CorruptionSpec,
    add_constant_first_n,
    add_noise_first_n,
    add_noise_random_n,
    add_noise_top_k,
    apply_corruption,
    flip_sign_first_n,
    flip_sign_top_k,
    replace_with_noise_first_n,
    reverse_positions,
    shuffle_positions,
    zero_first_n,
    zero_top_k,
)

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
