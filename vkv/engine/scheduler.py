# SPDX-License-Identifier: Apache-2.0
"""Continuous batching over one model's KVCache: which requests run in the next step, and how many tokens each.

Each step has a token budget (``max_num_batched_tokens``). Decode tokens go first (one per running request
whose prompt is computed, oldest first), then prefill chunks: of running requests part-way through their
prompt, then of waiting requests admitted in arrival order while a slot is free and the pool gives the pages
(a chunk is as long as the budget left). Growth that the pool refuses preempts the newest running request: its
slot is freed, it goes back to the head of the queue with its output kept, and is recomputed (prompt + output)
when it is admitted again. Admission never preempts: a waiting request waits until pages come back (requests
finishing, idle models releasing theirs through the pool's reclaimers). A request that runs alone and whose growth
a full device refuses (DeviceFullError: the budget allows the pages, the device has no room) is not preempted,
which would only free pages for itself to take again: it keeps its slot and waits (``stalled_since``), as does
the head of the queue that a full device keeps out while nothing runs; the engine ends either if the device stays
full (Engine.device_full_wait_s). A forward the device has no memory for (activations, not pages) holds the
batch smaller (``hold``): the newest running request is preempted and none admitted in its place until one finishes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from vkv.allocator import DeviceFullError, OutOfPagesError
from vkv.cache import KVCache

from .request import Request, Status


@dataclass(slots=True)
class Scheduled:
    request: Request
    num_new: int  # tokens computed in this step, from request.computed on

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last token: the step samples its next one."""
        return self.request.computed + self.num_new == self.request.num_tokens


class Scheduler:
    def __init__(
        self,
        kv: KVCache,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_with_decode: int | None = None,
        decode_headroom: int = 16,
    ):
        self.kv = kv
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.prefill_with_decode = prefill_with_decode  # prompt tokens a step that decodes may add (None: no cap)
        self.decode_headroom = decode_headroom  # tokens mapped past an admitted chunk, so decode starts at once
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the newest is preempted first
        self.preemptions = 0
        self._preempted_now = 0  # preemptions in the step being scheduled
        self.admit_limit: int | None = None  # fewer running requests than max_num_seqs, until one finishes (hold())

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget, batch = self.max_num_batched_tokens, []
        self._preempted_now = 0
        for request in list(self.running):  # decode
            decoding = request.status is Status.RUNNING and request.remaining == 1
            if budget and decoding and self._grow(request, request.computed + 1, batch):
                batch.append(Scheduled(request, 1))
                budget -= 1
        if batch and self.prefill_with_decode is not None:  # short decode steps: prompts come in smaller chunks
            budget = min(budget, self.prefill_with_decode)
        for request in list(self.running):  # chunks of prompts under way
            if budget and request.status is Status.RUNNING and request.remaining > 1:
                n = min(request.remaining, budget)
                if self._grow(request, request.computed + n, batch):
                    batch.append(Scheduled(request, n))
                    budget -= n
        most = self.max_num_seqs if self.admit_limit is None else self.admit_limit
        while budget and self.waiting and len(self.running) < most and self.kv.can_allocate():
            if self._preempted_now:  # pages ran short this step: admit nobody (a preempted request would take
                break  # its own slot back, pages and all, and be preempted again: others get them first)
            request = self.waiting[0]
            n = min(request.remaining, budget)
            if not self._admit(request, n):
                break
            batch.append(Scheduled(request, n))
            budget -= n
        return batch

    def _admit(self, request: Request, n: int) -> bool:
        """Give the head of the queue a slot mapped for its first chunk (+ headroom); False if the pool says no."""
        kv = self.kv
        slot = kv.allocate(request.computed + n)
        try:
            try:
                kv.grow(slot, min(kv.config.max_seq_len, request.computed + n + self.decode_headroom))
            except OutOfPagesError:  # no headroom to spare: the chunk alone
                kv.grow(slot, request.computed + n)
        except OutOfPagesError as exc:
            kv.free(slot)
            if isinstance(exc, DeviceFullError) and self._alone_on_pool([]):  # nothing of this pool's to wait for
                request.stalled_since = request.stalled_since or time.monotonic()
            else:  # the budget, or pages other requests hold and will free: it waits for them, for as long as needed
                request.stalled_since = None
            return False
        except BaseException:
            kv.free(slot)
            raise
        self.waiting.popleft()
        request.slot, request.status, request.stalled_since = slot, Status.RUNNING, None
        self.running.append(request)
        return True

    def _grow(self, request: Request, tokens: int, batch: list[Scheduled]) -> bool:
        """Map ``request``'s slot for ``tokens``; when the pool refuses, preempt the newest running request (out
        of ``batch`` too) and try again. False if ``request`` itself was preempted, or waits alone for a full
        device."""
        while True:
            try:
                self.kv.grow(request.slot, tokens)
                request.stalled_since = None
                return True
            except OutOfPagesError as exc:
                if isinstance(exc, DeviceFullError) and self._alone_on_pool([request]):  # wait, slot and all
                    request.stalled_since = request.stalled_since or time.monotonic()
                    return False
                request.stalled_since = None
                victim = self.running[-1]
                self.preempt(victim)
                batch[:] = [s for s in batch if s.request is not victim]  # its tokens stay unused this step
                if victim is request:
                    return False

    def _alone_on_pool(self, mine: list[Request]) -> bool:
        """``mine`` are this engine's only running requests and the pool's pages in use are all this cache's: no
        request of this model or of another sharing the pool (an EngineGroup) holds pages a preemption or a wait
        here would see come back. (Other processes' pages are the device's to free: the pool asked for them.)"""
        if self.running != mine:
            return False
        pool = self.kv.pool
        return pool.stats().in_use * pool.page_size <= self.kv.stats().mapped_bytes

    def preempt(self, request: Request) -> None:
        """Free ``request``'s slot and queue it first again; it is recomputed from its first token."""
        self.running.remove(request)
        self.kv.free(request.slot)
        self.kv.release_idle()  # its pages (and any other kept ones) back to the pool, for whoever needs them
        request.slot, request.computed, request.status, request.stalled_since = None, 0, Status.WAITING, None
        request.preemptions += 1
        self.preemptions += 1
        self._preempted_now += 1
        self.waiting.appendleft(request)

    def hold(self) -> bool:
        """Preempt the newest running request, if others run, and admit none in its place until a running request
        finishes: the device had no memory for a step of this many (Engine._short_of_memory). Whether it preempted."""
        preempted = len(self.running) > 1
        if preempted:
            self.preempt(self.running[-1])
        self.admit_limit = len(self.running)
        return preempted

    def finish(self, request: Request) -> None:
        """``request`` is done (finished or aborted): its slot is freed, it leaves every queue."""
        if request in self.running:
            self.running.remove(request)
            self.kv.free(request.slot)
            self.admit_limit = None  # what it held is free: admit as many as before
        elif request in self.waiting:
            self.waiting.remove(request)
        request.slot, request.status = None, Status.FINISHED
