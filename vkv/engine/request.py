# SPDX-License-Identifier: Apache-2.0
"""A request's life in the engine: its tokens, how far its KV is computed, where it sits, what it produced."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no slot
    RUNNING = "running"  # holds a slot; its KV is computed up to ``computed``
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What a step produced for one request: its new tokens (none when it only finished, e.g. aborted)."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" (a stop or end token), "length" (max_tokens or the cache's max_seq_len),
    # "abort" (cancelled), "error" (the engine failed it; ``error`` says why)
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None


_seq = itertools.count()


class YieldAsk(NamedTuple):
    """Another engine's request needs the pages of the one asked (Scheduler.newest): ``asker`` as it was then
    (its preemptions) and the pool's finished count then."""

    asker: Request
    preemptions: int
    finished: int


class Request:
    """One generation: prompt + output token ids; ``computed`` of them have their KV in the slot."""

    __slots__ = (
        "request_id", "prompt_ids", "output_ids", "params", "status", "slot", "computed", "arrival", "first_token_at",
        "last_token_at", "finish_reason", "error", "generator", "on_output", "preemptions", "aborted", "admitted_at",
        "stalled_since", "seq", "yield_asked",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None] | None = None,
    ):
        self.request_id, self.prompt_ids, self.params = request_id, prompt_ids, params
        self.output_ids: list[int] = []
        self.status = Status.WAITING
        self.slot: int | None = None
        self.computed = 0
        self.arrival = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.generator: torch.Generator | None = None  # made on the logits' device at the first sample
        self.on_output = on_output
        self.preemptions = 0
        self.aborted = False
        self.stalled_since: float | None = None  # alone and refused by a full device since then (Scheduler._grow)
        self.seq = next(_seq)  # age in this process, across engines: the highest is the newest (Scheduler.newest)
        self.yield_asked: YieldAsk | None = None  # an engine sharing the pool needs its pages: it is preempted at its
        # engine's next schedule (Scheduler.newest)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Tokens whose KV is still to compute before the next sample."""
        return self.num_tokens - self.computed

    def token_ids(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - p) : end - p]

    def output(self, new: list[int]) -> RequestOutput:
        return RequestOutput(
            self.request_id, new, self.status is Status.FINISHED, self.finish_reason, len(self.prompt_ids),
            len(self.output_ids), self.error,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, prompt={len(self.prompt_ids)}, "
            f"output={len(self.output_ids)}, computed={self.computed}, slot={self.slot})"
        )
