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
    python conformer_ssl.py --size L --data-root data/audioset --data full --table 1   # the paper's setting

Deviations from the paper (numbered as in the README):
 1. The CPU preset (`--size cpu`, the synthetic default) is a 4-block, 64-d conformer with a short
    schedule (SYNTH_SCHEDULE); `--size S` / `--size L` are the paper's encoders and schedules. The
    README's direction run adds `--pt-steps 3000 --pt-lr 2e-3 --ft-steps 600` (3e-4 learned slower here).
 2. Targets are a linear projection of the unmasked latents, no quantizer, and the mask embedding is
    written into the 256-d latents before the input projection: the torchaudio prototype that cites
    the paper. Its parameter count (no final linear) matches the paper's 18.4 M / 88.1 M exactly;
    the paper's Fig. 1 draws a final linear layer, which `--final-proj` (default) keeps (+0.4 % / +0.7 %).
 3. Eq. 1 has no temperature; we divide the cosine by 0.1 as wav2vec 2.0 does (`--temperature 1`
    is the literal equation). fairseq's extra losses (feature penalty, dropout on targets) are omitted.
 4. Masks are not subsampled to the batch minimum (fairseq's require_same_masks): distractors are
    indexed per clip, so clips may keep different numbers of masked steps.
 5. Not given in the paper, our choices: pre-training batch size and crop, fine-tuning peak LR,
    steps and head dropout, the time-mask fill value (the clip's mean log-mel), softmax
    cross-entropy (with a categorical symmetric KL) for single-label tasks, the final model is
    evaluated (no checkpoint selection on validation: the paper sweeps hyperparameters on it).
 6. On real AudioSet "1 %" is the balanced set (as in the paper); elsewhere every fraction is a
    nested, stratified subset of the training set.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
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

# Paper numbers (Table 1, mAP on AudioSet eval, cf_L): fraction -> (scratch, pre-trained)
PAPER_TABLE1 = {0.01: (0.138, 0.276), 0.03: (None, 0.305), 0.1: (None, 0.337), 0.3: (None, 0.356), 1.0: (0.366, 0.415)}
PAPER_PARAMS = {"S": 18.4e6, "L": 88.1e6}
# Encoder sizes (Sec. 2.2): blocks, model dim, heads, FFN dim; kernel 31 in block 1, 15 after
SIZES = {"S": dict(blocks=12, dim=256, heads=8, ffn=1024), "L": dict(blocks=12, dim=768, heads=12, ffn=1024),
         "cpu": dict(blocks=4, dim=64, heads=4, ffn=256)}  # deviation 1
# CPU schedule for the synthetic corpus (deviation 1, 5); the paper's values apply with --size S / L
SYNTH_SCHEDULE = {"pt_steps": 250, "pt_batch_size": 16, "ft_steps": 300, "batch_size": 8, "ft_lr": 1e-3}
FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)


# =============================================================================================
# Arguments: every default is the paper's value (section in the help)
# =============================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "conformer_ssl")
    p.set_defaults(data="full")
    g = p.add_argument_group("encoder (Sec. 2.2)")
    g.add_argument("--size", type=str, default=None, choices=list(SIZES),
                   help="S: 12 x 256-d, 8 heads (18.4 M); L: 12 x 768-d, 12 heads (88.1 M); cpu: 4 x 64-d "
                        "(deviation 1). Default: cpu on the synthetic corpus, L elsewhere (AudioSet, Sec. 3.1)")
    g.add_argument("--blocks", type=int, default=None, help="conformer blocks (Fig. 2b: 8-20); default from --size")
    g.add_argument("--heads", type=int, default=None, help="attention heads (Fig. 2c: 4-24); default from --size")
    g.add_argument("--kernels", type=int, nargs=2, default=[31, 15],
                   help="depthwise kernel of the first block, then of the others (Sec. 2.2)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in the conformer blocks (Sec. 2.2)")
    g.add_argument("--final-proj", action=argparse.BooleanOptionalAction, default=True,
                   help="linear layer after the blocks (Fig. 1); --no-final-proj = torchaudio prototype (deviation 2)")
    g = p.add_argument_group("pre-training (Sec. 2.2, 2.3)")
    g.add_argument("--pretrain", type=str, default="synthetic",
                   help="unlabelled data: 'synthetic' (the stream), a manifest .tsv (labels ignored), or 'none'")
    g.add_argument("--pool-size", type=float, default=None,
                   help="synthetic stream: a finite pool of N clips (Fig. 2a); default unbounded")
    g.add_argument("--pt-steps", type=int, default=None, help="pre-training updates (300k; synthetic: 250)")
    g.add_argument("--pt-warmup", type=float, default=10_000 / 300_000,
                   help="warm-up fraction of the updates (10k of 300k, Sec. 2.3)")
    g.add_argument("--pt-lr", type=float, default=3e-4, help="peak learning rate (Sec. 2.3)")
    g.add_argument("--pt-batch-size", type=int, default=None, help="clips per update (not given; synthetic: 16)")
    g.add_argument("--pt-seconds", type=float, default=10.0, help="clip length of pre-training examples (ours)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (Sec. 2.3)")
    g.add_argument("--mask-prob", type=float, default=0.3, help="mask probability p (Sec. 2.3; torchaudio)")
    g.add_argument("--mask-length", type=int, default=3, help="span length L (torchaudio prototype)")
    g.add_argument("--num-negatives", type=int, default=100, help="K distractors (Sec. 2.3)")
    g.add_argument("--temperature", type=float, default=0.1,
                   help="cosine / temperature; 1 = Eq. 1 literally (deviation 3; wav2vec 2.0: 0.1)")
    g.add_argument("--pretrained", type=str, default=None, help="use this pre-trained encoder (pretrain.pt)")
    g = p.add_argument_group("fine-tuning (Sec. 4)")
    g.add_argument("--init", type=str, default="pretrained", choices=["pretrained", "scratch"],
                   help="fine-tune the pre-trained encoder or a random one (Table 1)")
    g.add_argument("--fractions", type=float, nargs="+", default=None,
                   help="labelled fractions (Table 1: 0.01 0.03 0.1 0.3 1; default run: 0.1 1)")
    g.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=False,
                   help="frozen encoder + linear probe (the setting Sec. 4 argues against)")
    g.add_argument("--pooling", type=str, default="auto", choices=["auto", "linsoft", "mean"],
                   help="linsoft: frame sigmoid + linear-softmax pooling (AudioSet); mean: mean pool + linear "
                        "(other tasks, Sec. 4); auto picks by task")
    g.add_argument("--ft-steps", type=int, default=None, help="fine-tuning updates (not given; synthetic: 300)")
    g.add_argument("--ft-lr", type=float, default=None, help="peak fine-tuning LR (swept in Sec. 4.3; synthetic: 1e-3)")
    g.add_argument("--batch-size", type=int, default=None, help="fine-tuning batch: 640 full / 64 small tasks "
                   "(Sec. 4.3); synthetic: 8")
    g.add_argument("--phase-ratio", type=float, nargs=3, default=[0.3, 0.3, 0.4],
                   help="tri-stage LR: warm-up / hold / exponential decay (Sec. 4.3)")
    g.add_argument("--init-scale", type=float, default=0.01, help="tri-stage initial LR scale (fairseq)")
    g.add_argument("--final-scale", type=float, default=0.01, help="tri-stage final LR scale (fairseq)")
    g.add_argument("--jitter", type=int, default=200, help="temporal jitter +- samples (Sec. 4.1)")
    g.add_argument("--time-mask", type=float, default=0.2, help="one time mask up to this share of the clip "
                   "(2 s per 10 s, Sec. 4.1)")
    g.add_argument("--mixup-alpha", type=float, default=0.5, help="mix-up Beta(a, a) on log-mels (Sec. 4.1)")
    g.add_argument("--consistency", type=float, default=2.0, help="weight of the symmetric KL (Sec. 4.2)")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="class-balanced sampling (Sec. 4.1, full AudioSet); default on for the tagging corpus")
    g.add_argument("--head-dropout", type=float, default=None,
                   help="dropout on the encoder output (Sec. 4.3, small tasks); default 0 corpus / 0.1 tasks")
    g = p.add_argument_group("experiments")
    g.add_argument("--table", type=int, default=None, choices=[1], help="Table 1: fractions x {scratch, pre-trained}")
    g.add_argument("--fig", type=str, default=None, choices=["2a"], help="Fig. 2a: pre-training pool size")
    g.add_argument("--pools", type=float, nargs="+", default=[0.25, 1, 4, 16],
                   help="Fig. 2a pool sizes, multiples of the labelled set")
    g.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (one pre-trained encoder)")
    g.add_argument("--multi-seed-below", type=float, default=0.3,
                   help="use all --seeds for fractions below this, the first seed above (saves CPU)")
    g.add_argument("--task", type=str, default=None, help="a downstream task name from the task root (Table 3)")
    g.add_argument("--task-root", type=str, default=None, help="task root with tasks.json (default: synthetic)")
    g.add_argument("--folds", type=int, default=None, help="use only the first N splits of a k-fold task")
    g.add_argument("--log-every", type=int, default=25, help="log (and checkpoint) every N updates")
    return p.parse_args(argv)


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
    latents Z at 80 ms) -> [mask] -> context encoder (Linear(256, d) -> conformer blocks -> Linear).
    `forward` returns (Z, C) or, with a mask, (unmasked Z, C of the masked input)."""
    STACK, LATENT = 4, 256

    def __init__(self, blocks: int, dim: int, heads: int, ffn: int, kernels=(31, 15), dropout: float = 0.1,
                 final_proj: bool = True):
        super().__init__()
        self.frontend = common.LogMel.preset("conformer")  # 64 mels, 64 ms / 20 ms (Sec. 2.2); no parameters
        self.feature = nn.Linear(64 * self.STACK, self.LATENT)
        self.feature_norm = nn.LayerNorm(self.LATENT)
        self.mask_emb = nn.Parameter(torch.empty(self.LATENT).uniform_())  # learned, U[0, 1) init (fairseq)
        self.in_proj = nn.Linear(self.LATENT, dim)
        self.blocks = nn.ModuleList(ConformerBlock(dim, ffn, heads, kernels[0] if i == 0 else kernels[1], dropout)
                                    for i in range(blocks))
        self.out_proj = nn.Linear(dim, dim) if final_proj else nn.Identity()
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
    """Encoder + the target projection Linear(256, d) applied to the unmasked latents (deviation 2)."""

    def __init__(self, **cfg):
        super().__init__()
        self.encoder = Encoder(**cfg)
        self.target_proj = nn.Linear(Encoder.LATENT, cfg["dim"])

    def forward(self, wave: torch.Tensor, mask_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> context at masked steps (N, d), targets of all steps (B, T', d), mask (B, T')."""
        mel = self.encoder.frontend(wave)
        t = mel.shape[-1] // Encoder.STACK
        mask = mask_fn(wave.shape[0], t).to(wave.device)
        z, c = self.encoder(mel, mask)
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
        self.head = nn.Linear(cfg["dim"], n_classes)

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        return self.drop(self.encoder(mel)[1])  # (B, T', d)

    def forward_mel(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.embed(mel)
        if self.pooling == "linsoft":
            return linear_softmax_pool(torch.sigmoid(self.head(c).float()))  # (B, K) probabilities
        return self.head(c.mean(1))  # (B, K) logits

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.forward_mel(self.encoder.frontend(wave))


def model_config(args) -> dict:
    return dict(blocks=args.blocks, dim=args.dim, heads=args.heads, ffn=args.ffn, kernels=tuple(args.kernels),
                dropout=args.dropout, final_proj=args.final_proj)


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
    """Distractor indices (N, K) into the N masked steps listed clip by clip (counts[b] of clip b):
    uniform with replacement over the OTHER masked steps of the same clip, never the step itself
    (fairseq sample_negatives: draw from m - 1, shift those >= own index). Clips with < 2 masked
    steps get their own index (the caller drops them)."""
    counts = counts.long().cpu()
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
    averaged over the masked steps. c, y: (B, T', d) context / targets; mask (B, T'). Distractors
    equal to the positive get -inf (fairseq). Returns (loss, accuracy of picking the positive, N)."""
    counts = mask.sum(1)
    cm, ym = c[mask].float(), y[mask].float()  # (N, d), clip by clip
    neg = sample_negatives(counts, k, generator).to(c.device)
    keep = counts.repeat_interleave(counts).to(c.device) > 1
    cand = torch.cat([ym.unsqueeze(1), ym[neg]], 1)  # (N, 1 + K, d): positive first
    logits = F.cosine_similarity(cm.unsqueeze(1), cand, dim=-1) / temperature
    same = (cand[:, 1:] == ym.unsqueeze(1)).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    logits = logits[keep]
    zero = torch.zeros(len(logits), dtype=torch.long, device=c.device)
    loss = F.cross_entropy(logits, zero)
    acc = (logits.argmax(1) == 0).float().mean()
    return loss, acc, len(logits)


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
class FTData:
    """One fine-tuning problem: training rows/targets, test rows/targets, how to score them."""

    def __init__(self, name, root, train_rows, train_y, test_rows, test_y, multi, metric, segment, varlen, balance,
                 pooling):
        self.name, self.root = name, Path(root)
        self.train_rows, self.train_y, self.test_rows, self.test_y = train_rows, train_y, test_rows, test_y
        self.multi, self.metric, self.segment, self.varlen = multi, metric, segment, varlen
        self.balance, self.pooling = balance, pooling


def keyed(folder: Path, key: dict) -> Path:
    """A shared stage's folder: readable name + a hash of every setting that changes its result, so
    runs with equal settings reuse it (one pre-trained encoder for all seeds) and others never clash."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return folder.with_name(f"{folder.name}_{digest}")


def unlabelled_loader(args, pool: int | None):
    """Batches of pre-training waves: the synthetic stream (optionally a finite pool, Fig. 2a) or any
    manifest's clips with labels ignored, drawn at random with replacement."""
    bs = args.pt_batch_size
    if args.pretrain == "synthetic":
        ds = common.synthetic_stream(seed=args.seed, pool_size=pool, clip_seconds=args.pt_seconds)
        return torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=args.workers,
                                           persistent_workers=args.workers > 0)
    path = Path(args.pretrain)
    if not path.is_file():
        raise common.DataError(f"--pretrain {path}: no such manifest (or use 'synthetic')")
    rows = common.read_manifest(path)
    ds = common.ClipDataset(path.parent, rows, np.zeros((len(rows), 1), np.float32), args.pt_seconds)
    idx = np.random.default_rng(args.seed).integers(0, len(rows), args.pt_steps * bs).tolist()
    return common.make_loader(ds, bs, sampler=idx, workers=args.workers, seed=args.seed, drop_last=True)


def corpus_fraction_rows(args, corpus: common.Corpus, fraction: float) -> list:
    """Nested, stratified label fractions of the training set (fixed subsets, seed 0); on real
    AudioSet '1 %' is the balanced set, as in the paper (deviation 6)."""
    if not corpus.synthetic and args.data == "full" and fraction == 0.01:
        return common.load_corpus(args.data_root, "balanced").train
    idx = common.label_fractions(corpus.targets(corpus.train), sorted(set(FRACTIONS) | {fraction}), seed=0)[fraction]
    return [corpus.train[i] for i in idx]


def corpus_data(args, corpus: common.Corpus, fraction: float) -> FTData:
    rows = corpus_fraction_rows(args, corpus, fraction)
    test_y = corpus.true_targets(corpus.eval) if corpus.true else corpus.targets(corpus.eval)
    return FTData(f"corpus_f{fraction:g}", corpus.root, rows, corpus.targets(rows), corpus.eval, test_y, True, "mAP",
                  args.clip_seconds, False, args.balance is not False,
                  "linsoft" if args.pooling == "auto" else args.pooling)


def task_data(args, task, split) -> FTData:
    name, train, _valid, test = split
    return FTData(f"{task.name}_{name}", task.root, train, task.targets(train), test, task.targets(test),
                  task.type == "multi", task.metric, task.max_seconds, True, bool(args.balance),
                  "mean" if args.pooling == "auto" else args.pooling)


# =============================================================================================
# Training and evaluation
# =============================================================================================
def pretrain(args, folder: Path, pool: int | None, device) -> Path:
    """Stage 1 (Sec. 2): contrastive pre-training; resumable from last.pt; writes pretrain.pt with
    the encoder weights and the loss / accuracy curve."""
    key = {k: getattr(args, k) for k in ("size", "blocks", "dim", "heads", "ffn", "kernels", "dropout", "final_proj",
                                         "pretrain", "pt_steps", "pt_warmup", "pt_lr", "pt_batch_size", "pt_seconds",
                                         "weight_decay", "mask_prob", "mask_length", "num_negatives", "temperature",
                                         "seed", "max_steps")}
    key["pool"] = pool
    folder = keyed(folder, key)
    common.claim_stage(folder, key, args.resume, name="key.json")
    final = folder / "pretrain.pt"
    if final.exists():
        return final
    common.seed_everything(args.seed)
    model = PretrainModel(**model_config(args)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pt_lr, betas=(0.9, 0.98), eps=1e-6,
                            weight_decay=args.weight_decay)  # Sec. 2.3
    dtype = common.amp_dtype(device, args.amp)
    scaler = common.grad_scaler(device, dtype)
    state = {"step": 0, "curve": [], "seconds": 0.0}
    if (folder / "last.pt").exists():
        ck = common.load_checkpoint(folder / "last.pt", device)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        print(f"{folder.name}: resumed at step {state['step']}/{args.pt_steps}")
    total = args.pt_steps if args.max_steps is None else min(args.pt_steps, args.max_steps)
    print(f"pre-training: {count_params(model):,} parameters ({args.size}), {total} updates of "
          f"{args.pt_batch_size} x {args.pt_seconds:g} s, pool {pool or 'unbounded'}")
    rng = np.random.default_rng([args.seed, state["step"]])
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + state["step"])
    mask_fn = lambda b, t: torch.from_numpy(compute_mask_indices((b, t), args.mask_prob, args.mask_length, rng))
    logger, bar = common.RunLogger(folder), tqdm(total=total, initial=state["step"], desc="pretrain")
    run, t0 = {"loss": [], "acc": [], "masked": []}, time.time()
    model.train()
    while state["step"] < total:
        for wave in unlabelled_loader(args, pool):  # a resumed run restarts the stream (see README)
            if isinstance(wave, (tuple, list)):  # a manifest's (wave, target, index); None: all clips unreadable
                wave = wave[0]
            if wave is None:
                continue
            lr = pretrain_lr(state["step"], total, args.pt_warmup, args.pt_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            with common.autocast(device, dtype):
                c, y, mask = model(torch.as_tensor(wave).to(device), mask_fn)
            loss, acc, _ = contrastive_loss(c, y, mask, args.num_negatives, args.temperature, gen)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            run["loss"].append(loss.item()), run["acc"].append(acc.item()), run["masked"].append(mask.float().mean().item())
            state["step"] += 1
            bar.update(1)
            if state["step"] % args.log_every == 0 or state["step"] == total:
                state["seconds"] += time.time() - t0
                t0 = time.time()
                rec = {"step": state["step"], "train/loss": float(np.mean(run["loss"])),
                       "train/acc": float(np.mean(run["acc"])), "masked": float(np.mean(run["masked"])), "lr": lr}
                state["curve"].append(rec)
                logger.log({"stage": "pretrain", **rec})
                run = {"loss": [], "acc": [], "masked": []}
                common.save_checkpoint(folder / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                            "state": state})
            if state["step"] >= total:
                break
    bar.close()
    common.save_checkpoint(final, {"encoder": model.encoder.state_dict(), "config": model_config(args),
                                   "args": vars(args), "pool": pool, "curve": state["curve"],
                                   "seconds": state["seconds"], "params": count_params(model)})
    (folder / "last.pt").unlink(missing_ok=True)
    return final


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


@torch.no_grad()
def predict(model: Classifier, data: FTData, args, device) -> np.ndarray:
    """(N, K) clip probabilities of the test rows: whole clips batched, or one variable-length clip
    at a time (tasks); an unreadable clip scores NaN and is left out of the metric."""
    model.eval()
    y = data.test_y
    if data.varlen:
        ds, bs = common.VarLenDataset(data.root, data.test_rows, y), 1
    else:
        ds, bs = common.ClipDataset(data.root, data.test_rows, y, data.segment), args.batch_size
    out = np.full(y.shape, np.nan, np.float32)
    for batch in common.make_loader(ds, bs, workers=args.workers):
        if batch is not None:
            o = model(batch[0].to(device))
            out[batch[2].numpy()] = to_probs(o, data.pooling, data.multi).cpu().numpy()
    return out


def score(data: FTData, probs: np.ndarray) -> float:
    ok = ~np.isnan(probs).any(1)
    if data.metric == "mAP" and data.multi:
        return float(common.tagging_metrics(data.test_y[ok], probs[ok])["mAP"])
    return float(common.task_score(data.metric, data.test_y[ok], probs[ok]))


def finetune(args, data: FTData, pretrained: Path | None, folder: Path, seed: int, device) -> dict:
    """Stage 2 (Sec. 4): fine-tune every weight (or only the head with --freeze) from the pre-trained
    encoder or from scratch, the same budget for both; two augmented views per batch, BCE (or CE) on
    both plus the consistency term; tri-stage LR. Resumable; result.json holds the test score."""
    key = {"data": data.name, "rows": len(data.train_rows), "pretrained": str(pretrained), "seed": seed,
           **{k: getattr(args, k) for k in ("size", "blocks", "dim", "heads", "ffn", "kernels", "dropout",
                                            "final_proj", "ft_steps", "ft_lr", "batch_size", "phase_ratio",
                                            "init_scale", "final_scale", "jitter", "time_mask", "mixup_alpha",
                                            "consistency", "head_dropout", "freeze", "weight_decay", "max_steps")},
           "pooling": data.pooling, "balance": data.balance}
    folder = keyed(folder, key)
    common.claim_stage(folder, key, args.resume, name="key.json")
    if (folder / "result.json").exists():
        return json.loads((folder / "result.json").read_text())
    common.seed_everything(seed)
    K = data.train_y.shape[1]
    model = Classifier(K, data.pooling, args.head_dropout, **model_config(args)).to(device)
    if pretrained is not None:
        model.encoder.load_state_dict(common.load_checkpoint(pretrained)["encoder"])
    if args.freeze:
        model.encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.ft_lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=args.weight_decay)
    total = args.ft_steps if args.max_steps is None else min(args.ft_steps, args.max_steps)
    bs = args.batch_size
    if data.varlen:  # tasks: training segments of task.max_seconds, each inheriting its clip's labels
        ds = common.SegmentDataset(data.root, data.train_rows, data.train_y, data.segment,
                                   durations=common.clip_durations(data.root, data.train_rows))
    else:
        ds = common.ClipDataset(data.root, data.train_rows, data.train_y, data.segment)
    if data.balance:  # Sec. 4.1: classes seen at about equal frequency
        weights = common.generate_sampling_weights(ds.targets.numpy().astype(np.float64))  # float64: p sums to 1
        order = np.fromiter(common.WeightedSampler(weights, total * bs, seed=seed), np.int64)
    else:
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(len(ds)) for _ in range(-(-total * bs // len(ds)))])
    dtype = common.amp_dtype(device, args.amp)
    scaler = common.grad_scaler(device, dtype)
    state = {"step": 0, "curve": []}
    if (folder / "last.pt").exists():
        ck = common.load_checkpoint(folder / "last.pt", device)
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        print(f"{folder.name}: resumed at step {state['step']}/{total}")
    logger = common.RunLogger(folder)
    bar = tqdm(total=total, initial=state["step"], desc=folder.name, leave=False)
    running = []
    loader = common.make_loader(ds, bs, sampler=order[state["step"] * bs: total * bs].tolist(), workers=args.workers,
                                seed=seed + state["step"])
    for batch in loader:
        lr = tri_stage_lr(state["step"], total, args.ft_lr, args.phase_ratio, args.init_scale, args.final_scale)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        if args.freeze:
            model.encoder.eval()
        if batch is not None:
            wave, y = batch[0].to(device), batch[1].to(device)
            with common.autocast(device, dtype):  # two augmented views (Sec. 4.2)
                outs = [model.forward_mel(augment(model, wave, args)) for _ in range(2 if args.consistency > 0 else 1)]
            loss = sum(task_loss(o, y, data.pooling, data.multi) for o in outs) / len(outs)
            if len(outs) == 2:  # Sec. 4.2: 2 x symmetric KL between the two views' probabilities
                loss = loss + args.consistency * symmetric_kl(to_probs(outs[0], data.pooling, data.multi),
                                                              to_probs(outs[1], data.pooling, data.multi), data.multi)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running.append(loss.item())
        state["step"] += 1
        bar.update(1)
        if state["step"] % args.log_every == 0 or state["step"] == total:
            rec = {"step": state["step"], "train/loss": float(np.mean(running)) if running else float("nan"), "lr": lr}
            state["curve"].append(rec)
            logger.log({"stage": folder.name, **rec})
            running = []
            common.save_checkpoint(folder / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                        "state": state})
    bar.close()
    probs = predict(model, data, args, device)
    res = {"metric": data.metric, "score": score(data, probs), "steps": state["step"], "rows": len(data.train_rows),
           "init": "scratch" if pretrained is None else "pretrained", "seed": seed, "curve": state["curve"]}
    common.save_checkpoint(folder / "final.pt", {"model": model.state_dict(), "config": model_config(args),
                                                 "n_classes": K, "pooling": data.pooling, "multi": data.multi,
                                                 "args": vars(args), "result": res})
    (folder / "last.pt").unlink(missing_ok=True)
    common.write_json(folder / "result.json", res)
    logger.log({"stage": folder.name, "step": state["step"], f"test/{data.metric}": res["score"]})
    return res


def build_classifier(ckpt: dict) -> Classifier:
    """Rebuild a fine-tuned model from its checkpoint alone."""
    model = Classifier(ckpt["n_classes"], ckpt["pooling"], 0.0, **ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model


# =============================================================================================
# Paper experiments: label efficiency (Table 1), pool size (Fig. 2a), downstream tasks (Table 3)
# =============================================================================================
def resolve(args, synthetic: bool, clip_seconds: float = 10.0) -> argparse.Namespace:
    """Derived values, computed once after parsing (deviation 1 for the CPU preset)."""
    a = copy.copy(args)
    a.size = a.size or ("cpu" if synthetic else "L")
    cfg = SIZES[a.size]
    a.blocks, a.heads = a.blocks or cfg["blocks"], a.heads or cfg["heads"]
    a.dim, a.ffn = cfg["dim"], cfg["ffn"]
    cpu = a.size == "cpu"
    a.pt_steps = a.pt_steps or (SYNTH_SCHEDULE["pt_steps"] if cpu else 300_000)
    a.pt_batch_size = a.pt_batch_size or (SYNTH_SCHEDULE["pt_batch_size"] if cpu else 64)
    a.ft_steps = a.ft_steps or (SYNTH_SCHEDULE["ft_steps"] if cpu else 40_000)
    a.ft_lr = a.ft_lr or (SYNTH_SCHEDULE["ft_lr"] if cpu else 1e-4)
    a.batch_size = a.batch_size or (SYNTH_SCHEDULE["batch_size"] if cpu else 64 if a.task else 640)
    a.head_dropout = a.head_dropout if a.head_dropout is not None else (0.1 if a.task else 0.0)
    a.clip_seconds = clip_seconds
    a.seeds = a.seeds or [a.seed]
    corpus = "synth" if synthetic else Path(a.data_root or a.task_root).name
    a.tag = f"{a.size}_{corpus}" + ("" if (a.blocks, a.heads) == (cfg["blocks"], cfg["heads"])
                                    else f"_b{a.blocks}h{a.heads}") + ("" if a.final_proj else "_noproj")
    kind = f"_task_{a.task}" if a.task else "_table1" if a.table else "_fig2a" if a.fig else ""
    a.out = a.out or str(Path("runs/conformer_ssl") / (a.name or f"{a.tag}{kind}" + ("_frozen" if a.freeze else "")))
    return a


def encoder_for(args, pool: int | None, device) -> Path | None:
    """The pre-trained encoder (trained once, shared by every fine-tuning run and seed)."""
    if args.pretrained:
        return Path(args.pretrained)
    if args.pretrain == "none":
        return None
    data = "stream" if args.pretrain == "synthetic" else Path(args.pretrain).stem
    folder = Path(args.out).parent / f"pretrain_{args.tag}_{data}_{f'pool{pool}' if pool else 'all'}_s{args.seed}"
    return pretrain(args, folder, pool, device)


def finetune_many(args, data: FTData, pretrained: Path | None, seeds: list[int], device) -> list[float]:
    pool = re.search(r"_pool\d+", pretrained.parent.name) if pretrained is not None else None
    tag = "scratch" if pretrained is None else "pretrained" + (pool.group(0) if pool else "")
    root = Path(args.out).parent / f"finetune_{args.tag}"
    suffix = "_frozen" if args.freeze else ""
    return [finetune(args, data, pretrained, root / f"{tag}{suffix}_{data.name}_s{s}", s, device)["score"]
            for s in seeds]


def mean_sd(x: list[float]) -> str:
    if not x:
        return "-"
    return f"{np.mean(x):.3f} +- {np.std(x, ddof=1):.3f} (n={len(x)})" if len(x) > 1 else f"{x[0]:.3f} (n=1)"


def pretrain_summary(path: Path | None) -> dict:
    if path is None:
        return {}
    ck = common.load_checkpoint(path)
    curve = ck["curve"]
    return {"path": str(path), "params": ck["params"], "steps": curve[-1]["step"] if curve else 0,
            "first": curve[0] if curve else None, "last": curve[-1] if curve else None,
            "masked_share": float(np.mean([r["masked"] for r in curve])) if curve else None,
            "seconds": ck["seconds"], "curve": curve}


def pretrain_markdown(s: dict, args) -> str:
    if not s:
        return "no pre-training (--pretrain none)"
    first, last = s["first"], s["last"]
    expected = 1 - (1 - args.mask_prob / args.mask_length) ** args.mask_length
    return (f"pre-training: {s['params']:,} parameters, {s['steps']} updates in {s['seconds'] / 60:.1f} min; "
            f"contrastive loss {first['train/loss']:.3f} -> {last['train/loss']:.3f}, accuracy of the positive "
            f"{first['train/acc']:.3f} -> {last['train/acc']:.3f} (K = {args.num_negatives}, temperature "
            f"{args.temperature:g}); masked share {s['masked_share']:.3f} (1-(1-p/L)^L = {expected:.3f})")


def run_fractions(args, corpus: common.Corpus, fractions: list[float], device) -> dict:
    """Table 1: fine-tune from scratch and from the pre-trained encoder on nested label fractions, the
    same budget for both; all --seeds below --multi-seed-below, the first seed above. The table is
    rewritten after every fraction, so a stopped run leaves its finished rows."""
    pt = encoder_for(args, None, device)
    summary = pretrain_summary(pt)
    res = {"pretrain": {k: v for k, v in summary.items() if k != "curve"}, "fractions": {}}
    rows = []
    title = (f"## Label efficiency (Table 1): {args.size} encoder, fine-tuned on "
             f"{'the synthetic corpus' if corpus.synthetic else corpus.root} ({args.data}), test mAP"
             + (", frozen encoder" if args.freeze else ""))
    for f in fractions:
        data = corpus_data(args, corpus, f)
        seeds = args.seeds if f < args.multi_seed_below else args.seeds[:1]
        sc = finetune_many(args, data, None, seeds, device)
        pr = finetune_many(args, data, pt, seeds, device) if pt is not None else []
        paper = PAPER_TABLE1.get(f, (None, None))
        res["fractions"][str(f)] = {"clips": len(data.train_rows), "scratch": sc, "pretrained": pr, "paper": paper}
        rows.append([f"{100 * f:g} %", len(data.train_rows), mean_sd(sc), mean_sd(pr),
                     f"{np.mean(pr) - np.mean(sc):+.3f}" if pr else "-", *(f"{v:.3f}" if v else "-" for v in paper)])
        table = common.markdown_table(["labelled", "clips", "scratch", "pre-trained", "gain", "paper scratch",
                                       "paper pre-trained"], rows)
        md = "\n\n".join([title, table, pretrain_markdown(summary, args),
                          f"fine-tuning: {args.ft_steps} updates of {args.batch_size} clips for every row and init "
                          f"(tri-stage LR, peak {args.ft_lr:g}), seeds {args.seeds}"])
        common.write_results(args.out, res, md)
    plot_table1(res, Path(args.out) / "table1.png")
    return {"results": res, "markdown": md}


def plot_table1(res: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional dependency: no plot
    fr = [float(f) for f in res["fractions"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init in ("scratch", "pretrained"):
        m = [np.mean(v[init]) if v[init] else np.nan for v in res["fractions"].values()]
        s = [np.std(v[init]) if len(v[init]) > 1 else 0 for v in res["fractions"].values()]
        ax.errorbar(fr, m, yerr=s, marker="o", capsize=3, label=init)
    ax.set(xscale="log", xlabel="labelled fraction", ylabel="test mAP", title="Table 1: label efficiency")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_fig2a(args, corpus: common.Corpus, device) -> dict:
    """Fig. 2a: pre-training pools of 0.25x / 1x / 4x / 16x the labelled set, each fine-tuned at a low
    and at the full fraction. A pool larger than the clips the schedule draws is never cycled, so it
    is the unbounded stream (reused, stated in the table)."""
    low, full = (args.fractions or [0.1, 1.0])[0], 1.0
    n_lab = len(corpus.train)
    drawn = min(args.pt_steps, args.max_steps or args.pt_steps) * args.pt_batch_size
    rows, res = [], {"labelled": n_lab, "drawn": drawn, "pools": {}}
    scratch = {f: finetune_many(args, corpus_data(args, corpus, f), None, args.seeds if f < 1 else args.seeds[:1],
                                device) for f in (low, full)}
    rows.append(["none (scratch)", "-", "-", "-", mean_sd(scratch[low]), mean_sd(scratch[full])])
    res["scratch"] = scratch
    header = ["pool", "clips", "passes", "final pt loss / acc", f"mAP at {100 * low:g} %", "mAP at 100 %"]
    title = (f"## Pre-training pool size (Fig. 2a): {args.size} encoder, {drawn} clips drawn in pre-training, "
             f"labelled set {n_lab} clips")
    for mult in args.pools:
        pool = int(round(mult * n_lab))
        effective = pool if pool < drawn else None
        pt = encoder_for(args, effective, device)
        s = pretrain_summary(pt)
        sc = {f: finetune_many(args, corpus_data(args, corpus, f), pt, args.seeds if f < 1 else args.seeds[:1],
                               device) for f in (low, full)}
        res["pools"][str(mult)] = {"clips": pool, "effective": effective, "pretrain_last": s["last"], **sc}
        rows.append([f"{mult:g}x", pool, f"{drawn / pool:.1f}" + ("" if effective else " (= stream)"),
                     f"{s['last']['train/loss']:.3f} / {s['last']['train/acc']:.3f}", mean_sd(sc[low]),
                     mean_sd(sc[full])])
        md = "\n\n".join([title, common.markdown_table(header, rows)])
        common.write_results(args.out, res, md)
    return {"results": res, "markdown": md}


PAPER_TABLE3 = {"esc50": ("accuracy", 80.7, 88.0), "fsdkaggle2019_curated": ("lwlrap", 50.3, 61.1),
                "fsdkaggle2019_noisy": ("lwlrap", 33.2, 40.1)}


def run_task(args, device) -> dict:
    """Table 3 style: a downstream task through the task reader, mean pooling + linear, fine-tuned
    from scratch and from the pre-trained encoder on every split (k-fold: mean over folds)."""
    task = common.read_task(args.task_root, args.task)
    splits = common.task_splits(task)[: args.folds]
    pt = encoder_for(args, None, device)
    res = {"task": task.name, "metric": task.metric, "splits": [s[0] for s in splits]}
    for init, path in (("scratch", None), ("pretrained", pt)):
        if init == "pretrained" and pt is None:
            continue
        res[init] = [finetune_many(args, task_data(args, task, sp), path, args.seeds[:1], device)[0] for sp in splits]
    paper = PAPER_TABLE3.get(task.name, (task.metric, None, None))
    row = [task.name, task.metric, len(splits), mean_sd(res["scratch"]), mean_sd(res.get("pretrained", [])),
           *(f"{v}" if v else "-" for v in paper[1:])]
    md = "\n\n".join([f"## Downstream task {task.name} (Table 3 style), {args.size} encoder",
                      common.markdown_table(["task", "metric", "splits", "scratch", "pre-trained", "paper cf_S",
                                             "paper cf_L"], [row])])
    return {"results": res, "markdown": md}


# =============================================================================================
# main: pre-train -> fine-tune -> table, each run skipped when its output exists
# =============================================================================================
def run(args: argparse.Namespace) -> dict:
    device = common.pick_device(args.device)
    if args.task:
        args.task_root = str(args.task_root or common.ensure_synthetic_tasks())
        args = resolve(args, (Path(args.task_root) / "synth_tasks.json").exists())
        corpus = None
    else:
        corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
        clip = json.loads((corpus.root / "synth.json").read_text())["clip_seconds"] if corpus.synthetic else 10.0
        args = resolve(args, corpus.synthetic, clip)
    out = Path(args.out)
    skip = ("workers", "device", "amp", "resume", "out", "name", "log_every")
    common.claim_stage(out, {k: v for k, v in vars(args).items() if k not in skip}, args.resume, name="key.json")
    common.save_config(out, args)
    model = PretrainModel(**model_config(args))
    n = count_params(model)
    paper = f" (paper {PAPER_PARAMS[args.size] / 1e6:.1f} M)" if args.size in PAPER_PARAMS else ""
    print(f"encoder {args.size}: {args.blocks} blocks x {args.dim}-d, {args.heads} heads: {n:,} parameters{paper}")
    t0 = time.time()
    if args.task:
        r = run_task(args, device)
    elif args.fig:
        r = run_fig2a(args, corpus, device)
    else:
        r = run_fractions(args, corpus, args.fractions or (list(FRACTIONS) if args.table else [0.1, 1.0]), device)
    r["results"].update(params=n, size=args.size, minutes=round((time.time() - t0) / 60, 2))
    common.write_results(out, r["results"], r["markdown"])
    print(r["markdown"])
    return r["results"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    run(args)


if __name__ == "__main__":
    try:
        main()
    except common.DataError as e:
        sys.exit(f"error: {e}")
