# SPDX-License-Identifier: Apache-2.0
"""One allocator per device (issue 17): a device index from the driver down to the pool, the cache and the ledger;
nothing assumes device 0. On the CPU the host backend's device index is a label: two host devices are two memfds,
two pools and two ledgers, which is what tensor-parallel ranks on the CPU use."""

import os
import subprocess
import sys

import pytest
import torch

from vkv import CacheConfig, KVCache
from vkv.allocator import InvalidRequestError, Ledger, OutOfPagesError, PagePool, VirtualRange, get_driver
from vkv.allocator.ledger import ledger_devices
from vkv.cli import main

from .ledger_rows import a_dead_pid, dead_entry

PAGE = 2 << 20
BAD_DEVICES = [-1, True, 1.0, "1", 1 << 16]


@pytest.fixture
def ledgers(tmp_path):
    """Device 0's and device 1's ledgers in one directory, of different budgets."""
    made = [Ledger.open(d, budget_bytes=b * PAGE, page_size=PAGE, directory=tmp_path) for d, b in ((0, 6), (1, 4))]
    yield made
    for ledger in made:
        ledger.close()


def _vkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vkv.cli", *args], capture_output=True, text=True, timeout=120)


def test_host_devices_share_no_pages():
    pools = [PagePool(get_driver("host", device=d), budget_bytes=4 * PAGE) for d in (0, 1)]
    ranges = [VirtualRange(pool, num_pages=2) for pool in pools]
    try:
        assert [p.device for p in pools] == [0, 1] and [p.driver.index for p in pools] == [0, 1]
        for value, r in enumerate(ranges, start=1):
            r.map([0])
            r.tensor()[:PAGE] = value
        # both drivers' first page is offset 0 of their own memfd: the same handle, different memory
        assert [int(r.tensor()[:PAGE].float().mean()) for r in ranges] == [1, 2]
        page = pools[0].acquire(1)
        with pytest.raises(InvalidRequestError, match="in use at 0 addresses"):
            pools[1].release(page)
        pools[0].release(page)
        assert [p.stats().in_use for p in pools] == [1, 1]
    finally:
        for r in ranges:
            r.close()
        for pool in pools:
            pool.close()


def test_budgets_are_per_device(ledgers):
    pools = [PagePool("host", ledger.budget_pages * PAGE, ledger=ledger, name="m") for ledger in ledgers]
    try:
        assert [p.device for p in pools] == [0, 1]  # a driver for each ledger's device
        held = pools[0].acquire(6)
        with pytest.raises(OutOfPagesError):
            pools[0].acquire(1)
        other = pools[1].acquire(4)  # device 0's full budget takes nothing from device 1's
        assert [[(e.name, e.pages_mapped) for e in ledger.entries()] for ledger in ledgers] == [[("m", 6)], [("m", 4)]]
        pools[0].release(held)
        pools[1].release(other)
    finally:
        for pool in pools:
            pool.close()
    assert [ledger.entries() for ledger in ledgers] == [[], []]


def test_the_ledger_is_found_by_device(tmp_path, ledgers):
    assert [ledger.device for ledger in ledgers] == ["0", "1"] and ledger_devices(tmp_path) == ["0", "1"]
    assert ledgers[1].path == str(tmp_path / "ledger-1")
    with Ledger.open(directory=tmp_path) as first:  # no device: device 0's
        assert first.device == "0" and first.path == ledgers[0].path
    with Ledger.open(path=ledgers[1].path) as by_path:
        assert by_path.device is None
        pool = PagePool(get_driver("host", device=3), 4 * PAGE, ledger=by_path)  # a path says no device: trusted
        pool.close()


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_bad_device_index_is_refused(device):
    with pytest.raises(InvalidRequestError, match="device must be an int"):
        get_driver("host", device=device)
    with pytest.raises(InvalidRequestError, match="device must be an int"):
        PagePool("host", 4 * PAGE, device=device)


def test_a_pool_refuses_another_device(ledgers):
    driver = get_driver("host", device=1)
    with pytest.raises(InvalidRequestError, match="device 0 was asked for but the driver is device 1's"):
        PagePool(driver, 4 * PAGE, device=0)
    with pytest.raises(InvalidRequestError, match=r"counts device 0's pages but this pool is for device 1; expected"):
        PagePool(driver, 4 * PAGE, ledger=ledgers[0], name="m")
    with pytest.raises(InvalidRequestError, match=r"counts device 1's pages but this pool is for device 0"):
        PagePool("host", 4 * PAGE, device=0, ledger=ledgers[1], name="m")
    assert [ledger.entries() for ledger in ledgers] == [[], []]  # nothing registered


def test_the_cache_takes_a_device():
    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, max_slots=2, max_seq_len=64)
    cache = KVCache(config, backend="host", budget_bytes=8 * PAGE, device=1)
    try:
        assert cache.pool.device == 1
        with pytest.raises(InvalidRequestError, match="device 0 was asked for but the pool is device 1's"):
            KVCache(config, cache.pool, device=0)
    finally:
        cache.close()
        cache.pool.close()


def test_top_shows_every_device(tmp_path, ledgers):
    for ledger, (name, pages) in zip(ledgers, (("llama", 5), ("qwen", 3)), strict=True):
        ledger.grow(ledger.register(name), pages)
    done = _vkv("top", "--once", "--interval", "0.05", "--ledger-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    blocks = [block.splitlines() for block in done.stdout.strip().split("\n\n")]
    assert [block[0].split("  ")[0] for block in blocks] == ["device 0", "device 1"]
    assert [block[1].split("  ")[0] for block in blocks] == ["budget 6 (12 MiB)", "budget 4 (8 MiB)"]
    pid = str(os.getpid())
    assert [block[3].split()[:3] for block in blocks] == [["llama", pid, "10M"], ["qwen", pid, "6M"]]
    one = _vkv("top", "--once", "--interval", "0.05", "--ledger-dir", str(tmp_path), "--device", "1")
    assert one.returncode == 0 and one.stdout.startswith("device 1  ") and "\n\n" not in one.stdout.strip()


def test_top_waits_for_any_device(tmp_path):
    top = subprocess.Popen(
        [sys.executable, "-m", "vkv.cli", "top", "--interval", "0.05", "--ledger-dir", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "waiting for a ledger in" in top.stdout.readline() + top.stdout.readline()
        with Ledger.open(2, budget_bytes=4 * PAGE, page_size=PAGE, directory=tmp_path) as late:
            late.register("late")
            for line in top.stdout:
                if line.startswith("late "):
                    break
    finally:
        top.terminate()
        top.wait(timeout=30)


def test_limit_reaches_every_device_of_a_model(tmp_path, ledgers, capsys):
    entries = [ledger.register("tp-model") for ledger in ledgers]
    for ledger, entry in zip(ledgers, entries, strict=True):
        ledger.grow(entry, 3)
    assert main(["limit", "tp-model", "4MiB", "--ledger-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["device 0", "device 1"]
    assert [ledger.entry(e).limit_pages for ledger, e in zip(ledgers, entries, strict=True)] == [2, 2]
    assert main(["limit", "nobody", "4MiB", "--ledger-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no model named 'nobody' in the ledgers of devices 0, 1" in err and "'tp-model'" in err
    assert main(["limit", "tp-model", "none", "--ledger-dir", str(tmp_path), "--device", "1"]) == 0
    assert [ledger.entry(e).limit_pages for ledger, e in zip(ledgers, entries, strict=True)] == [2, 0]


def test_limit_changes_no_device_when_one_refuses(tmp_path, ledgers, capsys):
    ledgers[0].register("m")
    ledgers[1].register("m", min_bytes=4 * PAGE)
    with pytest.raises(SystemExit) as exited:
        main(["limit", "m", "4MiB", "--ledger-dir", str(tmp_path)])
    assert exited.value.code == 2 and "below 'm''s minimum of 4 pages" in capsys.readouterr().err
    assert [e.limit_pages for ledger in ledgers for e in ledger.entries()] == [0, 0]


def test_limit_leaves_an_exiting_processs_entry_alone(tmp_path, ledgers, capsys, monkeypatch):
    """Device 1's "m" is the entry of a process that has exited while the driver (NVML) still holds its memory: not
    the model "m" any more. `vkv limit m` changes device 0's live one and reports no failure for device 1."""
    import vkv.allocator.ledger as ledger_module

    pid = a_dead_pid()
    monkeypatch.setattr(ledger_module, "device_holders", lambda: {pid})  # every ledger opened from here on
    for ledger in ledgers:
        ledger.holders = ledger_module.device_holders
    live = ledgers[0].register("m")
    dead_entry(ledgers[1], "m", 2, pid)
    assert main(["limit", "m", "4MiB", "--ledger-dir", str(tmp_path)]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["device 0"]
    assert ledgers[0].entry(live).limit_pages == 2
    assert [(e.name, e.exiting, e.limit_pages) for e in ledgers[1].entries()] == [("m", True, 0)]


@pytest.mark.gpu
def test_cuda_pools_on_two_devices():
    from vkv.allocator import cuda_usable

    if not cuda_usable() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    count = torch.cuda.device_count()
    with pytest.raises(InvalidRequestError, match=f"device {count} does not exist: torch sees {count} CUDA"):
        get_driver("cuda", device=count)
    pools = [PagePool(get_driver("cuda", device=d), budget_bytes=4 * PAGE) for d in (0, 1)]
    ranges = [VirtualRange(pool, num_pages=2) for pool in pools]
    try:
        for value, r in enumerate(ranges, start=1):
            r.map([0])
            view = r.tensor()
            assert view.device == torch.device("cuda", value - 1)
            view[:PAGE] = value
        assert [int(r.tensor()[:PAGE].float().mean()) for r in ranges] == [1, 2]
        free = [p.driver.memory_info()[0] for p in pools]  # each of its own device
        assert free[0] != free[1] or torch.cuda.mem_get_info(0)[0] == torch.cuda.mem_get_info(1)[0]
    finally:
        for r in ranges:
            r.close()
        for pool in pools:
            pool.close()
