# SPDX-License-Identifier: Apache-2.0
"""The engine: one model served with continuous batching over an elastic vkv cache.

    from vkv.engine import Engine, SamplingParams

    engine = Engine("path/to/model")                 # or a transformers config (random weights), or a model
    outs = engine.generate([[1, 2, 3], "Hello"], SamplingParams(max_tokens=32, temperature=0))

A step schedules (vkv.engine.scheduler), runs the step's tokens as one packed forward (vkv.engine.model) and
samples (vkv.engine.sampler). Requests come in from any thread (``add_request``, ``abort``) and are taken in at
the start of the next step; each request's ``on_output`` is called with what a step produced for it (streaming).
On a GPU those calls wait until the next step's forward is queued (or no step follows): the listeners' Python (the
server's event loop, taking the GIL) then runs while the GPU computes, not between two steps where it would hold
up the next launch.
``start()`` runs steps on a thread of the engine's own while there is work. Several engines (models) share
memory through one PagePool: pages a model frees go to the pool, and the pool takes idle pages back from the
others' caches when one grows; an engine idle for ``idle_release_s`` gives its kept pages back (``KVCache.trim``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from vkv.allocator import InvalidRequestError, OutOfPagesError, PagePool, get_driver
from vkv.allocator.checks import check_seconds, is_int
from vkv.allocator.ledger import LedgerBusyError
from vkv.attention import AttentionWrapper
from vkv.cache import KVCache
from vkv.integrations import hf
from vkv.kernels.extend import extend_variants
from vkv.layout import CacheConfig
from vkv.parallel import SINGLE, TensorParallel, pool_device_index, shard_heads
from vkv.threads import Thread

from .clock import StepClock
from .model import ModelRunner, load_model
from .params import SamplingParams
from .request import Request, RequestOutput, Status
from .sampler import sample
from .scheduler import Scheduler
from .tp import STOP, LeaderCache, channel_for

_ids = itertools.count()
log = logging.getLogger("vkv.engine")
WARN_EVERY_S = 60.0  # a condition that persists (the device full) is logged at most this often
DEVICE_FULL_WAIT_S = 60.0  # a request a full device holds up while nothing else can free pages ends after this long


GRAPH_TOKENS = 512  # steps that prefill, of up to this many tokens, run as CUDA graphs by default (token buckets)


def _out_of_memory(exc: Exception) -> bool:
    """torch's allocator found no device memory, or a CUDA library could not allocate its workspace (cuBLAS's handle:
    CUBLAS_STATUS_ALLOC_FAILED): a shortage that may pass, unlike other failures."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "_ALLOC_FAILED" in str(exc))


class Engine:
    """One model, its KVCache and scheduler.

    Parameters
    ----------
    model : a model directory, a transformers config (random weights) or a transformers model
    tokenizer : optional; default the directory's, if it has one (text prompts need one)
    name : the model's name (the server's "model" field); default the directory's name or the config's type
    pool : a PagePool to share with other engines; default one of this engine's own
    max_num_seqs : most requests running at once (the cache's slots)
    max_seq_len : most tokens a request holds, prompt and output; default min(max_position_embeddings, 8192)
    max_num_batched_tokens : the tokens of one step (decode tokens + prefill chunks)
    prefill_with_decode : the prompt tokens a step that decodes may carry (None: up to max_num_batched_tokens): a
        smaller chunk keeps the running requests' inter-token latency even while prompts are prefilled
    layout, group_layers : the KV layout (default grouped, 8 layers a plane where the layers divide by 8)
    budget_bytes, backend, page_size : of the engine's own pool (default 90% of free device memory; cuda on a GPU;
        the device's page size)
    idle_release_s : give the cache's kept pages back after this long without a request (None: never)
    cuda_graphs : decode steps as CUDA graphs captured per batch-size bucket (default: on a GPU); a slot more
        than max_num_seqs is kept for the padding rows
    pad_decode : pad decode steps to the buckets without graphs (what the graphs run, eagerly: for tests)
    graph_tokens : steps that prefill (prompt chunks, with or without decode rows) of at most this many tokens
        are padded to a token bucket and, with cuda_graphs, run as CUDA graphs captured per bucket, like decode
        steps (0: they run eagerly; default GRAPH_TOKENS = 512 with cuda_graphs on one rank, else 0). An eager step
        of a large model launches every kernel of every layer from Python, which takes longer than the GPU's work
        for a few hundred tokens; a graph is one launch (an 8B model's steps of ~320 tokens on an H100: 27.6 ms
        eager, 16.5 ms as graphs; docs/serving.md)
    compile : torch.compile each decoder layer (True, or torch.compile's options; default off): the norms, rotary
        embedding and activations fuse around the GEMMs; the first steps compile (minutes for an 8B model on a
        GPU). Under tensor parallelism the all-reduces are traced into the graph. A model object passed in has its
        layers compiled in place until the engine closes
    dtype, device : for a model loaded here
    tensor_parallel : this process's rank of a tensor-parallel group (vkv.parallel): the model's attention and MLP
        weights are sharded in place and the cache holds this rank's share of the KV heads. Rank 0 schedules and
        serves; the other ranks build the same engines in the same order and call :meth:`follow`
    device_full_wait_s : how long a request may wait for a device with no memory for its pages while nothing else
        here could free any (it runs alone, or is the queue's head with nothing running); then it ends, with
        "length" and its tokens so far, or "error" if it has none (default DEVICE_FULL_WAIT_S = 60 s)
    """

    def __init__(
        self,
        model: str | Path | PretrainedConfig | torch.nn.Module,
        *,
        tokenizer: Any = None,
        name: str | None = None,
        pool: PagePool | None = None,
        max_num_seqs: int = 32,
        max_seq_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        prefill_with_decode: int | None = None,
        layout: str = "grouped",
        group_layers: int | None = None,
        budget_bytes: int | None = None,
        backend: str | None = None,
        page_size: int | None = None,
        idle_release_s: float | None = 2.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        cuda_graphs: bool | None = None,
        pad_decode: bool = False,
        graph_tokens: int | None = None,
        compile: bool | dict[str, Any] = False,
        tensor_parallel: TensorParallel | None = None,
        device_full_wait_s: float = DEVICE_FULL_WAIT_S,
    ):
        for what, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("prefill_with_decode", 1 if prefill_with_decode is None else prefill_with_decode),
        ):
            if not is_int(value) or value < 1:
                raise InvalidRequestError(f"{what} must be a positive int, got {value!r}")
        device_full_wait_s = check_seconds("device_full_wait_s", device_full_wait_s, positive=True)
        if graph_tokens is not None and (not is_int(graph_tokens) or not 0 <= graph_tokens <= 1 << 16):
            raise InvalidRequestError(f"graph_tokens must be None or an int in [0, 65536], got {graph_tokens!r}")
        if isinstance(model, (str, Path)) and name is None:
            name = Path(model).name
        self._closed = False
        tp = SINGLE if tensor_parallel is None else tensor_parallel
        if not isinstance(tp, TensorParallel):
            raise InvalidRequestError(f"tensor_parallel must be a vkv.parallel.TensorParallel, got {type(tp).__name__}")
        if graph_tokens and tp.world > 1:
            raise InvalidRequestError("graph_tokens is not supported under tensor parallelism yet (leave it 0)")
        if not isinstance(compile, (bool, dict)):
            raise InvalidRequestError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
        if tp.world > 1 and pool is None and budget_bytes is None:
            raise InvalidRequestError(
                "a tensor-parallel engine needs budget_bytes (the same on every rank: growth rank 0 allows must fit "
                "every rank's pool) or a pool; vkv.server.launch.build_engines agrees one over the ranks"
            )
        model, loaded_tokenizer = load_model(model, dtype=dtype, device=device, tensor_parallel=tp)
        self.model, self.tokenizer = model, tokenizer if tokenizer is not None else loaded_tokenizer
        config = model.config.get_text_config(decoder=True)
        self.tp = tp
        self.name = name or getattr(config, "model_type", None) or "model"
        if max_seq_len is None:
            max_seq_len = min(getattr(config, "max_position_embeddings", None) or 8192, 8192)
        geometry = hf._geometry(config, max_seq_len)
        q_heads, geometry["num_kv_heads"] = shard_heads(config.num_attention_heads, geometry["num_kv_heads"], tp)
        layers = geometry["num_layers"]
        if layout == "grouped" and group_layers is None:
            group_layers = 8 if layers % 8 == 0 else next(g for g in (4, 2, 1) if layers % g == 0)
        param = next(model.parameters())
        cuda_graphs = param.is_cuda if cuda_graphs is None else bool(cuda_graphs)
        padded = cuda_graphs or pad_decode
        if graph_tokens is None:  # the default: graphs for steps that prefill wherever the decode steps have them
            graph_tokens = GRAPH_TOKENS if cuda_graphs and tp.world == 1 else 0
        graph_tokens = min(graph_tokens, max_num_batched_tokens)  # no step is larger: no bucket above it
        if graph_tokens and not padded:
            raise InvalidRequestError(
                f"graph_tokens={graph_tokens} pads steps for CUDA graphs: it needs cuda_graphs (a model on a GPU) or "
                "pad_decode=True"
            )
        kv_config = CacheConfig(
            **geometry, dtype=param.dtype, max_slots=max_num_seqs + padded, max_seq_len=max_seq_len, layout=layout,
            group_layers=group_layers if layout == "grouped" else None,
        )  # fmt: skip
        if pool is None:
            backend = backend or ("cuda" if param.is_cuda else "host")
            index = pool_device_index(backend, param.device.index, tp)
            pool = PagePool(get_driver(backend, page_size=page_size, device=index), budget_bytes)
            self._own_pool = pool
        else:
            self._own_pool = None
        self.pool = pool
        self.kv = None
        try:
            self.kv = (LeaderCache if tp.world > 1 and tp.leader else KVCache)(kv_config, pool)
            if self.kv.device != param.device:
                raise InvalidRequestError(f"the pool's pages are on {self.kv.device}, the model on {param.device}")
            pad_slot = None
            if padded:  # the padding rows' slot: one token, held for the engine's life
                pad_slot = self.kv.allocate(1)
                self.kv.grow(pad_slot, 1)
            wrapper = AttentionWrapper(self.kv, q_heads, max_graph_tokens=graph_tokens if padded else 0)
            self.runner = ModelRunner(
                model, wrapper, pad_slot=pad_slot, cuda_graphs=cuda_graphs, compile_layers=compile
            )
            self.channel = channel_for(tp, self.kv.device) if tp.world > 1 else None
            if self.channel is not None:  # from here on, rank 0's changes to its slots and its steps are broadcast
                index = self.channel.add(self)
                if tp.leader:
                    self.kv.channel, self.kv.index = self.channel, index
                    self.runner.channel, self.runner.index = self.channel, index
        except BaseException:
            if getattr(self, "runner", None) is not None:
                self.runner.uncompile()
            if self.kv is not None:
                self.kv.close()
            if self._own_pool is not None:
                self._own_pool.close()
            raise
        self.config, self.vocab_size = config, config.vocab_size
        self.max_seq_len = max_seq_len
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            prefill_with_decode=prefill_with_decode,
        )  # fmt: skip
        self.eos_ids = _eos_ids(model)
        self.idle_release_s = idle_release_s
        self.requests: dict[str, Request] = {}  # live ones
        self._lock = threading.Lock()
        self._new: list[Request] = []
        self._aborts: list[str] = []
        self.group: EngineGroup | None = None  # the group whose thread steps this engine
        self._idle_since: float | None = time.monotonic()
        self.steps = self.generated_tokens = self.computed_tokens = 0
        self.trims = self.callback_errors = 0
        self.device_full = 0  # this engine's growths the device had no memory for (it ran the schedule that met them)
        self.device_full_wait_s = device_full_wait_s
        self.forward_out_of_memory = 0  # forwards that ran out of device memory (activations, a library's workspace)
        self._short_since: float | None = None  # the first of the forwards failing so in a row
        self._warned_full_at = self._emptied_at = self._warned_short_at = -math.inf
        self.last_ran = False  # the last step ran a batch
        # on_output calls wait for the next step's forward to be queued (module docstring): on a GPU, whose forward
        # runs asynchronously (on the CPU the forward is the work: its outputs would come a step late)
        self.defer_outputs = self.runner.device.type == "cuda"
        self._held: list[tuple[Request, RequestOutput]] = []  # the last step's outputs, waiting
        self.clock = StepClock(self.runner.device)  # where the steps' time goes (stats())

    # ------------------------------------------------------------------------------------------ requests
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A prompt's token ids: text through the tokenizer, ids checked against the vocabulary."""
        return encode_prompt(prompt, self.tokenizer, self.vocab_size, self.name)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> Request:
        """Queue a request (any thread); it joins the next step. Raises InvalidRequestError, having queued
        nothing, for a prompt that is malformed or can never fit (past max_seq_len, or more pages than the pool's
        whole budget)."""
        if not self.tp.leader:
            raise InvalidRequestError(f"rank {self.tp.rank} follows rank 0's steps: requests go to rank 0")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if on_output is not None and not callable(on_output):
            raise InvalidRequestError(
                f"on_output must be a callable taking a RequestOutput, got {type(on_output).__name__}"
            )
        ids = self.encode(prompt)
        if len(ids) >= self.max_seq_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; this model's max_seq_len is {self.max_seq_len} (prompt and output)"
            )
        pages, budget = self._pages_against_budget(len(ids))  # the KV that samples the first output token
        if pages > budget:
            raise InvalidRequestError(
                f"the prompt of {len(ids)} tokens needs {pages} pages of KV but the pool's whole budget is {budget}"
            )
        request_id = request_id if request_id is not None else f"req-{next(_ids)}"
        request = Request(str(request_id), ids, params, on_output)
        with self._lock:
            if request.request_id in self.requests or any(r.request_id == request.request_id for r in self._new):
                raise InvalidRequestError(f"request id {request.request_id!r} is in use")
            self._new.append(request)
        if self.group is not None:
            self.group.wake.set()
        return request

    def abort(self, request_id: str) -> None:
        """Cancel a request (any thread): it finishes with reason "abort" at the next step and frees its slot."""
        with self._lock:
            self._aborts.append(str(request_id))
        if self.group is not None:
            self.group.wake.set()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._new or self._aborts or self.scheduler.has_work())

    # ------------------------------------------------------------------------------------------ a step
    def step(self) -> list[RequestOutput]:
        """Take in new requests and aborts, run one step, deliver its outputs; returns them."""
        self.clock.step_started()
        try:
            return self._step()
        finally:
            self.clock.step_ended()

    def _step(self) -> list[RequestOutput]:
        with self._lock:
            new, aborts, self._new, self._aborts = self._new, self._aborts, [], []
            for request in new:
                self.requests[request.request_id] = request
        outputs: list[tuple[Request, RequestOutput]] = []
        for request in new:
            self.scheduler.add(request)
        for request_id in aborts:
            request = self.requests.get(request_id)
            if request is not None:
                request.aborted = True
                outputs.append((request, self._finish(request, "abort")))
        self.last_ran = False
        full = self.pool.device_full
        try:
            batch = self.scheduler.schedule()
        except LedgerBusyError:  # another process holds the ledger's lock (stopped?): nothing changed, next step
            batch = []
        except Exception as exc:  # noqa: BLE001 - a driver or ledger failure: the requests fail, the engine goes on
            failed = self.fail_all(f"scheduling failed: {type(exc).__name__}: {exc}")
            log.error("model %s: scheduling failed, %d requests end with an error: %s: %s", self.name, len(failed),
                      type(exc).__name__, exc)  # fmt: skip
            outputs += failed
            batch = []
        if self.pool.device_full != full:  # the pool counts for every engine sharing it: these were this schedule's
            self._device_was_full(self.pool.device_full - full)
            outputs += self._end_stalled()
        if batch:
            self.last_ran = True
            outputs += self._run(batch)
        elif self.scheduler.waiting and not self.scheduler.running:
            outputs += self._unfit()
        held, self._held = self._held, []  # what _run did not deliver (no step ran, or it failed before its forward)
        if self.defer_outputs and batch and self.scheduler.running:
            self._held = held + outputs  # a next step follows: delivered once its forward is on the GPU
        else:
            self._deliver(held + outputs)
        return [output for _, output in outputs]

    def deliver_held(self) -> None:
        """Make the on_output calls held back from the last step (see the module's docstring)."""
        held, self._held = self._held, []
        self._deliver(held)

    def _deliver_group_held(self) -> None:
        """The GPU has this step's forward: deliver what the last steps of this engine and its group's held."""
        for engine in self.group.engines if self.group is not None else (self,):
            if engine._held:
                engine.deliver_held()

    def _deliver(self, outputs: list[tuple[Request, RequestOutput]]) -> None:
        for request, output in outputs:
            if request.on_output is not None:
                try:
                    request.on_output(output)
                except Exception:  # noqa: BLE001 - a listener's failure is its own: the others still hear
                    self.callback_errors += 1

    def fail_all(self, why: str) -> list[tuple[Request, RequestOutput]]:
        """Finish every live request with "error" (``why``), freeing their slots; returns their outputs."""
        out = []
        for request in list(self.scheduler.running) + list(self.scheduler.waiting):
            try:
                out.append((request, self._finish(request, "error", why)))
            except Exception:  # noqa: BLE001 - its slot could not be freed: the request ends all the same
                request.status, request.finish_reason, request.error = Status.FINISHED, "error", why
                self.requests.pop(request.request_id, None)
                out.append((request, request.output([])))
        return out

    def _run(self, batch) -> list[tuple[Request, RequestOutput]]:
        slots, cached, new, tokens, rows, sampled = [], [], [], [], [], []
        for item in batch:
            request = item.request
            if item.samples:
                rows.append(len(tokens) + item.num_new - 1)
                sampled.append(request)
            slots.append(request.slot)
            cached.append(request.computed)
            new.append(item.num_new)
            tokens += request.token_ids(request.computed, request.computed + item.num_new)
        self.clock.step_kind("decode" if all(n == 1 for n in new) else "mixed", len(tokens), len(batch))
        try:
            self.clock.forward_launching()
            logits = self.runner.forward(slots, cached, new, tokens, rows)
            self.clock.forward_queued()
            self._deliver_group_held()  # while the GPU runs the forward (sample() below waits for it)
            for i, request in enumerate(sampled):  # no stop token before min_tokens: those cannot be drawn
                early = len(request.output_ids) < request.params.min_tokens
                if early and (stops := sorted(t for t in self._stops(request) if t < logits.shape[1])):
                    logits[i, stops] = float("-inf")
            picked = sample(logits, sampled) if sampled else []
        except Exception as exc:  # noqa: BLE001 - the step's requests fail with the reason; the engine goes on
            self.clock.step_kind(None)  # a failed step is not one of its kind
            why = f"{type(exc).__name__}: {exc}"
            if _out_of_memory(exc) and self._short_of_memory(why):
                return []  # its requests stay, to be stepped again
            log.error("model %s: a step of %d tokens failed, its %d requests end with an error: %s", self.name,
                      len(tokens), len(batch), why)  # fmt: skip
            return [(item.request, self._finish(item.request, "error", why)) for item in batch]
        self._short_since = None
        self.steps += 1
        self.computed_tokens += len(tokens)
        for item in batch:
            item.request.computed += item.num_new
        now, outputs = time.monotonic(), []
        for request, token in zip(sampled, picked, strict=True):
            request.output_ids.append(token)
            request.first_token_at = request.first_token_at or now
            request.last_token_at = now
            self.generated_tokens += 1
            reason = self._stop_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
            outputs.append((request, request.output([token])))
        return outputs

    def _stops(self, request: Request) -> set[int]:
        """The tokens that end ``request``: its stop_token_ids, and the model's end tokens unless ignore_eos."""
        params = request.params
        return set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)

    def _stop_reason(self, request: Request, token: int) -> str | None:
        params, produced = request.params, len(request.output_ids)
        if produced >= params.min_tokens and token in self._stops(request):
            return "stop"
        if produced >= params.max_tokens or request.num_tokens >= self.max_seq_len:
            return "length"
        return None

    def _finish(self, request: Request, reason: str, error: str | None = None) -> RequestOutput:
        self.scheduler.finish(request)
        request.finish_reason, request.error = reason, error
        self.requests.pop(request.request_id, None)
        return request.output([])

    def _pages_against_budget(self, tokens: int) -> tuple[int, int]:
        """(pages a request of ``tokens`` tokens maps, pages the pool's whole budget leaves for requests: less the
        padding slot's, held for the engine's life)."""
        layout = self.kv.layout
        pad = layout.planes if self.runner.pad_slot is not None else 0
        return layout.planes * layout.pages_per_plane(tokens), self.pool.stats().budget_pages - pad

    def _device_was_full(self, times: int) -> None:
        """The pool could not create pages the budget allowed (DeviceFullError): the scheduler treated it as the
        budget's refusal (requests wait, or the newest is preempted). Give torch's cached blocks back to the driver
        (freed activations it keeps) so that pages fit again, and say so, at most every WARN_EVERY_S."""
        self.device_full += times
        now = time.monotonic()
        self._empty_torch_cache(now)
        if now - self._warned_full_at >= WARN_EVERY_S:
            self._warned_full_at = now
            log.warning("model %s: the device had no memory for KV pages the budget allows (%d times so far): requests "
                        "wait or are preempted; a smaller budget (--budget) leaves the room it assumes", self.name,
                        self.device_full)  # fmt: skip

    def _empty_torch_cache(self, now: float) -> None:
        """Give torch's cached blocks (freed activations it keeps) back to the driver; empty_cache may wait for the
        GPU: once a second at most, not each step of a full device."""
        if self.runner.device.type == "cuda" and now - self._emptied_at >= 1.0:
            self._emptied_at = now
            torch.cuda.empty_cache()

    def _short_of_memory(self, why: str) -> bool:
        """The forward ran out of device memory (activations, a library's workspace: other processes may hold the
        rest). Give back what this engine keeps (idle KV pages, the pool's free pages, torch's cached blocks) and
        preempt the newest running request where several run, admitting none in its place until one finishes (a
        smaller next step: Scheduler.hold); the step's requests are stepped again. False once forwards have failed
        so for device_full_wait_s in a row: the step's requests then fail."""
        self.forward_out_of_memory += 1
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since >= self.device_full_wait_s:
            self._short_since = None
            return False
        self.kv.release_idle()
        self.pool.shrink()
        self._empty_torch_cache(now)
        preempted = self.scheduler.hold()
        if now - self._warned_short_at >= WARN_EVERY_S:
            self._warned_short_at = now
            log.warning("model %s: a forward ran out of device memory (%d times so far; %s): %s", self.name,
                        self.forward_out_of_memory, "the newest request preempted, the rest step again" if preempted
                        else "the request steps again", why)  # fmt: skip
        return True

    def _end_stalled(self) -> list[tuple[Request, RequestOutput]]:
        """A request a full device has held up for device_full_wait_s while nothing else ran here (Scheduler's
        ``stalled_since``) ends, else it would wait for ever where the device never has the room the budget assumes:
        with "length" and its tokens so far (as one the whole budget cannot hold, _unfit), or with "error" where it
        has none."""
        now, out = time.monotonic(), []
        for request in list(self.scheduler.running) + list(self.scheduler.waiting)[:1]:
            if request.stalled_since is None or now - request.stalled_since < self.device_full_wait_s:
                continue
            why = (f"the device had no memory for the pages of request {request.request_id} ({request.num_tokens} "
                   f"tokens) for {now - request.stalled_since:.0f} s, though the budget allows them")  # fmt: skip
            log.warning("model %s: %s: it ends", self.name, why)
            kept = bool(request.output_ids)  # tokens to keep: it ends as at its length; else nothing came, an error
            out.append((request, self._finish(request, "length" if kept else "error", None if kept else why)))
        return out

    def _unfit(self) -> list[tuple[Request, RequestOutput]]:
        """Nothing runs and the head of the queue cannot be admitted: if even the whole budget could not hold it
        (a preempted request whose output grew past it) it ends with "length"; else pages are held elsewhere
        (other models) and it waits."""
        request = self.scheduler.waiting[0]
        pages, budget = self._pages_against_budget(request.num_tokens)
        if pages <= budget:
            return []
        return [(request, self._finish(request, "length"))]

    def warm_up(self) -> float:
        """Compile the kernels and capture the decode graphs of every bucket (and with graph_tokens, the graphs
        of every token bucket) now, not in the first requests' steps (a prefill chunk and a decode step through
        one slot of 2 tokens, padded to each bucket). Not while the engine has work. Returns the seconds it
        took."""
        if self.has_work() or self.group is not None or not self.tp.leader:
            raise InvalidRequestError("warm_up() runs on an idle engine that no thread steps (on rank 0)")
        start, runner = time.monotonic(), self.runner
        slot = self.kv.allocate(3)
        try:
            self.kv.grow(slot, 3)
            runner.forward([slot], [0], [2], [0, 0], [1])  # a prefill chunk
            sizes = (
                [b for b in runner.buckets if b <= self.scheduler.max_num_seqs] if runner.pad_slot is not None else []
            )
            for size in sizes:
                runner.decode(size, [slot], [2], [0])
            for size in runner.token_buckets:  # steps that prefill, per token bucket
                runner.mixed(size, [slot], [0], [2], [0, 0], [1])
            # steps that run eagerly (above the buckets, up to max_num_batched_tokens): each variant of the extend
            # kernel they can launch compiles now (tiles by the longest sequence; token counts of 16k and not). The
            # plan's fields are 16-byte aligned whatever the step (attention._field_starts): no variant per step
            cfg, fewest = self.kv.config, runner.token_buckets[-1] + 1 if runner.token_buckets else 2
            for step in extend_variants(cfg.head_dim, runner.device, self.max_seq_len, fewest,
                                        self.scheduler.max_num_batched_tokens, cfg.dtype):  # fmt: skip
                self._warm_up_step(slot, step)
            if not sizes:
                runner.forward([slot], [2], [1], [0], [0])
        finally:
            self.kv.free(slot)
        return time.monotonic() - start

    def _warm_up_step(self, slot: int, step: list[tuple[int, int]]) -> None:
        """Run one eager step of requests with these (prefix, new) token counts, ``slot`` the first one's, the
        others' slots taken for it and given back; skipped if the budget or the slots cannot hold it (then no
        step is like it)."""
        slots = [slot]
        try:
            try:
                for cached, new in step[1:]:
                    if not self.kv.can_allocate():
                        return
                    slots.append(self.kv.allocate(cached + new))
                for s, (cached, new) in zip(slots, step, strict=True):
                    self.kv.grow(s, cached + new)
            except (OutOfPagesError, LedgerBusyError):  # not in the budget, or another process holds the ledger
                return
            tokens = sum(new for _, new in step)
            self.runner.forward(slots, [c for c, _ in step], [n for _, n in step], [0] * tokens, [tokens - 1])
        finally:
            for s in slots[1:]:
                self.kv.free(s)

    # ------------------------------------------------------------------------------------------ running
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion (offline); the final output of each, in order, with all its token ids
        in ``new_token_ids``; ``on_output`` hears every request's outputs as they come (streaming), all of them
        before this returns. Not while ``start()``'s thread runs."""
        if self.group is not None:
            raise InvalidRequestError("generate() steps the engine itself: stop() the thread that runs it first")
        many = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(many) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(many)} SamplingParams")
        requests = [self.add_request(p, s, on_output=on_output) for p, s in zip(prompts, many, strict=True)]
        while any(r.status is not Status.FINISHED for r in requests):
            if not self.step() and not self.scheduler.running:
                time.sleep(0.001)  # waiting for pages held elsewhere
        self.deliver_held()
        return [r.output(list(r.output_ids)) for r in requests]

    def start(self) -> None:
        """Run steps on a thread while there is work (the server's way): an EngineGroup of this engine alone."""
        if self.group is None:
            EngineGroup([self]).start()

    def stop(self) -> None:
        if self.group is not None:
            self.group.stop()

    def idle_tick(self, now: float) -> None:
        """Called by the group's loop when this engine has no work: after idle_release_s, trim the cache."""
        self._idle_since = self._idle_since or now
        idle = self.idle_release_s is not None and now - self._idle_since >= self.idle_release_s
        if idle and self.kv.stats().idle_pages:
            self.kv.trim()
            self.trims += 1
            if self.channel is not None:
                self.channel.flush(self.runner.index)  # the other ranks trim too

    def stats(self) -> dict[str, Any]:
        """The numbers /metrics shows for this model."""
        kv = self.kv.stats()
        held = sum(r.computed for r in self.scheduler.running)
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + len(self._new),
            "kv_mapped_bytes": kv.mapped_bytes,
            "kv_in_use_bytes": held * self.kv.config.token_bytes,
            "kv_idle_pages": kv.idle_pages,
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "computed_tokens": self.computed_tokens,
            "preemptions": self.scheduler.preemptions,
            "device_full": self.device_full,
            "forward_out_of_memory": self.forward_out_of_memory,
            # the most torch's caching allocator held in this process (weights, activations, graph pools; not the KV
            # pages, which vkv maps itself): what a process needs beside its KV
            "torch_peak_reserved_bytes": (
                torch.cuda.max_memory_reserved(self.kv.device) if self.kv.device.type == "cuda" else 0
            ),
            **self.clock.stats(),  # summed over the steps: the stepping thread's wall and CPU, the forward's GPU span
        }

    def close(self) -> None:
        """Stop, finish every request with "abort", give the cache (and an own pool) back."""
        self.stop()
        self.deliver_held()
        with self._lock:
            pending, self._new = self._new, []
        for request in pending + list(self.requests.values()):
            request.aborted = True
            output = self._finish(request, "abort")
            if request.on_output is not None:
                request.on_output(output)
        if self._closed:
            return
        self._closed = True
        if self.channel is not None and self.tp.leader:
            try:  # best effort: a follower that already left (Ctrl-C reached it, say) must not keep this cache open
                self.channel.send(self.runner.index, STOP)
            except Exception as exc:  # noqa: BLE001 - reported; closing goes on
                print(f"vkv: could not tell the other ranks that {self.name} stopped: {exc}", file=sys.stderr)
        self.runner.uncompile()
        self.kv.close()
        if self._own_pool is not None:
            self._own_pool.close()

    def follow(self) -> None:
        """On a rank other than 0: run rank 0's steps of this process's engines (built like rank 0's, in the same
        order) until rank 0 closes them all."""
        if self.channel is None or self.tp.leader:
            raise InvalidRequestError("follow() runs on a tensor-parallel rank other than 0")
        self.channel.follow()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _eos_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return {int(t) for t in ids}


def encode_prompt(prompt: str | Sequence[int], tokenizer: Any, vocab_size: int, name: str) -> list[int]:
    """A prompt's token ids for model ``name``: text through ``tokenizer``, ids checked against the vocabulary."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError(f"model {name!r} has no tokenizer: give the prompt as token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) or (isinstance(prompt, torch.Tensor) and prompt.dim() == 1):
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        bad = next((t for t in ids if not is_int(t) or not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad!r} is not in the vocabulary [0, {vocab_size})")
    else:
        raise InvalidRequestError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise InvalidRequestError("the prompt is empty: it needs at least one token")
    return ids


class EngineGroup:
    """Engines stepped in turn by one thread: several models in one process, on one GPU (or one interpreter)
    stream of work. Each engine with work runs a step per turn; an engine without any ticks towards its idle
    release."""

    def __init__(self, engines: Sequence[Engine]):
        if not engines or not all(isinstance(e, Engine) for e in engines):
            raise InvalidRequestError("an EngineGroup takes a non-empty list of Engines")
        if len({e.name for e in engines}) != len(engines):
            raise InvalidRequestError(f"the engines' names must differ, got {[e.name for e in engines]}")
        self.engines = list(engines)
        self.wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None  # the last failure the loop caught (/health reports it)

    def start(self) -> None:
        busy = [e.name for e in self.engines if e.group is not None and e.group is not self]
        if busy:
            raise InvalidRequestError(f"engines {busy} are run by another group already: stop it first")
        if self._thread is not None:
            return
        for engine in self.engines:
            engine.group = self
        self._stop = False
        self._thread = Thread(target=self._loop, name="vkv-engines", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop = True
            self.wake.set()
            thread.join()
        for engine in self.engines:
            engine.group = None
            engine.deliver_held()

    def budgets(self) -> dict[str, int]:
        """{budget: bytes it counts now} over the engines' pools (/metrics): a pool that counts in a ledger reads the
        ledger's total (labelled by its path, the same in every process that shares it); a pool of its own reads its
        live pages under its lock. Each value is one consistent snapshot, so the sum over labels never double-counts
        nor tears; a ledger busy now is left out (the next reading tries again)."""
        held: dict[str, int] = {}
        for pool in {id(e.pool): e.pool for e in self.engines}.values():
            if pool.ledger is not None:
                with contextlib.suppress(LedgerBusyError):
                    stats = pool.ledger.stats()
                    held[f"ledger:{stats.path}"] = stats.pages_mapped * stats.page_size
            else:
                stats = pool.stats()
                held[f"pool:{os.getpid()}:{id(pool):x}"] = stats.live * stats.page_size
        return held

    def _loop(self) -> None:
        while not self._stop:
            worked = False
            for engine in self.engines:
                try:
                    if engine.has_work():
                        engine._idle_since = None
                        worked |= bool(engine.step()) or engine.last_ran  # waiting for pages is not work
                    else:
                        engine.idle_tick(time.monotonic())
                except Exception as exc:  # noqa: BLE001 - the engine's requests fail; the others go on
                    self.error = exc
                    engine.deliver_held()
                    engine._deliver(engine.fail_all(f"the engine failed: {type(exc).__name__}: {exc}"))
            if not worked:
                for engine in self.engines:
                    engine.deliver_held()
                self.wake.wait(0.05)
                self.wake.clear()
