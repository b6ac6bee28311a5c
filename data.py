"""
Preference pairs for Diffusion-DPO: (prompt, preferred image, rejected image).

    open_pairs(spec, resolution=512)  ->  PairSource;  source.batches(B, rank=r, world_size=W, start=pos)

spec is one of
    pickapic                   the Pick-a-Pic v2 dataset on the Hub (yuvalkirstain/pickapic_v2; taken down in 2025)
    hub:OWNER/NAME, OWNER/NAME a Hub dataset of parquet shards in the Pick-a-Pic v2 schema, fetched shard by shard
    FILE.parquet, FOLDER/      local parquet shards in that schema: jpg_0, jpg_1 (JPEG bytes), label_0, label_1, caption
    pairs.jsonl, FOLDER/       our own format: {"prompt": ..., "chosen": image path, "rejected": image path} per line
and, built by the trainer with the base model before training (diffdpo.build_*_pairs), then read as parquet:
    shapes                     the toy world's on-policy pairs, labelled by `judge` (the end of this file)
    style:FOLDER               style images (with captions) preferred over the base model's generations
Shards named like Pick-a-Pic's (data/train-00000-of-00645-<hash>.parquet) are filtered by `split`.

The stream. All pairs are read as one endless, deterministic sequence: epoch e visits the shards in an order
seeded by (seed, e), the row groups of each shard in a seeded order, and the rows of each row group in a seeded
order (a full shuffle within a row group; across shards a two-level shuffle, which keeps reads sequential and
memory bounded: one row group's bytes are held at a time). Stream item s is everything about one training
example: its pair, and its augmentation (flips, caption dropout, random crop) drawn from a generator seeded by
(seed, s). Global micro-batch k is items [start + k B W, start + (k+1) B W); rank r takes B consecutive items of
it. So one process with batch B W sees exactly what W processes with batch B see, and a run resumes exactly from
a stream position (only the label columns of the shards before it are read; a Hub dataset's shards before it
must be downloaded, or still be in the HF cache, for that). A pair whose image cannot be
decoded is skipped and counted, and the next row of its row group in stream order takes its place (wrapping
around): an item stays a pure function of s, so positions never shift between ranks and nothing waits on others.
The sizes of Hub shards are learnt when they are downloaded: len() of a Hub source is an error until then.
"""
import functools
import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")
PICKAPIC = "yuvalkirstain/pickapic_v2"
SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
ALTERNATIVES = (" Use a local copy (--data /path/to/parquet_dir), a mirror in the same schema (--data hub:OWNER/NAME), "
                "or your own pairs (--data pairs.jsonl with prompt/chosen/rejected); "
                "yuvalkirstain/pickapic_v2_no_images still has captions, labels and URLs, but no images.")


class DataError(ValueError):
    """A user-facing, one-line problem with the data: names the file / column / key and what was expected."""


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing, as the official code (torchvision on PIL images): Resize(R, bilinear), CenterCrop(R) or
# RandomCrop(R), RandomHorizontalFlip per image, ToTensor, Normalize(0.5, 0.5)


def preprocess(img, resolution, gen=None, random_crop=False):
    """PIL image -> (3, R, R) float tensor in [-1, 1], with torchvision's arithmetic: the shortest side resized to
    R (the other to int(R * long / short)) with PIL's antialiased bilinear filter, then a center crop at
    round((size - R) / 2), or a random one drawn from `gen` (top, then left). Flips are the caller's."""
    img, R = img.convert("RGB"), resolution
    w, h = img.size
    size = (R, int(R * h / w)) if w <= h else (int(R * w / h), R)
    if size != (w, h):
        img = img.resize(size, Image.BILINEAR)
    w, h = size
    if random_crop:
        top = int(torch.randint(0, h - R + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - R + 1, (1,), generator=gen))
    else:
        top, left = int(round((h - R) / 2.0)), int(round((w - R) / 2.0))
    x = torch.from_numpy(np.array(img.crop((left, top, left + R, top + R)))).permute(2, 0, 1)
    return x.float().div(255).sub(0.5).div(0.5)


def load_images(sources, resolution, gen=None, random_crop=False):
    """Image bytes or paths -> list of (3, R, R) tensors; None if any cannot be decoded (a corrupt pair)."""
    try:
        imgs = []
        for x in sources:
            if x is None:
                raise ValueError("no image")
            img = Image.open(io.BytesIO(x) if isinstance(x, (bytes, bytearray)) else x)
            img.load()
            imgs.append(img)
        return [preprocess(img, resolution, gen, random_crop) for img in imgs]
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Shards: a local parquet file, a Hub parquet file (downloaded when first needed), or a JSONL file. Each has
# groups() (per row group, the indices of its usable rows), load(group) (that group's data, held by PairSource)
# and pair(loaded, row) -> (prompt, preferred image, rejected image) as bytes or paths.


class ParquetShard:
    def __init__(self, name, path=None, fetch=None):  # a Hub shard: `fetch()` downloads it, giving its path
        self.name, self.fetch, self.path, self._groups = name, fetch, path or (None if fetch else name), None

    def file(self):
        import pyarrow.parquet as pq
        if self.path is None:
            self.path = self.fetch()
        try:
            return pq.ParquetFile(self.path)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{self.name}: not a readable parquet file ({_first_line(e)})") from None

    def check(self, f=None):
        names = (f or self.file()).schema_arrow.names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(f"{self.name}: missing column(s) {', '.join(missing)}; expected the Pick-a-Pic v2 "
                            f"schema ({', '.join(COLUMNS)})")

    def groups(self):
        """Reads only label_0: a row is used if label_0 is 1 (jpg_0 preferred) or 0 (jpg_1); 0.5 is a tie."""
        if self._groups is None:
            f = self.file()
            self.check(f)
            self._groups = []
            for g in range(f.num_row_groups):
                lab = f.read_row_group(g, columns=["label_0"]).column(0).to_numpy()
                self._groups.append(np.flatnonzero((lab == 0) | (lab == 1)))
        return self._groups

    def load(self, group):
        return self.file().read_row_group(group, columns=["caption", "label_0", "jpg_0", "jpg_1"])

    def pair(self, table, i):
        caption, label_0, a, b = (table.column(c)[i].as_py() for c in ("caption", "label_0", "jpg_0", "jpg_1"))
        a, b = (x.get("bytes") if isinstance(x, dict) else x for x in (a, b))  # a `datasets` Image struct
        return caption or "", *((a, b) if label_0 == 1 else (b, a))


class JsonlShard:
    def __init__(self, path):
        self.name = self.path = str(path)
        self.rows = []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                self.rows.append((r["prompt"] or "", *(str(Path(path).parent / r[k]) for k in ("chosen", "rejected"))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with keys prompt, chosen, rejected "
                                f"({type(e).__name__}: {e})") from None

    def groups(self):
        return [np.arange(len(self.rows))]

    def load(self, group):
        return self.rows

    def pair(self, rows, i):
        for p in rows[i][1:]:
            if not os.path.isfile(p):
                raise DataError(f"{self.name}: image file {p} not found")
        return rows[i]


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


def _offline():
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_shards(repo, split, bare=False):
    """The parquet shards of a Hub dataset, each downloaded (into the HF cache) only when the stream reaches it.
    Offline, or when the Hub cannot list the repo, a complete copy in the local HF cache is used instead."""
    import huggingface_hub as hh
    from huggingface_hub.errors import RepositoryNotFoundError
    try:
        files = hh.HfApi().list_repo_files(repo, repo_type="dataset")
    except Exception as e:  # not found, offline, or no network (httpx errors, which are not OSErrors)
        cached = _cached_shards(repo, split)
        if cached:
            return cached
        if isinstance(e, RepositoryNotFoundError):
            why = "was not found on the Hugging Face Hub (or is private or gated: `hf auth login`)"
        elif _offline():
            why = "is not (completely) in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        else:
            why = f"could not be listed ({_first_line(e)}) and is not (completely) in the local Hugging Face cache"
        msg = f"dataset {repo!r} {why}."
        if bare:
            msg = f"--data {repo}: no such local file or folder, and the Hub {msg}"
        if repo == PICKAPIC:
            msg += f" The official Pick-a-Pic v2 ({PICKAPIC}) was taken off the Hub in 2025."
        raise DataError(msg + ALTERNATIVES) from None

    def fetch(f):
        def get():
            try:
                return hh.hf_hub_download(repo, f, repo_type="dataset")
            except Exception as e:
                raise DataError(f"{repo}/{f}: could not be downloaded, nor found in the local Hugging Face cache "
                                f"({_first_line(e)})") from None
        return get
    files = select_split(sorted(f for f in files if f.endswith(".parquet")), split, f"dataset {repo!r}")
    if not files:
        raise DataError(f"dataset {repo!r} has no parquet files")
    return [ParquetShard(f"{repo}/{f}", fetch=fetch(f)) for f in files]


def _cached_shards(repo, split):
    """The split's shards from the HF cache's snapshot of `repo`, if all are there (by their -of-N numbering)."""
    import huggingface_hub as hh
    try:
        folder = Path(hh.snapshot_download(repo, repo_type="dataset", local_files_only=True,
                                           allow_patterns=[f"*{split}-*.parquet", f"*{split}/*.parquet"]))
        files = select_split(sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")), split, repo)
    except (OSError, ValueError):
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
        return [JsonlShard(p)] if p.suffix == ".jsonl" else [ParquetShard(str(p))]
    if p.is_dir():
        if (p / "pairs.jsonl").is_file():
            return [JsonlShard(p / "pairs.jsonl")]
        files = select_split(sorted(f.relative_to(p).as_posix() for f in p.rglob("*.parquet")), split, str(p))
        if not files:
            raise DataError(f"{p}: no *.parquet files and no pairs.jsonl in this folder")
        return [ParquetShard(str(p / f)) for f in files]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and p.suffix not in (".parquet", ".jsonl"):
        return hub_shards(spec, split, bare=True)
    raise DataError(f"--data {spec}: no such file or folder (expected pickapic, hub:OWNER/NAME, parquet shards "
                    f"or a pairs.jsonl)")


# ----------------------------------------------------------------------------------------------------------------
# The stream


def _seed(*key):
    """A 62-bit seed from a tuple of ints, the same in every process (Python's hash() of str is not)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 2


@functools.lru_cache(maxsize=256)
def _perm(n, *key):
    """A seeded permutation of range(n), a pure function of key (read-only: it is shared)."""
    p = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(*key))).numpy()
    p.flags.writeable = False
    return p


class PairSource:
    def __init__(self, shards, resolution, random_crop=False, flip=True, caption_dropout=0.0, seed=0, cache=None,
                 name="pairs", relabel=None, embed=None):
        self.shards, self.resolution, self.seed, self.cache, self.name = shards, resolution, seed, cache, name
        self.relabel = relabel        # (caption, [a, b]) -> [preferred, rejected] or None (a tie): AI feedback
        self.embed = embed            # [preferred, rejected] -> (2, D) image embeddings (rpo.py --rpo-embed image)
        self.random_crop, self.flip, self.caption_dropout = random_crop, flip, caption_dropout
        self.num_corrupt = 0          # pairs skipped: an image could not be decoded (or `relabel` tied them)
        self.num_empty_captions = 0   # items whose caption was empty or missing (before caption dropout)
        self._sizes = {}              # shard index -> number of usable pairs, once that shard was opened
        self._epoch_len = None
        self._loaded = (None, None)   # ((shard, row group), its data): one row group in memory at a time

    def __len__(self):
        """The number of usable pairs (ties dropped); reads the label columns of every shard."""
        if any(s.path is None for s in self.shards):
            got = sum(s.path is not None for s in self.shards)
            raise DataError(f"{self.name}: the number of pairs is known once all "
                            f"{len(self.shards)} shards are downloaded ({got} so far)")
        return sum(self._size(k) for k in range(len(self.shards)))

    def _size(self, k):
        if k not in self._sizes:
            self._sizes[k] = sum(len(g) for g in self.shards[k].groups())
        return self._sizes[k]

    def locate(self, s):
        """Stream position s -> (epoch, shard index, row group, index in that group's stream order)."""
        e = 0
        if self._epoch_len:
            e, s = divmod(s, self._epoch_len)
        while True:  # walk the shards of epoch e in their order; a shard's size is learnt when it is first reached
            for k in _perm(len(self.shards), self.seed, e).tolist():
                if s >= self._size(k):
                    s -= self._size(k)
                    continue
                groups = self.shards[k].groups()
                for g in _perm(len(groups), self.seed, e, k).tolist():
                    if s < len(groups[g]):
                        return e, k, g, s
                    s -= len(groups[g])
            self._epoch_len = sum(self._sizes.values())
            if self._epoch_len == 0:
                raise DataError(f"{self.name}: no usable pairs (every pair is a tie, or the data is empty)")
            e += 1

    def item(self, s):
        """Stream item s -> dict(prompt, caption, key, flips, chosen (3,R,R), rejected (3,R,R)) -- or, with a latent
        cache, chosen/rejected latents and the prompt's text embeddings. A corrupt pair is replaced (see the top)."""
        e, k, g, j = self.locate(s)
        shard, rows = self.shards[k], self.shards[k].groups()[g]
        order = _perm(len(rows), self.seed, e, k, g)
        gen = torch.Generator().manual_seed(_seed(self.seed, s))
        flips = [bool(torch.rand((), generator=gen) < 0.5) and self.flip for _ in range(2)]  # per image
        drop = bool(torch.rand((), generator=gen) < self.caption_dropout)
        for attempt in range(len(rows)):
            row = int(rows[order[(j + attempt) % len(rows)]])
            key = f"{shard.name}:{g}:{row}"
            if self.cache is not None:  # latents of both images, flipped and not, or None if the pair is corrupt
                got = self.cache.pair(key, lambda: self._read(k, g, row, gen))
                if got is not None:
                    caption, x = got
                    emb = [x[n] for n in ("chosen_emb", "rejected_emb") if n in x] or None
                    x = [x[f"{n}_flip" if f else n] for n, f in zip(("chosen", "rejected"), flips)]
                    break
            else:
                got = self._read(k, g, row, gen)
                if got is not None:
                    caption, x, emb = got
                    x = [xi.flip(-1) if f else xi for xi, f in zip(x, flips)]
                    break
            self.num_corrupt += 1
        else:
            raise DataError(f"{shard.name}: no decodable image pair in row group {g}")
        self.num_empty_captions += caption == ""
        prompt = "" if drop else caption
        out = dict(prompt=prompt, caption=caption, key=key, flips=flips, chosen=x[0], rejected=x[1])
        if emb is not None:  # of the unflipped images
            out.update(chosen_emb=emb[0], rejected_emb=emb[1])
        if self.cache is not None:
            out.update(self.cache.text(prompt))
        return out

    def _read(self, k, g, row, gen):
        """(caption, [chosen, rejected] preprocessed, unflipped, their embeddings or None), or None if an image
        cannot be decoded."""
        if self._loaded[0] != (k, g):
            self._loaded = (None, None)  # free the previous group first
            self._loaded = ((k, g), self.shards[k].load(g))
        caption, a, b = self.shards[k].pair(self._loaded[1], row)
        x = load_images((a, b), self.resolution, gen, self.random_crop)
        if x is not None and self.relabel is not None:
            x = self.relabel(caption, x)
        return None if x is None else (caption, x, self.embed(x) if self.embed else None)

    def batches(self, batch_size, *, rank=0, world_size=1, start=0):
        """Endless batches for this rank: {"prompts", "chosen" (B,3,R,R) [latents with a cache], "rejected",
        "index" (B,) stream positions of the items, "keys" (the pairs' shard:group:row), "position" (where the
        next global micro-batch starts: pass it as start= to resume), "corrupt" (pairs skipped so far)}; with a
        cache also "context" (B, L, D) and, for SDXL, "pooled" (B, P)."""
        if not (batch_size >= 1 and 0 <= rank < world_size and start >= 0):
            raise ValueError("batches: need batch_size >= 1, 0 <= rank < world_size, start >= 0")
        pos = start
        while True:
            idx = [pos + rank * batch_size + i for i in range(batch_size)]
            items = [self.item(s) for s in idx]
            pos += batch_size * world_size
            batch = dict(prompts=[it["prompt"] for it in items], keys=[it["key"] for it in items],
                         index=torch.tensor(idx), position=pos, corrupt=self.num_corrupt)
            for k in ("chosen", "rejected", "context", "pooled", "chosen_emb", "rejected_emb"):
                if k in items[0]:
                    batch[k] = torch.stack([it[k] for it in items])
            yield batch


def prefetch(batches, depth=2):
    """Yield the batches of the iterator `batches`, in order, while a background thread makes the next `depth`: JPEG
    decoding and resizing (which release the GIL) overlap the training step on the GPU instead of stalling it. The
    batches are the same as without it (all randomness is per pair); an error in the data is raised here, at the
    batch where it happened. Closing the generator, or the program's exit, stops the thread and waits for it (a
    thread still inside torch when the interpreter exits aborts the process)."""
    import atexit
    import queue
    import threading
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


# ----------------------------------------------------------------------------------------------------------------
# --cache: VAE latents and text embeddings computed once, kept on disk, reused across epochs and runs


class LatentCache:
    """Per pair: the VAE latents of both images, unflipped and flipped (so flips stay exact: the VAE is not
    flip-equivariant), in one safetensors file; a corrupt pair gets an empty marker file. Per prompt: its text
    embeddings. `encode_images(list of (3,R,R)) -> (N,4,R/8,R/8)` and `encode_text(prompt) -> dict` are the
    trainer's frozen VAE and text encoders. Random crops are not cached (they change every epoch)."""

    def __init__(self, folder, encode_images, encode_text):
        self.folder, self.encode_images, self.encode_text = Path(folder), encode_images, encode_text

    def _path(self, kind, key):
        h = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / kind / h[:2] / f"{h}.safetensors"

    @staticmethod
    def _save(path, tensors, **metadata):
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a file

    @staticmethod
    def _load(path):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}

    def pair(self, key, read):
        """(caption, {chosen, chosen_flip, rejected, rejected_flip} latents [+ chosen_emb, rejected_emb]), or None
        for a corrupt pair."""
        path = self._path("pairs", key)
        if path.with_suffix(".corrupt").exists():
            return None
        if not path.is_file():
            got = read()
            if got is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".corrupt").touch()
                return None
            caption, (w, l), emb = got
            lat = self.encode_images([w, w.flip(-1), l, l.flip(-1)])
            extra = {} if emb is None else dict(chosen_emb=emb[0], rejected_emb=emb[1])
            self._save(path, dict(chosen=lat[0], chosen_flip=lat[1], rejected=lat[2], rejected_flip=lat[3], **extra),
                       caption=caption)
        meta, latents = self._load(path)
        return meta["caption"], latents

    def text(self, prompt):
        path = self._path("text", prompt)
        if not path.is_file():
            self._save(path, self.encode_text(prompt))
        return self._load(path)[1]


def open_pairs(spec, *, resolution, random_crop=False, flip=True, caption_dropout=0.0, seed=0, split="train",
               cache=None, relabel=None, embed=None):
    """The pairs of `spec` as a PairSource (see the module docstring); `cache` a LatentCache or None; `relabel` a
    reward model's (caption, [a, b]) -> [preferred, rejected] or None for a tie (eval.relabeller); `embed` an
    image encoder [a, b] -> (2, D) whose embeddings ride along in the batches (and the cache). Local
    parquet shards are checked for the Pick-a-Pic columns here (their footers only); Hub shards when fetched."""
    if cache is not None and random_crop:
        raise DataError("--cache and --random-crop do not go together: a random crop changes every epoch")
    if not 0.0 <= caption_dropout <= 1.0:
        raise DataError(f"caption dropout {caption_dropout} is not a probability in [0, 1]")
    shards = find_shards(str(spec), split)
    for s in shards:
        if isinstance(s, ParquetShard) and s.path is not None:
            s.check()
    return PairSource(shards, resolution, random_crop, flip, caption_dropout, seed, cache, name=str(spec),
                      relabel=relabel, embed=embed)


# ----------------------------------------------------------------------------------------------------------------
# Pairs that are built, not read: the trainer makes them with the base model (diffdpo.build_*_pairs) and writes them
# in the Pick-a-Pic schema, so the one reader above serves them too.
#
#   style:FOLDER   style alignment (Diffusion-RPO's second task): each style image is preferred over the base
#                  model's own generation for its caption. FOLDER holds images with their captions, either as
#                  IMAGE.txt beside IMAGE.png/.jpg/.jpeg/.webp, or as metadata.jsonl lines {"file_name", "text"}
#                  (the `datasets` ImageFolder convention).

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def style_items(folder):
    """A style folder -> [(caption, image path)], sorted by file name; one-line errors for what is missing."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"--data style:{folder}: no such folder (expected images with captions)")
    if (folder / "metadata.jsonl").is_file():
        items = []
        for n, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    items.append((str(r["text"]), folder / r["file_name"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{folder / 'metadata.jsonl'}:{n}: expected a JSON object with keys file_name, "
                                    f"text ({type(e).__name__}: {e})") from None
    else:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise DataError(f"{folder}: image {missing[0]} has no caption file {Path(missing[0]).stem}.txt "
                            f"(or give a metadata.jsonl with file_name, text)")
        items = [(p.with_suffix(".txt").read_text().strip(), p) for p in images]
    for _, p in items:
        if not p.is_file():
            raise DataError(f"{folder}: image file {p.name} not found")
    if not items:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with captions")
    return sorted(items, key=lambda it: it[1].name)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(path, captions, images_0, images_1, label_0):
    """Pairs to one parquet file in the Pick-a-Pic v2 schema (images as PNG/JPEG bytes; label_0 1, 0, or 0.5 for a
    tie, which the reader skips), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table(dict(caption=list(captions), jpg_0=list(images_0), jpg_1=list(images_1),
                          label_0=[float(v) for v in label_0], label_1=[1.0 - float(v) for v in label_0]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, str(path) + ".tmp", row_group_size=256)
    os.replace(str(path) + ".tmp", path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The toy world (`python diffdpo.py --model tiny --data shapes`): captioned shapes drawn with Pillow, and a judge.
#
# A caption names a shape, its color and the background color: "a red circle on a blue background" (6 colors x
# 3 shapes x 5 backgrounds = 90 captions). The tiny model is pretrained on all of them, with the shape's size and
# place drawn at random (the caption does not say). The judge encodes one clear, stated preference:
#
#     judge(image, caption) = fraction of the image's pixels whose nearest palette color is the caption's shape color
#
# so it rewards the right color and, among right-colored images, the LARGER shape ("bigger is better"). It is
# deterministic and reads nothing but the pixels. Preference pairs are on-policy, as Pick-a-Pic's: two samples of the
# base model for a training caption, the judge's favorite preferred (ties dropped). Evaluation uses the held-out
# captions.

COLORS = {"red": (220, 50, 50), "green": (40, 170, 70), "blue": (50, 80, 220), "yellow": (235, 210, 50),
          "purple": (140, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")


def shape_prompts(split="all"):
    """The toy world's captions: "all" (90), "train" (72, the preference pairs' prompts) or "test" (18 held out)."""
    prompts = [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in COLORS if b != c]
    if split == "all":
        return prompts
    return [p for i, p in enumerate(prompts) if (i % 5 == 2) == (split == "test")]


def parse_shape_prompt(prompt):
    """'a red circle on a blue background' -> ('red', 'circle', 'blue'); a clear error for anything else."""
    m = re.fullmatch(r"an? (\w+) (\w+) on an? (\w+) background", prompt.strip().lower())
    if not m or m[1] not in COLORS or m[2] not in SHAPES or m[3] not in COLORS:
        raise DataError(f"shapes: caption {prompt!r} is not of the form 'a COLOR SHAPE on a COLOR background' with "
                        f"COLOR in {', '.join(COLORS)} and SHAPE in {', '.join(SHAPES)}")
    return m[1], m[2], m[3]


def render_shape(prompt, gen, size=32):
    """Draw the caption with a random radius (size/8 .. size/3) and place; drawn at 4x and box-downsampled, so edges
    are anti-aliased. gen: a torch.Generator (the only source of randomness)."""
    color, shape, bg = parse_shape_prompt(prompt)
    r = float(size / 8 + torch.rand((), generator=gen) * (size / 3 - size / 8))
    cx, cy = (float(r + torch.rand((), generator=gen) * (size - 2 * r)) for _ in range(2))
    s = 4
    img = Image.new("RGB", (size * s, size * s), COLORS[bg])
    draw = ImageDraw.Draw(img)
    box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle([cx * s - 0.8 * r * s, cy * s - 0.8 * r * s, cx * s + 0.8 * r * s, cy * s + 0.8 * r * s],
                       fill=COLORS[color])
    else:
        draw.polygon([(cx * s, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
    return img.resize((size, size), Image.BOX)


def judge(image, prompt):
    """The toy world's preference score in [0, 1]: the fraction of pixels nearest (in RGB) to the caption's shape
    color among the six palette colors. image: a PIL image, or a (3, H, W) tensor in [-1, 1]."""
    if isinstance(image, Image.Image):
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    else:
        x = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)                # (6, 3)
    d = (x.flatten(1).T[:, None, :] - palette[None]).pow(2).sum(-1)                  # (HW, 6)
    return (d.argmin(-1) == list(COLORS).index(parse_shape_prompt(prompt)[0])).float().mean().item()
