# SPDX-License-Identifier: Apache-2.0
"""The model side of the engine: loading a decoder-only transformers model, and one packed forward over a step.

A step's tokens (decode tokens and prefill chunks of several requests) run as ONE sequence of T tokens,
``input_ids`` [1, T] with each token's own position: the model's token-wise layers (embeddings, norms, MLPs,
rotary) do not care which request a token belongs to, and attention is vkv's, which does (the plan). The model
runs with attn_implementation "vkv" (vkv.integrations.hf); its cache argument is an EngineCache, whose
``update`` stores each layer's new K/V in the requests' slots and whose step the attention reads them through.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache

from vkv.allocator import InvalidRequestError
from vkv.allocator.driver import CAPTURE_GATE
from vkv.attention import AttentionWrapper, token_positions
from vkv.integrations import hf
from vkv.parallel import SINGLE, TensorParallel, shard_model, sharded_for

from .tp import DECODE, STEP
from .weights import load_rank_share

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class PackedStep:
    """A step as vkv's attention function sees it: the plan's tokens, attended layer by layer."""

    def __init__(self, wrapper: AttentionWrapper):
        self.wrapper = wrapper
        self.vkv_handle = hf.packed_handle(self)  # compiled layers reach this step through vkv::packed_step
        self.next_layer = 0  # the layer vkv_store_attend serves next (reset before each forward, counted by vkv_store)

    def vkv_attend(self, layer: int, query: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """query [1, heads, T, head_dim] -> [1, T, heads, head_dim], over the K/V stored for ``layer``."""
        return self.wrapper.attend(layer, query[0].transpose(0, 1), sm_scale=sm_scale).unsqueeze(0)

    def vkv_store_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sm_scale: float):
        """A compiled layer's store and attention in one call (EngineCache.update stores nothing there). The layers
        run in order, once each a forward: the count restarts before each forward (ModelRunner._run)."""
        layer = self.next_layer
        if layer >= (layers := self.wrapper.cache.config.num_layers):
            raise InvalidRequestError(f"a compiled forward ran a layer past the {layers}: run it through ModelRunner")
        self.vkv_store(layer, key, value)
        return self.vkv_attend(layer, query, sm_scale)

    def vkv_store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``layer``'s new K/V ([1, kv heads, T, head_dim]) in the planned slots; the next layer is counted."""
        self.wrapper.store(layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
        self.next_layer = layer + 1


class EngineCache(Cache):
    """The cache argument of the engine's forward: K/V go to the slots of the wrapper's current plan."""

    def __init__(self, wrapper: AttentionWrapper):
        super().__init__(layers=[])
        self.wrapper, self.step = wrapper, PackedStep(wrapper)
        self.num_layers = wrapper.cache.config.num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not torch.compiler.is_compiling():  # compiled, the attention's vkv::packed_step stores them
            self.step.vkv_store(layer_idx, key_states, value_states)  # counted: compiled layers after it go on right
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come with the step (position_ids); nothing here is per sequence

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args, **kwargs) -> tuple[int, int]:
        hf._pending.cache = self  # the registered mask function asks this cache for the step
        return int(query_length), 0

    def vkv_step(self, batch_size: int, q_length: int, attention_mask: Any) -> PackedStep:
        if batch_size != 1 or attention_mask is not None:
            raise InvalidRequestError("the engine's forward is one packed sequence with no attention mask")
        return self.step

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers


def load_model(
    source: str | Path | PretrainedConfig | torch.nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    tensor_parallel: TensorParallel = SINGLE,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) with attn_implementation "vkv", in eval mode, on ``device``; with
    ``tensor_parallel`` over several ranks, this rank's share of it (vkv.parallel.shard_model).

    ``source``: a local directory (config.json, *.safetensors weights, tokenizer files if any; with
    ``random_weights`` only its config is read), a transformers config (random weights, seeded by ``seed``), or a
    model already built (sharded in place, or taken as it is where it is this rank's share already:
    vkv.engine.weights.random_rank_share). dtype: default bfloat16 on a GPU, float32 on the CPU; device: default cuda
    if there is one. Nothing is downloaded. A rank reads only its share of a directory's weights
    (vkv.engine.weights); from a config or a whole model, every rank builds the whole model first, then shards it."""
    if not isinstance(tensor_parallel, TensorParallel):
        raise InvalidRequestError(
            f"tensor_parallel must be a vkv.parallel.TensorParallel, got {type(tensor_parallel).__name__}"
        )
    hf.register()
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = None
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        config = source
        if not isinstance(source, PretrainedConfig):
            path = Path(source)
            if not (path / "config.json").is_file():
                raise InvalidRequestError(
                    f"{path}: no config.json there; expected a local model directory (config.json, *.safetensors "
                    "weights, tokenizer files) or a transformers config"
                )
            if any((path / name).is_file() for name in TOKENIZER_FILES):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path)
            if not random_weights:
                if not any(path.glob("*.safetensors")):
                    raise InvalidRequestError(f"{path}: no *.safetensors weights (random_weights=True builds them)")
                if tensor_parallel.world > 1:
                    return load_rank_share(path, tensor_parallel, dtype=dtype, device=device), tokenizer
                model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.NAME, dtype=dtype)
                return model.to(device).eval(), tokenizer
            config = AutoConfig.from_pretrained(path)
        config = copy.deepcopy(config)  # from_config sets the attention implementation on the config it gets
        torch.manual_seed(seed)
        with device:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=hf.NAME, dtype=dtype)
    model.set_attn_implementation(hf.NAME)
    done = sharded_for(model)
    if done is None:
        shard_model(model, tensor_parallel)
    elif done != tensor_parallel:  # rank, world and the group its all-reduces run over
        raise InvalidRequestError(
            f"this model is rank {done.rank}'s share of a world of {done.world} (group {done.group}); this engine is "
            f"rank {tensor_parallel.rank} of {tensor_parallel.world} (group {tensor_parallel.group})"
        )
    return model.to(device).eval(), tokenizer


DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def token_buckets(most: int) -> tuple[int, ...]:
    """The token counts steps that prefill are padded to under graph_tokens: steps of 16 up to 64, then of a
    quarter of the last power of two (80, 96, ..., 128, 160, ..., 256, 320, ...: padding adds less than a
    quarter), up to ``most``, which is always one."""
    sizes, size = [], 16
    while size < most:
        sizes.append(size)
        size += 16 if size < 64 else max(16, 1 << (size.bit_length() - 3))
    return (*sizes, most) if most else ()


class _Graph:
    """A step of ``size`` token rows captured once: its inputs and logits live at fixed addresses. ``keep``
    rows of logits (their indices an input too), or all rows (0: a decode step's)."""

    def __init__(self, size: int, device: torch.device, keep: int = 0):
        # token ids, positions (and the rows to keep): one copy a step
        self.inputs = torch.zeros(2 * size + keep, dtype=torch.long, device=device)
        self.ids, self.positions = self.inputs[:size].view(1, size), self.inputs[size : 2 * size].view(1, size)
        self.keep: torch.Tensor | int = self.inputs[2 * size :] if keep else 0
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.logits: torch.Tensor | None = None


class ModelRunner:
    """Runs a step's packed tokens through the model and returns the logits of the rows to sample.

    Decode steps (one token a request) can run padded to a batch-size bucket (``pad_slot``: a slot the padding
    rows write and read, of its own) and, with ``cuda_graphs``, as a CUDA graph captured per bucket on first use:
    the plan's metadata sits in the wrapper's persistent buffers (planned with graph_max_len = max_seq_len, so
    the kernels' launch parameters do not change between steps), the token ids and positions in the graph's
    input buffers. Other steps (prefill chunks, with or without decode rows) run eagerly; with the wrapper's
    ``max_graph_tokens`` those of at most that many tokens are padded to a token bucket (:func:`token_buckets`)
    instead and, with ``cuda_graphs``, run as a CUDA graph captured per token bucket: the host launches one
    graph where an eager step launches every kernel of every layer.

    ``compile_layers`` (True, or torch.compile's options) compiles each decoder layer: torch.compile fuses the
    norms, rotary embedding and activations around the GEMMs, vkv's store + attention run as one opaque op
    (``vkv::packed_step``), and every layer shares one compiled graph (its index is an input, not a constant). The
    first steps of each kind compile (decode, then a second shape: sizes become dynamic)."""

    def __init__(
        self,
        model: torch.nn.Module,
        wrapper: AttentionWrapper,
        *,
        pad_slot: int | None = None,
        cuda_graphs: bool = False,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        compile_layers: bool | dict[str, Any] = False,
    ):
        self.model, self.wrapper = model, wrapper
        self.device = wrapper.cache.device
        self.cache = EngineCache(wrapper)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed within transformers 5.x
        if cuda_graphs and (self.device.type != "cuda" or pad_slot is None):
            raise InvalidRequestError("cuda_graphs needs the model on a GPU and a pad_slot")
        self.pad_slot, self.cuda_graphs = pad_slot, cuda_graphs
        limit = wrapper.cache.config.max_slots - 1  # one slot pads
        self.buckets = sorted({b for b in buckets if b <= limit} | ({limit} if pad_slot is not None else set()))
        self.graphs: dict[int, _Graph] = {}
        self.token_buckets = token_buckets(wrapper.max_graph_tokens) if pad_slot is not None else ()
        self.mixed_graphs: dict[int, _Graph] = {}  # by token bucket
        self._graph_pool: Any = None
        self.replays = self.captures = 0
        self.channel: Any = None  # tensor parallelism, on rank 0: each step's plan goes to the other ranks first
        self.index = 0  # the engine's index in the channel
        self.compiled = [] if not compile_layers else list(getattr(getattr(model, "model", None), "layers", []))
        if compile_layers and not self.compiled:
            raise InvalidRequestError(f"compile: {type(model).__name__} has no decoder layers at model.model.layers")
        options = {"fullgraph": True} | (compile_layers if isinstance(compile_layers, dict) else {})
        for layer in self.compiled:
            layer.compile(**options)

    def uncompile(self) -> None:
        """Give the model's layers back uncompiled (nn.Module.compile works in place on the caller's model)."""
        for layer in self.compiled:
            layer._compiled_call_impl = None  # what nn.Module.compile set
        self.compiled = []

    @contextlib.contextmanager
    def eager(self):
        """The model's layers uncompiled for the duration, compiled again after (another caller, e.g. transformers'
        generate, runs the model outside the engine's steps: the compiled layers reach vkv's cache only from them)."""
        saved = [(layer, layer._compiled_call_impl) for layer in self.compiled]
        for layer, _ in saved:
            layer._compiled_call_impl = None
        try:
            yield self.model
        finally:
            for layer, impl in saved if self.compiled else ():  # (uncompile() inside: they stay uncompiled)
                layer._compiled_call_impl = impl

    def bucket(self, batch: int) -> int | None:
        """The padded size a decode step of ``batch`` rows runs at (None: eager, unpadded)."""
        if self.pad_slot is None:
            return None
        return next((b for b in self.buckets if b >= batch), None)

    def token_bucket(self, tokens: int) -> int | None:
        """The padded size a step of ``tokens`` tokens that prefills runs at (None: eager, unpadded)."""
        return next((b for b in self.token_buckets if b >= tokens), None)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor | int) -> torch.Tensor:
        kwargs = {self.cache_arg: self.cache}
        self.cache.step.next_layer = 0
        out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=keep, **kwargs)
        return out.logits[0]

    @torch.no_grad()
    def forward(
        self, slots: list[int], cached: list[int], new: list[int], token_ids: list[int], sample_rows: list[int]
    ) -> torch.Tensor:
        """Request i adds ``new[i]`` tokens after its ``cached[i]`` in slot ``slots[i]``; ``token_ids`` are all
        the step's tokens, request-major. Returns float32 logits [len(sample_rows), vocab] of those token rows."""
        if all(n == 1 for n in new) and (size := self.bucket(len(slots))) is not None:
            logits = self.decode(size, slots, cached, token_ids)
            return logits[sample_rows].float()
        if self.channel is None and (size := self.token_bucket(len(token_ids))) is not None:
            return self.mixed(size, slots, cached, new, token_ids, sample_rows)[: len(sample_rows)].float()
        if self.channel is not None:
            self.channel.send(self.index, STEP, 0, list(zip(slots, cached, new, strict=True)), token_ids, sample_rows)
        self.wrapper.plan(slots, cached, new)
        positions = token_positions(cached, new)
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self._run(ids, pos, keep).float()

    @torch.no_grad()  # also when called directly (a follower rank, the warm-up)
    def decode(self, size: int, slots: list[int], cached: list[int], token_ids: list[int]) -> torch.Tensor:
        """A decode step padded to ``size`` rows; logits [size, vocab] (the first len(slots) are the requests')."""
        batch, pad = len(slots), size - len(slots)
        if self.channel is not None:
            items = [(s, c, 1) for s, c in zip(slots, cached, strict=True)]
            self.channel.send(self.index, DECODE, size, items, token_ids)
        max_len = self.wrapper.cache.config.max_seq_len
        self.wrapper.plan(slots, cached, [1] * batch, graph_max_len=max_len, pad_slot=self.pad_slot, pad_rows=pad)
        graph = self.graphs.get(size)
        if graph is None:
            graph = self.graphs[size] = _Graph(size, self.device)
        graph.inputs.copy_(torch.tensor(token_ids + [0] * pad + cached + [0] * pad, dtype=torch.long))
        if not self.cuda_graphs:
            return self._run(graph.ids, graph.positions, 0)
        if graph.graph is None:
            self._capture(graph)
        graph.graph.replay()
        self.replays += 1
        return graph.logits

    @torch.no_grad()
    def mixed(
        self,
        size: int,
        slots: list[int],
        cached: list[int],
        new: list[int],
        token_ids: list[int],
        sample_rows: list[int],
    ) -> torch.Tensor:
        """A step that prefills, padded to ``size`` tokens (a token bucket); logits [min(size, slots), vocab], the
        first len(sample_rows) those of ``sample_rows`` (the rest: of row 0)."""
        keep = min(size, self.wrapper.cache.config.max_slots)
        if len(sample_rows) > keep:
            raise InvalidRequestError(f"{len(sample_rows)} rows to sample; a step samples at most {keep}")
        self.wrapper.plan(slots, cached, new, graph_tokens=size, pad_slot=self.pad_slot)
        graph = self.mixed_graphs.get(size)
        if graph is None:
            graph = self.mixed_graphs[size] = _Graph(size, self.device, keep)
        pad = size - len(token_ids)
        positions = token_positions(cached, new)
        rows = token_ids + [0] * pad + positions + [0] * pad + sample_rows + [0] * (keep - len(sample_rows))
        graph.inputs.copy_(torch.tensor(rows, dtype=torch.long))
        if not self.cuda_graphs:
            return self._run(graph.ids, graph.positions, graph.keep)
        if graph.graph is None:
            try:
                self._capture(graph)
            except BaseException:  # this bucket's steps run eagerly from now on, rather than fail each time
                self.token_buckets = tuple(b for b in self.token_buckets if b != size)
                del self.mixed_graphs[size]
                raise
        graph.graph.replay()
        self.replays += 1
        return graph.logits

    def _capture(self, graph: _Graph) -> None:
        """Run the planned step once (kernels compile, the step's K/V are stored), capture it, replay it (the
        store writes the same values again)."""
        self._run(graph.ids, graph.positions, graph.keep)  # warm-up, eagerly: Triton compiles outside the capture
        torch.cuda.synchronize(self.device)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        cuda_graph = torch.cuda.CUDAGraph()
        with CAPTURE_GATE.capture(), torch.cuda.graph(cuda_graph, pool=self._graph_pool):  # no pool's sync meanwhile
            graph.logits = self._run(graph.ids, graph.positions, graph.keep)
        graph.graph = cuda_graph
        self.captures += 1
