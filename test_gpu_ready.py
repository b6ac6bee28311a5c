# ----------------------------------------------------------------------------------------------------------------
# Ready for a GPU without one: the CUDA-only paths exercised on the CPU (the meta device stands in for a device the
# step must not leave; bf16 / fp16 autocast runs on the CPU too; torch.distributed is mocked where it must be)

import datetime
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import diffdpo
import parity
import sample
import unet
from files import UserError
from test_all import grid_rows, hub, read_metrics, shard, train_args  # noqa: F401 (fixtures)


def cli_config(args):
    """A TrainConfig from diffdpo.py's arguments (train_args without the script's name)."""
    return diffdpo.TrainConfig.from_args(args[1:])


@pytest.mark.parametrize("model, extra", [("tiny", []), ("tiny", ["--lora-rank", "4"]), ("sd15", [])])
def test_bf16_first_step_is_ln2(tmp_path, hub, shard, model, extra):
    """With --mixed-precision bf16 (autocast on the CPU), step 1's policy and reference errors are equal, bit for bit,
    and the loss is ln 2: the reference keeps the policy's fp32 normalization weights, and its linear and convolution
    weights are stored as autocast casts the policy's (the toy model full and LoRA, a random SD1.5-layout model)."""
    args = train_args(hub, shard, tmp_path / "run", "--mixed-precision", "bf16", "--max-steps", "1", "--no-samples",
                      *extra)
    cfg = cli_config(args)
    cfg.model = "tiny" if model == "tiny" else cfg.model
    diffdpo.train(cfg)
    row = read_metrics(tmp_path / "run")[0]
    assert abs(row["loss"] - math.log(2)) < 1e-6, row
    assert row["mse_w"] == row["ref_mse_w"] and row["mse_l"] == row["ref_mse_l"], row


def test_merge_lora_validates_and_draws_the_unmerged_policy(tmp_path, hub, shard):
    """--merge-lora writes OUT/unet/ after the last validation and grid, from the LoRA file: the last val_loss is the
    trained policy's against the base (not ln 2) and the last grid's base row is the base model's, unlike the tuned
    row; the merged UNet equals the base with the file's adapters merged (sample.py --lora)."""
    out = tmp_path / "run"
    cfg = cli_config(train_args(hub, shard, out, "--lora-rank", "4", "--merge-lora", "--val-pairs", "4",
                                "--checkpoint-every", "0", "--max-steps", "3", "--lr", "3e-2"))
    diffdpo.train(cfg)
    val = [r for r in read_metrics(out) if "val_loss" in r]
    assert len(val) == 1 and abs(val[0]["val_loss"] - math.log(2)) > 1e-4, val
    base, tuned = grid_rows(out / "samples" / "step000003.png", ["base", "step 3"], diffdpo.SAMPLE_PROMPTS)
    assert np.abs(base - tuned).max() > 10
    merged = unet.load_sd(str(hub["sd15"]), lora=out / "pytorch_lora_weights.safetensors").unet.state_dict()
    saved = unet.load_component(out / "unet", "unet").state_dict()
    assert max((merged[k] - saved[k]).abs().max().item() for k in merged) == 0.0


def test_cache_key_names_the_vae_precision(tmp_path, hub, shard):
    """--cache with --mixed-precision no, then bf16: two cache entries (fp32 and bf16 latents never mix)."""
    for precision in ("no", "bf16"):
        diffdpo.train(cli_config(train_args(hub, shard, tmp_path / precision, "--cache", "--cache-dir",
                                            str(tmp_path / "cache"), "--mixed-precision", precision, "--max-steps",
                                            "1", "--no-samples")))
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


def test_sdxl_fp16_step_passes_the_fp32_vae(tmp_path, hub, shard):
    """SDXL with --mixed-precision fp16: its VAE stays fp32 (it overflows in fp16) and the images reach it in fp32,
    on the CPU as on a GPU; the step runs (fp16 loss scaling included) and logs finite numbers."""
    args = train_args(hub, shard, tmp_path / "xl", "--mixed-precision", "fp16", "--max-steps", "1", "--no-samples")
    args[args.index(str(hub["sd15"]))] = str(hub["sdxl"])
    diffdpo.train(cli_config(args))
    row = read_metrics(tmp_path / "xl")[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["mse_w"])


@pytest.mark.parametrize("loss, lora", [("dpo", 0), ("sft", 0), ("dpo", 4)])
def test_the_step_stays_on_its_device(loss, lora):
    """The whole step (posterior draws, conditioning, noise, the policy's and the reference's passes, the loss and
    the logging row) on PyTorch's meta device: a tensor made on the CPU inside the step fails here, as it would on
    CUDA (SFT's implicit accuracy once was)."""
    cfg = diffdpo.TrainConfig(loss=loss, lora_rank=lora, vae_latents="sample", resolution=32)
    sd = unet.load_sd("tiny").to(torch.device("meta"))
    s = diffdpo.setup(cfg, sd)
    g = torch.Generator().manual_seed(0)
    batch = dict(chosen=torch.rand(2, 3, 32, 32, generator=g), rejected=torch.rand(2, 3, 32, 32, generator=g),
                 prompts=["a red circle on a blue background"] * 2, index=torch.tensor([0, 1]), position=2)
    loss, acc, errors = diffdpo.micro_step(s, batch, s.policy, s.reference)
    logged = torch.stack([loss.detach().float(), acc.float(), *(e.detach().mean() for e in errors)])
    assert logged.device.type == "meta" and logged.shape == (6,)
    loss.backward()


def test_process_group_serves_cpu_tensors_on_gpus(monkeypatch):
    """Under torchrun on GPUs the process group is "cpu:gloo,cuda:nccl" (the skipped pairs travel as CPU objects;
    NCCL alone has no CPU backend) with --dist-timeout; on CPUs it is gloo."""
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for module, flag in ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
                         (torch.backends.cudnn, "benchmark")):
        monkeypatch.setattr(module, flag, getattr(module, flag))         # restored after the test
    rank, world, device = diffdpo.setup_distributed(diffdpo.TrainConfig(device="auto", dist_timeout=1234, threads=0))
    assert (rank, world, str(device)) == (1, 2, "cuda:1")
    assert calls[-1] == (("cpu:gloo,cuda:nccl",), dict(timeout=datetime.timedelta(seconds=1234)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    diffdpo.setup_distributed(diffdpo.TrainConfig(device="auto", threads=0))
    assert calls[-1][0] == ("gloo",)


def test_bench_cuda_precision_on_the_cpu():
    """bench.py's GPU branch runs its steps in bf16: the cached batch is encoded by the fp32 VAE before our step
    casts it (the pixels go in the VAE's own precision), and our bf16 step then trains on it and on pixels."""
    sd, _ = parity.folder_models("tiny", torch.device("cpu"))
    batch = parity.make_batch(2, sample.default_size(sd))
    cached = bench.cached_batch(sd, batch, sample.default_size(sd), torch.bfloat16)
    step = bench.our_dpo_step(sd, torch.bfloat16, lr=1e-4)
    losses = [step(cached).item(), step(batch).item()]
    assert abs(losses[0] - math.log(2)) < 1e-6 and all(math.isfinite(x) for x in losses)


def test_from_preset_is_the_command_lines_preset():
    """TrainConfig.from_preset (README's Python use) equals the command line's --preset; toy is TrainConfig()."""
    cfg = diffdpo.TrainConfig.from_preset("sd15", data="d", out="o")
    assert cfg == diffdpo.TrainConfig.from_args(["--preset", "sd15", "--data", "d", "--out", "o"])
    assert (cfg.beta, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.vae_latents) == (5000.0, 2.048e-5, 2000, 500, "sample")
    assert diffdpo.TrainConfig.from_preset("sdxl").optimizer == "adafactor"
    assert diffdpo.TrainConfig.from_preset("toy") == diffdpo.TrainConfig()
    with pytest.raises(UserError, match="--preset nope: expected one of toy, sd15, sdxl"):
        diffdpo.TrainConfig.from_preset("nope")
