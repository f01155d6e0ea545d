"""`octopus-rt infer` runs with torch, transformers and peft made unimportable (the Jetson case)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("torch", "torchvision", "transformers", "peft", "segment_anything")

_CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}
    ATTEMPTS = []

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                ATTEMPTS.append(name)
                raise ImportError(f"blocked by test_no_torch: {{name}}")
            return None

    sys.meta_path.insert(0, Refuse())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import hook does not work")
    ATTEMPTS.clear()

    from octopus_rt.cli import main

    code = main(sys.argv[1:])
    sys.stderr.write("ATTEMPTS " + ",".join(ATTEMPTS) + "\\n")
    raise SystemExit(code)
    """
)


def test_infer_without_torch(runtime_bundle, runtime_images, tmp_path):
    child = _CHILD.format(blocked=BLOCKED)
    mask, overlay = tmp_path / "m.png", tmp_path / "o.png"
    args = [
        "infer", str(runtime_images[0]), "Which region is most degraded?", "--bundle", str(runtime_bundle),
        "--json", "--mask", str(mask), "--overlay", str(overlay), "--max-new-tokens", "8", "--threads", "1",
    ]
    result = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["text"] and overlay.is_file()
    assert (record["mask"] is None) == (record["point"] is None) or record["whole_image"]
    attempts = [line for line in result.stderr.splitlines() if line.startswith("ATTEMPTS ")]
    # Nothing even tried to import a blocked package (an optional try/except import would hide it).
    assert attempts == ["ATTEMPTS "], attempts
    for name in BLOCKED:
        assert f"'{name}'" not in result.stderr
