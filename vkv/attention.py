# SPDX-License-Identifier: Apache-2.0
"""Attention over a KVCache as plan/run: plan() once per step, run() once per layer.

plan() takes the batch on the host (slot, cached tokens, new tokens per request), checks that every
token the step will read is mapped, and writes the metadata into persistent device buffers. run()
stores the layer's new K/V and runs decode or extend attention with no host synchronisation and no
allocation when ``out`` is given, so a decode step can be captured in a CUDA graph and replayed after
a new plan() of the same batch size.

The idea of splitting attention into plan and run follows FlashInfer's wrappers
(https://docs.flashinfer.ai/api/attention.html).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkv.allocator import InvalidRequestError
from vkv.allocator.checks import check_int, check_ints, is_int
from vkv.kernels import choose_num_splits, decode_attention, extend_attention, store_kv
from vkv.kernels._common import check_interpretable, log2_softmax_scale
from vkv.kernels.extend import extend_tile_positions, max_extend_tiles, tile_list

from .cache import KVCache

MAX_Q_HEADS = 4096


@dataclass(frozen=True, slots=True)
class Plan:
    """One step's batch. Device tensors are views of the wrapper's persistent buffers."""

    slots: tuple[int, ...]
    seq_lens_host: tuple[int, ...]  # cached + new, per request
    num_tokens: int  # new tokens in the step (rows of q)
    is_decode: bool  # every request adds exactly one token
    max_len: int  # the step's longest sequence (cached + new), or graph_max_len when planned for a graph
    max_new_tokens: int
    num_splits: int
    generation: int  # the cache's unmap generation when the plan was checked
    slot_ids: torch.Tensor  # int32 [B]
    seq_lens: torch.Tensor  # int32 [B]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    token_slots: torch.Tensor  # int32 [T]
    token_positions: torch.Tensor  # int32 [T]
    tiles: torch.Tensor | None = None  # int32 [num_tiles, 2]: the extend kernel's row blocks (a graph plan's)

    @property
    def batch_size(self) -> int:
        return len(self.slots)


class AttentionWrapper:
    """Store + attention for one model's cache, planned once per step.

    Parameters
    ----------
    cache : KVCache
        The model's cache; run() reads and writes its per-layer views.
    num_q_heads : int
        Query heads (a multiple of the cache's KV heads).
    sm_scale : float, optional
        Softmax scale, default 1 / sqrt(head_dim).
    max_graph_tokens : int, optional
        The largest step plan(graph_tokens=...) may pad to: its metadata gets buffers of its own, at addresses
        that never change (0: none).

    Examples
    --------
    On the host backend, with the kernels in Triton's interpreter (``TRITON_INTERPRET=1``); on a GPU use
    ``backend="cuda"`` and CUDA tensors.

    >>> import torch
    >>> from vkv import CacheConfig, KVCache
    >>> cfg = CacheConfig(num_layers=1, num_kv_heads=2, head_dim=32, dtype=torch.float32,
    ...                   max_slots=2, max_seq_len=256)
    >>> cache = KVCache(cfg, backend="host", budget_bytes=16 << 20)
    >>> wrapper = AttentionWrapper(cache, num_q_heads=4)
    >>> slot = cache.allocate()
    >>> cache.grow(slot, 8)  # map the pages the step will write and read
    1
    >>> plan = wrapper.plan([slot], cached_lens=[0], new_lens=[7])  # prefill 7 tokens: q, k, v are [7, H, D]
    >>> q, k, v = torch.randn(7, 4, 32), torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    >>> wrapper.run(0, q, k, v).shape  # stores k, v in the slot, then attends causally
    torch.Size([7, 4, 32])
    >>> plan = wrapper.plan([slot], cached_lens=[7], new_lens=[1])  # one decode step
    >>> wrapper.run(0, torch.randn(1, 4, 32), torch.randn(1, 2, 32), torch.randn(1, 2, 32)).shape
    torch.Size([1, 4, 32])
    >>> cache.free(slot); cache.close()
    """

    def __init__(self, cache: KVCache, num_q_heads: int, *, sm_scale: float | None = None, max_graph_tokens: int = 0):
        if not isinstance(cache, KVCache):
            raise InvalidRequestError(f"cache must be a vkv.KVCache, got {type(cache).__name__}")
        cfg = cache.config
        check_interpretable(cfg.dtype)
        if not is_int(num_q_heads) or not 0 < num_q_heads <= MAX_Q_HEADS or num_q_heads % cfg.num_kv_heads:
            raise InvalidRequestError(
                f"num_q_heads must be a positive multiple of the cache's {cfg.num_kv_heads} KV heads, at most "
                f"{MAX_Q_HEADS}, got {num_q_heads!r}"
            )
        try:
            log2_softmax_scale(sm_scale, cfg.head_dim)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        self.cache, self.num_q_heads = cache, int(num_q_heads)
        self.sm_scale = cfg.head_dim**-0.5 if sm_scale is None else float(sm_scale)
        # Every step of at most max_slots tokens (all decode steps) keeps its metadata in this one buffer, at
        # fixed offsets: it is never reallocated, so CUDA graphs captured over a plan stay valid. Larger steps
        # put their per-token fields in _token_meta, which grows as needed.
        cap = cfg.max_slots
        self._meta_starts = _field_starts([cap, cap, cap + 1, cap, cap])  # per-token fields of up to cap tokens
        self._meta = torch.empty(self._meta_starts[-1], dtype=torch.int32, device=cache.device)
        self._token_meta = torch.empty(0, dtype=torch.int32, device=cache.device)
        self._plan: Plan | None = None
        # Steps planned for a CUDA graph of T <= max_graph_tokens tokens (any mix of decode rows and chunks), in one
        # buffer: slot_ids, seq_lens and cu_seqlens_q of max_slots requests, then the extend kernel's tile list,
        # token_slots and token_positions, sized by T: fixed offsets for every plan of one T (one graph), and
        # a step uploads only what its T uses.
        self.max_graph_tokens = check_int("max_graph_tokens", max_graph_tokens, lo=0, hi=1 << 20)
        self._tile_positions = extend_tile_positions(
            self.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cache.device, cfg.max_seq_len, cfg.dtype
        )
        size = self._graph_layout(self.max_graph_tokens)[-1] if self.max_graph_tokens else 0
        self._graph_meta = torch.empty(size, dtype=torch.int32, device=cache.device)

    def _staged(self, values: list[int]) -> torch.Tensor:
        """``values`` as an int32 host tensor to copy from. On CUDA it is pinned (torch's caching host
        allocator keeps the block until the copy has run), so the copy is asynchronous: plan() does not wait
        for the GPU to finish the work queued before it, as a copy from pageable memory would."""
        host = torch.tensor(values, dtype=torch.int32)
        return host.pin_memory() if self._meta.is_cuda else host

    def _upload(self, fields: list[list[int]]) -> list[torch.Tensor]:
        """Copy the plan's int32 fields [slot_ids, seq_lens, cu_seqlens_q, token_slots, token_positions] to the
        device: one host-to-device copy for a step of at most max_slots tokens, two for a larger one."""
        cap, tokens, starts = self.cache.config.max_slots, len(fields[3]), self._meta_starts
        fixed = fields if tokens <= cap else fields[:3]
        flat = [0] * (starts[len(fixed) - 1] + len(fixed[-1]))
        for start, values in zip(starts, fixed, strict=False):
            flat[start : start + len(values)] = values
        self._meta[: len(flat)].copy_(self._staged(flat), non_blocking=True)  # one conversion, one copy
        views = [self._meta[start : start + len(values)] for start, values in zip(starts, fixed, strict=False)]
        if tokens > cap:
            at = _field_starts([tokens])[1]  # the positions start 16-byte aligned too
            end = at + tokens
            if self._token_meta.numel() < end:
                self._token_meta = torch.empty(end, dtype=torch.int32, device=self.cache.device)
            flat = fields[3] + [0] * (at - tokens) + fields[4]
            self._token_meta[:end].copy_(self._staged(flat), non_blocking=True)
            views += [self._token_meta[:tokens], self._token_meta[at:end]]
        return views

    def plan(
        self,
        slots: Sequence[int] | torch.Tensor,
        cached_lens: Sequence[int] | torch.Tensor,
        new_lens: Sequence[int] | torch.Tensor,
        *,
        graph_max_len: int | None = None,
        pad_slot: int | None = None,
        pad_rows: int = 0,
        graph_tokens: int | None = None,
    ) -> Plan:
        """Check and upload one step's batch; request i adds ``new_lens[i]`` tokens after ``cached_lens[i]``.

        Each argument is a sequence of ints or a 1-D integer tensor (a device tensor is read back to the host:
        the checks need the values). Every slot must be allocated and grown to at least cached + new tokens
        (the kernels read only mapped bytes). Nothing changes if a check fails.

        ``graph_max_len``: the kernels' launch parameters (split count, tokens a split) are chosen for sequences
        of this many tokens instead of this step's longest, so a decode step captured in a CUDA graph under
        this plan stays right when replayed after any later plan of the same batch size whose sequences are no
        longer (at most the cache's max_seq_len).

        ``pad_rows`` rows of one token at position 0 of ``pad_slot`` (an allocated slot of its own, not in
        ``slots``) follow the requests: a step padded to the batch size a CUDA graph was captured for. They write
        and read only that slot's first token; their outputs mean nothing.

        ``graph_tokens``: plan the step (any mix of decode rows and prompt chunks) for a CUDA graph of that many
        tokens, captured once and replayed after any later plan of the same ``graph_tokens``: the step's tokens
        are padded to it with rows that belong to no request (they write ``pad_slot``'s first token, attend
        nothing, and their attention outputs are zeros), the metadata sits at fixed addresses, and attention runs the
        extend kernel over a tile list of fixed length with the tiles of long sequences. At most the wrapper's
        ``max_graph_tokens``; not with ``pad_rows`` or ``graph_max_len``.
        """
        cfg = self.cache.config
        slots = check_ints("slots", _host_ints("slots", slots), lo=0, hi=cfg.max_slots - 1)
        cached = check_ints("cached_lens", _host_ints("cached_lens", cached_lens), lo=0, hi=cfg.max_seq_len - 1)
        new = check_ints("new_lens", _host_ints("new_lens", new_lens), lo=1, hi=cfg.max_seq_len)
        if not slots or not len(slots) == len(cached) == len(new):
            raise InvalidRequestError(
                f"slots, cached_lens and new_lens must be non-empty and of one length, got {len(slots)}, "
                f"{len(cached)}, {len(new)}"
            )
        if len(set(slots)) != len(slots):
            raise InvalidRequestError(f"a slot appears twice in one step: {slots}")
        pad_rows = check_int("pad_rows", pad_rows, lo=0, hi=cfg.max_slots - len(slots))
        if pad_rows:
            pad_slot = self._checked_pad_slot(pad_slot, slots, "pad_rows needs")
            slots, cached, new = slots + [pad_slot] * pad_rows, cached + [0] * pad_rows, new + [1] * pad_rows
        if graph_tokens is not None:
            return self._plan_graph(slots, cached, new, graph_tokens, pad_slot, pad_rows, graph_max_len)
        seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
        if graph_max_len is not None:
            graph_max_len = check_int("graph_max_len", graph_max_len, lo=max(seq_lens), hi=cfg.max_seq_len)
        self._check_mapped(slots, seq_lens)
        batch, tokens = len(slots), sum(new)
        cu, token_slots, positions = _token_fields(slots, cached, new)
        bufs = self._upload([slots, seq_lens, cu, token_slots, positions])
        is_decode = all(n == 1 for n in new)
        max_len, total = max(seq_lens), sum(seq_lens)
        if graph_max_len is not None:
            max_len, total = graph_max_len, batch * graph_max_len
        splits = (
            choose_num_splits(
                batch,
                cfg.num_kv_heads,
                max_len,
                head_dim=cfg.head_dim,
                device=self.cache.device,
                total_tokens=total,
            )
            if is_decode
            else 1
        )
        self._plan = Plan(
            tuple(slots), tuple(seq_lens), tokens, is_decode, max_len, max(new), splits, self.cache.generation, *bufs
        )
        return self._plan

    def _graph_layout(self, tokens: int) -> list[int]:
        """Where a graph plan of ``tokens`` tokens puts its fields in _graph_meta: the starts of slot_ids, seq_lens,
        cu_seqlens_q, the tile list, token_slots and token_positions, and the end."""
        cap = self.cache.config.max_slots
        tiles = 2 * max_extend_tiles(tokens, cap, self._tile_positions)
        starts = [0, cap, 2 * cap, 3 * cap + 1]
        for n in (tiles, tokens, tokens):
            starts.append(starts[-1] + n)
        return starts

    def _plan_graph(
        self,
        slots: list[int],
        cached: list[int],
        new: list[int],
        graph_tokens: int,
        pad_slot: int | None,
        pad_rows: int,
        graph_max_len: int | None,
    ) -> Plan:
        """plan(graph_tokens=...): see plan()."""
        cfg, tokens = self.cache.config, sum(new)
        if pad_rows or graph_max_len is not None:
            raise InvalidRequestError("graph_tokens plans pad tokens itself: not with pad_rows or graph_max_len")
        if not self.max_graph_tokens:
            raise InvalidRequestError("graph_tokens needs a wrapper made with max_graph_tokens")
        if tokens > self.max_graph_tokens:
            raise InvalidRequestError(
                f"the step has {tokens} new tokens; a graph plan holds at most max_graph_tokens = "
                f"{self.max_graph_tokens}"
            )
        graph_tokens = check_int("graph_tokens", graph_tokens, lo=tokens, hi=self.max_graph_tokens)
        pad = graph_tokens - tokens
        if pad:
            pad_slot = self._checked_pad_slot(pad_slot, slots, f"{pad} padding tokens need")
        seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
        self._check_mapped(slots + ([pad_slot] if pad else []), seq_lens + ([1] if pad else []))
        batch, cap = len(slots), cfg.max_slots
        cu, token_slots, positions = _token_fields(slots, cached, new)
        token_slots, positions = token_slots + [pad_slot] * pad, positions + [0] * pad
        starts = self._graph_layout(graph_tokens)
        length = (starts[4] - starts[3]) // 2
        tiles = tile_list(new, seq_lens, self._tile_positions, length)
        flat = [0] * starts[-1]
        fields = [slots, seq_lens, cu + [tokens] * (cap - batch), tiles, token_slots, positions]
        for start, values in zip(starts, fields, strict=False):
            flat[start : start + len(values)] = values  # requests past the batch: no rows, no tokens
        meta = self._graph_meta
        meta[: len(flat)].copy_(self._staged(flat), non_blocking=True)
        views = [meta[a:b] for a, b in itertools.pairwise(starts)]
        self._plan = Plan(
            tuple(slots), tuple(seq_lens), graph_tokens, False, cfg.max_seq_len, max(new), 1, self.cache.generation,
            views[0], views[1], views[2], views[4], views[5], views[3].view(length, 2),
        )  # fmt: skip
        return self._plan

    def _checked_pad_slot(self, pad_slot: object, slots: list[int], what: str) -> int:
        """``pad_slot`` for padding a step of ``slots``: an allocatable slot index that is not one of them."""
        if pad_slot is None or not is_int(pad_slot) or pad_slot in slots:
            raise InvalidRequestError(f"{what} a pad_slot that is not one of {slots}, got {pad_slot!r}")
        return check_int("pad_slot", pad_slot, lo=0, hi=self.cache.config.max_slots - 1)

    def _check_mapped(self, slots: Sequence[int], seq_lens: Sequence[int]) -> None:
        """The invariant: every token a step reads is mapped. Raises InvalidRequestError otherwise."""
        cache = self.cache
        for slot, n in cache.uncovered(slots, seq_lens):  # only what the cheap batch check cannot clear
            if not cache.is_allocated(slot):
                raise InvalidRequestError(f"slot {slot} is not allocated")
            if cache.capacity(slot) < n:
                raise InvalidRequestError(
                    f"slot {slot} has {cache.capacity(slot)} tokens mapped but the step reads {n}; grow it first"
                )

    def _check_run_args(
        self,
        plan: Plan,
        layer: int,
        tensors: dict[str, torch.Tensor | None],
        lse: torch.Tensor | None,
    ) -> None:
        """What run() can check before it stores anything: a bad layer, q, k, v, out or lse must leave the cache
        as it was."""
        cfg = self.cache.config
        check_int("layer", layer, lo=0, hi=cfg.num_layers - 1)
        q_shape = (plan.num_tokens, self.num_q_heads, cfg.head_dim)
        kv_shape = (plan.num_tokens, cfg.num_kv_heads, cfg.head_dim)
        for name, t in tensors.items():
            if t is None and name == "out":
                continue
            heads = "kv heads" if name in ("k", "v") else "q heads"
            shape, dims = kv_shape if name in ("k", "v") else q_shape, f"tokens, {heads}, head_dim"
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise InvalidRequestError(f"{name} must be {list(shape)} ({dims}) for this plan, got {got}")
            if t.dtype != cfg.dtype or t.device != self.cache.device:
                raise InvalidRequestError(
                    f"{name} is {t.dtype} on {t.device}; expected the cache's {cfg.dtype} on {self.cache.device}"
                )
            if shape[2] > 1 and t.stride(-1) != 1:
                raise InvalidRequestError(f"{name} must have unit stride on head_dim, got strides {t.stride()}")
        if lse is None:
            return
        if not plan.is_decode:
            raise InvalidRequestError("lse is only returned for decode steps (one new token per request)")
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != q_shape[:2]:
            got = list(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
            raise InvalidRequestError(f"lse must be {list(q_shape[:2])} (tokens, q heads) for this plan, got {got}")
        if lse.dtype != torch.float32 or lse.device != self.cache.device:
            raise InvalidRequestError(
                f"lse is {lse.dtype} on {lse.device}; expected torch.float32 on {self.cache.device}"
            )

    def _checked_plan(self) -> Plan:
        plan = self._plan
        if plan is None:
            raise InvalidRequestError("plan() the step's batch before store(), attend() or run()")
        if plan.generation != self.cache.generation:  # something was unmapped since plan(): check again
            self._check_mapped(plan.slots, plan.seq_lens_host)
        return plan

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write layer ``layer``'s new keys and values into the planned slots and positions.

        Parameters
        ----------
        k, v : torch.Tensor
            [T, num_kv_heads, head_dim], the cache's dtype and device, unit stride on head_dim; T = the plan's
            new tokens, request-major (request i's ``new_lens[i]`` tokens in order, then request i + 1's).
        """
        plan = self._checked_plan()
        self._check_run_args(plan, layer, {"k": k, "v": v}, None)
        self._store(plan, layer, k, v)

    def _store(self, plan: Plan, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        store_kv(k, v, self.cache.key_view(layer), self.cache.value_view(layer), plan.token_slots, plan.token_positions)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        *,
        sm_scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of the planned new queries over their slots' tokens [0, cached + new), causal among the new
        ones. The layer's new K/V must have been stored (store()) in this plan first.

        Parameters
        ----------
        q : torch.Tensor
            [T, num_q_heads, head_dim], the cache's dtype, request-major like store()'s k and v.
        out : torch.Tensor, optional
            [T, num_q_heads, head_dim], written in place (needed for CUDA-graph capture).
        lse : torch.Tensor, optional
            float32 [T, num_q_heads]: log-sum-exp of the scores (decode steps only).
        sm_scale : float, optional
            This call's softmax scale; default the wrapper's.

        Returns
        -------
        torch.Tensor
            [T, num_q_heads, head_dim], ``out`` if given.
        """
        plan = self._checked_plan()
        self._check_run_args(plan, layer, {"q": q, "out": out}, lse)
        scale = self.sm_scale
        if sm_scale is not None and sm_scale != scale:
            try:
                log2_softmax_scale(sm_scale, self.cache.config.head_dim)
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
            scale = float(sm_scale)
        return self._attend(plan, layer, q, out, lse, scale)

    def _attend(
        self, plan: Plan, layer: int, q: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.cache.key_view(layer), self.cache.value_view(layer)
        if plan.tiles is not None:  # a graph plan: the padding rows (of no request) come out zero, not stale
            out = torch.zeros_like(q, memory_format=torch.contiguous_format) if out is None else out.zero_()
        if plan.is_decode:
            return decode_attention(
                q,
                k_cache,
                v_cache,
                plan.slot_ids,
                plan.seq_lens,
                scale,
                out=out,
                lse=lse,
                num_splits=plan.num_splits,
                max_len=plan.max_len,
            )
        return extend_attention(
            q,
            k_cache,
            v_cache,
            plan.slot_ids,
            plan.cu_seqlens_q,
            plan.seq_lens,
            scale,
            out=out,
            max_new_tokens=plan.max_new_tokens,
            max_len=plan.max_len,
            tiles=plan.tiles,
        )

    def run(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """store() then attend(): store layer ``layer``'s new K/V and return attention of the new queries.

        Parameters
        ----------
        q : torch.Tensor
            [T, num_q_heads, head_dim], the cache's dtype; T = the plan's new tokens, request-major.
        k, v : torch.Tensor
            [T, num_kv_heads, head_dim]: the new tokens' keys and values.
        out : torch.Tensor, optional
            [T, num_q_heads, head_dim], written in place (needed for CUDA-graph capture).
        lse : torch.Tensor, optional
            float32 [T, num_q_heads]: log-sum-exp of the scores (decode steps only).
        """
        plan = self._checked_plan()
        self._check_run_args(plan, layer, {"q": q, "k": k, "v": v, "out": out}, lse)  # all checked before storing
        self._store(plan, layer, k, v)
        return self._attend(plan, layer, q, out, lse, self.sm_scale)


def token_positions(cached: Sequence[int], new: Sequence[int]) -> list[int]:
    """Each new token's position in its sequence, request-major: request i's cached[i] ... cached[i] + new[i] - 1."""
    return [p for c, n in zip(cached, new, strict=True) for p in range(c, c + n)]


def _token_fields(slots: list[int], cached: list[int], new: list[int]) -> tuple[list[int], list[int], list[int]]:
    """A step's cu_seqlens_q, and each new token's slot and position (request-major)."""
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    return cu, [s for s, n in zip(slots, new, strict=True) for _ in range(n)], token_positions(cached, new)


def _field_starts(sizes: list[int]) -> list[int]:
    """Where int32 fields of these sizes start in one buffer, each on 16 bytes (then the end): Triton specializes a
    kernel on whether a pointer is 16-byte aligned, so a field's alignment must not depend on the step's sizes (a
    compile, seconds, the first time a step met the other case)."""
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 4) * 4)
    return starts


def _host_ints(name: str, values: Sequence[int] | torch.Tensor) -> Sequence[int]:
    """A 1-D integer tensor as a list of ints (read back from the device if it is there); other values as given."""
    if not isinstance(values, torch.Tensor):
        return values
    if values.dim() != 1 or values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise InvalidRequestError(
            f"{name} must be a 1-D integer tensor, got {values.dtype} of shape {list(values.shape)}"
        )
    return values.tolist()
