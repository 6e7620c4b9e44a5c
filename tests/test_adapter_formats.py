"""Adapter files -> ΔW per torch parameter (sdtrt.adapters): what each format means, and what is refused.

Oracles: diffusers' own `load_lora_weights` + `fuse_lora(lora_scale=s)` for kohya and peft LoRA, and
`load_textual_inversion` for embeddings; for LoHa and LoKr (which diffusers does not load) the
LyCORIS formulas written out here, independently of sdtrt's code. Every adapter file is generated
here: random low-rank factors under the real key names of the tiny models.

Tolerance for merged weights: both sides multiply the same fp32 factors, in a different order (peft
fuses convs through conv2d), so they agree to float32 rounding: rtol 1e-5, atol 1e-6 on weights of
order 0.1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdtrt.adapters import parse_adapter, parse_embedding, text_widths, weights_for
from sdtrt.errors import SdtrtError
from sdtrt.models import families

SCALE = 0.7
TOL = {"rtol": 1e-5, "atol": 1e-6}


# --- models and files ------------------------------------------------------------------------------


def family_config(folder: Path) -> dict:
    family, index = families.detect(folder)
    return family.read_config(folder, index)


@pytest.fixture(scope="module")
def sd1(tiny_model):
    config = family_config(tiny_model)
    return tiny_model, config, weights_for(config)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_model):
    config = family_config(tiny_sdxl_model)
    return tiny_sdxl_model, config, weights_for(config)


def factors(shape: tuple[int, ...], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a weight: Linear [r, in], [out, r]; conv [r, in, k, k] (a k×k conv), [out, r, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=g) * 0.1
    up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=g) * 0.1
    return down, up


def kohya_file(path: Path, layers: list[tuple[str, str, str, int, float | None]], weights) -> Path:
    """layers: (kohya name, component, torch parameter it must land on, rank, alpha or None)."""
    sd = {}
    for i, (name, component, param, rank, alpha) in enumerate(layers):
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = factors(weights[component][param], rank, i)
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return path


def peft_file(path: Path, layers: list[tuple[str, str, int]], weights, module_suffix: str = "", metadata: dict | None = None) -> Path:
    """layers: (component, torch parameter, rank) -> <component>.<module><module_suffix>.lora_A/B.weight."""
    sd = {}
    for i, (component, param, rank) in enumerate(layers):
        key = f"{component}.{param.removesuffix('.weight')}{module_suffix}"
        down, up = factors(weights[component][param], rank, 100 + i)
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
    meta = {"format": "pt"} | ({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})
    save_file(sd, str(path), metadata=meta)
    return path


def diffusers_fused(model_dir: Path, lora: Path, scale: float) -> tuple[dict, dict]:
    """(base, merged) state dicts {component: {param: tensor}} of diffusers' pipeline before and after
    load_lora_weights + fuse_lora(lora_scale=scale)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(model_dir))
    names = [n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    base = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in names}
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=scale)
    merged = {n: {k.replace(".base_layer", ""): v for k, v in getattr(pipe, n).state_dict().items() if "lora_" not in k}
              for n in names}
    return base, merged


def assert_merges_like_diffusers(model_dir: Path, lora: Path, weights, expected_targets: set | None = None, **parse) -> None:
    """W + scale·ΔW from sdtrt equals diffusers' fused weights for every parameter of every component,
    and exactly the parameters sdtrt targets are the ones diffusers changes."""
    adapter = parse_adapter(lora, weights, **parse)
    if expected_targets is not None:
        assert set(adapter.targets) == expected_targets
    base, merged = diffusers_fused(model_dir, lora, SCALE)
    deltas = adapter.deltas(SCALE)
    changed = {(c, k) for c in base for k in base[c] if not torch.equal(base[c][k], merged[c][k])}
    assert changed == set(adapter.targets)
    for (component, param), delta in deltas.items():
        torch.testing.assert_close(base[component][param] + delta, merged[component][param], **TOL)


# --- kohya and peft LoRA against diffusers ------------------------------------------------------------

SD1_KOHYA = [  # kohya-ss names for SD 1.x are diffusers' module paths with "_" for "."
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", 4, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight", 4, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj", "unet",
     "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", 4, 2.0),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in.weight", 4, 2.0),  # 1×1 conv
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1.weight", 4, 1.0),  # 3×3 conv (LoCon)
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", "unet", "down_blocks.0.resnets.0.time_emb_proj.weight", 4, 2.0),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", "unet",
     "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", 4, 2.0),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v", "unet",
     "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.weight", 2, 2.0),  # another rank
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
     "text_model.encoder.layers.0.self_attn.q_proj.weight", 4, 2.0),
    ("lora_te_text_model_encoder_layers_2_mlp_fc1", "text_encoder", "text_model.encoder.layers.2.mlp.fc1.weight", 4, 2.0),
    # with an out_proj: diffusers' key conversion silently drops q/k/v of a text encoder LoRA without one
    ("lora_te_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder", "text_model.encoder.layers.1.self_attn.out_proj.weight", 4, 2.0),
]

SDXL_KOHYA = [  # sd-scripts trains SDXL on the SGM UNet: its module paths, with "_" for "."
    ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1.weight", 4, 2.0),
    ("lora_unet_input_blocks_1_0_emb_layers_1", "unet", "down_blocks.0.resnets.0.time_emb_proj.weight", 4, 2.0),
    ("lora_unet_input_blocks_2_0_op", "unet", "down_blocks.0.downsamplers.0.conv.weight", 4, 2.0),
    ("lora_unet_input_blocks_3_0_skip_connection", "unet", "down_blocks.1.resnets.0.conv_shortcut.weight", 4, 2.0),
    ("lora_unet_input_blocks_3_1_proj_in", "unet", "down_blocks.1.attentions.0.proj_in.weight", 4, 2.0),
    ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q", "unet",
     "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight", 4, 2.0),
    ("lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0", "unet",
     "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight", 4, 2.0),
    ("lora_unet_middle_block_2_out_layers_3", "unet", "mid_block.resnets.1.conv2.weight", 4, 2.0),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj", "unet",
     "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", 4, 2.0),
    ("lora_unet_output_blocks_1_2_conv", "unet", "up_blocks.0.upsamplers.0.conv.weight", 4, 2.0),
    ("lora_unet_output_blocks_2_0_in_layers_2", "unet", "up_blocks.1.resnets.0.conv1.weight", 4, 2.0),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
     "text_model.encoder.layers.0.self_attn.q_proj.weight", 4, 2.0),
    ("lora_te1_text_model_encoder_layers_2_self_attn_out_proj", "text_encoder",
     "text_model.encoder.layers.2.self_attn.out_proj.weight", 4, 2.0),
    ("lora_te2_text_model_encoder_layers_3_mlp_fc2", "text_encoder_2", "text_model.encoder.layers.3.mlp.fc2.weight", 4, 2.0),
    ("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder_2",
     "text_model.encoder.layers.1.self_attn.out_proj.weight", 4, 2.0),
]

SD1_PEFT = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", 4),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight", 4),
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight", 4),
    ("unet", "down_blocks.0.resnets.0.conv2.weight", 4),
    ("text_encoder", "text_model.encoder.layers.1.self_attn.k_proj.weight", 4),
    ("text_encoder", "text_model.encoder.layers.0.mlp.fc2.weight", 4),
]

SDXL_PEFT = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", 4),
    ("unet", "mid_block.attentions.0.transformer_blocks.1.attn1.to_v.weight", 4),
    ("text_encoder", "text_model.encoder.layers.3.self_attn.v_proj.weight", 4),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj.weight", 4),
    ("text_encoder_2", "text_model.encoder.layers.2.mlp.fc1.weight", 4),
]


def test_kohya_sd1_lora_with_conv_and_text_encoder_layers_merges_like_diffusers(sd1, tmp_path):
    folder, _, weights = sd1
    lora = kohya_file(tmp_path / "kohya.safetensors", SD1_KOHYA, weights)
    assert_merges_like_diffusers(folder, lora, weights, {(c, p) for _, c, p, _, _ in SD1_KOHYA})


def test_kohya_sdxl_lora_with_sgm_names_and_both_text_encoders_merges_like_diffusers(sdxl, tmp_path):
    folder, _, weights = sdxl
    lora = kohya_file(tmp_path / "kohya_sdxl.safetensors", SDXL_KOHYA, weights)
    assert_merges_like_diffusers(folder, lora, weights, {(c, p) for _, c, p, _, _ in SDXL_KOHYA})


def test_peft_sd1_lora_merges_like_diffusers(sd1, tmp_path):
    folder, _, weights = sd1
    lora = peft_file(tmp_path / "pytorch_lora_weights.safetensors", SD1_PEFT, weights)
    assert_merges_like_diffusers(folder, lora, weights, {(c, p) for c, p, _ in SD1_PEFT})


def test_peft_sdxl_lora_on_both_text_encoders_merges_like_diffusers(sdxl, tmp_path):
    folder, _, weights = sdxl
    lora = peft_file(tmp_path / "pytorch_lora_weights.safetensors", SDXL_PEFT, weights)
    assert_merges_like_diffusers(folder, lora, weights, {(c, p) for c, p, _ in SDXL_PEFT})


def test_peft_alpha_from_diffusers_metadata_merges_like_diffusers(sd1, tmp_path):
    folder, _, weights = sd1
    modules = {c: [p.removesuffix(".weight") for c2, p, _ in SD1_PEFT if c2 == c] for c in ("unet", "text_encoder")}
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_out.0": 2}, "unet.rank_pattern": {},
            "unet.target_modules": modules["unet"], "text_encoder.r": 4, "text_encoder.lora_alpha": 1,
            "text_encoder.alpha_pattern": {}, "text_encoder.rank_pattern": {}, "text_encoder.target_modules": modules["text_encoder"]}
    lora = peft_file(tmp_path / "meta.safetensors", SD1_PEFT, weights, metadata=meta)
    assert_merges_like_diffusers(folder, lora, weights)
    adapter = parse_adapter(lora, weights)
    assert adapter.layers["unet", SD1_PEFT[0][1]].scale == 2.0  # lora_alpha 8 / rank 4
    assert adapter.layers["unet", SD1_PEFT[1][1]].scale == 0.5  # alpha_pattern: 2 / 4
    assert adapter.layers["text_encoder", SD1_PEFT[4][1]].scale == 0.25


def test_peft_base_layer_and_older_diffusers_key_forms_give_the_same_deltas(sd1, tmp_path):
    """diffusers itself refuses `.base_layer` in a LoRA key (NoMatchingPeftModuleError), so these forms
    are checked against the plain peft file's deltas, which the test above checks against diffusers."""
    folder, _, weights = sd1
    plain = parse_adapter(peft_file(tmp_path / "plain.safetensors", SD1_PEFT, weights), weights)
    based = parse_adapter(peft_file(tmp_path / "base.safetensors", SD1_PEFT, weights, module_suffix=".base_layer"), weights)
    assert based.targets == plain.targets
    for t in plain.targets:
        assert torch.equal(based.delta(t, SCALE), plain.delta(t, SCALE))
    # diffusers before peft: unet attention processors (to_q_lora / to_out_lora), text encoder
    # to_q_lora and lora_linear_layer, and .lora.down/.lora.up
    old = {}
    q, out = SD1_PEFT[0][1], SD1_PEFT[1][1]
    k, fc2 = SD1_PEFT[4][1], SD1_PEFT[5][1]
    old_names = {("unet", q): "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
                 ("unet", out): "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
                 ("text_encoder", k): "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora",
                 ("text_encoder", fc2): "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer",
                 ("unet", SD1_PEFT[3][1]): "unet.down_blocks.0.resnets.0.conv2.lora"}
    for i, (component, param, rank) in enumerate(SD1_PEFT):
        if (component, param) in old_names:
            old[f"{old_names[component, param]}.down.weight"], old[f"{old_names[component, param]}.up.weight"] = \
                factors(weights[component][param], rank, 100 + i)
    save_file(old, str(tmp_path / "old.safetensors"))
    older = parse_adapter(tmp_path / "old.safetensors", weights)
    assert set(older.targets) == set(old_names)
    for t in older.targets:
        assert torch.equal(older.delta(t, SCALE), plain.delta(t, SCALE))


def test_peft_alpha_tensor_scales_by_alpha_over_rank(sd1, tmp_path):
    _, _, weights = sd1
    param = SD1_PEFT[0][1]
    down, up = factors(weights["unet"][param], 4, 0)
    key = "unet." + param.removesuffix(".weight")
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": torch.tensor(3.0)}, str(tmp_path / "a.safetensors"))
    adapter = parse_adapter(tmp_path / "a.safetensors", weights)
    torch.testing.assert_close(adapter.delta(("unet", param)), 3.0 / 4 * up @ down)


def test_sgm_names_agree_with_diffusers_converter_on_every_sdxl_unet_layer():
    """Every UNet Linear/Conv of SDXL base (full size, on the meta device) and tiny-sdxl: the SGM name
    sdtrt accepts is one that diffusers' kohya converter maps back to the same module."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from sdtrt.adapters.names import sgm_names
    from sdtrt.models.presets import get_preset

    for preset in ("sdxl", "tiny-sdxl"):
        unet = get_preset(preset).unet
        modules = [p.removesuffix(".weight") for p in weights_for({"unet": unet})["unet"]]
        sgm = sgm_names(modules)
        assert len(sgm) == len(modules)
        for module, name in sgm.items():
            kohya = "lora_unet_" + name.replace(".", "_")
            sd = {f"{kohya}.lora_down.weight": torch.zeros(1), f"{kohya}.lora_up.weight": torch.zeros(1)}
            sd = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=unet["layers_per_block"]))
            sd = convert_unet_state_dict_to_peft(_convert_non_diffusers_lora_to_diffusers(sd)[0])
            down = next(k for k in sd if k.endswith(".lora_A.weight"))
            assert down == f"unet.{module}.lora_A.weight", (module, name)


def test_kohya_alpha_is_per_layer_and_missing_or_zero_means_alpha_equals_rank(sd1, tmp_path):
    """Each layer's own alpha / rank; no alpha (or 0) is a scale of 1, as sd-scripts, A1111 and ComfyUI
    read it. (diffusers gives an attention layer whose alpha differs from the file's most common one,
    or that has none, that most common alpha instead: the comparisons above keep attention alphas equal.)"""
    _, _, weights = sd1
    sd, expected = {}, {}
    for i, alpha in enumerate((None, 0.0, 3.0, 2.0)):
        name, component, param, _, _ = SD1_KOHYA[i]
        down, up = factors(weights[component][param], 4, i)
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        expected[component, param] = (alpha / 4 if alpha else 1.0) * (up.flatten(1) @ down.flatten(1)).reshape(weights[component][param])
    save_file(sd, str(tmp_path / "alphas.safetensors"))
    adapter = parse_adapter(tmp_path / "alphas.safetensors", weights)
    for target, delta in expected.items():
        torch.testing.assert_close(adapter.delta(target), delta)


def test_pickle_lora_loads_only_with_opt_in_and_gives_the_same_deltas(sd1, tmp_path):
    _, _, weights = sd1
    safe = kohya_file(tmp_path / "k.safetensors", SD1_KOHYA, weights)
    from safetensors.torch import load_file

    torch.save(load_file(str(safe)), tmp_path / "k.pt")
    with pytest.raises(SdtrtError, match="allow_pickle=True") as e:
        parse_adapter(tmp_path / "k.pt", weights)
    assert "--allow-pickle" in e.value.cli_fix
    pickled = parse_adapter(tmp_path / "k.pt", weights, allow_pickle=True)
    reference = parse_adapter(safe, weights)
    assert pickled.targets == reference.targets
    assert all(torch.equal(pickled.delta(t), reference.delta(t)) for t in reference.targets)


def test_deltas_are_fp32_shaped_like_the_parameter_and_linear_in_scale(sd1, tmp_path):
    _, _, weights = sd1
    sd = {}
    for name, component, param, rank, _ in SD1_KOHYA:
        down, up = factors(weights[component][param], rank, 0)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down.half(), up.half()
    save_file(sd, str(tmp_path / "half.safetensors"))
    adapter = parse_adapter(tmp_path / "half.safetensors", weights)
    assert adapter.components == ("unet", "text_encoder")
    for target, delta in adapter.deltas(1.0).items():
        assert delta.dtype == torch.float32 and tuple(delta.shape) == weights[target[0]][target[1]]
        torch.testing.assert_close(adapter.delta(target, -0.5), -0.5 * delta)
    import hashlib

    assert adapter.sha256 == hashlib.sha256((tmp_path / "half.safetensors").read_bytes()).hexdigest()


# --- LyCORIS: LoHa and LoKr against the formulas -------------------------------------------------------

LINEAR = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight")
CONV = ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight")  # [32, 32, 3, 3]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_loha_delta_is_the_hadamard_product_of_two_low_rank_products(sd1, tmp_path):
    _, _, weights = sd1
    sd, expected = {}, {}
    for (name, param), alpha, rank in ((LINEAR, 2.0, 4), (CONV, 3.0, 6)):
        shape = weights["unet"][param]
        out, fan_in = shape[0], math.prod(shape[1:])
        w1a, w1b, w2a, w2b = randn(out, rank, seed=1), randn(rank, fan_in, seed=2), randn(out, rank, seed=3), randn(rank, fan_in, seed=4)
        sd |= {f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b,
               f"{name}.alpha": torch.tensor(alpha)}
        expected["unet", param] = ((w1a @ w1b) * (w2a @ w2b) * (alpha / rank)).reshape(shape)
    save_file(sd, str(tmp_path / "loha.safetensors"))
    adapter = parse_adapter(tmp_path / "loha.safetensors", weights)
    assert set(adapter.targets) == set(expected)
    for target, delta in adapter.deltas(SCALE).items():
        torch.testing.assert_close(delta, SCALE * expected[target], **TOL)


def test_lokr_delta_is_the_kronecker_product_in_whole_and_factored_forms(sd1, tmp_path):
    _, _, weights = sd1
    linear, conv = weights["unet"][LINEAR[1]], weights["unet"][CONV[1]]  # [32, 32], [32, 32, 3, 3]
    w1 = randn(4, 8, seed=1)
    w2a, w2b = randn(8, 2, seed=2), randn(2, 4, seed=3)  # w2 = [8, 4], rank 2
    w1a, w1b = randn(4, 3, seed=4), randn(3, 2, seed=5)  # w1 = [4, 2], rank 3
    w2conv = randn(8, 16, 3, 3, seed=6)
    sd = {f"{LINEAR[0]}.lokr_w1": w1, f"{LINEAR[0]}.lokr_w2_a": w2a, f"{LINEAR[0]}.lokr_w2_b": w2b, f"{LINEAR[0]}.alpha": torch.tensor(1.0),
          f"{CONV[0]}.lokr_w1_a": w1a, f"{CONV[0]}.lokr_w1_b": w1b, f"{CONV[0]}.lokr_w2": w2conv, f"{CONV[0]}.alpha": torch.tensor(6.0)}
    save_file(sd, str(tmp_path / "lokr.safetensors"))
    adapter = parse_adapter(tmp_path / "lokr.safetensors", weights)
    # out index i·c + p, in index j·d + q: ΔW[i·c+p, j·d+q, :, :] = w1[i, j] · w2[p, q, :, :]
    w1c = w1a @ w1b
    conv_delta = torch.einsum("ij,pqkl->ipjqkl", w1c, w2conv).reshape(conv) * (6.0 / 3)
    torch.testing.assert_close(adapter.delta(("unet", CONV[1])), conv_delta, **TOL)
    torch.testing.assert_close(adapter.delta(("unet", LINEAR[1])), torch.kron(w1, w2a @ w2b).reshape(linear) * (1.0 / 2), **TOL)
    # both factors whole: no rank, so alpha does not scale
    save_file({f"{LINEAR[0]}.lokr_w1": w1, f"{LINEAR[0]}.lokr_w2": w2a @ w2b, f"{LINEAR[0]}.alpha": torch.tensor(5.0)}, str(tmp_path / "whole.safetensors"))
    whole = parse_adapter(tmp_path / "whole.safetensors", weights)
    torch.testing.assert_close(whole.delta(("unet", LINEAR[1])), torch.kron(w1, w2a @ w2b), **TOL)


def test_locon_on_a_3x3_conv_is_up_times_down_over_the_flattened_kernel(sd1, tmp_path):
    _, _, weights = sd1
    shape = weights["unet"][CONV[1]]
    down, up = randn(8, 32, 3, 3, seed=1), randn(32, 8, 1, 1, seed=2)
    save_file({f"{CONV[0]}.lora_down.weight": down, f"{CONV[0]}.lora_up.weight": up, f"{CONV[0]}.alpha": torch.tensor(4.0)},
              str(tmp_path / "locon.safetensors"))
    delta = parse_adapter(tmp_path / "locon.safetensors", weights).delta(("unet", CONV[1]))
    # a 1×1 conv after a 3×3 conv is one 3×3 conv: ΔW[o, i, k, l] = Σ_r up[o, r] · down[r, i, k, l]
    torch.testing.assert_close(delta, torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * (4.0 / 8), **TOL)
    assert delta.shape == shape


# --- refusals -------------------------------------------------------------------------------------------


def refused(path: Path, weights, *words: str, **kw) -> SdtrtError:
    with pytest.raises(SdtrtError) as e:
        parse_adapter(path, weights, **kw)
    message = str(e.value)
    for w in words:
        assert w in message, (w, message)
    assert e.value.fix
    return e.value


def test_sd1_lora_on_sdxl_is_refused_naming_the_unmatched_keys(sd1, sdxl, tmp_path):
    lora = kohya_file(tmp_path / "sd1.safetensors", SD1_KOHYA, sd1[2])
    e = refused(lora, sdxl[2], "match no weight", "lora_unet_down_blocks_0_attentions_0", "another architecture")
    assert f"of its {3 * len(SD1_KOHYA)} keys" in str(e)


def test_unknown_keys_are_refused_with_their_count(sd1, tmp_path):
    _, _, weights = sd1
    sd = {f"model.diffusion_model.layer_{i}.weight": torch.zeros(2, 2) for i in range(8)}
    save_file(sd, str(tmp_path / "ckpt.safetensors"))
    refused(tmp_path / "ckpt.safetensors", weights, "8 of its 8 keys match no weight", "model.diffusion_model.layer_0.weight", "(and 3 more)")


def test_dora_is_refused_in_kohya_peft_and_metadata_forms(sd1, tmp_path):
    _, _, weights = sd1
    name, component, param, rank, _ = SD1_KOHYA[0]
    down, up = factors(weights[component][param], rank, 0)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.dora_scale": torch.ones(1, down.shape[1])},
              str(tmp_path / "dora.safetensors"))
    refused(tmp_path / "dora.safetensors", weights, "DoRA", f"{name}.dora_scale")
    key = "unet." + param.removesuffix(".weight")
    save_file({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.lora_magnitude_vector": torch.ones(up.shape[0])},
              str(tmp_path / "peft_dora.safetensors"))
    refused(tmp_path / "peft_dora.safetensors", weights, "DoRA")
    peft_file(tmp_path / "meta_dora.safetensors", SD1_PEFT, weights, metadata={"unet.use_dora": True, "unet.r": 4})
    refused(tmp_path / "meta_dora.safetensors", weights, "DoRA", "use_dora")


def test_tucker_cores_and_unknown_parts_are_refused(sd1, tmp_path):
    _, _, weights = sd1
    name, param = CONV
    save_file({f"{name}.lora_down.weight": randn(4, 32, 3, 3), f"{name}.lora_up.weight": randn(32, 4, 1, 1),
               f"{name}.lora_mid.weight": randn(4, 4, 3, 3)}, str(tmp_path / "tucker.safetensors"))
    refused(tmp_path / "tucker.safetensors", weights, "lora_mid", "Tucker")
    save_file({f"{name}.hada_w1_a": randn(32, 4), f"{name}.hada_w1_b": randn(4, 32), f"{name}.hada_w2_a": randn(32, 4),
               f"{name}.hada_w2_b": randn(4, 32), f"{name}.hada_t1": randn(4, 4, 3, 3), f"{name}.hada_t2": randn(4, 4, 3, 3)},
              str(tmp_path / "loha_tucker.safetensors"))
    refused(tmp_path / "loha_tucker.safetensors", weights, "hada_t1", "Tucker")
    save_file({f"{name}.oft_blocks": randn(4, 8, 8)}, str(tmp_path / "oft.safetensors"))
    refused(tmp_path / "oft.safetensors", weights, "unknown tensor oft_blocks")


def test_nan_weights_are_refused_naming_the_tensor(sd1, tmp_path):
    _, _, weights = sd1
    lora = kohya_file(tmp_path / "ok.safetensors", SD1_KOHYA, weights)
    from safetensors.torch import load_file

    sd = load_file(str(lora))
    key = f"{SD1_KOHYA[3][0]}.lora_up.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    refused(tmp_path / "nan.safetensors", weights, "NaN", key)


def test_rank_and_shape_mismatches_are_refused(sd1, sdxl, tmp_path):
    _, _, weights = sd1
    name, component, param, _, _ = SD1_KOHYA[0]  # to_q: [32, 32]
    save_file({f"{name}.lora_down.weight": randn(4, 32), f"{name}.lora_up.weight": randn(32, 2)}, str(tmp_path / "rank.safetensors"))
    refused(tmp_path / "rank.safetensors", weights, "rank mismatch", name)
    save_file({f"{name}.lora_down.weight": randn(4, 64), f"{name}.lora_up.weight": randn(64, 4)}, str(tmp_path / "wide.safetensors"))
    refused(tmp_path / "wide.safetensors", weights, "[64, 64]", "[32, 32]", name)
    save_file({f"{name}.lora_down.weight": randn(4, 32)}, str(tmp_path / "half.safetensors"))
    refused(tmp_path / "half.safetensors", weights, "lora_up.weight is missing")
    # a tiny-sd1 peft file on tiny-sdxl whose names exist in both but whose widths differ
    key = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    save_file({f"{key}.lora_A.weight": randn(4, 32), f"{key}.lora_B.weight": randn(40, 4)}, str(tmp_path / "fc1.safetensors"))
    refused(tmp_path / "fc1.safetensors", sdxl[2], "[40, 32]", "[37, 32]")


def test_two_entries_for_one_weight_are_refused(sd1, tmp_path):
    _, _, weights = sd1
    name, component, param, _, _ = SD1_KOHYA[0]
    down, up = factors(weights[component][param], 4, 0)
    key = "unet." + param.removesuffix(".weight")
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{key}.lora_A.weight": down.clone(), f"{key}.lora_B.weight": up.clone()},
              str(tmp_path / "twice.safetensors"))
    refused(tmp_path / "twice.safetensors", weights, "both set")


def test_missing_file_and_unknown_suffix_are_refused(sd1, tmp_path):
    _, _, weights = sd1
    refused(tmp_path / "nope.safetensors", weights, "nope.safetensors", "missing")
    (tmp_path / "x.gguf").write_bytes(b"0")
    refused(tmp_path / "x.gguf", weights, ".gguf")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    refused(tmp_path / "broken.safetensors", weights, "not a readable safetensors")


def test_an_embedding_passed_as_a_lora_says_so(sd1, tmp_path):
    save_file({"emb_params": randn(2, 32)}, str(tmp_path / "emb.safetensors"))
    refused(tmp_path / "emb.safetensors", sd1[2], "match no weight", "textual inversion")
    torch.save({"string_to_param": {"*": randn(2, 32)}, "name": "x"}, tmp_path / "a1111.pt")
    refused(tmp_path / "a1111.pt", sd1[2], "textual inversion", allow_pickle=True)


# --- Textual Inversion -------------------------------------------------------------------------------


def diffusers_embedding_rows(model_dir: Path, loads: list[dict]) -> list[tuple[list[int], torch.Tensor]]:
    """For each load_textual_inversion(**kwargs) on a fresh pipeline: (ids of the new tokens, their embedding rows)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(model_dir))
    out = []
    for kw in loads:
        encoder = kw.get("text_encoder", pipe.text_encoder)
        tokenizer = kw.get("tokenizer", pipe.tokenizer)
        before = len(tokenizer)
        pipe.load_textual_inversion(**kw)
        ids = list(range(before, len(tokenizer)))
        out.append((tokenizer.convert_ids_to_tokens(ids), encoder.get_input_embeddings().weight[ids].detach().clone()))
    return out


def test_embedding_layouts_parse_to_the_rows_and_tokens_diffusers_adds(sd1, tmp_path):
    folder, config, _ = sd1
    widths = text_widths(config)
    assert widths == {"text_encoder": 32}
    three, one = randn(3, 32, seed=1), randn(32, seed=2)
    save_file({"<cat-toy>": one}, str(tmp_path / "learned_embeds.safetensors"))  # diffusers: the key is the token
    torch.save({"<dog>": three}, tmp_path / "learned_embeds.bin")
    torch.save({"string_to_param": {"*": three}, "string_to_token": {"*": 265}, "name": "style", "step": 3000}, tmp_path / "zzstyle.pt")
    save_file({"emb_params": three}, str(tmp_path / "kohya-emb.safetensors"))

    diffusers_one = parse_embedding(tmp_path / "learned_embeds.safetensors", widths)
    diffusers_three = parse_embedding(tmp_path / "learned_embeds.bin", widths, allow_pickle=True)
    a1111 = parse_embedding(tmp_path / "zzstyle.pt", widths, allow_pickle=True)  # the file name is the token, as in A1111
    kohya = parse_embedding(tmp_path / "kohya-emb.safetensors", widths, token="<kohya>")
    assert (diffusers_one.tokens, diffusers_three.tokens) == (["<cat-toy>"], ["<dog>", "<dog>_1", "<dog>_2"])
    assert a1111.tokens == ["zzstyle", "zzstyle_1", "zzstyle_2"] and kohya.tokens == ["<kohya>", "<kohya>_1", "<kohya>_2"]
    torch.save(three, tmp_path / "bare.pt")  # a bare [n, D] tensor: the file name is the token
    bare = parse_embedding(tmp_path / "bare.pt", widths, allow_pickle=True)
    assert bare.tokens == ["bare", "bare_1", "bare_2"] and torch.equal(bare.vectors["text_encoder"], three)

    reference = diffusers_embedding_rows(folder, [
        {"pretrained_model_name_or_path": str(tmp_path / "learned_embeds.safetensors")},
        {"pretrained_model_name_or_path": str(tmp_path / "learned_embeds.bin")},
        {"pretrained_model_name_or_path": str(tmp_path / "zzstyle.pt"), "token": "zzstyle"},
        {"pretrained_model_name_or_path": three, "token": "<kohya>"},  # diffusers has no emb_params reader: the tensor itself
    ])
    for ours, (tokens, rows) in zip((diffusers_one, diffusers_three, a1111, kohya), reference):
        assert ours.tokens == tokens
        assert list(ours.vectors) == ["text_encoder"]
        torch.testing.assert_close(ours.vectors["text_encoder"], rows, rtol=0, atol=0)


def test_sdxl_embedding_fills_both_encoders_like_diffusers(sdxl, tmp_path):
    folder, config, _ = sdxl
    clip_l, clip_g = randn(2, 32, seed=1), randn(2, 32, seed=2)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl-style.safetensors"))
    emb = parse_embedding(tmp_path / "xl-style.safetensors", text_widths(config))
    assert emb.tokens == ["xl-style", "xl-style_1"]
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    for encoder, tokenizer, vectors in ((pipe.text_encoder, pipe.tokenizer, clip_l), (pipe.text_encoder_2, pipe.tokenizer_2, clip_g)):
        before = len(tokenizer)
        pipe.load_textual_inversion(vectors, token=emb.tokens, text_encoder=encoder, tokenizer=tokenizer)
        assert tokenizer.convert_tokens_to_ids(emb.tokens) == list(range(before, before + 2))
        rows = encoder.get_input_embeddings().weight[before:].detach()
        component = "text_encoder" if encoder is pipe.text_encoder else "text_encoder_2"
        torch.testing.assert_close(emb.vectors[component], rows, rtol=0, atol=0)
    # a refiner has only the second encoder: clip_g alone is used
    refiner = parse_embedding(tmp_path / "xl-style.safetensors", {"text_encoder_2": 32})
    assert list(refiner.vectors) == ["text_encoder_2"]


def test_embedding_refusals_name_the_encoder_and_the_fix(sd1, sdxl, tmp_path):
    torch.save({"string_to_param": {"*": randn(2, 32)}, "name": "x"}, tmp_path / "x.pt")
    with pytest.raises(SdtrtError, match="allow_pickle=True"):
        parse_embedding(tmp_path / "x.pt", text_widths(sd1[1]))
    save_file({"emb_params": randn(2, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(SdtrtError, match=r"768 wide, but this model's text_encoder takes 32"):
        parse_embedding(tmp_path / "wide.safetensors", text_widths(sd1[1]))
    save_file({"emb_params": randn(2, 32)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(SdtrtError, match="no vectors for this model's text_encoder_2"):
        parse_embedding(tmp_path / "sd1.safetensors", text_widths(sdxl[1]))
    save_file({"clip_l": randn(2, 32), "clip_g": randn(2, 64)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(SdtrtError, match="text_encoder_2 are 64 wide"):
        parse_embedding(tmp_path / "xl.safetensors", {"text_encoder": 32, "text_encoder_2": 32})
    save_file({"a": randn(2, 32), "b": randn(2, 32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(SdtrtError, match="not a textual inversion layout"):
        parse_embedding(tmp_path / "two.safetensors", text_widths(sd1[1]))
    save_file({"emb_params": torch.full((2, 32), float("inf"))}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(SdtrtError, match="NaN or infinite"):
        parse_embedding(tmp_path / "inf.safetensors", text_widths(sd1[1]))
    with pytest.raises(SdtrtError, match="missing"):
        parse_embedding(tmp_path / "none.safetensors", text_widths(sd1[1]))
