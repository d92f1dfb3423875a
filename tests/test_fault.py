# SPDX-License-Identifier: Apache-2.0
"""Touching a page that is not mapped faults, as on the GPU. Checked in a child process."""

import signal
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from vkv import CacheConfig, KVCache
    cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=2, max_seq_len=4096)
    cache = KVCache(cfg, backend=sys.argv[1], budget_bytes=16 << 20)
    slot = cache.allocate()
    cache.grow(slot, 100)  # maps tokens [0, 1024): one page
    k = cache.key_view(0)
    k[slot, :100] = 1.0
    print("mapped read:", float(k[slot, :100].sum()), flush=True)
    touched = k[slot, int(sys.argv[2])].sum()  # the faulting read
    print("value:", float(touched), flush=True)
    print("NO FAULT", flush=True)
    """
)


def _run(backend: str, token: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, str(token)], capture_output=True, text=True, timeout=120
    )


def test_reading_an_unmapped_page_faults(backend):
    done = _run(backend, 2000)  # token 2000 lies on the slot's second page, never mapped
    assert "mapped read: 12800.0" in done.stdout, done.stderr
    assert "NO FAULT" not in done.stdout
    if backend == "host":
        assert done.returncode == -signal.SIGSEGV
    else:
        assert done.returncode != 0 and "illegal" in done.stderr.lower()


def test_reading_a_mapped_page_does_not(backend):
    done = _run(backend, 1000)  # still on the first page
    assert done.returncode == 0 and "NO FAULT" in done.stdout, done.stderr
