"""Throughput of the data path on this machine: the wav loader and the batched front-ends, with
torchaudio's Kaldi fbank beside them where torchaudio imports. Measures; makes no data.

    python data/bench.py --root data/synth --workers 2 --threads 2       # the data path (with torchaudio installed,
                                                                         # its Kaldi fbank is timed beside ours)
    python data/bench.py --steps --device cuda --amp bf16 --batch-size 32   # every script's training step
    python data/bench.py --audioset-scale /tmp/as_fake     # start-up time and memory at full AudioSet scale
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # common.py, when run as a script
import common as C  # noqa: E402


def bench(root: str | Path, batch: int = 32, n_batches: int = 10, workers: int = 2, repeats: int = 5) -> dict:
    """Clips/s of the wav ClipDataset through a DataLoader, and of the front-ends on the CPU: batched,
    one clip at a time, and torchaudio's Kaldi fbank one clip at a time where torchaudio imports
    (an environment with torchaudio installed). Best of `repeats`, interleaved,
    so that all figures see the same machine state; wall clips/s, clips per CPU-second of this
    process (comparable on a loaded machine at --threads 1) and the load average."""
    corpus = C.load_corpus(str(root), "full")
    ds = C.ClipDataset(corpus.root, corpus.train, corpus.targets(corpus.train))
    it = iter(C.make_loader(ds, batch, shuffle=True, workers=workers))
    next(it)  # start the workers
    t = time.perf_counter()
    for _ in range(n_batches):
        wave, *_ = next(it)
    res = {"loader_clips_per_s": n_batches * batch / (time.perf_counter() - t)}
    logmel, fbank = C.LogMel.preset("psl"), C.KaldiFbank()
    runs = {"logmel_psl_batched": lambda: logmel(wave), "kaldi_fbank_batched": lambda: fbank(wave),
            "kaldi_fbank_per_clip": lambda: [fbank(w[None]) for w in wave]}
    try:
        from torchaudio.compliance.kaldi import fbank as ta_fbank
        runs["torchaudio_kaldi_fbank_per_clip"] = lambda: [ta_fbank(
            w[None], htk_compat=True, use_energy=False, window_type="hanning", num_mel_bins=128, dither=0.0,
            frame_shift=10, sample_frequency=C.SR) for w in wave]
    except Exception:  # not importable beside this project's CPU torch
        pass
    wall, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    res.update({f"{k}_clips_per_s": batch / v for k, v in wall.items()})
    # CPU time of this process: the figure to compare on a loaded machine (with --threads 1)
    res.update({f"{k}_clips_per_cpu_s": batch / v for k, v in cpu.items()})
    res.update(threads=torch.get_num_threads(), torch=torch.__version__, load_avg_1min=os.getloadavg()[0])
    return res


SCRIPTS = ("psla", "psl", "at_transfer", "conformer_ssl", "ofa_aec")


def step_benchmark(scripts=SCRIPTS, device: str = "auto", amp: str = "auto", batch_size: int = 8, steps: int = 5,
                   warmup: int = 2) -> list[dict]:
    """The training-step benchmark: clips/s of each script's real training step (its train_step: front-end,
    augmentation, loss, optimizer, as in training) and of the bare step (forward + backward + optimizer of
    the model alone on the same batch), on one device, from each script's `bench_step(device, amp,
    batch_size)`. Real and bare are interleaved, `warmup` calls each first (cuDNN autotuning, allocator);
    on CUDA each timing ends with a synchronize."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import importlib
    dev = C.pick_device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    rows = []
    for name in scripts:
        b = importlib.import_module(name).bench_step(dev, amp, batch_size)
        best = {"step": float("inf"), "bare": float("inf")}
        for k in ("step", "bare"):
            for _ in range(warmup):
                b[k]()
        for _ in range(steps):
            for k in ("step", "bare"):
                sync()
                t = time.perf_counter()
                b[k]()
                sync()
                best[k] = min(best[k], time.perf_counter() - t)
        rows.append({"script": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
                     "amp": amp, "batch": b["clips"], "step_clips_per_s": round(b["clips"] / best["step"], 2),
                     "bare_clips_per_s": round(b["clips"] / best["bare"], 2),
                     "step_over_bare": round(best["step"] / best["bare"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


AUDIOSET_ROWS = {"balanced_train": 22_160, "unbalanced_train": 2_041_789, "eval": 20_371}


def fake_audioset(root: str | Path, rows: dict = AUDIOSET_ROWS, seed: int = 0) -> Path:
    """Full AudioSet's manifests in our layout (2.08 M rows, 527 classes, the real class list and ontology,
    1-4 labels per clip from a Zipf prior), with audio/<id>.wav names that are never opened: what each
    script does before its first training step, measured at the real scale. Made once per root."""
    import numpy as np
    root = Path(root)
    if (root / "eval.tsv").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for f in ("class_labels_indices.csv", "ontology.json"):
        (root / f).write_bytes((C.AUDIOSET_META / f).read_bytes())
    mids = C.read_class_labels(root / "class_labels_indices.csv").mids
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(mids) + 1)
    p /= p.sum()
    for split, n in rows.items():
        k = rng.integers(1, 5, n)
        labels = rng.choice(len(mids), (n, 4), p=p)
        with open(root / f"{split}.tsv", "w") as f:
            f.write("filename\tlabels\n")
            f.writelines(f"audio/{split}/{i:08d}.wav\t{','.join(mids[j] for j in set(labels[i, :k[i]]))}\n"
                         for i in range(n))
    return root


STARTUP = {  # name -> code run in a fresh process on the fake AudioSet (ROOT), after `import common as C`
    "load_corpus full": "c = C.load_corpus(ROOT, 'full')",
    "load_corpus 300h": "c = C.load_corpus(ROOT, '300h')",
    "targets + PSLA sampler weights (full)": "c = C.load_corpus(ROOT, 'full'); "
                                             "w = C.generate_sampling_weights(c.targets(c.train))",
    "uint8 targets + PSLA sampler weights (full)": "c = C.load_corpus(ROOT, 'full'); "
                                                   "w = C.generate_sampling_weights(c.targets(c.train, dtype='uint8'))",
    "uint8 targets + pseudo-balanced sampler, one epoch (full)":
        "c = C.load_corpus(ROOT, 'full'); s = C.PseudoBalancedSampler(c.targets(c.train, dtype='uint8')); "
        "i = s.epoch_indices(0)",
    # each script's own start-up before its first training step (nothing that opens audio)
    "psla.py --data full (uint8 targets, Algorithm 1 weights, the first epoch's items)":
        "import psla; a = psla.parse_args(['--data-root', ROOT, '--data', 'full', '--device', 'cpu']); "
        "c = C.load_corpus(ROOT, 'full'); psla.resolve_schedule(a, c.root); t = c.targets(c.train, dtype='uint8'); "
        "i = psla.epoch_items(a, t, 1); ds = psla.MixupClips(psla.Clips(c.root, c.train, t, a.target_length), "
        "a.mixup, a.mixup_alpha, a.seed)",
    "psl.py --data full, MA + relabel plan at 10 s (weak targets, pseudo-balanced epoch, chunk list, cache key)":
        "import numpy as np, psl; c = C.load_corpus(ROOT, 'full'); a = psl.resolve(psl.parse_args(['--data-root', "
        "ROOT, '--data', 'full', '--preset', 'paper', '--device', 'cpu']), c); s = psl.teacher_settings(a, c); "
        "w = psl.weak_targets(c, c.train); i = C.PseudoBalancedSampler(w).epoch_indices(0); "
        "v = c.targets(psl.validation_split(c, a)); n = len(c.train); ds = C.SegmentDataset(c.root, c.train, "
        "np.zeros((n, 0), np.float32), 11.0, 10.0, durations=[10.0] * n, min_last=psl.MIN_CHUNK_S); "
        "r = psl.corpus_identity(c.root, ds.rows)",
    "at_transfer.py upstream --data full (corpus, targets, sampler, first epoch, validation rows)":
        "import at_transfer as AT; a = AT.resolve(AT.parse_args(['--data-root', ROOT, '--preset', 'cpu', "
        "'--workers', '0', '--out', '/tmp/at_startup/run'])); c, ds, s, v = AT.upstream_data(a); i = s.epoch_indices(0)",
    "conformer_ssl.py --preset paper --data full --table 1 (fractions, weights, 25.6 M balanced draws, stream)":
        "import conformer_ssl as S; a, c, u = S.load_data(S.parse_args(['--data-root', ROOT, '--data', 'full', "
        "'--table', '1', '--preset', 'paper'])); sets = S.labelled_sets(a, c); "
        "w = C.generate_sampling_weights(sets[-1].train_y); "
        "o = C.WeightedSampler(w, a.ft_steps * a.batch_size, seed=0).epoch_indices(0); _, po = S.unlabelled_data(a, None, u)",
}


def startup_benchmark(root: str | Path, cases: dict = STARTUP) -> list[dict]:
    """Wall seconds and peak RSS (GB) of each start-up case, each in a fresh process (its own peak)."""
    import subprocess
    here = Path(__file__).resolve().parent.parent
    rows = []
    for name, code in cases.items():
        prog = (f"import sys, time, resource; sys.path.insert(0, {str(here)!r}); import common as C; "
                f"ROOT = {str(root)!r}; _t0 = time.perf_counter(); {code}; "
                f"print('STARTUP', time.perf_counter() - _t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=here)
        if out.returncode:
            rows.append({"case": name, "error": out.stderr.strip().splitlines()[-1]})
        else:
            sec, kb = [line for line in out.stdout.splitlines() if line.startswith("STARTUP ")][-1].split()[1:]
            rows.append({"case": name, "seconds": round(float(sec), 1), "peak_rss_gb": round(int(kb) / 1e6, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=C.HelpFormatter)
    p.add_argument("--root", default=str(C.SYNTH_ROOT), help="data root (default: the synthetic corpus)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader figure")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    g = p.add_argument_group("the training-step benchmark (every script's real step vs its bare step)")
    g.add_argument("--steps", action="store_true", help="run the step benchmark instead of the data-path one")
    g.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS, help="scripts to measure")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"], help="autocast precision")
    g.add_argument("--batch-size", type=int, default=8, help="clips per step")
    g.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (best is kept)")
    g = p.add_argument_group("start-up at AudioSet scale")
    g.add_argument("--audioset-scale", metavar="DIR", default=None,
                   help="write full AudioSet's manifests (2.08 M rows, audio never opened) in DIR once, and time "
                        "what happens before the first training step, each case in a fresh process")
    g.add_argument("--cases", nargs="+", default=None, metavar="WORD",
                   help="only the start-up cases whose name contains one of these words (e.g. psla conformer)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.audioset_scale:
        startup_benchmark(fake_audioset(a.audioset_scale),
                          {k: v for k, v in STARTUP.items() if not a.cases or any(w in k for w in a.cases)})
        return
    if a.steps:
        step_benchmark(a.scripts, a.device, a.amp, a.batch_size, a.repeats)
        return
    if Path(a.root) == C.SYNTH_ROOT:
        C.ensure_synthetic()
    print(json.dumps(bench(a.root, workers=a.workers), indent=1))


if __name__ == "__main__":
    C.cli(main)
