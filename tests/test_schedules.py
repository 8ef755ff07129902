import math

import pytest

from flopwise.errors import FlopwiseError
from flopwise.optim.schedules import Schedule


def test_wsd_shape():
    s = Schedule("wsd", warmup=0.1, decay=0.2, final_lr_frac=0.0)
    assert s(0.0) == 0.0
    assert math.isclose(s(0.05), 0.5)
    assert s(0.1) == 1.0 and s(0.5) == 1.0 and s(0.8) == 1.0
    # (1 - sqrt) cooldown: halfway through the decay the multiplier is 1 - sqrt(0.5)
    assert math.isclose(s(0.9), 1 - math.sqrt(0.5))
    assert s(1.0) == 0.0
    assert s.decay_start == pytest.approx(0.8)


@pytest.mark.parametrize("name", ["wsd", "cosine", "linear"])
def test_final_value_and_monotone_after_warmup(name):
    s = Schedule(name, warmup=0.05, decay=0.3, final_lr_frac=0.1)
    assert math.isclose(s(1.0), 0.1)
    values = [s(0.05 + i * 0.95 / 200) for i in range(201)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))


def test_cosine_midpoint():
    s = Schedule("cosine", warmup=0.0, final_lr_frac=0.0)
    assert math.isclose(s(0.5), 0.5)
    assert math.isclose(s(0.25), 0.5 * (1 + math.cos(math.pi / 4)))


def test_constant_and_clamping():
    s = Schedule("constant", warmup=0.0)
    assert s(-1) == 1.0 and s(2) == 1.0


def test_bad_schedule_errors():
    with pytest.raises(FlopwiseError, match="schedule.name='step' is unknown"):
        Schedule("step")
    with pytest.raises(FlopwiseError, match="schedule.warmup \\+ schedule.decay"):
        Schedule("wsd", warmup=0.6, decay=0.5)
