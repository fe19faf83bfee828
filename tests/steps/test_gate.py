"""steps/gate.py: the promotion rule, decided on numbers alone, with its reasons."""

from __future__ import annotations

import pytest

from steps.gate import Decision, promotion_decision

pytestmark = pytest.mark.unit


def test_beats_base_and_no_champion_promotes():
    d = promotion_decision(tuned_upper=10.0, base=12.0, champion=None, min_improvement=0.0)
    assert d == Decision(
        True, ["beats the base model: upper bound 10.000 < 12.000", "no current champion"]
    )


def test_beats_base_and_champion_promotes():
    d = promotion_decision(tuned_upper=10.0, base=12.0, champion=11.0, min_improvement=0.0)
    assert d.promote is True
    assert d.reasons == [
        "beats the base model: upper bound 10.000 < 12.000",
        "beats the champion: upper bound 10.000 < 11.000",
    ]


def test_beats_base_but_not_champion_does_not_promote():
    d = promotion_decision(tuned_upper=10.0, base=12.0, champion=9.5, min_improvement=0.0)
    assert d.promote is False
    assert d.reasons == [
        "beats the base model: upper bound 10.000 < 12.000",
        "does not beat the champion: upper bound 10.000 >= 9.500",
    ]


def test_worse_than_base_does_not_promote():
    d = promotion_decision(tuned_upper=13.0, base=12.0, champion=None, min_improvement=0.0)
    assert d.promote is False
    assert d.reasons == [
        "does not beat the base model: upper bound 13.000 >= 12.000",
        "no current champion",
    ]
    d = promotion_decision(tuned_upper=13.0, base=12.0, champion=20.0, min_improvement=0.0)
    assert d.promote is False
    assert len(d.reasons) == 2
    assert d.reasons[1] == "beats the champion: upper bound 13.000 < 20.000"


def test_tie_does_not_promote():
    assert promotion_decision(12.0, 12.0, None, 0.0).promote is False
    assert promotion_decision(10.0, 12.0, 10.0, 0.0).promote is False


def test_min_improvement_is_a_relative_margin():
    bar = 20.0 * (1 - 0.1)
    assert promotion_decision(bar, 20.0, None, 0.1).promote is False  # exactly at the bar
    assert promotion_decision(bar - 1e-9, 20.0, None, 0.1).promote is True
    assert promotion_decision(18.5, 20.0, None, 0.1).promote is False  # 7.5% better: not enough
    d = promotion_decision(17.0, 20.0, 19.0, 0.1)
    assert d.promote is True
    assert d.reasons == [
        "beats the base model: upper bound 17.000 < 18.000",
        "beats the champion: upper bound 17.000 < 17.100",
    ]
    d = promotion_decision(17.5, 20.0, 19.0, 0.1)
    assert d.promote is False
    assert d.reasons[1] == "does not beat the champion: upper bound 17.500 >= 17.100"


def test_forgetting_guard_blocks_promotion_beyond_its_limit():
    ok = promotion_decision(10.0, 12.0, None, 0.0, forgetting=0.2, max_forgetting=0.5)
    assert ok.promote and ok.reasons[0] == "reference perplexity +20.0% (limit +50%)"
    blocked = promotion_decision(10.0, 12.0, None, 0.0, forgetting=0.6, max_forgetting=0.5)
    assert not blocked.promote
    assert blocked.reasons[0].startswith("forgets too much: reference perplexity +60.0%")
