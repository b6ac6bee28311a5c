"""
LoRA (Hu et al. 2021) for the UNet: adapters to train (diffdpo.py --lora-rank), the DPO reference as the same UNet
with its adapters switched off, LoRA files in the format diffusers' `load_lora_weights` reads, and the kohya /
sd-scripts files many published LoRAs use (LCM-LoRA among them), with conv layers, several stacked.

    add_lora(unet, rank, alpha, targets)   wrap linear layers, freeze everything else
    lora_disabled(unet)                    `with` it, the UNet is its base model again (the DPO reference)
    save_lora / load_lora / merge_lora     the peft-format file (load_lora reads kohya's too), folding adapters in
    merge_lora_files(unet, paths)          several LoRA files merged in turn (a DPO LoRA + LCM-LoRA)
"""
import contextlib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import LoadError, first_line, json_loads, read_safetensors, save_safetensors

# ----------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): a frozen layer W plus a trained low-rank update, y = W x + (alpha / r) B A x,
# A (r, in), B (out, r). Named as peft names it inside diffusers (`...attn1.to_q.lora_A.weight`); the wrapped layer
# keeps its own `weight` / `bias` keys, so a base checkpoint still loads into a UNet that has adapters.

LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' `pipeline.load_lora_weights(folder)` reads
LORA_TARGETS = "to_q,to_k,to_v,to_out.0"        # the attention projections of every transformer block
SD3_LORA_TARGETS = "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj," \
                   "attn.to_add_out"              # an MMDiT's, both streams' (diffusers' SD3 LoRA script's default)


class LoRALinear(nn.Module):
    """An nn.Linear with an adapter: y = W x + b + (alpha / r) B(A(x)). A starts Kaiming-uniform (as nn.Linear and
    peft draw it), B at zero, so adding an adapter leaves the output exactly unchanged; `enabled = False` runs the
    base layer alone."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = self.adapters(base, rank, dict(bias=False, device=base.weight.device,
                                                                  dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale, self.enabled = alpha / rank, True

    def adapters(self, base, rank, kw):
        """A (r, in) and B (out, r)."""
        return nn.Linear(base.in_features, rank, **kw), nn.Linear(rank, base.out_features, **kw)

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def forward(self, x):
        y = self.base_forward(x)
        return y + self.scale * self.lora_B(self.lora_A(x)) if self.enabled else y

    def delta(self):
        """B A: the adapter as an update of the weight (fp32)."""
        return self.lora_B.weight.float() @ self.lora_A.weight.float()

    def empty_base(self):
        return nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None, device="meta")

    @torch.no_grad()
    def merged(self):
        """The plain layer with weight W + (alpha / r) B A (summed in fp32)."""
        W, out = self.weight, self.empty_base()
        out.weight = nn.Parameter((W.float() + self.scale * self.delta()).to(W.dtype), requires_grad=False)
        out.bias = self.bias
        return out


class LoRAConv2d(LoRALinear):
    """An nn.Conv2d with an adapter (kohya's conv LoRA, peft's Conv2d LoRA): A is a conv with the base's kernel, stride
    and padding, (r, in, k, k), B a 1x1 conv (out, r, 1, 1). B applied after A is one k x k conv with the kernel
    (B A)[o, i, :, :] = sum_r B[o, r] A[r, i, :, :], so the adapter merges exactly."""

    def adapters(self, base, rank, kw):
        self.conv = dict(stride=base.stride, padding=base.padding)
        return (nn.Conv2d(base.in_channels, rank, base.kernel_size, **self.conv, **kw),
                nn.Conv2d(rank, base.out_channels, 1, **kw))

    def base_forward(self, x):
        return F.conv2d(x, self.weight, self.bias, **self.conv)

    def delta(self):
        return torch.einsum("or,rikl->oikl", self.lora_B.weight[:, :, 0, 0].float(), self.lora_A.weight.float())

    def empty_base(self):
        W = self.weight
        return nn.Conv2d(W.shape[1], W.shape[0], W.shape[2:], bias=self.bias is not None, device="meta", **self.conv)


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
    """The adapters as diffusers' `load_lora_weights` reads them (peft names, `unet.` prefix, an MMDiT's
    `transformer.`): per layer `unet.<name>.lora_A.weight` (r, in) and `unet.<name>.lora_B.weight` (out, r), with
    alpha / r folded into B, so any loader that assumes alpha = r (diffusers, peft, ComfyUI with no alphas in the
    file) computes the same y."""
    weights, prefix = unet.state_dict(), lora_prefix(unet)   # (sharded networks: their whole weights, gathered)
    return {f"{prefix}.{n}.{k}": (weights[f"{n}.{k}"] * (m.scale if k == "lora_B.weight" else 1)).contiguous().cpu()
            for n, m in unet.named_modules() if isinstance(m, LoRALinear) for k in ("lora_A.weight", "lora_B.weight")}


def lora_prefix(net):
    """The network's name in diffusers' LoRA files: "transformer" for an SD3 MMDiT, else "unet"."""
    return "transformer" if hasattr(net.cfg, "joint_attention_dim") else "unet"


def save_lora(unet, path):
    """Write lora_state_dict(unet) to `path` (a .safetensors file), atomically (temp file + rename)."""
    return save_safetensors(lora_state_dict(unet), path)


# ----------------------------------------------------------------------------------------------------------------
# Reading LoRA files: the peft format diffusers writes, and kohya / sd-scripts' (LCM-LoRA's), to {layer: (A, B, scale)}

KOHYA = (".lora_down.weight", ".lora_up.weight", ".alpha")  # A, B and alpha of layer lora_unet_<name with _ for .>


def read_lora_file(path):
    """A LoRA file's tensors and diffusers metadata. `path`: a run folder (its LORA_FILE) or a .safetensors file."""
    path = Path(path)
    path = path / LORA_FILE if path.is_dir() else path
    if not path.is_file():
        raise LoadError(f"{path}: LoRA file not found (expected a run folder with {LORA_FILE}, or the file)")
    meta = {}
    sd = read_safetensors([path], metadata=meta)
    try:
        return sd, json_loads(meta.get("lora_adapter_metadata", "{}")), path
    except ValueError as e:
        raise LoadError(f"{path}: unreadable lora_adapter_metadata ({first_line(e)})") from None


def check_lora_tensors(sd, path):
    """Every tensor of a LoRA file non-empty and finite: a rank-0 adapter ((0, in) / (out, 0)) fits no layer, and
    NaN or Inf values (a file saved from a diverged run) would sample black images."""
    for k, v in sd.items():
        if v.numel() == 0:
            raise LoadError(f"{path}: tensor {k} has shape {tuple(v.shape)}, an empty (rank-0) adapter; expected a "
                            f"rank of at least 1")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise LoadError(f"{path}: tensor {k} holds NaN or Inf values; a LoRA file must be finite (was it saved "
                            f"from a run that diverged?)")


def peft_adapters(sd, meta, path):
    """The peft format (`unet.<layer>.lora_A.weight` (r, in[, k, k]) / `.lora_B.weight` (out, r[, 1, 1])): scale 1
    (alpha folded into B, as save_lora writes), or lora_alpha / r from the file's diffusers metadata."""
    net = "transformer" if all(k.startswith("transformer.") for k in sd) else "unet"    # an MMDiT's, or a UNet's
    if meta.get(f"{net}.rank_pattern") or meta.get(f"{net}.alpha_pattern"):
        raise LoadError(f"{path}: per-layer ranks or alphas (rank_pattern / alpha_pattern) are not supported")
    other = [k for k in sd if not k.startswith(f"{net}.")]
    if other:
        raise LoadError(f"{path}: key {other[0]!r}: only UNet adapters (unet.<layer>.lora_A/B.weight) are supported")
    adapters = {}
    for n in dict.fromkeys(k[len(net) + 1:].rpartition(".lora_")[0] for k in sd):
        a, b = sd.pop(f"{net}.{n}.lora_A.weight", None), sd.pop(f"{net}.{n}.lora_B.weight", None)
        if a is None or b is None or not n:
            raise LoadError(f"{path}: layer {n!r}: expected exactly the pair {net}.<layer>.lora_A.weight / "
                            f".lora_B.weight (adapters in the peft format)")
        adapters[n] = a, b, meta.get(f"{net}.lora_alpha", 1) / meta.get(f"{net}.r", 1)
    return adapters


def kohya_adapters(sd, unet, path):
    """kohya / sd-scripts' format: per layer `lora_unet_<name>.lora_down.weight` (A), `.lora_up.weight` (B) and
    `.alpha` (scale alpha / r; 1 without it), where <name> is the UNet module's name with _ for . (our modules are
    named as diffusers', so spelling each of ours that way is the whole rule). Text-encoder adapters are refused."""
    layers = (nn.Linear, nn.Conv2d, LoRALinear)
    flat = {n.replace(".", "_"): n for n, m in unet.named_modules() if isinstance(m, layers)}
    adapters = {}
    for key in [k for k in sd if k.endswith(KOHYA[0])]:
        stem = key[: -len(KOHYA[0])]
        if stem.startswith("lora_te"):
            raise LoadError(f"{path}: key {key!r}: text-encoder adapters (lora_te*) are not supported, UNet only")
        name = flat.get(stem.removeprefix("lora_unet_")) if stem.startswith("lora_unet_") else None
        if name is None:
            raise LoadError(f"{path}: key {key!r}: this UNet has no such layer (expected lora_unet_ + a diffusers "
                            f"module name with _ for .; SGM names such as input_blocks_* are not supported)")
        a, b, alpha = (sd.pop(stem + k, None) for k in KOHYA)
        if b is None:
            raise LoadError(f"{path}: key {key!r} has no {stem}{KOHYA[1]}")
        adapters[name] = a, b, 1.0 if alpha is None else float(alpha) / a.shape[0]
    return adapters


def attach(unet, name, a, b, scale, path):
    """Wrap the UNet's layer `name` in an adapter with weights A = a, B = b and scale (alpha / r)."""
    try:
        base = unet.get_submodule(name)
    except AttributeError:
        raise LoadError(f"{path}: layer {name}: this UNet has no such layer") from None
    kind = LoRAConv2d if isinstance(base, nn.Conv2d) else LoRALinear if isinstance(base, nn.Linear) else None
    if kind is None or isinstance(base, LoRALinear):
        raise LoadError(f"{path}: layer {name} is a {type(base).__name__}: adapters go on plain Linear / Conv2d "
                        f"layers (merge_lora a UNet's adapters before loading more)")
    layer = kind(base, a.shape[0], scale * a.shape[0])
    if layer.lora_A.weight.shape != a.shape or layer.lora_B.weight.shape != b.shape:
        raise LoadError(f"{path}: layer {name}: adapter shapes {tuple(a.shape)} / {tuple(b.shape)} do not fit its "
                        f"{type(base).__name__} {tuple(base.weight.shape)} (expected "
                        f"{tuple(layer.lora_A.weight.shape)} / {tuple(layer.lora_B.weight.shape)})")
    layer.lora_A.weight.data.copy_(a)
    layer.lora_B.weight.data.copy_(b)
    _replace(unet, name, layer)


def load_lora(unet, path):
    """Add the adapters of a LoRA file to `unet`, unmerged: linear layers and convolutions. `path`: a run folder (its
    LORA_FILE) or a .safetensors file in the peft format diffusers writes (`unet.<name>.lora_A.weight`, see
    peft_adapters) or in kohya's (`lora_unet_<name>.lora_down.weight`, see kohya_adapters)."""
    sd, meta, path = read_lora_file(path)
    check_lora_tensors(sd, path)
    kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in sd)
    adapters = kohya_adapters(sd, unet, path) if kohya else peft_adapters(sd, meta, path)
    if sd:  # lora_B biases, DoRA magnitudes, LoHa / LoCon-CP factors, ...
        raise LoadError(f"{path}: key {next(iter(sd))!r} is not supported (plain LoRA down / up weights only)")
    for name, (a, b, scale) in adapters.items():
        attach(unet, name, a, b, scale, path)
    return unet


def merge_lora(unet):
    """Fold every adapter into its layer, W <- W + (alpha / r) B A, leaving a plain UNet (diffusers' keys and speed)."""
    for n, m in list(unet.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(unet, n, m.merged())
    return unet


def merge_lora_files(unet, paths):
    """One LoRA file or several, as users stack them (a DPO LoRA and LCM-LoRA): each loaded and merged in turn,
    W <- W + sum_i (alpha_i / r_i) B_i A_i, which is what diffusers computes with every adapter at weight 1.0."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        merge_lora(load_lora(unet, path))
    return unet
