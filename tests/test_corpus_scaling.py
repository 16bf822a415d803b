"""The multi-GPU scaling tool (issue: run encode-corpus on several GPUs) runs end to end on CPU with gloo: a mixed
corpus of texts and pages, encode-corpus under torchrun on 1 and 2 processes, outputs compared."""

from __future__ import annotations

import json

from nova_embeddings.bench.corpus_scaling import main


def test_scaling_tool_runs_one_and_two_processes_and_compares_outputs(tmp_path):
    result_file = tmp_path / "scaling.json"
    code = main(["--rows", "16", "--nproc", "2", "--device", "cpu", "--page-fraction", "0.25", "--shard-size", "4",
                 "--chunk-size", "4", "--workdir", str(tmp_path / "work"), "--json", str(result_file)])
    result = json.loads(result_file.read_text())
    assert code == 0 and result["ids_equal"], result["problems"]
    assert [run["nproc"] for run in result["runs"]] == [1, 2]
    assert result["min_cosine"] >= 0.9999
    assert result["tokens"] > 16 and result["scaling"] > 0
    pages = [json.loads(line) for line in (tmp_path / "work" / "corpus.jsonl").open() if "image" in line]
    assert len(pages) == 4  # a quarter of the rows are pages: images went through both runs
