"""
Speed of diffdpo against the reference implementation the official Diffusion-DPO code uses (diffusers +
transformers), side by side in one process, on the same inputs, alternating runs, reporting medians and ratios
(reference time / our time: > 1 means we are faster).

    python bench.py --device cpu --quick      # a couple of minutes on 2 cores

CPU: the real SD1.5 UNet (860M parameters, random weights) forward + backward, the tokenizer, and the load of the
UNet from a diffusers-layout fp16 folder. Ends with one JSON line of all figures.

    python bench.py --memory                  # peak memory of a DPO step: full fine-tuning vs LoRA (~20 GiB RAM)
"""
import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

import unet as U

warnings.filterwarnings("ignore")


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
    ours = U.load_component(folder, "unet")
    g = torch.Generator().manual_seed(0)
    x, ctx, t = torch.randn(1, 4, latent, latent, generator=g), torch.randn(1, 77, 768, generator=g), torch.tensor([500])

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
    return alternate({"ours": lambda: U.load_component(folder, "unet"),
                      "diffusers": lambda: UNet2DConditionModel.from_pretrained(folder, variant="fp16",
                                                                                torch_dtype=torch.float32)}, reps)


def bench_tokenizer(folder, n=2000):
    from transformers import CLIPTokenizer
    import test_all
    test_all.write_clip_tokenizer_folder(folder)
    ref = CLIPTokenizer.from_pretrained(folder)
    prompts = [p + f" {i}" for i, p in enumerate(test_all.tokenizer_cases(n_random=n)[:n])]

    def fresh_ours():  # a new tokenizer each time: no BPE cache carried over
        U.CLIPTokenizer.from_folder(folder)(prompts)
    return alternate({"ours": fresh_ours, "transformers": lambda: ref(prompts, padding="max_length", max_length=77,
                                                                      truncation=True, return_tensors="pt")}, 3)


def memory_step(mode, latent=16):
    """One DPO optimizer step (a pair, batch [winner; loser]) on a random-weight SD1.5 UNet in THIS process, full
    fine-tuning (policy + a frozen copy as reference, AdamW) or LoRA rank 8 (adapters only; the reference is the same
    UNet with the adapters off). Returns the process's peak RSS in GiB and the trainable parameter count."""
    import copy
    import resource
    import diffdpo
    torch.manual_seed(0)
    policy = U.UNet(U.UNetConfig.sd15())
    if mode == "lora":
        U.add_lora(policy, 8)
        reference = policy
    else:
        reference = copy.deepcopy(policy).requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    abar = diffdpo.alphas_cumprod(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    x, ctx = torch.randn(2, 4, latent, latent), torch.randn(2, 77, 768)
    noise, t = torch.randn(2, 4, latent, latent), torch.tensor([500, 500])
    off = torch.autocast("cpu", enabled=False)
    m = diffdpo.model_losses(policy, x, ctx, {}, noise, t, abar, "epsilon", off)
    with torch.no_grad(), U.lora_disabled(reference):
        r = diffdpo.model_losses(reference, x, ctx, {}, noise, t, abar, "epsilon", off)
    diffdpo.dpo_loss(m[:1], m[1:], r[:1], r[1:], 5000.0)[0].backward()
    opt.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, sum(p.numel() for p in params)


def memory_table():
    """Peak CPU RSS of one SD1.5 DPO step, full vs LoRA, each in a fresh process; SDXL as parameter arithmetic."""
    import subprocess
    import sys
    rows = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--memory-step", mode], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"memory step {mode} failed: {out.stderr[-500:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"SD1.5 DPO step, {mode:4}: peak RSS {rows[mode]['peak_rss_gib']:.2f} GiB, "
              f"{rows[mode]['trainable']:,} trainable parameters")
    for name, cfg in (("sd15", U.UNetConfig.sd15()), ("sdxl", U.UNetConfig.sdxl())):
        with torch.device("meta"):
            unet = U.UNet(cfg)
            n = sum(p.numel() for p in unet.parameters())
            U.add_lora(unet, 8)
            r = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        # fp32 policy + grads + AdamW (2 states) = 16 bytes/param, bf16 reference 2 bytes/param (GPU recipe)
        rows[f"{name}_weights_gib"] = dict(full=(16 + 2) * n / 2 ** 30, lora=(4 * n + 16 * r) / 2 ** 30,
                                           params=n, lora_params=r)
        print(f"{name}: {n:,} params; weights+grads+AdamW+reference: full {(16 + 2) * n / 2 ** 30:.1f} GiB, "
              f"LoRA r8 ({r:,} trainable) {(4 * n + 16 * r) / 2 ** 30:.1f} GiB (activations not included)")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--quick", action="store_true", help="32x32 latents (256 px) and 5 repeats, else 64x64 and 7")
    p.add_argument("--memory", action="store_true", help="peak memory of a DPO step, full vs LoRA (needs ~20 GiB)")
    p.add_argument("--memory-step", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_step:
        rss, n = memory_step(args.memory_step)
        print(json.dumps(dict(peak_rss_gib=rss, trainable=n)))
        return
    if args.memory:
        print(json.dumps(memory_table()))
        return
    torch.manual_seed(0)
    latent, reps = (32, 5) if args.quick else (64, 7)
    results = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        from diffusers import UNet2DConditionModel
        t0 = time.perf_counter()
        ref = UNet2DConditionModel(**{k: v for k, v in U.SD15_UNET.items() if k != "_class_name"})
        ref.save_pretrained(os.path.join(tmp, "unet"))
        ref.half().save_pretrained(os.path.join(tmp, "unet16"), variant="fp16")
        del ref
        print(f"made a random-weight SD1.5 UNet in {time.perf_counter() - t0:.0f} s")
        rows = [("unet fwd+bwd", f"SD1.5, batch 1, {latent}x{latent} latents", bench_unet_cpu(latent, reps,
                                                                                             os.path.join(tmp, "unet"))),
                ("unet load", "SD1.5 fp16 folder -> fp32", bench_load(os.path.join(tmp, "unet16"), reps)),
                ("tokenizer", "2000 prompts, cold cache", bench_tokenizer(os.path.join(tmp, "tok")))]
    print(f"\n{'what':14} {'setting':34} {'ours s':>9} {'ref s':>9} {'ref/ours':>9}")
    for name, setting, med in rows:
        ref_t = [v for k, v in med.items() if k != "ours"][0]
        ratio = ref_t / med["ours"]
        print(f"{name:14} {setting:34} {med['ours']:9.3f} {ref_t:9.3f} {ratio:9.2f}")
        results[name.replace(" ", "_").replace("+", "_")] = dict(ours_s=med["ours"], reference_s=ref_t, ratio=ratio)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
