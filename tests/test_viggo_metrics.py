"""Tests of `calltune.evaluate.viggo_metrics` on hand-made outputs with hand-computed expected values."""

import pytest

from calltune.evaluate.viggo_metrics import SCORES, viggo_metrics
from calltune.formats import Parsed
from calltune.schema import ToolCall


def call(fn, **args):
    return ToolCall.of(fn, args)


def test_hand_computed_viggo_metrics():
    refs = [call("inform", name="Halo", rating="good"),
            call("request", specifier="terrible", release_year="2014"),
            call("confirm", name="Portal"),
            call("suggest", name="Doom", genres=["shooter"])]
    preds = [Parsed([call("inform", rating="good", name="Halo")]),              # exact (order-free)
             Parsed([call("request", specifier="terrible", release_year="2015")]),  # 1 of 2 values right
             Parsed([call("verify_attribute", name="Portal", rating="poor")]),   # wrong act, extra attr
             Parsed(content="nonsense", error="not an MR")]                      # unparseable
    m, per = viggo_metrics(preds, refs)
    assert m["function_name_accuracy"] == pytest.approx(2 / 4)
    assert m["attribute_set_accuracy"] == pytest.approx(2 / 4)
    assert m["attribute_value_accuracy"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert m["overall_accuracy"] == pytest.approx((0.5 + 0.5 + 0.625) / 3)
    assert m["exact_call_accuracy"] == pytest.approx(1 / 4)
    assert m["parseable_rate"] == pytest.approx(3 / 4)
    assert per[2]["attribute_set_accuracy"] == 0.0 and per[2]["attribute_value_accuracy"] == 1.0
    assert per[3] == dict.fromkeys(SCORES, 0.0)  # the unparseable output scores 0 on everything
    for key in SCORES:  # each metric is the mean of the per-example scores of the same name
        assert m[key] == pytest.approx(sum(p[key] for p in per) / 4)


def test_list_values_must_match_as_lists():
    refs = [call("inform", genres=["a", "b"])]
    m, _ = viggo_metrics([Parsed([call("inform", genres=["b", "a"])])], refs)
    assert m["attribute_value_accuracy"] == 0.0 and m["attribute_set_accuracy"] == 1.0


def test_two_calls_count_as_unparseable_for_viggo():
    m, _ = viggo_metrics([Parsed([call("inform"), call("inform")])], [call("inform")])
    assert m["parseable_rate"] == 0.0 and m["function_name_accuracy"] == 0.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="1 predictions for 2 references"):
        viggo_metrics([Parsed()], [call("a"), call("b")])
