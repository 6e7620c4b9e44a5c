"""POST /v1/images: sdtrt's own request type over HTTP. The JSON fields are `sdtrt.Request`'s (the Python
API's names and meanings); images (`image`, `mask_image`, `control_image`) are base64 strings, never
paths. A request for one image joins batches like any other; one that makes several images from one
seed (several prompts or num_images_per_prompt > 1), uses a ControlNet, or goes to a model conditioned on
its image (x4 upscaler, depth2img, unCLIP) runs as one call on its own, so every request gets exactly the images `Pipeline.run` gives for it."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from ..errors import SdtrtError
from ..outputs import a1111_parameters
from ..runtime.images import _target_size
from ..runtime.request import InvalidRequest, Request
from ..outputs import encode
from .codec import decode_image, mask_tensor, to_tensor
from .errors import ApiError, bad_type, invalid
from .jobs import Job, Row, RowResult
from .service import reworded

FIELDS = {f.name: f for f in dataclasses.fields(Request)}
IMAGES = ("image", "mask_image", "control_image", "depth_map")  # base64 in, never a path: nothing in a request names a file
PAIRS = ("original_size", "target_size", "crops_coords_top_left", "negative_original_size", "negative_target_size",
         "negative_crops_coords_top_left")
NAMES = {"images": "num_images_per_prompt"}


@dataclasses.dataclass
class Plan:
    job: Job
    texts: list[str]  # prompts as written, per image (LoRA tags kept)


def plan(body: Any, service) -> Plan:
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_type", "the request body is not a JSON object.", fix="send a JSON object of sdtrt.Request fields")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise invalid(unknown[0], f"{unknown[0]} is not a field of sdtrt.Request.", f"use these fields: {', '.join(FIELDS)}")
    if "prompt" not in body:
        raise invalid("prompt", "prompt is required.", "send prompt: \"a watercolor fox\"")
    if body.get("output_type", "pil") != "pil":
        raise invalid("output_type", f"output_type={body['output_type']!r}: the server returns images only.", "leave output_type out")
    limit = service.settings.limits.max_input_pixels
    values = dict(body)
    for name in IMAGES:
        v = values.get(name)
        if v is None:
            continue
        if name == "control_image" and isinstance(v, list):
            values[name] = [decode_image(f"{name}[{i}]", x, limit) for i, x in enumerate(v)]
        else:
            values[name] = decode_image(name, v, limit)
    for name in PAIRS:
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    if "scheduler_options" in values and not isinstance(values["scheduler_options"], dict):
        raise bad_type("scheduler_options", values["scheduler_options"], "an object of scheduler config fields")
    try:
        request = Request(**values).check()
    except InvalidRequest as e:
        raise reworded(e, lambda p: NAMES.get(p, p)) from None
    except SdtrtError as e:
        raise invalid("request", e.problem, e.fix) from None
    return _job(request, body, service)


def _job(r: Request, body: dict, service) -> Plan:
    from .a1111 import _loras

    texts = r.prompts
    loras: tuple = ()
    if r.prompt_syntax == "a1111":
        cleaned = []
        for p in texts:
            text, found = _loras(p, service, disabled=False)
            cleaned.append(text)
            loras += found
        r = r.replace(prompt=cleaned if isinstance(r.prompt, list) or len(cleaned) > 1 else cleaned[0])
    controlled = bool(r.controlnets) or r.control_image is not None
    if controlled and not service.pipe.family.controlnets(service.pipe.config):
        raise invalid("controlnet", "this model was exported without a ControlNet.", "leave controlnet and control_image out")
    # a family conditioned on the image (upscaler, depth2img, unCLIP) reads it whole, at its own size: run on its own
    if r.batch > 1 or controlled or service.pipe.family.conditions_on_image:
        seed = r.seed if r.seed is not None else secrets.randbits(32)
        r = r.replace(seed=seed)
        job = service.prepare(r, [], NAMES, loras=loras, solo=r)
        return Plan(job, [t for t in texts for _ in range(r.num_images_per_prompt)])
    row = Row(r.prompts[0], r.seed if r.seed is not None else secrets.randbits(32),
              negative=None if r.negatives is None else r.negatives[0],
              prompt_2=None if r.prompt_2 is None else r.prompts_2[0],
              negative_2=None if r.negative_prompt_2 is None else r.negatives_2[0], text=texts[0])
    template = r
    if r.image is not None:
        try:
            height, width = _target_size(r.image.size, r.height, r.width, r.resize, "the image")
            if r.mask_image is not None and r.mask_image.size != r.image.size and not r.resize:
                raise SdtrtError(f"the mask is {r.mask_image.size[0]}x{r.mask_image.size[1]} but the image is "
                                 f"{r.image.size[0]}x{r.image.size[1]}.", "send a mask of the image's size, or resize: true")
        except SdtrtError as e:
            raise invalid("image" if "mask" not in e.problem else "mask_image", e.problem, e.fix) from None
        for side, v in (("height", height), ("width", width)):
            if v > service.settings.limits.max_size:
                from .errors import over_limit

                raise over_limit(side, v, service.settings.limits.max_size, "--max-size")
        row.image = to_tensor(r.image, height, width)
        if r.mask_image is not None:
            row.mask = mask_tensor(r.mask_image, height, width)
        template = r.replace(height=height, width=width, resize=False)
    job = service.prepare(template, [row], NAMES, loras=loras)
    return Plan(job, texts)


def finish(plan: Plan, results: list[RowResult]) -> tuple[list[bytes], dict[str, Any]]:
    """(PNG files with the parameters chunk, info: seeds, parameters, infotexts, timings)."""
    texts = [a1111_parameters({**r.parameters, "prompt": t}) for r, t in zip(results, plan.texts)]
    info = {"seeds": [r.parameters.get("seed") for r in results], "parameters": [_jsonable(r.parameters) for r in results],
            "infotexts": texts, "timings": {k: round(v, 6) for k, v in plan.job.timings.items()}}
    return [encode(r.image, "PNG", t) for r, t in zip(results, texts)], info


def _jsonable(p: dict[str, Any]) -> dict[str, Any]:
    return {k: ([list(x) for x in v] if k in ("loras", "embeddings") else v) for k, v in p.items()}
