"""One image-generation request: every parameter of a call, validated once, shared by the Python
API, the CLI, the benchmarks and the HTTP server. Front ends translate their own spellings (CLI
flags, A1111 JSON fields) into this type and, for errors, back: an `InvalidRequest` names the
parameter, and each front end words the fix in its own terms (`steps=25`, `--steps 25`).

Names and meanings are diffusers' (StableDiffusionPipeline / StableDiffusionXLPipeline).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from ..errors import SdtrtError
from ..models.spec import VAE_FACTOR, nearest_sizes

SYNTAXES = ("plain", "a1111")
OUTPUT_TYPES = ("pil", "tensor", "latent")
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2^64-1
# Far past what any machine can denoise (at 16384 px the UNet's attention alone needs terabytes; a call
# with thousands of images holds them all in memory at once): beyond these, sizes only overflow.
MAX_SIDE = 16384
MAX_IMAGES = 1024


class InvalidRequest(SdtrtError):
    """A parameter outside its domain. `param` is the Python name; front ends rename it."""

    def __init__(self, param: str, value: Any, expected: str, example: Any, note: str = "", or_more: bool = False):
        self.param, self.value, self.expected, self.example, self.note = param, value, expected, example, note
        self.more = " or more" if or_more else ""
        super().__init__(f"{param}={value!r} {expected}.", f"pass {param}={example!r}{self.more}" + (f" ({note})" if note else ""))

    def worded(self, name: str, example: str) -> SdtrtError:
        """The same error in a front end's terms, e.g. worded('--steps', '25')."""
        return SdtrtError(f"{name} {self.value} {self.expected}.", f"pass {name} {example}{self.more}" + (f" ({self.note})" if self.note else ""))


def _texts(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    prompt_2: str | Sequence[str] | None = None  # SDXL: the second text encoder's prompt (default: prompt)
    negative_prompt_2: str | Sequence[str] | None = None
    num_images_per_prompt: int = 1
    steps: int = 50
    guidance_scale: float | None = None  # default: the family's (SD 7.5, SDXL 5.0, as diffusers' pipelines)
    guidance_rescale: float = 0.0
    scheduler: str | None = None  # default: the model's own
    scheduler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None  # default: a random one, reported in the result
    height: int | None = None  # default: the model's native size (or the input image's)
    width: int | None = None
    clip_skip: int | None = None
    image: Any = None  # img2img / inpainting start: path, PIL image, [B,3,H,W] in [0,1], or latents [B,C,h,w];
    #                    the x4 upscaler's low-res image(s), depth2img's start image, unCLIP's image to vary (a list: one per prompt)
    mask_image: Any = None  # inpainting: white (1) repaints
    strength: float | None = None  # default: the family's (SD: 0.8 img2img, 1.0 inpainting; SDXL: 0.3, 0.9999)
    resize: bool = False  # resize image/mask to a multiple of 8 instead of refusing
    prompt_syntax: str = "plain"  # "a1111": (word:1.3) weights and prompts longer than 75 tokens
    # SDXL micro-conditioning (diffusers' defaults: original and target size = the output size)
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_original_size: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0  # SDXL refiner (requires_aesthetics_score)
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None  # SDXL refiner hand-off: start this far into the schedule
    denoising_end: float | None = None  # SDXL base hand-off: stop this far into the schedule
    output_type: str = "pil"  # "pil" images, "tensor" [B,3,H,W] in [0,1], "latent" (for a refiner)
    # ControlNet (diffusers' names; one value for all, or one per ControlNet, in order)
    controlnet: str | Sequence[str] | None = None  # which exported ControlNets run (default: the only one, given a control image)
    control_image: Any = None  # per ControlNet: path, PIL image or [3,H,W] / [1,3,H,W] tensor in [0,1]
    controlnet_conditioning_scale: float | Sequence[float] | None = None  # default: the family's for the mode
    control_guidance_start: float | Sequence[float] = 0.0  # fraction of the steps before a ControlNet starts
    control_guidance_end: float | Sequence[float] = 1.0  # fraction of the steps after which it stops
    guess_mode: bool = False  # ControlNet on the conditional half only, residuals ramped 0.1 -> 1 (diffusers)
    # image-conditioned families (diffusers' names)
    noise_level: int | None = None  # x4 upscaler: noise added to the low-res image (default 20, <= 350); unCLIP: to the image embedding (default 0)
    depth_map: Any = None  # depth2img: [H,W] / [B,H,W] tensor or a grayscale image (larger = nearer); default: estimated from image
    # VAE memory (diffusers' vae.enable_tiling() / enable_slicing(); images equal diffusers' with the same switches)
    vae_tiling: bool = False  # decode (and encode) in overlapping, blended tiles: memory bounded by the tile, not the image
    vae_slicing: bool = False  # run the VAE one image at a time

    # --- views ---------------------------------------------------------------------------------

    @property
    def prompts(self) -> list[str]:
        return list(_texts(self.prompt) or ())

    @property
    def negatives(self) -> list[str] | None:
        """One negative prompt per prompt, or None when none was given."""
        n = _texts(self.negative_prompt)
        return None if n is None else (list(n) * len(self.prompts) if len(n) == 1 else list(n))

    @property
    def prompts_2(self) -> list[str]:
        p = _texts(self.prompt_2)
        return self.prompts if p is None else (list(p) * len(self.prompts) if len(p) == 1 else list(p))

    @property
    def negatives_2(self) -> list[str] | None:
        n = _texts(self.negative_prompt_2)
        return self.negatives if n is None else (list(n) * len(self.prompts) if len(n) == 1 else list(n))

    @property
    def controlnets(self) -> list[str]:
        return list(_texts(self.controlnet) or ())

    def per_controlnet(self, name: str) -> list:
        """A ControlNet parameter as one value per requested ControlNet."""
        value, n = getattr(self, name), len(self.controlnets)
        if isinstance(value, (list, tuple)) and name != "control_image":
            return list(value)
        if name == "control_image" and isinstance(value, (list, tuple)):
            return list(value)
        return [value] * n

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance on (every family's default scale is above 1)."""
        return self.guidance_scale is None or self.guidance_scale > 1.0

    def replace(self, **changes: Any) -> "Request":
        return dataclasses.replace(self, **changes)

    # --- validation ---------------------------------------------------------------------------

    def check(self) -> "Request":
        """Refuse anything outside its domain, before any work. Returns self."""
        prompts = self.prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidRequest("prompt", self.prompt, "must be a string or a non-empty list of strings", "a watercolor fox")
        for name in ("negative_prompt", "prompt_2", "negative_prompt_2"):
            texts = _texts(getattr(self, name))
            if texts is None:
                continue
            if not all(isinstance(t, str) for t in texts):
                raise InvalidRequest(name, getattr(self, name), "must be a string or a list of strings", "blurry")
            if len(texts) not in (1, len(prompts)):
                what = name.replace("_", " ")
                raise InvalidRequest(name, getattr(self, name), f"has {len(texts)} entries for {len(prompts)} prompts",
                                     "blurry", f"one {what} per prompt, or a single string for all")
        _int(self, "num_images_per_prompt", 1, 1)
        if self.batch > MAX_IMAGES:
            raise InvalidRequest("num_images_per_prompt", self.num_images_per_prompt,
                                 f"makes {self.batch} images in one call, more than {MAX_IMAGES}", max(1, MAX_IMAGES // len(prompts)),
                                 "make more calls instead")
        _int(self, "steps", 1, 25, note="25-50 is typical")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v <= 0 or v % VAE_FACTOR):
                near = nearest_sizes(v if _is_int(v) and v > 0 else VAE_FACTOR)
                raise InvalidRequest(name, v, f"is not a positive multiple of {VAE_FACTOR}", int(near.split()[0]), f"nearest valid: {near}")
            if v is not None and v > MAX_SIDE:
                raise InvalidRequest(name, v, f"is larger than {MAX_SIDE}", 1024, "no machine has the memory for more")
        if self.guidance_scale is not None:
            _number(self, "guidance_scale", 0, None, 7.5, note="<= 1 turns guidance off")
        _number(self, "guidance_rescale", 0, 1, 0.7, note="0 turns it off")
        if self.strength is not None:
            _number(self, "strength", 0, 1, 0.8, low_open=True, note="low keeps the image, 1 repaints it fully")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequest("seed", self.seed, f"is not an integer in 0..{MAX_SEED}", 42)
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 1):
            raise InvalidRequest("clip_skip", self.clip_skip, "is not a positive integer", 2, "or None for no skip")
        if self.prompt_syntax not in SYNTAXES:
            raise InvalidRequest("prompt_syntax", self.prompt_syntax, f"is not one of {', '.join(SYNTAXES)}", "a1111",
                                 "'plain' is diffusers' behaviour: 77 tokens, brackets are text")
        if self.output_type not in OUTPUT_TYPES:
            raise InvalidRequest("output_type", self.output_type, f"is not one of {', '.join(OUTPUT_TYPES)}", "pil")
        if self.mask_image is not None and self.image is None:
            raise SdtrtError("a mask was given without the image to inpaint.", "pass image= with mask_image=, or drop mask_image",
                             cli_fix="pass --image with --mask, or drop --mask")
        if not isinstance(self.resize, bool):
            raise InvalidRequest("resize", self.resize, "is not True or False", True)
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size",
                     "crops_coords_top_left", "negative_crops_coords_top_left"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_int(x) and x >= 0 for x in v)):
                raise InvalidRequest(name, v, "is not a (height, width) pair of non-negative integers", (1024, 1024))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            _number(self, name, None, None, 6.0)
        for name in ("denoising_start", "denoising_end"):
            if getattr(self, name) is not None:
                _number(self, name, 0, 1, 0.8, low_open=True, high_open=True, note="a fraction of the schedule")
        if self.denoising_start is not None and self.denoising_end is not None and self.denoising_start >= self.denoising_end:
            raise InvalidRequest("denoising_start", self.denoising_start, f"is not below denoising_end={self.denoising_end}", 0.8)
        self._check_controlnet()
        if self.noise_level is not None and (not _is_int(self.noise_level) or self.noise_level < 0):
            raise InvalidRequest("noise_level", self.noise_level, "is not an integer >= 0", 20)
        if self.depth_map is not None and self.image is None:
            raise SdtrtError("a depth map was given without the image it belongs to.", "pass image= with depth_map=, or drop depth_map",
                             cli_fix="pass the image with --depth-map, or drop --depth-map")
        for name in ("vae_tiling", "vae_slicing"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(name, getattr(self, name), "is not True or False", True)
        if not isinstance(self.scheduler_options, Mapping):
            raise InvalidRequest("scheduler_options", self.scheduler_options, "is not a mapping of config fields", {"timestep_spacing": "trailing"})
        for key, v in self.scheduler_options.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise InvalidRequest("scheduler_options", {key: v}, f"has a non-finite {key}", {key: 1.0})
        return self


    def _check_controlnet(self) -> None:
        nets = self.controlnets
        if not all(isinstance(n, str) and n for n in nets):
            raise InvalidRequest("controlnet", self.controlnet, "must be a ControlNet name or a list of names", "canny")
        if nets and self.control_image is None:
            raise InvalidRequest("control_image", None, f"is missing: {len(nets)} ControlNet(s) need a control image each", "edges.png")
        if not nets and self.control_image is not None:
            return  # the pipeline picks the export's only ControlNet (or says which to name)
        for name in ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != len(nets):
                raise InvalidRequest(name, f"<{len(value)} values>", f"has {len(value)} entries for {len(nets)} ControlNet(s)",
                                     "[...]", "one per ControlNet, in the order of controlnet=, or a single value for all")
        for name, low, high in (("controlnet_conditioning_scale", 0, None), ("control_guidance_start", 0, 1), ("control_guidance_end", 0, 1)):
            value = getattr(self, name)
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if v is None and name == "controlnet_conditioning_scale":
                    continue
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < low or (high is not None and v > high):
                    raise InvalidRequest(name, v, f"is not a finite number in [{low}, {high if high is not None else 'inf'}]", 1.0 if high else 1.0)
        for start, end in zip(self.per_controlnet("control_guidance_start"), self.per_controlnet("control_guidance_end")):
            if start >= end:
                raise InvalidRequest("control_guidance_start", start, f"is not below control_guidance_end={end}", 0.0)
        if not isinstance(self.guess_mode, bool):
            raise InvalidRequest("guess_mode", self.guess_mode, "is not True or False", True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(r: Request, name: str, low: int, example: int, note: str = "") -> None:
    v = getattr(r, name)
    if not _is_int(v) or v < low:
        raise InvalidRequest(name, v, f"is not an integer >= {low}", low, note, or_more=True)


def _number(r: Request, name: str, low: float | None, high: float | None, example: float, *, low_open: bool = False,
            high_open: bool = False, note: str = "") -> None:
    v = getattr(r, name)
    if high is not None:
        span = f"is outside {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        span = f"must be {'>' if low_open else '>='} {low}"
    else:
        span = "is not a finite number"
    number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not number or (low is not None and (v < low or (low_open and v == low))) or (high is not None and (v > high or (high_open and v == high))):
        raise InvalidRequest(name, v, span if number or high is not None else f"{span} (not a finite number)", example, note)
