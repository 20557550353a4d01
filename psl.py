"""Pseudo strong labels for large scale weakly supervised audio tagging.
Heinrich Dinkel, Zhiyong Yan, Yongqing Wang, Junbo Zhang, Yujun Wang (Xiaomi), ICASSP 2022.

What is reproduced: a machine annotator (MA, MobileNetV2 on 64-bin log-mels) trained with weak clip
labels re-estimates soft labels for every n-second chunk of a target set (pseudo strong labels,
Sec. 2); a fresh student trained on the chunks with these soft labels is compared with one trained
on the original weak labels (the paper: PSL wins by up to 18 mAP points). Stages (run()): teacher ->
relabel -> analysis (Sec. 4.3) -> student -> eval.

Paper, AudioSet balanced subset, eval mAP (%) / d' (Table 2):
    weak baseline 17.69 / 1.994   PSL-10s 31.13 / 2.454   PSL-5s 34.11 / 2.549   PSL-2s 35.48 / 2.588
    (the MA itself, trained on full AudioSet: 40.53 / 2.695)

    python psl.py --segment 2 --data balanced               # synthetic corpus, all stages (the default run)
    python psl.py --table 2                                 # weak / PSL-10s / 5s / 2s, shared teacher
    python psl.py --data-root data/audioset --segment 2     # real AudioSet (on a GPU: the paper's schedule)
    python psl.py --data-root data/audioset --preset cpu --ma-eval-every 1 --eval-every 1   # validate per epoch
    torchrun --nproc_per_node=2 psl.py --segment 2          # DDP (gloo on CPU, nccl on GPUs)
    python psl.py predict --ckpt runs/psl/psl_2s_balanced/student/final.pt clip.wav   # tag your audio
    python psl.py teacher --teacher-epochs 20               # stage 1 alone: prints the shared MA's folder
    python psl.py plot runs/psl/psl_2s_balanced --out chunks.png   # mAP against chunk length, beside the paper's

--preset auto|paper|cpu decides the schedule of the flags left unset (one line at start says which and
why): auto = the paper's (Sec. 3.2, 3.3) on a CUDA GPU, the CPU one (deviation 4) otherwise, whatever the
corpus. Validation intervals are epochs of the stage's own training set (--eval-every 0.5 = twice per
epoch on any corpus) or batches with a `b` suffix (10000b, the paper's). Every training stage (the MA
first: a PSL student is capped by it) says in its last log line and results.json whether its validation
mAP reached a plateau (common.plateau_report: the last quarter of validations within 0.005 of the best).
Seeds (runs named by --name: weak_s0..2 and psl_s0..2 with --seed 0..2): mean +- std, then the figure:
    python common.py seeds --row weak-2s runs/psl/weak_s{0,1,2} --row PSL-2s runs/psl/psl_s{0,1,2} --out runs/psl/s2
    python psl.py plot runs/psl/s2

A killed run resumes exactly (bit-identical results) when the same command is run again; --no-resume
restarts the run folder (removing only the files psl.py wrote there). The MA and each relabel cache
are shared stages: folders `<--stages>/teacher-<hash>` and `relabel-<hash>` named by every setting
that changes them (the relabel cache: the teacher file's content, the corpus files, data, segment),
reused by every run that needs the same one and never removed by --no-resume.

Deviations from the paper (numbered as in docs/psl.md):
 1. Validation uses the held-out valid split (valid.tsv) by mAP over n-second chunk averages; the
    paper's text says "the balanced subset", which for Table 2 is the training set and the official
    code's cv file is the training file (`--valid-on train`). Without a valid.tsv every stage
    validates on balanced_train.tsv (the paper's "balanced subset"), also the MA trained on full.
 2. Evaluation splits every clip into n-second chunks and averages the chunk scores (Sec. 3.3);
    the official code scores whole clips (`--eval-mode clip`).
 3. Adam lr 1e-4 as in Sec. 3.2 (preset paper); the official configs use 1e-3 (`--lr 1e-3`).
 4. Without a CUDA GPU (--preset auto -> cpu, on any corpus) the schedule is scaled to a CPU budget:
    MA 5 epochs, student 6 epochs, validation every half epoch of the stage's training set (0.5), and
    lr 1e-3 (the official value: at 1e-4 a 3-epoch MA reached only 0.21 validation mAP and gave every
    clip one label). The paper's values (30 / 300 epochs, every 10,000 batches, lr 1e-4) are
    --preset paper (auto on a GPU) or flags; a flag given on the command line wins over either preset.
 5. Not given in the paper, our choices: SpecAugment widths, gain range, time-shift range,
    polynomial power 1; mix-up is applied to waveforms. Soft labels are precomputed once per
    (teacher, data, segment) instead of online (equivalent: the teacher is deterministic in eval mode)
    and stored as float16 (rounding at most 2.4e-4): a memory-mapped .npy, 10 GB for 9.5 M chunks of
    full AudioSet, read row by row, never held in memory (docs/psl.md: memory at AudioSet scale).
 6. The dB floor (top_db 120) is taken per clip, not per batch as in torchaudio.
 7. Chunks of real clips: durations rounded to 0.1 s (as the official code; at least 0.1 s), and a
    remainder shorter than 0.5 s joins the chunk before it (a 160,001-sample clip is 10.0 s; a 4.3 s
    clip at 2 s is 2 + 2.3 s), so no chunk is almost pure padding.
 8. Validation every 10,000 batches (Sec. 3.2; --preset paper: 10000b) or once per epoch when an epoch
    is shorter, set per stage (--ma-eval-every, --eval-every; a plain number is epochs of the stage's
    training set, so a command works unchanged on another corpus); early-stop patience counts epochs
    (15, Sec. 3.3), not validations (15 validations of 10,000 batches = ~227 epochs of 10 s chunks on
    balanced AudioSet).
 9. Precision: with autocast (bf16 by default on CUDA) the backbone runs in reduced precision, the
    classifier and every saved or ranked score (eval, top-k averaging, soft labels) in fp32.

Clips shorter than SHORT_CLIP_S (1 s) are zero-padded and counted (`short` in the logs, `short_clips` in
results.json); unreadable clips are skipped and counted (`skipped`, `skipped_clips`). DDP (torchrun):
rank 0 alone writes, deletes and validates; the others wait at a barrier after each rank-0 write they
read next (MA final.pt, relabel cache, top-k files).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
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
# --preset (common.apply_preset: auto = paper on a CUDA GPU, cpu otherwise, whatever the corpus); the flags left
# unset take these values. Validation intervals: epochs of the stage's own training set (0.5 = twice per epoch,
# the same command on any corpus) or batches with a `b` suffix (the paper's 10,000, at least once per epoch).
PRESETS = {"paper": {"teacher_epochs": 30, "epochs": 300, "lr": 1e-4,  # Sec. 3.2, 3.3
                     "ma_eval_every": "10000b", "eval_every": "10000b"},  # deviation 8
           "cpu": {"teacher_epochs": 5, "epochs": 6, "lr": 1e-3,  # deviation 4
                   "ma_eval_every": 0.5, "eval_every": 0.5}}
OUTPUTS = ("student/*.pt", "student/*.tmp", "student/topk.json")  # what a run writes in its folder (+ results, log)


# =============================================================================================
# Arguments: every default is the paper's value (section in the help)
# =============================================================================================
TEACHER_DOC = """Stage 1 of psl.py alone: train the machine annotator (MA, MobileNetV2 on --ma-data with weak clip
labels, pseudo-balanced sampling, wave augmentation, mix-up, SpecAugment, polynomial lr decay; Sec. 3.3), evaluate it on
whole eval clips, and print its folder <--stages>/teacher-<hash>/ (hash of every MA setting and the corpus files).
A second call with the same MA settings reuses it; so does every run (`python psl.py ...`) that needs this MA, and
students of a direction run share it with --teacher FILE. The student flags are accepted so that one flag set
serves both commands; this stage does not read them.

    python psl.py teacher --teacher-epochs 20 --ma-eval-every 1        # prints runs/psl/teacher-<hash>
    T=$(ls -td runs/psl/teacher-*/ | head -1)                          # the newest MA folder
    python psl.py --teacher ${T}final.pt --segment 5                   # a student with that MA
"""
STUDENT_ONLY = ("--segment", "--labels", "--alpha", "--threshold", "--epochs", "--eval-every", "--eval-mode")


def build_parser(command: str = "run") -> argparse.ArgumentParser:
    """The parser of `python psl.py` (command "run") or of `python psl.py teacher` (its own description and
    usage; --table and --teacher do not exist there, the student-only flags are listed in their own group)."""
    teacher = command == "teacher"
    p = argparse.ArgumentParser(prog="psl.py teacher" if teacher else "psl.py", formatter_class=common.HelpFormatter,
                                description=TEACHER_DOC if teacher else __doc__,
                                epilog=None if teacher else "sub-commands (each with its own --help): "
                                "teacher (stage 1 alone), predict (tag audio files), plot (mAP against chunk length)")
    common.add_common_args(p, "psl")
    skipped = {"--table", "--teacher"} if teacher else set()
    student = []  # the teacher parser's student-only flags, listed last in their own group

    def group(title):  # add_argument of a group, routing the student-only flags of the teacher parser
        g = p.add_argument_group(title)

        def add(flag, **kw):
            if teacher and flag in STUDENT_ONLY:
                student.append((flag, kw))
            elif flag not in skipped:
                g.add_argument(flag, **kw)
        return add
    g = group("pseudo strong labels (Sec. 2, 3, 4.2)")
    g("--segment", type=common.POSITIVE, default=2.0, help="chunk length n in seconds: 2, 5 or 10 (Sec. 3)")
    g("--labels", type=str, default="psl", choices=["psl", "weak"],
      help="psl: MA soft labels per chunk; weak: clip labels propagated to chunks (Table 2 baseline)")
    g("--alpha", type=common.FRACTION, default=1.0,
      help="loss = alpha*BCE(soft) + (1-alpha)*BCE(weak); 1 = PSL, 0.5 = teacher-student (Sec. 4.2)")
    g("--table", type=int, default=None, choices=[2, 3],
      help="run the rows of Table 2 (weak, PSL-10/5/2s) or Table 3 (alpha 0 / 0.5) and write the table")
    g("--threshold", type=common.FRACTION, default=0.5, help="hard labels for the analysis (Sec. 4.3)")
    g("--stages", type=str, default=None,
      help="folder of the shared stages teacher-<hash>/, relabel-<hash>/ (default: the parent of --out)")
    g = group("machine annotator (Sec. 3.3)")
    g("--ma-data", type=str, default="full", choices=["balanced", "full", "300h"],
      help="MA training set (full AudioSet in the paper)")
    g("--teacher", type=str, default=None, help="use this MA checkpoint (a psl.py final.pt) instead of training one")
    g("--teacher-epochs", type=common.POSITIVE_INT, default=None,
      help="MA epochs with polynomial decay (preset paper: 30; cpu: 5)")
    g("--poly-power", type=common.NONNEG, default=1.0, help="polynomial lr decay power (not given; ours)")
    g("--mixup-alpha", type=common.POSITIVE, default=1.0, help="mix-up lambda ~ Beta(a, a) (Sec. 3.3, [17])")
    g("--gain-db", type=common.NONNEG, default=6.0, help="random gain in +-dB (not given; ours)")
    g("--max-shift-s", type=common.NONNEG, default=1.0, help="circular time shift up to +-s (not given; ours)")
    g("--freq-mask", type=common.NONNEG_INT, default=10, help="SpecAugment: max mel bins per mask (ours)")
    g("--time-mask", type=common.NONNEG_INT, default=50, help="SpecAugment: max frames per mask (ours)")
    g("--n-masks", type=common.NONNEG_INT, default=2, help="SpecAugment: masks per axis (ours)")
    g = group("training (Sec. 3.2, 3.3); unset = the preset's values")
    g("--preset", type=str, default="auto", choices=["auto", "paper", "cpu"],
      help="schedule of the flags left unset: paper (Sec. 3.2, 3.3) or cpu (deviation 4); "
           "auto = paper on a CUDA GPU, cpu otherwise, whatever the corpus")
    g("--batch-size", type=common.POSITIVE_INT, default=32, help="batch size (Sec. 3.2)")
    g("--lr", type=common.POSITIVE, default=None,
      help="Adam learning rate (preset paper: 1e-4, Sec. 3.2; cpu: 1e-3, the official code's)")
    g("--epochs", type=common.POSITIVE_INT, default=None, help="max student epochs (preset paper: 300; cpu: 6)")
    g("--eval-every", type=every, default=None,
      help="student: validate every X epochs of its chunks (0.5 = twice per epoch), or every N batches "
           "as Nb, at least once per epoch (preset paper: 10000b, Sec. 3.2; cpu: 0.5)")
    g("--ma-eval-every", type=every, default=None,
      help="machine annotator: validate every X epochs of its clips, or Nb batches (as --eval-every)")
    g("--patience", type=common.POSITIVE, default=15,
      help="early stop after N epochs without a validation gain (student, Sec. 3.3; MA alike)")
    g("--top-k", type=common.POSITIVE_INT, default=4, help="average the top-k checkpoints by validation mAP (Sec. 3.2)")
    g("--valid-on", type=str, default="valid", choices=["valid", "train"],
      help="validation split; official code: the training file (deviation 1)")
    g("--eval-mode", type=str, default="chunks", choices=["chunks", "clip"],
      help="chunks: average n-second chunk scores per clip (Sec. 3.3); clip: whole clips (official)")
    if teacher:
        g = p.add_argument_group("student stage (accepted, not read by `psl.py teacher`)")
        for flag, kw in student:
            g.add_argument(flag, **kw)
        p.set_defaults(table=None, teacher=None)
    return p


def parse_args(argv=None, command: str = "run") -> argparse.Namespace:
    return build_parser(command).parse_args(argv)


def every(text: str) -> float | str:
    """argparse type of --eval-every / --ma-eval-every: a positive number of epochs (a float, relative to the
    stage's training set) or a positive number of batches written `Nb` (kept as the string 'Nb')."""
    if text.strip().lower().endswith("b"):
        return f"{common.POSITIVE_INT(text.strip()[:-1])}b"
    return common.POSITIVE(text)


def run_name(a: argparse.Namespace) -> str:
    kind = "weak" if a.alpha == 0 else "psl" if a.alpha == 1 else f"ts{a.alpha:g}"
    corpus = "" if a.data_root is None else Path(a.data_root).name + "_"
    return f"{corpus}{kind}_{a.segment:g}s_{a.data}" + (f"_seed{a.seed}" if a.seed else "")


def resolve(a: argparse.Namespace, corpus: common.Corpus) -> argparse.Namespace:
    """Derived values, computed once after parsing: the preset fills the unset schedule flags (printed once,
    with the reason: the machine decides, not the corpus); a bad --teacher file is one line here, before any
    work."""
    a = copy.copy(a)
    if any(getattr(a, k) is None for k in PRESETS["cpu"]):  # not yet applied (run_table applies it once)
        common.apply_preset(a, PRESETS, "psl")
    if a.labels == "weak":
        a.alpha = 0.0
    a.out = a.out or str(Path("runs/psl") / (a.name or run_name(a)))
    a.stages = a.stages or str(Path(a.out).parent)
    a.clip_seconds = corpus.clip_seconds or 10.0  # nominal; real clips are measured (common.clip_durations)
    a.eval_segment = a.segment if a.eval_mode == "chunks" else None  # clips split into n-second chunks (Sec. 3.3)
    if a.teacher:  # a missing file or another script's checkpoint: one line, before any work
        read_checkpoint(a.teacher)
    a.teacher_sha1 = file_sha1(a.teacher) if a.teacher else None  # the MA's content is part of the identity
    return a


def file_sha1(path) -> str:
    """A file's content identity (a user's MA checkpoint, or the one a teacher stage wrote)."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def corpus_identity(root: Path, rows: list) -> dict:
    """What a shared stage read: the corpus folder, its manifests' size + mtime (edited or regenerated data is
    a new stage) and a hash of the training files' names in order (e.g. a 300h sample of another seed)."""
    files = [Path(root) / n for n in ("class_labels_indices.csv", "balanced_train.tsv", "unbalanced_train.tsv",
                                      "300h_train.tsv", "valid.tsv", "eval.tsv", "synth.json")]
    names = hashlib.sha1("\n".join(fn for fn, _ in rows).encode()).hexdigest()
    return {"root": str(Path(root).resolve()), "rows": names,
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()}}


MA_KEYS = ("ma_data", "seed", "teacher_epochs", "poly_power", "mixup_alpha", "gain_db", "max_shift_s", "freq_mask",
           "time_mask", "n_masks", "batch_size", "lr", "ma_eval_every", "patience", "top_k", "valid_on", "amp",
           "max_steps", "clip_seconds")


def teacher_settings(a: argparse.Namespace, corpus: common.Corpus) -> dict:
    """Every setting that changes the machine annotator (`corpus`: its --ma-data corpus): its stage folder is
    named by their hash, so runs with the same MA share it and a changed setting trains a new one."""
    return {k: getattr(a, k) for k in MA_KEYS} | {"corpus": corpus_identity(corpus.root, corpus.train)}


def seed_stage(seed: int, stage: str) -> None:
    """Every stage starts from RNG states of (seed, stage) alone: its result never depends on which stages
    ran before it in this process (a student equals the one trained against the same MA read from disk)."""
    common.seed_everything(int(np.random.SeedSequence([seed, *stage.encode()]).generate_state(1)[0]))


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
    """Rebuild a model from a self-describing checkpoint alone; another script's checkpoint, or one whose
    weights are not this model's (an edited or foreign file), is one line."""
    ours = isinstance(ckpt, dict) and {"model", "labels", "segment"} <= set(ckpt) and ckpt.get("script", "psl") == "psl"
    if not ours:
        other = (ckpt.get("script") or ("psla" if "config" in ckpt else None)) if isinstance(ckpt, dict) else None
        raise common.DataError(f"{path}: not a psl.py model checkpoint (a student's or MA's final.pt)"
                               + (f" but {other}.py's" if other else ""))
    labels = ckpt["labels"]
    if not (isinstance(labels, dict) and isinstance(labels.get("mids"), list) and labels["mids"]
            and isinstance(ckpt["model"], dict)):
        raise common.DataError(f"{path}: not a psl.py model checkpoint (no class list or weights)")
    model = MobileNetV2(len(labels["mids"]))
    common.load_weights(model, ckpt["model"], path)
    return model


def read_checkpoint(path) -> dict:
    """A psl.py final.pt; missing, unreadable or another script's: one line naming the file."""
    try:
        ckpt = common.load_checkpoint(path)
    except common.DataError:
        raise
    except Exception as e:  # torch.load of something else than a checkpoint (many exception types)
        raise common.DataError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    build_model(ckpt, path)
    return ckpt


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
    """(N_clips, K) uint8 multi-hot clip labels (full AudioSet: 1 GB, not 4 GB float32)."""
    return corpus.targets(rows, dtype=np.uint8)


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
    """Clip score = mean of its chunks' scores (Sec. 3.3), at every validation: one np.add.reduceat over the
    runs of equal clip index (chunks come in clip order). NaN rows (unreadable chunks) are ignored; a clip
    with no readable chunk gets a NaN row (common.readable_scores excludes and counts it)."""
    ok = ~np.isnan(chunk_scores).any(1)
    idx, rows = clip_index[ok], chunk_scores[ok].astype(np.float64)
    order = np.argsort(idx, kind="stable")  # a no-op for chunk datasets (sorted already)
    idx, rows = idx[order], rows[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]]) if len(idx) else np.zeros(0, np.int64)
    sums = np.zeros((n_clips, chunk_scores.shape[1]))
    sums[idx[starts]] = np.add.reduceat(rows, starts, axis=0) if len(idx) else 0.0
    counts = np.bincount(idx, minlength=n_clips)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


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
    """mAP / mAUC / d' of chunk-averaged clip scores (segment None: whole clips); a clip none of whose chunks
    could be read is excluded and counted (`skipped`), not scored as all-zero."""
    ds = chunk_dataset(corpus, rows, np.zeros((len(rows), 1), np.float32), segment, args.clip_seconds)
    scores = average_chunks(predict_chunks(model, ds, args, "eval"), ds.clip_index, len(rows))
    return common.readable_scores(y_true, scores) | {"short_clips": ds.short_clips}


def eval_interval(steps_per_epoch: int, every: float | str) -> int:
    """Batches between validations from --eval-every / --ma-eval-every: X epochs (a float: 0.5 = every half
    epoch, rounded down, at least 1 batch), or 'Nb' = every N batches but at least once per epoch, so that a
    small corpus still validates, early-stops and keeps top-k (the paper's 10000b: ~1/6 of a full-AudioSet
    epoch, Sec. 3.2; deviation 8)."""
    if isinstance(every, str):
        return max(1, min(int(every[:-1]), steps_per_epoch))
    return max(1, math.floor(every * steps_per_epoch + 1e-9))  # 1e-9: 0.29 * 100 is 29 batches, not 28


def bce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy(p.float().clamp(1e-7, 1 - 1e-7), y.float())


def spec_augment(args):
    """SpecAugment on log-mels (B, mel, T): --n-masks frequency and time masks (MA only, Sec. 3.3)."""
    return lambda x: common.mask_along(common.mask_along(x, args.freq_mask, 1, args.n_masks), args.time_mask, 2,
                                       args.n_masks)


def train_step(net: nn.Module, wave: torch.Tensor, y: torch.Tensor, opt, scaler, args, n_classes: int,
               alpha: float, dtype, mel_augment=None) -> torch.Tensor:
    """One update; y is [soft | weak] (B, 2K), loss = alpha*BCE(soft) + (1-alpha)*BCE(weak) (Sec. 4.2).
    With mel_augment (the MA, Sec. 3.3): wave gain / polarity / time shift, mix-up, then SpecAugment.
    Returns the loss on the device (no host sync)."""
    if mel_augment is not None:
        wave = common.wave_augment(wave, (-args.gain_db, args.gain_db), max_shift=int(args.max_shift_s * common.SR))
        wave, y = common.mixup(wave, y, args.mixup_alpha)
    with common.autocast(wave.device, dtype):
        p, _ = net(wave, mel_augment)
    K = n_classes
    loss = (alpha * bce(p, y[:, :K]) if alpha > 0 else 0) + ((1 - alpha) * bce(p, y[:, K:]) if alpha < 1 else 0)
    common.optimizer_step(loss, opt, scaler)
    return loss.detach()


def train(model: nn.Module, dataset, n_classes: int, sample, folder: Path, log_dir: Path, args, *, epochs: int,
          alpha: float, augment: bool, poly_decay: bool, validate, eval_every: float | str) -> dict:
    """One visible loop for MA and student. `sample(epoch)` gives one epoch's indices (the same on every
    rank; each rank trains on its common.shard). Validation every `eval_every` (epochs or 'Nb': eval_interval),
    early stop after args.patience epochs without a gain, top-k checkpoints weight-averaged into the
    returned model (Sec. 3.2). Resumes exactly from folder/last.pt (weights, optimizer, every RNG state; the
    data position is the step). The stage ends with one log line saying whether its validation mAP reached a
    plateau (common.plateau_report; also `convergence` in the returned info, hence in results.json)."""
    device = next(model.parameters()).device
    dtype = common.amp_dtype(device, args.amp)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = common.compiled(common.wrap_ddp(model), args.compile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = common.grad_scaler(device, dtype)
    first = sample(0)  # drawn once: the epoch length, then epoch 0 (full AudioSet's pseudo-balanced epoch: ~18 s)
    steps_per_epoch = math.ceil(len(common.shard(first)) / args.batch_size)
    total = epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, epochs * steps_per_epoch)
    eval_every = eval_interval(steps_per_epoch, eval_every)
    patience_steps = math.ceil(args.patience * steps_per_epoch)  # patience counts epochs (Sec. 3.3)
    mel_augment = spec_augment(args) if augment else None  # one callable per stage (torch.compile guards on it)
    folder.mkdir(parents=True, exist_ok=True)
    topk, logger = common.TopKCheckpoints(folder, args.top_k), common.RunLogger(log_dir)
    state = common.load_state(folder / "last.pt", model, opt, scaler) or \
        {"step": 0, "best": -1.0, "best_step": 0, "skipped": 0, "record": None, "history": []}
    state.setdefault("history", [])  # every validation's mAP, for the plateau report (a last.pt from before it)
    if state.get("record"):  # the line of this checkpoint, if a kill came between last.pt and the log
        logger.log_once(state["record"], ("stage", "step"))
        print(f"{folder.name}: resumed at step {state['step']}/{total}")
    bar = tqdm(total=total, initial=state["step"], desc=folder.name, disable=not common.is_main())
    loss, pending = common.Mean(device), 0  # pending: this rank's skipped items since the last validation
    stop = lambda: state["step"] >= total or state["step"] - state["best_step"] >= patience_steps
    while not stop():
        epoch, skip = divmod(state["step"], steps_per_epoch)
        indices = common.shard(first if epoch == 0 else sample(epoch))[skip * args.batch_size:]  # resume mid-epoch
        loader = common.make_loader(dataset, args.batch_size, sampler=indices, workers=args.workers,
                                    seed=args.seed * 100_003 + epoch)
        for j, batch in enumerate(loader):
            planned = len(indices[j * args.batch_size:(j + 1) * args.batch_size])
            pending += planned - (0 if batch is None else len(batch[2]))  # unreadable: skipped, counted
            lr = args.lr * (1 - state["step"] / total) ** args.poly_power if poly_decay else args.lr
            for group in opt.param_groups:
                group["lr"] = lr
            model.train()
            if batch is not None:  # None: every clip of the batch was unreadable (skipped, counted)
                wave, y, _ = common.to_device(batch, device)
                loss.add(train_step(net, wave, y, opt, scaler, args, n_classes, alpha, dtype, mel_augment))
            state["step"] += 1
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == total:
                metric = common.from_rank0(validate(model) if common.is_main() else None)  # rank 0 validates
                state["skipped"], pending = state["skipped"] + common.all_sum(pending), 0
                if metric > state["best"]:
                    state["best"], state["best_step"] = metric, state["step"]
                state["history"].append(metric)
                state["record"] = {"stage": folder.name, "step": state["step"],
                                   "epoch": round(state["step"] / steps_per_epoch, 2), "train/loss": loss.read(),
                                   "val/mAP": metric, "lr": lr, "skipped": state["skipped"],
                                   "short": dataset.short_clips}
                # top-k first, then last.pt, then the log line: a kill between them redoes this
                # validation (top-k replaces its entry of the same step) and never logs a line twice
                topk.update(metric, {"model": model.state_dict()}, state["step"])
                common.save_state(folder / "last.pt", model, opt, scaler, **state)
                common.barrier()
                logger.log(state["record"])
            if stop():
                break
    bar.close()
    conv = common.plateau_report(state["history"])  # did validation level off, or was the stage cut short?
    logger.log_once({"stage": folder.name, "step": state["step"], "end": True, **conv}, ("stage", "end"))
    if common.is_main():
        stage, n = folder.name.split("-")[0], conv["validations"]  # teacher (the MA) or student
        why = (f"only {n} validations, 4 needed" if n < 4 else f"the last quarter of {n} validations gained "
               f"{common.signed(conv['gain'])}, {'at most' if conv['plateau'] else 'more than'} {conv['tolerance']}, "
               f"over the best before it")
        print(f"{stage}: validation mAP {'reached a plateau' if conv['plateau'] else 'did NOT reach a plateau'} "
              f"({why})" + ("" if conv["plateau"] or stage == "student" else
                           "; a PSL student is capped by its MA: more --teacher-epochs?"), flush=True)
    common.barrier()  # every top-k file is written before any rank reads them
    model.load_state_dict(common.average_state_dicts(topk.paths))  # top-k weight averaging (Sec. 3.2)
    return {"best_val_mAP": state["best"], "steps": state["step"], "skipped_clips": state["skipped"],
            "averaged": [p.name for p in topk.paths], "convergence": conv}


def save_final(path: Path, model: nn.Module, corpus: common.Corpus, segment: float | None, args, info: dict) -> None:
    common.save_checkpoint(path, {"script": "psl", "model": model.state_dict(), "segment": segment, "args": vars(args),
                                  "info": info, "labels": {"mids": corpus.labels.mids, "names": corpus.labels.names}})


def bench_step(device, amp: str = "auto", batch_size: int = 8) -> dict:
    """For data/bench.py: `step` = the MA's real training step (train_step: wave augmentation, mix-up,
    log-mel front-end, SpecAugment, BCE, Adam) on a fixed batch of 10 s clips, 527 classes; `bare` = the
    same step without the augmentation (the front-end is the model's first layer)."""
    device = torch.device(device)
    args = parse_args(["--amp", amp, "--batch-size", str(batch_size)])
    dtype, K = common.amp_dtype(device, amp), 527
    model = MobileNetV2(K).to(device).train()
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt, scaler = torch.optim.Adam(model.parameters(), lr=1e-4), common.grad_scaler(device, dtype)
    g = torch.Generator().manual_seed(0)
    wave = (torch.randn(batch_size, 10 * common.SR, generator=g) * 0.1).to(device)
    y = torch.cat([torch.zeros(batch_size, K), (torch.rand(batch_size, K, generator=g) < 0.01).float()], 1).to(device)
    mel_augment = spec_augment(args)
    return {"step": lambda: train_step(model, wave, y, opt, scaler, args, K, 0.0, dtype, mel_augment),
            "bare": lambda: train_step(model, wave, y, opt, scaler, args, K, 0.0, dtype), "clips": batch_size}


# =============================================================================================
# Paper procedures: MA training, relabeling, analysis, student training
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
    """Stage 1 (Sec. 3.3): the MA on --ma-data with weak labels, pseudo-balanced sampling, wave augmentation,
    mix-up, SpecAugment and polynomial lr decay; whole clips. A shared stage: <stages>/teacher-<hash of
    every MA setting and the corpus files>, trained once (resumable), reused by every run that needs it.
    Returns its final.pt; the MA's own eval numbers are its results.json."""
    corpus = common.load_corpus(args.data_root, args.ma_data, args.synth_scale, args.synth_clip_seconds, args.seed)
    folder = common.stage_dir(args.stages, "teacher", teacher_settings(args, corpus))
    final = folder / "final.pt"
    with common.RunLock(folder, wait=True):  # a second run needing this MA waits, then reuses it
        if common.from_rank0((folder / "results.json").exists()):
            return final
        seed_stage(args.seed, "teacher")
        model = MobileNetV2(len(corpus.labels)).to(device)
        ds = chunk_dataset(corpus, corpus.train, np.zeros((len(corpus.train), 0), np.float32), None, args.clip_seconds)
        if final.exists():  # killed after final.pt, before its evaluation
            ck = common.load_checkpoint(final)
            model.load_state_dict(ck["model"])
            info = ck["info"]
        else:
            weak = weak_targets(corpus, corpus.train)  # (N_clips, K) uint8
            ds.targets = ChunkTargets(weak, ds.clip_index)  # [zeros | weak]: alpha 0 trains on the weak half
            sampler = common.PseudoBalancedSampler(weak, seed=args.seed)
            vrows = validation_split(corpus, args)
            vtrue = corpus.targets(vrows)
            print(f"machine annotator: MobileNetV2, {sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"{len(ds)} clips of {args.ma_data}")
            info = train(model, ds, len(corpus.labels), sampler.epoch_indices, folder, folder, args,
                         epochs=args.teacher_epochs, alpha=0.0, augment=True, poly_decay=True,
                         eval_every=args.ma_eval_every,
                         validate=lambda m: evaluate(m, corpus, vrows, vtrue, None, args)["mAP"])
            save_final(final, model, corpus, None, args, info)
        if common.is_main():  # the MA's own eval numbers on whole clips (paper, full AudioSet: 40.53 / 2.695)
            m = evaluate(model, corpus, corpus.eval, eval_targets(corpus), None, args)
            results = {k: m[k] for k in ("mAP", "mAUC", "dprime", "AP", "n")} | {
                "skipped_clips": m["skipped"], "short_clips": {"train": ds.short_clips, "eval": m["short_clips"]},
                "convergence": info["convergence"]}  # did the MA's validation mAP reach a plateau?
            common.report(folder, results, teacher_markdown(results, args, corpus))
        common.barrier()  # rank 0 wrote final.pt and results.json; the others read final.pt next (relabel)
    return final


def relabel_segments(teacher: Path, chunks: common.SegmentDataset, args, device) -> np.memmap:
    """Stage 2 (Sec. 2): the MA's soft labels y_PSL^n for every n-second chunk of the target set
    (N_chunks, K), never thresholded. A shared stage: <stages>/relabel-<hash of the teacher file's content,
    the corpus files and rows, data, segment, precision>/soft.npy, float16 (half the bytes; rounding at most
    2.4e-4), written batch by batch through a memory map and read back memory-mapped, so no process holds
    the whole array. Under DDP each rank labels its share of the rows."""
    settings = {"teacher": file_sha1(teacher), "corpus": corpus_identity(chunks.root, chunks.rows), "data": args.data,
                "segment": args.segment, "clip_seconds": args.clip_seconds, "amp": args.amp, "dtype": "float16"}
    folder = common.stage_dir(args.stages, "relabel", settings)
    cache = folder / "soft.npy"
    with common.RunLock(folder, wait=True):
        if not common.from_rank0(cache.exists()):  # rank 0 decides: every rank takes the same path (barriers)
            model = build_model(common.load_checkpoint(teacher), teacher).to(device)
            shape = (len(chunks), model.classifier[-1].out_features)
            tmp = cache.with_suffix(".tmp.npy")
            if common.is_main():
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape).flush()  # sparse file
            common.barrier()  # rank 0 created the file before any rank opens it
            soft = np.load(tmp, mmap_mode="r+")
            share = np.array_split(np.arange(len(chunks)), common.world_size())[common.rank()]  # contiguous rows
            predict_chunks(model, chunks, args, f"relabel {args.segment:g}s", out=soft, indices=share)
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


def train_student(corpus: common.Corpus, chunks: common.SegmentDataset, weak: np.ndarray, soft: np.memmap | None,
                  out: Path, args, device) -> tuple[nn.Module, dict]:
    """Stage 4 (Sec. 3.3): a fresh MobileNetV2 on the target set's chunks, random sampling, no augmentation;
    each chunk's target row [soft | weak] is built when it is loaded (ChunkTargets: soft from the float16
    memory map, none for alpha 0; weak = its clip's labels, Sec. 2). Chunks the MA could not read are left
    out. Returns the top-k averaged model and its info (reloaded from out/student/final.pt when done)."""
    final = out / "student" / "final.pt"
    seed_stage(args.seed, "student")
    model = MobileNetV2(len(corpus.labels)).to(device)
    if final.exists():
        ck = common.load_checkpoint(final)
        model.load_state_dict(ck["model"])
        return model, ck["info"]
    chunks.targets = ChunkTargets(weak, chunks.clip_index, None if soft is None else Path(soft.filename))
    ok = np.ones(len(chunks), bool) if soft is None else readable(soft)
    usable = np.flatnonzero(ok)
    vrows = validation_split(corpus, args)
    vtrue = corpus.targets(vrows)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"student: MobileNetV2, {n_params:,} parameters, alpha {args.alpha:g}, {len(usable)} of {len(chunks)} "
          f"chunks of {args.segment:g} s (skipped={len(np.unique(chunks.clip_index[~ok]))} clips the MA could not "
          f"read; short={chunks.short_clips} clips under {SHORT_CLIP_S:g} s, padded)")
    sample = lambda epoch: np.random.default_rng([args.seed, epoch]).permutation(usable)  # random order (Sec. 3.3)
    info = train(model, chunks, len(corpus.labels), sample, out / "student", out, args, epochs=args.epochs,
                 alpha=args.alpha, augment=False, poly_decay=False, eval_every=args.eval_every,
                 validate=lambda m: evaluate(m, corpus, vrows, vtrue, args.eval_segment, args)["mAP"])
    info |= {"params": n_params, "relabel_skipped_clips": len(np.unique(chunks.clip_index[~ok])),
             "short_clips": chunks.short_clips}
    save_final(final, model, corpus, args.segment, args, info)
    return model, info


# =============================================================================================
# Results: results.json and the paper-style tables
# =============================================================================================
def teacher_markdown(m: dict, args, corpus: common.Corpus) -> str:
    table = common.markdown_table(["model", "mAP %", "mAUC", "d'", "eval clips (skipped)",
                                   common.paper_heading(corpus, "paper mAP %"), "paper d'"],
                                  [[f"MA ({args.ma_data})", f"{100 * m['mAP']:.2f}", f"{m['mAUC']:.4f}",
                                    f"{m['dprime']:.3f}", f"{m['n']} ({m['skipped_clips']})", "40.53", "2.695"]])
    return table + "\n\n" + plateau_markdown({"machine annotator": m["convergence"]})


def convergence(ckpt: Path) -> dict | None:
    """A psl.py checkpoint's plateau report (its stage's `convergence`; None for a file from before it)."""
    return common.load_checkpoint(ckpt).get("info", {}).get("convergence")


def student_results(args, corpus: common.Corpus, m: dict, info: dict, analysis: dict | None) -> dict:
    kind = "weak" if args.alpha == 0 else "psl" if args.alpha == 1 else "ts"
    return {"method": kind, "segment": args.segment, "alpha": args.alpha, "data": args.data,
            "mAP": m["mAP"], "mAUC": m["mAUC"], "dprime": m["dprime"], "AP": m["AP"], "n": m["n"], "student": info,
            "params": info["params"], "analysis": analysis,
            "corpus": "synthetic" if corpus.synthetic else str(corpus.root),
            "skipped_clips": {"relabel_clips": info["relabel_skipped_clips"], "student_train": info["skipped_clips"],
                              "eval": m["skipped"]},
            "short_clips": {"train": info["short_clips"], "eval": m["short_clips"]}}  # < SHORT_CLIP_S, padded


def psl_markdown(r: dict, corpus: common.Corpus) -> str:
    paper = PAPER.get((r["method"], int(r["segment"]))) if r["data"] == "balanced" else None
    title = f"## PSL: {r['method']} labels, {r['segment']:g} s chunks, alpha {r['alpha']:g}, trained on {r['data']}"
    table = common.markdown_table(["method", "mAP %", "mAUC", "d'", "eval clips (skipped)",
                                   common.paper_heading(corpus, "paper mAP %"), "paper d'"],
                                  [[f"{r['method']}-{r['segment']:g}s", f"{100 * r['mAP']:.2f}", f"{r['mAUC']:.4f}",
                                    f"{r['dprime']:.3f}", f"{r['n']} ({r['skipped_clips']['eval']})",
                                    *(map(str, paper) if paper else ("-", "-"))]])
    conv = r.get("convergence") or {}
    return "\n\n".join([title, table] + ([analysis_markdown(r["analysis"], r["segment"])] if r["analysis"] else [])
                       + [plateau_markdown({"machine annotator": conv.get("machine_annotator"),
                                            "student": conv.get("student")})])


def plateau_markdown(stages: dict) -> str:
    """One line: did each stage's validation mAP reach a plateau (common.plateau_report)?"""
    say = lambda c: "-" if c is None else (
        f"{'yes' if c['plateau'] else 'NO'} (best {c['best']:.4f}, last {c['last']:.4f}, {c['validations']} "
        f"validations, last-quarter gain {common.signed(c.get('gain'))})" if c["validations"] else "NO (no validation)")
    return "Validation mAP reached a plateau (last quarter within 0.005 of the best before it): " + \
        "; ".join(f"{k}: {say(c)}" for k, c in stages.items())


# =============================================================================================
# main: teacher -> relabel -> analysis -> student -> eval (run), the table drivers, predict
# =============================================================================================
def run(args: argparse.Namespace) -> dict:
    """One row: the paper's stages in order, each resumable; a finished run (results.json with this
    identity) is returned as it is."""
    device, _ = common.setup_device(args)
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    args = resolve(args, corpus)
    out = Path(args.out)
    identity = common.identity(args, ignore=("stages",)) | {"data_root": str(corpus.root.resolve())}
    with common.claim_run(out, "psl", identity, args.resume, OUTPUTS):
        if common.from_rank0((out / "results.json").exists()):
            print(f"{out}: done (results.json exists)")
            return common.read_json(out / "results.json")
        chunks = chunk_dataset(corpus, corpus.train, np.zeros((len(corpus.train), 0), np.float32), args.segment,
                               args.clip_seconds)  # the target set's n-second chunks (Sec. 2)
        weak = weak_targets(corpus, corpus.train)  # (N_clips, K) uint8 clip labels
        teacher = None if args.alpha == 0 else Path(args.teacher) if args.teacher else train_teacher(args, device)
        soft = relabel_segments(teacher, chunks, args, device) if teacher else None
        analysis = (analyse_labels(corpus, corpus.train, soft, chunks, args.threshold, weak)  # rank 0 alone
                    if soft is not None and common.is_main() else None)
        student, info = train_student(corpus, chunks, weak, soft, out, args, device)
        m = evaluate(student, corpus, corpus.eval, eval_targets(corpus), args.eval_segment, args)
        results = student_results(args, corpus, m, info, analysis)
        results["convergence"] = {"machine_annotator": teacher and convergence(teacher), "student": info["convergence"]}
        return common.report(out, results, psl_markdown(results, corpus))


def run_table(args: argparse.Namespace) -> dict:
    """Rows of Table 2 or 3 as sibling runs (each resumable, sharing the MA and the relabel caches)."""
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    out = Path(args.out or f"runs/psl/table{args.table}")
    args = common.apply_preset(copy.copy(args), PRESETS, "psl")  # once for every row (printed once)
    base = copy.copy(args)
    base.table, base.out, base.name = None, None, None
    rows = []
    with common.claim_run(out, "psl", common.identity(args) | {"table": args.table}, args.resume):
        for kind, seg in TABLES[args.table]:
            a = copy.copy(base)
            a.labels, a.segment = "weak" if kind == "weak" else "psl", float(seg)
            a.alpha = {"weak": 0.0, "psl": 1.0, "ts": 0.5}[kind]
            a.out = str(out / run_name(a)) if args.out else None  # default: runs/psl/<row>, shared with single runs
            r = run(a)
            paper = PAPER[(kind, seg)]
            rows.append([{"weak": "weak", "psl": "PSL", "ts": "teacher-student"}[kind] + f"-{seg}s", f"{a.alpha:g}",
                         f"{100 * r['mAP']:.2f}", f"{r['dprime']:.3f}", f"{r['mAUC']:.4f}", *map(str, paper)])
        md = "\n".join([f"## PSL Table {args.table} on {'the synthetic corpus' if corpus.synthetic else corpus.root}, "
                        f"trained on {args.data}", "",
                        common.markdown_table(["method", "alpha", "mAP %", "d'", "mAUC",
                                               common.paper_heading(corpus, "paper mAP %"), "paper d'"], rows)])
        return common.report(out, {"table": args.table, "rows": rows}, md)


def run_teacher(args: argparse.Namespace) -> Path:
    """`python psl.py teacher [flags]`: stage 1 alone (train the MA, or reuse it when done) and print its
    folder, for student runs to share with --teacher (e.g. every seed of a direction run)."""
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    final = train_teacher(resolve(args, corpus), common.setup_device(args)[0])
    if common.is_main():
        print(f"machine annotator: {final.parent} (students: --teacher {final}; peak memory "
              f"{common.peak_memory_gb():.1f} GB)", flush=True)
    return final


PREDICT_DOC = """Tag audio files with a psl.py checkpoint (a student's or the MA's final.pt): the top classes of each
file (mean of its chunk scores, as the evaluation) and a timeline of the top 3 classes per chunk. Any format and
sample rate soundfile reads (resampled to 16 kHz, mixed to mono). A checkpoint trained on the synthetic corpus
knows only its 30 toy classes: the prediction then starts with a warning line.

    python psl.py predict --ckpt runs/psl/psl_2s_balanced/student/final.pt clip.wav other.flac
"""


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psl.py predict", description=PREDICT_DOC, formatter_class=common.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="final.pt of a student (run/student/final.pt) or of an MA "
                                                 "(teacher-<hash>/final.pt)")
    p.add_argument("--segment", type=common.POSITIVE, default=None,
                   help="timeline resolution in seconds (default: the model's chunk length; 2 for an MA)")
    p.add_argument("--top", type=common.POSITIVE_INT, default=5, help="classes shown per file (3 per chunk)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast precision; auto = bf16 on CUDA, none elsewhere")
    p.add_argument("files", nargs="+", help="audio files to tag (wav, flac, ...)")
    return p


def predict(argv: list[str]) -> None:
    """Tag audio files with a checkpoint: top classes per clip and a per-segment timeline."""
    a = predict_parser().parse_args(argv)
    ckpt = read_checkpoint(a.ckpt)
    device = common.pick_device(a.device)
    model = build_model(ckpt, a.ckpt).to(device).eval()
    names = ckpt["labels"]["names"]
    warning = common.synthetic_classes_warning(ckpt["labels"]["mids"])
    if warning:
        print(warning, flush=True)
    segment = a.segment or ckpt["segment"] or 2.0
    for path in a.files:
        wave = torch.from_numpy(common.load_audio(path))
        bounds = common.segment_bounds(max(0.1, round(len(wave) / common.SR, 1)), segment, MIN_CHUNK_S)
        chunks = [F.pad(c, (0, max(0, round((e - s) * common.SR) - len(c))))  # a 1-sample file: 0.1 s
                  for s, e in bounds for c in [wave[round(s * common.SR): round(e * common.SR)]]]
        batch = common.pad_collate([(c, torch.zeros(1), i) for i, c in enumerate(chunks)])[0]
        with torch.no_grad(), common.autocast(device, common.amp_dtype(device, a.amp)):
            probs = model(batch.to(device))[0].float().cpu().numpy()  # (n_chunks, K)
        clip = probs.mean(0)
        print(f"{path}: " + ", ".join(f"{names[k]} {clip[k]:.2f}" for k in np.argsort(-clip)[:a.top]))
        for (s, e), pr in zip(bounds, probs):
            print(f"  {s:6.1f}-{e:6.1f} s  " + ", ".join(f"{names[k]} {pr[k]:.2f}" for k in np.argsort(-pr)[:3]))


# =============================================================================================
# plot: mAP against chunk length (Table 2 / 3), ours beside the paper's
# =============================================================================================
PLOT_DOC = """Draw eval mAP (%) against chunk length (2 / 5 / 10 s) for each labelling (weak, PSL, alpha 0.5), ours
(solid, filled markers) beside the paper's Tables 2 and 3 (dashed, hollow markers; AudioSet, balanced subset).
Each RUN is a folder with a results.json:
  - a run of psl.py (one point: its method at its chunk length),
  - a `python psl.py --table 2` (or 3) folder (one point per row),
  - a folder written by `python common.py seeds --row weak-2s RUN... --row PSL-2s RUN... --out D` (rows named
    <weak|PSL|alpha 0.5|ts>-<n>s, anything after the length becomes part of the series name; each point is the
    mean over seeds with a +- sample std error bar), or
  - a machine annotator's teacher-<hash> folder (a horizontal line, beside the paper's MA: 40.53).
Only numbers read from these files are drawn; the paper's come from Tables 2 and 3.

    python psl.py plot runs/psl/psl_2s_balanced runs/psl/teacher-*/ --out docs/figures/psl.png
"""
METHOD_NAMES = {"weak": "weak", "psl": "PSL", "ts": "alpha 0.5"}
METHOD_COLORS = {"weak": "tab:blue", "psl": "tab:red", "ts": "tab:green"}
ROW_NAME = r"^\s*(?P<m>weak|psl|alpha\s*0?\.5|ts\s*0?\.5|teacher-student)[-_ ]*(?P<s>\d+(?:\.\d+)?)\s*s(?P<rest>.*)$"


def parse_row_name(name: str) -> tuple[str, float, str] | None:
    """'PSL-2s' -> ('psl', 2.0, ''), 'alpha 0.5-5s' -> ('ts', 5.0, ''), 'weak-2s 30ep' -> ('weak', 2.0, '30ep')."""
    import re
    m = re.match(ROW_NAME, name, re.IGNORECASE)
    if not m:
        return None
    kind = m["m"].lower()
    kind = "weak" if kind == "weak" else "psl" if kind == "psl" else "ts"
    return kind, float(m["s"]), m["rest"].strip(" -_()")


def plot_points(runs: list[str]) -> tuple[dict, list]:
    """Series {(source, method, extra): [(segment, [mAP values]), ...]} and MA lines [(label, mAP)] read from
    the results.json of every RUN (source: the folder of a seeds or --table run; "" for single runs, which
    join one series per method); anything else is one line naming the folder."""
    series, ma = {}, []
    for run in runs:
        r = common.read_json(Path(run) / "results.json", "results.json (not a finished run?)")
        src = Path(run).resolve().name
        add = lambda src_, kind, seg, extra, values: series.setdefault((src_, kind, extra), []).append((seg, values))
        if "table" in r and "rows" in r:  # a --table run: [name, alpha, mAP %, d', mAUC, paper mAP %, paper d']
            for row in r["rows"]:
                parsed = parse_row_name(row[0])
                if parsed:
                    add(src, parsed[0], parsed[1], parsed[2], [float(row[2]) / 100])
        elif "method" in r and "segment" in r and "mAP" in r:  # one run
            add("", r["method"], float(r["segment"]), "", [float(r["mAP"])])
        elif "mAP" in r and "convergence" in r:  # a machine annotator's stage folder
            ma.append((f"MA (ours, {src})", float(r["mAP"])))
        elif r and all(isinstance(v, dict) and "runs" in v for v in r.values()):  # common.py seeds
            for name, row in r.items():
                parsed = parse_row_name(name)
                if parsed is None:
                    raise common.DataError(f"{run}: seeds row {name!r} is not named <weak|PSL|alpha 0.5>-<n>s "
                                           "(e.g. weak-2s, PSL-5s)")
                if "mAP" not in row:
                    raise common.DataError(f"{run}: seeds row {name!r} has no mAP (common.py seeds --key mAP)")
                add(src, *parsed, [float(v) for v in row["mAP"]])
        else:
            raise common.DataError(f"{run}: results.json of neither a psl.py run, a --table run, a teacher stage "
                                   "nor a `common.py seeds` table")
    if not series and not ma:
        raise common.DataError("plot: nothing to draw in " + ", ".join(runs))
    return series, ma


def draw_chunk_lengths(series: dict, ma: list):
    """draw(ax) for common.figure: one line per series (ours: mean +- sample std over seeds), the paper's
    Table 2 / 3 lines for weak and PSL (and alpha 0.5 when ours has it), MA levels as horizontal lines."""
    def draw(ax):
        kinds = {"weak", "psl"} | {k for _, k, _ in series}
        for kind in ("weak", "psl", "ts"):
            if kind not in kinds:
                continue
            pts = sorted((seg, v) for (k, seg), v in PAPER.items() if k == kind)
            table = "Table 2" if kind == "psl" else "Table 3" if kind == "ts" else "Tables 2, 3"
            ax.plot([p[0] for p in pts], [p[1][0] for p in pts], "--", marker="o", mfc="none",
                    color=METHOD_COLORS[kind], alpha=0.6, label=f"paper {METHOD_NAMES[kind]} ({table}, AudioSet)",
                    gid=f"paper:{kind}")
        sources = sorted({src for src, _, _ in series})
        for (src, kind, extra), pts in sorted(series.items()):
            pts = sorted(pts, key=lambda p: p[0])
            x = [seg for seg, _ in pts]
            y = [100 * float(np.mean(v)) for _, v in pts]
            err = [100 * float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for _, v in pts]
            n = sorted({len(v) for _, v in pts})
            where = f", {src or 'single runs'}" if len(sources) > 1 else ""
            label = f"{METHOD_NAMES.get(kind, kind)}{' ' + extra if extra else ''} (ours{where}" + \
                (f", {'/'.join(map(str, n))} seeds, mean +- std)" if n != [1] else ")")
            ax.errorbar(x, y, yerr=err if any(err) else None, fmt="-", marker="osD^v"[sources.index(src) % 5],
                        capsize=4, label=label, color=METHOD_COLORS.get(kind), gid=f"ours:{src}:{kind}:{extra}")
        for i, (label, value) in enumerate(ma):
            ax.axhline(100 * value, color="black", ls="-", lw=1, alpha=0.7, label=label, gid=f"ours:ma:{i}")
        if ma:
            ax.axhline(40.53, color="black", ls="--", lw=1, alpha=0.5, label="paper MA (full AudioSet)",
                       gid="paper:ma")
        ax.set_xscale("log")
        ax.set_xticks([2, 5, 10])
        ax.set_xticklabels(["2", "5", "10"])
        ax.minorticks_off()
        ax.set_xlabel("chunk length n (s)")
        ax.set_ylabel("eval mAP (%)")
        ax.set_title("PSL: mAP against chunk length (ours: our corpus; paper: AudioSet)", fontsize=10)
        ax.set_xlim(1.7, 12)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return draw


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="psl.py plot", description=PLOT_DOC, formatter_class=common.HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="folders with a results.json (see above)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/chunk_length.png of the first RUN)")
    return p


def plot(argv: list[str]) -> Path:
    """`python psl.py plot RUN... [--out PNG]`: the chunk-length figure from the runs' results.json."""
    a = plot_parser().parse_args(argv)
    series, ma = plot_points(a.runs)
    return common.figure(a.out or Path(a.runs[0]) / "chunk_length.png", draw_chunk_lengths(series, ma), size=(9.5, 4.6))


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return predict(argv[1:])
    if argv[:1] == ["plot"]:
        return plot(argv[1:])
    if argv[:1] == ["seeds"]:
        raise common.DataError("psl.py seeds is now: python common.py seeds --row NAME RUN... --row ... --key mAP")
    teacher_only = argv[:1] == ["teacher"]
    args = parse_args(argv[1:], "teacher") if teacher_only else parse_args(argv)
    with common.distributed():
        return run_teacher(args) if teacher_only else run_table(args) if args.table else run(args)


if __name__ == "__main__":
    common.cli(main)
