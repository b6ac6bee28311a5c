"""
Evaluation: does the tuned model beat its base? Images of both from the same seeds, scored by the reward models the
papers report, with win rates and bootstrap intervals.

    python eval.py --model sd15 --unet runs/dpo-sd15/unet --prompts parti --out eval/ \
                   --scorers pickscore,hps,aesthetic,clip
    python eval.py --model sd15 --unet RUN/unet --prompts drawbench --scorers aesthetic,hps,text-alignment
                                                     # the Diffusion-DPO paper's DrawBench table beside ours

Scorers, each `load_scorer(name)(images, prompts) -> (N,) scores`, hand-written (no transformers, open_clip,
sentence-transformers or the scorers' own packages):
    pickscore  PickScore v1 (Kirstain et al. 2023)      logit_scale.exp() * cos(image, text)   CLIP ViT-H/14
    hps        HPSv2.1 (Wu et al. 2023)                 cos(image, text)  (tables print x100)  OpenCLIP ViT-H/14
    aesthetic  LAION improved aesthetic predictor v2    MLP(normalized image embedding)        CLIP ViT-L/14
    clip       CLIP score (Hessel et al. 2021)          100 * max(cos(image, text), 0)         CLIP ViT-L/14
    text-alignment  "Text Alignment (SentenceBERT)" of the Diffusion-DPO paper's DrawBench results:
                    cos(SBERT(BLIP's caption), SBERT(prompt)) (scorer_nets.py)
Prompt sets: parti, drawbench, hps (hps:anime ...), pickapic, or a local file (.txt .tsv .csv .json .parquet).
--style-ref FOLDER adds the style FD (scorer_nets.frechet_distance) of base and tuned images to the reference images.

Read top to bottom: the scores' formulas and the scorer, their loaders, prompt sets, win rates with the bootstrap, the
toy world's evaluation, the report and the CLI. The networks (CLIP, BLIP, BERT) are in scorer_nets.py.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import sample
import toy
import unet
from convert import openclip_to_ours
from mmdit import load_pipeline, load_tuned, weights_folder
from files import DTYPES, DataError, LoadError, UserError, first_line, hub_download, model_folder, read_json, \
    write_text_atomic
from sample import fail
from scorer_nets import (BLIP, CLIP, SBERT, SMALL_FILES, VIT_H_14, TextAlignment, clip_processor, frechet_distance,
                         hps_preprocess, load_captioner, load_clip, load_sentence_encoder, openclip_configs,
                         openclip_tokenizer, tokenizer_folder, torch_load_weights)
from shards import PROMPT_FILES, read_prompts
from tokenizer import MAX_PROMPT_CHARS, CLIPTokenizer

# ----------------------------------------------------------------------------------------------------------------
# Scores: the formulas, then the scorer that runs them in batches


def pickscore(image_emb, text_emb, logit_scale):
    """PickScore (Kirstain et al. 2023): s = exp(logit_scale) * <e_image, e_text> with unit-norm embeddings (~21)."""
    return logit_scale.exp() * (image_emb * text_emb).sum(-1)


def hps(image_emb, text_emb):
    """HPSv2 (Wu et al. 2023): s = <e_image, e_text>, unit-norm embeddings (~0.28; its tables print 100 s)."""
    return (image_emb * text_emb).sum(-1)


def clip_score(image_emb, text_emb):
    """CLIP score: 100 * max(cos, 0) per image (torchmetrics' scale; Hessel et al. 2021 use w = 2.5, and
    torchmetrics clamps the mean rather than each image: equal unless a cosine is negative)."""
    return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)


class AestheticMLP(nn.Module):
    """LAION's improved aesthetic predictor v2: a linear stack 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations;
    the training dropouts sit at the odd indices, so the keys are layers.0/2/4/6/7) on the unit-norm CLIP ViT-L/14
    image embedding; scores ~1-10."""

    def __init__(self, dim=768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(),
                                    nn.Linear(128, 64), nn.Identity(), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb):
        return self.layers(emb).squeeze(-1)


class Scorer:
    """scorer(images: list[PIL.Image], prompts: list[str]) -> (N,) float32 scores, run in batches."""

    def __init__(self, name, clip, preprocess, tokenizer=None, head=None, device="cpu", batch_size=16):
        self.name, self.clip, self.preprocess, self.tokenizer, self.head = name, clip, preprocess, tokenizer, head
        self.device, self.batch_size = device, batch_size

    def _embed(self, images):
        return self.clip.encode_image(self.preprocess(images).to(self.device, next(self.clip.parameters()).dtype))

    @torch.no_grad()
    def image_features(self, images):
        """(N, P) unit-norm image embeddings, in batches: the style FD's features."""
        n = self.batch_size
        return torch.cat([self._embed(images[i:i + n]).float().cpu() for i in range(0, len(images), n)])

    @torch.no_grad()
    def __call__(self, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        out = []
        for i in range(0, len(images), self.batch_size):
            img = self._embed(images[i:i + self.batch_size]).float()
            if self.name == "aesthetic":
                out.append(self.head(img))
                continue
            txt = self.clip.encode_text(self.tokenizer(list(prompts[i:i + self.batch_size])).to(self.device)).float()
            out.append(pickscore(img, txt, self.clip.logit_scale.float()) if self.name == "pickscore" else
                       hps(img, txt) if self.name == "hps" else clip_score(img, txt))
        return torch.cat(out).cpu() if out else torch.zeros(0)


def to_pil(x):
    """A (3, H, W) image tensor in [-1, 1] (the trainer's) -> 8-bit RGB PIL, as if it had been saved and reloaded."""
    return Image.fromarray(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def relabeller(spec, device="cpu"):
    """AI feedback for training (diffdpo.py --choice-model, as the official code's --choice_model): a function
    (caption, [image_a, image_b] as (3, R, R) tensors in [-1, 1]) -> the two reordered [preferred, rejected] by the
    scorer, or None when it ties them (the pair is then skipped). spec: NAME or NAME=PATH (a local scorer model)."""
    name, _, path = spec.partition("=")
    scorer = load_scorer(name, path or None, device=device)

    def relabel(caption, pair):
        a, b = scorer([to_pil(x) for x in pair], [caption, caption]).tolist()
        return None if a == b else (pair if a > b else pair[::-1])
    return relabel


# ----------------------------------------------------------------------------------------------------------------
# Loading: Hub ids or local folders/files; one-line LoadErrors

PICKSCORE, PICKSCORE_PROCESSOR = "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
CLIP_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_REPO, AESTHETIC_FILE = "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"
SCORERS = ("pickscore", "hps", "aesthetic", "clip", "text-alignment", "judge")  # judge: the toy's (toy.judge)
CLIP_FILES = SMALL_FILES + ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


def load_scorer(name, model=None, device="cpu", dtype=torch.float32, batch_size=16, captioner=None):
    """A reward model by name (see the module docstring). `model` overrides where its weights come from:
      pickscore  a Hub id or a CLIPModel folder (config.json, model.safetensors; tokenizer and preprocessor files
                 beside them, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K's).    default yuvalkirstain/PickScore_v1
      clip       the same.                                                     default openai/clip-vit-large-patch14
      hps        an OpenCLIP checkpoint .pt (a state dict or {"state_dict": ...}), or its folder; beside it an
                 open_clip model config (open_clip_config.json or config.json; default ViT-H-14) and tokenizer files
                 (default laion's).                                   default xswu/HPSv2 file HPS_v2.1_compressed.pt
      aesthetic  a CLIPModel folder (ViT-L/14) with the MLP's .pth beside, or a Hub id of the CLIP.
                 default openai/clip-vit-large-patch14 + camenduru/improved-aesthetic-predictor's MLP
      text-alignment  a sentence-transformers folder or Hub id; `captioner`: a BLIP captioning folder or Hub id.
                 default sentence-transformers/all-MiniLM-L6-v2 + Salesforce/blip-image-captioning-base"""
    if name not in SCORERS:
        raise unet.LoadError(f"unknown scorer {name!r}: expected one of {', '.join(SCORERS)}")
    if name == "text-alignment":  # cos(SBERT(BLIP's caption), SBERT(prompt))
        return TextAlignment(load_captioner(captioner or BLIP, device, dtype),
                             load_sentence_encoder(model or SBERT, device, dtype))
    if name == "judge":  # the toy world's programmatic judge: captions of the shapes world only
        return lambda images, prompts: torch.tensor([toy.judge(i, p) for i, p in zip(images, prompts)])
    if name in ("pickscore", "clip"):
        folder = model_folder(model or (PICKSCORE if name == "pickscore" else CLIP_L14), CLIP_FILES)
        tok = CLIPTokenizer.from_folder(tokenizer_folder(folder, PICKSCORE_PROCESSOR))
        return Scorer(name, load_clip(folder, device, dtype), clip_processor(folder, PICKSCORE_PROCESSOR), tok,
                      device=device, batch_size=batch_size)
    if name == "aesthetic":
        folder = model_folder(model or CLIP_L14, CLIP_FILES + ["*.pth"])
        heads = sorted(folder.glob("*.pth"))
        head_file = heads[0] if heads else hub_download(AESTHETIC_REPO, filename=AESTHETIC_FILE)
        clip = load_clip(folder, device, dtype)
        mlp = AestheticMLP(clip.vision_cfg.projection_dim)
        head = unet.load_weights(mlp, torch_load_weights(head_file), str(head_file))
        return Scorer(name, clip, clip_processor(folder), head=head.to(device).eval(), device=device,
                      batch_size=batch_size)
    path = Path(model) if model else hub_download(HPS_REPO, filename=HPS_FILE)
    if path.is_dir():
        pts = sorted(path.glob("*.pt"))
        if not pts:
            raise LoadError(f"{path}: no .pt checkpoint in this folder")
        path = pts[0]
    cfg_files = [f for f in (path.parent / "open_clip_config.json", path.parent / "config.json") if f.is_file()]
    text_cfg, vision_cfg = openclip_configs(read_json(cfg_files[0]) if cfg_files else VIT_H_14)
    weights = torch_load_weights(path)
    weights = openclip_to_ours(weights.get("state_dict", weights))
    with torch.device("meta"):
        clip = CLIP(text_cfg, vision_cfg)
    clip = unet.load_weights(clip, {k: v.to(dtype) for k, v in weights.items()}, str(path)).to(device=device,
                                                                                                   dtype=dtype)
    size = vision_cfg.image_size
    return Scorer(name, clip.eval(), lambda images: hps_preprocess(images, size),
                  openclip_tokenizer(tokenizer_folder(path.parent, PICKSCORE_PROCESSOR)), device=device,
                  batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------------
# Prompt sets: the benchmarks' files, parsed in their own formats (shards.read_prompts) from a local path or the HF
# cache

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
PROMPT_SETS = {  # name: (dataset repo, files to fetch)
    "parti": ("nateraw/parti-prompts", ["*.parquet", "*.tsv", "*.csv"]),                           # 1,632
    "drawbench": ("sayakpaul/drawbench", ["*.parquet", "*.tsv", "*.csv"]),                        # 200
    "pickapic": ("yuvalkirstain/pickapic_v2_no_images", ["*test_unique*.parquet", "*test_unique/*.parquet"]),
    "hps": ("zhwang/HPDv2", [f"benchmark/{s}.json" for s in HPS_STYLES]),                        # 4 x 800
}
def prompt_set(spec):
    """A list of prompts. Names: parti (PartiPrompts, 1,632), drawbench (200), hps (HPSv2's benchmark: anime,
    concept-art, paintings, photo, 800 each; hps:STYLE for one), pickapic (Pick-a-Pic v2 test_unique captions,
    deduplicated in order, blank ones dropped), shapes (the toy world's held-out captions); from the HF cache when
    HF_HUB_OFFLINE=1, read by read_prompts like local files. Or a path: a prompt file (read_prompts) or a folder of
    HPS style files."""
    name, _, style = spec.partition(":")
    if spec == "shapes":  # the toy world's 18 held-out captions
        return toy.shape_prompts("test")
    if name in PROMPT_SETS and (not style or name == "hps" and style in HPS_STYLES):
        repo, patterns = PROMPT_SETS[name]
        folder = hub_download(repo, [f"benchmark/{style}.json"] if style else patterns, repo_type="dataset")
        if name == "hps":
            return [p for s in ([style] if style else HPS_STYLES) for p in read_prompts(folder / f"benchmark/{s}.json")]
        found = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".tsv", ".csv"))
        found = [f for f in found if f.suffix == ".parquet"] or found
        if not found:
            raise LoadError(f"prompt set {name!r}: dataset {repo!r} has no parquet/tsv/csv files")
        prompts = [p for f in found for p in read_prompts(f)]
        return list(dict.fromkeys(p for p in prompts if p and p.strip())) if name == "pickapic" else prompts
    path = Path(spec)
    if path.is_dir():
        found = [f for s in HPS_STYLES for f in (path / f"{s}.json", path / "benchmark" / f"{s}.json") if f.is_file()]
        if not found:
            raise LoadError(f"{path}: no HPSv2 benchmark files here (expected {', '.join(HPS_STYLES)}.json)")
        return [p for f in found for p in read_prompts(f)]
    if path.suffix not in PROMPT_FILES:
        raise LoadError(f"prompt set {spec!r}: expected one of {', '.join(PROMPT_SETS)}, hps:STYLE "
                              f"({'|'.join(HPS_STYLES)}), shapes, a prompt file ({' '.join(PROMPT_FILES)}) or a "
                              f"folder of HPS style .json files")
    return read_prompts(path)


def check_prompts(prompts, scorers, where):
    """Every prompt, before any image is generated: text, not blank, at most MAX_PROMPT_CHARS characters, and one
    the scorers can read (the toy judge scores only its world's captions). A bad one is a LoadError naming it."""
    for i, p in enumerate(prompts, 1):
        what = f"{where}: prompt {i}"
        if not isinstance(p, str):
            raise LoadError(f"{what} is {type(p).__name__}, not text")
        if not p.strip():
            raise LoadError(f"{what} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise LoadError(f"{what} has {len(p):,} characters, more than {MAX_PROMPT_CHARS:,} (the text encoders read "
                            f"77 tokens): is this the right file?")
        if "judge" in scorers:
            try:
                toy.parse_shape_prompt(p)
            except DataError as e:
                raise LoadError(f"{what}: {first_line(e)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Win rate with a bootstrap interval


def win_outcomes(tuned_scores, base_scores):
    """Per prompt, 1 if the tuned image scores higher, 0.5 on a tie, 0 if lower; their mean is the win rate."""
    tuned, base = np.asarray(tuned_scores, dtype=np.float64), np.asarray(base_scores, dtype=np.float64)
    if tuned.shape != base.shape or tuned.ndim != 1 or not len(tuned):
        raise ValueError(f"need two equal-length non-empty score lists, got {tuned.shape} and {base.shape}")
    return (tuned > base) + 0.5 * (tuned == base)                                   # (N,) in {0, 0.5, 1}


def bootstrap_win_rate(tuned_scores, base_scores, n=1000, seed=0):
    """(win rate, lo, hi): the 2.5 and 97.5 percentiles of the win rate over n resamples of the prompts (with
    replacement; a prompt's tuned and base scores stay paired)."""
    outcome = win_outcomes(tuned_scores, base_scores)
    idx = np.random.default_rng(seed).integers(0, len(outcome), size=(n, len(outcome)))
    rates = outcome[idx].mean(axis=1)                                               # (n,)
    lo, hi = np.percentile(rates, [2.5, 97.5])
    return float(outcome.mean()), float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------------
# The toy worlds' evaluation (diffdpo.py runs it after training on one): base vs tuned on the held-out captions

TOY_SEEDS = 8             # held-out images per test caption, the same seeds for base and tuned
JUDGES = {"shapes": "judge score (the share of the image in the caption's shape color",
          "shapes-style": "style score (ink-print pixels, times the share of a paper border"}


def evaluate_toy(model, world, out, run, t_start):
    """Base (`model`) vs tuned (OUT/unet, or OUT's LoRA) on a toy world's 18 held-out captions x TOY_SEEDS seeds under
    its judge (shapes: toy.judge; shapes-style: toy.style_judge). Writes OUT/summary.json (`run` + the win rate of
    tuned over base, ties half; mean judge scores; for shapes-style also style_score_* (= judge_score_*) and
    style_fd_*, the style FD to styled base images of other seeds; seconds since t_start, so the whole run) and
    OUT/compare.png (one image per held-out caption: base above, tuned below); a run evaluated at these steps
    already is not evaluated again."""
    out = Path(out)
    if (out / "summary.json").is_file() and read_json(out / "summary.json").get("steps") == run["steps"]:
        print(f"{out / 'summary.json'} already evaluates step {run['steps']}")
        return read_json(out / "summary.json")
    sd, weights = load_pipeline(model), out / weights_folder(model)
    tuned = load_tuned(sd, weights) if weights.is_dir() else load_pipeline(model, lora=out).unet
    prompts = [p for p in toy.shape_prompts("test") for _ in range(TOY_SEEDS)]
    seeds = list(range(len(prompts)))
    images = {label: sample.render(sd, net, prompts, seeds, batch_size=256, desc=f"evaluating {label}",
                                   **sample.TOY_SAMPLING) for label, net in (("base", sd.unet), ("tuned", tuned))}
    judge = toy.style_judge if world == "shapes-style" else toy.judge
    scores = {label: [judge(i, p) for i, p in zip(ims, prompts)] for label, ims in images.items()}
    summary = dict(run, win_rate_vs_base=float(win_outcomes(scores["tuned"], scores["base"]).mean()),
                   judge_score_base=float(np.mean(scores["base"])), judge_score_tuned=float(np.mean(scores["tuned"])),
                   num_images=len(prompts))
    if world == "shapes-style":
        others = sample.render(sd, sd.unet, prompts, [len(seeds) + s for s in seeds], batch_size=256,
                               **sample.TOY_SAMPLING)                 # the style set: held-out seeds, styled
        fd = style_fd([toy.style_edit(i, p) for i, p in zip(others, prompts)], images, toy=True)
        summary.update(style_score_base=summary["judge_score_base"], style_score_tuned=summary["judge_score_tuned"],
                       style_fd_base=fd["base"], style_fd_tuned=fd["tuned"], style_fd_features=fd["features"])
    summary["seconds"] = round(time.time() - t_start, 1)
    labels = [f"{label} {summary[f'judge_score_{label}']:.3f}" for label in images]
    sample.image_grid([ims[::TOY_SEEDS] for ims in images.values()], labels,
                      toy.shape_prompts("test")).save(out / "compare.png")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    what = JUDGES[world]
    print(f"held-out {what}; higher is better): base {summary['judge_score_base']:.3f}, tuned "
          f"{summary['judge_score_tuned']:.3f}\ntuned beats base on "
          f"{100 * summary['win_rate_vs_base']:.1f}% of {len(prompts)} held-out images (50% would be no change); "
          f"see {out / 'compare.png'} (base above, tuned below) and {out / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------------------------------------------
# CLI: generate base and tuned images from the same seeds, score both, report

LABELS = {"pickscore": "PickScore", "hps": "HPSv2.1 (x100)", "aesthetic": "Aesthetic", "clip": "CLIP score",
          "text-alignment": "Text alignment (SBERT)", "judge": "Toy judge"}


PAPER_TABLE = {"aesthetic": (5.6205, 6.043), "hps": (0.2672, 0.2814), "text-alignment": (0.6075, 0.572)}
# the Diffusion-DPO paper's DrawBench results for SD1.5 (DPO) and LCM (DPO), as Papers With Code lists them, shown
# beside ours to compare


def report_markdown(report):
    """The paper's table shape: one row per scorer, the two models' mean scores, the tuned model's win rate and the
    Diffusion-DPO paper's DrawBench numbers; the style FD below it when there is one."""
    rows = ["| Scorer | Base | Tuned | Tuned wins (95% bootstrap CI) | Paper: SD1.5 (DPO) | Paper: LCM (DPO) |",
            "|---" * 6 + "|"]
    for name, r in report["scorers"].items():
        k = 100 if name == "hps" else 1
        paper = " | ".join(f"{k * v:.4f}" for v in PAPER_TABLE.get(name, ())) or "- | -"
        rows.append(f"| {LABELS[name]} | {k * r['base_mean']:.4f} | {k * r['tuned_mean']:.4f} | "
                    f"{win_text(r['win_rate'], r['win_lo'], r['win_hi'], report['n'])} | {paper} |")
    a, fd = report["args"], report.get("style_fd")
    style = (f"\nStyle FD to `{a['style_ref']}` ({fd['images']} images, {fd['features']} features): base "
             f"{fd['base']:.4f}, tuned {fd['tuned']:.4f} (lower is closer)\n" if fd else "")
    return (f"# {a['unet'] or ' + '.join(a['lora'])} vs {a['model']}\n\n{report['n']} prompts from `{a['prompts']}`, "
            f"seeds {a['seed']}.., "
            f"{a['steps']} {a['sampler']} steps, guidance {a['guidance']}.\n\n" + "\n".join(rows) + "\n" + style)


def win_text(rate, lo, hi, n):
    """"62.5% of 200 prompts (95% CI 55.0-69.5)"; with no interval when every resample agrees (e.g. 18 wins of 18)."""
    return f"{100 * rate:.1f}% of {n} prompts" + (f" (95% CI {100 * lo:.1f}-{100 * hi:.1f})" if hi > lo else "")


def style_images(folder):
    paths = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(paths) < 2:
        raise LoadError(f"--style-ref {folder}: expected a folder with at least 2 images (.png .jpg .jpeg .webp)")
    return [Image.open(p).convert("RGB") for p in paths]


def style_fd(ref, images, toy, clip=None, device="cpu"):
    """Style alignment (Diffusion-RPO's task): the Fréchet distance of each model's images to the style images `ref`,
    on the `clip` scorer's image embeddings; for the toy model (32 px flat shapes, whose style is colors and layout)
    on 8 x 8 box-filtered RGB thumbnails (192 numbers), which need no download. At least 2 images per set."""
    thumbs = lambda ims: torch.tensor(np.stack([np.asarray(im.resize((8, 8), Image.BOX)) for im in ims]) / 255)  # noqa
    features = (lambda ims: thumbs(ims).flatten(1)) if toy else load_scorer("clip", clip, device=device).image_features
    f = features(ref)
    return dict(images=len(ref), features="8x8 RGB thumbnail" if toy else "CLIP image",
                **{label: frechet_distance(f, features(ims)) for label, ims in images.items()})


def wins_losses_grid(base, tuned, prompts, delta, k=4):
    """Base (top row) and tuned (bottom row) for the k largest wins (left) and k largest losses (right)."""
    order = np.argsort(-np.asarray(delta))
    idx = list(order[:k]) + [i for i in order[::-1][:k] if i not in order[:k]]
    labels = [f"{delta[i]:+.3g}: {prompts[i]}" for i in idx]
    return sample.image_grid([[base[i] for i in idx], [tuned[i] for i in idx]], ["base", "tuned"], labels)


def score(images, prompts, names, paths, a):
    """Each scorer on both models' images ({"base": [...], "tuned": [...]}): the means, the tuned model's win rate
    with its bootstrap interval, and every score."""
    out = {}
    for name in names:
        try:
            scorer = load_scorer(name, paths.get(name), device=a.device, captioner=a.captioner)
        except (UserError, OSError) as e:
            raise LoadError(f"scorer {name}: {first_line(e)}") from None
        s = {label: scorer(ims, prompts).tolist() for label, ims in images.items()}
        del scorer
        rate, lo, hi = bootstrap_win_rate(s["tuned"], s["base"], n=a.bootstrap, seed=a.seed)
        out[name] = dict(base_mean=float(np.mean(s["base"])), tuned_mean=float(np.mean(s["tuned"])), win_rate=rate,
                         win_lo=lo, win_hi=hi, base=s["base"], tuned=s["tuned"])
        print(f"{name}: base {np.mean(s['base']):.4f}  tuned {np.mean(s['tuned']):.4f}  "
              f"tuned wins {win_text(rate, lo, hi, len(prompts))}")
    return out


def parse_scorer_models(items):
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in SCORERS or not path:
            raise LoadError(f"--scorer-model {item!r}: expected NAME=PATH with NAME one of {', '.join(SCORERS)}")
        out[name] = path
    return out


def main(argv=None):
    p = sample.add_generation_args(argparse.ArgumentParser(description=__doc__,
                                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--prompts", default=None, help="a set (see prompt_set) or a .txt/.tsv/.csv/.json file "
                                                   "(default: parti; the toy model's held-out captions, shapes)")
    p.add_argument("--num", type=int, default=None, help="only the first N prompts")
    p.add_argument("--scorers", default=None, help=f"comma-separated: {', '.join(SCORERS)} (default: pickscore, "
                                                   f"hps, aesthetic, clip; the toy model's judge)")
    p.add_argument("--scorer-model", action="append", default=[], metavar="NAME=PATH",
                   help="where a scorer's weights come from (repeatable); see load_scorer")
    p.add_argument("--captioner", default=None, help=f"text-alignment's BLIP: a folder or Hub id (default {BLIP})")
    p.add_argument("--style-ref", default=None, help="a folder of style images: report.json gets each model's style_fd")
    p.add_argument("--out", default="runs/eval", help="folder for report.json, report.md, wins_losses.png, images/")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the win rates' intervals")
    p.epilog = ("The tuned model is --unet FOLDER or --lora (its first file: the tuned adapters; further --lora files, "
                "e.g. LCM-LoRA, are stacked on base and tuned alike).")
    a = p.parse_args(argv)
    toy_model = a.model in sample.TOY_MODELS
    sample.check_generation_args(a)
    a.prompts = a.prompts or ("shapes" if toy_model else "parti")
    a.scorers = a.scorers or ("judge" if toy_model else "pickscore,hps,aesthetic,clip")
    scorers = [s.strip() for s in a.scorers.split(",") if s.strip()]
    if not scorers or any(s not in SCORERS for s in scorers):
        fail(f"--scorers {a.scorers!r}: expected a comma-separated list of {', '.join(SCORERS)}")
    if a.num is not None and a.num < 1:
        fail("--num must be at least 1")
    if (a.unet is None) == (a.lora is None):
        fail("give the tuned model as exactly one of --unet FOLDER or --lora DIR")
    dtype = DTYPES[a.dtype]
    try:
        paths = parse_scorer_models(a.scorer_model)
        ref = style_images(a.style_ref) if a.style_ref else None
        prompts = prompt_set(a.prompts)[:a.num]
        if len(prompts) < (2 if ref else 1):
            fail(f"--prompts {a.prompts}: {len(prompts)} prompts; expected at least 1 (2 with --style-ref)")
        check_prompts(prompts, scorers, f"--prompts {a.prompts}")
        sd = load_pipeline(a.model, device=a.device, dtype=dtype, lora=a.lora[1:] if a.lora else None)
        tuned = (load_tuned(sd, a.unet, device=a.device, dtype=dtype) if a.unet else
                 load_pipeline(a.model, device=a.device, dtype=dtype, lora=a.lora).unet)
    except (UserError, OSError) as e:
        fail(e)
    sample.same_family(sd, tuned, a)
    if toy_model:
        sample.warn_unknown_words(sd, prompts)
    images = dict(zip(("base", "tuned"), sample.render_rows(sd, [sd.unet, tuned], prompts, a)))
    del sd, tuned
    report(images, prompts, scorers, paths, ref, a)


def report(images, prompts, scorers, paths, ref, a):
    """Score base and tuned images, write OUT/images/, report.json, report.md and wins_losses.png."""
    out = Path(a.out)
    for label, ims in images.items():
        (out / "images" / label).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(ims):
            im.save(out / "images" / label / f"{i:05d}.png")
    report = dict(args=vars(a), n=len(prompts), prompts=prompts, seeds=[a.seed + i for i in range(len(prompts))])
    try:
        report["scorers"] = score(images, prompts, scorers, paths, a)
        report["style_fd"] = (style_fd(ref, images, a.model in sample.TOY_MODELS, paths.get("clip"), a.device)
                              if ref else None)
    except (UserError, OSError) as e:
        fail(e)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", report_markdown(report))
    print(report_markdown(report))
    first = report["scorers"][scorers[0]]
    delta = [t - b for t, b in zip(first["tuned"], first["base"])]
    wins_losses_grid(images["base"], images["tuned"], prompts, delta).save(out / "wins_losses.png")
    print(f"wrote {out / 'report.json'}, report.md, wins_losses.png ({scorers[0]}'s largest wins and losses)")


if __name__ == "__main__":
    main()
