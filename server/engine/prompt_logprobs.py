"""vLLM's prompt logprobs -> `PromptLogprob`s (what echo and `prompt_logprobs` report)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from server.engine.base import PromptLogprob


def prompt_logprobs(
    positions: Sequence[Mapping[int, Any] | None] | None,
    prompt_ids: Sequence[int],
    tokenizer: Any,
) -> list[PromptLogprob] | None:
    """One entry per prompt token (logprob None where the engine gives none: the first token).

    Each vLLM position maps token id -> Logprob(logprob, rank, decoded_token), the prompt's own
    token first; -inf becomes -9999 as vLLM's server reports it.
    """
    if positions is None:
        return None
    out: list[PromptLogprob] = []
    for token_id, position in zip(prompt_ids, positions, strict=False):
        if position is None or token_id not in position:
            out.append(PromptLogprob(token_id, str(tokenizer.decode(token_id)), None, None))
            continue
        top = tuple(
            (tid, _text(tid, lp, tokenizer), max(float(lp.logprob), -9999.0), lp.rank)
            for tid, lp in position.items()
        )
        own = position[token_id]
        out.append(
            PromptLogprob(
                token_id=token_id,
                token=_text(token_id, own, tokenizer),
                logprob=max(float(own.logprob), -9999.0),
                rank=own.rank,
                top=top,
            )
        )
    return out


def _text(token_id: int, logprob: Any, tokenizer: Any) -> str:
    decoded = getattr(logprob, "decoded_token", None)
    return str(decoded) if decoded is not None else str(tokenizer.decode(token_id))
