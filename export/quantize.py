"""Precision conversions of exported ONNX graphs (fp16, dynamic int8, int4 weight-only).

All functions take an fp32 ONNX file and write the converted graph to another path; the graph's
input and output names, shapes and dtypes stay the same (float32 I/O), so the runtime feeds every
precision the same way. Both decoder forms (flat_kv, gqa) go through the same recipes; what a
decoder got is recorded in the manifest's `lmm.decoder.quantization` (RECIPES):

- `to_fp16`: weights and compute in float16, float32 at the graph boundary (`keep_io_types`).
- `to_int8`: onnxruntime `quantize_dynamic` (per-channel int8 weights, activations quantised per
  call) of the MatMul / Gemm ops, for CPU and edge; measured faster than 8-bit MatMulNBits on the
  gqa decoder (docs/runtime.md, "Decoder forms").
- `to_int4`: weight-only 4-bit block quantisation of the constant-weight MatMuls into
  `com.microsoft.MatMulNBits` (blocks of 32, asymmetric), `accuracy_level` 4 (the CPU kernel
  quantises the activations to int8 and runs int8 dot products: measured 1.8x faster per token
  than accuracy_level 0 on the 100M decoder), the lm_head (the MatMul that feeds `logits`, the most
  sensitive layer) at 8 bits. Decoding is bound by the weight bytes read per token, which 4 bits
  cut by ~7x against fp32.

Graphs are written by export/onnx_export.save_onnx (`external`: weights in `<name>.data`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from octopus_rt.export import onnx_export
from octopus_rt.export.onnx_export import graph_bytes, save_onnx
from octopus_rt.manifest_lmm import DecoderQuantization

__all__ = ["PRECISIONS", "VISION_PRECISIONS", "default_vision_precision", "RECIPES", "to_fp16", "to_int8", "to_int4",
           "output_matmuls"]

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# What a vision graph may be converted to (export lmm --vision-precision); int4 MatMulNBits has no
# convolution kernel and the towers are small, so an int4 export keeps its vision graph in fp32.
VISION_PRECISIONS = ("fp32", "fp16", "int8")


def default_vision_precision(precision: str) -> str:
    """The vision graph's precision when the user names none: the export's, fp32 for int4."""
    return "fp32" if precision == "int4" else precision

# What `to_int8` / `to_int4` do at their defaults, as the manifest records it.
RECIPES: dict[str, DecoderQuantization] = {
    "int8": DecoderQuantization(method="quantize_dynamic", bits=8, per_channel=True),
    "int4": DecoderQuantization(method="MatMulNBits", bits=4, block_size=32, accuracy_level=4, symmetric=False,
                                lm_head_bits=8),
}


@contextlib.contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """onnxruntime's quantizers log one INFO line per node (and a root WARNING); keep the CLI readable."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """float16 weights and compute, float32 inputs/outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # keep_io_types: the runtime feeds float32 embeddings and KV caches at every precision.
    # disable_shape_infer: shape inference on dynamo graphs with symbolic dims adds nothing here.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    save_onnx(converted, dst)


def to_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, external: bool = False) -> None:
    """Dynamic int8 quantisation of MatMul/Gemm weights (activations quantised at run time).

    `external`: weights in `<dst>.data`. Graphs with onnxruntime contrib ops (the gqa decoder)
    defeat the quantizer's shape inference; it is told that untyped tensors are float.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizers():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=external or graph_bytes(src) > onnx_export.EXTERNAL_DATA_THRESHOLD,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def output_matmuls(model, output: str = "logits") -> list[str]:
    """Names of the MatMul nodes nearest to graph output `output` (walking back through other ops):
    the lm_head of a decoder, whatever the exporter called its nodes."""
    producers = {name: node for node in model.graph.node for name in node.output}
    found, seen, todo = [], set(), [output]
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
        else:
            todo.extend(node.input)
    return found


def _gemms_as_matmuls(model) -> None:
    """Gemm(A, W, transB) with a constant W (the traced lm_head) -> MatMul(A, W') (+ Add for a bias C),
    in place: MatMulNBits takes MatMul nodes only, and both decoder forms then get the same recipe."""
    from onnx import helper, numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    for index, node in enumerate(list(model.graph.node)):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight
        name = f"{node.input[1]}_matmul"
        model.graph.initializer.append(numpy_helper.from_array(weight.copy(), name))
        bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        replacement = [helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}_matmul")]
        if bias:
            replacement.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        position = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, new in enumerate(replacement):
            model.graph.node.insert(position + offset, new)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def to_int4(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = False,
    head_bits: int = 8,
    external: bool = False,
) -> None:
    """4-bit weight-only MatMulNBits quantisation of every constant-weight MatMul (module docstring);
    the MatMuls feeding `logits` get `head_bits` (4 or 8). Asymmetric blocks measured a higher logits
    cosine than symmetric ones on the tiny test models (0.994 vs 0.991 teacher-forced)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    _gemms_as_matmuls(model)
    head = output_matmuls(model) if head_bits != 4 else []
    passes = [(4, {"nodes_to_exclude": head})] + ([(head_bits, {"nodes_to_include": head})] if head else [])
    with _quiet_quantizers():
        for bits, select in passes:
            quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                             accuracy_level=accuracy_level, **select)
            quantizer.process()
            model = quantizer.model.model
    save_onnx(model, dst, external=external)
