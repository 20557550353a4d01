"""Conformer-based self-supervised learning for non-speech audio tasks.
Sangeeta Srivastava, Yun Wang, Andros Tjandra, Anurag Kumar, Chunxi Liu, Kritika Singh, Yatharth Saraf
(Meta AI), ICASSP 2022.

What is reproduced: wav2vec 2.0 pre-training of a conformer on 64-bin log-mels (Sec. 2): time
stacking + linear feature encoder, span masking of the latents, a context encoder of conformer
blocks (convolution before self-attention, no relative positions), and a contrastive loss against
K = 100 distractors drawn from the other masked steps of the same clip (Eq. 1). Then fine-tuning
(Sec. 4): linear-softmax pooling for AudioSet-style tagging, mean pooling for the other tasks, all
weights trained, jitter / one time mask / log-mel mix-up, a consistency loss, tri-stage LR. The
experiments: label efficiency scratch vs pre-trained (Table 1), pre-training pool size (Fig. 2a),
downstream tasks (Table 3 style).

Paper, cf_L on AudioSet test, mAP (Table 1): scratch 0.138 (balanced, "1 %") / 0.366 (full);
pre-trained 0.276 / 0.305 / 0.337 / 0.356 / 0.415 at 1 / 3 / 10 / 30 / 100 %. Sizes: cf_S 18.4 M,
cf_L 88.1 M parameters.

    python conformer_ssl.py                                  # CPU preset: pre-train, fine-tune at 2 fractions
    python conformer_ssl.py --table 1 --seeds 0 1 2          # label-efficiency curve, scratch vs pre-trained
    python conformer_ssl.py --fig 2a                         # pre-training pool size 0.25x / 1x / 4x / 16x
    python conformer_ssl.py --task sound_novel               # a downstream task through the task reader
    python conformer_ssl.py --data-root data/my_corpus --table 1   # your corpus: pre-trains on its own audio (printed)
    python conformer_ssl.py --preset paper --data-root data/audioset --data full --table 1   # the paper's setting
    torchrun --nproc_per_node=4 conformer_ssl.py --preset paper --table 1   # DDP: --pt-batch-size / --batch-size per process
    python conformer_ssl.py --seed 1 --name s1               # one run folder per seed (s0, s1, s2), then:
    python common.py seeds --row 10% runs/conformer_ssl/s? --key rows.0.mean.scratch --key rows.0.mean.pretrained

Sub-commands (each has its own --help):
    python conformer_ssl.py plot runs/conformer_ssl/cpu_synth     # Table 1 curve (Fig. 2a for a --fig 2a run) as PNG
    python conformer_ssl.py embed --ckpt runs/conformer_ssl/pretrain-*/pretrain.pt --out runs/conformer_ssl/emb data/synth/audio/eval/eval_00000.wav
    python conformer_ssl.py predict --ckpt runs/conformer_ssl/finetune/corpus_f1_pretrained_s0-*/final.pt data/synth/audio/eval/eval_00000.wav

--preset auto (default) is the paper's schedule (cf_L, 300k + 40k updates) on a CUDA GPU and the CPU preset
otherwise, whatever the corpus (printed at start); flags given on the command line win. Pre-training data
(printed at start): a real-layout --data-root's own clips (--data manifests, labels ignored), the synthetic
stream on the synthetic corpus, or --pretrain FILE.tsv / synthetic / none. Each stage ends with a plateau
line (common.plateau_report, tolerance 0.005): pre-training on the accuracy of the positive (and the loss),
each fine-tuning cell on its train loss (no validation split, deviation 5); both in results.json.

A killed run resumes exactly with the same command (every stage checkpoints model, optimizer, RNG
states and its data position every --log-every updates); a finished run is returned as it is.
Stages live beside the run folder, named by a hash of what changes them: pretrain-<hash>/ (one
encoder for every fraction, seed and run with the same settings) and finetune/<set>_<init>_s<seed>-<hash>/.

Deviations from the paper (numbered as in docs/conformer_ssl.md):
 1. The CPU preset (`--preset cpu`, auto without a CUDA GPU) is a 4-block, 64-d conformer with a short
    schedule (PRESETS["cpu"]); `--preset paper` is cf_L with the paper's schedules, `--size S` / `L` the
    paper's encoders. The direction run in docs/conformer_ssl.md adds `--pt-steps 3000 --pt-lr 2e-3 --ft-steps 600`
    (3e-4 learned slower here).
 2. Targets (default `--targets proj`) are a linear projection Linear(256, d) of the unmasked latents: the
    choice of fairseq's wav2vec 2.0 without a quantizer (quantize_targets=False: project_q), which the
    torchaudio prototype citing the paper also makes (its NegativeSampler preprocessor, applied to a copy
    of the latents taken before masking); Eq. 1 compares c_t with z_t itself: `--targets latent` (the
    final linear then maps the context to the 256-d latents: 18.4 M / 88.1 M parameters, as the paper).
    The mask embedding is written into the 256-d latents before the input projection (the prototype;
    fairseq writes it after). With `--targets proj` the prototype's count (no final linear) matches the
    paper's 18.4 M / 88.1 M; the paper's Fig. 1 draws a final linear layer, which `--final-proj`
    (default) keeps (+0.4 % / +0.7 %).
 3. Eq. 1 has no temperature; we divide the cosine by 0.1 as wav2vec 2.0 does (`--temperature 1`
    is the literal equation). fairseq's extra losses (feature penalty, dropout on targets) are omitted.
 4. Masks are not subsampled to the batch minimum (fairseq's require_same_masks): distractors are
    indexed per clip, so clips may keep different numbers of masked steps.
 5. Not given in the paper, our choices: pre-training batch size and crop, fine-tuning peak LR,
    steps and head dropout, the time-mask fill value (the clip's mean log-mel), softmax
    cross-entropy (with a categorical symmetric KL) for single-label tasks, the final model is
    evaluated (no checkpoint selection on validation: the paper sweeps hyperparameters on it).
 6. On real AudioSet "1 %" is the balanced set (as in the paper); elsewhere every fraction is a
    nested, stratified subset of the training set. Class-balanced sampling (Sec. 4.1: "Full AudioSet")
    is on by default only for the full training set (fraction 1 of --data full); the paper does not say
    it balances its 3-30 % subsets, so they are sampled uniformly (`--balance`: every set).
 7. The paper masks "30 %" of the latents; p = 0.3 with spans of 3 (the prototype's values, fairseq's
    sampler: p is the share of span starts, spans overlap) masks 1-(1-p/L)^L = 27.1 % in expectation
    (measured 0.273 at T = 125 steps per 10 s). Kept, as the prototype; `--mask-prob 0.33` masks 29.7 %.
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# Paper numbers (Table 1, mAP on AudioSet eval, cf_L): fraction -> (scratch, pre-trained)
PAPER_TABLE1 = {0.01: (0.138, 0.276), 0.03: (None, 0.305), 0.1: (None, 0.337), 0.3: (None, 0.356), 1.0: (0.366, 0.415)}
PAPER_TABLE3 = {"esc50": ("accuracy", 80.7, 88.0), "fsdkaggle2019_curated": ("lwlrap", 50.3, 61.1),
                "fsdkaggle2019_noisy": ("lwlrap", 33.2, 40.1)}
PAPER_PARAMS = {"S": 18.4e6, "L": 88.1e6}
# Encoder sizes (Sec. 2.2): blocks, model dim, heads, FFN dim; kernel 31 in block 1, 15 after
SIZES = {"S": dict(blocks=12, dim=256, heads=8, ffn=1024), "L": dict(blocks=12, dim=768, heads=12, ffn=1024),
         "cpu": dict(blocks=4, dim=64, heads=4, ffn=256)}  # deviation 1
# --preset (common.apply_preset: auto = paper on a CUDA GPU, cpu otherwise, whatever the corpus): the values
# of the flags left unset. paper: cf_L and Sec. 2.3 / 4.3 (fine-tuning batch 640 on the corpus, 64 on a
# task: set in resolve); cpu: the CPU schedule (deviations 1, 5)
PRESETS = {"paper": {"size": "L", "pt_steps": 300_000, "pt_batch_size": 64, "ft_steps": 40_000, "ft_lr": 1e-4},
           "cpu": {"size": "cpu", "pt_steps": 250, "pt_batch_size": 16, "ft_steps": 300, "ft_lr": 1e-3,
                   "batch_size": 8}}
SYNTH_SCHEDULE = PRESETS["cpu"]  # the CPU schedule of deviation 1
FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
OUTPUTS = ("table1.png", "fig2a.png")  # written in the run folder besides config.json, log.jsonl, results.json/.md
SHARE, UNIT = common.number(float, 0, 1, lo_open=True), common.number(float, 0, 1, hi_open=True)  # (0, 1], [0, 1)


# =============================================================================================
# Arguments: every default is the paper's value (section in the help)
# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    """The experiment's parser (the sub-commands plot / embed / predict have their own, below)."""
    p = argparse.ArgumentParser(prog="conformer_ssl.py", description=__doc__, formatter_class=common.HelpFormatter,
                                epilog="sub-commands: plot, embed, predict (python conformer_ssl.py plot --help, ...)")
    common.add_common_args(p, "conformer_ssl")
    p.set_defaults(data="full")
    p.add_argument("--preset", type=str, default="auto", choices=["auto", "paper", "cpu"],
                   help="values of the flags left unset: paper = cf_L, 300k + 40k updates (Sec. 2.3, 4.3); cpu = "
                        "the CPU preset (deviation 1); auto = paper on a CUDA GPU, cpu otherwise, whatever the corpus")
    P_INT, POS, NONNEG = common.POSITIVE_INT, common.POSITIVE, common.NONNEG
    g = p.add_argument_group("encoder (Sec. 2.2)")
    g.add_argument("--size", type=str, default=None, choices=list(SIZES),
                   help="S: 12 x 256-d, 8 heads (18.4 M); L: 12 x 768-d, 12 heads (88.1 M); cpu: 4 x 64-d "
                        "(deviation 1). Default: from --preset (paper: L, as for AudioSet, Sec. 3.1; cpu: cpu)")
    g.add_argument("--blocks", type=P_INT, default=None, help="conformer blocks (Fig. 2b: 8-20); default from --size")
    g.add_argument("--heads", type=P_INT, default=None, help="attention heads (Fig. 2c: 4-24); default from --size")
    g.add_argument("--kernels", type=P_INT, nargs=2, default=[31, 15],
                   help="depthwise kernel of the first block, then of the others, odd (Sec. 2.2)")
    g.add_argument("--dropout", type=UNIT, default=0.1, help="dropout in the conformer blocks (Sec. 2.2)")
    g.add_argument("--final-proj", action=argparse.BooleanOptionalAction, default=True,
                   help="linear layer after the blocks (Fig. 1); --no-final-proj = torchaudio prototype (deviation 2)")
    g.add_argument("--targets", type=str, default="proj", choices=["proj", "latent"],
                   help="contrastive targets: latent = z_t itself (Eq. 1; the final linear maps the context to the "
                        "256-d latents); proj = Linear(256, d)(z_t), fairseq's quantize_targets=False (deviation 2)")
    g = p.add_argument_group("pre-training (Sec. 2.2, 2.3)")
    g.add_argument("--pretrain", type=str, default=None,
                   help="unlabelled data: 'corpus' (the --data-root corpus's --data audio, labels ignored), "
                        "'synthetic' (the stream), a manifest .tsv (labels ignored), or 'none'. Default: corpus "
                        "with --data-root, else synthetic")
    g.add_argument("--pool-size", type=P_INT, default=None,
                   help="synthetic stream: pre-train on a finite pool of N clips (Fig. 2a); default unbounded")
    g.add_argument("--pt-steps", type=P_INT, default=None, help="pre-training updates (300k; CPU preset: 250)")
    g.add_argument("--pt-warmup", type=common.FRACTION, default=10_000 / 300_000,
                   help="warm-up fraction of the updates (10k of 300k, Sec. 2.3)")
    g.add_argument("--pt-lr", type=POS, default=3e-4, help="peak learning rate (Sec. 2.3)")
    g.add_argument("--pt-batch-size", type=P_INT, default=None,
                   help="clips per update and process (not given: paper preset 64; CPU preset: 16)")
    g.add_argument("--pt-seconds", type=POS, default=10.0, help="clip length of pre-training examples (ours)")
    g.add_argument("--weight-decay", type=NONNEG, default=0.01, help="AdamW weight decay (Sec. 2.3)")
    g.add_argument("--mask-prob", type=SHARE, default=0.3, help="mask probability p (Sec. 2.3; torchaudio)")
    g.add_argument("--mask-length", type=P_INT, default=3, help="span length L (torchaudio prototype)")
    g.add_argument("--num-negatives", type=P_INT, default=100, help="K distractors (Sec. 2.3)")
    g.add_argument("--temperature", type=POS, default=0.1,
                   help="cosine / temperature; 1 = Eq. 1 literally (deviation 3; wav2vec 2.0: 0.1)")
    g.add_argument("--pretrained", type=str, default=None, help="use this pre-trained encoder (pretrain.pt)")
    g = p.add_argument_group("fine-tuning (Sec. 4)")
    g.add_argument("--fractions", type=SHARE, nargs="+", default=None,
                   help="labelled fractions in (0, 1] (Table 1: 0.01 0.03 0.1 0.3 1; default run: 0.1 1)")
    g.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=False,
                   help="frozen encoder + linear probe (the setting Sec. 4 argues against)")
    g.add_argument("--pooling", type=str, default="auto", choices=["auto", "linsoft", "mean"],
                   help="linsoft: frame sigmoid + linear-softmax pooling (AudioSet); mean: mean pool + linear "
                        "(other tasks, Sec. 4); auto picks by task")
    g.add_argument("--ft-steps", type=P_INT, default=None,
                   help="fine-tuning updates (not given: paper preset 40k; CPU preset: 300)")
    g.add_argument("--ft-lr", type=POS, default=None, help="peak fine-tuning LR (swept in Sec. 4.3; paper preset "
                   "1e-4; CPU preset: 1e-3)")
    g.add_argument("--batch-size", type=P_INT, default=None, help="fine-tuning batch per process: 640 full / 64 "
                   "small tasks (Sec. 4.3); CPU preset: 8")
    g.add_argument("--phase-ratio", type=common.FRACTION, nargs=3, default=[0.3, 0.3, 0.4],
                   help="tri-stage LR: warm-up / hold / exponential decay, summing to 1 (Sec. 4.3)")
    g.add_argument("--init-scale", type=SHARE, default=0.01, help="tri-stage initial LR scale (fairseq)")
    g.add_argument("--final-scale", type=SHARE, default=0.01, help="tri-stage final LR scale (fairseq)")
    g.add_argument("--jitter", type=common.NONNEG_INT, default=200, help="temporal jitter +- samples (Sec. 4.1)")
    g.add_argument("--time-mask", type=common.FRACTION, default=0.2, help="one time mask up to this share of the "
                   "clip (2 s per 10 s, Sec. 4.1)")
    g.add_argument("--mixup-alpha", type=NONNEG, default=0.5, help="mix-up Beta(a, a) on log-mels (Sec. 4.1); 0: off")
    g.add_argument("--consistency", type=NONNEG, default=2.0, help="weight of the symmetric KL (Sec. 4.2)")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="class-balanced sampling (Sec. 4.1: on full AudioSet); default on for the corpus's full "
                        "training set (fraction 1 of --data full) only; --balance: every set, --no-balance: none")
    g.add_argument("--head-dropout", type=UNIT, default=None,
                   help="dropout on the encoder output (Sec. 4.3, small tasks); default 0 corpus / 0.1 tasks")
    g = p.add_argument_group("experiments")
    g.add_argument("--table", type=int, default=None, choices=[1], help="Table 1: fractions x {scratch, pre-trained}")
    g.add_argument("--fig", type=str, default=None, choices=["2a"], help="Fig. 2a: pre-training pool size")
    g.add_argument("--pools", type=POS, nargs="+", default=[0.25, 1, 4, 16],
                   help="Fig. 2a pool sizes, multiples of the labelled set")
    g.add_argument("--seeds", type=common.NONNEG_INT, nargs="+", default=None,
                   help="fine-tuning seeds (one pre-trained encoder)")
    g.add_argument("--multi-seed-below", type=NONNEG, default=0.3,
                   help="use all --seeds for fractions below this, the first seed above (saves CPU)")
    g.add_argument("--task", type=str, default=None, help="a downstream task name from the task root (Table 3)")
    g.add_argument("--task-root", type=str, default=None, help="task root with tasks.json (default: synthetic)")
    g.add_argument("--folds", type=P_INT, default=None, help="use only the first N splits of a k-fold task")
    g.add_argument("--log-every", type=P_INT, default=25, help="log (and checkpoint) every N updates")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if abs(sum(a.phase_ratio) - 1) > 1e-6:
        p.error(f"argument --phase-ratio: {' '.join(map(str, a.phase_ratio))} does not sum to 1")
    if any(k % 2 == 0 for k in a.kernels):  # an even depthwise kernel would shorten the sequence
        p.error(f"argument --kernels: {a.kernels[0]} {a.kernels[1]}: the kernels must be odd")
    if a.seed < 0:
        p.error(f"argument --seed: {a.seed} is negative")
    if a.task and (a.table or a.fig):
        p.error("argument --task: a downstream task is its own experiment (no --table / --fig)")
    if a.fig and (a.pretrained or a.pretrain == "none"):
        p.error("argument --fig: Fig. 2a pre-trains its own pools (no --pretrained, no --pretrain none)")
    return a


# =============================================================================================
# Model: feature encoder, conformer blocks, context encoder, heads (Sec. 2.2, 4; torchaudio layout)
# =============================================================================================
class FeedForward(nn.Module):
    """LN -> Linear(d, f) -> SiLU -> Dropout -> Linear(f, d) -> Dropout (used as a half step)."""

    def __init__(self, d: int, f: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, f), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(f, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvModule(nn.Module):
    """LN -> pointwise conv (d -> 2d) -> GLU -> depthwise conv (k) -> GroupNorm(1 group) -> SiLU ->
    pointwise conv -> Dropout, on (B, T, d). GroupNorm as in the torchaudio prototype (use_group_norm)."""

    def __init__(self, d: int, kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, kernel, padding=(kernel - 1) // 2, groups=d)
        self.gn = nn.GroupNorm(1, d)
        self.pw2 = nn.Conv1d(d, d, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pw1(self.norm(x).transpose(1, 2)), dim=1)  # (B, d, T)
        y = self.pw2(F.silu(self.gn(self.dw(y))))
        return self.drop(y.transpose(1, 2))  # (B, T, d)


class ConformerBlock(nn.Module):
    """x += FFN/2; x += Conv (before attention: it gives the positions, no relative encoding, Sec. 2.2
    after [14]); x += MHSA(LN x); x += FFN/2; LN. 7d^2 + 4df + dk + 2f + 22d parameters."""

    def __init__(self, d: int, ffn: int, heads: int, kernel: int, dropout: float):
        super().__init__()
        self.ffn1, self.ffn2 = FeedForward(d, ffn, dropout), FeedForward(d, ffn, dropout)
        self.conv = ConvModule(d, kernel, dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.attn_drop = nn.Dropout(dropout)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn1(x)
        x = x + self.conv(x)
        h = self.attn_norm(x)
        x = x + self.attn_drop(self.attn(h, h, h, need_weights=False)[0])
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class Encoder(nn.Module):
    """Log-mel front-end -> feature encoder (stack R = 4 frames -> Linear(256, 256) -> LayerNorm:
    latents Z at 80 ms) -> [mask] -> context encoder (Linear(256, d) -> conformer blocks -> Linear: d -> d, or
    d -> 256 with targets 'latent', where c_t is compared with z_t itself, Eq. 1). `forward` returns (Z, C) or,
    with a mask, (unmasked Z, C of the masked input)."""
    STACK, LATENT = 4, 256

    def __init__(self, blocks: int, dim: int, heads: int, ffn: int, kernels=(31, 15), dropout: float = 0.1,
                 final_proj: bool = True, targets: str = "proj"):
        super().__init__()
        self.frontend = common.LogMel.preset("conformer")  # 64 mels, 64 ms / 20 ms (Sec. 2.2); no parameters
        self.feature = nn.Linear(64 * self.STACK, self.LATENT)
        self.feature_norm = nn.LayerNorm(self.LATENT)
        self.mask_emb = nn.Parameter(torch.empty(self.LATENT).uniform_())  # learned, U[0, 1) init (fairseq)
        self.in_proj = nn.Linear(self.LATENT, dim)
        self.blocks = nn.ModuleList(ConformerBlock(dim, ffn, heads, kernels[0] if i == 0 else kernels[1], dropout)
                                    for i in range(blocks))
        self.out_dim = self.LATENT if targets == "latent" and final_proj else dim  # the context's size
        self.out_proj = nn.Linear(dim, self.out_dim) if final_proj else nn.Identity()
        self.dim = dim

    def features(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 64, T) log-mel -> (B, T // 4, 256) latents Z; T is truncated to a multiple of 4."""
        b, f, t = mel.shape
        x = mel[:, :, : t - t % self.STACK].transpose(1, 2).reshape(b, t // self.STACK, f * self.STACK)
        return self.feature_norm(self.feature(x))

    def context(self, z: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(z)
        for block in self.blocks:
            x = block(x)
        return self.out_proj(x)  # (B, T', d)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.features(mel)
        zm = z if mask is None else torch.where(mask.unsqueeze(-1), self.mask_emb.to(z.dtype), z)
        return z, self.context(zm)


class PretrainModel(nn.Module):
    """Encoder + the targets: Linear(256, d) of the unmasked latents ('proj', deviation 2), or the unmasked
    latents z_t themselves ('latent', Eq. 1)."""

    def __init__(self, **cfg):
        super().__init__()
        self.encoder = Encoder(**cfg)
        latent = cfg.get("targets", "proj") == "latent"
        self.target_proj = nn.Identity() if latent else nn.Linear(Encoder.LATENT, cfg["dim"])

    def forward(self, wave: torch.Tensor, mask_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> context (B, T', d), targets of all steps (B, T', d), mask (B, T') on the CPU, where it is drawn."""
        mel = self.encoder.frontend(wave)
        t = mel.shape[-1] // Encoder.STACK
        mask = mask_fn(wave.shape[0], t)
        z, c = self.encoder(mel, mask.to(wave.device, non_blocking=True))
        return c, self.target_proj(z), mask


def linear_softmax_pool(p: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Linear softmax pooling [13]: clip p = sum_t p_t^2 / sum_t p_t, frame p clamped to [1e-7, 1 - 1e-7]."""
    p = p.clamp(1e-7, 1 - 1e-7)
    return (p * p).sum(dim) / p.sum(dim)


class Classifier(nn.Module):
    """Encoder (no masking) + head (Sec. 4): 'linsoft' = frame Linear + sigmoid + linear-softmax pooling;
    'mean' = mean over frames + Linear. Returns clip scores: probabilities (linsoft) or logits (mean)."""

    def __init__(self, n_classes: int, pooling: str, head_dropout: float = 0.0, **cfg):
        super().__init__()
        self.encoder = Encoder(**cfg)
        self.pooling = pooling
        self.drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(self.encoder.out_dim, n_classes)

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        return self.drop(self.encoder(mel)[1])  # (B, T', d)

    def forward_mel(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.embed(mel)
        if self.pooling == "linsoft":
            return linear_softmax_pool(torch.sigmoid(self.head(c).float()))  # (B, K) probabilities
        return self.head(c.mean(1))  # (B, K) logits

    def forward(self, x: torch.Tensor, mel: bool = False) -> torch.Tensor:
        """Clip scores of waves (B, N), or of log-mels (B, 64, T) with mel=True (augmented in training)."""
        return self.forward_mel(x if mel else self.encoder.frontend(x))


def model_config(args) -> dict:
    return dict(blocks=args.blocks, dim=args.dim, heads=args.heads, ffn=args.ffn, kernels=tuple(args.kernels),
                dropout=args.dropout, final_proj=args.final_proj, targets=args.targets)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# =============================================================================================
# Pre-training procedures: span masking, distractors, contrastive loss, LR (Sec. 2.2, 2.3)
# =============================================================================================
def compute_mask_indices(shape: tuple[int, int], mask_prob: float, mask_length: int, rng: np.random.Generator,
                         min_masks: int = 2) -> np.ndarray:
    """(B, T) boolean span mask as fairseq's compute_mask_indices (static spans, overlaps allowed):
    per clip int(p T / L + U[0, 1)) spans (at least min_masks) of length L, starts drawn without
    replacement from [0, T - L), union clipped to T. Expected masked share ~ 1 - (1 - p / L)^L (27 %)."""
    b, t = shape
    mask = np.zeros((b, t), dtype=bool)
    for i in range(b):  # a loop over clips (tens), not over steps
        n = max(min_masks, int(mask_prob * t / mask_length + rng.random()))
        min_len = mask_length
        if t - min_len <= n:  # short clips: fairseq shrinks the start range
            min_len = t - n - 1
        if t - min_len <= 0:
            continue
        n = min(n, t - min_len)
        starts = rng.choice(t - min_len, n, replace=False)
        idx = (starts[:, None] + np.arange(mask_length)).ravel()
        mask[i, idx[idx < t]] = True
    return mask


def sample_negatives(counts: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Distractor indices (N, K) into the N masked steps listed clip by clip (counts[b] of clip b, on the
    CPU): uniform with replacement over the OTHER masked steps of the same clip, never the step itself
    (fairseq sample_negatives: draw from m - 1, shift those >= own index). Clips with < 2 masked
    steps get their own index (the caller drops them)."""
    counts = counts.long()
    offsets = torch.cumsum(counts, 0) - counts
    clip = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (N,)
    own = torch.arange(len(clip)) - offsets[clip]  # position within its clip
    m = counts[clip]
    r = (torch.rand(len(clip), k, generator=generator) * (m - 1).clamp_min(0).unsqueeze(1)).long()
    r = r + (r >= own.unsqueeze(1)).long() * (m > 1).long().unsqueeze(1)
    r = torch.where((m > 1).unsqueeze(1), r, own.unsqueeze(1))
    return offsets[clip].unsqueeze(1) + r


def contrastive_loss(c: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, k: int, temperature: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Eq. 1: -log softmax over {z_t, K distractors} of cos(c_t, .) / temperature, positive first,
    averaged over the masked steps. c, y: (B, T', d) context / targets; mask (B, T') on the CPU: every
    index is computed there, so nothing waits for the device. Distractors equal to the positive get
    -inf (fairseq). Returns (loss, accuracy of picking the positive, N), on c's device."""
    counts = mask.sum(1)
    where = tuple(i.to(c.device, non_blocking=True) for i in mask.nonzero(as_tuple=True))
    cm, ym = c[where].float(), y[where].float()  # (N, d), clip by clip
    neg = sample_negatives(counts, k, generator).to(c.device, non_blocking=True)
    keep = torch.nonzero(counts.repeat_interleave(counts) > 1).squeeze(1)  # steps of clips with >= 2 masked
    cand = torch.cat([ym.unsqueeze(1), ym[neg]], 1)  # (N, 1 + K, d): positive first
    logits = F.cosine_similarity(cm.unsqueeze(1), cand, dim=-1) / temperature
    same = (cand[:, 1:] == ym.unsqueeze(1)).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    logits = logits[keep.to(c.device, non_blocking=True)]
    zero = torch.zeros(len(keep), dtype=torch.long, device=c.device)
    loss = F.cross_entropy(logits, zero)
    acc = (logits.argmax(1) == 0).float().mean()
    return loss, acc, len(keep)


def pretrain_lr(step: int, total: int, warmup_frac: float, peak: float) -> float:
    """Linear warm-up to the peak (10k of 300k updates), then linear decay to 0 at the end (Sec. 2.3)."""
    warm = max(1, round(total * warmup_frac))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0.0, (total - step) / max(1, total - warm))


def tri_stage_lr(step: int, total: int, peak: float, ratios=(0.3, 0.3, 0.4), init_scale: float = 0.01,
                 final_scale: float = 0.01) -> float:
    """Three-stage LR (Sec. 4.3, [23]; fairseq tri_stage): linear warm-up from init_scale * peak,
    hold at the peak, exponential decay reaching final_scale * peak at the end of the decay stage."""
    w, h, d = (int(total * r) for r in ratios)
    if step < w:
        return peak * (init_scale + (1 - init_scale) * step / w)
    if step < w + h:
        return peak
    if step <= w + h + d and d > 0:
        return peak * math.exp(math.log(final_scale) * (step - w - h) / d)
    return peak * final_scale


# =============================================================================================
# Data: unlabelled clips for pre-training; labelled sets for fine-tuning (corpus fractions, tasks)
# =============================================================================================
@dataclass
class FTData:
    """One fine-tuning problem: training rows/targets, test rows/targets, how to score them."""
    name: str
    root: Path
    train_rows: list
    train_y: np.ndarray
    test_rows: list
    test_y: np.ndarray
    multi: bool
    metric: str
    segment: float
    varlen: bool
    balance: bool
    pooling: str
    fraction: float | None  # of the corpus's training set (None: a task split)
    source: list  # the metadata files' identity (a fine-tuning is redone when they change)
    labels: dict | None = None  # {"mids": [...], "names": [...]} of the targets' columns (kept in final.pt)


def files_identity(*paths: Path) -> list:
    """Path, size and mtime of metadata files, for the settings of a stage that reads them."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file()]


class StreamClips(torch.utils.data.Dataset):
    """Clip j of the unlabelled synthetic stream (data/synthetic.py), as (wave, no target, j). Indexed, so
    the pre-training position is the stream offset (clips consumed), whatever the workers and ranks."""

    def __init__(self, seed: int, clip_seconds: float):
        self.seed, self.clip_seconds = seed, clip_seconds

    def __getitem__(self, j: int):
        x = common.load_data_module("synthetic").stream_clip(self.seed, int(j), self.clip_seconds)
        return torch.from_numpy(x), torch.zeros(1), int(j)


@dataclass
class Unlabelled:
    """What pre-training draws its clips from (labels ignored): the synthetic stream (rows None) or the
    rows of manifests under root; `what` is printed at start and kept in results.json."""
    what: str
    root: Path | None = None
    rows: list | None = None
    source: list = field(default_factory=list)  # the metadata files' identity (part of the stage's key)


def unlabelled_source(args, data) -> Unlabelled | None:
    """--pretrain resolved (None for 'none'): 'corpus' = the --data-root corpus's --data manifests (the default
    with a real-layout --data-root);
    'synthetic' = the stream (the default on the synthetic corpus, whose unlabelled audio it is); a .tsv."""
    if args.pretrain == "none":
        return None
    if args.pretrain == "synthetic":
        return Unlabelled(f"the synthetic stream (data/synthetic.py stream_clip, seed {args.seed}"
                          + (f", a pool of {args.pool_size} clips)" if args.pool_size else ")"))
    if args.pretrain == "corpus":
        if not args.data_root:
            raise common.DataError("--pretrain corpus: no --data-root to pre-train on")
        corpus = data if isinstance(data, common.Corpus) else common.load_corpus(args.data_root, args.data)
        return Unlabelled(f"{corpus.root} (--data {args.data}: {len(corpus.train):,} clips, labels ignored)",
                          corpus.root, corpus.train, [args.data, *files_identity(*sorted(corpus.root.glob("*.tsv")))])
    rows = common.read_manifest(args.pretrain)
    return Unlabelled(f"{args.pretrain} ({len(rows):,} clips, labels ignored)", Path(args.pretrain).parent, rows,
                      files_identity(Path(args.pretrain)))


def unlabelled_data(args, pool: int | None, unl: Unlabelled | None = None) -> tuple[torch.utils.data.Dataset, np.ndarray]:
    """The pre-training clips and the global order of their ids (every process's batches of one update,
    in turn): the synthetic stream (a finite pool of clips cycled, Fig. 2a) or manifest rows, labels
    ignored, drawn at random with replacement (from a fixed random pool of `pool` of them, if given)."""
    n = args.pt_steps * args.pt_batch_size * common.world_size()
    if unl is None or unl.rows is None:
        return StreamClips(args.seed, args.pt_seconds), np.arange(n) % (pool or n)
    rows, rng = unl.rows, np.random.default_rng(args.seed)
    ds = common.ClipDataset(unl.root, rows, np.zeros((len(rows), 1), np.uint8), args.pt_seconds)
    if pool is None or pool >= len(rows):
        return ds, rng.integers(0, len(rows), n)
    pick = np.sort(rng.permutation(len(rows))[:pool])
    return ds, pick[rng.integers(0, pool, n)]


def corpus_data(args, corpus: common.Corpus, fraction: float, cache: dict | None = None) -> FTData:
    """Nested, stratified label fractions of the training set (fixed subsets, seed 0); on real
    AudioSet '1 %' is the balanced set, as in the paper (deviation 6). Targets are uint8 multi-hot (a
    quarter of float32: 1.1 GB for full AudioSet); `cache` holds the training set's targets and the
    fractions' rows for every set of one run. Class-balanced sampling by default only on the full
    training set (fraction 1 of --data full), where the paper uses it (Sec. 4.1)."""
    cache = {} if cache is None else cache
    if "y" not in cache:
        cache["y"] = corpus.targets(corpus.train, dtype=np.uint8)  # (N, K)
    y = cache["y"]
    if not corpus.synthetic and args.data == "full" and fraction == 0.01:
        rows = common.load_corpus(args.data_root, "balanced").train
        train_y = corpus.targets(rows, dtype=np.uint8)
    elif fraction == 1.0:  # label_fractions' 100 % is every row in order
        rows, train_y = corpus.train, y
    else:
        if "idx" not in cache:
            cache["idx"] = common.label_fractions(y, sorted(set(FRACTIONS) | set(args.fractions)), seed=0)
        idx = cache["idx"].get(fraction)
        if idx is None:  # a fraction not planned for (a direct call): the same nested order
            idx = common.label_fractions(y, sorted(set(FRACTIONS) | {fraction}), seed=0)[fraction]
        rows, train_y = [corpus.train[i] for i in idx], y[idx]
    test_y = corpus.true_targets(corpus.eval) if corpus.true else corpus.targets(corpus.eval)
    balance = args.balance if args.balance is not None else (fraction == 1.0 and args.data == "full")
    return FTData(f"corpus_f{fraction:g}", corpus.root, rows, train_y, corpus.eval, test_y, True, "mAP",
                  args.clip_seconds, False, balance, "linsoft" if args.pooling == "auto" else args.pooling, fraction,
                  files_identity(*sorted(corpus.root.glob("*.tsv")), corpus.root / "class_labels_indices.csv"),
                  {"mids": list(corpus.labels.mids), "names": list(corpus.labels.names)})


def task_data(args, task: common.Task, split) -> FTData:
    name, train, _valid, test = split
    return FTData(f"{task.name}_{name}", task.root, train, task.targets(train), test, task.targets(test),
                  task.type == "multi", task.metric, task.max_seconds, True, bool(args.balance),
                  "mean" if args.pooling == "auto" else args.pooling, None,
                  files_identity(Path(args.task_root) / "tasks.json", Path(args.task_root) / task.info["manifest"]),
                  {"mids": list(task.classes), "names": list(task.classes)})


def labelled_sets(args, data) -> list[FTData]:
    """What the encoders are fine-tuned on: the corpus at each fraction (Fig. 2a: the lowest and all of
    it), or each split of a task (the first --folds)."""
    if args.task:
        return [task_data(args, data, split) for split in common.task_splits(data)[: args.folds]]
    fractions = sorted({args.fractions[0], 1.0}) if args.fig else args.fractions
    cache = {}  # the training set's targets and fraction rows, computed once for every set
    return [corpus_data(args, data, f, cache) for f in fractions]


def seeds_for(args, data: FTData) -> list[int]:
    """All --seeds below --multi-seed-below, the first seed above (and on task splits)."""
    return args.seeds if data.fraction is not None and data.fraction < args.multi_seed_below else args.seeds[:1]


# =============================================================================================
# Training and evaluation
# =============================================================================================
def pretrain_dir(args, pool: int | None, unl: Unlabelled | None = None) -> Path:
    """The pre-trained encoder's stage folder, named by every setting that changes it: shared by every
    fraction, seed and run with these settings."""
    keys = ("pretrain", "pt_steps", "pt_warmup", "pt_lr", "pt_batch_size", "pt_seconds", "weight_decay", "mask_prob",
            "mask_length", "num_negatives", "temperature", "seed", "max_steps", "amp")
    return common.stage_dir(Path(args.out).parent, "pretrain", model_config(args) | {k: getattr(args, k) for k in keys}
                            | {"pool": pool, "world": common.world_size(), "source": unl.source if unl else []})


def finetune_dir(args, data: FTData, encoder: Path | None, seed: int) -> Path:
    """A fine-tuning cell's stage folder (labelled set x encoder x seed), named by every setting that changes it."""
    keys = ("data", "ft_steps", "ft_lr", "batch_size", "phase_ratio", "init_scale", "final_scale", "jitter",
            "time_mask", "mixup_alpha", "consistency", "head_dropout", "freeze", "weight_decay", "max_steps", "amp")
    settings = model_config(args) | {k: getattr(args, k) for k in keys} | {
        "set": data.name, "source": data.source, "rows": len(data.train_rows), "pooling": data.pooling,
        "balance": data.balance, "encoder": files_identity(encoder) if encoder else None, "seed": seed,
        "world": common.world_size()}
    name = f"{data.name}_{'scratch' if encoder is None else 'pretrained'}_s{seed}"
    return common.stage_dir(Path(args.out).parent / "finetune", name, settings)


def train_loop(folder: Path, model: nn.Module, opt, scaler, ds, order: np.ndarray, total: int, bs: int, lr_at, step_fn,
               args, seed: int) -> dict:
    """The loop of both stages, resumed exactly: every --log-every updates last.pt holds the model, optimizer,
    scaler, every RNG state and the data position (the offset into the global `order` of clips; for the
    stream: the clips consumed). Each process trains on its shard of every update's clips. step_fn(batch,
    step) -> {name: scalar on the device}, averaged there and read at log time. -> the loop's state."""
    logger, world, device = common.RunLogger(folder), common.world_size(), next(model.parameters()).device
    state = common.load_state(folder / "last.pt", model, opt, scaler)
    if state is None:
        state = {"step": 0, "offset": 0, "curve": [], "skipped": 0, "seconds": 0.0}
    elif state["curve"]:  # the log line of the checkpoint, if a kill came before it was written
        logger.log_once(state["curve"][-1], ("step",))
    mine = common.shard(order[state["offset"]: total * bs * world])  # this process's share of the rest
    means, pending, t0 = {}, 0, time.time()
    bar = tqdm(total=total, initial=state["step"], desc=folder.name, leave=False, disable=not common.is_main())
    for j, batch in enumerate(common.make_loader(ds, bs, sampler=mine, workers=args.workers, seed=seed)):
        lr = lr_at(state["step"])
        for g in opt.param_groups:
            g["lr"] = lr
        pending += len(mine[j * bs: (j + 1) * bs]) - (0 if batch is None else len(batch[2]))  # unreadable clips
        if batch is not None:  # None: every clip of the batch was unreadable
            for k, v in step_fn(common.to_device(batch, device), state["step"]).items():
                if k not in means:
                    means[k] = common.Mean(v.device)
                means[k].add(v)
        state["step"], state["offset"] = state["step"] + 1, state["offset"] + bs * world
        bar.update(1)
        if state["step"] % args.log_every == 0 or state["step"] == total:
            state["skipped"], pending = state["skipped"] + common.all_sum(pending), 0
            state["seconds"], t0 = state["seconds"] + time.time() - t0, time.time()
            state["curve"].append({"step": state["step"], **{k: m.read() for k, m in means.items()}, "lr": lr,
                                   "skipped": state["skipped"]})
            common.save_state(folder / "last.pt", model, opt, scaler, **state)
            logger.log(state["curve"][-1])
    bar.close()
    return state


def pretrain_step(net: nn.Module, opt, scaler, wave: torch.Tensor, step: int, args, dtype) -> dict:
    """One pre-training update (Sec. 2.3). Masks and distractors are drawn from (seed, step, rank), so a
    resumed run draws what an uninterrupted one does. -> loss, accuracy of the positive, masked share."""
    rng = np.random.default_rng([args.seed, step, common.rank()])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    mask_fn = lambda b, t: torch.from_numpy(compute_mask_indices((b, t), args.mask_prob, args.mask_length, rng))
    with common.autocast(wave.device, dtype):
        c, y, mask = net(wave, mask_fn)
    loss, acc, _ = contrastive_loss(c, y, mask, args.num_negatives, args.temperature, gen)
    common.optimizer_step(loss, opt, scaler)
    return {"train/loss": loss.detach(), "train/acc": acc, "masked": mask.float().mean()}


def pretrain(args, pool: int | None, device, unl: Unlabelled | None = None) -> Path:
    """Stage 1 (Sec. 2): contrastive pre-training on `unl` (default: the stream), resumed exactly from last.pt;
    writes pretrain.pt with the encoder weights, the loss / accuracy curve and its plateau report."""
    folder = pretrain_dir(args, pool, unl)
    final = folder / "pretrain.pt"
    with common.RunLock(folder, wait=True):  # a second run needing this encoder waits, then reuses it
        if common.from_rank0(final.exists()):
            return final
        common.seed_everything(args.seed)
        model = PretrainModel(**model_config(args)).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.pt_lr, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=args.weight_decay)  # Sec. 2.3
        dtype = common.amp_dtype(device, args.amp)
        scaler = common.grad_scaler(device, dtype)
        net = common.compiled(common.wrap_ddp(model), args.compile)
        total = min(args.pt_steps, args.max_steps or args.pt_steps)
        what = unl.what if unl else "the synthetic stream"
        print(f"pre-training: {count_params(model):,} parameters ({args.size}), {total} updates of "
              f"{args.pt_batch_size} x {args.pt_seconds:g} s on {what}, pool {pool or 'unbounded'}")
        ds, order = unlabelled_data(args, pool, unl)
        state = train_loop(folder, model, opt, scaler, ds, order, total, args.pt_batch_size,
                           lambda step: pretrain_lr(step, total, args.pt_warmup, args.pt_lr),
                           lambda batch, step: pretrain_step(net, opt, scaler, batch[0], step, args, dtype),
                           args, args.seed)
        common.RunLogger(folder).log_once(plateau_line(state["step"], pretrain_plateau(state["curve"])),
                                          ("step", "plateau/train/acc"))  # the stage's convergence line
        common.save_checkpoint(final, {"script": "conformer_ssl", "encoder": model.encoder.state_dict(),
                                       "config": model_config(args), "args": vars(args), "pool": pool,
                                       "data": unl.what if unl else None, "curve": state["curve"],
                                       "seconds": state["seconds"], "skipped": state["skipped"],
                                       "params": count_params(model)})
        if common.is_main():
            (folder / "last.pt").unlink(missing_ok=True)
        common.barrier()  # rank 0 wrote pretrain.pt; every rank reads it next
    return final


def pretrain_plateau(curve: list[dict]) -> dict:
    """Whether pre-training reached a plateau (common.plateau_report over the logged means, tolerance 0.005):
    of the accuracy of the positive first, of the contrastive loss second."""
    return {"train/acc": common.plateau_report([r["train/acc"] for r in curve if "train/acc" in r], higher=True),
            "train/loss": common.plateau_report([r["train/loss"] for r in curve if "train/loss" in r], higher=False)}


def plateau_line(step: int, reports: dict) -> dict:
    """A stage's last log line: for each curve, plateau (bool), best and last, over `logs` logged means."""
    line = {"step": step}
    for key, r in reports.items():
        line |= {f"plateau/{key}": r["plateau"], f"best/{key}": r["best"], f"last/{key}": r["last"]}
    r = next(iter(reports.values()))
    return line | {"plateau_tol": r["tolerance"], "logs": r["validations"]}


def load_encoder(path: Path, args) -> dict:
    """The encoder weights of this script's pretrain.pt, made with this run's encoder flags; else one line."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # missing, or not a torch file at all
        raise common.DataError(f"--pretrained {path}: not readable as a checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("script") != "conformer_ssl" or "encoder" not in ck:
        raise common.DataError(f"--pretrained {path}: not a pre-trained encoder of conformer_ssl.py (pretrain.pt)")
    config = {"targets": "proj"} | ck["config"]  # an encoder saved before --targets existed projected them
    if config != model_config(args):
        raise common.DataError(f"--pretrained {path}: encoder {config}, this run's flags {model_config(args)}")
    return ck["encoder"]


def augment(model: Classifier, wave: torch.Tensor, args) -> torch.Tensor:
    """Sec. 4.1, in the paper's order: jitter +-200 samples -> log-mel -> one time mask (up to 2 s per
    10 s, filled with the clip's mean; no frequency masks) -> mix-up with alpha_i >= 1 - alpha_i."""
    wave = common.wave_augment(wave, (0.0, 0.0), polarity_p=0.0, max_shift=args.jitter)
    mel = model.encoder.frontend(wave)  # (B, 64, T)
    keep = common.mask_along(torch.ones_like(mel[:, :1]), int(args.time_mask * mel.shape[-1]) + 1, 2, 1)
    mel = torch.where(keep.bool(), mel, mel.mean((1, 2), keepdim=True))
    if args.mixup_alpha > 0:  # Eq. 2; labels are not mixed
        b = mel.shape[0]
        lam = torch.distributions.Beta(args.mixup_alpha, args.mixup_alpha).sample((b,)).to(mel.device)
        lam = torch.maximum(lam, 1 - lam).view(b, 1, 1)
        mel = lam * mel + (1 - lam) * mel[torch.randperm(b, device=mel.device)]
    return mel


def to_probs(out: torch.Tensor, pooling: str, multi: bool) -> torch.Tensor:
    if pooling == "linsoft":
        return out
    return torch.sigmoid(out.float()) if multi else torch.softmax(out.float(), -1)


def task_loss(out: torch.Tensor, y: torch.Tensor, pooling: str, multi: bool) -> torch.Tensor:
    if pooling == "linsoft":
        return F.binary_cross_entropy(out.float().clamp(1e-7, 1 - 1e-7), y.float())
    if multi:
        return F.binary_cross_entropy_with_logits(out.float(), y.float())
    return F.cross_entropy(out.float(), y.argmax(1))


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, multi: bool) -> torch.Tensor:
    """KL(p||q) + KL(q||p) (Sec. 4.2): per-class Bernoulli for multi-label, = (p - q)(logit p - logit q),
    averaged over batch and classes like BCE; categorical for single-label, averaged over the batch."""
    p, q = p.float().clamp(1e-7, 1 - 1e-7), q.float().clamp(1e-7, 1 - 1e-7)
    if multi:
        return ((p - q) * (torch.logit(p) - torch.logit(q))).mean()
    return ((p - q) * (p.log() - q.log())).sum(1).mean()


def train_step(net: nn.Module, model: Classifier, opt, scaler, wave: torch.Tensor, y: torch.Tensor, data: FTData,
               args, dtype) -> dict:
    """One fine-tuning update (Sec. 4): two augmented views of the batch in one forward, the task loss of
    both plus 2 x the symmetric KL between their probabilities (Sec. 4.2). -> the loss, on the device."""
    views = 2 if args.consistency > 0 else 1
    with common.autocast(wave.device, dtype):
        outs = net(torch.cat([augment(model, wave, args) for _ in range(views)]), mel=True).chunk(views)
    loss = sum(task_loss(o, y, data.pooling, data.multi) for o in outs) / views
    if views == 2:
        loss = loss + args.consistency * symmetric_kl(to_probs(outs[0], data.pooling, data.multi),
                                                      to_probs(outs[1], data.pooling, data.multi), data.multi)
    common.optimizer_step(loss, opt, scaler)
    return {"train/loss": loss.detach()}


@torch.no_grad()
def predict(model: Classifier, data: FTData, args, device) -> np.ndarray:
    """(N, K) float32 clip probabilities of the test rows: whole clips in batches of at least the
    fine-tuning size, or one variable-length clip at a time (tasks), read in this process; an unreadable
    clip scores NaN (left out of the metric and counted)."""
    model.eval()
    y, dtype = data.test_y, common.amp_dtype(device, args.amp)
    if data.varlen:
        ds, bs = common.VarLenDataset(data.root, data.test_rows, y), 1
    else:
        ds, bs = common.ClipDataset(data.root, data.test_rows, y, data.segment), max(args.batch_size, 32)
    out = np.full(y.shape, np.nan, np.float32)
    for batch in common.make_loader(ds, bs, workers=0):
        if batch is not None:
            with common.autocast(device, dtype):
                o = model(common.to_device(batch, device)[0])
            out[batch[2].numpy()] = to_probs(o, data.pooling, data.multi).float().cpu().numpy()
    return out


def score(data: FTData, probs: np.ndarray) -> dict:
    """The test metric on the readable clips: {'score', 'n' (clips scored), 'skipped' (unreadable)}."""
    return common.readable_scores(data.test_y, probs, lambda y, p: common.task_score(data.metric, y, p))


def finetune(args, data: FTData, encoder: Path | None, weights: dict | None, seed: int, device) -> dict:
    """Stage 2 (Sec. 4): fine-tune every weight (or only the head with --freeze) from the pre-trained
    encoder or from scratch, the same budget for both; two augmented views per batch, BCE (or CE) on
    both plus the consistency term; tri-stage LR. `weights`: the encoder's, read from `encoder` (its
    identity names the folder). Resumed exactly from last.pt; result.json holds the test score."""
    folder = finetune_dir(args, data, encoder, seed)
    with common.RunLock(folder, wait=True):
        if common.from_rank0((folder / "result.json").exists()):
            return common.read_json(folder / "result.json")
        common.seed_everything(seed)
        model = Classifier(data.train_y.shape[1], data.pooling, args.head_dropout, **model_config(args)).to(device)
        if weights is not None:
            model.encoder.load_state_dict(weights)
        model.train().encoder.mask_emb.requires_grad_(False)  # no masking here (DDP: every trained weight is used)
        if args.freeze:
            model.encoder.requires_grad_(False).eval()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.ft_lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=args.weight_decay)
        dtype = common.amp_dtype(device, args.amp)
        scaler = common.grad_scaler(device, dtype)
        net = common.compiled(common.wrap_ddp(model), args.compile)
        total = min(args.ft_steps, args.max_steps or args.ft_steps)
        n = args.ft_steps * args.batch_size * common.world_size()  # the global order: every process's clips in turn
        if data.varlen:  # tasks: training segments of task.max_seconds, each inheriting its clip's labels
            ds = common.SegmentDataset(data.root, data.train_rows, data.train_y, data.segment,
                                       durations=common.clip_durations(data.root, data.train_rows))
        else:
            ds = common.ClipDataset(data.root, data.train_rows, data.train_y, data.segment)
        if data.balance:  # Sec. 4.1: classes seen at about equal frequency (float64 weights: p sums to 1)
            y = data.train_y
            w = common.generate_sampling_weights(y if y.dtype == np.uint8 else y.astype(np.float64))
            order = common.WeightedSampler(w, n, seed=seed).epoch_indices(0)
        else:
            rng = np.random.default_rng(seed)
            order = np.concatenate([rng.permutation(len(ds)) for _ in range(-(-n // len(ds)))])
        state = train_loop(folder, model, opt, scaler, ds, order, total, args.batch_size,
                           lambda step: tri_stage_lr(step, total, args.ft_lr, args.phase_ratio, args.init_scale,
                                                     args.final_scale),
                           lambda batch, step: train_step(net, model, opt, scaler, batch[0], batch[1], data, args,
                                                          dtype), args, seed)
        test = common.from_rank0(score(data, predict(model, data, args, device)) if common.is_main() else None)
        # the cell's convergence line: no validation split here (deviation 5), so the train loss's plateau
        plateau = common.plateau_report([r["train/loss"] for r in state["curve"] if "train/loss" in r], higher=False)
        res = {"metric": data.metric, "score": test["score"], "n_test": test["n"], "skipped_test": test["skipped"],
               "skipped_train": state["skipped"], "steps": state["step"], "rows": len(data.train_rows),
               "init": "scratch" if encoder is None else "pretrained", "seed": seed, "balance": data.balance,
               "plateau": plateau, "curve": state["curve"]}
        common.save_checkpoint(folder / "final.pt", {"script": "conformer_ssl", "model": model.state_dict(),
                                                     "config": model_config(args), "n_classes": data.train_y.shape[1],
                                                     "pooling": data.pooling, "multi": data.multi, "args": vars(args),
                                                     "labels": data.labels, "result": res})
        if common.is_main():
            common.write_json(folder / "result.json", res)
            (folder / "last.pt").unlink(missing_ok=True)
            common.RunLogger(folder).log({**plateau_line(res["steps"], {"train/loss": plateau}),
                                          f"test/{data.metric}": res["score"], "n_test": res["n_test"]})
    return res


def build_classifier(ckpt: dict) -> Classifier:
    """Rebuild a fine-tuned model from its checkpoint (final.pt) alone."""
    if not isinstance(ckpt, dict) or ckpt.get("script") != "conformer_ssl" or "n_classes" not in ckpt:
        raise common.DataError("not a fine-tuned model of conformer_ssl.py (final.pt)")
    model = Classifier(ckpt["n_classes"], ckpt["pooling"], 0.0, **ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model


def bench_step(device: torch.device, amp: str = "auto", batch_size: int = 8) -> dict:
    """data/bench.py --steps: one real fine-tuning step (train_step: jitter, log-mel, time mask, mix-up,
    two views, BCE + consistency, AdamW) and one bare step (the classifier's forward + BCE + AdamW) on a
    fixed batch of 10 s clips (Sec. 4); 'pretrain': one real pre-training step. The CPU preset on a CPU,
    cf_L elsewhere."""
    device = torch.device(device)
    size = "cpu" if device.type == "cpu" else "L"
    args = resolve(parse_args(["--amp", amp, "--size", size]), size == "cpu")
    dtype, g = common.amp_dtype(device, amp), torch.Generator().manual_seed(0)
    wave = (0.1 * torch.randn(batch_size, 10 * common.SR, generator=g)).to(device)
    y = (torch.rand(batch_size, 30, generator=g) < 0.1).float().to(device)
    data = FTData("bench", Path("."), [], y.cpu().numpy(), [], y.cpu().numpy(), True, "mAP", 10.0, False, False,
                  "linsoft", 1.0, [])
    model = Classifier(30, "linsoft", 0.0, **model_config(args)).to(device).train()
    pt = PretrainModel(**model_config(args)).to(device).train()
    opt, pt_opt = (torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (model, pt))
    scaler = common.grad_scaler(device, dtype)

    def bare():
        with common.autocast(device, dtype):
            loss = task_loss(model(wave), y, "linsoft", True)
        common.optimizer_step(loss, opt, scaler)
    return {"step": lambda: train_step(model, model, opt, scaler, wave, y, data, args, dtype),
            "bare": bare, "clips": batch_size,
            "pretrain": lambda: pretrain_step(pt, pt_opt, scaler, wave, 0, args, dtype)}


# =============================================================================================
# Paper experiments: label efficiency (Table 1), pool size (Fig. 2a), downstream tasks (Table 3)
# =============================================================================================
def resolve(args, synthetic: bool, clip_seconds: float = 10.0) -> argparse.Namespace:
    """Derived values, computed once after parsing: the preset fills the flags left unset
    (common.apply_preset: by the device, not by the corpus; deviation 1 for the CPU preset)."""
    a = common.apply_preset(copy.copy(args), PRESETS, "conformer_ssl")
    cfg = SIZES[a.size]
    a.blocks, a.heads = a.blocks or cfg["blocks"], a.heads or cfg["heads"]
    a.dim, a.ffn = cfg["dim"], cfg["ffn"]
    if a.targets == "latent" and not a.final_proj and a.dim != Encoder.LATENT:
        raise common.DataError(f"--targets latent --no-final-proj: the {a.dim}-d context cannot be compared with "
                               f"the {Encoder.LATENT}-d latents z_t; keep the final linear (--final-proj)")
    a.batch_size = a.batch_size or (64 if a.task else 640)  # paper: 64 small tasks / 640 full AudioSet (Sec. 4.3)
    a.head_dropout = a.head_dropout if a.head_dropout is not None else (0.1 if a.task else 0.0)
    a.clip_seconds = clip_seconds
    a.seeds = a.seeds or [a.seed]
    a.fractions = a.fractions or (list(FRACTIONS) if a.table else [0.1, 1.0])
    corpus = "synth" if synthetic else Path(a.task_root if a.task else a.data_root).name
    a.tag = f"{a.size}_{corpus}" + ("" if (a.blocks, a.heads) == (cfg["blocks"], cfg["heads"])
                                    else f"_b{a.blocks}h{a.heads}") + ("" if a.final_proj else "_noproj") + (
        "_latent" if a.targets == "latent" else "")
    kind = f"_task_{a.task}" if a.task else "_table1" if a.table else "_fig2a" if a.fig else ""
    a.out = a.out or str(Path("runs/conformer_ssl") / (a.name or f"{a.tag}{kind}" + ("_frozen" if a.freeze else "")))
    return a


def load_data(args) -> tuple[argparse.Namespace, object, Unlabelled | None]:
    """The labelled data (the corpus, or a task of a task root), the derived settings and the pre-training
    data (printed); the pre-training manifest and a --pretrained encoder are checked here, before anything
    is written."""
    if args.task:
        args.task_root = str(args.task_root or common.ensure_synthetic_tasks())
        data = common.read_task(args.task_root, args.task)
        synthetic = (Path(args.task_root) / "synth_tasks.json").exists()
        args = resolve(args, synthetic)
        real_root = args.data_root is not None and not (Path(args.data_root) / "synth.json").exists()
    else:
        data = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
        args = resolve(args, data.synthetic, data.clip_seconds or 10.0)
        args.data_root, real_root, synthetic = str(data.root), not data.synthetic, data.synthetic
    # a real-layout --data-root is pre-trained on by default, not the synthetic stream
    args.pretrain = args.pretrain or ("corpus" if real_root else "synthetic")
    unl = None if args.pretrained or args.pretrain == "none" else unlabelled_source(args, data)
    hint = "" if synthetic or args.pretrain != "synthetic" else " (--data-root DIR or --pretrain FILE.tsv: your own audio)"
    if common.is_main():
        print(f"pre-training data: {unl.what if unl else 'none (' + (args.pretrained or '--pretrain none') + ')'}{hint}",
              flush=True)
    if args.pretrained:
        load_encoder(Path(args.pretrained), args)
    with torch.device("meta"):
        args.params = count_params(PretrainModel(**model_config(args)))
    paper = f" (paper {PAPER_PARAMS[args.size] / 1e6:.1f} M)" if args.size in PAPER_PARAMS else ""
    print(f"encoder {args.size}: {args.blocks} blocks x {args.dim}-d, {args.heads} heads: {args.params:,} "
          f"parameters{paper}")
    return args, data, unl


def fig2a_pools(args, corpus: common.Corpus) -> list[dict]:
    """Fig. 2a: pools of 0.25x / 1x / 4x / 16x the labelled set. A pool at least as large as the clips
    pre-training draws is never cycled: it is the unbounded stream (reused, stated in the table)."""
    drawn = min(args.pt_steps, args.max_steps or args.pt_steps) * args.pt_batch_size * common.world_size()
    pools = [(m, int(round(m * len(corpus.train)))) for m in args.pools]
    return [{"init": f"pool{m:g}x".replace(".", "_"), "mult": m, "clips": n, "passes": drawn / n,
             "effective": n if n < drawn else None, "drawn": drawn} for m, n in pools]  # init: a results.json key


def pretrain_stage(args, data, unl: Unlabelled | None, device) -> dict:
    """Stage 1 (Sec. 2): the encoders to fine-tune, {init: pretrain.pt, or None for scratch}: one
    pre-trained on `unl` (or --pool-size clips of it), or one per Fig. 2a pool."""
    encoders = {"scratch": None}
    if args.pretrained:
        encoders["pretrained"] = Path(args.pretrained)
    elif args.fig:
        encoders |= {p["init"]: pretrain(args, p["effective"], device, unl) for p in fig2a_pools(args, data)}
    elif unl is not None:
        encoders["pretrained"] = pretrain(args, args.pool_size, device, unl)
    return encoders


def finetune_stage(args, sets: list[FTData], encoders: dict, device) -> dict:
    """Stage 2 (Sec. 4): every labelled set x encoder x seed, the same budget for all:
    {(set name, init): [result per seed]}."""
    weights = {p: load_encoder(p, args) for p in encoders.values() if p is not None}  # read once, by every rank
    return {(d.name, init): [finetune(args, d, enc, weights.get(enc), s, device) for s in seeds_for(args, d)]
            for d in sets for init, enc in encoders.items()}


def pretrain_summary(path: Path) -> dict:
    ck = common.load_checkpoint(path)
    curve = ck["curve"]
    return {"path": str(path), "data": ck.get("data"), "params": ck["params"], "steps": curve[-1]["step"],
            "first": curve[0], "last": curve[-1], "masked_share": float(np.mean([r["masked"] for r in curve])),
            "plateau": pretrain_plateau(curve), "seconds": ck["seconds"], "skipped": ck["skipped"]}


def results_table(args, data, sets: list[FTData], encoders: dict, cells: dict, t0: float) -> tuple[dict, str]:
    """results.json (one row per labelled set: every init's score per seed and their mean) and the
    paper-style table of the experiment (Table 1, Fig. 2a or a Table 3 row)."""
    rows = []
    for d in sets:
        first = cells[d.name, "scratch"][0]
        scores = {init: [r["score"] for r in cells[d.name, init]] for init in encoders}
        rows.append({"set": d.name, "fraction": d.fraction, "clips": len(d.train_rows), "n_test": first["n_test"],
                     "skipped_test": first["skipped_test"], "scores": scores, "balance": d.balance,
                     "plateau": {init: [(r.get("plateau") or {}).get("plateau") for r in cells[d.name, init]]
                                 for init in encoders},
                     "skipped_train": sum(r["skipped_train"] for init in encoders for r in cells[d.name, init]),
                     "mean": {init: float(np.mean(v)) for init, v in scores.items()}})
    kind = "task" if args.task else "fig2a" if args.fig else "table1"
    res = {"experiment": kind, "size": args.size, "params": args.params, "rows": rows,
           "pretrain": {init: pretrain_summary(p) for init, p in encoders.items() if p is not None}}
    if kind == "fig2a":
        res["pools"] = fig2a_pools(args, data)
    if kind == "task":
        res |= {"task": data.name, "metric": data.metric}
    md = {"table1": table1_markdown, "fig2a": fig2a_markdown, "task": task_markdown}[kind](res, args, data)
    if kind in ("table1", "fig2a") and common.is_main():
        plot_run(res, Path(args.out))
    skipped = sum(r["skipped_test"] + r["skipped_train"] for r in rows) + sum(
        s["skipped"] for s in res["pretrain"].values())
    md += f"\n\nunreadable clips skipped: {skipped} (counted in results.json)" if skipped else ""
    flat = [p for r in rows for v in r["plateau"].values() for p in v]
    md += (f"\n\nfine-tuning cells whose train loss reached a plateau (last quarter of the logged means within "
           f"0.005 of the best before it; no validation split): {sum(p is True for p in flat)} of {len(flat)}")
    return res | {"minutes": round((time.time() - t0) / 60, 2)}, md


def cell(v: list[float]) -> str:
    return "-" if not v else f"{v[0]:.3f} (n=1)" if len(v) == 1 else f"{common.mean_std(v, digits=3)} (n={len(v)})"


def gain(scratch: list[float], pretrained: list[float]) -> str:
    """Pre-trained minus scratch: with the same >= 2 seeds in both, mean +- sample std of the per-seed differences
    (both inits fine-tune on the same labelled clips, and seed s is the same fine-tuning seed in both: paired),
    else the difference of the means."""
    if not pretrained:
        return "-"
    if len(pretrained) == len(scratch):
        return common.paired_difference(pretrained, scratch, digits=3)
    return f"{np.mean(pretrained) - np.mean(scratch):+.3f}"


def table1_markdown(res: dict, args, corpus) -> str:
    rows = []
    for r in res["rows"]:
        sc, pr = r["scores"]["scratch"], r["scores"].get("pretrained", [])
        paper = PAPER_TABLE1.get(r["fraction"], (None, None))
        rows.append([f"{100 * r['fraction']:g} %", r["clips"], cell(sc), cell(pr),
                     gain(sc, pr), *(f"{v:.3f}" if v else "-" for v in paper)])
    title = (f"## Label efficiency (Table 1): {args.size} encoder, fine-tuned on "
             f"{'the synthetic corpus' if corpus.synthetic else corpus.root} ({args.data}), test mAP on "
             f"{res['rows'][0]['n_test']} clips" + (", frozen encoder" if args.freeze else ""))
    table = common.markdown_table(["labelled", "clips", "scratch", "pre-trained", "gain", "paper scratch",
                                   "paper pre-trained"], rows)
    return "\n\n".join([title, table, pretrain_markdown(res["pretrain"].get("pretrained"), args),
                        f"fine-tuning: {args.ft_steps} updates of {args.batch_size} clips for every row and init "
                        f"(tri-stage LR, peak {args.ft_lr:g}), seeds {args.seeds}"])


def pretrain_markdown(s: dict | None, args) -> str:
    if not s:
        return "no pre-training (--pretrain none)"
    first, last = s["first"], s["last"]
    expected = 1 - (1 - args.mask_prob / args.mask_length) ** args.mask_length
    pa = s["plateau"]["train/acc"]
    conv = "reached a plateau" if pa["plateau"] else "did NOT reach a plateau"
    return (f"pre-training on {s['data'] or 'the synthetic stream'}: {s['params']:,} parameters, {s['steps']} updates "
            f"in {s['seconds'] / 60:.1f} min; contrastive loss {first['train/loss']:.3f} -> {last['train/loss']:.3f}, "
            f"accuracy of the positive {first['train/acc']:.3f} -> {last['train/acc']:.3f} ({conv}: best "
            f"{pa['best']:.3f}, last {pa['last']:.3f}, tolerance {pa['tolerance']:g} over the last quarter of "
            f"{pa['validations']} logged means; K = {args.num_negatives}, temperature {args.temperature:g}); "
            f"masked share {s['masked_share']:.3f} (1-(1-p/L)^L = {expected:.3f}; the paper's \"30 %\", deviation 7)")


def fig2a_markdown(res: dict, args, corpus) -> str:
    low, full = res["rows"][0], res["rows"][-1]
    header = ["pool", "clips", "passes", "final pt loss / acc", f"mAP at {100 * low['fraction']:g} %", "mAP at 100 %"]
    rows = [["none (scratch)", "-", "-", "-", cell(low["scores"]["scratch"]), cell(full["scores"]["scratch"])]]
    for p in res["pools"]:
        last = res["pretrain"][p["init"]]["last"]
        rows.append([f"{p['mult']:g}x", p["clips"], f"{p['passes']:.1f}" + ("" if p["effective"] else " (= stream)"),
                     f"{last['train/loss']:.3f} / {last['train/acc']:.3f}", cell(low["scores"][p["init"]]),
                     cell(full["scores"][p["init"]])])
    return "\n\n".join([f"## Pre-training pool size (Fig. 2a): {args.size} encoder, {res['pools'][0]['drawn']} clips "
                        f"drawn in pre-training, labelled set {len(corpus.train)} clips",
                        common.markdown_table(header, rows)])


def task_markdown(res: dict, args, task) -> str:
    paper = PAPER_TABLE3.get(task.name, (task.metric, None, None))
    inits = [[r["scores"][i][0] for r in res["rows"]] if i in res["rows"][0]["scores"] else []
             for i in ("scratch", "pretrained")]
    row = [task.name, task.metric, len(res["rows"]), *(cell(v) for v in inits),
           *(f"{v}" if v else "-" for v in paper[1:])]
    return "\n\n".join([f"## Downstream task {task.name} (Table 3 style), {args.size} encoder, mean over splits",
                        common.markdown_table(["task", "metric", "splits", "scratch", "pre-trained", "paper cf_S",
                                               "paper cf_L"], [row])])


# =============================================================================================
# Commands: plot (Table 1 / Fig. 2a figures), embed (a wav's embedding), predict (a wav's tags)
# =============================================================================================
def plot_parser() -> argparse.ArgumentParser:
    p = common.command_parser(
            "conformer_ssl.py plot",
            ("Draw the paper's figures from results.json: Table 1's label-efficiency curve (test mAP "
                    "against the labelled fraction, scratch and pre-trained, the paper's cf_L values on AudioSet "
                    "dashed beside ours) and, for a --fig 2a run, Fig. 2a (mAP against the pre-training pool "
                    "size, scratch as a line; the paper gives Fig. 2a as a drawing only, no values). RUN is a run "
                    "folder of this script or a folder written by `python common.py seeds` with keys "
                    "rows.<i>.mean.<init> or rows.<i>.scores.<init>.<j>; several RUNs (one per seed) are pooled: "
                    "mean +- sample std over the values."),
        epilog="example: python conformer_ssl.py plot runs/conformer_ssl/cpu_synth --out docs/figures/conformer_ssl.png")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders or seeds folders holding results.json")
    p.add_argument("--out", default=None, help="PNG to write (Fig. 2a: the same name with _fig2a); default: "
                   "table1.png / fig2a.png in the first RUN")
    return p


def plot_points(results: list[tuple[Path, dict]]) -> tuple[dict, dict]:
    """The values to draw, pooled over `results` ((folder, results.json) pairs): {(fraction, init): [values]}
    and {init: pool multiple} of the Fig. 2a pools. A run folder's results.json gives every seed's score of
    every row; a seeds folder's ({row: {key: [per-seed values], 'runs': [...]}}) gives each key's values, the
    row's fraction read from its first run's results.json (or the row name, '10%' or '0.1')."""
    cells, pools = {}, {}
    for folder, res in results:
        if isinstance(res.get("rows"), list) and res.get("experiment") in ("table1", "fig2a"):
            for r in res["rows"]:
                for init, v in r["scores"].items():
                    cells.setdefault((r["fraction"], init), []).extend(v)
            pools |= {p["init"]: p["mult"] for p in res.get("pools", [])}
            continue
        if res.get("experiment") == "task":
            raise common.DataError(f"{folder}: a downstream task run (Table 3 style); plot draws Table 1 and Fig. 2a")
        rows = {k: v for k, v in res.items() if isinstance(v, dict) and "runs" in v}
        if not rows:
            raise common.DataError(f"{folder}: results.json is neither a run of conformer_ssl.py (--table 1, --fig 2a, "
                                   f"the default run) nor a `common.py seeds` table")
        for name, row in rows.items():
            for key, values in row.items():
                m = re.fullmatch(r"rows\.(\d+)\.(?:mean\.(\w+)|scores\.(\w+)\.\d+)", key)
                if m is None:
                    continue
                run = seeds_run(folder, row["runs"])
                fraction = row_fraction(folder, name, run, int(m[1]))
                cells.setdefault((fraction, m[2] or m[3]), []).extend(values)
                pools |= {p["init"]: p["mult"] for p in (run or {}).get("pools", [])}
    if not cells:
        raise common.DataError(f"{results[0][0]}: no rows.<i>.mean.<init> keys to draw")
    return cells, pools


def seeds_run(folder: Path, runs: list) -> dict | None:
    """The results.json of a seeds row's first run (relative to the working folder or to the seeds folder), or None."""
    for path in ([Path(runs[0]) / "results.json", folder / runs[0] / "results.json"] if runs else []):
        if path.is_file():
            return common.read_json(path, "results.json")
    return None


def row_fraction(folder: Path, name: str, run: dict | None, i: int) -> float:
    if run is not None and i < len(run.get("rows", [])):
        return float(run["rows"][i]["fraction"])
    m = re.fullmatch(r"\s*([0-9.]+)\s*(%?)\s*", name)
    if m is None:
        raise common.DataError(f"{folder}: row {name!r}: its runs are not readable here and its name is not a "
                               f"fraction ('10%' or '0.1')")
    return float(m[1]) / (100 if m[2] else 1)


def mean_sd(v: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as common.mean_std prints them."""
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def draw_table1(ax, cells: dict) -> None:
    """Table 1: test mAP against the labelled fraction, ours solid (mean +- sample std), the paper's dashed."""
    for k, (init, color) in enumerate((("scratch", "C0"), ("pretrained", "C1"))):
        xs = sorted(f for f, i in cells if i == init)
        if xs:
            stats = [mean_sd(cells[f, init]) for f in xs]
            n = sorted({len(cells[f, init]) for f in xs})
            ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, color=color,
                        label=f"{init} (ours, n={'/'.join(map(str, n))})")
        paper = [(f, v[k]) for f, v in sorted(PAPER_TABLE1.items()) if v[k] is not None]
        ax.plot([f for f, _ in paper], [v for _, v in paper], ls="--", marker="s", mfc="none", color=color,
                label=f"{init} (paper, cf_L on AudioSet)")
    ax.set(xscale="log", xlabel="labelled fraction of the training set", ylabel="test mAP",
           title="Table 1: label efficiency, scratch vs pre-trained")
    ax.legend(fontsize=8)


def draw_fig2a(ax, cells: dict, pools: dict) -> None:
    """Fig. 2a: test mAP against the pre-training pool (multiples of the labelled set), one line per
    labelled fraction, scratch at that fraction as a dotted level."""
    for k, f in enumerate(sorted({f for f, _ in cells})):
        inits = sorted((m, i) for i, m in pools.items() if (f, i) in cells)
        if inits:
            stats = [mean_sd(cells[f, i]) for _, i in inits]
            ax.errorbar([m for m, _ in inits], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        capsize=3, color=f"C{k}", label=f"pre-trained, {100 * f:g} % labelled")
        if (f, "scratch") in cells:
            ax.axhline(mean_sd(cells[f, "scratch"])[0], ls=":", color=f"C{k}", label=f"scratch, {100 * f:g} % labelled")
    ax.set(xscale="log", xlabel="pre-training pool (multiples of the labelled set)", ylabel="test mAP",
           title="Fig. 2a: amount of pre-training data (paper: drawing only)")
    ax.legend(fontsize=8)


def plot_figures(cells: dict, pools: dict, table1: Path, fig2a: Path) -> list[Path]:
    """Table 1's curve when there is a scratch or pre-trained row without pools, Fig. 2a's when there are pools."""
    out = []
    if pools:
        out.append(common.figure(fig2a, lambda ax: draw_fig2a(ax, cells, pools)))
    if any(i == "pretrained" for _, i in cells) or not pools:
        out.append(common.figure(table1, lambda ax: draw_table1(ax, cells)))
    return out


def plot_run(res: dict, out: Path) -> None:
    """The figure of a finished experiment, in its run folder (skipped with a line without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib; then python conformer_ssl.py plot)")
        return
    plot_figures(*plot_points([(out, res)]), out / "table1.png", out / "fig2a.png")


def plot_main(argv: list[str]) -> list[Path]:
    """`python conformer_ssl.py plot RUN... [--out PNG]`."""
    a = plot_parser().parse_args(argv)
    folders = [Path(r) for r in a.runs]
    for f in folders:
        if not (f / "results.json").is_file():
            raise common.DataError(f"{f}: no results.json (not a finished run of conformer_ssl.py or a seeds folder)")
    results = [(f, common.read_json(f / "results.json", "results.json")) for f in folders]
    table1 = Path(a.out) if a.out else folders[0] / "table1.png"
    fig2a = table1.with_name(table1.stem + "_fig2a" + table1.suffix) if a.out else folders[0] / "fig2a.png"
    written = plot_figures(*plot_points(results), table1, fig2a)
    print(f"(peak memory {common.peak_memory_gb():.1f} GB)")
    return written


def audio_parser(command: str) -> argparse.ArgumentParser:
    """The parser of `embed` (mean-pooled encoder embeddings) or `predict` (tags of a fine-tuned model)."""
    if command == "embed":
        p = common.command_parser(
            "conformer_ssl.py embed",
            ("Write each audio file's embedding: the encoder's context vectors (the output of the "
                        "conformer blocks and final linear, no masking) averaged over time, as OUT/<stem>.npy "
                        "(float32, shape (d,)); OUT/results.md lists them. The encoder is a pre-trained one "
                        "(pretrain-<hash>/pretrain.pt) or that of a fine-tuned cell (finetune/.../final.pt)."),
            epilog="example: P=$(ls runs/conformer_ssl/pretrain-*/pretrain.pt | head -1); "
                   "python conformer_ssl.py embed --ckpt $P --out runs/conformer_ssl/embeddings data/synth/audio/eval/eval_00000.wav")
        p.add_argument("--ckpt", required=True, help="pretrain.pt of a pre-training stage or final.pt of a fine-tuning cell")
        p.add_argument("--out", required=True, help="folder for <stem>.npy (claimed like a run folder: a user's "
                       "files there are never overwritten)")
        p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                       help="--no-resume: remove the embeddings written there before (another --ckpt)")
    else:
        p = common.command_parser(
            "conformer_ssl.py predict",
            ("Tag audio files with a fine-tuned model (finetune/<set>_<init>_s<seed>-<hash>/final.pt): "
                        "the whole file in one pass (as the test clips of a task are scored), the --top classes "
                        "with their probabilities. A model fine-tuned on the synthetic corpus knows only its toy "
                        "classes: predict says so."),
            epilog="example: CK=$(ls runs/conformer_ssl/finetune/corpus_f1_pretrained_s0-*/final.pt); "
                   "python conformer_ssl.py predict --ckpt $CK data/synth/audio/eval/eval_00000.wav")
        p.add_argument("--ckpt", required=True, help="final.pt of a fine-tuning cell")
        p.add_argument("--top", type=common.POSITIVE_INT, default=5, help="classes shown per file")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav / flac / ogg; mono-mixed, resampled "
                   "to 16 kHz)")
    return p


def read_model(path: str, head: bool) -> tuple[dict, nn.Module]:
    """A checkpoint of this script as a model in eval mode: the Classifier of a fine-tuned cell (final.pt), or
    (head=False) the Encoder of a pretrain.pt or of a final.pt; anything else is one line."""
    ck = common.load_checkpoint(path, script="conformer_ssl")
    tuned = "model" in ck and "n_classes" in ck and "pooling" in ck and isinstance(ck.get("config"), dict)
    if head and not tuned:
        raise common.DataError(f"{path}: not a fine-tuned model of conformer_ssl.py (finetune/.../final.pt)"
                               + (" but a pre-trained encoder: embed reads it" if "encoder" in ck else ""))
    if not tuned and not ("encoder" in ck and isinstance(ck.get("config"), dict)):
        raise common.DataError(f"{path}: not a checkpoint of conformer_ssl.py (pretrain.pt or finetune/.../final.pt)")
    config = {"targets": "proj"} | ck["config"]
    try:
        model = Classifier(ck["n_classes"], ck["pooling"], 0.0, **config) if tuned else Encoder(**config)
    except (TypeError, KeyError, ValueError) as e:
        raise common.DataError(f"{path}: its encoder settings are not this script's ({e})") from None
    common.load_weights(model, ck["model"] if tuned else ck["encoder"], path)
    return ck, model.eval()


def class_names(ck: dict, path: str) -> tuple[list[str], list[str]]:
    """(label ids, display names) of a fine-tuned model: kept in final.pt, or (older checkpoints) read from the
    corpus / task it was trained on; 'class k' when neither is there."""
    n, labels, args = ck["n_classes"], ck.get("labels"), ck.get("args") or {}
    if labels is None:
        try:
            if args.get("task"):
                classes = common.read_task(args["task_root"], args["task"]).classes
                labels = {"mids": classes, "names": classes}
            elif args.get("data_root"):
                lab = common.read_class_labels(Path(args["data_root"]) / "class_labels_indices.csv")
                labels = {"mids": lab.mids, "names": lab.names}
        except (common.DataError, OSError, KeyError):
            labels = None
    if labels is None or len(labels["names"]) != n:
        print(f"{path}: no class names (its corpus is not readable here): classes are shown by index")
        return [f"class {k}" for k in range(n)], [f"class {k}" for k in range(n)]
    return list(labels["mids"]), list(labels["names"])


def read_wave(path: str, device) -> torch.Tensor:
    """(1, N) wave at 16 kHz; a file shorter than 1 s is zero-padded to 1 s (the encoder's 80 ms steps need some)."""
    x = common.load_audio(path)
    return torch.from_numpy(np.pad(x, (0, max(0, common.SR - len(x))))).unsqueeze(0).to(device)


@torch.no_grad()
def embed_main(argv: list[str]) -> dict:
    """`python conformer_ssl.py embed --ckpt CK --out DIR FILE...`: <stem>.npy = mean over time of the context."""
    a = audio_parser("embed").parse_args(argv)
    stems = [Path(f).stem for f in a.files]
    if len(set(stems)) < len(stems):
        raise common.DataError(f"two files named {next(s for s in stems if stems.count(s) > 1)}: their embeddings "
                               f"would overwrite each other; embed them into separate --out folders")
    device = common.pick_device(a.device)
    _, model = read_model(a.ckpt, head=False)
    encoder = (model.encoder if isinstance(model, Classifier) else model).to(device)
    ckpt = Path(a.ckpt).resolve()
    waves = [read_wave(f, device) for f in a.files]  # every file is readable before --out is claimed
    with common.claim_run(a.out, "conformer_ssl_embed", {"ckpt": [str(ckpt), ckpt.stat().st_size]}, a.resume,
                          ("*.npy",)):
        rows = []
        for f, stem, wave in zip(a.files, stems, waves):
            c = encoder(encoder.frontend(wave))[1]  # (1, T', d), no mask
            np.save(Path(a.out) / f"{stem}.npy", c[0].float().mean(0).cpu().numpy())
            rows.append([f, f"{stem}.npy", c.shape[1], c.shape[2]])
        md = "\n\n".join([f"## Embeddings of {len(rows)} files (mean over time of the context vectors of {a.ckpt})",
                          common.markdown_table(["file", "embedding", "steps (80 ms)", "dims"], rows)])
        return common.report(a.out, {"ckpt": str(a.ckpt), "files": {r[0]: r[1] for r in rows}, "dim": rows[0][3]}, md)


@torch.no_grad()
def predict_main(argv: list[str]) -> dict:
    """`python conformer_ssl.py predict --ckpt final.pt FILE...`: the top classes of each file."""
    a = audio_parser("predict").parse_args(argv)
    device = common.pick_device(a.device)
    ck, model = read_model(a.ckpt, head=True)
    model.to(device)
    mids, names = class_names(ck, a.ckpt)
    warning = common.synthetic_classes_warning(mids)
    if warning:
        print(warning)
    tags = {}
    for f in a.files:
        p = to_probs(model(read_wave(f, device)), ck["pooling"], ck.get("multi", True))[0].float().cpu().numpy()
        tags[f] = [(names[k], float(p[k])) for k in np.argsort(-p)[: a.top]]
        print(f"{f}: " + ", ".join(f"{n} {v:.2f}" for n, v in tags[f]))
    print(f"(peak memory {common.peak_memory_gb():.1f} GB)")
    return tags


# =============================================================================================
# main: pre-train -> fine-tune -> table; every stage is reused when its output exists
# =============================================================================================
COMMANDS = {"plot": plot_main, "embed": embed_main, "predict": predict_main}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    with common.distributed():
        args, data, unl = load_data(args)
        device, _ = common.setup_device(args)
        identity = common.identity(args, ignore=("log_every", "tag", "params")) | {"world": common.world_size()}
        with common.claim_run(args.out, "conformer_ssl", identity, args.resume, OUTPUTS):
            if args.resume and (Path(args.out) / "results.json").exists():  # a finished run with these settings
                return common.read_json(Path(args.out) / "results.json")
            t0, sets = time.time(), labelled_sets(args, data)
            encoders = pretrain_stage(args, data, unl, device)  # Sec. 2
            cells = finetune_stage(args, sets, encoders, device)  # Sec. 4
            return common.report(args.out, *results_table(args, data, sets, encoders, cells, t0))


if __name__ == "__main__":
    common.cli(main)
