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

    python ofa_aec.py                                   # cpu preset: teacher -> supernet -> search -> export
                                                        # (~19 min on a 2-core CPU, --threads 1)
    python ofa_aec.py --baselines --finetune            # + Table 1 baselines and Table 2 fine-tuning
    python ofa_aec.py --fig3                            # Fig. 3/4: the four search spaces (sibling runs)
    python ofa_aec.py counts                            # parameter counts at 527 classes, --elastic-fc both ways
    python ofa_aec.py plot runs/ofa_aec/cpu_22X_s0      # accuracy against parameters, the paper's beside (PNG)
    python ofa_aec.py predict --ckpt runs/ofa_aec/cpu_22X_s0/export/budget_0.8M.pt data/synth_scale1_clip1_seed0/audio/eval/eval_00000.wav
    python ofa_aec.py --seed 1                          # more seeds (the teacher is shared), then mean +- std:
    python ofa_aec.py --seed 2
    python common.py seeds --row OFA runs/ofa_aec/cpu_22X_s0 runs/ofa_aec/cpu_22X_s1 runs/ofa_aec/cpu_22X_s2 --key mAP.OFA_800k --out runs/ofa_aec/seeds
    python ofa_aec.py plot runs/ofa_aec/seeds           # the seeds table: mean +- std error bars
    python ofa_aec.py --data-root data/audioset         # real AudioSet, paper preset (GPU)
    torchrun --nproc_per_node=4 ofa_aec.py --data-root data/audioset   # DDP: --batch-size is the global batch

A killed run continues bit-exactly when the same command is run again (every stage resumes from its
last.pt with every RNG state); --no-resume starts the run folder afresh (only this script's files are
removed). The teacher, its soft labels and the log-mel features are shared stages beside the run folder
(--shared-dir), in folders named by a hash of everything that changes them (the features: of every
clip's path, size and modification time).

Deviations from the paper (numbered as in docs/ofa_aec.md):
 1. CPU preset (`--preset cpu`, the default without a CUDA GPU): CNN10 at 1/8 width (8-16-32-64
    channels, FC 64), 1 s synthetic clips (101 frames), 100 steps per 100K paper iterations (teacher
    400, supernet 100 + 200, baselines 100, fine-tuning +10 / +100: the paper's ratios), time masks
    < 7 frames (64 of 1,001 frames scaled to 101). Budgets and tolerance are fractions of the full
    model's size (0.8M of 5.22M = 15.3 %, ...), so they hold other architectures than the paper's
    windows (`counts`: the 0.8 +- 0.2M window holds 10 sub-networks at 1/8 width and 30 classes, 4 at
    the paper's size). `--preset paper` (the default on a GPU) restores 64-128-256-512, 10 s clips,
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
import math
import os
import re
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
PRESETS = {"paper": dict(width_mult=1.0, synth_clip_seconds=10.0, unit_steps=100_000, time_mask=64),
           "cpu": dict(width_mult=0.125, synth_clip_seconds=1.0, unit_steps=100, time_mask=7)}  # deviation 1
SPACES = {"2,2,X": "EW+ED=[2,2,X]", "X,X,X": "EW+ED=[X,X,X]", "2,X,X": "EW+ED=[2,X,X]", "2,2,2": "EW-only"}
NOT_RESULT = ("threads", "shared_dir")  # where and how fast it runs: not part of any identity
# flags that add rows to the tables: not in the run folder's identity (a run gains rows; a finished run is
# returned as done only with the same rows)
ROW_FLAGS = ("baselines", "finetune", "baseline_widths", "kd_equal", "budgets", "fig3", *NOT_RESULT)
# every file this script writes in its run folder (claim_run: --no-resume removes these, nothing else)
OUTPUTS = ("supernet/*.pt*", "supernet/log.jsonl", "search/candidates.json*", "export/budget_*M.*",
           "baselines/*/*.pt*", "baselines/*/log.jsonl", "finetune/*/*/*.pt*", "finetune/*/*/log.jsonl", "fig4.png")


# =============================================================================================
# Arguments: every default is the paper's value (section in the help)
# =============================================================================================
RATIO = common.number(float, 0, 1, lo_open=True)  # a width ratio in (0, 1]



def number_list(parse):
    """argparse type: comma-separated numbers, each checked by `parse` (a bad one is a one-line error)."""
    def f(text: str) -> list:
        values = [parse(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers")
        return values
    f.__name__ = "list"
    return f


def build_parser() -> argparse.ArgumentParser:
    """The training command's parser (the sub-commands predict, counts and plot have their own)."""
    p = argparse.ArgumentParser(prog="ofa_aec.py", description=__doc__, formatter_class=common.HelpFormatter)
    common.add_common_args(p, "ofa_aec")
    p.set_defaults(synth_clip_seconds=None)  # from the preset (cpu: 1 s)
    g = p.add_argument_group("preset and front-end")
    g.add_argument("--preset", default="auto", choices=["auto", "paper", "cpu"],
                   help="paper: CNN10 64-128-256-512, 10 s clips, 100K-step unit; cpu: 1/8 width, 1 s clips, "
                        "100-step unit (deviation 1); auto: paper on a CUDA GPU, else cpu, whatever the corpus")
    g.add_argument("--width-mult", type=common.POSITIVE, default=None,
                   help="CNN10 channel multiplier (paper 1.0, cpu 0.125)")
    g.add_argument("--unit-steps", type=common.POSITIVE_INT, default=None,
                   help="steps per 100K paper iterations; every stage keeps the paper's ratio (Sec. 3.2, 3.3)")
    g.add_argument("--threads", type=common.NONNEG_INT, default=1,
                   help="CPU intra-op threads (0: torch's default); 1 is fastest on a shared machine")
    g.add_argument("--frontend", default="auto", choices=["auto", "panns32k", "panns16k"],
                   help="PANNs log-mel (Sec. 3.1: 32 kHz, 64 mels); auto: panns16k on the synthetic corpus")
    g.add_argument("--shared-dir", type=str, default=None,
                   help="folder of the shared stages (teacher, soft labels, log-mel features); default: beside --out")
    g = p.add_argument_group("teacher (Sec. 3.2)")
    g.add_argument("--teacher", type=str, default=None, help="use this CNN10 checkpoint instead of training one")
    g.add_argument("--teacher-seed", type=common.NONNEG_INT, default=0,
                   help="the teacher's seed (one teacher for all seeds)")
    g.add_argument("--mixup-alpha", type=common.POSITIVE, default=1.0,
                   help="teacher mix-up, lambda ~ Beta(a, a) (Sec. 3.2)")
    g = p.add_argument_group("supernet (Sec. 2.2, 2.3, 4.1)")
    g.add_argument("--elastic-depth", type=str, default="2,2,X", choices=list(SPACES),
                   help="depth per dynamic block: 2 fixed, X = 1 or 2 (Fig. 3; best: 2,2,X)")
    g.add_argument("--widths", type=number_list(RATIO), default=[0.4, 0.6, 0.8, 1.0],
                   help="width ratios in (0, 1] (Sec. 2.2); EW-only adds 0.2 (Sec. 4.1)")
    g.add_argument("--elastic-fc", action=argparse.BooleanOptionalAction, default=False,
                   help="FC1 outputs shrink with block 4's width (ambiguous in the paper: deviation 3)")
    g.add_argument("--subnets-per-step", type=common.POSITIVE_INT, default=4,
                   help="K sampled sub-networks per step (Sec. 3.3)")
    g = p.add_argument_group("training (Sec. 3.3)")
    g.add_argument("--batch-size", type=common.POSITIVE_INT, default=64,
                   help="batch size (Sec. 3.3); under torchrun the global batch, split over the processes")
    g.add_argument("--lr", type=common.POSITIVE, default=1e-3, help="Adam learning rate (Sec. 3.3)")
    g.add_argument("--time-mask", type=common.NONNEG_INT, default=None,
                   help="SpecAugment time stripes < T frames (64; cpu 7)")
    g.add_argument("--freq-mask", type=common.NONNEG_INT, default=8,
                   help="SpecAugment frequency stripes < F bins (Sec. 3.3)")
    g.add_argument("--n-masks", type=common.NONNEG_INT, default=2, help="stripes per axis (Sec. 3.3)")
    g.add_argument("--eval-every", type=common.POSITIVE_INT, default=None,
                   help="validate (and checkpoint) every N steps (default unit/10)")
    g = p.add_argument_group("search (Sec. 2.4, 3.3)")
    g.add_argument("--budgets", type=number_list(common.POSITIVE), default=[0.8, 1.8, 2.8, 3.8],
                   help="parameter budgets in M at the paper's scale (scaled by the full model's size)")
    g.add_argument("--tolerance", type=common.NONNEG, default=0.2, help="epsilon in M (Sec. 3.3)")
    g.add_argument("--population", type=common.POSITIVE_INT, default=25, help="p candidates per budget (Sec. 3.3)")
    g.add_argument("--bn-recal", action=argparse.BooleanOptionalAction, default=True,
                   help="re-estimate BN statistics per candidate (once-for-all practice: deviation 2)")
    g.add_argument("--bn-recal-clips", type=common.POSITIVE_INT, default=2000,
                   help="training clips for BN re-estimation (OFA)")
    g = p.add_argument_group("tables (Sec. 3.4, 4.1-4.3)")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=False,
                   help="Table 1: scratch, KD and KD with the supernet's number of updates")
    g.add_argument("--kd-equal", action=argparse.BooleanOptionalAction, default=True,
                   help="with --baselines: also KD for as many updates as the supernet's shared weights (300K)")
    g.add_argument("--baseline-widths", type=number_list(RATIO), default=[0.4, 0.6, 0.8],
                   help="baseline architectures: width r in all dynamic blocks, depth 2 (Sec. 3.2)")
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=False,
                   help="Table 2: searched sub-networks +10K / +100K KD steps and Init+100K")
    g.add_argument("--fig3", action="store_true", help="train the four search spaces (Fig. 3, Fig. 4)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve(a: argparse.Namespace) -> tuple[argparse.Namespace, common.Corpus]:
    """Derived values, computed once after parsing (deviation 1 for the cpu preset), the corpus, and the
    checks that need it (before anything is written)."""
    a = copy.copy(a)
    synthetic = a.data_root is None or (Path(a.data_root) / "synth.json").exists()
    common.apply_preset(a, PRESETS, "ofa_aec")  # what the flags leave unset
    a.frontend = a.frontend if a.frontend != "auto" else "panns16k" if synthetic else "panns32k"
    a.eval_every = a.eval_every or max(1, a.unit_steps // 10)
    a.name = a.name or f"{a.preset}_{a.elastic_depth.replace(',', '')}" + ("_efc" if a.elastic_fc else "") + \
        f"_s{a.seed}"
    a.out = a.out or str(Path("runs/ofa_aec") / a.name)
    a.shared_dir = a.shared_dir or str(Path(a.out).parent)
    corpus = common.load_corpus(a.data_root, a.data, a.synth_scale, a.synth_clip_seconds, 0)  # deviation 5
    a.clip_seconds = corpus.clip_seconds or 10.0  # the corpus decides the clip length (AudioSet: 10 s)
    if a.seed < 0:  # seeds name numpy streams (seed, epoch)
        raise common.DataError(f"--seed {a.seed}: expected a non-negative integer")
    if a.batch_size % common.world_size():
        raise common.DataError(f"--batch-size {a.batch_size}: not divisible by the {common.world_size()} processes")
    space = make_space(a, len(corpus.labels))
    if min(min(b) for b in space.config(space.smallest)["blocks"]) < 1:
        raise common.DataError(f"--width-mult {a.width_mult:g} with --widths {a.widths}: a block of 0 channels")
    if a.teacher:
        ck = load_cnn10(a.teacher, "--teacher")
        if ck["config"]["n_classes"] != len(corpus.labels) or ck["frontend"] != a.frontend:
            raise common.DataError(f"--teacher {a.teacher}: {ck['config']['n_classes']} classes, {ck['frontend']} "
                                   f"front-end; this run has {len(corpus.labels)} classes, {a.frontend}")
    return a, corpus


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

    def forward(self, mel: torch.Tensor, augment=None, cfgs: list[dict] | None = None) -> torch.Tensor:
        """The active sub-network's logits (B, K); with `cfgs`, one training step's passes (Sec. 2.3): each
        sub-network on the same batch with its own augmentation draw, logits (P, B, K), in one forward (so
        that DDP syncs the summed gradients once); the full network is active again after."""
        if cfgs is None:
            return super().forward(mel, augment)
        logits = []
        for cfg in cfgs:
            self.set_active(cfg)
            logits.append(super().forward(mel, augment))
        self.set_active(self.config)
        return torch.stack(logits)


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


def build_model(ckpt: dict, path: str | Path = "checkpoint") -> CNN10:
    """Rebuild a plain CNN10 (teacher or exported sub-network) from a checkpoint alone; weights that do not
    fit its config are one line naming the file."""
    try:
        model = CNN10(**ckpt["config"])
    except (TypeError, ValueError, RuntimeError, IndexError):  # a config this script did not write
        raise common.DataError(f"{path}: not a CNN10 checkpoint of ofa_aec.py (config {ckpt['config']})") from None
    if not isinstance(ckpt.get("model"), dict):
        raise common.DataError(f"{path}: not a CNN10 checkpoint of ofa_aec.py (no weights)")
    common.load_weights(model, ckpt["model"], path)
    return model


def load_cnn10(path: str | Path, flag: str) -> dict:
    """A CNN10 checkpoint written by this script (a stage's final.pt, an export), or one line naming the file."""
    try:
        ck = common.load_checkpoint(path, script="ofa_aec")
    except common.DataError:
        raise
    except Exception:
        raise common.DataError(f"{flag} {path}: not a readable checkpoint") from None
    cfg = ck.get("config") if isinstance(ck, dict) else None
    if not isinstance(cfg, dict) or set(cfg) != {"n_classes", "n_mels", "blocks", "fc"} or "frontend" not in ck \
            or ck.get("script", "ofa_aec") != "ofa_aec":
        raise common.DataError(f"{flag} {path}: not a CNN10 checkpoint of ofa_aec.py")
    return ck


def save_model(path: Path, model: CNN10, args, data: "Data", **extra) -> None:
    """A self-describing plain CNN10 checkpoint: predict and --teacher rebuild the model from it alone."""
    common.save_checkpoint(path, {"script": "ofa_aec", "model": common.unwrap(model).state_dict(),
                                  "config": model.config, "frontend": args.frontend, "labels": data.labels,
                                  "args": vars(args), **extra})




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
    return SearchSpace(n_classes, n_mels, args.width_mult, args.widths, args.elastic_depth, args.elastic_fc)


def budget_window(space: SearchSpace, budget_m: float, tol_m: float) -> tuple[float, float]:
    """[N - eps, N + eps] in parameters, scaled by the full model's size (527 classes, width 1: the paper's)."""
    scale = count_params(space.full()) / FULL_527
    return (budget_m - tol_m) * 1e6 * scale, (budget_m + tol_m) * 1e6 * scale




# =============================================================================================
# Data: log-mels computed once per clip and cached (deviation 4), labels, the epochs' batch order
# =============================================================================================
def files_id(root: Path, rows: list) -> str:
    """Identity of files (a split's audio): a hash of every file's path, size and modification time (a
    replaced clip gives another feature cache; the folder's path alone would not)."""
    h = hashlib.sha1(str(Path(root).resolve()).encode())
    for fn, _ in rows:
        try:
            st = os.stat(Path(root) / fn)
            h.update(f"{fn}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{fn}\tmissing\n".encode())
    return h.hexdigest()[:16]


class Data:
    """Log-mels (N, n_mels, T) float16 per split, memory-mapped from shared stage folders keyed by the front-end,
    the clip length and the split's files; targets; the readable clips; the training batches."""

    def __init__(self, corpus: common.Corpus, args, device: torch.device):
        sr = common.LOGMEL_PRESETS[args.frontend]["sr"]
        frontend = common.LogMel.preset(args.frontend).to(device)
        self.frames = int(round(args.clip_seconds * sr)) // frontend.hop + 1
        self.labels = {"mids": corpus.labels.mids, "names": corpus.labels.names}
        splits = {"train": corpus.train, "valid": corpus.valid or corpus.train, "eval": corpus.eval}
        if corpus.valid is None:
            print("no valid.tsv: validating and searching on the training set")
        self.x, self.y, self.ok, self.ident = {}, {}, {}, {}
        for split, rows in splits.items():
            folder = common.stage_dir(args.shared_dir, "features", {
                "frontend": args.frontend, "clip_seconds": args.clip_seconds, "files": files_id(corpus.root, rows)})
            with common.RunLock(folder, wait=True):  # rank 0 extracts; a second run waits, then reuses
                if common.is_main() and not (folder / "logmel.npy").exists():
                    self.extract(corpus, rows, frontend, sr, args.clip_seconds, self.frames, folder, args.workers)
            common.barrier()  # the features are complete before any rank maps them
            self.x[split] = np.load(folder / "logmel.npy", mmap_mode="r")
            self.ok[split] = np.load(folder / "ok.npy")
            true = split == "eval" and corpus.true  # the synthetic corpus scores eval against the true labels
            self.y[split] = (corpus.true_targets(rows) if true else corpus.targets(rows)).astype(np.float32)
            self.ident[split] = [folder.name, hashlib.sha1(self.y[split].tobytes()).hexdigest()[:10]]
        self.train_idx = np.flatnonzero(self.ok["train"])  # unreadable clips are skipped (counted)
        self.skipped = {s: int((~ok).sum()) for s, ok in self.ok.items()}
        self.order = (None, None)  # ((seed, epoch, batch size), that epoch's batch order)

    @staticmethod
    def extract(corpus, rows, frontend, sr, clip_s, frames, folder, workers) -> None:
        ds = common.ClipDataset(corpus.root, rows, np.zeros((len(rows), 1), np.float32), clip_s, sr)
        tmp = folder / "logmel.tmp.npy"
        out = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(rows), frontend.fb.shape[1], frames))
        ok = np.zeros(len(rows), bool)
        with torch.no_grad():
            for batch in tqdm(common.make_loader(ds, 64, workers=workers), desc=f"log-mel {folder.name}", leave=False):
                if batch is not None:
                    wave, _, idx = batch
                    out[idx.numpy()] = frontend(wave.to(frontend.fb.device)).cpu().numpy().astype(np.float16)
                    ok[idx.numpy()] = True
        out.flush()
        del out
        np.save(folder / "ok.npy", ok)
        tmp.replace(folder / "logmel.npy")

    def batch(self, split: str, idx: np.ndarray) -> torch.Tensor:
        """Log-mels of clips `idx` as float32 (B, n_mels, T) on the CPU (pinned for a CUDA copy)."""
        order = np.argsort(idx)  # sorted reads from the memmap, original order restored
        x = np.empty((len(idx), *self.x[split].shape[1:]), np.float32)
        x[order] = self.x[split][idx[order]]
        x = torch.from_numpy(x)
        return x.pin_memory() if torch.cuda.is_available() else x

    def train_batch(self, step: int, batch_size: int, seed: int) -> np.ndarray:
        """Batch `step` of a sequence of epochs: each epoch a permutation of the readable training clips drawn
        once from (seed, epoch), its last batch wrapped to its start; this process's share under DDP."""
        per_epoch = -(-len(self.train_idx) // batch_size)
        epoch, offset = divmod(step, per_epoch)
        if self.order[0] != (seed, epoch, batch_size):
            perm = np.random.default_rng([seed, epoch]).permutation(len(self.train_idx))
            self.order = ((seed, epoch, batch_size), self.train_idx[np.resize(perm, per_epoch * batch_size)])
        return common.shard(self.order[1][offset * batch_size: (offset + 1) * batch_size])


def bn_batches(data: Data, args, device):
    """Deviation 2: a fixed subset of up to --bn-recal-clips clean training clips, batches of 200."""
    idx = data.train_idx[np.random.default_rng(0).permutation(len(data.train_idx))[:args.bn_recal_clips]]
    return (data.batch("train", idx[i: i + 200]).to(device) for i in range(0, len(idx), 200))


def spec_augment(x: torch.Tensor, args) -> torch.Tensor:
    """2 frequency stripes < F bins and 2 time stripes < T frames, per sample, zero fill (Sec. 3.3)."""
    x = common.mask_along(x, args.freq_mask, 1, args.n_masks)
    return common.mask_along(x, args.time_mask, 2, args.n_masks)  # x: (B, n_mels, T)


def mix(t: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Mix-up (Sec. 3.2): row i becomes lam_i * t_i + (1 - lam_i) * t_perm(i) (inputs and labels alike)."""
    lam = lam.view(-1, *[1] * (t.dim() - 1)).to(t.dtype)
    return lam * t + (1 - lam) * t[perm]


@torch.no_grad()
def predict(model: nn.Module, data: Data, split: str, args, device) -> np.ndarray:
    """Probabilities (N, K) float32 of a split's clips; NaN rows for the unreadable ones."""
    model.eval()
    dtype = common.amp_dtype(device, args.amp)
    out = np.full(data.y[split].shape, np.nan, np.float32)
    idx = np.flatnonzero(data.ok[split])
    for i in range(0, len(idx), 2 * args.batch_size):
        b = idx[i: i + 2 * args.batch_size]
        with common.autocast(device, dtype):
            logits = model(data.batch(split, b).to(device, non_blocking=True))
        out[b] = torch.sigmoid(logits.float()).cpu().numpy()
    return out


def evaluate(model: nn.Module, data: Data, split: str, args, device) -> float:
    """mAP over classes (the paper's metric) of the readable clips of a split (the others are counted)."""
    return common.readable_scores(data.y[split], predict(model, data, split, args, device))["mAP"]


# =============================================================================================
# Training: one step function and one visible loop for every stage (Adam 1e-3, batch 64: Sec. 3.3)
# =============================================================================================
def train_step(model: nn.Module, opt, scaler, x: torch.Tensor, y: torch.Tensor, args, dtype,
               cfgs: list[dict] | None = None, mixup: bool = False) -> torch.Tensor:
    """One optimiser step on log-mels x (B, n_mels, T) against targets y (B, K): the labels (teacher, scratch
    baseline) or the teacher's probabilities (Eq. 2: KD students and the supernet). SpecAugment (and the
    teacher's mix-up, Sec. 3.2) follows the input BN, as in PANNs. A supernet step runs every sub-network of
    `cfgs` (the largest, or K sampled: Sec. 2.3) on the batch and sums their losses, so that their gradients
    add up before the one Adam step. Returns the mean loss of a pass, on the device."""
    model.train()
    if mixup:  # a random partner per clip, lambda ~ Beta(a, a); the labels are mixed alike
        lam = torch.distributions.Beta(args.mixup_alpha, args.mixup_alpha).sample((len(x),)).to(x.device)
        perm = torch.randperm(len(x), device=x.device)
        y = mix(y, lam, perm)
    augment = (lambda h: mix(spec_augment(h, args), lam, perm)) if mixup else (lambda h: spec_augment(h, args))
    with common.autocast(x.device, dtype):
        logits = model(x, augment) if cfgs is None else model(x, augment, cfgs)  # (B, K) or (passes, B, K)
    passes = logits.float().reshape(-1, *y.shape)
    loss = sum(F.binary_cross_entropy_with_logits(p, y) for p in passes)
    common.optimizer_step(loss, opt, scaler)
    return loss.detach() / len(passes)


def train(model: CNN10, folder: Path, args, data: Data, targets: np.ndarray, total: int, seed: int, device,
          validate=None, cfgs_at=None, mixup: bool = False, snapshot: int | None = None) -> dict:
    """A stage: `total` steps of train_step on batches of epochs drawn from (seed, epoch). Every
    args.eval_every steps rank 0 validates (default: valid mAP) and writes last.pt (model, optimiser, every
    RNG state, step, curve), so a stage killed anywhere resumes bit-exactly; final.pt at the end, which
    every process then loads. cfgs_at(step): the supernet's sub-networks of a step."""
    final = folder / "final.pt"
    if not final.exists():
        dtype = common.amp_dtype(device, args.amp)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        scaler = common.grad_scaler(device, dtype)
        state = common.load_state(folder / "last.pt", model, opt, scaler)
        logger = common.RunLogger(folder)
        if state:  # the log line of the checkpoint resumed from (a kill may have come before it)
            print(f"{folder.name}: resumed at step {state['step']}/{total}")
            logger.log_once(state["curve"][-1], ("step",))
        state = state or {"step": 0, "passes": 0, "macs": 0, "curve": []}
        # a supernet's shapes change with every sub-network: torch.compile would recompile for each one
        net = common.wrap_ddp(model, find_unused=True) if cfgs_at else common.compiled(common.wrap_ddp(model), args.compile)
        validate = validate or (lambda m: {"val/mAP": evaluate(m, data, "valid", args, device)})
        y, loss = torch.from_numpy(targets), common.Mean(device)
        bar = tqdm(total=total, initial=state["step"], desc=folder.name, leave=False, disable=not common.is_main())
        while state["step"] < total:
            idx = data.train_batch(state["step"], args.batch_size, seed)
            cfgs = cfgs_at(state["step"]) if cfgs_at else None
            x, yb = common.to_device((data.batch("train", idx), y[idx]), device)
            loss.add(train_step(net, opt, scaler, x, yb, args, dtype, cfgs, mixup))
            cfgs = cfgs or [model.config]
            state["step"], state["passes"] = state["step"] + 1, state["passes"] + len(cfgs)
            state["macs"] += sum(count_macs(c, data.frames) for c in cfgs) * args.batch_size
            bar.update()
            if state["step"] == snapshot:  # the weights at an intermediate step (Table 2's +10K), before last.pt
                common.save_checkpoint(folder / f"step{snapshot}.pt", {"model": model.state_dict()})
            if state["step"] % args.eval_every == 0 or state["step"] == total:
                record = {"stage": folder.name, "step": state["step"], "train/loss": loss.read(),
                          **(validate(model) if common.is_main() else {})}
                state["curve"].append(record)
                record["plateau"] = convergence(state["curve"])["plateau"]  # so far: in every log line
                common.save_state(folder / "last.pt", model, opt, scaler, **state)
                logger.log(record)
        bar.close()
        state["convergence"] = conv = convergence(state["curve"])
        if common.is_main():
            print(f"{folder.name}: {'a plateau' if conv['plateau'] else 'NO plateau'} in validation (last quarter of "
                  f"{conv['validations']} validations within {conv['tolerance']} of the best before; it gained "
                  f"{common.signed(conv['gain'])})")
        save_model(final, model, args, data, info=state)
        common.barrier()  # final.pt is written before any process reads it
    ck = common.load_checkpoint(final, device)
    model.load_state_dict(ck["model"])
    return ck["info"]


def convergence(curve: list[dict]) -> dict:
    """Whether a stage reached a plateau: its validation mAP (the supernet's: the largest
    sub-network's), else the training loss."""
    key = next((k for k in curve[-1] if k.startswith("val/")), None) if curve else None
    if key:
        return common.plateau_report([r[key] for r in curve])
    return common.plateau_report([r["train/loss"] for r in curve], higher=False)


# =============================================================================================
# Paper procedures: teacher, supernet training, search, export
# =============================================================================================
def teacher_stage(args, data: Data, space: SearchSpace, device) -> tuple[CNN10, dict, np.ndarray]:
    """Stage 1 (Sec. 3.2): CNN10 on the balanced set with mix-up + SpecAugment for 400K steps (scaled), in a
    shared stage folder keyed by its settings and data (or --teacher); its probabilities on the clean
    training clips (eval mode) are the soft labels, cached beside it. Returns the teacher, its row, soft labels."""
    if args.teacher:
        ck = load_cnn10(args.teacher, "--teacher")
        teacher, info = build_model(ck, args.teacher).to(device), ck.get("info", {})
        teacher_id = files_id(Path(args.teacher).parent, [(Path(args.teacher).name, [])])  # path, size, mtime
        folder = common.stage_dir(args.shared_dir, "soft", {"teacher": teacher_id, "amp": args.amp,
                                                              "train": data.ident["train"]})
    else:
        keys = ("width_mult", "unit_steps", "frontend", "clip_seconds", "data", "batch_size", "lr", "mixup_alpha",
                "time_mask", "freq_mask", "n_masks", "teacher_seed", "max_steps", "eval_every", "amp")
        folder = common.stage_dir(args.shared_dir, "teacher", {**{k: getattr(args, k) for k in keys}, **data.ident})
        common.seed_everything(args.teacher_seed)
        teacher = CNN10(**space.full()).to(device)
        if not (folder / "final.pt").exists():
            print(f"teacher: CNN10, {count_params(teacher.config):,} parameters, {steps(args, 400_000)} steps")
    with common.RunLock(folder, wait=True):  # two runs sharing the stage: the second waits, then reuses it
        if not args.teacher:
            info = train(teacher, folder, args, data, data.y["train"], steps(args, 400_000), args.teacher_seed,
                         device, mixup=True)
        if common.is_main() and not (folder / "soft.npy").exists():
            np.save(folder / "soft.tmp.npy", np.nan_to_num(predict(teacher, data, "train", args, device)))
            (folder / "soft.tmp.npy").replace(folder / "soft.npy")
        common.barrier()  # the soft labels are written before any process reads them
    row = {"mAP": evaluate(teacher, data, "eval", args, device), "params": count_params(teacher.config), "info": info}
    print(f"teacher eval mAP {row['mAP']:.4f}")
    return teacher.eval(), row, np.load(folder / "soft.npy")


def candidate(supernet: Supernet, space: SearchSpace, arch: tuple, data: Data, args, device) -> CNN10:
    plain = export_subnet(supernet, space.config(arch))
    return common.recalibrate_bn(plain, bn_batches(data, args, device)) if args.bn_recal else plain.eval()


def export_subnet(supernet: Supernet, cfg: dict) -> CNN10:
    """A standalone plain CNN10 with the sub-network's weights copied out: every tensor is the first
    entries of the supernet's along each axis (conv [:out, :in], BN [:C], linear [:out, :in])."""
    plain = CNN10(**cfg).to(next(supernet.parameters()).device)
    full = supernet.state_dict()
    plain.load_state_dict({k: full[k][tuple(slice(0, n) for n in v.shape)].clone()
                           for k, v in plain.state_dict().items()})
    return plain


def supernet_stage(args, data: Data, space: SearchSpace, soft: np.ndarray, device) -> tuple[Supernet, dict]:
    """Stage 2 (Sec. 2.3 / 3.3): the largest sub-network alone for 100K steps, then K = 4 uniformly sampled
    sub-networks per step for 200K steps (gradients summed, one optimiser step), every pass trained by
    Eq. 2 on SpecAugmented input against the cached teacher probabilities."""
    n_largest, n_sampled = steps(args, 100_000), steps(args, 200_000)
    print(f"supernet: {len(space.all())} sub-networks ({SPACES[args.elastic_depth]}), {n_largest} + {n_sampled} "
          f"steps, K = {args.subnets_per_step}")
    common.seed_everything(args.seed)
    net = Supernet(space.n_classes, space.n_mels, space.channels, space.fc).to(device)

    def cfgs_at(step: int) -> list[dict]:  # drawn from (seed, step, k): the same sub-networks after a resume
        if step < n_largest:
            return [space.config(space.largest)]
        return [space.config(space.sample(np.random.default_rng([args.seed, step, k])))
                for k in range(args.subnets_per_step)]

    def validate(m: Supernet) -> dict:
        return {f"val/mAP_{n}": evaluate(candidate(m, space, a, data, args, device), data, "valid", args, device)
                for n, a in (("largest", space.largest), ("smallest", space.smallest))}
    info = train(net, Path(args.out) / "supernet", args, data, soft, n_largest + n_sampled, args.seed, device,
                 validate, cfgs_at)
    return net, {**info, "largest_steps": n_largest, "sampled_steps": n_sampled}


def search_subnets(supernet: Supernet, space: SearchSpace, args, data: Data, device) -> dict:
    """Stage 3 (Sec. 2.4): per budget N, the sub-networks with N - eps <= params <= N + eps; p of them drawn
    without replacement (all when the window holds fewer), each BN-recalibrated and scored on the
    validation split (and, for Fig. 4, on eval); the best by validation mAP is kept. Every score is kept
    in candidates.json, so a killed search continues where it stopped."""
    path = Path(args.out) / "search" / "candidates.json"
    cache = common.read_json(path, "search cache") if path.exists() else {}
    archs = space.all()
    params = {a: space.params(a) for a in archs}
    out = {}
    for b in args.budgets:
        lo, hi = budget_window(space, b, args.tolerance)
        window = [a for a in archs if lo <= params[a] <= hi]
        rng = np.random.default_rng([args.seed, round(b * 1000)])
        chosen = window if len(window) <= args.population else \
            [window[i] for i in sorted(rng.choice(len(window), args.population, replace=False))]
        for a in tqdm(chosen, desc=f"search {b:g}M", leave=False, disable=not common.is_main()):
            if arch_name(a) not in cache:  # every process scores it (the same numbers); rank 0 writes
                m = candidate(supernet, space, a, data, args, device)
                cache[arch_name(a)] = {"arch": a, "params": params[a], "val": evaluate(m, data, "valid", args, device),
                                       "eval": evaluate(m, data, "eval", args, device)}
                if common.is_main():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    common.write_json(path, cache)
        cands = [cache[arch_name(a)] for a in chosen]
        best = max(cands, key=lambda c: c["val"]) if cands else None
        out[f"{b:g}"] = {"budget_M": b, "window": [lo, hi], "in_window": len(window), "evaluated": len(cands),
                         "exhaustive": len(window) <= args.population, "candidates": cands, "best": best}
        print(f"budget {b:g}M: window {lo:,.0f}-{hi:,.0f} params holds {len(window)} sub-networks, "
              f"{len(cands)} evaluated" + (f"; best {arch_name(best['arch'])} ({best['params']:,}) val mAP "
                                           f"{best['val']:.4f}" if best else ""))
    return out


def export_stage(supernet: Supernet, space: SearchSpace, search: dict, data: Data, args, device) -> dict:
    """Stage 4: the best sub-network of each budget exported, then evaluated from its checkpoint alone."""
    done = {b: export(supernet, space, tuple(map(tuple, s["best"]["arch"])), data, args, device,
                      Path(args.out) / "export" / f"budget_{b}M.pt") for b, s in search.items() if s["best"]}
    common.barrier()  # rank 0 wrote the checkpoints; every process reads them next
    for b, e in done.items():
        plain = build_model(load_cnn10(e["checkpoint"], "export")).to(device)
        e.update(mAP=evaluate(plain, data, "eval", args, device), val=search[b]["best"]["val"])
    return done


def export(supernet: Supernet, space: SearchSpace, arch: tuple, data: Data, args, device, path: Path) -> dict:
    """Plain CNN10 checkpoint + TorchScript (waveform -> probabilities) of a searched sub-network,
    verified: the plain module equals the sub-network inside the supernet (same BN statistics), and
    TorchScript equals the plain module (after BN recalibration)."""
    record = path.with_suffix(".json")
    if record.exists() and path.exists() and path.with_suffix(".ts").exists():
        done = common.read_json(record, "export record")
        if done["arch"] == [list(a) for a in arch]:
            return done
    cfg = space.config(arch)
    supernet.eval().set_active(cfg)
    plain = export_subnet(supernet, cfg).eval()
    x = data.batch("valid", np.flatnonzero(data.ok["valid"])[:8]).to(device)
    with torch.no_grad():
        diff_super = (supernet(x) - plain(x)).abs().max().item()
    supernet.set_active(supernet.config)
    if args.bn_recal:
        common.recalibrate_bn(plain, bn_batches(data, args, device))
    tagger = Tagger(args.frontend, plain).eval()
    n = int(args.clip_seconds * common.LOGMEL_PRESETS[args.frontend]["sr"])
    wave = torch.randn(2, n, generator=torch.Generator().manual_seed(0)).to(device)  # the same after a resume
    with torch.no_grad():
        ts = torch.jit.trace(tagger, wave, check_trace=False)
        diff_ts = (ts(wave) - tagger(wave)).abs().max().item()
    if max(diff_super, diff_ts) > 1e-4:
        raise RuntimeError(f"export of {arch_name(arch)} differs: supernet {diff_super:.2e}, TorchScript {diff_ts:.2e}")
    done = {"arch": arch, "params": count_params(cfg), "max_diff_supernet": diff_super, "max_diff_torchscript": diff_ts,
            "checkpoint": str(path), "torchscript": str(path.with_suffix(".ts"))}
    if common.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        ts.save(str(path.with_suffix(".ts.tmp")))  # atomic, as every checkpoint
        path.with_suffix(".ts.tmp").replace(path.with_suffix(".ts"))
        save_model(path, plain, args, data, arch=arch, params=count_params(cfg))
        common.write_json(record, done)
    return done


# =============================================================================================
# Tables: Table 1 baselines, Table 2 fine-tuning
# =============================================================================================
def baselines(args, data: Data, space: SearchSpace, soft: np.ndarray, sup_info: dict, device) -> list[dict]:
    """Stage 5 (Sec. 3.2): width r in every dynamic block, depth 2, trained alone from scratch (BCE +
    SpecAugment) or by KD (Eq. 2 + SpecAugment) for 100K steps (scaled); KD-equal gets the supernet's 300K."""
    rows = []
    for r in args.baseline_widths:
        arch = tuple((r, 2) for _ in space.depths)
        cfg = space.config(arch)
        kinds = [("scratch", steps(args, 100_000), data.y["train"]), ("KD", steps(args, 100_000), soft)]
        for kind, n, targets in kinds + ([("KD, equal updates", sup_info["step"], soft)] if args.kd_equal else []):
            folder = Path(args.out) / "baselines" / f"{kind.split(',')[0]}{'_eq' if ',' in kind else ''}_r{r:g}"
            common.seed_everything(args.seed)
            model = CNN10(**cfg).to(device)
            info = train(model, folder, args, data, targets, n, args.seed, device)
            rows.append({"kind": kind, "r": r, "arch": arch, "params": count_params(cfg),
                         "mAP": evaluate(model, data, "eval", args, device), "info": info})
    return rows


def finetune(args, data: Data, soft: np.ndarray, searched: dict, device) -> list[dict]:
    """Sec. 4.3: continual KD fine-tuning of each searched sub-network (one +100K run, evaluated after
    10K and 100K steps, scaled) and the same architecture trained by KD from scratch (Init+100K)."""
    rows = []
    n10, n100 = steps(args, 10_000), steps(args, 100_000)
    for b, s in searched.items():
        folder = Path(args.out) / "finetune" / f"budget_{b}M"
        common.seed_everything(args.seed)
        model = build_model(load_cnn10(s["checkpoint"], "export")).to(device)
        info = train(model, folder / "ft", args, data, soft, n100, args.seed, device, snapshot=n10)
        snap = CNN10(**model.config).to(device)
        snap.load_state_dict(common.load_checkpoint(folder / "ft" / f"step{n10}.pt")["model"])
        common.seed_everything(args.seed)
        init = CNN10(**model.config).to(device)
        init_info = train(init, folder / "init", args, data, soft, n100, args.seed, device)
        rows.append({"budget": b, "arch": s["arch"], "params": s["params"], "OFA": s["mAP"],
                     "+10K": evaluate(snap, data, "eval", args, device),
                     "+100K": evaluate(model, data, "eval", args, device),
                     "Init+100K": evaluate(init, data, "eval", args, device), "info": info, "init_info": init_info})
    return rows


# =============================================================================================
# Results: Table 1 / Table 2 / Fig. 4 markdown, Fig. 3 over the four search spaces
# =============================================================================================
def compute(info: dict) -> str:
    return f"{info['step']} steps, {info['passes']} passes, {info['macs'] / 1e9:,.0f} GMAC"


def flat_rows(res: dict) -> dict:
    """Every evaluated model of a run: {dot-free key: (parameters, eval mAP)} (budgets in thousands of
    parameters: OFA_800k; widths in %: KD_r40)."""
    k = lambda b: f"{round(float(b) * 1000)}k"
    out = {"teacher": (res["teacher"]["params"], res["teacher"]["mAP"])}
    out |= {f"OFA_{k(b)}": (s["params"], s["mAP"]) for b, s in res["searched"].items()}
    for r in res["baselines"]:
        out[f"{r['kind'].replace(', equal updates', '_equal')}_r{round(r['r'] * 100)}"] = (r["params"], r["mAP"])
    for f in res["finetune"]:
        out |= {f"OFA_{k(f['budget'])}_+10K": (f["params"], f["+10K"]),
                f"OFA_{k(f['budget'])}_+100K": (f["params"], f["+100K"]),
                f"Init_{k(f['budget'])}_+100K": (f["params"], f["Init+100K"])}
    return out


def flat_maps(res: dict) -> dict:
    """Every eval mAP of a run under a dot-free key, for `python common.py seeds --key mAP.<key>`."""
    return {key: m for key, (_, m) in flat_rows(res).items()}


def plateau_word(info: dict) -> str:
    return {True: "yes", False: "NO"}.get(info.get("convergence", {}).get("plateau"), "unknown (given)")


def ofa_markdown(res: dict, args, data: Data) -> str:
    """results.md: Table 1 (with compute), Fig. 4's candidate spread, the exports, Table 2."""
    t_map, full, s_info, base, searched = (res["teacher"]["mAP"], res["teacher"]["params"], res["supernet"],
                                           res["baselines"], res["searched"])
    pct = lambda m: f"{100 * m / t_map:.1f}"
    p_m = lambda n: f"{n:,} ({100 * n / full:.1f}%)"
    t_info = res["teacher"]["info"]
    t1 = [["teacher CNN10", p_m(full), f"{100 * t_map:.2f}", "100.0", compute(t_info) if "step" in t_info else "-",
           plateau_word(t_info), f"5.2M: {PAPER_TEACHER}"]]
    for b in sorted({float(k) for k in searched} | {b for b in PAPER_T1 if any(
            abs(r["r"] - PAPER_T1[b][0]) < 1e-9 for r in base)}):
        paper = PAPER_T1.get(b)
        for r in base:
            if paper and abs(r["r"] - paper[0]) < 1e-9:
                ref = {"scratch": paper[2], "KD": paper[3]}.get(r["kind"], "-")
                t1.append([f"{r['kind']} (r={r['r']:g}, depth 2)", p_m(r["params"]), f"{100 * r['mAP']:.2f}",
                           pct(r["mAP"]), compute(r["info"]), plateau_word(r["info"]), f"{paper[1]}M: {ref}"])
        if f"{b:g}" in searched:
            s = searched[f"{b:g}"]
            t1.append([f"OFA {b:g}M budget: {arch_name(s['arch'])}", p_m(s["params"]), f"{100 * s['mAP']:.2f}",
                       pct(s["mAP"]), "shared: " + compute(s_info), plateau_word(s_info) + " (supernet)",
                       f"{paper[4]}M: {paper[5]}" if paper else "-"])
    md = [f"# OFA-AEC: {args.name}", "",
          f"{args.preset} preset: CNN10 width x{args.width_mult:g} ({full:,} parameters, {len(data.labels['mids'])} "
          f"classes), {args.frontend} log-mels, {data.frames} frames, {SPACES[args.elastic_depth]} with widths "
          f"{args.widths}, elastic FC {args.elastic_fc}, BN recalibration {args.bn_recal}; unit = {args.unit_steps} "
          f"steps per 100K paper iterations; data {args.data} ({len(data.train_idx)} clips; eval scored on "
          f"{res['n']['eval']} clips; skipped unreadable: {data.skipped}); {res['minutes']:.1f} min in this invocation (a "
          f"stage found finished on disk is read back, not timed again). Validation "
          f"plateau (last quarter within {common.plateau_report([])['tolerance']} mAP of the best before): teacher "
          f"{plateau_word(t_info)}, supernet {plateau_word(s_info)}.", "",
          "## Table 1 (eval mAP %; compute: optimiser steps, sub-network passes, forward MACs; plateau: the "
          "stage's validation)", "",
          common.markdown_table(["model", "params (% of full)", "mAP %", "% of teacher", "compute", "plateau",
                                 "paper"], t1), "",
          f"## Fig. 4: candidates per budget ({SPACES[args.elastic_depth]})", "",
          common.markdown_table(["budget", "in window", "evaluated", "eval mAP min / median / max", "eval mean",
                                 "val mAP min / median / max", "eval std"], fig4_rows(res["search"])), "",
          "Exported sub-networks (max |difference| to the supernet's sub-network / TorchScript):", ""]
    md += [f"- {b}M: `{s['checkpoint']}` {arch_name(s['arch'])}, {s['params']:,} params, "
           f"{s['max_diff_supernet']:.1e} / {s['max_diff_torchscript']:.1e}" for b, s in searched.items()]
    if res["finetune"]:
        md += ["", "## Table 2: continual fine-tuning (eval mAP %)", "",
               common.markdown_table(["budget", "sub-network", "params", "OFA", "+10K", "+100K", "Init+100K",
                                      "plateau +100K / Init", "paper"],
                                     [[f"{r['budget']}M", arch_name(r["arch"]), f"{r['params']:,}"]
                                      + [f"{100 * r[k]:.2f}" for k in ("OFA", "+10K", "+100K", "Init+100K")]
                                      + [f"{plateau_word(r['info'])} / {plateau_word(r['init_info'])}",
                                         " / ".join(map(str, PAPER_T2.get(float(r["budget"]), ())[1:])) or "-"]
                                      for r in res["finetune"]])]
    return "\n".join(md)


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


def fig3(args: argparse.Namespace) -> dict:
    """Fig. 3 / Fig. 4: one supernet per search space (shared teacher); best and spread per budget."""
    out = Path(args.out or f"runs/ofa_aec/fig3_s{args.seed}")
    with common.claim_run(out, "ofa_aec", common.identity(args, ROW_FLAGS), args.resume, OUTPUTS):
        rows, spaces = [], {}
        for depth in SPACES:  # sibling runs (default names: the 2,2,X one is the default command's run)
            a = copy.copy(args)
            a.fig3, a.elastic_depth, a.name = False, depth, None
            a.widths = [0.2, 0.4, 0.6, 0.8, 1.0] if depth == "2,2,2" else args.widths  # EW-only adds 0.2 (Sec. 4.1)
            a.out = f"{args.out}_{depth.replace(',', '')}" if args.out else None
            a.shared_dir = args.shared_dir or str(out.parent)
            r = run(a)
            spaces[SPACES[depth]] = r["search"]
            rows.append([SPACES[depth]] + [f"{100 * r['searched'][b]['mAP']:.2f} ({r['searched'][b]['params']:,})"
                                           if b in r["searched"] else "-" for b in r["search"]])
        md = ["# Fig. 3: best searched sub-network per budget (eval mAP %, params)", "",
              common.markdown_table(["space"] + [f"{b:g}M" for b in args.budgets], rows), "",
              "# Fig. 4: candidate spread per budget", ""]
        for name_, search in spaces.items():
            md += [f"### {name_}", "", common.markdown_table(
                ["budget", "in window", "evaluated", "eval min / median / max", "eval mean", "val min / median / max",
                 "eval std"], fig4_rows(search)), ""]
        if common.is_main() and plot_fig4(out / "fig4.png", spaces):
            md.append("![Fig. 4](fig4.png)")
        return common.report(out, {"rows": rows, "spaces": spaces}, "\n".join(md))


def counts_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
        "ofa_aec.py counts",
        ("Parameter counts of the [2,2,X] search space with FC1 fixed and elastic (deviation 3): the "
                    "baselines, the smallest sub-network, the range, and how many sub-networks each budget's "
                    "+- 0.2M window holds. Prints a table; writes nothing."))
    p.add_argument("--classes", type=common.POSITIVE_INT, default=527, help="output classes (AudioSet: 527)")
    p.add_argument("--width-mult", type=common.POSITIVE, default=1.0,
                   help="CNN10 channel multiplier (the cpu preset: 0.125)")
    return p


def counts_main(argv: list[str]) -> str:
    """`counts`: sub-network parameter counts at the paper's scale, --elastic-fc both ways."""
    a = counts_parser().parse_args(argv)
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


def predict_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
        "ofa_aec.py predict",
        ("Tag audio files (any format soundfile reads, resampled to the model's rate) with an "
                    "exported sub-network (export/budget_<N>M.pt or its TorchScript .ts) or a teacher's final.pt: "
                    "one line per file with the top classes and their probabilities. Writes nothing."))
    p.add_argument("--ckpt", required=True,
                   help="export/budget_<N>M.pt, its .ts (the .pt beside it gives the class names), or a teacher's final.pt")
    p.add_argument("--top", type=common.POSITIVE_INT, default=5, help="classes printed per file, most probable first")
    p.add_argument("files", nargs="+", help="audio files to tag (an unreadable one is skipped and counted)")
    return p


def predict_main(argv: list[str]) -> None:
    """Tag audio files with an exported sub-network (checkpoint or TorchScript) or a teacher."""
    a = predict_parser().parse_args(argv)
    path = Path(a.ckpt)
    ck_path = path.with_suffix(".pt") if path.suffix == ".ts" else path  # a .ts's class names are in its .pt
    ck = load_cnn10(ck_path, "--ckpt")
    if not isinstance(ck.get("labels"), dict) or len(ck["labels"].get("names", [])) != ck["config"]["n_classes"]:
        raise common.DataError(f"--ckpt {ck_path}: no class names for its {ck['config']['n_classes']} outputs")
    if path.suffix == ".ts":
        try:
            model = torch.jit.load(str(path))
        except Exception as e:  # a truncated file, another format: one line
            raise common.DataError(f"--ckpt {path}: not a TorchScript file ({type(e).__name__})") from None
    else:
        model = Tagger(ck["frontend"], build_model(ck, ck_path))
    model.eval()
    names, sr = ck["labels"]["names"], common.LOGMEL_PRESETS[ck["frontend"]]["sr"]
    warning = common.synthetic_classes_warning(ck["labels"].get("mids", []))
    if warning:
        print(warning)
    skipped = 0
    for f in a.files:
        try:
            wave = torch.from_numpy(common.load_audio(f, sr))[None]
        except common.DataError as e:  # one unreadable file is skipped and counted
            print(f"skipping: {e}")
            skipped += 1
            continue
        with torch.no_grad():
            probs = model(wave)[0].float().numpy()
        print(f"{f}: " + ", ".join(f"{names[k]} {probs[k]:.2f}" for k in np.argsort(-probs)[:a.top]))
    if skipped:
        print(f"{len(a.files) - skipped} files tagged, {skipped} unreadable (skipped)")


# =============================================================================================
# plot: accuracy against parameters (Figs. 3-4) from results.json, the paper's values beside
# =============================================================================================
def paper_curves() -> dict:
    """The paper's points as {name: [(parameters in M, eval mAP %)]}: the searched [2,2,X] sub-networks
    (Table 2's OFA column, which repeats Table 1's), the baselines (Table 1) and the teacher (Table 1)."""
    return {"OFA [2,2,X] (Table 2)": [(v[0], v[1]) for _, v in sorted(PAPER_T2.items())],
            "KD (Table 1)": [(v[1], v[3]) for _, v in sorted(PAPER_T1.items())],
            "scratch (Table 1)": [(v[1], v[2]) for _, v in sorted(PAPER_T1.items())],
            "teacher (Table 1)": [(FULL_527 / 1e6, PAPER_TEACHER)]}


def full_params(res: dict) -> int:
    """Parameters of the run's full CNN10 (the supernet's largest network), from a budget window (its middle
    is budget * full / 5,219,279) or else the teacher's row."""
    for s in (res.get("search") or {}).values():
        return round((s["window"][0] + s["window"][1]) / 2 / (s["budget_M"] * 1e6) * FULL_527)
    return res["teacher"]["params"]


def series_name(key: str) -> str:
    """A flat key without its budget or width: OFA_800k -> OFA, KD_equal_r40 -> KD_equal, OFA_800k_+10K -> OFA_+10K."""
    return re.sub(r"_\d+k|_r\d+", "", key)


def plot_series(path: Path, label: str, res: dict) -> tuple[dict, dict]:
    """What one results.json draws: ({line label: [(params % of full, mAP %, std or None)]}, {scatter label:
    [(params %, mAP %)]}). A run: every evaluated model by series, and every searched candidate (Fig. 4); a
    --fig3 run: the best candidate per budget and the candidates of each search space; a seeds table
    (`python common.py seeds`): mean +- sample std of every mAP.<key> over its runs, at their mean size."""
    pre = f"{label}: " if label else ""
    lines, dots = {}, {}
    if "spaces" in res:  # --fig3
        for space, search in res["spaces"].items():
            full = full_params({"search": search})
            pct = lambda n: 100 * n / full
            lines[f"{pre}{space} best"] = [(pct(s["best"]["params"]), 100 * s["best"]["eval"], None)
                                           for s in search.values() if s["best"]]
            dots[f"{pre}{space} candidates"] = [(pct(c["params"]), 100 * c["eval"]) for s in search.values()
                                                for c in s["candidates"]]
    elif "searched" in res and "teacher" in res:  # a run folder
        full = full_params(res)
        for key, (n, m) in flat_rows(res).items():
            lines.setdefault(f"{pre}{series_name(key)}", []).append((100 * n / full, 100 * m, None))
        dots[f"{pre}every searched candidate"] = [(100 * c["params"] / full, 100 * c["eval"])
                                                  for s in res["search"].values() for c in s["candidates"]]
    elif res and all(isinstance(v, dict) and "runs" in v for v in res.values()):  # a seeds table
        for row, t in res.items():
            runs = [common.read_json(Path(r) / "results.json", "results.json of a seeds row") for r in t["runs"]]
            for key, values in t.items():
                if not key.startswith("mAP.") or not isinstance(values, list):
                    continue
                sizes = []
                for r, run_dir in zip(runs, t["runs"]):
                    rows = flat_rows(r)
                    if key[4:] not in rows:
                        raise common.DataError(f"{run_dir}: no {key} (the seeds table names a model its run lacks)")
                    sizes.append(100 * rows[key[4:]][0] / full_params(r))
                v = 100 * np.asarray(values, float)
                lines.setdefault(f"{pre}{row}: {series_name(key[4:])}", []).append(
                    (float(np.mean(sizes)), float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0))
    else:
        raise common.DataError(f"{path}: not a results.json of ofa_aec.py or of `python common.py seeds`")
    return {k: sorted(v) for k, v in lines.items() if v}, {k: v for k, v in dots.items() if v}


def plot_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
        "ofa_aec.py plot",
        ("Accuracy against parameters (the paper's Figs. 3-4): eval mAP % against parameters as % of "
                    "the full CNN10, from each RUN's results.json - a run folder (searched sub-networks per budget, "
                    "baselines and fine-tuning rows when run, every searched candidate as dots), a --fig3 folder "
                    "(best and candidates of each search space) or the folder of `python common.py seeds` (mean "
                    "+- sample std over seeds) - with the paper's AudioSet values (Tables 1-2) as dashed lines. "
                    "Writes one PNG."))
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or their results.json)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/accuracy_params.png of the first RUN)")
    p.add_argument("--paper", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the paper's AudioSet values (Tables 1-2) beside ours")
    return p


def plot_main(argv: list[str]) -> Path:
    """`plot`: the figure of one or more runs (labelled by folder name when several)."""
    a = plot_parser().parse_args(argv)
    files = [Path(r) if Path(r).suffix == ".json" else Path(r) / "results.json" for r in a.runs]
    lines, dots = {}, {}
    for f in files:
        if not f.is_file():
            raise common.DataError(f"{f}: not found (a finished run folder has a results.json)")
        res = common.read_json(f, "results.json")
        ln, dt = plot_series(f, f.parent.name if len(files) > 1 else "", res if isinstance(res, dict) else {})
        lines |= ln
        dots |= dt
    paper = paper_curves() if a.paper else {}

    colours = {"OFA": "C0", "KD": "C1", "scratch": "C2", "teacher": "C3"}  # ours solid, the paper's dashed

    def colour(name: str) -> str:  # one colour per method, ours and the paper's alike
        method = name.split(": ")[-1].split(" ")[0]
        return colours.setdefault(method, f"C{len(colours) % 10}")

    def draw(ax):
        for i, (name, pts) in enumerate(dots.items()):
            x, y = zip(*pts)
            ax.scatter(x, y, s=12, alpha=0.35, color=f"C{i + 4}" if len(dots) > 1 else "0.5", label=f"ours: {name}")
        markers = {}
        for name, pts in lines.items():
            x, y, err = zip(*pts)
            m = markers.setdefault(name.rsplit(": ", 1)[0] if ": " in name else "", "o^vDsp"[len(markers) % 6])
            (ln,) = ax.plot(x, y, f"{m}-" if len(pts) > 1 else "*", ms=6 if len(pts) > 1 else 12, color=colour(name),
                            label=f"ours: {name}")
            if any(e is not None for e in err):
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor=ln.get_color(), capsize=3)
        for name, pts in paper.items():
            x = [100 * m * 1e6 / FULL_527 for m, _ in pts]
            ax.plot(x, [v for _, v in pts], "s--" if len(pts) > 1 else "P", mfc="none", color=colour(name),
                    ms=6 if len(pts) > 1 else 10, label=f"paper: {name}")
        ax.set_xlabel("parameters (% of the full CNN10)")
        ax.set_ylabel("eval mAP % (ours: this corpus; paper: AudioSet)")
        ax.set_title("OFA-AEC: accuracy against parameters (Figs. 3-4)")
        ax.legend(fontsize=7, loc="lower right")
    out = Path(a.out) if a.out else files[0].parent / "accuracy_params.png"
    try:
        common.figure(out, draw, size=(7.5, 5))
    except OSError as e:
        raise common.DataError(f"--out {out}: cannot write ({e.strerror})") from None
    print(f"peak memory {common.peak_memory_gb():.1f} GB")
    return out


def bench_step(device, amp: str = "auto", batch_size: int = 8) -> dict:
    """For data/bench.py: `step()` is one real supernet training step (K = 4 sampled sub-networks, each with
    SpecAugment and the KD loss, one Adam step: train_step) of the paper-size CNN10 on a fixed batch of 10 s
    log-mels (the script trains on cached log-mels: no front-end in its step); `bare()` one forward +
    backward + Adam step of the full CNN10 on the same batch."""
    device = torch.device(device)
    dtype = common.amp_dtype(device, amp)
    args = argparse.Namespace(freq_mask=8, time_mask=64, n_masks=2, mixup_alpha=1.0)
    space = SearchSpace(527, 64, 1.0, [0.4, 0.6, 0.8, 1.0], "2,2,X", False)
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 64, 1001, device=device), torch.rand(batch_size, 527, device=device)
    net, bare_net = Supernet(527, 64, space.channels, space.fc).to(device), CNN10().to(device)
    opt, bare_opt = torch.optim.Adam(net.parameters(), 1e-3), torch.optim.Adam(bare_net.parameters(), 1e-3)
    scaler, rng = common.grad_scaler(device, dtype), np.random.default_rng(0)

    def step():
        cfgs = [space.config(space.sample(rng)) for _ in range(4)]
        return train_step(net, opt, scaler, x, y, args, dtype, cfgs)

    def bare():
        bare_net.train()
        with common.autocast(device, dtype):
            loss = F.binary_cross_entropy_with_logits(bare_net(x).float(), y)
        common.optimizer_step(loss, bare_opt, scaler)
    return {"step": step, "bare": bare, "clips": batch_size}


# =============================================================================================
# main: teacher -> supernet -> search -> export -> baselines -> fine-tuning
# =============================================================================================
def run(args: argparse.Namespace) -> dict:
    """The paper's stages in order, each one call; a stage whose output exists is read back, a killed one
    resumes from its last.pt; a finished run with the same settings is returned as it is."""
    t0 = time.time()
    device, _ = common.setup_device(args)
    args, corpus = resolve(args)
    out = Path(args.out)
    settings = {**common.identity(args, NOT_RESULT), "corpus": str(corpus.root.resolve())}
    with common.claim_run(out, "ofa_aec", {**common.identity(args, ROW_FLAGS), "corpus": settings["corpus"]},
                          args.resume, OUTPUTS):
        if (out / "results.json").exists():
            done = common.read_json(out / "results.json", "results.json")
            if done.get("settings") == settings:
                print(f"{out}: finished with these settings (results.md); --no-resume to run it again")
                return done
        data = Data(corpus, args, device)
        space = make_space(args, len(corpus.labels))
        teacher, t_row, soft = teacher_stage(args, data, space, device)
        supernet, s_info = supernet_stage(args, data, space, soft, device)
        search = search_subnets(supernet, space, args, data, device)
        searched = export_stage(supernet, space, search, data, args, device)
        base = baselines(args, data, space, soft, s_info, device) if args.baselines else []
        ft = finetune(args, data, soft, searched, device) if args.finetune else []
        res = {"name": args.name, "settings": settings, "teacher": t_row, "supernet": s_info, "search": search,
               "searched": searched, "baselines": base, "finetune": ft, "space": args.elastic_depth,
               "n": {s: int(ok.sum()) for s, ok in data.ok.items()}, "skipped": data.skipped,
               "minutes": (time.time() - t0) / 60, "config": vars(args)}
        res["mAP"] = flat_maps(res)
        return common.report(out, res, ofa_markdown(res, args, data))


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"predict": predict_main, "counts": counts_main, "plot": plot_main}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads and common.pick_device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    try:
        with common.distributed():
            return fig3(args) if args.fig3 else run(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    common.cli(main)
