"""
LoRA (Hu et al. 2021) for the UNet: adapters to train (diffdpo.py --lora-rank), the DPO reference as the same UNet
with its adapters switched off, and LoRA files in the format diffusers' `load_lora_weights` reads.

    add_lora(unet, rank, alpha, targets)   wrap linear layers, freeze everything else
    lora_disabled(unet)                    `with` it, the UNet is its base model again (the DPO reference)
    save_lora / load_lora / merge_lora     the peft-format file, and folding the adapters into the weights
"""
import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from files import LoadError, save_safetensors

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
    return save_safetensors(lora_state_dict(unet), path)


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
