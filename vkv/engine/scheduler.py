# SPDX-License-Identifier: Apache-2.0
"""Continuous batching over one model's KVCache: which requests run in the next step, and how many tokens each.

Each step has a token budget (``max_num_batched_tokens``). Decode tokens go first (one per running request
whose prompt is computed, oldest first), then prefill chunks: of running requests part-way through their
prompt, then of waiting requests admitted in arrival order while a slot is free and the pool gives the pages
(a chunk is as long as the budget left). Growth that the pool refuses preempts the newest running request: its
slot is freed, it goes back to the head of the queue with its output kept, and is recomputed (prompt + output)
when it is admitted again. Admission never preempts: a waiting request waits until pages come back (requests
finishing, idle models releasing theirs through the pool's reclaimers).

Newest means latest to arrive (``Request.seq``) of every engine on the pool (an EngineGroup's models sharing
it). Where that request is another engine's, it is asked to yield: that engine preempts it at its next schedule
and admits nobody while the asker runs (not preempted since) and no request on the pool has finished, and the
request refused waits a step meanwhile, its engine admitting nobody either. So the oldest request on the pool is
never preempted for another's pages (only when it alone outgrows what the pool can give) and gets them in the
end: two models that cannot both fit take turns, instead of preempting each other's request for ever.

A request that runs alone and whose growth a full device refuses (DeviceFullError: the budget allows the pages,
the device has no room) is not preempted, which would only free pages for itself to take again: it keeps its
slot and waits (``stalled_since``), its engine admitting nobody meanwhile (they would take the room it waits for),
as does the head of the queue that a full device keeps out while nothing runs; the engine ends either if the
device stays full (Engine.device_full_wait_s). A forward the device has no memory for (activations, not pages)
holds the batch smaller (``hold``): the newest running request is preempted and none admitted in its place until
one finishes.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from vkv.allocator import DeviceFullError, OutOfPagesError
from vkv.cache import KVCache

from .request import Request, Status, YieldAsk


class _Sharing:
    """The schedulers on one pool (the engines of an EngineGroup that share it) and how many of their requests that
    held a slot have finished."""

    def __init__(self):
        self.schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()
        self.finished = 0


_sharing: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> its _Sharing
_sharing_lock = threading.Lock()


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
        self.running: list[Request] = []  # admission order (the newest to preempt: newest())
        self.preemptions = 0
        self._preempted_now = 0  # preemptions in the step being scheduled
        self.admit_limit: int | None = None  # fewer running requests than max_num_seqs, until one finishes (hold())
        self.short_for: Request | None = None  # the running request left waiting for pages this step: nobody is
        # admitted here, nor in the engines sharing the pool before it (they would take the pages it waits for)
        self._yielded_to: YieldAsk | None = None  # the last ask a request here yielded to: nobody is admitted while
        # its asker runs unpreempted and no request on the pool has finished since (else it takes the pages back)
        with _sharing_lock:
            self._sharing = _sharing.setdefault(kv.pool, _Sharing())
            self._sharing.schedulers.add(self)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget, batch = self.max_num_batched_tokens, []
        self._preempted_now, self.short_for = 0, None
        for request in [r for r in self.running if r.yield_asked is not None]:  # another engine needs the pages
            self._yielded_to = request.yield_asked
            self.preempt(request)
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
        if self.waiting and (self._preempted_now or self.short_for is not None or self._yielding()):
            most = 0  # pages ran short: admit nobody (a preempted request would take its slot back and lose it again)
        oldest_short = min((r.seq for r in self._peers_short()), default=None) if self.waiting and most else None
        while budget and self.waiting and len(self.running) < most and self.kv.can_allocate():
            request = self.waiting[0]
            if oldest_short is not None and oldest_short < request.seq:  # an older one elsewhere waits for pages
                break
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
        request.yield_asked = None  # an ask that came after it was preempted (another thread's) is stale
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
                    self.short_for = request
                    return False
                request.stalled_since = None
                victim = self.newest(request)
                if victim not in self.running:  # another engine's: it yields at its next schedule; this one waits
                    victim.yield_asked = YieldAsk(request, request.preemptions, self._sharing.finished)
                    self.short_for = request
                    return False
                self.preempt(victim)
                batch[:] = [s for s in batch if s.request is not victim]  # its tokens stay unused this step
                if victim is request:
                    return False

    def newest(self, request: Request) -> Request:
        """The running request to preempt so that ``request`` grows: the latest to arrive of this engine's and of
        the other engines' on this pool (one already asked to yield counts as gone); ``request`` itself if none
        arrived after it elsewhere and this engine runs none newer."""
        others = [
            r for peer in self._peers() for r in list(peer.running) if r.slot is not None and r.yield_asked is None
        ]
        return max([*self.running, *(r for r in others if r.seq > request.seq)], key=lambda r: r.seq)

    def _yielding(self) -> bool:
        """A request here yielded its pages to another engine's, which still runs as it did when it asked, and no
        request on the pool has finished since: what would be admitted here would take the pages it needs."""
        ask = self._yielded_to
        if ask is not None and not (
            ask.asker.status is Status.RUNNING
            and ask.asker.preemptions == ask.preemptions
            and self._sharing.finished == ask.finished
        ):
            self._yielded_to = ask = None
        return ask is not None

    def _peers(self) -> list[Scheduler]:
        """The other schedulers on this pool (the engines of an EngineGroup that share it)."""
        with _sharing_lock:
            return [s for s in self._sharing.schedulers if s is not self]

    def _peers_short(self) -> list[Request]:
        """The other engines' running requests left waiting for pages in their last schedule."""
        return [r for peer in self._peers() if (r := peer.short_for) is not None and r.status is Status.RUNNING]

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
        request.yield_asked = None
        request.preemptions += 1
        self.preemptions += 1
        self._preempted_now += 1
        self.waiting.appendleft(request)

    def hold(self) -> bool:
        """Preempt the newest running request, if others run, and admit none in its place until a running request
        finishes: the device had no memory for a step of this many (Engine._short_of_memory). Whether it preempted."""
        preempted = len(self.running) > 1
        if preempted:
            self.preempt(max(self.running, key=lambda r: r.seq))
        self.admit_limit = len(self.running)
        return preempted

    def finish(self, request: Request) -> None:
        """``request`` is done (finished or aborted): its slot is freed, it leaves every queue."""
        if request in self.running:
            self.running.remove(request)
            self.kv.free(request.slot)
            self.admit_limit = None  # what it held is free: admit as many as before
            with _sharing_lock:
                self._sharing.finished += 1
        elif request in self.waiting:
            self.waiting.remove(request)
        request.slot, request.status, request.yield_asked = None, Status.FINISHED, None
