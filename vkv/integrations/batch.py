# SPDX-License-Identifier: Apache-2.0
"""A padded batch of sequences over a KVCache: one slot per row, pad tokens never stored.

Frameworks like transformers hand attention a rectangular batch ``[B, S]`` of new tokens with a 2-D
attention mask (1 = token, 0 = pad). :class:`SlotBatch` keeps one vkv slot per row and stores only the
tokens, packed request-major, so a row's slot holds its tokens at positions 0, 1, 2, ... with no holes and
the kernels never see a pad. It needs no transformers: :mod:`vkv.integrations.hf` drives it.

A forward pass is one step: :meth:`SlotBatch.begin` (plan the step from the mask: grow the slots, plan the
attention wrapper), then per layer :meth:`SlotBatch.store` and :meth:`SlotBatch.attend`; the lengths advance
when the last layer has attended, so a forward that fails half-way leaves the batch as it was.

Padding must be on the left (what tokenizers produce with ``padding_side="left"``, the setting for
generation): in each row the masked tokens come before its first token; once a row has a token, every new
token of it must be unmasked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vkv.allocator import InvalidRequestError
from vkv.attention import AttentionWrapper, Plan


@dataclass(slots=True)
class Step:
    """One forward pass's plan: which of its ``batch_size x num_new`` tokens are stored, and where."""

    batch: SlotBatch
    batch_size: int
    num_new: int
    plan: Plan | None  # None when no row has a token in this step
    index: torch.Tensor | None  # long [T]: packed token t is flat position index[t] of [B * S]; None: all tokens
    new_lens: list[int]  # per row
    pads: list[int]  # per row, after the step
    next_layer: int = 0  # the layer expected to store next
    stored: bool = False  # that layer's K/V stored, its attention not yet run
    graph: bool = False  # settled by the device counter (the step may run as a CUDA-graph replay)


class SlotBatch:
    """Rows of a padded batch, each in a slot of ``wrapper.cache``.

    Parameters
    ----------
    wrapper : AttentionWrapper
        Attention over the KVCache whose slots hold the rows.
    max_rows : int, optional
        Most rows of a batch; default the cache's slots. :meth:`select` needs a slot for each row it copies
        while the rows it drops still hold theirs: up to ``2 * max_rows - 1`` slots.
    graphs : bool
        Steps may run as CUDA-graph replays (torch.compile's "reduce-overhead"), where no Python of a layer
        runs: decode steps are planned for graphs (``graph_max_len``), :meth:`decode_step` stores and attends in
        one call, and a step's lengths advance when the next step begins or the lengths are asked for, if the
        last layer ran (a device counter it increments says so; otherwise the step is dropped).
    """

    def __init__(self, wrapper: AttentionWrapper, max_rows: int | None = None, *, graphs: bool = False):
        self.wrapper, self.cache = wrapper, wrapper.cache
        self.max_rows = self.cache.config.max_slots if max_rows is None else max_rows
        self.graphs = graphs
        self.done = torch.zeros(1, dtype=torch.int64, device=self.cache.device) if graphs else None
        self.expected_done = 0  # the counter's value once the pending graph step's last layer has run
        self.num_layers = self.cache.config.num_layers
        self.rows: list[int] | None = None  # slot of each row
        self.seen = 0  # positions consumed per row, pads included (the framework's sequence length)
        self.pads: list[int] = []  # leading pad positions per row (never stored)
        self.step: Step | None = None

    @property
    def lens(self) -> list[int]:
        """Tokens stored per row."""
        return [self.seen - p for p in self.pads]

    def settle(self) -> None:
        """Graph mode: count a pending step if its last layer ran (one device-to-host read), else drop it."""
        step = self.step
        if step is None or not step.graph:
            return
        self.step, done = None, int(self.done.item())
        if done == self.expected_done:
            self.seen, self.pads = self.seen + step.num_new, step.pads
        # else the forward did not finish: the positions it wrote past the lengths are never read
        self.expected_done = done

    # ----------------------------------------------------------------------------------------- a step
    def begin(self, batch_size: int, num_new: int, mask: torch.Tensor | None) -> Step:
        """Plan a forward pass of ``num_new`` positions for ``batch_size`` rows; ``mask`` is the 2-D attention
        mask ([B, >= S], its last S columns are the new positions) or None (no padding). Grows the rows' slots
        to hold the step's tokens. Replaces a step begun before and not finished. On error nothing changes
        (slots taken for a first step are given back)."""
        self.settle()
        self.step = None
        cfg = self.cache.config
        self._check_rows(batch_size)
        if self.rows is not None and len(self.rows) != batch_size:
            if self.seen:
                raise InvalidRequestError(
                    f"this cache holds {len(self.rows)} sequences of {self.seen} positions but the step has "
                    f"{batch_size} rows: call reset() before a new batch"
                )
            self.reset()
        valid = self._valid(batch_size, num_new, mask)
        new_lens = valid.sum(dim=1).tolist() if valid is not None else [num_new] * batch_size
        first = self.rows is None
        if first:
            self.rows, self.pads = self._take_slots(batch_size), [0] * batch_size
        try:
            lens = self.lens
            totals = [n + c for n, c in zip(new_lens, lens, strict=True)]
            if max(totals) > cfg.max_seq_len:
                row = max(range(batch_size), key=totals.__getitem__)
                raise InvalidRequestError(
                    f"sequence {row} would hold {totals[row]} tokens after this step; this cache's max_seq_len is "
                    f"{cfg.max_seq_len}"
                )
            active = [b for b in range(batch_size) if new_lens[b]]
            plan = None
            if active:
                slots = [self.rows[b] for b in active]
                self.cache.ensure_many(slots, [totals[b] for b in active])
                graph_len = cfg.max_seq_len if self.graphs and num_new == 1 else None
                plan = self.wrapper.plan(
                    slots, [lens[b] for b in active], [new_lens[b] for b in active], graph_max_len=graph_len
                )
        except BaseException:
            if first:
                self.reset()
            raise
        index = None
        if valid is not None and sum(new_lens) != batch_size * num_new:
            index = valid.flatten().nonzero().squeeze(1).to(self.cache.device, non_blocking=True)
        pads = [p + num_new - n for p, n in zip(self.pads, new_lens, strict=True)]
        self.step = Step(self, batch_size, num_new, plan, index, new_lens, pads, graph=self.graphs)
        if self.graphs:
            self.expected_done += 1
        return self.step

    def _valid(self, batch_size: int, num_new: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The new positions' mask on the host ([B, S] bool), checked for left padding; None if all are tokens."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch_size:
            got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InvalidRequestError(f"the attention mask must be 2-D [{batch_size}, >= {num_new}], got {got}")
        if mask.shape[1] < num_new:
            raise InvalidRequestError(
                f"the attention mask covers {mask.shape[1]} positions; the step has {num_new} new ones"
            )
        valid = mask[:, mask.shape[1] - num_new :].to("cpu", torch.bool)
        if bool(valid.all()):
            return None
        started = torch.tensor([self.seen > p for p in self.pads] if self.rows else [False] * batch_size)
        unpadded = valid[:, 1:] >= valid[:, :-1]  # no token followed by a pad
        if not bool(unpadded.all()) or not bool(valid[started].all()):
            raise InvalidRequestError(
                "vkv needs left padding: in each row the masked (pad) positions must come before its first token "
                "(tokenizer padding_side='left'), and no token after it may be masked"
            )
        return valid

    def _take_slots(self, count: int) -> list[int]:
        taken: list[int] = []
        try:
            for _ in range(count):
                taken.append(self.cache.allocate())
        except BaseException:
            for slot in taken:
                self.cache.free(slot)
            raise
        return taken

    def _current(self, layer: int, storing: bool) -> Step:
        step = self.step
        if step is None:
            raise InvalidRequestError(
                "no step begun on this vkv cache: the model must run with attn_implementation='vkv' "
                "(vkv.integrations.hf.register(), then load the model with it)"
            )
        if layer != step.next_layer or step.stored != (not storing):
            what = "store" if storing else "attend"
            raise InvalidRequestError(
                f"layer {layer} asked to {what} but this step expects layer {step.next_layer} to "
                f"{'attend' if step.stored else 'store'} next (each layer stores its K/V, then attends, in order)"
            )
        return step

    def _pack(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] (the framework's layout) -> [T, H, D] of the step's tokens, request-major."""
        x = x.transpose(1, 2)
        # a decode step's [B, 1, H, D] is a view; a longer step's flattening copies only if x is not contiguous
        x = x[:, 0] if step.num_new == 1 else x.reshape(step.batch_size * step.num_new, *x.shape[2:])
        if step.index is not None:
            x = x.index_select(0, step.index)
        return x if x.stride(-1) == 1 else x.contiguous()

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store layer ``layer``'s new keys and values, [B, num_kv_heads, S, head_dim], pads left out."""
        step = self._current(layer, storing=True)
        if step.plan is not None:
            self._check_shape("key", k, step)
            self._check_shape("value", v, step)
            self.wrapper.store(layer, self._pack(step, k), self._pack(step, v))
        step.stored = True

    def attend(self, layer: int, q: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
        """Attention of the step's queries, [B, num_q_heads, S, head_dim], over their rows' stored tokens.
        Returns [B, S, num_q_heads, head_dim]; a pad position's output is zero. After the last layer the rows'
        lengths advance."""
        step = self._current(layer, storing=False)
        b, s = step.batch_size, step.num_new
        if tuple(q.shape[:1]) + tuple(q.shape[2:3]) != (b, s):
            raise InvalidRequestError(f"query must be [{b}, heads, {s}, head_dim] for this step, got {list(q.shape)}")
        if step.plan is None:
            out = q.new_zeros(b, s, q.shape[1], q.shape[3])
        else:
            packed = self.wrapper.attend(layer, self._pack(step, q), sm_scale=sm_scale)
            if step.index is None:
                out = packed.view(b, s, *packed.shape[1:])
            else:
                out = packed.new_zeros(b * s, *packed.shape[1:]).index_copy_(0, step.index, packed)
                out = out.view(b, s, *packed.shape[1:])
        self._finish_layer(step, layer)
        return out

    def _finish_layer(self, step: Step, layer: int) -> None:
        step.next_layer, step.stored = layer + 1, False
        if step.next_layer < self.num_layers:
            return
        if step.graph:
            self.done.add_(1)  # settle() counts the step
        else:
            self.seen, self.pads, self.step = self.seen + step.num_new, step.pads, None

    def decode_step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float):
        """Graph mode: store layer ``layer``'s new K/V and attend, for a decode step, in one call whose kernels a
        CUDA graph can capture (every launch parameter is stable across the decode steps of one batch size;
        nothing of the per-layer bookkeeping is needed at replay). q, k, v: [B, heads, 1, head_dim]; returns
        [B, 1, num_q_heads, head_dim]."""
        step = self.step
        if step is None or not step.graph or step.num_new != 1 or step.index is not None:
            raise InvalidRequestError("decode_step() runs a graph-mode decode step (one token a row, no pads)")
        step.next_layer, step.stored = layer, False  # a replay runs no Python: no per-layer order to check
        self.wrapper.store(layer, k[:, :, 0], v[:, :, 0])
        out = self.wrapper.attend(layer, q[:, :, 0], sm_scale=sm_scale)
        self._finish_layer(step, layer)
        return out.unsqueeze(1)

    def _check_shape(self, name: str, t: torch.Tensor, step: Step) -> None:
        cfg = self.cache.config
        want = (step.batch_size, cfg.num_kv_heads, step.num_new, cfg.head_dim)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidRequestError(
                f"{name} states must be {list(want)} (batch, kv heads, new tokens, head_dim) for this cache, got "
                f"{got}: was the cache made for another model?"
            )

    # ----------------------------------------------------------------------------------------- rows
    def reset(self) -> None:
        """Free every row's slot (its pages stay mapped for the next request until the pool needs them)."""
        self.settle()
        rows, self.rows, self.pads, self.seen, self.step = self.rows, None, [], 0, None
        for slot in rows or ():
            if self.cache.is_allocated(slot):
                self.cache.free(slot)

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions of every row (pads included); a negative ``length`` removes
        that many from the end. Cropping to nothing frees the slots."""
        self.settle()
        keep = self.seen + length if length < 0 else length
        if keep >= self.seen:
            return
        keep = max(keep, 0)
        if keep == 0:
            self.reset()
            return
        self.step, self.seen, self.pads = None, keep, [min(p, keep) for p in self.pads]

    def select(self, parents: list[int]) -> None:
        """Row i becomes a copy of row ``parents[i]`` (beam search's reorder, a batch's repeat or subset).
        A parent's first child keeps its slot; further children get a new slot sharing the parent's whole
        pages (``KVCache.share_prefix``: no copy but the partial last page); rows no child names are freed."""
        self.settle()
        if self.rows is None:
            if parents:
                raise InvalidRequestError("the cache holds no sequences to reorder")
            return
        rows, n = self.rows, len(self.rows)
        if any(not 0 <= p < n for p in parents):
            raise InvalidRequestError(f"row indices must be in [0, {n}), got {parents}")
        self._check_rows(len(parents))
        self.step = None
        keep = {p: i for i, p in reversed(list(enumerate(parents)))}  # parent -> its first child
        lens, new_rows, copies = self.lens, [], []
        try:  # the copies first: if one fails, they are given back and the rows are as they were
            for i, p in enumerate(parents):
                if keep[p] == i:
                    new_rows.append(rows[p])
                    continue
                copies.append(self.cache.allocate())
                if lens[p]:
                    self.cache.share_prefix(rows[p], copies[-1], lens[p])
                new_rows.append(copies[-1])
        except BaseException:
            for slot in copies:
                self.cache.free(slot)
            raise
        for row in range(n):
            if row not in keep:
                self.cache.free(rows[row])
        self.rows, self.pads = new_rows, [self.pads[p] for p in parents]

    def _check_rows(self, count: int) -> None:
        if count > self.max_rows:
            raise InvalidRequestError(
                f"a batch of {count} sequences needs {count} slots; this cache has max_batch_size={self.max_rows}"
            )
