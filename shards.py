"""
The machinery under data.py (a tutorial reader can skip it): the files pairs are read from (Pick-a-Pic-schema
parquet shards, local or on the Hub fetched shard by shard as the stream reaches them; JSONL pair lists), the files
of labelled single images for KTO (JSONL, parquet), the parquet writer, the --cache store of VAE latents and text
embeddings, and the thread that prefetches batches.
"""
import atexit
import csv
import hashlib
import io
import os
import queue
import re
import threading
from pathlib import Path

import huggingface_hub as hh
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors import safe_open

from files import DataError, first_line, hub_download, json_loads, jsonl_lines, offline, save_safetensors, write_atomic
from tokenizer import MAX_PROMPT_CHARS

COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")
PICKAPIC = "yuvalkirstain/pickapic_v2"
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
ALTERNATIVES = (" Use a local copy (--data /path/to/parquet_dir), a mirror in the same schema (--data hub:OWNER/NAME), "
                "or your own pairs (--data pairs.jsonl with prompt/chosen/rejected); "
                "yuvalkirstain/pickapic_v2_no_images still has captions, labels and URLs, but no images.")


# ----------------------------------------------------------------------------------------------------------------
# Shards: a local parquet file, a Hub parquet file (downloaded when first needed), or a JSONL file. Each has
# groups() (per row group, the indices of its usable rows), load(group) (that group's data, held by PairSource)
# and pair(loaded, row) -> (prompt, preferred image, rejected image) as bytes or paths.


def arrow_kind(t):
    """What an arrow column type holds, in the words of the error messages."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t) and "bytes" in [f.name for f in t]:
        return "image bytes"                                            # a `datasets` Image struct: {bytes, path}
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    return "numbers" if pa.types.is_integer(t) or pa.types.is_floating(t) else str(t)


def caption_lengths(column):
    """The characters of each caption of an arrow column (0 for a missing one), without making Python strings."""
    if pa.types.is_null(column.type):
        return np.zeros(len(column), dtype=np.int64)
    return pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)


class ParquetShard:
    unpaired = False                                                      # rows are pairs, not labelled images

    def __init__(self, name, path=None, fetch=None):  # a Hub shard: `fetch()` downloads it, giving its path
        self.name, self.fetch, self.path, self._groups = name, fetch, path or (None if fetch else name), None
        self.counts = dict(ties=0, bad_labels=0, empty_captions=0, long_captions=0)  # once groups() has read it

    def file(self):
        if self.path is None:
            self.path = self.fetch()
        try:
            return pq.ParquetFile(self.path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{self.name}: not a readable parquet file ({first_line(e)})") from None

    def check(self, f=None):
        """The Pick-a-Pic columns, with image bytes (or `datasets` Image structs), text and numbers in them."""
        schema = (f or self.file()).schema_arrow
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"{self.name}: missing column(s) {', '.join(missing)}; expected the Pick-a-Pic v2 "
                            f"schema ({', '.join(COLUMNS)})")
        for c in COLUMNS:
            want = "image bytes" if c.startswith("jpg") else "text" if c == "caption" else "numbers"
            t = schema.field(c).type
            if arrow_kind(t) != want and not (c == "caption" and pa.types.is_null(t)):  # an all-empty caption column
                raise DataError(f"{self.name}: column {c} holds {t}; expected {want}" +
                                (" (file paths are not read from parquet)" if c.startswith("jpg") else ""))

    def groups(self):
        """Per row group, the indices of its usable rows, reading only the labels and captions: label_0 1 (jpg_0
        preferred) or 0 (jpg_1), and label_1 = 1 - label_0. A tie (0.5 / 0.5) is dropped and counted, as is any other
        label (missing, NaN, out of range, the two not summing to 1); empty captions are counted (they train as the
        empty prompt), as are captions longer than MAX_PROMPT_CHARS (cut to it)."""
        if self._groups is None:
            f = self.file()
            self.check(f)
            groups = []
            for g in range(f.num_row_groups):
                t = f.read_row_group(g, columns=["label_0", "label_1", "caption"], use_threads=False)
                l0, l1 = (t.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in ("label_0", "label_1"))
                ok = ((l0 == 0) | (l0 == 1)) & (l1 == 1 - l0)
                tie = (l0 == 0.5) & (l1 == 0.5)
                chars = caption_lengths(t.column("caption"))   # the lengths only: a caption may be megabytes
                self.counts["ties"] += int(tie.sum())
                self.counts["bad_labels"] += int((~ok & ~tie).sum())
                self.counts["empty_captions"] += int((ok & (chars == 0)).sum())
                self.counts["long_captions"] += int((ok & (chars > MAX_PROMPT_CHARS)).sum())
                groups.append(np.flatnonzero(ok))
            self._groups = groups
        return self._groups

    def key(self, group, row):
        """The pair's name in the --cache: shard, size and modification time (a rewritten file is a new one), place."""
        st = os.stat(self.path)
        return f"{self.name}@{st.st_size}-{st.st_mtime_ns}:{group}:{row}"

    def load(self, group):
        """The row group's columns, captions cut to MAX_PROMPT_CHARS."""
        t = self.file().read_row_group(group, columns=["caption", "label_0", "jpg_0", "jpg_1"], use_threads=False)
        if pa.types.is_null(t.schema.field("caption").type):
            return t
        return t.set_column(0, "caption", pc.utf8_slice_codeunits(t.column("caption"), 0, MAX_PROMPT_CHARS))

    def pair(self, table, i):
        caption, label_0, a, b = (table.column(c)[i].as_py() for c in ("caption", "label_0", "jpg_0", "jpg_1"))
        a, b = (x.get("bytes") if isinstance(x, dict) else x for x in (a, b))  # a `datasets` Image struct
        return caption or "", *((a, b) if label_0 == 1 else (b, a))


class JsonlShard:
    unpaired = False

    def __init__(self, path):
        self.name = self.path = str(path)
        self.rows, long = [], 0
        for n, line in jsonl_lines(path):
            try:
                r = json_loads(line)
                if not isinstance(r["prompt"] or "", str):
                    raise TypeError(f"prompt is {type(r['prompt']).__name__}")
                long += len(r["prompt"] or "") > MAX_PROMPT_CHARS
                self.rows.append(((r["prompt"] or "")[:MAX_PROMPT_CHARS],
                                  *(str(Path(path).parent / r[k]) for k in ("chosen", "rejected"))))
            except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or nested too deep
                raise DataError(f"{path}:{n}: expected a JSON object with keys prompt, chosen, rejected "
                                f"({type(e).__name__}: {first_line(e)[:200]})") from None
        self.counts = dict(ties=0, bad_labels=0, empty_captions=sum(not r[0] for r in self.rows), long_captions=long)

    def groups(self):
        return [np.arange(len(self.rows))]

    def key(self, group, row):
        stats = [os.stat(p) for p in self.rows[row][1:]] if all(map(os.path.isfile, self.rows[row][1:])) else []
        return f"{self.name}:{row}:" + ",".join(f"{st.st_size}-{st.st_mtime_ns}" for st in stats)

    def load(self, group):
        return self.rows

    def pair(self, rows, i):
        for p in rows[i][1:]:
            if not os.path.isfile(p):  # also refuses FIFOs and devices, which would block the run
                raise DataError(f"{self.name}: image file {p} not found (or not a regular file)")
        return rows[i]


# ----------------------------------------------------------------------------------------------------------------
# Labelled single images (thumbs up / down), for --loss kto: each row a prompt, one image and a label, 1 (desirable)
# or 0 (undesirable); true / false are read as 1 / 0. A row with any other label is dropped and counted (bad_labels).
#   images.jsonl   {"prompt": ..., "image": path (relative to the file's folder), "label": 1} per line
#   parquet        columns image (bytes, or a `datasets` Image struct), caption (text), label (numbers or bool)
# A stream item is then one image: PairSource serves batch["images"] (B, 3, R, R) and batch["labels"] (B,).

IMAGE_COLUMNS = ("image", "caption", "label")


def read_label(v):
    """1.0 / 0.0 for a valid label (1, 0, true, false), else None (the row is dropped and counted)."""
    return float(v) if isinstance(v, (bool, int, float)) and v in (0, 1) else None


class ImageJsonlShard(JsonlShard):
    unpaired = True

    def __init__(self, path, lines):
        self.name = self.path = str(path)
        self.rows, self.labels = [], []
        for n, line in lines:
            try:
                r = json_loads(line)
                if not isinstance(r["prompt"] or "", str):
                    raise TypeError(f"prompt is {type(r['prompt']).__name__}")
                row, label = (r["prompt"] or "", str(Path(path).parent / r["image"])), read_label(r["label"])
            except (ValueError, KeyError, TypeError) as e:  # not JSON (or nested too deep), keys, types
                raise DataError(f"{path}:{n}: expected a JSON object with keys prompt, image, label "
                                f"({type(e).__name__}: {e})") from None
            if label is not None:
                self.rows.append(row)
                self.labels.append(label)
        bad = len(lines) - len(self.rows)
        self.counts = dict(ties=0, bad_labels=bad, empty_captions=sum(not r[0] for r in self.rows))

    def label(self, group, row):
        return self.labels[row]


class ImageParquetShard(ParquetShard):
    unpaired = True

    def check(self, f=None):
        schema = (f or self.file()).schema_arrow
        missing = [c for c in IMAGE_COLUMNS if c not in schema.names]
        if missing:
            raise DataError(f"{self.name}: missing column(s) {', '.join(missing)}; expected labelled images "
                            f"({', '.join(IMAGE_COLUMNS)})")
        for c, want in zip(IMAGE_COLUMNS, ("image bytes", "text", "numbers")):
            t = schema.field(c).type
            if arrow_kind(t) != want and not (c == "label" and pa.types.is_boolean(t)):
                raise DataError(f"{self.name}: column {c} holds {t}; expected {want}")

    def groups(self):
        """Per row group, the rows with a valid label (1 / 0 / true / false); the others are counted (bad_labels)."""
        if self._groups is None:
            f = self.file()
            self.check(f)
            self._groups, self.labels = [], []
            for g in range(f.num_row_groups):
                t = f.read_row_group(g, columns=["label", "caption"])
                labels = [read_label(v) for v in t.column("label").to_pylist()]
                ok = np.array([v is not None for v in labels], dtype=bool)
                self.counts["bad_labels"] += int((~ok).sum())
                self.counts["empty_captions"] += sum(not c for c, o in zip(t.column("caption").to_pylist(), ok) if o)
                self._groups.append(np.flatnonzero(ok))
                self.labels.append(labels)
        return self._groups

    def label(self, group, row):
        return self.labels[group][row]

    def load(self, group):
        return self.file().read_row_group(group, columns=["caption", "image"])

    def pair(self, table, i):
        caption, image = (table.column(c)[i].as_py() for c in ("caption", "image"))
        return caption or "", image.get("bytes") if isinstance(image, dict) else image


def labelled_images(batch):
    """A batch of B pairs as KTO's 2B labelled images (as the Diffusion-KTO paper trains on Pick-a-Pic): the
    preferred images desirable (1), the rejected ones undesirable (0); image 2i + 0 / 1 of pair i draws its noise."""
    B = len(batch["index"])
    out = dict(images=torch.cat([batch["chosen"], batch["rejected"]]), prompts=list(batch["prompts"]) * 2,
               labels=torch.cat([torch.ones(B), torch.zeros(B)]),
               index=torch.cat([2 * batch["index"], 2 * batch["index"] + 1]), position=batch["position"])
    if "chosen_std" in batch:                                             # --cache: posteriors and text embeddings
        out.update(images_std=torch.cat([batch["chosen_std"], batch["rejected_std"]]))
        out.update({k: torch.cat([batch[k]] * 2) for k in ("context", "pooled") if k in batch})
    return out


def jsonl_shard(path):
    """A .jsonl file as pairs (keys prompt, chosen, rejected) or labelled images (prompt, image, label), by the keys
    of its first record."""
    lines = list(jsonl_lines(path))
    try:
        first = json_loads(lines[0][1]) if lines else {}
    except ValueError:
        first = {}
    return ImageJsonlShard(path, lines) if isinstance(first, dict) and "image" in first else JsonlShard(path)


def parquet_shard(path):
    """A local parquet file as pairs (the Pick-a-Pic schema) or labelled images (image, caption, label), by its
    columns; an unreadable file is a ParquetShard, whose check names the problem."""
    try:
        names = pq.read_schema(path).names
    except (OSError, ValueError):
        return ParquetShard(path)
    return ImageParquetShard(path) if "image" in names and "jpg_0" not in names else ParquetShard(path)


def _split_of(path):
    """'train' for data/train-00000-of-00645-<hash>.parquet or train/x.parquet; None for other names."""
    m = re.match(r"([A-Za-z_]+)-\d+-of-\d+", Path(path).name)
    return m[1] if m else next((p for p in reversed(Path(path).parts[:-1]) if p in SPLITS), None)


def select_split(files, split, where):
    """The files of `split`; all files if none is named after a split (so a folder of any shards works)."""
    found = {_split_of(f) for f in files} - {None}
    if split in found:
        return [f for f in files if _split_of(f) == split]
    if found & set(SPLITS):
        raise DataError(f"{where}: no parquet shards of split {split!r} (found {', '.join(sorted(found))})")
    return files


def hub_shards(repo, split, bare=False):
    """The parquet shards of a Hub dataset, each downloaded (into the HF cache) only when the stream reaches it.
    Offline, or when the Hub cannot list the repo, a complete copy in the local HF cache is used instead."""
    try:
        files = hh.HfApi().list_repo_files(repo, repo_type="dataset")
    except Exception as e:  # not found, offline, or no network (httpx errors, which are not OSErrors)
        cached = _cached_shards(repo, split)
        if cached:
            return cached
        if isinstance(e, RepositoryNotFoundError):
            why = "was not found on the Hugging Face Hub (or is private or gated: `hf auth login`)"
        elif offline():
            why = "is not (completely) in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        else:
            why = f"could not be listed ({first_line(e)}) and is not (completely) in the local Hugging Face cache"
        msg = f"dataset {repo!r} {why}."
        if bare:
            msg = f"--data {repo}: no such local file or folder, and the Hub {msg}"
        if repo == PICKAPIC:
            msg += f" The official Pick-a-Pic v2 ({PICKAPIC}) was taken off the Hub in 2025."
        raise DataError(msg + ALTERNATIVES) from None

    def fetch(f):
        return lambda: hub_download(repo, filename=f, repo_type="dataset", error=DataError)
    files = select_split(sorted(f for f in files if f.endswith(".parquet")), split, f"dataset {repo!r}")
    if not files:
        raise DataError(f"dataset {repo!r} has no parquet files")
    return [ParquetShard(f"{repo}/{f}", fetch=fetch(f)) for f in files]


def _cached_shards(repo, split):
    """The split's shards from the HF cache's snapshot of `repo`, if all are there (by their -of-N numbering)."""
    try:
        folder = hub_download(repo, [f"*{split}-*.parquet", f"*{split}/*.parquet"], repo_type="dataset",
                              local_only=True, error=DataError)
        files = select_split(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")), split, repo)
    except DataError:
        return None
    have = [re.search(r"-(\d+)-of-(\d+)", Path(f).name) for f in files]
    if not files or any(m and len(files) != int(m[2]) for m in have):
        return None
    return [ParquetShard(f"{repo}/{f}", path=str(folder / f)) for f in files]


def find_shards(spec, split="train"):
    if spec == "pickapic":
        return hub_shards(PICKAPIC, split)
    if spec.startswith("hub:"):
        return hub_shards(spec[4:], split)
    p = Path(spec).expanduser()
    if p.is_file():
        return [jsonl_shard(p)] if p.suffix == ".jsonl" else [parquet_shard(str(p))]
    if p.is_dir():
        for name in ("pairs.jsonl", "images.jsonl"):
            if (p / name).is_file():
                return [jsonl_shard(p / name)]
        files = select_split(sorted(f.relative_to(p).as_posix() for f in p.rglob("*.parquet")), split, str(p))
        if not files:
            raise DataError(f"{p}: no *.parquet files and no pairs.jsonl or images.jsonl in this folder")
        return [parquet_shard(str(p / f)) for f in files]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and p.suffix not in (".parquet", ".jsonl"):
        return hub_shards(spec, split, bare=True)
    raise DataError(f"--data {spec}: no such file or folder (expected pickapic, hub:OWNER/NAME, parquet shards "
                    f"or a pairs.jsonl)")


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(path, captions, images_0, images_1, label_0):
    """Pairs to one parquet file in the Pick-a-Pic v2 schema (images as PNG/JPEG bytes; label_0 1, 0, or 0.5 for a
    tie, which the reader skips), written atomically."""
    table = pa.table(dict(caption=list(captions), jpg_0=list(images_0), jpg_1=list(images_1),
                          label_0=[float(v) for v in label_0], label_1=[1.0 - float(v) for v in label_0]))
    return write_atomic(path, lambda tmp: pq.write_table(table, str(tmp), row_group_size=256))


# ----------------------------------------------------------------------------------------------------------------
# Prompt files (eval.py's prompt sets), each benchmark's in its own format

PROMPT_COLUMNS = ("Prompt", "Prompts", "prompt", "prompts", "caption", "text")
PROMPT_FILES = (".txt", ".tsv", ".csv", ".json", ".parquet")


def _column(path, names):
    col = next((c for c in PROMPT_COLUMNS if c in names), None)
    if col is None:
        raise DataError(f"{path}: expected a header with a prompt column ({', '.join(PROMPT_COLUMNS)}); "
                        f"found: {', '.join(map(str, names)) or 'nothing'}")
    return col


def read_prompts(path):
    """One prompt file in its own format:
      .txt      one prompt per line, blank lines skipped
      .tsv      PartiPrompts: a header, tab-separated fields, no quoting convention (prompt #1560 starts with a literal
                "), so the raw lines are split on tabs
      .csv      DrawBench (a Google Sheets export, every field quoted): standard CSV quoting
      .json     the HPSv2 benchmark: a list of strings
      .parquet  Hub datasets
    tsv, csv and parquet files: the first column named Prompt, Prompts, prompt, prompts, caption or text."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # missing, unreadable, not UTF-8, not parquet
        raise DataError(f"{path}: not a readable {path.suffix} prompt file ({first_line(e)})") from None
    if path.suffix == ".parquet":
        return table.column(_column(path, table.column_names)).to_pylist()
    if path.suffix == ".json":
        try:
            data = json_loads(text)
        except ValueError as e:  # not JSON, or nested too deep
            data = e
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            why = f" ({first_line(data)})" if isinstance(data, ValueError) else ""
            raise DataError(f"{path}: expected a JSON list of prompt strings (the HPSv2 benchmark format){why}")
        return data
    if path.suffix == ".csv":
        rows = csv.DictReader(io.StringIO(text))
        col = _column(path, rows.fieldnames or [])
        return [row[col] for row in rows]
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if path.suffix == ".txt":
        return [line.strip() for line in lines]
    header = lines[0].split("\t") if lines else []
    k = header.index(_column(path, header))
    rows = [line.split("\t") for line in lines[1:]]
    short = next((i for i, r in enumerate(rows) if len(r) <= k), None)
    if short is not None:
        raise DataError(f"{path}: data line {short + 1} has {len(rows[short])} tab-separated fields, "
                        f"expected at least {k + 1}")
    return [r[k] for r in rows]



# ----------------------------------------------------------------------------------------------------------------
# --cache: VAE latents and text embeddings computed once, kept on disk, reused across epochs and runs


def scaled_posterior(vae, images):
    """The VAE posterior's mean and std in the space the denoiser sees: ((mean - shift_factor) * scaling_factor,
    std * scaling_factor), in fp32 (SD3's VAE shifts; SD1.5's and SDXL's shift is 0)."""
    mean, std = vae.posterior(images)
    return (mean.float() - vae.cfg.shift_factor) * vae.scaling_factor, std.float() * vae.scaling_factor


def latent_cache(sd, key, cache_dir=""):
    """The --cache store of the pipeline `sd`, whose frozen VAE and text encoders fill it (per image the posterior's
    mean and std, scaled), in cache_dir (default ~/.cache/diffdpo), in a folder named by a hash of `key`: all that
    the values depend on besides the pairs (the model, data, resolution, VAE precision, ...)."""
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_images(xs):
        return scaled_posterior(sd.vae, torch.stack(xs).to(sd.device, sd.vae.dtype))

    @torch.no_grad()
    def encode_text(prompt):
        context, pooled = sd.encode_prompt([prompt])
        return dict(context=context[0].float(), **({} if pooled is None else dict(pooled=pooled[0].float())))
    return LatentCache(Path(cache_dir or Path.home() / ".cache" / "diffdpo") / name, encode_images, encode_text)


class LatentCache:
    """Per pair: the VAE posterior of both images (mean and std, scaled), unflipped and flipped (so flips stay exact:
    the VAE is not flip-equivariant), in one safetensors file; a pair that was skipped gets a marker file naming why.
    Per prompt: its text embeddings. `encode_images(list of (3,R,R)) -> (mean, std)` each (N, 4, R/8, R/8) and
    `encode_text(prompt) -> dict` are the trainer's frozen VAE and text encoders. Random crops are not cached (they
    change every epoch). Keys name the shard's size and modification time, so a rewritten file is never served."""

    def __init__(self, folder, encode_images, encode_text):
        self.folder, self.encode_images, self.encode_text = Path(folder), encode_images, encode_text

    def _path(self, kind, key):
        h = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / kind / h[:2] / f"{h}.safetensors"

    @staticmethod
    def _load(path):
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}

    def pair(self, key, read):
        """(caption, {chosen, chosen_flip, rejected, rejected_flip} posterior means, the same names + "_std" for the
        stds [+ chosen_emb, rejected_emb]), or the reason the pair is skipped ("corrupt", "too_large", "ties").
        `read()` gives (caption, [chosen, rejected] pixels, embeddings or None) or such a reason."""
        path = self._path("pairs", key)
        skipped = path.with_suffix(".skipped")
        if skipped.exists():
            return skipped.read_text() or "corrupt"
        if not path.is_file():
            got = read()
            if isinstance(got, str):
                write_atomic(skipped, lambda tmp: tmp.write_text(got))
                return got
            caption, (w, l), emb = got
            mean, std = self.encode_images([w, w.flip(-1), l, l.flip(-1)])
            names = ["chosen", "chosen_flip", "rejected", "rejected_flip"]
            tensors = {**dict(zip(names, mean)), **{n + "_std": s for n, s in zip(names, std)}}
            if emb is not None:
                tensors.update(chosen_emb=emb[0], rejected_emb=emb[1])
            save_safetensors(tensors, path, dict(caption=caption))
        meta, latents = self._load(path)
        return meta["caption"], latents

    def text(self, prompt):
        path = self._path("text", prompt)
        if not path.is_file():
            save_safetensors(self.encode_text(prompt), path)
        return self._load(path)[1]


# ----------------------------------------------------------------------------------------------------------------
# Prefetching: the next batches are decoded in a thread while the GPU trains


def prefetch(batches, depth=2, pin=False):
    """Yield the batches of the iterator `batches`, in order, while a background thread makes the next `depth`: JPEG
    decoding and resizing (which release the GIL) overlap the training step on the GPU instead of stalling it. The
    batches are the same as without it (all randomness is per pair); an error in the data is raised here, at the
    batch where it happened. Closing the generator, or the program's exit, stops the thread and waits for it (a
    thread still inside torch when the interpreter exits aborts the process). pin: the batches' tensors in page-locked
    memory (copied in the thread), so the step's copies to the GPU run asynchronously (non_blocking=True)."""
    ready, stop = queue.Queue(maxsize=depth), threading.Event()

    def hand(item):  # -> False once the consumer has gone
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for batch in batches:
                if pin:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if not hand((batch, None)):
                    return
        except BaseException as e:  # noqa: BLE001 (raised in the consumer)
            hand((None, e))

    def finish():
        stop.set()
        worker.join()
    worker = threading.Thread(target=work, daemon=True, name="prefetch")
    worker.start()
    atexit.register(finish)  # also when an exception ends the program with the generator still open
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            yield batch
    finally:
        finish()
        atexit.unregister(finish)
