"""Locust users for `benchmarks/load_test.py`: each user sends A1111 txt2img requests back to back (a closed
loop: N users = N requests in flight), with its own prompt and seed so that nothing can be cached.

Environment: SDTRT_LOAD_STEPS (default 4), SDTRT_LOAD_SIZE (pixels, default: the model's), SDTRT_LOAD_SAMPLER
(default "Euler a"), SDTRT_API_KEY (sent as a Bearer token when set)."""

from __future__ import annotations

import itertools
import os
import random

from locust import HttpUser, constant, task

STEPS = int(os.environ.get("SDTRT_LOAD_STEPS", "4"))
SIZE = int(os.environ["SDTRT_LOAD_SIZE"]) if os.environ.get("SDTRT_LOAD_SIZE") else None
SAMPLER = os.environ.get("SDTRT_LOAD_SAMPLER", "Euler a")
KEY = os.environ.get("SDTRT_API_KEY")
SUBJECTS = ["a fox", "a lighthouse", "an owl", "a red bicycle", "a bowl of ramen", "a castle", "a sailboat", "a robot"]
_seeds = itertools.count(random.randrange(1_000_000))


class A1111Client(HttpUser):
    wait_time = constant(0)

    def on_start(self):
        if KEY:
            self.client.headers["Authorization"] = f"Bearer {KEY}"

    @task
    def txt2img(self):
        body = {"prompt": f"{random.choice(SUBJECTS)}, watercolor", "negative_prompt": "blurry", "steps": STEPS,
                "cfg_scale": 7, "seed": next(_seeds), "sampler_name": SAMPLER}
        if SIZE:
            body.update(width=SIZE, height=SIZE)
        with self.client.post("/sdapi/v1/txt2img", json=body, name="txt2img", catch_response=True, timeout=600) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif len(r.json().get("images", [])) != 1:
                r.failure("no image in the response")
