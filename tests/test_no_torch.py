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


_IMPORT_CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"blocked by test_no_torch: {{name}}")
            return None

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from octopus_rt.runtime.hd_transform import HDTransform
    from octopus_rt.runtime.phi3v_layout import assemble_image_tokens
    from octopus_rt.runtime.phi3v_prompt import phi3v_chat_prompt, phi3v_prompt_ids

    hd = HDTransform(num_crops=4)(np.zeros((20, 30, 3), dtype=np.uint8))
    tokens = assemble_image_tokens(np.zeros((hd.num_used_crops, 144, 8), np.float32), np.ones((2, 8), np.float32), hd.crop_grid)
    assert tokens.shape == (hd.num_img_tokens, 8), tokens.shape
    print("OK", sorted(name for name in sys.modules if name.split(".")[0] in {blocked!r}))
    """
)


def test_phi3v_runtime_modules_without_torch():
    """The Phi-3-Vision preprocessing, layout and prompt modules run with torch & co. unimportable."""
    child = _IMPORT_CHILD.format(blocked=BLOCKED)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK []"
