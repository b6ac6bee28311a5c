"""
The family of preference losses on one trainer (diffdpo.py): cDPO's label smoothing, MaPO, Diffusion-KTO, and
--label-noise; each loss against its paper's released code written out by hand, KTO's labelled-image data, the
steps they run, and exact resumes.

    pytest -q test_losses.py
"""
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import data
import diffdpo
import shards
import unet
from files import DataError, UserError
from test_all import hub, max_diff, read_metrics, rel_err, shard, unet_weights  # noqa: F401 (fixtures)


def random_errors(n=16, seed=0):
    """Per-image denoising errors as a UNet gives them (positive, around 0.1-1), float64, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    return [(0.05 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


# ----------------------------------------------------------------------------------------------------------------
# The losses against the released code's formulas


def test_dpo_label_smoothing():
    """cDPO with eps = 0 is dpo_loss exactly (loss and gradient, bit for bit); with eps > 0 it is the mixture of DPO
    on the pairs as labelled and on the pairs flipped, (1 - eps) L(w, l) + eps L(l, w), and the formula."""
    mw, ml, rw, rl = random_errors()
    inside = -0.5 * 500.0 * ((mw - ml) - (rw - rl))
    plain = -F.logsigmoid(inside).mean()                         # Eq. 14, as dpo_loss had it before label smoothing
    loss, acc = diffdpo.dpo_loss(mw, ml, rw, rl, 500.0, label_smoothing=0.0)
    assert torch.equal(loss, plain) and acc == (inside > 0).double().mean()
    assert all(torch.equal(a, b) for a, b in zip(grads(loss, [mw, ml]), grads(plain, [mw, ml])))
    eps = 0.2
    loss, acc = diffdpo.dpo_loss(mw, ml, rw, rl, 500.0, label_smoothing=eps)
    flipped, _ = diffdpo.dpo_loss(ml, mw, rl, rw, 500.0)
    mixture = (1 - eps) * diffdpo.dpo_loss(mw, ml, rw, rl, 500.0)[0] + eps * flipped
    formula = (-(1 - eps) * F.logsigmoid(inside) - eps * F.logsigmoid(-inside)).mean()
    assert rel_err(loss, mixture) < 1e-12 and rel_err(loss, formula) < 1e-12
    for a, b in zip(grads(loss, [mw, ml]), grads(formula, [mw, ml])):
        assert rel_err(a, b) < 1e-12


def mapo_released(model_losses_w, model_losses_l, snr_value=0.5, beta_mapo=0.1, num_train_timesteps=1000):
    """mapo-t2i/mapo utils.compute_loss after its per-image MSE, written out."""
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio = F.logsigmoid(log_odds * num_train_timesteps)
    return model_losses_w.mean() - (beta_mapo * ratio).mean(), log_odds


@pytest.mark.parametrize("beta", [0.1, 0.05, 1.0])
def test_mapo_loss_matches_released_code(beta):
    """Loss, implicit accuracy (margin > 0) and gradient equal the released formula (relative 1e-6, float64 and
    float32); with beta 0 it is SFT's loss on the winners; no reference error enters."""
    for dtype in (torch.float64, torch.float32):
        mw, ml, _, _ = (e.detach().to(dtype).requires_grad_() for e in random_errors(seed=1))
        loss, acc = diffdpo.mapo_loss(mw, ml, beta)
        want, log_odds = mapo_released(mw, ml, beta_mapo=beta)
        assert rel_err(loss, want) < 1e-6 and acc == (log_odds > 0).to(acc.dtype).mean()
        for a, b in zip(grads(loss, [mw, ml]), grads(want, [mw, ml])):
            assert rel_err(a, b) < 1e-6
    mw, ml, _, _ = random_errors(seed=2)
    assert torch.equal(diffdpo.mapo_loss(mw, ml, 0.0)[0], diffdpo.sft_loss(mw)[0])


def kto_released(model_losses, ref_loss, labels, beta_dpo=1000.0, lambda_d=1.0, lambda_u=1.0, kl=None):
    """jacklishufan/diffusion-kto train_kto_sd_v1.5.py, --loss kto --halo sigmoid, written out; `kl` the value of
    accelerator.reduce(g.mean(), 'mean') (all ranks' mean) when given, else this batch's mean."""
    g_term = -model_losses - -ref_loss
    kl = (g_term.mean().detach() if kl is None else kl).clamp(min=0).detach()
    g_term = g_term - kl
    label_sgn = 2 * labels - 1
    labels_binary = labels == 1
    label_scale_g = label_sgn * beta_dpo * g_term
    h = torch.sigmoid(label_scale_g)
    w_y = lambda_d * labels_binary + lambda_u * ~labels_binary
    acc = (label_scale_g > 0).sum().detach() / len(label_scale_g)
    return (w_y * (1 - h)).mean(), acc


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0)])
def test_kto_loss_matches_released_code(weights):
    """Loss, accuracy and gradient equal the released code (relative 1e-6), with a positive and a clamped (negative)
    baseline; at policy == reference the loss is mean(lambda_y) / 2."""
    err, ref_err, _, _ = random_errors(seed=3)
    labels = (torch.arange(16) % 3 == 0).double()
    for shift in (0.0, 0.3):      # ref_err + 0.3: the mean gain is positive, so z > 0 is subtracted
        ref = (ref_err + shift).detach()
        loss, acc = diffdpo.kto_loss(err, ref, labels, 1000.0, 1, *weights)
        want, want_acc = kto_released(err, ref, labels, 1000.0, *weights)
        assert rel_err(loss, want) < 1e-6 and acc == want_acc
        assert rel_err(grads(loss, [err])[0], grads(want, [err])[0]) < 1e-6
    loss, acc = diffdpo.kto_loss(err, err.detach(), labels, 1000.0, 1, *weights)
    lam = torch.where(labels == 1, *weights)
    assert loss.item() == pytest.approx(lam.mean().item() / 2, rel=1e-12) and acc == 0


def _kto_rank(rank, world, port, folder, err, ref_err, labels):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = len(err) // world
    mine = err[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss, acc = diffdpo.kto_loss(mine, ref_err[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n], 1000.0,
                                 world)
    loss.backward()
    torch.save(dict(loss=loss.detach(), acc=acc, grad=mine.grad), Path(folder) / f"{rank}.pt")
    dist.destroy_process_group()


def test_kto_baseline_over_two_gloo_ranks(tmp_path):
    """The baseline z is the mean over the GLOBAL batch: 2 gloo ranks with 8 images each give, per rank, the released
    code's terms with the all-ranks kl (its accelerator.reduce), and together one process's loss on all 16; each
    rank's half has a mean gain of the other sign, so a local baseline would differ."""
    err, noise, _, _ = (e.detach() for e in random_errors(seed=4))
    ref_err = err + 2e-3 * (noise - 0.55)   # gains of about 1 / beta, where the sigmoid is not saturated
    ref_err[:8] += 2e-3                     # rank 0's images gained, rank 1's lost: local means differ in sign
    labels = (torch.arange(16) % 2).double()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_kto_rank, args=(2, port, str(tmp_path), err, ref_err, labels), nprocs=2, join=True,
                       start_method="fork")
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    kl = (ref_err - err).mean()
    for r in range(2):
        part = slice(8 * r, 8 * r + 8)
        mine = err[part].clone().requires_grad_()
        want, want_acc = kto_released(mine, ref_err[part], labels[part], kl=kl)
        assert rel_err(got[r]["loss"], want) < 1e-6 and got[r]["acc"] == want_acc
        assert rel_err(got[r]["grad"], grads(want, [mine])[0]) < 1e-6
        local, _ = kto_released(mine, ref_err[part], labels[part])
        assert abs(local.item() - want.item()) > 1e-3        # the local baseline would give another loss
    one, _ = diffdpo.kto_loss(err, ref_err, labels, 1000.0)
    assert rel_err((got[0]["loss"] + got[1]["loss"]) / 2, one) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# --label-noise


def test_label_noise_deterministic_at_the_asked_rate(tmp_path, shard):
    """label_flipped is a pure function of (seed, the pair's place) at rate p; the stream serves flipped pairs with
    chosen and rejected swapped, the same in every epoch, and only the training stream is noisy."""
    places = [(0, g, r) for g in range(4) for r in range(5000)]
    for p in (0.2, 0.4):
        flips = np.array([data.label_flipped(7, p, *w) for w in places])
        assert abs(flips.mean() - p) < 0.01
        assert (flips == np.array([data.label_flipped(7, p, *w) for w in places])).all()
        assert (flips != np.array([data.label_flipped(8, p, *w) for w in places])).any()
    assert not any(data.label_flipped(7, 0.0, *w) for w in places[:1000])
    clean = data.open_pairs(shard, resolution=32, flip=False, seed=3)
    noisy = data.open_pairs(shard, resolution=32, flip=False, seed=3)
    noisy.label_noise = 0.5
    n_flipped = 0
    for s in range(40):                                    # two epochs of the 20 usable pairs
        a, b = clean.item(s), noisy.item(s)
        assert a["key"] == b["key"]
        k, g, row = 0, 0, int(a["key"].rsplit(":", 1)[1])
        swapped = data.label_flipped(3, 0.5, k, g, row)
        want = (a["rejected"], a["chosen"]) if swapped else (a["chosen"], a["rejected"])
        assert torch.equal(b["chosen"], want[0]) and torch.equal(b["rejected"], want[1])
        n_flipped += swapped
    assert 0 < n_flipped < 40


# ----------------------------------------------------------------------------------------------------------------
# KTO's data: labelled single images (JSONL, parquet) and pairs split into them


def png(rgb):
    img = Image.new("RGB", (40, 32), rgb)
    return shards.png_bytes(img)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """images.jsonl and a parquet file of labelled images: 10 usable (reddish desirable, bluish undesirable), plus
    rows with bad labels (0.5, "yes", null) that are counted, and one empty caption."""
    root = tmp_path_factory.mktemp("labelled")
    lines, rows = [], []
    for i in range(13):
        label = [1, 0, True, False, 1, 0, 1.0, 0.0, 1, 0, 0.5, "yes", None][i]
        rgb = (200, 40, 40) if label in (1, True) else (40, 40, 200)
        (root / f"{i}.png").write_bytes(png(rgb))
        prompt = "" if i == 4 else f"a picture number {i}"
        lines.append(json.dumps(dict(prompt=prompt, image=f"{i}.png", label=label)))
        rows.append(dict(image=png(rgb), caption=prompt, label=float(label) if isinstance(label, (int, float)) else
                         None))
    (root / "images.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), root / "images.parquet")
    return root


def test_labelled_images_formats(labelled):
    """Both formats give batch["images"] (B, 3, R, R) and batch["labels"] (B,), the labels as written (true = 1),
    bad labels skipped and counted, empty captions counted; the same images from either file."""
    got = {}
    for spec, bad in ((labelled / "images.jsonl", 3), (labelled / "images.parquet", 3)):
        src = data.open_pairs(spec, resolution=32, flip=False)
        assert [s.unpaired for s in src.shards] == [True] and len(src) == 13 - bad
        batch = next(src.batches(10))
        assert batch["images"].shape == (10, 3, 32, 32) and "chosen" not in batch
        red = batch["images"][:, 0].mean((1, 2)) > 0                  # reddish images are the desirable ones
        assert torch.equal(batch["labels"], red.float()) and batch["labels"].sum() == 5
        counts = src.counts()
        assert counts["bad_labels"] == bad and counts["empty_captions"] == 1
        got[spec.suffix] = {k: (p, x) for k, p, x in zip(batch["keys"], batch["prompts"], batch["images"])}
    assert sorted(p for p, _ in got[".jsonl"].values()) == sorted(p for p, _ in got[".parquet"].values())
    folder = data.open_pairs(labelled, resolution=32)                   # a folder holding images.jsonl
    assert isinstance(folder.shards[0], shards.ImageJsonlShard)


def test_labelled_images_errors(tmp_path, labelled, shard):
    """One-line errors naming the file and line / column; labelled images refused for a pair loss, --cache or
    --choice-model; a corrupt image is skipped and counted."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "image": "0.png", "label": 1}\n{"prompt": "b", "image": "1.png"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object with keys prompt, image, label"):
        data.open_pairs(bad, resolution=32)
    bad.write_text('{"prompt": "a", "image": "0.png", "label": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*JSONDecodeError"):
        data.open_pairs(bad, resolution=32)
    table = pq.read_table(labelled / "images.parquet")
    pq.write_table(table.drop(["label"]), tmp_path / "nolabel.parquet")
    pq.write_table(table.set_column(2, "label", pa.array(["1"] * len(table))), tmp_path / "textlabel.parquet")
    for name, match in (("nolabel", r"nolabel.parquet: missing column\(s\) label; expected labelled images"),
                        ("textlabel", r"textlabel.parquet: column label holds string; expected numbers")):
        with pytest.raises(DataError, match=match):
            len(data.open_pairs(tmp_path / f"{name}.parquet", resolution=32))
    corrupt = tmp_path / "corrupt" / "images.jsonl"
    corrupt.parent.mkdir()
    (corrupt.parent / "x.png").write_bytes(b"not a png")
    (corrupt.parent / "y.png").write_bytes(png((200, 40, 40)))
    corrupt.write_text('{"prompt": "a", "image": "x.png", "label": 1}\n{"prompt": "b", "image": "y.png", "label": 0}\n')
    src = data.open_pairs(corrupt, resolution=32)
    assert torch.equal(next(src.batches(2))["labels"], torch.tensor([0.0, 0.0])) and src.counts()["corrupt"] == 1
    for kw, match in ((dict(loss="dpo"), "they train with --loss kto"), (dict(loss="kto", cache=True), "--cache")):
        cfg = diffdpo.TrainConfig(data=str(labelled / "images.jsonl"), out=str(tmp_path / "o"), **kw)
        with pytest.raises(UserError, match=match):
            diffdpo.runs.validate(cfg, torch.device("cpu"), built=False)
    for kw, match in ((dict(label_smoothing=0.5), "--label-smoothing 0.5: must be a probability in \\[0, 0.5\\)"),
                      (dict(label_noise=1.0), "--label-noise 1.0"), (dict(undesirable_weight=0.0), "must be positive")):
        with pytest.raises(UserError, match=match):
            diffdpo.runs.validate(diffdpo.TrainConfig(data=str(shard), **kw), torch.device("cpu"), built=False)


def test_pairs_split_into_labelled_images(shard):
    """shards.labelled_images: B pairs -> 2B images, preferred desirable, rejected undesirable, prompts repeated,
    image indices 2i and 2i + 1 (each its own noise); image_step's noise is per image, unlike DPO's per pair."""
    batch = next(data.open_pairs(shard, resolution=32).batches(3, start=5))
    imgs = shards.labelled_images(batch)
    assert torch.equal(imgs["images"], torch.cat([batch["chosen"], batch["rejected"]]))
    assert imgs["labels"].tolist() == [1, 1, 1, 0, 0, 0] and imgs["prompts"] == batch["prompts"] * 2
    assert imgs["index"].tolist() == [10, 12, 14, 11, 13, 15] and imgs["position"] == batch["position"]
    eps, t = diffdpo.pair_noise(imgs["index"], (4, 4, 4), 0, 1000, stream=2)
    assert len({tuple(e.flatten()[:4].tolist()) for e in eps}) == 6
    assert not torch.equal(eps[:1], diffdpo.pair_noise(batch["index"][:1], (4, 4, 4), 0, 1000)[0])


# ----------------------------------------------------------------------------------------------------------------
# The steps: MaPO runs the policy alone and holds one UNet; every loss trains and resumes exactly


def config(hub, data_spec, out, **kw):
    kw = {**dict(resolution=32, batch_size=2, lr=1e-4, warmup_steps=2, device="cpu", checkpoint_every=2,
                 samples=False), **kw}
    return diffdpo.TrainConfig(model=str(hub["sd15"]), data=str(data_spec), out=str(out), **kw)


def live_unets():
    gc.collect()
    return sum(isinstance(o, unet.UNet) for o in gc.get_objects())


def test_mapo_step_runs_the_policy_alone(tmp_path, hub, shard):
    """Full fine-tuning: MaPO's Setup holds one UNet (no reference in memory) and its step runs one UNet forward (the
    policy's); DPO's holds two and runs two; KTO's runs two on 2B images of their own noise."""
    batch = next(data.open_pairs(shard, resolution=32).batches(2))
    for loss, unets, calls in (("mapo", 1, 1), ("dpo", 2, 2), ("kto", 2, 2)):
        before = live_unets()
        sd = unet.load_sd(str(hub["sd15"]))
        s = diffdpo.setup(config(hub, shard, tmp_path, loss=loss, beta=1.0), sd)
        assert live_unets() - before == unets and (s.reference is None) == (loss == "mapo")
        seen = []
        for net in {id(n): n for n in (s.policy, s.reference) if n is not None}.values():
            net.register_forward_hook(lambda m, args, out: seen.append(len(out)))
        loss_value, acc, errors = diffdpo.micro_step(s, batch, s.policy, s.reference)
        assert len(seen) == calls and all(n == 4 for n in seen) and torch.isfinite(loss_value)
        if loss == "mapo":
            assert torch.equal(errors[2], torch.zeros(2)) and torch.equal(errors[3], torch.zeros(2))
        del s, sd, seen


@pytest.mark.parametrize("loss,extra", [("dpo", dict(label_smoothing=0.1, label_noise=0.3)), ("sft", {}),
                                        ("mapo", dict(beta=0.1)), ("kto", dict(beta=1000.0, label_noise=0.3))])
def test_every_loss_resumes_exactly(tmp_path, hub, shard, loss, extra):
    """2 steps + resume to 4 == 4 straight steps, bit for bit, for every loss (with label noise where it applies);
    the first step's loss is each loss's value at policy == reference (ln 2, 0.5 for KTO)."""
    straight = diffdpo.train(config(hub, shard, tmp_path / "straight", loss=loss, max_steps=4, **extra))
    diffdpo.train(config(hub, shard, tmp_path / "resumed", loss=loss, max_steps=2, **extra))
    resumed = diffdpo.train(config(hub, shard, tmp_path / "resumed", loss=loss, max_steps=4, **extra))
    assert max_diff(unet_weights(resumed), unet_weights(straight)) == 0
    rows = [r for r in read_metrics(straight) if "loss" in r]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    first = {"dpo": np.log(2), "kto": 0.5}.get(loss)
    if first is not None:
        assert rows[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert json.loads((Path(resumed) / "config.json").read_text())["loss"] == loss


def test_kto_trains_on_labelled_images(tmp_path, hub, labelled):
    """--loss kto on a thumbs-up/down JSONL: trains, logs the desirable / undesirable errors, counts the bad labels."""
    out = diffdpo.train(config(hub, labelled / "images.jsonl", tmp_path / "kto", loss="kto", beta=1000.0,
                               max_steps=2, desirable_weight=2.0, undesirable_weight=2.0))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(1.0, rel=1e-6)       # mean(lambda_y) / 2 at policy == reference
    assert rows[-1]["bad_labels"] == 3 and all(np.isfinite(r["mse_w"]) for r in rows)


def _train_rank(rank, world, port, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    diffdpo.train(cfg)


def test_kto_two_processes_equal_one(tmp_path, hub, shard):
    """KTO through the whole trainer on 2 gloo processes with batch 1 (each its 2 images, the baseline over all 4)
    gives 1 process with batch 2: the same losses and gradient norms, and the same update up to Adam's first step
    (lr * sign(g)) on gradients within float rounding of 0. A per-rank baseline would change the loss by O(0.1)."""
    one = diffdpo.train(config(hub, shard, tmp_path / "one", loss="kto", beta=1000.0, max_steps=2))
    two = config(hub, shard, tmp_path / "two", loss="kto", beta=1000.0, max_steps=2, batch_size=1)
    mp.start_processes(_train_rank, args=(2, 29500 + (os.getpid() + 7) % 1000, two), nprocs=2, join=True,
                       start_method="fork")
    for a, b in zip(read_metrics(tmp_path / "two"), read_metrics(one)):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"] and abs(a["loss"] - b["loss"]) < 1e-6
    w0, w1, w2 = unet.load_sd(str(hub["sd15"])).unet.state_dict(), unet_weights(tmp_path / "two"), unet_weights(one)
    rel = (sum(((w1[k] - w2[k]) ** 2).sum() for k in w0) / sum(((w2[k] - w0[k]) ** 2).sum() for k in w0)).sqrt()
    assert rel < 1e-2
