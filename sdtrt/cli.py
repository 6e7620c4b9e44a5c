"""The `sdtrt` command. Each subcommand parses its flags here and calls one library function."""

from __future__ import annotations

import argparse
import os
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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps hand-wrapped descriptions and shows defaults that carry information."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _add(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=textwrap.dedent(description),
                          epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
                          formatter_class=_Formatter)


def _make_model_parser(sub) -> None:
    from .presets import PRESETS

    p = _add(sub, "make-model", "write a diffusers model folder with random weights from a preset",
             """\
             Write a diffusers-format Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/,
             tokenizer/, scheduler/) with the preset's architecture, seeded random weights in safetensors and
             the real CLIP tokenizer vocabulary. diffusers' StableDiffusionPipeline.from_pretrained loads it.

             presets:
             """ + "\n".join(f"  {n:<13} {p.description}" for n, p in PRESETS.items()),
             """\
             sdtrt make-model --preset tiny --out out/tiny
             sdtrt make-model --preset sd15 --out models/sd15 --seed 1
             """)
    p.add_argument("--preset", required=True, choices=list(PRESETS), help="architecture to build")
    p.add_argument("--out", required=True, type=Path, help="folder to write (must not exist, unless --force)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_run_make_model)


def _run_make_model(a: argparse.Namespace) -> None:
    from .presets import make_model

    out = make_model(a.preset, a.out, seed=a.seed, force=a.force)
    print(f"wrote {a.preset} model to {out}")


def _export_parser(sub) -> None:
    from .components import COMPONENTS, DEFAULT_COMPONENTS
    from .export.graph import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, MAX_OPSET, MIN_OPSET

    p = _add(sub, "export", "export a diffusers folder to validated ONNX",
             f"""\
             Export the text encoder, UNet (classifier-free guidance batched: [uncond; cond] in one call)
             and VAE of a diffusers Stable Diffusion 1.x/2.x folder to ONNX, clean the graphs (constant
             folding, shape inference, toposort) and validate every file in ONNX Runtime against its torch
             module. A mismatch fails the export and leaves nothing behind. Artifacts are written to a
             temporary folder and renamed at the end, so an interrupted export never looks complete.

             The ONNX contract (names, dtypes, dynamic axes) is in the README. fp16 applies to the text
             encoder and UNet; the VAE stays fp32 (fp16 VAEs overflow) unless --fp16-vae.
             Components: {', '.join(COMPONENTS)}.
             """,
             """\
             sdtrt export out/tiny --out out/onnx
             sdtrt export models/sd15 --out out/sd15-fp16 --dtype fp16
             sdtrt export models/sd15 --out out/sd15-img2img --components text_encoder,unet,vae_decoder,vae_encoder
             """)
    p.add_argument("model_dir", type=Path, help="diffusers folder (holds model_index.json)")
    p.add_argument("--out", required=True, type=Path, help="ONNX folder to write")
    p.add_argument("--components", default=",".join(DEFAULT_COMPONENTS),
                   help="comma-separated components; add vae_encoder for img2img/inpainting")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="precision of text encoder and UNet")
    p.add_argument("--fp16-vae", action="store_true", help="export the VAE in fp16 too (may overflow: validation checks)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET}-{MAX_OPSET})")
    p.add_argument("--height", type=int, help="image height used for validation inputs (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width used for validation inputs (default: the model's native size)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check (not recommended)")
    p.add_argument("--allow-pickle", action="store_true", help="load .bin/.ckpt pickle weights (can run code: only for files you trust)")
    p.add_argument("--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD, metavar="BYTES",
                   help="store weights beside model.onnx (model.onnx.data) above this size; ONNX cannot hold more than 2 GiB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_export)


def _run_export(a: argparse.Namespace) -> None:
    from .export import export_model

    out = export_model(
        a.model_dir, a.out, components=[c.strip() for c in a.components.split(",") if c.strip()], dtype=a.dtype,
        opset=a.opset, force=a.force, validate_outputs=not a.no_validate, height=a.height, width=a.width,
        fp16_vae=a.fp16_vae, allow_pickle=a.allow_pickle, external_data_threshold=a.external_data_threshold,
        show_progress=not a.no_progress,
    )
    print(f"wrote ONNX to {out}")


def _generate_parser(sub) -> None:
    from .runtime.schedulers import SCHEDULERS

    p = _add(sub, "generate", "make images from a prompt with an ONNX or engine directory",
             """\
             Text to image with the lean runtime. --model takes an ONNX directory (runs on ONNX Runtime)
             or an engine directory (runs on TensorRT); without --model, a tiny random-weight demo model is
             made and exported once into ~/.cache/sdtrt (or $SDTRT_CACHE).

             PNGs carry an A1111-style "parameters" text chunk (prompt, negative prompt, steps, sampler,
             CFG scale, seed, size, model hash), so other tools can read back how an image was made.
             Same model + settings + seed gives the image diffusers' StableDiffusionPipeline gives.
             """,
             """\
             sdtrt generate "a watercolor fox" --out fox.png
             sdtrt generate "a watercolor fox" --model out/onnx --scheduler "DPM++ 2M Karras" --steps 25 --seed 42
             sdtrt generate "a cat" "a dog" --negative-prompt blurry --num-images 2 --out out/images/
             sdtrt generate "a fox, oil painting" --model out/onnx-with-encoder --image photo.png --strength 0.6
             sdtrt generate "a red hat" --model out/inpaint-onnx --image photo.png --mask mask.png
             sdtrt generate "a (red:1.3) fox, [blurry], ...long prompt..." --prompt-syntax a1111
             """)
    p.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    p.add_argument("--model", type=Path, help="ONNX dir (sdtrt export) or engine dir (sdtrt build); default: the tiny demo model")
    p.add_argument("--negative-prompt", action="append", help="negative prompt; give once for all prompts or once per prompt")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=7.5, help="classifier-free guidance; <= 1 turns it off (half the UNet work)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="rescale guided noise toward the conditional std (0.7 for zero-SNR models)")
    p.add_argument("--scheduler", "--sampler", help=f"sampler (default: the model's own). One of {', '.join(SCHEDULERS)}, "
                                                    "or a diffusers class / A1111 name such as 'DPM++ 2M Karras'")
    p.add_argument("--scheduler-option", action="append", default=[], metavar="KEY=VALUE",
                   help="scheduler config override, e.g. timestep_spacing=trailing (repeatable)")
    p.add_argument("--seed", type=int, help="random seed (default: a random one, printed and stored in the PNG)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's native size)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--clip-skip", type=int, help="use the text encoder's hidden states this many layers before the last")
    p.add_argument("--image", help="img2img / inpainting: the starting image (PNG, JPEG)")
    p.add_argument("--mask", help="inpainting: white = repaint, black = keep (same size as --image)")
    p.add_argument("--strength", type=float, help="how much of the image to repaint, (0, 1] (default 0.8 img2img, 1.0 inpainting)")
    p.add_argument("--resize", action="store_true", help="resize --image/--mask to a multiple of 8 (or to --height/--width) instead of refusing")
    p.add_argument("--prompt-syntax", choices=["plain", "a1111"], default="plain",
                   help="plain: diffusers' behaviour (77 tokens, brackets are text); a1111: (word:1.3) weights and long prompts")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"], help="auto: by directory kind")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cpu for ONNX Runtime, cuda for TensorRT)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--out", default="image.png", help="PNG path, or a directory (ending in /) for several images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_generate)


def _parse_options(items: list[str]) -> dict:
    import json

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SdtrtError(f"--scheduler-option {item!r} is not KEY=VALUE.", "write e.g. --scheduler-option timestep_spacing=trailing")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _output_paths(out: Path, n: int, trailing_slash: bool) -> list[Path]:
    if trailing_slash or out.is_dir():
        return [out / f"image-{i}.png" for i in range(n)]
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def _run_generate(a: argparse.Namespace) -> None:
    from .default_model import default_onnx_dir
    from .runtime.images import a1111_parameters, save_png
    from .runtime.pipeline import Pipeline

    model = a.model or default_onnx_dir(log=lambda m: print(m, file=sys.stderr))
    options = {"threads": a.threads} if a.backend != "tensorrt" and a.threads else {}
    if a.device:
        options["device"] = a.device
    pipe = Pipeline.load(model, backend=a.backend, **options)
    negative = a.negative_prompt[0] if a.negative_prompt and len(a.negative_prompt) == 1 else a.negative_prompt
    result = pipe(a.prompt, negative_prompt=negative, num_images_per_prompt=a.num_images, steps=a.steps,
                  guidance_scale=a.guidance_scale, guidance_rescale=a.guidance_rescale, scheduler=a.scheduler,
                  scheduler_options=_parse_options(a.scheduler_option), seed=a.seed, height=a.height, width=a.width,
                  clip_skip=a.clip_skip, image=a.image, mask_image=a.mask, strength=a.strength, resize=a.resize,
                  prompt_syntax=a.prompt_syntax, progress=not a.no_progress)
    paths = _output_paths(Path(a.out), len(result.images), a.out.endswith(("/", os.sep)))
    for image, params, path in zip(result.images, result.parameters, paths):
        save_png(image, path, a1111_parameters(params))
        print(f"wrote {path}")
    t = result.timings
    print(f"seed {result.seed}; text encoder {t['text_encoder']:.3f}s, denoise {t['denoise']:.3f}s "
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
             """,
             """\
             sdtrt build out/onnx --out out/engines --target sm86,sm89
             sdtrt build out/sd15-fp16 --out out/sd15-rtx --target sm89 --batch 1:1:4 --height 512:512:768 --width 512:512:768
             sdtrt build out/sd15-fp16 --out out/sd15-trt --backend tensorrt --timing-cache out/timing.cache
             """)
    p.add_argument("onnx_dir", type=Path, help="ONNX directory written by `sdtrt export`")
    p.add_argument("--out", required=True, type=Path, help="engine directory to write")
    p.add_argument("--backend", choices=["tensorrt-rtx", "tensorrt"], default="tensorrt-rtx", help="which TensorRT library builds")
    p.add_argument("--batch", default="1:1:4", help="images per call, MIN:OPT:MAX or one value")
    p.add_argument("--height", help="pixels, MIN:OPT:MAX or one value, multiples of 8 (default: the model's native size, static)")
    p.add_argument("--width", help="pixels, MIN:OPT:MAX or one value, multiples of 8 (default: the model's native size, static)")
    p.add_argument("--target", help="compute capabilities for tensorrt-rtx, comma-separated (default: the local GPU; required without one)")
    p.add_argument("--components", help="comma-separated subset (default: every component in the ONNX directory)")
    p.add_argument("--max-prompt-chunks", type=int, default=1, metavar="N",
                   help="long prompts (--prompt-syntax a1111): let the UNet take up to 77 x N text tokens")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (higher: slower build, maybe faster engine)")
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file, read if present and written after the build (tensorrt only)")
    p.add_argument("--refit", action="store_true", help="build refittable engines (weights can be swapped without a rebuild)")
    p.add_argument("--workspace", type=int, metavar="MB", help="builder workspace limit in MiB (default: TensorRT's, all device memory)")
    p.add_argument("--no-cache", action="store_true", help="always rebuild, ignoring the engine cache")
    p.add_argument("--cache-dir", type=Path, help="engine cache folder (default: $SDTRT_CACHE/engines or ~/.cache/sdtrt/engines)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_build)


def _run_build(a: argparse.Namespace) -> None:
    from .engines.build import build_engines

    out = build_engines(a.onnx_dir, a.out, backend=a.backend, batch=a.batch, height=a.height, width=a.width, target=a.target,
                        opt_level=a.opt_level, timing_cache=a.timing_cache, refit=a.refit, workspace_mb=a.workspace,
                        components=[c.strip() for c in a.components.split(",")] if a.components else None,
                        max_prompt_chunks=a.max_prompt_chunks, force=a.force, use_cache=not a.no_cache, cache=a.cache_dir, show_progress=not a.no_progress)
    print(f"wrote engines to {out} (inspect with: sdtrt inspect {out})")


def _inspect_parser(sub) -> None:
    p = _add(sub, "inspect", "show what an ONNX or engine directory holds",
             """\
             Print an ONNX directory's components (dtypes, shapes) or an engine directory's manifest:
             library and version, target GPUs, profiles (min / opt / max), sizes, hashes and build flags.
             Everything comes from sdtrt.json / engines.json, so it works on machines without a GPU.
             """,
             """\
             sdtrt inspect out/engines
             sdtrt inspect out/engines --layers
             sdtrt inspect out/onnx --json
             """)
    p.add_argument("dir", type=Path, help="ONNX or engine directory")
    p.add_argument("--layers", action="store_true", help="layer types per engine (and fused engine layers where a GPU can load them)")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(run=_run_inspect)


def _run_inspect(a: argparse.Namespace) -> None:
    import json

    from .inspect import describe
    from .runtime.artifacts import open_model_dir

    if a.json:
        model = open_model_dir(a.dir)
        print(json.dumps({"sdtrt.json": model.meta, "engines.json": model.manifest}, indent=2))
    else:
        print(describe(a.dir, layers=a.layers))


def _bench_parser(sub) -> None:
    p = _add(sub, "bench", "time sdtrt against eager diffusers and Optimum, side by side",
             """\
             Run the same request through eager diffusers (the reference), Optimum's ONNX Runtime pipeline
             and sdtrt (every backend available here) in one process: warm-up, then interleaved rounds
             (A B C A B C ...). Reports per stage (text encoder, UNet per call, VAE decode) and end to end:
             median, min, max; speed-up over diffusers; peak RSS (and GPU memory); runtime overhead per
             step (loop time with the UNet replaced by a no-op); and checks every system made the same
             image (PSNR vs diffusers). Writes JSON and a PNG chart. --compare gates regressions.
             Exit codes: 3 images differ, 4 a stage regressed.
             """,
             """\
             sdtrt bench --preset sd15 --height 256 --width 256 --steps 4 --repeats 5
             sdtrt bench --preset tiny --repeats 2 --out out/tiny-bench.json
             sdtrt bench --preset sd15 --compare benchmarks/baseline.json --max-regression 5%
             """)
    from benchmarks.bench import add_arguments

    add_arguments(p)
    p.set_defaults(run=_run_bench)


def _run_bench(a: argparse.Namespace) -> None:
    from benchmarks.bench import run

    status = run(a)
    if status:
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtrt", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdtrt {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _make_model_parser(sub)
    _export_parser(sub)
    _build_parser(sub)
    _generate_parser(sub)
    _inspect_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from . import signals

    signals.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except SdtrtError as e:
        print(f"sdtrt: error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (signals.Terminated)
        code = signals.exit_code(e)
        print(f"sdtrt: {'terminated' if code == 143 else 'interrupted'}; nothing partial was left behind", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
