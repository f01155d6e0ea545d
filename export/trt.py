"""`octopus-rt export trt`: build TensorRT engines for a bundle, ahead of deployment, on the target.

Engines are onnxruntime TensorRT **EP-context models** (docs/deploy.md explains the choice): for
each graph, an onnxruntime session with the TensorRT execution provider builds the engine with
explicit optimisation profiles (export/trt_profiles.py) and dumps `<graph>_ctx.onnx`, a one-node
ONNX model whose EPContext node points at the serialized engine file next to it. The runtime
keeps ONE code path: it opens that ONNX file with onnxruntime like any other graph.

Per graph (vision, sam_encoder, sam_decoder; the decoder with --decoder):

1. CPU reference: the bundle's ONNX graph on onnxruntime's CPU provider, on seeded inputs at the
   profile's opt shapes (export/trt_parity.parity_inputs), also giving the graph's declared input shapes.
2. Build: a session with TensorrtExecutionProvider (fp16, engine cache, timing cache shared by all
   graphs and carried over from the previous build, profiles for the dynamic inputs, EP-context
   dump, LayerNorm kept in fp32 for the SAM encoder under fp16) runs once, which builds the engine.
3. Parity: the dumped context model, loaded as the runtime loads it, against the CPU reference
   (export/trt_parity.compare_outputs: cosine similarity, max relative error, mask IoU, top-1 agreement).

Everything is written into a staging folder and committed as the bundle's `engines` section
(octopus_rt.bundle.stage_section / commit_section) under a target named by GPU compute capability
and TensorRT version (e.g. `sm87-trt10.3.0`); targets built earlier on other machines are kept.
Without onnxruntime's TensorRT provider, an NVIDIA GPU or the TensorRT libraries the command fails
before writing anything, with one line naming what is missing.

Sessions are created and run through export/trt_session.py. Lines that need a GPU (never executed
on the machines this was written on): `_build_graph`'s build and context-load runs, and the successful
path of `build_engines` after `require_tensorrt` (and trt_session's GPU sessions).
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt import bundle as bundle_mod
from octopus_rt.errors import InputError, OctopusError
from octopus_rt.export.trt_parity import compare_outputs, parity_inputs
from octopus_rt.export.trt_profiles import TRT_GRAPHS_DEFAULT, dynamic_only, graph_profile, tensorrt_build_options
from octopus_rt.export.trt_session import OrtSessionFactory, Session, SessionFactory, run_reporting
from octopus_rt.manifest import (
    ENGINES_FORMAT,
    GRAPHS,
    EngineGraph,
    EnginesSection,
    EngineTarget,
    Manifest,
    ProfileLimits,
    read_engines,
)
from octopus_rt.memory import default_limits
from octopus_rt.runtime import providers as providers_mod
from octopus_rt.runtime.device_info import DeviceInfo
from octopus_rt.runtime.provider_plan import cuda_options, graph_record, graph_sha256, tensorrt_load_options

__all__ = [
    "TrtBuildOptions",
    "TrtBuildResult",
    "TensorRTUnavailable",
    "require_tensorrt",
    "build_engines",
]

_TIMING_DIR = "timing"
_CACHE_DIR = "cache"


class TensorRTUnavailable(providers_mod.ProviderUnavailable):
    """onnxruntime's TensorRT provider, an NVIDIA GPU or the TensorRT libraries are missing."""


@dataclass
class TrtBuildOptions:
    """Options of `octopus-rt export trt`. max_* default to the manifest (memory.default_limits).

    workspace_gib: TensorRT builder workspace; graphs: which graphs to build (decoder is opt-in:
    the decode loop runs on the CUDA provider by default, see docs/deploy.md).
    """

    fp16: bool = True
    max_batch: int | None = None
    max_seq: int | None = None
    max_past: int | None = None
    workspace_gib: float = 2.0
    graphs: tuple[str, ...] = TRT_GRAPHS_DEFAULT
    device_id: int = 0
    builder_optimization_level: int = 3

    def __post_init__(self) -> None:
        unknown = [g for g in self.graphs if g not in GRAPHS]
        if unknown:
            raise InputError(f"unknown graph(s) {', '.join(unknown)}; known: {', '.join(GRAPHS)}")
        if not self.workspace_gib > 0:
            raise InputError(f"--workspace must be > 0 GiB, got {self.workspace_gib}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise InputError(f"builder optimisation level must be 0..5, got {self.builder_optimization_level}")

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * (1 << 30))


@dataclass
class TrtBuildResult:
    name: str  # the target's name, "sm87-trt10.3.0"
    target: EngineTarget  # as committed to the manifest's engines.targets[name]
    manifest: dict[str, Any]



def require_tensorrt(env: DeviceInfo) -> str:
    """Engine target name for this machine, or TensorRTUnavailable naming what is missing.

    `env`: runtime/device_info.DeviceInfo (probed, or built by a test)."""
    if env.onnxruntime is None:
        raise TensorRTUnavailable("onnxruntime is not installed; install onnxruntime-gpu with TensorRT (docs/deploy.md)")
    if "TensorrtExecutionProvider" in env.unusable:
        raise TensorRTUnavailable(f"onnxruntime's TensorRT provider cannot run here: {env.unusable['TensorrtExecutionProvider']}")
    if "TensorrtExecutionProvider" not in env.providers:
        raise TensorRTUnavailable(
            f"onnxruntime {env.onnxruntime} has no TensorrtExecutionProvider (available: {', '.join(env.providers)}); "
            "install onnxruntime-gpu built with TensorRT (on Jetson NVIDIA's JetPack wheel), see docs/deploy.md"
        )
    if env.compute_capability is None:
        raise TensorRTUnavailable("no NVIDIA GPU found (nvidia-smi / Jetson probes); build engines on the machine that runs them")
    if env.tensorrt is None:
        found = env.tensorrt_library or "no libnvinfer found"
        raise TensorRTUnavailable(f"TensorRT libraries not found ({found}); install the TensorRT docs/deploy.md pairs with your onnxruntime-gpu")
    return env.engine_name


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # engines are large; a hard link survives the old section's removal
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(bundle_dir: Path, manifest: Mapping[str, Any], staging: Path, name: str) -> dict[str, EngineTarget]:
    """Copy the other targets of the current engines section into `staging`, and this target's
    timing cache (reused across builds). Returns the targets kept, by name."""
    engines, _ = read_engines(manifest)
    if engines is None:
        return {}
    old = bundle_dir / (engines.dir or "")  # a section with files has its dir (Section.check)
    kept = {}
    for target, record in engines.targets.items():
        prefix = f"{target}/"
        for rel in engines.files or {}:
            if not rel.startswith(prefix):
                continue
            if target == name and not rel.startswith(f"{name}/{_TIMING_DIR}/"):
                continue
            if not (old / rel).is_file():
                continue
            if target == name:
                # The builder rewrites the timing cache in place: a copy, never a link to the
                # committed file (a failed build must leave the current section intact).
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(old / rel, staging / rel)
            else:
                _link_or_copy(old / rel, staging / rel)
        if target != name:
            kept[target] = record
    return kept


def _io(session: Session) -> tuple[dict[str, list], dict[str, str], list[str]]:
    shapes = {i.name: list(i.shape) for i in session.get_inputs()}
    types = {i.name: i.type for i in session.get_inputs()}
    return shapes, types, [o.name for o in session.get_outputs()]


def _embeddings(bundle_dir: Path, manifest: Mapping[str, Any]) -> np.ndarray | None:
    path = bundle_mod.section_path(bundle_dir, manifest["lmm"], Manifest.lookup(manifest, "lmm", "embedding", "file"))
    return np.load(path, mmap_mode="r") if path.is_file() else None


def _build_graph(
    bundle_dir: Path,
    manifest: Mapping[str, Any],
    graph: str,
    limits: ProfileLimits,
    options: TrtBuildOptions,
    target_dir: Path,
    factory: SessionFactory,
    log: Callable[[str], None],
) -> EngineGraph:
    file = Manifest.lookup(manifest, *GRAPHS[graph], "file")
    source = bundle_mod.section_path(bundle_dir, manifest[GRAPHS[graph][0]], file)
    full = graph_profile(manifest, graph, limits)

    # 1. CPU reference (also tells which inputs the ONNX graph declares dynamic).
    cpu = factory(source, [("CPUExecutionProvider", {})], False)
    declared, types, outputs = _io(cpu)
    missing = [n for n in declared if n not in full]
    if missing:
        raise OctopusError(f"{graph}: graph inputs {missing} are not in the bundle contract")
    profile = dynamic_only(full, declared)

    def opt_shape(name: str) -> tuple[int, ...]:
        # The profile's opt where the graph is dynamic, else the size the graph fixes.
        if name in profile:
            return profile[name].opt
        fixed = declared[name]
        return tuple(fixed) if all(isinstance(d, int) and d > 0 for d in fixed) else full[name].opt

    feeds = parity_inputs(manifest, graph, {n: opt_shape(n) for n in declared}, types,
                          embeddings=_embeddings(bundle_dir, manifest) if graph == "decoder" else None)
    reference = dict(zip(outputs, cpu.run(None, feeds)))
    del cpu
    gc.collect()

    # 2. Build the engine and dump the EP-context model.
    ctx_file = target_dir / f"{graph}_ctx.onnx"
    trt = tensorrt_build_options(
        profile,
        ctx_file=str(ctx_file),
        engine_cache_dir=_CACHE_DIR,
        timing_cache_dir=str(target_dir / _TIMING_DIR),
        cache_prefix=graph,
        fp16=options.fp16,
        layer_norm_fp32=graph == "sam_encoder",
        workspace_bytes=options.workspace_bytes,
        device_id=options.device_id,
        builder_optimization_level=options.builder_optimization_level,
    )
    log(f"{graph}: building the TensorRT engine ({options.precision}"
        + (", LayerNorm fp32" if trt["trt_layer_norm_fp32_fallback"] else "")
        + (f", profile {trt['trt_profile_max_shapes']}" if profile else ", static shapes") + ")")
    started = time.monotonic()
    build_providers = [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda_options(device_id=options.device_id))]
    # The engine is built (and the context model dumped) by the end of the first run at the latest.
    builder, _, logged = run_reporting(lambda: factory(source, build_providers, True), feeds,
                                        f"{graph}: TensorRT could not build the engine")
    del builder
    gc.collect()
    seconds = time.monotonic() - started
    if not ctx_file.is_file():
        said = (f"onnxruntime logged: {providers_mod.summarize_error(logged[0])}" if logged else
                "onnxruntime logged no reason; the dump is written when TensorRT builds the graph, so check that "
                "TensorRT took it (a graph split between TensorRT and CUDA is one cause)")
        raise OctopusError(f"{graph}: the TensorRT provider ran but wrote no EP-context model {ctx_file.name}; {said}")
    blob = ctx_file.read_bytes()
    if b"EPContext" not in blob:
        raise OctopusError(f"{graph}: {ctx_file.name} holds no EPContext node")
    if str(target_dir).encode() in blob:
        # The bundle moves (staging -> section folder, then to the device): paths must be relative.
        raise OctopusError(f"{graph}: {ctx_file.name} refers to its engine by an absolute path")

    # 3. Parity of the context model, loaded as the runtime loads it.
    load = tensorrt_load_options(device_id=options.device_id, fp16=options.fp16, workspace_bytes=options.workspace_bytes)
    load_providers = [("TensorrtExecutionProvider", load), ("CUDAExecutionProvider", cuda_options(device_id=options.device_id))]
    engine, ran, _ = run_reporting(lambda: factory(ctx_file, load_providers, True), feeds,
                                    f"{graph}: the TensorRT engine {ctx_file.name} did not run")
    candidate = dict(zip([o.name for o in engine.get_outputs()], ran))
    del engine
    gc.collect()
    parity = compare_outputs(reference, candidate, options.precision)
    log(f"{graph}: built in {seconds:.0f} s; parity " + ", ".join(
        f"{k} cos {v['cosine']:.5f}" for k, v in parity.outputs.items()))
    if not parity.ok:
        raise OctopusError(f"{graph}: the TensorRT engine disagrees with the CPU path: " + "; ".join(parity.failures))
    return EngineGraph(
        file=f"{target_dir.name}/{ctx_file.name}",
        source=f"{GRAPHS[graph][0]}/{file}",
        source_sha256=graph_sha256(manifest, graph),
        profile={n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for n, r in profile.items()},
        layer_norm_fp32_fallback=bool(trt["trt_layer_norm_fp32_fallback"]),
        build_seconds=round(seconds, 1),
        parity=parity.to_dict(),
    )


def build_engines(
    bundle_dir: str | os.PathLike[str],
    options: TrtBuildOptions | None = None,
    *,
    env: DeviceInfo | None = None,
    session_factory: SessionFactory | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> TrtBuildResult:
    """Build, verify and commit this machine's engines into the bundle's `engines` section.

    env: a runtime.device_info.DeviceInfo (default: probed now); session_factory: creates sessions
    (default OrtSessionFactory; tests substitute one). Raises TensorRTUnavailable before writing
    anything when TensorRT cannot run here, OctopusError when a build or parity check fails (the
    bundle is then unchanged).
    """
    options = options or TrtBuildOptions()
    bundle_dir = Path(bundle_dir).expanduser()
    manifest = bundle_mod.read_manifest(bundle_dir)
    problems = bundle_mod.check_files(bundle_dir, manifest, sections=("lmm", "sam"))
    if problems:
        raise bundle_mod.BundleError(f"{len(problems)} problem(s) with the bundle's files, first: {problems[0]}")
    graphs = [g for g in options.graphs if graph_record(manifest, g) is not None]
    if not graphs:
        raise InputError(f"the bundle has none of the graphs {', '.join(options.graphs)} (export lmm / sam first)")
    limits = default_limits(manifest, max_batch=options.max_batch, max_seq=options.max_seq, max_past=options.max_past)
    if env is None:
        from octopus_rt.runtime.device_info import probe_device

        env = probe_device()
    name = require_tensorrt(env)
    factory = session_factory or OrtSessionFactory()

    with bundle_mod.staged_section(bundle_dir, "engines") as staging:
        kept = _carry_over(bundle_dir, manifest, staging, name)
        target_dir = staging / name
        (target_dir / _TIMING_DIR).mkdir(parents=True, exist_ok=True)
        (target_dir / _CACHE_DIR).mkdir(exist_ok=True)
        log(f"building engines {name} for {env.gpu_name} (TensorRT {env.tensorrt}, onnxruntime {env.onnxruntime}); "
            f"limits {limits.to_dict()}")
        built = {g: _build_graph(bundle_dir, manifest, g, limits, options, target_dir, factory, log) for g in graphs}
        target = EngineTarget(
            graphs=built,
            precision=options.precision,
            tensorrt=env.tensorrt,
            compute_capability=env.compute_capability,
            gpu_name=env.gpu_name,
            jetson=env.jetson,
            cuda=env.cuda,
            driver=env.driver,
            onnxruntime=env.onnxruntime,
            limits=limits,
            workspace_bytes=options.workspace_bytes,
            builder_optimization_level=options.builder_optimization_level,
            built=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        targets = {**kept, name: target}
        section = EnginesSection(
            format=ENGINES_FORMAT,
            versions={**bundle_mod.package_versions("octopus-rt"), "onnxruntime": env.onnxruntime, "tensorrt": env.tensorrt},
            targets=targets,
        )
        new_manifest = bundle_mod.commit_section(bundle_dir, "engines", staging, section.to_dict())
    defaults = Manifest.lookup(new_manifest, "defaults")
    providers = {graph: defaults.provider(graph) for graph in GRAPHS}
    providers.update({g: "tensorrt" for g in built})
    new_manifest = bundle_mod.update_defaults(bundle_dir, {"providers": providers})
    log(f"committed engines {name} ({', '.join(built)}) into {bundle_dir}")
    return TrtBuildResult(name, target, new_manifest)

