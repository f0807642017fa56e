"""transfer.metrics.Progress on a fake clock: speed and input wait leave out excluded time, the ETA
adds it back."""

import pytest

from transfer import metrics


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    return now


def test_speed_and_eta_with_excluded_time(clock):
    progress = metrics.Progress(total_steps=100, batch_size=8)
    clock[0] += 30.0  # the compiling first step
    progress.reset(1)
    clock[0] += 4.0  # steps 2..5 at 1 step/s (1 s of it waiting for input), then a 6 s evaluation
    progress.input_wait(1.0)
    progress.exclude(6.0)
    clock[0] += 6.0
    speed = progress.measure(5)
    assert speed["steps_per_sec"] == pytest.approx(1.0)  # 4 steps / (10 s - 6 s excluded)
    assert speed["examples_per_sec"] == pytest.approx(8.0)
    assert speed["input_wait_frac"] == pytest.approx(0.25)  # of the 4 s of train time
    # 95 steps left at 1 s each, plus 6 s of evaluation per 4 steps run so far.
    assert speed["eta_sec"] == pytest.approx(95 * (1.0 + 6.0 / 4))
    clock[0] += 2.0  # no exclusion in this window: 2 steps in 2 s
    assert progress.measure(7)["steps_per_sec"] == pytest.approx(1.0)
    clock[0] += 2.0
    assert progress.measure(9)["input_wait_frac"] == 0.0  # the wait counter restarts per window


def test_no_speed_without_steps(clock):
    progress = metrics.Progress(total_steps=10, batch_size=1, start_step=3)
    clock[0] += 1.0
    assert progress.measure(3) == {}
