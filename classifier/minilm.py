"""MiniLM's encoder (BERT) as plain torch functions over its weights: what the guard runs.

transformers' `BertModel` computes the same products behind a stack of Python layers: module
hooks, config lookups, output capturing, a mask builder, and an `inspect.signature` call in
every layer (`apply_chunking_to_forward`). For the short texts the guard reads (a prompt's
piece, an answer's window) that Python cost as much as the arithmetic on fp16 weights: encoding
one 8-word text took 6.2 ms of CPU, 4.8 here. And each of its ~200 Python steps a pass takes
the GIL back from the event loop, which the guard's thread shares.

Here one layer is a fused query-key-value product, PyTorch's scaled-dot-product attention, the
output product, and the feed-forward, each followed by its layer norm (post-norm BERT, GELU),
from the weights of the loaded model, which is not kept. The hidden states equal
`BertModel(...).last_hidden_state` to float32 rounding (tests/classifier/test_minilm.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .half_linear import HalfWeightLinear

Dense = Callable[[torch.Tensor], torch.Tensor]
"""(..., in) -> (..., out): a linear layer."""


def _dense(linear: nn.Linear, half: bool, device: torch.device) -> Dense:
    """`linear` on fp16 weights (FBGEMM, CPU), or a float32 copy of it on `device`."""
    if half:
        return HalfWeightLinear(linear).forward
    copy = nn.Linear(linear.in_features, linear.out_features, device=device)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)  # (out, in)
        copy.bias.copy_(linear.bias)  # (out,)
    return copy.requires_grad_(False).forward


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One linear layer computing `linears` side by side (their outputs concatenated)."""
    out = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears))
    with torch.no_grad():
        out.weight.copy_(torch.cat([lin.weight for lin in linears]))
        out.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return out


def _norm(layer_norm: nn.LayerNorm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        layer_norm.weight.detach().to(device, torch.float32).clone(),
        layer_norm.bias.detach().to(device, torch.float32).clone(),
    )


@dataclass(frozen=True)
class _Layer:
    qkv: Dense  # (B, T, H) -> (B, T, 3H)
    out: Dense  # (B, T, H) -> (B, T, H)
    norm1: tuple[torch.Tensor, torch.Tensor]  # (H,), (H,)
    up: Dense  # (B, T, H) -> (B, T, I)
    down: Dense  # (B, T, I) -> (B, T, H)
    norm2: tuple[torch.Tensor, torch.Tensor]


def _layer(
    x: torch.Tensor, keep: torch.Tensor, layer: _Layer, heads: int, eps: float
) -> torch.Tensor:
    """One post-norm BERT layer. x: (B, T, H); keep: (B, 1, 1, T), True at real tokens."""
    b, t, h = x.shape
    qkv = layer.qkv(x).view(b, t, 3, heads, h // heads)  # (B, T, 3, heads, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, d)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, T, d)
    attended = attended.transpose(1, 2).reshape(b, t, h)  # (B, T, H)
    x = F.layer_norm(layer.out(attended) + x, (h,), *layer.norm1, eps)
    y = layer.down(F.gelu(layer.up(x)))  # (B, T, H)
    return F.layer_norm(y + x, (h,), *layer.norm2, eps)


class MiniLmEncoder:
    """`BertModel`'s last hidden states from its weights; inference only."""

    def __init__(
        self,
        bert: nn.Module,
        *,
        half: bool = False,
        device: torch.device | str = "cpu",
        word_table: torch.Tensor | None = None,
    ) -> None:
        """`bert`: a loaded `BertModel` (absolute positions, GELU); what is needed is copied,
        so it can go. `half`: the linear layers on fp16 weights (`HalfWeightLinear`, CPU).
        `word_table`: the word-piece embeddings (V, H) to read instead of a copy of the
        model's own (the static stage's table: one in memory, not two)."""
        model: Any = bert  # transformers' modules, untyped
        config = model.config
        if config.hidden_act != "gelu" or getattr(
            config, "position_embedding_type", "absolute"
        ) not in ("absolute", None):
            raise ValueError("MiniLmEncoder reads BERT models with GELU and absolute positions")
        self.device = torch.device(device)
        emb = model.embeddings
        own = emb.word_embeddings.weight.detach()
        self.word = (word_table if word_table is not None else own).to(self.device, torch.float32)
        if word_table is None:
            self.word = self.word.clone()
        self.position = emb.position_embeddings.weight.detach().to(self.device).clone()  # (P, H)
        self.token_type = emb.token_type_embeddings.weight.detach()[0].to(self.device).clone()
        self.norm = _norm(emb.LayerNorm, self.device)
        self.eps = float(config.layer_norm_eps)
        self.heads = int(config.num_attention_heads)
        self.layers = [
            _Layer(
                qkv=_dense(
                    _fused(
                        layer.attention.self.query,
                        layer.attention.self.key,
                        layer.attention.self.value,
                    ),
                    half,
                    self.device,
                ),
                out=_dense(layer.attention.output.dense, half, self.device),
                norm1=_norm(layer.attention.output.LayerNorm, self.device),
                up=_dense(layer.intermediate.dense, half, self.device),
                down=_dense(layer.output.dense, half, self.device),
                norm2=_norm(layer.output.LayerNorm, self.device),
            )
            for layer in model.encoder.layer
        ]

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, T) word-piece ids and attention mask (1 at real tokens) -> the last
        hidden states (B, T, H), float32."""
        t = ids.shape[1]
        x = F.embedding(ids, self.word) + self.position[:t] + self.token_type  # (B, T, H)
        x = F.layer_norm(x, (x.shape[-1],), *self.norm, self.eps)
        keep = (mask != 0)[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = _layer(x, keep, layer, self.heads, self.eps)
        return x
