"""
Sharded training (--fsdp): PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard) splits every parameter of the policy,
its gradient and its optimizer state into world-size pieces, one per rank, and all-gathers a block's weights just
before the block runs (then frees them again); gradients are reduce-scattered, so each rank steps its own piece. The
frozen reference is sharded the same way, or (--fsdp-reference replicate) kept whole in the compute precision.
Checkpoints go through Distributed Checkpoint (torch.distributed.checkpoint): every rank writes its pieces, and any
number of ranks, sharded or not, reads them back. The method does not change: this is machinery a reader can skip.
"""
import copy
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from files import DTYPES, NoSpaceError, UserError, out_of_space
from mmdit import JointTransformerBlock
from unet import ResnetBlock2D, Transformer2DModel

# the units gathered one at a time (UNets: resnets, transformers; an MMDiT: its blocks); the rest goes with the root
BLOCKS = (ResnetBlock2D, Transformer2DModel, JointTransformerBlock)


def api():
    """torch.distributed's FSDP2 and Distributed Checkpoint, imported on first use: they take half a second to import
    (DTensor, sympy), which a run that never shards does not pay. A namespace of the names used here."""
    from torch.distributed import checkpoint
    from torch.distributed.checkpoint import state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    return SimpleNamespace(checkpoint=checkpoint, fully_shard=fully_shard, MixedPrecisionPolicy=MixedPrecisionPolicy,
                           **{k: getattr(state_dict, k) for k in ("StateDictOptions", "get_model_state_dict",
                                                                  "get_state_dict", "set_model_state_dict",
                                                                  "set_state_dict")})


def is_dtensor(x):
    """Whether x is a DTensor (a sharded tensor). None exists before torch.distributed.tensor is imported."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(x, tensor.DTensor)


# ----------------------------------------------------------------------------------------------------------------
# Sharding the networks


def check(cfg, precision):
    """One-line errors for what --fsdp does not do, before any work."""
    if not cfg.fsdp:
        return
    if "RANK" not in os.environ:
        raise UserError("--fsdp shards over processes: start the run with torchrun --nproc-per-node N diffdpo.py ...")
    if precision == "fp16":
        raise UserError("--fsdp trains in bf16 or fp32: fp16's loss scaler is not sharded (--mixed-precision bf16)")
    if cfg.compile or cfg.optimizer != "adamw":
        raise UserError("--fsdp runs with --optimizer adamw (the sdxl preset's is adafactor) and without --compile")
    if cfg.fsdp_reference == "replicate" and cfg.reference_update == "current":
        raise UserError("--reference-update current copies the policy into the reference: use --fsdp-reference shard")


def shard_networks(s, precision, reference_how):
    """diffdpo.Setup's policy and reference, sharded. --fsdp-reference replicate keeps the frozen reference whole on
    every rank with every tensor in the compute precision, as the sharded policy's gathered weights are (so that
    policy == reference at step 0)."""
    amp_dtype = DTYPES[precision]
    policy = shard(s.policy, amp_dtype)
    if s.reference is None:                               # SFT, MaPO: no reference
        return policy, None
    if s.reference is s.policy:                           # LoRA: the policy with its adapters switched off
        return policy, policy
    if reference_how == "replicate":
        return policy, s.reference.to(amp_dtype)
    return policy, shard(s.reference, amp_dtype)


def shard(net, amp_dtype):
    """fully_shard each block, then the root. With bf16 the weights are gathered (and run) in bf16 while the shards
    stay fp32 master weights; gradients are reduced in fp32. A frozen network stores its shards as they are."""
    fsdp = api()
    mp = fsdp.MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype != torch.float32 \
        else fsdp.MixedPrecisionPolicy()
    for m in net.modules():
        if isinstance(m, BLOCKS):
            fsdp.fully_shard(m, mp_policy=mp)
    fsdp.fully_shard(net, mp_policy=mp)
    return net


def sharded(net):
    fsdp = sys.modules.get("torch.distributed.fsdp")          # (never, unless this process imported FSDP)
    return fsdp is not None and isinstance(net, fsdp.FSDPModule)


def clip_grad_norm(params, max_norm):
    """clip_grad_norm_ over the global gradient: each rank's piece of the squared norm, summed over the ranks."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if is_dtensor(norm):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def local(p):
    """This rank's piece of a (sharded) tensor."""
    return p.to_local() if is_dtensor(p) else p


def all_finite(params):
    """Every weight finite, on every rank (one all_reduce when sharded)."""
    params = list(params)
    ok = torch.tensor(float(all(torch.isfinite(local(p)).all() for p in params)))
    if params and is_dtensor(params[0]):
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


# ----------------------------------------------------------------------------------------------------------------
# Whole weights from the shards: OUT/unet/ or transformer/ (or the LoRA file) for users, written by rank 0


def whole_state_dict(net, lora):
    """{name: whole CPU tensor} on rank 0 ({} on the others), gathered from the shards; all ranks call it."""
    fsdp = api()
    options = fsdp.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    return fsdp.get_model_state_dict(net, options=options)


def whole(net, weights):
    """What unet.save_component and lora.lora_state_dict read of a network: its config, its modules (LoRA's scales)
    and, here, the whole weights in place of its state_dict()."""
    return SimpleNamespace(cfg=net.cfg, named_modules=net.named_modules, state_dict=lambda: weights)


# ----------------------------------------------------------------------------------------------------------------
# Sharded checkpoints: OUT/checkpoint-NNNNNN/ holds the networks' and the optimizer's pieces; OUT/checkpoint.pt (the
# rest of the state) names it. The folder is written under a temporary name and renamed, and checkpoint.pt moves on
# to it only after that: a kill at any point leaves the previous pair usable.


def states(policy, optimizer, reference, lora):
    """The trainable networks' and the optimizer's tensors, keyed by parameter name (sharded or whole alike)."""
    fsdp = api()
    unet, optim = fsdp.get_state_dict(policy, optimizer, options=fsdp.StateDictOptions(ignore_frozen_params=lora))
    state = dict(unet=unet, optimizer=optim)
    if reference is not None:
        state["reference"] = fsdp.get_model_state_dict(reference)
    return state


def save(out, step, policy, optimizer, reference, lora, rank):
    """Every rank writes its pieces into OUT/checkpoint-NNNNNN.tmp/, then rank 0 renames it. Returns its name."""
    name = f"checkpoint-{step:06d}"
    tmp = Path(out) / f"{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        api().checkpoint.save(states(policy, optimizer, reference, lora), checkpoint_id=tmp)
    except Exception as e:  # noqa: BLE001 (a full disk surfaces as whatever the writer raised)
        if out_of_space(e, Path(out)):
            raise NoSpaceError(tmp, e, "the previous checkpoint", "re-run the same command to resume") from None
        raise
    dist.barrier()
    if rank == 0:
        shutil.rmtree(Path(out) / name, ignore_errors=True)
        os.replace(tmp, Path(out) / name)
    return name


def remove_old(out, keep):
    """After checkpoint.pt names `keep`: the other sharded checkpoint folders (and any a kill left half-written)."""
    for old in Path(out).glob("checkpoint-*"):
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt, out, policy, optimizer, reference, lora):
    """checkpoint.pt's networks and optimizer state: from the sharded folder it names, or (a run that was not sharded,
    resumed sharded) from its whole tensors."""
    if ckpt.get("sharded"):
        return load(Path(out) / ckpt["sharded"], policy, optimizer, reference, lora)
    load_whole(ckpt, policy, optimizer, lora)
    if reference is not None:
        fsdp = api()
        fsdp.set_model_state_dict(reference, ckpt["reference"], options=fsdp.StateDictOptions(full_state_dict=True))


def load(folder, policy, optimizer, reference, lora):
    """A sharded checkpoint into the networks and the optimizer, whatever the number of ranks that wrote it and
    whether they are sharded now (Distributed Checkpoint reshards on load)."""
    if not (Path(folder) / ".metadata").is_file():
        raise UserError(f"{folder}: no sharded checkpoint there (checkpoint.pt names it); use another --out")
    fsdp, state = api(), states(policy, optimizer, reference, lora)
    with warnings.catch_warnings():             # "... assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        fsdp.checkpoint.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    fsdp.set_state_dict(policy, optimizer, model_state_dict=state["unet"], optim_state_dict=state["optimizer"],
                        options=fsdp.StateDictOptions(strict=not lora))
    if reference is not None:
        fsdp.set_model_state_dict(reference, state["reference"])


def load_whole(ckpt, policy, optimizer, lora):
    """checkpoint.pt's whole tensors (a run that was not sharded) into sharded networks and optimizer: the optimizer
    state's parameter numbers become names, as Distributed Checkpoint keys them."""
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    optim = copy.copy(ckpt["optimizer"])
    optim["state"] = {names[i]: v for i, v in optim["state"].items()}
    optim["param_groups"] = [dict(g, params=[names[i] for i in g["params"]]) for g in optim["param_groups"]]
    fsdp = api()
    fsdp.set_state_dict(policy, optimizer, model_state_dict=ckpt["unet"], optim_state_dict=optim,
                        options=fsdp.StateDictOptions(full_state_dict=True, strict=not lora))
