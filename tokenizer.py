"""
The text encoders' tokenizers in plain Python: CLIP's byte-level BPE, exactly as transformers' CLIPTokenizer computes
it (prompts -> (B, 77) token ids for the text encoders of unet.py), and T5's SentencePiece Unigram (SD3's third text
encoder, (B, 256) ids), exactly as the `tokenizers` library reads a tokenizer.json. Their rules (special tokens, Unicode
classes, normalization tables) are machinery a reader of the method can skip; tests hold each to the reference
library's ids on thousands of hard prompts.
"""
import base64
import math
import re
import struct
import unicodedata
from pathlib import Path

import torch

from files import LoadError, first_line, read_json

MAX_PROMPT_CHARS = 4000   # prompts / captions are cut to this many characters: 77 or 256 tokens never need more

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


# ----------------------------------------------------------------------------------------------------------------
# T5 SentencePiece Unigram tokenizer (SD3's tokenizer_3)
# Exactly what the `tokenizers` library does with T5's tokenizer.json, in plain Python:
#   1. added tokens (</s>, <pad>, <unk>, <extra_id_N>) are cut out of the RAW text first, the longest match first;
#   2. each remaining segment goes through the file's normalizer: SentencePiece's precompiled table (NFKC plus its
#      "nmt" rules: control characters dropped, tabs and newlines -> " "), applied per grapheme cluster as
#      `tokenizers` does, then, where the file lists them, runs of spaces -> one and trailing white space stripped;
#   3. Metaspace: " " -> "▁", a "▁" prepended, the text split before each "▁" ("a cat" -> "▁a", "▁cat"); some files
#      split on white space first (WhitespaceSplit), then each word gets its "▁";
#   4. each word -> the vocabulary pieces whose log probabilities add up highest (Viterbi); a character that no piece
#      covers is <unk>, and a run of unknown characters is one <unk>;
#   5. ids + [</s>] (the post-processor's template), truncated to 256 keeping </s> last, padded with <pad>.

T5_MAX_LENGTH = 256   # SD3's max_sequence_length for the T5 prompt (T5's own model_max_length is 512)
UNK_PENALTY = 10.0    # an unknown character scores 10 below the least likely piece, as SentencePiece does
WHITESPACE_RUN = re.compile("[" + "".join(sorted(WHITESPACE)) + "]+")
# grapheme clusters (Unicode Annex 29): characters that join the one before them besides the combining marks,
# spacing marks that do not, and characters that join the one after them
EXTEND = re.compile("[\u200c\u200d\u0e33\u0eb3\uff9e\uff9f\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f]")
LONE_MARKS = re.compile("[\u102b\u102c\u1038\u1062-\u1064\u1067-\u106d\u1083\u1087-\u108c\u108f\u109a-\u109c"
                        "\u1a61\u1a63\u1a64\uaa7b\uaa7d\U00011720\U00011721]")
PREPEND = re.compile("[\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\u0d4e\U000110bd\U000110cd\U000111c2"
                     "\U000111c3\U0001193f\U00011941\U00011a3a\U00011a84-\U00011a89\U00011d46\U00011f02]")


def _control(c):
    """A control character: a cluster ends before and after it."""
    return unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and not EXTEND.match(c) and not PREPEND.match(c)


def _joins(prev, c):
    """Whether c stays in the grapheme cluster of the character prev before it: LF after CR; no other control
    character on either side; a mark or another extending character after anything; anything after a prepended
    character. (Hangul syllables, emoji sequences and flags are split differently from Unicode's clusters, but
    those clusters are 6 bytes or more, which the table reads character by character all the same. Marks newer than
    Python's Unicode tables (14.0 on Python 3.11), e.g. U+1AD2 or U+1AE3, are not known as marks here.)"""
    if _control(prev) or _control(c):
        return prev == "\r" and c == "\n"
    mark = unicodedata.category(c)[0] == "M" and not LONE_MARKS.match(c)
    return bool(mark or EXTEND.match(c) or PREPEND.match(prev))


def graphemes(text):
    """Step 2's clusters: "e" + a combining accent is one, CR LF is one, "ab" is two."""
    clusters = []
    for c in text:
        if clusters and _joins(clusters[-1][-1], c):
            clusters[-1] += c
        else:
            clusters.append(c)
    return clusters


class Charsmap:
    """SentencePiece's precompiled normalization table: a u32 byte size, a double-array trie (darts-clone's u32 units)
    from UTF-8 keys to offsets, then the NUL-terminated replacement strings those offsets point into."""

    def __init__(self, blob):
        size = int.from_bytes(blob[:4], "little")
        if size % 4 or len(blob) < 4 + size:
            raise ValueError(f"precompiled_charsmap: a {size}-byte trie does not fit in {len(blob)} bytes")
        self.units = struct.unpack(f"<{size // 4}I", blob[4:4 + size])
        self.strings = blob[4 + size:]
        self.strings.decode("utf-8")   # the replacements must be UTF-8 text (raises ValueError if not)

    def lookup(self, key, default=None):
        """The replacement for the SHORTEST prefix of key that the trie holds (as `tokenizers` does), or default."""
        offset = lambda u: (u >> 10) << ((u & (1 << 9)) >> 6)  # noqa: E731
        pos = offset(self.units[0])
        for byte in key.encode("utf-8"):
            pos ^= byte
            if byte == 0 or pos >= len(self.units) or self.units[pos] & ((1 << 31) | 0xFF) != byte:
                return default   # the unit's label is not this byte: no key continues this way
            unit = self.units[pos]
            pos ^= offset(unit)
            if unit >> 8 & 1:   # a key ends here; the unit at the next position holds its value
                start = self.units[pos] & ((1 << 31) - 1)
                return self.strings[start:self.strings.index(0, start)].decode("utf-8")
        return default

    def normalize(self, text):
        """A cluster of several characters under 6 UTF-8 bytes is looked up whole (its shortest listed prefix
        replaces it all); otherwise each character is replaced by its own entry, if it has one."""
        out = []
        for g in graphemes(text):
            whole = self.lookup(g) if len(g) > 1 and len(g.encode("utf-8")) < 6 else None
            out.append("".join(self.lookup(c, c) for c in g) if whole is None else whole)
        return "".join(out)


def read_normalizer(spec):
    """tokenizer.json's normalizer -> a list of str -> str steps: Precompiled, Replace, Strip (a Sequence nests)."""
    kind = spec and spec["type"]
    if kind is None:
        return []
    if kind == "Sequence":
        return [step for s in spec["normalizers"] for step in read_normalizer(s)]
    if kind == "Precompiled":
        return [Charsmap(base64.b64decode(spec["precompiled_charsmap"], validate=True)).normalize]
    if kind == "Replace":
        pattern, content = spec["pattern"], spec["content"]
        regex = re.compile(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        return [lambda s: regex.sub(lambda _: content, s)]
    if kind == "Strip":
        chars = "".join(WHITESPACE)
        left, right = spec["strip_left"], spec["strip_right"]
        return [lambda s: s.lstrip(chars) if left else s, lambda s: s.rstrip(chars) if right else s]
    raise ValueError(f"normalizer {kind!r}: expected Precompiled, Replace, Strip or a Sequence of them")


def read_metaspace(spec):
    """The pre_tokenizer, Metaspace alone or after WhitespaceSplit -> (whitespace_split, prepend, split)."""
    steps = spec["pretokenizers"] if spec and spec["type"] == "Sequence" else [spec or {}]
    kinds = [s.get("type") for s in steps]
    if kinds not in (["Metaspace"], ["WhitespaceSplit", "Metaspace"]) or steps[-1]["replacement"] != "▁":
        raise ValueError(f"pre_tokenizer {kinds}: expected Metaspace('▁'), alone or after WhitespaceSplit")
    meta = steps[-1]
    scheme = "never" if meta.get("add_prefix_space") is False else meta.get("prepend_scheme", "always")
    if scheme not in ("always", "never"):
        raise ValueError(f"pre_tokenizer Metaspace: prepend_scheme {scheme!r}, expected 'always' or 'never'")
    return len(steps) == 2, scheme == "always", meta.get("split", True)


def read_template(spec):
    """The post-processor's single-sequence template -> (ids before the text, ids after it): T5's ([], [</s>])."""
    if spec is None:
        return [], []
    if spec["type"] != "TemplateProcessing":
        raise ValueError(f"post_processor {spec['type']!r}: expected TemplateProcessing")
    before, after = [], []
    side = before
    for item in spec["single"]:
        if "Sequence" in item:
            side = after
        else:
            side += spec["special_tokens"][item["SpecialToken"]["id"]]["ids"]
    return before, after


class T5Tokenizer:
    """T5's SentencePiece Unigram from a parsed tokenizer.json; `tok(prompts) -> LongTensor (B, 256)`. A file it does
    not read (another model, an option it does not implement) is a ValueError naming the part."""

    def __init__(self, spec, pad_token="<pad>", max_length=T5_MAX_LENGTH):
        model = spec["model"]
        unigram = model["type"] == "Unigram" and model.get("unk_id") in range(len(model["vocab"]))
        if not unigram or model.get("byte_fallback"):
            raise ValueError(f"model {model['type']!r}: expected a Unigram with an unk_id and no byte_fallback")
        self.pieces = {piece: i for i, (piece, _) in enumerate(model["vocab"])}
        self.scores = [score for _, score in model["vocab"]]
        self.unk_id, self.unk_score = model["unk_id"], min(self.scores) - UNK_PENALTY
        self.longest = max(map(len, self.pieces))
        self.normalizers = read_normalizer(spec["normalizer"])
        self.whitespace_split, self.prepend, self.split = read_metaspace(spec["pre_tokenizer"])
        self.before, self.after = read_template(spec["post_processor"])
        added = spec.get("added_tokens") or []
        if any(t.get(k) for t in added for k in ("normalized", "lstrip", "rstrip", "single_word")):
            raise ValueError("added_tokens: expected tokens matched as written (normalized, lstrip, rstrip and "
                             "single_word false)")
        self.added = {t["content"]: t["id"] for t in added}
        alternatives = "|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))
        self.added_re = re.compile(f"({alternatives})") if self.added else None
        self.pad = self.added.get(pad_token, self.pieces.get(pad_token))
        if self.pad is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self.max_length, self.cache = max_length, {}

    @classmethod
    def from_folder(cls, folder):
        """A diffusers tokenizer_3/ folder: tokenizer.json, and (optional) tokenizer_config.json and
        special_tokens_map.json for the pad token and model_max_length. SentencePiece's spiece.model beside them is
        not read: tokenizer.json holds the same vocabulary and normalization table."""
        folder = Path(folder)
        read = lambda n: read_json(folder / n) if (folder / n).is_file() else {}  # noqa: E731
        conf = {**read("tokenizer_config.json"), **read("special_tokens_map.json")}
        pad = conf.get("pad_token") or "<pad>"
        max_length = min(T5_MAX_LENGTH, conf.get("model_max_length") or T5_MAX_LENGTH)
        path = folder / "tokenizer.json"
        spec = read_json(path)
        try:
            return cls(spec, pad["content"] if isinstance(pad, dict) else pad, max_length)
        except (AttributeError, KeyError, TypeError, ValueError, re.error) as e:
            what = f"no {e} entry" if isinstance(e, KeyError) else first_line(e)
            raise LoadError(f"{path}: not a T5 Unigram tokenizer.json as `tokenizers` writes it ({what})") from None

    def words(self, text):
        """Step 3 on normalized text."""
        words = []
        for chunk in WHITESPACE_RUN.split(text) if self.whitespace_split else [text]:
            chunk = chunk.replace(" ", "▁")
            if chunk and self.prepend and not chunk.startswith("▁"):
                chunk = "▁" + chunk
            words += re.split("(?=▁)", chunk) if self.split else [chunk]
        return [w for w in words if w]

    def viterbi(self, word):
        """Step 4: best[end] = (score, start, id) of the highest-scoring split of word[:end] whose last piece starts at
        start; a later start replaces it only with a strictly higher score, as in `tokenizers`."""
        if word in self.cache:
            return self.cache[word]
        n = len(word)
        best = [(0.0, 0, None)] + [None] * n
        for start in range(n):
            for end in range(start + 1, min(n, start + self.longest) + 1):
                i = self.pieces.get(word[start:end])
                unknown = i is None and end == start + 1   # no piece is this one character: it is <unk>
                if i is None and not unknown:
                    continue
                score = best[start][0] + (self.unk_score if unknown else self.scores[i])
                if best[end] is None or score > best[end][0]:
                    best[end] = (score, start, self.unk_id if unknown else i)
        pieces, end = [], n   # walk back from the end; an <unk> before an <unk> is fused into it
        while end > 0:
            _, start, i = best[end]
            if i == self.unk_id and pieces and pieces[-1][1] == self.unk_id:
                pieces[-1] = (word[start:end] + pieces[-1][0], i)
            else:
                pieces.append((word[start:end], i))
            end = start
        ids = [self.pieces.get(piece, self.unk_id) for piece, _ in reversed(pieces)]
        self.cache[word] = ids
        return ids

    def encode(self, text):
        """One prompt -> ids + [</s>] (not padded or truncated)."""
        ids = []
        for k, part in enumerate(self.added_re.split(text) if self.added_re else [text]):   # [text, added, text, ...]
            if k % 2:
                ids.append(self.added[part])
                continue
            for step in self.normalizers:
                part = step(part)
            for word in self.words(part):
                ids += self.viterbi(word)
        return self.before + ids + self.after

    def __call__(self, prompts, max_length=None):
        """Prompts -> (B, max_length) ids (256 unless told), each prompt cut to MAX_PROMPT_CHARS first as CLIP's are."""
        max_length = max_length or self.max_length
        rows, prompts = [], [prompts] if isinstance(prompts, str) else prompts
        for ids in map(self.encode, [p[:MAX_PROMPT_CHARS] for p in prompts]):
            ids = ids[: max_length - len(self.after)] + self.after if len(ids) > max_length else ids
            rows.append(ids + [self.pad] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
