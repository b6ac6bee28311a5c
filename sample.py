"""
Samplers and image generation for SD1.5 / SDXL, equal to the diffusers pipelines given the same initial latents.

    python sample.py --model sd15 --unet runs/dpo-sd15/unet --prompt "a red cube on a blue sphere" --compare --out grid.png

Read top to bottom: the inference timesteps, the samplers (DDIM, Euler), classifier-free guidance and SDXL's
conditioning in `generate`, then the grid and the CLI.
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffdpo import alphas_cumprod

# ----------------------------------------------------------------------------------------------------------------
# Inference timesteps: which of the T training steps the sampler visits, from noisiest to cleanest


def inference_timesteps(cfg, n, fractional=False):
    """The scheduler config's `timestep_spacing` (as diffusers): "leading" (SD's default) takes every T/n-th step
    counting from 0 and adds `steps_offset` (1 for SD: 981, 961, ..., 1 for n = 50); "trailing" counts from T;
    "linspace" spreads n steps evenly over [0, T-1] (rounded, except for Euler: `fractional`)."""
    T, spacing = cfg.get("num_train_timesteps", 1000), cfg.get("timestep_spacing", "leading")
    if spacing == "leading":
        t = np.arange(0, n) * (T // n) + cfg.get("steps_offset", 0)
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, n) if fractional else np.linspace(0, T - 1, n).round()
    else:
        raise ValueError(f"scheduler config: timestep_spacing={spacing!r} is not supported")
    t = np.ascontiguousarray(t[::-1])
    return torch.from_numpy(t.astype(np.float32)) if fractional else torch.from_numpy(t.astype(np.int64))


def predict_x0_eps(x, out, abar_t, prediction_type):
    """The network output as (x0, eps): for epsilon models x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); for
    v-prediction x0 = sqrt(abar) x - sqrt(1 - abar) v and eps = sqrt(abar) v + sqrt(1 - abar) x."""
    if prediction_type == "epsilon":
        return (x - (1 - abar_t).sqrt() * out) / abar_t.sqrt(), out
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * x - (1 - abar_t).sqrt() * out, abar_t.sqrt() * out + (1 - abar_t).sqrt() * x
    raise ValueError(f"scheduler config: prediction_type={prediction_type!r} is not supported")


# ----------------------------------------------------------------------------------------------------------------
# Samplers. Each takes `denoise(x_in, t) -> network output` (guidance already applied) and the initial noise.


def ddim(denoise, noise, cfg, steps, progress=lambda it: it):
    """DDIM with eta = 0 (Song et al. 2021, Eq. 12), deterministic:
        x_{t-k} = sqrt(abar_{t-k}) x0_hat + sqrt(1 - abar_{t-k}) eps_hat,   k = T // steps
    where (x0_hat, eps_hat) come from the network at (x_t, t). Past the first step, abar is 1 with
    `set_alpha_to_one` and abar_0 otherwise (SD: False). x0_hat is clipped to [-1, 1] if `clip_sample` (SD: no)."""
    abar = alphas_cumprod(cfg).double()
    final = torch.tensor(1.0, dtype=torch.float64) if cfg.get("set_alpha_to_one", True) else abar[0]
    ptype, k = cfg.get("prediction_type", "epsilon"), cfg.get("num_train_timesteps", 1000) // steps
    clip = cfg.get("clip_sample", True)
    x = noise                                                                   # init_noise_sigma = 1
    for t in progress(inference_timesteps(cfg, steps)):
        x0, eps = predict_x0_eps(x, denoise(x, t), abar[t].float(), ptype)
        if clip:  # diffusers' DDIM default; SD's configs turn it off
            x0 = x0.clamp(-cfg.get("clip_sample_range", 1.0), cfg.get("clip_sample_range", 1.0))
        a_prev = (abar[t - k] if t - k >= 0 else final).float()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def euler(denoise, noise, cfg, steps, progress=lambda it: it):
    """Euler's method on the probability-flow ODE in sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, Alg. 1
    with no churn; diffusers' EulerDiscreteScheduler): with x0_hat from the network at the scaled input
    x / sqrt(sigma^2 + 1),
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - x0_hat) / sigma_i,       sigma_n = 0
    Fractional training steps' sigmas are interpolated linearly; the chain starts at noise * sqrt(sigma_0^2 + 1)
    ("leading" spacing) or noise * sigma_0 ("linspace", "trailing")."""
    abar = alphas_cumprod(cfg)
    all_sigmas = ((1 - abar) / abar).sqrt()
    ts = inference_timesteps(cfg, steps, fractional=True)
    sigmas = torch.from_numpy(np.interp(ts.numpy(), np.arange(len(all_sigmas)), all_sigmas.numpy())).float()
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    ptype = cfg.get("prediction_type", "epsilon")
    init = sigmas.max() if cfg.get("timestep_spacing", "leading") in ("linspace", "trailing") else \
        (sigmas.max() ** 2 + 1).sqrt()
    x = noise * init
    for i in progress(range(steps)):
        s, s_next = sigmas[i], sigmas[i + 1]
        out = denoise(x / (s ** 2 + 1).sqrt(), ts[i])
        x0 = x - s * out if ptype == "epsilon" else out * (-s / (s ** 2 + 1).sqrt()) + x / (s ** 2 + 1)
        x = x + (x - x0) / s * (s_next - s)
    return x


SAMPLERS = {"ddim": ddim, "euler": euler}


# ----------------------------------------------------------------------------------------------------------------
# Generation: classifier-free guidance, SDXL micro-conditioning, decoding


def default_size(sd):
    """The model's native resolution: unet sample_size x the VAE's downsampling (512 for SD1.5, 1024 for SDXL)."""
    return sd.unet.cfg.sample_size * vae_factor(sd)


def vae_factor(sd):
    return 2 ** (len(sd.vae.cfg.block_out_channels) - 1)


def initial_latents(sd, n, height, width, seed):
    """Per-image noise: image i uses torch.Generator().manual_seed(seed + i) on the CPU, so an image depends on its
    seed only (not on the batch it is in or the device)."""
    f = vae_factor(sd)
    return torch.stack([torch.randn(sd.unet.cfg.in_channels, height // f, width // f,
                                    generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype("uint8")]


@torch.no_grad()
def generate(sd, prompts, *, steps=50, guidance=7.5, latents=None, seed=0, height=None, width=None,
             negative_prompt=None, sampler="ddim", unet=None, progress=False, force_zeros_for_empty_prompt=None):
    """Text-to-image as diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline with the matching scheduler.
    Classifier-free guidance eps = eps_uncond + guidance (eps_cond - eps_uncond), with one UNet call on
    [uncond; cond]. The unconditional prompt: the negative prompt, or "" -- except SDXL, whose pipeline uses zero
    embeddings for an empty negative prompt (force_zeros_for_empty_prompt, True for SDXL base). SDXL also gets
    time_ids (original = target = (height, width), crop (0, 0)). `unet` swaps in a tuned UNet."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    unet, device = unet or sd.unet, sd.device
    height, width = height or default_size(sd), width or default_size(sd)
    if height % vae_factor(sd) or width % vae_factor(sd):
        raise ValueError(f"height and width must be multiples of {vae_factor(sd)}, got {height} x {width}")
    dtype = next(unet.parameters()).dtype
    B = len(prompts)
    context, pooled = sd.encode_prompt(prompts)
    negatives = [negative_prompt or ""] * B if isinstance(negative_prompt, (str, type(None))) else negative_prompt
    zeros = sd.kind == "sdxl" and not negative_prompt and force_zeros_for_empty_prompt is not False
    if zeros:
        neg_context, neg_pooled = torch.zeros_like(context), torch.zeros_like(pooled)
    else:
        neg_context, neg_pooled = sd.encode_prompt(negatives)
    context = torch.cat([neg_context, context]).to(dtype)                      # (2B, 77, D): [uncond; cond]
    added = {}
    if sd.kind == "sdxl":
        added = dict(text_embeds=torch.cat([neg_pooled, pooled]).to(dtype),
                     time_ids=sd.time_ids(2 * B, height, width, device=device, dtype=dtype))
    if latents is None:
        latents = initial_latents(sd, B, height, width, seed)
    cfg = sd.scheduler_config

    def denoise(x, t):
        out = unet(torch.cat([x, x]).to(dtype), t.to(device), context, **added).float()
        uncond, cond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    if progress:
        from tqdm import tqdm
        bar = lambda it: tqdm(it, leave=False, desc="sampling")  # noqa: E731
    else:
        bar = lambda it: it  # noqa: E731
    x = SAMPLERS[sampler](denoise, latents.to(device).float(), cfg, steps, bar)
    images = sd.vae.decode((x / sd.vae.scaling_factor).to(next(sd.vae.parameters()).dtype))
    return to_pil(images)


# ----------------------------------------------------------------------------------------------------------------
# Grids: base vs tuned, same seeds


def image_grid(rows, row_labels=None, col_labels=None):
    """rows of PIL images -> one image with a label column on the left and captions above the columns."""
    w, h = rows[0][0].size
    font = ImageFont.load_default()
    left = 80 if row_labels else 0
    top = 30 if col_labels else 0
    grid = Image.new("RGB", (left + w * len(rows[0]), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid.paste(img, (left + c * w, top + r * h))
        if row_labels:
            draw.text((5, top + r * h + h // 2), row_labels[r], fill="black", font=font)
    for c, text in enumerate(col_labels or []):
        draw.text((left + c * w + 3, 3), text[: max(8, w // 7)], fill="black", font=font)
    return grid


def sample_grid(sd, unet, prompts, seeds, path, **kw):
    """One row of images of `unet` for fixed prompts and seeds (diffdpo.py writes one at each checkpoint)."""
    images = [generate(sd, [p], seed=s, unet=unet, **kw)[0] for p, s in zip(prompts, seeds)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image_grid([images], col_labels=prompts).save(path)
    return images


# ----------------------------------------------------------------------------------------------------------------
# CLI


def main(argv=None):
    import unet as U
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="alias, Hub id, diffusers folder or .safetensors (the base)")
    p.add_argument("--unet", default=None, help="a tuned UNet folder (OUT/unet of diffdpo.py)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--compare", action="store_true", help="rows: base, tuned (same seeds); needs --unet")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    prompts = list(a.prompt)
    if a.prompts:
        try:
            prompts += [line.strip() for line in Path(a.prompts).read_text().splitlines() if line.strip()]
        except OSError as e:
            sys.exit(f"error: --prompts {a.prompts}: {e.strerror}")
    if not prompts:
        sys.exit("error: give --prompt TEXT or --prompts FILE")
    if a.compare and not a.unet:
        sys.exit("error: --compare needs --unet (the tuned UNet folder)")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    try:
        sd = U.load_sd(a.model, device=a.device, dtype=dtype)
        tuned = U.load_component(a.unet, "unet", device=a.device, dtype=dtype) if a.unet else None
    except U.LoadError as e:
        sys.exit(f"error: {e}")
    kw = dict(steps=a.steps, guidance=a.guidance, height=a.height, width=a.width, negative_prompt=a.negative_prompt,
              sampler=a.sampler, progress=True)
    models = [("base", sd.unet), ("tuned", tuned)] if a.compare else [("tuned" if tuned else "base", tuned)]
    rows = []
    try:
        for label, net in models:
            row = []
            for i in range(0, len(prompts), a.batch_size):
                chunk = prompts[i:i + a.batch_size]
                latents = initial_latents(sd, len(chunk), a.height or default_size(sd), a.width or default_size(sd),
                                          a.seed + i)
                row += generate(sd, chunk, latents=latents, unet=net, **kw)
            rows.append(row)
            print(f"{label}: {len(row)} images")
    except ValueError as e:
        sys.exit(f"error: {e}")
    image_grid(rows, [lab for lab, _ in models], prompts).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
