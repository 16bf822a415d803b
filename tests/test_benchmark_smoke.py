"""`nova-embeddings bench` on a CPU: the tiny run end to end, OOM reporting, and the full-size set-up on the meta device.

The GPU run is what the benchmark is for; these tests make sure that run will not fail for a reason a CPU can
catch (a workload that crashes, a table that is missing, a reference that does not compute the same vectors,
a full-size reference that does not share our weights). No timing is asserted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TABLE_HEADER = "| path | tokens/s | items/s | p50 ms | p99 ms | peak GiB | vs ref | cos min | cos mean |"


def run_benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the script as the GPU machine will (python -m nova_embeddings bench from the repository root, $OUT set)."""
    env = dict(os.environ, OUT=str(tmp_path))
    command = [sys.executable, "-m", "nova_embeddings", "bench", "--tiny", "--device", "cpu", "--dtype", "float32"]
    done = subprocess.run([*command, *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    results = tmp_path / "benchmark.json"
    data = json.loads(results.read_text()) if results.is_file() else {}
    return done, data


def summary(stdout: str) -> str:
    """The tables printed again at the end (what a truncated log still shows)."""
    return stdout[stdout.index("## summary"):]


def table(stdout: str, key: str) -> str:
    """One workload's table from the summary, up to the next table."""
    text = summary(stdout)
    start = text.index(f"### {key}:")
    end = text.find("\n### ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_tiny_run_prints_every_table_with_matching_vectors(tmp_path):
    done, data = run_benchmark(tmp_path, "--profile")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CHECKS: all cosines >= 0.999, no errors" in done.stdout
    for key in ("w1", "w2", "w3", "w4", "w5", "w6"):
        text = table(done.stdout, key)
        assert TABLE_HEADER in text
        assert "| OOM at" not in text and "error at" not in text, text
        assert re.search(r"^\| ours", text, re.M), text
    for key in ("w1", "w2", "w3", "w5", "w6"):  # ours against the reference path, side by side
        assert re.search(r"^\| reference", table(done.stdout, key), re.M)
    rows = {key: w["rows"] for key, w in data["workloads"].items()}
    assert sorted(rows) == ["w1", "w2", "w3", "w4", "w5", "w6"]
    compared = [r for workload in rows.values() for r in workload if r["cosines"]]
    assert len(compared) == 8  # w1, w2, w3 x2, w4 x2 (group, mixed), w5, w6
    for row in compared:
        assert row["cos_min"] >= 0.999, row["path"]
        assert row["tokens_per_s"] > 0 and row["items"] > 0
    assert data["meta"]["tiny"] and data["meta"]["dtype"] == "float32"
    assert data["workloads"]["w2"]["rows"][1]["p50_ms"] is not None
    moved = data["workloads"]["w4"]["extra"]["cosine_to_bare_backbone"]
    assert set(moved) == {"retrieval", "text-matching", "code", "custom"} and max(moved.values()) < 0.9999
    assert data["profile"]["top"] and Path(data["profile"]["trace"]).is_file()
    split = data["profile"]["time"]  # the call's time split: kernels (CPU ops here) and their GEMM part
    assert split["tokens"] == data["workloads"]["w1"]["rows"][1]["tokens"]
    assert 0 < split["gemm_ms"] < split["kernel_ms"] and 0 < split["gemm_share"] < 1
    assert split["gemm_only_tokens_per_s"] > split["kernel_only_tokens_per_s"]
    assert "of which GEMMs" in done.stdout
    assert "one-query calls" in data["profile"]["small_calls_host"] and "encode" in data["profile"]["small_calls_host"]


def test_oom_is_a_row_and_the_run_goes_on(tmp_path):
    """A simulated OOM (the test hook --fail-stage) in our 6 MP pages and in w6's batch-8 reference."""
    done, data = run_benchmark(tmp_path, "--workloads", "3,6", "--repeats", "1",
                               "--fail-stage", "ours big", "--fail-stage", "reference (jina path, batch 8")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pages = table(done.stdout, "w3")
    assert re.search(r"^\| ours big .*\| OOM at ours big", pages, re.M)
    assert "goal: no OOM at" in pages and "NOT MET" in pages
    assert re.search(r"^\| ours default .*\| 1\.00000 \|", pages, re.M)  # the part before the OOM is kept
    long = table(done.stdout, "w6")
    assert "OOM at reference (jina path, batch 8" in long
    assert re.search(r"^\| reference \(jina path, batch 2, no adapter\) \| [\d,]+ \|", long, re.M)  # fallback ran
    errors = [r["error"] for w in data["workloads"].values() for r in w["rows"] if r["error"]]
    assert len(errors) == 2 and all(e.startswith("OOM at") for e in errors)


def test_full_size_setup_on_meta_device(tmp_path):
    """config.json's model: 3.75B parameters, a reference that shares every tensor, jina-sized adapters."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from nova_embeddings.bench import benchmark

    model_cls, _ = benchmark.load_classes()
    tokenizer = benchmark.bench_tokenizer(tmp_path)
    config = benchmark.build_config(model_cls.config_class, tiny=False, tokenizer=tokenizer)
    assert config.text_config.num_hidden_layers == 36 and config.text_config.vocab_size == 151936
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    model = benchmark.build_model(model_cls, config, torch.device("meta"), torch.bfloat16, "sdpa")
    assert 3.7e9 < sum(p.numel() for p in model.parameters()) < 3.8e9
    reference, projector = benchmark.build_reference(model, "sdpa")
    ours = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert all(id(t) in ours for t in [*reference.parameters(), *reference.buffers(), *projector.parameters()])
    assert reference.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert reference.config._attn_implementation == "sdpa"
    targets = benchmark.lora_targets(model)
    assert len(targets) == 36 * 7 + 1  # every language-model projection + the multi-vector projector
    assert 59e6 < sum(32 * (fan_in + fan_out) for fan_in, fan_out in targets.values()) < 61e6  # jina: ~60M per task


def test_texts_have_exact_token_counts(tmp_path):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import numpy as np

    from nova_embeddings.bench import benchmark

    tokenizer = benchmark.bench_tokenizer(tmp_path)
    rng, words = np.random.default_rng(0), benchmark.corpus_words()
    for n in (8, 16, 33, 257, 512, 2048):
        text = benchmark.text_of_tokens(tokenizer, "Passage: ", n, rng, words)
        assert benchmark.token_count(tokenizer, "Passage: " + text) == n
