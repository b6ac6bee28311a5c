"""
diffdpo's proof: every network, tokenizer, sampler and loss against its reference (diffusers / transformers / the
papers' formulas) on the same inputs, plus small end-to-end runs. CPU only, offline, about three minutes on 2 cores:

    pytest test_all.py

The tests build their own "hub" (parity.py): random-weight models written by diffusers/transformers
`save_pretrained` in the exact Hub layout, at small configs that exercise every code path, loaded through the same
`load_sd` users call.

The sections follow the modules' reading order: the networks (with the tokenizer and single-file checkpoints),
sampling, the method, the trainer, data, evaluation, LoRA, LCM, Diffusion-RPO, reliability, the toy world, bench.py,
then the SD3 / SD3.5 networks (mmdit.py) and pipeline (prompt encoding, flow-matching sampling).
Most training runs happen in this process (run_here: the scripts' own code path, without starting Python again);
every CLI also runs at least once as a user runs it (run_cli), and the 2-process runs go through torchrun.
"""
import csv
import dataclasses
import datetime
import gc
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import huggingface_hub as hh
import numpy as np
import scipy.linalg
import sentencepiece as spm
import tokenizers as tk
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
from huggingface_hub import constants
from huggingface_hub.errors import RepositoryNotFoundError
from peft import LoraConfig
from PIL import Image
import safetensors.torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import (BertConfig, BertModel, BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                          BlipImageProcessorPil, BlipProcessor, CLIPConfig, CLIPImageProcessorPil, CLIPModel)
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel
from transformers import T5Tokenizer as HFT5Tokenizer
from transformers import T5TokenizerFast
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention
from transformers.optimization import Adafactor as HFAdafactor

import bench
import convert
import data
import scorer_nets
import diffdpo
import eval
import files
import lora
import mmdit
import onpolicy
import parity
import pretrain
import rpo
import runs
import sample
import shards
import tokenizer
import toy
import unet
from files import DataError, UserError
from tokenizer import MAX_PROMPT_CHARS
from parity import (SCHEDULER, SD15_TEST, SDXL_TEST, clip_vocab_source, make_hub, reference_pipe, tokenizer_cases,
                    write_clip_tokenizer_folder, write_t5_tokenizer_folder)

warnings.filterwarnings("ignore")
SUITE_THREADS = min(4, os.cpu_count() or 1)
torch.set_num_threads(SUITE_THREADS)
ROOT = Path(__file__).resolve().parent


# this process's peak resident memory in GiB (VmHWM: unlike ru_maxrss it does not carry the parent's over an exec)
PEAK_RSS_GIB = '[int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0] / 2**20'


def rel_err(a, b):
    """max |a - b| / max |b|: one number per comparison, scale-free."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------------------------
# The test hub, the Pick-a-Pic shard, and running the CLIs (in a fresh process, or in this one)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """{"sd15": folder, "sdxl": folder} built once per test session."""
    root = tmp_path_factory.mktemp("hub")
    return {k: make_hub(root / k, k) for k in ("sd15", "sdxl")}


def jpeg(color, size=(40, 32), noise_seed=0):
    rng = np.random.default_rng(noise_seed)
    arr = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def make_pickapic_shard(path, n=24, ties=3, corrupt=1, seed=0):
    """A Pick-a-Pic v2 shard: the preferred image is reddish, the other bluish, on either side; some ties and an
    undecodable JPEG, plus a few of the dataset's other columns."""
    rows = []
    for i in range(n):
        noise = seed * 1000 + 2 * i
        red, blue = jpeg((200, 40, 40), noise_seed=noise), jpeg((40, 40, 200), noise_seed=noise + 1)
        left = i % 2 == 0  # preferred image on the left half of the time
        label_0 = 0.5 if i < ties else (1.0 if left else 0.0)
        jpg_0, jpg_1 = (red, blue) if left else (blue, red)
        if i == ties:  # the first non-tie pair is corrupt
            jpg_0 = b"\xff\xd8 not really a jpeg"
        rows.append(dict(caption=f"a picture number {i}", jpg_0=jpg_0, jpg_1=jpg_1, label_0=label_0,
                         label_1=1.0 - label_0, best_image_uid=f"uid{i}", has_label=True, are_different=True))
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def shard(tmp_path_factory):
    return make_pickapic_shard(tmp_path_factory.mktemp("data") / "train-00000-of-00001.parquet")


@pytest.fixture(autouse=True)
def signal_handlers():
    """A run that failed in-process leaves its handlers installed (the CLI exits): put the test's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def suite_threads():
    """Every test starts and ends at the suite's torch threads. A run of the toy model sets 1 (its --threads), and
    the session's runs (fixtures, made during some test's setup) must all see the same number: their comparisons
    of weights are exact only at equal thread counts."""
    torch.set_num_threads(SUITE_THREADS)
    yield
    torch.set_num_threads(SUITE_THREADS)


def run_cli(args, env=None, torchrun=0):
    """Run a CLI of ours in a fresh process, as a user would; torchrun=N: N gloo ranks started by torchrun."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                              if torchrun else []) + args
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_here(args):
    """`python diffdpo.py ARGS` or `python rpo.py ARGS` (args as for run_cli) in this process: the script's __main__
    (its config from the presets and flags, its method, its one-line errors with exit 2), without starting Python
    and importing torch again. Returns what run_cli returns: returncode, stdout, stderr."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", list(args)), redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            if args[0] == "rpo.py":
                cfg = rpo.RPOConfig.from_args(args[1:])
                embed = rpo.image_embedder(cfg.rpo_clip) if cfg.rpo_embed != "text" else None
                diffdpo.main(cfg, rpo.make_pair_loss(cfg), embed)
            else:
                diffdpo.main(diffdpo.TrainConfig.from_args(args[1:]))
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def train_args(hub, shard, out, *extra):
    return ["diffdpo.py", "--model", str(hub["sd15"]), "--data", str(shard), "--out", str(out), "--resolution", "32",
            "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-4", "--warmup-steps", "2", "--device", "cpu",
            "--checkpoint-every", "2", *extra]


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def unet_weights(out):
    return load_file(Path(out) / "unet" / "diffusion_pytorch_model.safetensors")


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def grid_rows(path, row_labels, col_labels, size=(32, 32)):
    """The rows of a sample.image_grid PNG as int arrays (cell height, columns x cell width, 3), placed by
    sample.grid_layout; checks the grid's height."""
    w, h, left, top, _ = sample.grid_layout(size, row_labels, col_labels)
    grid = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert grid.shape[0] == top + h * len(row_labels), (grid.shape, top, h)
    return [grid[top + r * h: top + (r + 1) * h, left:] for r in range(len(row_labels))]


def unet_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim[0], generator=g)
    added = {}
    if cfg.addition_embed_type == "text_time":
        added = dict(text_embeds=torch.randn(2, 32, generator=g), time_ids=torch.tensor([[32., 32, 0, 0, 32, 32]] * 2))
    return x, torch.tensor([10, 700]), ctx, added


def ref_eps(ref, x, t, ctx, added):
    cond = dict(added_cond_kwargs=added) if added else {}
    return ref(x, t, encoder_hidden_states=ctx, **cond).sample


def pixel_diff(ours, theirs):
    return max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(ours, theirs))


@pytest.fixture(scope="session")
def tuned_unet(tmp_path_factory, hub):
    """A "tuned" UNet folder for sample.py --compare and eval.py --unet: the sd15 hub's UNet with every weight moved
    by N(0, 0.05^2) noise."""
    sd = unet.load_sd(str(hub["sd15"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sd.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("tuned") / "unet"
    unet.save_component(sd.unet, folder)
    return folder


def random_lora(model, rank, alpha=None, targets=lora.LORA_TARGETS, std=0.05, seed=0):
    """Adapters on `model` (lora.add_lora) whose B is drawn from N(0, std^2) instead of zeros, so that they change
    the output; A and B drawn from `seed`. Returns the adapted layers' names."""
    torch.manual_seed(seed)
    names = lora.add_lora(model, rank, alpha, targets)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.weight.normal_(0.0, std)
    return names


# ----------------------------------------------------------------------------------------------------------------
# Networks (unet.py): the UNet, VAE and CLIP text encoders against diffusers / transformers; loading from folders,
# the HF cache and the real architectures


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_networks_match_reference(hub, kind):
    sd = unet.load_sd(str(hub[kind]))
    ref = reference_pipe(hub[kind], kind)
    assert sd.kind == kind and len(sd.tokenizers) == len(sd.text_encoders) == (2 if kind == "sdxl" else 1)
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of a cat", "A RED cube left of a blue sphere, 4k!! it's", ""]
    with torch.no_grad():
        # text conditioning, built as the pipelines build it
        ctx, pooled = sd.encode_prompt(prompts)
        if kind == "sd15":
            rctx, _ = ref.encode_prompt(prompts, "cpu", 1, False)
            assert pooled is None
        else:
            rctx, _, rpooled, _ = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            assert rel_err(pooled, rpooled) < 1e-4
        assert ctx.shape == rctx.shape and rel_err(ctx, rctx) < 1e-4
        # UNet, at an even and at an odd latent size (the upsamplers then follow the skips' sizes)
        for hw in [(8, 8), (9, 7)]:
            x = torch.randn(3, 4, *hw, generator=g)
            t = torch.tensor([0, 500, 999])
            extra, rextra = {}, {}
            if kind == "sdxl":
                tid = sd.time_ids(3, 64, 56, crop=(3, 5), original=(80, 72))
                extra = dict(text_embeds=pooled, time_ids=tid)
                rextra = dict(added_cond_kwargs=dict(text_embeds=pooled, time_ids=tid))
            ours = sd.unet(x, t, ctx, **extra)
            theirs = ref.unet(x, t, encoder_hidden_states=ctx, **rextra).sample
            assert ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-4, (hw, rel_err(ours, theirs))
        # VAE: encode returns the posterior mean; decode the image
        img = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
        assert rel_err(sd.vae.encode(img), ref.vae.encode(img).latent_dist.mean) < 1e-4
        z = torch.randn(2, 4, 4, 5, generator=g)
        assert rel_err(sd.vae.decode(z), ref.vae.decode(z).sample) < 1e-4
        assert sd.vae.scaling_factor == ref.vae.config.scaling_factor
        # the loaded scheduler config is the pipeline's
        assert sd.scheduler_config["beta_schedule"] == "scaled_linear"


def test_unet_gradients_match_reference(hub):
    """Training differentiates the UNet: the gradients must match too (with gradient checkpointing on)."""
    sd = unet.load_sd(str(hub["sd15"]))
    ref = UNet2DConditionModel.from_pretrained(hub["sd15"], subfolder="unet")
    sd.unet.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 900])
    sd.unet(x, t, ctx).square().mean().backward()
    ref(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
    ours = dict(sd.unet.named_parameters())
    worst = max(rel_err(ours[k].grad, p.grad) for k, p in ref.named_parameters())
    assert worst < 1e-4, worst


def test_fp16_variant_and_sharded_weights(tmp_path, hub):
    """A folder with only *.fp16.safetensors loads (cast to the asked dtype); sharded weights load via their index."""
    folder = make_hub(tmp_path / "fp16", "sd15", variant="fp16", seed=3)
    sd = unet.load_sd(str(folder))
    ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", variant="fp16", torch_dtype=torch.float32)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert rel_err(sd.unet(x, 7, ctx), ref(x, 7, encoder_hidden_states=ctx).sample) < 1e-6
    sharded = tmp_path / "sharded"
    UNet2DConditionModel.from_pretrained(hub["sd15"], subfolder="unet").save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = unet.load_component(sharded, "unet")
    base = unet.load_sd(str(hub["sd15"])).unet
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_hub_cache_offline(tmp_path, hub):
    """A Hub repo id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1, as for a user who downloaded
    once (the same code path as an online download, minus the network)."""
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--test-org--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(hub["sd15"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    # one fresh process: the cached repo loads; then a repo that is not cached fails, saying so
    code = ("import unet; sd = unet.load_sd('test-org/tiny-sd'); "
            "print(sd.kind, sum(p.numel() for p in sd.unet.parameters()), flush=True); "
            "unet.load_sd('test-org/missing')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    n = sum(p.numel() for p in unet.load_sd(str(hub["sd15"])).unet.parameters())
    assert out.stdout.split() == ["sd15", str(n)], out.stderr[-2000:]
    assert out.returncode != 0 and "test-org/missing" in out.stderr and "not in the local HF cache" in out.stderr


def test_load_errors_name_the_problem(tmp_path, hub):
    with pytest.raises(ValueError, match="not an alias"):
        unet.load_sd("no such model")
    with pytest.raises(ValueError, match="model_index.json"):
        unet.load_sd(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(hub["sd15"], bad)
    (bad / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="vae/diffusion_pytorch_model.safetensors: not a readable safetensors"):
        unet.load_sd(str(bad))
    # a tensor of the wrong shape is named
    f = hub["sd15"] / "unet" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    w["conv_in.weight"] = w["conv_in.weight"][:, :3].contiguous()
    save_file(w, tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = unet.UNet(unet.UNetConfig.from_dict(json.loads((f.parent / "config.json").read_text())))
    with pytest.raises(ValueError, match=r"conv_in.weight has shape \(32, 3, 3, 3\), expected \(32, 4, 3, 3\)"):
        unet.load_weights(model, load_file(tmp_path / "w.safetensors"))
    del w["conv_out.bias"]
    with pytest.raises(ValueError, match="1 missing keys.*conv_out.bias"):
        unet.load_weights(model, w)
    # a config.json field of the wrong type, and a noise schedule the samplers do not implement: one line each
    config = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps(dict(config, block_out_channels="abc")))
    with pytest.raises(unet.LoadError, match=r"bad/unet/config.json: UNetConfig: block_out_channels='abc' is not of "):
        unet.load_component(bad / "unet", "unet")
    with pytest.raises(UserError, match="beta_schedule='squaredcos_cap_v2' is not supported"):
        sample.alphas_cumprod(dict(SCHEDULER, beta_schedule="squaredcos_cap_v2"))


def test_presets_build_at_real_sizes():
    """The named presets are the real architectures: parameter and tensor counts of SD1.5's and SDXL's UNets (as
    the released checkpoints hold them) and of the text encoders, built on the meta device (no memory)."""
    with torch.device("meta"):
        sd15, sdxl = unet.UNet(unet.UNetConfig.sd15()), unet.UNet(unet.UNetConfig.sdxl())
        clip_l, big_g = unet.CLIPText(unet.CLIPTextConfig.sd15()), unet.CLIPText(unet.CLIPTextConfig.sdxl())
        vae = unet.VAE(unet.VAEConfig.sd15())
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(sd15), len(sd15.state_dict())) == (859_520_964, 686)
    assert (count(sdxl), len(sdxl.state_dict())) == (2_567_463_684, 1680)
    assert count(clip_l) == 123_060_480 and count(big_g) == 694_659_840 and count(vae) == 83_653_863


def random_diffusers_unet(config, dtype):
    """diffusers' UNet2DConditionModel at `config` with torch's default random init (each layer's reset_parameters,
    as its constructor does), made on the meta device and initialised in `dtype`: at the real SD1.5 size, half
    the memory and time of the constructor's fp32 init followed by a cast."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**{k: v for k, v in config.items() if k != "_class_name"})
    model = model.to(dtype).to_empty(device="cpu")
    assert not list(model.buffers())
    for m in model.modules():
        if m._parameters:
            m.reset_parameters()
    return model


def test_real_sd15_architecture(tmp_path):
    """The real SD1.5 UNet (860M parameters, random weights stored as the fp16 variant, as on the Hub) loads and
    matches diffusers; the load is timed and its peak memory measured in a fresh process."""
    torch.manual_seed(0)
    ref = random_diffusers_unet(unet.SD15_UNET, torch.float16)
    ref.save_pretrained(tmp_path / "unet", variant="fp16")
    ref.float()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 768, generator=g)
    torch.save((x, ctx), tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = ref(x, 321, encoder_hidden_states=ctx).sample
    del ref
    code = f"""
import time, torch, unet
t0 = time.time(); m = unet.load_component({str(tmp_path / 'unet')!r}, 'unet'); dt = time.time() - t0
x, ctx = torch.load({str(tmp_path / 'inputs.pt')!r})
with torch.no_grad(): torch.save(m(x, 321, ctx), {str(tmp_path / 'out.pt')!r})
print(dt, {PEAK_RSS_GIB})
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    load_s, rss_gb = map(float, out.stdout.split())
    print(f"real SD1.5 UNet: load {load_s:.1f} s, peak RSS {rss_gb:.2f} GiB")
    # fp32 weights (3.2 GiB) + the memory-mapped fp16 file (1.6 GiB) + torch; two fp32 copies would be > 6.4 GiB
    assert rss_gb < 5.6, "loading must not hold two copies of the fp32 weights"
    assert rel_err(torch.load(tmp_path / "out.pt"), expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer (tokenizer.py) against transformers' CLIPTokenizer


def same_ids(ours, ref, cases, max_length):
    """Our ids (B, max_length) for `cases`, asserted equal to the transformers tokenizer `ref`'s, padded and cut alike."""
    expected = ref(cases, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    got = ours(cases)
    bad = [(c, got[i].tolist(), expected[i].tolist()) for i, c in enumerate(cases)
           if not torch.equal(got[i], expected[i])]
    assert not bad, f"{len(bad)}/{len(cases)} differ, first: {bad[0]}"
    return got


@pytest.mark.parametrize("pad,style", [("<|endoftext|>", "sd15"), ("!", "sd15"), ("!", "decoder")])
def test_tokenizer_matches_transformers(tmp_path, pad, style):
    folder = write_clip_tokenizer_folder(tmp_path / "tok", pad_token=pad, style=style)
    ours, ref = tokenizer.CLIPTokenizer.from_folder(folder), HFCLIPTokenizer.from_pretrained(folder)
    cases = tokenizer_cases()
    got = same_ids(ours, ref, cases, 77)
    assert got[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, ours.pad]
    assert ours.pad == (49407 if pad == "<|endoftext|>" else 0)


# ----------------------------------------------------------------------------------------------------------------
# The T5 tokenizer (tokenizer.py) against transformers' T5Tokenizer and SentencePiece's own


def docs_lines():
    """The lines of README.md and docs/*.md: English prose, markdown, tables, math symbols."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [line for p in docs for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def t5_model():
    """A SentencePiece Unigram model in T5's layout (<pad> 0, </s> 1, <unk> 2, no <s>) with the nmt_nfkc normalization
    T5 was trained with, trained here on the docs' lines and the hard prompts: its serialized ModelProto."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs_lines() + tokenizer_cases()), model_writer=buf,
                                   model_type="unigram", vocab_size=2000, normalization_rule_name="nmt_nfkc",
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=SUITE_THREADS, minloglevel=2)
    return buf.getvalue()


def test_t5_charsmap_matches_tokenizers(t5_model):
    """Our reading of the precompiled charsmap (its trie, applied per grapheme cluster) == the `tokenizers`
    Precompiled normalizer on every code point of the Basic Multilingual Plane and on random clusters: characters the
    table replaces or drops followed by combining marks, joiners, half-width voiced marks, Hangul jamo, emoji."""
    blob = sentencepiece_model_pb2.ModelProto.FromString(t5_model).normalizer_spec.precompiled_charsmap
    ours, ref = tokenizer.Charsmap(blob), tk.normalizers.Precompiled(blob)
    points = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    bad = [c for c in points if ours.normalize(c) != ref.normalize_str(c)]
    assert not bad, f"{len(bad)} code points differ, first {[hex(ord(c)) for c in bad[:5]]}"
    assert sum(ours.normalize(c) != c for c in points) > 2000    # the table does change thousands of them
    rng = random.Random(0)
    bases = list("aA1 \t\r\n\x01\xa0²¹ÅΩＡ１ｶﾞ①ﬁ™‼가ㄱ\u1100\u1161\u11a8😀👍🇯\u0600\u0d4e\u00ad\u200b")
    marks = list("\u0300\u0301\u0302\u0308\u0323\u0327\u200c\u200d\uff9e\uff9f\u0e33\u102b\u0903\ufe0f\u20e3")
    marks += ["\U0001f3fd", "\U000e0041"]
    texts = ["".join(rng.choice(bases + marks * 2) for _ in range(rng.randint(1, 6))) for _ in range(20000)]
    bad = [t for t in texts if ours.normalize(t) != ref.normalize_str(t)]
    assert not bad, f"{len(bad)}/{len(texts)} differ, first {ascii(bad[0])}"


def t5_cases(n_random=1500, seed=0):
    """CLIP's hard prompts and random strings (tokenizer_cases), the toy world's captions, and T5's own hard cases:
    its special tokens written in the text, white space around them, runs of spaces, combining marks after
    characters the charsmap replaces, half-width voiced marks, prompts past 256 tokens; then random strings over
    an alphabet of those."""
    fixed = [
        "</s>", "a</s>b", "a </s> b  ", "<extra_id_3> x<extra_id_99>y", "<pad><unk></s>", "<extra_id_3 >", "<extra_id_",
        "＜/s＞ ＜extra_id_0＞ full-width", "a  b   c\t\td\n\ne", "   leading", "trailing   ", "\r\n\r\n", "▁ ▁▁x",
        "Ａ\u0301 ²\u0301 e\u0301\u0302 \u0d4eＡ\u0301 \t\u0301", "ｶﾞｷﾞ ﾊﾟ ²ﾞ", "가\u0301 ᄀ\u1161\u11a8 ㄱㅏ",
        "①②③ ㈱ ㎏ ½ ™ ‼ ﬁ", "🐱‍👤 👍🏽 🇯🇵 ✋🏿 1\ufe0f\u20e3", "word " * 300, "x" * 3000, "supercalifragilistic" * 20,
    ]
    rng = random.Random(seed)
    alphabet = list("abcdeilnorstu ABC 0123 .,!?'\"-()<>/_ \t\n\r\u3000\xa0") + ["</s>", "<extra_id_7>", "<pad>", "▁"]
    alphabet += list("éñüßæ\u0301\u0308\u200dＡＢ１ｶﾞ①ﬁ²™中文日本語한국😀🏽")
    rand = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n_random)]
    return fixed + tokenizer_cases() + toy.shape_prompts("all") + rand


@pytest.mark.parametrize("layout", ["sd3", "strip", "transformers5"])
def test_t5_tokenizer_matches_transformers(tmp_path, t5_model, layout):
    """Our T5Tokenizer.from_folder == transformers' T5Tokenizer (the `tokenizers` library) on a few thousand hard
    prompts, padded and truncated to SD3's 256; transformers reads the folder it saved itself, and the other
    layouts' tokenizer.json as `tokenizers` reads it."""
    folder = write_t5_tokenizer_folder(tmp_path / "tokenizer_3", t5_model, layout)
    ours = tokenizer.T5Tokenizer.from_folder(folder)
    if layout == "transformers5":
        ref = HFT5Tokenizer.from_pretrained(folder)
    else:
        ref = HFT5Tokenizer(tokenizer_object=tk.Tokenizer.from_file(str(folder / "tokenizer.json")), extra_ids=100)
    cases = t5_cases()
    got = same_ids(ours, ref, cases, 256)
    assert got.shape == (len(cases), 256) and (ours.pad, ours.after) == (0, [1])
    steps = {"sd3": 2, "strip": 4, "transformers5": 1}   # charsmap, (strip left, strip right), runs of spaces
    assert ours.whitespace_split == (layout == "transformers5") and len(ours.normalizers) == steps[layout]
    assert got[0, :3].tolist() == [1, 1, 0] and got[cases.index(""), :2].tolist() == [1, 0]   # "</s>" and ""
    assert got[cases.index("word " * 300), -1] == 1   # truncated, </s> kept last
    assert torch.equal(ours(["x" * 5000]), ours(["x" * MAX_PROMPT_CHARS]))
    assert (got == ours.unk_id).any()   # characters no piece covers were in the cases


def test_t5_tokenizer_matches_sentencepiece(tmp_path, t5_model):
    """On ordinary prompts (the docs' lines, the toy world's captions; none with T5's special tokens, which
    SentencePiece does not cut out of the text) our ids are SentencePiece's own encoding of the model the folder was
    converted from, plus </s>, or where two splits of a word score the same (SentencePiece breaks Viterbi ties its
    own way), a split of the same score."""
    ours = tokenizer.T5Tokenizer.from_folder(write_t5_tokenizer_folder(tmp_path / "tok", t5_model))
    prompts = [p for p in docs_lines() + toy.shape_prompts("all") + PROMPTS if not ours.added_re.search(p)]
    sp = spm.SentencePieceProcessor(model_proto=t5_model)
    pairs = [(ours.encode(p), ids + [1]) for p, ids in zip(prompts, sp.encode(prompts))]
    ties = [(a, b) for a, b in pairs if a != b]
    score = lambda ids: sum(ours.scores[i] for i in ids)  # noqa: E731
    assert len(ties) < len(pairs) / 50 and all(math.isclose(score(a), score(b), rel_tol=1e-12) for a, b in ties)


def test_t5_tokenizer_load_errors(tmp_path, t5_model):
    """Another model's tokenizer.json, a normalizer we do not read, a broken charsmap, a missing entry, a missing
    folder: each a one-line LoadError naming the file and what was expected."""
    folder = write_t5_tokenizer_folder(tmp_path / "tok", t5_model)
    spec = json.loads((folder / "tokenizer.json").read_text())
    broken = {"bpe": {**spec, "model": {"type": "BPE", "vocab": {}, "merges": []}},
              "lowercase": {**spec, "normalizer": {"type": "Lowercase"}},
              "charsmap": {**spec, "normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA////"}},
              "no model": {k: v for k, v in spec.items() if k != "model"}}
    messages = {"bpe": "model 'BPE': expected a Unigram", "lowercase": "normalizer 'Lowercase': expected Precompiled",
                "charsmap": "trie does not fit", "no model": "no 'model' entry"}
    for name, bad in broken.items():
        (folder / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(files.LoadError, match=re.escape(messages[name])) as e:
            tokenizer.T5Tokenizer.from_folder(folder)
        assert str(folder / "tokenizer.json") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(files.LoadError, match="tokenizer.json: file not found"):
        tokenizer.T5Tokenizer.from_folder(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (convert.py): the original LDM / SGM key names


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_checkpoint(tmp_path, hub, kind):
    """Write the test model as one original-format .safetensors (our rules inverted), load it back through load_sd
    with the folder's configs: every tensor identical."""
    sd = unet.load_sd(str(hub[kind]))
    comps = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoders[0]}
    if kind == "sdxl":
        comps["text_encoder_2"] = sd.text_encoders[1]
    flat = convert.convert_to_ldm({n: m.state_dict() for n, m in comps.items()}, kind, sd.unet.cfg, sd.vae.cfg)
    flat["model_ema.decay"] = torch.tensor(0.9999)  # keys a single file carries that we do not use
    save_file(flat, tmp_path / "model.safetensors")
    assert convert.detect_family(flat) == kind
    loaded = unet.load_sd(str(tmp_path / "model.safetensors"), config=str(hub[kind]))
    assert loaded.kind == kind
    for a, b in zip([loaded.unet, loaded.vae, *loaded.text_encoders], comps.values()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    del flat["model.diffusion_model.out.2.bias"]
    save_file(flat, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="key model.diffusion_model.out.2.bias not found"):
        unet.load_sd(str(tmp_path / "broken.safetensors"), config=str(hub[kind]))


def test_single_file_names_are_the_real_ones():
    """At the real SD1.5 / SDXL configs, our rules produce the key names (and shapes) the released single files use."""
    with torch.device("meta"):
        models = {"sd15": {"unet": unet.UNet(unet.UNetConfig.sd15()), "vae": unet.VAE(unet.VAEConfig.sd15()),
                           "text_encoder": unet.CLIPText(unet.CLIPTextConfig.sd15())},
                  "sdxl": {"unet": unet.UNet(unet.UNetConfig.sdxl()), "vae": unet.VAE(unet.VAEConfig.sdxl()),
                           "text_encoder": unet.CLIPText(unet.CLIPTextConfig.sd15()),
                           "text_encoder_2": unet.CLIPText(unet.CLIPTextConfig.sdxl())}}
    real = {"sd15": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
                     "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
                     "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
                     "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                     "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                     "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
                     "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
                     "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
                     "model.diffusion_model.time_embed.2.weight": (1280, 1280),
                     "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
                     "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
                     "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                     "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
                     "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                     "first_stage_model.decoder.norm_out.weight": (128,),
                     "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)},
            "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                     "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                     "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
                     "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                     "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                     "model.diffusion_model.output_blocks.8.0.out_layers.3.weight": (320, 320, 3, 3),
                     "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                     "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
                     "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                     "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.bias": (5120,),
                     "conditioner.embedders.1.model.text_projection": (1280, 1280),
                     "conditioner.embedders.1.model.positional_embedding": (77, 1280),
                     "conditioner.embedders.1.model.ln_final.weight": (1280,)}}
    for family in ("sd15", "sdxl"):
        m = models[family]
        weights = {n: mod.state_dict() for n, mod in m.items()}
        flat = convert.convert_to_ldm(weights, family, m["unet"].cfg, m["vae"].cfg)
        for k, shape in real[family].items():
            assert k in flat and tuple(flat[k].shape) == shape, (k, tuple(flat[k].shape) if k in flat else None)
        n_unet = sum(k.startswith("model.diffusion_model.") for k in flat)
        assert n_unet == (686 if family == "sd15" else 1680)


# ----------------------------------------------------------------------------------------------------------------
# Sampling (sample.py): the noise schedule, the samplers and generation against the diffusers pipelines; the sample
# CLI


def test_noise_schedule_matches_diffusers():
    """alphas_cumprod of the scaled-linear and linear schedules, and the forward process q(x_t | x_0)."""
    for cfg in [SCHEDULER, dict(SCHEDULER, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)]:
        ref = DDPMScheduler(**{k: v for k, v in cfg.items() if k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                     "beta_schedule")})
        abar = sample.alphas_cumprod(cfg)
        assert torch.equal(abar, ref.alphas_cumprod)
        x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
        t = torch.tensor([0, 1, 500, 999])
        assert rel_err(sample.add_noise(x0, eps, t, abar), ref.add_noise(x0, eps, t)) < 1e-6


def test_inference_timesteps_match_diffusers():
    for spacing in ("leading", "trailing", "linspace"):
        cfg = dict(SCHEDULER, timestep_spacing=spacing)
        for n in (1, 7, 20, 50):
            for cls in (DDIMScheduler, EulerDiscreteScheduler):
                ref = cls.from_config(cfg)
                ref.set_timesteps(n)
                ours = sample.inference_timesteps(cfg, n, fractional=cls is EulerDiscreteScheduler)
                assert torch.equal(ours.to(ref.timesteps.dtype), ref.timesteps), (spacing, n, cls)


@pytest.mark.parametrize("kind,sampler", [("sd15", "ddim"), ("sd15", "euler"), ("sd15", "dpm"), ("sdxl", "ddim"),
                                         ("sdxl", "euler"), ("sdxl", "dpm")])
def test_generate_matches_pipelines(hub, kind, sampler):
    """Same initial latents, same images as the diffusers pipeline with the matching scheduler (within 2/255)."""
    sd = unet.load_sd(str(hub[kind]))
    pipe = reference_pipe(hub[kind], kind)
    pipe.scheduler = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
                      "dpm": DPMSolverMultistepScheduler}[sampler].from_config(pipe.scheduler.config)
    prompts = ["a red cube", "two blue spheres on grass"]
    latents = sample.initial_latents(sd, 2, 32, 32, seed=5)
    worst = 0
    if sampler == "ddim":  # diffusers' DDIM default clip_sample=True (SD's configs turn it off)
        sd.scheduler_config = dict(sd.scheduler_config, clip_sample=True)
        pipe.scheduler = DDIMScheduler.from_config(sd.scheduler_config)
    for neg in (None, "blurry"):
        ours = sample.generate(sd, prompts, steps=12, guidance=7.5, latents=latents, height=32, width=32,
                               sampler=sampler, negative_prompt=neg)
        theirs = pipe(prompts, num_inference_steps=12, guidance_scale=7.5, latents=latents.clone(), height=32,
                      width=32, negative_prompt=[neg] * 2 if neg else None, output_type="pil").images
        diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() for a, b in zip(ours, theirs))
        worst = max(worst, diff)
    print(f"{kind} {sampler}: max pixel difference {worst}/255")
    assert worst <= 2 and ours[0].size == (32, 32)


def test_sample_cli_compare_grid(tmp_path, hub, tuned_unet, capsys):
    """`python sample.py --compare` renders base and tuned rows from the same seeds; the tuned row differs. A missing
    prompt file is a one-line error, exit status 2."""
    (tmp_path / "prompts.txt").write_text("a red cube\n\na blue ball\n")
    r = run_cli(["sample.py", "--model", str(hub["sd15"]), "--unet", str(tuned_unet), "--prompts",
                 str(tmp_path / "prompts.txt"), "--compare", "--out", str(tmp_path / "grid.png"), "--steps", "4",
                 "--height", "32", "--width", "32", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-2000:]
    base, tuned = grid_rows(tmp_path / "grid.png", ["base", "tuned"], ["a red cube", "a blue ball"])
    assert base.shape == tuned.shape == (128, 2 * 128, 3) and np.abs(base - tuned).max() > 10
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                          # one line on stderr, no traceback
        sample.main(["--model", str(hub["sd15"]), "--prompts", str(tmp_path / "nope.txt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --prompts ") and "nope.txt" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# The method (diffdpo.py): the prediction target, the DPO loss, the UNet's inputs, and our DPO step against the
# official train.py's step (the two steps bench.py times)


def test_prediction_target_matches_diffusers():
    """The target the UNet is trained to output: eps, or diffusers' get_velocity for v-prediction."""
    for cfg in [SCHEDULER, dict(SCHEDULER, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)]:
        ref = DDPMScheduler(**{k: v for k, v in cfg.items() if k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                     "beta_schedule")})
        abar = sample.alphas_cumprod(cfg)
        x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
        t = torch.tensor([0, 1, 500, 999])
        v = diffdpo.prediction_target(x0, eps, t, abar, "v_prediction")
        assert rel_err(v, ref.get_velocity(x0, eps, t)) < 1e-6
        assert torch.equal(diffdpo.prediction_target(x0, eps, t, abar), eps)


def test_dpo_loss_formula():
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4))
    beta = 5000.0
    loss, acc = diffdpo.dpo_loss(mw, ml, rw, rl, beta)
    # the official code, written out by hand: inside = -0.5 beta ((mw - ml) - (rw - rl)), loss = mean softplus(-inside)
    inside = [-0.5 * beta * ((mw[i] - ml[i]) - (rw[i] - rl[i])).item() for i in range(16)]
    expected = sum(math.log1p(math.exp(-x)) if x > -30 else -x for x in inside) / 16
    assert abs(loss.item() - expected) < 1e-9
    assert acc.item() == sum(x > 0 for x in inside) / 16
    # gradient: d loss / d mw_i = 0.5 beta sigmoid(-inside_i) / B
    loss.backward()
    sig = torch.sigmoid(-torch.tensor(inside, dtype=torch.float64))
    assert torch.allclose(mw.grad, 0.5 * beta * sig / 16) and torch.allclose(ml.grad, -0.5 * beta * sig / 16)
    # policy == reference: exactly ln 2, implicit accuracy 0
    loss, acc = diffdpo.dpo_loss(mw, ml, mw, ml, beta)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12) and acc.item() == 0.0
    # per-image denoising error averages over C, H, W only
    pred, target = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    assert torch.allclose(diffdpo.denoising_error(pred, target), ((pred - target) ** 2).flatten(1).mean(1))


def test_vae_posterior_and_sampled_latents(hub):
    """The trainer's latents are a draw from the VAE posterior, mean + std * z, as the official code's
    latent_dist.sample(): mean and std equal diffusers', z is the pair's own (the same on any rank and resume),
    and --vae-latents mean gives the mean."""
    sd = unet.load_sd(str(hub["sd15"]))
    ref = reference_pipe(hub["sd15"], "sd15").vae
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, std = sd.vae.posterior(x)
        dist = ref.encode(x).latent_dist
    assert rel_err(mean, dist.mean) < 1e-5 and rel_err(std, dist.std) < 1e-5
    batch = dict(chosen=x[:1], rejected=x[1:], prompts=["a red cube"], index=torch.tensor([7]))
    z = diffdpo.posterior_noise([7], (4, 8, 8), seed=3)
    assert torch.equal(z, diffdpo.posterior_noise([7], (4, 8, 8), seed=3)) and z.shape == (2, 4, 8, 8)
    sampled, _ = diffdpo.unet_inputs(sd, batch, 32, z)
    at_mean, _ = diffdpo.unet_inputs(sd, batch, 32)
    f = sd.vae.scaling_factor
    assert rel_err(sampled, (mean + std * z) * f) < 1e-6 and rel_err(at_mean, mean * f) < 1e-6


def three_dpo_steps(sd, ref, optimizer, checkpointing, pairs=3):
    """Three DPO steps of ours and of the diffusers-written official step on the same batch, noise and timesteps (fp32,
    the VAE posterior mean on both sides): their losses and the total weight change."""
    batch = parity.make_batch(pairs, sample.default_size(sd))
    ids, noise, t = parity.reference_inputs(ref, batch, torch.device("cpu"))
    ours = bench.our_dpo_step(sd, torch.float32, optimizer=optimizer, checkpointing=checkpointing, lr=1e-4)
    theirs = parity.reference_dpo_step(ref, torch.float32, optimizer=optimizer, checkpointing=checkpointing, lr=1e-4,
                                      posterior="mean")
    before = {k: v.clone() for k, v in theirs.policy.state_dict().items()}
    losses = [(ours(batch).item(), theirs(batch, ids, noise, t).item()) for _ in range(3)]
    a, b = ours.policy.state_dict(), theirs.policy.state_dict()
    change = lambda s: torch.cat([(s[k] - before[k]).flatten() for k in sorted(before)])  # noqa: E731
    return losses, change(a), change(b), batch


@pytest.mark.parametrize("kind", ["tiny", "sdxl"])
def test_our_dpo_step_equals_the_official_step(hub, kind):
    """diffdpo.py's DPO step (bench.our_dpo_step, which bench.py times) and a step written with diffusers as the
    official train.py writes it: on the toy model (AdamW) and an SDXL-like hub (Adafactor, gradient checkpointing on
    both sides) they give the same losses over three steps (the first is ln 2 up to float32 rounding x beta 5000)
    and the same weight change."""
    sd, ref = parity.folder_models("tiny" if kind == "tiny" else hub["sdxl"], torch.device("cpu"))
    losses, ours, theirs, _ = three_dpo_steps(sd, ref, "adamw" if kind == "tiny" else "adafactor", kind == "sdxl")
    assert abs(losses[0][0] - math.log(2)) < 1e-3 and abs(losses[0][1] - math.log(2)) < 1e-3
    assert losses[1][0] < 0.6 and losses[2][0] < losses[1][0]  # the steps do train
    for a, b in losses:
        assert abs(a - b) <= 1e-3 * abs(b) + 1e-6, losses
    assert (ours - theirs).norm() <= 1e-2 * theirs.norm() and theirs.norm() > 0


def test_flow_matching_forward_process_timesteps_and_dpo_loss():
    """flow_noise is FlowMatchEulerDiscreteScheduler.scale_noise; SD3's training timesteps (logit-normal and mode
    densities) are diffusers' compute_density_for_timestep_sampling on the same draws, indexed into the shifted
    schedule as train_dreambooth_sd3.py indexes it; the DPO step of a tiny MMDiT policy against its reference
    (prediction_type "flow") is flow_grpo's flow-DPO loss written out: -log sigmoid(-beta/2 ((|v - v_theta(x^w)|^2 -
    |v - v_ref(x^w)|^2) - (|v - v_theta(x^l)|^2 - |v - v_ref(x^l)|^2))), v = eps - x_0, means over elements, one
    (sigma, eps) per pair."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas, T = sched.sigmas.float(), sched.config.num_train_timesteps
    torch.manual_seed(0)
    x0, eps, idx = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8), torch.tensor([0, 500, 999])
    assert torch.allclose(diffdpo.flow_noise(x0, eps, sigmas[idx]), sched.scale_noise(x0, sched.timesteps[idx], eps),
                          atol=1e-6)
    assert torch.equal(diffdpo.flow_target(x0, eps), eps - x0) and torch.allclose(sigmas * T, sched.timesteps)
    for density in ("logit_normal", "mode"):
        g, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        ours = torch.cat([diffdpo.draw_timestep(g, T, density) for _ in range(200)])
        u = torch.cat([compute_density_for_timestep_sampling(density, 1, 0.0, 1.0, 1.29, generator=theirs)
                       for _ in range(200)])
        assert torch.equal(ours, (u * T).long()) and ours.float().std() > 100      # spread over the schedule

    cfg = mmdit.MMDiTConfig.tiny()
    policy, reference = mmdit.MMDiT(cfg), mmdit.MMDiT(cfg)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.3)
        for p, q in zip(reference.parameters(), policy.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
    B, beta = 2, 500.0
    latents = torch.randn(2 * B, 4, 8, 8)                                       # [winners; losers]
    cond = dict(context=torch.randn(B, 6, 64).repeat(2, 1, 1), pooled=torch.randn(B, 64).repeat(2, 1))
    eps, t = diffdpo.pair_noise(range(B), (4, 8, 8), 0, T, density="logit_normal")
    with torch.no_grad():
        loss, acc = diffdpo.dpo_loss(*diffdpo.dpo_errors(policy, reference, latents, cond, eps, t, sigmas, "flow"), beta)
        s = sigmas[t].view(B, 1, 1, 1)

        def err(net, x0, c, p):                                                 # |v - v_net(x_sigma)|^2, mean
            return ((eps - x0) - net((1 - s) * x0 + s * eps, sigmas[t] * T, c, p)).pow(2).mean((1, 2, 3))
        w, l_, cw, pw = latents[:B], latents[B:], cond["context"][:B], cond["pooled"][:B]
        inside = -beta / 2 * ((err(policy, w, cw, pw) - err(reference, w, cw, pw))
                              - (err(policy, l_, cw, pw) - err(reference, l_, cw, pw)))
    assert abs(loss.item() - (-F.logsigmoid(inside)).mean().item()) < 1e-6 and abs(loss.item() - math.log(2)) > 1e-3
    assert acc.item() == (inside > 0).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# The trainer (diffdpo.py): end to end on the small hub and the Pick-a-Pic shard; resume, DDP, channels-last, the
# latent cache, validation, the optimizers


@pytest.fixture(scope="session")
def dpo_run(tmp_path_factory, hub, shard):
    """`diffdpo.py` (in this process) on the sd15 hub and the shard: 4 steps of 2 x 2 pairs, checkpoints and sample
    grids (2 DDIM steps each) at steps 2 and 4. Tests read it, never write to it."""
    out = tmp_path_factory.mktemp("dpo") / "straight"
    r = run_here(train_args(hub, shard, out, "--max-steps", "4", "--sample-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def dpo_two_steps(tmp_path_factory, hub, shard):
    """The same run stopped at step 2, without sample grids: where the resume, lock and checkpoint tests start (each
    on its own copy, see copy_run)."""
    out = tmp_path_factory.mktemp("dpo") / "two-steps"
    r = run_here(train_args(hub, shard, out, "--max-steps", "2", "--no-samples"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_run(run, out):
    """A copy of a session run's folder to continue or damage (its lock file left behind)."""
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def test_train_end_to_end_resume_and_ddp(tmp_path, hub, shard, dpo_run, dpo_two_steps):
    """diffdpo.py on a Hub-layout model and a Pick-a-Pic shard (ties, a corrupt JPEG): ln 2 at the start, sample
    grids, output that diffusers loads and that differs from the base; 2 steps + resume to 4 == 4 straight steps;
    `torchrun --nproc_per_node 2 diffdpo.py` (gloo) with batch 1 == 1 process with batch 2; a changed setting is
    refused on resuming."""
    straight = dpo_run
    rows = read_metrics(straight)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[0]["implicit_acc"] == 0.0
    assert rows[-1]["corrupt"] >= 1 and "pairs_per_s" in rows[0] and rows[0]["lr"] > 0
    assert sorted(p.name for p in (straight / "samples").glob("step*.png")) == ["step000002.png", "step000004.png"]
    assert len(list((straight / "samples" / "base").glob("*.png"))) == len(runs.SAMPLE_PROMPTS)
    assert json.loads((straight / "config.json").read_text())["pairs_per_step"] == 4
    tuned = UNet2DConditionModel.from_pretrained(straight, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(hub["sd15"], subfolder="unet")
    base_sd = base.state_dict()
    assert max((p - base_sd[k]).abs().max().item() for k, p in tuned.state_dict().items()) > 1e-6

    resumed = copy_run(dpo_two_steps, tmp_path / "resumed")
    r = run_here(train_args(hub, shard, resumed, "--max-steps", "4", "--no-samples"))
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    assert [row["step"] for row in read_metrics(resumed)] == [1, 2, 3, 4]
    assert max_diff(unet_weights(resumed), unet_weights(straight)) <= 1e-6

    ddp = tmp_path / "ddp"
    args = train_args(hub, shard, ddp, "--max-steps", "4", "--no-samples")
    args[args.index("--batch-size") + 1] = "1"
    r = run_cli(args, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((ddp / "config.json").read_text())
    assert cfg["command"].startswith("diffdpo.py") and cfg["pairs_per_step"] == 4 and cfg["world_size"] == 2
    # Same data, noise and timesteps on 2 ranks as on 1: the gradients agree to fp32 summation order. Adam's first
    # step is lr * sign(g), so parameters whose gradient is below that rounding noise may step +-lr apart: compare
    # the whole update, and the per-step gradient norms (a wrong split of the batch would differ by O(1)).
    for a, b in zip(read_metrics(ddp), read_metrics(straight)):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-3
    w0, w1, w2 = load_file(hub["sd15"] / "unet" / "diffusion_pytorch_model.safetensors"), unet_weights(ddp), \
        unet_weights(straight)
    rel = (sum(((w1[k] - w2[k]) ** 2).sum() for k in w0) / sum(((w2[k] - w0[k]) ** 2).sum() for k in w0)).sqrt()
    print(f"resume max |dw| = {max_diff(unet_weights(resumed), w2):.2e}; 2 processes vs 1: max |dw| = "
          f"{max_diff(w1, w2):.2e} (lr 1e-4), |update difference| / |update| = {rel:.2e}")
    assert rel < 1e-2

    # a changed setting is refused instead of silently mixing two runs
    r = run_here(train_args(hub, shard, resumed, "--max-steps", "6", "--beta", "100"))
    assert r.returncode != 0 and "beta" in r.stderr and "Traceback" not in r.stderr


def test_channels_last_trains_the_same(tmp_path, hub, shard, dpo_two_steps):
    """--channels-last (NHWC UNets) changes the memory layout, not the math: the same losses and gradient norms as
    the default layout (the session's 2-step run), the same update up to float rounding, and a plain diffusers file
    at the end."""
    nchw, nhwc = dpo_two_steps, tmp_path / "nhwc"
    r = run_here(train_args(hub, shard, nhwc, "--max-steps", "2", "--channels-last", "--no-samples"))
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(read_metrics(nchw), read_metrics(nhwc), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-3 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]

    def layout(run):  # of the trained weights, as the checkpoint keeps them
        w = torch.load(run / "checkpoint.pt", weights_only=False)["unet"]["conv_in.weight"]
        return "nhwc" if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() else "nchw"
    assert layout(nhwc) == "nhwc" and layout(nchw) == "nchw"  # the flag did change the layout
    w0 = load_file(hub["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")
    w1, w2 = unet_weights(nhwc), unet_weights(nchw)
    rel = (sum(((w1[k] - w2[k]) ** 2).sum() for k in w0) / sum(((w2[k] - w0[k]) ** 2).sum() for k in w0)).sqrt()
    assert rel < 1e-2


def test_dpo_learns_the_preference(tmp_path, hub, shard):
    """A real signal: on the small model, 40 DPO steps on the red-preferred pairs drive the implicit accuracy on
    the training pairs from 0 (policy == reference) to well above 0.5 over the last 20 steps (about 1 from step 25
    on), and the loss below ln 2."""
    out = tmp_path / "learn"
    diffdpo.train(diffdpo.TrainConfig(model=str(hub["sd15"]), data=str(shard), out=str(out), resolution=32,
                                      batch_size=4, max_steps=40, lr=1e-3, warmup_steps=10, checkpoint_every=0,
                                      device="cpu", beta=500.0, samples=False))
    rows = read_metrics(out)
    assert rows[0]["implicit_acc"] == 0.0
    late = rows[-20:]
    acc = sum(r["implicit_acc"] for r in late) / len(late)
    loss = sum(r["loss"] for r in late) / len(late)
    print(f"implicit accuracy over the last 20 steps: {acc:.3f}, loss {loss:.4f}")
    assert acc > 0.8 and loss < math.log(2) - 0.05


def test_train_bad_data_is_one_line(tmp_path, hub):
    """Bad --data and --model end in one line, exit 2: `python diffdpo.py --data pickapic` offline as a user runs
    it, the others in this process."""
    r = run_here(train_args(hub, tmp_path / "nope.parquet", tmp_path / "o", "--max-steps", "1"))
    assert r.returncode != 0 and "nope.parquet" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(train_args(hub, "pickapic", tmp_path / "o", "--max-steps", "1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "2025" in r.stderr
    # errors found only when the data is first read (a missing column) and a bad --model: one line too
    pq.write_table(pq.read_table(make_pickapic_shard(tmp_path / "s.parquet", n=4)).drop_columns(["caption"]),
                   tmp_path / "nocaption.parquet")
    r = run_here(train_args(hub, tmp_path / "nocaption.parquet", tmp_path / "o2", "--max-steps", "1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing column(s) caption" in r.stderr
    r = run_here(["diffdpo.py", "--model", str(tmp_path), "--data", str(tmp_path / "s.parquet"), "--device", "cpu"])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model_index.json" in r.stderr


def test_cache_is_exact_and_reused(tmp_path, hub, shard, dpo_run):
    """--cache: the same weights as without it (the session's 4-step run; both flips are stored, the posterior is
    sampled as the sd15 preset does), and a second run reads the cache."""
    for run in ("c1", "c2"):
        r = run_here(train_args(hub, shard, tmp_path / run, "--max-steps", "4", "--no-samples", "--cache",
                                "--cache-dir", str(tmp_path / "cache")))
        assert r.returncode == 0, r.stderr[-3000:]
        if run == "c1":
            files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
            assert any(f.endswith(".skipped") for f in files) and len(files) > 12
            stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert json.loads((dpo_run / "config.json").read_text())["vae_latents"] == "sample"
    assert max_diff(unet_weights(dpo_run), unet_weights(tmp_path / "c1")) == 0.0
    assert max_diff(unet_weights(tmp_path / "c2"), unet_weights(tmp_path / "c1")) == 0.0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")} == stamp  # only read


def test_cache_keys_follow_the_file(tmp_path, hub, shard):
    """--cache keys name the shard's size and modification time: rewriting the parquet at the same path (here with
    the labels swapped) trains on the new pairs, exactly as an uncached run on them does."""
    path = tmp_path / "pairs.parquet"
    shutil.copy(shard, path)
    common = dict(model=str(hub["sd15"]), data=str(path), resolution=32, batch_size=2, lr=1e-4, warmup_steps=1,
                  max_steps=2, device="cpu", samples=False, cache_dir=str(tmp_path / "cache"))
    diffdpo.train(diffdpo.TrainConfig(out=str(tmp_path / "before"), cache=True, **common))
    table = pq.read_table(shard)
    swapped = table.set_column(table.column_names.index("label_0"), "label_0", table.column("label_1"))
    swapped = swapped.set_column(swapped.column_names.index("label_1"), "label_1", table.column("label_0"))
    time.sleep(0.01)
    pq.write_table(swapped, path)
    diffdpo.train(diffdpo.TrainConfig(out=str(tmp_path / "cached"), cache=True, **common))
    diffdpo.train(diffdpo.TrainConfig(out=str(tmp_path / "plain"), **common))
    assert max_diff(unet_weights(tmp_path / "cached"), unet_weights(tmp_path / "plain")) == 0.0
    assert max_diff(unet_weights(tmp_path / "cached"), unet_weights(tmp_path / "before")) > 0
    assert read_metrics(tmp_path / "cached")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_validation_logging_model_card_and_help(tmp_path, hub, shard, monkeypatch, capsys):
    """--val-pairs N: N pairs held out of training, their loss and implicit accuracy logged as val_* rows at each
    checkpoint (ln 2 and 0 at a step that has not moved yet); --report-to tensorboard writes event files; the model
    card --push-to-hub uploads (the Hub mocked); --help shows the presets and the resume policy of every flag."""
    src = data.open_pairs(str(shard), resolution=16)
    train, val = src.holdout(4)
    held = {val.item(i)["key"] for i in range(4)}        # the first usable pair is the corrupt JPEG: a neighbour's
    seen = {train.item(s)["key"] for s in range(len(train))}
    assert len(held) == 3 and not held & seen and len(seen) == len(src) - 4
    out = tmp_path / "val"
    diffdpo.train(diffdpo.TrainConfig(model=str(hub["sd15"]), data=str(shard), out=str(out), resolution=32,
                                      batch_size=2, max_steps=2, checkpoint_every=1, lr=1e-4, device="cpu",
                                      val_pairs=4, report_to="tensorboard", samples=False))
    val_rows = [r for r in read_metrics(out) if "val_loss" in r]
    assert [r["step"] for r in val_rows] == [1, 2] and all(r["val_pairs"] == 4 for r in val_rows)
    assert 0 < val_rows[-1]["val_loss"] < 5 and 0 <= val_rows[-1]["val_implicit_acc"] <= 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    calls = []
    monkeypatch.setattr(hh.HfApi, "create_repo", lambda self, repo, **kw: calls.append(("create", repo)))
    monkeypatch.setattr(hh.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "commit")
    config = dict(json.loads((out / "config.json").read_text()), method="dpo")
    card = runs.model_card(config, str(hub["sd15"]), "me/dpo-test", out, "unet")
    runs.push_to_hub("me/dpo-test", out, card)
    text = (out / "README.md").read_text()
    assert text.startswith("---\nbase_model: ") and "- diffusion-dpo" in text and "| beta | 2000.0 |" in text
    assert 'UNet2DConditionModel.from_pretrained("me/dpo-test", subfolder="unet")' in text
    assert calls[0] == ("create", "me/dpo-test") and "unet/*" in calls[1][1]["allow_patterns"]

    monkeypatch.setenv("COLUMNS", "80")                      # argparse's width in a fresh process with a pipe
    r = run_here(["diffdpo.py", "--help"])
    assert r.returncode == 0
    assert "toy      --beta 2000.0, --max-steps 200, --batch-size 16" in r.stdout and "resuming" in r.stdout
    assert all(f.metadata["help"].strip() for f in dataclasses.fields(rpo.RPOConfig))
    for main in (sample.main, eval.main):                    # every option has help text, the toy model by default
        with pytest.raises(SystemExit):
            main(["--help"])
        lines = capsys.readouterr().out.split("\n")
        bare = [line for line, after in zip(lines, lines[1:] + [""]) if re.fullmatch(r"  -[-\w]+( \S+)?", line)
                and not after.startswith(" " * 20)]
        assert not bare and "tiny" in "\n".join(lines), (main.__module__, bare)


def test_adafactor_matches_transformers():
    """Our few-line Adafactor against transformers' with the official SDXL settings, on matrices, convs and vectors."""
    torch.manual_seed(0)
    shapes = [(8, 6), (4, 3, 3, 3), (5,)]
    ours, theirs = [torch.randn(s).requires_grad_() for s in shapes], []
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    o1 = runs.Adafactor(ours, lr=1e-2, weight_decay=1e-2)
    o2 = HFAdafactor(theirs, lr=1e-2, weight_decay=1e-2, scale_parameter=False, relative_step=False, clip_threshold=1.0,
                   warmup_init=False)
    for step in range(5):
        grads = [torch.randn(s) for s in shapes]
        for ps, opt in ((ours, o1), (theirs, o2)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert max(rel_err(a, b) for a, b in zip(ours, theirs)) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Sharded training (fsdp.py): 2 gloo processes with --fsdp equal 1 process; sharded checkpoints resume on any number
# of processes, and a write killed half-way leaves the previous checkpoint


def fsdp_args(hub, shard, out, steps, processes):
    """train_args at lr 3e-5 (Adam's sign-sized steps on near-zero gradients then stay under the 1e-5 the weights are
    compared to, while every weight moves by up to 1e-4), 4 pairs per step as 1 x 4 or 2 x 2 (batch 1 per rank would
    round differently from batch 4)."""
    args = train_args(hub, shard, out, "--max-steps", str(steps), "--lr", "3e-5", "--no-samples", "--grad-accum", "1")
    args[args.index("--batch-size") + 1] = str(4 // processes)
    return args + (["--fsdp"] if processes == 2 else [])


def test_fsdp_equals_one_process_and_resumes_on_any_number_of_processes(tmp_path, hub, shard):
    """4 steps of `torchrun --nproc_per_node 2 diffdpo.py --fsdp` == 4 steps of one process (weights <= 1e-5, the
    logged losses and gradient norms); its sharded checkpoint resumed on 1 process, and a 1-process checkpoint resumed
    sharded on 2, both to step 6 == 6 steps of one process. A half-written checkpoint folder (a kill during the
    write) and a complete one that checkpoint.pt does not name yet (a kill before checkpoint.pt moved on) change
    nothing, and go at the next checkpoint."""
    r = run_here(fsdp_args(hub, shard, tmp_path / "alone", 4, 2))                      # --fsdp without torchrun
    assert r.returncode == 2 and "torchrun --nproc-per-node" in r.stderr and "Traceback" not in r.stderr
    one = tmp_path / "one"
    assert run_here(fsdp_args(hub, shard, one, 4, 1)).returncode == 0
    w4, rows4 = unet_weights(one), read_metrics(one)
    at4 = copy_run(one, tmp_path / "one-at-4")
    assert run_here(fsdp_args(hub, shard, one, 6, 1)).returncode == 0
    w6, w0 = unet_weights(one), load_file(hub["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")

    sharded = tmp_path / "sharded"
    r = run_cli(fsdp_args(hub, shard, sharded, 4, 2), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in sharded.glob("checkpoint*")) == ["checkpoint-000004", "checkpoint.pt"]
    assert torch.load(sharded / "checkpoint.pt", weights_only=True)["unet"] is None      # the weights are in pieces
    for a, b in zip(read_metrics(sharded), rows4, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-3 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * b["grad_norm"]
    moved = max_diff(w4, w0)
    print(f"--fsdp on 2 vs 1 process, step 4: max |dw| {max_diff(unet_weights(sharded), w4):.1e} (moved {moved:.1e})")
    assert max_diff(unet_weights(sharded), w4) <= 1e-5 < moved / 5

    shutil.copytree(sharded / "checkpoint-000004", sharded / "checkpoint-000006")       # renamed, not yet named
    (sharded / "checkpoint-000008.tmp").mkdir()                                        # killed mid-write
    (sharded / "checkpoint-000008.tmp" / "__0_0.distcp").write_bytes(b"half")
    r = run_here(fsdp_args(hub, shard, sharded, 6, 1))                                 # 2 processes -> 1
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    assert not list(sharded.glob("checkpoint-0*"))     # a whole checkpoint.pt now: the folders are gone
    r = run_cli(fsdp_args(hub, shard, at4, 6, 2), torchrun=2)                          # 1 process -> 2
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    assert [row["step"] for row in read_metrics(at4)] == [1, 2, 3, 4, 5, 6]
    print(f"resumed at step 4 on another number of processes, step 6: 2 -> 1 max |dw| "
          f"{max_diff(unet_weights(sharded), w6):.1e}, 1 -> 2 {max_diff(unet_weights(at4), w6):.1e}")
    assert max_diff(unet_weights(sharded), w6) <= 1e-5 and max_diff(unet_weights(at4), w6) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The family of preference losses on one trainer (diffdpo.py): cDPO's label smoothing, MaPO, Diffusion-KTO and
# --label-noise; each loss against its paper's released code written out, KTO's labelled-image data, the steps
# they run, and exact resumes


def random_errors(n=16, seed=0):
    """Per-image denoising errors as a UNet gives them (positive, around 0.1-1), float64, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    return [(0.05 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


# ----------------------------------------------------------------------------------------------------------------
# The losses against the released code's formulas


def test_dpo_label_smoothing():
    """cDPO with eps = 0 is dpo_loss exactly (loss and gradient, bit for bit); with eps > 0 it is the mixture of DPO
    on the pairs as labelled and on the pairs flipped, (1 - eps) L(w, l) + eps L(l, w), and the formula."""
    mw, ml, rw, rl = random_errors()
    inside = -0.5 * 500.0 * ((mw - ml) - (rw - rl))
    plain = -F.logsigmoid(inside).mean()                         # Eq. 14, as dpo_loss had it before label smoothing
    loss, acc = diffdpo.dpo_loss(mw, ml, rw, rl, 500.0, label_smoothing=0.0)
    assert torch.equal(loss, plain) and acc == (inside > 0).double().mean()
    assert all(torch.equal(a, b) for a, b in zip(grads(loss, [mw, ml]), grads(plain, [mw, ml])))
    eps = 0.2
    loss, acc = diffdpo.dpo_loss(mw, ml, rw, rl, 500.0, label_smoothing=eps)
    flipped, _ = diffdpo.dpo_loss(ml, mw, rl, rw, 500.0)
    mixture = (1 - eps) * diffdpo.dpo_loss(mw, ml, rw, rl, 500.0)[0] + eps * flipped
    formula = (-(1 - eps) * F.logsigmoid(inside) - eps * F.logsigmoid(-inside)).mean()
    assert rel_err(loss, mixture) < 1e-12 and rel_err(loss, formula) < 1e-12
    for a, b in zip(grads(loss, [mw, ml]), grads(formula, [mw, ml])):
        assert rel_err(a, b) < 1e-12


def mapo_released(model_losses_w, model_losses_l, snr_value=0.5, beta_mapo=0.1, num_train_timesteps=1000):
    """mapo-t2i/mapo utils.compute_loss after its per-image MSE, written out."""
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    return model_losses_w.mean() - (beta_mapo * ratio).mean(), log_odds


@pytest.mark.parametrize("beta", [0.1, 0.05, 1.0])
def test_mapo_loss_matches_released_code(beta):
    """Loss, implicit accuracy (margin > 0) and gradient equal the released formula (relative 1e-6, float64 and
    float32); with beta 0 it is SFT's loss on the winners; no reference error enters."""
    for dtype in (torch.float64, torch.float32):
        mw, ml, _, _ = (e.detach().to(dtype).requires_grad_() for e in random_errors(seed=1))
        loss, acc = diffdpo.mapo_loss(mw, ml, beta)
        want, log_odds = mapo_released(mw, ml, beta_mapo=beta)
        assert rel_err(loss, want) < 1e-6 and acc == (log_odds > 0).to(acc.dtype).mean()
        for a, b in zip(grads(loss, [mw, ml]), grads(want, [mw, ml])):
            assert rel_err(a, b) < 1e-6
    mw, ml, _, _ = random_errors(seed=2)
    assert torch.equal(diffdpo.mapo_loss(mw, ml, 0.0)[0], diffdpo.sft_loss(mw)[0])


def kto_released(model_losses, ref_loss, labels, beta_dpo=1000.0, lambda_d=1.0, lambda_u=1.0, kl=None):
    """jacklishufan/diffusion-kto train_kto_sd_v1.5.py, --loss kto --halo sigmoid, written out; `kl` the value of
    accelerator.reduce(g.mean(), 'mean') (all ranks' mean) when given, else this batch's mean."""
    g_term = -model_losses - -ref_loss
    kl = (g_term.mean().detach() if kl is None else kl).clamp(min=0).detach()
    g_term = g_term - kl
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    label_scale_g = label_sgn * beta_dpo * g_term
    h = torch.sigmoid(label_scale_g)
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    acc = (label_scale_g > 0).sum().detach() / len(label_scale_g)
    return (w_y * (1 - h)).mean(), acc


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0)])
def test_kto_loss_matches_released_code(weights):
    """Loss, accuracy and gradient equal the released code (relative 1e-6), with a positive and a clamped (negative)
    baseline; at policy == reference the loss is mean(lambda_y) / 2."""
    err, ref_err, _, _ = random_errors(seed=3)
    labels = (torch.arange(16) % 3 == 0).double()
    for shift in (0.0, 0.3):      # ref_err + 0.3: the mean gain is positive, so z > 0 is subtracted
        ref = (ref_err + shift).detach()
        loss, acc = diffdpo.kto_loss(err, ref, labels, 1000.0, 1, *weights)
        want, want_acc = kto_released(err, ref, labels, 1000.0, *weights)
        assert rel_err(loss, want) < 1e-6 and acc == want_acc
        assert rel_err(grads(loss, [err])[0], grads(want, [err])[0]) < 1e-6
    loss, acc = diffdpo.kto_loss(err, err.detach(), labels, 1000.0, 1, *weights)
    lam = torch.where(labels == 1, *weights)
    assert loss.item() == pytest.approx(lam.mean().item() / 2, rel=1e-12) and acc == 0


def _kto_rank(rank, world, port, folder, err, ref_err, labels):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = len(err) // world
    mine = err[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss, acc = diffdpo.kto_loss(mine, ref_err[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n], 1000.0,
                                 world)
    loss.backward()
    torch.save(dict(loss=loss.detach(), acc=acc, grad=mine.grad), Path(folder) / f"{rank}.pt")
    dist.destroy_process_group()


def test_kto_baseline_over_two_gloo_ranks(tmp_path):
    """The baseline z is the mean over the GLOBAL batch: 2 gloo ranks with 8 images each give, per rank, the released
    code's terms with the all-ranks kl (its accelerator.reduce), and together one process's loss on all 16; each
    rank's half has a mean gain of the other sign, so a local baseline would differ."""
    err, noise, _, _ = (e.detach() for e in random_errors(seed=4))
    ref_err = err + 2e-3 * (noise - 0.55)   # gains of about 1 / beta, where the sigmoid is not saturated
    ref_err[:8] += 2e-3                     # rank 0's images gained, rank 1's lost: local means differ in sign
    labels = (torch.arange(16) % 2).double()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_kto_rank, args=(2, port, str(tmp_path), err, ref_err, labels), nprocs=2, join=True,
                       start_method="fork")
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    kl = (ref_err - err).mean()
    for r in range(2):
        part = slice(8 * r, 8 * r + 8)
        mine = err[part].clone().requires_grad_()
        want, want_acc = kto_released(mine, ref_err[part], labels[part], kl=kl)
        assert rel_err(got[r]["loss"], want) < 1e-6 and got[r]["acc"] == want_acc
        assert rel_err(got[r]["grad"], grads(want, [mine])[0]) < 1e-6
        local, _ = kto_released(mine, ref_err[part], labels[part])
        assert abs(local.item() - want.item()) > 1e-3        # the local baseline would give another loss
    one, _ = diffdpo.kto_loss(err, ref_err, labels, 1000.0)
    assert rel_err((got[0]["loss"] + got[1]["loss"]) / 2, one) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# --label-noise


def test_label_noise_deterministic_at_the_asked_rate(tmp_path, shard):
    """label_flipped is a pure function of (seed, the pair's place) at rate p; the stream serves flipped pairs with
    chosen and rejected swapped, the same in every epoch, and only the training stream is noisy."""
    places = [(0, g, r) for g in range(4) for r in range(5000)]
    for p in (0.2, 0.4):
        flips = np.array([data.label_flipped(7, p, *w) for w in places])
        assert abs(flips.mean() - p) < 0.01
        assert (flips == np.array([data.label_flipped(7, p, *w) for w in places])).all()
        assert (flips != np.array([data.label_flipped(8, p, *w) for w in places])).any()
    assert not any(data.label_flipped(7, 0.0, *w) for w in places[:1000])
    clean = data.open_pairs(shard, resolution=32, flip=False, seed=3)
    noisy = data.open_pairs(shard, resolution=32, flip=False, seed=3)
    noisy.label_noise = 0.5
    n_flipped = 0
    for s in range(40):                                    # two epochs of the 20 usable pairs
        a, b = clean.item(s), noisy.item(s)
        assert a["key"] == b["key"]
        k, g, row = 0, 0, int(a["key"].rsplit(":", 1)[1])
        swapped = data.label_flipped(3, 0.5, k, g, row)
        want = (a["rejected"], a["chosen"]) if swapped else (a["chosen"], a["rejected"])
        assert torch.equal(b["chosen"], want[0]) and torch.equal(b["rejected"], want[1])
        n_flipped += swapped
    assert 0 < n_flipped < 40


# ----------------------------------------------------------------------------------------------------------------
# KTO's data: labelled single images (JSONL, parquet) and pairs split into them


def png(rgb):
    img = Image.new("RGB", (40, 32), rgb)
    return shards.png_bytes(img)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """images.jsonl and a parquet file of labelled images: 10 usable (reddish desirable, bluish undesirable), plus
    rows with bad labels (0.5, "yes", null) that are counted, and one empty caption."""
    root = tmp_path_factory.mktemp("labelled")
    lines, rows = [], []
    for i in range(13):
        label = [1, 0, True, False, 1, 0, 1.0, 0.0, 1, 0, 0.5, "yes", None][i]
        rgb = (200, 40, 40) if label in (1, True) else (40, 40, 200)
        (root / f"{i}.png").write_bytes(png(rgb))
        prompt = "" if i == 4 else f"a picture number {i}"
        lines.append(json.dumps(dict(prompt=prompt, image=f"{i}.png", label=label)))
        rows.append(dict(image=png(rgb), caption=prompt, label=float(label) if isinstance(label, (int, float)) else
                         None))
    (root / "images.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), root / "images.parquet")
    return root


def test_labelled_images_formats(labelled):
    """Both formats give batch["images"] (B, 3, R, R) and batch["labels"] (B,), the labels as written (true = 1),
    bad labels skipped and counted, empty captions counted; the same images from either file."""
    got = {}
    for spec, bad in ((labelled / "images.jsonl", 3), (labelled / "images.parquet", 3)):
        src = data.open_pairs(spec, resolution=32, flip=False)
        assert [s.unpaired for s in src.shards] == [True] and len(src) == 13 - bad
        batch = next(src.batches(10))
        assert batch["images"].shape == (10, 3, 32, 32) and "chosen" not in batch
        red = batch["images"][:, 0].mean((1, 2)) > 0                  # reddish images are the desirable ones
        assert torch.equal(batch["labels"], red.float()) and batch["labels"].sum() == 5
        counts = src.counts()
        assert counts["bad_labels"] == bad and counts["empty_captions"] == 1
        got[spec.suffix] = {k: (p, x) for k, p, x in zip(batch["keys"], batch["prompts"], batch["images"])}
    assert sorted(p for p, _ in got[".jsonl"].values()) == sorted(p for p, _ in got[".parquet"].values())
    folder = data.open_pairs(labelled, resolution=32)                   # a folder holding images.jsonl
    assert isinstance(folder.shards[0], shards.ImageJsonlShard)


def test_labelled_images_errors(tmp_path, labelled, shard):
    """One-line errors naming the file and line / column; labelled images refused for a pair loss, --cache or
    --choice-model; a corrupt image is skipped and counted."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "image": "0.png", "label": 1}\n{"prompt": "b", "image": "1.png"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with keys prompt, image, label"):
        data.open_pairs(bad, resolution=32)
    bad.write_text('{"prompt": "a", "image": "0.png", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*JSONDecodeError"):
        data.open_pairs(bad, resolution=32)
    table = pq.read_table(labelled / "images.parquet")
    pq.write_table(table.drop(["label"]), tmp_path / "nolabel.parquet")
    pq.write_table(table.set_column(2, "label", pa.array(["1"] * len(table))), tmp_path / "textlabel.parquet")
    for name, match in (("nolabel", r"nolabel.parquet: missing column\(s\) label; expected labelled images"),
                        ("textlabel", r"textlabel.parquet: column label holds string; expected numbers")):
        with pytest.raises(DataError, match=match):
            len(data.open_pairs(tmp_path / f"{name}.parquet", resolution=32))
    corrupt = tmp_path / "corrupt" / "images.jsonl"
    corrupt.parent.mkdir()
    (corrupt.parent / "x.png").write_bytes(b"not a png")
    (corrupt.parent / "y.png").write_bytes(png((200, 40, 40)))
    corrupt.write_text('{"prompt": "a", "image": "x.png", "label": 1}\n{"prompt": "b", "image": "y.png", "label": 0}\n')
    src = data.open_pairs(corrupt, resolution=32)
    assert torch.equal(next(src.batches(2))["labels"], torch.tensor([0.0, 0.0])) and src.counts()["corrupt"] == 1
    for kw, match in ((dict(loss="dpo"), "they train with --loss kto"), (dict(loss="kto", cache=True), "--cache")):
        cfg = diffdpo.TrainConfig(data=str(labelled / "images.jsonl"), out=str(tmp_path / "o"), **kw)
        with pytest.raises(UserError, match=match):
            diffdpo.runs.validate(cfg, torch.device("cpu"), built=False)
    for kw, match in ((dict(label_smoothing=0.5), "--label-smoothing 0.5: must be a probability in \\[0, 0.5\\)"),
                      (dict(label_noise=1.0), "--label-noise 1.0"), (dict(undesirable_weight=0.0), "must be positive")):
        with pytest.raises(UserError, match=match):
            diffdpo.runs.validate(diffdpo.TrainConfig(data=str(shard), **kw), torch.device("cpu"), built=False)


def test_pairs_split_into_labelled_images(shard):
    """shards.labelled_images: B pairs -> 2B images, preferred desirable, rejected undesirable, prompts repeated,
    image indices 2i and 2i + 1 (each its own noise); image_step's noise is per image, unlike DPO's per pair."""
    batch = next(data.open_pairs(shard, resolution=32).batches(3, start=5))
    imgs = shards.labelled_images(batch)
    assert torch.equal(imgs["images"], torch.cat([batch["chosen"], batch["rejected"]]))
    assert imgs["labels"].tolist() == [1, 1, 1, 0, 0, 0] and imgs["prompts"] == batch["prompts"] * 2
    assert imgs["index"].tolist() == [10, 12, 14, 11, 13, 15] and imgs["position"] == batch["position"]
    eps, t = diffdpo.pair_noise(imgs["index"], (4, 4, 4), 0, 1000, stream=2)
    assert len({tuple(e.flatten()[:4].tolist()) for e in eps}) == 6
    assert not torch.equal(eps[:1], diffdpo.pair_noise(batch["index"][:1], (4, 4, 4), 0, 1000)[0])


# ----------------------------------------------------------------------------------------------------------------
# The steps: MaPO runs the policy alone and holds one UNet; every loss trains and resumes exactly


def config(hub, data_spec, out, **kw):
    kw = {**dict(resolution=32, batch_size=2, lr=1e-4, warmup_steps=2, device="cpu", checkpoint_every=2,
                 samples=False), **kw}
    return diffdpo.TrainConfig(model=str(hub["sd15"]), data=str(data_spec), out=str(out), **kw)


def live_unets():
    gc.collect()
    return sum(isinstance(o, unet.UNet) for o in gc.get_objects())


def test_mapo_step_runs_the_policy_alone(tmp_path, hub, shard):
    """Full fine-tuning: MaPO's Setup holds one UNet (no reference in memory) and its step runs one UNet forward (the
    policy's); DPO's holds two and runs two; KTO's runs two on 2B images of their own noise."""
    batch = next(data.open_pairs(shard, resolution=32).batches(2))
    for loss, unets, calls in (("mapo", 1, 1), ("dpo", 2, 2), ("kto", 2, 2)):
        before = live_unets()
        sd = unet.load_sd(str(hub["sd15"]))
        s = diffdpo.setup(config(hub, shard, tmp_path, loss=loss, beta=1.0), sd)
        assert live_unets() - before == unets and (s.reference is None) == (loss == "mapo")
        seen = []
        for net in {id(n): n for n in (s.policy, s.reference) if n is not None}.values():
            net.register_forward_hook(lambda m, args, out: seen.append(len(out)))
        loss_value, acc, errors = diffdpo.micro_step(s, batch, s.policy, s.reference)
        assert len(seen) == calls and all(n == 4 for n in seen) and torch.isfinite(loss_value)
        if loss == "mapo":
            assert torch.equal(errors[2], torch.zeros(2)) and torch.equal(errors[3], torch.zeros(2))
        del s, sd


@pytest.mark.parametrize("loss,extra", [("dpo", dict(label_smoothing=0.1, label_noise=0.3)), ("sft", {}),
                                        ("mapo", dict(beta=0.1)), ("kto", dict(beta=1000.0, label_noise=0.3))])
def test_every_loss_resumes_exactly(tmp_path, hub, shard, loss, extra):
    """2 steps + resume to 4 == 4 straight steps, bit for bit, for every loss (with label noise where it applies);
    the first step's loss is each loss's value at policy == reference (ln 2, 0.5 for KTO)."""
    straight = diffdpo.train(config(hub, shard, tmp_path / "straight", loss=loss, max_steps=4, **extra))
    diffdpo.train(config(hub, shard, tmp_path / "resumed", loss=loss, max_steps=2, **extra))
    resumed = diffdpo.train(config(hub, shard, tmp_path / "resumed", loss=loss, max_steps=4, **extra))
    assert max_diff(unet_weights(resumed), unet_weights(straight)) == 0
    rows = [r for r in read_metrics(straight) if "loss" in r]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    first = {"dpo": np.log(2), "kto": 0.5}.get(loss)
    if first is not None:
        assert rows[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert json.loads((Path(resumed) / "config.json").read_text())["loss"] == loss


def test_kto_trains_on_labelled_images(tmp_path, hub, labelled):
    """--loss kto on a thumbs-up/down JSONL: trains, logs the desirable / undesirable errors, counts the bad labels."""
    out = diffdpo.train(config(hub, labelled / "images.jsonl", tmp_path / "kto", loss="kto", beta=1000.0,
                               max_steps=2, desirable_weight=2.0, undesirable_weight=2.0))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(1.0, rel=1e-6)       # mean(lambda_y) / 2 at policy == reference
    assert rows[-1]["bad_labels"] == 3 and all(np.isfinite(r["mse_w"]) for r in rows)


def _train_rank(rank, world, port, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    diffdpo.train(cfg)


def test_kto_two_processes_equal_one(tmp_path, hub, shard):
    """KTO through the whole trainer on 2 gloo processes with batch 1 (each its 2 images, the baseline over all 4)
    gives 1 process with batch 2: the same losses and gradient norms, and the same update up to Adam's first step
    (lr * sign(g)) on gradients within float rounding of 0. A per-rank baseline would change the loss by O(0.1)."""
    one = diffdpo.train(config(hub, shard, tmp_path / "one", loss="kto", beta=1000.0, max_steps=2))
    two = config(hub, shard, tmp_path / "two", loss="kto", beta=1000.0, max_steps=2, batch_size=1)
    mp.start_processes(_train_rank, args=(2, 29500 + (os.getpid() + 7) % 1000, two), nprocs=2, join=True,
                       start_method="fork")
    for a, b in zip(read_metrics(tmp_path / "two"), read_metrics(one)):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-6
    w0, w1, w2 = unet.load_sd(str(hub["sd15"])).unet.state_dict(), unet_weights(tmp_path / "two"), unet_weights(one)
    rel = (sum(((w1[k] - w2[k]) ** 2).sum() for k in w0) / sum(((w2[k] - w0[k]) ** 2).sum() for k in w0)).sqrt()
    assert rel < 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Pairs from prompts (onpolicy.py): the candidates' seeds, best against worst, a build that resumes mid-way, online
# rounds that resume exactly, a random-weight SD1.5-layout model ranked by a random-weight PickScore


def candidates(folder):
    """A build's candidates, chunk after chunk, as {column: values}."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("candidates-*.parquet"))]).to_pydict()


def test_candidate_seeds_and_best_against_worst():
    """Candidate k of pair i: seed 1,000,000 (seed + 1) + K i + k (2 candidates: the toy world's 2i, 2i + 1), so no
    two candidates of a run share one; the pair is the best and the worst in candidate order, label_0 which is
    preferred, 0.5 for a tie or a margin under --min-margin."""
    seeds = [onpolicy.candidate_seed(3, i, k, 4) for i in range(50) for k in range(4)]
    assert len(set(seeds)) == 200 and seeds[:5] == [4_000_000, 4_000_001, 4_000_002, 4_000_003, 4_000_004]
    assert [onpolicy.candidate_seed(0, 7, k, 2) for k in range(2)] == [1_000_014, 1_000_015]
    best = onpolicy.best_and_worst
    assert best([0.25, 0.75, 0.125, 0.5]) == (1, 2, 1.0, 0.625)        # the best first: label_0 1
    assert best([0.125, 0.75, 0.25]) == (0, 1, 0.0, 0.625)             # the worst first: label_0 0
    assert best([0.9, 0.1, 0.9, 0.1]) == (0, 3, 1.0, 0.8)              # the first best, the last worst
    assert best([0.4, 0.4]) == (0, 1, 0.5, 0.0) and best([0.4, math.nan])[2] == 0.5    # ties
    assert best([0.25, 0.75, 0.5], min_margin=0.5)[2] == 0.0 and best([0.25, 0.75, 0.5], min_margin=0.6)[2] == 0.5
    shapes = dict(diffdpo.TrainConfig().__dict__, data="prompts:shapes", pair_scorer="judge")
    assert onpolicy.build_of(diffdpo.TrainConfig()) == onpolicy.build_of(diffdpo.TrainConfig(**shapes))


def test_prompt_pairs_errors(tmp_path):
    """One line each, before any image is rendered: an unknown scorer, K < 2, an empty prompt set, online rounds
    without prompts, a reference that cannot follow the policy."""
    (tmp_path / "empty.txt").write_text("\n")
    cases = [(dict(pair_scorer="imagereward"), "--pair-scorer imagereward: expected one of pickscore"),
             (dict(candidates=1), "--candidates 1: must be at least 2"),
             (dict(min_margin=-0.1), "--min-margin -0.1: must be >= 0"),
             (dict(data="prompts:"), "SPEC is empty"),
             (dict(data=str(tmp_path), rebuild_every=5), "--data prompts:SPEC"),
             (dict(reference_update="current", lora_rank=4), "--reference-update current: needs a reference UNet"),
             (dict(reference_update="current", loss="mapo"), "--reference-update current: needs a reference UNet")]
    for overrides, words in cases:
        with pytest.raises(UserError, match=re.escape(words)) as e:
            onpolicy.build_of(diffdpo.TrainConfig(**dict(dict(data="prompts:shapes"), **overrides)))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"empty.txt: the prompt set is empty"):
        onpolicy.training_prompts(onpolicy.build_of(diffdpo.TrainConfig(data=f"prompts:{tmp_path / 'empty.txt'}",
                                                                        pair_scorer="clip")))
    with pytest.raises(UserError, match=r"prompt 2: .*not of the form 'a COLOR SHAPE"):   # the judge reads shapes only
        (tmp_path / "p.txt").write_text("a red circle on a blue background\na photo of a cat\n")
        onpolicy.training_prompts(onpolicy.build_of(diffdpo.TrainConfig(data=f"prompts:{tmp_path / 'p.txt'}",
                                                                        pair_scorer="judge")))


def test_prompt_pairs_build_resumes_mid_build(tmp_path, monkeypatch):
    """A build of 8 pairs x 3 candidates in chunks of 2 pairs, killed after its second chunk: the same command goes
    on with the third (every candidate rendered once over both) and writes the same pairs.parquet as a build in one
    go: the Pick-a-Pic columns, every candidate's score, the margin, each pair its best and worst candidate's image."""
    cfg = diffdpo.TrainConfig(data="prompts:shapes", candidates=3, prompt_pairs=8, render_batch=6, sample_steps=4,
                              min_margin=0.05, out=str(tmp_path))
    s = diffdpo.setup(cfg, unet.load_sd("tiny"), None)
    build = onpolicy.build_of(cfg)
    whole = onpolicy.build_round(s, tmp_path / "whole", build, 0)
    rendered, killed, real_render = [], [], onpolicy.render

    def render(sd, net, prompts, seeds, **kw):
        if len(rendered) == 2 and not killed:
            killed.append(1)
            raise KeyboardInterrupt                    # a kill between chunks
        rendered.append(seeds)
        return real_render(sd, net, prompts, seeds, **kw)
    monkeypatch.setattr(onpolicy, "render", render)
    with pytest.raises(KeyboardInterrupt):
        onpolicy.build_round(s, tmp_path / "pieces", build, 0)
    folder = onpolicy.round_folder(tmp_path / "pieces", 0)
    assert len(list(folder.glob("candidates-*.parquet"))) == 2 and not (folder / "pairs.parquet").exists()
    path = onpolicy.build_round(s, tmp_path / "pieces", build, 0)
    seeds = [x for r in rendered for x in r]
    other = onpolicy.build_of(dataclasses.replace(cfg, candidates=4))            # refused before anything renders
    with pytest.raises(UserError, match=r"round-000 was built with candidates=3, this run has candidates=4"):
        onpolicy.build_round(s, tmp_path / "pieces", other, 0)
    assert sorted(seeds) == [onpolicy.candidate_seed(0, i, k, 3) for i in range(8) for k in range(3)]
    a, b = pq.read_table(whole), pq.read_table(path)
    assert a.equals(b) and set(shards.COLUMNS) | {"scores", "margin", "pair"} == set(a.column_names)
    t = a.to_pydict()
    cands = candidates(folder)                                        # every candidate: pair, caption, k, seed, score
    assert t["pair"] == list(range(8)) and cands["seed"] == sorted(seeds) and set(cands["caption"]) <= set(
        toy.shape_prompts("train"))
    for i in range(8):
        scores = t["scores"][i]
        first, second, label_0, margin = onpolicy.best_and_worst(scores, 0.05)
        assert scores == cands["score"][3 * i:3 * i + 3] and t["label_0"][i] == label_0 and t["margin"][i] == margin
        assert (t["jpg_0"][i], t["jpg_1"][i]) == (cands["image"][3 * i + first], cands["image"][3 * i + second])
        assert scores[first if label_0 != 0 else second] == max(scores)
        judged = toy.judge(Image.open(io.BytesIO(cands["image"][3 * i])), t["caption"][i])
        assert judged == scores[0] and t["caption"][i] == toy.shape_prompts("train")[i]


def test_online_rounds_resume_exactly(tmp_path, monkeypatch):
    """--rebuild-every 2 with --reference-update current, 4 steps of 8-pair rounds: round 1's pairs are rendered by
    the policy of step 2 (not the base: they differ), its first step starts at ln 2 (the reference is the policy
    again), metrics.jsonl carries each round's mean reward and margin; stopped at step 3 (mid-round, the reference
    in the checkpoint) and resumed, the run ends with the uninterrupted run's weights and losses. A rank other than
    0 takes rank 0's pairs (it builds nothing) and moves its own reference."""
    common = dict(data="prompts:shapes", prompt_pairs=8, batch_size=4, rebuild_every=2, reference_update="current",
                  sample_steps=4, samples=False, checkpoint_every=1, warmup_steps=1, lr=1e-3)
    one = diffdpo.train(diffdpo.TrainConfig(out=str(tmp_path / "one"), max_steps=4, **common))
    rows = read_metrics(one)
    assert [r["round"] for r in rows] == [0, 0, 1, 1] and abs(rows[2]["loss"] - math.log(2)) < 1e-6
    stats = [onpolicy.round_stats(onpolicy.round_folder(one, r) / "pairs.parquet", r) for r in (0, 1)]
    assert all(dict(rows[2 * r], **stats[r]) == rows[2 * r] for r in (0, 1))
    r1 = pq.read_table(onpolicy.round_folder(one, 1) / "candidates-0000008.parquet").to_pydict()
    sd = unet.load_sd("tiny")
    again = sample.render(sd, sd.unet, r1["caption"][:1], r1["seed"][:1], steps=4, guidance=4.0, height=32, width=32)
    assert shards.png_bytes(again[0]) != r1["image"][0]               # the policy of step 2 drew it, not the base
    two = diffdpo.train(diffdpo.TrainConfig(out=str(tmp_path / "two"), max_steps=3, **common))
    two = diffdpo.train(diffdpo.TrainConfig(out=str(two), max_steps=4, **common))
    assert [r["loss"] for r in read_metrics(two)] == [r["loss"] for r in rows]
    w1, w2 = unet_weights(one), unet_weights(two)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # another rank of a torchrun never builds: it takes rank 0's file, and its reference follows its policy too
    monkeypatch.setattr(onpolicy, "build_round", None)
    s = diffdpo.setup(diffdpo.TrainConfig(out=str(one), **common), unet.load_sd("tiny"), None)
    s.policy.load_state_dict(unet.load_component(one / "unet", "unet").state_dict())
    path = onpolicy.round_pairs(s, one, dict(step=2, round=1, position=32), rank=1)
    assert path == onpolicy.round_folder(one, 1) / "pairs.parquet"
    assert all(torch.equal(a, b) for a, b in zip(s.reference.state_dict().values(), s.policy.state_dict().values()))
    with pytest.raises(UserError, match=r"round-001/pairs.parquet is missing, and the run is at step 3"):
        onpolicy.round_pairs(s, tmp_path / "gone", dict(step=3, round=1, position=48), rank=0)  # not rebuilt

def test_prompt_pairs_on_an_sd15_layout_model_with_pickscore(hub, clip_folder, tmp_path):
    """`--model SD15-LAYOUT --data prompts:FILE --pair-scorer pickscore=FOLDER` end to end on random weights: the
    pairs' scores are the scorer's on the candidates' images, and the run trains on them."""
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na red bicycle\na bowl of soup\n")
    cfg = diffdpo.TrainConfig.from_args(["--model", str(hub["sd15"]), "--data", f"prompts:{tmp_path / 'prompts.txt'}",
                                         "--pair-scorer", f"pickscore={clip_folder}", "--out", str(tmp_path / "run"),
                                         "--resolution", "32", "--sample-steps", "2", "--max-steps", "1",
                                         "--batch-size", "2", "--no-samples", "--checkpoint-every", "0"])
    assert (cfg.candidates, cfg.prompt_pairs, cfg.render_batch) == (4, 0, 8)       # the sd15 preset's
    out = diffdpo.train(cfg)
    t = pq.read_table(out / "pairs" / "round-000" / "pairs.parquet").to_pydict()
    cands = candidates(onpolicy.round_folder(out, 0))
    images = [Image.open(io.BytesIO(b)) for b in cands["image"]]
    scores = eval.load_scorer("pickscore", str(clip_folder))(images, cands["caption"]).double().tolist()
    assert len(t["caption"]) == 3 and [x for s in t["scores"] for x in s] == pytest.approx(scores, rel=1e-5)
    assert len(read_metrics(out)) == 1 and math.isfinite(read_metrics(out)[0]["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Ready for a GPU without one: the CUDA-only paths exercised on the CPU (the meta device stands in for a device the
# step must not leave; bf16 / fp16 autocast runs on the CPU too; torch.distributed is mocked where it must be)


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
    base, tuned = grid_rows(out / "samples" / "step000003.png", ["base", "step 3"], runs.SAMPLE_PROMPTS)
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
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        cfg = diffdpo.TrainConfig(device="auto", dist_timeout=1234, threads=0)
        rank, world, device = diffdpo.setup_distributed(cfg)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:  # the CUDA flags back as they were (they change nothing on the CPU)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
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
    want = (5000.0, 2.048e-5, 2000, 500, "sample")
    assert (cfg.beta, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.vae_latents) == want
    assert diffdpo.TrainConfig.from_preset("sdxl").optimizer == "adafactor"
    assert diffdpo.TrainConfig.from_preset("toy") == diffdpo.TrainConfig()
    with pytest.raises(UserError, match="--preset nope: expected one of toy, toy-flow, sd15, sdxl, sd3"):
        diffdpo.TrainConfig.from_preset("nope")


# ----------------------------------------------------------------------------------------------------------------
# Data (data.py, shards.py): Pick-a-Pic pairs, prefetching, JSONL pairs, Hub datasets


def test_pickapic_pairs_preferred_first_ties_dropped(shard):
    src = data.open_pairs(str(shard), resolution=16, flip=False)
    assert len(src) == 21  # 24 rows - 3 ties
    b = next(src.batches(20))
    assert b["chosen"].shape == (20, 3, 16, 16) and b["chosen"].min() >= -1 and b["chosen"].max() <= 1
    # the preferred image is the reddish one, whichever column it was in
    assert (b["chosen"][:, 0].mean((1, 2)) > b["chosen"][:, 2].mean((1, 2))).all()
    assert (b["rejected"][:, 2].mean((1, 2)) > b["rejected"][:, 0].mean((1, 2))).all()
    assert src.counts()["corrupt"] == 1 and len(set(b["prompts"])) == 19  # the corrupt pair: replaced, counted
    assert src.counts()["ties"] == 3 and src.counts()["bad_labels"] == 0
    # augmentation is a function of (seed, stream index): flips and dropout reproduce, and differ between items
    a1 = next(data.open_pairs(str(shard), resolution=16, caption_dropout=0.5, seed=3).batches(8, start=40))
    a2 = next(data.open_pairs(str(shard), resolution=16, caption_dropout=0.5, seed=3).batches(8, start=40))
    assert torch.equal(a1["chosen"], a2["chosen"]) and a1["prompts"] == a2["prompts"] and "" in a1["prompts"]


def test_prefetch_gives_the_same_batches_and_raises_data_errors(shard):
    """The trainer reads batches through data.prefetch (a background thread decodes the next ones): the same
    batches in the same order as reading them directly, a data error raised at its batch, and close() ends the
    thread."""
    others = set(threading.enumerate())
    direct = list(itertools.islice(data.open_pairs(str(shard), resolution=16, seed=1).batches(4), 9))
    ahead = shards.prefetch(data.open_pairs(str(shard), resolution=16, seed=1).batches(4), depth=3)
    for a, b in zip(direct, ahead):
        assert a["prompts"] == b["prompts"] and a["position"] == b["position"] and a["keys"] == b["keys"]
        assert torch.equal(a["chosen"], b["chosen"]) and torch.equal(a["rejected"], b["rejected"])
    ahead.close()

    def broken():
        yield 1
        raise data.DataError("shard-3.parquet: column 'jpg_0' is missing")
    stream = shards.prefetch(broken())
    assert next(stream) == 1
    with pytest.raises(data.DataError, match="jpg_0"):
        next(stream)
    endless = shards.prefetch(itertools.count())
    assert next(endless) == 0
    endless.close()
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "prefetch" and t not in others]


def test_jsonl_pairs_and_errors(tmp_path, shard):
    Image.new("RGB", (20, 30), (255, 0, 0)).save(tmp_path / "w.png")
    Image.new("RGB", (30, 20), (0, 0, 255)).save(tmp_path / "l.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="red", chosen="w.png", rejected="l.png")) + "\n")
    b = next(data.open_pairs(str(tmp_path), resolution=8, flip=False).batches(2))
    assert b["prompts"] == ["red", "red"] and b["chosen"][0, 0].min() > 0.9 and b["rejected"][0, 2].min() > 0.9
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "chosen": "w.png"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: expected a JSON object with keys prompt, chosen, rejected"):
        data.open_pairs(str(tmp_path / "bad.jsonl"), resolution=8)
    (tmp_path / "missing.jsonl").write_text('{"prompt": "x", "chosen": "w.png", "rejected": "nope.png"}\n')
    with pytest.raises(data.DataError, match="nope.png not found"):
        next(data.open_pairs(str(tmp_path / "missing.jsonl"), resolution=8).batches(1))
    pq.write_table(pq.read_table(shard).drop_columns(["label_1"]), tmp_path / "nolabel.parquet")
    with pytest.raises(data.DataError, match="nolabel.parquet: missing column.s. label_1"):
        len(data.open_pairs(str(tmp_path / "nolabel.parquet"), resolution=8))
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.open_pairs(str(tmp_path / "nothing.parquet"), resolution=8)


def test_hub_dataset_is_fetched_shard_by_shard(tmp_path, monkeypatch):
    """A Hub dataset's parquet shards are downloaded one at a time, as training reaches them."""
    names = [f"data/train-0000{i}-of-00003.parquet" for i in range(3)]
    for i, n in enumerate(names):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        make_pickapic_shard(tmp_path / n, n=10, ties=0, corrupt=0, seed=i)
    fetched = []
    monkeypatch.setattr(hh.HfApi, "list_repo_files", lambda self, repo, repo_type=None: names + ["README.md"])

    def download(repo, filename, repo_type=None):
        fetched.append(filename)
        return str(tmp_path / filename)
    monkeypatch.setattr(hh, "hf_hub_download", download)
    src = data.open_pairs("hub:someone/pairs", resolution=8)
    next(src.batches(4))
    assert len(set(fetched)) == 1


def test_pickapic_removed_message(monkeypatch):
    """`--data pickapic` when the Hub answers that the repo does not exist (as it does since 2025)."""

    def gone(*a, **k):  # what huggingface_hub raises for a 404 on the repo
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, "404 Client Error: Repository Not Found")
        raise err
    monkeypatch.setattr(hh.HfApi, "list_repo_files", gone)
    with pytest.raises(data.DataError) as e:
        data.open_pairs("pickapic", resolution=32)
    msg = str(e.value)
    assert "taken off the Hub in 2025" in msg and "hub:OWNER/NAME" in msg and "pairs.jsonl" in msg
    assert "pickapic_v2_no_images" in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (eval.py, scorer_nets.py): the reward models against transformers / OpenCLIP on random-weight models in
# the Hub layouts, text alignment (BLIP captions + Sentence-BERT), prompt sets, win rates, the Frechet distance,
# the eval CLI, AI feedback


TINY_CLIP = dict(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=77),
                 vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=28, patch_size=14),
                 projection_dim=16)


TINY_OPENCLIP = dict(embed_dim=16, vision_cfg=dict(image_size=28, layers=2, width=48, head_width=12, patch_size=14,
                                                mlp_ratio=2),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2, mlp_ratio=2))


PROMPTS = ["a photo of a cat", "A RED cube on a  blue table!", "an astronaut riding a horse, oil painting &amp; ink",
           "the word 'hello' written in the sand", " ".join(["a very long prompt"] * 30), "café crème, 2 cups"]


def random_clip_model(act="quick_gelu", seed=0):
    """A transformers CLIPModel at a tiny config with non-trivial norms, biases and temperature."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(TINY_CLIP["text_config"], hidden_act=act),
                     vision_config=dict(TINY_CLIP["vision_config"], hidden_act=act),
                     projection_dim=TINY_CLIP["projection_dim"])
    model = CLIPModel(cfg).eval()
    for n, p in model.named_parameters():
        if p.ndim == 1:
            p.data.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.1)
    model.logit_scale.data.fill_(3.2)
    return model


def sample_images(seed=0, sizes=((40, 32), (32, 50), (64, 64), (29, 71), (100, 30), (33, 33))):
    """Smooth random RGB images of several shapes (upsampled noise, so resizing has something to do)."""
    g = np.random.default_rng(seed)
    noise = [g.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8) for w, h in sizes]
    return [Image.fromarray(a).resize((w, h), Image.BILINEAR) for a, (w, h) in zip(noise, sizes)]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A transformers CLIPModel folder as on the Hub: config.json, model.safetensors, tokenizer files and
    preprocessor_config.json (shortest edge 28, crop 28) beside them."""
    folder = tmp_path_factory.mktemp("clip") / "clip"
    random_clip_model().save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer_folder(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return folder


def test_clip_preprocess_matches_transformers():
    images = sample_images(sizes=((300, 217), (217, 300), (512, 512), (225, 640), (640, 225), (224, 224), (100, 90)))
    ours = scorer_nets.clip_preprocess(images)
    ref = CLIPImageProcessorPil()(images, return_tensors="pt").pixel_values
    print(f"CLIP preprocessing: max abs difference {(ours - ref).abs().max().item():.2e}")
    assert ours.shape == ref.shape == (7, 3, 224, 224) and (ours - ref).abs().max() < 1e-6


def test_pickscore_and_clip_score_match_transformers(clip_folder):
    images = sample_images()
    ref = CLIPModel.from_pretrained(clip_folder).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(clip_folder)(images, return_tensors="pt").pixel_values
    ids = HFCLIPTokenizer.from_pretrained(clip_folder)(PROMPTS, padding=True, truncation=True, max_length=77,
                                                      return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(ref.get_text_features(**ids).pooler_output, dim=-1)
    cos = (img * txt).sum(-1)
    for name, want in [("pickscore", ref.logit_scale.exp() * cos), ("clip", 100 * cos.clamp(min=0))]:
        got = eval.load_scorer(name, model=str(clip_folder), batch_size=4)(images, PROMPTS)
        print(f"{name}: relative error {rel_err(got, want):.2e}")
        assert got.shape == (6,) and rel_err(got, want) < 1e-5
    e = F.normalize(torch.randn(3, 8), dim=-1)
    assert torch.allclose(eval.clip_score(e, e), torch.full((3,), 100.0)) and eval.clip_score(e, -e).eq(0).all()


def openclip_state_dict(model):
    """A transformers CLIPModel's weights under OpenCLIP's names (the inverse of convert.openclip_to_ours): q, k, v
    fused into attn.in_proj_*, the projections transposed."""
    inverse = [(b, a) for a, b in convert.OPENCLIP_RULES]
    inverse = [r for r in inverse if not r[0].startswith(".")] + [r for r in inverse if r[0].startswith(".")]
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        for a, b in inverse:
            k = k.replace(a, b) if k.startswith(a) or a.startswith(".") else k
        if k in convert.TRANSPOSED:
            v = v.t()
        out[k] = v.clone()
    for k in [k for k in out if ".self_attn.q_proj." in k]:
        stem, kind = k.split(".self_attn.q_proj.")
        out[f"{stem}.attn.in_proj_{kind}"] = torch.cat([out.pop(f"{stem}.self_attn.{n}_proj.{kind}") for n in "qkv"])
    return out


def openclip_tokenizer_module():
    """open_clip's own tokenizer.py (open_clip itself needs torchvision), with ftfy's text repair as identity."""
    spec = importlib.util.spec_from_file_location("_openclip_tokenizer", clip_vocab_source().parent / "tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ftfy"] = types.SimpleNamespace(fix_text=lambda s: s)   # only while it is imported
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["ftfy"]
    return mod


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory):
    """HPSv2's layout: an OpenCLIP state dict in {"state_dict": ...} saved by torch.save, with an open_clip model
    config and tokenizer files beside it. Returns (folder, the transformers model it was made from)."""
    folder = tmp_path_factory.mktemp("hps")
    model = random_clip_model(act="gelu", seed=1)
    torch.save({"state_dict": openclip_state_dict(model)}, folder / "HPS_v2.1_compressed.pt")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENCLIP}))
    write_clip_tokenizer_folder(folder)
    return folder, model


def test_hps_matches_reference(hps_folder):
    """Our HPS on the OpenCLIP checkpoint == the transformers model it was converted from, on the same pixels and
    the ids of open_clip's own tokenizer; our tokenizer == open_clip's."""
    folder, ref = hps_folder
    images = sample_images(seed=2)
    ids = openclip_tokenizer_module().tokenize(PROMPTS)
    scorer = eval.load_scorer("hps", model=str(folder / "HPS_v2.1_compressed.pt"), batch_size=4)
    assert torch.equal(scorer.tokenizer(PROMPTS), ids)
    assert ids[1, 7:11].tolist() == [2175, 256, 49407, 0]  # "!" is the symbol "!</w>"; after eot pad 0
    with torch.no_grad():
        pixels = scorer_nets.hps_preprocess(images, 28)
        img = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(ref.get_text_features(input_ids=ids).pooler_output, dim=-1)
    want, got = (img * txt).sum(-1), scorer(images, PROMPTS)
    print(f"hps: relative error {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-5


def test_hps_pad_to_square_transform():
    """Longest side -> size (bicubic, antialiased, on the [0, 1] tensor), centered black padding (extra pixel at
    the bottom/right), OpenAI normalization; a square image is only resized."""
    img = sample_images(sizes=((50, 20),))[0]
    x = torch.from_numpy(np.asarray(img).astype(np.float32) / 255).permute(2, 0, 1)[None]
    canvas = torch.zeros(1, 3, 28, 28)
    canvas[:, :, 8:19, :] = F.interpolate(x, size=(11, 28), mode="bicubic", antialias=True)  # round(20 * 28 / 50) = 11
    mean = torch.tensor(scorer_nets.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(scorer_nets.OPENAI_STD).view(1, 3, 1, 1)
    got = scorer_nets.hps_preprocess([img], 28)
    assert got.shape == (1, 3, 28, 28) and (got - (canvas - mean) / std).abs().max() < 1e-6
    assert torch.allclose(got[0, :, :8], (-mean / std)[0].expand(3, 8, 28)) and got[0, :, 19:].shape[1] == 9
    square = sample_images(sizes=((64, 64),))[0]
    x = torch.from_numpy(np.asarray(square).astype(np.float32) / 255).permute(2, 0, 1)[None]
    want = (F.interpolate(x, size=(28, 28), mode="bicubic", antialias=True) - mean) / std
    assert (scorer_nets.hps_preprocess([square], 28) - want).abs().max() < 1e-6


@pytest.fixture(scope="module")
def aesthetic_folder(tmp_path_factory, clip_folder):
    """A CLIP folder with the MLP's .pth beside it, saved from the original predictor's module (dropouts included)."""
    folder = tmp_path_factory.mktemp("aesthetic") / "aesthetic"
    shutil.copytree(clip_folder, folder)
    torch.manual_seed(3)
    mlp = nn_mlp(TINY_CLIP["projection_dim"])
    torch.save(mlp.state_dict(), folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder, mlp


def nn_mlp(dim):
    """improved-aesthetic-predictor's MLP class: self.layers = Sequential(Linear, Dropout, ..., Linear)."""
    m = nn.Module()
    m.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                             nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return m.eval()


def test_aesthetic_matches_reference(aesthetic_folder):
    folder, mlp = aesthetic_folder
    images = sample_images(seed=4)
    ref = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        emb = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        want = mlp.layers(emb).squeeze(-1)
        known = torch.randn(5, TINY_CLIP["projection_dim"])
        head = eval.AestheticMLP(TINY_CLIP["projection_dim"])
        head.load_state_dict(mlp.state_dict())
        assert rel_err(head(known), mlp.layers(known).squeeze(-1)) < 1e-6   # the head alone, on known inputs
    got = eval.load_scorer("aesthetic", model=str(folder))(images, PROMPTS)
    print(f"aesthetic: relative error {rel_err(got, want):.2e}")
    assert got.shape == (6,) and rel_err(got, want) < 1e-5


def test_clip_towers_at_real_sizes():
    """The presets are the real towers: the key names and shapes of transformers' CLIPModel at PickScore's (ViT-H/14)
    and OpenAI's ViT-L/14 configs, built on the meta device; OpenCLIP's ViT-H-14 names map onto ours (986M)."""
    h14 = dict(text_config=dict(scorer_nets.TEXT_H14, eos_token_id=49407),
               vision_config=scorer_nets.CLIPVisionConfig.vit_h14().__dict__, projection_dim=1024)
    l14 = dict(text_config=scorer_nets.TEXT_L14, vision_config=scorer_nets.CLIPVisionConfig.vit_l14().__dict__,
               projection_dim=768)
    for d, n in [(h14, 986_109_441), (l14, 427_616_513)]:
        d["vision_config"] = {k: v for k, v in d["vision_config"].items() if k != "raw"}
        with torch.device("meta"):
            ref = CLIPModel(CLIPConfig(**d))
            ours = scorer_nets.CLIP(*scorer_nets.CLIP.from_dict(d))
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
        assert sum(p.numel() for p in ours.parameters()) == n
    text, vision = scorer_nets.openclip_configs(scorer_nets.VIT_H_14)
    with torch.device("meta"):
        ours, ref = scorer_nets.CLIP(text, vision), CLIPModel(CLIPConfig(**h14))
    mapped = convert.openclip_to_ours(openclip_state_dict(ref))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


BERT_WORDS = ("a an the of on in with and is photo cat dog red blue green cube table sign says hello world store front "
              "word written painting oil astronaut riding horse ink sand very long prompt cafe creme cups two cat "
              "garden house tree sky street car man woman black white yellow orange picture of image").split()


def bert_vocab():
    """A small uncased WordPiece vocabulary in bert-base-uncased's order: [PAD] 0, unused, [UNK] [CLS] [SEP] [MASK],
    characters (also accented, CJK, Greek), words, ##pieces."""
    chars = sorted(set("!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~¡¿éßçñ中文字日本語σςοφ€©°’"))
    pieces = ["##" + c for c in chars if c.isalnum()] + ["##ing", "##ed", "##er", "##ly", "##es", "##tion"]
    return ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars \
        + sorted(set(BERT_WORDS) - set(chars)) + pieces


WORDPIECE_CASES = [
    "A photo of a cat", "  A RED cube on a  blue table! ", "Café Crème brûlée, naïve résumé", "中文字 and 日本語 mixed",
    "HELLO, World!!! (x) [y] {z}", "a" * 101, "b" * 100, "garden" * 3, "tab\there\nnewline\r\x0bvt\x0cff\x85nel\u2028",
    "zero\u200bwidth\ufeffbom\x00nul\ufffdrepl", "emoji 😀🎨 and ©®™ € £ ° ±", "‘curly’ “double” — dash … ellipsis",
    "ＦＵＬＬ ｗｉｄｔｈ！", "İstanbul ΣΟΦΟΣ straße ﬁ", "[CLS] [SEP] [MASK] [unk] [PAD]x", "don't it's we're",
    "1,000.50 $5 #tag @user", "co-operate e-mail U.S.A.", "unknownword zzz qq", "", "   ", "a_b-c/d\\e",
    "dogs painted writing streets reddest", "\U0002B830 \U0002B920 U+2B820 edges of the CJK table"] + PROMPTS


def test_wordpiece_matches_bert_tokenizer(tmp_path):
    """Our WordPiece == transformers' BertTokenizer: ids on hard text (accents, CJK, punctuation, [UNK] for long or
    unknown words, case, control characters, literal special tokens), from vocab.txt alone and from the saved
    tokenizer.json; truncation; decode(skip_special_tokens=True) with and without the clean-up."""
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    ref = BertTokenizer.from_pretrained(tmp_path / "txt")
    ref.save_pretrained(tmp_path / "json")
    assert (tmp_path / "json" / "tokenizer.json").is_file()
    for folder in ("txt", "json"):
        ours = scorer_nets.WordPiece.from_folder(tmp_path / folder)
        for text in WORDPIECE_CASES:
            assert ours.encode(text) == ref(text)["input_ids"], (folder, text)
    ids, mask = scorer_nets.WordPiece.from_folder(tmp_path / "json", max_length=12)(WORDPIECE_CASES)
    want = ref(WORDPIECE_CASES, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    unk = ref.convert_tokens_to_ids("[UNK]")
    assert sum(row.count(unk) for row in map(ours.encode, WORDPIECE_CASES)) >= 5    # the [UNK] path is exercised
    rng, n = random.Random(0), len(ours.vocab)
    for cleanup in (False, True):
        ours.cleanup = cleanup
        for _ in range(200):
            seq = [rng.randrange(n) for _ in range(rng.randrange(1, 16))] + [ours.vocab["."], ours.sep, ours.pad]
            assert ours.decode(seq) == ref.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=cleanup)


@pytest.fixture(scope="module")
def sbert_folder(tmp_path_factory):
    """A Sentence-BERT folder as sentence-transformers saves it (all-MiniLM-L6-v2's modules: BERT, mean pooling,
    normalization; max_seq_length 16 so truncation is exercised), random non-trivial weights."""
    root = tmp_path_factory.mktemp("sbert")
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=len(bert_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    bert = BertModel(cfg).eval()
    for n, p in bert.named_parameters():
        if p.ndim == 1:
            p.data.normal_(1.0 if n.endswith("LayerNorm.weight") else 0.0, 0.1)
    bert.save_pretrained(root / "bert")
    BertTokenizer.from_pretrained(root / "vocab").save_pretrained(root / "bert")
    modules = [Transformer(str(root / "bert"), max_seq_length=16), Pooling(32, "mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(root / "sbert"))
    return root / "sbert"


def test_sentence_encoder_matches_sentence_transformers(sbert_folder):
    texts = PROMPTS + ["Café crème, 中文", "", "x " * 40]
    want = SentenceTransformer(str(sbert_folder), device="cpu").encode(texts, convert_to_tensor=True)
    enc = eval.load_sentence_encoder(str(sbert_folder), batch_size=3)
    got = enc(texts)
    print(f"Sentence-BERT: max abs difference {(got - want).abs().max().item():.2e}")
    assert enc.tokenizer.max_length == 16 and got.shape == want.shape == (len(texts), 32)
    assert (got - want).abs().max() < 1e-5 and (got.norm(dim=-1) - 1).abs().max() < 1e-6


def random_blip(vocab_size, seed=0):
    """A tiny BlipForConditionalGeneration whose greedy captions vary with the image: decoder weights larger than the
    default init (so the image and context matter), and [SEP] favoured enough that some captions end early."""
    torch.manual_seed(seed)
    cfg = BlipConfig(text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=40, bos_token_id=vocab_size - 2,
                                      sep_token_id=5, pad_token_id=0),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8))
    model = BlipForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            norm_weight = n.endswith("weight") and ("LayerNorm" in n or "layer_norm" in n or "layernorm" in n)
            p.normal_(1.0 if norm_weight else 0.0, 0.1 if p.ndim == 1 or "vision" in n else 0.3)
        model.text_decoder.cls.predictions.bias[5] += 3.0
    return model


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    """A BLIP captioning folder as save_pretrained writes it: config.json, model.safetensors (tied head keys left
    out), tokenizer.json with [DEC] / [ENC] added, processor_config.json (384 -> 32 px)."""
    root = tmp_path_factory.mktemp("blip")
    (root / "vocab").mkdir()
    (root / "vocab" / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n", encoding="utf-8")
    tok = BertTokenizer.from_pretrained(root / "vocab")
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tok.convert_tokens_to_ids(["[SEP]", "[PAD]", "[DEC]"]) == [5, 0, len(tok) - 2]
    random_blip(len(tok)).save_pretrained(root / "blip")
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok).save_pretrained(root / "blip")
    return root / "blip"


def test_blip_captions_match_transformers(blip_folder):
    """Captions identical to generate(num_beams=1, do_sample=False, max_new_tokens=30) + decode(skip_special_tokens);
    pixels, image states and next-token logits within 1e-5; the captions vary and some end before 30 tokens."""
    images = sample_images(seed=6) + sample_images(seed=7, sizes=((48, 40), (40, 48)))
    ref, processor = BlipForConditionalGeneration.from_pretrained(blip_folder).eval(), BlipProcessor.from_pretrained(
        blip_folder)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    out = ref.generate(pixel_values=pixels, num_beams=1, do_sample=False, max_new_tokens=30)
    want = [processor.decode(row, skip_special_tokens=True) for row in out]
    captioner = eval.load_captioner(str(blip_folder), batch_size=3)
    assert (scorer_nets.blip_preprocess(images, 32) - pixels).abs().max() < 1e-6
    with torch.no_grad():
        states = captioner.blip.vision_model(pixels)
        assert rel_err(states, ref.vision_model(pixel_values=pixels).last_hidden_state) < 1e-5
        kv = [(l.crossattention.self.key(states), l.crossattention.self.value(states))
              for l in captioner.blip.text_decoder.bert.encoder.layer]
        logits = captioner.blip.text_decoder.cls.predictions(captioner.blip.text_decoder.bert(out[:, :12], image_kv=kv))
        assert rel_err(logits, ref(pixel_values=pixels, input_ids=out[:, :12]).logits) < 1e-5
    got = captioner(images)
    lengths = [(row != 0).sum().item() - 1 for row in out]
    print(f"BLIP: {len(got)} captions identical; {len(set(got))} distinct; new tokens {lengths}")
    assert got == want and len(set(got)) >= 6 and min(lengths) < 30 and max(lengths) == 30


def test_text_alignment_scorer_matches_reference(blip_folder, sbert_folder):
    """cos(SBERT(BLIP caption), SBERT(prompt)) == the same through transformers + sentence-transformers."""
    images = sample_images(seed=8)
    ref, processor = BlipForConditionalGeneration.from_pretrained(blip_folder).eval(), BlipProcessor.from_pretrained(
        blip_folder)
    out = ref.generate(pixel_values=processor(images=images, return_tensors="pt").pixel_values, max_new_tokens=30)
    captions = [processor.decode(row, skip_special_tokens=True) for row in out]
    sbert = SentenceTransformer(str(sbert_folder), device="cpu")
    want = (sbert.encode(captions, convert_to_tensor=True) * sbert.encode(PROMPTS, convert_to_tensor=True)).sum(-1)
    scorer = eval.load_scorer("text-alignment", model=str(sbert_folder), captioner=str(blip_folder))
    got = scorer(images, PROMPTS)
    print(f"text alignment: {got.tolist()}, max abs difference {(got - want).abs().max().item():.2e}")
    assert scorer.captions == captions and got.shape == (6,) and (got - want).abs().max() < 1e-5
    assert got.std() > 0.01


def test_blip_and_sbert_at_real_sizes():
    """The presets and config readers give transformers' key names and shapes at the real configs (meta device):
    BLIP captioning base and large (vocabulary 30524, 12 decoder heads) and all-MiniLM-L6-v2."""
    text = dict(vocab_size=30524, num_attention_heads=12, bos_token_id=30522, sep_token_id=102, pad_token_id=0)
    counts = {}
    for name in ("base", "large"):
        vision = getattr(scorer_nets.BlipVisionConfig, name)()
        d = dict(text_config=text, vision_config={k: v for k, v in vision.__dict__.items() if k != "raw"})
        with torch.device("meta"):
            ref = BlipForConditionalGeneration(BlipConfig(**d))
            ours = scorer_nets.Blip(*scorer_nets.blip_configs(d))
        want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
        counts[name] = sum(p.numel() for p in ours.parameters())  # the tied head counted twice, as in the file
    with torch.device("meta"):
        ref = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536))
        ours = scorer_nets.Bert(scorer_nets.BertConfig.minilm_l6(), pooler=True)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}
    counts["minilm"] = sum(p.numel() for p in ours.parameters())
    print(counts)
    assert counts["minilm"] == 22_713_216 and 240e6 < counts["base"] < 260e6 and 460e6 < counts["large"] < 480e6


def test_prompt_sets_txt_and_offline_error(tmp_path, monkeypatch, capsys):
    """A .txt prompt file; a named set that is not in the HF cache, offline: eval.py ends in one line, exit 2."""
    (tmp_path / "p.txt").write_text("a red cube\n\n  a blue ball  \n")
    assert eval.prompt_set(str(tmp_path / "p.txt")) == ["a red cube", "a blue ball"]
    with pytest.raises(ValueError, match="expected one of parti"):
        eval.prompt_set("nonsense")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))       # HF_HUB_CACHE=... HF_HUB_OFFLINE=1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        eval.main(["--model", "tiny", "--unet", "nowhere", "--prompts", "parti", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err[-2000:]
    assert err.startswith("error: dataset 'nateraw/parti-prompts': ") and "not in the local HF cache" in err


PARTI_TSV = ("Prompt\tCategory\tChallenge\tNote\n"
             "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
             "a corgi’s head\tAnimals\tImagination\t\n"
             '"G I G G L E" painted in thick colorful lettering as graffiti on a faded red brick wall with a '
             'splotch of exploding white paint.\tIllustrations\tWriting & Symbols\t\n'
             'a sign that says "Hello, World"\tArtifacts\tWriting & Symbols\tquotes, a comma\n'
             "a store front that has the word ‘openai’ written on it.\tOutdoor Scenes\tWriting & Symbols\t\n")


DRAWBENCH_ROWS = [("A red colored car.", "Colors"), ("A sign that says 'Hello World'.", "Text"),
                  ('A stack of 3 plates. A blue plate is on the top, sitting on a blue plate.', "DALL-E"),
                  ('Painting of the orange cat Otto von Garfield, Count of Bismarck-Schönhausen, "quoted".', "Reddit"),
                  ("Acersecomicke.", "Rare Words")]


def write_hf_dataset(cache, repo, files_):
    """A dataset snapshot in the HF cache layout (refs/main -> snapshots/<commit>/...), as a past download left it."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    root = cache / f"datasets--{repo.replace('/', '--')}"
    for name, text in files_.items():
        (root / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / commit / name).write_text(text, encoding="utf-8")
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_prompt_files_in_their_real_formats(tmp_path, monkeypatch):
    """Parti's TSV (raw lines, a literal leading quote kept), DrawBench's Google-Sheets CSV (every field quoted), the
    HPS benchmark's JSON lists (a file, a folder, one style); the same text through the HF cache; one-line errors."""
    (tmp_path / "PartiPrompts.tsv").write_text(PARTI_TSV, encoding="utf-8")
    parti = [line.split("\t")[0] for line in PARTI_TSV.split("\n")[1:-1]]
    assert eval.prompt_set(str(tmp_path / "PartiPrompts.tsv")) == parti and parti[2].startswith('"G I G G L E" painted')
    quoted = [r["Prompt"] for r in csv.DictReader(PARTI_TSV.splitlines(), delimiter="\t")]
    assert sum(a != b for a, b in zip(quoted, parti)) >= 1     # csv's default quoting loses the quotes of that row
    with open(tmp_path / "DrawBench.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerows([("Prompts", "Category")] + DRAWBENCH_ROWS)
    assert (tmp_path / "DrawBench.csv").read_text().startswith('"Prompts","Category"\n"A red colored car.","Colors"')
    assert eval.prompt_set(str(tmp_path / "DrawBench.csv")) == [p for p, _ in DRAWBENCH_ROWS]
    styles = {s: [f"{s} prompt {i}: “curly” &amp; ｆｕｌｌ" for i in range(3)] for s in eval.HPS_STYLES}
    hps = tmp_path / "hps"
    hps.mkdir()
    for s in eval.HPS_STYLES[::-1]:
        (hps / f"{s}.json").write_text(json.dumps(styles[s], ensure_ascii=False), encoding="utf-8")
    everything = [p for s in eval.HPS_STYLES for p in styles[s]]
    assert eval.prompt_set(str(hps)) == everything and eval.prompt_set(str(hps / "photo.json")) == styles["photo"]
    # the named sets, from the HF cache (offline), parsed by the same readers
    cache = tmp_path / "hf"
    write_hf_dataset(cache, "nateraw/parti-prompts", {"PartiPrompts.tsv": PARTI_TSV, "README.md": "# parti"})
    write_hf_dataset(cache, "sayakpaul/drawbench", {"DrawBench.csv": (tmp_path / "DrawBench.csv").read_text()})
    write_hf_dataset(cache, "zhwang/HPDv2", {f"benchmark/{s}.json": json.dumps(styles[s]) for s in eval.HPS_STYLES})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert eval.prompt_set("parti") == parti and eval.prompt_set("drawbench") == [p for p, _ in DRAWBENCH_ROWS]
    assert eval.prompt_set("hps") == everything and eval.prompt_set("hps:concept-art") == styles["concept-art"]
    # bad input: one line naming the file and what was expected
    (tmp_path / "bad.tsv").write_text("Caption-less\tCategory\nx\ty\n")
    (tmp_path / "bad.json").write_text('{"anime": ["a"]}')
    for spec, expected in [(tmp_path / "bad.tsv", "bad.tsv: expected a header with a prompt column"),
                           (tmp_path / "bad.json", "bad.json: expected a JSON list of prompt strings"),
                           (tmp_path / "missing.csv", "missing.csv: not a readable .csv prompt file"),
                           (tmp_path, "no HPSv2 benchmark files here"), ("hps:cubism", "expected one of parti"),
                           (tmp_path / "p.xlsx", "expected one of parti")]:
        with pytest.raises(ValueError, match=re.escape(expected)) as e:
            eval.prompt_set(str(spec))
        assert "\n" not in str(e.value)


HARD_PROMPTS = [
    "a corgi’s head", "the word ‘openai’ written on it", "“double quotes” and don’t", "ＦＵＬＬ－ＷＩＤＴＨ！ ｐｒｏｍｐｔ",
    "ﬁne ﬂowers ligatures", "cafÃ© mojibake", "itâ€™s broken utf-8", "Tom &amp; Jerry &amp;amp; friends", "&lt;b&gt;",
    "&#39;quoted&#39; and &quot;x&quot;", "no\u00a0break\u2009thin\u3000ideographic", "zero\u200bwidth",
    "tabs\tand\nnewlines\r\nand\u2028separators", "ΟΔΟΣ ΣΟΦΟΣ final sigma", "İstanbul DŽEMAL", "emoji 😀🎨 ✨",
    "中文字符 日本語 한국어", "e\u0301 combining accent", "<|endoftext|> inside <|startoftext|>", "ｶﾀｶﾅ half-width",
    "\x1b[31mred\x1b[0m terminal escapes", "bell\x07 and nul", "em—dash … ellipsis ½ ™ ©", "‚low‘ „quotes“",
    "  leading and trailing spaces  ", "UPPER lower MiXeD 123 4.5", "x" * 300, " ".join(["long prompt"] * 60),
    "a photo of a cat", "“Hello, World!” said the sign", "naïve résumé façade", "¿Qué? ¡Sí!", "a\u00adsoft hyphen",
    "Ω ohm sign and Å angstrom sign", "ｸﾞﾗﾌｨｯｸ", "quote at the end’"]


def test_hps_text_equals_open_clip_tokenize(tmp_path, monkeypatch):
    """The HPS tokenizer == open_clip's tokenize with ftfy on hard prompts; without ftfy many would differ, so a
    missing ftfy is a one-line error."""
    path = clip_vocab_source().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_openclip_tokenizer_ftfy", path)
    open_clip_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(open_clip_tokenizer)              # with the real ftfy installed
    ours = scorer_nets.openclip_tokenizer(write_clip_tokenizer_folder(tmp_path / "tok"))(HARD_PROMPTS)
    want = open_clip_tokenizer.tokenize(HARD_PROMPTS)
    assert ours.shape == want.shape == (len(HARD_PROMPTS), 77)
    assert [i for i in range(len(HARD_PROMPTS)) if not torch.equal(ours[i], want[i])] == []
    no_ftfy = openclip_tokenizer_module().tokenize(HARD_PROMPTS)
    differ = sum(not torch.equal(a, b) for a, b in zip(no_ftfy, want))
    print(f"HPS text: {len(HARD_PROMPTS)} hard prompts equal to open_clip's; {differ} would differ without ftfy")
    assert differ >= 12
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ValueError, match=r"ftfy.fix_text, which is not installed \(pip install ftfy\)$"):
        scorer_nets.openclip_tokenizer(tmp_path / "tok")


def test_bootstrap_win_rate_known_answers():
    assert eval.bootstrap_win_rate([2, 3, 4], [1, 1, 1]) == (1.0, 1.0, 1.0)
    assert eval.bootstrap_win_rate([1, 1, 1, 1], [1, 1, 1, 1]) == (0.5, 0.5, 0.5)
    rate, lo, hi = eval.bootstrap_win_rate([2, 1] * 50, [1, 1] * 50, n=2000)      # half wins, half ties: 0.75
    # the bootstrap of a mean of 100 outcomes in {1, 0.5}: sd = 0.25 / sqrt(100) = 0.025, so about +-0.049
    assert rate == 0.75 and 0.69 < lo < 0.72 and 0.78 < hi < 0.81
    once, again = (eval.bootstrap_win_rate([0, 1, 2], [1, 1, 1], seed=5) for _ in range(2))
    assert once == again
    with pytest.raises(ValueError):
        eval.bootstrap_win_rate([1, 2], [1])


def test_frechet_distance_matches_scipy():
    """FID's formula against scipy.linalg.sqrtm, with well-conditioned covariances (N > D); finite and >= 0 with
    fewer images than dimensions; ~0 for a set against itself; at least 2 images per set."""
    g = np.random.default_rng(0)
    a = g.normal(size=(400, 12)) @ g.normal(size=(12, 12))
    b = 0.7 * g.normal(size=(300, 12)) @ g.normal(size=(12, 12)) + 0.5
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    want = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    got = eval.frechet_distance(a, b)
    print(f"Fréchet distance: {got:.6f} vs scipy {want:.6f}, relative error {abs(got - want) / want:.1e}")
    assert abs(got - want) / want < 1e-6
    few = eval.frechet_distance(g.normal(size=(5, 40)), g.normal(size=(4, 40)) + 1)
    assert np.isfinite(few) and few > 0 and abs(eval.frechet_distance(a, a)) < 1e-8 * want
    with pytest.raises(ValueError, match="N, M >= 2"):
        eval.frechet_distance(a[:1], b)


def test_eval_cli_end_to_end(tmp_path, hub, tuned_unet, clip_folder, hps_folder, aesthetic_folder, capsys):
    """`python eval.py`: base and tuned images from the same seeds, all four scorers on tiny local models; the
    report's scores are the scorers' on the saved images, the win rates are the bootstrap's. In this process: an
    unknown scorer is a one-line error; --lora scores adapters the same way."""
    base = hub["sd15"]
    (tmp_path / "prompts.txt").write_text("a red circle on a blue background\na green square on a white background\n"
                                          "a blue triangle on a red background\na white circle on a green background\n")
    out = tmp_path / "eval"
    r = run_cli(["eval.py", "--model", str(base), "--unet", str(tuned_unet), "--prompts",
                 str(tmp_path / "prompts.txt"), "--num", "3", "--steps", "2", "--guidance", "3", "--out", str(out),
                 "--scorer-model", f"pickscore={clip_folder}", "--scorer-model", f"clip={clip_folder}",
                 "--scorer-model", f"hps={hps_folder[0]}", "--scorer-model", f"aesthetic={aesthetic_folder[0]}",
                 "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 3 and list(report["scorers"]) == ["pickscore", "hps", "aesthetic", "clip"]
    folders = {"hps": hps_folder[0], "aesthetic": aesthetic_folder[0]}
    for name, s in report["scorers"].items():
        scorer = eval.load_scorer(name, folders.get(name, clip_folder))
        for label in ("base", "tuned"):
            ims = [Image.open(out / "images" / label / f"{i:05d}.png") for i in range(3)]
            assert rel_err(torch.tensor(s[label]), scorer(ims, report["prompts"])) < 1e-5
        assert (s["win_rate"], s["win_lo"], s["win_hi"]) == eval.bootstrap_win_rate(s["tuned"], s["base"])
        assert s["base"] != s["tuned"]
    md = (out / "report.md").read_text()
    assert "| PickScore |" in md and "| HPSv2.1 (x100) |" in md and md.count("\n|") == 6
    w, h, left, _, _ = sample.grid_layout((32, 32), ["base", "tuned"])
    grid = Image.open(out / "wins_losses.png")
    assert grid.size[0] == left + 3 * w and grid.size[1] > 2 * h
    with pytest.raises(SystemExit) as bad:
        eval.main(["--model", str(base), "--unet", str(tuned_unet), "--prompts", str(tmp_path / "prompts.txt"),
                   "--out", str(out), "--scorers", "pickscore,nope"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "nope" in err and "Traceback" not in err
    # --lora: the tuned model as adapters on --model's UNet (non-zero B), scored the same way
    adapted = unet.load_sd(str(base)).unet
    random_lora(adapted, 4, std=0.5)
    (tmp_path / "lora").mkdir()
    lora.save_lora(adapted, tmp_path / "lora" / lora.LORA_FILE)
    eval.main(["--model", str(base), "--lora", str(tmp_path / "lora"), "--prompts", str(tmp_path / "prompts.txt"),
               "--num", "2", "--steps", "2", "--out", str(tmp_path / "eval-lora"), "--scorers", "clip",
               "--scorer-model", f"clip={clip_folder}", "--device", "cpu"])
    s = json.loads((tmp_path / "eval-lora" / "report.json").read_text())["scorers"]["clip"]
    assert s["base"] != s["tuned"]


def test_eval_cli_paper_table_text_alignment_and_style_fd(tmp_path, hub, tuned_unet, clip_folder, blip_folder,
                                                           sbert_folder, capsys):
    """The Diffusion-DPO paper's DrawBench table in one eval.py command (text alignment through the CLI's code, the
    paper's numbers in their columns), and --style-ref: report.json's style_fd for base and tuned, finite, equal to
    the FD of the saved images' CLIP features; the toy's thumbnail features."""
    (tmp_path / "prompts.txt").write_text("a red cube on a blue table\na photo of a cat\na green dog in the garden\n")
    (tmp_path / "style").mkdir()
    for i, im in enumerate(sample_images(seed=9)):
        im.save(tmp_path / "style" / f"{i}.png")
    out = tmp_path / "eval"
    eval.main(["--model", str(hub["sd15"]), "--unet", str(tuned_unet), "--prompts", str(tmp_path / "prompts.txt"),
               "--steps", "2", "--guidance", "3", "--out", str(out), "--scorers", "text-alignment,clip",
               "--scorer-model", f"text-alignment={sbert_folder}", "--captioner", str(blip_folder),
               "--scorer-model", f"clip={clip_folder}", "--style-ref", str(tmp_path / "style"), "--device", "cpu"])
    printed = capsys.readouterr().out
    print(printed[-1500:])
    report = json.loads((out / "report.json").read_text())
    ims = {label: [Image.open(out / "images" / label / f"{i:05d}.png") for i in range(3)]
           for label in ("base", "tuned")}
    s = report["scorers"]["text-alignment"]
    scorer = eval.load_scorer("text-alignment", str(sbert_folder), captioner=str(blip_folder))
    for label in ("base", "tuned"):
        assert (torch.tensor(s[label]) - scorer(ims[label], report["prompts"])).abs().max() < 1e-5
    fd, clip = report["style_fd"], eval.load_scorer("clip", str(clip_folder))
    ref = [Image.open(tmp_path / "style" / f"{i}.png").convert("RGB") for i in range(6)]
    for label in ("base", "tuned"):
        want = eval.frechet_distance(clip.image_features(ref), clip.image_features(ims[label]))
        assert np.isfinite(fd[label]) and abs(fd[label] - want) <= 1e-6 * want
    assert fd["images"] == 6 and fd["base"] != fd["tuned"]
    md = (out / "report.md").read_text()
    assert "| Text alignment (SBERT) |" in md and "| 0.6075 | 0.5720 |" in md and "Style FD to" in md
    assert "| Text alignment (SBERT) |" in printed and "| CLIP score |" in printed and "| - | - |" in md
    toy = eval.style_fd(ref, {"base": ims["base"]}, toy=True)
    thumbs = lambda xs: np.stack([np.asarray(x.convert("RGB").resize((8, 8), Image.BOX)) for x in xs]) / 255  # noqa
    want = eval.frechet_distance(thumbs(ref).reshape(6, -1), thumbs(ims["base"]).reshape(3, -1))
    assert toy["features"] == "8x8 RGB thumbnail" and abs(toy["base"] - want) <= 1e-9 * want


def test_choice_model_relabels_pairs(tmp_path, hub, shard, clip_folder):
    """--choice-model (AI feedback): each pair is put in the reward model's order (here CLIP score with a random-weight
    CLIP), the same images either way; the trainer runs on the relabelled stream and starts at ln 2."""
    scorer = eval.load_scorer("clip", str(clip_folder))
    pil = lambda x: Image.fromarray(((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())  # noqa: E731
    plain = data.open_pairs(str(shard), resolution=32, flip=False)
    relabelled = data.open_pairs(str(shard), resolution=32, flip=False, relabel=eval.relabeller(f"clip={clip_folder}"))
    reversed_ = data.open_pairs(str(shard), resolution=32, flip=False, relabel=lambda caption, x: x[::-1])
    for s in range(10):
        a, b, r = plain.item(s), relabelled.item(s), reversed_.item(s)
        assert a["key"] == b["key"] == r["key"]
        assert torch.equal(r["chosen"], a["rejected"]) and torch.equal(r["rejected"], a["chosen"])
        first, second = scorer([pil(b["chosen"]), pil(b["rejected"])], [b["caption"]] * 2).tolist()
        assert first > second
        plain_first, plain_second = scorer([pil(a["chosen"]), pil(a["rejected"])], [a["caption"]] * 2).tolist()
        expect = (a["chosen"], a["rejected"]) if plain_first > plain_second else (a["rejected"], a["chosen"])
        assert torch.equal(b["chosen"], expect[0]) and torch.equal(b["rejected"], expect[1])
    out = tmp_path / "ai"
    diffdpo.train(diffdpo.TrainConfig(model=str(hub["sd15"]), data=str(shard), out=str(out), resolution=32,
                                      batch_size=2, max_steps=2, choice_model=f"clip={clip_folder}", device="cpu",
                                      samples=False))
    assert abs(read_metrics(out)[0]["loss"] - math.log(2)) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# LoRA (lora.py): our adapters against diffusers + peft, the trainer's --lora-rank, sample.py --lora


LORA_ALL = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2"


@pytest.mark.parametrize("kind,targets", [("sd15", LORA_ALL), ("sdxl", LORA_ALL + ",proj_in,proj_out")])
def test_lora_file_matches_diffusers(tmp_path, hub, kind, targets):
    """Adapters with random non-zero B and alpha = 2 r, written by save_lora: diffusers (pipeline.load_lora_weights
    for SD1.5, UNet2DConditionModel.load_lora_adapter for SDXL) computes the same UNet output as ours, unmerged and
    merged (load_sd(lora=)); the adapters' own contribution agrees too, so a wrong alpha / r would fail."""
    model = unet.load_sd(str(hub[kind])).unet
    names = random_lora(model, 4, 8, targets, std=0.05)
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    lora.save_lora(model, tmp_path / lora.LORA_FILE)
    x, t, ctx, added = unet_inputs(model)
    with torch.no_grad():
        ours = model(x, t, ctx, **added)
        with lora.lora_disabled(model):
            base = model(x, t, ctx, **added)
        merged = unet.load_sd(str(hub[kind]), lora=tmp_path).unet(x, t, ctx, **added)
        if kind == "sd15":
            pipe = StableDiffusionPipeline.from_pretrained(hub[kind], safety_checker=None)
            pipe.load_lora_weights(tmp_path)
            ref = pipe.unet
        else:
            ref = UNet2DConditionModel.from_pretrained(hub[kind], subfolder="unet")
            ref.load_lora_adapter(str(tmp_path / lora.LORA_FILE), prefix="unet")
        theirs = ref_eps(ref, x, t, ctx, added)
    n_ref = sum(1 for n, _ in ref.named_modules() if n.endswith(".lora_A.default_0") or n.endswith(".lora_A.default"))
    print(f"{kind}: {len(names)} layers; ours vs diffusers {rel_err(ours, theirs):.1e}, adapter contribution "
          f"{rel_err(ours - base, theirs - base):.1e}, merged {rel_err(merged, ours):.1e}; |lora| / |base| "
          f"{rel_err(ours, base):.2f}")
    assert n_ref == len(names)
    assert rel_err(ours, base) > 0.05                     # the adapters matter
    assert rel_err(ours, theirs) < 1e-4 and rel_err(ours - base, theirs - base) < 1e-3
    assert rel_err(merged, ours) < 1e-4


def test_mmdit_lora_file_matches_diffusers(tmp_path):
    """An MMDiT's adapters (the attention projections of both streams, diffusers' SD3 LoRA targets; random B, alpha
    = 2 r) written by save_lora with the `transformer.` prefix: SD3Transformer2DModel.load_lora_adapter (what
    StableDiffusion3Pipeline.load_lora_weights calls) computes the same output as ours; load_lora reads it back."""
    cfg = dict(mmdit.TINY_MMDIT, dual_attention_layers=[])
    ref = diffusers_mmdit(cfg)
    ours = mmdit.MMDiT(mmdit.MMDiTConfig.from_dict(cfg))
    ours.load_state_dict(ref.state_dict())
    names = random_lora(ours, 4, 8, lora.SD3_LORA_TARGETS, std=0.3)
    lora.save_lora(ours, tmp_path / lora.LORA_FILE)
    assert all(k.startswith("transformer.transformer_blocks.") for k in load_file(tmp_path / lora.LORA_FILE))
    x, t, ctx, pooled = mmdit_inputs(cfg, (8, 8), 6)
    with torch.no_grad():
        mine = ours(x, t, ctx, pooled)
        with lora.lora_disabled(ours):
            base = ours(x, t, ctx, pooled)
        ref.load_lora_adapter(str(tmp_path / lora.LORA_FILE), prefix="transformer")
        theirs = ref(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        again = lora.load_lora(mmdit.MMDiT(mmdit.MMDiTConfig.from_dict(cfg)).requires_grad_(False), tmp_path)
        again.load_state_dict({k: v for k, v in ours.state_dict().items() if ".lora_" not in k}, strict=False)
        back = again(x, t, ctx, pooled)
    print(f"MMDiT LoRA, {len(names)} layers: ours vs diffusers {rel_err(mine, theirs):.1e}, adapter contribution "
          f"{rel_err(mine - base, theirs - base):.1e}; |lora| / |base| {rel_err(mine, base):.2f}")
    assert len(names) == 8 * cfg["num_layers"] - 1 and rel_err(mine, base) > 0.05     # the last block: no to_add_out
    assert rel_err(mine, theirs) < 1e-5 and rel_err(mine - base, theirs - base) < 1e-4 and rel_err(back, mine) < 1e-6


def test_lora_targets_and_file_errors(tmp_path, hub):
    model = unet.load_sd(str(hub["sd15"])).unet
    with pytest.raises(unet.LoadError, match="1x1 convolutions"):
        lora.add_lora(model, 4, targets="proj_in")
    with pytest.raises(unet.LoadError, match="'to_z'"):
        lora.add_lora(model, 4, targets="to_q,to_z")
    with pytest.raises(unet.LoadError, match="LoRA file not found"):
        lora.load_lora(model, tmp_path)
    save_file({"text_encoder.x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(unet.LoadError, match="text_encoder.x"):
        lora.load_lora(model, tmp_path / "te.safetensors")


def lora_args(hub, shard, out, *extra):
    return train_args(hub, shard, out, "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", LORA_ALL,
                      "--lr", "1e-3", "--no-samples", *extra)


def test_train_lora_end_to_end(tmp_path, hub, shard):
    """--lora-rank: the printed trainable count is peft's for the same targets; step 0 is the base (loss ln 2);
    OUT/pytorch_lora_weights.safetensors loads in diffusers and gives the adapters-applied output; checkpoint.pt
    holds only the adapters; 2 steps + resume to 4 == 4 straight (exactly); --merge-lora's OUT/unet/ (at the last
    step, or on a finished run) equals the adapters applied."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run_here(lora_args(hub, shard, straight, "--max-steps", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(straight)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6 and rows[0]["implicit_acc"] == 0.0
    assert rows[0]["ref_mse_w"] == rows[0]["mse_w"] and rows[-1]["ref_mse_w"] != rows[-1]["mse_w"]

    ref = UNet2DConditionModel.from_pretrained(hub["sd15"], subfolder="unet")
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_ALL.split(",")))
    n_peft = sum(p.numel() for n, p in ref.named_parameters() if ".lora_" in n)
    assert f"{n_peft} trainable parameters" in r.stdout, r.stdout[-2000:]

    adapters = load_file(straight / lora.LORA_FILE)
    ckpt = torch.load(straight / "checkpoint.pt", weights_only=False)
    n_layers = sum(1 for n, _ in ref.named_modules() if n.endswith(".lora_A.default"))
    assert set(ckpt["unet"]) == {k[len("unet."):] for k in adapters} and len(adapters) == 2 * n_layers
    assert min(v.abs().max().item() for k, v in adapters.items() if "lora_B" in k) > 0
    assert not (straight / "unet").exists()

    assert run_here(lora_args(hub, shard, resumed, "--max-steps", "2")).returncode == 0
    r = run_here(lora_args(hub, shard, resumed, "--max-steps", "4", "--merge-lora"))
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    assert max_diff(load_file(resumed / lora.LORA_FILE), adapters) == 0.0
    r = run_here(lora_args(hub, shard, straight, "--max-steps", "4", "--merge-lora"))  # a finished run: merge only
    assert r.returncode == 0 and "already at step 4" in r.stdout, r.stderr[-3000:]
    assert max_diff(unet_weights(straight), unet_weights(resumed)) == 0.0

    sharded = tmp_path / "fsdp"                   # `torchrun` with --fsdp (and recomputed activations), 2 x 1 == 1 x 2
    args = lora_args(hub, shard, sharded, "--max-steps", "4", "--fsdp", "--grad-checkpointing")
    args[args.index("--batch-size") + 1] = "1"
    r = run_cli(args, torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(read_metrics(sharded), rows, strict=True):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-3
    two = load_file(sharded / lora.LORA_FILE)      # the adapters gathered whole; B, from zero, is all update
    assert set(two) == set(adapters) and (sharded / "checkpoint-000004").is_dir()
    up = [k for k in two if "lora_B" in k]
    assert sum((two[k] - adapters[k]).norm() ** 2 for k in up) < 1e-4 * sum(adapters[k].norm() ** 2 for k in up)

    sd = unet.load_sd(str(hub["sd15"]))
    lora.load_lora(sd.unet, straight)
    x, t, ctx, added = unet_inputs(sd.unet, seed=1)
    with torch.no_grad():
        ours = sd.unet(x, t, ctx)
        with lora.lora_disabled(sd.unet):
            base = sd.unet(x, t, ctx)
        merged = unet.load_component(straight / "unet", "unet")(x, t, ctx)
        merged_diffusers = ref_eps(UNet2DConditionModel.from_pretrained(straight, subfolder="unet"), x, t, ctx, {})
        pipe = StableDiffusionPipeline.from_pretrained(hub["sd15"], safety_checker=None)
        pipe.load_lora_weights(straight)
        theirs = ref_eps(pipe.unet, x, t, ctx, {})
    print(f"trained adapters: |lora - base| / |base| {rel_err(ours, base):.1e}; ours vs diffusers "
          f"{rel_err(ours, theirs):.1e} (contribution {rel_err(ours - base, theirs - base):.1e}); merged folder "
          f"{rel_err(merged, ours):.1e}, in diffusers {rel_err(merged_diffusers, ours):.1e}")
    assert rel_err(ours, base) > 1e-3
    assert rel_err(ours, theirs) < 1e-4 and rel_err(ours - base, theirs - base) < 1e-2
    assert rel_err(merged, ours) < 1e-4 and rel_err(merged_diffusers, ours) < 1e-4


def test_sample_cli_lora(tmp_path, hub):
    """sample.py --lora FILE --compare (in this process): base and adapters-merged rows from the same seeds; the
    second differs."""
    model = unet.load_sd(str(hub["sd15"])).unet
    random_lora(model, 4, std=0.2)
    lora.save_lora(model, tmp_path / "mine.safetensors")
    sample.main(["--model", str(hub["sd15"]), "--lora", str(tmp_path / "mine.safetensors"), "--prompt", "a red cube",
                 "--compare", "--out", str(tmp_path / "grid.png"), "--steps", "2", "--height", "32", "--width", "32",
                 "--device", "cpu"])
    base, tuned = grid_rows(tmp_path / "grid.png", ["base", "tuned"], ["a red cube"])
    assert np.abs(base - tuned).max() > 10


# ----------------------------------------------------------------------------------------------------------------
# LCM: the latent consistency sampler, LCM UNets (time_cond_proj_dim), kohya LoRA files with convs (LCM-LoRA's
# format), stacked LoRAs (a DPO LoRA + LCM-LoRA), DPO on an LCM UNet


# the layers the published LCM-LoRAs adapt: the target modules of diffusers' train_lcm_distill_lora_*.py
LCM_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                   "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def kohya_lora(model, seed=None, rank=64, attention_alpha=None):
    """A kohya-format LoRA on every LCM-LoRA layer of `model`, in fp16 as the published files: per layer
    lora_unet_<name with _ for .>.lora_down.weight (r, in[, k, k]), .lora_up.weight (out, r[, 1, 1]) and .alpha.
    With a seed: random weights, ranks 2..4 and alphas 1..8 (`attention_alpha` for every transformer-block layer, if
    given); without: rank `rank` and alpha 8, A and B on the meta device."""
    g = torch.Generator().manual_seed(seed or 0)
    out = {}
    for n, m in model.named_modules():
        if not any(n == t or n.endswith("." + t) for t in LCM_LORA_LAYERS):
            continue
        r = rank if seed is None else int(torch.randint(2, 5, (1,), generator=g))
        conv = isinstance(m, nn.Conv2d)
        shapes = [(r, m.in_channels, *m.kernel_size), (m.out_channels, r, 1, 1)] if conv else \
            [(r, m.in_features), (m.out_features, r)]
        key = "lora_unet_" + n.replace(".", "_")
        for part, shape, std in zip(("lora_down", "lora_up"), shapes, (math.prod(shapes[0][1:]) ** -0.5, 0.1)):
            w = torch.empty(shape, device="meta") if seed is None else torch.randn(shape, generator=g) * std
            out[f"{key}.{part}.weight"] = w.half()
        alpha = 8.0 if seed is None else float(torch.randint(1, 9, (1,), generator=g))
        alpha = attention_alpha if attention_alpha and ".transformer_blocks." in n else alpha
        out[f"{key}.alpha"] = torch.tensor(alpha).half()
    return out


def safetensors_size(shapes, metadata=None):
    """The byte size of a .safetensors file of fp16 tensors {name: shape}: 8 + its JSON header (tensors in name order,
    padded with spaces to a multiple of 8) + the data."""
    header, offset = {}, 0
    for k in sorted(shapes):
        n = 2 * math.prod(shapes[k])
        header[k] = dict(dtype="F16", shape=list(shapes[k]), data_offsets=[offset, offset + n])
        offset += n
    text = json.dumps({**header, **({"__metadata__": metadata} if metadata else {})}, separators=(",", ":"))
    return 8 + -(-len(text) // 8) * 8 + offset


def lcm_pipeline(folder, hub):
    """A tiny LCM pipeline in the Hub layout (as SimianLuo/LCM_Dreamshaper_v7): the sd15 test hub's VAE, text encoder
    and tokenizer, an LCM UNet (time_cond_proj_dim 256) saved by diffusers, LCMScheduler's config, and
    model_index.json naming LatentConsistencyModelPipeline."""
    shutil.copytree(hub["sd15"], folder)
    torch.manual_seed(4)
    model = UNet2DConditionModel(**SD15_TEST["unet"], time_cond_proj_dim=256)
    for n, p in model.named_parameters():
        if p.ndim == 1:
            p.data.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.1)
    shutil.rmtree(folder / "unet")
    model.save_pretrained(folder / "unet")
    scheduler = LCMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "timestep_spacing"})
    scheduler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_lcm_sampler_matches_diffusers(hub):
    """The LCM sampler on the SD1.5 test hub against StableDiffusionPipeline with LCMScheduler: the timesteps, and
    images within 2/255 at guidance 1.0 (no CFG) and 1.5 (CFG) from the same latents and ONE generator for the step
    noise; without latents, from per-image generators (ours: one seed per image). The step noise matters (another
    seed moves pixels far more than 2/255)."""
    for m in (50, 20):
        for n in (1, 2, 3, 4, 8, m):
            ref = LCMScheduler(original_inference_steps=m)
            ref.set_timesteps(n)
            assert torch.equal(sample.lcm_timesteps(dict(original_inference_steps=m), n), ref.timesteps), (m, n)
    sd = unet.load_sd(str(hub["sd15"]))
    pipe = reference_pipe(hub["sd15"], "sd15")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    prompts = ["a red cube", "two blue spheres on grass"]
    latents = sample.initial_latents(sd, 2, 32, 32, seed=5)
    worst = {}
    for guidance in (1.0, 1.5):
        ours = sample.generate(sd, prompts, steps=4, guidance=guidance, latents=latents, seed=3, height=32, width=32,
                               sampler="lcm")
        theirs = pipe(prompts, num_inference_steps=4, guidance_scale=guidance, latents=latents.clone(), height=32,
                      width=32, generator=torch.Generator().manual_seed(3)).images
        worst[guidance] = pixel_diff(ours, theirs)
    ours = sample.generate(sd, prompts, steps=3, guidance=1.5, seed=11, height=32, width=32, sampler="lcm")
    theirs = pipe(prompts, num_inference_steps=3, guidance_scale=1.5, height=32, width=32,
                  generator=[torch.Generator().manual_seed(11 + i) for i in range(2)]).images
    other_seed = sample.generate(sd, prompts, steps=3, guidance=1.5, seed=12, height=32, width=32, sampler="lcm")
    print(f"LCM vs diffusers: max pixel difference {worst} (guidance: /255), per-image seeds "
          f"{pixel_diff(ours, theirs)}/255; another seed {pixel_diff(ours, other_seed)}/255")
    assert max(worst.values()) <= 2 and pixel_diff(ours, theirs) <= 2 and pixel_diff(ours, other_seed) > 20
    with pytest.raises(ValueError, match="original_inference_steps"):
        sample.generate(sd, prompts, steps=51, height=32, width=32, sampler="lcm")


def test_lcm_unet_and_pipeline_match_diffusers(tmp_path, hub):
    """An LCM pipeline folder loads strictly (time_embedding.cond_proj); its UNet with timestep_cond equals diffusers'
    and needs it; the guidance embedding is get_guidance_scale_embedding; generate() takes the LCM sampler from the
    scheduler config and matches LatentConsistencyModelPipeline (no CFG, w - 1 embedded) within 2/255."""
    folder = lcm_pipeline(tmp_path / "lcm", hub)
    sd = unet.load_sd(str(folder))
    ref = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    assert tuple(sd.unet.state_dict()["time_embedding.cond_proj.weight"].shape) == (32, 256)
    w = torch.tensor([7.5, 0.0, 2.25])
    for dim in (256, 33):
        assert rel_err(sample.guidance_embedding(w, dim), ref.get_guidance_scale_embedding(w, dim)) < 1e-6
    x, t, ctx, _ = unet_inputs(sd.unet)
    emb = sample.guidance_embedding(w[:2], 256)
    with torch.no_grad():
        ours = sd.unet(x, t, ctx, timestep_cond=emb)
        theirs = ref.unet(x, t, encoder_hidden_states=ctx, timestep_cond=emb).sample
        moved = sd.unet(x, t, ctx, timestep_cond=sample.guidance_embedding(w[:2] + 1, 256))
    unet_err = rel_err(ours, theirs)
    assert unet_err < 1e-4 and rel_err(moved, ours) > 1e-3, (unet_err, rel_err(moved, ours))
    with pytest.raises(unet.LoadError, match="timestep_cond"):
        sd.unet(x, t, ctx)
    prompts, latents = ["a red cube", "a photo of a cat"], sample.initial_latents(sd, 2, 32, 32, seed=2)
    worst = {}
    for guidance in (8.5, 1.0):
        ours = sample.generate(sd, prompts, steps=4, guidance=guidance, latents=latents, seed=6, height=32, width=32)
        theirs = ref(prompts, num_inference_steps=4, guidance_scale=guidance, latents=latents.clone(), height=32,
                     width=32, generator=torch.Generator().manual_seed(6)).images
        worst[guidance] = pixel_diff(ours, theirs)
    print(f"LCM UNet: rel. err {unet_err:.1e}; pipeline max pixel difference {worst} (guidance: /255)")
    assert max(worst.values()) <= 2


def test_lcm_lora_published_layouts(tmp_path, hub):
    """The published LCM-LoRA files, latent-consistency/lcm-lora-sdv1-5 and lcm-lora-sdxl
    pytorch_lora_weights.safetensors (134,621,556 and 393,854,592 bytes as the Hub serves them), are to the byte
    kohya files with lora_unet_ + diffusers module names, rank 64, fp16, on the LCM-LoRA layers of the real SD1.5 /
    SDXL UNets (the SD1.5 file with {"format": "pt"} metadata): key names, shapes and dtype fix the size. Every key of
    those layouts loads through our kohya loader onto the real architectures (on the meta device). The size formula
    is checked against safetensors itself on a small file first."""
    small = kohya_lora(unet.load_sd(str(hub["sd15"])).unet, seed=0)
    save_file(small, tmp_path / "small.safetensors", metadata={"format": "pt"})
    shapes = {k: tuple(v.shape) for k, v in small.items()}
    assert (tmp_path / "small.safetensors").stat().st_size == safetensors_size(shapes, {"format": "pt"})
    for kind, published, metadata in [("sd15", 134_621_556, {"format": "pt"}), ("sdxl", 393_854_592, None)]:
        with torch.device("meta"):
            model = unet.UNet(getattr(unet.UNetConfig, kind)())
        layout = kohya_lora(model)
        size = safetensors_size({k: tuple(v.shape) for k, v in layout.items()}, metadata)
        adapters = lora.kohya_adapters(dict(layout), model, kind)
        for name, (a, b, scale) in adapters.items():
            lora.attach(model, name, a, b, scale, kind)
        convs = sum(isinstance(m, lora.LoRAConv2d) for m in model.modules())
        print(f"{kind}: {len(adapters)} layers ({convs} convolutions), {size:,} bytes; published {published:,}")
        assert size == published and len(adapters) == len(layout) // 3 and convs > 0
        assert all(abs(s - 8 / 64) < 1e-9 for _, _, s in adapters.values())


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_kohya_lora_with_convs_matches_diffusers(tmp_path, hub, kind):
    """A kohya file on every layer LCM-LoRA adapts (attention and feed-forward linears; proj_in / proj_out, 1x1 convs
    in the SD1.5 hub and linear in SDXL's; resnet conv1 / conv2 / conv_shortcut / time_emb_proj; down- and upsampler
    3x3 convs), with random ranks and alphas: our UNet output equals diffusers' load_lora_weights, unmerged and
    merged (load_sd(lora=)), and so does the adapters' own contribution (a wrong alpha / r or kernel would fail).
    diffusers 0.42 ignores a transformer-block layer's alpha when it differs from the file's most common one (its
    alpha_pattern keeps stale `attn1.processor.to_q_lora` names), so those share one alpha here; with every alpha
    random, our merged weights are checked against W + (alpha / r) up . down layer by layer instead."""
    model = unet.load_sd(str(hub[kind])).unet
    save_file(kohya_lora(model, seed=1, attention_alpha=3.0), tmp_path / "k.safetensors")
    lora.load_lora(model, tmp_path / "k.safetensors")
    convs = sum(isinstance(m, lora.LoRAConv2d) for m in model.modules())
    x, t, ctx, added = unet_inputs(model)
    with torch.no_grad():
        ours = model(x, t, ctx, **added)
        with lora.lora_disabled(model):
            base = model(x, t, ctx, **added)
        merged = unet.load_sd(str(hub[kind]), lora=tmp_path / "k.safetensors").unet(x, t, ctx, **added)
        pipe = reference_pipe(hub[kind], kind)
        pipe.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
        theirs = ref_eps(pipe.unet, x, t, ctx, added)
    n_ref = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A.default_0"))
    print(f"{kind}: {n_ref} layers ({convs} convolutions); ours vs diffusers {rel_err(ours, theirs):.1e}, adapter "
          f"contribution {rel_err(ours - base, theirs - base):.1e}, merged {rel_err(merged, theirs):.1e}; "
          f"|lora| / |base| {rel_err(ours, base):.2f}")
    assert n_ref == sum(isinstance(m, lora.LoRALinear) for m in model.modules()) and convs >= 10
    assert rel_err(ours, base) > 0.05
    assert rel_err(ours, theirs) < 1e-4 and rel_err(ours - base, theirs - base) < 1e-3
    assert rel_err(merged, theirs) < 1e-4
    base = unet.load_sd(str(hub[kind])).unet
    weights = kohya_lora(base, seed=4)
    save_file(weights, tmp_path / "random.safetensors")
    merged = unet.load_sd(str(hub[kind]), lora=tmp_path / "random.safetensors")
    worst = 0.0
    for name, w in merged.unet.state_dict().items():
        key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
        if key + ".alpha" in weights:
            down, up = weights[key + ".lora_down.weight"].float(), weights[key + ".lora_up.weight"].float()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * float(weights[key + ".alpha"]) / len(down)
            worst = max(worst, rel_err(w - base.state_dict()[name], delta))
    assert worst < 1e-5, worst


def test_stacked_loras_match_diffusers_and_sample_cli(tmp_path, hub):
    """A DPO LoRA in our peft format (save_lora) and an LCM-LoRA-like kohya file with convs, stacked: load_sd(lora=[a,
    b]) (merged in turn, in either order) equals diffusers with both adapters at weight 1.0, and neither alone does;
    sample.py --lora a --lora b --sampler lcm --steps 4 (one image per UNet call) draws the images render() draws in
    one batch. Files this loader cannot apply (text-encoder keys, SGM names, DoRA, a shape that does not fit) are
    one-line errors naming the key or layer."""
    model = unet.load_sd(str(hub["sd15"])).unet
    save_file(kohya_lora(model, seed=2, attention_alpha=5.0), tmp_path / "lcm.safetensors")
    random_lora(model, 4, 8, LORA_ALL, std=0.05, seed=3)
    lora.save_lora(model, tmp_path / "dpo" / lora.LORA_FILE)
    files = [tmp_path / "dpo", tmp_path / "lcm.safetensors"]
    x, t, ctx, _ = unet_inputs(model)
    with torch.no_grad():
        ours = unet.load_sd(str(hub["sd15"]), lora=files).unet(x, t, ctx)
        swapped = unet.load_sd(str(hub["sd15"]), lora=files[::-1]).unet(x, t, ctx)
        alone = unet.load_sd(str(hub["sd15"]), lora=files[1]).unet(x, t, ctx)
        pipe = reference_pipe(hub["sd15"], "sd15")
        pipe.load_lora_weights(files[0], adapter_name="dpo")
        pipe.load_lora_weights(str(tmp_path), weight_name="lcm.safetensors", adapter_name="lcm")
        pipe.set_adapters(["dpo", "lcm"], [1.0, 1.0])
        theirs = ref_eps(pipe.unet, x, t, ctx, {})
    print(f"stacked: ours vs diffusers {rel_err(ours, theirs):.1e}, the other order {rel_err(swapped, theirs):.1e}; "
          f"LCM-like LoRA alone {rel_err(alone, theirs):.2f}")
    assert rel_err(ours, theirs) < 1e-4 and rel_err(swapped, theirs) < 1e-4 and rel_err(alone, theirs) > 1e-2

    sample.main(["--model", str(hub["sd15"]), "--lora", str(files[0]), "--lora", str(files[1]), "--sampler", "lcm",
                 "--steps", "4", "--guidance", "1", "--prompt", "a red cube", "--prompt", "a blue ball", "--out",
                 str(tmp_path / "grid.png"), "--height", "32", "--width", "32", "--batch-size", "1", "--device", "cpu"])
    sd = unet.load_sd(str(hub["sd15"]), lora=files)
    want = sample.render(sd, sd.unet, ["a red cube", "a blue ball"], [0, 1], batch_size=2, steps=4, guidance=1.0,
                         height=32, width=32, sampler="lcm")
    (row,) = grid_rows(tmp_path / "grid.png", ["tuned"], ["a red cube", "a blue ball"])
    scaled = [np.asarray(im.resize((sample.MIN_CELL,) * 2, Image.NEAREST)) for im in want]
    assert np.abs(row - np.concatenate(scaled, axis=1)).max() <= 2
    conv_in = dict(lora_down=torch.zeros(1, 4, 3, 3), lora_up=torch.zeros(32, 1, 1, 1))
    for bad, match in [({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 1)},
                        "text-encoder adapters"),
                       ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(1, 1)}, "SGM names"),
                       ({**{f"lora_unet_conv_in.{k}.weight": v for k, v in conv_in.items()},
                         "lora_unet_conv_in.dora_scale": torch.ones(32)}, "dora_scale.*not supported"),
                       ({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4), "lora_unet_conv_in.lora_up.weight":
                         torch.zeros(32, 1)}, r"do not fit its Conv2d \(32, 4, 3, 3\)")]:
        save_file(bad, tmp_path / "bad.safetensors")
        with pytest.raises(unet.LoadError, match=match):
            lora.load_lora(unet.load_component(hub["sd15"] / "unet", "unet"), tmp_path / "bad.safetensors")


def test_dpo_on_an_lcm_unet(tmp_path, hub):
    """DPO on an LCM UNet (python diffdpo.py --model LCM_FOLDER --lcm-guidance W): unet_inputs conditions on
    timestep_cond = get_guidance_scale_embedding(W - 1), and the DPO errors are those of diffusers' UNet given it
    (the loss itself is unchanged); another W gives other errors."""
    folder = lcm_pipeline(tmp_path / "lcm", hub)
    sd = unet.load_sd(str(folder))
    ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    batch = dict(chosen=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, rejected=torch.rand(2, 3, 32, 32, generator=g)
                 * 2 - 1, prompts=["a red cube", "a photo of a cat"])
    cfg = diffdpo.TrainConfig.from_args(["--model", str(folder), "--lcm-guidance", "3"])
    latents, cond = diffdpo.unet_inputs(sd, batch, 32, lcm_guidance=cfg.lcm_guidance)
    emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((4,), 2.0), 256)
    assert rel_err(cond["timestep_cond"], emb) < 1e-6
    eps, t = diffdpo.pair_noise([0, 1], latents.shape[1:], 0, 1000)
    abar = sample.alphas_cumprod(sd.scheduler_config)
    with torch.no_grad():
        errors = diffdpo.dpo_errors(sd.unet, sd.unet, latents, cond, eps, t, abar, "epsilon")
        x_t = sample.add_noise(latents, eps.repeat(2, 1, 1, 1), t.repeat(2), abar)
        pred = ref(x_t, t.repeat(2), encoder_hidden_states=cond["context"], timestep_cond=emb).sample
        _, cond_default = diffdpo.unet_inputs(sd, batch, 32)
        other = diffdpo.dpo_errors(sd.unet, sd.unet, latents, cond_default, eps, t, abar, "epsilon")
    want = (pred - eps.repeat(2, 1, 1, 1)).square().mean((1, 2, 3))
    assert rel_err(torch.cat(errors[:2]), want) < 1e-4 and rel_err(torch.cat(other[:2]), want) > 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Diffusion-RPO (rpo.py): the loss and its variants, its B x B matrix over the global batch, image embeddings, style
# pairs


def test_rpo_loss_reduces_to_dpo_and_uses_other_pairs():
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(1, generator=g, dtype=torch.float64) for _ in range(4))
    emb = torch.randn(1, 8, generator=g)
    for beta in (1.0, 5000.0):
        a, acc_a = rpo.rpo_loss(mw, ml, rw, rl, emb, emb, beta, 0.5)
        b, acc_b = diffdpo.dpo_loss(mw, ml, rw, rl, beta)
        assert abs(a.item() - b.item()) < 1e-12 and acc_a == acc_b
    # four pairs: the loss differs from DPO's, and a loser gets gradient from the other pairs' winners
    mw, ml, rw, rl = (torch.rand(4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(4))
    emb = torch.randn(4, 8, generator=g)
    loss, _ = rpo.rpo_loss(mw, ml, rw, rl, emb, emb, 100.0, 0.5)
    assert abs(loss.item() - diffdpo.dpo_loss(mw, ml, rw, rl, 100.0)[0].item()) > 1e-3
    # the same loss written out term by term
    w = torch.softmax(torch.nn.functional.cosine_similarity(emb[:, None], emb[None], dim=-1) / 0.5, dim=-1)
    terms = [-torch.nn.functional.logsigmoid(100.0 * w[i, j] * -0.5 * ((mw[i] - rw[i]) - (ml[j] - rl[j])))
             for i in range(4) for j in range(4)]
    assert abs(loss.item() - (sum(terms) / 16).item()) < 1e-6  # the weights are float32 (cosines computed two ways)
    ml.grad = None
    loss_off = -torch.nn.functional.logsigmoid(100.0 * w[1, 0] * -0.5 * ((mw[1] - rw[1]) - (ml[0] - rl[0])))
    loss_off.backward()
    assert ml.grad[0].abs() > 0


def test_rpo_variants_reduce_to_dpo_with_one_pair():
    """Every variant (tau 0.1 / 0.5 / 1, beta / w_ii, RPO-Diagonal 0.8 and 1) is DPO with one pair; with four,
    RPO-Diagonal is the LLM code's row form written out, diagonal weight 1 is DPO, and the rescaled loss is the
    weighted one with row i's weights divided by w_ii."""
    g = torch.Generator().manual_seed(0)
    one = [torch.rand(1, generator=g, dtype=torch.float64) for _ in range(4)]
    emb = torch.randn(1, 8, generator=g)
    variants = itertools.product((1.0, 5000.0), (0.1, 0.5, 1.0), (0.0, 0.8, 1.0), (False, True))
    for beta, tau, diagonal, rescale in variants:
        loss, acc = rpo.rpo_loss(*one, emb, emb, beta, tau, diagonal, rescale)
        want, want_acc = diffdpo.dpo_loss(*one, beta)
        assert abs(loss.item() - want.item()) < 1e-12 and acc == want_acc
    mw, ml, rw, rl = (torch.rand(4, generator=g, dtype=torch.float64) for _ in range(4))
    emb = torch.randn(4, 8, generator=g)
    logit = lambda i, j: -0.5 * ((mw[i] - rw[i]) - (ml[j] - rl[j]))  # noqa
    terms = lambda w: torch.stack([torch.stack([-F.logsigmoid(100.0 * w[i, j] * logit(i, j))  # noqa
                                                for j in range(4)]) for i in range(4)])      # (4, 4)
    rows = terms(torch.ones(4, 4))
    row_form = torch.stack([0.8 * rows[i, i] + 0.2 * (rows[i].sum() - rows[i, i]) / 3 for i in range(4)]).mean()
    assert abs(rpo.rpo_loss(mw, ml, rw, rl, emb, emb, 100.0, 0.5, diagonal=0.8)[0].item() - row_form.item()) < 1e-12
    dpo4 = diffdpo.dpo_loss(mw, ml, rw, rl, 100.0)[0].item()
    assert abs(rpo.rpo_loss(mw, ml, rw, rl, emb, emb, 100.0, 0.5, diagonal=1.0)[0].item() - dpo4) < 1e-12
    assert abs(row_form.item() - dpo4) > 1e-3
    w = torch.softmax(F.cosine_similarity(emb[:, None], emb[None], dim=-1) / 0.5, dim=-1).double()
    rescaled = terms(w / w.diagonal()[:, None]).mean().item()
    assert abs(rpo.rpo_loss(mw, ml, rw, rl, emb, emb, 100.0, 0.5, rescale=True)[0].item() - rescaled) < 1e-6
    assert abs(rescaled - terms(w).mean().item()) > 1e-3


def test_rpo_shared_noise_is_one_draw_per_global_batch(shard):
    """--rpo-shared-noise: every pair of a global micro-batch gets the same (t, eps), the same on 1 process with
    batch 4 as on each of 2 simulated ranks with batch 2, and a new one for the next micro-batch; without it each
    pair keeps its own draw (DPO's pair_noise of its stream index)."""
    shape, source = (4, 4, 4), data.open_pairs(shard, resolution=32)
    draws = {}
    for shared in (True, False):
        cfg = rpo.RPOConfig(seed=3, rpo_shared_noise=shared, timestep_density="uniform")  # (setup resolves "auto")
        streams = [source.batches(4)] + [source.batches(2, rank=r, world_size=2) for r in range(2)]
        draws[shared] = [[cfg.draw_noise(next(s), shape, 1000) for s in streams] for _ in range(3)]  # (step, stream)
    for step in draws[True]:
        (eps1, t1), (eps_a, t_a), (eps_b, t_b) = step
        assert len(eps1) == 4 and (eps1 == eps1[:1]).all() and (t1 == t1[0]).all()
        assert torch.equal(torch.cat([eps_a, eps_b]), eps1) and torch.equal(torch.cat([t_a, t_b]), t1)
    assert (draws[True][0][0][0][0] - draws[True][1][0][0][0]).abs().max() > 0.5
    for k, step in enumerate(draws[False]):
        (eps1, t1), (eps_a, t_a), (eps_b, t_b) = step
        want = diffdpo.pair_noise(range(4 * k, 4 * k + 4), shape, 3, 1000)
        assert torch.equal(eps1, want[0]) and torch.equal(torch.cat([eps_a, eps_b]), eps1)
        assert (eps1[0] - eps1[1]).abs().max() > 0.5


def test_rpo_cli_two_processes_equal_one(tmp_path, hub, shard):
    """rpo.py reuses the trainer; its B x B matrix spans the global batch: `torchrun --nproc_per_node 2 rpo.py`
    (gloo) == 1 process (here, in this one)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = lambda out, bs: ["rpo.py"] + train_args(hub, shard, out, "--max-steps", "3", "--grad-accum", "1",  # noqa
                                                   "--batch-size", bs, "--beta", "500", "--no-samples")[1:]
    r = run_here(args(one, "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows1 = read_metrics(one)
    assert abs(rows1[0]["loss"] - math.log(2)) < 1e-6
    r = run_cli(args(two, "2"), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(read_metrics(two), rows1, strict=True):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-3
    print(f"rpo 2 vs 1 process: grad norms {[round(r['grad_norm'], 4) for r in read_metrics(two)]} vs "
          f"{[round(r['grad_norm'], 4) for r in rows1]}")


def test_rpo_image_embeddings(tmp_path, hub, shard, clip_folder):
    """rpo.py --rpo-embed image|both: each training image's CLIP embedding (scorer_nets.py's vision tower) rides in
    the batch, equal to transformers' get_image_features (normalized) on the same 8-bit image; the weights from
    images differ from the text ones; with --cache the embeddings are stored with the latents and the run is
    identical to the uncached one."""
    embed = rpo.image_embedder(str(clip_folder))("cpu")
    batch = next(data.open_pairs(str(shard), resolution=32, embed=embed, flip=False).batches(4))
    ref, proc = CLIPModel.from_pretrained(clip_folder).eval(), CLIPImageProcessorPil.from_pretrained(clip_folder)
    images = [eval.to_pil(x) for x in batch["chosen"]]
    with torch.no_grad():
        want = ref.get_image_features(**proc(images, return_tensors="pt"))
    want = F.normalize(want.pooler_output, dim=-1)                      # ours are unit-norm
    assert rel_err(batch["chosen_emb"], want) < 1e-5
    sd = unet.load_sd(str(hub["sd15"]))
    w = {k: rpo.rpo_weights(*rpo.pair_embeddings(k, sd, batch), 0.5) for k in ("text", "image", "both")}
    assert not torch.allclose(w["text"], w["image"], atol=1e-3) and not torch.allclose(w["both"], w["image"], atol=1e-3)
    runs = {}
    for name, extra in (("plain", {}), ("cached", dict(cache=True, cache_dir=str(tmp_path / "cache")))):
        cfg = rpo.RPOConfig(model=str(hub["sd15"]), data=str(shard), out=str(tmp_path / name), resolution=32,
                            batch_size=3, max_steps=3, lr=1e-4, warmup_steps=1, device="cpu", samples=False,
                            rpo_embed="both", rpo_clip=str(clip_folder), **extra)
        diffdpo.train(cfg, rpo.make_pair_loss(cfg), rpo.image_embedder(cfg.rpo_clip))
        runs[name] = unet_weights(tmp_path / name)
        assert abs(read_metrics(tmp_path / name)[0]["loss"] - math.log(2)) < 1e-6
    assert max_diff(runs["plain"], runs["cached"]) == 0.0
    stored = next((tmp_path / "cache").rglob("pairs/*/*.safetensors"))
    with safe_open(str(stored), framework="pt") as f:
        assert {"chosen_emb", "rejected_emb"} <= set(f.keys())


def test_style_pairs_and_rpo_on_them(tmp_path):
    """`rpo.py --data style:FOLDER`: each style image (with its caption file) is preferred over the base model's own
    generation for its caption; the pairs file says so and the RPO run trains on it (ln 2 at step 0)."""
    style = tmp_path / "style"
    style.mkdir()
    prompts = toy.shape_prompts("train")[:6]
    for i, p in enumerate(prompts):
        img = toy.render_shape(p, torch.Generator().manual_seed(i))
        img.save(style / f"{i:02d}.png")
        (style / f"{i:02d}.txt").write_text(p + "\n")
    out = tmp_path / "rpo"
    r = run_here(["rpo.py", "--model", "tiny", "--data", f"style:{style}", "--out", str(out), "--max-steps", "2",
                  "--batch-size", "3", "--device", "cpu", "--sample-steps", "2", "--no-samples"])
    assert r.returncode == 0, r.stderr[-2000:]
    t = pq.read_table(out / "style_pairs.parquet").to_pydict()
    assert t["caption"] == prompts and t["label_0"] == [1.0] * 6
    assert t["jpg_0"][2] == (style / "02.png").read_bytes()
    assert abs(read_metrics(out)[0]["loss"] - math.log(2)) < 1e-6
    (style / "03.txt").unlink()
    with pytest.raises(ValueError, match="03.png has no caption file 03.txt"):
        data.style_items(style)


# ----------------------------------------------------------------------------------------------------------------
# Reliability: checkpoints that cannot run code, resumes that never wedge, runs that stop cleanly, bounded inputs,
# one-line errors


class Evil:
    """Unpickling this runs a command (what a crafted checkpoint.pt could do to a weights_only=False load)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoints_run_no_code_and_damage_is_one_line(tmp_path, hub, shard, dpo_two_steps, monkeypatch):
    """checkpoint.pt loads with weights_only=True: a crafted one runs nothing and stops the run with one line; so do a
    truncated, an empty and a foreign one. A full disk while saving leaves the previous checkpoint intact."""
    out = tmp_path / "evil"
    out.mkdir()
    torch.save({"unet": {}, "step": Evil(tmp_path / "pwned")}, out / "checkpoint.pt")
    r = run_here(train_args(hub, shard, out, "--max-steps", "1"))
    assert r.returncode == 2 and "not a readable diffdpo checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "pwned").exists()
    good = copy_run(dpo_two_steps, tmp_path / "good")
    blob = (good / "checkpoint.pt").read_bytes()
    for name, damaged in [("truncated", blob[: len(blob) // 2]), ("empty", b"")]:
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(UserError, match=f"{name}: not a readable diffdpo checkpoint .*delete it"):
            runs.load_checkpoint(tmp_path / name)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign")
    with pytest.raises(UserError, match="foreign: not a diffdpo checkpoint .no unet, optimizer"):
        runs.load_checkpoint(tmp_path / "foreign")

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        runs.save_checkpoint(good / "checkpoint.pt", {"step": 3})
    assert (good / "checkpoint.pt").read_bytes() == blob and not list(good.glob("*.tmp*"))


def test_resume_policy_lock_and_torn_metrics(tmp_path, hub, shard, dpo_two_steps):
    """Resuming (the session's 2-step run): a "new" setting (--lr) takes effect and is recorded, a "fixed" one
    (--optimizer) is refused in one line; a torn last line in metrics.jsonl is dropped; a second run (a `python
    diffdpo.py` process) on a busy --out is refused, and a lock left by a process that died does not block."""
    out = copy_run(dpo_two_steps, tmp_path / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')                            # a disk that filled up mid-line
    r = run_here(train_args(hub, shard, out, "--max-steps", "3", "--no-samples", "--lr", "3e-4"))
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-2000:]
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["lr"] == pytest.approx(3e-4)
    assert json.loads((out / "config.json").read_text())["lr_used"] == 3e-4
    r = run_here(train_args(hub, shard, out, "--max-steps", "4", "--optimizer", "adafactor"))
    assert r.returncode == 2 and "optimizer='adamw'" in r.stderr and r.stderr.count("\n") == 1
    lock = runs.lock(out)                                         # this process holds --out: for another, it is busy
    r = run_cli(train_args(hub, shard, out, "--max-steps", "4"))
    assert r.returncode == 2 and "in use by another run (pid" in r.stderr and "Traceback" not in r.stderr
    lock.close()
    (out / ".lock").write_text("pid 999999")                       # what a killed run leaves: no lock is held
    assert run_here(train_args(hub, shard, out, "--max-steps", "4", "--no-samples")).returncode == 0


def test_non_finite_steps_are_skipped_then_stop(tmp_path, hub, shard):
    """An absurd learning rate blows the weights up: the non-finite steps are skipped and counted, and the run
    stops with a one-line message after --max-bad-steps of them in a row. It does not overwrite the last checkpoint
    with diverged weights: the checkpoint it names holds finite weights."""
    r = run_here(train_args(hub, shard, tmp_path / "nan", "--max-steps", "20", "--lr", "1e30", "--max-bad-steps", "3"))
    assert r.returncode == 2 and "non-finite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    rows = read_metrics(tmp_path / "nan")
    assert rows[-1]["skipped"] == 3 and len(rows) < 20
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert f"holds step {ckpt['step']}" in r.stderr and ckpt["step"] < rows[-1]["step"]
    assert all(torch.isfinite(v).all() for v in ckpt["unet"].values())


def test_arguments_are_checked_before_any_work(tmp_path):
    """Bad settings end in one line, exit 2, within seconds, before pairs are built (the toy's --data shapes would
    sample 2,048 images first), and a run that stopped there leaves no half-made folder behind (diffdpo.py's code
    path, in this process)."""
    (tmp_path / "file").write_text("")
    cases = [(["--batch-size", "0"], "--batch-size 0: must be at least 1"),
             (["--resolution", "33"], "--resolution 33: must be a multiple of 8"),
             (["--loss", "ipo"], "--loss ipo: expected one of dpo, sft"),
             (["--out", str(tmp_path / "file" / "run")], "cannot be created or written"),
             (["--data", str(tmp_path / "nothing.parquet")], "no such file or folder")]
    for args, message in cases:
        t0 = time.time()
        r = run_here(["diffdpo.py", "--device", "cpu", "--out", str(tmp_path / "o"), *args])
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-1000:])
        assert r.stderr.count("\n") == 1 and time.time() - t0 < 20
    assert not (tmp_path / "o").exists()


def png_bytes(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_and_columns_are_bounded_and_counted(tmp_path, shard):
    """A 1x6000 PNG is skipped and counted before it is decoded (peak memory < 2.5 GB; it took 6.7 GB); a 16-bit PNG
    keeps its gray levels (it came out white); image columns of strings (file paths: a FIFO would hang the run),
    captions that are not text and labels that do not sum to 1 are one-line errors or counted, never trained on."""
    thin = png_bytes(np.zeros((1, 6000, 3), np.uint8))
    rows = [dict(caption="thin", jpg_0=thin, jpg_1=jpeg((200, 40, 40)), label_0=1.0, label_1=0.0),
            dict(caption="ok", jpg_0=jpeg((200, 40, 40)), jpg_1=jpeg((40, 40, 200)), label_0=1.0, label_1=0.0),
            dict(caption="both", jpg_0=jpeg((1, 2, 3)), jpg_1=jpeg((3, 2, 1)), label_0=1.0, label_1=1.0)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "thin.parquet")
    code = (f"import data; src = data.open_pairs({str(tmp_path / 'thin.parquet')!r}, resolution=512); "
            f"b = next(src.batches(2)); print(b['prompts'], src.counts(), {PEAK_RSS_GIB})")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    prompts, counts, rss = r.stdout.rsplit(" ", 1)[0], r.stdout, float(r.stdout.split()[-1])
    assert "'thin'" not in prompts and "'too_large': 1" in counts and "'bad_labels': 1" in counts and rss < 2.5

    gray = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)          # 16-bit, 0 .. 65520
    x = data.decode_pair([png_bytes(gray), png_bytes(gray)], 16)[0]
    assert abs(((x + 1) * 127.5).mean().item() - (gray / 257).mean()) < 1.0    # not 255 (white)

    for column, value, message in [("jpg_0", "/tmp/fifo", "column jpg_0 holds string; expected image bytes"),
                                   ("caption", 7, "column caption holds int64; expected text")]:
        table = pq.read_table(shard).drop_columns([column]).append_column(column, pa.array([value] * 24))
        pq.write_table(table, tmp_path / f"{column}.parquet")
        with pytest.raises(data.DataError, match=message):
            data.open_pairs(str(tmp_path / f"{column}.parquet"), resolution=16)
    os.mkfifo(tmp_path / "fifo.png")                                   # JSONL pairs name image files: not a FIFO
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="x", chosen="fifo.png", rejected="fifo.png")))
    with pytest.raises(data.DataError, match="not a regular file"):
        next(data.open_pairs(str(tmp_path / "pairs.jsonl"), resolution=16).batches(1))


# ----------------------------------------------------------------------------------------------------------------
# Reliability, continued: preemption (--save-on-signal), stale temporary files, a full disk, checkpoints that are
# not zips, deep JSON, long captions and prompts, non-finite LoRA files and images

TINY_UNET = str(ROOT / "tiny" / "unet")       # eval.py's tuned model where any will do
CAPTION = "a red circle on a blue background"
DEEP = "[" * 200_000 + "]" * 200_000           # 200,000 nested brackets: Python's parser recurses past its limit


def make_caption_shard(path, n=8, first_caption=CAPTION):
    """n pairs in the Pick-a-Pic schema, a reddish image preferred over a bluish one; the first with its own caption."""
    rows = [dict(caption=first_caption if i == 0 else CAPTION, jpg_0=jpeg((200, 40, 40), (32, 32), 2 * i),
                 jpg_1=jpeg((40, 40, 200), (32, 32), 2 * i + 1), label_0=1.0, label_1=0.0) for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def caption_shard(tmp_path_factory):
    return make_caption_shard(tmp_path_factory.mktemp("data") / "pairs.parquet")


def toy_config(shard, out, **kw):
    return diffdpo.TrainConfig(**dict(dict(model="tiny", data=str(shard), out=str(out), batch_size=2, samples=False,
                                           device="cpu"), **kw))


def train_cli(shard, out, *extra):
    return [sys.executable, "diffdpo.py", "--model", "tiny", "--data", str(shard), "--out", str(out), "--batch-size",
            "2", "--no-samples", "--device", "cpu", *extra]


CLI_ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def one_line_exit(capsys, run, code=2):
    """Run `run()` (a CLI's main in this process): it exits with `code` and one "error: " line on stderr (besides any
    progress bar), whose text is returned."""
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    lines = re.findall(r"(?:^|[\r\n\]]|\x1b\[A)error: ([^\r\n]*)", err)  # at a line's start or after a progress bar
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, (e.value.code, err[-2000:])
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# files.py: bounded JSON, and a full disk as one line


def test_deep_json_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """200,000 nested brackets in a model's config.json, a pairs.jsonl line, a style folder's metadata.jsonl and an eval
    prompt file: one-line errors naming the file (and line), not RecursionError; metrics.jsonl skips such a line;
    JSON files and JSONL lines past the size bound are refused the same way."""
    model = shutil.copytree(ROOT / "tiny", tmp_path / "model")
    (model / "unet" / "config.json").write_text(DEEP)
    with pytest.raises(files.LoadError, match=r"unet/config.json: not a readable JSON file \(JSON nested more than 64"):
        unet.load_sd(str(model))
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="p", chosen="a.png", rejected="b.png")) + "\n" + DEEP)
    with pytest.raises(files.DataError, match=r"pairs.jsonl:2: expected a JSON object .*nested more than 64"):
        data.open_pairs(tmp_path / "pairs.jsonl", resolution=32)
    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "metadata.jsonl").write_text(DEEP + "\n")
    with pytest.raises(files.DataError, match=r"metadata.jsonl:1: expected a JSON object .*nested more than 64"):
        data.style_items(tmp_path / "style")
    (tmp_path / "prompts.json").write_text(DEEP)
    err = one_line_exit(capsys, lambda: eval.main(["--unet", TINY_UNET, "--prompts", str(tmp_path / "prompts.json"),
                                                   "--out", str(tmp_path / "eval")]))
    assert "prompts.json" in err and "JSON list of prompt strings" in err and not (tmp_path / "eval").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n' + DEEP + '\n{"step": 2}\n')
    assert [r["step"] for r in runs.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1000)
    (tmp_path / "big.json").write_text(json.dumps(["x" * 2000]))
    with pytest.raises(files.LoadError, match="big.json: not a readable JSON file .*more than"):
        files.read_json(tmp_path / "big.json")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="x" * 2000, chosen="a", rejected="b")) + "\n")
    with pytest.raises(files.DataError, match="pairs.jsonl:1: a line longer than"):
        data.open_pairs(tmp_path / "pairs.jsonl", resolution=32)


def test_every_way_a_write_runs_out_of_space_is_one_line(tmp_path, monkeypatch):
    """ENOSPC, EDQUOT, safetensors' SafetensorError and torch.save's "unexpected pos" (what a full tmpfs gives each
    writer) are all the one-line NoSpaceError naming the file; the previous file is intact and no temporary file stays.
    Any other failure is not called a full disk."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    errors = [OSError(28, "No space left on device"), OSError(122, "Disk quota exceeded"),
              SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
              RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
              RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")]
    for error in errors:
        def write(tmp, error=error):
            tmp.write_bytes(b"half a file")
            raise error
        with pytest.raises(files.NoSpaceError, match=f"no space left on the disk of {tmp_path} to write "
                                                     f"checkpoint.pt .*free some disk space and re-run"):
            files.write_atomic(target, write)
        assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]

    def broken(tmp):
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        files.write_atomic(target, broken)

    def full(obj, f):
        raise errors[3]
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(files.NoSpaceError, match=r"unexpected pos 576 vs 534\); the previous checkpoint is intact: "
                                                 r"free some disk space and re-run the same command to resume"):
        runs.save_checkpoint(target, {"step": 1})


def test_full_disk_stops_the_run_in_one_line_and_out_stays_consistent(tmp_path, caption_shard, capsys, monkeypatch):
    """A run whose disk fills up at step 2's checkpoint ends in one line (exit 2); checkpoint.pt is written before
    the user's weights, so OUT/unet/ never holds a step checkpoint.pt does not (here both hold step 1). With LoRA,
    the adapters' write failing after checkpoint.pt leaves them one step behind, and re-running the finished run
    writes them from the checkpoint."""
    out, real_save, saves = tmp_path / "full", torch.save, []

    def save_then_full(obj, f, *a, **kw):
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save_then_full)
    err = one_line_exit(capsys, lambda: diffdpo.main(toy_config(caption_shard, out, max_steps=3, checkpoint_every=1)))
    assert "no space left on the disk of" in err and "checkpoint.pt" in err and "free some disk space" in err
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = runs.load_checkpoint(out / "checkpoint.pt")
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert ckpt["step"] == 1 and all(torch.equal(weights[k], v) for k, v in ckpt["unet"].items())
    assert not [p for p in out.rglob("*") if files.TEMP_NAME.fullmatch(p.name)]

    out, real_file, writes = tmp_path / "lora", safetensors.torch.save_file, []

    def lora_then_full(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_file(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", lora_then_full)
    cfg = toy_config(caption_shard, out, max_steps=2, checkpoint_every=1, lora_rank=2, lr=1e-3)
    err = one_line_exit(capsys, lambda: diffdpo.main(cfg))
    assert "pytorch_lora_weights.safetensors (Error while serializing" in err and "free some disk space" in err
    monkeypatch.setattr(safetensors.torch, "save_file", real_file)

    def adapters_match_checkpoint():
        held, ckpt = load_file(out / lora.LORA_FILE), runs.load_checkpoint(out / "checkpoint.pt")
        return ckpt["step"] == 2 and all(torch.equal(held[f"unet.{k}"], v) for k, v in ckpt["unet"].items())
    assert not adapters_match_checkpoint()                     # one step behind checkpoint.pt, never ahead of it
    diffdpo.main(cfg)
    assert "already at step 2" in capsys.readouterr().out and adapters_match_checkpoint()


# ----------------------------------------------------------------------------------------------------------------
# runs.py: stale temporary files, checkpoints that are not zips, preemption


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_files_are_removed_when_a_run_takes_the_lock(tmp_path, capsys):
    """What kill -9s during writes leave (NAME.tmpPID of a dead process, in OUT and its subfolders) is removed and
    counted in one line when the next run locks OUT; other files, a live process's temporary file and anything
    outside OUT stay."""
    dead, out = dead_pid(), tmp_path / "out"
    written = []
    files.write_atomic(tmp_path / "probe", lambda tmp: written.append(tmp.name) or tmp.write_text("x"))
    assert files.TEMP_NAME.fullmatch(written[0])                # the pattern is write_atomic's own
    stale = [out / f"checkpoint.pt.tmp{dead}", out / "unet" / f"diffusion_pytorch_model.safetensors.tmp{dead}"]
    kept = [out / "notes.tmp", out / "table.tmp12.csv", out / f"report.json.tmp{os.getppid()}",
            tmp_path / f"checkpoint.pt.tmp{dead}"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 1000)
    handle = runs.lock(out)
    handle.close()
    printed = capsys.readouterr().out
    assert f"removed 2 temporary files of interrupted writes from {out}" in printed and printed.count("\n") == 1
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_checkpoint_that_is_not_a_zip_is_one_line(tmp_path, caption_shard, capsys):
    """10 bytes of text as checkpoint.pt (torch.load tried to unpickle it: KeyError: 101) -> the one-line error."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a zip\n")
    err = one_line_exit(capsys, lambda: diffdpo.main(toy_config(caption_shard, out, max_steps=1)))
    assert "checkpoint.pt: not a readable diffdpo checkpoint (not a zip archive" in err and "delete it" in err


def test_sigterm_saves_the_step_and_the_rerun_resumes_exactly(tmp_path, caption_shard):
    """SIGTERM between checkpoints (every 10 steps; sent after step >= 15, as SLURM's before a kill): the step under
    way finishes, checkpoint.pt holds it, one line says where and how to resume, exit status runs.STOPPED; re-running
    resumes there and ends with the weights of an uninterrupted run, exactly."""
    out = tmp_path / "preempted"
    p = subprocess.Popen(train_cli(caption_shard, out, "--max-steps", "10000", "--checkpoint-every", "10"), cwd=ROOT,
                         env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(runs.read_metrics(out / "metrics.jsonl")) < 15:
        time.sleep(0.02)
    done = len(runs.read_metrics(out / "metrics.jsonl"))
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    saved = runs.load_checkpoint(out / "checkpoint.pt")["step"]
    assert p.returncode == runs.STOPPED and "Traceback" not in stderr, stderr[-2000:]
    assert done <= saved <= done + 2 and runs.read_metrics(out / "metrics.jsonl")[-1]["step"] == saved
    assert f"stopped by SIGTERM after step {saved}: {out / 'checkpoint.pt'} holds it; re-run the same command to " \
           f"resume (exit status {runs.STOPPED})" in stdout

    diffdpo.train(toy_config(caption_shard, out, max_steps=20, checkpoint_every=10))
    straight = diffdpo.train(toy_config(caption_shard, tmp_path / "straight", max_steps=20, checkpoint_every=10))
    a, b = (load_file(o / "unet" / "diffusion_pytorch_model.safetensors") for o in (out, straight))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"SIGTERM after step {done}: checkpoint.pt holds step {saved}; resumed to 20 vs straight: max |dw| {diff}")
    assert diff == 0.0 and [r["step"] for r in runs.read_metrics(out / "metrics.jsonl")] == list(range(1, 21))


def test_signal_handling_before_the_loop_and_a_second_signal(tmp_path):
    """Before the loop (loading, building pairs) a signal stops at once; in it the first is recorded for the step's
    end and a second stops at once, both with STOPPED; the handlers are put back; bad names are one line."""
    before = signal.getsignal(signal.SIGUSR1)
    stop = runs.StopSignals("TERM,USR1")
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)
    assert e.value.code == runs.STOPPED and signal.getsignal(signal.SIGUSR1) is before
    stop = runs.StopSignals("usr1")
    stop.at_step_end()
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert stop.requested(torch.device("cpu")) and stop.received == "SIGUSR1"
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)
    assert e.value.code == runs.STOPPED and signal.getsignal(signal.SIGUSR1) is before
    assert not runs.StopSignals("").requested(torch.device("cpu"))
    with pytest.raises(UserError, match="--save-on-signal TERM,KILL: KILL is not one of TERM, USR1"):
        runs.signal_numbers("TERM,KILL")


RANK_SCRIPT = """
import os, signal, torch, torch.distributed as dist
import runs
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = runs.StopSignals("TERM,USR1", rank)
stop.at_step_end()
for step in range(1, 100):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)                   # only rank 1 is signalled
    if stop.requested(torch.device("cpu")):
        print(f"rank {rank} stops after step {step}", flush=True)
        dist.destroy_process_group()
        stop.exit(step, "OUT")
"""


def test_every_rank_stops_after_the_same_step(tmp_path):
    """Two gloo processes, as torchrun starts them; only rank 1 gets SIGUSR1 (at step 3): both stop after step 3 and
    exit with STOPPED, rank 0's line saying another rank was signalled."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(CLI_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=ROOT, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [runs.STOPPED] * 2, [o[1][-1000:] for o in outs]
    assert "rank 0 stops after step 3" in outs[0][0] and "rank 1 stops after step 3" in outs[1][0]
    assert "stopped by a signal to another rank after step 3" in outs[0][0]


# ----------------------------------------------------------------------------------------------------------------
# shards.py / data.py: captions bounded before tokenizing


def test_a_20_mb_caption_is_cut_and_counted(tmp_path):
    """A 20 MB caption in a parquet shard (and a long JSONL prompt) is cut to MAX_PROMPT_CHARS characters before
    anything tokenizes it, counted as long_captions in every metrics row and in the done line; a run's peak memory
    stays within 1.3x of the same shard without it. The tokenizer itself cuts as well."""
    long = "a red circle " * 1_600_000                                       # 20.8 MB
    make_caption_shard(tmp_path / "long.parquet", first_caption=long)
    make_caption_shard(tmp_path / "short.parquet")
    pairs = data.open_pairs(tmp_path / "long.parquet", resolution=32, flip=False)
    prompts = [pairs.item(s)["prompt"] for s in range(8)]
    assert long[:MAX_PROMPT_CHARS] in prompts and pairs.counts()["long_captions"] == 1
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt=long[:10_000], chosen="a.png", rejected="b.png")))
    jsonl = data.open_pairs(tmp_path / "pairs.jsonl", resolution=32)
    assert jsonl.counts()["long_captions"] == 1 and len(jsonl.shards[0].rows[0][0]) == MAX_PROMPT_CHARS
    tok = unet.load_sd("tiny").tokenizers[0]
    t0 = time.time()
    assert torch.equal(tok([long]), tok([long[:MAX_PROMPT_CHARS]])) and time.time() - t0 < 2

    code = ("import sys, diffdpo\ncfg = diffdpo.TrainConfig(model='tiny', data=sys.argv[1], out=sys.argv[2], "
            "max_steps=2, batch_size=2, samples=False, device='cpu')\ndiffdpo.train(cfg)\nprint('peak', " +
            PEAK_RSS_GIB + ")")
    runs_ = {k: subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{k}.parquet"), str(tmp_path / k)],
                                 cwd=ROOT, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in ("short", "long")}
    printed = {k: p.communicate(timeout=300) for k, p in runs_.items()}
    assert all(p.returncode == 0 for p in runs_.values()), [e[-1000:] for _, e in printed.values()]
    peak = {k: float(o.split("peak ")[-1]) for k, (o, _) in printed.items()}
    print(f"peak RSS: {peak['long']:.3f} GiB with the 20 MB caption, {peak['short']:.3f} GiB without "
          f"({peak['long'] / peak['short']:.2f}x)")
    assert peak["long"] < 1.3 * peak["short"]
    assert "0 empty captions, 1 long captions" in printed["long"][0]
    assert all(r["long_captions"] == 1 for r in runs.read_metrics(tmp_path / "long" / "metrics.jsonl"))


# ----------------------------------------------------------------------------------------------------------------
# lora.py: NaN / Inf and rank-0 adapters refused at load


def test_nan_inf_and_rank_0_lora_files_are_refused_at_load(tmp_path, capsys):
    """A LoRA file of NaN or Inf values names the file and tensor at load (sample.py wrote an all-black image and
    exited 0); rank-0 adapters, peft's (0, in) / (out, 0) or kohya's, too (ZeroDivisionError before)."""
    model = unet.load_sd("tiny").unet
    layers = lora.add_lora(model, 2)
    good = lora.lora_state_dict(model)
    key = f"unet.{layers[0]}.lora_B.weight"
    for name, value in [("nan", float("nan")), ("inf", float("inf"))]:
        save_file({**good, key: torch.full_like(good[key], value)}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(files.LoadError, match=f"{name}.safetensors: tensor {key} holds NaN or Inf values"):
            lora.load_lora(unet.load_sd("tiny").unet, tmp_path / f"{name}.safetensors")
    a, b = good[f"unet.{layers[0]}.lora_A.weight"], good[key]
    save_file({f"unet.{layers[0]}.lora_A.weight": a[:0], key: b[:, :0]}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(files.LoadError, match=r"rank0.safetensors: tensor .* has shape \(0, .*\), an empty \(rank-0\)"):
        lora.load_lora(unet.load_sd("tiny").unet, tmp_path / "rank0.safetensors")
    stem = "lora_unet_" + layers[0].replace(".", "_")
    kohya = {f"{stem}.lora_down.weight": a[:0], f"{stem}.lora_up.weight": b[:, :0], f"{stem}.alpha": torch.tensor(1.0)}
    save_file(kohya, str(tmp_path / "kohya0.safetensors"))
    with pytest.raises(files.LoadError, match="kohya0.safetensors: tensor .* an empty"):
        lora.load_lora(unet.load_sd("tiny").unet, tmp_path / "kohya0.safetensors")
    err = one_line_exit(capsys, lambda: sample.main(["--lora", str(tmp_path / "nan.safetensors"), "--prompt", CAPTION,
                                                     "--out", str(tmp_path / "grid.png"), "--device", "cpu"]))
    assert "nan.safetensors: tensor" in err and not (tmp_path / "grid.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# sample.py / eval.py: what is generated is finite; eval's prompts are checked before any generation


def test_non_finite_generation_is_an_error_not_a_black_picture(tmp_path, capsys):
    """A UNet that outputs Inf (finite-looking files can still overflow): generate raises instead of decoding black
    pictures, and eval.py stops in one line before writing any image."""
    sd = unet.load_sd("tiny")
    with torch.no_grad():
        sd.unet.conv_out.bias.fill_(float("inf"))
    with pytest.raises(UserError, match="the sampled latents hold NaN or Inf values"):
        sample.generate(sd, [CAPTION], steps=2, height=32, width=32)
    unet.save_component(sd.unet, tmp_path / "broken")
    err = one_line_exit(capsys, lambda: eval.main(["--unet", str(tmp_path / "broken"), "--num", "2", "--steps", "2",
                                                   "--out", str(tmp_path / "eval"), "--device", "cpu"]))
    assert "NaN or Inf" in err and not (tmp_path / "eval" / "images").exists()


def test_eval_prompts_are_checked_before_any_generation(tmp_path, capsys):
    """A 10,000-character prompt, an empty one, or one the toy judge cannot score: one line, exit 2, in seconds, before
    any model is loaded or image generated (the long one was refused after all images were made)."""
    cases = [("long.txt", f"{CAPTION}\n{'a' * 10_000}\n", "prompt 2 has 10,000 characters, more than 4,000"),
             ("empty.json", json.dumps([CAPTION, " "]), "prompt 2 is empty"),
             ("cat.txt", "a photo of a cat\n", "prompt 1: shapes: caption 'a photo of a cat' is not of the form")]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        t0 = time.time()
        err = one_line_exit(capsys, lambda: eval.main(["--unet", TINY_UNET, "--prompts", str(tmp_path / name),
                                                       "--out", str(tmp_path / "eval"), "--device", "cpu"]))
        assert message in err and f"--prompts {tmp_path / name}" in err and time.time() - t0 < 5, err
        assert not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------------------------------------------
# The toy world (toy.py): the judges, the committed tiny model (a valid diffusers pipeline), the toy runs end to end


def test_judge_scores_the_caption_color_area():
    """The judge's known answers: an image all of the shape's color scores 1, all background 0; on a drawn shape it
    is the shape's share of the pixels (here recomputed from the drawing itself); bigger shapes score higher."""
    p = "a red circle on a blue background"
    assert toy.judge(Image.new("RGB", (32, 32), toy.COLORS["red"]), p) == 1.0
    assert toy.judge(Image.new("RGB", (32, 32), toy.COLORS["blue"]), p) == 0.0
    assert toy.judge(torch.ones(3, 8, 8) * (torch.tensor(toy.COLORS["red"]) / 127.5 - 1).view(3, 1, 1), p) == 1.0
    scores = []
    for seed in range(20):
        img = toy.render_shape(p, torch.Generator().manual_seed(seed))
        a = np.asarray(img, dtype=np.float64).reshape(-1, 1, 3)                          # (HW, 1, 3)
        nearest = np.linalg.norm(a - np.array(list(toy.COLORS.values()))[None], axis=-1).argmin(-1)
        pure_red = (a[:, 0] == toy.COLORS["red"]).all(-1).mean()
        assert toy.judge(img, p) == pytest.approx((nearest == 0).mean(), abs=1e-6) and toy.judge(img, p) >= pure_red
        scores.append(toy.judge(img, p))
    assert 0.02 < min(scores) < max(scores) < 0.5
    assert toy.judge(img, p) == toy.judge(img.copy(), p)                                      # deterministic
    with pytest.raises(ValueError, match="not of the form"):
        toy.judge(img, "a photo of a cat")
    assert len(toy.shape_prompts("train")) == 72 and len(toy.shape_prompts("test")) == 18
    assert not set(toy.shape_prompts("train")) & set(toy.shape_prompts("test"))


def test_tiny_model_is_a_diffusers_pipeline():
    """The committed tiny/ folder is SD1.5's layout: diffusers and transformers load it, its tokenizer gives
    transformers' ids, and our sampler gives the pipeline's images (DDIM, guidance 4, 12 steps, same latents)."""
    sd = unet.load_sd("tiny")
    prompts = toy.shape_prompts()[:30:7] + ["a red circle", "", "A GREEN Triangle!! on 2 backgrounds"]
    ref_tok = HFCLIPTokenizer.from_pretrained(unet.TINY_FOLDER / "tokenizer")
    ref_ids = ref_tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenizers[0](prompts), ref_ids)
    assert all(len(sd.tokenizers[0].bpe(w)) == 1 for w in "a red circle on blue background".split())  # whole words
    pipe = StableDiffusionPipeline.from_pretrained(unet.TINY_FOLDER, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    latents = sample.initial_latents(sd, 4, 32, 32, seed=0)
    ours = sample.generate(sd, prompts[:4], steps=12, guidance=4.0, latents=latents)
    ref = pipe(prompts[:4], num_inference_steps=12, guidance_scale=4.0, latents=latents, height=32, width=32,
               output_type="np").images
    diff = np.abs(np.stack([np.asarray(i, dtype=np.float32) for i in ours]) - np.round(ref * 255)).max()
    print(f"tiny pipeline: max pixel difference {diff}/255")
    assert diff <= 2


def test_tiny_flow_model_is_a_diffusers_pipeline():
    """The committed tiny-flow/ folder is SD3's layout: diffusers and transformers load it, its T5 tokenizer (a
    hand-written Unigram) gives transformers' ids, every toy word one piece, and our flow sampler gives
    StableDiffusion3Pipeline's images (20 steps, guidance 4, its 16 T5 tokens as max_sequence_length)."""
    sd = mmdit.load_pipeline("tiny-flow")
    prompts = toy.shape_prompts()[:30:7] + ["a red circle", "", "A GREEN Triangle!! on 2 backgrounds"]
    ref_tok = T5TokenizerFast.from_pretrained(mmdit.TINY_FLOW_FOLDER / "tokenizer_3")
    ref_ids = ref_tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert sd.kind == "sd3" and torch.equal(sd.tokenizers[2](prompts), ref_ids)
    assert len(sd.tokenizers[2].encode("a purple triangle on an orange background")) == 8   # 7 words + </s>
    pipe = StableDiffusion3Pipeline.from_pretrained(mmdit.TINY_FLOW_FOLDER)
    pipe.set_progress_bar_config(disable=True)
    latents = sample.initial_latents(sd, 4, 32, 32, seed=0)
    ours = sample.generate(sd, prompts[:4], steps=20, guidance=4.0, latents=latents)
    ref = pipe(prompts[:4], num_inference_steps=20, guidance_scale=4.0, latents=latents, height=32, width=32,
               max_sequence_length=16, output_type="np").images
    diff = np.abs(np.stack([np.asarray(i, dtype=np.float32) for i in ours]) - np.round(ref * 255)).max()
    print(f"tiny-flow pipeline: max pixel difference {diff}/255")
    assert diff <= 2


@pytest.mark.parametrize("name", ["tiny", "tiny-flow"])
def test_pretraining_writes_the_committed_layout(tmp_path, name):
    """`python pretrain.py tiny|tiny-flow DIR` (here 3 steps each) writes what --model tiny / tiny-flow reads: the
    same files, configs and tensor names and shapes as the committed folder, tokenizers with the same vocabulary."""
    if name == "tiny":
        folder, committed = pretrain.pretrain_tiny(tmp_path / name, vae_steps=3, unet_steps=3, batch_size=4,
                                                   vae_batch_size=2), unet.TINY_FOLDER
    else:
        folder, committed = pretrain.pretrain_tiny_flow(tmp_path / name, steps=3, batch_size=4), mmdit.TINY_FLOW_FOLDER
    def files(root):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files(folder) == files(committed)
    for f in files(committed):
        if f.endswith(".safetensors"):
            with safe_open(str(folder / f), "pt") as a, safe_open(str(committed / f), "pt") as b:
                shapes = lambda f: {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: E731
                assert shapes(a) == shapes(b)
        elif not f.endswith("vae/config.json"):  # the VAE's scaling (and shift) factors are measured
            assert (folder / f).read_text() == (committed / f).read_text(), f
    sd = mmdit.load_pipeline(str(folder))
    assert sd.kind == ("sd15" if name == "tiny" else "sd3") and 0.1 < sd.vae.scaling_factor < 10


def test_toy_run_end_to_end(tmp_path, monkeypatch, capsys):
    """A shortened `python diffdpo.py` (16 pairs, 4 steps, 1 seed per held-out caption): the pairs file in
    Pick-a-Pic's schema, ln 2 at step 0, summary.json with its fields, compare.png, the grids; the banner names the
    toy model, method and precision, the last lines where the results are. A run whose summary.json went missing is
    evaluated again on re-running (it is not finished without it). Then every README command that samples or
    evaluates the toy model runs as printed (in this process), on this run as runs/toy."""
    monkeypatch.setattr(eval, "TOY_SEEDS", 1)
    out = tmp_path / "runs" / "toy"
    cfg = diffdpo.TrainConfig.from_args(["--out", str(out), "--max-steps", "4", "--device", "cpu", "--prompt-pairs",
                                         "16"])
    assert (cfg.model, cfg.data, cfg.resolution, cfg.threads) == ("tiny", "shapes", 32, 1)
    assert diffdpo.TrainConfig(out=cfg.out, max_steps=4, device="cpu", prompt_pairs=16) == cfg  # Python's the same
    diffdpo.main(cfg)
    assert torch.get_num_threads() == 1           # the toy's --threads 1 (suite_threads restores the suite's after)
    printed = capsys.readouterr().out
    assert "dpo on tiny, the toy model (SD1.5's layout" in printed and "fp32 precision" in printed
    assert "held-out judge score" in printed and "compare.png (base above, tuned below)" in printed
    table = pq.read_table(out / "pairs" / "round-000" / "pairs.parquet")
    assert table.num_rows == 16 and set(shards.COLUMNS) <= set(table.column_names)
    assert set(table.column("caption").to_pylist()) <= set(toy.shape_prompts("train"))
    rows = read_metrics(out)
    assert len(rows) == 4 and abs(rows[0]["loss"] - math.log(2)) < 1e-6
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and s["num_images"] == 18 and 0 <= s["win_rate_vs_base"] <= 1
    assert 0 < s["judge_score_base"] < 1 and s["seconds"] > 0 and s["loss"] == "dpo"
    assert Image.open(out / "compare.png").size[1] >= 2 * sample.MIN_CELL
    base, tuned = grid_rows(out / "samples" / "step000004.png", ["base", "step 4"], toy.shape_prompts("test")[:8])
    assert base.shape == (128, 8 * 128, 3)
    (out / "summary.json").unlink()
    diffdpo.main(cfg)
    assert "already at step 4" in capsys.readouterr().out and (out / "summary.json").is_file()

    text = (ROOT / "README.md").read_text()
    commands = [c for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
                for c in block.replace("\\\n", " ").splitlines()
                if c.startswith(("python sample.py", "python eval.py")) and ("runs/toy" in c or "--model" not in c)]
    assert len(commands) >= 2, commands
    monkeypatch.chdir(tmp_path)                                  # the commands name runs/toy
    for command in commands:                                     # a failing command raises (SystemExit or other)
        args = shlex.split(command.split("#")[0])
        {"sample.py": sample.main, "eval.py": eval.main}[args[1]](args[2:] + ["--device", "cpu"])
    report = json.loads((out / "eval" / "report.json").read_text())["scorers"]["judge"]
    ims = [Image.open(out / "eval" / "images" / "tuned" / f"{i:05d}.png") for i in range(3)]
    assert report["tuned"][:3] == pytest.approx([toy.judge(im, p) for im, p in zip(ims, toy.shape_prompts("test"))])


def test_style_edit_and_judge_known_images():
    """The ink print of a drawn shape is paper exactly where the drawing's nearest palette color is the caption's
    ground and ink elsewhere (recomputed here); it scores its border's paper share (1 unless the figure touches the
    border), the drawing on a blue ground 0. Flat images: paper 1, ink or any other color 0 (the ground must be
    paper); ink in a corner of paper: the border's paper share; a figure on yellow 0."""
    p, names = "a red circle on a blue background", list(toy.COLORS)
    palette = np.array(list(toy.COLORS.values()), dtype=np.float64)
    for seed in range(5):
        img = toy.render_shape(p, torch.Generator().manual_seed(seed))
        nearest = np.linalg.norm(np.asarray(img, dtype=np.float64).reshape(-1, 1, 3) - palette, axis=-1).argmin(-1)
        styled, ground = np.asarray(toy.style_edit(img, p)).reshape(-1, 3), nearest == names.index("blue")
        assert 0.03 < (~ground).mean() < 0.5                                          # the figure: 3% .. 50%
        assert (styled[ground] == toy.COLORS[toy.PAPER]).all() and (styled[~ground] == toy.COLORS[toy.INK]).all()
        g = ground.reshape(32, 32)
        border = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]])
        assert toy.style_judge(toy.style_edit(img, p)) == pytest.approx(border.mean(), abs=1e-6) and border.mean() > 0.9
        assert toy.style_judge(img) == 0.0
    for name, rgb in toy.COLORS.items():
        assert toy.style_judge(Image.new("RGB", (32, 32), rgb)) == float(name == toy.PAPER)
    corner = Image.new("RGB", (32, 32), toy.COLORS[toy.PAPER])
    corner.paste(toy.COLORS[toy.INK], (0, 0, 16, 16))                                # 31 of the 124 border pixels
    assert toy.style_judge(corner) == pytest.approx(93 / 124, abs=1e-6)
    assert toy.style_judge(toy.to_tensor(corner)) == pytest.approx(93 / 124, abs=1e-6)
    center = Image.new("RGB", (32, 32), toy.COLORS["yellow"])
    center.paste(toy.COLORS[toy.INK], (8, 8, 24, 24))
    assert toy.style_judge(center) == 0.0
    assert toy.style_edit(center, "a purple square on a yellow background").getcolors() == [
        (768, toy.COLORS[toy.PAPER]), (256, toy.COLORS[toy.INK])]
    assert toy.style_judge(toy.style_edit(center, "a purple square on a yellow background")) == 1.0


@pytest.fixture
def one_thread():
    """The tiny model is overhead-bound: one thread is fastest, and on busy cores more threads spin against each
    other (the shortened style run: 12 s with 1 thread, 145 s with 2 on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_style_world_run_end_to_end(tmp_path, monkeypatch, one_thread):
    """A shortened `python rpo.py --model tiny --data shapes-style --rpo-shared-noise` (16 pairs, 3 steps, 1 seed
    per held-out caption): the pairs (each preferred image the ink print of its rejected one), ln 2 at step 0, and
    summary.json with every field; its style FD recomputed from 8x8 thumbnails of held-out-seed ink prints."""
    monkeypatch.setattr(toy, "TOY_PAIRS", 16)
    monkeypatch.setattr(eval, "TOY_SEEDS", 1)
    out = tmp_path / "style"
    cfg = rpo.RPOConfig.from_args(["--data", "shapes-style", "--out", str(out), "--max-steps", "3", "--device", "cpu",
                                   "--rpo-shared-noise", "--no-samples"])
    diffdpo.main(cfg, rpo.make_pair_loss(cfg))
    t = pq.read_table(out / "shapes_style_pairs.parquet").to_pydict()
    assert len(t["caption"]) == 16 and t["label_0"] == [1.0] * 16
    assert set(t["caption"]) <= set(toy.shape_prompts("train"))
    for k in (0, 7, 15):
        rejected = Image.open(io.BytesIO(t["jpg_1"][k]))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(t["jpg_0"][k]))),
                              np.asarray(toy.style_edit(rejected, t["caption"][k])))
    assert abs(read_metrics(out)[0]["loss"] - math.log(2)) < 1e-6 and len(read_metrics(out)) == 3
    s = json.loads((out / "summary.json").read_text())
    assert s["loss"] == "rpo (tau 0.5, text, shared noise)" and s["num_images"] == 18 and s["seconds"] > 0
    assert (s["style_score_base"], s["style_score_tuned"]) == (s["judge_score_base"], s["judge_score_tuned"])
    assert 0 <= s["style_score_base"] < 0.2 and 0 <= s["style_score_tuned"] <= 1 and 0 <= s["win_rate_vs_base"] <= 1
    sd, prompts = unet.load_sd("tiny"), toy.shape_prompts("test")
    base = sample.render(sd, sd.unet, prompts, list(range(18)), batch_size=18, **sample.TOY_SAMPLING)
    ref = [toy.style_edit(im, p) for im, p in zip(sample.render(sd, sd.unet, prompts, list(range(18, 36)),
                                                                batch_size=18, **sample.TOY_SAMPLING), prompts)]
    thumbs = lambda xs: np.stack([np.asarray(x.resize((8, 8), Image.BOX)) for x in xs]).reshape(18, -1) / 255  # noqa
    assert s["style_fd_base"] == pytest.approx(eval.frechet_distance(thumbs(ref), thumbs(base)), rel=1e-6)
    assert s["style_fd_features"] == "8x8 RGB thumbnail" and s["style_fd_tuned"] > 0
    assert s["style_score_base"] == pytest.approx(np.mean([toy.style_judge(im) for im in base]), abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# bench.py: its FLOP count is what a step executes, its real-architecture models are the same on both sides


def test_bench_flops_and_real_architecture_models(monkeypatch, tmp_path):
    """step_flops (counted on the meta device) equals what torch.utils.flop_counter counts in a real step of ours
    and of the reference; random_models builds both sides with the same weights (same UNet output), at sizes
    shrunk here to the test configs; and the full benchmark driver runs end to end on the CPU."""
    for a, b in [(dict(parity.SD_VAE, _class_name="AutoencoderKL"), unet.VAEConfig.sd15()),
                 (dict(parity.CLIP_L, architectures=["CLIPTextModel"]), unet.CLIPTextConfig.sd15()),
                 (dict(parity.CLIP_BIGG, architectures=["CLIPTextModelWithProjection"]), unet.CLIPTextConfig.sdxl())]:
        norm = lambda c: {k: tuple(v) if isinstance(v, list) else v for k, v in vars(c).items() if k != "raw"}  # noqa
        assert norm(type(b).from_dict(a)) == norm(b)  # the bench's real sizes are our presets
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989, "NVIDIA A100-SXM4-80GB": 312,
             "NVIDIA L40S": 362, "NVIDIA L4": 121, "NVIDIA GeForce RTX 4090": 165, "Tesla T4": None}
    assert {n: bench.peak_tflops(n) for n in names} == names
    for kind, cfg in (("sd15", SD15_TEST), ("sdxl", SDXL_TEST)):
        monkeypatch.setitem(parity.REAL, kind, dict(unet=cfg["unet"], vae=cfg["vae"],
                                                   text=[cfg["text"]] + ([cfg["text2"]] if kind == "sdxl" else [])))
        sd, ref = parity.random_models(kind, torch.device("cpu"), str(tmp_path / kind))
        x, t, ctx, added = unet_inputs(sd.unet)
        assert rel_err(sd.unet(x, t, ctx, **added), ref_eps(ref.unet, x, t, ctx, added)) < 1e-5
        context, _ = sd.encode_prompt(["a red cube"])
        ids = ref.tokenizers[0](["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        if kind == "sd15":
            assert rel_err(context, ref.text_encoders[0](ids)[0]) < 1e-5
        R, pairs = sample.default_size(sd), 2
        counted = []
        # the CPU's fused attention kernel has no FLOP formula in torch.utils.flop_counter (CUDA's have): the math
        # backend spells attention out as matmuls, so every FLOP of the step is counted
        with sdpa_kernel(SDPBackend.MATH):
            for step in (bench.our_dpo_step(sd, torch.float32), parity.reference_dpo_step(ref, torch.float32)):
                batch = parity.make_batch(pairs, R)
                args = parity.reference_inputs(ref, batch, torch.device("cpu")) if step.policy is ref.unet else ()
                with FlopCounterMode(display=False) as fc:
                    step(batch, *args)
                counted.append(fc.get_total_flops())
            step, batch = bench.our_dpo_step(sd, torch.float32), parity.make_batch(pairs, R)
            cached = bench.cached_batch(sd, batch, R, torch.float32)
            with FlopCounterMode(display=False) as fc:
                step(cached)
        unets, encoders = bench.step_flops(sd, pairs, R)
        assert counted[0] == counted[1] == unets + encoders, (counted, unets, encoders)
        assert fc.get_total_flops() == unets and encoders > 0
    out = bench.step_table(torch.device("cpu"), ["tiny"], 1, 1, False, 2, str(tmp_path / "t"))["tiny"]
    assert set(out["step"]) == {"reference", "ours"} and out["step"]["ours"]["pairs_per_s"] > 0
    assert out["sampling"]["ours_images_per_s"] > 0 and out["sampling"]["reference_images_per_s"] > 0


# ----------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 networks (mmdit.py): the MMDiT against diffusers' SD3Transformer2DModel, the T5 encoder against
# transformers' T5EncoderModel, at the real widths and a few layers; their folders load


def diffusers_mmdit(cfg, seed=0):
    """diffusers' SD3Transformer2DModel at the config dict `cfg`, with its constructor's random init."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{k: v for k, v in cfg.items() if k != "_class_name"}).eval()


def mmdit_inputs(cfg, hw, tokens, seed=0):
    """Two noisy latents (B=2: each sample its own modulation), timesteps, text states and pooled text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg["in_channels"], *hw, generator=g)
    context = torch.randn(2, tokens, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=g)
    return x, torch.tensor([3.5, 871.25]), context, pooled


def max_abs_err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


@pytest.mark.parametrize("preset, changes", [
    ("sd3", dict(num_layers=2, pos_embed_max_size=24)),
    ("sd35m", dict(num_layers=3, dual_attention_layers=[0, 1], pos_embed_max_size=48)),
    ("sd35l", dict(num_layers=2, pos_embed_max_size=24))])
def test_mmdit_matches_diffusers(preset, changes):
    """Our MMDiT with diffusers' random weights (strict load by key names) gives diffusers' output within 1e-4, fp32,
    at the presets' real widths (24 or 38 heads x 64) with fewer layers: SD3-medium's plain blocks, SD3.5-medium's
    MMDiT-X blocks (dual attention, RMS q/k norm) followed by a plain last block, SD3.5-large's q/k norm. The position
    table is shrunk to a side of 24 / 48 patches (the real 192 / 384 hold 57M / 226M numbers) at the real scale
    (sample_size 128); the 8 x 12 latents are a 4 x 6 patch grid cropped from its centre."""
    cfg = dict(getattr(mmdit.MMDiTConfig, preset)().raw, **changes)
    ref = diffusers_mmdit(cfg)
    with torch.device("meta"):
        ours = mmdit.MMDiT(mmdit.MMDiTConfig.from_dict(cfg))
    unet.load_weights(ours, ref.state_dict())
    x, t, context, pooled = mmdit_inputs(cfg, (8, 12), tokens=10)
    with torch.no_grad():
        out, expected = ours(x, t, context, pooled), ref(x, context, pooled, t).sample
    assert out.shape == expected.shape == (2, 16, 8, 12)
    assert max_abs_err(out, expected) <= 1e-4, max_abs_err(out, expected)


def test_mmdit_position_table_crops_and_gradients():
    """The tiny preset (q/k norm, one MMDiT-X block, the text-free last block): our own position table equals
    diffusers'; outputs match at square, non-square and the table's full size (no crop), and a grid larger than the
    table is refused by both; gradients, with our gradient checkpointing on, match diffusers'."""
    cfg = mmdit.MMDiTConfig.tiny().raw
    ref = diffusers_mmdit(cfg)
    ours = mmdit.MMDiT(mmdit.MMDiTConfig.from_dict(cfg))
    assert max_abs_err(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed) == 0
    unet.load_weights(ours, {k: v.clone() for k, v in ref.state_dict().items()})  # own tensors: own gradients
    for hw in [(8, 8), (6, 10), (32, 32)]:
        x, t, context, pooled = mmdit_inputs(cfg, hw, tokens=5)
        with torch.no_grad():
            assert max_abs_err(ours(x, t, context, pooled), ref(x, context, pooled, t).sample) <= 1e-5, hw
    x, t, context, pooled = mmdit_inputs(cfg, (34, 8), tokens=5)  # 17 patches high, the table has 16
    with pytest.raises(ValueError, match="17"):
        ours(x, t, context, pooled)
    with pytest.raises(ValueError, match="17"):
        ref(x, context, pooled, t)
    ours.set_grad_checkpointing(True)
    x, t, context, pooled = mmdit_inputs(cfg, (6, 10), tokens=5, seed=1)
    ours(x, t, context, pooled).square().mean().backward()
    ref(x, context, pooled, t).sample.square().mean().backward()
    grads = dict(ours.named_parameters())
    worst = max(rel_err(grads[k].grad, p.grad) for k, p in ref.named_parameters())
    assert worst < 1e-4, worst


def random_t5(config, seed=0):
    """transformers' T5EncoderModel at `config` with random weights drawn once, on the meta device then filled: each
    matrix N(0, 1/fan_in), the embeddings and bias table N(0, 1), the norms' weights 1 + N(0, 0.1^2). At T5-XXL's
    widths this takes half the time of the constructor, which draws every weight twice."""
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model = model.to_empty(device="cpu").eval()
    model.encoder.embed_tokens = model.shared  # to_empty unties the two
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                embedding = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Embedding)
                p.normal_(0, 1.0 if embedding else p.shape[1] ** -0.5, generator=g)
    return model


def test_t5_relative_buckets_match_transformers():
    """T5's bidirectional position buckets (32 buckets, max distance 128) over offsets -400..400: exact."""
    relative = torch.arange(-400, 401)[:, None] + torch.tensor([0, 7])[None]
    expected = HFT5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(mmdit.relative_position_bucket(relative, 32, 128), expected)


def test_t5_encoder_matches_transformers():
    """T5Encoder with transformers' random weights gives T5EncoderModel's last hidden state within 1e-4, fp32, at
    T5-v1.1-XXL's widths (d_model 4096, 64 heads x 64, d_ff 10240, 32 buckets, max distance 128, gated-GELU) with 2
    layers (the bias table in the first, shared by the second) and a 512-token vocabulary (the real 32,128 rows are
    0.5 GB); 160 tokens, so offsets beyond 128 reach the far buckets."""
    hf = HFT5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu",
                    vocab_size=512, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    ref = random_t5(hf)
    with torch.device("meta"):
        ours = mmdit.T5Encoder(mmdit.T5Config.from_dict(hf.to_dict()))
    unet.load_weights(ours, mmdit.tied_embedding(ref.state_dict()))
    ids = torch.randint(0, 512, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, expected = ours(ids), ref(ids).last_hidden_state
    assert out.shape == expected.shape == (1, 160, 4096)
    assert max_abs_err(out, expected) <= 1e-4, max_abs_err(out, expected)


def test_t5_fp16_as_transformers(tmp_path):
    """fp16 as transformers runs T5 (one MLP output matrix scaled up, so that the first block overflows fp16): all in
    half precision, a block output beyond the fp16 range is clamped to it, not passed on as inf (then NaN after the
    next norm); loaded in fp16 from a folder or cast to it, the MLP output matrices stay fp32 (transformers'
    from_pretrained) and so does the residual stream."""
    torch.manual_seed(0)
    ref = T5EncoderModel(HFT5Config(**mmdit.T5Config.tiny().raw)).eval()
    with torch.no_grad():
        ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.mul_(1e5)
    ref.save_pretrained(tmp_path / "text_encoder_3", safe_serialization=True)
    ref = ref.half()
    ours = unet.load_weights(mmdit.T5Encoder(mmdit.T5Config.tiny()).half(), mmdit.tied_embedding(ref.state_dict()))
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = ref.encoder.block[0].layer[0](ref.shared(ids))[0]
        assert torch.isinf(ref.encoder.block[0].layer[1](h)).any()  # the overflow happens
        out, expected = ours(ids), ref(ids).last_hidden_state
    assert torch.isfinite(out).all() and rel_err(out, expected) < 1e-2, rel_err(out, expected)
    ref = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_3", dtype=torch.float16).eval()
    ours = mmdit.load_sd3_component(tmp_path / "text_encoder_3", "text_encoder_3", dtype=torch.float16)
    wo = lambda m: {b.layer[1].DenseReluDense.wo.weight.dtype for b in m.encoder.block}  # noqa: E731
    assert wo(ours) == wo(ref) == {torch.float32} and ours.shared.weight.dtype == torch.float16
    with torch.no_grad():
        out, expected = ours(ids), ref(ids).last_hidden_state
    assert out.dtype == expected.dtype == torch.float16 and rel_err(out, expected) < 1e-3, rel_err(out, expected)
    assert wo(ours.float().to(torch.float16)) == {torch.float32}     # so does any later cast (the trainer's)


def test_mmdit_and_t5_folders_load(tmp_path):
    """A `transformer/` folder written by diffusers' save_pretrained (sharded, with its index) and a `text_encoder_3/`
    folder written by transformers' load through load_sd3_component and give the reference outputs; a config this
    implementation does not cover is refused in one line."""
    ref = diffusers_mmdit(mmdit.MMDiTConfig.tiny().raw)
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = mmdit.load_sd3_component(tmp_path / "transformer", "transformer")
    x, t, context, pooled = mmdit_inputs(mmdit.MMDiTConfig.tiny().raw, (8, 6), tokens=7)
    with torch.no_grad():
        assert max_abs_err(ours(x, t, context, pooled), ref(x, context, pooled, t).sample) <= 1e-6
    torch.manual_seed(1)
    t5 = T5EncoderModel(HFT5Config(**mmdit.T5Config.tiny().raw)).eval()
    t5.save_pretrained(tmp_path / "text_encoder_3", safe_serialization=True)
    ours_t5 = mmdit.load_sd3_component(tmp_path / "text_encoder_3", "text_encoder_3")
    ids = torch.randint(0, t5.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_abs_err(ours_t5(ids), t5(ids).last_hidden_state) <= 1e-6
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(dict(config, qk_norm="layer_norm")))
    with pytest.raises(files.LoadError, match="transformer/config.json: .*qk_norm='layer_norm' is not supported"):
        mmdit.load_sd3_component(tmp_path / "transformer", "transformer")
    with pytest.raises(files.LoadError, match="pos_embed_max_size=None"):
        mmdit.MMDiTConfig.from_dict(dict(config, pos_embed_max_size=None))
    with pytest.raises(files.LoadError, match="gated-gelu"):
        mmdit.T5Config.from_dict(dict(mmdit.T5Config.tiny().raw, feed_forward_proj="relu"))


def test_mmdit_and_t5_presets_are_the_reference_architectures():
    """Built on the meta device (no memory): each MMDiT preset has the tensor names and shapes of diffusers'
    SD3Transformer2DModel at the same config, whose fields MMDiTConfig mirrors; the t5xxl preset has
    T5EncoderModel's and the T5-v1.1-XXL encoder's 4,762,310,656 parameters."""
    fields = {f.name for f in dataclasses.fields(mmdit.MMDiTConfig)} - {"raw"}
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    for preset in ("sd3", "sd35m", "sd35l", "tiny"):
        cfg = getattr(mmdit.MMDiTConfig, preset)()
        with torch.device("meta"):
            ref = SD3Transformer2DModel(**{k: v for k, v in cfg.raw.items() if k != "_class_name"})
            ours = mmdit.MMDiT(cfg)
        assert shapes(ours.state_dict()) == shapes(ref.state_dict()), preset
        assert fields == {k for k in ref.config if not k.startswith("_")}
    cfg = mmdit.T5Config.t5xxl()
    with torch.device("meta"):
        ref = T5EncoderModel(HFT5Config(**cfg.raw))
        ours = mmdit.T5Encoder(cfg)
    assert shapes(ours.state_dict()) == shapes(mmdit.tied_embedding(ref.state_dict()))
    assert sum(p.numel() for p in ours.parameters()) == 4_762_310_656


# ----------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 pipeline (mmdit.SD3, load_sd3, sample.flow_euler): prompt encoding and flow-matching generation against
# diffusers' StableDiffusion3Pipeline on a small random-weight pipeline folder


@pytest.fixture(scope="module")
def sd3_hub(tmp_path_factory, t5_model):
    return parity.make_sd3_hub(tmp_path_factory.mktemp("sd3") / "sd3", t5_model)


SD3_PROMPTS = ["a photo of a cat", " ".join(["word"] * 300), "café crème brûlée 😀, oil painting"]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_matches_diffusers(shift):
    """flow_schedule's sigmas (with the final 0) and timesteps equal FlowMatchEulerDiscreteScheduler.set_timesteps'
    within 1e-6 (timesteps relative) for 1, 4 and 28 steps; options the sampler does not implement are refused."""
    for n in (1, 4, 28):
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(n)
        sigmas, timesteps = sample.flow_schedule(sample.scheduler_config(dict(ref.config), "flow"), n)
        assert sigmas.shape == (n + 1,) and timesteps.shape == (n,)
        assert max_abs_err(sigmas, ref.sigmas) <= 1e-6, (n, max_abs_err(sigmas, ref.sigmas))
        assert max_abs_err(timesteps / 1000, ref.timesteps / 1000) <= 1e-6, n
    with pytest.raises(UserError, match="use_dynamic_shifting is not supported"):
        sample.scheduler_config(dict(ref.config, use_dynamic_shifting=True), "flow")


def test_sd3_encode_prompt_matches_diffusers(sd3_hub, tmp_path):
    """encode_prompt equals StableDiffusion3Pipeline.encode_prompt within 1e-5 (context (B, 77 + 256, 96): the two
    CLIP penultimate states zero-padded to T5's width, then T5's states; pooled (B, 32 + 48)), with prompts cut at 77
    CLIP and 256 T5 tokens; and for a pipeline saved without its T5 (T5's part all zeros)."""
    sd = mmdit.load_sd3(sd3_hub)
    ref = StableDiffusion3Pipeline.from_pretrained(sd3_hub)
    context, pooled = sd.encode_prompt(SD3_PROMPTS)
    with torch.no_grad():
        expected, _, expected_pooled, _ = ref.encode_prompt(SD3_PROMPTS, None, None, do_classifier_free_guidance=False)
    assert context.shape == expected.shape == (3, 77 + 256, 96) and pooled.shape == expected_pooled.shape == (3, 80)
    assert max_abs_err(context, expected) <= 1e-5 and max_abs_err(pooled, expected_pooled) <= 1e-5
    assert context[:, :77, 80:].abs().max() == 0 and context[:, 77:].abs().min(-1).values.max() > 0
    folder = shutil.copytree(sd3_hub, tmp_path / "no_t5", ignore=shutil.ignore_patterns("*_3"))
    index = json.loads((folder / "model_index.json").read_text())  # as diffusers saves a pipeline without them:
    (folder / "model_index.json").write_text(json.dumps(dict(index, text_encoder_3=[None, None],
                                                             tokenizer_3=[None, None])))
    sd = mmdit.load_sd3(folder)
    ref = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert sd.text_encoders[2] is None and ref.text_encoder_3 is None
    context, pooled = sd.encode_prompt(SD3_PROMPTS[:2])
    with torch.no_grad():
        expected, _, expected_pooled, _ = ref.encode_prompt(SD3_PROMPTS[:2], None, None,
                                                            do_classifier_free_guidance=False)
    assert max_abs_err(context, expected) <= 1e-5 and max_abs_err(pooled, expected_pooled) <= 1e-5
    assert context[:, 77:].abs().max() == 0 and context.shape == (2, 77 + 256, 96)


def test_sd3_generate_matches_diffusers(sd3_hub):
    """generate (flow sampler: the default for an SD3 pipeline) with classifier-free guidance on "" through all three
    encoders, decoding z / 1.5305 + 0.0609 with the 16-channel VAE, gives StableDiffusion3Pipeline's images from the
    same latents within 2/255 per pixel; another sampler on SD3, or flow on an SD1.5 model, is refused."""
    sd = mmdit.load_sd3(sd3_hub)
    ref = StableDiffusion3Pipeline.from_pretrained(sd3_hub)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = SD3_PROMPTS[::2]
    images = sample.generate(sd, prompts, steps=4, guidance=5, latents=latents, sampler="flow")
    default = sample.generate(sd, prompts, steps=4, guidance=5, latents=latents)
    expected = ref(prompts, num_inference_steps=4, guidance_scale=5, latents=latents, output_type="np").images
    ours = np.stack([np.asarray(im, dtype=np.float64) / 255 for im in images])
    assert ours.shape == expected.shape == (2, 32, 32, 3) and expected.std() > 0.05
    assert np.abs(ours - expected).max() <= 2 / 255, np.abs(ours - expected).max() * 255
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, default))
    with pytest.raises(UserError, match="'euler' does not fit an sd3 model: SD3 samples with flow"):
        sample.generate(sd, prompts, steps=2, latents=latents, sampler="euler")
    sd.kind = "sd15"
    with pytest.raises(UserError, match="'flow' does not fit an sd15 model"):
        sample.generate(sd, prompts, steps=2, latents=latents, sampler="flow")


def test_load_sd3_errors(sd3_hub, tmp_path):
    """A folder without one of its pieces, or of another pipeline, is a one-line LoadError naming it."""
    folder = shutil.copytree(sd3_hub, tmp_path / "sd3", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(folder / "vae")
    with pytest.raises(files.LoadError, match=r"sd3: no vae/ folder \(a StableDiffusion3Pipeline folder has"):
        mmdit.load_sd3(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline")))
    with pytest.raises(files.LoadError, match="names 'StableDiffusionXLPipeline', not StableDiffusion3Pipeline"):
        mmdit.load_sd3(folder)
    with pytest.raises(files.LoadError, match="model_index.json: file not found"):
        mmdit.load_sd3(tmp_path)


def sd3_train_args(hub, shard, out, *extra):
    return ["diffdpo.py", "--model", str(hub), "--data", str(shard), "--out", str(out), "--resolution", "32",
            "--batch-size", "2", "--lr", "1e-4", "--warmup-steps", "2", "--device", "cpu", "--checkpoint-every", "2",
            "--threads", str(SUITE_THREADS), *extra]


def test_flow_dpo_trains_an_sd3_layout_model(tmp_path, sd3_hub, shard, clip_folder):
    """diffdpo.py on an SD3-layout pipeline (random weights, the test hub) and a Pick-a-Pic shard: the folder picks
    the sd3 preset (beta 100, logit-normal timesteps), the first loss is ln 2, the grid is drawn with the flow
    sampler, OUT/transformer/ loads in diffusers and moved, and sample.py / eval.py take it as --unet; 2 steps +
    resume to 4 == 4 straight, bit for bit, and with --cache to 1e-6. With --lora-rank (both streams' attention)
    StableDiffusion3Pipeline.load_lora_weights reads OUT's file and its transformer computes what ours does with
    the adapters."""
    straight, resumed, adapters = tmp_path / "straight", tmp_path / "resumed", tmp_path / "lora"
    r = run_here(sd3_train_args(sd3_hub, shard, straight, "--max-steps", "4", "--sample-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    cfg, rows = json.loads((straight / "config.json").read_text()), read_metrics(straight)
    assert (cfg["preset"], cfg["beta"], cfg["timestep_density"]) == ("sd3", 100.0, "logit_normal")
    assert "SD3's layout, MMDiT" in r.stdout and abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert (straight / "samples" / "step000004.png").is_file()
    tuned = SD3Transformer2DModel.from_pretrained(straight / "transformer").state_dict()
    base = SD3Transformer2DModel.from_pretrained(sd3_hub / "transformer").state_dict()
    assert max((v - base[k]).abs().max().item() for k, v in tuned.items()) > 1e-5
    # sample.py and eval.py take OUT/transformer as --unet for an SD3 --model
    gen = ["--model", str(sd3_hub), "--unet", str(straight / "transformer"), "--steps", "2", "--height", "32",
           "--width", "32", "--device", "cpu"]
    sample.main([*gen, "--compare", "--prompt", "a red cube", "--out", str(tmp_path / "compare.png")])
    (tmp_path / "prompts.txt").write_text("a red cube\na blue ball\n")
    eval.main([*gen, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "eval"), "--scorers", "clip",
               "--scorer-model", f"clip={clip_folder}"])
    clip = json.loads((tmp_path / "eval" / "report.json").read_text())["scorers"]["clip"]
    assert Image.open(tmp_path / "compare.png").size[1] > 64 and clip["base"] != clip["tuned"]
    assert run_here(sd3_train_args(sd3_hub, shard, resumed, "--max-steps", "2", "--no-samples")).returncode == 0
    r = run_here(sd3_train_args(sd3_hub, shard, resumed, "--max-steps", "4", "--no-samples"))
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    w = lambda run: load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")  # noqa: E731
    assert max_diff(w(resumed), w(straight)) == 0.0
    cached = tmp_path / "cached"
    r = run_here(sd3_train_args(sd3_hub, shard, cached, "--max-steps", "4", "--no-samples", "--cache", "--cache-dir",
                                str(tmp_path / "cache")))
    assert r.returncode == 0 and list((tmp_path / "cache").rglob("*.safetensors")), r.stderr[-3000:]
    # the cache projects each prompt's pooled text alone, a batch projects them together: 1e-7 apart, not 0
    assert max_diff(w(cached), w(straight)) < 1e-6, max_diff(w(cached), w(straight))

    r = run_here(sd3_train_args(sd3_hub, shard, adapters, "--max-steps", "2", "--no-samples", "--lora-rank", "4",
                                "--lr", "1e-2"))
    assert r.returncode == 0, r.stderr[-3000:]
    sd = mmdit.load_sd3(sd3_hub)
    lora.load_lora(sd.transformer, adapters)
    x, t, ctx, pooled = mmdit_inputs(parity.SD3_TEST["transformer"], (16, 16), 5)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_hub)
    pipe.load_lora_weights(adapters)
    with torch.no_grad():
        ours = sd.transformer(x, t, ctx, pooled)
        with lora.lora_disabled(sd.transformer):
            before = sd.transformer(x, t, ctx, pooled)
        theirs = pipe.transformer(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    print(f"SD3 LoRA after 2 steps: |lora - base| / |base| {rel_err(ours, before):.1e}, ours vs diffusers "
          f"{rel_err(ours, theirs):.1e}")
    assert rel_err(ours, before) > 1e-4 and rel_err(ours, theirs) < 1e-5
