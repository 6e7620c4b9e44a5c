"""AUTOMATIC1111 web UI API (`/sdapi/v1/txt2img`, `/sdapi/v1/img2img`) -> sdtrt jobs, and results -> A1111's
response (`images`, `parameters`, `info`).

Every A1111 field falls in one of three groups (README: "Serving"):
- honoured: it means what it means in A1111 (seeds: seed + i per image, -1 random; batch_size x n_iter;
  A1111 sampler names; `<lora:NAME:SCALE>` tags from --lora-dir; emphasis and long prompts; img2img's
  Lanczos resize of the init image to width x height; inpainting's mask rules: alpha masks, invert,
  Gaussian blur, "fill" and "original" masked content, pasting the unmasked pixels back);
- ignored, as A1111 ignores them: saving options, `send_images` aside, and fields that only act with a
  feature that is off (hires-fix fields with enable_hr false, script_args without script_name) and
  unknown fields (A1111's API drops them too; we list them in info["sdtrt_ignored_fields"]);
- refused with 422 naming the field: any value that would change the image in a way sdtrt does not
  implement (enable_hr, restore_faces, tiling, styles, scripts, variation seeds, other resize modes ...).
The denoising itself is sdtrt's (diffusers' algorithms): the same seed gives the image sdtrt's Pipeline
gives, not A1111's pixels."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Any

import numpy as np

from .. import __version__
from ..errors import SdtrtError
from ..outputs import a1111_parameters
from ..runtime import schedulers
from ..runtime.adapters import lora_from_dir
from ..runtime.request import MAX_SEED, Request
from ..runtime.text.prompt_weights import lora_scale, lora_tags
from . import fields as F
from .codec import decode_image, mask_tensor, png_base64, to_tensor
from .errors import ApiError, bad_type, invalid, unsupported
from .jobs import Job, Row, RowResult

# A1111 field -> the Request field it feeds (for errors raised by the runtime in Request's names)
NAMES = {"guidance_scale": "cfg_scale", "num_images_per_prompt": "batch_size", "images": "batch_size x n_iter",
         "strength": "denoising_strength", "scheduler": "sampler_name", "scheduler_options": "sampler_name",
         "image": "init_images", "mask_image": "mask", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
         "request": "request"}

COMMON = {"prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
          "seed_resize_from_w", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter", "steps",
          "cfg_scale", "width", "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid",
          "eta", "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
          "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks",
          "firstpass_image", "comments", "script_name", "script_args", "send_images", "save_images",
          "alwayson_scripts", "force_task_id", "infotext", "denoising_strength"}
TXT2IMG = COMMON | {"enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
                    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
                    "hr_negative_prompt", "hr_additional_modules"}
IMG2IMG = COMMON | {"init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur", "mask_blur_x", "mask_blur_y",
                    "mask_round", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding",
                    "inpainting_mask_invert", "initial_noise_multiplier", "latent_mask", "include_init_images"}

# override_settings keys: honoured here, or harmless (they only change how A1111 saves files)
SAVING = {"samples_save", "samples_format", "grid_save", "grid_format", "save_to_dirs", "grid_save_to_dirs",
          "enable_pnginfo", "save_images_add_number", "outdir_samples", "outdir_txt2img_samples", "outdir_img2img_samples",
          "save_txt", "jpeg_quality", "export_for_4chan", "use_original_name_batch", "save_selected_only"}
ETA_DEFAULT = {"ddim": 0.0, "euler_ancestral": 1.0, "dpmpp_2m_sde": 1.0, "dpmpp_2m_sde_karras": 1.0}
FILL, ORIGINAL = 0, 1
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


@dataclasses.dataclass
class Plan:
    """A translated request: its job and what the response needs."""

    job: Job
    body: dict[str, Any]
    mode: str
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]  # as written, per image
    negatives: list[str]
    send_images: bool
    ignored: list[str]
    overlays: list[Any] | None = None  # inpainting: per image, the original pixels to paste back (RGBA)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- the two endpoints ---------------------------------------------------------------------------------


def txt2img(body: Any, service) -> Plan:
    body = _object(body)
    if F.flag(body, "enable_hr"):
        raise unsupported("enable_hr", True, "hires fix (a second, upscaled pass)", "send enable_hr: false and the final width/height")
    return _plan(body, service, "txt2img", TXT2IMG)


def img2img(body: Any, service) -> Plan:
    return _plan(_object(body), service, "img2img", IMG2IMG)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_type", "the request body is not a JSON object.", fix="send a JSON object of A1111 fields")
    return body


def _plan(body: dict, service, endpoint: str, known: set[str]) -> Plan:
    pipe = service.pipe
    _refusals(body, endpoint)
    prompt = F.text(body, "prompt", "") or ""
    negative = F.text(body, "negative_prompt", "") or ""
    batch_size = F.integer(body, "batch_size", 1, low=1)
    n_iter = F.integer(body, "n_iter", 1, low=1)
    count = batch_size * n_iter
    steps = F.integer(body, "steps", 50, low=1)
    cfg = F.number(body, "cfg_scale", 7.0)
    native = pipe.family.default_size(pipe.config)
    height = F.integer(body, "height", native[0], low=8)
    width = F.integer(body, "width", native[1], low=8)
    _size(service, height=height, width=width)
    scheduler = _sampler(body)
    _eta(body, scheduler)
    clip_skip = _override_settings(body, service)
    seed = _seed(body, count)
    subseed = F.integer(body, "subseed", -1)
    subseed = subseed if subseed != -1 else secrets.randbelow(4294967294)
    send_images = F.flag(body, "send_images", True)
    disable_networks = F.flag(body, "disable_extra_networks", False)

    text, loras = _loras(prompt, service, disable_networks)
    template = Request(text, negative, steps=steps, guidance_scale=cfg, scheduler=scheduler, height=height, width=width,
                       clip_skip=clip_skip, prompt_syntax="a1111")
    seeds = [seed + i for i in range(count)]
    rows = [Row(text, s, negative=negative, text=prompt) for s in seeds]
    overlays = None
    extra: dict[str, Any] = {}
    mode = "txt2img"
    if endpoint == "img2img":
        template, rows, overlays, mode, extra = _img2img(body, service, template, rows, batch_size, height, width)
    job = service.prepare(template, rows, NAMES, loras=loras)
    ignored = sorted(k for k in body if k not in known)
    return Plan(job, body, mode, seeds, [subseed + i for i in range(count)], [prompt] * count, [negative] * count,
                send_images, ignored, overlays, extra)


# --- field groups ------------------------------------------------------------------------------------------


def _refusals(body: dict, endpoint: str) -> None:
    """Fields whose non-default values would change the image in ways sdtrt does not implement."""
    if F.flag(body, "restore_faces"):
        raise unsupported("restore_faces", True, "face restoration (GFPGAN/CodeFormer)", "send restore_faces: false")
    if F.flag(body, "tiling"):
        raise unsupported("tiling", True, "seamless tiling", "send tiling: false")
    styles = body.get("styles")
    if styles not in (None, []):
        raise unsupported("styles", styles, "saved prompt styles", "write the style's text into prompt / negative_prompt")
    strength = body.get("subseed_strength", 0)
    if strength not in (None, 0, 0.0):
        raise unsupported("subseed_strength", strength, "variation seeds", "send subseed_strength: 0")
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        v = body.get(name, -1)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise bad_type(name, v, "an integer")
        if v is not None and v > 0:
            raise unsupported(name, v, "resizing the seed from another size", f"send {name}: -1")
    for name, default in (("s_min_uncond", 0), ("s_churn", 0), ("s_tmin", 0), ("s_noise", 1)):
        v = body.get(name)
        if v is not None and v != default:
            raise unsupported(name, v, "changing the k-diffusion sampler parameters", f"send {name}: {default} (or leave it out)")
    v = body.get("s_tmax")
    if v not in (None, 0, 0.0) and not (isinstance(v, float) and math.isinf(v)):
        raise unsupported("s_tmax", v, "changing the k-diffusion sampler parameters", "leave s_tmax out")
    for name, what in (("refiner_checkpoint", "a refiner checkpoint"), ("firstpass_image", "a first-pass image"),
                       ("script_name", "A1111 scripts"), ("infotext", "parameters from an infotext"),
                       ("latent_mask", "a separate latent mask")):
        v = body.get(name)
        if v not in (None, "", "None"):
            raise unsupported(name, v if not isinstance(v, str) or len(v) < 60 else v[:57] + "...", what, f"leave {name} out")
    scripts = body.get("alwayson_scripts")
    if scripts not in (None, {}):
        if not isinstance(scripts, dict):
            raise bad_type("alwayson_scripts", scripts, "an object")
        raise unsupported("alwayson_scripts", sorted(scripts), "A1111 extensions (ControlNet, ADetailer, ...)",
                          "send alwayson_scripts: {} (sdtrt's ControlNet is in POST /v1/images)")


def _size(service, **sides: int) -> None:
    """Sizes first, before any image is decoded or resized to them."""
    from ..models.spec import nearest_sizes

    from .errors import over_limit

    for name, v in sides.items():
        if v % 8:
            raise invalid(name, f"{name}={v} is not a multiple of 8.", f"send {name}={int(nearest_sizes(v).split()[0])} (nearest valid: {nearest_sizes(v)})")
        if v > service.settings.limits.max_size:
            raise over_limit(name, v, service.settings.limits.max_size, "--max-size")


def _sampler(body: dict) -> str:
    name = F.text(body, "sampler_name", None) or F.text(body, "sampler_index", "Euler") or "Euler"
    field = "sampler_name" if body.get("sampler_name") else ("sampler_index" if body.get("sampler_index") else "sampler_name")
    kind = F.text(body, "scheduler", None)
    if kind not in (None, "", "Automatic", "automatic"):
        if kind.lower() != "karras":
            raise unsupported("scheduler", kind, f"the {kind!r} noise schedule", "send scheduler: 'Automatic' or 'Karras'")
        name = name if name.lower().endswith("karras") else f"{name} Karras"
        field = "scheduler"
    try:
        return schedulers.resolve(name)
    except SdtrtError:
        raise invalid(field, f"{field}={name!r} is not a sampler sdtrt has.",
                      f"use one of {', '.join(sampler_names())} (GET /sdapi/v1/samplers)") from None


def _eta(body: dict, scheduler: str) -> None:
    eta = body.get("eta")
    if eta is None:
        return
    F.number(body, "eta")
    default = ETA_DEFAULT.get(scheduler)
    if default is not None and eta != default:
        raise unsupported("eta", eta, f"eta other than {default} for {schedulers.display_name(scheduler)}", f"send eta: {default} or leave it out")


def _override_settings(body: dict, service) -> int | None:
    """A1111 settings for this request: CLIP skip and the checkpoint name are honoured, saving options ignored."""
    settings = body.get("override_settings")
    if settings in (None, {}):
        return None
    if not isinstance(settings, dict):
        raise bad_type("override_settings", settings, "an object")
    clip_skip = None
    for key, value in settings.items():
        field = f"override_settings.{key}"
        if key == "CLIP_stop_at_last_layers":
            layers = F.integer(settings, key, low=1)
            if layers > 1:
                clip_skip = layers - 1  # A1111 counts from 1 (no skip); diffusers' clip_skip from 0
        elif key == "sd_model_checkpoint":
            if value not in model_titles(service):
                raise invalid(field, f"{field}={value!r}: this server runs {service.settings.model_name} only.",
                              "leave sd_model_checkpoint out, or send one of GET /sdapi/v1/sd-models")
        elif key in ("eta_ddim", "eta_ancestral"):
            want = 0.0 if key == "eta_ddim" else 1.0
            if value != want:
                raise unsupported(field, value, f"{key} other than {want}", f"drop {key}")
        elif key not in SAVING:
            raise unsupported(field, value, f"the setting {key}", f"drop {key} from override_settings")
    return clip_skip


def _seed(body: dict, count: int) -> int:
    seed = body.get("seed", -1)
    if seed is None or seed == "":
        seed = -1
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise bad_type("seed", seed, "an integer (-1 for a random one)")
    if seed == -1:
        return secrets.randbelow(4294967294)  # A1111's range for a random seed
    if not 0 <= seed <= MAX_SEED - (count - 1):
        raise invalid("seed", f"seed={seed} is outside 0..{MAX_SEED - (count - 1)} for {count} image(s) (seeds are seed + i).",
                      "send seed >= 0, or -1 for a random one")
    return seed


def _loras(prompt: str, service, disabled: bool) -> tuple[str, tuple]:
    """`<lora:NAME:SCALE>` tags -> files inside --lora-dir (never a path from the request); text without them."""
    text, tags = lora_tags(prompt)
    if disabled or not tags:
        return (text if tags else prompt), ()
    loras = []
    for name, scale in tags:
        try:
            value = lora_scale(name, scale)
        except SdtrtError as e:
            raise invalid("prompt", e.problem, e.fix) from None
        try:
            path = lora_from_dir(name, service.settings.lora_dir)
        except SdtrtError as e:
            raise invalid("prompt", e.problem, "use a LoRA name from GET /sdapi/v1/loras" if service.settings.lora_dir
                          else "the server was started without --lora-dir: remove the tag") from None
        loras.append((path, value))
    return text, tuple(loras)


# --- img2img and inpainting ----------------------------------------------------------------------------------


def _img2img(body, service, template: Request, rows: list[Row], batch_size: int, height: int, width: int):
    from PIL import Image

    resize_mode = F.integer(body, "resize_mode", 0)
    if resize_mode != 0:
        raise unsupported("resize_mode", resize_mode, "resize modes other than 0 ('Just resize')", "send resize_mode: 0")
    multiplier = body.get("initial_noise_multiplier")
    if multiplier not in (None, 1, 1.0):
        raise unsupported("initial_noise_multiplier", multiplier, "scaling the initial noise", "send initial_noise_multiplier: 1")
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise invalid("init_images", "init_images must be a non-empty list of base64 images.", "send init_images: [\"<base64 PNG>\"]")
    if len(images) not in (1, batch_size):
        raise invalid("init_images", f"{len(images)} init images for batch_size {batch_size}.", "send one image, or one per image of a batch")
    limit = service.settings.limits.max_input_pixels
    inits = [_flatten(decode_image(f"init_images[{i}]", v, limit)).resize((width, height), resample=Image.LANCZOS)
             for i, v in enumerate(images)]
    strength = F.number(body, "denoising_strength", 0.75)
    template = template.replace(strength=strength)
    mask_b64 = body.get("mask")
    extra: dict[str, Any] = {}
    if mask_b64 in (None, ""):
        for i, row in enumerate(rows):
            row.image = to_tensor(inits[i % batch_size if len(inits) > 1 else 0], height, width)
        return template, rows, None, "img2img", extra
    if F.flag(body, "inpaint_full_res", False):
        raise unsupported("inpaint_full_res", True, "'Only masked' inpainting (crop, upscale, paste back)",
                          "send inpaint_full_res: false (whole picture)")
    fill = F.integer(body, "inpainting_fill", FILL)
    if fill not in (FILL, ORIGINAL):
        raise unsupported("inpainting_fill", fill, f"masked content {INPAINTING_FILL.get(fill, 'other than fill/original')!r}",
                          "send inpainting_fill: 0 (fill) or 1 (original)")
    blur = F.integer(body, "mask_blur", 4, low=0)
    blur_x = F.integer(body, "mask_blur_x", blur, low=0)
    blur_y = F.integer(body, "mask_blur_y", blur, low=0)
    if "mask_blur" in body and "mask_blur_x" not in body:
        blur_x = blur
    if "mask_blur" in body and "mask_blur_y" not in body:
        blur_y = blur
    invert = F.integer(body, "inpainting_mask_invert", 0)
    if invert not in (0, 1):
        raise invalid("inpainting_mask_invert", f"inpainting_mask_invert={invert} is not 0 or 1.", "send 0 (inpaint masked) or 1 (inpaint not masked)")
    mask = _binary_mask(decode_image("mask", mask_b64, limit), bool(invert))
    mask = _blur(mask, blur_x, blur_y).resize((width, height), resample=Image.LANCZOS)
    overlay_mask = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    overlays = []
    for i, row in enumerate(rows):
        init = inits[i % batch_size if len(inits) > 1 else 0]
        overlay = init.convert("RGBA")
        overlay.putalpha(Image.eval(overlay_mask, lambda v: 255 - v))
        overlays.append(overlay)
        start = _fill(init, mask) if fill == FILL else init
        row.image = to_tensor(start, height, width)
        row.mask = mask_tensor(mask, height, width)
    extra = {"Mask blur": blur if blur_x == blur_y else f"{blur_x}x{blur_y}", "Masked content": INPAINTING_FILL[fill]}
    if invert:
        extra["Mask mode"] = "Inpaint not masked"
    return template, rows, overlays, "inpaint", extra


def _flatten(image):
    """Transparent pixels onto white (A1111's default img2img background)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _binary_mask(mask, invert: bool):
    """A1111's mask rules: an RGBA mask with real transparency is its alpha channel rounded at 128;
    anything else is its grayscale; invert swaps what is repainted."""
    from PIL import ImageOps

    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    else:
        mask = mask.convert("L")
    return ImageOps.invert(mask) if invert else mask


def _blur(mask, bx: int, by: int):
    """Separable Gaussian blur with A1111's kernel size (2 * int(2.5 sigma + 0.5) + 1) per axis (OpenCV)."""
    from PIL import Image

    if bx <= 0 and by <= 0:
        return mask
    import cv2

    a = np.asarray(mask)
    if bx > 0:
        a = cv2.GaussianBlur(a, (2 * int(2.5 * bx + 0.5) + 1, 1), bx)
    if by > 0:
        a = cv2.GaussianBlur(a, (1, 2 * int(2.5 * by + 0.5) + 1), by)
    return Image.fromarray(a)


def _fill(image, mask):
    """Masked content 'fill': the masked area painted with ever less blurred colours of its surroundings."""
    from PIL import Image, ImageFilter, ImageOps

    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


# --- the response -------------------------------------------------------------------------------------------


def finish(plan: Plan, results: list[RowResult], service) -> dict[str, Any]:
    """A1111's response: base64 PNGs (with the parameters chunk), the request's parameters, and info."""
    texts, images = [], []
    for i, r in enumerate(results):
        image = r.image
        if plan.overlays is not None:
            image = image.convert("RGBA")
            image.alpha_composite(plan.overlays[i])
            image = image.convert("RGB")
        params = dict(r.parameters)
        params["prompt"] = plan.prompts[i]
        if plan.mode == "txt2img":
            params["strength"] = None
        text = a1111_parameters(params)
        if plan.extra:
            text += ", " + ", ".join(f"{k}: {v}" for k, v in plan.extra.items())
        texts.append(text)
        if plan.send_images:
            images.append(png_base64(image, text))
    first = results[0].parameters
    body = plan.body
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask") or body.get("include_init_images")}
    info = {
        "prompt": plan.prompts[0], "all_prompts": plan.prompts, "negative_prompt": plan.negatives[0],
        "all_negative_prompts": plan.negatives, "seed": plan.seeds[0], "all_seeds": plan.seeds,
        "subseed": plan.subseeds[0], "all_subseeds": plan.subseeds, "subseed_strength": 0,
        "width": first.get("width"), "height": first.get("height"), "sampler_name": first.get("sampler"),
        "cfg_scale": first.get("guidance_scale"), "steps": first.get("steps"),
        "batch_size": body.get("batch_size", 1), "n_iter": body.get("n_iter", 1), "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": service.settings.model_name, "sd_model_hash": first.get("model_hash"),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.get("strength") if plan.mode != "txt2img" else body.get("denoising_strength"),
        "extra_generation_params": dict(plan.extra), "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": (first.get("clip_skip") or 0) + 1,
        "is_using_inpainting_conditioning": plan.mode == "inpaint", "version": f"sdtrt {__version__}",
        "sdtrt_ignored_fields": plan.ignored,
    }
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


# --- listings --------------------------------------------------------------------------------------------------


def sampler_names() -> list[str]:
    return [schedulers.display_name(n) for n in schedulers.SCHEDULERS]


def samplers() -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's shape, only the samplers sdtrt has."""
    out = []
    for name in schedulers.SCHEDULERS:
        display = schedulers.display_name(name)
        out.append({"name": display, "aliases": [name], "options": {"scheduler": "karras"} if "karras" in name else {}})
    return out


def model_titles(service) -> set[str]:
    m = sd_models(service)[0]
    return {m["title"], m["model_name"], m["hash"] or "", m["sha256"] or ""} - {""}


def sd_models(service) -> list[dict[str, Any]]:
    """GET /sdapi/v1/sd-models: the one model this server runs (never its path on disk)."""
    pipe = service.pipe
    sha = pipe.model.model_hash if pipe is not None else None
    name = service.settings.model_name
    short = sha[:10] if sha else None
    return [{"title": f"{name} [{short}]" if short else name, "model_name": name, "hash": short, "sha256": sha,
             "filename": name, "config": None}]
