import math

import pytest

from flopwise.budget import Budget, Meter, format_bytes, parse_bytes, parse_limit, steps_left
from flopwise.errors import FlopwiseError


@pytest.mark.parametrize("text, expected", [
    ("90s", ("seconds", 90.0)),
    ("3m", ("seconds", 180.0)),
    ("1.5h", ("seconds", 5400.0)),
    ("2e15flops", ("flops", 2e15)),
    ("3PFLOPs", ("flops", 3e15)),
    ("5M", ("tokens", 5e6)),
    ("200k", ("tokens", 2e5)),
    ("5e6", ("tokens", 5e6)),
    ("5e6tokens", ("tokens", 5e6)),
    ("2Btok", ("tokens", 2e9)),
    ("40steps", ("steps", 40.0)),
    ("1step", ("steps", 1.0)),
])
def test_parse_limit_units(text, expected):
    name, value = parse_limit(text)
    assert name == expected[0]
    assert math.isclose(value, expected[1])


@pytest.mark.parametrize("text", ["3x", "fast", "", "m3", "1.5 parsecs"])
def test_parse_limit_rejects_with_examples(text):
    with pytest.raises(FlopwiseError, match="e.g. 90s"):
        Budget.parse(text) if text else Budget.parse(",")


def test_budget_combines_limits_and_rejects_zero():
    budget = Budget.parse("3m,5M+40steps")
    assert budget.set_limits() == {"seconds": 180.0, "tokens": 5e6, "steps": 40.0}
    with pytest.raises(FlopwiseError, match=r"budget '0steps' \(budget.steps=0\) must be a positive number"):
        Budget.parse("0steps")
    with pytest.raises(FlopwiseError, match=r"budget '-5s' \(budget.seconds=-5\) must be a positive number"):
        Budget.parse("3m,-5s")  # read as negative, not as unreadable
    exponent = Budget.parse("1.92e+19flops+5M")  # the exponent's plus is the number's, the second separates
    assert exponent.flops == 1.92e19 and exponent.tokens == 5e6


def test_progress_is_the_largest_fraction_spent():
    budget = Budget(seconds=100, tokens=1000)
    meter = Meter(seconds=10, tokens=500)
    assert meter.progress(budget) == 0.5
    meter.add_step(seconds=80, tokens=10, flops=1.0)
    assert meter.progress(budget) == 0.9
    assert meter.steps == 1


def test_steps_left_exact_limits_round_up():
    meter = Meter(tokens=1000, steps=10)
    # 5000-token budget, 300 tokens/step: 4000 left -> 13.33 -> 14 steps (the last one may overshoot)
    assert steps_left(meter, Budget(tokens=5000), 300, 1.0, None) == 14
    # exact division does not add a step
    assert steps_left(meter, Budget(tokens=4000), 300, 1.0, None) == 10
    assert steps_left(meter, Budget(steps=40), 300, 1.0, None) == 30
    # the binding limit wins
    assert steps_left(meter, Budget(steps=40, tokens=4000), 300, 1.0, None) == 10


def test_steps_left_seconds_uses_step_time_and_never_below_one():
    meter = Meter(seconds=50)
    assert steps_left(meter, Budget(seconds=60), 1, 1.0, None) is None
    assert steps_left(meter, Budget(seconds=60), 1, 1.0, 0.4) == 25
    assert steps_left(meter, Budget(seconds=60), 1, 1.0, 100.0) == 1
    meter.seconds = 70
    assert steps_left(meter, Budget(seconds=60), 1, 1.0, 0.4) == 1


def test_meter_round_trip():
    meter = Meter(seconds=1.25, flops=3e12, tokens=4096, steps=7)
    assert Meter.from_dict(meter.to_dict()) == meter


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("16GB", 16e9), ("1.5gib", 1.5 * 2**30), ("4096", 4096.0),
])
def test_parse_bytes_binary_and_decimal_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8GiBs", "lots", "", "4 parsecs"])
def test_parse_bytes_rejects_with_examples(text):
    with pytest.raises(FlopwiseError, match="8GiB"):
        parse_bytes(text)


def test_format_bytes_round_trips_through_parse():
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(parse_bytes("12MiB")) == "12.0 MiB"
    assert format_bytes(100) == "100 B"
