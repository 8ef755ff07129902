"""Curriculum pacing (flopwise/methods/curriculum.py's ``pacing_fraction``): the share of the easiest windows
sampled at budget progress p, against values written out by hand, and its settings refused by the config."""

from __future__ import annotations

import math

import pytest

from flopwise.config import load_config
from flopwise.errors import FlopwiseError
from flopwise.methods.curriculum import pacing_fraction

PACINGS = ("linear", "root", "step")


def test_pacing_endpoints():
    for pacing in PACINGS:
        assert pacing_fraction(0.0, pacing) == pytest.approx(0.1)
        assert pacing_fraction(0.5, pacing) == 1.0
        assert pacing_fraction(0.75, pacing) == 1.0 and pacing_fraction(1.0, pacing) == 1.0
        assert pacing_fraction(0.0, pacing, start=1.0) == 1.0


def test_pacing_values():
    assert pacing_fraction(0.25, "linear") == pytest.approx(0.55)
    assert pacing_fraction(0.125, "linear", start=0.2) == pytest.approx(0.4)
    assert pacing_fraction(0.125, "root") == pytest.approx(0.1 + 0.9 * 0.5)  # sqrt(1/4)
    assert pacing_fraction(0.02, "root") == pytest.approx(0.1 + 0.9 * math.sqrt(0.04))
    assert pacing_fraction(0.4, "root", start=0.3, full_at=0.9) == pytest.approx(0.3 + 0.7 * math.sqrt(4 / 9))
    # step: three equal stairs of height 0.3, each 1/6 of the budget wide, then everything at 0.5
    assert pacing_fraction(0.1, "step") == pytest.approx(0.1)
    assert pacing_fraction(0.2, "step") == pytest.approx(0.4)
    assert pacing_fraction(0.4, "step") == pytest.approx(0.7)
    assert pacing_fraction(0.49, "step") == pytest.approx(0.7)


def test_root_is_fast_at_first():
    for p in (0.05, 0.1, 0.2, 0.3, 0.45):
        assert pacing_fraction(p, "root") > pacing_fraction(p, "linear") >= pacing_fraction(p, "step")


@pytest.mark.parametrize("pacing", PACINGS)
def test_pacing_monotonic_and_in_range(pacing):
    values = [pacing_fraction(i / 400, pacing, start=0.05, full_at=0.7) for i in range(401)]
    assert all(0 < v <= 1 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    if pacing == "step":
        assert len(set(round(v, 9) for v in values)) == 4


@pytest.mark.parametrize("setting,field", [
    ("pacing=quad", "methods.curriculum.pacing"),
    ("start=0.0", "methods.curriculum.start"),
    ("start=1.5", "methods.curriculum.start"),
    ("full_at=0.0", "methods.curriculum.full_at"),
    ("full_at=.nan", "methods.curriculum.full_at"),
])
def test_pacing_settings_are_refused_in_one_line(setting, field):
    with pytest.raises(FlopwiseError) as err:
        load_config(None, ['methods.use=["curriculum"]', f"methods.curriculum.{setting}"])
    assert f"{field}=" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError):
        pacing_fraction(-0.1, "linear")
