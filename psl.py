"""Pseudo strong labels for large scale weakly supervised audio tagging.
Heinrich Dinkel, Zhiyong Yan, Yongqing Wang, Junbo Zhang, Yujun Wang (Xiaomi), ICASSP 2022.

What is reproduced: a machine annotator (MA, MobileNetV2 on 64-bin log-mels) trained with weak clip
labels re-estimates soft labels for every n-second chunk of a target set (pseudo strong labels,
Sec. 2); a fresh student trained on the chunks with these soft labels is compared with one trained
on the original weak labels (the paper: PSL wins by up to 18 mAP points). Stages: teacher ->
relabel -> student -> eval, plus the Sec. 4.3 analysis.

Paper, AudioSet balanced subset, eval mAP (%) / d' (Table 2):
    weak baseline 17.69 / 1.994   PSL-10s 31.13 / 2.454   PSL-5s 34.11 / 2.549   PSL-2s 35.48 / 2.588
    (the MA itself, trained on full AudioSet: 40.53 / 2.695)

    python psl.py --segment 2 --data balanced               # synthetic corpus, all stages (8 min, 2 cores)
    python psl.py --table 2                                 # weak / PSL-10s / 5s / 2s, shared teacher
    python psl.py --data-root data/audioset --segment 2     # real AudioSet (paper schedule)
    python psl.py predict --ckpt runs/psl/psl_2s_balanced/student/final.pt clip.wav
    python psl.py teacher --teacher-epochs 20 --teacher-dir runs/psl/dir_ma   # stage 1 alone (shared MA)
    python psl.py seeds --row weak RUN RUN RUN --row psl RUN RUN RUN          # mean +- std over seeds

Deviations from the paper (numbered as in the README):
 1. Validation uses the held-out valid split (valid.tsv) by mAP over n-second chunk averages; the
    paper's text says "the balanced subset", which for Table 2 is the training set and the official
    code's cv file is the training file (`--valid-on train`). Without a valid.tsv every stage
    validates on balanced_train.tsv (the paper's "balanced subset"), also the MA trained on full.
 2. Evaluation splits every clip into n-second chunks and averages the chunk scores (Sec. 3.3);
    the official code scores whole clips (`--eval-mode clip`).
 3. Adam lr 1e-4 as in Sec. 3.2; the official configs use 1e-3 (`--lr 1e-3`).
 4. On the synthetic corpus the schedule is scaled to a CPU budget (derived once after parsing):
    MA 5 epochs, student 6 epochs, validation every half epoch, and lr 1e-3 (the official value:
    at 1e-4 a 3-epoch MA reached only 0.21 validation mAP and gave every clip one label). The
    paper's values (30 / 300 epochs, every 10,000 batches, lr 1e-4) apply on real data or as flags.
 5. Not given in the paper, our choices: SpecAugment widths, gain range, time-shift range,
    polynomial power 1; mix-up is applied to waveforms. Soft labels are precomputed once per
    (teacher, data, segment) instead of online (equivalent: the teacher is deterministic in eval mode)
    and stored as float16 (rounding at most 2.4e-4): a memory-mapped .npy, 10 GB for 9.5 M chunks of
    full AudioSet, read row by row, never held in memory (README: memory per PSL row).
 6. The dB floor (top_db 120) is taken per clip, not per batch as in torchaudio.
 7. Chunks of real clips: durations rounded to 0.1 s (as the official code; at least 0.1 s), and a
    remainder shorter than 0.5 s joins the chunk before it (a 160,001-sample clip is 10.0 s; a 4.3 s
    clip at 2 s is 2 + 2.3 s), so no chunk is almost pure padding.
 8. Validation every 10,000 batches (Sec. 3.2) or once per epoch when an epoch is shorter, set per
    stage (--ma-eval-every, --eval-every); early-stop patience counts epochs (15, Sec. 3.3), not
    validations (15 validations of 10,000 batches = ~227 epochs of 10 s chunks on balanced AudioSet).
 9. Precision: with autocast (bf16 by default on CUDA) the backbone runs in reduced precision, the
    classifier and every saved or ranked score (eval, top-k averaging, soft labels) in fp32.

Clips shorter than SHORT_CLIP_S (1 s) are zero-padded and counted (`short` in the logs, `short_clips` in
results.json). DDP (torchrun): rank 0 alone writes, deletes and validates; the others wait at a barrier
after each rank-0 write they read next (MA final.pt, relabel cache, top-k files).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# Paper numbers, AudioSet balanced subset -> eval, mAP % / d' (Table 2; Table 3 for alpha = 0 / 0.5).
# Table 3 lost its segment column in the text; the 10/5/2 s order of its rows is inferred from layout.
PAPER = {("weak", 10): (17.69, 1.994), ("psl", 10): (31.13, 2.454), ("psl", 5): (34.11, 2.549),
         ("psl", 2): (35.48, 2.588), ("weak", 5): (19.76, 2.072), ("weak", 2): (20.21, 2.030),
         ("ts", 10): (27.12, 2.190), ("ts", 5): (28.24, 2.273), ("ts", 2): (28.13, 2.203)}
TABLES = {2: [("weak", 10), ("psl", 10), ("psl", 5), ("psl", 2)],
          3: [("weak", 10), ("weak", 5), ("weak", 2), ("ts", 10), ("ts", 5), ("ts", 2)]}
SYNTH_SCHEDULE = {"teacher_epochs": 5, "epochs": 6, "evals_per_epoch": 2, "lr": 1e-3}  # deviation 4


# =============================================================================================
# Arguments: every default is the paper's value (section in the help)
# =============================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "psl")
    g = p.add_argument_group("pseudo strong labels (Sec. 2, 3, 4.2)")
    g.add_argument("--segment", type=common.POSITIVE, default=2.0,
                   help="chunk length n in seconds: 2, 5 or 10 (Sec. 3)")
    g.add_argument("--labels", type=str, default="psl", choices=["psl", "weak"],
                   help="psl: MA soft labels per chunk; weak: clip labels propagated to chunks (Table 2 baseline)")
    g.add_argument("--alpha", type=common.FRACTION, default=1.0,
                   help="loss = alpha*BCE(soft) + (1-alpha)*BCE(weak); 1 = PSL, 0.5 = teacher-student (Sec. 4.2)")
    g.add_argument("--table", type=int, default=None, choices=[2, 3],
                   help="run the rows of Table 2 (weak, PSL-10/5/2s) or Table 3 (alpha 0 / 0.5) and write the table")
    g.add_argument("--threshold", type=common.FRACTION, default=0.5, help="hard labels for the analysis (Sec. 4.3)")
    g = p.add_argument_group("machine annotator (Sec. 3.3)")
    g.add_argument("--ma-data", type=str, default="full", choices=["balanced", "full", "300h"],
                   help="MA training set (full AudioSet in the paper)")
    g.add_argument("--teacher", type=str, default=None, help="use this MA checkpoint instead of training one")
    g.add_argument("--teacher-dir", type=str, default=None,
                   help="MA run folder, shared by runs (default: beside --out, teacher_<ma-data>_<corpus>)")
    g.add_argument("--teacher-epochs", type=common.POSITIVE_INT, default=None,
                   help="MA epochs with polynomial decay (30; synthetic: 5)")
    g.add_argument("--poly-power", type=common.NONNEG, default=1.0, help="polynomial lr decay power (not given; ours)")
    g.add_argument("--mixup-alpha", type=common.POSITIVE, default=1.0,
                   help="mix-up lambda ~ Beta(a, a) (Sec. 3.3, [17])")
    g.add_argument("--gain-db", type=common.NONNEG, default=6.0, help="random gain in +-dB (not given; ours)")
    g.add_argument("--max-shift-s", type=common.NONNEG, default=1.0,
                   help="circular time shift up to +-s (not given; ours)")
    g.add_argument("--freq-mask", type=common.NONNEG_INT, default=10, help="SpecAugment: max mel bins per mask (ours)")
    g.add_argument("--time-mask", type=common.NONNEG_INT, default=50, help="SpecAugment: max frames per mask (ours)")
    g.add_argument("--n-masks", type=common.NONNEG_INT, default=2, help="SpecAugment: masks per axis (ours)")
    g = p.add_argument_group("training (Sec. 3.2, 3.3)")
    g.add_argument("--batch-size", type=common.POSITIVE_INT, default=32, help="batch size (Sec. 3.2)")
    g.add_argument("--lr", type=common.POSITIVE, default=None,
                   help="Adam learning rate: 1e-4 (Sec. 3.2); official code and synthetic corpus: 1e-3")
    g.add_argument("--epochs", type=common.POSITIVE_INT, default=None, help="max student epochs (300; synthetic: 6)")
    g.add_argument("--eval-every", type=common.POSITIVE_INT, default=None,
                   help="student: validate every N batches (10,000, Sec. 3.2, or once per epoch when an epoch is "
                        "shorter; synthetic: half an epoch)")
    g.add_argument("--ma-eval-every", type=common.POSITIVE_INT, default=None,
                   help="machine annotator: validate every N batches (same default as --eval-every)")
    g.add_argument("--patience", type=common.POSITIVE, default=15,
                   help="early stop after N epochs without a validation gain (student, Sec. 3.3; MA alike)")
    g.add_argument("--top-k", type=common.POSITIVE_INT, default=4,
                   help="average the top-k checkpoints by validation mAP (Sec. 3.2)")
    g.add_argument("--valid-on", type=str, default="valid", choices=["valid", "train"],
                   help="validation split; official code: the training file (deviation 1)")
    g.add_argument("--eval-mode", type=str, default="chunks", choices=["chunks", "clip"],
                   help="chunks: average n-second chunk scores per clip (Sec. 3.3); clip: whole clips (official)")
    return p.parse_args(argv)


def run_name(a: argparse.Namespace) -> str:
    kind = "weak" if a.alpha == 0 else "psl" if a.alpha == 1 else f"ts{a.alpha:g}"
    corpus = "" if a.data_root is None else Path(a.data_root).name + "_"
    return f"{corpus}{kind}_{a.segment:g}s_{a.data}" + (f"_seed{a.seed}" if a.seed else "")


def resolve(a: argparse.Namespace, corpus: common.Corpus) -> argparse.Namespace:
    """Derived values, computed once after parsing (deviation 4 for the synthetic corpus)."""
    a = copy.copy(a)
    if a.labels == "weak":
        a.alpha = 0.0
    a.out = a.out or str(Path("runs/psl") / (a.name or run_name(a)))
    a.clip_seconds = (json.loads((corpus.root / "synth.json").read_text())["clip_seconds"]
                      if corpus.synthetic else 10.0)  # nominal; real clips are measured (common.clip_durations)
    if a.teacher_epochs is None:
        a.teacher_epochs = SYNTH_SCHEDULE["teacher_epochs"] if corpus.synthetic else 30
    if a.epochs is None:
        a.epochs = SYNTH_SCHEDULE["epochs"] if corpus.synthetic else 300
    if a.lr is None:
        a.lr = SYNTH_SCHEDULE["lr"] if corpus.synthetic else 1e-4
    a.synthetic = corpus.synthetic  # validation intervals are derived per stage in train() (eval_interval)
    corpus_tag = "synth" if corpus.synthetic else corpus.root.name
    a.teacher_dir = a.teacher_dir or str(Path(a.out).parent / f"teacher_{a.ma_data}_{corpus_tag}_"
                                                             f"{common.settings_hash(ma_settings(a, corpus))}")
    return a


# Every setting that changes the machine annotator: its folder is named by their hash, so runs with the
# same MA share it and a changed setting trains a new one (run identity).
MA_KEYS = ("ma_data", "synth_scale", "synth_clip_seconds", "seed", "teacher_epochs", "poly_power", "mixup_alpha",
           "gain_db", "max_shift_s", "freq_mask", "time_mask", "n_masks", "batch_size", "lr", "ma_eval_every",
           "patience", "top_k", "valid_on", "amp", "max_steps")


def ma_settings(a: argparse.Namespace, corpus: common.Corpus) -> dict:
    return common.run_settings({k: getattr(a, k) for k in MA_KEYS}, ignore=("max_steps",)) | \
        {"data_root": str(corpus.root.resolve()), "max_steps": a.max_steps}


# =============================================================================================
# Model: MobileNetV2 on log-mels, per-frame sigmoid, decision-level mean pooling (Sec. 3.3)
# =============================================================================================
def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, skip when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn_relu(cin, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_skip else self.conv(x)


class MobileNetV2(nn.Module):
    """Log-mel front-end -> MobileNetV2 features (stride 32 on both axes) -> mean over frequency ->
    per-frame Linear + sigmoid -> mean over time. 527 classes: 2,898,383 parameters."""
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, n_classes: int = 527, dropout: float = 0.3):
        super().__init__()
        self.frontend = common.LogMel.preset("psl")  # 16 kHz, 512/160, 64 mels, dB; no parameters
        layers, cin = [conv_bn_relu(1, 32, 3, 2)], 32
        for expand, cout, repeats, stride in self.SETTINGS:  # (t, c, n, s) of Sandler et al.
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn_relu(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, n_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, wave: torch.Tensor, mel_augment=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.frontend(wave)  # (B, 64, T)
        if mel_augment is not None:
            x = mel_augment(x)
        x = self.features(x.unsqueeze(1))  # (B, 1280, 2, T/32)
        x = x.mean(2).transpose(1, 2)  # (B, T', 1280): average over frequency only
        with torch.autocast(x.device.type, enabled=False):  # scores are saved and ranked: fp32 (deviation 9)
            frames = torch.sigmoid(self.classifier(x.float()))  # (B, T', K) per-frame probabilities
        return frames.mean(1), frames  # decision-level mean pooling over time


def build_model(ckpt: dict, path="checkpoint") -> MobileNetV2:
    """Rebuild a model from a self-describing checkpoint alone."""
    if not isinstance(ckpt, dict) or "labels" not in ckpt or "model" not in ckpt:
        raise common.DataError(f"{path}: not a psl.py model checkpoint (a student's or MA's final.pt)"
                               + (" but a psla.py one" if isinstance(ckpt, dict) and "config" in ckpt else ""))
    model = MobileNetV2(len(ckpt["labels"]["mids"]))
    model.load_state_dict(ckpt["model"])
    return model


# =============================================================================================
# Data: n-second chunks of clips (Sec. 2); the last partial chunk is kept shorter (official code)
# =============================================================================================
MIN_CHUNK_S = 0.5  # a remainder shorter than this is merged into the chunk before it (deviation 7)
SHORT_CLIP_S = 1.0  # clips shorter than this are zero-padded like any short chunk, and counted (`short`)
BLOCK = 8192  # clips per block wherever a pass over every chunk would otherwise build a full-size temporary


def chunk_dataset(corpus: common.Corpus, rows: list, targets: np.ndarray, segment: float | None,
                  clip_seconds: float) -> common.SegmentDataset:
    """One item per non-overlapping `segment`-second chunk; segment None = one item per whole clip.
    Real durations are rounded to 0.1 s (at least 0.1 s) as the official code does, so a 160,001-sample
    clip is 10.0 s, and a remainder under MIN_CHUNK_S joins the previous chunk (deviation 7).
    `ds.short_clips` counts the readable clips shorter than SHORT_CLIP_S (before rounding)."""
    raw = [clip_seconds] * len(rows) if corpus.synthetic else common.clip_durations(corpus.root, rows, clip_seconds)
    durations = raw if corpus.synthetic else [max(0.1, round(d, 1)) for d in raw]  # synthetic: nominal length
    ds = common.SegmentDataset(corpus.root, rows, targets, segment or max(durations) + 1.0,
                               clip_seconds, durations=durations, min_last=MIN_CHUNK_S)
    ds.short_clips = int(sum(d < SHORT_CLIP_S for d in raw))  # an unreadable clip has clip_seconds: not counted
    return ds


def weak_targets(corpus: common.Corpus, rows: list) -> np.ndarray:
    """(N_clips, K) uint8 multi-hot clip labels, built block by block (full AudioSet: 1 GB, not 4 GB float32)."""
    y = np.zeros((len(rows), len(corpus.labels)), np.uint8)
    for i in range(0, len(rows), BLOCK):
        y[i:i + BLOCK] = corpus.targets(rows[i:i + BLOCK])
    return y


class ChunkTargets:
    """Target row [soft | weak] (2K,) float32 of chunk i, assembled when the item is loaded (loss, Sec. 4.2):
    soft = a row of the float16 relabel cache, memory-mapped (no cache: zeros, alpha 0); weak = the row of
    the chunk's clip in the per-clip uint8 multi-hot. No (N_chunks, K) array is ever held in memory."""

    def __init__(self, weak: np.ndarray, clip_index: np.ndarray, soft_path: Path | None = None):
        self.weak, self.clip_index, self.soft_path, self._soft = weak, clip_index, soft_path, None

    @property
    def soft(self) -> np.memmap | None:
        if self._soft is None and self.soft_path is not None:  # mapped lazily, by each process that reads it
            self._soft = np.load(self.soft_path, mmap_mode="r")
        return self._soft

    def __getstate__(self) -> dict:  # a pickled copy (spawned DataLoader workers) maps the file again
        return {**self.__dict__, "_soft": None}

    def __len__(self) -> int:
        return len(self.clip_index)

    def __getitem__(self, i: int) -> torch.Tensor:
        soft = (np.zeros(self.weak.shape[1], np.float32) if self.soft is None
                else np.nan_to_num(self.soft[i].astype(np.float32)))  # NaN: a chunk the MA could not read
        return torch.from_numpy(np.concatenate([soft, self.weak[self.clip_index[i]].astype(np.float32)]))


def average_chunks(chunk_scores: np.ndarray, clip_index: np.ndarray, n_clips: int) -> np.ndarray:
    """Clip score = mean of its chunks' scores (Sec. 3.3); NaN rows (unreadable chunks) are ignored."""
    ok = ~np.isnan(chunk_scores).any(1)
    sums = np.zeros((n_clips, chunk_scores.shape[1]))
    np.add.at(sums, clip_index[ok], chunk_scores[ok])
    counts = np.bincount(clip_index[ok], minlength=n_clips)[:, None]
    return (sums / np.maximum(counts, 1)).astype(np.float32)


# =============================================================================================
# Inference, training, evaluation
# =============================================================================================
@torch.no_grad()
def predict_chunks(model: nn.Module, dataset, args, desc: str = "predict", out: np.ndarray | None = None,
                   indices: np.ndarray | None = None) -> np.ndarray:
    """Batched inference of the items `indices` (default: all) into rows of `out` (default: a new float32
    (N_items, K) array; relabeling passes a float16 memory map): clip-level probabilities, NaN for bad items."""
    model.eval()
    device = next(model.parameters()).device
    if out is None:
        out = np.full((len(dataset), model.classifier[-1].out_features), np.nan, dtype=np.float32)
    indices = np.arange(len(dataset)) if indices is None else indices
    loader = common.make_loader(dataset, args.batch_size, sampler=indices, workers=args.workers)
    bad = 0
    for j, batch in enumerate(tqdm(loader, desc=desc, leave=False, disable=not common.is_main())):
        planned = indices[j * args.batch_size:(j + 1) * args.batch_size]
        done = np.zeros(0, np.int64) if batch is None else batch[2].numpy()
        out[np.setdiff1d(planned, done)] = np.nan  # unreadable items (a new cache file holds zeros)
        bad += len(planned) - len(done)
        if batch is None:
            continue
        with common.autocast(device, common.amp_dtype(device, args.amp)):
            probs, _ = model(batch[0].to(device, non_blocking=True))
        out[done] = probs.float().cpu().numpy()
    if bad:
        print(f"{desc}: {bad} unreadable items skipped")
    return out


def evaluate(model: nn.Module, corpus: common.Corpus, rows: list, y_true: np.ndarray, segment: float | None,
             args) -> dict:
    """mAP / mAUC / d' of chunk-averaged clip scores (segment None: whole clips)."""
    ds = chunk_dataset(corpus, rows, np.zeros((len(rows), 1), np.float32), segment, args.clip_seconds)
    chunk_scores = predict_chunks(model, ds, args, "eval")
    scores = average_chunks(chunk_scores, ds.clip_index, len(rows))
    ok = np.bincount(ds.clip_index[~np.isnan(chunk_scores).any(1)], minlength=len(rows)) > 0
    # a clip none of whose chunks could be read is excluded, not scored as all-zero
    return common.tagging_metrics(y_true[ok], scores[ok]) | {"skipped_clips": int((~ok).sum()),
                                                              "short_clips": ds.short_clips}


def from_rank0(value):
    """Rank 0's value on every rank (a no-op without DDP), for decisions all ranks must share: the
    validation metric (checkpoint ranking, early stop) and whether a cache is reused."""
    if common.world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def summed(n: int) -> int:
    """Sum of an integer over the ranks (skipped clips: each rank counts its own share)."""
    if common.world_size() == 1:
        return n
    out = [0] * common.world_size()
    torch.distributed.all_gather_object(out, n)
    return sum(out)


def rank_share(indices: np.ndarray) -> np.ndarray:
    """This rank's share of one epoch's indices, padded by wrapping around to a multiple of the world size
    (as DistributedSampler), so that every rank makes the same number of steps (unequal counts hang DDP)."""
    w = common.world_size()
    return np.resize(indices, math.ceil(len(indices) / w) * w)[common.rank()::w]


def eval_interval(steps_per_epoch: int, synthetic: bool) -> int:
    """Batches between validations: every 10,000 batches (Sec. 3.2, ~1/6 of a full-AudioSet epoch) but at
    least once per epoch, so a small corpus still validates, early-stops and keeps top-k (deviation 8);
    the synthetic corpus: every half epoch (deviation 4)."""
    if synthetic:
        return max(1, steps_per_epoch // SYNTH_SCHEDULE["evals_per_epoch"])
    return max(1, min(10_000, steps_per_epoch))


def bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p.float().clamp(1e-7, 1 - 1e-7), y.float())


def train(model: nn.Module, dataset, n_classes: int, sample, folder: Path, log_dir: Path, args, *, epochs: int,
          alpha: float, augment: bool, poly_decay: bool, validate, eval_every: int | None = None) -> dict:
    """One visible loop for MA and student. `dataset` targets are [soft | weak] (2K columns); loss =
    alpha*BCE(soft) + (1-alpha)*BCE(weak) (Sec. 4.2). `sample(epoch)` gives one epoch's indices.
    Validation every `eval_every` batches (None: eval_interval), early stop after args.patience epochs
    without a gain, top-k checkpoints weight-averaged into the returned model (Sec. 3.2). Resumable from last.pt.
    `sample(epoch)` returns this rank's share of the epoch's indices."""
    device = next(model.parameters()).device
    dtype = common.amp_dtype(device, args.amp)
    net = nn.parallel.DistributedDataParallel(model) if common.world_size() > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = common.grad_scaler(device, dtype)
    steps_per_epoch = math.ceil(len(sample(0)) / args.batch_size)
    total = epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, epochs * steps_per_epoch)
    eval_every = eval_every or eval_interval(steps_per_epoch, args.synthetic)
    patience_steps = math.ceil(args.patience * steps_per_epoch)  # patience counts epochs (Sec. 3.3)
    folder.mkdir(parents=True, exist_ok=True)
    if not args.resume and common.is_main():  # a fresh stage: rank 0 alone deletes its checkpoints and log
        for f in [*folder.glob("*.pt"), *folder.glob("*.pt.tmp"), folder / "topk.json", folder / "log.jsonl"]:
            f.unlink(missing_ok=True)
    common.barrier()  # nothing is read (top-k list, last.pt) before rank 0 has deleted
    topk, logger = common.TopKCheckpoints(folder, args.top_k), common.RunLogger(log_dir)
    state = {"step": 0, "best": -1.0, "best_step": 0, "skipped": 0}
    if args.resume and (folder / "last.pt").exists():
        ck = common.load_checkpoint(folder / "last.pt", device)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"]), scaler.load_state_dict(ck["scaler"])
        state = {"skipped": 0, "best_step": 0, **ck["state"]}
        common.set_rng_state(ck.get("rng"))  # dropout, augmentation, mix-up continue as if never stopped
        if ck.get("record"):  # the line of this checkpoint, if a kill came between last.pt and the log
            logger.log_once(ck["record"], ("stage", "step"))
        print(f"{folder.name}: resumed at step {state['step']}/{total}")
    K = n_classes
    spec_augment = lambda x: common.mask_along(common.mask_along(x, args.freq_mask, 1, args.n_masks),
                                               args.time_mask, 2, args.n_masks)  # (B, mel, T)
    bar = tqdm(total=total, initial=state["step"], desc=folder.name, disable=not common.is_main())
    running, pending = [], 0  # pending: this rank's skipped items since the last validation
    stop = lambda: state["step"] >= total or state["step"] - state["best_step"] >= patience_steps
    while not stop():
        epoch, skip = divmod(state["step"], steps_per_epoch)
        indices = sample(epoch)[skip * args.batch_size:]  # this rank's share; resume mid-epoch
        loader = common.make_loader(dataset, args.batch_size, sampler=indices, workers=args.workers, seed=args.seed)
        for j, batch in enumerate(loader):
            planned = len(indices[j * args.batch_size:(j + 1) * args.batch_size])
            pending += planned - (0 if batch is None else len(batch[2]))  # unreadable: skipped, counted
            lr = args.lr * (1 - state["step"] / total) ** args.poly_power if poly_decay else args.lr
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            if batch is not None:  # None: every clip of the batch was unreadable
                wave, y, _ = (t.to(device, non_blocking=True) for t in batch)
                if augment:  # MA only (Sec. 3.3): wave augmentation, mix-up Beta(1, 1), SpecAugment
                    wave = common.wave_augment(wave, (-args.gain_db, args.gain_db),
                                               max_shift=int(args.max_shift_s * common.SR))
                    wave, y = common.mixup(wave, y, args.mixup_alpha)
                with common.autocast(device, dtype):
                    p, _ = net(wave, spec_augment if augment else None)
                loss = (alpha * bce(p, y[:, :K]) if alpha > 0 else 0) + \
                       ((1 - alpha) * bce(p, y[:, K:]) if alpha < 1 else 0)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                running.append(loss.item())
            state["step"] += 1
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == total:
                metric = from_rank0(validate(model) if common.is_main() else None)  # rank 0 validates
                state["skipped"], pending = state["skipped"] + summed(pending), 0
                gain = metric > state["best"]
                if gain:
                    state["best"], state["best_step"] = metric, state["step"]
                record = {"stage": folder.name, "step": state["step"],
                          "epoch": round(state["step"] / steps_per_epoch, 2),
                          "train/loss": float(np.mean(running)) if running else float("nan"),
                          "val/mAP": metric, "lr": lr, "skipped": state["skipped"], "short": dataset.short_clips}
                running = []
                # top-k first, then last.pt, then the log line: a kill between them redoes this
                # validation (top-k replaces its entry of the same step) and never logs a line twice
                topk.update(metric, {"model": model.state_dict()}, state["step"])
                common.save_checkpoint(folder / "last.pt", {"model": model.state_dict(), "state": state,
                                                            "optimizer": opt.state_dict(),
                                                            "scaler": scaler.state_dict(), "rng": common.rng_state(),
                                                            "record": record})
                common.barrier()
                logger.log(record)
            if stop():
                break
    bar.close()
    common.barrier()  # every top-k file is written before any rank reads them
    model.load_state_dict(common.average_state_dicts(topk.paths))  # top-k weight averaging (Sec. 3.2)
    return {"best_val_mAP": state["best"], "steps": state["step"], "skipped_clips": state["skipped"],
            "averaged": [p.name for p in topk.paths]}


def save_final(path: Path, model: nn.Module, corpus: common.Corpus, segment: float | None, args, info: dict) -> None:
    common.save_checkpoint(path, {"model": model.state_dict(), "segment": segment, "args": vars(args), "info": info,
                                  "labels": {"mids": corpus.labels.mids, "names": corpus.labels.names}})


# =============================================================================================
# Paper procedures: MA training, relabeling, student training, analysis
# =============================================================================================
def eval_targets(corpus: common.Corpus) -> np.ndarray:
    """The eval clips' true labels where the corpus has them (eval_true.tsv), else their manifest labels."""
    rows = corpus.eval
    return corpus.true_targets(rows) if all(fn in corpus.true for fn, _ in rows) else corpus.targets(rows)


def validation_split(corpus: common.Corpus, args) -> list:
    """valid.tsv; without one, the balanced subset (Sec. 3.2: 'we validate the model on the balanced
    subset'), whatever the stage trains on; --valid-on train: the stage's own training set (official)."""
    if args.valid_on == "train":
        return corpus.train
    if corpus.valid is not None:
        return corpus.valid
    print(f"{corpus.root}: no valid.tsv: validating on balanced_train.tsv (the paper's 'balanced subset')")
    return common.read_manifest(corpus.root / "balanced_train.tsv")


def train_teacher(args, device) -> Path:
    """Stage 1 (Sec. 3.3): the MA on --ma-data with weak labels, pseudo-balanced sampling,
    wave augmentation, mix-up, SpecAugment and polynomial lr decay; whole 10 s clips."""
    folder = Path(args.teacher_dir)
    final = folder / "final.pt"
    corpus = common.load_corpus(args.data_root, args.ma_data, args.synth_scale, args.synth_clip_seconds, args.seed)
    settings = ma_settings(args, corpus)
    common.claim_run_folder(folder, settings, True, "machine annotator")  # an explicit --teacher-dir may differ
    if final.exists() and (folder / "results.json").exists():
        return final
    model = MobileNetV2(len(corpus.labels)).to(device)
    ds = chunk_dataset(corpus, corpus.train, np.zeros((len(corpus.train), 0), np.float32), None, args.clip_seconds)
    if final.exists():
        model.load_state_dict(common.load_checkpoint(final)["model"])
    else:
        folder.mkdir(parents=True, exist_ok=True)
        common.save_config(folder, args, settings)
        weak = weak_targets(corpus, corpus.train)  # (N_clips, K) uint8
        ds.targets = ChunkTargets(weak, ds.clip_index)  # [zeros | weak]: alpha 0 trains on the weak half
        sampler = common.PseudoBalancedSampler(weak, seed=args.seed)
        sample = lambda epoch: rank_share(sampler.epoch_indices(epoch))  # the epoch's share
        vrows = validation_split(corpus, args)
        vtrue = corpus.targets(vrows)
        print(f"machine annotator: MobileNetV2, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{len(ds)} clips of {args.ma_data}")
        info = train(model, ds, len(corpus.labels), sample, folder, folder, args, epochs=args.teacher_epochs,
                     alpha=0.0, augment=True, poly_decay=True, eval_every=args.ma_eval_every,
                     validate=lambda m: evaluate(m, corpus, vrows, vtrue, None, args)["mAP"])
        save_final(final, model, corpus, None, args, info)
        common.barrier()  # rank 0 wrote final.pt; the others read it next
    # the MA's own eval numbers on whole clips (paper, full AudioSet: 40.53 mAP, d' 2.695)
    m = evaluate(model, corpus, corpus.eval, eval_targets(corpus), None, args)
    table = common.markdown_table(["model", "mAP %", "mAUC", "d'", common.paper_heading(corpus, "paper mAP %"),
                                   "paper d'"],
                                  [[f"MA ({args.ma_data})", f"{100 * m['mAP']:.2f}", f"{m['mAUC']:.4f}",
                                    f"{m['dprime']:.3f}", "40.53", "2.695"]])
    common.write_results(folder, {k: m[k] for k in ("mAP", "mAUC", "dprime", "AP", "skipped_clips")}
                         | {"short_clips": {"train": ds.short_clips, "eval": m["short_clips"]}}, table)
    print(table)
    return final


def relabel_segments(teacher: nn.Module, corpus: common.Corpus, rows: list, segment: float, args,
                     cache: Path) -> np.memmap:
    """Stage 2 (Sec. 2): the MA's soft labels y_PSL^n for every n-second chunk of the target set,
    (N_chunks, K), never thresholded; computed once per (teacher, data, segment) and cached as a float16
    .npy (half the bytes; rounding at most 2.4e-4), written batch by batch through a memory map and read
    back memory-mapped, so no process holds the whole array. Under DDP each rank labels its share."""
    ds = chunk_dataset(corpus, rows, np.zeros((len(rows), 0), np.float32), segment, args.clip_seconds)
    shape = (len(ds), teacher.classifier[-1].out_features)
    old = np.load(cache, mmap_mode="r") if cache.exists() else None
    reuse = old is not None and old.shape == shape and old.dtype == np.float16  # else (older code's float32): redo
    del old
    if not from_rank0(reuse):  # rank 0 decides: every rank takes the same path (the same barriers)
        tmp = cache.with_suffix(".tmp.npy")
        if common.is_main():
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape).flush()  # sparse file
        common.barrier()  # rank 0 created the file before any rank opens it
        soft = np.load(tmp, mmap_mode="r+")
        share = np.array_split(np.arange(len(ds)), common.world_size())[common.rank()]  # contiguous rows
        predict_chunks(teacher, ds, args, f"relabel {segment:g}s", out=soft, indices=share)
        soft.flush()
        del soft
        common.barrier()  # every share is written before rank 0 publishes the file
        if common.is_main():
            tmp.replace(cache)
        common.barrier()  # rank 0 renamed it before any rank reads it
    return np.load(cache, mmap_mode="r")


def readable(soft: np.ndarray) -> np.ndarray:
    """(N_chunks,) bool: chunks the MA could read (no NaN in the row), block by block over the memory map."""
    step = BLOCK * 8
    return np.concatenate([~np.isnan(soft[i:i + step]).any(1) for i in range(0, len(soft), step)]
                          or [np.zeros(0, bool)])


def chunk_truth(corpus: common.Corpus, rows: list, ds: common.SegmentDataset, c0: int = 0,
                c1: int | None = None) -> np.ndarray:
    """(chunks of clips c0..c1, K) bool: true labels of every chunk (corpora with strong_*.tsv), the classes
    of the events overlapping it, plus those of their ancestors that are classes and, where the clip has
    true labels (*_true.tsv), among them. Loops over events (a one-off), not over samples of a hot path."""
    c1 = len(rows) if c1 is None else c1
    first = np.searchsorted(ds.clip_index, np.arange(len(rows) + 1))  # chunks of clip ci: first[ci]:first[ci+1]
    base = first[c0]
    y = np.zeros((first[c1] - base, len(corpus.labels)), bool)
    starts = np.array([c[1] for c in ds.chunks[base:first[c1]]])
    ends = np.array([c[2] for c in ds.chunks[base:first[c1]]])
    for ci in range(c0, c1):
        fn = rows[ci][0]
        lo, hi = first[ci] - base, first[ci + 1] - base
        true = set(corpus.true[fn]) if fn in corpus.true else None
        for on, off, mid in corpus.strong.get(fn, []):
            hit = lo + np.flatnonzero((starts[lo:hi] < off) & (ends[lo:hi] > on))
            for m in {mid} | {a for a in corpus.ontology.ancestors(mid) if true is None or a in true}:
                if m in corpus.labels.index:  # ancestors that are not classes (abstract nodes) are skipped
                    y[hit, corpus.labels.index[m]] = True
    return y


def pr_counts(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[true positives, predicted, true] of two bool arrays; summed over blocks, then precision_recall."""
    return np.array([(pred & true).sum(), pred.sum(), true.sum()], np.int64)


def precision_recall(counts: np.ndarray) -> dict:
    tp, pred, true = (float(c) for c in counts)
    return {"precision": tp / max(pred, 1), "recall": tp / max(true, 1)}


def analyse_labels(corpus: common.Corpus, rows: list, soft: np.ndarray, ds: common.SegmentDataset,
                   threshold: float, weak: np.ndarray | None = None) -> dict:
    """Sec. 4.3: soft labels thresholded at 0.5; labels per clip (union over its chunks) histogram and
    label coverage |pred & weak| / |weak| per clip. On the synthetic corpus, also precision/recall
    against the TRUE clip labels and the true strong labels per chunk (a check AudioSet cannot give).
    One pass over blocks of clips: per-chunk arrays exist for one block at a time. `weak`: the uint8
    weak_targets of `rows`, if the caller holds them already."""
    weak = (weak_targets(corpus, rows) if weak is None else weak).view(bool)  # (N_clips, K); 0/1 bytes, no copy
    per_clip = np.zeros_like(weak)
    first = np.searchsorted(ds.clip_index, np.arange(len(rows) + 1))  # every clip has >= 1 chunk
    strong = any(fn in corpus.strong for fn, _ in rows)
    chunk_counts = {"pseudo": np.zeros(3, np.int64), "weak": np.zeros(3, np.int64)}
    for c0 in range(0, len(rows), BLOCK):
        c1 = min(c0 + BLOCK, len(rows))
        lo, hi = first[c0], first[c1]
        hard = np.nan_to_num(soft[lo:hi].astype(np.float32)) > threshold  # (chunks of the block, K)
        per_clip[c0:c1] = np.logical_or.reduceat(hard, first[c0:c1] - lo, axis=0)  # union over a clip's chunks
        if strong:
            ctrue = chunk_truth(corpus, rows, ds, c0, c1)
            chunk_counts["pseudo"] += pr_counts(hard, ctrue)
            chunk_counts["weak"] += pr_counts(weak[ds.clip_index[lo:hi]], ctrue)
    n_labels = per_clip.sum(1)
    coverage = (per_clip & weak).sum(1) / np.maximum(weak.sum(1), 1)
    res = {"threshold": threshold,
           "labels_per_clip": {str(k): int(v) for k, v in enumerate(np.bincount(n_labels, minlength=1))},
           "weak_labels_per_clip": {str(k): int(v) for k, v in enumerate(np.bincount(weak.sum(1)))},
           "no_label_fraction": float((n_labels == 0).mean()), "mean_coverage": float(coverage.mean()),
           "coverage_0": float((coverage == 0).mean()), "coverage_1": float((coverage == 1).mean())}
    if all(fn in corpus.true for fn, _ in rows):  # gated on the truth files, not on synth.json
        true = corpus.true_targets(rows) > 0
        res["clip_vs_true"] = {"pseudo": precision_recall(pr_counts(per_clip, true)),
                               "weak": precision_recall(pr_counts(weak, true))}
    if strong:
        res["chunk_vs_true_strong"] = {k: precision_recall(c) for k, c in chunk_counts.items()}
    return res


def analysis_markdown(a: dict, segment: float) -> str:
    lines = [f"### Pseudo labels at {segment:g} s, threshold {a['threshold']} (Sec. 4.3)", "",
             "labels per clip (pseudo): " + ", ".join(f"{k}: {v}" for k, v in a["labels_per_clip"].items()),
             "labels per clip (weak):   " + ", ".join(f"{k}: {v}" for k, v in a["weak_labels_per_clip"].items()),
             f"clips without a pseudo label: {a['no_label_fraction']:.1%}; label coverage of the weak labels: "
             f"mean {a['mean_coverage']:.3f}, none {a['coverage_0']:.1%}, all {a['coverage_1']:.1%}"]
    for key, what in (("clip_vs_true", "clip labels vs TRUE clip labels"),
                      ("chunk_vs_true_strong", "chunk labels vs TRUE strong labels")):
        if key in a:
            ps, wk = a[key]["pseudo"], a[key]["weak"]
            lines.append(f"{what}: pseudo P {ps['precision']:.3f} R {ps['recall']:.3f} | "
                         f"weak P {wk['precision']:.3f} R {wk['recall']:.3f}")
    return "\n".join(lines)


def student_data(args, corpus: common.Corpus, device) -> tuple[common.SegmentDataset, np.ndarray, dict | None]:
    """The target set's chunks with [soft | weak] targets (weak = clip labels propagated, Sec. 2), the
    chunks usable for training, and the Sec. 4.3 analysis (None for alpha = 0, which needs no MA, and
    on ranks other than 0). Targets are read per item (ChunkTargets): soft from the float16 memory map."""
    ds = chunk_dataset(corpus, corpus.train, np.zeros((len(corpus.train), 0), np.float32), args.segment,
                       args.clip_seconds)
    weak = weak_targets(corpus, corpus.train)  # (N_clips, K) uint8, indexed per chunk by ds.clip_index
    if args.alpha == 0:
        ds.targets = ChunkTargets(weak, ds.clip_index)
        return ds, np.arange(len(ds)), None
    ckpt_path = Path(args.teacher) if args.teacher else train_teacher(args, device)
    if not ckpt_path.is_file():
        raise common.DataError(f"--teacher {ckpt_path}: not a checkpoint file (give an MA's final.pt)")
    key = common.settings_hash({"teacher": str(ckpt_path.resolve()), "size": ckpt_path.stat().st_size,
                                "mtime": ckpt_path.stat().st_mtime_ns, "data_root": str(corpus.root.resolve()),
                                "data": args.data, "segment": args.segment, "amp": args.amp,
                                "dtype": "float16"})  # a float32 cache of older code is never reused
    cache = ckpt_path.parent / "relabel" / f"{ckpt_path.stem}_{args.data}_{args.segment:g}s_{key}.npy"
    teacher = build_model(common.load_checkpoint(ckpt_path), ckpt_path).to(device)
    soft = relabel_segments(teacher, corpus, corpus.train, args.segment, args, cache)
    ok = readable(soft)
    usable = np.flatnonzero(ok)  # chunks the MA could read
    print(f"relabel {args.segment:g}s: {len(ds)} chunks of {len(corpus.train)} clips, "
          f"skipped={len(np.unique(ds.clip_index[~ok]))} unreadable clips, short={ds.short_clips} clips "
          f"under {SHORT_CLIP_S:g} s (padded); {cache.name}")
    analysis = analyse_labels(corpus, corpus.train, soft, ds, args.threshold, weak) if common.is_main() else None
    ds.targets = ChunkTargets(weak, ds.clip_index, cache)
    return ds, usable, analysis


# =============================================================================================
# main: teacher -> relabel -> student -> eval, each stage skipped when its output exists
# =============================================================================================
def run(args: argparse.Namespace) -> dict:
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    args = resolve(args, corpus)
    out = Path(args.out)
    settings = common.run_settings(args) | {"data_root": str(corpus.root.resolve())}
    with common.RunLock(out):  # a second run on this folder is refused while this one runs
        common.claim_run_folder(out, settings, args.resume)  # other settings: refused; --no-resume: fresh
        if (out / "results.json").exists() and args.resume:
            print(f"{out}: done (results.json exists)")
            return json.loads((out / "results.json").read_text())
        common.save_config(out, args, settings)
        return run_stages(args, corpus, device, out)


def run_stages(args: argparse.Namespace, corpus: common.Corpus, device, out: Path) -> dict:
    # stages 1 + 2: MA and pseudo strong labels (skipped for alpha = 0)
    ds, usable, analysis = student_data(args, corpus, device)
    if analysis is not None:  # rank 0 only
        print(analysis_markdown(analysis, args.segment))
        common.write_json(out / "analysis.json", analysis)
    # stage 3: the student on the chunks, random sampling, no augmentation (Sec. 3.3)
    K = len(corpus.labels)
    final = out / "student" / "final.pt"
    model = MobileNetV2(K).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if final.exists() and args.resume:
        ck = common.load_checkpoint(final)
        model.load_state_dict(ck["model"])
        info = ck["info"]
    else:
        vrows = validation_split(corpus, args)
        vtrue, vseg = corpus.targets(vrows), args.segment if args.eval_mode == "chunks" else None
        print(f"student: MobileNetV2, {n_params:,} parameters, {len(usable)} chunks of {args.segment:g} s, "
              f"alpha {args.alpha:g}")
        sample = lambda epoch: rank_share(np.random.default_rng([args.seed, epoch]).permutation(usable))  # Sec. 3.3
        info = train(model, ds, K, sample, out / "student", out, args, epochs=args.epochs, alpha=args.alpha,
                     augment=False, poly_decay=False, eval_every=args.eval_every,
                     validate=lambda m: evaluate(m, corpus, vrows, vtrue, vseg, args)["mAP"])
        save_final(final, model, corpus, args.segment, args, info)
    # stage 4: eval clips split into n-second chunks, chunk scores averaged per clip (Sec. 3.3)
    eval_true = eval_targets(corpus)
    m = evaluate(model, corpus, corpus.eval, eval_true, args.segment if args.eval_mode == "chunks" else None, args)
    kind = "weak" if args.alpha == 0 else "psl" if args.alpha == 1 else "ts"
    results = {"method": kind, "segment": args.segment, "alpha": args.alpha, "data": args.data,
               "mAP": m["mAP"], "mAUC": m["mAUC"], "dprime": m["dprime"], "AP": m["AP"], "params": n_params,
               "student": info, "analysis": analysis, "corpus": "synthetic" if corpus.synthetic else str(corpus.root),
               "skipped_clips": {"relabel_clips": len(np.unique(np.delete(ds.clip_index, usable))),
                                 "student_train": info["skipped_clips"], "eval": m["skipped_clips"]},
               "short_clips": {"train": ds.short_clips, "eval": m["short_clips"]}}  # < SHORT_CLIP_S, padded
    paper = PAPER.get((kind, int(args.segment))) if args.data == "balanced" else None
    title = f"## PSL: {kind} labels, {args.segment:g} s chunks, alpha {args.alpha:g}, trained on {args.data}"
    table = common.markdown_table(["method", "mAP %", "mAUC", "d'", common.paper_heading(corpus, "paper mAP %"),
                                   "paper d'"],
                                  [[f"{kind}-{args.segment:g}s", f"{100 * m['mAP']:.2f}", f"{m['mAUC']:.4f}",
                                    f"{m['dprime']:.3f}", *(map(str, paper) if paper else ("-", "-"))]])
    common.write_results(out, results, "\n\n".join([title, table, analysis_markdown(analysis, args.segment)
                                                    if analysis else ""]))
    print(f"{title}\n\n{table}")  # the analysis was printed before the student stage
    return results


def run_table(args: argparse.Namespace) -> None:
    """Rows of Table 2 or 3 as sibling runs (each resumable, sharing the MA and the relabel cache)."""
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    out = Path(args.out or f"runs/psl/table{args.table}")
    base = copy.copy(args)
    base.table, base.out, base.name = None, None, None
    rows = []
    for kind, seg in TABLES[args.table]:
        a = copy.copy(base)
        a.labels, a.segment = "weak" if kind == "weak" else "psl", float(seg)
        a.alpha = {"weak": 0.0, "psl": 1.0, "ts": 0.5}[kind]
        a.out = str(out / run_name(a)) if args.out else None  # default: runs/psl/<row>, shared with single runs
        r = run(a)
        paper = PAPER[(kind, seg)]
        rows.append([{"weak": "weak", "psl": "PSL", "ts": "teacher-student"}[kind] + f"-{seg}s", f"{a.alpha:g}",
                     f"{100 * r['mAP']:.2f}", f"{r['dprime']:.3f}", f"{r['mAUC']:.4f}", str(paper[0]), str(paper[1])])
    md = "\n".join([f"## PSL Table {args.table} on {'the synthetic corpus' if corpus.synthetic else corpus.root}, "
                    f"trained on {args.data}", "",
                    common.markdown_table(["method", "alpha", "mAP %", "d'", "mAUC",
                                           common.paper_heading(corpus, "paper mAP %"),
                                           "paper d'"], rows)])
    out.mkdir(parents=True, exist_ok=True)
    common.write_results(out, {"table": args.table, "rows": rows}, md)
    print(md)


def seeds_main(argv: list[str]) -> dict:
    """`python psl.py seeds --row NAME RUN [RUN ...] ...`: a direction-run table, one row per setting, eval
    mAP / mAUC / d' as mean +- sample std over its runs (seeds), and each row's paired difference (same
    seed, given in the same order) from the first row."""
    p = argparse.ArgumentParser(prog="psl.py seeds", description="mean +- std over seeds, one row per setting")
    p.add_argument("--row", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                   help="a row name followed by its run folders (one per seed, the same seed order in every row)")
    p.add_argument("--out", default="runs/psl/seeds", help="folder for results.json/.md")
    a = p.parse_args(argv)
    table, rows = {}, []
    for i, (name, *runs) in enumerate(a.row):
        if not runs:
            raise common.DataError(f"--row {name}: no run folders")
        res = [json.loads((Path(r) / "results.json").read_text()) if (Path(r) / "results.json").is_file() else {}
               for r in runs]
        if bad := [r for r, x in zip(runs, res) if "student" not in x]:
            raise common.DataError(f"--row {name}: {bad[0]} is not a finished psl.py run")
        t = table[name] = {k: [x[k] for x in res] for k in ("mAP", "mAUC", "dprime")} | {"runs": runs}
        first = table[a.row[0][0]]["mAP"]
        t["minus_first"] = [x - y for x, y in zip(t["mAP"], first)] if i and len(first) == len(runs) else None
        rows.append([name, len(runs), common.mean_std(t["mAP"], 100, 2), " / ".join(f"{100 * v:.2f}" for v in t["mAP"]),
                     common.mean_std(t["mAUC"]), common.mean_std(t["dprime"], 1, 3),
                     common.mean_std(t["minus_first"], 100, 2) if t["minus_first"] else "-"])
    md = common.markdown_table(["setting", "seeds", "mAP %", "per seed", "mAUC", "d'",
                                f"mAP - {a.row[0][0]} (paired)"], rows)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    common.write_results(Path(a.out), table, "# PSL direction run: mean +- std over seeds (eval)\n\n" + md)
    print(md)
    return table


def predict(argv: list[str]) -> None:
    """Tag audio files with a checkpoint: top classes per clip and a per-segment timeline."""
    p = argparse.ArgumentParser(prog="psl.py predict", description="tag audio files with a PSL/MA checkpoint")
    p.add_argument("--ckpt", required=True, help="final.pt of a student or teacher")
    p.add_argument("--segment", type=common.POSITIVE, default=None,
                   help="timeline resolution (default: the model's chunk length)")
    p.add_argument("--top", type=common.POSITIVE_INT, default=5, help="classes shown per clip (3 per segment)")
    p.add_argument("--device", default="auto")
    p.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    ckpt = common.load_checkpoint(a.ckpt)
    device = common.pick_device(a.device)
    model = build_model(ckpt, a.ckpt).to(device).eval()
    names = ckpt["labels"]["names"]
    segment = a.segment or ckpt["segment"] or 2.0
    for path in a.files:
        wave = torch.from_numpy(common.load_audio(path))
        bounds = common.segment_bounds(max(0.1, round(len(wave) / common.SR, 1)), segment, MIN_CHUNK_S)
        chunks = [F.pad(c, (0, max(0, round((e - s) * common.SR) - len(c))))  # a 1-sample file: 0.1 s
                  for s, e in bounds for c in [wave[round(s * common.SR): round(e * common.SR)]]]
        batch = common.pad_collate([(c, torch.zeros(1), i) for i, c in enumerate(chunks)])[0]
        with torch.no_grad():
            probs = model(batch.to(device))[0].cpu().numpy()  # (n_chunks, K)
        clip = probs.mean(0)
        print(f"{path}: " + ", ".join(f"{names[k]} {clip[k]:.2f}" for k in np.argsort(-clip)[:a.top]))
        for (s, e), pr in zip(bounds, probs):
            print(f"  {s:6.1f}-{e:6.1f} s  " + ", ".join(f"{names[k]} {pr[k]:.2f}" for k in np.argsort(-pr)[:3]))


def run_teacher(args: argparse.Namespace) -> Path:
    """`python psl.py teacher [flags]`: stage 1 alone (train the MA, or reuse it when done) and print its
    checkpoint, for student runs to share with --teacher (e.g. every seed of a direction run)."""
    common.seed_everything(args.seed)
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    final = train_teacher(resolve(args, corpus), common.pick_device(args.device))
    print(f"machine annotator: {final}")
    return final


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    if argv[:1] == ["seeds"]:
        return seeds_main(argv[1:])
    teacher_only = argv[:1] == ["teacher"]
    args = parse_args(argv[1:] if teacher_only else argv)
    common.setup_ddp()
    try:
        run_teacher(args) if teacher_only else run_table(args) if args.table else run(args)
    finally:
        common.cleanup_ddp()


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        sys.exit(f"error: {e}")
