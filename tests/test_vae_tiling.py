"""VAE tiling and slicing give the images diffusers gives with `vae.enable_tiling()` / `enable_slicing()`.

Oracles: diffusers' AutoencoderKL with tiling on (the tiles' arithmetic, compared exactly with the same
torch VAE behind our tiler), and diffusers' StableDiffusion(Img2Img)Pipeline with the VAE switches on
against sdtrt on ONNX Runtime (PSNR >= 45 dB, the DESIGN bound). The tiny VAE's sample_size is 64, so
tiles are 64 px / 8 latents and 128x192 cuts into 3 x 4 tiles: the tests count the network calls.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline, Request
from sdtrt.cli import main as cli
from sdtrt.errors import OutOfMemory, SdtrtError
from sdtrt.runtime import vae as V
from sdtrt.runtime.request import InvalidRequest
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0
HEIGHT, WIDTH = 128, 192  # latents 16 x 24: tiles start every 6 latents -> 3 rows x 4 columns
TILES_PER_IMAGE = 12
PROMPTS = ["a watercolor fox", "a red bicycle"]


@pytest.fixture(scope="module")
def torch_vae(tiny_model):
    import diffusers

    return diffusers.AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval()


@pytest.fixture(scope="module")
def tiles(tiny_model) -> V.Tiles:
    return V.Tiles.from_config(json.loads((tiny_model / "vae" / "config.json").read_text()))


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return Pipeline.load(tiny_onnx)


@pytest.fixture
def calls(pipe, monkeypatch) -> dict[str, list]:
    """Input shapes of every VAE call the pipeline makes."""
    seen: dict[str, list] = {"vae_decoder": [], "vae_encoder": []}
    run = pipe.backend.run

    def spy(component, feeds):
        if component in seen:
            seen[component].append(tuple(next(iter(feeds.values())).shape))
        return run(component, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    return seen


def _picture(w: int = WIDTH, h: int = HEIGHT, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _tile_inputs(batch: int, channels: int, height: int, width: int, tile: int) -> list[tuple[int, ...]]:
    """The input shape of each network call diffusers makes for one tiled call: tiles start every 3/4 tile."""
    stride = tile * 3 // 4
    return [(batch, channels, min(tile, height - i), min(tile, width - j)) for i in range(0, height, stride) for j in range(0, width, stride)]


DECODER_TILES = _tile_inputs(1, 4, HEIGHT // 8, WIDTH // 8, 8)  # 3 x 4 tiles; the last row 4 latents tall, the last column 6 wide
ENCODER_TILES = _tile_inputs(1, 3, HEIGHT, WIDTH, 64)


def _same(ours, theirs, at_least: float = MIN_PSNR) -> list[float]:
    assert len(ours) == len(theirs)
    values = [psnr(a, b) for a, b in zip(ours, theirs)]
    assert all(v >= at_least for v in values), values
    return values


# --- the tiler itself, against diffusers' AutoencoderKL -------------------------------------------


def test_tile_sizes_come_from_the_vae_config_as_diffusers_derives_them(torch_vae, tiles):
    assert (tiles.sample, tiles.latent, tiles.overlap) == (torch_vae.tile_sample_min_size, torch_vae.tile_latent_min_size,
                                                          torch_vae.tile_overlap_factor) == (64, 8, 0.25)
    sd15 = V.Tiles.from_config({"sample_size": 512, "block_out_channels": [128, 256, 512, 512]})
    assert (sd15.sample, sd15.latent) == (512, 64)
    assert V.Tiles.from_config({}).sample == 32  # AutoencoderKL's default sample_size
    assert V.Tiles.from_config({"sample_size": [96, 64], "block_out_channels": [1, 2]}).latent == 48


@pytest.mark.parametrize("shape", [(2, 4, 16, 24), (1, 4, 9, 8), (1, 4, 8, 30), (1, 4, 21, 13)])
def test_tiled_decode_equals_diffusers_tiled_decode(torch_vae, tiles, shape):
    """Same torch decoder per tile, so any difference is the tiling arithmetic: none (bit for bit)."""
    z = torch.randn(shape, generator=seeded(0))
    shapes = []

    def decoder(t):
        shapes.append(tuple(t.shape))
        return {"images": torch_vae.decode(t).sample}

    with torch.no_grad():
        whole = torch_vae.decode(z).sample
        ours = V.decode(decoder, z, tiles)
        torch_vae.enable_tiling()
        try:
            theirs = torch_vae.decode(z).sample
        finally:
            torch_vae.disable_tiling()
    assert torch.equal(ours, theirs)
    assert len(shapes) == len(range(0, shape[2], 6)) * len(range(0, shape[3], 6)) == tiles.count(shape[2], shape[3], tiles.latent)
    assert max(max(s[2:]) for s in shapes) == tiles.latent
    assert not torch.allclose(ours, whole, atol=1e-2)  # seams blended, not the whole-image decode: tiles were used


def test_tiled_encode_equals_diffusers_tiled_encode(torch_vae, tiles):
    """diffusers blends the encoder's moments (mean, log-variance); ours blends mean and 2 log std, then takes
    std again: equal up to float32 rounding of log/exp."""
    x = torch.rand(1, 3, HEIGHT, WIDTH, generator=seeded(1)) * 2 - 1
    shapes = []

    def encoder(t):
        shapes.append(tuple(t.shape))
        d = torch_vae.encode(t).latent_dist
        return {"latent_mean": d.mean, "latent_std": d.std}

    with torch.no_grad():
        whole = torch_vae.encode(x).latent_dist
        mean, std = V.encode(encoder, x, tiles)
        torch_vae.enable_tiling()
        try:
            theirs = torch_vae.encode(x).latent_dist
        finally:
            torch_vae.disable_tiling()
    assert len(shapes) == TILES_PER_IMAGE and max(max(s[2:]) for s in shapes) == tiles.sample
    assert torch.equal(mean, theirs.mean)
    assert float(((std - theirs.std) / theirs.std).abs().max()) <= 1e-6
    assert not torch.allclose(mean, whole.mean, atol=1e-2)


def test_small_inputs_are_not_tiled_and_slicing_runs_one_image_at_a_time(tiles):
    shapes = []

    def decoder(t):
        shapes.append(tuple(t.shape))
        return {"images": t.repeat(1, 1, 8, 8)[:, :3]}

    z = torch.randn(3, 4, 8, 8)
    assert torch.equal(V.decode(decoder, z, tiles), decoder(z)["images"]) and shapes == [(3, 4, 8, 8)] * 2
    shapes.clear()
    assert torch.equal(V.decode(decoder, z, tiles, slicing=True), decoder(z)["images"])
    assert shapes[:3] == [(1, 4, 8, 8)] * 3


# --- the pipeline, against diffusers' pipelines ----------------------------------------------------


def test_txt2img_with_tiling_and_slicing_matches_diffusers(pipe, tiny_model, calls):
    kw = dict(negative_prompt=["blurry", "ugly"], height=HEIGHT, width=WIDTH)
    ours = pipe(PROMPTS, steps=4, scheduler="euler", seed=7, vae_tiling=True, vae_slicing=True, progress=False, **kw)
    assert calls["vae_decoder"] == DECODER_TILES * 2  # one image at a time, 12 tiles each
    assert len(DECODER_TILES) == TILES_PER_IMAGE and DECODER_TILES[-1] == (1, 4, 4, 6)
    ref = reference_pipeline(tiny_model, "euler")
    ref.vae.enable_tiling()
    ref.vae.enable_slicing()
    theirs = ref(PROMPTS, num_inference_steps=4, generator=seeded(7), **kw).images
    _same(ours.images, theirs)
    ref.vae.disable_tiling()
    untiled = ref(PROMPTS, num_inference_steps=4, generator=seeded(7), **kw).images
    assert all(psnr(a, b) < 35 for a, b in zip(ours.images, untiled))  # the match is with the tiled decode, not the plain one


def test_txt2img_with_tiling_on_a_batch_matches_diffusers(pipe, tiny_model, calls):
    ours = pipe(PROMPTS, steps=3, scheduler="dpmpp_2m", seed=3, height=HEIGHT, width=WIDTH, vae_tiling=True, progress=False)
    assert calls["vae_decoder"] == [(2, *shape[1:]) for shape in DECODER_TILES]  # the batch in each tile
    ref = reference_pipeline(tiny_model, "dpmpp_2m")
    ref.vae.enable_tiling()
    _same(ours.images, ref(PROMPTS, num_inference_steps=3, generator=seeded(3), height=HEIGHT, width=WIDTH).images)


def test_slicing_alone_matches_diffusers(pipe, tiny_model, calls):
    ours = pipe(PROMPTS, steps=3, scheduler="ddim", seed=4, num_images_per_prompt=2, vae_slicing=True, progress=False)
    assert calls["vae_decoder"] == [(1, 4, 8, 8)] * 4
    ref = reference_pipeline(tiny_model, "ddim")
    ref.vae.enable_slicing()
    _same(ours.images, ref(PROMPTS, num_inference_steps=3, num_images_per_prompt=2, generator=seeded(4)).images)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_with_tiling_matches_diffusers(pipe, tiny_model, calls, strength):
    """The image is encoded in tiles (moments blended, then sampled) and the result decoded in tiles."""
    image = _picture()
    ours = pipe(PROMPTS, image=image, strength=strength, steps=5, scheduler="unipc", seed=2, vae_tiling=True, progress=False)
    assert calls["vae_encoder"] == ENCODER_TILES and calls["vae_decoder"] == [(2, *shape[1:]) for shape in DECODER_TILES]
    ref = reference_pipeline(tiny_model, "unipc", cls_name="StableDiffusionImg2ImgPipeline")
    ref.vae.enable_tiling()
    _same(ours.images, ref(PROMPTS, image=image, strength=strength, num_inference_steps=5, generator=seeded(2)).images)


@pytest.mark.parametrize("switches", [False, True], ids=["plain", "tiling+slicing"])
def test_img2img_with_a_generator_per_image_matches_diffusers(pipe, tiny_model, switches):
    """diffusers' img2img encodes the one image once per generator (each draws its own posterior sample)."""
    image = _picture(seed=3)
    generators = lambda: [seeded(5), seeded(6)]  # noqa: E731
    ours = pipe(PROMPTS, image=image, strength=0.7, steps=4, scheduler="euler_ancestral", generator=generators(),
                vae_tiling=switches, vae_slicing=switches, progress=False)
    ref = reference_pipeline(tiny_model, "euler_ancestral", cls_name="StableDiffusionImg2ImgPipeline")
    if switches:
        ref.vae.enable_tiling()
        ref.vae.enable_slicing()
    _same(ours.images, ref(PROMPTS, image=image, strength=0.7, num_inference_steps=4, generator=generators()).images)


def test_inpainting_with_tiling_matches_diffusers(pipe, tiny_model, calls):
    image = _picture(seed=4)
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[32:96, 40:150] = 255
    mask = Image.fromarray(mask)
    ours = pipe("a red hat", image=image, mask_image=mask, strength=0.9, steps=4, scheduler="ddim", seed=8, vae_tiling=True,
                progress=False)
    assert calls["vae_encoder"] == ENCODER_TILES * 2  # the image and the masked image
    ref = reference_pipeline(tiny_model, "ddim", cls_name="StableDiffusionInpaintPipeline")
    ref.vae.enable_tiling()
    _same(ours.images, ref("a red hat", image=image, mask_image=mask, strength=0.9, num_inference_steps=4, generator=seeded(8),
                         height=HEIGHT, width=WIDTH).images)


def test_tiling_at_the_native_size_changes_nothing(pipe, calls):
    plain = pipe("a fox", steps=2, seed=1, progress=False).images[0]
    tiled = pipe("a fox", steps=2, seed=1, vae_tiling=True, progress=False).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(tiled)) and len(calls["vae_decoder"]) == 2


# --- memory: a VAE that does not fit says so and names the flag -------------------------------------


@pytest.fixture
def one_tile_of_memory(monkeypatch):
    """ONNX Runtime as if the machine had memory for a VAE call of one tile (8 x 8 latents) and no more."""
    from sdtrt.runtime.backends.onnxruntime import OnnxRuntimeBackend

    run = OnnxRuntimeBackend.run

    def limited(self, component, feeds):
        x = next(iter(feeds.values()))
        if component == "vae_decoder" and x.shape[2] * x.shape[3] > 64:
            raise OutOfMemory(component, requested=x.shape[0] * (x.shape[2] * x.shape[3]) ** 2 * 4 * 2**10)
        return run(self, component, feeds)

    monkeypatch.setattr(OnnxRuntimeBackend, "run", limited)


def test_a_vae_out_of_memory_names_vae_tiling_and_tiling_fits(tiny_onnx, one_tile_of_memory):
    pipe = Pipeline.load(tiny_onnx)
    with pytest.raises(OutOfMemory) as e:
        pipe("a fox", steps=2, seed=1, height=HEIGHT, width=WIDTH, progress=False)
    assert f"the vae_decoder ran out of memory at {WIDTH}x{HEIGHT}" in e.value.problem
    assert e.value.fix.startswith("pass vae_tiling=True") and e.value.cli_fix.startswith("pass --vae-tiling")
    image = pipe("a fox", steps=2, seed=1, height=HEIGHT, width=WIDTH, vae_tiling=True, progress=False).images[0]
    assert image.size == (WIDTH, HEIGHT)


def test_cli_out_of_memory_in_the_vae_is_one_line_naming_vae_tiling(tiny_onnx, tmp_path, one_tile_of_memory, capsys):
    out = tmp_path / "big.png"
    args = ["generate", "a fox", "--model", str(tiny_onnx), "--steps", "2", "--seed", "1", "--height", str(HEIGHT),
            "--width", str(WIDTH), "--out", str(out), "--no-progress"]
    assert cli(args) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrt: error: the vae_decoder ran out of memory"), lines
    assert " Fix: pass --vae-tiling" in lines[0] and not out.exists()
    assert cli(args + ["--vae-tiling"]) == 0 and Image.open(out).size == (WIDTH, HEIGHT)


def test_out_of_memory_with_tiling_on_a_batch_names_vae_slicing(pipe, monkeypatch):
    run = pipe.backend.run

    def limited(component, feeds):
        if component == "vae_decoder" and feeds["latent"].shape[0] > 1:
            raise OutOfMemory(component)
        return run(component, feeds)

    monkeypatch.setattr(pipe.backend, "run", limited)
    with pytest.raises(OutOfMemory, match="vae_slicing=True"):
        pipe(PROMPTS, steps=2, seed=1, vae_tiling=True, progress=False)
    assert len(pipe(PROMPTS, steps=2, seed=1, vae_tiling=True, vae_slicing=True, progress=False).images) == 2


# --- front ends --------------------------------------------------------------------------------------


def test_cli_flags_give_the_api_image(pipe, tiny_onnx, tmp_path):
    out = tmp_path / "fox.png"
    assert cli(["generate", "a fox", "--model", str(tiny_onnx), "--steps", "3", "--seed", "5", "--height", str(HEIGHT),
                "--width", str(WIDTH), "--vae-tiling", "--vae-slicing", "--out", str(out), "--no-progress"]) == 0
    api = pipe("a fox", steps=3, seed=5, height=HEIGHT, width=WIDTH, vae_tiling=True, vae_slicing=True, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))


@pytest.mark.parametrize("field", ["vae_tiling", "vae_slicing"])
def test_non_boolean_switches_are_refused(field):
    with pytest.raises(InvalidRequest, match=field) as e:
        Request("a fox", **{field: "yes"}).check()
    assert isinstance(e.value, SdtrtError) and f"{field}=True" in e.value.fix
