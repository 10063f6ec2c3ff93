"""The small models' linear layers on prepacked oneDNN weights, on a CPU.

δ runs two small models one token at a time beside the big one. On a CPU such a step is bound by
streaming the weights through the matrix products: `F.linear` hands oneDNN each weight in its
plain layout at every call, which it re-reads in that layout, while a weight reordered once into
oneDNN's blocked layout (what torch's inductor does for CPU linears, and vLLM for its own model)
streams about twice as fast at decode sizes: 8 rows of SmolLM2-135M's products take 4.1 ms
instead of 8.3 ms for the LM head, 269 µs instead of 522 µs for an MLP projection (bf16, one
thread, weights not in cache; float32 alike). With eager attention the pair's step is 1.9x
faster (docs/results/delta-bench.md).

`pack_linears` swaps every `nn.Linear` of a model for `PackedLinear`. It uses torch's own
oneDNN ops (`torch.ops.mkldnn`), which are safe to call from the δ helper thread while vLLM's
worker computes: vLLM's `onednn_mm` is not (its primitive cache, stream and scratchpad are
process-wide, and a helper thread calling it beside the worker crashed the engine).
The packed copy replaces the layer and the plain weights are freed (a weight tied to the input
embedding stays, since the embedding reads it): the memory stays that of the model.

oneDNN keeps what it builds for each shape of input it has seen (~2.5 MiB per shape for
SmolLM2-135M: 40 new prompt lengths kept 126 MiB more resident, against 25 MiB on `F.linear`),
up to its cache of 1,024 shapes. `PackedLinear` therefore pads more than 64 rows (a prompt's
tokens) to 2^k or 1.5 * 2^k rows (`bucket_rows`), which bounds the shapes a model makes at 78 up
to 8,192 rows; padding every product to a multiple of 8 rows kept 27 MiB for 40 prompt lengths,
but made decode steps 15-30% slower. The rows' results are those of the unpadded product.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .snap import native_bf16

logger = logging.getLogger(__name__)

DECODE_ROWS = 8
"""The batch size oneDNN is told to expect when it picks the packed layout (any size works)."""


def bucket_rows(rows: int) -> int:
    """The row count a product of `rows` rows is padded to: up to 64 rows (a decode step's
    sequences) none, as padding a step's rows to 8 made it 15-30% slower; above (a prompt's
    tokens), the next 2^k or 1.5 * 2^k (at most half as many rows again). 64 + 14 sizes up to
    8,192 rows."""
    if rows <= 64:
        return rows
    size = 64
    while True:
        if rows <= size * 3 // 2:
            return size * 3 // 2
        size *= 2
        if rows <= size:
            return size


def packable(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN ops take weights of `dtype` on this CPU (bf16: only where the CPU
    computes it natively, `offset.snap.native_bf16`; oneDNN also takes it where it emulates it)."""
    if not torch._C._has_mkldnn:
        return False
    if dtype == torch.float32:
        return True
    return (
        dtype == torch.bfloat16
        and native_bf16("cpu")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Module):
    """`x @ weight.T + bias` with the weight held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()  # (N, K)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, DECODE_ROWS)  # (N, K)
        # (N,): a copy, as a view would keep the loaded file's mapping (every weight) in memory
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., K) -> (..., N), in the model's dtype
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        m = rows.shape[0]
        padded = bucket_rows(m)
        if padded != m:  # a shape oneDNN has seen: (padded, K)
            rows = torch.nn.functional.pad(rows, (0, 0, 0, padded - m))
        out = _linear(rows, self.packed, self.bias)[:m]  # (M, N)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def _linear(rows: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """(M, K) rows times the packed (N, K) weight, plus the bias: (M, N)."""
    out: Tensor = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    return out


def pack_linears(model: nn.Module) -> int:
    """Replace the `nn.Linear` layers of a CPU model with `PackedLinear`; returns how many.

    0 (the model unchanged) where the model is not on a CPU or oneDNN does not take its dtype
    (bf16 on a CPU without native bf16). The model is for inference only afterwards.
    """
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or not packable(first.dtype):
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    # The rest (embedding, norms) may be views of the file transformers mapped to load the
    # model; copied out, they no longer hold that mapping, and the plain weights go with it.
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    return len(targets)
