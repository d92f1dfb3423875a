# SPDX-License-Identifier: Apache-2.0
"""bench/stress.py on the host backend: 4 processes x 10 s on one ledger under SIGKILL and SIGSTOP (issue 12's
stress targets), and the members' checksums catch a changed token."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from vkv import Ledger
from vkv.allocator.nvml import per_process

pytestmark = pytest.mark.main_thread  # a ledger member sets signal handlers
ROOT = Path(__file__).resolve().parents[1]
BUDGET = 64 << 20  # 32 pages of 2 MiB for members that want up to 32 each: they refuse and give back often


def _worker_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import stress_worker
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return stress_worker


def _leftovers(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (members left behind)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def stress(tmp_path_factory):
    out = tmp_path_factory.mktemp("stress") / "stress-host.json"
    cmd = [sys.executable, str(ROOT / "bench" / "stress.py"), "--backend", "host", "--processes", "4",
           "--seconds", "10", "--budget", str(BUDGET), "--seed", "1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return run, json.loads(out.read_text())


def test_targets_met(stress):
    run, r = stress
    assert r["checksum_failures"] == 0, r["error_examples"]
    assert r["unexpected_errors"] == 0, r["error_examples"]
    assert r["samples_over_budget"] == 0
    assert r["lost_bytes_quiesced"] == 0 and r["lost_bytes_end"] == 0
    assert r["kills_not_reaped"] == 0 and r["reap_s_max"] < 1.0
    assert r["stop_delay_s_max"] <= r["config"]["lock_timeout_s"] + 0.25
    assert r["crashes"] == [] and r["hangs"] == []
    assert all(r["targets_met"].values()) and run.returncode == 0, run.stdout[-3000:]


def test_the_run_did_what_it_claims(stress):
    """Not a vacuous pass: work was done under pressure, members were killed and stopped, memory was seen."""
    _, r = stress
    ops = r["operations"]
    assert all(ops.get(kind, 0) > 0 for kind in ("allocate", "grow", "free", "share_prefix", "trim", "read")), ops
    assert r["operations_total"] >= 200
    assert sum(r["refused"].values()) > 0  # the budget was reached: refusals are part of the run
    assert r["kills"] >= 1 and r["reap_s_max"] is not None and r["stops"] >= 1
    assert r["stops_holding_lock"] >= 1 and r["samples_ledger_busy"] >= 1  # the lock timeout was really met
    assert r["samples"] >= 300  # ~10 ms apart over 10 s, on two busy cores
    assert BUDGET // 2 <= r["max_alive_bytes"] <= BUDGET and r["max_counted_bytes"] <= BUDGET


def test_no_member_left_behind(stress):
    _, r = stress
    assert _leftovers(r["config"]["ledger"]) == []
    assert not os.path.exists(r["config"]["ledger"])


@contextlib.contextmanager
def _member(tmp_path: Path):
    """One stress member on the host backend, in this process, on a ledger of its own (its log at tmp_path/"log");
    the signal handlers it installs are put back after."""
    worker = _worker_module()
    Ledger.open(path=str(tmp_path / "ledger"), budget_bytes=BUDGET, page_size=2 << 20).close()
    args = types.SimpleNamespace(
        seed=0, index=0, incarnation=1, log=str(tmp_path / "log"), ledger=str(tmp_path / "ledger"), backend="host",
        page_size=2 << 20, budget=BUDGET, lock_timeout=0.5, grow_timeout=0.25, max_seconds=1.0,
    )  # fmt: skip
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield worker.Member(args)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def test_checksums_catch_a_changed_token(tmp_path):
    """The members' data check can fail: one value changed in a slot, or a prefix changed in its sharer, is found."""
    with _member(tmp_path) as m:
        m.rng = types.SimpleNamespace(randint=lambda a, b: b, choice=lambda xs: xs[0])  # 2 pages, all shared
        m.op_allocate()
        (slot,) = m.slots
        m.op_share_prefix()
        (dst,) = set(m.slots) - {slot}
        assert m.verify(slot) and m.verify(dst) and m.checksum_failures == 0
        m.views[3][dst, 0, 1, 5] += 1  # layer 1's values, token 0: a page shared by both slots
        assert not m.verify(slot) and m.checksum_failures == 1
        assert not m.verify(dst) and m.checksum_failures == 2
        events = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
        assert [(e["ev"], e["token"], e["plane"]) for e in events] == [("checksum", 0, 3)] * 2
        m.cache.close()
        m.pool.close()
        m.ledger.close()


def test_a_member_logs_every_counting_out_of_pages(tmp_path):
    """The members' "unclaim" events (issue 12's diagnostic: which path counted pages out of the ledger) cover every
    page the pool released, each naming the pool's method and the thread, in time order."""
    with _member(tmp_path) as m:
        m.rng = types.SimpleNamespace(randint=lambda a, b: b, choice=lambda xs: xs[0])
        m.op_allocate()
        m.op_allocate()
        m.op_free()
        m.op_trim()  # the freed slot's pages go back to the device
        trimmed = m.pool.stats().released
        m.op_free()
        m.cache.close()
        m.pool.close()  # the rest go at close
        released = m.pool.stats().released
        m.ledger.close()
        events = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines()]
        unclaims = [e for e in events if e["ev"] == "unclaim"]
        assert 0 < trimmed < released
        assert sum(e["pages"] for e in unclaims) == released
        assert {(e["caller"], e["thread"]) for e in unclaims} == {("_release_pages", "MainThread")}
        times = [e["t"] for e in unclaims]
        assert all(e["t0"] <= e["t"] for e in unclaims) and times == sorted(times)


def test_nvml_process_list_to_bytes_per_pid():
    """NVML's process list (fake records, and cuda.bindings' own ProcessInfo array where importable) becomes
    {pid: bytes}; a record without a figure (NVML_VALUE_NOT_AVAILABLE) is left out, a pid listed twice is summed."""
    fake = [
        types.SimpleNamespace(pid=pid, used_gpu_memory=n) for pid, n in ((11, 5 << 20), (12, 2**64 - 1), (11, 1 << 20))
    ]
    assert per_process(fake) == {11: 6 << 20}
    assert per_process([]) == {}
    nvml = pytest.importorskip("cuda.bindings.nvml")
    infos = nvml.ProcessInfo(3)
    infos.pid, infos.used_gpu_memory = [7, 8, 9], [3 << 20, 2**64 - 1, 0]
    assert per_process(infos) == {7: 3 << 20, 9: 0}
    assert per_process(nvml.ProcessInfo(0)) == {}


def test_nvml_attribution_per_member():
    """Each ready member's bytes less its own context; one not ready counts nothing (it maps no page before); a
    ready one NVML does not list, or one gone less than SETTLE_S ago still listed, leaves the sample without a figure;
    other processes (the supervisor's) are not counted."""
    worker = _worker_module()

    def member(context, ready=True):
        return types.SimpleNamespace(ready=lambda: ready, context=context)

    live = {1: member(500 << 20), 2: member(700 << 20), 3: member(None, ready=False)}
    used = {1: (500 << 20) + (6 << 20), 2: 700 << 20, 3: 300 << 20, 99: 900 << 20}
    assert worker.kv_bytes(used, live, {}, now=10.0) == 6 << 20
    assert worker.kv_bytes({1: used[1], 3: used[3]}, live, {}, now=10.0) is None  # member 2 has no figure
    assert worker.kv_bytes(used, {**live, 4: member(None)}, {}, now=10.0) is None  # ready without a context
    dead = {5: (9.5, member(400 << 20))}
    assert worker.kv_bytes({**used, 5: 402 << 20}, live, dead, now=10.0) is None  # its memory is going
    assert worker.kv_bytes({**used, 5: 402 << 20}, live, dead, now=11.0) == 8 << 20  # it stayed: alive
    assert worker.kv_bytes({**used, 5: 300 << 20}, live, dead, now=11.0) == 6 << 20  # its context went first
    assert worker.kv_bytes(used, live, dead, now=10.0) == 6 << 20  # gone from NVML: nothing of it counts
