# SPDX-License-Identifier: Apache-2.0
"""Tensor-parallel steps: rank 0 decides, every rank applies, in one broadcast a step.

Rank 0 (the leader) runs the scheduler: it admits, grows, preempts and frees, on a :class:`LeaderCache` that logs
each change it makes to its slots (allocate, grow, free, release of idle pages). A step's plan is that log, the
step's slots, lengths, token ids and sampled rows, flattened into int64s: the metadata the followers need to run
the step anyway, so growth costs no message of its own. A follower (:meth:`StepChannel.follow`) replays the log
on its own cache (same geometry: its share of the KV heads) and runs the same forward; the all-reduces inside
the forward meet. Slots are mapped leader -> follower, so a follower's cache may pick other slot indices.

The plan travels in one broadcast of SMALL ints, plus a second of exactly the rest for a larger step (a long
prefill chunk), whose size the first says. With several models, one channel carries every engine's plans, in
the order rank 0 steps them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from vkv.cache import KVCache
from vkv.parallel import TensorParallel

SMALL = 4096  # ints of the first broadcast of every plan
STEP, DECODE, OPS, STOP = 1, 2, 3, 4  # plan kinds: a forward, a padded decode, changes alone, an engine's end
ALLOC, GROW, FREE, RELEASE = 1, 2, 3, 4  # logged changes: (op, engine, a, b)
HEADER = 7  # kind, engine, size, ops, items, tokens, rows


class LeaderCache(KVCache):
    """Rank 0's cache: every change to its slots that succeeds is logged in ``channel`` (once one is attached)."""

    channel: StepChannel | None = None
    index = 0  # the engine's index in the channel

    def _note(self, op: int, a: int, b: int) -> None:
        if self.channel is not None:
            self.channel.note(op, self.index, a, b)

    # Each change is logged under the cache's lock, so the log's order is the order the changes happened in (the
    # pool's thread may release idle pages while the engine's thread grows). A grow is logged even when it mapped
    # nothing here (pages a slot kept): replaying it is idempotent, and a follower's slot may lack them.
    def allocate(self, num_tokens: int = 0) -> int:
        with self._lock:
            slot = super().allocate(num_tokens)
            self._note(ALLOC, slot, num_tokens)
            return slot

    def grow(self, slot: int, num_tokens: int) -> int:
        with self._lock:
            mapped = super().grow(slot, num_tokens)
            self._note(GROW, slot, num_tokens)
            return mapped

    def free(self, slot: int) -> None:
        with self._lock:
            super().free(slot)
            self._note(FREE, slot, 0)

    def release_idle(self, max_pages: int | None = None) -> int:
        with self._lock:
            released = super().release_idle(max_pages)
            if released:
                self._note(RELEASE, -1 if max_pages is None else max_pages, 0)
            return released


class StepChannel:
    """One process's end of the plans of a tensor-parallel group: the leader sends, followers receive and apply."""

    def __init__(self, tp: TensorParallel, device: torch.device):
        self.tp, self.device = tp, device
        self.engines: list[Any] = []
        self._log: list[int] = []
        self._lock = threading.Lock()  # the pool's thread may release idle pages (logged) while a step is planned
        self._maps: list[dict[int, int]] = []  # per engine: leader slot -> this rank's slot
        self._stopped: set[int] = set()

    def add(self, engine: Any) -> int:
        """Register an engine (every rank builds the same engines in the same order); returns its index."""
        self.engines.append(engine)
        self._maps.append({})
        return len(self.engines) - 1

    def note(self, op: int, engine: int, a: int, b: int) -> None:
        with self._lock:
            self._log += (op, engine, a, b)

    # -- the leader --
    def send(
        self, engine: int, kind: int, size: int = 0, items: Sequence[tuple[int, int, int]] = (),
        tokens: Sequence[int] = (), rows: Sequence[int] = (),
    ) -> None:  # fmt: skip
        """Broadcast a plan: the changes logged since the last one, then (for STEP/DECODE) the step."""
        with self._lock:
            log, self._log = self._log, []
        flat = [v for item in items for v in item]
        plan = [kind, engine, size, len(log) // 4, len(items), len(tokens), len(rows), *log, *flat, *tokens, *rows]
        self._broadcast(torch.tensor(plan, dtype=torch.int64))

    def flush(self, engine: int) -> None:
        """Send the changes logged since the last plan (an idle model's trim), if any."""
        if self._log:
            self.send(engine, OPS)

    def _broadcast(self, plan: torch.Tensor) -> None:
        first = torch.zeros(SMALL, dtype=torch.int64)
        first[0] = plan.numel()
        head = plan[: SMALL - 1]
        first[1 : 1 + head.numel()] = head
        self._bcast(first)
        if plan.numel() > SMALL - 1:
            self._bcast(plan[SMALL - 1 :].clone())

    def _bcast(self, data: torch.Tensor) -> torch.Tensor:
        box = data.to(self.device)
        dist.broadcast(box, src=0, group=self.tp.group)
        return box.cpu()

    # -- a follower --
    def receive(self) -> list[int]:
        first = self._bcast(torch.zeros(SMALL, dtype=torch.int64))
        total = int(first[0])
        plan = first[1 : 1 + min(total, SMALL - 1)]
        if total > SMALL - 1:
            plan = torch.cat([plan, self._bcast(torch.zeros(total - SMALL + 1, dtype=torch.int64))])
        return plan.tolist()

    def follow(self) -> None:
        """Apply the leader's plans to this process's engines until every one of them is stopped. A plan that fails
        here is fatal: skipping it would leave the leader waiting in the step's all-reduces (a hang), so the error
        is reported and raised, and this rank leaves the group (the leader's next collective then fails)."""
        while len(self._stopped) < len(self.engines):
            plan = self.receive()
            try:
                self.apply(plan)
            except BaseException as exc:
                print(f"vkv rank {self.tp.rank}: a step failed, leaving the group: {type(exc).__name__}: {exc}",
                      file=sys.stderr)  # fmt: skip
                raise

    def apply(self, plan: list[int]) -> None:
        kind, engine, size, n_ops, n_items, n_tokens, n_rows = plan[:HEADER]
        at = HEADER
        for i in range(n_ops):
            self._replay(*plan[at + 4 * i : at + 4 * i + 4])
        at += 4 * n_ops
        items = [plan[at + 3 * i : at + 3 * i + 3] for i in range(n_items)]
        at += 3 * n_items
        tokens, rows = plan[at : at + n_tokens], plan[at + n_tokens : at + n_tokens + n_rows]
        if kind == STOP:  # rank 0 closed this engine: give its pages back now, as rank 0 did (a shared pool)
            self._stopped.add(engine)
            self.engines[engine].kv.close()
            return
        if kind == OPS:
            return
        slots = [self._maps[engine][s] for s, _, _ in items]
        cached = [c for _, c, _ in items]
        runner = self.engines[engine].runner
        if kind == DECODE:
            runner.decode(size, slots, cached, tokens)
        else:
            runner.forward(slots, cached, [n for _, _, n in items], tokens, rows)

    def _replay(self, op: int, engine: int, a: int, b: int) -> None:
        kv, slots = self.engines[engine].kv, self._maps[engine]
        if op == ALLOC:
            slots[a] = kv.allocate(b)
        elif op == GROW:
            kv.grow(slots[a], b)
        elif op == FREE:
            kv.free(slots.pop(a))
        elif op == RELEASE:
            kv.release_idle(None if a < 0 else a)


_channels: dict[tuple[int, str], StepChannel] = {}


def channel_for(tp: TensorParallel, device: torch.device) -> StepChannel:
    """The process's channel of ``tp``'s group (one for all its engines)."""
    key = (id(tp.group), str(device))
    if key not in _channels:
        _channels[key] = StepChannel(tp, device)
    return _channels[key]


def generate_on_ranks(tp: TensorParallel, jobs: list[tuple[Any, list, Any, dict[str, Any]]], out_path: str) -> None:
    """Offline generation on every rank of ``tp`` (a target for :func:`vkv.parallel.start_ranks`): for each job
    ``(model, prompts, params, engine_args)`` in turn, an Engine on every rank; rank 0 runs ``generate`` and the
    others follow. Rank 0 saves (torch.save) to ``out_path`` a list with, per job, its outputs' token ids and the
    preemptions it made."""
    from .engine import Engine

    results = []
    for model, prompts, params, engine_args in jobs:
        with Engine(model, tensor_parallel=tp, **engine_args) as engine:
            if not tp.leader:
                engine.follow()
                continue
            outputs = engine.generate(prompts, params)
            results.append({"tokens": [o.new_token_ids for o in outputs], "preemptions": engine.scheduler.preemptions})
    if tp.leader:
        torch.save(results, out_path)
