"""Making the synthetic data: the upstream corpus (AudioSet in miniature), four downstream tasks
that test transfer, and the unlabelled stream (synthetic_stream, also reachable as
common.synthetic_stream).

    python data/synthetic.py corpus --root data/synth --scale 1 --seed 0   # build + summarise
    python data/synthetic.py summary --root data/synth
    python data/synthetic.py tasks --root data/synth_tasks --scale 1 --seed 0
    python data/synthetic.py probe --root data/synth_tasks      # linear-probe difficulty check

Scripts never import this file directly: common.py loads it (by path) only when a corpus or the
task root must be generated, so common.py + a script still run on real data without data/.
Everything here is deterministic in (seed, scale): every clip has its own RNG seeded by
(seed, split or task, index), so worker count and order never change a byte.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import lfilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # common.py, when run as a script
from common import (SR, SYNTH_ROOT, TASKS_ROOT, DataError, HelpFormatter, load_data_module, multi_hot, rank,  # noqa: E402
                    read_class_labels, read_manifest, resample, world_size, write_json, write_manifest)

write_task = load_data_module("prepare").write_task  # the task layout, shared with the converters


# =============================================================================================
# The upstream corpus: AudioSet in miniature, with the ground truth AudioSet never has
# =============================================================================================
# 6 parents x 4 children. Children of one parent are deliberately confusable (same generator
# family, overlapping parameters). (name, min duration s, max duration s)
SYNTH_CLASSES = {
    "Tone": [("Pure tone, low", .5, 3.), ("Pure tone, high", .5, 3.), ("Harmonic tone", .5, 3.), ("Vibrato tone", .5, 3.)],
    "Noise": [("Low-band noise", 1., 4.), ("Mid-band noise", 1., 4.), ("High-band noise", 1., 4.), ("Pulsed noise", 1., 4.)],
    "Impact": [("Click", .2, .4), ("Knock", .2, .6), ("Slow click train", .5, 2.), ("Fast click train", .5, 2.)],
    "Sweep": [("Up-chirp", .5, 2.5), ("Down-chirp", .5, 2.5), ("Siren", 1., 4.), ("Warble", .5, 3.)],
    "Voice": [("Vowel a", .3, 2.), ("Vowel i", .3, 2.), ("Vowel u", .3, 2.), ("Vowel e", .3, 2.)],
    "Music": [("Major chord", .5, 3.), ("Minor chord", .5, 3.), ("Arpeggio", 1., 4.), ("Drum beat", 1., 4.)],
}
PARENTS = list(SYNTH_CLASSES)
CHILDREN = [(p, c) for p in range(len(PARENTS)) for c in range(4)]  # leaf classes (parent, child)
FORMANTS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]  # a i u e


def parent_mid(p: int) -> str:
    return f"/synth/p{p}"


def child_mid(p: int, c: int) -> str:
    return f"/synth/p{p}c{c}"


def _band_noise(rng, n: int, lo: float, hi: float, sr: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    spec[(f < lo) | (f > hi)] = 0
    return np.fft.irfft(spec, n)


def _harmonics(f0: np.ndarray, sr: int, amps) -> np.ndarray:
    """Sum of harmonics k*f0(t) (f0 may vary over time), amplitudes amps[k-1]; k*f0 < Nyquist."""
    phase = 2 * np.pi * np.cumsum(f0) / sr
    out = np.zeros_like(f0)
    for k, a in enumerate(amps, 1):
        if a and k * f0.max() < sr / 2:
            out += a * np.sin(k * phase)
    return out


def synth_event(p: int, c: int, dur: float, rng: np.random.Generator, sr: int = SR,
                f0: float | None = None) -> np.ndarray:
    """One procedurally generated event of leaf class (p, c), unit peak (f0: a voice's pitch)."""
    n = max(int(dur * sr), 16)
    t = np.arange(n) / sr
    name = PARENTS[p]
    if name == "Tone":
        f0 = rng.uniform(*[(250, 450), (500, 900), (250, 600), (300, 800)][c])
        f = np.full(n, f0)
        if c == 3:
            f = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(5, 7) * t))
        x = _harmonics(f, sr, [1, .5, .33, .25] if c == 2 else [1])
    elif name == "Noise":
        lo, hi = [(100, 800), (800, 2500), (2500, 6000), (100, 800)][c]
        x = _band_noise(rng, n, lo * rng.uniform(.8, 1.2), hi * rng.uniform(.8, 1.2), sr)
        if c == 3:
            x *= 0.5 * (1 + np.sign(np.sin(2 * np.pi * rng.uniform(3, 5) * t)))
    elif name == "Impact":
        def hit(freq, decay):
            m = min(n, int(0.15 * sr))
            h = np.zeros(n)
            h[:m] = np.sin(2 * np.pi * freq * t[:m]) * np.exp(-t[:m] / decay)
            return h
        if c in (0, 1):
            x = hit(rng.uniform(2000, 4000), .01) if c == 0 else hit(rng.uniform(150, 400), .03)
        else:
            rate = rng.uniform(3, 6) if c == 2 else rng.uniform(12, 25)
            click = hit(rng.uniform(2000, 4000), .005)[: int(sr / rate)]
            x = np.zeros(n)
            for s in range(0, n, int(sr / rate)):
                seg = click[: n - s]
                x[s: s + len(seg)] += seg
    elif name == "Sweep":
        if c in (0, 1):
            a, b = rng.uniform(250, 400), rng.uniform(2500, 3500)
            f = a * (b / a) ** (t / dur) if c == 0 else b * (a / b) ** (t / dur)
        elif c == 2:
            f = 1000 + 400 * np.sin(2 * np.pi * rng.uniform(.5, 1.) * t)
        else:
            f = rng.uniform(1000, 2000) + 200 * np.sin(2 * np.pi * rng.uniform(8, 15) * t)
        x = _harmonics(f, sr, [1])
    elif name == "Voice":
        f0 = (f0 or rng.uniform(100, 220)) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(4, 6) * t))
        formants = np.array(FORMANTS[c]) * rng.uniform(.95, 1.05)
        k = np.arange(1, int(4000 / f0.max()) + 1)
        gain = (1 / (1 + ((k[:, None] * f0.mean() - formants[None]) / 80.0) ** 2)).sum(1)  # formant envelope
        x = _harmonics(f0, sr, list(gain))
    else:  # Music
        root = rng.uniform(200, 400)
        triad = [1, 5 / 4, 3 / 2] if c != 1 else [1, 6 / 5, 3 / 2]
        if c in (0, 1):
            x = sum(_harmonics(np.full(n, root * r), sr, [1, .5, .25]) for r in triad) * np.exp(-t / max(dur, .5))
        elif c == 2:
            note = int(0.15 * sr)
            f = np.array([root * triad[(i // note) % 3] for i in range(n)])
            x = _harmonics(f, sr, [1, .5, .25]) * (1 - (np.arange(n) % note) / note)
        else:
            beat = int(sr / rng.uniform(2, 4))
            x = np.zeros(n)
            kick = np.sin(2 * np.pi * rng.uniform(60, 100) * t[:beat]) * np.exp(-t[:beat] / .05)
            hat = _band_noise(rng, beat, 5000, 7900, sr) * np.exp(-t[:beat] / .01)
            for s in range(0, n, beat):
                m = min(beat, n - s)
                x[s: s + m] += kick[:m] + (hat[:m] if (s // beat) % 2 else 0)
    fade = min(int(0.01 * sr), n // 2)
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade)
    env[n - fade:] = np.linspace(1, 0, fade)
    x = x * env
    return x / (np.abs(x).max() + 1e-9)


@dataclass
class NoiseRates:
    """Label corruption of the training splits, the way AudioSet's weak labels are wrong."""
    type1: float = 0.25       # child label missing, parent kept (PSLA Type I)
    type2: float = 0.25       # parent label missing, child kept (PSLA Type II)
    missed_short: float = 0.5  # an event shorter than short_s is missed by the annotator
    short_s: float = 0.6
    spurious: float = 0.05    # probability of one wrong extra leaf label per clip


# split -> (clips per leaf class for balanced-style splits | total clips for Zipf splits, noisy labels?)
SYNTH_SPLITS = {"balanced_train": ("floor", 12, True), "unbalanced_train": ("zipf", 900, True),
                "valid": ("floor", 6, True), "eval": ("floor", 12, False)}


def _add_event(x: np.ndarray, leaf: int, rng: np.random.Generator, clip_s: float, min_db: float) -> tuple[float, float]:
    """Add one event of leaf class `leaf` at a random onset and level (min_db..-6 dB) into x, in
    place; returns its (onset, offset) in seconds."""
    p, c = CHILDREN[leaf]
    lo, hi = SYNTH_CLASSES[PARENTS[p]][c][1:]
    dur = min(rng.uniform(lo, hi), clip_s)
    on = rng.uniform(0, clip_s - dur)
    ev = synth_event(p, c, dur, rng) * 10 ** (rng.uniform(min_db, -6) / 20)
    s = int(on * SR)
    x[s: s + len(ev)] += ev[: len(x) - s]
    return round(on, 3), round(on + dur, 3)


def _synth_clip(args):
    """Generate, write and label one clip (a worker job; deterministic in (seed, split, index))."""
    root, split, idx, anchor, seed, clip_s, zipf_p, noise = args
    rng = np.random.default_rng([seed, list(SYNTH_SPLITS).index(split), idx])
    n = int(clip_s * SR)
    # low pink-ish background: one-pole low-passed white noise at about -50 dBFS
    bg = rng.standard_normal(n)
    bg = np.convolve(bg, np.exp(-np.arange(64) / 16.0), mode="same")
    x = bg / (np.abs(bg).max() + 1e-9) * 10 ** (rng.uniform(-55, -45) / 20)
    n_events = int(rng.integers(1, 6))
    leaves = [anchor] + [int(rng.choice(len(CHILDREN), p=zipf_p)) for _ in range(n_events - 1)]
    events = [(*_add_event(x, leaf, rng, clip_s, -24.0), leaf) for leaf in leaves]
    x /= max(1.0, np.abs(x).max() / 0.99)
    fn = f"audio/{split}/{split}_{idx:05d}.wav"
    sf.write(str(Path(root) / fn), x.astype(np.float32), SR, subtype="PCM_16")
    true = sorted({child_mid(*CHILDREN[l]) for *_, l in events} | {parent_mid(CHILDREN[l][0]) for *_, l in events})
    weak, stats = corrupt_labels(events, rng, noise) if noise else (true, {})
    return fn, true, weak, events, stats


def corrupt_labels(events, rng: np.random.Generator, r: NoiseRates) -> tuple[list[str], dict]:
    """Weak labels an imperfect annotator gives a clip; the counts say which error happened."""
    stats = {"missed_short": 0, "type1": 0, "type2": 0, "spurious": 0}
    longest: dict[int, float] = {}
    for on, off, leaf in events:
        longest[leaf] = max(longest.get(leaf, 0.0), off - on)
    heard = set()
    for leaf, d in sorted(longest.items()):
        if d < r.short_s and rng.random() < r.missed_short:
            stats["missed_short"] += 1
        else:
            heard.add(leaf)
    parents = sorted({CHILDREN[l][0] for l in heard})
    labels = set()
    for leaf in sorted(heard):
        if rng.random() < r.type1:
            stats["type1"] += 1  # child missing; its parent stays (added below)
        else:
            labels.add(child_mid(*CHILDREN[leaf]))
    for p in parents:
        has_child = any(child_mid(p, c) in labels for c in range(4))
        if has_child and rng.random() < r.type2:
            stats["type2"] += 1  # parent missing while a child is labelled
        else:
            labels.add(parent_mid(p))
    if rng.random() < r.spurious:
        wrong = [l for l in range(len(CHILDREN)) if l not in longest]
        labels.add(child_mid(*CHILDREN[int(rng.choice(wrong))]))
        stats["spurious"] += 1
    if not labels:  # AudioSet clips always carry at least one label: keep the first event's parent
        labels.add(parent_mid(CHILDREN[events[0][2]][0]))
    return sorted(labels), stats


def write_class_labels(path: str | Path, mids: list[str], names: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(["index", "mid", "display_name"])
        w.writerows([i, m, n] for i, (m, n) in enumerate(zip(mids, names)))


PARTIAL_MARK = ".generating"  # written first into a build folder: only such a folder is ever removed


def count_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def refuse_foreign_folder(root: Path, stamp: str) -> Path:
    """Never delete what this program did not make: a non-empty folder without our stamp file is refused, and
    so is a generated one holding other files than it was made with (the stamp records their count), and a
    user's folder at the build path <root>.partial. Returns the fresh build folder (marked as ours)."""
    what = "corpus" if stamp == "synth.json" else "task set"
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / stamp).exists())):
        raise DataError(f"{root}: exists and is not a generated {what} (no {stamp}); refusing to replace it: "
                        f"choose an empty or new --root")
    if (root / stamp).exists():
        made = json.loads((root / stamp).read_text()).get("files")
        if made is not None and count_files(root) != made:
            raise DataError(f"{root}: a generated {what} that now holds {count_files(root)} files, not the {made} "
                            f"it was made with; refusing to replace it: move your files out or choose another --root")
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists() and (not tmp.is_dir() or (any(tmp.iterdir()) and not (tmp / PARTIAL_MARK).exists())):
        raise DataError(f"{tmp}: exists and is not an unfinished build of this program; move it away")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARK).touch()
    return tmp


def finish_build(tmp: Path, root: Path, stamp: str, summary: dict) -> Path:
    """Swap a finished build folder in whole (the corpus appears whole or not at all); the stamp records
    how many files it holds, so user files put in it later are never deleted by a rebuild."""
    (tmp / PARTIAL_MARK).unlink()
    write_json(tmp / stamp, {**summary, "files": count_files(tmp) + (not (tmp / stamp).exists())})
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def make_synthetic_corpus(root: str | Path = SYNTH_ROOT, scale: float = 1.0, seed: int = 0,
                          clip_seconds: float = 10.0, noise: NoiseRates | None = None,
                          workers: int = 2, quiet: bool = False) -> Path:
    """Write the synthetic corpus in the real layout. Deterministic in (seed, scale, clip_seconds).
    An existing `root` is replaced only if it is a corpus made here (synth.json) or empty."""
    root = Path(root)
    tmp = refuse_foreign_folder(root, "synth.json")
    noise = noise or NoiseRates()
    (tmp / "audio").mkdir(parents=True)
    mids = [m for p in range(len(PARENTS)) for m in [parent_mid(p)] + [child_mid(p, c) for c in range(4)]]
    names = [n for p, pn in enumerate(PARENTS) for n in [pn] + [f"{pn}: {c[0]}" for c in SYNTH_CLASSES[pn]]]
    write_class_labels(tmp / "class_labels_indices.csv", mids, names)
    onto = [{"id": parent_mid(p), "name": PARENTS[p], "child_ids": [child_mid(p, c) for c in range(4)],
             "restrictions": []} for p in range(len(PARENTS))]
    onto += [{"id": child_mid(p, c), "name": f"{PARENTS[p]}: {SYNTH_CLASSES[PARENTS[p]][c][0]}", "child_ids": [],
              "restrictions": []} for p, c in CHILDREN]
    (tmp / "ontology.json").write_text(json.dumps(onto, indent=1))
    # Zipf prior over leaf classes (a fixed random rank order) for the unbalanced split
    order = np.random.default_rng(seed).permutation(len(CHILDREN))
    zipf = np.empty(len(CHILDREN))
    zipf[order] = 1.0 / np.arange(1, len(CHILDREN) + 1) ** 1.1
    zipf /= zipf.sum()
    uniform = np.full(len(CHILDREN), 1.0 / len(CHILDREN))
    summary = {"seed": seed, "scale": scale, "clip_seconds": clip_seconds, "noise": vars(noise), "splits": {}}
    for split, (kind, size, noisy) in SYNTH_SPLITS.items():
        (tmp / "audio" / split).mkdir()
        if kind == "floor":  # a floor of clips per class: every leaf class anchors `size` clips
            anchors = [l for _ in range(max(1, round(size * scale))) for l in range(len(CHILDREN))]
            prior = uniform
        else:
            count = max(len(CHILDREN), round(size * scale))
            anchors = np.random.default_rng([seed, 99]).choice(len(CHILDREN), count, p=zipf).tolist()
            prior = zipf
        jobs = [(str(tmp), split, i, a, seed, clip_seconds, prior, noise if noisy else None)
                for i, a in enumerate(anchors)]
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                out = pool.map(_synth_clip, jobs, chunksize=16)
        else:
            out = [_synth_clip(j) for j in jobs]
        write_manifest(tmp / f"{split}.tsv", [(fn, weak) for fn, _, weak, _, _ in out])
        write_manifest(tmp / f"{split}_true.tsv", [(fn, true) for fn, true, *_ in out])
        with open(tmp / f"strong_{split}.tsv", "w") as f:
            f.write("filename\tonset\toffset\tlabel\n")
            for fn, _, _, events, _ in out:
                f.writelines(f"{fn}\t{on:.3f}\t{off:.3f}\t{child_mid(*CHILDREN[l])}\n" for on, off, l in events)
        stats = {k: sum(s.get(k, 0) for *_, s in out) for k in ("missed_short", "type1", "type2", "spurious")}
        summary["splits"][split] = {"clips": len(out), "noisy_labels": noisy, **stats}
        if not quiet:
            print(f"synth: {split}: {len(out)} clips", flush=True)
    return finish_build(tmp, root, "synth.json", summary)


def corpus_summary(root: str | Path = SYNTH_ROOT) -> str:
    """Per-class clip counts per split, and label-noise statistics against the true labels."""
    root = Path(root)
    labels = read_class_labels(root / "class_labels_indices.csv")
    meta = json.loads((root / "synth.json").read_text()) if (root / "synth.json").exists() else None
    splits = [s for s in ("balanced_train", "unbalanced_train", "valid", "eval") if (root / f"{s}.tsv").exists()]
    counts = {s: multi_hot(read_manifest(root / f"{s}.tsv"), labels).sum(0).astype(int) for s in splits}
    lines = [f"corpus {root}: {len(labels)} classes"]
    lines.append(f"{'class':34s}" + "".join(f"{s[:12]:>14s}" for s in splits))
    for k, name in enumerate(labels.names):
        lines.append(f"{name[:34]:34s}" + "".join(f"{counts[s][k]:14d}" for s in splits))
    for s in splits:
        rows = read_manifest(root / f"{s}.tsv")
        line = f"{s}: {len(rows)} clips, {sum(len(m) for _, m in rows) / len(rows):.2f} labels/clip"
        if (root / f"{s}_true.tsv").exists():
            weak = multi_hot(rows, labels)
            true = multi_hot(read_manifest(root / f"{s}_true.tsv"), labels)
            tp = (weak * true).sum()
            line += f", label precision {tp / weak.sum():.3f}, recall {tp / true.sum():.3f} vs true labels"
        if meta and s in meta["splits"]:
            st = meta["splits"][s]
            if st["noisy_labels"]:
                line += (f"; injected: {st['type1']} Type I, {st['type2']} Type II, "
                         f"{st['missed_short']} missed short events, {st['spurious']} spurious")
        lines.append(line)
    return "\n".join(lines)



# =============================================================================================
# Novel sound families for the downstream tasks: none of these generators, and none of their
# frequency ranges or temporal patterns, occurs in the upstream corpus above
# =============================================================================================
NOVEL = [("bell", "Bell (inharmonic partials, decaying)"), ("pluck", "Plucked string, 70-160 Hz"),
         ("engine", "Engine (25-45 Hz buzz, throbbing)"), ("rain", "Rain (random grains above 2 kHz)"),
         ("buzzer", "Buzzer (square wave, 60-120 Hz)"), ("whistle", "Whistle (4.5-7 kHz glide)"),
         ("bird", "Bird (fast 6->3 kHz down-sweeps)"), ("wind", "Wind (slow gusts, moving band)"),
         ("cricket", "Cricket (4-5 kHz pulse trains)"), ("bubbles", "Bubbles (fast up-blips)")]


def novel_event(k: int, dur: float, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    """One event of novel family k (index into NOVEL), unit peak."""
    n = max(int(dur * sr), 16)
    t = np.arange(n) / sr
    name = NOVEL[k][0]
    if name == "bell":
        f = rng.uniform(400, 1200)
        x = sum(a * np.sin(2 * np.pi * f * r * t) for a, r in zip((1, .6, .4, .25), (1, 2.76, 5.40, 8.93))
                if f * r < sr / 2) * np.exp(-t / rng.uniform(.3, 1.0))
    elif name == "pluck":  # Karplus-Strong: a noise burst through a damped comb filter
        lag = int(sr / rng.uniform(70, 160))
        a = np.zeros(lag + 2)
        a[0], a[lag], a[lag + 1] = 1.0, -.498, -.498
        exc = np.zeros(n)
        exc[:lag] = rng.uniform(-1, 1, min(lag, n))
        x = lfilter([1.0], a, exc)
    elif name == "engine":
        f0 = rng.uniform(25, 45) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(.2, .5) * t))
        x = _harmonics(f0, sr, [1 / k for k in range(1, 40)]) * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(6, 12) * t))
        x = x / np.abs(x).max() + 0.3 * _band_noise(rng, n, 20, 300, sr) / 0.05
    elif name == "rain":
        x = np.zeros(n)
        hits = rng.integers(0, n, int(dur * rng.uniform(150, 400)))
        np.add.at(x, hits, rng.lognormal(0, .7, len(hits)) * rng.choice([-1, 1], len(hits)))
        x = lfilter([1.0], [1, -.6], x)
        x = x - lfilter([.02], [1, -.98], x)  # high-pass: grains, no rumble
    elif name == "buzzer":
        f0 = rng.uniform(60, 120) * (1 + 0.01 * t)
        x = _harmonics(f0, sr, [1 / k if k % 2 else 0 for k in range(1, 60)])
    elif name == "whistle":
        f0 = rng.uniform(4500, 6500) * (1 + rng.uniform(-.05, .05) * t / max(dur, 1e-3))
        x = _harmonics(f0, sr, [1])
    elif name == "bird":
        x = np.zeros(n)
        rate, m = rng.uniform(6, 12), int(rng.uniform(.04, .08) * sr)
        tt = np.arange(m) / sr
        chirp = np.sin(2 * np.pi * np.cumsum(6000 * (0.5 ** (tt / tt[-1]))) / sr) * np.hanning(m)
        for s in range(0, n - m, int(sr / rate)):
            x[s: s + m] += chirp * rng.uniform(.5, 1)
    elif name == "wind":
        g = 2 * np.pi * rng.uniform(.1, .4) * t + rng.uniform(0, 2 * np.pi)
        lo, hi = _band_noise(rng, n, 200, 500, sr), _band_noise(rng, n, 600, 1200, sr)
        x = (lo * (1 + np.sin(g)) + hi * (1 - np.sin(g))) * (1.2 + np.sin(0.7 * g + 1))
    elif name == "cricket":
        carrier = np.sin(2 * np.pi * rng.uniform(4000, 5000) * t)
        gate = np.sin(2 * np.pi * rng.uniform(30, 60) * t) > 0
        period, on = rng.uniform(.5, 1.0), rng.uniform(.2, .35)
        x = carrier * gate * ((t % period) < on)
    else:  # bubbles: short rising blips at random times
        x = np.zeros(n)
        for s in np.sort(rng.integers(0, n, max(1, int(dur * rng.uniform(5, 20))))):
            m = min(int(rng.uniform(.01, .03) * sr), n - s)
            tt = np.arange(m) / sr
            f = rng.uniform(250, 400) * np.exp(np.log(rng.uniform(3, 5)) * tt / max(tt[-1], 1e-4)) if m > 1 else np.ones(m)
            x[s: s + m] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-tt / .01)
    fade = min(int(0.01 * sr), n // 2)
    env = np.ones(n)
    env[:fade], env[n - fade:] = np.linspace(0, 1, fade), np.linspace(1, 0, fade)
    x = np.asarray(x, dtype=np.float64) * env
    return x / (np.abs(x).max() + 1e-9)


# =============================================================================================
# Synthetic speech: a source-filter synthesiser of phones, speakers and words
# =============================================================================================
# kind V vowel, N nasal, L liquid (voiced, formants in Hz); F fricative, P plosive (noise band in Hz)
PHONES = {"a": ("V", (730, 1090, 2440)), "i": ("V", (270, 2290, 3010)), "u": ("V", (300, 870, 2240)),
          "e": ("V", (530, 1840, 2480)), "o": ("V", (570, 840, 2410)), "m": ("N", (250, 1100, 2200)),
          "n": ("N", (250, 1700, 2600)), "l": ("L", (360, 1300, 2900)), "r": ("L", (420, 1300, 1600)),
          "s": ("F", (4500, 7500)), "sh": ("F", (2200, 3800)), "f": ("F", (1200, 7000)),
          "p": ("P", (400, 1500)), "t": ("P", (3500, 6500)), "k": ("P", (1500, 3000))}
DURATION = {"V": (.09, .16), "N": (.06, .09), "L": (.05, .08), "F": (.08, .13), "P": (.06, .09)}
LEVEL = {"V": 1.0, "N": .35, "L": .6, "F": .25, "P": .3}
# Ten keywords in five pairs with the same phones in another order (CVCV: no word is another
# reversed, which would be VCVC); all have the same shape, so only phone content and order tell them apart
KEYWORDS = ["sami", "misa", "kuto", "toku", "nefa", "fane", "lori", "rilo", "pesu", "supe"]
CONSONANTS, VOWELS = ["m", "n", "l", "r", "s", "sh", "f", "p", "t", "k"], ["a", "i", "u", "e", "o"]


def split_phones(word: str) -> list[str]:
    out, i = [], 0
    while i < len(word):
        step = 2 if word[i: i + 2] == "sh" else 1
        out.append(word[i: i + step])
        i += step
    return out


@dataclass
class Speaker:
    f0: float        # mean pitch (Hz)
    scale: float     # formant scaling (vocal-tract length)
    tilt: float      # glottal-pulse low-pass (higher = darker voice)
    breath: float    # aspiration noise mixed into the voice source
    rate: float      # speaking rate (phone durations divided by this)
    bw: float        # formant bandwidth multiplier

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Speaker":
        return cls(float(np.exp(rng.uniform(np.log(85), np.log(260)))), float(rng.uniform(.85, 1.2)),
                   float(rng.uniform(.6, .95)), float(rng.uniform(0, .3)), float(rng.uniform(.8, 1.25)),
                   float(rng.uniform(.7, 1.5)))


def _resonators(x: np.ndarray, formants, bw: float, sr: int) -> np.ndarray:
    """Cascade of second-order resonators (Klatt-style), unit gain at DC-ish."""
    for k, f in enumerate(formants):
        if f >= sr / 2 - 200:
            continue
        r = np.exp(-np.pi * (60 + 40 * k) * bw / sr)
        a = [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
        x = lfilter([sum(a)], a, x)
    return x


def synth_phone(ph: str, spk: Speaker, rng: np.random.Generator, f0: float, sr: int = SR) -> np.ndarray:
    kind, spec = PHONES[ph]
    n = int(rng.uniform(*DURATION[kind]) / spk.rate * sr)
    if kind in "VNL":
        f = f0 * (1 + 0.01 * rng.standard_normal()) * (1 - 0.1 * np.arange(n) / sr)  # slight declination
        phase = np.cumsum(f / sr)
        src = np.diff(np.floor(phase), prepend=np.floor(phase[0])).astype(np.float64)  # one pulse per period
        src = lfilter([1 - spk.tilt], [1, -spk.tilt], src) + spk.breath * 0.05 * rng.standard_normal(n)
        x = _resonators(src, [fm * spk.scale for fm in spec], spk.bw, sr)
    elif kind == "F":
        x = _band_noise(rng, n, spec[0] * spk.scale ** .5, min(spec[1] * spk.scale ** .5, 7900), sr)
    else:  # plosive: closure (silence), burst, aspiration
        x = np.zeros(n)
        b = int(.025 * sr)
        x[n - b:] = _band_noise(rng, b, spec[0] * spk.scale ** .5, spec[1] * spk.scale ** .5, sr) * np.exp(-np.arange(b) / (.006 * sr))
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-9) * LEVEL[kind]


def synth_speech(phones: list[str], spk: Speaker, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    """Phones overlap-added with 10 ms cross-fades (coarticulation in miniature); unit peak."""
    f0 = spk.f0 * rng.uniform(.93, 1.07)
    fade = int(.01 * sr)
    out = np.zeros(0)
    for ph in phones:
        seg = synth_phone(ph, spk, rng, f0, sr)
        w = np.ones(len(seg))
        m = min(fade, len(seg) // 2)
        w[:m], w[len(seg) - m:] = np.linspace(0, 1, m), np.linspace(1, 0, m)
        seg = seg * w
        if len(out) >= m and m:
            out[len(out) - m:] += seg[:m]
            out = np.concatenate([out, seg[m:]])
        else:
            out = np.concatenate([out, seg])
        f0 *= rng.uniform(.97, 1.02)
    return out / (np.abs(out).max() + 1e-9)


def random_syllables(rng: np.random.Generator, n: int) -> list[str]:
    return [p for _ in range(n) for p in (CONSONANTS[rng.integers(len(CONSONANTS))], VOWELS[rng.integers(len(VOWELS))])]


def unknown_words(seed: int, count: int = 30) -> list[str]:
    """CVCV words that are not keywords (near-misses included): the `_unknown_` class."""
    rng = np.random.default_rng([seed, 4242])
    words: list[str] = []
    while len(words) < count:
        w = "".join(random_syllables(rng, 2))
        if w not in KEYWORDS and w not in words:
            words.append(w)
    return words


# =============================================================================================
# The downstream tasks: manifest (filename, labels, fold) + a tasks.json entry each
# =============================================================================================
TASKS_VERSION = 3  # bump when a task's generator changes: common.ensure_synthetic_tasks rebuilds
TASKS = {  # name: (type, metric, kfold, folds or splits, clip seconds, max training seconds, what it tests)
    "sound_novel": ("single", "accuracy", True, ["1", "2", "3", "4", "5"], 5.0, 5.0,
                    "ESC-50-like; 10 sound families the upstream corpus never contains"),
    "tagging": ("multi", "mAP", False, ["train", "valid", "test"], 5.0, 5.0,
                "FSD50K-like; the 24 upstream leaf classes + the 10 novel families, 1-4 events per clip"),
    "keywords": ("single", "accuracy", False, ["train", "valid", "test"], 1.0, 1.0,
                 "Speech-Commands-like (SCV1/11): 10 CVCV words + _unknown_, 100 speakers, test speakers unseen"),
    "speaker": ("single", "accuracy", False, ["train", "valid", "test"], None, 4.0,
                "VoxCeleb-like identification of 40 speakers from 2-3.5 s of random syllables; test utterances unseen"),
}
TASK_ORDER = list(TASKS)


def _background(rng: np.random.Generator, n: int, lo_db: float, hi_db: float) -> np.ndarray:
    bg = np.convolve(rng.standard_normal(n), np.exp(-np.arange(64) / 16.0), mode="same")
    return bg / (np.abs(bg).max() + 1e-9) * 10 ** (rng.uniform(lo_db, hi_db) / 20)


def _add_novel(x: np.ndarray, k: int, rng: np.random.Generator, dur: float, lo_db: float, hi_db: float) -> None:
    dur = min(dur, len(x) / SR)
    s = int(rng.uniform(0, len(x) / SR - dur) * SR)
    ev = novel_event(k, dur, rng) * 10 ** (rng.uniform(lo_db, hi_db) / 20)
    x[s: s + len(ev)] += ev[: len(x) - s]


def _task_clip(args) -> str:
    """Generate and write one clip of a task (a worker job; deterministic in (seed, task, index))."""
    root, task, idx, spec, seed = args
    rng = np.random.default_rng([seed, 5000 + TASK_ORDER.index(task), idx])
    if task == "sound_novel":  # one novel event over background; half the clips with an upstream distractor
        x = _background(rng, int(5 * SR), -45, -30)
        _add_novel(x, spec, rng, rng.uniform(1.0, 5.0), -20, -3)
        if rng.random() < 0.5:
            _add_event(x, int(rng.integers(len(CHILDREN))), rng, 5.0, -24.0)
    elif task == "tagging":  # events of upstream leaves (< 24) or novel families (>= 24)
        x = _background(rng, int(5 * SR), -55, -45)
        for c in spec:
            if c < len(CHILDREN):
                _add_event(x, c, rng, 5.0, -20.0)
            else:
                _add_novel(x, c - len(CHILDREN), rng, rng.uniform(.5, 3.0), -20, -6)
    elif task == "keywords":  # spec = (word, speaker seed)
        word, spk = spec
        w = synth_speech(split_phones(word), Speaker.sample(np.random.default_rng(spk)), rng)[:SR]
        x = _background(rng, SR, -45, -25)
        s = int(rng.uniform(0, max(SR - len(w), 1)))
        x[s: s + len(w)] += w * 10 ** (rng.uniform(-10, -1) / 20)
    else:  # speaker: random words of 2-4 syllables with short pauses, 2-3.5 s in all
        spk = Speaker.sample(np.random.default_rng(spec))
        target = int(rng.uniform(2.0, 3.5) * SR)
        parts = []
        while sum(len(p) for p in parts) < target:
            parts += [synth_speech(random_syllables(rng, int(rng.integers(2, 5))), spk, rng),
                      np.zeros(int(rng.uniform(.05, .2) * SR))]
        speech = np.concatenate(parts)[:target]
        x = _background(rng, target, -50, -30) + speech * 10 ** (rng.uniform(-8, -1) / 20)
    x /= max(1.0, np.abs(x).max() / 0.99)
    fn = f"{task}/audio/{task}_{idx:05d}.wav"
    sf.write(str(Path(root) / fn), x.astype(np.float32), SR, subtype="PCM_16")
    return fn


def task_items(task: str, scale: float, seed: int) -> tuple[list[str], list[tuple[object, list[str], str]]]:
    """(class vocabulary, [(generator spec, labels, fold)]) of a task: deterministic, no audio."""
    n = lambda base: max(1, round(base * scale))  # noqa: E731
    if task == "sound_novel":  # 10 classes x 50 clips (scale 1), folds 1-5 balanced per class
        classes = [k for k, _ in NOVEL]
        return classes, [(k, [classes[k]], str(i % 5 + 1)) for k in range(len(NOVEL)) for i in range(max(5, n(50)))]
    if task == "tagging":  # 34 classes; first event cycles through the classes, the rest from a Zipf prior
        classes = [f"/synth/p{p}c{c}" for p, c in CHILDREN] + [k for k, _ in NOVEL]
        rng = np.random.default_rng([seed, 6001])
        zipf = 1.0 / np.arange(1, len(classes) + 1) ** 1.0
        zipf = zipf[np.argsort(rng.permutation(len(classes)))] / zipf.sum()
        splits = ["train"] * 12 + ["valid"] * 3 + ["test"] * 5
        items = []
        for i in range(max(len(classes), n(600))):
            spec = sorted({i % len(classes), *rng.choice(len(classes), int(rng.integers(0, 4)), p=zipf).tolist()})
            items.append((spec, [classes[c] for c in spec], splits[i % 20]))
        return classes, items
    if task == "keywords":  # 10 words + _unknown_ x 200 clips; speakers 70/15/15 per split
        classes = KEYWORDS + ["_unknown_"]
        spk = {s: [[seed, 7000, k, j] for j in range(m)] for k, (s, m) in enumerate((("train", 70), ("valid", 15), ("test", 15)))}
        rng = np.random.default_rng([seed, 6002])
        unknown = unknown_words(seed)
        items = []
        for c, label in enumerate(classes):
            for i in range(max(20, n(200))):
                split = (["train"] * 14 + ["valid"] * 3 + ["test"] * 3)[i % 20]
                word = label if label != "_unknown_" else unknown[rng.integers(len(unknown))]
                items.append(((word, spk[split][rng.integers(len(spk[split]))]), [label], split))
        return classes, items
    if task == "speaker":  # 40 speakers x 20 utterances: 14 train / 3 valid / 3 test each (scale 1)
        classes, u = [f"spk{s:02d}" for s in range(40)], max(5, n(20))
        held = max(1, round(.15 * u))
        splits = ["train"] * (u - 2 * held) + ["valid"] * held + ["test"] * held
        return classes, [([seed, 7100, s], [classes[s]], splits[i]) for s in range(len(classes)) for i in range(u)]
    raise DataError(f"unknown synthetic task {task!r}; expected one of {TASK_ORDER}")


def make_task(root: str | Path, task: str, scale: float = 1.0, seed: int = 0, workers: int = 2) -> dict:
    """Write one task's audio, manifest and tasks.json entry under root; print its summary line."""
    t0 = time.time()
    root = Path(root)
    kind, metric, kfold, folds, clip_s, max_s, what = TASKS[task]
    classes, items = task_items(task, scale, seed)
    (root / task / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), task, i, spec, seed) for i, (spec, _, _) in enumerate(items)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            files = pool.map(_task_clip, jobs, chunksize=16)
    else:
        files = [_task_clip(j) for j in jobs]
    rows = [(fn, labels, fold) for fn, (_, labels, fold) in zip(files, items)]
    entry = write_task(root, task, rows, classes, type=kind, metric=metric, kfold=kfold, folds=folds,
                       sample_rate=SR, max_seconds=max_s, clip_seconds=clip_s, description=what,
                       domain="speech" if task in ("keywords", "speaker") else "sound",
                       build_seconds=round(time.time() - t0, 1))
    counts = {f: sum(r[2] == f for r in rows) for f in folds}
    print(f"synthetic task {task}: {len(rows)} clips, {len(classes)} classes, {kind}-label, metric {metric}, "
          f"{'folds' if kfold else 'splits'} " + " ".join(f"{f}={c}" for f, c in counts.items())
          + f" ({entry['build_seconds']} s)", flush=True)
    return entry


def make_synthetic_tasks(root: str | Path = TASKS_ROOT, scale: float = 1.0, seed: int = 0, workers: int = 2,
                         tasks: list[str] | None = None) -> Path:
    """All synthetic tasks in a fresh folder, swapped in whole; a stamp records (version, seed, scale).
    An existing `root` is replaced only if it holds tasks made here (synth_tasks.json) or is empty."""
    root = Path(root)
    tmp = refuse_foreign_folder(root, "synth_tasks.json")
    for task in tasks or TASK_ORDER:
        make_task(tmp, task, scale, seed, workers)
    return finish_build(tmp, root, "synth_tasks.json", {"version": TASKS_VERSION, "seed": seed, "scale": scale,
                                                        "tasks": tasks or TASK_ORDER})


# =============================================================================================
# The unlabelled stream: clips generated on the fly (conformer_ssl.py's pre-training pool)
# =============================================================================================
def stream_clip(seed: int, j: int, clip_seconds: float = 10.0, speech: float = 0.0) -> np.ndarray:
    """Clip j of the unlabelled stream: like an upstream clip (background + 1-5 events of the 24
    leaves, uniform prior), plus, with probability `speech`, a synthetic utterance. float32 at SR."""
    rng = np.random.default_rng([seed, 8000, j])
    n = int(clip_seconds * SR)
    x = _background(rng, n, -55, -45)
    for _ in range(int(rng.integers(1, 6))):
        _add_event(x, int(rng.integers(len(CHILDREN))), rng, clip_seconds, -24.0)
    if rng.random() < speech:
        s = synth_speech(random_syllables(rng, int(rng.integers(3, 12))), Speaker.sample(rng), rng)[:n]
        on = int(rng.uniform(0, n - len(s) + 1))
        x[on: on + len(s)] += s * 10 ** (rng.uniform(-12, -3) / 20)
    x /= max(1.0, np.abs(x).max() / 0.99)
    return x.astype(np.float32)


class SyntheticStream(torch.utils.data.IterableDataset):
    """Unlabelled synthetic clips generated on the fly (see synthetic_stream)."""

    def __init__(self, seed: int = 0, pool_size: int | None = None, clip_seconds: float = 10.0, sr: int = SR,
                 speech: float = 0.0, limit: int | None = None, rank: int | None = None, world: int | None = None):
        self.seed, self.pool_size, self.clip_seconds, self.sr = seed, pool_size, clip_seconds, sr
        self.speech, self.limit, self.rank, self.world = speech, limit, rank, world

    def clip_ids(self):
        """The clip indices this (rank, worker) draws: global worker g of G takes g, g+G, g+2G, ...
        (modulo pool_size for a finite pool), so workers and ranks never draw the same clip."""
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        r = rank() if self.rank is None else self.rank
        w = world_size() if self.world is None else self.world
        j, step, n = r * nw + wid, w * nw, 0
        while self.limit is None or n < self.limit:
            yield j % self.pool_size if self.pool_size else j
            j, n = j + step, n + 1

    def __iter__(self):
        for j in self.clip_ids():
            x = stream_clip(self.seed, j, self.clip_seconds, self.speech)
            yield torch.from_numpy(resample(x, SR, self.sr))


def synthetic_stream(seed: int = 0, pool_size: int | None = None, clip_seconds: float = 10.0, sr: int = SR,
                     **kw) -> SyntheticStream:
    """A seeded IterableDataset of unlabelled float32 waves (clip_seconds*sr,) from the upstream
    corpus's generators. pool_size=N cycles N distinct clips (clip j is identical whenever it
    recurs); None is unbounded. Worker- and DDP-aware. Extras: speech (probability of adding a
    synthetic utterance), limit (clips per (rank, worker) per pass), rank/world (override)."""
    return SyntheticStream(seed, pool_size, clip_seconds, sr, **kw)


# =============================================================================================
# A difficulty check: linear probes on log-mel statistics with and without temporal order
# =============================================================================================
def probe(root: str | Path, tasks: list[str] | None = None) -> dict:
    """Test-split score of a logistic-regression probe on (a) the clip's mean + std log-mel (no
    order) and (b) the means of its four quarters (coarse order); first split of k-fold tasks."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    import common
    fe, out = common.LogMel.preset("psl"), {}
    for name in tasks or common.list_tasks(root):
        task = common.read_task(root, name)
        _, train, _, test = common.task_splits(task)[0]
        mels = {r[0]: fe(torch.from_numpy(common.load_audio(task.root / r[0]))[None])[0] for r in train + test}
        for kind in ("mean+std", "quarters"):
            def feats(rows):
                if kind == "mean+std":
                    return np.stack([torch.cat([mels[r[0]].mean(1), mels[r[0]].std(1)]).numpy() for r in rows])
                return np.stack([torch.cat([q.mean(1) for q in mels[r[0]].chunk(4, 1)]).numpy() for r in rows])
            xtr, xte = feats(train), feats(test)
            mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
            ytr = task.targets(train)
            clf = LogisticRegression(max_iter=2000, C=0.1)
            if task.type == "multi":
                score = OneVsRestClassifier(clf).fit((xtr - mu) / sd, ytr).predict_proba((xte - mu) / sd)
            else:
                fit = clf.fit((xtr - mu) / sd, ytr.argmax(1))
                score = np.zeros((len(test), len(task.classes)))
                score[:, fit.classes_] = fit.predict_proba((xte - mu) / sd)
            out[f"{name}/{kind}"] = round(common.task_score(task.metric, task.targets(test), score), 3)
            print(f"probe {name} ({task.metric}, {kind}): {out[f'{name}/{kind}']}", flush=True)
    return out


# =============================================================================================
# Command line
# =============================================================================================
def main(argv=None) -> None:
    F = HelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=F)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("corpus", help="generate the upstream corpus and print its summary", formatter_class=F,
                       description="Generate the synthetic upstream corpus (our AudioSet layout) and print its summary.")
    s.add_argument("--root", default=str(SYNTH_ROOT), help="corpus folder to write")
    s.add_argument("--scale", type=float, default=1.0, help="corpus size: 1.0 = ~1,600 clips (every split scaled)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (a different seed: another corpus)")
    s.add_argument("--clip-seconds", type=float, default=10.0, help="clip length in seconds")
    s.add_argument("--workers", type=int, default=2, help="processes writing clips")
    s = sub.add_parser("summary", help="print a corpus's per-class counts and label-noise statistics", formatter_class=F,
                       description="Print a corpus's per-class counts and label-noise statistics.")
    s.add_argument("--root", default=str(SYNTH_ROOT), help="corpus folder to read")
    s = sub.add_parser("tasks", help="generate the synthetic downstream tasks (one summary line each)", formatter_class=F,
                       description="Generate the synthetic downstream tasks (sound_novel, tagging, keywords, speaker).")
    s.add_argument("--root", default=str(TASKS_ROOT), help="task root to write (tasks.json + one folder per task)")
    s.add_argument("--scale", type=float, default=1.0, help="task size: 1.0 = the default sizes")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--workers", type=int, default=2, help="processes writing clips")
    s.add_argument("--only", nargs="+", choices=TASK_ORDER, default=None, help="build only these tasks")
    s = sub.add_parser("probe", help="linear-probe scores of the tasks (a difficulty check)", formatter_class=F,
                       description="Linear-probe scores of the tasks on fixed log-mel statistics: how hard each task is.")
    s.add_argument("--root", default=str(TASKS_ROOT), help="task root to read")
    s.add_argument("--only", nargs="+", default=None, help="probe only these tasks")
    a = p.parse_args(argv)
    t = time.time()
    if a.cmd == "corpus":
        make_synthetic_corpus(a.root, scale=a.scale, seed=a.seed, clip_seconds=a.clip_seconds, workers=a.workers)
        print(f"generated in {time.time() - t:.1f} s")
        print(corpus_summary(a.root))
    elif a.cmd == "summary":
        print(corpus_summary(a.root))
    elif a.cmd == "probe":
        probe(a.root, a.only)
    else:
        make_synthetic_tasks(a.root, scale=a.scale, seed=a.seed, workers=a.workers, tasks=a.only)
        print(f"generated in {time.time() - t:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
