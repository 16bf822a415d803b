"""The load test's client: requests split over client processes and their results combined (tiny model, CPU)."""

from __future__ import annotations

import json

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
    assert report["server_batches"]["batches"] >= 1


def test_combined_results_add_up_and_take_the_longest_run():
    first = load_test.LoadResult(latencies=[0.1, 0.2], statuses={200: 2}, items=4, tokens=40, seconds=2.0)
    second = load_test.LoadResult(latencies=[0.3], statuses={200: 1, 503: 1}, items=2, tokens=20, seconds=4.0,
                                  errors=["queue full"])
    summary = load_test.combine([first, second], concurrency=8)
    assert summary["requests_ok"] == 3 and summary["statuses"] == {"200": 3, "503": 1}
    assert summary["seconds"] == 4.0 and summary["items_per_s"] == 1.5 and summary["tokens_per_s"] == 15.0
    assert summary["latency_ms"]["max"] == 300.0 and summary["first_errors"] == ["queue full"]
    assert summary["client_processes"] == 2 and summary["concurrency"] == 8
