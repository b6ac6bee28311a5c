"""
The networks of Stable Diffusion 1.5 / 2.x / SDXL, written by hand in plain PyTorch, and the loader that
reads their Hugging Face Hub checkpoints (safetensors) with no diffusers/transformers.

    UNet          epsilon-prediction UNet        (diffusers UNet2DConditionModel)
    VAE           latent autoencoder             (diffusers AutoencoderKL)
    CLIPText      CLIP / OpenCLIP text encoder   (transformers CLIPTextModel[WithProjection])
    CLIPTokenizer byte-level BPE                 (transformers CLIPTokenizer)
    load_sd       alias | Hub repo id | local diffusers folder | single-file .safetensors  ->  SD

Every module is named after the state-dict keys of the reference libraries, so a checkpoint loads with a plain
strict `load_state_dict` and no remap table. Shapes are tagged in comments: B batch, C channels, H/W spatial,
L tokens, D width. Read top to bottom: configs, building blocks, UNet, VAE, text encoder, tokenizer, loader.
"""
import contextlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

class LoadError(ValueError):
    """A user-facing, one-line problem with a checkpoint or config: names the file / key and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Configs: one dataclass per network, built from the checkpoint's config.json, with named presets.


def _from_dict(cls, d):
    """Build a config dataclass from a diffusers/transformers config dict, keeping the dict itself as `raw`
    (so a saved model carries exactly the config it was loaded with). Unknown fields are ignored."""
    names = {f.name for f in fields(cls)}
    cfg = cls(**{k: v for k, v in d.items() if k in names and k != "raw"})
    cfg.raw = dict(d)
    return cfg


def _per_block(v, n):
    """diffusers allows an int (same for every block) or a per-block list for several UNet fields."""
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: object = 2                # int or per block
    attention_head_dim: object = 8              # int or per block; a NUMBER OF HEADS (historic misnomer)
    num_attention_heads: object = None          # if set, overrides attention_head_dim
    transformer_layers_per_block: object = 1    # int or per block
    reverse_transformer_layers_per_block: object = None
    cross_attention_dim: object = 768
    use_linear_projection: bool = False
    only_cross_attention: object = False
    upcast_attention: bool = False              # SD2.1: the reference SDPA path ignores it too
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    act_fn: str = "silu"
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    class_embed_type: object = None
    num_class_embeds: object = None
    encoder_hid_dim: object = None
    addition_embed_type: object = None          # "text_time" for SDXL
    addition_time_embed_dim: object = None      # 256 for SDXL
    projection_class_embeddings_input_dim: object = None  # 2816 = 1280 pooled + 6 * 256 for SDXL
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_cond_proj_dim: object = None
    timestep_post_act: object = None
    dual_cross_attention: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    def check(self):
        """Refuse config fields this implementation does not cover, instead of silently computing something else."""
        unsupported = dict(center_input_sample=False, act_fn="silu", resnet_time_scale_shift="default",
                           time_embedding_type="positional", class_embed_type=None, num_class_embeds=None,
                           encoder_hid_dim=None, conv_in_kernel=3, conv_out_kernel=3, time_cond_proj_dim=None,
                           timestep_post_act=None, dual_cross_attention=False, mid_block_type="UNetMidBlock2DCrossAttn")
        for k, ok in unsupported.items():
            if getattr(self, k) != ok:
                raise LoadError(f"unet config: {k}={getattr(self, k)!r} is not supported (expected {ok!r})")
        if self.addition_embed_type not in (None, "text_time"):
            raise LoadError(f"unet config: addition_embed_type={self.addition_embed_type!r} is not supported")
        if any(_per_block(self.only_cross_attention, len(self.block_out_channels))):
            raise LoadError("unet config: only_cross_attention=True is not supported")
        for t in self.down_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise LoadError(f"unet config: down block type {t!r} is not supported")
        for t in self.up_block_types:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise LoadError(f"unet config: up block type {t!r} is not supported")
        return self

    @classmethod
    def from_dict(cls, d):
        return _from_dict(cls, d).check()

    @classmethod
    def sd15(cls):
        return cls.from_dict(dict(SD15_UNET))

    @classmethod
    def sdxl(cls):
        return cls.from_dict(dict(SDXL_UNET))

    @classmethod
    def tiny(cls):
        return cls.from_dict(dict(TINY_UNET))


# The real configs, as in the Hub repos' unet/config.json (the fields that differ from the defaults above).
SD15_UNET = dict(_class_name="UNet2DConditionModel", sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(_class_name="UNet2DConditionModel", sample_size=128, block_out_channels=[320, 640, 1280],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
# The toy world's model (python diffdpo.py --model tiny): the same networks at a few million parameters, 32 px images
# -> 8 x 8 x 4 latents; its pretrained weights live in tiny/ beside this file (see diffdpo.pretrain_tiny).
TINY_UNET = dict(_class_name="UNet2DConditionModel", sample_size=8, block_out_channels=[32, 64],
                 down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                 layers_per_block=1, attention_head_dim=4, cross_attention_dim=64, norm_num_groups=16)
TINY_VOCAB = 640  # 512 byte symbols + whole-word merges of the toy captions + the 2 special tokens


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215             # 0.13025 for SDXL
    shift_factor: object = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        cfg = _from_dict(cls, d)
        if cfg.shift_factor not in (None, 0, 0.0) or cfg.act_fn != "silu":
            raise LoadError("vae config: shift_factor / act_fn other than silu are not supported")
        return cfg

    @classmethod
    def sd15(cls):
        return cls.from_dict(dict(_class_name="AutoencoderKL"))

    @classmethod
    def sdxl(cls):
        return cls.from_dict(dict(_class_name="AutoencoderKL", scaling_factor=0.13025, sample_size=1024))

    @classmethod
    def tiny(cls):
        return cls.from_dict(dict(_class_name="AutoencoderKL", block_out_channels=[16, 32, 32], norm_num_groups=8,
                                  layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 3,
                                  up_block_types=["UpDecoderBlock2D"] * 3, sample_size=32))


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"              # OpenCLIP bigG / ViT-H: "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2                       # 2 in old configs means: the EOS is the argmax id (see pool)
    with_projection: bool = False               # CLIPTextModelWithProjection (SDXL's second encoder)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        cfg = _from_dict(cls, d)
        cfg.with_projection = "CLIPTextModelWithProjection" in d.get("architectures", [])
        if cfg.hidden_act not in ("quick_gelu", "gelu"):
            raise LoadError(f"text encoder config: hidden_act={cfg.hidden_act!r} is not supported")
        return cfg

    @classmethod
    def sd15(cls):  # CLIP ViT-L/14 text tower
        return cls.from_dict(dict(architectures=["CLIPTextModel"]))

    @classmethod
    def sdxl(cls):  # OpenCLIP ViT-bigG/14 text tower, SDXL's text_encoder_2 (its first is sd15())
        return cls.from_dict(dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280,
                                  intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                  hidden_act="gelu", projection_dim=1280, eos_token_id=49407))

    @classmethod
    def tiny(cls):
        return cls.from_dict(dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=TINY_VOCAB,
                                  hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=16, projection_dim=64, eos_token_id=2))


# ----------------------------------------------------------------------------------------------------------------
# Building blocks shared by the UNet and the VAE


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' get_timestep_embedding:
    freqs_k = exp(-ln(max_period) * k / (dim/2 - freq_shift)), emb = [sin(t freqs), cos(t freqs)] (or cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]                                    # (B, dim/2)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, the time embedding added in between, 1x1 conv on the skip if channels change."""

    def __init__(self, cin, cout, temb_dim, groups, eps, scale=1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.scale = scale

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        x = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (x + h) / self.scale if self.scale != 1.0 else x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE encoder pads asymmetrically (right/bottom only) and the conv itself pads 0."""

    def __init__(self, c, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)
        self.asym = padding == 0

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asym else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to a given size, for odd latent sizes) then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def attention(q, k, v, heads, causal=False):
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v, on (B, L, heads*d) tensors."""
    B, Lq, D = q.shape
    q, k, v = (z.view(B, -1, heads, D // heads).transpose(1, 2) for z in (q, k, v))  # (B, heads, L, d)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return o.transpose(1, 2).reshape(B, Lq, D)                                  # (B, L, heads*d)


class Attention(nn.Module):
    """Self- or cross-attention with separate q/k/v projections (no bias in the UNet, bias in the VAE)."""

    def __init__(self, dim, heads, context_dim=None, bias=False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out[0](attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


# ----------------------------------------------------------------------------------------------------------------
# UNet: epsilon(x_t, t, text) -- the network Diffusion-DPO fine-tunes


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # [1] was dropout

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to the text, GEGLU feed-forward; each with a residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, project to tokens (1x1 conv in SD1.5, linear in SD2/SDXL), transformer blocks, project back."""

    def __init__(self, c, heads, context_dim, depth, groups, linear):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)                         # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()             # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class UNetBlock(nn.Module):
    """One resolution level of the UNet: `resnets` (each optionally followed by a spatial transformer in
    `attentions`), then a down- or up-sampler. Up blocks concatenate a skip from the down path before each resnet.
    Covers diffusers' DownBlock2D, CrossAttnDownBlock2D, UpBlock2D, CrossAttnUpBlock2D."""

    def __init__(self, resnets, attentions, downsample=None, upsample=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])
        self.grad_checkpointing = False

    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, h, temb, context, skips=None, up_size=None):
        outputs = []
        attns = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attns):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)                          # (B, C + C_skip, H, W)
            h = self._run(resnet, h, temb)
            if attn is not None:
                h = self._run(attn, h, context)
            outputs.append(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
            outputs.append(h)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h, up_size)
        return h, outputs


class MidBlock(nn.Module):
    """resnet, then (transformer, resnet) pairs: diffusers' UNetMidBlock2DCrossAttn, and without text and with
    plain self-attention, the VAE's UNetMidBlock2D."""

    def __init__(self, resnets, attentions):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, h, temb=None, context=None):
        h = self.resnets[0](h, temb)
        attns = list(self.attentions) or [None] * (len(self.resnets) - 1)   # a VAE may have no mid attention
        for attn, resnet in zip(attns, self.resnets[1:]):
            if attn is not None:
                h = attn(h, context) if context is not None else attn(h)
            h = resnet(h, temb)
        return h


class UNet(nn.Module):
    """UNet2DConditionModel. Down path (saving skips), mid block, up path (consuming skips in reverse)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        n, ch = len(cfg.block_out_channels), list(cfg.block_out_channels)
        layers = _per_block(cfg.layers_per_block, n)
        heads = _per_block(cfg.num_attention_heads or cfg.attention_head_dim, n)
        depth = _per_block(cfg.transformer_layers_per_block, n)
        ctx = _per_block(cfg.cross_attention_dim, n)
        up_depth = cfg.reverse_transformer_layers_per_block or depth[::-1]
        temb = 4 * ch[0]
        G, eps = cfg.norm_num_groups, cfg.norm_eps

        def resnet(cin, cout, scale=1.0):
            return ResnetBlock2D(cin, cout, temb, G, eps, scale)

        def transformer(c, i, d):
            return Transformer2DModel(c, heads[i], ctx[i], d, G, cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_embed_type == "text_time":                              # SDXL micro-conditioning
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout, last = ch[max(i - 1, 0)], ch[i], i == n - 1
            attn = kind.startswith("CrossAttn")
            self.down_blocks.append(UNetBlock(
                [resnet(cin if j == 0 else cout, cout) for j in range(layers[i])],
                [transformer(cout, i, depth[i]) for j in range(layers[i])] if attn else [],
                downsample=None if last else Downsample2D(cout, cfg.downsample_padding)))

        self.mid_block = MidBlock([resnet(ch[-1], ch[-1], cfg.mid_block_scale_factor) for _ in range(2)],
                                  [transformer(ch[-1], n - 1, depth[-1])])

        self.up_blocks = nn.ModuleList()
        rch, rlayers = ch[::-1], layers[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout, cskip, last = rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], i == n - 1
            nl, attn = rlayers[i] + 1, kind.startswith("CrossAttn")
            resnets = [resnet((prev if j == 0 else cout) + (cskip if j == nl - 1 else cout), cout) for j in range(nl)]
            self.up_blocks.append(UNetBlock(
                resnets, [transformer(cout, n - 1 - i, up_depth[i]) for _ in range(nl)] if attn else [],
                upsample=None if last else Upsample2D(cout)))

        self.conv_norm_out = nn.GroupNorm(G, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def set_grad_checkpointing(self, on=True):
        """Recompute each resnet / transformer in the backward pass instead of storing its activations."""
        for b in list(self.down_blocks) + list(self.up_blocks):
            b.grad_checkpointing = on

    def forward(self, x, t, context, text_embeds=None, time_ids=None):
        """x (B, 4, h, w) noisy latents, t (B,) or scalar timesteps, context (B, L, D) text states;
        SDXL also takes text_embeds (B, 1280) pooled text and time_ids (B, 6). Returns eps (B, 4, h, w)."""
        cfg = self.cfg
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim <= 1 and t.numel() == 1 else t.reshape(x.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(x.dtype))                            # (B, 4*C0)
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise LoadError("this UNet (SDXL) needs text_embeds (pooled text) and time_ids")
            tid = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(x.shape[0], -1)   # (B, 6*256)
            emb = emb + self.add_embedding(torch.cat([text_embeds, tid], dim=-1).to(emb.dtype))

        # odd latent sizes: each upsampler goes to the exact size of the matching skip
        odd = any(s % 2 ** (len(self.up_blocks) - 1) for s in x.shape[-2:])
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, out = block(h, emb, context)
            skips += out
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            n_skip = len(block.resnets)
            mine, skips = skips[-n_skip:], skips[:-n_skip]
            h, _ = block(h, emb, context, skips=mine, up_size=skips[-1].shape[-2:] if odd and skips else None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# VAE: image (B, 3, H, W) in [-1, 1]  <->  latent (B, 4, H/8, W/8)


class VAEAttention(Attention):
    """Single-head self-attention over pixels with a GroupNorm in front and a residual (the VAE's mid block)."""

    def __init__(self, c, groups):
        super().__init__(c, 1, bias=True)
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)               # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


def _vae_mid(c, groups, attn=True):
    return MidBlock([ResnetBlock2D(c, c, None, groups, 1e-6) for _ in range(2)],
                    [VAEAttention(c, groups)] if attn else [])


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, n = list(cfg.block_out_channels), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(UNetBlock(
            [ResnetBlock2D(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], None, G, 1e-6)
             for j in range(cfg.layers_per_block)], [],
            downsample=Downsample2D(ch[i], padding=0) if i < n - 1 else None) for i in range(n))
        self.mid_block = _vae_mid(ch[-1], G, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(G, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, None, None)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))                      # (B, 2*latent, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, G, n = list(cfg.block_out_channels)[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = _vae_mid(rch[0], G, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(UNetBlock(
            [ResnetBlock2D(rch[max(i - 1, 0)] if j == 0 else rch[i], rch[i], None, G, 1e-6)
             for j in range(cfg.layers_per_block + 1)], [],
            upsample=Upsample2D(rch[i]) if i < n - 1 else None) for i in range(n))
        self.conv_norm_out = nn.GroupNorm(G, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h, _ = block(h, None, None)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(nn.Module):
    """AutoencoderKL. encode(x) returns the posterior MEAN (no sampling, before the scaling factor);
    training multiplies by `scaling_factor` to get unit-variance latents, decode(z) expects z / scaling_factor."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg, self.scaling_factor = cfg, cfg.scaling_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c2 // 2, c2 // 2, 1) if cfg.use_post_quant_conv else None

    def encode(self, x):
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.cfg.latent_channels]                          # mean; [latent:] is log-variance

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder: token ids (B, 77) -> hidden states (B, 77, D), pooled (B, D) at the EOS token


class CLIPAttention(nn.Module):
    def __init__(self, d, heads, causal=True):  # causal for text, not for CLIP's vision tower (eval.py)
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, d, inner, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(d, inner), nn.Linear(inner, d), act

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.act == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class CLIPLayer(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        d = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, causal)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(cfg, causal) for _ in range(cfg.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPText(nn.Module):
    """CLIPTextModel (and, with cfg.with_projection, CLIPTextModelWithProjection).
    forward(ids) -> (last, penultimate, pooled):
      last        (B, L, D) final layer after the final LayerNorm   (SD1.5's context)
      penultimate (B, L, D) output of the second-to-last layer      (SDXL's context, both encoders)
      pooled      (B, D or P) final-normed state at each prompt's EOS token, projected if with_projection
                  (SDXL's `text_embeds`)"""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.with_projection:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids):
        tm = self.text_model
        h = tm.embeddings(ids)                                                  # (B, L, D)
        penultimate = h
        for layer in tm.encoder.layers:
            penultimate = h
            h = layer(h)
        last = tm.final_layer_norm(h)
        # the EOS position: configs with eos_token_id == 2 are older than the 49407 vocabulary id and use argmax
        eos = ids.argmax(-1) if self.cfg.eos_token_id == 2 else (ids == self.cfg.eos_token_id).int().argmax(-1)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), eos]       # (B, D)
        if self.cfg.with_projection:
            pooled = self.text_projection(pooled)
        return last, penultimate, pooled


# ----------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): a frozen layer W plus a trained low-rank update, y = W x + (alpha / r) B A x,
# A (r, in), B (out, r). Named as peft names it inside diffusers (`...attn1.to_q.lora_A.weight`); the wrapped layer
# keeps its own `weight` / `bias` keys, so a base checkpoint still loads into a UNet that has adapters.

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' `pipeline.load_lora_weights(folder)` reads
LORA_TARGETS = "to_q,to_k,to_v,to_out.0"        # the attention projections of every transformer block


class LoRALinear(nn.Module):
    """An nn.Linear with an adapter: y = W x + b + (alpha / r) B(A(x)). A starts Kaiming-uniform (as nn.Linear and
    peft draw it), B at zero, so adding an adapter leaves the output exactly unchanged; `enabled = False` runs the
    base layer alone."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y + self.scale * self.lora_B(self.lora_A(x)) if self.enabled else y

    @torch.no_grad()
    def merged(self):
        """The plain nn.Linear with weight W + (alpha / r) B A (summed in fp32)."""
        W, A, B = self.weight, self.lora_A.weight.float(), self.lora_B.weight.float()
        out = nn.Linear(W.shape[1], W.shape[0], bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter((W.float() + self.scale * (B @ A)).to(W.dtype), requires_grad=False)
        out.bias = self.bias
        return out


def _replace(root, name, module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def add_lora(unet, rank, alpha=None, targets=LORA_TARGETS):
    """Wrap each nn.Linear whose name is a target or ends in "." + target (peft's rule: "to_q" is every to_q) in a
    LoRALinear, and freeze all but the adapters. alpha defaults to rank (scale 1). Returns the wrapped names."""
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    match = lambda name, t: name == t or name.endswith("." + t)  # noqa: E731
    names = [n for n, _ in unet.named_modules() if any(match(n, t) for t in targets)]
    for t in targets:
        if not any(match(n, t) for n in names):
            raise LoadError(f"LoRA target {t!r}: no layer of this UNet is named so (the transformer blocks' layers: "
                            f"to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out)")
    for n in names:
        if not isinstance(unet.get_submodule(n), nn.Linear):
            raise LoadError(f"LoRA target: {n} is a {type(unet.get_submodule(n)).__name__}; LoRA here wraps "
                            f"nn.Linear layers only (SD1.5's proj_in / proj_out are 1x1 convolutions)")
    unet.requires_grad_(False)
    for n in names:
        _replace(unet, n, LoRALinear(unet.get_submodule(n), rank, alpha or rank))
    return names


@contextlib.contextmanager
def lora_disabled(unet):
    """`with lora_disabled(unet): unet(...)` runs the base model: the DPO reference, with no second copy."""
    layers = [m for m in unet.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield unet
    finally:
        for m in layers:
            m.enabled = True


def lora_state_dict(unet):
    """The adapters as diffusers' `load_lora_weights` reads them (peft names, `unet.` prefix): per layer
    `unet.<name>.lora_A.weight` (r, in) and `unet.<name>.lora_B.weight` (out, r), with alpha / r folded into B, so
    any loader that assumes alpha = r (diffusers, peft, ComfyUI with no alphas in the file) computes the same y."""
    return {f"unet.{n}.{k}": (w * m.scale if k == "lora_B.weight" else w).detach().contiguous().cpu()
            for n, m in unet.named_modules() if isinstance(m, LoRALinear)
            for k, w in (("lora_A.weight", m.lora_A.weight), ("lora_B.weight", m.lora_B.weight))}


def save_lora(unet, path):
    """Write lora_state_dict(unet) to `path` (a .safetensors file), atomically (temp file + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    save_file(lora_state_dict(unet), str(path) + ".tmp", metadata={"format": "pt"})
    os.replace(str(path) + ".tmp", path)


def load_lora(unet, path):
    """Add the adapters of a LoRA file to `unet`, unmerged. `path`: a run folder (its LORA_FILE) or a .safetensors
    file in the peft format diffusers writes (`unet.<name>.lora_A.weight` / `.lora_B.weight`). The scale is 1 (alpha
    folded into B, as save_lora writes), or lora_alpha / r from the file's diffusers metadata when it has some."""
    from safetensors import safe_open
    path = Path(path)
    path = path / LORA_FILE if path.is_dir() else path
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise LoadError(f"{path}: LoRA file not found (expected a run folder with {LORA_FILE}, or the file)") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("unet.rank_pattern") or meta.get("unet.alpha_pattern"):
        raise LoadError(f"{path}: per-layer ranks or alphas (rank_pattern / alpha_pattern) are not supported")
    other = [k for k in sd if not k.startswith("unet.")]
    if other:
        raise LoadError(f"{path}: key {other[0]!r}: only UNet adapters (unet.<layer>.lora_A/B.weight) are supported")
    names = list(dict.fromkeys(k[len("unet."):].rpartition(".lora_")[0] for k in sd))
    for n in names:
        a, b = sd.pop(f"unet.{n}.lora_A.weight", None), sd.pop(f"unet.{n}.lora_B.weight", None)
        if a is None or b is None or not n:
            raise LoadError(f"{path}: layer {n!r}: expected exactly the pair unet.<layer>.lora_A.weight / "
                            f".lora_B.weight (UNet adapters in the peft format)")
        try:
            base = unet.get_submodule(n)
        except AttributeError:
            raise LoadError(f"{path}: key unet.{n}.lora_A.weight: this UNet has no layer {n}") from None
        if not isinstance(base, nn.Linear) or a.shape != (a.shape[0], base.in_features) or \
                b.shape != (base.out_features, a.shape[0]):
            raise LoadError(f"{path}: key unet.{n}.lora_A/B.weight has shapes {tuple(a.shape)} / {tuple(b.shape)}, "
                            f"which do not fit {n} ({type(base).__name__} {tuple(base.weight.shape)})")
        layer = LoRALinear(base, a.shape[0], a.shape[0] * meta.get("unet.lora_alpha", 1) / meta.get("unet.r", 1))
        layer.lora_A.weight.data.copy_(a)
        layer.lora_B.weight.data.copy_(b)
        _replace(unet, n, layer)
    if sd:  # lora_B biases, DoRA magnitudes, ...
        raise LoadError(f"{path}: key {next(iter(sd))!r} is not supported (plain lora_A / lora_B weights only)")
    return unet


def merge_lora(unet):
    """Fold every adapter into its layer, W <- W + (alpha / r) B A, leaving a plain UNet (diffusers' keys and speed)."""
    for n, m in list(unet.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(unet, n, m.merged())
    return unet


# ----------------------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer
# Exactly what transformers' CLIPTokenizer (the `tokenizers` backend) does, in plain Python:
#   1. special tokens (<|startoftext|>, <|endoftext|>, and the pad token, e.g. SDXL tokenizer_2's "!") are cut out of
#      the RAW text first: a literal "<|endoftext|>" or, for tokenizer_2, every "!" becomes that token's id;
#   2. each remaining segment: NFC, runs of Unicode white space -> " ", lowercase (char by char: no final sigma);
#   3. split into words: <|startoftext|> | <|endoftext|> | 's 't 're 've 'm 'll 'd | letters+ | one digit |
#      other non-space characters+ (white space dropped); byte-level GPT-2 splitting then cuts the two literal
#      special-token words into "<|", name, "|>";
#   4. each word's UTF-8 bytes -> printable unicode chars, "</w>" appended to the last, BPE merges by rank;
#   5. [bos] + ids + [eos], truncated to 77 keeping eos last, padded with the pad id.
# Letters / numbers / lowercase come from Python's unicodedata (Unicode 14 on Python 3.11); characters assigned by
# later Unicode versions (e.g. CJK Extension H) may split differently from the Rust library's newer tables.

WHITESPACE = set("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
LITERALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]       # control bytes, space, ... -> U+0100 onwards
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _kind(c):
    """'L' letter, 'N' number, 'S' white space, 'P' anything else (the regex classes p{L}, p{N}, s)."""
    if c in WHITESPACE:
        return "S"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def split_words(text):
    """Step 3 on normalized text (a hand-written scanner for the pre-tokenizer's regex, first alternative wins)."""
    words, i, n = [], 0, len(text)
    while i < n:
        k = _kind(text[i])
        lit = text[i] in "'<" and next((w for w in LITERALS + CONTRACTIONS if text.startswith(w, i)), None)
        if k == "S":
            i += 1
            continue
        if lit:
            j = i + len(lit)
            words += ["<|", lit[2:-2], "|>"] if lit in LITERALS else [lit]
        elif k == "N":
            j = i + 1
            words.append(text[i])
        else:
            j = i + 1
            while j < n and _kind(text[j]) == k:
                j += 1
            words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """CLIP's byte-level BPE: vocab.json + merges.txt; `tok(prompts) -> LongTensor (B, 77)`.
    `specials` maps each special token to whether transformers matches it in the normalized text (True) or in the
    raw text (False); see from_folder."""

    def __init__(self, vocab, merges, pad_token="<|endoftext|>", max_length=77, specials=None):
        self.vocab, self.max_length = vocab, max_length
        self.ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
        self.bos, self.eos, self.pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad_token]
        specials = specials or {t: False for t in ("<|startoftext|>", "<|endoftext|>", pad_token)}
        self.raw_re, self.norm_re = (
            re.compile("(" + "|".join(map(re.escape, sorted(ts, key=len)[::-1])) + ")") if ts else None
            for ts in ([t for t, n in specials.items() if not n], [t for t, n in specials.items() if n]))
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_folder(cls, folder):
        """A Hub tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.
        The pad token: SD1.5 <|endoftext|>, SDXL's tokenizer_2 "!". Whether a special token is matched before or
        after normalization follows transformers 5: an `added_tokens_decoder` in tokenizer_config.json decides;
        otherwise special_tokens_map.json (over tokenizer_config.json), where a plain string means raw, a dict its
        own "normalized", and the last of bos, eos, unk, pad wins. So in SD1.5's folder "<|STARTOFTEXT|>" is
        matched (normalized) but "<|ENDOFTEXT|>" is not (the plain-string pad token makes it raw)."""
        folder = Path(folder)
        vocab = _read_json(folder / "vocab.json")
        try:
            merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        except OSError as e:
            raise LoadError(f"{folder / 'merges.txt'}: not readable ({e})") from None
        merges = [m for m in merges[1 if merges[0].startswith("#version") else 0:] if m.strip()]
        read = lambda n: _read_json(folder / n) if (folder / n).is_file() else {}  # noqa: E731
        conf, keys = read("tokenizer_config.json"), ("bos_token", "eos_token", "unk_token", "pad_token")
        decoder = {t["content"]: t.get("normalized", not t.get("special", False))
                   for t in (conf.get("added_tokens_decoder") or {}).values()}
        tokens = {k: conf.get(k) for k in keys}
        if not decoder:
            tokens.update({k: v for k, v in read("special_tokens_map.json").items() if k in keys and v})
        specials, names = dict(decoder), {}
        for k, default in zip(keys, ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")):
            v = tokens[k] or default
            names[k] = content = v["content"] if isinstance(v, dict) else v
            specials[content] = decoder.get(content, bool(v.get("normalized", False)) if isinstance(v, dict) else False)
        max_length = conf.get("model_max_length", 77)
        return cls(vocab, merges, names["pad_token"], max_length if max_length < 10_000 else 77, specials)

    def bpe(self, word):
        """Merge the word's symbols (its UTF-8 bytes as byte_chars), lowest-ranked pair first, until no listed merge
        applies."""
        if word in self.cache:
            return self.cache[word]
        chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
        syms = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(syms) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(syms, syms[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(syms):
                if i < len(syms) - 1 and (syms[i], syms[i + 1]) == pair:
                    merged.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        ids = [self.vocab[s] for s in syms]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        """One prompt -> [bos, ..., eos] (not padded or truncated)."""
        ids = []
        for raw in (self.raw_re.split(text) if self.raw_re else [text]):   # [text, special, text, ..., text]
            if self.raw_re and self.raw_re.fullmatch(raw):
                ids.append(self.vocab[raw])
                continue
            norm = "".join(" " if c in WHITESPACE else c.lower() for c in unicodedata.normalize("NFC", raw))
            for part in (self.norm_re.split(norm) if self.norm_re else [norm]):
                if self.norm_re and self.norm_re.fullmatch(part):
                    ids.append(self.vocab[part])
                    continue
                for word in split_words(part):
                    ids += self.bpe(word)
        return [self.bos] + ids + [self.eos]

    def __call__(self, prompts):
        rows = []
        for ids in map(self.encode, [prompts] if isinstance(prompts, str) else prompts):
            ids = ids[: self.max_length - 1] + [self.eos] if len(ids) > self.max_length else ids
            rows.append(ids + [self.pad] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (original LDM / SGM key names) -> diffusers / transformers key names
# Original (LDM / SGM) checkpoints name the same tensors differently. One function maps each of our (diffusers /
# transformers) keys to its original name; loading looks every expected key up through it, and tests use it to
# write single files. The UNet's input_blocks / output_blocks number the resnet+attention layers and samplers of
# all levels consecutively; the VAE decoder's up blocks are stored deepest-last; OpenCLIP fuses q, k, v.

LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              ("text_encoder", "sd15"): "cond_stage_model.transformer.", ("text_encoder", "sd2"): "cond_stage_model.model.",
              ("text_encoder", "sdxl"): "conditioner.embedders.0.transformer.",
              ("text_encoder_2", "sdxl"): "conditioner.embedders.1.model."}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj"}


def detect_family(keys):
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    return "sd2" if any(k.startswith("cond_stage_model.model.") for k in keys) else "sd15"


def _unet_ldm(key, cfg):
    """diffusers UNet key -> original name (without prefix)."""
    n = len(cfg.block_out_channels)
    layers = _per_block(cfg.layers_per_block, n)
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, param = key.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{param}"
    p = key.split(".")
    kind = p[2] if p[0] != "mid_block" else p[1]

    def rest(q):  # inside a resnet the names differ; inside a transformer they are the same
        return ".".join([RESNET.get(q[0], q[0])] + q[1:]) if kind == "resnets" else ".".join(q)

    if p[0] == "mid_block":  # resnet, transformer, resnet
        return f"middle_block.{1 if kind == 'attentions' else 2 * int(p[2])}." + rest(p[3:])
    i = int(p[1])
    if p[0] == "down_blocks":
        first = 1 + sum(layers[b] + 1 for b in range(i))
        if kind == "downsamplers":
            return f"input_blocks.{first + layers[i]}.0.op." + ".".join(p[5:])
        return f"input_blocks.{first + int(p[3])}.{1 if kind == 'attentions' else 0}." + rest(p[4:])
    up = [layers[::-1][b] + 1 for b in range(n)]
    first = sum(up[:i])
    if kind == "upsamplers":
        has_attn = cfg.up_block_types[i].startswith("CrossAttn")
        return f"output_blocks.{first + up[i] - 1}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
    return f"output_blocks.{first + int(p[3])}.{1 if kind == 'attentions' else 0}." + rest(p[4:])


def _vae_ldm(key, cfg):
    """diffusers VAE key -> original name; also says whether the tensor is a 1x1 conv there (attention q/k/v/out)."""
    n = len(cfg.block_out_channels)
    k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    k = k.replace("mid_block.attentions.0", "mid.attn_1")
    for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
        k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
    p = k.split(".")
    if p[1] in ("down_blocks", "up_blocks"):
        i = int(p[2]) if p[1] == "down_blocks" else n - 1 - int(p[2])
        what = {"resnets": f"block.{p[4]}", "downsamplers": "downsample", "upsamplers": "upsample"}[p[3]]
        k = ".".join([p[0], "down" if p[1] == "down_blocks" else "up", str(i), what] + p[5:])
    return k, ".attn_1." in k and k.endswith("weight") and not k.endswith("norm.weight")


def _openclip_ldm(key):
    """transformers CLIP text key -> OpenCLIP name, and how to cut it out of the stored tensor."""
    k = key.removeprefix("text_model.")
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if k in simple:
        return simple[k], None
    if k == "text_projection.weight":
        return "text_projection", "T"
    p = k.split(".")  # encoder.layers.i.<module>.<param>
    module, param = ".".join(p[3:-1]), p[-1]
    if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return f"transformer.resblocks.{p[2]}.attn.in_proj_{param}", "qkv".index(module[10])
    return f"transformer.resblocks.{p[2]}.{OPENCLIP[module]}.{param}", None


def ldm_key(component, key, family, unet_cfg, vae_cfg):
    """Our key of `component` -> (the original checkpoint's key, how to transform the stored tensor):
    None (as is), "conv" (a 1x1 conv weight -> linear), "T" (transposed), or 0/1/2 (q/k/v third of a fused tensor)."""
    if component == "unet":
        return LDM_PREFIX["unet"] + _unet_ldm(key, unet_cfg), None
    if component == "vae":
        k, conv = _vae_ldm(key, vae_cfg)
        return LDM_PREFIX["vae"] + k, "conv" if conv else None
    prefix = LDM_PREFIX[(component, family)]
    if prefix.endswith(".model."):
        k, how = _openclip_ldm(key)
        return prefix + k, how
    return prefix + key, None


def convert_ldm_checkpoint(sd, models, family, unet_cfg, vae_cfg, name="checkpoint"):
    """{component: module (meta)} -> {component: state dict in our names} read from an original-format state dict.
    unet_cfg / vae_cfg: UNetConfig / VAEConfig (the layout of input_blocks / output_blocks depends on them)."""
    out = {}
    for comp, model in models.items():
        out[comp] = {}
        for key in model.state_dict():
            src, how = ldm_key(comp, key, family, unet_cfg, vae_cfg)
            if src not in sd:
                raise LoadError(f"{name}: key {src} not found (needed for {comp}.{key}); is this a {family} checkpoint?")
            t = sd[src]
            if how == "conv":
                t = t.reshape(t.shape[:2])
            elif how == "T":
                t = t.t().contiguous()
            elif isinstance(how, int):
                t = t.chunk(3, dim=0)[how].contiguous()
            out[comp][key] = t
    return out


def convert_to_ldm(components, family, unet_cfg, vae_cfg):
    """The inverse, for tests: {component: our state dict} -> one original-format state dict."""
    sd = {}
    for comp, tensors in components.items():
        for key, t in tensors.items():
            dst, how = ldm_key(comp, key, family, unet_cfg, vae_cfg)
            if how == "conv":
                t = t[:, :, None, None]
            elif how == "T":
                t = t.t()
            elif isinstance(how, int):  # q, k, v -> one fused tensor
                parts = sd.setdefault(dst, [None] * 3)
                parts[how] = t
                if all(x is not None for x in parts):
                    sd[dst] = torch.cat(parts)
                continue
            sd[dst] = t.contiguous()
    return sd



# ----------------------------------------------------------------------------------------------------------------
# The whole model, and the loader

ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
           "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
           "sd2": "stabilityai/stable-diffusion-2-1"}
TINY_FOLDER = Path(__file__).resolve().parent / "tiny"  # `load_sd("tiny")`: the embedded toy model
# weight file stem of each component in the diffusers layout, and its network
COMPONENTS = {"unet": ("diffusion_pytorch_model", UNet, UNetConfig),
              "vae": ("diffusion_pytorch_model", VAE, VAEConfig),
              "text_encoder": ("model", CLIPText, CLIPTextConfig),
              "text_encoder_2": ("model", CLIPText, CLIPTextConfig)}


class SD:
    """A loaded Stable Diffusion: `unet`, `vae`, `text_encoders` and `tokenizers` (one each for SD1.5/2.x, two for
    SDXL), the scheduler's config dict, and `kind` ("sd15" for single-encoder models, "sdxl")."""

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler_config, kind, source=""):
        self.unet, self.vae, self.text_encoders, self.tokenizers = unet, vae, text_encoders, tokenizers
        self.scheduler_config, self.kind, self.source = scheduler_config, kind, source

    @property
    def modules(self):
        return [self.unet, self.vae, *self.text_encoders]

    def to(self, device=None, dtype=None):
        for m in self.modules:
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def encode_prompt(self, prompts):
        """Text conditioning exactly as diffusers' pipelines build it (no classifier-free guidance here).
        SD1.5/2.x: context = last hidden state after the final LayerNorm, pooled = None.
        SDXL: context = concat(penultimate states of CLIP-L, of OpenCLIP bigG)  (B, 77, 768 + 1280),
              pooled = bigG's projected EOS state (B, 1280)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            last, penultimate, pooled = enc(tok(prompts).to(self.device))
            states.append(penultimate if self.kind == "sdxl" else last)
        return torch.cat(states, dim=-1), (pooled if self.kind == "sdxl" else None)

    @staticmethod
    def time_ids(batch, height, width, crop=(0, 0), original=None, device=None, dtype=torch.float32):
        """SDXL micro-conditioning (original_h, original_w, crop_top, crop_left, target_h, target_w), (B, 6)."""
        original = original or (height, width)
        return torch.tensor([[*original, *crop, height, width]], device=device, dtype=dtype).repeat(batch, 1)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({e})") from None


def _variants(variant):
    return [variant, None] if variant else [None, "fp16"]


def _weight_files(folder, stem, variant=None):
    """The safetensors file(s) of one component: `stem[.variant].safetensors`, or the shards listed in
    `stem.safetensors.index[.variant].json`. Without a requested variant, the plain files are preferred and the
    fp16 variant is used when it is all the folder has; a requested variant is preferred the same way."""
    folder = Path(folder)
    for v in _variants(variant):
        single = folder / (f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors")
        index = folder / (f"{stem}.safetensors.index.{v}.json" if v else f"{stem}.safetensors.index.json")
        if single.is_file():
            return [single]
        if index.is_file():
            return [folder / name for name in sorted(set(_read_json(index)["weight_map"].values()))]
    raise LoadError(f"{folder}: no weights found, expected {stem}.safetensors, {stem}.fp16.safetensors or a "
                     f"{stem}.safetensors.index.json with its shards")


def read_safetensors(files, dtype=None):
    """Read safetensors file(s) into one {key: tensor} dict, casting each tensor as it is read (one copy in memory)."""
    from safetensors import safe_open
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    t = st.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except FileNotFoundError:
            raise LoadError(f"{f}: weight file not found") from None
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise LoadError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def _fix_keys(sd):
    """Older saved VAEs name the mid-block attention query/key/value/proj_attn (sometimes as 1x1 convs);
    old CLIP checkpoints carry a position_ids buffer. Bring both to the current names."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        for a, b in renames.items():
            if a in k and ".attentions." in k:
                k = k.replace(a, b)
                v = v.reshape(v.shape[:2]) if v.ndim == 4 else v
        out[k] = v
    return out


def load_weights(module, sd, name="model"):
    """Strict load with a one-line error naming the offending key; tensors are assigned, not copied, so a module
    built on the meta device never holds a second copy of the weights."""
    sd = _fix_keys(sd)
    if type(module) is CLIPText:  # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise LoadError(f"{name}: {len(missing)} missing keys (first: {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
    for k, v in expected.items():
        if v.shape != sd[k].shape:
            raise LoadError(f"{name}: key {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def load_component(folder, name, *, device="cpu", dtype=torch.float32, variant=None):
    """Load one network folder of the diffusers layout (`unet/`, `vae/`, `text_encoder[_2]/`): config.json + weights."""
    stem, cls, cfg_cls = COMPONENTS[name]
    folder = Path(folder)
    cfg = cfg_cls.from_dict(_read_json(folder / "config.json"))
    sd = read_safetensors(_weight_files(folder, stem, variant), dtype)
    with torch.device("meta"):  # no memory: the weights are assigned, not copied
        model = cls(cfg)
    return load_weights(model, sd, str(folder)).to(device=device, dtype=dtype)


def save_component(model, folder, name="unet"):
    """Write `folder/config.json` + the weights (`diffusion_pytorch_model.safetensors` for unet/vae, `model.safetensors`
    for text encoders) in the diffusers layout, atomically (temp files + rename), so diffusers/transformers'
    `from_pretrained(folder)` and `load_component` read it."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(folder / "weights.tmp"), metadata={"format": "pt"})
    (folder / "config.tmp").write_text(json.dumps(model.cfg.raw, indent=2))
    os.replace(folder / "weights.tmp", folder / f"{COMPONENTS[name][0]}.safetensors")
    os.replace(folder / "config.tmp", folder / "config.json")


def save_unet(unet, folder):
    save_component(unet, folder, "unet")


def _hub_snapshot(repo, variant=None, weights=True):
    """Download (or find in the HF cache; HF_HUB_OFFLINE is honored) only the files a pipeline needs."""
    import huggingface_hub as hh
    from huggingface_hub.errors import RepositoryNotFoundError, LocalEntryNotFoundError, EntryNotFoundError
    small = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*.json",
             "tokenizer*/*.txt"]

    def get(patterns):
        try:
            return Path(hh.snapshot_download(repo, allow_patterns=patterns))
        except RepositoryNotFoundError:
            raise LoadError(f"model {repo!r}: no such Hub repo (or it is private/gated: log in with "
                             f"`hf auth login`); expected an alias (sd15, sdxl), a Hub id, a folder or a .safetensors "
                             f"file") from None
        except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as e:
            raise LoadError(f"model {repo!r}: could not be fetched from the Hub and is not in the local HF cache "
                             f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}".splitlines()[0]) from None

    if not weights:
        return get(small)
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    stems = {n: COMPONENTS[n][0] for n in names}
    for v in _variants(variant):
        dot = f".{v}" if v else ""
        folder = get(small + [p for n in names for p in (
            f"{n}/{stems[n]}{dot}.safetensors", f"{n}/{stems[n]}.safetensors.index{dot}.json",
            f"{n}/{stems[n]}{dot}-*.safetensors", f"{n}/{stems[n]}-*{dot}.safetensors")])
        index = _read_json(folder / "model_index.json")
        try:
            for n in names:
                if isinstance(index.get(n), list) and index[n][0]:
                    _weight_files(folder / n, stems[n], v)
            return folder
        except ValueError:
            continue
    return folder  # let the loader name what is missing


def load_sd(model, *, device="cpu", dtype=torch.float32, variant=None, config=None, lora=None) -> SD:
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline's networks, tokenizers and scheduler config.

    model:   an alias (sd15, sdxl, sd2), a Hub repo id ("owner/name"), a local folder in the diffusers layout
             (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ [+ text_encoder_2/, tokenizer_2/]),
             or a single-file .safetensors checkpoint with the original LDM/SGM key names.
    variant: "fp16" to prefer the *.fp16.safetensors files; default: plain files, or fp16 when that is all there is
             (from the Hub, fp16 is preferred when dtype is half precision: half the download).
    config:  for a single-file checkpoint, where to take configs, tokenizers and scheduler from (alias, repo or
             folder); default: the alias of the family its keys show (sd15, sd2, sdxl).
    lora:    a LoRA run folder (diffdpo.py --lora-rank) or .safetensors file: its adapters are merged into the UNet."""
    if lora is not None:
        sd = load_sd(model, device=device, dtype=dtype, variant=variant, config=config)
        merge_lora(load_lora(sd.unet, lora))
        return sd
    if model == "tiny":  # the toy world's model, committed beside this file
        model = str(TINY_FOLDER)
        if not (TINY_FOLDER / "model_index.json").is_file():
            raise LoadError(f"model 'tiny': {TINY_FOLDER} is missing; remake it with python diffdpo.py --pretrain-tiny")
    model = ALIASES.get(model, model)
    p = Path(model)
    if p.is_file() and p.suffix == ".safetensors":
        return _load_single_file(p, config, device, dtype)
    if p.is_dir():
        return _load_folder(p, device, dtype, variant, source=str(p))
    if p.exists():
        raise LoadError(f"model {model!r}: expected a folder in the diffusers layout or a .safetensors file")
    if model.count("/") != 1 or model.startswith((".", "/")) or " " in model:
        raise LoadError(f"model {model!r}: not an alias ({', '.join(ALIASES)}), an existing folder or "
                         f".safetensors file, or a Hub repo id of the form owner/name")
    if variant is None and dtype in (torch.float16, torch.bfloat16):
        variant = "fp16"  # half the download, and the values are cast to half anyway
    return _load_folder(_hub_snapshot(model, variant), device, dtype, variant, source=model)


def _load_folder(folder, device, dtype, variant, source=""):
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise LoadError(f"{folder}: not a diffusers pipeline folder (expected model_index.json and unet/, vae/, "
                         f"text_encoder/, tokenizer/, scheduler/)")
    index = _read_json(folder / "model_index.json")
    kind = "sdxl" if isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] else "sd15"
    enc_names = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]
    load = lambda n: load_component(folder / n, n, device=device, dtype=dtype, variant=variant)  # noqa: E731
    return SD(unet=load("unet"), vae=load("vae"), text_encoders=[load(n) for n in enc_names],
              tokenizers=[CLIPTokenizer.from_folder(folder / n.replace("text_encoder", "tokenizer"))
                          for n in enc_names],
              scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"), kind=kind, source=source)


def _load_single_file(path, config, device, dtype):
    """A single-file checkpoint: weights from the file (original LDM/SGM names, mapped by convert_ldm_checkpoint),
    configs, tokenizers and scheduler from `config` (an alias, repo or diffusers folder; default: the alias of the
    family the file's keys show). Only the small files of that config are downloaded."""
    sd = read_safetensors([path], dtype)
    family = detect_family(sd.keys())
    config = ALIASES.get(config or family, config or family)
    folder = Path(config) if Path(config).is_dir() else _hub_snapshot(config, weights=False)
    index = _read_json(folder / "model_index.json")
    kind = "sdxl" if isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] else "sd15"
    if (kind == "sdxl") != (family == "sdxl"):
        raise LoadError(f"{path}: an {family} checkpoint, but the config {config} is for {kind}")
    cfgs = {n: COMPONENTS[n][2].from_dict(_read_json(folder / n / "config.json"))
            for n in ["unet", "vae", "text_encoder", "text_encoder_2"] if (folder / n / "config.json").is_file()}
    enc_names = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]
    with torch.device("meta"):
        models = {n: COMPONENTS[n][1](cfgs[n]) for n in ["unet", "vae"] + enc_names}
    parts = convert_ldm_checkpoint(sd, models, family, cfgs["unet"], cfgs["vae"], name=str(path))
    del sd
    nets = {n: load_weights(m, parts.pop(n), f"{path} ({n})").to(device=device, dtype=dtype) for n, m in models.items()}
    return SD(unet=nets["unet"], vae=nets["vae"], text_encoders=[nets[n] for n in enc_names],
              tokenizers=[CLIPTokenizer.from_folder(folder / n.replace("text_encoder", "tokenizer"))
                          for n in enc_names],
              scheduler_config=_read_json(folder / "scheduler" / "scheduler_config.json"), kind=kind,
              source=str(path))
