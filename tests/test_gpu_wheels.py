"""The GPU extras against the real wheels (issue 17), `pytest -m slow`; needs the package registry.

1. Every GPU extra in pyproject.toml resolves to a pair that can load together, checked from the
   files themselves: the onnxruntime-gpu wheel's provider libraries name (ELF NEEDED) the CUDA,
   cuDNN, cuBLAS and libnvinfer majors they load; the extra's resolved `nvidia-*` wheels and the
   TensorRT bindings wheel (whose tensorrt.so NEEDs the libnvinfer its pinned libs wheel ships)
   must provide exactly those. pip resolves without installing (`--dry-run --report`); wheels are
   downloaded once into ~/.cache/octopus-rt-tests (OCTOPUS_RT_TEST_CACHE overrides).
2. In a throwaway venv with the `gpu` extra's onnxruntime-gpu (its CUDA libraries left out) on this
   GPU-less machine, `--device cuda` / `tensorrt` end in ONE error line naming the cause, and
   device="auto" runs on the CPU saying why: never a silent CPU run.

Skipped with the reason when the registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from octopus_rt.runtime.native_libs import elf_needed

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("OCTOPUS_RT_TEST_CACHE", Path.home() / ".cache" / "octopus-rt-tests"))
_SPLIT = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$")


def _pip(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def registry():
    try:
        done = _pip("index", "versions", "onnxruntime-gpu", timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("the package registry did not answer within 2 minutes")
    if done.returncode != 0:
        pytest.skip(f"the package registry is unreachable: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    CACHE.mkdir(parents=True, exist_ok=True)


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]


def _flatten(extra: str) -> list[str]:
    """Requirements of an extra, with `octopus-rt[other]` expanded."""
    out = []
    for req in _extras()[extra]:
        match = re.match(r"octopus-rt\[([^\]]+)\]", req)
        out += [r for e in match.group(1).split(",") for r in _flatten(e.strip())] if match else [req]
    return out


def _resolve(requirements: list[str]) -> dict[str, str]:
    """{normalized name: version} pip would install, without installing or building anything."""
    report = CACHE / "report.json"
    done = _pip("install", "--dry-run", "--ignore-installed", "--only-binary", ":all:", "--quiet", "--report", str(report),
                *requirements)
    assert done.returncode == 0, done.stderr[-2000:]
    items = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", i["metadata"]["name"].lower()): i["metadata"]["version"] for i in items}


def _download(spec: str, binary: bool = True) -> Path:
    """The wheel (or sdist) of an exact `name==version`, from the cache or the registry."""
    name, version = spec.split("==")
    stem = re.sub(r"[-.]+", "_", name.lower())
    for path in CACHE.glob(f"{stem}-{version}*"):
        return path
    done = _pip("download", "--no-deps", "--only-binary" if binary else "--no-binary", ":all:", "-d", str(CACHE), spec)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(CACHE.glob(f"{stem}-{version}*"))


def _wheel_needed(wheel: Path, member: str, tmp: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(member))
        path = Path(archive.extract(name, tmp))
    needed = elf_needed(path)
    assert needed is not None, f"{name} is not an ELF64 shared library"
    return needed


def _major(needed: list[str], lib: str) -> int | None:
    hit = next((n for n in needed if n.startswith(f"{lib}.so.")), None)
    return int(hit.rsplit(".", 1)[1]) if hit else None


@pytest.mark.parametrize("extra", ["trt", "trt-cu13"])
def test_extra_resolves_to_a_pair_that_loads(extra, registry, tmp_path):
    requirements = _flatten(extra)
    ort_req = next(r for r in requirements if r.startswith("onnxruntime-gpu"))
    trt_req = next(r for r in requirements if r.startswith("tensorrt"))
    resolved = _resolve([ort_req])
    version = resolved["onnxruntime-gpu"]
    wheel = _download(f"onnxruntime-gpu=={version}")
    trt_provider = _wheel_needed(wheel, "capi/libonnxruntime_providers_tensorrt.so", tmp_path)
    cuda_provider = _wheel_needed(wheel, "capi/libonnxruntime_providers_cuda.so", tmp_path)
    cuda = _major(trt_provider, "libcudart")
    assert cuda == _major(cuda_provider, "libcudart") and cuda is not None

    def nvidia(component: str) -> int:
        # CUDA 12 wheels are suffixed -cu12; CUDA 13's are unsuffixed (cuDNN keeps -cu13).
        name = next((n for n in (f"nvidia-{component}-cu{cuda}", f"nvidia-{component}") if n in resolved), None)
        assert name is not None, f"{extra}: onnxruntime-gpu[cuda,cudnn] {version} brings no nvidia-{component} for CUDA {cuda}"
        return int(resolved[name].split(".")[0])

    # The CUDA libraries the [cuda,cudnn] extras install are the majors the providers link.
    assert nvidia("cuda-runtime") == cuda
    assert nvidia("cudnn") == _major(trt_provider, "libcudnn")
    assert nvidia("cublas") == _major(trt_provider, "libcublas") == cuda

    # TensorRT: the package for this CUDA major, whose pinned libs ship the libnvinfer the provider links.
    name, _, spec = _SPLIT.match(trt_req).groups()
    assert name == f"tensorrt-cu{cuda}", f"{extra}: {name} is not the TensorRT for CUDA {cuda}"
    done = _pip("download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp_path), trt_req)
    assert done.returncode == 0, done.stderr[-2000:]
    sdist = next(tmp_path.glob(f"tensorrt_cu{cuda}-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".egg-info/requires.txt"))
        pins = dict(line.split("==") for line in archive.extractfile(member).read().decode().split() if "==" in line)
    trt_version = sdist.name.split("-")[1].removesuffix(".tar.gz")
    assert pins == {f"tensorrt_cu{cuda}_libs": trt_version, f"tensorrt_cu{cuda}_bindings": trt_version}
    bindings = _download(f"tensorrt_cu{cuda}_bindings=={trt_version}")
    shipped = _major(_wheel_needed(bindings, "tensorrt_bindings/tensorrt.so", tmp_path), "libnvinfer")
    assert shipped == _major(trt_provider, "libnvinfer"), (
        f"{extra}: onnxruntime-gpu {version} links libnvinfer.so.{_major(trt_provider, 'libnvinfer')}, "
        f"tensorrt-cu{cuda} {trt_version} ships libnvinfer.so.{shipped}")


def _shadow_package(tmp: Path) -> Path:
    """octopus_rt laid out as installed (octopus_rt/runtime = runtime/, ...) with symlinks."""
    pkg = tmp / "shadow" / "octopus_rt"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "octopus_rt").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub in ("runtime", "export", "training"):
        (pkg / sub).symlink_to(ROOT / sub)
    return pkg.parent


def _gpu_venv() -> Path:
    """A cached venv with the `gpu` extra's onnxruntime-gpu (without its nvidia-* CUDA wheels) and
    the runtime's other needs."""
    version = _resolve([next(r for r in _flatten("gpu") if r.startswith("onnxruntime-gpu"))])["onnxruntime-gpu"]
    venv = CACHE / f"venv-onnxruntime-gpu-{version}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"onnxruntime-gpu=={version}",
                               "numpy", "tokenizers", "Pillow", "typer"], capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-2000:]
        (venv / ".complete").write_text(version)
    return python


_SCRIPT = """
import sys
from octopus_rt.runtime.backends import Backend
from octopus_rt.runtime.providers import ProviderUnavailable
import onnxruntime
print("listed", onnxruntime.__version__, onnxruntime.get_available_providers())
auto = Backend(device="auto").choice
print("auto", auto.name, auto.reason)
for device in ("cuda", "tensorrt"):
    try:
        graph = Backend(device=device).graph("probe", sys.argv[1])
        print("SILENT", device, graph.session.get_providers())
    except ProviderUnavailable as exc:
        print("refused", device, exc)
"""


def test_gpu_requests_without_a_gpu_fail_with_one_line(registry, tmp_path):
    from PIL import Image

    python = _gpu_venv()
    env = {**os.environ, "PYTHONPATH": str(_shadow_package(tmp_path))}
    env.pop("OCTOPUS_RT_BUNDLE", None)
    probe = ROOT / "runtime" / "probe.onnx"
    done = subprocess.run([str(python), "-c", _SCRIPT, str(probe)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert "CUDAExecutionProvider" in out["listed"] and "TensorrtExecutionProvider" in out["listed"]
    assert out["auto"].startswith("cpu auto: CUDA is listed but cannot run (cuda probe: ")
    assert "SILENT" not in out
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused ")]
    for device, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        line = next(ln for ln in refused if ln.startswith(f"refused {device} "))
        assert re.match(rf"refused {device} probe graph probe\.onnx: onnxruntime [\d.]+ cannot run on {provider}"
                        rf"( \(it would have run on CPUExecutionProvider\))?: lib\S+\.so", line), line
    # CUDA is the silent case: onnxruntime only logs and hands back a CPU session; the check catches it.
    assert "(it would have run on CPUExecutionProvider)" in next(ln for ln in refused if ln.startswith("refused cuda "))

    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (120, 60, 30)).save(image)
    # --device tensorrt runs the decoder loop on CUDA (docs/deploy.md), so its first failure may be CUDA's.
    for device, provider in (("cuda", "CUDA"), ("tensorrt", "CUDA|TensorRT")):
        cli = subprocess.run([str(python), "-c", "import sys; from octopus_rt.cli import main; sys.exit(main())",
                              "infer", str(image), "Which region is most degraded?", "--device", device],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        lines = [ln for ln in cli.stderr.splitlines() if ln.strip()]
        assert cli.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), cli.stderr[-3000:]
        assert re.search(f"cannot run \\w+ on ({provider})", lines[0]) and cli.stdout == "", lines[0]
    doctor = subprocess.run([str(python), "-c", "import sys; from octopus_rt.cli import main; sys.exit(main())",
                             "doctor", "--device", "cuda"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert doctor.returncode == 2 and "unusable   CUDAExecutionProvider: cuda probe: " in doctor.stdout
    assert len([ln for ln in doctor.stderr.splitlines() if ln.strip()]) == 1
