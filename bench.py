"""
Speed of diffdpo against the reference implementation the official Diffusion-DPO code uses (diffusers +
transformers), side by side in one process, on the same inputs, alternating runs, reporting medians and ratios
(reference time / our time: > 1 means we are faster).

    python bench.py --device cpu --quick      # a couple of minutes on 2 cores

CPU: the real SD1.5 UNet (860M parameters, random weights) forward + backward, the tokenizer, and the load of the
UNet from a diffusers-layout fp16 folder. Ends with one JSON line of all figures.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--quick", action="store_true", help="32x32 latents (256 px) and 5 repeats, else 64x64 and 7")
    args = p.parse_args()
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
