"""encode-corpus and NovaEmbedder on the tiny checkpoint: equal to model.encode, across processes and re-runs."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from transformers import AutoModel  # noqa: E402

from nova_embeddings.corpus import assign_shards, main  # noqa: E402
from nova_embeddings.corpus_pipeline import StageTimes, run_pipeline  # noqa: E402
from tests.helpers import make_image, png_bytes  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARD_SIZE = 4
TOLERANCE = 1e-6


def corpus_rows(image_dir: Path) -> list[dict]:
    """~20 mixed rows: texts, image files (relative paths) and base64 images, tasks, instructions, an adapter."""
    for seed in range(3):
        make_image(seed).save(image_dir / f"page{seed}.png")
    b64 = base64.b64encode(png_bytes(make_image(7, 64, 48))).decode("ascii")
    rows = [{"id": f"doc-{i:02d}", "text": f"passage number {i} about " + "late interaction " * (i % 5)} for i in range(12)]
    rows += [
        {"id": "img-file-0", "image": "images/page0.png"},
        {"id": "img-file-1", "image": "images/page1.png", "task": "retrieval.passage"},
        {"id": "img-b64", "image": b64},
        {"id": "fused", "text": "a caption", "image": "images/page2.png"},
        {"id": "q-0", "text": "what is maxsim?", "task": "retrieval.query", "instructions": "Find physics papers"},
        {"id": "q-1", "text": "def add(a, b):", "task": "code.query"},
        {"id": "match", "text": "the same sentence", "task": "text-matching"},
        {"id": "adapter-row", "text": "routed by name", "adapter": "code"},
    ]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    columns = ["id", "text", "image", "task", "instructions", "adapter"]
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path, row_group_size=5)
    return path


def expected_items(rows: list[dict], base: Path) -> list[dict]:
    """The rows as a user would hand them to model.encode (image paths made absolute)."""
    items = []
    for row in rows:
        item = {k: v for k, v in row.items() if k != "id"}
        if str(item.get("image", "")).startswith("images/"):
            item["image"] = str(base / item["image"])
        items.append(item)
    return items


def read_output(out: Path) -> tuple[dict, dict[str, dict]]:
    """(manifest, column -> {id: vector}) from an output folder."""
    manifest = json.loads((out / "manifest.json").read_text())
    vectors: dict[str, dict] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        for column in ("vector", "multi_vector"):
            if column in table.column_names:
                for row_id, value in zip(table.column("id").to_pylist(), table.column(column).to_pylist()):
                    assert row_id not in vectors.setdefault(column, {}), f"{row_id} written twice"
                    vectors[column][row_id] = np.asarray(value, dtype=np.float32)
    return manifest, vectors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    base = tmp_path_factory.mktemp("corpus")
    (base / "images").mkdir()
    rows = corpus_rows(base / "images")
    write_jsonl(base / "rows.jsonl", rows)
    write_parquet(base / "rows.parquet", rows)
    return base, rows


@pytest.fixture(scope="module")
def model(tiny_nova_dir):
    return AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)


@pytest.fixture(scope="module")
def one_process(corpus, tiny_nova_dir, tmp_path_factory) -> Path:
    """The JSONL corpus encoded by one process, single and multi vectors."""
    base, _ = corpus
    out = tmp_path_factory.mktemp("one_process")
    assert main([str(base / "rows.jsonl"), "--model", str(tiny_nova_dir), "--output-dir", str(out),
                 "--vectors", "both", "--shard-size", str(SHARD_SIZE), "--chunk-size", "3"]) == 0
    return out


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    """Tests that call main() in-process run as one process, whatever the environment says."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def assert_matches_encode(vectors: dict, ids: list, reference, multi: bool) -> None:
    for i, row_id in enumerate(ids):
        expected = np.asarray(reference[i], dtype=np.float32)
        assert vectors[row_id].dtype == np.float32
        assert vectors[row_id].shape == expected.shape, row_id
        assert np.abs(vectors[row_id] - expected).max() <= TOLERANCE, row_id


def test_one_process_equals_model_encode(corpus, model, one_process):
    base, rows = corpus
    manifest, vectors = read_output(one_process)
    ids = [row["id"] for row in rows]
    assert manifest["ids"] == ids
    assert manifest["n_input_rows"] == manifest["n_encoded"] == len(rows) and manifest["n_errors"] == 0
    assert manifest["n_shards"] == -(-len(rows) // SHARD_SIZE) == len(manifest["shards"])
    assert manifest["dims"] == {"vector": model.config.embedding_dim, "multi_vector": model.config.multi_vector_projector_dim}
    items = expected_items(rows, base)
    assert_matches_encode(vectors["vector"], ids, model.encode(items, output="numpy"), multi=False)
    assert_matches_encode(vectors["multi_vector"], ids, model.encode(items, return_multivector=True, output="numpy"), multi=True)
    schema = pq.read_schema(one_process / manifest["shards"][0]["file"])
    assert schema.field("vector").type == pa.list_(pa.float32(), model.config.embedding_dim)
    assert schema.field("multi_vector").type == pa.list_(pa.list_(pa.float32(), model.config.multi_vector_projector_dim))


def test_parquet_input_with_defaults_and_dimensions(corpus, model, tiny_nova_dir, tmp_path):
    base, rows = corpus
    dim = model.config.matryoshka_dims[0]
    assert main([str(base / "rows.parquet"), "--model", str(tiny_nova_dir), "--output-dir", str(tmp_path),
                 "--dimensions", str(dim), "--task", "retrieval.passage", "--instructions", "Index physics papers",
                 "--no-adapter", "--shard-size", "8"]) == 0
    manifest, vectors = read_output(tmp_path)
    ids = [row["id"] for row in rows]
    assert manifest["ids"] == ids and "multi_vector" not in vectors
    reference = model.encode(expected_items(rows, base), task="retrieval.passage", instructions="Index physics papers",
                             adapter=None, dimensions=dim, output="numpy")
    assert reference.shape == (len(rows), dim)
    assert_matches_encode(vectors["vector"], ids, reference, multi=False)


def test_torchrun_two_processes_equal_one(corpus, tiny_nova_dir, one_process, tmp_path):
    base, rows = corpus
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "nova_embeddings.corpus", str(base / "rows.jsonl"), "--model", str(tiny_nova_dir),
               "--output-dir", str(tmp_path), "--vectors", "both", "--shard-size", str(SHARD_SIZE), "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[rank 0]" in result.stderr and "[rank 1]" in result.stderr  # both ranks encoded shards
    manifest, vectors = read_output(tmp_path)
    reference_manifest, reference = read_output(one_process)
    assert manifest["world_size"] == 2
    assert manifest["ids"] == reference_manifest["ids"] == [row["id"] for row in rows]
    assert manifest["config_hash"] == reference_manifest["config_hash"]
    for column in ("vector", "multi_vector"):
        assert sorted(vectors[column]) == sorted(reference[column])
        for row_id, vector in reference[column].items():
            assert np.abs(vectors[column][row_id] - vector).max() <= TOLERANCE, (column, row_id)


def test_pipelined_run_equals_serial_run_and_encode_per_chunk_exactly(corpus, model, tiny_nova_dir, one_process, tmp_path):
    """The overlapped stages (one_process: --prepare-ahead 2) change nothing: bit for bit the serial run's vectors,
    and those of model.encode called on each chunk's rows (chunks of 3 rows inside shards of 4)."""
    base, rows = corpus
    assert main([str(base / "rows.jsonl"), "--model", str(tiny_nova_dir), "--output-dir", str(tmp_path),
                 "--vectors", "both", "--shard-size", str(SHARD_SIZE), "--chunk-size", "3", "--prepare-ahead", "0"]) == 0
    serial_manifest, serial = read_output(tmp_path)
    manifest, pipelined = read_output(one_process)
    assert manifest["batching"]["prepare_ahead"] == 2 and serial_manifest["batching"]["prepare_ahead"] == 0
    assert serial_manifest["config_hash"] == manifest["config_hash"]
    items = expected_items(rows, base)
    for shard_start in range(0, len(rows), SHARD_SIZE):
        shard = range(shard_start, min(shard_start + SHARD_SIZE, len(rows)))
        for chunk_start in range(shard.start, shard.stop, 3):
            chunk = range(chunk_start, min(chunk_start + 3, shard.stop))
            single = model.encode([items[i] for i in chunk], output="numpy")
            multi = model.encode([items[i] for i in chunk], return_multivector=True, output="numpy")
            for position, row in enumerate(chunk):
                row_id = rows[row]["id"]
                for column, expected in (("vector", single[position]), ("multi_vector", multi[position])):
                    assert np.array_equal(pipelined[column][row_id], expected), (column, row_id)
                    assert np.array_equal(serial[column][row_id], expected), (column, row_id)


def run_module(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m nova_embeddings.corpus ARGS`` on the CPU in a fresh process; the timeout turns a hang into a failure."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "nova_embeddings.corpus", *args, "--device", "cpu"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_row_met_by_the_preparer_stops_the_run_and_keeps_the_shards_before(tiny_nova_dir, tmp_path):
    """The bad row is prepared while earlier chunks are on the model: the run stops with its id and line, the shards
    before it are complete (written after the error), and nothing is left half written."""
    rows = [{"id": f"row-{i:02d}", "text": f"text number {i}"} for i in range(40)]
    rows[33] = {"id": "bad-row", "text": " "}
    out = tmp_path / "out"
    result = run_module([str(write_jsonl(tmp_path / "rows.jsonl", rows)), "--model", str(tiny_nova_dir),
                         "--output-dir", str(out), "--shard-size", "8", "--chunk-size", "4"])
    assert result.returncode == 2, result.stderr[-4000:]
    assert "row id 'bad-row'" in result.stderr and "rows.jsonl line 34" in result.stderr
    assert "'text' is empty" in result.stderr
    assert sorted(path.name for path in (out / "shards").iterdir()) == [f"shard-{k:05d}-of-00005.parquet" for k in range(4)]
    assert not (out / "manifest.json").exists()
    assert pq.read_table(out / "shards" / "shard-00003-of-00005.parquet").column("id").to_pylist() == \
        [f"row-{i:02d}" for i in range(24, 32)]


def test_writer_failure_stops_the_run_with_the_shard_and_the_error(tiny_nova_dir, tmp_path):
    rows = [{"id": i, "text": f"text number {i}"} for i in range(12)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "shards").write_text("a file where the shard folder should be")
    result = run_module([str(write_jsonl(tmp_path / "rows.jsonl", rows)), "--model", str(tiny_nova_dir),
                         "--output-dir", str(out), "--shard-size", "4", "--chunk-size", "2"])
    assert result.returncode == 2, result.stderr[-4000:]
    message = result.stderr.strip().splitlines()[-1]
    assert re.match(r"encode-corpus: error \(rank 0\): writing shard \d \(ids \d+ to \d+, from .*rows.jsonl line \d+\) "
                    r"failed: FileExistsError: .*File exists", message), message
    assert str(out / "shards") in message
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("failing", ["prepare", "encode", "write"])
@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_pipeline_stage_error_stops_the_run_in_order(failing, ahead):
    """Chunks 0..9, stage `failing` raises on chunk 5: that error reaches the caller; every chunk before 5 is
    written, in order, and none after; no worker thread is left running."""
    written = []

    def stage(name):
        def run(chunk):
            if name == failing and chunk == 5:
                raise RuntimeError(f"{name} broke on chunk 5")
            return chunk

        return run

    threads_before = threading.active_count()
    with pytest.raises(RuntimeError, match=f"{failing} broke on chunk 5"):
        run_pipeline(range(10), stage("prepare"), stage("encode"), lambda chunk: written.append(stage("write")(chunk)),
                     ahead=ahead, times=StageTimes())
    assert written == [0, 1, 2, 3, 4]
    assert threading.active_count() == threads_before


def test_pipeline_times_its_stages():
    times = StageTimes()
    written = []
    run_pipeline(range(7), lambda c: c, lambda c: c * 2, written.append, ahead=2, times=times)
    assert written == [0, 2, 4, 6, 8, 10, 12]
    assert times.wall > 0 and times.encode >= 0 and "rows/s" in times.summary()


def encoded_shards(caplog) -> list[int]:
    """Shards that a run encoded, from its log lines ("shard K: encoded N rows ...")."""
    found = (re.match(r"shard (\d+): encoded ", record.getMessage()) for record in caplog.records)
    return [int(match.group(1)) for match in found if match]


def test_rerun_redoes_only_the_missing_shard(corpus, tiny_nova_dir, tmp_path, caplog):
    base, _ = corpus
    argv = [str(base / "rows.jsonl"), "--model", str(tiny_nova_dir), "--output-dir", str(tmp_path),
            "--shard-size", str(SHARD_SIZE)]
    assert main(argv) == 0
    manifest, before = read_output(tmp_path)
    files = [tmp_path / shard["file"] for shard in manifest["shards"]]
    mtimes = {path: path.stat().st_mtime_ns for path in files}
    files[1].unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nova_embeddings.corpus"):
        assert main(argv) == 0
    assert encoded_shards(caplog) == [1]
    assert sum("already done, skipped" in r.getMessage() for r in caplog.records) == len(files) - 1
    assert all(path.stat().st_mtime_ns == mtimes[path] for path in files if path != files[1])
    manifest_again, after = read_output(tmp_path)
    assert manifest_again["ids"] == manifest["ids"]
    for row_id, vector in before["vector"].items():
        assert np.abs(after["vector"][row_id] - vector).max() <= TOLERANCE


def test_changed_settings_reencode_every_shard(corpus, tiny_nova_dir, tmp_path, caplog):
    base, _ = corpus
    argv = [str(base / "rows.jsonl"), "--model", str(tiny_nova_dir), "--output-dir", str(tmp_path), "--shard-size", "10"]
    assert main(argv) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nova_embeddings.corpus"):
        assert main(argv + ["--instructions", "Something else"]) == 0
    assert sorted(encoded_shards(caplog)) == [0, 1]  # none reused


def bad_corpus(base: Path) -> tuple[Path, list[str]]:
    rows = [{"id": f"ok-{i}", "text": f"fine text {i}"} for i in range(6)]
    rows.insert(2, {"id": "bad-empty", "text": "   "})
    rows.insert(5, {"id": "bad-image", "image": "not-a-file.png"})
    return write_jsonl(base / "bad.jsonl", rows), [row["id"] for row in rows]


def test_bad_row_error_names_id_and_line(tiny_nova_dir, tmp_path, capsys):
    path, _ = bad_corpus(tmp_path)
    assert main([str(path), "--model", str(tiny_nova_dir), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "row id 'bad-empty'" in error and "bad.jsonl line 3" in error and "'text' is empty" in error
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_rows_writes_errors_and_every_good_id(tiny_nova_dir, model, tmp_path):
    path, ids = bad_corpus(tmp_path)
    out = tmp_path / "out"
    assert main([str(path), "--model", str(tiny_nova_dir), "--output-dir", str(out), "--skip-bad-rows",
                 "--shard-size", "3"]) == 0
    manifest, vectors = read_output(out)
    good = [i for i in ids if not i.startswith("bad")]
    assert manifest["ids"] == good and manifest["n_errors"] == 2 and manifest["n_input_rows"] == len(ids)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["bad-empty", "bad-image"]
    assert "'text' is empty" in errors[0]["error"] and "line 6" in errors[1]["where"]
    reference = model.encode([f"fine text {i}" for i in range(6)], output="numpy")
    assert_matches_encode(vectors["vector"], good, reference, multi=False)


def test_duplicate_ids_are_an_error(tiny_nova_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}])
    assert main([str(path), "--model", str(tiny_nova_dir), "--output-dir", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "duplicate id 'a'" in error and "line 1" in error and "line 3" in error


def test_assign_shards_balances_and_covers_every_shard():
    costs = {shard: cost for shard, cost in enumerate([90, 10, 40, 40, 30, 70, 5, 5, 60, 20])}
    plan = assign_shards(costs, 3)
    assert sorted(shard for shards in plan for shard in shards) == sorted(costs)
    loads = [sum(costs[shard] for shard in shards) for shards in plan]
    assert max(loads) - min(loads) <= max(costs.values())
    assert plan == assign_shards(dict(reversed(list(costs.items()))), 3)  # the same plan on every rank


def test_ray_data_map_batches(corpus, model, tiny_nova_dir):
    ray = pytest.importorskip("ray")
    from nova_embeddings.corpus_ray import NovaEmbedder

    base, rows = corpus
    records = [{"id": row["id"], "text": row.get("text"), "task": row.get("task"),
                "image": str(base / row["image"]) if str(row.get("image", "")).startswith("images/") else row.get("image")}
               for row in rows]
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = ray.data.from_items(records + [{"id": "bad", "text": "  ", "task": None, "image": None}]).map_batches(
            NovaEmbedder, fn_constructor_kwargs={"model": str(tiny_nova_dir), "vectors": "both", "device": "cpu",
                                                 "skip_bad_rows": True},
            concurrency=1, batch_size=7, batch_format="pyarrow",
        )
        out = {row["id"]: row for row in ds.take_all()}
    finally:
        ray.shutdown()
    ids = [row["id"] for row in rows]
    assert sorted(out) == sorted(ids + ["bad"])
    assert out["bad"]["vector"] is None and out["bad"]["multi_vector"] is None and "'text' is empty" in out["bad"]["error"]
    assert all(out[row_id]["error"] is None for row_id in ids)
    items = [{k: v for k, v in r.items() if k != "id" and v is not None} for r in records]
    single = model.encode(items, output="numpy")
    multi = model.encode(items, return_multivector=True, output="numpy")
    for i, row_id in enumerate(ids):
        assert np.abs(np.asarray(out[row_id]["vector"], np.float32) - single[i]).max() <= TOLERANCE
        assert np.abs(np.asarray(out[row_id]["multi_vector"], np.float32) - multi[i]).max() <= TOLERANCE


def test_corpus_speed_benchmark_runs_on_cpu(tmp_path, capsys):
    """The benchmark's like-with-like comparison on the tiny checkpoint: both sides print a rate, the ratio and
    encode-corpus's stage breakdown, and the corpus vectors agree with encode()'s."""
    from nova_embeddings.bench import corpus_speed

    assert corpus_speed.main(["--rows", "8", "--device", "cpu", "--chunk-size", "3", "--shard-size", "6", "--serial",
                              "--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "encode(): " in printed and "prepare_items" in printed
    for ahead in (2, 0):
        assert f"encode-corpus --prepare-ahead {ahead}: " in printed
    assert printed.count("ratio to encode()") == 2 and printed.count("GPU idle") == 2
    cosines = [float(value) for value in re.findall(r"min cosine to encode\(\) over all rows ([0-9.]+)", printed)]
    assert len(cosines) == 2 and min(cosines) >= 0.99999


def test_a_relative_image_path_is_read_next_to_the_data_file_never_from_the_working_folder(tmp_path, monkeypatch):
    """A missing image must fail naming the path beside the data file, not silently embed a same-named file that
    happens to sit in the working folder; strings that may be base64 pass on unchanged."""
    from nova_embeddings.data import resolve_image

    data_dir, work_dir = tmp_path / "data", tmp_path / "work"
    (data_dir / "img").mkdir(parents=True)
    (work_dir / "img").mkdir(parents=True)
    (work_dir / "img" / "page.png").write_bytes(b"png")
    (data_dir / "img" / "here.png").write_bytes(b"png")
    monkeypatch.chdir(work_dir)
    assert resolve_image("img/here.png", data_dir) == str(data_dir / "img" / "here.png")
    assert resolve_image("img/page.png", data_dir) == str(data_dir / "img" / "page.png")  # not work/img/page.png
    assert resolve_image("iVBORw0KGgo=", data_dir) == "iVBORw0KGgo="
    assert resolve_image("https://x/a.png", data_dir) == "https://x/a.png"
    for scheme_in_capitals in ("HTTPS://x/a.png", "Http://x/a.png", "DATA:image/png;base64,iVBORw0KGgo="):
        assert resolve_image(scheme_in_capitals, data_dir) == scheme_in_capitals  # encode reads schemes in any case
