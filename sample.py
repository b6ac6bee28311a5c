"""
The diffusion process and text-to-image sampling for SD1.5 / SDXL / SD3, equal to the diffusers pipelines given the
same initial latents.

    python sample.py --model tiny --prompt "a red circle on a blue background" --out samples.png
    python sample.py --model sd15 --unet runs/dpo-sd15/unet --prompts prompts.txt --compare --out compare.png

Read top to bottom: the noise schedule (the forward process the trainer noises with), the inference timesteps, the
samplers (DDIM, Euler, DPM-Solver++(2M), latent consistency, SD3's flow matching), classifier-free guidance and
`generate` (SDXL's and SD3's conditioning, decoding), the comparison grid and the CLI.
"""
import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from files import DTYPES, UserError, first_line
from lora import merge_lora_files
from tokenizer import split_words
from mmdit import load_pipeline, load_tuned

# ----------------------------------------------------------------------------------------------------------------
# The noise schedule: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)            (DDPM, Ho et al. 2020, Eq. 4)


def betas(scheduler_config):
    """Per-step noise variances beta_1..beta_T from the model's scheduler config. Stable Diffusion uses
    `scaled_linear`: linear in sqrt(beta) from sqrt(0.00085) to sqrt(0.012) over T = 1000 steps."""
    c = scheduler_config
    T, b0, b1 = c.get("num_train_timesteps", 1000), c.get("beta_start", 0.0001), c.get("beta_end", 0.02)
    kind = c.get("beta_schedule", "linear")
    if c.get("trained_betas") is not None:
        return torch.tensor(c["trained_betas"], dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float32) ** 2
    if kind == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float32)
    raise UserError(f"scheduler config: beta_schedule={kind!r} is not supported (scaled_linear or linear)")


def alphas_cumprod(scheduler_config):
    """abar_t = prod_{s<=t} (1 - beta_s): the fraction of signal variance left at step t (float32, as diffusers)."""
    return torch.cumprod(1.0 - betas(scheduler_config), dim=0)


def flow_sigmas(scheduler_config):
    """The T training sigmas of SD3's FlowMatchEulerDiscreteScheduler, noisiest first, indexed by t as alphas_cumprod
    is: sigma_t = shift s / (1 + (shift - 1) s) at s = (T - t) / T (shift 3.0 for SD3: more steps at high noise)."""
    T, shift = scheduler_config.get("num_train_timesteps", 1000), scheduler_config.get("shift", 1.0)
    s = torch.arange(T, 0, -1, dtype=torch.float32) / T
    return shift * s / (1 + (shift - 1) * s)


def add_noise(x0, noise, t, abar):
    """Sample q(x_t | x_0) by reparameterization: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    a = abar.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise



# ----------------------------------------------------------------------------------------------------------------
# The scheduler config, and which of the T training steps a sampler visits (noisiest first, as set_timesteps)

UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr",
               "thresholding", "use_dynamic_shifting", "invert_sigmas", "shift_terminal", "stochastic_sampling")
DEFAULTS = {"ddim": dict(timestep_spacing="leading", set_alpha_to_one=True, clip_sample=True),
            "euler": dict(timestep_spacing="linspace"), "dpm": dict(timestep_spacing="linspace"),
            "lcm": dict(original_inference_steps=50, timestep_scaling=10.0, clip_sample=False), "flow": dict(shift=1.0)}


def scheduler_config(cfg, sampler):
    """The model's scheduler config as diffusers' `Scheduler.from_config(pipe.scheduler.config)` reads it: keys the
    JSON leaves out take the defaults of the target scheduler class (so SD1.5's config, which has no
    timestep_spacing, means "leading" for DDIM but "linspace" for Euler and DPM-Solver). Options these samplers
    do not implement are refused rather than sampled differently."""
    cfg = {**DEFAULTS[sampler], **cfg}
    bad = [k for k in UNSUPPORTED if cfg.get(k)] + [f"{k}={cfg[k]!r}" for k, ok in [
        ("interpolation_type", "linear"), ("final_sigmas_type", "zero")] if cfg.get(k, ok) != ok]
    if bad:
        raise UserError(f"scheduler config: {', '.join(bad)} is not supported by these samplers")
    return cfg


def inference_timesteps(cfg, n, fractional=False, dpm=False):
    """The scheduler config's `timestep_spacing` (Lin et al. 2023, Table 2):
      leading  (SD's): every (T // n)-th step from 0, plus `steps_offset`     (981, 961, ..., 1 for n = 50, offset 1)
      trailing:        round(T - k T / n) - 1 for k = 0..n-1                  (999, 979, ..., 19)
      linspace:        n points evenly over [0, T - 1], rounded (kept fractional for Euler: `fractional`)
    DPM-Solver (`dpm`) lays n + 1 points for leading/linspace and drops the last one (t = 0)."""
    T, spacing, m = cfg.get("num_train_timesteps", 1000), cfg.get("timestep_spacing", "leading"), n + dpm
    if not 1 <= n <= T:
        raise UserError(f"steps must be in 1..{T}, got {n}")
    if spacing == "leading":
        t = np.arange(dpm, m) * (T // m) + cfg.get("steps_offset", 0)
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n))[::-1] - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, m)[dpm:]
        t = t if fractional else t.round()
    else:
        raise UserError(f"scheduler config: timestep_spacing={spacing!r} is not supported")
    t = np.ascontiguousarray(t[::-1])
    return torch.from_numpy(t.astype(np.float32)) if fractional else torch.from_numpy(t.astype(np.int64))


def sigmas_at(cfg, t):
    """sigma(t) = sqrt((1 - abar_t) / abar_t), linearly interpolated between training steps (float32 as diffusers),
    with sigma = 0 appended for the end of the chain."""
    abar = alphas_cumprod(cfg)
    s = np.interp(t.numpy(), np.arange(len(abar)), ((1 - abar) / abar).sqrt().numpy())
    return torch.from_numpy(np.append(s, 0.0).astype(np.float32))


def predict_x0(x, out, alpha, sigma, prediction_type):
    """The network output at x = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1) as (x0, eps): for epsilon models
    x0 = (x - sigma eps) / alpha; for v-prediction (v = alpha eps - sigma x0) x0 = alpha x - sigma v,
    eps = alpha v + sigma x."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out, alpha * out + sigma * x
    raise UserError(f"scheduler config: prediction_type={prediction_type!r} is not supported")


# ----------------------------------------------------------------------------------------------------------------
# Samplers: (denoise(x_in, t) -> guided network output, unit Gaussian noise, scheduler config, steps) -> latents


def ddim(denoise, noise, cfg, steps):
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12), deterministic; k = T // steps:
        x_{t-k} = sqrt(abar_{t-k}) x0_hat + sqrt(1 - abar_{t-k}) eps_hat
    Past the last step abar is 1 with `set_alpha_to_one`, else abar_0 (SD: False); x0_hat is clipped to
    [-r, r] if `clip_sample` (diffusers' default; SD's configs turn it off). Starts at the noise itself."""
    ts, abar, ptype = inference_timesteps(cfg, steps), alphas_cumprod(cfg), cfg.get("prediction_type", "epsilon")
    final = torch.tensor(1.0) if cfg.get("set_alpha_to_one", True) else abar[0]
    k, r = cfg.get("num_train_timesteps", 1000) // steps, cfg.get("clip_sample_range", 1.0)
    x = noise
    for t in ts:
        x0, eps = predict_x0(x, denoise(x, t), abar[t].sqrt(), (1 - abar[t]).sqrt(), ptype)
        if cfg.get("clip_sample", True):
            x0 = x0.clamp(-r, r)
        a_prev = abar[t - k] if t - k >= 0 else final
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def euler(denoise, noise, cfg, steps):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma in x = x0 + sigma eps
    (Karras et al. 2022, Alg. 1 without its Heun correction; diffusers' EulerDiscreteScheduler):
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - x0_hat(x_i)) / sigma_i,        sigma_n = 0
    The network sees x / sqrt(sigma^2 + 1) (its training scale). The chain starts at noise * sqrt(sigma_0^2 + 1)
    for leading spacing, noise * sigma_0 for linspace/trailing (diffusers' `init_noise_sigma`)."""
    ts, ptype = inference_timesteps(cfg, steps, fractional=True), cfg.get("prediction_type", "epsilon")
    s = sigmas_at(cfg, ts)
    leading = cfg.get("timestep_spacing", "leading") not in ("linspace", "trailing")
    x = noise * ((s.max() ** 2 + 1).sqrt() if leading else s.max())
    for i, t in enumerate(ts):
        a = 1 / (s[i] ** 2 + 1).sqrt()                          # x a = alpha x0 + sigma eps with sigma = s a
        x0, _ = predict_x0(x * a, denoise(x * a, t), a, s[i] * a, ptype)
        x = x + (s[i + 1] - s[i]) * (x - x0) / s[i]
    return x


def dpm_solver_2m(denoise, noise, cfg, steps):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2; diffusers' DPMSolverMultistepScheduler defaults: dpmsolver++,
    order 2, midpoint, lower_order_final, final sigma 0). With alpha_i = 1 / sqrt(sigma_i^2 + 1), s_i = sigma_i alpha_i,
    lambda_i = log(alpha_i / s_i), h = lambda_{i+1} - lambda_i and r = (lambda_i - lambda_{i-1}) / h:
        D = x0_i + (x0_i - x0_{i-1}) / (2 r)          (D = x0_i at the first step: first order)
        x_{i+1} = (s_{i+1} / s_i) x_i - alpha_{i+1} (e^{-h} - 1) D
    The last step lands on sigma = 0, i.e. x_n = x0_{n-1}. Starts at the noise itself."""
    ts, ptype = inference_timesteps(cfg, steps, dpm=True), cfg.get("prediction_type", "epsilon")
    sig = sigmas_at(cfg, ts)
    alpha = 1 / (sig ** 2 + 1).sqrt()
    s = sig * alpha
    lam = alpha.log() - s.log()
    x, x0_prev = noise, None
    for i, t in enumerate(ts):
        x0, _ = predict_x0(x, denoise(x, t), alpha[i], s[i], ptype)
        if i == len(ts) - 1:
            x = x0
        else:
            h = lam[i + 1] - lam[i]
            D = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * (lam[i] - lam[i - 1]))
            x = (s[i + 1] / s[i]) * x - (alpha[i + 1] * (torch.exp(-h) - 1.0)) * D
        x0_prev = x0
    return x


def lcm_timesteps(cfg, n):
    """LCMScheduler's: of the distillation's m = original_inference_steps (50) steps t_j = j (T // m) - 1, noisiest
    first (999, 979, ..., 19), the n at the indices floor(k m / n), k = 0..n-1: 999, 759, 499, 259 for n = 4."""
    T, m = cfg.get("num_train_timesteps", 1000), cfg.get("original_inference_steps", 50)
    if not 1 <= n <= m:
        raise UserError(f"LCM steps must be in 1..{m} (original_inference_steps), got {n}")
    origin = (np.arange(1, m + 1) * (T // m) - 1)[::-1]
    return torch.from_numpy(origin[np.floor(np.linspace(0, m, n, endpoint=False)).astype(np.int64)].copy())


def consistency_scalings(t, cfg):
    """The boundary condition f(x, 0) = x of consistency models (Song et al. 2023; LCM): with sigma_data s = 0.5
    and u = t * timestep_scaling (10), c_skip = s^2 / (u^2 + s^2) and c_out = u / sqrt(u^2 + s^2)."""
    u, s = t * cfg.get("timestep_scaling", 10.0), 0.5
    return s ** 2 / (u ** 2 + s ** 2), u / (u ** 2 + s ** 2) ** 0.5


def lcm(denoise, noise, cfg, steps, step_noise):
    """Multistep latent consistency sampling (LCM, Luo et al. 2023; diffusers' LCMScheduler). At each t_i:
        z = c_skip(t_i) x + c_out(t_i) x0_hat(x, t_i)                              (the consistency function)
        x = sqrt(abar_{t_{i+1}}) z + sqrt(1 - abar_{t_{i+1}}) eps_i                 (fresh noise eps_i = step_noise())
    and the last z is the sample; x0_hat clipped to [-r, r] if `clip_sample` (default off). Starts at the noise."""
    ts, abar, ptype = lcm_timesteps(cfg, steps), alphas_cumprod(cfg), cfg.get("prediction_type", "epsilon")
    x, r = noise, cfg.get("clip_sample_range", 1.0)
    for i, t in enumerate(ts):
        x0, _ = predict_x0(x, denoise(x, t), abar[t].sqrt(), (1 - abar[t]).sqrt(), ptype)
        x0 = x0.clamp(-r, r) if cfg.get("clip_sample", False) else x0
        c_skip, c_out = consistency_scalings(t, cfg)
        z = c_skip * x + c_out * x0
        if i == len(ts) - 1:
            return z
        a = abar[ts[i + 1]]
        x = a.sqrt() * z + (1 - a).sqrt() * step_noise().to(x.device)


def flow_schedule(cfg, n):
    """FlowMatchEulerDiscreteScheduler's sigmas (n + 1, the last 0) and timesteps sigma T (n), float32 as diffusers.
    The shift sigma'(s) = shift s / (1 + (shift - 1) s) (SD3: 3.0) spends more steps at high noise. The training
    schedule is sigma'(k / T), k = T..1; inference lays n timesteps t_i evenly from its first (T) to its last
    (sigma'(1 / T) T) and shifts them again, sigma_i = sigma'(t_i / T), as diffusers does."""
    T, shift = cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0)
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    first, last = (flow_sigmas(cfg)[[0, -1]].double() * T).tolist()     # the training schedule's ends
    s = torch.from_numpy(shifted(np.linspace(first, last, n) / T)).float()
    return torch.cat([s, torch.zeros(1)]), s * T


def flow_euler(denoise, noise, cfg, steps):
    """Euler on the rectified-flow ODE dx/dsigma = v (SD3, Esser et al. 2024). The forward process is the straight
    line x_sigma = (1 - sigma) x0 + sigma eps, sigma in [0, 1], whose velocity v = dx/dsigma = eps - x0 the network
    predicts; from sigma_0 = 1 (pure noise) to sigma_n = 0:
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v(x_i, sigma_i T)
    Starts at the noise itself."""
    sigmas, ts = flow_schedule(cfg, steps)
    x = noise
    for i, t in enumerate(ts):
        x = x + (sigmas[i + 1] - sigmas[i]) * denoise(x, t)
    return x


SAMPLERS = {"ddim": ddim, "euler": euler, "dpm": dpm_solver_2m, "lcm": lcm, "flow": flow_euler}

# ----------------------------------------------------------------------------------------------------------------
# Generation: classifier-free guidance, SDXL micro-conditioning, decoding


def classifier_free_guidance(uncond, cond, scale):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): eps = eps_uncond + s (eps_cond - eps_uncond), one UNet
    call on the batch [uncond; cond]. Ho & Salimans write (1 + w) eps_cond - w eps_uncond: our scale s (the
    pipelines' guidance_scale) is their 1 + w, so s = 1 is the conditional model alone."""
    return uncond + scale * (cond - uncond)


def guidance_embedding(w, dim):
    """An LCM-distilled UNet's guidance input, `timestep_cond` (diffusers' get_guidance_scale_embedding, after VDM):
    with f_k = 10000^(-k / (dim/2 - 1)), emb = [sin(1000 w f), cos(1000 w f)] (B, dim); the pipelines embed
    w = guidance - 1 (guidance 1: no guidance), as the LCM was distilled with w = CFG scale - 1."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None]                        # (B, dim/2)
    return torch.cat([args.sin(), args.cos(), args.new_zeros(len(w), dim % 2)], dim=-1)


def vae_factor(sd):
    return 2 ** (len(sd.vae.cfg.block_out_channels) - 1)


def default_size(sd):
    """The model's native resolution: unet sample_size x the VAE's downsampling (512 for SD1.5, 1024 for SDXL)."""
    return sd.unet.cfg.sample_size * vae_factor(sd)


def initial_latents(sd, n, height, width, seed=0):
    """Unit Gaussian noise for n images; image i uses torch.Generator().manual_seed(seed + i) on the CPU, so an image
    depends on its seed only (not on its batch or the device). In diffusers this is the pipeline's
    generator=[torch.Generator().manual_seed(seed + i) for i in range(n)]."""
    f, c = vae_factor(sd), sd.unet.cfg.in_channels
    return seeded_noise(range(seed, seed + n), (c, height // f, width // f))[0]


def seeded_noise(seeds, shape, latents=None):
    """The initial latents (B, *shape) and step_noise(), the LCM sampler's fresh noise. Without `latents`, image i's
    initial and step noise come from one CPU generator seeded with seeds[i] (an image depends on its seed only), as
    diffusers' pipeline(generator=[torch.Generator().manual_seed(s) for s in seeds]); with them, each step draws one
    randn of the batch's shape from ONE generator seeded with seeds[0], as pipeline(latents, generator=<that one>)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if latents is not None:
        return latents, lambda: torch.randn(latents.shape, generator=gens[0])
    draw = lambda: torch.stack([torch.randn(shape, generator=g) for g in gens])  # noqa: E731
    return draw(), draw


def zeros_for_empty_negative(sd):
    """SDXL pipelines condition on ZERO embeddings (context and pooled) when no negative prompt is given, unless
    the pipeline's model_index.json sets force_zeros_for_empty_prompt false (True for SDXL base). SD1.5 encodes ""."""
    if sd.kind != "sdxl":
        return False
    try:
        return bool(json.loads((Path(sd.source) / "model_index.json").read_text())
                    .get("force_zeros_for_empty_prompt", True))
    except (OSError, ValueError, TypeError):
        return True


def conditioning(sd, prompts, negative_prompt, guided, height, width, dtype):
    """UNet keyword arguments for the batch [uncond; cond] (or cond only without guidance): context (2B, 77, D),
    and for SDXL the pooled text (2B, 1280) and time_ids (original = target = (height, width), crop (0, 0)); for SD3
    the pooled text (2B, 2048) and an uncond that is "" through all three encoders (no zeros)."""
    B = len(prompts)
    context, pooled = sd.encode_prompt(prompts)
    if guided:
        if negative_prompt is None and zeros_for_empty_negative(sd):
            neg = torch.zeros_like(context), (torch.zeros_like(pooled) if pooled is not None else None)
        else:
            negs = [negative_prompt or ""] * B if isinstance(negative_prompt, (str, type(None))) else negative_prompt
            if len(negs) != B:
                raise UserError(f"{len(negs)} negative prompts for {B} prompts")
            neg = sd.encode_prompt(list(negs))
        context = torch.cat([neg[0], context])
        pooled = torch.cat([neg[1], pooled]) if pooled is not None else None
    kw = dict(context=context.to(dtype))
    if sd.kind == "sdxl":
        kw.update(text_embeds=pooled.to(dtype),
                  time_ids=sd.time_ids(len(context), height, width, device=context.device, dtype=dtype))
    if sd.kind == "sd3":
        kw.update(pooled=pooled.to(dtype))
    return kw


def decode(sd, latents):
    """Latents -> PIL images as diffusers: vae.decode(latents / scaling_factor + shift_factor) (SD3's shift, else 0;
    in fp32 when an fp16 VAE asks for `force_upcast`, SDXL's), then (x / 2 + 0.5).clamp(0, 1) * 255, rounded to
    uint8. NaN or Inf in the latents or the decoded pixels is an error, not a black picture."""
    check_finite(latents, "the sampled latents")
    vae = sd.vae
    dtype = next(vae.parameters()).dtype
    upcast = dtype == torch.float16 and getattr(vae.cfg, "force_upcast", False)
    if upcast:
        vae.float()
    try:
        x = vae.decode((latents / vae.scaling_factor + vae.cfg.shift_factor).to(next(vae.parameters()).dtype))
    finally:
        vae.to(dtype)
    check_finite(x, "the VAE's decoded images")
    x = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype("uint8")]


def check_finite(x, what):
    if not torch.isfinite(x).all():
        raise UserError(f"{what} hold NaN or Inf values: the UNet's weights, a LoRA or the precision (an fp16 "
                        f"overflow: try bf16 or fp32) is broken; no image is made from them")


@torch.no_grad()
def generate(sd, prompts, *, steps=50, guidance=7.5, latents=None, seed=0, height=None, width=None,
             negative_prompt=None, sampler=None, unet=None, progress=False):
    """Text-to-image, as StableDiffusion(XL|3)Pipeline with the matching scheduler. prompts: str or list;
    latents: (B, C, H/8, W/8) unit noise (C = 4, SD3: 16); seed: image i's is seed + i, or seed[i] for a list (the
    noise rules: seeded_noise); sampler: ddim | euler | dpm | lcm | flow (default: flow for SD3, lcm for an
    LCMScheduler's config, else ddim); unet: a tuned UNet instead of sd.unet; progress: True for a bar, or a tqdm bar
    to advance per step. Classifier-free guidance when guidance > 1, but an LCM-distilled UNet (time_cond_proj_dim)
    takes guidance_embedding(guidance - 1) instead, as diffusers' pipelines do. The sampler's arithmetic is fp32
    whatever the models' dtype."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    lcm_config = sd.scheduler_config.get("_class_name") == "LCMScheduler"
    sampler = sampler or ("flow" if sd.kind == "sd3" else "lcm" if lcm_config else "ddim")
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if (sampler == "flow") != (sd.kind == "sd3"):
        raise UserError(f"sampler {sampler!r} does not fit an {sd.kind} model: SD3 samples with flow, flow only SD3")
    cfg, unet, f = scheduler_config(sd.scheduler_config, sampler), unet or sd.unet, vae_factor(sd)
    height, width = height or default_size(sd), width or default_size(sd)
    if height % f or width % f or height <= 0 or width <= 0:
        raise UserError(f"height and width must be positive multiples of {f}, got {height} x {width}")
    dtype, device, lcm_dim = next(unet.parameters()).dtype, sd.device, getattr(unet.cfg, "time_cond_proj_dim", None)
    guided = guidance > 1 and not lcm_dim
    kw = conditioning(sd, prompts, negative_prompt, guided, height, width, dtype)
    if lcm_dim:  # an LCM-distilled UNet: the guidance scale is an input, not CFG
        w = torch.full((len(prompts),), guidance - 1.0)
        kw["timestep_cond"] = guidance_embedding(w, lcm_dim).to(device, dtype)
    seeds = list(seed) if isinstance(seed, (list, tuple, range)) else [seed + i for i in range(len(prompts))]
    latents, step_noise = seeded_noise(seeds, (unet.cfg.in_channels, height // f, width // f), latents)
    if tuple(latents.shape) != (len(prompts), unet.cfg.in_channels, height // f, width // f):
        raise UserError(f"latents of shape {tuple(latents.shape)} for {len(prompts)} prompts at {height} x {width}")
    bar = tqdm(total=steps, desc="sampling", leave=False) if progress is True else None
    bar = progress if hasattr(progress, "update") else bar

    def denoise(x, t):
        out = unet(torch.cat([x, x] if guided else [x]).to(dtype), t.to(device), **kw).float()
        if bar is not None:
            bar.update(1)
        return classifier_free_guidance(*out.chunk(2), guidance) if guided else out

    extra = dict(step_noise=step_noise) if sampler == "lcm" else {}
    x = SAMPLERS[sampler](denoise, latents.to(device, torch.float32), cfg, steps, **extra)
    if progress is True:
        bar.close()
    return decode(sd, x)


def render(sd, unet, prompts, seeds, batch_size=4, desc=None, **kw):
    """generate() in batches, image i from seed seeds[i]: batching changes no image (beyond float rounding).
    desc: show a progress bar of the sampling steps with this title."""
    if desc:
        kw["progress"] = tqdm(total=-(-len(prompts) // batch_size) * kw.get("steps", 50), desc=desc, unit="step")
    images = []
    for i in range(0, len(prompts), batch_size):
        images += generate(sd, prompts[i:i + batch_size], seed=seeds[i:i + batch_size], unet=unet, **kw)
    if desc:
        kw["progress"].close()
    return images


# ----------------------------------------------------------------------------------------------------------------
# Grids: base vs tuned rows, same seeds

MIN_CELL = 128        # grids show each image at least this large (scaled by nearest neighbour: toy images are 32 px)


def grid_layout(size, row_labels=None, col_labels=None):
    """Where image_grid puts things, for images of `size`: (cell width, cell height, label column width, caption
    band height, each column's caption lines), in PIL's default font."""
    font, scale = ImageFont.load_default(), max(1, -(-MIN_CELL // min(size)))
    w, h = size[0] * scale, size[1] * scale
    left = 10 + int(max((font.getlength(str(t)) for t in row_labels or []), default=-10))
    lines = [wrap(str(t), w - 6, font) for t in col_labels or []]
    top = 4 + 12 * max(map(len, lines), default=0) if col_labels else 0
    return w, h, left, top, lines


def wrap(text, width, font):
    """Words into lines no wider than `width` pixels (a longer word gets a line of its own)."""
    out, line = [], ""
    for word in text.split():
        if line and font.getlength(f"{line} {word}") > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return out + [line] if line else out


def image_grid(rows, row_labels=None, col_labels=None):
    """rows of equal-size PIL images -> one image: each at least MIN_CELL px, row labels in a column on the left,
    and above the columns their captions, wrapped in full (grid_layout)."""
    w, h, left, top, lines = grid_layout(rows[0][0].size, row_labels, col_labels)
    grid = Image.new("RGB", (left + w * max(map(len, rows)), top + h * len(rows)), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img.resize((w, h), Image.NEAREST), (left + c * w, top + r * h))
        if row_labels:
            draw.text((5, top + r * h + h // 2 - 6), str(row_labels[r]), fill="black", font=font)
    for c, column in enumerate(lines):
        draw.text((left + c * w + 3, 2), "\n".join(column), fill="black", font=font, spacing=2)
    return grid


# ----------------------------------------------------------------------------------------------------------------
# CLI

TOY_MODELS = ("tiny", "tiny-flow")              # the toy world's models (toy.py)
TOY_SAMPLING = dict(steps=20, guidance=4.0)     # how they are sampled: DDIM (flow) steps, guidance


def sampling_defaults(model, steps=None, guidance=None):
    """--steps and --guidance when not given: the toy models', else 50 and 7.5 (the pipelines' defaults)."""
    toy = model in TOY_MODELS
    return steps or (TOY_SAMPLING["steps"] if toy else 50), guidance or (TOY_SAMPLING["guidance"] if toy else 7.5)


_warned = set()


def warn_unknown_words(sd, prompts):
    """The toy model knows only its captions' words (each one token); warn once about any other word, which it can
    only read letter by letter (it will not draw "white": white is no color of its world)."""
    tok = sd.tokenizers[0]
    unknown = sorted({w for p in prompts for w in split_words(p.lower()) if len(tok.bpe(w)) > 1} - _warned)
    if unknown:
        _warned.update(unknown)
        print(f"warning: the toy model has never seen the word(s) {', '.join(unknown)}; its captions are "
              f"'a COLOR SHAPE on a COLOR background' with the colors red, green, blue, yellow, purple, orange and "
              f"the shapes circle, square, triangle", file=sys.stderr)


FAMILY = ("in_channels", "cross_attention_dim", "addition_embed_type")  # what a --unet must share with --model


def fail(msg):
    """The command-line programs' end for a problem the user can fix: one line on stderr, exit status 2."""
    print(f"error: {first_line(msg) if isinstance(msg, BaseException) else msg}", file=sys.stderr)
    sys.exit(2)


def add_generation_args(p):
    """The flags sample.py and eval.py share: the base model and the tuned weights, the sampler and its settings,
    the networks' precision and device."""
    p.add_argument("--model", default="tiny", help="the base: tiny (the toy model), tiny-flow, an alias (sd15, sdxl, "
                                                 "sd3, sd35m, sd35l), Hub id, folder or .safetensors")
    p.add_argument("--unet", default=None, help="a tuned UNet folder (OUT/unet of diffdpo.py; SD3: OUT/transformer)")
    p.add_argument("--lora", action="append", default=None, help="or LoRA adapters: a run folder (diffdpo.py "
                   "--lora-rank) or .safetensors file (peft or kohya); repeat to stack (e.g. + LCM-LoRA)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; the toy model's 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = none (default "
                                                                "7.5; the toy model's 4)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: lcm for LCM pipelines, else ddim")
    p.add_argument("--seed", type=int, default=0, help="image (prompt) i uses seed + i, for every model")
    p.add_argument("--height", type=int, default=None, help="default: the model's (512 SD1.5, 1024 SDXL)")
    p.add_argument("--width", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=4, help="images per UNet call")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="the networks' precision")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda when available")
    return p


def check_generation_args(a):
    """Fill in the sampling defaults and refuse impossible settings, before any model is loaded."""
    a.steps, a.guidance = sampling_defaults(a.model, a.steps, a.guidance)
    if a.steps < 1 or a.batch_size < 1:
        fail("--steps and --batch-size must be at least 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available (use --device cpu)")
    if a.unet and a.lora:
        fail("give --unet or --lora, not both")


def same_family(sd, tuned, a):
    if tuned is not None and any(getattr(tuned.cfg, k, None) != getattr(sd.unet.cfg, k, None) for k in FAMILY):
        fail(f"--unet {a.unet}: a UNet of another model family than --model {a.model} ({', '.join(FAMILY)} differ)")


def render_rows(sd, unets, prompts, a, **kw):
    """Each UNet's images of `prompts` (image i from seed --seed + i), under one progress bar of sampling steps."""
    seeds = [a.seed + i for i in range(len(prompts))]
    bar = tqdm(total=len(unets) * -(-len(prompts) // a.batch_size) * a.steps, unit="step", desc="sampling")
    try:
        rows = [render(sd, net, prompts, seeds, a.batch_size, steps=a.steps, guidance=a.guidance, height=a.height,
                       width=a.width, sampler=a.sampler, progress=bar, **kw) for net in unets]
    except (UserError, ValueError) as e:
        fail(e)
    bar.close()
    return rows


def main(argv=None):
    p = add_generation_args(argparse.ArgumentParser(description=__doc__,
                                                    formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    p.add_argument("--out", default="samples.png", help="the grid PNG to write")
    p.add_argument("--compare", action="store_true", help="two rows, base and tuned, same seeds (needs --unet or "
                                                          "--lora; stacked --lora files all go on the tuned row)")
    p.add_argument("--negative-prompt", default=None, help="what the guidance steers away from (default: none)")
    a = p.parse_args(argv)
    check_generation_args(a)
    prompts = list(a.prompt)
    if a.prompts:
        try:
            prompts += [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--prompts {a.prompts}: {getattr(e, 'strerror', None) or e}")
    if not prompts:
        fail("no prompts: give --prompt TEXT or --prompts FILE (one prompt per line)")
    if a.compare and not (a.unet or a.lora):
        fail("--compare needs --unet (the tuned UNet folder) or --lora (the adapters)")
    dtype = DTYPES[a.dtype]
    try:
        sd = load_pipeline(a.model, device=a.device, dtype=dtype)
        tuned = load_tuned(sd, a.unet, device=a.device, dtype=dtype) if a.unet else None
        if a.lora:  # merged into the base UNet, or into a copy of it for --compare
            tuned = merge_lora_files(copy.deepcopy(sd.unet) if a.compare else sd.unet, a.lora)
    except (UserError, OSError) as e:
        fail(e)
    same_family(sd, tuned, a)
    if a.model in TOY_MODELS:
        warn_unknown_words(sd, prompts)
    rows = [("base", sd.unet), ("tuned", tuned)] if a.compare else [("tuned" if tuned else "base", tuned or sd.unet)]
    images = render_rows(sd, [net for _, net in rows], prompts, a, negative_prompt=a.negative_prompt)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, [label for label, _ in rows], prompts).save(a.out)
    print(f"wrote {a.out}: {len(rows)} x {len(prompts)} images")


if __name__ == "__main__":
    main()
