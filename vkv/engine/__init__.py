# SPDX-License-Identifier: Apache-2.0
"""vkv's serving engine: continuous batching over an elastic KV cache (needs transformers: ``vkv[hf]``)."""

from .engine import Engine as Engine
from .engine import EngineGroup as EngineGroup
from .model import load_model as load_model
from .params import SamplingParams as SamplingParams
from .request import RequestOutput as RequestOutput
