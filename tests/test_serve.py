"""`sdtrt serve`: a real server on a free loopback port (uvicorn, in a thread or, for signals, a
subprocess), real HTTP (requests). Images decoded from responses are compared with `Pipeline` output
for the same model and seed: A1111 txt2img / img2img / inpaint within PSNR >= 45 dB, batched requests
bit for bit (each request gets exactly the image it would get alone). Plus auth, limits, every class of
bad request (4xx with a JSON body, never a 500), backpressure, timeouts, disconnects, SIGTERM drain."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from sdtrt import Pipeline, Request
from tests.helpers import psnr

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from sdtrt.serve.batcher import Batcher, QueueFull  # noqa: E402
from sdtrt.serve.jobs import Job, Row  # noqa: E402
from sdtrt.serve.service import Limits, Service, Settings  # noqa: E402

MIN_PSNR = 45.0
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


# --- servers ------------------------------------------------------------------------------------------------


class ThreadServer:
    """uvicorn serving create_app(service) on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, model: Path, **settings):
        import uvicorn

        from sdtrt.serve.app import create_app

        self.service = Service(lambda: Pipeline.load(model, backend="onnxruntime"), Settings(**settings)).start()
        self.service.loaded.wait(60)
        assert self.service.ready, self.service.load_error
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop(deadline=10)

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (e.g. 'sdtrt_batch_images_count', 'sdtrt_cancelled_total{reason="timeout"}')."""
        r = requests.get(self.url + "/metrics", headers=AUTH)
        assert r.status_code == 200, r.text
        text = r.text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {" if "{" not in name else True):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    p = Pipeline.load(tiny_onnx, backend="onnxruntime")
    yield p
    p.adapters.set_loras([])


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model):
    from sdtrt.adapters import weights_for
    from tests.test_adapter_formats import family_config
    from tests.test_adapters import kohya_lora

    folder = tmp_path_factory.mktemp("loras")
    kohya_lora(folder / "ink.safetensors", weights_for(family_config(tiny_model)), seed=21)
    (folder.parent / "secret.safetensors").write_bytes(b"outside the LoRA folder")
    return folder


@pytest.fixture(scope="module")
def server(tiny_onnx, loras):
    """The main server: an API key, batching with a generous wait (so concurrent requests meet), small limits."""
    s = ThreadServer(tiny_onnx, max_batch=4, max_wait_ms=300, max_queue=32, api_key=KEY, lora_dir=loras, model_name="tiny",
                     limits=Limits(max_steps=30, max_size=256, max_images=6, max_prompt_tokens=40, max_body_mb=1.0, timeout=60))
    yield s
    s.close()


@pytest.fixture(scope="module")
def http():
    with requests.Session() as s:
        s.headers.update(AUTH)
        yield s


def post(http, server, path, body, **kw):
    return http.post(server.url + path, json=body, timeout=60, **kw)


# --- helpers -----------------------------------------------------------------------------------------------


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def square_mask(w: int, h: int) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return Image.fromarray(m)


def alone(pipe, **kw) -> np.ndarray:
    return np.asarray(pipe.run(Request(**kw), progress=False).images[0])


# --- A1111 API: the same images as the Pipeline ----------------------------------------------------------------


def test_a1111_txt2img_gives_the_pipeline_image_for_each_seed(server, http, pipe):
    body = {"prompt": "a (watercolor:1.2) fox", "negative_prompt": "blurry", "steps": 3, "cfg_scale": 6.5, "seed": 100,
            "sampler_name": "Euler a", "batch_size": 2, "n_iter": 2, "width": 64, "height": 64}
    r = post(http, server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [100, 101, 102, 103] and info["seed"] == 100
    assert out["parameters"]["prompt"] == body["prompt"] and len(out["images"]) == 4
    for i, data in enumerate(out["images"]):
        image = decode(data)
        ref = alone(pipe, prompt=body["prompt"], negative_prompt="blurry", steps=3, guidance_scale=6.5,
                    scheduler="euler_ancestral", seed=100 + i, prompt_syntax="a1111", height=64, width=64)
        assert psnr(np.asarray(image), ref) >= MIN_PSNR
        text = image.text["parameters"]
        assert f"Seed: {100 + i}" in text and "Sampler: Euler a" in text and "Steps: 3" in text and "CFG scale: 6.5" in text
        assert text.startswith("a (watercolor:1.2) fox\nNegative prompt: blurry")


def test_seed_minus_one_is_random_and_reported(server, http, pipe):
    r = post(http, server, "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2, "seed": -1, "sampler_name": "DDIM"})
    assert r.status_code == 200, r.text
    seed = json.loads(r.json()["info"])["seed"]
    assert 0 <= seed < 2**32
    ref = alone(pipe, prompt="a cat", negative_prompt="", steps=2, guidance_scale=7.0, scheduler="ddim", seed=seed, prompt_syntax="a1111")
    assert psnr(np.asarray(decode(r.json()["images"][0])), ref) >= MIN_PSNR


def test_a1111_img2img_gives_the_pipeline_image(server, http, pipe):
    init = noise_image(80, 48, seed=1)  # resized to width x height (Lanczos), as A1111's "Just resize"
    body = {"prompt": "a fox", "init_images": [b64png(init)], "denoising_strength": 0.6, "steps": 5, "seed": 7,
            "cfg_scale": 5, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "width": 64, "height": 64}
    r = post(http, server, "/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text
    ref = alone(pipe, prompt="a fox", negative_prompt="", image=init, strength=0.6, steps=5, seed=7, guidance_scale=5.0,
                scheduler="dpmpp_2m_karras", height=64, width=64, prompt_syntax="a1111")
    image = decode(r.json()["images"][0])
    assert psnr(np.asarray(image), ref) >= MIN_PSNR
    assert "Sampler: DPM++ 2M Karras" in image.text["parameters"] and "Denoising strength: 0.6" in image.text["parameters"]
    assert "init_images" not in r.json()["parameters"]  # not echoed back unless include_init_images


def test_a1111_inpaint_gives_the_pipeline_image_with_the_unmasked_pixels_kept(server, http, pipe):
    init, mask = noise_image(64, 64, seed=2), square_mask(64, 64)
    body = {"prompt": "a red hat", "init_images": [b64png(init)], "mask": b64png(mask), "mask_blur": 0, "inpainting_fill": 1,
            "inpaint_full_res": False, "denoising_strength": 0.75, "steps": 4, "seed": 3, "sampler_name": "Euler"}
    r = post(http, server, "/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text
    got = np.asarray(decode(r.json()["images"][0]))
    ref = alone(pipe, prompt="a red hat", negative_prompt="", image=init, mask_image=mask, strength=0.75, steps=4, seed=3,
                guidance_scale=7.0, scheduler="euler", height=64, width=64, prompt_syntax="a1111")
    keep = np.asarray(mask) == 0
    ref = np.where(keep[..., None], np.asarray(init), ref)  # A1111 pastes the original pixels back outside the mask
    assert psnr(got, ref) >= MIN_PSNR
    assert json.loads(r.json()["info"])["is_using_inpainting_conditioning"]


def test_inpaint_defaults_blur_fill_and_invert_are_honoured(server, http):
    init, mask = noise_image(64, 64, seed=4), square_mask(64, 64)
    common = {"prompt": "a hat", "init_images": [b64png(init)], "mask": b64png(mask), "steps": 3, "seed": 1}
    default = post(http, server, "/sdapi/v1/img2img", common)  # A1111's defaults: mask_blur 4, inpainting_fill 0 (fill)
    assert default.status_code == 200, default.text
    got = np.asarray(decode(default.json()["images"][0])).astype(int)
    assert np.array_equal(got[:4, :4], np.asarray(init)[:4, :4])  # far from the blurred edge: the original pixels
    assert "Masked content: fill" in json.loads(default.json()["info"])["infotexts"][0]
    inverted = post(http, server, "/sdapi/v1/img2img", {**common, "inpainting_mask_invert": 1, "mask_blur": 0})
    got = np.asarray(decode(inverted.json()["images"][0]))
    assert np.array_equal(got[24:40, 24:40], np.asarray(init)[24:40, 24:40])  # the square is kept, the rest repainted


def test_send_images_false_and_harmless_fields_are_accepted(server, http):
    body = {"prompt": "a fox", "steps": 2, "seed": 1, "send_images": False, "save_images": True, "do_not_save_samples": True,
            "do_not_save_grid": True, "denoising_strength": 0.4, "hr_scale": 2, "script_args": [], "alwayson_scripts": {},
            "styles": [], "override_settings": {"samples_format": "png", "CLIP_stop_at_last_layers": 1},
            "some_future_field": 1}
    r = post(http, server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    assert r.json()["images"] == []
    assert json.loads(r.json()["info"])["sdtrt_ignored_fields"] == ["some_future_field"]


def test_clip_skip_from_override_settings(server, http, pipe):
    body = {"prompt": "a fox", "steps": 2, "seed": 5, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    r = post(http, server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 200, r.text
    ref = alone(pipe, prompt="a fox", negative_prompt="", steps=2, seed=5, guidance_scale=7.0, scheduler="euler", clip_skip=1,
                prompt_syntax="a1111")
    image = decode(r.json()["images"][0])
    assert psnr(np.asarray(image), ref) >= MIN_PSNR and "Clip skip: 2" in image.text["parameters"]


@pytest.mark.parametrize("field,value", [
    ("enable_hr", True), ("restore_faces", True), ("tiling", True), ("subseed_strength", 0.3), ("styles", ["cinematic"]),
    ("alwayson_scripts", {"controlnet": {"args": []}}), ("script_name", "x/y/z plot"), ("seed_resize_from_h", 512),
    ("s_churn", 0.5), ("eta", 0.3), ("refiner_checkpoint", "sdxl_refiner"), ("sampler_name", "DPM adaptive"),
    ("scheduler", "Exponential"), ("override_settings", {"sd_vae": "vae-ft-mse"}),
])
def test_unsupported_a1111_fields_are_refused_naming_the_field(server, http, field, value):
    body = {"prompt": "a fox", "steps": 2, "sampler_name": "DDIM", field: value}
    r = post(http, server, "/sdapi/v1/txt2img", body)
    assert r.status_code == 422, r.text
    assert r.json()["field"].split(".")[0] == field and r.json()["detail"] and r.json()["fix"]


@pytest.mark.parametrize("field,value", [("resize_mode", 1), ("inpainting_fill", 2), ("inpaint_full_res", True),
                                         ("initial_noise_multiplier", 0.9)])
def test_unsupported_img2img_fields_are_refused(server, http, field, value):
    body = {"prompt": "a fox", "steps": 2, "init_images": [b64png(noise_image(64, 64, 0))], "mask": b64png(square_mask(64, 64)),
            field: value}
    r = post(http, server, "/sdapi/v1/img2img", body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_samplers_sd_models_options_and_loras_listings(server, http):
    names = [s["name"] for s in http.get(server.url + "/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC"} <= set(names)
    models = http.get(server.url + "/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny" and "/" not in models[0]["filename"]  # no server path leaks
    assert http.get(server.url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    assert http.get(server.url + "/sdapi/v1/loras").json() == [{"name": "ink", "alias": "ink"}]


# --- LoRA tags --------------------------------------------------------------------------------------------------


def test_lora_tag_resolves_inside_lora_dir_and_matches_set_loras(server, http, pipe, loras):
    r = post(http, server, "/sdapi/v1/txt2img", {"prompt": "a fox <lora:ink:0.5>", "steps": 3, "seed": 9})
    assert r.status_code == 200, r.text
    pipe.set_loras([(loras / "ink.safetensors", 0.5)])
    try:
        ref = alone(pipe, prompt="a fox ", negative_prompt="", steps=3, seed=9, guidance_scale=7.0, scheduler="euler", prompt_syntax="a1111")
    finally:
        pipe.set_loras([])
    plain = alone(pipe, prompt="a fox ", negative_prompt="", steps=3, seed=9, guidance_scale=7.0, scheduler="euler", prompt_syntax="a1111")
    image = np.asarray(decode(r.json()["images"][0]))
    assert psnr(image, ref) >= MIN_PSNR and psnr(image, plain) < 30  # the LoRA was applied
    after = post(http, server, "/sdapi/v1/txt2img", {"prompt": "a fox ", "steps": 3, "seed": 9})  # the next batch: no LoRA
    assert psnr(np.asarray(decode(after.json()["images"][0])), plain) >= MIN_PSNR
    assert "<lora:ink:0.5>" in decode(r.json()["images"][0]).text["parameters"]


@pytest.mark.parametrize("tag", ["<lora:../secret:1>", "<lora:/etc/passwd:1>", "<lora:..\\\\secret:1>", "<lora:nope:1>", "<lora:ink:x>"])
def test_lora_names_never_reach_outside_the_lora_dir(server, http, tag):
    r = post(http, server, "/sdapi/v1/txt2img", {"prompt": f"a fox {tag}", "steps": 2})
    assert r.status_code == 422 and r.json()["field"] == "prompt", r.text


# --- /v1/images: sdtrt's own request type -------------------------------------------------------------------------


def test_native_png_for_one_image(server, http, pipe):
    body = {"prompt": "a fox", "negative_prompt": "blurry", "steps": 3, "seed": 21, "scheduler": "unipc", "guidance_scale": 4.0}
    r = post(http, server, "/v1/images", body, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-seed"] == "21"
    ref = alone(pipe, **body)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), ref)


def test_native_json_with_several_images_from_one_seed_is_the_pipeline_call(server, http, pipe):
    body = {"prompt": ["a fox", "a cat"], "num_images_per_prompt": 2, "steps": 3, "seed": 5, "scheduler": "euler_ancestral",
            "height": 48, "width": 80}
    r = post(http, server, "/v1/images", body)
    assert r.status_code == 200, r.text
    out = r.json()
    ref = pipe.run(Request(**body), progress=False).images
    assert len(out["images"]) == 4 and out["seeds"] == [5, 5, 5, 5]
    for data, want in zip(out["images"], ref):
        assert np.array_equal(np.asarray(decode(data)), np.asarray(want))
    assert post(http, server, "/v1/images", body, headers={"Accept": "image/png"}).status_code == 406


def test_native_img2img_and_inpaint_take_base64_images(server, http, pipe):
    init, mask = noise_image(64, 64, seed=8), square_mask(64, 64)
    body = {"prompt": "a hat", "image": b64png(init), "mask_image": b64png(mask), "strength": 0.7, "steps": 4, "seed": 2}
    r = post(http, server, "/v1/images", body)
    assert r.status_code == 200, r.text
    ref = alone(pipe, prompt="a hat", image=init, mask_image=mask, strength=0.7, steps=4, seed=2)
    assert np.array_equal(np.asarray(decode(r.json()["images"][0])), ref)


# --- batching --------------------------------------------------------------------------------------------------


def _concurrently(fn, items):
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def test_concurrent_compatible_requests_share_a_batch_and_each_gets_its_own_image(server, http, pipe):
    before = (server.metric("sdtrt_batch_images_count"), server.metric("sdtrt_batch_images_sum"))
    prompts = ["a fox", "a red bicycle in the snow", "a cat", "an owl at night"]
    bodies = [{"prompt": p, "negative_prompt": "blurry" if i % 2 else "", "steps": 3, "seed": 40 + i, "sampler_name": "Euler a",
               "cfg_scale": 7.5} for i, p in enumerate(prompts)]
    responses = _concurrently(lambda b: post(http, server, "/sdapi/v1/txt2img", b), bodies)
    after = (server.metric("sdtrt_batch_images_count"), server.metric("sdtrt_batch_images_sum"))
    assert after[1] - before[1] == 4 and after[0] - before[0] < 4  # 4 images in fewer than 4 model calls
    for b, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        ref = alone(pipe, prompt=b["prompt"], negative_prompt=b["negative_prompt"], steps=3, seed=b["seed"], guidance_scale=7.5,
                    scheduler="euler_ancestral", prompt_syntax="a1111")
        assert np.array_equal(np.asarray(decode(r.json()["images"][0])), ref)  # bit for bit


def test_batched_img2img_requests_with_different_images_are_exact(server, http, pipe):
    inits = [noise_image(64, 64, seed=s) for s in (11, 12, 13)]
    bodies = [{"prompt": "a fox", "init_images": [b64png(im)], "denoising_strength": 0.5, "steps": 4, "seed": s, "sampler_name": "DDIM"}
              for s, im in zip((1, 2, 3), inits)]
    before = server.metric("sdtrt_batch_images_count")
    responses = _concurrently(lambda b: post(http, server, "/sdapi/v1/img2img", b), bodies)
    assert server.metric("sdtrt_batch_images_count") - before < 3
    for b, im, r in zip(bodies, inits, responses):
        assert r.status_code == 200, r.text
        ref = alone(pipe, prompt="a fox", negative_prompt="", image=im, strength=0.5, steps=4, seed=b["seed"], guidance_scale=7.0,
                    scheduler="ddim", height=64, width=64, prompt_syntax="a1111")
        assert np.array_equal(np.asarray(decode(r.json()["images"][0])), ref)


def test_incompatible_requests_run_apart_and_stay_correct(server, http, pipe):
    bodies = [{"prompt": "a fox", "steps": 3, "seed": 1}, {"prompt": "a fox", "steps": 4, "seed": 1},
              {"prompt": "a fox", "steps": 3, "seed": 1, "width": 48}, {"prompt": "a fox", "steps": 3, "seed": 1, "cfg_scale": 1}]
    before = server.metric("sdtrt_batch_images_count")
    responses = _concurrently(lambda b: post(http, server, "/sdapi/v1/txt2img", b), bodies)
    assert server.metric("sdtrt_batch_images_count") - before == 4
    for b, r in zip(bodies, responses):
        ref = alone(pipe, prompt="a fox", negative_prompt="", steps=b["steps"], seed=1, guidance_scale=float(b.get("cfg_scale", 7.0)),
                    scheduler="euler", width=b.get("width", 64), height=64, prompt_syntax="a1111")
        assert np.array_equal(np.asarray(decode(r.json()["images"][0])), ref)


def _job(key, n=1, solo=False):
    template = Request("x", steps=1)
    return Job(template, [Row("x", i) for i in range(n)], key=None if solo else key, solo=template if solo else None)


def test_batcher_is_oldest_first_fills_batches_and_never_starves():
    order, gate = [], threading.Event()

    def run(batch):
        gate.wait(5)
        order.append([(j.key, len(ix)) for j, ix in batch.parts])
        for j, ix in batch.parts:
            j.finish_rows(ix, [object()] * len(ix))

    b = Batcher(run, max_batch=3, max_wait=0.0, max_queue=10)
    jobs = [_job("A", 2), _job("B"), _job("A", 2), _job("B"), _job(None, solo=True), _job("A")]
    for j in jobs:
        b.submit(j)
    b.start()
    gate.set()
    for j in jobs:
        j.future.result(5)
    b.stop(5)
    # A (oldest) takes its 2 rows + 1 of the next A job; then B (now oldest) with the other B; then the rest of
    # A's second job with the last A; then the solo job, which never waited behind later arrivals of another key
    assert order[0] == [("A", 2), ("A", 1)]
    assert order[1] == [("B", 1), ("B", 1)]
    assert order[2] == [("A", 1), ("A", 1)]
    assert order[3] == [(None, 1)]
    with pytest.raises(QueueFull):
        full = Batcher(run, max_batch=1, max_wait=0, max_queue=1)
        full.submit(_job("A"))
        full.submit(_job("A"))


def test_batcher_waits_for_company_up_to_max_wait():
    sizes = []

    def run(batch):
        sizes.append(batch.images)
        for j, ix in batch.parts:
            j.finish_rows(ix, [object()] * len(ix))

    b = Batcher(run, max_batch=8, max_wait=0.3, max_queue=10)
    b.start()
    first = _job("A")
    b.submit(first)
    time.sleep(0.1)
    second = _job("A")
    b.submit(second)
    second.future.result(5)
    assert sizes == [2]  # the second arrived inside the first's wait
    b.stop(5)


# --- security -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ready", "/metrics", "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/docs", "/nope"])
def test_every_route_but_health_needs_the_key(server, path):
    assert requests.get(server.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer"}):
        r = requests.get(server.url + path, headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
    assert requests.get(server.url + "/ready", headers=AUTH).status_code == 200
    basic = base64.b64encode(f"user:{KEY}".encode()).decode()  # how A1111 clients send credentials
    assert requests.get(server.url + "/ready", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_cli_binds_loopback_by_default():
    from sdtrt.cli import build_parser

    a = build_parser().parse_args(["serve"])
    assert a.host == "127.0.0.1" and a.port == 7861 and a.api_key is None


# --- limits ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,field,limit", [
    ({"steps": 31}, "steps", "--max-steps"),
    ({"width": 264}, "width", "--max-size"),
    ({"height": 512}, "height", "--max-size"),
    ({"batch_size": 4, "n_iter": 2}, "batch_size x n_iter", "--max-images"),
    ({"prompt": "fox " * 41}, "prompt", "--max-prompt-tokens"),
    ({"negative_prompt": "blurry " * 41}, "negative_prompt", "--max-prompt-tokens"),
])
def test_limits_answer_422_naming_the_limit(server, http, body, field, limit):
    r = post(http, server, "/sdapi/v1/txt2img", {"prompt": "a fox", "steps": 2, **body})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["limit"] == limit and limit in r.json()["detail"]


def test_native_limits_name_request_fields(server, http):
    r = post(http, server, "/v1/images", {"prompt": "a fox", "num_images_per_prompt": 7})
    assert r.status_code == 422 and r.json()["field"] == "num_images_per_prompt" and r.json()["limit"] == "--max-images"


def test_body_over_max_body_mb_is_413(server, http):
    r = http.post(server.url + "/sdapi/v1/img2img", data=b'{"init_images": ["' + b"A" * (2 * 1024 * 1024) + b'"]}')
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


# --- bad requests: 4xx with a JSON body, never a 500 ------------------------------------------------------------------


BAD_A1111 = [
    ("/sdapi/v1/txt2img", b'{"prompt": "a fox",', 400, None),
    ("/sdapi/v1/txt2img", b"\xff\xfe not json", 400, None),
    ("/sdapi/v1/txt2img", b"", 400, None),
    ("/sdapi/v1/txt2img", b'["a fox"]', 422, None),
    ("/sdapi/v1/txt2img", b'"a fox"', 422, None),
    ("/sdapi/v1/txt2img", b'{"prompt": 5}', 422, "prompt"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": "many"}', 422, "steps"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": 0}', 422, "steps"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": 2.5}', 422, "steps"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "cfg_scale": "high"}', 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "steps": 2, "cfg_scale": -1}', 422, "cfg_scale"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "seed": 1.5}', 422, "seed"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "seed": -7}', 422, "seed"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "batch_size": true}', 422, "batch_size"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "width": 65}', 422, "width"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "width": -64}', 422, "width"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "sampler_name": 3}', 422, "sampler_name"),
    ("/sdapi/v1/txt2img", b'{"prompt": "x", "override_settings": []}', 422, "override_settings"),
    ("/sdapi/v1/img2img", b'{"prompt": "x"}', 422, "init_images"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": "abc"}', 422, "init_images"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["not base64!"]}', 422, "init_images[0]"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["aGVsbG8gd29ybGQ="]}', 422, "init_images[0]"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["/etc/passwd"]}', 422, "init_images[0]"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": [12]}', 422, "init_images[0]"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["data:image/png;base64,AAAA"]}', 422, "init_images[0]"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["%s"], "mask": "@@@"}', 422, "mask"),
    ("/sdapi/v1/img2img", b'{"prompt": "x", "init_images": ["%s"], "steps": 2, "denoising_strength": 1.5}', 422, "denoising_strength"),
    ("/v1/images", b'{"prompt": "x", "image_path": "/etc/passwd"}', 422, "image_path"),
    ("/v1/images", b'{"prompt": "x", "image": "/etc/passwd"}', 422, "image"),
    ("/v1/images", b'{"prompt": "x", "steps": "3"}', 422, "steps"),
    ("/v1/images", b'{"prompt": "x", "guidance_scale": null, "seed": -1}', 422, "seed"),
    ("/v1/images", b'{"prompt": "x", "steps": 2, "scheduler": "nope"}', 422, "scheduler"),
    ("/v1/images", b'{"prompt": "x", "steps": 2, "scheduler_options": {"beta_start": "a"}}', 422, "scheduler_options"),
    ("/v1/images", b'{"prompt": "x", "height": 72, "output_type": "latent"}', 422, "output_type"),
    ("/v1/images", b'{"prompt": [], "steps": 2}', 422, "prompt"),
    ("/v1/images", b'{"steps": 2}', 422, "prompt"),
    ("/v1/images", b'{"prompt": "x", "mask_image": "%s"}', 422, "request"),
    ("/v1/images", b'{"prompt": "x", "controlnet": "canny", "control_image": "%s"}', 422, "controlnet"),
]


@pytest.mark.parametrize("path,data,status,field", BAD_A1111)
def test_bad_requests_are_4xx_with_a_json_body(server, http, path, data, status, field):
    data = data.replace(b"%s", b64png(noise_image(64, 64, 0)).encode())
    r = http.post(server.url + path, data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] and body["detail"] and "Traceback" not in r.text
    if field is not None:
        assert body["field"] == field


def test_unexpected_errors_are_a_json_500_without_a_traceback(tiny_onnx, monkeypatch):
    s = ThreadServer(tiny_onnx, max_wait_ms=0)
    try:
        monkeypatch.setattr(s.service.pipe, "run", lambda *a, **k: (_ for _ in ()).throw(ZeroDivisionError("boom")))
        r = requests.post(s.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
        assert r.status_code == 500 and r.json()["error"] == "internal_error"
        assert "boom" not in r.text and "Traceback" not in r.text
    finally:
        s.close()


# --- backpressure, timeouts, disconnects --------------------------------------------------------------------------


SLOW = {"prompt": "a fox", "steps": 150, "width": 256, "height": 256, "seed": 1}  # ~2-4 s on 2 cores


@pytest.fixture(scope="module")
def small(tiny_onnx):
    """No batching, a queue of one, a short timeout."""
    s = ThreadServer(tiny_onnx, max_batch=1, max_wait_ms=0, max_queue=1, limits=Limits(timeout=1.0, max_steps=150, max_size=256))
    yield s
    s.close()


def test_full_queue_answers_503_with_retry_after(small):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(requests.post, small.url + "/sdapi/v1/txt2img", json={**SLOW, "steps": 20}, timeout=30)
        time.sleep(0.3)  # running
        second = pool.submit(requests.post, small.url + "/sdapi/v1/txt2img", json={**SLOW, "steps": 20}, timeout=30)
        time.sleep(0.3)  # queued: the queue (1) is full
        third = requests.post(small.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=30)
        assert third.status_code == 503 and third.json()["error"] == "queue_full"
        assert int(third.headers["Retry-After"]) >= 1
        assert {first.result().status_code, second.result().status_code} <= {200, 504}
    assert small.metric('sdtrt_rejected_total{reason="queue_full"}') >= 1


def test_timeout_is_504_and_stops_the_work_between_steps(small):
    started = time.monotonic()
    r = requests.post(small.url + "/sdapi/v1/txt2img", json=SLOW, timeout=30)
    assert r.status_code == 504 and r.json()["error"] == "timeout"
    # the model is free again at once: the cancelled run stopped between steps instead of finishing 150
    quick = requests.post(small.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=30)
    assert quick.status_code == 200
    assert time.monotonic() - started < 2.5
    assert small.metric('sdtrt_cancelled_total{reason="timeout"}') >= 1


def test_a_client_that_disconnects_is_cancelled_between_steps(small):
    before = small.metric('sdtrt_cancelled_total{reason="disconnect"}')
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(small.url + "/sdapi/v1/txt2img", json={**SLOW, "seed": 2}, timeout=0.3)
    deadline = time.monotonic() + 2
    while small.metric('sdtrt_cancelled_total{reason="disconnect"}') == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert small.metric('sdtrt_cancelled_total{reason="disconnect"}') == before + 1
    quick = requests.post(small.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=30)
    assert quick.status_code == 200 and quick.elapsed.total_seconds() < 1.0


# --- metrics ---------------------------------------------------------------------------------------------------


def test_metrics_cover_requests_queue_batches_stages_and_throughput(server, http):
    post(http, server, "/sdapi/v1/txt2img", {"prompt": "a fox", "steps": 2})
    text = http.get(server.url + "/metrics").text
    for name in ('sdtrt_requests_total{route="/sdapi/v1/txt2img",status="200"}', "sdtrt_queue_depth", "sdtrt_queue_images",
                 "sdtrt_batch_images_bucket", 'sdtrt_stage_seconds_bucket{le="0.01",stage="denoise"}',
                 'stage="queue_wait"', 'stage="text_encoder"', 'stage="vae_decoder"', 'stage="encode"', "sdtrt_images_total",
                 "sdtrt_images_per_second", "sdtrt_request_seconds_bucket", "sdtrt_ready 1.0"):
        assert name in text, name
    assert re.search(r'sdtrt_requests_total\{route="/sdapi/v1/txt2img",status="422"\} [1-9]', text)


# --- the command: lifecycle ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_cli(args, env=None):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt", "serve", *args, "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ready", headers=AUTH, timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not become ready")


def test_sigterm_stops_accepting_finishes_in_flight_work_and_exits_0(tiny_onnx):
    proc, url = _start_cli([str(tiny_onnx), "--max-wait-ms", "0"], env={"SDTRT_API_KEY": KEY})
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(requests.post, url + "/sdapi/v1/txt2img", json={**SLOW, "steps": 20}, headers=AUTH, timeout=60)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(requests.ConnectionError):  # no longer accepting
                requests.get(url + "/health", timeout=2)
            r = running.result()
            assert r.status_code == 200 and len(r.json()["images"]) == 1  # in-flight work finished
        assert proc.wait(30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_with_a_wrong_model_dir_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdtrt", "serve", str(tmp_path / "missing"), "--port", str(_free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("sdtrt: error:") and "Traceback" not in r.stderr
