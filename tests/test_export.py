"""`sdtrt export`: the ONNX contract, validation that can fail, external data, and refusals of bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sdtrt.artifacts import open_model_dir
from sdtrt.cli import main as cli
from sdtrt.export import export_model
from sdtrt.export import graph, validate
from sdtrt.export.exporter import sample_inputs
from sdtrt.export.source import inspect_source

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32"}


def _io(path: Path) -> dict[str, tuple[str, list]]:
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for v in list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        out[v.name] = (ONNX_DTYPES[v.type.tensor_type.elem_type], dims)
    return out


@pytest.mark.parametrize("fixture,float_type", [("tiny_onnx", "float32"), ("tiny_onnx_fp16", "float16")])
def test_export_follows_the_onnx_contract(fixture, float_type, request):
    onnx_dir: Path = request.getfixturevalue(fixture)
    model = open_model_dir(onnx_dir)
    for name, info in model.meta.components.items():
        io = _io(onnx_dir / info.path)
        spec = model.specs[name]
        assert list(io) == spec.input_names + spec.output_names
        expected_float = float_type if not name.startswith("vae") else "float32"  # the VAE stays fp32
        for t in spec.inputs + spec.outputs:
            dtype, dims = io[t.name]
            assert dtype == (expected_float if t.dtype == "float" else t.dtype), (name, t.name)
            for axis, symbol in t.dynamic_axes().items():
                assert dims[axis] == symbol, (name, t.name, dims)
    assert model.specs["unet"].tensor("sample").dims == ("B2", 4, "h", "w")  # concrete channels from the model's config


def test_metadata_describes_the_export(tiny_onnx, tiny_model):
    meta = json.loads((tiny_onnx / "sdtrt.json").read_text())
    assert meta["family"] == "sd" and meta["opset"] == 17 and meta["dtype"] == "fp32" and meta["format_version"] == 3
    assert set(meta["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    # the family's model config is the diffusers configs, verbatim: every spec is a function of it
    assert meta["config"]["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert meta["config"]["unet"] == json.loads((tiny_model / "unet" / "config.json").read_text())
    assert meta["scheduler_config"]["_class_name"] == "PNDMScheduler"
    assert len(meta["source"]["sha256"]) == 64
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(meta["tokenizers"]["text_encoder"]["files"])
    assert (tiny_onnx / "tokenizer" / "vocab.json").read_bytes() == (tiny_model / "tokenizer" / "vocab.json").read_bytes()
    assert all(c["ok"] for c in meta["validation"]) and len(meta["validation"]) == 6


def test_fp16_validation_is_within_its_tolerance_and_finite(tiny_onnx_fp16):
    meta = json.loads((tiny_onnx_fp16 / "sdtrt.json").read_text())
    rows = {(c["component"], c["output"]): c for c in meta["validation"]}
    assert rows[("unet", "latent")]["dtype"] == "fp16" and rows[("unet", "latent")]["finite"]
    assert rows[("unet", "latent")]["rel"] <= open_model_dir(tiny_onnx_fp16).specs["unet"].tolerances["fp16"]
    assert rows[("vae_decoder", "images")]["dtype"] == "fp32"


def test_dynamic_axes_accept_other_batches_and_sizes(tiny_onnx, tiny_model):
    """The files were traced at one shape; they must give torch's answer at others."""
    src = inspect_source(tiny_model)
    for name, size, batch in [("unet", 96, 3), ("vae_decoder", 48, 2)]:
        spec = src.specs[name]
        ref = spec.load(src.path, False)
        inputs = sample_inputs(spec, size, size + 16, seed=3)
        inputs = tuple(x.repeat(batch, *[1] * (x.dim() - 1)) if x.numel() > 1 else x for x in inputs)
        [check] = validate.compare(spec, "fp32", tiny_onnx / name / "model.onnx", ref, inputs)
        assert check.ok, check
    # long prompts: the UNet's text axis takes 77 x chunks tokens
    unet = src.specs["unet"]
    sample, t, ehs = sample_inputs(unet, 64, 64, seed=4)
    [check] = validate.compare(unet, "fp32", tiny_onnx / "unet" / "model.onnx", unet.load(src.path, False),
                               (sample, t, torch.cat([ehs, ehs.flip(1)], dim=1)))
    assert check.ok, check


def _perturb_first_large_initializer(path: Path) -> None:
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = onnx.numpy_helper.to_array(init).copy() * 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))


def test_perturbed_initializer_fails_validation(tiny_onnx, tiny_model, tmp_path):
    bad = tmp_path / "unet.onnx"
    shutil.copy(tiny_onnx / "unet" / "model.onnx", bad)
    shutil.copy(tiny_onnx / "unet" / "model.onnx.data", tmp_path / "model.onnx.data")  # weight matrices are external
    _perturb_first_large_initializer(bad)
    unet = inspect_source(tiny_model).specs["unet"]
    checks = validate.compare(unet, "fp32", bad, unet.load(tiny_model, False), sample_inputs(unet, 64, 64))
    with pytest.raises(validate.ValidationFailed, match="relative error"):
        validate.raise_on_failure(checks)


def test_validation_failure_fails_the_export_and_leaves_nothing(tiny_model, tmp_path, monkeypatch, capsys):
    real = graph.clean_and_save

    def clean_then_corrupt(raw, out, spec, *rest):  # fault injection: a wrong graph reaches validation
        external = real(raw, out, spec, *rest)
        if out.parent.name == "text_encoder":
            _perturb_first_large_initializer(out)
        return external

    monkeypatch.setattr(graph, "clean_and_save", clean_then_corrupt)
    out = tmp_path / "onnx"
    assert cli(["export", str(tiny_model), "--out", str(out), "--no-progress"]) != 0
    assert "does not match" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_external_data_path(tiny_model, tmp_path):
    out = export_model(tiny_model, tmp_path / "onnx", components=["unet"], external_data_threshold=0, show_progress=False)
    files = sorted(p.name for p in (out / "unet").iterdir())
    assert files == ["model.onnx", "model.onnx.data"]
    # the weights (3.2 MB) moved out; what stays is graph structure and tensors under 1 KiB
    assert (out / "unet" / "model.onnx").stat().st_size < 1_000_000 < (out / "unet" / "model.onnx.data").stat().st_size
    assert json.loads((out / "sdtrt.json").read_text())["components"]["unet"]["external_data"] is True


# --- bad input ------------------------------------------------------------------------------------


def _err(capsys, argv) -> str:
    assert cli(argv) == 2
    return capsys.readouterr().err


def test_missing_folder_is_refused(capsys, tmp_path):
    assert "make-model" in _err(capsys, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])


def test_non_diffusers_folder_is_refused(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    assert "model_index.json" in _err(capsys, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "o")])


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_family_names_the_supported_ones(tiny_model, tmp_path, capsys):
    m = _copy_model(tiny_model, tmp_path / "m")
    index = json.loads((m / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (m / "model_index.json").write_text(json.dumps(index))
    err = _err(capsys, ["export", str(m), "--out", str(tmp_path / "o")])
    assert "Stable Diffusion 3" in err and "Stable Diffusion 1.x/2.x (StableDiffusionPipeline" in err


def test_pickle_weights_are_refused_unless_allowed(tiny_model, tmp_path, capsys):
    m = _copy_model(tiny_model, tmp_path / "m")
    from safetensors.torch import load_file

    for f in list(m.glob("*/*.safetensors")):  # the file names each library looks for
        target = f.with_name("pytorch_model.bin") if f.name == "model.safetensors" else f.with_suffix(".bin")
        torch.save(load_file(f), target)
        f.unlink()
    err = _err(capsys, ["export", str(m), "--out", str(tmp_path / "o")])
    assert "pickle" in err and "--allow-pickle" in err
    assert not (tmp_path / "o").exists()
    assert cli(["export", str(m), "--out", str(tmp_path / "o"), "--allow-pickle", "--components", "text_encoder", "--no-progress"]) == 0


def test_existing_output_is_refused_unless_forced(tiny_model, tiny_onnx, capsys):
    before = (tiny_onnx / "sdtrt.json").stat().st_mtime
    assert "--force" in _err(capsys, ["export", str(tiny_model), "--out", str(tiny_onnx)])
    assert (tiny_onnx / "sdtrt.json").stat().st_mtime == before


@pytest.mark.parametrize("opset", ["11", "21"])
def test_unproducible_opset_is_refused_with_the_range(tiny_model, tmp_path, capsys, opset):
    assert "17-20" in _err(capsys, ["export", str(tiny_model), "--out", str(tmp_path / "o"), "--opset", opset])


def test_unknown_component_lists_the_known_ones(tiny_model, tmp_path, capsys):
    assert "vae_encoder" in _err(capsys, ["export", str(tiny_model), "--out", str(tmp_path / "o"), "--components", "unet,clip"])


def test_killed_export_never_leaves_a_complete_looking_folder(tiny_model, tmp_path):
    out = tmp_path / "onnx"
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "export", str(tiny_model), "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".onnx.*.partial/unet")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".onnx.*.partial")), "export never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only the hidden .partial folder remains; nothing looks finished
    # the next export cleans up what the killed one abandoned
    export_model(tiny_model, out, components=["text_encoder"], show_progress=False, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_interrupted_export_removes_its_temporary_folder(tiny_model, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate, "compare_outputs", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model, tmp_path / "onnx", show_progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_every_weight_matrix_keeps_its_torch_name_in_the_onnx(tiny_onnx, tiny_model, component):
    """Adapters (LoRA deltas, engine refit) address weights by name: every Linear/Conv/embedding weight of
    the torch module is an ONNX initializer called spec.prefix + its parameter name, never a folded copy."""
    spec = open_model_dir(tiny_onnx).specs[component]
    module = spec.load(tiny_model, False)
    model = onnx.load(str(tiny_onnx / component / "model.onnx"))
    initializers = {t.name: t for t in model.graph.initializer}
    matrices = {n: p for n, p in module.named_parameters() if p.dim() >= 2}
    assert matrices and all(n in initializers for n in matrices), [n for n in matrices if n not in initializers][:5]
    embedding = spec.prefix + spec.token_embedding if spec.token_embedding else None
    for name, param in list(matrices.items())[:20]:
        assert name.startswith(spec.prefix)
        stored = onnx.numpy_helper.to_array(initializers[name], base_dir=str(tiny_onnx / component))
        if name == embedding:  # Textual Inversion rows reserved after the vocabulary, zero until used
            slots = open_model_dir(tiny_onnx).meta.embedding_slots
            assert stored.shape[0] == param.shape[0] + slots and not stored[param.shape[0]:].any()
            stored = stored[: param.shape[0]]
        assert np.array_equal(stored, param.detach().numpy())  # untransposed


def test_models_torch_writes_with_external_data_are_cleaned_by_streaming(tiny_onnx, tmp_path):
    """Over 2 GiB, torch writes one file per tensor; clean_and_save then works on a weightless graph and
    streams tensors into model.onnx.data one at a time (SDXL's fp32 UNet would not fit twice in 24 GB).
    Same outputs as the in-memory path, and the weight matrices keep their names."""
    import onnxruntime as ort

    from sdtrt.artifacts import open_model_dir

    source = tiny_onnx / "unet" / "model.onnx"
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    onnx.save_model(onnx.load(str(source)), str(raw), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(raw.parent.iterdir())) > 100  # like torch: a file per tensor
    spec = open_model_dir(tiny_onnx).specs["unet"]
    weights = {t.name for t in onnx.load(str(source), load_external_data=False).graph.initializer if t.name.startswith("unet.")}
    out = tmp_path / "clean" / "model.onnx"
    assert graph.clean_and_save(raw, out, spec, weights=weights) is True
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    feeds = {"sample": np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32)).astype(np.float32)}
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]  # noqa: E731
    assert np.allclose(run(source), run(out), atol=1e-5)
    names = {t.name for t in onnx.load(str(out), load_external_data=False).graph.initializer}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in names
