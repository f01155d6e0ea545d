"""Helpers shared by the TensorRT / provider-plan / doctor / memory tests (not a test module).

`phi3_manifest`: a manifest with LLaVA-Phi-3-mini's sizes; `with_engines`: the same with an engines
target; `FakeTensorRT`: a session factory playing onnxruntime's TensorRT provider on CPU; `orin`: the
DeviceInfo of a Jetson AGX Orin with TensorRT.
"""

from __future__ import annotations

from pathlib import Path

from octopus_rt.export.trt_profiles import TRT_GRAPHS_DEFAULT
from octopus_rt.manifest import ENGINES_FORMAT, GRAPHS
from octopus_rt.runtime.device_info import DeviceInfo
from octopus_rt.runtime.provider_plan import graph_record

GIB = 1 << 30
TRT = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def phi3_manifest(tmp: Path | None = None) -> dict:
    """A manifest with LLaVA-Phi-3-mini's sizes (CLIP ViT-L/14-336: 576 image tokens) and vit_b SAM."""
    layers = 32
    return {
        "format": "octopus-rt-bundle",
        "format_version": 1,
        "defaults": {"tau": 1.0, "max_new_tokens": 64},
        "lmm": {
            "dir": "lmm-0",
            "files": {
                "vision.onnx": {"size": 600_000_000, "sha256": "v"},
                "decoder.onnx": {"size": 1_000, "sha256": "d"},
                "decoder.onnx.data": {"size": 7_600_000_000, "sha256": "dd"},
                "embed_tokens.npy": {"size": 394_000_000, "sha256": "e"},
            },
            "precision": "fp16",
            "vision": {"file": "vision.onnx", "input_names": ["pixel_values"], "num_image_tokens": 576, "hidden_size": 3072},
            "decoder": {
                "file": "decoder.onnx",
                "input_names": ["inputs_embeds", "attention_mask", "position_ids"]
                + [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")],
                "num_layers": layers, "num_key_value_heads": 32, "head_dim": 96, "hidden_size": 3072,
                "vocab_size": 32064, "max_position_embeddings": 4096, "dtype": "float32",
            },
            "preprocess": {"input_height": 336, "input_width": 336},
        },
        "sam": {
            "dir": "sam-0",
            "files": {"sam_encoder.onnx": {"size": 360_000_000, "sha256": "s"}, "sam_decoder.onnx": {"size": 16_000_000, "sha256": "t"}},
            "precision": "fp32",
            "source": {"model_type": "vit_b"},
            "encoder": {"file": "sam_encoder.onnx", "input_names": ["image"], "input_size": 1024, "embedding_shape": [1, 256, 64, 64]},
            "decoder": {
                "file": "sam_decoder.onnx",
                "input_names": ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
                "mask_input_size": [256, 256],
            },
        },
    }


def with_engines(manifest: dict, name: str = "sm87-trt10.3.0") -> dict:
    manifest["engines"] = {
        "dir": "engines-0",
        "format": ENGINES_FORMAT,
        "targets": {name: {"precision": "fp16", "graphs": {
            g: {"file": f"{name}/{g}_ctx.onnx", "source_sha256": manifest[GRAPHS[g][0]]["files"][graph_record(manifest, g)["file"]]["sha256"]}
            for g in TRT_GRAPHS_DEFAULT}}},
    }
    return manifest



class FakeTensorRT:
    """Plays onnxruntime's TensorRT provider: for a build it writes the EP-context model, the engine
    (relative `cache/`) and a timing cache where the real provider writes them; loading a context
    model answers with a CPU session of the graph it was built from, optionally perturbed."""

    def __init__(self, perturb: float = 0.0) -> None:
        from octopus_rt.export.trt_session import OrtSessionFactory

        self.cpu = OrtSessionFactory()
        self.builds: list[dict] = []
        self.sources: dict[Path, Path] = {}
        self.perturb = perturb

    def __call__(self, path, providers, disable_optimizations):
        name, options = providers[0]
        if name == "CPUExecutionProvider":
            return self.cpu(path, providers, disable_optimizations)
        assert name == "TensorrtExecutionProvider" and disable_optimizations
        if options.get("trt_dump_ep_context_model"):
            self.builds.append(dict(options))
            ctx = Path(options["trt_ep_context_file_path"])
            cache = ctx.parent / options["trt_engine_cache_path"]
            cache.mkdir(exist_ok=True)
            engine = cache / f"{options['trt_engine_cache_prefix']}_fake.engine"
            engine.write_bytes(b"engine")
            timing = Path(options["trt_timing_cache_path"]) / "TensorrtExecutionProvider_cache_sm87.timing"
            timing.write_bytes(timing.read_bytes() + b"+" if timing.exists() else b"timing")
            ctx.write_bytes(b"EPContext " + engine.relative_to(ctx.parent).as_posix().encode())
            self.sources[ctx] = path
            return self.cpu(path, [("CPUExecutionProvider", {})], True)
        session = self.cpu(self.sources[Path(path)], [("CPUExecutionProvider", {})], True)
        return _Perturbed(session, self.perturb) if self.perturb else session


class _Perturbed:
    def __init__(self, session, scale):
        self.session, self.scale = session, scale

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, names, feeds):
        return [-o + self.scale for o in self.session.run(names, feeds)]


def orin(cc: str = "8.7", trt: str = "10.3.0") -> DeviceInfo:
    return DeviceInfo("3.10", "Linux aarch64", onnxruntime="1.20.0", providers=TRT, gpu_name="Orin",
                       compute_capability=cc, tensorrt=trt, cuda="12.6", jetson="NVIDIA Jetson AGX Orin (R36)",
                       system_memory_bytes=64 * GIB)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
