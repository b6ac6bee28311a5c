"""
The reference side of diffdpo's proofs, for test_all.py and bench.py only: random-weight models written by
diffusers / transformers in the exact Hub layouts ("the test hub": SD1.5-like, SDXL-like, SD3-like), CLIP
tokenizer folders built from OpenAI's BPE file and T5 ones from a SentencePiece model, the same networks built by both
libraries at the real architectures, and a DPO step written with diffusers as the official train.py writes it.
diffusers and transformers are imported here (inside the functions, so that bench.py --memory runs without them),
never by the product modules.
"""
import copy
import gzip
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

import mmdit
import unet
from diffdpo import pair_noise
from tokenizer import bytes_to_unicode

# ----------------------------------------------------------------------------------------------------------------
# The test hub: small configs that exercise every code path, saved by diffusers / transformers


def clip_vocab_source():
    """The real CLIP BPE merges ship in the open-clip-torch wheel (installed --no-deps by .ci/run, never imported)."""
    spec = importlib.util.find_spec("open_clip")
    assert spec is not None, "open-clip-torch must be installed (pip install --no-deps open-clip-torch==3.3.0)"
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_folder(folder, pad_token="<|endoftext|>", style="sd15"):
    """vocab.json + merges.txt built from OpenAI's BPE file exactly as Hugging Face built theirs, and the special-token
    files as the Hub's folders spell them: style "sd15" (SD1.5's and SDXL's `tokenizer/`: bos/eos/unk as normalized
    AddedToken dicts, the pad a plain string) or "decoder" (SDXL's `tokenizer_2/`: plain strings plus an
    `added_tokens_decoder`). Which special tokens transformers matches before normalization depends on that."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(clip_vocab_source()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = lambda c, norm=True: dict(content=c, lstrip=False, normalized=norm, rstrip=False, single_word=False)  # noqa
    if style == "decoder":
        special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token=pad_token,
                       unk_token="<|endoftext|>")
        decoder = {"49406": {**tok("<|startoftext|>"), "special": False},
                   "49407": {**tok("<|endoftext|>", False), "special": False}}
        if pad_token in vocab[:256]:
            decoder[str(vocab.index(pad_token))] = {**tok(pad_token, False), "special": True}
        config = {**special, "added_tokens_decoder": decoder}
    else:
        special = dict(bos_token=tok("<|startoftext|>"), eos_token=tok("<|endoftext|>"), pad_token=pad_token,
                       unk_token=tok("<|endoftext|>"))
        config = {k: ({"__type": "AddedToken", **v} if isinstance(v, dict) else v) for k, v in special.items()}
    config.update(add_prefix_space=False, do_lower_case=True, errors="replace", model_max_length=77,
                  tokenizer_class="CLIPTokenizer")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


SD15_TEST = dict(
    unet=dict(block_out_channels=[32, 64, 64], layers_per_block=2, attention_head_dim=4, cross_attention_dim=32,
              norm_num_groups=8, sample_size=8,
              down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    vae=dict(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4,
             down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
             scaling_factor=0.18215, sample_size=32),
    text=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, eos_token_id=2))

SDXL_TEST = dict(
    unet=dict(block_out_channels=[32, 64, 96], layers_per_block=2, attention_head_dim=[2, 4, 6],
              transformer_layers_per_block=[1, 2, 3], use_linear_projection=True, cross_attention_dim=64,
              norm_num_groups=8, sample_size=8, addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=32 + 6 * 8,
              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    vae=dict(SD15_TEST["vae"], scaling_factor=0.13025),
    text=SD15_TEST["text"],
    text2=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=77, hidden_act="gelu", projection_dim=32, eos_token_id=49407))

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")


def make_hub(folder, kind="sd15", variant=None, seed=0):
    """A random-weight SD1.5-like or SDXL-like pipeline saved by diffusers in the Hub's diffusers layout."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    folder = Path(folder)
    cfg = SD15_TEST if kind == "sd15" else SDXL_TEST
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    text = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    for m in (model, vae, text):  # random non-trivial norms and biases, so every parameter matters
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.data.normal_(1.0 if n.endswith("norm.weight") or "norm" in n and n.endswith("weight") else 0.0,
                               0.1)
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer_folder(folder.parent / f"_tok_{folder.name}"))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=model,
                                       scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text2"]))
        tok2 = CLIPTokenizer.from_pretrained(
            write_clip_tokenizer_folder(folder.parent / f"_tok2_{folder.name}", pad_token="!"))
        sched = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("set_alpha_to_one",
                                                                                              "clip_sample")})
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=model, scheduler=sched)
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(folder, variant=variant, safe_serialization=True)
    # the Hub's scheduler configs carry keys of other schedulers too (SDXL's Euler config: clip_sample False, ...)
    cls = "DDIMScheduler" if kind == "sd15" else "EulerDiscreteScheduler"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": cls, **SCHEDULER, "interpolation_type": "linear", "prediction_type": "epsilon",
         "skip_prk_steps": True, "use_karras_sigmas": False, "trained_betas": None, "sample_max_value": 1.0}))
    # The Hub's tokenizer folders hold vocab.json + merges.txt + the special-token files (no tokenizer.json)
    for name, pad, style in [("tokenizer", "<|endoftext|>", "sd15"), ("tokenizer_2", "!", "decoder")]:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
            write_clip_tokenizer_folder(folder / name, pad_token=pad, style=style)
    # The Hub's text encoders were saved by transformers 4 with a `text_model.` prefix that transformers 5 drops
    # for CLIPTextModel: write the Hub's real key names (transformers 5 still reads them).
    from safetensors.torch import load_file, save_file
    f = folder / "text_encoder" / (f"model.{variant}.safetensors" if variant else "model.safetensors")
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in load_file(f).items()}, f,
              metadata={"format": "pt"})
    return folder


def reference_pipe(folder, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    return cls.from_pretrained(folder, safety_checker=None) if kind == "sd15" else cls.from_pretrained(folder)


def write_t5_tokenizer_folder(folder, model, layout="sd3"):
    """tokenizer_3/ as transformers' T5 converter writes it from a SentencePiece model: the pieces, then 100
    <extra_id_N> sentinels (the last one first), the model's precompiled charsmap and runs of spaces -> " ",
    Metaspace, "$A </s>". Layout "strip": the later converter's normalizer (trailing white space stripped, runs of
    spaces -> "▁"); "transformers5": the folder as transformers 5 saves it after loading (it rebuilds the pipeline:
    the charsmap alone, WhitespaceSplit before Metaspace)."""
    import tokenizers as tk
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    vocab = [(p.piece, p.score) for p in proto.pieces] + [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    tok = tk.Tokenizer(tk.models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    charsmap = tk.normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap)
    spaces = [tk.normalizers.Replace(tk.Regex(" {2,}"), " ")]
    if layout == "strip":
        spaces = [tk.normalizers.Strip(left=False, right=True), tk.normalizers.Replace(tk.Regex(" {2,}"), "▁")]
    tok.normalizer = tk.normalizers.Sequence([charsmap, *spaces])
    tok.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = tk.processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    T5Tokenizer(tokenizer_object=tok, extra_ids=100).save_pretrained(folder)
    if layout == "transformers5":
        T5Tokenizer.from_pretrained(folder).save_pretrained(folder)
    specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


# A small StableDiffusion3Pipeline: widths chosen so that every concatenation and the zero padding are seen (CLIP-L 32
# + bigG 48 = 80 padded to T5's 96; pooled 32 + 48 = 80), the tiny MMDiT at 16 latent channels, SD3's VAE scaling.
SD3_TEST = dict(
    transformer=dict(mmdit.TINY_MMDIT, in_channels=16, out_channels=16, joint_attention_dim=96,
                     pooled_projection_dim=80),
    vae=dict(SD15_TEST["vae"], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
             scaling_factor=1.5305, shift_factor=0.0609),
    text=dict(SDXL_TEST["text"], projection_dim=32),
    text2=dict(SDXL_TEST["text2"], hidden_size=48, projection_dim=48),
    t5=dict(mmdit.TINY_T5, vocab_size=2112, d_model=96))


def randomize_vectors(*modules):
    """Random non-trivial norms and biases (norm weights ~ 1 + N(0, 0.1^2), the rest N(0, 0.1^2)), so that every
    parameter matters."""
    for m in modules:
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.data.normal_(1.0 if "norm" in n and n.endswith("weight") else 0.0, 0.1)


def make_sd3_hub(folder, t5_model, seed=0):
    """A random-weight StableDiffusion3Pipeline at SD3_TEST's sizes saved by diffusers in the Hub's layout, its CLIP
    tokenizers built from OpenAI's BPE file (tokenizer_2 pads with "!") and tokenizer_3 from the SentencePiece model
    `t5_model` (serialized ModelProto, at most 2,012 pieces), FlowMatchEulerDiscreteScheduler with SD3's shift 3."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5Tokenizer
    folder, cfg = Path(folder), SD3_TEST
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{k: v for k, v in cfg["transformer"].items() if k != "_class_name"})
    vae = AutoencoderKL(**cfg["vae"])
    texts = [CLIPTextModelWithProjection(CLIPTextConfig(**cfg[n])) for n in ("text", "text2")]
    t5 = T5EncoderModel(T5Config(**cfg["t5"]))
    randomize_vectors(transformer, vae, *texts, t5)
    toks = [CLIPTokenizer.from_pretrained(write_clip_tokenizer_folder(folder.parent / f"_{n}_{folder.name}", pad, s))
            for n, pad, s in [("tok", "<|endoftext|>", "sd15"), ("tok2", "!", "decoder")]]
    tok3 = T5Tokenizer.from_pretrained(write_t5_tokenizer_folder(folder.parent / f"_tok3_{folder.name}", t5_model))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=texts[0], tokenizer=toks[0], text_encoder_2=texts[1],
                                    tokenizer_2=toks[1], text_encoder_3=t5, tokenizer_3=tok3)
    pipe.save_pretrained(folder, safe_serialization=True)
    # the Hub's tokenizer folders, as make_hub writes them
    for name, pad, style in [("tokenizer", "<|endoftext|>", "sd15"), ("tokenizer_2", "!", "decoder")]:
        shutil.rmtree(folder / name)
        write_clip_tokenizer_folder(folder / name, pad_token=pad, style=style)
    shutil.rmtree(folder / "tokenizer_3")
    write_t5_tokenizer_folder(folder / "tokenizer_3", t5_model)
    return folder


def tokenizer_cases(n_random=300, seed=0):
    """Hard prompts for the tokenizer: scripts, accents, emoji, special-token literals, contractions, white space
    of every kind, long texts; then random strings over an alphabet of those."""
    fixed = [
        "a photo of a cat", "", " ", "   \t\n ", "A Photo Of A CAT", "café crème brûlée", "cafe\u0301 (combining)",
        "naïve señor über Ærø", "日本語のテキスト", "中文 提示词 测试", "한국어", "Привет, мир!", "مرحبا بالعالم", "ΟΔΟΣ σοφία",
        "emoji 😀🐱‍👤👍🏽 🇯🇵", "&amp; &lt;b&gt; &#39; &quot;", "12345 3.14 1,000,000 2nd 1st 4k 1080p",
        "don't it's I'M we'll they'd you've she's 'quoted' O'Neil rock'n'roll", "!!! ??? ... --- ,,, ;;; ***",
        "hello!world", "wow!", "a ! b", "tabs\tand\nnewlines\r\nand  spaces", "  leading and trailing  ",
        "control\x00\x01\x1c\x7f chars", "zero\u200bwidth\u200djoiner\ufeffbom", "non\xa0breaking\u3000ideographic",
        "<|endoftext|>", "a <|endoftext|> b", "<|startoftext|>x<|endoftext|>", "<|ENDOFTEXT|> upper", "<|endoftext",
        "<|STARTOFTEXT|>",
        "<|StartOfText|>x", "<|endoftext|>>", "wow!!", "ends with a bang!",
        "İstanbul ß ﬁ ﬀ Å Ω K", "x" * 300, " ".join(["word"] * 100), "supercalifragilisticexpialidocious " * 10,
        "a photo of an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation",
        "$100 @user #hashtag https://example.com/a?b=c&d=e user@mail.com", "½ ² ³ ① Ⅻ ٣ ߁", "x\u0301y \u0301 \u20dd",
    ]
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !?.,;:'\"-_()[]{}<>|/\\&#@$%^*+=~`"
                    "\t\n") + list("éèêëñüöäçßæøåαβγδЖжшщ中文日本語한국😀🐱👍🏽‍\u0301\u200b\xa0") + ["'s", "'ll", "<|endoftext|>"]
    rand = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n_random)]
    return fixed + rand


# ----------------------------------------------------------------------------------------------------------------
# The same networks in both libraries at the real architectures (bench.py), and the official train.py's DPO step

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                 eos_token_id=49407)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
              scaling_factor=0.18215, sample_size=512)
# the real architectures, as diffusers / transformers constructor arguments (test_all checks they are our presets)
REAL = {"sd15": dict(unet=unet.SD15_UNET, vae=SD_VAE, text=[CLIP_L]),
        "sdxl": dict(unet=unet.SDXL_UNET, vae=dict(SD_VAE, scaling_factor=0.13025, sample_size=1024),
                     text=[CLIP_L, CLIP_BIGG])}


class Reference:
    """The reference's networks (diffusers UNet2DConditionModel / AutoencoderKL, transformers
    CLIPTextModel[WithProjection]) and tokenizers, for an SD1.5-like or SDXL-like model."""

    def __init__(self, unet, vae, text_encoders, tokenizers, kind):
        self.unet, self.vae, self.text_encoders, self.tokenizers, self.kind = unet, vae, text_encoders, tokenizers, kind


def tokenizer_folders(root, kind):
    """CLIP's real BPE vocabulary in the Hub's tokenizer layout (tokenizer/, and tokenizer_2/ for SDXL)."""
    names = [("tokenizer", "<|endoftext|>", "sd15")] + ([("tokenizer_2", "!", "decoder")] if kind == "sdxl" else [])
    return [write_clip_tokenizer_folder(os.path.join(root, n), pad_token=p, style=s) for n, p, s in names]


def random_models(kind, device, root):
    """Random-weight networks at the real `kind` architecture ("sd15", "sdxl"), built directly on `device` by
    diffusers / transformers, and ours holding copies of the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    cfg = REAL[kind]
    torch.manual_seed(0)
    with torch.device(device):
        ref_unet = UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if k != "_class_name"})
        vae = AutoencoderKL(**cfg["vae"])
        texts = [(CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**c))
                 for i, c in enumerate(cfg["text"])]
    folders = tokenizer_folders(root, kind)
    ref = Reference(ref_unet, vae, texts, [CLIPTokenizer.from_pretrained(f) for f in folders], kind)

    def ours(cls, config, module):  # built on meta, then given a copy of the reference's weights
        with torch.device("meta"):
            m = cls(config)
        return unet.load_weights(m, {k: v.detach().clone() for k, v in module.state_dict().items()})
    archs = ["CLIPTextModel", "CLIPTextModelWithProjection"]
    text_cfgs = [unet.CLIPTextConfig.from_dict(dict(c, architectures=[a])) for c, a in zip(cfg["text"], archs)]
    sd = unet.SD(unet=ours(unet.UNet, unet.UNetConfig.from_dict(dict(cfg["unet"])), ref_unet),
                 vae=ours(unet.VAE, unet.VAEConfig.from_dict(dict(cfg["vae"], _class_name="AutoencoderKL")), vae),
                 text_encoders=[ours(unet.CLIPText, c, m) for c, m in zip(text_cfgs, texts)],
                 tokenizers=[unet.CLIPTokenizer.from_folder(f) for f in folders],
                 scheduler_config=dict(SCHEDULER), kind=kind)
    return sd, ref


def folder_models(folder, device):
    """A diffusers-layout folder (the toy model `tiny`, a test hub, a downloaded pipeline) loaded by both."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    folder = str(unet.TINY_FOLDER if folder == "tiny" else folder)
    sd = unet.load_sd(folder, device=device)
    texts = [CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))]
    tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))]
    if sd.kind == "sdxl":
        texts.append(CLIPTextModelWithProjection.from_pretrained(os.path.join(folder, "text_encoder_2")))
        tokenizers.append(CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")))
    ref = Reference(UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).to(device),
                    AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).to(device),
                    [t.to(device) for t in texts], tokenizers, sd.kind)
    return sd, ref


def make_batch(pairs, resolution, seed=0):
    """A data-loader batch of `pairs` pairs as data.py yields it: pixels in [-1, 1] (B, 3, R, R), prompts, indices."""
    g = torch.Generator().manual_seed(seed)
    pix = lambda: torch.rand(pairs, 3, resolution, resolution, generator=g) * 2 - 1  # noqa: E731
    prompts = [f"a {['red', 'blue', 'green'][i % 3]} {['cube', 'cat', 'tree', 'car'][i % 4]}" for i in range(pairs)]
    return dict(chosen=pix(), rejected=pix(), prompts=prompts, index=torch.arange(pairs))


def reference_dpo_step(ref, half=torch.bfloat16, beta=5000.0, optimizer="adamw", checkpointing=False, lr=1e-6,
                       posterior="sample"):
    """The official train.py's step, written with diffusers: the VAE and text encoders in half precision inside
    the step, fp32 trainable UNet under autocast, a frozen half-precision copy as the reference UNet,
        latents = vae.encode(x).latent_dist.sample() * scaling_factor,  noise and t shared by winner and loser,
        mse = (unet(x_t).sample - eps)^2 per image, inside = -0.5 beta ((mse_w - mse_l) - (ref_w - ref_l)),
    AdamW (fused on CUDA, as ours: the step is compared, not two AdamW kernels) for SD1.5, transformers' Adafactor
    (scale_parameter=False, relative_step=False) for SDXL, gradient clipping at 1.0.
    Returns step(batch, input_ids, noise, t) -> loss."""
    from diffusers import DDPMScheduler
    device = ref.unet.device
    for m in [ref.vae, *ref.text_encoders]:
        m.requires_grad_(False).eval().to(half)
    policy = ref.unet.requires_grad_(True).train()
    ref_unet = copy.deepcopy(policy).requires_grad_(False).eval().to(half)
    if checkpointing:
        policy.enable_gradient_checkpointing()
    else:
        policy.disable_gradient_checkpointing()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")  # as every SD1.5 / SDXL scheduler config
    if optimizer == "adamw":
        opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2,
                                fused=device.type == "cuda")
    else:
        from transformers.optimization import Adafactor
        opt = Adafactor(policy.parameters(), lr=lr, weight_decay=1e-2, clip_threshold=1.0, scale_parameter=False,
                        relative_step=False)
    autocast = torch.autocast(device.type, dtype=half, enabled=half != torch.float32)

    def step(batch, input_ids, noise, t):
        with torch.no_grad():
            pixels = torch.cat([batch["chosen"], batch["rejected"]]).to(device, half)
            dist = ref.vae.encode(pixels).latent_dist
            latents = (dist.sample() if posterior == "sample" else dist.mean).float() * ref.vae.config.scaling_factor
            if ref.kind == "sdxl":  # penultimate states of both encoders, pooled projection of the second
                outs = [enc(ids.to(device), output_hidden_states=True) for enc, ids in zip(ref.text_encoders,
                                                                                           input_ids)]
                context = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
                R = pixels.shape[-1]
                added = dict(text_embeds=outs[1].text_embeds.float().repeat(2, 1),
                             time_ids=torch.tensor([[R, R, 0, 0, R, R]], device=device).float().repeat(len(pixels), 1))
            else:
                context, added = ref.text_encoders[0](input_ids[0].to(device))[0], None
            context = context.float().repeat(2, 1, 1)
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast:
            pred = policy(noisy, t, context, added_cond_kwargs=added).sample
        model_losses = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        model_w, model_l = model_losses.chunk(2)
        with torch.no_grad(), autocast:
            ref_pred = ref_unet(noisy, t, context, added_cond_kwargs=added).sample
        ref_losses = (ref_pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3])
        ref_w, ref_l = ref_losses.chunk(2)
        loss = -F.logsigmoid(-0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    step.policy = policy
    return step


def reference_inputs(ref, batch, device, T=1000):
    """What the reference's data loader and loop hand its step: token ids per tokenizer, and the same noise and
    timesteps diffdpo.py draws for these pairs (so both steps compute the same thing)."""
    ids = [tok(batch["prompts"], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in ref.tokenizers]
    R = batch["chosen"].shape[-1]
    f = 2 ** (len(ref.vae.config.block_out_channels) - 1)
    noise, t = pair_noise(batch["index"], (ref.vae.config.latent_channels, R // f, R // f), 0, T)
    return ids, noise.to(device).repeat(2, 1, 1, 1), t.to(device).repeat(2)
