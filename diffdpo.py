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
from tqdm import tqdm

import eval
import toy
from data import open_pairs, style_items
from files import DTYPES, UserError, read_json, write_text_atomic
from lora import LORA_FILE, LORA_TARGETS, add_lora, lora_disabled, merge_lora, save_lora
from sample import add_noise, alphas_cumprod, default_size, render, sample_grid
from shards import LatentCache, png_bytes, prefetch, write_pairs
from unet import load_sd, save_unet

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


def pair_noise(indices, latent_shape, seed, num_timesteps):
    """eps (B, C, h, w) and t (B,) for each pair, a pure function of (seed, the pair's index in the data stream):
    the same pair gets the same draw whatever the number of GPUs and across resumes. t ~ U{0..T-1}."""
    eps, ts = [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        eps.append(torch.randn(latent_shape, generator=g))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(eps), torch.cat(ts)


# ----------------------------------------------------------------------------------------------------------------
# Training configuration: every field is a command-line flag (--max-steps, --no-flip, ...). The field defaults are
# the toy world's, so `TrainConfig()` is `python diffdpo.py`; PRESETS hold the papers' recipes for real models.


def flag(default, help, resume="fixed"):
    """A config field with its --help text and what a resumed run does with it: "fixed" (a different value is
    refused) or "new" (the resumed run takes the new value and records it in config.json)."""
    return field(default=default, metadata=dict(help=help, resume=resume))


@dataclass
class TrainConfig:
    model: str = flag("tiny", "tiny (the toy model, embedded) | alias (sd15, sdxl) | Hub id | diffusers folder | "
                              ".safetensors")
    data: str = flag("shapes", "shapes (the toy world) | pickapic | hub:OWNER/NAME | parquet file/folder | "
                               "pairs.jsonl | style:FOLDER")
    preset: str = flag("auto", "the defaults of: toy | sd15 | sdxl | auto (toy for --model tiny, sdxl for SDXL "
                               "models, else sd15); flags given on the command line win")
    out: str = flag("", "run directory (re-running resumes from its checkpoint); default runs/PRESET[-METHOD]")
    loss: str = flag("dpo", "dpo | sft (plain diffusion loss on the preferred image)")
    beta: float = flag(2000.0, "KL strength, with the official code's 0.5 factor")
    max_steps: int = flag(200, "optimizer steps", resume="new")
    batch_size: int = flag(16, "pairs per device per micro-step")
    grad_accum: int = flag(1, "micro-steps per optimizer step")
    resolution: int = flag(32, "image side in pixels; 0 = the model's (512 SD1.5, 1024 SDXL)")
    lr: float = flag(3e-5, "learning rate actually used (official: 1e-8 x 2048 pairs)")
    scale_lr: bool = flag(False, "multiply --lr by the effective batch (pairs per step)")
    warmup_steps: int = flag(10, "linear warmup, then constant")
    optimizer: str = flag("adamw", "adamw | adafactor")
    weight_decay: float = flag(1e-2, "decoupled weight decay of the optimizer")
    grad_clip: float = flag(1.0, "clip the gradient's global norm at this value")
    mixed_precision: str = flag("auto", "no | fp16 | bf16 | auto (bf16 on GPU, no on CPU)")
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
    caption_dropout: float = flag(0.0, "probability of training on the empty prompt")
    random_crop: bool = flag(False, "random crops instead of center crops")
    cache: bool = flag(False, "keep VAE latents + text embeddings on disk (exact: both flips are stored), so steps "
                              "run only the UNets", resume="new")
    cache_dir: str = flag("", "where --cache keeps them (default ~/.cache/diffdpo)", resume="new")
    flip: bool = flag(True, "random horizontal flips (--no-flip to disable)")
    seed: int = flag(0, "seeds the data order, augmentation, noise and timesteps")
    checkpoint_every: int = flag(100, "optimizer steps between checkpoints (0: end only)", resume="new")
    samples: bool = flag(True, "write a sample grid (fixed prompts and seeds) at each checkpoint, to OUT/samples/",
                         resume="new")
    sample_steps: int = flag(20, "DDIM steps for those grids (and for pairs the run builds itself)", resume="new")
    max_bad_steps: int = flag(20, "stop after this many non-finite steps in a row", resume="new")
    device: str = flag("auto", "auto | cpu | cuda", resume="new")

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
        p = argparse.ArgumentParser(description=description, formatter_class=help_format, epilog=presets_help())
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
             checkpoint_every=500, sample_steps=25)
PRESETS = {
    # the toy world: the field defaults above (200 steps of batch 16 on on-policy shapes pairs, ~1.5 minutes)
    "toy": {f.name: f.default for f in fields(TrainConfig) if f.name not in ("preset", "out")},
    # the paper's SD1.5 recipe (FACTS: AdamW, warmup 500, 2000 steps, beta 5000, lr 1e-8 x 2048 pairs)
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


def presets_help():
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    rows = [f"  {name:5} " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items()
                                       if k not in ("model", "data") and v != defaults[k] or name == "toy" and
                                       k in ("beta", "max_steps", "batch_size", "lr", "warmup_steps", "resolution"))
            for name, values in PRESETS.items()]
    return "presets (the defaults shown above are the toy's):\n" + "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` is a world of one


def setup_distributed(device_flag):
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
# Optimizers: AdamW from torch, Adafactor (Shazeer & Stern 2018) in a few lines for SDXL's memory budget


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) as the official SDXL run configures transformers' one: factored second moments
    (row and column means of g^2 over the last two dims), no first moment, update RMS clipped at 1, weight decay,
    a fixed learning rate (scale_parameter=False, relative_step=False)."""

    def __init__(self, params, lr, weight_decay=0.0, beta2_decay=-0.8, eps=1e-30, clip=1.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, beta2_decay=beta2_decay, eps=eps, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad.float(), self.state[p]
                state["step"] = state.get("step", 0) + 1
                beta2 = 1.0 - state["step"] ** group["beta2_decay"]      # 1 - t^-0.8: grows towards 1
                g2 = g.square() + group["eps"]
                if g.ndim >= 2:  # factored over the last two dims: v ~ outer(row means, column means) / mean
                    r = state.setdefault("row", torch.zeros_like(g2.mean(-1)))
                    c = state.setdefault("col", torch.zeros_like(g2.mean(-2)))
                    r.lerp_(g2.mean(-1), 1 - beta2)
                    c.lerp_(g2.mean(-2), 1 - beta2)
                    v = (r / r.mean(-1, keepdim=True)).unsqueeze(-1) * c.unsqueeze(-2)
                else:
                    v = state.setdefault("v", torch.zeros_like(g)).lerp_(g2, 1 - beta2)
                u = g / v.sqrt()
                u /= (u.square().mean().sqrt() / group["clip"]).clamp_min(1.0)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])


def make_optimizer(cfg, params, lr, device):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")
    if cfg.optimizer == "adafactor":
        return Adafactor(params, lr=lr, weight_decay=cfg.weight_decay)
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
def unet_inputs(sd, batch, resolution, device, dtype):
    """Images and prompts to the UNet's inputs, for the batch [winners; losers] (2B):
    latents (2B, 4, R/8, R/8) = vae.encode(x) * scaling_factor, and cond = dict(context (2B, 77, D)) plus for SDXL
    text_embeds (2B, 1280) and time_ids (2B, 6) with original = target = (R, R), crop (0, 0).
    With --cache the batch already holds the latents and text embeddings."""
    if "context" in batch:
        latents = torch.cat([batch["chosen"], batch["rejected"]]).to(device).float()
        context, pooled = batch["context"].to(device), batch.get("pooled")
    else:
        images = torch.cat([batch["chosen"], batch["rejected"]]).to(device, dtype)
        latents = sd.vae.encode(images).float() * sd.vae.scaling_factor
        context, pooled = sd.encode_prompt(batch["prompts"])
    cond = dict(context=context.float().repeat(2, 1, 1))
    if sd.kind == "sdxl":
        cond.update(text_embeds=pooled.to(device).float().repeat(2, 1),
                    time_ids=sd.time_ids(len(latents), resolution, resolution, device=device))
    return latents, cond


def latent_cache(cfg, sd, resolution, device, dtype, embed_key=None):
    """The --cache store for this model, data and resolution (and reward / embedding models, if any), filled by the
    frozen VAE and text encoders."""
    key = [sd.source, cfg.data, resolution, sd.vae.scaling_factor]
    key = json.dumps(key + [x for x in (cfg.choice_model, embed_key) if x])
    folder = Path(cfg.cache_dir or Path.home() / ".cache" / "diffdpo") / hashlib.sha256(key.encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_images(xs):
        return sd.vae.encode(torch.stack(xs).to(device, dtype)).float() * sd.vae.scaling_factor

    @torch.no_grad()
    def encode_text(prompt):
        context, pooled = sd.encode_prompt([prompt])
        return dict(context=context[0].float(), **({} if pooled is None else dict(pooled=pooled[0].float())))
    return LatentCache(folder, encode_images, encode_text)


def save_checkpoint(cfg, out, policy, optimizer, scheduler, scaler, state):
    """OUT/unet/ (or the LoRA file) for users, and OUT/checkpoint.pt to resume from: the trainable weights, the
    optimizer, scheduler and scaler states, the stream position and RNG. Each file is written atomically."""
    if cfg.lora_rank:  # the adapters alone (the base is --model's), also as diffusers' load_lora_weights reads
        weights = {k: v for k, v in policy.state_dict().items() if ".lora_" in k}
        save_lora(policy, out / LORA_FILE)
    else:
        weights = policy.state_dict()
        save_unet(policy, out / "unet")
    ckpt = dict(unet=weights, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), rng=torch.get_rng_state(), **state)
    tmp = out / f"checkpoint.pt.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, out / "checkpoint.pt")


def load_checkpoint(out, run_cfg):
    """OUT/checkpoint.pt, or None; refuses a run whose "fixed" settings (see TrainConfig) differ from it."""
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # a key older runs did not record has its default
    fixed = [k for k in run_cfg["fixed"] if k in ckpt["config"] or k in defaults]
    for k in fixed + ["world_size"]:
        if ckpt["config"].get(k, defaults.get(k)) != run_cfg.get(k):
            raise UserError(f"{path} was made with {k}={ckpt['config'].get(k)!r}, this command has "
                            f"{k}={run_cfg.get(k)!r}; use another --out or the same settings to resume")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, pair_loss=None, image_embedder=None):
    """Fine-tune sd.unet on preference pairs. `pair_loss(err_w, err_l, ref_err_w, ref_err_l, batch, sd, world)` ->
    (loss, implicit_acc) replaces the DPO loss (rpo.py passes its own); the loop, data, checkpoints and logging stay
    the same. `image_embedder(device)` -> embed([preferred, rejected]) -> (2, D), with a `.key` naming it: image
    embeddings computed once per pair in the data path (and kept by --cache), as batch["chosen_emb"] / ["rejected_emb"].
    Returns the run folder."""
    rank, world, device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    amp_dtype, out = DTYPES[precision], Path(cfg.out)
    sd, policy, reference = load_models(cfg, device, amp_dtype)
    resolution = cfg.resolution or default_size(sd)
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
    pairs = open_training_pairs(cfg, sd, out, resolution, device, amp_dtype, image_embedder, rank, world)

    fixed = [f.name for f in fields(cfg) if f.metadata["resume"] == "fixed"]
    run_cfg = dict(asdict(cfg), world_size=world, resolution=resolution, lr_used=lr, mixed_precision=precision,
                   pairs_per_step=pairs_per_step, fixed=fixed)
    state = resume(cfg, out, run_cfg, policy, optimizer, scheduler, scaler, rank)
    if state["step"] >= cfg.max_steps:                                       # past the last checkpoint
        print0(f"{out} is already at step {state['step']} >= --max-steps {cfg.max_steps}", rank=rank)
        if rank == 0 and cfg.lora_rank and cfg.merge_lora:
            save_unet(merge_lora(policy), out / "unet")
        return finish(world, out)

    print0(f"{cfg.loss} on {sd.kind} ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params), "
           f"{pairs_per_step} pairs/step on {world} x {device.type}, lr {lr:.3g}, {precision} precision", rank=rank)
    batches = prefetch(pairs.batches(cfg.batch_size, rank=rank, world_size=world, start=state["position"]))
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=rank != 0, dynamic_ncols=True)
    bad_in_a_row = 0
    while state["step"] < cfg.max_steps:
        t0, logs = time.time(), []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            latents, cond = unet_inputs(sd, batch, resolution, device, amp_dtype)
            eps, t = (x.to(device) for x in cfg.draw_noise(batch, latents.shape[1:], len(abar)))
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

        m = all_mean(torch.stack(logs).mean(0), world).tolist()              # over micro-steps and ranks
        row = dict(step=state["step"], loss=m[0], implicit_acc=m[1], lr=lr_now, grad_norm=float(grad_norm),
                   pairs_per_s=pairs_per_step / (time.time() - t0), mse_w=m[2], mse_l=m[3], ref_mse_w=m[4],
                   ref_mse_l=m[5], skipped=state["skipped"], corrupt=batch["corrupt"], seconds=time.time() - t0)
        if rank == 0:
            log_row(out, row, bar)
        if bad_in_a_row >= cfg.max_bad_steps:
            if rank == 0:
                save_checkpoint(cfg, out, policy, optimizer, scheduler, scaler, dict(state, config=run_cfg))
            raise UserError(f"{bad_in_a_row} optimizer steps in a row had a non-finite loss/gradient; stopping "
                            f"(last good state saved in {out}); try a lower --lr or --mixed-precision bf16")
        if state["step"] == cfg.max_steps or (cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0):
            if rank == 0:
                checkpoint(cfg, sd, out, policy, optimizer, scheduler, scaler, dict(state, config=run_cfg), resolution)
    bar.close()
    batches.close()
    print0(f"done: {state['step']} steps, {state['skipped']} skipped, {batch['corrupt']} corrupt pairs skipped; "
           f"weights in {out / (LORA_FILE if cfg.lora_rank else 'unet')}", rank=rank)
    return finish(world, out)


def optimizer_step(policy, optimizer, scheduler, scaler, grad_clip):
    """Clip the gradient's norm and step, unless it is not finite (then the step is skipped: the caller counts it).
    Returns the gradient norm before clipping and the learning rate the step used."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    if torch.isfinite(grad_norm):
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
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
    """The training stream (data.open_pairs) for --data, with pairs the run builds itself first (rank 0 only, kept
    under OUT), the --cache store, image embeddings and --choice-model relabelling as configured."""
    spec = build_pairs(cfg, sd, out, resolution) if rank == 0 else built_pairs_path(cfg, out)
    if world > 1:
        dist.barrier()
    embed = image_embedder(device) if image_embedder else None
    cache = latent_cache(cfg, sd, resolution, device, amp_dtype, getattr(embed, "key", None)) if cfg.cache else None
    relabel = eval.relabeller(cfg.choice_model, device) if cfg.choice_model else None
    return open_pairs(spec or cfg.data, resolution=resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                      caption_dropout=cfg.caption_dropout, seed=cfg.seed, cache=cache, relabel=relabel, embed=embed)


def resume(cfg, out, run_cfg, policy, optimizer, scheduler, scaler, rank):
    """Load OUT/checkpoint.pt into the models and optimizer if there is one, write OUT/config.json and trim
    OUT/metrics.jsonl to the checkpoint's step. Returns the loop's state: step, position, skipped."""
    state = dict(step=0, position=0, skipped=0)
    ckpt = load_checkpoint(out, run_cfg)
    if ckpt is not None:
        policy.load_state_dict(ckpt["unet"], strict=not cfg.lora_rank)  # with LoRA: the adapters only
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = {k: ckpt[k] for k in state}
        torch.set_rng_state(ckpt["rng"])
        print0(f"resuming {out} from step {state['step']}", rank=rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(dict(run_cfg, command=" ".join(sys.argv)), indent=2))
        metrics = out / "metrics.jsonl"
        rows = metrics.read_text().splitlines() if metrics.exists() else []
        metrics.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= state["step"]))
    return state


def log_row(out, row, bar):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}", lr=f"{row['lr']:.2e}",
                    pairs_s=f"{row['pairs_per_s']:.2f}")
    bar.update(1)


SAMPLE_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube on top of a blue sphere",
                  "a watercolor painting of a fox in the snow", "a close-up portrait of an old fisherman"]


def checkpoint(cfg, sd, out, policy, optimizer, scheduler, scaler, state, resolution):
    """Save the checkpoint; at the last step, fold LoRA adapters into OUT/unet/ if asked; then the sample grid
    (fixed prompts and seeds, so grids across checkpoints are comparable)."""
    save_checkpoint(cfg, out, policy, optimizer, scheduler, scaler, state)
    if cfg.lora_rank and cfg.merge_lora and state["step"] == cfg.max_steps:
        save_unet(merge_lora(policy), out / "unet")
    if cfg.samples:
        prompts = toy.shape_prompts("test")[:8] if cfg.data in toy.WORLDS else SAMPLE_PROMPTS
        guidance = toy.TOY_SAMPLING["guidance"] if cfg.model == "tiny" else 7.5
        sample_grid(sd, policy, prompts, list(range(len(prompts))), out / "samples" / f"step{state['step']:06d}.png",
                    steps=cfg.sample_steps, height=resolution, width=resolution, guidance=guidance)


def finish(world, out):
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
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
    t0, guidance = time.time(), toy.TOY_SAMPLING["guidance"] if cfg.model == "tiny" else 7.5
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
    """Train; for a toy world (--data shapes|shapes-style), then evaluate (eval.evaluate_toy: OUT/summary.json,
    compare.png). A problem the user can fix (UserError: a bad --model, --data, setting...) ends with a one-line error
    and exit code 2."""
    t_start = time.time()
    try:
        out = train(cfg, pair_loss, image_embedder)
        if cfg.data in toy.WORLDS and int(os.environ.get("RANK", 0)) == 0:
            pairs_per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
            run = dict(loss=getattr(pair_loss, "name", cfg.method), steps=cfg.max_steps, pairs_per_step=pairs_per_step)
            summary = eval.evaluate_toy(cfg.model, cfg.data, out, run, t_start)
            print(f"held-out judge score: base {summary['judge_score_base']:.4f}, tuned "
                  f"{summary['judge_score_tuned']:.4f}; win rate vs base {summary['win_rate_vs_base']:.3f} "
                  f"({out / 'summary.json'}, {out / 'compare.png'})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pretrain-tiny"]:
        toy.pretrain_tiny(*sys.argv[2:3])
    else:
        main(TrainConfig.from_args())
