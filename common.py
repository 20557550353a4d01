"""Shared infrastructure for the five reproduction scripts.

Sections (in order): run helpers; audio I/O and manifests; datasets and loaders; the synthetic
corpus; synthetic downstream tasks; `prepare` for real AudioSet; front-ends; augmentation;
samplers; metrics; checkpoints and weight averaging; command line.

Command line:
    python common.py synth [--root data/synth] [--scale 1.0] [--seed 0]   # build + summarise
    python common.py summary [--root data/synth]
    python common.py prepare --csv-dir CSVS --audio-dir CLIPS --out data/audioset
    python common.py bench [--root data/synth]      # loader and front-end throughput

This module never imports a script; scripts pass their own classes and functions in.
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import csv
import fcntl
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
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


# =============================================================================================
# Run helpers: arguments, seeding, device, AMP, DDP, logging, results
# =============================================================================================
def add_common_args(p: argparse.ArgumentParser, script: str) -> None:
    """The flags every script shares (DESIGN.md, 'common flags'). Paper values are set by scripts."""
    g = p.add_argument_group("common")
    g.add_argument("--data-root", type=str, default=None,
                   help="corpus in our layout (see README); default: the synthetic corpus in data/synth")
    g.add_argument("--data", type=str, default="balanced", choices=["balanced", "full", "300h"],
                   help="training manifest: balanced, full (balanced+unbalanced) or 300h")
    g.add_argument("--out", type=str, default=None, help=f"run folder (default runs/{script}/<name>)")
    g.add_argument("--name", type=str, default=None, help="run name (default derived from the flags)")
    g.add_argument("--device", type=str, default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--amp", type=str, default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, none elsewhere")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--max-steps", type=int, default=None, help="stop each training stage after this many steps (smoke runs)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the run folder's checkpoints (stages whose output exists are skipped)")
    g.add_argument("--synth-scale", type=float, default=1.0, help="size of the synthetic corpus (1.0 ~ 1,600 clips)")
    g.add_argument("--synth-clip-seconds", type=float, default=10.0, help="clip length of the synthetic corpus")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """One precision switch: a real autocast on an accelerator, a no-op otherwise."""
    if dtype is None or device.type == "cpu":
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


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


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


def save_config(out: str | Path, args: argparse.Namespace) -> None:
    if is_main():
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "config.json", vars(args))


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def write_results(out: str | Path, results: dict, markdown: str) -> None:
    """results.json (machine-readable) and results.md (the paper-style table)."""
    if is_main():
        write_json(Path(out) / "results.json", results)
        (Path(out) / "results.md").write_text(markdown.rstrip() + "\n")


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


def read_class_labels(path: str | Path) -> Labels:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataError(f"{path}: no classes")
    rows.sort(key=lambda r: int(r["index"]))
    return Labels([r["mid"] for r in rows], [r["display_name"] for r in rows])


def write_class_labels(path: str | Path, mids: list[str], names: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(["index", "mid", "display_name"])
        w.writerows([i, m, n] for i, (m, n) in enumerate(zip(mids, names)))


@dataclass
class Ontology:
    """AudioSet ontology.json: names, direct children and direct parents (a DAG)."""
    names: dict[str, str]
    children: dict[str, list[str]]
    parents: dict[str, list[str]]

    def ancestors(self, mid: str) -> set[str]:
        """All ancestors through any chain of parents (transitive, multiple parents)."""
        seen, stack = set(), list(self.parents.get(mid, []))
        while stack:
            p = stack.pop()
            if p not in seen:
                seen.add(p)
                stack.extend(self.parents.get(p, []))
        return seen


def read_ontology(path: str | Path) -> Ontology:
    nodes = json.loads(Path(path).read_text())
    names = {n["id"]: n["name"] for n in nodes}
    children = {n["id"]: list(n.get("child_ids", [])) for n in nodes}
    parents: dict[str, list[str]] = {}
    for p, cs in children.items():
        for c in cs:
            parents.setdefault(c, []).append(p)
    return Ontology(names, children, parents)


Row = tuple[str, list[str]]  # (filename relative to the data root, [mids])


def read_manifest(path: str | Path) -> list[Row]:
    """filename<TAB>labels (comma-separated mids); a header line 'filename...' is skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
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


def multi_hot(rows: list[Row], labels: Labels, where: str = "manifest") -> np.ndarray:
    """(N, K) float32 targets; an unknown label id is an error naming the row."""
    y = np.zeros((len(rows), len(labels)), dtype=np.float32)
    for i, (fn, mids) in enumerate(rows):
        for m in mids:
            j = labels.index.get(m)
            if j is None:
                raise DataError(f"{where}: row {i + 1} ({fn}): unknown label id {m!r}")
            y[i, j] = 1.0
    return y


def read_strong(path: str | Path) -> dict[str, list[tuple[float, float, str]]]:
    """strong_<split>.tsv: filename, onset, offset, label -> {filename: [(onset, offset, mid)]}."""
    events: dict[str, list[tuple[float, float, str]]] = {}
    with open(path) as f:
        next(f)
        for line in f:
            fn, on, off, mid = line.rstrip("\n").split("\t")
            events.setdefault(fn, []).append((float(on), float(off), mid))
    return events


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
    """Everything a script needs from a data root, in the layout of DESIGN.md."""
    root: Path
    labels: Labels
    ontology: Ontology
    train: list[Row]
    valid: list[Row] | None
    eval: list[Row]
    synthetic: bool
    # filename -> true clip labels / true events (synthetic corpus only; empty for real data)
    true: dict[str, list[str]] = field(default_factory=dict)
    strong: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)

    def targets(self, rows: list[Row], where: str = "manifest") -> np.ndarray:
        return multi_hot(rows, self.labels, where)

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
    for split in ("balanced_train", "unbalanced_train", "valid", "eval"):
        if (root / f"{split}_true.tsv").exists():
            corpus.true.update(dict(read_manifest(root / f"{split}_true.tsv")))
        if (root / f"strong_{split}.tsv").exists():
            corpus.strong.update(read_strong(root / f"strong_{split}.tsv"))
    for name, rows in (("train", corpus.train), ("eval", corpus.eval), ("valid", corpus.valid or [])):
        multi_hot(rows, labels, f"{root}/{name}")  # fail early, naming the row, on an unknown id
    return corpus


# =============================================================================================
# Datasets and loaders
# =============================================================================================
class ClipDataset(torch.utils.data.Dataset):
    """Whole clips: (wave (clip_seconds*sr,), target (K,), index). A bad clip gives None (skipped)."""

    def __init__(self, root: str | Path, rows: list[Row], targets: np.ndarray,
                 clip_seconds: float = 10.0, sr: int = SR):
        self.root, self.rows, self.targets = Path(root), rows, torch.as_tensor(targets)
        self.n, self.sr = int(round(clip_seconds * sr)), sr

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        try:
            x = load_audio(self.root / self.rows[i][0], self.sr)
        except DataError as e:  # one bad clip of a million must not stop training
            warnings.warn(f"skipping: {e}")
            return None
        return torch.from_numpy(crop_or_pad(x, self.n)), self.targets[i], i


def segment_bounds(duration: float, segment: float) -> list[tuple[float, float]]:
    """Non-overlapping n-second chunks of a clip; the last one keeps the shorter remainder
    (as the official PSL code: no padding per chunk; a batch is padded to its longest item)."""
    starts = np.arange(0.0, duration - 1e-6, segment)
    return [(float(s), float(min(s + segment, duration))) for s in starts]


class SegmentDataset(torch.utils.data.Dataset):
    """Fixed-length chunks of clips (PSL): item = (wave chunk, target (K,), chunk index).
    `targets` is (N_clips, K) (each chunk inherits its clip's row) or (N_chunks, K)."""

    def __init__(self, root: str | Path, rows: list[Row], targets: np.ndarray, segment_seconds: float,
                 clip_seconds: float = 10.0, sr: int = SR, durations: list[float] | None = None):
        self.root, self.rows, self.sr = Path(root), rows, sr
        durations = durations or [clip_seconds] * len(rows)
        self.chunks = [(ci, s, e) for ci, d in enumerate(durations) for s, e in segment_bounds(d, segment_seconds)]
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
                seed: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else False,
        num_workers=workers, collate_fn=pad_collate, worker_init_fn=seed_worker, generator=g,
        persistent_workers=workers > 0, drop_last=drop_last, pin_memory=torch.cuda.is_available())


# =============================================================================================
# The synthetic corpus: AudioSet in miniature, with the ground truth AudioSet never has
# =============================================================================================
# 6 parents x 4 children. Children of one parent are deliberately confusable (same generator
# family, overlapping parameters). (name, min duration s, max duration s)
SYNTH_CLASSES = {
    "Tone": [("Pure tone, low", .5, 3.), ("Pure tone, high", .5, 3.), ("Harmonic tone", .5, 3.), ("Vibrato tone", .5, 3.)],
    "Noise": [("Low-band noise", 1., 4.), ("Mid-band noise", 1., 4.), ("High-band noise", 1., 4.), ("Pulsed noise", 1., 4.)],
    "Impact": [("Click", .2, .4), ("Knock", .2, .6), ("Slow click train", .5, 2.), ("Fast click train", .5, 2.)],
    "Sweep": [("Up-chirp", .5, 2.5), ("Down-chirp", .5, 2.5), ("Siren", 1., 4.), ("Warble", .5, 3.)],
    "Voice": [("Vowel a", .3, 2.), ("Vowel i", .3, 2.), ("Vowel u", .3, 2.), ("Vowel e", .3, 2.)],
    "Music": [("Major chord", .5, 3.), ("Minor chord", .5, 3.), ("Arpeggio", 1., 4.), ("Drum beat", 1., 4.)],
}
PARENTS = list(SYNTH_CLASSES)
CHILDREN = [(p, c) for p in range(len(PARENTS)) for c in range(4)]  # leaf classes (parent, child)
FORMANTS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]  # a i u e


def parent_mid(p: int) -> str:
    return f"/synth/p{p}"


def child_mid(p: int, c: int) -> str:
    return f"/synth/p{p}c{c}"


def _band_noise(rng, n: int, lo: float, hi: float, sr: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, n)


def _harmonics(f0: np.ndarray, sr: int, amps) -> np.ndarray:
    """Sum of harmonics k*f0(t) (f0 may vary over time), amplitudes amps[k-1]; k*f0 < Nyquist."""
    phase = 2 * np.pi * np.cumsum(f0) / sr
    out = np.zeros_like(f0)
    for k, a in enumerate(amps, 1):
        if a and k * f0.max() < sr / 2:
            out += a * np.sin(k * phase)
    return out


def synth_event(p: int, c: int, dur: float, rng: np.random.Generator, sr: int = SR,
                f0: float | None = None) -> np.ndarray:
    """One procedurally generated event of leaf class (p, c), unit peak (f0: a voice's pitch)."""
    n = max(int(dur * sr), 16)
    t = np.arange(n) / sr
    name = PARENTS[p]
    if name == "Tone":
        f0 = rng.uniform(*[(250, 450), (500, 900), (250, 600), (300, 800)][c])
        f = np.full(n, f0)
        if c == 3:
            f = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(5, 7) * t))
        x = _harmonics(f, sr, [1, .5, .33, .25] if c == 2 else [1])
    elif name == "Noise":
        lo, hi = [(100, 800), (800, 2500), (2500, 6000), (100, 800)][c]
        x = _band_noise(rng, n, lo * rng.uniform(.8, 1.2), hi * rng.uniform(.8, 1.2), sr)
        if c == 3:
            x *= 0.5 * (1 + np.sign(np.sin(2 * np.pi * rng.uniform(3, 5) * t)))
    elif name == "Impact":
        def hit(freq, decay):
            m = min(n, int(0.15 * sr))
            h = np.zeros(n)
            h[:m] = np.sin(2 * np.pi * freq * t[:m]) * np.exp(-t[:m] / decay)
            return h
        if c in (0, 1):
            x = hit(rng.uniform(2000, 4000), .01) if c == 0 else hit(rng.uniform(150, 400), .03)
        else:
            rate = rng.uniform(3, 6) if c == 2 else rng.uniform(12, 25)
            click = hit(rng.uniform(2000, 4000), .005)[: int(sr / rate)]
            x = np.zeros(n)
            for s in range(0, n, int(sr / rate)):
                seg = click[: n - s]
                x[s: s + len(seg)] += seg
    elif name == "Sweep":
        if c in (0, 1):
            a, b = rng.uniform(250, 400), rng.uniform(2500, 3500)
            f = a * (b / a) ** (t / dur) if c == 0 else b * (a / b) ** (t / dur)
        elif c == 2:
            f = 1000 + 400 * np.sin(2 * np.pi * rng.uniform(.5, 1.) * t)
        else:
            f = rng.uniform(1000, 2000) + 200 * np.sin(2 * np.pi * rng.uniform(8, 15) * t)
        x = _harmonics(f, sr, [1])
    elif name == "Voice":
        f0 = (f0 or rng.uniform(100, 220)) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
        formants = np.array(FORMANTS[c]) * rng.uniform(.95, 1.05)
        k = np.arange(1, int(4000 / f0.max()) + 1)
        gain = (1 / (1 + ((k[:, None] * f0.mean() - formants[None]) / 80.0) ** 2)).sum(1)  # formant envelope
        x = _harmonics(f0, sr, list(gain))
    else:  # Music
        root = rng.uniform(200, 400)
        triad = [1, 5 / 4, 3 / 2] if c != 1 else [1, 6 / 5, 3 / 2]
        if c in (0, 1):
            x = sum(_harmonics(np.full(n, root * r), sr, [1, .5, .25]) for r in triad) * np.exp(-t / max(dur, .5))
        elif c == 2:
            note = int(0.15 * sr)
            f = np.array([root * triad[(i // note) % 3] for i in range(n)])
            x = _harmonics(f, sr, [1, .5, .25]) * (1 - (np.arange(n) % note) / note)
        else:
            beat = int(sr / rng.uniform(2, 4))
            x = np.zeros(n)
            kick = np.sin(2 * np.pi * rng.uniform(60, 100) * t[:beat]) * np.exp(-t[:beat] / .05)
            hat = _band_noise(rng, beat, 5000, 7900, sr) * np.exp(-t[:beat] / .01)
            for s in range(0, n, beat):
                m = min(beat, n - s)
                x[s: s + m] += kick[:m] + (hat[:m] if (s // beat) % 2 else 0)
    fade = min(int(0.01 * sr), n // 2)
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade)
    env[n - fade:] = np.linspace(1, 0, fade)
    x = x * env
    return x / (np.abs(x).max() + 1e-9)


@dataclass
class NoiseRates:
    """Label corruption of the training splits, the way AudioSet's weak labels are wrong."""
    type1: float = 0.25       # child label missing, parent kept (PSLA Type I)
    type2: float = 0.25       # parent label missing, child kept (PSLA Type II)
    missed_short: float = 0.5  # an event shorter than short_s is missed by the annotator
    short_s: float = 0.6
    spurious: float = 0.05    # probability of one wrong extra leaf label per clip


# split -> (clips per leaf class for balanced-style splits | total clips for Zipf splits, noisy labels?)
SYNTH_SPLITS = {"balanced_train": ("floor", 12, True), "unbalanced_train": ("zipf", 900, True),
                "valid": ("floor", 6, True), "eval": ("floor", 12, False)}


def _add_event(x: np.ndarray, leaf: int, rng: np.random.Generator, clip_s: float, min_db: float) -> tuple[float, float]:
    """Add one event of leaf class `leaf` at a random onset and level (min_db..-6 dB) into x, in
    place; returns its (onset, offset) in seconds."""
    p, c = CHILDREN[leaf]
    lo, hi = SYNTH_CLASSES[PARENTS[p]][c][1:]
    dur = min(rng.uniform(lo, hi), clip_s)
    on = rng.uniform(0, clip_s - dur)
    ev = synth_event(p, c, dur, rng) * 10 ** (rng.uniform(min_db, -6) / 20)
    s = int(on * SR)
    x[s: s + len(ev)] += ev[: len(x) - s]
    return round(on, 3), round(on + dur, 3)


def _synth_clip(args):
    """Generate, write and label one clip (a worker job; deterministic in (seed, split, index))."""
    root, split, idx, anchor, seed, clip_s, zipf_p, noise = args
    rng = np.random.default_rng([seed, list(SYNTH_SPLITS).index(split), idx])
    n = int(clip_s * SR)
    # low pink-ish background: one-pole low-passed white noise at about -50 dBFS
    bg = rng.standard_normal(n)
    bg = np.convolve(bg, np.exp(-np.arange(64) / 16.0), mode="same")
    x = bg / (np.abs(bg).max() + 1e-9) * 10 ** (rng.uniform(-55, -45) / 20)
    n_events = int(rng.integers(1, 6))
    leaves = [anchor] + [int(rng.choice(len(CHILDREN), p=zipf_p)) for _ in range(n_events - 1)]
    events = [(*_add_event(x, leaf, rng, clip_s, -24.0), leaf) for leaf in leaves]
    x /= max(1.0, np.abs(x).max() / 0.99)
    fn = f"audio/{split}/{split}_{idx:05d}.wav"
    sf.write(str(Path(root) / fn), x.astype(np.float32), SR, subtype="PCM_16")
    true = sorted({child_mid(*CHILDREN[l]) for *_, l in events} | {parent_mid(CHILDREN[l][0]) for *_, l in events})
    weak, stats = corrupt_labels(events, rng, noise) if noise else (true, {})
    return fn, true, weak, events, stats


def corrupt_labels(events, rng: np.random.Generator, r: NoiseRates) -> tuple[list[str], dict]:
    """Weak labels an imperfect annotator gives a clip; the counts say which error happened."""
    stats = {"missed_short": 0, "type1": 0, "type2": 0, "spurious": 0}
    longest: dict[int, float] = {}
    for on, off, leaf in events:
        longest[leaf] = max(longest.get(leaf, 0.0), off - on)
    heard = set()
    for leaf, d in sorted(longest.items()):
        if d < r.short_s and rng.random() < r.missed_short:
            stats["missed_short"] += 1
        else:
            heard.add(leaf)
    parents = sorted({CHILDREN[l][0] for l in heard})
    labels = set()
    for leaf in sorted(heard):
        if rng.random() < r.type1:
            stats["type1"] += 1  # child missing; its parent stays (added below)
        else:
            labels.add(child_mid(*CHILDREN[leaf]))
    for p in parents:
        has_child = any(child_mid(p, c) in labels for c in range(4))
        if has_child and rng.random() < r.type2:
            stats["type2"] += 1  # parent missing while a child is labelled
        else:
            labels.add(parent_mid(p))
    if rng.random() < r.spurious:
        wrong = [l for l in range(len(CHILDREN)) if l not in longest]
        labels.add(child_mid(*CHILDREN[int(rng.choice(wrong))]))
        stats["spurious"] += 1
    if not labels:  # AudioSet clips always carry at least one label: keep the first event's parent
        labels.add(parent_mid(CHILDREN[events[0][2]][0]))
    return sorted(labels), stats


def make_synthetic_corpus(root: str | Path = SYNTH_ROOT, scale: float = 1.0, seed: int = 0,
                          clip_seconds: float = 10.0, noise: NoiseRates | None = None,
                          workers: int = 2, downstream: bool = True, quiet: bool = False) -> Path:
    """Write the synthetic corpus in the real layout. Deterministic in (seed, scale, clip_seconds)."""
    root = Path(root)
    noise = noise or NoiseRates()
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "audio").mkdir(parents=True)
    mids = [m for p in range(len(PARENTS)) for m in [parent_mid(p)] + [child_mid(p, c) for c in range(4)]]
    names = [n for p, pn in enumerate(PARENTS) for n in [pn] + [f"{pn}: {c[0]}" for c in SYNTH_CLASSES[pn]]]
    write_class_labels(tmp / "class_labels_indices.csv", mids, names)
    onto = [{"id": parent_mid(p), "name": PARENTS[p], "child_ids": [child_mid(p, c) for c in range(4)],
             "restrictions": []} for p in range(len(PARENTS))]
    onto += [{"id": child_mid(p, c), "name": f"{PARENTS[p]}: {SYNTH_CLASSES[PARENTS[p]][c][0]}", "child_ids": [],
              "restrictions": []} for p, c in CHILDREN]
    (tmp / "ontology.json").write_text(json.dumps(onto, indent=1))
    # Zipf prior over leaf classes (a fixed random rank order) for the unbalanced split
    order = np.random.default_rng(seed).permutation(len(CHILDREN))
    zipf = np.empty(len(CHILDREN))
    zipf[order] = 1.0 / np.arange(1, len(CHILDREN) + 1) ** 1.1
    zipf /= zipf.sum()
    uniform = np.full(len(CHILDREN), 1.0 / len(CHILDREN))
    summary = {"seed": seed, "scale": scale, "clip_seconds": clip_seconds, "noise": vars(noise), "splits": {}}
    for split, (kind, size, noisy) in SYNTH_SPLITS.items():
        (tmp / "audio" / split).mkdir()
        if kind == "floor":  # a floor of clips per class: every leaf class anchors `size` clips
            anchors = [l for _ in range(max(1, round(size * scale))) for l in range(len(CHILDREN))]
            prior = uniform
        else:
            count = max(len(CHILDREN), round(size * scale))
            anchors = np.random.default_rng([seed, 99]).choice(len(CHILDREN), count, p=zipf).tolist()
            prior = zipf
        jobs = [(str(tmp), split, i, a, seed, clip_seconds, prior, noise if noisy else None)
                for i, a in enumerate(anchors)]
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                out = pool.map(_synth_clip, jobs, chunksize=16)
        else:
            out = [_synth_clip(j) for j in jobs]
        write_manifest(tmp / f"{split}.tsv", [(fn, weak) for fn, _, weak, _, _ in out])
        write_manifest(tmp / f"{split}_true.tsv", [(fn, true) for fn, true, *_ in out])
        with open(tmp / f"strong_{split}.tsv", "w") as f:
            f.write("filename\tonset\toffset\tlabel\n")
            for fn, _, _, events, _ in out:
                f.writelines(f"{fn}\t{on:.3f}\t{off:.3f}\t{child_mid(*CHILDREN[l])}\n" for on, off, l in events)
        stats = {k: sum(s.get(k, 0) for *_, s in out) for k in ("missed_short", "type1", "type2", "spurious")}
        summary["splits"][split] = {"clips": len(out), "noisy_labels": noisy, **stats}
        if not quiet:
            print(f"synth: {split}: {len(out)} clips", flush=True)
    if downstream:
        make_downstream_tasks(tmp / "downstream", scale=scale, seed=seed, workers=workers)
    write_json(tmp / "synth.json", summary)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)  # the corpus appears whole or not at all
    return root


def ensure_synthetic(root: str | Path | None = None, scale: float = 1.0, seed: int = 0,
                     clip_seconds: float = 10.0) -> Path:
    """The synthetic corpus with these settings, generated on first use. The default lives in
    data/synth; other settings get their own folder, so they never replace it. A file lock makes
    concurrent first uses generate it once."""
    if root is None:
        default = (scale, seed, clip_seconds) == (1.0, 0, 10.0)
        root = SYNTH_ROOT if default else SYNTH_ROOT.with_name(f"synth_scale{scale:g}_clip{clip_seconds:g}_seed{seed}")
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = root / "synth.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            if (m["seed"], m["scale"], m["clip_seconds"]) == (seed, scale, clip_seconds):
                return root
        print(f"generating the synthetic corpus in {root} (scale {scale}, seed {seed}) ...", flush=True)
        return make_synthetic_corpus(root, scale=scale, seed=seed, clip_seconds=clip_seconds)


def corpus_summary(root: str | Path = SYNTH_ROOT) -> str:
    """Per-class clip counts per split, and label-noise statistics against the true labels."""
    root = Path(root)
    labels = read_class_labels(root / "class_labels_indices.csv")
    meta = json.loads((root / "synth.json").read_text()) if (root / "synth.json").exists() else None
    splits = [s for s in ("balanced_train", "unbalanced_train", "valid", "eval") if (root / f"{s}.tsv").exists()]
    counts = {s: multi_hot(read_manifest(root / f"{s}.tsv"), labels).sum(0).astype(int) for s in splits}
    lines = [f"corpus {root}: {len(labels)} classes"]
    lines.append(f"{'class':34s}" + "".join(f"{s[:12]:>14s}" for s in splits))
    for k, name in enumerate(labels.names):
        lines.append(f"{name[:34]:34s}" + "".join(f"{counts[s][k]:14d}" for s in splits))
    for s in splits:
        rows = read_manifest(root / f"{s}.tsv")
        line = f"{s}: {len(rows)} clips, {sum(len(m) for _, m in rows) / len(rows):.2f} labels/clip"
        if (root / f"{s}_true.tsv").exists():
            weak = multi_hot(rows, labels)
            true = multi_hot(read_manifest(root / f"{s}_true.tsv"), labels)
            tp = (weak * true).sum()
            line += f", label precision {tp / weak.sum():.3f}, recall {tp / true.sum():.3f} vs true labels"
        if meta and s in meta["splits"]:
            st = meta["splits"][s]
            if st["noisy_labels"]:
                line += (f"; injected: {st['type1']} Type I, {st['type2']} Type II, "
                         f"{st['missed_short']} missed short events, {st['spurious']} spurious")
        lines.append(line)
    return "\n".join(lines)


# =============================================================================================
# Synthetic downstream tasks (at_transfer.py, conformer_ssl.py): task manifest + metric
# =============================================================================================
def _downstream_clip(args):
    root, task, idx, spec, seed, clip_s = args
    rng = np.random.default_rng([seed, 1000 + ["sound", "tagging", "keywords"].index(task), idx])
    n = int(clip_s * SR)
    x = rng.standard_normal(n) * 10 ** (rng.uniform(-55, -45) / 20)
    if task == "keywords":  # a 'word' = two vowels spoken by one 'speaker' (one f0 per clip)
        f0 = rng.uniform(90, 240)
        on = rng.uniform(0, 0.15)
        for v in spec:
            dur = rng.uniform(0.3, 0.4)
            ev = synth_event(4, v, dur, rng, f0=f0) * 10 ** (rng.uniform(-12, -6) / 20)
            s = int(on * SR)
            x[s: s + len(ev)] += ev[: n - s]
            on += dur
    else:
        for leaf in spec:
            _add_event(x, leaf, rng, clip_s, -20.0)
    x /= max(1.0, np.abs(x).max() / 0.99)
    fn = f"{task}/audio/{task}_{idx:05d}.wav"
    sf.write(str(Path(root) / fn), x.astype(np.float32), SR, subtype="PCM_16")
    return fn


def make_downstream_tasks(root: str | Path, scale: float = 1.0, seed: int = 0, workers: int = 2) -> dict:
    """Three tasks in a generic manifest (filename, labels, fold) + tasks.json (metric, folds):
    sound (ESC-50-like, single label, 5-fold accuracy), tagging (FSD50K-like, multi-label, mAP),
    keywords (Speech-Commands-like: two-vowel 'words' by random speakers, accuracy)."""
    root = Path(root)
    rng = np.random.default_rng([seed, 7])
    words = [(a, b) for a in range(4) for b in range(4) if a != b][:10]
    specs: dict[str, list] = {}
    per = max(2, round(10 * scale))
    specs["sound"] = [([leaf], f"{i % 5 + 1}") for leaf in range(len(CHILDREN)) for i in range(per)]
    specs["tagging"] = [(sorted(set(rng.choice(len(CHILDREN), rng.integers(1, 4)).tolist())),
                         ["train", "train", "train", "valid", "test"][i % 5]) for i in range(max(20, round(300 * scale)))]
    specs["keywords"] = [(list(words[w]), ["train", "train", "train", "valid", "test"][i % 5])
                         for i in range(max(4, round(20 * scale))) for w in range(len(words))]
    tasks = {}
    for task, items in specs.items():
        (root / task / "audio").mkdir(parents=True, exist_ok=True)
        clip_s = {"sound": 5.0, "tagging": 5.0, "keywords": 1.0}[task]
        jobs = [(str(root), task, i, spec, seed, clip_s) for i, (spec, _) in enumerate(items)]
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                files = pool.map(_downstream_clip, jobs, chunksize=16)
        else:
            files = [_downstream_clip(j) for j in jobs]
        name = (lambda l: f"word_{'aiue'[l[0]]}{'aiue'[l[1]]}") if task == "keywords" else (lambda l: [child_mid(*CHILDREN[x]) for x in l])
        with open(root / task / f"{task}.tsv", "w") as f:
            f.write("filename\tlabels\tfold\n")
            for fn, (spec, fold) in zip(files, items):
                lab = name(spec)
                f.write(f"{fn}\t{lab if isinstance(lab, str) else ','.join(lab)}\t{fold}\n")
        tasks[task] = {"manifest": f"{task}/{task}.tsv", "clip_seconds": clip_s,
                       "type": "multi" if task == "tagging" else "single",
                       "metric": "mAP" if task == "tagging" else "accuracy",
                       "folds": ["1", "2", "3", "4", "5"] if task == "sound" else ["train", "valid", "test"]}
    write_json(root / "tasks.json", tasks)
    return tasks


# =============================================================================================
# prepare: official AudioSet segment CSVs + a folder of clips -> our layout
# =============================================================================================
def read_segments_csv(path: str | Path) -> list[tuple[str, float, float, list[str]]]:
    """Official *_segments.csv: '# ...' header lines, then YTID, start, end, "mid,mid"."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.reader((l for l in f if not l.startswith("#")), skipinitialspace=True):
            if len(r) >= 4:
                rows.append((r[0], float(r[1]), float(r[2]), [m for m in r[3].split(",") if m]))
    return rows


def index_clips(audio_dir: str | Path) -> dict[str, Path]:
    """YouTube id -> file. Accepts the usual namings: <id>.wav, Y<id>.wav, <id>_<start>_<end>.flac, ..."""
    index: dict[str, Path] = {}
    for path in sorted(Path(audio_dir).rglob("*")):
        if path.suffix.lower() not in (".wav", ".flac", ".ogg"):
            continue
        stem = path.stem
        for key in (stem, stem[:11], stem[1:12] if stem.startswith("Y") else None):
            if key:
                index.setdefault(key, path)
    return index


def prepare(csv_dir: str | Path, audio_dir: str | Path, out: str | Path, meta_dir: str | Path = AUDIOSET_META,
            seed: int = 0) -> dict:
    """Write balanced_train/unbalanced_train/eval/300h_train tsvs (paths relative to `out`) and copy
    class_labels_indices.csv + ontology.json; report the rows that have no audio."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("class_labels_indices.csv", "ontology.json"):
        shutil.copy(Path(meta_dir) / f, out / f)
    labels = read_class_labels(out / "class_labels_indices.csv")
    clips = index_clips(audio_dir)
    report = {}
    manifests = {}
    for split in ("balanced_train", "unbalanced_train", "eval"):
        path = Path(csv_dir) / f"{split}_segments.csv"
        if not path.exists():
            continue
        rows, missing = [], 0
        for ytid, *_, mids in read_segments_csv(path):
            clip = clips.get(ytid) or clips.get("Y" + ytid)
            if clip is None:
                missing += 1
                continue
            rows.append((os.path.relpath(clip.resolve(), out.resolve()), mids))
        multi_hot(rows, labels, str(path))
        write_manifest(out / f"{split}.tsv", rows)
        manifests[split] = rows
        report[split] = {"rows": len(rows) + missing, "with_audio": len(rows), "missing_audio": missing}
        print(f"prepare: {split}: {len(rows)} clips, {missing} rows without audio", flush=True)
    if "balanced_train" in manifests and "unbalanced_train" in manifests:
        rows = sample_300h(manifests["balanced_train"], manifests["unbalanced_train"], labels, seed=seed)
        write_manifest(out / "300h_train.tsv", rows)
        report["300h_train"] = {"with_audio": len(rows)}
    write_json(out / "prepare_report.json", report)
    return report


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
    # PSL / AT transfer (Dinkel et al.): 16 kHz, 32 ms window, 10 ms hop, 64 mels, dB
    "psl": dict(sr=16000, n_fft=512, win_length=512, hop_length=160, n_mels=64, log="db", top_db=120.0),
    "at": dict(sr=16000, n_fft=512, win_length=512, hop_length=160, n_mels=64, log="db", top_db=120.0),
    # Conformer SSL (Srivastava et al.): 64 mels, 64 ms window, 20 ms hop, log with offset
    "conformer": dict(sr=16000, n_fft=1024, win_length=1024, hop_length=320, n_mels=64, log="log", offset=1e-6),
    # PANNs-style front-end (OFA for AEC): 1024/320 at 32 kHz, 50 Hz-14 kHz, slaney mel, dB
    "panns32k": dict(sr=32000, n_fft=1024, win_length=1024, hop_length=320, n_mels=64, f_min=50.0,
                     f_max=14000.0, mel_scale="slaney", mel_norm="slaney", log="db"),
    "panns16k": dict(sr=16000, n_fft=512, win_length=512, hop_length=160, n_mels=64, f_min=50.0,
                     f_max=8000.0, mel_scale="slaney", mel_norm="slaney", log="db"),
}


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

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):  # the front-end stays in fp32
            spec = torch.stft(wave.float(), self.n_fft, self.hop, self.win, self.window, center=self.center,
                              pad_mode="reflect", return_complex=True).abs() ** self.power  # (B, F, T)
            mel = torch.matmul(spec.transpose(1, 2), self.fb).transpose(1, 2)  # (B, n_mels, T)
            if self.log == "log":
                return torch.log(mel + self.offset)
            db = 10.0 * torch.log10(mel.clamp_min(self.amin))
            if self.top_db is not None:  # floor per clip (torchaudio's floor is per batch)
                db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - self.top_db)
            return db


class KaldiFbank(nn.Module):
    """Kaldi-compatible log mel filterbank, batched: (B, N) -> (B, T, n_mels). Same result as
    torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, window_type='hanning',
    dither=0, snip_edges=True): per-frame DC removal, pre-emphasis, symmetric Hann window, zero-pad
    to a power of two, power spectrum, Kaldi mel scale (1127 ln(1 + f/700)), log with float eps floor."""

    def __init__(self, sr: int = 16000, n_mels: int = 128, frame_length_ms: float = 25.0,
                 frame_shift_ms: float = 10.0, preemphasis: float = 0.97, remove_dc: bool = True,
                 low_freq: float = 20.0, high_freq: float = 0.0):
        super().__init__()
        self.win = int(sr * frame_length_ms * 0.001)
        self.shift = int(sr * frame_shift_ms * 0.001)
        self.n_fft = 1 << (self.win - 1).bit_length()
        self.preemphasis, self.remove_dc = preemphasis, remove_dc
        self.register_buffer("window", torch.hann_window(self.win, periodic=False), persistent=False)
        high = high_freq if high_freq > 0 else sr / 2 + high_freq
        mel_lo, mel_hi = hz_to_mel(low_freq, "kaldi"), hz_to_mel(high, "kaldi")
        delta = (mel_hi - mel_lo) / (n_mels + 1)
        left = mel_lo + np.arange(n_mels) * delta
        center, right = left + delta, left + 2 * delta
        mel = hz_to_mel(sr / self.n_fft * np.arange(self.n_fft // 2), "kaldi")[:, None]  # (n_fft/2, 1)
        fb = np.maximum(0.0, np.minimum((mel - left) / (center - left), (right - mel) / (right - center)))
        fb = np.vstack([fb, np.zeros((1, n_mels))])  # the Nyquist bin gets no weight, as in Kaldi
        self.register_buffer("fb", torch.tensor(fb, dtype=torch.float32), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        with torch.autocast(wave.device.type, enabled=False):
            frames = wave.float().unfold(-1, self.win, self.shift)  # (B, T, win)
            if self.remove_dc:
                frames = frames - frames.mean(-1, keepdim=True)
            if self.preemphasis:
                prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
                frames = frames - self.preemphasis * prev
            frames = F.pad(frames * self.window, (0, self.n_fft - self.win))
            power = torch.fft.rfft(frames).abs() ** 2  # (B, T, n_fft/2 + 1)
            return torch.log((power @ self.fb).clamp_min(torch.finfo(torch.float32).eps))


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
                 max_shift: int = 16000) -> torch.Tensor:
    """Raw-wave augmentation (Gain, PolarityInversion, TimeShift), per sample: (B, N) -> (B, N).
    The shift is circular by up to +-max_shift samples."""
    b, n = wave.shape
    dev = wave.device
    gain = 10 ** ((torch.rand(b, device=dev) * (gain_db[1] - gain_db[0]) + gain_db[0]) / 20)
    sign = torch.where(torch.rand(b, device=dev) < polarity_p, -1.0, 1.0)
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), device=dev)
    idx = (torch.arange(n, device=dev).unsqueeze(0) - shift) % n
    return torch.gather(wave, 1, idx) * (gain * sign).unsqueeze(1)


# =============================================================================================
# Samplers (DDP-aware: every rank draws the same global list from seed+epoch and keeps its share)
# =============================================================================================
def generate_sampling_weights(targets: np.ndarray) -> np.ndarray:
    """PSLA Algorithm 1: w_i = sum over the labels k of clip i of 1 / count_k (labels may be soft:
    a clip counts for each class it carries). The official 1000/(count+0.01) only rescales."""
    counts = targets.sum(0)
    return (targets * (1.0 / np.maximum(counts, 1e-12))).sum(1)


class _EpochSampler(torch.utils.data.Sampler, abc.ABC):
    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abc.abstractmethod
    def _global(self) -> np.ndarray:
        """One epoch's full list of indices (the same on every rank)."""

    def __iter__(self):
        idx = self._global()
        return iter(idx[rank()::world_size()].tolist())

    def __len__(self) -> int:
        return len(range(rank(), self.num_samples, world_size()))


class WeightedSampler(_EpochSampler):
    """Draw num_samples indices with replacement with probability proportional to `weights`."""

    def __init__(self, weights: np.ndarray, num_samples: int | None = None, seed: int = 0):
        super().__init__(num_samples or len(weights), seed)
        self.p = np.asarray(weights, dtype=np.float64) / np.sum(weights)

    def _global(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.choice(len(self.p), self.num_samples, replace=True, p=self.p)


class PseudoBalancedSampler(_EpochSampler):
    """PANNs / Dinkel et al.: classes visited in shuffled round-robin order; each visit takes the
    next clip of that class from its own reshuffled list, so every batch holds many labels."""

    def __init__(self, targets: np.ndarray, num_samples: int | None = None, seed: int = 0):
        super().__init__(num_samples or len(targets), seed)
        self.by_class = [np.flatnonzero(targets[:, k] > 0) for k in range(targets.shape[1])]
        self.classes = np.array([k for k, ix in enumerate(self.by_class) if len(ix)])

    def _global(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        k = len(self.classes)
        rounds = -(-self.num_samples // k)
        seq = np.concatenate([rng.permutation(self.classes) for _ in range(rounds)])[: self.num_samples]
        out = np.empty(self.num_samples, dtype=np.int64)
        for c in self.classes:  # loop over classes, not samples
            where = np.flatnonzero(seq == c)
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
    averaged over all pairs."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    ge = y_score[:, None, :] >= y_score[:, :, None]  # (N, K, K): class j scores >= class i
    rank = ge.sum(2)
    pos_rank = (ge * y_true[:, None, :]).sum(2)
    prec = np.where(y_true > 0, pos_rank / rank, 0.0)
    return float(prec.sum() / y_true.sum())


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
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    if not Path(path).exists():
        raise DataError(f"{path}: checkpoint not found")
    return torch.load(path, map_location=map_location, weights_only=False)


class TopKCheckpoints:
    """Keep the k best checkpoints by a metric in `folder` (best first); the list survives restarts."""

    def __init__(self, folder: str | Path, k: int = 4, mode: str = "max", prefix: str = "top"):
        self.folder, self.k, self.sign, self.prefix = Path(folder), k, 1 if mode == "max" else -1, prefix
        self.index = self.folder / f"{prefix}k.json"
        self.entries: list[tuple[float, str]] = json.loads(self.index.read_text()) if self.index.exists() else []

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


# =============================================================================================
# Command line
# =============================================================================================
def bench(root: str | Path, batch: int = 32, n_batches: int = 10, workers: int = 2) -> dict:
    """Clips/s of the wav ClipDataset through a DataLoader, and of LogMel/KaldiFbank on the CPU."""
    corpus = load_corpus(str(root), "full")
    ds = ClipDataset(corpus.root, corpus.train, corpus.targets(corpus.train))
    loader = make_loader(ds, batch, shuffle=True, workers=workers)
    it = iter(loader)
    next(it)  # start the workers
    t = time.time()
    for _ in range(n_batches):
        wave, *_ = next(it)
    load = n_batches * batch / (time.time() - t)
    res = {"loader_clips_per_s": load}
    for name, fe in (("logmel_psl", LogMel.preset("psl")), ("kaldi_fbank", KaldiFbank())):
        fe(wave)
        t = time.time()
        for _ in range(5):
            fe(wave)
        res[f"{name}_clips_per_s"] = 5 * batch / (time.time() - t)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="generate the synthetic corpus and print its summary")
    s.add_argument("--root", default=str(SYNTH_ROOT))
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--clip-seconds", type=float, default=10.0)
    s.add_argument("--workers", type=int, default=2)
    s = sub.add_parser("summary", help="print a corpus's per-class counts and label-noise statistics")
    s.add_argument("--root", default=str(SYNTH_ROOT))
    s = sub.add_parser("prepare", help="official AudioSet CSVs + downloaded clips -> our layout")
    s.add_argument("--csv-dir", required=True, help="folder with balanced_train_segments.csv etc.")
    s.add_argument("--audio-dir", required=True, help="folder (searched recursively) with the clips")
    s.add_argument("--out", default="data/audioset")
    s = sub.add_parser("bench", help="loader and front-end throughput on this machine")
    s.add_argument("--root", default=str(SYNTH_ROOT))
    s.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    if a.cmd == "synth":
        t = time.time()
        make_synthetic_corpus(a.root, scale=a.scale, seed=a.seed, clip_seconds=a.clip_seconds, workers=a.workers)
        print(f"generated in {time.time() - t:.1f} s")
        print(corpus_summary(a.root))
    elif a.cmd == "summary":
        print(corpus_summary(a.root))
    elif a.cmd == "prepare":
        print(json.dumps(prepare(a.csv_dir, a.audio_dir, a.out), indent=1))
    elif a.cmd == "bench":
        if not Path(a.root, "synth.json").exists() and Path(a.root) == SYNTH_ROOT:
            ensure_synthetic()
        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(bench(a.root, workers=a.workers), indent=1))


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
