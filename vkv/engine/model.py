# SPDX-License-Identifier: Apache-2.0
"""The model side of the engine: loading a decoder-only transformers model, and one packed forward over a step.

A step's tokens (decode tokens and prefill chunks of several requests) run as ONE sequence of T tokens,
``input_ids`` [1, T] with each token's own position: the model's token-wise layers (embeddings, norms, MLPs,
rotary) do not care which request a token belongs to, and attention is vkv's, which does (the plan). The model
runs with attn_implementation "vkv" (vkv.integrations.hf); its cache argument is an EngineCache, whose
``update`` stores each layer's new K/V in the requests' slots and whose step the attention reads them through.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache

from vkv.allocator import InvalidRequestError
from vkv.attention import AttentionWrapper
from vkv.integrations import hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class PackedStep:
    """A step as vkv's attention function sees it: the plan's tokens, attended layer by layer."""

    def __init__(self, wrapper: AttentionWrapper):
        self.wrapper = wrapper

    def vkv_attend(self, layer: int, query: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """query [1, heads, T, head_dim] -> [1, T, heads, head_dim], over the K/V stored for ``layer``."""
        return self.wrapper.attend(layer, query[0].transpose(0, 1), sm_scale=sm_scale).unsqueeze(0)


class EngineCache(Cache):
    """The cache argument of the engine's forward: K/V go to the slots of the wrapper's current plan."""

    def __init__(self, wrapper: AttentionWrapper):
        super().__init__(layers=[])
        self.wrapper, self.step = wrapper, PackedStep(wrapper)
        self.num_layers = wrapper.cache.config.num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.wrapper.store(layer_idx, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
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
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) with attn_implementation "vkv", in eval mode, on ``device``.

    ``source``: a local directory (config.json, *.safetensors weights, tokenizer files if any; with
    ``random_weights`` only its config is read), a transformers config (random weights, seeded by ``seed``), or a
    model already built. dtype: default bfloat16 on a GPU, float32 on the CPU; device: default cuda if there is
    one. Nothing is downloaded."""
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
                model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.NAME, dtype=dtype)
                return model.to(device).eval(), tokenizer
            config = AutoConfig.from_pretrained(path)
        config = copy.deepcopy(config)  # from_config sets the attention implementation on the config it gets
        torch.manual_seed(seed)
        with device:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=hf.NAME, dtype=dtype)
    model.set_attn_implementation(hf.NAME)
    return model.to(device).eval(), tokenizer


class ModelRunner:
    """Runs a step's packed tokens through the model and returns the logits of the rows to sample."""

    def __init__(self, model: torch.nn.Module, wrapper: AttentionWrapper):
        self.model, self.wrapper = model, wrapper
        self.device = wrapper.cache.device
        self.cache = EngineCache(wrapper)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed within transformers 5.x

    @torch.no_grad()
    def forward(
        self, slots: list[int], cached: list[int], new: list[int], token_ids: list[int], sample_rows: list[int]
    ) -> torch.Tensor:
        """Request i adds ``new[i]`` tokens after its ``cached[i]`` in slot ``slots[i]``; ``token_ids`` are all
        the step's tokens, request-major. Returns float32 logits [len(sample_rows), vocab] of those token rows."""
        self.wrapper.plan(slots, cached, new)
        positions = [p for c, n in zip(cached, new, strict=True) for p in range(c, c + n)]
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        keep = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        kwargs = {self.cache_arg: self.cache}
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=keep, **kwargs)
        return out.logits[0].float()
