"""`sdtrt demo`, tested twice against a real launched Gradio app on a loopback port:

1. in-process with gradio_client: every endpoint (txt2img, img2img, inpaint, random_seed, set_language);
   images equal to `Pipeline`'s for the same request and seed, bit for bit (same runtime, same ONNX
   Runtime CPU sessions on the same machine: there is no tolerance to state); the PNG files keep A1111's
   `parameters` chunk; bad input comes back as a message naming the field, never a traceback;
2. in a real headless Chromium (Debian's package, driven by Playwright): type a prompt, click Generate, wait for
   the image, download the PNG and compare it; paint an inpainting mask with the mouse; switch the language.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from sdtrt.cli import build_parser, main as cli

gr = pytest.importorskip("gradio", reason="sdtrt demo needs Gradio: pip install 'sdtrt[demo]'")
from gradio_client import Client, handle_file  # noqa: E402 - after the skip
from gradio_client.exceptions import AppError  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytestmark = pytest.mark.filterwarnings("ignore:'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")  # Gradio's, per queued call
STEPS = 3
SIZE = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if isinstance(image, (str, Path)) else image.convert("RGB"))


def start(model: Path, out: Path, lang: str | None = None):
    from sdtrt.demo.app import launch
    from sdtrt.runtime.pipeline import Pipeline

    return launch(Pipeline.load(model), port=free_port(), lang=lang, outdir=out, model_name=model.name)


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    s = start(tiny_onnx, tmp_path_factory.mktemp("demo-out"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    """The reference: the library, loaded separately from the demo's own Pipeline."""
    from sdtrt.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_onnx)


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)).save(path)
    return path


def square_mask(tmp: Path, rgba: bool) -> tuple[Path, Image.Image]:
    """A painted layer (RGBA, transparent but for a white square) or an uploaded mask (L); and the mask it means."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 40))
    path = tmp / ("layer.png" if rgba else "mask.png")
    if rgba:
        layer = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
        layer.paste((255, 255, 255, 255), (16, 16, 48, 40))
        layer.save(path)
    else:
        mask.save(path)
    return path, mask


def files_of(result) -> list[str]:
    gallery, files, info = result
    assert [g["image"] for g in gallery] and len(gallery) == len(files)
    return files


# --- 1. gradio_client -------------------------------------------------------------------------------


def test_txt2img_equals_the_pipeline_and_the_png_keeps_its_parameters(client, server, pipe):
    result = client.predict(prompt="a watercolor fox", negative_prompt="blurry", sampler="Euler a", steps=STEPS, cfg_scale=7.5,
                            seed=42, width=SIZE, height=SIZE, images=2, api_name="/txt2img")
    files = files_of(result)
    want = pipe("a watercolor fox", negative_prompt="blurry", scheduler="Euler a", steps=STEPS, guidance_scale=7.5, seed=42,
                height=SIZE, width=SIZE, num_images_per_prompt=2, progress=False).images
    for path, image in zip(files, want, strict=True):
        assert np.array_equal(pixels(path), pixels(image))
        text = Image.open(path).text["parameters"]
        assert text.startswith("a watercolor fox\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64")
        # the downloaded bytes are the file sdtrt's writer made, not a re-encoding of it
        assert Path(path).read_bytes() == (server.studio.outdir / Path(path).name).read_bytes()
    assert "Seed: 42" in result[2]


def test_seed_minus_one_draws_a_seed_and_reports_it(client, pipe):
    files = files_of(result := client.predict(prompt="a cat", steps=STEPS, seed=-1, api_name="/txt2img"))
    seed = int(Image.open(files[0]).text["parameters"].split("Seed: ")[1].split(",")[0])
    assert f"Seed: {seed}," in result[2]
    want = pipe("a cat", negative_prompt=None, steps=STEPS, seed=seed, progress=False).images[0]  # the page's defaults: native size, PLMS, 7.5
    assert np.array_equal(pixels(files[0]), pixels(want))


def test_img2img_equals_the_pipeline(client, pipe, init_png):
    files = files_of(client.predict(prompt="a fox", negative_prompt="", sampler="DDIM", steps=STEPS, cfg_scale=5.0, seed=7, width=SIZE,
                                    height=SIZE, images=1, strength=0.6, image=handle_file(str(init_png)), api_name="/img2img"))
    want = pipe("a fox", image=Image.open(init_png), strength=0.6, scheduler="DDIM", steps=STEPS, guidance_scale=5.0, seed=7,
                height=SIZE, width=SIZE, progress=False).images[0]
    assert np.array_equal(pixels(files[0]), pixels(want))
    assert "Denoising strength: 0.6" in Image.open(files[0]).text["parameters"]


@pytest.mark.parametrize("how", ["painted layer", "uploaded mask"])
def test_inpainting_equals_the_pipeline_with_that_mask(how, client, pipe, init_png, tmp_path):
    path, mask = square_mask(tmp_path, rgba=how == "painted layer")
    editor = {"background": handle_file(str(init_png)), "layers": [handle_file(str(path))] if how == "painted layer" else [],
              "composite": None}
    files = files_of(client.predict(prompt="a fox", steps=STEPS, seed=3, strength=0.9, image=editor,
                                    mask=handle_file(str(path)) if how == "uploaded mask" else None, api_name="/inpaint"))
    want = pipe("a fox", image=Image.open(init_png), mask_image=mask, strength=0.9, steps=STEPS, seed=3, progress=False).images[0]
    got = pixels(files[0])
    assert np.array_equal(got, pixels(want))
    assert not np.array_equal(got, pixels(pipe("a fox", steps=STEPS, seed=3, progress=False).images[0]))


def test_random_seed_endpoint_draws_a_new_seed(client):
    seeds = {client.predict(api_name="/random_seed") for _ in range(3)}
    assert len(seeds) > 1 and all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)


def test_language_switch_relabels_the_page_and_its_examples(client):
    def texts(updates) -> set[str]:
        return {str(u.get(k)) for u in updates for k in ("label", "value")} | {str(u.get("samples")) for u in updates}

    # (the API returns the updates of value components; tabs and buttons are checked in the browser test)
    zh = texts(client.predict("zh", api_name="/set_language"))
    assert {"## sdtrt — Stable Diffusion 文生图", "提示词", "反向提示词", "随机种子", "采样方法", "重绘幅度", "原图"} <= zh
    assert any("飞流直下三千尺" in t for t in zh)  # the examples follow the language
    en = texts(client.predict("en", api_name="/set_language"))
    assert {"## sdtrt — Stable Diffusion", "Prompt", "Negative prompt", "Seed", "Sampler"} <= en and "提示词" not in en


@pytest.mark.parametrize("call, message", [
    (dict(width=100, api_name="/txt2img"), "Width: 100 is not a positive multiple of 8. Try 96"),
    (dict(width=100, lang="zh", api_name="/txt2img"), "宽度: 100 is not a positive multiple of 8. 可改为 96"),
    (dict(api_name="/img2img"), "Upload an initial image first."),
    (dict(api_name="/inpaint"), "Upload an initial image first."),
    (dict(image={"background": "INIT", "layers": [], "composite": None}, api_name="/inpaint"), "Paint the area to repaint"),
    (dict(steps=0, api_name="/txt2img"), "less than minimum value 1"),
    (dict(sampler="nope", api_name="/txt2img"), "not in the list of choices"),
], ids=["size", "size-zh", "img2img-no-image", "inpaint-no-image", "inpaint-no-mask", "steps", "sampler"])
def test_bad_input_is_a_clear_message_not_a_traceback(call, message, client, init_png):
    from gradio_client.exceptions import AppError

    if isinstance(call.get("image"), dict):
        call["image"]["background"] = handle_file(str(init_png))
    with pytest.raises(AppError) as e:
        client.predict(prompt="a fox", steps=call.pop("steps", STEPS), **call)
    assert message in str(e.value) and "Traceback" not in str(e.value)


def test_generations_wait_their_turn_in_the_queue(client, server, monkeypatch):
    active, most = [0], [0]
    lock = threading.Lock()
    generate = server.studio.generate

    def counted(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.2)
            return generate(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(server.studio, "generate", counted)
    jobs = [client.submit(prompt=f"a fox {i}", steps=2, seed=i, api_name="/txt2img") for i in range(3)]
    results = [job.result(timeout=120) for job in jobs]
    assert [Image.open(r[1][0]).text["parameters"].split("\n")[0] for r in results] == ["a fox 0", "a fox 1", "a fox 2"]
    assert most[0] == 1, "two generations ran at once on one model"


def test_stop_ends_the_users_run_after_a_step_and_frees_the_model(client, server, pipe):
    stops = len(server.studio.stops)
    job = client.submit(prompt="a fox", steps=150, seed=1, api_name="/txt2img")
    deadline = time.monotonic() + 60
    while not any(u.desc == "denoising" for u in (job.status().progress_data or [])):
        assert time.monotonic() < deadline and not job.done(), "the run never started denoising"
        time.sleep(0.005)
    # the Stop button's call, as the page makes it: same session, not queued (gradio_client itself loses replies
    # when a second event of one session overlaps a running one, so the call is made over plain HTTP)
    r = requests.post(f"{server.url.rstrip('/')}/gradio_api/run/stop", json={"data": [], "session_hash": client.session_hash}, timeout=30)
    assert r.status_code == 200, r.text
    with pytest.raises(AppError, match=r"Stopped after step \d+ of 151"):  # the user is told
        job.result(timeout=60)
    done, total = server.studio.stops[-1]  # and the model's thread itself stopped early
    assert len(server.studio.stops) == stops + 1 and 1 <= done < total == 151
    # the model is free and the next run is whole
    files = files_of(client.predict(prompt="a cat", steps=STEPS, seed=3, width=SIZE, height=SIZE, api_name="/txt2img"))
    want = pipe("a cat", negative_prompt=None, steps=STEPS, seed=3, height=SIZE, width=SIZE, progress=False).images[0]
    assert np.array_equal(pixels(files[0]), pixels(want))


def test_stop_with_nothing_running_does_nothing(client, server):
    stops = len(server.studio.stops)
    client.predict(api_name="/stop")
    assert len(server.studio.stops) == stops


def test_progress_is_reported_for_every_denoising_step(server):
    from sdtrt.demo.app import _handler

    calls = []

    class Recorder:
        def __call__(self, progress, desc=None, total=None, unit="steps"):
            calls.append((progress, desc))

    _handler("txt2img", server.studio)("a fox", steps=4, seed=1, width=SIZE, height=SIZE, progress=Recorder())
    steps = [p for p, _ in calls if isinstance(p, tuple)]
    assert steps == [(i, 5) for i in range(1, 6)]  # PLMS (the tiny model's) runs steps + 1 UNet calls
    assert calls[0] == (0, "encoding the prompt") and calls[-1][1] == "decoding"


def test_progress_reaches_the_client(client):
    job = client.submit(prompt="a fox", steps=80, seed=1, api_name="/txt2img")
    seen = set()
    while not job.done():
        status = job.status()
        seen |= {(u.desc, u.length) for u in status.progress_data or []}
        time.sleep(0.005)
    job.result()
    assert ("denoising", 81) in seen


def test_a_taiyi_model_opens_in_chinese_and_matches_the_pipeline(tiny_taiyi_onnx, tmp_path):
    from sdtrt.runtime.pipeline import Pipeline

    server = start(tiny_taiyi_onnx, tmp_path / "out")
    try:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
        props = {c.get("props", {}).get("elem_id"): c.get("props", {}) for c in client.config["components"]}
        assert props["language"]["value"] == "zh" and props["txt2img_generate"]["value"] == "生成"
        assert props["clip_hint"]["value"] == ""  # no "use English prompts" hint for a Chinese text encoder
        files = files_of(client.predict(prompt="飞流直下三千尺，油画", negative_prompt="广告，低质量", steps=STEPS, seed=5, api_name="/txt2img"))
        want = Pipeline.load(tiny_taiyi_onnx)("飞流直下三千尺，油画", negative_prompt="广告，低质量", steps=STEPS, seed=5, progress=False).images[0]
        assert np.array_equal(pixels(files[0]), pixels(want))
        assert Image.open(files[0]).text["parameters"].startswith("飞流直下三千尺，油画\nNegative prompt: 广告，低质量\n")
    finally:
        server.close()


# --- the command --------------------------------------------------------------------------------------


def test_demo_help_teaches(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "sdtrt demo" in out and "pip install 'sdtrt[demo]'" in out and "--share" in out


def test_demo_without_gradio_names_the_extra(tiny_onnx, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError, as when it is not installed
    assert cli(["demo", str(tiny_onnx)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sdtrt[demo]'" in err and "Traceback" not in err


def test_demo_refuses_a_wrong_folder_in_one_line(tmp_path, capsys):
    assert cli(["demo", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("sdtrt: error:") == 1 and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_command_serves_the_page_and_stops_on_a_signal(sig, tiny_onnx, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SDTRT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "demo", str(tiny_onnx), "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"sdtrt demo: open http://127.0.0.1:{port}"), line + proc.stderr.read()
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "<title>sdtrt</title>" in page or "sdtrt" in page
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 128 + sig, err
    assert "Traceback" not in err and "sdtrt demo: stopped" in err


# --- 2. a real browser --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in sdtrt[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


def type_text(field, text) -> None:
    """Type into a box and leave it (Gradio takes a number on change, which leaving the box fires). Gradio renders
    its inputs once more while the page finishes loading, dropping what was typed in its first moments (no person
    types that fast): type again until it stays."""
    for _ in range(10):
        field.fill(str(text))
        field.press("Tab")
        field.page.wait_for_timeout(300)
        if field.input_value() == str(text):
            return
    raise AssertionError(f"{text!r} did not stay typed")


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 1400}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url)
    type_text(page.locator("#txt2img_prompt textarea"), "ready")  # the page has finished loading once typing stays
    type_text(page.locator("#txt2img_prompt textarea"), "")
    yield page
    context.close()


def test_browser_txt2img_download_equals_the_pipeline(page, pipe, tmp_path):
    type_text(page.locator("#txt2img_prompt textarea"), "a watercolor fox")
    type_text(page.locator("#txt2img_negative_prompt textarea"), "blurry")
    type_text(page.locator("#txt2img_steps input[type=number]"), STEPS)
    type_text(page.locator("#txt2img_seed input"), 42)
    page.locator("#txt2img_generate").click()
    page.locator("#txt2img_gallery img").first.wait_for()
    with page.expect_download() as download:
        page.locator("#txt2img_files a").first.click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert Image.open(path).text["parameters"].startswith("a watercolor fox\nNegative prompt: blurry\nSteps: 3, Sampler: PLMS, "
                                                          "CFG scale: 7.5, Seed: 42, Size: 64x64")
    want = pipe("a watercolor fox", negative_prompt="blurry", steps=STEPS, seed=42, progress=False).images[0]
    assert np.array_equal(pixels(path), pixels(want))
    # what the gallery shows is the same file
    shown = page.request.get(page.locator("#txt2img_gallery img").first.get_attribute("src")).body()
    assert shown == path.read_bytes()


def test_browser_random_seed_and_language_switch(page):
    from playwright.sync_api import expect

    seed = page.locator("#txt2img_seed input")
    page.locator("#txt2img_random_seed").click()
    expect(seed).not_to_have_value("-1")
    assert 0 <= int(seed.input_value()) < 2**32
    page.locator("#language").get_by_text("中文").click()
    expect(page.locator("#txt2img_generate")).to_have_text("生成")
    expect(page.locator("#tab_inpaint-button")).to_have_text("局部重绘")
    expect(page.locator("#txt2img_prompt label, #txt2img_prompt span").first).to_contain_text("提示词")
    page.locator("#examples").get_by_text("飞流直下三千尺，油画").click()  # an example fills the prompts of the tab in front
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("飞流直下三千尺，油画")
    expect(page.locator("#txt2img_negative_prompt textarea")).to_have_value("广告，模糊，低质量")


def test_browser_inpainting_with_a_mask_painted_by_mouse(page, server, pipe, init_png, monkeypatch):
    seen = []
    generate = server.studio.generate
    monkeypatch.setattr(server.studio, "generate", lambda request, progress=None, **kw: (seen.append(request), generate(request, progress, **kw))[1])
    page.locator("#tab_inpaint-button").click()
    with page.expect_file_chooser() as chooser:
        page.locator("#inpaint_editor").get_by_role("button", name="Upload", exact=True).click()
    chooser.value.set_files(str(init_png))
    page.locator("#inpaint_editor").get_by_role("button", name="Brush", exact=True).click()
    page.wait_for_timeout(500)  # the canvas takes the image
    box = page.locator("#inpaint_editor canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 30, y)
    page.mouse.down()
    page.mouse.move(x + 30, y, steps=10)
    page.mouse.up()
    type_text(page.locator("#inpaint_prompt textarea"), "a fox")
    type_text(page.locator("#inpaint_steps input[type=number]"), STEPS)
    type_text(page.locator("#inpaint_seed input"), 9)
    page.locator("#inpaint_generate").click()
    page.locator("#inpaint_gallery img").first.wait_for()
    (request,) = seen
    assert (request.steps, request.seed) == (STEPS, 9)
    mask = np.asarray(request.mask_image)
    assert request.image.size == (SIZE, SIZE) and mask.shape == (SIZE, SIZE)
    assert mask[SIZE // 2, SIZE // 2] == 255 and mask[0, 0] == 0  # painted across the middle, not the corner
    assert np.array_equal(np.asarray(request.image), pixels(init_png))  # the picture arrives unchanged (PNG, not lossy)
    with page.expect_download() as download:
        page.locator("#inpaint_files a").first.click()
    want = pipe("a fox", image=Image.open(init_png), mask_image=request.mask_image, steps=STEPS, seed=9, progress=False).images[0]
    assert np.array_equal(pixels(download.value.path()), pixels(want))
