"""nova_embeddings/evaluate.py: metric functions on hand-made rankings, BEIR loading, and an end-to-end run on
a tiny synthetic BEIR folder whose answers are known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModel

from nova_embeddings.evaluate import (
    NO_INSTRUCTION,
    WITH_INSTRUCTION,
    EvalSettings,
    build_parser,
    encode_items,
    format_table,
    load_qrels,
    load_retrieval_set,
    main,
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    rank,
    recall_at_k,
    run,
)
from nova_embeddings.data import DataError
from nova_embeddings.train import DEFAULT_TARGET_MODULES

DOCUMENTS = ["apples are a red fruit", "the ocean is deep and blue", "python code runs on an interpreter",
             "mountains keep snow on their peaks", "cats sleep most of the day", "trains run on steel rails"]


# ---------------------------------------------------------------------- metrics on hand-made rankings
def test_ndcg_uses_graded_relevance():
    qrels = {"d1": 0, "d2": 2, "d3": 1, "d4": 1}  # d1 judged not relevant, d4 relevant but not retrieved
    ranking = ["d1", "d2", "d3", "d9"]
    dcg = 2 / math.log2(3) + 1 / math.log2(4)  # d2 at rank 2, d3 at rank 3
    ideal = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # grades 2, 1, 1
    assert ndcg_at_k(ranking, qrels, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(ranking, qrels, 10) == pytest.approx(0.562727, abs=1e-6)
    assert ndcg_at_k(ranking, qrels, 1) == 0.0
    assert ndcg_at_k(ranking, qrels, 2) == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(["d2", "d3", "d4"], qrels, 10) == pytest.approx(1.0)
    assert ndcg_at_k(ranking, {"d1": 0}, 10) == 0.0


def test_mrr_counts_the_first_relevant_document_within_k():
    assert mrr_at_k(["a", "b", "c"], {"c": 1}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["a", "b", "c"], {"c": 1}, 2) == 0.0
    assert mrr_at_k(["a", "b", "c"], {"b": 0, "c": 2, "a": -1}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["a"] + [f"x{i}" for i in range(20)] + ["c"], {"c": 1}, 10) == 0.0


def test_recall_is_the_share_of_relevant_documents_found():
    assert recall_at_k(["a", "b"], {"a": 1, "x": 1}, 1) == 0.5
    assert recall_at_k(["a", "b"], {"a": 1, "x": 1}, 10) == 0.5
    assert recall_at_k(["a", "b"], {"a": 1, "b": 3, "c": 0}, 1) == 0.5
    assert recall_at_k(["a", "b"], {"a": 1, "b": 3, "c": 0}, 2) == 1.0


def test_mean_metrics_average_over_queries_with_a_relevant_document():
    rankings = {"q1": ["a", "b"], "q2": ["b", "a"], "q3": ["a", "b"]}
    qrels = {"q1": {"a": 1}, "q2": {"a": 1}, "q3": {"a": 0}}  # q3 has no relevant document: not averaged
    metrics = mean_metrics(rankings, qrels)
    assert metrics["MRR@10"] == pytest.approx((1 + 1 / 2) / 2)
    assert metrics["Recall@1"] == pytest.approx(0.5)
    assert metrics["nDCG@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert metrics["Recall@100"] == 1.0


def test_rank_is_best_first_and_keeps_corpus_order_on_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [0.0, 0.0, 0.0, 1.0]])
    assert rank(lambda start, end: scores[start:end], 2, depth=3, block=1) == [[1, 3, 2], [3, 0, 1]]


def test_table_puts_the_two_runs_side_by_side():
    metrics = {"nDCG@10": 0.5, "MRR@10": 0.4, "Recall@1": 0.25, "Recall@10": 0.75, "Recall@100": 1.0}
    better = {**metrics, "nDCG@10": 0.625}
    table = format_table({NO_INSTRUCTION: {"single": metrics, "multi": metrics},
                          WITH_INSTRUCTION: {"single": better, "multi": metrics}}).splitlines()
    assert table[0] == ("| metric | single: no instruction | single: with instruction | single: Δ | "
                        "multi: no instruction | multi: with instruction | multi: Δ |")
    assert table[2] == "| nDCG@10 | 0.5000 | 0.6250 | +0.1250 | 0.5000 | 0.5000 | +0.0000 |"
    assert len(table) == 2 + 5
    alone = format_table({NO_INSTRUCTION: {"single": metrics}}).splitlines()
    assert alone[0] == "| metric | single |" and alone[4] == "| Recall@1 | 0.2500 |"


# ---------------------------------------------------------------------- BEIR files
def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def write_png(path: Path, seed: int) -> None:
    Image.fromarray((np.random.RandomState(seed).rand(60, 90, 3) * 255).astype("uint8")).save(path)


def test_qrels_with_or_without_header_and_trec_format(tmp_path):
    (tmp_path / "a.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n\nq2\td3\t2\n")
    assert load_qrels(tmp_path / "a.tsv") == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}
    (tmp_path / "b.tsv").write_text("q1 0 d1 1\nq1 0 d2 0\n")
    assert load_qrels(tmp_path / "b.tsv") == {"q1": {"d1": 1, "d2": 0}}
    (tmp_path / "c.tsv").write_text("q1\td1\t1\nq1\td2\t1\nq1\td3\tmaybe\n")
    with pytest.raises(DataError, match=r"c.tsv, line 3: score 'maybe' is not a number"):
        load_qrels(tmp_path / "c.tsv")


def test_beir_folder_loading(tmp_path):
    (tmp_path / "pages").mkdir()
    write_png(tmp_path / "pages" / "p.png", seed=0)
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": 1, "title": "Apples", "text": "are red"},
                                            {"_id": "d2", "title": "", "text": "plain"},
                                            {"_id": "d3", "image": "pages/p.png"}])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "apples?", "instructions": "Find fruit"},
                                             {"_id": "q2", "text": "unjudged"}, {"_id": "q3", "image": "pages/p.png"}])
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\t1\nq1\tgone\t1\nq3\td3\t1\n")
    data = load_retrieval_set(tmp_path)
    assert data.doc_ids == ["1", "d2", "d3"]
    assert data.documents == [{"text": "Apples are red"}, {"text": "plain"}, {"image": str(tmp_path / "pages" / "p.png")}]
    assert data.query_ids == ["q1", "q3"]  # q2 has no judgement
    assert data.query_instructions == ["Find fruit", None]
    assert data.qrels == {"q1": {"1": 1}, "q3": {"d3": 1}} and data.skipped_judgements == 1


@pytest.mark.parametrize("rows,message", [
    ([{"_id": "a", "text": "x"}, {"_id": "a", "text": "y"}], "line 2: duplicate _id 'a'"),
    ([{"_id": "a", "text": "x"}, {"_id": "b", "title": " "}], "line 2: no 'title' / 'text' text and no 'image'"),
    ([{"text": "x"}], "line 1: expected a JSON object with an '_id'"),
    (['{"_id": "a", "text": '], "line 1: invalid JSON"),
])
def test_bad_corpus_rows_name_the_line(tmp_path, rows, message):
    write_jsonl(tmp_path / "corpus.jsonl", rows)
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q", "text": "x"}])
    (tmp_path / "qrels.tsv").write_text("q\ta\t1\n")
    with pytest.raises(DataError, match=f"corpus.jsonl, {message}"):
        load_retrieval_set(tmp_path)


# ---------------------------------------------------------------------- end to end, known answers
# Construction: every query is an exact copy of one document (text, or the same image) and both sides are
# encoded with the SAME task (and, in the instruction run, the same instructions), so a query and its copy
# are the same token sequence. Single vectors: their cosine is 1, the maximum, and no other document reaches
# it (distinct texts give distinct vectors). Multi vectors: every query token finds its own copy (dot 1, the
# maximum for unit vectors), so MaxSim equals the query's token count, which another document could only tie
# by containing every query token in the same causal context. So each query's copy ranks first.
# Six queries are judged relevant to their copy. The seventh, the control, is judged relevant to ANOTHER
# document, so its copy (unjudged) takes rank 1 and its relevant document some rank r in 2..7 (corpus of 7):
#   Recall@1 = 6/7, Recall@10 = Recall@100 = 1, MRR@10 = (6 + 1/r)/7, nDCG@10 = (6 + 1/log2(r + 1))/7.
N_QUERIES = 7


def assert_known_answers(metrics: dict[str, float]) -> None:
    n = N_QUERIES
    assert metrics["Recall@1"] == pytest.approx((n - 1) / n)
    assert metrics["Recall@10"] == metrics["Recall@100"] == 1.0
    control_rr = n * metrics["MRR@10"] - (n - 1)  # the control query's reciprocal rank
    r = round(1 / control_rr)
    assert 2 <= r <= n and control_rr == pytest.approx(1 / r)
    assert n * metrics["nDCG@10"] - (n - 1) == pytest.approx(1 / math.log2(r + 1))


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("beir")
    write_png(folder / "page.png", seed=4)
    write_jsonl(folder / "corpus.jsonl", [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(DOCUMENTS)]
                + [{"_id": "dimg", "image": "page.png"}])
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": t} for i, t in enumerate(DOCUMENTS)]
                + [{"_id": "qimg", "image": "page.png"}])
    judged = [f"q{i}\td{i}\t1" for i in range(5)] + ["q5\td0\t1", "qimg\tdimg\t1"]  # q5 is the control
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(judged) + "\n")
    return folder


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


def cli(beir_dir: Path, *extra: str) -> list[str]:
    return ["--model", "unused", "--data", str(beir_dir), "--query-task", "retrieval.passage", "--no-progress", *extra]


def test_known_answers_single_and_multi_with_and_without_instructions(model, beir_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = build_parser().parse_args(cli(beir_dir, "--instructions", "Find the same passage",
                                         "--doc-instructions", "Find the same passage", "--output-json", str(out)))
    record = run(args, model=model)
    assert set(record["results"]) == {NO_INSTRUCTION, WITH_INSTRUCTION}
    for label in (NO_INSTRUCTION, WITH_INSTRUCTION):
        for kind in ("single", "multi"):
            assert_known_answers(record["results"][label][kind])
    printed = capsys.readouterr().out
    assert "| metric | single: no instruction | single: with instruction | single: Δ |" in printed
    assert json.loads(out.read_text())["results"] == record["results"]
    assert (record["n_queries"], record["n_documents"]) == (N_QUERIES, N_QUERIES)


def test_instructions_change_the_query_vectors(model, beir_dir):
    data = load_retrieval_set(beir_dir)
    settings = EvalSettings(progress=False)
    plain = encode_items(model, data.queries, data.query_ids, task="retrieval.query", instructions=None, multi=False,
                         settings=settings, source="q")
    instructed = encode_items(model, data.queries, data.query_ids, task="retrieval.query", instructions="Find fruit",
                              multi=False, settings=settings, source="q")
    assert plain.shape == (N_QUERIES, model.config.embedding_dim)
    assert (plain - instructed).abs().max() > 1e-4


def test_adapter_folder_is_loaded_and_used(tiny_nova_dir, beir_dir, tmp_path):
    torch.manual_seed(5)
    base = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES,
                                    init_lora_weights=False)).save_pretrained(str(tmp_path / "legal"))
    fresh = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    record = run(build_parser().parse_args(cli(beir_dir, "--adapter", str(tmp_path / "legal"))), model=fresh)
    assert record["adapter"] == "legal" and "legal" in fresh.list_adapters()
    for kind in ("single", "multi"):
        assert_known_answers(record["results"][NO_INSTRUCTION][kind])  # the construction holds under any adapter

    data = load_retrieval_set(beir_dir)
    vectors = {}
    for adapter in ("legal", None):
        settings = EvalSettings(adapter=adapter, progress=False)
        vectors[adapter] = encode_items(fresh, data.documents, data.doc_ids, task="retrieval.passage", instructions=None,
                                        multi=False, settings=settings, source="corpus")
    assert (vectors["legal"] - vectors[None]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"--adapter 'nope' is neither .* loaded: \[.*'legal'\]"):
        run(build_parser().parse_args(cli(beir_dir, "--adapter", "nope")), model=fresh)


def test_adapter_folder_named_like_a_task_runs_on_a_repository_without_task_adapters(tiny_nova_dir, beir_dir):
    bare = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True, load_task_adapters=False)
    folder = tiny_nova_dir / "adapters" / "retrieval"
    record = run(build_parser().parse_args(cli(beir_dir, "--adapter", str(folder))), model=bare)
    assert record["adapter"] == "eval_retrieval" and bare.list_adapters() == ["eval_retrieval"]


def test_command_line_reports_bad_data_without_a_traceback(beir_dir, tmp_path, capsys):
    for name in ("queries.jsonl", "qrels.tsv"):
        (tmp_path / name).write_text((beir_dir / name).read_text())
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d0", "text": "x"}, {"_id": "d1"}])
    assert main(["--model", "unused", "--data", str(tmp_path)]) == 2
    assert f"error: {tmp_path / 'corpus.jsonl'}, line 2: no 'title' / 'text' text and no 'image'" in capsys.readouterr().err
