"""`octopus-rt train` from the command line: a short run, and bad input as one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from octopus_rt.cli import main
from training_helpers import conv, make_base, write_records

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("cli") / "base", text_model="qwen2", chat_template="llava")


@pytest.fixture()
def data(tmp_path):
    records = [{"conversations": conv("Which region is most degraded?", f"The {w} region.")}
               for w in ("top left", "top right", "bottom left", "bottom right")]
    path = write_records(tmp_path / "data", records)
    referring = {"task": "referring", "conversations": conv("What distortions does the top left region have?", "Noise.")}
    write_records(path, records[:1] + [referring], split="val", seed=1)
    return path


def _run(capsys, *args) -> tuple[int, str]:
    code = main(["train", *map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def _one_error_line(text: str) -> bool:
    """Exactly one `error: ...` line and no traceback."""
    return sum(line.startswith("error: ") for line in text.splitlines()) == 1 and "Traceback" not in text


def test_cli_trains_merges_and_logs(base_dir, data, tmp_path, capsys):
    out = tmp_path / "merged"
    code, text = _run(capsys, base_dir, "--data", f"{data}:1.5", "--out", out, "--max-steps", "2",
                      "--batch-size", "2", "--eval-every", "1", "--save-every", "1")
    assert code == 0, text
    assert "merged model written to" in text and (out / "model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "merged.train" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["type"] == "train"] == [1, 2]
    evals = [e for e in log if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2]
    assert evals[-1]["pos_n"] == 1 and evals[-1]["referring_n"] == 1  # a greedy answer was generated
    options = json.loads((tmp_path / "merged.train" / "options.json").read_text())
    assert options["data"] == [{"path": str(data), "weight": 1.5}] and options["lm_tuning"] == "lora"
    # The output exists now: a second run refuses and leaves it as it is.
    before = (out / "model.safetensors").read_bytes()
    code, text = _run(capsys, base_dir, "--data", data, "--out", out, "--max-steps", "1")
    assert code == 2 and "already exists" in text and _one_error_line(text)
    assert (out / "model.safetensors").read_bytes() == before


def test_bad_records_and_images(base_dir, data, tmp_path, capsys):
    lines = (data / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:2] + ['{"image": "images/train_0000.png"}'] + lines[2:]) + "\n")
    code, text = _run(capsys, base_dir, "--data", data, "--out", tmp_path / "o1", "--max-steps", "1")
    assert code == 2 and "train.jsonl:3:" in text and "'conversations'" in text and _one_error_line(text)
    # An image that exists but is not an image: stop names file and line; skip trains without it.
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "images" / "train_0001.png").write_bytes(b"this is not a png")
    code, text = _run(capsys, base_dir, "--data", data, "--out", tmp_path / "o2", "--max-steps", "2")
    assert code == 2 and "train.jsonl:2: cannot load image" in text and _one_error_line(text)
    assert not (tmp_path / "o2").exists()
    code, text = _run(capsys, base_dir, "--data", data, "--out", tmp_path / "o3", "--max-steps", "2",
                      "--on-error", "skip")
    assert code == 0, text
    assert "skipped" in text and (tmp_path / "o3" / "model.safetensors").is_file()


def test_unsupported_base_models(tmp_path, data, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=64).save_pretrained(tmp_path / "llama")
    code, text = _run(capsys, tmp_path / "llama", "--data", data, "--out", tmp_path / "o")
    assert code == 2 and "unsupported base model" in text and "LlavaForConditionalGeneration" in text
    code, text = _run(capsys, tmp_path / "nowhere", "--data", data, "--out", tmp_path / "o")
    assert code == 2 and "not a model directory" in text


def test_unsupported_language_model_inside_llava(base_dir, tmp_path, data, capsys):
    import shutil

    shutil.copytree(base_dir, tmp_path / "odd")
    config = json.loads((tmp_path / "odd" / "config.json").read_text())
    config["text_config"]["model_type"] = "mistral"
    (tmp_path / "odd" / "config.json").write_text(json.dumps(config))
    code, text = _run(capsys, tmp_path / "odd", "--data", data, "--out", tmp_path / "o")
    assert code == 2 and "unsupported language model 'mistral'" in text


def test_option_and_work_dir_errors(base_dir, data, tmp_path, capsys):
    cases = [
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--on-error", "ignore"], "--on-error must be skip or stop"),
        (["--precision", "fp16"], "fp16 needs a GPU"),
        (["--resume"], "no complete checkpoint"),
        (["--data", f"{tmp_path}/missing"], "not found"),
        (["--batch-size", "4", "--grad-accum", "2"], "smaller than one global batch"),
    ]
    for extra, message in cases:
        code, text = _run(capsys, base_dir, "--data", data, "--out", tmp_path / "o", *extra)
        assert code == 2 and message in text and _one_error_line(text), (extra, text)
    (tmp_path / "o.train").mkdir()
    (tmp_path / "o.train" / "log.jsonl").write_text("{}\n")
    code, text = _run(capsys, base_dir, "--data", data, "--out", tmp_path / "o")
    assert code == 2 and "pass --resume" in text
