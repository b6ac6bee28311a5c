"""
Speed of diffdpo against the reference implementation the official Diffusion-DPO code uses (diffusers +
transformers), side by side in one process, on the same inputs, alternating runs, reporting medians and ratios
(reference time / our time: > 1 means we are faster).

    python bench.py --device cpu --quick      # a couple of minutes on 2 cores

CPU: the real SD1.5 UNet (860M parameters, random weights) forward + backward, the tokenizer, and the load of the
UNet from a diffusers-layout fp16 folder. Ends with one JSON line of all figures.

    python bench.py --device cuda                      # SD1.5 at 512 px and SDXL at 1024 px, random weights
    python bench.py --device cuda --models sd15 --pairs 8
    python bench.py --dpo-step --models tiny           # the same benchmark on the CPU, toy model (~2 minutes)

One full DPO optimizer step, ours vs a step written with diffusers the way the official train.py does it (VAE and
text encoders in the step, frozen half-precision reference UNet, fp32 trainable UNet under autocast, AdamW for SD1.5,
Adafactor + gradient checkpointing for SDXL): pairs/s, the ratio, model FLOPs per step (torch.utils.flop_counter),
MFU against the GPU's dense bf16 peak, and each side's peak GPU memory. Ours runs eager, compiled (--compile), and
compiled with the --cache (no VAE or text encoders in the step). Then 50-step DDIM sampling, 4 images, ours vs the
diffusers pipeline. Ends with one JSON line.

    python bench.py --memory                  # peak memory of a DPO step: full, LoRA, --fsdp on 2 ranks (~20 GiB)
    python bench.py --losses                  # each --loss's step on the toy model vs DPO's, in one process (CPU)
"""
import argparse
import copy
import gc
import importlib.util
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import diffdpo
import fsdp
import mmdit
import sample
import toy
import unet
from data import open_pairs
from files import DTYPE_NAMES
from lora import SD3_LORA_TARGETS, add_lora
from parity import REAL, folder_models, make_batch, random_models, reference_dpo_step, reference_inputs, \
    tokenizer_cases, write_clip_tokenizer_folder
from tokenizer import CLIPTokenizer

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternate(fns, reps):
    """Run each function `reps` times, interleaved a b b a a b ... (neither always goes first) after one warm-up
    each; medians in seconds."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for i in range(reps):
        for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            times[k] += timed(fns[k], 1)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_unet_cpu(latent, reps, folder):
    """SD1.5 UNet forward + backward, batch 1, ours vs diffusers with the same weights."""
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel.from_pretrained(folder)
    ours = unet.load_component(folder, "unet")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, latent, latent, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500])

    def step(model, call):
        def f():
            model.zero_grad(set_to_none=True)
            call(model).square().mean().backward()
        return f
    med = alternate({"ours": step(ours, lambda m: m(x, t, ctx)),
                     "diffusers": step(ref, lambda m: m(x, t, encoder_hidden_states=ctx).sample)}, reps)
    del ref, ours
    return med


def bench_load(folder, reps):
    from diffusers import UNet2DConditionModel
    return alternate({"ours": lambda: unet.load_component(folder, "unet"),
                      "diffusers": lambda: UNet2DConditionModel.from_pretrained(folder, variant="fp16",
                                                                                torch_dtype=torch.float32)}, reps)


def bench_tokenizer(folder, n=2000):
    """n prompts to (n, 77) ids: cold (each side loads its tokenizer from the folder, then tokenizes: no BPE cache
    carried over) and warm (one tokenizer object, called again on the same prompts)."""
    from transformers import CLIPTokenizer as Reference
    write_clip_tokenizer_folder(folder)
    prompts = [p + f" {i}" for i, p in enumerate(tokenizer_cases(n_random=n)[:n])]
    ours, ref = CLIPTokenizer.from_folder(folder), Reference.from_pretrained(folder)
    theirs = lambda tok: tok(prompts, padding="max_length", max_length=77, truncation=True,  # noqa: E731
                             return_tensors="pt")
    cold = alternate({"ours": lambda: CLIPTokenizer.from_folder(folder)(prompts),
                      "transformers": lambda: theirs(Reference.from_pretrained(folder))}, 3)
    warm = alternate({"ours": lambda: ours(prompts), "transformers": lambda: theirs(ref)}, 5)
    return cold, warm


def bench_data(resolution, pairs=64, batch_size=4):
    """Pairs/s one process's data pipeline delivers (parquet row -> JPEG decode -> resize, center crop, flip ->
    tensors), from Pick-a-Pic-like pairs: smooth 768x768 JPEGs (quality 90), as the GPU step must be fed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:768, 0:768] / 768

    def jpeg():
        c = rng.uniform(0, 255, (3, 3))
        img = sum(c[:, i, None, None] * g for i, g in enumerate((yy, xx, yy * xx))) / 2
        img = img.transpose(1, 2, 0) + rng.normal(0, 8, (768, 768, 3))
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype("uint8")).save(buf, "JPEG", quality=90)
        return buf.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.parquet")
        pq.write_table(pa.Table.from_pylist([dict(caption=f"a picture {i}", jpg_0=jpeg(), jpg_1=jpeg(), label_0=1.0,
                                                  label_1=0.0) for i in range(pairs)]), path)
        batches = open_pairs(path, resolution=resolution).batches(batch_size)
        next(batches)
        t0 = time.perf_counter()
        for _ in range(pairs // batch_size):
            next(batches)
        return pairs / (time.perf_counter() - t0)


def memory_step(mode, latent=16):
    """One DPO optimizer step (a pair, batch [winner; loser]) on a random-weight SD1.5 UNet in THIS process, full
    fine-tuning (policy + a frozen copy as reference, AdamW) or LoRA rank 8 (adapters only; the reference is the same
    UNet with the adapters off); "fsdp": full fine-tuning as one of the gloo ranks torchrun started, both UNets
    sharded as `diffdpo.py --fsdp` shards them (whole weights loaded first on every rank, as the trainer does).
    Returns the process's peak RSS in GiB (with fsdp: the largest over the ranks) and the trainable parameter count."""
    torch.manual_seed(0)
    policy = unet.UNet(unet.UNetConfig.sd15())
    if mode == "lora":
        add_lora(policy, 8)
        reference = policy
    else:
        reference = copy.deepcopy(policy).requires_grad_(False)
    if mode == "fsdp":
        torch.distributed.init_process_group("gloo")
        policy, reference = fsdp.shard(policy, torch.float32), fsdp.shard(reference, torch.float32)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    abar = sample.alphas_cumprod(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x, cond = torch.randn(2, 4, latent, latent), dict(context=torch.randn(2, 77, 768))
    eps, t = torch.randn(1, 4, latent, latent), torch.tensor([500])
    errors = diffdpo.dpo_errors(policy, reference, x, cond, eps, t, abar, "epsilon")
    diffdpo.dpo_loss(*errors, 5000.0)[0].backward()
    fsdp.clip_grad_norm(params, 1.0)
    opt.step()
    peak = torch.tensor(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if mode == "fsdp":
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return peak.item(), sum(p.numel() for p in params)


def memory_table():
    """Peak CPU RSS of one SD1.5 DPO step, full vs LoRA, each in a fresh process, and full with --fsdp on 2 gloo
    ranks (per rank); SDXL as parameter arithmetic."""
    rows = {}
    for mode in ("full", "lora", "fsdp"):
        ranks = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if mode == "fsdp" else []
        out = subprocess.run([sys.executable, *ranks, __file__, "--memory-step", mode], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode != 0:
            raise SystemExit(f"memory step {mode} failed: {out.stderr[-500:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"SD1.5 DPO step, {mode:4}: peak RSS {rows[mode]['peak_rss_gib']:.2f} GiB"
              f"{' per rank (2 ranks)' if mode == 'fsdp' else ''}, {rows[mode]['trainable']:,} trainable parameters")
    print(f"--fsdp on 2 ranks / 1 process: {rows['fsdp']['peak_rss_gib'] / rows['full']['peak_rss_gib']:.2f}x")
    for name, cfg in (("sd15", unet.UNetConfig.sd15()), ("sdxl", unet.UNetConfig.sdxl())):
        with torch.device("meta"):
            model = unet.UNet(cfg)
            n = sum(p.numel() for p in model.parameters())
            add_lora(model, 8)
            r = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # fp32 policy + grads + AdamW (2 states) = 16 bytes/param, bf16 reference 2 bytes/param (GPU recipe)
        rows[f"{name}_weights_gib"] = dict(full=(16 + 2) * n / 2 ** 30, lora=(4 * n + 16 * r) / 2 ** 30,
                                           params=n, lora_params=r)
        print(f"{name}: {n:,} params; weights+grads+AdamW+reference: full {(16 + 2) * n / 2 ** 30:.1f} GiB, "
              f"LoRA r8 ({r:,} trainable) {(4 * n + 16 * r) / 2 ** 30:.1f} GiB (activations not included)")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# One full DPO optimizer step: ours (diffdpo.py's pieces, as its training loop runs them) against a step written
# with diffusers + transformers the way the official Diffusion-DPO train.py does it. Both get the same pixels,
# prompts, noise and timesteps; image decoding and tokenization happen in data loaders and are left out (the
# reference even gets its prompts tokenized in advance; ours tokenizes in the step, as diffdpo.py does).

def cached_batch(sd, batch, resolution, half):
    """The same batch as --cache serves it: the VAE posteriors and text embeddings (computed once, on the CPU side)."""
    with torch.no_grad():
        images = torch.cat([batch["chosen"], batch["rejected"]]).to(sd.device, sd.vae.dtype)
        mean, std = (x.float().cpu() * sd.vae.scaling_factor for x in sd.vae.posterior(images))
        context, pooled = sd.encode_prompt(batch["prompts"])
    B = len(batch["prompts"])
    out = dict(batch, chosen=mean[:B], rejected=mean[B:], chosen_std=std[:B], rejected_std=std[B:],
               context=context.float().cpu())
    if pooled is not None:
        out["pooled"] = pooled.float().cpu()
    return out


def our_dpo_step(sd, half=torch.bfloat16, beta=5000.0, optimizer="adamw", checkpointing=False, lr=1e-6,
                 channels_last=False, loss="dpo"):
    """diffdpo.py's training step as step(batch, compiled=False) -> loss: its setup (the policy, the reference in the
    autocast precision), then micro_step (encode with the VAE + text encoders, or take the cache's latents and
    embeddings; noise; policy and reference denoising errors; the DPO loss), backward and optimizer_step (gradient
    clipping, the optimizer). compiled=True runs torch.compile'd UNets (--compile) on the same weights and optimizer.
    The VAE posterior's mean, the batch's own pair indices and seed 0, as the reference step gets them."""
    cfg = diffdpo.TrainConfig(loss=loss, beta=beta, optimizer=optimizer, lr=lr, warmup_steps=0, resolution=0,
                              mixed_precision=DTYPE_NAMES[half], grad_checkpointing=checkpointing,
                              channels_last=channels_last, vae_latents="mean", seed=0)
    s = diffdpo.setup(cfg, sd)
    opt = diffdpo.make_optimizer(cfg, s.policy, 1, sd.device)
    compiled_unets = torch.compile(s.policy), s.reference and torch.compile(s.reference)  # at their first call

    def step(batch, compiled=False):
        policy, reference = compiled_unets if compiled else (s.policy, s.reference)
        loss, _, _ = diffdpo.micro_step(s, batch, policy, reference)
        opt.scaler.scale(loss).backward()
        diffdpo.optimizer_step(s.policy, opt, cfg.grad_clip)
        return loss.detach()
    step.policy, step.setup, step.optimizer = s.policy, s, opt
    return step


def held_bytes(step, batch):
    """The memory a step holds, counted: the distinct UNets' weights, the policy's gradients and optimizer state,
    and the activations saved for the backward pass (tensors, each storage once, no weights among them)."""
    s, params = step.setup, {}
    for net in (s.policy, s.reference):
        params.update({p.data_ptr(): p for p in (net.parameters() if net is not None else ())})
    saved = {}

    def pack(x):
        if x.data_ptr() not in params:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        step(batch)
    state = [v for st in step.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    weights = sum(p.numel() * p.element_size() for p in params.values())
    grads = sum(p.numel() * p.element_size() for p in params.values() if p.requires_grad)
    return weights + grads + sum(v.numel() * v.element_size() for v in state) + sum(saved.values())


def bench_losses(reps):
    """Each --loss's optimizer step on the toy model (the toy preset: batch 16 pairs at 32 px, fp32, each loss's
    beta), the same batch, timed alternately in one process (medians) and as a ratio to DPO's; and the memory each
    step holds (held_bytes) as a ratio to DPO's."""
    torch.manual_seed(0)
    prompts = [p for p in toy.shape_prompts("train")[:16]]
    batch = dict(prompts=prompts, chosen=torch.rand(16, 3, 32, 32) * 2 - 1, rejected=torch.rand(16, 3, 32, 32) * 2 - 1,
                 index=torch.arange(16), position=16)
    steps, rows = {}, {}
    for loss in ("dpo", "sft", "mapo", "kto"):
        beta = diffdpo.TrainConfig.from_preset("toy", loss=loss).beta
        steps[loss] = our_dpo_step(unet.load_sd("tiny"), torch.float32, beta, lr=3e-5, loss=loss)
    medians = alternate({k: (lambda f=f: f(batch)) for k, f in steps.items()}, reps)
    for loss, f in steps.items():
        rows[loss] = dict(seconds_per_step=medians[loss], time_vs_dpo=medians[loss] / medians["dpo"],
                          held_mib=held_bytes(f, batch) / 2 ** 20)
    for loss, r in rows.items():
        r["memory_vs_dpo"] = r["held_mib"] / rows["dpo"]["held_mib"]
        print(f"{loss:5} {r['seconds_per_step']:.3f} s/step ({r['time_vs_dpo']:.2f}x DPO), holds "
              f"{r['held_mib']:.1f} MiB ({r['memory_vs_dpo']:.2f}x DPO)")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and MFU: model FLOPs of a step counted by torch.utils.flop_counter on the meta device (no memory, no time),
# without gradient checkpointing's recomputation (that is hardware FLOPs, not model FLOPs)

PEAK_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
                    ("B200", 2250), ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("RTX 4090", 165),
                    ("RTX 3090", 71)]


def peak_tflops(name):
    """Dense bf16 tensor-core peak of a GPU from its name (the vendor's datasheet), or None when unknown. Names match
    as whole words: "L4" is not "L40", "H200" is not "GH200"."""
    return next((v for k, v in PEAK_BF16_TFLOPS if re.search(rf"\b{re.escape(k)}\b", name)), None)


def flow_step_flops(preset, resolution, lora_rank=0):
    """Model FLOPs of one flow-DPO pair of an SD3 / SD3.5 model (`preset`: sd3, sd35m, sd35l) at `resolution`, as
    (transformers, encoders): the policy MMDiT's forward + backward (with LoRA: only the adapters' weight gradients)
    and the reference's forward on the pair's 2 images (77 + 256 text tokens); the 16-channel VAE encoder on 2
    images, CLIP-L, bigG and T5-XXL on the prompt. Counted on the meta device: no weights, no GPU."""
    meta, cfg = dict(device="meta"), getattr(mmdit.MMDiTConfig, preset)()
    with torch.device("meta"):
        model = mmdit.MMDiT(cfg)
        vae = unet.VAE(unet.VAEConfig.from_dict(dict(latent_channels=16, use_quant_conv=False,
                                                     use_post_quant_conv=False)))
        clips, t5 = [unet.CLIPText(unet.CLIPTextConfig.sd15()), unet.CLIPText(unet.CLIPTextConfig.sdxl())], \
            mmdit.T5Encoder(mmdit.T5Config.t5xxl())
    if lora_rank:
        add_lora(model, lora_rank, targets=SD3_LORA_TARGETS)
    side = resolution // 8
    x, t = torch.randn(2, cfg.in_channels, side, side, **meta), torch.zeros(2, **meta)
    ctx, pooled = torch.randn(2, 77 + 256, cfg.joint_attention_dim, **meta), torch.randn(2, 2048, **meta)
    with FlopCounterMode(display=False) as nets:
        model(x, t, ctx, pooled).sum().backward()                            # policy: forward + backward
        with torch.no_grad():
            model(x, t, ctx, pooled)                                          # reference: forward
    with FlopCounterMode(display=False) as enc, torch.no_grad():
        vae.encode(torch.randn(2, 3, resolution, resolution, **meta))
        for e in clips:
            e(torch.zeros(1, 77, dtype=torch.long, **meta))
        t5(torch.zeros(1, 256, dtype=torch.long, **meta))
    return nets.get_total_flops(), enc.get_total_flops()


def flow_flops_table():
    """flow_step_flops for SD3-medium, SD3.5-medium and -large at 1024 px, full and LoRA rank 16."""
    rows = {}
    print(f"{'model, 1024 px':16} {'MMDiTs, full':>13} {'MMDiTs, LoRA':>13} {'encoders':>9}  (TFLOP per pair)")
    for preset in ("sd3", "sd35m", "sd35l"):
        full, enc = flow_step_flops(preset, 1024)
        lora, _ = flow_step_flops(preset, 1024, lora_rank=16)
        rows[preset] = dict(full_tflop=full / 1e12, lora_tflop=lora / 1e12, encoders_tflop=enc / 1e12)
        print(f"{preset:16} {full / 1e12:13.1f} {lora / 1e12:13.1f} {enc / 1e12:9.2f}")
    return rows


def step_flops(sd, pairs, resolution):
    """Model FLOPs of one DPO step of `pairs` pairs, as (UNets, encoders): the policy UNet's forward + backward and
    the reference UNet's forward on 2B images; the VAE encoder on 2B images and the text encoders on B prompts (the
    part --cache removes)."""
    f, B, meta = sample.vae_factor(sd), pairs, dict(device="meta")
    with torch.device("meta"):
        model, vae = unet.UNet(sd.unet.cfg), unet.VAE(sd.vae.cfg)
        encoders = [unet.CLIPText(e.cfg) for e in sd.text_encoders]
    x, t = torch.randn(2 * B, 4, resolution // f, resolution // f, **meta), torch.zeros(2 * B, dtype=torch.long, **meta)
    L = sd.tokenizers[0].max_length
    ctx = torch.randn(2 * B, L, sum(e.cfg.hidden_size for e in encoders), **meta)
    added = dict(text_embeds=torch.randn(2 * B, encoders[-1].cfg.projection_dim, **meta),
                 time_ids=torch.randn(2 * B, 6, **meta)) if sd.kind == "sdxl" else {}
    with FlopCounterMode(display=False) as unets:
        model(x, t, ctx, **added).sum().backward()                             # policy: forward + backward
        with torch.no_grad():
            model(x, t, ctx, **added)                                          # reference: forward
    with FlopCounterMode(display=False) as enc, torch.no_grad():
        vae.encode(torch.randn(2 * B, 3, resolution, resolution, **meta))
        for e in encoders:
            e(torch.zeros(B, L, dtype=torch.long, **meta))
    return unets.get_total_flops(), enc.get_total_flops()


# ----------------------------------------------------------------------------------------------------------------
# The GPU benchmark


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    """Drop what the last benchmark left: compiled graphs (they hold their modules) and cached GPU blocks."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gib(n):
    return n / 2 ** 30


def load_models(kind, device, root):
    return random_models(kind, device, root) if kind in REAL else folder_models(kind, device)


def bench_dpo_step(kind, device, pairs, reps, root, compile=True, channels_last=False):
    """pairs/s, peak memory and MFU of one DPO optimizer step: the reference vs ours (eager; compiled; compiled with
    the cache). Memory per side: what it keeps resident (its weights and optimizer states) + one step's peak above
    that, so the two sides, both resident in this process, are counted apart."""
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    sd, ref = load_models(kind, device, root)
    sdxl = sd.kind == "sdxl"
    optimizer = "adafactor" if sdxl else "adamw"  # the official recipe's optimizers; SDXL with checkpointing
    mem = lambda: torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # noqa: E731
    resolution = sample.default_size(sd)
    batch = make_batch(pairs, resolution)
    inputs = reference_inputs(ref, batch, device)
    cached = cached_batch(sd, batch, resolution, half)
    # what each side keeps on the GPU: its networks as loaded, plus what building and warming up its step added
    # (the frozen reference copy, dtype casts, optimizer states); its peak is that + one step's peak above it
    loaded = lambda ms: sum(t.numel() * t.element_size() for m in ms for t in [*m.parameters(), *m.buffers()])  # noqa
    resident = {"reference": loaded([ref.unet, ref.vae, *ref.text_encoders]) - mem()}
    reference = reference_dpo_step(ref, half, optimizer=optimizer, checkpointing=sdxl)
    calls = {"reference": lambda: reference(batch, *inputs)}
    calls["reference"]()                                                      # warm-up: optimizer states
    resident["reference"] += mem()
    resident["ours"] = loaded(sd.modules) - mem()
    ours = our_dpo_step(sd, half, optimizer=optimizer, checkpointing=sdxl, channels_last=channels_last)
    calls["ours"] = lambda: ours(batch)
    if compile:
        calls["ours compiled"] = lambda: ours(batch, compiled=True)
        calls["ours compiled + cache"] = lambda: ours(cached, compiled=True)
    for k in calls:
        if k != "reference":
            calls[k]()                                                        # warm-up: compilation
    resident["ours"] += mem()
    resident.update({k: resident["ours"] for k in calls if k.startswith("ours ")})
    peak = {}

    def measured(name):
        def f():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = mem()
            calls[name]()
            sync(device)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0), resident[name] + torch.cuda.max_memory_allocated(device) - start)
        return f
    med = alternate({k: measured(k) for k in calls}, reps)
    unet_flops, encoder_flops = step_flops(sd, pairs, resolution)
    tflops = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    rows = {}
    for k, s in med.items():
        f = unet_flops + (0 if "cache" in k else encoder_flops)
        rows[k] = dict(pairs_per_s=pairs / s, seconds=s, ratio=med["reference"] / s, tflop_per_step=f / 1e12,
                       mfu=f / s / (tflops * 1e12) if tflops else None,
                       peak_gib=gib(peak[k]) if device.type == "cuda" else None)
    return rows


def bench_sampling(kind, device, n, steps, root):
    """images/s of text-to-image (DDIM, guidance 7.5, half precision on GPU): ours vs the diffusers pipeline on the
    same networks, prompts and initial noise."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    sd, ref = load_models(kind, device, root)
    sd.to(dtype=half)
    for m in (ref.unet, ref.vae, *ref.text_encoders):
        m.to(half)
    size = sample.default_size(sd)
    prompts = make_batch(n, 8)["prompts"]
    latents = sample.initial_latents(sd, n, size, size)
    parts = dict(vae=ref.vae, text_encoder=ref.text_encoders[0], tokenizer=ref.tokenizers[0], unet=ref.unet,
                 scheduler=DDIMScheduler.from_config(sd.scheduler_config))
    if sd.kind == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=ref.text_encoders[1], tokenizer_2=ref.tokenizers[1], **parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def ours():
        sample.generate(sd, prompts, steps=steps, guidance=7.5, latents=latents, sampler="ddim")
        sync(device)

    def reference():
        pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, latents=latents.to(device, half),
             height=size, width=size)
        sync(device)
    med = alternate({"ours": ours, "diffusers": reference}, 3)
    return dict(images=n, steps=steps, ours_images_per_s=n / med["ours"],
                reference_images_per_s=n / med["diffusers"], ratio=med["diffusers"] / med["ours"])


def step_table(device, models, pairs, reps, compile, sampling_steps, root, channels_last=False):
    """The DPO-step and sampling benchmarks for each model; prints tables, returns the figures."""
    out = {}
    for kind in models:
        B = pairs or (1 if kind == "sdxl" else 4)
        t0 = time.perf_counter()
        rows = bench_dpo_step(kind, device, B, reps, root, compile, channels_last)
        print(f"\n{kind}: one DPO optimizer step, {B} pair(s), {time.perf_counter() - t0:.0f} s with compilation")
        print(f"{'':24} {'pairs/s':>9} {'x ref':>7} {'TFLOP/step':>11} {'MFU':>6} {'peak GiB':>9}")
        for k, r in rows.items():
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
            memory = f"{r['peak_gib']:9.1f}" if r["peak_gib"] is not None else "        -"
            print(f"{k:24} {r['pairs_per_s']:9.3f} {r['ratio']:7.2f} {r['tflop_per_step']:11.2f} {mfu:>6} {memory}")
        out[kind] = dict(pairs=B, step=rows)
        free_memory(device)
        if sampling_steps:
            smp = bench_sampling(kind, device, 4, sampling_steps, root)
            print(f"sampling, 4 images x {sampling_steps} DDIM steps: ours {smp['ours_images_per_s']:.3f} images/s, "
                  f"diffusers {smp['reference_images_per_s']:.3f} ({smp['ratio']:.2f}x)")
            out[kind]["sampling"] = smp
        free_memory(device)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CPU: 32x32 latents (256 px) and 5 repeats, else 64x64 and 7")
    p.add_argument("--memory", action="store_true", help="peak memory of a DPO step, full vs LoRA vs 2 "
                   "--fsdp ranks (needs ~20 GiB)")
    p.add_argument("--memory-step", choices=["full", "lora", "fsdp"], help=argparse.SUPPRESS)
    p.add_argument("--flow-flops", action="store_true", help="FLOPs per flow-DPO pair of SD3 / SD3.5 (meta device)")
    p.add_argument("--losses", action="store_true", help="each --loss's step on the toy model, time and memory vs DPO")
    p.add_argument("--dpo-step", action="store_true", help="the DPO-step and sampling benchmarks (on by default "
                                                           "with --device cuda)")
    p.add_argument("--models", default="sd15,sdxl", help="for --dpo-step: sd15, sdxl (random weights at the real "
                                                         "architectures), tiny, or diffusers folders")
    p.add_argument("--pairs", type=int, default=0, help="pairs per step (default: 4, SDXL 1)")
    p.add_argument("--reps", type=int, default=5, help="timed repeats of each step (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-sampling", action="store_true", help="skip the sampling benchmark")
    p.add_argument("--channels-last", action="store_true", help="our UNets in NHWC (diffdpo.py --channels-last)")
    args = p.parse_args()
    if args.memory_step:
        rss, n = memory_step(args.memory_step)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(dict(peak_rss_gib=rss, trainable=n)))
        return
    if args.memory:
        print(json.dumps(memory_table()))
        return
    if args.flow_flops:
        print(json.dumps(flow_flops_table()))
        return
    if args.losses:
        torch.set_num_threads(1)
        print(json.dumps(dict(threads=1, torch=torch.__version__, **bench_losses(args.reps))))
        return
    missing = [m for m in ("diffusers", "transformers", "open_clip") if importlib.util.find_spec(m) is None]
    if missing:  # the references, and open-clip-torch's copy of CLIP's BPE file for the random-weight tokenizers
        raise SystemExit(f"error: bench.py needs {', '.join(missing)}: pip install -r requirements-test.txt && pip "
                         f"install --no-deps open-clip-torch==3.3.0 (offline: carry the wheels, install --no-deps)")
    torch.manual_seed(0)
    results = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.device == "cuda" or args.dpo_step:
        device = torch.device(args.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("error: --device cuda, but torch sees no CUDA GPU")
            results["gpu"] = torch.cuda.get_device_name(device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with tempfile.TemporaryDirectory() as tmp:
            results.update(step_table(device, args.models.split(","), args.pairs, args.reps, not args.no_compile,
                                      0 if args.no_sampling else 50, tmp, args.channels_last))
        print(json.dumps(results))
        return
    latent, reps = (32, 5) if args.quick else (64, 7)
    with tempfile.TemporaryDirectory() as tmp:
        from diffusers import UNet2DConditionModel
        t0 = time.perf_counter()
        ref = UNet2DConditionModel(**{k: v for k, v in unet.SD15_UNET.items() if k != "_class_name"})
        ref.save_pretrained(os.path.join(tmp, "unet"))
        ref.half().save_pretrained(os.path.join(tmp, "unet16"), variant="fp16")
        del ref
        print(f"made a random-weight SD1.5 UNet in {time.perf_counter() - t0:.0f} s")
        rows = [("unet fwd+bwd", f"SD1.5, batch 1, {latent}x{latent} latents",
                 bench_unet_cpu(latent, reps, os.path.join(tmp, "unet"))),
                ("unet load", "SD1.5 fp16 folder -> fp32", bench_load(os.path.join(tmp, "unet16"), reps))]
        cold, warm = bench_tokenizer(os.path.join(tmp, "tok"))
        rows += [("tokenizer", "load + 2000 prompts", cold), ("tokenizer warm", "2000 prompts again", warm)]
    for R in (512, 1024):
        results[f"data_pairs_per_s_{R}"] = rate = bench_data(R)
        print(f"data pipeline: {rate:.1f} pairs/s at {R} px (one process, 768 px JPEG pairs)")
    print(f"\n{'what':14} {'setting':34} {'ours s':>9} {'ref s':>9} {'ref/ours':>9}")
    for name, setting, med in rows:
        ref_t = [v for k, v in med.items() if k != "ours"][0]
        ratio = ref_t / med["ours"]
        print(f"{name:14} {setting:34} {med['ours']:9.3f} {ref_t:9.3f} {ratio:9.2f}")
        results[name.replace(" ", "_").replace("+", "_")] = dict(ours_s=med["ours"], reference_s=ref_t, ratio=ratio)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
