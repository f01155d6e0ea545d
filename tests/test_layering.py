"""The layering the README promises, read from the source (every import statement, including those
inside functions): the kernel (octopus_rt/*.py but the CLI root) imports no runtime, export or
training code; the runtime imports no export or training code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offenders(files, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in files:
        bad = sorted(m for m in _imports(path) if m.startswith(forbidden))
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_the_kernel_imports_no_runtime_export_or_training_code():
    kernel = [p for p in (ROOT / "octopus_rt").glob("*.py") if p.name != "cli.py"]
    assert {p.name for p in kernel} >= {"bundle.py", "manifest.py", "memory.py", "schema.py"}
    assert _offenders(kernel, ("octopus_rt.runtime", "octopus_rt.export", "octopus_rt.training")) == {}


def test_the_runtime_imports_no_export_or_training_code():
    runtime = sorted((ROOT / "runtime").rglob("*.py"))
    assert len(runtime) > 20
    assert _offenders(runtime, ("octopus_rt.export", "octopus_rt.training", "torch", "transformers")) == {}


def test_the_detector_sees_an_import_inside_a_function():
    sample = ROOT / "tests" / "test_layering.py"  # this file imports nothing forbidden at any level
    assert _offenders([sample], ("octopus_rt.runtime",)) == {}
    probe = ROOT / "octopus_rt" / "cli.py"  # the CLI root registers the runtime's commands lazily
    assert "octopus_rt.runtime.cli" in _imports(probe)
