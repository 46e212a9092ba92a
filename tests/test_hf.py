"""`model=hf`: tiny random Hugging Face models built and saved in the test (no download), fine-tuned through
the CLI with LoRA; the exported adapter loaded by Hugging Face peft in another process, and the merged
`save_pretrained` directory loaded by transformers, give the logits trainctl's model gives."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_tiny
from conftest import trainctl

QUIET = ["logging.progress=none", "logging.tensorboard=false"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny causal LM, a tiny sequence classifier, a text corpus and a labelled CSV."""
    root = tmp_path_factory.mktemp("hf")
    hf_tiny.save_model(root / "llama")
    hf_tiny.save_model(root / "gpt2", arch="gpt2")
    rng = random.Random(0)
    sentences = ["the cat sat on the mat", "a dog ran under the tree", "it was a good day", "the bird flew over the log"]
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(sentences) for _ in range(3)) for _ in range(300)))
    rows = ["text,label"]
    for _ in range(240):
        positive = rng.random() < 0.5
        words = rng.sample(["very", "good", "happy", "day"] if positive else ["not", "bad", "sad", "night"], 3)
        words += rng.sample(hf_tiny.WORDS, 2)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{'pos' if positive else 'neg'}")
    (root / "reviews.csv").write_text("\n".join(rows) + "\n")
    return root


def _lm(files: Path, model: str = "llama") -> list:
    return [*QUIET, "model=hf", f"model.path={files / model}", "data=hf_text", f"data.path={files / 'corpus.txt'}",
            "data.tokenizer=${model.path}", "data.seq_len=16", "data.batch_size=16"]


@pytest.fixture(scope="module")
def lora_lm(files) -> Path:
    run_dir = files / "lora_lm"
    out = trainctl(["run", *_lm(files), "peft=lora", "peft.r=4", "trainer.max_epochs=2", "optimizer.lr=0.01",
                    f"hydra.run.dir={run_dir}"], cwd=files)
    assert out.returncode == 0, out.stderr
    return run_dir


def test_lora_fine_tunes_a_causal_lm_and_saves_only_the_adapters(lora_lm):
    from safetensors.torch import load_file

    saved = load_file(str(lora_lm / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert {k.split(".self_attn.")[1] for k in saved} == {"q_proj.lora_A.default.weight",
                                                         "q_proj.lora_B.default.weight",
                                                         "v_proj.lora_A.default.weight",
                                                         "v_proj.lora_B.default.weight"}, "peft's llama default"
    records = [json.loads(line) for line in (lora_lm / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val/loss"] for r in records if "val/loss" in r]
    assert losses[-1] < losses[0]
    assert (lora_lm / "cache").is_dir(), "the tokenised data is cached in the run directory"


def test_the_exported_adapter_and_the_merged_model_give_trainctls_logits(lora_lm, files, tmp_path):
    from trainctl.job import load_saved_run

    for args in (["-o", str(tmp_path / "adapter")], ["--merge", "-o", str(tmp_path / "merged")]):
        out = trainctl(["export", str(lora_lm), *args], cwd=files)
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()

    run, *_ = load_saved_run(lora_lm, [], str(files))
    run.model.eval()
    ids = torch.tensor([[2, 4, 6, 9, 12, 4, 15, 3], [2, 5, 7, 10, 13, 4, 16, 3]])
    with torch.no_grad():
        ours = run.model(ids)
    torch.save(ids, tmp_path / "ids.pt")
    script = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
ids = torch.load({str(tmp_path / 'ids.pt')!r})
base = AutoModelForCausalLM.from_pretrained({str(files / 'llama')!r}, local_files_only=True)
adapted = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
merged = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r}, local_files_only=True).eval()
with torch.no_grad():
    torch.save({{"adapted": adapted(input_ids=ids).logits, "merged": merged(input_ids=ids).logits}},
               {str(tmp_path / 'theirs.pt')!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    theirs = torch.load(tmp_path / "theirs.pt")
    assert torch.allclose(theirs["adapted"], ours, atol=1e-5)
    assert torch.allclose(theirs["merged"], ours, atol=1e-4)

    evals = [json.loads(trainctl(["eval", str(p), "--json", "-o", str(tmp_path / f"e{i}.json")], cwd=files).stdout)
             for i, p in enumerate((lora_lm, tmp_path / "adapter", tmp_path / "merged"))]
    assert evals[0]["metrics"] == evals[1]["metrics"]
    assert evals[2]["metrics"]["val/loss"] == pytest.approx(evals[0]["metrics"]["val/loss"], abs=1e-4)


def test_a_classifier_from_a_causal_lm_needs_a_new_head_and_trains_with_init_strict_false(files, tmp_path):
    data = ["data=hf_classification", f"data.path={files / 'reviews.csv'}"]
    args = [*QUIET, "model=hf", f"model.path={files / 'gpt2'}", "data.tokenizer=${model.path}", *data]
    strict = trainctl(["run", *args, "peft=lora", f"hydra.run.dir={tmp_path / 'strict'}"], cwd=tmp_path)
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert "model.init_strict" in strict.stderr and "missing (initialised afresh): score.weight" in strict.stderr
    out = trainctl(["run", *args, "peft=lora", "model.init_strict=false", "trainer.max_epochs=4",
                    "optimizer.lr=0.01", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_metric"] > 0.8, "the words that carry the label are learnt"
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any("score" in k and "modules_to_save" in k for k in saved), "the new head trains in full"
    assert any("c_attn.lora_A" in k for k in saved), "peft's gpt2 default (a Conv1D layer)"


def test_qlora_on_a_hugging_face_model_trains_and_merges(files, tmp_path):
    run_dir = tmp_path / "run"
    out = trainctl(["run", *_lm(files), "peft=qlora", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"],
                   cwd=files)
    assert out.returncode == 0, out.stderr
    out = trainctl(["export", str(run_dir), "--merge"], cwd=files)
    assert out.returncode == 0, out.stderr
    ours = json.loads(trainctl(["eval", str(run_dir), "--json"], cwd=files).stdout)["metrics"]["val/loss"]
    merged = json.loads(trainctl(["eval", str(run_dir / "export-merged"), "--json"], cwd=files).stdout)
    assert merged["metrics"]["val/loss"] == pytest.approx(ours, abs=1e-3)


def test_without_transformers_model_hf_names_the_install(files, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "transformers.py").write_text("raise ImportError('blocked for the test')\n")
    out = trainctl(["show", *_lm(files)], cwd=tmp_path, env={"PYTHONPATH": str(blocker)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pip install 'trainctl[hf]'" in out.stderr
