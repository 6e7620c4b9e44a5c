"""Schedulers give diffusers' numbers: timesteps, init_noise_sigma, scale_model_input and every step,
for the same config and generator, within 1e-6 relative (fp32).

Method (as diffusers' own scheduler tests do): drive both with a synthetic model
(0.3 * x_in * t/1000 + 0.5 * fixed noise), feeding both the same sample and model output at every
step, so each step is compared on identical inputs and history.
"""

from __future__ import annotations


import diffusers
import pytest
import torch

from sdtrt.errors import SdtrtError
from sdtrt.runtime import schedulers as S

TOL = 1e-6
SD_CONFIG = {  # scheduler_config.json of the SD 1.x checkpoints
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "trained_betas": None,
}
ALL = list(S.SCHEDULERS)
STEPS = [1, 2, 3, 7, 20]
VARIANTS = [{}, {"timestep_spacing": "trailing"}, {"timestep_spacing": "linspace"}, {"prediction_type": "v_prediction"}]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))


def _reference(name: str, config: dict, overrides: dict):
    cls = getattr(diffusers, S.diffusers_class_name(name))
    return cls.from_config({**config, **S.implied_overrides(name), **overrides})


def _dummy_model(x_in: torch.Tensor, t: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    return 0.3 * x_in * (t.float() / 1000) + 0.5 * fixed


def compare(name: str, n: int, overrides: dict, config: dict = SD_CONFIG, step_kwargs: dict | None = None,
            model=_dummy_model, reference=None) -> dict[str, float]:
    """Worst relative error of each quantity over a whole trajectory. `reference` (optional) receives the
    diffusers scheduler before the first step (to spy on it)."""
    step_kwargs = step_kwargs or {}
    ref = _reference(name, config, {k: v for k, v in overrides.items() if k not in step_kwargs})
    if reference is not None:
        reference(ref)
    ours = S.make(name, config, **overrides)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert ours.timesteps.shape == ref.timesteps.shape
    errors = {"timesteps": _rel(ours.timesteps, ref.timesteps), "init_noise_sigma": _rel(ours.init_noise_sigma, ref.init_noise_sigma),
              "scale_model_input": 0.0, "step": 0.0}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    fixed = torch.randn(2, 4, 8, 8, generator=g)
    gen_ref, gen_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    if "generator" in ref.step.__code__.co_varnames:
        step_kwargs = {**step_kwargs, "generator": gen_ref}
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        errors["scale_model_input"] = max(errors["scale_model_input"], _rel(ours.scale_model_input(x, t), x_in))
        model_output = model(x_in, t, fixed)
        expected = ref.step(model_output, t, x, return_dict=False, **step_kwargs)[0]
        errors["step"] = max(errors["step"], _rel(ours.step(model_output, t, x, generator=gen_ours), expected))
        x = expected
    return errors


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "sd-config")
@pytest.mark.parametrize("name", ALL)
def test_scheduler_matches_diffusers(name, overrides):
    for n in STEPS:
        if name == "lcm" and overrides.get("prediction_type") == "v_prediction" and n > 8:
            continue
        errors = compare(name, n, overrides)
        assert max(errors.values()) <= TOL, (n, errors)


@pytest.mark.parametrize("name,overrides,step_kwargs", [
    ("ddim", {"eta": 1.0}, {"eta": 1.0}),  # stochastic DDIM: noise from the generator, same order
    ("ddim", {"set_alpha_to_one": True, "clip_sample": True}, {}),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {}),
    ("euler", {"s_churn": 1.0}, {"s_churn": 1.0}),
    ("euler", {"final_sigmas_type": "sigma_min"}, {}),
    ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
    ("euler_karras", {"sigma_min": 0.1, "sigma_max": 10.0}, {}),
    ("heun", {"use_karras_sigmas": True}, {}),
    ("dpmpp_2m", {"solver_type": "heun"}, {}),
    ("dpmpp_2m", {"lower_order_final": False}, {}),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, {}),
    ("dpmpp_2m", {"solver_order": 1}, {}),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, {}),
    ("dpmpp_2m_karras", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
    ("unipc", {"use_karras_sigmas": True}, {}),
    ("unipc", {"solver_type": "bh1"}, {}),
    ("unipc", {"solver_order": 3}, {}),
    ("unipc", {"disable_corrector": [0, 2]}, {}),
    ("unipc", {"lower_order_final": False}, {}),
    ("lcm", {"original_inference_steps": 20}, {}),
    ("lms", {"order": 2}, {"order": 2}),
])
def test_config_fields_that_change_results_are_honoured(name, overrides, step_kwargs):
    for n in (1, 4, 15):
        errors = compare(name, n, overrides, step_kwargs=step_kwargs)
        assert max(errors.values()) <= TOL, (n, errors)


# --- dynamic thresholding (Imagen) -----------------------------------------------------------------

# (dynamic_thresholding_ratio, sample_max_value): diffusers' defaults (s = 1: plain clipping to [-1, 1]),
# and two where s moves between 1 and the maximum from step to step
THRESHOLDS = [(0.995, 1.0), (0.9, 2.5), (0.6, 4.0)]


def _sample_like_model(x_in: torch.Tensor, t: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Outputs of a sample's magnitude (|x0| reaches tens at high noise), so the threshold clips at every
    ratio above: the diffusers' oracle's own numbers show it (see the spy below)."""
    return 0.3 * x_in * (t.float() / 1000) + 2.0 * fixed


def _spy_on_thresholds(seen: list):
    """Wrap diffusers' _threshold_sample: per call, the largest s it used and the fraction of values it clipped."""

    def attach(ref):
        original = ref._threshold_sample

        def spy(x0):
            flat = x0.reshape(x0.shape[0], -1).abs().float()
            s = torch.quantile(flat, ref.config.dynamic_thresholding_ratio, dim=1).clamp(min=1, max=ref.config.sample_max_value)
            seen.append((float(s.max()), float((flat > s[:, None]).float().mean())))
            return original(x0)

        ref._threshold_sample = spy

    return attach


@pytest.mark.parametrize("ratio,max_value", THRESHOLDS, ids=lambda v: str(v))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", S.with_thresholding())
def test_dynamic_thresholding_matches_diffusers_and_clips(name, prediction_type, ratio, max_value):
    overrides = {"thresholding": True, "dynamic_thresholding_ratio": ratio, "sample_max_value": max_value,
                 "prediction_type": prediction_type}
    for n in (1, 4, 15):
        seen: list = []
        errors = compare(name, n, overrides, model=_sample_like_model, reference=_spy_on_thresholds(seen))
        assert max(errors.values()) <= TOL, (n, errors)
        assert len(seen) == n  # thresholded once per step (x0 estimate)
        assert any(clipped > 0 for _, clipped in seen), "the threshold never clipped: the test proves nothing"
        if max_value > 1 and n > 1:
            assert any(s > 1 for s, _ in seen), "s stayed 1: plain clipping, not the dynamic threshold"


def test_thresholding_changes_the_trajectory():
    """On by config, not by accident: the same inputs without thresholding give another result."""
    on, off = (S.make("ddim", SD_CONFIG, thresholding=t, sample_max_value=2.0) for t in (True, False))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 10
    for s in (on, off):
        s.set_timesteps(4)
    assert not torch.allclose(on.step(x, on.timesteps[0], x), off.step(x, off.timesteps[0], x))


def test_dynamically_thresholded_is_clipping_at_s_1_and_scales_by_s_above():
    from sdtrt.runtime.schedulers.common import dynamically_thresholded

    x0 = torch.linspace(-4, 4, 2 * 4 * 4 * 4).reshape(2, 4, 4, 4)
    assert torch.equal(dynamically_thresholded(x0, 0.995, 1.0), x0.clamp(-1, 1))
    out = dynamically_thresholded(x0, 1.0, 10.0)  # s = max |x0| of each image: nothing clipped, scaled into [-1, 1]
    assert torch.allclose(out, x0 / x0.abs().reshape(2, -1).amax(1).view(2, 1, 1, 1))
    half = dynamically_thresholded(x0.half(), 0.9, 3.0)
    assert half.dtype == torch.float16 and float(half.abs().max()) <= 1.0


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "lms", "pndm", "euler_karras"])
def test_thresholding_on_a_scheduler_without_it_is_refused_naming_the_option(name):
    with pytest.raises(SdtrtError, match=r"no dynamic thresholding \(thresholding=True\)") as e:
        S.make(name, SD_CONFIG, thresholding=True)
    assert "ddim" in e.value.fix and "unipc" in e.value.fix and "--scheduler" in e.value.cli_fix


@pytest.mark.parametrize("options,match", [
    ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio=1.5"),
    ({"thresholding": True, "sample_max_value": 0}, "sample_max_value=0"),
    ({"thresholding": True, "sample_max_value": float("nan")}, "sample_max_value=nan"),
    ({"thresholding": "yes"}, "thresholding='yes'"),
])
def test_bad_thresholding_values_are_refused(options, match):
    with pytest.raises(SdtrtError, match=match):
        S.make("dpmpp_2m", SD_CONFIG, **options)


def test_a_model_config_with_thresholding_is_ignored_by_schedulers_without_it_as_in_diffusers():
    s = S.make("euler", {**SD_CONFIG, "thresholding": True})
    assert not hasattr(s.config, "thresholding")


def test_sd2_v_prediction_config():
    sd2 = {**SD_CONFIG, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
    for name in ("ddim", "euler", "dpmpp_2m_karras", "unipc"):
        assert max(compare(name, 10, {}, config=sd2).values()) <= TOL


def test_linear_and_cosine_beta_schedules():
    for schedule in ("linear", "squaredcos_cap_v2"):
        cfg = {**SD_CONFIG, "beta_schedule": schedule, "beta_start": 0.0001, "beta_end": 0.02}
        for name in ("ddim", "euler", "dpmpp_2m", "unipc"):
            assert max(compare(name, 12, {}, config=cfg).values()) <= TOL, (schedule, name)


@pytest.mark.parametrize("alias,canonical", [
    ("Euler a", "euler_ancestral"), ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
    ("DPMSolverMultistepScheduler", "dpmpp_2m"), ("EulerAncestralDiscreteScheduler", "euler_ancestral"),
    ("PLMS", "pndm"), ("UniPC", "unipc"), ("LMS Karras", "lms_karras"), ("ddim", "ddim"), ("LCM", "lcm"), ("Heun", "heun"),
])
def test_names_ours_diffusers_and_a1111_are_accepted(alias, canonical):
    assert S.resolve(alias) == canonical


def test_unknown_scheduler_lists_the_known_ones():
    with pytest.raises(SdtrtError, match="dpmpp_2m_karras"):
        S.make("dpm++ 9m", SD_CONFIG)


def test_unknown_override_is_refused_with_the_valid_fields():
    with pytest.raises(SdtrtError, match="use_karras_sigmas"):
        S.make("euler", SD_CONFIG, use_karas_sigmas=True)


def test_steps_below_one_are_refused():
    with pytest.raises(SdtrtError, match="positive"):
        S.make("euler", SD_CONFIG).set_timesteps(0)


def test_set_timesteps_restarts_a_trajectory():
    """Same instance, two runs: identical results (no state leaks between runs)."""
    s = S.make("dpmpp_2m", SD_CONFIG)
    outs = []
    for _ in range(2):
        s.set_timesteps(5)
        x = torch.ones(1, 4, 2, 2)
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])


# --- thresholding through the front ends: Python API and CLI, against diffusers' pipeline ---------


THRESHOLD_OPTIONS = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m_karras", "unipc"])
def test_thresholding_through_the_api_matches_diffusers_pipeline(tiny_onnx, tiny_model, scheduler):
    from sdtrt import Pipeline
    from tests.helpers import psnr, reference_pipeline, seeded

    pipe = Pipeline.load(tiny_onnx)
    ours = pipe("a fox", steps=5, scheduler=scheduler, scheduler_options=THRESHOLD_OPTIONS, seed=3, progress=False).images[0]
    theirs = reference_pipeline(tiny_model, scheduler, **THRESHOLD_OPTIONS)("a fox", num_inference_steps=5, generator=seeded(3)).images[0]
    assert psnr(ours, theirs) >= 45
    plain = pipe("a fox", steps=5, scheduler=scheduler, seed=3, progress=False).images[0]
    assert psnr(ours, plain) < 40  # the option reached the scheduler: the image changed


def test_thresholding_through_the_cli_gives_the_api_image(tiny_onnx, tmp_path):
    import numpy as np
    from PIL import Image

    from sdtrt import Pipeline
    from sdtrt.cli import main as cli

    out = tmp_path / "fox.png"
    assert cli(["generate", "a fox", "--model", str(tiny_onnx), "--steps", "4", "--seed", "2", "--scheduler", "ddim",
                "--scheduler-option", "thresholding=true", "--scheduler-option", "dynamic_thresholding_ratio=0.9",
                "--scheduler-option", "sample_max_value=1.5", "--out", str(out), "--no-progress"]) == 0
    api = Pipeline.load(tiny_onnx)("a fox", steps=4, seed=2, scheduler="ddim", scheduler_options=THRESHOLD_OPTIONS, progress=False)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.images[0]))


def test_cli_thresholding_on_a_scheduler_without_it_is_one_line_naming_the_option(tiny_onnx, tmp_path, capsys):
    from sdtrt.cli import main as cli

    out = tmp_path / "fox.png"
    assert cli(["generate", "a fox", "--model", str(tiny_onnx), "--scheduler", "Euler a", "--scheduler-option", "thresholding=true",
                "--out", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrt: error: scheduler 'euler_ancestral' has no dynamic thresholding"), lines
    assert "thresholding=True" in lines[0] and "Fix: pass --scheduler with one that has it (ddim," in lines[0]
    assert not out.exists()
