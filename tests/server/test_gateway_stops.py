"""The client's stops as the gateway applies them (server/services/stops.py): vLLM's rules on
the deltas the output guard releases. Through HTTP: tests/server/test_output_guard.py (fake
engine) and tests/e2e/test_leaks.py (vLLM)."""

from __future__ import annotations

from server.engine import ChoiceDelta, SamplingOptions
from server.engine.stop_strings import first_stop_string
from server.services.stops import GatewayStops


def words(*texts: str) -> list[ChoiceDelta]:
    """One delta per token, ids 100, 101, ..."""
    return [ChoiceDelta(0, t, [100 + i]) for i, t in enumerate(texts)]


def stops(**sampling: object) -> GatewayStops:
    rule, _ = GatewayStops.take(SamplingOptions(**sampling))  # type: ignore[arg-type]
    assert rule is not None
    return rule


def test_the_engine_gets_no_stop_the_gateway_applies():
    rule, engine = GatewayStops.take(SamplingOptions(stop=("T",), stop_token_ids=(7,)))
    assert rule is not None and engine.stop == () and engine.stop_token_ids == ()
    assert GatewayStops.take(SamplingOptions()) == (None, SamplingOptions())
    # With min_tokens vLLM also masks stop tokens until then: they stay with the engine.
    rule, engine = GatewayStops.take(SamplingOptions(stop_token_ids=(7,), min_tokens=2))
    assert rule is None and engine.stop_token_ids == (7,)


def test_the_stop_completed_earliest_wins_and_only_new_text_is_searched():
    # As vLLM's check_stop_strings: "ab" completes at 5, "b c" at 6.
    assert first_stop_string("xxx ab c", 4, ["b c", "ab"]) == ("ab", 4)
    assert first_stop_string("ab then", 4, ["ab"]) is None  # matched before: not new
    assert first_stop_string("then ab", 1, ["ab"]) == ("ab", 5)  # reaches into the new char
    assert first_stop_string("then ab", 0, ["ab"]) is None


def test_a_stop_string_ends_the_text_before_it_and_keeps_its_token():
    batch = words("The", " answer", " is", " More", " text")
    hit = stops(stop=(" Mo",)).find("", 0, batch)
    assert hit is not None and (hit.delta, hit.text_end, hit.tokens, hit.reason) == (
        3,
        len("The answer is"),
        1,
        " Mo",
    )
    included = stops(stop=(" Mo",), include_stop_str_in_output=True).find("", 0, batch)
    assert included is not None and included.text_end == len("The answer is Mo")


def test_a_stop_string_across_deltas_and_after_released_text():
    hit = stops(stop=("s Mo",)).find("The answer i", 2, words("s", " More"))
    assert hit is not None and (hit.delta, hit.text_end) == (1, len("The answer i"))
    assert stops(stop=("s Mo",)).buffer == 3  # never sent: "s M" waits for the next token


def test_a_stop_token_keeps_its_id_and_drops_its_text():
    batch = words("The", " answer", " is")
    hit = stops(stop_token_ids=(101,)).find("", 0, batch)
    assert hit is not None and (hit.delta, hit.text_end, hit.tokens, hit.reason) == (
        1,
        len("The"),
        1,
        101,
    )
    shown = stops(stop_token_ids=(101,), include_stop_str_in_output=True).find("", 0, batch)
    assert shown is not None and shown.text_end == len("The answer")


def test_nothing_stops_before_min_tokens():
    batch = words("Go", " Go", " Go")
    hit = stops(stop=("Go",), min_tokens=2).find("", 0, batch)
    assert hit is not None and hit.delta == 2 and hit.text_end == len("Go Go ")
    assert stops(stop=("Go",), min_tokens=2).find("Go Go", 2, words(" Go")) is not None
    assert stops(stop=("Go",), min_tokens=5).find("", 0, batch) is None


def test_a_stop_token_inside_a_merged_delta_ends_the_text_at_that_token():
    """vLLM merges a request's deltas when its reader lags: one delta then holds several
    tokens. A stop token inside it ends the text at that token, by the text each token adds;
    without that split the stop token's text is taken to be the delta's last."""
    merged = [ChoiceDelta(0, "The answer is here", [100, 101, 102, 103])]
    pieces = ["The", " answer", " is", " here"]
    rule = stops(stop_token_ids=(101,))
    hit = rule.find("Before: ", 3, merged, lambda k: pieces)
    assert hit is not None and (hit.delta, hit.text_end, hit.tokens, hit.reason) == (
        0,
        len("Before: The"),
        2,
        101,
    )
    shown = stops(stop_token_ids=(101,), include_stop_str_in_output=True)
    assert shown.find("", 0, merged, lambda k: pieces).text_end == len("The answer")  # type: ignore[union-attr]
    # The stop token last in a merged delta: the tokens before it are kept.
    last = stops(stop_token_ids=(103,)).find("", 0, merged, lambda k: pieces)
    assert last is not None and last.text_end == len("The answer is")
    # Pieces that do not make the delta's text (or none): the old reading, whole or nothing.
    assert rule.find("", 0, merged, lambda k: ["x"] * 4).text_end == len("The answer is here")  # type: ignore[union-attr]
    assert rule.find("", 0, merged).text_end == len("The answer is here")  # type: ignore[union-attr]


def test_a_stop_string_inside_a_merged_delta_keeps_the_tokens_through_it():
    merged = [ChoiceDelta(0, "The end. More", [100, 101, 102, 103])]
    pieces = ["The", " end", ".", " More"]
    rule = stops(stop=(".",))
    hit = rule.find("", 0, merged, lambda k: pieces)
    assert hit is not None and (hit.text_end, hit.tokens, hit.reason) == (len("The end"), 3, ".")
    assert rule.find("", 0, merged).tokens == 4  # type: ignore[union-attr]  # unsplit: all
    # A stop string and a stop token in one delta: the one the engine meets first.
    both = stops(stop=(" More",), stop_token_ids=(101,)).find("", 0, merged, lambda k: pieces)
    assert both is not None and (both.text_end, both.tokens, both.reason) == (3, 2, 101)
    # min_tokens counts the delta's tokens one by one: " end" completes at its 2nd, too early.
    late = stops(stop=(" end",), min_tokens=2)
    assert late.find("", 0, merged, lambda k: pieces) is None
    assert late.find("", 0, merged) is not None  # unsplit, the delta's 4 tokens were counted
