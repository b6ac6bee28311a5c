"""
Preference pairs made from prompts alone: the model being tuned draws K candidates per prompt, a reward model ranks
them, best against worst becomes a pair (Syn-Pic / RankDPO, Karthik et al. 2024, "Scalable Ranked Preference
Optimization"; flow_grpo's DPO takes the best and worst of 24 samples; the Diffusion-DPO paper's AI feedback relabels
pairs with PickScore). No dataset needed:

    python diffdpo.py --model sd15 --data prompts:parti --pair-scorer pickscore --candidates 4
    python diffdpo.py --data prompts:shapes --pair-scorer judge --candidates 4      the toy, on a laptop CPU
    python diffdpo.py --data prompts:shapes --rebuild-every 50                      online rounds

The toy world's `--data shapes` is such a build: its 72 training captions, its judge, 2 candidates, 1,024 pairs.

Pair i of a build is drawn for prompt i mod len(set); its candidate k from seed 1,000,000 (seed + 1) + K i + k, a pure
function of (--seed, i, k): a build is the same in one go or in pieces (up to the float rounding of other batch
sizes). A round's build writes under OUT/pairs/round-RRR/
    candidates-IIIIIII.parquet   one chunk of --render-batch images (pair, caption, k, seed, score, image as PNG),
                                 written atomically as it finishes: a build that is stopped or killed continues with
                                 the first missing chunk, and no finished image is rendered again
    pairs.parquet                the pairs in the Pick-a-Pic schema the trainer reads: for each pair its best and its
                                 worst candidate, in candidate order, label_0 saying which is preferred, or 0.5 (a tie,
                                 which the reader skips and counts) when their score margin is under --min-margin;
                                 plus every candidate's score (`scores`), the `margin` and the `pair` index, to inspect
                                 and re-threshold
Online rounds (--rebuild-every N): round r renders pairs [r P, (r + 1) P) (P = --prompt-pairs, so the prompts go on
through the set) with the policy as it is at step r N: each round's pairs come from the model being tuned (iterative
DPO). The reference stays the base model, or with --reference-update current becomes the policy at each round.
"""
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

import eval
import toy
from files import UserError, read_json, write_atomic
from sample import render, sampling_defaults
from shards import png_bytes

# ----------------------------------------------------------------------------------------------------------------
# The rule: candidates' seeds, and best against worst


def candidate_seed(seed, i, k, candidates):
    """Candidate k of pair i's seed (for 2 candidates: the toy world's pairs, seeds 2i and 2i + 1)."""
    return 1_000_000 * (seed + 1) + candidates * i + k


def best_and_worst(scores, min_margin=0.0):
    """One pair's candidate scores (K,) -> (first, second, label_0, margin): the best and the worst candidate in
    candidate order, label_0 = 1 if the first is the best, 0 if the second, 0.5 (a tie, skipped by the reader) when
    margin = best - worst is 0, not a number, or under min_margin. The first best and the last worst win ties among
    candidates."""
    scores = np.asarray(scores, dtype=np.float64)
    best, worst = int(scores.argmax()), len(scores) - 1 - int(scores[::-1].argmin())
    margin = float(scores[best] - scores[worst])
    label_0 = 0.5 if not margin > 0 or margin < min_margin else float(best < worst)   # NaN: a tie
    return min(best, worst), max(best, worst), label_0, margin


# ----------------------------------------------------------------------------------------------------------------
# What a run builds, from its flags


@dataclass
class Build:
    """What a run's builds draw and how they rank it (build_of reads it from the flags)."""
    spec: str               # the prompt set (eval.prompt_set's names and files; shapes: the toy's training captions)
    scorer: str             # eval.SCORERS name, or NAME=PATH
    candidates: int         # K images per pair
    pairs: int              # pairs per build, i.e. per round (0: one per prompt of the set)
    min_margin: float
    seed: int

    def indices(self, r, n_prompts):
        """The pairs of round r: the next ones after the rounds before it."""
        n = self.pairs or n_prompts
        return range(r * n, (r + 1) * n)


def prompt_spec(data):
    """The prompt set of --data prompts:SPEC; "shapes" for the toy world (--data shapes); else None."""
    if data == "shapes":
        return "shapes"
    return data[len("prompts:"):] if data.startswith("prompts:") else None


def build_of(cfg):
    """The Build of a TrainConfig, or None when its pairs are not built from prompts; a bad setting is a one-line
    UserError, before any work."""
    spec = prompt_spec(cfg.data)
    if spec is None:
        if cfg.rebuild_every or cfg.reference_update != "base":
            raise UserError(f"--rebuild-every / --reference-update: they rebuild pairs from prompts, and --data "
                            f"{cfg.data} is not --data prompts:SPEC")
        return None
    scorer = cfg.pair_scorer or ("judge" if spec == "shapes" else "pickscore")
    if scorer.partition("=")[0] not in eval.SCORERS:
        raise UserError(f"--pair-scorer {scorer}: expected one of {', '.join(eval.SCORERS)} (or NAME=PATH)")
    if not spec:
        raise UserError("--data prompts:SPEC: SPEC is empty; expected a prompt set (parti, drawbench, hps, ...) or a "
                        "prompt file")
    checks = {"--candidates": (cfg.candidates, 2), "--rebuild-every": (cfg.rebuild_every, 0),
              "--prompt-pairs": (cfg.prompt_pairs, 0), "--render-batch": (cfg.render_batch, 1)}
    for flag, (value, low) in checks.items():
        if value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")
    if not cfg.min_margin >= 0:
        raise UserError(f"--min-margin {cfg.min_margin}: must be >= 0")
    if cfg.reference_update == "current" and (cfg.lora_rank or cfg.loss in ("sft", "mapo")):
        raise UserError("--reference-update current: needs a reference UNet of its own (full fine-tuning, --loss dpo "
                        "or kto; with LoRA the reference is the base model under the adapters)")
    return Build(spec, scorer, cfg.candidates, cfg.prompt_pairs, cfg.min_margin, cfg.seed)


def builds_pairs(cfg):
    """Whether the run builds its pairs (prompts:SPEC, shapes, shapes-style, style:FOLDER); checks their settings."""
    return build_of(cfg) is not None or toy.built_pairs_path(cfg, Path(".")) is not None


def training_prompts(build):
    """The build's prompts, each checked before any image is rendered (eval.check_prompts)."""
    prompts = toy.shape_prompts("train") if build.spec == "shapes" else eval.prompt_set(build.spec)
    if not prompts:
        raise UserError(f"--data prompts:{build.spec}: the prompt set is empty")
    eval.check_prompts(prompts, [build.scorer.partition("=")[0]], f"--data prompts:{build.spec}")
    return prompts


# ----------------------------------------------------------------------------------------------------------------
# Building a round: candidates in chunks (resumable), then the pairs


def round_folder(out, r):
    return Path(out) / "pairs" / f"round-{r:03d}"


@torch.no_grad()
def build_round(s, out, build, r):
    """Round r's pairs (rank 0; every rank with --fsdp): the missing chunks of candidates rendered by s.policy (as
    trained so far) and scored, then OUT/pairs/round-RRR/pairs.parquet. Returns its path."""
    folder, cfg, K = round_folder(out, r), s.cfg, build.candidates
    path = folder / "pairs.parquet"
    check_settings(folder, dict(asdict(build), model=cfg.model, sample_steps=cfg.sample_steps,
                                resolution=s.resolution, render_batch=cfg.render_batch))
    if path.exists():
        return path
    prompts = training_prompts(build)
    indices = build.indices(r, len(prompts))
    per_chunk = max(1, cfg.render_batch // K)
    chunks = [indices[i:i + per_chunk] for i in range(0, len(indices), per_chunk)]
    todo = [c for c in chunks if not (folder / f"candidates-{c[0]:07d}.parquet").exists()]
    name, _, model = build.scorer.partition("=")
    scorer = eval.load_scorer(name, model or None, device=s.sd.device)
    t0, guidance = time.time(), sampling_defaults(cfg.model)[1]
    quiet = int(os.environ.get("RANK", 0)) > 0          # --fsdp: every rank renders, rank 0 reports
    bar = tqdm(total=len(indices) * K, initial=(len(indices) - sum(map(len, todo))) * K, unit="img", disable=quiet,
               desc=f"pairs, round {r}: {K} candidates x {len(indices)} prompts")
    for chunk in todo:
        captions = [prompts[i % len(prompts)] for i in chunk for _ in range(K)]
        seeds = [candidate_seed(build.seed, i, k, K) for i in chunk for k in range(K)]
        with s.autocast:
            images = render(s.sd, s.policy, captions, seeds, batch_size=cfg.render_batch, steps=cfg.sample_steps,
                            guidance=guidance, height=s.resolution, width=s.resolution)
        scores = scorer(images, captions).double().tolist()
        table = pa.table(dict(pair=[i for i in chunk for _ in range(K)], caption=captions,
                              k=list(range(K)) * len(chunk), seed=seeds, score=scores,
                              image=[png_bytes(im) for im in images]))
        write_atomic(folder / f"candidates-{chunk[0]:07d}.parquet", lambda tmp: pq.write_table(table, str(tmp)))
        bar.update(len(images))
    bar.close()
    n = write_round_pairs(folder, chunks, build)
    if not quiet:
        print(f"built {path}: {n} of {len(indices)} pairs over the margin ({time.time() - t0:.0f} s)")
    return path


def check_settings(folder, settings):
    """A round's build settings, written to build.json when it starts; a build or pairs made with others are a
    one-line error, before anything is rendered or trained on."""
    path = folder / "build.json"
    if not path.exists():
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))
        return
    made = read_json(path)
    changed = [k for k in settings if made.get(k) != settings[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{folder} was built with {k}={made.get(k)!r}, this run has {k}={settings[k]!r}; use another "
                        f"--out (or the same settings)")


PAIRS_SCHEMA = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                          ("label_0", pa.float64()), ("label_1", pa.float64()), ("scores", pa.list_(pa.float64())),
                          ("margin", pa.float64()), ("pair", pa.int64())])
ROW_GROUP = 256           # pairs per row group, as shards.write_pairs (the reader shuffles within row groups)


def pair_rows(folder, chunks, build):
    """The pairs of the chunks' candidates, one dict per pair (see best_and_worst), read chunk by chunk."""
    K = build.candidates
    for chunk in chunks:
        path = folder / f"candidates-{chunk[0]:07d}.parquet"
        t = pq.read_table(path).to_pydict()
        if t["seed"] != [candidate_seed(build.seed, i, k, K) for i in chunk for k in range(K)]:
            raise UserError(f"{path}: drawn with other settings (--candidates, --seed, --prompt-pairs or "
                            f"--render-batch); use another --out")
        for j in range(0, len(t["pair"]), K):
            first, second, label_0, margin = best_and_worst(t["score"][j:j + K], build.min_margin)
            yield dict(caption=t["caption"][j], jpg_0=t["image"][j + first], jpg_1=t["image"][j + second],
                       label_0=label_0, label_1=1 - label_0, scores=t["score"][j:j + K], margin=margin,
                       pair=t["pair"][j])


def write_round_pairs(folder, chunks, build):
    """pair_rows -> pairs.parquet, written atomically ROW_GROUP pairs at a time (a round's images are never all in
    memory); returns the number of pairs not tied."""
    kept = 0

    def write(tmp):
        nonlocal kept
        rows = pair_rows(folder, chunks, build)
        with pq.ParquetWriter(str(tmp), PAIRS_SCHEMA) as writer:
            while group := list(itertools.islice(rows, ROW_GROUP)):
                kept += sum(row["label_0"] != 0.5 for row in group)
                writer.write_table(pa.Table.from_pylist(group, schema=PAIRS_SCHEMA))
    write_atomic(folder / "pairs.parquet", write)
    return kept


def round_stats(path, r):
    """metrics.jsonl's words on a round: its number, the mean score of its candidates, the mean best - worst
    margin, and the pairs over --min-margin."""
    t = pq.read_table(path, columns=["scores", "margin", "label_0"]).to_pydict()
    return dict(round=r, round_reward=float(np.mean([x for s in t["scores"] for x in s])),
                round_margin=float(np.mean(t["margin"])), round_pairs=sum(v != 0.5 for v in t["label_0"]))


# ----------------------------------------------------------------------------------------------------------------
# In the trainer: which round a step is in, and the pairs of the state's round


def next_round(cfg, state):
    """Whether --rebuild-every starts a new round at this step (then the state moves to it). The stream position goes
    on counting: a round's pairs get the noise, timesteps and augmentation of stream items no round had before."""
    if not cfg.rebuild_every or state["round"] == state["step"] // cfg.rebuild_every:
        return False
    state["round"] = state["step"] // cfg.rebuild_every
    return True


def round_pairs(s, out, state, rank):
    """The path of the pairs the state's round trains on, built by rank 0 (the others wait for the file; with --fsdp
    every rank renders together), or None when --data is read, not built. At the start of a round after the first,
    --reference-update current makes the reference the policy. A round's pairs that went missing after it started
    are an error, not rebuilt by a later policy."""
    build = build_of(s.cfg)
    everyone = s.cfg.fsdp        # sharded networks render on every rank together (each writes the same files)
    if build is None:
        return toy.build_pairs(s, out) if rank == 0 or everyone else wait_for(toy.built_pairs_path(s.cfg, out))
    r, start = state["round"], state["round"] * s.cfg.rebuild_every       # the step the round starts at
    path = round_folder(out, r) / "pairs.parquet"
    if s.cfg.reference_update == "current" and r > 0 and state["step"] == start:
        s.reference.load_state_dict(s.policy.state_dict())
    if not path.exists() and state["step"] > start:   # its policy is gone: every rank refuses to build with another
        raise UserError(f"{path} is missing, and the run is at step {state['step']}, past the step its pairs were "
                        f"built at ({start}); restore OUT/pairs/ or use another --out")
    return build_round(s, out, build, r) if rank == 0 or everyone else wait_for(path)


def wait_for(path, poll=1.0):
    """Wait until rank 0 has written `path` (None: nothing to wait for); torchrun ends the job if rank 0 dies."""
    while path is not None and not path.exists():
        time.sleep(poll)
    return path
