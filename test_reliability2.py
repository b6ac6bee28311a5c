"""
Reliability, second round: a preempted run saves its step and resumes exactly, a full disk is one line and leaves OUT
consistent, and hostile files (a checkpoint that is not a zip, JSON nested 200,000 deep, a 20 MB caption, a LoRA of
NaNs or of rank 0, a 10,000-character eval prompt) end in one-line errors or counted cuts, never a traceback or a
black picture. On the toy model (tiny/), CPU only, offline:

    pytest test_reliability2.py
"""
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import data
import diffdpo
import eval
import files
import lora
import runs
import sample
import unet
from files import UserError
from tokenizer import MAX_PROMPT_CHARS

ROOT = Path(__file__).resolve().parent
TINY_UNET = str(ROOT / "tiny" / "unet")       # eval.py's tuned model where any will do
CAPTION = "a red circle on a blue background"
DEEP = "[" * 200_000 + "]" * 200_000           # 200,000 nested brackets: Python's parser recurses past its limit
PEAK_RSS_GIB = '[int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0] / 2**20'


def jpeg(color, seed):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None] + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def make_shard(path, n=8, first_caption=CAPTION):
    """n pairs in the Pick-a-Pic schema, a reddish image preferred over a bluish one; the first with its own caption."""
    rows = [dict(caption=first_caption if i == 0 else CAPTION, jpg_0=jpeg((200, 40, 40), 2 * i),
                 jpg_1=jpeg((40, 40, 200), 2 * i + 1), label_0=1.0, label_1=0.0) for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return make_shard(tmp_path_factory.mktemp("data") / "pairs.parquet")


@pytest.fixture(autouse=True)
def signal_handlers():
    """A run that failed in-process leaves its handlers installed (the CLI exits): put the test's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def toy_config(shard, out, **kw):
    return diffdpo.TrainConfig(**dict(dict(model="tiny", data=str(shard), out=str(out), batch_size=2, samples=False,
                                           device="cpu"), **kw))


def train_cli(shard, out, *extra):
    return [sys.executable, "diffdpo.py", "--model", "tiny", "--data", str(shard), "--out", str(out), "--batch-size",
            "2", "--no-samples", "--device", "cpu", *extra]


CLI_ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def one_line_exit(capsys, run, code=2):
    """Run `run()` (a CLI's main in this process): it exits with `code` and one "error: " line on stderr (besides any
    progress bar), whose text is returned."""
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    lines = re.findall(r"(?:^|[\r\n\]]|\x1b\[A)error: ([^\r\n]*)", err)  # at a line's start or after a progress bar
    assert e.value.code == code and len(lines) == 1 and "Traceback" not in err, (e.value.code, err[-2000:])
    return lines[0]


# ----------------------------------------------------------------------------------------------------------------
# files.py: bounded JSON, and a full disk as one line


def test_deep_json_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    """200,000 nested brackets in a model's config.json, a pairs.jsonl line, a style folder's metadata.jsonl and an eval
    prompt file: one-line errors naming the file (and line), not RecursionError; metrics.jsonl skips such a line;
    JSON files and JSONL lines past the size bound are refused the same way."""
    model = shutil.copytree(ROOT / "tiny", tmp_path / "model")
    (model / "unet" / "config.json").write_text(DEEP)
    with pytest.raises(files.LoadError, match=r"unet/config.json: not a readable JSON file \(JSON nested more than 64"):
        unet.load_sd(str(model))
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="p", chosen="a.png", rejected="b.png")) + "\n" + DEEP)
    with pytest.raises(files.DataError, match=r"pairs.jsonl:2: expected a JSON object .*nested more than 64"):
        data.open_pairs(tmp_path / "pairs.jsonl", resolution=32)
    (tmp_path / "style").mkdir()
    (tmp_path / "style" / "metadata.jsonl").write_text(DEEP + "\n")
    with pytest.raises(files.DataError, match=r"metadata.jsonl:1: expected a JSON object .*nested more than 64"):
        data.style_items(tmp_path / "style")
    (tmp_path / "prompts.json").write_text(DEEP)
    err = one_line_exit(capsys, lambda: eval.main(["--unet", TINY_UNET, "--prompts", str(tmp_path / "prompts.json"),
                                                   "--out", str(tmp_path / "eval")]))
    assert "prompts.json" in err and "JSON list of prompt strings" in err and not (tmp_path / "eval").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n' + DEEP + '\n{"step": 2}\n')
    assert [r["step"] for r in runs.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]

    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1000)
    (tmp_path / "big.json").write_text(json.dumps(["x" * 2000]))
    with pytest.raises(files.LoadError, match="big.json: not a readable JSON file .*more than"):
        files.read_json(tmp_path / "big.json")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt="x" * 2000, chosen="a", rejected="b")) + "\n")
    with pytest.raises(files.DataError, match="pairs.jsonl:1: a line longer than"):
        data.open_pairs(tmp_path / "pairs.jsonl", resolution=32)


def test_every_way_a_write_runs_out_of_space_is_one_line(tmp_path, monkeypatch):
    """ENOSPC, EDQUOT, safetensors' SafetensorError and torch.save's "unexpected pos" (what a full tmpfs gives each
    writer) are all the one-line NoSpaceError naming the file; the previous file is intact and no temporary file stays.
    Any other failure is not called a full disk."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")
    errors = [OSError(28, "No space left on device"), OSError(122, "Disk quota exceeded"),
              SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
              RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
              RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")]
    for error in errors:
        def write(tmp, error=error):
            tmp.write_bytes(b"half a file")
            raise error
        with pytest.raises(files.NoSpaceError, match=f"no space left on the disk of {tmp_path} to write "
                                                     f"checkpoint.pt .*free some disk space and re-run"):
            files.write_atomic(target, write)
        assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]

    def broken(tmp):
        raise RuntimeError("something else")
    with pytest.raises(RuntimeError, match="something else"):
        files.write_atomic(target, broken)

    def full(obj, f):
        raise errors[3]
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(files.NoSpaceError, match=r"unexpected pos 576 vs 534\); the previous checkpoint is intact: "
                                                 r"free some disk space and re-run the same command to resume"):
        runs.save_checkpoint(target, {"step": 1})


def test_full_disk_stops_the_run_in_one_line_and_out_stays_consistent(tmp_path, shard, capsys, monkeypatch):
    """A run whose disk fills up at step 2's checkpoint ends in one line (exit 2); checkpoint.pt is written before
    the user's weights, so OUT/unet/ never holds a step checkpoint.pt does not (here both hold step 1). With LoRA,
    the adapters' write failing after checkpoint.pt leaves them one step behind, and re-running the finished run
    writes them from the checkpoint."""
    out, real_save, saves = tmp_path / "full", torch.save, []

    def save_then_full(obj, f, *a, **kw):
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", save_then_full)
    err = one_line_exit(capsys, lambda: diffdpo.main(toy_config(shard, out, max_steps=3, checkpoint_every=1)))
    assert "no space left on the disk of" in err and "checkpoint.pt" in err and "free some disk space" in err
    monkeypatch.setattr(torch, "save", real_save)
    ckpt = runs.load_checkpoint(out / "checkpoint.pt")
    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert ckpt["step"] == 1 and all(torch.equal(weights[k], v) for k, v in ckpt["unet"].items())
    assert not [p for p in out.rglob("*") if files.TEMP_NAME.fullmatch(p.name)]

    out, real_file, writes = tmp_path / "lora", safetensors.torch.save_file, []

    def lora_then_full(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_file(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", lora_then_full)
    cfg = toy_config(shard, out, max_steps=2, checkpoint_every=1, lora_rank=2, lr=1e-3)
    err = one_line_exit(capsys, lambda: diffdpo.main(cfg))
    assert "pytorch_lora_weights.safetensors (Error while serializing" in err and "free some disk space" in err
    monkeypatch.setattr(safetensors.torch, "save_file", real_file)

    def adapters_match_checkpoint():
        held, ckpt = load_file(out / lora.LORA_FILE), runs.load_checkpoint(out / "checkpoint.pt")
        return ckpt["step"] == 2 and all(torch.equal(held[f"unet.{k}"], v) for k, v in ckpt["unet"].items())
    assert not adapters_match_checkpoint()                     # one step behind checkpoint.pt, never ahead of it
    diffdpo.main(cfg)
    assert "already at step 2" in capsys.readouterr().out and adapters_match_checkpoint()


# ----------------------------------------------------------------------------------------------------------------
# runs.py: stale temporary files, checkpoints that are not zips, preemption


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_temporary_files_are_removed_when_a_run_takes_the_lock(tmp_path, capsys):
    """What kill -9s during writes leave (NAME.tmpPID of a dead process, in OUT and its subfolders) is removed and
    counted in one line when the next run locks OUT; other files, a live process's temporary file and anything
    outside OUT stay."""
    dead, out = dead_pid(), tmp_path / "out"
    written = []
    files.write_atomic(tmp_path / "probe", lambda tmp: written.append(tmp.name) or tmp.write_text("x"))
    assert files.TEMP_NAME.fullmatch(written[0])                # the pattern is write_atomic's own
    stale = [out / f"checkpoint.pt.tmp{dead}", out / "unet" / f"diffusion_pytorch_model.safetensors.tmp{dead}"]
    kept = [out / "notes.tmp", out / "table.tmp12.csv", out / f"report.json.tmp{os.getppid()}",
            tmp_path / f"checkpoint.pt.tmp{dead}"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 1000)
    handle = runs.lock(out)
    handle.close()
    printed = capsys.readouterr().out
    assert f"removed 2 temporary files of interrupted writes from {out}" in printed and printed.count("\n") == 1
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_a_checkpoint_that_is_not_a_zip_is_one_line(tmp_path, shard, capsys):
    """10 bytes of text as checkpoint.pt (torch.load tried to unpickle it: KeyError: 101) -> the one-line error."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a zip\n")
    err = one_line_exit(capsys, lambda: diffdpo.main(toy_config(shard, out, max_steps=1)))
    assert "checkpoint.pt: not a readable diffdpo checkpoint (not a zip archive" in err and "delete it" in err


def test_sigterm_saves_the_step_and_the_rerun_resumes_exactly(tmp_path, shard):
    """SIGTERM between checkpoints (every 10 steps; sent after step >= 15, as SLURM's before a kill): the step under
    way finishes, checkpoint.pt holds it, one line says where and how to resume, exit status runs.STOPPED; re-running
    resumes there and ends with the weights of an uninterrupted run, exactly."""
    out = tmp_path / "preempted"
    p = subprocess.Popen(train_cli(shard, out, "--max-steps", "10000", "--checkpoint-every", "10"), cwd=ROOT,
                         env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(runs.read_metrics(out / "metrics.jsonl")) < 15:
        time.sleep(0.02)
    done = len(runs.read_metrics(out / "metrics.jsonl"))
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    saved = runs.load_checkpoint(out / "checkpoint.pt")["step"]
    assert p.returncode == runs.STOPPED and "Traceback" not in stderr, stderr[-2000:]
    assert done <= saved <= done + 2 and runs.read_metrics(out / "metrics.jsonl")[-1]["step"] == saved
    assert f"stopped by SIGTERM after step {saved}: {out / 'checkpoint.pt'} holds it; re-run the same command to " \
           f"resume (exit status {runs.STOPPED})" in stdout

    diffdpo.train(toy_config(shard, out, max_steps=20, checkpoint_every=10))
    straight = diffdpo.train(toy_config(shard, tmp_path / "straight", max_steps=20, checkpoint_every=10))
    a, b = (load_file(o / "unet" / "diffusion_pytorch_model.safetensors") for o in (out, straight))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"SIGTERM after step {done}: checkpoint.pt holds step {saved}; resumed to 20 vs straight: max |dw| {diff}")
    assert diff == 0.0 and [r["step"] for r in runs.read_metrics(out / "metrics.jsonl")] == list(range(1, 21))


def test_signal_handling_before_the_loop_and_a_second_signal(tmp_path):
    """Before the loop (loading, building pairs) a signal stops at once; in it the first is recorded for the step's
    end and a second stops at once, both with STOPPED; the handlers are put back; bad names are one line."""
    before = signal.getsignal(signal.SIGUSR1)
    stop = runs.StopSignals("TERM,USR1")
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)
    assert e.value.code == runs.STOPPED and signal.getsignal(signal.SIGUSR1) is before
    stop = runs.StopSignals("usr1")
    stop.at_step_end()
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert stop.requested(torch.device("cpu")) and stop.received == "SIGUSR1"
    with pytest.raises(SystemExit) as e:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(1)
    assert e.value.code == runs.STOPPED and signal.getsignal(signal.SIGUSR1) is before
    assert not runs.StopSignals("").requested(torch.device("cpu"))
    with pytest.raises(UserError, match="--save-on-signal TERM,KILL: KILL is not one of TERM, USR1"):
        runs.signal_numbers("TERM,KILL")


RANK_SCRIPT = """
import os, signal, torch, torch.distributed as dist
import runs
dist.init_process_group("gloo")
rank = dist.get_rank()
stop = runs.StopSignals("TERM,USR1", rank)
stop.at_step_end()
for step in range(1, 100):
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)                   # only rank 1 is signalled
    if stop.requested(torch.device("cpu")):
        print(f"rank {rank} stops after step {step}", flush=True)
        dist.destroy_process_group()
        stop.exit(step, "OUT")
"""


def test_every_rank_stops_after_the_same_step(tmp_path):
    """Two gloo processes, as torchrun starts them; only rank 1 gets SIGUSR1 (at step 3): both stop after step 3 and
    exit with STOPPED, rank 0's line saying another rank was signalled."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(CLI_ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], cwd=ROOT, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [runs.STOPPED] * 2, [o[1][-1000:] for o in outs]
    assert "rank 0 stops after step 3" in outs[0][0] and "rank 1 stops after step 3" in outs[1][0]
    assert "stopped by a signal to another rank after step 3" in outs[0][0]


# ----------------------------------------------------------------------------------------------------------------
# shards.py / data.py: captions bounded before tokenizing


def test_a_20_mb_caption_is_cut_and_counted(tmp_path):
    """A 20 MB caption in a parquet shard (and a long JSONL prompt) is cut to MAX_PROMPT_CHARS characters before
    anything tokenizes it, counted as long_captions in every metrics row and in the done line; a run's peak memory
    stays within 1.3x of the same shard without it. The tokenizer itself cuts as well."""
    long = "a red circle " * 1_600_000                                       # 20.8 MB
    make_shard(tmp_path / "long.parquet", first_caption=long)
    make_shard(tmp_path / "short.parquet")
    pairs = data.open_pairs(tmp_path / "long.parquet", resolution=32, flip=False)
    prompts = [pairs.item(s)["prompt"] for s in range(8)]
    assert long[:MAX_PROMPT_CHARS] in prompts and pairs.counts()["long_captions"] == 1
    (tmp_path / "pairs.jsonl").write_text(json.dumps(dict(prompt=long[:10_000], chosen="a.png", rejected="b.png")))
    jsonl = data.open_pairs(tmp_path / "pairs.jsonl", resolution=32)
    assert jsonl.counts()["long_captions"] == 1 and len(jsonl.shards[0].rows[0][0]) == MAX_PROMPT_CHARS
    tok = unet.load_sd("tiny").tokenizers[0]
    t0 = time.time()
    assert torch.equal(tok([long]), tok([long[:MAX_PROMPT_CHARS]])) and time.time() - t0 < 2

    code = ("import sys, diffdpo\ncfg = diffdpo.TrainConfig(model='tiny', data=sys.argv[1], out=sys.argv[2], "
            "max_steps=2, batch_size=2, samples=False, device='cpu')\ndiffdpo.train(cfg)\nprint('peak', " +
            PEAK_RSS_GIB + ")")
    runs_ = {k: subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{k}.parquet"), str(tmp_path / k)],
                                 cwd=ROOT, env=CLI_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in ("short", "long")}
    printed = {k: p.communicate(timeout=300) for k, p in runs_.items()}
    assert all(p.returncode == 0 for p in runs_.values()), [e[-1000:] for _, e in printed.values()]
    peak = {k: float(o.split("peak ")[-1]) for k, (o, _) in printed.items()}
    print(f"peak RSS: {peak['long']:.3f} GiB with the 20 MB caption, {peak['short']:.3f} GiB without "
          f"({peak['long'] / peak['short']:.2f}x)")
    assert peak["long"] < 1.3 * peak["short"]
    assert "0 empty captions, 1 long captions" in printed["long"][0]
    assert all(r["long_captions"] == 1 for r in runs.read_metrics(tmp_path / "long" / "metrics.jsonl"))


# ----------------------------------------------------------------------------------------------------------------
# lora.py: NaN / Inf and rank-0 adapters refused at load


def test_nan_inf_and_rank_0_lora_files_are_refused_at_load(tmp_path, capsys):
    """A LoRA file of NaN or Inf values names the file and tensor at load (sample.py wrote an all-black image and
    exited 0); rank-0 adapters, peft's (0, in) / (out, 0) or kohya's, too (ZeroDivisionError before)."""
    model = unet.load_sd("tiny").unet
    layers = lora.add_lora(model, 2)
    good = lora.lora_state_dict(model)
    key = f"unet.{layers[0]}.lora_B.weight"
    for name, value in [("nan", float("nan")), ("inf", float("inf"))]:
        save_file({**good, key: torch.full_like(good[key], value)}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(files.LoadError, match=f"{name}.safetensors: tensor {key} holds NaN or Inf values"):
            lora.load_lora(unet.load_sd("tiny").unet, tmp_path / f"{name}.safetensors")
    a, b = good[f"unet.{layers[0]}.lora_A.weight"], good[key]
    save_file({f"unet.{layers[0]}.lora_A.weight": a[:0], key: b[:, :0]}, str(tmp_path / "rank0.safetensors"))
    with pytest.raises(files.LoadError, match=r"rank0.safetensors: tensor .* has shape \(0, .*\), an empty \(rank-0\)"):
        lora.load_lora(unet.load_sd("tiny").unet, tmp_path / "rank0.safetensors")
    stem = "lora_unet_" + layers[0].replace(".", "_")
    kohya = {f"{stem}.lora_down.weight": a[:0], f"{stem}.lora_up.weight": b[:, :0], f"{stem}.alpha": torch.tensor(1.0)}
    save_file(kohya, str(tmp_path / "kohya0.safetensors"))
    with pytest.raises(files.LoadError, match="kohya0.safetensors: tensor .* an empty"):
        lora.load_lora(unet.load_sd("tiny").unet, tmp_path / "kohya0.safetensors")
    err = one_line_exit(capsys, lambda: sample.main(["--lora", str(tmp_path / "nan.safetensors"), "--prompt", CAPTION,
                                                     "--out", str(tmp_path / "grid.png"), "--device", "cpu"]))
    assert "nan.safetensors: tensor" in err and not (tmp_path / "grid.png").exists()


# ----------------------------------------------------------------------------------------------------------------
# sample.py / eval.py: what is generated is finite; eval's prompts are checked before any generation


def test_non_finite_generation_is_an_error_not_a_black_picture(tmp_path, capsys):
    """A UNet that outputs Inf (finite-looking files can still overflow): generate raises instead of decoding black
    pictures, and eval.py stops in one line before writing any image."""
    sd = unet.load_sd("tiny")
    with torch.no_grad():
        sd.unet.conv_out.bias.fill_(float("inf"))
    with pytest.raises(UserError, match="the sampled latents hold NaN or Inf values"):
        sample.generate(sd, [CAPTION], steps=2, height=32, width=32)
    unet.save_unet(sd.unet, tmp_path / "broken")
    err = one_line_exit(capsys, lambda: eval.main(["--unet", str(tmp_path / "broken"), "--num", "2", "--steps", "2",
                                                   "--out", str(tmp_path / "eval"), "--device", "cpu"]))
    assert "NaN or Inf" in err and not (tmp_path / "eval" / "images").exists()


def test_eval_prompts_are_checked_before_any_generation(tmp_path, capsys):
    """A 10,000-character prompt, an empty one, or one the toy judge cannot score: one line, exit 2, in seconds, before
    any model is loaded or image generated (the long one was refused after all images were made)."""
    cases = [("long.txt", f"{CAPTION}\n{'a' * 10_000}\n", "prompt 2 has 10,000 characters, more than 4,000"),
             ("empty.json", json.dumps([CAPTION, " "]), "prompt 2 is empty"),
             ("cat.txt", "a photo of a cat\n", "prompt 1: shapes: caption 'a photo of a cat' is not of the form")]
    for name, text, message in cases:
        (tmp_path / name).write_text(text)
        t0 = time.time()
        err = one_line_exit(capsys, lambda: eval.main(["--unet", TINY_UNET, "--prompts", str(tmp_path / name),
                                                       "--out", str(tmp_path / "eval"), "--device", "cpu"]))
        assert message in err and f"--prompts {tmp_path / name}" in err and time.time() - t0 < 5, err
        assert not (tmp_path / "eval").exists()
