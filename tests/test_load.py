"""`xmr load`: Locust's gRPC users against the real tritonserver, and the reports it leaves behind."""

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xmr.clients.load import (
    RECIPES,
    Recipe,
    build_requests,
    load_content,
    parse_run_time,
    parse_weights,
    plan_tasks,
    read_manifest,
    repository_ensembles,
)
from xmr.models.errors import InputError

XMR = str(Path(sys.executable).parent / "xmr")
# never imported here: importing locust monkey-patches the whole process with gevent
needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs the `perf` extra")


def test_weights_and_run_time_parse():
    assert parse_weights(["text_search=3", "image_embed=0,video_embed=2"]) == {
        "text_search": 3,
        "image_embed": 0,
        "video_embed": 2,
    }
    for bad in ("text_search", "text_search=x", "=3", "text_search=-1"):
        with pytest.raises(InputError, match="ENSEMBLE=WEIGHT"):
            parse_weights([bad])
    assert parse_run_time(None) == 60 and parse_run_time(None, soak=True) == 600
    assert parse_run_time("20s") == 20 and parse_run_time("10m") == 600 and parse_run_time("1h2m3s") == 3723
    with pytest.raises(InputError, match="--run-time"):
        parse_run_time("ten minutes")


def test_plan_is_the_served_ensembles_with_recipes_and_weights():
    served = ["image_embed", "text_search", "some_new_ensemble"]
    assert plan_tasks(served, {}) == {"image_embed": 1, "text_search": 1}  # no recipe: not loaded
    assert plan_tasks(served, {"text_search": 3, "image_embed": 0}) == {"text_search": 3}
    with pytest.raises(InputError, match="unknown ensemble 'no_such'.*serves: image_embed, text_search"):
        plan_tasks(served, {"no_such": 1})
    with pytest.raises(InputError, match="'some_new_ensemble', which has no request recipe"):
        plan_tasks(served, {"some_new_ensemble": 1})
    with pytest.raises(InputError, match="nothing to load"):
        plan_tasks(served, {"text_search": 0, "image_embed": 0})


def test_requests_follow_the_specs(tiny_repository, monkeypatch):
    manifest = read_manifest(tiny_repository)
    assert repository_ensembles(tiny_repository) == ["image_embed", "text_search"]
    content = load_content(manifest, n=4)
    requests = build_requests(manifest, ["text_search", "image_embed"], content, n=4)
    text, top_k = requests["text_search"][1]["text"], requests["text_search"][1]["top_k"]
    assert text[0].shape == (1, 1) and text[1] == "BYTES" and text[0][0, 0] == content.captions[1].encode()
    assert top_k[0].shape == (1, 1) and top_k[0].dtype == np.int64
    image = requests["image_embed"][2]["image"]
    assert image[1] == "UINT8" and np.array_equal(image[0][0], content.images[2])
    # a recipe naming an input its ensemble lacks is a clear error, not a silent default
    monkeypatch.setitem(RECIPES, "image_embed", Recipe({"pixels": "image"}))
    with pytest.raises(InputError, match=r"RECIPES\['image_embed'\] fills pixels.*its inputs: image"):
        build_requests(manifest, ["image_embed"], content, n=1)


def test_unknown_weight_is_a_clear_error_before_the_server_starts(tiny_repository, tmp_path):
    bad = subprocess.run(
        [XMR, "load", str(tiny_repository), "--weight", "text_serch=2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "unknown ensemble 'text_serch'" in bad.stderr and "image_embed, text_search" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "tritonserver.log").exists()


@pytest.mark.server
@pytest.mark.slow
@needs_locust
def test_twenty_second_load_has_no_failures_and_complete_reports(tiny_repository, tmp_path):
    out = tmp_path / "load"
    run = subprocess.run(
        [XMR, "load", str(tiny_repository), "--users", "4", "--spawn-rate", "4", "--run-time", "20s"]
        + ["--weight", "text_search=2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr + (out / "locust.log").read_text()
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "load.png"):
        assert (out / name).stat().st_size > 0, name
    assert "<html" in (out / "locust_report.html").read_text()[:2000].lower()
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "locust_stats.csv", newline="") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f)}
    total = summary["total"]
    assert total["failures"] == 0 and int(stats["Aggregated"]["Failure Count"]) == 0
    assert total["requests"] == int(stats["Aggregated"]["Request Count"]) > 100
    assert total["sampled_requests"] == total["requests"]  # every request's latency, none missed
    assert set(summary["ensembles"]) == {"text_search", "image_embed"}
    for name, e in [*summary["ensembles"].items(), ("total", total)]:
        if name != "total":
            assert e["requests"] == int(stats[name]["Request Count"]) > 0, name
        assert 0 < e["p50_ms"] <= e["p95_ms"] <= e["p99_ms"] <= e["max_ms"], (name, e)
        assert e["requests_per_s"] > 0
    counts = {name: e["requests"] for name, e in summary["ensembles"].items()}
    assert 1.4 < counts["text_search"] / counts["image_embed"] < 2.8  # weight 2 : 1, up to chance
    assert summary["memory"]["samples"] >= 5 and summary["memory"]["with_stubs_rss_mib"]["max"] > 0
    with open(out / "summary.csv", newline="") as f:
        rows = {r["ensemble"]: r for r in csv.DictReader(f)}
    assert int(rows["total"]["requests"]) == total["requests"]


@pytest.mark.server
def test_refusal_memory_measures_each_phase_and_process(tiny_repository, tmp_path):
    """perf/refusal_memory.py on the tiny repository, two short phases: the hostile phase's requests are
    all refused (INVALID_ARGUMENT) and the good phase's all answered; every server process is sampled."""
    run = subprocess.run(
        [sys.executable, "-m", "xmr.perf.refusal_memory", str(tiny_repository), "--phases", "good", "hostile"]
        + ["--seconds", "2", "--threads", "2", "--control", "300", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "refusal_memory.json").read_text())
    good, hostile = summary["phases"]
    assert good["traffic"] == "good" and good["answered"] > 0 and good["refused"] == 0, good
    assert hostile["traffic"] == "hostile" and hostile["refused"] > 0 and hostile["answered"] == 0, hostile
    processes = set(hostile["uss_growth_mib"])
    assert "tritonserver" in processes and any(p.startswith("text_search (") for p in processes), processes
    assert summary["control"]["refused"] == 300
    with (tmp_path / "refusal_memory.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["traffic"] for r in rows} == {"idle", "good", "hostile"} and all(
        float(r["uss_mib"]) > 0 for r in rows
    )
