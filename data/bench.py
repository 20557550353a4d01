"""Throughput of the data path on this machine: the wav loader and the batched front-ends, with
torchaudio's Kaldi fbank beside them where torchaudio imports. Measures; makes no data.

    python data/bench.py [--root data/synth] [--workers 2] [--threads 2]
    $(bash ../shared/tools/oracle_env.sh) data/bench.py      # with torchaudio, for the comparison
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
    (the reference environment of ../shared/tools/oracle_env.sh). Best of `repeats`, interleaved,
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


def psla_step_overhead(root: str | Path, effnet: int = 0, batch: int = 16, workers: int = 2, steps: int | None = None,
                       rounds: int = 2, target_length: int = 1056) -> dict:
    """Issue 12: seconds per step of psla.py's real training epoch (psla.train_epoch: its loader with
    fresh workers, mix-up, masking, LR schedule, loss, tqdm), with the workers started from the fork
    server (psla.worker_context, the fix) and forked from this process (before it), against a bare
    forward / backward / Adam step of the same model over pre-built batches of the same size;
    interleaved in one process, with the load average at each measurement, so that the ratios
    compare like with like on a busy machine.
    `steps` cuts each epoch (default: a whole epoch, as in training). This process volunteers to the
    kernel's OOM killer first (oom_score_adj 1000): on a shared machine it must not take others down."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import psla
    import torch.nn.functional as F
    args = psla.parse_args(["--data-root", str(root), "--effnet", str(effnet), "--batch-size", str(batch),
                            "--workers", str(workers), "--target-length", str(target_length)])
    corpus = C.load_corpus(str(root), args.data)
    psla.resolve_schedule(args, corpus.synthetic, corpus.root)
    args.max_steps = steps
    model = psla.build_model(dict(n_classes=len(corpus.labels), effnet=effnet, heads=args.heads, n_mels=args.n_mels,
                                  target_length=args.target_length, norm=(-10.52, 3.30), freqm=args.freqm,
                                  timem=args.timem, drop_connect=args.drop_connect))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    targets = corpus.targets(corpus.train)
    ds = psla.MixupClips(psla.Clips(corpus.root, corpus.train, targets, args.target_length), args.mixup,
                         args.mixup_alpha)
    loaders = {ctx: C.make_loader(ds, batch, shuffle=True, workers=workers, seed=args.seed, persistent=False,
                                  collate_fn=psla.collate, context=ctx and psla.worker_context())
               for ctx in (None, "server")}  # None: forked from this process (the default before issue 12)
    batches = [b for _, b in zip(range(steps or len(ds) // batch), loaders[None])]  # pre-built, for the bare loop

    def bare():
        model.train()
        for wave, target, _, n in batches:
            loss = F.binary_cross_entropy(model(wave, n).clamp(1e-7, 1 - 1e-7), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def real(ctx):
        psla.train_epoch(model, loaders[ctx], opt, args, 1, 0, torch.device("cpu"), None)

    rows = []
    for r in range(rounds):
        for name, fn in (("real_fork", lambda: real(None)), ("real", lambda: real("server")), ("bare", bare)):
            load = os.getloadavg()[0]
            t = time.perf_counter()
            fn()
            rows.append({"round": r, "loop": name, "s_per_step": round((time.perf_counter() - t) / len(batches), 3),
                         "load_avg_1min": load})
            print(json.dumps(rows[-1]), flush=True)
    per = {k: [x["s_per_step"] for x in rows if x["loop"] == k] for k in ("real_fork", "real", "bare")}
    return {"rows": rows, "steps": len(batches), "effnet": effnet, "batch": batch, "workers": workers,
            "target_length": target_length, "threads": torch.get_num_threads(),
            **{f"ratio_{k}": [round(a / b, 3) for a, b in zip(per[k], per["bare"])] for k in ("real_fork", "real")}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(C.SYNTH_ROOT), help="data root (default: the synthetic corpus)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader figure")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    g = p.add_argument_group("psla.py step overhead (issue 12)")
    g.add_argument("--psla-overhead", action="store_true", help="psla's real training step vs a bare step")
    g.add_argument("--effnet", type=int, default=0, help="EfficientNet-B<n>")
    g.add_argument("--batch", type=int, default=16, help="batch size (the synthetic default)")
    g.add_argument("--steps", type=int, default=None, help="steps per measured epoch (default: all)")
    g.add_argument("--rounds", type=int, default=2, help="interleaved real/bare rounds")
    g.add_argument("--target-length", type=int, default=1056, help="fbank frames (psla.py --target-length)")
    a = p.parse_args(argv)
    if Path(a.root) == C.SYNTH_ROOT:
        C.ensure_synthetic()
    torch.set_num_threads(a.threads)
    if a.psla_overhead:
        print(json.dumps(psla_step_overhead(a.root, a.effnet, a.batch, a.workers, a.steps, a.rounds, a.target_length)))
        return
    print(json.dumps(bench(a.root, workers=a.workers), indent=1))


if __name__ == "__main__":
    try:
        main()
    except C.DataError as e:
        sys.exit(f"error: {e}")
