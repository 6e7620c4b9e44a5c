"""The AOTInductor engine path (`sdtrt build --backend aoti`): torch.export + AOTInductor packages with
dynamic ranges like TensorRT profiles, run by the lean runtime unchanged above the backend protocol.
Images equal diffusers' (PSNR >= 45 dB, fp32 on the CPU); the compiled ranges and the manifest's
versions and hashes are enforced before anything runs. Compiling takes a minute or two on 2 cores,
so one module-scoped build serves every test."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from sdtrt import Pipeline
from sdtrt.artifacts import open_model_dir
from sdtrt.cli import main as cli
from sdtrt.errors import SdtrtError
from tests.helpers import psnr, reference_pipeline, seeded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packages(tiny_onnx, tmp_path_factory):
    from sdtrt.engines.aoti import build_aoti

    return build_aoti(tiny_onnx, tmp_path_factory.mktemp("aoti") / "cpu", components=["text_encoder", "unet", "vae_decoder"],
                      batch="1:1:2", height="48:64:96", width="48:64:96", show_progress=False, log=lambda *_: None)


def test_the_manifest_records_torch_the_device_hashes_and_ranges(packages):
    m = open_model_dir(packages).manifest
    import torch

    assert (m.backend.name, m.backend.version, m.targets) == ("aoti", torch.__version__, ["cpu"])
    assert set(m.engines) == {"text_encoder", "unet", "vae_decoder"} and all(e.path.endswith(".pt2") for e in m.engines.values())
    assert m.engines["unet"].profile["sample"] == [[1, 4, 6, 6], [2, 4, 8, 8], [4, 4, 12, 12]]


@pytest.mark.parametrize("size,prompts", [((64, 64), ["a watercolor fox"]), ((48, 88), ["a fox", "a red bicycle"])])
def test_packages_make_diffusers_images(packages, tiny_model, size, prompts):
    height, width = size
    ours = Pipeline.load(packages)(prompts, negative_prompt=["blurry"] * len(prompts), steps=4, seed=2, height=height, width=width,
                                   scheduler="dpmpp_2m", progress=False).images
    oracle = reference_pipeline(tiny_model, "dpmpp_2m")
    theirs = oracle(prompts, negative_prompt=["blurry"] * len(prompts), num_inference_steps=4, height=height, width=width,
                    generator=seeded(2)).images
    scores = [psnr(a, b) for a, b in zip(ours, theirs)]
    assert all(s >= 45 for s in scores), scores


def test_a_size_outside_the_compiled_range_is_refused_naming_the_flag(packages):
    with pytest.raises(SdtrtError, match=r"(?s)48-96 px.*--height"):
        Pipeline.load(packages)("a fox", steps=2, height=128, width=64, progress=False)


def test_packages_from_another_torch_or_damaged_are_refused_before_loading(packages, tmp_path):
    copy = shutil.copytree(packages, tmp_path / "p")
    manifest = json.loads((copy / "engines.json").read_text())
    manifest["backend"]["version"] = "1.0.0"
    (copy / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(SdtrtError, match="compiled by torch 1.0.0") as e:
        Pipeline.load(copy)
    assert "--backend aoti" in e.value.fix
    fresh = shutil.copytree(packages, tmp_path / "q")
    with open(fresh / "unet.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(SdtrtError, match="does not match engines.json"):
        Pipeline.load(fresh)


def test_build_and_inspect_from_the_command_line(tiny_onnx, tmp_path, capsys):
    assert cli(["build", str(tiny_onnx), "--backend", "aoti", "--out", str(tmp_path / "a"), "--components", "vae_decoder",
                "--batch", "1", "--height", "64", "--width", "64", "--no-progress"]) == 0
    assert cli(["inspect", str(tmp_path / "a")]) == 0
    assert "aoti" in capsys.readouterr().out
    assert cli(["build", str(tiny_onnx), "--backend", "aoti", "--out", str(tmp_path / "b"), "--dtype", "fp16", "--no-progress"]) == 2
    assert "--device cpu" in capsys.readouterr().err
