"""Where a decoder keeps its layers, attention and rotary embedding, and which families are tested.

The engine needs four things of a model: its decoder layers in order, each layer's attention
module (for query taps and attention routing), the module computing RoPE's cos/sin tables, and
how the attention applies them (rotate-half, interleaved pairs, on the first `rotary_dim` channels
only). `Layout` finds them by structure, not by model type: `model.base_model` holds a
`ModuleList` with one entry per hidden layer, each with an attention child, and a `rotary_emb`.
The rotation itself is checked numerically against the model's own `apply_rotary_pos_emb` at load.

A family is supported when a tiny random-weight config of it passes the exactness matrix
(tests/engine/test_exactness.py): `FAMILIES` holds those configs, and `register_family` lets a plugin add
one (with its own test). Models the engine cannot re-index are refused with the reason: ALiBi and
learned absolute positions (the cache moves tokens between slots), linear-attention and recurrent
layers (a running state, nothing to evict), multi-head latent attention (keys rebuilt from a latent
with a decoupled RoPE part), chunked attention, layers without RoPE.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from streambench.errors import UnsupportedModelError

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Family:
    """A model family the engine is tested on: its model type, what its attention needs from the
    engine, and the tiny config (on top of tests' common sizes) that the exactness matrix runs."""

    model_type: str
    example: str  # a real checkpoint of the family, for `streambench list models`
    needs: tuple[str, ...] = ()
    tiny: dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"  # the attention implementation its tiny model is built with
    pattern: tuple[str, ...] = ()  # hybrid families: layer i of the tiny model is pattern[i % len]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.model_type] = family
    return family


for _family in (
    Family("llama", "meta-llama/Llama-2-7b-hf, SmolLM2 (the embedded model)"),
    Family("mistral", "mistralai/Mistral-7B-v0.3", tiny={"sliding_window": None}),
    Family("qwen2", "Qwen/Qwen2.5-0.5B-Instruct", tiny={"use_sliding_window": False}),
    Family("qwen3", "Qwen/Qwen3-0.6B", ("qk-norm",), {"use_sliding_window": False, "head_dim": 16}),
    Family("gemma", "google/gemma-2b", tiny={"head_dim": 16}),
    Family("phi3", "microsoft/Phi-3-mini-4k-instruct", ("fused qkv", "partial rotary"), {"partial_rotary_factor": 0.5}),
    Family(
        "gpt_neox",
        "EleutherAI/pythia-1.4b",
        ("fused qkv", "partial rotary", "no GQA"),
        {"partial_rotary_factor": 0.25, "num_key_value_heads": None, "use_parallel_residual": True},
    ),
    Family(
        "falcon",
        "tiiuae/falcon-7b",
        ("fused qkv", "multi-query", "own attention code"),
        {
            "new_decoder_architecture": False,
            "multi_query": True,
            "parallel_attn": True,
            "bias": False,
            "alibi": False,
            "num_key_value_heads": None,
        },
    ),
    Family(
        "phi",
        "microsoft/phi-2",
        ("partial rotary", "no GQA"),
        {"partial_rotary_factor": 0.5, "num_key_value_heads": None},
    ),
    Family("olmo", "allenai/OLMo-1B-hf", ("no GQA",), {"num_key_value_heads": None}),
    Family("olmo2", "allenai/OLMo-2-0425-1B", ("qk-norm over all heads",)),
    Family("granite", "ibm-granite/granite-3.3-2b-instruct", ("attention multiplier",), {"attention_multiplier": 0.3}),
    Family("stablelm", "stabilityai/stablelm-2-1_6b", ("partial rotary",), {"partial_rotary_factor": 0.25}),
    Family("starcoder2", "bigcode/starcoder2-3b", tiny={"sliding_window": None}),
    Family("cohere", "CohereLabs/c4ai-command-r-v01", ("interleaved rotary", "parallel block")),
    Family(
        "glm",
        "THUDM/glm-4-9b-hf",
        ("interleaved rotary", "partial rotary"),
        {"head_dim": 16, "partial_rotary_factor": 0.5},
    ),
    Family(
        "mixtral",
        "mistralai/Mixtral-8x7B-v0.1",
        ("MoE",),
        {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
    Family(
        "qwen2_moe",
        "Qwen/Qwen1.5-MoE-A2.7B",
        ("MoE", "shared expert"),
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "use_sliding_window": False,
        },
    ),
    Family(
        "qwen3_moe",
        "Qwen/Qwen3-30B-A3B",
        ("MoE", "qk-norm"),
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "head_dim": 16,
            "use_sliding_window": False,
        },
    ),
    # Hybrid: sliding-window layers keep the model's own window, the policy governs the full ones.
    Family(
        "gemma2",
        "google/gemma-2-2b-it",
        ("hybrid sliding", "softcapping", "eager attention"),
        {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 16},
        attn="eager",
        pattern=(FULL, SLIDING),
    ),
    Family(
        "gemma3_text",
        "google/gemma-3-270m (pip install 'streambench[gemma3]')",
        ("hybrid sliding", "local and global RoPE", "qk-norm"),
        {"head_dim": 16, "sliding_window": 5, "query_pre_attn_scalar": 16},
        pattern=(FULL, SLIDING),
    ),
    Family(
        "olmo3",
        "allenai/Olmo-3-7B-Instruct",
        ("hybrid sliding", "qk-norm over all heads"),
        {"sliding_window": 5},
        pattern=(FULL, SLIDING),
    ),
):
    register_family(_family)


# What the engine refuses, and why (the reasons `Layout.check` gives; `streambench list models`).
REFUSED = (
    (
        "ALiBi",
        "mpt, bloom, falcon with alibi",
        "position bias over cache slot order; the cache keeps tokens in any slot order",
    ),
    ("learned absolute positions", "gpt2, opt, gpt_bigcode", "every layer's keys depend on absolute positions"),
    (
        "linear attention / recurrent",
        "qwen3_next, jamba, mamba, falcon_h1, bamba",
        "a running state summarises every token: nothing to evict",
    ),
    (
        "multi-head latent attention",
        "deepseek_v2, deepseek_v3",
        "keys rebuilt from a latent with a decoupled RoPE part",
    ),
    (
        "layers without RoPE",
        "smollm3 (no_rope_layers), cohere2, exaone4 (NoPE global layers)",
        "per-layer NoPE keys are not re-indexed yet",
    ),
    ("chunked attention", "llama4", "attention kinds other than full and sliding"),
    ("dynamic RoPE scaling", "any, rope_type: dynamic", "the rotation depends on the sequence length"),
)


# Model types whose keys carry learned absolute positions (no rotary module): refused from the
# config alone, before any weight loads; Layout.check finds any other such model by structure.
_LEARNED_POSITIONS = ("gpt2", "opt", "gpt_bigcode", "biogpt", "xglm")


def config_kinds(config) -> set[str]:
    """The attention kinds a config declares (layer_types, or one kind from sliding_window)."""
    kinds = list(getattr(config, "layer_types", None) or [])
    if not kinds:
        window = getattr(config, "sliding_window", None)
        kinds = [SLIDING if window is not None and getattr(config, "use_sliding_window", True) else FULL]
    return set(kinds)


def check_config(config, kinds: set[str] | None = None, model_type: str | None = None) -> None:
    """Refuse, with the reason, what a model's config alone shows the engine cannot re-index: run
    before the weights load (models.load) and again by Layout.check."""
    model_type = model_type or getattr(config, "model_type", "?")
    kinds = config_kinds(config) if kinds is None else kinds
    no_rope = getattr(config, "no_rope_layers", None)
    mla = getattr(config, "kv_lora_rank", None) is not None
    if kinds & {"linear_attention", "mamba", "hybrid", "conv", "recurrent"} or getattr(
        config, "layers_block_type", None
    ):
        raise UnsupportedModelError(
            f"model type '{model_type}' has linear-attention or recurrent layers "
            f"({', '.join(sorted(kinds - {FULL, SLIDING}) or ['mamba'])}): "
            "their state summarises every token seen, so there is nothing to evict or re-index"
        )
    if mla:
        raise UnsupportedModelError(
            f"model type '{model_type}' uses multi-head latent attention: keys are rebuilt from a compressed latent "
            "with a separate RoPE part, which streambench's per-head rotary re-indexing does not cover"
        )
    if kinds - {FULL, SLIDING}:
        raise UnsupportedModelError(
            f"model type '{model_type}' has attention kinds streambench does not re-index ({', '.join(sorted(kinds - {FULL, SLIDING}))})"
        )
    if (
        getattr(config, "alibi", False)
        or model_type in ("mpt", "bloom")
        or getattr(getattr(config, "attn_config", None), "alibi", False)
    ):
        raise UnsupportedModelError(
            f"model type '{model_type}' uses ALiBi: its position bias is computed over cache slot order, and "
            "streambench's cache keeps tokens in any slot order (eviction fills holes from the tail)"
        )
    if model_type in _GLOBAL_NOPE and SLIDING in kinds:
        raise UnsupportedModelError(
            f"model type '{model_type}' has full-attention layers without RoPE (NoPE; only its sliding layers rotate): "
            "their cached keys carry no rotation to re-index, which streambench does not yet handle per layer"
        )
    if no_rope and any(not flag for flag in no_rope):
        raise UnsupportedModelError(
            f"model type '{model_type}' has layers without RoPE (no_rope_layers): their cached keys carry no "
            "rotation to re-index, which streambench does not yet handle per layer"
        )
    if model_type in _LEARNED_POSITIONS:
        raise UnsupportedModelError(
            f"model type '{model_type}' has no rotary position embedding (learned absolute positions): cached keys "
            "depend on absolute positions in every layer, so they cannot be re-indexed"
        )


def check_tested(config, model_type: str | None = None) -> None:
    """Refuse a family outside the exactness matrix, and dynamic RoPE (Layout.check asks this
    last, so that a model without RoPE is refused for that reason first)."""
    model_type = model_type or getattr(config, "model_type", "?")
    if family_of(model_type) is None:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not among the tested families ({', '.join(sorted(FAMILIES))}): "
            "add a tiny config with streambench.models.architecture.register_family and run tests/engine/test_exactness.py on it"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    tables = (
        rope.values() if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()) and rope else [rope]
    )
    for r in tables:
        rope_type = r.get("rope_type", r.get("type", "default")) if isinstance(r, dict) else "default"
        if rope_type == "dynamic":
            raise UnsupportedModelError(
                f"model type '{model_type}' uses dynamic RoPE scaling, whose rotation depends on the sequence length"
            )


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


# Hybrids whose full-attention layers skip RoPE (the attention code decides, not the config).
_GLOBAL_NOPE = ("cohere2", "exaone4")

# ---- what a model is made of ------------------------------------------------------------------
_LAYER_LISTS = ("layers", "h", "blocks", "decoder_layers")
_ATTENTIONS = ("self_attn", "attention", "self_attention", "attn")


def kv_heads_of(config) -> int:
    """KV heads as the model caches them, from any family's config (GQA; Falcon: multi-query caches
    one, the 40B/180B architecture broadcasts its num_kv_heads to every query head before caching)."""
    heads = config.num_attention_heads
    if getattr(config, "model_type", "") == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return heads
        return 1 if getattr(config, "multi_query", False) else heads
    return getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Layout:
    """The parts of a decoder the engine touches, found by structure."""

    def __init__(self, model):
        self.config = config = model.config
        self.model_type = getattr(config, "model_type", type(model).__name__)
        self.base = getattr(model, "base_model", None) or getattr(model, "model", None)
        count = getattr(config, "num_hidden_layers", None)
        self.layers = None
        for name in _LAYER_LISTS:
            candidate = getattr(self.base, name, None)
            if candidate is not None and hasattr(candidate, "__len__") and len(candidate) == count:
                self.layers = candidate
                break
        self.attentions = []
        for layer in self.layers if self.layers is not None else ():
            attn = next((getattr(layer, n) for n in _ATTENTIONS if hasattr(layer, n)), None)
            if attn is None:
                attn = next((m for m in layer.children() if type(m).__name__.endswith("Attention")), None)
            self.attentions.append(attn)
        self.rotary_emb = getattr(self.base, "rotary_emb", None)
        kinds = list(getattr(config, "layer_types", None) or [])
        if not kinds:
            window = getattr(config, "sliding_window", None)
            slides = window is not None and getattr(config, "use_sliding_window", True)
            kinds = [SLIDING if slides else FULL] * (count or 0)
        self.layer_kinds = kinds
        self.sliding_window = getattr(config, "sliding_window", None) if SLIDING in kinds else None
        self.kv_heads, self.head_dim = kv_heads_of(config), head_dim_of(config)
        module = importlib.import_module(type(model).__module__)
        self.apply_rope = getattr(module, "apply_rotary_pos_emb", None)
        self.rope_style = "half"  # set by check(): "half" (rotate_half) or "interleaved" (pairs)
        self.rotary_dim = self.head_dim
        # Does attention dispatch through transformers' AttentionInterface? Routing (attention
        # observations, exact chunks) needs it; Falcon computes SDPA or eager in its own code.
        first = next((a for a in self.attentions if a is not None), None)
        try:
            source = inspect.getsource(type(first).forward) if first is not None else ""
        except (OSError, TypeError, AttributeError):
            source = ""
        self.routable = "ALL_ATTENTION_FUNCTIONS" in source

    @property
    def kinds_present(self) -> set[str]:
        return set(self.layer_kinds)

    def takes_layer_type(self) -> bool:
        """Gemma 3 style: one rotary module with a table per layer kind (local and global bases)."""
        try:
            return "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        except (TypeError, ValueError):
            return False

    def check(self) -> Layout:
        """Refuse, with the reason, a model the engine cannot re-index; then pin the rotary style."""
        config, model_type = self.config, self.model_type
        check_config(config, self.kinds_present, model_type)
        if self.rotary_emb is None:
            learned = any(
                name.rsplit(".", 1)[-1] in ("wpe", "embed_positions", "position_embeddings")
                for name, _ in self.base.named_modules()
            )
            raise UnsupportedModelError(
                f"model type '{model_type}' has no rotary position embedding"
                + (
                    " (learned absolute positions): cached keys depend on absolute positions in every layer, so they cannot be re-indexed"
                    if learned
                    else ": streambench re-indexes keys by re-rotating them"
                )
            )
        if self.layers is None or any(a is None for a in self.attentions):
            raise UnsupportedModelError(
                f"model type '{model_type}': cannot find its decoder layers and their attention modules"
            )
        check_tested(config, model_type)
        self._pin_rotation()
        return self

    def _pin_rotation(self) -> None:
        """Compare the model's own `apply_rotary_pos_emb` with rotate-half and interleaved rotation
        on the first rotary_dim channels; keep the one that matches, refuse if none does."""
        import torch

        from streambench.models.rope import STYLES, rotate

        if self.apply_rope is None:
            raise UnsupportedModelError(
                f"model type '{self.model_type}' applies RoPE without an apply_rotary_pos_emb function streambench can check"
            )
        kind = FULL if FULL in self.kinds_present else SLIDING
        param = next(self.rotary_emb.buffers(), None)
        device = param.device if param is not None else torch.device("cpu")
        positions = torch.tensor([[0, 1, 7, 300]], device=device)
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        extra = {"layer_type": kind} if self.takes_layer_type() else {}
        with torch.no_grad():
            cos, sin = self.rotary_emb(probe, position_ids=positions, **extra)
        cos, sin = cos.float(), sin.float()
        rd = cos.shape[-1]
        k = torch.randn(1, 1, 4, rd, generator=torch.Generator().manual_seed(0)).to(device)
        try:
            with torch.no_grad():
                _, want = self.apply_rope(k, k, cos, sin)
        except Exception as exc:  # an apply function of another signature
            raise UnsupportedModelError(
                f"model type '{self.model_type}': cannot check its rotary embedding ({type(exc).__name__})"
            ) from None
        for style in STYLES:
            got = rotate(k, cos[:, None], sin[:, None], style)
            if torch.allclose(got, want.float(), atol=1e-5, rtol=1e-5):
                self.rope_style, self.rotary_dim = style, rd
                return
        raise UnsupportedModelError(
            f"model type '{self.model_type}' rotates keys in a way streambench does not reproduce "
            "(neither rotate-half nor interleaved pairs)"
        )


def layout_of(model) -> Layout:
    """The model's checked layout, computed once and kept on the model."""
    layout = getattr(model, "_streambench_layout", None)
    if layout is None:
        layout = model._streambench_layout = Layout(model).check()
    return layout
