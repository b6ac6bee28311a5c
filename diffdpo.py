"""
Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024),
from the noise schedule to a multi-GPU training run, in one file.

    python diffdpo.py --model tiny --data shapes --out runs/toy      # the toy world: a laptop CPU, ~80 s
    python diffdpo.py --pretrain-tiny [DIR]                          # remake the toy model (default: tiny/)
    python diffdpo.py --model sd15 --data pickapic --out runs/dpo-sd15

Read top to bottom: the noise schedule (DDPM), the ELBO surrogate of the log-likelihood, the DPO loss, then the
trainer (config, data, model, optimizer, loop), the toy world and the CLI. The networks are in unet.py, the data in
data.py.
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

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


@dataclass
class TrainConfig:
    # the defaults are the paper's SD1.5 recipe; from the command line --model tiny (the default) swaps in TOY_DEFAULTS
    model: str = field(default="tiny", metadata={"help": "tiny (the toy model, embedded) | alias (sd15, sdxl) | Hub id | "
                                                         "diffusers folder | .safetensors"})
    data: str = field(default="shapes", metadata={"help": "shapes (the toy world) | pickapic | hub:OWNER/NAME | parquet "
                                                          "file/folder | pairs.jsonl"})
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
    channels_last: bool = field(default=False, metadata={"help": "the UNets in channels-last (NHWC) memory format: "
                                                                 "faster convolutions with oneDNN / cuDNN"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNets"})
    lora_rank: int = field(default=0, metadata={"help": "train rank-R LoRA adapters, not the whole UNet (0: off)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA scale alpha / rank; 0 = rank (scale 1)"})
    lora_targets: str = field(default="to_q,to_k,to_v,to_out.0", metadata={
        "help": "layers that get adapters (peft's suffix rule); add ff.net.0.proj,ff.net.2 for the feed-forwards"})
    merge_lora: bool = field(default=False, metadata={"help": "at the last step, also write the merged OUT/unet/"})
    choice_model: str = field(default="", metadata={"help": "AI feedback: relabel every pair with a reward model, "
                                                            "pickscore|hps|aesthetic|clip[=PATH] (ties dropped)"})
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
        """One flag per field: --max-steps 10, --no-flip, ... (defaults and help from the dataclass; the defaults are
        SD1.5's recipe from the paper, except with --model tiny, where TOY_DEFAULTS replace them)."""
        help_format = type("Help", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
        p = argparse.ArgumentParser(description=description, formatter_class=help_format)
        for f in fields(cls):
            flag, hlp = "--" + f.name.replace("_", "-"), f.metadata.get("help", " ")
            if f.type in (bool, "bool"):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=hlp)
            else:
                p.add_argument(flag, type=type(f.default), default=f.default, help=hlp)
        if p.parse_known_args(argv)[0].model == "tiny":
            p.set_defaults(**TOY_DEFAULTS)
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


def latent_cache(cfg, sd, resolution, device, dtype, embed_key=None):
    """The --cache store for this model, data and resolution (and reward / embedding models, if any), filled by the
    frozen VAE and text encoders."""
    import hashlib
    import data as D
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
               "flip", "caption_dropout", "random_crop", "choice_model", "tau", "rpo_embed", "rpo_clip", "lora_rank",
               "lora_alpha", "lora_targets")


def load_checkpoint(out, run_cfg):
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    defaults = {f.name: f.default for f in fields(TrainConfig)}  # a key older runs did not record has its default
    for k in RESUME_KEYS:
        if ckpt["config"].get(k, defaults.get(k)) != run_cfg.get(k):
            raise SystemExit(f"error: {path} was made with {k}={ckpt['config'].get(k)!r}, this command has "
                             f"{k}={run_cfg.get(k)!r}; use another --out or the same settings to resume")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, pair_loss=None, image_embedder=None):
    """Fine-tune sd.unet on preference pairs. `pair_loss(mw, ml, rw, rl, batch, sd, world)` -> (loss, implicit_acc)
    replaces the DPO loss (rpo.py passes its own); the loop, data, checkpoints and logging stay the same.
    `image_embedder(device)` -> embed([preferred, rejected]) -> (2, D), with a `.key` naming it: image embeddings
    computed once per pair in the data path (and kept by --cache), as batch["chosen_emb"] / ["rejected_emb"]."""
    import data as D
    import sample
    import unet as U
    from tqdm import tqdm

    t_start = time.time()
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
    if cfg.channels_last:  # weights in NHWC: convolutions then keep activations NHWC too (the reference copies it)
        policy.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(policy).to(half) if cfg.loss != "sft" and not cfg.lora_rank else None
    policy.requires_grad_(True).train()
    if cfg.lora_rank:  # only rank-r adapters train; the reference is the same UNet with them switched off
        layers = U.add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        reference = policy if cfg.loss != "sft" else None
        print0(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank:g} on {len(layers)} layers: "
               f"{sum(p.numel() for p in policy.parameters() if p.requires_grad)} trainable parameters", rank=rank)
    if cfg.grad_checkpointing:
        policy.set_grad_checkpointing(True)
    resolution = cfg.resolution or sample.default_size(sd)
    guidance = TOY_SAMPLING["guidance"] if cfg.model == "tiny" else 7.5  # for the images the run makes itself
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

    # --- data (pairs built once by the base model: the toy world's `shapes`, on-policy pairs labelled by the judge,
    # and style:FOLDER: style images preferred over the base model's generations for their captions)
    spec = cfg.data
    if cfg.data == "shapes" or cfg.data.startswith("style:"):
        spec = out / ("shapes_pairs.parquet" if cfg.data == "shapes" else "style_pairs.parquet")
        if rank == 0 and not spec.exists():
            n = (build_shape_pairs(sd, spec, TOY_PAIRS, cfg.seed) if cfg.data == "shapes" else
                 build_style_pairs(sd, cfg.data[6:], spec, resolution, cfg.sample_steps, guidance, cfg.seed))
            print0(f"built {spec}: {n} pairs ({time.time() - t_start:.0f} s)")
        if world > 1:
            dist.barrier()
    embed = image_embedder(device) if image_embedder else None
    cache = latent_cache(cfg, sd, resolution, device, half, getattr(embed, "key", None)) if cfg.cache else None
    relabel = None
    if cfg.choice_model:  # AI feedback: a reward model decides which image of each pair is preferred
        import eval as E
        relabel = E.relabeller(cfg.choice_model, device)
    pairs = D.open_pairs(spec, resolution=resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                         caption_dropout=cfg.caption_dropout, seed=cfg.seed, cache=cache, relabel=relabel,
                         embed=embed)

    # --- resume
    run_cfg = dict(asdict(cfg), world_size=world, resolution=resolution, lr_used=lr, mixed_precision=mp,
                   pairs_per_step=pairs_per_step)
    step, position, bad_in_a_row, skipped = 0, 0, 0, 0
    ckpt = load_checkpoint(out, run_cfg)
    if ckpt is not None:
        policy.load_state_dict(ckpt["unet"], strict=not cfg.lora_rank)  # with LoRA: the adapters only
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
        if rank == 0 and cfg.lora_rank and cfg.merge_lora:
            U.save_unet(U.merge_lora(policy), out / "unet")
        return out

    def checkpoint():
        if rank == 0:
            if cfg.lora_rank:  # the adapters alone (the base is --model's), also as diffusers' load_lora_weights reads
                weights = {k: v for k, v in policy.state_dict().items() if ".lora_" in k}
                U.save_lora(policy, out / U.LORA_FILE)
            else:
                weights = policy.state_dict()
                U.save_unet(policy, out / "unet")
            save_atomic(dict(unet=weights, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                             scaler=scaler.state_dict(), step=step, position=position, skipped=skipped,
                             rng=torch.get_rng_state(), config=run_cfg), out / "checkpoint.pt")
            if cfg.lora_rank and cfg.merge_lora and step == cfg.max_steps:  # the run's end: fold the adapters in
                U.save_unet(U.merge_lora(policy), out / "unet")

    print0(f"{cfg.loss} on {sd.kind} ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params), "
           f"{pairs_per_step} pairs/step on {world} x {device.type}, lr {lr:.3g}, {mp} precision", rank=rank)
    batches = D.prefetch(pairs.batches(cfg.batch_size, rank=rank, world_size=world, start=position))
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
                    with torch.no_grad(), U.lora_disabled(reference):
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
                   skipped=skipped, corrupt=batch["corrupt"], seconds=dt)
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
                prompts = D.shape_prompts("test")[:8] if cfg.data == "shapes" else SAMPLE_PROMPTS
                sample.sample_grid(sd, policy, prompts, list(range(len(prompts))),
                                   out / "samples" / f"step{step:06d}.png", steps=cfg.sample_steps,
                                   height=resolution, width=resolution, guidance=guidance)
    bar.close()
    batches.close()
    print0(f"done: {step} steps, {skipped} skipped, {batch['corrupt']} corrupt pairs skipped; "
           f"weights in {out / (U.LORA_FILE if cfg.lora_rank else 'unet')}", rank=rank)
    if rank == 0 and cfg.data == "shapes":  # the toy world's measure: held-out captions, base vs tuned, same seeds
        policy.eval()
        base = U.load_sd(cfg.model, device=device).unet
        method = cfg.loss if pair_loss is None else getattr(pair_loss, "name", "custom")
        summary = evaluate_shapes(sd, base, policy, out, dict(loss=method, steps=step, pairs_per_step=pairs_per_step),
                                  t_start)
        print0(f"held-out judge score: base {summary['judge_score_base']:.4f}, tuned {summary['judge_score_tuned']:.4f}; "
               f"win rate vs base {summary['win_rate_vs_base']:.3f} ({out / 'summary.json'}, {out / 'compare.png'})")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


SAMPLE_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube on top of a blue sphere",
                  "a watercolor painting of a fox in the snow", "a close-up portrait of an old fisherman"]


# ----------------------------------------------------------------------------------------------------------------
# The toy world: a tiny text-to-image model and a programmatic judge, so the whole method runs on a laptop CPU
#
#   python diffdpo.py --model tiny --data shapes --out runs/toy     on-policy pairs -> DPO -> held-out win rate
#   python diffdpo.py --pretrain-tiny                               remakes tiny/, the committed base model
#
# `tiny` is SD1.5's pipeline (same UNet / VAE / CLIP classes, scheduler and loader) at a few million parameters,
# pretrained on data.py's captioned shapes; `shapes` pairs and the judge are in data.py.

TOY_DEFAULTS = dict(resolution=32, batch_size=16, max_steps=200, lr=3e-5, warmup_steps=10, beta=2000.0,
                    checkpoint_every=100, sample_steps=20)   # what --model tiny changes in the defaults above
TOY_PAIRS = 1024          # on-policy pairs built for --data shapes (ties dropped)
TOY_SEEDS = 8             # held-out images per test caption, same seeds for base and tuned
TOY_SAMPLING = dict(steps=20, guidance=4.0)                  # DDIM steps and classifier-free guidance


def write_tiny_tokenizer(folder):
    """A CLIP tokenizer folder (vocab.json, merges.txt, special tokens) for the toy captions: the 512 byte symbols
    of CLIP's byte-level BPE plus just enough merges that every toy word is one token; any other text still
    tokenizes (into characters). Merges are added greedily, each after those it builds on, until that holds."""
    import unet as U
    import data as D
    chars = list(U.bytes_to_unicode().values())
    words = sorted({w for p in D.shape_prompts() for w in p.split()} | {"an"})
    merges = []
    while True:  # tokenize every word with the merges so far; where one is still split, merge its first two symbols
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        tok = U.CLIPTokenizer({t: i for i, t in enumerate(vocab)}, [" ".join(m) for m in merges])
        todo = [(vocab[ids[0]], vocab[ids[1]]) for ids in map(tok.bpe, words) if len(ids) > 1]
        if not todo:
            break
        merges += [m for m in dict.fromkeys(todo) if m not in merges]
    assert len(vocab) <= U.TINY_VOCAB, (len(vocab), U.TINY_VOCAB)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        special, tokenizer_class="CLIPTokenizer", model_max_length=16, do_lower_case=True, errors="replace"), indent=2))


def to_tensor(img):
    """PIL RGB -> (3, H, W) in [-1, 1], as the VAE expects."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def pretrain_tiny(folder=None, vae_steps=1500, unet_steps=4000, batch_size=64, seed=0, vae_batch_size=32):
    """Pretrain the toy model from scratch on freshly drawn shapes (every step new images) and write it in the
    diffusers layout: 1. the VAE (reconstruction + a small KL to the unit Gaussian; scaling_factor = 1 / std of the
    latents, as SD's 0.18215 was chosen); 2. the UNet and text encoder together on frozen-VAE latents with the plain
    diffusion loss ||eps - eps_theta(x_t, t, c)||^2 (DDPM), 10% empty captions for classifier-free guidance."""
    import data as D
    import unet as U
    folder = Path(folder or U.TINY_FOLDER)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = D.shape_prompts()

    def draw(n):
        ps = [prompts[i] for i in torch.randint(len(prompts), (n,), generator=gen)]
        return ps, torch.stack([to_tensor(D.render_shape(p, gen)) for p in ps])

    t0 = time.time()
    vae = U.VAE(U.VAEConfig.tiny())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(vae_steps):
        _, x = draw(vae_batch_size)
        moments = vae.quant_conv(vae.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        rec = F.mse_loss(vae.decode(z), x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            print(f"vae step {step}: reconstruction mse {rec.item():.5f} kl {kl.item():.3f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sf = 1.0 / float(torch.cat([vae.encode(draw(256)[1]) for _ in range(4)]).std())
    vae.cfg.raw["scaling_factor"] = vae.cfg.scaling_factor = vae.scaling_factor = round(sf, 5)

    write_tiny_tokenizer(folder / "tokenizer")
    tok = U.CLIPTokenizer.from_folder(folder / "tokenizer")
    text, unet = U.CLIPText(U.CLIPTextConfig.tiny()), U.UNet(U.UNetConfig.tiny())
    scheduler = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                     prediction_type="epsilon", timestep_spacing="leading")
    abar = alphas_cumprod(scheduler)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * (1 - s / unet_steps) + 0.1)
    for step in range(unet_steps):
        ps, x = draw(batch_size)
        ps = [p if torch.rand((), generator=gen) > 0.1 else "" for p in ps]
        with torch.no_grad():
            latents = vae.encode(x) * vae.scaling_factor
        noise, t = torch.randn_like(latents), torch.randint(0, len(abar), (len(ps),))
        pred = unet(add_noise(latents, noise, t, abar), t, text(tok(ps))[0])
        loss = denoising_losses(pred, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == unet_steps - 1:
            print(f"unet step {step}: diffusion loss {loss.item():.4f} ({time.time() - t0:.0f} s)")

    for model, name in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        U.save_component(model, folder / name, name)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(dict(
        _class_name="StableDiffusionPipeline", scheduler=["diffusers", "DDIMScheduler"],
        text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
        unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"], safety_checker=[None, None],
        feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False), indent=2))
    print(f"wrote {folder} in {time.time() - t0:.0f} s")
    return folder


@torch.no_grad()
def build_shape_pairs(sd, path, n=TOY_PAIRS, seed=0):
    """On-policy preference pairs, as Pick-a-Pic's: for pair k, two samples of the base model for training caption
    k mod 72 (seeds 2k, 2k+1 offset by --seed), labelled by data.judge (label_0 = 1 if the first scores higher, 0.5
    on a tie, which the reader skips). Returns the number of pairs without a tie."""
    import data as D
    import sample
    train = D.shape_prompts("train")
    prompts = [train[k % len(train)] for k in range(n) for _ in range(2)]
    seeds = [1_000_000 * (seed + 1) + i for i in range(2 * n)]
    images = sample.render(sd, sd.unet, prompts, seeds, batch_size=256, **TOY_SAMPLING)
    scores = [D.judge(img, p) for img, p in zip(images, prompts)]
    label_0 = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores[0::2], scores[1::2])]
    png = [D.png_bytes(img) for img in images]
    D.write_pairs(path, prompts[0::2], png[0::2], png[1::2], label_0)
    return sum(v != 0.5 for v in label_0)


@torch.no_grad()
def build_style_pairs(sd, folder, path, resolution, steps, guidance, seed=0):
    """Style alignment pairs (Diffusion-RPO's second task): style image i (preferred) against the base model's
    generation for its caption (seed --seed + i, `steps` DDIM steps). Returns the number of pairs."""
    import data as D
    import sample
    items = D.style_items(folder)
    prompts = [c for c, _ in items]
    images = sample.render(sd, sd.unet, prompts, [seed + i for i in range(len(items))], batch_size=8,
                           steps=steps, guidance=guidance, height=resolution, width=resolution)
    D.write_pairs(path, prompts, [p.read_bytes() for _, p in items], [D.png_bytes(i) for i in images], [1.0] * len(items))
    return len(items)


@torch.no_grad()
def evaluate_shapes(sd, base_unet, tuned_unet, out, extra, t_start):
    """Base vs tuned on the 18 held-out captions x TOY_SEEDS seeds (the same seeds for both), under the judge.
    Writes OUT/summary.json (win rate of tuned over base, ties half; mean judge scores; seconds since t_start, so
    the whole run) and OUT/compare.png (one image per held-out caption: base above, tuned below)."""
    import data as D
    import sample
    prompts = [p for p in D.shape_prompts("test") for _ in range(TOY_SEEDS)]
    seeds = list(range(len(prompts)))
    base = sample.render(sd, base_unet, prompts, seeds, batch_size=256, **TOY_SAMPLING)
    tuned = sample.render(sd, tuned_unet, prompts, seeds, batch_size=256, **TOY_SAMPLING)
    sb = torch.tensor([D.judge(i, p) for i, p in zip(base, prompts)])
    st = torch.tensor([D.judge(i, p) for i, p in zip(tuned, prompts)])
    summary = dict(extra, win_rate_vs_base=((st > sb).float() + 0.5 * (st == sb).float()).mean().item(),
                   judge_score_base=sb.mean().item(), judge_score_tuned=st.mean().item(), num_images=len(prompts))
    big = lambda imgs: [im.resize((64, 64), Image.NEAREST) for im in imgs[::TOY_SEEDS]]  # noqa: E731
    sample.image_grid([big(base), big(tuned)], row_labels=[f"base {sb.mean():.3f}", f"tuned {st.mean():.3f}"]
                      ).save(Path(out) / "compare.png")
    summary["seconds"] = round(time.time() - t_start, 1)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(cfg, pair_loss=None, image_embedder=None):
    """The CLI: a bad --model or --data ends with a one-line error and exit code 2, not a traceback."""
    import data as D
    import unet as U
    try:
        train(cfg, pair_loss, image_embedder)
    except (D.DataError, U.LoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pretrain-tiny"]:
        pretrain_tiny(*sys.argv[2:3])
    else:
        main(TrainConfig.from_args())
