# SPDX-License-Identifier: Apache-2.0
"""The page budget shared across processes: the ledger file, growth, release requests, dead processes."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vkv.allocator import InvalidRequestError, OutOfPagesError
from vkv.allocator.ledger import Ledger, LedgerBusyError, LedgerError, default_path
from vkv.allocator.ledger_file import proc_start

from .ledger_rows import a_dead_pid, dead_entry, patch_row

PAGE = 2 << 20
WORKER = str(Path(__file__).with_name("ledger_worker.py"))


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "ledger")


@pytest.fixture
def ledger(path):
    ledger = Ledger.open(budget_bytes=24 * PAGE, page_size=PAGE, path=path)
    yield ledger
    ledger.close()


def total(ledger: Ledger) -> int:
    return sum(e.pages_mapped for e in ledger.entries())


def test_a_new_ledger_is_private_and_keeps_its_budget(path, ledger):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and ledger.budget_pages == 24
    with Ledger.open(budget_bytes=99 * PAGE, page_size=PAGE, path=path) as again:  # the file's budget wins
        assert again.budget_pages == 24
        again.set_budget(30 * PAGE)
    assert ledger.budget_pages == 30
    with pytest.raises(LedgerError, match="counts pages of 2097152 bytes, not 4096"):
        Ledger.open(page_size=4096, path=path)
    with pytest.raises(LedgerError, match="no ledger at .*nothing.*creating needs budget_bytes"):
        Ledger.open(path=Path(path).with_name("nothing"))


def test_the_default_path_is_per_user_and_device():
    device = f"test-{os.getpid()}"
    path = default_path(device)
    assert path == f"/dev/shm/vkv-{os.getuid()}/ledger-{device}"
    try:
        with Ledger.open(device, budget_bytes=4 * PAGE, page_size=PAGE):
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.unlink(path)
    with pytest.raises(InvalidRequestError, match="device '../x'"):
        default_path("../x")


def test_growth_is_refused_past_the_budget_or_the_limit(ledger):
    a, b = ledger.register("a"), ledger.register("b", limit_bytes=5 * PAGE)
    assert ledger.try_grow(a, 20) and not ledger.try_grow(a, 5) and ledger.try_grow(b, 4)
    assert not ledger.try_grow(b, 1) and total(ledger) == 24  # the budget
    ledger.shrink(a, 10)
    assert not ledger.try_grow(b, 2) and ledger.try_grow(b, 1)  # the limit
    ledger.set_limit("b", 8 * PAGE)  # at run time
    assert ledger.try_grow(b, 3) and not ledger.try_grow(b, 1)
    ledger.set_limit("b", None)
    assert ledger.try_grow(b, 1)
    info = {e.name: e for e in ledger.entries()}
    assert (info["a"].pages_mapped, info["a"].mapped_total, info["a"].unmapped_total) == (10, 20, 10)
    assert (info["b"].pages_mapped, info["b"].limit_pages) == (9, 0)
    with pytest.raises(InvalidRequestError, match="cannot shrink 'a' by 11 pages: it has 10 mapped"):
        ledger.shrink(a, 11)


def test_audit_probes_while_no_process_can_count_pages_in(path, ledger):
    a = ledger.register("a")
    ledger.grow(a, 3)
    with Ledger.open(path=path, page_size=PAGE, lock_timeout_s=0.05) as other:
        b = other.register("b")

        def probe():  # the lock is held: the other opener can neither grow nor audit
            with pytest.raises(LedgerBusyError):
                other.try_grow(b, 1)
            with pytest.raises(LedgerBusyError):
                other.audit(lambda: pytest.fail("a probe ran while another audit held the lock"))
            return "probed"

        stats, got = ledger.audit(probe)
        assert got == "probed" and {e.name: e.pages_mapped for e in stats.entries} == {"a": 3, "b": 0}
        assert other.try_grow(b, 1) and total(ledger) == 4  # the lock is free again
    with pytest.raises(InvalidRequestError, match="probe must be callable, got int"):
        ledger.audit(7)


def test_a_lowered_limit_asks_the_model_for_its_excess(ledger):
    a = ledger.register("a")
    ledger.grow(a, 10)
    with pytest.raises(InvalidRequestError, match="limit_bytes = 12582913 is not a multiple of the page size"):
        ledger.set_limit("a", 6 * PAGE + 1)  # a limit is whole pages, as the budget is
    entry = ledger.set_limit("a", 6 * PAGE)
    assert (entry.limit_pages, entry.release_asked) == (6, 4) and ledger.asked(a) == 4
    assert not ledger.try_grow(a, 1)
    with pytest.raises(OutOfPagesError, match=r"its limit is 6 pages \(12 MiB\); raise it with `vkv limit a SIZE`"):
        ledger.grow(a, 1)
    with pytest.raises(InvalidRequestError, match="limit_bytes must be at least one page"):
        ledger.set_limit("a", 0)


def test_names_are_checked_and_unique_among_live_models(path, ledger):
    ledger.register("a" * 48)
    with pytest.raises(InvalidRequestError, match="1 to 48 utf-8 bytes"):
        ledger.register("é" * 25)
    with pytest.raises(LedgerError, match=f"'a' is already registered in {path} by live pid {os.getpid()}"):
        ledger.register("a"), ledger.register("a")
    with pytest.raises(LedgerError, match=r"no model named 'zz' in the ledger at .*; live models: 'a{48}', 'a'"):
        ledger.set_limit("zz", PAGE)
    with Ledger.open(budget_bytes=PAGE, page_size=PAGE, path=path + "-small", max_entries=2) as small:
        small.register("x"), small.register("y")
        with pytest.raises(LedgerError, match="is full: 2 models"):
            small.register("z")


def test_release_requests_go_to_the_lowest_priority_and_never_below_the_minimum(ledger):
    low = ledger.register("low", priority=0, min_bytes=3 * PAGE)
    mid = ledger.register("mid", priority=1)
    high = ledger.register("high", priority=2)
    me = ledger.register("me", priority=0)
    for entry, mapped, in_use in ((low, 6, 1), (mid, 6, 4), (high, 6, 0)):
        ledger.grow(entry, mapped)
        ledger.set_in_use(entry, in_use)
    assert ledger.ask_release(me, 4) == 4  # low gives 3 (6 mapped, min 3), then mid 1
    assert [ledger.asked(e) for e in (low, mid, high)] == [3, 1, 0]
    assert ledger.ask_release(me, 20) == 7  # the rest: mid's last idle one, all of high's
    assert [ledger.asked(e) for e in (low, mid, high, me)] == [3, 2, 6, 0]
    assert ledger.ask_release(me, 1) == 0
    ledger.clear_asked(high, 2)
    assert ledger.asked(high) == 4


def test_grow_waits_for_an_idle_model_to_give_pages_back(path, ledger):
    idle = ledger.register("idle")
    ledger.grow(idle, 20)
    ledger.set_in_use(idle, 5)
    stop = threading.Event()

    def mapper():  # what the idle model's mapper thread does, through its own open file
        with Ledger.open(path=path, page_size=PAGE) as own:
            while not stop.wait(0.001):
                asked = own.asked(idle)
                if asked:
                    own.shrink(idle, asked)  # (after unmapping that many idle pages)
                    own.clear_asked(idle, asked)

    thread = threading.Thread(target=mapper)
    thread.start()
    try:
        busy = ledger.register("busy")
        ledger.grow(busy, 10, timeout_s=5)
    finally:
        stop.set()
        thread.join()
    info = {e.name: e for e in ledger.entries()}
    assert (info["busy"].pages_mapped, info["idle"].pages_mapped, info["idle"].release_asked) == (10, 14, 0)


def test_out_of_pages_says_who_holds_what_and_changes_nothing(ledger):
    a, b = ledger.register("a"), ledger.register("b", priority=1)
    ledger.grow(a, 16)
    ledger.set_in_use(a, 14)
    ledger.grow(b, 4)
    before = [(e.pages_mapped, e.pages_in_use, e.release_asked) for e in ledger.entries()]
    start = time.monotonic()
    with pytest.raises(OutOfPagesError) as info:
        ledger.grow(b, 7, timeout_s=0.2)  # 3 short; a has 2 idle pages and does not answer
    assert 0.2 <= time.monotonic() - start < 2
    assert re.fullmatch(
        r"cannot map 7 more pages \(14 MiB\) for 'b': the device budget is 24 pages \(48 MiB\) and 20 are mapped "
        r"\[a 16 \(in use 14, priority 0\), b 4 \(in use 0, priority 1\)\]; asked idle models for 2 pages and waited "
        r"\d\.\d s\. Nothing was changed\.",
        str(info.value),
    )
    assert [(e.pages_mapped, e.pages_in_use, e.release_asked) for e in ledger.entries()] == before
    start = time.monotonic()
    with pytest.raises(OutOfPagesError, match="budget is 24 pages .* waited 0.0 s"):
        ledger.grow(b, 21, timeout_s=5)  # more than the whole budget: no point waiting
    assert time.monotonic() - start < 1


def test_grow_refuses_at_once_when_no_page_is_on_its_way(ledger):
    """Every page of the others holds live data (nothing idle to ask for, no exited process being freed): waiting
    out the timeout could only stall the caller (an engine's whole step, once a step), so it is refused at once;
    once a page of the others goes idle, a grow asks for it and waits for the answer again."""
    a, b = ledger.register("a"), ledger.register("b")
    ledger.grow(a, 20)
    ledger.set_in_use(a, 20)
    ledger.grow(b, 4)
    before = [(e.pages_mapped, e.pages_in_use, e.release_asked) for e in ledger.entries()]
    start = time.monotonic()
    with pytest.raises(OutOfPagesError, match=r"asked idle models for 0 pages and waited 0\.0 s"):
        ledger.grow(b, 1, timeout_s=5)
    assert time.monotonic() - start < 1
    assert [(e.pages_mapped, e.pages_in_use, e.release_asked) for e in ledger.entries()] == before
    ledger.set_in_use(a, 19)  # one idle page: asked for, and waited on (nobody answers for a here)
    start = time.monotonic()
    with pytest.raises(OutOfPagesError, match=r"asked idle models for 1 pages and waited 0\.[2-9] s"):
        ledger.grow(b, 1, timeout_s=0.2)
    assert time.monotonic() - start >= 0.2
    assert [e.release_asked for e in ledger.entries()] == [0, 0]


def test_dead_processes_entries_are_reclaimed(path, ledger):
    pid = os.fork()
    if pid == 0:  # a model that exits without unregistering, through the ledger it inherited
        try:
            ledger.grow(ledger.register("gone"), 7)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert total(ledger) == 0 and ledger.reap_dead() == []  # entries() reaped it already
    ledger.register("gone")


def test_a_dead_process_still_holding_device_memory_keeps_its_pages_counted(path, ledger, monkeypatch):
    """A killed process leaves /proc before the driver frees its memory: while ``holders`` (NVML) lists its pid its
    pages stay counted (a grow that needs them waits; a lowered budget asks nothing of it), entries() mark it
    exiting, its name is free again, and once it is no longer listed, or DYING_MAX_S later, its entry goes. Without
    an answer (no NVML) it goes at once."""
    import vkv.allocator.ledger as ledger_module

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    listed = {child.pid}
    ledger.holders = lambda: set(listed)
    gone = dead_entry(ledger, "gone", 20, child.pid)  # 20 of the 24 pages
    patch_row(path, gone, pid_start=proc_start(child.pid))  # the child's own start: alive until it ends
    child.stdin.close()
    child.wait()
    ledger.set_budget(16 * PAGE)  # its first look since the child died: 4 pages over, but not asked of the dead
    assert [(e.name, e.release_asked, e.exiting) for e in ledger.entries()] == [("gone", 0, True)]
    ledger.set_budget(24 * PAGE)
    me = ledger.register("me")
    with pytest.raises(OutOfPagesError, match=r"its process exited; the driver is still freeing them"):
        ledger.grow(me, 8, timeout_s=0.1)
    assert total(ledger) == 20 and ledger.reap_dead() == []
    assert [(e.name, e.release_asked, e.exiting) for e in ledger.entries()] == [("gone", 0, True), ("me", 0, False)]
    again = ledger.register("gone")  # its name is free for a new model
    with pytest.raises(LedgerError, match="no model named 'nothing'.*live models: 'me', 'gone'"):
        ledger.set_limit("nothing", None)
    threading.Timer(0.2, listed.clear).start()  # the driver frees it: the waiting grow goes on
    start = time.monotonic()
    ledger.grow(me, 8, timeout_s=5)
    assert 0.1 < time.monotonic() - start < 2
    assert total(ledger) == 8 and sorted((e.name, e.exiting) for e in ledger.entries()) == [
        ("gone", False), ("me", False)
    ]  # fmt: skip
    ledger.unregister(again)

    monkeypatch.setattr(ledger_module, "DYING_MAX_S", 0.2)  # listed for good: reaped after DYING_MAX_S
    pid = a_dead_pid()
    listed.add(pid)
    dead_entry(ledger, "late", 3, pid)
    assert ledger.reap_dead() == [] and total(ledger) == 11
    time.sleep(0.25)
    assert ledger.reap_dead() == ["late"] and total(ledger) == 8

    ledger.holders = lambda: None  # no NVML: gone at once (once the last answer, HOLDERS_FRESH_S old, is stale)
    time.sleep(2 * ledger_module.HOLDERS_FRESH_S)
    dead_entry(ledger, "late", 3, pid)
    assert ledger.reap_dead() == ["late"] and total(ledger) == 8


EXITING_CHILD = """
import ctypes, os, sys, threading, time
def tail():
    sys.stdin.read()  # until the test closes our stdin
    os._exit(0)
threading.Thread(target=tail).start()
print(os.getpid(), flush=True)
ctypes.CDLL(None).syscall(60, 0)  # SYS_exit (x86_64): the main thread alone ends, as a kill's first step does
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the child ends its main thread with x86_64's SYS_exit")
def test_an_entry_stays_while_its_process_is_still_exiting(path, ledger):
    """A process whose main thread is a zombie while another of its threads runs (what a kill looks like while the
    last thread tears the process down) is not dead yet: its entry keeps its pages until the process is gone."""
    ledger.holders = lambda: None  # /proc alone decides here
    child = subprocess.Popen([sys.executable, "-c", EXITING_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert int(child.stdout.readline()) == child.pid
    start = proc_start(child.pid, exiting=True)
    gone = ledger.register("exiting")
    ledger.grow(gone, 5)
    patch_row(path, gone, pid=child.pid, pid_start=start)
    ledger._mine.discard(gone)
    deadline = time.monotonic() + 10
    while proc_start(child.pid) != -1 and time.monotonic() < deadline:  # the main thread becomes a zombie
        time.sleep(0.01)
    assert proc_start(child.pid) == -1 and proc_start(child.pid, exiting=True) == start > 0
    assert ledger.reap_dead() == [] and total(ledger) == 5
    child.stdin.close()
    child.wait()
    assert ledger.reap_dead() == ["exiting"] and total(ledger) == 0


def test_an_entry_whose_pid_was_reused_is_reclaimed(path, ledger):
    a = ledger.register("a")
    ledger.grow(a, 3)
    patch_row(path, a, pid_start=proc_start(os.getpid()) - 1)  # as if this pid had died and been reused since
    assert ledger.reap_dead() == ["a"] and ledger.entries() == []


def test_openers_racing_to_create_a_ledger_share_one_file(path):
    opened: list[Ledger] = []

    def open_with(budget_pages: int) -> None:
        opened.append(Ledger.open(budget_bytes=budget_pages * PAGE, page_size=PAGE, path=path))

    threads = [threading.Thread(target=open_with, args=(n,)) for n in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 8 and len({ledger.budget_pages for ledger in opened}) == 1
    assert sorted(os.listdir(os.path.dirname(path))) == ["ledger"]  # no temporary file left
    for ledger in opened:
        ledger.close()


def test_a_killed_process_gives_its_pages_back(path):
    with Ledger.open(budget_bytes=12 * PAGE, page_size=PAGE, path=path) as ledger:
        holder = subprocess.Popen([sys.executable, WORKER, "hold", path, "victim", "10"], stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"ready\n"
            assert [(e.name, e.pid, e.pages_mapped) for e in ledger.entries()] == [("victim", holder.pid, 10)]
            other = ledger.register("other")
            assert not ledger.try_grow(other, 12)
            holder.send_signal(signal.SIGKILL)
            while not _zombie(holder.pid):  # dead, not waited for yet: a zombie counts as dead
                time.sleep(0.001)
            ledger.grow(other, 12, timeout_s=10)
            assert [(e.name, e.pages_mapped) for e in ledger.entries()] == [("other", 12)]
            ledger.shrink(other, 12)
            ledger.register("victim")  # the name is free again
        finally:
            holder.kill()
            holder.wait()


def _zombie(pid: int) -> bool:
    """``pid`` has exited, all its threads too, and nobody has waited for it yet (/proc: state Z, one task)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        state = f.read().rsplit(b")", 1)[1].split()[0]
    return state == b"Z" and len(os.listdir(f"/proc/{pid}/task")) == 1


def test_four_processes_never_exceed_the_budget_nor_lose_data(path):
    with Ledger.open(budget_bytes=24 * PAGE, page_size=PAGE, path=path) as ledger:
        swarm = subprocess.Popen(
            [sys.executable, WORKER, "swarm", path, "4", "150", "7"], stdout=subprocess.PIPE, text=True
        )
        peak = seen = 0
        while swarm.poll() is None:
            entries = ledger.entries()
            mapped = sum(e.pages_mapped for e in entries)
            assert mapped <= 24, entries
            assert all(e.pages_in_use <= e.pages_mapped for e in entries)
            peak, seen = max(peak, mapped), max(seen, len(entries))
            time.sleep(0.001)
        out, _ = swarm.communicate()
        assert swarm.returncode == 0, out
        counts = json.loads(out)
        assert ledger.entries() == [] and seen == 4 and peak >= 20
        assert all(c["checks"] > 150 and c["grown"] > 0 for c in counts), counts
        assert sum(c["released"] for c in counts) > 0, counts  # release requests were answered


def _corrupt_magic(path):
    with open(path, "r+b") as f:
        f.write(b"NOTVKV!!")


def _truncate(path):
    os.truncate(path, 100)


def _empty(path):
    os.truncate(path, 0)


@pytest.mark.parametrize("damage", [_corrupt_magic, _truncate, _empty])
def test_a_corrupted_ledger_is_refused(path, damage):
    Ledger.open(budget_bytes=4 * PAGE, page_size=PAGE, path=path).close()
    damage(path)
    with pytest.raises(LedgerError, match=f"corrupted ledger at {path}: "):
        Ledger.open(budget_bytes=4 * PAGE, page_size=PAGE, path=path)


def test_damage_while_open_is_refused_too(path, ledger):
    a = ledger.register("a")
    _corrupt_magic(path)
    with pytest.raises(LedgerError, match=f"corrupted ledger at {path}: it changed under vkv"):
        ledger.grow(a, 1)


def test_a_ledger_others_can_read_is_refused(path, ledger):
    os.chmod(path, 0o644)
    with pytest.raises(LedgerError, match=f"ledger {path} has mode 0644, expected 0600"):
        Ledger.open(page_size=PAGE, path=path)


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_another_users_ledger_is_refused(path, ledger):
    os.chown(path, 65534, 65534)
    with pytest.raises(LedgerError, match=f"ledger {path} is owned by uid 65534, expected this user"):
        Ledger.open(page_size=PAGE, path=path)


def test_another_users_ledger_is_refused_without_root(path, ledger, monkeypatch):
    owner = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)  # the file's owner is now someone else
    with pytest.raises(LedgerError, match=f"ledger {path} is owned by uid {owner}, expected this user"):
        Ledger.open(page_size=PAGE, path=path)


def test_a_symlink_is_not_followed(path, ledger, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(LedgerError, match="cannot open ledger .*link"):
        Ledger.open(page_size=PAGE, path=link)
