"""
Preference pairs for Diffusion-DPO: (prompt, preferred image, rejected image).

    open_pairs(spec, resolution=512)  ->  PairSource;  source.batches(B, rank=r, world_size=W, start=pos)

spec is one of
    pickapic                   the Pick-a-Pic v2 dataset on the Hub (yuvalkirstain/pickapic_v2; taken down in 2025)
    hub:OWNER/NAME, OWNER/NAME a Hub dataset of parquet shards in the Pick-a-Pic v2 schema, fetched shard by shard
    FILE.parquet, FOLDER/      local parquet shards in that schema: jpg_0, jpg_1 (JPEG bytes), label_0, label_1, caption
    pairs.jsonl, FOLDER/       our own format: {"prompt": ..., "chosen": image path, "rejected": image path} per line

The stream. All pairs are read as one endless, deterministic sequence: epoch e visits the shards in an order
seeded by (seed, e), the row groups of each shard in a seeded order, and the rows of each row group in a seeded
order (a full shuffle for one shard; a two-level shuffle across many, which keeps reads sequential). Stream item s
is everything about one training example: its pair, and its augmentation (crop, flips, caption dropout) drawn from
a generator seeded by (seed, s). Global micro-batch k is items [start + k B W, start + (k+1) B W); rank r takes B
consecutive items of it. So one process with batch B W sees exactly what W processes with batch B see, and a run
resumes exactly from a stream position. A pair whose image cannot be decoded is skipped and counted, and the
following row of its row group (in stream order) takes its place, so positions never shift between ranks.
"""
import functools
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COLUMNS = ("jpg_0", "jpg_1", "label_0", "label_1", "caption")
PICKAPIC = "yuvalkirstain/pickapic_v2"


class DataError(ValueError):
    """A user-facing, one-line problem with the data: names the file / column / key and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing, as the official code: resize the shortest side, center (or random) crop, random flip, [-1, 1]


def preprocess(img, resolution, gen=None, random_crop=False):
    """PIL image -> (3, R, R) float tensor in [-1, 1]: bilinear resize (antialiased) of the shortest side to R,
    then a center crop, or a random one drawn from `gen`. (Flips are drawn per stream item, see PairSource.item.)"""
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BILINEAR)
    w, h = img.size
    if random_crop:
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=gen))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, R, R)


def decode(data):
    """JPEG/PNG bytes or a path -> PIL image; None if it cannot be decoded (a corrupt pair)."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
        return img
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Shards: a local parquet file, a Hub parquet file (downloaded when first needed), or a JSONL file.
# Each knows its row groups (lists of pair rows, ties dropped) and reads one pair: (prompt, chosen, rejected).


class ParquetShard:
    def __init__(self, name, fetch=None):
        self.name, self.fetch, self._groups, self._cache = name, fetch, None, (None, None)

    @property
    def path(self):
        return self.fetch() if self.fetch else self.name

    def groups(self):
        """Per row group, the rows that are not ties, and for each whether jpg_1 is the preferred one."""
        if self._groups is None:
            import pyarrow.parquet as pq
            try:
                f = pq.ParquetFile(self.path)
            except (OSError, ValueError) as e:
                raise DataError(f"{self.name}: not a readable parquet file ({e})") from None
            missing = [c for c in COLUMNS if c not in f.schema_arrow.names]
            if missing:
                raise DataError(f"{self.name}: missing column(s) {', '.join(missing)}; expected the Pick-a-Pic v2 "
                                f"schema ({', '.join(COLUMNS)})")
            self._groups = []
            for g in range(f.num_row_groups):
                labels = f.read_row_group(g, columns=["label_0"]).column(0).to_pylist()
                self._groups.append([(i, lab == 0) for i, lab in enumerate(labels) if lab is not None and lab != 0.5])
        return self._groups

    def read(self, group, row):
        if self._cache[0] != group:  # keep one row group's bytes in memory
            import pyarrow.parquet as pq
            t = pq.ParquetFile(self.path).read_row_group(group, columns=["caption", "jpg_0", "jpg_1"])
            self._cache = (group, t.to_pydict())
        cols = self._cache[1]
        i, swap = row
        images = (cols["jpg_0"][i], cols["jpg_1"][i])
        return cols["caption"][i] or "", *(images[::-1] if swap else images)


class JsonlShard:
    def __init__(self, path):
        self.name, rows = str(path), []
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append((r["prompt"] or "", *(str(Path(path).parent / r[k]) for k in ("chosen", "rejected"))))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: expected a JSON object with keys prompt, chosen, rejected "
                                f"({type(e).__name__}: {e})") from None
        self.rows = rows

    def groups(self):
        return [list(range(len(self.rows)))]

    def read(self, group, row):
        prompt, chosen, rejected = self.rows[row]
        for p in (chosen, rejected):
            if not os.path.isfile(p):
                raise DataError(f"{self.name}: image file {p} not found")
        return prompt, chosen, rejected


def hub_shards(repo, split):
    """The parquet shards of a Hub dataset, each downloaded (into the HF cache) only when training reaches it."""
    import huggingface_hub as hh
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    gone = (f" The official Pick-a-Pic v2 ({PICKAPIC}) was taken off the Hub in 2025." if repo == PICKAPIC else "")
    alternatives = (" Use a local copy (--data /path/to/parquet_dir), a mirror in the same schema (--data "
                    "hub:OWNER/NAME), or your own pairs (--data pairs.jsonl with prompt/chosen/rejected); "
                    "yuvalkirstain/pickapic_v2_no_images still has captions, labels and URLs, but no images.")
    try:
        files = hh.HfApi().list_repo_files(repo, repo_type="dataset")
    except RepositoryNotFoundError:
        raise DataError(f"dataset {repo!r} not found on the Hugging Face Hub.{gone}{alternatives}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "HF_HUB_OFFLINE is set" if offline else str(e).splitlines()[0]
        raise DataError(f"dataset {repo!r}: cannot list its files ({why}).{gone}{alternatives}") from None
    files = sorted(f for f in files if f.endswith(".parquet") and
                   (Path(f).name.startswith(split + "-") or split in Path(f).parts[:-1]))
    if not files:
        raise DataError(f"dataset {repo!r} has no parquet shards for split {split!r}")
    fetch = lambda f: lambda: hh.hf_hub_download(repo, f, repo_type="dataset")  # noqa: E731
    return [ParquetShard(f"{repo}/{f}", fetch(f)) for f in files]


def find_shards(spec, split="train"):
    if spec == "pickapic":
        spec = "hub:" + PICKAPIC
    p = Path(spec)
    if p.is_file():
        return [JsonlShard(p)] if p.suffix == ".jsonl" else [ParquetShard(str(p))]
    if p.is_dir():
        if (p / "pairs.jsonl").is_file():
            return [JsonlShard(p / "pairs.jsonl")]
        files = sorted(p.rglob("*.parquet"))
        if not files:
            raise DataError(f"{p}: no *.parquet files and no pairs.jsonl in this folder")
        return [ParquetShard(str(f)) for f in files]
    repo = spec[4:] if spec.startswith("hub:") else spec
    if spec.startswith("hub:") or (repo.count("/") == 1 and not p.suffix and not spec.startswith((".", "/"))):
        return hub_shards(repo, split)
    raise DataError(f"--data {spec}: no such file or folder (expected pickapic, hub:OWNER/NAME, parquet shards "
                    f"or a pairs.jsonl)")


# ----------------------------------------------------------------------------------------------------------------
# The stream


def _seed(*key):
    """A 62-bit seed from a tuple of ints, the same in every process (Python's hash() of str is not)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 2


@functools.lru_cache(maxsize=256)
def _perm(n, *key):
    """A seeded permutation of range(n), a pure function of key."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(*key))).tolist()


class PairSource:
    def __init__(self, shards, resolution, random_crop=False, flip=True, caption_dropout=0.0, seed=0, cache=None):
        self.shards, self.resolution, self.seed, self.cache = shards, resolution, seed, cache
        self.random_crop, self.flip, self.caption_dropout = random_crop, flip, caption_dropout
        self.num_corrupt = 0
        self.num_empty_captions = 0
        self._sizes = {}  # shard index -> number of pairs (known once the shard was opened)
        self._epoch_len = None

    def __len__(self):
        return sum(self._size(i) for i in range(len(self.shards)))  # opens (downloads) every shard

    def _size(self, k):
        if k not in self._sizes:
            self._sizes[k] = sum(len(g) for g in self.shards[k].groups())
        return self._sizes[k]

    def locate(self, s):
        """Stream position s -> (shard, row group, that group's rows in stream order, index in that order)."""
        e = 0
        if self._epoch_len:
            e, s = divmod(s, self._epoch_len)
        while True:  # walk the shards of epoch e in their order; a shard's size is learnt when it is first reached
            for k in _perm(len(self.shards), self.seed, e):
                n = self._size(k)
                if s >= n:
                    s -= n
                    continue
                groups = self.shards[k].groups()
                for gi in _perm(len(groups), self.seed, e, k):
                    if s < len(groups[gi]):
                        rows = groups[gi]
                        return self.shards[k], gi, [rows[j] for j in _perm(len(rows), self.seed, e, k, gi)], s
                    s -= len(groups[gi])
            self._epoch_len = sum(self._sizes.values())
            if self._epoch_len == 0:
                raise DataError(f"{self.shards[0].name}: no usable pairs (every pair is a tie, or the data is empty)")
            e += 1

    def item(self, s):
        """Stream item s -> dict(prompt, caption, key, flips, chosen (3,R,R), rejected (3,R,R)) -- or, with a latent
        cache, chosen/rejected latents and the prompt's text embeddings. Corrupt pairs are replaced as described above."""
        shard, gi, rows, j = self.locate(s)
        gen = torch.Generator().manual_seed(_seed(self.seed, s))
        flips = [self.flip and bool(torch.rand((), generator=gen) < 0.5) for _ in range(2)]  # per image
        drop = self.caption_dropout > 0 and bool(torch.rand((), generator=gen) < self.caption_dropout)
        for attempt in range(len(rows)):
            row = rows[(j + attempt) % len(rows)]
            key = f"{shard.name}/{gi}/{row}"
            if self.cache is not None:  # latents of both images, flipped and not, or None if the pair is corrupt
                cached = self.cache.pair(key, lambda: self._read(shard, gi, row, gen))
                if cached is not None:
                    caption, x = cached
                    x = [x[f"{n}_flip" if f else n] for n, f in zip(("chosen", "rejected"), flips)]
                    break
            else:
                read = self._read(shard, gi, row, gen)
                if read is not None:
                    caption, x = read
                    x = [xi.flip(-1) if f else xi for xi, f in zip(x, flips)]
                    break
            self.num_corrupt += 1
        else:
            raise DataError(f"{shard.name}: no decodable image pair in row group {gi}")
        self.num_empty_captions += caption == ""
        prompt = "" if drop else caption
        out = dict(prompt=prompt, caption=caption, key=key, flips=flips, chosen=x[0], rejected=x[1])
        if self.cache is not None:
            out.update(self.cache.text(prompt))
        return out

    def _read(self, shard, gi, row, gen):
        """(caption, [chosen, rejected] preprocessed, unflipped) or None if an image cannot be decoded."""
        caption, a, b = shard.read(gi, row)
        imgs = [decode(x) for x in (a, b)]
        if any(im is None for im in imgs):
            return None
        return caption, [preprocess(im, self.resolution, gen, self.random_crop) for im in imgs]

    def batches(self, batch_size, *, rank=0, world_size=1, start=0):
        """Endless batches for this rank: {"prompts", "chosen" (B,3,R,R) [latents with a cache], "rejected",
        "index" (B,) stream positions of the items, "position" (where the next global micro-batch starts)},
        with a cache also "context" (B, L, D) and, for SDXL, "pooled" (B, P)."""
        pos = start
        while True:
            idx = [pos + rank * batch_size + i for i in range(batch_size)]
            items = [self.item(s) for s in idx]
            pos += batch_size * world_size
            batch = dict(prompts=[it["prompt"] for it in items], keys=[it["key"] for it in items],
                         index=torch.tensor(idx), position=pos)
            for k in ("chosen", "rejected", "context", "pooled"):
                if k in items[0]:
                    batch[k] = torch.stack([it[k] for it in items])
            yield batch


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
        """(caption, {chosen, chosen_flip, rejected, rejected_flip}) latents, or None for a corrupt pair."""
        path = self._path("pairs", key)
        if path.with_suffix(".corrupt").exists():
            return None
        if not path.is_file():
            got = read()
            if got is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".corrupt").touch()
                return None
            caption, (w, l) = got
            lat = self.encode_images([w, w.flip(-1), l, l.flip(-1)])
            self._save(path, dict(chosen=lat[0], chosen_flip=lat[1], rejected=lat[2], rejected_flip=lat[3]),
                       caption=caption)
        meta, latents = self._load(path)
        return meta["caption"], latents

    def text(self, prompt):
        path = self._path("text", prompt)
        if not path.is_file():
            self._save(path, self.encode_text(prompt))
        return self._load(path)[1]


def open_pairs(spec, *, resolution, random_crop=False, flip=True, caption_dropout=0.0, seed=0, split="train",
               cache=None):
    """The pairs of `spec` as a PairSource (see the module docstring); `cache` a LatentCache or None."""
    if cache is not None and random_crop:
        raise DataError("--cache and --random-crop do not go together: a random crop changes every epoch")
    return PairSource(find_shards(spec, split), resolution, random_crop, flip, caption_dropout, seed, cache)
