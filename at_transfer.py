"""An empirical study of weakly supervised audio tagging embeddings for general audio representations.
Heinrich Dinkel, Zhiyong Yan, Yongqing Wang, Junbo Zhang, Yujun Wang (Xiaomi), 2022.

What is reproduced: an upstream audio-tagging CNN (MobileNetV2 or EfficientNet-B0 on 64-bin log-mels,
per-frame sigmoid outputs, decision-level mean pooling; Sec. 3, Table 2) is trained on AudioSet (or the
synthetic corpus), then every downstream task is trained three ways (Sec. 4.2.2, Table 3): from scratch,
frozen (the backbone in eval mode, only a new per-frame linear head is trained; embeddings are computed
once and cached) and fine-tuned (all weights). The embeddings are also exposed through the HEAR 2021 API
(load_model, get_scene_embeddings, get_timestamp_embeddings) and an `embed` command.

Paper, Table 2 (AudioSet eval): MBv2 3.0 M params, mAP 40.6, mAUC 97.1, d' 2.695; Eff-B0 4.6 M, 41.7 / 96.4 /
2.546. Table 3 pattern: frozen beats scratch on every sound task (e.g. ESC-50 59.90 -> 92.20), frozen is far
worse on speech (SPCV2 96.18 -> 49.13), fine-tuning beats scratch on speech by 0.3-0.7 points (VL: scratch wins).

    python at_transfer.py                                   # CPU preset: upstream + synthetic suite, 3 modes
    python at_transfer.py --upstream-ckpt runs/psl/dir_ma/final.pt --task-scale 0.4 --epochs 24 --patience 6 \
        --trials 3 --name direction                          # the direction run (README): a converged psl.py MA
    python at_transfer.py --task-root data/tasks --upstream both --preset paper   # converted public datasets
    python at_transfer.py --upstream-ckpt runs/psl/teacher_full_synth_<hash>/final.pt    # a psl.py MA as upstream
    python at_transfer.py embed --ckpt runs/at_transfer/upstream_mbv2_full_synth_cpu/final.pt a.wav b.wav

Deviations from the paper (numbered as in the README):
 1. The upstream validates on the held-out valid.tsv; the paper evaluates its checkpoints on the balanced
    subset, which is inside the full training set (`--valid-on train`).
 2. CPU preset (`--preset cpu`, the default on the synthetic corpus without a GPU): upstream 3 epochs,
    validation twice per epoch, lr 1e-3 (psl.py deviation 4: 1e-4 barely moves in a few epochs);
    scratch/fine-tune at most 12 epochs, patience 4, lr 1e-3, batch 16 (the tasks at scale 0.2 have 60-308
    training clips: at batch 64 an epoch is 1-5 steps); frozen at most 500 epochs, patience 50 (a linear
    head on cached embeddings: seconds); k-fold tasks run the first HEAR split only (`--folds 1`);
    1 trial (a pipeline check: results need the direction run's 3 trials, README).
    `--preset paper` gives every value of Sec. 4.2.
 3. Not given in the paper, our choices: 2 SpecAugment masks per axis (widths 96 / 12 are the paper's);
    the downstream head is a plain Linear (no dropout); scores of single-label tasks are the softmax of the
    mean frame logits; the synthetic tasks' speech-like classes define the "speech" rows.
 4. Evaluation stacks equal-length clips into one batch (no padding) instead of batch size 1: identical
    results in eval mode, faster on a CPU. Frozen training averages only the real frames of the last,
    shorter segment of a clip (cached per item) where the paper's batch zero padding would add silent frames.
 5. k-fold tasks use the HEAR rotation (test fold i, validation fold i+1); `--protocol paper` selects
    checkpoints on the test fold as the paper's text says.
 6. BatchNorm statistics are re-estimated on 4 clean training batches before every validation and after
    the top-4 weight averaging (`--bn-batches 0`: off, the paper). At lr 1e-3 the running averages lag
    the weights and an average's statistics fit none of its members: the upstream's eval outputs were
    nearly constant after one epoch (valid mAP 0.18, 0.25 with re-estimated statistics).
 7. The frozen head reads the embeddings standardised per dimension (mean / std of the training frames), as
    HEAR's and BYOL-A's linear evaluations do; still a linear classifier of the embedding. The raw embeddings
    of our upstream are dominated by one direction (2nd singular value 0.34 of the 1st), and a linear head
    on them trained at lr 1e-3 for 230 steps plateaued at loss 1.1 on 60 clips (`--no-frozen-standardize`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# Paper numbers. Table 2: params (M), mAP %, mAUC %, d'. Table 3: (scratch, frozen, fine-tune), higher is better
# except VL (error rate).
PAPER_UPSTREAM = {"mbv2": (3.0, 40.6, 97.1, 2.695), "effb0": (4.6, 41.7, 96.4, 2.546)}
PAPER_T3 = {
    "MSoS": {"mbv2": (56.85, 90.40, 93.55), "effb0": (58.80, 89.80, 93.75)},
    "NS": {"mbv2": (33.56, 66.50, 79.93), "effb0": (78.82, 64.65, 77.92)},
    "US8K": {"mbv2": (74.77, 83.27, 84.29), "effb0": (75.03, 83.00, 85.22)},
    "RAV": {"mbv2": (46.54, 50.90, 66.66), "effb0": (11.66, 48.68, 70.00)},
    "ESC-50": {"mbv2": (59.90, 92.20, 93.70), "effb0": (58.17, 92.10, 94.48)},
    "FSD18": {"mbv2": (85.60, 87.31, 94.43), "effb0": (78.96, 91.02, 91.12)},
    "FSD19-C": {"mbv2": (56.16, 68.84, 72.96), "effb0": (54.95, 67.86, 72.92)},
    "FSD19-N": {"mbv2": (38.17, 53.57, 49.97), "effb0": (38.46, 54.89, 49.93)},
    "FSD50k": {"mbv2": (38.03, 44.41, 54.62), "effb0": (38.24, 44.66, 57.20)},
    "Vox1": {"mbv2": (44.86, 19.02, 48.43), "effb0": (62.23, 13.54, 54.71)},
    "VL": {"mbv2": (19.83, 92.85, 26.17), "effb0": (19.71, 93.41, 20.39)},
    "FSC": {"mbv2": (99.12, 17.37, 99.47), "effb0": (97.94, 13.58, 98.04)},
    "SPCV1": {"mbv2": (97.62, 69.28, 98.27), "effb0": (97.75, 68.76, 98.30)},
    "SPCV2": {"mbv2": (96.18, 49.13, 96.81), "effb0": (96.35, 42.85, 96.86)},
}
# task name (lower case, letters and digits only) -> Table 3 row
ALIASES = {"esc50": "ESC-50", "us8k": "US8K", "urbansound8k": "US8K", "fsd18": "FSD18", "fsdkaggle2018": "FSD18",
           "fsd19c": "FSD19-C", "fsd19curated": "FSD19-C", "fsdkaggle2019curated": "FSD19-C", "fsd19n": "FSD19-N",
           "fsd19noisy": "FSD19-N", "fsdkaggle2019noisy": "FSD19-N", "fsd50k": "FSD50k", "nsynth": "NS", "ns": "NS",
           "msos": "MSoS", "ravdess": "RAV", "rav": "RAV", "vox1": "Vox1", "voxceleb1": "Vox1", "vl": "VL",
           "voxlingua107": "VL", "fsc": "FSC", "fluentspeechcommands": "FSC", "spcv1": "SPCV1", "scv1": "SPCV1",
           "speechcommandsv1": "SPCV1", "spcv111": "SPCV1", "scv111": "SPCV1", "spcv2": "SPCV2", "scv2": "SPCV2",
           "scv235": "SPCV2", "speechcommandsv2": "SPCV2", "speechcommands": "SPCV2"}
SPEECH = {"Vox1", "VL", "FSC", "SPCV1", "SPCV2", "keywords", "speaker"}  # bottom half of Table 3
MODES = ("scratch", "frozen", "finetune")
# deviation 2: the CPU preset; `--preset paper` = Sec. 4.2.1 / 4.2.2
PRESETS = {"cpu": dict(up_epochs=3, evals_per_epoch=2, up_lr=1e-3, epochs=12, patience=4, lr=1e-3, batch_size=16,
                       frozen_epochs=500, frozen_patience=50, trials=1, folds=1, task_scale=0.2),
           "paper": dict(up_epochs=100, evals_per_epoch=6, up_lr=1e-4, epochs=150, patience=15, lr=1e-4,
                         batch_size=64, frozen_epochs=150, frozen_patience=15, trials=4, folds=None, task_scale=1.0)}
PSL_TEACHERS = "runs/psl/teacher_full_synth_*/final.pt"  # psl.py's MA folders (named by a settings hash), reused by the CPU preset


# =============================================================================================
# Arguments: every default is the paper's value (section in the help); None = from --preset
# =============================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "at_transfer")
    p.set_defaults(data="full")  # upstream on balanced + unbalanced (Sec. 4.2.1)
    p.add_argument("--preset", type=str, default="auto", choices=["auto", "cpu", "paper"],
                   help="schedule: paper = Sec. 4.2; cpu = deviation 2; auto = cpu on the synthetic corpus "
                        "without a GPU, else paper. Explicit flags override the preset")
    g = p.add_argument_group("upstream audio tagging (Sec. 3, 4.2.1)")
    g.add_argument("--upstream", type=str, default="mbv2", choices=["mbv2", "effb0", "both"],
                   help="MobileNetV2 (3.0 M) or EfficientNet-B0 (4.6 M) (Table 2)")
    g.add_argument("--upstream-ckpt", type=str, default=None,
                   help="use this checkpoint (ours or a psl.py machine annotator) instead of training one")
    g.add_argument("--up-epochs", type=int, default=None, help="at most N epochs (100; cpu: 3)")
    g.add_argument("--up-lr", type=float, default=None, help="Adam learning rate (1e-4; cpu: 1e-3)")
    g.add_argument("--up-batch-size", type=int, default=32, help="batch size (Sec. 4.2)")
    g.add_argument("--evals-per-epoch", type=int, default=None, help="validations per epoch (~6; cpu: 2)")
    g.add_argument("--up-patience", type=int, default=5, help="early stop after N validations without gain")
    g.add_argument("--valid-on", type=str, default="valid", choices=["valid", "train"],
                   help="upstream validation split; paper: the balanced subset inside the training data (dev. 1)")
    g.add_argument("--mixup-alpha", type=float, default=1.0, help="mix-up lambda ~ Beta(a, a) (Sec. 4.2.1)")
    g.add_argument("--time-mask", type=int, default=96, help="SpecAugment time mask, frames (Sec. 4.2.1)")
    g.add_argument("--freq-mask", type=int, default=12, help="SpecAugment frequency mask, bins (Sec. 4.2.1)")
    g.add_argument("--n-masks", type=int, default=2, help="SpecAugment masks per axis (not given; ours)")
    g.add_argument("--gain-db", type=float, nargs=2, default=[-18.0, 6.0],
                   help="Gain range in dB, torch-audiomentations' default (Sec. 4.2.1)")
    g.add_argument("--max-shift", type=float, default=0.5,
                   help="Shift with roll-over up to this fraction of the clip, torch-audiomentations' default")
    g.add_argument("--aug-p", type=float, default=0.5, help="probability of each wave augmentation (default 0.5)")
    g = p.add_argument_group("downstream transfer (Sec. 4.2.2, Table 3)")
    g.add_argument("--task-root", type=str, default=None,
                   help="folder with tasks.json (converted public datasets); default: the synthetic tasks")
    g.add_argument("--task-scale", type=float, default=None, help="size of the synthetic tasks (1; cpu: 0.2)")
    g.add_argument("--task", type=str, nargs="+", default=None, help="tasks to run (default: all of the root)")
    g.add_argument("--mode", type=str, nargs="+", default=list(MODES), choices=MODES,
                   help="scratch / frozen (linear head on cached embeddings) / finetune (Table 3 columns)")
    g.add_argument("--suite", action="store_true",
                   help="every task x mode (the default when --task and --mode are not given)")
    g.add_argument("--epochs", type=int, default=None, help="scratch/fine-tune: at most N epochs (150; cpu: 12)")
    g.add_argument("--patience", type=int, default=None, help="early stop after N epochs without gain (15; cpu: 4)")
    g.add_argument("--frozen-epochs", type=int, default=None, help="frozen head: at most N epochs (150; cpu: 500)")
    g.add_argument("--frozen-patience", type=int, default=None,
                   help="frozen head: early stop after N epochs without gain (15; cpu: 50)")
    g.add_argument("--frozen-standardize", action=argparse.BooleanOptionalAction, default=True,
                   help="frozen head on embeddings standardised per dimension with the training frames' statistics "
                        "(ours, as HEAR / BYOL-A linear evaluation; deviation 7); --no-frozen-standardize: raw")
    g.add_argument("--lr", type=float, default=None, help="Adam, no scheduler (1e-4; cpu: 1e-3)")
    g.add_argument("--batch-size", type=int, default=None, help="training batch size (64, Sec. 4.2; cpu: 16)")
    g.add_argument("--top-k", type=int, default=4, help="weight-average the k best checkpoints (Sec. 4.2.2)")
    g.add_argument("--bn-batches", type=int, default=4,
                   help="re-estimate BatchNorm statistics on N training batches before each validation and after "
                        "the averaging (ours, deviation 6; 0 = off, the paper)")
    g.add_argument("--trials", type=int, default=None, help="repeated runs per cell, mean +- std (4; cpu: 1)")
    g.add_argument("--protocol", type=str, default="hear", choices=["hear", "paper"],
                   help="k-fold checkpoint selection: HEAR rotation or the test fold (paper; deviation 5)")
    g.add_argument("--folds", type=int, default=None, help="run only the first N k-fold splits (all; cpu: 1)")
    g.add_argument("--valid-fraction", type=float, default=0.1,
                   help="held-out share of the development data when a task has no validation split (Sec. 4.2.2)")
    return p.parse_args(argv)


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Derived values, computed once after parsing: the preset fills every flag left at None."""
    a = copy.copy(a)
    if a.preset == "auto":
        gpu = common.pick_device(a.device).type != "cpu"
        a.preset = "cpu" if a.data_root is None and not gpu else "paper"
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.arches = ["mbv2", "effb0"] if a.upstream == "both" else [a.upstream]
    corpus = "synth" if a.data_root is None else Path(a.data_root).name
    tasks = "synth_tasks" if a.task_root is None else Path(a.task_root).name
    a.out = a.out or str(Path("runs/at_transfer") / (a.name or f"{tasks}_{a.preset}"))
    a.upstream_dir = str(Path(a.out).parent / f"upstream_{{arch}}_{a.data}_{corpus}_{a.preset}")
    if a.upstream_ckpt is None and a.preset == "cpu" and a.data_root is None and a.upstream == "mbv2" \
            and (done := sorted((p for p in Path().glob(PSL_TEACHERS) if (p.parent / "results.json").exists()),
                                key=lambda p: p.stat().st_mtime)):
        a.upstream_ckpt = str(done[-1])  # the paper's MBv2 upstream *is* the PSL machine annotator
        print(f"reusing psl.py's machine annotator {done[-1]} as the MobileNetV2 upstream")
    return a


# =============================================================================================
# Models (Sec. 3): log-mel -> CNN -> mean over frequency -> per-frame Linear + sigmoid -> mean over time.
# Duplicated from psl.py (MobileNetV2, same module names: a psl.py MA checkpoint loads as is) and psla.py
# (EfficientNet-B0 layout) on purpose: each script carries its own networks (DESIGN.md).
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


class Tagger(nn.Module):
    """Shared forward of both upstreams: `embed` gives the per-frame embeddings (B, T/32, 1280) that the
    classifier (and every downstream head) reads; `forward` the clip and frame probabilities."""
    embed_dim = 1280
    hop_ms = 320.0  # 10 ms hop x time stride 32; frame j's receptive field is centred on log-mel frame 32 j

    def embed(self, wave: torch.Tensor, mel_augment=None) -> torch.Tensor:
        x = self.frontend(wave)  # (B, 64, T)
        if mel_augment is not None:
            x = mel_augment(x)
        x = self.features(x.unsqueeze(1))  # (B, 1280, 2, T/32)
        return x.mean(2).transpose(1, 2)  # (B, T', 1280): average over frequency only

    def forward(self, wave: torch.Tensor, mel_augment=None) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.sigmoid(self.classifier(self.embed(wave, mel_augment)))  # (B, T', K) per frame
        return frames.mean(1), frames  # decision-level mean pooling (Sec. 3)


class MobileNetV2(Tagger):
    """MobileNetV2 (Sandler et al.), 527 classes: 2,898,383 parameters (paper: 3.0 M)."""
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, n_classes: int = 527, dropout: float = 0.3):
        super().__init__()
        self.frontend = common.LogMel.preset("at")  # 16 kHz, 32 ms / 10 ms, 64 mels, dB (Sec. 4.2)
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


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> optional SiLU (torchvision's key layout, as psla.py)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([nn.SiLU(inplace=True)] if act else []))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation and a drop-connect residual."""

    def __init__(self, expand: int, k: int, stride: int, cin: int, cout: int, drop: float):
        super().__init__()
        mid = cin * expand
        layers = [ConvBNAct(cin, mid, 1)] if expand != 1 else []
        layers += [ConvBNAct(mid, mid, k, stride, groups=mid), SqueezeExcitation(mid, max(1, cin // 4)),
                   ConvBNAct(mid, cout, 1, act=False)]
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


class EfficientNetB0(Tagger):
    """EfficientNet-B0 (Tan & Le) on one log-mel channel, 527 classes: 4,682,059 parameters (paper: 4.6 M)."""
    STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]  # (e, k, s, cin, cout, n)

    def __init__(self, n_classes: int = 527, dropout: float = 0.2, drop_connect: float = 0.2):
        super().__init__()
        self.frontend = common.LogMel.preset("at")
        total, i = sum(s[-1] for s in self.STAGES), 0
        layers: list[nn.Module] = [ConvBNAct(1, 32, 3, 2)]
        for e, k, s, ci, co, n in self.STAGES:
            blocks = []
            for j in range(n):
                blocks.append(MBConv(e, k, s if j == 0 else 1, ci if j == 0 else co, co, drop_connect * i / total))
                i += 1
            layers.append(nn.Sequential(*blocks))
        layers.append(ConvBNAct(320, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, n_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


ARCHS = {"mbv2": MobileNetV2, "effb0": EfficientNetB0}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_upstream(ckpt: dict) -> Tagger:
    """Rebuild an upstream from a self-describing checkpoint alone (ours, or psl.py's: no 'arch' = MBv2)."""
    model = ARCHS[ckpt.get("arch", "mbv2")](len(ckpt["labels"]["mids"]))
    model.load_state_dict(ckpt["model"])
    return model


class Downstream(nn.Module):
    """Sec. 4.2.2: the upstream backbone with a new per-frame linear head in place of its classifier.
    Multi-label: sigmoid per frame, then the mean over frames (probabilities; BCE). Single-label: the
    mean of the frame logits (logits; softmax + cross-entropy)."""

    def __init__(self, backbone: Tagger, n_classes: int, multilabel: bool):
        super().__init__()
        backbone.classifier = nn.Identity()  # replaced by the head
        self.backbone, self.head, self.multilabel = backbone, nn.Linear(backbone.embed_dim, n_classes), multilabel

    def pool(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        frames = self.head(emb)  # (B, T', K)
        frames = torch.sigmoid(frames) if self.multilabel else frames
        if mask is None:
            return frames.mean(1)
        return (frames * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)  # real frames only

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone.embed(wave))


class FrozenHead(nn.Module):
    """Frozen mode: the head of a Downstream on cached backbone embeddings ((B, T', D), mask (B, T')),
    optionally standardised per dimension with the training frames' mean / std (still a linear classifier
    of the embedding; deviation 7)."""

    def __init__(self, ds: Downstream, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.ds, self.mean, self.std = ds, mean, std

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        emb, mask = x
        if self.mean is not None:
            emb = (emb - self.mean) / self.std
        return self.ds.pool(emb, mask)


def clip_loss(out: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:  # BCE on the pooled probabilities (Eq. 1)
        return F.binary_cross_entropy(out.float().clamp(1e-7, 1 - 1e-7), y.float())
    return F.cross_entropy(out.float(), y.argmax(1))


def clip_scores(out: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return out.float() if multilabel else out.float().softmax(-1)


# =============================================================================================
# HEAR 2021 embedding API (hear-baseline names): usable from another program
# =============================================================================================
def load_model(model_file_path: str = "", device: str = "cpu") -> Tagger:
    """An upstream (ours or a psl.py MA) or the backbone of a fine-tuned downstream checkpoint, in eval
    mode, with sample_rate, scene_embedding_size and timestamp_embedding_size."""
    ck = common.load_checkpoint(model_file_path)
    if "task" in ck:  # a downstream final.pt: take its backbone
        model = ARCHS[ck["arch"]](1)
        model.classifier = nn.Identity()
        model.load_state_dict({k[9:]: v for k, v in ck["model"].items() if k.startswith("backbone.")})
    else:
        model = build_upstream(ck)
    model.sample_rate = common.SR
    model.scene_embedding_size = model.timestamp_embedding_size = model.embed_dim
    return model.to(device).eval()


@torch.no_grad()
def get_timestamp_embeddings(audio, model: Tagger) -> tuple[torch.Tensor, torch.Tensor]:
    """audio (n, samples) in [-1, 1] at 16 kHz -> (embeddings (n, T, 1280) float32, timestamps (n, T) in ms:
    the centre of each frame's receptive field, j * 320 ms)."""
    audio = torch.as_tensor(audio, dtype=torch.float32, device=next(model.parameters()).device)
    if audio.dim() != 2:
        raise common.DataError(f"audio must be (n_sounds, n_samples), got {tuple(audio.shape)}")
    model.eval()
    emb = model.embed(audio).float()
    ts = torch.arange(emb.shape[1], dtype=torch.float32, device=emb.device) * model.hop_ms
    return emb, ts.expand(emb.shape[0], -1).contiguous()


def get_scene_embeddings(audio, model: Tagger) -> torch.Tensor:
    """(n, samples) -> (n, 1280): the mean of the timestamp embeddings over time."""
    return get_timestamp_embeddings(audio, model)[0].mean(1)


# =============================================================================================
# Data: the upstream wave augmentation (Sec. 4.2.1) and exact per-clip inference
# =============================================================================================
def audiomentations_default(wave: torch.Tensor, gain_db=(-18.0, 6.0), p: float = 0.5,
                            max_shift: float = 0.5) -> torch.Tensor:
    """torch-audiomentations' defaults, each with probability p per sample: Gain U(-18, +6) dB,
    PolarityInversion, Shift by U(-0.5, 0.5) of the clip with roll-over. (B, N) -> (B, N)."""
    b, n = wave.shape
    dev = wave.device
    hit = lambda: torch.rand(b, device=dev) < p
    gain = torch.where(hit(), 10 ** ((torch.rand(b, device=dev) * (gain_db[1] - gain_db[0]) + gain_db[0]) / 20), 1.0)
    sign = torch.where(hit(), -1.0, 1.0)
    shift = torch.where(hit(), ((torch.rand(b, device=dev) * 2 - 1) * max_shift * n).round(), 0.0).long()
    idx = (torch.arange(n, device=dev).unsqueeze(0) - shift.unsqueeze(1)) % n
    return torch.gather(wave, 1, idx) * (gain * sign).unsqueeze(1)


def _items(batch):
    return [b for b in batch if b is not None]


def clip_batches(dataset, workers: int, chunk: int = 32):
    """Evaluation 'one clip at a time at its own length' (Sec. 4.2.2), made fast: clips of equal length are
    stacked without padding (identical results in eval mode; deviation 4). Yields (waves (b, N), indices)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=chunk, num_workers=workers, collate_fn=_items)
    for items in loader:
        by_len: dict[int, list] = {}
        for wave, _, i in items:
            by_len.setdefault(len(wave), []).append((wave, i))
        for group in by_len.values():
            yield torch.stack([w for w, _ in group]), torch.as_tensor([i for _, i in group])


@torch.no_grad()
def predict_clips(model: nn.Module, dataset, n_out: int, multilabel: bool, args) -> np.ndarray:
    """(N, K) clip scores (probabilities) of a Downstream; NaN rows for unreadable clips."""
    model.eval()
    device = next(model.parameters()).device
    out = np.full((len(dataset), n_out), np.nan, np.float32)
    for wave, idx in clip_batches(dataset, args.workers):
        with common.autocast(device, common.amp_dtype(device, args.amp)):
            out[idx.numpy()] = clip_scores(model(wave.to(device)), multilabel).cpu().numpy()
    return out


@torch.no_grad()
def extract_embeddings(backbone: Tagger, dataset, args, desc: str) -> list:
    """Frozen mode: per-item frame embeddings (T', D) in float16, computed once with the backbone in eval
    mode (there is no downstream augmentation, so caching is exact). None for unreadable items."""
    backbone.eval()
    device = next(backbone.parameters()).device
    out: list = [None] * len(dataset)
    bar = tqdm(total=len(dataset), desc=desc, leave=False)
    for wave, idx in clip_batches(dataset, args.workers):
        emb = backbone.embed(wave.to(device)).half().cpu()
        for e, i in zip(emb, idx.tolist()):
            out[i] = e
        bar.update(len(idx))
    bar.close()
    return out


def pad_embeddings(embs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, D) -> zero-padded (B, T, D) float32 and a frame mask (B, T)."""
    t = max(e.shape[0] for e in embs)
    x = torch.zeros(len(embs), t, embs[0].shape[1])
    mask = torch.zeros(len(embs), t)
    for i, e in enumerate(embs):
        x[i, : len(e)], mask[i, : len(e)] = e.float(), 1.0
    return x, mask


# =============================================================================================
# Training: one visible loop for the upstream and every downstream mode
# =============================================================================================
@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, n_batches: int) -> None:
    """Re-estimate the BatchNorm running statistics with the current weights (a cumulative mean over
    n training batches, no augmentation). At lr 1e-3 the running averages lag the fast-moving weights and
    a weight average's statistics match none of its members (deviation 6): without this the upstream's
    eval-mode outputs were nearly constant after one epoch (valid mAP 0.18; re-estimated 0.25)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i, (x, _) in enumerate(batches(0, 0)):
        model(x)
        if i + 1 >= n_batches:
            break
    for m in bns:
        m.momentum = 0.1


def fit(model: nn.Module, trainable: nn.Module, batches, steps_per_epoch: int, loss_fn, validate, folder: Path,
        log_dir: Path, args, *, epochs: int, eval_every: int, patience: int, lr: float, higher: bool = True,
        calibrate=None) -> dict:
    """Adam on `trainable` (no scheduler, Sec. 4.2), `batches(epoch, skip)` yields (x, y) on the device.
    Validation every `eval_every` steps, early stop after `patience` validations without gain, the top-k
    checkpoints weight-averaged into the returned model (Sec. 4.2.1/4.2.2). `calibrate(model)` (BatchNorm
    statistics) runs before every validation and after the averaging. Resumable from last.pt."""
    device = next(trainable.parameters()).device
    dtype = common.amp_dtype(device, args.amp)
    opt = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad], lr=lr)
    scaler = common.grad_scaler(device, dtype)
    total = epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, epochs * steps_per_epoch)
    folder.mkdir(parents=True, exist_ok=True)
    topk = common.TopKCheckpoints(folder, args.top_k, "max" if higher else "min")
    logger = common.RunLogger(log_dir)
    state = {"step": 0, "best": None, "bad_evals": 0}
    if args.resume and (folder / "last.pt").exists():
        ck = common.load_checkpoint(folder / "last.pt", device)
        trainable.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        print(f"{folder}: resumed at step {state['step']}/{total}")
    bar = tqdm(total=total, initial=state["step"], desc=str(folder.relative_to(log_dir)), leave=False)
    running = []
    while state["step"] < total and state["bad_evals"] < patience:
        epoch, skip = divmod(state["step"], steps_per_epoch)
        for x, y in batches(epoch, skip):
            model.train()
            with common.autocast(device, dtype):
                loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running.append(loss.item())
            state["step"] += 1
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == total:
                if calibrate:
                    calibrate(model)
                metric = validate(model)
                gain = state["best"] is None or (metric > state["best"] if higher else metric < state["best"])
                state["best"] = metric if gain else state["best"]
                state["bad_evals"] = 0 if gain else state["bad_evals"] + 1
                logger.log({"stage": str(folder.relative_to(log_dir)), "step": state["step"],
                            "epoch": round(state["step"] / steps_per_epoch, 2), "train/loss": float(np.mean(running)),
                            "val/metric": metric})
                running = []
                common.save_checkpoint(folder / "last.pt", {"model": trainable.state_dict(), "state": state,
                                                            "optimizer": opt.state_dict()})
                topk.update(metric, {"model": trainable.state_dict()}, state["step"])
            if state["step"] >= total or state["bad_evals"] >= patience:
                break
    bar.close()
    trainable.load_state_dict(common.average_state_dicts(topk.paths))  # top-k weight averaging
    if calibrate:
        calibrate(model)
    return {"best_val": state["best"], "steps": state["step"], "epochs": round(state["step"] / steps_per_epoch, 2),
            "averaged": [p.name for p in topk.paths]}


def train_upstream(args, arch: str, device) -> Path:
    """Sec. 4.2.1: audio tagging on --data (full) with a label-balancing sampler, torch-audiomentations'
    wave augmentation, mix-up Beta(1, 1), SpecAugment, BCE, Adam; validation every ~1/6 epoch, early stop 5,
    top-4 averaging. Returns final.pt; evaluates it on eval (mAP / mAUC / d', Table 2)."""
    folder = Path(args.upstream_dir.format(arch=arch))
    final = folder / "final.pt"
    if final.exists() and (folder / "results.json").exists() and args.resume:
        return final
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    common.claim_stage(folder, {k: getattr(args, k) for k in ("data_root", "data", "up_epochs", "up_lr", "up_batch_size",
                   "evals_per_epoch", "up_patience", "valid_on", "mixup_alpha", "time_mask", "freq_mask", "n_masks",
                   "gain_db", "max_shift", "aug_p", "top_k", "seed", "synth_scale", "max_steps", "bn_batches")}
                   | {"arch": arch},
                   args.resume, name="settings.json", hint="another --out/--name or --no-resume")
    common.seed_everything(args.seed)
    model = ARCHS[arch](len(corpus.labels)).to(device)
    n = count_parameters(model)
    print(f"upstream {arch}: {n:,} parameters ({count_parameters(ARCHS[arch](527)) / 1e6:.2f} M with 527 classes; "
          f"paper {PAPER_UPSTREAM[arch][0]} M), {len(corpus.train)} clips of {args.data}")
    targets = corpus.targets(corpus.train)
    ds = common.ClipDataset(corpus.root, corpus.train, targets, args.synth_clip_seconds if corpus.synthetic else 10.0)
    sampler = common.PseudoBalancedSampler(targets, seed=args.seed)  # label-balancing sampling ([31, 3])
    steps = math.ceil(len(ds) / args.up_batch_size)

    def batches(epoch, skip):
        sampler.set_epoch(epoch)
        idx = np.fromiter(sampler, np.int64)[skip * args.up_batch_size:]
        for batch in common.make_loader(ds, args.up_batch_size, sampler=idx, workers=args.workers, seed=args.seed):
            if batch is None:
                continue
            wave, y = batch[0].to(device), batch[1].to(device)
            wave = audiomentations_default(wave, args.gain_db, args.aug_p, args.max_shift)
            yield common.mixup(wave, y, args.mixup_alpha)  # mix-up Beta(1, 1) on every sample

    spec_augment = lambda x: common.mask_along(common.mask_along(x, args.freq_mask, 1, args.n_masks),
                                               args.time_mask, 2, args.n_masks)  # (B, mel, T)
    loss_fn = lambda m, x, y: clip_loss(m(x, spec_augment)[0], y, True)
    if args.valid_on == "valid" and corpus.valid is None:
        print("no valid.tsv: validating on the training set (the paper's choice)")
    vrows = corpus.valid if args.valid_on == "valid" and corpus.valid is not None else corpus.train
    vtrue = corpus.targets(vrows)
    def clean(epoch, skip):  # BatchNorm re-estimation: random training clips, no augmentation
        idx = np.random.default_rng([args.seed, 99]).permutation(len(ds))[: args.bn_batches * args.up_batch_size]
        for batch in common.make_loader(ds, args.up_batch_size, sampler=idx, workers=args.workers, seed=args.seed):
            if batch is not None:
                yield batch[0].to(device), batch[1]

    info = fit(model, model, batches, steps, loss_fn, lambda m: tag_eval(m, corpus, vrows, vtrue, args)["mAP"], folder,
               folder, args, epochs=args.up_epochs, eval_every=max(1, steps // args.evals_per_epoch),
               patience=args.up_patience, lr=args.up_lr, calibrate=lambda m: recalibrate_bn(m, clean, args.bn_batches))
    m = tag_eval(model, corpus, corpus.eval, corpus.true_targets(corpus.eval) if corpus.true
                 else corpus.targets(corpus.eval), args)
    common.save_checkpoint(final, {"model": model.state_dict(), "arch": arch, "args": vars(args), "info": info,
                                   "labels": {"mids": corpus.labels.mids, "names": corpus.labels.names}})
    p = PAPER_UPSTREAM[arch]
    table = common.markdown_table(["upstream", "params (M, 527 classes)", "mAP %", "mAUC %", "d' (from mean AUC)",
                                   "paper params", "paper mAP", "paper mAUC", "paper d'"],
                                  [[arch, f"{count_parameters(ARCHS[arch](527)) / 1e6:.2f}", f"{100 * m['mAP']:.2f}",
                                    f"{100 * m['mAUC']:.2f}", f"{m['dprime']:.3f}", *map(str, p)]])
    common.write_results(folder, {"arch": arch, "params": n, **m, "train": info}, table)
    print(table)
    return final


@torch.no_grad()
def tag_eval(model: Tagger, corpus: common.Corpus, rows: list, y_true: np.ndarray, args) -> dict:
    """Upstream mAP / mAUC / d' on whole clips (clips of equal length stacked, no padding)."""
    model.eval()
    device = next(model.parameters()).device
    ds = common.ClipDataset(corpus.root, rows, y_true, args.synth_clip_seconds if corpus.synthetic else 10.0)
    scores = np.zeros(y_true.shape, np.float32)
    for wave, idx in clip_batches(ds, args.workers):
        scores[idx.numpy()] = model(wave.to(device))[0].float().cpu().numpy()
    return common.tagging_metrics(y_true, scores)


# =============================================================================================
# Paper procedures: one downstream run (Sec. 4.2.2) in each mode, the cells, the Table-3 matrix
# =============================================================================================
def upstream_checkpoint(args, arch: str, device) -> Path:
    if args.upstream_ckpt:
        ck = common.load_checkpoint(args.upstream_ckpt)
        if ck.get("arch", "mbv2") == arch:
            return Path(args.upstream_ckpt)
    return train_upstream(args, arch, device)


def make_backbone(arch: str, ckpt: Path | None) -> Tagger:
    """scratch: a freshly initialised network (seeded); frozen / finetune: the upstream's weights."""
    return build_upstream(common.load_checkpoint(ckpt)) if ckpt else ARCHS[arch](1)


class FrozenCache:
    """Frozen mode: the backbone's embeddings of every training segment and every whole clip of a task,
    computed once per (upstream, task) and shared by all trials and splits (the column is nearly free)."""

    def __init__(self, task, ckpt: Path, arch: str, path: Path, args, device):
        self.pos = {r[0]: i for i, r in enumerate(task.rows)}
        durations = common.clip_durations(task.root, task.rows)
        segs = common.SegmentDataset(task.root, task.rows, np.zeros((len(task.rows), 1), np.float32),
                                     task.max_seconds, durations=durations)
        self.seg_clip = segs.clip_index
        if path.exists():
            saved = torch.load(path, weights_only=False)
            self.seg, self.clip = saved["seg"], saved["clip"]
            return
        backbone = make_backbone(arch, ckpt).to(device)
        self.seg = extract_embeddings(backbone, segs, args, f"embed {task.name} segments")
        whole = np.bincount(self.seg_clip, minlength=len(task.rows)) == 1  # one chunk = the clip itself
        first = np.searchsorted(self.seg_clip, np.arange(len(task.rows)))
        rest = [i for i in range(len(task.rows)) if not whole[i]]
        clips = common.VarLenDataset(task.root, [task.rows[i] for i in rest], np.zeros((len(rest), 1), np.float32))
        extra = extract_embeddings(backbone, clips, args, f"embed {task.name} clips") if rest else []
        self.clip = [self.seg[first[i]] if whole[i] else None for i in range(len(task.rows))]
        for i, e in zip(rest, extra):
            self.clip[i] = e
        torch.save({"seg": self.seg, "clip": self.clip}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)

    def rows(self, rows: list) -> np.ndarray:
        return np.array([self.pos[r[0]] for r in rows], np.int64)


def run_split(args, task, mode: str, arch: str, ckpt: Path | None, cache: FrozenCache | None, train_rows: list,
              valid_rows: list, test_rows: list, folder: Path, log_dir: Path, device) -> tuple[dict, Downstream]:
    """Train one downstream model on one split and score the averaged model on its test clips."""
    multi = task.type == "multi"
    K = len(task.classes)
    model = Downstream(make_backbone(arch, ckpt if mode != "scratch" else None), K, multi).to(device)
    y_valid, y_test = task.targets(valid_rows), task.targets(test_rows)
    score = lambda y, s: common.task_score(task.metric, y[~np.isnan(s[:, 0])], s[~np.isnan(s[:, 0])])
    if mode == "frozen":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        tr = cache.rows(train_rows)
        seg_ids = np.flatnonzero(np.isin(cache.seg_clip, tr))  # every segment of the training clips
        seg_ids = np.array([s for s in seg_ids if cache.seg[s] is not None], np.int64)
        frames = torch.cat([cache.seg[s].float() for s in seg_ids]) if args.frozen_standardize else None
        head = FrozenHead(model, *((frames.mean(0).to(device), frames.std(0).clamp_min(1e-5).to(device))
                                   if frames is not None else ()))
        pos_row = {c: j for j, c in enumerate(tr)}
        y_seg = torch.as_tensor(task.targets(train_rows)[[pos_row[c] for c in cache.seg_clip[seg_ids]]])

        def batches(epoch, skip):
            order = np.random.default_rng([args.seed, epoch]).permutation(len(seg_ids))[skip * args.batch_size:]
            for j in range(0, len(order), args.batch_size):
                b = order[j: j + args.batch_size]
                x, mask = pad_embeddings([cache.seg[s] for s in seg_ids[b]])
                yield (x.to(device), mask.to(device)), y_seg[b].to(device)

        @torch.no_grad()
        def predict(m, rows):
            m.eval()
            out = np.full((len(rows), K), np.nan, np.float32)
            ids = cache.rows(rows)
            ok = [j for j, i in enumerate(ids) if cache.clip[i] is not None]
            for j in range(0, len(ok), 256):
                x, mask = pad_embeddings([cache.clip[ids[o]] for o in ok[j: j + 256]])
                out[ok[j: j + 256]] = clip_scores(m((x.to(device), mask.to(device))), multi).cpu().numpy()
            return out

        net, trainable, steps = head, model.head, math.ceil(len(seg_ids) / args.batch_size)
        epochs, patience = args.frozen_epochs, args.frozen_patience
    else:
        durations = common.clip_durations(task.root, train_rows)
        ds = common.SegmentDataset(task.root, train_rows, task.targets(train_rows), task.max_seconds,
                                   durations=durations)  # each segment inherits its clip's label

        def batches(epoch, skip):
            order = np.random.default_rng([args.seed, epoch]).permutation(len(ds))[skip * args.batch_size:]
            for batch in common.make_loader(ds, args.batch_size, sampler=order, workers=args.workers, seed=args.seed):
                if batch is not None:
                    yield batch[0].to(device), batch[1].to(device)

        def predict(m, rows):
            return predict_clips(m, common.VarLenDataset(task.root, rows, task.targets(rows)), K, multi, args)

        net, trainable, steps = model, model, math.ceil(len(ds) / args.batch_size)
        epochs, patience = args.epochs, args.patience
    if steps == 0 or not len(valid_rows) or not len(test_rows):
        raise common.DataError(f"{task.name}: a split without training, validation or test clips ({folder.name})")
    loss_fn = lambda m, x, y: clip_loss(m(x), y, multi)
    info = fit(net, trainable, batches, steps, loss_fn, lambda m: score(y_valid, predict(m, valid_rows)), folder,
               log_dir, args, epochs=epochs, eval_every=steps, patience=patience, lr=args.lr,
               higher=task.higher_is_better,
               calibrate=None if mode == "frozen" else lambda m: recalibrate_bn(m, batches, args.bn_batches))
    test = score(y_test, predict(net, test_rows))
    for f in folder.glob("*.pt"):  # the top-k and last checkpoints are not needed once the split is scored
        f.unlink()
    return {"test": test, "n_train": len(train_rows), "n_valid": len(valid_rows), "n_test": len(test_rows),
            **info}, model


def run_cell(args, task, mode: str, arch: str, ckpt: Path, out: Path, device) -> dict:
    """One Table-3 cell: --trials repeated runs, each the mean over the task's splits (k-fold: folds)."""
    splits = common.task_splits(task, args.protocol, args.valid_fraction, args.seed)[: args.folds]
    cache = None
    if mode == "frozen":
        cache = FrozenCache(task, ckpt, arch, out / arch / task.name / "frozen_embeddings.pt", args, device)
    per_trial = []
    for trial in range(args.trials):
        scores = []
        for name, tr, va, te in splits:
            folder = out / arch / task.name / mode / f"trial{trial}_{name}"
            if not (args.resume and (folder / "result.json").exists()):
                common.seed_everything(args.seed + 1000 * trial)  # scratch init and batch order differ per trial
                a = copy.copy(args)
                a.seed = args.seed + 1000 * trial
                res = run_split(a, task, mode, arch, ckpt, cache, tr, va, te, folder, out, device)[0]
                common.write_json(folder / "result.json", res)
            scores.append(json.loads((folder / "result.json").read_text())["test"])
        per_trial.append(float(np.mean(scores)))
    return {"task": task.name, "mode": mode, "arch": arch, "metric": task.metric, "trials": per_trial,
            "mean": float(np.mean(per_trial)), "std": float(np.std(per_trial, ddof=1)) if len(per_trial) > 1 else None,
            "splits": [s[0] for s in splits]}


def paper_row(name: str) -> str | None:
    return ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def fmt_cell(c: dict | None) -> str:
    if c is None:
        return "-"
    return f"{100 * c['mean']:.2f}" + (f" +- {100 * c['std']:.2f}" if c["std"] is not None else " (n=1)")


def results_matrix(cells: dict, tasks: list, arches: list, args) -> str:
    """Table 3 layout: one row per task, scratch / frozen / finetune per upstream, the paper's beside."""
    head, rows = ["task", "metric"], []
    for arch in arches:
        head += [f"{arch} {m}" for m in MODES] + [f"{arch} frozen-scratch", f"{arch} finetune-scratch",
                                                  f"paper {arch} (scratch / frozen / finetune)"]
    for t in tasks:
        row = [t.name + (" (speech)" if (paper_row(t.name) or t.name) in SPEECH else ""), t.metric]
        for arch in arches:
            c = {m: cells.get((arch, t.name, m)) for m in MODES}
            row += [fmt_cell(c[m]) for m in MODES]
            for m in ("frozen", "finetune"):
                row.append(f"{100 * (c[m]['mean'] - c['scratch']['mean']):+.2f}" if c[m] and c["scratch"] else "-")
            p = PAPER_T3.get(paper_row(t.name) or "", {}).get(arch)
            row.append(" / ".join(map(str, p)) if p else "-")
        rows.append(row)
    n = f"{args.trials} trial(s), mean +- std over trials (each the mean over {args.folds or 'all'} k-fold splits)"
    return "\n".join([f"## Table 3 (Dinkel et al.): transfer to {args.task_root or 'the synthetic tasks'}", "",
                      f"Scores in %, {n}; preset {args.preset}, lr {args.lr:g}, scratch/finetune <= {args.epochs} "
                      f"epochs (patience {args.patience}), frozen <= {args.frozen_epochs} (patience "
                      f"{args.frozen_patience}). One trial is a pipeline check, not a result.", "",
                      common.markdown_table(head, rows)])


def run_suite(args, device) -> dict:
    """Every task x mode for each upstream; finished cells (trial x split result.json) are reused."""
    root = Path(args.task_root) if args.task_root else common.ensure_synthetic_tasks(args.task_scale, args.seed)
    names = args.task or common.list_tasks(root)
    tasks = [common.read_task(root, n) for n in names]
    out = Path(args.out)
    common.claim_stage(out, {k: getattr(args, k) for k in ("data_root", "data", "task_root", "task_scale", "epochs",
                   "patience", "frozen_epochs", "frozen_patience", "lr", "batch_size", "top_k", "protocol",
                   "valid_fraction", "seed", "max_steps", "upstream_ckpt", "preset", "bn_batches",
                   "frozen_standardize")}, args.resume, name="settings.json", hint="another --out/--name or --no-resume")
    common.save_config(out, args)
    cells, summary = {}, {}
    prev = out / "results.json"
    if prev.exists():  # keep the cells of earlier invocations (other tasks / modes / upstreams)
        for c in json.loads(prev.read_text()).get("cells", []):
            cells[(c["arch"], c["task"], c["mode"])] = c
    for arch in args.arches:
        ckpt = upstream_checkpoint(args, arch, device)
        summary[arch] = str(ckpt)
        st = ckpt.stat()  # cells and cached embeddings belong to one upstream: refuse another one
        common.claim_stage(out / arch, {"upstream": str(ckpt), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, True, name="settings.json", hint="another --out/--name or --no-resume")
        for task in tasks:
            for mode in args.mode:
                c = run_cell(args, task, mode, arch, ckpt, out, device)
                cells[(arch, task.name, mode)] = c
                print(f"{arch} {task.name} {mode}: {task.metric} {fmt_cell(c)}")
    all_tasks = tasks + [common.read_task(root, n) for n in sorted({k[1] for k in cells} - set(names))
                         if n in common.list_tasks(root)]
    arches = sorted({k[0] for k in cells}, key=list(ARCHS).index)
    md = results_matrix(cells, all_tasks, arches, args)
    for arch in arches:
        up = Path(summary.get(arch, "")).parent / "results.md"
        if up.is_file():
            md += f"\n\nUpstream {arch} ({up.parent}):\n\n" + up.read_text()
    common.write_results(out, {"upstreams": summary, "cells": list(cells.values())}, md)
    print(md)
    print(f"matrix: {out / 'results.md'}")
    return {"cells": cells, "markdown": md}


def embed(argv: list[str]) -> None:
    """Write HEAR embeddings of audio files: <stem>.npy (scene, (1280,)); with --timestamps also
    <stem>_frames.npy ((T, 1280)) and <stem>_timestamps.npy ((T,), ms)."""
    p = argparse.ArgumentParser(prog="at_transfer.py embed", description=embed.__doc__)
    p.add_argument("--ckpt", required=True, help="an upstream final.pt (ours or psl.py's) or a fine-tuned model")
    p.add_argument("--out-dir", default=None, help="where to write (default: beside each file)")
    p.add_argument("--timestamps", action="store_true", help="also write the per-frame embeddings")
    p.add_argument("--device", default="auto")
    p.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    model = load_model(a.ckpt, common.pick_device(a.device))
    for path in map(Path, a.files):
        wave = torch.from_numpy(common.load_audio(path)).unsqueeze(0)
        emb, ts = get_timestamp_embeddings(wave, model)
        dest = Path(a.out_dir) if a.out_dir else path.parent
        dest.mkdir(parents=True, exist_ok=True)
        np.save(dest / f"{path.stem}.npy", emb[0].mean(0).cpu().numpy())
        if a.timestamps:
            np.save(dest / f"{path.stem}_frames.npy", emb[0].cpu().numpy())
            np.save(dest / f"{path.stem}_timestamps.npy", ts[0].cpu().numpy())
        print(f"{path} -> {dest / path.stem}.npy ({emb.shape[1]} frames x {emb.shape[2]})")


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["embed"]:
        return embed(argv[1:])
    args = resolve(parse_args(argv))
    if args.suite:
        args.task, args.mode = None, list(MODES)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    return run_suite(args, device)


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        sys.exit(f"error: {e}")
