# SPDX-License-Identifier: Apache-2.0
"""vkv as an attention backend for HF transformers, through its registries (no monkey-patching).

    from transformers import AutoModelForCausalLM
    from vkv.integrations import hf

    hf.register()                                            # "vkv" in AttentionInterface + AttentionMaskInterface
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="vkv", dtype=torch.bfloat16).cuda()
    cache = hf.VkvCache(model, max_batch_size=8, max_seq_len=4096)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=128)
    cache.reset()                                            # before the next, unrelated batch

How the three pieces meet in one forward pass: the model asks the cache for the mask's sizes
(``get_mask_sizes``), then calls the registered mask function, which begins a step on that cache (slots
grown, the attention plan uploaded) and returns it as the "attention mask"; every layer's ``cache.update``
then stores the layer's new K/V with vkv's store kernel (pads left out), and the registered attention
function reads them in place through that step. See :class:`vkv.integrations.batch.SlotBatch`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Any

import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

from vkv.allocator import InvalidRequestError, PagePool
from vkv.attention import AttentionWrapper
from vkv.cache import KVCache
from vkv.layout import CacheConfig

from .batch import SlotBatch, Step

NAME = "vkv"
_pending = threading.local()  # the cache whose mask sizes were just asked for, for the mask function that follows
_batches: weakref.WeakValueDictionary[int, SlotBatch] = weakref.WeakValueDictionary()  # compiled steps find theirs
_handles = itertools.count()
_active = -1  # the handle of the compile_decode cache whose step began last (the compiled forward reads it)
_packed: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()  # the engine's steps, by vkv_handle


def packed_handle(step: Any) -> int:
    """A handle for ``step`` (an object with ``vkv_store_attend``) that compiled layers pass to ``vkv::packed_step``:
    the engine's layers under torch.compile store and attend through it as one opaque op."""
    handle = next(_handles)
    _packed[handle] = step
    return handle


class VkvCache(Cache):
    """A transformers ``Cache`` whose K/V live in a vkv KVCache: one slot per sequence, pages mapped as they grow.

    Parameters
    ----------
    model : transformers model or config
        The model (its config, dtype and device are used) or its config (then give ``dtype`` and ``device``).
    max_batch_size : int
        Most sequences at once (beam search counts each beam).
    max_seq_len : int
        Most tokens a sequence holds, prompt and generated (pads are never stored and do not count).
    pool : vkv.PagePool, optional
        Where pages come from (share one between models); default a pool of this cache's own, whose budget is
        90% of the device's free memory at creation.
    layout, group_layers : optional
        The KV layout (``CacheConfig``); default token-major.
    dtype, device : optional
        Default the model's.
    compile_decode : bool
        Declare the cache compileable: on a GPU, transformers' ``generate()`` then compiles the decode step
        (``torch.compile``, mode "reduce-overhead": CUDA graphs, one per batch size; the first call of each
        shape compiles). vkv's store and attention run there as one custom op, ``vkv::decode_step``, and a
        step's lengths are counted when the next step begins (a device counter says whether it finished).

    ``reset()`` (or ``close()``) frees the slots; their pages stay mapped for the next batch until the pool
    needs them. Sliding-window layers are served when the window covers ``max_seq_len`` (then it never
    excludes a token); otherwise, and for cross attention, soft-capped logits or per-layer shapes, the
    constructor raises.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int,
        max_seq_len: int,
        pool: PagePool | None = None,
        layout: str = "token",
        group_layers: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile_decode: bool = False,
    ):
        config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise InvalidRequestError(f"model must be a transformers model or config, got {type(model).__name__}")
        config = config.get_text_config(decoder=True)
        if dtype is None or device is None:
            if isinstance(model, PretrainedConfig):
                raise InvalidRequestError("give dtype and device when the cache is made from a config")
            param = next(model.parameters())
            dtype, device = dtype or param.dtype, device or param.device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive int, got {value!r}")
        geometry = _geometry(config, max_seq_len)
        kv_config = CacheConfig(
            **geometry,
            dtype=dtype,
            max_slots=2 * max_batch_size,
            max_seq_len=max_seq_len,
            layout=layout,
            group_layers=group_layers,
        )  # twice the rows: a reorder copies rows before it frees the ones dropped
        backend = "cuda" if self.device.type == "cuda" else "host"
        with torch.cuda.device(self.device) if backend == "cuda" else contextlib.nullcontext():
            self.kv = KVCache(kv_config, pool, backend=backend if pool is None else None)  # pool None: its own
        if self.kv.device != self.device:
            self.kv.close()
            raise InvalidRequestError(f"the pool's pages are on {self.kv.device}, the model on {self.device}")
        self.config = config
        wrapper = AttentionWrapper(self.kv, config.num_attention_heads)
        self.batch = SlotBatch(wrapper, max_rows=max_batch_size, graphs=bool(compile_decode))
        self.handle = next(_handles)
        _batches[self.handle] = self.batch
        self._mask = torch.zeros(1, 1, 1, 1, device=self.kv.device) if compile_decode else None
        super().__init__(layers=[])

    # --------------------------------------------------------------------- what transformers asks of a Cache
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the layer's new K/V ([B, kv heads, S, head_dim]) in the sequences' slots; the attention reads
        them there. Returns the new states unchanged (vkv's attention does not use them). In a compiled decode
        step the attention stores them (``vkv::decode_step``: one op, so the compiler cannot drop the store)."""
        if self.batch.graphs and torch.compiler.is_compiling():
            return key_states, value_states
        self.batch.store(layer_idx, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self.batch.settle()
        return self.batch.seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        _pending.cache = self  # the mask function called next begins the step on this cache
        return self.get_seq_length() + int(query_length), 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no fixed length in positions: pads are not stored; max_seq_len bounds the tokens

    def reset(self) -> None:
        self.batch.reset()

    def crop(self, max_length: int) -> None:
        self.batch.crop(int(max_length))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch.select([int(i) for i in beam_idx.tolist()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.batch.select([int(i) for i in torch.as_tensor(indices).tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch.select([row for row in range(len(self.batch.rows or [])) for _ in range(repeats)])

    def activate_past_recording(self, *args, **kwargs) -> None:
        pass  # every position stays until crop() or reset()

    def is_recording_past(self, layer_idx: int = 0) -> bool:
        return False

    def __len__(self) -> int:
        return self.kv.config.num_layers

    @property
    def batch_size(self) -> int:
        return len(self.batch.rows) if self.batch.rows is not None else -1

    @property
    def is_compileable(self) -> bool:
        return self.batch.graphs

    @property
    def is_initialized(self) -> bool:
        return self.batch.rows is not None

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)

    # --------------------------------------------------------------------- vkv's own
    def vkv_step(self, batch_size: int, q_length: int, attention_mask: torch.Tensor | None) -> Step | torch.Tensor:
        """Begin a forward's step (the registered mask function calls it); returns what the attention gets."""
        global _active
        step = self.batch.begin(batch_size, q_length, attention_mask)
        if self._mask is None:
            return step
        _active = self.handle
        return self._mask

    def close(self) -> None:
        """Free the slots and give the cache's pages and virtual range back (and its own pool's pages)."""
        self.batch.reset()
        self.kv.close()

    def __enter__(self) -> VkvCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        cfg = self.kv.config
        return (
            f"VkvCache(sequences={self.batch_size}, positions={self.batch.seen}, layers={cfg.num_layers}, "
            f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, mapped={self.kv.stats().mapped_bytes >> 20} MiB)"
        )


def cache_kwargs(cache: VkvCache) -> dict[str, VkvCache]:
    """``{name: cache}`` under the name the installed transformers' ``generate()`` takes a cache by: ``cache`` in
    newer 5.x releases, ``past_key_values`` before (newer releases still take it, with a warning)."""
    from transformers.generation import utils

    return {getattr(utils, "ALL_CACHE_NAMES", ["past_key_values"])[0]: cache}


def _geometry(config: PretrainedConfig, max_seq_len: int) -> dict[str, int]:
    """num_layers, num_kv_heads and head_dim of a decoder config, or an error naming what vkv cannot serve."""
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise InvalidRequestError(f"{name}: cross attention is not served by vkv (decoder-only models only)")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise InvalidRequestError(f"{name}: soft-capped attention logits are not served by vkv's kernels")
    types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None  # Qwen2's configs carry a window they do not use
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        other = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        raise InvalidRequestError(f"{name}: layers of type {other} are not served by vkv (full attention only)")
    if (window is not None or "sliding_attention" in types) and (window or 0) < max_seq_len:
        raise InvalidRequestError(
            f"{name}: sliding-window attention (window {window}) is not served by vkv's kernels; it is served when "
            f"the window covers every token: max_seq_len <= {window} (got {max_seq_len})"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
    }


def vkv_mask(
    *, batch_size: int, q_length: int, attention_mask: torch.Tensor | None = None, **kwargs
) -> Step | torch.Tensor:
    """The registered mask function: begins the step on the cache whose mask sizes were just asked for
    (``cache.vkv_step``) and returns it; the attention function gets it as its ``attention_mask``. For a
    ``compile_decode`` cache it returns a 4-D placeholder tensor instead (transformers passes a 4-D mask through
    the compiled forward untouched) and the attention finds the step by the cache's handle. The engine's cache
    returns a step of its own, whose ``vkv_attend`` the attention function calls."""
    if torch.compiler.is_compiling():
        raise InvalidRequestError("vkv's mask is made outside the compiled forward: pass generate() an attention_mask")
    cache = getattr(_pending, "cache", None)
    _pending.cache = None
    if cache is None:
        raise InvalidRequestError(
            "attn_implementation='vkv' needs a vkv cache: pass past_key_values=vkv.integrations.hf.VkvCache(model, "
            "...) to generate() or the model's forward (use_cache=True)"
        )
    return cache.vkv_step(int(batch_size), int(q_length), attention_mask)


def vkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: attention of ``query`` ([B, heads, S, head_dim]) over the K/V that
    ``VkvCache.update`` stored for this layer, read in place. Returns ([B, S, heads, head_dim], None)."""
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if torch.compiler.is_compiling() and (handle := getattr(attention_mask, "vkv_handle", None)) is not None:
        return torch.ops.vkv.packed_step(query, key, value, handle, float(scale)), None  # the engine's step
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.numel() == 1:
        if torch.compiler.is_compiling():  # a compile_decode cache's decode step: store + attend in one op
            return torch.ops.vkv.decode_step(query, key, value, _active, module.layer_idx, float(scale)), None
        attention_mask = _batches[_active].step  # the same cache's step, run eagerly (a prefill, say)
    if callable(attend := getattr(attention_mask, "vkv_attend", None)):  # another vkv step (the engine's)
        return attend(module.layer_idx, query, scale), None
    if not isinstance(attention_mask, Step):
        raise InvalidRequestError(
            "attn_implementation='vkv' runs only over a vkv cache: pass past_key_values=VkvCache(model, ...) and "
            "use_cache=True; got no vkv step as the attention mask"
        )
    if dropout:
        raise InvalidRequestError(f"vkv attention is for inference: dropout must be 0, got {dropout} (model.eval())")
    if softcap is not None:
        raise InvalidRequestError("soft-capped attention logits are not served by vkv's kernels")
    batch = attention_mask.batch
    if batch.step is not attention_mask:
        raise InvalidRequestError("this vkv step is over or was replaced by a newer one: run the forward again")
    if sliding_window is not None and sliding_window < batch.cache.config.max_seq_len:
        raise InvalidRequestError(
            f"sliding window {sliding_window} shorter than the cache's max_seq_len {batch.cache.config.max_seq_len}"
        )
    return batch.attend(module.layer_idx, query, sm_scale=scale), None


@torch.library.custom_op("vkv::decode_step", mutates_args=())
def _decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, layer: int, sm_scale: float
) -> torch.Tensor:
    """Store a decode step's K/V ([B, kv heads, 1, head_dim]) in the slots of cache ``handle`` and attend; the
    compiler sees one opaque op (its CUDA graph captures the kernels it launches)."""
    return _batches[handle].decode_step(layer, q, k, v, sm_scale)


@_decode_step.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, layer: int, sm_scale: float) -> torch.Tensor:
    batch, heads, _, head_dim = q.shape
    return q.new_empty(batch, 1, heads, head_dim)


@torch.library.custom_op("vkv::packed_step", mutates_args=())
def _packed_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, sm_scale: float) -> torch.Tensor:
    """The engine's step in a compiled layer: store the next layer's new K/V ([1, kv heads, T, head_dim]) in the
    planned slots and attend q ([1, heads, T, head_dim]) over them; returns [1, T, heads, head_dim]. The step counts
    the layers (they run in order), so the layer index is no constant of the graph: one graph serves every layer."""
    return _packed[handle].vkv_store_attend(q, k, v, sm_scale)


@_packed_step.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, sm_scale: float) -> torch.Tensor:
    _, heads, tokens, head_dim = q.shape
    return q.new_empty(1, tokens, heads, head_dim)


def register() -> None:
    """Register "vkv" with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    AttentionInterface.register(NAME, vkv_attention)
    AttentionMaskInterface.register(NAME, vkv_mask)


def unregister() -> None:
    """Undo :func:`register` (for tests): "vkv" is no longer an attention implementation."""
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(NAME, None)
