"""
Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024),
from the ELBO surrogate to a multi-GPU training run, in one file.

    python diffdpo.py                                            # the toy world (tiny model, shapes), a laptop CPU
    python diffdpo.py --model sd15 --data pickapic --out runs/dpo-sd15
    torchrun --nproc_per_node 8 diffdpo.py --model sdxl --data hub:OWNER/NAME --out runs/dpo-sdxl
    python diffdpo.py --pretrain-tiny [DIR]                      # remake the toy model (default: tiny/)

Read top to bottom: the ELBO surrogate and the DPO loss (the paper's Eq. 14), one DPO step (winner and loser share
t and eps), the training configuration with its presets, the trainer's pieces, the training loop and the CLI. The
noise schedule and the samplers are in sample.py, the networks in unet.py, the data in data.py.
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import eval
import runs
import toy
from data import open_pairs, style_items
from files import DTYPE_NAMES, DTYPES, UserError, read_json, write_atomic, write_text_atomic
from lora import LORA_FILE, LORA_TARGETS, add_lora, lora_disabled, merge_lora, save_lora
from sample import (add_noise, alphas_cumprod, default_size, guidance_embedding, image_grid, render,
                    sampling_defaults, vae_factor)
from shards import LatentCache, png_bytes, prefetch, write_pairs
from unet import ALIASES, load_sd, save_unet

# ----------------------------------------------------------------------------------------------------------------
# The ELBO surrogate and the DPO objective
#
# DPO (Rafailov et al. 2023) needs log-likelihood ratios log p_theta(x) / p_ref(x). A diffusion model's likelihood
# is intractable, so Diffusion-DPO (Wallace et al. 2024) works with whole chains x_{0:T} and bounds the loss with the
# ELBO (their Eq. 12-14). With x_t ~ q(x_t | x_0), t ~ U{0..T-1} and the reverse process written as noise
# predictions, each KL term of the ELBO is a weighted denoising error, which gives their Eq. 14:
#
#   L(theta) = -E_{(x^w, x^l), t, eps} log sigmoid( -beta T w(lambda_t) (
#                   ||eps^w - eps_theta(x^w_t, t)||^2 - ||eps^w - eps_ref(x^w_t, t)||^2
#                 - (||eps^l - eps_theta(x^l_t, t)||^2 - ||eps^l - eps_ref(x^l_t, t)||^2) ) )
#
# In practice (as for the simple diffusion loss) the weighting T w(lambda_t) is a constant folded into beta, the
# squared norms become per-image MEANS over C, H, W, and one (t, eps) sample per pair estimates the expectation;
# winner and loser share t and eps. The official code writes the constant as 0.5 * beta (beta = 5000 there); so do
# we: `--beta 5000` here equals `beta_dpo=2500` in the diffusers example, which omits the 0.5.


def prediction_target(x0, noise, t, abar, prediction_type="epsilon"):
    """What the network is trained to output: the noise eps (SD1.5, SDXL), or the velocity
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (SD2.x 768px; Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = abar.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise UserError(f"scheduler config: prediction_type={prediction_type!r} is not supported")


def denoising_losses(pred, target):
    """Per-image denoising error ||target - pred||^2 / (C H W): one number per image, (N,), computed in fp32.
    -denoising_losses is, up to the constants above, the ELBO estimate of log p(x_0) for each image."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta):
    """Diffusion-DPO loss (Eq. 14 with constant weighting), and the implicit accuracy. err_*: the policy's per-image
    denoising errors on the winners / losers, ref_err_*: the reference's, each (B,).
        inside = -0.5 beta ((err_w - err_l) - (ref_err_w - ref_err_l))
        loss   = -log sigmoid(inside), averaged over pairs
    inside > 0 means the policy improved on the winner relative to the loser more than the reference did; with
    policy == reference inside = 0 and the loss is exactly ln 2 = 0.6931."""
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))            # (B,)
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


def sft_loss(err_w):
    """Supervised fine-tuning baseline: the plain diffusion loss on the preferred image only."""
    return err_w.mean()


# ----------------------------------------------------------------------------------------------------------------
# One DPO step: B pairs as the batch [winners; losers] (2B images), one (t, eps) per pair shared by both images


def denoising_errors(unet, latents, cond, eps, t, abar, prediction_type):
    """Per-image denoising errors (N,) of `unet` at x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (sample.add_noise).
    cond: the UNet's text conditioning, dict(context=...) (+ text_embeds, time_ids for SDXL)."""
    x_t = add_noise(latents, eps, t, abar)
    return denoising_losses(unet(x_t, t, **cond), prediction_target(latents, eps, t, abar, prediction_type))


def dpo_errors(policy, reference, latents, cond, eps, t, abar, prediction_type):
    """What the DPO loss needs for B pairs: latents (2B, C, h, w) = [winners; losers] with their conditioning, eps
    (B, C, h, w) and t (B,) drawn once per pair. Returns err_w, err_l, ref_err_w, ref_err_l, each (B,).
    `reference` may be the policy itself with LoRA adapters (then switched off for the reference's pass)."""
    eps = eps.repeat(2, 1, 1, 1)                # (2B, C, h, w): the official code's noise.chunk(2)[0].repeat(2,1,1,1)
    t = t.repeat(2)                             # (2B,):         and timesteps.chunk(2)[0].repeat(2)
    err_w, err_l = denoising_errors(policy, latents, cond, eps, t, abar, prediction_type).chunk(2)
    with torch.no_grad(), lora_disabled(reference):
        ref_err_w, ref_err_l = denoising_errors(reference, latents, cond, eps, t, abar, prediction_type).chunk(2)
    return err_w, err_l, ref_err_w, ref_err_l


def sft_errors(policy, latents, cond, eps, t, abar, prediction_type):
    """The SFT baseline needs the winners' errors alone: (err_w, 0, 0, 0); the losers and no reference are run."""
    B = len(eps)
    err_w = denoising_errors(policy, latents[:B], {k: v[:B] for k, v in cond.items()}, eps, t, abar, prediction_type)
    zeros = torch.zeros_like(err_w)
    return err_w, zeros, zeros, zeros


def pair_generator(seed, index, stream=0):
    """A CPU generator that is a pure function of (seed, a pair's index in the data stream, which draw): the same
    pair gets the same numbers whatever the number of GPUs and across resumes."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(index) + stream * 2 ** 60)


def pair_noise(indices, latent_shape, seed, num_timesteps):
    """eps (B, C, h, w) and t (B,) for each pair: t ~ U{0..T-1}, eps ~ N(0, I)."""
    eps, ts = [], []
    for i in indices:
        g = pair_generator(seed, i)
        eps.append(torch.randn(latent_shape, generator=g))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(eps), torch.cat(ts)


def posterior_noise(indices, latent_shape, seed):
    """z (2B, C, h, w) = [z_winners; z_losers] ~ N(0, I), which turn the VAE's posteriors into latents:
    mean + std * z, the official code's `vae.encode(x).latent_dist.sample()`, drawn per pair like pair_noise."""
    z = torch.stack([torch.randn((2, *latent_shape), generator=pair_generator(seed, i, stream=1)) for i in indices])
    return torch.cat([z[:, 0], z[:, 1]])


# ----------------------------------------------------------------------------------------------------------------
# Training configuration: every field is a command-line flag (--max-steps, --no-flip, ...). The field defaults are
# the toy world's, so `TrainConfig()` is `python diffdpo.py`; PRESETS hold the papers' recipes for real models.


def flag(default, help, resume="fixed", choices=None):
    """A config field with its --help text, the values it may take (checked before any work, runs.validate), and
    what a resumed run does with it: "fixed" (a different value is refused) or "new" (the resumed run takes the new
    value and records it in config.json)."""
    return field(default=default, metadata=dict(help=help, resume=resume, choices=choices))


@dataclass
class TrainConfig:
    model: str = flag("tiny", "tiny (the toy model, embedded) | alias (sd15, sdxl) | Hub id | diffusers folder | "
                              ".safetensors")
    data: str = flag("shapes", "shapes (the toy world) | pickapic | hub:OWNER/NAME | parquet file/folder | "
                               "pairs.jsonl | style:FOLDER")
    preset: str = flag("auto", "the defaults of: toy | sd15 | sdxl | auto (toy for --model tiny, sdxl for SDXL "
                               "models, else sd15); flags given on the command line win", resume="new")
    out: str = flag("", "run directory (re-running resumes from its checkpoint); default runs/PRESET[-METHOD]",
                    resume="new")
    loss: str = flag("dpo", "dpo | sft (plain diffusion loss on the preferred image)", choices=("dpo", "sft"))
    beta: float = flag(2000.0, "KL strength, with the official code's 0.5 factor")
    max_steps: int = flag(200, "optimizer steps", resume="new")
    batch_size: int = flag(16, "pairs per device per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step")
    resolution: int = flag(32, "image side in pixels; 0 = the model's (512 SD1.5, 1024 SDXL)")
    lr: float = flag(3e-5, "learning rate actually used (official: 1e-8 x 2048 pairs)", resume="new")
    scale_lr: bool = flag(False, "multiply --lr by the effective batch (pairs per step)", resume="new")
    warmup_steps: int = flag(10, "linear warmup, then constant", resume="new")
    optimizer: str = flag("adamw", "adamw | adafactor", choices=("adamw", "adafactor"))
    weight_decay: float = flag(1e-2, "decoupled weight decay of the optimizer", resume="new")
    grad_clip: float = flag(1.0, "clip the gradient's global norm at this value", resume="new")
    mixed_precision: str = flag("auto", "no | fp16 | bf16 | auto (bf16 on GPU, no on CPU)", resume="new",
                                choices=("auto", "no", "fp16", "bf16"))
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory)", resume="new")
    channels_last: bool = flag(False, "the UNets in channels-last (NHWC) memory format: faster convolutions with "
                                      "oneDNN / cuDNN", resume="new")
    compile: bool = flag(False, "torch.compile the UNets", resume="new")
    lora_rank: int = flag(0, "train rank-R LoRA adapters, not the whole UNet (0: off)")
    lora_alpha: float = flag(0.0, "LoRA scale alpha / rank; 0 = rank (scale 1)")
    lora_targets: str = flag(LORA_TARGETS, "layers that get adapters (peft's suffix rule); add "
                                           "ff.net.0.proj,ff.net.2 for the feed-forwards")
    merge_lora: bool = flag(False, "at the last step, also write the merged OUT/unet/", resume="new")
    choice_model: str = flag("", "AI feedback: relabel every pair with a reward model, "
                                 "pickscore|hps|aesthetic|clip[=PATH] (ties dropped)")
    lcm_guidance: float = flag(8.5, "an LCM UNet's (time_cond_proj_dim) guidance-scale input while training "
                                    "(LatentConsistencyModelPipeline's default); other UNets ignore it")
    caption_dropout: float = flag(0.0, "probability of training on the empty prompt")
    random_crop: bool = flag(False, "random crops instead of center crops")
    vae_latents: str = flag("mean", "sample (a draw from the VAE posterior: the official code, the sd15 / sdxl "
                                    "presets) | mean (the toy's: tiny was pretrained on posterior means)",
                            choices=("sample", "mean"))
    val_pairs: int = flag(0, "hold out the first N pairs; each checkpoint logs val_loss, val_implicit_acc on them")
    cache: bool = flag(False, "keep VAE latents + text embeddings on disk (exact: both flips are stored), so steps "
                              "run only the UNets", resume="new")
    cache_dir: str = flag("", "where --cache keeps them (default ~/.cache/diffdpo)", resume="new")
    flip: bool = flag(True, "random horizontal flips (--no-flip to disable)")
    seed: int = flag(0, "seeds the data order, augmentation, noise and timesteps")
    checkpoint_every: int = flag(100, "optimizer steps between checkpoints (0: end only)", resume="new")
    save_on_signal: str = flag("TERM,USR1", f"on these signals (SLURM's, Kubernetes'), finish the optimizer step, "
                                            f"write the checkpoint and exit with status {runs.STOPPED}: re-run to "
                                            f"resume; a second signal stops at once ('' for none)", resume="new")
    samples: bool = flag(True, "write a sample grid (fixed prompts and seeds) at each checkpoint, to OUT/samples/",
                         resume="new")
    sample_steps: int = flag(20, "DDIM steps for those grids (and for pairs the run builds itself)", resume="new")
    max_bad_steps: int = flag(20, "stop after this many non-finite steps in a row", resume="new")
    device: str = flag("auto", "auto | cpu | cuda", resume="new", choices=("auto", "cpu", "cuda"))
    threads: int = flag(1, "CPU threads for torch's operators (0: torch's default). The toy's 1: on 2 idle cores 2 "
                           "threads are 1.3x faster, beside other jobs 4-8x slower (README)", resume="new")
    report_to: str = flag("", "also log to tensorboard | wandb (needs that package)", resume="new",
                          choices=("", "tensorboard", "wandb"))
    push_to_hub: str = flag("", "at the end, upload the weights and a model card to this Hub repo (OWNER/NAME)",
                            resume="new")

    def __post_init__(self):
        self.preset = auto_preset(self.model) if self.preset == "auto" else self.preset
        self.out = self.out or f"runs/{self.preset}" + ("" if self.method == "dpo" else f"-{self.method}")

    @property
    def method(self):
        """The method's name, in the default run folder and the toy's summary.json (rpo.py's config says "rpo")."""
        return self.loss

    def draw_noise(self, batch, latent_shape, num_timesteps):
        """eps (B, C, h, w) and t (B,) for the batch's pairs: pair_noise of each pair's stream index."""
        return pair_noise(batch["index"], latent_shape, self.seed, num_timesteps)

    @classmethod
    def from_preset(cls, name, **overrides):
        """A config with a named preset's defaults (see PRESETS), then `overrides`."""
        if name not in PRESETS:
            raise UserError(f"--preset {name}: expected one of {', '.join(PRESETS)} or auto")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_args(cls, argv=None, description=__doc__):
        """One flag per field (defaults and help from the dataclass); the preset chosen by --preset (or by --model
        when auto) replaces the defaults, and the flags given on the command line replace those."""
        help_format = type("Help", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
        p = argparse.ArgumentParser(description=description, formatter_class=help_format, epilog=presets_help(cls))
        for f in fields(cls):
            name, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=f.metadata["help"])
            if f.type in (bool, "bool"):
                p.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
            else:
                p.add_argument(name, type=type(f.default), **kw)
        first = p.parse_known_args(argv)[0]
        preset = auto_preset(first.model) if first.preset == "auto" else first.preset
        if preset not in PRESETS:
            p.error(f"--preset {preset}: expected one of {', '.join(PRESETS)} or auto")
        p.set_defaults(**PRESETS[preset])
        return cls(**dict(vars(p.parse_args(argv)), preset=preset))


PAPER = dict(beta=5000.0, max_steps=2000, batch_size=1, resolution=0, lr=2.048e-5, warmup_steps=500,
             checkpoint_every=500, sample_steps=25, threads=0, vae_latents="sample")
PRESETS = {
    # the toy world: the field defaults above (200 steps of batch 16 on on-policy shapes pairs, ~1.5 minutes)
    "toy": {f.name: f.default for f in fields(TrainConfig) if f.name not in ("preset", "out")},
    # the paper's SD1.5 recipe (the official code's: AdamW, warmup 500, 2000 steps, beta 5000, lr 1e-8 x 2048 pairs)
    "sd15": PAPER,
    # and SDXL's: Adafactor, warmup 200, gradient checkpointing
    "sdxl": dict(PAPER, optimizer="adafactor", warmup_steps=200, grad_checkpointing=True),
}


def auto_preset(model):
    """--preset auto: toy for the tiny model; sdxl for SDXL (the alias, a folder with a second text encoder, or a
    Hub id with "xl" in its name); sd15 otherwise."""
    if model == "tiny":
        return "toy"
    folder = Path(model)
    if (folder / "model_index.json").is_file():
        return "sdxl" if "text_encoder_2" in read_json(folder / "model_index.json") else "sd15"
    return "sdxl" if "xl" in model.lower() else "sd15"


def presets_help(cls=None):
    """--help's epilog: each preset's defaults, and what a resumed run does with each setting."""
    cls = cls or TrainConfig
    defaults = {f.name: f.default for f in fields(cls)}
    shown = ("beta", "max_steps", "batch_size", "lr", "warmup_steps", "resolution", "threads", "vae_latents")
    rows = [f"  {name:5} " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items()
                                       if k not in ("model", "data") and (v != defaults[k] or name == "toy" and
                                                                          k in shown))
            for name, values in PRESETS.items()]
    policy = {r: [f"--{f.name.replace('_', '-')}" for f in fields(cls) if f.metadata["resume"] == r]
              for r in ("fixed", "new")}
    return ("presets (the defaults shown above are the toy's):\n" + "\n".join(rows) + "\n\nresuming (the same --out "
            "again): these must not change, else the run refuses to start: " + " ".join(policy["fixed"]) +
            "\nthese take the new value (recorded in OUT/config.json): " + " ".join(policy["new"]))


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` is a world of one


def setup_distributed(device_flag, threads=0):
    """(rank, world size, device); `threads` > 0 sets torch's CPU threads."""
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def all_mean(x, world):
    """Mean of a tensor over ranks (for logging)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def print0(*args, rank=0):
    if rank == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Optimizers: AdamW from torch, Adafactor (Shazeer & Stern 2018; runs.py) for SDXL's memory budget


def make_optimizer(cfg, params, lr, device):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")
    if cfg.optimizer == "adafactor":
        return runs.Adafactor(params, lr=lr, weight_decay=cfg.weight_decay)
    raise UserError(f"--optimizer {cfg.optimizer!r}: expected adamw or adafactor")


def warmup_constant(warmup_steps):
    """lr multiplier: linear warmup over `warmup_steps` optimizer steps (the first step already moves), then 1."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


# ----------------------------------------------------------------------------------------------------------------
# The trainer's pieces: models, UNet inputs, the latent cache, checkpoints


def load_models(cfg, device, amp_dtype):
    """The base pipeline `sd` with frozen VAE and text encoders, the policy (sd.unet, trainable, fp32 master
    weights) and the reference: a frozen copy in the autocast precision, the policy itself with LoRA (run with the
    adapters switched off), or None for SFT."""
    sd = load_sd(cfg.model, device=device, dtype=torch.float32)
    for m in sd.modules:
        m.requires_grad_(False).eval()
    for m in sd.text_encoders:
        m.to(amp_dtype)
    sd.vae.to(torch.float32 if amp_dtype == torch.float16 and sd.kind == "sdxl" else amp_dtype)  # SDXL's overflows
    policy = sd.unet
    if cfg.channels_last:  # weights in NHWC: convolutions then keep activations NHWC too (the reference copies it)
        policy.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(policy).to(amp_dtype) if cfg.loss != "sft" and not cfg.lora_rank else None
    policy.requires_grad_(True).train()
    if cfg.lora_rank:  # only rank-r adapters train; the reference is the same UNet with them switched off
        layers = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        reference = policy if cfg.loss != "sft" else None
        print0(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank:g} on {len(layers)} layers: "
               f"{sum(p.numel() for p in policy.parameters() if p.requires_grad)} trainable parameters")
    policy.set_grad_checkpointing(cfg.grad_checkpointing)
    return sd, policy, reference


@torch.no_grad()
def unet_inputs(sd, batch, resolution, device, dtype, z=None, lcm_guidance=8.5):
    """Images and prompts to the UNet's inputs, for the batch [winners; losers] (2B):
    latents (2B, 4, R/8, R/8) = (mean + std * z) * scaling_factor from the VAE's posterior (its mean when z is None),
    and cond = dict(context (2B, 77, D)) plus for SDXL text_embeds (2B, 1280) and time_ids (2B, 6) with original =
    target = (R, R), crop (0, 0); for an LCM UNet timestep_cond (2B, time_cond_proj_dim), its guidance input held at
    lcm_guidance (the loss is unchanged). With --cache the batch already holds the posteriors and text embeddings."""
    if "context" in batch:
        mean = torch.cat([batch["chosen"], batch["rejected"]]).to(device).float()
        std = torch.cat([batch["chosen_std"], batch["rejected_std"]]).to(device).float()
        context, pooled = batch["context"].to(device), batch.get("pooled")
    else:
        images = torch.cat([batch["chosen"], batch["rejected"]]).to(device, dtype)
        mean, std = (x.float() * sd.vae.scaling_factor for x in sd.vae.posterior(images))
        context, pooled = sd.encode_prompt(batch["prompts"])
    latents = mean if z is None else mean + std * z.to(device)
    cond = dict(context=context.float().repeat(2, 1, 1))
    if sd.kind == "sdxl":
        cond.update(text_embeds=pooled.to(device).float().repeat(2, 1),
                    time_ids=sd.time_ids(len(latents), resolution, resolution, device=device))
    if sd.unet.cfg.time_cond_proj_dim:
        w = torch.full((len(latents),), lcm_guidance - 1.0)
        cond.update(timestep_cond=guidance_embedding(w, sd.unet.cfg.time_cond_proj_dim).to(device))
    return latents, cond


def latent_cache(cfg, sd, resolution, device, dtype, embed_key=None):
    """The --cache store for this model, data and resolution (and reward / embedding models, if any), filled by the
    frozen VAE and text encoders: per image the posterior's mean and std, scaled."""
    key = ["posterior", sd.source, cfg.data, resolution, sd.vae.scaling_factor]
    key = json.dumps(key + [x for x in (cfg.choice_model, embed_key) if x])
    folder = Path(cfg.cache_dir or Path.home() / ".cache" / "diffdpo") / hashlib.sha256(key.encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_images(xs):
        return (x.float() * sd.vae.scaling_factor for x in sd.vae.posterior(torch.stack(xs).to(device, dtype)))

    @torch.no_grad()
    def encode_text(prompt):
        context, pooled = sd.encode_prompt([prompt])
        return dict(context=context[0].float(), **({} if pooled is None else dict(pooled=pooled[0].float())))
    return LatentCache(folder, encode_images, encode_text)


def save_checkpoint(cfg, out, policy, optimizer, scheduler, scaler, state, pairs):
    """OUT/checkpoint.pt to resume from (the trainable weights, the optimizer, scheduler and scaler states, the stream
    position, the RNG and the pairs skipped so far), then the weights for users: written in this order, the user's
    weights are never ahead of the checkpoint (a full disk stops the run between the two at worst)."""
    weights = policy.state_dict()
    if cfg.lora_rank:  # the adapters alone (the base is --model's)
        weights = {k: v for k, v in weights.items() if ".lora_" in k}
    runs.save_checkpoint(out / "checkpoint.pt", dict(
        unet=weights, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
        rng=torch.get_rng_state(), skipped_pairs={k: sorted(v) for k, v in pairs.skipped.items()}, **state))
    save_weights(cfg, out, policy)


def save_weights(cfg, out, policy):
    """OUT/unet/ in the diffusers layout, or with LoRA the adapters alone (as diffusers' load_lora_weights reads)."""
    if cfg.lora_rank:
        save_lora(policy, out / LORA_FILE)
    else:
        save_unet(policy, out / "unet")


def resume(cfg, out, run_cfg, policy, optimizer, scheduler, scaler, pairs, rank):
    """Load OUT/checkpoint.pt into the models, optimizer and data stream if there is one (refusing a changed "fixed"
    setting; applying the new learning rate, warmup and weight decay), write OUT/config.json and trim
    OUT/metrics.jsonl to the checkpoint's step. Returns the loop's state: step, position, skipped (steps)."""
    state = dict(step=0, position=0, skipped=0)
    ckpt = runs.load_checkpoint(out / "checkpoint.pt")
    if ckpt is not None:
        for k in run_cfg["fixed"] + ["world_size"]:
            if k in ckpt["config"] and ckpt["config"][k] != run_cfg[k]:
                raise UserError(f"{out / 'checkpoint.pt'} was made with {k}={ckpt['config'][k]!r}, this command has "
                                f"{k}={run_cfg[k]!r}; use another --out or the same settings to resume")
        policy.load_state_dict(ckpt["unet"], strict=not cfg.lora_rank)  # with LoRA: the adapters only
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt["scaler"]:                        # fp16's loss scale (none for fp32, bf16)
            scaler.load_state_dict(ckpt["scaler"])
        scheduler.base_lrs = [run_cfg["lr_used"]] * len(optimizer.param_groups)
        for group in optimizer.param_groups:                              # "new" settings take effect now
            group.update(initial_lr=run_cfg["lr_used"], weight_decay=cfg.weight_decay,
                         lr=run_cfg["lr_used"] * warmup_constant(cfg.warmup_steps)(scheduler.last_epoch))
        state = {k: ckpt[k] for k in state}
        pairs.skipped.update({k: set(v) for k, v in ckpt["skipped_pairs"].items()})
        torch.set_rng_state(ckpt["rng"])
        print0(f"resuming {out} from step {state['step']}", rank=rank)
    if rank == 0:
        write_text_atomic(out / "config.json", json.dumps(dict(run_cfg, command=" ".join(sys.argv)), indent=2))
        runs.trim_metrics(out / "metrics.jsonl", state["step"])
    return state


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, pair_loss=None, image_embedder=None):
    """Fine-tune sd.unet on preference pairs. `pair_loss(err_w, err_l, ref_err_w, ref_err_l, batch, sd, world)` ->
    (loss, implicit_acc) replaces the DPO loss (rpo.py passes its own); the loop, data, checkpoints and logging stay
    the same. `image_embedder(device)` -> embed([preferred, rejected]) -> (2, D), with a `.key` naming it: image
    embeddings computed once per pair in the data path (and kept by --cache), as batch["chosen_emb"] / ["rejected_emb"].
    Returns the run folder."""
    rank, world, device = setup_distributed(cfg.device, cfg.threads)
    out = Path(cfg.out)
    runs.validate(cfg, device, built=built_pairs_path(cfg, out) is not None)
    lock = runs.lock(out) if rank == 0 else None                  # one run per --out, held until this one ends
    stop = runs.StopSignals(cfg.save_on_signal, rank)             # --save-on-signal; until the loop: stop at once
    torch.manual_seed(cfg.seed)
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    amp_dtype = DTYPES[precision]
    sd, policy, reference = load_models(cfg, device, amp_dtype)
    resolution = cfg.resolution or default_size(sd)
    latent_shape = (sd.unet.cfg.in_channels, resolution // vae_factor(sd), resolution // vae_factor(sd))
    abar = alphas_cumprod(sd.scheduler_config).to(device)
    ptype = sd.scheduler_config.get("prediction_type", "epsilon")
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=precision != "no")
    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    fwd_policy = torch.compile(model) if cfg.compile else model
    fwd_reference = torch.compile(reference) if cfg.compile and reference is not None else reference

    pairs_per_step = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr * pairs_per_step if cfg.scale_lr else cfg.lr
    optimizer = make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad], lr, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    pair_loss = method_loss(cfg, pair_loss)
    pairs, val = open_training_pairs(cfg, sd, out, resolution, device, amp_dtype, image_embedder, rank, world)
    fixed = [f.name for f in fields(cfg) if f.metadata["resume"] == "fixed"]
    run_cfg = dict(asdict(cfg), world_size=world, resolution=resolution, lr_used=lr, mixed_precision=precision,
                   pairs_per_step=pairs_per_step, fixed=fixed)
    state = resume(cfg, out, run_cfg, policy, optimizer, scheduler, scaler, pairs, rank)
    if state["step"] >= cfg.max_steps:                                       # past the last checkpoint
        print0(f"{out} is already at step {state['step']} >= --max-steps {cfg.max_steps}", rank=rank)
        if rank == 0:  # the checkpoint's weights again: a full disk may have stopped their last write
            save_weights(cfg, out, policy)
            if cfg.lora_rank and cfg.merge_lora:
                save_unet(merge_lora(policy), out / "unet")
        return finish(world, out, lock, stop)

    what = f"{LAYOUTS[sd.kind]}, UNet {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params"
    print0(f"{cfg.method} on {model_name(cfg.model)} ({what}), {pairs_per_step} pairs/step on {world} x "
           f"{device.type}, lr {lr:.3g}, {DTYPE_NAMES[amp_dtype]} precision", rank=rank)
    batches = prefetch(pairs.batches(cfg.batch_size, rank=rank, world_size=world, start=state["position"]))
    log = runs.Log(out, run_cfg, cfg.report_to, cfg.max_steps, state["step"]) if rank == 0 else None
    bad_in_a_row = 0
    stop.at_step_end()
    while state["step"] < cfg.max_steps:
        t0, logs = time.time(), []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            z = posterior_noise(batch["index"], latent_shape, cfg.seed) if cfg.vae_latents == "sample" else None
            latents, cond = unet_inputs(sd, batch, resolution, device, amp_dtype, z, cfg.lcm_guidance)
            eps, t = (x.to(device) for x in cfg.draw_noise(batch, latent_shape, len(abar)))
            last = micro == cfg.grad_accum - 1
            with model.no_sync() if world > 1 and not last else torch.enable_grad(), autocast:
                if reference is None:  # SFT
                    errors = sft_errors(fwd_policy, latents, cond, eps, t, abar, ptype)
                else:
                    errors = dpo_errors(fwd_policy, fwd_reference, latents, cond, eps, t, abar, ptype)
                loss, acc = pair_loss(*errors, batch, sd, world)
            scaler.scale(loss / cfg.grad_accum).backward()
            state["position"] = batch["position"]
            logs.append(torch.stack([loss.detach().float(), acc.float(), *(e.detach().mean() for e in errors)]).cpu())

        grad_norm, lr_now = optimizer_step(policy, optimizer, scheduler, scaler, cfg.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        state["skipped"] += not finite
        bad_in_a_row = 0 if finite else bad_in_a_row + 1
        state["step"] += 1
        row = metrics_row(state, logs, world, pairs, grad_norm, lr_now, pairs_per_step, time.time() - t0)
        if rank == 0:
            log.row(row)
        if bad_in_a_row >= cfg.max_bad_steps:
            raise diverged(out, bad_in_a_row)
        saved = state["step"] == cfg.max_steps or cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0
        if rank == 0 and saved:
            checkpoint(cfg, sd, out, policy, optimizer, scheduler, scaler, dict(state, config=run_cfg), pairs)
            if val is not None:
                log.row(dict(step=state["step"], **validation(cfg, sd, policy, reference, val, pair_loss,
                                                              latent_shape, resolution, abar, ptype, autocast)))
            log.grid(samples(cfg, sd, out, policy, reference, state["step"], resolution), state["step"])
        if stop.requested(device):  # a --save-on-signal signal on any rank: every rank stops after this step
            if rank == 0 and not saved:
                checkpoint(cfg, sd, out, policy, optimizer, scheduler, scaler, dict(state, config=run_cfg), pairs)
            if rank == 0:
                log.close()
            batches.close()
            stop.exit(state["step"], finish(world, out, lock, stop))
    batches.close()
    if rank == 0:
        log.close()
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in row.items() if k in SKIP_COUNTS)
        print(f"done: {state['step']} steps ({state['skipped']} skipped); pairs left out: {counts}; weights in "
              f"{out / (LORA_FILE if cfg.lora_rank else 'unet')}")
    return finish(world, out, lock, stop)


SKIP_COUNTS = ("corrupt", "too_large", "ties", "bad_labels", "empty_captions", "long_captions")


def metrics_row(state, logs, world, pairs, grad_norm, lr, pairs_per_step, seconds):
    """metrics.jsonl's row of one optimizer step: the loss terms averaged over micro-steps and ranks, the optimizer's
    numbers, and the counts of steps and pairs left out so far."""
    m = all_mean(torch.stack(logs).mean(0), world).tolist()
    return dict(step=state["step"], loss=m[0], implicit_acc=m[1], lr=lr, grad_norm=float(grad_norm),
                pairs_per_s=pairs_per_step / seconds, mse_w=m[2], mse_l=m[3], ref_mse_w=m[4], ref_mse_l=m[5],
                skipped=state["skipped"], **gathered_counts(pairs, world), seconds=seconds)


def diverged(out, bad_in_a_row):
    """The error that stops a run after --max-bad-steps non-finite steps in a row, naming the step its last
    checkpoint holds (checkpoints are written only with finite weights)."""
    held = runs.load_checkpoint(out / "checkpoint.pt")
    where = (f"{out / 'checkpoint.pt'} holds step {held['step']}, the last checkpoint (its weights are finite)" if held
             else "no checkpoint was written yet")
    return UserError(f"{bad_in_a_row} optimizer steps in a row had a non-finite loss/gradient; stopping: {where}; try "
                     f"a lower --lr or --mixed-precision bf16 and re-run the command to resume")


def gathered_counts(pairs, world):
    """The stream's counts of pairs left out, each pair once (data.PairSource.counts): every rank's skipped pairs are
    merged, so each rank counts the union."""
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, pairs.skipped)
        for other in everyone:
            for reason, keys in other.items():
                pairs.skipped[reason] |= keys
    return {k: pairs.counts().get(k, 0) for k in SKIP_COUNTS}


LAYOUTS = {"sd15": "SD1.5's layout", "sdxl": "SDXL's layout"}


def model_name(model):
    return "tiny, the toy model" if model == "tiny" else model


def optimizer_step(policy, optimizer, scheduler, scaler, grad_clip):
    """Clip the gradient's norm and step, unless it is not finite (then the step is skipped: the caller counts it).
    Returns the gradient norm before clipping and the learning rate the step used."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    if torch.isfinite(grad_norm):
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    return grad_norm, lr


def method_loss(cfg, pair_loss=None):
    """(err_w, err_l, ref_err_w, ref_err_l, batch, sd, world) -> (loss, implicit accuracy): rpo.py's `pair_loss` if
    given, else DPO's (or SFT's, for --loss sft)."""
    if pair_loss is not None:
        return pair_loss
    if cfg.loss == "sft":
        return lambda err_w, *rest: (sft_loss(err_w), torch.zeros(()))
    return lambda err_w, err_l, ref_err_w, ref_err_l, *rest: dpo_loss(err_w, err_l, ref_err_w, ref_err_l, cfg.beta)


def open_training_pairs(cfg, sd, out, resolution, device, amp_dtype, image_embedder, rank, world):
    """(training stream, validation pairs or None): data.open_pairs for --data, with pairs the run builds itself
    first (rank 0 only, kept under OUT), the --cache store, image embeddings, --choice-model relabelling and
    --val-pairs held out, as configured."""
    spec = build_pairs(cfg, sd, out, resolution) if rank == 0 else built_pairs_path(cfg, out)
    if world > 1:
        dist.barrier()
    embed = image_embedder(device) if image_embedder else None
    cache = latent_cache(cfg, sd, resolution, device, amp_dtype, getattr(embed, "key", None)) if cfg.cache else None
    relabel = eval.relabeller(cfg.choice_model, device) if cfg.choice_model else None
    pairs = open_pairs(spec or cfg.data, resolution=resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                       caption_dropout=cfg.caption_dropout, seed=cfg.seed, cache=cache, relabel=relabel, embed=embed)
    return pairs.holdout(cfg.val_pairs) if cfg.val_pairs else (pairs, None)


@torch.no_grad()
def validation(cfg, sd, policy, reference, val, pair_loss, latent_shape, resolution, abar, ptype, autocast):
    """The loss and implicit accuracy on the held-out pairs (--val-pairs), each with its own fixed noise, timestep
    and posterior draw (pair_noise of its index + 2^40), so the values are comparable across checkpoints."""
    n, totals = cfg.val_pairs, torch.zeros(2)
    for start in range(0, n, cfg.batch_size):
        idx = list(range(start, min(n, start + cfg.batch_size)))
        items = [val.item(i) for i in idx]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
        batch.update(prompts=[it["prompt"] for it in items], index=torch.tensor(idx))
        held_out = [i + 2 ** 40 for i in idx]                       # noise draws of their own, not training pairs'
        z = posterior_noise(held_out, latent_shape, cfg.seed) if cfg.vae_latents == "sample" else None
        latents, cond = unet_inputs(sd, batch, resolution, sd.device, next(sd.vae.parameters()).dtype, z,
                                    cfg.lcm_guidance)
        eps, t = (x.to(sd.device) for x in pair_noise(held_out, latent_shape, cfg.seed, len(abar)))
        with autocast:
            if reference is None:
                errors = sft_errors(policy, latents, cond, eps, t, abar, ptype)
            else:
                errors = dpo_errors(policy, reference, latents, cond, eps, t, abar, ptype)
            loss, acc = pair_loss(*errors, batch, sd, 1)
        totals += torch.stack([loss.float(), acc.float()]).cpu() * len(idx)
    return dict(val_loss=(totals[0] / n).item(), val_implicit_acc=(totals[1] / n).item(), val_pairs=n)


SAMPLE_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube on top of a blue sphere",
                  "a watercolor painting of a fox in the snow", "a close-up portrait of an old fisherman"]


def checkpoint(cfg, sd, out, policy, optimizer, scheduler, scaler, state, pairs):
    """Save the checkpoint (unless a weight is not finite: then the last one, which is, stays); at the last step,
    fold LoRA adapters into OUT/unet/ if asked."""
    if not all(torch.isfinite(p).all() for p in policy.parameters() if p.requires_grad):
        print0(f"step {state['step']}: non-finite weights, {out / 'checkpoint.pt'} is not overwritten")
        return
    save_checkpoint(cfg, out, policy, optimizer, scheduler, scaler, state, pairs)
    if cfg.lora_rank and cfg.merge_lora and state["step"] == cfg.max_steps:
        save_unet(merge_lora(policy), out / "unet")


def samples(cfg, sd, out, policy, reference, step, resolution):
    """OUT/samples/stepNNNNNN.png: the base model's images (row 1, rendered once and kept in OUT/samples/base/) and
    the policy's at this step (row 2), for fixed prompts and seeds, so grids across checkpoints are comparable."""
    if not cfg.samples:
        return None
    prompts = toy.shape_prompts("test")[:8] if cfg.data in toy.WORLDS else SAMPLE_PROMPTS
    kw = dict(steps=cfg.sample_steps, height=resolution, width=resolution,
              guidance=sampling_defaults(cfg.model)[1])
    seeds, folder = list(range(len(prompts))), out / "samples" / "base"
    base = [folder / f"{i:02d}.png" for i in seeds]
    if not all(p.is_file() for p in base):
        base_unet = reference if reference is not None else load_sd(cfg.model, device=sd.device).unet
        with lora_disabled(base_unet):
            for path, image in zip(base, render(sd, base_unet, prompts, seeds, **kw)):
                write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
    tuned = render(sd, policy, prompts, seeds, **kw)
    grid = image_grid([[Image.open(p).convert("RGB") for p in base], tuned], ["base", f"step {step}"], prompts)
    path = out / "samples" / f"step{step:06d}.png"
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


def finish(world, out, lock, stop=None):
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if lock is not None:
        lock.close()
    if stop is not None:
        stop.close()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Pairs the run builds itself with the base model before training (then read as any parquet shard):
#   shapes        the toy world's on-policy pairs, labelled by its judge (toy.build_shape_pairs)
#   shapes-style  its style alignment: each base generation's styled edit preferred (toy.build_style_pairs)
#   style:FOLDER  style alignment (Diffusion-RPO's second task): each style image preferred over the base model's
#                 own generation for its caption


def built_pairs_path(cfg, out):
    """Where the pairs of a built --data spec live (OUT/shapes_pairs.parquet, OUT/shapes_style_pairs.parquet,
    OUT/style_pairs.parquet), or None."""
    if cfg.data in toy.WORLDS:
        return out / f"{cfg.data.replace('-', '_')}_pairs.parquet"
    return out / "style_pairs.parquet" if cfg.data.startswith("style:") else None


def build_pairs(cfg, sd, out, resolution):
    """Build the pairs of --data shapes / shapes-style / style:FOLDER unless OUT already holds them; returns their
    path (None for data that is read, not built)."""
    path = built_pairs_path(cfg, out)
    if path is None or path.exists():
        return path
    t0, guidance = time.time(), sampling_defaults(cfg.model)[1]
    if cfg.data in toy.WORLDS:
        n = toy.build_world_pairs(cfg.data, sd, path, toy.TOY_PAIRS, cfg.seed)
    else:
        n = build_style_pairs(sd, cfg.data[len("style:"):], path, resolution, cfg.sample_steps, guidance, cfg.seed)
    print0(f"built {path}: {n} pairs ({time.time() - t0:.0f} s)")
    return path


@torch.no_grad()
def build_style_pairs(sd, folder, path, resolution, steps, guidance, seed=0):
    """Style image i (preferred) against the base model's generation for its caption (seed --seed + i, `steps` DDIM
    steps). Returns the number of pairs."""
    items = style_items(folder)
    prompts = [c for c, _ in items]
    images = render(sd, sd.unet, prompts, [seed + i for i in range(len(items))], batch_size=8, steps=steps,
                    guidance=guidance, height=resolution, width=resolution)
    write_pairs(path, prompts, [p.read_bytes() for _, p in items], [png_bytes(i) for i in images], [1.0] * len(items))
    return len(items)


# ----------------------------------------------------------------------------------------------------------------
# The command line: train, then (for the toy world) evaluate base vs tuned on held-out captions


def main(cfg, pair_loss=None, image_embedder=None):
    """Train; for a toy world (--data shapes|shapes-style), then evaluate base vs tuned on its held-out captions
    (eval.evaluate_toy: OUT/summary.json, OUT/compare.png); with --push-to-hub, upload the result. A problem the user
    can fix (a bad --model, --data or setting, a busy or unwritable --out, ...) ends with a one-line error, exit 2."""
    t_start, rank = time.time(), int(os.environ.get("RANK", 0))
    print0(f"diffdpo: {cfg.method} on {model_name(cfg.model)}, --data {cfg.data}, writing {cfg.out}/", rank=rank)
    try:
        out = train(cfg, pair_loss, image_embedder)
        if rank == 0 and cfg.data in toy.WORLDS:
            pairs_per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
            run = dict(loss=getattr(pair_loss, "name", cfg.method), steps=cfg.max_steps, pairs_per_step=pairs_per_step)
            eval.evaluate_toy(cfg.model, cfg.data, out, run, t_start)
        if rank == 0 and cfg.push_to_hub:
            config = dict(read_json(out / "config.json"), method=getattr(pair_loss, "name", cfg.method))
            weights = LORA_FILE if cfg.lora_rank and not cfg.merge_lora else "unet"
            card = runs.model_card(config, ALIASES.get(cfg.model, cfg.model), cfg.push_to_hub, out, weights)
            runs.push_to_hub(cfg.push_to_hub, out, card)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pretrain-tiny"]:
        toy.pretrain_tiny(*sys.argv[2:3])
    else:
        main(TrainConfig.from_args())
