"""Reliability, as a specification: every bad input and every interruption ends in one clear error line,
nothing is lost, nothing is overwritten, and nothing half-written ever looks finished.

1. Bad input anywhere on the command line: exit 2, exactly one `sdtrt: error: ... Fix: ...` line on
   stderr that names the flag or command that fixes it, no traceback, and not one file created or
   changed (a snapshot of every folder involved is taken before and after).
2. Out of memory and NaN/inf from a stage: one line naming the stage, and no image.
3. Ctrl-C and SIGTERM (real signals to a real process): exit 130 / 143 within seconds, nothing that
   looks finished, no build worker left running.
4. SIGKILL and two writers at once: only hidden `.NAME.PID.*.partial` entries are ever left, the next
   run removes them, and concurrent writers never tear an output.
5. Written files get the permissions a plain open() gives under the caller's umask.
6. Image files: the format the suffix asks for, A1111's parameters in it, numbered files never
   overwritten.
7. Stderr carries what a user needs and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt import __version__
from sdtrt.artifacts import EngineFile, EngineManifest, Library, open_model_dir
from sdtrt.cli import main as cli
from sdtrt.files import file_sha256

# a flag (--height) or a command (`sdtrt export ...`, `sdtrt --help`)
NAMES_A_FIX = re.compile(r"--[a-z][a-z0-9-]*|\bsdtrt (?:make-model|export|build|generate|inspect|bench)\b|sdtrt --help")
PARTIAL = re.compile(r"^\..+\.\d+\..*\.partial$")  # a hidden temporary sibling: .NAME.PID.*.partial
BUILD_TARGET = "sm86"


# --- helpers -------------------------------------------------------------------------------------


def run(argv: list[str], capfd) -> tuple[int, str]:
    """`sdtrt ARGV` in this process: (exit code, stderr). Both Python's and native libraries' stderr count."""
    try:
        code = cli(argv)
    except SystemExit as e:  # argparse's own exit, as `python -m sdtrt` would see it
        code = e.code
    return code, capfd.readouterr().err


def snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry under `roots`: files with (size, mtime), folders by name (a folder's mtime moves when a
    write probe comes and goes, which is allowed)."""
    found: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for d in dirs:
                found[os.path.join(folder, d)] = None
            for f in files:
                st = os.lstat(os.path.join(folder, f))
                found[os.path.join(folder, f)] = (st.st_size, st.st_mtime_ns)
    return found


def link_copy(src: Path, dst: Path) -> Path:
    """A private copy of a shared fixture. Bytes, not hard links: a linked data file would make the session's
    shared export look like a "hardlink attack" to onnx's loader in every test that runs after."""
    shutil.copytree(src, dst)
    return dst


def replace(path: Path, data: bytes | str) -> None:
    """New content for `path` in a new inode (the old one may be shared with a session fixture)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    replace(path, json.dumps(data))


def truncate(path: Path) -> None:
    replace(path, path.read_bytes()[: path.stat().st_size // 2])


def engine_manifest(onnx_dir: Path, size_bytes: int) -> dict:
    """A well-formed engines.json, as if built from `onnx_dir`, listing one engine, unet.engine, of `size_bytes`."""
    meta = open_model_dir(onnx_dir).meta
    unet = EngineFile(path="unet.engine", dtype="fp32", sha256="0" * 64, size_bytes=size_bytes,
                      onnx_sha256=meta.components["unet"].sha256, cache_key="0" * 64, profile={}, build_seconds=0.0, layers={})
    return dataclasses.asdict(EngineManifest(Library("tensorrt-rtx", "tensorrt_rtx", "1.0"), [BUILD_TARGET], {}, {"unet": unet},
                                             str(onnx_dir), meta.source.sha256, __version__))


def hidden_partials_only(folder: Path, allowed: set[str] = frozenset()) -> list[str]:
    """Entries of `folder` that are neither expected nor hidden partials (should be empty)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in allowed and not PARTIAL.match(p.name))


# --- inputs: good, damaged, and not what they claim to be ----------------------------------------


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """No test touches the user's cache. It lives beside the test's folder, not in it: a successful load
    may cache ONNX Runtime's optimized graphs (a speed-up, not an output), and the tests below check that
    the test's folder holds only what the command was asked to write."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SDTRT_CACHE", str(cache))
    return cache


def cache_holds_only_whole_entries(cache: Path) -> list[str]:
    """Entries of the optimized-graph cache that are not complete (should be empty): an entry appears whole or not at all."""
    ort = cache / "ort-optimized"
    entries = sorted(ort.iterdir()) if ort.is_dir() else []
    return [e.name for e in entries if not ((e / "model.onnx").is_file() and (e / "source.json").is_file())]


@pytest.fixture(scope="module")
def inputs(tiny_model, tiny_onnx, tmp_path_factory) -> Path:
    """Every bad input the walk uses, made once: damaged copies of the tiny model and its export,
    files that are not what their names say, folders where files belong."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "folder").mkdir()
    (root / "text.png").write_text("this is a text file with a .png name\n")
    Image.new("RGB", (64, 64), (200, 120, 40)).save(root / "img.png")
    Image.new("RGB", (60, 60), (200, 120, 40)).save(root / "img60.png")
    Image.new("L", (32, 32), 255).save(root / "mask32.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "noise.png")
    (root / "truncated.png").write_bytes((root / "noise.png").read_bytes()[:6000])
    (root / "not-json.json").write_text("{ this is not json")
    (root / "a-list.json").write_text("[1, 2]")
    rng = np.random.default_rng(0)

    unet = "unet/model.onnx"
    onnx_damage = {
        "onnx-truncated": lambda d: truncate(d / unet),
        "onnx-random": lambda d: replace(d / unet, rng.bytes((d / unet).stat().st_size)),
        "onnx-empty": lambda d: replace(d / unet, b""),
        "onnx-missing": lambda d: (d / unet).unlink(),
        "onnx-flipped": lambda d: replace(d / unet, _flip_middle((d / unet).read_bytes())),  # same size: only a hash sees it
        "meta-not-json": lambda d: replace(d / "sdtrt.json", "{ not json"),
        "meta-binary": lambda d: replace(d / "sdtrt.json", rng.bytes(300)),
        "meta-a-list": lambda d: replace(d / "sdtrt.json", "[]"),
        "meta-no-components": lambda d: edit_json(d / "sdtrt.json", lambda m: m.pop("components")),
        "meta-wrong-type": lambda d: edit_json(d / "sdtrt.json", lambda m: m.update(default_size="64x64")),
        "meta-other-version": lambda d: edit_json(d / "sdtrt.json", lambda m: m.update(format_version=99)),
        "meta-unknown-family": lambda d: edit_json(d / "sdtrt.json", lambda m: m.update(family="sd9")),
        "meta-absent": lambda d: (d / "sdtrt.json").unlink(),
        "no-encoder": lambda d: edit_json(d / "sdtrt.json", lambda m: m["components"].pop("vae_encoder")),
        "engines-not-json": lambda d: replace(d / "engines.json", "{ not json"),
        "engines-a-list": lambda d: replace(d / "engines.json", "[]"),
        "engines-no-engines": lambda d: replace(d / "engines.json", json.dumps({k: v for k, v in engine_manifest(tiny_onnx, 1).items()
                                                                                 if k != "engines"})),
        "engines-wrong-type": lambda d: replace(d / "engines.json", json.dumps({**engine_manifest(tiny_onnx, 1), "targets": BUILD_TARGET})),
        "engines-other-version": lambda d: replace(d / "engines.json", json.dumps({**engine_manifest(tiny_onnx, 1), "format_version": 1})),
        "engines-missing-file": lambda d: replace(d / "engines.json", json.dumps(engine_manifest(tiny_onnx, 1000))),
        "engines-truncated": lambda d: (replace(d / "engines.json", json.dumps(engine_manifest(tiny_onnx, 1000))),
                                        replace(d / "unet.engine", rng.bytes(500))),
    }
    for name, damage in onnx_damage.items():
        damage(link_copy(tiny_onnx, root / name))

    weights = "unet/diffusion_pytorch_model.safetensors"
    model_damage = {
        "model-index-not-json": lambda d: replace(d / "model_index.json", "{"),
        "model-weights-truncated": lambda d: truncate(d / weights),
        "model-no-weights": lambda d: (d / weights).unlink(),
    }
    for name, damage in model_damage.items():
        damage(link_copy(tiny_model, root / name))
    return root


def _flip_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(255 - b for b in data[mid : mid + 64]) + data[mid + 64 :]


@pytest.fixture
def paths(tiny_model, tiny_onnx, inputs, tmp_path, monkeypatch) -> dict[str, Path]:
    monkeypatch.chdir(tmp_path)  # a relative default output would land here, and be seen
    Image.new("RGB", (8, 8)).save(tmp_path / "exists.png")
    return {"model": tiny_model, "onnx": tiny_onnx, "inp": inputs, "tmp": tmp_path}


# --- 1. the walk over the command line -----------------------------------------------------------

MAKE = "make-model --preset tiny --out {tmp}/model"
EXPORT = "export {model} --out {tmp}/onnx --no-progress"
BUILD = f"build {{onnx}} --out {{tmp}}/engines --target {BUILD_TARGET} --no-cache --no-progress"
GEN = "generate 'a fox' --model {onnx} --steps 1 --out {tmp}/fox.png --no-progress"
IMG = " --image {inp}/img.png"
BENCH = "bench {model} --work-dir {tmp}/work --out {tmp}/bench.json"
HUGE = "99999999999999999992"  # a multiple of 8, far past any machine

# id -> (command line, what the error line must name[, environment])
BAD = {
    # the command itself
    "unknown-command": ("frobnicate", "sdtrt --help"),
    "unknown-global-flag": ("--frobnicate", "--frobnicate"),
    "unknown-flag": (GEN + " --stepz 3", "--stepz"),
    # make-model
    "make-model preset unknown": (MAKE + " --preset nope", "--preset"),
    "make-model preset missing": ("make-model --out {tmp}/model", "--preset"),
    "make-model out missing": ("make-model --preset tiny", "--out"),
    "make-model seed -1": (MAKE + " --seed -1", "--seed"),
    "make-model seed 2^64": (MAKE + " --seed 18446744073709551616", "--seed"),
    "make-model seed huge": (MAKE + " --seed 99999999999999999999999", "--seed"),
    "make-model seed text": (MAKE + " --seed abc", "--seed"),
    "make-model seed float": (MAKE + " --seed 1.5", "--seed"),
    "make-model out in /proc": ("make-model --preset tiny --out /proc/nope/tiny", "--out"),
    "make-model out exists": ("make-model --preset tiny --out {inp}/folder", "--force"),
    "make-model out is a file": ("make-model --preset tiny --out {tmp}/exists.png", "--out"),
    "make-model out under a file": ("make-model --preset tiny --out {tmp}/exists.png/model", "--out"),
    # export
    "export model missing": ("export {tmp}/nope --out {tmp}/onnx", "sdtrt make-model"),
    "export model is a file": ("export {tmp}/exists.png --out {tmp}/onnx", "sdtrt make-model"),
    "export model not diffusers": ("export {inp}/folder --out {tmp}/onnx", "sdtrt make-model"),
    "export model_index not json": ("export {inp}/model-index-not-json --out {tmp}/onnx", "sdtrt make-model"),
    "export weights truncated": ("export {inp}/model-weights-truncated --out {tmp}/onnx --components unet --no-progress",
                                 "sdtrt make-model"),
    "export weights missing": ("export {inp}/model-no-weights --out {tmp}/onnx", "sdtrt make-model"),
    "export out is the model": ("export {model} --out {model} --force", "--out"),
    "export out inside the model": ("export {model} --out {model}/sub --force", "--out"),
    "export out contains the model": ("export {model} --out {model}/.. --force", "--out"),
    "export out exists": ("export {model} --out {onnx}", "--force"),
    "export out in /proc": ("export {model} --out /proc/onnx", "--out"),
    "export out missing": ("export {model}", "--out"),
    "export opset 99": (EXPORT + " --opset 99", "--opset"),
    "export opset 0": (EXPORT + " --opset 0", "--opset"),
    "export opset text": (EXPORT + " --opset latest", "--opset"),
    "export components unknown": (EXPORT + " --components unet,clip", "--components"),
    "export components empty": (EXPORT + " --components ,", "--components"),
    "export dtype": (EXPORT + " --dtype fp8", "--dtype"),
    "export height 7": (EXPORT + " --height 7", "--height"),
    "export height -64": (EXPORT + " --height -64", "--height"),
    "export height huge": (EXPORT + " --height " + HUGE, "--height"),
    "export width 0": (EXPORT + " --width 0", "--width"),
    "export threshold -1": (EXPORT + " --external-data-threshold -1", "--external-data-threshold"),
    "export threshold text": (EXPORT + " --external-data-threshold 2GB", "--external-data-threshold"),
    # build
    "build batch 0": (BUILD + " --batch 0", "--batch"),
    "build batch 4:2:1": (BUILD + " --batch 4:2:1", "--batch"),
    "build batch 1:2": (BUILD + " --batch 1:2", "--batch"),
    "build batch text": (BUILD + " --batch many", "--batch"),
    "build batch huge": (BUILD + " --batch 1:1:99999999999", "--batch"),
    "build height 60": (BUILD + " --height 60", "--height"),
    "build height 0": (BUILD + " --height 0", "--height"),
    "build height huge": (BUILD + " --height 64:64:" + HUGE, "--height"),
    "build width garbage": (BUILD + " --width 64:x:96", "--width"),
    "build opt-level 9": (BUILD + " --opt-level 9", "--opt-level"),
    "build opt-level -1": (BUILD + " --opt-level -1", "--opt-level"),
    "build opt-level text": (BUILD + " --opt-level max", "--opt-level"),
    "build workspace 0": (BUILD + " --workspace 0", "--workspace"),
    "build workspace huge": (BUILD + " --workspace 99999999999999", "--workspace"),
    "build chunks 0": (BUILD + " --max-prompt-chunks 0", "--max-prompt-chunks"),
    "build chunks huge": (BUILD + " --max-prompt-chunks 99999999", "--max-prompt-chunks"),
    "build target sm90": (BUILD + " --target sm90", "--backend tensorrt"),
    "build target sm70": (BUILD + " --target sm70", "--target"),
    "build target empty": (BUILD + " --target ,", "--target"),
    "build components unknown": (BUILD + " --components unet,clip", "--components"),
    "build components empty": (BUILD + " --components ,", "--components"),
    "build backend unknown": (BUILD + " --backend nope", "--backend"),
    "build timing cache on rtx": (BUILD + " --timing-cache {tmp}/t.cache", "--timing-cache"),
    "build cache-dir is a file": (f"build {{onnx}} --out {{tmp}}/engines --target {BUILD_TARGET} --cache-dir {{tmp}}/exists.png "
                                  "--no-progress", "--cache-dir"),
    "build out is the input": (f"build {{onnx}} --out {{onnx}} --force --target {BUILD_TARGET}", "--out"),
    "build out inside the input": (f"build {{onnx}} --out {{onnx}}/sub --force --target {BUILD_TARGET}", "--out"),
    "build out exists": (f"build {{onnx}} --out {{inp}}/folder --target {BUILD_TARGET}", "--force"),
    "build out in /proc": (f"build {{onnx}} --out /proc/engines --target {BUILD_TARGET}", "--out"),
    "build input missing": (f"build {{tmp}}/nope --out {{tmp}}/engines --target {BUILD_TARGET}", "sdtrt export"),
    "build input is diffusers": (f"build {{model}} --out {{tmp}}/engines --target {BUILD_TARGET}", "sdtrt export"),
    "build input metadata damaged": (f"build {{inp}}/meta-not-json --out {{tmp}}/engines --target {BUILD_TARGET}", "sdtrt export"),
    "build input is sdtrt.json": (f"build {{onnx}}/sdtrt.json --out {{tmp}}/engines --target {BUILD_TARGET}",
                                  ("pass the folder, not the file", "sdtrt build")),
    # generate: numbers
    "generate height 0": (GEN + " --height 0", "--height"),
    "generate width 0": (GEN + " --width 0", "--width"),
    "generate height 7": (GEN + " --height 7", "--height"),
    "generate height -64": (GEN + " --height -64", "--height"),
    "generate height text": (GEN + " --height tall", "--height"),
    "generate height huge": (GEN + " --height " + HUGE, "--height"),
    "generate seed huge": (GEN + " --seed 99999999999999999999999", "--seed"),
    "generate seed -1": (GEN + " --seed -1", "--seed"),
    "generate seed float": (GEN + " --seed 4.2", "--seed"),
    "generate guidance inf": (GEN + " --guidance-scale inf", "--guidance-scale"),
    "generate guidance nan": (GEN + " --guidance-scale nan", "--guidance-scale"),
    "generate guidance -1": (GEN + " --guidance-scale -1", "--guidance-scale"),
    "generate guidance text": (GEN + " --guidance-scale high", "--guidance-scale"),
    "generate rescale 2": (GEN + " --guidance-rescale 2", "--guidance-rescale"),
    "generate rescale nan": (GEN + " --guidance-rescale nan", "--guidance-rescale"),
    "generate strength 0": (GEN + IMG + " --strength 0", "--strength"),
    "generate strength 1.5": (GEN + IMG + " --strength 1.5", "--strength"),
    "generate strength nan": (GEN + IMG + " --strength nan", "--strength"),
    "generate strength inf": (GEN + IMG + " --strength inf", "--strength"),
    "generate steps 0": (GEN + " --steps 0", "--steps"),
    "generate steps -1": (GEN + " --steps -1", "--steps"),
    "generate steps huge": (GEN + " --steps 99999999999999999999", "--steps"),
    "generate num-images 0": (GEN + " --num-images 0", "--num-images"),
    "generate num-images -2": (GEN + " --num-images -2", "--num-images"),
    "generate num-images huge": (GEN + " --num-images 99999999999999", "--num-images"),
    "generate clip-skip 0": (GEN + " --clip-skip 0", "--clip-skip"),
    "generate clip-skip 99": (GEN + " --clip-skip 99", "--clip-skip"),
    "generate quality 0": (GEN + " --quality 0", "--quality"),
    "generate quality 101": (GEN + " --quality 101", "--quality"),
    "generate threads -1": (GEN + " --threads -1", "--threads"),
    "generate threads huge": (GEN + " --threads 99999999", "--threads"),
    # generate: scheduler
    "generate scheduler unknown": (GEN + " --scheduler warp", "--scheduler"),
    "generate option not key=value": (GEN + " --scheduler-option karras", "--scheduler-option"),
    "generate option empty key": (GEN + " --scheduler-option =1", "--scheduler-option"),
    "generate option x=nan": (GEN + " --scheduler-option x=nan", "--scheduler-option"),
    "generate option NaN": (GEN + " --scheduler-option beta_start=NaN", "--scheduler-option"),
    "generate option Infinity": (GEN + " --scheduler-option beta_end=Infinity", "--scheduler-option"),
    "generate option wrong type": (GEN + " --scheduler-option beta_start=nan", "--scheduler-option"),
    "generate option unknown key": (GEN + " --scheduler-option foo=1", "--scheduler-option"),
    "generate option bad value": (GEN + " --scheduler-option timestep_spacing=sideways", "--scheduler-option"),
    "generate option breaks the schedule": (GEN + " --scheduler-option num_train_timesteps=-5", "--scheduler-option"),
    # generate: outputs
    "generate out in /proc": ("generate x --model {onnx} --steps 1 --out /proc/foo.png --no-progress", "--out"),
    "generate out gif": ("generate x --model {onnx} --steps 1 --out {tmp}/x.gif --no-progress", "--out"),
    "generate out no suffix": ("generate x --model {onnx} --steps 1 --out {tmp}/x --no-progress", "--out"),
    "generate out exists": ("generate x --model {onnx} --steps 1 --out {tmp}/exists.png --no-progress", "--force"),
    "generate out under a file": ("generate x --model {onnx} --steps 1 --out {tmp}/exists.png/x.png --no-progress", "--out"),
    "generate format gif": (GEN + " --format gif", "--format"),
    "generate format contradicts": (GEN + " --format jpg", "--format"),
    # generate: images in
    "generate image missing": (GEN + " --image {tmp}/nope.png", "--image"),
    "generate image is a folder": (GEN + " --image {inp}/folder", "--image"),
    "generate image not an image": (GEN + " --image {inp}/text.png", "--image"),
    "generate image truncated": (GEN + " --image {inp}/truncated.png", "--image"),
    "generate image not a multiple of 8": (GEN + " --image {inp}/img60.png", "--resize"),
    "generate mask without image": (GEN + " --mask {inp}/mask32.png", "--image"),
    "generate mask of another size": (GEN + IMG + " --mask {inp}/mask32.png", "--resize"),
    "generate mask not an image": (GEN + IMG + " --mask {inp}/text.png", "--mask"),
    "generate image without encoder": ("generate x --model {inp}/no-encoder --steps 1 --out {tmp}/x.png --no-progress" + IMG,
                                       "--components"),
    # generate: other flags
    "generate negative prompts count": (GEN + " --negative-prompt a --negative-prompt b", "--negative-prompt"),
    "generate prompt syntax": (GEN + " --prompt-syntax fancy", "--prompt-syntax"),
    "generate backend unknown": (GEN + " --backend warp", "--backend"),
    "generate backend tensorrt on onnx": (GEN + " --backend tensorrt", "sdtrt build"),
    "generate device unknown": (GEN + " --device toaster", "--device"),
    "generate device cuda:banana": (GEN + " --device cuda:banana", "--device"),
    "generate no prompt": ("generate --model {onnx} --out {tmp}/x.png", "sdtrt generate"),
    "generate cache in /proc": ("generate x --steps 1 --out {tmp}/x.png --no-progress", "--model", {"SDTRT_CACHE": "/proc/nope"}),
    "generate cache is a file": ("generate x --steps 1 --out {tmp}/x.png --no-progress", "--model", {"SDTRT_CACHE": "{tmp}/exists.png"}),
    # generate: the model directory
    "generate model missing": ("generate x --model {tmp}/nope --out {tmp}/x.png", "sdtrt export"),
    "generate model is diffusers": ("generate x --model {model} --out {tmp}/x.png", "sdtrt export"),
    "generate model is sdtrt.json": ("generate x --model {onnx}/sdtrt.json --out {tmp}/x.png", ("pass the folder", "sdtrt generate")),
    **{f"generate {damage}": (f"generate x --model {{inp}}/{damage} --steps 1 --out {{tmp}}/x.png --no-progress", fix)
       for damage, fix in [("onnx-truncated", "sdtrt export"), ("onnx-random", "sdtrt export"), ("onnx-empty", "sdtrt export"),
                           ("onnx-missing", "sdtrt export"), ("meta-not-json", "sdtrt export"), ("meta-binary", "sdtrt export"),
                           ("meta-a-list", "sdtrt export"), ("meta-no-components", "sdtrt export"),
                           ("meta-wrong-type", "sdtrt export"), ("meta-other-version", "sdtrt export"),
                           ("meta-unknown-family", "sdtrt export"), ("meta-absent", "sdtrt export"),
                           ("engines-not-json", "sdtrt build"), ("engines-a-list", "sdtrt build"),
                           ("engines-no-engines", "sdtrt build"), ("engines-wrong-type", "sdtrt build"),
                           ("engines-other-version", "sdtrt build"), ("engines-missing-file", "sdtrt build")]},
    # inspect
    "inspect sdtrt.json": ("inspect {onnx}/sdtrt.json", ("pass the folder, not the file", "sdtrt inspect")),
    "inspect missing": ("inspect {tmp}/nope", "sdtrt export"),
    "inspect a file": ("inspect {tmp}/exists.png", "sdtrt export"),
    "inspect diffusers": ("inspect {model}", "sdtrt export"),
    "inspect onnx truncated": ("inspect {inp}/onnx-truncated", "sdtrt export"),
    "inspect onnx empty": ("inspect {inp}/onnx-empty", "sdtrt export"),
    "inspect onnx missing": ("inspect {inp}/onnx-missing", "sdtrt export"),
    "inspect verify same-size corruption": ("inspect {inp}/onnx-flipped --verify", "sdtrt export"),
    "inspect verify json": ("inspect {inp}/onnx-flipped --verify --json", "sdtrt export"),
    "inspect metadata not json": ("inspect {inp}/meta-not-json", "sdtrt export"),
    "inspect metadata other version": ("inspect {inp}/meta-other-version", "sdtrt export"),
    "inspect engine missing": ("inspect {inp}/engines-missing-file", "sdtrt build"),
    "inspect engine truncated": ("inspect {inp}/engines-truncated", "sdtrt build"),
    "inspect engines.json damaged": ("inspect {inp}/engines-wrong-type", "sdtrt build"),
    # bench
    "bench compare missing": (BENCH + " --compare {tmp}/missing.json", "--compare"),
    "bench compare not json": (BENCH + " --compare {inp}/not-json.json", "--compare"),
    "bench compare a list": (BENCH + " --compare {inp}/a-list.json", "--compare"),
    "bench compare a folder": (BENCH + " --compare {inp}/folder", "--compare"),
    "bench batch 0": (BENCH + " --batch 0", "--batch"),
    "bench batch text": (BENCH + " --batch two", "--batch"),
    "bench steps 0": (BENCH + " --steps 0", "--steps"),
    "bench height 7": (BENCH + " --height 7", "--height"),
    "bench height huge": (BENCH + " --height " + HUGE, "--height"),
    "bench width 0": (BENCH + " --width 0", "--width"),
    "bench guidance inf": (BENCH + " --guidance-scale inf", "--guidance-scale"),
    "bench guidance nan": (BENCH + " --guidance-scale nan", "--guidance-scale"),
    "bench seed -1": (BENCH + " --seed -1", "--seed"),
    "bench seed huge": (BENCH + " --seed 99999999999999999999999", "--seed"),
    "bench repeats 0": (BENCH + " --repeats 0", "--repeats"),
    "bench warmup -1": (BENCH + " --warmup -1", "--warmup"),
    "bench threads -1": (BENCH + " --threads -1", "--threads"),
    "bench threads huge": (BENCH + " --threads 99999999", "--threads"),
    "bench systems unknown": (BENCH + " --systems sdtrt,warp", "--systems"),
    "bench scheduler unknown": (BENCH + " --scheduler warp", "--scheduler"),
    "bench max-regression": (BENCH + " --max-regression lots", "--max-regression"),
    "bench min-psnr nan": (BENCH + " --min-psnr nan", "--min-psnr"),
    "bench device": (BENCH + " --device tpu", "--device"),
    "bench out a folder": (BENCH + " --out {inp}/folder", "--out"),
    "bench out in /proc": (BENCH + " --out /proc/bench.json", "--out"),
    "bench plot a folder": (BENCH + " --plot {inp}/folder", "--plot"),
    "bench preset unknown": ("bench --preset nope --work-dir {tmp}/work --out {tmp}/bench.json", "--preset"),
    "bench model missing": ("bench {tmp}/nope --work-dir {tmp}/work --out {tmp}/bench.json", "sdtrt make-model"),
    "bench model not diffusers": ("bench {inp}/folder --work-dir {tmp}/work --out {tmp}/bench.json", "sdtrt make-model"),
    "bench model and preset": (BENCH + " --preset tiny", "--preset"),
    "bench no model": ("bench --work-dir {tmp}/work --out {tmp}/bench.json", "--preset"),
    "bench cache in /proc": ("bench {model} --out {tmp}/bench.json", "--work-dir", {"SDTRT_CACHE": "/proc/nope"}),
    # adapters and SDXL flags
    "export lora missing": (EXPORT + " --lora {tmp}/nope.safetensors", "--lora"),
    "export lora scale nan": (EXPORT + " --lora {inp}/img.png:nan", "--lora"),
    "export lora not an adapter": (EXPORT + " --lora {inp}/img.png", "--lora"),
    "export embedding-slots -1": (EXPORT + " --embedding-slots -1", "--embedding-slots"),
    "generate lora missing": (GEN + " --lora {tmp}/nope.safetensors", "--lora"),
    "generate lora a folder": (GEN + " --lora {inp}/folder", "--lora"),
    "generate lora scale inf": (GEN + " --lora {inp}/img.png:inf", "--lora"),
    "generate lora-dir missing": (GEN + " --lora-dir {tmp}/nope", "--lora-dir"),
    "generate lora tag not in dir": ((GEN + " --prompt-syntax a1111 --lora-dir {inp}/folder").replace("'a fox'", "'a fox <lora:ink:1>'"),
                                     "--lora-dir"),
    "generate lora tag escapes dir": ((GEN + " --prompt-syntax a1111 --lora-dir {inp}/folder").replace("'a fox'", "'a fox <lora:../img:1>'"),
                                      "--lora-dir"),
    "generate lora tag without dir": (GEN.replace("'a fox'", "'a fox <lora:ink:1>'") + " --prompt-syntax a1111", "--lora-dir"),
    "generate embedding missing": (GEN + " --embedding {tmp}/nope.pt", "--embedding"),
    "generate embedding not one": (GEN + " --embedding {inp}/img.png:<tok>", "--embedding"),
    "generate original-size text": (GEN + " --original-size big", "--original-size"),
    "generate target-size 3 parts": (GEN + " --target-size 1x2x3", "--target-size"),
    "generate aesthetic nan": (GEN + " --aesthetic-score nan", "--aesthetic-score"),
    "generate prompt-2 on sd": (GEN + " --prompt-2 'a dog'", "--prompt-2"),
    "generate refiner missing": (GEN + " --refiner {tmp}/nope", "--refiner"),
    "generate refiner-start 0": (GEN + " --refiner-start 0", "--refiner-start"),
    "export controlnet missing": (EXPORT + " --controlnet {tmp}/nope", "--controlnet"),
    "export controlnet not one": (EXPORT + " --controlnet {inp}/folder", "--controlnet"),
    "generate control-image missing": (GEN + " --controlnet edges --control-image {tmp}/nope.png", "--control-image"),
    "generate control-image text": (GEN + " --controlnet edges --control-image {inp}/text.png", "--control-image"),
    "generate control-scale nan": (GEN + " --controlnet edges --control-image {inp}/img.png --control-scale nan", "--control-scale"),
    "generate control-start 2": (GEN + " --controlnet edges --control-image {inp}/img.png --control-start 2", "--control-start"),
    "generate control counts": (GEN + " --controlnet a --controlnet b --control-image {inp}/img.png --control-scale 1 --control-scale 1 --control-scale 1",
                                "--control-scale"),
    "generate controlnet on a plain export": (GEN + " --control-image {inp}/img.png", "--controlnet"),
    "generate control preprocess unknown": (GEN + " --control-preprocess sobel", "--control-preprocess"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_ends_in_one_line_naming_the_fix_and_changes_nothing(case, paths, capfd, monkeypatch, private_cache):
    command, names, *env = BAD[case]
    argv = shlex.split(command.format(**paths))
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value.format(**paths))
    roots = [paths["tmp"], paths["inp"], paths["model"], paths["onnx"]]
    before = snapshot(*roots)

    code, err = run(argv, capfd)

    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrt: error: "), f"stderr must be one error line, got:\n{err}"
    assert " Fix: " in lines[0]
    assert NAMES_A_FIX.search(lines[0]), f"names no flag or command: {lines[0]}"
    assert all(name in lines[0] for name in ([names] if isinstance(names, str) else names))
    assert snapshot(*roots) == before  # nothing created, nothing changed, nothing removed
    assert cache_holds_only_whole_entries(private_cache) == []


def test_the_walk_covers_every_command_and_many_cases():
    commands = {shlex.split(c[0])[0] for c in BAD.values()}
    assert {"make-model", "export", "build", "generate", "inspect", "bench"} <= commands
    assert len(BAD) >= 60


@pytest.mark.parametrize("flags", [["--out", "{tmp}/exists.png"], ["--out", "/proc/foo.png"], ["--out", "{tmp}/x.gif"],
                                   ["--scheduler", "warp"], ["--scheduler-option", "foo=1"], ["--steps", "2000"],
                                   ["--num-images", "2000"], ["--mask", "{inp}/mask32.png"]],
                         ids=lambda f: " ".join(f).replace("{tmp}/", "").replace("{inp}/", ""))
def test_what_can_be_checked_is_checked_before_any_model_is_loaded(flags, paths, capfd, monkeypatch):
    from sdtrt.runtime.pipeline import Pipeline

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr(Pipeline, "load", load)
    code, err = run(["generate", "x", "--model", str(paths["onnx"]), "--out", str(paths["tmp"] / "fox.png"), "--no-progress",
                     *(f.format(**paths) for f in flags)], capfd)
    assert code == 2 and err.startswith("sdtrt: error: ") and "Traceback" not in err


def test_an_existing_output_is_left_untouched(paths, capfd):
    target = paths["tmp"] / "exists.png"
    data = target.read_bytes()
    code, err = run(["generate", "x", "--model", str(paths["onnx"]), "--out", str(target), "--no-progress"], capfd)
    assert code == 2 and "--force" in err
    assert target.read_bytes() == data


def test_inspect_checks_sizes_always_and_hashes_with_verify(inputs, capfd):
    """The same-size damage the walk catches with --verify passes a size check: --verify is what finds it."""
    code, err = run(["inspect", str(inputs / "onnx-flipped")], capfd)
    assert code == 0 and err == ""


# --- 2. out of memory, and NaN/inf from a stage --------------------------------------------------


def test_out_of_memory_names_the_stage_the_size_and_the_flags(paths, capfd):
    out = paths["tmp"] / "big.png"
    started = time.monotonic()
    code, err = run(["generate", "a fox", "--model", str(paths["onnx"]), "--height", "2048", "--width", "2048", "--steps", "1",
                     "--seed", "1", "--out", str(out), "--no-progress"], capfd)
    assert time.monotonic() - started < 30  # fails fast: the first UNet call cannot allocate
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrt: error: "), err  # ONNX Runtime's own log line is not repeated
    assert re.search(r"\bthe (unet|vae_decoder) ran out of memory\b", lines[0])
    assert "2048x2048" in lines[0] and "--height/--width" in lines[0]
    assert not out.exists() and sorted(p.name for p in paths["tmp"].iterdir()) == ["exists.png"]


@pytest.fixture(scope="module")
def infinite_decoder(tiny_onnx, tmp_path_factory) -> Path:
    """The tiny export with a VAE decoder whose last convolution overflows float32 (its largest weight
    scaled to 1e38), recorded in sdtrt.json as if it had been exported that way."""
    import onnx
    from onnx import numpy_helper

    d = link_copy(tiny_onnx, tmp_path_factory.mktemp("inf") / "onnx")
    path = d / "vae_decoder" / "model.onnx"
    replace(path.with_name("model.onnx.data"), path.with_name("model.onnx.data").read_bytes())  # its own inode: onnx refuses hard links
    model = onnx.load(str(path))
    last_conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    weights = {t.name: t for t in model.graph.initializer}[last_conv.input[1]]
    w = numpy_helper.to_array(weights).astype(np.float64)
    weights.CopyFrom(numpy_helper.from_array((w * (1e38 / np.abs(w).max())).astype(np.float32), weights.name))
    path.unlink()  # a new file, not the session fixture's (hard-linked) one
    onnx.save(model, str(path))
    meta = open_model_dir(d).meta
    entry = dataclasses.replace(meta.components["vae_decoder"], sha256=file_sha256(path), size_bytes=path.stat().st_size)
    (d / "sdtrt.json").unlink()
    dataclasses.replace(meta, components={**meta.components, "vae_decoder": entry}).write(d)
    return d


def test_a_stage_that_produces_inf_is_named_and_no_black_image_is_written(infinite_decoder, tmp_path, capfd):
    out = tmp_path / "black.png"
    code, err = run(["generate", "a fox", "--model", str(infinite_decoder), "--steps", "2", "--seed", "1", "--out", str(out),
                     "--no-progress"], capfd)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrt: error: the vae_decoder produced NaN/inf"), err
    assert " Fix: " in lines[0] and NAMES_A_FIX.search(lines[0].split(" Fix: ")[1])
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- 3. Ctrl-C and SIGTERM -------------------------------------------------------------------------


class Child:
    """`python -m sdtrt ...` in its own process, its output collected as it comes."""

    def __init__(self, args: list[str], cwd: Path, progress: bool = False):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if progress:
            env.pop("TQDM_DISABLE", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "sdtrt", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        while chunk := stream.read(1):
            sink.append(chunk)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, ready, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before it was interrupted:\n{self.stderr}"
            assert time.monotonic() < deadline, f"never got ready:\n{self.stderr}"
            time.sleep(0.02)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.finish()

    def workers(self) -> list[int]:
        """Engine-build workers (python -m sdtrt.engines.builder) whose parent is this process."""
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                ppid = int(re.search(r"^PPid:\s*(\d+)", status.read_text(), re.M).group(1))
                cmdline = (status.parent / "cmdline").read_bytes()
            except (OSError, AttributeError):
                continue
            if ppid == self.proc.pid and b"sdtrt.engines.builder" in cmdline:
                found.append(int(status.parent.name))
        return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper has stopped running)."""
    try:
        return re.search(r"^State:\s*(\S)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1) != "Z"
    except (OSError, AttributeError):
        return False


@pytest.fixture(scope="module")
def bench_work(tiny_model, tiny_onnx, tmp_path_factory) -> Path:
    """A bench work folder that already holds the tiny model's export (bench reuses it: same weights hash,
    dtype and size), so an interrupted bench is interrupted while measuring."""
    from sdtrt.export.source import inspect_source, weights_sha256

    src = inspect_source(tiny_model)
    work = tmp_path_factory.mktemp("bench-work")
    link_copy(tiny_onnx, work / weights_sha256(src.weight_files, src.path)[:16] / "onnx-fp32-64x64")
    return work


def _wide_build(onnx_dir: Path, out: Path) -> list:
    """A build with wide dynamic profiles and several engines: seconds of work for a worker process."""
    return ["build", onnx_dir, "--out", out, "--target", BUILD_TARGET, "--components", "unet,vae_decoder,text_encoder",
            "--batch", "1:4:16", "--height", "64:512:1024", "--width", "64:512:1024", "--opt-level", "5", "--no-cache", "--no-progress"]


def _start(command: str, paths: dict, tmp: Path, bench_work: Path) -> tuple[Child, Path, set[str]]:
    """Start a long command; return it once it is doing its real work, with its --out and what else may stay."""
    if command == "export":
        out = tmp / "onnx"
        child = Child(["export", paths["model"], "--out", out, "--no-progress"], tmp)
        child.wait_for(lambda: list(tmp.glob(".onnx.*.partial/unet")))  # the text encoder is done, the UNet under way
        return child, out, set()
    if command == "build":
        out = tmp / "engines"
        child = Child(_wide_build(paths["onnx"], out), tmp)
        child.wait_for(child.workers)
        time.sleep(0.5)  # past the worker's imports: inside TensorRT's build
        return child, out, set()
    if command == "generate":
        out = tmp / "fox.png"
        child = Child(["generate", "a fox", "--model", paths["onnx"], "--steps", "500", "--height", "256", "--width", "256",
                       "--seed", "1", "--out", out], tmp, progress=True)
        child.wait_for(lambda: "denoise" in child.stderr)
        time.sleep(0.3)
        return child, out, set()
    if command == "bench":
        work, out = tmp / "work", tmp / "bench.json"
        link_copy(bench_work, work)
        child = Child(["bench", paths["model"], "--work-dir", work, "--out", out, "--height", "64", "--width", "64", "--steps", "200",
                       "--repeats", "50", "--systems", "sdtrt", "--no-overhead"], tmp)
        child.wait_for(lambda: "warmed up" in child.stdout)
        return child, out, {"work"}
    raise AssertionError(command)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["export", "build", "generate", "bench"])
def test_a_signal_stops_the_command_at_once_leaving_nothing_that_looks_finished(command, sig, paths, bench_work):
    tmp = paths["tmp"]
    child, out, may_stay = _start(command, paths, tmp, bench_work)
    workers = child.workers()
    assert workers or command != "build", "the build had no worker to interrupt"
    try:
        sent = time.monotonic()
        child.proc.send_signal(sig)
        code = child.finish()
        stopped = time.monotonic() - sent
    finally:
        child.kill()
    assert code == 128 + sig, child.stderr
    assert stopped < 5, f"took {stopped:.1f} s to stop"
    assert "Traceback" not in child.stderr and "Multiple distributions found" not in child.stderr
    assert child.stderr.rstrip().endswith("nothing partial was left behind")
    assert not out.exists()
    assert hidden_partials_only(tmp, {"exists.png", *may_stay}) == []  # no --out, no chart, nothing else that looks done
    assert not any(alive(pid) for pid in workers), "an engine-build worker outlived the interrupted build"


# --- 4. SIGKILL, and two writers at once ----------------------------------------------------------


def test_a_killed_build_leaves_only_a_hidden_partial_that_the_next_build_removes(paths):
    tmp, out = paths["tmp"], paths["tmp"] / "engines"
    child = Child(_wide_build(paths["onnx"], out), tmp)
    try:
        child.wait_for(child.workers)
        workers = child.workers()
        time.sleep(0.5)
        child.proc.send_signal(signal.SIGKILL)
        assert child.finish() == -signal.SIGKILL
    finally:
        child.kill()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "the build worker outlived its killed parent"
    assert not out.exists()
    assert hidden_partials_only(tmp, {"exists.png"}) == [] and list(tmp.glob(".engines.*.partial"))

    assert cli(["build", str(paths["onnx"]), "--out", str(out), "--target", BUILD_TARGET, "--components", "text_encoder",
                "--batch", "1", "--no-cache", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp.iterdir()) == ["engines", "exists.png"]
    assert set(open_model_dir(out).manifest.engines) == {"text_encoder"}


def test_a_killed_generate_leaves_only_hidden_partials_that_the_next_run_removes(paths):
    tmp, out = paths["tmp"], paths["tmp"] / "fox.png"
    child = Child(["generate", "a fox", "--model", paths["onnx"], "--steps", "500", "--height", "256", "--width", "256",
                   "--out", out], tmp, progress=True)
    try:
        child.wait_for(lambda: "denoise" in child.stderr)
        child.proc.send_signal(signal.SIGKILL)
        assert child.finish() == -signal.SIGKILL
    finally:
        child.kill()
    assert not out.exists() and hidden_partials_only(tmp, {"exists.png"}) == []
    # a process killed while writing the image leaves its temporary file behind
    subprocess.run([sys.executable, "-c", "import os, signal, sys; from sdtrt.files import atomic_file\n"
                    "with atomic_file(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half a png')\n    os.kill(os.getpid(), signal.SIGKILL)",
                    str(out)], check=False)
    assert len(list(tmp.glob(".fox.png.*.partial"))) == 1 and not out.exists()

    assert cli(["generate", "a fox", "--model", str(paths["onnx"]), "--steps", "1", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp.iterdir()) == ["exists.png", "fox.png"]
    assert "parameters" in Image.open(out).text


def test_two_exports_to_one_folder_at_once_leave_one_complete_export(paths):
    tmp, out = paths["tmp"], paths["tmp"] / "onnx"
    link_copy(paths["onnx"], out)  # an older export both replace
    args = ["export", paths["model"], "--out", out, "--components", "text_encoder", "--force", "--no-progress"]
    children = [Child(args, tmp), Child(args, tmp)]
    try:
        codes = [c.finish(timeout=300) for c in children]
    finally:
        for c in children:
            c.kill()
    assert codes == [0, 0], [c.stderr for c in children]
    from sdtrt.inspect import check

    model = check(out, verify=True)  # every file present with its recorded size and hash
    assert set(model.meta.components) == {"text_encoder"}  # one new export, whole; not the old one, not a mix
    assert sorted(p.name for p in tmp.iterdir()) == ["exists.png", "onnx"]


def test_two_generates_to_one_file_at_once_leave_one_whole_image(paths):
    tmp, out = paths["tmp"], paths["tmp"] / "same.png"
    children = [Child(["generate", prompt, "--model", paths["onnx"], "--steps", "3", "--out", out, "--force", "--no-progress"], tmp)
                for prompt in ("a red fox", "a blue fox")]
    try:
        codes = [c.finish(timeout=300) for c in children]
    finally:
        for c in children:
            c.kill()
    assert codes == [0, 0], [c.stderr for c in children]
    image = Image.open(out)
    image.load()  # every byte is there
    assert image.size == (64, 64) and image.text["parameters"].split("\n")[0] in ("a red fox", "a blue fox")
    assert sorted(p.name for p in tmp.iterdir()) == ["exists.png", "same.png"]


# --- 5. permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_written_file_gets_the_mode_open_would_give(umask, paths, capfd):
    tmp = paths["tmp"]
    old = os.umask(umask)
    try:
        assert cli(["make-model", "--preset", "tiny", "--out", str(tmp / "model")]) == 0
        assert cli(["export", str(tmp / "model"), "--out", str(tmp / "onnx"), "--components", "text_encoder", "--no-progress"]) == 0
        assert cli(["build", str(tmp / "onnx"), "--out", str(tmp / "engines"), "--target", BUILD_TARGET, "--batch", "1",
                    "--no-cache", "--no-progress"]) == 0
        assert cli(["generate", "a fox", "--model", str(paths["onnx"]), "--steps", "1", "--out", str(tmp / "fox.png"),
                    "--no-progress"]) == 0
        assert cli(["generate", "a fox", "--model", str(paths["onnx"]), "--steps", "1", "--out", str(tmp / "images") + "/",
                    "--format", "webp", "--no-progress"]) == 0
    finally:
        os.umask(old)
    capfd.readouterr()
    wrong = []
    for folder in ("model", "onnx", "engines", "images"):
        root = tmp / folder
        for path in [root, *root.rglob("*")]:
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            if path.stat().st_mode & 0o777 != want:
                wrong.append(f"{path.relative_to(tmp)} {oct(path.stat().st_mode & 0o777)} != {oct(want)}")
    png = (tmp / "fox.png").stat().st_mode & 0o777
    assert png == 0o666 & ~umask, oct(png)
    assert wrong == []
    assert any(p.suffix == ".safetensors" for p in (tmp / "model").rglob("*")) and any((tmp / "engines").glob("*.engine"))


def test_a_real_process_under_umask_077_writes_a_private_png(paths):
    out = paths["tmp"] / "fox.png"
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "generate", "a fox", "--model", str(paths["onnx"]), "--steps", "1",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, preexec_fn=lambda: os.umask(0o077))
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_mode & 0o777 == 0o600


# --- 6. image files ---------------------------------------------------------------------------------


def _exif_parameters(image) -> str:
    comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0")
    return comment[8:].decode("utf-16-be")


@pytest.mark.parametrize("suffix,fmt", [(".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")])
def test_jpeg_and_webp_are_what_their_names_say_with_parameters_in_exif(suffix, fmt, tiny_onnx, tmp_path):
    out = tmp_path / f"fox{suffix}"
    assert cli(["generate", "a watercolor fox", "--model", str(tiny_onnx), "--steps", "2", "--seed", "7", "--out", str(out),
                "--quality", "80", "--no-progress"]) == 0
    image = Image.open(out)
    assert image.format == fmt and image.size == (64, 64)
    params = _exif_parameters(image)
    assert params.startswith("a watercolor fox\n") and "Steps: 2" in params and "Seed: 7" in params
    assert params.rstrip().endswith(f"Version: sdtrt {__version__}")


def test_a_folder_out_numbers_new_images_after_the_existing_ones(tiny_onnx, tmp_path):
    folder = tmp_path / "images"
    argv = ["generate", "a fox", "--model", str(tiny_onnx), "--steps", "1", "--out", str(folder) + "/", "--no-progress"]
    assert cli(argv + ["--seed", "1"]) == 0
    first = (folder / "image-0.png").read_bytes()
    assert cli(argv + ["--seed", "2"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["image-0.png", "image-1.png"]
    assert (folder / "image-0.png").read_bytes() == first  # never overwritten
    assert "Seed: 2" in Image.open(folder / "image-1.png").text["parameters"]


def test_png_parameters_count_clip_skip_as_a1111_does_and_name_the_version(tiny_onnx, tmp_path):
    out = tmp_path / "fox.png"
    assert cli(["generate", "a fox", "--model", str(tiny_onnx), "--steps", "1", "--clip-skip", "1", "--out", str(out),
                "--no-progress"]) == 0
    params = Image.open(out).text["parameters"]
    assert "Clip skip: 2" in params  # diffusers' clip_skip=1 is A1111's "Clip skip: 2"
    assert f"Version: sdtrt {__version__}" in params


# --- 7. stderr carries what a user needs --------------------------------------------------------------


def test_export_writes_nothing_to_stderr(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "export", str(tiny_model), "--out", str(tmp_path / "onnx"), "--no-progress"],
                          capture_output=True, text=True, env={**os.environ, "SDTRT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "Multiple distributions found" not in proc.stderr
    assert proc.stderr.strip() == ""


def test_a_long_plain_prompt_warns_in_one_short_line_naming_the_flag(tiny_onnx, tmp_path):
    prompt = " ".join(f"word{i}" for i in range(400))
    proc = subprocess.run([sys.executable, "-m", "sdtrt", "generate", prompt, "--model", str(tiny_onnx), "--steps", "1",
                           "--out", str(tmp_path / "fox.png"), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) < 300, proc.stderr
    assert "--prompt-syntax a1111" in lines[0] and "Multiple distributions found" not in proc.stderr
