"""Shared run-time infrastructure for the five reproduction scripts.

Sections (in order): run helpers; audio I/O and manifests; datasets and loaders; generated data
(data/*.py loaded on demand); downstream tasks; front-ends; augmentation; samplers; metrics;
checkpoints and weight averaging.

Making data lives in data/: data/synthetic.py (the synthetic corpus, downstream tasks and the
unlabelled stream) and data/prepare.py (real datasets -> our layout); data/bench.py measures the
data path (loader and front-ends). This module loads them only when something must be built or
streamed, so a script + common.py run on real data without data/. Their names stay reachable as
common.<name> (e.g. common.synthetic_stream).

This module never imports a script; scripts pass their own classes and functions in.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.signal import resample_poly
from scipy.special import ndtri
from scipy.stats import rankdata

SR = 16000
HERE = Path(__file__).resolve().parent
SYNTH_ROOT = HERE / "data" / "synth"
AUDIOSET_META = HERE / "data" / "audioset"
TASKS_ROOT = HERE / "data" / "synth_tasks"


# =============================================================================================
# Run helpers: arguments, seeding, device, AMP, DDP, logging, results
# =============================================================================================
def number(kind=float, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False):
    """argparse type: a finite int/float within [lo, hi] (open ends with lo_open/hi_open); a bad value
    is a one-line usage error at parse time, before anything is written."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and (v >= hi if hi_open else v > hi)):
            rng = (("(" if lo_open or lo is None else "[") + ("-inf" if lo is None else f"{lo:g}") + ", "
                   + ("inf" if hi is None else f"{hi:g}") + (")" if hi_open or hi is None else "]"))
            raise argparse.ArgumentTypeError(f"{text} is outside {rng}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT, NONNEG_INT = number(int, 1), number(int, 0)
POSITIVE, NONNEG, FRACTION = number(float, 0, lo_open=True), number(float, 0), number(float, 0, 1)


def add_common_args(p: argparse.ArgumentParser, script: str) -> None:
    """The flags every script shares (docs/common.md). Paper values are set by scripts."""
    g = p.add_argument_group("common")
    g.add_argument("--data-root", type=str, default=None,
                   help="corpus in our layout (docs/data.md); default: the synthetic corpus in data/synth")
    g.add_argument("--data", type=str, default="balanced", choices=["balanced", "full", "300h"],
                   help="training manifest: balanced, full (balanced+unbalanced) or 300h")
    g.add_argument("--out", type=str, default=None, help=f"run folder (default runs/{script}/<name>)")
    g.add_argument("--name", type=str, default=None, help="run name (default derived from the flags)")
    g.add_argument("--device", type=str, default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--amp", type=str, default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, none elsewhere")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training forward (same results, faster on a GPU)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--workers", type=NONNEG_INT, default=2, help="DataLoader worker processes")
    g.add_argument("--max-steps", type=POSITIVE_INT, default=None, help="stop each training stage after this many steps (smoke runs; default: no limit)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the run folder's checkpoints (stages whose output exists are skipped)")
    g.add_argument("--synth-scale", type=POSITIVE, default=1.0, help="size of the synthetic corpus (1.0 ~ 1,600 clips)")
    g.add_argument("--synth-clip-seconds", type=POSITIVE, default=10.0, help="clip length of the synthetic corpus")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state a run draws from (torch CPU and CUDA, numpy, Python), for checkpoints:
    restoring it makes a resumed run continue exactly as an uninterrupted one."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location may have moved it
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: distinct, reproducible numpy/random seeds per worker."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """One precision switch: a real autocast on an accelerator, and on CPU for an explicit bf16
    (`--amp bf16`; `auto` is none on CPU); a no-op otherwise."""
    if dtype is None or (device.type == "cpu" and dtype != torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Only fp16 needs loss scaling; a disabled scaler passes everything through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


def setup_ddp() -> tuple[int, int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0))


def cleanup_ddp() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed():
    """`with common.distributed():` around a script's stages: torchrun's process group (setup_ddp)
    for the block, destroyed however it ends; a plain `python` run has none."""
    setup_ddp()
    try:
        yield
    finally:
        cleanup_ddp()


def cli(main) -> None:
    """A script's entry point: bad input (DataError) is one line and a non-zero exit, no traceback."""
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (after a rank-0 write that the others read next); a no-op without DDP."""
    if dist.is_initialized():
        dist.barrier()


class RunLogger:
    """One compact stdout line and one JSON line in out/log.jsonl per call (rank 0 only)."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / "log.jsonl"

    def log(self, record: dict) -> None:
        if not is_main():
            return
        record = {"time": round(time.time(), 1), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in record.items() if k != "time"), flush=True)

    def log_once(self, record: dict, keys: tuple[str, ...]) -> None:
        """Log `record` unless a line with the same values of `keys` is there already (a resumed run
        writes the line of its last checkpoint that a kill kept from the log; never twice)."""
        if not is_main():
            return
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        if not any(all(json.loads(l).get(k) == record.get(k) for k in keys) for l in lines if l.strip()):
            self.log(record)


# ---------------------------------------------------------------------------------------------
# The run-time idiom (the same few calls in every script):
#   lock = claim_run(out, script, identity, resume, OUTPUTS)  the run folder: config.json, refusal, lock
#   folder = stage_dir(parent, name, settings)                a shared stage: the path is the identity
#   save_state(path, model, opt, scaler, step=...)            one atomic checkpoint with every RNG state
#   state = load_state(path, model, opt, scaler)              resume it (None when there is none)
#   optimizer_step(loss, opt, scaler); mean = Mean(device)    the GPU-ready step (no host sync)
#   report(out, results, markdown)                            results.json / results.md, printed
# ---------------------------------------------------------------------------------------------
IDENTITY_IGNORED = {"out", "name", "device", "workers", "resume", "table", "compile"}


def identity(args: argparse.Namespace | dict, ignore=()) -> dict:
    """The result-affecting settings of a run: every flag but where it runs and how it is called
    (IDENTITY_IGNORED, plus `ignore`), JSON-normalised so that a saved copy compares equal.
    --max-steps is part of it: a run cut short is never returned as the full run."""
    d = vars(args) if isinstance(args, argparse.Namespace) else args
    keep = {k: v for k, v in sorted(d.items()) if k not in IDENTITY_IGNORED | set(ignore)}
    return json.loads(json.dumps(keep, default=str))


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]


def flag_diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"--{k.replace('_', '-')} {old.get(k, '(unset)')} (now {new.get(k, '(unset)')})" for k in keys)


def owned_files(folder: Path, outputs) -> list[Path]:
    """The files in `folder` matching the glob patterns `outputs` (what a script writes there)."""
    return sorted({p for pat in outputs for p in folder.glob(pat) if p.is_file() or p.is_symlink()})


def claim_run(out: str | Path, script: str, ident: dict, resume: bool, outputs=()) -> "RunLock":
    """Claim a run folder before anything is written, and return its lock (use as `with`):
    - `out` a file, unwritable, another script's run, or a run made with other settings (with resume):
      one line naming the folder or the differing flags;
    - a folder that holds a user's files named like ours (no config.json): refused, nothing overwritten;
    - --no-resume: removes only the files this script writes there (the glob patterns `outputs`, plus
      config.json and log.jsonl), never anything else, then empty folders it leaves;
    - writes config.json = {script, identity, hash}. Rank 0 alone writes; the others wait."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    outputs = ("config.json", "log.jsonl", "results.json", "results.md", *outputs)
    lock = RunLock(out).__enter__()
    try:
        cfg = out / "config.json"
        try:
            old = json.loads(cfg.read_text()) if cfg.exists() else None
            old = old if isinstance(old, dict) or old is None else {"script": "?"}
        except (ValueError, OSError):
            raise DataError(f"{cfg}: unreadable config.json (not a run folder of {script}.py?)") from None
        if old is not None and "script" not in old and "identity" in old:
            old["script"] = script  # a run folder written before config.json named its script
        if old is not None and old.get("script") != script:
            raise DataError(f"--out {out}: a run folder of {old.get('script')}.py, not {script}.py; use another --out")
        if old is None and owned_files(out, outputs):
            raise DataError(f"--out {out}: holds {owned_files(out, outputs)[0].name}, not written by {script}.py; "
                            f"use another --out")
        if old is not None and resume and old.get("identity") != ident:
            raise DataError(f"{out}: this run was made with other settings: {flag_diff(old.get('identity') or {}, ident)};"
                            f" use another --out, or --no-resume to start it afresh")
        if is_main():
            if old is not None and not resume:
                for p in owned_files(out, outputs):
                    p.unlink()
                for d in sorted((d for d in out.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                    if not any(d.iterdir()):
                        d.rmdir()
            write_json(cfg, {"script": script, "identity": ident, "identity_hash": settings_hash(ident)})
        barrier()
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return lock


def stage_dir(parent: str | Path, name: str, settings: dict) -> Path:
    """A shared stage (a teacher, a relabel cache, an upstream, a pre-trained encoder, cached features):
    `parent/<name>-<hash of the settings that change its result>` (PANNs: the path is the identity), with
    stage.json recording the settings. Two settings never share a folder, so nothing is refused or found
    by glob or mtime; two runs that need the same stage share it (lock it with RunLock(folder, wait=True))."""
    settings = json.loads(json.dumps(settings, default=str))
    folder = Path(parent) / f"{name}-{settings_hash(settings)}"
    if is_main():
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "stage.json").exists():
            write_json(folder / "stage.json", settings)
    barrier()
    return folder


class RunLock:
    """An exclusive lock on a folder (folder/.lock, flock), held by rank 0 until released or the process
    ends. wait=False: a second run on the same folder is refused with one line; wait=True: it waits
    (two runs sharing one stage: the second reuses what the first made)."""

    def __init__(self, out: str | Path, wait: bool = False):
        self.path, self.wait, self.file = Path(out) / ".lock", wait, None

    def __enter__(self):
        if not is_main():
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise DataError(f"{self.path.parent}: cannot write the run folder ({e.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError:
            self.file.close()
            self.file = None
            raise DataError(f"{self.path.parent}: in use by another run (lock {self.path}); wait for it "
                            f"or use another --out") from None
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path, what: str = "file") -> dict:
    """A JSON file, or one line naming it when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
        raise DataError(f"{path}: not a valid JSON {what}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows each flag's default (unless it is None or the help
    already names one)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (action.default not in (None, argparse.SUPPRESS) and "default" not in h and action.option_strings
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction,
                                            argparse._StoreFalseAction))):
            d = action.default
            d = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else d
            h += f" (default: {d})"
        return h


def command_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a script's sub-command (`psla.py predict`, `ofa_aec.py plot`, ...): the one-paragraph
    description wrapped to 100 columns, every flag's default shown."""
    import textwrap
    return argparse.ArgumentParser(prog=prog, description=textwrap.fill(description, 100), epilog=epilog,
                                   formatter_class=HelpFormatter)


def figure(path: str | Path, draw, size=(6.4, 4.2)) -> Path:
    """Draw one figure with matplotlib (headless: Agg) by calling draw(ax) and save it as PNG at `path`.
    Scripts plot only numbers they read from results.json; draw returns nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=size)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    print(f"figure: {path}", flush=True)
    return Path(path)


def peak_memory_gb() -> float:
    """Peak resident memory of this process and its finished children (loader workers), in GB."""
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return kb / 1e6


def report(out: str | Path, results: dict, markdown: str, quiet: bool = False) -> dict:
    """The end of every script: results.json (machine-readable) and results.md (the paper-style table)
    in the run folder, the table printed with where it went and the peak memory. Rank 0 alone writes."""
    if is_main():
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "results.json", results)
        (Path(out) / "results.md").write_text(markdown.rstrip() + "\n")
        if not quiet:
            print(f"{markdown.rstrip()}\n\nresults: {Path(out) / 'results.md'} (peak memory {peak_memory_gb():.1f} GB)",
                  flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Checkpoint / resume: one atomic file with model, optimizer, scaler, every RNG state and the loop's
# state (step, best metric, data position), so a run killed anywhere continues bit-exactly.
# ---------------------------------------------------------------------------------------------
KILL_COUNTS: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test hook for the exact-resume tests: with KILL_AT=<name>:<n> in the environment, SIGKILL this
    process the n-th time it passes `name` ('step': after an optimizer step; 'write': inside a checkpoint
    write, temp file written, not yet renamed; 'saved': after a checkpoint is in place). A no-op otherwise."""
    spec = os.environ.get("KILL_AT")
    if spec and spec.rsplit(":", 1)[0] == name:
        KILL_COUNTS[name] = KILL_COUNTS.get(name, 0) + 1
        if KILL_COUNTS[name] == int(spec.rsplit(":", 1)[1]):
            os.kill(os.getpid(), 9)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind a DDP or torch.compile wrapper (its state dict has the plain keys)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_state(path: str | Path, model: nn.Module, optimizer=None, scaler=None, **state) -> None:
    """One checkpoint (atomic): model, optimizer, scaler, every RNG state, and `state` (step, best metric,
    data position, ...; plain values). Rank 0 alone writes."""
    save_checkpoint(path, {"model": unwrap(model).state_dict(),
                           "optimizer": optimizer.state_dict() if optimizer is not None else None,
                           "scaler": scaler.state_dict() if scaler is not None else None,
                           "rng": rng_state(), "state": state})


def load_state(path: str | Path, model: nn.Module, optimizer=None, scaler=None) -> dict | None:
    """Resume from save_state's file: restores model, optimizer, scaler and every RNG state, and returns
    the saved `state` dict; None when there is no checkpoint (a fresh start)."""
    path = Path(path)
    if not path.exists():
        return None
    ck = load_checkpoint(path, next(unwrap(model).parameters()).device)
    unwrap(model).load_state_dict(ck["model"])
    if optimizer is not None and ck.get("optimizer") is not None:
        optimizer.load_state_dict(ck["optimizer"])
    if scaler is not None and ck.get("scaler") is not None:
        scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck.get("rng"))
    return ck["state"]


# ---------------------------------------------------------------------------------------------
# The step, written once for a GPU and for CPUs: autocast (above), a scaler only for fp16, no host
# sync per step (losses are summed on the device and read at log time), pinned non-blocking copies.
# ---------------------------------------------------------------------------------------------
def setup_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype | None]:
    """The training device and autocast dtype from --device / --amp; cuDNN autotuning on CUDA."""
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, amp_dtype(device, args.amp)


def to_device(batch, device: torch.device):
    """Tensors of a batch onto the device without a host sync (pinned memory, non_blocking)."""
    return tuple(t.to(device, non_blocking=True) if torch.is_tensor(t) else t for t in batch)


def compiled(model: nn.Module, on: bool) -> nn.Module:
    """--compile: torch.compile the training forward (the plain module is kept for saving and eval). Random
    ops inside the graph draw from torch's generator as in eager mode (fallback_random), so a compiled run
    makes the same augmentation draws."""
    if not on:
        return model
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    return torch.compile(model)


def optimizer_step(loss: torch.Tensor, optimizer, scaler, params=None, max_norm: float | None = None) -> None:
    """zero_grad -> (scaled) backward -> optional gradient clipping -> step -> scaler update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if max_norm is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(optimizer)
    scaler.update()
    kill_point("step")


class Mean:
    """A running mean kept on the device: add() never syncs with the host; read() does, once, at log time."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sum, self.n = torch.zeros((), dtype=torch.float64, device=self.device), 0

    def add(self, value: torch.Tensor) -> None:
        self.sum += value.detach().to(torch.float64)
        self.n += 1

    def read(self) -> float:
        v = float(self.sum) / self.n if self.n else float("nan")
        self.reset()
        return v


def wrap_ddp(model: nn.Module, find_unused: bool = False) -> nn.Module:
    """The module to train: DistributedDataParallel under torchrun, the model itself otherwise.
    find_unused: a network whose forward uses another subset of its parameters at each step (a
    weight-sharing supernet: a depth-1 pass leaves a conv unused; their gradients stay None, as in one
    process; plain DDP stops with an error at the next step)."""
    if world_size() == 1:
        return model
    dev = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                               find_unused_parameters=find_unused)


def shard(indices) -> np.ndarray:
    """This rank's share of one epoch's (global, identical on every rank) indices, padded by wrapping to a
    multiple of the world size as DistributedSampler does, so every rank makes the same number of steps."""
    indices, w = np.asarray(indices), world_size()
    if w == 1:
        return indices
    return np.resize(indices, math.ceil(len(indices) / w) * w)[rank()::w]


def from_rank0(value):
    """Rank 0's value on every rank (a no-op without DDP), for decisions all ranks must share: a
    validation metric (checkpoint ranking, early stop), whether a cache is reused."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(n: int) -> int:
    """Sum of an integer over the ranks (counts such as skipped clips: each rank counts its own share)."""
    if world_size() == 1:
        return n
    out = [0] * world_size()
    dist.all_gather_object(out, n)
    return sum(out)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> nn.Module:
    """Re-estimate every BatchNorm's running mean / variance as the batch-size-weighted mean of the batch
    statistics over `batches` (model inputs on the model's device; once-for-all's set_running_statistics),
    in eval mode but with BN in train mode, so dropout and everything else stay as in evaluation."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    seen = 0
    for x in batches:
        b = len(x)
        for m in bns:
            m.momentum = b / (seen + b)  # running = weighted mean of the batches so far
        model(x)
        seen += b
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def readable_scores(y_true: np.ndarray, scores: np.ndarray, metric=None) -> dict:
    """One convention for unreadable clips in batched prediction: their score rows are NaN; they are
    excluded from the metric and counted. metric(y_true, scores) -> dict or float (default:
    tagging_metrics). Returns the metric's dict (or {'score': float}) with n (clips scored) and skipped."""
    ok = ~np.isnan(scores).any(1)
    m = (metric or tagging_metrics)(np.asarray(y_true)[ok], scores[ok]) if ok.any() else {"score": float("nan")}
    m = m if isinstance(m, dict) else {"score": float(m)}
    return m | {"n": int(ok.sum()), "skipped": int((~ok).sum())}


def apply_preset(args: argparse.Namespace, presets: dict, script: str) -> argparse.Namespace:
    """--preset auto|paper|cpu (every script): `auto` is the paper's schedule where the paper's
    compute exists (a CUDA GPU) and the CPU preset otherwise, whatever the corpus; the preset fills every
    flag left at None (a flag given on the command line wins). Prints one line: the preset and why."""
    device = pick_device(getattr(args, "device", "auto"))
    if args.preset != "auto":
        why = "--preset " + args.preset
    elif device.type == "cuda":
        args.preset, why = "paper", f"auto: a GPU ({torch.cuda.get_device_name(device)})"
    else:
        args.preset, why = "cpu", f"auto: no CUDA GPU ({device.type}); --preset paper for the paper's schedule"
    given = [k for k in presets[args.preset] if getattr(args, k) is not None]
    for k, v in presets[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if is_main():
        print(f"{script}: preset {args.preset} ({why})" + (f"; given flags kept: {', '.join(given)}" if given else ""),
              flush=True)
    return args


def plateau_report(values: list[float], higher: bool = True, tol: float = 0.005) -> dict:
    """A stage's convergence line for its log and results.json: whether validation reached a plateau
    (`plateau`: the last quarter gained <= tol over the best before it), that gain (`gain`: the last
    quarter's best minus the best before it, positive = better, None under 4 values), the best and the
    last values."""
    return {"plateau": plateau(values, higher, tol), "tolerance": tol, "validations": len(values),
            "gain": last_quarter_gain(values, higher),
            "best": (max if higher else min)(values) if values else None, "last": values[-1] if values else None}


def signed(x: float | None, digits: int = 4) -> str:
    """A gain for a log line: '+0.0160', '-0.0030', or 'n/a' (None: too few values, or a report from before
    the gain was kept)."""
    return "n/a" if x is None else f"{x:+.{digits}f}"


def last_quarter_gain(values: list[float], higher: bool = True) -> float | None:
    """How much the last quarter of a validation curve (at least 2 values) improved on the best before it
    (negative: it did not); None under 4 values. `plateau` is this gain <= its tolerance."""
    if len(values) < 4:
        return None
    v = np.asarray(values, dtype=np.float64) * (1 if higher else -1)
    q = max(2, len(v) // 4)
    return float(v[-q:].max() - v[:-q].max())


def plateau(values: list[float], higher: bool = True, tol: float = 0.005) -> bool:
    """Whether a validation curve reached a plateau: its last quarter of validations (at least 2) gained
    no more than `tol` over the best before them (at least 4 validations in all)."""
    if len(values) < 4:
        return False
    v = np.asarray(values, dtype=np.float64) * (1 if higher else -1)
    q = max(2, len(v) // 4)
    return bool(v[:-q].max() >= v.max() - tol)


# ---------------------------------------------------------------------------------------------
# Seeds tables: `python common.py seeds --row NAME RUN... --row NAME RUN... [--key mAP]`
# ---------------------------------------------------------------------------------------------
def mean_std(v, scale: float = 1.0, digits: int = 4) -> str:
    """'mean +- sample std' of a direction run's per-seed values (std 0 for a single value)."""
    sd = np.std(v, ddof=1) if len(v) > 1 else 0.0
    return f"{scale * np.mean(v):.{digits}f} +- {scale * sd:.{digits}f}"


def paired_difference(a, b, scale: float = 1.0, digits: int = 4) -> str:
    """Signed 'mean +- sample std' of the paired differences a[i] - b[i] (the same seed / trial in both); with one
    pair, the difference alone."""
    d = scale * (np.asarray(a, float) - np.asarray(b, float))
    return f"{d.mean():+.{digits}f}" + (f" +- {d.std(ddof=1):.{digits}f}" if len(d) > 1 else "")


def result_value(results: dict, key: str, where: str) -> float:
    """A number in a results.json by a dotted key ('mAP', 'student.best_val_mAP', 'rows.0.mAP')."""
    v = results
    for part in key.split("."):
        if isinstance(v, list) and part.isdigit() and int(part) < len(v):
            v = v[int(part)]
        elif isinstance(v, dict) and part in v:
            v = v[part]
        else:
            raise DataError(f"{where}: no {key!r} in results.json")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise DataError(f"{where}: {key!r} in results.json is not a number")
    return float(v)


def seeds_table(rows: list[list[str]], keys: list[str], out: str | Path, pairs: list[list[str]] = (),
                minus: list[list[str]] = ()) -> dict:
    """The direction-run table: for each row (a name and its run folders, one per seed, the same seed order
    in every row) mean +- sample std of each key over the runs, the paired difference (same seed) of the
    first key from the first row, and for each pair (A, B) of keys the paired difference A - B within each
    run (e.g. WA against the single model of the same runs), and for each pair (A, B) of row names the paired
    difference of the first key, row A - row B, seed by seed (e.g. PSL-2s against PSL-5s; kept in row A's
    "minus" as {B: values}). Writes out/results.json and results.md."""
    table, lines = {}, []
    used = list(dict.fromkeys([*keys, *(k for pair in pairs for k in pair)]))  # each key read once per run
    for i, (name, *runs) in enumerate(rows):
        if not runs:
            raise DataError(f"--row {name}: no run folders")
        res = [read_json(Path(r) / "results.json", "results.json (not a finished run?)") for r in runs]
        t = table[name] = {k: [result_value(x, k, r) for x, r in zip(res, runs)] for k in used} | {"runs": runs}
        first = table[rows[0][0]][keys[0]]
        t["minus_first"] = [a - b for a, b in zip(t[keys[0]], first)] if i and len(first) == len(runs) else None
        t["paired"] = {f"{a} - {b}": [x - y for x, y in zip(t[a], t[b])] for a, b in pairs}  # not a key's values
        lines.append([name, len(runs), *(mean_std(t[k]) for k in keys), " / ".join(f"{v:.4f}" for v in t[keys[0]]),
                      mean_std(t["minus_first"]) if t["minus_first"] else "-",
                      *(paired_difference(t[a], t[b]) for a, b in pairs)])
    md = markdown_table(["setting", "seeds", *keys, f"{keys[0]} per seed", f"{keys[0]} - {rows[0][0]} (paired)",
                         *(f"{a} - {b} (paired)" for a, b in pairs)], lines)
    between = []
    for a, b in minus:  # row A - row B, the same seed in both
        if a not in table or b not in table or len(table[a]["runs"]) != len(table[b]["runs"]):
            raise DataError(f"--minus {a} {b}: both must be --row names with as many runs (one per seed)")
        d = table[a].setdefault("minus", {})[b] = [x - y for x, y in zip(table[a][keys[0]], table[b][keys[0]])]
        between.append([f"{a} - {b}", paired_difference(table[a][keys[0]], table[b][keys[0]]),
                        " / ".join(f"{v:+.4f}" for v in d)])
    if between:
        md += "\n\n" + markdown_table(["rows", f"{keys[0]} (paired)", "per seed"], between)
    return report(out, table, "# Direction run: mean +- sample std over seeds\n\n" + md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="common.py", description="project-wide commands", formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("seeds", help="mean +- sample std over seeds of any results.json key, paired differences",
                       description="One row per setting: its run folders (one per seed, in the same seed order in "
                                   "every row); prints mean +- sample std of each --key and each row's paired "
                                   "difference from the first row; writes OUT/results.json and results.md.")
    s.add_argument("--row", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                   help="a row name followed by its run folders")
    s.add_argument("--key", action="append", default=None,
                   help="results.json key, dotted for nested ones (repeatable; default mAP)")
    s.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="two results.json keys: each row's paired difference A - B within its runs (repeatable)")
    s.add_argument("--minus", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="two row names: the paired difference of the first key, row A - row B, seed by seed (repeatable)")
    s.add_argument("--out", default="runs/seeds", help="folder for results.json / results.md (default runs/seeds)")
    a = p.parse_args(argv)
    seeds_table(a.row, a.key or ["mAP"], a.out, a.pair, a.minus)


def paper_heading(corpus, what: str = "paper") -> str:
    """Column heading for the paper's AudioSet numbers: plain on an AudioSet-like corpus (real, 527
    classes), flagged on any other corpus, where they are a reference, not a comparison."""
    audioset = not corpus.synthetic and len(corpus.labels) == 527
    return f"{what} (AudioSet)" if audioset else f"{what} (AudioSet, not comparable)"


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# =============================================================================================
# Audio I/O and manifests
# =============================================================================================
class DataError(ValueError):
    """Bad input: the message names the file or manifest row."""


def resample(x: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Polyphase resampling with a Kaiser-windowed sinc low-pass (scipy.signal.resample_poly)."""
    if orig_sr == new_sr:
        return x
    g = math.gcd(int(orig_sr), int(new_sr))
    return resample_poly(x, new_sr // g, orig_sr // g, axis=-1).astype(np.float32)


def load_audio(path: str | Path, sr: int = SR, start_s: float = 0.0, end_s: float | None = None) -> np.ndarray:
    """Read wav/flac/ogg as float32 mono at `sr`: multichannel is averaged, other rates resampled."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: audio file not found")
    try:
        info = sf.info(path)
        start = int(round(start_s * info.samplerate))
        stop = None if end_s is None else int(round(end_s * info.samplerate))
        x, file_sr = sf.read(path, start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types; report them all the same way
        raise DataError(f"{path}: cannot read audio ({e})") from None
    if not np.isfinite(x).all():  # a float file holding NaN/Inf would poison statistics and losses
        raise DataError(f"{path}: {int((~np.isfinite(x)).sum())} non-finite samples (NaN/Inf)")
    x = x.mean(axis=1)  # (samples,) mono
    return resample(x, file_sr, sr)


def crop_or_pad(x: np.ndarray, n: int) -> np.ndarray:
    """Cut to the first n samples or zero-pad at the end."""
    if len(x) >= n:
        return x[:n]
    return np.pad(x, (0, n - len(x)))


@dataclass
class Labels:
    """class_labels_indices.csv: index -> (mid, display name)."""
    mids: list[str]
    names: list[str]
    index: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.index = {m: i for i, m in enumerate(self.mids)}

    def __len__(self) -> int:
        return len(self.mids)


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file, or one line naming it (missing, a folder, not text)."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise DataError(f"{path}: not a UTF-8 text {what}") from None


def read_class_labels(path: str | Path) -> Labels:
    """class_labels_indices.csv: index,mid,display_name (AudioSet's own file)."""
    rows = list(csv.DictReader(read_text(path, "class list").splitlines()))
    if not rows:
        raise DataError(f"{path}: no classes")
    if not {"index", "mid", "display_name"} <= set(rows[0]):
        raise DataError(f"{path}: expected the header 'index,mid,display_name', got {','.join(rows[0])!r}")
    try:
        rows.sort(key=lambda r: int(r["index"]))
    except (TypeError, ValueError):
        raise DataError(f"{path}: a non-integer index") from None
    return Labels([r["mid"] for r in rows], [r["display_name"] for r in rows])


@dataclass
class Ontology:
    """AudioSet ontology.json: names, direct children and direct parents (a DAG)."""
    names: dict[str, str]
    children: dict[str, list[str]]
    parents: dict[str, list[str]]
    abstract: set[str] = field(default_factory=set)  # nodes whose restrictions are exactly ['abstract']

    def ancestors(self, mid: str, through_abstract: bool = True) -> set[str]:
        """All ancestors through any chain of parents (transitive, multiple parents). With
        through_abstract False, abstract nodes are neither returned nor crossed (PSLA's official code)."""
        ok = lambda p: through_abstract or p not in self.abstract
        seen, stack = set(), [p for p in self.parents.get(mid, []) if ok(p)]
        while stack:
            p = stack.pop()
            if p not in seen:
                seen.add(p)
                stack.extend(q for q in self.parents.get(p, []) if ok(q))
        return seen


def read_ontology(path: str | Path) -> Ontology:
    nodes = read_json(path, "ontology")
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "id" in n and "name" in n for n in nodes):
        raise DataError(f"{path}: expected AudioSet's ontology format, a list of {{id, name, child_ids}}")
    names = {n["id"]: n["name"] for n in nodes}
    children = {n["id"]: list(n.get("child_ids", [])) for n in nodes}
    parents: dict[str, list[str]] = {}
    for p, cs in children.items():
        for c in cs:
            parents.setdefault(c, []).append(p)
    return Ontology(names, children, parents, {n["id"] for n in nodes if n.get("restrictions") == ["abstract"]})


Row = tuple[str, list[str]]  # (filename relative to the data root, [mids])


def read_manifest(path: str | Path) -> list[Row]:
    """filename<TAB>labels (comma-separated mids); a header line 'filename...' is skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    rows = []
    for lineno, line in enumerate(read_text(path, "manifest").splitlines(), 1):
        if not line or (lineno == 1 and line.startswith("filename")):
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{path}:{lineno}: expected 'filename<TAB>labels', got {line!r}")
        rows.append((parts[0], [m for m in parts[1].split(",") if m]))
    if not rows:
        raise DataError(f"{path}: empty manifest")
    return rows


def write_manifest(path: str | Path, rows: list[Row]) -> None:
    with open(path, "w") as f:
        f.write("filename\tlabels\n")
        f.writelines(f"{fn}\t{','.join(mids)}\n" for fn, mids in rows)


def check_labels(rows: list[Row], labels: Labels, where: str = "manifest") -> None:
    """An unknown label id is an error naming the row (a set check: no (N, K) array at AudioSet scale)."""
    known = labels.index
    for i, (fn, mids) in enumerate(rows):
        for m in mids:
            if m not in known:
                raise DataError(f"{where}: row {i + 1} ({fn}): unknown label id {m!r}")


def multi_hot(rows: list[Row], labels: Labels, where: str = "manifest", dtype=np.float32) -> np.ndarray:
    """(N, K) targets (float32 by default); an unknown label id is an error naming the row."""
    check_labels(rows, labels, where)
    index = labels.index
    cols = [index[m] for _, mids in rows for m in mids]
    lens = [len(mids) for _, mids in rows]
    y = np.zeros((len(rows), len(labels)), dtype=dtype)
    y[np.repeat(np.arange(len(rows)), lens), cols] = 1
    return y


def read_strong(path: str | Path) -> dict[str, list[tuple[float, float, str]]]:
    """strong_<split>.tsv: id, onset, offset, label -> {id: [(onset, offset, mid)]}. The id is our
    filename or AudioSet's own segment_id (<YouTube id>_<start ms>); tab- or comma-separated; a header
    line is recognised by its non-numeric onset (a header-less file keeps its first event)."""
    events: dict[str, list[tuple[float, float, str]]] = {}
    for lineno, line in enumerate(read_text(path, "strong-label file").splitlines(), 1):
        parts = [p.strip() for p in line.rstrip("\n").split("\t" if "\t" in line else ",")]
        if not line.strip():
            continue
        try:
            fn, on, off, mid = parts[0], float(parts[1]), float(parts[2]), parts[3]
        except (ValueError, IndexError):
            if lineno == 1:
                continue  # header
            raise DataError(f"{path}:{lineno}: expected 'id, onset, offset, label', got {line.strip()!r}") from None
        events.setdefault(fn, []).append((on, off, mid))
    return events


def _clip_keys(name: str) -> list[str]:
    """Ways a clip is named: the path, its file name and stem, and the YouTube id in it (prepare's rule:
    <id>..., Y<id>...; AudioSet segment ids are <id>_<start ms>)."""
    stem = Path(name).stem
    return [name, Path(name).name, stem, stem[:11], stem[1:12] if stem.startswith("Y") else ""]


def match_strong(strong: dict[str, list], rows: list[Row]) -> dict[str, list]:
    """Re-key strong labels by the manifest filenames of `rows`: exact names first, then the YouTube
    id (only where it names one clip). Ids that match no row are dropped."""
    exact = {fn: fn for fn, _ in rows}
    loose: dict[str, str | None] = {}
    for fn, _ in rows:
        for k in _clip_keys(fn)[1:]:
            if k:
                loose[k] = fn if loose.get(k, fn) == fn else None  # None: ambiguous
    out: dict[str, list] = {}
    for key, events in strong.items():
        fn = exact.get(key) or next((loose[k] for k in _clip_keys(key) if k and loose.get(k)), None)
        if fn is not None:
            out.setdefault(fn, []).extend(events)
    return out


def sample_300h(balanced: list[Row], unbalanced: list[Row], labels: Labels, per_label: int = 200,
                seed: int = 0) -> list[Row]:
    """PSL paper, Table 1: balanced train + at most `per_label` clips per label from unbalanced."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, (_, mids) in enumerate(unbalanced):
        for m in mids:
            by_label.setdefault(m, []).append(i)
    chosen: set[int] = set()
    for m in labels.mids:
        idx = by_label.get(m, [])
        chosen.update(rng.permutation(idx)[:per_label].tolist())
    return balanced + [unbalanced[i] for i in sorted(chosen)]


@dataclass
class Corpus:
    """Everything a script needs from a data root, in the layout of docs/data.md."""
    root: Path
    labels: Labels
    ontology: Ontology
    train: list[Row]
    valid: list[Row] | None
    eval: list[Row]
    synthetic: bool
    clip_seconds: float | None = None  # every clip's length when the corpus fixes it (synthetic), else None
    # filename -> true clip labels / true events (synthetic corpus only; empty for real data)
    true: dict[str, list[str]] = field(default_factory=dict)
    strong: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)

    def targets(self, rows: list[Row], where: str = "manifest", dtype=np.float32) -> np.ndarray:
        """(N, K) multi-hot of the manifest labels; dtype np.uint8 takes a quarter of the memory
        (1.1 GB for full AudioSet's 2.06 M clips x 527 classes, against 4.4 GB in float32)."""
        return multi_hot(rows, self.labels, where, dtype)

    def true_targets(self, rows: list[Row]) -> np.ndarray:
        """Multi-hot of the true labels of these clips (synthetic corpus only)."""
        return multi_hot([(fn, self.true[fn]) for fn, _ in rows], self.labels, "true labels")


def load_corpus(data_root: str | None, data: str = "balanced", synth_scale: float = 1.0,
                synth_clip_seconds: float = 10.0, seed: int = 0) -> Corpus:
    """Read a data root (generating the synthetic corpus on first use when data_root is None)."""
    if data_root is None:
        root = ensure_synthetic(scale=synth_scale, clip_seconds=synth_clip_seconds)
    else:
        root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"{root}: data root not found")
    labels = read_class_labels(root / "class_labels_indices.csv")
    onto_path = root / "ontology.json"
    ontology = read_ontology(onto_path) if onto_path.exists() else Ontology({}, {}, {})
    balanced = read_manifest(root / "balanced_train.tsv")
    if data == "balanced":
        train = balanced
    elif data == "full":
        train = balanced + read_manifest(root / "unbalanced_train.tsv")
    elif data == "300h":
        if (root / "300h_train.tsv").exists():
            train = read_manifest(root / "300h_train.tsv")
        else:
            train = sample_300h(balanced, read_manifest(root / "unbalanced_train.tsv"), labels, seed=seed)
    else:
        raise DataError(f"--data {data!r}: expected balanced, full or 300h")
    valid = read_manifest(root / "valid.tsv") if (root / "valid.tsv").exists() else None
    corpus = Corpus(root, labels, ontology, train, valid, read_manifest(root / "eval.tsv"),
                    synthetic=(root / "synth.json").exists())
    if corpus.synthetic:
        corpus.clip_seconds = float(read_json(root / "synth.json", "corpus summary").get("clip_seconds", 10.0))
    for split in ("balanced_train", "unbalanced_train", "valid", "eval"):
        if (root / f"{split}_true.tsv").exists():
            corpus.true.update(dict(read_manifest(root / f"{split}_true.tsv")))
        if (root / f"strong_{split}.tsv").exists():
            corpus.strong.update(read_strong(root / f"strong_{split}.tsv"))
    if corpus.strong:  # AudioSet's own strong files name clips by segment id: match them as prepare does
        corpus.strong = match_strong(corpus.strong, balanced + corpus.train + (corpus.valid or []) + corpus.eval)
    for name, rows in (("train", corpus.train), ("eval", corpus.eval), ("valid", corpus.valid or [])):
        check_labels(rows, labels, f"{root}/{name}")  # fail early, naming the row, on an unknown id
    return corpus


# =============================================================================================
# Datasets and loaders
# =============================================================================================
class ClipDataset(torch.utils.data.Dataset):
    """Whole clips: (wave (clip_seconds*sr,), target (K,), index), cropped or zero-padded to
    clip_seconds; clip_seconds=None keeps each clip's own length. A bad clip gives None (skipped)."""

    def __init__(self, root: str | Path, rows: list[Row], targets: np.ndarray,
                 clip_seconds: float | None = 10.0, sr: int = SR):
        self.root, self.rows, self.targets = Path(root), rows, torch.as_tensor(targets)
        self.n, self.sr = None if clip_seconds is None else int(round(clip_seconds * sr)), sr

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        try:
            x = load_audio(self.root / self.rows[i][0], self.sr)
        except DataError as e:  # one bad clip of a million must not stop training
            warnings.warn(f"skipping: {e}")
            return None
        return torch.from_numpy(x if self.n is None else crop_or_pad(x, self.n)), self.targets[i], i


def segment_bounds(duration: float, segment: float, min_last: float = 0.0) -> list[tuple[float, float]]:
    """Non-overlapping n-second chunks of a clip; the last one keeps the shorter remainder
    (as the official PSL code: no padding per chunk; a batch is padded to its longest item).
    A remainder shorter than `min_last` seconds is merged into the chunk before it."""
    starts = np.arange(0.0, duration - 1e-6, segment)
    bounds = [(float(s), float(min(s + segment, duration))) for s in starts]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_last - 1e-9:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


class SegmentDataset(torch.utils.data.Dataset):
    """Fixed-length chunks of clips (PSL): item = (wave chunk, target (K,), chunk index).
    `targets` is (N_clips, K) (each chunk inherits its clip's row) or (N_chunks, K)."""

    def __init__(self, root: str | Path, rows: list[Row], targets: np.ndarray, segment_seconds: float,
                 clip_seconds: float = 10.0, sr: int = SR, durations: list[float] | None = None,
                 min_last: float = 0.0):
        self.root, self.rows, self.sr = Path(root), rows, sr
        durations = durations or [clip_seconds] * len(rows)
        self.chunks = [(ci, s, e) for ci, d in enumerate(durations)
                       for s, e in segment_bounds(d, segment_seconds, min_last)]
        self.clip_index = np.array([c[0] for c in self.chunks], dtype=np.int64)
        t = torch.as_tensor(targets)
        self.targets = t[self.clip_index] if len(t) == len(rows) and len(t) != len(self.chunks) else t

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        ci, s, e = self.chunks[i]
        try:
            x = load_audio(self.root / self.rows[ci][0], self.sr, s, e)
        except DataError as err:
            warnings.warn(f"skipping: {err}")
            return None
        return torch.from_numpy(crop_or_pad(x, int(round((e - s) * self.sr)))), self.targets[i], i


def pad_collate(batch):
    """Batch-wise zero padding to the longest item; None items (bad clips) are dropped."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    waves, targets, idx = zip(*batch)
    n = max(len(w) for w in waves)
    out = torch.zeros(len(waves), n)
    for i, w in enumerate(waves):
        out[i, : len(w)] = w
    return out, torch.stack(targets), torch.as_tensor(idx)


def make_loader(dataset, batch_size: int, sampler=None, shuffle: bool = False, workers: int = 2,
                seed: int = 0, drop_last: bool = False, persistent: bool | None = None,
                collate_fn=pad_collate, context=None) -> torch.utils.data.DataLoader:
    """persistent False: fresh workers every epoch, so that re-seeding `loader.generator` per epoch
    fixes the epoch's order and worker seeds (exact resume). `collate_fn` defaults to pad_collate;
    `context`: the workers' multiprocessing context (default: the platform's)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
        num_workers=workers, collate_fn=collate_fn, worker_init_fn=seed_worker, generator=g,
        persistent_workers=workers > 0 if persistent is None else persistent and workers > 0,
        drop_last=drop_last, pin_memory=torch.cuda.is_available(), multiprocessing_context=context if workers else None)


def clip_durations(root: str | Path, rows: list, default: float = 10.0) -> list[float]:
    """Durations in seconds from the file headers; an unreadable file gets `default` (the dataset
    skips and counts it later)."""
    out = []
    for row in rows:
        try:
            out.append(sf.info(str(Path(root) / row[0])).duration)
        except Exception:
            out.append(default)
    return out


class VarLenDataset(ClipDataset):
    """Whole clips at their own length (evaluation without padding): (wave (T,), target (K,), index).
    Use batch_size=1 (pad_collate would pad a larger batch). A bad clip gives None (skipped)."""

    def __init__(self, root: str | Path, rows: list, targets: np.ndarray, sr: int = SR):
        super().__init__(root, rows, targets, None, sr)


# =============================================================================================
# Generated data: data/*.py are loaded (by path) only when something must be built
# =============================================================================================
def load_data_module(name: str):
    """data/<name>.py as a module (not a package import, so `data` need not be importable)."""
    key = f"_data_{name}"
    if key not in sys.modules:
        path = HERE / "data" / f"{name}.py"
        if not path.exists():
            raise DataError(f"{path}: not found (it generates the synthetic data; copy data/ along with common.py)")
        spec = importlib.util.spec_from_file_location(key, path)
        sys.modules[key] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[key]


_MOVED = {"synthetic": ["make_synthetic_corpus", "corpus_summary", "synth_event", "SYNTH_CLASSES", "PARENTS",
                        "CHILDREN", "parent_mid", "child_mid", "NoiseRates", "make_synthetic_tasks",
                        "SyntheticStream", "synthetic_stream", "write_class_labels"],
          "prepare": ["prepare", "write_task"], "bench": ["bench"]}


def __getattr__(name: str):
    """Names that moved to data/*.py stay reachable as common.<name> (loaded on first access)."""
    for module, names in _MOVED.items():
        if name in names:
            return getattr(load_data_module(module), name)
    raise AttributeError(f"module 'common' has no attribute {name!r}")


@contextlib.contextmanager
def _build_lock(root: Path):
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first uses build once
        yield


def ensure_synthetic(root: str | Path | None = None, scale: float = 1.0, seed: int = 0,
                     clip_seconds: float = 10.0) -> Path:
    """The synthetic corpus with these settings, generated on first use. The default lives in
    data/synth; other settings get their own folder, so they never replace it."""
    if root is None:
        default = (scale, seed, clip_seconds) == (1.0, 0, 10.0)
        root = SYNTH_ROOT if default else SYNTH_ROOT.with_name(f"synth_scale{scale:g}_clip{clip_seconds:g}_seed{seed}")
    root = Path(root)
    with _build_lock(root):
        meta = root / "synth.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            if (m["seed"], m["scale"], m["clip_seconds"]) == (seed, scale, clip_seconds):
                return root
        print(f"generating the synthetic corpus in {root} (scale {scale}, seed {seed}) ...", flush=True)
        return load_data_module("synthetic").make_synthetic_corpus(root, scale=scale, seed=seed, clip_seconds=clip_seconds)


def ensure_synthetic_tasks(scale: float = 1.0, seed: int = 0, root: str | Path | None = None) -> Path:
    """The synthetic downstream task root (data/synth_tasks), generated on first use; rebuilt when
    its stamp (generator version, seed, scale) differs."""
    root = Path(root) if root else TASKS_ROOT if (scale, seed) == (1.0, 0) else \
        TASKS_ROOT.with_name(f"synth_tasks_scale{scale:g}_seed{seed}")
    with _build_lock(root):
        gen = load_data_module("synthetic")
        stamp = root / "synth_tasks.json"
        made = {k: v for k, v in json.loads(stamp.read_text()).items() if k != "files"} if stamp.exists() else None
        if made == {"version": gen.TASKS_VERSION, "seed": seed, "scale": scale, "tasks": gen.TASK_ORDER}:
            return root
        print(f"generating the synthetic downstream tasks in {root} (scale {scale}, seed {seed}) ...", flush=True)
        return gen.make_synthetic_tasks(root, scale=scale, seed=seed)


# =============================================================================================
# Downstream tasks: manifest filename<TAB>labels<TAB>fold + an entry in tasks.json
# =============================================================================================
TaskRow = tuple[str, list[str], str]  # (filename relative to Task.root, labels, fold or split name)


@dataclass
class Task:
    name: str
    root: Path                # filenames in rows are relative to this folder
    type: str                 # single | multi
    metric: str               # a key of METRICS
    classes: list[str]        # fixed order = column order of targets()
    rows: list[TaskRow]
    kfold: bool               # True: the third column is a fold name; False: train | valid | test
    folds: list[str]
    sample_rate: int
    max_seconds: float        # longest training segment
    higher_is_better: bool
    info: dict = field(default_factory=dict)  # the whole tasks.json entry

    def targets(self, rows: list[TaskRow]) -> np.ndarray:
        """(N, K) float32: one-hot (single) or multi-hot (multi)."""
        index = {c: k for k, c in enumerate(self.classes)}
        y = np.zeros((len(rows), len(self.classes)), dtype=np.float32)
        for i, (_, labels, _) in enumerate(rows):
            y[i, [index[c] for c in labels]] = 1.0
        return y


def tasks_json(task_root: str | Path) -> dict:
    """<task_root>/tasks.json: task name -> entry, in the file's order."""
    tasks = read_json(Path(task_root) / "tasks.json", "task list")
    if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
        raise DataError(f"{Path(task_root) / 'tasks.json'}: expected {{task name: {{type, metric, ...}}}}")
    return tasks


def list_tasks(task_root: str | Path) -> list[str]:
    return list(tasks_json(task_root))


def read_task(task_root: str | Path, name: str) -> Task:
    """A task from <task_root>/tasks.json; a bad manifest row is an error naming file and line."""
    task_root = Path(task_root)
    tasks = tasks_json(task_root)
    if name not in tasks:
        raise DataError(f"{task_root / 'tasks.json'}: no task {name!r} (have {', '.join(tasks)})")
    e = tasks[name]
    path, known = task_root / e["manifest"], set(e["classes"])
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts[0] == "filename":
                continue
            labels = [c for c in parts[1].split(",") if c] if len(parts) == 3 else []
            if len(parts) != 3 or not labels or set(labels) - known or parts[2] not in e["folds"] \
                    or (e["type"] == "single" and len(labels) != 1):
                raise DataError(f"{path}:{lineno}: expected 'filename<TAB>labels<TAB>fold' with labels from the "
                                f"vocabulary ({e['type']}-label) and fold in {e['folds']}, got {line.rstrip()!r}")
            rows.append((parts[0], labels, parts[2]))
    return Task(name, task_root / e.get("audio_root", "."), e["type"], e["metric"], e["classes"], rows,
                e["kfold"], e["folds"], e["sample_rate"], e["max_seconds"], METRICS[e["metric"]][1], e)


def task_splits(task: Task, protocol: str = "hear", valid_fraction: float = 0.1,
                seed: int = 0) -> list[tuple[str, list, list, list]]:
    """[(split name, train rows, valid rows, test rows)]. k-fold, protocol "hear": split i tests on
    fold i and validates on fold i+1 (mod k), trains on the rest; "paper": validates on the test
    fold itself. Split tasks: one split "test"; no valid rows -> a seeded stratified 90/10 of train."""
    if protocol not in ("hear", "paper"):
        raise DataError(f"protocol {protocol!r}: expected hear or paper")
    by = {f: [r for r in task.rows if r[2] == f] for f in task.folds}
    if task.kfold:
        k, out = len(task.folds), []
        for i, f in enumerate(task.folds):
            v = f if protocol == "paper" else task.folds[(i + 1) % k]
            train = [r for r in task.rows if r[2] not in (f, v)]
            out.append((f"fold{f}", train, by[v], by[f]))
        return out
    train, valid = by.get("train", []), by.get("valid", [])
    if not valid:
        train, valid = stratified_split(train, task.targets(train), valid_fraction, seed)
    return [("test", train, valid, by.get("test", []))]


def _rarest_label(targets: np.ndarray) -> np.ndarray:
    """Each row's stratification key: its rarest label (-1 for a row without labels)."""
    t = np.asarray(targets) > 0
    return np.where(t.any(1), np.argmin(np.where(t, t.sum(0), np.inf), axis=1), -1)


def stratified_split(rows: list, targets: np.ndarray, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(rest, held_out): a seeded held-out part of round(fraction * N) rows, each (rarest) label
    contributing its share (largest remainders get the rounding)."""
    rng = np.random.default_rng(seed)
    key = _rarest_label(targets)
    keys, sizes = np.unique(key, return_counts=True)
    quota = fraction * sizes
    take = np.floor(quota).astype(int)
    extra = int(round(fraction * len(rows))) - take.sum()
    take[np.lexsort((rng.random(len(keys)), -(quota - take)))[:extra]] += 1
    held = np.zeros(len(rows), bool)
    for k, m in zip(keys, take):
        held[rng.permutation(np.flatnonzero(key == k))[:m]] = True
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def positive_pairs(targets: np.ndarray, block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """(row, class) index pairs of the positive labels of (N, K) targets, rows ascending, read in row
    blocks: no (N, K) boolean temporary (1.1 GB on full AudioSet)."""
    rs, cs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for i in range(0, len(targets), block):
        r, c = np.nonzero(np.asarray(targets[i:i + block]) > 0)
        rs.append(r + i)
        cs.append(c)
    return np.concatenate(rs), np.concatenate(cs)


def label_fractions(targets: np.ndarray, fractions=(0.01, 0.03, 0.1, 0.3, 1.0),
                    seed: int = 0) -> dict[float, np.ndarray]:
    """Sorted row indices per fraction: nested (each a superset of the smaller), stratified (rows
    grouped by their rarest label, lowest index among ties), and every class with a positive present at
    the smallest fraction (which may then exceed it). The labels are read as (row, class) pairs in row
    blocks, never as (N, K) temporaries: 7 s on full AudioSet's 2.06 M x 527 uint8 targets (an earlier
    dense version: 66 s and 12.9 GB, the same indices)."""
    n, k_all = len(targets), targets.shape[1]
    r, c = positive_pairs(targets)
    counts = np.bincount(c, minlength=k_all)
    by_class = np.argsort(c, kind="stable")  # pairs grouped by class, rows ascending within a class
    starts = np.concatenate([[0], np.cumsum(counts)])
    rows_of = lambda k: r[by_class[starts[k]:starts[k + 1]]]  # = np.flatnonzero(t[:, k])
    rng = np.random.default_rng([seed, 1])
    cover, covered_class = [], np.zeros(k_all, bool)
    row_start = np.searchsorted(r, np.arange(n + 1))  # row i's pairs: [row_start[i], row_start[i + 1])
    for k in np.argsort(counts, kind="stable"):  # rarest class first: one random positive each
        if counts[k] and not covered_class[k]:
            i = int(rng.choice(rows_of(k)))
            cover.append(i)
            covered_class[c[row_start[i]:row_start[i + 1]]] = True
    # stratified order: key = each row's rarest label (lowest index among ties), -1 without labels
    rank = np.empty(k_all, np.int64)
    rank[np.lexsort((np.arange(k_all), counts))] = np.arange(k_all)
    has = np.diff(row_start) > 0
    key = np.full(n, -1, np.int64)
    if len(r):
        best = np.minimum.reduceat(rank[c], row_start[:-1][has])
        key[has] = np.argsort(rank)[best]
    rng2, first = np.random.default_rng(seed), np.array(cover, np.int64)
    pos = np.empty(n)
    grouped = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[grouped], np.unique(key), side="left").tolist() + [n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        idx = rng2.permutation(grouped[lo:hi])
        front = np.isin(idx, first)
        idx = np.concatenate([idx[front], idx[~front]])  # rows in `first` at the front, in drawn order
        pos[idx] = (np.arange(len(idx)) + rng2.random()) / len(idx)
    strat = np.lexsort((rng2.random(n), pos))
    order = np.concatenate([first, strat[~np.isin(strat, first)]])
    return {f: np.sort(order[: max(len(cover), int(round(f * n)))].astype(np.int64)) for f in sorted(fractions)}


# =============================================================================================
# Front-ends: torch modules, batched, on the training device
# =============================================================================================
def hz_to_mel(f, scale: str = "htk"):
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)
    if scale == "kaldi":
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)
    f = np.asarray(f, dtype=np.float64)  # slaney: linear below 1 kHz, log above
    return np.where(f < 1000, 3 * f / 200, 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27))


def mel_to_hz(m, scale: str = "htk"):
    m = np.asarray(m, dtype=np.float64)
    if scale == "htk":
        return 700.0 * (10 ** (m / 2595.0) - 1.0)
    if scale == "kaldi":
        return 700.0 * (np.exp(m / 1127.0) - 1.0)
    return np.where(m < 15, 200 * m / 3, 1000 * np.exp((m - 15) * np.log(6.4) / 27))


def mel_filterbank(n_freqs: int, sr: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None,
                   scale: str = "htk", norm: str | None = None) -> torch.Tensor:
    """(n_freqs, n_mels) triangular filters on the STFT bins 0..sr/2 (torchaudio/librosa convention)."""
    f_max = sr / 2 if f_max is None else f_max
    freqs = np.linspace(0, sr / 2, n_freqs)
    pts = mel_to_hz(np.linspace(hz_to_mel(f_min, scale), hz_to_mel(f_max, scale), n_mels + 2), scale)
    lower = (freqs[:, None] - pts[None, :-2]) / (pts[1:-1] - pts[:-2])
    upper = (pts[None, 2:] - freqs[:, None]) / (pts[2:] - pts[1:-1])
    fb = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":  # equal area per filter
        fb *= 2.0 / (pts[2:] - pts[:-2])
    return torch.tensor(fb, dtype=torch.float32)


LOGMEL_PRESETS = {
    # PSL and AT transfer ("at", the same) (Dinkel et al.): 16 kHz, 32 ms window, 10 ms hop, 64 mels, dB
    "psl": dict(sr=16000, n_fft=512, win_length=512, hop_length=160, n_mels=64, log="db", top_db=120.0),
    # Conformer SSL (Srivastava et al.): 64 mels, 64 ms window, 20 ms hop, log with offset
    "conformer": dict(sr=16000, n_fft=1024, win_length=1024, hop_length=320, n_mels=64, log="log", offset=1e-6),
    # PANNs-style front-end (OFA for AEC): 1024/320 at 32 kHz, 50 Hz-14 kHz, slaney mel, dB
    "panns32k": dict(sr=32000, n_fft=1024, win_length=1024, hop_length=320, n_mels=64, f_min=50.0,
                     f_max=14000.0, mel_scale="slaney", mel_norm="slaney", log="db"),
    "panns16k": dict(sr=16000, n_fft=512, win_length=512, hop_length=160, n_mels=64, f_min=50.0,
                     f_max=8000.0, mel_scale="slaney", mel_norm="slaney", log="db"),
}
LOGMEL_PRESETS["at"] = LOGMEL_PRESETS["psl"]


class LogMel(nn.Module):
    """Waveform (B, N) -> log-mel (B, n_mels, T): STFT (Hann, centred, reflect) -> |.|^power ->
    mel filterbank -> dB (10 log10 max(x, amin), optional per-clip top_db floor) or log(x + offset)."""

    def __init__(self, sr: int = 16000, n_fft: int = 512, win_length: int | None = None, hop_length: int = 160,
                 n_mels: int = 64, f_min: float = 0.0, f_max: float | None = None, power: float = 2.0,
                 log: str = "db", top_db: float | None = None, offset: float = 1e-6, amin: float = 1e-10,
                 center: bool = True, mel_scale: str = "htk", mel_norm: str | None = None):
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop_length, win_length or n_fft
        self.power, self.log, self.top_db, self.offset, self.amin, self.center = power, log, top_db, offset, amin, center
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft // 2 + 1, sr, n_mels, f_min, f_max, mel_scale, mel_norm),
                             persistent=False)

    @classmethod
    def preset(cls, name: str, **overrides) -> "LogMel":
        return cls(**{**LOGMEL_PRESETS[name], **overrides})

    def logmel(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop, self.win, self.window, center=self.center,
                          pad_mode="reflect", return_complex=True)  # (B, F, T)
        spec = spec.real ** 2 + spec.imag ** 2 if self.power == 2 else spec.abs() ** self.power
        mel = torch.matmul(self.fb.T, spec)  # (n_mels, F) @ (B, F, T) -> (B, n_mels, T)
        if self.log == "log":
            return torch.log(mel + self.offset)
        db = 10.0 * torch.log10(mel.clamp_min(self.amin))
        if self.top_db is not None:  # floor per clip (torchaudio's floor is per batch)
            db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - self.top_db)
        return db

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):  # the front-end stays in fp32
            wave = wave.float()
            if wave.device.type != "cpu" or torch.jit.is_tracing():  # a trace must not freeze the groups
                return self.logmel(wave)
            # On the CPU ~10 s of audio at a time keeps the spectra in cache: 3.8x the clips per
            # CPU-second of one (32, 160000) batch (README, throughput)
            return torch.cat([self.logmel(w) for w in wave.split(max(1, 10 * SR // max(1, wave.shape[1])))])


class KaldiFbank(nn.Module):
    """Kaldi-compatible log mel filterbank, batched: (B, N) -> (B, T, n_mels). Same result as
    torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, window_type='hanning',
    dither=0, snip_edges=True): per-frame DC removal, pre-emphasis, symmetric Hann window, zero-pad
    to a power of two, power spectrum, Kaldi mel scale (1127 ln(1 + f/700)), log with float eps floor.

    Computed as one torch.stft of the pre-emphasised signal, with DC removal applied after the FFT:
    frame t, DC-removed, pre-emphasised and windowed, equals w * preemph(x)_t - (1 - a) m_t w exactly
    (m_t the frame's mean), because the symmetric Hann window is zero at the frame's first sample,
    the only sample where per-frame pre-emphasis differs from the global one. Its DFT is therefore
    STFT_t - (1 - a) m_t DFT(w). On the CPU clips go through in groups of ~10 s of audio, which keeps
    the spectra in cache (2.5x faster than one batch of 32 10-s clips on 2 cores)."""

    def __init__(self, sr: int = 16000, n_mels: int = 128, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, preemphasis: float = 0.97, remove_dc: bool = True,
                 low_freq: float = 20.0, high_freq: float = 0.0):
        super().__init__()
        self.win = int(sr * frame_length_ms * 0.001)
        self.shift = int(sr * frame_shift_ms * 0.001)
        self.n_fft = 1 << (self.win - 1).bit_length()
        self.preemphasis, self.remove_dc, self.cpu_group = preemphasis, remove_dc, 10 * sr
        window = F.pad(torch.hann_window(self.win, periodic=False, dtype=torch.float64), (0, self.n_fft - self.win))
        assert window[0] == 0  # the identity above needs w[0] = 0
        self.register_buffer("window", window.float(), persistent=False)  # (n_fft,), zero beyond win
        self.register_buffer("window_dft", torch.fft.rfft(window).to(torch.complex64), persistent=False)
        high = high_freq if high_freq > 0 else sr / 2 + high_freq
        mel_lo, mel_hi = hz_to_mel(low_freq, "kaldi"), hz_to_mel(high, "kaldi")
        delta = (mel_hi - mel_lo) / (n_mels + 1)
        left = mel_lo + np.arange(n_mels) * delta
        center, right = left + delta, left + 2 * delta
        mel = hz_to_mel(sr / self.n_fft * np.arange(self.n_fft // 2), "kaldi")[:, None]  # (n_fft/2, 1)
        fb = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
        fb = np.vstack([fb, np.zeros((1, n_mels))])  # the Nyquist bin gets no weight, as in Kaldi
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32), persistent=False)

    def fbank(self, x: torch.Tensor) -> torch.Tensor:
        a = self.preemphasis
        if x.shape[1] < self.win:  # no whole frame (Kaldi's snip_edges)
            return x.new_zeros(x.shape[0], 0, self.fb.shape[1])
        g = torch.cat([x[:, :1], x[:, 1:] - a * x[:, :-1]], dim=1)  # (B, N); g[0] is never weighted
        g = F.pad(g, (0, self.n_fft - self.win))  # n_fft-sample frames, as many as Kaldi's snip_edges
        spec = torch.stft(g, self.n_fft, self.shift, self.n_fft, self.window, center=False,
                          return_complex=True).transpose(1, 2)  # (B, T, n_fft/2 + 1)
        if self.remove_dc:  # frame means from sums over blocks of gcd(win, shift) samples
            blk = math.gcd(self.win, self.shift)
            sums = x[:, : (spec.shape[1] - 1) * self.shift + self.win].reshape(len(x), -1, blk).sum(-1)
            mean = sums.unfold(1, self.win // blk, self.shift // blk).sum(-1) / self.win  # (B, T)
            spec = torch.addcmul(spec, ((1 - a) * mean)[..., None].to(spec.dtype), self.window_dft, value=-1)
        power = spec.real ** 2 + spec.imag ** 2
        return torch.log((power @ self.fb).clamp_min(torch.finfo(torch.float32).eps))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            wave = wave.float()
            if wave.device.type != "cpu" or torch.jit.is_tracing():  # a trace must not freeze the groups
                return self.fbank(wave)
            return torch.cat([self.fbank(w) for w in wave.split(max(1, self.cpu_group // wave.shape[1]))])


# =============================================================================================
# Augmentation: batched, per-sample random, on the device
# =============================================================================================
def mask_along(x: torch.Tensor, max_width: int, dim: int, n_masks: int = 1, fill: float = 0.0) -> torch.Tensor:
    """SpecAugment masking: per sample, n_masks bands along `dim` of width ~ U[0, max_width)
    starting ~ U[0, size - width), set to `fill`. x is (B, ...)."""
    size = x.shape[dim]
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = size
    pos = torch.arange(size, device=x.device).view([1 if i != dim else size for i in range(x.dim())])
    mask = torch.zeros(shape, dtype=torch.bool, device=x.device)
    for _ in range(n_masks):
        width = (torch.rand(x.shape[0], device=x.device) * max_width).floor()
        start = (torch.rand(x.shape[0], device=x.device) * (size - width)).floor()
        bshape = [-1] + [1] * (x.dim() - 1)
        mask |= (pos >= start.view(bshape)) & (pos < (start + width).view(bshape))
    return x.masked_fill(mask, fill)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, rate: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix-up: with probability `rate` per sample, mix with a random partner of the batch using
    lam ~ Beta(alpha, alpha); labels are mixed with the same lam (PSLA: rate 0.5, alpha 10;
    Dinkel et al.: rate 1, Beta(1, 1))."""
    b = x.shape[0]
    lam = torch.distributions.Beta(alpha, alpha).sample((b,)).to(x.device)
    lam = torch.where(torch.rand(b, device=x.device) < rate, lam, torch.ones_like(lam))
    perm = torch.randperm(b, device=x.device)
    lx = lam.view([b] + [1] * (x.dim() - 1))
    ly = lam.view([b] + [1] * (y.dim() - 1))
    return lx * x + (1 - lx) * x[perm], ly * y + (1 - ly) * y[perm]


def wave_augment(wave: torch.Tensor, gain_db: tuple[float, float] = (-6.0, 6.0), polarity_p: float = 0.5,
                 max_shift: int = 16000, gain_p: float = 1.0, shift_p: float = 1.0) -> torch.Tensor:
    """Raw-wave augmentation per sample, each op applied with its own probability: Gain U(gain_db) dB
    (gain_p), PolarityInversion (polarity_p), circular TimeShift by U{-max_shift..max_shift} samples
    (shift_p). (B, N) -> (B, N). torch-audiomentations' defaults: gain_db (-18, 6), every p 0.5,
    max_shift half the clip."""
    b, n = wave.shape
    dev = wave.device
    gain = 10 ** ((torch.rand(b, device=dev) * (gain_db[1] - gain_db[0]) + gain_db[0]) / 20)
    sign = torch.where(torch.rand(b, device=dev) < polarity_p, -1.0, 1.0)
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), device=dev)
    if gain_p < 1:
        gain = torch.where(torch.rand(b, device=dev) < gain_p, gain, 1.0)
    if shift_p < 1:
        shift = torch.where(torch.rand(b, 1, device=dev) < shift_p, shift, 0)
    idx = (torch.arange(n, device=dev).unsqueeze(0) - shift) % n
    return torch.gather(wave, 1, idx) * (gain * sign).unsqueeze(1)


# =============================================================================================
# Samplers (DDP-aware: every rank draws the same global list from seed+epoch and keeps its share)
# =============================================================================================
def generate_sampling_weights(targets: np.ndarray) -> np.ndarray:
    """PSLA Algorithm 1: w_i = sum over the labels k of clip i of 1 / count_k (labels may be soft:
    a clip counts for each class it carries). The official 1000/(count+0.01) only rescales."""
    counts = targets.sum(0)
    inv = 1.0 / np.maximum(counts, 1e-12)
    block = 1 << 16  # row blocks: no (N, K) temporary at AudioSet scale; each row's sum is unchanged
    return np.concatenate([(targets[i:i + block] * inv).sum(1) for i in range(0, max(len(targets), 1), block)])


class EpochSampler(torch.utils.data.Sampler, abc.ABC):
    """An epoch's indices are a function of (seed, epoch) alone: `epoch_indices(epoch)` is the full list
    (the same on every rank); iterating gives this rank's `shard` of the epoch set by set_epoch. A loop
    that resumes mid-epoch takes `shard(sampler.epoch_indices(epoch))[offset:]`."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abc.abstractmethod
    def epoch_indices(self, epoch: int) -> np.ndarray:
        """One epoch's full list of indices (the same on every rank)."""

    def __iter__(self):
        return iter(shard(self.epoch_indices(self.epoch)).tolist())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / world_size())


class WeightedSampler(EpochSampler):
    """Draw num_samples indices with replacement with probability proportional to `weights`."""

    def __init__(self, weights: np.ndarray, num_samples: int | None = None, seed: int = 0):
        super().__init__(num_samples or len(weights), seed)
        w = np.asarray(weights, dtype=np.float64)  # float32 sums made p.sum() != 1 for numpy
        self.p = w / w.sum()

    def epoch_indices(self, epoch: int, chunk: int = 1 << 20) -> np.ndarray:
        """numpy's `rng.choice(len(p), n, p=p)`, the same indices (uniforms searched in the normalised
        CDF), drawn in chunks with sorted queries: 3x faster for 25.6 M draws over full AudioSet, no
        n-sized temporaries beyond the result."""
        cdf = self.p.cumsum()
        cdf /= cdf[-1]
        rng, out = np.random.default_rng([self.seed, epoch]), np.empty(self.num_samples, np.int64)
        for i in range(0, self.num_samples, chunk):
            u = rng.random(min(chunk, self.num_samples - i))
            o = np.argsort(u)
            out[i + o] = cdf.searchsorted(u[o], side="right")
        return out


class PseudoBalancedSampler(EpochSampler):
    """PANNs / Dinkel et al.: classes visited in shuffled round-robin order; each visit takes the
    next clip of that class from its own reshuffled list, so every batch holds many labels."""

    def __init__(self, targets: np.ndarray, num_samples: int | None = None, seed: int = 0):
        super().__init__(num_samples or len(targets), seed)
        rows, cls = positive_pairs(targets)
        order = np.argsort(cls, kind="stable")  # grouped by class, rows ascending within: one sort, not K scans
        self.by_class = np.split(rows[order], np.cumsum(np.bincount(cls, minlength=targets.shape[1]))[:-1])
        self.classes = np.array([k for k, ix in enumerate(self.by_class) if len(ix)])

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        k = len(self.classes)
        rounds = -(-self.num_samples // k)
        seq = np.concatenate([rng.permutation(self.classes) for _ in range(rounds)])[: self.num_samples]
        out = np.empty(self.num_samples, dtype=np.int64)
        order = np.argsort(seq, kind="stable")  # positions of each class's visits, in order: O(N log N)
        bounds = np.searchsorted(seq[order], self.classes, side="left"), np.searchsorted(seq[order], self.classes, "right")
        for c, lo, hi in zip(self.classes, *bounds):  # loop over classes, not samples
            where = order[lo:hi]
            if not len(where):  # fewer samples than classes: this class is not visited this epoch
                continue
            pool = self.by_class[c]
            reps = -(-len(where) // len(pool))
            out[where] = np.concatenate([rng.permutation(pool) for _ in range(reps)])[: len(where)]
        return out


# =============================================================================================
# Metrics (vectorised over classes; y_true (N, K) in {0, 1}, y_score (N, K))
# =============================================================================================
def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Per-class AP, identical to sklearn's average_precision_score (step-wise, ties grouped);
    nan for classes with no positive."""
    y_true, y_score = np.asarray(y_true, dtype=np.float64), np.asarray(y_score, dtype=np.float64)
    order = np.argsort(-y_score, axis=0, kind="stable")
    s = np.take_along_axis(y_score, order, 0)
    t = np.take_along_axis(y_true, order, 0)
    tp = np.cumsum(t, 0)
    n = len(s)
    group_end = np.ones_like(s, dtype=bool)
    group_end[:-1] = s[:-1] != s[1:]  # the last index of each run of tied scores
    end_idx = np.where(group_end, np.arange(n)[:, None], n)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]  # each row -> end of its tie group
    precision_at_end = np.take_along_axis(tp, end_idx, 0) / (end_idx + 1)
    pos = t.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pos > 0, (t * precision_at_end).sum(0) / pos, np.nan)


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray:
    """Per-class ROC AUC via the Mann-Whitney statistic with average ranks for ties; nan for a
    class with no positive or no negative."""
    y_true = np.asarray(y_true, dtype=np.float64)
    ranks = rankdata(y_score, axis=0)
    pos = y_true.sum(0)
    neg = len(y_true) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * y_true).sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    return np.where((pos > 0) & (neg > 0), auc, np.nan)


def d_prime(auc) -> np.ndarray:
    """d' = sqrt(2) * inverse standard-normal CDF of the AUC (computed from the mean AUC)."""
    return np.sqrt(2.0) * ndtri(auc)


def tagging_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict:
    """mAP over classes with a positive, mAUC, d' from mAUC, per-class AP."""
    ap, auc = average_precision(y_true, y_score), roc_auc(y_true, y_score)
    m_auc = float(np.nanmean(auc))
    return {"mAP": float(np.nanmean(ap)), "mAUC": m_auc, "dprime": float(d_prime(m_auc)),
            "AP": [None if np.isnan(a) else float(a) for a in ap]}


def accuracy(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Top-1 accuracy; y_true is (N,) class indices or (N, K) one-hot."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        y_true = y_true.argmax(1)
    return float((np.asarray(y_score).argmax(1) == y_true).mean())


def error_rate(y_true: np.ndarray, y_score: np.ndarray) -> float:
    return 1.0 - accuracy(y_true, y_score)


def map_at_k(y_true: np.ndarray, y_score: np.ndarray, k: int = 3) -> float:
    """Single-label mAP@k (FSDKaggle2018): 1/rank of the true class if within the top k, else 0."""
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        y_true = y_true.argmax(1)
    topk = np.argsort(-np.asarray(y_score), axis=1, kind="stable")[:, :k]
    hit = topk == y_true[:, None]
    return float((hit / np.arange(1, k + 1)).sum(1).mean())


def lwlrap(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Label-weighted label-ranking average precision (FSDKaggle2019): for every positive
    (clip, class) pair, the fraction of the clip's positives among the classes scored >= it,
    averaged over all pairs. One sort per clip: O(N K log K) time, O(N K) memory."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    n, k = y_score.shape
    order = np.argsort(-y_score, axis=1, kind="stable")
    s = np.take_along_axis(y_score, order, 1)
    t = np.take_along_axis(y_true, order, 1)
    last = np.ones_like(s, dtype=bool)
    last[:, :-1] = s[:, :-1] != s[:, 1:]  # the last column of each run of tied scores
    end = np.where(last, np.arange(k)[None, :], k)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]  # each column -> end of its tie group
    pos_ge = np.take_along_axis(np.cumsum(t, 1), end, 1)  # positives scored >= this class
    prec = np.where(t > 0, pos_ge / (end + 1), 0.0)
    return float(prec.sum() / y_true.sum())


def _per_class_mean(fn):
    return lambda y, s: float(np.nanmean(fn(y, s)))


METRICS = {  # name -> (fn(y_true (N, K), y_score (N, K)) -> float, higher is better)
    "accuracy": (accuracy, True), "error_rate": (error_rate, False), "mAP": (_per_class_mean(average_precision), True),
    "mAUC": (_per_class_mean(roc_auc), True), "dprime": (lambda y, s: float(d_prime(np.nanmean(roc_auc(y, s)))), True),
    "mAP@3": (map_at_k, True), "lwlrap": (lwlrap, True)}


def task_score(metric: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    if metric not in METRICS:
        raise DataError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    return METRICS[metric][0](np.asarray(y_true), np.asarray(y_score))


# =============================================================================================
# Checkpoints, weight averaging, ensembles
# =============================================================================================
def save_checkpoint(path: str | Path, obj: dict) -> None:
    """Atomic: write a temp file, then rename, so a kill never leaves a half-written checkpoint."""
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    kill_point("write")
    os.replace(tmp, path)
    kill_point("saved")


def load_checkpoint(path: str | Path, map_location="cpu", script: str | None = None) -> dict:
    """A checkpoint file as a dict; anything else (missing, not a torch file, another script's checkpoint
    when `script` is given and the file names its script) is one line (DataError)."""
    if Path(path).is_dir():
        raise DataError(f"{path}: a folder, not a checkpoint file")
    if not Path(path).is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a wav, a text file, a truncated download: one line, not an unpickling traceback
        raise DataError(f"{path}: not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict):
        raise DataError(f"{path}: not a checkpoint of this project (a {type(ck).__name__}, not a dict)")
    if script and ck.get("script") not in (None, script):
        raise DataError(f"{path}: a checkpoint of {ck['script']}, not of {script}")
    return ck


def load_weights(model: nn.Module, state: dict, path: str | Path, strict: bool = True):
    """model.load_state_dict with a foreign checkpoint as one line naming the file and the first mismatch
    (missing, unexpected or differently shaped tensors), not a page of size-mismatch messages."""
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes or (strict and (missing or unexpected)):
        first = (f"{shapes[0]} is {tuple(state[shapes[0]].shape)} there, {tuple(own[shapes[0]].shape)} here" if shapes
                 else f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
        raise DataError(f"{path}: not a checkpoint of this model ({len(shapes)} shapes differ, {len(missing)} "
                        f"missing, {len(unexpected)} unexpected tensors; {first})")
    return unwrap(model).load_state_dict(state, strict=strict)


def synthetic_classes_warning(mids) -> str | None:
    """The warning a prediction prints when its checkpoint knows only the synthetic corpus's classes (every
    label id is /synth/...): real audio then comes out as the nearest toy class (speech as 'Music/Impact')."""
    mids = list(mids)
    if mids and all(str(m).startswith("/synth/") for m in mids):
        return ("warning: this checkpoint was trained on the synthetic corpus and knows only its "
                f"{len(mids)} toy classes (tones, noises, impacts...); real audio gets the nearest toy class. "
                "Train with --data-root on a labelled corpus to tag real sounds.")
    return None


class TopKCheckpoints:
    """Keep the k best checkpoints by a metric in `folder` (best first); the list survives restarts."""

    def __init__(self, folder: str | Path, k: int = 4, mode: str = "max", prefix: str = "top"):
        self.folder, self.k, self.sign, self.prefix = Path(folder), k, 1 if mode == "max" else -1, prefix
        self.index = self.folder / f"{prefix}k.json"
        self.entries: list[tuple[float, str]] = json.loads(self.index.read_text()) if self.index.exists() else []
        if is_main():  # a kill during a write leaves a temp file: never part of the list, removed
            for tmp in self.folder.glob(f"{prefix}_step*.pt.tmp"):
                tmp.unlink(missing_ok=True)

    @property
    def paths(self) -> list[Path]:
        return [self.folder / name for _, name in self.entries]

    def update(self, metric: float, state: dict, step: int) -> Path | None:
        """Save `state` if it ranks in the top k; drop the checkpoint it displaces."""
        if len(self.entries) >= self.k and self.sign * metric <= self.sign * self.entries[-1][0]:
            return None
        name = f"{self.prefix}_step{step}.pt"
        save_checkpoint(self.folder / name, state)
        kept = [e for e in self.entries if e[1] != name]  # a resumed run may re-evaluate the same step
        self.entries = sorted(kept + [(float(metric), name)], key=lambda e: -self.sign * e[0])
        for _, old in self.entries[self.k:]:
            if is_main():  # only the rank that writes checkpoints deletes them
                (self.folder / old).unlink(missing_ok=True)
        self.entries = self.entries[: self.k]
        if is_main():
            write_json(self.index, self.entries)
        return self.folder / name


def average_state_dicts(states: list) -> dict:
    """Mean of several state dicts (paths, checkpoints with a 'model' entry, or state dicts).
    Float tensors (weights, BatchNorm running statistics) are averaged in float64; integer
    buffers (num_batches_tracked) are taken from the last."""
    sds = []
    for s in states:
        s = load_checkpoint(s) if isinstance(s, (str, Path)) else s
        sds.append(s["model"] if "model" in s and isinstance(s["model"], dict) else s)
    out = {}
    for key, last in sds[-1].items():
        if torch.is_floating_point(last):
            out[key] = torch.stack([sd[key].double() for sd in sds]).mean(0).to(last.dtype)
        else:
            out[key] = last.clone()
    return out


def ensemble_predictions(preds: list[np.ndarray]) -> np.ndarray:
    """Average of probability predictions (N, K) of several models."""
    return np.mean(np.stack(preds), axis=0)


if __name__ == "__main__":
    cli(main)
