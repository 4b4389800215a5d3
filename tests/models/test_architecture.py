"""Model families: what `Layout` finds in each tested family, the query tap's pre-RoPE query, and
one line naming the reason for each kind of model the engine cannot re-index."""

import importlib

import pytest
import torch
import transformers
from tiny_models import ARCHITECTURES, tiny_model

from streambench.engine.query_tap import QueryTap
from streambench.errors import UnsupportedModelError
from streambench.models.architecture import FAMILIES, Layout, kv_heads_of
from streambench.models.loading import LoadedModel


def test_at_least_fourteen_model_types_are_tested():
    assert len(ARCHITECTURES) >= 14
    assert {
        "gpt_neox",
        "falcon",
        "phi",
        "olmo",
        "olmo2",
        "granite",
        "stablelm",
        "starcoder2",
        "cohere",
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "gemma",
    } <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_finds_layers_attention_and_the_rotation_each_family_declares(arch):
    model = tiny_model(arch, layers=2)
    layout = LoadedModel.wrap(model).layout
    needs = FAMILIES[arch].needs
    assert len(layout.layers) == 2 and all(a is not None for a in layout.attentions)
    assert layout.rope_style.startswith("interleaved") == ("interleaved rotary" in needs)
    assert (layout.rotary_dim < layout.head_dim) == ("partial rotary" in needs)
    assert layout.routable == ("own attention code" not in needs)
    assert layout.kv_heads == kv_heads_of(model.config)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_query_tap_gives_the_query_the_attention_rotates(arch):
    """Retrieval (longmem) scores memory blocks with the last token's pre-RoPE query: the tap's
    equals what the model hands its own apply_rotary_pos_emb (first rotary_dim channels), averaged
    over each KV head's group of query heads."""
    check_tap(tiny_model(arch, layers=2))


def check_tap(model):
    lm = LoadedModel.wrap(model)
    info = lm.info
    module = importlib.import_module(type(model).__module__)
    seen, original = [], module.apply_rotary_pos_emb

    def recording(q, k, cos, sin, *args, **kwargs):
        seen.append(q.detach().clone())
        return original(q, k, cos, sin, *args, **kwargs)

    tap = QueryTap(model, info.num_heads, info.kv_heads, info.head_dim)
    module.apply_rotary_pos_emb = recording
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 9, 17, 33]]))
    finally:
        module.apply_rotary_pos_emb = original
        tap.close()
    got = tap.query()  # (full-attention layers, kv_heads, head_dim): the bank holds their tokens
    seen = [q for q, kind in zip(seen, lm.layout.layer_kinds) if kind != "sliding_attention"]
    assert len(seen) == got.shape[0]
    for layer, q in enumerate(seen):
        width = q.shape[-1]
        want = q[0, :, -1].reshape(info.kv_heads, -1, width).float().mean(dim=1)
        torch.testing.assert_close(got[layer, :, :width], want, atol=1e-5, rtol=1e-5)


def _meta_model(model_type, **kwargs):
    """A model built on the meta device: structure only, no weights (refusals come before any
    computation)."""
    sizes = dict(
        vocab_size=96, pad_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    config = transformers.AutoConfig.for_model(model_type, **{**sizes, **kwargs})
    config._attn_implementation = "eager"
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


REFUSALS = [
    ("mpt", {"d_model": 64, "n_heads": 4, "n_layers": 2}, "ALiBi"),
    ("bloom", {"n_layer": 2, "n_head": 4}, "ALiBi"),
    ("falcon", {"alibi": True}, "ALiBi"),
    ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}, "learned absolute positions"),
    ("opt", {"ffn_dim": 96, "word_embed_proj_dim": 64}, "learned absolute positions"),
    (
        "qwen3_next",
        {"num_key_value_heads": 2, "layer_types": ["linear_attention", "full_attention"]},
        "linear-attention or recurrent",
    ),
    (
        "jamba",
        {
            "num_key_value_heads": 2,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
        },
        "linear-attention or recurrent",
    ),
    (
        "deepseek_v3",
        {
            "num_key_value_heads": 4,
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 2,
        },
        "multi-head latent attention",
    ),
    ("smollm3", {"num_key_value_heads": 2, "no_rope_layers": [1, 0]}, "without RoPE"),
    (
        "cohere2",
        {"num_key_value_heads": 2, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
        "without RoPE",
    ),
    ("helium", {"num_key_value_heads": 2}, "not among the tested families"),
]


@pytest.mark.parametrize(
    "model_type,kwargs,reason", REFUSALS, ids=[r[0] + ("-alibi" if r[0] == "falcon" else "") for r in REFUSALS]
)
def test_each_kind_of_model_that_cannot_be_reindexed_is_refused_with_its_reason(model_type, kwargs, reason):
    model = _meta_model(model_type, **kwargs)
    with pytest.raises(UnsupportedModelError, match=reason) as caught:
        Layout(model).check()
    assert "\n" not in str(caught.value) and model_type in str(caught.value)


@pytest.mark.parametrize(
    "variant",
    [{"new_decoder_architecture": True, "num_kv_heads": 2}, {"multi_query": False, "new_decoder_architecture": False}],
    ids=["falcon-40b-layout", "falcon-rw-layout"],
)
def test_falcons_other_qkv_layouts_equal_the_reference(variant):
    """Falcon packs q, k, v three ways (multi-query 7B, grouped 40B/180B, per head): the family's
    tiny config is the 7B one; the other two run a re-indexing policy and the query tap here."""
    from reference import ReferenceStream

    from streambench.engine.session import StreamSession
    from streambench.policies.build import PolicySpec, build_policy

    model = tiny_model("falcon", layers=2, **variant)
    lm = LoadedModel.wrap(model)
    assert lm.info.kv_heads == kv_heads_of(model.config) == 4  # 40B layout: its 2 KV heads broadcast before caching
    make = lambda: build_policy(PolicySpec("streamingllm", {"start_size": 2}), 10)  # noqa: E731
    session, reference = StreamSession(lm, make()), ReferenceStream(model, make())
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(3))
    for t in range(30):
        torch.testing.assert_close(
            session.feed(ids[:, t : t + 1]), reference.feed(ids[:, t : t + 1]), atol=1e-4, rtol=0
        )
    check_tap(model)
