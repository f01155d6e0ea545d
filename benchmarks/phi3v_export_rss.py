"""Peak RSS and time of `export lmm` on a Phi-3-Vision checkpoint with the full CLIP ViT-L/14-336 tower.

Builds (once, `--keep DIR`) training/phi3v_factory.build_clip_l_phi3v_checkpoint with seeded random weights
(the full official vision tower, 303 M parameters, + the tiny Phi-3 of training/phi3v_factory.py, or a
larger one with `--text`) and exports it in a fresh process per run, recording the process RSS (VmRSS) and the peak so far
(VmHWM) at every progress step of the exporter, so each phase's share of the peak is visible:
load, PyTorch reference, ONNX export, conversion, onnxruntime verification. `--external` lowers the
external-data threshold to 0 so every graph takes the path the 15 GB Phi-3.5 decoder takes (weights
streamed to `<graph>.data`). Usage:

    .venv/bin/python benchmarks/phi3v_export_rss.py [--precision fp16] [--external] [--keep DIR] [--out BUNDLE] [--text JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_rss import run_child  # noqa: E402 - the fresh-process RSS measurement shared by the phi3v_*_rss benchmarks

_CHILD = """
import torch
torch.set_num_threads(int(sys.argv[5]))
from octopus_rt.export import onnx_export
from octopus_rt.export.lmm import export_lmm
if sys.argv[4] == "1":
    onnx_export.EXTERNAL_DATA_THRESHOLD = 0

start = time.perf_counter()
steps = []
def progress(message):
    peak = peak_rss_mb()
    steps.append({"t_s": round(time.perf_counter() - start, 1), "rss_mb": round(rss_mb()), "peak_mb": round(peak),
                  "step": message[:90]})
progress("start (imports done)")
section = export_lmm(sys.argv[1], sys.argv[2], precision=sys.argv[3], progress=progress)
progress("done")
params = section["source"]["num_parameters"]
print(json.dumps({"precision": sys.argv[3], "external": sys.argv[4] == "1", "num_parameters": params,
                  "fp32_param_mb": round(params * 4 / 2**20), "peak_rss_mb": steps[-1]["peak_mb"],
                  "seconds": steps[-1]["t_s"], "tokens_identical": section["verification"]["tokens_identical"],
                  "top1": section["verification"]["top1_agreement"], "steps": steps}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--external", action="store_true", help="external data for every graph")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    parser.add_argument("--out", type=Path, help="keep the bundle here (must not exist; e.g. for phi3v_memory.py --measure)")
    parser.add_argument("--text", type=json.loads, default=None,
                        help='sizes of the Phi-3 (TinyPhi3VSpec fields), e.g. \'{"text_hidden": 1536, "text_layers": 16, '
                             '"text_heads": 16, "text_kv_heads": 16, "text_intermediate": 4096}\'')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "phi3v-clipl"
        if not (folder / "config.json").is_file():
            from octopus_rt.training.phi3v_factory import build_clip_l_phi3v_checkpoint

            build_clip_l_phi3v_checkpoint(folder, seed=0, text=args.text)
        out = args.out or Path(tmp) / "bundle"
        print(json.dumps(run_child(_CHILD, folder, out, args.precision, int(args.external), args.threads)))


if __name__ == "__main__":
    main()
