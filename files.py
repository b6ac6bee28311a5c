"""
File and Hub machinery shared by every module (a tutorial reader can skip it): one-line user errors, atomic
writes, JSON and safetensors reading, Hugging Face Hub downloads (HF cache and HF_HUB_OFFLINE honored), and the
names of precisions.
"""
import errno
import json
import os
import re
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


TEMP_NAME = re.compile(r".+\.tmp(\d+)")    # write_atomic's temporary files: NAME.tmpPID (runs.lock removes stale ones)


def write_atomic(path, write):
    """Call write(tmp_path) for a temporary file beside `path`, then rename it over `path` (atomic on POSIX), so a
    crash or a kill never leaves half a file. The temporary name carries the process id: two writers never share it.
    A write that fails for lack of disk space, whatever the writer calls it, is a NoSpaceError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        if not isinstance(e, UserError) and out_of_space(e, path.parent):  # asked while tmp still holds its space
            raise NoSpaceError(path, e) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class NoSpaceError(UserError):
    """A write that failed because the disk (or the quota) is full: one line, the previous file intact."""

    def __init__(self, path, error, intact=None, then="re-run the same command"):
        self.path, self.reason = Path(path), first_line(error)
        kept = f"; {intact or f'the previous {self.path.name}'} is intact" if self.path.exists() else ""
        super().__init__(f"no space left on the disk of {self.path.parent} to write {self.path.name} ({self.reason})"
                         f"{kept}: free some disk space and {then}")


# how the writers say "disk full" without an errno: safetensors (os error 28), torch.save (unexpected pos / file
# write failed), quotas
NO_SPACE_WORDS = ("no space left", "os error 28", "unexpected pos", "file write failed", "disk quota")


def out_of_space(error, folder):
    """Whether a failed write ran out of space: ENOSPC / EDQUOT, a writer's own words for it, or an I/O error on a disk
    that now has less than 1 MiB free."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(w in str(error).lower() for w in NO_SPACE_WORDS):
        return True
    if not isinstance(error, (OSError, RuntimeError)):  # a bug in the writer is not a full disk
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def raise_if_no_space(error, path):
    """For writes that append in place (metrics.jsonl): a full disk is a NoSpaceError; other errors are the caller's."""
    if out_of_space(error, Path(path).parent):
        raise NoSpaceError(path, error) from None


def write_text_atomic(path, text):
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_safetensors(tensors, path, metadata=None):
    """{key: tensor} -> a .safetensors file, atomically (contiguous CPU copies; metadata strings only)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})}))


# ----------------------------------------------------------------------------------------------------------------
# Reading, with one-line errors


MAX_JSON_DEPTH = 64            # arrays / objects nested deeper than this are refused (our files nest 1-5 levels)
MAX_JSON_BYTES = 64 << 20      # and JSON files larger than this (a CLIP vocab.json is 1.6 MB)
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def too_deep(text):
    """Whether arrays and objects nest deeper than MAX_JSON_DEPTH in JSON text (brackets in strings do not count)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:   # the common case: too few brackets to nest that deep
        return False
    depth = 0
    for c in re.sub(r"[^][{}]", "", JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return True
    return False


def json_loads(text):
    """json.loads that refuses nesting deeper than MAX_JSON_DEPTH with a ValueError, as it refuses any other text
    that is not JSON, instead of recursing into Python's RecursionError."""
    if too_deep(text):
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return json.loads(text)


def read_json(path):
    """A JSON file (a config, a vocabulary, an index); anything else is a one-line LoadError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise ValueError(f"{size / 2**20:.0f} MB, more than the {MAX_JSON_BYTES >> 20} MB a JSON file of "
                                 f"this kind may have")
            return json_loads(f.read())
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:  # also UnicodeDecodeError, json.JSONDecodeError
        raise LoadError(f"{path}: not a readable JSON file ({first_line(e)})") from None


def jsonl_lines(path, error=DataError):
    """(number, text) of each non-blank line of a JSONL file, reading one line at a time; a line longer than
    MAX_JSON_BYTES, or a file that is not UTF-8 text, is a one-line `error` naming the file (and line)."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(iter(lambda: f.readline(MAX_JSON_BYTES + 1), ""), 1):
                if len(line) > MAX_JSON_BYTES:
                    raise error(f"{path}:{n}: a line longer than {MAX_JSON_BYTES >> 20} MB; expected one JSON object "
                                f"per line")
                if line.strip():
                    yield n, line
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a readable UTF-8 text file ({first_line(e)})") from None


def read_safetensors(files, dtype=None, metadata=None):
    """Read safetensors file(s) into one {key: tensor} dict, casting each tensor as it is read (one copy in memory);
    `metadata`, a dict, receives the files' string metadata."""
    from safetensors import safe_open
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                if metadata is not None:
                    metadata.update(st.metadata() or {})
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
         "text_encoder_2": "model", "transformer": "diffusion_pytorch_model", "text_encoder_3": "model"}


def hub_pipeline(repo, variant=None, weights=True):
    """Download (or find in the HF cache; HF_HUB_OFFLINE is honored) only the files a pipeline needs: configs,
    tokenizers and, with `weights`, the networks' safetensors of one variant (plain or fp16)."""
    small = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*.json",
             "tokenizer*/*.txt"]
    if not weights:
        return hub_download(repo, small)
    names = list(STEMS)   # those model_index.json does not list match no file
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
