"""What the SD 2.x pipelines conditioned on an image share: the x4 upscaler (upscale.py), depth2img (depth.py)
and unCLIP image variations (unclip.py).

Each has SD's text path (one CLIP text encoder, StableDiffusionPipeline's encode_prompt: negative prompts,
clip_skip, guidance batched [uncond; cond]) and adds inputs made from the request's images. What diffusers'
pipelines for them do not have, or sdtrt has not checked against diffusers, is refused before any work,
naming the fix: inpainting masks, ControlNets, LoRA and Textual Inversion.
"""

from __future__ import annotations

from typing import Any

from ..spec import ComponentSpec
from .base import Config, LeaveOut
from .sd import StableDiffusion


class ImageConditioned(StableDiffusion):
    image_parameter = "image"  # what the request's `image` is to this family, for messages
    conditions_on_image = True

    def components(self, config: Config) -> dict[str, ComponentSpec]:
        if config.get("controlnets"):
            from ...errors import SdtrtError

            raise SdtrtError(f"ControlNets cannot be exported with a {self.title} model: diffusers has no ControlNet pipeline for it.",
                             "export the model without ControlNets", cli_fix="export without --controlnet")
        return super().components(config)

    def adapter_refusal(self, config: Config) -> str | None:
        return f"sdtrt has not checked them against diffusers' {self.pipeline_classes[0]}"

    def check_request(self, request, config: Config) -> None:
        super().check_request(request, config)
        if request.mask_image is not None:
            raise LeaveOut("mask_image", "<mask>", f"is for inpainting, which {self.title} models do not do")
        if request.controlnets or request.control_image is not None:
            raise LeaveOut("controlnet", request.controlnet or "<control_image>",
                           f"is not available for {self.title} models (diffusers has no ControlNet pipeline for them)")

    def needs_image(self, request, example: str) -> None:
        from ...errors import SdtrtError

        if request.image is None:
            raise SdtrtError(f"no image was given: a {self.title} model needs {self.image_parameter}.", f"pass image={example!r}",
                             cli_fix=f"pass --image {example}")

    @staticmethod
    def scheduler_config(folder, name: str) -> dict[str, Any]:
        """A scheduler folder's config (the upscaler's low_res_scheduler, unCLIP's image_noising_scheduler), kept in
        sdtrt.json because the runtime noises the images with it."""
        from .base import read_json

        return {k: v for k, v in read_json(folder / name / "scheduler_config.json").items() if not k.startswith("_diffusers")}


def image_count(request, images: int, what: str) -> None:
    """One image for all prompts, or one per prompt (as diffusers pairs them)."""
    from ...runtime.request import InvalidRequest

    prompts = len(request.prompts)
    if images not in (1, prompts):
        raise InvalidRequest("image", f"<{images} images>", f"has {images} images for {prompts} prompts", "[...]",
                             f"one {what} for all prompts, or one per prompt")

