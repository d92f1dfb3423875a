# SPDX-License-Identifier: Apache-2.0
"""The ledger under damage, a stopped lock holder, bad arguments and leaks (issue 12, defects 3, 4, 11, 13-16)."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vkv.allocator import InvalidRequestError, OutOfPagesError
from vkv.allocator.ledger import Ledger, LedgerBusyError, LedgerError, default_path

from .ledger_rows import a_dead_pid, patch_row

PAGE = 2 << 20
WORKER = str(Path(__file__).with_name("ledger_worker.py"))


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "ledger")


@pytest.fixture
def ledger(path):
    ledger = Ledger.open(budget_bytes=8 * PAGE, page_size=PAGE, path=path)
    yield ledger
    ledger.close()


# -- 3: a truncated file is an error, never a signal --


@pytest.mark.parametrize("size", [0, 100, 5000])
def test_truncating_the_file_under_an_open_ledger_is_an_error_not_a_signal(path, size):
    done = subprocess.run([sys.executable, WORKER, "truncate", path, str(size)], capture_output=True, text=True)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # SIGBUS was -7
    results = json.loads(done.stdout)
    assert len(results) == 16
    for call, result in results.items():
        assert result.startswith(f"LedgerError: corrupted ledger at {path}: "), (call, result)
    assert "it changed under vkv" in results["grow"]


# -- 4: the lock has a timeout --


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"T"


def _took(call) -> tuple[float, BaseException]:
    start = time.monotonic()
    with pytest.raises(LedgerBusyError) as info:
        call()
    return time.monotonic() - start, info.value


def test_a_stopped_lock_holder_delays_the_others_by_at_most_the_lock_timeout(path):
    with Ledger.open(budget_bytes=8 * PAGE, page_size=PAGE, path=path, lock_timeout_s=1.0) as ledger:
        me = ledger.register("me")
        member = subprocess.Popen([sys.executable, WORKER, "lock", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert member.stdout.readline() == b"locked\n"
            member.send_signal(signal.SIGSTOP)
            while not _stopped(member.pid):
                time.sleep(0.001)
            took, error = _took(lambda: Ledger.open(path=path, page_size=PAGE, lock_timeout_s=0.3))
            print(f"\nLedger.open(lock_timeout_s=0.3) refused after {took:.3f} s")
            assert 0.3 <= took < 0.6
            assert f"the ledger {path} is busy: its lock was not free within 0.3" in str(error)
            assert f"held by pid {member.pid} (stopped)" in str(error)
            took, _ = _took(lambda: ledger.grow(me, 1, timeout_s=0.2))
            print(f"grow(timeout_s=0.2) refused after {took:.3f} s")
            assert 0.2 <= took < 0.45
            took, _ = _took(lambda: ledger.grow(me, 1, timeout_s=0))  # at least a short slack for the lock
            assert took < 0.3
            took, _ = _took(ledger.entries)
            print(f"entries() with lock_timeout_s=1.0 refused after {took:.3f} s")
            assert 1.0 <= took < 1.4
            member.send_signal(signal.SIGCONT)
            member.stdin.write(b"go\n")
            member.stdin.flush()
            assert member.stdout.readline() == b"released\n"
            ledger.grow(me, 1, timeout_s=0.2)
            assert {e.name: e.pages_mapped for e in ledger.entries()} == {"me": 1, "locker": 0}
        finally:
            member.kill()
            member.wait()
        assert [e.name for e in ledger.entries()] == ["me"]


def test_a_killed_lock_holder_frees_the_lock_at_once(path, ledger):
    me = ledger.register("me")
    member = subprocess.Popen([sys.executable, WORKER, "lock", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert member.stdout.readline() == b"locked\n"
        member.kill()
        member.wait()
        ledger.grow(me, 2, timeout_s=0.2)
        assert [(e.name, e.pages_mapped) for e in ledger.entries()] == [("me", 2)]
    finally:
        member.kill()
        member.wait()


# -- 11: every row is validated whenever it is read --

INVALID = [
    pytest.param(dict(mapped=-5), "mapped is -5 pages", id="negative-mapped"),
    pytest.param(dict(mapped=2**62), f"mapped is {2**62} pages, expected 0 to {((1 << 63) - 1) // PAGE}", id="huge"),
    pytest.param(dict(in_use=3, mapped=2), "in_use 3 exceeds mapped 2", id="in-use-over-mapped"),
    pytest.param(dict(asked=-1), "asked is -1 pages", id="negative-asked"),
    pytest.param(dict(limit=2, min=3), "its minimum 3 exceeds its limit 2", id="min-over-limit"),
    pytest.param(dict(used=7), "its used flag is 7", id="used-flag"),
    pytest.param(dict(name=b"\xff\xfe"), "is not utf-8 (or is empty, or holds a NUL)", id="name"),
    pytest.param(dict(updated=float("nan")), "its update time is nan", id="time"),
]


@pytest.mark.parametrize("damage, problem", INVALID)
def test_an_invalid_entry_of_a_live_process_is_a_clear_error(path, ledger, damage, problem):
    me, bad = ledger.register("me"), ledger.register("bad")
    ledger.grow(bad, 2)
    patch_row(path, bad, **damage)
    before = Path(path).read_bytes()
    for call in (lambda: ledger.try_grow(me, 7), lambda: ledger.grow(me, 1), ledger.entries, ledger.reap_dead):
        with pytest.raises(LedgerError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"entry {bad} of the ledger at {path} (model ") and problem in message, message
        assert f"pid {os.getpid()}) is invalid" in message
        assert f"Remedy: stop pid {os.getpid()} (vkv then reaps its entry" in message
        assert Path(path).read_bytes() == before  # nothing counted


def test_an_entry_whose_pid_is_not_a_process_says_to_remove_the_file(path, ledger):
    me, bad = ledger.register("me"), ledger.register("bad")
    patch_row(path, bad, pid=0)
    with pytest.raises(LedgerError, match=rf"is invalid: its pid 0 is not a process id\. .* Remedy: remove {path} if"):
        ledger.grow(me, 1)


@pytest.mark.parametrize("damage", [dict(mapped=-5), dict(mapped=2**62), dict(used=3)])
def test_an_invalid_entry_of_a_dead_process_is_reaped(path, ledger, damage):
    me, bad = ledger.register("me"), ledger.register("bad")
    patch_row(path, bad, pid=a_dead_pid(), **damage)
    ledger.grow(me, 8)  # the whole budget: the bad entry counts nothing (its pages died with its process)
    assert [(e.name, e.pages_mapped) for e in ledger.entries()] == [("me", 8)]
    assert not ledger.try_grow(me, 1)


# -- 13, 14: arguments --


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(page_size=1.5, budget_bytes=PAGE), "page_size must be an int, got float 1.5"),
        (dict(page_size=True, budget_bytes=PAGE), "page_size must be an int, got bool"),
        (dict(page_size=0, budget_bytes=PAGE), r"page_size must be an int in \[1, "),
        (dict(page_size="4096", budget_bytes=PAGE), "page_size must be an int, got str"),
        (dict(page_size=PAGE, budget_bytes=2**70), r"budget_bytes must be an int in \[0, 9223372036854775807\]"),
        (dict(page_size=PAGE, budget_bytes=True), "budget_bytes must be an int, got bool"),
        (dict(page_size=PAGE, budget_bytes=2.0 * PAGE), "budget_bytes must be an int, got float"),
        (dict(page_size=PAGE, budget_bytes=PAGE + 1), "budget_bytes = 2097153 is not a multiple of the page size"),
        (dict(page_size=PAGE, budget_bytes=PAGE, max_entries=True), "max_entries must be an int, got bool"),
        (dict(page_size=PAGE, budget_bytes=PAGE, max_entries=5000), r"max_entries must be an int in \[1, 4096\]"),
        (dict(page_size=PAGE, lock_timeout_s=0), "lock_timeout_s must be a finite number of seconds > 0"),
        (dict(page_size=PAGE, lock_timeout_s=float("inf")), "lock_timeout_s must be a finite number"),
        (dict(page_size=PAGE, lock_timeout_s=True), "lock_timeout_s must be a finite number"),
        (dict(page_size=PAGE, lock_timeout_s="1"), "lock_timeout_s must be a finite number"),
    ],
)
def test_bad_open_arguments_are_refused_naming_them(path, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        Ledger.open(path=path, **kwargs)
    assert not os.path.exists(path)


def test_bad_paths_are_refused_naming_the_real_path(tmp_path):
    missing = tmp_path / "gone" / "ledger"
    with pytest.raises(LedgerError, match=f"cannot open ledger {missing}: its directory does not exist") as info:
        Ledger.open(path=missing, budget_bytes=PAGE, page_size=PAGE)
    assert ".tmp" not in str(info.value)
    with pytest.raises(InvalidRequestError, match="path must be a non-empty file path, got 5"):
        Ledger.open(path=5, budget_bytes=PAGE, page_size=PAGE)
    with pytest.raises(InvalidRequestError, match="pass path .* or directory .*, not both"):
        Ledger.open(path=tmp_path / "x", directory=tmp_path, budget_bytes=PAGE, page_size=PAGE)
    for device in (True, -1, 1.0, "", "..", "a/b"):
        with pytest.raises(InvalidRequestError, match="device"):
            default_path(device)


def _calls(ledger: Ledger, me: int):
    """Calls with one bad argument each, and the argument their error must name."""
    big = 1 << 70
    return [
        (lambda: ledger.grow(me, True), "pages must be an int, got bool"),
        (lambda: ledger.grow(me, 1.0), "pages must be an int, got float"),
        (lambda: ledger.grow(me, -1), "pages must be an int in"),
        (lambda: ledger.grow(me, big), "pages must be an int in"),
        (lambda: ledger.grow(True, 1), "entry must be an int, got bool"),
        (lambda: ledger.grow(me, 1, timeout_s=float("nan")), "timeout_s must be a finite number"),
        (lambda: ledger.grow(me, 1, poll_s=0), "poll_s must be a finite number of seconds > 0"),
        (lambda: ledger.try_grow(me, "1"), "pages must be an int, got str"),
        (lambda: ledger.try_grow(1.0, 1), "entry must be an int, got float"),
        (lambda: ledger.shrink(me, True), "pages must be an int, got bool"),
        (lambda: ledger.shrink(np.float64(0), 0), "entry must be an int, got float64"),
        (lambda: ledger.set_in_use(me, None), "pages must be an int, got NoneType"),
        (lambda: ledger.set_in_use(64, 0), r"entry must be an int in \[0, 63\], got 64"),
        (lambda: ledger.ask_release(me, np.bool_(True)), "pages must be an int, got bool"),
        (lambda: ledger.clear_asked(-1, 0), r"entry must be an int in \[0, 63\], got -1"),
        (lambda: ledger.asked("0"), "entry must be an int, got str"),
        (lambda: ledger.entry(True), "entry must be an int, got bool"),
        (lambda: ledger.unregister(None), "entry must be an int, got NoneType"),
        (lambda: ledger.register("x", priority=True), "priority must be an int, got bool"),
        (lambda: ledger.register("x", priority=1 << 31), r"priority must be an int in \[-2147483648, 2147483647\]"),
        (lambda: ledger.register("x", limit_bytes=1.5e9), "limit_bytes must be an int, got float"),
        (lambda: ledger.register("x", limit_bytes=big), "limit_bytes must be an int in"),
        (lambda: ledger.register("x", min_bytes=True), "min_bytes must be an int, got bool"),
        (lambda: ledger.register("x\x1b[2J"), "a model name must be 1 to 48 utf-8 bytes of printable characters"),
        (lambda: ledger.register(b"x"), "a model name must be"),
        (lambda: ledger.register("\ud800"), "a model name must be"),
        (lambda: ledger.set_limit("me", True), "limit_bytes must be an int, got bool"),
        (lambda: ledger.set_limit(5, PAGE), "a model name must be"),
        (lambda: ledger.set_budget(PAGE + 1), "budget_bytes = 2097153 is not a multiple of the page size 2097152"),
        (lambda: ledger.set_budget(True), "budget_bytes must be an int, got bool"),
        (lambda: ledger.set_budget(big), "budget_bytes must be an int in"),
    ]


def test_every_call_checks_its_arguments_and_changes_nothing(path, ledger):
    me = ledger.register("me")
    ledger.grow(me, 2)
    before = Path(path).read_bytes()
    calls = _calls(ledger, me)
    for call, match in calls:
        with pytest.raises(InvalidRequestError, match=match):
            call()
        assert Path(path).read_bytes() == before, match
    assert len(calls) == 31


def test_refusals_change_nothing(path, ledger):
    me, other = ledger.register("me", limit_bytes=6 * PAGE), ledger.register("other")
    ledger.grow(me, 4)
    ledger.grow(other, 3)
    ledger.set_in_use(other, 3)
    before = Path(path).read_bytes()
    refusals = [
        (lambda: ledger.try_grow(me, 2), None),  # the budget
        (lambda: ledger.try_grow(me, 3), None),  # the limit
        (lambda: ledger.grow(me, 2, timeout_s=0), OutOfPagesError),
        (lambda: ledger.shrink(me, 5), InvalidRequestError),
        (lambda: ledger.set_in_use(me, 5), InvalidRequestError),
        (lambda: ledger.register("other"), LedgerError),
        (lambda: ledger.set_limit("nobody", PAGE), LedgerError),
        (lambda: ledger.set_limit("me", PAGE // 2), InvalidRequestError),
        (lambda: ledger.entry(5), LedgerError),
    ]
    for call, error in refusals:
        if error is None:
            assert call() is False
        else:
            with pytest.raises(error):
                call()
        assert Path(path).read_bytes() == before


# -- 15: a dropped ledger closes its file --


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_ledger_dropped_without_close_closes_its_file_and_unregisters(path, ledger):
    gc.collect()
    fds = _fds()
    dropped = Ledger.open(path=path, page_size=PAGE)
    dropped.grow(dropped.register("dropped"), 3)
    assert _fds() == fds + 1 and [e.name for e in ledger.entries()] == ["dropped"]
    del dropped
    gc.collect()
    assert _fds() == fds
    assert ledger.entries() == []


def test_a_closed_ledger_refuses_every_call(path):
    ledger = Ledger.open(path=path, budget_bytes=PAGE, page_size=PAGE)
    me = ledger.register("me")
    ledger.close()
    ledger.close()  # twice is fine
    for call in (lambda: ledger.grow(me, 1), ledger.entries, lambda: ledger.register("x")):
        with pytest.raises(LedgerError, match=f"the ledger {path} has been closed"):
            call()


# -- 16: the ledger directory can be chosen --


def test_the_ledger_directory_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch):
    chosen, env = tmp_path / "chosen", tmp_path / "env"
    with Ledger.open(directory=chosen, budget_bytes=PAGE, page_size=PAGE) as ledger:
        assert ledger.path == str(chosen / "ledger-0") == default_path(0, chosen)
        assert oct(os.stat(chosen).st_mode & 0o777) == "0o700"
    monkeypatch.setenv("VKV_LEDGER_DIR", str(env))
    assert default_path("1") == str(env / "ledger-1")
    with Ledger.open(1, budget_bytes=PAGE, page_size=PAGE) as ledger:
        assert ledger.path == str(env / "ledger-1")
    with Ledger.open(directory=chosen) as ledger:  # the argument wins over the environment
        assert ledger.path == str(chosen / "ledger-0")


def test_a_directory_others_can_use_says_how_to_choose_another(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(LedgerError, match=f"directory {shared} has mode 0755, expected 0700.*set VKV_LEDGER_DIR"):
        Ledger.open(directory=shared, budget_bytes=PAGE, page_size=PAGE)
    os.chmod(shared, 0o700)
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # the directory's owner is now someone else
    with pytest.raises(LedgerError, match=f"directory {shared} is owned by uid {owner}.*deny.*VKV_LEDGER_DIR"):
        Ledger.open(directory=shared, budget_bytes=PAGE, page_size=PAGE)
