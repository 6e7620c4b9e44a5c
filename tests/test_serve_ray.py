"""The same service as a Ray Serve deployment: a local Ray cluster started here (ray.init(), no other
machine), two replicas of the tiny model, requests routed by Ray over loopback HTTP. Each replica
batches on its own and gives the Pipeline's image for the seed; the API key holds there too."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket

import numpy as np
import pytest
import requests
from PIL import Image

from sdtrt import Pipeline, Request

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEY = "ray-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(tiny_onnx):
    from sdtrt.serve.ray_app import deployment

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(tiny_onnx, replicas=2, max_batch=4, max_wait_ms=50, api_key=KEY, model_name="tiny"),
                  name="sdtrt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_pipeline_images(cluster, tiny_onnx):
    pipe = Pipeline.load(tiny_onnx, backend="onnxruntime")
    bodies = [{"prompt": f"a fox number {i}", "steps": 3, "seed": 70 + i, "sampler_name": "Euler a"} for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda b: requests.post(cluster + "/sdapi/v1/txt2img", json=b, headers=AUTH, timeout=120), bodies))
    replicas = {r.headers["x-sdtrt-replica"] for r in responses}
    assert len(replicas) == 2  # Ray routed requests to both copies of the model
    for b, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))
        ref = pipe.run(Request(b["prompt"], "", steps=3, seed=b["seed"], guidance_scale=7.0, scheduler="euler_ancestral",
                               prompt_syntax="a1111"), progress=False).images[0]
        assert np.array_equal(got, np.asarray(ref))
        assert json.loads(r.json()["info"])["seed"] == b["seed"]


def test_ray_replicas_keep_the_api_key_limits_and_probes(cluster):
    assert requests.get(cluster + "/health", timeout=30).status_code == 200
    assert requests.get(cluster + "/ready", timeout=30).status_code == 401
    assert requests.get(cluster + "/ready", headers=AUTH, timeout=30).json()["status"] == "ready"
    bad = requests.post(cluster + "/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True}, headers=AUTH, timeout=30)
    assert bad.status_code == 422 and bad.json()["field"] == "enable_hr"
    assert "sdtrt_requests_total" in requests.get(cluster + "/metrics", headers=AUTH, timeout=30).text
