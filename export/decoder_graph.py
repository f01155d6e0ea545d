"""The `gqa` decoder form (manifest `lmm.decoder.form`): a Llama-family text decoder written directly
as an ONNX graph of onnxruntime contrib ops, from the transformers model's weights.

Why build rather than trace: torch.onnx writes attention as dozens of standard ops and the KV cache
as Concat (a new cache every step). This graph uses, per layer, one `GroupQueryAttention` (rotary
embedding fused, grouped KV heads, KV cache written in place into a buffer shared by past and
present), `SkipSimplifiedLayerNormalization` (residual add + RMSNorm in one kernel) and two packed
MatMuls (q|k|v and gate|up), so a decode step runs ~6 kernels per layer. The CPU and CUDA providers
have kernels for all of them (CUDA's GroupQueryAttention takes fp16/bf16 only); TensorRT takes none
of them, which is why the traced `flat_kv` form stays available (`export lmm --decoder-form`).

Graph I/O (float32 at the boundary; B batch, S new tokens, M KV buffer length, L layers):

- inputs_embeds float32 B x S x hidden;
- seqlens_k int32 B: per row, the number of valid cache positions after this call, minus 1
  (the new tokens of row b sit at positions seqlens_k[b] - S + 1 .. seqlens_k[b]; each row's
  cache starts at position 0, so sequences of different lengths batch without padding);
- total_sequence_length int32 scalar: max over rows of seqlens_k + 1;
- past_key_values.{i}.key / .value float32 B x kv_heads x M x head_dim, M >= total length
  (the runtime binds the same buffer as present_*: GroupQueryAttention then writes only the new
  positions, `past_present_share_buffer`);
-> logits float32 B x V (last position of each row's new tokens), present.{i}.key / .value
  (B x kv_heads x M x head_dim; the past buffer itself when it is bound as the output).

Supported: text models phi3 / llama / qwen2 with SiLU MLPs, full-width rotary embeddings whose
frequencies do not depend on the sequence length (rope types default, linear, llama3, yarn), and no
sliding window. `unsupported_reason` says why another model keeps the flat_kv form.

Rotary tables: `cos_cache` / `sin_cache` (max_positions x head_dim/2) are initializers computed
from the model's own `rotary_emb.inv_freq` and `attention_scaling`, so any rope type whose
frequencies are fixed is exact. GroupQueryAttention takes them as ordinary inputs: a model whose
frequencies depend on the sequence length (Phi-3 longrope: short factors up to
`original_max_position_embeddings`, long ones beyond) can feed a `Where` of two tables on
total_sequence_length instead (docs/runtime.md, "Decoder forms").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["GQA_INPUTS", "build_gqa_text_decoder", "build_gqa_decoder", "gqa_input_names", "gqa_output_names",
           "unsupported_reason"]

GQA_INPUTS = ["inputs_embeds", "seqlens_k", "total_sequence_length"]
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_OPSET = 18


def gqa_input_names(num_layers: int) -> list[str]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return [*GQA_INPUTS, *past]


def gqa_output_names(num_layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]]


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


def unsupported_reason(text_config) -> str | None:
    """None when the gqa form can express `text_config`, else a short reason."""
    if text_config.model_type not in ("phi3", "llama", "qwen2"):
        return f"text model {text_config.model_type}"
    if getattr(text_config, "hidden_act", "silu") != "silu":
        return f"activation {text_config.hidden_act}"
    rope = _rope_type(text_config)
    if rope not in _STATIC_ROPE:
        return f"rope type {rope} (frequencies depend on the sequence length)"
    params = getattr(text_config, "rope_parameters", None) or {}
    if float(params.get("partial_rotary_factor", getattr(text_config, "partial_rotary_factor", 1.0) or 1.0)) != 1.0:
        return "partial rotary embedding"
    if getattr(text_config, "mlp_bias", False):
        return "MLP biases"
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
        getattr(text_config, "use_sliding_window", False) and getattr(text_config, "sliding_window", None)
    ):
        return "sliding-window attention"
    if text_config.model_type == "phi3" and getattr(text_config, "sliding_window", None) and (
        text_config.sliding_window < text_config.max_position_embeddings
    ):
        return "sliding-window attention"
    return None


class _Graph:
    """A small onnx.helper wrapper: unique names, initializers from numpy."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", node_name: str = "",
           **attrs) -> list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op_type) for _ in range(outputs)]
        node_name = node_name or self.name(f"n_{op_type}")
        self.nodes.append(self.helper.make_node(op_type, inputs, names, name=node_name, domain=domain, **attrs))
        return names


def _np(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _rope_caches(language_model, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin caches (max_positions x head_dim/2), computed as transformers does (float32)."""
    import torch

    rotary = language_model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, rotary.inv_freq.float())
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    return (_np(freqs.cos() * scaling), _np(freqs.sin() * scaling))


def _layer_weights(layer, model_type: str) -> dict[str, np.ndarray | None]:
    """Packed (in x out) MatMul weights and biases of one decoder layer."""
    attn, mlp = layer.self_attn, layer.mlp
    if model_type == "phi3":
        qkv_w, qkv_b = _np(attn.qkv_proj.weight), None
        gate_up = _np(mlp.gate_up_proj.weight)
    else:
        qkv_w = np.concatenate([_np(attn.q_proj.weight), _np(attn.k_proj.weight), _np(attn.v_proj.weight)])
        biases = [getattr(attn, f"{p}_proj").bias for p in ("q", "k", "v")]
        qkv_b = np.concatenate([_np(b) for b in biases]) if biases[0] is not None else None
        gate_up = np.concatenate([_np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)])
    o_bias = attn.o_proj.bias
    return {
        "qkv": qkv_w.T, "qkv_bias": qkv_b, "o": _np(attn.o_proj.weight).T,
        "o_bias": None if o_bias is None else _np(o_bias),
        "gate_up": gate_up.T, "down": _np(mlp.down_proj.weight).T,
        "norm_in": _np(layer.input_layernorm.weight), "norm_post": _np(layer.post_attention_layernorm.weight),
    }


def build_gqa_decoder(llava_model, path: str | os.PathLike[str], *, max_positions: int | None = None,
                      opset: int = _OPSET) -> None:
    """Write the gqa-form decoder of a LlavaForConditionalGeneration (fp32) to `path` (ONNX opset
    `opset` >= 13 for the standard ops, com.microsoft 1 for the contrib ops)."""
    build_gqa_text_decoder(llava_model.model.language_model, llava_model.lm_head.weight,
                           llava_model.config.get_text_config(), path, max_positions=max_positions, opset=opset)


def build_gqa_text_decoder(language_model, lm_head_weight, config, path: str | os.PathLike[str], *,
                           max_positions: int | None = None, opset: int = _OPSET) -> None:
    """The same from the parts any Llama-family model has (a Phi-3 / Llama / Qwen2 `...Model` with
    `layers`, `norm`, `rotary_emb`; the lm_head weight V x hidden; its text config), so that other
    multimodal wrappers (Phi-3.5-Vision) reuse it."""
    from onnx import TensorProto, helper

    from octopus_rt.export.onnx_export import save_onnx

    reason = unsupported_reason(config)
    if reason is not None:
        raise ValueError(f"the gqa decoder form does not support {reason}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = float(config.rms_norm_eps)
    layers = config.num_hidden_layers
    max_positions = int(max_positions or config.max_position_embeddings)

    g = _Graph()
    cos, sin = _rope_caches(language_model, max_positions)
    g.const("cos_cache", cos)
    g.const("sin_cache", sin)
    hidden = "inputs_embeds"
    residual = hidden
    mlp_out = None
    for i in range(layers):
        w = _layer_weights(language_model.layers[i], config.model_type)
        p = f"layers.{i}"
        norm_in = g.const(f"{p}.input_layernorm.weight", w["norm_in"])
        if mlp_out is None:
            (normed,) = g.op("SimplifiedLayerNormalization", [hidden, norm_in], 1, axis=-1, epsilon=eps, stash_type=1)
        else:
            normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [mlp_out, residual, norm_in], 4,
                                          domain="com.microsoft", epsilon=eps)
        (qkv,) = g.op("MatMul", [normed, g.const(f"{p}.attn.qkv.weight", w["qkv"])])
        if w["qkv_bias"] is not None:
            (qkv,) = g.op("Add", [qkv, g.const(f"{p}.attn.qkv.bias", w["qkv_bias"])])
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k",
             "total_sequence_length", "cos_cache", "sin_cache"],
            [g.name("attn"), f"present.{i}.key", f"present.{i}.value"],
            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim) ** -0.5,
            do_rotary=1, rotary_interleaved=0, local_window_size=-1,
        )
        (attn_out,) = g.op("MatMul", [attn, g.const(f"{p}.attn.o.weight", w["o"])])
        if w["o_bias"] is not None:
            (attn_out,) = g.op("Add", [attn_out, g.const(f"{p}.attn.o.bias", w["o_bias"])])
        norm_post = g.const(f"{p}.post_attention_layernorm.weight", w["norm_post"])
        normed, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [attn_out, residual, norm_post], 4,
                                      domain="com.microsoft", epsilon=eps)
        (gate_up,) = g.op("MatMul", [normed, g.const(f"{p}.mlp.gate_up.weight", w["gate_up"])])
        half = g.const(f"{p}.mlp.split", np.array([w["gate_up"].shape[1] // 2] * 2, dtype=np.int64))
        gate, up = g.op("Split", [gate_up, half], 2, axis=-1)
        (sig,) = g.op("Sigmoid", [gate])
        (act,) = g.op("Mul", [gate, sig])
        (act,) = g.op("Mul", [act, up])
        (mlp_out,) = g.op("MatMul", [act, g.const(f"{p}.mlp.down.weight", w["down"])])

    # Only the last position's logits are returned: norm and head run on one row per sequence.
    last = g.const("last_index", np.array([-1], dtype=np.int64))
    (mlp_last,) = g.op("Gather", [mlp_out, last], axis=1)
    (res_last,) = g.op("Gather", [residual, last], axis=1)
    final_norm = g.const("norm.weight", _np(language_model.norm.weight))
    normed, _, _, _ = g.op("SkipSimplifiedLayerNormalization", [mlp_last, res_last, final_norm], 4,
                           domain="com.microsoft", epsilon=eps)
    (logits,) = g.op("MatMul", [normed, g.const("lm_head.weight", _np(lm_head_weight).T)])
    g.op("Squeeze", [logits, g.const("squeeze_axes", np.array([1], dtype=np.int64))], ["logits"])

    def kv(name: str, length: str):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", kv_heads, length, head_dim])

    inputs = [
        helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", config.hidden_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        *[kv(n, "past_sequence") for n in gqa_input_names(layers)[3:]],
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", config.vocab_size]),
        *[kv(n, "present_sequence") for n in gqa_output_names(layers)[1:]],
    ]
    graph = helper.make_graph(g.nodes, "octopus_decoder_gqa", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="octopus-rt")
    model.ir_version = 8
    # Weights in `decoder.onnx.data`: onnxruntime memory-maps external data (faster start-up).
    save_onnx(model, Path(path), external=True)
