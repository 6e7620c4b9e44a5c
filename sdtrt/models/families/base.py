"""What every family provides. A family is a kind of diffusers pipeline folder (SD 1.x/2.x, SDXL, ...):

- export time: `read_config(folder)` gathers the facts its specs are functions of (the diffusers
  sub-configs, verbatim) into a JSON-able dict, which `sdtrt export` stores in sdtrt.json;
- `components(config)`: the networks it can export, each a `ComponentSpec`;
- run time: `conditioning(text, request)` turns prompts into the UNet's extra inputs
  (encoder_hidden_states, and e.g. SDXL's pooled text and time ids), batched [uncond; cond];
  `image_inputs(request)` turns the request's images into UNet inputs where the family conditions on
  them (the x4 upscaler's low-res image, depth2img's depth map, unCLIP's image embedding), and says
  whether `image` is also the start image (img2img) or only conditioning.

Nothing here imports diffusers or transformers at module level: the runtime reads families too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import SdtrtError
from ...runtime.request import InvalidRequest
from ..spec import VAE_FACTOR, ComponentSpec

Config = Mapping[str, Any]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SdtrtError(f"{path} is missing: this is not a complete diffusers model folder.",
                         "point at the folder diffusers' save_pretrained wrote (model_index.json and one folder per component)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SdtrtError(f"{path} is not valid JSON ({e}).", "restore the file from the original checkpoint") from None
    if not isinstance(data, dict):
        raise SdtrtError(f"{path} holds a JSON {type(data).__name__}, not an object.", "restore the file from the original checkpoint")
    return data


def text_encoder_class(index: Mapping[str, Any], encoder: str = "text_encoder") -> str | None:
    """The class model_index.json names for a text encoder (["transformers", "BertModel"] -> "BertModel")."""
    entry = index.get(encoder)
    return str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None else None


class LeaveOut(InvalidRequest):
    """A request parameter a family cannot honour: the fix is to leave it out (on the command line: drop the flag)."""

    def __init__(self, param: str, value: Any, expected: str):
        super().__init__(param, value, expected, None)
        self.fix = f"leave {param} out (None)"
        self.args = (f"{self.problem}\n  fix: {self.fix}",)

    def worded(self, name: str, example: str) -> SdtrtError:
        return SdtrtError(f"{name} {self.value} {self.expected}.", f"drop {name}")


class Family:
    name: str = ""
    title: str = ""  # for messages: "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...] = ()
    text_encoders: tuple[str, ...] = ()  # in the order diffusers runs them

    def matches(self, index: Mapping[str, Any]) -> bool:
        """Whether a folder with this model_index.json is of this family: by default its pipeline class
        (families sharing a pipeline class also look at what else the index names, e.g. the text encoder)."""
        return str(index.get("_class_name", "")) in self.pipeline_classes

    # --- export time --------------------------------------------------------------------------

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def weight_folders(self, config: Config) -> tuple[str, ...]:
        """Subfolders whose weights sdtrt exports (and hashes); ControlNets live in folders of their own."""
        return tuple(dict.fromkeys(spec.weights for spec in self.own_components(config).values()))

    # --- both ---------------------------------------------------------------------------------

    def components(self, config: Config) -> dict[str, ComponentSpec]:
        """Every network the export can hold: the family's own, then one per ControlNet exported with it
        (`config["controlnets"]`: name -> {"source": folder, "config": its config.json}), in which case the
        UNet spec takes their residuals."""
        from ..components import controlnet

        specs = self.own_components(config)
        for name, net in (config.get("controlnets") or {}).items():
            specs[f"controlnet_{name}"] = controlnet.spec(f"controlnet_{name}", net["source"], net["config"], config["unet"],
                                                         **self.added_conditions(config))
        return specs

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        raise NotImplementedError

    def added_conditions(self, config: Config) -> dict[str, Any]:
        """Extra UNet inputs beyond sample, timestep and text (SDXL: pooled text width and sample time ids)."""
        return {}

    def controlnets(self, config: Config) -> list[str]:
        return list(config.get("controlnets") or {})

    def default_components(self, config: Config) -> tuple[str, ...]:
        """What txt2img needs (and every ControlNet exported with it); add vae_encoder for img2img and inpainting."""
        return (*self.present_text_encoders(config), "unet", "vae_decoder", *(f"controlnet_{n}" for n in self.controlnets(config)))

    def present_text_encoders(self, config: Config) -> tuple[str, ...]:
        return tuple(name for name in self.text_encoders if name in config)

    def tokenizer_folder(self, encoder: str) -> str:
        return encoder.replace("text_encoder", "tokenizer")

    def default_size(self, config: Config) -> tuple[int, int]:
        side = int(config["unet"].get("sample_size", 64)) * self.latent_factor(config)
        return side, side

    def latent_factor(self, config: Config) -> int:
        """Pixels per latent cell: the VAE's (diffusers' vae_scale_factor), 8 for SD and SDXL."""
        from ..components.vae import latent_factor

        return latent_factor(config["vae"]) if "vae" in config else VAE_FACTOR

    def latent_channels(self, config: Config) -> int:
        return int(config["vae"].get("latent_channels", 4))

    def unscale_latents(self, config: Config, latents: torch.Tensor) -> torch.Tensor:
        """The VAE decoder's input: latents / scaling_factor (or with latents_mean/std when the VAE has them)."""
        vae = config["vae"]
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            m = torch.tensor(mean, device=latents.device).view(shape)
            s = torch.tensor(std, device=latents.device).view(shape)
            return latents * s / float(vae.get("scaling_factor", 0.18215)) + m
        return latents / float(vae.get("scaling_factor", 0.18215))

    def scale_latents(self, config: Config, latents: torch.Tensor) -> torch.Tensor:
        """A VAE encoder sample -> UNet latents (the inverse of unscale_latents)."""
        vae = config["vae"]
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        scaling = float(vae.get("scaling_factor", 0.18215))
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            m = torch.tensor(mean, device=latents.device).view(shape)
            s = torch.tensor(std, device=latents.device).view(shape)
            return (latents - m) * scaling / s
        return latents * scaling

    # guidance_scale and strength when a request leaves them out: the defaults of the family's diffusers
    # pipeline for that mode (txt2img, img2img, inpaint)
    DEFAULTS = {"txt2img": {"guidance_scale": 7.5}, "img2img": {"guidance_scale": 7.5, "strength": 0.8},
                "inpaint": {"guidance_scale": 7.5, "strength": 1.0}}

    # with a ControlNet, diffusers' ControlNet pipelines' defaults for the mode
    CONTROLNET_DEFAULTS = {"txt2img": {"controlnet_conditioning_scale": 1.0}, "img2img": {"controlnet_conditioning_scale": 0.8},
                           "inpaint": {"controlnet_conditioning_scale": 0.5}}

    def defaults(self, mode: str, controlnet: bool = False) -> dict[str, float]:
        return {**self.DEFAULTS[mode], **(self.CONTROLNET_DEFAULTS[mode] if controlnet else {})}

    def mode(self, request) -> str:
        """Which of DEFAULTS applies: txt2img, img2img (image given) or inpaint (image and mask)."""
        return "txt2img" if request.image is None else ("inpaint" if request.mask_image is not None else "img2img")

    def required_components(self, request, config: Config) -> tuple[str, ...]:
        """What a request needs loaded (checked before any work); by default what txt2img needs."""
        return self.default_components(config)

    # request fields only some families read (the x4 upscaler's and unCLIP's noise_level, depth2img's depth_map)
    IMAGE_FIELDS = ("noise_level", "depth_map")
    image_fields: tuple[str, ...] = ()  # those this family reads

    def check_fields(self, request, config: Config) -> None:
        """Refuse image-conditioning fields this family does not read, instead of ignoring them."""
        for name in self.IMAGE_FIELDS:
            value = getattr(request, name)
            if value is not None and name not in self.image_fields:
                shown = value if isinstance(value, (int, float, str)) else f"<{type(value).__name__}>"
                raise LeaveOut(name, shown, f"is not used by {self.describe(config)} models")

    def adapter_refusal(self, config: Config) -> str | None:
        """Why LoRA / Textual Inversion cannot be used with this family, or None when they can."""
        return None

    def clip_skip_max(self, config: Config) -> int:
        specs = self.components(config)
        return min(specs[e].tensor("skipped_embeddings").dims[1] for e in self.present_text_encoders(config))

    def describe(self, config: Config) -> str:
        """One line for `sdtrt inspect`."""
        return self.title

    # --- run time -----------------------------------------------------------------------------

    def check_request(self, request, config: Config) -> None:
        """Family-specific refusals (e.g. SDXL-only parameters on an SD model)."""

    def conditioning(self, text, request, config: Config) -> dict[str, torch.Tensor]:
        """UNet inputs other than sample and timestep, batched [uncond; cond] when request.cfg and
        repeated per image (prompt-major), exactly as the family's diffusers pipeline builds them."""
        raise NotImplementedError

    conditions_on_image = False  # True where the request's image is conditioning (image_inputs), not only a start image

    def image_inputs(self, request, config: Config):
        """A `runtime.conditioning.ImageInputs` for families conditioned on the request's images (the
        request's images loaded and checked); None (the default) where `image` is only a start image."""
        return None
