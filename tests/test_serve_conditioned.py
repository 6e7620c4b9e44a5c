"""`sdtrt serve` for the models conditioned on an image: the x4 upscaler, depth2img and unCLIP variations.
A real server on a loopback port answers POST /v1/images with exactly the image `Pipeline.run` gives for the
same request (bit for bit: each such request runs as one call on its own), and a request without the image
the model needs gets a 422 naming the field, not a 500."""

from __future__ import annotations


import numpy as np
import pytest
import requests
from PIL import Image

from sdtrt import Pipeline, Request
from tests.test_serve import ThreadServer, b64png, decode, noise_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

FAMILIES = {
    # fixture, request fields besides the image, image size
    "upscaler": ("tiny_upscaler_onnx", {"noise_level": 30}, 16),
    "depth2img": ("tiny_depth2img_onnx", {"strength": 0.8}, 32),
    "unclip": ("tiny_unclip_onnx", {"noise_level": 10}, 32),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    name = request.param
    fixture, fields, size = FAMILIES[name]
    onnx = request.getfixturevalue(fixture)
    server = ThreadServer(onnx, max_batch=4, max_wait_ms=50)
    yield server, Pipeline.load(onnx, backend="onnxruntime"), fields, size
    server.close()


def test_the_server_gives_the_pipeline_image_and_names_a_missing_image(family):
    server, pipe, fields, size = family
    image = noise_image(size, size, seed=4)
    body = {"prompt": "a fox", "steps": 2, "seed": 7, **fields}
    r = requests.post(server.url + "/v1/images", json={**body, "image": b64png(image)}, timeout=120)
    assert r.status_code == 200, r.text
    want = np.asarray(pipe.run(Request(**body, image=image), progress=False).images[0])
    got = np.asarray(decode(r.json()["images"][0]))
    assert got.shape == want.shape and np.array_equal(got, want)

    r = requests.post(server.url + "/v1/images", json=body, timeout=60)
    assert r.status_code == 422 and "image" in r.json()["detail"], r.text
