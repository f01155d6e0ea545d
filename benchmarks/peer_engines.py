"""The engines benchmarks/bench_peers.py compares, behind one interface on the same token ids.

Each has `prefill(ids)` (the prompt through the model, the result kept alive by the caller) and
`decode(ids, steps) -> [ms per step]` (greedy, after its own prefill, one token per step), and says
where its weights are (`weight_file`, an ONNX graph; `Torch.weight_bytes`, counted from PyTorch):
- `Ours`: the runtime's decoder (runtime/generate.py) over an octopus-rt bundle;
- `Genai`: onnxruntime-genai over the folder its builder wrote;
- `Torch`: transformers' Qwen2ForCausalLM (fp32, or torch dynamic int8 on the Linear layers).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Ours", "Genai", "Torch", "make_engine", "batch_throughput"]


class Ours:
    """The runtime's own decoder (runtime/generate.py) over a bundle's decoder graph."""

    def __init__(self, bundle: Path, threads: int) -> None:
        from octopus_rt.runtime import Octopus

        from octopus_rt.bundle import section_path

        self.octo = Octopus(bundle, device="cpu", threads=threads)
        self.decoder = self.octo.decoder
        self.weight_file = section_path(bundle, self.octo.manifest["lmm"], self.octo.lmm.decoder.file)

    def prefill(self, ids: list[int]):
        return self.decoder.forward(self.decoder.embed(ids), self.decoder.empty_state(len(ids) + 64))

    def decode(self, ids: list[int], steps: int) -> list[float]:
        logits, state = self.prefill(ids)
        times = []
        for _ in range(steps):
            token = int(np.argmax(logits))
            tick = time.perf_counter()
            logits, state = self.decoder.forward(self.decoder.embed([token]), state)
            times.append((time.perf_counter() - tick) * 1000)
        return times


def batch_throughput(runner: Ours, ids: list[int], steps: int, rounds: int, batch: int = 4) -> dict[str, Any]:
    """Decode tokens/s of `batch` sequences decoded together vs one, interleaved (runtime greedy_batch).

    The sequences are the prompt with different last tokens (so their caches differ); each decodes
    `steps` tokens (no eos stop, so both sizes decode the same number of tokens per sequence).
    """
    decoder = runner.decoder
    prompts = [ids[:-1] + [ids[-1] + k] for k in range(batch)]
    samples: dict[int, list[float]] = {1: [], batch: []}
    for _ in range(rounds):
        for size in (1, batch):
            firsts = [decoder.forward(decoder.embed(p), decoder.empty_state(len(p) + steps + 1)) for p in prompts[:size]]
            tick = time.perf_counter()
            results = decoder.greedy_batch([f[0] for f in firsts], [f[1] for f in firsts], [steps] * size, [])
            elapsed = time.perf_counter() - tick
            samples[size].append(sum(len(r.token_ids) - 1 for r in results) / elapsed)
    single, many = statistics.median(samples[1]), statistics.median(samples[batch])
    return {"batch": batch, "tokens_per_s_batch1": single, f"tokens_per_s_batch{batch}": many,
            "ratio": many / single, "ratio_range": [min(samples[batch]) / max(samples[1]),
                                                   max(samples[batch]) / min(samples[1])]}


class Genai:
    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.weight_file = folder / "model.onnx"

    def _generator(self, ids: list[int], steps: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + steps + 1)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: list[int]):
        generator = self._generator(ids, 1)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        return generator

    def decode(self, ids: list[int], steps: int) -> list[float]:
        generator = self._generator(ids, steps)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        times = []
        for _ in range(steps):
            tick = time.perf_counter()
            generator.generate_next_token()
            times.append((time.perf_counter() - tick) * 1000)
        return times


class Torch:
    def __init__(self, text_dir: Path, precision: str, threads: int) -> None:
        import torch
        from transformers import Qwen2ForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        model = Qwen2ForCausalLM.from_pretrained(text_dir, dtype=torch.float32).eval()
        linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        # Bytes read per token: every weight but the embedding table; Linear weights at 1 byte in int8.
        self.weight_bytes = sum(p.numel() * (1 if precision == "int8" and n in linear else p.element_size())
                                for n, p in model.named_parameters() if "embed" not in n)
        if precision == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model

    def prefill(self, ids: list[int]):
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        return out

    def decode(self, ids: list[int], steps: int) -> list[float]:
        torch = self.torch
        times = []
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            for _ in range(steps):
                token = int(out.logits[0, -1].argmax())
                tick = time.perf_counter()
                out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                times.append((time.perf_counter() - tick) * 1000)
        return times


def make_engine(name: str, precision: str, paths: dict[str, Path], threads: int):
    if name.startswith("octopus-rt"):
        form = name[name.index("[") + 1:-1]
        return Ours(paths["work"] / f"ours-{precision}-{form}", threads)
    if name == "onnxruntime-genai":
        return Genai(paths[f"genai-{precision}"], threads)
    return Torch(paths["text"], precision, threads)
