"""onnxruntime sessions for the TensorRT engine build (export/trt.py): creating them, running them once.

A SessionFactory is called as (model path, providers [(name, options)], disable_optimizations) and
returns a Session (what the builder needs from an onnxruntime.InferenceSession); tests substitute
their own. `run_reporting` turns a failed build or run into one line with TensorRT's own message.

Lines that need a GPU (never executed on the machines this was written on): the body of
`OrtSessionFactory.__call__` with TensorRT/CUDA providers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from octopus_rt.errors import OctopusError
from octopus_rt.runtime import providers as providers_mod

__all__ = ["Session", "SessionFactory", "OrtSessionFactory", "run_reporting"]

SessionFactory = Callable[[Path, list, bool], Any]


class Session(Protocol):  # what the builder needs from an onnxruntime.InferenceSession
    def get_inputs(self) -> list: ...
    def get_outputs(self) -> list: ...
    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list: ...


class OrtSessionFactory:
    """Creates onnxruntime sessions: (model path, providers [(name, options)], disable_optimizations).

    ORT's own graph optimisations are disabled for TensorRT builds and context models: TensorRT
    optimises the whole graph itself, and fused contrib ops would split it into several engines.
    GPU sessions go through runtime/providers.create_session: fallback off, the first provider
    checked, one line with the cause when the provider cannot start. The EP-context model is
    written by the TensorRT provider from its own options (trt_dump_ep_context_model ...): the
    session-level ep.context_* entries are not set, since they would make onnxruntime check the
    same path a second time and refuse a context model left from an earlier build.
    """

    def __call__(self, path: Path, providers: list, disable_optimizations: bool) -> Session:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Warnings too: the TensorRT provider logs why it built nothing (captured for the error line).
        options.log_severity_level = 3 if providers[0][0] == "CPUExecutionProvider" else 2
        if disable_optimizations:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if providers[0][0] != "CPUExecutionProvider":
            return providers_mod.create_session(path, providers, options, what=path.name)
        names = [p[0] for p in providers]
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=names,
                                        provider_options=[p[1] for p in providers])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors; one line for the user
            raise OctopusError(f"onnxruntime could not load {path.name}: {providers_mod.summarize_error(str(exc))}") from exc


def run_reporting(make: Callable[[], Session], feeds: Mapping[str, np.ndarray], what: str) -> tuple[Session, list, list[str]]:
    """Create a session with `make` and run it once, onnxruntime's native log captured throughout:
    (session, outputs, logged messages). A failure raises OctopusError with the first logged error
    (TensorRT's own message: a missing profile, a workspace too small for a tactic, ...), not
    onnxruntime's generic one; a provider that cannot start raises ProviderUnavailable as is."""
    session = outputs = error = None
    with providers_mod.captured_native_stderr() as log:
        try:
            session = make()
            outputs = session.run(None, feeds)
        except providers_mod.ProviderUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
            error = exc
    messages = providers_mod.logged_messages(log[0] if log else "")
    if error is not None:
        cause = providers_mod.summarize_error(messages[0] if messages else str(error))
        raise OctopusError(f"{what}: {cause}") from error
    providers_mod.replay(log)
    return session, outputs, messages
