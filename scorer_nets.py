"""
The networks behind eval.py's scores: CLIP's vision tower and CLIPModel (PickScore, HPSv2, the aesthetic predictor,
CLIP score) with each one's image preprocessing; text alignment as the Diffusion-DPO paper's DrawBench
results report it ("Text Alignment (SentenceBERT)"); and style alignment as a Fréchet distance between feature sets.

    text alignment  cos(SBERT(BLIP's caption of the image), SBERT(prompt))     per image, in [-1, 1]
    style FD        ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))       per image set, >= 0

Hand-written like the rest of diffdpo (no transformers / sentence-transformers): BERT's WordPiece tokenizer; BERT,
which is both Sentence-BERT's encoder (sentence-transformers/all-MiniLM-L6-v2) and BLIP's text decoder; BLIP's
captioner (Salesforce/blip-image-captioning-base / -large: a ViT, then the BERT decoder cross-attending to it,
greedy decoding from [DEC]). Modules are named after the checkpoints' keys, so weights load strictly.

Read top to bottom: CLIP, image preprocessing, OpenCLIP configs, WordPiece, BERT, Sentence-BERT, BLIP, the
text-alignment scorer, the Fréchet distance.
"""
import html
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import files
import unet
from tokenizer import CLIPTokenizer, read_merges

SBERT = "sentence-transformers/all-MiniLM-L6-v2"
BLIP = "Salesforce/blip-image-captioning-base"   # or Salesforce/blip-image-captioning-large
MODEL_FILES = ["*.json", "*.txt", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


# ----------------------------------------------------------------------------------------------------------------
# CLIP: the vision tower (transformers CLIPVisionTransformer) and the two towers with their projections (CLIPModel)


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768                      # transformers' defaults, for config.json files that leave keys out
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"              # OpenCLIP ViT-H: "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        return files.config_from_dict(cls, d)

    @classmethod
    def vit_h14(cls):  # PickScore's and HPSv2's image tower (OpenCLIP ViT-H/14, laion2B)
        return cls.from_dict(dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=16, patch_size=14, hidden_act="gelu", projection_dim=1024))

    @classmethod
    def vit_l14(cls):  # OpenAI CLIP ViT-L/14 (the aesthetic predictor's and CLIP score's)
        return cls.from_dict(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, patch_size=14, projection_dim=768))

    @classmethod
    def tiny(cls):
        return cls.from_dict(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=28, patch_size=14, projection_dim=16))


# the text towers that go with them (CLIPTextConfig of unet.py; eos_token_id 2 = pool at the argmax id, as OpenCLIP)
TEXT_H14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                hidden_act="gelu", projection_dim=1024, eos_token_id=2)
TEXT_L14 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, eos_token_id=2)
TEXT_DEFAULTS = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                     projection_dim=512)        # transformers' CLIPTextConfig defaults (ours are ViT-L's)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        p, n = cfg.patch_size, (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(n + 1, cfg.hidden_size)

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)                # (B, N, D), N = (S / p)^2
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)                # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight          # (B, 1 + N, D)


class CLIPVisionTransformer(nn.Module):
    """pixels (B, 3, S, S) -> pooled (B, D): patches + class token, pre-LN, non-causal layers, LN of the class token."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)   # sic: the checkpoints' spelling
        self.encoder = unet.CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        h = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h[:, 0])                                         # (B, D)


class CLIP(unet.CLIPText):
    """transformers CLIPModel: unet.py's text tower with its projection (text_model.*, text_projection), the vision
    tower (vision_model.*, visual_projection) and the learned temperature (logit_scale). Embeddings are unit-norm."""

    def __init__(self, text_cfg: unet.CLIPTextConfig, vision_cfg: CLIPVisionConfig):
        super().__init__(replace(text_cfg, with_projection=True))
        self.vision_cfg = vision_cfg
        self.vision_model = CLIPVisionTransformer(vision_cfg)
        self.visual_projection = nn.Linear(vision_cfg.hidden_size, vision_cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_dict(cls, d):
        """A transformers CLIPModel config.json (older files put overrides in text_config_dict/vision_config_dict)."""
        text = {**TEXT_DEFAULTS, **(d.get("text_config") or {}), **(d.get("text_config_dict") or {}),
                "projection_dim": d.get("projection_dim", 512)}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {}),
                  "projection_dim": d.get("projection_dim", 512)}
        text.pop("architectures", None)  # null in sub-configs; CLIP sets the projection itself
        return unet.CLIPTextConfig.from_dict(text), CLIPVisionConfig.from_dict(vision)

    def encode_text(self, ids):
        return F.normalize(self(ids)[2], dim=-1)                                    # (B, P)

    def encode_image(self, pixels):
        return F.normalize(self.visual_projection(self.vision_model(pixels)), dim=-1)  # (B, P)


SMALL_FILES = ["*.json", "*.txt"]  # configs, tokenizer and preprocessor files


def load_clip(folder, device="cpu", dtype=torch.float32):
    """A transformers CLIPModel folder: config.json + model.safetensors (or shards) -> CLIP, strict."""
    text_cfg, vision_cfg = CLIP.from_dict(files.read_json(Path(folder) / "config.json"))
    weights = files.read_safetensors(files.weight_files(folder, "model"), dtype)
    with torch.device("meta"):
        model = CLIP(text_cfg, vision_cfg)
    return unet.load_weights(model, weights, str(folder)).to(device=device, dtype=dtype).eval()


def tokenizer_folder(folder, fallback):
    """Tokenizer files in the model's folder, else the processor repo's (PickScore_v1 defers to laion's)."""
    return folder if (folder / "vocab.json").is_file() else files.model_folder(fallback, SMALL_FILES)


def clip_processor(folder, fallback=None):
    """CLIP's image preprocessing as the folder's preprocessor_config.json (or the fallback repo's) sets it."""
    f = folder / "preprocessor_config.json"
    if not f.is_file() and fallback:
        f = files.model_folder(fallback, SMALL_FILES) / "preprocessor_config.json"
    cfg = read_processor_config(f) if f.is_file() else {}
    return lambda images: clip_preprocess(images, **cfg)


def openclip_tokenizer(folder):
    """OpenCLIP's `tokenize` (HPSv2's), exactly: ftfy.fix_text, html-unescaped twice, white space collapsed,
    lower-cased, then the same BPE as CLIP: [sot] ids [eot], truncated to 77 keeping eot last, padded with 0 (the id
    of "!", a plain symbol here, unlike transformers' tokenizers that pad with "!"). ftfy (HPS only) repairs curly
    quotes, full-width forms and mojibake; without it the ids of some real prompts differ (12 of Parti's and
    DrawBench's 1,832: curly apostrophes). open_clip spells its special tokens <start_of_text> and <end_of_text>:
    a literal "<|endoftext|>" in a prompt is plain text."""
    try:
        import ftfy
    except ImportError:
        raise files.LoadError("hps: open_clip's tokenizer cleans prompts with ftfy.fix_text, which is not installed "
                              "(pip install ftfy)") from None
    vocab, merges = files.read_json(Path(folder) / "vocab.json"), read_merges(Path(folder) / "merges.txt")
    vocab.update({"<start_of_text>": vocab["<|startoftext|>"], "<end_of_text>": vocab["<|endoftext|>"]})
    tok = CLIPTokenizer(vocab, merges, pad_token="!", specials={"<start_of_text>": True, "<end_of_text>": True})
    clean = lambda p: " ".join(html.unescape(html.unescape(ftfy.fix_text(p))).split()).lower()  # noqa: E731
    return lambda prompts: tok([clean(p) for p in prompts])


def torch_load_weights(path):
    """A .pt / .pth state dict, read with weights_only=True; a missing or damaged file is one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise files.LoadError(f"{path}: file not found") from None
    except Exception as e:
        raise files.LoadError(f"{path}: not a readable PyTorch checkpoint ({files.first_line(e)})") from None


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing, as each scorer was trained with

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _normalize(arrays, mean, std):
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) float32: x / 255 (in float64, then float32), then (x - mean) / std."""
    x = torch.from_numpy(np.stack([(a.astype(np.float64) / 255).astype(np.float32) for a in arrays]))
    x = (x - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
    return x.permute(0, 3, 1, 2).contiguous()


def clip_preprocess(images, size=224, crop=224, mean=OPENAI_MEAN, std=OPENAI_STD):
    """transformers' CLIPImageProcessor (PIL backend): RGB; shortest side -> size with PIL bicubic, the long side
    int(size * long / short) (truncated, not rounded); center crop at floor((H - crop) / 2); /255; normalize."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new = (size, int(size * long / short))
        im = im.resize((new[0], new[1]) if w <= h else (new[1], new[0]), Image.BICUBIC)
        a = np.asarray(im)
        top, left = (a.shape[0] - crop) // 2, (a.shape[1] - crop) // 2
        out.append(a[top:top + crop, left:left + crop])
    return _normalize(out, mean, std)


def hps_preprocess(images, size=224, mean=OPENAI_MEAN, std=OPENAI_STD):
    """HPSv2's eval transform (open_clip `image_transform(..., resize_longest_max=True)`, its `light_augmentation`):
    to tensor in [0, 1]; longest side -> size by torchvision's tensor resize (bicubic, antialiased, float, unclamped)
    with the other side round(side * size / longest); zero-pad (black) to size x size, the extra pixel right/bottom;
    normalize. No crop, so nothing of a non-square image is lost. (As open_clip: an image whose longest side already
    equals `size` is neither resized nor padded.)"""
    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
        h, w = x.shape[1:]
        scale = size / max(h, w)
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
            ph, pw = size - nh, size - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        out.append(x)
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def read_processor_config(path):
    """size / crop / mean / std of a preprocessor_config.json (old files: ints, new ones: dicts)."""
    d = files.read_json(path)
    size, crop = d.get("size", 224), d.get("crop_size", 224)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = crop.get("height") if isinstance(crop, dict) else crop
    return dict(size=size, crop=crop, mean=tuple(d.get("image_mean", OPENAI_MEAN)),
                std=tuple(d.get("image_std", OPENAI_STD)))


# ----------------------------------------------------------------------------------------------------------------
# OpenCLIP configs (HPSv2's checkpoint; its key names are mapped by convert.openclip_to_ours)


def openclip_configs(d):
    """An OpenCLIP model config (ViT-H-14.json, or open_clip_config.json's `model_cfg`) -> (text, vision) configs.
    OpenCLIP ViTs use GELU unless `quick_gelu`; heads = width / head_width (64 by default) for the image tower."""
    d = d.get("model_cfg", d)
    v, t = d["vision_cfg"], d["text_cfg"]
    act = "quick_gelu" if d.get("quick_gelu") else "gelu"
    vision = CLIPVisionConfig.from_dict(dict(
        hidden_size=v["width"], intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
        image_size=v.get("image_size", 224), patch_size=v["patch_size"], hidden_act=act, projection_dim=d["embed_dim"]))
    text = unet.CLIPTextConfig.from_dict(dict(
        vocab_size=t.get("vocab_size", 49408), hidden_size=t["width"],
        intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)), num_hidden_layers=t["layers"],
        num_attention_heads=t.get("heads", 8), max_position_embeddings=t.get("context_length", 77), hidden_act=act,
        projection_dim=d["embed_dim"], eos_token_id=2))
    return text, vision


VIT_H_14 = dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
                text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24))  # open_clip's


# ----------------------------------------------------------------------------------------------------------------
# WordPiece: BertTokenizer (transformers 5, the `tokenizers` backend) in plain Python, ids identical:
#   1. special tokens ([CLS], [SEP], ...) are cut out of the raw text;
#   2. normalize (BertNormalizer): drop NUL, U+FFFD and control characters (categories C*, but \t \n \r count as
#      white space), white space -> " ", a space on each side of CJK ideographs, accents stripped (NFD, marks Mn
#      dropped; by default when lower-casing), lower-case character by character;
#   3. split on white space, and each punctuation character on its own (ASCII !-/ :-@ [-` {-~, Unicode P*);
#   4. each word: longest vocabulary piece first, later pieces prefixed "##"; a word of more than 100 characters, or
#      with a rest no piece matches, becomes one [UNK];
#   5. [CLS] ids [SEP], truncated to max_length keeping [SEP] last; a batch is padded with [PAD] to its longest row.

CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))   # the Rust normalizer's table (sic 0x2B920)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")      # BertTokenizer's, whatever the files say
WORD_CLEANUP = (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ",")   # the WordPiece decoder's, per token
TEXT_CLEANUP = WORD_CLEANUP + ((" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                               (" 're", "'re"))                  # clean_up_tokenization_spaces, on the whole text


def _is_cjk(c):
    return any(lo <= ord(c) <= hi for lo, hi in CJK)


def _is_punct(c):
    return (c.isascii() and not c.isalnum() and 32 < ord(c) < 127) or unicodedata.category(c).startswith("P")


def bert_normalize(text, lowercase=True, strip_accents=None, chinese=True):
    """Step 2 on one piece of text."""
    out = []
    for c in text:
        if c in "\t\n\r" or c.isspace() and not unicodedata.category(c).startswith("C"):
            out.append(" ")
        elif c not in "\0\ufffd" and not unicodedata.category(c).startswith("C"):
            out.append(f" {c} " if chinese and _is_cjk(c) else c)
    text = "".join(out)
    if lowercase if strip_accents is None else strip_accents:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return "".join(c.lower() for c in text) if lowercase else text


def bert_words(text):
    """Step 3: normalized text -> words."""
    words = []
    for chunk in text.split():
        word = ""
        for c in chunk:
            if _is_punct(c):
                words += [word, c] if word else [c]
                word = ""
            else:
                word += c
        words += [word] if word else []
    return words


class WordPiece:
    """`tok(texts) -> (ids, mask)`, LongTensors (B, L) padded to the longest row; `tok.decode(ids) -> str` as
    transformers' `decode(ids, skip_special_tokens=True)`. Built from a Hub tokenizer folder (from_folder)."""

    def __init__(self, vocab, specials=BERT_SPECIALS, max_length=512,
                 lowercase=True, strip_accents=None, chinese=True, max_word=100, cleanup=False):
        missing = [t for t in BERT_SPECIALS[:4] if t not in vocab]
        if missing:
            raise files.LoadError(f"WordPiece vocabulary: no {', '.join(missing)} (a BERT vocabulary expected)")
        self.vocab, self.max_length, self.max_word, self.cleanup = vocab, max_length, max_word, cleanup
        self.flags = dict(lowercase=lowercase, strip_accents=strip_accents, chinese=chinese)
        self.inverse = {i: t for t, i in vocab.items()}
        self.specials = {t for t in specials if t in vocab}
        self.special_re = re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len)[::-1])) + ")")
        self.pad, self.unk, self.cls, self.sep = (vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))

    @classmethod
    def from_folder(cls, folder, max_length=None):
        """tokenizer.json (vocabulary, added tokens, normalizer) when there is one, else vocab.txt and
        tokenizer_config.json; special tokens from both config files; max_length from model_max_length."""
        folder = Path(folder)
        read = lambda n: files.read_json(folder / n) if (folder / n).is_file() else {}  # noqa: E731
        fast, conf = read("tokenizer.json"), read("tokenizer_config.json")
        if fast:
            if (fast.get("model") or {}).get("type") != "WordPiece":
                raise files.LoadError(f"{folder / 'tokenizer.json'}: expected a WordPiece (BERT) tokenizer")
            vocab, norm = dict(fast["model"]["vocab"]), fast.get("normalizer") or {}
            flags = dict(lowercase=norm.get("lowercase", True), strip_accents=norm.get("strip_accents"),
                         chinese=norm.get("handle_chinese_chars", True),
                         max_word=fast["model"].get("max_input_chars_per_word", 100))
        elif (folder / "vocab.txt").is_file():
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
            vocab = {t: i for i, t in enumerate(lines[:-1] if lines[-1] == "" else lines)}
            flags = dict(lowercase=conf.get("do_lower_case", True), strip_accents=conf.get("strip_accents"),
                         chinese=conf.get("tokenize_chinese_chars", True))
        else:
            raise files.LoadError(f"{folder}: no tokenizer.json or vocab.txt (a BERT WordPiece tokenizer expected)")
        added = fast.get("added_tokens") or [{"content": t, "id": int(i), "special": True}
                                             for t, i in read("added_tokens.json").items()]
        vocab.update({t["content"]: t["id"] for t in added})
        named = []  # bos_token, ..., additional_special_tokens: strings, AddedToken dicts, lists or name -> token
        for d in (read("special_tokens_map.json"), conf):
            for k, v in d.items():
                if k.endswith("_token") or k in ("additional_special_tokens", "extra_special_tokens"):
                    named += list(v.values()) if isinstance(v, dict) and "content" not in v else \
                        v if isinstance(v, list) else [v]
        specials = {t["content"] for t in added if t.get("special")} | set(BERT_SPECIALS) | {
            t["content"] if isinstance(t, dict) else t for t in named if t}
        limit = max_length or conf.get("model_max_length", 512)
        return cls(vocab, specials, min(limit, 512), cleanup=conf.get("clean_up_tokenization_spaces", False),
                   **flags)

    def piece(self, word):
        """Step 4 on one word."""
        if len(word) > self.max_word:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:
                return [self.unk]
            ids.append(self.vocab[("##" if start else "") + word[start:end]])
            start = end
        return ids

    def encode(self, text):
        """One text -> [CLS] ... [SEP], not truncated."""
        ids = []
        for part in self.special_re.split(text) if self.specials else [text]:
            if part in self.specials:
                ids.append(self.vocab[part])
            else:
                ids += [i for w in bert_words(bert_normalize(part, **self.flags)) for i in self.piece(w)]
        return [self.cls] + ids + [self.sep]

    def __call__(self, texts):
        rows = [ids[:self.max_length - 1] + [self.sep] if len(ids) > self.max_length else ids
                for ids in map(self.encode, [texts] if isinstance(texts, str) else texts)]
        n = max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (n - len(r)) for r in rows])
        return ids, torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])

    def decode(self, ids):
        """The WordPiece decoder: special tokens skipped, "##x" glued to the word before, other tokens after a
        space, " ." " ?" " !" " ," glued back per token; the whole-text clean-up when the folder asks for it."""
        tokens = [t for t in map(self.inverse.get, ids) if t is not None and t not in self.specials]
        out = []
        for k, t in enumerate(tokens):
            t = t[2:] if k and t.startswith("##") else (" " + t if k else t)
            for a, b in WORD_CLEANUP:
                t = t.replace(a, b)
            out.append(t)
        text = "".join(out)
        for a, b in TEXT_CLEANUP if self.cleanup else ():
            text = text.replace(a, b)
        return text


# ----------------------------------------------------------------------------------------------------------------
# BERT: post-LN layers (self-attention, then, in a decoder, cross-attention to image features, then the MLP), each
# sublayer `LayerNorm(x + dense(f(x)))`. Sentence-BERT's encoder (bidirectional, padding masked) and BLIP's text
# decoder (causal, cross-attending) are the same modules.


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2                 # token-type embeddings (BERT); 0: none (BLIP's decoder)
    layer_norm_eps: float = 1e-12
    encoder_hidden_size: int = 0             # > 0: decoder layers cross-attend to image features of this width
    position_embedding_type: str = "absolute"
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d):
        cfg = files.config_from_dict(cls, d)
        if cfg.hidden_act != "gelu" or cfg.position_embedding_type != "absolute":
            raise files.LoadError(f"BERT config: hidden_act={cfg.hidden_act!r}, position_embedding_type="
                                  f"{cfg.position_embedding_type!r}; expected 'gelu' and 'absolute'")
        return cfg

    @classmethod
    def minilm_l6(cls):  # sentence-transformers/all-MiniLM-L6-v2
        return cls.from_dict(dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1536))


class BertSelfAttention(nn.Module):
    def __init__(self, d, heads, kv_dim=None):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(kv_dim or d, d), nn.Linear(kv_dim or d, d)

    def forward(self, x, kv=None, mask=None, causal=False):
        """kv: precomputed (key, value) of the image features (cross-attention), else self-attention on x."""
        k, v = kv if kv is not None else (self.key(x), self.value(x))
        return unet.attention(self.query(x), k, v, self.heads, causal, mask)


class DenseNorm(nn.Module):
    """`LayerNorm(residual + dense(h))`: BERT's attention.output and output."""

    def __init__(self, d_in, d, eps):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, d), nn.LayerNorm(d, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, cfg, kv_dim=None):
        super().__init__()
        self.self = BertSelfAttention(cfg.hidden_size, cfg.num_attention_heads, kv_dim)
        self.output = DenseNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, **kw):
        return self.output(self.self(x, **kw), x)


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        if cfg.encoder_hidden_size:
            self.crossattention = BertAttention(cfg, kv_dim=cfg.encoder_hidden_size)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = DenseNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x, mask=None, causal=False, image_kv=None):
        x = self.attention(x, mask=mask, causal=causal)
        if image_kv is not None:
            x = self.crossattention(x, kv=image_kv)
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.type_vocab_size:
            self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        h = self.word_embeddings(ids) + self.position_embeddings.weight[:ids.shape[1]]   # (B, L, D)
        if hasattr(self, "token_type_embeddings"):
            h = h + self.token_type_embeddings.weight[0]                                   # one segment: type 0
        return self.LayerNorm(h)


class Bert(nn.Module):
    """transformers BertModel (embeddings.*, encoder.layer.N.*, pooler.* when the checkpoint has one).
    forward(ids (B, L), mask (B, L) of 1/0 or None, image_kv) -> last hidden states (B, L, D); image_kv: per layer
    the (key, value) of the image states, (B, N, D) each, for BLIP's decoder (then causal), else None."""

    def __init__(self, cfg: BertConfig, pooler=False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        if pooler:  # loaded for strictness, unused: Sentence-BERT pools by averaging
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, ids, mask=None, image_kv=None):
        keep = None if mask is None else mask.bool()[:, None, None, :]                 # (B, 1, 1, L)
        h = self.embeddings(ids)
        for layer, kv in zip(self.encoder.layer, image_kv or [None] * len(self.encoder.layer)):
            h = layer(h, mask=keep, causal=image_kv is not None, image_kv=kv)
        return h


def read_weights(folder, rename=lambda k: k):
    """The folder's model.safetensors (or its shards) as float32, keys renamed."""
    return {rename(k): v for k, v in files.read_safetensors(files.weight_files(folder, "model"), torch.float32).items()}


# ----------------------------------------------------------------------------------------------------------------
# Sentence-BERT (Reimers & Gurevych 2019), the all-MiniLM-L6-v2 layout: BERT, then the mean of the token states over
# the attention mask, then L2 normalization. e = normalize(sum_t m_t h_t / sum_t m_t).


class SentenceEncoder:
    """encoder(texts: list[str]) -> (N, D) float32 unit vectors, in batches."""

    def __init__(self, bert, tokenizer, batch_size=32):
        self.bert, self.tokenizer, self.batch_size = bert, tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, texts):
        device, out = next(self.bert.parameters()).device, []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = (t.to(device) for t in self.tokenizer([t.strip() for t in texts[i:i + self.batch_size]]))
            h = self.bert(ids, mask).float()                                             # (B, L, D)
            m = mask[..., None].float()
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))  # (B, D)
        return torch.cat(out).cpu() if out else torch.zeros(0, self.bert.cfg.hidden_size)


def load_sentence_encoder(model=SBERT, device="cpu", dtype=torch.float32, batch_size=32):
    """A sentence-transformers folder (or Hub id): config.json + model.safetensors (BertModel), tokenizer files,
    sentence_bert_config.json (max_seq_length), a mean-pooling module (1_Pooling/config.json, or as modules.json
    says). -> SentenceEncoder."""
    folder = files.model_folder(model, MODEL_FILES)
    modules = files.read_json(folder / "modules.json") if (folder / "modules.json").is_file() else []
    pool = next((m["path"] for m in modules if m.get("type", "").endswith("Pooling")), "1_Pooling")
    d = files.read_json(folder / pool / "config.json") if (folder / pool / "config.json").is_file() else {}
    mode = {d["pooling_mode"]} if "pooling_mode" in d else {k for k, v in d.items() if k.startswith("pooling_mode_")
                                                            and v is True}   # sentence-transformers >= 6 / older
    if d and mode not in ({"mean"}, {"pooling_mode_mean_tokens"}):
        raise files.LoadError(f"{folder / pool / 'config.json'}: pooling {sorted(mode)}; expected mean pooling only")
    st = folder / "sentence_bert_config.json"
    max_length = files.read_json(st).get("max_seq_length") if st.is_file() else None
    cfg = BertConfig.from_dict(files.read_json(folder / "config.json"))
    sd = read_weights(folder, lambda k: k[len("bert."):] if k.startswith("bert.") else k)
    with torch.device("meta"):
        bert = Bert(cfg, pooler=any(k.startswith("pooler.") for k in sd))
    bert = unet.load_weights(bert, sd, str(folder)).to(device=device, dtype=dtype).eval()
    return SentenceEncoder(bert, WordPiece.from_folder(folder, max_length), batch_size)


# ----------------------------------------------------------------------------------------------------------------
# BLIP captioning (Li et al. 2022), transformers' BlipForConditionalGeneration: a ViT (pre-LN layers, fused qkv) turns
# the 384 x 384 image into (1 + 24 * 24) states; the BERT decoder cross-attends to all of them and writes the caption
# token by token, greedily, from [DEC] until [SEP]. Its images are normalized with OpenAI CLIP's mean and std.


@dataclass
class BlipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 384
    patch_size: int = 16
    layer_norm_eps: float = 1e-5
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def base(cls):  # blip-image-captioning-base: ViT-B/16
        return files.config_from_dict(cls, {})

    @classmethod
    def large(cls):  # blip-image-captioning-large: ViT-L/16
        return files.config_from_dict(cls, dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16))


def blip_configs(d):
    """A BlipConfig config.json -> (text, vision) configs, with transformers' defaults for keys left out (the text
    decoder: 8 heads, vocabulary 30524); the decoder cross-attends at the ViT's width; no token types."""
    vision = files.config_from_dict(BlipVisionConfig, d.get("vision_config") or {})
    text = {"vocab_size": 30524, "num_attention_heads": 8, **(d.get("text_config") or {})}
    return BertConfig.from_dict({**text, "type_vocab_size": 0, "encoder_hidden_size": vision.hidden_size}), vision


class BlipVisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, (cfg.image_size // p) ** 2 + 1, d))

    def forward(self, pixels):
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)                 # (B, N, D), N = (S / p)^2
        cls = self.class_embedding.expand(len(x), -1, -1)                            # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding                  # (B, 1 + N, D)


class BlipAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.projection = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)                                       # (B, L, D) each
        return self.projection(unet.attention(q, k, v, self.heads))


class BlipEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = BlipAttention(d, cfg.num_attention_heads)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.mlp = unet.CLIPMLP(d, cfg.intermediate_size, "gelu")

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class BlipVisionModel(nn.Module):
    """pixels (B, 3, S, S) -> states (B, 1 + N, D) after the final LayerNorm."""

    def __init__(self, cfg: BlipVisionConfig):
        super().__init__()
        self.embeddings = BlipVisionEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([BlipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        h = self.embeddings(pixels)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)


class BlipLMHead(nn.Module):
    """text_decoder.cls.predictions: next-token logits = decoder(LayerNorm(gelu(dense(h)))); decoder.weight is tied
    to the word embeddings and decoder.bias to `bias` (see TIED)."""

    def __init__(self, cfg):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h):
        return self.decoder(self.transform.LayerNorm(F.gelu(self.transform.dense(h))))   # (..., V)


TIED = {"text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
        "text_decoder.cls.predictions.bias": "text_decoder.cls.predictions.decoder.bias"}  # key: where to find it


class Blip(nn.Module):
    """BlipForConditionalGeneration: vision_model.*, text_decoder.bert.*, text_decoder.cls.predictions.*."""

    def __init__(self, text_cfg: BertConfig, vision_cfg: BlipVisionConfig):
        super().__init__()
        ids = {k: text_cfg.raw.get(k + "_token_id", v) for k, v in (("bos", 30522), ("sep", 102), ("pad", 0))}
        self.bos, self.sep, self.pad = ids["bos"], ids["sep"], ids["pad"]   # [DEC] starts, [SEP] ends a caption
        self.vision_model = BlipVisionModel(vision_cfg)
        self.text_decoder = nn.Module()
        self.text_decoder.bert = Bert(text_cfg)
        self.text_decoder.cls = nn.Module()
        self.text_decoder.cls.predictions = BlipLMHead(text_cfg)

    @torch.no_grad()
    def generate(self, pixels, max_new_tokens=30):
        """Greedy decoding as `generate(num_beams=1, do_sample=False, max_new_tokens=...)`: from [DEC], the most
        likely next token each step; a row that wrote [SEP] gets [PAD] from then on; stop once every row has.
        The image's cross-attention keys and values are computed once. -> ids (B, 1 + T)."""
        image = self.vision_model(pixels)                                            # (B, 1 + N, E)
        layers = self.text_decoder.bert.encoder.layer
        image_kv = [(l.crossattention.self.key(image), l.crossattention.self.value(image)) for l in layers]
        ids = torch.full((len(pixels), 1), self.bos, device=pixels.device)
        done = torch.zeros(len(pixels), dtype=torch.bool, device=pixels.device)
        for _ in range(max_new_tokens):
            h = self.text_decoder.bert(ids, image_kv=image_kv)[:, -1]                # (B, D)
            token = self.text_decoder.cls.predictions(h).argmax(-1)                  # (B,)
            token = torch.where(done, torch.full_like(token, self.pad), token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= token == self.sep
            if done.all():
                break
        return ids


def blip_preprocess(images, size=384, mean=OPENAI_MEAN, std=OPENAI_STD):
    """BlipImageProcessor (PIL backend): RGB; resized to size x size with PIL bicubic (the aspect ratio is not kept,
    nothing is cropped); x / 255 (in float64, then float32); (x - mean) / std. -> (B, 3, size, size)."""
    return _normalize([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images], mean, std)


class Captioner:
    """captioner(images: list[PIL.Image]) -> list[str] in batches, decoded as decode(ids, skip_special_tokens=True)."""

    def __init__(self, blip, tokenizer, processor, max_new_tokens=30, batch_size=8):
        self.blip, self.tokenizer, self.processor = blip, tokenizer, processor
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, images):
        p = next(self.blip.parameters())
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = blip_preprocess(images[i:i + self.batch_size], **self.processor).to(p.device, p.dtype)
            out += [self.tokenizer.decode(row.tolist()) for row in self.blip.generate(pixels, self.max_new_tokens)]
        return out


def load_captioner(model=BLIP, device="cpu", dtype=torch.float32, max_new_tokens=30, batch_size=8):
    """A BLIP captioning folder (or Hub id) as on the Hub: config.json, model.safetensors, tokenizer files,
    preprocessor_config.json (size, image_mean, image_std). -> Captioner."""
    folder = files.model_folder(model, MODEL_FILES)
    text_cfg, vision_cfg = blip_configs(files.read_json(folder / "config.json"))
    sd = read_weights(folder)
    for key, source in TIED.items():
        if key not in sd and source in sd:
            sd[key] = sd[source]
    with torch.device("meta"):
        blip = Blip(text_cfg, vision_cfg)
    blip = unet.load_weights(blip, sd, str(folder)).to(device=device, dtype=dtype).eval()
    names = ("preprocessor_config.json", "processor_config.json")   # the Hub's / transformers 5 save_pretrained's
    d = next((files.read_json(folder / n) for n in names if (folder / n).is_file()), {})
    d = d.get("image_processor", d)
    size = d.get("size", vision_cfg.image_size)
    processor = dict(size=size["height"] if isinstance(size, dict) else size,
                     mean=tuple(d.get("image_mean", OPENAI_MEAN)), std=tuple(d.get("image_std", OPENAI_STD)))
    return Captioner(blip, WordPiece.from_folder(folder), processor, max_new_tokens, batch_size)


# ----------------------------------------------------------------------------------------------------------------
# The text-alignment scorer and the Fréchet distance


class TextAlignment:
    """scorer(images, prompts) -> (N,) cos(SBERT(BLIP caption), SBERT(prompt)); the last captions in .captions."""

    def __init__(self, captioner, encoder):
        self.captioner, self.encoder, self.captions = captioner, encoder, []

    def __call__(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        self.captions = self.captioner(images)
        return (self.encoder(self.captions) * self.encoder(list(prompts))).sum(-1).cpu()


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets a (N, D), b (M, D) (FID's formula, Heusel et al.
    2017), in float64:
        d = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2))
    S_a S_b is similar to sqrt(S_a) S_b sqrt(S_a), a symmetric PSD matrix, so the trace of its square root is the sum
    of the square roots of that matrix's eigenvalues: no complex sqrtm, and finite for any N, M >= 2 (singular
    covariances, N < D, included). Covariances are unbiased (1 / (N - 1)), as np.cov."""
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (N, D), (M, D) with N, M >= 2, got {tuple(a.shape)}, {tuple(b.shape)}")
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)                                        # (D, D)
    w, q = torch.linalg.eigh(s_a)
    root_a = (q * w.clamp(min=0).sqrt()) @ q.T                                       # sqrt(S_a)
    m = root_a @ s_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt)
