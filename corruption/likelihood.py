"""Log-probabilities of continuations after prompts: the project's one continuation scorer.

Used by the strength search and its fluency check (corruption/strength.py), by δ's α search
(offset/alpha.py: `mixed_token_logprobs`, every α from one pass of each model) and by the
evaluation's `AnswerScorer` (evaluation/scoring.py). A prompt is given as token ids (T,) or as
the (T, H) input embeddings the engine would receive (a corrupted prompt); the model is one
causal LM or a weighted sum of several LMs' logits, Σ_i w_i · logits_i (δ: big + α·(small_u -
small_b)), all on the same vocabulary.

Prompts run `batch_size` at a time, left-padded; each prompt's KV cache is then shared by the
continuations that follow it, which run in passes of like lengths sized so that a pass's
(rows, L, V) logits stay under `LOGITS_BUDGET` elements per model. log p = logit -
logsumexp(logits): no second (rows, L, V) tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "LOGITS_BUDGET",
    "Term",
    "left_pad",
    "mixed_token_logprobs",
    "next_token_logprobs",
    "token_logprobs",
]

Term = tuple["PreTrainedModel", float]
"""A causal LM and the weight of its logits in the sum."""

LOGITS_BUDGET = 1 << 25
"""Most float32 logits one continuation pass holds per model (128 MiB)."""


def left_pad(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (L_i, H) tensors left-padded: embeds (B, L, H), attention mask, position ids."""
    longest = max(s.shape[0] for s in seqs)
    batch = seqs[0].new_zeros(len(seqs), longest, seqs[0].shape[1])  # (B, L, H)
    attention = torch.zeros(len(seqs), longest, dtype=torch.long, device=seqs[0].device)
    for row, seq in enumerate(seqs):
        batch[row, longest - seq.shape[0] :] = seq
        attention[row, longest - seq.shape[0] :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return batch, attention, positions


def _check(terms: Sequence[Term], prompts: Sequence[torch.Tensor]) -> None:
    if not terms:
        raise ValueError("at least one model")
    if len(terms) > 1 and any(p.is_floating_point() for p in prompts):
        raise ValueError("prompt embeddings belong to one model's table: score them with one term")


def _embeds(model: Any, prompt: torch.Tensor) -> torch.Tensor:
    """(T, H) input embeddings of a prompt given as ids (T,) or already as embeddings."""
    table = model.get_input_embeddings()
    device = table.weight.device
    if prompt.is_floating_point():
        return prompt.to(device=device, dtype=table.weight.dtype)
    return table(prompt.to(device))  # type: ignore[no-any-return]


def _prompt_pass(
    model: Any, prompts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Left-padded prompts through the model: last-position logits (P, V), the KV cache per
    layer ((P, heads, L, D) keys and values) and the attention mask (P, L)."""
    embeds, attention, positions = left_pad([_embeds(model, p) for p in prompts])
    out = model(
        inputs_embeds=embeds,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    layers = [(k, v) for k, v, *_ in out.past_key_values]
    return out.logits[:, -1].float(), layers, attention


@torch.inference_mode()
def next_token_logprobs(terms: Sequence[Term], prompts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log-probabilities (P, V) of the token after each prompt under Σ_i w_i · logits_i."""
    _check(terms, prompts)
    total = sum(weight * _prompt_pass(model, prompts)[0] for model, weight in terms)
    assert isinstance(total, torch.Tensor)
    return total.log_softmax(-1)


def _passes(terms: Sequence[Term], lengths: Sequence[int]) -> list[slice]:
    """Split continuations sorted by length into passes whose logits fit `LOGITS_BUDGET`."""
    heads: list[Any] = [model.get_output_embeddings() for model, _ in terms]  # type: ignore[no-untyped-call]
    vocab = max(int(head.weight.shape[0]) for head in heads)
    out, start = [], 0
    for end, n in enumerate(lengths, start=1):
        if (end - start) * n * vocab > LOGITS_BUDGET and end - 1 > start:
            out.append(slice(start, end - 1))
            start = end - 1
    return [*out, slice(start, len(lengths))]


def _continuation_logits(
    model: Any,
    layers: list[tuple[torch.Tensor, torch.Tensor]],
    attention: torch.Tensor,
    owner_rows: torch.Tensor,
    ids: torch.Tensor,
    cont_attention: torch.Tensor,
) -> torch.Tensor:
    """Logits (C, L - 1, V) of continuations `ids` (C, L) after the cached prompts
    `owner_rows` (C,): position j predicts token j + 1."""
    from transformers import DynamicCache

    device = attention.device
    owner_rows = owner_rows.to(device)
    cache = DynamicCache(
        ddp_cache_data=[(k.index_select(0, owner_rows), v.index_select(0, owner_rows))
                        for k, v in layers]
    )  # fmt: skip
    lengths = attention.sum(-1)[owner_rows]  # (C,) real prompt lengths
    logits = model(
        inputs_embeds=model.get_input_embeddings()(ids.to(device)),  # (C, L, H)
        attention_mask=torch.cat([attention[owner_rows], cont_attention.to(device)], dim=-1),
        position_ids=lengths[:, None] + torch.arange(ids.shape[1], device=device),
        past_key_values=cache,
    ).logits
    return logits[:, :-1].float()  # type: ignore[no-any-return]


def token_logprobs(
    terms: Sequence[Term],
    prompts: Sequence[torch.Tensor],
    continuations: Sequence[Sequence[int]],
    owners: Sequence[int],
    *,
    batch_size: int = 16,
) -> list[list[float]]:
    """Log-probability of every token of each continuation after the prompt `owners[i]`,
    under Σ_i w_i · logits_i; same order as `continuations`.

    `prompts`: token ids (T,) long, or (T, H) input embeddings (one term only).
    """
    models = [model for model, _ in terms]
    weights = [weight for _, weight in terms]
    return mixed_token_logprobs(
        models, [weights], prompts, continuations, owners, batch_size=batch_size
    )[0]


@torch.inference_mode()
def mixed_token_logprobs(
    models: Sequence[PreTrainedModel],
    mixes: Sequence[Sequence[float]],
    prompts: Sequence[torch.Tensor],
    continuations: Sequence[Sequence[int]],
    owners: Sequence[int],
    *,
    batch_size: int = 16,
) -> list[list[list[float]]]:
    """`token_logprobs` under several weightings of the same models at the price of one:
    out[m][i] are continuation i's token log-probabilities under Σ_j mixes[m][j] · logits_j.

    Each model runs once; its logits are combined per mix (δ's α swept over one pass)."""
    if any(len(mix) != len(models) for mix in mixes):
        raise ValueError("a mix gives one weight per model")
    _check([(model, 1.0) for model in models], prompts)
    if any(not c for c in continuations):
        raise ValueError("a continuation has at least one token")
    out: list[dict[int, list[float]]] = [{} for _ in mixes]
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        rows = [i for i, owner in enumerate(owners) if first <= owner < first + len(chunk)]
        if not rows:
            continue
        rows.sort(key=lambda i: len(continuations[i]))  # passes of like lengths: less padding
        cached = [(model, *_prompt_pass(model, chunk)) for model in models]
        home = cached[0][1].device
        terms = [(model, 1.0) for model in models]
        for span in _passes(terms, [len(continuations[i]) for i in rows]):
            part = rows[span]
            longest = len(continuations[part[-1]])
            owner_rows = torch.tensor([owners[i] - first for i in part])  # (C,)
            ids = torch.zeros(len(part), longest, dtype=torch.long)  # (C, L)
            cont_attention = torch.zeros_like(ids)
            for r, i in enumerate(part):
                ids[r, : len(continuations[i])] = torch.tensor(list(continuations[i]))
                cont_attention[r, : len(continuations[i])] = 1
            # per model: (C, V) logits of each continuation's first token, (C, L - 1, V) the rest
            logits = [
                (
                    first_logits[owner_rows.to(first_logits.device)].to(home),
                    _continuation_logits(
                        model, layers, attention, owner_rows, ids, cont_attention
                    ).to(home),
                )
                for model, first_logits, layers, attention in cached
            ]
            ids = ids.to(home)
            for m, mix in enumerate(mixes):
                head, rest = _mixed(logits, mix, last=m == len(mixes) - 1)
                head_lp = head.gather(-1, ids[:, :1]).squeeze(-1) - head.logsumexp(-1)  # (C,)
                norm = rest.logsumexp(-1)  # (C, L - 1)
                picked = rest.gather(-1, ids[:, 1:, None]).squeeze(-1) - norm  # (C, L - 1)
                for r, i in enumerate(part):
                    n = len(continuations[i])
                    out[m][i] = [float(head_lp[r]), *picked[r, : n - 1].tolist()]
    return [[scores[i] for i in range(len(continuations))] for scores in out]


def _mixed(
    logits: Sequence[tuple[torch.Tensor, torch.Tensor]], mix: Sequence[float], *, last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j mix[j] · logits_j for the (C, V) heads and (C, L - 1, V) rests. One model at weight
    1 is its own logits (no copy); the last mix may reuse the first model's tensors in place."""
    if len(logits) == 1 and mix[0] == 1.0:
        return logits[0]
    (head0, rest0), weight0 = logits[0], mix[0]
    if last:
        head, rest = head0.mul_(weight0), rest0.mul_(weight0)
    else:
        head, rest = head0 * weight0, rest0 * weight0
    for (head_j, rest_j), weight in zip(logits[1:], mix[1:], strict=True):
        if weight != 0.0:
            head = head.add_(head_j, alpha=weight)
            rest = rest.add_(rest_j, alpha=weight)
    return head, rest
