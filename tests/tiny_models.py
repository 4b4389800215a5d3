"""Random-weight tiny models of each supported architecture, built from a config (no downloads)."""

from __future__ import annotations

import torch
import transformers

from streambench.models.architecture import FAMILIES

# Every tested family (streambench/models/architecture.py), the exactness matrix's rows.
ARCHITECTURES = tuple(FAMILIES)

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str = "llama", layers: int = 2, vocab: int = 96, **overrides):
    """The family's tiny config: common sizes, then the family's own settings (None drops a key)."""
    family = FAMILIES[arch]
    kwargs = {**_COMMON, "vocab_size": vocab, "num_hidden_layers": layers, **family.tiny}
    if family.pattern:
        kwargs["layer_types"] = [family.pattern[i % len(family.pattern)] for i in range(layers)]
    kwargs.update(overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("sliding_window",)}
    config = transformers.AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = family.attn
    return config


def tiny_model(arch: str = "llama", layers: int = 2, dtype=torch.float32, seed: int = 0, vocab: int = 96, **overrides):
    config = tiny_config(arch, layers, vocab, **overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a test model.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHATML):
    """A byte-level tokenizer (one token per byte, ids 0-255) with ChatML's two special tokens
    (256, 257), so tiny models can hold conversations. No downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=lambda ch: _byte_of(ch)))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.eos_token = "<|im_end|>"
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
