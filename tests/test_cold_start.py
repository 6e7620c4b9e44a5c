"""Start-up: ONNX Runtime's optimized graphs cached per machine, and sessions made only when needed.

A cached graph must give exactly the images of a session optimized from the export (bitwise: the
same kernels on the same fused graph), must never be used for another export or for replaced weights,
and a damaged or unwritable cache must only cost time, never an error.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from sdtrt import Pipeline
from sdtrt.runtime.backends import ort_cache

CALL = {"steps": 2, "seed": 3, "progress": False, "output_type": "tensor"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SDTRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / ort_cache.FOLDER


@pytest.fixture
def onnx(tiny_onnx, tmp_path) -> Path:
    """A private copy: tests here change files in place."""
    return Path(shutil.copytree(tiny_onnx, tmp_path / "onnx"))


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()} if cache.is_dir() else set()


def _image(pipe: Pipeline, **kw) -> torch.Tensor:
    return pipe("a watercolor fox", **{**CALL, **kw}).tensors


def test_the_first_load_writes_one_entry_per_session_and_the_next_load_reads_them(onnx, cache):
    first = Pipeline.load(onnx)
    made = _entries(cache)
    assert len(made) == 3  # text encoder, UNet, VAE decoder: what txt2img needs (no VAE encoder yet)
    for entry in made:
        assert {p.name for p in (cache / entry).iterdir()} >= {ort_cache.MODEL, ort_cache.SOURCE}
    second = Pipeline.load(onnx)
    assert _entries(cache) == made
    paths = {s._model_path for s in second.backend._sessions.values()}
    assert all(str(cache) in p for p in paths), paths  # the sessions came from the cache
    assert torch.equal(_image(first), _image(second))


def test_a_cached_graph_gives_the_images_of_one_optimized_from_the_export(onnx, cache):
    Pipeline.load(onnx)  # fills the cache
    cached = Pipeline.load(onnx)
    uncached = Pipeline.load(onnx, optimized_cache=False)
    assert torch.equal(_image(cached), _image(uncached))
    assert torch.equal(_image(cached, height=48, width=80, num_images_per_prompt=2),
                       _image(uncached, height=48, width=80, num_images_per_prompt=2))


def test_a_changed_export_misses_and_replaces_its_old_entries(onnx, cache):
    Pipeline.load(onnx)
    before = _entries(cache)
    unet = onnx / "unet" / "model.onnx"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))  # edited in place
    Pipeline.load(onnx)
    after = _entries(cache)
    assert len(after) == 3 and len(after & before) == 2  # the UNet's entry replaced, the others kept


def test_entries_of_deleted_exports_are_pruned(onnx, tiny_onnx, tmp_path, cache):
    gone = Path(shutil.copytree(tiny_onnx, tmp_path / "gone"))
    Pipeline.load(gone)
    shutil.rmtree(gone)
    Pipeline.load(onnx)
    assert len(_entries(cache)) == 3


def test_a_damaged_entry_is_rebuilt_not_an_error(onnx, cache):
    reference = _image(Pipeline.load(onnx, optimized_cache=False))
    Pipeline.load(onnx)
    for entry in cache.iterdir():
        (entry / ort_cache.MODEL).write_bytes(b"not a graph")
    assert torch.equal(_image(Pipeline.load(onnx)), reference)
    assert all((e / ort_cache.MODEL).stat().st_size > 100 for e in cache.iterdir())  # rewritten


def test_replaced_weights_never_use_the_cache(onnx, cache, tmp_path):
    """A LoRA's session is optimized from the export with its weights: fusion renames initializers."""
    pipe = Pipeline.load(onnx)
    base = _image(pipe)
    unet = pipe.model.meta.components["unet"]
    name = next(iter(unet.weights))
    values = pipe.adapters._base_value("unet", {f"{pipe.model.specs['unet'].prefix}{name}"})
    pipe.backend.set_weights("unet", {k: v * 1.5 for k, v in values.items()})
    assert str(cache) not in pipe.backend._sessions["unet"]._model_path
    assert not torch.equal(_image(pipe), base)  # the replaced weight is used
    pipe.backend.set_weights("unet", {})
    assert torch.equal(_image(pipe), base)


def test_caching_off_or_unusable_writes_nothing_and_still_loads(onnx, cache, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SDTRT_ORT_CACHE", "0")
    Pipeline.load(onnx)
    assert _entries(cache) == set()
    monkeypatch.delenv("SDTRT_ORT_CACHE")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SDTRT_CACHE", str(tmp_path / "file"))  # a file, not a folder
    monkeypatch.setattr(ort_cache, "_warned", [])
    with caplog.at_level(logging.WARNING, logger="sdtrt"):
        pipe = Pipeline.load(onnx)
    assert [r.getMessage() for r in caplog.records if "not caching" in r.getMessage()] != []
    assert len([r for r in caplog.records if "not caching" in r.getMessage()]) == 1  # once, not per component
    _image(pipe)


def test_sessions_a_request_does_not_need_are_made_on_first_use(tiny_onnx, cache):
    pipe = Pipeline.load(tiny_onnx)
    assert set(pipe.backend._sessions) == {"text_encoder", "unet", "vae_decoder"}
    assert "vae_encoder" in pipe.backend.components()  # available, not yet loaded
    init = torch.rand(1, 3, 64, 64)
    pipe("a fox", image=init, strength=0.5, steps=2, progress=False)
    assert "vae_encoder" in pipe.backend._sessions
    eager = Pipeline.load(tiny_onnx, preload="all")
    assert set(eager.backend._sessions) == set(eager.backend.components())


def test_no_entry_is_written_when_the_disk_would_fill(onnx, cache, monkeypatch, caplog):
    import shutil as sh

    monkeypatch.setattr(ort_cache.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with caplog.at_level(logging.WARNING, logger="sdtrt"):
        _image(Pipeline.load(onnx))
    assert _entries(cache) == set() and any("GB free" in r.getMessage() for r in caplog.records)


def test_with_preload_none_a_refused_request_creates_no_session_and_no_cache(tiny_onnx, cache):
    from sdtrt.runtime.request import InvalidRequest

    pipe = Pipeline.load(tiny_onnx, preload="none")
    assert pipe.backend._sessions == {}
    with pytest.raises(InvalidRequest):
        pipe("a fox", clip_skip=99, steps=2, progress=False)
    assert pipe.backend._sessions == {} and _entries(cache) == set()
    pipe("a fox", steps=2, progress=False)
    assert set(pipe.backend._sessions) == {"text_encoder", "unet", "vae_decoder"}  # made together, before the run


def test_adapters_read_weights_of_a_hard_linked_export(tiny_onnx, tmp_path, cache):
    """onnx's own reader refuses data files with several links; exports copied with `cp -al` still take LoRAs."""
    own = Path(shutil.copytree(tiny_onnx, tmp_path / "own"))  # never link the session's shared export (see below)
    linked = Path(shutil.copytree(own, tmp_path / "linked", copy_function=os.link))
    pipe = Pipeline.load(linked)
    unet = pipe.model.meta.components["unet"]
    names = {pipe.model.specs["unet"].prefix + n for n in list(unet.weights)[:5]}
    ours = pipe.adapters._base_value("unet", names)
    import onnx
    from onnx import numpy_helper

    plain = Path(shutil.copytree(tiny_onnx / "unet", tmp_path / "plain"))  # bytes copied: one link, onnx reads it
    graph = onnx.load(str(plain / "model.onnx"))
    theirs = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer if t.name in names}
    assert ours.keys() == theirs.keys() == names
    for name in names:
        assert torch.equal(ours[name], torch.from_numpy(theirs[name].copy()))


def test_processes_loading_one_export_at_once_all_load_and_leave_one_whole_entry_each(onnx, cache):
    """Several servers starting together: each writes the graph in its own hidden folder; the first to
    finish puts its entry in place, the others keep it (a reader may be loading it) and drop theirs."""
    import subprocess
    import sys

    script = "import sys; from sdtrt import Pipeline; Pipeline.load(sys.argv[1]); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(onnx)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in results]
    made = _entries(cache)
    assert len(made) == 3 and not any(name.startswith(".") for name in made), made  # no partials left behind
    for entry in made:
        assert {p.name for p in (cache / entry).iterdir()} >= {ort_cache.MODEL, ort_cache.SOURCE}
    assert Pipeline.load(onnx).backend._sessions  # and the entries load
