"""The pure parts of the text_search benchmark: perf_analyzer output parsing and the aggregation.

No server is started; the perf_analyzer CSV and console text below were captured from a real run
(tritonclient 2.51.0's perf_analyzer against the served `text_search`, batch 8, concurrency 16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmr.perf.bench_text_search import (
    Point,
    Settings,
    parse_perf_csv,
    parse_request_count,
    percentiles_ms,
    perf_analyzer_command,
    perf_analyzer_input,
    points_csv,
    request_batches,
    summarise,
    throughput_ratios,
)

PA_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
    "16,1056.27,8,71232,2,109,8709,889,4,75916,109330,130075,156281\n"
)

PA_STDOUT = """\
Request concurrency: 16
  Client:
    Request count: 400
    Throughput: 1056.27 infer/sec
    p50 latency: 75916 usec
  Server:
    Inference count: 3192
    Execution count: 399
    Successful request count: 399
"""


def test_parse_perf_csv_converts_us_to_ms_and_keeps_inferences_per_second():
    (p,) = parse_perf_csv(PA_CSV, batch=8, requests=400)
    assert (p.backend, p.batch, p.concurrency, p.requests) == ("served", 8, 16, 400)
    assert p.throughput_qps == pytest.approx(1056.27)  # already captions/s: not multiplied by the batch
    assert (p.p50_ms, p.p90_ms, p.p99_ms) == pytest.approx((75.916, 109.33, 156.281))


def test_parse_request_count_reads_the_client_count_not_the_servers():
    assert parse_request_count(PA_STDOUT) == 400
    assert parse_request_count("no measurement") == 0


def test_percentiles_ms():
    latencies_s = np.arange(1, 101) / 1e3  # 1..100 ms
    assert percentiles_ms(latencies_s) == pytest.approx((50.5, 90.1, 99.01))


def test_summarise_counts_every_caption_of_a_batch():
    p = summarise("in-process", batch=8, concurrency=4, latencies_s=[0.01] * 50, wall_s=2.0)
    assert p.requests == 50
    assert p.throughput_qps == pytest.approx(50 * 8 / 2.0)
    assert p.p50_ms == pytest.approx(10.0)


def test_request_batches_send_every_caption_and_wrap():
    captions = [f"c{i}" for i in range(5)]
    batches = request_batches(captions, 2)
    assert len(batches) == 5 and all(len(b) == 2 for b in batches)
    assert batches[0] == ["c0", "c1"] and batches[2] == ["c4", "c0"]
    assert {c for b in batches for c in b} == set(captions)


def test_perf_analyzer_input_is_one_batch1_step_per_caption():
    data = perf_analyzer_input(["a red circle", "a blue square"], top_k=10)
    assert data == {
        "data": [{"text": ["a red circle"], "top_k": [10]}, {"text": ["a blue square"], "top_k": [10]}]
    }


def test_perf_analyzer_command_short_options_are_separate_arguments():
    settings = Settings([8], [16], 1000, 25, 10, 200, 48, 10)
    cmd = perf_analyzer_command("127.0.0.1:1234", Path("in.json"), 8, 16, settings, Path("out.csv"))
    assert cmd[cmd.index("-b") + 1] == "8" and cmd[cmd.index("-u") + 1] == "127.0.0.1:1234"
    assert "--concurrency-range=16" in cmd and "--measurement-interval=1000" in cmd
    assert not any(a.startswith(("-m=", "-b=", "-u=", "-f=")) for a in cmd)  # perf_analyzer rejects those


def test_throughput_ratios_and_csv():
    points = [
        Point("served", 1, 4, 300.0, 10.0, 12.0, 20.0, 100),
        Point("in-process", 1, 4, 1200.0, 1.0, 2.0, 3.0, 100),
        Point("in-process", 8, 4, 2000.0, 5.0, 6.0, 7.0, 100),  # no served counterpart: no ratio
    ]
    assert throughput_ratios(points) == {(1, 4): pytest.approx(0.25)}
    lines = points_csv(points).splitlines()
    assert lines[0] == (
        "backend,batch,concurrency,throughput_qps,p50_ms,p90_ms,p99_ms,requests,"
        "cores_server,cores_stubs,cores_client"
    )
    assert lines[1] == "served,1,4,300.0,10.0,12.0,20.0,100,nan,nan,nan"  # CPU not measured here


def test_perf_analyzer_command_model_and_transports():
    settings = Settings([1], [1], 1000, 25, 10, 200, 48, 10, model="text_search_fused")
    cmd = perf_analyzer_command("127.0.0.1:1", Path("in.json"), 1, 1, settings, Path("out.csv"))
    assert cmd[cmd.index("-m") + 1] == "text_search_fused"
    assert not any(a.startswith(("--shared-memory", "--streaming")) for a in cmd)  # defaults: plain gRPC
    settings = Settings([1], [1], 1000, 25, 10, 200, 48, 10, shared_memory="system", streaming=True)
    cmd = perf_analyzer_command("127.0.0.1:1", Path("in.json"), 1, 1, settings, Path("out.csv"))
    assert "--shared-memory=system" in cmd and "--streaming" in cmd
    assert any(a.startswith("--output-shared-memory-size=") for a in cmd)  # ids/scores have a variable k
    assert "--async" not in cmd
    settings = Settings([1], [1], 1000, 25, 10, 200, 48, 10, asynchronous=True)
    assert "--async" in perf_analyzer_command("127.0.0.1:1", Path("in.json"), 1, 1, settings, Path("o.csv"))
