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


def compare(name: str, n: int, overrides: dict, config: dict = SD_CONFIG, step_kwargs: dict | None = None) -> dict[str, float]:
    """Worst relative error of each quantity over a whole trajectory."""
    step_kwargs = step_kwargs or {}
    ref = _reference(name, config, {k: v for k, v in overrides.items() if k not in step_kwargs})
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
        model_output = 0.3 * x_in * (t.float() / 1000) + 0.5 * fixed
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
