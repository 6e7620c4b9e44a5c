"""The Gradio app: three tabs (text to image, image to image, inpainting) in front of one loaded `Pipeline`.

Each Generate button builds one `sdtrt.Request` and runs it; the images are written by sdtrt's own
writer (PNG with A1111's `parameters` chunk) and served as those files, so what a user downloads is
byte for byte what sdtrt wrote. Events that run the model share one concurrency slot (one model, one
run at a time; the queue tells each user their place). Stop ends the user's own running generation after
the current denoising step, says so, and frees the model for the next. Errors in the request come back as a message
naming the field and a valid value, never a traceback.

API endpoints (gradio_client): /txt2img, /img2img, /inpaint, /stop, /random_seed, /set_language.
"""

from __future__ import annotations

import html
import logging
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ..errors import SdtrtError
from ..outputs import a1111_parameters, plan
from ..runtime import schedulers
from ..runtime.denoise import Cancelled
from ..runtime.request import InvalidRequest, Request
from . import i18n

MODES = ("txt2img", "img2img", "inpaint")
PIPELINE = "pipeline"  # the concurrency id every model-running event shares
MAX_SIDE = 2048  # the largest width / height the sliders offer
MAX_IMAGES = 8
SEED_RANGE = 2**32  # the 🎲 button's seeds, as A1111's
log = logging.getLogger("sdtrt.demo")


class Studio:
    """The model side of the demo, without widgets: a request in, PNG files with parameters out."""

    def __init__(self, pipe, outdir: Path, model_name: str, backend: str):
        self.pipe = pipe
        self.outdir = Path(outdir)
        self.model_name = model_name
        self.backend = backend
        self.height, self.width = pipe.family.default_size(pipe.config)
        self.family = pipe.family.name
        self.has_encoder = "vae_encoder" in pipe.backend.components()
        self.sampler = schedulers.display_name(pipe.default_scheduler)
        self.defaults = {mode: {"guidance_scale": 7.5, "strength": 0.8, **pipe.family.defaults(mode)} for mode in MODES}
        self._running: dict[str, threading.Event] = {}  # browser session -> its run's stop signal
        self._lock = threading.Lock()
        self.stops: list[tuple[int, int]] = []  # (step, total) where runs were stopped, for the log and tests

    def generate(self, request: Request, progress: Callable[[int, int], None] | None = None,
                 session: str | None = None) -> tuple[list[Path], list[str], int]:
        """Run `request`; returns the PNG paths (numbered in outdir), their parameters text and the seed used.
        `stop(session)` ends it after the current step (raising runtime.denoise.Cancelled)."""
        cancel = threading.Event()
        if session is not None:
            with self._lock:
                self._running[session] = cancel
        try:
            result = self.pipe.run(request, progress=False, callback=progress, cancel=cancel)
        except Cancelled as e:
            self.stops.append((e.done, e.total))
            raise
        finally:
            if session is not None:
                with self._lock:
                    if self._running.get(session) is cancel:
                        del self._running[session]
        texts = [a1111_parameters(p) for p in result.parameters]
        paths = plan(str(self.outdir) + "/", len(result.images)).write(result.images, texts)
        return paths, texts, result.seed


    def stop(self, session: str) -> bool:
        """Signal the run of this browser session, if one is running; True when there was one."""
        with self._lock:
            cancel = self._running.get(session)
        if cancel is not None:
            cancel.set()
        return cancel is not None


def request_from_fields(mode: str, prompt: str, negative_prompt: str, sampler: str, steps: int, cfg_scale: float, seed: int,
                        width: int, height: int, images: int, strength: float | None = None, image=None, mask=None) -> Request:
    """The UI's fields as one Request: an empty negative prompt is none, seed -1 a random one."""
    return Request(prompt, negative_prompt or None, num_images_per_prompt=images, steps=steps, guidance_scale=cfg_scale,
                   scheduler=sampler or None, seed=None if seed is None or seed == -1 else seed, height=height, width=width,
                   image=image if mode != "txt2img" else None, mask_image=mask if mode == "inpaint" else None,
                   strength=strength if mode != "txt2img" else None)


def editor_mask(value: dict | None):
    """(image, mask) from an ImageEditor value: the background, and white wherever any layer was painted."""
    from PIL import Image, ImageChops

    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    painted = None
    for layer in value.get("layers") or []:
        alpha = layer.getchannel("A") if "A" in layer.getbands() else layer.convert("L")
        if alpha.size != background.size:
            alpha = alpha.resize(background.size, Image.NEAREST)
        painted = alpha if painted is None else ImageChops.lighter(painted, alpha)
    if painted is None or painted.getbbox() is None:
        return background, None
    return background, painted.point(lambda v: 255 if v else 0)


def user_error(e: SdtrtError, lang: str) -> gr.Error:
    """sdtrt's error as the UI words it: the field's label, what is wrong, a valid value."""
    if isinstance(e, InvalidRequest):
        note = f" ({e.note})" if e.note else ""
        message = f"{i18n.param(lang, e.param)}: {e.value!r} {e.expected}. {i18n.text(lang, 'try')} {e.example!r}{e.more}{note}."
    else:
        message = e.problem + (f" {e.fix}" if e.fix else "")
    return gr.Error(html.escape(message), title="sdtrt", print_exception=False)


def random_seed() -> int:
    return secrets.randbelow(SEED_RANGE)


# --- the page --------------------------------------------------------------------------------------


class _Labels:
    """Every component whose text depends on the language, and which of its properties to set."""

    def __init__(self):
        self.items: list[tuple[Any, dict[str, str]]] = []
        self.datasets: list[Any] = []

    def add(self, component, **keys: str):
        self.items.append((component, keys))
        return component

    def updates(self, lang: str, studio: Studio) -> list:
        out = []
        for component, keys in self.items:
            values = {attr: _text(lang, key, studio) for attr, key in keys.items()}
            out.append(gr.update(**values))
        return out + [_dataset(lang) for _ in self.datasets]

    @property
    def components(self) -> list:
        return [c for c, _ in self.items] + self.datasets


def _text(lang: str, key: str, studio: Studio) -> str:
    if key == "model":
        return i18n.text(lang, "model", name=studio.model_name, family=studio.family, width=studio.width, height=studio.height,
                         backend=studio.backend)
    if key == "clip_hint":  # only where the text encoder reads English
        return i18n.text(lang, key) if studio.family != "taiyi" else ""
    return i18n.text(lang, key)


def _dataset(lang: str):
    return gr.update(samples=_examples(lang), label=i18n.text(lang, "examples"), headers=_headers(lang))


def _headers(lang: str) -> list[str]:
    return [i18n.text(lang, "prompt"), i18n.text(lang, "negative_prompt")]


def _examples(lang: str) -> list[list[str]]:
    return [list(pair) for pair in i18n.EXAMPLES[lang]]


def build(studio: Studio, lang: str) -> gr.Blocks:
    labels = _Labels()
    samplers = [schedulers.DISPLAY_NAMES[name] for name in schedulers.SCHEDULERS]
    with gr.Blocks(title="sdtrt", analytics_enabled=False) as demo:
        with gr.Row():
            with gr.Column(scale=4):
                labels.add(gr.Markdown(i18n.text(lang, "title"), elem_id="title"), value="title")
                labels.add(gr.Markdown(_text(lang, "model", studio), elem_id="model_info"), value="model")
                labels.add(gr.Markdown(_text(lang, "clip_hint", studio), elem_id="clip_hint"), value="clip_hint")
            with gr.Column(scale=1, min_width=200):
                language = labels.add(gr.Radio(i18n.CHOICES, value=lang, label=i18n.text(lang, "language"), elem_id="language"),
                                      label="language")
        last_seed, current = gr.State(-1), gr.State(MODES[0])
        prompts = {}
        with gr.Tabs():
            for mode in MODES:
                with labels.add(gr.Tab(i18n.text(lang, f"tab_{mode}"), id=mode, elem_id=f"tab_{mode}"), label=f"tab_{mode}") as tab:
                    prompts[mode] = _tab(mode, studio, lang, labels, language, last_seed, samplers)
                tab.select(lambda m=mode: m, outputs=[current], api_visibility="private", concurrency_limit=None, queue=False)
        # one list of examples under the tabs (a Dataset inside a tab that is hidden at first renders empty in Gradio 6):
        # a click fills the prompts of the tab in front
        examples = gr.Dataset(components=["textbox", "textbox"], samples=_examples(lang), headers=_headers(lang), label=i18n.text(lang, "examples"),
                              elem_id="examples")
        labels.datasets.append(examples)

        def fill(sample: list[str], mode: str):
            return [v for m in MODES for v in (tuple(sample) if m == mode else (gr.update(), gr.update()))]

        examples.click(fill, inputs=[examples, current], outputs=[box for m in MODES for box in prompts[m]], api_visibility="private",
                       concurrency_limit=None, queue=False)
        language.change(lambda new: labels.updates(new, studio), inputs=[language], outputs=labels.components,
                        api_name="set_language", concurrency_limit=None)
    return demo


def _tab(mode: str, studio: Studio, lang: str, labels: _Labels, language, last_seed, samplers: list[str]) -> tuple:
    """One tab's widgets and events; returns its (prompt, negative prompt) boxes."""
    t = lambda key: i18n.text(lang, key)  # noqa: E731 - the initial language's text
    defaults = studio.defaults[mode]
    with gr.Row():
        with gr.Column(scale=5):
            prompt = labels.add(gr.Textbox(label=t("prompt"), placeholder=t("prompt_placeholder"), lines=3, elem_id=f"{mode}_prompt"),
                                label="prompt", placeholder="prompt_placeholder")
            negative = labels.add(gr.Textbox("", label=t("negative_prompt"), placeholder=t("negative_placeholder"), lines=2,
                                             elem_id=f"{mode}_negative_prompt"), label="negative_prompt", placeholder="negative_placeholder")
        with gr.Column(scale=1, min_width=140):
            generate = labels.add(gr.Button(t("generate"), variant="primary", size="lg", elem_id=f"{mode}_generate"), value="generate")
            stop = labels.add(gr.Button(t("stop"), variant="stop", size="sm", elem_id=f"{mode}_stop"), value="stop")
    with gr.Row():
        with gr.Column():
            inputs_extra = []
            if mode == "img2img":
                image = labels.add(gr.Image(label=t("init_image"), type="pil", image_mode="RGB", sources=["upload", "clipboard"],
                                            format="png", elem_id="img2img_image"), label="init_image")
                inputs_extra = [image]
            elif mode == "inpaint":
                editor = labels.add(gr.ImageEditor(label=t("inpaint_editor"), type="pil", image_mode="RGBA", sources=["upload", "clipboard"],
                                                   format="png", layers=False, transforms=(),
                                                   brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                   elem_id="inpaint_editor"), label="inpaint_editor")
                with labels.add(gr.Accordion(t("mask_accordion"), open=False), label="mask_accordion"):
                    mask = labels.add(gr.Image(label=t("mask_upload"), type="pil", image_mode="L", sources=["upload"], format="png",
                                               elem_id="inpaint_mask"), label="mask_upload")
                inputs_extra = [editor, mask]
            if mode != "txt2img" and not studio.has_encoder:
                labels.add(gr.Markdown(t("no_encoder")), value="no_encoder")
            sampler = labels.add(gr.Dropdown(samplers, value=studio.sampler, label=t("sampler"), elem_id=f"{mode}_sampler"), label="sampler")
            steps = labels.add(gr.Slider(1, 150, value=20, step=1, precision=0, label=t("steps"), elem_id=f"{mode}_steps"), label="steps")
            with gr.Row():
                width = labels.add(gr.Slider(64, MAX_SIDE, value=studio.width, step=8, precision=0, label=t("width"), elem_id=f"{mode}_width"),
                                   label="width")
                height = labels.add(gr.Slider(64, MAX_SIDE, value=studio.height, step=8, precision=0, label=t("height"),
                                              elem_id=f"{mode}_height"), label="height")
            with gr.Row():
                cfg = labels.add(gr.Slider(0, 30, value=defaults["guidance_scale"], step=0.5, label=t("cfg"), info=t("cfg_info"),
                                           elem_id=f"{mode}_cfg"), label="cfg", info="cfg_info")
                images = labels.add(gr.Slider(1, MAX_IMAGES, value=1, step=1, precision=0, label=t("images"), elem_id=f"{mode}_images"),
                                    label="images")
            strength = []
            if mode != "txt2img":
                strength = [labels.add(gr.Slider(0.01, 1.0, value=defaults["strength"], step=0.01, label=t("strength"),
                                                 info=t("strength_info"), elem_id=f"{mode}_strength"), label="strength", info="strength_info")]
            with gr.Row(equal_height=True):
                seed = labels.add(gr.Number(-1, precision=0, minimum=-1, label=t("seed"), info=t("seed_info"), scale=4,
                                            elem_id=f"{mode}_seed"), label="seed", info="seed_info")
                dice = gr.Button(t("random_seed"), scale=0, min_width=48, elem_id=f"{mode}_random_seed")
                reuse = gr.Button(t("reuse_seed"), scale=0, min_width=48, elem_id=f"{mode}_reuse_seed")
        with gr.Column():
            gallery = labels.add(gr.Gallery(label=t("gallery"), columns=2, height="auto", format="png", type="filepath",
                                            interactive=False, elem_id=f"{mode}_gallery"), label="gallery")
            files = labels.add(gr.File(label=t("files"), file_count="multiple", interactive=False, elem_id=f"{mode}_files"), label="files")
            info = labels.add(gr.Textbox(label=t("info"), lines=4, interactive=False, buttons=["copy"], elem_id=f"{mode}_info"), label="info")

    run = _handler(mode, studio)
    generate.click(run, inputs=[prompt, negative, sampler, steps, cfg, seed, width, height, images, *strength, *inputs_extra, language],
                   outputs=[gallery, files, info, last_seed], api_name=mode, concurrency_id=PIPELINE, concurrency_limit=1)

    def stop_run(request: gr.Request) -> None:
        studio.stop(request.session_hash)  # the run stops after its current step and says so

    # not Gradio's `cancels`: it would drop the event while the model kept running in its worker thread
    stop.click(stop_run, api_name="stop" if mode == "txt2img" else f"stop_{mode}", api_visibility="public" if mode == "txt2img" else "private",
               concurrency_limit=None, queue=False)
    dice.click(random_seed, outputs=[seed], api_name="random_seed" if mode == "txt2img" else f"random_seed_{mode}",
               api_visibility="public" if mode == "txt2img" else "private", concurrency_limit=None, queue=False)
    reuse.click(lambda s: s, inputs=[last_seed], outputs=[seed], api_visibility="private", concurrency_limit=None, queue=False)
    return prompt, negative


def _handler(mode: str, studio: Studio):
    """The function behind a Generate button; its parameter names are the API's."""

    def run(mode_fields: dict, lang: str, progress: gr.Progress, session: str | None):
        image = mask = None
        if mode == "img2img":
            image = mode_fields.pop("image")
            if image is None:
                raise gr.Error(i18n.text(lang, "err_no_image"), title="sdtrt", print_exception=False)
        elif mode == "inpaint":
            image, mask = editor_mask(mode_fields.pop("image"))
            uploaded = mode_fields.pop("mask")
            if image is None:
                raise gr.Error(i18n.text(lang, "err_no_image"), title="sdtrt", print_exception=False)
            mask = uploaded if uploaded is not None else mask
            if mask is None:
                raise gr.Error(i18n.text(lang, "err_no_mask"), title="sdtrt", print_exception=False)
        started = time.perf_counter()
        progress(0, desc=i18n.text(lang, "progress_text"))

        def step(done: int, total: int) -> None:
            progress((done, total), desc=i18n.text(lang, "progress_denoise" if done < total else "progress_decode"), unit="steps")

        try:
            request = request_from_fields(mode, image=image, mask=mask, **mode_fields)
            paths, texts, seed = studio.generate(request, step, session=session)
        except Cancelled as e:
            raise gr.Error(i18n.text(lang, "stopped", done=e.done, total=e.total), title="sdtrt", print_exception=False) from None
        except SdtrtError as e:
            raise user_error(e, lang) from None
        except Exception as e:  # a bug or the environment: the log gets the traceback, the user one line
            log.exception("sdtrt demo: %s failed", mode)
            raise gr.Error(html.escape(i18n.text(lang, "err_internal", what=type(e).__name__)), title="sdtrt", print_exception=False) from None
        info = texts[0] + "\n" + i18n.text(lang, "done", seed=seed, seconds=time.perf_counter() - started)
        return [str(p) for p in paths], [str(p) for p in paths], info, seed

    if mode == "txt2img":
        def txt2img(prompt: str, negative_prompt: str = "", sampler: str | None = None, steps: int = 20, cfg_scale: float | None = None,
                    seed: int = -1, width: int | None = None, height: int | None = None, images: int = 1, lang: str = "en",
                    progress=gr.Progress(), request: gr.Request = None):
            fields = dict(prompt=prompt, negative_prompt=negative_prompt, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                          width=width, height=height, images=images)
            return run(fields, lang, progress, _session(request))
        return txt2img
    if mode == "img2img":
        def img2img(prompt: str, negative_prompt: str = "", sampler: str | None = None, steps: int = 20, cfg_scale: float | None = None,
                    seed: int = -1, width: int | None = None, height: int | None = None, images: int = 1, strength: float | None = None,
                    image=None, lang: str = "en", progress=gr.Progress(), request: gr.Request = None):
            fields = dict(prompt=prompt, negative_prompt=negative_prompt, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                          width=width, height=height, images=images, strength=strength, image=image)
            return run(fields, lang, progress, _session(request))
        return img2img

    def inpaint(prompt: str, negative_prompt: str = "", sampler: str | None = None, steps: int = 20, cfg_scale: float | None = None,
                seed: int = -1, width: int | None = None, height: int | None = None, images: int = 1, strength: float | None = None,
                image=None, mask=None, lang: str = "en", progress=gr.Progress(), request: gr.Request = None):
        fields = dict(prompt=prompt, negative_prompt=negative_prompt, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                      width=width, height=height, images=images, strength=strength, image=image, mask=mask)
        return run(fields, lang, progress, _session(request))
    return inpaint


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


# --- serving ---------------------------------------------------------------------------------------


def theme():
    """Gradio's default look with the system's fonts: the page needs nothing from outside (no web fonts)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "PingFang SC", "Microsoft YaHei", "Noto Sans CJK SC", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


class Server:
    """A launched demo: `url`, and `close()` (which removes a temporary output folder)."""

    def __init__(self, demo: gr.Blocks, studio: Studio, temporary: bool):
        self.demo, self.studio, self.temporary = demo, studio, temporary

    @property
    def url(self) -> str:
        return self.demo.local_url

    def close(self) -> None:
        self.demo.close()
        if self.temporary:
            shutil.rmtree(self.studio.outdir, ignore_errors=True)


def launch(pipe, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, lang: str | None = None,
           outdir: Path | None = None, model_name: str = "model", backend: str = "onnxruntime", max_queue: int = 32) -> Server:
    """Start the demo on host:port in background threads and return at once."""
    temporary = outdir is None
    outdir = Path(tempfile.mkdtemp(prefix="sdtrt-demo-")) if temporary else Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    studio = Studio(pipe, outdir, model_name, backend)
    demo = build(studio, lang or i18n.default_language(studio.family))
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                allowed_paths=[str(outdir)], show_error=False, theme=theme(), max_file_size="50mb")
    return Server(demo, studio, temporary)


def serve_forever(server: Server, out=sys.stderr) -> None:
    """Block until Ctrl-C or SIGTERM (raised here as KeyboardInterrupt / signals.Terminated), then close."""
    share = getattr(server.demo, "share_url", None)
    print(f"sdtrt demo: open {server.url}" + (f" (public: {share})" if share else ""), file=out, flush=True)
    try:
        while True:
            time.sleep(0.5)
    finally:
        server.close()
        print("sdtrt demo: stopped", file=out, flush=True)
