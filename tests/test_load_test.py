"""The load test's client: requests split over client processes and their results combined (tiny model, CPU)."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest

from nova_embeddings.bench import load_test


def test_load_test_with_two_client_processes_sends_every_request(tmp_path):
    report_path = tmp_path / "load.json"
    status = load_test.main(["--requests", "10", "--concurrency", "4", "--clients", "2", "--items-per-request", "3",
                             "--words", "5", "--warmup", "2", "--time-cap", "120", "--no-baseline",
                             "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    load = report["load"]
    assert status == 0
    assert load["client_processes"] == 2
    assert load["statuses"] == {"200": 10}
    assert load["requests_ok"] == 10 and load["items_per_s"] > 0
    batches = report["server_batches"]
    assert batches["batches"] >= 1
    assert 0 < batches["encode_busy_seconds"] <= batches["encode_seconds"] + 1e-3  # overlaps counted once, not twice


def test_load_test_through_http_processes_counts_every_request_in_the_model_process(tmp_path):
    """--http-processes 1: the requests go through a spawned HTTP process; the model's process batches them and its
    /metrics counts them; its engine thread answers them."""
    report_path = tmp_path / "load.json"
    # (24 requests: /proc counts CPU in 10 ms ticks, and the HTTP process spends ~1-2 ms per request here)
    status = load_test.main(["--requests", "24", "--concurrency", "4", "--clients", "1", "--items-per-request", "2",
                             "--words", "5", "--warmup", "2", "--time-cap", "120", "--no-baseline",
                             "--http-processes", "1", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert status == 0 and report["http_processes"] == 1
    assert report["load"]["statuses"] == {"200": 24}
    assert report["server_batches"]["batches"] >= 1
    cpu = report["server_threads_cpu_ms_per_request"]
    if hasattr(time, "pthread_getcpuclockid"):
        assert "uvicorn" not in cpu and cpu["nova-engine"] > 0
    if os.path.exists("/proc/self/stat"):
        assert cpu["nova-http processes"] > 0  # the HTTP process's own CPU, read from /proc


def test_stub_encode_measures_the_server_alone_and_reports_its_threads_cpu(tmp_path, monkeypatch):
    """--stub-encode: the model's forward never runs (no warm-up either) while the server answers every request
    (prepared as usual); no encode() baseline; each server thread's CPU time per request is reported."""
    forward_calls: list[int] = []
    load_model = load_test.load_model

    def loading(*args, **kwargs):
        model, description = load_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda *_: forward_calls.append(1))
        return model, description

    monkeypatch.setattr(load_test, "load_model", loading)
    report_path = tmp_path / "load.json"
    status = load_test.main(["--requests", "6", "--concurrency", "2", "--clients", "1", "--items-per-request", "2",
                             "--words", "5", "--warmup", "0", "--time-cap", "120", "--stub-encode",
                             "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert status == 0 and report["stub_encode"] is True and "encode_baseline" not in report
    assert "warmup_seconds" not in report
    assert report["load"]["statuses"] == {"200": 6} and forward_calls == []
    cpu = report["server_threads_cpu_ms_per_request"]
    if hasattr(time, "pthread_getcpuclockid"):
        assert {"nova-prep", "nova-encode", "uvicorn"} <= set(cpu) and all(value > 0 for value in cpu.values())


def test_stub_encode_is_refused_for_a_running_server():
    with pytest.raises(SystemExit, match="--stub-encode"):
        load_test.main(["--url", "http://127.0.0.1:9", "--stub-encode"])


def test_combined_results_add_up_and_take_the_longest_run():
    first = load_test.LoadResult(latencies=[0.1, 0.2], statuses={200: 2}, items=4, tokens=40, seconds=2.0)
    second = load_test.LoadResult(latencies=[0.3], statuses={200: 1, 503: 1}, items=2, tokens=20, seconds=4.0,
                                  errors=["queue full"])
    summary = load_test.combine([first, second], concurrency=8)
    assert summary["requests_ok"] == 3 and summary["statuses"] == {"200": 3, "503": 1}
    assert summary["seconds"] == 4.0 and summary["items_per_s"] == 1.5 and summary["tokens_per_s"] == 15.0
    assert summary["latency_ms"]["max"] == 300.0 and summary["first_errors"] == ["queue full"]
    assert summary["client_processes"] == 2 and summary["concurrency"] == 8


def test_server_batches_against_a_running_server_count_this_run_only(tiny_nova_dir, tmp_path):
    from nova_embeddings.serve import serve_in_thread
    from nova_embeddings.server import ServerSettings, create_app
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    app = create_app(model, ServerSettings(served_model_names=("nova",)))
    with serve_in_thread(app, host="127.0.0.1", port=0) as url:
        earlier = httpx.post(f"{url}/v1/embeddings", json={"input": ["an earlier request"] * 5}, timeout=60)
        assert earlier.status_code == 200
        status = load_test.main(["--url", url, "--requests", "3", "--concurrency", "1", "--clients", "1",
                                 "--items-per-request", "2", "--words", "5", "--warmup", "0", "--time-cap", "120",
                                 "--json", str(tmp_path / "load.json")])
    batches = json.loads((tmp_path / "load.json").read_text())["server_batches"]
    assert status == 0
    assert 1 <= batches["batches"] <= 3
    assert round(batches["batches"] * batches["mean_items_per_batch"]) == 6  # not the earlier request's 5 items


def test_a_running_server_that_refuses_the_key_stops_with_its_answer(tiny_nova_dir, monkeypatch):
    from nova_embeddings.serve import serve_in_thread
    from nova_embeddings.server import ServerSettings, create_app
    from transformers import AutoModel

    monkeypatch.delenv("NOVA_API_KEY", raising=False)
    model = AutoModel.from_pretrained(tiny_nova_dir, trust_remote_code=True)
    app = create_app(model, ServerSettings(served_model_names=("nova",), api_key="right"))
    with serve_in_thread(app, host="127.0.0.1", port=0) as url:
        with pytest.raises(SystemExit) as exit_info:
            load_test.main(["--url", url, "--api-key", "wrong", "--requests", "1", "--clients", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "401" in message and "missing or wrong API key" in message
    assert "--api-key" in message and "NOVA_API_KEY" in message


def test_model_attr_sets_the_served_models_knob_and_refuses_a_typo(monkeypatch, tmp_path):
    """--model-attr compares two configurations of the same model in one session (as bench's does)."""
    loaded, original = [], load_test.load_model
    monkeypatch.setattr(load_test, "load_model", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    status = load_test.main(["--requests", "4", "--concurrency", "2", "--clients", "1", "--items-per-request", "2",
                             "--words", "4", "--warmup", "0", "--time-cap", "120", "--no-baseline",
                             "--model-attr", "adapter_batching=mixed"])
    assert status == 0 and loaded[0][0].adapter_batching == "mixed"
    with pytest.raises(SystemExit, match="the model has no attribute 'adapter_batchin'"):
        load_test.main(["--requests", "1", "--no-baseline", "--model-attr", "adapter_batchin=mixed"])
    with pytest.raises(SystemExit, match="a server at --url runs its own"):
        load_test.main(["--url", "http://127.0.0.1:9", "--model-attr", "adapter_batching=mixed"])


def test_then_measures_other_load_shapes_against_the_same_server(tmp_path, monkeypatch):
    """--then: after the run, more measurements against the same served model (loaded and warmed up once), each
    with its own load flags, its own load figures and the server's batches during it."""
    loads: list[int] = []
    load_model = load_test.load_model
    monkeypatch.setattr(load_test, "load_model", lambda *args, **kwargs: loads.append(1) or load_model(*args, **kwargs))
    report_path = tmp_path / "load.json"
    status = load_test.main(["--requests", "6", "--concurrency", "3", "--clients", "1", "--items-per-request", "2",
                             "--words", "4", "--warmup", "0", "--time-cap", "120", "--no-baseline",
                             "--then", "concurrency=1 items-per-request=1 requests=4",
                             "--then", "requests=3 words=9", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert status == 0 and loads == [1]
    assert report["load"]["requests_ok"] == 6 and report["load"]["concurrency"] == 3
    first, second = report["then"]
    assert first["flags"]["concurrency"] == 1 and first["flags"]["items_per_request"] == 1
    assert first["load"]["requests_ok"] == 4 and first["load"]["concurrency"] == 1
    assert first["server_batches"]["batches"] >= 1
    assert first["server_batches"]["mean_items_per_batch"] == 1.0  # one 1-item request at a time
    assert second["flags"]["concurrency"] == 3 and second["flags"]["words"] == 9  # the run's own, but for its changes
    assert second["load"]["requests_ok"] == 3
    assert "nova-prep" in second["server_threads_cpu_ms_per_request"]


@pytest.mark.parametrize("entry", ["device=cuda", "model-attr=adapter_batching=mixed", "concurrency"])
def test_then_refuses_anything_but_load_flags(entry):
    with pytest.raises(SystemExit, match="is not NAME=VALUE with NAME one of"):
        load_test.main(["--requests", "1", "--no-baseline", "--then", entry])


def test_cpu_per_request_counts_only_http_processes_that_ran_through_the_run():
    """The HTTP processes' CPU is the sum over those alive before and after the run: one still stopping from an
    earlier server (gone after) would count negative and hide the others, one started during the run would bring
    its start-up."""
    before = {"nova-encode": 1.0, f"{load_test.HTTP_PROCESSES}/10": 5.0, f"{load_test.HTTP_PROCESSES}/11": 3.0}
    after = {"nova-encode": 1.5, f"{load_test.HTTP_PROCESSES}/10": 5.2, f"{load_test.HTTP_PROCESSES}/12": 9.0,
             "nova-prep": 0.1}
    assert load_test.cpu_per_request(before, after, 10) == {"nova-encode": 50.0, load_test.HTTP_PROCESSES: 20.0,
                                                            "nova-prep": 10.0}
