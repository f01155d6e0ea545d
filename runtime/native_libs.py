"""Which native libraries onnxruntime's GPU providers will load, read from the files themselves.

onnxruntime's CUDA and TensorRT providers are shared libraries next to the `onnxruntime` module
(`onnxruntime/capi/libonnxruntime_providers_<name>.so`) that the dynamic loader opens on first use.
What they need is written in their ELF dynamic section (DT_NEEDED): e.g. onnxruntime-gpu 1.26 ->
`libnvinfer.so.10`, `libcudart.so.12`, `libcudnn.so.9`; 1.31 -> `libcudart.so.13`. The Python
`tensorrt` module may be another TensorRT altogether (pip's `tensorrt` 11 next to a provider that
needs `libnvinfer.so.10`), so the provider's NEEDED entries, not that module, say which TensorRT counts.

Pure stdlib: `elf_needed` parses ELF64 little-endian files (x86_64, aarch64) with `struct`, so no
binutils are needed at run time. `preload` makes pip-installed CUDA / cuDNN / TensorRT libraries
visible to the loader (onnxruntime's own `preload_dlls`, and the `tensorrt_libs` package's folder),
which is what `LD_LIBRARY_PATH` did by hand before.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "elf_needed",
    "provider_library",
    "needed_libnvinfer",
    "TensorRTLibrary",
    "find_tensorrt_library",
    "tensorrt_version_from_int",
    "library_load_error",
    "preload",
]

# Sonames probed when the provider's NEEDED entries cannot be read (no onnxruntime-gpu, another OS).
LIBNVINFER_PROBE = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so.8")
_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5


def elf_needed(path: str | os.PathLike[str]) -> list[str] | None:
    """DT_NEEDED entries of an ELF64 little-endian shared library, in file order; None when `path`
    is not such a file (missing, 32-bit, big-endian, no dynamic section)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(data):
            return None
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, base)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None
    needed_offsets: list[int] = []
    strtab_vaddr = None
    for pos in range(dynamic[0], min(dynamic[0] + dynamic[1], len(data) - 15), 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed_offsets.append(value)
        elif tag == _DT_STRTAB:
            strtab_vaddr = value
    if strtab_vaddr is None:
        return None
    # DT_STRTAB is a virtual address: map it to a file offset through the loadable segments.
    strtab = next((off + strtab_vaddr - va for va, off, size in loads if va <= strtab_vaddr < va + size), None)
    if strtab is None:
        return None
    names = []
    for offset in needed_offsets:
        start = strtab + offset
        end = data.find(b"\x00", start)
        names.append(data[start:end].decode("utf-8", "replace"))
    return names


def _onnxruntime_capi() -> Path | None:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "capi"


def provider_library(provider: str, capi: Path | None = None) -> Path | None:
    """Path of onnxruntime's shared library for "cuda" / "tensorrt", or None if this onnxruntime
    has none (the CPU wheel)."""
    capi = capi if capi is not None else _onnxruntime_capi()
    if capi is None:
        return None
    path = capi / f"libonnxruntime_providers_{provider}.so"
    return path if path.is_file() else None


def needed_libnvinfer(capi: Path | None = None) -> str | None:
    """The libnvinfer soname the TensorRT provider links (e.g. "libnvinfer.so.10"), or None."""
    library = provider_library("tensorrt", capi)
    needed = elf_needed(library) if library is not None else None
    return next((n for n in needed or () if n.startswith("libnvinfer.so")), None)


def tensorrt_version_from_int(value: int) -> str:
    """getInferLibVersion() -> "10.3.0" (TensorRT >= 10 encodes major*10000 + minor*100 + patch,
    TensorRT 8 major*1000 + minor*100 + patch)."""
    if value >= 100000:
        return f"{value // 10000}.{value // 100 % 100}.{value % 100}"
    return f"{value // 1000}.{value // 100 % 10}.{value % 100}"


@dataclass(frozen=True)
class TensorRTLibrary:
    """The libnvinfer the TensorRT provider will load: `needed` soname (None when unknown),
    `version` of the library found under that name (None: not found), where it came from, and any
    other libnvinfer found that the provider cannot use (`others`: {soname: version})."""

    needed: str | None
    version: str | None
    location: str | None
    others: dict[str, str]

    def describe(self) -> str:
        if self.version is not None:
            text = f"{self.version} ({self.needed or 'libnvinfer'} from {self.location})"
        elif self.needed is not None:
            text = f"not found: onnxruntime's TensorRT provider needs {self.needed}"
        else:
            text = "not found"
        unusable = {k: v for k, v in self.others.items() if k != self.needed}
        if unusable and self.needed is not None:
            text += "; also found " + ", ".join(f"{k} ({v})" for k, v in unusable.items()) + ", which the provider cannot load"
        return text


def _tensorrt_libs_dir() -> Path | None:
    """Folder of pip's `tensorrt_libs` package (the tensorrt-cuXX-libs wheel), if installed."""
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _library_version(name_or_path: str) -> str | None:
    try:
        handle = ctypes.CDLL(name_or_path)
        handle.getInferLibVersion.restype = ctypes.c_int32
        return tensorrt_version_from_int(int(handle.getInferLibVersion()))
    except (OSError, AttributeError):
        return None


def find_tensorrt_library(capi: Path | None = None, libs_dir: Path | None = None) -> TensorRTLibrary:
    """Which libnvinfer onnxruntime's TensorRT provider loads here, and its version.

    The soname comes from the provider's NEEDED entries; it is looked up first in pip's
    `tensorrt_libs` folder (what `preload` loads), then on the loader's search path. Without a
    provider library (CPU onnxruntime, other builds) every soname of LIBNVINFER_PROBE is tried."""
    needed = needed_libnvinfer(capi)
    libs_dir = libs_dir if libs_dir is not None else _tensorrt_libs_dir()
    found: dict[str, tuple[str, str]] = {}
    for soname in ([needed] if needed else []) + [s for s in LIBNVINFER_PROBE if s != needed]:
        if libs_dir is not None and (libs_dir / soname).is_file():
            version = _library_version(str(libs_dir / soname))
            if version:
                found[soname] = (version, str(libs_dir))
                continue
        version = _library_version(soname)
        if version:
            found[soname] = (version, "the loader's search path")
    others = {k: v[0] for k, v in found.items()}
    if needed is not None:
        version, location = found.get(needed, (None, None))
        return TensorRTLibrary(needed, version, location, others)
    if found:
        soname, (version, location) = next(iter(found.items()))
        return TensorRTLibrary(soname if soname else None, version, location, others)
    return TensorRTLibrary(None, None, None, {})


def library_load_error(provider: str, capi: Path | None = None) -> str | None:
    """Why the dynamic loader cannot open onnxruntime's provider library ("libcublasLt.so.12:
    cannot open shared object file: ..."), or None when it loads (or does not exist)."""
    capi = capi if capi is not None else _onnxruntime_capi()
    library = provider_library(provider, capi)
    if library is None or capi is None:
        return None
    try:
        shared = capi / "libonnxruntime_providers_shared.so"
        if shared.is_file():  # onnxruntime loads it first, by path; so must we
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(library))
    except OSError as exc:
        return str(exc).replace(f"{library}: ", "").strip()
    return None


_preloaded: set[str] = set()


def preload(provider: str) -> list[str]:
    """Load pip-installed libraries the provider needs, once per process; returns what was loaded.

    cuda / tensorrt: onnxruntime.preload_dlls() (onnxruntime-gpu >= 1.21) loads cuBLAS, cuDNN, cuRAND,
    cuFFT and the CUDA runtime from the `nvidia-*` wheels that onnxruntime-gpu[cuda,cudnn] installs;
    tensorrt also loads libnvinfer / libnvonnxparser / libnvinfer_plugin from pip's `tensorrt_libs`.
    The loader then resolves the provider's NEEDED entries against these already-loaded sonames.
    Missing pieces are not an error here: session creation reports them (`library_load_error`).
    """
    loaded: list[str] = []
    if provider not in ("cuda", "tensorrt"):
        return loaded
    if "nvidia-wheels" not in _preloaded:
        _preloaded.add("nvidia-wheels")
        try:
            import onnxruntime
        except ImportError:
            return loaded
        if hasattr(onnxruntime, "preload_dlls"):
            # It prints what it cannot find; the real cause is reported when a session fails.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
                onnxruntime.preload_dlls()
            loaded.append("onnxruntime.preload_dlls")
    if provider == "tensorrt" and "tensorrt_libs" not in _preloaded:
        _preloaded.add("tensorrt_libs")
        libs_dir = _tensorrt_libs_dir()
        for pattern in ("libnvinfer.so.*", "libnvinfer_plugin.so.*", "libnvonnxparser.so.*"):
            for path in sorted(libs_dir.glob(pattern)) if libs_dir is not None else ():
                with contextlib.suppress(OSError):
                    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
                    loaded.append(path.name)
    return loaded
