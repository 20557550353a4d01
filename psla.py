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

    python psla.py                                          # synthetic corpus, B2, masking + mix-up + WA (5 min)
    python psla.py --effnet 0 --no-mixup --name mask        # one ablation row (see README for all)
    python psla.py --label-enhance type12 --teacher runs/psla/mixup --name le   # Sec. V, Table VIII
    python psla.py ensemble runs/psla/le_s0 runs/psla/le_s1 runs/psla/le_s2     # Table X
    python psla.py seeds --row base runs/psla/b_s0 runs/psla/b_s1 --row le runs/psla/le_s0 ...  # mean +- std
    python psla.py --data-root data/audioset --data full --imagenet url         # the paper's recipe
The default command is a pipeline check; README's "direction run" (a 5 s-clip B0 preset, 20 epochs,
every ablation row x 3 seeds) is the run that says which claims hold.

Deviations from the paper and the official code (numbered as in the README):
 1. The synthetic default trains from scratch (no ImageNet weights exist offline); the paper's
    path is `--imagenet PATH|url` (torchvision's published EfficientNet weights, not the
    efficientnet_pytorch files the authors used; same architecture and parameter count).
 2. On the synthetic corpus the schedule is scaled to a CPU budget, keeping its shape: 6 epochs,
    batch 16, LR halved every epoch after epoch 3, WA over epochs 5-6 (LR at 1/4), 9 warm-up steps,
    "single model" = mean of the last 2 epochs.
    The paper's values (60/30 epochs, batch 100, halving every 5 after 35/10, 1,000 warm-up
    steps) apply on real data or when given as flags.
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
"""
from __future__ import annotations

import argparse
import json
import math
import sys
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--teacher", type=str, default=None, help="run folder of the teacher model (its wa.pt or last.pt)")
    g = p.add_argument_group("optimisation (Sec. II-B); unset = the paper's values, scaled on the synthetic corpus")
    g.add_argument("--epochs", type=common.POSITIVE_INT, default=None, help="60 balanced / 30 full")
    g.add_argument("--batch-size", type=common.POSITIVE_INT, default=None, help="100")
    g.add_argument("--lr", type=common.POSITIVE, default=None, help="1e-3 balanced / 1e-4 full")
    g.add_argument("--lr-decay-start", type=common.NONNEG_INT, default=None,
                   help="halve the LR after this epoch (35 / 10)")
    g.add_argument("--lr-decay-every", type=common.POSITIVE_INT, default=None,
                   help="... and every this many epochs (5)")
    g.add_argument("--warmup-steps", type=common.NONNEG_INT, default=None, help="linear LR warm-up iterations (1000)")
    g.add_argument("--weight-decay", type=common.NONNEG, default=5e-7, help="Adam weight decay")
    g.add_argument("--betas", type=common.number(float, 0, 1, hi_open=True), nargs=2, default=(0.95, 0.999),
                   help="Adam betas")
    g = p.add_argument_group("aggregation (Sec. VI)")
    g.add_argument("--wa-start", type=common.POSITIVE_INT, default=None,
                   help="weight averaging from this epoch to the last (default: the first epoch at 1/4 LR)")
    g.add_argument("--last-n", type=common.POSITIVE_INT, default=None,
                   help="report the mean eval metrics of the last n epochs (5)")
    args = p.parse_args(argv)
    if args.label_enhance != "none" and args.teacher is None:
        p.error("--label-enhance needs --teacher RUN_DIR")
    if args.norm is not None and args.norm[1] <= 0:
        p.error(f"--norm: the std must be positive, got {args.norm[1]}")
    return args


def resolve_schedule(args: argparse.Namespace, synthetic: bool, root: Path | None = None) -> None:
    """Derived values, computed once: unset optimisation flags take the paper's (or scaled) values."""
    preset = SYNTH_SCHEDULE if synthetic else PAPER_SCHEDULE[args.data]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
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
    Workers start from a fork server (Linux), not from this process (issue 12): the training loader
    starts fresh workers every epoch (exact resume), and forked from a process whose heap holds GBs
    of freed activations they share it copy-on-write, so the next steps copy every page they write
    (1.2-1.7x a bare step over a 6-step epoch, README) and a fork can keep a stale copy of the heap
    alive. Same seeds, same batches."""
    return common.make_loader(dataset, batch_size, workers=workers, collate_fn=collate, context=worker_context(), **kw)


def worker_context():
    """The fork server, preloading this module (under `python psla.py` also as __main__), so that
    a worker starts as a fork of a small process that has imported torch already."""
    if not sys.platform.startswith("linux"):
        return None  # macOS and Windows spawn workers anyway
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


class MixupClips(torch.utils.data.Dataset):
    """Algorithm 1: with probability `rate`, mix clip i with a partner j drawn uniformly from the
    whole set (not from the balanced sampler), lam ~ Beta(alpha, alpha), on the waveform before the
    fbank; labels are mixed with the same lam."""

    def __init__(self, clips: Clips, rate: float, alpha: float):
        self.clips, self.rate, self.alpha = clips, rate, alpha

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int):
        item = self.clips[i]
        if item is None or self.rate <= 0 or np.random.rand() >= self.rate:
            return item
        partner = self.clips[np.random.randint(len(self.clips))]
        if partner is None:
            return item
        lam = float(np.random.beta(self.alpha, self.alpha))
        # Clips of different lengths: the partner is cut or zero-padded to clip i's length, as in the
        # official dataloader, so the mix has clip i's length and real frames; a shorter partner is
        # silence inside the mix (its fbank is real audio), never padding that the model zeroes.
        n = len(item[0])
        other = F.pad(partner[0][:n], (0, max(0, n - len(partner[0]))))
        return lam * item[0] + (1 - lam) * other, lam * item[1] + (1 - lam) * partner[1], item[2]


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


# =============================================================================================
# Training and evaluation (Sec. II-B)
# =============================================================================================
def learning_rate(args, epoch: int, step: int) -> float:
    """Constant, halved every lr_decay_every epochs after epoch lr_decay_start (epochs count from 1),
    times a smooth linear warm-up over the first warmup_steps iterations."""
    decays = max(0, (epoch - args.lr_decay_start - 1) // args.lr_decay_every + 1)
    return args.lr * 0.5 ** decays * min(1.0, (step + 1) / max(1, args.warmup_steps))


def train_epoch(model, loader, optimizer, args, epoch: int, step: int, device, amp,
                scaler=None) -> tuple[int, float, int, int]:
    """One pass over the loader; returns (global step, mean loss, unreadable clips skipped, clips
    shorter than --short-clip-seconds)."""
    model.train()
    losses, skipped, short, n = [], 0, 0, len(loader.sampler)
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=not common.is_main())
    for j, batch in enumerate(bar):
        planned = min(loader.batch_size, n - j * loader.batch_size)
        skipped += planned - (0 if batch is None else len(batch[2]))  # unreadable clips: skipped, counted
        if batch is None:  # a whole batch of unreadable clips
            continue
        wave, target, n_samples = batch[0].to(device), batch[1].to(device), batch[3]
        short += int(is_short(n_samples, args.short_clip_seconds, args.target_length).sum())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch, step)
        with common.autocast(device, amp):
            out = model(wave, n_samples)
        # BCE on the clamped attention output: the head weights are unconstrained (official code)
        loss = F.binary_cross_entropy(out.float().clamp(1e-7, 1 - 1e-7), target)
        optimizer.zero_grad(set_to_none=True)
        scaler = scaler or common.grad_scaler(device, amp)  # loss scaling for fp16 only
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        step += 1
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if args.max_steps and step >= args.max_steps:
            break
    return step, float(np.mean(losses)) if losses else float("nan"), skipped, short


@torch.no_grad()
def predict(model, loader, n: int, n_classes: int, device, amp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N, K) in dataset order, batched, from a `clip_loader` (the training padding); a mask of
    the clips that could be read; each clip's length in samples as read (0 if unreadable)."""
    model.eval()
    scores, ok, lengths = np.zeros((n, n_classes), dtype=np.float32), np.zeros(n, dtype=bool), np.zeros(n, np.int64)
    for batch in tqdm(loader, desc="predict", leave=False, disable=not common.is_main()):
        if batch is None:
            continue
        wave, _, idx, n_samples = batch
        with common.autocast(device, amp):
            out = model(wave.to(device), n_samples)
        scores[idx.numpy()], ok[idx.numpy()], lengths[idx.numpy()] = out.float().cpu().numpy(), True, n_samples.numpy()
    return scores, ok, lengths


def is_short(n_samples, seconds: float, target_length: int):
    """Clips (lengths as read, cut to target_length's samples) shorter than `seconds`: counted, not
    dropped (they are padded). A clip that was cut is never short: with a minimum above the target
    length's duration, the clips shorter than the latter are counted."""
    return n_samples < min(seconds * common.SR, clip_samples(target_length))


def short_clips(ok: np.ndarray, lengths: np.ndarray, args, target_length: int | None = None) -> int:
    """Readable clips shorter than --short-clip-seconds."""
    return int((ok & is_short(lengths, args.short_clip_seconds, target_length or args.target_length)).sum())


def metrics(targets: np.ndarray, scores: np.ndarray, ok: np.ndarray | None = None) -> dict:
    ok = np.ones(len(targets), bool) if ok is None else ok
    return common.tagging_metrics(targets[ok], scores[ok])


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


def teacher_checkpoint(args) -> tuple[Path, dict]:
    """The teacher run's wa.pt (else last.pt), checked to be a psla.py checkpoint."""
    ckpt = next((Path(args.teacher) / f for f in ("wa.pt", "last.pt") if (Path(args.teacher) / f).exists()), None)
    if ckpt is None:
        raise common.DataError(f"--teacher {args.teacher}: no wa.pt or last.pt (not a psla.py run, or unfinished)")
    saved = common.load_checkpoint(ckpt)
    if not isinstance(saved, dict) or "config" not in saved or "model" not in saved:
        raise common.DataError(f"--teacher {args.teacher}: {ckpt.name} is not a psla.py checkpoint"
                               + (" (a psl.py one)" if isinstance(saved, dict) and "state" in saved else ""))
    return ckpt, saved


def label_enhancement(args, corpus: common.Corpus, out: Path, device, amp) -> list:
    """Sec. V: score the training clips with the teacher, enhance their labels (Types I, II and
    both, for Table VIII), write the chosen set as a manifest and return its rows."""
    path = out / f"train_{args.label_enhance}.tsv"
    if path.exists() and args.resume:
        return common.read_manifest(path)
    ckpt, saved = teacher_checkpoint(args)
    teacher = build_model(saved["config"]).to(device)
    teacher.load_state_dict(saved["model"])
    targets = corpus.targets(corpus.train)
    ds = Clips(corpus.root, corpus.train, targets, saved["config"]["target_length"])
    scores, ok, lengths = predict(teacher, clip_loader(ds, 2 * args.batch_size, args.workers),
                                  len(ds), len(corpus.labels), device, amp)
    # the truth files (*_true.tsv), synthetic or not, tell whether the added labels were right
    true = corpus.true_targets(corpus.train) if all(fn in corpus.true for fn, _ in corpus.train) else None
    stats = {}
    for kind in ("type1", "type2", "type12"):  # Table VIII columns
        enhanced, _ = enhance_labels(scores, targets, corpus.labels, corpus.ontology, kind, ok)
        added = (enhanced > 0) & (targets == 0)
        s = {"impacted_classes": int(added.any(0).sum()), "labels_added": int(added.sum()),
             "labels_added_pct": 100.0 * added.sum() / targets.sum()}
        if true is not None:  # the synthetic corpus knows the truth: were the added labels right?
            missing = (true > 0) & (targets == 0)
            s["precision"] = float((added & (true > 0)).sum() / max(1, added.sum()))
            s["recall_of_missing"] = float((added & missing).sum() / max(1, missing.sum()))
        stats[kind] = s
        if kind == args.label_enhance:
            rows = [(fn, [corpus.labels.mids[j] for j in np.flatnonzero(e)])
                    for (fn, _), e in zip(corpus.train, enhanced)]
    print(f"label enhancement with teacher {ckpt} (Table VIII):")
    for kind, s in stats.items():
        print(f"  {kind:7s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    short = short_clips(ok, lengths, args, saved["config"]["target_length"])
    common.write_json(out / "label_enhancement.json", {"teacher": str(ckpt), "chosen": args.label_enhance,
                                                        "skipped_clips": int((~ok).sum()), "short_clips": short,
                                                        **stats})
    common.write_manifest(path, rows)
    return rows


def weight_average(out: Path, epochs: range) -> dict:
    """Sec. VI-A: the plain mean of the weights (and BN statistics) of the given epochs, each once."""
    return common.average_state_dicts([out / "weights" / f"e{e:03d}.pt" for e in epochs])


def ensemble(preds: list[np.ndarray], targets: np.ndarray) -> dict:
    """Sec. VI-B: average the probability predictions of a committee; Table X's columns."""
    maps = [metrics(targets, p)["mAP"] for p in preds]
    m = metrics(targets, common.ensemble_predictions(preds))
    return {"models": len(preds), "avg_mAP": float(np.mean(maps)), "best_mAP": float(np.max(maps)),
            "ensemble_mAP": m["mAP"], "ensemble_mAUC": m["mAUC"], "ensemble_dprime": m["dprime"]}


def ensemble_main(argv: list[str]) -> dict:
    """`python psla.py ensemble RUN [RUN ...]`: committees from runs' saved eval predictions."""
    p = argparse.ArgumentParser(prog="psla.py ensemble", description="Table X: ensembles of saved predictions")
    p.add_argument("runs", nargs="+", help="run folders (each has preds/)")
    p.add_argument("--which", default="last", choices=["last", "wa", "best", "epochs"],
                   help="per run: the last epoch (Sec. VI-B2), the WA model, the valid-selected epoch, "
                        "or every epoch's checkpoint (VI-B1)")
    p.add_argument("--out", default=None, help="folder for results.json/.md (default runs/psla/ensemble_<which>)")
    a = p.parse_args(argv)
    preds, targets = [], None
    for run in map(Path, a.runs):
        if not (run / "preds" / "eval_targets.npy").exists() or not (run / "results.json").exists():
            raise common.DataError(f"{run}: not a finished psla.py run (no results.json and preds/)")
        res = json.loads((run / "results.json").read_text())
        t = np.load(run / "preds" / "eval_targets.npy")
        if targets is not None and t.shape != targets.shape:
            raise common.DataError(f"{run}: evaluated on a different eval set than {a.runs[0]}")
        targets = t
        names = {"last": [f"eval_e{res['epochs']:03d}"], "wa": ["eval_wa"], "best": [f"eval_e{res['best_epoch']:03d}"],
                 "epochs": [f"eval_e{e:03d}" for e in range(1, res["epochs"] + 1)]}[a.which]
        preds += [np.load(run / "preds" / f"{n}.npy") for n in names]
    row = ensemble(preds, targets)
    out = Path(a.out or f"runs/psla/ensemble_{a.which}")
    out.mkdir(parents=True, exist_ok=True)
    md = common.markdown_table(["committee", "# models", "avg mAP", "best mAP", "ensemble mAP", "mAUC", "d'"],
                               [[f"{a.which} of {len(a.runs)} run(s)", row["models"], row["avg_mAP"], row["best_mAP"],
                                 row["ensemble_mAP"], row["ensemble_mAUC"], row["ensemble_dprime"]]])
    common.write_results(out, {"runs": a.runs, "which": a.which, **row}, "# PSLA ensemble (Table X)\n\n" + md)
    print(md)
    return row


def seeds_main(argv: list[str]) -> dict:
    """`python psla.py seeds --row NAME RUN [RUN ...] ...`: a direction-run table, one row per setting,
    mean +- sample std over its runs (seeds) of the single model, the WA model and the valid-selected
    epoch, the paired gain of WA over the single model, and the committee of the runs' last epochs."""
    p = argparse.ArgumentParser(prog="psla.py seeds", description="mean +- std over seeds, one row per setting")
    p.add_argument("--row", nargs="+", action="append", required=True, metavar=("NAME", "RUN"),
                   help="a row name followed by its run folders (one per seed)")
    p.add_argument("--out", default="runs/psla/seeds", help="folder for results.json/.md")
    a = p.parse_args(argv)
    ms = common.mean_std
    table, out_rows = {}, []
    for name, *runs in a.row:
        if not runs:
            raise common.DataError(f"--row {name}: no run folders")
        res = []
        for run in map(Path, runs):
            if not (run / "results.json").exists():
                raise common.DataError(f"{run}: not a finished psla.py run (no results.json)")
            res.append(json.loads((run / "results.json").read_text()))
        single = [r["last_n"]["mAP"] for r in res]
        wa = [r["wa"]["mAP"] for r in res if "wa" in r]
        best = [r["best"]["mAP"] for r in res]
        valid_epoch = [r["best_epoch"] for r in res]
        committee = ensemble([np.load(Path(run) / "preds" / f"eval_e{r['epochs']:03d}.npy") for run, r in zip(runs, res)],
                             np.load(Path(runs[0]) / "preds" / "eval_targets.npy"))
        table[name] = {"runs": runs, "single_mAP": single, "wa_mAP": wa, "best_mAP": best, "best_epoch": valid_epoch,
                       "wa_minus_single": [w - s for w, s in zip(wa, single)] if len(wa) == len(single) else [],
                       "seed_ensemble": committee}
        t = table[name]
        out_rows.append([name, len(runs), ms(single), ms(wa) if wa else "-", ms(t["wa_minus_single"]) if t["wa_minus_single"]
                         else "-", ms(best), " ".join(map(str, valid_epoch)), f"{committee['ensemble_mAP']:.4f}"])
    md = common.markdown_table(["setting", "seeds", "single model mAP", "WA mAP", "WA - single (paired)",
                                "valid-selected mAP", "best epochs", "ensemble of the seeds"], out_rows)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    common.write_results(Path(a.out), table, "# PSLA direction run: mean +- std over seeds (eval mAP)\n\n" + md)
    print(md)
    return table


def paper_row(args) -> tuple[str, str]:
    """The paper's row with the same techniques as this run (masking/mix-up by their flags)."""
    key = (bool(args.imagenet), True if args.balanced_sampling and args.data != "balanced" else None,
           bool(args.freqm or args.timem), args.mixup > 0, args.label_enhance)
    name, balanced, full = PAPER_ROWS.get(key, ("no matching row in the paper", None, None))
    value = balanced if args.data == "balanced" else full
    return name, "-" if value is None else f"{value:.4f}"


# =============================================================================================
# main: [label enhancement] -> train (per-epoch valid/eval) -> weight averaging -> results
# =============================================================================================
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ensemble"]:
        return ensemble_main(argv[1:])
    if argv[:1] == ["seeds"]:
        return seeds_main(argv[1:])
    args = parse_args(argv)
    common.seed_everything(args.seed)
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    resolve_schedule(args, corpus.synthetic, corpus.root)
    settings = run_identity(args, corpus)
    if args.teacher:
        teacher_checkpoint(args)  # a bad --teacher fails before anything is written
    with common.RunLock(args.out):  # a second run on this folder is refused while this one runs
        common.claim_run_folder(args.out, settings, args.resume)
        return train_and_evaluate(args, corpus, settings)


def run_identity(args, corpus: common.Corpus) -> dict:
    """Every result-affecting setting of this run, the corpus as a resolved path, and the teacher
    (its own identity, or its checkpoint file's size and time) for label enhancement."""
    settings = common.run_settings(args) | {"data_root": str(corpus.root.resolve())}
    if args.teacher:
        t = Path(args.teacher)
        cfg = t / "config.json"
        settings["teacher"] = str(t.resolve())
        settings["teacher_identity"] = (json.loads(cfg.read_text()).get("identity_hash") if cfg.exists() else None) \
            or [(f, (t / f).stat().st_size, (t / f).stat().st_mtime_ns) for f in ("wa.pt", "last.pt")
                if (t / f).exists()]
    return settings


def train_and_evaluate(args, corpus: common.Corpus, settings: dict) -> dict:
    device = common.pick_device(args.device)
    amp = common.amp_dtype(device, args.amp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preds").mkdir(exist_ok=True)
    log = common.RunLogger(out)
    t0 = time.time()

    # ---- training labels: original, or enhanced by a teacher (Sec. V)
    train_rows = corpus.train if args.label_enhance == "none" else label_enhancement(args, corpus, out, device, amp)
    train_targets = corpus.targets(train_rows)

    # ---- model (Sec. II-C) with fbank statistics (deviation 6) and optional ImageNet init (Sec. III)
    last = out / "last.pt"
    state = common.load_checkpoint(last) if args.resume and last.exists() else None
    if state is not None:
        config = state["config"]
    else:
        norm = args.norm or (AUDIOSET_NORM if len(corpus.labels) == 527 else fbank_statistics(corpus, args, device))
        config = dict(n_classes=len(corpus.labels), effnet=args.effnet, heads=args.heads, n_mels=args.n_mels,
                      target_length=args.target_length, norm=tuple(norm), freqm=args.freqm, timem=args.timem,
                      drop_connect=args.drop_connect)
    args.norm = list(config["norm"])
    common.save_config(out, args, settings)
    model = build_model(config).to(device)
    if state is None and args.imagenet:
        load_imagenet(model, args.imagenet)
    print(f"EfficientNet-B{args.effnet} + {args.heads}-head attention, {len(corpus.labels)} classes: "
          f"{count_parameters(model):,} parameters; fbank mean/std {config['norm'][0]:.4f}/{config['norm'][1]:.4f}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                 weight_decay=args.weight_decay)
    scaler = common.grad_scaler(device, amp)  # fp16 loss scaling (a no-op otherwise)

    # ---- data: Algorithm 1 (balanced sampling, mix-up) + valid/eval loaders
    clips = Clips(corpus.root, train_rows, train_targets, args.target_length)
    train_set = MixupClips(clips, args.mixup, args.mixup_alpha)
    sampler = common.WeightedSampler(common.generate_sampling_weights(train_targets), seed=args.seed) \
        if args.balanced_sampling else None
    train_loader = clip_loader(train_set, args.batch_size, args.workers, sampler=sampler, shuffle=sampler is None,
                               seed=args.seed, persistent=False)
    splits = {"eval": corpus.eval} | ({"valid": corpus.valid} if corpus.valid else {})
    eval_sets = {k: (clip_loader(Clips(corpus.root, rows, corpus.targets(rows), args.target_length),
                                 2 * args.batch_size, args.workers), corpus.targets(rows))
                 for k, rows in splits.items()}
    np.save(out / "preds" / "eval_targets.npy", eval_sets["eval"][1])

    # ---- training (Sec. II-B), resumable per epoch
    epoch0, step, history, minutes0 = 0, 0, [], 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch0, step, history = state["epoch"], state["step"], state["history"]
        minutes0 = state.get("minutes", 0.0)  # time of the earlier attempts
        common.set_rng_state(state.get("rng"))  # masking, mix-up, drop-connect continue exactly
        if history:  # the line of this checkpoint, if a kill came between last.pt and the log
            log.log_once(history[-1], ("epoch",))
        print(f"resumed from {last} at epoch {epoch0}")
    for epoch in range(epoch0 + 1, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(args.seed * 100_003 + epoch)  # the epoch's order, resume-safe
        lr = learning_rate(args, epoch, step)
        step, loss, skipped, short = train_epoch(model, train_loader, optimizer, args, epoch, step, device, amp, scaler)
        record = {"epoch": epoch, "step": step, "lr": lr, "train/loss": loss, "train/skipped": skipped,
                  "train/short": short}
        for split, (loader, targets) in eval_sets.items():
            scores, ok, lengths = predict(model, loader, len(targets), len(corpus.labels), device, amp)
            m = metrics(targets, scores, ok)
            record |= {f"{split}/mAP": m["mAP"], f"{split}/mAUC": m["mAUC"], f"{split}/dprime": m["dprime"],
                       f"{split}/skipped": int((~ok).sum()), f"{split}/short": short_clips(ok, lengths, args)}
            if split == "eval":
                np.save(out / "preds" / f"eval_e{epoch:03d}.npy", scores)
        history.append(record)
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step,
                "history": history, "config": config, "args": vars(args)}
        if epoch >= args.wa_start:
            common.save_checkpoint(out / "weights" / f"e{epoch:03d}.pt", {"model": model.state_dict()})
        select = "valid/mAP" if "valid" in eval_sets else "train/loss"  # never the eval set
        best = max(history, key=lambda r: r[select] if select != "train/loss" else -r[select])
        if best["epoch"] == epoch:
            common.save_checkpoint(out / "best.pt", {**ckpt, "optimizer": None})
        common.save_checkpoint(last, {**ckpt, "rng": common.rng_state(), "minutes": minutes0 + (time.time() - t0) / 60})
        log.log(record)  # after last.pt: a kill in between loses this line, never doubles it
        if args.max_steps and step >= args.max_steps:
            break
    epochs_done = history[-1]["epoch"]

    # ---- weight averaging (Sec. VI-A): every epoch from the one where the LR fell to 1/4
    wa_epochs = range(args.wa_start, epochs_done + 1)
    results = {}
    if len(wa_epochs) and all((out / "weights" / f"e{e:03d}.pt").exists() for e in wa_epochs):
        model.load_state_dict(weight_average(out, wa_epochs))
        common.save_checkpoint(out / "wa.pt", {"model": model.state_dict(), "config": config, "args": vars(args),
                                               "epochs": list(wa_epochs)})
        loader, targets = eval_sets["eval"]
        scores, ok, _ = predict(model, loader, len(targets), len(corpus.labels), device, amp)
        np.save(out / "preds" / "eval_wa.npy", scores)
        results["wa"] = metrics(targets, scores, ok) | {"epochs": [wa_epochs.start, wa_epochs.stop - 1]}

    # ---- results: mean of the last n epochs (the paper's single model), valid-selected epoch, WA,
    #      checkpoint ensemble of every epoch (Table X, upper part)
    targets = eval_sets["eval"][1]
    lastn = history[-args.last_n:]
    results["last_n"] = {k: float(np.mean([r[f"eval/{k}"] for r in lastn])) for k in ("mAP", "mAUC", "dprime")}
    results["last_n"]["mAP_std"] = float(np.std([r["eval/mAP"] for r in lastn]))
    best = max(history, key=lambda r: r.get("valid/mAP", -r["train/loss"]))
    preds = [np.load(out / "preds" / f"eval_e{r['epoch']:03d}.npy") for r in history]
    results["best"] = {"epoch": best["epoch"], **{k: best[f"eval/{k}"] for k in ("mAP", "mAUC", "dprime")}}
    results["checkpoint_ensemble"] = ensemble(preds, targets)
    results["last_AP"] = metrics(targets, preds[-1])["AP"]
    results |= {"epochs": epochs_done, "best_epoch": best["epoch"], "steps": step,
                "parameters": count_parameters(model),
                "classes": corpus.labels.names, "minutes": minutes0 + (time.time() - t0) / 60, "config": vars(args),
                "skipped_clips": {k.split("/")[0]: v for k, v in history[-1].items() if k.endswith("/skipped")},
                "short_clips": {k.split("/")[0]: v for k, v in history[-1].items() if k.endswith("/short")},
                "short_clip_seconds": args.short_clip_seconds}
    if args.label_enhance != "none":
        results["label_enhancement"] = json.loads((out / "label_enhancement.json").read_text())
    name, paper = paper_row(args)
    rows = [[f"single model, mean of last {len(lastn)} epochs", results["last_n"]["mAP"], results["last_n"]["mAUC"],
             results["last_n"]["dprime"], paper],
            [f"valid-selected epoch {best['epoch']}", results["best"]["mAP"], results["best"]["mAUC"],
             results["best"]["dprime"], "-"]]
    if "wa" in results:
        rows.append([f"weight averaging, epochs {wa_epochs.start}-{wa_epochs.stop - 1}", results["wa"]["mAP"],
                     results["wa"]["mAUC"], results["wa"]["dprime"], PAPER_WA.get(args.data, "-")])
    ce = results["checkpoint_ensemble"]
    rows.append([f"ensemble of {ce['models']} epoch checkpoints", ce["ensemble_mAP"], ce["ensemble_mAUC"],
                 ce["ensemble_dprime"],
                 "%.4f (%d checkpoints)" % PAPER_CHECKPOINT_ENSEMBLE.get(args.data, (0, 0))[::-1]])
    md = (f"# PSLA: {args.name}\n\nEfficientNet-B{args.effnet}, {args.heads} heads, "
          f"{results['parameters']:,} parameters; "
          f"data {args.data} ({'synthetic' if corpus.synthetic else corpus.root}); ImageNet: {args.imagenet or 'no'}; "
          f"balanced sampling {args.balanced_sampling}; masking F={args.freqm} T={args.timem}; mix-up rate "
          f"{args.mixup}, alpha {args.mixup_alpha}; labels {args.label_enhance}; {epochs_done} epochs, {step} steps, "
          f"{results['minutes']:.1f} min.\n\nEval set. Paper column: {args.data} AudioSet, EfficientNet-B2, "
          f"the paper's row with the same techniques: {name}; WA and checkpoint ensemble with all techniques "
          f"(Tables IX, X).\n\n"
          + common.markdown_table(["model", "mAP", "mAUC", "d'", common.paper_heading(corpus, "paper mAP")], rows)
          + f"\n\nCheckpoint ensemble (Table X): {ce['models']} models, avg mAP {ce['avg_mAP']:.4f}, "
            f"best mAP {ce['best_mAP']:.4f}, ensemble mAP {ce['ensemble_mAP']:.4f}\n")
    if args.label_enhance != "none":
        le = results["label_enhancement"]
        md += "\nLabel enhancement (Table VIII; precision/recall against the true labels where known):\n\n" + \
            common.markdown_table(["type", "impacted classes", "labels added %", "precision", "recall of missing"],
                                  [[k, le[k]["impacted_classes"], le[k]["labels_added_pct"],
                                    le[k].get("precision", "-"), le[k].get("recall_of_missing", "-")]
                                   for k in ("type1", "type2", "type12")])
    common.write_results(out, results, md)
    print(md)
    return results


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:  # bad input: one line, non-zero exit
        sys.exit(f"error: {e}")
