"""
Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024),
from the noise schedule to a multi-GPU training run, in one file.

    python diffdpo.py --model sd15 --data pickapic --out runs/dpo-sd15

Read top to bottom: the noise schedule (DDPM), the ELBO surrogate of the log-likelihood, the DPO loss, then the
trainer (config, data, model, optimizer, loop) and the CLI. The networks are in unet.py, the data in data.py.
"""
import torch
import torch.nn.functional as F

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
    raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported (scaled_linear or linear)")


def alphas_cumprod(scheduler_config):
    """abar_t = prod_{s<=t} (1 - beta_s): the fraction of signal variance left at step t (float32, as diffusers)."""
    return torch.cumprod(1.0 - betas(scheduler_config), dim=0)


def add_noise(x0, noise, t, abar):
    """Sample q(x_t | x_0) by reparameterization: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    a = abar.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def prediction_target(x0, noise, t, abar, prediction_type="epsilon"):
    """What the network is trained to output: the noise eps (SD1.5, SDXL), or the velocity
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (SD2.x 768px; Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = abar.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"scheduler config: prediction_type={prediction_type!r} is not supported")


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


def denoising_losses(pred, target):
    """Per-image denoising error ||target - pred||^2 / (C H W): one number per image, (N,), computed in fp32.
    -denoising_losses is, up to the constants above, the ELBO estimate of log p(x_0) for each image."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def dpo_loss(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta):
    """Diffusion-DPO loss (Eq. 14 with constant weighting), and the implicit accuracy.
        inside = -0.5 beta ((mse_w - mse_l) - (ref_w - ref_l))
        loss   = -log sigmoid(inside), averaged over pairs
    inside > 0 means the policy improved on the winner relative to the loser more than the reference did; with
    policy == reference inside = 0 and the loss is exactly ln 2 = 0.6931."""
    inside = -0.5 * beta * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


def sft_loss(model_losses_w):
    """Supervised fine-tuning baseline: the plain diffusion loss on the preferred image only."""
    return model_losses_w.mean()


# ----------------------------------------------------------------------------------------------------------------
# Training configuration: every field is a command-line flag (--max-steps, --no-flip, ...)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field, fields  # noqa: E402
from pathlib import Path  # noqa: E402


@dataclass
class TrainConfig:
    model: str = field(default="sd15", metadata={"help": "alias (sd15, sdxl), Hub id, diffusers folder or .safetensors"})
    data: str = field(default="pickapic", metadata={"help": "pickapic | hub:OWNER/NAME | parquet file/folder | pairs.jsonl"})
    out: str = field(default="runs/dpo", metadata={"help": "run directory (re-running resumes from its checkpoint)"})
    loss: str = field(default="dpo", metadata={"help": "dpo | sft (plain diffusion loss on the preferred image)"})
    beta: float = field(default=5000.0, metadata={"help": "KL strength, with the official code's 0.5 factor"})
    max_steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=1, metadata={"help": "pairs per device per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    resolution: int = field(default=0, metadata={"help": "image side in pixels; 0 = the model's (512 SD1.5, 1024 SDXL)"})
    lr: float = field(default=2.048e-5, metadata={"help": "learning rate actually used (official: 1e-8 x 2048 pairs)"})
    scale_lr: bool = field(default=False, metadata={"help": "multiply --lr by the effective batch (pairs per step)"})
    warmup_steps: int = field(default=500, metadata={"help": "linear warmup, then constant"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adafactor"})
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    mixed_precision: str = field(default="auto", metadata={"help": "no | fp16 | bf16 | auto (bf16 on GPU, no on CPU)"})
    grad_checkpointing: bool = False
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNets"})
    caption_dropout: float = field(default=0.0, metadata={"help": "probability of training on the empty prompt"})
    random_crop: bool = False
    cache: bool = field(default=False, metadata={"help": "keep VAE latents + text embeddings on disk (exact: both "
                                                          "flips are stored), so steps run only the UNets"})
    cache_dir: str = field(default="", metadata={"help": "where --cache keeps them (default ~/.cache/diffdpo)"})
    flip: bool = field(default=True, metadata={"help": "random horizontal flips (--no-flip to disable)"})
    seed: int = 0
    checkpoint_every: int = field(default=500, metadata={"help": "optimizer steps between checkpoints (0: end only)"})
    samples: bool = field(default=True, metadata={"help": "write a sample grid (fixed prompts and seeds) at each "
                                                          "checkpoint, to OUT/samples/"})
    sample_steps: int = field(default=25, metadata={"help": "DDIM steps for those grids"})
    max_bad_steps: int = field(default=20, metadata={"help": "stop after this many non-finite steps in a row"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    @classmethod
    def from_args(cls, argv=None, description=__doc__):
        """One flag per field: --max-steps 10, --no-flip, ... (defaults and help from the dataclass)."""
        p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for f in fields(cls):
            flag, hlp = "--" + f.name.replace("_", "-"), f.metadata.get("help", " ")
            if f.type in (bool, "bool"):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=hlp)
            else:
                p.add_argument(flag, type=type(f.default), default=f.default, help=hlp)
        return cls(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` is a world of one

import torch.distributed as dist  # noqa: E402


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
    """Mean of a scalar tensor over ranks (for logging)."""
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
    raise ValueError(f"--optimizer {cfg.optimizer!r}: expected adamw or adafactor")


def warmup_constant(warmup_steps):
    """lr multiplier: linear warmup over `warmup_steps` optimizer steps (the first step already moves), then 1."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


# ----------------------------------------------------------------------------------------------------------------
# One training step's pieces


def pair_noise(indices, latent_shape, seed, num_timesteps):
    """Noise eps and timestep t for each pair, a pure function of (seed, the pair's global index in the data stream):
    the same pair gets the same draw whatever the number of GPUs and across resumes."""
    eps, ts = [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(i))
        eps.append(torch.randn(latent_shape, generator=g))
        ts.append(torch.randint(0, num_timesteps, (1,), generator=g))
    return torch.stack(eps), torch.cat(ts)


@torch.no_grad()
def encode_batch(sd, batch, resolution, device, dtype):
    """Images and prompts to the UNet's inputs, for the batch [winners; losers] (2B):
    latents (2B, 4, R/8, R/8) = vae.encode(x) * scaling_factor, context (2B, 77, D), and for SDXL
    `added` = dict(text_embeds (2B, 1280), time_ids (2B, 6)) with original = target = (R, R), crop (0, 0).
    With --cache the batch already holds the latents and text embeddings."""
    if "context" in batch:
        latents = torch.cat([batch["chosen"], batch["rejected"]]).to(device).float()
        context, pooled = batch["context"].to(device), batch.get("pooled")
    else:
        images = torch.cat([batch["chosen"], batch["rejected"]]).to(device, dtype)
        latents = sd.vae.encode(images).float() * sd.vae.scaling_factor
        context, pooled = sd.encode_prompt(batch["prompts"])
    context = context.float().repeat(2, 1, 1)
    added = {}
    if sd.kind == "sdxl":
        added = dict(text_embeds=pooled.to(device).float().repeat(2, 1),
                     time_ids=sd.time_ids(len(latents), resolution, resolution, device=device))
    return latents, context, added


def latent_cache(cfg, sd, resolution, device, dtype):
    """The --cache store for this model, data and resolution, filled by the frozen VAE and text encoders."""
    import hashlib
    import data as D
    key = json.dumps([sd.source, cfg.data, resolution, sd.vae.scaling_factor])
    folder = Path(cfg.cache_dir or Path.home() / ".cache" / "diffdpo") / hashlib.sha256(key.encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_images(xs):
        return sd.vae.encode(torch.stack(xs).to(device, dtype)).float() * sd.vae.scaling_factor

    @torch.no_grad()
    def encode_text(prompt):
        context, pooled = sd.encode_prompt([prompt])
        return dict(context=context[0].float(), **({} if pooled is None else dict(pooled=pooled[0].float())))
    return D.LatentCache(folder, encode_images, encode_text)


def model_losses(unet, latents, context, added, noise, t, abar, prediction_type, autocast):
    """Per-image denoising errors of `unet` on x_t = add_noise(latents, noise, t), (N,)."""
    x_t = add_noise(latents, noise, t, abar)
    with autocast:
        pred = unet(x_t, t, context, **added)
    return denoising_losses(pred, prediction_target(latents, noise, t, abar, prediction_type))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically (temp file + rename), resumed exactly


def save_atomic(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# fields that must not change when a run is resumed (the rest, e.g. --max-steps, may)
RESUME_KEYS = ("model", "data", "loss", "beta", "batch_size", "grad_accum", "resolution", "seed", "world_size",
               "flip", "caption_dropout", "random_crop", "tau", "rpo_embed")


def load_checkpoint(out, run_cfg):
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for k in RESUME_KEYS:
        if ckpt["config"].get(k) != run_cfg.get(k):
            raise SystemExit(f"error: {path} was made with {k}={ckpt['config'].get(k)!r}, this command has "
                             f"{k}={run_cfg.get(k)!r}; use another --out or the same settings to resume")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, pair_loss=None):
    """Fine-tune sd.unet on preference pairs. `pair_loss(mw, ml, rw, rl, batch, sd, world)` -> (loss, implicit_acc)
    replaces the DPO loss (rpo.py passes its own); the loop, data, checkpoints and logging stay the same."""
    import data as D
    import sample
    import unet as U
    from tqdm import tqdm

    rank, world, device = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device.type == "cuda" else "no")
    half = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
    out = Path(cfg.out)

    # --- model: the policy (trainable, fp32 master weights) and the frozen reference, text encoders and VAE
    sd = U.load_sd(cfg.model, device=device, dtype=torch.float32)
    for m in sd.modules:
        m.requires_grad_(False).eval()
    for m in sd.text_encoders:
        m.to(half)
    sd.vae.to(torch.float32 if (mp == "fp16" and sd.kind == "sdxl") else half)  # SDXL's VAE overflows in fp16
    policy = sd.unet
    reference = copy.deepcopy(policy).to(half) if cfg.loss != "sft" else None
    policy.requires_grad_(True).train()
    if cfg.grad_checkpointing:
        policy.set_grad_checkpointing(True)
    resolution = cfg.resolution or sample.default_size(sd)
    abar = alphas_cumprod(sd.scheduler_config).to(device)
    T = len(abar)
    ptype = sd.scheduler_config.get("prediction_type", "epsilon")
    autocast = torch.autocast(device.type, dtype=half, enabled=mp != "no")

    model = torch.nn.parallel.DistributedDataParallel(policy) if world > 1 else policy
    fwd_policy = torch.compile(model) if cfg.compile else model
    fwd_ref = torch.compile(reference) if cfg.compile and reference is not None else reference

    pairs_per_step = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr * pairs_per_step if cfg.scale_lr else cfg.lr
    opt = make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad], lr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")

    # --- data
    cache = latent_cache(cfg, sd, resolution, device, half) if cfg.cache else None
    pairs = D.open_pairs(cfg.data, resolution=resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                         caption_dropout=cfg.caption_dropout, seed=cfg.seed, cache=cache)

    # --- resume
    run_cfg = dict(asdict(cfg), world_size=world, resolution=resolution, lr_used=lr, mixed_precision=mp,
                   pairs_per_step=pairs_per_step)
    step, position, bad_in_a_row, skipped = 0, 0, 0, 0
    ckpt = load_checkpoint(out, run_cfg)
    if ckpt is not None:
        policy.load_state_dict(ckpt["unet"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, position, skipped = ckpt["step"], ckpt["position"], ckpt["skipped"]
        torch.set_rng_state(ckpt["rng"])
        print0(f"resuming {out} from step {step}", rank=rank)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dict(run_cfg, command=" ".join(sys.argv)), indent=2))
        metrics_path = out / "metrics.jsonl"
        rows = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        metrics_path.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))  # drop rows
    if step >= cfg.max_steps:                                                  # past the last checkpoint
        print0(f"{out} is already at step {step} >= --max-steps {cfg.max_steps}", rank=rank)
        return out

    def checkpoint():
        if rank == 0:
            U.save_unet(policy, out / "unet")
            save_atomic(dict(unet=policy.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                             scaler=scaler.state_dict(), step=step, position=position, skipped=skipped,
                             rng=torch.get_rng_state(), config=run_cfg), out / "checkpoint.pt")

    print0(f"{cfg.loss} on {sd.kind} ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params), "
           f"{pairs_per_step} pairs/step on {world} x {device.type}, lr {lr:.3g}, {mp} precision", rank=rank)
    batches = pairs.batches(cfg.batch_size, rank=rank, world_size=world, start=position)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    while step < cfg.max_steps:
        t0 = time.time()
        logs = []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            latents, context, added = encode_batch(sd, batch, resolution, device, half)
            B = len(batch["prompts"])
            noise, t = pair_noise(batch["index"], latents.shape[1:], cfg.seed, T)
            noise, t = noise.to(device).repeat(2, 1, 1, 1), t.to(device).repeat(2)  # winner and loser share eps, t
            last = micro == cfg.grad_accum - 1
            sync = model.no_sync() if world > 1 and not last else torch.enable_grad()
            with sync:
                if cfg.loss == "sft":  # winners only
                    mw = model_losses(fwd_policy, latents[:B], context[:B], {k: v[:B] for k, v in added.items()},
                                      noise[:B], t[:B], abar, ptype, autocast)
                    loss, acc, ml = sft_loss(mw), torch.zeros(()), torch.zeros(())
                    rw = rl = torch.zeros(())
                else:
                    m_l = model_losses(fwd_policy, latents, context, added, noise, t, abar, ptype, autocast)
                    with torch.no_grad():
                        r_l = model_losses(fwd_ref, latents, context, added, noise, t, abar, ptype, autocast)
                    mw, ml = m_l.chunk(2)
                    rw, rl = r_l.chunk(2)
                    if pair_loss is None:
                        loss, acc = dpo_loss(mw, ml, rw, rl, cfg.beta)
                    else:
                        loss, acc = pair_loss(mw, ml, rw, rl, batch, sd, world)
                scaler.scale(loss / cfg.grad_accum).backward()
            position = batch["position"]
            logs.append(torch.stack([loss.detach().float(), acc.float(), mw.detach().mean(), ml.detach().mean(),
                                     rw.mean(), rl.mean()]).cpu())

        # --- optimizer step, skipped (and counted) if the gradient is not finite
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            scaler.step(opt)
            bad_in_a_row = 0
        else:
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
        scaler.update()
        opt.zero_grad(set_to_none=True)
        lr_now = sched.get_last_lr()[0]
        sched.step()
        step += 1

        # --- logging (averaged over micro-steps and ranks)
        m = all_mean(torch.stack(logs).mean(0), world).tolist()
        dt = time.time() - t0
        row = dict(step=step, loss=m[0], implicit_acc=m[1], lr=lr_now, grad_norm=float(grad_norm),
                   pairs_per_s=pairs_per_step / dt, mse_w=m[2], mse_l=m[3], ref_mse_w=m[4], ref_mse_l=m[5],
                   skipped=skipped, corrupt=pairs.num_corrupt, seconds=dt)
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}", lr=f"{lr_now:.2e}",
                            pairs_s=f"{row['pairs_per_s']:.2f}")
            bar.update(1)
        if bad_in_a_row >= cfg.max_bad_steps:
            checkpoint()
            raise SystemExit(f"error: {bad_in_a_row} optimizer steps in a row had a non-finite loss/gradient; "
                             f"stopping (last good state saved in {out}); try a lower --lr or --mixed-precision bf16")
        if step == cfg.max_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            checkpoint()
            if rank == 0 and cfg.samples:
                sample.sample_grid(sd, policy, SAMPLE_PROMPTS, list(range(len(SAMPLE_PROMPTS))),
                                   out / "samples" / f"step{step:06d}.png", steps=cfg.sample_steps,
                                   height=resolution, width=resolution)
    bar.close()
    print0(f"done: {step} steps, {skipped} skipped, {pairs.num_corrupt} corrupt pairs skipped; "
           f"weights in {out / 'unet'}", rank=rank)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


SAMPLE_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube on top of a blue sphere",
                  "a watercolor painting of a fox in the snow", "a close-up portrait of an old fisherman"]


def main(cfg, pair_loss=None):
    """The CLI: a bad --model or --data ends with a one-line error and exit code 2, not a traceback."""
    import data as D
    import unet as U
    try:
        train(cfg, pair_loss)
    except (D.DataError, U.LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(TrainConfig.from_args())
