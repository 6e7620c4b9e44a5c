"""The `sdtrt` command. Each subcommand parses its flags here and calls one library function.

Errors: one `sdtrt: error: ... Fix: ...` line on stderr naming the flag or command that fixes it,
exit code 2; no traceback. Ctrl-C exits 130 and SIGTERM 143, leaving nothing half-written. Every
output is checked (exists? writable?) before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path

from . import __version__
from .errors import SdtrtError

_DESCRIPTION = """\
sdtrt turns a Stable Diffusion model in diffusers format into deployable artifacts and runs them:

  diffusers folder --export--> ONNX dir --build--> engine dir --> lean runtime --> images
                                   '------ ONNX Runtime runs the ONNX dir directly ------'

Start here (tiny random-weight model, CPU, a minute):
  sdtrt generate "a watercolor fox" --out fox.png          # the embedded tiny demo model
  sdtrt make-model --preset tiny --out out/tiny             # or step by step:
  sdtrt export out/tiny --out out/onnx
  sdtrt generate "a watercolor fox" --model out/onnx --seed 42 --out fox.png
"""

MAX_SEED = 2**64 - 1
MAX_THREADS = 1024  # more threads than any machine has cores only costs memory (each has a stack)


# --- value types: argparse reports "argument --flag: <message>" -------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return v


def nonnegative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def seed(text: str) -> int:
    v = _int(text)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..{MAX_SEED} (2^64 - 1)")
    return v


def pixels(text: str) -> int:
    from .runtime.request import MAX_SIDE

    v = _int(text)
    if v <= 0 or v % 8:
        from .models.spec import nearest_sizes

        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 8 (try {nearest_sizes(max(v, 8))})")
    if v > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{text} is larger than {MAX_SIDE} (no machine has the memory for more)")
    return v


def threads(text: str) -> int:
    v = nonnegative_int(text)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"{text} is more than {MAX_THREADS}")
    return v


def finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return v


def nonnegative(text: str) -> float:
    v = finite(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def unit_interval(text: str) -> float:
    v = finite(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return v


def strength(text: str) -> float:
    v = finite(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]")
    return v


def quality(text: str) -> int:
    v = _int(text)
    if not 1 <= v <= 100:
        raise argparse.ArgumentTypeError(f"{text} is outside 1-100")
    return v


def readable_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file" if p.exists() else f"{text} does not exist")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text} cannot be read ({e.strerror})") from None
    return p


def image_file(text: str) -> Path:
    """A file PIL can open as an image, checked before any model is loaded."""
    p = readable_file(text)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise argparse.ArgumentTypeError(f"{text} is not an image PIL can read ({e})") from None
    return p


ADAPTER_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def adapter_file(text: str) -> Path:
    p = readable_file(text)
    if p.suffix.lower() not in ADAPTER_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text} is not an adapter file ({', '.join(ADAPTER_SUFFIXES)})")
    return p


def lora_arg(text: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE (a path may itself hold ':' - only a number after the last one is a scale)."""
    path, sep, scale = text.rpartition(":")
    try:
        value = float(scale) if sep else None
    except ValueError:
        value = None
    if value is None:
        path, value = text, 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"scale {scale} is not a finite number")
    return adapter_file(path), value


def embedding_arg(text: str) -> tuple[Path, str | None]:
    """FILE or FILE:TOKEN (the token defaults to the one in the file, or the file name)."""
    if Path(text).is_file():
        return adapter_file(text), None
    path, sep, token = text.rpartition(":")
    if not sep or not token:
        return adapter_file(text), None
    return adapter_file(path), token


def controlnet_arg(text: str) -> tuple[Path, str | None]:
    """DIR or DIR:NAME."""
    if Path(text).is_dir():
        return Path(text), None
    path, sep, name = text.rpartition(":")
    if sep and Path(path).is_dir():
        return Path(path), name
    raise argparse.ArgumentTypeError(f"{text} is not a ControlNet folder (DIR or DIR:NAME)")


def size_pair(text: str) -> tuple[int, int]:
    """HEIGHTxWIDTH (or H,W), as SDXL's size conditioning takes it."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH (e.g. 1024x1024)")
    h, w = (nonnegative_int(p.strip()) for p in parts)
    return h, w


def folder(text: str) -> Path:
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return p


def device(text: str) -> str:
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N") from None
    return text


# --- the parser ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one `sdtrt: error:` line that points at the help."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"sdtrt: error: {message}. Fix: see `{self.prog} --help`\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps hand-wrapped descriptions and shows defaults that carry information."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    """--backend / --device / --threads, the same for every command that runs a model."""
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "aoti"], help="auto: by directory kind")
    p.add_argument("--device", type=device, help="cpu or cuda[:N] (default: cpu for ONNX Runtime, cuda for TensorRT)")
    p.add_argument("--threads", type=threads, default=0, help="ONNX Runtime intra-op threads (0: all cores)")


def _backend_options(a: argparse.Namespace) -> dict:
    """Pipeline.load options from those flags (TensorRT takes no thread count)."""
    options = {"threads": a.threads} if a.backend != "tensorrt" and a.threads else {}
    if a.device:
        options["device"] = a.device
    return options


def _add_image_output_flags(p: argparse.ArgumentParser) -> None:
    """Where and how images are written: --out, --format, --quality, --force, --no-progress."""
    p.add_argument("--out", default="outputs/", help="image path (.png, .jpg, .webp), or a folder ending in / for numbered images")
    p.add_argument("--format", choices=["png", "jpg", "webp"], help="file format for a folder --out (default png; a file's suffix decides otherwise)")
    p.add_argument("--quality", type=quality, default=95, help="JPEG/WebP quality 1-100")
    p.add_argument("--force", action="store_true", help="replace existing image files named by --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=textwrap.dedent(description),
                          epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
                          formatter_class=_Formatter)


def _make_model_parser(sub) -> None:
    from .models.presets import CONTROLNET_PRESETS, PRESETS

    p = _add(sub, "make-model", "write a diffusers model folder with random weights from a preset",
             """\
             Write a diffusers-format model folder (model_index.json and one folder per component) with the
             preset's architecture, seeded random weights in safetensors and the real CLIP tokenizer
             vocabulary. diffusers' pipeline class for the preset loads it with from_pretrained.

             presets:
             """ + "\n".join(f"  {n:<21} {p.description}" for n, p in {**PRESETS, **CONTROLNET_PRESETS}.items()),
             """\
             sdtrt make-model --preset tiny --out out/tiny
             sdtrt make-model --preset sd15 --out models/sd15 --seed 1
             """)
    p.add_argument("--preset", required=True, choices=[*PRESETS, *CONTROLNET_PRESETS], help="architecture to build")
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist, unless --force)")
    p.add_argument("--seed", type=seed, default=0, help="seed for the random weights, 0..2^64-1")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_run_make_model)


def _run_make_model(a: argparse.Namespace) -> None:
    from .models.presets import make_model

    out = make_model(a.preset, a.out, seed=a.seed, force=a.force)
    print(f"wrote {a.preset} model to {out}")


def _export_parser(sub) -> None:
    from .export.graph import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, MAX_OPSET, MIN_OPSET

    p = _add(sub, "export", "export a diffusers folder to validated ONNX",
             """\
             Export the text encoder(s), UNet (classifier-free guidance batched: [uncond; cond] in one
             call) and VAE of a diffusers folder to ONNX, clean the graphs (constant folding, shape
             inference, toposort) and validate every file in ONNX Runtime against its torch module. A
             mismatch fails the export and leaves nothing behind. Artifacts are written to a temporary
             folder and renamed at the end, so an interrupted export never looks complete.

             The ONNX contract (names, dtypes, dynamic axes) is in the README. --dtype fp16 applies to the
             text encoders and UNet; the VAE stays fp32 (fp16 VAEs overflow) unless --fp16-vae.
             Components (default: what txt2img needs): text_encoder (SDXL: and text_encoder_2), unet,
             vae_decoder; add vae_encoder for img2img and inpainting.
             """,
             """\
             sdtrt export out/tiny --out out/onnx
             sdtrt export models/sd15 --out out/sd15-fp16 --dtype fp16
             sdtrt export models/sd15 --out out/sd15-img2img --components text_encoder,unet,vae_decoder,vae_encoder
             """)
    p.add_argument("model_dir", type=Path, help="diffusers folder (holds model_index.json)")
    p.add_argument("--out", required=True, type=Path, help="ONNX folder to write")
    p.add_argument("--components", help="comma-separated components (default: the family's txt2img set); add vae_encoder for img2img/inpainting")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="precision of text encoders and UNet")
    p.add_argument("--fp16-vae", action="store_true", help="export the VAE in fp16 too (may overflow: validation checks)")
    p.add_argument("--opset", type=_int, default=DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET})")
    p.add_argument("--height", type=pixels, help="image height used for validation inputs (default: the model's native size)")
    p.add_argument("--width", type=pixels, help="image width used for validation inputs (default: the model's native size)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check (not recommended)")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.ckpt pickle weights and adapter files (can run code: only for files you trust)")
    p.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA / LyCORIS file into the exported weights (repeatable; recorded in sdtrt.json)")
    p.add_argument("--controlnet", action="append", type=controlnet_arg, default=[], metavar="DIR[:NAME]",
                   help="export a diffusers ControlNet folder with the model, as component controlnet_NAME (repeatable; "
                        "NAME defaults to the folder's name); the UNet then takes ControlNet residuals")
    p.add_argument("--embedding-slots", type=nonnegative_int, default=32, metavar="N",
                   help="token-embedding rows reserved for Textual Inversion at run time (0: none)")
    p.add_argument("--external-data-threshold", type=nonnegative_int, default=EXTERNAL_DATA_THRESHOLD, metavar="BYTES",
                   help="store weights beside model.onnx (model.onnx.data) above this size; ONNX cannot hold more than 2 GiB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_export)


def _components(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _run_export(a: argparse.Namespace) -> None:
    from .export import export_model

    out = export_model(
        a.model_dir, a.out, components=_components(a.components), dtype=a.dtype,
        opset=a.opset, force=a.force, validate_outputs=not a.no_validate, height=a.height, width=a.width,
        fp16_vae=a.fp16_vae, allow_pickle=a.allow_pickle, external_data_threshold=a.external_data_threshold,
        loras=a.lora, embedding_slots=a.embedding_slots, controlnets=a.controlnet, show_progress=not a.no_progress,
    )
    print(f"wrote ONNX to {out}")


# generate flags <-> Request fields, for errors raised by the runtime in Python terms
_FLAGS = {"prompt": "PROMPT", "negative_prompt": "--negative-prompt", "num_images_per_prompt": "--num-images",
          "steps": "--steps", "guidance_scale": "--guidance-scale", "guidance_rescale": "--guidance-rescale",
          "scheduler_options": "--scheduler-option", "seed": "--seed", "height": "--height", "width": "--width",
          "clip_skip": "--clip-skip", "image": "--image", "mask_image": "--mask", "strength": "--strength",
          "prompt_syntax": "--prompt-syntax", "prompt_2": "--prompt-2", "negative_prompt_2": "--negative-prompt-2",
          "original_size": "--original-size", "target_size": "--target-size", "crops_coords_top_left": "--crops-coords-top-left",
          "negative_original_size": "--negative-original-size", "negative_target_size": "--negative-target-size",
          "aesthetic_score": "--aesthetic-score", "negative_aesthetic_score": "--negative-aesthetic-score",
          "controlnet": "--controlnet", "control_image": "--control-image", "controlnet_conditioning_scale": "--control-scale",
          "control_guidance_start": "--control-start", "control_guidance_end": "--control-end",
          "vae_tiling": "--vae-tiling", "vae_slicing": "--vae-slicing", "noise_level": "--noise-level", "depth_map": "--depth-map"}


def _generate_parser(sub) -> None:
    from .runtime.schedulers import SCHEDULERS

    p = _add(sub, "generate", "make images from a prompt with an ONNX or engine directory",
             """\
             Text to image (and img2img / inpainting; with a depth2img or unCLIP export, --image is what that
             model conditions on) with the lean runtime. --model takes an ONNX
             directory (runs on ONNX Runtime) or an engine directory (runs on TensorRT); without --model,
             a tiny random-weight demo model is made and exported once into ~/.cache/sdtrt (or
             $SDTRT_CACHE).

             Images carry A1111's "parameters" text (PNG text chunk; EXIF for JPEG/WebP): prompt, negative
             prompt, steps, sampler, CFG scale, seed, size, model hash, so other tools read back how an
             image was made. Same model + settings + seed gives the image diffusers' pipeline gives.
             Existing files are never replaced without --force; a folder gets numbered files after the
             ones already there.
             """,
             """\
             sdtrt generate "a watercolor fox" --out fox.png
             sdtrt generate "a watercolor fox" --model out/onnx --scheduler "DPM++ 2M Karras" --steps 25 --seed 42
             sdtrt generate "a cat" "a dog" --negative-prompt blurry --num-images 2 --out out/images/
             sdtrt generate "a fox, oil painting" --model out/onnx-with-encoder --image photo.png --strength 0.6
             sdtrt generate "a red hat" --model out/inpaint-onnx --image photo.png --mask mask.png
             sdtrt generate "a (red:1.3) fox, [blurry], ...long prompt..." --prompt-syntax a1111 --out fox.webp
             sdtrt generate "a fox, <lora:ink:0.7>" --prompt-syntax a1111 --lora-dir loras/ --embedding cat.pt:<cat> --allow-pickle
             sdtrt generate "a fox" --model out/sdxl-onnx --refiner out/sdxl-refiner-onnx --steps 40 --out fox.png
             sdtrt generate "a house" --model out/cn-onnx --controlnet canny --control-image photo.png --control-preprocess canny
             sdtrt generate "a cosy cabin" --model out/depth-onnx --image room.png --depth-map room-depth.png   # depth2img
             sdtrt generate "" --model out/unclip-onnx --image photo.png --noise-level 100                      # unCLIP variations
             """)
    p.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    p.add_argument("--model", type=Path, help="ONNX dir (sdtrt export) or engine dir (sdtrt build); default: the tiny demo model")
    p.add_argument("--negative-prompt", action="append", help="negative prompt; give once for all prompts or once per prompt")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", "--cfg", type=nonnegative, help="classifier-free guidance; <= 1 turns it off (half the UNet work) "
                   "(default: the model's diffusers default, 7.5 for SD, 5.0 for SDXL)")
    p.add_argument("--guidance-rescale", type=unit_interval, default=0.0, help="rescale guided noise toward the conditional std (0.7 for zero-SNR models)")
    p.add_argument("--scheduler", "--sampler", help=f"sampler (default: the model's own). One of {', '.join(SCHEDULERS)}, "
                                                    "or a diffusers class / A1111 name such as 'DPM++ 2M Karras'")
    p.add_argument("--scheduler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="scheduler config override, e.g. timestep_spacing=trailing (repeatable)")
    p.add_argument("--seed", type=seed, help="random seed, 0..2^64-1 (default: a random one, printed and stored in the image)")
    p.add_argument("--height", type=pixels, help="image height, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=pixels, help="image width, a multiple of 8 (default: the model's native size)")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--clip-skip", type=positive_int, help="use the text encoder's hidden states this many layers before the last (diffusers' numbering)")
    p.add_argument("--image", type=image_file, help="img2img / inpainting: the starting image (PNG, JPEG)")
    p.add_argument("--mask", type=image_file, help="inpainting: white = repaint, black = keep (same size as --image)")
    p.add_argument("--strength", type=strength, help="how much of the image to repaint, (0, 1] (default 0.8 img2img, 1.0 inpainting)")
    p.add_argument("--resize", action="store_true", help="resize --image/--mask to a multiple of 8 (or to --height/--width) instead of refusing")
    p.add_argument("--prompt-syntax", choices=["plain", "a1111"], default="plain",
                   help="plain: diffusers' behaviour (77 tokens, brackets are text); a1111: (word:1.3) weights, long prompts, <lora:NAME:SCALE>")
    p.add_argument("--lora", action="append", type=lora_arg, default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA / LyCORIS file at run time, no re-export (repeatable)")
    p.add_argument("--lora-dir", type=folder, help="folder that <lora:NAME:SCALE> tags (--prompt-syntax a1111) load NAME.safetensors from")
    p.add_argument("--embedding", action="append", type=embedding_arg, default=[], metavar="FILE[:TOKEN]",
                   help="load a Textual Inversion embedding (repeatable); use TOKEN in the prompt")
    p.add_argument("--allow-pickle", action="store_true", help="read .pt/.ckpt adapter files (pickle can run code: only files you trust)")
    c = p.add_argument_group("ControlNet (repeat each flag once per ControlNet, in the same order)")
    c.add_argument("--controlnet", action="append", default=[], metavar="NAME", help="a ControlNet exported with the model (sdtrt export --controlnet)")
    c.add_argument("--control-image", action="append", type=image_file, default=[], metavar="FILE", help="its control image")
    c.add_argument("--control-scale", action="append", type=nonnegative, default=[], metavar="S",
                   help="its conditioning scale (default: diffusers', 1.0; img2img 0.8; SD inpainting 0.5)")
    c.add_argument("--control-start", action="append", type=unit_interval, default=[], metavar="F", help="fraction of the steps before it starts (default 0)")
    c.add_argument("--control-end", action="append", type=unit_interval, default=[], metavar="F", help="fraction of the steps after which it stops (default 1)")
    c.add_argument("--guess-mode", action="store_true", help="ControlNets see the conditional half only; their residuals ramp from 0.1 to 1")
    c.add_argument("--control-preprocess", choices=["none", "canny"], default="none", help="turn each --control-image into an edge map first (OpenCV Canny)")
    c.add_argument("--canny-thresholds", type=nonnegative_int, nargs=2, default=[100, 200], metavar=("LOW", "HIGH"), help="Canny's hysteresis thresholds")
    g = p.add_argument_group("SDXL")
    g.add_argument("--prompt-2", action="append", help="prompt for the second text encoder (default: the prompt)")
    g.add_argument("--negative-prompt-2", action="append", help="negative prompt for the second text encoder")
    g.add_argument("--original-size", type=size_pair, metavar="HxW", help="size conditioning: the training image's size (default: the output size)")
    g.add_argument("--target-size", type=size_pair, metavar="HxW", help="size conditioning: the target size (default: the output size)")
    g.add_argument("--crops-coords-top-left", type=size_pair, metavar="TOPxLEFT", help="crop conditioning (default 0x0)")
    g.add_argument("--negative-original-size", type=size_pair, metavar="HxW", help="negative size conditioning")
    g.add_argument("--negative-target-size", type=size_pair, metavar="HxW", help="negative size conditioning")
    g.add_argument("--aesthetic-score", type=finite, help="refiner: aesthetic score (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=finite, help="refiner: negative aesthetic score (default 2.5)")
    g.add_argument("--refiner", type=folder, help="an SDXL refiner ONNX/engine dir: the base runs the first --refiner-start of the schedule, the refiner the rest")
    g.add_argument("--refiner-start", type=strength, default=0.8, help="fraction of the schedule the base runs before the refiner takes its latents")
    d = p.add_argument_group("image-conditioned models (depth2img, unCLIP; the x4 upscaler has `sdtrt upscale`)")
    d.add_argument("--depth-map", type=image_file, metavar="FILE",
                   help="depth2img: the depth of --image as a grayscale image (larger = nearer), instead of estimating it")
    d.add_argument("--depth", choices=["auto"], help="depth2img: estimate the depth of --image with the exported DPT (the default without --depth-map)")
    d.add_argument("--noise-level", type=nonnegative_int,
                   help="unCLIP: noise added to the image embedding (default 0; more: looser variations)")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode) in overlapping, blended tiles: large images in the memory of one tile (diffusers' vae.enable_tiling())")
    p.add_argument("--vae-slicing", action="store_true", help="run the VAE one image at a time (diffusers' vae.enable_slicing())")
    _add_backend_flags(p)
    _add_image_output_flags(p)
    p.set_defaults(run=_run_generate)


def _parse_options(items: list[str]) -> dict:
    import json

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SdtrtError(f"--scheduler-option {item!r} is not KEY=VALUE.", "write e.g. --scheduler-option timestep_spacing=trailing")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise SdtrtError(f"--scheduler-option {item!r} is not finite.", "pass a finite number")
        options[key.strip()] = parsed
    return options


def _scheduler_name(name: str) -> str:
    from .runtime.schedulers import resolve

    try:
        return resolve(name)
    except SdtrtError as e:
        raise SdtrtError(e.problem, e.fix, cli_fix=f"pass --scheduler with {(e.fix or '').removeprefix('choose ')}") from None


def _check_scheduler(model: Path, request) -> None:
    """Make the scheduler the run will make, before any model is loaded, so that its errors (worded for
    Python callers) name the flag that fixes them."""
    from .artifacts import open_model_dir
    from .runtime import schedulers

    config = open_model_dir(model).meta.scheduler_config
    options = dict(request.scheduler_options)
    name = _scheduler_name(request.scheduler or config.get("_class_name", "PNDMScheduler"))
    try:
        scheduler = schedulers.make(name, config, **options)
        limit = scheduler.config.num_train_timesteps
        if isinstance(limit, int) and 0 < limit < request.steps:
            raise SdtrtError(f"--steps {request.steps} is more than the model's {limit} training timesteps.",
                             cli_fix=f"pass --steps {limit} or fewer")
        scheduler.set_timesteps(request.steps)
    except SdtrtError as e:
        if e.cli_fix:
            raise  # already worded for the command line
        raise SdtrtError(e.problem, e.fix, cli_fix=f"{e.fix} (--scheduler-option KEY=VALUE)" if options
                         else f"choose another --scheduler ({e.fix})") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        if not options:
            raise  # the model's own scheduler config fails: a bug to report, not a flag to change
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise SdtrtError(f"--scheduler-option {given}: scheduler '{name}' cannot use it ({str(e).splitlines()[0][:120]}).",
                         "give each option a value of its type (numbers for beta_start, num_train_timesteps, ...), "
                         "or drop that --scheduler-option") from None


def _texts(values: list[str] | None):
    return values[0] if values and len(values) == 1 else values


def _control(a: argparse.Namespace) -> dict:
    """The ControlNet flags as Request fields (each flag once per --controlnet, or once for all)."""
    if not a.controlnet and not a.control_image:
        return {}
    n = max(len(a.controlnet), 1)
    for flag, values in (("--control-image", a.control_image), ("--control-scale", a.control_scale),
                         ("--control-start", a.control_start), ("--control-end", a.control_end)):
        if values and len(values) not in (1, n):
            raise SdtrtError(f"{len(values)} {flag} values for {n} --controlnet.", cli_fix=f"give {flag} once, or once per --controlnet")
    images = list(a.control_image)
    if a.control_preprocess == "canny":
        from .runtime.controlnet import canny

        images = [canny(i, *a.canny_thresholds) for i in images]
    one = (lambda v: v[0] if len(v) == 1 else v)
    fields = {"controlnet": a.controlnet or None, "control_image": one(images) if images else None, "guess_mode": a.guess_mode}
    if a.control_scale:
        fields["controlnet_conditioning_scale"] = one(a.control_scale)
    if a.control_start:
        fields["control_guidance_start"] = one(a.control_start)
    if a.control_end:
        fields["control_guidance_end"] = one(a.control_end)
    return fields


def _adapter_list(a: argparse.Namespace, prompts: list[str]) -> tuple[list[str], list[tuple[Path, float]]]:
    """--lora files plus, with --prompt-syntax a1111, the prompts' <lora:NAME:SCALE> tags (removed from
    the text, as A1111 does); the tags resolve only inside --lora-dir."""
    from .runtime.adapters import lora_from_dir
    from .runtime.text.prompt_weights import lora_scale, lora_tags

    loras = list(a.lora)
    if a.prompt_syntax != "a1111":
        return prompts, loras
    cleaned = []
    for prompt in prompts:
        text, tags = lora_tags(prompt)
        cleaned.append(text)
        for name, scale in tags:
            loras.append((lora_from_dir(name, a.lora_dir), lora_scale(name, scale)))
    return cleaned, loras


def _run_generate(a: argparse.Namespace) -> None:
    from .default_model import default_onnx_dir
    from .outputs import a1111_parameters, plan
    from .runtime.pipeline import Pipeline
    from .runtime.request import Request

    prompts, loras = _adapter_list(a, a.prompt)
    request = Request(prompts, _texts(a.negative_prompt), prompt_2=_texts(a.prompt_2), negative_prompt_2=_texts(a.negative_prompt_2),
                      num_images_per_prompt=a.num_images, steps=a.steps, guidance_scale=a.guidance_scale,
                      guidance_rescale=a.guidance_rescale, scheduler=a.scheduler, scheduler_options=_parse_options(a.scheduler_option),
                      seed=a.seed, height=a.height, width=a.width, clip_skip=a.clip_skip, image=a.image, mask_image=a.mask,
                      strength=a.strength, resize=a.resize, prompt_syntax=a.prompt_syntax, original_size=a.original_size,
                      target_size=a.target_size, crops_coords_top_left=a.crops_coords_top_left or (0, 0),
                      negative_original_size=a.negative_original_size, negative_target_size=a.negative_target_size,
                      **{k: v for k, v in (("aesthetic_score", a.aesthetic_score), ("negative_aesthetic_score", a.negative_aesthetic_score))
                         if v is not None}, **_control(a), vae_tiling=a.vae_tiling, vae_slicing=a.vae_slicing,
                      depth_map=a.depth_map, noise_level=a.noise_level).check()
    if a.depth_map is not None and a.depth == "auto":
        raise SdtrtError("--depth auto and --depth-map both say where the depth comes from.", cli_fix="pass one of them")
    if a.scheduler:
        _scheduler_name(a.scheduler)
    # everything about the outputs is decided and checked before any model is made or loaded
    outputs = plan(a.out, request.batch, a.force, a.format)
    model = a.model or default_onnx_dir(log=lambda m: print(m, file=sys.stderr))
    _check_scheduler(model, request)
    options = _backend_options(a)
    # sessions are made once the request has passed the model's checks: a refused one costs none
    pipe = Pipeline.load(model, backend=a.backend, preload="none", **options)
    for path, token in a.embedding:
        pipe.load_textual_inversion(path, token, allow_pickle=a.allow_pickle)
    if loras:
        pipe.set_loras(loras, allow_pickle=a.allow_pickle)
    if a.refiner:
        result = _base_then_refiner(a, pipe, request, options)
    else:
        result = pipe.run(request, progress=not a.no_progress)
    texts = []
    for original, params in zip([p for p in a.prompt for _ in range(a.num_images)], result.parameters):
        texts.append(a1111_parameters({**params, "prompt": original}))  # A1111 keeps the tags in the text
    for path in outputs.write(result.images, texts, a.quality):
        print(f"wrote {path}")
    t = result.timings
    print(f"seed {result.seed}; text encoder {t['text_encoder']:.3f}s, denoise {t['denoise']:.3f}s "
          f"({t['unet_calls']} UNet calls), VAE decode {t['vae_decoder']:.3f}s, total {t['total']:.3f}s")


def _base_then_refiner(a: argparse.Namespace, base, request, options):
    """SDXL's ensemble of experts: the base denoises the first part of the schedule and hands its latents
    to the refiner (diffusers' denoising_end / denoising_start)."""
    from .runtime.pipeline import Pipeline

    refiner = Pipeline.load(a.refiner, backend=a.backend, **options)
    first = base.run(request.replace(denoising_end=a.refiner_start, output_type="latent"), progress=not a.no_progress)
    per_image = request.num_images_per_prompt  # the base made B x n latents: the refiner takes one prompt per latent
    second = refiner.run(request.replace(image=first.latents, denoising_start=a.refiner_start, seed=first.seed, num_images_per_prompt=1,
                                         prompt=[p for p in request.prompts for _ in range(per_image)],
                                         negative_prompt=None if request.negative_prompt is None else
                                         [n for n in request.negatives for _ in range(per_image)],
                                         prompt_2=[p for p in request.prompts_2 for _ in range(per_image)], negative_prompt_2=None),
                         progress=not a.no_progress)
    for key in ("text_encoder", "denoise", "unet", "unet_calls", "total"):
        second.timings[key] = second.timings.get(key, 0) + first.timings.get(key, 0)
    return second


def _upscale_parser(sub) -> None:
    from .runtime.schedulers import SCHEDULERS

    p = _add(sub, "upscale", "enlarge images 4x with a Stable Diffusion x4 upscaler export",
             """\
             Upscale images with an exported x4 upscaler (diffusers' StableDiffusionUpscalePipeline; `sdtrt make-model
             --preset tiny-upscaler` makes a toy one): the output is 4x each input, which must be a multiple of 4 pixels
             per side (or --resize floors it there, bicubic, as diffusers does). The prompt guides the invented
             detail; --noise-level (0-350, default 20) sets how much noise the low-res image gets first: more noise,
             more new detail, less of the input. Same model, settings and seed give diffusers' image.

             Large inputs: the UNet runs on the whole low-res image; --vae-tiling decodes the 4x output in blended
             tiles (diffusers' vae.enable_tiling()), so the decoder needs the memory of one tile.
             Images carry A1111-style parameters (with the noise level); existing files are never replaced without --force.
             """,
             """\
             sdtrt upscale photo.png --model out/x4-onnx --prompt "a sharp photo of a cat" --out photo-x4.png
             sdtrt upscale a.png b.png --model out/x4-onnx --prompt "a cat" --prompt "a dog" --noise-level 50 --out big/
             sdtrt upscale scan.jpg --model out/x4-onnx --steps 75 --guidance-scale 9 --vae-tiling --seed 1 --out scan-x4.png
             """)
    p.add_argument("image", nargs="+", type=image_file, help="low-res image(s) to upscale (PNG, JPEG); each gets its own prompt, or all share one")
    p.add_argument("--model", type=Path, required=True, help="x4 upscaler ONNX dir (sdtrt export) or engine dir (sdtrt build)")
    p.add_argument("--prompt", action="append", help="prompt; give once for all images or once per image (default: empty)")
    p.add_argument("--negative-prompt", action="append", help="negative prompt; once for all or once per image")
    p.add_argument("--noise-level", type=nonnegative_int, help="noise added to the low-res image, 0..the model's max_noise_level (default 20)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (diffusers' upscaler default: 75)")
    p.add_argument("--guidance-scale", "--cfg", type=nonnegative, help="classifier-free guidance; <= 1 turns it off (default: 9.0, diffusers')")
    p.add_argument("--scheduler", "--sampler", help=f"sampler (default: the model's own). One of {', '.join(SCHEDULERS)}, or a diffusers class / A1111 name")
    p.add_argument("--scheduler-option", action="append", default=[], metavar="KEY=VALUE", help="scheduler config override (repeatable)")
    p.add_argument("--seed", type=seed, help="random seed, 0..2^64-1 (default: a random one, printed and stored in the image)")
    p.add_argument("--num-images", type=positive_int, default=1, help="upscaled versions per image")
    p.add_argument("--clip-skip", type=positive_int, help="use the text encoder's hidden states this many layers before the last")
    p.add_argument("--resize", action="store_true", help="floor each image to a multiple of 4 (bicubic) instead of refusing")
    p.add_argument("--vae-tiling", action="store_true", help="decode the 4x output in overlapping, blended tiles (diffusers' vae.enable_tiling())")
    p.add_argument("--vae-slicing", action="store_true", help="decode one image at a time (diffusers' vae.enable_slicing())")
    _add_backend_flags(p)
    _add_image_output_flags(p)
    p.set_defaults(run=_run_upscale)


def _run_upscale(a: argparse.Namespace) -> None:
    from .artifacts import open_model_dir
    from .outputs import a1111_parameters, plan
    from .runtime.pipeline import Pipeline
    from .runtime.request import Request

    images = len(a.image)
    for flag, values in (("--prompt", a.prompt), ("--negative-prompt", a.negative_prompt)):
        if values and len(values) not in (1, images):
            raise SdtrtError(f"{len(values)} {flag} values for {images} images.", cli_fix=f"give {flag} once, or once per image")
    prompts = a.prompt if a.prompt and len(a.prompt) == images else [(a.prompt or [""])[0]] * images
    request = Request(prompts, _texts(a.negative_prompt), image=list(a.image) if images > 1 else a.image[0], noise_level=a.noise_level,
                      num_images_per_prompt=a.num_images, steps=a.steps, guidance_scale=a.guidance_scale, scheduler=a.scheduler,
                      scheduler_options=_parse_options(a.scheduler_option), seed=a.seed, clip_skip=a.clip_skip, resize=a.resize,
                      vae_tiling=a.vae_tiling, vae_slicing=a.vae_slicing).check()
    if a.scheduler:
        _scheduler_name(a.scheduler)
    outputs = plan(a.out, request.batch, a.force, a.format)
    model = open_model_dir(a.model)
    if model.meta.family != "upscale":
        raise SdtrtError(f"{a.model} is a {model.family.describe(model.meta.config)} export, not an x4 upscaler.",
                         cli_fix="pass --model an export of an x4 upscaler folder (sdtrt make-model --preset tiny-upscaler makes a toy one); "
                                 "for img2img use sdtrt generate --image")
    _check_scheduler(a.model, request)
    options = _backend_options(a)
    pipe = Pipeline.load(a.model, backend=a.backend, **options)
    result = pipe.run(request, progress=not a.no_progress)
    for path in outputs.write(result.images, [a1111_parameters(p) for p in result.parameters], a.quality):
        print(f"wrote {path}")
    t = result.timings
    print(f"seed {result.seed}; {result.images[0].width}x{result.images[0].height}; denoise {t['denoise']:.3f}s "
          f"({t['unet_calls']} UNet calls), VAE decode {t['vae_decoder']:.3f}s, total {t['total']:.3f}s")


def _build_parser(sub) -> None:
    from .engines.toolkit import RTX_TARGETS

    p = _add(sub, "build", "build TensorRT / TensorRT-RTX engines from an ONNX directory",
             f"""\
             Build one engine per component from an ONNX directory, with strongly typed networks (an fp16
             ONNX gives an fp16 engine; fp32 parts may use TF32). Profiles come from your ranges:
             --batch is images per call, --height/--width are pixels (one value = static). The UNet's
             profile covers B (guidance off) to 2 x B_max (guidance on), latents are pixels / 8.

             --backend tensorrt-rtx builds ahead of time for --target GPUs ({', '.join(RTX_TARGETS)}),
             on any machine, GPU or not. --backend tensorrt builds for the local GPU (needs one, and the
             tensorrt package). Identical inputs and flags reuse cached engines instead of rebuilding.
             engines.json records versions, targets, profiles and hashes; `sdtrt inspect` shows it.
             Each engine builds in a worker process, so Ctrl-C stops a build at once.
             """,
             """\
             sdtrt build out/onnx --out out/engines --target sm86,sm89
             sdtrt build out/sd15-fp16 --out out/sd15-rtx --target sm89 --batch 1:1:4 --height 512:512:768 --width 512:512:768
             sdtrt build out/sd15-fp16 --out out/sd15-trt --backend tensorrt --timing-cache out/timing.cache
             sdtrt build models/sd15 --out out/sd15-aoti --backend aoti --device cuda --dtype fp16 --height 512
             """)
    p.add_argument("onnx_dir", type=Path, help="ONNX directory written by `sdtrt export` (aoti: or a diffusers folder)")
    p.add_argument("--out", required=True, type=Path, help="engine directory to write")
    p.add_argument("--backend", choices=["tensorrt-rtx", "tensorrt", "aoti"], default="tensorrt-rtx",
                   help="which library builds: TensorRT-RTX, TensorRT, or torch's AOTInductor (.pt2 packages; no TensorRT needed)")
    p.add_argument("--device", type=device, default="cpu", help="aoti: compile for cpu or cuda (this machine's GPU)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], help="aoti: precision (default: the ONNX dir's; fp16 needs --device cuda)")
    p.add_argument("--batch", default="1:1:4", help="images per call, MIN:OPT:MAX or one value")
    p.add_argument("--height", help="pixels, MIN:OPT:MAX or one value, multiples of 8 (default: the model's native size, static)")
    p.add_argument("--width", help="pixels, MIN:OPT:MAX or one value, multiples of 8 (default: the model's native size, static)")
    p.add_argument("--target", help="compute capabilities for tensorrt-rtx, comma-separated (default: the local GPU; required without one)")
    p.add_argument("--components", help="comma-separated subset (default: every component in the ONNX directory)")
    p.add_argument("--max-prompt-chunks", type=positive_int, default=1, metavar="N",
                   help="long prompts (--prompt-syntax a1111): let the UNet take up to 77 x N text tokens")
    p.add_argument("--opt-level", type=_int, default=3, help="builder optimization level 0-5 (higher: slower build, maybe faster engine)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, read if present and written after the build (tensorrt only)")
    p.add_argument("--refit", action="store_true", help="build refittable engines (weights can be swapped without a rebuild)")
    p.add_argument("--workspace", type=positive_int, metavar="MB", help="builder workspace limit in MiB (default: TensorRT's, all device memory)")
    p.add_argument("--no-cache", action="store_true", help="always rebuild, ignoring the engine cache")
    p.add_argument("--cache-dir", type=Path, help="engine cache folder (default: $SDTRT_CACHE/engines or ~/.cache/sdtrt/engines)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_build)


def _run_build(a: argparse.Namespace) -> None:
    from .engines.build import build_engines

    if a.backend == "aoti":
        from .engines.aoti import build_aoti

        out = build_aoti(a.onnx_dir, a.out, device=a.device, dtype=a.dtype, batch=a.batch, height=a.height, width=a.width,
                         components=_components(a.components), max_prompt_chunks=a.max_prompt_chunks, force=a.force,
                         show_progress=not a.no_progress)
        print(f"wrote AOTInductor packages to {out} (inspect with: sdtrt inspect {out})")
        return
    out = build_engines(a.onnx_dir, a.out, backend=a.backend, batch=a.batch, height=a.height, width=a.width, target=a.target,
                        opt_level=a.opt_level, timing_cache=a.timing_cache, refit=a.refit, workspace_mb=a.workspace,
                        components=_components(a.components), max_prompt_chunks=a.max_prompt_chunks, force=a.force,
                        use_cache=not a.no_cache, cache=a.cache_dir, show_progress=not a.no_progress)
    print(f"wrote engines to {out} (inspect with: sdtrt inspect {out})")


def _inspect_parser(sub) -> None:
    p = _add(sub, "inspect", "show what an ONNX or engine directory holds, and check its files",
             """\
             Print an ONNX directory's components (dtypes, shapes) or an engine directory's manifest:
             library and version, target GPUs, profiles (min / opt / max), sizes, hashes and build flags.
             Everything comes from sdtrt.json / engines.json, so it works on machines without a GPU.
             Every file listed is checked (present, the recorded size; --verify: the recorded sha256);
             a damaged directory is reported with the command that recreates it (exit 2).
             """,
             """\
             sdtrt inspect out/engines
             sdtrt inspect out/engines --layers
             sdtrt inspect out/onnx --verify
             sdtrt inspect out/onnx --json
             """)
    p.add_argument("dir", type=Path, help="ONNX or engine directory (the folder, not its sdtrt.json)")
    p.add_argument("--layers", action="store_true", help="layer types per engine (and fused engine layers where a GPU can load them)")
    p.add_argument("--verify", action="store_true", help="also compare every file's sha256 with the recorded one (reads every byte)")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(run=_run_inspect)


def _run_inspect(a: argparse.Namespace) -> None:
    import dataclasses
    import json

    from .inspect import check, describe

    if a.json:
        model = check(a.dir, a.verify)
        print(json.dumps({"sdtrt.json": dataclasses.asdict(model.meta),
                          "engines.json": dataclasses.asdict(model.manifest) if model.manifest else None}, indent=2))
    else:
        print(describe(a.dir, layers=a.layers, verify=a.verify))


def _bench_parser(sub) -> None:
    p = _add(sub, "bench", "time sdtrt against eager diffusers and Optimum, side by side",
             """\
             Run the same request through eager diffusers (the reference), Optimum's ONNX Runtime pipeline
             and sdtrt (every backend available here) in one process: warm-up, then interleaved rounds
             (A B C A B C ...); with --mode one-at-a-time (chosen automatically when the model would not
             fit in memory once per system, e.g. SDXL on 24 GB) each system is loaded, measured and
             unloaded in turn. SD 1.x/2.x and SDXL folders. Reports per stage (text encoder, UNet per call, VAE decode) and end to end:
             median, min, max; speed-up over diffusers; peak RSS (and GPU memory); runtime overhead per
             step (loop time with the UNet replaced by a no-op); and checks every system made the same
             image (PSNR vs diffusers). Writes JSON and a PNG chart. --compare gates regressions.
             Exports and engines are cached by the model's weights hash and the options, never by name.
             Exit codes: 3 images differ, 4 a stage regressed.
             """,
             """\
             sdtrt bench --preset sd15 --height 256 --width 256 --steps 4 --repeats 5
             sdtrt bench --preset tiny --repeats 2 --out out/tiny-bench.json
             sdtrt bench --preset sd15 --compare benchmarks/reference/bench-sd15-256-cpu.json --max-regression 5%
             sdtrt bench --preset sdxl --height 512 --width 512 --steps 2 --repeats 1 --mode one-at-a-time
             """)
    from benchmarks.bench import add_arguments

    add_arguments(p)
    p.set_defaults(run=_run_bench)


def _run_bench(a: argparse.Namespace) -> None:
    from benchmarks.bench import run

    status = run(a)
    if status:
        raise SystemExit(status)


def _serve_parser(sub) -> None:
    from .serve.service import Limits, Settings

    d, lim = Settings(), Limits()
    p = _add(sub, "serve", "serve a model over HTTP: A1111-compatible API, batching, metrics, API key, Ray Serve",
             """\
             Load a model once and serve it over HTTP (FastAPI + uvicorn): the AUTOMATIC1111 web UI API
             (POST /sdapi/v1/txt2img, /sdapi/v1/img2img; GET /sdapi/v1/samplers, /sdapi/v1/sd-models), sdtrt's own
             request type (POST /v1/images: sdtrt.Request fields as JSON, PNG or JSON back), GET /health,
             /ready and /metrics (Prometheus). Without MODEL_DIR it serves the tiny demo model.

             Requests that can share a model call (same size, steps, sampler, guidance, strength, LoRAs ...)
             and arrive within --max-wait-ms run as one batch of up to --max-batch images; each still gets
             exactly the image it would get alone with its seed. The oldest request always goes next.
             A full queue answers 503 with Retry-After; limits answer 422 naming the limit. With an API key
             (--api-key or $SDTRT_API_KEY) every route except /health needs `Authorization: Bearer KEY`.
             SIGTERM stops accepting, finishes in-flight requests (up to --drain-seconds) and exits 0.
             --ray runs the same service as a Ray Serve deployment with --replicas copies of the model.
             """,
             """\
             sdtrt serve                                      # tiny demo model on http://127.0.0.1:7861
             sdtrt serve out/sd15-onnx --max-batch 4 --max-wait-ms 50 --api-key s3cret
             sdtrt serve out/sd15-engines --backend tensorrt --lora-dir loras/ --max-size 1024
             sdtrt serve out/sd15-onnx --ray --replicas 2 --port 8000
             curl -s localhost:7861/sdapi/v1/txt2img -d '{"prompt": "a fox", "steps": 20, "seed": 1}'
             """)
    p.add_argument("model_dir", nargs="?", type=Path, help="ONNX dir (sdtrt export) or engine dir (sdtrt build); default: the tiny demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network: set an API key)")
    p.add_argument("--port", type=nonnegative_int, default=7861, help="TCP port (A1111's is 7860)")
    _add_backend_flags(p)
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch, metavar="N", help="images per model call (1: no batching)")
    p.add_argument("--max-wait-ms", type=nonnegative, default=d.max_wait_ms, metavar="MS",
                   help="how long the oldest request waits for others to batch with")
    p.add_argument("--max-queue", type=positive_int, default=d.max_queue, metavar="Q", help="requests waiting before 503 + Retry-After")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on every route but /health (default: $SDTRT_API_KEY)")
    p.add_argument("--lora-dir", type=folder, help="folder that <lora:NAME:SCALE> tags load NAME.safetensors from (nothing else is read)")
    p.add_argument("--max-steps", type=positive_int, default=lim.max_steps, help="largest steps per request")
    p.add_argument("--max-size", type=pixels, default=lim.max_size, metavar="PX", help="largest width / height")
    p.add_argument("--max-images", type=positive_int, default=lim.max_images, help="most images per request (A1111: batch_size x n_iter)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=lim.max_prompt_tokens, help="most CLIP tokens per prompt")
    p.add_argument("--max-body-mb", type=nonnegative, default=lim.max_body_mb, help="largest request body in MiB")
    p.add_argument("--timeout", type=nonnegative, default=lim.timeout, metavar="S", help="seconds per request, queueing included (504 past it)")
    p.add_argument("--drain-seconds", type=nonnegative, default=d.drain_seconds, metavar="S",
                   help="on SIGTERM, how long in-flight requests may take to finish")
    p.add_argument("--model-name", help="name in /sdapi/v1/sd-models and the images' parameters (default: the folder's name)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (a local Ray cluster, or $RAY_ADDRESS)")
    p.add_argument("--replicas", type=positive_int, default=1, help="--ray: copies of the model, requests routed by Ray")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="server log level")
    p.set_defaults(run=_run_serve)


def _run_serve(a: argparse.Namespace) -> None:
    import os

    from .artifacts import open_model_dir
    from .default_model import default_onnx_dir
    from .errors import require

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "sdtrt serve")
    from .serve.service import Limits, Settings

    model = a.model_dir or default_onnx_dir(log=lambda m: print(m, file=sys.stderr))
    open_model_dir(model)  # a wrong folder fails here, in one line, before the server starts
    key = a.api_key or os.environ.get("SDTRT_API_KEY") or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and key is None:
        print(f"sdtrt serve: warning: listening on {a.host} without an API key (--api-key / SDTRT_API_KEY)", file=sys.stderr)
    settings = Settings(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_queue=a.max_queue, api_key=key,
                        lora_dir=a.lora_dir, drain_seconds=a.drain_seconds, model_name=a.model_name or (Path(model).resolve().name if a.model_dir else "sdtrt-tiny-demo"),
                        limits=Limits(max_steps=a.max_steps, max_size=a.max_size, max_images=a.max_images,
                                      max_prompt_tokens=a.max_prompt_tokens, max_body_mb=a.max_body_mb, timeout=a.timeout))
    options = _backend_options(a)
    if a.ray:
        from .serve.ray_app import run

        require("ray", "serve", "sdtrt serve --ray")
        run(model, a.backend, options, settings, host=a.host, port=a.port, replicas=a.replicas)
        return
    from .runtime.pipeline import Pipeline
    from .serve.server import serve
    from .serve.service import Service

    service = Service(lambda: Pipeline.load(model, backend=a.backend, **options), settings)
    print(f"sdtrt serve: {model} on http://{a.host}:{a.port} (max batch {a.max_batch}, wait {a.max_wait_ms:g} ms, "
          f"queue {a.max_queue}{', API key required' if key else ''})", file=sys.stderr)
    serve(service, a.host, a.port, log_level=a.log_level)
    print("sdtrt serve: stopped", file=sys.stderr)


def _demo_parser(sub) -> None:
    p = _add(sub, "demo", "a web page (Gradio) for people: text to image, image to image, inpainting; Chinese or English",
             """\
             Load a model once and serve a web page (Gradio) for it: text to image, image to image, and inpainting
             with the mask painted in the browser. Prompt, negative prompt, sampler, steps, CFG scale, seed (🎲: a
             random one, ♻️: the last one used), size, images per prompt, denoising strength; a progress bar per
             denoising step. Downloaded PNGs carry A1111's `parameters` text. One model runs one request at a time:
             the others wait in a queue (Gradio shows each user their place). The page switches between Chinese
             and English; it opens in Chinese for a Taiyi model, in English otherwise (--lang). Without MODEL_DIR
             it serves the tiny demo model (exported with a VAE encoder once, into the cache).
             Needs Gradio: pip install 'sdtrt[demo]'. Ctrl-C exits 130, SIGTERM 143.
             """,
             """\
             sdtrt demo                                       # tiny demo model on http://127.0.0.1:7860
             sdtrt demo out/taiyi-onnx                        # a Taiyi export: the page opens in Chinese
             sdtrt demo out/sd15-onnx --port 8080 --lang zh --outdir outputs/demo
             sdtrt demo out/sd15-engines --backend tensorrt --host 0.0.0.0
             """)
    p.add_argument("model_dir", nargs="?", type=Path, help="ONNX dir (sdtrt export) or engine dir (sdtrt build); default: the tiny demo model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=positive_int, default=7860, help="TCP port")
    p.add_argument("--share", default="off", choices=["on", "off"], help="on: also a public *.gradio.live link (needs Gradio's tunnel service)")
    p.add_argument("--lang", default="auto", choices=["auto", "zh", "en"], help="the page's first language (auto: zh for Taiyi, else en)")
    p.add_argument("--outdir", type=Path, help="keep the images here, numbered (default: a temporary folder removed on exit)")
    p.add_argument("--max-queue", type=positive_int, default=32, metavar="Q", help="requests waiting before new ones are turned away")
    _add_backend_flags(p)
    p.set_defaults(run=_run_demo)


def _run_demo(a: argparse.Namespace) -> None:
    from .demo import run

    options = _backend_options(a)
    run(a.model_dir, host=a.host, port=a.port, share=a.share == "on", lang=None if a.lang == "auto" else a.lang, outdir=a.outdir,
        backend=a.backend, backend_options=options, max_queue=a.max_queue)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtrt", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdtrt {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    _make_model_parser(sub)
    _export_parser(sub)
    _build_parser(sub)
    _generate_parser(sub)
    _upscale_parser(sub)
    _inspect_parser(sub)
    _bench_parser(sub)
    _serve_parser(sub)
    _demo_parser(sub)
    return parser


def _cli_error(e: SdtrtError, argv: list[str]) -> SdtrtError:
    """Reword an error raised in Python terms (a request parameter, a path) into the command line's."""
    import shlex

    from .artifacts import FolderExpected
    from .runtime.request import InvalidRequest

    if isinstance(e, InvalidRequest) and e.param in _FLAGS:
        return e.worded(_FLAGS[e.param], str(e.example))
    if isinstance(e, FolderExpected):  # the same command line, with the folder in place of the file
        fixed = [_with_folder(arg, e.file) for arg in argv]
        if fixed != argv:
            return SdtrtError(e.problem, e.fix, cli_fix=f"pass the folder, not the file: sdtrt {shlex.join(fixed)}")
    return e


def _with_folder(arg: str, file: Path) -> str:
    flag, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
    return flag + eq + str(file.parent) if value and Path(value) == file else arg


def _out_of_memory(e: RuntimeError) -> bool:
    """torch's allocation failures (CPU and CUDA) are RuntimeErrors; tell them from the rest."""
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def report(e: SdtrtError) -> None:
    """Context lines (a validation table, TensorRT's errors) first, then the one error line."""
    head, *details = e.problem.splitlines() or [""]
    for line in details:
        print(line, file=sys.stderr)
    fix = e.cli_fix or e.fix
    print(f"sdtrt: error: {head}" + (f" Fix: {fix}" if fix else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from . import signals

    signals.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            parser.print_help()
            return 2
        args.run(args)
    except SdtrtError as e:
        report(_cli_error(e, argv))
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (signals.Terminated)
        code = signals.exit_code(e)
        print(f"sdtrt: {'terminated' if code == 143 else 'interrupted'}; nothing partial was left behind", file=sys.stderr)
        return code
    except MemoryError:
        report(SdtrtError("out of memory.", "use a smaller size, fewer images per call, or close other jobs"))
        return 2
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        report(SdtrtError(f"out of memory ({str(e).splitlines()[0][:200]}).",
                          "pass a smaller --height/--width or fewer --num-images / --batch, or close other jobs"))
        return 2
    except OSError as e:  # the environment: a full disk, a file that vanished, a permission changed mid-run
        report(SdtrtError(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "") + ".",
                          "free disk space, or check the path and its permissions"))
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
