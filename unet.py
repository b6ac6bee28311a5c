"""
The networks of Stable Diffusion 1.5 / 2.x / SDXL, written by hand in plain PyTorch, and the loader that reads their
Hugging Face Hub checkpoints (safetensors) with no diffusers/transformers.

    UNet          epsilon-prediction UNet        (diffusers UNet2DConditionModel)
    VAE           latent autoencoder             (diffusers AutoencoderKL)
    CLIPText      CLIP / OpenCLIP text encoder   (transformers CLIPTextModel[WithProjection])
    load_sd       alias | Hub repo id | local diffusers folder | single-file .safetensors  ->  SD

Every module is named after the state-dict keys of the reference libraries, so a checkpoint loads with a plain
strict `load_state_dict` and no remap table. Shapes are tagged in comments: B batch, C channels, H/W spatial,
L tokens, D width. Read top to bottom: building blocks, UNet, VAE, text encoder, then the configs (one dataclass
per network with sd15 / sdxl / tiny presets) and the loader. The tokenizer (CLIP's BPE) is in tokenizer.py, the
single-file key names in convert.py, LoRA in lora.py.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from convert import convert_ldm_checkpoint, detect_family, legacy_keys, per_block
from files import STEMS, LoadError, config_from_dict, hub_pipeline, read_json, read_safetensors, save_safetensors, \
    weight_files, write_text_atomic
from lora import merge_lora_files
from tokenizer import CLIPTokenizer


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
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2. An LCM-distilled UNet (cond_dim) first adds
    cond_proj(c), c its guidance-scale embedding (sample.guidance_embedding)."""

    def __init__(self, in_dim, dim, cond_dim=None):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x, cond=None):
        x = x if cond is None else x + self.cond_proj(cond.to(x.dtype))
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


def channels_last(x):
    """Whether a (B, C, H, W) tensor is laid out NHWC (--channels-last), which the UNet's blocks keep."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def attention(q, k, v, heads, causal=False, mask=None):
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v, on (B, L, heads*d) tensors; mask
    (B, 1, 1, Lk) bool, True = attend (BERT's padding)."""
    B, Lq, D = q.shape
    q, k, v = (z.view(B, -1, heads, D // heads).transpose(1, 2) for z in (q, k, v))  # (B, heads, L, d)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
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
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)                          # (B, C, H, W)
        h = h.contiguous(memory_format=torch.channels_last if channels_last(x) else torch.contiguous_format)
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

    def forward(self, h, temb, context, skips=None):
        """Returns (h, what this block adds to the skip stack). An up block pops one skip per resnet from the end of
        `skips` and upsamples to the size of the next one (so odd latent sizes come out right)."""
        added = []
        attns = getattr(self, "attentions", [None] * len(self.resnets))
        for resnet, attn in zip(self.resnets, attns):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)                          # (B, C + C_skip, H, W)
            h = self._run(resnet, h, temb)
            if attn is not None:
                h = self._run(attn, h, context)
            added.append(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
            added.append(h)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h, skips[-1].shape[-2:] if skips else None)
        return h, added


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

    def __init__(self, cfg: "UNetConfig"):
        super().__init__()
        self.cfg = cfg
        ch, layers, depth = cfg.block_out_channels, cfg.layers_per_block, cfg.transformer_layers_per_block
        up_depth = cfg.reverse_transformer_layers_per_block or depth[::-1]
        n, temb, G, eps = len(ch), 4 * ch[0], cfg.norm_num_groups, cfg.norm_eps

        def resnet(cin, cout, scale=1.0):
            return ResnetBlock2D(cin, cout, temb, G, eps, scale)

        def transformers(kind, c, i, d, count):
            if not kind.startswith("CrossAttn"):
                return []
            heads, ctx = cfg.num_attention_heads[i], cfg.cross_attention_dim[i]
            return [Transformer2DModel(c, heads, ctx, d, G, cfg.use_linear_projection) for _ in range(count)]

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb, cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":                              # SDXL micro-conditioning
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        c, skip_channels = ch[0], [ch[0]]               # the channels of each skip the down path saves: a stack
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            resnets = [resnet(c if j == 0 else ch[i], ch[i]) for j in range(layers[i])]
            down = Downsample2D(ch[i], cfg.downsample_padding) if i < n - 1 else None
            self.down_blocks.append(UNetBlock(resnets, transformers(kind, ch[i], i, depth[i], layers[i]), down))
            skip_channels += [ch[i]] * (layers[i] + (down is not None))
            c = ch[i]

        self.mid_block = MidBlock([resnet(c, c, cfg.mid_block_scale_factor) for _ in range(2)],
                                  transformers("CrossAttn", c, n - 1, depth[-1], 1))

        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            cout, count = ch[n - 1 - i], layers[n - 1 - i] + 1
            resnets = []
            for _ in range(count):                      # each resnet takes the last skip of the down path
                resnets.append(resnet(c + skip_channels.pop(), cout))
                c = cout
            up = Upsample2D(cout) if i < n - 1 else None
            self.up_blocks.append(UNetBlock(resnets, transformers(kind, cout, n - 1 - i, up_depth[i], count),
                                            upsample=up))

        self.conv_norm_out = nn.GroupNorm(G, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def set_grad_checkpointing(self, on=True):
        """Recompute each resnet / transformer in the backward pass instead of storing its activations."""
        for b in list(self.down_blocks) + list(self.up_blocks):
            b.grad_checkpointing = on

    def forward(self, x, t, context, text_embeds=None, time_ids=None, timestep_cond=None):
        """x (B, 4, h, w) noisy latents, t (B,) or scalar timesteps, context (B, L, D) text states;
        SDXL also takes text_embeds (B, 1280) pooled text and time_ids (B, 6); an LCM UNet (time_cond_proj_dim)
        timestep_cond (B, time_cond_proj_dim), its guidance-scale embedding. Returns eps (B, 4, h, w)."""
        cfg = self.cfg
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim <= 1 and t.numel() == 1 else t.reshape(x.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        if cfg.time_cond_proj_dim and timestep_cond is None:
            raise LoadError("this UNet (LCM, time_cond_proj_dim) needs timestep_cond (sample.guidance_embedding)")
        emb = self.time_embedding(t_emb.to(x.dtype), timestep_cond)            # (B, 4*C0)
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise LoadError("this UNet (SDXL) needs text_embeds (pooled text) and time_ids")
            tid = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(x.shape[0], -1)   # (B, 6*256)
            emb = emb + self.add_embedding(torch.cat([text_embeds, tid], dim=-1).to(emb.dtype))

        h = self.conv_in(x)
        skips = [h]                                                             # a stack: the up path pops it
        for block in self.down_blocks:
            h, added = block(h, emb, context)
            skips += added
        h = self.mid_block(h, emb, context)
        for block in self.up_blocks:
            h, _ = block(h, emb, context, skips)
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
    def __init__(self, cfg: "VAEConfig"):
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
    def __init__(self, cfg: "VAEConfig"):
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
    """AutoencoderKL. posterior(x) is the encoder's diagonal Gaussian q(z | x) as (mean, std) and encode(x) its mean
    (both before the scaling factor); training multiplies by `scaling_factor` to get unit-variance latents,
    decode(z) expects z / scaling_factor."""

    def __init__(self, cfg: "VAEConfig"):
        super().__init__()
        self.cfg, self.scaling_factor = cfg, cfg.scaling_factor
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c2 // 2, c2 // 2, 1) if cfg.use_post_quant_conv else None

    @property
    def dtype(self):
        """The precision the VAE computes in (the images it encodes are cast to it)."""
        return self.encoder.conv_in.weight.dtype

    def posterior(self, x):
        """(mean, std) of q(z | x), the log-variance clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution;
        its `latent_dist.sample()` is mean + std * N(0, I)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)                                  # (B, latent, H/8, W/8) each
        return mean, (0.5 * logvar.clamp(-30.0, 20.0)).exp()

    def encode(self, x):
        return self.posterior(x)[0]

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder: token ids (B, 77) -> hidden states (B, 77, D), pooled (B, D) at the EOS token


class CLIPAttention(nn.Module):
    def __init__(self, d, heads, causal=True):  # causal for text, not for CLIP's vision tower (scorer_nets.py)
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

    def __init__(self, cfg: "CLIPTextConfig"):
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
# Configs: one dataclass per network, built from the checkpoint's config.json, with named presets.


# config.json fields whose other values this UNet does not implement: refused rather than computed differently
UNET_FIXED = dict(center_input_sample=False, act_fn="silu", resnet_time_scale_shift="default",
                  time_embedding_type="positional", class_embed_type=None, num_class_embeds=None, encoder_hid_dim=None,
                  conv_in_kernel=3, conv_out_kernel=3, timestep_post_act=None,
                  dual_cross_attention=False, mid_block_type="UNetMidBlock2DCrossAttn")
PER_BLOCK = ("layers_per_block", "num_attention_heads", "transformer_layers_per_block", "cross_attention_dim")


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: object = 2                # int or per block (a list per block after __post_init__)
    attention_head_dim: object = 8              # int or per block; a NUMBER OF HEADS (historic misnomer)
    num_attention_heads: object = None          # if set, the heads (else attention_head_dim's)
    transformer_layers_per_block: object = 1    # int or per block
    reverse_transformer_layers_per_block: object = None
    cross_attention_dim: object = 768           # int or per block
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    addition_embed_type: object = None          # "text_time" for SDXL
    addition_time_embed_dim: object = None      # 256 for SDXL
    projection_class_embeddings_input_dim: object = None  # 2816 = 1280 pooled + 6 * 256 for SDXL
    time_cond_proj_dim: object = None           # 256 for LCM-distilled UNets (the guidance-scale embedding's width)
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        """diffusers allows an int (the same for every block) or a per-block list: lists here."""
        n = len(self.block_out_channels)
        self.block_out_channels = list(self.block_out_channels)
        self.num_attention_heads = self.num_attention_heads or self.attention_head_dim
        for k in PER_BLOCK:
            v = getattr(self, k)
            setattr(self, k, list(v) if isinstance(v, (list, tuple)) else [v] * n)

    @classmethod
    def from_dict(cls, d):
        """Refuses config fields this implementation does not cover, instead of silently computing something else."""
        for k, ok in UNET_FIXED.items():
            if d.get(k, ok) != ok:
                raise LoadError(f"unet config: {k}={d[k]!r} is not supported (expected {ok!r})")
        if d.get("addition_embed_type") not in (None, "text_time"):
            raise LoadError(f"unet config: addition_embed_type={d['addition_embed_type']!r} is not supported")
        if d.get("only_cross_attention") not in (None, False) and any(per_block(d["only_cross_attention"], 1)):
            raise LoadError("unet config: only_cross_attention=True is not supported")
        blocks = [*d.get("down_block_types", ()), *d.get("up_block_types", ())]
        for t in blocks:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                raise LoadError(f"unet config: block type {t!r} is not supported")
        return config_from_dict(cls, d)

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
# -> 8 x 8 x 4 latents; its pretrained weights live in tiny/ beside this file (see pretrain.py).
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
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215             # 0.13025 for SDXL, 1.5305 for SD3
    shift_factor: float = 0.0                   # SD3: 0.0609; latents = (z - shift_factor) * scaling_factor
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        if d.get("act_fn", "silu") != "silu":
            raise LoadError("vae config: act_fn other than silu is not supported")
        return config_from_dict(cls, {k: v for k, v in d.items() if v is not None})  # "shift_factor": null means 0

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
    eos_token_id: int = 2                       # 2 in old configs: the EOS is the argmax id (CLIPText)
    with_projection: bool = False               # CLIPTextModelWithProjection (SDXL's second encoder)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        cfg = config_from_dict(cls, d)
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
# The whole model, and the loader

ALIASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
           "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
           "sd2": "stabilityai/stable-diffusion-2-1"}
TINY_FOLDER = Path(__file__).resolve().parent / "tiny"  # `load_sd("tiny")`: the embedded toy model
# each network of a pipeline folder: its weight file stem, class and config
COMPONENTS = {"unet": (STEMS["unet"], UNet, UNetConfig), "vae": (STEMS["vae"], VAE, VAEConfig),
              "text_encoder": (STEMS["text_encoder"], CLIPText, CLIPTextConfig),
              "text_encoder_2": (STEMS["text_encoder_2"], CLIPText, CLIPTextConfig)}


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


def load_weights(module, weights, name="model"):
    """Strict load with a one-line error naming the offending key; tensors are assigned, not copied, so a module
    built on the meta device never holds a second copy of the weights."""
    weights = legacy_keys(weights)
    if type(module) is CLIPText:  # transformers >= 5 saves CLIPTextModel without the `text_model.` prefix
        weights = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                   for k, v in weights.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise LoadError(f"{name}: {len(missing)} missing keys (first: {missing[:3]}), "
                         f"{len(unexpected)} unexpected keys (first: {unexpected[:3]})")
    for k, v in expected.items():
        if v.shape != weights[k].shape:
            raise LoadError(f"{name}: key {k} has shape {tuple(weights[k].shape)}, expected {tuple(v.shape)}")
    module.load_state_dict(weights, strict=True, assign=True)
    return module


def load_component(folder, name, *, device="cpu", dtype=torch.float32, variant=None, spec=None, prepare=None):
    """Load one network folder of the diffusers layout (`unet/`, `vae/`, `text_encoder[_2]/`): config.json + weights.
    Another family's component (mmdit.py's) passes its spec, (file stem, network class, config class), and may
    `prepare` its file's {name: tensor} before they are loaded."""
    stem, cls, cfg_cls = spec or COMPONENTS[name]
    folder = Path(folder)
    try:
        cfg = cfg_cls.from_dict(read_json(folder / "config.json"))
    except LoadError as e:
        raise LoadError(f"{folder / 'config.json'}: {e}") if not str(e).startswith(str(folder)) else e from None
    weights = read_safetensors(weight_files(folder, stem, variant), dtype)
    weights = prepare(weights) if prepare else weights
    with torch.device("meta"):  # no memory: the weights are assigned, not copied
        model = cls(cfg)
    return load_weights(model, weights, str(folder)).to(device=device, dtype=dtype)


def save_component(model, folder, name="unet"):
    """Write `folder/config.json` + the weights (`diffusion_pytorch_model.safetensors` for unet/vae/transformer,
    `model.safetensors` for text encoders) in the diffusers layout, atomically, so diffusers/transformers'
    `from_pretrained(folder)` and `load_component` read it."""
    save_safetensors(model.state_dict(), Path(folder) / f"{STEMS[name]}.safetensors")
    write_text_atomic(Path(folder) / "config.json", json.dumps(model.cfg.raw, indent=2))


def load_sd(model, *, device="cpu", dtype=torch.float32, variant=None, config=None, lora=None) -> SD:
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline's networks, tokenizers and scheduler config.

    model:   an alias (sd15, sdxl, sd2), a Hub repo id ("owner/name"), a local folder in the diffusers layout
             (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/ [+ text_encoder_2/, tokenizer_2/]),
             or a single-file .safetensors checkpoint with the original LDM/SGM key names.
    variant: "fp16" to prefer the *.fp16.safetensors files; default: plain files, or fp16 when that is all there is
             (from the Hub, fp16 is preferred when dtype is half precision: half the download).
    config:  for a single-file checkpoint, where to take configs, tokenizers and scheduler from (alias, repo or
             folder); default: the alias of the family its keys show (sd15, sd2, sdxl).
    lora:    a LoRA run folder (diffdpo.py --lora-rank) or .safetensors file (peft or kohya format), or a list of them
             (stacked, e.g. a DPO LoRA and LCM-LoRA): the adapters are merged into the UNet."""
    if lora is not None:
        sd = load_sd(model, device=device, dtype=dtype, variant=variant, config=config)
        merge_lora_files(sd.unet, lora)
        return sd
    if model == "tiny":  # the toy world's model, committed beside this file
        model = str(TINY_FOLDER)
        if not (TINY_FOLDER / "model_index.json").is_file():
            raise LoadError(f"model 'tiny': {TINY_FOLDER} is missing; remake it with python pretrain.py tiny")
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
    return _load_folder(hub_pipeline(model, variant), device, dtype, variant, source=model)


def pipeline_kind(folder):
    """"sdxl" when the folder's model_index.json names a second text encoder, else "sd15" (SD1.x / 2.x)."""
    index = read_json(Path(folder) / "model_index.json")
    return "sdxl" if isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] else "sd15"


def assemble(folder, kind, nets, source):
    """An SD from its networks {"unet", "vae", "text_encoder"[, "text_encoder_2"]} and the folder's tokenizers and
    scheduler config."""
    names = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]
    return SD(unet=nets["unet"], vae=nets["vae"], text_encoders=[nets[n] for n in names],
              tokenizers=[CLIPTokenizer.from_folder(folder / n.replace("text_encoder", "tokenizer")) for n in names],
              scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"), kind=kind, source=source)


def _load_folder(folder, device, dtype, variant, source=""):
    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise LoadError(f"{folder}: not a diffusers pipeline folder (expected model_index.json and unet/, vae/, "
                        f"text_encoder/, tokenizer/, scheduler/)")
    kind = pipeline_kind(folder)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    nets = {n: load_component(folder / n, n, device=device, dtype=dtype, variant=variant) for n in names}
    return assemble(folder, kind, nets, source)


def _load_single_file(path, config, device, dtype):
    """A single-file checkpoint: weights from the file (original LDM/SGM names, mapped by convert_ldm_checkpoint),
    configs, tokenizers and scheduler from `config` (an alias, repo or diffusers folder; default: the alias of the
    family the file's keys show). Only the small files of that config are downloaded."""
    weights = read_safetensors([path], dtype)
    family = detect_family(weights.keys())
    config = ALIASES.get(config or family, config or family)
    folder = Path(config) if Path(config).is_dir() else hub_pipeline(config, weights=False)
    kind = pipeline_kind(folder)
    if (kind == "sdxl") != (family == "sdxl"):
        raise LoadError(f"{path}: an {family} checkpoint, but the config {config} is for {kind}")
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    with torch.device("meta"):
        models = {n: COMPONENTS[n][1](COMPONENTS[n][2].from_dict(read_json(folder / n / "config.json")))
                  for n in names}
    parts = convert_ldm_checkpoint(weights, models, family, models["unet"].cfg, models["vae"].cfg, name=str(path))
    del weights
    nets = {n: load_weights(m, parts.pop(n), f"{path} ({n})").to(device=device, dtype=dtype) for n, m in models.items()}
    return assemble(folder, kind, nets, str(path))
