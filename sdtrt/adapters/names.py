"""Which weights an adapter may change, and every name adapter files use for them.

`Weights` is component subfolder -> {torch parameter name: shape} of every Linear and Conv2d weight
("unet" -> {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320), ...}).
It comes from the model itself: `weights_for(config)` instantiates the diffusers/transformers modules
on the meta device (no memory, no weights), or a caller builds it from an exported model's weight
names. Everything below derives from those names alone.

kohya-ss names a module by its dotted path with every "." replaced by "_". Underscores are
ambiguous ("to_out_0" vs "to.out.0"), so names are matched against the set of real modules, never
split by rule. sd-scripts trains SDXL on the SGM/LDM UNet, whose module paths differ from diffusers'
(`input_blocks.4.1.transformer_blocks.0.attn1.to_q` is `down_blocks.1.attentions.0...`): every UNet
module also gets its SGM name, computed from the block layout the module names reveal.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch

Weights = Mapping[str, Mapping[str, tuple[int, ...]]]

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def weights_for(config: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """The Linear and Conv2d weights of the UNet and text encoder(s) described by a family config
    ({"unet": unet/config.json, "text_encoder": ..., "text_encoder_2": ...}, as `Family.read_config`
    returns it, or a preset's dicts). Needs diffusers and transformers (export time and tests)."""
    from ..errors import require

    diffusers = require("diffusers", "export", "reading adapters against a model config")
    transformers = require("transformers", "export", "reading adapters against a model config")
    modules: dict[str, torch.nn.Module] = {}
    with torch.device("meta"):
        if config.get("unet") is not None:
            modules["unet"] = diffusers.UNet2DConditionModel.from_config(dict(config["unet"]))
        for name in TEXT_ENCODERS:
            if config.get(name) is not None:
                if "BertModel" in (config[name].get("architectures") or []):  # Taiyi's text encoder
                    modules[name] = transformers.BertModel(transformers.BertConfig.from_dict(dict(config[name])))
                    continue
                cls = transformers.CLIPTextModelWithProjection if has_projection(name, config[name]) else transformers.CLIPTextModel
                modules[name] = cls(transformers.CLIPTextConfig.from_dict(dict(config[name])))
    return {component: {f"{name}.weight": tuple(m.weight.shape) for name, m in module.named_modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
            for component, module in modules.items()}


def has_projection(name: str, config: Mapping[str, Any]) -> bool:
    """SDXL's second encoder (base and refiner) is CLIPTextModelWithProjection: it has text_projection."""
    architectures = config.get("architectures") or []
    return "CLIPTextModelWithProjection" in architectures or (not architectures and name == "text_encoder_2")


def kohya_names(component: str, params: Iterable[str]) -> dict[str, str]:
    """kohya module name (dots as underscores, no prefix) -> parameter name, for one component;
    the UNet's modules under both their diffusers and their SGM names."""
    modules = [p.removesuffix(".weight") for p in params]
    names: dict[str, str] = {}
    aliases = sgm_names(modules) if component == "unet" else {}
    for module in modules:
        for name in (module, aliases.get(module)):
            if name is not None:
                key = name.replace(".", "_")
                assert names.get(key, module) == module, f"{key} names both {names[key]} and {module}"
                names[key] = module
    return {k: f"{m}.weight" for k, m in names.items()}


# --- SGM (LDM) UNet names ---------------------------------------------------------------------

BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}
RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def sgm_names(modules: list[str]) -> dict[str, str]:
    """diffusers UNet module -> its SGM name. SGM numbers the UNet's layers flat: input_blocks.0 is
    conv_in, then per down block its resnets (each with its attention as sub-layer 1) and its
    downsampler (`op`) as one more; output_blocks per up block its resnets (attention at 1), the
    upsampler a sub-layer (2 after an attention, else 1) of the block's last layer; middle_block
    0/1/2 is resnet, attention, resnet."""
    layers: dict[tuple[str, int, str], set[int]] = defaultdict(set)
    for m in modules:
        if hit := BLOCK.match(m):
            layers[hit[1], int(hit[2]), hit[3]].add(int(hit[4]))
    count = lambda side, b, kind: len(layers.get((side, b, kind), ()))  # noqa: E731
    first: dict[tuple[str, int], int] = {}
    i = 1
    for b in sorted({b for side, b, _ in layers if side == "down"}):
        first["down", b], i = i, i + count("down", b, "resnets") + count("down", b, "downsamplers")
    i = 0
    for b in sorted({b for side, b, _ in layers if side == "up"}):
        first["up", b], i = i, i + count("up", b, "resnets")
    return {m: name for m in modules if (name := sgm_name(m, first, count)) is not None}


def sgm_name(module: str, first, count) -> str | None:
    if module in TOP:
        return TOP[module]
    if module.startswith("mid_block."):
        _, kind, i, rest = module.split(".", 3)
        block = MID.get(f"{kind}.{i}")
        return f"{block}.{RESNET.get(rest, rest) if kind == 'resnets' else rest}" if block else None
    hit = BLOCK.match(module)
    if not hit:
        return None
    side, b, kind, i, rest = hit[1], int(hit[2]), hit[3], int(hit[4]), hit[5]
    blocks = "input_blocks" if side == "down" else "output_blocks"
    if kind == "resnets":
        return f"{blocks}.{first[side, b] + i}.0.{RESNET.get(rest, rest)}"
    if kind == "attentions":
        return f"{blocks}.{first[side, b] + i}.1.{rest}"
    if kind == "downsamplers":  # its own input block after the resnets; its conv is called `op`
        return f"input_blocks.{first[side, b] + count(side, b, 'resnets')}.0.{'op' if rest == 'conv' else rest}"
    last = first[side, b] + count(side, b, "resnets") - 1  # upsamplers: a sub-layer of the block's last layer
    return f"output_blocks.{last}.{2 if count(side, b, 'attentions') else 1}.{rest}"
