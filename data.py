"""
Preference pairs for Diffusion-DPO: (prompt, preferred image, rejected image).

    open_pairs(spec, resolution=512)  ->  PairSource;  source.batches(B, rank=r, world_size=W, start=pos)

spec is one of
    pickapic                   the Pick-a-Pic v2 dataset on the Hub (yuvalkirstain/pickapic_v2; taken down in 2025)
    hub:OWNER/NAME, OWNER/NAME a Hub dataset of parquet shards in the Pick-a-Pic v2 schema, fetched shard by shard
    FILE.parquet, FOLDER/      local parquet shards in that schema: jpg_0, jpg_1 (JPEG bytes), label_0, label_1, caption
    pairs.jsonl, FOLDER/       our own format: {"prompt": ..., "chosen": image path, "rejected": image path} per line
    images.jsonl, parquet      labelled single images for --loss kto (shards.py): batch["images"], batch["labels"]
and, built by the trainer with the base model before training (diffdpo.build_pairs), then read as parquet:
    shapes                     the toy world's on-policy pairs, labelled by its judge (toy.py)
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
decoded (or is absurdly large) is skipped and counted, and the next row of its row group in stream order takes its
place (wrapping around): an item stays a pure function of s, so positions never shift between ranks and nothing
waits on others.
The sizes of Hub shards are learnt when they are downloaded: len() of a Hub source is an error until then.
The shard files themselves (parquet, JSONL, the Hub), the --cache store and the prefetch thread are in shards.py.
"""
import copy
import functools
import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from files import DataError, first_line, json_loads, jsonl_lines
from shards import ParquetShard, find_shards

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


MAX_PIXELS = 40_000_000   # an image larger than this (e.g. 8000 x 5000) is skipped and counted, before it is decoded
MAX_ASPECT = 8            # so is one longer than 8 times its width: resizing its short side to R would make it huge


def open_image(x):
    """Image bytes or a path -> a decoded PIL image in a mode preprocess() can take, or the reason it is skipped:
    "too_large" (judged from the header alone, before decoding) or "corrupt" (unreadable, or a mode with no
    meaningful 8-bit RGB, e.g. 32-bit float). 16-bit images are scaled to 8 bits (convert("RGB") would clip them)."""
    try:
        img = Image.open(io.BytesIO(x) if isinstance(x, (bytes, bytearray)) else x)
        w, h = img.size
        if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * min(w, h):
            return "too_large"
        img.load()
    except (OSError, ValueError, TypeError, SyntaxError, EOFError, Image.DecompressionBombError):
        return "corrupt"
    if img.mode.startswith("I;16") or img.mode == "I":   # 16-bit grayscale PNGs (and TIFFs)
        return Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    return "corrupt" if img.mode == "F" else img


def decode_pair(sources, resolution, gen=None, random_crop=False):
    """A pair's two images (bytes or paths) -> list of two (3, R, R) tensors, or the reason the pair is skipped."""
    images = [open_image(x) if x is not None else "corrupt" for x in sources]
    reason = next((im for im in images if isinstance(im, str)), None)
    return reason or [preprocess(im, resolution, gen, random_crop) for im in images]


# ----------------------------------------------------------------------------------------------------------------
# The stream


def _seed(*key):
    """A 62-bit seed from a tuple of ints, the same in every process (Python's hash() of str is not)."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 2


def label_flipped(seed, p, *where):
    """--label-noise p: whether the label of the pair at `where` (shard, row group, row) is flipped, with probability
    p, a pure function of (seed, the pair's place): the same pairs in every epoch, process and resume."""
    return _seed(seed, "label-noise", *where) < p * 2 ** 62


@functools.lru_cache(maxsize=256)
def _perm(n, *key):
    """A seeded permutation of range(n), a pure function of key (read-only: it is shared)."""
    p = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(*key))).numpy()
    p.flags.writeable = False
    return p


class PairSource:
    def __init__(self, shards, resolution, random_crop=False, flip=True, caption_dropout=0.0, seed=0, cache=None,
                 name="pairs", relabel=None, embed=None, rows=None):
        self.shards, self.resolution, self.seed, self.cache, self.name = shards, resolution, seed, cache, name
        self.relabel = relabel        # (caption, [a, b]) -> [preferred, rejected] or None (a tie): AI feedback
        self.embed = embed            # [preferred, rejected] -> (2, D) image embeddings (rpo.py --rpo-embed image)
        self.random_crop, self.flip, self.caption_dropout = random_crop, flip, caption_dropout
        self.rows = rows              # (shard, group) -> the usable rows this source reads (holdout), else all
        self.label_noise = 0.0        # the probability that a pair's label is flipped (label_flipped)
        self.skipped = {reason: set() for reason in SKIPPED}  # the keys of the pairs skipped, by reason
        self._sizes = {}              # shard index -> number of usable pairs, once that shard was opened
        self._epoch_len = None
        self._loaded = (None, None)   # ((shard, row group), its data): one row group in memory at a time

    def groups(self, k):
        """Shard k's row groups as lists of the usable rows this source reads."""
        groups = self.shards[k].groups()
        return groups if self.rows is None else [self.rows(k, g, rows) for g, rows in enumerate(groups)]

    def __len__(self):
        """The number of usable pairs (ties dropped); reads the label columns of every shard."""
        if any(s.path is None for s in self.shards):
            got = sum(s.path is not None for s in self.shards)
            raise DataError(f"{self.name}: the number of pairs is known once all "
                            f"{len(self.shards)} shards are downloaded ({got} so far)")
        return sum(self._size(k) for k in range(len(self.shards)))

    def _size(self, k):
        if k not in self._sizes:
            self._sizes[k] = sum(len(g) for g in self.groups(k))
        return self._sizes[k]

    def counts(self):
        """Pairs left out so far, each counted once: unreadable ("corrupt"), too large, ties (in the labels, or to
        the --choice-model), bad labels; and pairs with an empty caption (trained on the empty prompt) or one longer
        than tokenizer.MAX_PROMPT_CHARS (cut to it)."""
        out = {reason: len(keys) for reason, keys in self.skipped.items()}
        for s in self.shards:
            for k, v in s.counts.items():
                out[k] = out.get(k, 0) + v
        return out

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
                groups = self.groups(k)
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
        cache, the chosen/rejected posterior means (+ _std) and the prompt's text embeddings. A pair that cannot be
        used is counted and replaced (see the top)."""
        e, k, g, j = self.locate(s)
        shard, rows = self.shards[k], self.groups(k)[g]
        order = _perm(len(rows), self.seed, e, k, g)
        gen = torch.Generator().manual_seed(_seed(self.seed, s))
        flips = [bool(torch.rand((), generator=gen) < 0.5) and self.flip for _ in range(2)]  # per image
        drop = bool(torch.rand((), generator=gen) < self.caption_dropout)
        for attempt in range(len(rows)):
            row = int(rows[order[(j + attempt) % len(rows)]])
            key = shard.key(g, row)
            got = self.cache.pair(key, lambda: self._read(k, g, row, gen)) if self.cache else self._read(k, g, row, gen)
            if not isinstance(got, str):
                break
            self.skipped[got].add(key)
        else:
            raise DataError(f"{shard.name}: no usable image pair in row group {g}")
        flipped = bool(self.label_noise) and label_flipped(self.seed, self.label_noise, k, g, row)
        if self.cache is not None:  # both images' posteriors, flipped and not
            caption, x = got
            sides = ("rejected", "chosen") if flipped else ("chosen", "rejected")     # the file's, in their new roles
            names = [f"{n}_flip" if f else n for n, f in zip(sides, flips)]
            out = dict(chosen=x[names[0]], rejected=x[names[1]], chosen_std=x[names[0] + "_std"],
                       rejected_std=x[names[1] + "_std"])
            emb = [x[n + "_emb"] for n in sides if n + "_emb" in x] or None
        else:
            caption, x, emb = got
            x, emb = (x[::-1], emb if emb is None else emb[::-1]) if flipped else (x, emb)
            names = ("images",) if shard.unpaired else ("chosen", "rejected")
            out = dict(zip(names, (xi.flip(-1) if f else xi for xi, f in zip(x, flips))))
        if shard.unpaired:  # a labelled image (KTO): its label, flipped by --label-noise
            out["labels"] = torch.tensor(float(shard.label(g, row) != flipped))
        prompt = "" if drop else caption
        out.update(prompt=prompt, caption=caption, key=key, flips=flips)
        if emb is not None:  # of the unflipped images
            out.update(chosen_emb=emb[0], rejected_emb=emb[1])
        if self.cache is not None:
            out.update(self.cache.text(prompt))
        return out

    def _read(self, k, g, row, gen):
        """(caption, [chosen, rejected] preprocessed, unflipped, their embeddings or None), or the reason the pair is
        skipped."""
        if self._loaded[0] != (k, g):
            self._loaded = (None, None)  # free the previous group first
            self._loaded = ((k, g), self.shards[k].load(g))
        caption, *sources = self.shards[k].pair(self._loaded[1], row)         # two images, or one (labelled)
        x = decode_pair(sources, self.resolution, gen, self.random_crop)
        if not isinstance(x, str) and self.relabel is not None:
            x = self.relabel(caption, x) or "ties"
        return x if isinstance(x, str) else (caption, x, self.embed(x) if self.embed else None)

    def batches(self, batch_size, *, rank=0, world_size=1, start=0):
        """Endless batches for this rank: {"prompts", "chosen" (B,3,R,R) [posterior means with a cache, and
        "chosen_std"], "rejected", "index" (B,) stream positions of the items, "keys" (the pairs' names), "position"
        (where the next global micro-batch starts: pass it as start= to resume)}; with a cache also "context"
        (B, L, D) and, for SDXL, "pooled" (B, P)."""
        if not (batch_size >= 1 and 0 <= rank < world_size and start >= 0):
            raise ValueError("batches: need batch_size >= 1, 0 <= rank < world_size, start >= 0")
        pos = start
        while True:
            idx = [pos + rank * batch_size + i for i in range(batch_size)]
            items = [self.item(s) for s in idx]
            pos += batch_size * world_size
            batch = dict(prompts=[it["prompt"] for it in items], keys=[it["key"] for it in items],
                         index=torch.tensor(idx), position=pos)
            for k in ("chosen", "rejected", "chosen_std", "rejected_std", "context", "pooled", "chosen_emb",
                      "rejected_emb", "images", "labels"):
                if k in items[0]:
                    batch[k] = torch.stack([it[k] for it in items])
            yield batch

    def holdout(self, n):
        """(training source, held-out source): the first n usable pairs in file order (shard by shard, row group by
        row group) form a fixed validation set, read without augmentation; the training stream never sees them."""
        held, left = {}, n
        for k in range(len(self.shards)):
            for g, rows in enumerate(self.shards[k].groups()):
                held[k, g] = rows[:left]
                left -= len(held[k, g])
            if not left:
                break
        if left:
            raise DataError(f"{self.name}: --val-pairs {n} but there are only {n - left} usable pairs")
        train, val = copy.copy(self), copy.copy(self)
        train.rows = lambda k, g, rows: np.setdiff1d(rows, held.get((k, g), []))
        val.rows = lambda k, g, rows: held.get((k, g), rows[:0])
        val.flip, val.caption_dropout, val.random_crop = False, 0.0, False
        for src in (train, val):
            src._sizes, src._epoch_len, src.skipped = {}, None, self.skipped
        return train, val


SKIPPED = ("corrupt", "too_large", "ties")    # why a pair is skipped when it is read (see PairSource.counts)


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
# Pairs that are built, not read: the trainer makes them with the base model (diffdpo.build_pairs) and writes them
# in the Pick-a-Pic schema (shards.write_pairs), so the one reader above serves them too.
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
        for n, line in jsonl_lines(folder / "metadata.jsonl"):
            try:
                r = json_loads(line)
                items.append((str(r["text"]), folder / r["file_name"]))
            except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or nested too deep
                raise DataError(f"{folder / 'metadata.jsonl'}:{n}: expected a JSON object with keys file_name, "
                                f"text ({type(e).__name__}: {first_line(e)[:200]})") from None
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
