"""diffusers' ControlNetModel, and the residuals it hands the UNet.

sample [B2,Cin,h,w], timestep float32 [1], encoder_hidden_states [B2,S,D], controlnet_cond [B2,3,H,W] in
[0,1] (+ SDXL's text_embeds, time_ids) -> down_block_res_0 .. down_block_res_{N-1}, mid_block_res

One residual per UNet skip connection: conv_in's output, then each down block's resnets and its
down-sampler; then the mid block's. Their widths and down-sampling levels follow from the UNet's
config (`residuals`), so a ControlNet and the UNet that takes its residuals share one spec. The
conditioning scale (and guess mode's per-residual ramp) is applied by the runtime, so one exported
ControlNet serves every scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..spec import ComponentSpec, TensorSpec, downsampled


def residuals(unet_config: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    """The residual tensors for a UNet with this config: [B2, channels, h/2^k, w/2^k]."""
    widths = list(unet_config["block_out_channels"])
    layers = int(unet_config.get("layers_per_block", 2))
    levels = [(widths[0], 0)]  # conv_in
    for i, width in enumerate(widths):
        levels += [(width, i)] * layers
        if i < len(widths) - 1:
            levels.append((width, i + 1))  # the block's down-sampler
    specs = [TensorSpec(f"down_block_res_{n}", ("B2", c, downsampled("h", k), downsampled("w", k))) for n, (c, k) in enumerate(levels)]
    k = len(widths) - 1
    specs.append(TensorSpec("mid_block_res", ("B2", widths[-1], downsampled("h", k), downsampled("w", k))))
    return tuple(specs)


def spec(name: str, folder: str | Path, config: Mapping[str, Any], unet_config: Mapping[str, Any], *,
         pooled_dim: int | None = None, time_ids: tuple[float, ...] = ()) -> ComponentSpec:
    """The spec of the ControlNet in `folder` (its config.json is `config`), for a UNet with `unet_config`."""
    from .unet import trace_side

    inputs = [
        TensorSpec("sample", ("B2", int(config.get("in_channels", 4)), "h", "w")),
        TensorSpec("timestep", (1,), "float32", sample="timestep"),
        TensorSpec("encoder_hidden_states", ("B2", "S", int(config["cross_attention_dim"]))),
        TensorSpec("controlnet_cond", ("B2", int(config.get("conditioning_channels", 3)), "H", "W"), sample="image"),
    ]
    added = pooled_dim is not None
    if added:
        inputs += [TensorSpec("text_embeds", ("B2", pooled_dim)), TensorSpec("time_ids", ("B2", len(time_ids)), sample="time_ids")]
    return ComponentSpec(
        name,
        inputs=tuple(inputs),
        outputs=residuals(unet_config),
        description=f"ControlNet {name.removeprefix('controlnet_')}: latents + control image -> residuals for the UNet's skip connections",
        weights=name,
        prefix="controlnet.",
        load=lambda model_dir, allow_pickle: load(Path(folder), allow_pickle, added),
        trace_side=trace_side(unet_config),
        sample_values={"time_ids": tuple(time_ids)} if added else {},
    )


class ControlNet(nn.Module):
    def __init__(self, controlnet: nn.Module, added: bool):
        super().__init__()
        self.controlnet, self.added = controlnet, added

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, text_embeds=None, time_ids=None):
        extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}} if self.added else {}
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    guess_mode=False, return_dict=False, **extra)
        return (*down, mid)


def load(folder: Path, allow_pickle: bool, added: bool) -> nn.Module:
    from ...errors import require

    diffusers = require("diffusers", "export", "sdtrt export")
    model = diffusers.ControlNetModel.from_pretrained(folder, use_safetensors=not allow_pickle).eval()
    return ControlNet(model, added)

