"""
CLIP's byte-level BPE tokenizer, exactly as transformers' CLIPTokenizer computes it, in plain Python: prompts ->
(B, 77) token ids for the text encoders of unet.py. Its rules (special tokens, Unicode classes) are machinery a reader
of the method can skip; tests hold it to transformers' ids on several hundred hard prompts.
"""
import math
import re
import unicodedata
from pathlib import Path

import torch

from files import LoadError, first_line, read_json

MAX_PROMPT_CHARS = 4000   # prompts / captions are cut to this many characters: 77 tokens never need more

# ----------------------------------------------------------------------------------------------------------------
# CLIP BPE tokenizer
# Exactly what transformers' CLIPTokenizer (the `tokenizers` backend) does, in plain Python:
#   1. special tokens (<|startoftext|>, <|endoftext|>, and the pad token, e.g. SDXL tokenizer_2's "!") are cut out of
#      the RAW text first: a literal "<|endoftext|>" or, for tokenizer_2, every "!" becomes that token's id;
#   2. each remaining segment: NFC, runs of Unicode white space -> " ", lowercase (char by char: no final sigma);
#   3. split into words: <|startoftext|> | <|endoftext|> | 's 't 're 've 'm 'll 'd | letters+ | one digit |
#      other non-space characters+ (white space dropped); byte-level GPT-2 splitting then cuts the two literal
#      special-token words into "<|", name, "|>";
#   4. each word's UTF-8 bytes -> printable unicode chars, "</w>" appended to the last, BPE merges by rank;
#   5. [bos] + ids + [eos], truncated to 77 keeping eos last, padded with the pad id.
# Letters / numbers / lowercase come from Python's unicodedata (Unicode 14 on Python 3.11); characters assigned by
# later Unicode versions (e.g. CJK Extension H) may split differently from the Rust library's newer tables.

WHITESPACE = set("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000, 0x200B)}
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
LITERALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]       # control bytes, space, ... -> U+0100 onwards
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _kind(c):
    """'L' letter, 'N' number, 'S' white space, 'P' anything else (the regex classes p{L}, p{N}, s)."""
    if c in WHITESPACE:
        return "S"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def split_words(text):
    """Step 3 on normalized text (a hand-written scanner for the pre-tokenizer's regex, first alternative wins)."""
    words, i, n = [], 0, len(text)
    while i < n:
        k = _kind(text[i])
        lit = text[i] in "'<" and next((w for w in LITERALS + CONTRACTIONS if text.startswith(w, i)), None)
        if k == "S":
            i += 1
            continue
        if lit:
            j = i + len(lit)
            words += ["<|", lit[2:-2], "|>"] if lit in LITERALS else [lit]
        elif k == "N":
            j = i + 1
            words.append(text[i])
        else:
            j = i + 1
            while j < n and _kind(text[j]) == k:
                j += 1
            words.append(text[i:j])
        i = j
    return words


def read_merges(path):
    """merges.txt: one "a b" merge per line, by rank, after an optional "#version" header."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise LoadError(f"{path}: not readable ({first_line(e)})") from None
    return [m for m in lines[1 if lines[0].startswith("#version") else 0:] if m.strip()]


class CLIPTokenizer:
    """CLIP's byte-level BPE: vocab.json + merges.txt; `tok(prompts) -> LongTensor (B, 77)`.
    `specials` maps each special token to whether transformers matches it in the normalized text (True) or in the
    raw text (False); see from_folder."""

    def __init__(self, vocab, merges, pad_token="<|endoftext|>", max_length=77, specials=None):
        self.vocab, self.max_length = vocab, max_length
        self.ranks = {tuple(m.split()): r for r, m in enumerate(merges)}
        self.bos, self.eos, self.pad = vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad_token]
        specials = specials or {t: False for t in ("<|startoftext|>", "<|endoftext|>", pad_token)}
        self.raw_re, self.norm_re = (
            re.compile("(" + "|".join(map(re.escape, sorted(ts, key=len)[::-1])) + ")") if ts else None
            for ts in ([t for t, n in specials.items() if not n], [t for t, n in specials.items() if n]))
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_folder(cls, folder):
        """A Hub tokenizer folder: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.
        The pad token: SD1.5 <|endoftext|>, SDXL's tokenizer_2 "!". Whether a special token is matched before or
        after normalization follows transformers 5: an `added_tokens_decoder` in tokenizer_config.json decides;
        otherwise special_tokens_map.json (over tokenizer_config.json), where a plain string means raw, a dict its
        own "normalized", and the last of bos, eos, unk, pad wins. So in SD1.5's folder "<|STARTOFTEXT|>" is
        matched (normalized) but "<|ENDOFTEXT|>" is not (the plain-string pad token makes it raw)."""
        folder = Path(folder)
        vocab, merges = read_json(folder / "vocab.json"), read_merges(folder / "merges.txt")
        read = lambda n: read_json(folder / n) if (folder / n).is_file() else {}  # noqa: E731
        conf, keys = read("tokenizer_config.json"), ("bos_token", "eos_token", "unk_token", "pad_token")
        decoder = {t["content"]: t.get("normalized", not t.get("special", False))
                   for t in (conf.get("added_tokens_decoder") or {}).values()}
        tokens = {k: conf.get(k) for k in keys}
        if not decoder:
            tokens.update({k: v for k, v in read("special_tokens_map.json").items() if k in keys and v})
        specials, names = dict(decoder), {}
        for k, default in zip(keys, ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")):
            v = tokens[k] or default
            names[k] = content = v["content"] if isinstance(v, dict) else v
            specials[content] = decoder.get(content, bool(v.get("normalized", False)) if isinstance(v, dict) else False)
        max_length = conf.get("model_max_length", 77)
        return cls(vocab, merges, names["pad_token"], max_length if max_length < 10_000 else 77, specials)

    def bpe(self, word):
        """Merge the word's symbols (its UTF-8 bytes as byte_chars), lowest-ranked pair first, until no listed merge
        applies."""
        if word in self.cache:
            return self.cache[word]
        chars = "".join(self.byte_chars[b] for b in word.encode("utf-8"))
        syms = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(syms) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(syms, syms[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(syms):
                if i < len(syms) - 1 and (syms[i], syms[i + 1]) == pair:
                    merged.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    merged.append(syms[i])
                    i += 1
            syms = merged
        ids = [self.vocab[s] for s in syms]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        """One prompt -> [bos, ..., eos] (not padded or truncated)."""
        ids = []
        for raw in (self.raw_re.split(text) if self.raw_re else [text]):   # [text, special, text, ..., text]
            if self.raw_re and self.raw_re.fullmatch(raw):
                ids.append(self.vocab[raw])
                continue
            norm = "".join(" " if c in WHITESPACE else c.lower() for c in unicodedata.normalize("NFC", raw))
            for part in (self.norm_re.split(norm) if self.norm_re else [norm]):
                if self.norm_re and self.norm_re.fullmatch(part):
                    ids.append(self.vocab[part])
                    continue
                for word in split_words(part):
                    ids += self.bpe(word)
        return [self.bos] + ids + [self.eos]

    def __call__(self, prompts):
        """Prompts -> (B, max_length) ids; each prompt cut to MAX_PROMPT_CHARS first (a 20 MB caption would take
        seconds and gigabytes to encode, only to be truncated to 77 tokens)."""
        rows, prompts = [], [prompts] if isinstance(prompts, str) else prompts
        for ids in map(self.encode, [p[:MAX_PROMPT_CHARS] for p in prompts]):
            ids = ids[: self.max_length - 1] + [self.eos] if len(ids) > self.max_length else ids
            rows.append(ids + [self.pad] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
