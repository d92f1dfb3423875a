# SPDX-License-Identifier: Apache-2.0
"""A tensor-parallel rank's share of a checkpoint, read from its safetensors files without building the whole model
(or, for benchmarks, drawn at random: :func:`random_rank_share`).

The model is built with its parameters on the meta device (no memory, no initialization; buffers such as the rotary
frequencies are computed as usual), sharded there (vkv.parallel.shard_model records each split linear's slice),
then each parameter is read from the checkpoint: a split one as its slice only (safetensors reads slices of the
mapped file), straight to this rank's device. A rank so never holds more than its share plus the replicated
embeddings, norms and LM head: a model larger than one GPU loads over several.

    model = load_rank_share("/models/llama-70b", TensorParallel(rank, 4), dtype=torch.bfloat16, device="cuda:1")
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

from vkv.allocator import InvalidRequestError
from vkv.integrations import hf
from vkv.parallel import TensorParallel, shard_model

# keys some checkpoints carry that are no parameters of the model (the rotary frequencies are computed, not loaded)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


_META_LOCK = threading.Lock()  # one build on the meta device at a time: the hook below is process-wide


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules this thread builds inside get their parameters on the meta device and their buffers as usual (other
    threads' modules are left alone; two such builds take turns)."""
    with _META_LOCK:
        register, owner = torch.nn.Module.register_parameter, threading.get_ident()

        def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
            if param is not None and param.device.type != "meta" and threading.get_ident() == owner:
                param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            register(module, name, param)

        torch.nn.Module.register_parameter = on_meta
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register


def load_rank_share(
    path: str | Path, tp: TensorParallel, *, dtype: torch.dtype, device: torch.device | str
) -> torch.nn.Module:
    """This rank's share of the model in ``path`` (config.json, *.safetensors), with attn_implementation "vkv", in
    eval mode on ``device``. An error names the first key the checkpoint lacks, has in excess or has misshapen."""
    from safetensors import safe_open

    path, device = Path(path), torch.device(device)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidRequestError(f"{path}: no *.safetensors weights (random_weights=True builds them)")
    hf.register()
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(path), attn_implementation=hf.NAME, dtype=dtype
        )
    shard_model(model, tp)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names share one parameter
    loaded: dict[int, torch.nn.Parameter] = {}  # id of the meta parameter -> the one loaded in its place
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                if key not in params:
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    raise InvalidRequestError(f"{file.name}: {key} is no parameter of {type(model).__name__}")
                meta = params[key]
                value = _read_share(f, key, model, meta.shape, tp, file.name)
                loaded[id(meta)] = torch.nn.Parameter(value.to(device=device, dtype=meta.dtype), requires_grad=False)
    for key, meta in params.items():
        if id(meta) not in loaded:
            raise InvalidRequestError(f"{path}: the checkpoint has no {key} (looked in {len(files)} safetensors files)")
        _put(model, key, loaded[id(meta)])
    if (path / "generation_config.json").is_file():  # its end tokens (from_config does not read it)
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()  # the buffers


def random_rank_share(
    config: PretrainedConfig, tp: TensorParallel, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> torch.nn.Module:
    """This rank's share of a model of ``config`` with random weights, built without the whole model: on the meta
    device, sharded there, then each parameter drawn straight on ``device`` (matrices normal with the config's
    initializer_range, 1-D weights (norms) 1, biases 0), seeded by ``seed``: the split weights by the rank too, the
    replicated ones (embeddings, LM head) alike on every rank. For benchmarks of models larger than one GPU (a
    70B-shaped one over two): the split weights are draws of their own, so the ranks together are not the model
    one rank draws from the same seed (vkv.engine.load_model builds that one whole, then shards it).
    An Engine of this rank takes the share as it is."""
    hf.register()
    device = torch.device(device)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=hf.NAME, dtype=dtype)
    shard_model(model, tp)
    std = getattr(config.get_text_config(decoder=True), "initializer_range", 0.02)
    # the split parameters drawn by rank, the replicated ones (embeddings, norms, LM head, a row-parallel bias) alike
    # on every rank, as a real model's are
    split, whole = (torch.Generator(device).manual_seed(seed * 65_537 + r) for r in (1 + tp.rank, 0))
    made: dict[int, torch.nn.Parameter] = {}  # id of the meta parameter -> the one drawn in its place
    for key, meta in list(model.named_parameters(remove_duplicate=False)):
        if id(meta) not in made:
            module, _, name = key.rpartition(".")
            dim = getattr(model.get_submodule(module), "vkv_shard", (None,))[0]
            value = torch.empty(meta.shape, dtype=dtype, device=device)
            if meta.dim() > 1:
                value.normal_(0.0, std, generator=split if dim is not None and name == "weight" else whole)
            else:
                value.fill_(1.0 if key.endswith("weight") else 0.0)
            made[id(meta)] = torch.nn.Parameter(value, requires_grad=False)
        _put(model, key, made[id(meta)])
    return model.to(device).eval()  # the buffers


def _put(model: torch.nn.Module, key: str, param: torch.nn.Parameter) -> None:
    """Set the parameter named ``key`` (tied names get the same object)."""
    module, _, name = key.rpartition(".")
    model.get_submodule(module)._parameters[name] = param


def _read_share(f, key: str, model: torch.nn.Module, shape: torch.Size, tp: TensorParallel, file: str) -> torch.Tensor:
    """The checkpoint's tensor ``key``, or this rank's slice of it where its linear layer is split."""
    module, _, name = key.rpartition(".")
    dim, start, count = getattr(model.get_submodule(module), "vkv_shard", (None, 0, 0))
    if dim == 1 and name == "bias":  # a row-parallel layer's bias is whole on every rank
        dim = None
    full = f.get_slice(key)
    got, want = list(full.get_shape()), list(shape)
    if dim is not None:
        want[dim] = count * tp.world
    if got != want:
        raise InvalidRequestError(f"{file}: {key} has shape {got}; this model expects {want}")
    if dim is None:
        return full[:]
    return full[start : start + count] if dim == 0 else full[:, start : start + count]
