"""The benchmark harness (on the tiny models): complete JSON, the regression gate, the same-image check,
SDXL side by side, one system at a time. No test here asserts a speed."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest

from benchmarks.bench import main as bench
from benchmarks.harness import STAGES, image_check, regressions, write_json
from sdtrt.cli import main as cli
from sdtrt.errors import SdtrtError
from sdtrt.export.source import inspect_source, weights_sha256


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
    assert doc["config"]["family"] == "sd" and doc["config"]["mode"] == "interleaved"  # auto: the tiny model fits three times
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


def test_results_are_written_whole_with_the_permissions_open_would_give(result, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    assert sorted(p.name for p in result.parent.iterdir()) == ["bench.json", "bench.png"]  # no temporary left behind
    for path in (result, result.with_suffix(".png")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(TypeError):
        write_json({"x": object()}, tmp_path / "r.json")  # fails half-way: neither the file nor a temporary appears
    assert list(tmp_path.iterdir()) == []


# The quickest bench that still runs the reference and sdtrt and checks their images agree.
FAST = ["--height", "64", "--width", "64", "--steps", "2", "--repeats", "1", "--warmup", "0", "--no-overhead",
        "--systems", "diffusers,sdtrt"]


def _sha(model_dir) -> str:
    return weights_sha256(inspect_source(model_dir).weight_files, model_dir)


def test_models_with_the_same_folder_name_never_share_cached_exports(tiny_model, tmp_path, capsys):
    from benchmarks.bench import _presets

    other = _presets().make_model("tiny", tmp_path / "elsewhere" / "tiny", seed=1)  # same name, other weights
    assert tiny_model.name == other.name == "tiny" and _sha(tiny_model) != _sha(other)
    work = tmp_path / "work"

    def bench_ok(model) -> str:
        out = tmp_path / "r.json"
        capsys.readouterr()
        assert bench([str(model), "--work-dir", str(work), "--out", str(out), *FAST]) == 0  # 3 would be IMAGES DIFFER
        doc = json.loads(out.read_text())
        assert doc["same_image"]["ok"] and doc["config"]["weights_sha256"] == _sha(model)
        return capsys.readouterr().out

    exports = {}
    for model in (tiny_model, other):
        assert "exporting tiny to" in bench_ok(model)  # the second model is exported, not served the first's ONNX
        exports[model] = work / _sha(model)[:16] / "onnx-fp32-64x64"  # keyed by content and options, not by name
        assert json.loads((exports[model] / "sdtrt.json").read_text())["source"]["sha256"] == _sha(model)
    assert exports[tiny_model] != exports[other]

    # An export is reused only when its sdtrt.json names these weights: plant the first model's export
    # where the second's belongs, and the second bench exports again instead of trusting the folder.
    shutil.rmtree(exports[other])
    shutil.copytree(exports[tiny_model], exports[other])
    assert "exported from other weights" in bench_ok(other)
    assert json.loads((exports[other] / "sdtrt.json").read_text())["source"]["sha256"] == _sha(other)


def _not_a_result(tmp_path, text: str):
    path = tmp_path / "baseline.json"
    path.write_text(text)
    return path


def _binary(tmp_path):
    path = tmp_path / "baseline.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    return path


# (extra flags, the flag the refusal must name); each gets a fresh tmp_path to make files in
REFUSED = {
    "compare-missing": (lambda t: ["--compare", str(t / "missing.json")], "--compare"),
    "compare-a-folder": (lambda t: ["--compare", str(t)], "--compare"),
    "compare-not-json": (lambda t: ["--compare", str(_not_a_result(t, "{not json"))], "--compare"),
    "compare-not-text": (lambda t: ["--compare", str(_binary(t))], "--compare"),
    "compare-other-json": (lambda t: ["--compare", str(_not_a_result(t, '{"schema": "something-else/1"}'))], "--compare"),
    "compare-a-list": (lambda t: ["--compare", str(_not_a_result(t, "[1, 2]"))], "--compare"),
    "compare-no-medians": (lambda t: ["--compare", str(_not_a_result(t, '{"schema": "sdtrt-bench/1", "systems": {"diffusers": {}}}'))],
                           "--compare"),
    "out-a-folder": (lambda t: ["--out", str(t)], "--out"),
    "out-under-a-file": (lambda t: ["--out", str(_not_a_result(t, "x") / "r.json")], "--out"),
    "plot-a-folder": (lambda t: ["--plot", str(t)], "--plot"),
    "max-regression-garbage": (lambda t: ["--max-regression", "lots"], "--max-regression"),
    "max-regression-negative": (lambda t: ["--max-regression=-5%"], "--max-regression"),
    "max-regression-nan": (lambda t: ["--max-regression", "nan"], "--max-regression"),
    "batch-0": (lambda t: ["--batch", "0"], "--batch"),
    "steps-0": (lambda t: ["--steps", "0"], "--steps"),
    "repeats-0": (lambda t: ["--repeats", "0"], "--repeats"),
    "warmup-negative": (lambda t: ["--warmup", "-1"], "--warmup"),
    "threads-negative": (lambda t: ["--threads", "-2"], "--threads"),
    "height-not-multiple-of-8": (lambda t: ["--height", "60"], "--height"),
    "height-negative": (lambda t: ["--height", "-64"], "--height"),
    "width-0": (lambda t: ["--width", "0"], "--width"),
    "guidance-inf": (lambda t: ["--guidance-scale", "inf"], "--guidance-scale"),
    "guidance-nan": (lambda t: ["--guidance-scale", "nan"], "--guidance-scale"),
    "min-psnr-nan": (lambda t: ["--min-psnr", "nan"], "--min-psnr"),
    "unknown-system": (lambda t: ["--systems", "sdtrt,warp-drive"], "--systems"),
    "unknown-scheduler": (lambda t: ["--scheduler", "warp"], "--scheduler"),
    "prompts-for-batch": (lambda t: ["--batch", "2", "--prompt", "one fox"], "--prompt"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_flags_are_refused_before_any_work_naming_the_flag(case, tiny_model, tmp_path):
    extra, flag = REFUSED[case]
    work, out = tmp_path / "work", tmp_path / "out" / "r.json"
    with pytest.raises(SdtrtError) as e:
        bench([str(tiny_model), "--work-dir", str(work), "--out", str(out), *extra(tmp_path)])
    assert flag in e.value.fix  # the fix says which flag to change
    assert not work.exists() and not out.parent.exists()  # nothing was made, loaded or exported


def test_presets_are_refused_before_they_are_made(tmp_path):
    work = tmp_path / "work"
    with pytest.raises(SdtrtError, match="--compare"):
        bench(["--preset", "tiny", "--work-dir", str(work), "--compare", str(tmp_path / "missing.json")])
    with pytest.raises(SdtrtError, match="unknown preset"):
        bench(["--preset", "tiny-xl-ultra", "--work-dir", str(work)])
    assert not work.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_out_folder_is_refused_before_any_work(tiny_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SdtrtError, match="not writable") as e:
        bench([str(tiny_model), "--work-dir", str(tmp_path / "work"), "--out", str(locked / "sub" / "r.json")])
    assert "--out" in e.value.fix and not (tmp_path / "work").exists()


def test_cli_names_the_compare_fix_without_a_traceback(tiny_model, tmp_path, capsys):
    code = cli(["bench", str(tiny_model), "--work-dir", str(tmp_path / "work"), "--compare", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "missing.json does not exist" in err and "pass an existing results JSON to --compare" in err  # the problem and its fix
    assert not (tmp_path / "work").exists()


# --- SDXL, and one system at a time ----------------------------------------------------------------

SDXL_FAST = ["--height", "64", "--width", "64", "--steps", "2", "--repeats", "1", "--warmup", "0", "--systems", "diffusers,optimum,sdtrt"]


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl_model, tmp_path_factory) -> dict:
    """The same SDXL bench, interleaved (with the no-op-UNet overhead runs) and one system at a time,
    sharing one work folder (the second reuses the exports); and that folder, as "work"."""
    work = tmp_path_factory.mktemp("bench-sdxl-work")
    docs: dict = {"work": work}
    for mode, extra in (("interleaved", []), ("one-at-a-time", ["--no-overhead"])):
        out = work / f"{mode}.json"
        assert bench([str(tiny_sdxl_model), "--work-dir", str(work), "--out", str(out), "--mode", mode, *SDXL_FAST, *extra]) == 0
        docs[mode] = json.loads(out.read_text())
    return docs


def test_sdxl_runs_in_diffusers_optimum_and_sdtrt_each_making_diffusers_image(sdxl_runs):
    doc = sdxl_runs["interleaved"]
    assert doc["config"]["family"] == "sdxl" and doc["config"]["guidance_scale"] == 7.5  # explicit, for every system
    assert set(doc["systems"]) == {"diffusers", "optimum-ort", "sdtrt-onnxruntime"}
    report = doc["same_image"]
    assert report["ok"] and report["psnr_db"].keys() == {"optimum-ort", "sdtrt-onnxruntime"}
    assert all(db is None or db >= 40 for db in report["psnr_db"].values()), report  # None: identical
    for entry in doc["systems"].values():
        assert entry["samples"][0]["unet_calls"] == 2 and entry["summary"]["text_encoder"]["median"] > 0
        assert entry["step_overhead_ms"] > 0  # the no-op UNet works with SDXL's added conditioning too


def test_one_at_a_time_makes_the_same_images_and_says_so_in_the_json(sdxl_runs):
    together, alone = sdxl_runs["interleaved"], sdxl_runs["one-at-a-time"]
    assert together["config"]["mode"] == "interleaved" and alone["config"]["mode"] == "one-at-a-time"
    assert alone["config"]["mode_reason"] == "--mode one-at-a-time"
    assert alone["same_image"]["ok"] and alone["same_image"]["image_sha256"] == together["same_image"]["image_sha256"]
    assert alone["config"]["systems"] == together["config"]["systems"] == ["diffusers", "optimum-ort", "sdtrt-onnxruntime"]
    for entry in alone["systems"].values():
        assert entry["rss_peak_mb"] > 0 and entry["rss_after_unload_mb"] > 0 and "speedup_vs_diffusers" in entry


def test_both_sdxl_text_encoders_are_timed_as_the_text_encoder_stage(tiny_sdxl_model, sdxl_runs):
    import torch

    from benchmarks.systems import DiffusersSystem, OptimumSystem, Request
    from sdtrt.export.source import inspect_source

    family = inspect_source(tiny_sdxl_model).family
    cache = next(p for p in sdxl_runs["work"].glob("*/optimum-onnx-*") if OptimumSystem.exported_from(p))  # the bench's export
    request = Request(["a fox"], ["blurry"], steps=1, guidance_scale=7.5, height=64, width=64, scheduler="euler", seed=0)
    for system in (DiffusersSystem(tiny_sdxl_model, torch.device("cpu"), family), OptimumSystem(cache, torch.device("cpu"), family)):
        system.run(request)
        assert system.timers.calls["text_encoder"] == 4, system.name  # 2 encoders x (prompt, negative prompt)


def test_auto_mode_loads_one_system_at_a_time_only_when_they_do_not_fit():
    from benchmarks.bench import choose_mode

    gib = 2**30
    assert choose_mode("auto", 1 * gib, 3, 20 * gib)[0] == "interleaved"
    mode, why = choose_mode("auto", 13 * gib, 3, 20 * gib)  # full-size SDXL, fp32, three times, on a 24 GB machine
    assert mode == "one-at-a-time" and "do not fit" in why and "39.0 GiB" in why and "20.0 GiB" in why
    assert choose_mode("interleaved", 13 * gib, 3, 20 * gib) == ("interleaved", "--mode interleaved")  # asked for: obeyed


def test_auto_mode_switches_and_logs_why(tiny_model, tmp_path, monkeypatch, capsys):
    import benchmarks.bench as b

    monkeypatch.setattr(b, "available_memory", lambda device: (1000, "memory"))  # 1000 bytes free
    out = tmp_path / "r.json"
    assert bench([str(tiny_model), "--work-dir", str(tmp_path / "work"), "--out", str(out), *FAST, "--systems", "diffusers"]) == 0
    logged = capsys.readouterr().out
    assert "mode one-at-a-time: auto: the systems do not fit in memory together" in logged and "unloaded diffusers" in logged
    doc = json.loads(out.read_text())
    assert doc["config"]["mode"] == "one-at-a-time" and "do not fit" in doc["config"]["mode_reason"]


@pytest.mark.parametrize("preset", ["tiny-inpaint", "tiny-sdxl-refiner"])
def test_models_that_are_not_text_to_image_are_refused_before_any_work(preset, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(SdtrtError, match="sdtrt bench times text-to-image") as e:
        bench(["--preset", preset, "--work-dir", str(work)])
    assert "--preset" in e.value.fix and not work.exists()


def test_controlnet_benchmark_runs_diffusers_controlnet_pipeline_against_sdtrt(tiny_model, tmp_path, capsys):
    """--controlnet: diffusers' ControlNet pipeline vs sdtrt, same image, the ControlNet's time per call reported;
    a second run reuses the export (its sdtrt.json hashes the model's and the ControlNet's weights together)."""
    from benchmarks.bench import main as bench

    out = tmp_path / "cn.json"
    args = [str(tiny_model), "--controlnet", "tiny-controlnet", "--systems", "diffusers,optimum,sdtrt", "--work-dir", str(tmp_path / "w"),
            "--out", str(out), "--steps", "2", "--repeats", "1", "--warmup", "0", "--height", "64", "--width", "64", "--no-overhead"]
    assert bench(args) == 0
    doc = json.loads(out.read_text())
    assert set(doc["systems"]) == {"diffusers", "sdtrt-onnxruntime"}  # Optimum has no ControlNet pipeline
    assert doc["same_image"]["ok"] and doc["config"]["controlnet"] == "tiny-controlnet"
    for entry in doc["systems"].values():
        assert entry["summary"]["controlnet_per_call"]["median"] > 0
    assert "exporting" in capsys.readouterr().out
    assert bench(args) == 0
    assert "exporting" not in capsys.readouterr().out


def test_cold_start_times_fresh_processes_with_and_without_the_cached_graphs(tiny_model, tmp_path):
    """--cold-start N: separate processes, import / load / first image, for diffusers and sdtrt (cached graphs,
    no cache, and the first start that writes the cache); the first start really filled the cache."""
    out = tmp_path / "cold.json"
    work = tmp_path / "w"
    assert bench([str(tiny_model), "--systems", "diffusers,sdtrt", "--work-dir", str(work), "--out", str(out), "--steps", "2",
                  "--repeats", "1", "--warmup", "0", "--height", "64", "--width", "64", "--no-overhead", "--cold-start", "1"]) == 0
    cold = json.loads(out.read_text())["cold_start"]
    assert cold["system"] == "sdtrt-onnxruntime" and cold["rounds"] == 1
    assert set(cold["median"]) == {"diffusers", "sdtrt", "sdtrt-no-cache", "sdtrt-first-start"}
    for stages in cold["median"].values():
        assert all(stages[k] > 0 for k in ("import", "load", "first_image"))
        assert stages["total"] == pytest.approx(stages["import"] + stages["load"] + stages["first_image"], abs=0.01)
    assert set(cold["over_diffusers"]) == {"sdtrt", "sdtrt-no-cache", "sdtrt-first-start"}
    entries = list((work / "cold-start-cache" / "ort-optimized").iterdir())
    assert len(entries) == 3  # text encoder, UNet, VAE decoder
