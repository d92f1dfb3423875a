# SPDX-License-Identifier: Apache-2.0
"""A tensor-parallel rank's share of a checkpoint, read from its safetensors files without building the whole model.

The model is built with its parameters on the meta device (no memory, no initialization; buffers such as the rotary
frequencies are computed as usual), sharded there (vkv.parallel.shard_model records each split linear's slice),
then each parameter is read from the checkpoint: a split one as its slice only (safetensors reads slices of the
mapped file), straight to this rank's device. A rank so never holds more than its share plus the replicated
embeddings, norms and LM head: a model larger than one GPU loads over several.

    model = load_rank_share("/models/llama-70b", TensorParallel(rank, 4), dtype=torch.bfloat16, device="cuda:1")
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

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
        module, _, name = key.rpartition(".")
        model.get_submodule(module)._parameters[name] = loaded[id(meta)]  # tied names: the same parameter
    if (path / "generation_config.json").is_file():  # its end tokens (from_config does not read it)
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device).eval()  # the buffers


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
