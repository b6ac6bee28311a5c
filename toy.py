"""
The toy world: a tiny text-to-image model and a programmatic judge, so the whole method runs on a laptop CPU.

    python diffdpo.py --model tiny --data shapes --out runs/toy     on-policy pairs -> DPO -> held-out win rate
    python rpo.py --model tiny --data shapes-style                  style alignment: base images vs their ink prints
    python diffdpo.py --model tiny-flow                             the same with the flow model (SD3's pipeline)

`tiny` is SD1.5's pipeline (the same UNet / VAE / CLIP classes, scheduler and loader) at about a million UNet
parameters, `tiny-flow` SD3's (MMDiT, three text encoders, rectified flow), both pretrained on captioned shapes drawn
with Pillow (pretrain.py); `shapes` pairs are two samples of the base model for one caption, the judge's favorite
preferred. Read top to bottom: the world (captions, drawing, the judge), the pairs, the style world, the pairs a run
builds itself (diffdpo.py calls build_pairs; also style:FOLDER's).
"""
import re
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import style_items
from files import DataError
from sample import TOY_SAMPLING, render, sampling_defaults
from shards import png_bytes, write_pairs

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


def nearest_colors(image):
    """(H, W) index into COLORS of each pixel's nearest palette color (in RGB). image: a PIL image, or a (3, H, W)
    tensor in [-1, 1]."""
    if isinstance(image, Image.Image):
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    else:
        x = (image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)                # (6, 3)
    d = (x.permute(1, 2, 0)[:, :, None, :] - palette).pow(2).sum(-1)                 # (H, W, 6)
    return d.argmin(-1)


def judge(image, prompt):
    """The toy world's preference score in [0, 1]: the fraction of pixels nearest (in RGB) to the caption's shape
    color among the six palette colors. image: a PIL image, or a (3, H, W) tensor in [-1, 1]."""
    return (nearest_colors(image) == list(COLORS).index(parse_shape_prompt(prompt)[0])).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------
# On-policy pairs, as Pick-a-Pic's: two samples of the base model for a training caption, the judge's favorite first.
# `--data shapes` is `--data prompts:shapes` (onpolicy.py) with the judge, 2 candidates and TOY_PAIRS pairs: pair k
# is caption k mod 72's two samples (seeds 2k, 2k + 1 offset by --seed), a tie labelled 0.5 (the reader skips it).

WORLDS = ("shapes", "shapes-style")   # the toy worlds, as --data specs: the trainer builds and evaluates them
TOY_PAIRS = 1024          # pairs built for each toy world (shapes: ties dropped)


def world_of(data):
    """The toy world a --data spec trains in (shapes also as prompts:shapes), or None."""
    return "shapes" if data == "prompts:shapes" else data if data in WORLDS else None


# ----------------------------------------------------------------------------------------------------------------
# The style world (`--data shapes-style`): Diffusion-RPO's style alignment on the toy. Its style is an ink print:
#
#     style_edit(image, caption): each pixel nearest the caption's background color becomes PAPER, every other pixel
#                                 INK (a dark figure on a light ground, in exactly two colors whatever the caption)
#     style_judge(image)        = (fraction of pixels whose nearest palette color is PAPER or INK)
#                                 x (fraction of the border pixels whose nearest palette color is PAPER)
#
# Pairs: the base model's generation for a training caption (rejected) and its edit (preferred), as the paper makes
# its style images from the originals with an image editor. Styled images score about 1 (less where a figure touches
# the border), base images about 0 (their grounds are no paper); the border factor asks for a paper GROUND: without
# it an image all in ink scores 1, and RPO found that on blue grounds.
#
# Why this style: the tiny VAE decodes only the six palette colors, in filled regions about a latent pixel (4 px)
# wide, so white paper, 1-2 px outlines or a hollow line drawing cannot even be reconstructed (measured: DPO toward
# hollow outlines wins 0.51); paper and ink are the lightest and the darkest palette colors that are no held-out
# caption's background (those are all yellow or blue), so the judge reads the style, not the caption.

PAPER, INK = "orange", "purple"


def style_edit(image, prompt):
    """The style's deterministic image edit (PIL -> PIL, same size): the caption's ground becomes paper, the rest
    ink."""
    ground = nearest_colors(image) == list(COLORS).index(parse_shape_prompt(prompt)[2])      # (H, W)
    x = torch.where(ground[..., None], torch.tensor(COLORS[PAPER]), torch.tensor(COLORS[INK]))  # (H, W, 3)
    return Image.fromarray(x.numpy().astype(np.uint8))


def style_judge(image, prompt=None):
    """The style score in [0, 1]: the fraction of pixels nearest (in RGB, among the palette) to paper or ink, times
    the fraction of the border pixels nearest to paper. It reads pixels only; the caption is not needed (a style is
    the same for every caption)."""
    nearest = nearest_colors(image)                                                   # (H, W)
    paper, ink = nearest == list(COLORS).index(PAPER), nearest == list(COLORS).index(INK)
    border = torch.cat([paper[0], paper[-1], paper[1:-1, 0], paper[1:-1, -1]])         # (2H + 2W - 4,)
    return ((paper | ink).float().mean() * border.float().mean()).item()


@torch.no_grad()
def build_style_pairs(sd, path, n=TOY_PAIRS, seed=0):
    """Style-alignment pairs: for pair k, the base model's generation for training caption k mod 72 (seed as in
    build_shape_pairs) is the rejected image and its style_edit the preferred one. Returns the number of pairs."""
    train = shape_prompts("train")
    prompts = [train[k % len(train)] for k in range(n)]
    images = render(sd, sd.unet, prompts, [1_000_000 * (seed + 1) + 2 * k for k in range(n)], batch_size=256,
                    desc=f"sampling {n} images to style", **TOY_SAMPLING)
    styled = [style_edit(img, p) for img, p in zip(images, prompts)]
    write_pairs(path, prompts, [png_bytes(i) for i in styled], [png_bytes(i) for i in images], [1.0] * n)
    return n


# ----------------------------------------------------------------------------------------------------------------
# Pairs the run builds itself with the base model before training (then read as any parquet shard), besides those
# it builds from prompts (onpolicy.py: --data prompts:SPEC, and shapes):
#   shapes-style  its style alignment: each base generation's styled edit preferred (build_style_pairs)
#   style:FOLDER  style alignment (Diffusion-RPO's second task): each style image preferred over the base model's
#                 own generation for its caption


def built_pairs_path(cfg, out):
    """Where the pairs of --data shapes-style or style:FOLDER live (OUT/shapes_style_pairs.parquet,
    OUT/style_pairs.parquet), or None."""
    if cfg.data == "shapes-style":
        return out / "shapes_style_pairs.parquet"
    return out / "style_pairs.parquet" if cfg.data.startswith("style:") else None


def build_pairs(s, out):
    """Build the pairs of --data shapes-style / style:FOLDER unless OUT already holds them, with the
    trainer's diffdpo.Setup `s` (its base model, resolution and precision); returns their path (None for data that is
    read, not built)."""
    cfg = s.cfg
    path = built_pairs_path(cfg, out)
    if path is None or path.exists():
        return path
    t0, guidance = time.time(), sampling_defaults(cfg.model)[1]
    with s.autocast:
        if cfg.data == "shapes-style":
            n = build_style_pairs(s.sd, path, TOY_PAIRS, cfg.seed)
        else:
            n = build_folder_pairs(s.sd, cfg.data[len("style:"):], path, s.resolution, cfg.sample_steps, guidance,
                                   cfg.seed)
    print(f"built {path}: {n} pairs ({time.time() - t0:.0f} s)")
    return path


@torch.no_grad()
def build_folder_pairs(sd, folder, path, resolution, steps, guidance, seed=0):
    """Style image i (preferred) against the base model's generation for its caption (seed --seed + i, `steps` DDIM
    steps). Returns the number of pairs."""
    items = style_items(folder)
    prompts = [c for c, _ in items]
    images = render(sd, sd.unet, prompts, [seed + i for i in range(len(items))], batch_size=8, steps=steps,
                    guidance=guidance, height=resolution, width=resolution)
    write_pairs(path, prompts, [p.read_bytes() for _, p in items], [png_bytes(i) for i in images], [1.0] * len(items))
    return len(items)


# ----------------------------------------------------------------------------------------------------------------
# Images as the VAE reads them


def to_tensor(img):
    """PIL RGB -> (3, H, W) in [-1, 1], as the VAE expects."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
