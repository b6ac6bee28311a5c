"""
File and Hub machinery shared by every module (a tutorial reader can skip it): one-line user errors, atomic
writes, JSON and safetensors reading, Hugging Face Hub downloads (HF cache and HF_HUB_OFFLINE honored), and the
names of precisions.
"""
import json
import os
from dataclasses import fields
from pathlib import Path

import torch


class UserError(ValueError):
    """A problem the user can fix, said in one line that names the file / key / column and what was expected.
    The command-line programs print it as `error: ...` and exit with status 2, never with a traceback."""


class LoadError(UserError):
    """A checkpoint, config or model that cannot be loaded."""


class DataError(UserError):
    """Training or evaluation data that cannot be read."""


def first_line(e):
    """The first line of an exception's message (or its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------------------------------------
# Precisions by name: --mixed-precision no|fp16|bf16 and --dtype fp32|fp16|bf16

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------------------------
# Config files: a config.json read into a config dataclass (unet.py's UNetConfig, VAEConfig, ...), types checked


def config_from_dict(cls, d):
    """Build a config dataclass from a diffusers/transformers config dict, keeping the dict itself as `raw`
    (so a saved model carries exactly the config it was loaded with). Unknown fields are ignored; a known field of
    the wrong type (e.g. a string where a number belongs) is a LoadError."""
    if not isinstance(d, dict):
        raise LoadError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
    known = {f.name: f.type for f in fields(cls) if f.name != "raw"}
    for k, v in d.items():
        if k in known and not fits(v, known[k]):
            raise LoadError(f"{cls.__name__}: {k}={v!r} is not of type {known[k].__name__}")
    cfg = cls(**{k: v for k, v in d.items() if k in known})
    cfg.raw = dict(d)
    return cfg


def fits(value, kind):
    """Whether a JSON value can stand for a config field of type `kind` (an int is a float; a bool is no number)."""
    if kind is object or kind is bool:
        return kind is object or type(value) is bool
    kinds = {float: (int, float), tuple: (list, tuple)}.get(kind, kind)
    return not isinstance(value, bool) and isinstance(value, kinds)


# ----------------------------------------------------------------------------------------------------------------
# Writing: every file a run leaves is written whole or not at all (a temporary file, then an atomic rename)


def write_atomic(path, write):
    """Call write(tmp_path) for a temporary file beside `path`, then rename it over `path` (atomic on POSIX), so a
    crash or a kill never leaves half a file. The temporary name carries the process id: two writers never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path, text):
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_safetensors(tensors, path, metadata=None):
    """{key: tensor} -> a .safetensors file, atomically (contiguous CPU copies; metadata strings only)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})}))


# ----------------------------------------------------------------------------------------------------------------
# Reading, with one-line errors


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({first_line(e)})") from None


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
            raise LoadError(f"{f}: not a readable safetensors file ({first_line(e)})") from None
    return out


def variants(variant):
    """The weight-file variants to look for, in order: a requested one, else plain files then fp16."""
    return [variant, None] if variant else [None, "fp16"]


def weight_files(folder, stem, variant=None):
    """The safetensors file(s) of one network folder: `stem[.variant].safetensors`, or the shards listed in
    `stem.safetensors.index[.variant].json`. Without a requested variant, the plain files are preferred and the
    fp16 variant is used when it is all the folder has; a requested variant is preferred the same way."""
    folder = Path(folder)
    for v in variants(variant):
        single = folder / (f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors")
        index = folder / (f"{stem}.safetensors.index.{v}.json" if v else f"{stem}.safetensors.index.json")
        if single.is_file():
            return [single]
        if index.is_file():
            return [folder / name for name in sorted(set(read_json(index)["weight_map"].values()))]
    raise LoadError(f"{folder}: no weights found, expected {stem}.safetensors, {stem}.fp16.safetensors or a "
                    f"{stem}.safetensors.index.json with its shards")


# ----------------------------------------------------------------------------------------------------------------
# The Hugging Face Hub: downloads go to (and come from) the HF cache; with HF_HUB_OFFLINE=1 only the cache is read


def offline():
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_download(repo, patterns=None, filename=None, repo_type="model", local_only=False, error=LoadError):
    """A snapshot folder of `repo` holding only the files matching `patterns`, or (with `filename`) one file's path.
    Any failure (no such repo, private or gated, offline and not cached, network errors) raises `error` in one line."""
    import huggingface_hub as hh
    from huggingface_hub.errors import RepositoryNotFoundError
    cached = dict(local_files_only=True) if local_only else {}
    try:
        if filename:
            return Path(hh.hf_hub_download(repo, filename, repo_type=repo_type, **cached))
        return Path(hh.snapshot_download(repo, allow_patterns=patterns, repo_type=repo_type, **cached))
    except RepositoryNotFoundError:
        raise error(f"{repo_type} {repo!r}: no such Hub repo (or it is private or gated: log in with "
                    f"`hf auth login`)") from None
    except Exception as e:  # not cached while offline, network errors (not all of them OSErrors)
        what = f"{repo_type} {repo!r}" + (f" file {filename!r}" if filename else "")
        raise error(f"{what}: could not be fetched from the Hub and is not in the local HF cache "
                    f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {first_line(e)}") from None


def model_folder(model, patterns):
    """A local folder as is, else a Hub id: a snapshot folder of its files that match `patterns`."""
    return Path(model) if Path(model).is_dir() else hub_download(model, patterns)


# the weight file stem of each network folder in a diffusers pipeline
STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model"}


def hub_pipeline(repo, variant=None, weights=True):
    """Download (or find in the HF cache; HF_HUB_OFFLINE is honored) only the files a pipeline needs: configs,
    tokenizers and, with `weights`, the networks' safetensors of one variant (plain or fp16)."""
    small = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*.json",
             "tokenizer*/*.txt"]
    if not weights:
        return hub_download(repo, small)
    names = ["unet", "vae", "text_encoder", "text_encoder_2"]
    for v in variants(variant):
        dot = f".{v}" if v else ""
        folder = hub_download(repo, small + [p for n in names for s in [STEMS[n]] for p in (
            f"{n}/{s}{dot}.safetensors", f"{n}/{s}.safetensors.index{dot}.json", f"{n}/{s}{dot}-*.safetensors",
            f"{n}/{s}-*{dot}.safetensors")])
        index = read_json(folder / "model_index.json")
        try:
            for n in names:
                if isinstance(index.get(n), list) and index[n][0]:
                    weight_files(folder / n, STEMS[n], v)
            return folder
        except LoadError:
            continue
    return folder  # let the loader name what is missing
