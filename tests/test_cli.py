"""The command line: the README's main job end to end, and --help that teaches."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

from sdtrt.cli import build_parser, main as cli


def test_main_job_on_the_embedded_default_writes_a_png_with_parameters(tmp_path, monkeypatch):
    """`sdtrt generate PROMPT`: tiny model -> ONNX -> ONNX Runtime -> PNG, with nothing prepared."""
    env = {"SDTRT_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = tmp_path / "fox.png"
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "generate", "a watercolor fox", "--seed", "42", "--steps", "5",
                           "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert image.size == (64, 64)
    params = image.text["parameters"]
    assert params.startswith("a watercolor fox\n") and "Steps: 5" in params and "Seed: 42" in params and "Sampler: PLMS" in params
    # the default model is cached under a key naming what made it (preset, seed, sdtrt version, options)
    assert [p.parent.parent.name for p in (tmp_path / "cache").glob("default/*/onnx/sdtrt.json")] == ["tiny-seed0-sdtrt0.1.0-fp32"]


def test_generate_writes_one_png_per_image(tiny_onnx, tmp_path):
    assert cli(["generate", "a cat", "a dog", "--model", str(tiny_onnx), "--num-images", "2", "--steps", "2", "--seed", "1",
                "--negative-prompt", "blurry", "--scheduler", "Euler a", "--out", str(tmp_path / "imgs") + "/", "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert files == [f"image-{i}.png" for i in range(4)]
    assert "Negative prompt: blurry" in Image.open(tmp_path / "imgs" / "image-3.png").text["parameters"]


@pytest.mark.parametrize("command", ["make-model", "export", "build", "generate", "inspect"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"sdtrt {command}" in out


def test_bad_scheduler_option_syntax_names_the_fix(tiny_onnx, capsys):
    assert cli(["generate", "x", "--model", str(tiny_onnx), "--scheduler-option", "karras"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
