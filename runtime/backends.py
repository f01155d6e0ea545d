"""One small interface over onnxruntime execution providers: cpu, cuda, tensorrt.

`Backend` resolves a device name to an execution-provider list once, creates one
`InferenceSession` per graph lazily (on first use, so a bundle whose SAM stage is never used never
loads SAM), and runs graphs through IO binding with `OrtValue`s. A GPU provider can therefore keep
tensors (the decoder's KV cache) on the device between calls: outputs are bound to `device_type`
and fed back as inputs without a copy to host memory.

onnxruntime itself is imported lazily, on the first session or provider query, so importing the
runtime package stays cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from octopus_rt.errors import OctopusError
from octopus_rt.manifest import GRAPHS
from octopus_rt.runtime import providers as providers_mod
from octopus_rt.runtime.device_info import DeviceInfo
from octopus_rt.runtime.provider_plan import GraphPlan, plan_graph, requested_provider
from octopus_rt.runtime.providers import DEVICES, PROVIDERS

__all__ = ["DeviceChoice", "resolve_device", "Graph", "Backend"]

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class DeviceChoice:
    """A resolved device: name ("cpu", "cuda", "tensorrt"), the provider list in priority order, and
    where bound outputs live ("cpu" or "cuda")."""

    name: str
    providers: tuple[str, ...]
    device_type: str
    reason: str


def resolve_device(
    device: str = "auto",
    available: Sequence[str] | None = None,
    probe: Callable[[str], str | None] | None = None,
) -> DeviceChoice:
    """Map a device name to providers. "auto" takes CUDA when a tiny CUDA session really runs here
    (`providers.probe`; onnxruntime-gpu lists CUDA even without a GPU), else CPU with the reason.

    TensorRT is never chosen by "auto": building engines takes minutes on first use, so it is opt-in
    (`device="tensorrt"`). A requested provider that is missing raises OctopusError with one line;
    one that is listed but cannot start fails when its first session is created (providers.create_session).
    """
    if device not in DEVICES:
        raise OctopusError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if available is None:
        available = providers_mod.ort().get_available_providers()
    available = tuple(available)
    if device == "auto":
        if PROVIDERS["cuda"] not in available:
            return DeviceChoice("cpu", (PROVIDERS["cpu"],), "cpu", "auto: no GPU provider in this onnxruntime")
        why_not = (probe or providers_mod.probe)("cuda")
        if why_not is None:
            return DeviceChoice("cuda", (PROVIDERS["cuda"], PROVIDERS["cpu"]), "cuda", "auto: a CUDA session runs here")
        return DeviceChoice("cpu", (PROVIDERS["cpu"],), "cpu", f"auto: CUDA is listed but cannot run ({why_not})")
    wanted = PROVIDERS[device]
    if wanted not in available:
        hint = " (install octopus-rt[gpu], which brings onnxruntime-gpu, instead of [cpu])" if device != "cpu" else ""
        raise OctopusError(
            f"device {device!r} needs onnxruntime's {wanted}, which this install lacks "
            f"(available: {', '.join(available) or 'none'}){hint}"
        )
    if device == "tensorrt":
        providers = (wanted, PROVIDERS["cuda"], PROVIDERS["cpu"])
        return DeviceChoice("tensorrt", tuple(p for p in providers if p in available), "cuda", "requested")
    if device == "cuda":
        return DeviceChoice("cuda", (wanted, PROVIDERS["cpu"]), "cuda", "requested")
    return DeviceChoice("cpu", (wanted,), "cpu", "requested")


class Graph:
    """One ONNX graph behind an `InferenceSession`, run with IO binding.

    `run(inputs, outputs)` takes {name: numpy array or OrtValue} and returns a list of OrtValues in
    the order of `outputs` (bound to the backend's device; `.numpy()` copies one to host memory).
    Input and output names, and the element type of every input, come from the session.
    """

    def __init__(self, name: str, session: Any, device_type: str) -> None:
        self.name = name
        self.session = session
        self.device_type = device_type
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_types = {i.name: _ORT_TYPES.get(i.type, np.float32) for i in session.get_inputs()}

    def to_device(self, array: np.ndarray) -> Any:
        """numpy array -> OrtValue on this graph's device."""
        return providers_mod.ort().OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def run(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> list[Any]:
        ort = providers_mod.ort()
        binding = self.session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(value, dtype=self.input_types.get(name, value.dtype)), self.device_type, 0
                )
            binding.bind_ortvalue_input(name, value)
        names = list(outputs) if outputs is not None else self.output_names
        for name in names:
            binding.bind_output(name, self.device_type)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors; one line for the user
            provider = self.session.get_providers()[0]
            raise OctopusError(f"{self.name} graph failed on {provider}: {providers_mod.summarize_error(str(exc))}") from exc
        return list(binding.get_outputs())

    def run_numpy(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """`run`, with every output copied to host numpy arrays."""
        return [value.numpy() for value in self.run(inputs, outputs)]


@dataclass
class Backend:
    """Sessions of one bundle on one device. `threads`: intra-op threads (None: onnxruntime's default).

    `profile_dir`: when set, every session writes onnxruntime's per-node profile (Chrome trace JSON)
    there; `end_profiling()` stops it and returns the files.
    With `bundle_dir`, `manifest` and `device_info` (runtime/device_info.DeviceInfo: what the caller
    probed, e.g. `Octopus` on a GPU device) all given, GPU devices take each graph's file and provider
    options from runtime/provider_plan.plan_graph: the bundle's TensorRT EP-context engines where they
    match this machine (vision, SAM), CUDA with tuned options for the decoder loop (docs/deploy.md).
    Without them a graph runs on the resolved device's providers. The backend never probes the
    machine itself.
    """

    device: str = "auto"
    threads: int | None = None
    profile_dir: Path | None = None
    bundle_dir: Path | None = None
    manifest: dict[str, Any] | None = None
    device_info: DeviceInfo | None = None
    plans: dict[str, GraphPlan] = field(default_factory=dict, init=False, repr=False)
    _choice: DeviceChoice | None = field(default=None, init=False, repr=False)
    _graphs: dict[str, Graph] = field(default_factory=dict, init=False, repr=False)
    load_ms: float = field(default=0.0, init=False)
    """Total wall time spent creating sessions so far (milliseconds)."""

    @property
    def choice(self) -> DeviceChoice:
        """The resolved device; from `device_info` when given (its listed providers and probe
        results), else from onnxruntime and a probe here."""
        if self._choice is None:
            info = self.device_info
            if info is None:
                self._choice = resolve_device(self.device)
            else:
                self._choice = resolve_device(self.device, info.providers, lambda d: info.unusable.get(PROVIDERS[d]))
        return self._choice

    def graph(self, name: str, path: str | os.PathLike[str]) -> Graph:
        """The session for graph `name` (created on first call)."""
        if name in self._graphs:
            return self._graphs[name]
        start = time.perf_counter()
        ort = providers_mod.ort()
        choice = self.choice
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if name == "decoder" and choice.name == "cpu":
            # Measured on the 97M-parameter benchmark bundle (2 threads, CPU provider): creating the
            # decoder session took 720-1130 ms at ORT_ENABLE_ALL and 445-575 ms at ORT_ENABLE_BASIC,
            # with the same decode step (24-33 ms, within noise); the level-3 layout work on the
            # weights only adds start-up. The vision and SAM graphs do run faster at ENABLE_ALL.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        # Idle worker threads otherwise busy-wait after each run; with several sessions (vision,
        # decoder, SAM) and Python work in between, that steals the cores the next stage needs
        # (measured on a shared 2-core machine: numpy/Pillow stages ran 5-10x slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.profile_dir is not None:
            Path(self.profile_dir).mkdir(parents=True, exist_ok=True)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(self.profile_dir) / name)
        providers: list[Any] = list(choice.providers)
        plan = self.plan(name)
        if plan is not None:
            path, providers = plan.file, plan.providers
            if plan.disable_graph_optimizations:  # an EP-context model must stay one node
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if choice.name == "cpu":
            try:
                session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
                raise OctopusError(f"cannot load {name} graph {path}: {providers_mod.summarize_error(str(exc))}") from exc
        else:
            # Fallback off and the first provider checked: a GPU request runs on the GPU or fails
            # with one line, never silently on the CPU.
            session = providers_mod.create_session(path, providers, options, what=f"{name} graph {Path(path).name}")
        # A graph the plan keeps on the CPU (a gqa decoder) takes host inputs whatever the device.
        graph = Graph(name, session, "cpu" if plan is not None and plan.provider == "cpu" else choice.device_type)
        self._graphs[name] = graph
        self.load_ms += (time.perf_counter() - start) * 1000.0
        return graph

    def plan(self, name: str) -> GraphPlan | None:
        """The provider plan of graph `name` (provider_plan.plan_graph), or None: a CPU device, or no
        bundle / device information to plan with. Raises InputError when the device asked for
        cannot run the graph (e.g. tensorrt without engines for this machine)."""
        device = self.choice.name
        if device == "cpu" or self.manifest is None or self.bundle_dir is None or self.device_info is None \
                or name not in GRAPHS:
            return None
        requested = "auto" if self.device == "auto" else device
        plan = plan_graph(self.bundle_dir, self.manifest, name, self.device_info,
                          requested=requested_provider(self.manifest, name, requested))
        self.plans[name] = plan
        return plan

    @property
    def loaded(self) -> dict[str, Graph]:
        return dict(self._graphs)

    def end_profiling(self) -> list[Path]:
        """Stop profiling on every loaded session; returns the profile files written."""
        files = []
        for graph in self._graphs.values():
            if self.profile_dir is not None:
                files.append(Path(graph.session.end_profiling()))
        return files
