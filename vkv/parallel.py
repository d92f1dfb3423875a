# SPDX-License-Identifier: Apache-2.0
"""Tensor parallelism over the GPUs of one host (or CPU processes): each rank holds its share of the KV heads.

Megatron-LM's split of a transformer layer (https://arxiv.org/abs/1909.08053), on the HF Llama/Qwen3 modules the
engine runs: q/k/v and gate/up projections are split by output features (whole heads; column-parallel), o and down
projections by input features (row-parallel: partial sums, then one all-reduce each). Rank r holds query heads
[r*H/tp, (r+1)*H/tp) and KV heads [r*K/tp, (r+1)*K/tp), which GQA pairs with each other exactly, so attention and
the KV cache need nothing from other ranks: the cache of a rank is the model's cache with num_kv_heads K/tp.
Embeddings, norms and the LM head are replicated.

    tp = init_tensor_parallel(rank, world, init_method="tcp://127.0.0.1:29500")   # gloo on CPU, NCCL on GPUs
    shard_model(model, tp)                                        # in place
    config = shard_cache_config(config, tp)                       # CacheConfig for this rank's KV heads
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vkv.allocator import InvalidRequestError
from vkv.allocator.checks import check_count, check_positive
from vkv.layout import CacheConfig


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: ``rank`` of ``world``, collectives over ``group`` (None:
    torch.distributed's default group, initialized by :func:`init_tensor_parallel` before the first collective)."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def __post_init__(self):
        world = check_positive("world", self.world, hi=1 << 16)
        rank = check_count("rank", self.rank)
        if rank >= world:
            raise InvalidRequestError(f"rank {rank} is out of range: expected 0 to {world - 1} for a world of {world}")

    @property
    def leader(self) -> bool:
        """Rank 0: it schedules, decides growth, samples and serves; the others follow its step plans."""
        return self.rank == 0

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, count) of this rank's share of ``total`` ``what``; an error unless the world divides it."""
        if total % self.world:
            raise InvalidRequestError(
                f"{what} = {total} cannot be split over a tensor-parallel world of {self.world}: expected a "
                f"multiple of {self.world} (a world that divides {total})"
            )
        share = total // self.world
        return self.rank * share, share


SINGLE = TensorParallel()


def init_tensor_parallel(
    rank: int, world: int, *, init_method: str, backend: str | None = None, device: torch.device | None = None
) -> TensorParallel:
    """Join the group: torch.distributed over ``init_method`` (``tcp://host:port`` or ``file://path``), backend
    NCCL where ``device`` is a GPU (made current here), else gloo. Returns this rank's TensorParallel."""
    tp = TensorParallel(rank, world)  # checks rank and world before anything joins
    device = torch.device(device) if device is not None else torch.device("cpu")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (NVLS): these hosts must not use it
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kwargs)
    return tp


def shard_heads(num_q_heads: int, num_kv_heads: int, tp: TensorParallel) -> tuple[int, int]:
    """(query heads, KV heads) of this rank; an error unless the world divides both."""
    kv = tp.split(num_kv_heads, "num_kv_heads")[1]
    q = tp.split(num_q_heads, "num_attention_heads (query heads)")[1]
    return q, kv


def shard_cache_config(config: CacheConfig, tp: TensorParallel) -> CacheConfig:
    """``config`` for this rank's share of the KV heads."""
    return dataclasses.replace(config, num_kv_heads=tp.split(config.num_kv_heads, "num_kv_heads")[1])


class RowParallelLinear(torch.nn.Linear):
    """A linear layer whose input features are split over the ranks: each computes a partial product, an all-reduce
    sums them, the bias (held by every rank) is added once after it."""

    def __init__(self, full: torch.nn.Linear, tp: TensorParallel):
        start, count = tp.split(full.in_features, "in_features")
        weight = full.weight.detach()
        super().__init__(count, full.out_features, bias=full.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight[:, start : start + count])
            if full.bias is not None:
                self.bias.copy_(full.bias.detach())
        self.tp = tp
        self.vkv_shard = (1, start, count)  # (split dimension, start, count) of the weight: vkv.engine.weights reads it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.tp.world > 1:
            dist.all_reduce(out, group=self.tp.group)
        return out if self.bias is None else out + self.bias


def _column(linear: torch.nn.Linear, tp: TensorParallel, what: str) -> None:
    """Keep this rank's share of ``linear``'s output features (and bias), in place."""
    start, count = tp.split(linear.out_features, what)
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(linear.weight[start : start + count].clone(), requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias[start : start + count].clone(), requires_grad=False)
    linear.out_features = count
    linear.vkv_shard = (0, start, count)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a HF causal LM (``model.model.layers``), each with ``self_attn`` and ``mlp``."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    if layers is None or not all(
        all(isinstance(getattr(layer.self_attn, p, None), torch.nn.Linear) for p in projections)
        and all(isinstance(getattr(layer.mlp, p, None), torch.nn.Linear) for p in ("gate_proj", "up_proj", "down_proj"))
        for layer in layers
    ):
        raise InvalidRequestError(
            f"{type(model).__name__}: tensor parallelism shards Llama-style layers (model.model.layers[i].self_attn "
            "q/k/v/o_proj and .mlp gate/up/down_proj, all nn.Linear); this model has another shape"
        )
    return list(layers)


def sharded_for(model: torch.nn.Module) -> TensorParallel | None:
    """The rank :func:`shard_model` sharded ``model`` for, or None where it is whole (or no Llama-style model)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    o_proj = getattr(getattr(layers[0], "self_attn", None), "o_proj", None) if layers else None
    return o_proj.tp if isinstance(o_proj, RowParallelLinear) else None


def shard_model(model: torch.nn.Module, tp: TensorParallel) -> torch.nn.Module:
    """Replace ``model``'s attention and MLP weights by this rank's shares, in place (a no-op for one rank).
    Checks every layer before changing any: heads, KV heads and the MLP width must divide by the world."""
    if tp.world == 1:
        return model
    layers = decoder_layers(model)
    if any(isinstance(layer.self_attn.o_proj, RowParallelLinear) for layer in layers):
        raise InvalidRequestError("this model is sharded already (one model object per engine: load it again)")
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    shard_heads(heads, kv_heads, tp)
    for layer in layers:
        tp.split(layer.mlp.gate_proj.out_features, "intermediate_size")
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            _column(getattr(attn, name), tp, f"{name} features")
        attn.o_proj = RowParallelLinear(attn.o_proj, tp)
        _column(mlp.gate_proj, tp, "intermediate_size")
        _column(mlp.up_proj, tp, "intermediate_size")
        mlp.down_proj = RowParallelLinear(mlp.down_proj, tp)
    return model


def agree_min(value: int, tp: TensorParallel, device: torch.device | None = None) -> int:
    """The least of every rank's ``value`` (one all-reduce): a budget every device can hold, say."""
    if tp.world == 1:
        return value
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MIN, group=tp.group)
    return int(box.item())


def local_init_method() -> str:
    """A ``tcp://127.0.0.1:PORT`` rendezvous on a port free now, for the ranks of one host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def pool_device_index(backend: str, index: int | None, tp: TensorParallel) -> int | None:
    """The device index of a rank's pool: ``index`` (its GPU) on cuda; on the host backend, which has no devices of
    its own, the rank when there are several (each rank's pool and ledger apart), else ``index``."""
    return tp.rank if backend == "host" and tp.world > 1 else index


def rank_device(rank: int, device_type: str) -> torch.device:
    """Rank r's device: cuda:r on GPUs (one GPU a rank), the CPU otherwise (its host pool is device r's)."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def _rank_main(rank: int, world: int, init_method: str, device_type: str, target: Callable, args: tuple) -> None:
    if rank > 0:  # Ctrl-C at the terminal reaches every rank: rank 0 alone stops the group (its STOP plans)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tp = init_tensor_parallel(rank, world, init_method=init_method, device=rank_device(rank, device_type))
    try:
        target(tp, *args)
    finally:
        dist.destroy_process_group()


def start_ranks(
    world: int,
    target: Callable,
    args: tuple = (),
    *,
    ranks: Sequence[int] | None = None,
    init_method: str,
    device_type: str = "cpu",
) -> list[mp.process.BaseProcess]:
    """Start ``ranks`` (default all of ``world``) as spawned processes, each running ``target(tp, *args)`` in its
    group (``target`` importable: a module-level function). Returns the processes; :func:`join_ranks` waits."""
    context = mp.get_context("spawn")
    processes = []
    for rank in range(world) if ranks is None else ranks:
        process = context.Process(
            target=_rank_main, args=(rank, world, init_method, device_type, target, args), name=f"vkv-rank-{rank}",
            daemon=True,
        )  # fmt: skip
        process.start()
        processes.append(process)
    return processes


def join_ranks(processes: Sequence[mp.process.BaseProcess], timeout_s: float) -> list[int | None]:
    """Wait up to ``timeout_s`` for every process; kill those still running. Returns their exit codes."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]
