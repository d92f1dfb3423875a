# SPDX-License-Identifier: Apache-2.0
"""bench/elastic.py's decode loop (a) runs on the host backend, synchronous and overlapped, in every layout:
the benchmark that measures issue 4's first target must not rot between GPU sessions."""

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _step_clock():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from common import StepClock
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return StepClock


class _Device:
    """A stand-in for the GPU's timeline: events take the time the test says the device reached them."""

    def __init__(self):
        self.now_ms = 0.0


class _Event:
    def __init__(self, device: _Device):
        self.device, self.t = device, None

    def record(self):
        self.t = self.device.now_ms

    def synchronize(self):
        pass

    def elapsed_time(self, other: "_Event") -> float:
        return other.t - self.t


@pytest.mark.parametrize("overlap", [False, True])
def test_step_clock_times_each_step_from_its_own_events(overlap):
    """Steps of known kernel time and gaps on a fake device timeline: the clock reports each timed step's kernel
    time, and (overlap) the end-to-end interval of clean steps after a timed one, through its ring of events."""
    StepClock = _step_clock()
    device = _Device()
    clock = StepClock(lambda: _Event(device), overlap)
    # (kernel ms, gap ms before the step's begin, timed, clean)
    steps = [(1.0, 0.0, False, True), (1.5, 0.2, True, True), (2.0, 0.1, True, False), (1.2, 0.0, True, True),
             (1.1, 0.3, True, True), (0.9, 0.0, False, True), (1.3, 0.0, True, True),
             (1.4, 0.5, True, True)]  # fmt: skip
    ends = []
    for k, (kernel, gap, timed, clean) in enumerate(steps):
        device.now_ms += gap
        assert clock.begin() == k
        device.now_ms += kernel
        clock.end(k, timed=timed, clean=clean)
        ends.append(device.now_ms)
        if not overlap:
            clock.finished(k)
        elif k:
            clock.finished(k - 1)  # the loop reads a step one round later, as the overlapped loop does
    if overlap:
        clock.finished(len(steps) - 1)
    assert clock.kernels == pytest.approx([kernel / 1e3 for kernel, _, timed, _ in steps if timed])
    expected = [(ends[k] - ends[k - 1]) / 1e3 for k in range(1, len(steps)) if steps[k][2] and steps[k][3]
                and steps[k - 1][2]]  # fmt: skip
    assert clock.intervals == (pytest.approx(expected) if overlap else [])
    if overlap:
        # steps 3, 4 and 7 (their gaps included); not 1 (after an untimed step), 2 (not clean) or 6
        assert expected == pytest.approx([1.2e-3, 1.4e-3, 1.9e-3])


def test_step_clock_refuses_to_record_over_unread_events():
    StepClock = _step_clock()
    device = _Device()
    clock = StepClock(lambda: _Event(device), overlap=True)
    for _ in range(StepClock.RING):
        clock.end(clock.begin(), timed=True, clean=True)
    with pytest.raises(RuntimeError, match="would record over the events of step 0"):
        clock.begin()


@pytest.mark.parametrize("layout", [[], ["--layout", "grouped", "--group-layers", "1"], ["--layout", "layer"]])
def test_elastic_decode_loop_runs_on_the_host(layout):
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the kernels over host memory, even where a GPU is present
    cmd = [sys.executable, str(ROOT / "bench" / "elastic.py"), "--backend", "host", "--quick", "--only-a", *layout]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # the mapper kept ahead of a step of ~0.5 s (the interpreter): no synchronous grow on the step path
    assert re.search(r"\(a\) step .* 0 synchronous grows on the step path", out), out
    overlapped = re.search(r"\(a\) overlapped loops .* median ([0-9.]+)x", out)
    assert overlapped and float(overlapped.group(1)) > 0, out
    for loop in ("on_demand", "premapped", "on_demand_overlap", "premapped_overlap"):
        assert f"(a) {loop}: median us per phase" in out, out
    # the pre-mapped loops map nothing while they run
    mapped = dict(re.findall(r"\(a\) (\w+): .*pages mapped during a step \{'mean': ([0-9.e-]+)", out))
    assert float(mapped["premapped"]) == 0 and float(mapped["premapped_overlap"]) == 0, out


def test_elastic_refuses_group_layers_without_the_grouped_layout():
    cmd = [sys.executable, str(ROOT / "bench" / "elastic.py"), "--backend", "host", "--only-a", "--group-layers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--group-layers goes with --layout grouped" in done.stderr


def test_serve_step_trace_sums_where_the_slow_steps_and_collections_are():
    """bench/common.py's StepTrace.summary (serve.py's tails) over records of known times: each kind's quantiles,
    the steps over 1.4x the median step with the garbage collection inside them, and the share of gaps longer than
    one step."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from vkv.engine.clock import StepRecord

    class _Engine:
        clock = type("Clock", (), {"trace": None})()

    trace = common.StepTrace(_Engine())
    with trace:
        assert _Engine.clock.trace is trace.records and trace._heard_gc in gc.callbacks
    assert _Engine.clock.trace is None and trace._heard_gc not in gc.callbacks
    trace.collections.clear()  # what the interpreter really collected meanwhile; the test's own follow
    t = 0.0
    for i in range(100):  # 60 decode steps of 10 ms, 40 mixed of 30 ms, the last 2 of 60 ms
        wall = 0.010 if i < 60 else 0.060 if i >= 98 else 0.030
        kind = "decode" if i < 60 else "mixed"
        trace.records.append(StepRecord(t, wall, wall, kind, 1 if kind == "decode" else 300, 50, wall * 0.9))
        t += wall
    trace.records.append(StepRecord(t, 0.001, 0.001, None, 5, 5))  # a failed step: in no kind
    start_98 = trace.records[98].started
    trace.collections += [(start_98 + 0.010, start_98 + 0.015, 2), (t + 1.0, t + 1.002, 0)]  # 5 ms in step 98
    got = trace.summary([1] * 90 + [2] * 10)
    assert got["steps"] == 100
    assert got["decode"]["steps"] == 60 and got["decode"]["wall_p50_ms"] == 10.0 and got["decode"]["tokens"] == 1
    assert got["mixed"]["steps"] == 40 and got["mixed"]["wall_p50_ms"] == 30.0 and got["mixed"]["wall_max_ms"] == 60.0
    assert got["mixed"]["gpu_p50_ms"] == 27.0
    # the median step is 10 ms (60 of 100 decode): over 14 ms are the 40 mixed ones
    assert got["slow"]["over_ms"] == 14.0 and got["slow"]["steps"] == 40 and got["slow"]["mixed"] == 40
    assert got["slow"]["gc_ms"] == pytest.approx(5.0 / 40, abs=0.01)  # the collection inside a step, over 40 slow
    assert got["gc"] == {"gen0": 1, "gen1": 0, "gen2": 1, "total_ms": pytest.approx(7.0), "max_ms": pytest.approx(5.0)}
    assert got["gaps_over_one_step"] == pytest.approx(0.1)
