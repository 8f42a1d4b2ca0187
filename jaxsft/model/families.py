"""The family table: what is special about each supported model family, in one place.

Adding a family is one `Family` row here (plus, at most, a reader for an unusual config layout): the
decoder (`transformer.py`) reads only the resolved `ModelConfig` fields this table produces, the HF
loader/exporter (`hf.py`) reads the prefixes, and LoRA (`lora.py`) reads the module names.

Param tree paths are the Hugging Face module names (`layers/self_attn/q_proj/kernel` is
`model.layers.N.self_attn.q_proj.weight`), so fused projections (Phi-3's `qkv_proj`, `gate_up_proj`)
and extra norms (Gemma's `pre_feedforward_layernorm`) keep their checkpoint names in and out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxsft.model.config import FULL, SLIDING, RopeScaling

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
_ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first configs

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ALL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                      "down_proj")  # every family's, in HF order


@dataclasses.dataclass(frozen=True)
class Family:
    """One row of the table. Booleans switch on the decoder features of the same name in ModelConfig."""

    activation_key: str = "hidden_act"  # the config key naming the MLP activation
    activations: tuple[str, ...] = ("silu",)
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    qkv_bias: bool = False  # biases on q/k/v (never o), whatever attention_bias says (Qwen2)
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    softcaps: bool = False  # reads attn_logit_softcapping / final_logit_softcapping
    query_pre_attn_scalar: bool = False
    # How sliding windows are read: "none" (refused), "all" (config sliding_window on every layer),
    # "qwen" (use_sliding_window + layer_types / max_window_layers), "pattern" (layer_types, else every
    # `sliding_window_pattern`-th layer is global, the others slide).
    windows: str = "none"
    default_window_pattern: int = 0
    default_sliding_window: int | None = None  # when config.json has no sliding_window key (Gemma: 4096)
    local_rope: bool = False  # rope_parameters per layer type (Gemma 3: sliding layers' own base)
    default_rope_theta: float = 10000.0
    tie_default: bool = False  # tie_word_embeddings when config.json does not say
    linear_modules: tuple[str, ...] = LLAMA_LINEAR  # per-layer linear layers, in HF order (LoRA targets)
    text_config: str | None = None  # multimodal checkpoints: the key of the text tower's config
    text_model_type: str | None = None  # ... and the family of that tower
    hf_prefix: str = "model."  # tensor name prefix of the decoder in the checkpoint files
    peft_prefix: str = "model."  # module prefix of the decoder in the loaded torch model (PEFT names)
    # Mixture of experts: "" (dense), "qwen" (num_experts, moe_intermediate_size, norm_topk_prob,
    # decoder_sparse_step / mlp_only_layers), "mixtral" (num_local_experts of intermediate_size, top-k
    # weights always renormalized).
    moe: str = ""
    shared_expert: bool = False  # Qwen2-MoE: a dense shared expert scaled by sigmoid(shared_expert_gate)
    moe_block: str = "mlp"  # HF module name of the sparse block (Mixtral's on-disk `block_sparse_moe`)
    # HF names of each expert's gate, up and down projections (Mixtral's w1, w3, w2).
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


_GEMMA = dict(activation_key="hidden_activation", activations=("gelu_pytorch_tanh", "gelu"), norm_plus_one=True,
              scale_embeddings=True, sandwich_norms=True, softcaps=True, query_pre_attn_scalar=True,
              windows="pattern", default_sliding_window=4096, tie_default=True)

FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(windows="all"),
    "qwen2": Family(qkv_bias=True, windows="qwen"),
    "qwen3": Family(qk_norm=True, windows="qwen"),
    "gemma": Family(activations=("gelu_pytorch_tanh", "gelu"), norm_plus_one=True, scale_embeddings=True,
                    tie_default=True),
    "gemma2": Family(**_GEMMA, default_window_pattern=2),
    "gemma3_text": Family(**_GEMMA, qk_norm=True, default_window_pattern=6, local_rope=True,
                          default_rope_theta=1e6),
    # Gemma3ForConditionalGeneration: the text tower is trained, the vision tower is carried through export.
    "gemma3": Family(text_config="text_config", text_model_type="gemma3_text", hf_prefix="language_model.model.",
                     peft_prefix="model.language_model."),
    "phi3": Family(fused_qkv=True, fused_gate_up=True, windows="all", linear_modules=FUSED_LINEAR),
    "qwen2_moe": Family(qkv_bias=True, windows="qwen", moe="qwen", shared_expert=True),
    "qwen3_moe": Family(qk_norm=True, windows="qwen", moe="qwen"),
    "mixtral": Family(windows="all", default_rope_theta=1e6, moe="mixtral", moe_block="block_sparse_moe",
                      expert_names=("w1", "w3", "w2")),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_of(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a config.json dict, per the family's row."""
    outer_type = hf.get("model_type")
    outer = family_of(outer_type)
    text = hf
    if outer.text_config:
        text = {"model_type": outer.text_model_type, **(hf.get(outer.text_config) or {})}
        text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    model_type = text.get("model_type")
    fam = family_of(model_type)

    quantized = hf.get("quantization_config") or text.get("quantization_config")
    if quantized:  # GPTQ / AWQ / AQLM / bitsandbytes / FP8 tensors are not the plain weights the param tree holds
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else quantized
        raise ValueError(f"the checkpoint is quantized (quantization_config, quant_method {method}); jaxsft loads "
                         f"unquantized weights only: use the original bf16/fp16/fp32 model")
    act = text.get(fam.activation_key) or text.get("hidden_act") or fam.activations[0]
    if act not in fam.activations:
        raise ValueError(f"{model_type}: {fam.activation_key} {act!r} is not supported; supported: "
                         f"{', '.join(fam.activations)}")
    if text.get("mlp_bias", False):
        raise ValueError(f"{model_type}: mlp_bias=True is not supported")
    if text.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"{model_type}: pretraining_tp={text['pretraining_tp']} is not supported (only 1)")
    if not fam.qkv_bias and text.get("attention_bias", False):
        # attention_bias also puts a bias on o_proj, which the param tree has no slot for.
        raise ValueError(f"{model_type}: attention_bias=True (bias on o_proj) is not supported")
    if text.get("use_bidirectional_attention"):
        raise ValueError(f"{model_type}: use_bidirectional_attention=True is not supported (causal LMs only)")

    num_heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // num_heads
    rope = _rope_from_hf(text, fam, model_type)
    sliding_window, layer_types = _windows_from_hf(text, fam, model_type)

    eos = hf.get("eos_token_id", text.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    bos = hf.get("bos_token_id", text.get("bos_token_id"))
    softcap = (lambda key: text.get(key) or None) if fam.softcaps else (lambda key: None)
    return dict(
        family=outer_type,
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", fam.tie_default)),
        qkv_bias=fam.qkv_bias,
        qk_norm=fam.qk_norm,
        max_position_embeddings=text.get("max_position_embeddings", 4096),
        sliding_window=sliding_window,
        layer_types=layer_types,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        hidden_act=act,
        norm_plus_one=fam.norm_plus_one,
        scale_embeddings=fam.scale_embeddings,
        sandwich_norms=fam.sandwich_norms,
        query_pre_attn_scalar=(float(text.get("query_pre_attn_scalar") or head_dim)
                               if fam.query_pre_attn_scalar else None),
        attn_logit_softcap=softcap("attn_logit_softcapping"),
        final_logit_softcap=softcap("final_logit_softcapping"),
        fused_qkv=fam.fused_qkv,
        fused_gate_up=fam.fused_gate_up,
        hf_prefix=outer.hf_prefix,
        peft_prefix=outer.peft_prefix,
        **rope,
        **_moe_from_hf(text, fam, model_type),
    )


def _num_experts(hf: dict) -> int:
    """`num_experts` (Qwen checkpoints) or `num_local_experts` (Mixtral; transformers 5 saves Qwen3-MoE so)."""
    for key in ("num_experts", "num_local_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    raise ValueError(f"{hf.get('model_type')}: config.json has neither num_experts nor num_local_experts")


def _moe_from_hf(hf: dict, fam: Family, model_type: str) -> dict[str, Any]:
    """The experts' ModelConfig fields (none for dense families)."""
    if not fam.moe:
        return {}
    if fam.moe == "qwen":
        experts, size, norm_topk = _num_experts(hf), hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False))
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            # Mixed dense and sparse layers would need two layer bodies under the scan.
            raise ValueError(f"{model_type}: decoder_sparse_step={hf.get('decoder_sparse_step', 1)} / mlp_only_layers="
                             f"{hf.get('mlp_only_layers')} (dense MLP layers among the sparse ones) is not supported; "
                             f"only every layer sparse (decoder_sparse_step 1, no mlp_only_layers)")
    else:  # mixtral
        experts, size, norm_topk = _num_experts(hf), hf["intermediate_size"], True
        if hf.get("router_jitter_noise"):
            raise ValueError(f"{model_type}: router_jitter_noise={hf['router_jitter_noise']} is not supported (only 0)")
    if not experts:
        raise ValueError(f"{model_type}: num_experts=0 (a dense model under an MoE model_type) is not supported")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(size),
        norm_topk_prob=norm_topk,
        shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]) if fam.shared_expert else 0,
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        output_router_logits=bool(hf.get("output_router_logits", False)),
        moe_block=fam.moe_block,
        expert_names=fam.expert_names,
    )


def linear_modules(model_type: str) -> tuple[str, ...]:
    """The per-layer linear modules of a family (LoRA's `all`), in HF order."""
    fam = family_of(model_type)
    return family_of(fam.text_model_type).linear_modules if fam.text_model_type else fam.linear_modules


def _windows_from_hf(hf: dict, fam: Family, model_type: str) -> tuple[int | None, tuple[str, ...] | None]:
    window = hf.get("sliding_window", fam.default_sliding_window)
    layers = hf["num_hidden_layers"]
    if fam.windows == "none":
        if hf.get("use_sliding_window") or (window and hf.get("layer_types") and SLIDING in hf["layer_types"]):
            raise ValueError(f"{model_type}: sliding windows are not supported for this family")
        return None, None
    if fam.windows == "all":
        return window or None, None
    if fam.windows == "qwen":
        if not hf.get("use_sliding_window", False) or not window:
            return None, None
        types = hf.get("layer_types") or [
            SLIDING if i >= hf.get("max_window_layers", layers) else FULL for i in range(layers)]
        return window, tuple(types)
    # "pattern": Gemma's interleaved local/global layers
    pattern = hf.get("sliding_window_pattern") or fam.default_window_pattern
    types = hf.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    if SLIDING in types and not window:
        raise ValueError(f"{model_type}: layer_types has sliding_attention layers but sliding_window is not set")
    return (window or None), tuple(types)


def _rope_from_hf(hf: dict, fam: Family, model_type: str) -> dict[str, Any]:
    """rope_theta, rope_scaling, local_rope_theta and partial_rotary_factor (transformers 4.x `rope_theta` +
    `rope_scaling`, or 5.x `rope_parameters`, per layer type for Gemma 3)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    local_theta = None
    if fam.local_rope:
        if FULL in params or SLIDING in params:  # transformers 5: one dict per layer type
            local = dict(params.get(SLIDING) or {})
            params = dict(params.get(FULL) or {})
            local_type = local.get("rope_type", local.get("type", "default"))
            if local_type != "default":
                raise ValueError(f"{model_type}: rope type {local_type!r} on sliding_attention layers is not "
                                 f"supported (only 'default')")
            local_theta = local.get("rope_theta")
        local_theta = float(local_theta or hf.get("rope_local_base_freq") or 10000.0)
    theta = float(params.get("rope_theta", hf.get("rope_theta", fam.default_rope_theta)))
    partial = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = _ROPE_ALIASES.get(rope_type, rope_type)
    out = dict(rope_theta=theta, rope_scaling=None, local_rope_theta=local_theta, partial_rotary_factor=partial)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{model_type}: rope scaling type {rope_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return out
    max_pos = hf.get("max_position_embeddings", 4096)
    # transformers prefers a top-level original_max_position_embeddings (Phi-3) to the one in the rope dict.
    original = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
    factor = params.get("factor")
    if factor is None and rope_type in ("yarn", "longrope"):
        factor = max_pos / original
    fields = dict(
        factor=float(factor if factor is not None else 1.0),
        original_max_position_embeddings=original,
        attention_factor=params.get("attention_factor"),
    )
    if rope_type == "llama3":
        fields.update(low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]))
    elif rope_type == "yarn":
        fields.update(beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                      truncate=bool(params.get("truncate", True)))
    elif rope_type == "longrope":
        fields.update(short_factor=tuple(float(x) for x in params["short_factor"]),
                      long_factor=tuple(float(x) for x in params["long_factor"]))
    elif rope_type == "linear":
        fields = dict(factor=float(params["factor"]))
    elif rope_type == "dynamic":
        fields = dict(factor=float(params["factor"]))
    out["rope_scaling"] = RopeScaling(rope_type, **fields)
    return out
