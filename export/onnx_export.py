"""The export toolkit: one torch.onnx.export call, one opset check, one way to save large graphs.

Every exporter (export/llava_graphs.py, export/sam.py) and the precision conversions
(export/quantize.py) go through here, so a graph is written, checked and split into external data
the same way wherever it comes from.

- `export_onnx`: trace a module to an ONNX file at a requested opset, with the dynamo exporter
  (opset >= 18, `dynamic_shapes` keyed by argument name) or the TorchScript exporter (any opset,
  `dynamic_axes`); `onnx.checker` runs on what the exporter wrote and the written opset is checked.
- `save_onnx`: write an `onnx.ModelProto`; weights go to one `<file>.data` next to the graph when
  they would pass protobuf's 2 GiB message limit (vit_h fp32 is ~2.5 GB, Phi-3-mini ~15 GB), or
  when asked (`external=True`: onnxruntime memory-maps external data, so sessions start faster;
  measured for the gqa decoder in docs/runtime.md, "Decoder forms").
- `graph_bytes`: a graph's size on disk including its external data.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError, OctopusError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "DYNAMO_MIN_OPSET",
    "EXPORTERS",
    "export_onnx",
    "check_opset_range",
    "written_opset",
    "save_onnx",
    "graph_bytes",
    "one_line",
]

# Protobuf cannot serialise a single message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# torch.onnx's dynamo exporter writes opset 18 natively; lower opsets go through TorchScript.
DYNAMO_MIN_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` of an exception, for one-line CLI errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_opset_range(opset: int, supported: tuple[int, int], what: str) -> None:
    """InputError unless supported[0] <= opset <= supported[1]."""
    if not supported[0] <= int(opset) <= supported[1]:
        raise InputError(f"opset {opset} is outside the range {supported[0]}..{supported[1]} supported for {what}")


def written_opset(path: str | os.PathLike[str]) -> int:
    """The default-domain (ai.onnx) opset an ONNX file was written with."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def save_onnx(model: Any, path: str | os.PathLike[str], *, external: bool = False) -> None:
    """Save an onnx.ModelProto, with weights in `<file>.data` when the model is too big for one file
    or `external` is set."""
    import onnx

    path = Path(path)
    size = sum(init.ByteSize() for init in model.graph.initializer)
    if external or size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def graph_bytes(path: str | os.PathLike[str]) -> int:
    """Size of an ONNX file plus its external data file (`<file>.data`) when there is one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _save_program(program: Any, path: Path) -> None:
    """Write a dynamo ONNXProgram; weights go to `<file>.data` when they would pass the 2 GiB limit."""
    exported = program.exported_program
    weights = sum(t.numel() * t.element_size() for t in exported.state_dict.values())
    weights += sum(t.numel() * t.element_size() for t in exported.constants.values() if hasattr(t, "numel"))
    program.save(str(path), external_data=weights > EXTERNAL_DATA_THRESHOLD)


def export_onnx(
    module: Any,
    args: tuple,
    path: str | os.PathLike[str],
    *,
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    exporter: str | None = None,
    dynamic_shapes: Any = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    transform: Callable[[Any], Any] | None = None,
) -> None:
    """Export `module(*args)` to `path` at `opset`, run onnx.checker, check the written opset.

    exporter: "dynamo" (needs opset >= DYNAMO_MIN_OPSET; uses `dynamic_shapes`), "torchscript"
    (any opset; uses `dynamic_axes`), or None for dynamo from opset 18 and TorchScript below (the
    dynamo exporter reaches lower opsets only through onnx's version converter, which fails on some
    decoder nodes and then silently keeps 18, measured). transform: ModelProto -> ModelProto applied
    before saving (TorchScript only; e.g. an fp16 conversion). Any exporter failure becomes a
    one-line OctopusError.
    """
    import torch

    path = Path(path)
    exporter = exporter or ("dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and transform is not None:
        raise ValueError("a ModelProto transform needs the torchscript exporter")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            if exporter == "dynamo":
                # The exporter names dims from dynamic_shapes and warns once per shared Dim; harmless.
                warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
                program = torch.onnx.export(
                    module, args, None, input_names=list(input_names), output_names=list(output_names),
                    dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, verbose=False,
                )
                _save_program(program, path)
                _check_graph(path)
            else:
                warnings.simplefilter("ignore")  # TracerWarnings about constant shapes are expected
                _export_torchscript(module, args, path, opset, input_names, output_names, dynamic_axes, transform)
    except OctopusError:
        raise
    except Exception as exc:  # noqa: BLE001 - exporter failures come in many types; report one line
        raise OctopusError(f"ONNX export of {path.name} failed: {one_line(exc)} (run with --debug for details)") from exc
    written = written_opset(path)
    if written != opset:
        raise OctopusError(f"{path.name} was written with opset {written}, not the requested {opset}")


def _check_graph(path: Path) -> None:
    """onnx.checker on what the exporter wrote: fail early on a structurally broken graph (cheaper
    to read than an onnxruntime load error). Runs before any transform: onnxruntime's float16
    converter leaves graphs that onnxruntime runs but the checker calls unsorted."""
    import onnx

    onnx.checker.check_model(str(path))


def _export_torchscript(module, args, path: Path, opset, input_names, output_names, dynamic_axes, transform) -> None:
    """TorchScript writes one external file per large tensor: export aside, then save cleanly."""
    import onnx
    import torch

    with tempfile.TemporaryDirectory(prefix="octopus-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        torch.onnx.export(
            module, args, str(raw), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )
        _check_graph(raw)
        model = onnx.load(str(raw))
        save_onnx(transform(model) if transform is not None else model, path)
