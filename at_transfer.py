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

    python at_transfer.py                                   # upstream + synthetic suite, 3 modes (CPU: cpu preset)
    python at_transfer.py --task keywords --mode frozen     # one cell (a run folder collects cells)
    python at_transfer.py --data-root data/audioset --task-root data/tasks --upstream both   # AudioSet + converted
                                                            # public datasets (paper preset on a GPU)
    python at_transfer.py --task-root data/tasks --mode scratch   # the scratch column alone: no upstream
    torchrun --nproc_per_node=2 at_transfer.py --task keywords    # DDP: each rank trains on its shard of every epoch
    python at_transfer.py embed --ckpt runs/at_transfer/synth_tasks_cpu --out runs/at_transfer/emb --timestamps \
        data/synth_tasks_scale0.2_seed0/keywords/audio/keywords_00000.wav   # HEAR embeddings of wav files
    python at_transfer.py plot runs/at_transfer/synth_tasks_cpu   # the task x mode matrix as a PNG in the run

Sub-commands `embed` and `plot` have their own --help. The direction run (a converged upstream, 3 trials) and every
measurement are in docs/at_transfer.md.

The upstream is trained once in a stage folder beside the run, `upstream_<arch>-<hash of its settings>`,
or given (`--upstream-ckpt`: ours or a psl.py machine annotator); the frozen column's embeddings are a stage
too (`frozen_<arch>_<task>-<hash>`). Run the same command again after a kill: it continues exactly where it
stopped (`--no-resume`: the run's cells afresh). More `--trials`, tasks or modes extend a run folder; the
upstream is not part of a run's key (scratch cells read none), but every frozen / fine-tuned cell of an
architecture in one folder reads the same upstream (upstreams.json; another one is refused in one line).

Presets (`--preset auto`: paper on a CUDA GPU, cpu otherwise, whatever the corpus; printed at start with the
reason; a flag given on the command line wins). Validation of the upstream is per epoch (`--evals-per-epoch`), so
a command works unchanged on another corpus. Every training stage logs, in its last validation line and its
result, whether validation reached a plateau (common.plateau_report), the upstream first.
Per dataset (PAPER_RECIPE, Sec. 4.2.2, printed where it overrides tasks.json): FSD18 is trained with BCE, FSD19 /
Vox1 / FSC / VL on 4 s segments. A task is a "speech" row by tasks.json's "domain" (data/prepare.py writes it).

Deviations from the paper (numbered as in docs/at_transfer.md, which gives the measurements behind them):
 1. The upstream validates on the held-out valid.tsv; the paper on the balanced subset, which is inside the
    full training set (`--valid-on balanced`: balanced_train.tsv; also the choice without a valid.tsv).
 2. CPU preset (`--preset cpu`, the default without a CUDA GPU): upstream 3 epochs, 2 validations per epoch,
    lr 1e-3 (1e-4 barely moves in a few epochs); scratch / fine-tune <= 12 epochs, patience 4, lr 1e-3, batch
    16 (the tasks at scale 0.2 have 60-308 training clips); frozen <= 500 epochs, patience 50 (a linear head on
    cached embeddings); the first HEAR split of k-fold tasks; 1 trial (a pipeline check); deviations 6 and 7
    on. `--preset paper` gives every value of Sec. 4.2, with 6 and 7 off.
 3. Not given in the paper, our choices: 2 SpecAugment masks per axis (widths 96 / 12 are the paper's); a
    plain Linear head; single-label scores are the softmax of the mean frame logits; a task without a
    Table 3 row gets the pattern of the paper's rows of its domain (tasks.json "domain") in the paper column.
 4. Evaluation stacks equal-length clips without padding (batch size 1 in the paper: identical in eval
    mode). Frozen training averages only the real frames of a clip's shorter last segment.
 5. k-fold tasks use the HEAR rotation (test fold i, validation fold i+1); `--protocol paper` selects
    checkpoints on the test fold as the paper's text says.
 6. CPU preset: BatchNorm statistics are re-estimated on 4 clean training batches before every validation and
    after the top-4 averaging (`--bn-batches 0`, the paper and its preset: off): at lr 1e-3 the running averages
    lag the weights, and an average's statistics fit none of its members (upstream valid mAP 0.18 after one
    epoch; 0.25 re-estimated).
 7. CPU preset: the frozen head reads the embeddings standardised per dimension with the training frames' mean /
    std, as HEAR's and BYOL-A's linear evaluations do (`--no-frozen-standardize`, the paper and its preset: raw):
    our upstream's raw embeddings are dominated by one direction, and a linear head on them plateaued at loss 1.1
    on 60 clips.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
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
SPEECH = {"Vox1", "VL", "FSC", "SPCV1", "SPCV2"}  # bottom half of Table 3 (tasks.json without a "domain")
# Sec. 4.2.2 per dataset, where it differs from what the converters write: BCE for FSD18 (single-label data, but
# "replaced by BCE for multi-label datasets (FSD50k, FSD18, FSD19)"); 4 s training segments for FSD19 ("4 seconds
# for the Vox1, FSD19, FSC, and VL datasets"; 10 s for FSD18 and FSD50k, as converted)
PAPER_RECIPE = {"FSD18": {"loss": "bce"}, "FSD19-C": {"max_seconds": 4.0}, "FSD19-N": {"max_seconds": 4.0},
                "Vox1": {"max_seconds": 4.0}, "FSC": {"max_seconds": 4.0}, "VL": {"max_seconds": 4.0}}
MODES = ("scratch", "frozen", "finetune")
# the paper column of a task without a Table 3 row: the pattern of Table 3's rows of its domain (speech or not)
PAPER_PATTERN = {False: "sound rows: frozen > scratch, finetune > scratch",
                 True: "speech rows: frozen << scratch, finetune >= scratch"}
# deviation 2: the CPU preset; `--preset paper` = Sec. 4.2.1 / 4.2.2 (the BatchNorm re-estimation and the frozen
# standardisation of deviations 6 / 7 are CPU-preset measures: off in the paper preset)
PRESETS = {"cpu": dict(up_epochs=3, evals_per_epoch=2, up_lr=1e-3, epochs=12, patience=4, lr=1e-3, batch_size=16,
                       frozen_epochs=500, frozen_patience=50, trials=1, folds=1, task_scale=0.2, bn_batches=4,
                       frozen_standardize=True),
           "paper": dict(up_epochs=100, evals_per_epoch=6, up_lr=1e-4, epochs=150, patience=15, lr=1e-4,
                         batch_size=64, frozen_epochs=150, frozen_patience=15, trials=4, folds=None, task_scale=1.0,
                         bn_batches=0, frozen_standardize=False)}
# what the script writes in its run folder (claim_run: --no-resume removes these, and nothing else)
OUTPUTS = ("*.tmp", "upstreams.json", "*/*/*/trial*/result.json", "*/*/*/trial*/topk.json", "*/*/*/trial*/*.pt",
           "*/*/*/trial*/*.tmp")
# not part of a run's identity: which cells to run (a run folder collects cells; more --trials extend it)
NOT_IDENTITY = ("task", "mode", "suite", "upstream", "arches", "trials", "upstream_ckpt", "given_arch")
# the upstream's own settings: part of its stage key (upstream_source), not of the run's (one task matrix is one run
# folder, whatever upstream it used; the cells that read an upstream record which one in upstreams.json)
UPSTREAM_ONLY = ("data_root", "data", "synth_scale", "synth_clip_seconds", "up_epochs", "up_lr", "up_batch_size",
                 "evals_per_epoch", "up_patience", "valid_on", "mixup_alpha", "mixup_domain", "time_mask", "freq_mask",
                 "n_masks", "gain_db", "max_shift", "aug_p")


# =============================================================================================
# Arguments: every default is the paper's value (section in the help); None = from --preset
# =============================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at_transfer.py", description=__doc__, formatter_class=common.HelpFormatter)
    common.add_common_args(p, "at_transfer")
    p.set_defaults(data="full")  # upstream on balanced + unbalanced (Sec. 4.2.1)
    pos_int, nonneg_int, pos, prob = common.POSITIVE_INT, common.NONNEG_INT, common.POSITIVE, common.FRACTION
    p.add_argument("--preset", type=str, default="auto", choices=["auto", "cpu", "paper"],
                   help="schedule: paper = Sec. 4.2; cpu = deviation 2; auto = paper on a CUDA GPU, cpu otherwise "
                        "(whatever the corpus). Explicit flags override the preset")
    g = p.add_argument_group("upstream audio tagging (Sec. 3, 4.2.1)")
    g.add_argument("--upstream", type=str, default="mbv2", choices=["mbv2", "effb0", "both"],
                   help="MobileNetV2 (3.0 M) or EfficientNet-B0 (4.6 M) (Table 2)")
    g.add_argument("--upstream-ckpt", type=str, default=None,
                   help="use this checkpoint (ours or a psl.py machine annotator) instead of training one; "
                        "the run is keyed by the file's size and mtime")
    g.add_argument("--up-epochs", type=pos_int, default=None, help="at most N epochs (100; cpu: 3)")
    g.add_argument("--up-lr", type=pos, default=None, help="Adam learning rate (1e-4; cpu: 1e-3)")
    g.add_argument("--up-batch-size", type=pos_int, default=32, help="batch size (Sec. 4.2)")
    g.add_argument("--evals-per-epoch", type=pos_int, default=None, help="validations per epoch (~6; cpu: 2)")
    g.add_argument("--up-patience", type=pos_int, default=5, help="early stop after N validations without gain")
    g.add_argument("--valid-on", type=str, default="valid", choices=["valid", "balanced", "train"],
                   help="upstream validation split: valid.tsv (ours, deviation 1), or balanced_train.tsv, the paper's "
                        "'balanced subset' inside the training data ('train' is an older name of it); without a "
                        "valid.tsv: balanced_train.tsv")
    g.add_argument("--mixup-alpha", type=pos, default=1.0, help="mix-up lambda ~ Beta(a, a) (Sec. 4.2.1)")
    g.add_argument("--mixup-domain", type=str, default="spectral", choices=["spectral", "wave"],
                   help="mix the log-mels (the paper: 'in the spectral-domain, we use mixup') or the waveforms "
                        "(earlier versions of this script)")
    g.add_argument("--time-mask", type=nonneg_int, default=96, help="SpecAugment time mask, frames (Sec. 4.2.1)")
    g.add_argument("--freq-mask", type=nonneg_int, default=12, help="SpecAugment frequency mask, bins (Sec. 4.2.1)")
    g.add_argument("--n-masks", type=nonneg_int, default=2, help="SpecAugment masks per axis (not given; ours)")
    g.add_argument("--gain-db", type=common.number(float), nargs=2, default=[-18.0, 6.0], metavar=("LOW", "HIGH"),
                   help="Gain range in dB, torch-audiomentations' default (Sec. 4.2.1)")
    g.add_argument("--max-shift", type=prob, default=0.5,
                   help="Shift with roll-over up to this fraction of the clip, torch-audiomentations' default")
    g.add_argument("--aug-p", type=prob, default=0.5, help="probability of each wave augmentation (default 0.5)")
    g = p.add_argument_group("downstream transfer (Sec. 4.2.2, Table 3)")
    g.add_argument("--task-root", type=str, default=None,
                   help="folder with tasks.json (converted public datasets); default: the synthetic tasks")
    g.add_argument("--task-scale", type=pos, default=None, help="size of the synthetic tasks (1; cpu: 0.2)")
    g.add_argument("--task", type=str, nargs="+", default=None, help="tasks to run (default: all of the root)")
    g.add_argument("--mode", type=str, nargs="+", default=list(MODES), choices=MODES,
                   help="scratch / frozen (linear head on cached embeddings) / finetune (Table 3 columns)")
    g.add_argument("--suite", action="store_true",
                   help="every task x mode (the default when --task and --mode are not given)")
    g.add_argument("--epochs", type=pos_int, default=None, help="scratch/fine-tune: at most N epochs (150; cpu: 12)")
    g.add_argument("--patience", type=pos_int, default=None, help="early stop after N epochs without gain (15; cpu: 4)")
    g.add_argument("--frozen-epochs", type=pos_int, default=None, help="frozen head: at most N epochs (150; cpu: 500)")
    g.add_argument("--frozen-patience", type=pos_int, default=None,
                   help="frozen head: early stop after N epochs without gain (15; cpu: 50)")
    g.add_argument("--frozen-standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="frozen head on embeddings standardised per dimension with the training frames' statistics "
                        "(ours, as HEAR / BYOL-A linear evaluation; deviation 7; cpu: on); --no-frozen-standardize: "
                        "raw (the paper; paper preset)")
    g.add_argument("--lr", type=pos, default=None, help="Adam, no scheduler (1e-4; cpu: 1e-3)")
    g.add_argument("--batch-size", type=pos_int, default=None, help="training batch size (64, Sec. 4.2; cpu: 16)")
    g.add_argument("--top-k", type=pos_int, default=4, help="weight-average the k best checkpoints (Sec. 4.2.2)")
    g.add_argument("--bn-batches", type=nonneg_int, default=None,
                   help="re-estimate BatchNorm statistics on N training batches before each validation and after "
                        "the averaging (ours, deviation 6; cpu: 4; 0 = off, the paper and its preset)")
    g.add_argument("--trials", type=pos_int, default=None, help="repeated runs per cell, mean +- std (4; cpu: 1)")
    g.add_argument("--protocol", type=str, default="hear", choices=["hear", "paper"],
                   help="k-fold checkpoint selection: HEAR rotation or the test fold (paper; deviation 5)")
    g.add_argument("--folds", type=pos_int, default=None, help="run only the first N k-fold splits (all; cpu: 1)")
    g.add_argument("--valid-fraction", type=common.number(float, 0, 1, lo_open=True, hi_open=True), default=0.1,
                   help="held-out share of the development data when a task has no validation split (Sec. 4.2.2)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.gain_db[0] > a.gain_db[1]:
        p.error(f"argument --gain-db: LOW {a.gain_db[0]:g} is above HIGH {a.gain_db[1]:g}")
    return a


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Derived values, computed once after parsing: the preset fills every flag left at None; a given upstream
    checkpoint is read now (a foreign one is one line, before any work). Nothing is looked up elsewhere."""
    given_arch = read_upstream(a.upstream_ckpt)["arch"] if a.upstream_ckpt else None  # a bad file: one line, first
    a = common.apply_preset(copy.copy(a), PRESETS, "at_transfer")  # by the device, whatever the corpus
    a.valid_on = "balanced" if a.valid_on == "train" else a.valid_on
    if a.suite:
        a.task, a.mode = None, list(MODES)
    a.arches = ["mbv2", "effb0"] if a.upstream == "both" else [a.upstream]
    tasks = "synth_tasks" if a.task_root is None else Path(a.task_root).name
    a.out = a.out or str(Path("runs/at_transfer") / (a.name or f"{tasks}_{a.preset}"))
    a.given_arch = given_arch
    trained = [arch for arch in a.arches if arch != a.given_arch] if set(a.mode) - {"scratch"} else []
    if trained and common.is_main():  # say what the upstream learns from (a --task-root alone: the synthetic corpus)
        print(f"at_transfer: upstream {', '.join(trained)} trained here on "
              + (f"{a.data_root} ({a.data})" if a.data_root else "the synthetic corpus (no --data-root"
                 + (f"; for the tasks of {a.task_root} give --data-root DIR or --upstream-ckpt FILE)" if a.task_root
                    else ")")), flush=True)
    return a


def file_id(path: str | Path) -> list | None:
    """A file's identity for a key: its path, size and modification time (None when it is missing)."""
    path = Path(path)
    return [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else None


def upstream_source(args, arch: str) -> dict:
    """What an upstream is: the given checkpoint file, or every setting that changes a trained one (the key of
    its stage folder), with the identity of the corpus's metadata files (the synthetic one: its flags)."""
    if args.given_arch == arch:
        return {"ckpt": file_id(args.upstream_ckpt)}
    keys = (*UPSTREAM_ONLY, "seed", "amp", "max_steps", "top_k", "bn_batches")
    root = Path(args.data_root) if args.data_root else None
    meta = {p.name: file_id(p)[1:] for p in sorted(root.glob("*.[tc]sv"))} if root and root.is_dir() else {}
    return {k: getattr(args, k) for k in keys} | {"arch": arch, "metadata": meta}


def run_identity(args) -> dict:
    """A run folder's identity: every flag but which cells it runs and the upstream's own settings, and tasks.json.
    Which upstream the frozen / fine-tuned cells read is checked per architecture by claim_upstreams."""
    tasks = file_id(Path(args.task_root) / "tasks.json") if args.task_root else None
    return common.identity(args, NOT_IDENTITY + UPSTREAM_ONLY) | {"tasks_json": tasks}


def claim_upstreams(args) -> None:
    """<run>/upstreams.json: the key of the upstream that each architecture's frozen / fine-tuned cells read. A run
    folder holds one task matrix: scratch cells read no upstream (any command may add them); cells that read one
    are refused, in one line, when the folder's cells of that architecture read another."""
    path = Path(args.out) / "upstreams.json"
    if not set(args.mode) - {"scratch"}:
        return
    old = common.read_json(path, "upstream record") if path.exists() else {}
    new = {arch: common.settings_hash(upstream_source(args, arch)) for arch in args.arches}
    for arch, key in new.items():
        if old.get(arch, key) != key:
            raise common.DataError(f"{args.out}: its frozen / finetune cells of {arch} read another upstream (key "
                                   f"{old[arch]}, now {key}: --upstream-ckpt or an upstream flag differs); use another "
                                   f"--out, or --no-resume to start it afresh")
    if common.is_main() and new.items() - old.items():
        common.write_json(path, old | new)


# =============================================================================================
# Models (Sec. 3): log-mel -> CNN -> mean over frequency -> per-frame Linear + sigmoid -> mean over time.
# Duplicated from psl.py (MobileNetV2, same module names: a psl.py MA checkpoint loads as is) and psla.py
# (EfficientNet-B0 layout) on purpose: each script carries its own networks.
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


def read_upstream(path: str | Path) -> dict:
    """An upstream checkpoint, ours or a psl.py machine annotator (MobileNetV2, no 'arch' key); any other file
    (another script's checkpoint, not a checkpoint) is one line naming it."""
    try:
        ck = common.load_checkpoint(path)
    except common.DataError:
        raise
    except Exception:  # not a torch file
        ck = None
    arch = ck.get("arch", "mbv2") if isinstance(ck, dict) else None
    if arch not in ARCHS or not isinstance(ck.get("model"), dict) or "mids" not in (ck.get("labels") or {}) \
            or set(ck["model"]) != set(ARCHS[arch](1).state_dict()):
        raise common.DataError(f"{path}: not an upstream checkpoint (at_transfer.py's upstream final.pt or a "
                               f"psl.py machine annotator)")
    return ck | {"arch": arch}


def build_upstream(ckpt: dict) -> Tagger:
    """Rebuild an upstream from a self-describing checkpoint alone (ours, or psl.py's: no 'arch' = MBv2)."""
    model = ARCHS[ckpt.get("arch", "mbv2")](len(ckpt["labels"]["mids"]))
    model.load_state_dict(ckpt["model"])
    return model


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on the training device; channels-last for these CNNs on CUDA."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


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
    """Frozen mode: the head of a Downstream on cached backbone embeddings ((B, T', D) with a mask (B, T'), or
    (B, T', D) all real), optionally standardised per dimension with the training frames' mean / std (still a
    linear classifier of the embedding; deviation 7)."""

    def __init__(self, ds: Downstream, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.ds, self.mean, self.std = ds, mean, std

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        emb, mask = x if isinstance(x, tuple) else (x, None)
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
    if "task" in ck and ck.get("arch") in ARCHS and isinstance(ck.get("model"), dict):  # a downstream: its backbone
        model = ARCHS[ck["arch"]](1)
        model.classifier = nn.Identity()
        common.load_weights(model, {k[9:]: v for k, v in ck["model"].items() if k.startswith("backbone.")},
                            model_file_path)
    else:  # ours or a psl.py MA; anything else is one line
        ck = read_upstream(model_file_path)
        model = build_upstream(ck)
    model.label_ids = list((ck.get("labels") or {}).get("mids") or [])  # the upstream's classes (empty if unknown)
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
# Data: one epoch's batches (a function of (seed, epoch), this rank's shard) and exact per-clip inference
# =============================================================================================
def epoch_steps(n_items: int, batch_size: int) -> int:
    """Optimizer steps per epoch on each rank (its shard of n items)."""
    return math.ceil(len(common.shard(np.arange(n_items))) / batch_size)


def loader_batches(ds, order: np.ndarray, batch_size: int, skip: int, epoch: int, args, device):
    """This rank's batches of one epoch: `order` (the epoch's global item order, a function of (seed, epoch))
    sharded over the ranks, from batch `skip` on, read by --workers processes seeded from (seed, epoch); (x, y)
    on the device, or None for a batch whose clips are all unreadable (still a step: the position stays exact)."""
    idx = common.shard(order)[skip * batch_size:]
    seed = int(np.random.default_rng([args.seed, epoch]).integers(2**31))
    for batch in common.make_loader(ds, batch_size, sampler=idx, workers=args.workers, seed=seed):
        yield None if batch is None else common.to_device(batch[:2], device)


def clean_inputs(ds, args, batch_size: int, device):
    """BatchNorm re-estimation inputs (deviation 6): --bn-batches batches of training items in a fixed random
    order, no augmentation, read in this process."""
    idx = np.random.default_rng([args.seed, 99]).permutation(len(ds))[: args.bn_batches * batch_size]
    for j in range(0, len(idx), batch_size):
        batch = common.pad_collate([ds[i] for i in idx[j: j + batch_size]])
        if batch is not None:
            yield batch[0].to(device)


def clip_batches(dataset, chunk: int = 32):
    """Evaluation 'one clip at a time at its own length' (Sec. 4.2.2), made fast: clips of equal length are
    stacked without padding (identical results in eval mode; deviation 4). Read in this process: no loader
    workers are started for every evaluation. Yields (waves (b, N), indices); unreadable clips are left out."""
    for start in range(0, len(dataset), chunk):
        by_len: dict[int, list] = {}
        for item in (dataset[i] for i in range(start, min(start + chunk, len(dataset)))):
            if item is not None:
                by_len.setdefault(len(item[0]), []).append(item)
        for group in by_len.values():
            yield torch.stack([w for w, _, _ in group]), torch.as_tensor([i for _, _, i in group])


@torch.no_grad()
def predict(model: nn.Module, dataset, n_out: int, to_scores, args) -> np.ndarray:
    """(N, n_out) float32 clip scores, to_scores(model output), under autocast; NaN rows for unreadable clips."""
    model.eval()
    device = next(model.parameters()).device
    out = np.full((len(dataset), n_out), np.nan, np.float32)
    for wave, idx in clip_batches(dataset):
        with common.autocast(device, common.amp_dtype(device, args.amp)):
            scores = to_scores(model(wave.to(device)))
        out[idx.numpy()] = scores.float().cpu().numpy()
    return out


@torch.no_grad()
def extract_embeddings(backbone: Tagger, dataset, args, desc: str) -> list:
    """Frozen mode: per-item frame embeddings (T', D) in float16, computed once with the backbone in eval
    mode (there is no downstream augmentation, so caching is exact). None for unreadable items."""
    backbone.eval()
    device = next(backbone.parameters()).device
    out: list = [None] * len(dataset)
    bar = tqdm(total=len(dataset), desc=desc, leave=False)
    for wave, idx in clip_batches(dataset):
        with common.autocast(device, common.amp_dtype(device, args.amp)):
            emb = backbone.embed(wave.to(device))
        for e, i in zip(emb.half().cpu(), idx.tolist()):
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
# Training: one step and one visible loop for the upstream and every downstream mode
# =============================================================================================
def upstream_loss(model: nn.Module, wave: torch.Tensor, y: torch.Tensor, args) -> torch.Tensor:
    """Sec. 4.2.1: in the wave domain torch-audiomentations' defaults (Gain -18..+6 dB, PolarityInversion, Shift up
    to half the clip with roll-over, each with p 0.5); in the spectral domain mix-up Beta(1, 1) on every sample
    (of the log-mels (B, mel, T); --mixup-domain wave: of the waves) and SpecAugment; BCE on the clip
    probabilities against the mixed labels."""
    p = args.aug_p
    wave = common.wave_augment(wave, tuple(args.gain_db), p, int(args.max_shift * wave.shape[1]), gain_p=p, shift_p=p)
    mixed = {"y": y.float()}
    if args.mixup_domain == "wave":
        wave, mixed["y"] = common.mixup(wave, mixed["y"], args.mixup_alpha)

    def spectral(x):  # the log-mel (B, mel, T), inside the model's forward
        if args.mixup_domain == "spectral":
            x, mixed["y"] = common.mixup(x, mixed["y"], args.mixup_alpha)
        return common.mask_along(common.mask_along(x, args.freq_mask, 1, args.n_masks), args.time_mask, 2, args.n_masks)
    out = model(wave, spectral)[0]
    return clip_loss(out, mixed["y"], True)


def train_step(model: nn.Module, x, y: torch.Tensor, loss_fn, opt, scaler, dtype, losses: common.Mean) -> None:
    """One training step of every stage: forward and loss under autocast, (scaled) backward, Adam step; the loss
    is summed on the device (read at validation time: no host sync per step)."""
    with common.autocast(y.device, dtype):
        loss = loss_fn(model, x, y)
    common.optimizer_step(loss, opt, scaler)
    losses.add(loss)


def fit(net: nn.Module, trainable: nn.Module, batches, steps_per_epoch: int, loss_fn, validate, folder: Path,
        logger: common.RunLogger, stage: str, args, *, epochs: int, eval_every: int, patience: int, lr: float,
        higher: bool = True, calibrate=None) -> dict:
    """Adam on `trainable` (no scheduler, Sec. 4.2); `batches(epoch, skip)` yields this rank's (x, y) of an epoch
    from batch `skip` on. Every `eval_every` steps rank 0 validates (after `calibrate`: BatchNorm statistics) and
    saves the top-k and last.pt (weights, optimizer, every RNG state, step: a run killed anywhere continues
    exactly); early stop after `patience` validations without gain; the top-k checkpoints are weight-averaged
    into `trainable` (Sec. 4.2.1 / 4.2.2), and `calibrate` runs once more."""
    device = next(trainable.parameters()).device
    dtype = common.amp_dtype(device, args.amp)
    opt = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad], lr=lr)
    scaler = common.grad_scaler(device, dtype)
    total = epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, epochs * steps_per_epoch)
    topk = common.TopKCheckpoints(folder, args.top_k, "max" if higher else "min")
    state = common.load_state(folder / "last.pt", trainable, opt, scaler) or {"step": 0, "best": None, "bad_evals": 0,
                                                                               "curve": []}
    model, losses = common.compiled(common.wrap_ddp(net), args.compile), common.Mean(device)
    bar = tqdm(total=total, initial=state["step"], desc=stage, leave=False, disable=not common.is_main())
    while state["step"] < total and state["bad_evals"] < patience:
        epoch, skip = divmod(state["step"], steps_per_epoch)
        for batch in batches(epoch, skip):
            if batch is not None:
                model.train()
                train_step(model, *batch, loss_fn, opt, scaler, dtype, losses)
            state["step"] += 1
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == total:
                if calibrate and common.is_main():
                    calibrate(net)
                metric = common.from_rank0(validate(net) if common.is_main() else None)
                gain = state["best"] is None or (metric > state["best"] if higher else metric < state["best"])
                state.update(best=metric if gain else state["best"], bad_evals=0 if gain else state["bad_evals"] + 1,
                             curve=state["curve"] + [metric])
                last = state["step"] >= total or state["bad_evals"] >= patience  # the stage's last validation
                logger.log_once({"stage": stage, "step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 2),
                                 "train/loss": losses.read(), "val/metric": metric,
                                 **({"plateau": common.plateau_report(state["curve"], higher)} if last else {})},
                                ("stage", "step"))
                topk.update(metric, {"model": trainable.state_dict()}, state["step"])
                common.save_state(folder / "last.pt", trainable, opt, scaler, **state)
            if state["step"] >= total or state["bad_evals"] >= patience:
                break
    bar.close()
    common.barrier()  # rank 0's top-k checkpoints are complete before any rank averages them
    trainable.load_state_dict(common.average_state_dicts(topk.paths))  # top-k weight averaging
    if calibrate and common.is_main():
        calibrate(net)
    return {"best_val": state["best"], "steps": state["step"], "epochs": round(state["step"] / steps_per_epoch, 2),
            "averaged": [p.name for p in topk.paths], "plateau": common.plateau_report(state["curve"], higher)}


# =============================================================================================
# Paper procedures: the upstream (Sec. 4.2.1, Table 2); one downstream run in each mode and the cells (Sec.
# 4.2.2, Table 3). Shared stages live beside the run folder, in folders named by their settings' hash.
# =============================================================================================
def upstream(args, arch: str, device) -> dict:
    """The upstream of `arch`: the given --upstream-ckpt, or final.pt of its stage folder (keyed by every setting
    that changes it), trained here once and shared by every run with those settings. {'ckpt': path, results}."""
    if args.given_arch == arch:
        return {"ckpt": args.upstream_ckpt, "given": True}
    folder = common.stage_dir(Path(args.out).parent, f"upstream_{arch}", upstream_source(args, arch))
    with common.RunLock(folder, wait=True):
        if not common.from_rank0((folder / "final.pt").exists()):
            train_upstream(args, arch, folder, device)
    common.barrier()  # rank 0's final.pt and results are complete before any rank reads them
    return {"ckpt": str(folder / "final.pt"), **common.read_json(folder / "results.json", "upstream results")}


def train_upstream(args, arch: str, folder: Path, device) -> None:
    """Sec. 4.2.1: audio tagging on --data (full) with a label-balancing sampler, the wave augmentation, mix-up and
    SpecAugment of upstream_loss, Adam; validation every ~1/6 epoch, early stop 5, top-4 averaging; then mAP /
    mAUC / d' on eval (Table 2): results.json, then final.pt (which marks the stage done)."""
    common.seed_everything(args.seed)  # the stage's own seed: its result does not depend on what ran before
    corpus, ds, sampler, vrows = upstream_data(args)
    model = place(ARCHS[arch](len(corpus.labels)), device)
    if common.is_main():
        print(f"upstream {arch}: {count_parameters(model):,} parameters ({count_parameters(ARCHS[arch](527)) / 1e6:.2f} M "
              f"with 527 classes; paper {PAPER_UPSTREAM[arch][0]} M), {len(corpus.train)} clips of {args.data} in "
              f"{corpus.root}, validated on {len(vrows)} clips", flush=True)
    steps = epoch_steps(len(ds), args.up_batch_size)
    batches = lambda epoch, skip: loader_batches(ds, sampler.epoch_indices(epoch), args.up_batch_size, skip, epoch,
                                                 args, device)
    calibrate = (lambda m: common.recalibrate_bn(m, clean_inputs(ds, args, args.up_batch_size, device))) \
        if args.bn_batches else None
    y_valid = corpus.targets(vrows)
    info = fit(model, model, batches, steps, lambda m, x, y: upstream_loss(m, x, y, args),
               lambda m: tag_eval(m, corpus, vrows, y_valid, args)["mAP"], folder,
               common.RunLogger(folder), "upstream", args, epochs=args.up_epochs,
               eval_every=max(1, steps // args.evals_per_epoch), patience=args.up_patience, lr=args.up_lr,
               calibrate=calibrate)
    if common.is_main():
        truth = corpus.true_targets(corpus.eval) if corpus.true else corpus.targets(corpus.eval)
        res = {"arch": arch, "params": count_parameters(model), **tag_eval(model, corpus, corpus.eval, truth, args),
               "train": info}
        common.report(folder, res, upstream_markdown(res))
        common.save_checkpoint(folder / "final.pt", {"model": model.state_dict(), "arch": arch, "script": "at_transfer",
                                                     "args": vars(args), "info": info, "labels": {
                                                         "mids": corpus.labels.mids, "names": corpus.labels.names}})
        for f in [*folder.glob("*.pt"), folder / "topk.json"]:  # last and top-k: not needed once final.pt is in place
            if f.name != "final.pt":
                f.unlink(missing_ok=True)


def upstream_data(args) -> tuple:
    """The upstream's start-up (no audio is opened): the corpus, the training clips with their multi-hot targets
    (uint8: 1.1 GB for full AudioSet's 2.06 M clips x 527 classes, a quarter of float32), the label-balancing
    sampler ([31, 3]) and the validation rows: valid.tsv, or the paper's "balanced subset" (balanced_train.tsv, not
    the whole training set: 22 k clips of AudioSet's 2.06 M) with --valid-on balanced or without a valid.tsv."""
    corpus = common.load_corpus(args.data_root, args.data, args.synth_scale, args.synth_clip_seconds, args.seed)
    targets = corpus.targets(corpus.train, dtype=np.uint8)
    ds = common.ClipDataset(corpus.root, corpus.train, targets, corpus.clip_seconds or 10.0)
    sampler = common.PseudoBalancedSampler(targets, seed=args.seed)
    if args.valid_on == "valid" and corpus.valid is not None:
        return corpus, ds, sampler, corpus.valid
    if args.valid_on == "valid" and common.is_main():
        print(f"{corpus.root}: no valid.tsv: the upstream validates on balanced_train.tsv (the paper's 'balanced "
              f"subset')", flush=True)
    return corpus, ds, sampler, common.read_manifest(corpus.root / "balanced_train.tsv")


@torch.no_grad()
def tag_eval(model: Tagger, corpus: common.Corpus, rows: list, y_true: np.ndarray, args) -> dict:
    """Upstream mAP / mAUC / d' on whole clips; unreadable clips are excluded and counted (n, skipped)."""
    ds = common.ClipDataset(corpus.root, rows, y_true, corpus.clip_seconds or 10.0)
    return common.readable_scores(y_true, predict(model, ds, y_true.shape[1], lambda out: out[0], args))


def make_backbone(arch: str, ckpt: str | Path | None) -> Tagger:
    """scratch: a freshly initialised network (seeded); frozen / finetune: the upstream's weights."""
    return build_upstream(read_upstream(ckpt)) if ckpt else ARCHS[arch](1)


def frozen_cache(args, task, arch: str, ckpt: str, device) -> dict:
    """Frozen mode's shared stage: the backbone's (eval mode) embeddings of every training segment and every whole
    clip of a task, computed once and shared by all trials, splits and runs (the column is nearly free). Keyed by
    the upstream's identity, the task's entry and its audio files (names, sizes, mtimes), and --amp."""
    files = hashlib.sha1(json.dumps([file_id(task.root / r[0]) for r in task.rows]).encode()).hexdigest()
    folder = common.stage_dir(Path(args.out).parent, f"frozen_{arch}_{task.name}", {
        "upstream": upstream_source(args, arch), "task": task.info, "files": files, "amp": args.amp})
    path = folder / "embeddings.pt"
    with common.RunLock(folder, wait=True):
        if common.is_main() and not path.exists():
            durations = common.clip_durations(task.root, task.rows)
            segs = common.SegmentDataset(task.root, task.rows, np.zeros((len(task.rows), 1), np.float32),
                                         task.max_seconds, durations=durations)
            backbone = place(make_backbone(arch, ckpt), device)
            seg = extract_embeddings(backbone, segs, args, f"embed {task.name} segments")
            whole = np.bincount(segs.clip_index, minlength=len(task.rows)) == 1  # one chunk = the clip itself
            first = np.searchsorted(segs.clip_index, np.arange(len(task.rows)))
            rest = [i for i in range(len(task.rows)) if not whole[i]]
            clips = common.VarLenDataset(task.root, [task.rows[i] for i in rest], np.zeros((len(rest), 1), np.float32))
            extra = dict(zip(rest, extract_embeddings(backbone, clips, args, f"embed {task.name} clips") if rest else []))
            common.save_checkpoint(path, {"seg": seg, "seg_clip": segs.clip_index, "clip": [
                extra[i] if i in extra else seg[first[i]] for i in range(len(task.rows))]})
    common.barrier()  # rank 0's cache is complete before any rank reads it
    return torch.load(path, weights_only=False)


def run_split(args, task, mode: str, arch: str, ckpt: str | None, cache: dict | None, train_rows: list,
              valid_rows: list, test_rows: list, folder: Path, logger: common.RunLogger, device) -> tuple[dict, Downstream]:
    """Train one downstream model on one split and score the averaged model on its test clips (rank 0, shared)."""
    multi, K = bce(task), len(task.classes)
    model = place(Downstream(make_backbone(arch, ckpt if mode != "scratch" else None), K, multi), device)
    metric = lambda y, s: common.task_score(task.metric, y, s)
    if mode == "frozen":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        pos = {r[0]: i for i, r in enumerate(task.rows)}
        rows_of = lambda rows: np.array([pos[r[0]] for r in rows], np.int64)
        tr = rows_of(train_rows)
        seg_ids = np.array([s for s in np.flatnonzero(np.isin(cache["seg_clip"], tr)) if cache["seg"][s] is not None],
                           np.int64)  # every readable segment of the training clips
        frames = torch.cat([cache["seg"][s].float() for s in seg_ids]) if args.frozen_standardize else None
        net = FrozenHead(model, *((frames.mean(0).to(device), frames.std(0).clamp_min(1e-5).to(device))
                                  if frames is not None else ()))
        row_of = {c: j for j, c in enumerate(tr)}  # each segment inherits its clip's label
        y_seg = torch.as_tensor(task.targets(train_rows)[[row_of[c] for c in cache["seg_clip"][seg_ids]]])

        def batches(epoch, skip):
            idx = common.shard(np.random.default_rng([args.seed, epoch]).permutation(len(seg_ids)))
            for j in range(skip * args.batch_size, len(idx), args.batch_size):
                b = idx[j: j + args.batch_size]
                x = pad_embeddings([cache["seg"][s] for s in seg_ids[b]])
                yield common.to_device(x, device), y_seg[b].to(device, non_blocking=True)

        def predict_rows(m, rows):  # the cached whole-clip embeddings as the clips
            clips = [cache["clip"][i] for i in rows_of(rows)]
            return predict(m, [None if e is None else (e.float(), None, j) for j, e in enumerate(clips)], K,
                           lambda out: clip_scores(out, multi), args)

        trainable, steps, epochs, patience = model.head, epoch_steps(len(seg_ids), args.batch_size), \
            args.frozen_epochs, args.frozen_patience
    else:
        durations = common.clip_durations(task.root, train_rows)
        ds = common.SegmentDataset(task.root, train_rows, task.targets(train_rows), task.max_seconds,
                                   durations=durations)  # each segment inherits its clip's label
        batches = lambda epoch, skip: loader_batches(ds, np.random.default_rng([args.seed, epoch]).permutation(len(ds)),
                                                     args.batch_size, skip, epoch, args, device)
        predict_rows = lambda m, rows: predict(m, common.VarLenDataset(task.root, rows, task.targets(rows)), K,
                                               lambda out: clip_scores(out, multi), args)
        net, trainable, steps, epochs, patience = model, model, epoch_steps(len(ds), args.batch_size), args.epochs, \
            args.patience
    if steps == 0 or not len(valid_rows) or not len(test_rows):
        raise common.DataError(f"{task.name}: a split without training, validation or test clips ({folder.name})")
    calibrate = (lambda m: common.recalibrate_bn(m, clean_inputs(ds, args, args.batch_size, device))) \
        if mode != "frozen" and args.bn_batches else None
    y_valid = task.targets(valid_rows)
    info = fit(net, trainable, batches, steps, lambda m, x, y: clip_loss(m(x), y, multi),
               lambda m: common.readable_scores(y_valid, predict_rows(m, valid_rows), metric)["score"], folder, logger,
               str(folder.relative_to(args.out)), args, epochs=epochs, eval_every=steps, patience=patience, lr=args.lr,
               higher=task.higher_is_better, calibrate=calibrate)
    test = common.readable_scores(task.targets(test_rows), predict_rows(net, test_rows), metric) \
        if common.is_main() else None
    return common.from_rank0(test and {"test": test["score"], "n_train": len(train_rows), "n_valid": len(valid_rows),
                                       "n_test": test["n"], "test_skipped": test["skipped"], **info}), model


def run_cell(args, task, mode: str, arch: str, ckpt: str, logger: common.RunLogger, device) -> dict:
    """One Table-3 cell: --trials repeated runs, each the mean over the task's splits (k-fold: folds); a split
    whose result.json exists is not run again."""
    splits = common.task_splits(task, args.protocol, args.valid_fraction, args.seed)[: args.folds]
    cache = frozen_cache(args, task, arch, ckpt, device) if mode == "frozen" else None
    trials = []
    for trial in range(args.trials):
        a = copy.copy(args)
        a.seed = args.seed + 1000 * trial  # scratch init and batch order differ per trial
        trials.append([])
        for name, tr, va, te in splits:
            folder = Path(args.out) / arch / task.name / mode / f"trial{trial}_{name}"
            if common.from_rank0((folder / "result.json").exists()):
                trials[-1].append(common.read_json(folder / "result.json", "split result"))
                continue
            common.seed_everything(a.seed)  # the split's own seed, whatever ran before in this process
            trials[-1].append(run_split(a, task, mode, arch, ckpt, cache, tr, va, te, folder, logger, device)[0])
            if common.is_main():
                common.write_json(folder / "result.json", trials[-1][-1])
                for f in folder.glob("*.pt"):  # the top-k and last checkpoints are not needed once the split is scored
                    f.unlink()
    means = [float(np.mean([r["test"] for r in t])) for t in trials]
    runs = [r for t in trials for r in t]
    reached = sum(bool(r.get("plateau", {}).get("plateau")) for r in runs)
    if common.is_main():
        print(f"{arch} {task.name} {mode}: validation reached a plateau in {reached} of {len(runs)} runs", flush=True)
    return {"task": task.name, "domain": domain(task.name, task.info), "mode": mode, "arch": arch,
            "metric": task.metric, "loss": "bce" if bce(task) else "cross-entropy", "trials": means,
            "plateau": {"reached": reached, "runs": len(runs)},
            "mean": float(np.mean(means)), "std": float(np.std(means, ddof=1)) if len(means) > 1 else None,
            "splits": [s[0] for s in splits], "n_test": sum(r["n_test"] for r in trials[0]),
            "test_skipped": sum(r.get("test_skipped", 0) for r in trials[0])}


# =============================================================================================
# Report: Table 2 (each upstream) and the Table-3 matrix
# =============================================================================================
def paper_row(name: str) -> str | None:
    return ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def upstream_markdown(r: dict) -> str:
    p = PAPER_UPSTREAM[r["arch"]]
    return common.markdown_table(
        ["upstream", "params (M, 527 classes)", "mAP %", "mAUC %", "d' (from mean AUC)", "eval clips (skipped)",
         "paper params", "paper mAP", "paper mAUC", "paper d'"],
        [[r["arch"], f"{count_parameters(ARCHS[r['arch']](527)) / 1e6:.2f}", f"{100 * r['mAP']:.2f}",
          f"{100 * r['mAUC']:.2f}", f"{r['dprime']:.3f}", f"{r['n']} ({r['skipped']})", *map(str, p)]]) \
        + (f"\n\nUpstream training: {plateau_line(r['train']['plateau'])}" if "train" in r else "")


def at_markdown(results: dict, args) -> str:
    """Table 3 layout: one row per task, scratch / frozen / finetune per upstream, the paper's beside; then the
    upstreams trained here (Table 2)."""
    cells = {(c["arch"], c["task"], c["mode"]): c for c in results["cells"]}
    arches = sorted({k[0] for k in cells}, key=list(ARCHS).index)
    head, rows = ["task", "metric"], []
    for arch in arches:
        head += [f"{arch} {m}" for m in MODES] + [f"{arch} frozen-scratch", f"{arch} finetune-scratch",
                                                  f"paper {arch} (scratch / frozen / finetune)"]
    domains = {c["task"]: c.get("domain") or domain(c["task"], {}) for c in results["cells"]}
    for name, metric in dict.fromkeys((c["task"], c["metric"]) for c in results["cells"]):
        row = [name + (" (speech)" if domains[name] == "speech" else ""), metric]
        for arch in arches:
            c = {m: cells.get((arch, name, m)) for m in MODES}
            row += [common.mean_std(c[m]["trials"], 100, 2) if c[m] else "-" for m in MODES]
            for m in ("frozen", "finetune"):
                row.append(paired_difference(c[m], c["scratch"]) if c[m] and c["scratch"] else "-")
            p = PAPER_T3.get(paper_row(name) or "", {}).get(arch)
            row.append(" / ".join(map(str, p)) if p else PAPER_PATTERN[domains[name] == "speech"])
        rows.append(row)
    skipped = [f"{c['arch']} {c['task']} {c['mode']}: {c['test_skipped']}" for c in results["cells"] if c.get("test_skipped")]
    n = f"{args.trials} trial(s), mean +- std over trials (each the mean over {args.folds or 'all'} k-fold splits)"
    md = "\n".join([f"## Table 3 (Dinkel et al.): transfer to {args.task_root or 'the synthetic tasks'}", "",
                    f"Scores in %, {n}; preset {args.preset}, lr {args.lr:g}, scratch/finetune <= {args.epochs} "
                    f"epochs (patience {args.patience}), frozen <= {args.frozen_epochs} (patience "
                    f"{args.frozen_patience}); frozen-scratch and finetune-scratch: mean +- std of the per-trial differences "
                    f"(paired: trial k of every column has the same seed and splits). One trial is a pipeline check, "
                    f"not a result.", "",
                    common.markdown_table(head, rows)]
                   + ([f"\nUnreadable test clips, excluded (per trial): {'; '.join(skipped)}"] if skipped else []))
    open_runs = [f"{c['arch']} {c['task']} {c['mode']}: {c['plateau']['runs'] - c['plateau']['reached']} of "
                 f"{c['plateau']['runs']}" for c in results["cells"]
                 if isinstance(c.get("plateau"), dict) and c["plateau"]["reached"] < c["plateau"]["runs"]]
    if open_runs:
        md += "\n\nRuns whose validation had not reached a plateau when they stopped (not converged): " + \
              "; ".join(open_runs)
    for arch, up in results["upstreams"].items():
        md += f"\n\nUpstream {arch}: {up['ckpt']}" + ("" if up.get("given") else "\n\n" + upstream_markdown(up))
    return md


def paired_difference(cell: dict, scratch: dict) -> str:
    """A mode's score minus scratch's, in points: with >= 2 trials of each, mean +- sample std of the per-trial
    differences (trial k of both columns uses the same seed and splits: paired), else the difference of means."""
    if len(cell["trials"]) == len(scratch["trials"]):
        return common.paired_difference(cell["trials"], scratch["trials"], 100, 2)
    return f"{100 * (cell['mean'] - scratch['mean']):+.2f}"


def plateau_line(p: dict | bool | None) -> str:
    """A stage's convergence (common.plateau_report) in words."""
    if not isinstance(p, dict):
        return f"plateau: {p}"
    return (f"validation {'reached a plateau' if p['plateau'] else 'had NOT reached a plateau (not converged)'}: "
            f"best {p['best']:.4f}, last {p['last']:.4f} over {p['validations']} validations, last-quarter gain "
            f"{common.signed(p.get('gain'))} (tolerance {p['tolerance']:g})") if p["validations"] else "no validation"


def bench_step(device, amp: str = "auto", batch_size: int = 8) -> dict:
    """data/bench.py: `step` = one real upstream training step (wave augmentation, mix-up, log-mel + SpecAugment,
    BCE, Adam, through train_step) and `bare` = forward + backward + Adam of the same MobileNetV2, on one fixed
    synthetic batch of 10 s clips (the paper's AudioSet clips)."""
    device = torch.device(device)
    args, dtype = parse_args(["--amp", amp]), common.amp_dtype(device, amp)
    torch.manual_seed(0)
    model = place(MobileNetV2(527), device).train()
    x = 0.1 * torch.randn(batch_size, 10 * common.SR, device=device)
    y = (torch.rand(batch_size, 527, device=device) < 0.02).float()
    opt, scaler, losses = torch.optim.Adam(model.parameters(), lr=1e-4), common.grad_scaler(device, dtype), common.Mean(device)

    def bare():
        with common.autocast(device, dtype):
            loss = clip_loss(model(x)[0], y, True)
        common.optimizer_step(loss, opt, scaler)
    return {"step": lambda: train_step(model, x, y, lambda m, w, t: upstream_loss(m, w, t, args), opt, scaler, dtype,
                                       losses), "bare": bare, "clips": batch_size}


# =============================================================================================
# Commands: embed (HEAR embeddings of audio files) and the experiment
# =============================================================================================
def embed_checkpoint(ckpt: str, arch: str | None) -> Path:
    """--ckpt of embed: a checkpoint file, an upstream stage folder (its final.pt) or a run folder of this script
    (the upstream its frozen / fine-tuned cells read, from its results.json; --arch picks one of two)."""
    path = Path(ckpt)
    if not path.is_dir():
        return path
    if (path / "final.pt").is_file():
        return path / "final.pt"
    if not (path / "results.json").is_file():
        raise common.DataError(f"{path}: a folder without final.pt or results.json (not an upstream stage or a "
                               f"finished run of at_transfer.py)")
    ups = common.read_json(path / "results.json", "results.json").get("upstreams")
    if not isinstance(ups, dict) or not ups:
        raise common.DataError(f"{path}: its results.json names no upstream (a scratch-only run, or not a run of "
                               f"at_transfer.py): give --ckpt FILE")
    if arch is None and len(ups) > 1:
        raise common.DataError(f"{path}: the run has the upstreams {', '.join(ups)}: pick one with --arch")
    if (arch or next(iter(ups))) not in ups:
        raise common.DataError(f"{path}: the run has no {arch} upstream (it has {', '.join(ups)})")
    found = Path(ups[arch or next(iter(ups))]["ckpt"])
    beside = path.parent / found.parent.name / found.name  # the stage beside the run, wherever the run was made
    return found if found.is_file() or not beside.is_file() else beside


def embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at_transfer.py embed", description=embed.__doc__,
                                formatter_class=common.HelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="a run folder of at_transfer.py (its upstream), an upstream stage folder or final.pt (ours or "
                        "a psl.py machine annotator)")
    p.add_argument("--arch", default=None, choices=list(ARCHS),
                   help="which upstream of a run folder that has two (--upstream both)")
    p.add_argument("--out", required=True, help="folder for the embeddings (never beside the audio unless named)")
    p.add_argument("--timestamps", action="store_true", help="also write the per-frame embeddings and their times")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-resume: remove the embeddings written there before (another --ckpt)")
    p.add_argument("files", nargs="+", help="audio files (wav / flac / ogg; any rate, mixed to mono, resampled to 16 kHz)")
    return p


def embed(argv: list[str]) -> None:
    """Write HEAR embeddings of audio files into --out: <stem>.npy (scene, (1280,)); with --timestamps also
    <stem>_frames.npy ((T, 1280)) and <stem>_timestamps.npy ((T,), ms). --out is claimed like a run folder:
    nothing there that embed did not write is overwritten.

    python at_transfer.py embed --ckpt runs/at_transfer/synth_tasks_cpu --out runs/at_transfer/emb
        data/synth_tasks_scale0.2_seed0/keywords/audio/keywords_00000.wav   (after `python at_transfer.py`)"""
    a = embed_parser().parse_args(argv)
    stems = [Path(f).stem for f in a.files]
    if len(set(stems)) < len(stems):
        raise common.DataError(f"two files named {next(s for s in stems if stems.count(s) > 1)}: their embeddings "
                               f"would overwrite each other; embed them into separate --out folders")
    ckpt = embed_checkpoint(a.ckpt, a.arch)
    model = load_model(ckpt, common.pick_device(a.device))
    print(f"embed: {ckpt}", flush=True)
    if common.synthetic_classes_warning(getattr(model, "label_ids", [])):
        print(f"note: this upstream learnt only the synthetic corpus's {len(model.label_ids)} toy classes: its "
              f"embeddings of real audio are not general ones (train it with --data-root, or give a psl.py machine "
              f"annotator of a real corpus)", flush=True)
    with common.claim_run(a.out, "at_transfer_embed", {"ckpt": file_id(ckpt), "timestamps": a.timestamps},
                          a.resume, ("*.npy",)):
        for path in map(Path, a.files):
            emb, ts = get_timestamp_embeddings(torch.from_numpy(common.load_audio(path)).unsqueeze(0), model)
            dest = Path(a.out) / path.stem
            np.save(f"{dest}.npy", emb[0].mean(0).cpu().numpy())
            if a.timestamps:
                np.save(f"{dest}_frames.npy", emb[0].cpu().numpy())
                np.save(f"{dest}_timestamps.npy", ts[0].cpu().numpy())
            print(f"{path} -> {dest}.npy ({emb.shape[1]} frames x {emb.shape[2]})")
    print(f"embeddings: {a.out} ({len(a.files)} file(s); peak memory {common.peak_memory_gb():.1f} GB)", flush=True)


# =============================================================================================
# plot: the Table 3 matrix (task x scratch / frozen / finetune) from results.json, the paper's values beside
# =============================================================================================
PLOT_REFERENCE = {"sound": "ESC-50", "speech": "SPCV2"}  # the paper's row shown for a task without its own row


def matrix_groups(runs: list[str], each: bool = False) -> list[dict]:
    """The bars of the figure, read from results.json only: one group per (row, arch, task) with each mode's
    samples (in %; a run's trials, or one value per run folder / seed; with `each` every run folder is a row of
    its own with its trials), the paper's Table 3 values of the task's own row where it has one, and the reference
    rows of the paper for the domains of the other tasks."""
    res = [(r, common.read_json(Path(r) / "results.json", "results.json (not a finished run?)")) for r in runs]
    table: dict[tuple, dict] = {}  # (row, arch, task) -> {"metric", "domain", "plateau", mode: [samples]}

    def add(row, cell, samples):
        g = table.setdefault((row, cell["arch"], cell["task"]), {"metric": cell["metric"], "open": set(),
                                                                 "domain": cell.get("domain") or domain(cell["task"], {})})
        g.setdefault(cell["mode"], []).extend(100 * float(v) for v in samples)
        p = cell.get("plateau")
        if isinstance(p, dict) and p["reached"] < p["runs"]:
            g["open"].add(cell["mode"])  # a run of the cell stopped before its validation reached a plateau

    for r, data in res:
        if "cells" in data:  # a run folder: its trials (one run), or each run's cell mean (several run folders)
            for cell in data["cells"]:
                if each:
                    add(Path(r).name, cell, cell["trials"])
                else:
                    add("", cell, cell["trials"] if len(runs) == 1 else [cell["mean"]])
            continue
        for row, t in data.items():  # common.py seeds: {row: {"cells.<i>.mean": [per seed], "runs": [...]}}
            keys = [k for k in t if re.fullmatch(r"cells\.\d+\.mean", k)] if isinstance(t, dict) else []
            if not keys or not t.get("runs"):
                raise common.DataError(f"{r}: row {row!r} has no cells.<i>.mean key with its runs (make the table "
                                       f"with python common.py seeds ... --key cells.0.mean)")
            cells = common.read_json(Path(t["runs"][0]) / "results.json", "results.json of a seeds row's run")["cells"]
            for k in keys:
                add(row if len(data) > 1 else "", cells[int(k.split(".")[1])], t[k])
    if not table:
        raise common.DataError(f"{', '.join(runs)}: no cells to plot")
    groups, refs = [], {}
    arches = {k[1] for k in table}
    for (row, arch, task), g in table.items():
        label = (f"{row}:\n" if row else "") + task + (f" ({arch})" if len(arches) > 1 else "")
        paper = PAPER_T3.get(paper_row(task) or "", {}).get(arch)
        groups.append({"label": f"{label}\n{g['metric']}", "ours": True, "open": g["open"],
                       **{m: g[m] for m in MODES if m in g}})
        if paper:
            groups.append({"label": f"paper {paper_row(task)}\n({arch})", "ours": False,
                           **{m: [v] for m, v in zip(MODES, paper)}})
        elif g["domain"] in PLOT_REFERENCE:
            refs[(arch, PLOT_REFERENCE[g["domain"]])] = g["domain"]
    for (arch, name), dom in refs.items():
        groups.append({"label": f"paper {name}\n{dom}, {arch}", "ours": False,
                       **{m: [v] for m, v in zip(MODES, PAPER_T3[name][arch])}})
    return groups


def plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="at_transfer.py plot", description=plot.__doc__,
                                formatter_class=common.HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or a common.py seeds folder) with results.json")
    p.add_argument("--out", default=None, help="PNG to write (default: matrix.png in the first RUN)")
    p.add_argument("--each", action="store_true",
                   help="one group of bars per run folder and task, each with its own trials (runs that differ in "
                        "more than the seed, e.g. two upstreams); default: several run folders are seeds of one setting")
    return p


def plot(argv: list[str]) -> Path:
    """Draw the transfer matrix (Table 3 layout): one group of bars per task, scratch / frozen / finetune, from each
    RUN's results.json: a run folder of this script (bars: the mean over its trials, +- the sample std when there
    are >= 2), several run folders (one value per run, e.g. other --seed), or a folder written by `python common.py
    seeds ... --key cells.0.mean ...` (one value per seed); with --each, run folders side by side (each its trials). Hatched bars are the paper's Table 3 (MobileNetV2 /
    EfficientNet-B0 upstream on AudioSet): the task's own row for a public dataset; for a task without a row (the
    synthetic ones) the paper's ESC-50 (sound) or SPCV2 (speech) row, to compare the pattern, not the numbers.

    python at_transfer.py plot runs/at_transfer/synth_tasks_cpu --out docs/figures/at_transfer.png"""
    a = plot_parser().parse_args(argv)
    groups = matrix_groups(a.runs, a.each)
    colours = {"scratch": "tab:gray", "frozen": "tab:blue", "finetune": "tab:orange"}
    width = 0.27

    def draw(ax):
        for ours in (True, False):
            for j, m in enumerate(MODES):
                idx = [i for i, g in enumerate(groups) if g["ours"] == ours and g.get(m)]
                if not idx:
                    continue
                vals = [groups[i][m] for i in idx]
                means = [float(np.mean(v)) for v in vals]
                err = [float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for v in vals]
                bars = ax.bar([i + (j - 1) * width for i in idx], means, width, color=colours[m],
                              yerr=err if any(e == e for e in err) else None, capsize=3,
                              hatch=None if ours else "//", edgecolor="white" if ours else "black",
                              alpha=1.0 if ours else 0.45, label=f"{'ours' if ours else 'paper'} {m}")
                ax.bar_label(bars, [f"{v:.0f}" + ("*" if m in groups[i].get("open", ()) else "")
                                    for v, i in zip(means, idx)], fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)), [g["label"] for g in groups], fontsize=8)
        ax.set_ylabel("test score, % (the task's metric)")
        ax.set_ylim(0, 128)  # room for the legend above the bars
        ax.set_yticks(range(0, 101, 20))
        ax.set_title("Transfer matrix (Table 3 layout): scratch / frozen / finetune; hatched: the paper", fontsize=9)
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        if any(g.get("open") for g in groups):
            ax.text(1.0, -0.2, "* a run of the cell stopped before its validation reached a plateau",
                    transform=ax.transAxes, ha="right", fontsize=7)
    return common.figure(a.out or Path(a.runs[0]) / "matrix.png", draw, size=(max(6.4, 1.3 * len(groups)), 4.6))


def read_tasks(args) -> list:
    """The tasks to run (--task, default every task of the root; the synthetic ones are generated once), each with
    the paper's per-dataset recipe (PAPER_RECIPE) in place of what tasks.json says, printed where it differs."""
    root = Path(args.task_root) if args.task_root else common.ensure_synthetic_tasks(args.task_scale, args.seed)
    try:
        tasks = [common.read_task(root, n) for n in (args.task or common.list_tasks(root))]
    except (OSError, KeyError, TypeError) as e:  # a tasks.json entry without a key, or its manifest missing
        raise common.DataError(f"{root / 'tasks.json'}: a malformed task entry or a missing manifest ({e})") from None
    return [paper_recipe(t) for t in tasks]


def paper_recipe(task):
    """The task with Sec. 4.2.2's recipe for its dataset (PAPER_RECIPE: the loss, the training segment length); its
    entry (task.info, part of the frozen cache's key) says so."""
    recipe = {k: v for k, v in PAPER_RECIPE.get(paper_row(task.name) or "", {}).items() if task.info.get(k) != v}
    if not recipe:
        return task
    if common.is_main():
        print(f"at_transfer: {task.name}: the paper's recipe for {paper_row(task.name)}: "
              + ", ".join(f"{k} {v}" for k, v in recipe.items()) + " (Sec. 4.2.2; tasks.json: "
              + ", ".join(f"{k} {task.info.get(k, 'unset')}" for k in recipe) + ")", flush=True)
    return dataclasses.replace(task, max_seconds=recipe.get("max_seconds", task.max_seconds), info=task.info | recipe)


def bce(task) -> bool:
    """BCE on per-frame sigmoids (multi-label tasks, and FSD18 as the paper trains it), else softmax cross-entropy."""
    return task.type == "multi" or task.info.get("loss") == "bce"


def domain(task_name: str, info: dict) -> str:
    """sound, speech or music: tasks.json's "domain" (data/prepare.py writes it); an older entry without one is
    speech when its name is one of Table 3's speech datasets."""
    return info.get("domain") or ("speech" if paper_row(task_name) in SPEECH else "sound")


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["embed"]:
        return embed(argv[1:])
    if argv[:1] == ["plot"]:
        return plot(argv[1:])
    args = resolve(parse_args(argv))
    with common.distributed():
        device, _ = common.setup_device(args)
        with common.claim_run(args.out, "at_transfer", run_identity(args), args.resume, OUTPUTS):
            tasks = read_tasks(args)
            done = Path(args.out) / "results.json"  # cells of earlier invocations (other tasks / modes / upstreams)
            earlier = common.read_json(done) if done.exists() else {"upstreams": {}, "cells": []}
            cells = {(c["arch"], c["task"], c["mode"]): c for c in earlier["cells"]}
            upstreams = earlier["upstreams"]
            claim_upstreams(args)
            for arch in args.arches:
                if set(args.mode) - {"scratch"}:  # scratch cells read no upstream: none is trained or needed
                    upstreams[arch] = upstream(args, arch, device)  # Sec. 4.2.1, Table 2
                for task in tasks:
                    for mode in args.mode:  # Sec. 4.2.2, Table 3
                        ckpt = upstreams[arch]["ckpt"] if mode != "scratch" else None
                        cells[(arch, task.name, mode)] = run_cell(args, task, mode, arch, ckpt,
                                                                  common.RunLogger(args.out), device)
            results = {"upstreams": upstreams, "cells": list(cells.values())}
            common.report(args.out, results, at_markdown(results, args))
    return results


if __name__ == "__main__":
    common.cli(main)
