"""`sdtrt build` with TensorRT-RTX on this CPU-only machine: real engines, manifest, cache, and the
checks the runtime makes before it would deserialize them on a GPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from sdtrt.cli import main as cli
from sdtrt.engines.build import build_engines
from sdtrt.errors import SdtrtError
from sdtrt.files import file_sha256
from sdtrt.artifacts import open_model_dir
from sdtrt.runtime.backends.profile_check import check_profile
from sdtrt.runtime.backends.tensorrt import preflight

pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package (pip install 'sdtrt[tensorrt-rtx]')")
import tensorrt_rtx  # noqa: E402

TARGETS = "sm86,sm89"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def fp32_dynamic(tiny_onnx, tmp_path_factory, cache) -> Path:
    return build_engines(tiny_onnx, tmp_path_factory.mktemp("eng") / "fp32", target=TARGETS, batch="1:1:4",
                         height="48:64:96", width="48:64:96", cache=cache, show_progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def fp16_static(tiny_onnx_fp16, tmp_path_factory, cache) -> Path:
    return build_engines(tiny_onnx_fp16, tmp_path_factory.mktemp("eng") / "fp16", target=TARGETS, batch="1",
                         cache=cache, show_progress=False, log=lambda *_: None)


def _manifest(d: Path) -> dict:
    return json.loads((d / "engines.json").read_text())


@pytest.mark.parametrize("fixture,dtype,static", [("fp32_dynamic", "fp32", False), ("fp16_static", "fp16", True)])
def test_build_writes_engines_and_a_manifest_with_hashes(fixture, dtype, static, request):
    d: Path = request.getfixturevalue(fixture)
    m = _manifest(d)
    assert m["backend"] == {"name": "tensorrt-rtx", "module": "tensorrt_rtx", "version": tensorrt_rtx.__version__}
    assert m["targets"] == ["sm86", "sm89"]
    assert set(m["engines"]) == set(json.loads((d / "sdtrt.json").read_text())["components"])
    for name, e in m["engines"].items():
        path = d / e["path"]
        assert path.stat().st_size == e["size_bytes"] > 100_000
        assert file_sha256(path) == e["sha256"]
        assert len(e["onnx_sha256"]) == 64 and sum(e["layers"].values()) > 50
    unet = m["engines"]["unet"]
    assert unet["dtype"] == dtype
    assert open_model_dir(d).specs["unet"].tensor("sample").concrete_dtype(unet["dtype"]) == ("float16" if dtype == "fp16" else "float32")
    assert m["engines"]["vae_decoder"]["dtype"] == "fp32"  # the VAE stays fp32 in an fp16 export
    # the engine directory is self-contained for the runtime
    assert (d / "tokenizer" / "vocab.json").is_file() and (d / "scheduler" / "scheduler_config.json").is_file()


def test_profiles_follow_the_users_ranges(fp32_dynamic, fp16_static):
    dyn = _manifest(fp32_dynamic)["engines"]
    # batch 1:1:4 images -> UNet 1 (guidance off) .. 2 (opt, guidance on) .. 8; 48:64:96 px -> 6:8:12 latents
    assert dyn["unet"]["profile"]["sample"] == [[1, 4, 6, 6], [2, 4, 8, 8], [8, 4, 12, 12]]
    assert dyn["text_encoder"]["profile"]["input_ids"][2] == [8, 77]  # prompts + negatives
    assert dyn["vae_decoder"]["profile"]["latent"][2] == [4, 4, 12, 12]
    lo, opt, hi = _manifest(fp16_static)["engines"]["vae_decoder"]["profile"]["latent"]
    assert lo == opt == hi == [1, 4, 8, 8]


def test_long_prompt_chunks_widen_the_text_axis(tiny_onnx, cache, tmp_path):
    d = build_engines(tiny_onnx, tmp_path / "long", target="sm86", batch="1:1:2", components=["text_encoder", "unet"],
                      max_prompt_chunks=3, cache=cache, show_progress=False, log=lambda *_: None)
    e = _manifest(d)["engines"]
    ehs = e["unet"]["profile"]["encoder_hidden_states"]
    assert ehs[0][1] == 77 and ehs[2][1] == 231
    assert e["text_encoder"]["profile"]["input_ids"][2] == [12, 77]  # 2 x 2 images x 3 chunks
    with pytest.raises(SdtrtError, match="--max-prompt-chunks 4"):
        check_profile(_unet_spec(d), e["unet"]["profile"], {"encoder_hidden_states": (2, 308, 32)}, "sdtrt build X --out Y")


def _unet_spec(d: Path):
    return open_model_dir(d).specs["unet"]


def test_same_inputs_and_flags_hit_the_cache_and_anything_else_rebuilds(tiny_onnx, fp32_dynamic, cache, tmp_path):
    messages = []
    again = build_engines(tiny_onnx, tmp_path / "again", target=TARGETS, batch="1:1:4", height="48:64:96", width="48:64:96",
                          cache=cache, show_progress=False, log=messages.append)
    assert all("cache hit" in m for m in messages) and len(messages) == 4
    first, second = _manifest(fp32_dynamic)["engines"], _manifest(again)["engines"]
    assert all(second[n]["sha256"] == first[n]["sha256"] and second[n]["cache_hit"] for n in first)
    messages.clear()
    build_engines(tiny_onnx, tmp_path / "other", target="sm86", batch="1:1:4", height="48:64:96", width="48:64:96",
                  components=["vae_decoder"], cache=cache, show_progress=False, log=messages.append)
    assert messages and "built" in messages[0]  # another target set: a new engine


def test_request_outside_the_profile_is_refused_with_the_range_and_flag(fp32_dynamic):
    entry, spec = _manifest(fp32_dynamic)["engines"]["unet"]["profile"], _unet_spec(fp32_dynamic)
    with pytest.raises(SdtrtError, match=r"(?s)48-96 px.*--height") as e:
        check_profile(spec, entry, {"sample": (2, 4, 16, 8)}, "sdtrt build ONNX --out ENG")
    assert "128 px" in str(e.value)
    with pytest.raises(SdtrtError, match=r"(?s)1-8.*--batch"):
        check_profile(spec, entry, {"sample": (10, 4, 8, 8)}, "sdtrt build ONNX --out ENG")
    check_profile(spec, entry, {"sample": (2, 4, 12, 6)}, "x")  # inside: no error


def _copy(d: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(d, tmp_path / d.name))


def test_tampered_engine_is_refused_by_hash_before_loading(fp16_static, tmp_path):
    d = _copy(fp16_static, tmp_path)
    with open(d / "unet.engine", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(SdtrtError, match="does not match engines.json") as e:
        preflight(open_model_dir(d))
    assert "sdtrt build" in e.value.fix


def test_manifest_from_another_library_version_is_refused(fp16_static, tmp_path):
    d = _copy(fp16_static, tmp_path)
    m = _manifest(d)
    m["backend"]["version"] = "1.0.0.0"
    (d / "engines.json").write_text(json.dumps(m))
    with pytest.raises(SdtrtError, match=r"built with TensorRT-RTX 1\.0\.0\.0") as e:
        preflight(open_model_dir(d))
    assert "sdtrt build" in e.value.fix and "tensorrt-rtx==1.0.0.0" in e.value.fix


def test_loading_engines_without_a_gpu_points_to_the_onnx_dir(fp16_static):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from sdtrt import Pipeline

    with pytest.raises(SdtrtError, match="needs an NVIDIA GPU") as e:
        Pipeline.load(fp16_static)
    assert "onnxruntime" in e.value.fix


def test_inspect_shows_the_manifest(fp32_dynamic, capsys):
    assert cli(["inspect", str(fp32_dynamic), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "tensorrt-rtx" in out and "sm86, sm89" in out and "[8,4,12,12]" in out and "CONVOLUTION" in out


# --- bad input ------------------------------------------------------------------------------------


def _err(capsys, argv) -> str:
    assert cli(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [
    (["--batch", "4:2:1"], "MIN <= OPT <= MAX"),
    (["--height", "60"], "multiple of 8"),
    (["--width", "64:x:96"], "MIN:OPT:MAX"),
    (["--target", "sm90"], "use --backend tensorrt"),
    (["--target", "sm70"], "sm75, sm80"),
    (["--components", "unet,vae_encoder"], "re-export with --components"),
    (["--timing-cache", "t.cache"], "runtime cache"),
    (["--opt-level", "9"], "0-5"),
])
def test_bad_build_flags_are_refused_naming_the_fix(tiny_onnx_fp16, tmp_path, capsys, flags, match):
    argv = ["build", str(tiny_onnx_fp16), "--out", str(tmp_path / "e"), "--no-progress"]
    if "--target" not in flags:
        argv += ["--target", "sm86"]
    assert match in _err(capsys, argv + flags)
    assert not (tmp_path / "e").exists()


def test_no_target_without_a_gpu_asks_for_one(tiny_onnx, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, which is the default target")
    assert "--target" in _err(capsys, ["build", str(tiny_onnx), "--out", str(tmp_path / "e")])


def test_missing_tensorrt_library_names_the_extra(tiny_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this machine: full TensorRT is not installable
    assert "sdtrt[tensorrt]" in _err(capsys, ["build", str(tiny_onnx), "--out", str(tmp_path / "e"), "--backend", "tensorrt"])


def test_build_failure_surfaces_tensorrts_error_and_leaves_nothing(tiny_onnx, tmp_path, capsys):
    # a 1 MiB workspace leaves TensorRT no way to implement the UNet, and it says so
    err = _err(capsys, ["build", str(tiny_onnx), "--out", str(tmp_path / "e"), "--target", "sm86", "--workspace", "1",
                        "--components", "unet", "--no-cache", "--no-progress"])
    assert "TensorRT-RTX failed to build" in err and "workspace limit" in err and "raise --workspace" in err
    assert list(tmp_path.iterdir()) == []


def test_non_onnx_dir_is_refused(tiny_model, tmp_path, capsys):
    assert "sdtrt export" in _err(capsys, ["build", str(tiny_model), "--out", str(tmp_path / "e"), "--target", "sm86"])


@pytest.mark.parametrize("fixture", ["tiny_sd2_onnx", "tiny_inpaint_onnx"])
def test_sd2_and_inpainting_models_build_like_the_others(fixture, request, cache, tmp_path):
    onnx_dir = request.getfixturevalue(fixture)
    d = build_engines(onnx_dir, tmp_path / "e", target="sm89", batch="1:1:2", cache=cache, show_progress=False, log=lambda *_: None)
    engines = _manifest(d)["engines"]
    meta = json.loads((onnx_dir / "sdtrt.json").read_text())
    assert engines["unet"]["profile"]["sample"][0][1] == meta["config"]["unet"]["in_channels"]  # 9 for inpainting UNets
    assert set(engines) == set(meta["components"])
