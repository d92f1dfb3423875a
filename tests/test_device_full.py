# SPDX-License-Identifier: Apache-2.0
"""A device with no memory left for pages the budget allows (cuMemCreate's CUDA_ERROR_OUT_OF_MEMORY, fallocate's
ENOMEM or ENOSPC on the host): the pool refuses as it does at its budget (DeviceFullError, an OutOfPagesError) with
nothing changed, and the engine's requests wait or are preempted and recomputed, not failed.

The faults are injected into the real host driver (tests/faults.py): the real page creation is what fails."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from vkv import CacheConfig, DeviceFullError, DriverError, KVCache, OutOfPagesError
from vkv.allocator import Ledger, PagePool, cuda_usable, get_driver

from .conftest import PAGE
from .faults import Faults, FaultyDriver, Injected


def _alive(pool: PagePool) -> int:
    """Pages really alive: the memfd's allocated blocks."""
    return os.fstat(getattr(pool.driver, "inner", pool.driver)._fd).st_blocks * 512 // PAGE


def _counts(pool: PagePool, ledger: Ledger | None) -> tuple:
    s = pool.stats()
    owned = ledger.stats().pages_mapped if ledger is not None else None
    return s.live, s.in_use, s.free, s.created, s.released, s.reused, _alive(pool), owned


@pytest.mark.parametrize("name", ["CUDA_ERROR_OUT_OF_MEMORY", "ENOMEM", "ENOSPC"])
@pytest.mark.parametrize("with_ledger", [False, True], ids=["own-budget", "ledger"])
def test_a_full_device_is_refused_like_the_budget_with_nothing_changed(name, with_ledger, tmp_path):
    faults = Faults()
    ledger = Ledger.open(budget_bytes=16 * PAGE, page_size=PAGE, path=str(tmp_path / "ledger")) if with_ledger else None
    pool = PagePool(FaultyDriver(get_driver("host", page_size=PAGE), faults), 16 * PAGE, ledger=ledger)
    try:
        held = pool.acquire(3)
        pool.release(held[:1])  # one free page: the next acquire reuses it, then creates the rest
        before = _counts(pool, ledger)
        faults.arm("create", 2, name=name)  # the second page created for the next acquire
        with pytest.raises(DeviceFullError, match="no memory left") as caught:
            pool.acquire(4)
        assert isinstance(caught.value, OutOfPagesError)
        assert isinstance(caught.value.__cause__, DriverError) and caught.value.__cause__.name == name
        assert _counts(pool, ledger) == before and pool.stats().device_full == pool.device_full == 1
        pages = pool.acquire(4)  # the device has room again: the same call succeeds
        assert len({int(p) for p in pages + held[1:]}) == 6 and pool.stats().in_use == 6
        pool.release(pages + held[1:])
    finally:
        pool.close()
        if ledger is not None:
            ledger.close()


@pytest.mark.gpu
def test_a_really_full_gpu_is_refused_like_the_budget_with_nothing_changed():
    """The real driver on a GPU that a tensor fills but for a few pages, under a budget larger than the GPU: creating
    the pages fails with CUDA_ERROR_OUT_OF_MEMORY, the pool refuses with DeviceFullError and gives back the pages it
    had created for the call (the GPU's free memory as before); once the tensor is gone, the same call succeeds."""
    if not cuda_usable():
        pytest.skip("needs a CUDA GPU")
    driver = get_driver("cuda")
    page = driver.page_size
    pool = PagePool(driver, (torch.cuda.mem_get_info()[1] // page + 64) * page)  # more than the whole GPU
    filler = None
    try:
        held = pool.acquire(2)
        torch.cuda.empty_cache()
        filler = torch.empty(torch.cuda.mem_get_info()[0] - 8 * page, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        free, before = torch.cuda.mem_get_info()[0], pool.stats()
        assert free < 16 * page  # room for a few pages, not 64
        with pytest.raises(DeviceFullError, match="no memory left") as caught:
            pool.acquire(64)
        assert isinstance(caught.value.__cause__, DriverError)
        assert caught.value.__cause__.name == "CUDA_ERROR_OUT_OF_MEMORY"
        after = pool.stats()
        assert (after.live, after.in_use, after.free, after.created - after.released) == (
            before.live, before.in_use, before.free, before.created - before.released
        )  # fmt: skip
        assert after.device_full == 1 and abs(torch.cuda.mem_get_info()[0] - free) < page  # none kept
        del filler
        filler = None
        torch.cuda.empty_cache()
        pages = pool.acquire(64)
        assert pool.stats().in_use == 66
        pool.release(pages + held)
    finally:
        del filler
        pool.close()
        torch.cuda.empty_cache()


def test_a_full_device_takes_the_caches_idle_pages_instead_of_new_ones():
    """The budget is not short, so acquire asked the caches for nothing; the device is: idle pages kept by a cache
    (a finished request's) serve instead, and the acquire succeeds."""
    faults = Faults()
    pool = PagePool(FaultyDriver(get_driver("host", page_size=PAGE), faults), 16 * PAGE)
    config = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32, max_slots=4, max_seq_len=4096)
    kv = KVCache(config, pool)
    try:
        slot = kv.allocate(2048)
        kv.grow(slot, 2048)
        kv.free(slot)  # its pages stay mapped in the cache, idle, for the next request
        idle, alive = kv.stats().idle_pages, _alive(pool)
        assert idle >= 2 and pool.stats().free == 0
        faults.arm("create", 1, name="CUDA_ERROR_OUT_OF_MEMORY")
        pages = pool.acquire(2)
        assert faults.fired == ["create"] and pool.device_full == 1
        assert kv.stats().idle_pages == idle - 2 and _alive(pool) == alive  # reused, none created
        pool.release(pages)
    finally:
        kv.close()
        pool.close()


def test_through_a_ledger_a_full_device_asks_the_other_models_idle_pages_back(tmp_path):
    """Another process's pool keeps free pages on the device, counted in the ledger; the budget has room, so no
    growth asks for them. A full device does: the refusal asks them back, the other pool's answer releases them to
    the device, and the retry gets its pages."""
    with Ledger.open(budget_bytes=16 * PAGE, page_size=PAGE, path=str(tmp_path / "ledger")) as ledger:
        faults = Faults()
        other = PagePool(get_driver("host", page_size=PAGE), 16 * PAGE, ledger=ledger, name="other",
                         answer_interval_s=None)  # fmt: skip
        mine = PagePool(FaultyDriver(get_driver("host", page_size=PAGE), faults), 16 * PAGE, ledger=ledger,
                        name="mine", answer_interval_s=None)  # fmt: skip
        try:
            other.release(other.acquire(4))  # 4 free pages, alive, counted in the ledger
            other.answer_release_requests()  # publishes 0 in use: they are idle
            assert other.stats().free == 4 and ledger.asked(other._budget.entry) == 0
            faults.arm("create", 1, name="CUDA_ERROR_OUT_OF_MEMORY")
            with pytest.raises(DeviceFullError):
                mine.acquire(3)  # nothing of its own to reuse
            assert ledger.asked(other._budget.entry) == 3 and mine.stats().live == 0
            assert other.answer_release_requests() == 3 and other.stats().free == 1
            assert ledger.stats().pages_mapped == 1
            mine.release(mine.acquire(3))
        finally:
            mine.close()
            other.close()


def test_any_other_driver_error_still_raises_as_itself():
    faults = Faults()
    pool = PagePool(FaultyDriver(get_driver("host", page_size=PAGE), faults), 16 * PAGE)
    try:
        before = _counts(pool, None)
        faults.arm("create", 1)  # an error that is not the device's memory running out
        with pytest.raises(DriverError, match="INJECTED") as caught:
            pool.acquire(2)
        assert not isinstance(caught.value, OutOfPagesError)
        assert _counts(pool, None) == before and pool.device_full == 0
    finally:
        pool.close()


transformers = pytest.importorskip("transformers")


PROMPTS = [[5, 6, 7], list(range(10, 41)), [100, 3, 99, 4, 98, 5, 97]]
CONFIG = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "bos_token_id": None,
    "eos_token_id": None, "pad_token_id": None,
}  # fmt: skip


def _run(k: int | None):
    """The prompts through a tiny Llama on 4 KiB host pages (8 tokens: pages are created as the run goes), the k-th
    page creation failing as a full GPU fails it; returns ([(finish reason, tokens)], engine stats, faults)."""
    from vkv.engine import Engine, SamplingParams

    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    faults = Faults()
    pool = PagePool(FaultyDriver(get_driver("host", page_size=4096), faults), 1 << 20)
    with Engine(model, pool=pool, max_seq_len=128, max_num_seqs=4, max_num_batched_tokens=16) as engine:
        if k is not None:
            faults.arm("create", k, name="CUDA_ERROR_OUT_OF_MEMORY")
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0))
        stats = engine.stats()
    pool.close()
    return [(o.finish_reason, o.new_token_ids) for o in outs], stats, faults


@pytest.fixture(scope="module")
def clean_run():
    return _run(None)


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("which", ["first", "last"])
def test_the_engines_requests_wait_for_a_full_device_and_lose_nothing(which, clean_run, caplog):
    """The run's first page creation (a request's admission) or its last (a decoding request's growth) finds the
    device full: the request being admitted waits, or the newest request is preempted and recomputed; every request
    ends with the tokens of a run that met no fault, and the engine says why, once."""
    expected, clean, counted = clean_run
    assert clean["device_full"] == 0 and clean["preemptions"] == 0 and counted.calls["create"] > 3
    with caplog.at_level(logging.WARNING, logger="vkv.engine"):
        got, stats, faults = _run(1 if which == "first" else counted.calls["create"])
    assert faults.fired == ["create"] and stats["device_full"] == 1
    assert got == expected and all(reason == "length" for reason, _ in got)
    assert (stats["preemptions"] > 0) == (which == "last")  # an admission waits; a decoding request's growth preempts
    warnings = [r for r in caplog.records if r.name == "vkv.engine" and "no memory for KV pages" in r.getMessage()]
    assert len(warnings) == 1


class _Room(FaultyDriver):
    """The real host driver on a device with room for ``room`` pages: a creation past it fails as cuMemCreate fails
    on a full GPU; after ``after`` such failures the room becomes ``later`` (memory freed elsewhere), if given."""

    def __init__(self, room: int, later: int | None = None, after: int = 20):
        super().__init__(get_driver("host", page_size=4096), Faults())
        self.room, self.later, self.after, self.alive, self.refused = room, later, after, 0, 0

    def create_page(self):
        if self.alive >= self.room:
            self.refused += 1
            if self.later is not None and self.refused >= self.after:
                self.room = self.later
            raise Injected("cuMemCreate", 2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory")
        page = super().create_page()
        self.alive += 1
        return page

    def release_page(self, handle) -> None:
        super().release_page(handle)
        self.alive -= 1


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("room, later", [(4, 64), (4, None), (1, None)], ids=["room-comes", "stays-full", "no-room"])
def test_a_request_alone_on_a_full_device_waits_without_recompute_then_ends(room, later, clean_run):
    """One request that outgrows the device's room (the budget would hold it): it is not preempted to take its own
    pages back (no recompute), it waits; when room comes it finishes with the tokens of a run that met no fault;
    when none comes it ends after device_full_wait_s: with "length" and its tokens so far (a prefix of those), or,
    never admitted, with "error" saying why."""
    from vkv.engine import Engine, SamplingParams

    expected = clean_run[0][1][1]  # the 31-token prompt's 10 tokens
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**CONFIG), attn_implementation="sdpa"
    )
    driver = _Room(room, later)  # pages of 8 tokens: 4 hold the first chunks (32 tokens), not 41; the budget, 256
    pool = PagePool(driver, 1 << 20)
    wait = 0.3 if later is None else 60.0
    with Engine(
        model.eval(), pool=pool, max_seq_len=128, max_num_seqs=4, max_num_batched_tokens=16, device_full_wait_s=wait
    ) as engine:
        out = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0))[0]
        stats = engine.stats()
        assert engine.kv.stats().slots_in_use == 0
    pool.close()
    assert stats["preemptions"] == 0 and stats["device_full"] > 0 and driver.refused > 0
    if later is not None:
        assert out.finish_reason == "length" and out.new_token_ids == expected and driver.refused >= driver.after
    elif room == 4:
        assert out.finish_reason == "length" and 0 < out.num_output_tokens < 10
        assert out.new_token_ids == expected[: out.num_output_tokens]
    else:
        assert out.finish_reason == "error" and "no memory for the pages" in out.error and out.num_output_tokens == 0


def _two_engines(pool: PagePool, wait_s: float = 0.5):
    """Two engines of the same tiny Llama (one seed) on ``pool``, prompts cut in chunks of 16."""
    from vkv.engine import Engine

    engines = []
    for name in ("m0", "m1"):
        torch.manual_seed(1)
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**CONFIG), attn_implementation="sdpa"
        )
        engines.append(
            Engine(
                model.eval(),
                name=name,
                pool=pool,
                max_seq_len=128,
                max_num_seqs=4,
                max_num_batched_tokens=16,
                device_full_wait_s=wait_s,
            )  # fmt: skip
        )
    return engines


def _in_turn(engines, most: int = 600, each_step=None) -> int:
    """Step the engines in turn, as an EngineGroup does, until none has work; the steps taken (at most ``most``:
    more fails the test as a livelock)."""
    steps = 0
    while any(e.has_work() for e in engines):
        assert steps < most, f"no end after {steps} steps: {[e.stats() for e in engines]}"
        for e in engines:
            if e.has_work():
                e.step()
                steps += 1
                if each_step is not None:
                    each_step()
    return steps


@pytest.mark.cpu_kernels
@pytest.mark.parametrize("room, budget, tokens", [(10, 256, 24), (None, 10, 24)], ids=["device-10", "budget-10"])
def test_two_models_on_one_pool_take_turns_when_both_do_not_fit(room, budget, tokens, clean_run):
    """Two engines share a pool where both requests cannot grow together: a device with room for ``room`` pages
    of 8 tokens (the budget would hold both) or a budget of ``budget`` pages. The newer request yields to the
    older (it is preempted once, not over and over as when each preempted itself and took its own pages back),
    and both finish whole with the tokens of a run that met no shortage, however long the wait limit."""
    driver = _Room(room) if room is not None else get_driver("host", page_size=4096)
    pool = PagePool(driver, budget * 4096)
    engines = _two_engines(pool)
    try:
        from vkv.engine import SamplingParams

        requests = [e.add_request(PROMPTS[1], SamplingParams(max_tokens=tokens, temperature=0)) for e in engines]
        _in_turn(engines)
        assert [(r.finish_reason, len(r.output_ids)) for r in requests] == [("length", tokens)] * 2
        assert requests[0].output_ids == requests[1].output_ids
        assert requests[0].output_ids[:10] == clean_run[0][1][1]
        assert (sum(e.device_full for e in engines) > 0) == (room is not None)
        assert requests[0].preemptions == 0 and 0 < requests[1].preemptions <= 2
        assert all(e.kv.stats().slots_in_use == 0 for e in engines)
    finally:
        for e in engines:
            e.close()
        pool.close()


@pytest.mark.cpu_kernels
def test_a_request_asked_to_yield_by_one_that_then_ends_leaves_admission_free(clean_run):
    """The older request asks the newer (another engine's) to yield its pages, then is aborted before that engine
    steps: the newer one is preempted, and its engine admits it again (it does not wait for a finish that came
    before the yield) and it finishes whole."""
    from vkv.engine import SamplingParams

    pool = PagePool(get_driver("host", page_size=4096), 10 * 4096)
    engines = _two_engines(pool)
    try:
        requests = [e.add_request(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0)) for e in engines]
        aborted = []

        def abort_the_asker():
            if not aborted and requests[1].yield_asked is not None:
                engines[0].abort(requests[0].request_id)
                engines[0].step()  # the abort lands before m1 steps: the asker finished since it asked
                aborted.append(True)

        _in_turn(engines, each_step=abort_the_asker)
        assert aborted and requests[0].finish_reason == "abort"
        assert requests[1].finish_reason == "length" and requests[1].preemptions == 1
        assert requests[1].output_ids[:10] == clean_run[0][1][1]
    finally:
        for e in engines:
            e.close()
        pool.close()


@pytest.mark.cpu_kernels
def test_a_request_asked_to_yield_by_one_that_outgrows_the_budget_runs_again(clean_run):
    """The older request (90 new tokens: more than the 10-page budget can ever hold) asks the newer, another
    engine's, to yield; later it preempts itself and ends from the queue ("length", no finish of a running request
    on the pool): the newer one's engine admits it again all the same and it finishes whole."""
    from vkv.engine import SamplingParams

    pool = PagePool(get_driver("host", page_size=4096), 10 * 4096)
    engines = _two_engines(pool)
    try:
        older = engines[0].add_request(PROMPTS[1], SamplingParams(max_tokens=90, temperature=0))
        newer = engines[1].add_request(PROMPTS[1], SamplingParams(max_tokens=24, temperature=0))
        asked = []
        _in_turn(engines, each_step=lambda: asked.append(newer.yield_asked is not None))
        assert any(asked) and newer.preemptions >= 1
        assert older.finish_reason == "length" and len(older.output_ids) < 90
        assert newer.finish_reason == "length" and newer.output_ids[:10] == clean_run[0][1][1]
        assert len(newer.output_ids) == 24 and older.output_ids[:10] == clean_run[0][1][1]
    finally:
        for e in engines:
            e.close()
        pool.close()
