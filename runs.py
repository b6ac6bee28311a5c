"""
The machinery under diffdpo.py's trainer (a tutorial reader can skip it): the command line built from a config
dataclass, the settings checked before any work, the lock that keeps two runs out of one --out, checkpoints that
hold tensors and plain data only (loaded with weights_only=True, so a checkpoint cannot run code), metrics.jsonl that
survives a torn last line, optional TensorBoard / W&B logging, the sample grids at checkpoints, the model card pushed
with the weights to the Hugging Face Hub, and Adafactor.
"""
import argparse
import atexit
import fcntl
import importlib.util
import json
import os
import resource
import signal
import threading
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import fsdp
import toy
from files import (DTYPE_NAMES, DTYPES, TEMP_NAME, NoSpaceError, UserError, first_line, json_loads, raise_if_no_space,
                   write_atomic, write_text_atomic)
from lora import LORA_FILE, lora_disabled, save_lora
from sample import TOY_MODELS, image_grid, render, sampling_defaults
from shards import find_shards
from mmdit import is_sd3, load_pipeline, weights_folder
from unet import save_component

# ----------------------------------------------------------------------------------------------------------------
# Settings


def validate(cfg, device, built):
    """Every setting of a TrainConfig, before any work: a bad one is a one-line error (the CLI exits with status 2).
    `built`: the pairs are built by the run (--data shapes, style:...), else the data must be reachable now."""
    for f in fields(cfg):
        ok = f.metadata.get("choices")
        if ok and getattr(cfg, f.name) not in ok:
            raise UserError(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}: expected one of "
                            f"{', '.join(filter(None, ok))}")
    at_least = dict(batch_size=1, grad_accum=1, max_steps=1, warmup_steps=0, lora_rank=0, checkpoint_every=0,
                    sample_steps=1, max_bad_steps=1, val_pairs=0, threads=0)
    for k, low in at_least.items():
        if getattr(cfg, k) < low:
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be at least {low}")
    for k in ("lr", "beta", "grad_clip", "desirable_weight", "undesirable_weight"):
        if not getattr(cfg, k) > 0:
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be positive")
    for k in ("label_smoothing", "label_noise"):
        if not 0 <= getattr(cfg, k) < (0.5 if k == "label_smoothing" else 1):
            raise UserError(f"--{k.replace('_', '-')} {getattr(cfg, k)}: must be a probability in [0, "
                            f"{'0.5' if k == 'label_smoothing' else '1'})")
    step = 16 if is_sd3(cfg.model) else 8          # an MMDiT cuts its 8x-smaller latents into 2 x 2 patches
    if cfg.resolution < 0 or cfg.resolution % step:
        raise UserError(f"--resolution {cfg.resolution}: must be a multiple of {step} (0: the model's own)")
    if not 0 <= cfg.caption_dropout <= 1:
        raise UserError(f"--caption-dropout {cfg.caption_dropout}: must be a probability in [0, 1]")
    if cfg.cache and cfg.random_crop:
        raise UserError("--cache and --random-crop do not go together: a random crop changes every epoch")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu)")
    if cfg.report_to and importlib.util.find_spec(cfg.report_to) is None:
        raise UserError(f"--report-to {cfg.report_to}: the {cfg.report_to} package is not installed "
                        f"(pip install {cfg.report_to})")
    signal_numbers(cfg.save_on_signal)
    unpaired = not built and any(s.unpaired for s in find_shards(cfg.data))  # and the data is reachable now
    if unpaired and (cfg.loss != "kto" or cfg.cache or cfg.choice_model):
        raise UserError(f"--data {cfg.data}: labelled single images, not pairs: they train with --loss kto, without "
                        f"--cache and --choice-model")


def peak_memory_gib(device):
    """This process's peak memory: the GPU's allocations, or on the CPU its resident set (Linux counts KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def parse_config(cls, argv, description, presets, auto_preset, loss_presets=None):
    """A config dataclass from the command line: one flag per field (defaults and help from the field's metadata);
    the preset chosen by --preset (or, when "auto", by auto_preset(--model)) replaces the defaults, then that
    preset's settings for --loss (loss_presets[preset][loss], e.g. each loss's beta), and the flags given on the
    command line replace those."""
    help_format = type("Help", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=description, formatter_class=help_format,
                                epilog=presets_help(cls, presets, loss_presets or {}))
    for f in fields(cls):
        name, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=f.metadata["help"])
        if f.type in (bool, "bool"):
            p.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(name, type=type(f.default), **kw)
    first = p.parse_known_args(argv)[0]
    preset = auto_preset(first.model) if first.preset == "auto" else first.preset
    if preset not in presets:
        p.error(f"--preset {preset}: expected one of {', '.join(presets)} or auto")
    p.set_defaults(**{**presets[preset], **(loss_presets or {}).get(preset, {}).get(first.loss, {})})
    return cls(**dict(vars(p.parse_args(argv)), preset=preset))


def presets_help(cls, presets, loss_presets):
    """--help's epilog: each preset's defaults (and its settings for a --loss), and what a resumed run does with each
    setting."""
    defaults = {f.name: f.default for f in fields(cls)}
    shown = ("beta", "max_steps", "batch_size", "lr", "warmup_steps", "resolution", "threads", "vae_latents")
    rows = [f"  {name:8} " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items()
                                       if k not in ("model", "data") and (v != defaults[k] or name.startswith("toy") and
                                                                          k in shown))
            for name, values in presets.items()]
    rows += [f"  {name:8} with " + "; ".join(f"--loss {loss}: " + ", ".join(f"--{k} {v}" for k, v in kw.items())
                                          for loss, kw in by_loss.items()) for name, by_loss in loss_presets.items()]
    policy = {r: [f"--{f.name.replace('_', '-')}" for f in fields(cls) if f.metadata["resume"] == r]
              for r in ("fixed", "new")}
    return ("presets (the defaults shown above are the toy's):\n" + "\n".join(rows) + "\n\nresuming (the same --out "
            "again): these must not change, else the run refuses to start: " + " ".join(policy["fixed"]) +
            "\nthese take the new value (recorded in OUT/config.json): " + " ".join(policy["new"]))


# ----------------------------------------------------------------------------------------------------------------
# One run per folder: an exclusive lock on OUT/.lock, held for the run's life. The kernel drops it when the process
# ends however it ends (exit, crash, kill -9), so a stale lock never blocks the next run.


HELD = {}    # the locks this process holds, by folder: a run that failed in it leaves the folder to its next run


def lock(out):
    """Create OUT if needed and lock it for this process (the lock file names its pid); a run of another process on
    the same folder gets a one-line refusal. Also the check that --out is writable, before any work."""
    out = Path(out)
    if out.resolve() in HELD and not HELD[out.resolve()].closed:
        return HELD[out.resolve()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as e:
        raise UserError(f"--out {out}: cannot be created or written ({e.strerror or first_line(e)})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"--out {out} is in use by another run ({owner}); wait for it to finish or use another "
                        f"--out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    atexit.register(handle.close)
    HELD[out.resolve()] = handle
    remove_stale_temp_files(out)
    return handle


def remove_stale_temp_files(out):
    """Delete the temporary files (NAME.tmpPID, files.write_atomic's) that writes killed mid-way (kill -9, a node
    lost) left in OUT and its subfolders: with OUT locked, only a live process other than this one may still be
    writing one. Says in one line how many and how large."""
    stale = []
    for folder, _, names in os.walk(out):
        for name in names:
            m, path = TEMP_NAME.fullmatch(name), Path(folder) / name
            if m and path.is_file() and not path.is_symlink() and not alive(int(m[1])):
                stale.append((path, path.stat().st_size))
                path.unlink()
    if stale:
        print(f"removed {len(stale)} temporary file{'s' * (len(stale) > 1)} of interrupted writes from {out} "
              f"({sum(size for _, size in stale) / 2**20:.1f} MB): " + ", ".join(p.name for p, _ in stale[:3]) +
              (", ..." if len(stale) > 3 else ""), flush=True)
    return len(stale)


def alive(pid):
    """Whether `pid` is a running process other than this one."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:          # another user's process
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Preemption: SLURM and Kubernetes send SIGTERM some seconds before they kill a job (SLURM's --signal=USR1@120 sends
# SIGUSR1 earlier). With --save-on-signal the run finishes its optimizer step, writes its checkpoint, says where it
# stopped and exits with STOPPED, a status a job script can requeue on; a second signal stops it at once.

STOPPED = 75         # sysexits.h's EX_TEMPFAIL, "try again later": re-running the same command resumes
CATCHABLE = ("TERM", "USR1", "USR2", "INT", "HUP", "XCPU")


def signal_numbers(spec):
    """--save-on-signal TERM,USR1 -> [SIGTERM, SIGUSR1]; "" -> []."""
    names = [n.strip().upper().removeprefix("SIG") for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in CATCHABLE]
    if bad:
        raise UserError(f"--save-on-signal {spec}: {bad[0]} is not one of {', '.join(CATCHABLE)} ('' for none)")
    return [signal.Signals[f"SIG{n}"] for n in names]


class StopSignals:
    """Handlers for --save-on-signal's signals, installed when the run holds its lock. Until at_step_end() (loading,
    pair building: phases that resume from what they wrote) a signal stops the process at once; after it the first
    signal is only recorded and the loop asks requested() after each optimizer step; a second one stops at once.
    Stopping at once raises SystemExit(STOPPED): the atomic writes' `finally` clauses remove their temporary files."""

    def __init__(self, spec, rank=0):
        self.rank, self.received, self.deferred, self.previous = rank, None, False, {}
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for number in signal_numbers(spec):
                self.previous[number] = signal.signal(number, self.handle)

    def handle(self, number, frame):
        name = signal.Signals(number).name
        if self.deferred and self.received is None:
            self.received = name
            if self.rank == 0:  # os.write: print() is not safe inside a handler
                os.write(2, f"\n{name}: stopping after this optimizer step (another {name} stops at once)\n".encode())
            return
        self.close()
        os.write(2, f"\n{name}: stopped at once, nothing half-written; re-run the same command to resume\n".encode())
        raise SystemExit(STOPPED)

    def at_step_end(self):
        """From now on the first signal stops the run at the end of its optimizer step."""
        self.deferred = True

    def requested(self, device):
        """Whether any rank received a signal. Every rank calls it after every step, so all stop after the same one."""
        if not self.previous:
            return False
        flag = torch.tensor([float(self.received is not None)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit(self, step, out):
        """Once the checkpoint of `step` is written and the lock released: one line from rank 0, exit with STOPPED."""
        if self.rank == 0:
            print(f"stopped by {self.received or 'a signal to another rank'} after step {step}: "
                  f"{Path(out) / 'checkpoint.pt'} holds it; re-run the same command to resume (exit status {STOPPED})",
                  flush=True)
        self.close()
        raise SystemExit(STOPPED)

    def close(self):
        """Put the previous handlers back."""
        for number, previous in self.previous.items():
            signal.signal(number, previous)
        self.previous = {}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically; read with weights_only=True (tensors, numbers, strings, lists and dicts only)

CHECKPOINT_KEYS = ("unet", "optimizer", "scheduler", "scaler", "rng", "step", "position", "skipped", "config")


def save_checkpoint(path, ckpt):
    """torch.save to a temporary file, then rename: a crash or a full disk leaves the previous checkpoint intact."""
    try:
        write_atomic(path, lambda tmp: torch.save(ckpt, tmp))
    except NoSpaceError as e:
        raise NoSpaceError(path, e.reason, "the previous checkpoint", "re-run the same command to resume") from None
    except OSError as e:
        raise UserError(f"{path}: could not be written ({e.strerror or first_line(e)}); the previous checkpoint.pt is "
                        f"intact: re-run the same command to resume") from None


def load_checkpoint(path):
    """The checkpoint at `path`, or None if there is none. A damaged file, or one that is not a checkpoint of ours
    (including one that would run code when unpickled), is a one-line error saying what to do."""
    path = Path(path)
    if not path.exists():
        return None
    what = "delete it to start this run over, or use another --out"
    try:
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else would be read as a pickle
            raise ValueError("not a zip archive, as torch.save writes")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (damaged or crafted files raise many kinds: UnpicklingError, KeyError, ...)
        raise UserError(f"{path}: not a readable diffdpo checkpoint ({first_line(e)[:160]}); {what}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a diffdpo checkpoint (no {', '.join(missing)}); {what}")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# A run's files at each checkpoint: checkpoint.pt (and with --fsdp the folder of pieces it names), then the weights
# for users (OUT/unet/ or the LoRA file)


def write_checkpoint(s, out, opt, state, pairs, rank=0):
    """OUT/checkpoint.pt to resume from (the trainable weights, the optimizer, scheduler and scaler states, the stream
    position, the RNG and the pairs skipped so far), then the weights for users: in this order the user's weights are
    never ahead of the checkpoint (a full disk stops the run between the two at worst). Unless a weight is not
    finite: then the last checkpoint, which is, stays. Sharded networks (--fsdp, every rank calls this) write their
    pieces to a folder that checkpoint.pt names (fsdp.save)."""
    policy, current = s.policy, s.cfg.reference_update == "current"
    if not fsdp.all_finite(p for p in policy.parameters() if p.requires_grad):
        if rank == 0:
            print(f"step {state['step']}: non-finite weights, {out / 'checkpoint.pt'} is not overwritten")
        return
    if fsdp.sharded(policy):
        reference = s.reference if current else None
        state["sharded"] = fsdp.save(out, state["step"], policy, opt.optimizer, reference, s.cfg.lora_rank, rank)
        weights = optimizer = reference = None
    else:
        weights, optimizer = policy.state_dict(), opt.optimizer.state_dict()
        reference = s.reference.state_dict() if current else None
    if s.cfg.lora_rank and weights:  # the adapters alone (the base is --model's)
        weights = {k: v for k, v in weights.items() if ".lora_" in k}
    if rank == 0:
        save_checkpoint(out / "checkpoint.pt", dict(
            unet=weights, optimizer=optimizer, scheduler=opt.scheduler.state_dict(), scaler=opt.scaler.state_dict(),
            rng=torch.get_rng_state(), reference=reference,
            skipped_pairs={k: sorted(v) for k, v in pairs.skipped.items()}, **state))
        fsdp.remove_old(out, keep=state.get("sharded"))
    save_weights(s, out, rank)


def save_final_weights(s, out, step, rank):
    """A run already at --max-steps: its checkpoint's weights again (a full disk may have stopped their last write)."""
    if rank == 0:
        print(f"{out} is already at step {step} >= --max-steps {s.cfg.max_steps}", flush=True)
    if rank == 0 or fsdp.sharded(s.policy):
        save_weights(s, out, rank)
    if rank == 0 and s.cfg.lora_rank and s.cfg.merge_lora:
        save_merged_unet(s.cfg, out)


def save_weights(s, out, rank=0):
    """OUT/unet/ in the diffusers layout, or with LoRA the adapters alone (as diffusers' load_lora_weights reads);
    sharded networks are gathered whole on rank 0 first."""
    policy = s.policy
    if fsdp.sharded(policy):
        policy = fsdp.whole(policy, fsdp.whole_state_dict(policy, s.cfg.lora_rank))
    if rank == 0 and s.cfg.lora_rank:
        save_lora(policy, out / LORA_FILE)
    elif rank == 0:
        save_component(policy, out / weights_folder(s.cfg.model))


def save_merged_unet(cfg, out):
    """--merge-lora: OUT/unet/ (SD3: transformer/), --model's network (fp32, freshly loaded) with OUT's LoRA file
    merged in, as sample.py --lora merges it; the policy itself is left as it trained."""
    merged = load_pipeline(cfg.model, lora=out / LORA_FILE)
    save_component(merged.unet, out / weights_folder(cfg.model))


# ----------------------------------------------------------------------------------------------------------------
# Across ranks: the logged numbers' mean, the pairs left out; the stop after too many non-finite steps


def all_mean(x, world):
    """Mean of a tensor over ranks (for logging)."""
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def gathered_counts(pairs, world, gathered, names):
    """The stream's counts of pairs left out, each pair once (data.PairSource.counts): every rank's skipped pairs are
    merged, so each rank counts the union. Only the keys not yet in `gathered` (the union so far) travel."""
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, {r: keys - gathered.get(r, set()) for r, keys in pairs.skipped.items()})
        for other in everyone:
            for reason, keys in other.items():
                pairs.skipped[reason] |= keys
                gathered.setdefault(reason, set()).update(keys)
    return {k: pairs.counts().get(k, 0) for k in names}


def diverged(out, bad_in_a_row):
    """The error that stops a run after --max-bad-steps non-finite steps in a row, naming the step its last
    checkpoint holds (checkpoints are written only with finite weights)."""
    held = load_checkpoint(out / "checkpoint.pt")
    where = (f"{out / 'checkpoint.pt'} holds step {held['step']}, the last checkpoint (its weights are finite)" if held
             else "no checkpoint was written yet")
    return UserError(f"{bad_in_a_row} optimizer steps in a row had a non-finite loss/gradient; stopping: {where}; try "
                     f"a lower --lr or --mixed-precision bf16 and re-run the command to resume")


# ----------------------------------------------------------------------------------------------------------------
# metrics.jsonl: one JSON row per optimizer step (and val_* rows), appended as the run goes


def read_metrics(path, upto_step=None):
    """The rows of a metrics file, skipping a torn last line (a disk that filled up, a kill mid-write) and any line
    that is not a JSON object; with `upto_step`, only the rows of steps <= upto_step."""
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                row = json_loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row and (upto_step is None or row["step"] <= upto_step):
                rows.append(row)
    return rows


def trim_metrics(path, step):
    """On resume: keep the rows up to the checkpoint's step (the steps after it will be run again), atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path, step)))


def append_metrics(path, row):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # a torn last line is dropped on resume (read_metrics)
        raise_if_no_space(e, path)
        raise


class Log:
    """Rank 0's log of a run: the progress bar, OUT/metrics.jsonl, and (--report-to) TensorBoard's event files in
    OUT/tensorboard/ or a Weights & Biases run, both with the metrics' numbers and the sample grids."""

    def __init__(self, out, config, report_to, total, initial):
        self.path, self.tensorboard, self.wandb = Path(out) / "metrics.jsonl", None, None
        self.bar = tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(Path(out) / "tensorboard"))
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb.init(project="diffdpo", name=Path(out).name, dir=str(out), config=config)

    def row(self, row):
        append_metrics(self.path, row)
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tensorboard is not None:
            for k, v in numbers.items():
                self.tensorboard.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])
        if "loss" in row:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}", lr=f"{row['lr']:.2e}",
                                 pairs_s=f"{row['pairs_per_s']:.2f}")
            self.bar.update(1)

    def grid(self, path, step):
        if path is not None and self.tensorboard is not None:
            self.tensorboard.add_image("samples", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if path is not None and self.wandb is not None:
            import wandb
            self.wandb.log({"samples": wandb.Image(str(path))}, step=step)

    def close(self):
        self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------------------------
# The sample grids at each checkpoint (rank 0; --fsdp: every rank): fixed prompts and seeds, the base row, the policy's


SAMPLE_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube on top of a blue sphere",
                  "a watercolor painting of a fox in the snow", "a close-up portrait of an old fisherman"]


def sample_prompts(s):
    """The grids' fixed prompts, seeds and sampling settings."""
    prompts = toy.shape_prompts("test")[:8] if toy.world_of(s.cfg.data) else SAMPLE_PROMPTS
    kw = dict(steps=s.cfg.sample_steps, height=s.resolution, width=s.resolution,
              guidance=sampling_defaults(s.cfg.model)[1])
    return prompts, list(range(len(prompts))), kw


def base_samples(s, out, step):
    """OUT/samples/base/NN.png, the grids' first row: the base model's images for the fixed prompts and seeds,
    rendered once, by the reference (or the policy with LoRA switched off; for SFT the policy before it moves)."""
    prompts, seeds, kw = sample_prompts(s)
    paths = [out / "samples" / "base" / f"{i:02d}.png" for i in seeds]
    if not s.cfg.samples or all(p.is_file() for p in paths):
        return paths
    base = s.reference if s.reference is not None else s.policy
    if base is s.policy and step > 0 and not s.cfg.lora_rank:   # SFT resumed with no base row: the base again
        base = load_pipeline(s.cfg.model).unet.to(s.sd.device)
    with lora_disabled(base), s.autocast:
        for path, image in zip(paths, render(s.sd, base, prompts, seeds, **kw)):
            write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
    return paths


def samples(s, out, step):
    """OUT/samples/stepNNNNNN.png: the base model's images (row 1) and the policy's at this step (row 2), for fixed
    prompts and seeds, so grids across checkpoints are comparable."""
    if not s.cfg.samples:
        return None
    prompts, seeds, kw = sample_prompts(s)
    base = [Image.open(p).convert("RGB") for p in base_samples(s, out, step)]
    try:
        with s.autocast:
            tuned = render(s.sd, s.policy, prompts, seeds, **kw)
    except UserError as e:  # finite weights that sample NaN (a run diverging): no grid; --max-bad-steps decides
        print(f"step {step}: no sample grid: {e}")
        return None
    grid = image_grid([base, tuned], ["base", f"step {step}"], prompts)
    path = out / "samples" / f"step{step:06d}.png"
    write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


# ----------------------------------------------------------------------------------------------------------------
# What a run prints at its start and end, and its end on every rank

LAYOUTS = {"sd15": "SD1.5's layout, UNet", "sdxl": "SDXL's layout, UNet", "sd3": "SD3's layout, MMDiT"}


def banner(s, run_cfg, world, device):
    what = f"{LAYOUTS[s.sd.kind]} {sum(p.numel() for p in s.policy.parameters()) / 1e6:.1f}M params"
    precision = DTYPE_NAMES[DTYPES[run_cfg["mixed_precision"]]]
    return (f"{s.cfg.method} on {model_name(s.cfg.model)} ({what}), {run_cfg['pairs_per_step']} pairs/step on "
            f"{world} x {device.type}, lr {run_cfg['lr_used']:.3g}, {precision} precision")


def model_name(model):
    return f"{model}, the toy model" if model in TOY_MODELS else model


def done_line(s, state, row, out):
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in row.items() if k in SKIP_COUNTS)
    return (f"done: {state['step']} steps ({state['skipped']} skipped, {row['pairs_per_s']:.2f} pairs/s at the last, "
            f"peak memory {peak_memory_gib(s.sd.device):.1f} GiB); pairs left out: {counts}; weights in "
            f"{out / (LORA_FILE if s.cfg.lora_rank else weights_folder(s.cfg.model))}")


SKIP_COUNTS = ("corrupt", "too_large", "ties", "bad_labels", "empty_captions", "long_captions")


def finish(world, out, lock, stop=None):
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if lock is not None:
        lock.close()
    if stop is not None:
        stop.close()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model card and the upload (--push-to-hub REPO)


MODEL_CARD = """---
{meta}
---

# {repo}

{base} fine-tuned with {method} on preference pairs (`--data {data}`) by diffdpo, a from-scratch implementation of
Diffusion-DPO (Wallace et al., CVPR 2024).

| setting | value |
| --- | --- |
{settings}

## Results
{results}
## Use

```python
{load}
image = pipe("a photo of a cat").images[0]
```
"""
CARD_SETTINGS = ("method", "beta", "max_steps", "pairs_per_step", "lr_used", "optimizer", "mixed_precision",
                 "resolution", "lora_rank", "seed")


def model_card(config, base, repo, out, weights):
    """OUT/README.md's text in the Hub's model-card format: YAML metadata, what was trained how, the results the run
    folder holds (the toy's summary.json, an eval.py report in OUT/eval/), and how to load the weights."""
    out, lora, data = Path(out), weights.endswith(".safetensors"), config["data"]
    tags = ["text-to-image", "stable-diffusion", "diffusion-dpo", "diffdpo"] + ["lora"] * lora
    meta = [f"base_model: {base}", "library_name: diffusers", "tags:", *[f"- {t}" for t in tags]]
    meta += ["datasets:", f"- {data[len('hub:'):]}"] if data.startswith("hub:") else []
    results = ""
    for name in ("summary.json", "eval/report.md"):
        if (out / name).is_file():
            text = (out / name).read_text()
            results += f"\n`{name}`:\n\n" + (f"```json\n{text}\n```\n" if name.endswith(".json") else text)
    if lora:
        load = (f'from diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("{base}")\n'
                f'pipe.load_lora_weights("{repo}")')
    else:  # weights: unet or, for SD3, transformer
        net = "SD3Transformer2DModel" if weights == "transformer" else "UNet2DConditionModel"
        load = (f'from diffusers import DiffusionPipeline, {net}\n'
                f'{weights} = {net}.from_pretrained("{repo}", subfolder="{weights}")\n'
                f'pipe = DiffusionPipeline.from_pretrained("{base}", {weights}={weights})')
    settings = "\n".join(f"| {k} | {config.get(k, '')} |" for k in CARD_SETTINGS)
    return MODEL_CARD.format(meta="\n".join(meta), repo=repo, base=base, method=str(config["method"]).upper(),
                             data=data, settings=settings, results=results or "\nNone yet.\n", load=load)


def push_to_hub(repo, out, card):
    """Write OUT/README.md (the model card) and upload it with the weights (OUT/unet/ or the LoRA file), the config,
    metrics, sample grids and results to the Hub model repo `repo` (created if needed; `hf auth login` first)."""
    import huggingface_hub as hh
    write_text_atomic(Path(out) / "README.md", card)
    patterns = ["README.md", "unet/*", "transformer/*", "pytorch_lora_weights.safetensors", "config.json",
                "metrics.jsonl", "summary.json", "compare.png", "samples/step*.png", "eval/report.*"]
    try:
        api = hh.HfApi()
        api.create_repo(repo, exist_ok=True)
        url = api.upload_folder(repo_id=repo, folder_path=str(out), allow_patterns=patterns,
                                commit_message=f"diffdpo: {Path(out).name}")
    except Exception as e:  # auth, network, a bad repo id: one line
        raise UserError(f"--push-to-hub {repo}: the upload failed ({first_line(e)}); the run itself is saved in "
                        f"{out}") from None
    print(f"pushed {out} to https://huggingface.co/{repo} ({url})")


# ----------------------------------------------------------------------------------------------------------------
# Adafactor (Shazeer & Stern 2018) in a few lines, for SDXL's memory budget


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) as the official SDXL run configures transformers' one: factored second moments
    (row and column means of g^2 over the last two dims), no first moment, update RMS clipped at 1, weight decay,
    a fixed learning rate (scale_parameter=False, relative_step=False)."""

    def __init__(self, params, lr, weight_decay=0.0, beta2_decay=-0.8, eps=1e-30, clip=1.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, beta2_decay=beta2_decay, eps=eps, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad.float(), self.state[p]
                state["step"] = state.get("step", 0) + 1
                beta2 = 1.0 - state["step"] ** group["beta2_decay"]      # 1 - t^-0.8: grows towards 1
                g2 = g.square() + group["eps"]
                if g.ndim >= 2:  # factored over the last two dims: v ~ outer(row means, column means) / mean
                    r = state.setdefault("row", torch.zeros_like(g2.mean(-1)))
                    c = state.setdefault("col", torch.zeros_like(g2.mean(-2)))
                    r.lerp_(g2.mean(-1), 1 - beta2)
                    c.lerp_(g2.mean(-2), 1 - beta2)
                    v = (r / r.mean(-1, keepdim=True)).unsqueeze(-1) * c.unsqueeze(-2)
                else:
                    v = state.setdefault("v", torch.zeros_like(g)).lerp_(g2, 1 - beta2)
                u = g / v.sqrt()
                u /= (u.square().mean().sqrt() / group["clip"]).clamp_min(1.0)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])
