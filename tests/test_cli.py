# SPDX-License-Identifier: Apache-2.0
import fcntl
import json
import os
import pty
import queue
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from vkv.allocator.ledger import Ledger
from vkv.cli import main, parse_size


def _vkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vkv.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_reports_backend_page_size_and_pool(backend):
    done = _vkv("info", "--backend", backend, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["backend"] == backend and report["page_size"] == 2 << 20 and report["probe_pages_ok"]
    pool = report["pool"]
    assert (pool["created"], pool["reused"], pool["in_use"], pool["free"]) == (2, 1, 1, 1)
    table = _vkv("info", "--backend", backend)
    assert table.returncode == 0 and "page size  2048 KiB" in table.stdout


def test_info_refuses_an_unknown_backend():
    done = _vkv("info", "--backend", "tpu")
    assert done.returncode == 2 and "invalid choice: 'tpu'" in done.stderr


PAGE = 2 << 20


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger.open(budget_bytes=24 * PAGE, page_size=PAGE, path=tmp_path / "ledger")
    yield ledger
    ledger.close()


@pytest.mark.parametrize(
    "text, size",
    [("8GiB", 8 << 30), ("512MiB", 512 << 20), ("1.5G", 3 << 29), ("4096", 4096), ("2 MB", 2_000_000),
     ("1k", 1024), ("none", None)],
)  # fmt: skip
def test_sizes_parse(text, size):
    assert parse_size(text) == size


def test_top_shows_every_model_with_rates(ledger):
    llama = ledger.register("llama-8b", priority=2, min_bytes=2 * PAGE, limit_bytes=16 * PAGE)
    qwen = ledger.register("qwen-0.5b")
    ledger.grow(llama, 10)
    ledger.set_in_use(llama, 7)
    ledger.grow(qwen, 3)
    stop = threading.Event()

    def churn():  # qwen maps and unmaps a page every few ms while top measures
        while not stop.wait(0.002):
            ledger.grow(qwen, 1)
            ledger.shrink(qwen, 1)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        done = _vkv("top", "--once", "--interval", "0.2", "--path", ledger.path)
    finally:
        stop.set()
        thread.join()
    assert done.returncode == 0, done.stderr
    where, budget, columns, first, second = done.stdout.splitlines()
    head = "page 2 MiB  models 2  "
    shown = where.removeprefix(head)  # a long path keeps its end, cut at 80 columns
    assert where.startswith(head) and len(where) <= 80 and ledger.path.endswith(shown.removeprefix("~"))
    # top reads the ledger once per refresh; the churn may be between its grow and its shrink then (qwen 4 pages)
    qwen_pages = int(done.stdout.splitlines()[-1].split()[2].removesuffix("M")) // 2
    assert qwen_pages in (3, 4)
    total = 10 + qwen_pages
    share = round(100 * total / 24)
    assert budget == f"budget 24 (48 MiB)  mapped {total} ({2 * total} MiB) {share}%  in use 7 (14 MiB)"
    assert columns.split() == ["MODEL", "PID", "MAPPED", "USED", "LIMIT", "PRIO/MIN", "MAP/s", "UNMAP/s", "ASKED"]
    pid = str(os.getpid())
    assert first.split() == ["llama-8b", pid, "20M", "14M", "32M", "2/4M", "0.0", "0.0", "0"]
    name, qpid, mapped, *_, prio, up, down, asked = second.split()
    assert (name, qpid, prio, asked) == ("qwen-0.5b", pid, "0/0", "0")
    assert 10 < float(up) < 600 and 10 < float(down) < 600  # pages/s


def test_top_refreshes_until_interrupted(ledger):
    ledger.register("m")
    top = subprocess.Popen(
        [sys.executable, "-m", "vkv.cli", "top", "--interval", "0.05", "--path", ledger.path],
        stdout=subprocess.PIPE,
        text=True,
    )
    frames = 0
    for line in top.stdout:
        frames += line.startswith("\x1b[H\x1b[2J")
        if frames == 3:
            break
    top.send_signal(signal.SIGINT)
    assert top.wait(timeout=30) == 0 and frames == 3


def test_limit_changes_a_running_model(ledger):
    m = ledger.register("m")
    ledger.grow(m, 6)
    done = _vkv("limit", "m", "8MiB", "--path", ledger.path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "limit of 'm' set to 4 pages (8 MiB); it has 6 pages mapped; asked to give back 2\n"
    assert ledger.entry(m).limit_pages == 4 and not ledger.try_grow(m, 1)
    assert main(["limit", "m", "none", "--path", ledger.path]) == 0 and ledger.try_grow(m, 1)


@pytest.mark.parametrize(
    "args, error",
    [
        (["limit", "nobody", "1GiB"], "vkv: no model named 'nobody' in the ledger at {path}; live models: 'm'"),
        (["top", "--once", "--path", "{path}-missing"], "vkv: no ledger at {path}-missing: no vkv process has"),
    ],
)
def test_limit_and_top_errors_exit_1(ledger, capsys, args, error):
    ledger.register("m")
    assert main([a.format(path=ledger.path) for a in args] + ["--path", ledger.path] * ("--path" not in args)) == 1
    assert capsys.readouterr().err.startswith(error.format(path=ledger.path))


BAD_ARGUMENTS = [
    (["limit", "m"], "required: size"),
    (["limit", "m", "8 furlongs"], "argument size: bad size '8 furlongs': expected a number of bytes or a size like"),
    (["limit", "m", "99999999999999999999T"], "size '99999999999999999999T' is too large: expected at most"),
    (["limit", "m", "1KiB"], "vkv limit: error: limit_bytes must be at least one page (2 MiB), got 1024 bytes"),
    (
        ["limit", "m\x1b[2J", "1GiB"],
        r"a model name must be 1 to 48 utf-8 bytes of printable characters, got 'm\x1b[2J'",
    ),
    (["limit", "", "1GiB"], "a model name must be 1 to 48 utf-8 bytes"),
    (["limit", "m", "1GiB", "--device", "../x"], "vkv limit: error: device '../x' must be"),
    (["top", "--interval", "0"], "must be > 0 and at most 86400 seconds, got 0"),
    (["top", "--interval", "inf"], "must be > 0 and at most 86400 seconds, got inf"),
    (["top", "--interval", "nan"], "must be > 0 and at most 86400 seconds, got nan"),
    (["top", "--interval", "1e400"], "must be > 0 and at most 86400 seconds, got 1e400"),
    (["top", "--interval", "soon"], "expected a number of seconds, got 'soon'"),
    (["top", "--once", "--device", ""], "vkv top: error: device '' must be"),
    (["top", "--path", "a", "--ledger-dir", "b"], "argument --ledger-dir: not allowed with argument --path"),
]


@pytest.mark.parametrize("args, error", BAD_ARGUMENTS)
def test_argument_errors_exit_2_with_the_usage(ledger, capsys, args, error):
    """Issue 12 #13: bad input gave struct.error / OverflowError tracebacks (or exit 1 for a bad size)."""
    ledger.register("m")
    args = args + ["--path", ledger.path] * (args[0] == "limit" and "--device" not in args)
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("usage: vkv ") and error in err, err
    assert ledger.entries()[0].limit_pages == 0  # nothing changed


@pytest.mark.parametrize("args", [["limit", "m", "99999999999999999999T"], ["top", "--interval", "inf"]])
def test_no_traceback_from_the_command_line(args):
    done = _vkv(*args)
    assert done.returncode == 2 and "usage: vkv" in done.stderr and "Traceback" not in done.stderr, done.stderr


def _poison_name(ledger, entry, raw: bytes) -> None:
    """Write a raw name into an entry (another program's or a damaged file's): the ledger refuses it in register()."""
    from vkv.allocator.ledger_file import ENTRY, HEADER

    fd = os.open(ledger.path, os.O_RDWR)
    try:
        os.pwrite(fd, raw.ljust(48, b"\0"), HEADER.size + entry * ENTRY.size + 8)  # after used, pad, priority
    finally:
        os.close(fd)


def test_top_escapes_control_characters_and_fits_80_columns(ledger):
    """Issue 12 #16 and #19: names were printed raw (a name could clear the screen), lines wrapped at 80."""
    big = ledger.register("y" * 48, priority=-2147483648, min_bytes=2 * PAGE, limit_bytes=24 * PAGE)
    ledger.grow(big, 20)
    ledger.set_in_use(big, 17)
    evil = ledger.register("placeholder")
    _poison_name(ledger, evil, b"ev\x1b[2J\x07il\n")
    done = _vkv("top", "--once", "--interval", "0.05", "--path", ledger.path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert not any(c in done.stdout for c in "\x1b\x07\r") and len(lines) == 5
    assert max(len(line) for line in lines) <= 80, lines
    assert lines[3].startswith("y" * 12) and lines[3].split()[0].endswith("~")  # the long name is cut
    assert lines[3].split()[2:] == ["40M", "34M", "48M", "-2147483648/4M", "0.0", "0.0", "0"]
    assert lines[4].startswith("ev\\x1b[2J\\x07il\\n ")


class _Output:
    """A child's stdout lines, read by a thread: a test waits for each line at most ``limit_s`` (a top that hangs
    or prints nothing fails the test instead of blocking it)."""

    def __init__(self, stream):
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def until(self, predicate, limit_s: float = 20.0) -> list[str]:
        """The lines read up to and including the first that satisfies ``predicate``."""
        deadline, seen = time.monotonic() + limit_s, []
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 1e-3))
            except queue.Empty:
                raise AssertionError(f"no such line within {limit_s} s; last lines: {seen[-5:]}") from None
            assert line is not None, f"top exited; last lines: {seen[-5:]}"
            seen.append(line.rstrip("\n").removeprefix("\x1b[H\x1b[2J"))
            if predicate(seen[-1]):
                return seen


def _top(path, **popen) -> tuple[subprocess.Popen, _Output]:
    cmd = [sys.executable, "-m", "vkv.cli", "top", "--interval", "0.05", "--path", str(path)]
    top = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    return top, _Output(top.stdout)


def _stop(top: subprocess.Popen) -> None:
    if top.poll() is None:
        top.send_signal(signal.SIGINT)
    try:
        assert top.wait(timeout=30) == 0, top.stderr.read()
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()


def test_top_waits_for_a_ledger_then_shows_it(tmp_path):
    """Issue 12 #19: top exited at once when no ledger existed."""
    path = tmp_path / "ledger"
    top, out = _top(path)
    try:
        frame = out.until(lambda line: "Ctrl-C quits" in line)
        assert all(len(line) <= 80 for line in frame)
        text = " ".join(frame)
        assert "waiting for a ledger at" in text and "no vkv process has created one yet" in text
        assert str(path) in text.replace(" ", "")  # the path, wrapped at 80 columns where it is long
        with Ledger.open(budget_bytes=8 * PAGE, page_size=PAGE, path=path) as made:
            made.register("late")
            out.until(lambda line: line.startswith("late "))
    finally:
        _stop(top)


def test_top_keeps_refreshing_while_a_stopped_member_holds_the_lock(ledger):
    """Issue 12 #4 / #19: a member stopped with the lock held made top hang; now each frame says so."""
    ledger.register("m")
    holder = os.open(ledger.path, os.O_RDWR)  # another open file: its flock excludes the ledger's
    top, out = _top(ledger.path)
    try:
        out.until(lambda line: line.startswith("m "))  # a first table
        fcntl.flock(holder, fcntl.LOCK_EX)
        out.until(lambda line: line.startswith("ledger busy: "))
        lines = out.until(lambda line: line.startswith("ledger busy: "))  # and the next frame
        assert any(line.startswith("m ") for line in lines), "the last table stays on screen"
        fcntl.flock(holder, fcntl.LOCK_UN)
        frame = []
        while not frame or any(line.startswith("ledger busy") for line in frame):  # refreshing again
            frame = out.until(lambda line: "Ctrl-C quits" in line)[-4:]
    finally:
        os.close(holder)
        _stop(top)


def test_q_quits_top_on_a_terminal_and_restores_it(ledger):
    """Issue 12 #19: q did nothing (stdin was never read); the terminal comes back in its own mode."""
    ledger.register("m")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    top, out = _top(ledger.path, stdin=slave)
    try:
        out.until(lambda line: "q or Ctrl-C quits" in line)
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # cbreak while top runs
        os.write(master, b"x")  # another key does nothing
        out.until(lambda line: line.startswith("m "))
        out.until(lambda line: line.startswith("m "))
        os.write(master, b"q")
        assert top.wait(timeout=10) == 0, top.stderr.read()
        assert termios.tcgetattr(slave) == before
    finally:
        _stop(top)
        os.close(master)
        os.close(slave)
