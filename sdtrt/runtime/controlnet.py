"""ControlNet as a step hook: before each UNet call, the active ControlNets run on the step's inputs and
their residuals (scaled, summed) become the UNet's extra inputs; outside a ControlNet's guidance window it
is not run at all. The UNet of an export with ControlNets always takes the residuals: zeros when none
is active (adding zero changes no bit of the result).

Semantics are diffusers' StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline and MultiControlNetModel:
control images in [0, 1], one per ControlNet, repeated per image and doubled for guidance; a
ControlNet is kept at step i of n unless i/n < start or (i+1)/n > end; guess mode runs it on the
conditional half only, with residual k scaled by scale * 10^(k/N - 1) (0.1 -> 1), and zeros for the
unconditional half; several ControlNets' residuals are summed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..errors import SdtrtError, require
from ..models.spec import ComponentSpec
from .denoise import Step, StepHook

RESIDUALS = ("down_block_res_", "mid_block_res")

@dataclasses.dataclass
class Net:
    component: str  # "controlnet_<name>"
    image: torch.Tensor  # [B2 or B, 3, H, W] in [0, 1], batched for the call
    scale: float
    start: float
    end: float

    def keep(self, step: Step) -> bool:
        return not (step.index / step.total < self.start or (step.index + 1) / step.total > self.end)


class ControlNetHook(StepHook):
    def __init__(self, run: Callable[[str, dict], dict], nets: list[Net], unet: ComponentSpec,
                 dtypes: dict[tuple[str, str], torch.dtype], added: list[str], cfg: bool, guess_mode: bool):
        self.run, self.nets, self.unet, self.dtypes, self.added = run, nets, unet, dtypes, added
        self.residuals = [t.name for t in unet.inputs if t.name.startswith(RESIDUALS)]
        self.cfg, self.guess = cfg, guess_mode
        self._zeros: dict[tuple, dict[str, torch.Tensor]] = {}

    def unet_inputs(self, step: Step, feeds: dict[str, torch.Tensor]) -> None:
        total = None
        for net in self.nets:
            if not net.keep(step):
                continue
            inputs = {"sample": feeds["sample"], "timestep": feeds["timestep"], "encoder_hidden_states": feeds["encoder_hidden_states"],
                      **{k: feeds[k] for k in self.added}}
            if self.guess and self.cfg:  # the conditional half only
                inputs = {k: (v.chunk(2)[1] if k != "timestep" else v) for k, v in inputs.items()}
            inputs["controlnet_cond"] = net.image
            out = self.run(net.component, {k: v.to(self.dtypes.get((net.component, k), v.dtype)) for k, v in inputs.items()})
            scales = _guess_scales(len(self.residuals), net.scale) if self.guess else [net.scale] * len(self.residuals)
            res = [out[name].float() * s for name, s in zip(self.residuals, scales)]
            if self.guess and self.cfg:
                res = [torch.cat([torch.zeros_like(r), r]) for r in res]
            total = res if total is None else [a + b for a, b in zip(total, res)]
        if total is None:
            feeds.update(self._zeros_for(feeds["sample"]))
            return
        feeds.update({name: r.to(self.dtypes[("unet", name)]) for name, r in zip(self.residuals, total)})

    def _zeros_for(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        key = tuple(sample.shape)
        if key not in self._zeros:
            sizes = {"B2": sample.shape[0], "h": sample.shape[2], "w": sample.shape[3]}
            self._zeros[key] = {name: torch.zeros(self.unet.tensor(name).shape(sizes), dtype=self.dtypes[("unet", name)],
                                                  device=sample.device) for name in self.residuals}
        return self._zeros[key]


def _guess_scales(n: int, scale: float) -> list[float]:
    """diffusers: torch.logspace(-1, 0, n) * scale (guess mode without global-pool conditions)."""
    return (torch.logspace(-1, 0, n) * scale).tolist()


def load_control_image(image: Any, height: int, width: int, resize: bool, what: str = "control_image") -> torch.Tensor:
    """[1|B,3,H,W] in [0, 1], prepared as diffusers' control image processor does (RGB, Lanczos to
    (height, width), /255, no normalization). A size other than the call's is refused unless `resize`."""
    from PIL import Image

    from .images import _open

    pil = _open(image, what)
    if pil is not None:
        if pil.size != (width, height) and not resize:
            raise SdtrtError(f"the {what} is {pil.size[0]}x{pil.size[1]}, the images are {width}x{height}.",
                             "pass a control image of the output size, or resize=True",
                             cli_fix="pass a --control-image of the output size, or --resize")
        rgb = pil.convert("RGB").resize((width, height), resample=Image.LANCZOS)
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        return data.permute(2, 0, 1)[None].float() / 255.0
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != 3:
            raise SdtrtError(f"the {what} tensor has shape {tuple(image.shape)}.", "pass [3,H,W] or [B,3,H,W] in [0, 1], or a PIL image")
        if tuple(x.shape[2:]) != (height, width):
            if not resize:
                raise SdtrtError(f"the {what} is {x.shape[3]}x{x.shape[2]}, the images are {width}x{height}.",
                                 "pass a control image of the output size, or resize=True")
            x = torch.nn.functional.interpolate(x.float(), size=(height, width), mode="bilinear", antialias=True)
        return x.float()
    raise SdtrtError(f"cannot use {type(image).__name__} as a {what}.", "pass a PIL image, a file path, or a [3,H,W] tensor in [0, 1]")


def canny(image: Any, low: int = 100, high: int = 200):
    """The Canny edge map ControlNet-canny is trained on (OpenCV's Canny on the RGB image), as an RGB PIL image."""
    cv2 = require("cv2", "controlnet", "--control-preprocess canny")
    import numpy as np
    from PIL import Image

    from .images import _open

    pil = _open(image, "control image")
    edges = cv2.Canny(np.asarray(pil.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
