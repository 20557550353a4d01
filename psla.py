"""PSLA: Improving Audio Event Classification with Pretraining, Sampling, Labeling, and Aggregation.
Yuan Gong, Yu-An Chung, James Glass (MIT), IEEE/ACM TASLP 2021.

What is reproduced: an EfficientNet (B0-B7, default B2) on 128-bin Kaldi fbanks with frequency mean
pooling and 4-head attention pooling (Sec. II-C), trained with every PSLA technique switchable so
the paper's ablation tables can be re-run row by row: ImageNet initialisation (III), balanced
sampling (IV-A, Algorithm 1), time/frequency masking (IV-B), mix-up (IV-C), ontology-based label
enhancement with a teacher (V, Algorithm 2), weight averaging (VI-A) and ensembles (VI-B).

Paper, balanced AudioSet -> eval mAP (Tables III, IV, VIII, IX, X):
    scratch 0.1570  + ImageNet 0.2385  + masking 0.2818  + mix-up 0.3108  + label enhancement 0.3162
    + weight averaging 0.3192 (single model)  ensemble of 3 seeds 0.3446  all 20 models 0.3620
Full AudioSet: 0.3723 scratch ... 0.4435 single model with WA, 0.4744 ensemble of 10 models.

    python psla.py                          # synthetic corpus, B2, masking + mix-up + WA: runs/psla/b2_balanced
    python psla.py predict --ckpt runs/psla/b2_balanced data/synth/audio/eval/eval_00000.wav   # tag audio files
    python psla.py plot runs/psla/b2_balanced --out runs/psla/b2_balanced.png          # the ablation figure
    python psla.py --effnet 0 --no-mixup --name mask        # one ablation row (docs/psla.md has them all)
    python psla.py --label-enhance type12 --name le         # Sec. V, Table VIII: teacher (a shared stage), student
    python psla.py --label-enhance type12 --teacher runs/psla/b2_balanced --name le_b2   # ... a finished run as teacher
    python psla.py --seed 1 --name b2_balanced_s1           # the default recipe with seed 1 ...
    python psla.py --seed 2 --name b2_balanced_s2           # ... and seed 2
    python psla.py ensemble runs/psla/b2_balanced runs/psla/b2_balanced_s1 runs/psla/b2_balanced_s2   # Table X, 3 seeds
    python psla.py ensemble runs/psla/b2_balanced --which epochs --out runs/psla/checkpoints   # Table X, checkpoints
    python common.py seeds --row default runs/psla/b2_balanced runs/psla/b2_balanced_s1 runs/psla/b2_balanced_s2 --key last_n.mAP --key wa.mAP --out runs/psla/seeds
    python psla.py plot runs/psla/seeds runs/psla/ensemble_last --out runs/psla/seeds.png   # mean +- std, ensemble
    python psla.py --data-root data/audioset --data full --imagenet url         # the paper's recipe
    torchrun --nproc_per_node=4 psla.py --data-root data/audioset --data full --imagenet url   # on 4 GPUs (DDP)
Sub-commands (each has its own --help): predict (tag audio files with a run's final model), plot (the
ablation figure from results.json), ensemble (Table X committees of finished runs).
Stages (main): [teacher -> label enhancement] -> train -> weight averaging -> ensembles. To resume a
run, run the same command again (--no-resume starts it afresh): last.pt, written every epoch and every
--save-every steps, holds the data position and every RNG state, so a run killed anywhere ends with the
results of an uninterrupted one. A finished run with the same settings is returned as it is.
The default command is a pipeline check (108 steps of a B2 from scratch), not a converged model; the
direction run in docs/psla.md (a 3 s-clip B0 preset, 48 epochs, four ablation rows x 3 seeds) tests them.

Deviations from the paper and the official code (numbered as in docs/psla.md):
 1. The synthetic default trains from scratch (no ImageNet weights exist offline); the paper's
    path is `--imagenet PATH|url` (torchvision's published EfficientNet weights, not the
    efficientnet_pytorch files the authors used; same architecture and parameter count).
 2. Without a CUDA GPU (--preset cpu) the schedule is scaled to a CPU budget, keeping its shape: 6 epochs,
    batch 16, LR halved every epoch after epoch 3, WA over epochs 5-6 (LR at 1/4), 9 warm-up steps,
    "single model" = mean of the last 2 epochs.
    The paper's values (60/30 epochs, batch 100, halving every 5 after 35/10, 1,000 warm-up
    steps) come with --preset paper (the default on a GPU) or as single flags.
 3. Frequency pooling is a mean over the whole frequency axis (the official AvgPool(4, 1) only
    works for 128 bins); warm-up is a smooth linear ramp (the official one trains at LR 0 for 50
    steps and rises in steps of 50); weight averaging counts every epoch once (the official code
    counts the first twice); model selection uses the valid split, never the eval set.
 4. The EfficientNet follows torchvision's module layout and BatchNorm settings (eps 1e-5,
    momentum 0.1 for B0-B4) so torchvision's ImageNet files load; the official package uses TF
    "same" padding and BN eps 1e-3, momentum 0.01. Convolutions run channels-last (faster on CPU).
 5. Padding and SpecAugment masks fill with the dataset mean (0 after normalisation), in the fbank
    domain: clips are read at their own length, and every frame past a clip's last whole frame
    (batch padding, padding to 1,056) is set to 0; the official code fills with 0 before
    normalisation (= +1.02 after it). Mix-up cuts or pads the partner to the first clip's length.
 6. Fbank mean/std: AudioSet's (-4.6476 / 4.5699) for 527-class corpora, otherwise computed over
    the real frames of the training clips and stored in the run (and in every checkpoint).
 7. Mix-up partners are drawn uniformly from the training set in the loader (Algorithm 1).
 8. Type II label enhancement adds ancestors reached without crossing an abstract ontology node
    (the official code; the paper says "ancestors"): on the real ontology "Music" is a candidate
    parent of 81 classes, not 149.
 9. Precision: with autocast (bf16 by default on CUDA) the backbone runs in reduced precision, the
    attention pooling and every saved or ranked score in fp32; fp16 uses loss scaling.
10. The label-enhancement teacher is, by default, this run's recipe (same --data and seed) with the
    original labels, trained once as a shared stage beside the run; the paper trains it on the full
    set: pass `--teacher RUN` (a finished run, e.g. with `--data full`).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

AUDIOSET_NORM = (-4.6476, 4.5699)  # fbank mean / std of AudioSet (official egs/audioset/run.sh)
FRAME_LENGTH, FRAME_SHIFT = 400, 160  # fbank frames in samples at 16 kHz (25 ms / 10 ms, Sec. II-C)
# Sec. II-B schedules per training set; 300h (PSL's subset) follows the full-set recipe.
PAPER_SCHEDULE = {
    "balanced": dict(epochs=60, batch_size=100, lr=1e-3, lr_decay_start=35, lr_decay_every=5, warmup_steps=1000,
                     last_n=5),
    "full": dict(epochs=30, batch_size=100, lr=1e-4, lr_decay_start=10, lr_decay_every=5, warmup_steps=1000, last_n=5),
}
PAPER_SCHEDULE["300h"] = PAPER_SCHEDULE["full"]
# Deviation 2: the balanced schedule compressed 10x in epochs for ~300 synthetic clips on a CPU
# (decay after 58% of the epochs, WA over the last third, warm-up over 8% of the steps).
SYNTH_SCHEDULE = dict(epochs=6, batch_size=16, lr=1e-3, lr_decay_start=3, lr_decay_every=1, warmup_steps=9,
                      last_n=2)
# Paper eval mAP (Tables II-IV, VIII-X), keyed by the techniques in use:
# (ImageNet, balanced sampling, masking, mix-up, labels) -> (row name, balanced set, full set).
PAPER_ROWS = {
    (False, None, False, False, "none"): ("baseline from scratch (Table II)", 0.1570, 0.3723),
    (True, None, False, False, "none"): ("+ ImageNet pretraining (Table III)", 0.2385, 0.3939),
    (True, True, False, False, "none"): ("+ balanced sampling (Table IV)", None, 0.3721),
    (True, None, True, False, "none"): ("+ time-frequency masking (Table IV)", 0.2818, 0.4265),
    (True, None, True, True, "none"): ("+ mix-up (Table IV)", 0.3108, 0.4397),
    (True, None, True, True, "type1"): ("+ label enhancement Type I (Table VIII)", 0.3166, 0.4400),
    (True, None, True, True, "type2"): ("+ label enhancement Type II (Table VIII)", 0.3156, 0.4387),
    (True, None, True, True, "type12"): ("+ label enhancement Type I+II (Table VIII)", 0.3162, 0.4390),
}
PAPER_WA = {"balanced": 0.3192, "full": 0.4435}  # Table IX (with all techniques)
PAPER_CHECKPOINT_ENSEMBLE = {"balanced": (60, 0.3280), "full": (30, 0.4518)}  # Table X, upper part
PAPER_SEED_ENSEMBLE = {"balanced": 0.3446, "full": 0.4641}  # Table X, middle part: 3 runs, same setting
TORCHVISION_URLS = {  # torchvision's IMAGENET1K_V1 EfficientNet weights
    0: "https://download.pytorch.org/models/efficientnet_b0_rwightman-3dd342df.pth",
    1: "https://download.pytorch.org/models/efficientnet_b1_rwightman-533bc792.pth",
    2: "https://download.pytorch.org/models/efficientnet_b2_rwightman-bcdf34b7.pth",
    3: "https://download.pytorch.org/models/efficientnet_b3_rwightman-cf984f9c.pth",
    4: "https://download.pytorch.org/models/efficientnet_b4_rwightman-7eb33cd5.pth",
    5: "https://download.pytorch.org/models/efficientnet_b5_lukemelas-b6417697.pth",
    6: "https://download.pytorch.org/models/efficientnet_b6_lukemelas-c76e70fd.pth",
    7: "https://download.pytorch.org/models/efficientnet_b7_lukemelas-dcc49843.pth",
}

# What a run writes in its folder (--no-resume removes these, and nothing else)
OUTPUTS = ("last.pt", "best.pt", "wa.pt", "weights/e*.pt", "preds/*.npy", "train_*.tsv", "label_enhancement.json",
           "*.tmp", "weights/*.tmp", "preds/*.tmp")


def train_parser() -> argparse.ArgumentParser:
    """The training command's parser (`python psla.py [flags]`)."""
    p = argparse.ArgumentParser(prog="psla.py", description=__doc__, formatter_class=common.HelpFormatter)
    common.add_common_args(p, "psla")
    g = p.add_argument_group("model (Sec. II-C)")
    g.add_argument("--effnet", type=int, default=2, choices=range(8), help="EfficientNet-B<n> backbone (paper: B2)")
    g.add_argument("--heads", type=common.POSITIVE_INT, default=4, help="attention pooling heads (paper: 4)")
    g.add_argument("--drop-connect", type=common.number(float, 0, 1, hi_open=True), default=0.2,
                   help="stochastic depth rate of the MBConv blocks")
    g.add_argument("--imagenet", type=str, default=None,
                   help="Sec. III: torchvision EfficientNet ImageNet state dict (a path, or 'url' to download); "
                        "every layer but the 1-channel stem and the head is loaded. Default: from scratch")
    g = p.add_argument_group("front-end (Sec. II-C)")
    g.add_argument("--n-mels", type=common.POSITIVE_INT, default=128,
                   help="fbank bins (25 ms Hanning window, 10 ms hop)")
    g.add_argument("--target-length", type=common.POSITIVE_INT, default=1056, help="frames per clip (pad / cut)")
    g.add_argument("--short-clip-seconds", type=common.NONNEG, default=1.0,
                   help="clips shorter than this are counted (train/short, valid/short, eval/short, short_clips); "
                        "they are used, padded like any clip")
    g.add_argument("--norm", type=common.number(float), nargs=2, default=None, metavar=("MEAN", "STD"),
                   help="fbank normalisation; default AudioSet's for 527 classes, else computed on the training set")
    g = p.add_argument_group("sampling and augmentation (Sec. IV, Algorithm 1)")
    g.add_argument("--balanced-sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="Algorithm 1 weighted sampling with replacement (default: on for full/300h, off for balanced)")
    g.add_argument("--freqm", type=common.NONNEG_INT, default=48, help="max frequency mask width F (IV-B); 0 = off")
    g.add_argument("--timem", type=common.NONNEG_INT, default=192, help="max time mask width T (IV-B); 0 = off")
    g.add_argument("--mixup", type=common.FRACTION, default=0.5, help="mix-up rate M (IV-C, Table V); 0 = off")
    g.add_argument("--no-mixup", dest="mixup", action="store_const", const=0.0, help="same as --mixup 0")
    g.add_argument("--mixup-alpha", type=common.POSITIVE, default=10.0, help="lambda ~ Beta(alpha, alpha) (Table VI)")
    g = p.add_argument_group("label enhancement (Sec. V, Algorithm 2)")
    g.add_argument("--label-enhance", type=str, default="none", choices=["none", "type1", "type2", "type12"],
                   help="add direct children (Type I), ancestors (Type II) or both, where the teacher scores "
                        "above the class threshold")
    g.add_argument("--teacher", type=str, default=None,
                   help="a finished psla.py run folder as teacher (its wa.pt, else last.pt), e.g. runs/psla/b2_balanced "
                        "(the default command's run). Default: train one, this recipe with the original labels, "
                        "in a shared folder beside --out (deviation 10)")
    g = p.add_argument_group("optimisation (Sec. II-B); unset = the preset's values")
    g.add_argument("--preset", default="auto", choices=["auto", "paper", "cpu"],
                   help="auto: paper on a CUDA GPU (Sec. II-B for --data), else cpu (deviation 2), whatever the corpus")
    g.add_argument("--epochs", type=common.POSITIVE_INT, default=None, help="training epochs (default: the preset's: paper 60 balanced / 30 full, cpu 6)")
    g.add_argument("--batch-size", type=common.POSITIVE_INT, default=None, help="clips per step (default: the preset's: paper 100, cpu 16)")
    g.add_argument("--lr", type=common.POSITIVE, default=None, help="peak learning rate (default: the preset's: paper 1e-3 balanced / 1e-4 full, cpu 1e-3)")
    g.add_argument("--lr-decay-start", type=common.NONNEG_INT, default=None,
                   help="halve the LR after this epoch (default: the preset's: paper 35 / 10, cpu 3)")
    g.add_argument("--lr-decay-every", type=common.POSITIVE_INT, default=None,
                   help="... and every this many epochs (default: the preset's: paper 5, cpu 1)")
    g.add_argument("--warmup-steps", type=common.NONNEG_INT, default=None, help="linear LR warm-up iterations (default: the preset's: paper 1000, cpu 9)")
    g.add_argument("--weight-decay", type=common.NONNEG, default=5e-7, help="Adam weight decay")
    g.add_argument("--betas", type=common.number(float, 0, 1, hi_open=True), nargs=2, default=(0.95, 0.999),
                   help="Adam betas")
    g.add_argument("--save-every", type=common.POSITIVE_INT, default=1000,
                   help="also write last.pt every this many steps within an epoch (resume point; results unchanged)")
    g = p.add_argument_group("aggregation (Sec. VI)")
    g.add_argument("--wa-start", type=common.POSITIVE_INT, default=None,
                   help="weight averaging from this epoch to the last (default: the first epoch at 1/4 LR)")
    g.add_argument("--last-n", type=common.POSITIVE_INT, default=None,
                   help="report the mean eval metrics of the last n epochs (default: the preset's, 5 / cpu 2)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = train_parser()
    args = p.parse_args(argv)
    if args.teacher is not None and args.label_enhance == "none":
        p.error("--teacher: only used with --label-enhance type1/type2/type12")
    if args.norm is not None and args.norm[1] <= 0:
        p.error(f"--norm: the std must be positive, got {args.norm[1]}")
    if args.imagenet not in (None, "url") and not Path(args.imagenet).is_file():
        p.error(f"--imagenet: {args.imagenet} is not a file (a torchvision state dict, or 'url')")
    return args


def resolve_schedule(args: argparse.Namespace, root: Path | None = None) -> None:
    """Derived values, computed once: unset optimisation flags take the preset's values (--preset: the
    paper's schedule for --data on a GPU, the CPU schedule of deviation 2 otherwise, whatever the corpus)."""
    common.apply_preset(args, {"cpu": SYNTH_SCHEDULE, "paper": PAPER_SCHEDULE[args.data]}, "psla")
    if args.balanced_sampling is None:
        args.balanced_sampling = args.data != "balanced"  # as the official recipes
    if args.wa_start is None:  # first epoch whose LR is 1/4 of the initial one (41 / 16 in the paper)
        args.wa_start = min(args.lr_decay_start + args.lr_decay_every + 1, args.epochs)
    if args.name is None:
        corpus = "" if args.data_root is None or root is None else f"{Path(root).name}_"  # item 15
        le = "" if args.label_enhance == "none" else f"_{args.label_enhance}"
        args.name = f"{corpus}b{args.effnet}_{args.data}{le}"
    if args.out is None:
        args.out = f"runs/psla/{args.name}"


# =============================================================================================
# Model: EfficientNet in torchvision's module layout + multi-head attention pooling (Sec. II-C)
# =============================================================================================
# (expand ratio, kernel, stride, in channels, out channels, layers) of EfficientNet-B0, and
# (width, depth) multipliers of B0-B7 (Tan & Le 2019).
MBCONV_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
                 (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2), 3: (1.2, 1.4), 4: (1.4, 1.8),
           5: (1.6, 2.2), 6: (1.8, 2.6), 7: (2.0, 3.1)}


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never more than 10% down."""
    n = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return n + divisor if n < 0.9 * v else n


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional SiLU; keys <i>.0.weight, <i>.1.* as in torchvision."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True,
                 bn=nn.BatchNorm2d):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), bn(cout)]
        super().__init__(*layers, *([nn.SiLU(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """Mobile inverted bottleneck: expand 1x1 -> depthwise kxk -> squeeze-excitation -> project 1x1,
    with a stochastically dropped residual (drop-connect) when the shapes allow one."""

    def __init__(self, expand: int, k: int, stride: int, cin: int, cout: int, drop: float, bn):
        super().__init__()
        mid = cin * expand
        layers = [ConvBNAct(cin, mid, 1, bn=bn)] if expand != 1 else []
        layers += [ConvBNAct(mid, mid, k, stride, groups=mid, bn=bn), SqueezeExcitation(mid, max(1, cin // 4)),
                   ConvBNAct(mid, cout, 1, act=False, bn=bn)]
        self.block = nn.Sequential(*layers)
        self.residual, self.drop = stride == 1 and cin == cout, drop

    def forward(self, x):
        y = self.block(x)
        if not self.residual:
            return y
        if self.training and self.drop > 0:  # per-sample stochastic depth
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop
            y = y * keep / (1 - self.drop)
        return x + y


class EfficientNet(nn.Module):
    """EfficientNet-B<b> feature extractor (no classifier): `features.0` stem ... `features.8` head
    conv, the module names of torchvision's ImageNet state dicts. Output (B, C, H/32, W/32)."""

    def __init__(self, b: int = 2, in_channels: int = 1, drop_connect: float = 0.2):
        super().__init__()
        w, d = SCALING[b]
        bn = nn.BatchNorm2d if b < 5 else partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)  # as torchvision
        stages = [(e, k, s, make_divisible(ci * w), make_divisible(co * w), math.ceil(n * d))
                  for e, k, s, ci, co, n in MBCONV_STAGES]
        total, i = sum(st[-1] for st in stages), 0
        layers: list[nn.Module] = [ConvBNAct(in_channels, stages[0][3], 3, 2, bn=bn)]
        for e, k, s, ci, co, n in stages:
            blocks = []
            for j in range(n):
                blocks.append(MBConv(e, k, s if j == 0 else 1, ci if j == 0 else co, co, drop_connect * i / total, bn))
                i += 1
            layers.append(nn.Sequential(*blocks))
        self.out_channels = 4 * stages[-1][4]  # 1280 (B0), 1408 (B2), ..., 2560 (B7)
        layers.append(ConvBNAct(stages[-1][4], self.out_channels, 1, bn=bn))
        self.features = nn.Sequential(*layers)
        for m in self.modules():  # He uniform initialisation for training from scratch (Sec. III)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")

    def forward(self, x):
        return self.features(x)


class MultiHeadAttentionPooling(nn.Module):
    """Sec. II-C, Fig. 2: per head h, an attention branch a_h = sigmoid(conv_att(x)) normalised by
    its sum over time, and a classification branch c_h = sigmoid(conv_cla(x)) (1x1 convs); the head
    output sum_t a_h[t] c_h[t] is weighted by a learnable, unconstrained w_h and summed over heads.
    The heads are computed together: one 1x1 conv per branch with heads*K outputs."""

    def __init__(self, channels: int, n_classes: int, heads: int = 4):
        super().__init__()
        self.heads, self.n_classes = heads, n_classes
        self.att = nn.Conv1d(channels, heads * n_classes, 1)
        self.cla = nn.Conv1d(channels, heads * n_classes, 1)
        self.head_weight = nn.Parameter(torch.full((heads,), 1.0 / heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T)
        with torch.autocast(x.device.type, enabled=False):  # pooled scores in fp32 (deviation 9)
            return self._pool(x.float())

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t = x.shape
        att = torch.sigmoid(self.att(x)).clamp(1e-7, 1 - 1e-7).view(b, self.heads, self.n_classes, t)
        att = att / att.sum(-1, keepdim=True)  # normalised over time (not a softmax)
        cla = torch.sigmoid(self.cla(x)).view(b, self.heads, self.n_classes, t)
        per_head = (att * cla).sum(-1)  # (B, H, K)
        return torch.einsum("bhk,h->bk", per_head, self.head_weight)


def n_frames(n_samples: torch.Tensor) -> torch.Tensor:
    """Fbank frames of clips of n samples: Kaldi's snip_edges framing keeps only whole frames."""
    return ((n_samples - FRAME_LENGTH) // FRAME_SHIFT + 1).clamp_min(0)


def clip_samples(target_length: int) -> int:
    """Samples that target_length whole frames need: 169,200 (10.575 s) for 1,056 frames."""
    return (target_length - 1) * FRAME_SHIFT + FRAME_LENGTH


class PSLANet(nn.Module):
    """Waveform (B, N) [+ each clip's length] -> fbank (B, T, F), normalised, padded to target_length
    -> [masking when training] -> EfficientNet on (B, 1, F, T) -> mean over frequency -> attention
    pooling -> (B, K)."""

    def __init__(self, n_classes: int, effnet: int = 2, heads: int = 4, n_mels: int = 128,
                 target_length: int = 1056, norm: tuple[float, float] = AUDIOSET_NORM,
                 freqm: int = 48, timem: int = 192, drop_connect: float = 0.2):
        super().__init__()
        self.config = dict(n_classes=n_classes, effnet=effnet, heads=heads, n_mels=n_mels, target_length=target_length,
                           norm=tuple(norm), freqm=freqm, timem=timem, drop_connect=drop_connect)
        self.fbank = common.KaldiFbank(n_mels=n_mels)  # 25 ms / 10 ms, Hanning, Kaldi mel scale
        self.register_buffer("norm", torch.tensor(norm, dtype=torch.float32))
        self.effnet = EfficientNet(effnet, in_channels=1, drop_connect=drop_connect)
        self.attention = MultiHeadAttentionPooling(self.effnet.out_channels, n_classes, heads)
        self.target_length, self.freqm, self.timem = target_length, freqm, timem
        self.to(memory_format=torch.channels_last)

    def spectrogram(self, wave: torch.Tensor, n_samples: torch.Tensor | None = None) -> torch.Tensor:
        """wave (B, N), zero-padded past each clip's n_samples (default N) -> (B, target_length, F):
        frames past a clip's end, from the batch padding or up to target_length, are the dataset mean,
        0 after normalisation (deviation 5), as if each clip's fbank were padded on its own."""
        x = (self.fbank(wave) - self.norm[0]) / self.norm[1]  # (B, T, F)
        if n_samples is not None:
            real = torch.arange(x.shape[1], device=x.device) < n_frames(n_samples.to(x.device))[:, None]  # (B, T)
            x = x.masked_fill(~real[..., None], 0.0)
        pad = self.target_length - x.shape[1]  # 998 frames for 10 s -> 58 padded frames
        return F.pad(x, (0, 0, 0, pad)) if pad > 0 else x[:, : self.target_length]

    def forward(self, wave: torch.Tensor, n_samples: torch.Tensor | None = None) -> torch.Tensor:
        x = self.spectrogram(wave, n_samples)
        if self.training:  # Sec. IV-B: one frequency and one time mask per clip
            x = common.mask_along(x, self.freqm, dim=2) if self.freqm else x
            x = common.mask_along(x, self.timem, dim=1) if self.timem else x
        x = x.transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)  # (B, 1, F, T)
        x = self.effnet(x).mean(2)  # (B, C, F/32, T/32) -> mean over frequency -> (B, C, T/32)
        return self.attention(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_imagenet(model: PSLANet, source: str) -> dict:
    """Sec. III: load a torchvision-format EfficientNet ImageNet state dict into every layer except
    the 1-channel stem conv (3 input channels there) and the classifier (replaced by our head)."""
    if source == "url":
        url = TORCHVISION_URLS[model.config["effnet"]]
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
        except Exception as e:
            raise common.DataError(f"--imagenet url: cannot download {url} ({e}); "
                                   f"download it elsewhere and pass the file with --imagenet PATH") from None
    else:
        state = common.load_checkpoint(source)
    own = model.effnet.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            loaded[key] = value
        else:  # features.0.0.weight (3-channel stem), classifier.* (ImageNet head)
            skipped.append(key)
    missing = [k for k in own if k not in loaded and k != "features.0.0.weight"]
    if missing:
        raise common.DataError(f"{source}: not a torchvision EfficientNet-B{model.config['effnet']} state dict "
                               f"({len(missing)} layers missing, e.g. {missing[0]})")
    model.effnet.load_state_dict(loaded, strict=False)
    print(f"imagenet: loaded {len(loaded)} of {len(state)} tensors from {source}; "
          f"kept random: features.0.0.weight (1-channel stem) + attention head; skipped {skipped}")
    return {"loaded": len(loaded), "total": len(state), "skipped": skipped}


def build_model(config: dict) -> PSLANet:
    return PSLANet(**config)




# =============================================================================================
# Data: clips at their own length, waveform mix-up (Algorithm 1, lines 9-15), fbank statistics
# =============================================================================================
class Clips(common.ClipDataset):
    """Whole clips, (wave (n,), target (K,), index), cut to the samples that target_length frames
    need ((1,056 - 1) * 160 + 400 = 169,200) but never padded: the batch is zero-padded (`collate`)
    and the model sets the frames past each clip's end to 0 after normalisation (deviation 5)."""

    def __init__(self, root, rows: list, targets: np.ndarray, target_length: int):
        super().__init__(root, rows, targets, clip_seconds=None)
        self.max_samples = clip_samples(target_length)

    def __getitem__(self, i: int):
        item = super().__getitem__(i)
        return item if item is None else (item[0][: self.max_samples], *item[1:])


def collate(batch):
    """common.pad_collate plus each clip's length: (wave (B, N), target (B, K), index (B,), n_samples (B,))."""
    out = common.pad_collate(batch)
    return out if out is None else (*out, torch.tensor([len(b[0]) for b in batch if b is not None]))


def clip_loader(dataset, batch_size: int, workers: int, **kw) -> torch.utils.data.DataLoader:
    """Every psla loader (training, valid/eval, teacher scores, fbank statistics): the same padding.
    Workers start from a fork server (Linux), not from this process: the training loader
    starts fresh workers every epoch, and forked from a process whose heap holds GBs of freed
    activations they share it copy-on-write, so the next steps copy every page they write (1.2-1.7x a
    bare step over a 6-step epoch, README) and a fork can keep a stale copy of the heap alive. Same
    batches: the mix-up draws do not depend on the worker. Workers end with this process (worker_init)."""
    loader = common.make_loader(dataset, batch_size, workers=workers, collate_fn=collate, context=worker_context(),
                                **kw)
    loader.worker_init_fn = partial(worker_init, os.getpid())
    return loader


def worker_context():
    """The fork server, preloading this module (under `python psla.py` also as __main__), so that
    a worker starts as a fork of a small process that has imported torch already."""
    if not sys.platform.startswith("linux"):
        return None  # macOS and Windows spawn workers anyway
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def worker_init(trainer: int, worker_id: int) -> None:
    """A worker started from the fork server is the server's child, not the trainer's, so torch's own
    check (is my parent alive?) never sees a killed trainer, and the server lives as long as any worker:
    otherwise both outlive a SIGKILLed run. A thread ends the worker once the trainer is
    gone (or a zombie); the server then exits too."""
    common.seed_worker(worker_id)
    if sys.platform.startswith("linux"):
        threading.Thread(target=exit_without, args=(trainer,), daemon=True).start()


def exit_without(pid: int) -> None:
    stat = Path(f"/proc/{pid}/stat")
    while True:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # killed, not yet reaped
                os._exit(0)
        except OSError:  # gone
            os._exit(0)
        time.sleep(0.5)


class MixupClips(torch.utils.data.Dataset):
    """Algorithm 1: with probability `rate`, mix clip i with a partner j drawn uniformly from the
    whole set (not from the balanced sampler), lam ~ Beta(alpha, alpha), on the waveform before the
    fbank; labels are mixed with the same lam. Items are keyed (i, epoch, position in the epoch) and
    the draws come from (seed, epoch, position): the same whatever the worker, --workers or a resume."""

    def __init__(self, clips: Clips, rate: float, alpha: float, seed: int = 0):
        self.clips, self.rate, self.alpha, self.seed = clips, rate, alpha, seed % 2**32

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, int, int]):
        i, epoch, position = key
        item = self.clips[i]
        rng = np.random.default_rng([self.seed, epoch, position])
        if item is None or self.rate <= 0 or rng.random() >= self.rate:
            return item
        partner = self.clips[int(rng.integers(len(self.clips)))]
        if partner is None:
            return item
        lam = float(rng.beta(self.alpha, self.alpha))
        # Clips of different lengths: the partner is cut or zero-padded to clip i's length, as in the
        # official dataloader, so the mix has clip i's length and real frames; a shorter partner is
        # silence inside the mix (its fbank is real audio), never padding that the model zeroes.
        n = len(item[0])
        other = F.pad(partner[0][:n], (0, max(0, n - len(partner[0]))))
        return lam * item[0] + (1 - lam) * other, lam * item[1] + (1 - lam) * partner[1], item[2]


def epoch_items(args, targets: np.ndarray, epoch: int) -> list[tuple[int, int, int]]:
    """This rank's share (common.shard) of one epoch as MixupClips keys (clip, epoch, position): Algorithm
    1's weighted draw with replacement (--balanced-sampling) or a permutation, a function of (seed, epoch)."""
    seed = args.seed % 2**32
    if args.balanced_sampling:
        order = common.WeightedSampler(common.generate_sampling_weights(targets), seed=seed).epoch_indices(epoch)
    else:
        order = np.random.default_rng([seed, epoch]).permutation(len(targets))
    return [(int(order[p]), epoch, int(p)) for p in common.shard(np.arange(len(order)))]


def fbank_statistics(corpus: common.Corpus, args, device: torch.device, max_clips: int = 500) -> tuple[float, float]:
    """Mean and std of the log fbank over the real frames (no padding) of up to max_clips training clips."""
    rows = corpus.train[:: max(1, len(corpus.train) // max_clips)]
    ds = Clips(corpus.root, rows, corpus.targets(rows), args.target_length)
    fbank, s, s2, n = common.KaldiFbank(n_mels=args.n_mels).to(device), 0.0, 0.0, 0
    for batch in clip_loader(ds, 32, args.workers):
        if batch is not None:
            x = fbank(batch[0].to(device)).double()  # (B, T, F)
            x = x[torch.arange(x.shape[1], device=device) < n_frames(batch[3].to(device))[:, None]]  # (real frames, F)
            s, s2, n = s + x.sum().item(), s2 + (x ** 2).sum().item(), n + x.numel()
    mean = s / n
    return mean, math.sqrt(s2 / n - mean ** 2)


def class_labels(corpus: common.Corpus) -> dict:
    """The class ids and names, saved in every checkpoint so that `psla.py predict` can name its tags."""
    return {"mids": list(corpus.labels.mids), "names": list(corpus.labels.names)}


def model_config(args, corpus: common.Corpus, device) -> dict:
    """The network's settings, saved in every checkpoint; the fbank mean/std as deviation 6 says."""
    if args.norm:
        norm = args.norm
    elif len(corpus.labels) == 527:
        norm = AUDIOSET_NORM
    else:  # rank 0 computes, every rank uses its numbers
        norm = common.from_rank0(fbank_statistics(corpus, args, device) if common.is_main() else None)
    return dict(n_classes=len(corpus.labels), effnet=args.effnet, heads=args.heads, n_mels=args.n_mels,
                target_length=args.target_length, norm=tuple(norm), freqm=args.freqm, timem=args.timem,
                drop_connect=args.drop_connect)


# =============================================================================================
# Training and evaluation (Sec. II-B)
# =============================================================================================
def learning_rate(args, epoch: int, step: int) -> float:
    """Constant, halved every lr_decay_every epochs after epoch lr_decay_start (epochs count from 1),
    times a smooth linear warm-up over the first warmup_steps iterations."""
    decays = max(0, (epoch - args.lr_decay_start - 1) // args.lr_decay_every + 1)
    return args.lr * 0.5 ** decays * min(1.0, (step + 1) / max(1, args.warmup_steps))


def train_step(net, optimizer, scaler, batch, lr: float, loss_sum: common.Mean, device, amp) -> None:
    """One iteration: fbank -> masking -> EfficientNet -> attention pooling (all in `net`), BCE against the
    (mixed-up) labels, Adam. No host sync: the loss is summed on the device, read at the epoch's end."""
    wave, target, _, n_samples = common.to_device(batch, device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with common.autocast(device, amp):
        out = net(wave, n_samples)
    # BCE on the clamped attention output: the head weights are unconstrained (official code)
    loss = F.binary_cross_entropy(out.float().clamp(1e-7, 1 - 1e-7), target.float())  # uint8 unless mixed
    common.optimizer_step(loss, optimizer, scaler)
    loss_sum.add(loss)


def train(args, corpus: common.Corpus, rows: list, out: Path, device, amp) -> dict:
    """Sec. II-B: Adam with warm-up and step decay, one evaluation per epoch (valid and eval splits; rank 0),
    the weights of every epoch from --wa-start kept for weight averaging. last.pt, written at every epoch's
    end and every --save-every steps, holds the data position (epoch, batches done) and every RNG state:
    a run killed anywhere continues exactly. Returns the loop's state: history (one record per epoch), ..."""
    common.seed_everything(args.seed)  # this stage starts the same whichever stages ran before it
    t0, log, targets = time.time(), common.RunLogger(out), corpus.targets(rows, dtype=np.uint8)  # 1.1 GB on AudioSet
    config, labels = model_config(args, corpus, device), class_labels(corpus)  # labels: for `psla.py predict`
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                 weight_decay=args.weight_decay)
    scaler = common.grad_scaler(device, amp)  # fp16 loss scaling (a no-op otherwise)
    saved = common.load_state(out / "last.pt", model, optimizer, scaler)
    if saved is None:
        state = dict(epoch=1, offset=0, step=0, history=[], loss=(0.0, 0), skipped=0, short=0, minutes=0.0)
        if args.imagenet:
            load_imagenet(model, args.imagenet)  # Sec. III
    else:
        state = saved["loop"]
        if state["offset"] == 0 and state["history"]:  # its log line, if a kill came between last.pt and it
            log.log_once(state["history"][-1], ("epoch",))
    if common.is_main():
        print(f"{out}: EfficientNet-B{args.effnet} + {args.heads}-head attention, {len(corpus.labels)} classes, "
              f"{count_parameters(model):,} parameters; fbank mean/std {config['norm'][0]:.4f}/"
              f"{config['norm'][1]:.4f}; " + (f"resumed at epoch {state['epoch']}, step {state['step']}" if saved
                                                else "from the start"))
    net = common.compiled(common.wrap_ddp(model), args.compile)
    train_set = MixupClips(Clips(corpus.root, rows, targets, args.target_length), args.mixup, args.mixup_alpha,
                           args.seed)
    evals = {split: (clip_loader(Clips(corpus.root, r, corpus.targets(r), args.target_length), 2 * args.batch_size,
                                 args.workers), corpus.targets(r))
             for split, r in (("eval", corpus.eval), ("valid", corpus.valid)) if r}
    if common.is_main():
        (out / "preds").mkdir(parents=True, exist_ok=True)
        save_scores(out / "preds" / "eval_targets.npy", evals["eval"][1])
    loss = common.Mean(device)
    loss.sum += state["loss"][0]  # the epoch's loss so far (a resume mid-epoch)
    loss.n = state["loss"][1]
    minutes = lambda: state["minutes"] + (time.time() - t0) / 60  # with the earlier attempts

    def checkpoint():  # one atomic file: model, optimizer, scaler, every RNG state, the loop's state
        loop = state | {"loss": (float(loss.sum), loss.n), "minutes": minutes()}
        common.save_state(out / "last.pt", model, optimizer, scaler, script="psla", config=config, loop=loop,
                          labels=labels)

    stop = lambda: args.max_steps is not None and state["step"] >= args.max_steps
    while state["epoch"] <= args.epochs and not stop():
        epoch = state["epoch"]
        items = epoch_items(args, targets, epoch)[state["offset"] * args.batch_size:]  # resume mid-epoch
        model.train()
        loader = clip_loader(train_set, args.batch_size, args.workers, sampler=items, persistent=False)
        for j, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False,
                                       disable=not common.is_main())):
            planned = len(items[j * args.batch_size:(j + 1) * args.batch_size])
            state["skipped"] += planned - (0 if batch is None else len(batch[2]))  # unreadable: skipped, counted
            if batch is not None:  # None: every clip of the batch was unreadable
                state["short"] += int(is_short(batch[3], args.short_clip_seconds, args.target_length).sum())
                train_step(net, optimizer, scaler, batch, learning_rate(args, epoch, state["step"]), loss, device, amp)
            state["step"] += 1
            state["offset"] += 1
            if stop():
                break
            if state["step"] % args.save_every == 0 and j + 1 < len(loader):  # (the epoch's end saves anyway)
                checkpoint()
        # ---- the epoch's end: rank 0 evaluates; the weights WA needs; best.pt; last.pt, then the log line
        record = {"epoch": epoch, "step": state["step"], "lr": learning_rate(args, epoch, state["step"]),
                  "train/loss": loss.read(), "train/skipped": common.all_sum(state["skipped"]),
                  "train/short": common.all_sum(state["short"])}
        record |= common.from_rank0(evaluate(model, evals, epoch, out, args, device, amp) if common.is_main() else None)
        state["history"].append(record)
        record["plateau"] = convergence(state["history"])["plateau"]  # so far: in every log line
        if epoch >= args.wa_start:  # Sec. VI-A
            common.save_checkpoint(out / "weights" / f"e{epoch:03d}.pt", {"model": model.state_dict()})
        if selected(state["history"]) is record:
            common.save_checkpoint(out / "best.pt", {"script": "psla", "model": model.state_dict(), "config": config,
                                                     "epoch": epoch, "labels": labels})
        state.update(epoch=epoch + 1, offset=0, skipped=0, short=0)
        checkpoint()
        log.log(record)  # after last.pt: a kill in between loses this line, never doubles it
    conv = convergence(state["history"])
    if common.is_main():
        print(f"{out}: {'a plateau' if conv['plateau'] else 'NO plateau'} in validation "
              f"(last quarter of {conv['validations']} epochs within {conv['tolerance']} of the best before; "
              f"it gained {common.signed(conv['gain'])})")
    return state | {"config": config, "minutes": minutes(), "parameters": count_parameters(model), "convergence": conv}


def convergence(history: list[dict]) -> dict:
    """Whether the stage reached a plateau: valid mAP per epoch, else the training loss."""
    if history and "valid/mAP" in history[-1]:
        return common.plateau_report([r["valid/mAP"] for r in history])
    return common.plateau_report([r["train/loss"] for r in history], higher=False)


@torch.no_grad()
def predict(model, loader, n: int, n_classes: int, device, amp) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N, K), float32, in dataset order from a `clip_loader` (the training padding), NaN rows for
    the clips that could not be read (common.readable_scores excludes and counts them), and each clip's
    length in samples as read (0 if unreadable)."""
    model.eval()
    scores, lengths = np.full((n, n_classes), np.nan, dtype=np.float32), np.zeros(n, np.int64)
    for batch in tqdm(loader, desc="predict", leave=False, disable=not common.is_main()):
        if batch is None:
            continue
        wave, _, idx, n_samples = batch
        with common.autocast(device, amp):
            out = model(common.to_device((wave,), device)[0], n_samples)
        scores[idx.numpy()], lengths[idx.numpy()] = out.float().cpu().numpy(), n_samples.numpy()
    return scores, lengths


def evaluate(model, evals: dict, epoch: int, out: Path, args, device, amp) -> dict:
    """mAP, mAUC, d' and the skipped and short clips of each split after an epoch; the eval scores are
    kept for the ensembles (Sec. VI-B)."""
    record = {}
    for split, (loader, targets) in evals.items():
        scores, lengths = predict(model, loader, *targets.shape, device, amp)
        m = metrics(targets, scores)
        record |= {f"{split}/{k}": m[k] for k in ("mAP", "mAUC", "dprime", "skipped")}
        record[f"{split}/short"] = short_clips(scores, lengths, args)
        if split == "eval":
            save_scores(out / "preds" / f"eval_e{epoch:03d}.npy", scores)
    return record


def selected(history: list[dict]) -> dict:
    """The valid-selected epoch (the lowest training loss without a valid split); never the eval set."""
    return max(history, key=lambda r: r["valid/mAP"] if "valid/mAP" in r else -r["train/loss"])


def is_short(n_samples, seconds: float, target_length: int):
    """Clips (lengths as read, cut to target_length's samples) shorter than `seconds`: counted, not
    dropped (they are padded). A clip that was cut is never short: with a minimum above the target
    length's duration, the clips shorter than the latter are counted."""
    return n_samples < min(seconds * common.SR, clip_samples(target_length))


def short_clips(scores: np.ndarray, lengths: np.ndarray, args, target_length: int | None = None) -> int:
    """Readable clips (no NaN score) shorter than --short-clip-seconds."""
    ok = ~np.isnan(scores).any(1)
    return int((ok & is_short(lengths, args.short_clip_seconds, target_length or args.target_length)).sum())


def metrics(targets: np.ndarray, scores: np.ndarray) -> dict:
    """mAP, mAUC, d', per-class AP over the readable clips; n scored and skipped (NaN rows)."""
    return common.readable_scores(targets, scores)


def save_scores(path: Path, scores: np.ndarray) -> None:
    """An atomic .npy (temp file + rename): a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, scores)
    os.replace(tmp, path)


def bench_step(device, amp: str = "auto", batch_size: int = 8) -> dict:
    """For data/bench.py: `step` = one real training step (train_step: fbank, masking, drop-connect, BCE,
    Adam) of the paper's network (B2, 4 heads, 527 classes) on a fixed batch of 10 s clips (1,056
    frames); `bare` = forward, backward and Adam of the same network on the batch's fbanks, computed once.
    Mix-up happens in the loader's workers, outside both."""
    device = torch.device(device)
    dtype = common.amp_dtype(device, amp)
    g, n = torch.Generator().manual_seed(0), clip_samples(1056)
    batch = (torch.randn(batch_size, n, generator=g), (torch.rand(batch_size, 527, generator=g) < 0.02).float(),
             torch.arange(batch_size), torch.full((batch_size,), n))
    batch = tuple(t.pin_memory() for t in batch) if device.type == "cuda" else batch
    model = PSLANet(527).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler, loss = common.grad_scaler(device, dtype), common.Mean(device)
    with torch.no_grad():
        fbank = model.spectrogram(batch[0].to(device)).transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        fbank = fbank.contiguous(memory_format=torch.channels_last)
    target = batch[1].to(device)

    def step():
        model.train()
        train_step(model, optimizer, scaler, batch, 1e-4, loss, device, dtype)

    def bare():
        model.train()
        with common.autocast(device, dtype):
            out = model.attention(model.effnet(fbank).mean(2))
        common.optimizer_step(F.binary_cross_entropy(out.float().clamp(1e-7, 1 - 1e-7), target), optimizer, scaler)
    return {"step": step, "bare": bare, "clips": batch_size}


# =============================================================================================
# Paper procedures: label enhancement (V), weight averaging (VI-A), ensembles (VI-B)
# =============================================================================================
def ontology_matrices(labels: common.Labels, ontology: common.Ontology) -> tuple[np.ndarray, np.ndarray]:
    """(K, K) 0/1 matrices among the K classes: children[k, j] = j is a direct child of k (Type I
    candidates); ancestors[k, j] = j is an ancestor of k through any chain of parents (Type II) that
    crosses no abstract node (official code; deviation 8)."""
    k = len(labels)
    children, ancestors = np.zeros((k, k), np.float32), np.zeros((k, k), np.float32)
    for i, mid in enumerate(labels.mids):
        children[i, [labels.index[c] for c in ontology.children.get(mid, []) if c in labels.index]] = 1
        ancestors[i, [labels.index[a] for a in ontology.ancestors(mid, through_abstract=False)  # deviation 8
                      if a in labels.index]] = 1
    return children, ancestors


def enhance_labels(scores: np.ndarray, targets: np.ndarray, labels: common.Labels, ontology: common.Ontology,
                   kind: str = "type12", ok: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 2. Procedure 1: t_k = mean teacher score of the clips labelled k. Procedure 2: a
    clip gains a direct child (Type I) and/or an ancestor (Type II) of one of its labels when the
    teacher scores it above that class's threshold. Labels are only added. Returns the enhanced
    (N, K) targets and the thresholds (nan for a class without any clip: it is never added).
    `ok` marks the clips the teacher could read: thresholds use only those, the others gain nothing."""
    ok = np.ones(len(targets), bool) if ok is None else np.asarray(ok, bool)
    pos = targets > 0
    scores = np.where(ok[:, None], scores, 0.0)  # unreadable clips: no score enters any sum
    with np.errstate(invalid="ignore", divide="ignore"):
        thresholds = (scores * (pos & ok[:, None])).sum(0) / (pos & ok[:, None]).sum(0)
    children, ancestors = ontology_matrices(labels, ontology)
    candidates, y = np.zeros_like(pos), pos.astype(np.float32)
    if kind in ("type1", "type12"):
        candidates |= (y @ children) > 0  # a child of one of the clip's labels
    if kind in ("type2", "type12"):
        candidates |= (y @ ancestors) > 0  # an ancestor of one of the clip's labels
    added = candidates & ~pos & (scores > thresholds) & ok[:, None]  # nan thresholds compare False
    return (pos | added).astype(np.float32), thresholds


def read_checkpoint(path: Path, meta: bool = False) -> tuple:
    """(network settings, weights) of a psla.py checkpoint (wa.pt, best.pt, last.pt), plus its metadata
    (script, config, labels, ...) with meta=True; one line (DataError) for anything else."""
    if not Path(path).is_file():
        raise common.DataError(f"{path}: checkpoint not found")
    try:
        ck = common.load_checkpoint(path)
    except Exception:  # random bytes, a wav, a truncated file, an unpicklable object
        raise common.DataError(f"{path}: not a readable checkpoint") from None
    info = ck.get("state", ck) if isinstance(ck, dict) else None  # last.pt keeps it under "state"
    script = info.get("script") if isinstance(info, dict) else None
    if script != "psla" or "model" not in ck or not isinstance(info.get("config"), dict):
        raise common.DataError(f"{path}: not a psla.py checkpoint" + (f" (a {script}.py one)" if script not in
                                                                       (None, "psla") else ""))
    return (info["config"], ck["model"], info) if meta else (info["config"], ck["model"])


def teacher_file(run: Path) -> Path:
    """A teacher run's WA model, else its last checkpoint."""
    for name in ("wa.pt", "last.pt"):
        if (run / name).exists():
            return run / name
    raise common.DataError(f"--teacher {run}: no wa.pt or last.pt (not a psla.py run, or unfinished)")


def teacher_args(args) -> argparse.Namespace:
    """The teacher's recipe (Sec. V, deviation 10): this run's, with the original labels."""
    return argparse.Namespace(**(vars(args) | {"label_enhance": "none", "teacher": None}))


def teacher_identity(args, corpus: common.Corpus) -> dict | None:
    """What the teacher is, for the run's identity, checked before any work: a given run (its folder and
    identity, or its checkpoint's size and time), or the settings and input files of the teacher stage."""
    if args.label_enhance == "none":
        return None
    if args.teacher is None:
        files = sorted(p for p in corpus.root.iterdir() if p.suffix in (".tsv", ".csv", ".json"))
        return run_identity(teacher_args(args), corpus) | {
            "inputs": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    run = Path(args.teacher)
    ckpt = teacher_file(run)
    read_checkpoint(ckpt)  # another script's checkpoint: one line, before anything is written
    cfg = run / "config.json"
    ident = common.read_json(cfg, "config.json").get("identity_hash") if cfg.exists() else None
    return {"run": str(run.resolve()), "identity": ident or [ckpt.name, ckpt.stat().st_size, ckpt.stat().st_mtime_ns]}


def teacher(args, corpus: common.Corpus, key: dict, device, amp) -> Path:
    """Sec. V, step 1: the teacher's checkpoint. A given --teacher run's, or this recipe trained on the
    original labels (train -> WA) in a shared stage folder beside the run, named by its settings and
    input files: runs that need the same teacher share it (the second waits for the first)."""
    if args.teacher:
        return teacher_file(Path(args.teacher))
    recipe = teacher_args(args)
    folder = common.stage_dir(Path(args.out).parent, "teacher", key)
    with common.RunLock(folder, wait=True):
        trained = train(recipe, corpus, corpus.train, folder, device, amp)
        weight_averaging(recipe, corpus, folder, trained, device, amp)
    return teacher_file(folder)


def label_enhancement(args, corpus: common.Corpus, teacher_ckpt: Path, out: Path, device, amp) -> list:
    """Sec. V, Algorithm 2: score the training clips with the teacher, add the labels it supports (Types
    I, II and both, for Table VIII's statistics), write the chosen set as out/train_<type>.tsv (last: the
    stage is done when it exists) and return its rows. Rank 0 scores; the others read the manifest."""
    path = out / f"train_{args.label_enhance}.tsv"
    if common.is_main() and not path.exists():
        config, weights = read_checkpoint(teacher_ckpt)
        model = build_model(config).to(device)
        model.load_state_dict(weights)
        targets = corpus.targets(corpus.train)
        ds = Clips(corpus.root, corpus.train, targets, config["target_length"])
        scores, lengths = predict(model, clip_loader(ds, 2 * args.batch_size, args.workers), *targets.shape, device,
                                  amp)
        ok = ~np.isnan(scores).any(1)
        # the truth files (*_true.tsv), synthetic or not, tell whether the added labels were right
        true = corpus.true_targets(corpus.train) if all(fn in corpus.true for fn, _ in corpus.train) else None
        stats = {}
        for kind in ("type1", "type2", "type12"):  # Table VIII columns
            enhanced, _ = enhance_labels(scores, targets, corpus.labels, corpus.ontology, kind, ok)
            added = (enhanced > 0) & (targets == 0)
            s = stats[kind] = {"impacted_classes": int(added.any(0).sum()), "labels_added": int(added.sum()),
                               "labels_added_pct": 100.0 * added.sum() / targets.sum()}
            if true is not None:  # were the added labels right?
                missing = (true > 0) & (targets == 0)
                s["precision"] = float((added & (true > 0)).sum() / max(1, added.sum()))
                s["recall_of_missing"] = float((added & missing).sum() / max(1, missing.sum()))
            if kind == args.label_enhance:
                rows = [(fn, [corpus.labels.mids[j] for j in np.flatnonzero(e)])
                        for (fn, _), e in zip(corpus.train, enhanced)]
        common.write_json(out / "label_enhancement.json", {
            "teacher": str(teacher_ckpt), "chosen": args.label_enhance, "skipped_clips": int((~ok).sum()),
            "short_clips": short_clips(scores, lengths, args, config["target_length"]), **stats})
        common.write_manifest(out / f"{path.name}.tmp", rows)
        os.replace(out / f"{path.name}.tmp", path)
        print(f"label enhancement ({args.label_enhance}) with teacher {teacher_ckpt}: "
              f"{stats[args.label_enhance]['labels_added']} labels added")
    common.barrier()  # rank 0 wrote the manifest; every rank reads it next
    return common.read_manifest(path)


def weight_averaging(args, corpus: common.Corpus, out: Path, trained: dict, device, amp) -> dict | None:
    """Sec. VI-A: the plain mean of the weights (and BN statistics) of every epoch from --wa-start (the
    first at 1/4 of the LR) to the last, each once, saved as wa.pt and scored on the eval set (rank 0);
    None when training stopped before --wa-start."""
    epochs = range(args.wa_start, trained["history"][-1]["epoch"] + 1)
    result, preds = None, out / "preds" / "eval_wa.npy"
    if common.is_main() and len(epochs):
        if not preds.exists():  # written last: a resumed run that has it skips the work
            model = build_model(trained["config"]).to(device)
            model.load_state_dict(common.average_state_dicts([out / "weights" / f"e{e:03d}.pt" for e in epochs]))
            common.save_checkpoint(out / "wa.pt", {"script": "psla", "model": model.state_dict(),
                                                   "config": trained["config"], "epochs": list(epochs),
                                                   "labels": class_labels(corpus)})
            ds = Clips(corpus.root, corpus.eval, corpus.targets(corpus.eval), args.target_length)
            loader = clip_loader(ds, 2 * args.batch_size, args.workers)
            save_scores(preds, predict(model, loader, len(ds), len(corpus.labels), device, amp)[0])
        result = metrics(corpus.targets(corpus.eval), np.load(preds)) | {"epochs": [epochs.start, epochs.stop - 1]}
    return common.from_rank0(result)


def ensemble(preds: list[np.ndarray], targets: np.ndarray) -> dict:
    """Sec. VI-B: average the probability predictions of a committee; Table X's columns."""
    maps = [metrics(targets, p)["mAP"] for p in preds]
    m = metrics(targets, common.ensemble_predictions(preds))
    return {"models": len(preds), "avg_mAP": float(np.mean(maps)), "best_mAP": float(np.max(maps)),
            "ensemble_mAP": m["mAP"], "ensemble_mAUC": m["mAUC"], "ensemble_dprime": m["dprime"], "n": m["n"],
            "skipped": m["skipped"]}


def ensembles(out: Path, history: list[dict]) -> dict:
    """Sec. VI-B1, Table X (upper part): the committee of every epoch's checkpoint, from their eval scores.
    (Committees of several runs: `python psla.py ensemble RUN ...`.)"""
    return ensemble([np.load(out / "preds" / f"eval_e{r['epoch']:03d}.npy") for r in history],
                    np.load(out / "preds" / "eval_targets.npy"))



def ensemble_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
        "psla.py ensemble",
        ("Table X: the committee (mean of the eval probabilities) of finished "
         "psla.py runs' saved predictions (preds/); writes results.json and results.md in --out."))
    p.add_argument("runs", nargs="+", metavar="RUN", help="finished psla.py run folders (each has preds/)")
    p.add_argument("--which", default="last", choices=["last", "wa", "best", "epochs"],
                   help="per run: the last epoch (Sec. VI-B2), the WA model, the valid-selected epoch, "
                        "or every epoch's checkpoint (VI-B1)")
    p.add_argument("--out", default=None, help="folder for results.json/.md (default runs/psla/ensemble_<which>)")
    return p


def ensemble_main(argv: list[str]) -> dict:
    """`python psla.py ensemble RUN [RUN ...]`: committees from finished runs' saved eval predictions."""
    a = ensemble_parser().parse_args(argv)
    preds, targets = [], None
    for run in map(Path, a.runs):
        if not (run / "preds" / "eval_targets.npy").exists() or not (run / "results.json").exists():
            raise common.DataError(f"{run}: not a finished psla.py run (no results.json and preds/)")
        res = common.read_json(run / "results.json", "results.json")
        t = np.load(run / "preds" / "eval_targets.npy")
        if targets is not None and t.shape != targets.shape:
            raise common.DataError(f"{run}: evaluated on a different eval set than {a.runs[0]}")
        targets = t
        names = {"last": [f"eval_e{res['epochs']:03d}"], "wa": ["eval_wa"], "best": [f"eval_e{res['best_epoch']:03d}"],
                 "epochs": [f"eval_e{e:03d}" for e in range(1, res["epochs"] + 1)]}[a.which]
        for name in names:
            if not (run / "preds" / f"{name}.npy").exists():
                raise common.DataError(f"{run}: no preds/{name}.npy (--which {a.which}: e.g. no weight averaging)")
            preds.append(np.load(run / "preds" / f"{name}.npy"))
    out = Path(a.out or f"runs/psla/ensemble_{a.which}")
    ident = {"runs": [str(Path(r).resolve()) for r in a.runs], "which": a.which}
    with common.claim_run(out, "psla-ensemble", ident, resume=False):  # recomputed every time (seconds)
        row = ensemble(preds, targets)
        md = common.markdown_table(["committee", "# models", "avg mAP", "best mAP", "ensemble mAP", "mAUC", "d'"],
                                   [[f"{a.which} of {len(a.runs)} run(s)", row["models"], row["avg_mAP"],
                                     row["best_mAP"], row["ensemble_mAP"], row["ensemble_mAUC"],
                                     row["ensemble_dprime"]]])
        return common.report(out, {"runs": a.runs, "which": a.which, **row}, "# PSLA ensemble (Table X)\n\n" + md)


# =============================================================================================
# Report: results.json / results.md
# =============================================================================================
def paper_row(args) -> tuple[str, str]:
    """The paper's row with the same techniques as this run (masking/mix-up by their flags)."""
    key = (bool(args.imagenet), True if args.balanced_sampling and args.data != "balanced" else None,
           bool(args.freqm or args.timem), args.mixup > 0, args.label_enhance)
    name, balanced, full = PAPER_ROWS.get(key, ("no matching row in the paper", None, None))
    value = balanced if args.data == "balanced" else full
    return name, "-" if value is None else f"{value:.4f}"


def write_report(args, corpus: common.Corpus, out: Path, trained: dict, wa: dict | None, ens: dict) -> dict:
    """The paper's single model (mean eval metrics of the last n epochs), the valid-selected epoch, the
    WA model and the checkpoint ensemble, beside the paper's row with the same techniques; label
    enhancement's Table VIII statistics. results.json / results.md (common.report)."""
    history, keys = trained["history"], ("mAP", "mAUC", "dprime")
    lastn, best = history[-args.last_n:], selected(history)
    targets, last = (np.load(out / "preds" / f) for f in ("eval_targets.npy", f"eval_e{history[-1]['epoch']:03d}.npy"))
    results = {"last_n": {k: float(np.mean([r[f"eval/{k}"] for r in lastn])) for k in keys}
               | {"mAP_std": float(np.std([r["eval/mAP"] for r in lastn]))},
               "best": {"epoch": best["epoch"], **{k: best[f"eval/{k}"] for k in keys}},
               "convergence": trained["convergence"],
               **({"wa": wa} if wa else {}), "checkpoint_ensemble": ens, "last_AP": metrics(targets, last)["AP"],
               "epochs": history[-1]["epoch"], "best_epoch": best["epoch"], "steps": trained["step"],
               "parameters": trained["parameters"], "classes": corpus.labels.names, "minutes": trained["minutes"],
               "config": vars(args) | {"norm": list(trained["config"]["norm"])},
               "skipped_clips": {k.split("/")[0]: v for k, v in history[-1].items() if k.endswith("/skipped")},
               "short_clips": {k.split("/")[0]: v for k, v in history[-1].items() if k.endswith("/short")},
               "short_clip_seconds": args.short_clip_seconds}
    name, paper = paper_row(args)
    row = lambda what, m, ref: [what, m["mAP"], m["mAUC"], m["dprime"], ref]
    rows = [row(f"single model, mean of last {len(lastn)} epochs", results["last_n"], paper),
            row(f"valid-selected epoch {best['epoch']}", results["best"], "-")]
    if wa:
        rows.append(row(f"weight averaging, epochs {wa['epochs'][0]}-{wa['epochs'][1]}", wa,
                        PAPER_WA.get(args.data, "-")))
    rows.append([f"ensemble of {ens['models']} epoch checkpoints", ens["ensemble_mAP"], ens["ensemble_mAUC"],
                 ens["ensemble_dprime"],
                 "%.4f (%d checkpoints)" % PAPER_CHECKPOINT_ENSEMBLE.get(args.data, (0, 0))[::-1]])
    md = (f"# PSLA: {args.name}\n\nEfficientNet-B{args.effnet}, {args.heads} heads, {results['parameters']:,} "
          f"parameters; data {args.data} ({'synthetic' if corpus.synthetic else corpus.root}); ImageNet: "
          f"{args.imagenet or 'no'}; balanced sampling {args.balanced_sampling}; masking F={args.freqm} "
          f"T={args.timem}; mix-up rate {args.mixup}, alpha {args.mixup_alpha}; labels {args.label_enhance}; "
          f"{results['epochs']} epochs, {results['steps']} steps, {results['minutes']:.1f} min; validation "
          f"{'reached' if results['convergence']['plateau'] else 'did NOT reach'} a plateau.\n\nEval set. Paper "
          f"column: {args.data} AudioSet, EfficientNet-B2, the paper's row with the same techniques: {name}; WA and "
          f"checkpoint ensemble with all techniques (Tables IX, X).\n\n"
          + common.markdown_table(["model", "mAP", "mAUC", "d'", common.paper_heading(corpus, "paper mAP")], rows)
          + f"\n\nCheckpoint ensemble (Table X): {ens['models']} models, avg mAP {ens['avg_mAP']:.4f}, "
            f"best mAP {ens['best_mAP']:.4f}, ensemble mAP {ens['ensemble_mAP']:.4f}\n")
    if args.label_enhance != "none":
        le = results["label_enhancement"] = common.read_json(out / "label_enhancement.json")
        md += "\nLabel enhancement (Table VIII; precision/recall against the true labels where known):\n\n" + \
            common.markdown_table(["type", "impacted classes", "labels added %", "precision", "recall of missing"],
                                  [[k, le[k]["impacted_classes"], le[k]["labels_added_pct"],
                                    le[k].get("precision", "-"), le[k].get("recall_of_missing", "-")]
                                   for k in ("type1", "type2", "type12")])
    return common.report(out, results, md)


# =============================================================================================
# Sub-commands: tag a user's audio (predict), draw the ablation figure (plot)
# =============================================================================================
def predict_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
        "psla.py predict",
        ("Tag audio files with a trained psla.py model: the top classes of each file with their "
                    "probabilities. A file longer than the model's input (10.575 s for 1,056 frames) is cut into "
                    "consecutive windows of that length, each scored, and a class's score is its highest window's. "
                    "A model trained on the synthetic corpus knows only its toy classes (a warning says so)."))
    p.add_argument("files", nargs="+", metavar="AUDIO",
                   help="wav/flac/ogg files (any sample rate: resampled to 16 kHz; channels averaged)")
    p.add_argument("--ckpt", required=True,
                   help="a psla.py run folder (its final model: wa.pt, else last.pt), or one of its checkpoints "
                        "(wa.pt, best.pt, last.pt)")
    p.add_argument("--top", type=common.POSITIVE_INT, default=5, help="classes shown per file")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                   help="autocast precision of the backbone; auto = bf16 on CUDA, none elsewhere")
    return p


def checkpoint_labels(path: Path, info: dict, n_classes: int) -> tuple[list, list | None, bool]:
    """(class names, class ids or None, synthetic?) of a checkpoint: saved in it, or for one written
    before checkpoints held them, from its run folder (results.json's class names; the ids from the
    corpus named in config.json, when it is still there; data_root None = the synthetic corpus)."""
    if isinstance(info.get("labels"), dict):
        mids = list(info["labels"]["mids"])
        return list(info["labels"]["names"]), mids, common.synthetic_classes_warning(mids) is not None
    run = Path(path).parent
    res = common.read_json(run / "results.json", "results.json") if (run / "results.json").is_file() else {}
    names = res.get("classes")
    if not isinstance(names, list) or len(names) != n_classes:
        raise common.DataError(f"{path}: no class names in the checkpoint or in {run / 'results.json'} "
                               f"(a checkpoint of an unfinished run, or one moved out of its run folder)")
    ident = common.read_json(run / "config.json", "config.json").get("identity", {}) \
        if (run / "config.json").is_file() else {}
    csv = Path(str(ident.get("data_root", ""))) / "class_labels_indices.csv"
    mids = common.read_class_labels(csv).mids if ident.get("data_root") and csv.is_file() else None
    if mids is not None and len(mids) != n_classes:
        mids = None
    synthetic = (common.synthetic_classes_warning(mids) is not None if mids is not None
                 else res.get("config", {}).get("data_root", "") is None)  # no --data-root: the synthetic corpus
    return names, mids, synthetic


def predict_main(argv: list[str]) -> dict:
    """`python psla.py predict --ckpt RUN AUDIO ...`: print each file's top classes; returns
    {file: {"scores": (K,) clip scores, "windows": (W, K) window scores, "names": class names}}."""
    a = predict_parser().parse_args(argv)
    ckpt = teacher_file(Path(a.ckpt)) if Path(a.ckpt).is_dir() else Path(a.ckpt)
    config, weights, info = read_checkpoint(ckpt, meta=True)
    names, mids, synthetic = checkpoint_labels(ckpt, info, config["n_classes"])
    device = common.pick_device(a.device)
    model = build_model(config)
    common.load_weights(model, weights, ckpt)
    model.to(device).eval()
    amp = common.amp_dtype(device, a.amp)
    if synthetic:  # the line common.synthetic_classes_warning prints, also for ids not saved
        print(common.synthetic_classes_warning(mids or [f"/synth/{i}" for i in range(len(names))]))
    window, out = clip_samples(config["target_length"]), {}
    for path in a.files:
        wave = torch.from_numpy(common.load_audio(path))
        n = max(len(wave), FRAME_LENGTH)  # shorter than one frame: zero-padded to one
        starts = range(0, max(1, n - FRAME_LENGTH + 1), window)  # every window that holds a whole frame
        pieces = [wave[s: s + window] for s in starts]
        lengths = torch.tensor([max(len(x), FRAME_LENGTH) for x in pieces])
        batch = torch.stack([F.pad(x, (0, window - len(x))) for x in pieces])
        scores = []
        with torch.no_grad():
            for i in range(0, len(batch), 8):
                with common.autocast(device, amp):
                    scores.append(model(batch[i:i + 8].to(device), lengths[i:i + 8]).float().cpu())
        windows = torch.cat(scores).numpy()
        clip = windows.max(0)
        top = np.argsort(-clip, kind="stable")[:a.top]
        print(f"{path} ({len(wave) / common.SR:.1f} s, {len(windows)} window{'s' * (len(windows) > 1)}): "
              + ", ".join(f"{names[k]} {clip[k]:.2f}" for k in top))
        out[path] = {"scores": clip, "windows": windows, "names": names}
    return out


def paper_value(config: dict, what: str) -> tuple[float | None, str]:
    """The paper's eval mAP for one of our numbers, from the run's settings (results.json's config):
    'single' the row with the same techniques (Tables II-IV, VIII), 'wa' Table IX, 'checkpoints' and
    'seeds' Table X (WA and ensembles with every technique); (None, '') where the paper has none."""
    data = config.get("data", "balanced") if config.get("data") in ("balanced", "full") else "full"
    if what == "single":
        ns = argparse.Namespace(**{"imagenet": None, "balanced_sampling": None, "freqm": 0, "timem": 0,
                                   "mixup": 0.0, "label_enhance": "none", **config, "data": data})
        name, value = paper_row(ns)
        return (None, "") if value == "-" else (float(value), name.split(" (")[-1].rstrip(")"))
    if what == "wa":
        return PAPER_WA[data], "Table IX"
    if what == "checkpoints":
        return PAPER_CHECKPOINT_ENSEMBLE[data][1], f"Table X, {PAPER_CHECKPOINT_ENSEMBLE[data][0]} checkpoints"
    if what == "seeds":
        return PAPER_SEED_ENSEMBLE[data], "Table X, 3 seeds"
    return None, ""


def _run_config(run) -> dict:
    """A run's settings from its results.json ({} when it cannot be read: then no paper value)."""
    try:
        return common.read_json(Path(run) / "results.json", "results.json").get("config", {}) or {}
    except (common.DataError, OSError, AttributeError):
        return {}


def _folder_config(folder) -> dict:
    """The settings behind any plotted folder: a run's own, else the first run of an ensemble or seeds table."""
    if cfg := _run_config(folder):
        return cfg
    try:
        res = common.read_json(Path(folder) / "results.json", "results.json")
    except (common.DataError, OSError):
        return {}
    runs = res.get("runs") if isinstance(res.get("runs"), list) else next(
        (t["runs"] for t in res.values() if isinstance(t, dict) and t.get("runs")), [])
    return _run_config(runs[0]) if runs else {}


def plot_rows(folders: list[str]) -> list[dict]:
    """The figure's bars, from each folder's results.json: a psla.py run (single model, valid-selected,
    WA, checkpoint ensemble), a `psla.py ensemble` folder (the committee), or a `common.py seeds` folder
    (each row's mAP keys: mean and sample std over its seeds). Each: label, value, std, paper, source."""
    keyed = {"last_n.mAP": ("single model", "single"), "best.mAP": ("valid-selected", None),
             "wa.mAP": ("WA", "wa"), "checkpoint_ensemble.ensemble_mAP": ("checkpoint ensemble", "checkpoints")}
    rows = []
    for folder in map(Path, folders):
        res = common.read_json(folder / "results.json", "results.json (not a finished run?)")
        if "last_n" in res:  # a training run
            cfg, ens = res.get("config", {}), res["checkpoint_ensemble"]
            bars = [(f"single model (mean of last {cfg.get('last_n', '?')})", res["last_n"]["mAP"], "single"),
                    (f"valid-selected (epoch {res['best']['epoch']})", res["best"]["mAP"], None)]
            if "wa" in res:
                bars.append((f"WA (epochs {res['wa']['epochs'][0]}-{res['wa']['epochs'][1]})", res["wa"]["mAP"], "wa"))
            bars.append((f"checkpoint ensemble ({ens['models']})", ens["ensemble_mAP"], "checkpoints"))
            for label, value, what in bars:
                rows.append({"label": f"{folder.name}: {label}", "value": value, "std": None,
                             "paper": paper_value(cfg, what) if what else (None, "")})
        elif "ensemble_mAP" in res and "which" in res:  # `psla.py ensemble`
            configs = [_run_config(r) for r in res["runs"]]
            same = lambda c: {k: v for k, v in c.items() if k not in ("seed", "name", "out", "resume", "workers")}
            what = ("checkpoints" if res["which"] == "epochs" and len(res["runs"]) == 1 else
                    "seeds" if len(res["runs"]) == 3 and configs[0] and all(same(c) == same(configs[0])
                                                                             for c in configs) else None)
            rows.append({"label": f"{folder.name}: ensemble of {res['models']} ({res['which']} of "
                                  f"{len(res['runs'])} run{'s' * (len(res['runs']) > 1)})",
                         "value": res["ensemble_mAP"], "std": None,
                         "paper": paper_value(configs[0], what) if what else (None, "")})
        elif res and all(isinstance(t, dict) and "runs" in t for t in res.values()):  # `common.py seeds`
            for name, table in res.items():
                cfg = _run_config(table["runs"][0]) if table["runs"] else {}
                for key, values in table.items():
                    if key in ("runs", "minus_first") or not key.endswith("mAP") or not isinstance(values, list):
                        continue
                    label, what = keyed.get(key, (key, None))
                    rows.append({"label": f"{name}: {label} ({len(values)} seeds)", "value": float(np.mean(values)),
                                 "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                                 "paper": paper_value(cfg, what) if what and cfg else (None, "")})
        else:
            raise common.DataError(f"{folder}: not a psla.py run, `psla.py ensemble` or `common.py seeds` folder")
    return rows


def plot_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
        "psla.py plot",
        ("Draw the PSLA ablation (eval mAP of the single model, the valid-selected epoch, weight "
                    "averaging and the ensembles) from the results.json of psla.py runs, `psla.py ensemble` "
                    "folders and `python common.py seeds` folders (mean +- sample std over the seeds), with "
                    "the paper's value beside each bar where the paper has one (Tables II-IV, VIII-X)."))
    p.add_argument("runs", nargs="+", metavar="RUN", help="folders holding a results.json")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/ablation.png of the first RUN)")
    return p


def plot_main(argv: list[str]) -> dict:
    """`python psla.py plot RUN ... [--out PNG]`: one horizontal bar per number (ours), the paper's value
    as a grey bar beside it; returns {"figure": path, "rows": the bars}."""
    a = plot_parser().parse_args(argv)
    rows = plot_rows(a.runs)
    if not rows:
        raise common.DataError(f"{' '.join(a.runs)}: no mAP numbers to draw")
    cfg = next((c for c in map(_folder_config, a.runs) if c), {})
    data = cfg.get("data") or "balanced"
    corpus = ("" if not cfg else ", the synthetic corpus" if cfg.get("data_root") is None
              else f", {Path(str(cfg['data_root'])).name}")

    def draw(ax):
        ys = np.arange(len(rows), dtype=float)
        errs = [r["std"] or 0.0 for r in rows]
        ours = ax.barh(ys - 0.2, [r["value"] for r in rows], height=0.38, color="tab:blue",
                       xerr=errs if any(errs) else None, capsize=3, label=f"ours (eval mAP{corpus})")
        ax.bar_label(ours, fmt="%.3f", padding=3, fontsize=7)
        paper = [(y, r["paper"]) for y, r in zip(ys, rows) if r["paper"][0] is not None]
        if paper:
            bars = ax.barh([y + 0.2 for y, _ in paper], [v for _, (v, _) in paper], height=0.38, color="0.7",
                           hatch="//", label=f"paper ({data} AudioSet, B2; WA, ensembles: all techniques)")
            ax.bar_label(bars, labels=[f"{v:.3f} ({src})" for _, (v, src) in paper], padding=3, fontsize=7)
        ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("eval mAP")
        ax.set_xlim(0, min(1.0, 1.7 * max([r["value"] + (r["std"] or 0) for r in rows]
                                           + [v for _, (v, _) in paper])))
        ax.set_title("PSLA ablation: single model, weight averaging (WA), ensembles", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(rows)), ncol=2)
    out = Path(a.out or Path(a.runs[0]) / "ablation.png")
    common.figure(out, draw, size=(9, 1.6 + 0.55 * len(rows)))
    print(f"(peak memory {common.peak_memory_gb():.1f} GB)")
    return {"figure": str(out), "rows": rows}


SUBCOMMANDS = {"ensemble": ("ensemble_main", "ensemble_parser"), "predict": ("predict_main", "predict_parser"),
               "plot": ("plot_main", "plot_parser")}


def parse_command(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """(command, its parsed flags) of a psla.py command line, without running it: 'train' (the default
    command) or a sub-command (ensemble, predict, plot). Usage errors exit as argparse does."""
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return argv[0], globals()[SUBCOMMANDS[argv[0]][1]]().parse_args(argv[1:])
    return "train", parse_args(argv)


# =============================================================================================
# main: [teacher -> label enhancement] -> train -> weight averaging -> ensembles -> report
# =============================================================================================
def run_identity(args, corpus: common.Corpus) -> dict:
    """Every result-affecting setting: the flags (--save-every changes no result) and the corpus as a path."""
    return common.identity(args, ignore=("save_every",)) | {"data_root": str(corpus.root.resolve())}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:  # ensemble, predict, plot
        return globals()[SUBCOMMANDS[argv[0]][0]](argv[1:])
    args = parse_args(argv)
    with common.distributed():
        corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
        resolve_schedule(args, corpus.root)
        device, amp = common.setup_device(args)
        out, key = Path(args.out), teacher_identity(args, corpus)  # a bad --teacher: one line, before any work
        with common.claim_run(out, "psla", run_identity(args, corpus) | {"teacher": key}, args.resume, OUTPUTS):
            if args.resume and (out / "results.json").exists():  # finished with these very settings
                return common.read_json(out / "results.json")
            rows = corpus.train
            if args.label_enhance != "none":
                teacher_ckpt = teacher(args, corpus, key, device, amp)                  # Sec. V: the teacher
                rows = label_enhancement(args, corpus, teacher_ckpt, out, device, amp)  # Algorithm 2
            trained = train(args, corpus, rows, out, device, amp)  # Sec. II-B with III, IV (Algorithm 1)
            wa = weight_averaging(args, corpus, out, trained, device, amp)  # Sec. VI-A
            ens = ensembles(out, trained["history"])  # Sec. VI-B
            return write_report(args, corpus, out, trained, wa, ens)


if __name__ == "__main__":
    common.cli(main)
