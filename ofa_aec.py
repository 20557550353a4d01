"""Weight-sharing supernet for searching specialized acoustic event classification networks across
device constraints. Guan-Ting Lin, Qingming Tang, Chieh-Chi Kao, Viktor Rozgic, Chao Wang (National
Taiwan University, Amazon Alexa).

What is reproduced: a once-for-all (OFA) supernet on PANNs' CNN10 (Sec. 2.2: block 1 static, blocks 2-4
with elastic width 0.4/0.6/0.8/1.0 and elastic depth 1 or 2), trained by distillation from a CNN10
teacher (Eq. 2: BCE against the teacher's probabilities; first the largest sub-network, then K = 4
uniformly sampled sub-networks per step), then a random search of p = 25 sub-networks per parameter
budget (Sec. 2.4), scored on the validation split; the best one per budget is exported as a plain CNN
(checkpoint + TorchScript). Baselines (scratch, KD, KD with the supernet's number of updates), continual
fine-tuning (Table 2), the search-space comparison (Fig. 3) and the candidate spread (Fig. 4).

Paper, AudioSet balanced -> eval mAP % (Table 1; teacher CNN10 5.2M params: 29.6):
    ~1M params: scratch 21.2, KD 24.8, OFA 26.6    ~2M: 22.6 / 26.4 / 27.2    ~3.5M: 24.8 / 28.3 / 27.9

    python ofa_aec.py                                   # cpu preset: teacher -> supernet -> search -> export -> eval
                                                        # (18.5 min on 2 shared CPU cores, load ~8)
    python ofa_aec.py --baselines --finetune            # + Table 1 baselines and Table 2 fine-tuning
    python ofa_aec.py --fig3                            # Fig. 3/4: the four search spaces (sibling runs)
    python ofa_aec.py counts                            # parameter counts at 527 classes, --elastic-fc both ways
    python ofa_aec.py summary runs/ofa_aec/dir_s0 runs/ofa_aec/dir_s1 runs/ofa_aec/dir_s2   # mean +- std
    python ofa_aec.py predict --ckpt runs/ofa_aec/cpu_22X_s0/export/budget_0.8M.pt clip.wav
    python ofa_aec.py --data-root data/audioset         # real AudioSet, paper preset (GPU)

Deviations from the paper (numbered as in the README):
 1. CPU preset (`--preset cpu`, the default on the synthetic corpus): CNN10 at 1/8 width (8-16-32-64
    channels, FC 64), 1 s synthetic clips (101 frames), 100 steps per 100K paper iterations (teacher
    400, supernet 100 + 200, baselines 100, fine-tuning +10 / +100: the paper's ratios), time masks
    < 7 frames (64 of 1,001 frames scaled to 101). Budgets and tolerance are fractions of the full
    model's size (0.8M of 5.22M = 15.3 %, ...). `--preset paper` restores 64-128-256-512, 10 s clips,
    100K steps, T = 64.
 2. BatchNorm statistics are re-estimated for every candidate (once-for-all practice, not the paper's
    text) on a fixed subset of up to 2,000 clean training clips, batch 200, batch-size-weighted
    (`--no-bn-recal` for the literal reading: the supernet's shared statistics).
 3. FC1 shrinking with the width is not stated (Sec. 2.2, Fig. 2): default fixed 512 outputs (its
    counts give Table 1's 2.1M / 3.5M baselines), `--elastic-fc` makes it floor(r4 * 512) (range
    0.57-5.22M, the paper's "0.6M to 5.2M").
 4. Not given in the paper, our choices: plain Adam (PANNs uses amsgrad), random (not class-balanced)
    batches of the balanced set, no lr schedule, final weights of every stage (no checkpoint selection),
    mix-up per sample with a random partner after SpecAugment (PANNs mixes pairs), one optimiser across
    the two supernet phases, SpecAugment drawn per sub-network pass. Log-mels are computed once per clip
    and cached (no wave augmentation, so equivalent); teacher soft labels are cached (Sec. 2.3 says the
    teacher sees clean input, so they are fixed).
 5. The synthetic corpus is always generated with seed 0; `--seed` changes only training.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

FULL_527 = 5_219_279  # CNN10 at 527 classes: the paper's "5.2M" (Table 1)
PAPER_TEACHER = 29.6
# budget (M) -> baseline width r, baseline M, scratch, KD, OFA M, OFA mAP (Table 1)
PAPER_T1 = {0.8: (0.4, 1.0, 21.2, 24.8, 0.9, 26.6), 1.8: (0.6, 2.1, 22.6, 26.4, 1.8, 27.2),
            3.8: (0.8, 3.5, 24.8, 28.3, 3.6, 27.9)}
# budget (M) -> searched M, OFA, +10K, +100K, Init+100K (Table 2, space [2,2,X])
PAPER_T2 = {0.8: (0.9, 26.6, 26.7, 26.7, 24.8), 1.8: (1.8, 27.2, 27.6, 27.8, 26.6),
            2.8: (2.7, 27.7, 28.2, 28.4, 28.1), 3.8: (3.6, 27.9, 28.3, 28.5, 28.3)}
PRESETS = {"paper": dict(width_mult=1.0, clip_seconds=10.0, unit_steps=100_000, time_mask=64),
           "cpu": dict(width_mult=0.125, clip_seconds=1.0, unit_steps=100, time_mask=7)}  # deviation 1
SPACES = {"2,2,X": "EW+ED=[2,2,X]", "X,X,X": "EW+ED=[X,X,X]", "2,X,X": "EW+ED=[2,X,X]", "2,2,2": "EW-only"}
NOT_RESULT_KEYS = {"resume", "workers", "device", "amp", "threads", "baselines", "finetune", "baseline_widths", "fig3",
                   "kd_equal", "budgets", "name", "out"}  # flags that add rows or rename, never change a result


# =============================================================================================
# Arguments: every default is the paper's value (section in the help)
# =============================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "ofa_aec")
    p.set_defaults(synth_clip_seconds=None)  # from the preset (cpu: 1 s)
    g = p.add_argument_group("preset and front-end")
    g.add_argument("--preset", default="auto", choices=["auto", "paper", "cpu"],
                   help="paper: CNN10 64-128-256-512, 10 s clips, 100K-step unit; cpu: 1/8 width, 1 s clips, "
                        "100-step unit (deviation 1); auto: cpu on the synthetic corpus, else paper")
    g.add_argument("--width-mult", type=float, default=None, help="CNN10 channel multiplier (paper 1.0, cpu 0.125)")
    g.add_argument("--unit-steps", type=int, default=None,
                   help="steps per 100K paper iterations; every stage keeps the paper's ratio (Sec. 3.2, 3.3)")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (0: torch's default); 1 is fastest on a shared machine")
    g.add_argument("--frontend", default="auto", choices=["auto", "panns32k", "panns16k"],
                   help="PANNs log-mel (Sec. 3.1: 32 kHz, 64 mels); auto: panns16k on the synthetic corpus")
    g = p.add_argument_group("teacher (Sec. 3.2)")
    g.add_argument("--teacher", type=str, default=None, help="use this CNN10 checkpoint instead of training one")
    g.add_argument("--teacher-dir", type=str, default=None,
                   help="teacher folder shared by runs (default: beside --out, teacher_<preset>_u<unit>_<corpus>)")
    g.add_argument("--teacher-seed", type=int, default=0, help="the teacher's seed (one teacher for all seeds)")
    g.add_argument("--mixup-alpha", type=float, default=1.0, help="teacher mix-up, lambda ~ Beta(a, a) (Sec. 3.2)")
    g = p.add_argument_group("supernet (Sec. 2.2, 2.3, 4.1)")
    g.add_argument("--elastic-depth", type=str, default="2,2,X", choices=list(SPACES),
                   help="depth per dynamic block: 2 fixed, X = 1 or 2 (Fig. 3; best: 2,2,X)")
    g.add_argument("--widths", type=str, default="0.4,0.6,0.8,1.0",
                   help="width ratios (Sec. 2.2); EW-only adds 0.2 (Sec. 4.1)")
    g.add_argument("--elastic-fc", action=argparse.BooleanOptionalAction, default=False,
                   help="FC1 outputs shrink with block 4's width (ambiguous in the paper: deviation 3)")
    g.add_argument("--subnets-per-step", type=int, default=4, help="K sampled sub-networks per step (Sec. 3.3)")
    g = p.add_argument_group("training (Sec. 3.3)")
    g.add_argument("--batch-size", type=int, default=64, help="batch size (Sec. 3.3)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (Sec. 3.3)")
    g.add_argument("--time-mask", type=int, default=None, help="SpecAugment time stripes < T frames (64; cpu 7)")
    g.add_argument("--freq-mask", type=int, default=8, help="SpecAugment frequency stripes < F bins (Sec. 3.3)")
    g.add_argument("--n-masks", type=int, default=2, help="stripes per axis (Sec. 3.3)")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default unit/10)")
    g = p.add_argument_group("search (Sec. 2.4, 3.3)")
    g.add_argument("--budgets", type=str, default="0.8,1.8,2.8,3.8",
                   help="parameter budgets in M at the paper's scale (scaled by the full model's size)")
    g.add_argument("--tolerance", type=float, default=0.2, help="epsilon in M (Sec. 3.3)")
    g.add_argument("--population", type=int, default=25, help="p candidates per budget (Sec. 3.3)")
    g.add_argument("--bn-recal", action=argparse.BooleanOptionalAction, default=True,
                   help="re-estimate BN statistics per candidate (once-for-all practice: deviation 2)")
    g.add_argument("--bn-recal-clips", type=int, default=2000, help="training clips for BN re-estimation (OFA)")
    g = p.add_argument_group("tables (Sec. 3.4, 4.1-4.3)")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=False,
                   help="Table 1: scratch, KD and KD with the supernet's number of updates")
    g.add_argument("--kd-equal", action=argparse.BooleanOptionalAction, default=True,
                   help="with --baselines: also KD for as many updates as the supernet's shared weights (300K)")
    g.add_argument("--baseline-widths", type=str, default="0.4,0.6,0.8",
                   help="baseline architectures: width r in all dynamic blocks, depth 2 (Sec. 3.2)")
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=False,
                   help="Table 2: searched sub-networks +10K / +100K KD steps and Init+100K")
    g.add_argument("--fig3", action="store_true", help="train the four search spaces (Fig. 3, Fig. 4)")
    return p.parse_args(argv)


def floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v]
    except ValueError:
        raise common.DataError(f"{s!r}: expected comma-separated numbers")


def resolve(a: argparse.Namespace, synthetic: bool) -> argparse.Namespace:
    """Derived values, computed once after parsing (deviation 1 for the cpu preset)."""
    a = copy.copy(a)
    a.preset = a.preset if a.preset != "auto" else "cpu" if synthetic else "paper"
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k if k != "clip_seconds" else "synth_clip_seconds", None) is None:
            setattr(a, k if k != "clip_seconds" else "synth_clip_seconds", v)
    a.frontend = a.frontend if a.frontend != "auto" else "panns16k" if synthetic else "panns32k"
    a.eval_every = a.eval_every or max(1, a.unit_steps // 10)
    a.name = a.name or f"{a.preset}_{a.elastic_depth.replace(',', '')}" + ("_efc" if a.elastic_fc else "") + \
        f"_s{a.seed}"
    a.out = a.out or str(Path("runs/ofa_aec") / a.name)
    return a


def steps(a, paper_iters: int) -> int:
    """The paper's iteration count scaled to this run's unit (ratios kept), capped by --max-steps."""
    n = max(1, round(paper_iters / 100_000 * a.unit_steps))
    return min(n, a.max_steps) if a.max_steps else n


# =============================================================================================
# Model: PANNs CNN10 (Sec. 3.2) and its weight-sharing supernet (Sec. 2.2, Fig. 2)
# =============================================================================================
class ConvBlock(nn.Module):
    """PANNs ConvBlock: [3x3 conv (no bias) -> BN -> ReLU] x len(widths), then 2x2 average pooling."""

    def __init__(self, cin: int, widths):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0])
        if len(widths) > 1:
            self.conv2, self.bn2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, bias=False), nn.BatchNorm2d(widths[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if hasattr(self, "conv2"):
            x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, 2)


def dynamic_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """BN on the first C channels: weights and running statistics sliced (views, so the first C
    running statistics are updated in place, as in once-for-all's DynamicBatchNorm2d)."""
    c = x.shape[1]
    return F.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                        bn.training, bn.momentum, bn.eps)


class DynamicConvBlock(ConvBlock):
    """Elastic width: both convs use the first `width` output channels (Sec. 2.2); elastic depth:
    depth 1 keeps conv1 and skips conv2. Input channels follow the incoming tensor."""

    def __init__(self, cin: int, widths):
        super().__init__(cin, widths)
        self.width, self.depth = widths[0], 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.width
        x = F.relu(dynamic_bn(self.bn1, F.conv2d(x, self.conv1.weight[:w, :x.shape[1]], padding=1)))
        if self.depth == 2:
            x = F.relu(dynamic_bn(self.bn2, F.conv2d(x, self.conv2.weight[:w, :w], padding=1)))
        return F.avg_pool2d(x, 2)


class DynamicLinear(nn.Linear):
    """W[:out, :in], b[:out]; `in` follows the input, `out` is set by the active config."""
    active_out: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.active_out or self.out_features
        return F.linear(x, self.weight[:out, :x.shape[1]], self.bias[:out])


class CNN10(nn.Module):
    """PANNs CNN10 on log-mels (B, n_mels, T): BN per mel bin -> [augment] -> 4 ConvBlocks, dropout 0.2
    after each -> mean over frequency -> max + mean over time -> dropout 0.5 -> fc1 + ReLU -> fc_audioset
    logits (sigmoid = probabilities). 527 classes: 5,219,279 parameters. Module names are PANNs' own.
    `blocks` gives each block's conv widths (one or two), so a searched sub-network is a plain CNN10."""

    def __init__(self, n_classes: int = 527, n_mels: int = 64,
                 blocks=((64, 64), (128, 128), (256, 256), (512, 512)), fc: int = 512, dynamic: bool = False):
        super().__init__()
        self.config = {"n_classes": n_classes, "n_mels": n_mels, "blocks": [list(b) for b in blocks], "fc": fc}
        self.bn0 = nn.BatchNorm1d(n_mels)  # = PANNs' BatchNorm2d(64) on (B, F, T, 1)
        cin = 1
        for i, widths in enumerate(blocks):
            block = DynamicConvBlock if dynamic and i > 0 else ConvBlock  # block 1 static (Fig. 2)
            setattr(self, f"conv_block{i + 1}", block(cin, widths))
            cin = widths[-1]
        linear = DynamicLinear if dynamic else nn.Linear
        self.fc1, self.fc_audioset = linear(cin, fc), linear(fc, n_classes)
        for m in self.modules():  # PANNs init_layer / init_bn
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, mel: torch.Tensor, augment=None) -> torch.Tensor:
        x = self.bn0(mel)  # (B, n_mels, T)
        if augment is not None:  # SpecAugment (+ mix-up for the teacher) after bn0, as PANNs
            x = augment(x)
        x = x.transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)  # (B, 1, T, F)
        for i in range(len(self.config["blocks"])):
            x = F.dropout(getattr(self, f"conv_block{i + 1}")(x), 0.2, self.training)
        x = x.mean(3)  # (B, C, T'): mean over frequency
        x = x.amax(2) + x.mean(2)  # (B, C): max + mean over time
        x = F.relu(self.fc1(F.dropout(x, 0.5, self.training)))
        return self.fc_audioset(x)  # logits


class Supernet(CNN10):
    """The full CNN10 whose blocks 2-4 and FC layers take the first channels of an active config."""

    def __init__(self, n_classes: int, n_mels: int, channels: list[int], fc: int):
        super().__init__(n_classes, n_mels, [(c, c) for c in channels], fc, dynamic=True)

    def set_active(self, cfg: dict) -> None:
        """Activate the sub-network whose plain CNN10 config is `cfg` (see SearchSpace.config)."""
        for i, widths in enumerate(cfg["blocks"][1:], start=2):
            block = getattr(self, f"conv_block{i}")
            block.width, block.depth = widths[0], len(widths)
        self.fc1.active_out = cfg["fc"]


class Tagger(nn.Module):
    """Waveform (B, N) -> probabilities (B, K): PANNs log-mel front-end -> plain CNN10 -> sigmoid."""

    def __init__(self, frontend: str, cnn: CNN10):
        super().__init__()
        self.frontend, self.cnn = common.LogMel.preset(frontend), cnn

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.cnn(self.frontend(wave)))


def count_params(cfg: dict) -> int:
    """Trainable parameters of a CNN10 config, by formula (tested against the module)."""
    n, cin = 2 * cfg["n_mels"], 1
    for block in cfg["blocks"]:
        for c in block:
            n, cin = n + 9 * cin * c + 2 * c, c
    return n + cin * cfg["fc"] + cfg["fc"] + (cfg["fc"] + 1) * cfg["n_classes"]


def count_macs(cfg: dict, frames: int) -> int:
    """Multiply-accumulates of one forward pass (convolutions and linear layers)."""
    t, f, cin, n = frames, cfg["n_mels"], 1, 0
    for block in cfg["blocks"]:
        for c in block:
            n, cin = n + 9 * cin * c * t * f, c
        t, f = t // 2, f // 2
    return n + cin * cfg["fc"] + cfg["fc"] * cfg["n_classes"]


def build_model(ckpt: dict) -> CNN10:
    """Rebuild a plain CNN10 (teacher or exported sub-network) from a checkpoint alone."""
    model = CNN10(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model


# =============================================================================================
# Search space (Sec. 2.2, Fig. 3): an architecture = ((r2, d2), (r3, d3), (r4, d4))
# =============================================================================================
class SearchSpace:
    def __init__(self, n_classes: int, n_mels: int, width_mult: float, widths: list[float], elastic_depth: str,
                 elastic_fc: bool):
        self.channels = [round(c * width_mult) for c in (64, 128, 256, 512)]
        self.fc, self.n_classes, self.n_mels = round(512 * width_mult), n_classes, n_mels
        self.widths, self.elastic_fc = sorted(widths), elastic_fc
        self.depths = [(1, 2) if d == "X" else (2,) for d in elastic_depth.split(",")]
        self.choices = [[(r, d) for r in self.widths for d in ds] for ds in self.depths]
        self.largest = tuple((max(self.widths), max(ds)) for ds in self.depths)
        self.smallest = tuple((min(self.widths), min(ds)) for ds in self.depths)

    def all(self) -> list[tuple]:
        return list(itertools.product(*self.choices))

    def sample(self, rng: np.random.Generator) -> tuple:
        """Uniform over the space: an independent uniform choice per block (once-for-all)."""
        return tuple(c[rng.integers(len(c))] for c in self.choices)

    def config(self, arch: tuple) -> dict:
        """Plain CNN10 config of a sub-network: the first floor(r * D) channels (Sec. 2.2)."""
        blocks = [[self.channels[0]] * 2]
        for (r, d), ch in zip(arch, self.channels[1:]):
            blocks.append([math.floor(r * ch + 1e-9)] * d)
        fc = math.floor(arch[-1][0] * self.fc + 1e-9) if self.elastic_fc else self.fc
        return {"n_classes": self.n_classes, "n_mels": self.n_mels, "blocks": blocks, "fc": fc}

    def params(self, arch: tuple) -> int:
        return count_params(self.config(arch))

    def full(self) -> dict:
        return {"n_classes": self.n_classes, "n_mels": self.n_mels, "blocks": [[c, c] for c in self.channels],
                "fc": self.fc}


def arch_name(arch: tuple) -> str:
    return "-".join(f"{r:g}/{d}" for r, d in arch)


def make_space(args, n_classes: int, n_mels: int = 64) -> SearchSpace:
    return SearchSpace(n_classes, n_mels, args.width_mult, floats(args.widths), args.elastic_depth, args.elastic_fc)


def budget_window(space: SearchSpace, budget_m: float, tol_m: float) -> tuple[float, float]:
    """[N - eps, N + eps] in parameters, scaled by the full model's size (527 classes, width 1: the paper's)."""
    scale = count_params(space.full()) / FULL_527
    return (budget_m - tol_m) * 1e6 * scale, (budget_m + tol_m) * 1e6 * scale


# =============================================================================================
# Data: log-mels computed once per clip and cached (deviation 4), labels, soft labels
# =============================================================================================
class Data:
    """Cached log-mels (N, n_mels, T) float16 per split, targets, and the clips that could be read."""

    def __init__(self, corpus: common.Corpus, args, device: torch.device):
        sr = common.LOGMEL_PRESETS[args.frontend]["sr"]
        clip_s = args.synth_clip_seconds if corpus.synthetic else 10.0
        key = hashlib.sha1(str(corpus.root.resolve()).encode()).hexdigest()[:8]  # one cache per corpus folder
        cache = Path(args.out).parent / f"features_{corpus.root.name}_{key}_{args.frontend}"
        cache.mkdir(parents=True, exist_ok=True)
        splits = {"train": corpus.train, "valid": corpus.valid or corpus.train, "eval": corpus.eval}
        if corpus.valid is None:
            print("no valid.tsv: validating and searching on the training set")
        self.x, self.y, self.ok = {}, {}, {}
        frontend = common.LogMel.preset(args.frontend).to(device)
        frames = int(round(clip_s * sr)) // frontend.hop + 1
        for split, rows in splits.items():
            path = cache / f"{args.data if split == 'train' else split}_{clip_s:g}s.npy"
            if not path.exists():
                self.extract(corpus, rows, frontend, sr, clip_s, frames, path, device, args.workers)
            self.x[split] = np.load(path, mmap_mode="r")
            self.ok[split] = np.load(path.with_suffix(".ok.npy"))
            true = split == "eval" and corpus.true
            y = corpus.true_targets(rows) if true else corpus.targets(rows)
            self.y[split] = y.astype(np.float32)
        self.frames, self.soft = frames, None
        self.train_idx = np.flatnonzero(self.ok["train"])  # unreadable clips are skipped (counted)
        self.skipped = {s: int((~ok).sum()) for s, ok in self.ok.items()}

    @staticmethod
    def extract(corpus, rows, frontend, sr, clip_s, frames, path, device, workers) -> None:
        ds = common.ClipDataset(corpus.root, rows, np.zeros((len(rows), 1), np.float32), clip_s, sr)
        tmp = path.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(rows), frontend.fb.shape[1], frames))
        ok = np.zeros(len(rows), bool)
        with torch.no_grad():
            for batch in tqdm(common.make_loader(ds, 64, workers=workers), desc=f"log-mel {path.stem}", leave=False):
                if batch is not None:
                    wave, _, idx = batch
                    out[idx.numpy()] = frontend(wave.to(device)).cpu().numpy().astype(np.float16)
                    ok[idx.numpy()] = True
        out.flush()
        del out
        np.save(path.with_suffix(".ok.npy"), ok)
        tmp.replace(path)

    def batch(self, split: str, idx: np.ndarray, device) -> torch.Tensor:
        order = np.argsort(idx)  # sorted reads from the memmap, original order restored
        x = np.empty((len(idx), *self.x[split].shape[1:]), np.float32)
        x[order] = self.x[split][idx[order]]
        return torch.from_numpy(x).to(device)

    def train_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Batch `step` of an endless stream of per-epoch permutations (deterministic, so resumable)."""
        n = len(self.train_idx)
        start = step * batch_size
        epochs = range(start // n, (start + batch_size - 1) // n + 1)
        stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in epochs])
        off = start - epochs.start * n
        return self.train_idx[stream[off: off + batch_size]]


def spec_augment(x: torch.Tensor, args) -> torch.Tensor:
    """2 frequency stripes < F bins and 2 time stripes < T frames, per sample, zero fill (Sec. 3.3)."""
    x = common.mask_along(x, args.freq_mask, 1, args.n_masks)
    return common.mask_along(x, args.time_mask, 2, args.n_masks)  # x: (B, n_mels, T)


@torch.no_grad()
def predict(model: nn.Module, data: Data, split: str, args, device) -> np.ndarray:
    model.eval()
    idx = np.flatnonzero(data.ok[split])
    out = []
    for i in range(0, len(idx), 2 * args.batch_size):
        with common.autocast(device, common.amp_dtype(device, args.amp)):
            out.append(torch.sigmoid(model(data.batch(split, idx[i: i + 2 * args.batch_size], device)).float()).cpu())
    return torch.cat(out).numpy()


def evaluate(model: nn.Module, data: Data, split: str, args, device) -> float:
    """mAP over classes (the paper's metric) of the readable clips of a split."""
    return common.tagging_metrics(data.y[split][data.ok[split]], predict(model, data, split, args, device))["mAP"]


# =============================================================================================
# Training: one visible loop for every stage (Adam 1e-3, batch 64: Sec. 3.3)
# =============================================================================================
STAGE_HINT = "another --name/--teacher-dir or --no-resume"  # stage folders are keyed by common.claim_stage


def train(model: nn.Module, folder: Path, args, data: Data, total: int, step_fn, validate, device,
          seed: int, snapshot: int | None = None) -> dict:
    """`step_fn(step, x, idx, backward)` runs a step's forward/backward passes (gradients add up) and
    returns (loss, passes, forward MACs); one optimiser step follows. Validation every args.eval_every
    steps; last.pt (model, optimiser, curve, compute) is written then, so a killed stage resumes."""
    dtype = common.amp_dtype(device, args.amp)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = common.grad_scaler(device, dtype)
    state = {"step": 0, "passes": 0, "macs": 0, "curve": []}
    last = folder / "last.pt"
    folder.mkdir(parents=True, exist_ok=True)
    if last.exists():
        ck = common.load_checkpoint(last, device)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        if state["step"] < total:
            print(f"{folder}: resumed at step {state['step']}/{total}")
    logger = common.RunLogger(folder)
    bar = tqdm(total=total, initial=min(state["step"], total), desc=folder.name, leave=False)
    losses = []
    while state["step"] < total:
        idx = data.train_batch(state["step"], args.batch_size, seed)
        model.train()
        opt.zero_grad(set_to_none=True)
        with common.autocast(device, dtype):
            loss, passes, macs = step_fn(state["step"], data.batch("train", idx, device), idx,
                                         lambda l: scaler.scale(l).backward())
        scaler.step(opt)
        scaler.update()
        losses.append(loss)
        state["step"] += 1
        state["passes"], state["macs"] = state["passes"] + passes, state["macs"] + macs
        bar.update(1)
        if state["step"] % args.eval_every == 0 or state["step"] == total:
            record = {"stage": folder.name, "step": state["step"], "train/loss": float(np.mean(losses)),
                      **validate(model)}
            state["curve"].append(record)
            logger.log(record)
            losses = []
            common.save_checkpoint(last, {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state})
        if state["step"] == snapshot:  # the weights at an intermediate step (Table 2's +10K)
            common.save_checkpoint(folder / f"step{snapshot}.pt", {"model": model.state_dict()})
    bar.close()
    return {k: state[k] for k in ("step", "passes", "macs", "curve")}


def kd_loss(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Eq. 2: BCE between the student's probabilities and the teacher's (no ground-truth term)."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft)


def save_model(path: Path, model: CNN10, args, corpus: common.Corpus, **extra) -> None:
    common.save_checkpoint(path, {"model": model.state_dict(), "config": model.config, "frontend": args.frontend,
                                  "labels": {"mids": corpus.labels.mids, "names": corpus.labels.names},
                                  "args": vars(args), **extra})


def train_plain(model: CNN10, folder: Path, args, data: Data, total: int, targets: np.ndarray, device, seed: int,
                corpus, mixup: bool = False, snapshot: int | None = None) -> tuple[CNN10, dict]:
    """Teacher (BCE on labels, SpecAugment + mix-up), scratch baseline (BCE on labels, SpecAugment) or
    KD student (BCE on the teacher's probabilities, SpecAugment): stage folder with final.pt."""
    final = folder / "final.pt"
    if final.exists():
        ck = common.load_checkpoint(final)
        model.load_state_dict(ck["model"])
        return model, ck["info"]
    y_all = torch.from_numpy(targets)
    macs = count_macs(model.config, data.frames) * args.batch_size

    def step_fn(step, x, idx, backward):
        y = y_all[idx].to(x.device)
        mixed = {"y": y}

        def augment(h):
            h = spec_augment(h, args)
            if mixup:  # teacher only (Sec. 3.2), labels mixed alike
                h, mixed["y"] = common.mixup(h, y, args.mixup_alpha)
            return h
        loss = F.binary_cross_entropy_with_logits(model(x, augment).float(), mixed["y"])
        backward(loss)
        return loss.item(), 1, macs

    info = train(model, folder, args, data, total, step_fn,
                 lambda m: {"val/mAP": evaluate(m, data, "valid", args, device)}, device, seed, snapshot)
    info["params"] = count_params(model.config)
    save_model(final, model, args, corpus, info=info)
    return model, info


# =============================================================================================
# Paper procedures: teacher, supernet training, BN recalibration, search, export
# =============================================================================================
def get_teacher(args, corpus, data: Data, space: SearchSpace, device) -> tuple[CNN10, dict, np.ndarray]:
    """Sec. 3.2: CNN10 on the balanced set, mix-up + SpecAugment, 400K steps (scaled), or --teacher.
    Its probabilities on the clean training clips (eval mode) are the soft labels, cached."""
    if args.teacher:
        ck = common.load_checkpoint(args.teacher)
        teacher, info, folder = build_model(ck).to(device), ck.get("info", {}), Path(args.teacher).parent
    else:
        folder = Path(args.teacher_dir or Path(args.out).parent / f"teacher_{args.preset}_u{args.unit_steps}_"
                      f"{corpus.root.name}")
        settings = {k: getattr(args, k) for k in ("width_mult", "unit_steps", "frontend", "data", "batch_size", "lr",
                                                   "mixup_alpha", "time_mask", "freq_mask", "n_masks", "teacher_seed",
                                                   "max_steps", "synth_clip_seconds", "eval_every")}
        common.claim_stage(folder, {**settings, "corpus": str(corpus.root.resolve())}, hint=STAGE_HINT)
        common.seed_everything(args.teacher_seed)
        teacher = CNN10(**space.full()).to(device)
        print(f"teacher: CNN10, {count_params(teacher.config):,} parameters, {steps(args, 400_000)} steps")
        teacher, info = train_plain(teacher, folder, args, data, steps(args, 400_000), data.y["train"], device,
                                    args.teacher_seed, corpus, mixup=True)
    cache = folder / f"soft_{args.data}.npy"
    if cache.exists():
        soft = np.load(cache)
    else:
        soft = np.zeros_like(data.y["train"])
        soft[data.ok["train"]] = predict(teacher, data, "train", args, device)
        np.save(cache, soft)
    return teacher.eval(), info, soft


def recalibrate_bn(model: CNN10, data: Data, args, device) -> CNN10:
    """Deviation 2 (once-for-all's set_running_statistics): every BN's running mean / variance become
    the batch-size-weighted average of batch statistics over a fixed subset of clean training clips
    (batch 200), computed in train mode for BN only; nothing else in the model changes."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    idx = data.train_idx[np.random.default_rng(0).permutation(len(data.train_idx))[:args.bn_recal_clips]]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    seen = 0
    with torch.no_grad():
        for i in range(0, len(idx), 200):
            b = idx[i: i + 200]
            for m in bns:
                m.momentum = len(b) / (seen + len(b))  # running = weighted mean of the batches so far
            model(data.batch("train", b, device))
            seen += len(b)
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def export_subnet(supernet: Supernet, cfg: dict) -> CNN10:
    """A standalone plain CNN10 with the sub-network's weights copied out: every tensor is the first
    entries of the supernet's along each axis (conv [:out, :in], BN [:C], linear [:out, :in])."""
    plain = CNN10(**cfg).to(next(supernet.parameters()).device)
    full = supernet.state_dict()
    plain.load_state_dict({k: full[k][tuple(slice(0, n) for n in v.shape)].clone()
                           for k, v in plain.state_dict().items()})
    return plain


def candidate(supernet: Supernet, space: SearchSpace, arch: tuple, data: Data, args, device) -> CNN10:
    plain = export_subnet(supernet, space.config(arch))
    return recalibrate_bn(plain, data, args, device) if args.bn_recal else plain.eval()


def train_supernet(args, corpus, data: Data, space: SearchSpace, soft: np.ndarray, device) -> tuple[Supernet, dict]:
    """Sec. 2.3 / 3.3: the largest sub-network alone for 100K steps, then K = 4 uniformly sampled
    sub-networks per step for 200K steps (gradients summed, one optimiser step), every pass trained by
    Eq. 2 on SpecAugmented input against the cached teacher probabilities."""
    folder = Path(args.out) / "supernet"
    net = Supernet(len(corpus.labels), 64, space.channels, space.fc).to(device)
    if (folder / "final.pt").exists():
        ck = common.load_checkpoint(folder / "final.pt")
        net.load_state_dict(ck["model"])
        return net, ck["info"]
    common.seed_everything(args.seed)
    net = Supernet(len(corpus.labels), 64, space.channels, space.fc).to(device)
    n_largest, n_sampled = steps(args, 100_000), steps(args, 200_000)
    soft_t = torch.from_numpy(soft)
    print(f"supernet: {len(space.all())} sub-networks ({SPACES[args.elastic_depth]}), {n_largest} + {n_sampled} "
          f"steps, K = {args.subnets_per_step}")

    def step_fn(step, x, idx, backward):
        if step < n_largest:
            archs = [space.largest]
        else:  # seeded by (seed, step, k): the same sub-networks after a resume
            archs = [space.sample(np.random.default_rng([args.seed, step, k])) for k in range(args.subnets_per_step)]
        total, macs = 0.0, 0
        for arch in archs:
            cfg = space.config(arch)
            net.set_active(cfg)
            loss = kd_loss(net(x, lambda h: spec_augment(h, args)), soft_t[idx].to(x.device))
            backward(loss)
            total, macs = total + loss.item(), macs + count_macs(cfg, data.frames) * len(idx)
        net.set_active(space.config(space.largest))
        return total / len(archs), len(archs), macs

    def validate(_):
        return {f"val/mAP_{n}": evaluate(candidate(net, space, a, data, args, device), data, "valid", args, device)
                for n, a in (("largest", space.largest), ("smallest", space.smallest))}
    info = train(net, folder, args, data, n_largest + n_sampled, step_fn, validate, device, args.seed)
    info["largest_steps"], info["sampled_steps"] = n_largest, n_sampled
    common.save_checkpoint(folder / "final.pt", {"model": net.state_dict(), "info": info, "args": vars(args)})
    return net, info


def search_subnets(supernet: Supernet, space: SearchSpace, args, data: Data, device, folder: Path) -> dict:
    """Sec. 2.4: per budget N, the sub-networks with N - eps <= params <= N + eps; p of them drawn
    without replacement (all when the window holds fewer), each BN-recalibrated and scored on the
    validation split (and, for Fig. 4, on eval); the best by validation mAP is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    cache_path = folder / "candidates.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    archs = space.all()
    params = {a: space.params(a) for a in archs}
    out = {}
    for b in floats(args.budgets):
        lo, hi = budget_window(space, b, args.tolerance)
        window = [a for a in archs if lo <= params[a] <= hi]
        rng = np.random.default_rng([args.seed, round(b * 1000)])
        chosen = window if len(window) <= args.population else \
            [window[i] for i in sorted(rng.choice(len(window), args.population, replace=False))]
        for a in tqdm(chosen, desc=f"search {b:g}M", leave=False):
            if arch_name(a) not in cache:
                m = candidate(supernet, space, a, data, args, device)
                cache[arch_name(a)] = {"arch": a, "params": params[a], "val": evaluate(m, data, "valid", args, device),
                                       "eval": evaluate(m, data, "eval", args, device)}
                common.write_json(cache_path, cache)
        cands = [cache[arch_name(a)] for a in chosen]
        best = max(cands, key=lambda c: c["val"]) if cands else None
        out[f"{b:g}"] = {"budget_M": b, "window": [lo, hi], "in_window": len(window), "evaluated": len(cands),
                         "exhaustive": len(window) <= args.population, "candidates": cands, "best": best}
        print(f"budget {b:g}M: window {lo:,.0f}-{hi:,.0f} params holds {len(window)} sub-networks, "
              f"{len(cands)} evaluated" + (f"; best {arch_name(best['arch'])} ({best['params']:,}) val mAP "
                                           f"{best['val']:.4f}" if best else ""))
    return out


def export(supernet: Supernet, space: SearchSpace, arch: tuple, data: Data, args, device, corpus, path: Path) -> dict:
    """Plain CNN10 checkpoint + TorchScript (waveform -> probabilities) of a searched sub-network,
    verified: the plain module equals the sub-network inside the supernet (same BN statistics), and
    TorchScript equals the plain module (after BN recalibration)."""
    record = path.with_suffix(".json")
    if record.exists() and path.exists() and path.with_suffix(".ts").exists():
        done = json.loads(record.read_text())
        if done["arch"] == [list(a) for a in arch]:
            return done
    cfg = space.config(arch)
    supernet.eval().set_active(cfg)
    plain = export_subnet(supernet, cfg).eval()
    x = data.batch("valid", np.flatnonzero(data.ok["valid"])[:8], device)
    with torch.no_grad():
        diff_super = (supernet(x) - plain(x)).abs().max().item()
    supernet.set_active(space.config(space.largest))
    if args.bn_recal:
        recalibrate_bn(plain, data, args, device)
    tagger = Tagger(args.frontend, plain).eval()
    wave = torch.randn(2, int(args.synth_clip_seconds * common.LOGMEL_PRESETS[args.frontend]["sr"]), device=device)
    with torch.no_grad():
        ts = torch.jit.trace(tagger, wave, check_trace=False)
        diff_ts = (ts(wave) - tagger(wave)).abs().max().item()
    if max(diff_super, diff_ts) > 1e-4:
        raise RuntimeError(f"export of {arch_name(arch)} differs: supernet {diff_super:.2e}, TorchScript {diff_ts:.2e}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ts.save(str(path.with_suffix(".ts.tmp")))  # atomic, as every checkpoint
    path.with_suffix(".ts.tmp").replace(path.with_suffix(".ts"))
    save_model(path, plain, args, corpus, arch=arch, params=count_params(cfg))
    done = {"arch": arch, "params": count_params(cfg), "max_diff_supernet": diff_super, "max_diff_torchscript": diff_ts,
            "checkpoint": str(path), "torchscript": str(path.with_suffix(".ts"))}
    common.write_json(record, done)
    return done


# =============================================================================================
# Tables: Table 1 baselines, Table 2 fine-tuning, Fig. 3 / Fig. 4
# =============================================================================================
def compute(info: dict) -> str:
    return f"{info['step']} steps, {info['passes']} passes, {info['macs'] / 1e9:,.0f} GMAC"


def baselines(args, corpus, data, space, soft, sup_info, device) -> list[dict]:
    """Sec. 3.2: width r in every dynamic block, depth 2, trained alone from scratch (BCE + SpecAugment) or
    by KD (Eq. 2 + SpecAugment) for 100K steps (scaled); KD-equal gets the supernet's 300K updates."""
    rows = []
    for r in floats(args.baseline_widths):
        arch = tuple((r, 2) for _ in space.depths)
        cfg = space.config(arch)
        kinds = [("scratch", steps(args, 100_000), data.y["train"]), ("KD", steps(args, 100_000), soft)]
        for kind, n, targets in kinds + ([("KD, equal updates", sup_info["step"], soft)] if args.kd_equal else []):
            folder = Path(args.out) / "baselines" / f"{kind.split(',')[0]}{'_eq' if ',' in kind else ''}_r{r:g}"
            common.claim_stage(folder, {"arch": arch_name(arch), "kind": kind, "steps": n, "seed": args.seed,
                                        "teacher": args.teacher or args.teacher_dir}, hint=STAGE_HINT)
            common.seed_everything(args.seed)
            model, info = train_plain(CNN10(**cfg).to(device), folder, args, data, n, targets, device, args.seed,
                                      corpus)
            rows.append({"kind": kind, "r": r, "arch": arch, "params": count_params(cfg),
                         "mAP": evaluate(model, data, "eval", args, device), "info": info})
    return rows


def finetune(args, corpus, data, space, soft, searched: dict, device) -> list[dict]:
    """Sec. 4.3: continual KD fine-tuning of each searched sub-network (one +100K run, evaluated after
    10K and 100K steps, scaled) and the same architecture trained by KD from scratch (Init+100K)."""
    rows = []
    n10, n100 = steps(args, 10_000), steps(args, 100_000)
    for b, s in searched.items():
        arch = tuple(map(tuple, s["arch"]))
        folder = Path(args.out) / "finetune" / f"budget_{b}M"
        common.claim_stage(folder, {"arch": arch_name(arch), "seed": args.seed, "steps": [n10, n100]}, hint=STAGE_HINT)
        common.seed_everything(args.seed)
        start = build_model(common.load_checkpoint(s["checkpoint"])).to(device)
        model, info = train_plain(start, folder / "ft", args, data, n100, soft, device, args.seed, corpus, snapshot=n10)
        snap = CNN10(**model.config).to(device)
        snap.load_state_dict(common.load_checkpoint(folder / "ft" / f"step{n10}.pt")["model"])
        common.seed_everything(args.seed)
        init, init_info = train_plain(CNN10(**space.config(arch)).to(device), folder / "init", args, data, n100, soft,
                                      device, args.seed, corpus)
        rows.append({"budget": b, "arch": arch, "params": s["params"], "OFA": s["mAP"],
                     "+10K": evaluate(snap, data, "eval", args, device),
                     "+100K": evaluate(model, data, "eval", args, device),
                     "Init+100K": evaluate(init, data, "eval", args, device), "info": info, "init_info": init_info})
    return rows


def fig4_rows(search: dict) -> list[list]:
    rows = []
    for b, s in search.items():
        v = [c["val"] for c in s["candidates"]]
        e = [c["eval"] for c in s["candidates"]]
        if not v:
            rows.append([f"{b}M", s["in_window"], 0, "-", "-", "-", "-"])
            continue
        rows.append([f"{b}M", s["in_window"], f"{len(v)}" + (" (all)" if s["exhaustive"] else ""),
                     f"{min(e):.4f} / {np.median(e):.4f} / {max(e):.4f}", f"{np.mean(e):.4f}",
                     f"{min(v):.4f} / {np.median(v):.4f} / {max(v):.4f}", f"{np.std(e):.4f}"])
    return rows


def plot_fig4(path: Path, spaces: dict) -> bool:
    """Box plots of the candidates' eval mAP per budget and search space (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    n = len(spaces)
    for j, (name, search) in enumerate(spaces.items()):
        keys = list(search)
        data = [[c["eval"] for c in search[k]["candidates"]] or [np.nan] for k in keys]
        pos = [i * (n + 1) + j for i in range(len(keys))]
        ax.boxplot(data, positions=pos, widths=0.8, showmeans=True, patch_artist=True,
                   boxprops={"facecolor": f"C{j}"})
        ax.plot([], [], color=f"C{j}", label=name)
    first = list(next(iter(spaces.values())))
    ax.set_xticks([i * (n + 1) for i in range(len(first))], [f"{k}M" for k in first])
    ax.set_ylabel("eval mAP"), ax.legend(), fig.tight_layout(), fig.savefig(path, dpi=120)
    return True


# =============================================================================================
# main: teacher -> supernet -> search -> export -> eval [-> baselines -> fine-tuning]
# =============================================================================================
def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    device = common.pick_device(args.device)
    synthetic = args.data_root is None or (Path(args.data_root) / "synth.json").exists()
    args = resolve(args, synthetic)
    if args.data_root is not None and synthetic:  # the corpus decides the clip length
        args.synth_clip_seconds = json.loads((Path(args.data_root) / "synth.json").read_text())["clip_seconds"]
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, 0)  # dev. 5
    out = Path(args.out)
    if not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    if (out / "config.json").exists():
        old = json.loads((out / "config.json").read_text())
        diff = sorted(k for k, v in vars(args).items() if k not in NOT_RESULT_KEYS and old.get(k, v) != v)
        if diff:
            flags = ", ".join("--" + d.replace("_", "-") for d in diff)
            raise common.DataError(f"{out}: was run with other settings ({flags}); pass --no-resume to start over "
                                   "or use another --name")
    common.save_config(out, args)
    data = Data(corpus, args, device)
    space = make_space(args, len(corpus.labels))
    full = count_params(space.full())

    # ---- stage 1: teacher and its soft labels
    teacher, t_info, soft = get_teacher(args, corpus, data, space, device)
    t_map = evaluate(teacher, data, "eval", args, device)
    print(f"teacher eval mAP {t_map:.4f}")
    # ---- stage 2: supernet
    supernet, s_info = train_supernet(args, corpus, data, space, soft, device)
    # ---- stage 3: search, stage 4: export, stage 5: eval
    search = search_subnets(supernet, space, args, data, device, out / "search")
    searched = {}
    for b, s in search.items():
        if s["best"] is not None:
            arch = tuple(map(tuple, s["best"]["arch"]))
            ex = export(supernet, space, arch, data, args, device, corpus, out / "export" / f"budget_{b}M.pt")
            plain = build_model(common.load_checkpoint(ex["checkpoint"])).to(device)
            searched[b] = {**ex, "mAP": evaluate(plain, data, "eval", args, device), "val": s["best"]["val"]}
    base = baselines(args, corpus, data, space, soft, s_info, device) if args.baselines else []
    ft = finetune(args, corpus, data, space, soft, searched, device) if args.finetune else []

    # ---- results
    pct = lambda m: f"{100 * m / t_map:.1f}"
    p_m = lambda n: f"{n:,} ({100 * n / full:.1f}%)"
    t1 = [["teacher CNN10", p_m(full), f"{100 * t_map:.2f}", "100.0", compute(t_info) if "step" in t_info else "-",
           f"5.2M: {PAPER_TEACHER}"]]
    for b in sorted({float(k) for k in searched} | {b for b in PAPER_T1 if any(
            abs(r["r"] - PAPER_T1[b][0]) < 1e-9 for r in base)}):
        paper = PAPER_T1.get(b)
        for r in base:
            if paper and abs(r["r"] - paper[0]) < 1e-9:
                ref = {"scratch": paper[2], "KD": paper[3]}.get(r["kind"], "-")
                t1.append([f"{r['kind']} (r={r['r']:g}, depth 2)", p_m(r["params"]), f"{100 * r['mAP']:.2f}",
                           pct(r["mAP"]), compute(r["info"]), f"{paper[1]}M: {ref}"])
        if f"{b:g}" in searched:
            s = searched[f"{b:g}"]
            t1.append([f"OFA {b:g}M budget: {arch_name(s['arch'])}", p_m(s["params"]), f"{100 * s['mAP']:.2f}",
                       pct(s["mAP"]), "shared: " + compute(s_info), f"{paper[4]}M: {paper[5]}" if paper else "-"])
    md = [f"# OFA-AEC: {args.name}", "",
          f"{args.preset} preset: CNN10 width x{args.width_mult:g} ({full:,} parameters, "
          f"{len(corpus.labels)} classes), "
          f"{args.frontend} log-mels, {data.frames} frames, {SPACES[args.elastic_depth]} with widths {args.widths}, "
          f"elastic FC {args.elastic_fc}, BN recalibration {args.bn_recal}; unit = {args.unit_steps} steps per 100K "
          f"paper iterations; data {args.data} ({len(data.train_idx)} clips; skipped unreadable: {data.skipped}); "
          f"{(time.time() - t0) / 60:.1f} min.", "",
          "## Table 1 (eval mAP %; compute: optimiser steps, sub-network passes, forward MACs)", "",
          common.markdown_table(["model", "params (% of full)", "mAP %", "% of teacher", "compute", "paper"], t1), "",
          f"## Fig. 4: candidates per budget ({SPACES[args.elastic_depth]})", "",
          common.markdown_table(["budget", "in window", "evaluated", "eval mAP min / median / max", "eval mean",
                                 "val mAP min / median / max", "eval std"], fig4_rows(search)), "",
          "Exported sub-networks (max |difference| to the supernet's sub-network / TorchScript):", ""]
    md += [f"- {b}M: `{s['checkpoint']}` {arch_name(s['arch'])}, {s['params']:,} params, "
           f"{s['max_diff_supernet']:.1e} / {s['max_diff_torchscript']:.1e}" for b, s in searched.items()]
    if ft:
        md += ["", "## Table 2: continual fine-tuning (eval mAP %)", "",
               common.markdown_table(["budget", "sub-network", "params", "OFA", "+10K", "+100K", "Init+100K", "paper"],
                                     [[f"{r['budget']}M", arch_name(r["arch"]), f"{r['params']:,}"]
                                      + [f"{100 * r[k]:.2f}" for k in ("OFA", "+10K", "+100K", "Init+100K")] + [
                                       " / ".join(map(str, PAPER_T2.get(float(r["budget"]), ())[1:])) or "-"]
                                      for r in ft])]
    results = {"name": args.name, "teacher": {"mAP": t_map, "params": full, "info": t_info}, "supernet": s_info,
               "search": search, "searched": searched, "baselines": base, "finetune": ft,
               "space": args.elastic_depth, "minutes": (time.time() - t0) / 60, "config": vars(args)}
    common.write_results(out, results, "\n".join(md))
    print("\n".join(md))
    return results


def run_fig3(args: argparse.Namespace) -> None:
    """Fig. 3 / Fig. 4: one supernet per search space (shared teacher); best and spread per budget."""
    rows, spaces = [], {}
    for depth in SPACES:  # sibling runs (default names: the 2,2,X one is the default command's run)
        a = copy.copy(args)
        a.fig3, a.elastic_depth, a.name = False, depth, None
        a.widths = "0.2,0.4,0.6,0.8,1.0" if depth == "2,2,2" else args.widths  # EW-only adds 0.2 (Sec. 4.1)
        a.out = f"{args.out}_{depth.replace(',', '')}" if args.out else None
        r = run(a)
        spaces[SPACES[depth]] = r["search"]
        rows.append([SPACES[depth]] + [f"{100 * r['searched'][b]['mAP']:.2f} ({r['searched'][b]['params']:,})"
                                       if b in r["searched"] else "-" for b in r["search"]])
    out = Path(args.out or f"runs/ofa_aec/fig3_s{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    budgets = [f"{b:g}M" for b in floats(args.budgets)]
    md = ["# Fig. 3: best searched sub-network per budget (eval mAP %, params)", "",
          common.markdown_table(["space"] + budgets, rows), "", "# Fig. 4: candidate spread per budget", ""]
    for name_, search in spaces.items():
        md += [f"### {name_}", "", common.markdown_table(["budget", "in window", "evaluated", "eval min / median / max",
                                                          "eval mean", "val min / median / max", "eval std"],
                                                         fig4_rows(search)), ""]
    if plot_fig4(out / "fig4.png", spaces):
        md.append("![Fig. 4](fig4.png)")
    common.write_results(out, {"rows": rows, "spaces": spaces}, "\n".join(md))
    print("\n".join(md))


def counts_main(argv: list[str]) -> str:
    """`counts`: sub-network parameter counts at the paper's scale, --elastic-fc both ways."""
    p = argparse.ArgumentParser(prog="ofa_aec.py counts", description="parameter counts of the search space")
    p.add_argument("--classes", type=int, default=527)
    p.add_argument("--width-mult", type=float, default=1.0)
    a = p.parse_args(argv)
    rows = []
    spaces = {efc: SearchSpace(a.classes, 64, a.width_mult, [0.4, 0.6, 0.8, 1.0], "2,2,X", efc)
              for efc in (False, True)}
    for label, arch in [(f"r={r:g}, depth 2", ((r, 2),) * 3) for r in (0.4, 0.6, 0.8, 1.0)] + \
                       [("smallest (r=0.4, last block depth 1)", ((0.4, 2), (0.4, 2), (0.4, 1)))]:
        rows.append([label] + [f"{spaces[e].params(arch):,}" for e in (False, True)])
    n = {e: [spaces[e].params(x) for x in spaces[e].all()] for e in (False, True)}
    rows.append([f"range over the {len(n[False])} sub-networks"] +
                [f"{min(n[e]):,}-{max(n[e]):,}" for e in (False, True)])
    for b in (0.8, 1.8, 2.8, 3.8):  # how many sub-networks each search window holds (p = 25)
        rows.append([f"sub-networks in the {b:g} +- 0.2M window (scaled to this size)"] + [str(sum(
            budget_window(spaces[e], b, 0.2)[0] <= x <= budget_window(spaces[e], b, 0.2)[1] for x in n[e]))
            for e in (False, True)])
    md = common.markdown_table(["sub-network ([2,2,X] space)", "FC1 fixed 512",
                                "FC1 floor(r4*512) (--elastic-fc)"], rows)
    print(md + "\n\npaper: baselines 1.0 / 2.1 / 3.5M, sub-networks 0.6M to 5.2M (Sec. 3.3, Table 1)")
    return md


def summary_main(argv: list[str]) -> dict:
    """`summary RUN...`: mean +- std over seeds of every Table 1 / Table 2 row the runs share."""
    p = argparse.ArgumentParser(prog="ofa_aec.py summary", description="mean +- std of runs (seeds)")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None, help="folder for results.json/.md (default runs/ofa_aec/summary)")
    a = p.parse_args(argv)
    vals: dict[str, list] = {}
    for run_dir in a.runs:
        r = json.loads((Path(run_dir) / "results.json").read_text())
        vals.setdefault("teacher", []).append(r["teacher"]["mAP"])
        for b in r["baselines"]:
            vals.setdefault(f"{b['kind']} r={b['r']:g} ({b['params']:,} params)", []).append(b["mAP"])
        for b, s in r["searched"].items():
            vals.setdefault(f"OFA {b}M budget", []).append(s["mAP"])
        for f in r["finetune"]:
            for k in ("+10K", "+100K", "Init+100K"):
                vals.setdefault(f"OFA {f['budget']}M {k}", []).append(f[k])
    rows = [[k, len(v), common.mean_std(v, 100, 2),
             " ".join(f"{100 * x:.2f}" for x in v)] for k, v in vals.items()]
    md = "# OFA-AEC over seeds (eval mAP %, mean +- sample std)\n\n" + \
        common.markdown_table(["row", "runs", "mean +- std", "per run"], rows)
    out = Path(a.out or "runs/ofa_aec/summary")
    out.mkdir(parents=True, exist_ok=True)
    common.write_results(out, {"runs": a.runs, "values": vals}, md)
    print(md)
    return vals


def predict_main(argv: list[str]) -> None:
    """Tag audio files with an exported sub-network (checkpoint or TorchScript) or a teacher."""
    p = argparse.ArgumentParser(prog="ofa_aec.py predict", description="tag audio files")
    p.add_argument("--ckpt", required=True, help="export/budget_*.pt, its .ts, or teacher final.pt")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("files", nargs="+")
    a = p.parse_args(argv)
    path = Path(a.ckpt)
    ck = common.load_checkpoint(path.with_suffix(".pt"))
    model = torch.jit.load(str(path)) if path.suffix == ".ts" else Tagger(ck["frontend"], build_model(ck))
    model.eval()
    names, sr = ck["labels"]["names"], common.LOGMEL_PRESETS[ck["frontend"]]["sr"]
    for f in a.files:
        with torch.no_grad():
            probs = model(torch.from_numpy(common.load_audio(f, sr))[None])[0].numpy()
        print(f"{f}: " + ", ".join(f"{names[k]} {probs[k]:.2f}" for k in np.argsort(-probs)[:a.top]))


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"predict": predict_main, "counts": counts_main, "summary": summary_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads and common.pick_device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return run_fig3(args) if args.fig3 else run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        sys.exit(f"error: {e}")
