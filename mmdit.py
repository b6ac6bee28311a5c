"""
The networks of Stable Diffusion 3 / 3.5, written by hand in plain PyTorch, and the loader of their diffusers folders
(safetensors) with no diffusers/transformers.

    MMDiT         velocity-prediction transformer      (diffusers SD3Transformer2DModel)
    T5Encoder     T5-v1.1 encoder, SD3's third text encoder   (transformers T5EncoderModel)
    load_sd3_component   a `transformer/` or `text_encoder_3/` folder  ->  MMDiT / T5Encoder
    load_sd3      a StableDiffusion3Pipeline folder  ->  SD3 (networks, tokenizers, scheduler config, encode_prompt)

As in unet.py, every module is named after the reference libraries' state-dict keys, so a checkpoint loads with a
plain strict `load_state_dict`. Shapes are tagged in comments: B batch, C channels, H/W latent size, N image tokens,
L text tokens, D width. SD3's two CLIP text encoders are unet.py's CLIPText (with projection). Read top to bottom:
the MMDiT's building blocks, the MMDiT, the T5 encoder, then the configs (sd3 / sd35m / sd35l / tiny presets), the
loader, and the whole pipeline (SD3, load_sd3).
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from files import LoadError, config_from_dict, hub_pipeline, read_json
from tokenizer import CLIPTokenizer, T5Tokenizer
from lora import merge_lora_files
from unet import TINY_VOCAB, TimestepEmbedding, attention, load_component, load_sd, timestep_embedding


# ----------------------------------------------------------------------------------------------------------------
# Building blocks of the MMDiT


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, the mean taken in fp32: SD3.5's q/k norm (diffusers'
    RMSNorm) and T5's layer norm (T5LayerNorm, no mean subtraction, no bias)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def sincos_1d(pos, dim):
    """[sin(pos w_k), cos(pos w_k)] with w_k = 10000^(-k / (dim/2)), k < dim/2: (M,) positions -> (M, dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.double()[:, None] * omega[None]                                  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def pos_embed_grid(dim, n, base_size):
    """The fixed sin-cos position table of an n x n patch grid, (1, n*n, dim), rows major: patch (i, j) gets
    [sincos_1d(j), sincos_1d(i)] (column half first), positions scaled by base_size / n (diffusers'
    get_2d_sincos_pos_embed)."""
    pos = torch.arange(n, dtype=torch.float32) / (n / base_size)
    emb = sincos_1d(pos, dim // 2)                                              # (n, dim/2)
    col = emb[None, :, :].expand(n, n, -1)                                      # (rows, cols, dim/2)
    row = emb[:, None, :].expand(n, n, -1)
    return torch.cat([col, row], dim=-1).reshape(1, n * n, dim).float()


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (a stride-p conv), plus the centre crop of a max_size x max_size position table that
    fits the latent's h x w patch grid: one table serves every aspect ratio."""

    def __init__(self, in_channels, dim, patch_size, max_size, base_size):
        super().__init__()
        self.patch_size, self.max_size = patch_size, max_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", pos_embed_grid(dim, max_size, base_size))  # in the checkpoints, too

    def cropped_pos_embed(self, h, w):
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"a {h} x {w} patch grid is larger than the position table ({self.max_size})")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        return table[:, top:top + h, left:left + w].reshape(1, h * w, -1)      # (1, N, D)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)                       # (B, N, D), N = h*w
        return (tokens + self.cropped_pos_embed(h, w)).to(tokens.dtype)


class TimeTextEmbed(nn.Module):
    """The conditioning vector of every block: MLP(sinusoidal(t), 256 wide) + MLP(pooled text), each MLP
    linear_1 -> SiLU -> linear_2 (diffusers' CombinedTimestepTextProjEmbeddings)."""

    def __init__(self, dim, pooled_dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t, pooled):
        t_emb = timestep_embedding(t, 256, flip_sin_to_cos=True, freq_shift=0)   # (B, 256)
        return self.timestep_embedder(t_emb.to(pooled.dtype)) + self.text_embedder(pooled)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, one (shift, scale) per sample: (B, D) over (B, tokens, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero: a LayerNorm without weights and `chunks` (B, D) modulation vectors computed from the conditioning,
    linear(SiLU(c)): (shift, scale, gate) for attention, for the MLP, and for the second attention of an MMDiT-X
    block (9 chunks, diffusers' SD35AdaLayerNormZeroX). Returns the normed x and the chunks; the block modulates."""

    def __init__(self, dim, chunks=6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        return self.norm(x), self.linear(F.silu(emb)).chunk(self.chunks, dim=1)


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by (scale, shift) = linear(SiLU(c)), scale first: the output norm, and the text stream's
    norm in the last block, whose text tokens are not needed after the attention."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        scale, shift = self.linear(F.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


class GELU(nn.Module):
    """Linear, then the tanh approximation of GELU."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # [1] was dropout

    def forward(self, x):
        return self.net[2](self.net[0](x))


def head_norm(norm, x, heads):
    """Apply `norm` to each head's d features of (B, tokens, heads*d); no norm (SD3) leaves x as it is."""
    if norm is None:
        return x
    B, T, D = x.shape
    return norm(x.view(B, T, heads, D // heads)).reshape(B, T, D)


class JointAttention(nn.Module):
    """MMDiT attention: image and text tokens keep their own q/k/v and output projections but attend together, over
    the concatenation [image tokens; text tokens]. joint=False: plain self-attention over the image tokens (the
    second attention of an MMDiT-X block). context_out=False (the last block): the text outputs are dropped.
    SD3.5 RMS-normalizes q and k per head."""

    def __init__(self, dim, heads, qk_norm=None, joint=True, context_out=True):
        super().__init__()
        self.heads, d = heads, dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q = RMSNorm(d) if qk_norm else None
        self.norm_k = RMSNorm(d) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
            self.norm_added_q = RMSNorm(d) if qk_norm else None
            self.norm_added_k = RMSNorm(d) if qk_norm else None
            self.to_add_out = nn.Linear(dim, dim) if context_out else None

    def forward(self, x, context=None):
        """x (B, N, D) image tokens, context (B, L, D) text tokens -> (image out, text out or None); without
        context -> the image out alone."""
        h = self.heads
        q, k, v = head_norm(self.norm_q, self.to_q(x), h), head_norm(self.norm_k, self.to_k(x), h), self.to_v(x)
        if context is None:
            return self.to_out[0](attention(q, k, v, h))
        cq = head_norm(self.norm_added_q, self.add_q_proj(context), h)
        ck = head_norm(self.norm_added_k, self.add_k_proj(context), h)
        cv = self.add_v_proj(context)
        out = attention(torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1), h)  # (B, N + L, D)
        n = x.shape[1]
        context_out = self.to_add_out(out[:, n:]) if self.to_add_out is not None else None
        return self.to_out[0](out[:, :n]), context_out


# ----------------------------------------------------------------------------------------------------------------
# MMDiT: v(x_sigma, t, text) -- the velocity network of SD3 / SD3.5


class JointTransformerBlock(nn.Module):
    """One MMDiT block (SD3 paper, Fig. 2): each stream has its own adaLN-Zero modulation and MLP; the two meet in
    the joint attention. Per stream, with (shift, scale, gate) from the conditioning c:
        x = x + gate_a * Attn(modulate(LN(x), shift_a, scale_a))
        x = x + gate_m * MLP(modulate(LN(x), shift_m, scale_m))
    MMDiT-X (SD3.5-medium's first 13 blocks) adds a second, image-only attention with its own three vectors. The last
    block (context_pre_only) only lets the text be attended to: no text residual, no text MLP."""

    def __init__(self, dim, heads, qk_norm=None, context_pre_only=False, dual=False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim, 9 if dual else 6)
        self.norm1_context = AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, qk_norm, context_out=not context_pre_only)
        self.attn2 = JointAttention(dim, heads, qk_norm, joint=False) if dual else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim)

    def forward(self, x, context, emb):
        """x (B, N, D), context (B, L, D), emb (B, D) -> (x, context); context is None after the last block."""
        h, mods = self.norm1(x, emb)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:6]
        if self.context_pre_only:
            c = self.norm1_context(context, emb)
        else:
            c, cmods = self.norm1_context(context, emb)
            c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = cmods
            c = modulate(c, c_shift_a, c_scale_a)
        a, ca = self.attn(modulate(h, shift_a, scale_a), c)
        x = x + gate_a[:, None] * a
        if self.attn2 is not None:
            shift_a2, scale_a2, gate_a2 = mods[6:]
            x = x + gate_a2[:, None] * self.attn2(modulate(h, shift_a2, scale_a2))
        x = x + gate_m[:, None] * self.ff(modulate(self.norm2(x), shift_m, scale_m))
        if self.context_pre_only:
            return x, None
        context = context + c_gate_a[:, None] * ca
        c = modulate(self.norm2_context(context), c_shift_m, c_scale_m)
        return x, context + c_gate_m[:, None] * self.ff_context(c)


def unpatchify(tokens, h, w, p):
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) latents; each token's features are ordered (p_row, p_col, C)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, h, w, p, p, -1)                                      # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, -1, h * p, w * p)            # (B, C, h*p, w*p)


class MMDiT(nn.Module):
    """SD3Transformer2DModel: patchify + position table, conditioning vector from (t, pooled text), text tokens
    projected to the width, the joint blocks, then a modulated output norm, a linear layer and unpatchify."""

    def __init__(self, cfg: "MMDiTConfig"):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg.in_channels, D, p, cfg.pos_embed_max_size, cfg.sample_size // p)
        self.time_text_embed = TimeTextEmbed(D, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(D, cfg.num_attention_heads, cfg.qk_norm, context_pre_only=i == cfg.num_layers - 1,
                                  dual=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)])
        self.norm_out = AdaLayerNormContinuous(D)
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, on=True):
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = on

    def forward(self, x, timestep, context, pooled):
        """x (B, C, H, W) noisy latents, timestep (B,) or scalar in [0, 1000) (sigma * 1000), context (B, L,
        joint_attention_dim) text states, pooled (B, pooled_projection_dim). Returns the velocity (B, C_out, H, W)."""
        B, _, H, W = x.shape
        p = self.cfg.patch_size
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(B)
        h = self.pos_embed(x)                                                   # (B, N, D)
        emb = self.time_text_embed(t, pooled)                                   # (B, D)
        c = self.context_embedder(context)                                      # (B, L, D)
        for block in self.transformer_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h, c = checkpoint(block, h, c, emb, use_reentrant=False)
            else:
                h, c = block(h, c, emb)
        h = self.proj_out(self.norm_out(h, emb))                                # (B, N, p*p*C_out)
        return unpatchify(h, H // p, W // p, p)


# ----------------------------------------------------------------------------------------------------------------
# T5 encoder: token ids (B, L) -> hidden states (B, L, d_model), SD3's third text encoder (T5-v1.1-XXL)


def relative_position_bucket(relative, num_buckets=32, max_distance=128):
    """T5's bidirectional bucket of a relative position (key position - query position). Half of the buckets hold
    positive offsets, half the rest; within a half, distances below num_buckets/4 get a bucket each, longer ones
    share log-spaced buckets up to max_distance, and everything beyond lands in the half's last bucket."""
    half = num_buckets // 2
    exact = half // 2
    distance = relative.abs()
    log_spaced = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()                              # -inf at 0: replaced below
    log_spaced = log_spaced.clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < exact, distance, log_spaced)


class T5Attention(nn.Module):
    """Self-attention without the 1/sqrt(d) scale and without biases; a learned bias per (head, position bucket) is
    added to the scores. Only the first layer holds the bias table; every layer adds the same bias."""

    def __init__(self, cfg, has_relative_bias):
        super().__init__()
        self.cfg, self.heads, inner = cfg, cfg.num_heads, cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length):
        """(1, heads, L, L): bias[h, i, j] = table[bucket(j - i), h]."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)  # (L, L)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (z.view(B, L, self.heads, -1).transpose(1, 2) for z in (self.q(x), self.k(x), self.v(x)))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, heads, L, d_kv)
        return self.o(o.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg, has_relative_bias):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU MLP: wo(gelu(wi_0 x) * wi_1 x), GELU's tanh approximation (transformers' gelu_new). An fp16 T5 keeps
    wo in fp32 (as transformers' from_pretrained): its outputs overflow fp16, and from the first block on the residual
    stream is fp32."""

    def __init__(self, cfg):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def _apply(self, fn, recurse=True):
        """Every cast of the model (.to, .half, loading) that makes it fp16 leaves wo in fp32."""
        super()._apply(fn, recurse)
        if self.wi_0.weight.dtype == torch.float16:
            self.wo.float()
        return self

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x):
    """T5's activations outgrow fp16: like transformers, clamp each block's output to the fp16 range (a little below
    it where an inf appeared) instead of letting infinities through. Other dtypes pass unchanged."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    def __init__(self, cfg, has_relative_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5EncoderModel: token embedding (`shared`), pre-norm blocks (attention, gated MLP) with residuals, a final
    RMS norm. No attention mask: SD3's pipeline encodes the padded ids without one."""

    def __init__(self, cfg: "T5Config"):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, ids):
        """ids (B, L) -> last hidden state (B, L, d_model)."""
        h = self.shared(ids)                                                    # (B, L, d_model)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])  # (1, heads, L, L)
        for block in self.encoder.block:
            h = block(h, bias)
        return self.encoder.final_layer_norm(h)


# ----------------------------------------------------------------------------------------------------------------
# Configs: one dataclass per network, built from the checkpoint's config.json, with named presets.


@dataclass
class MMDiTConfig:
    sample_size: int = 128                      # latent size of training: sets the position table's scale
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096             # width of the text states (CLIP-L + bigG zero-padded, T5-XXL)
    caption_projection_dim: int = 1152          # = heads * head_dim
    pooled_projection_dim: int = 2048           # CLIP-L + bigG pooled
    out_channels: int = 16
    pos_embed_max_size: int = 96                # side of the position table, in patches
    dual_attention_layers: tuple = ()           # MMDiT-X blocks (SD3.5-medium: 0..12)
    qk_norm: object = None                      # None (SD3) or "rms_norm" (SD3.5)
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.dual_attention_layers = tuple(self.dual_attention_layers)

    @classmethod
    def from_dict(cls, d):
        """Refuses config values this implementation does not cover, instead of computing something else."""
        if d.get("qk_norm") not in (None, "rms_norm"):
            raise LoadError(f"transformer config: qk_norm={d['qk_norm']!r} is not supported (None or 'rms_norm')")
        if d.get("pos_embed_max_size", 96) is None:
            raise LoadError("transformer config: pos_embed_max_size=None (no cropped position table) is not supported")
        cfg = config_from_dict(cls, d)
        if cfg.caption_projection_dim != cfg.num_attention_heads * cfg.attention_head_dim:
            raise LoadError("transformer config: caption_projection_dim must equal heads * attention_head_dim")
        return cfg

    @classmethod
    def sd3(cls):
        return cls.from_dict(dict(SD3_MEDIUM))

    @classmethod
    def sd35m(cls):
        return cls.from_dict(dict(SD35_MEDIUM))

    @classmethod
    def sd35l(cls):
        return cls.from_dict(dict(SD35_LARGE))

    @classmethod
    def tiny(cls):
        return cls.from_dict(dict(TINY_MMDIT))


# The Hub repos' transformer/config.json (stabilityai/stable-diffusion-3-medium-diffusers, stable-diffusion-3.5-medium,
# stable-diffusion-3.5-large); diffusers' scripts/convert_sd3_to_diffusers.py derives the same numbers from the
# original checkpoints' shapes (layers from the block count, caption dim from context_embedder, table side from
# pos_embed, qk norm and dual attention from the keys present).
SD3_MEDIUM = dict(_class_name="SD3Transformer2DModel", sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                  attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13)))
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
# A toy: 8 x 8 x 4 latents as the toy world's, 64-wide text; every code path (q/k norm, one MMDiT-X block, the last
# block's text-free tail) at a few hundred thousand parameters.
TINY_MMDIT = dict(_class_name="SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                  pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm",
                  dual_attention_layers=[0])


@dataclass
class T5Config:  # the defaults are transformers' (t5-small's): what a config.json without the field means
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"             # T5-v1.1: "gated-gelu", the only one implemented here
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        if d.get("feed_forward_proj", "relu") != "gated-gelu" or d.get("dense_act_fn", "gelu_new") != "gelu_new":
            raise LoadError("text encoder config: only T5-v1.1's gated-gelu (gelu_new) feed-forward is supported")
        if d.get("is_decoder"):
            raise LoadError("text encoder config: a T5 decoder is not supported (the encoder only)")
        return config_from_dict(cls, d)

    @classmethod
    def t5xxl(cls):
        return cls.from_dict(dict(T5_XXL))

    @classmethod
    def tiny(cls):
        return cls.from_dict(dict(TINY_T5))


# google/t5-v1_1-xxl's encoder, as SD3's text_encoder_3/config.json holds it
T5_XXL = dict(architectures=["T5EncoderModel"], model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
              num_layers=24, num_heads=64, relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
              tie_word_embeddings=False)
TINY_T5 = dict(T5_XXL, vocab_size=TINY_VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2)


# ----------------------------------------------------------------------------------------------------------------
# Loading a diffusers folder: transformer/ (diffusion_pytorch_model*.safetensors), text_encoder_3/ (model*.safetensors)

SD3_COMPONENTS = {"transformer": ("diffusion_pytorch_model", MMDiT, MMDiTConfig),
                  "text_encoder_3": ("model", T5Encoder, T5Config)}


def tied_embedding(weights):
    """transformers ties T5's `encoder.embed_tokens` to `shared`; files hold one or both: keep `shared`."""
    weights = dict(weights)
    embed = weights.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in weights and embed is not None:
        weights["shared.weight"] = embed
    return weights


def load_sd3_component(folder, name, *, device="cpu", dtype=torch.float32, variant=None):
    """Load `transformer/` (MMDiT) or `text_encoder_3/` (T5Encoder) of an SD3 pipeline folder: config.json + weights,
    single-file or sharded (`*.safetensors.index.json`), plain or the fp16 variant (as unet.load_component). In fp16
    the T5's MLP output matrices stay fp32, as transformers keeps them (T5DenseGatedActDense)."""
    prepare = tied_embedding if name == "text_encoder_3" else None
    return load_component(folder, name, device=device, dtype=dtype, variant=variant, spec=SD3_COMPONENTS[name],
                          prepare=prepare)


# ----------------------------------------------------------------------------------------------------------------
# The whole model: SD3's networks, tokenizers and scheduler config, its prompt encoding, and the loader

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length: T5's ids are padded or cut to it


class SD3:
    """A loaded Stable Diffusion 3 / 3.5: `transformer` (MMDiT), `vae` (16 latent channels; latents are
    (z - shift_factor) * scaling_factor), `text_encoders` [CLIP-L, OpenCLIP bigG (both with projection), T5 or None]
    with their `tokenizers` [CLIP, CLIP padding with "!", T5 or None], the FlowMatchEulerDiscreteScheduler's config
    dict (its `shift`), and `kind` "sd3"."""

    kind = "sd3"

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config, source=""):
        self.transformer, self.vae, self.text_encoders, self.tokenizers = transformer, vae, text_encoders, tokenizers
        self.scheduler_config, self.source = scheduler_config, source

    @property
    def unet(self):
        """The denoiser under the name sample.generate reads for every pipeline: here the MMDiT."""
        return self.transformer

    @property
    def modules(self):
        return [self.transformer, self.vae, *[e for e in self.text_encoders if e is not None]]

    def to(self, device=None, dtype=None):
        for m in self.modules:
            m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    def encode_prompt(self, prompts, max_sequence_length=None):
        """Text conditioning exactly as diffusers' StableDiffusion3Pipeline.encode_prompt (clip_skip None, the
        pipeline's default and what it always uses for the negative prompt), differentiable (callers hold no_grad;
        the toy's pretraining trains the encoders through it). T5's length: 256, or less where tokenizer_3's
        model_max_length says so (tiny-flow's 16; pass that as the pipeline's max_sequence_length):
          clip    = concat(penultimate states of CLIP-L, of bigG)                      (B, 77, 768 + 1280)
                    zero-padded on the feature axis to T5's width                       (B, 77, 4096)
          t5      = T5's last hidden state on the ids padded / cut to 256 tokens        (B, 256, 4096)
                    (zeros of the transformer's joint_attention_dim without a T5)
          context = concat(clip, t5) on the token axis                                 (B, 77 + 256, 4096)
          pooled  = concat(CLIP-L's projection, bigG's projection)                     (B, 768 + 1280)"""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            _, penultimate, projected = enc(tok(prompts).to(self.device))
            states.append(penultimate)
            pooled.append(projected)
        clip = torch.cat(states, dim=-1)                                        # (B, 77, 768 + 1280)
        t5 = self.t5_states(prompts, max_sequence_length).to(clip.dtype)        # (B, 256, 4096)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))                  # (B, 77, 4096)
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def t5_states(self, prompts, max_sequence_length):
        """T5's last hidden state (B, L, d_model), or zeros (B, L, joint_attention_dim) for a pipeline loaded
        without its T5 (as diffusers' pipeline with text_encoder_3=None)."""
        tok, enc = self.tokenizers[2], self.text_encoders[2]
        if enc is None:
            width = self.transformer.cfg.joint_attention_dim
            return torch.zeros(len(prompts), max_sequence_length or T5_TOKENS, width, device=self.device)
        return enc(tok(prompts, max_length=max_sequence_length).to(self.device))


def listed(index, name):
    """Whether model_index.json names a component (a pipeline saved without it lists [null, null])."""
    return isinstance(index.get(name), list) and bool(index[name][0])


def load_sd3(folder, *, device="cpu", dtype=torch.float32, variant=None) -> SD3:
    """Load a StableDiffusion3Pipeline folder in the diffusers layout: model_index.json, transformer/, vae/,
    text_encoder/ (CLIP-L), text_encoder_2/ (bigG), text_encoder_3/ (T5; may be left out, then its states are
    zeros), tokenizer/, tokenizer_2/, tokenizer_3/, scheduler/. variant: "fp16" for the *.fp16.safetensors files.
    A missing or foreign piece is a one-line LoadError."""
    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        raise LoadError(f"{folder}: model_index.json names {index.get('_class_name')!r}, not StableDiffusion3Pipeline")
    t5 = listed(index, "text_encoder_3")
    parts = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
    for name in parts + (["text_encoder_3", "tokenizer_3"] if t5 else []):
        if not (folder / name).is_dir():
            raise LoadError(f"{folder}: no {name}/ folder (a StableDiffusion3Pipeline folder has {', '.join(parts)}"
                            f", text_encoder_3, tokenizer_3)")
    load = dict(device=device, dtype=dtype, variant=variant)
    encoders = [load_component(folder / n, n, **load) for n in ("text_encoder", "text_encoder_2")]
    tokenizers = [CLIPTokenizer.from_folder(folder / n) for n in ("tokenizer", "tokenizer_2")]
    encoders.append(load_sd3_component(folder / "text_encoder_3", "text_encoder_3", **load) if t5 else None)
    tokenizers.append(T5Tokenizer.from_folder(folder / "tokenizer_3") if t5 else None)
    return SD3(transformer=load_sd3_component(folder / "transformer", "transformer", **load),
               vae=load_component(folder / "vae", "vae", **load), text_encoders=encoders, tokenizers=tokenizers,
               scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"), source=str(folder))


# The SD3 family's Hub repos (gated: accept the license on the Hub and log in first), and the toy world's flow model
SD3_ALIASES = {"sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
               "sd35m": "stabilityai/stable-diffusion-3.5-medium", "sd35l": "stabilityai/stable-diffusion-3.5-large"}
TINY_FLOW_FOLDER = Path(__file__).resolve().parent / "tiny-flow"   # `--model tiny-flow`: see pretrain.py


def resolve(model):
    """tiny-flow and the SD3 aliases -> their folder / Hub id; any other --model unchanged."""
    return str(TINY_FLOW_FOLDER) if model == "tiny-flow" else SD3_ALIASES.get(model, model)


def weights_folder(model):
    """The tuned network's folder in a run's OUT, named as in --model's own layout: unet/, or an SD3's transformer/."""
    return "transformer" if is_sd3(model) else "unet"


def load_tuned(sd, folder, *, device="cpu", dtype=torch.float32):
    """A tuned denoiser for the pipeline `sd` (sample.py / eval.py --unet, the toy's evaluation): an SD3's
    transformer/ (MMDiT), anyone else's unet/."""
    if sd.kind == "sd3":
        return load_sd3_component(folder, "transformer", device=device, dtype=dtype)
    return load_component(folder, "unet", device=device, dtype=dtype)


def is_sd3(model):
    """Whether --model names an SD3 pipeline: tiny-flow, an SD3 alias, a local folder whose model_index.json names
    StableDiffusion3Pipeline, or a Hub id with "stable-diffusion-3" in its name (another SD3 repo: download it and
    pass the folder)."""
    model = str(model)
    if model in ("tiny-flow", *SD3_ALIASES):
        return True
    index = Path(model) / "model_index.json"
    if index.is_file():
        return read_json(index).get("_class_name") == "StableDiffusion3Pipeline"
    return not Path(model).exists() and "stable-diffusion-3" in model.lower()


def load_pipeline(model, *, device="cpu", dtype=torch.float32, variant=None, lora=None):
    """What the trainer and the samplers load: SD3 (tiny-flow, an alias, a folder, a Hub id) through load_sd3,
    anything else (SD1.5 / SDXL aliases, Hub ids and folders, single files) through unet.load_sd."""
    if not is_sd3(model):
        return load_sd(model, device=device, dtype=dtype, variant=variant, lora=lora)
    folder = resolve(model)
    if model == "tiny-flow" and not (TINY_FLOW_FOLDER / "model_index.json").is_file():
        raise LoadError(f"model 'tiny-flow': {TINY_FLOW_FOLDER} is missing; remake it with "
                        f"python pretrain.py tiny-flow")
    sd = load_sd3(folder if Path(folder).is_dir() else hub_pipeline(folder, variant), device=device, dtype=dtype,
                  variant=variant)
    sd.source = folder
    if lora is not None:
        merge_lora_files(sd.transformer, lora)
    return sd
