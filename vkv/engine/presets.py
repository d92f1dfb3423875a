# SPDX-License-Identifier: Apache-2.0
"""Random-weight models by name (``random:NAME``), for demos, tests and benchmarks without a download.

    tiny-llama, tiny-qwen3   2 layers, 128-word vocabulary; run anywhere (the CPU too), with a word tokenizer
    llama-3-8b               Llama-3-8B's shape (32 layers, 32/8 heads of 128, 14336 MLP, 128256 tokens); a GPU
    qwen3-8b                 Qwen3-8B's shape (36 layers, 32/8 heads of 128, 12288 MLP, 151936 tokens); a GPU
    llama-3-70b              Llama-3-70B's shape (80 layers, 64/8 heads of 128, 8192 wide, 28672 MLP): 141 GB in
                             bf16, so several GPUs (bench/tp.py draws each rank's share: random_rank_share)

The tiny ones come with a word-level tokenizer (words "w0".."w119", a few roles and marks, a chat template), so
the text endpoints work; the 8B shapes take token ids. No preset has an end-of-sequence token: generation
runs to max_tokens.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, PretrainedConfig, Qwen3Config

from vkv.allocator import InvalidRequestError

SPECIAL = ["<unk>", "system", "user", "assistant", ":", "\n", ".", ","]
TINY_VOCAB = 128
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _tiny(cls) -> PretrainedConfig:
    return cls(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )  # fmt: skip


def _full_size(cls, layers: int, mlp: int, vocab: int, hidden: int = 4096, heads: int = 32) -> PretrainedConfig:
    return cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip


PRESETS = {
    "tiny-llama": lambda: _tiny(LlamaConfig),
    "tiny-qwen3": lambda: _tiny(Qwen3Config),
    "llama-3-8b": lambda: _full_size(LlamaConfig, 32, 14336, 128256),
    "qwen3-8b": lambda: _full_size(Qwen3Config, 36, 12288, 151936),
    "llama-3-70b": lambda: _full_size(LlamaConfig, 80, 28672, 128256, hidden=8192, heads=64),
}


def preset(name: str) -> PretrainedConfig:
    if name not in PRESETS:
        raise InvalidRequestError(f"no preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def word_tokenizer(vocab_size: int = TINY_VOCAB) -> Any:
    """A word-level tokenizer of ``vocab_size`` ids (the marks and roles above, then "w0", "w1", ...): text is
    words separated by spaces; an unknown word is <unk>. It has the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
