"""The benchmark harness (on the tiny model): complete JSON, the regression gate, the same-image check.
No test here asserts a speed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from benchmarks.harness import STAGES, image_check, regressions
from sdtrt.cli import main as cli


@pytest.fixture(scope="module")
def result(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    work = tmp_path_factory.mktemp("bench-work")
    assert cli(["bench", str(tiny_model), "--work-dir", str(work), "--height", "64", "--width", "64", "--steps", "3",
                "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    return out


def test_results_json_has_every_field(result):
    doc = json.loads(result.read_text())
    assert doc["schema"] == "sdtrt-bench/1"
    assert {"cpu", "cores"} <= set(doc["machine"]) and {"torch", "diffusers", "onnxruntime"} <= set(doc["versions"])
    assert doc["config"]["steps"] == 3 and doc["config"]["height"] == 64
    assert set(doc["systems"]) == {"diffusers", "optimum-ort", "sdtrt-onnxruntime"}
    for name, entry in doc["systems"].items():
        assert len(entry["samples"]) == 2
        assert set(entry["summary"]) == set(STAGES)
        for stage in STAGES:
            s = entry["summary"][stage]
            assert 0 < s["min"] <= s["median"] <= s["max"]
        assert entry["samples"][0]["unet_calls"] == 3
        assert entry["speedup_vs_diffusers"]["end_to_end"] > 0
        assert entry["step_overhead_ms"] > 0 and entry["rss_peak_mb"] > 0 and entry["rss_load_delta_mb"] is not None
    assert doc["same_image"]["ok"] and doc["same_image"]["psnr_db"].keys() == {"optimum-ort", "sdtrt-onnxruntime"}
    assert result.with_suffix(".png").stat().st_size > 10_000  # the per-stage chart


def _slower(doc: dict, system: str, stage: str, factor: float) -> dict:
    changed = copy.deepcopy(doc)
    changed["systems"][system]["summary"][stage]["median"] *= factor
    return changed


def test_an_equal_run_passes_the_gate_and_a_regression_is_named(result):
    doc = json.loads(result.read_text())
    assert regressions(doc, doc, 0.05) == []
    found = regressions(_slower(doc, "sdtrt-onnxruntime", "unet_per_call", 1.10), doc, 0.05)
    assert len(found) == 1 and "sdtrt-onnxruntime unet_per_call" in found[0] and "+10.0%" in found[0]
    assert regressions(_slower(doc, "sdtrt-onnxruntime", "unet_per_call", 1.04), doc, 0.05) == []


def test_compare_flag_exits_non_zero_naming_the_stage(result, tiny_model, tmp_path, capsys):
    doc = json.loads(result.read_text())
    baseline = tmp_path / "baseline.json"
    # a baseline where every stage was 3x faster: the new run must be flagged
    fast = copy.deepcopy(doc)
    for entry in fast["systems"].values():
        for stage in STAGES:
            entry["summary"][stage]["median"] /= 3
    baseline.write_text(json.dumps(fast))
    with pytest.raises(SystemExit) as e:
        cli(["bench", str(tiny_model), "--work-dir", str(tmp_path / "w"), "--height", "64", "--width", "64", "--steps", "2",
             "--repeats", "1", "--warmup", "0", "--systems", "sdtrt", "--no-overhead", "--out", str(tmp_path / "r.json"),
             "--compare", str(baseline), "--max-regression", "5%"])
    assert e.value.code == 4
    assert "REGRESSION" in capsys.readouterr().out


def test_same_image_check_catches_a_different_image():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    near = ref.copy()
    near[0, 0, 0] ^= 1  # one value off by one: still the same picture
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    report = image_check({"diffusers": ref, "a": ref.copy(), "b": near, "c": other}, min_psnr=40)
    assert not report["ok"] and len(report["failures"]) == 1 and report["failures"][0].startswith("c:")
    assert report["psnr_db"]["a"] is None and report["psnr_db"]["b"] > 80  # identical; one value off by one
