"""Stop strings and stop tokens applied by the gateway to the text the output guard releases.

Left to the engine, a stop ends the answer at the first character the model was about to write
and says so: `stop: ["T"]` after "J.R.R. " tells a client that the next letter is a T, one
request per letter, though no name was ever written. While targets are active the output guard
therefore asks the engine for the answer without the client's stops and applies them here,
only to text it has checked and released: the model writes on past a stop, the guard reads
what it writes (a name gets the answer restarted, protected), and the stop string or token
ends the answer only where the checked text has it.

The rules are vLLM's (`vllm/v1/engine/detokenizer.py`), so an answer that names nobody ends
where the bare engine would end it, byte for byte: a stop string is looked for in the text each
new token completes, the one completing earliest wins (ties by list order), the text ends
before it (or after it with `include_stop_str_in_output`), the token that completed it is the
last one kept; a stop token is kept in the token ids and its text left out (kept with
`include_stop_str_in_output`; a delta of several tokens, as vLLM sends when the gateway reads
late, is split by the text each token adds, from the served model's tokenizer); nothing stops
before `min_tokens` tokens. The usage counts the
tokens through the one a stop ends on, as vLLM's does; with n > 1 the engine writes on for a
choice the gateway ended until its other choices end, and those tokens are counted too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from server.engine import ChoiceDelta, SamplingOptions
from server.engine.stop_strings import first_stop_string, stop_buffer

__all__ = ["GatewayStops", "StopHit"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayStops:
    """The client's stop strings and stop tokens, applied to released deltas."""

    strings: tuple[str, ...]
    token_ids: frozenset[int]
    include: bool
    min_tokens: int

    @classmethod
    def take(cls, sampling: SamplingOptions) -> tuple[GatewayStops | None, SamplingOptions]:
        """The stops the gateway applies and the sampling the engine gets without them.

        Stop tokens stay with the engine when `min_tokens` is set: vLLM also masks them until
        then, which a gateway cannot do (their stop reason is still read by the output guard).
        """
        token_ids = sampling.stop_token_ids if sampling.min_tokens == 0 else ()
        if not sampling.stop and not token_ids:
            return None, sampling
        stops = cls(
            tuple(sampling.stop),
            frozenset(token_ids),
            sampling.include_stop_str_in_output,
            sampling.min_tokens,
        )
        engine_tokens = () if token_ids else sampling.stop_token_ids  # kept under min_tokens
        return stops, replace(sampling, stop=(), stop_token_ids=engine_tokens)

    @property
    def buffer(self) -> int:
        """Characters of checked text held back until no stop string can start in them."""
        return stop_buffer(self.strings)

    def find(
        self,
        released: str,
        tokens: int,
        batch: Sequence[ChoiceDelta],
        pieces: Callable[[int], Sequence[str] | None] | None = None,
    ) -> StopHit | None:
        """The first stop in `batch` (deltas about to be released, after `released` text and
        `tokens` tokens of this choice), or None.

        `pieces(k)`: the text each token of `batch[k]` adds. vLLM merges a request's deltas when
        its reader lags, and a delta of several tokens is read token by token through them, as
        the engine checks its stops; without them, a stop token's text is taken to be the
        delta's last and a stop string to end on the delta's last token."""
        text = released
        for k, delta in enumerate(batch):
            hit = self._in(text, tokens, delta)
            if hit is not None and len(delta.token_ids) > 1 and pieces is not None:
                split = pieces(k)
                if split is not None and _splits(delta, split):
                    hit = self._token_by_token(text, tokens, delta, split)
                else:
                    logger.info("A stop in a delta of %d tokens not split", len(delta.token_ids))
            if hit is not None:
                end, kept, reason = hit
                return StopHit(k, end, kept, reason)
            tokens += len(delta.token_ids)
            text += delta.text
        return None

    def _in(self, text: str, tokens: int, delta: ChoiceDelta) -> tuple[int, int, str | int] | None:
        """The first stop in `delta` after `text` and `tokens`, read as one token: where the
        client's text ends, the tokens of `delta` kept, the stop."""
        for j, token in enumerate(delta.token_ids):
            if token in self.token_ids and tokens + j + 1 > self.min_tokens:
                # Its text is left out unless asked for (one token a delta: the whole text).
                shown = self.include or j + 1 < len(delta.token_ids)
                return len(text) + (len(delta.text) if shown else 0), j + 1, token
        if tokens + len(delta.token_ids) <= self.min_tokens:
            return None
        found = first_stop_string(text + delta.text, len(delta.text), self.strings)
        if found is None:
            return None
        stop, start = found
        return start + len(stop) if self.include else start, len(delta.token_ids), stop

    def _token_by_token(
        self, text: str, tokens: int, delta: ChoiceDelta, pieces: Sequence[str]
    ) -> tuple[int, int, str | int] | None:
        """`_in` over each token of `delta` in turn (`pieces`: the text each adds)."""
        for m, (token, piece) in enumerate(zip(delta.token_ids, pieces, strict=True)):
            hit = self._in(text, tokens + m, ChoiceDelta(delta.index, piece, [token]))
            if hit is not None:
                return hit[0], m + 1, hit[2]
            text += piece
        return None


def _splits(delta: ChoiceDelta, pieces: Sequence[str]) -> bool:
    """Whether `pieces` are the texts of `delta`'s tokens (one each, making its text)."""
    return len(pieces) == len(delta.token_ids) and "".join(pieces) == delta.text


@dataclass(frozen=True)
class StopHit:
    """Where a stop ends a choice: the delta that completes it (index in the batch), the end of
    the text the client gets (in the choice's whole text), the tokens of that delta kept."""

    delta: int
    text_end: int
    tokens: int
    reason: str | int
