# SPDX-License-Identifier: Apache-2.0
"""What a request asks of generation: how many tokens, how to sample them, when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vkv.allocator import InvalidRequestError
from vkv.allocator.checks import is_int


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling and stopping for one request (the OpenAI API's fields, vLLM's names).

    temperature 0 is greedy (top_k, top_p and seed are then unused); top_k 0 keeps every token; top_p 1 keeps
    the whole distribution. ``seed`` makes a request's samples reproducible whatever it is batched with.
    Generation stops after ``max_tokens`` new tokens, at one of ``stop_token_ids``, or at the model's end-of-
    sequence token unless ``ignore_eos``; ``min_tokens`` new tokens come before any stop token counts.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} must be {want}, got {getattr(self, name)!r}")

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an int >= 1")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"an int in [0, max_tokens = {self.max_tokens}]")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise bad("temperature", "a number >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an int >= 0 (0: no limit)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 1 << 63):
            raise bad("seed", "None or an int in [0, 2**63)")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of token ids (ints >= 0)")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
