"""
Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024),
from the ELBO surrogate to a multi-GPU training run, in one file.

    python diffdpo.py                                            # the toy world (tiny model, shapes), a laptop CPU
    python diffdpo.py --model sd15 --data pickapic --out runs/dpo-sd15
    torchrun --nproc_per_node 8 diffdpo.py --model sdxl --data hub:OWNER/NAME --out runs/dpo-sdxl
    python diffdpo.py --model tiny-flow                          # its flow twin (SD3's pipeline at toy size)

Read top to bottom: the method (the ELBO surrogate, the DPO loss of the paper's Eq. 14 and its family: cDPO, MaPO,
KTO; docs/LOSSES.md), one step (winner and loser share t and eps; training, validation and bench.py run `micro_step`),
the loop, the configuration and presets, the pieces the loop calls, in the order it calls them, and the CLI. The
noise schedule and the samplers are in sample.py, the networks in unet.py, the data in data.py.
"""
import contextlib
import copy
import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import eval
import fsdp
import onpolicy
import runs
import toy
from data import open_pairs
from files import DTYPE_NAMES, DTYPES, UserError, read_json, write_text_atomic
from lora import LORA_FILE, LORA_TARGETS, SD3_LORA_TARGETS, LoRALinear, add_lora, lora_disabled
from sample import TOY_MODELS, add_noise, alphas_cumprod, default_size, flow_sigmas, guidance_embedding, vae_factor
from shards import labelled_images, latent_cache, prefetch, scaled_posterior
from mmdit import is_sd3, load_pipeline, resolve, weights_folder
from unet import ALIASES

# ----------------------------------------------------------------------------------------------------------------
# The method: the ELBO surrogate and the DPO objective
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
#
# One quantity, one name: the per-image denoising error `err` (err_w, err_l for winners and losers, ref_err_* for
# the reference). metrics.jsonl logs their batch means as mse_w, mse_l, ref_mse_w, ref_mse_l, the official code's
# names for them.


def prediction_target(x0, noise, t, abar, prediction_type="epsilon"):
    """What the network is trained to output: the noise eps (SD1.5, SDXL), or the velocity
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (SD2.x 768px; Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = abar.to(x0.device, x0.dtype)[t].view(-1, *[1] * (x0.ndim - 1))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise UserError(f"scheduler config: prediction_type={prediction_type!r} is not supported")


# Flow matching (SD3; Esser et al. 2024, "Scaling Rectified Flow Transformers", Eq. 1-3, after Lipman et al. 2023
# and Liu et al. 2023): the forward process is a straight line from data to noise, and the network predicts its
# velocity v = d x_sigma / d sigma. The flow-matching loss ||v - v_theta(x_sigma, sigma)||^2 is a weighted ELBO too
# (Kingma & Gao 2023, "Understanding Diffusion Objectives"), so Eq. 14 carries over with velocity errors in place of
# noise errors: the same denoising_error, dpo_errors and dpo_loss; sigma plays the part of t, drawn once per pair.


def flow_noise(x0, eps, sigma):
    """x_sigma = (1 - sigma) x_0 + sigma eps, sigma in [0, 1] (N,), one per image."""
    s = sigma.to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * eps


def flow_target(x0, eps):
    """The velocity of x_sigma along its line, the flow network's target: v = eps - x_0."""
    return eps - x0


def denoising_error(pred, target):
    """The per-image denoising error ||target - pred||^2 / (C H W): one number per image, (N,), computed in fp32.
    -denoising_error is, up to the constants above, the ELBO estimate of log p(x_0) for each image."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta, label_smoothing=0.0):
    """Diffusion-DPO loss (Eq. 14 with constant weighting), and the implicit accuracy. err_*: the policy's per-image
    denoising errors on the winners / losers, ref_err_*: the reference's, each (B,).
        inside = -0.5 beta ((err_w - err_l) - (ref_err_w - ref_err_l))
        loss   = -(1 - eps) log sigmoid(inside) - eps log sigmoid(-inside), averaged over pairs
    inside > 0 means the policy improved on the winner relative to the loser more than the reference did; with
    policy == reference inside = 0 and the loss is exactly ln 2 = 0.6931. eps = label_smoothing > 0 is the
    conservative DPO (cDPO, Mitchell 2023) for labels that are wrong with probability eps; eps = 0 is Eq. 14. On
    velocity errors (flow models) flow_grpo's DPO is this form with beta 100; SimpleTuner sums the errors over the
    latent's elements, so its beta is ours / (C h w) (ours / 65,536 for SD3's 16 x 64 x 64 latents)."""
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))            # (B,)
    loss = -(1 - label_smoothing) * F.logsigmoid(inside) - label_smoothing * F.logsigmoid(-inside)
    return loss.mean(), (inside > 0).float().mean()


def mapo_loss(err_w, err_l, beta, gamma=0.5, num_timesteps=1000):
    """MaPO (Hong et al. 2024, "Margin-aware Preference Optimization for Aligning Diffusion Models without Reference
    Images"; their utils.compute_loss, snr_value = gamma) and the implicit accuracy: no reference model at all.
        s(err) = gamma err / (exp(gamma err) - 1)           a decreasing map of the error to a likelihood-like score
        margin = T (s(err_w) - s(err_l))                    T = num_timesteps, the scheduler's (1000)
        loss   = mean(err_w) - beta mean(log sigmoid(margin))      the diffusion loss on the winners, and the margin"""
    s_w, s_l = (gamma * err / (torch.exp(gamma * err) - 1) for err in (err_w, err_l))
    margin = num_timesteps * (s_w - s_l)                                               # (B,)
    return err_w.mean() - beta * F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def kto_loss(err, ref_err, labels, beta, world=1, desirable_weight=1.0, undesirable_weight=1.0):
    """Diffusion-KTO (Li et al. 2024, "Aligning Diffusion Models by Optimizing Human Utility"; train_kto_sd_v1.5.py)
    and the implicit accuracy, on N images labelled y = 1 (desirable) or 0 (undesirable), each its own t and eps:
        g    = ref_err - err                  the policy's ELBO gain over the reference, per image
        z    = max(0, mean g over the global batch), detached      the reference point (all ranks' mean of means)
        h    = sigmoid((2y - 1) beta (g - z))
        loss = mean lambda_y (1 - h)          lambda_1 = desirable_weight, lambda_0 = undesirable_weight
    With policy == reference g = z = 0 and the loss is mean(lambda_y) / 2."""
    g = ref_err - err                                                              # (N,)
    z = runs.all_mean(g.detach().mean(), world).clamp(min=0)
    x = (2 * labels - 1) * beta * (g - z)
    weight = torch.where(labels == 1, desirable_weight, undesirable_weight)
    return (weight * (1 - torch.sigmoid(x))).mean(), (x > 0).float().mean()


def sft_loss(err_w):
    """Supervised fine-tuning baseline: the plain diffusion loss on the preferred image only. Its implicit accuracy
    is 0 (there is no reference to compare with), made on err_w's device like every tensor of the step."""
    return err_w.mean(), err_w.new_zeros(())


# ----------------------------------------------------------------------------------------------------------------
# One step: B pairs as the batch [winners; losers] (2B images), one (t, eps) per pair shared by both images


def denoising_errors(unet, latents, cond, eps, t, abar, prediction_type):
    """The denoising errors (N,) of `unet` at x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (sample.add_noise).
    cond: the UNet's text conditioning, dict(context=...) (+ text_embeds, time_ids for SDXL). A flow model
    (prediction_type "flow", an MMDiT: cond = dict(context, pooled)) gets x_sigma and its timestep sigma T, with
    `abar` holding its scheduler's T training sigmas in place of alphas_cumprod."""
    if prediction_type == "flow":
        sigma = abar[t]                                                              # (N,)
        x_sigma = flow_noise(latents, eps, sigma)
        return denoising_error(unet(x_sigma, sigma * len(abar), **cond), flow_target(latents, eps))
    x_t = add_noise(latents, eps, t, abar)
    return denoising_error(unet(x_t, t, **cond), prediction_target(latents, eps, t, abar, prediction_type))


def image_errors(policy, reference, latents, cond, eps, t, abar, prediction_type):
    """The policy's and the reference's denoising errors (N,) of N images. `reference` may be the policy itself with
    LoRA adapters (then switched off for the reference's pass), or None (MaPO): then it is not run (zeros)."""
    err = denoising_errors(policy, latents, cond, eps, t, abar, prediction_type)
    if reference is None:
        return err, torch.zeros_like(err)
    with torch.no_grad(), lora_disabled(reference):
        return err, denoising_errors(reference, latents, cond, eps, t, abar, prediction_type)


def dpo_errors(policy, reference, latents, cond, eps, t, abar, prediction_type):
    """What the DPO (and MaPO) loss needs for B pairs: latents (2B, C, h, w) = [winners; losers] with their
    conditioning, eps (B, C, h, w) and t (B,) drawn once per pair. Returns err_w, err_l, ref_err_w, ref_err_l (B,)."""
    eps = eps.repeat(2, 1, 1, 1)                # (2B, C, h, w): the official code's noise.chunk(2)[0].repeat(2,1,1,1)
    t = t.repeat(2)                             # (2B,):         and timesteps.chunk(2)[0].repeat(2)
    err, ref_err = image_errors(policy, reference, latents, cond, eps, t, abar, prediction_type)
    return (*err.chunk(2), *ref_err.chunk(2))


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


def pair_noise(indices, latent_shape, seed, num_timesteps, stream=0, density="uniform"):
    """eps (B, C, h, w) and t (B,) for each pair (KTO: each image, stream 2): eps ~ N(0, I), t by draw_timestep."""
    eps, ts = [], []
    for i in indices:
        g = pair_generator(seed, i, stream)
        eps.append(torch.randn(latent_shape, generator=g))
        ts.append(draw_timestep(g, num_timesteps, density))
    return torch.stack(eps), torch.cat(ts)


def draw_timestep(g, num_timesteps, density="uniform"):
    """t ~ U{0..T-1} (DDPM's), or SD3's t = floor(u T) with u in (0, 1) drawn from a density that favours the middle
    of the flow (diffusers' compute_density_for_timestep_sampling): "logit_normal" u = sigmoid(n), n ~ N(0, 1), or
    "mode" u = 1 - v - 1.29 (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1). Returns (1,)."""
    if density == "uniform":
        return torch.randint(0, num_timesteps, (1,), generator=g)
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn(1, generator=g))
    elif density == "mode":
        v = torch.rand(1, generator=g)
        u = 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    else:
        raise UserError(f"timestep density {density!r}: expected uniform, logit_normal or mode")
    return (u * num_timesteps).long().clamp(max=num_timesteps - 1)


def posterior_noise(indices, latent_shape, seed, sides=2):
    """z (2B, C, h, w) = [z_winners; z_losers] ~ N(0, I) (sides=1: one per image), which turn the VAE's posteriors
    into latents: mean + std * z, the official code's `vae.encode(x).latent_dist.sample()`, per pair like pair_noise."""
    z = torch.stack([torch.randn((sides, *latent_shape), generator=pair_generator(seed, i, stream=1)) for i in indices])
    return torch.cat(z.unbind(1))


@torch.no_grad()
def unet_inputs(sd, batch, resolution, z=None, lcm_guidance=8.5):
    """Images and prompts to the UNet's inputs, for the batch [winners; losers] (2B) (KTO's: its N "images"):
    latents (2B, C, R/8, R/8) = (mean + std * z) * scaling_factor from the VAE's posterior (its mean when z is None),
    and cond = dict(context (2B, 77, D)) plus for SDXL text_embeds (2B, 1280) and time_ids (2B, 6) with original =
    target = (R, R), crop (0, 0); for an LCM UNet timestep_cond (2B, time_cond_proj_dim), its guidance input held at
    lcm_guidance (the loss is unchanged). With --cache the batch already holds the posteriors and text embeddings.
    The images go to the VAE in the VAE's own precision (SDXL's stays fp32 under fp16); every tensor is made on (or
    moved to) the UNet's device."""
    device, sides = sd.device, [k for k in ("chosen", "rejected", "images") if k in batch]
    if "context" in batch:
        mean = torch.cat([batch[k] for k in sides]).to(device, non_blocking=True).float()
        std = torch.cat([batch[k + "_std"] for k in sides]).to(device, non_blocking=True).float()
        context, pooled = batch["context"].to(device, non_blocking=True), batch.get("pooled")
    else:
        images = torch.cat([batch[k] for k in sides]).to(device, sd.vae.dtype, non_blocking=True)
        mean, std = scaled_posterior(sd.vae, images)
        context, pooled = sd.encode_prompt(batch["prompts"])
    latents = mean if z is None else mean + std * z.to(device, non_blocking=True)
    cond = dict(context=context.float().repeat(len(sides), 1, 1))
    if sd.kind == "sdxl":
        cond.update(text_embeds=pooled.to(device).float().repeat(len(sides), 1),
                    time_ids=sd.time_ids(len(latents), resolution, resolution, device=device))
    if sd.kind == "sd3":                                                  # an MMDiT: the pooled text (2B, 2048)
        cond.update(pooled=pooled.to(device).float().repeat(len(sides), 1))
    if getattr(sd.unet.cfg, "time_cond_proj_dim", None):
        w = torch.full((len(latents),), lcm_guidance - 1.0, device=device)
        cond.update(timestep_cond=guidance_embedding(w, sd.unet.cfg.time_cond_proj_dim))
    return latents, cond


@dataclass
class Setup:
    """What every step needs, built once by `setup`: the pipeline and the networks, the noise schedule, the shapes,
    the precision and the loss."""
    cfg: "TrainConfig"
    sd: object                  # unet.SD: the frozen VAE, text encoders and tokenizers; sd.unet is the policy
    policy: nn.Module           # trainable (fp32 master weights)
    reference: nn.Module        # a frozen copy, the policy itself with LoRA (adapters off), or None (SFT, MaPO)
    abar: torch.Tensor          # alphas_cumprod (T,) on the device; a flow model's sigmas (T,)
    prediction_type: str        # "epsilon" | "v_prediction"
    resolution: int             # image side in pixels
    latent_shape: tuple         # (C, R/8, R/8)
    autocast: object            # torch.autocast in the --mixed-precision dtype, or a null context for fp32
    pair_loss: object           # (err_w, err_l, ref_err_w, ref_err_l, batch, sd, world) -> (loss, acc); KTO: image_step


def micro_step(s, batch, policy, reference, world=1):
    """One micro-batch of pairs through the method: the latents (posterior draws of each pair's own) and text
    conditioning, a (t, eps) per pair, the policy's and the reference's denoising errors, the loss. Training (with
    DDP / compiled wrappers as `policy`), validation and bench.py run this same function.
    Returns (loss, implicit accuracy, (err_w, err_l, ref_err_w, ref_err_l)). KTO runs image_step instead."""
    if s.cfg.loss == "kto":
        return image_step(s, batch if "images" in batch else labelled_images(batch), policy, reference, world)
    z = posterior_noise(batch["index"], s.latent_shape, s.cfg.seed) if s.cfg.vae_latents == "sample" else None
    latents, cond = unet_inputs(s.sd, batch, s.resolution, z, s.cfg.lcm_guidance)
    eps, t = (x.to(latents.device, non_blocking=True) for x in s.cfg.draw_noise(batch, s.latent_shape, len(s.abar)))
    with s.autocast:
        if s.cfg.loss == "sft":
            errors = sft_errors(policy, latents, cond, eps, t, s.abar, s.prediction_type)
        else:
            errors = dpo_errors(policy, reference, latents, cond, eps, t, s.abar, s.prediction_type)
        loss, acc = s.pair_loss(*errors, batch, s.sd, world)
    return loss, acc, errors


def image_step(s, batch, policy, reference, world=1):
    """One micro-batch of N labelled images (KTO; pairs as shards.labelled_images), each its own posterior draw, t and
    eps (pair_noise of its index, stream 2). Returns as micro_step, the errors split by label (desirable as "_w")."""
    index, labels = batch["index"], batch["labels"].to(s.sd.device)
    z = posterior_noise(index, s.latent_shape, s.cfg.seed, sides=1) if s.cfg.vae_latents == "sample" else None
    latents, cond = unet_inputs(s.sd, batch, s.resolution, z, s.cfg.lcm_guidance)
    eps, t = (x.to(latents.device) for x in pair_noise(index, s.latent_shape, s.cfg.seed, len(s.abar), stream=2,
                                                       density=s.cfg.timestep_density))
    with s.autocast:
        err, ref_err = image_errors(policy, reference, latents, cond, eps, t, s.abar, s.prediction_type)
        loss, acc = s.pair_loss(err, ref_err, labels, world)
    return loss, acc, (err[labels == 1], err[labels == 0], ref_err[labels == 1], ref_err[labels == 0])


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def train(cfg: "TrainConfig", pair_loss=None, image_embedder=None):
    """Fine-tune sd.unet on preference pairs. `pair_loss(err_w, err_l, ref_err_w, ref_err_l, batch, sd, world)` ->
    (loss, implicit_acc) replaces the DPO loss (rpo.py passes its own); the loop, data, checkpoints and logging stay
    the same. `image_embedder(device)` -> embed([preferred, rejected]) -> (2, D), with a `.key` naming it: image
    embeddings computed once per pair in the data path (and kept by --cache), as batch["chosen_emb"] / ["rejected_emb"].
    Returns the run folder."""
    rank, world, device = setup_distributed(cfg)
    out = Path(cfg.out)
    runs.validate(cfg, device, built=onpolicy.builds_pairs(cfg))
    fsdp.check(cfg, amp_precision(cfg, device))
    lock = runs.lock(out) if rank == 0 else None                  # one run per --out, held until this one ends
    stop = runs.StopSignals(cfg.save_on_signal, rank)             # --save-on-signal; until the loop: stop at once
    torch.manual_seed(cfg.seed)
    s = setup(cfg, load_pipeline(cfg.model, device=device, dtype=torch.float32), pair_loss)
    if cfg.fsdp:                  # the networks in pieces over the processes (fsdp.py), else DDP's whole copies
        s.policy, s.reference = fsdp.shard_networks(s, amp_precision(cfg, device), cfg.fsdp_reference)
    model = DDP(s.policy, gradient_as_bucket_view=True) if world > 1 and not cfg.fsdp else s.policy
    fwd_policy = torch.compile(model) if cfg.compile else model
    fwd_reference = torch.compile(s.reference) if cfg.compile and s.reference is not None else s.reference
    opt = make_optimizer(cfg, s.policy, world, device)
    run_cfg = run_config(cfg, s, opt, world)
    state = resume(cfg, out, run_cfg, s, opt, rank)
    if state["step"] >= cfg.max_steps:                                       # past the last checkpoint
        runs.save_final_weights(s, out, state["step"], rank)
        return runs.finish(world, out, lock, stop)

    print0(runs.banner(s, run_cfg, world, device), rank=rank)
    if rank == 0 or cfg.fsdp:     # sharded networks run on every rank together (each writes the same files)
        runs.base_samples(s, out, state["step"])           # the grids' base row, before the policy moves
    pairs, val, batches = training_stream(s, out, state, image_embedder, rank, world)
    log = runs.Log(out, run_cfg, cfg.report_to, cfg.max_steps, state["step"]) if rank == 0 else None
    bad_in_a_row, gathered = 0, {}
    stop.at_step_end()
    while state["step"] < cfg.max_steps:
        if onpolicy.next_round(cfg, state):                # --rebuild-every: new pairs from the policy as it is now
            batches.close()
            pairs, val, batches = training_stream(s, out, state, image_embedder, rank, world)
        t0, logs = time.time(), []
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            last = micro == cfg.grad_accum - 1
            with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
                loss, acc, errors = micro_step(s, batch, fwd_policy, fwd_reference, world)
                opt.scaler.scale(loss / cfg.grad_accum).backward()
            state["position"] = batch["position"]
            logs.append(torch.stack([loss.detach().float(), acc.float(), *(e.detach().mean() for e in errors)]))

        grad_norm, lr_now = optimizer_step(s.policy, opt, cfg.grad_clip)
        finite = bool(torch.isfinite(grad_norm))                # the step's one wait for the device
        state["skipped"] += not finite
        bad_in_a_row = 0 if finite else bad_in_a_row + 1
        state["step"] += 1
        seconds = time.time() - t0
        numbers = dict(lr=lr_now, grad_norm=float(grad_norm), pairs_per_s=run_cfg["pairs_per_step"] / seconds)
        row = dict(metrics_row(state, logs, numbers, pairs, world, gathered), seconds=seconds)
        if rank == 0:
            log.row(row)
        if bad_in_a_row >= cfg.max_bad_steps:
            raise runs.diverged(out, bad_in_a_row)
        stopping = stop.requested(device)   # a --save-on-signal signal on any rank: every rank stops after this step
        every = [n for n in (cfg.checkpoint_every, cfg.rebuild_every) if n]   # a round's build starts at a checkpoint
        due = state["step"] == cfg.max_steps or any(state["step"] % n == 0 for n in every)
        if (rank == 0 or cfg.fsdp) and (due or stopping):
            runs.write_checkpoint(s, out, opt, dict(state, config=run_cfg), pairs, rank)
        if (rank == 0 or cfg.fsdp) and due and not stopping:       # sharded: every rank runs them, rank 0 logs
            validate_and_draw(s, out, val, log, state["step"], rank)
        if stopping:
            break
    batches.close()
    if rank == 0:
        log.close()
        if cfg.lora_rank and cfg.merge_lora and not stopping:   # after the last validation and grid, from the file
            runs.save_merged_unet(cfg, out)
        if not stopping:
            print(runs.done_line(s, state, row, out))
    if stopping:
        stop.exit(state["step"], runs.finish(world, out, lock, stop))
    return runs.finish(world, out, lock, stop)


# ----------------------------------------------------------------------------------------------------------------
# The configuration: every field is a command-line flag (--max-steps, --no-flip, ...). The field defaults are
# the toy world's, so `TrainConfig()` is `python diffdpo.py`; PRESETS hold the papers' recipes for real models.


def flag(default, help, resume="fixed", choices=None):
    """A config field with its --help text, the values it may take (checked before any work, runs.validate), and
    what a resumed run does with it: "fixed" (a different value is refused) or "new" (the resumed run takes the new
    value and records it in config.json)."""
    return field(default=default, metadata=dict(help=help, resume=resume, choices=choices))


@dataclass
class TrainConfig:
    model: str = flag("tiny", "tiny (the toy model, embedded) | tiny-flow (its flow twin) | alias (sd15, sdxl, sd3, "
                              "sd35m, sd35l) | Hub id | diffusers folder | .safetensors")
    data: str = flag("shapes", "shapes (the toy world) | prompts:SPEC (pairs the run makes from prompts) | pickapic | "
                               "hub:OWNER/NAME | parquet file/folder | pairs.jsonl | style:FOLDER | labelled images "
                               "for --loss kto (images.jsonl, parquet)")
    preset: str = flag("auto", "the defaults of: toy | toy-flow | sd15 | sdxl | sd3 | auto (--model's own); flags "
                               "given on the command line win", resume="new")
    out: str = flag("", "run directory (re-running resumes from its checkpoint); default runs/PRESET[-METHOD]",
                    resume="new")
    loss: str = flag("dpo", "dpo | sft (plain diffusion loss on the preferred image) | mapo (no reference model) | "
                            "kto (labelled single images; pairs are split)", choices=("dpo", "sft", "mapo", "kto"))
    beta: float = flag(2000.0, "KL strength (DPO: with the official code's 0.5 factor); the preset's for --loss")
    label_smoothing: float = flag(0.0, "conservative DPO: the share of labels assumed wrong (0: plain DPO)")
    label_noise: float = flag(0.0, "flip each training pair's label with this probability (robustness experiments)")
    desirable_weight: float = flag(1.0, "KTO's lambda_D, the weight of desirable images")
    undesirable_weight: float = flag(1.0, "KTO's lambda_U, the weight of undesirable images")
    max_steps: int = flag(200, "optimizer steps", resume="new")
    batch_size: int = flag(16, "pairs per device per micro-step", resume="new")
    grad_accum: int = flag(1, "micro-steps per optimizer step. A resume may change it, --batch-size and the number of "
                              "processes if the pairs per step stay: the same run up to fp32 rounding (KTO's baseline "
                              "and RPO's matrix then span other batches)", resume="new")
    resolution: int = flag(32, "image side in pixels; 0 = the model's (512 SD1.5, 1024 SDXL)")
    timestep_density: str = flag("auto", "training timesteps: uniform | logit_normal | mode (SD3's densities); auto: "
                                         "logit_normal for flow models, else uniform",
                                 choices=("auto", "uniform", "logit_normal", "mode"))
    lr: float = flag(3e-5, "learning rate actually used (official: 1e-8 x 2048 pairs)", resume="new")
    scale_lr: bool = flag(False, "multiply --lr by the effective batch (pairs per step)", resume="new")
    warmup_steps: int = flag(10, "linear warmup, then constant", resume="new")
    optimizer: str = flag("adamw", "adamw | adafactor", choices=("adamw", "adafactor"))
    weight_decay: float = flag(1e-2, "decoupled weight decay of the optimizer", resume="new")
    grad_clip: float = flag(1.0, "clip the gradient's global norm at this value", resume="new")
    mixed_precision: str = flag("auto", "no | fp16 | bf16 | auto (bf16 on GPUs that have it, else fp16; no on CPU)",
                                resume="new", choices=("auto", "no", "fp16", "bf16"))
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory)", resume="new")
    channels_last: bool = flag(False, "the UNets in channels-last (NHWC) memory format: faster convolutions with "
                                      "oneDNN / cuDNN", resume="new")
    compile: bool = flag(False, "torch.compile the UNets", resume="new")
    fsdp: bool = flag(False, "with torchrun: shard the weights, gradients and optimizer state over the processes "
                             "(FSDP2); checkpoints sharded too", resume="new")
    fsdp_reference: str = flag("shard", "--fsdp: the frozen reference sharded | replicate (whole on each process, in "
                                        "the compute precision: no gathers)", resume="new",
                               choices=("shard", "replicate"))
    lora_rank: int = flag(0, "train rank-R LoRA adapters, not the whole UNet (0: off)")
    lora_alpha: float = flag(0.0, "LoRA scale alpha / rank; 0 = rank (scale 1)")
    lora_targets: str = flag(LORA_TARGETS, "layers that get adapters (peft's suffix rule); add "
                                           "ff.net.0.proj,ff.net.2 for the feed-forwards")
    merge_lora: bool = flag(False, "at the last step, also write the merged OUT/unet/ (or transformer/)", resume="new")
    choice_model: str = flag("", "AI feedback: relabel every pair with a reward model, "
                                 "pickscore|hps|aesthetic|clip[=PATH] (ties dropped)")
    pair_scorer: str = flag("", "prompts:SPEC: the reward model that ranks candidates, any of eval.py's (NAME or "
                                "NAME=PATH; default: judge for the toy's shapes, else pickscore)")
    candidates: int = flag(2, "prompts:SPEC: images per prompt; the best against the worst is the pair")
    min_margin: float = flag(0.0, "prompts:SPEC: a pair whose best - worst score margin is smaller is a tie (dropped)")
    prompt_pairs: int = flag(toy.TOY_PAIRS, "prompts:SPEC: pairs to make per build (each round's), pair i for prompt "
                                            "i mod the set's size (0: one per prompt)")
    rebuild_every: int = flag(0, "prompts:SPEC: online rounds, new pairs from the policy every N steps (0: offline)")
    reference_update: str = flag("base", "at each round the reference stays the base model | becomes the policy "
                                         "(current: iterated DPO)", choices=("base", "current"))
    render_batch: int = flag(256, "images per batch when the run renders pairs (a build resumes by these chunks)")
    lcm_guidance: float = flag(8.5, "an LCM UNet's (time_cond_proj_dim) guidance-scale input while training "
                                    "(LatentConsistencyModelPipeline's default); other UNets ignore it")
    caption_dropout: float = flag(0.0, "probability of training on the empty prompt")
    random_crop: bool = flag(False, "random crops instead of center crops")
    vae_latents: str = flag("mean", "sample (a draw from the VAE posterior: the official code, the sd15 / sdxl "
                                    "presets) | mean (the toy's: tiny was pretrained on posterior means)",
                            choices=("sample", "mean"))
    val_pairs: int = flag(0, "hold out the first N pairs; each checkpoint logs val_loss, val_implicit_acc on them")
    cache: bool = flag(False, "keep VAE latents + text embeddings on disk (both flips are stored), so steps "
                              "run only the UNets", resume="new")
    cache_dir: str = flag("", "where --cache keeps them (default ~/.cache/diffdpo)", resume="new")
    flip: bool = flag(True, "random horizontal flips (--no-flip to disable)")
    seed: int = flag(0, "seeds the data order, augmentation, noise and timesteps")
    checkpoint_every: int = flag(100, "optimizer steps between checkpoints (0: end only; --rebuild-every adds each "
                                      "round's start)", resume="new")
    save_on_signal: str = flag("TERM,USR1", f"on these signals (SLURM's, Kubernetes'), finish the optimizer step, "
                                            f"write the checkpoint and exit with status {runs.STOPPED}: re-run to "
                                            f"resume; a second signal stops at once ('' for none)", resume="new")
    samples: bool = flag(True, "write a sample grid (fixed prompts and seeds) at each checkpoint, to OUT/samples/",
                         resume="new")
    sample_steps: int = flag(20, "DDIM steps for those grids (and for pairs the run builds itself)", resume="new")
    max_bad_steps: int = flag(20, "stop after this many non-finite steps in a row", resume="new")
    device: str = flag("auto", "auto | cpu | cuda", resume="new", choices=("auto", "cpu", "cuda"))
    dist_timeout: int = flag(7200, "seconds a process waits in a collective before torchrun's job fails (rank 0 alone "
                                   "writes checkpoints, validates and draws grids meanwhile)", resume="new")
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
        return pair_noise(batch["index"], latent_shape, self.seed, num_timesteps, density=self.timestep_density)

    @classmethod
    def from_preset(cls, name, **overrides):
        """A config with a named preset's defaults (see PRESETS and LOSS_PRESETS), then `overrides`."""
        if name not in PRESETS:
            raise UserError(f"--preset {name}: expected one of {', '.join(PRESETS)} or auto")
        return cls(**{**PRESETS[name], **LOSS_PRESETS[name].get(overrides.get("loss"), {}), "preset": name,
                      **overrides})

    @classmethod
    def from_args(cls, argv=None, description=__doc__):
        """One flag per field (defaults and help from the dataclass); the preset chosen by --preset (or by --model
        when auto) replaces the defaults, and the flags given on the command line replace those (runs.parse_config)."""
        return runs.parse_config(cls, argv, description, PRESETS, auto_preset, LOSS_PRESETS)

TOY = {f.name: f.default for f in fields(TrainConfig) if f.name not in ("preset", "out")}   # the field defaults
PAPER = dict(beta=5000.0, max_steps=2000, batch_size=1, resolution=0, lr=2.048e-5, warmup_steps=500,
             checkpoint_every=500, sample_steps=25, threads=0, vae_latents="sample", candidates=4, prompt_pairs=0,
             render_batch=8)
PRESETS = {
    # the toy world: the field defaults (200 steps of batch 16 on the tiny model's own shapes pairs); its flow twin
    # (--model tiny-flow): DPO on velocity errors at flow_grpo's beta 100 (a sweep: docs/PROOFS.md)
    "toy": TOY, "toy-flow": dict(TOY, beta=100.0),
    # the paper's SD1.5 recipe (the official code's: AdamW, warmup 500, 2000 steps, beta 5000, lr 1e-8 x 2048 pairs)
    "sd15": PAPER,
    # and SDXL's: Adafactor, warmup 200, gradient checkpointing
    "sdxl": dict(PAPER, optimizer="adafactor", warmup_steps=200, grad_checkpointing=True),
    # SD3 / SD3.5 (flow): flow_grpo's train_sd3_dpo.py's beta 100 (mean velocity errors), both streams' attention for
    # LoRA (diffusers' SD3 targets), gradient checkpointing; the rest is the SD1.5 recipe, not tuned for SD3 here
    "sd3": dict(PAPER, beta=100.0, grad_checkpointing=True, lora_targets=SD3_LORA_TARGETS),
}
# each loss's beta: the papers' for sd15 / sdxl (MaPO 0.1, Diffusion-KTO 1000), measured sweeps for the toy (LOSSES.md)
PAPER_BETAS = dict(mapo=dict(beta=0.1), kto=dict(beta=1000.0))
TOY_BETAS = dict(mapo=dict(beta=0.01), kto=dict(beta=250.0))
LOSS_PRESETS = {"toy": TOY_BETAS, "toy-flow": TOY_BETAS, "sd15": PAPER_BETAS, "sdxl": PAPER_BETAS, "sd3": PAPER_BETAS}


def auto_preset(model):
    """--preset auto: toy / toy-flow for the toy models; sd3 for SD3 (mmdit.is_sd3); sdxl for SDXL (the alias, a
    folder with a second text encoder, or a Hub id with "xl" in its name); sd15 otherwise."""
    if model in TOY_MODELS:
        return "toy" if model == "tiny" else "toy-flow"
    folder = Path(model)
    if is_sd3(model):
        return "sd3"
    if (folder / "model_index.json").is_file():
        return "sdxl" if "text_encoder_2" in read_json(folder / "model_index.json") else "sd15"
    return "sdxl" if "xl" in model.lower() else "sd15"


# ----------------------------------------------------------------------------------------------------------------
# The pieces the loop calls, in the order it calls them. First the processes: torchrun sets RANK / WORLD_SIZE /
# LOCAL_RANK; plain `python` is a world of one.


def setup_distributed(cfg):
    """(rank, world size, device). On GPUs the process group serves CUDA tensors with NCCL and CPU tensors with gloo
    (the pairs-left-out counts travel as Python objects), with --dist-timeout; TF32 matmuls and cuDNN's autotuner
    are on, as for every mixed-precision run."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")


def print0(*args, rank=0):
    if rank == 0:
        print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The models, in the precision that keeps the reference equal to the policy at step 0


def amp_precision(cfg, device):
    """--mixed-precision auto: bf16 on GPUs that have it (Ampere and newer), else fp16; none on the CPU."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def setup(cfg, sd, pair_loss=None):
    """From the loaded pipeline `sd` (fp32): the frozen VAE and text encoders in their precision, the policy, the
    reference, the schedule, the shapes and the loss, as a Setup."""
    device = sd.device
    amp_dtype = DTYPES[amp_precision(cfg, device)]
    for m in sd.modules:
        m.requires_grad_(False).eval()
    for m in filter(None, sd.text_encoders):         # (SD3 may be loaded without its T5)
        m.to(amp_dtype)
    sd.vae.to(torch.float32 if amp_dtype == torch.float16 and sd.kind != "sd15" else amp_dtype)  # SDXL's overflows
    policy, reference = policy_and_reference(cfg, sd.unet, amp_dtype)
    resolution = cfg.resolution or default_size(sd)
    side = resolution // vae_factor(sd)
    flow = sd.kind == "sd3"                          # rectified flow: `abar` holds its sigmas; velocity targets
    abar = (flow_sigmas(sd.scheduler_config) if flow else alphas_cumprod(sd.scheduler_config)).to(device)
    prediction_type = "flow" if flow else sd.scheduler_config.get("prediction_type", "epsilon")
    if cfg.timestep_density == "auto":               # SD3's logit-normal for flow models, DDPM's uniform t otherwise
        cfg.timestep_density = "logit_normal" if flow else "uniform"
    autocast = torch.autocast(device.type, amp_dtype) if amp_dtype != torch.float32 else contextlib.nullcontext()
    return Setup(cfg, sd, policy, reference, abar, prediction_type, resolution, (sd.unet.cfg.in_channels, side, side),
                 autocast, method_loss(cfg, pair_loss))


def policy_and_reference(cfg, unet, amp_dtype):
    """The policy (the UNet, trainable, fp32 master weights) and the reference: a frozen copy, the policy itself with
    LoRA (adapters switched off), or None (SFT, MaPO: one UNet). Frozen weights are kept as autocast_weights says."""
    if cfg.channels_last:  # weights in NHWC: convolutions then keep activations NHWC too (the reference copies it)
        unet.to(memory_format=torch.channels_last)
    reference = None
    if cfg.loss not in ("sft", "mapo") and not cfg.lora_rank:
        reference = autocast_weights(copy.deepcopy(unet), amp_dtype)
    unet.requires_grad_(True).train()
    if cfg.lora_rank:  # only rank-r adapters train; the reference is the same UNet with them switched off
        layers = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        autocast_weights(unet, amp_dtype)
        reference = unet if cfg.loss not in ("sft", "mapo") else None
        print0(f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank:g} on {len(layers)} layers: "
               f"{sum(p.numel() for p in unet.parameters() if p.requires_grad)} trainable parameters")
    unet.set_grad_checkpointing(cfg.grad_checkpointing)
    return unet, reference


def autocast_weights(net, dtype):
    """Store the frozen weights of linear and convolution layers in the autocast dtype. Autocast casts them to it on
    every use anyway (rounding to nearest, as .to() does), so outputs are bit-identical and the casts and a second
    fp32 copy are saved. Normalization layers keep fp32 weights: autocast runs them in fp32, with the policy's fp32
    weights, and so must the reference, else policy != reference at step 0 (the first loss would not be ln 2)."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, LoRALinear)):
            for p in m.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    return net


def method_loss(cfg, pair_loss=None):
    """(err_w, err_l, ref_err_w, ref_err_l, batch, sd, world) -> (loss, implicit accuracy): rpo.py's `pair_loss` if
    given, else --loss's (KTO's takes (err, ref_err, labels, world): image_step)."""
    if pair_loss is not None:
        return pair_loss
    if cfg.loss == "sft":
        return lambda err_w, *rest: sft_loss(err_w)
    if cfg.loss == "mapo":
        return lambda err_w, err_l, *rest: mapo_loss(err_w, err_l, cfg.beta)
    if cfg.loss == "kto":
        return lambda err, ref_err, labels, world: kto_loss(err, ref_err, labels, cfg.beta, world,
                                                            cfg.desirable_weight, cfg.undesirable_weight)
    return lambda err_w, err_l, ref_err_w, ref_err_l, *rest: dpo_loss(err_w, err_l, ref_err_w, ref_err_l, cfg.beta,
                                                                       cfg.label_smoothing)


# ----------------------------------------------------------------------------------------------------------------
# The optimizer: AdamW from torch, Adafactor (Shazeer & Stern 2018; runs.py) for SDXL's memory budget, a linear
# warmup, and fp16's loss scaler, which travel together


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    lr: float                   # the learning rate used: --lr, times the pairs per step with --scale-lr
    pairs_per_step: int


def make_optimizer(cfg, policy, world, device):
    pairs_per_step = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr * pairs_per_step if cfg.scale_lr else cfg.lr
    params = [p for p in policy.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                                      fused=device.type == "cuda")
    elif cfg.optimizer == "adafactor":
        optimizer = runs.Adafactor(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise UserError(f"--optimizer {cfg.optimizer!r}: expected adamw or adafactor")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_precision(cfg, device) == "fp16")
    return Optimization(optimizer, scheduler, scaler, lr, pairs_per_step)


def warmup_constant(warmup_steps):
    """lr multiplier: linear warmup over `warmup_steps` optimizer steps (the first step already moves), then 1."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


# ----------------------------------------------------------------------------------------------------------------
# The pairs: data.open_pairs for --data, after the pairs the run builds itself (prompts:SPEC and shapes:
# onpolicy.py; shapes-style, style:FOLDER: toy.build_pairs), with the --cache store


def training_stream(s, out, state, image_embedder, rank, world):
    """(training pairs, validation pairs or None, batches from the state's stream position): data.open_pairs for
    --data, with the pairs of the state's round built first (onpolicy.round_pairs: rank 0 builds them, the others wait
    for the file; with --fsdp all ranks build together), the --cache store, image embeddings, --choice-model
    relabelling and --val-pairs held out, as configured."""
    cfg, device = s.cfg, s.sd.device
    spec = onpolicy.round_pairs(s, out, state, rank)
    embed = image_embedder(device) if image_embedder else None
    key = ["posterior", s.sd.source, cfg.data, s.resolution, s.sd.vae.scaling_factor, DTYPE_NAMES[s.sd.vae.dtype]]
    key += [x for x in (cfg.choice_model, getattr(embed, "key", None)) if x]
    cache = latent_cache(s.sd, key, cfg.cache_dir) if cfg.cache else None
    relabel = eval.relabeller(cfg.choice_model, device) if cfg.choice_model else None
    pairs = open_pairs(spec or cfg.data, resolution=s.resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                       caption_dropout=cfg.caption_dropout, seed=cfg.seed, cache=cache, relabel=relabel, embed=embed)
    pairs, val = pairs.holdout(cfg.val_pairs) if cfg.val_pairs else (pairs, None)
    pairs.label_noise = cfg.label_noise                                  # the training pairs', never the held-out
    pairs.skipped.update(state.pop("skipped_pairs", {}))                 # a resumed stream's
    pairs.round_stats = onpolicy.round_stats(spec, state["round"]) if onpolicy.build_of(cfg) else {}
    batches = pairs.batches(cfg.batch_size, rank=rank, world_size=world, start=state["position"])
    return pairs, val, prefetch(batches, pin=device.type == "cuda")


# ----------------------------------------------------------------------------------------------------------------
# Resuming: OUT/config.json records the run's settings; OUT/checkpoint.pt holds everything a resume needs


def run_config(cfg, s, opt, world):
    """OUT/config.json's settings: the flags, and what they resolved to (resolution, lr, precision, world size)."""
    fixed = [f.name for f in fields(cfg) if f.metadata["resume"] == "fixed"]
    return dict(asdict(cfg), world_size=world, resolution=s.resolution, lr_used=opt.lr,
                mixed_precision=amp_precision(cfg, s.sd.device), pairs_per_step=opt.pairs_per_step, fixed=fixed)


def resume(cfg, out, run_cfg, s, opt, rank):
    """Load OUT/checkpoint.pt into the models and optimizer if there is one (refusing a changed "fixed" setting;
    applying the new learning rate, warmup and weight decay), write OUT/config.json and trim OUT/metrics.jsonl to the
    checkpoint's step. Returns the loop's state: step, position (in the data stream), skipped (steps), round (of
    --rebuild-every), and the pairs skipped so far (for training_stream)."""
    state = dict(step=0, position=0, skipped=0, round=0)
    ckpt = runs.load_checkpoint(out / "checkpoint.pt")
    if ckpt is not None:
        for k in run_cfg["fixed"] + ["pairs_per_step"]:   # processes, --batch-size, --grad-accum may change
            if k in ckpt["config"] and ckpt["config"][k] != run_cfg[k]:
                raise UserError(f"{out / 'checkpoint.pt'} was made with {k}={ckpt['config'][k]!r}, this command has "
                                f"{k}={run_cfg[k]!r}; use another --out or the same settings to resume")
        reference = s.reference if cfg.reference_update == "current" else None
        if ckpt.get("sharded") or fsdp.sharded(s.policy):                 # written or read in pieces: fsdp.py
            fsdp.load_checkpoint(ckpt, out, s.policy, opt.optimizer, reference, cfg.lora_rank)
        else:
            s.policy.load_state_dict(ckpt["unet"], strict=not cfg.lora_rank)  # with LoRA: the adapters only
            if reference is not None:                                         # --reference-update current
                reference.load_state_dict(ckpt["reference"])
            opt.optimizer.load_state_dict(ckpt["optimizer"])
        opt.scheduler.load_state_dict(ckpt["scheduler"])
        if opt.scaler.is_enabled() and ckpt["scaler"]:                    # fp16's loss scale (none for fp32, bf16)
            opt.scaler.load_state_dict(ckpt["scaler"])
        opt.scheduler.base_lrs = [opt.lr] * len(opt.optimizer.param_groups)
        for group in opt.optimizer.param_groups:                          # "new" settings take effect now
            group.update(initial_lr=opt.lr, weight_decay=cfg.weight_decay,
                         lr=opt.lr * warmup_constant(cfg.warmup_steps)(opt.scheduler.last_epoch))
        state = {k: ckpt.get(k, 0) for k in state}
        state["skipped_pairs"] = {k: set(v) for k, v in ckpt["skipped_pairs"].items()}
        torch.set_rng_state(ckpt["rng"])
        print0(f"resuming {out} from step {state['step']}", rank=rank)
    if rank == 0:
        write_text_atomic(out / "config.json", json.dumps(dict(run_cfg, command=" ".join(sys.argv)), indent=2))
        runs.trim_metrics(out / "metrics.jsonl", state["step"])
    return state


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step, its metrics row, and the stop after too many non-finite steps


def optimizer_step(policy, opt, grad_clip):
    """Clip the gradient's norm and step, unless it is not finite (then the step is skipped: the caller counts it).
    Returns the gradient norm before clipping and the learning rate the step used."""
    opt.scaler.unscale_(opt.optimizer)
    grad_norm = fsdp.clip_grad_norm(policy.parameters(), grad_clip)     # torch's clip_grad_norm_, shards summed
    if torch.isfinite(grad_norm):
        opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    lr = opt.optimizer.param_groups[0]["lr"]
    opt.scheduler.step()
    return grad_norm, lr


def metrics_row(state, logs, numbers, pairs, world, gathered):
    """metrics.jsonl's row of one optimizer step: the loss terms averaged over micro-steps and ranks (on the device:
    one copy to the host per step), the optimizer's `numbers`, and the counts of steps and pairs left out so far."""
    m = runs.all_mean(torch.stack(logs).mean(0), world).tolist()
    return dict(step=state["step"], loss=m[0], implicit_acc=m[1], **numbers, mse_w=m[2], mse_l=m[3],
                ref_mse_w=m[4], ref_mse_l=m[5], skipped=state["skipped"], **pairs.round_stats,
                **runs.gathered_counts(pairs, world, gathered, runs.SKIP_COUNTS))


# ----------------------------------------------------------------------------------------------------------------
# At each checkpoint, after runs.write_checkpoint: the validation loss and the sample grid


def validate_and_draw(s, out, val, log, step, rank):
    """At a checkpoint: the held-out pairs' loss (--val-pairs) and the sample grid, logged by rank 0."""
    numbers = validation(s, val) if val is not None else {}
    grid = runs.samples(s, out, step)
    if rank == 0 and numbers:
        log.row(dict(step=step, **numbers))
    if rank == 0:
        log.grid(grid, step)


@torch.no_grad()
def validation(s, val):
    """The loss and implicit accuracy on the held-out pairs (--val-pairs), each with its own fixed noise, timestep
    and posterior draw (those of its index + 2^40), so the values are comparable across checkpoints."""
    n, totals = s.cfg.val_pairs, 0
    for start in range(0, n, s.cfg.batch_size):
        idx = list(range(start, min(n, start + s.cfg.batch_size)))
        items = [val.item(i) for i in idx]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
        held_out = [i + 2 ** 40 for i in idx]                       # noise draws of their own, not training pairs'
        batch.update(prompts=[it["prompt"] for it in items], index=torch.tensor(held_out), position=held_out[-1] + 1)
        loss, acc, _ = micro_step(s, batch, s.policy, s.reference)
        totals = totals + torch.stack([loss.float(), acc.float()]) * len(idx)
    loss, acc = (totals / n).tolist()
    return dict(val_loss=loss, val_implicit_acc=acc, val_pairs=n)


# ----------------------------------------------------------------------------------------------------------------
# The command line: train, then (for the toy world) evaluate base vs tuned on held-out captions


def main(cfg, pair_loss=None, image_embedder=None):
    """Train; for a toy world (--data shapes|shapes-style), then evaluate base vs tuned on its held-out captions
    (eval.evaluate_toy: OUT/summary.json, OUT/compare.png); with --push-to-hub, upload the result. A problem the user
    can fix (a bad --model, --data or setting, a busy or unwritable --out, ...) ends with a one-line error, exit 2."""
    t_start, rank = time.time(), int(os.environ.get("RANK", 0))
    print0(f"diffdpo: {cfg.method} on {runs.model_name(cfg.model)}, --data {cfg.data}, writing {cfg.out}/", rank=rank)
    try:
        out = train(cfg, pair_loss, image_embedder)
        if rank == 0 and toy.world_of(cfg.data):
            pairs_per_step = cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", 1))
            run = dict(loss=getattr(pair_loss, "name", cfg.method), steps=cfg.max_steps, pairs_per_step=pairs_per_step)
            eval.evaluate_toy(cfg.model, toy.world_of(cfg.data), out, run, t_start)
        if rank == 0 and cfg.push_to_hub:
            config = dict(read_json(out / "config.json"), method=getattr(pair_loss, "name", cfg.method))
            weights = LORA_FILE if cfg.lora_rank and not cfg.merge_lora else weights_folder(cfg.model)
            card = runs.model_card(config, resolve(ALIASES.get(cfg.model, cfg.model)), cfg.push_to_hub, out, weights)
            runs.push_to_hub(cfg.push_to_hub, out, card)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(TrainConfig.from_args())
