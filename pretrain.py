"""
Pretraining the toy world's two base models from scratch, on captioned shapes drawn fresh at every step:

    python pretrain.py tiny [DIR]         tiny/: SD1.5's pipeline at toy size (eps-prediction UNet, DDPM)
    python pretrain.py tiny-flow [DIR]    tiny-flow/: SD3's pipeline at toy size (MMDiT, rectified flow)

Both minimize the plain denoising loss, diffdpo.denoising_errors: the ELBO surrogate whose differences the DPO loss
compares (noise errors for tiny, velocity errors for tiny-flow). Each writes a folder in the diffusers layout, so
diffusers' StableDiffusionPipeline / StableDiffusion3Pipeline load it as they load the Hub's. Read top to bottom:
the tokenizers the toy captions need, the shared pieces, tiny, tiny-flow.
"""
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffdpo import denoising_errors
from mmdit import SD3, TINY_FLOW_FOLDER, TINY_MMDIT, TINY_T5, MMDiT, MMDiTConfig, T5Config, T5Encoder
from sample import alphas_cumprod, flow_sigmas
from shards import scaled_posterior
from tokenizer import CLIPTokenizer, T5Tokenizer, bytes_to_unicode
from toy import render_shape, shape_prompts, to_tensor
from unet import TINY_FOLDER, TINY_VOCAB, VAE, CLIPText, CLIPTextConfig, UNet, UNetConfig, VAEConfig, load_component, \
    save_component

# ----------------------------------------------------------------------------------------------------------------
# Tokenizers that know the toy words: every caption word is one token, any other text still tokenizes


def toy_words():
    return sorted({w for p in shape_prompts() for w in p.split()} | {"an"})


def write_tiny_tokenizer(folder):
    """A CLIP tokenizer folder (vocab.json, merges.txt, special tokens) for the toy captions: the 512 byte symbols
    of CLIP's byte-level BPE plus just enough merges that every toy word is one token; any other text still
    tokenizes (into characters). Merges are added greedily, each after those it builds on, until that holds."""
    chars = list(bytes_to_unicode().values())
    merges = []
    while True:  # tokenize every word with the merges so far; where one is still split, merge its first two symbols
        specials = ["<|startoftext|>", "<|endoftext|>"]
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + specials
        tok = CLIPTokenizer({t: i for i, t in enumerate(vocab)}, [" ".join(m) for m in merges])
        todo = [(vocab[ids[0]], vocab[ids[1]]) for ids in map(tok.bpe, toy_words()) if len(ids) > 1]
        if not todo:
            break
        merges += [m for m in dict.fromkeys(todo) if m not in merges]
    assert len(vocab) <= TINY_VOCAB, (len(vocab), TINY_VOCAB)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        special, tokenizer_class="CLIPTokenizer", model_max_length=16, do_lower_case=True, errors="replace"), indent=2))


def write_tiny_t5_tokenizer(folder, max_length=16):
    """A T5 tokenizer folder (tokenizer.json as `tokenizers` writes a Unigram, special tokens, model_max_length) for
    the toy captions: <pad> </s> <unk>, then "▁word" for every toy word (score -1), "▁" and the lower-case letters,
    digits and punctuation (score -10), so Viterbi takes whole words and spells anything else."""
    specials = ["<pad>", "</s>", "<unk>"]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"
    words = [["▁" + w, -1.0] for w in toy_words()]
    vocab = [[t, 0.0] for t in specials] + words + [[c, -10.0] for c in "▁" + chars]
    meta = dict(type="Metaspace", replacement="▁", prepend_scheme="always", split=True)
    eos = dict(SpecialToken=dict(id="</s>", type_id=0))
    spec = dict(
        version="1.0", truncation=None, padding=None,
        added_tokens=[dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                           special=True) for i, t in enumerate(specials)],
        normalizer=dict(type="Replace", pattern=dict(Regex=" {2,}"), content=" "), pre_tokenizer=meta,
        post_processor=dict(type="TemplateProcessing", single=[dict(Sequence=dict(id="A", type_id=0)), eos],
                            pair=[dict(Sequence=dict(id="A", type_id=0)), eos, dict(Sequence=dict(id="B", type_id=0)),
                                  eos], special_tokens={"</s>": dict(id="</s>", ids=[1], tokens=["</s>"])}),
        decoder=meta, model=dict(type="Unigram", unk_id=2, vocab=vocab, byte_fallback=False))
    assert len(vocab) <= TINY_VOCAB, (len(vocab), TINY_VOCAB)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1))
    special = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        special, tokenizer_class="T5Tokenizer", model_max_length=max_length, extra_ids=0), indent=2))


# ----------------------------------------------------------------------------------------------------------------
# What both pretrainings share: the captioned images, the optimizer and its schedule, the log


def shape_batches(gen, n):
    """An endless stream of (captions, images (n, 3, 32, 32) in [-1, 1]), captions drawn uniformly from all 90."""
    prompts = shape_prompts()
    while True:
        ps = [prompts[i] for i in torch.randint(len(prompts), (n,), generator=gen)]
        yield ps, torch.stack([to_tensor(render_shape(p, gen)) for p in ps])


def drop_captions(prompts, gen, p=0.1):
    """Each caption replaced by "" with probability p: the unconditional model classifier-free guidance needs."""
    return [c if torch.rand((), generator=gen) > p else "" for c in prompts]


def train(params, steps, loss_fn, name, lr=5e-4, schedule=True, log_every=200):
    """AdamW at lr; with `schedule`, 100 warmup steps then a linear decay to 0.1 lr and gradients clipped at 1.
    loss_fn() -> the step's loss."""
    params, t0 = list(params), time.time()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup_decay = lambda s: min(1.0, (s + 1) / 100) * (1 - s / steps) + 0.1 if schedule else 1.0  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_decay)
    for step in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if schedule:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"{name} step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)


def write_index(folder, index):
    (Path(folder) / "model_index.json").write_text(json.dumps(index, indent=2))


def write_scheduler(folder, config):
    (Path(folder) / "scheduler").mkdir(parents=True, exist_ok=True)
    (Path(folder) / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------------------------
# tiny: the VAE, then the UNet and its text encoder on the frozen VAE's latents


def pretrain_vae(gen, steps, batch_size, kl_weight=1e-4):
    """The tiny VAE: reconstruction + a small KL to the unit Gaussian; scaling_factor = 1 / std of the latents (of
    1,024 images), as SD's 0.18215 was chosen."""
    vae, batches = VAE(VAEConfig.tiny()), shape_batches(gen, batch_size)

    def loss():
        _, x = next(batches)
        mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return F.mse_loss(vae.decode(z), x) + kl_weight * kl

    train(vae.parameters(), steps, loss, "vae", lr=1e-3, schedule=False, log_every=100)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        sf = 1.0 / float(torch.cat([vae.encode(x) for _, (_, x) in zip(range(4), shape_batches(gen, 256))]).std())
    vae.cfg.raw["scaling_factor"] = vae.cfg.scaling_factor = vae.scaling_factor = round(sf, 5)
    return vae


DDIM_CONFIG = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                   prediction_type="epsilon", timestep_spacing="leading")


def pretrain_tiny(folder=None, vae_steps=1500, unet_steps=4000, batch_size=64, seed=0, vae_batch_size=32):
    """tiny/: 1. the VAE (pretrain_vae); 2. the UNet and text encoder together on frozen-VAE latents (posterior
    means) with DDPM's loss ||eps - eps_theta(x_t, t, c)||^2, t uniform, 10% empty captions."""
    folder, t0 = Path(folder or TINY_FOLDER), time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = pretrain_vae(gen, vae_steps, vae_batch_size)
    write_tiny_tokenizer(folder / "tokenizer")
    tok = CLIPTokenizer.from_folder(folder / "tokenizer")
    text, unet, abar = CLIPText(CLIPTextConfig.tiny()), UNet(UNetConfig.tiny()), alphas_cumprod(DDIM_CONFIG)
    batches = shape_batches(gen, batch_size)

    def loss():
        ps, x = next(batches)
        with torch.no_grad():
            latents = scaled_posterior(vae, x)[0]
        eps, t = torch.randn_like(latents), torch.randint(0, len(abar), (len(ps),))
        context = text(tok(drop_captions(ps, gen)))[0]
        return denoising_errors(unet, latents, dict(context=context), eps, t, abar, "epsilon").mean()

    train([*unet.parameters(), *text.parameters()], unet_steps, loss, "unet")
    for model, name in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        save_component(model, folder / name, name)
    write_scheduler(folder, DDIM_CONFIG)
    write_index(folder, dict(
        _class_name="StableDiffusionPipeline", scheduler=["diffusers", "DDIMScheduler"],
        text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
        unet=["diffusers", "UNet2DConditionModel"], vae=["diffusers", "AutoencoderKL"], safety_checker=[None, None],
        feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False))
    print(f"wrote {folder} in {time.time() - t0:.0f} s")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# tiny-flow: SD3's pipeline at toy size. tiny's VAE (latents re-centred with SD3's shift_factor), two small CLIPs
# with projections and a small T5 (16 tokens), an MMDiT with every SD3.5 feature (q/k norm, one MMDiT-X block);
# the MMDiT and the three text encoders trained together with the rectified-flow loss ||v - v_theta(x_s, s, c)||^2,
# v = eps - x_0, at SD3's logit-normal sigmas.

TINY_FLOW_MMDIT = dict(TINY_MMDIT, num_layers=4, num_attention_heads=4, caption_projection_dim=128)
TINY_FLOW_CLIP = dict(architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model",
                      vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=16, projection_dim=32, eos_token_id=2)
TINY_FLOW_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=1.0)
SD3_INDEX = dict(
    _class_name="StableDiffusion3Pipeline", scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
    transformer=["diffusers", "SD3Transformer2DModel"], vae=["diffusers", "AutoencoderKL"],
    text_encoder=["transformers", "CLIPTextModelWithProjection"], tokenizer=["transformers", "CLIPTokenizer"],
    text_encoder_2=["transformers", "CLIPTextModelWithProjection"], tokenizer_2=["transformers", "CLIPTokenizer"],
    text_encoder_3=["transformers", "T5EncoderModel"], tokenizer_3=["transformers", "T5TokenizerFast"],
    image_encoder=[None, None], feature_extractor=[None, None])


def shifted_vae(batches):
    """tiny's VAE with SD3's latent normalization: shift_factor = the latents' mean, scaling_factor = 1 / their std
    (8 batches)."""
    vae = load_component(TINY_FOLDER / "vae", "vae").eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(next(batches)[1]) for _ in range(8)])
    shift, sf = round(float(z.mean()), 5), round(1.0 / float(z.std()), 5)
    vae.cfg.raw.update(shift_factor=shift, scaling_factor=sf)
    vae.cfg.shift_factor, vae.cfg.scaling_factor, vae.scaling_factor = shift, sf, sf
    return vae


def pretrain_tiny_flow(folder=None, steps=4000, batch_size=64, seed=0):
    """tiny-flow/ (needs tiny/ for its VAE): the MMDiT and the text encoders together on frozen-VAE latents
    (posterior means), 10% empty captions."""
    folder, t0 = Path(folder or TINY_FLOW_FOLDER), time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = shape_batches(gen, batch_size)
    vae = shifted_vae(batches)
    write_tiny_tokenizer(folder / "tokenizer")
    shutil.copytree(folder / "tokenizer", folder / "tokenizer_2", dirs_exist_ok=True)
    write_tiny_t5_tokenizer(folder / "tokenizer_3")
    toks = [CLIPTokenizer.from_folder(folder / "tokenizer")] * 2 + [T5Tokenizer.from_folder(folder / "tokenizer_3")]
    clips = [CLIPText(CLIPTextConfig.from_dict(dict(TINY_FLOW_CLIP, hidden_act=act))) for act in ("quick_gelu", "gelu")]
    t5, mmdit = T5Encoder(T5Config.from_dict(dict(TINY_T5))), MMDiT(MMDiTConfig.from_dict(dict(TINY_FLOW_MMDIT)))
    sd = SD3(mmdit, vae, [*clips, t5], toks, TINY_FLOW_SCHEDULER, source=str(folder))
    sigmas = flow_sigmas(TINY_FLOW_SCHEDULER)

    def loss():
        ps, x = next(batches)
        with torch.no_grad():
            latents = scaled_posterior(vae, x)[0]                      # (mean - shift_factor) * scaling_factor
        eps = torch.randn_like(latents)
        u = torch.sigmoid(torch.randn(len(ps)))                         # logit-normal, as diffdpo.draw_timestep
        t = (u * len(sigmas)).long().clamp(max=len(sigmas) - 1)
        context, pooled = sd.encode_prompt(drop_captions(ps, gen))
        return denoising_errors(mmdit, latents, dict(context=context, pooled=pooled), eps, t, sigmas, "flow").mean()

    train([p for m in (mmdit, *clips, t5) for p in m.parameters()], steps, loss, "mmdit")
    for model, name in ((mmdit, "transformer"), (vae, "vae"), (clips[0], "text_encoder"), (clips[1], "text_encoder_2"),
                        (t5, "text_encoder_3")):
        save_component(model, folder / name, name)
    write_scheduler(folder, TINY_FLOW_SCHEDULER)
    write_index(folder, SD3_INDEX)
    print(f"wrote {folder} in {time.time() - t0:.0f} s")
    return folder


if __name__ == "__main__":
    if sys.argv[1:2] not in (["tiny"], ["tiny-flow"]):
        sys.exit("usage: python pretrain.py tiny|tiny-flow [DIR]")
    (pretrain_tiny if sys.argv[1] == "tiny" else pretrain_tiny_flow)(*sys.argv[2:3])
