"""Tests: common.py against independent references, then psl.py and psla.py: their components
against hand-computed cases and an end-to-end run of every stage on a tiny synthetic corpus.

    python -m pytest -q test_all.py
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pickle
import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import average_precision_score, label_ranking_average_precision_score, roc_auc_score

import common as C
import ofa_aec
import psl
import psla

torch.set_num_threads(2)


# =============================================================================================
# Fixtures: one tiny synthetic corpus shared by every test that needs data
# =============================================================================================
@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """~160 clips of 4 s: 1 clip per leaf class in balanced/valid/eval, 90 Zipf clips."""
    root = tmp_path_factory.mktemp("data") / "synth"
    return C.make_synthetic_corpus(root, scale=0.1, seed=0, clip_seconds=4.0, workers=1, quiet=True)


HERE = Path(__file__).resolve().parent


def run_cli(script: str, *args, env: dict | None = None, nproc: int = 1, timeout: float = 300,
            check: bool = True):
    """Run `python <script> args` in a real subprocess (1 thread); nproc > 1: under torchrun with that
    many gloo processes. Returns the CompletedProcess (stdout + stderr in .stdout)."""
    import subprocess
    import sys
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    e.pop("KILL_AT", None) if not env or "KILL_AT" not in env else None
    cmd = [sys.executable, str(HERE / script), *map(str, args)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         str(HERE / script), *map(str, args)]
    r = subprocess.run(cmd, env=e, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}"
    return r


def killed_then_resumed(script: str, args: list, kill_at: str, timeout: float = 300):
    """Run `script args` with KILL_AT=<point>:<n> (common.kill_point SIGKILLs it there), check it died by
    SIGKILL, then run the same command again (the documented resume: the same command) to the end."""
    r = run_cli(script, *args, env={"KILL_AT": kill_at}, check=False, timeout=timeout)
    assert r.returncode in (-9, 137), f"{kill_at}: expected a SIGKILL, exit {r.returncode}:\n{r.stdout[-3000:]}"
    return run_cli(script, *args, timeout=timeout)


def leftovers(folder: Path) -> list[Path]:
    """Temp files a kill may leave (none may remain after the resumed run)."""
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]


def sine(freq: float, sr: int, seconds: float = 1.0) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr).astype(np.float32)


# =============================================================================================
# Audio I/O and manifests
# =============================================================================================
@pytest.mark.parametrize("orig_sr", [44100, 48000, 8000, 22050])
def test_resample_keeps_frequency(orig_sr):
    y = C.resample(sine(1000, orig_sr), orig_sr, C.SR)
    assert abs(len(y) - C.SR) <= 1
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spec) * C.SR / len(y) - 1000) <= 1.0


def test_load_audio_mixes_down_and_resamples(tmp_path):
    s = sine(1000, 44100)
    sf.write(tmp_path / "st.wav", np.stack([s, 0.5 * s], 1), 44100, subtype="FLOAT")
    y = C.load_audio(tmp_path / "st.wav")
    ref = C.resample(0.75 * s, 44100, C.SR)
    assert len(y) == len(ref) and np.allclose(y, ref, atol=1e-4)
    sf.write(tmp_path / "m.flac", s[:4410], 44100)
    assert len(C.load_audio(tmp_path / "m.flac")) == 1600


def test_load_audio_partial_read(tmp_path):
    x = np.arange(C.SR * 3, dtype=np.float32) / (C.SR * 3)
    sf.write(tmp_path / "r.wav", x, C.SR, subtype="FLOAT")
    assert np.allclose(C.load_audio(tmp_path / "r.wav", start_s=1.0, end_s=2.0), x[C.SR: 2 * C.SR])


def test_bad_input_errors_name_the_file_or_row(tmp_path):
    with pytest.raises(C.DataError, match="nope.wav: audio file not found"):
        C.load_audio(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio")
    with pytest.raises(C.DataError, match="junk.wav: cannot read audio"):
        C.load_audio(tmp_path / "junk.wav")
    (tmp_path / "empty.tsv").write_text("filename\tlabels\n")
    with pytest.raises(C.DataError, match="empty.tsv: empty manifest"):
        C.read_manifest(tmp_path / "empty.tsv")
    labels = C.Labels(["/m/a", "/m/b"], ["A", "B"])
    with pytest.raises(C.DataError, match=r"row 2 \(y.wav\): unknown label id '/m/zz'"):
        C.multi_hot([("x.wav", ["/m/a"]), ("y.wav", ["/m/b", "/m/zz"])], labels, "t.tsv")


def test_manifest_roundtrip_and_multi_hot(tmp_path):
    rows = [("a.wav", ["/m/b"]), ("b.wav", ["/m/a", "/m/b"])]
    C.write_manifest(tmp_path / "m.tsv", rows)
    assert C.read_manifest(tmp_path / "m.tsv") == rows
    y = C.multi_hot(rows, C.Labels(["/m/a", "/m/b"], ["A", "B"]))
    assert y.tolist() == [[0, 1], [1, 1]]


def test_audioset_metadata_and_ontology():
    labels = C.read_class_labels(C.AUDIOSET_META / "class_labels_indices.csv")
    assert len(labels) == 527 and labels.names[0] == "Speech" and labels.index["/m/09x0r"] == 0
    onto = C.read_ontology(C.AUDIOSET_META / "ontology.json")
    assert len(onto.names) == 632
    # Rimshot < Snare drum < Drum < Percussion < Musical instrument < Music (README of shared/data)
    rimshot = next(m for m, n in onto.names.items() if n == "Rimshot")
    assert {"Snare drum", "Drum", "Percussion", "Musical instrument", "Music"} <= {onto.names[a] for a in onto.ancestors(rimshot)}


def test_sample_300h_caps_per_label():
    labels = C.Labels(["/a", "/b"], ["a", "b"])
    bal = [("b0", ["/a"])]
    unbal = [(f"u{i}", ["/a"]) for i in range(10)] + [(f"v{i}", ["/b"]) for i in range(3)]
    rows = C.sample_300h(bal, unbal, labels, per_label=4)
    assert rows[0] == bal[0] and len(rows) == 1 + 4 + 3


def test_load_corpus_300h_without_its_manifest(tiny_root):
    """--data 300h on a root without 300h_train.tsv samples it at run time, from common.py alone
    (regression: sample_300h had moved to data/prepare.py and load_corpus raised NameError)."""
    assert not (tiny_root / "300h_train.tsv").exists()
    corpus = C.load_corpus(str(tiny_root), "300h")
    balanced = C.read_manifest(tiny_root / "balanced_train.tsv")
    assert corpus.train[:len(balanced)] == balanced and len(corpus.train) > len(balanced)


# =============================================================================================
# Datasets and loaders
# =============================================================================================
def test_segment_bounds_last_partial_chunk():
    assert C.segment_bounds(10.0, 2.0) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert C.segment_bounds(10.0, 3.0) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # last one shorter
    assert C.segment_bounds(1.5, 2.0) == [(0, 1.5)]


def test_datasets_and_collate(tiny_root, tmp_path):
    corpus = C.load_corpus(str(tiny_root))
    rows = corpus.eval[:3] + [("missing.wav", corpus.eval[0][1])]
    y = corpus.targets(rows)
    clips = C.ClipDataset(tiny_root, rows, y, clip_seconds=4.0)
    with pytest.warns(UserWarning, match="missing.wav"):
        batch = C.pad_collate([clips[i] for i in range(4)])
    assert batch[0].shape == (3, 4 * C.SR) and batch[2].tolist() == [0, 1, 2]  # the bad clip is dropped
    segs = C.SegmentDataset(tiny_root, rows[:2], y[:2], segment_seconds=3.0, clip_seconds=4.0)
    assert [(c, s, e) for c, s, e in segs.chunks] == [(0, 0, 3), (0, 3, 4), (1, 0, 3), (1, 3, 4)]
    wave, target, idx = C.pad_collate([segs[0], segs[1]])
    assert wave.shape == (2, 3 * C.SR) and wave[1, C.SR:].abs().sum() == 0  # zero-padded to the longest
    full = C.load_audio(tiny_root / rows[0][0])
    assert torch.allclose(wave[1, : C.SR], torch.from_numpy(full[3 * C.SR:]))
    assert torch.equal(target[0], torch.from_numpy(y[0])) and torch.equal(target[1], torch.from_numpy(y[0]))


# =============================================================================================
# The synthetic corpus
# =============================================================================================
def test_synthetic_corpus_is_deterministic(tiny_root, tmp_path):
    again = C.make_synthetic_corpus(tmp_path / "s2", scale=0.1, seed=0, clip_seconds=4.0, workers=2, quiet=True)
    for f in ("balanced_train.tsv", "unbalanced_train.tsv", "eval.tsv", "strong_eval.tsv", "class_labels_indices.csv"):
        assert (again / f).read_bytes() == (tiny_root / f).read_bytes(), f
    fn = C.read_manifest(again / "eval.tsv")[3][0]
    assert (again / fn).read_bytes() == (tiny_root / fn).read_bytes()
    other = C.make_synthetic_corpus(tmp_path / "s3", scale=0.1, seed=1, clip_seconds=4.0, workers=1, quiet=True)
    assert (other / "eval.tsv").read_bytes() != (tiny_root / "eval.tsv").read_bytes() or \
        (other / fn).read_bytes() != (tiny_root / fn).read_bytes()


def test_synthetic_corpus_statistics(tiny_root):
    corpus = C.load_corpus(str(tiny_root), "full")
    assert corpus.synthetic and len(corpus.labels) == 30 and len(corpus.eval) == 24
    # every leaf class anchors one eval clip; eval labels are the true labels
    assert all(dict(corpus.eval)[fn] == corpus.true[fn] for fn, _ in corpus.eval)
    assert corpus.targets(corpus.eval)[:, [corpus.labels.index[C.child_mid(p, c)] for p, c in C.CHILDREN]].max(0).min() == 1
    # true labels = classes of the strong events + their parents
    for fn, true in corpus.eval:
        leaves = {m for *_, m in corpus.strong[fn]}
        assert set(true) == leaves | {m.split("c")[0] for m in leaves}
        assert all(0 <= on < off <= 4.0 for on, off, _ in corpus.strong[fn])
    # training labels are noisy in the documented ways
    weak, true = corpus.targets(corpus.train), corpus.true_targets(corpus.train)
    assert 0.9 < (weak * true).sum() / weak.sum() < 1.0      # a few spurious labels
    assert 0.5 < (weak * true).sum() / true.sum() < 0.9      # many missing labels
    parent = {corpus.labels.index[C.parent_mid(p)]: [corpus.labels.index[C.child_mid(p, c)] for c in range(4)]
              for p in range(6)}
    type1 = sum(((weak[:, p] == 1) & (true[:, ch].sum(1) > 0) & (weak[:, ch].sum(1) == 0)).sum() for p, ch in parent.items())
    type2 = sum(((weak[:, p] == 0) & (weak[:, ch].sum(1) > 0)).sum() for p, ch in parent.items())
    assert type1 > 0 and type2 > 0
    meta = json.loads((tiny_root / "synth.json").read_text())
    assert meta["splits"]["eval"]["noisy_labels"] is False and meta["splits"]["balanced_train"]["type1"] > 0
    # the Zipf split is imbalanced
    counts = C.multi_hot(C.read_manifest(tiny_root / "unbalanced_train_true.tsv"), corpus.labels).sum(0)
    leaf_counts = np.sort(counts[[corpus.labels.index[C.child_mid(p, c)] for p, c in C.CHILDREN]])
    assert leaf_counts[-1] >= 4 * max(leaf_counts[0], 1)
    assert "Type I" in C.corpus_summary(tiny_root)


def test_synthetic_events_have_their_energy_where_designed():
    rng = np.random.default_rng(0)
    def centroid(x):
        s = np.abs(np.fft.rfft(x)) ** 2
        return (np.fft.rfftfreq(len(x), 1 / C.SR) * s).sum() / s.sum()
    low, mid, high = (centroid(C.synth_event(1, c, 1.0, rng)) for c in range(3))  # band noises
    assert 100 < low < 900 < mid < 2600 < high < 6500
    assert abs(centroid(C.synth_event(0, 0, 1.0, np.random.default_rng(1))) - 350) < 120  # low pure tone


def test_synthetic_corpus_is_byte_identical_to_before_the_move(tiny_root):
    """md5 over every tsv/csv/json/wav of the tiny corpus, recorded with the pre-issue-8 common.py."""
    h = hashlib.md5()
    for p in sorted(p for p in tiny_root.rglob("*") if p.suffix in (".tsv", ".wav", ".csv", ".json")):
        h.update(str(p.relative_to(tiny_root)).encode())
        data = p.read_bytes()
        if p.name == "synth.json":  # the stamp's file count (added later) is not part of the corpus
            data = json.dumps({k: v for k, v in json.loads(data).items() if k != "files"}, indent=2).encode()
        h.update(hashlib.md5(data).digest())
    assert h.hexdigest() == "11d579ad94140402e63d428b10d30f70"


def test_generators_never_delete_user_files(tmp_path):
    """A user's folder at the build path <root>.partial, or a user's file put inside a generated corpus or
    task root, is never deleted: the build is refused with one line."""
    gen = C.load_data_module("synthetic")
    partial = tmp_path / "c.partial"
    partial.mkdir()
    (partial / "mine.txt").write_text("keep")
    with pytest.raises(C.DataError, match="not an unfinished build"):
        gen.make_synthetic_corpus(tmp_path / "c", scale=0.02, clip_seconds=1.0, workers=1, quiet=True)
    assert (partial / "mine.txt").read_text() == "keep"
    root = gen.make_synthetic_corpus(tmp_path / "d", scale=0.02, clip_seconds=1.0, workers=1, quiet=True)
    assert not (root / gen.PARTIAL_MARK).exists() and not (tmp_path / "d.partial").exists()
    (root / "audio" / "notes.txt").write_text("keep")
    with pytest.raises(C.DataError, match="now holds .* files, not the"):
        gen.make_synthetic_corpus(root, scale=0.02, seed=1, clip_seconds=1.0, workers=1, quiet=True)
    assert (root / "audio" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("reader,content,match", [
    ("read_manifest", b"\xff\xfe\x00garbage", "not a UTF-8 text manifest"),
    ("read_manifest", b"a,b,c\n", "expected 'filename<TAB>labels'"),
    ("read_class_labels", b"a,b,c\n1,2,3\n", "expected the header 'index,mid,display_name'"),
    ("read_class_labels", b"index,mid,display_name\nx,/m/1,One\n", "a non-integer index"),
    ("read_class_labels", b"\xff\xfe\x00", "not a UTF-8 text class list"),
    ("read_ontology", b'[{"id": "x", ', "not a valid JSON ontology"),
    ("read_ontology", b'{"id": "x"}', "expected AudioSet's ontology format"),
    ("read_strong", b"\xff\xfe\x00", "not a UTF-8 text strong-label file"),
    ("tasks_json", b'{"t": {"type": ', "not a valid JSON task list"),
    ("tasks_json", b'["t"]', "expected {task name"),
])
def test_malformed_metadata_is_one_line(tmp_path, reader, content, match):
    path = tmp_path / ("tasks.json" if reader == "tasks_json" else "meta")
    path.write_bytes(content)
    with pytest.raises(C.DataError, match=match):
        getattr(C, reader)(tmp_path if reader == "tasks_json" else path)


def test_csv_converter_makes_a_task_from_a_users_table(tmp_path):
    """`data/prepare.py csv`: a user's filename,labels,split table -> a task read_task and task_splits use;
    bad tables are one line naming the file and row."""
    prep = C.load_data_module("prepare")
    audio = tmp_path / "clips"
    audio.mkdir()
    for i in range(6):
        sf.write(audio / f"c{i}.wav", np.zeros(800, np.float32), 16000)
    table = tmp_path / "mine.csv"
    table.write_text("Filename,Labels,Split\n" + "".join(
        f"c{i}.wav,{'dog;cat' if i == 0 else ['dog', 'cat'][i % 2]},{['train', 'val', 'eval'][i % 3]}\n"
        for i in range(6)))
    r = run_cli("data/prepare.py", "csv", table, "--audio-root", audio, "--name", "pets", "--multilabel",
                "--out", tmp_path / "tasks")
    assert "pets: 6 clips, 2 classes" in r.stdout
    task = C.read_task(tmp_path / "tasks", "pets")
    assert task.type == "multi" and task.metric == "mAP" and task.classes == ["cat", "dog"] and not task.kfold
    assert task.rows[0] == ("c0.wav", ["dog", "cat"], "train") and task.rows[1][2] == "valid" and task.rows[2][2] == "test"
    assert task.info["domain"] == "sound" and (task.root / "c0.wav").exists()
    (name, train, valid, test), = C.task_splits(task)
    assert (len(train), len(valid), len(test)) == (2, 2, 2)
    folds = tmp_path / "folds.csv"
    folds.write_text("file,label,fold\n" + "".join(f"c{i}.wav,{['dog', 'cat'][i % 2]},{i % 3 + 1}\n" for i in range(6)))
    e = prep.convert_csv(folds, tmp_path / "tasks", audio, "pets_k", domain="speech")
    assert e["kfold"] and e["folds"] == ["1", "2", "3"] and e["type"] == "single" and e["metric"] == "accuracy"
    for text, match in (("a,b,c\nc0.wav,dog,train\n", "expected a header with filename"),
                        ("filename,label,split\nnope.wav,dog,test\n", r"mine.csv:2: .*nope.wav: audio file not found"),
                        ("filename,label,split\nc0.wav,dog\n", "mine.csv:2: expected 3 fields"),
                        ("filename,label,split\nc0.wav,,test\n", "mine.csv:2: bad label field"),
                        ("filename,label,split\nc0.wav,dog,train\n", "needs 'test' rows")):
        table.write_text(text)
        with pytest.raises(C.DataError, match=match) as e:
            prep.convert_csv(table, tmp_path / "t2", audio, "x")
        assert "\n" not in str(e.value)
    r = run_cli("data/prepare.py", "csv", table, "--audio-root", audio, "--name", "x", "--out", tmp_path / "t2",
                check=False)  # the last one from the command line: one line, exit 1
    assert r.returncode == 1 and "needs 'test' rows" in r.stdout and "Traceback" not in r.stdout, r.stdout


def test_converters_never_overwrite_user_manifests(tmp_path):
    prep = C.load_data_module("prepare")
    (tmp_path / "t" / "mytask").mkdir(parents=True)
    (tmp_path / "t" / "mytask" / "mytask.tsv").write_text("the user's")
    with pytest.raises(C.DataError, match="not a task written here"):
        prep.write_task(tmp_path / "t", "mytask", [("a.wav", ["x"], "1")], ["x"], type="single", metric="accuracy",
                        kfold=True, folds=["1"])
    assert (tmp_path / "t" / "mytask" / "mytask.tsv").read_text() == "the user's"
    prep.write_task(tmp_path / "t", "other", [("a.wav", ["x"], "1")], ["x"], type="single", metric="accuracy",
                    kfold=True, folds=["1"])
    prep.write_task(tmp_path / "t", "other", [("b.wav", ["x"], "1")], ["x"], type="single", metric="accuracy",
                    kfold=True, folds=["1"])  # our own task: rewritten
    assert "b.wav" in (tmp_path / "t" / "other" / "other.tsv").read_text()
    (tmp_path / "as").mkdir()
    (tmp_path / "as" / "eval.tsv").write_text("the user's")
    with pytest.raises(C.DataError, match="not written by prepare"):
        prep.prepare(tmp_path, tmp_path, tmp_path / "as")
    assert (tmp_path / "as" / "eval.tsv").read_text() == "the user's"


# =============================================================================================
# prepare (real AudioSet layout)
# =============================================================================================
def test_prepare_from_official_csvs(tmp_path):
    csvs, clips = tmp_path / "csv", tmp_path / "clips"
    csvs.mkdir(), clips.mkdir()
    head = "# Segments csv created Sun Mar  5 10:54:25 2017\n# num_ytids=3\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (csvs / "balanced_train_segments.csv").write_text(
        head + '--4gqARaEJE, 0.000, 10.000, "/m/068hy,/m/07q6cd_"\nYabc_def123, 30.000, 40.000, "/m/09x0r"\nmissing1234, 0.000, 10.000, "/m/09x0r"\n')
    (csvs / "unbalanced_train_segments.csv").write_text(head + 'zzzzzzzzzzz, 0.000, 10.000, "/m/09x0r"\n')
    (csvs / "eval_segments.csv").write_text(head + 'evalclip001, 0.000, 10.000, "/m/09x0r"\n')
    for name in ("Y--4gqARaEJE.wav", "Yabc_def123_30.000.flac", "sub/zzzzzzzzzzz.wav", "evalclip001.ogg"):
        (clips / name).parent.mkdir(exist_ok=True)
        sf.write(clips / name, np.zeros(1600, np.float32), 16000)
    report = C.load_data_module("prepare").prepare(csvs, clips, tmp_path / "out")
    assert report["balanced_train"] == {"rows": 3, "with_audio": 2, "missing_audio": 1}
    corpus = C.load_corpus(str(tmp_path / "out"), "300h")
    assert len(corpus.labels) == 527 and len(corpus.train) == 3 and not corpus.synthetic
    assert corpus.train[0][1] == ["/m/068hy", "/m/07q6cd_"]
    assert len(C.load_audio(corpus.root / corpus.eval[0][0])) == 1600
    in_place = tmp_path / "audioset"  # --out data/audioset: the metadata is already there (no SameFileError)
    in_place.mkdir()
    for f in ("class_labels_indices.csv", "ontology.json"):
        shutil.copy(C.AUDIOSET_META / f, in_place / f)
    assert C.load_data_module("prepare").prepare(csvs, clips, in_place, meta_dir=in_place)["eval"]["with_audio"] == 1


# =============================================================================================
# Front-ends against independent numpy references
# =============================================================================================
def ref_logmel(x: np.ndarray, sr, n_fft, hop, n_mels, top_db=None):
    """Direct DFT per frame + triangles built from the HTK mel formula, in float64."""
    pad = np.pad(x, n_fft // 2, mode="reflect")
    n_frames = 1 + (len(pad) - n_fft) // hop
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    k = np.arange(n_fft // 2 + 1)
    dft = np.exp(-2j * np.pi * np.outer(np.arange(n_fft), k) / n_fft)
    spec = np.array([np.abs((pad[t * hop: t * hop + n_fft] * win) @ dft) ** 2 for t in range(n_frames)])
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    hz = lambda m: 700 * (10 ** (m / 2595) - 1)
    edges = hz(np.linspace(0, mel(sr / 2), n_mels + 2))
    f = k * sr / n_fft
    fb = np.zeros((len(k), n_mels))
    for m in range(n_mels):
        lo, c, hi = edges[m: m + 3]
        fb[:, m] = np.clip(np.minimum((f - lo) / (c - lo), (hi - f) / (hi - c)), 0, None)
    db = 10 * np.log10(np.maximum(spec @ fb, 1e-10)).T
    return np.maximum(db, db.max() - top_db) if top_db else db


def test_logmel_matches_reference_and_known_answer():
    rng = np.random.default_rng(0)
    x = (sine(1000, C.SR, 0.5) * 0.5 + 0.05 * rng.standard_normal(C.SR // 2)).astype(np.float32)
    fe = C.LogMel.preset("psl")
    ours = fe(torch.from_numpy(np.stack([x, x[::-1].copy()]))).numpy()
    ref = ref_logmel(x.astype(np.float64), C.SR, 512, 160, 64, top_db=120)
    assert ours.shape == (2, 64, 51)
    power_ratio = 10 ** ((ours[0] - ref) / 10)  # compare in the power domain: 1e-3 relative
    assert np.abs(power_ratio - 1).max() < 1e-3
    # known answer: the 1 kHz tone lands in the mel band whose centre is nearest 1 kHz
    centres = C.mel_to_hz(np.linspace(0, C.hz_to_mel(8000), 66))[1:-1]
    assert ours[0].mean(1).argmax() == np.abs(centres - 1000).argmin()


def test_logmel_cpu_groups_equal_one_batch():
    """On the CPU LogMel goes through ~10 s of audio at a time (speed); the result, including the
    per-clip top_db floor, must equal each clip computed alone (a loud and a near-silent clip)."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((5, 3 * C.SR)).astype(np.float32))
    x[1] *= 1e-7  # its floor is its own max - 120 dB, not the batch's
    for name in ("psl", "conformer"):
        fe = C.LogMel.preset(name)
        alone = torch.cat([fe(w[None]) for w in x])
        assert torch.allclose(fe(x), alone, atol=1e-4)
        spec = torch.stft(x, fe.n_fft, fe.hop, fe.win, torch.hann_window(fe.win), return_complex=True).abs() ** 2
        mel = fe.fb.T @ spec
        ref = torch.log(mel + 1e-6) if name == "conformer" else 10 * torch.log10(mel.clamp_min(1e-10))
        if name == "psl":
            ref = torch.maximum(ref, ref.amax((1, 2), keepdim=True) - 120)
        assert torch.allclose(fe(x), ref, atol=1e-3)
    # a trace (ofa_aec's TorchScript export) must not freeze the CPU grouping of its example batch
    traced = torch.jit.trace(C.LogMel.preset("psl"), x[:1], check_trace=False)
    assert torch.allclose(traced(x), C.LogMel.preset("psl")(x), atol=1e-4)


def test_logmel_presets_shapes_and_log_offset():
    x = torch.randn(2, C.SR)
    assert C.LogMel.preset("conformer")(x).shape == (2, 64, 51)
    assert C.LogMel.preset("panns16k")(x).shape == (2, 64, 101)
    fe = C.LogMel.preset("conformer")
    spec = torch.stft(x, 1024, 320, 1024, torch.hann_window(1024), return_complex=True).abs() ** 2
    ref = torch.log(fe.fb.T @ spec + 1e-6)
    assert torch.allclose(fe(x), ref, rtol=1e-4, atol=1e-4)
    slaney = C.mel_filterbank(257, 16000, 64, 50, 8000, "slaney", "slaney")
    assert slaney.shape == (257, 64) and (slaney.sum(0) > 0).all()


def ref_kaldi_fbank(x: np.ndarray, sr=16000, n_mels=128):
    """Kaldi's compute-fbank algorithm written out frame by frame (float64)."""
    win, shift, n_fft = 400, 160, 512
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    mel = lambda f: 1127 * np.log(1 + f / 700)
    lo, hi = mel(20), mel(sr / 2)
    d = (hi - lo) / (n_mels + 1)
    out = []
    for t in range(1 + (len(x) - win) // shift):
        fr = x[t * shift: t * shift + win].astype(np.float64)
        fr = fr - fr.mean()
        fr = fr - 0.97 * np.concatenate([[fr[0]], fr[:-1]])
        p = np.abs(np.fft.rfft(np.concatenate([fr * window, np.zeros(n_fft - win)]))) ** 2
        e = np.zeros(n_mels)
        for m in range(n_mels):
            l, c, r = lo + m * d, lo + (m + 1) * d, lo + (m + 2) * d
            for b in range(n_fft // 2):
                mb = mel(b * sr / n_fft)
                if l < mb < r:
                    e[m] += p[b] * ((mb - l) / (c - l) if mb <= c else (r - mb) / (r - c))
        out.append(np.log(np.maximum(e, np.finfo(np.float32).eps)))
    return np.array(out)


def test_kaldi_fbank_matches_reference():
    rng = np.random.default_rng(1)
    x = (sine(440, C.SR, 0.2) + 0.1 * rng.standard_normal(3200)).astype(np.float32)
    ours = C.KaldiFbank()(torch.from_numpy(x)[None])[0].numpy()
    ref = ref_kaldi_fbank(x)
    assert ours.shape == ref.shape == (18, 128)
    assert np.abs(np.exp(ours - ref) - 1).max() < 1e-3  # 1e-3 relative in the energy domain
    # DC removal is applied after the FFT (see KaldiFbank): a large DC offset and a batch split into
    # CPU groups must give the frame-by-frame result too
    fe = C.KaldiFbank()
    fe.cpu_group = 4000  # groups of one clip
    batch = np.stack([x + 0.5, -x, np.roll(x, 7) + 0.01]).astype(np.float32)
    out = fe(torch.from_numpy(batch)).numpy()
    for b in range(3):
        assert np.abs(np.exp(out[b] - ref_kaldi_fbank(batch[b])) - 1).max() < 1e-3
    assert C.KaldiFbank()(torch.zeros(2, 399)).shape == (2, 0, 128)
    try:
        import torchaudio  # cross-check where it imports (not on this project's CPU torch)
    except Exception:
        return
    ta = torchaudio.compliance.kaldi.fbank(torch.from_numpy(x)[None], htk_compat=True, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0,
                                           frame_shift=10, sample_frequency=16000).numpy()
    assert np.abs(np.exp(ours - ta) - 1).max() < 1e-3



def test_bench_reports_every_front_end(tiny_root):
    res = C.bench(tiny_root, batch=2, n_batches=1, workers=0, repeats=1)
    assert {"loader_clips_per_s", "logmel_psl_batched_clips_per_s", "kaldi_fbank_batched_clips_per_s",
            "kaldi_fbank_per_clip_clips_per_s", "load_avg_1min"} <= set(res)

# =============================================================================================
# Augmentation
# =============================================================================================
def test_mask_along_is_per_sample_and_bounded():
    torch.manual_seed(0)
    x = torch.ones(64, 20, 100)
    y = C.mask_along(x, 30, dim=2)
    masked = (y == 0).all(1).sum(1)  # columns masked per sample (whole frequency axis)
    assert masked.max() < 30 and masked.min() >= 0 and len(set(masked.tolist())) > 5
    assert ((y == 0).sum(1) % 20 == 0).all()  # a time mask spans every frequency bin
    z = C.mask_along(x, 8, dim=1, n_masks=2, fill=-1.0)
    assert ((z == -1).all(2).sum(1) <= 14).all()


def test_mixup_mixes_inputs_and_labels_alike():
    torch.manual_seed(0)
    eye = torch.eye(16)
    x, y = C.mixup(eye.clone(), eye.clone(), alpha=10.0, rate=0.5)
    assert torch.allclose(x, y) and torch.allclose(y.sum(1), torch.ones(16))
    lam = x.max(1).values
    assert ((lam >= 0.5) | torch.isclose(lam, torch.tensor(1.0))).all()
    x0, _ = C.mixup(eye.clone(), eye.clone(), alpha=1.0, rate=0.0)
    assert torch.equal(x0, eye)


def test_wave_augment_gain_polarity_shift():
    torch.manual_seed(0)
    w = torch.randn(32, 1000)
    out = C.wave_augment(w, gain_db=(6.0, 6.0), polarity_p=0.0, max_shift=0)
    assert torch.allclose(out, w * 10 ** (6 / 20), atol=1e-6)
    out = C.wave_augment(w, gain_db=(0.0, 0.0), polarity_p=1.0, max_shift=0)
    assert torch.allclose(out, -w)
    out = C.wave_augment(w, gain_db=(0.0, 0.0), polarity_p=0.0, max_shift=100)
    assert torch.allclose(out.norm(dim=1), w.norm(dim=1), rtol=1e-5)  # circular: energy kept
    assert not torch.allclose(out, w)


# =============================================================================================
# Samplers
# =============================================================================================
def test_generate_sampling_weights_by_hand():
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=np.float32)
    # counts: 3, 1, 2 -> w = [1/3, 1/3 + 1, 1/3 + 1/2, 1/2]
    assert np.allclose(C.generate_sampling_weights(y), [1 / 3, 4 / 3, 5 / 6, 1 / 2])


def test_weighted_sampler_frequencies():
    w = np.array([1.0, 2.0, 7.0])
    s = C.WeightedSampler(w, num_samples=20000, seed=0)
    freq = np.bincount(list(s), minlength=3) / 20000
    assert np.allclose(freq, w / w.sum(), atol=0.01)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


def test_weighted_sampler_accepts_float32_weights():
    """Regression: float32 weights summed in float32 gave p.sum() != 1 and numpy refused to draw."""
    w = np.random.default_rng(0).random(10007).astype(np.float32) * 1e-3
    s = C.WeightedSampler(w, num_samples=100, seed=0)
    assert abs(s.p.sum() - 1.0) < 1e-12 and len(list(s)) == 100


def test_pseudo_balanced_sampler_rotates_over_classes():
    rng = np.random.default_rng(0)
    y = np.zeros((200, 5))
    y[np.arange(200), rng.choice(5, 200, p=[0.8, 0.1, 0.05, 0.03, 0.02])] = 1
    idx = np.array(list(C.PseudoBalancedSampler(y, num_samples=500, seed=0)))
    cls = y[idx].argmax(1)
    assert all(len(set(cls[i: i + 5])) == 5 for i in range(0, 500, 5))  # every block of K has all classes
    rare = np.flatnonzero(y[:, 4])
    assert set(idx[cls == 4]) == set(rare)  # a class's clips are all used before any repeats
    few = C.PseudoBalancedSampler(y, num_samples=3, seed=0).epoch_indices(0)  # fewer samples than classes
    assert len(few) == 3 and len(set(y[few].argmax(1))) == 3
    ref = np.array([67, 77, 73, 165, 147, 194, 93, 90, 34, 91])  # recorded with the per-class flatnonzero version
    assert C.PseudoBalancedSampler(y, num_samples=500, seed=0).epoch_indices(0)[:10].tolist() == ref.tolist()


def _ddp_worker(rank_, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank_))
    r, w, _ = C.setup_ddp()
    t = torch.tensor([r + 1.0])
    torch.distributed.all_reduce(t)
    s = C.WeightedSampler(np.ones(10), num_samples=10, seed=3)
    q.put((r, w, t.item(), list(s), len(s), C.is_main()))
    C.cleanup_ddp()


def test_ddp_two_processes_on_cpu():
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert [o[:3] for o in out] == [(0, 2, 3.0), (1, 2, 3.0)] and [o[5] for o in out] == [True, False]
    full = C.WeightedSampler(np.ones(10), num_samples=10, seed=3).epoch_indices(0).tolist()
    assert out[0][3] == full[0::2] and out[1][3] == full[1::2] and out[0][4] == 5


# =============================================================================================
# Metrics against scikit-learn and by hand
# =============================================================================================
def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 12)) < 0.15).astype(float)
    y[:, 11] = 0  # a class with no positive is ignored by mAP
    s = np.round(rng.random((300, 12)) * 0.7 + 0.3 * y, 2)  # rounding creates ties
    ap, auc = C.average_precision(y, s), C.roc_auc(y, s)
    for k in range(11):
        assert abs(ap[k] - average_precision_score(y[:, k], s[:, k])) < 1e-6
        assert abs(auc[k] - roc_auc_score(y[:, k], s[:, k])) < 1e-6
    assert np.isnan(ap[11]) and np.isnan(auc[11])
    m = C.tagging_metrics(y, s)
    assert abs(m["mAP"] - np.mean([average_precision_score(y[:, k], s[:, k]) for k in range(11)])) < 1e-6
    assert abs(m["dprime"] - np.sqrt(2) * __import__("scipy").stats.norm.ppf(m["mAUC"])) < 1e-9
    w = y[:, :11].sum(1)
    keep = w > 0
    ref = label_ranking_average_precision_score(y[keep, :11], s[keep, :11], sample_weight=w[keep])
    assert abs(C.lwlrap(y[keep, :11], s[keep, :11]) - ref) < 1e-6
    ties = np.round(s[keep, :11] * 4) / 4  # many tied scores: ">=" counts the whole tie group
    assert abs(C.lwlrap(y[keep, :11], ties) - _lwlrap_pairs(y[keep, :11], ties)) < 1e-12
    big = (rng.random((50, 527)) < 0.01).astype(float)  # 527 classes: no (N, K, K) array
    big[:, 0] = 1
    sc = rng.random((50, 527))
    assert abs(C.lwlrap(big, sc) - _lwlrap_pairs(big, sc)) < 1e-12


def _lwlrap_pairs(y, s):
    """The definition, pair by pair (the reference for ties)."""
    hits = [(s[i] >= s[i, j]).astype(float) @ y[i] / (s[i] >= s[i, j]).sum()
            for i in range(len(y)) for j in range(y.shape[1]) if y[i, j]]
    return float(np.mean(hits))


def test_metrics_by_hand():
    assert abs(C.d_prime(0.5)) < 1e-12 and abs(C.d_prime(0.8413447460685429) - np.sqrt(2)) < 1e-9
    y = np.array([0, 2, 1])
    s = np.array([[.9, .1, 0], [.5, .3, .2], [.1, .2, .7]])
    assert C.accuracy(y, s) == 1 / 3 and abs(C.error_rate(y, s) - 2 / 3) < 1e-12
    assert abs(C.map_at_k(y, s, 3) - (1 + 1 / 3 + 1 / 2) / 3) < 1e-12
    assert C.average_precision(np.array([[1], [0], [1]]), np.array([[.9], [.8], [.7]]))[0] == pytest.approx((1 + 2 / 3) / 2)


# =============================================================================================
# Checkpoints, weight averaging, ensembles
# =============================================================================================
def test_average_state_dicts_includes_batchnorm(tmp_path):
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.BatchNorm1d(3))
        net.train()(torch.randn(4, 2, 9) + seed)  # moves the BN running statistics
        nets.append(net.state_dict())
    C.save_checkpoint(tmp_path / "a.pt", {"model": nets[0], "step": 1})
    avg = C.average_state_dicts([tmp_path / "a.pt", nets[1], nets[2]])
    for k in ("0.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(avg[k], sum(n[k] for n in nets) / 3, atol=1e-6)
    assert avg["1.num_batches_tracked"] == nets[2]["1.num_batches_tracked"]
    torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.BatchNorm1d(3)).load_state_dict(avg)
    assert np.allclose(C.ensemble_predictions([np.zeros((2, 2)), np.ones((2, 2))]), 0.5)


def test_topk_checkpoints_keep_best_and_survive_restart(tmp_path):
    top = C.TopKCheckpoints(tmp_path, k=2)
    for step, metric in enumerate([0.1, 0.5, 0.3, 0.2, 0.6]):
        top.update(metric, {"step": step}, step)
    assert [p.name for p in top.paths] == ["top_step4.pt", "top_step1.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["top_step1.pt", "top_step4.pt"]
    again = C.TopKCheckpoints(tmp_path, k=2)
    assert again.update(0.05, {}, 9) is None and again.paths == top.paths
    assert C.load_checkpoint(again.paths[0])["step"] == 4 and not list(tmp_path.glob("*.tmp"))
    again.update(0.55, {"step": 1}, 1)  # the same step again (a resumed run): one entry, file kept
    assert [p.name for p in again.paths] == ["top_step4.pt", "top_step1.pt"] and all(p.exists() for p in again.paths)
    with pytest.raises(C.DataError, match="checkpoint not found"):
        C.load_checkpoint(tmp_path / "nope.pt")


def test_run_helpers(tmp_path, capsys):
    assert C.pick_device("auto").type in ("cpu", "cuda", "mps")
    assert C.amp_dtype(torch.device("cpu"), "auto") is None and C.amp_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with C.autocast(torch.device("cpu"), None):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32  # --amp none / auto: a no-op on CPU
    with C.autocast(torch.device("cpu"), torch.bfloat16):  # an explicit --amp bf16 is honoured on CPU (issue 13 item 6)
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    log = C.RunLogger(tmp_path)
    log.log({"step": 1, "val/mAP": 0.25})
    assert json.loads((tmp_path / "log.jsonl").read_text())["val/mAP"] == 0.25
    assert "val/mAP=0.25" in capsys.readouterr().out
    C.report(tmp_path, {"mAP": 0.5}, C.markdown_table(["a", "mAP"], [["x", 0.5]]))
    assert "| x | 0.5000 |" in (tmp_path / "results.md").read_text()


# ---------------------------------------------------------------------------------------------
# The run-time idiom: claim_run, stage_dir, save_state / load_state, the step, seeds tables
# ---------------------------------------------------------------------------------------------
def test_claim_run_refuses_other_settings_and_keeps_user_files(tmp_path):
    out = tmp_path / "run"
    with C.claim_run(out, "demo", {"lr": 1e-3}, True, ("ckpt/*.pt",)):
        (out / "ckpt").mkdir()
        (out / "ckpt" / "last.pt").write_text("ours")
        (out / "notes.txt").write_text("the user's")
        (out / "sub").mkdir()
        (out / "sub" / "data.csv").write_text("the user's")
    assert json.loads((out / "config.json").read_text())["script"] == "demo"
    with pytest.raises(C.DataError, match=r"--lr 0.001 \(now 0.01\)"):  # resume with other settings: one line
        C.claim_run(out, "demo", {"lr": 1e-2}, True)
    with pytest.raises(C.DataError, match="a run folder of demo.py, not other.py"):
        C.claim_run(out, "other", {"lr": 1e-3}, True)
    with pytest.raises(C.DataError, match="in use by another run"):  # the lock: a second run is refused
        with C.claim_run(out, "demo", {"lr": 1e-3}, True):
            C.claim_run(out, "demo", {"lr": 1e-3}, True)
    C.claim_run(out, "demo", {"lr": 1e-2}, False, ("ckpt/*.pt",)).__exit__()  # --no-resume: our files only
    assert not (out / "ckpt").exists() and (out / "notes.txt").exists() and (out / "sub" / "data.csv").exists()
    assert json.loads((out / "config.json").read_text())["identity"] == {"lr": 1e-2}
    (tmp_path / "file").write_text("x")
    with pytest.raises(C.DataError, match="exists and is not a folder"):
        C.claim_run(tmp_path / "file", "demo", {}, True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.json").write_text("{}")  # a user's file named like ours, in a folder we did not make
    with pytest.raises(C.DataError, match="holds results.json, not written by demo.py"):
        C.claim_run(user, "demo", {}, False)
    assert (user / "results.json").read_text() == "{}"


def test_identity_keeps_max_steps_and_stage_dir_is_keyed(tmp_path):
    import argparse
    a = argparse.Namespace(lr=0.1, max_steps=1, out="x", workers=2, device="cpu", resume=True, compile=False)
    assert C.identity(a) == {"lr": 0.1, "max_steps": 1}  # a run cut short is not the full run
    s1, s2 = C.stage_dir(tmp_path, "teacher", {"lr": 0.1}), C.stage_dir(tmp_path, "teacher", {"lr": 0.2})
    assert s1 != s2 and s1 == C.stage_dir(tmp_path, "teacher", {"lr": 0.1}) and s1.name.startswith("teacher-")
    assert json.loads((s1 / "stage.json").read_text()) == {"lr": 0.1}


def test_save_state_resumes_rng_and_optimizer_exactly(tmp_path):
    def run(steps, stop_at=None, resume=False):
        torch.manual_seed(0), np.random.seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        scaler = C.grad_scaler(torch.device("cpu"), None)
        start = 0
        if resume:
            start = C.load_state(tmp_path / "last.pt", model, opt, scaler)["step"]
        for step in range(start, steps):
            x = torch.randn(3, 4) + float(np.random.rand())  # both RNGs drive the data
            C.optimizer_step(torch.nn.functional.dropout(model(x), 0.5).pow(2).mean(), opt, scaler)
            if step + 1 == stop_at:
                C.save_state(tmp_path / "last.pt", model, opt, scaler, step=step + 1)
                torch.manual_seed(123), np.random.seed(123)  # a fresh process's RNG: resume must restore it
                return None
        return model.weight.detach().clone()
    ref = run(5)
    assert run(5, stop_at=2) is None
    assert torch.equal(run(5, resume=True), ref)
    assert C.load_state(tmp_path / "none.pt", torch.nn.Linear(1, 1)) is None


def test_kill_point_sigkills_on_the_nth_pass(tmp_path):
    r = run_cli("common.py", "seeds", "--row", "a", str(tmp_path / "missing"), check=False)
    assert r.returncode == 1 and r.stdout.startswith("error: ") and "Traceback" not in r.stdout
    import subprocess
    import sys
    code = "import common; [common.save_checkpoint(f'DIR/c{i}.pt', {}) for i in range(3)]"
    r = subprocess.run([sys.executable, "-c", code.replace("DIR", str(tmp_path))], cwd=HERE,
                       env={**os.environ, "KILL_AT": "write:2"})
    assert r.returncode == -9 and (tmp_path / "c0.pt").exists() and (tmp_path / "c1.pt.tmp").exists()
    assert not (tmp_path / "c1.pt").exists() and leftovers(tmp_path) == [tmp_path / "c1.pt.tmp"]


def test_step_benchmark_runs_every_script_on_cpu(one_thread):
    """data/bench.py --steps (issue 19): each script's real and bare training step, one device, clips/s."""
    spec = importlib.util.spec_from_file_location("bench", HERE / "data" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.step_benchmark(device="cpu", amp="none", batch_size=1, steps=1, warmup=0)
    assert [r["script"] for r in rows] == list(bench.SCRIPTS) == ["psla", "psl", "at_transfer", "conformer_ssl",
                                                                 "ofa_aec"]
    assert all(r["batch"] == 1 and r["step_clips_per_s"] > 0 and r["bare_clips_per_s"] > 0 for r in rows)


def test_scripts_share_one_idiom_and_no_private_names():
    """Issue 19: every script's entry point is common.cli (one-line errors), its stages run inside
    common.distributed(), and none reaches into a private name of common.py."""
    for name in ("psla", "psl", "at_transfer", "conformer_ssl", "ofa_aec"):
        src = (HERE / f"{name}.py").read_text()
        assert not re.findall(r"common\._\w", src), name
        assert src.rstrip().endswith('if __name__ == "__main__":\n    common.cli(main)'), name
        assert "with common.distributed():" in src and "setup_ddp(" not in src, name


def test_compiled_gives_the_same_loss_as_eager():
    """--compile (common.compiled): the same losses as eager mode on the CPU, dropout draws included
    (fallback_random keeps random ops on torch's generator)."""
    def losses(on):
        torch.manual_seed(0)
        nn = torch.nn
        m = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(64, 3))
        net, opt = C.compiled(m, on), torch.optim.SGD(m.parameters(), lr=0.1)
        x, y, out = torch.randn(5, 1, 16), torch.randn(5, 3), []
        for _ in range(3):
            loss = ((net(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.detach())
        return torch.stack(out)
    torch._dynamo.reset()
    assert torch.allclose(losses(True), losses(False), rtol=1e-6, atol=1e-7)


def test_mean_reads_once_and_step_has_no_sync():
    import inspect
    m = C.Mean()
    for v in (1.0, 2.0, 6.0):
        m.add(torch.tensor(v))
    assert m.read() == 3.0 and np.isnan(m.read())  # read() resets
    src = inspect.getsource(C.optimizer_step) + inspect.getsource(C.Mean.add)
    assert not re.search(r"\.item\(|\.cpu\(|float\(|\.numpy\(|\.tolist\(", src)


def test_recalibrate_bn_is_the_batch_weighted_mean():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5))
    xs = [torch.randn(5, 3) * 2 + 1, torch.randn(3, 3)]  # unequal batches: weighted by size
    C.recalibrate_bn(net, xs)
    h = [net[0](x).detach() for x in xs]
    mean = (h[0].sum(0) + h[1].sum(0)) / 8
    var = (h[0].var(0, unbiased=True) * 5 + h[1].var(0, unbiased=True) * 3) / 8
    assert torch.allclose(net[1].running_mean, mean, atol=1e-6) and torch.allclose(net[1].running_var, var, atol=1e-5)
    assert not net.training and net[1].momentum == 0.1


def test_wave_augment_per_op_probability():
    torch.manual_seed(0)
    w = torch.ones(4000, 8)
    out = C.wave_augment(w, (-6.0, -6.0), polarity_p=0.0, max_shift=0, gain_p=0.25)
    gained = (out[:, 0] - 10 ** (-6 / 20)).abs() < 1e-6
    assert torch.all(gained | (out[:, 0] == 1)) and 0.2 < gained.float().mean() < 0.3
    torch.manual_seed(0)
    x = torch.arange(8.0).repeat(2000, 1)
    shifted = (C.wave_augment(x, (0.0, 0.0), polarity_p=0.0, max_shift=3, shift_p=0.5) != x).any(1)
    assert 0.3 < shifted.float().mean() < 0.5  # half are shifted, 1 in 7 of those by 0


def test_shard_plateau_readable_scores():
    assert C.shard(np.arange(5)).tolist() == [0, 1, 2, 3, 4]  # one process: everything
    assert C.plateau([0.1, 0.2, 0.3, 0.3, 0.3, 0.3]) and not C.plateau([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert not C.plateau([0.5, 0.5]) and C.plateau([3.0, 1.0, 1.0, 1.0], higher=False)
    y = np.array([[1, 0], [0, 1], [1, 1]])
    s = np.array([[0.9, 0.1], [np.nan, np.nan], [0.8, 0.7]])
    m = C.readable_scores(y, s, lambda t, p: C.accuracy(t, p))
    assert m == {"score": 1.0, "n": 2, "skipped": 1}


def test_apply_preset_by_device_flags_win_and_plateau_report(capsys):
    """--preset auto is cpu without a CUDA GPU (whatever the corpus), paper when asked; a given flag
    wins over the preset; one line names the preset and the reason."""
    import argparse
    presets = {"cpu": {"epochs": 3, "lr": 1e-3}, "paper": {"epochs": 100, "lr": 1e-4}}
    a = C.apply_preset(argparse.Namespace(preset="auto", device="cpu", epochs=None, lr=0.5), presets, "x")
    assert (a.preset, a.epochs, a.lr) == ("cpu", 3, 0.5)
    assert capsys.readouterr().out == "x: preset cpu (auto: no CUDA GPU (cpu); --preset paper for the paper's " \
                                      "schedule); given flags kept: lr\n"
    a = C.apply_preset(argparse.Namespace(preset="paper", device="cpu", epochs=None, lr=None), presets, "x")
    assert (a.preset, a.epochs, a.lr) == ("paper", 100, 1e-4) and "(--preset paper)" in capsys.readouterr().out
    r = C.plateau_report([0.1, 0.3, 0.3, 0.299, 0.3])
    assert r == {"plateau": True, "tolerance": 0.005, "validations": 5, "gain": 0.0, "best": 0.3, "last": 0.3}
    assert not C.plateau_report([0.1, 0.2, 0.3, 0.4])["plateau"] and C.plateau_report([])["best"] is None
    # the last-quarter gain, by hand: last 2 of 4 best 0.4 against 0.2 before; a loss (lower is better)
    # whose last 2 of 8 reach 0.43 against 0.45 before gains 0.02; a curve that fell gains a negative amount
    assert C.plateau_report([0.1, 0.2, 0.3, 0.4])["gain"] == pytest.approx(0.2)
    loss = C.plateau_report([1.0, 0.8, 0.7, 0.69, 0.5, 0.45, 0.44, 0.43], higher=False)
    assert loss["gain"] == pytest.approx(0.02) and not loss["plateau"]
    assert C.plateau_report([0.5, 0.6, 0.4, 0.3])["gain"] == pytest.approx(-0.2)  # 0.4 against 0.6
    assert C.plateau_report([0.1, 0.2, 0.3])["gain"] is None and C.signed(None) == "n/a"
    assert C.signed(0.016) == "+0.0160" and C.signed(-0.003) == "-0.0030"


def test_seeds_table_mean_std_and_paired(tmp_path):
    runs = {}
    for row, vals in (("base", [0.5, 0.6, 0.7]), ("new", [0.6, 0.8, 0.7])):
        for i, v in enumerate(vals):
            runs.setdefault(row, []).append(str(tmp_path / f"{row}{i}"))
            C.report(tmp_path / f"{row}{i}", {"mAP": v, "student": {"best": v / 2}}, "x", quiet=True)
    out = tmp_path / "seeds"
    C.main(["seeds", "--row", "base", *runs["base"], "--row", "new", *runs["new"], "--key", "mAP",
            "--key", "student.best", "--out", str(out)])
    t = json.loads((out / "results.json").read_text())
    assert t["new"]["minus_first"] == pytest.approx([0.1, 0.2, 0.0]) and t["base"]["minus_first"] is None
    md = (out / "results.md").read_text()
    assert "0.7000 +- 0.1000" in md and "0.1000 +- 0.1000" in md and "0.3500 +- 0.0500" in md
    with pytest.raises(C.DataError, match="no 'nope' in results.json"):
        C.seeds_table([["a", runs["base"][0]]], ["nope"], out)
    # --pair A B: the paired difference of two keys within each row's runs (here mAP - student.best = v / 2)
    C.main(["seeds", "--row", "new", *runs["new"], "--key", "mAP", "--pair", "mAP", "student.best", "--out", str(out)])
    t = json.loads((out / "results.json").read_text())
    assert t["new"]["paired"]["mAP - student.best"] == pytest.approx([0.3, 0.4, 0.35])
    assert "| mAP - student.best (paired) |" in (out / "results.md").read_text()
    assert "| +0.3500 +- 0.0500 |" in (out / "results.md").read_text()
    with pytest.raises(C.DataError, match="no 'nope' in results.json"):
        C.seeds_table([["a", runs["base"][0]]], ["mAP"], out, [["mAP", "nope"]])
    # --minus A B: row A - row B on the first key, seed by seed (new - base = +0.1 / +0.2 / 0.0)
    C.main(["seeds", "--row", "base", *runs["base"], "--row", "new", *runs["new"], "--minus", "new", "base",
            "--minus", "base", "new", "--out", str(out)])
    t, md = json.loads((out / "results.json").read_text()), (out / "results.md").read_text()
    assert t["new"]["minus"]["base"] == pytest.approx([0.1, 0.2, 0.0]) and "minus" in t["base"]
    assert "| new - base | +0.1000 +- 0.1000 | +0.1000 / +0.2000 / +0.0000 |" in md
    assert "| base - new | -0.1000 +- 0.1000 |" in md
    with pytest.raises(C.DataError, match="--minus new gone"):
        C.seeds_table([["new", *runs["new"]]], ["mAP"], out, minus=[["new", "gone"]])


# =============================================================================================
# psl.py: model size, chunking, clip-level averaging, ground-truth chunk labels, and end-to-end
# runs of all four stages (teacher -> relabel -> student -> eval), resume, the Table 2 rows
# =============================================================================================
@pytest.fixture(scope="session")
def psl_tiny(tmp_path_factory):
    """24 balanced / 45 unbalanced / 24 valid / 24 eval clips of 4 s (30 classes)."""
    root = tmp_path_factory.mktemp("psl") / "synth"
    return C.make_synthetic_corpus(root, scale=0.05, seed=0, clip_seconds=4.0, workers=1, quiet=True)


def _argv(root, out, *extra):
    return ["--data-root", str(root), "--out", str(out), "--workers", "0",
            "--batch-size", "8", "--eval-every", "1b", *extra]


def test_psl_param_count():
    model = psl.MobileNetV2(527)
    assert sum(p.numel() for p in model.parameters()) == 2_898_383
    assert set(model.state_dict()) >= {"features.0.0.weight", "classifier.1.weight"}  # plain names for at_transfer.py


def test_psl_model_shapes():
    model = psl.MobileNetV2(30).eval()
    with torch.no_grad():
        clip, frames = model(torch.randn(2, 2 * C.SR))  # 2 s -> 201 frames -> 7 time steps
    assert clip.shape == (2, 30) and frames.shape == (2, 7, 30)
    assert torch.allclose(clip, frames.mean(1)) and (clip > 0).all() and (clip < 1).all()


def test_psl_help(capsys):
    for argv in (["--help"], ["predict", "--help"]):
        with pytest.raises(SystemExit) as e:
            psl.main(argv)
        assert e.value.code == 0
    assert "--ckpt" in capsys.readouterr().out


def _psl_parsers() -> dict:
    return {"run": psl.build_parser("run"), "teacher": psl.build_parser("teacher"), "predict": psl.predict_parser(),
            "plot": psl.plot_parser()}


def test_psl_every_command_has_its_own_help_with_defaults(capsys):
    """Issue 21: `psl.py teacher --help` is the teacher stage's own help (not the run's), every sub-command's
    --help names its own program, every flag and positional has help text, and defaults are shown."""
    helps = {}
    for cmd in ("run", "teacher", "predict", "plot"):
        with pytest.raises(SystemExit) as e:
            psl.main(([] if cmd == "run" else [cmd]) + ["--help"])
        assert e.value.code == 0
        helps[cmd] = capsys.readouterr().out
    assert helps["run"].startswith("usage: psl.py [") and "sub-commands (each with its own --help)" in helps["run"]
    for cmd in ("teacher", "predict", "plot"):
        assert helps[cmd].startswith(f"usage: psl.py {cmd} ") and "What is reproduced" not in helps[cmd], cmd
    assert "Stage 1 of psl.py alone" in helps["teacher"] and "--table" not in helps["teacher"]
    assert "student stage (accepted, not read by `psl.py teacher`)" in helps["teacher"]
    for cmd in ("run", "teacher"):
        assert "batch size (Sec. 3.2) (default: 32)" in helps[cmd] and "(default: 15)" in helps[cmd]
    assert "(default: 5)" in helps["predict"] and "audio files to tag" in helps["predict"]
    for cmd, parser in _psl_parsers().items():
        assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class, C.HelpFormatter), cmd
        for action in parser._actions:
            assert action.help and action.help.strip(), f"{cmd}: {action.dest} has no help text"
    t = psl.parse_args(["--segment", "4", "--eval-every", "1b", "--teacher-epochs", "3"], "teacher")
    assert t.teacher is None and t.table is None and t.teacher_epochs == 3  # the run's flags are accepted


def test_psl_docstring_commands_parse():
    """Every `python psl.py ...` / `torchrun ... psl.py ...` example of the module docstring and of the
    sub-commands' help parses with that command's own parser (flags exist, values are valid)."""
    import shlex
    parsers, n = _psl_parsers(), 0
    for doc in (psl.__doc__, psl.TEACHER_DOC, psl.PREDICT_DOC, psl.PLOT_DOC):
        for line in doc.splitlines():
            if not re.match(r"    (python|torchrun) ", line):
                continue
            words = shlex.split(line.split("#")[0])
            if "psl.py" not in words[:4]:
                continue
            argv = words[words.index("psl.py") + 1:]
            cmd = argv[0] if argv and argv[0] in ("teacher", "predict", "plot") else "run"
            parsers[cmd].parse_args(argv[1:] if cmd != "run" else argv)
            n += 1
    assert n >= 12


def _psl_results(folder: Path, obj) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(obj))
    return str(folder)


def test_psl_plot_draws_the_values_of_results_json(tmp_path, monkeypatch):
    """`psl.py plot`: the PNG is written and the drawn values are read back from the Axes: each seeds row is a
    point at its chunk length (mean of the per-seed mAP, in %) with a +- sample std error bar; a single run
    and a --table run are points, a teacher stage a horizontal line; the paper's lines are Tables 2 and 3."""
    seeds = {"weak-2s": {"mAP": [0.561, 0.579, 0.564], "runs": ["a", "b", "c"], "minus_first": None},
             "PSL-2s": {"mAP": [0.782, 0.779, 0.778], "runs": ["a", "b", "c"], "minus_first": [0.2, 0.2, 0.2]},
             "PSL-5s 30ep": {"mAP": [0.765, 0.763, 0.769], "runs": ["a", "b", "c"], "minus_first": [0.2, 0.2, 0.2]},
             "alpha 0.5-5s": {"mAP": [0.744, 0.705, 0.742], "runs": ["a", "b", "c"], "minus_first": [0.1, 0.1, 0.1]}}
    runs = [_psl_results(tmp_path / "seeds", seeds),
            _psl_results(tmp_path / "psl_5s", {"method": "psl", "segment": 5.0, "mAP": 0.4321, "alpha": 1.0}),
            _psl_results(tmp_path / "psl_2s", {"method": "psl", "segment": 2.0, "mAP": 0.4686, "alpha": 1.0}),
            _psl_results(tmp_path / "table2", {"table": 2, "rows": [["weak-10s", "0", "19.28", "-0.047", "0.4869"],
                                                                     ["PSL-10s", "1", "23.64", "0.227", "0.5638"]]}),
            _psl_results(tmp_path / "teacher-abc", {"mAP": 0.4964, "convergence": {"plateau": False}})]
    axes, figure = [], C.figure

    def spy(path, draw, **kw):
        return figure(path, lambda ax: (draw(ax), axes.append(ax)), **kw)
    monkeypatch.setattr(C, "figure", spy)
    png = tmp_path / "fig" / "psl.png"
    assert psl.main(["plot", *runs, "--out", str(png)]) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    (ax,) = axes
    bars = {c.lines[0].get_gid(): c for c in ax.containers}
    caps = {id(l) for c in ax.containers for l in c.lines[1]}  # the error bars' caps (Line2D too)
    lines = {l.get_gid(): l for l in ax.lines if id(l) not in caps}

    def drawn(gid):
        return list(lines[gid].get_xdata()), [float(v) for v in lines[gid].get_ydata()]
    for gid, rows in (("ours:seeds:weak:", ["weak-2s"]), ("ours:seeds:psl:", ["PSL-2s"]),
                      ("ours:seeds:psl:30ep", ["PSL-5s 30ep"]), ("ours:seeds:ts:", ["alpha 0.5-5s"])):
        v = [seeds[r]["mAP"] for r in rows]
        x, y = drawn(gid)
        assert x == [psl.parse_row_name(r)[1] for r in rows]
        np.testing.assert_allclose(y, [100 * np.mean(m) for m in v], rtol=1e-12)
        segs = bars[gid].lines[2][0].get_segments()  # the error bars: (x, mean - std) .. (x, mean + std)
        np.testing.assert_allclose([[s[0][1], s[1][1]] for s in segs],
                                   [[100 * (np.mean(m) - np.std(m, ddof=1)), 100 * (np.mean(m) + np.std(m, ddof=1))]
                                    for m in v], rtol=1e-12)
    assert drawn("ours::psl:") == ([2.0, 5.0], [46.86, 43.21])  # the single runs, sorted by chunk length
    assert drawn("ours:table2:weak:") == ([10.0], [19.28]) and drawn("ours:table2:psl:") == ([10.0], [23.64])
    assert drawn("ours:ma:0")[1] == [49.64, 49.64] and drawn("paper:ma")[1] == [40.53, 40.53]
    for kind in ("weak", "psl", "ts"):  # the paper's lines: Tables 2 and 3
        assert drawn(f"paper:{kind}") == ([2, 5, 10], [psl.PAPER[(kind, n)][0] for n in (2, 5, 10)])
    assert len(ax.lines) == len(lines) + len(caps) and None not in lines  # nothing else drawn
    bad = _psl_results(tmp_path / "bad", {"x-2s": {"mAP": [0.5], "runs": ["a"]}})
    for argv, msg in (([bad], "seeds row 'x-2s' is not named"), ([str(tmp_path / "none")], "not found"),
                      ([_psl_results(tmp_path / "other", {"acc": 1})], "neither a psl.py run")):
        with pytest.raises(C.DataError, match=msg) as e:
            psl.main(["plot", *argv])
        assert "\n" not in str(e.value)


def _psl_checkpoint(path: Path, mids, n_model: int | None = None, **extra) -> Path:
    torch.manual_seed(0)
    model = psl.MobileNetV2(n_model or len(mids))
    torch.save({"script": "psl", "model": model.state_dict(), "segment": 2.0, "args": {}, "info": {},
                "labels": {"mids": list(mids), "names": [f"class {m}" for m in mids]}, **extra}, path)
    return path


def test_psl_predict_warns_for_synthetic_classes_and_foreign_files_are_one_line(tmp_path, capsys):
    """Issue 21: a prediction with a checkpoint that knows only the synthetic corpus's classes starts with
    common.synthetic_classes_warning (real AudioSet ids: no warning); a foreign file as --ckpt (a wav, random
    bytes, a psl-shaped file whose weights are another model's) is one line, no traceback."""
    wav = tmp_path / "a.wav"
    sf.write(wav, (np.random.default_rng(0).standard_normal(3 * C.SR) * 0.1).astype(np.float32), C.SR)
    synth = _psl_checkpoint(tmp_path / "synth.pt", ["/synth/p0c0", "/synth/p1c0", "/synth/p2"])
    real = _psl_checkpoint(tmp_path / "real.pt", ["/m/09x0r", "/m/04rlf", "/m/0jbk"])
    capsys.readouterr()
    psl.main(["predict", "--ckpt", str(synth), str(wav)])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == C.synthetic_classes_warning(["/synth/p0c0", "/synth/p1c0", "/synth/p2"])
    assert out[1].startswith(f"{wav}: class /synth/") and len(out) == 4  # + 2 s and 1 s chunks
    psl.main(["predict", "--ckpt", str(real), str(wav)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{wav}: class /m/") and len(out) == 3 and "warning" not in "".join(out)
    (tmp_path / "rand.pt").write_bytes(np.random.default_rng(0).bytes(300))
    for ckpt, msg in ((wav, "not a PyTorch checkpoint"), (tmp_path / "rand.pt", "not a PyTorch checkpoint"),
                      (_psl_checkpoint(tmp_path / "other.pt", ["/m/a", "/m/b"], n_model=5), "not a checkpoint of "
                       "this model (2 shapes differ"),
                      (_psl_checkpoint(tmp_path / "nolabels.pt", ["/m/a"], labels={}), "no class list")):
        with pytest.raises(C.DataError, match=re.escape(msg)) as e:
            psl.main(["predict", "--ckpt", str(ckpt), str(wav)])
        assert "\n" not in str(e.value) and str(ckpt) in str(e.value)


def test_psl_chunking_keeps_short_last_chunk(psl_tiny):
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    rows = corpus.train[:2]
    ds = psl.chunk_dataset(corpus, rows, corpus.targets(rows), 3.0, 4.0)
    assert ds.chunks == [(0, 0.0, 3.0), (0, 3.0, 4.0), (1, 0.0, 3.0), (1, 3.0, 4.0)]
    assert len(ds[1][0]) == C.SR and len(ds[0][0]) == 3 * C.SR  # last chunk 1 s, not padded
    assert torch.equal(ds[1][1], ds[0][1])  # weak labels propagated to every chunk of a clip
    whole = psl.chunk_dataset(corpus, rows, corpus.targets(rows), None, 4.0)
    assert whole.chunks == [(0, 0.0, 4.0), (1, 0.0, 4.0)]


def test_psl_average_chunks_per_clip():
    scores = np.array([[0.2, 0.4], [0.4, 0.0], [0.9, 0.1], [np.nan, np.nan], [0.5, 0.5]], np.float32)
    clip_index = np.array([0, 0, 1, 1, 2])
    out = psl.average_chunks(scores, clip_index, 4)
    np.testing.assert_allclose(out[:3], [[0.3, 0.2], [0.9, 0.1], [0.5, 0.5]], atol=1e-6)
    assert np.isnan(out[3]).all()  # no readable chunk: a NaN row, excluded and counted by common.readable_scores


def test_psl_average_chunks_equals_the_simple_loop():
    """Issue 20: the vectorised average (np.add.reduceat) is bit-identical to summing each clip's readable
    chunks one by one in float64, also for unsorted clip indices and clips without a readable chunk."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n, k, clips = rng.integers(1, 60), rng.integers(1, 8), rng.integers(1, 20)
        s = rng.random((n, k)).astype(np.float32)
        s[rng.random(n) < 0.2] = np.nan
        ci = rng.integers(0, clips, n) if trial % 2 else np.sort(rng.integers(0, clips, n))
        ref = np.full((clips, k), np.nan, np.float32)
        for c in range(clips):
            rows = [r for r, i in zip(s, ci) if i == c and not np.isnan(r).any()]
            if rows:
                acc = np.zeros(k)
                for r in rows:
                    acc += r
                ref[c] = (acc / len(rows)).astype(np.float32)
        np.testing.assert_array_equal(psl.average_chunks(s, ci, clips), ref)


def test_psl_chunk_truth_matches_true_clip_labels(psl_tiny):
    """Union over a clip's chunks of the true strong labels (events + parents) = its true clip labels."""
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    ds = psl.chunk_dataset(corpus, corpus.train, corpus.targets(corpus.train), 2.0, 4.0)
    y = psl.chunk_truth(corpus, corpus.train, ds)
    per_clip = np.zeros((len(corpus.train), y.shape[1]), np.float32)
    np.maximum.at(per_clip, ds.clip_index, y)
    np.testing.assert_array_equal(per_clip, corpus.true_targets(corpus.train))
    assert y.sum() < y.shape[0] * per_clip.sum(1).mean()  # chunks carry fewer labels than their clips


def test_psl_all_stages_save_reload_predict(psl_tiny, tmp_path, capsys):
    out = tmp_path / "run"
    psl.main(_argv(psl_tiny, out, "--segment", "2", "--max-steps", "2"))
    res = json.loads((out / "results.json").read_text())
    where = re.escape(str(out / "results.md"))
    assert re.search(rf"results: {where} \(peak memory \d+\.\d GB\)", capsys.readouterr().out)  # where, how much
    assert 0 < res["mAP"] <= 1 and 0 <= res["mAUC"] <= 1 and np.isfinite(res["dprime"]) and res["n"] == 24
    assert res["method"] == "psl" and res["params"] == sum(p.numel() for p in psl.MobileNetV2(30).parameters())
    a = res["analysis"]
    assert sum(a["labels_per_clip"].values()) == 24 and 0 <= a["mean_coverage"] <= 1
    assert set(a["chunk_vs_true_strong"]["pseudo"]) == {"precision", "recall"}
    (teacher,), (relabel,) = tmp_path.glob("teacher-*"), tmp_path.glob("relabel-*")  # shared stages, beside --out
    assert (teacher / "final.pt").exists() and np.load(relabel / "soft.npy").shape == (48, 30)  # 24 clips x 2 chunks
    assert json.loads((relabel / "stage.json").read_text())["teacher"] == psl.file_sha1(teacher / "final.pt")
    ma = json.loads((teacher / "results.json").read_text())["convergence"]  # issue 20: the MA's plateau report
    assert res["convergence"] == {"machine_annotator": ma, "student": res["student"]["convergence"]}
    assert ma["validations"] == 1 and not ma["plateau"] and "machine annotator: NO" in (out / "results.md").read_text()
    # reload the averaged student from its checkpoint alone and evaluate it again: same numbers
    ck = C.load_checkpoint(out / "student" / "final.pt")
    model = psl.build_model(ck)
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    args = psl.resolve(psl.parse_args(_argv(psl_tiny, out)), corpus)
    m = psl.evaluate(model, corpus, corpus.eval, corpus.true_targets(corpus.eval), ck["segment"], args)
    assert m["mAP"] == pytest.approx(res["mAP"], abs=1e-6)
    capsys.readouterr()
    psl.main(["predict", "--ckpt", str(out / "student" / "final.pt"), str(psl_tiny / corpus.eval[0][0])])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == C.synthetic_classes_warning(corpus.labels.mids)  # the synthetic corpus's toy classes
    assert len(lines) == 4 and "2.0-   4.0 s" in lines[3] and ":" in lines[1]  # warning, clip line + 2 segments


def test_psl_weak_baseline_needs_no_teacher(psl_tiny, tmp_path):
    out = tmp_path / "weak"
    psl.main(_argv(psl_tiny, out, "--labels", "weak", "--segment", "4", "--max-steps", "1"))
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "weak" and res["alpha"] == 0 and res["analysis"] is None
    assert not list(tmp_path.glob("teacher-*")) and not list(tmp_path.glob("relabel-*"))


def test_psl_finished_run_is_reused_only_with_the_same_settings(psl_tiny, tmp_path, capsys):
    """Stale reuse (issue 19): a run finished with --max-steps 1 is not returned as done for the full command
    (one line naming the flag); the same command is returned as done; --no-resume restarts it and removes only
    psl.py's files from the run folder, never a user's file there or a shared stage beside it."""
    out = tmp_path / "weak"
    base = _argv(psl_tiny, out, "--labels", "weak", "--segment", "4")
    psl.main(base + ["--max-steps", "1"])
    with pytest.raises(C.DataError, match=r"--max-steps 1 \(now None\)") as e:
        psl.main(base)
    assert "\n" not in str(e.value)
    capsys.readouterr()
    assert psl.main(base + ["--max-steps", "1"])["student"]["steps"] == 1 and "done" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    (out / "student" / "mine.npy").write_text("mine")
    stage = C.stage_dir(tmp_path, "teacher", {"a": 1})  # a shared stage beside the run: never touched
    (stage / "final.pt").write_text("an MA")
    psl.main(base + ["--max-steps", "2", "--no-resume"])
    assert json.loads((out / "results.json").read_text())["student"]["steps"] == 2
    assert (out / "notes.txt").read_text() == (out / "student" / "mine.npy").read_text() == "mine"
    assert (stage / "final.pt").read_text() == "an MA"


def test_psl_table_shares_teacher_and_writes_rows(psl_tiny, tmp_path):
    out = tmp_path / "table"
    psl.main(_argv(psl_tiny, out, "--table", "2", "--max-steps", "1"))
    md = (out / "results.md").read_text()
    assert all(r in md for r in ("weak-10s", "PSL-10s", "PSL-5s", "PSL-2s", "35.48", "not comparable"))
    assert len(list(out.glob("teacher-*"))) == 1 and len(list(out.glob("relabel-*"))) == 3  # one MA, 3 caches


def test_psl_teacher_subcommand_is_shared_by_student_runs(psl_tiny, tmp_path, capsys):
    """`psl.py teacher` trains the MA alone and prints its stage folder; a second call reuses it, so does a run
    with the same MA settings; a student given a copy of it (--teacher) reuses the relabel cache (keyed by the
    file's content) and writes nothing beside the user's file; a changed MA setting is another stage."""
    flags = ["--stages", str(tmp_path / "stages"), "--max-steps", "1", "--segment", "4"]
    final = psl.main(["teacher", *_argv(psl_tiny, tmp_path / "unused", *flags)])
    out = capsys.readouterr().out
    assert f"machine annotator: {final.parent}" in out and f"results: {final.parent / 'results.md'} (peak memory" in out
    assert re.search(r"--teacher \S+final\.pt; peak memory \d+\.\d GB\)", out)  # where it went, its memory
    assert final.parent.parent == tmp_path / "stages" and final.parent.name.startswith("teacher-")
    stamp = final.stat().st_mtime_ns
    assert psl.main(["teacher", *_argv(psl_tiny, tmp_path / "unused", *flags)]) == final
    psl.main(_argv(psl_tiny, tmp_path / "a", *flags))  # the same MA settings: shares it
    mine = tmp_path / "mine" / "ma.pt"
    mine.parent.mkdir()
    shutil.copy(final, mine)
    psl.main(_argv(psl_tiny, tmp_path / "b", *flags, "--teacher", str(mine)))
    assert final.stat().st_mtime_ns == stamp and len(list((tmp_path / "stages").glob("relabel-*"))) == 1
    assert [p.name for p in mine.parent.iterdir()] == ["ma.pt"] and not (tmp_path / "unused").exists()
    corpus = C.load_corpus(str(psl_tiny), "full")
    s = lambda *x: C.settings_hash(psl.teacher_settings(psl.resolve(psl.parse_args(_argv(psl_tiny, "o", *x)), corpus),
                                                        corpus))
    assert s() == s("--lr", "1e-3") == s("--alpha", "0.5", "--segment", "5")  # lr 1e-3: the cpu preset's
    assert len({s(), s("--teacher-epochs", "2"), s("--lr", "1e-4"), s("--gain-db", "3"), s("--max-steps", "3")}) == 5


def test_psl_killed_anywhere_resumes_bit_identical(psl_tiny, tmp_path):
    """Exact resume (real subprocesses, SIGKILL by common.kill_point): killed right after the MA's final.pt
    (between stages 1 and 2), then mid-epoch in the student (after step 3 of 6; its checkpoint is step 2's),
    then inside the write of the student's last.pt; each time the same command resumes. The results equal
    the uninterrupted run's bit for bit and no temp file is left. Stage independence: the uninterrupted run
    trained its MA in the same process, the resumed runs read it from disk, and a run given that MA as
    --teacher (its own relabel cache, computed again) trains the same student too."""
    argv = lambda out, stages, *x: _argv(psl_tiny, out, "--segment", "2", "--max-steps", "3", "--teacher-epochs", "1",
                                         "--eval-every", "2b", "--top-k", "2", "--stages", stages, *x)
    run_cli("psl.py", *argv(tmp_path / "ref", tmp_path / "s_ref"))
    out = tmp_path / "run"
    for kill_at in ("saved:3", "step:3"):  # the MA's 3rd save is its final.pt; then the student's 3rd step
        r = run_cli("psl.py", *argv(out, tmp_path / "s_run"), env={"KILL_AT": kill_at}, check=False)
        assert r.returncode in (-9, 137), f"{kill_at}: exit {r.returncode}:\n{r.stdout[-3000:]}"
    assert not (out / "results.json").exists() and (out / "student" / "last.pt").exists()
    r = killed_then_resumed("psl.py", argv(out, tmp_path / "s_run"), "write:2")  # top_step3.pt, then last.pt
    assert "student: resumed at step 2/3" in r.stdout
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert json.loads((out / "results.json").read_text()) == ref
    a, b = (C.load_checkpoint(tmp_path / r / "student" / "final.pt")["model"] for r in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [2, 3, 3]  # each once
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["end"]  # + the plateau line, once
    assert leftovers(tmp_path) == []
    (ma,) = (tmp_path / "s_ref").glob("teacher-*")
    run_cli("psl.py", *argv(tmp_path / "given", tmp_path / "s_given", "--teacher", ma / "final.pt"))
    given = json.loads((tmp_path / "given" / "results.json").read_text())
    assert given["mAP"] == ref["mAP"] and given["AP"] == ref["AP"] and given["student"] == ref["student"]
    assert not list((tmp_path / "s_given").glob("teacher-*")) and list((tmp_path / "s_given").glob("relabel-*"))


PSL_DDP_SPY = r'''
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv.pop(1))
import argparse
import hashlib
import numpy as np
import torch
import common
import psl
rank = int(os.environ["RANK"])
seen = {"calls": [], "shards": [], "teacher": [], "soft": []}


def spy(obj, name, what, delay):
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        path = str(a[1] if what in ("save", "replace") else a[0])  # save(obj, f), replace(src, dst)
        seen["calls"].append([what, path])
        time.sleep(delay(path) if rank == 0 else 0.0)
        return orig(*a, **k)
    setattr(obj, name, wrapped)


# rank 0 publishes the MA, the relabel cache and the top-k files late: a rank that reads them without
# waiting at a barrier finds nothing or a stale file
spy(os, "replace", "replace", lambda p: 1.5 if p.endswith("final.pt") and "teacher-" in p else
    0.5 if p.endswith(".npy") or "top_step" in p else 0.0)
spy(torch, "save", "save", lambda p: 0.0)
spy(Path, "unlink", "unlink", lambda p: 0.0)
make_loader, build_model, relabel = common.make_loader, psl.build_model, psl.relabel_segments


def loader(ds, bs, sampler=None, **k):
    if "seed" in k:  # a training loader: this rank's indices of the epoch
        seen["shards"].append(np.asarray(sampler).tolist())
    return make_loader(ds, bs, sampler=sampler, **k)


def model(ck, path=""):
    seen["teacher"].append(hashlib.sha1(b"".join(t.numpy().tobytes() for t in ck["model"].values())).hexdigest())
    return build_model(ck, path)


def relabel_spy(*a):
    soft = relabel(*a)
    seen["soft"].append([type(soft).__name__, str(soft.dtype), hashlib.sha1(soft.tobytes()).hexdigest()])
    return soft
common.make_loader, psl.build_model, psl.relabel_segments = loader, model, relabel_spy
try:
    psl.main(sys.argv[1:])
finally:
    Path(os.environ["SPY_OUT"], f"rank{rank}.json").write_text(json.dumps(seen))
'''


def test_psl_torchrun_ddp_barriers_shards_and_rank0_writes(psl_tiny, tmp_path):
    """torchrun, 2 gloo processes on CPU: teacher -> relabel -> student -> eval end to end. Rank 0's writes
    are slowed down (a missing barrier after the MA's final.pt, the cache's rename or the top-k files makes
    rank 1 read nothing or a stale file); rank 1 never saves, publishes or deletes a file; both load the same
    MA and the same complete relabel cache; each epoch's indices are sharded (common.shard: disjoint, padded to
    equal steps); the run folder holds one set of outputs and each log line once."""
    (tmp_path / "spy.py").write_text(PSL_DDP_SPY)
    out, stages = tmp_path / "run", tmp_path / "stages"
    argv = _argv(psl_tiny, out, "--segment", "2", "--max-steps", "2", "--teacher-epochs", "1", "--top-k", "1",
                 "--stages", str(stages))
    run_cli(str(tmp_path / "spy.py"), HERE, *argv, nproc=2, env={"SPY_OUT": str(tmp_path)})
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["calls"] == [] and any(w == "replace" for w, _ in r0["calls"])  # rank 0 alone writes and deletes
    assert len(r0["teacher"]) == 1 and r0["teacher"] == r1["teacher"]  # the MA's final.pt, complete
    assert len(r0["soft"]) == 1 and r0["soft"] == r1["soft"] and r0["soft"][0][:2] == ["memmap", "float16"]
    corpus = C.load_corpus(str(psl_tiny), "full")
    ma = np.resize(C.PseudoBalancedSampler(psl.weak_targets(corpus, corpus.train)).epoch_indices(0), 70)
    assert r0["shards"][0] == ma[0::2].tolist() and r1["shards"][0] == ma[1::2].tolist()  # 69 clips: 35 each
    s0, s1 = r0["shards"][1], r1["shards"][1]  # the student's first epoch: 48 chunks, 24 each, disjoint
    assert len(s0) == len(s1) == 24 and not set(s0) & set(s1) and set(s0) | set(s1) == set(range(48))
    (teacher,), (relabel,) = stages.glob("teacher-*"), stages.glob("relabel-*")
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert [f for f in files(out) if "top_step" not in f] == [".lock", "config.json", "log.jsonl", "results.json",
                                                              "results.md", "student/final.pt", "student/last.pt",
                                                              "student/topk.json"]
    assert len([f for f in files(out) if "top_step" in f]) == 1  # --top-k 1
    assert files(relabel) == [".lock", "soft.npy", "stage.json"]
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    args = psl.resolve(psl.parse_args(argv), corpus)
    ds = psl.chunk_dataset(corpus, corpus.train, np.zeros((24, 0)), 2.0, 4.0)
    ref = psl.predict_chunks(psl.build_model(C.load_checkpoint(teacher / "final.pt")), ds, args)  # one process
    np.testing.assert_allclose(np.load(relabel / "soft.npy"), ref, atol=1e-3)  # both ranks' rows, float16
    for log, steps in ((teacher / "log.jsonl", [2]), (out / "log.jsonl", [1, 2])):  # MA: every half epoch
        lines = [json.loads(l) for l in log.read_text().splitlines()]
        assert [r["step"] for r in lines if "end" not in r] == steps and lines[-1]["end"], log  # + the plateau line
    assert json.loads((out / "results.json").read_text())["skipped_clips"]["student_train"] == 0


def test_psl_train_step_under_bf16_and_scores_float32(psl_tiny, tmp_path):
    """AMP: the real training step (MA: augmentation, mix-up, SpecAugment) under --amp bf16 on CPU for a few
    steps gives finite fp32 losses; evaluation scores and the relabel cache rows are computed in fp32."""
    args = psl.parse_args(["--amp", "bf16", "--workers", "0", "--batch-size", "4"])
    torch.manual_seed(0)
    model, dtype = psl.MobileNetV2(5), C.amp_dtype(torch.device("cpu"), "bf16")
    opt, scaler = torch.optim.Adam(model.parameters(), 1e-3), C.grad_scaler(torch.device("cpu"), dtype)
    wave, y = torch.randn(4, C.SR) * 0.1, torch.cat([torch.zeros(4, 5), (torch.rand(4, 5) < 0.3).float()], 1)
    before = model.classifier[1].weight.clone()
    losses = [psl.train_step(model, wave, y, opt, scaler, args, 5, 0.0, dtype, psl.spec_augment(args)) for _ in range(3)]
    assert all(l.dtype == torch.float32 and torch.isfinite(l) for l in losses)
    assert not torch.equal(before, model.classifier[1].weight)
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    a = psl.resolve(psl.parse_args(["--data-root", str(psl_tiny), "--amp", "bf16", "--workers", "0"]), corpus)
    ds = psl.chunk_dataset(corpus, corpus.eval[:3], np.zeros((3, 0)), 2.0, 4.0)
    scores = psl.predict_chunks(psl.MobileNetV2(len(corpus.labels)), ds, a)
    assert scores.dtype == np.float32 and np.isfinite(scores).all()


def test_psl_step_has_no_host_sync():
    """GPU-ready: no .item() / .cpu() / float(tensor) / .numpy() / .tolist() in the per-step code."""
    import inspect
    src = "".join(inspect.getsource(f) for f in (psl.train_step, psl.bce, psl.spec_augment))
    loop = inspect.getsource(psl.train)
    loop = loop[loop.index("for j, batch"):loop.index("if state[\"step\"] % eval_every")]  # the per-step body
    assert "train_step(" in loop and not re.search(r"\.item\(|\.cpu\(|(?<!\.)float\(|\.numpy\(|\.tolist\(", src + loop)


PSL_BAD_FLAGS = [["--segment", "0"], ["--segment", "-2"], ["--segment", "nan"], ["--alpha", "1.5"], ["--alpha", "nan"],
                 ["--batch-size", "0"], ["--lr", "0"], ["--lr", "inf"], ["--epochs", "0"], ["--teacher-epochs", "-1"],
                 ["--top-k", "0"], ["--threshold", "2"], ["--patience", "0"], ["--eval-every", "0"],
                 ["--eval-every", "0b"], ["--eval-every", "2.5b"], ["--ma-eval-every", "nan"], ["--preset", "gpu"],
                 ["--ma-eval-every", "-3"], ["--mixup-alpha", "0"], ["--gain-db", "-1"], ["--max-shift-s", "nan"],
                 ["--freq-mask", "-1"], ["--max-steps", "0"], ["--synth-scale", "0"], ["--workers", "-1"],
                 ["--table", "4"], ["--labels", "strong"], ["--poly-power", "-1"], ["teacher", "--lr", "-1"],
                 ["predict", "--top", "0", "--ckpt", "x.pt", "a.wav"], ["predict", "--segment", "nan", "--ckpt", "x.pt",
                                                                         "a.wav"]]


@pytest.mark.parametrize("argv", PSL_BAD_FLAGS, ids=lambda a: "_".join(a[:3]))
def test_psl_bad_flags_are_one_line_usage_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        psl.main(argv + ([] if argv[0] == "predict" else ["--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(a for a in argv if a.startswith("--"))
    assert e.value.code == 2 and ": error: " in err[-1] and flag in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o").exists()


def _psl_bad_input(case: str, root: Path, tmp: Path) -> tuple[list, str]:
    """Set up one bad input; returns (argv, a piece of the expected one-line error)."""
    corpus = tmp / "corpus"
    if case in ("class_labels", "manifest", "ontology", "manifest_label"):
        shutil.copytree(root, corpus)
    ckpt = tmp / "ck.pt"
    argv = lambda *x: _argv(root, tmp / "out", "--max-steps", "1", *x)
    if case == "teacher_other_script":
        torch.save({"model": {}, "config": {}}, ckpt)  # psla.py's wa.pt
        return argv("--teacher", ckpt), "ck.pt: not a psl.py model checkpoint (a student's or MA's final.pt) but psla.py's"
    if case == "teacher_at_transfer":
        torch.save({"model": {}, "arch": "mbv2", "labels": {"mids": []}, "script": "at_transfer"}, ckpt)
        return argv("--teacher", ckpt), "but at_transfer.py's"
    if case == "teacher_missing":
        return argv("--teacher", tmp / "none.pt"), "none.pt: checkpoint not found"
    if case == "teacher_garbage":
        ckpt.write_bytes(b"\x00not a checkpoint" * 10)
        return argv("--teacher", ckpt), "ck.pt: not a PyTorch checkpoint"
    if case == "teacher_folder":
        return argv("--teacher", tmp), f"{tmp}: a folder, not a checkpoint file"
    if case == "predict_other_script":
        torch.save({"model": {}, "config": {}}, ckpt)
        return ["predict", "--ckpt", str(ckpt), "a.wav"], "but psla.py's"
    if case == "out_file":
        (tmp / "out").write_text("mine")
        return argv(), "exists and is not a folder"
    if case == "out_under_a_file":
        (tmp / "f").write_text("mine")
        return _argv(root, tmp / "f" / "out"), "cannot write the run folder"
    if case == "out_other_script":
        C.report(tmp / "out", {"mAP": 0.5}, "x", quiet=True)
        C.write_json(tmp / "out" / "config.json", {"script": "psla", "identity": {}})
        return argv(), "a run folder of psla.py, not psl.py"
    if case == "out_user_results":
        (tmp / "out").mkdir()
        (tmp / "out" / "results.json").write_text("{}")
        return argv(), "holds results.json, not written by psl.py"
    if case == "data_root_missing":
        return _argv(tmp / "nothing", tmp / "out"), "data root not found"
    if case == "class_labels":
        (corpus / "class_labels_indices.csv").write_text("a,b\n1,2\n")
    elif case == "manifest":
        (corpus / "balanced_train.tsv").write_bytes(np.random.default_rng(0).bytes(300))
    elif case == "ontology":
        (corpus / "ontology.json").write_text((corpus / "ontology.json").read_text()[:50])
    elif case == "manifest_label":
        (corpus / "eval.tsv").write_text("audio/x.wav\t/m/not_a_class\n")
    if case == "seeds":
        return ["seeds", "--row", "a", "r1"], "python common.py seeds"
    return _argv(corpus, tmp / "out"), str(corpus)


@pytest.mark.parametrize("case", ["teacher_other_script", "teacher_at_transfer", "teacher_missing", "teacher_garbage",
                                  "teacher_folder", "predict_other_script", "out_file", "out_under_a_file",
                                  "out_other_script", "out_user_results", "data_root_missing", "class_labels",
                                  "manifest", "ontology", "manifest_label", "seeds"])
def test_psl_bad_inputs_are_one_line_errors(case, psl_tiny, tmp_path):
    """Bad input: one line naming the file or folder (the __main__ guard prints `error: ...`), before any
    work; no file of the user's is changed or removed, nothing is trained."""
    argv, expected = _psl_bad_input(case, psl_tiny, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(C.DataError) as e:
        psl.main([str(a) for a in argv])
    assert expected in str(e.value) and "\n" not in str(e.value)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing of the user's changed or removed, nothing written (but claim_run's lock)


def test_psl_bad_input_from_the_command_line_is_one_line(tmp_path):
    torch.save({"model": {}, "config": {}}, tmp_path / "wa.pt")
    r = run_cli("psl.py", "--teacher", tmp_path / "wa.pt", "--out", tmp_path / "o", "--data-root", tmp_path / "none",
                check=False)
    assert r.returncode == 1 and r.stdout.strip().startswith("error: ") and len(r.stdout.strip().splitlines()) == 1


# =============================================================================================
# psla.py: model size and shapes, ImageNet loading, attention pooling, Algorithms 1 and 2, the LR
# schedule, and an end-to-end run (save -> reload -> eval, resume, label enhancement, ensembles)
# =============================================================================================
# torchvision's ImageNet state-dict keys and shapes (facts, no weights), shipped in data/reference/
REFERENCE = C.HERE / "data" / "reference" / "torchvision_imagenet_state_dict_shapes.json"


def test_psla_parameter_count_and_shapes():
    model = psla.PSLANet(527, effnet=2, heads=4)
    assert psla.count_parameters(model) == 13_640_766  # the official B2, 4 heads, 527 classes
    assert psla.count_parameters(psla.PSLANet(527, effnet=0)) == 9_407_672
    x = torch.zeros(1, 1, 128, 1056)
    assert model.effnet(x).shape == (1, 1408, 4, 33)  # Sec. II-C: 33 x 4 x 1408
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 16000 * 10)).shape == (2, 527)


def _torchvision_like_file(path, b):
    shapes = json.loads(REFERENCE.read_text())[f"efficientnet_b{b}"]
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(7) if not s else torch.randn(s, generator=gen)) for k, s in shapes.items()}
    torch.save(state, path)
    return state


def test_psla_imagenet_loading_counts(tmp_path):
    for b, total in ((0, 360), (2, 508)):
        state = _torchvision_like_file(tmp_path / f"b{b}.pth", b)
        model = psla.PSLANet(30, effnet=b)
        stem = model.effnet.features[0][0].weight.clone()
        head = model.attention.att.weight.clone()
        report = psla.load_imagenet(model, str(tmp_path / f"b{b}.pth"))
        assert report["total"] == total and report["loaded"] == total - 3
        assert sorted(report["skipped"]) == ["classifier.1.bias", "classifier.1.weight", "features.0.0.weight"]
        own = model.effnet.state_dict()
        assert torch.equal(own["features.0.1.weight"], state["features.0.1.weight"])  # stem BN is loaded
        assert torch.equal(own["features.8.0.weight"], state["features.8.0.weight"])
        assert torch.equal(model.effnet.features[0][0].weight, stem)  # 1-channel stem kept random
        assert torch.equal(model.attention.att.weight, head)
    with pytest.raises(C.DataError):  # a B0 file into a B2 model
        psla.load_imagenet(psla.PSLANet(30, effnet=2), str(tmp_path / "b0.pth"))
    with pytest.raises(C.DataError):
        psla.load_imagenet(psla.PSLANet(30, effnet=0), "url-that-is-not-a-file.pth")


def test_psla_attention_pooling_by_hand():
    pool = psla.MultiHeadAttentionPooling(channels=1, n_classes=1, heads=2)
    with torch.no_grad():
        pool.att.weight[:] = torch.tensor([1.0, 0.0]).view(2, 1, 1)
        pool.att.bias.zero_()
        pool.cla.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1)
        pool.cla.bias.zero_()
        pool.head_weight[:] = torch.tensor([0.3, 0.5])
    x = torch.tensor([[[0.0, 2.0]]])  # (B=1, C=1, T=2)
    s = torch.sigmoid
    a = s(torch.tensor([0.0, 2.0]))
    head1 = (a / a.sum() * s(torch.tensor([0.0, 2.0]))).sum()  # attention normalised by its sum over time
    head2 = (0.5 * s(torch.tensor([0.0, -2.0]))).sum()  # constant attention -> plain mean over time
    expected = 0.3 * head1 + 0.5 * head2
    assert torch.allclose(pool(x), expected.view(1, 1), atol=1e-6)
    assert psla.MultiHeadAttentionPooling(8, 5, 4)(torch.randn(3, 8, 7)).shape == (3, 5)


def test_psla_sampling_weights_by_hand():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=np.float32)  # counts 3, 1, 2
    expected = [1 / 3, 1 / 3 + 1, 1 / 2, 1 / 3 + 1 / 2]
    assert np.allclose(C.generate_sampling_weights(y), expected)


def test_psla_enhance_labels_on_a_toy_ontology():
    # G -> P -> {C1, C2}; X unrelated. Classes in this order.
    mids = ["G", "P", "C1", "C2", "X"]
    labels = C.Labels(mids, mids)
    children = {"G": ["P"], "P": ["C1", "C2"], "C1": [], "C2": [], "X": []}
    parents = {"P": ["G"], "C1": ["P"], "C2": ["P"]}
    onto = C.Ontology({m: m for m in mids}, children, parents)
    y = np.array([[0, 1, 0, 0, 0],   # P only: Type I candidates C1, C2
                  [0, 0, 0, 1, 0],   # C2 only: Type II candidates P, G
                  [1, 1, 1, 1, 1]], dtype=np.float32)
    s = np.array([[.4, .9, .8, .1, .9],
                  [.9, .9, .9, .9, .9],
                  [.5, .5, .6, .5, .5]], dtype=np.float32)
    # thresholds: G .5, P (.9+.5)/2=.7, C1 .6, C2 (.9+.5)/2=.7, X .5 (clip 0: ancestor G .4 < .5)
    e1, t = psla.enhance_labels(s, y, labels, onto, "type1")
    assert np.allclose(t, [.5, .7, .6, .7, .5])
    added1 = (e1 > 0) & (y == 0)
    assert added1.nonzero() == (np.array([0]), np.array([2]))  # clip 0 gains C1 (.8 > .6), not C2 or X
    e2, _ = psla.enhance_labels(s, y, labels, onto, "type2")
    added2 = (e2 > 0) & (y == 0)
    assert sorted(zip(*added2.nonzero())) == [(1, 0), (1, 1)]  # clip 1 gains P and its ancestor G
    e12, _ = psla.enhance_labels(s, y, labels, onto, "type12")
    assert np.array_equal(e12, np.maximum(e1, e2)) and (e12 >= y).all()  # union; labels only added


def test_psla_learning_rate_schedule():
    a = psla.parse_args(["--data", "balanced", "--preset", "paper"])
    psla.resolve_schedule(a)
    assert (a.epochs, a.lr, a.batch_size, a.wa_start, a.balanced_sampling) == (60, 1e-3, 100, 41, False)
    lr = lambda e, s=10_000: psla.learning_rate(a, e, s)
    assert lr(35) == 1e-3 and lr(36) == 5e-4 and lr(40) == 5e-4 and lr(41) == 2.5e-4 and lr(46) == 1.25e-4
    assert np.isclose(psla.learning_rate(a, 1, 0), 1e-6) and np.isclose(psla.learning_rate(a, 1, 499), 5e-4)
    f = psla.parse_args(["--data", "full", "--preset", "paper"])
    psla.resolve_schedule(f)
    assert (f.epochs, f.lr, f.wa_start, f.balanced_sampling) == (30, 1e-4, 16, True)
    c = psla.parse_args(["--data", "full", "--device", "cpu"])  # auto without a GPU: the CPU schedule, on any corpus (issue 20)
    psla.resolve_schedule(c)
    assert (c.preset, c.epochs, c.lr, c.wa_start) == ("cpu", 6, 1e-3, 5)


def test_psla_end_to_end_save_reload_resume_enhance_ensemble(tiny_root, tmp_path):
    """Every stage in one process: train -> WA -> ensembles; the WA checkpoint alone rebuilds the model;
    a finished run is returned as it is; [teacher -> label enhancement] with the teacher as a shared stage
    (keyed by its settings; a second run reads it from disk and trains the same student); committees of
    runs through the common idiom; the seeds table over psla's results.json keys."""
    base = ["--data-root", str(tiny_root), "--effnet", "0", "--target-length", "64", "--epochs", "2",
            "--batch-size", "8", "--workers", "0"]
    run = tmp_path / "run"
    res = psla.main(base + ["--out", str(run)])
    for f in ("config.json", "log.jsonl", "results.json", "results.md", "last.pt", "best.pt", "wa.pt",
              "weights/e002.pt", "preds/eval_e001.npy", "preds/eval_e002.npy", "preds/eval_wa.npy"):
        assert (run / f).exists(), f
    log = [json.loads(line) for line in open(run / "log.jsonl")]  # one line per epoch, each with its plateau
    assert res["epochs"] == 2 and len(log) == 2 and log[-1]["plateau"] == res["convergence"]["plateau"]
    assert res["convergence"]["validations"] == 2 and not res["convergence"]["plateau"]  # too short to tell
    for key in ("last_n", "best", "wa"):
        assert 0 < res[key]["mAP"] <= 1 and 0 <= res[key]["mAUC"] <= 1
    assert res["checkpoint_ensemble"]["models"] == 2 and len(res["last_AP"]) == 30 and res["wa"]["n"] == 24
    # save -> reload -> eval: the WA checkpoint alone rebuilds the model and reproduces its score
    config, weights = psla.read_checkpoint(run / "wa.pt")
    model = psla.build_model(config)
    model.load_state_dict(weights)
    corpus = C.load_corpus(str(tiny_root))
    targets = corpus.targets(corpus.eval)
    loader = psla.clip_loader(psla.Clips(corpus.root, corpus.eval, targets, config["target_length"]), 16, 0)
    scores, _ = psla.predict(model, loader, len(targets), 30, torch.device("cpu"), None)
    assert np.isclose(psla.metrics(targets, scores)["mAP"], res["wa"]["mAP"], atol=1e-6)
    # a finished run with the same settings is returned, not retrained
    again = psla.main(base + ["--out", str(run)])
    assert again == json.loads((run / "results.json").read_text()) and len(open(run / "log.jsonl").readlines()) == 2
    # label enhancement: the teacher (this recipe, original labels) trained as a shared stage beside --out
    le = ["--label-enhance", "type12", "--max-steps", "2", "--seed", "1"]
    res_le = psla.main(base + le + ["--out", str(tmp_path / "le")])
    (teacher,) = tmp_path.glob("teacher-*")
    assert json.loads((teacher / "stage.json").read_text())["label_enhance"] == "none"
    stats = json.loads((tmp_path / "le" / "label_enhancement.json").read_text())
    enhanced, original = C.read_manifest(tmp_path / "le" / "train_type12.tsv"), dict(corpus.train)
    assert all(set(original[fn]) <= set(m) for fn, m in enhanced)  # labels are only added
    assert sum(len(m) - len(original[fn]) for fn, m in enhanced) == stats["type12"]["labels_added"]
    assert 0 <= stats["type12"]["precision"] <= 1 and res_le["steps"] == 2 and "label_enhancement" in res_le
    teacher_log = (teacher / "log.jsonl").read_text()
    from_disk = psla.main(base + le + ["--out", str(tmp_path / "le2")])  # the same teacher: read, not retrained
    assert (teacher / "log.jsonl").read_text() == teacher_log and len(list(tmp_path.glob("teacher-*"))) == 1
    # the student does not depend on whether its teacher was trained in this process or read from disk
    assert (from_disk["last_n"], from_disk["best"]) == (res_le["last_n"], res_le["best"])
    finished = json.loads((tmp_path / "le" / "results.json").read_text())
    assert psla.main(base + le + ["--out", str(tmp_path / "le")]) == finished  # its identity matches: returned
    # committees of runs (Table X) through the common idiom: claim_run's folder, results.json / .md
    row = psla.main(["ensemble", str(run), str(tmp_path / "le"), "--out", str(tmp_path / "ens")])
    assert row["models"] == 2 and row["best_mAP"] >= row["avg_mAP"] and (tmp_path / "ens" / "results.md").exists()
    assert json.loads((tmp_path / "ens" / "config.json").read_text())["script"] == "psla-ensemble"
    with pytest.raises(C.DataError, match="a run folder of psla.py"):  # never over a training run's files
        psla.main(["ensemble", str(run), "--out", str(run)])
    with pytest.raises(C.DataError, match="no preds/eval_wa.npy"):  # the 2-step run has no WA model
        psla.main(["ensemble", str(tmp_path / "le"), "--which", "wa", "--out", str(tmp_path / "ens")])
    # seeds tables: `python common.py seeds --key last_n.mAP ...` reads psla's results.json
    table = C.seeds_table([["two", str(run), str(tmp_path / "le")], ["one", str(run)]], ["last_n.mAP", "best.mAP"],
                          tmp_path / "seeds")
    assert table["two"]["last_n.mAP"] == [res["last_n"]["mAP"], res_le["last_n"]["mAP"]]
    # a user's wav (issue 21): `predict --ckpt RUN` uses the final model (wa.pt, which names its classes) and
    # scores an eval clip as the saved eval scores of the WA model; the figure from the real results.json formats
    assert psla.read_checkpoint(run / "wa.pt", meta=True)[2]["labels"]["names"] == corpus.labels.names
    clip = str(corpus.root / corpus.eval[0][0])
    tags = psla.main(["predict", "--ckpt", str(run), clip])[clip]
    assert np.allclose(tags["windows"][0], np.load(run / "preds" / "eval_wa.npy")[0], atol=1e-5)
    drawn = psla.main(["plot", str(run), str(tmp_path / "ens"), str(tmp_path / "seeds"), "--out", str(tmp_path / "f.png")])
    assert (tmp_path / "f.png").is_file() and [r["value"] for r in drawn["rows"]][:4] == [
        res["last_n"]["mAP"], res["best"]["mAP"], res["wa"]["mAP"], res["checkpoint_ensemble"]["ensemble_mAP"]]


@pytest.fixture(scope="session")
def psla_short_root(tiny_root, tmp_path_factory) -> Path:
    """tiny_root with clips cut short: training 2 s, valid 3 s, eval 0.5 s (first 5) and 3 s (issue 13)."""
    root = tmp_path_factory.mktemp("psla_short") / "synth"
    shutil.copytree(tiny_root, root)
    seconds = {"balanced_train": lambda i: 2.0, "valid": lambda i: 3.0, "eval": lambda i: 0.5 if i < 5 else 3.0}
    for manifest, length in seconds.items():
        for i, (fn, _) in enumerate(C.read_manifest(root / f"{manifest}.tsv")):
            x, sr = sf.read(root / fn, dtype="float32")
            sf.write(root / fn, x[: int(length(i) * sr)], sr, subtype="FLOAT")
    return root


def test_psla_short_clips_padded_in_the_fbank_domain(psla_short_root, tmp_path, monkeypatch):
    """Issue 13 item 8: frames past a short clip's end are exactly 0 after normalisation (the dataset
    mean, deviation 5) in training and evaluation, not log(eps) of a waveform padded to 10 s; the
    fbank statistics are over the real frames only."""
    seen = []
    spectrogram = psla.PSLANet.spectrogram

    def record(self, *a, **kw):
        x = spectrogram(self, *a, **kw)
        seen.append((self.training, x.detach().clone()))
        return x
    monkeypatch.setattr(psla.PSLANet, "spectrogram", record)
    res = psla.main(["--data-root", str(psla_short_root), "--out", str(tmp_path / "r"), "--effnet", "0",
                     "--target-length", "400", "--epochs", "1", "--max-steps", "1", "--batch-size", "8",
                     "--workers", "0"])
    real = {True: set(), False: set()}
    for training, x in seen:  # (B, 400, F)
        for row in x:
            n = int((row != 0).any(1).sum())  # frames holding anything
            assert (row[n:] == 0).all(), "non-zero frames after the first padded one"
            real[training].add(n)
    assert real == {True: {198}, False: {48, 298}}  # 2 s training, 0.5 s / 3 s eval and valid clips
    corpus = C.load_corpus(str(psla_short_root))
    fb = C.KaldiFbank()
    x = torch.cat([fb(torch.from_numpy(C.load_audio(psla_short_root / fn))[None])[0] for fn, _ in corpus.train])
    assert x.shape[1] == 128 and len(x) == 198 * len(corpus.train)
    np.testing.assert_allclose(res["config"]["norm"], [x.double().mean(), x.double().std(unbiased=False)], rtol=1e-5)


def test_psla_batch_padding_equals_each_clip_alone():
    """A 3 s clip batched with a 10 s one: its real frames are its own fbank, the rest exactly 0."""
    model = psla.PSLANet(5, effnet=0, target_length=1056, norm=(-8.0, 3.0)).eval()
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(3 * C.SR, generator=g), torch.randn(10 * C.SR, generator=g)
    wave, _, _, n = psla.collate([(short, torch.zeros(5), 0), None, (long, torch.zeros(5), 1)])
    assert wave.shape == (2, 10 * C.SR) and n.tolist() == [3 * C.SR, 10 * C.SR]
    x = model.spectrogram(wave, n)  # (2, 1056, 128)
    alone = model.spectrogram(short[None])
    assert psla.n_frames(n).tolist() == [298, 998] and (x[0, 298:] == 0).all() and (x[1, 998:] == 0).all()
    torch.testing.assert_close(x[0, :298], alone[0, :298], atol=1e-5, rtol=1e-5)
    assert (alone[0, 298:] == 0).all() and (x[0, :298] != 0).any(1).all()
    assert psla.n_frames(torch.tensor([0, 399, 400, 559, 560])).tolist() == [0, 0, 1, 1, 2]


def test_psla_mixup_partner_cut_or_padded_to_the_clip():
    """Clips of different lengths: the mix has the first clip's length (official dataloader); the draws
    are a function of (seed, epoch, position): the same key gives the same mix."""
    items = [(torch.ones(5), torch.tensor([1.0, 0.0]), 0), (torch.ones(8), torch.tensor([0.0, 1.0]), 1),
             (torch.ones(2), torch.tensor([0.0, 1.0]), 2)]
    mix = psla.MixupClips(items, rate=1.0, alpha=10.0, seed=3)
    for i in range(3):
        for position in range(5):
            wave, y, idx = mix[i, 1, position]
            assert len(wave) == len(items[i][0]) and idx == i and np.isclose(float(y.sum()), 1.0)
            assert torch.equal(mix[i, 1, position][1], y)
    assert len({float(mix[0, e, 0][1][0]) for e in range(6)}) > 1  # a new epoch, new draws


def test_psla_workers_from_fork_server_give_the_same_batches(tiny_root):
    """Issue 12: training workers started from the fork server (not forked from the training process)
    give exactly the batches of --workers 0: the mix-up draws do not depend on the worker."""
    corpus = C.load_corpus(str(tiny_root))
    targets = corpus.targets(corpus.train)
    ds = psla.MixupClips(psla.Clips(corpus.root, corpus.train, targets, 64), 1.0, 10.0, seed=3)
    args = psla.parse_args(["--seed", "3", "--no-balanced-sampling"])
    items = psla.epoch_items(args, targets, 1)
    inline = psla.clip_loader(ds, 4, 0, sampler=items, persistent=False)
    server = psla.clip_loader(ds, 4, 2, sampler=items, persistent=False)
    assert server.multiprocessing_context.get_start_method() == "forkserver"
    for a, b in zip(inline, server, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_psla_counts_short_clips(psla_short_root, tmp_path):
    """Issue 13: clips shorter than --short-clip-seconds are used (padded) and counted per split, in
    every log line and in results.json, next to the skipped clips."""
    out = tmp_path / "r"
    res = psla.main(["--data-root", str(psla_short_root), "--out", str(out), "--effnet", "0", "--target-length",
                     "320", "--epochs", "1", "--max-steps", "1", "--batch-size", "8", "--workers", "0",
                     "--short-clip-seconds", "2.5"])  # 320 frames read 3.19 s: 2 s and 0.5 s clips are short
    assert res["short_clips"] == {"train": 8, "valid": 0, "eval": 5} and res["short_clip_seconds"] == 2.5
    assert res["skipped_clips"] == {"train": 0, "valid": 0, "eval": 0}
    line = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert (line["train/short"], line["valid/short"], line["eval/short"]) == (8, 0, 5)
    assert psla.parse_args([]).short_clip_seconds == 1.0
    # a clip cut to the target length (64 frames = 10,480 samples) is never short
    assert psla.is_short(torch.tensor([10_479, 10_480]), 2.5, 64).tolist() == [True, False]


# ---- issue 19: psla.py in the run-time idiom (exact resume, DDP, workers, AMP, bench, bad input) ----
PSLA_TINY = ["--effnet", "0", "--target-length", "64", "--epochs", "2", "--batch-size", "8", "--wa-start", "1"]


@pytest.fixture(scope="session")
def psla_ref(tiny_root, tmp_path_factory) -> Path:
    """An uninterrupted tiny run in a subprocess (1 thread, as the killed runs): 3 steps per epoch."""
    out = tmp_path_factory.mktemp("psla_ref") / "run"
    run_cli("psla.py", "--data-root", tiny_root, "--out", out, *PSLA_TINY, "--workers", "0")
    return out


def _psla_metrics(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    return {k: res[k] for k in ("last_n", "best", "wa", "checkpoint_ensemble", "last_AP", "steps", "epochs")}


def test_psla_killed_anywhere_resumes_bit_identical(tiny_root, psla_ref, tmp_path):
    """Exact resume: one run SIGKILLed three times, resumed each time by the same command: mid-epoch
    (step 5, in epoch 2: resumed from the --save-every 2 checkpoint of step 4), during a checkpoint write
    (weights/e002.pt written, not renamed), and right after the last.pt that ends the training stage
    (before weight averaging). Its results.json metrics equal the uninterrupted run's; no temp file is left."""
    out = tmp_path / "run"
    args = ["--data-root", tiny_root, "--out", out, *PSLA_TINY, "--workers", "0", "--save-every", "2"]
    log = [json.loads(line) for line in (psla_ref / "log.jsonl").read_text().splitlines()]
    # the third process resumes at step 4 and saves e002, [best.pt if epoch 2 beats epoch 1 on valid],
    # last.pt: the end of the training stage
    end_of_training = f"saved:{2 + (log[1]['valid/mAP'] > log[0]['valid/mAP'])}"
    for kill_at in ("step:5", "write:1", end_of_training):
        r = run_cli("psla.py", *args, env={"KILL_AT": kill_at}, check=False)
        assert r.returncode in (-9, 137), f"{kill_at}: {r.stdout[-3000:]}"
        if kill_at == "write:1":
            assert (out / "weights" / "e002.pt.tmp").exists() and not (out / "weights" / "e002.pt").exists()
    assert C.load_checkpoint(out / "last.pt")["state"]["loop"]["epoch"] == 3 and not (out / "wa.pt").exists()
    run_cli("psla.py", *args)  # the documented resume: the same command
    assert _psla_metrics(out) == _psla_metrics(psla_ref)
    assert leftovers(out) == [] and (out / "log.jsonl").read_text().count('"epoch"') == 2


def test_psla_ddp_two_processes_one_set_of_outputs(tiny_root, psla_ref, tmp_path):
    """torchrun, 2 gloo processes: label enhancement with a finished run as teacher, then training.
    Rank 0 alone writes (one set of outputs, each log line once, one report); each rank trains on its
    half of every epoch (2 steps of 12 clips, not 3 of 24); rank 1 reads the enhanced manifest only
    after rank 0 wrote it (without that barrier it finds no manifest and the run fails)."""
    out = tmp_path / "ddp"
    r = run_cli("psla.py", "--data-root", tiny_root, "--out", out, *PSLA_TINY, "--workers", "0",
                "--label-enhance", "type12", "--teacher", psla_ref, nproc=2)
    assert r.stdout.count("results: ") == 1 and json.loads((out / "results.json").read_text())["steps"] == 4
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "best.pt", "config.json", "label_enhancement.json", "last.pt", "log.jsonl", "preds", "results.json",
        "results.md", "train_type12.tsv", "wa.pt", "weights"]
    assert leftovers(out) == []


def test_psla_ranks_draw_disjoint_shards_of_each_epoch(monkeypatch):
    """Each rank's share of an epoch (common.shard of the epoch's positions): disjoint, together the
    epoch, equal lengths (padded by wrapping when the epoch does not divide), for both samplers."""
    for sampling in ("--balanced-sampling", "--no-balanced-sampling"):
        args = psla.parse_args(["--seed", "4", sampling])
        for n in (24, 23):
            targets = np.eye(5, dtype=np.float32)[np.arange(n) % 5]
            whole = psla.epoch_items(args, targets, 3)
            shares = []
            for r in range(2):
                with monkeypatch.context() as m:
                    m.setattr(C, "world_size", lambda: 2)
                    m.setattr(C, "rank", lambda r=r: r)
                    shares.append(psla.epoch_items(args, targets, 3))
            assert len(shares[0]) == len(shares[1]) == 12 and set(shares[0]) | set(shares[1]) == set(whole)
            assert n == 23 or set(shares[0]).isdisjoint(shares[1])
        assert psla.epoch_items(args, targets, 3) != psla.epoch_items(args, targets, 4)  # a new order per epoch


def test_psla_loader_workers_die_with_a_killed_run(tiny_root, tmp_path):
    """The loader workers start from the fork server, so they are not the trainer's children, and the
    server lives while any worker does: both outlived a SIGKILLed run by 26 minutes. Now every process
    of the run (marked by an environment variable) is gone within seconds of the kill."""
    import subprocess
    import sys
    import time
    mark = f"psla-test-{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT": "step:2", "PSLA_TEST_MARK": mark}
    with open(tmp_path / "out.log", "w") as log:  # a file, not a pipe: a leaked worker must not block us
        r = subprocess.run([sys.executable, str(HERE / "psla.py"), "--data-root", str(tiny_root), "--out",
                            str(tmp_path / "run"), *PSLA_TINY, "--workers", "2"], env=env, cwd=HERE, stdout=log,
                           stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode in (-9, 137), (tmp_path / "out.log").read_text()[-3000:]

    def marked() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                pids += [int(d.name)] if d.name.isdigit() and mark.encode() in (d / "environ").read_bytes() else []
            except OSError:
                pass
        return pids
    deadline = time.time() + 20
    while marked() and time.time() < deadline:
        time.sleep(0.5)
    left = marked()
    for pid in left:  # never leave them behind, even when this fails
        os.kill(pid, 9)
    assert left == []


def test_psla_bf16_on_cpu_float32_scores_and_no_resume_keeps_user_files(tiny_root, tmp_path):
    """--amp bf16 runs the training step on CPU; every saved score is float32 and finite. --no-resume
    removes what the run wrote, never a user's file in the folder."""
    out = tmp_path / "run"
    argv = ["--data-root", str(tiny_root), "--out", str(out), *PSLA_TINY, "--workers", "0", "--max-steps", "2",
            "--amp", "bf16"]
    res = psla.main(argv)
    assert res["steps"] == 2 and np.isfinite(res["last_n"]["mAP"]) and "wa" in res
    for f in ("eval_e001.npy", "eval_wa.npy"):
        scores = np.load(out / "preds" / f)
        assert scores.dtype == np.float32 and np.isfinite(scores).all()
    (out / "notes.txt").write_text("mine")
    (out / "weights" / "e007.pt").write_text("stale")  # named like ours: ours to remove
    again = psla.main(argv + ["--no-resume"])
    assert (out / "notes.txt").read_text() == "mine" and not (out / "weights" / "e007.pt").exists()
    assert again["last_n"] == res["last_n"]


def test_psla_training_step_has_no_host_sync():
    """The per-step path (train_step, the loop's body, is_short on the CPU lengths) never reads a device
    value back: no .item(), .cpu(), float(tensor), .numpy(), .tolist()."""
    import inspect
    loop = inspect.getsource(psla.train)
    body = loop[loop.index("for j, batch in"):loop.index("# ---- the epoch's end")]
    for code in (inspect.getsource(psla.train_step), body, inspect.getsource(psla.is_short)):
        assert not re.search(r"\.item\(|\.cpu\(|(?<![\w.])float\(|\.numpy\(|\.tolist\(", code), code


PSLA_BAD_FLAGS = [
    ["--batch-size", "0"], ["--epochs", "-1"], ["--lr", "nan"], ["--lr", "inf"], ["--mixup", "1.5"], ["--mixup", "-0.1"],
    ["--norm", "0", "0"], ["--norm", "nan", "1"], ["--workers", "-1"], ["--heads", "0"], ["--drop-connect", "1"],
    ["--n-mels", "0"], ["--target-length", "0"], ["--short-clip-seconds", "-1"], ["--freqm", "-1"],
    ["--mixup-alpha", "0"], ["--lr-decay-every", "0"], ["--warmup-steps", "-1"], ["--weight-decay", "-1"],
    ["--betas", "1", "0.999"], ["--wa-start", "0"], ["--last-n", "0"], ["--save-every", "0"], ["--effnet", "9"],
    ["--max-steps", "0"], ["--synth-scale", "0"], ["--teacher", "runs/psla/x"], ["--imagenet", "no/such.pth"],
    ["--label-enhance", "type3"], ["--seed", "x"]]


@pytest.mark.parametrize("argv", PSLA_BAD_FLAGS, ids=lambda a: "_".join(a))
def test_psla_bad_flag_is_one_line_before_any_work(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        psla.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "error: " in err[-1] and argv[0] in err[-1]  # names the flag
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


def _psla_bad_input(case: str, root: Path, tmp: Path) -> list:
    """The arguments of one bad-input case, with its files made under tmp (the user's files)."""
    run = tmp / "run"
    run.mkdir()
    if case == "teacher_psl_run":  # another script's checkpoint as the teacher
        torch.save({"model": {}, "state": {"script": "psl"}, "optimizer": {}}, run / "last.pt")
        return ["--label-enhance", "type1", "--teacher", run]
    if case == "teacher_without_checkpoint":
        return ["--label-enhance", "type1", "--teacher", run]
    if case == "teacher_random_bytes":
        (run / "wa.pt").write_bytes(os.urandom(300))
        return ["--label-enhance", "type1", "--teacher", run]
    if case == "teacher_plain_state_dict":
        torch.save(psla.PSLANet(30, effnet=0).state_dict(), run / "wa.pt")
        return ["--label-enhance", "type1", "--teacher", run]
    if case == "out_a_file":
        (run / "f.txt").write_text("mine")
        return ["--out", run / "f.txt"]
    if case == "out_under_a_file":
        (run / "f.txt").write_text("mine")
        return ["--out", run / "f.txt" / "sub"]
    if case == "out_read_only":
        return ["--out", "/proc/psla_run"]
    if case == "out_other_scripts_run":
        (run / "config.json").write_text(json.dumps({"script": "psl", "identity": {}}))
        (run / "last.pt").write_text("psl's")
        return ["--out", run]
    if case == "out_with_users_files_named_like_ours":
        (run / "results.md").write_text("my notes")
        return ["--out", run]
    if case == "out_other_settings":
        (run / "config.json").write_text(json.dumps({"script": "psla", "identity": {"lr": 0.5}}))
        return ["--out", run]
    if case == "ensemble_not_a_run":
        return ["ensemble", run, "--out", tmp / "ens"]
    if case == "ensemble_malformed_results":
        (run / "preds").mkdir()
        np.save(run / "preds" / "eval_targets.npy", np.zeros((2, 3)))
        (run / "results.json").write_text("{truncated")
        return ["ensemble", run, "--out", tmp / "ens"]
    meta = tmp / "meta"  # malformed metadata in a copy of the corpus' metadata (the audio linked)
    meta.mkdir()
    for f in root.iterdir():
        (meta / f.name).symlink_to(f) if f.is_dir() else shutil.copy(f, meta)
    bad = {"labels_csv_other_headers": ("class_labels_indices.csv", b"a,b\n1,2\n"),
           "ontology_truncated": ("ontology.json", (root / "ontology.json").read_bytes()[:100]),
           "manifest_random_bytes": ("balanced_train.tsv", os.urandom(300))}[case]
    (meta / bad[0]).write_bytes(bad[1])
    return ["--data-root", meta]


@pytest.mark.parametrize("case,match", [
    ("teacher_psl_run", r"last.pt: not a psla.py checkpoint \(a psl.py one\)"),
    ("teacher_without_checkpoint", "no wa.pt or last.pt"), ("teacher_random_bytes", "wa.pt: not a readable checkpoint"),
    ("teacher_plain_state_dict", "wa.pt: not a psla.py checkpoint"), ("out_a_file", "exists and is not a folder"),
    ("out_under_a_file", "cannot write"), ("out_read_only", "cannot write"),
    ("out_other_scripts_run", "a run folder of psl.py"), ("out_with_users_files_named_like_ours", "not written by"),
    ("out_other_settings", r"--lr 0.5 \(now 0.001\)"), ("ensemble_not_a_run", "not a finished psla.py run"),
    ("ensemble_malformed_results", "results.json: not a valid JSON"),
    ("labels_csv_other_headers", "class_labels_indices.csv"),
    ("ontology_truncated", "ontology.json"),
    ("manifest_random_bytes", "balanced_train.tsv")])
def test_psla_bad_input_is_one_line_and_keeps_every_file(case, match, tiny_root, tmp_path):
    """Foreign or broken checkpoints, unusable --out folders, malformed metadata: one line naming the
    file or the flags (DataError: `error: ...` from the command line), before any work; no file of the
    user's is changed or removed."""
    argv = [str(a) for a in _psla_bad_input(case, tiny_root, tmp_path)]
    argv = argv if argv[0] == "ensemble" else [*PSLA_TINY, "--workers", "0", "--out", str(tmp_path / "o"),
                                                 "--data-root", str(tiny_root), *argv]
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(C.DataError, match=match) as e:
        psla.main(argv)
    assert "\n" not in str(e.value) and {p: p.read_bytes() for p in files} == files
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock") == sorted(files)


# ---- issue 21: psla.py for a newcomer (help, predict a user's wav, the ablation figure, documented commands) ----
PSLA_PARSERS = ("train_parser", "ensemble_parser", "predict_parser", "plot_parser")


def test_psla_help_every_flag_has_help_and_shows_its_default(capsys):
    """Every flag of every parser has help text and shows its default (common.HelpFormatter); each sub-command's
    --help is its own (before: `psla.py predict --help` did not exist, `ensemble --help` had no defaults)."""
    for name in PSLA_PARSERS:
        p = getattr(psla, name)()
        assert p.formatter_class is C.HelpFormatter, name
        fmt = C.HelpFormatter(p.prog)
        for action in p._actions:
            if isinstance(action, __import__("argparse")._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name}: {action.dest} has no help"
            if action.default not in (None, False) or isinstance(action.default, bool):
                assert "default" in fmt._get_help_string(action).lower(), f"{name}: {action.dest} shows no default"
    for cmd in ("ensemble", "predict", "plot"):
        with pytest.raises(SystemExit) as e:
            psla.main([cmd, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: psla.py {cmd}"), out[:200]
    assert "(default: 5)" in psla.predict_parser().format_help() and "(default: last)" in psla.ensemble_parser().format_help()


def _psla_commands(text: str, prefix: str = "") -> list[list[str]]:
    """The `python psla.py ...` / `torchrun ... psla.py ...` command lines of bash text, as bash expands them
    (loops, variables), recorded by functions standing in for python and torchrun."""
    import subprocess
    rec = "python() { printf '%s\\037' \"$@\" >> \"$REC\"; printf '\\036' >> \"$REC\"; }\n" \
          "torchrun() { python \"$@\"; }\n"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"psla_rec_{os.getpid()}"
    path.unlink(missing_ok=True)
    path.touch()
    subprocess.run(["bash", "-c", rec + prefix + text], env={**os.environ, "REC": str(path)}, check=True,
                   cwd=C.HERE, stdout=subprocess.DEVNULL)
    cmds = [c.split("\x1f")[:-1] for c in path.read_text().split("\x1e")[:-1]]
    path.unlink()
    return [c[c.index("psla.py") + 1:] if "psla.py" in c else c for c in cmds]


def _psla_check_commands(cmds: list[list[str]], where: str) -> int:
    """Parse every psla.py command with psla's own parsers; every run folder a command reads was made by an
    earlier one (a training run's --out or runs/psla/<name>, an ensemble's or seeds table's --out)."""
    made, n = set(), 0
    for argv in cmds:
        if argv[:2] == ["common.py", "seeds"]:
            made.add(argv[argv.index("--out") + 1].rstrip("/"))
            continue
        if argv and argv[0].endswith(".py"):  # another script (data/prepare.py ...)
            continue
        n += 1
        cmd, a = psla.parse_command(argv)
        reads = {"train": [a.teacher] if cmd == "train" else [], "ensemble": getattr(a, "runs", []),
                 "plot": getattr(a, "runs", []), "predict": [getattr(a, "ckpt", None)]}[cmd]
        for r in filter(None, reads):
            r = r.rstrip("/")
            r = str(Path(r).parent) if r.endswith(".pt") else r
            assert r in made, f"{where}: {' '.join(argv)} reads {r}, which no earlier command makes"
        if cmd == "train":
            psla.resolve_schedule(a, Path(a.data_root) if a.data_root else None)
            made.add(a.out)
        elif cmd == "ensemble":
            made.add(a.out or f"runs/psla/ensemble_{a.which}")
    return n


def test_psla_docstring_and_docs_commands_run_as_written():
    """The docstring's command lines and every ```bash block of docs/psla.md: each psla.py command parses with
    psla's own parser (sub-commands included) and reads only run folders an earlier command makes (before:
    the ensemble example read le_s0 runs no command made; --teacher differed between README and --help)."""
    doc = [line.strip().split("  #")[0] for line in psla.__doc__.splitlines()
           if line.startswith("    python ") or line.startswith("    torchrun ")]
    assert _psla_check_commands(_psla_commands("\n".join(doc)), "psla.py's docstring") >= 10
    page = (C.HERE / "docs" / "psla.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", page, re.S)
    assert blocks and _psla_check_commands(_psla_commands("\n".join(blocks)), "docs/psla.md") >= 5
    teacher = "runs/psla/b2_balanced"  # the same --teacher in the docs, the docstring and --help
    assert f"--teacher {teacher}" in page and f"--teacher {teacher}" in psla.__doc__
    assert teacher in " ".join(psla.train_parser().format_help().split())
    assert "![" in page and "(figures/psla.png)" in page and (C.HERE / "docs" / "figures" / "psla.png").is_file()


def _psla_tiny_checkpoint(folder: Path, mids: list[str], labels: bool = True) -> Path:
    """A psla.py wa.pt of a B0 on 64 frames with 3 classes (random weights), as `python psla.py` writes it."""
    torch.manual_seed(0)
    config = dict(n_classes=3, effnet=0, heads=2, n_mels=128, target_length=64, norm=(-10.0, 3.0), freqm=0,
                  timem=0, drop_connect=0.0)
    model = psla.build_model(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    ck = {"script": "psla", "model": model.state_dict(), "config": config, "epochs": [1, 1]}
    if labels:
        ck["labels"] = {"mids": mids, "names": ["Tone", "Noise", "Click"]}
    torch.save(ck, folder / "wa.pt")
    return folder / "wa.pt"


def test_psla_predict_tags_a_wav_with_class_names_and_the_synthetic_warning(tmp_path, capsys):
    """`psla.py predict --ckpt RUN AUDIO`: top-k class names and probabilities per file; a file longer than the
    model's input is scored window by window (the max over windows); the synthetic-classes warning exactly
    when the checkpoint knows only /synth/ classes, also for a checkpoint saved without its labels (the
    run's results.json names the classes, its config says no --data-root)."""
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1, 16000)
    synth = ["/synth/p0", "/synth/p1", "/synth/p0c0"]
    ckpt = _psla_tiny_checkpoint(tmp_path / "run", synth)
    out = psla.main(["predict", "--ckpt", str(tmp_path / "run"), str(wav), "--top", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == C.synthetic_classes_warning(synth)
    res = out[str(wav)]
    assert res["windows"].shape == (4, 3)  # 2 s in windows of (64 - 1) * 160 + 400 samples (the last: 560)
    assert np.array_equal(res["scores"], res["windows"].max(0))
    config, weights = psla.read_checkpoint(ckpt)
    model = psla.build_model(config).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        first = model(torch.from_numpy(C.load_audio(wav)[:psla.clip_samples(64)])[None]).numpy()[0]
    assert np.allclose(res["windows"][0], first, atol=1e-6)
    top = np.argsort(-res["scores"])[:2]
    names = ["Tone", "Noise", "Click"]
    assert lines[1] == f"{wav} (2.0 s, 4 windows): " + ", ".join(f"{names[k]} {res['scores'][k]:.2f}" for k in top)
    # last.pt (the resumable checkpoint) keeps its metadata under "state": the same tags
    C.save_state(tmp_path / "resumable" / "last.pt", model, script="psla", config=config, loop={},
                 labels={"mids": synth, "names": names})
    again = psla.main(["predict", "--ckpt", str(tmp_path / "resumable" / "last.pt"), str(wav), "--top", "2"])
    assert np.array_equal(again[str(wav)]["windows"], res["windows"]) and capsys.readouterr().out.splitlines()[1:] == lines[1:]
    # real class ids: no warning
    _psla_tiny_checkpoint(tmp_path / "real", ["/m/09x0r", "/m/04rlf", "/m/0k4j"])
    psla.main(["predict", "--ckpt", str(tmp_path / "real" / "wa.pt"), str(wav)])
    assert "warning" not in capsys.readouterr().out
    # a checkpoint saved without its labels (older runs): names from results.json, synthetic from its config
    old = tmp_path / "old"
    _psla_tiny_checkpoint(old, synth, labels=False)
    (old / "results.json").write_text(json.dumps({"classes": names, "config": {"data_root": None}}))
    psla.main(["predict", "--ckpt", str(old), str(wav)])
    assert capsys.readouterr().out.splitlines()[0] == C.synthetic_classes_warning(synth)


@pytest.mark.parametrize("case", ["psl_checkpoint", "random_bytes", "a_wav", "plain_state_dict", "missing",
                                  "folder_without_checkpoint", "no_class_names"])
def test_psla_predict_foreign_checkpoint_is_one_line(case, tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(8000, np.float32), 16000)
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "wa.pt"
    if case == "psl_checkpoint":
        torch.save({"model": {}, "state": {"script": "psl"}}, ckpt)
    elif case == "random_bytes":
        ckpt.write_bytes(os.urandom(300))
    elif case == "a_wav":
        ckpt = wav
    elif case == "plain_state_dict":
        torch.save(psla.PSLANet(3, effnet=0).state_dict(), ckpt)
    elif case == "no_class_names":
        _psla_tiny_checkpoint(run, [], labels=False)
    target = run if case in ("folder_without_checkpoint", "no_class_names") else ckpt
    with pytest.raises(C.DataError) as e:
        psla.main(["predict", "--ckpt", str(target), str(wav)])
    assert "\n" not in str(e.value) and len(str(e.value)) < 300, str(e.value)


def _psla_fake_run(folder: Path, v: float, **config) -> Path:
    """A results.json in the format psla.py writes (the keys plot reads), with chosen numbers."""
    folder.mkdir(parents=True)
    cfg = dict(data="balanced", data_root=None, imagenet=None, balanced_sampling=False, freqm=48, timem=192,
               mixup=0.5, label_enhance="none", last_n=2, seed=0, name=folder.name, out=str(folder)) | config
    (folder / "results.json").write_text(json.dumps({
        "last_n": {"mAP": v}, "best": {"epoch": 5, "mAP": v + 0.01}, "wa": {"mAP": v + 0.02, "epochs": [5, 6]},
        "checkpoint_ensemble": {"models": 6, "ensemble_mAP": v + 0.03}, "config": cfg}))
    return folder


def test_psla_plot_draws_the_values_of_results_json(tmp_path, monkeypatch, capsys):
    """`psla.py plot` of a run, a seeds table and a 3-seed ensemble: the PNG is written, and the bars read back
    from the Axes are results.json's numbers (seeds: mean, error bar = sample std), the paper's bars its
    constants for the same techniques (Tables III-IV, VIII-X)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = _psla_fake_run(tmp_path / "run", 0.31)
    seeds = [_psla_fake_run(tmp_path / f"s{i}", v, seed=i, imagenet="url", label_enhance="type12")
             for i, v in enumerate((0.2, 0.25, 0.33))]
    table = C.seeds_table([["le", *map(str, seeds)]], ["last_n.mAP", "wa.mAP"], tmp_path / "seeds",
                          [["wa.mAP", "last_n.mAP"]])  # a paired column is not a bar
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "results.json").write_text(json.dumps(
        {"runs": [str(s) for s in seeds], "which": "last", "models": 3, "ensemble_mAP": 0.4, "avg_mAP": 0.26}))
    draws, real_figure = [], C.figure
    monkeypatch.setattr(C, "figure", lambda path, draw, size=None: (draws.append(draw), real_figure(path, draw))[1])
    png = tmp_path / "fig.png"
    psla.main(["plot", str(run), str(tmp_path / "seeds"), str(tmp_path / "ens"), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(draws) == 1
    printed = capsys.readouterr().out  # where the figure went, and the peak memory
    assert f"figure: {png}" in printed and "peak memory" in printed
    fig, ax = plt.subplots()
    draws[0](ax)
    from matplotlib.container import BarContainer
    ours, paper = [c for c in ax.containers if isinstance(c, BarContainer)]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    got = dict(zip(labels, [p.get_width() for p in ours.patches]))
    mean, sd = np.mean(table["le"]["wa.mAP"]), np.std(table["le"]["wa.mAP"], ddof=1)
    assert got == pytest.approx({"run: single model (mean of last 2)": 0.31, "run: valid-selected (epoch 5)": 0.32,
                                 "run: WA (epochs 5-6)": 0.33, "run: checkpoint ensemble (6)": 0.34,
                                 "le: single model (3 seeds)": np.mean([0.2, 0.25, 0.33]),
                                 "le: WA (3 seeds)": mean, "ens: ensemble of 3 (last of 3 runs)": 0.4}, abs=1e-12)
    segments = ours.errorbar.lines[2][0].get_segments()  # one per bar: (value - std, y) .. (value + std, y)
    wa_bar = labels.index("le: WA (3 seeds)")
    assert np.allclose([segments[wa_bar][0][0], segments[wa_bar][1][0]], [mean - sd, mean + sd])
    # paper bars: none for this scratch run's single model (no such row), Table IX for WA, Table X for the
    # 60 checkpoints; the ImageNet + masking + mix-up + Type I+II seeds row 0.3162; the 3-seed ensemble 0.3446
    ys = {round(p.get_y() + p.get_height() / 2 - 0.2): p.get_width() for p in paper.patches}
    expect = {labels.index(k): v for k, v in {
        "run: WA (epochs 5-6)": 0.3192, "run: checkpoint ensemble (6)": 0.3280, "le: single model (3 seeds)": 0.3162,
        "le: WA (3 seeds)": 0.3192, "ens: ensemble of 3 (last of 3 runs)": 0.3446}.items()}
    assert ys == pytest.approx(expect)
    assert ax.get_legend_handles_labels()[1][0] == "ours (eval mAP, the synthetic corpus)"
    plt.close(fig)
    # a seeds table drawn alone names the corpus of its runs (the legend said "None": no config of its own)
    draws.clear()
    psla.main(["plot", str(tmp_path / "seeds"), "--out", str(png)])
    fig, ax = plt.subplots()
    draws[0](ax)
    assert ax.get_legend_handles_labels()[1][0] == "ours (eval mAP, the synthetic corpus)"
    plt.close(fig)
    with pytest.raises(C.DataError, match="not a psla.py run"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "results.json").write_text(json.dumps({"mAP": 0.5}))
        psla.main(["plot", str(tmp_path / "other"), "--out", str(png)])



# =============================================================================================
# Data (issue 8): synthetic downstream tasks, task reading, splits and label fractions, the
# variable-length dataset, the metric dispatch, the unlabelled stream, dataset converters
# =============================================================================================
SYN = C.load_data_module("synthetic")
PREP = C.load_data_module("prepare")


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> Path:
    """The four synthetic tasks at scale 0.1 (50 + 60 + 220 + 200 clips)."""
    return SYN.make_synthetic_tasks(tmp_path_factory.mktemp("tasks") / "synth_tasks", scale=0.1, workers=1)


def test_synthetic_tasks_layout_and_counts(tiny_tasks):
    assert C.list_tasks(tiny_tasks) == ["sound_novel", "tagging", "keywords", "speaker"]
    novel = C.read_task(tiny_tasks, "sound_novel")
    assert novel.kfold and novel.folds == ["1", "2", "3", "4", "5"] and novel.metric == "accuracy"
    assert novel.classes == [k for k, _ in SYN.NOVEL] and len(novel.rows) == 50
    assert all(sum(r[1] == [c] and r[2] == f for r in novel.rows) == 1 for c in novel.classes for f in novel.folds)
    assert sf.info(str(novel.root / novel.rows[0][0])).duration == 5.0
    tag = C.read_task(tiny_tasks, "tagging")
    assert tag.type == "multi" and tag.metric == "mAP" and len(tag.classes) == 34 and tag.higher_is_better
    y = tag.targets(tag.rows)
    assert y.sum(1).min() >= 1 and y.sum(1).max() > 1
    classes, items = SYN.task_items("tagging", 1.0, 0)  # at scale 1 every class has test clips
    assert len(items) == 600 and {c for _, labels, f in items if f == "test" for c in labels} == set(classes)
    kw = C.read_task(tiny_tasks, "keywords")
    assert kw.classes == SYN.KEYWORDS + ["_unknown_"] and len(kw.rows) == 220 and kw.max_seconds == 1.0
    assert sf.info(str(kw.root / kw.rows[0][0])).frames == C.SR
    spk = C.read_task(tiny_tasks, "speaker")
    assert len(spk.classes) == 40 and {r[2] for r in spk.rows} == {"train", "valid", "test"}
    assert all(any(r[1] == [c] and r[2] == "test" for r in spk.rows) for c in spk.classes)


def test_keywords_are_phone_sequences_with_unseen_test_speakers():
    words = [SYN.split_phones(w) for w in SYN.KEYWORDS]
    assert len(words) >= 10 and all(w[::-1] not in words for w in words)
    assert all(sorted(a) == sorted(b) and a != b for a, b in zip(words[::2], words[1::2]))  # same phones, other order
    assert set(SYN.unknown_words(0)).isdisjoint(SYN.KEYWORDS)
    _, items = SYN.task_items("keywords", 1.0, 0)
    assert len(items) >= 2000
    speakers = {s: {tuple(spec[1]) for spec, _, f in items if f == s} for s in ("train", "valid", "test")}
    assert len(speakers["train"]) >= 50 and not speakers["test"] & speakers["train"] and not speakers["valid"] & speakers["train"]


def test_novel_families_are_outside_the_upstream_ranges():
    def peak(x):
        return np.fft.rfftfreq(len(x), 1 / C.SR)[np.argmax(np.abs(np.fft.rfft(x)))]
    rng = np.random.default_rng(0)
    names = [k for k, _ in SYN.NOVEL]
    assert peak(SYN.novel_event(names.index("whistle"), 1.0, rng)) > 4000  # upstream tones/sweeps stay < 3.6 kHz
    assert peak(SYN.novel_event(names.index("engine"), 1.0, rng)) < 50     # upstream fundamentals >= 60 Hz
    assert not set(names) & {c[0] for cs in SYN.SYNTH_CLASSES.values() for c in cs}


def test_synthetic_tasks_are_deterministic(tiny_tasks, tmp_path):
    again = SYN.make_synthetic_tasks(tmp_path / "t", scale=0.1, workers=2, tasks=["keywords"])
    assert (again / "keywords/keywords.tsv").read_bytes() == (tiny_tasks / "keywords/keywords.tsv").read_bytes()
    fn = "keywords/audio/keywords_00007.wav"
    assert (again / fn).read_bytes() == (tiny_tasks / fn).read_bytes()


def test_ensure_synthetic_tasks_builds_once_and_rebuilds_on_a_stale_stamp(tmp_path, monkeypatch):
    built = []

    def fake_build(root, scale, seed):  # stands in for the real build: writes only the stamp
        built.append(root)
        Path(root).mkdir(parents=True, exist_ok=True)
        C.write_json(Path(root) / "synth_tasks.json", {"version": SYN.TASKS_VERSION, "seed": seed, "scale": scale,
                                                        "tasks": SYN.TASK_ORDER})
        return Path(root)
    monkeypatch.setattr(SYN, "make_synthetic_tasks", fake_build)
    root = tmp_path / "synth_tasks"
    assert C.ensure_synthetic_tasks(root=root) == root and C.ensure_synthetic_tasks(root=root) == root
    assert len(built) == 1
    C.write_json(root / "synth_tasks.json", {"version": SYN.TASKS_VERSION - 1, "seed": 0, "scale": 1.0,
                                             "tasks": SYN.TASK_ORDER})  # an older generator's tasks
    C.ensure_synthetic_tasks(root=root)
    assert len(built) == 2
    assert C.TASKS_ROOT.name == "synth_tasks" and C.TASKS_ROOT.parent == C.SYNTH_ROOT.parent


def test_read_task_bad_row_names_file_and_line(tmp_path):
    C.write_task(tmp_path, "t", [("a.wav", ["x"], "train"), ("b.wav", ["y"], "test")], ["x", "y"],
                 type="single", metric="accuracy", kfold=False, folds=["train", "valid", "test"])
    assert C.read_task(tmp_path, "t").rows[1] == ("b.wav", ["y"], "test")
    with open(tmp_path / "t/t.tsv", "a") as f:
        f.write("c.wav\tzz\ttrain\n")
    with pytest.raises(C.DataError, match=r"t\.tsv:4: expected"):
        C.read_task(tmp_path, "t")
    with pytest.raises(C.DataError, match="no task 'nope'"):
        C.read_task(tmp_path, "nope")


def _toy_task(tmp_path, n_per_class=(40, 20, 10, 4), kfold=False, folds=None):
    rows = []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            rows.append((f"{c}_{i}.wav", [f"c{c}"], (folds or ["train"])[i % len(folds or ["train"])]))
    C.write_task(tmp_path, "toy", rows, [f"c{c}" for c in range(len(n_per_class))], type="single",
                 metric="accuracy", kfold=kfold, folds=folds or ["train", "valid", "test"])
    return C.read_task(tmp_path, "toy")


def test_task_splits_hear_rotation_and_paper_literal(tmp_path):
    task = _toy_task(tmp_path, (10, 10, 10), kfold=True, folds=["1", "2", "3", "4", "5"])
    splits = C.task_splits(task)
    assert [s[0] for s in splits] == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    for i, (_, train, valid, test) in enumerate(splits):
        assert {r[2] for r in test} == {str(i + 1)} and {r[2] for r in valid} == {str((i + 1) % 5 + 1)}
        assert {r[2] for r in train} == set(task.folds) - {str(i + 1), str((i + 1) % 5 + 1)}
        assert len(train) + len(valid) + len(test) == len(task.rows)
    for _, train, valid, test in C.task_splits(task, protocol="paper"):
        assert valid == test and len(train) + len(test) == len(task.rows)


def test_ninety_ten_split_is_stratified_and_seeded(tmp_path):
    task = _toy_task(tmp_path, (40, 20, 10, 30))
    (_, train, valid, test), = C.task_splits(task)
    assert len(valid) == 10 and len(train) == 90 and not test and not {r[0] for r in train} & {r[0] for r in valid}
    assert task.targets(valid).sum(0).tolist() == [4, 2, 1, 3]  # 10 % of every class
    assert C.task_splits(task)[0][2] == valid and C.task_splits(task, seed=1)[0][2] != valid


def test_label_fractions_nested_stratified_every_class_at_one_percent():
    rng = np.random.default_rng(0)
    counts = [500, 300, 100, 50, 30, 10, 5, 3, 1, 1]
    y = np.zeros((sum(counts), 10), np.float32)
    y[np.arange(len(y)), np.repeat(np.arange(10), counts)] = 1
    y = y[rng.permutation(len(y))]
    fr = C.label_fractions(y, seed=0)
    assert list(fr) == [0.01, 0.03, 0.1, 0.3, 1.0] and len(fr[1.0]) == len(y) and len(fr[0.1]) == 100
    assert y[fr[0.01]].sum(0).min() >= 1                           # every class at 1 %
    sets = [set(fr[f].tolist()) for f in fr]
    assert all(a <= b for a, b in zip(sets, sets[1:]))              # nested
    assert np.abs(y[fr[0.3]].sum(0)[:3] - 0.3 * np.array(counts[:3])).max() <= 2  # stratified
    assert np.array_equal(C.label_fractions(y, seed=0)[0.03], fr[0.03]) and \
        not np.array_equal(C.label_fractions(y, seed=1)[0.3], fr[0.3])
    multi = (rng.random((200, 6)) < 0.2).astype(np.float32)
    assert multi[C.label_fractions(multi)[0.01]].sum(0).min() >= 1


def test_varlen_dataset_and_clip_durations(tiny_tasks):
    task = C.read_task(tiny_tasks, "speaker")
    rows = task.rows[:4] + [("missing.wav", ["spk00"], "train")]
    ds = C.VarLenDataset(task.root, rows, task.targets(rows))
    lengths = [sf.info(str(task.root / r[0])).frames for r in rows[:4]]
    assert len(set(lengths)) > 1 and [len(ds[i][0]) for i in range(4)] == lengths
    with pytest.warns(UserWarning, match="skipping"):
        assert ds[4] is None
    assert C.clip_durations(task.root, rows, default=7.0) == [n / C.SR for n in lengths] + [7.0]
    loader = C.make_loader(ds, 1, workers=0)
    with pytest.warns(UserWarning):
        assert [b[0].shape[1] for b in loader if b is not None] == lengths


def test_metric_dispatch_against_hand_computed_values():
    y = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    s = np.array([[0.9, 0.8, 0.1], [0.3, 0.2, 0.5]])
    # lwlrap: clip 1: class 0 rank 1 -> 1/1, class 2 rank 3 -> 2/3; clip 2: class 1 rank 3 -> 1/3
    assert C.task_score("lwlrap", y, s) == pytest.approx((1 + 2 / 3 + 1 / 3) / 3)
    y1 = np.eye(3)[[0, 1, 2, 2]]
    s1 = np.array([[.5, .3, .2], [.5, .3, .2], [.5, .3, .2], [.1, .2, .7]])
    assert C.task_score("mAP@3", y1, s1) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    assert C.task_score("accuracy", y1, s1) == 0.5 and C.task_score("error_rate", y1, s1) == 0.5
    assert C.task_score("mAP", y, s) == pytest.approx(np.mean([1, 1 / 2, 1 / 2]))  # positive ranked 1st, 2nd, 2nd
    assert C.METRICS["error_rate"][1] is False and all(C.METRICS[m][1] for m in C.METRICS if m != "error_rate")
    assert C.task_score("dprime", y, s) == pytest.approx(C.d_prime(C.task_score("mAUC", y, s)))
    with pytest.raises(C.DataError, match="metric 'f1'"):
        C.task_score("f1", y, s)


def _stream_ids(**kw):
    return list(C.SyntheticStream(**kw).clip_ids())


def test_stream_distinct_across_ranks_and_workers_same_for_same_seed():
    a = _stream_ids(limit=4, rank=0, world=2)
    b = _stream_ids(limit=4, rank=1, world=2)
    assert a == [0, 2, 4, 6] and b == [1, 3, 5, 7]
    assert _stream_ids(limit=5, pool_size=3) == [0, 1, 2, 0, 1]      # a finite pool cycles
    ds = C.synthetic_stream(seed=0, clip_seconds=1.0, limit=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    clips = [c for c in loader]
    assert len(clips) == 4 and clips[0].shape == (C.SR,) and clips[0].dtype == torch.float32
    assert len({c.numpy().tobytes() for c in clips}) == 4          # two workers draw distinct clips
    again = list(C.synthetic_stream(seed=0, clip_seconds=1.0, limit=2, rank=0, world=1))
    # the loader interleaves worker 0 (clips 0, 2) and worker 1 (clips 1, 3): clips j = 0, 1, 2, 3 in order
    assert torch.equal(again[0], clips[0]) and torch.equal(again[1], clips[1])
    other = next(iter(C.synthetic_stream(seed=1, clip_seconds=1.0, limit=1)))
    assert not torch.equal(other, clips[0])
    pool = list(C.synthetic_stream(seed=0, pool_size=2, clip_seconds=1.0, limit=3))
    assert torch.equal(pool[0], pool[2]) and not torch.equal(pool[0], pool[1])
    assert len(next(iter(C.synthetic_stream(clip_seconds=1.0, sr=8000, limit=1)))) == 8000


def _mini(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _bad_row(convert, src: Path, rel: str, row: str, line: int, out: Path):
    """Append a malformed row to the dataset's metadata: the converter must name file and line."""
    with open(src / rel, "a") as f:
        f.write(row)
    with pytest.raises(C.DataError, match=rf"{Path(rel).name}:{line}: ") as e:
        convert(src, out)
    assert "\n" not in str(e.value)


def test_convert_esc50(tmp_path):
    src = _mini(tmp_path / "ESC-50-master", {"meta/esc50.csv": "filename,fold,target,category,esc10,src_file,take\n"
                                             "1-100032-A-0.wav,1,0,dog,True,100032,A\n5-9032-A-2.wav,5,2,pigs,False,9032,A\n"
                                             "2-1-B-1.wav,2,1,rooster,True,1,B\n"})
    PREP.convert_esc50(src, tmp_path / "tasks")
    task = C.read_task(tmp_path / "tasks", "esc50")
    assert task.classes == ["dog", "rooster", "pigs"] and task.kfold and task.folds == ["1", "2", "3", "4", "5"]
    assert task.rows[1] == ("audio/5-9032-A-2.wav", ["pigs"], "5") and task.root == src.resolve()
    assert len(C.task_splits(task)) == 5 and task.metric == "accuracy"
    _bad_row(PREP.convert_esc50, src, "meta/esc50.csv", "3-1-A-1.wav,7,1,rooster,True,1,A\n", 5, tmp_path / "tasks")


def test_convert_urbansound8k(tmp_path):
    src = _mini(tmp_path / "UrbanSound8K", {"metadata/UrbanSound8K.csv":
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n100032-3-0-0.wav,100032,0.0,0.317,1,5,3,dog_bark\n"
        "100263-2-0-117.wav,100263,58.5,62.5,1,10,2,children_playing\n"})
    PREP.convert_urbansound8k(src, tmp_path / "t")
    task = C.read_task(tmp_path / "t", "urbansound8k")
    assert task.classes == ["children_playing", "dog_bark"] and len(task.folds) == 10
    assert task.rows[0] == ("audio/fold5/100032-3-0-0.wav", ["dog_bark"], "5") and task.max_seconds == 4.0
    _bad_row(PREP.convert_urbansound8k, src, "metadata/UrbanSound8K.csv", "x.wav,1,0,1,1,3\n", 4, tmp_path / "t")


def _speech_commands(root: Path, words: list[str]) -> Path:
    files = {f"{w}/{i:08x}_nohash_0.wav": "" for w in words for i in range(3)}
    files["_background_noise_/white_noise.wav"] = ""
    files["validation_list.txt"] = f"{words[0]}/00000001_nohash_0.wav\n"
    files["testing_list.txt"] = f"{words[0]}/00000002_nohash_0.wav\n{words[-1]}/00000002_nohash_0.wav\n"
    return _mini(root, files)


def test_convert_speech_commands_v1_11_and_v2_35(tmp_path):
    src = _speech_commands(tmp_path / "sc1", PREP.SC_WORDS_V1_11 + ["bed", "cat"])
    PREP.convert_speechcommands(src, tmp_path / "t", 1)
    task = C.read_task(tmp_path / "t", "scv1_11")
    assert task.classes == ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_unknown_"]
    assert len(task.rows) == 36 and sum(r[1] == ["_unknown_"] for r in task.rows) == 6  # bed, cat; no silence
    assert [r[2] for r in task.rows].count("valid") == 1 and [r[2] for r in task.rows].count("test") == 2
    assert ("yes/00000001_nohash_0.wav", ["yes"], "valid") in task.rows
    words35 = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(35)]
    src2 = _speech_commands(tmp_path / "sc2", words35)
    PREP.convert_speechcommands(src2, tmp_path / "t", 2)
    task2 = C.read_task(tmp_path / "t", "scv2_35")
    assert task2.classes == sorted(words35) and len(task2.rows) == 105 and C.list_tasks(tmp_path / "t") == ["scv1_11", "scv2_35"]
    _bad_row(lambda s, o: PREP.convert_speechcommands(s, o, 1), src, "testing_list.txt", "yes/missing.wav\n", 3, tmp_path / "t")


def test_convert_fsd50k(tmp_path):
    src = _mini(tmp_path / "FSD50K", {
        "FSD50K.ground_truth/vocabulary.csv": "0,Accordion,/m/0mkg\n1,Bark,/m/05tny_\n2,Bass_drum,/m/0bm02\n",
        "FSD50K.ground_truth/dev.csv": 'fname,labels,mids,split\n64760,"Bark,Accordion","/m/05tny_,/m/0mkg",train\n'
                                       "16399,Bass_drum,/m/0bm02,val\n",
        "FSD50K.ground_truth/eval.csv": "fname,labels,mids\n37199,Bark,/m/05tny_\n"})
    PREP.convert_fsd50k(src, tmp_path / "t")
    task = C.read_task(tmp_path / "t", "fsd50k")
    assert task.classes == ["Accordion", "Bark", "Bass_drum"] and task.type == "multi" and task.metric == "mAP"
    assert task.rows == [("FSD50K.dev_audio/64760.wav", ["Bark", "Accordion"], "train"),
                         ("FSD50K.dev_audio/16399.wav", ["Bass_drum"], "valid"), ("FSD50K.eval_audio/37199.wav", ["Bark"], "test")]
    assert task.targets(task.rows[:1]).tolist() == [[1, 1, 0]]
    _bad_row(PREP.convert_fsd50k, src, "FSD50K.ground_truth/dev.csv", "1,Meow,/m/x,train\n", 4, tmp_path / "t")


def test_convert_nsynth(tmp_path):
    ex = lambda key, fam: {key: {"note_str": key, "instrument_family_str": fam, "pitch": 60}}  # noqa: E731
    src = _mini(tmp_path / "nsynth", {
        "nsynth-train/examples.json": json.dumps({**ex("bass_synthetic_033-022-050", "bass"),
                                                  **ex("vocal_acoustic_000-060-127", "vocal")}, indent=4),
        "nsynth-valid/examples.json": json.dumps(ex("flute_acoustic_002-077-100", "flute"), indent=4),
        "nsynth-test/examples.json": json.dumps(ex("guitar_acoustic_010-050-025", "guitar"), indent=4)})
    PREP.convert_nsynth(src, tmp_path / "t")
    task = C.read_task(tmp_path / "t", "nsynth")
    assert len(task.classes) == 11 and task.classes[0] == "bass" and task.classes[-1] == "vocal"
    assert task.rows[2] == ("nsynth-valid/audio/flute_acoustic_002-077-100.wav", ["flute"], "valid") and len(task.rows) == 4
    (src / "nsynth-test/examples.json").write_text(json.dumps({**ex("a", "guitar"), **ex("b", "kazoo")}, indent=4))
    with pytest.raises(C.DataError, match=r"examples.json:7: example 'b'"):
        PREP.convert_nsynth(src, tmp_path / "t")


def test_convert_fsdkaggle2018(tmp_path):
    src = _mini(tmp_path / "FSDKaggle2018", {
        "FSDKaggle2018.meta/train_post_competition.csv": "fname,label,manually_verified,freesound_id,license\n"
        "00044347.wav,Hi-hat,0,28739,Attribution\n001ca53d.wav,Saxophone,1,358827,Attribution\n002d256b.wav,Trumpet,0,10897,Creative Commons 0\n",
        "FSDKaggle2018.meta/test_post_competition_scoring_clips.csv": "fname,label,usage,freesound_id,license\n"
        "00326aa9.wav,Oboe,Private,355125,Attribution\n"})
    with pytest.raises(C.DataError, match=r"test_post_competition_scoring_clips.csv:2: "):  # Oboe: not a training class
        PREP.convert_fsdkaggle2018(src, tmp_path / "t")
    (src / "FSDKaggle2018.meta/test_post_competition_scoring_clips.csv").write_text(
        "fname,label,usage,freesound_id,license\n00326aa9.wav,Trumpet,Private,355125,Attribution\n")
    PREP.convert_fsdkaggle2018(src, tmp_path / "t")
    task = C.read_task(tmp_path / "t", "fsdkaggle2018")
    assert task.classes == ["Hi-hat", "Saxophone", "Trumpet"] and task.metric == "mAP@3"
    assert task.rows[0] == ("FSDKaggle2018.audio_train/00044347.wav", ["Hi-hat"], "train")
    assert task.rows[-1] == ("FSDKaggle2018.audio_test/00326aa9.wav", ["Trumpet"], "test")
    (_, train, valid, test), = C.task_splits(task)
    assert len(train) == 3 - len(valid) and len(test) == 1
    _bad_row(PREP.convert_fsdkaggle2018, src, "FSDKaggle2018.meta/train_post_competition.csv", "x.wav\n", 5, tmp_path / "t")


def test_convert_fsdkaggle2019_class_order_from_sample_submission(tmp_path):
    src = _mini(tmp_path / "fsdk19", {
        "sample_submission.csv": "fname,Accelerating_and_revving_and_vroom,Accordion,Acoustic_guitar,Bark\n",
        "train_curated.csv": 'fname,labels\n0006ae4e.wav,Bark\n0019ef41.wav,"Accordion,Bark"\n',
        "train_noisy.csv": "fname,labels\n00097e21.wav,Acoustic_guitar\n",
        "test_post_competition.csv": "fname,labels,usage,freesound_id,license\n000ccb97.wav,Accordion,Public,1,CC0\n",
        "train_curated/.keep": "", "train_noisy/.keep": "", "test/.keep": ""})  # Kaggle's audio folder names
    PREP.convert_fsdkaggle2019(src, tmp_path / "t")
    cur, noisy = C.read_task(tmp_path / "t", "fsdkaggle2019_curated"), C.read_task(tmp_path / "t", "fsdkaggle2019_noisy")
    assert cur.classes == ["Accelerating_and_revving_and_vroom", "Accordion", "Acoustic_guitar", "Bark"] == noisy.classes
    assert cur.metric == "lwlrap" and cur.rows[1] == ("train_curated/0019ef41.wav", ["Accordion", "Bark"], "train")
    assert noisy.rows == [("train_noisy/00097e21.wav", ["Acoustic_guitar"], "train"), ("test/000ccb97.wav", ["Accordion"], "test")]
    _bad_row(PREP.convert_fsdkaggle2019, src, "train_curated.csv", "0a.wav,Meow\n", 4, tmp_path / "t")


# =============================================================================================
# at_transfer.py: model sizes, psl.py checkpoints as upstream, the HEAR API on a known signal, head
# pooling, frozen mode, end-to-end runs through main() and the CLI (exact resume after SIGKILLs, torchrun
# DDP, bf16), bad input, and the stages (upstream, frozen embeddings) keyed by their settings
# =============================================================================================
import at_transfer as AT  # noqa: E402
import shlex  # noqa: E402


@pytest.fixture
def at_thread():
    """One intra-op thread for the in-process runs: on a shared 2-core machine two threads made a forward 10-30x
    slower (busy-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def at_corpus(tmp_path_factory) -> Path:
    """A corpus of 1 s clips (69 training clips for 30 classes, 24 valid, 24 eval): upstream steps are cheap."""
    return C.make_synthetic_corpus(tmp_path_factory.mktemp("at") / "synth1s", scale=0.05, seed=0, clip_seconds=1.0,
                                   workers=1, quiet=True)


def _at_subset(tasks: Path, name: str, keep, out: Path) -> Path:
    """A smaller copy of a tiny task (rows filtered by keep(index, row)), its audio left where it is."""
    t = C.read_task(tasks, name)
    rows = [r for i, r in enumerate(t.rows) if keep(i, r)]
    classes = [c for c in t.classes if any(r[1] == [c] for r in rows)]
    C.write_task(out, name, rows, classes, type=t.type, metric=t.metric, kfold=t.kfold, folds=t.folds,
                 max_seconds=t.max_seconds, audio_root=str(t.root.resolve()))
    return out


@pytest.fixture(scope="session")
def at_tasks(tiny_tasks, tmp_path_factory) -> Path:
    """sound_novel with 2 clips per fold (HEAR split 1: 6 training, 2 valid, 2 test clips of 5 s)."""
    return _at_subset(tiny_tasks, "sound_novel", lambda i, r: i < 10, tmp_path_factory.mktemp("at") / "tasks")


def _at_argv(corpus, tasks, out, *extra):
    """Tiny scale: 3 upstream steps (9 per epoch, validation every 2), 3 steps per downstream split."""
    return ["--data-root", str(corpus), "--task-root", str(tasks), "--out", str(out), "--workers", "0",
            "--preset", "cpu", "--up-batch-size", "8", "--batch-size", "4", "--evals-per-epoch", "4",
            "--bn-batches", "1", "--max-steps", "3", *extra]


def _random_upstream(path: Path, n_classes: int = 30, **extra) -> Path:
    """A MobileNetV2 upstream checkpoint as train_upstream writes it, with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    up = AT.MobileNetV2(n_classes)
    for m in up.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    C.save_checkpoint(path, {"model": up.state_dict(), "arch": "mbv2", "script": "at_transfer", **extra,
                             "labels": {"mids": [str(i) for i in range(n_classes)], "names": [str(i) for i in range(n_classes)]}})
    return path


def _metrics(out: Path) -> dict:
    """results.json without the paths (runs in different folders have their stages in different folders)."""
    res = json.loads((out / "results.json").read_text())
    for up in res["upstreams"].values():
        up.pop("ckpt")
    return res


def test_at_param_counts_and_psl_names():
    assert AT.count_parameters(AT.MobileNetV2(527)) == 2_898_383  # paper: 3.0 M
    assert AT.count_parameters(AT.EfficientNetB0(527)) == 4_682_059  # paper: 4.6 M
    assert set(AT.MobileNetV2(30).state_dict()) == set(psl.MobileNetV2(30).state_dict())


def test_at_psl_checkpoint_loads_as_upstream(tmp_path, at_thread):
    """A psl.py machine-annotator checkpoint (written by psl's own save_final) is an upstream: same
    weights, same clip probabilities, and the HEAR loader and --upstream-ckpt accept it."""
    torch.manual_seed(0)
    ma = psl.MobileNetV2(30).eval()
    labels = C.Labels([f"/m/{i}" for i in range(30)], [f"c{i}" for i in range(30)])
    fake_corpus = type("Corpus", (), {"labels": labels})()
    path = tmp_path / "teacher" / "final.pt"
    psl.save_final(path, ma, fake_corpus, None, psl.parse_args([]), {})
    up = AT.build_upstream(AT.read_upstream(path)).eval()
    x = torch.randn(2, 2 * C.SR)
    with torch.no_grad():
        assert torch.allclose(up(x)[0], ma(x)[0], atol=1e-6)
    model = AT.load_model(str(path))
    assert model.sample_rate == 16000 and model.scene_embedding_size == model.timestamp_embedding_size == 1280
    args = AT.resolve(AT.parse_args(["--upstream-ckpt", str(path), "--out", str(tmp_path / "r")]))
    assert args.given_arch == "mbv2" and AT.upstream(args, "mbv2", torch.device("cpu"))["ckpt"] == str(path)


@pytest.mark.parametrize("arch", ["mbv2", "effb0"])
def test_at_hear_api_shapes_timestamps_and_locality(arch, at_thread):
    """(n, T, 1280) float32 embeddings, timestamps j * 320 ms; a 0.2 s tone centred on 1.92 s changes
    the embedding most at the frame stamped 1920 ms; the scene embedding is the frames' mean."""
    torch.manual_seed(0)
    model = AT.ARCHS[arch](10).eval()
    sr, n = 16000, 4 * 16000
    x = np.random.default_rng(0).standard_normal((2, n)).astype(np.float32) * 1e-3
    s = int(1.82 * sr)
    x[1, s: s + int(0.2 * sr)] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(int(0.2 * sr)) / sr)
    emb, ts = AT.get_timestamp_embeddings(x, model)
    assert emb.shape == (2, 13, 1280) and emb.dtype == torch.float32  # 401 log-mel frames / 32 -> 13
    assert ts.shape == (2, 13) and torch.equal(ts[0], torch.arange(13) * 320.0) and torch.equal(ts[0], ts[1])
    diff = (emb[1] - emb[0]).norm(dim=1)
    assert ts[0, diff.argmax()] == 1920.0
    scene = AT.get_scene_embeddings(x, model)
    assert scene.shape == (2, 1280) and torch.allclose(scene, emb.mean(1))
    with pytest.raises(C.DataError):
        AT.get_timestamp_embeddings(x[0], model)


def test_at_upstream_augmentation_is_torch_audiomentations_defaults():
    """The wave that upstream_loss feeds the model (one clip per batch, so mix-up changes nothing): --aug-p 0
    leaves it alone; with p 1 the clip is gained within -18..+6 dB, polarity-flipped and rolled by at most
    --max-shift (half) of its length."""
    w, y = torch.randn(1, 100), torch.zeros(1, 3)
    seen = []
    model = lambda wave, spec: seen.append(wave[0]) or (torch.full((1, 3), 0.5), None)
    AT.upstream_loss(model, w, y, AT.parse_args(["--aug-p", "0"]))
    assert torch.allclose(seen.pop(), w[0], atol=1e-6)
    torch.manual_seed(0)
    for _ in range(6):
        AT.upstream_loss(model, w, y, AT.parse_args(["--aug-p", "1"]))
    for out in seen:
        ratio = out.norm() / w.norm()  # a roll keeps the norm
        assert 10 ** (-18 / 20) - 1e-5 <= ratio <= 10 ** (6 / 20) + 1e-5
        assert any(torch.allclose(-out / ratio, torch.roll(w[0], k), atol=1e-5) for k in range(-50, 51))


def test_at_head_pooling_single_and_multi_label(at_thread):
    torch.manual_seed(0)
    for multi in (False, True):
        ds = AT.Downstream(AT.MobileNetV2(5), 3, multi)
        emb = torch.randn(2, 4, 1280)
        frames = ds.head(emb)
        want = torch.sigmoid(frames).mean(1) if multi else frames.mean(1)  # Sec. 4.2.2
        assert torch.allclose(ds.pool(emb), want, atol=1e-6)
        mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1]])
        got = ds.pool(emb, mask)
        assert torch.allclose(got[0], ds.pool(emb[:1, :2])[0], atol=1e-6)  # padded frames are ignored
    assert isinstance(ds.backbone.classifier, torch.nn.Identity)  # the upstream classifier is replaced


def test_at_help_and_embed_writes_only_into_its_out_folder(tmp_path, capsys, at_thread):
    """embed writes into --out only (never beside the audio), refuses a folder holding a user's .npy (kept),
    and two files with one name."""
    for argv in (["--help"], ["embed", "--help"]):
        with pytest.raises(SystemExit) as e:
            AT.main(argv)
        assert e.value.code == 0
    assert "--ckpt" in capsys.readouterr().out
    path = _random_upstream(tmp_path / "up.pt", 4)
    (tmp_path / "audio").mkdir()
    wav = tmp_path / "audio" / "a.wav"
    sf.write(wav, sine(440, 16000, 1.5), 16000)
    (tmp_path / "audio" / "a.npy").write_text("a user's file")
    AT.main(["embed", "--ckpt", str(path), "--out", str(tmp_path / "emb"), "--timestamps", str(wav)])
    scene, frames, ts = (np.load(tmp_path / "emb" / f"a{s}.npy") for s in ("", "_frames", "_timestamps"))
    assert scene.shape == (1280,) and frames.shape == (5, 1280) and np.allclose(frames.mean(0), scene, atol=1e-5)
    assert np.array_equal(ts, np.arange(5) * 320.0)
    with pytest.raises(C.DataError, match="a.npy, not written by"):
        AT.main(["embed", "--ckpt", str(path), "--out", str(tmp_path / "audio"), str(wav)])
    assert (tmp_path / "audio" / "a.npy").read_text() == "a user's file"
    with pytest.raises(C.DataError, match="two files named a"):
        AT.main(["embed", "--ckpt", str(path), "--out", str(tmp_path / "e2"), str(wav), str(tmp_path / "a.wav")])


def test_at_smoke_every_mode_resume_and_no_resume(at_corpus, at_tasks, tmp_path, capsys, at_thread):
    """Upstream + a k-fold task in every mode through main(argv): a matrix with 3 cells; the upstream and the
    frozen embeddings in stage folders beside the run; a second call trains nothing; other settings are refused;
    --no-resume starts the run's cells afresh and keeps a user's file."""
    out = tmp_path / "run"
    argv = _at_argv(at_corpus, at_tasks, out)
    AT.main(argv)
    res = json.loads((out / "results.json").read_text())
    cells = {c["mode"]: c for c in res["cells"]}
    assert set(cells) == {"scratch", "frozen", "finetune"} and all(0 <= c["mean"] <= 1 for c in cells.values())
    assert all(c["splits"] == ["fold1"] and c["metric"] == "accuracy" for c in cells.values())
    md = (out / "results.md").read_text()
    assert "sound_novel" in md and "frozen-scratch" in md and "Upstream mbv2" in md
    up = [p.parent for p in tmp_path.glob("upstream_mbv2-*/final.pt")]
    assert len(up) == 1 and res["upstreams"]["mbv2"]["ckpt"] == str(up[0] / "final.pt")
    assert not list(up[0].glob("*step*.pt")) and not (up[0] / "last.pt").exists()  # only final.pt is kept
    plateau = json.loads((up[0] / "results.json").read_text())["train"]["plateau"]  # issue 20: the upstream's line
    assert plateau["validations"] == 2 and plateau["last"] is not None
    assert json.loads((up[0] / "log.jsonl").read_text().splitlines()[-1])["plateau"] == plateau
    assert "Upstream training: validation" in (up[0] / "results.md").read_text()
    assert len(list(tmp_path.glob("frozen_mbv2_sound_novel-*/embeddings.pt"))) == 1
    r = json.loads((out / "mbv2" / "sound_novel" / "finetune" / "trial0_fold1" / "result.json").read_text())
    assert (r["n_train"], r["n_valid"], r["n_test"], r["test_skipped"], r["steps"]) == (6, 2, 2, 0, 3)
    n_log = len((out / "log.jsonl").read_text().splitlines())
    capsys.readouterr()
    AT.main(argv)  # resume: nothing is trained again
    assert len((out / "log.jsonl").read_text().splitlines()) == n_log and json.loads((out / "results.json").read_text()) == res
    with pytest.raises(C.DataError, match="epochs"):  # other settings in the same folder are refused
        AT.main(argv + ["--epochs", "5"])
    (out / "notes.txt").write_text("mine")
    AT.main(argv + ["--no-resume", "--mode", "frozen"])
    assert (out / "notes.txt").read_text() == "mine"
    assert [c["mode"] for c in json.loads((out / "results.json").read_text())["cells"]] == ["frozen"]
    assert not (out / "mbv2" / "sound_novel" / "finetune").exists()


@pytest.fixture(scope="module")
def at_reference(at_corpus, at_tasks, tmp_path_factory) -> dict:
    """The uninterrupted run (subprocess) that the killed-and-resumed runs must equal."""
    out = tmp_path_factory.mktemp("at_ref") / "run"
    run_cli("at_transfer.py", *_at_argv(at_corpus, at_tasks, out, "--mode", "frozen"))
    return _metrics(out)


def test_at_killed_and_resumed_is_bit_identical(at_reference, at_corpus, at_tasks, tmp_path):
    """Exact resume (issue 19): one run SIGKILLed three times, each time run again with the same command:
    mid-epoch in the upstream (step 3 of 9, after the step-2 checkpoint), inside the resumed run's second
    checkpoint write, right after the next run's third saved checkpoint; then to the end: results.json
    equals the uninterrupted run's (upstream mAP, every validation, the cell), and no temp file is left."""
    out = tmp_path / "run"
    argv = _at_argv(at_corpus, at_tasks, out, "--mode", "frozen")
    for kill_at in ("step:3", "write:2", "saved:3"):
        r = run_cli("at_transfer.py", *argv, env={"KILL_AT": kill_at}, check=False)
        assert r.returncode in (-9, 137), f"{kill_at}: expected a SIGKILL, exit {r.returncode}:\n{r.stdout[-3000:]}"
    run_cli("at_transfer.py", *argv)
    assert _metrics(out) == at_reference
    assert leftovers(tmp_path) == []


def test_at_torchrun_two_ranks_shards_and_barriers(at_corpus, at_tasks, tmp_path):
    """torchrun with 2 gloo processes, end to end: one set of outputs, each validation logged once, and each
    rank takes half of every epoch (the upstream's 69 clips: 5 steps of 8 per epoch instead of 9). Rank 0 alone
    validates before it publishes final.pt, the top-k checkpoints and the frozen embeddings, so a rank that did
    not wait at the barrier after each of them would read a missing file: removing any of them fails this test."""
    out = tmp_path / "run"
    run_cli("at_transfer.py", *_at_argv(at_corpus, at_tasks, out, "--mode", "frozen", "finetune"), nproc=2)
    res = json.loads((out / "results.json").read_text())
    assert sorted(c["mode"] for c in res["cells"]) == ["finetune", "frozen"]
    up = [json.loads(l) for l in next(tmp_path.glob("upstream_mbv2-*/log.jsonl")).read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in up] == [(1, 0.2), (2, 0.4), (3, 0.6)]  # eval every step: 5 // 4
    down = [(json.loads(l)["stage"], json.loads(l)["step"]) for l in (out / "log.jsonl").read_text().splitlines()]
    assert len(down) == len(set(down)) == 6  # 3 validations of each cell, once
    assert len(list(tmp_path.glob("upstream_mbv2-*"))) == len(list(tmp_path.glob("frozen_*"))) == 1
    assert leftovers(tmp_path) == []


def test_at_epoch_batches_are_disjoint_shards(monkeypatch):
    """loader_batches under 2 ranks: each reads its own half of the epoch's order (padded by wrapping to equal
    step counts), from batch `skip` on."""
    ds = [(torch.full((4,), float(i)), torch.zeros(2), i) for i in range(11)]  # the wave names its item
    order = np.random.default_rng([0, 3]).permutation(11)
    args, seen = AT.parse_args(["--workers", "0"]), {}
    monkeypatch.setattr(C, "world_size", lambda: 2)
    for r in (0, 1):
        monkeypatch.setattr(C, "rank", lambda r=r: r)
        read = lambda skip: [int(v) for x, _ in AT.loader_batches(ds, order, 2, skip, 3, args, torch.device("cpu"))
                             for v in x[:, 0]]
        seen[r] = read(0)
        assert read(1) == seen[r][2:] and AT.epoch_steps(11, 2) == 3
    assert seen[0] == order.tolist()[0::2] and seen[1] == order.tolist()[1::2] + [order[0]]
    assert set(seen[0]) | set(seen[1]) == set(range(11)) and len(seen[0]) == len(seen[1]) == 6


def test_at_frozen_alone_in_a_fresh_folder_counts_unreadable_test_clips(at_tasks, tmp_path, at_thread):
    """Issue 20, bug 1: `--mode frozen` alone in a fresh --out computed every embedding and then died ("Parent
    directory <out>/mbv2/<task> does not exist"). And a test fold with an unreadable clip is scored on its
    readable clips, with n_test the readable count and the skipped one counted."""
    task = C.read_task(at_tasks, "sound_novel")
    audio = tmp_path / "audio"
    for fn, _, _ in task.rows:
        (audio / fn).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(task.root / fn, audio / fn)
    bad = next(fn for fn, _, fold in task.rows if fold == "1")  # a test clip of HEAR split 1
    (audio / bad).write_bytes(b"not audio")
    C.write_task(tmp_path / "tasks", "sound_novel", task.rows, task.classes, type=task.type, metric=task.metric,
                 kfold=True, folds=task.folds, max_seconds=task.max_seconds, audio_root=str(audio))
    ckpt = _random_upstream(tmp_path / "up.pt")
    out = tmp_path / "fresh" / "run"
    AT.main(["--upstream-ckpt", str(ckpt), "--task-root", str(tmp_path / "tasks"), "--out", str(out), "--mode",
             "frozen", "--workers", "0", "--preset", "cpu", "--batch-size", "4", "--max-steps", "2"])
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    assert cell["mode"] == "frozen" and (cell["n_test"], cell["test_skipped"]) == (1, 1)
    assert "Unreadable test clips" in (out / "results.md").read_text()


def test_at_bf16_training_steps_and_float32_scores(at_tasks, at_thread):
    """--amp bf16 on CPU: the upstream's real training step (bench_step: augmentation, mix-up, SpecAugment,
    BCE, Adam) runs and moves the weights; a downstream's scores leave autocast as float32; bench_step's
    bare step runs too (batch 2)."""
    b = AT.bench_step("cpu", "bf16", batch_size=2)
    b["step"]()
    b["bare"]()
    assert b["clips"] == 2
    task = C.read_task(at_tasks, "sound_novel")
    K = len(task.classes)
    model = AT.Downstream(AT.MobileNetV2(1), K, False)
    args = AT.parse_args(["--amp", "bf16"])
    scores = AT.predict(model, C.VarLenDataset(task.root, task.rows[:3], task.targets(task.rows[:3])), K,
                        lambda out: AT.clip_scores(out, False), args)
    assert scores.dtype == np.float32 and np.allclose(scores.sum(1), 1, atol=1e-5)
    losses, dtype = C.Mean(), C.amp_dtype(torch.device("cpu"), "bf16")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, C.SR), torch.eye(K)[:2]
    for _ in range(2):
        AT.train_step(model, x, y, lambda m, a, t: AT.clip_loss(m(a), t, False), opt, C.grad_scaler(torch.device("cpu"),
                      dtype), dtype, losses)
    assert np.isfinite(losses.read())


def test_at_step_has_no_host_sync():
    """GPU-ready step: no .item(), .cpu(), float(tensor), .numpy() or .tolist() in the per-step code."""
    import inspect
    for fn in (AT.train_step, AT.upstream_loss, AT.clip_loss, AT.loader_batches):
        src = inspect.getsource(fn)
        assert not re.search(r"\.item\(|\.cpu\(|(?<![.\w])float\(|\.numpy\(|\.tolist\(", src), fn.__name__


def test_at_evaluation_starts_no_loader_workers(at_tasks, monkeypatch, at_thread):
    """Issue 20: evaluation read its clips through a new 2-worker DataLoader on every call; now in-process."""
    def no_loader(*a, **k):
        raise AssertionError("a DataLoader was built for evaluation")
    monkeypatch.setattr(torch.utils.data, "DataLoader", no_loader)
    task = C.read_task(at_tasks, "sound_novel")
    ds = C.VarLenDataset(task.root, task.rows[:2], task.targets(task.rows[:2]))
    out = AT.predict(AT.Downstream(AT.MobileNetV2(1), 4, False), ds, 4, lambda o: o, AT.parse_args(["--workers", "2"]))
    assert out.shape == (2, 4) and not np.isnan(out).any()


def test_at_no_discovery_of_other_scripts_runs(tmp_path, monkeypatch):
    """Issue 19: the CPU preset silently took the newest psl.py machine annotator under runs/ as the upstream;
    now the upstream is the given checkpoint or a stage folder named by its own settings only."""
    monkeypatch.chdir(tmp_path)
    _random_upstream(tmp_path / "runs" / "psl" / "teacher_full_synth_abc" / "final.pt")
    (tmp_path / "runs" / "psl" / "teacher_full_synth_abc" / "results.json").write_text("{}")
    args = AT.resolve(AT.parse_args(["--preset", "cpu"]))
    assert args.upstream_ckpt is None and args.given_arch is None
    again = AT.resolve(AT.parse_args(["--preset", "cpu"]))
    assert AT.run_identity(args) == AT.run_identity(again) and "ckpt" not in AT.upstream_source(args, "mbv2")
    other = AT.resolve(AT.parse_args(["--preset", "cpu", "--up-lr", "0.01"]))
    assert AT.upstream_source(other, "mbv2") != AT.upstream_source(args, "mbv2")


@pytest.mark.parametrize("argv", [
    ["--trials", "0"], ["--trials", "-1"], ["--epochs", "0"], ["--up-epochs", "0"], ["--lr", "0"], ["--lr", "nan"],
    ["--up-lr", "-1e-3"], ["--up-lr", "inf"], ["--batch-size", "0"], ["--up-batch-size", "-8"], ["--top-k", "0"],
    ["--bn-batches", "-1"], ["--folds", "0"], ["--patience", "0"], ["--up-patience", "0"], ["--frozen-epochs", "0"],
    ["--frozen-patience", "0"], ["--evals-per-epoch", "0"], ["--valid-fraction", "0"], ["--valid-fraction", "1"],
    ["--task-scale", "0"], ["--aug-p", "1.5"], ["--max-shift", "-0.1"], ["--mixup-alpha", "0"], ["--time-mask", "-1"],
    ["--freq-mask", "x"], ["--n-masks", "-2"], ["--gain-db", "6", "-18"], ["--gain-db", "nan", "0"], ["--workers", "-1"],
    ["--max-steps", "0"], ["--synth-scale", "0"]])
def test_at_bad_flags_are_one_line_usage_errors(argv, tmp_path, capsys):
    """Every numeric flag is range-checked at parse time: exit 2, one error line naming the flag, nothing written."""
    with pytest.raises(SystemExit) as e:
        AT.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and ": error: " in err[-1] and argv[0] in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


def _at_bad_case(case: str, tmp: Path, tasks: Path) -> tuple[list, str]:
    """(argv, the message expected) of one bad-input case, with its files made in tmp."""
    base = ["--task-root", str(tasks), "--workers", "0", "--preset", "cpu", "--max-steps", "1"]
    up = str(_random_upstream(tmp / "up.pt"))
    if case == "psla checkpoint":
        torch.save({"model": {"features.0.weight": torch.zeros(1)}, "config": {}}, tmp / "wa.pt")
        return base + ["--upstream-ckpt", str(tmp / "wa.pt"), "--out", str(tmp / "o")], "not an upstream checkpoint"
    if case == "ofa checkpoint":
        torch.save({"model": ofa_aec.CNN10(3).state_dict(), "labels": {"mids": ["a"] * 3}}, tmp / "ofa.pt")
        return base + ["--upstream-ckpt", str(tmp / "ofa.pt"), "--out", str(tmp / "o")], "not an upstream checkpoint"
    if case == "random bytes as checkpoint":
        (tmp / "x.pt").write_bytes(os.urandom(64))  # common.load_checkpoint's line for a file torch cannot read
        return base + ["--upstream-ckpt", str(tmp / "x.pt"), "--out", str(tmp / "o")], "x.pt: not a PyTorch checkpoint"
    if case == "missing checkpoint":
        return base + ["--upstream-ckpt", str(tmp / "none.pt"), "--out", str(tmp / "o")], "not found"
    if case == "out is a file":
        (tmp / "file.txt").write_text("mine")
        return base + ["--upstream-ckpt", up, "--out", str(tmp / "file.txt")], "not a folder"
    if case == "out under a file":
        (tmp / "file.txt").write_text("mine")
        return base + ["--upstream-ckpt", up, "--out", str(tmp / "file.txt" / "sub")], "cannot write"
    if case == "another script's finished run":
        (tmp / "o").mkdir()
        C.write_json(tmp / "o" / "config.json", {"script": "psl", "identity": {"lr": 1}})
        (tmp / "o" / "results.json").write_text('{"mAP": 0.5}')
        return base + ["--upstream-ckpt", up, "--out", str(tmp / "o")], "a run folder of psl.py"
    if case == "our file names in a user's folder":
        (tmp / "o").mkdir()
        (tmp / "o" / "results.json").write_text("my results")
        return base + ["--upstream-ckpt", up, "--out", str(tmp / "o"), "--no-resume"], "not written by"
    if case == "truncated tasks.json":
        (tmp / "t").mkdir()
        (tmp / "t" / "tasks.json").write_text('{"a": {"manifest": ')
        return base[2:] + ["--task-root", str(tmp / "t"), "--upstream-ckpt", up, "--out", str(tmp / "o")], "tasks.json"
    if case == "no tasks.json":
        (tmp / "t").mkdir()
        return base[2:] + ["--task-root", str(tmp / "t"), "--upstream-ckpt", up, "--out", str(tmp / "o")], "tasks.json"
    if case == "task entry without a manifest":
        (tmp / "t").mkdir()
        (tmp / "t" / "tasks.json").write_text(json.dumps({"a": {"manifest": "a.tsv", "type": "single"}}))
        return base[2:] + ["--task-root", str(tmp / "t"), "--upstream-ckpt", up, "--out", str(tmp / "o")], "tasks.json"
    if case == "unknown task":
        return base + ["--task", "nope", "--upstream-ckpt", up, "--out", str(tmp / "o")], "no task 'nope'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["psla checkpoint", "ofa checkpoint", "random bytes as checkpoint",
                                  "missing checkpoint", "out is a file", "out under a file",
                                  "another script's finished run", "our file names in a user's folder",
                                  "truncated tasks.json", "no tasks.json", "task entry without a manifest",
                                  "unknown task"])
def test_at_bad_inputs_are_one_line_and_keep_user_files(case, at_tasks, tmp_path, at_thread):
    """Foreign checkpoints, --out a file / under one / another script's run / a user's folder, malformed task
    lists: one line (DataError) naming the file or flag, before any training, and no user file is changed."""
    argv, want = _at_bad_case(case, tmp_path, at_tasks)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(C.DataError, match=re.escape(want)) as e:
        AT.main(argv)
    assert "\n" not in str(e.value)
    assert all(p.read_bytes() == b for p, b in before.items())  # nothing overwritten or deleted
    assert not list(tmp_path.rglob("log.jsonl"))  # nothing trained


def test_at_foreign_checkpoint_on_the_command_line_is_one_line(tmp_path):
    torch.save({"encoder": {}, "config": {}}, tmp_path / "ssl.pt")  # a conformer_ssl.py pre-trained encoder
    r = run_cli("at_transfer.py", "--upstream-ckpt", tmp_path / "ssl.pt", "--out", tmp_path / "o", check=False)
    assert r.returncode == 1 and r.stdout.strip().splitlines() == [
        f"error: {tmp_path / 'ssl.pt'}: not an upstream checkpoint (at_transfer.py's upstream final.pt or a psl.py "
        f"machine annotator)"] and not (tmp_path / "o").exists()


def test_at_frozen_leaves_backbone_unchanged_and_cache_is_exact(tiny_tasks, tmp_path, at_thread):
    ckpt = _random_upstream(tmp_path / "up.pt")
    up = AT.build_upstream(C.load_checkpoint(ckpt))
    task = C.read_task(_at_subset(tiny_tasks, "keywords", lambda i, r: i % 20 in (0, 1, 14, 17), tmp_path / "t"),
                       "keywords")  # 2 training, 1 valid, 1 test clip per class
    args = AT.resolve(AT.parse_args(["--workers", "0", "--preset", "cpu", "--batch-size", "16", "--max-steps", "3",
                                     "--bn-batches", "1", "--out", str(tmp_path / "r"), "--upstream-ckpt", str(ckpt)]))
    dev, log = torch.device("cpu"), C.RunLogger(tmp_path / "r")
    cache = AT.frozen_cache(args, task, "mbv2", str(ckpt), dev)
    assert len(list(tmp_path.glob("frozen_mbv2_keywords-*/embeddings.pt"))) == 1  # a stage beside the run
    name, tr, va, te = C.task_splits(task)[0]
    wave = torch.from_numpy(C.load_audio(task.root / te[0][0])).unsqueeze(0)
    with torch.no_grad():
        want = up.eval().embed(wave)[0]
    got = cache["clip"][[r[0] for r in task.rows].index(te[0][0])].float()
    assert torch.allclose(got, want, atol=2e-2 * want.abs().max())  # float16
    before = {k: v.clone() for k, v in up.state_dict().items() if not k.startswith("classifier")}
    (tmp_path / "r").mkdir()
    res, model = AT.run_split(args, task, "frozen", "mbv2", str(ckpt), cache, tr, va, te, tmp_path / "r" / "f", log, dev)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert res["steps"] == 3 and 0 <= res["test"] <= 1
    _, tuned = AT.run_split(args, task, "finetune", "mbv2", str(ckpt), None, tr, va, te, tmp_path / "r" / "t", log, dev)
    assert not all(torch.equal(before[k], tuned.backbone.state_dict()[k]) for k in before)  # the control


# ---- issue 20: at_transfer.py with a user's own data, at real scale ----
def test_at_upstream_validates_on_the_balanced_subset(at_corpus, tmp_path, monkeypatch, capsys):
    """Issue 20, bug 3: `--valid-on train` (the paper's "balanced subset") and the no-valid.tsv fallback validated on
    corpus.train, i.e. balanced + unbalanced for --data full (1.9 M clips on AudioSet); now balanced_train.tsv."""
    import dataclasses
    balanced = C.read_manifest(at_corpus / "balanced_train.tsv")
    full = C.load_corpus(str(at_corpus), "full")
    assert len(full.train) > len(balanced) and full.valid is not None
    seen = []

    class Validated(Exception):
        pass

    def fake_fit(net, trainable, batches, steps, loss_fn, validate, *a, **k):
        validate(net)
        raise Validated

    monkeypatch.setattr(AT, "fit", fake_fit)
    monkeypatch.setattr(AT, "tag_eval", lambda m, corpus, rows, y, args: seen.append(rows) or {"mAP": 0.0})
    load = C.load_corpus
    for flags, valid in ((["--valid-on", "train"], True), (["--valid-on", "balanced"], True), ([], False), ([], True)):
        monkeypatch.setattr(C, "load_corpus", lambda *a, **k: load(*a, **k) if valid else
                            dataclasses.replace(load(*a, **k), valid=None))  # a corpus without valid.tsv
        args = AT.resolve(AT.parse_args(["--data-root", str(at_corpus), "--data", "full", "--preset", "cpu",
                                         "--workers", "0", "--out", str(tmp_path / "r"), *flags]))
        with pytest.raises(Validated):
            AT.train_upstream(args, "mbv2", tmp_path / "up", torch.device("cpu"))
    assert seen[0] == seen[1] == seen[2] == balanced and seen[3] == full.valid
    assert "no valid.tsv: the upstream validates on balanced_train.tsv" in capsys.readouterr().out


def test_at_presets_by_device_not_by_corpus(tmp_path, monkeypatch, capsys):
    """Issue 20, bug 5: adding --data-root silently switched a CPU run to the paper preset (100 / 150 epochs, lr
    1e-4, 4 trials); now the device decides (common.apply_preset), printed with the reason. The paper preset turns
    off the CPU-preset measures (BatchNorm re-estimation, frozen standardisation: deviations 6 / 7); a given flag
    wins."""
    base = ["--out", str(tmp_path / "r")]
    a = AT.resolve(AT.parse_args(base + ["--data-root", str(tmp_path)]))
    assert (a.preset, a.up_epochs, a.epochs, a.lr, a.trials, a.bn_batches, a.frozen_standardize) == \
        ("cpu", 3, 12, 1e-3, 1, 4, True)
    assert "at_transfer: preset cpu (auto: no CUDA GPU" in capsys.readouterr().out
    a = AT.resolve(AT.parse_args(base + ["--preset", "paper"]))
    assert (a.up_epochs, a.epochs, a.lr, a.trials, a.folds, a.bn_batches, a.frozen_standardize) == \
        (100, 150, 1e-4, 4, None, 0, False)
    a = AT.resolve(AT.parse_args(base + ["--preset", "paper", "--bn-batches", "2", "--frozen-standardize"]))
    assert (a.bn_batches, a.frozen_standardize) == (2, True)
    monkeypatch.setattr(C, "pick_device", lambda name="auto": torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "a GPU")
    a = AT.resolve(AT.parse_args(base))  # the synthetic corpus on a GPU: the paper's schedule
    assert (a.preset, a.up_epochs, a.bn_batches, a.frozen_standardize) == ("paper", 100, 0, False)


def test_at_task_root_alone_says_what_the_upstream_learns_from(tmp_path, capsys):
    """Issue 20, bug 5: `--task-root X` alone trained the upstream on the synthetic corpus without saying so."""
    AT.resolve(AT.parse_args(["--task-root", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "cpu"]))
    out = capsys.readouterr().out
    assert "upstream mbv2 trained here on the synthetic corpus (no --data-root" in out and "--upstream-ckpt" in out
    AT.resolve(AT.parse_args(["--task-root", str(tmp_path), "--out", str(tmp_path / "r"), "--mode", "scratch"]))
    assert "upstream" not in capsys.readouterr().out  # scratch cells read no upstream


def test_at_scratch_needs_no_upstream_and_one_matrix_is_one_folder(at_tasks, tmp_path, capsys, at_thread):
    """Issue 20, bug 5: scratch-only runs trained an upstream, and the upstream was part of the run key, so the
    scratch column (no upstream) and the frozen column (--upstream-ckpt) of one task matrix went to two run
    folders. Now scratch trains none; both columns fill one folder; a second upstream for frozen / finetune cells of
    the same architecture is refused in one line. Every stage reports its plateau (log line, result.json, cell)."""
    out = tmp_path / "runs" / "run"
    base = ["--task-root", str(at_tasks), "--out", str(out), "--workers", "0", "--preset", "cpu", "--batch-size", "4",
            "--max-steps", "2", "--bn-batches", "1"]
    AT.main(base + ["--mode", "scratch"])
    assert not list((tmp_path / "runs").glob("upstream_*"))  # none trained
    assert not (out / "upstreams.json").exists()
    ckpt = _random_upstream(tmp_path / "up.pt")
    res = AT.main(base + ["--mode", "frozen", "--upstream-ckpt", str(ckpt)])
    assert sorted(c["mode"] for c in res["cells"]) == ["frozen", "scratch"] and list(res["upstreams"]) == ["mbv2"]
    assert json.loads((out / "upstreams.json").read_text())["mbv2"]
    other = _random_upstream(tmp_path / "other.pt", 20)
    with pytest.raises(C.DataError, match="read another upstream"):
        AT.main(base + ["--mode", "finetune", "--upstream-ckpt", str(other)])
    AT.main(base + ["--mode", "scratch", "--upstream-ckpt", str(other), "--trials", "1"])  # scratch: any upstream
    # plateau reports: the last validation line of each stage, each split's result.json, each cell
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    for stage in {l["stage"] for l in lines}:
        last = [l for l in lines if l["stage"] == stage][-1]
        assert set(last["plateau"]) == {"plateau", "tolerance", "validations", "gain", "best", "last"}, stage
    r = json.loads((out / "mbv2" / "sound_novel" / "scratch" / "trial0_fold1" / "result.json").read_text())
    assert r["plateau"]["validations"] == 1 and r["plateau"]["plateau"] is False  # 1 validation: too few to tell
    assert all(c["plateau"] == {"reached": 0, "runs": 1} for c in res["cells"])
    assert "not reached a plateau" in (out / "results.md").read_text()


def test_at_speech_rows_by_tasks_json_domain(tmp_path):
    """Issue 20, bug 7: a task was a speech row only by its name (keywords, spcv1, ...); now by tasks.json's
    "domain" (data/prepare.py writes it), with the paper's speech or sound pattern in the paper column of a task
    that has no Table 3 row. An older entry without a domain falls back to Table 3's speech datasets by name."""
    rows = [(f"{i}.wav", ["yes" if i % 2 else "no"], "train") for i in range(4)]
    C.write_task(tmp_path, "my_commands", rows, ["no", "yes"], type="single", metric="accuracy", kfold=False,
                 folds=["train", "valid", "test"], domain="speech")
    C.write_task(tmp_path, "keywords", rows, ["no", "yes"], type="single", metric="accuracy", kfold=False,
                 folds=["train", "valid", "test"], domain="sound")  # a user's sound task named like ours
    t = C.read_task(tmp_path, "my_commands")
    assert AT.domain(t.name, t.info) == "speech"
    assert AT.domain("keywords", C.read_task(tmp_path, "keywords").info) == "sound"
    assert AT.domain("scv2_35", {}) == "speech" and AT.domain("esc50", {}) == "sound"
    cell = lambda task, mode, **k: {"task": task, "mode": mode, "arch": "mbv2", "metric": "accuracy", "trials": [0.5],
                                    "mean": 0.5, **k}
    results = {"upstreams": {}, "cells": [cell("my_commands", "scratch", domain="speech"),
                                          cell("keywords", "scratch", domain="sound"), cell("scv2_35", "scratch"),
                                          cell("mine", "frozen", domain="music")]}
    md = AT.at_markdown(results, AT.resolve(AT.parse_args(["--preset", "cpu", "--out", str(tmp_path / "r")])))
    line = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| ")}
    assert "my_commands (speech)" in line and "speech rows: frozen << scratch" in line["my_commands (speech)"]
    assert "keywords" in line and "sound rows: frozen > scratch" in line["keywords"]
    assert "scv2_35 (speech)" in line and "96.18 / 49.13 / 96.81" in line["scv2_35 (speech)"]
    assert "sound rows" in line["mine"]


def test_at_mixup_is_spectral(monkeypatch, at_thread):
    """Issue 20, faithful recipe: the paper mixes in the spectral domain ("in the spectral-domain, we use mixup with
    beta(1, 1)"); the script mixed the waveforms. Now the model sees the unmixed waves, the log-mels are mixed, and
    the loss reads the labels of that mix-up; --mixup-domain wave keeps the old path."""
    w, y = torch.randn(3, 100), torch.eye(3)
    seen, mixups = {}, []
    mixup = C.mixup
    monkeypatch.setattr(C, "mixup", lambda x, t, alpha: mixups.append((x, mixup(x, t, alpha))) or mixups[-1][1])
    monkeypatch.setattr(AT, "clip_loss", lambda out, t, multi: seen.setdefault("y", t).sum())

    def model(wave, spectral):
        seen["wave"] = wave
        seen["mel"] = spectral(torch.arange(3.0).view(3, 1, 1).expand(3, 4, 5).clone())  # clip i's log-mel: all i
        return torch.full((3, 3), 0.5), None

    AT.upstream_loss(model, w, y, AT.parse_args(["--aug-p", "0", "--time-mask", "0", "--freq-mask", "0"]))
    assert torch.equal(seen["wave"], w)  # no mix-up of the waves
    (x, (x_mixed, y_mixed)), = mixups
    assert x.shape == (3, 4, 5) and torch.equal(seen["mel"], x_mixed) and not torch.equal(x_mixed, x)
    assert seen["y"] is y_mixed and not torch.equal(y_mixed, y)  # the loss reads the mixed labels
    seen.clear()
    AT.upstream_loss(model, w, y, AT.parse_args(["--aug-p", "0", "--mixup-domain", "wave"]))
    assert torch.equal(mixups[-1][0], w) and torch.equal(seen["wave"], mixups[-1][1][0]) and seen["y"] is mixups[-1][1][1]


def test_at_paper_recipe_per_dataset(tmp_path, capsys):
    """Issue 20, faithful recipe: FSDKaggle2018 (single-label data) is trained with BCE and FSDKaggle2019 on 4 s
    segments, as Sec. 4.2.2 says (the converters write single-label / 10 s); printed, and in the task's entry (the
    frozen cache's key). Other tasks are read as tasks.json says."""
    rows = [(f"{i}.wav", ["a" if i % 2 else "b"], "train") for i in range(4)]
    kw = dict(metric="accuracy", kfold=False, folds=["train", "valid", "test"])
    C.write_task(tmp_path, "fsdkaggle2018", rows, ["a", "b"], type="single", max_seconds=10.0, **kw)
    C.write_task(tmp_path, "fsdkaggle2019_curated", rows, ["a", "b"], type="multi", max_seconds=10.0, **kw)
    C.write_task(tmp_path, "esc50", rows, ["a", "b"], type="single", max_seconds=5.0, **kw)
    args = AT.resolve(AT.parse_args(["--task-root", str(tmp_path), "--out", str(tmp_path / "r"), "--preset", "cpu"]))
    fsd18, fsd19, esc = AT.read_tasks(args)
    assert AT.bce(fsd18) and fsd18.max_seconds == 10.0 and fsd18.info["loss"] == "bce"
    assert AT.bce(fsd19) and fsd19.max_seconds == 4.0 and fsd19.info["max_seconds"] == 4.0
    assert not AT.bce(esc) and esc.max_seconds == 5.0 and esc.info == C.read_task(tmp_path, "esc50").info
    out = capsys.readouterr().out
    assert "fsdkaggle2018: the paper's recipe for FSD18: loss bce" in out and "max_seconds 4.0" in out
    model = AT.Downstream(AT.MobileNetV2(1), 2, AT.bce(fsd18))
    assert model.multilabel  # sigmoid per frame, BCE (Downstream / clip_loss)


def test_at_startup_at_audioset_scale_stays_small(tmp_path):
    """Issue 20, at scale: the upstream's start-up holds the training targets as uint8 (a quarter of float32)."""
    root = tmp_path / "c"
    root.mkdir()
    (root / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,a\n1,/m/b,b\n")
    for split, n in (("balanced_train", 4), ("unbalanced_train", 6), ("eval", 2)):
        C.write_manifest(root / f"{split}.tsv", [(f"{split}{i}.wav", ["/m/a" if i % 2 else "/m/b"]) for i in range(n)])
    args = AT.resolve(AT.parse_args(["--data-root", str(root), "--preset", "cpu", "--out", str(tmp_path / "r")]))
    corpus, ds, sampler, vrows = AT.upstream_data(args)
    assert len(corpus.train) == 10 and ds.targets.dtype == torch.uint8 and len(vrows) == 4
    assert sorted(sampler.epoch_indices(0)) == list(range(10))


# --- issue 21: the figure, the docs page, newcomer items ------------------------------------------------------
def _at_fake_run(out: Path, cells: dict, upstreams: dict | None = None) -> Path:
    """A finished run folder's results.json: cells {(task, mode): trials in [0, 1]} (no training)."""
    out.mkdir(parents=True, exist_ok=True)
    C.write_json(out / "results.json", {"upstreams": upstreams or {}, "cells": [
        {"task": t, "domain": "speech" if t == "keywords" else "sound", "mode": m, "arch": "mbv2",
         "metric": "mAP" if t == "tagging" else "accuracy", "trials": v, "mean": float(np.mean(v)),
         "plateau": {"reached": 0 if (t, m) == ("tagging", "scratch") else len(v), "runs": len(v)}}
        for (t, m), v in cells.items()]})
    return out


def _at_drawn(monkeypatch, argv) -> tuple:
    """Run `plot` and keep its Axes (common.figure closes the figure; the Axes stays readable)."""
    seen, figure = {}, C.figure

    def spy(path, draw, **kw):
        return figure(path, lambda ax: (draw(ax), seen.setdefault("ax", ax)), **kw)
    monkeypatch.setattr(C, "figure", spy)
    path = AT.main(["plot", *argv])
    bars = {c.get_label(): c for c in seen["ax"].containers if hasattr(c, "patches")}
    return path, bars


def test_at_plot_draws_the_matrix_of_results_json(tmp_path, monkeypatch):
    """The figure: bar heights are results.json's cell means (trials' mean) in %, error bars their sample std; the
    paper's Table 3 row beside a public task (esc50) and the paper's SPCV2 row beside a synthetic speech task."""
    cells = {(t, m): [0.1 * (i + 1) + 0.01 * j, 0.1 * (i + 1) + 0.01 * j + 0.04] for i, t in
             enumerate(["esc50", "keywords"]) for j, m in enumerate(AT.MODES)}
    run = _at_fake_run(tmp_path / "run", cells)
    path, bars = _at_drawn(monkeypatch, [str(run), "--out", str(tmp_path / "f.png")])
    assert path == tmp_path / "f.png" and path.stat().st_size > 10_000
    for m in AT.MODES:
        h = [b.get_height() for b in bars[f"ours {m}"].patches]
        assert np.allclose(h, [100 * np.mean(cells[(t, m)]) for t in ("esc50", "keywords")])
        segs = bars[f"ours {m}"].errorbar.lines[2][0].get_segments()  # the vertical error lines
        assert np.allclose([s[1, 1] - s[0, 1] for s in segs], [2 * 100 * np.std(cells[(t, m)], ddof=1)
                                                               for t in ("esc50", "keywords")])
        assert np.allclose([b.get_height() for b in bars[f"paper {m}"].patches],
                           [AT.PAPER_T3["ESC-50"]["mbv2"][AT.MODES.index(m)], AT.PAPER_T3["SPCV2"]["mbv2"][AT.MODES.index(m)]])


def test_at_plot_reads_a_seeds_table_and_the_default_png(tmp_path, monkeypatch):
    """`common.py seeds ... --key cells.<i>.mean` over run folders (one per seed): one value per seed, mean +- std;
    without --out the PNG goes into the first RUN."""
    runs = [_at_fake_run(tmp_path / f"s{s}", {("tagging", "scratch"): [0.2 + 0.1 * s], ("tagging", "frozen"): [0.5 - 0.1 * s]})
            for s in range(3)]
    C.seeds_table([["seeds", *map(str, runs)]], ["cells.0.mean", "cells.1.mean"], tmp_path / "seeds")
    path, bars = _at_drawn(monkeypatch, [str(tmp_path / "seeds")])
    assert path == tmp_path / "seeds" / "matrix.png" and path.exists()
    assert np.allclose([b.get_height() for b in bars["ours scratch"].patches], [30.0])
    assert np.allclose([b.get_height() for b in bars["ours frozen"].patches], [40.0])
    assert "ours finetune" not in bars  # no such cell in results.json: nothing drawn
    _at_fake_run(tmp_path / "bad", {})
    C.write_json(tmp_path / "bad" / "results.json", {"x": {"mAP": [0.1], "runs": [str(runs[0])]}})
    with pytest.raises(C.DataError, match=re.escape("no cells.<i>.mean key")):
        AT.main(["plot", str(tmp_path / "bad")])


def test_at_every_parser_has_help_and_defaults_and_its_own_usage(capsys):
    """Every flag of the experiment, embed and plot has help text, shown with its default (common.HelpFormatter);
    `embed --help` / `plot --help` are their own, not the experiment's."""
    for parser in (AT.build_parser(), AT.embed_parser(), AT.plot_parser()):
        assert parser.formatter_class is C.HelpFormatter
        assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    for argv, want in ((["--help"], "(default: 32)"), (["embed", "--help"], "usage: at_transfer.py embed"),
                       (["plot", "--help"], "usage: at_transfer.py plot")):
        with pytest.raises(SystemExit) as e:
            AT.main(argv)
        out = capsys.readouterr().out
        assert e.value.code == 0 and want in out and ("--up-lr" in out) == (argv == ["--help"])


def test_at_embed_reads_a_run_folder_and_says_where_and_how_much_memory(tmp_path, capsys, at_thread):
    """`embed --ckpt RUN`: the upstream the run's cells read (results.json; the stage beside the run wherever it
    was made), the embeddings' folder and the peak memory printed, a note when the upstream knows only the
    synthetic corpus's classes. Before: a folder was 'not a PyTorch checkpoint'."""
    up = _random_upstream(tmp_path / "runs" / "upstream_mbv2-abc" / "final.pt", 3)
    ck = torch.load(up, weights_only=False)
    ck["labels"]["mids"] = ["/synth/a", "/synth/b", "/synth/c"]
    torch.save(ck, up)
    run = _at_fake_run(tmp_path / "runs" / "synth_tasks_cpu", {("sound_novel", "frozen"): [0.5]},
                       {"mbv2": {"ckpt": "elsewhere/upstream_mbv2-abc/final.pt"}})
    wav = tmp_path / "w.wav"
    sf.write(wav, sine(440, 16000, 1.0), 16000)
    AT.main(["embed", "--ckpt", str(run), "--out", str(tmp_path / "emb"), str(wav)])
    out = capsys.readouterr().out
    assert f"embed: {up}" in out and "synthetic corpus's 3 toy classes" in out
    assert f"embeddings: {tmp_path / 'emb'} (1 file(s); peak memory" in out and (tmp_path / "emb" / "w.npy").exists()
    with pytest.raises(C.DataError, match="names no upstream"):
        AT.main(["embed", "--ckpt", str(_at_fake_run(tmp_path / "scratch_only", {})), "--out", str(tmp_path / "e2"), str(wav)])


@pytest.mark.parametrize("case", ["wav", "random bytes", "dict with task but no arch", "downstream of another model",
                                  "psla checkpoint", "missing"])
def test_at_embed_foreign_checkpoint_is_one_line(case, tmp_path, at_thread):
    """embed --ckpt with a file that is not an upstream: one line (a dict with 'task' but no 'arch' was a KeyError
    traceback, a downstream of other tensors a page of load_state_dict messages)."""
    wav, ck = tmp_path / "a.wav", tmp_path / "ck.pt"
    sf.write(wav, sine(440, 16000, 1.0), 16000)
    if case == "wav":
        ck = wav
    elif case == "random bytes":
        ck.write_bytes(np.random.default_rng(0).bytes(500))
    elif case == "dict with task but no arch":
        torch.save({"task": "x", "model": {}}, ck)
    elif case == "downstream of another model":
        torch.save({"task": "x", "arch": "mbv2", "model": {"backbone.x": torch.zeros(1)}}, ck)
    elif case == "psla checkpoint":
        torch.save({"script": "psla", "model": {"x": torch.zeros(1)}}, ck)
    with pytest.raises(C.DataError) as e:
        AT.main(["embed", "--ckpt", str(ck), "--out", str(tmp_path / "emb"), str(wav)])
    assert "\n" not in str(e.value) and str(ck) in str(e.value) and not (tmp_path / "emb").exists()


def _at_doc_commands() -> list[list[str]]:
    """Every `python at_transfer.py ...` command of the docstring and of docs/at_transfer.md's bash blocks
    (continuation lines joined, comments dropped), as argv lists."""
    page = (HERE / "docs" / "at_transfer.md").read_text()
    bash = "\n".join(re.findall(r"```bash\n(.*?)```", page, re.S))
    doc = "\n".join(l.strip() for l in AT.__doc__.splitlines() if l.startswith("    "))
    cmds = []
    for text in (doc, bash):
        text = text.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" # ")[0].strip()
            if re.match(r"(python|torchrun .*?) ?at_transfer\.py", line) or line.startswith("python at_transfer.py"):
                cmds.append(shlex.split(line.split("at_transfer.py", 1)[1]))
    return cmds


def test_at_documented_commands_parse_and_name_their_upstream_corpus():
    """Every documented command parses with the script's own parsers (sub-commands included; no placeholder
    paths such as upstream_mbv2-<hash>). Issue 20, bug 4: every command with --task-root that needs an upstream
    names its corpus (--data-root) or gives one (--upstream-ckpt)."""
    cmds = _at_doc_commands()
    assert len(cmds) >= 8 and any(c[:1] == ["plot"] for c in cmds) and any(c[:1] == ["embed"] for c in cmds)
    for argv in cmds:
        assert not any("<" in a or a == "..." for a in argv), argv
        parser = {"embed": AT.embed_parser, "plot": AT.plot_parser}.get(argv[0] if argv else "", AT.build_parser)()
        parser.parse_args(argv[1:] if argv and argv[0] in ("embed", "plot") else argv)
        if "--task-root" in argv:
            assert "--data-root" in argv or "--upstream-ckpt" in argv or "scratch" in argv, argv


# =============================================================================================
# ofa_aec.py: CNN10 size, sub-network counts vs exported modules, slicing == export ==
# TorchScript, sampling covers the space, BN recalibration, end-to-end run with predict; the run-time
# idiom: exact resume after SIGKILL, torchrun DDP, bf16, the feature cache's key, bad input
# =============================================================================================
import argparse  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads can be 10x slower for these small nets."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ofa_cnn10_parameter_count(one_thread):
    for k, expected in ((527, 5_219_279), (10, 4_954_058), (200, 5_051_528)):  # reference A1 (computed)
        m = ofa_aec.CNN10(k)
        assert sum(p.numel() for p in m.parameters()) == ofa_aec.count_params(m.config) == expected
    x = torch.randn(2, 64, 101)
    assert ofa_aec.CNN10(30).eval()(x).shape == (2, 30)


def test_ofa_subnet_counts_equal_exported_modules(one_thread):
    for efc in (False, True):
        for depth, widths in (("2,2,X", [0.4, 0.6, 0.8, 1.0]), ("X,X,X", [0.4, 1.0]), ("2,2,2", [0.2, 0.4, 0.6, 0.8, 1.0])):
            space = ofa_aec.SearchSpace(30, 64, 0.125, widths, depth, efc)
            net = ofa_aec.Supernet(30, 64, space.channels, space.fc)
            for arch in space.all():
                plain = ofa_aec.export_subnet(net, space.config(arch))
                assert space.params(arch) == sum(p.numel() for p in plain.parameters()), (efc, arch)
    # the paper-scale count table (527 classes, reference A3): FC1 fixed / elastic
    for efc, r4, r6, r8, smallest in ((False, 1_169_618, 2_150_088, 3_491_612, 794_666),
                                      (True, 944_162, 1_978_913, 3_395_101, 569_210)):
        sp = ofa_aec.SearchSpace(527, 64, 1.0, [0.4, 0.6, 0.8, 1.0], "2,2,X", efc)
        assert [sp.params(((r, 2),) * 3) for r in (0.4, 0.6, 0.8, 1.0)] == [r4, r6, r8, 5_219_279]
        assert sp.params(sp.smallest) == smallest == min(map(sp.params, sp.all()))
        assert sp.config(((0.6, 2), (0.6, 2), (0.6, 1)))["blocks"][1:] == [[76, 76], [153, 153], [307]]


def test_ofa_sliced_subnet_equals_export_and_torchscript(one_thread):
    torch.manual_seed(0)
    for efc in (False, True):
        space = ofa_aec.SearchSpace(30, 64, 0.125, [0.4, 0.6, 0.8, 1.0], "X,X,X", efc)
        net = ofa_aec.Supernet(30, 64, space.channels, space.fc).eval()
        for m in net.modules():  # non-trivial statistics, so that slicing them matters
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.data.normal_()
        x = torch.randn(3, 64, 101)
        outs, archs = [], (space.smallest, space.largest, ((0.6, 1), (1.0, 2), (0.4, 2)), ((0.8, 2), (0.4, 1), (0.6, 1)))
        for arch in archs:
            cfg = space.config(arch)
            net.set_active(cfg)
            plain = ofa_aec.export_subnet(net, cfg).eval()
            assert not any(isinstance(m, (ofa_aec.DynamicConvBlock, ofa_aec.DynamicLinear)) for m in plain.modules())
            with torch.no_grad():
                a, b = net(x), plain(x)
            assert torch.allclose(a, b, atol=1e-6), arch
            outs.append(a)
        assert len({round(float(a.sum()), 3) for a in outs}) == 4  # different sub-networks: different functions
        with torch.no_grad():  # a training step's passes in one forward: the same sub-networks, then the full one
            assert torch.equal(net(x, None, [space.config(a) for a in archs]), torch.stack(outs))
        assert net.conv_block4.width == space.channels[3] and net.fc1.active_out == space.fc
    tagger = ofa_aec.Tagger("panns16k", plain).eval()
    wave = torch.randn(2, 16000)
    ts = torch.jit.trace(tagger, wave, check_trace=False)
    with torch.no_grad():
        net.set_active(space.config(((0.8, 2), (0.4, 1), (0.6, 1))))
        ref = torch.sigmoid(net(tagger.frontend(wave)))
        assert torch.allclose(ts(wave), ref, atol=1e-6) and torch.allclose(tagger(wave), ref, atol=1e-6)


def test_ofa_sampling_covers_exactly_the_configured_space():
    rng = np.random.default_rng(0)
    for depth, widths, size in (("2,2,X", [0.4, 0.6, 0.8, 1.0], 128), ("X,X,X", [0.4, 0.6, 0.8, 1.0], 512),
                                ("2,X,X", [0.4, 0.6, 0.8, 1.0], 256), ("2,2,2", [0.2, 0.4, 0.6, 0.8, 1.0], 125)):
        space = ofa_aec.SearchSpace(30, 64, 0.125, widths, depth, False)
        assert len(set(space.all())) == len(space.all()) == size
        draws = [space.sample(rng) for _ in range(40 * size)]
        counts = {a: 0 for a in space.all()}
        for a in draws:
            counts[a] += 1  # KeyError if a draw falls outside the space
        assert min(counts.values()) > 0 and max(counts.values()) < 90  # uniform: mean 40
        fixed = [i for i, d in enumerate(depth.split(",")) if d == "2"]
        assert all(a[i][1] == 2 for a in draws for i in fixed)
        assert space.largest == ((1.0, 2),) * 3 and space.smallest[0][0] == min(widths)


def test_ofa_bn_recalibration_changes_only_running_statistics(one_thread):
    torch.manual_seed(0)
    x = torch.randn(250, 64, 101) * 3 + 1
    data = type("D", (), {"train_idx": np.arange(250), "batch": lambda self, s, idx: x[idx]})()
    args = type("A", (), {"bn_recal_clips": 2000})()
    model = ofa_aec.CNN10(30, blocks=((8, 8), (6,), (12, 12), (25,)), fc=64).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    C.recalibrate_bn(model, ofa_aec.bn_batches(data, args, torch.device("cpu")))
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    for k, v in after.items():
        if k in params:
            assert torch.equal(v, before[k]), k  # weights untouched
        elif k.endswith(("running_mean", "running_var")):
            assert not torch.allclose(v, before[k]), k
    assert not model.training and all(m.momentum == 0.1 for m in model.modules()
                                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    # bn0 sees the raw input: its statistics are the batch-size-weighted mean over the 2 batches (200 + 50)
    perm = np.random.default_rng(0).permutation(250)
    b1, b2 = x[perm[:200]], x[perm[200:]]
    mean = (200 * b1.mean((0, 2)) + 50 * b2.mean((0, 2))) / 250
    var = (200 * b1.var((0, 2)) + 50 * b2.var((0, 2))) / 250
    assert torch.allclose(after["bn0.running_mean"], mean, atol=1e-4)
    assert torch.allclose(after["bn0.running_var"], var, rtol=1e-4)


def test_ofa_epoch_order_drawn_once_per_epoch_and_sharded(monkeypatch):
    """Issue 20: an epoch's order is drawn once from (seed, epoch), not per step; every epoch visits each
    readable clip (the last batch wraps); under DDP each process takes a disjoint share of the global batch."""
    data = object.__new__(ofa_aec.Data)
    data.train_idx, data.order = np.arange(0, 100, 10), (None, None)  # 10 readable clips
    draws = []
    rng = np.random.default_rng
    monkeypatch.setattr(ofa_aec.np.random, "default_rng", lambda seed: draws.append(seed) or rng(seed))
    batches = [data.train_batch(s, 4, seed=7) for s in range(6)]  # 3 steps per epoch, 2 epochs
    assert draws == [[7, 0], [7, 1]]  # once per epoch, not once per step
    for e in (0, 1):
        epoch = np.concatenate(batches[3 * e: 3 * e + 3])
        assert len(epoch) == 12 and set(epoch) == set(data.train_idx)
        np.testing.assert_array_equal(epoch[:10], data.train_idx[rng([7, e]).permutation(10)])
    monkeypatch.setattr(C, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(C, "rank", lambda r=r: r)
        shares.append(data.train_batch(4, 4, seed=7))
    assert len(shares[0]) == len(shares[1]) == 2 and sorted(np.concatenate(shares)) == sorted(batches[4])


def test_ofa_step_has_no_host_sync():
    """GPU-ready: no .item() / .cpu() / float(tensor) / .numpy() / .tolist() in the per-step path."""
    import inspect
    for fn in (ofa_aec.train_step, ofa_aec.train, ofa_aec.Data.train_batch, ofa_aec.Data.batch, ofa_aec.mix,
               ofa_aec.spec_augment, ofa_aec.Supernet.forward, ofa_aec.CNN10.forward):
        src = inspect.getsource(fn)
        for bad in (r"\.item\(", r"\.cpu\(", r"(?<![.\w])float\(", r"\.numpy\(", r"\.tolist\("):  # .float() casts
            assert not re.search(bad, src), (fn.__name__, bad)


def test_ofa_help(capsys):
    with pytest.raises(SystemExit):
        ofa_aec.main(["--help"])
    out = capsys.readouterr().out
    assert "--elastic-depth" in out and "--bn-recal" in out and "Sec. 2.4" in out and "common.py seeds" in out
    md = ofa_aec.main(["counts"])  # the count table both ways, with the windows' sizes at 527 classes
    assert "| r=0.4, depth 2 | 1,169,618 | 944,162 |" in md and "794,666-5,219,279 | 569,210-5,219,279" in md
    for b, fixed, elastic in ((0.8, 4, 11), (1.8, 25, 23), (2.8, 10, 12), (3.8, 8, 8)):  # docs/ofa_aec.md's table
        assert f"{b:g} +- 0.2M window (scaled to this size) | {fixed} | {elastic} |" in md


def test_ofa_every_parser_has_help_and_defaults_and_its_own_help(capsys):
    """--help of the training command and of each sub-command (its own, not the generic one): every flag has
    help text and shows its default."""
    parsers = {"": ofa_aec.build_parser(), "counts": ofa_aec.counts_parser(), "predict": ofa_aec.predict_parser(),
               "plot": ofa_aec.plot_parser()}
    for name, p in parsers.items():
        assert p.formatter_class is C.HelpFormatter, name
        with pytest.raises(SystemExit) as e:
            ofa_aec.main([name, "--help"] if name else ["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: ofa_aec.py {name}".rstrip()), name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if action.option_strings and action.default is not None:
                text = " ".join(p.format_help().split())
                assert f"(default: {' '.join(map(str, action.default)) if isinstance(action.default, list) else action.default})" \
                    in text or "default" in action.help, (name, action.dest)


def _ofa_doc_commands(tmp: Path) -> list[list[str]]:
    """Every `python ofa_aec.py ...` / `torchrun ... ofa_aec.py ...` command of the docstring (its indented
    lines) and of docs/ofa_aec.md's bash blocks (run by bash from the repository root with python and torchrun
    recording their arguments), as argv after the script's name."""
    cmds = []
    for line in ofa_aec.__doc__.splitlines():
        m = re.search(r"(?:python|torchrun[^#]*?) ofa_aec\.py\b([^#]*)", line)
        if m:
            cmds.append(shlex.split(m.group(1)))
    blocks = re.findall(r"```bash\n(.*?)```", (HERE / "docs" / "ofa_aec.md").read_text(), re.S)
    rec = tmp / "recorded"
    record = f'printf "%s\\037" "$@" >> {rec}; echo >> {rec}'
    script = f"python() {{ {record}; }}\ntorchrun() {{ {record}; }}\n" + "\n".join(blocks)
    r = subprocess.run(["bash", "-c", script], cwd=HERE, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for line in rec.read_text().splitlines():
        argv = line.rstrip("\037").split("\037")
        script_at = next((i for i, a in enumerate(argv) if a.endswith("ofa_aec.py")), None)
        if script_at is not None:
            cmds.append(argv[script_at + 1:])
    return cmds


def test_ofa_documented_commands_parse(tmp_path):
    """The docstring's and docs page's commands use flags and sub-commands that exist (parsed, not run)."""
    cmds = _ofa_doc_commands(tmp_path)
    assert len(cmds) >= 20 and ["counts"] in cmds and ["--unit-steps", "400", "--seed", "2", "--budgets", "0.8",
                                                      "--baselines", "--baseline-widths", "0.4", "--finetune",
                                                      "--name", "dir_u400_s2"] in cmds  # a loop's last pass
    assert ["plot", "runs/ofa_aec/cpu_22X_s0", "--out", "docs/figures/ofa_aec.png"] in cmds  # the figures' commands
    assert ["plot", "runs/ofa_aec/direction", "--out", "docs/figures/ofa_aec_direction.png"] in cmds
    subs = {"counts": ofa_aec.counts_parser, "predict": ofa_aec.predict_parser, "plot": ofa_aec.plot_parser}
    for argv in cmds:
        p = subs[argv[0]]() if argv[:1] and argv[0] in subs else ofa_aec.build_parser()
        p.parse_args(argv[1:] if argv[:1] and argv[0] in subs else argv)


def _ofa_argv(root, out, *extra):
    return ["--data-root", str(root), "--out", str(out), "--workers", "0", "--batch-size", "4", "--unit-steps", "1",
            "--eval-every", "2", "--budgets", "0.8", "--population", "2", "--bn-recal-clips", "8", *extra]


def _ofa_saved_axes(monkeypatch) -> list:
    """The Axes of every figure matplotlib saves from now on (savefig spied on), to read back what was drawn."""
    import matplotlib.figure
    saved, savefig = [], matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        saved.append(fig.axes[0])
        return savefig(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def _ofa_drawn(ax) -> tuple[dict, dict]:
    """{label: (x, y)} of the Axes' labelled lines and {label: offsets} of its scatters."""
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()
             if not ln.get_label().startswith("_")}
    dots = {c.get_label(): c.get_offsets().tolist() for c in ax.collections if not c.get_label().startswith("_")}
    return lines, dots


# the paper's points, typed from the paper (Table 1: baselines at 1.0 / 2.1 / 3.5M and the teacher; Table 2: the
# searched [2,2,X] sub-networks at 0.9 / 1.8 / 2.7 / 3.6M), x as % of CNN10's 5,219,279 parameters
OFA_PAPER_DRAWN = {"paper: OFA [2,2,X] (Table 2)": ([0.9, 1.8, 2.7, 3.6], [26.6, 27.2, 27.7, 27.9]),
                   "paper: KD (Table 1)": ([1.0, 2.1, 3.5], [24.8, 26.4, 28.3]),
                   "paper: scratch (Table 1)": ([1.0, 2.1, 3.5], [21.2, 22.6, 24.8]),
                   "paper: teacher (Table 1)": ([5.219279], [29.6])}


def _ofa_check_plot(runs, res, png, monkeypatch):
    """`plot` of one run: the lines are the run's models by kind, the dots every searched candidate, x the
    parameters as % of the teacher's (the full CNN10), y eval mAP %, all as results.json has them."""
    saved = _ofa_saved_axes(monkeypatch)
    ofa_aec.main(["plot", *map(str, runs), "--out", str(png)])
    assert png.stat().st_size > 1000 and len(saved) == 1
    lines, dots = _ofa_drawn(saved[0])
    full = res["teacher"]["params"]
    want = {"ours: teacher": [(full, res["teacher"]["mAP"])],
            "ours: OFA": [(s["params"], s["mAP"]) for s in res["searched"].values()]}
    for b in res["baselines"]:
        want.setdefault("ours: " + {"scratch": "scratch", "KD": "KD", "KD, equal updates": "KD_equal"}[b["kind"]],
                        []).append((b["params"], b["mAP"]))
    for f in res["finetune"]:
        for kind, name in (("+10K", "OFA_+10K"), ("+100K", "OFA_+100K"), ("Init+100K", "Init_+100K")):
            want.setdefault(f"ours: {name}", []).append((f["params"], f[kind]))
    assert set(lines) == set(want) | set(OFA_PAPER_DRAWN)
    for label, pts in want.items():
        x, y = zip(*sorted(pts))
        np.testing.assert_allclose(lines[label], [[100 * n / full for n in x], [100 * m for m in y]], rtol=1e-12)
    for label, (m, v) in OFA_PAPER_DRAWN.items():
        np.testing.assert_allclose(lines[label], [[100 * n * 1e6 / 5_219_279 for n in m], v], rtol=1e-12)
    cands = [c for s in res["search"].values() for c in s["candidates"]]
    assert list(dots) == ["ours: every searched candidate"]
    np.testing.assert_allclose(dots["ours: every searched candidate"],
                               [[100 * c["params"] / full, 100 * c["eval"]] for c in cands], rtol=1e-12)


def test_ofa_end_to_end_save_reload_predict_resume(tiny_root, tmp_path, capsys, one_thread, monkeypatch):
    out = tmp_path / "run"
    argv = ["--data-root", str(tiny_root), "--out", str(out), "--workers", "0", "--batch-size", "4",
            "--unit-steps", "2", "--eval-every", "100", "--budgets", "0.8,1.8", "--population", "2",
            "--bn-recal-clips", "8", "--baselines", "--baseline-widths", "0.4", "--finetune"]
    res = ofa_aec.main(argv)
    (teacher,) = tmp_path.glob("teacher-*")  # the shared stage beside the run, named by its settings
    assert (teacher / "final.pt").exists() and np.load(teacher / "soft.npy").shape == (24, 30)
    assert res["supernet"]["step"] == 6 and res["supernet"]["passes"] == 2 + 4 * 4  # 2 largest + 4 x K=4
    assert [b["info"]["step"] for b in res["baselines"]] == [2, 2, 6]  # scratch, KD, KD with 3x updates
    for b, s in res["search"].items():
        assert s["evaluated"] == min(2, s["in_window"]) and all(
            s["window"][0] <= c["params"] <= s["window"][1] for c in s["candidates"])
    assert set(res["searched"]) == {"0.8", "1.8"} and len(res["finetune"]) == 2
    assert set(res["mAP"]) == {"teacher", "OFA_800k", "OFA_1800k", "scratch_r40", "KD_r40", "KD_equal_r40",
                               "OFA_800k_+10K", "OFA_800k_+100K", "Init_800k_+100K", "OFA_1800k_+10K",
                               "OFA_1800k_+100K", "Init_1800k_+100K"}
    assert res["n"]["eval"] == 24 and res["skipped"]["eval"] == 0
    # issue 20: every stage reports whether validation reached a plateau (one validation: too few to tell)
    for info in (res["teacher"]["info"], res["supernet"]):
        assert info["convergence"]["validations"] == 1 and info["convergence"]["plateau"] is False
    assert all("plateau" in json.loads(line) for line in (out / "supernet" / "log.jsonl").read_text().splitlines())
    md = (out / "results.md").read_text()
    assert "Validation plateau" in md
    # every trained row of Tables 1 and 2 says whether its own stage reached a plateau (one validation: NO)
    t1 = [line for line in md.split("## Table 1")[1].split("## Fig. 4")[0].splitlines() if line.startswith("| ")][1:]
    assert len(t1) == 1 + 3 + 2 and all(line.split(" | ")[5] in ("NO", "NO (supernet)") for line in t1)
    t2 = [line for line in md.split("## Table 2")[1].splitlines() if line.startswith("| ")][1:]
    assert len(t2) == 2 and all(line.split(" | ")[7] == "NO / NO" for line in t2)
    # save -> reload -> eval: the exported checkpoint alone rebuilds the sub-network; TorchScript agrees
    s = res["searched"]["0.8"]
    ck = C.load_checkpoint(s["checkpoint"])
    plain = ofa_aec.build_model(ck)
    assert sum(p.numel() for p in plain.parameters()) == s["params"] == ck["params"]
    corpus = C.load_corpus(str(tiny_root))
    wave = torch.from_numpy(np.stack([C.load_audio(tiny_root / fn) for fn, _ in corpus.eval]))
    ts = torch.jit.load(s["torchscript"])
    with torch.no_grad():
        p_ts, p_plain = ts(wave), ofa_aec.Tagger(ck["frontend"], plain.eval())(wave)
    assert torch.allclose(p_ts, p_plain, atol=1e-6)
    m = C.tagging_metrics(corpus.true_targets(corpus.eval), p_plain.numpy())["mAP"]
    assert m == pytest.approx(s["mAP"], abs=2e-3)  # features cached in float16 for the run
    capsys.readouterr()
    ofa_aec.main(["predict", "--ckpt", s["torchscript"], str(tiny_root / corpus.eval[0][0])])
    warning, line = capsys.readouterr().out.strip().splitlines()  # the synthetic corpus's classes: warned first
    assert warning == C.synthetic_classes_warning(corpus.labels.mids) and warning.startswith("warning: ")
    assert line.startswith(str(tiny_root)) and len(re.findall(r" [01]\.\d\d(?:,|$)", line)) == 5  # top 5 classes
    # plot: the figure of this run, every drawn value read back from the saved Axes against results.json
    _ofa_check_plot([out], res, tmp_path / "fig.png", monkeypatch)
    # a finished run is returned as it is; fewer rows (the flags that add rows) reuse every stage
    again = ofa_aec.main(argv)
    assert again == json.loads((out / "results.json").read_text()) and "finished with these" in capsys.readouterr().out
    logs = [(f, f.read_text()) for f in (teacher / "log.jsonl", out / "supernet" / "log.jsonl")]
    fewer = ofa_aec.main(argv[:-4])
    assert fewer["searched"]["0.8"]["mAP"] == s["mAP"] and fewer["baselines"] == []
    assert all(f.read_text() == text for f, text in logs)  # nothing trained again
    # its minutes are this invocation's, and results.md says so (it once read as the training's time)
    assert "min in this invocation (a stage found finished on disk is read back, not timed again)" in (
        out / "results.md").read_text()
    with pytest.raises(C.DataError, match=r"--lr 0.001 \(now 0.01\)"):  # other settings are refused, naming the flag
        ofa_aec.main(argv + ["--lr", "0.01"])
    with pytest.raises(C.DataError, match=r"--max-steps None \(now 1\)"):  # a cut-short run is another run
        ofa_aec.main(argv + ["--max-steps", "1"])
    assert "OFA 0.8M" in (out / "results.md").read_text()


def test_ofa_fig3_runs_the_four_search_spaces(tiny_root, tmp_path, one_thread, monkeypatch):
    out = tmp_path / "fig3"
    ofa_aec.main(["--data-root", str(tiny_root), "--out", str(out), "--workers", "0", "--batch-size", "4",
                  "--unit-steps", "1", "--eval-every", "100", "--budgets", "0.8", "--population", "1",
                  "--bn-recal-clips", "4", "--fig3"])
    res = json.loads((out / "results.json").read_text())
    assert list(res["spaces"]) == ["EW+ED=[2,2,X]", "EW+ED=[X,X,X]", "EW+ED=[2,X,X]", "EW-only"]
    assert [r[0] for r in res["rows"]] == list(res["spaces"]) and len(list(tmp_path.glob("teacher-*"))) == 1
    ew = json.loads((tmp_path / "fig3_222" / "config.json").read_text())["identity"]
    assert ew["widths"] == [0.2, 0.4, 0.6, 0.8, 1.0] and ew["elastic_depth"] == "2,2,2"
    # plot of a --fig3 folder: per space its best candidate per budget (line) and every candidate (dots)
    saved = _ofa_saved_axes(monkeypatch)
    ofa_aec.main(["plot", str(out), "--no-paper"])
    assert (out / "accuracy_params.png").exists()
    lines, dots = _ofa_drawn(saved[0])
    full = json.loads((tmp_path / "fig3_22X" / "results.json").read_text())["teacher"]["params"]
    assert set(lines) == {f"ours: {sp} best" for sp in res["spaces"]}
    assert set(dots) == {f"ours: {sp} candidates" for sp in res["spaces"]}
    for sp, search in res["spaces"].items():
        best = sorted((100 * s["best"]["params"] / full, 100 * s["best"]["eval"]) for s in search.values())
        np.testing.assert_allclose(lines[f"ours: {sp} best"], list(zip(*best)), rtol=1e-12)
        np.testing.assert_allclose(dots[f"ours: {sp} candidates"], [[100 * c["params"] / full, 100 * c["eval"]]
                                   for s in search.values() for c in s["candidates"]], rtol=1e-12)


def test_ofa_plot_of_a_seeds_table_draws_mean_and_std(tmp_path, monkeypatch):
    """`plot` of `python common.py seeds`'s folder: per row and model kind, the mean over seeds at the runs' mean
    size with a +- sample-std error bar; a folder of another kind is one line."""
    full, maps = 1000, {"OFA_800k": [0.40, 0.42, 0.47], "KD_r40": [0.30, 0.33, 0.31]}
    lo, hi = (0.6e6 * full / 5_219_279, 1.0e6 * full / 5_219_279)  # the 0.8 +- 0.2M window of a 1,000-param CNN10
    runs = []
    for i, size in enumerate((150, 160, 152)):
        run = tmp_path / f"s{i}"
        run.mkdir()
        best = {"params": size, "eval": maps["OFA_800k"][i], "val": 0.1, "arch": []}
        C.write_json(run / "results.json", {
            "teacher": {"params": full, "mAP": 0.5}, "searched": {"0.8": {"params": size, "mAP": maps["OFA_800k"][i]}},
            "baselines": [{"kind": "KD", "r": 0.4, "params": 200, "mAP": maps["KD_r40"][i]}], "finetune": [],
            "search": {"0.8": {"budget_M": 0.8, "window": [lo, hi], "candidates": [best], "best": best}},
            "mAP": {k: v[i] for k, v in maps.items()}})
        runs.append(str(run))
    C.seeds_table([["u100", *runs]], ["mAP.OFA_800k", "mAP.KD_r40"], tmp_path / "seeds",
                  [["mAP.OFA_800k", "mAP.KD_r40"]])  # a paired column is not a line
    saved = _ofa_saved_axes(monkeypatch)
    ofa_aec.main(["plot", str(tmp_path / "seeds"), "--out", str(tmp_path / "seeds.png"), "--no-paper"])
    lines, dots = _ofa_drawn(saved[0])
    assert set(lines) == {"ours: u100: OFA", "ours: u100: KD"} and dots == {}
    bars = [c.get_segments() for c in saved[0].collections]  # the error bars, in the order of the lines
    for (label, sizes, m), seg in zip((("ours: u100: OFA", (150, 160, 152), maps["OFA_800k"]),
                                        ("ours: u100: KD", (200, 200, 200), maps["KD_r40"])), bars):
        mean, std = 100 * np.mean(m), 100 * np.std(m, ddof=1)
        np.testing.assert_allclose(lines[label], [[100 * np.mean(sizes) / full], [mean]], rtol=1e-9)
        np.testing.assert_allclose(seg, [[[100 * np.mean(sizes) / full, mean - std],
                                          [100 * np.mean(sizes) / full, mean + std]]], rtol=1e-9)
    (tmp_path / "other").mkdir()
    C.write_json(tmp_path / "other" / "results.json", {"mAP": 0.5})  # another script's run
    with pytest.raises(C.DataError, match="not a results.json of ofa_aec.py"):
        ofa_aec.main(["plot", str(tmp_path / "other")])
    with pytest.raises(C.DataError, match="not found"):
        ofa_aec.main(["plot", str(tmp_path / "none")])


def _ofa_metrics(res):
    """results.json without what names a place or a duration (the paths of the run and the minutes)."""
    if isinstance(res, dict):
        return {k: _ofa_metrics(v) for k, v in res.items() if k not in ("minutes", "config", "checkpoint", "torchscript")}
    return [_ofa_metrics(v) for v in res] if isinstance(res, list) else res


def test_ofa_exact_resume_after_sigkill(tiny_root, tmp_path, one_thread):
    """One run SIGKILLed three times and run again with the same command each time: between the teacher and
    the supernet (the teacher is then read from disk), mid-epoch in the supernet (after its step-2 last.pt),
    inside a checkpoint write; its results.json is bit-identical to an uninterrupted run's, no temp file left."""
    ofa_aec.main(_ofa_argv(tiny_root, tmp_path / "ref" / "run"))  # in this process: the same numbers
    ref = _ofa_metrics(json.loads((tmp_path / "ref" / "run" / "results.json").read_text()))
    out = tmp_path / "killed" / "run"
    for kill in ("saved:3", "step:3", "write:1"):  # teacher: last.pt at steps 2, 4, final.pt; supernet: 3 steps
        r = run_cli("ofa_aec.py", *_ofa_argv(tiny_root, out), env={"KILL_AT": kill}, check=False)
        assert r.returncode in (-9, 137), f"{kill}: exit {r.returncode}\n{r.stdout[-3000:]}"
        assert kill != "write:1" or "supernet: resumed at step 2/3" in r.stdout, r.stdout[-3000:]
    run_cli("ofa_aec.py", *_ofa_argv(tiny_root, out))
    assert _ofa_metrics(json.loads((out / "results.json").read_text())) == ref
    assert leftovers(out.parent) == []


OFA_SPY = '''import os, time
_rank = os.environ.get("RANK")
if _rank is not None:  # a torchrun process: record every write and delete; rank 0 publishes shared files late
    _replace, _unlink = os.replace, os.unlink
    _log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank%s.txt" % _rank)

    def _note(what, path):  # the run's own folders (torch itself may delete a temp file elsewhere)
        if not os.path.abspath(str(path)).startswith(os.environ["SPY_ROOT"]):
            return
        with open(_log, "a") as f:
            f.write("%s %s\\n" % (what, path))

    def replace(src, dst, *a, **k):
        _note("replace", dst)
        if _rank == "0" and str(dst).endswith(("final.pt", "soft.npy", "logmel.npy", "M.pt")):
            time.sleep(0.5)  # a process that reads it without waiting at a barrier finds nothing
        return _replace(src, dst, *a, **k)

    def unlink(path, *a, **k):
        _note("unlink", path)
        return _unlink(path, *a, **k)
    os.replace, os.unlink = replace, unlink
'''


def test_ofa_ddp_torchrun_rank0_writes_after_barriers(tiny_root, tmp_path):
    """torchrun, 2 gloo processes, end to end: rank 1 writes and deletes nothing; rank 0's shared files
    (features, final.pt of each stage, soft labels, exports) are published late, so a missing barrier
    makes rank 1 read a file that is not there yet and the run fails; one set of outputs, one log line per
    validation."""
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(OFA_SPY)
    out = tmp_path / "ddp" / "run"
    run_cli("ofa_aec.py", *_ofa_argv(tiny_root, out), nproc=2,
            env={"PYTHONPATH": os.pathsep.join([str(spy), os.environ.get("PYTHONPATH", "")]),
                 "SPY_ROOT": str(tmp_path / "ddp")})
    assert not (spy / "rank1.txt").exists()
    written = (spy / "rank0.txt").read_text()
    assert "supernet/final.pt" in written and "soft.npy" in written and "results.json" in written
    res = json.loads((out / "results.json").read_text())
    assert res["supernet"]["step"] == 3 and set(res["searched"]) == {"0.8"}
    (teacher,) = (tmp_path / "ddp").glob("teacher-*")
    for log, steps in ((teacher / "log.jsonl", [2, 4]), (out / "supernet" / "log.jsonl", [2, 3])):
        assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == steps


def test_ofa_amp_bf16_on_cpu_keeps_float32_scores(tiny_root, tmp_path, one_thread):
    res = ofa_aec.main(_ofa_argv(tiny_root, tmp_path / "run", "--amp", "bf16", "--max-steps", "2"))
    (teacher,) = tmp_path.glob("teacher-*")
    assert np.load(teacher / "soft.npy").dtype == np.float32 and res["supernet"]["step"] == 3  # 1 + 2 steps
    assert all(isinstance(v, float) and 0 < v < 1 for v in res["mAP"].values())
    cands = json.loads((tmp_path / "run" / "search" / "candidates.json").read_text())
    assert all(isinstance(c["val"], float) for c in cands.values())


def test_ofa_feature_cache_follows_the_clips(tiny_root, tmp_path, one_thread):
    """The log-mel cache is keyed by every clip's size and modification time, not the folder's path: an
    eval clip replaced by silence is a new cache for the eval split (recomputed), the other splits are reused."""
    root = tmp_path / "corpus"
    shutil.copytree(tiny_root, root)
    args, corpus = ofa_aec.resolve(ofa_aec.parse_args(["--data-root", str(root), "--out", str(tmp_path / "r")]))
    before = ofa_aec.Data(corpus, args, torch.device("cpu"))
    fn = root / corpus.eval[0][0]
    info = sf.info(str(fn))
    sf.write(str(fn), np.zeros(info.frames, np.float32), info.samplerate, subtype=info.subtype)
    after = ofa_aec.Data(corpus, args, torch.device("cpu"))
    assert after.ident["eval"] != before.ident["eval"] and after.ident["train"] == before.ident["train"]
    assert not np.array_equal(after.x["eval"][0], before.x["eval"][0])
    np.testing.assert_array_equal(after.x["eval"][1:], before.x["eval"][1:])
    assert len(list(tmp_path.glob("features-*"))) == 4  # train, valid, eval before; eval after


def test_ofa_no_resume_removes_only_its_own_files_and_a_second_run_is_refused(tiny_root, tmp_path, one_thread):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's")
    (out / "sub" / "data.csv").write_text("the user's")
    argv = _ofa_argv(tiny_root, out, "--max-steps", "1")
    ofa_aec.main(argv)
    assert (out / "supernet" / "final.pt").exists() and (out / "export" / "budget_0.8M.ts").exists()
    with C.RunLock(out):  # a second run on the folder is one line, not a crash
        with pytest.raises(C.DataError, match="in use by another run"):
            ofa_aec.main(argv)
    ofa_aec.main(argv + ["--no-resume"])
    assert (out / "notes.txt").read_text() == "the user's" and (out / "sub" / "data.csv").read_text() == "the user's"
    assert (out / "results.json").exists()


@pytest.mark.parametrize("argv", [
    ["--unit-steps", "0"], ["--unit-steps", "-3"], ["--batch-size", "0"], ["--batch-size", "nan"], ["--lr", "0"],
    ["--lr", "nan"], ["--lr", "inf"], ["--budgets", "0.8,abc"], ["--budgets", "-1"], ["--budgets", "nan"],
    ["--widths", "0.4,1.5"], ["--widths", "0"], ["--tolerance", "-0.1"], ["--population", "0"],
    ["--bn-recal-clips", "0"], ["--subnets-per-step", "0"], ["--eval-every", "0"], ["--mixup-alpha", "0"],
    ["--width-mult", "0"], ["--time-mask", "-1"], ["--freq-mask", "nan"], ["--n-masks", "-1"],
    ["--baseline-widths", "2"], ["--max-steps", "0"], ["--threads", "-1"], ["--teacher-seed", "-1"],
    ["counts", "--classes", "0"],
    ["counts", "--width-mult", "nan"], ["predict", "--ckpt", "x.pt", "--top", "0", "a.wav"]])
def test_ofa_bad_flags_are_one_line_usage_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ofa_aec.main(argv + ([] if argv[0] in ("counts", "predict") else ["--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err.strip().splitlines()
    flag = next(a for a in argv if a.startswith("--") and a != "--ckpt")
    assert e.value.code == 2 and ": error: " in err[-1] and flag in err[-1]  # names the flag
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


def _ofa_bad_case(case: str, root: Path, tmp: Path) -> tuple[list, str]:
    """A bad input of one kind: (argv, the message it must give)."""
    base = ["--data-root", str(root), "--workers", "0", "--out", str(tmp / "run")]
    if case in ("foreign_teacher", "bytes_teacher", "other_classes", "missing_teacher"):
        ck = tmp / "ck.pt"
        if case == "foreign_teacher":  # a psl.py / psla.py checkpoint
            torch.save({"model": {}, "config": {"arch": "mobilenetv2"}, "args": {}}, ck)
        elif case == "bytes_teacher":
            ck.write_bytes(os.urandom(300))
        elif case == "other_classes":
            m = ofa_aec.CNN10(10, blocks=((8, 8), (16, 16), (32, 32), (64, 64)), fc=64)
            torch.save({"script": "ofa_aec", "model": m.state_dict(), "config": m.config, "frontend": "panns16k"}, ck)
        msg = {"foreign_teacher": "not a CNN10 checkpoint of ofa_aec.py", "bytes_teacher": "not a PyTorch checkpoint",
               "other_classes": "10 classes", "missing_teacher": "checkpoint not found"}[case]
        return base + ["--teacher", str(ck)], msg
    if case in ("out_file", "out_under_file"):
        (tmp / "file.txt").write_text("mine")
        out = tmp / "file.txt" if case == "out_file" else tmp / "file.txt" / "sub"
        return base[:-1] + [str(out)], "is not a folder" if case == "out_file" else "cannot write the run folder"
    if case == "other_script_run":
        (tmp / "run").mkdir()
        (tmp / "run" / "config.json").write_text(json.dumps({"script": "psl", "identity": {}}))
        return base, "a run folder of psl.py"
    if case == "user_results":
        (tmp / "run").mkdir()
        (tmp / "run" / "results.json").write_text("{}")
        return base, "not written by ofa_aec.py"
    if case == "zero_channels":
        return base + ["--width-mult", "0.01"], "a block of 0 channels"
    if case == "negative_seed":
        return base + ["--seed", "-1"], "--seed -1: expected a non-negative integer"
    if case == "foreign_predict":
        torch.save({"model": {}}, tmp / "ck.pt")
        return ["predict", "--ckpt", str(tmp / "ck.pt"), "a.wav"], "not a CNN10 checkpoint"
    wav = str(root / "audio" / "eval" / "eval_00000.wav")
    if case == "wav_as_ckpt":  # the arguments swapped: the wav is named, not a .pt beside it
        return ["predict", "--ckpt", wav, wav], f"{wav}: not a PyTorch checkpoint"
    if case == "bytes_predict":
        (tmp / "ck.pt").write_bytes(os.urandom(300))
        return ["predict", "--ckpt", str(tmp / "ck.pt"), wav], "ck.pt: not a PyTorch checkpoint"
    if case in ("other_script_predict", "weights_not_config", "broken_ts"):
        m = ofa_aec.CNN10(30, blocks=((8, 8), (16, 16), (32, 32), (64, 64)), fc=64)
        ck = {"script": "ofa_aec", "model": m.state_dict(), "config": m.config, "frontend": "panns16k",
              "labels": {"mids": [f"/synth/{i}" for i in range(30)], "names": [str(i) for i in range(30)]}}
        if case == "other_script_predict":
            ck["script"] = "psla"
        if case == "weights_not_config":  # a CNN10 config with weights of another size
            ck["config"] = {**m.config, "fc": 32}
        torch.save(ck, tmp / "ck.pt")
        (tmp / "ck.ts").write_bytes(b"not torchscript")
        msg = {"other_script_predict": "a checkpoint of psla, not of ofa_aec", "broken_ts": "not a TorchScript file",
               "weights_not_config": "not a checkpoint of this model"}[case]
        return ["predict", "--ckpt", str(tmp / ("ck.ts" if case == "broken_ts" else "ck.pt")), wav], msg
    bad = tmp / "corpus"  # malformed metadata: the corpus's files, audio linked
    bad.mkdir()
    for f in root.iterdir():
        (bad / f.name).symlink_to(f) if f.is_dir() else shutil.copy(f, bad / f.name)
    if case == "manifest_row":
        with open(bad / "balanced_train.tsv", "a") as f:
            f.write("no-tab-here\n")
        return base[:1] + [str(bad)] + base[2:], "balanced_train.tsv:"
    if case == "synth_json":
        (bad / "synth.json").write_text('{"clip_seconds": 4')
        return base[:1] + [str(bad)] + base[2:], "synth.json: not a valid JSON"
    raise ValueError(case)


@pytest.mark.parametrize("case", ["foreign_teacher", "bytes_teacher", "other_classes", "missing_teacher", "out_file",
                                  "out_under_file", "other_script_run", "user_results", "zero_channels",
                                  "negative_seed", "foreign_predict", "wav_as_ckpt", "bytes_predict",
                                  "other_script_predict", "weights_not_config", "broken_ts", "manifest_row",
                                  "synth_json"])
def test_ofa_bad_inputs_are_one_line_and_delete_nothing(case, tiny_root, tmp_path):
    argv, msg = _ofa_bad_case(case, tiny_root, tmp_path)
    before = sorted((p, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    with pytest.raises(C.DataError, match=re.escape(msg)):  # the __main__ guard prints it as one line
        ofa_aec.main(argv)
    after = sorted((p, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock")
    assert after == before  # nothing deleted or written (beyond the lock file of a folder it checked)


def test_ofa_bad_input_from_the_command_line_is_one_line(tiny_root, tmp_path):
    argv, msg = _ofa_bad_case("foreign_teacher", tiny_root, tmp_path)
    r = run_cli("ofa_aec.py", *argv, check=False, timeout=120)
    assert r.returncode == 1 and r.stdout.strip().splitlines()[-1].startswith("error: --teacher ") and \
        msg in r.stdout and "Traceback" not in r.stdout, r.stdout[-2000:]


# =============================================================================================
# conformer_ssl.py: encoder sizes, span masking, distractors, the contrastive loss, pooling, LR
# schedules, augmentation, and end-to-end pre-train -> fine-tune -> save -> reload runs
# =============================================================================================
import argparse  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import conformer_ssl  # noqa: E402


def _ssl_argv(root, out, *extra):
    return ["--data-root", str(root), "--out", str(out), "--workers", "0", "--pt-steps", "3", "--ft-steps", "2",
            "--pt-batch-size", "2", "--pt-seconds", "2", "--batch-size", "4", "--log-every", "1", *extra]


@pytest.mark.parametrize("size,paper,exact", [("S", 18.4e6, 18_428_416), ("L", 88.1e6, 88_133_120)])
def test_ssl_param_counts_match_the_paper(size, paper, exact):
    """Per block 7d^2 + 4df + dk + 2f + 22d; without the final linear the torchaudio layout is exact."""
    cfg = conformer_ssl.SIZES[size]
    with torch.device("meta"):
        counts = {fp: conformer_ssl.count_params(conformer_ssl.PretrainModel(**cfg, final_proj=fp)) for fp in (0, 1)}
        block = conformer_ssl.ConformerBlock(cfg["dim"], cfg["ffn"], cfg["heads"], 15, 0.1)
    d, f = cfg["dim"], cfg["ffn"]
    assert conformer_ssl.count_params(block) == 7 * d * d + 4 * d * f + d * 15 + 2 * f + 22 * d
    assert counts[0] == exact
    assert abs(counts[1] - paper) / paper < 0.01 and counts[1] == exact + d * d + d


def test_ssl_param_counts_of_fig2b_depths():
    """cf_L with 8 and 20 blocks: the paper's 58.9 M and 146.6 M (Sec. 5.1.2)."""
    with torch.device("meta"):
        n = [conformer_ssl.count_params(conformer_ssl.PretrainModel(blocks=b, dim=768, heads=12, ffn=1024,
                                                                    final_proj=False)) for b in (8, 20)]
    assert n == [58_913_280, 146_572_800]


def test_ssl_help(capsys):
    with pytest.raises(SystemExit) as e:
        conformer_ssl.main(["--help"])
    assert e.value.code == 0 and "--temperature" in capsys.readouterr().out


def test_ssl_mask_sampler_fraction_and_spans():
    rng = np.random.default_rng(0)
    p, L = 0.3, 3
    m = conformer_ssl.compute_mask_indices((64, 2000), p, L, rng)
    assert abs(m.mean() - (1 - (1 - p / L) ** L)) < 0.005  # 27.1 %, not 30 %
    assert not m[:, -1].any()  # starts are drawn from [0, T - L)
    sparse = conformer_ssl.compute_mask_indices((64, 2000), 0.03, L, rng)
    for mask in (m, sparse):
        edges = np.diff(np.pad(mask.astype(int), ((0, 0), (1, 1))), axis=1)
        runs = np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)
        assert runs.min() >= L  # every masked run is one span of L or overlapping spans
    edges = np.diff(np.pad(sparse.astype(int), ((0, 0), (1, 1))), axis=1)
    runs = np.flatnonzero(edges.ravel() == -1) - np.flatnonzero(edges.ravel() == 1)
    assert (runs == L).mean() > 0.9  # sparse masks: almost all runs are single spans of exactly L
    short = conformer_ssl.compute_mask_indices((100, 10), p, L, rng)  # min_masks = 2 spans even on short clips
    assert (short.sum(1) >= L).all()


def test_ssl_distractors_only_other_masked_steps_of_the_same_clip():
    counts = torch.tensor([5, 1, 2, 40])
    neg = conformer_ssl.sample_negatives(counts, 100, torch.Generator().manual_seed(0))
    offsets = np.cumsum([0, 5, 1, 2])
    assert neg.shape == (48, 100)
    for b, (o, m) in enumerate(zip(offsets, counts.tolist())):
        for j in range(m):
            row = neg[o + j].numpy()
            if m == 1:
                assert (row == o).all()  # no other step: the caller drops this row
                continue
            assert ((row >= o) & (row < o + m)).all() and (row != o + j).all()
            if m <= 5:
                assert set(row) == set(range(o, o + m)) - {o + j}  # uniform: all others drawn (100 draws)


def test_ssl_contrastive_loss_known_answer():
    """Two masked steps: each one's only distractor (drawn K = 3 times) is the other step."""
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # targets (1, 2, 2)
    c = torch.tensor([[[2.0, 0.0], [0.5, 1.0]]])  # context: cos = (1, 0) and (0.447, 0.894)
    mask = torch.ones(1, 2, dtype=torch.bool)
    a, b = 1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)
    for temp in (0.1, 1.0):
        loss, acc, n = conformer_ssl.contrastive_loss(c, y, mask, 3, temp)
        l0 = -math.log(math.exp(1 / temp) / (math.exp(1 / temp) + 3))
        l1 = -math.log(math.exp(a / temp) / (math.exp(a / temp) + 3 * math.exp(b / temp)))
        assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-5) and acc.item() == 1.0 and n == 2
    y2 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # a distractor equal to the positive gets -inf
    loss, _, _ = conformer_ssl.contrastive_loss(c, y2, mask, 3, 0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_ssl_linear_softmax_pooling_and_symmetric_kl_by_hand():
    p = torch.tensor([[[0.2, 0.0], [0.8, 0.0], [0.5, 1.0]]])  # (B=1, T=3, K=2)
    clip = conformer_ssl.linear_softmax_pool(p)
    assert clip[0, 0].item() == pytest.approx((0.04 + 0.64 + 0.25) / 1.5, rel=1e-6)
    assert clip[0, 1].item() == pytest.approx(1.0, abs=1e-6)  # clamped zeros do not dilute the one frame
    kl = lambda a, b: a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    got = conformer_ssl.symmetric_kl(torch.tensor([[0.5, 0.9]]), torch.tensor([[0.25, 0.9]]), multi=True)
    assert got.item() == pytest.approx((kl(0.5, 0.25) + kl(0.25, 0.5)) / 2, rel=1e-5)  # mean over classes
    got = conformer_ssl.symmetric_kl(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]]), multi=False)
    ref = sum(a * math.log(a / b) + b * math.log(b / a) for a, b in ((0.5, 0.25), (0.5, 0.75)))
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_ssl_learning_rate_schedules_by_hand():
    tri = lambda s: conformer_ssl.tri_stage_lr(s, 100, 2.0, (0.3, 0.3, 0.4), 0.01, 0.01)
    assert tri(0) == pytest.approx(0.02) and tri(15) == pytest.approx(2 * (0.01 + 0.99 * 0.5))
    assert tri(30) == tri(59) == 2.0
    assert tri(60) == pytest.approx(2.0) and tri(80) == pytest.approx(0.2) and tri(100) == pytest.approx(0.02)
    assert tri(150) == pytest.approx(0.02)
    pt = lambda s: conformer_ssl.pretrain_lr(s, 300, 10 / 300, 3e-4)  # warm-up 10 of 300 (10k of 300k)
    assert pt(0) == pytest.approx(3e-5) and pt(9) == pytest.approx(3e-4) and pt(10) == pytest.approx(3e-4)
    assert pt(155) == pytest.approx(1.5e-4) and pt(300) == 0.0


def test_ssl_augment_one_time_mask_and_mixup_weight(one_thread):
    torch.manual_seed(0)
    model = conformer_ssl.Classifier(3, "linsoft", **conformer_ssl.SIZES["cpu"])
    wave = torch.randn(8, 4 * C.SR)
    a = SimpleNamespace(jitter=0, time_mask=0.2, mixup_alpha=0.0)
    mel, aug = model.encoder.frontend(wave), conformer_ssl.augment(model, wave, a)
    changed = (mel != aug).any(1)  # (B, T) frames touched
    for row, m, x in zip(changed, mel, aug):
        idx = torch.nonzero(row).flatten()
        if len(idx):
            assert idx[-1] - idx[0] + 1 == len(idx) <= 0.2 * mel.shape[-1] + 1  # one contiguous mask <= 20 %
            assert torch.allclose(x[:, idx], m.mean().expand(64, len(idx)))  # filled with the clip mean
    same = torch.randn(1, 4 * C.SR).repeat(4, 1)  # mix-up of identical clips is the identity
    out = conformer_ssl.augment(model, same, SimpleNamespace(jitter=0, time_mask=0.0, mixup_alpha=0.5))
    assert torch.allclose(out, model.encoder.frontend(same), atol=1e-5)
    two = torch.stack([torch.zeros(4 * C.SR) + 1e-3, torch.randn(4 * C.SR)])  # the first clip keeps >= half
    m2 = model.encoder.frontend(two)
    for _ in range(5):
        out = conformer_ssl.augment(model, two, SimpleNamespace(jitter=0, time_mask=0.0, mixup_alpha=0.5))
        lam = ((out[0] - m2[1]) / (m2[0] - m2[1])).median()
        assert lam >= 0.5 - 1e-4 or torch.allclose(out[0], m2[0])


def test_ssl_end_to_end_save_reload_reuse(tiny_root, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    res = conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1"))
    assert res == json.loads((out / "results.json").read_text()) and res["size"] == "cpu"
    (row,) = res["rows"]
    assert row["fraction"] == 1.0 and row["n_test"] == 24 and row["skipped_test"] == row["skipped_train"] == 0
    scores = row["scores"]["scratch"] + row["scores"]["pretrained"]
    assert len(scores) == 2 and all(0 < s <= 1 for s in scores)
    assert res["pretrain"]["pretrained"]["steps"] == 3 and 0.15 < res["pretrain"]["pretrained"]["masked_share"] < 0.45
    md = (out / "results.md").read_text()
    assert "0.415" in md and "accuracy of the positive" in md
    (pt,) = tmp_path.glob("pretrain-*/pretrain.pt")  # the stage beside the run folder, named by its settings
    ck = C.load_checkpoint(pt)
    assert [r["step"] for r in ck["curve"]] == [1, 2, 3] and all(np.isfinite(r["train/loss"]) for r in ck["curve"])
    assert (out / "table1.png").stat().st_size > 1000  # the run's figure (conformer_ssl.py plot draws it again)
    wav = str(next(tiny_root.glob("audio/eval/*.wav")))  # the pre-trained encoder's embedding of a user's wav
    assert conformer_ssl.main(["embed", "--ckpt", str(pt), "--out", str(tmp_path / "emb"), wav])["dim"] == 64
    assert np.load(tmp_path / "emb" / f"{Path(wav).stem}.npy").shape == (64,)
    # reload a fine-tuned model from its checkpoint alone: the same test score
    (final,) = tmp_path.glob("finetune/corpus_f1_pretrained_s0-*/final.pt")
    model = conformer_ssl.build_classifier(C.load_checkpoint(final))
    args = conformer_ssl.resolve(conformer_ssl.parse_args(_ssl_argv(tiny_root, out)), True, 4.0)
    data = conformer_ssl.corpus_data(args, C.load_corpus(str(tiny_root), "full"), 1.0)
    test = conformer_ssl.score(data, conformer_ssl.predict(model, data, args, torch.device("cpu")))
    assert test["score"] == row["scores"]["pretrained"][0] and test["n"] == 24
    # a finished run is returned as it is; other settings in its folder are refused naming the flag
    logs = {p: p.read_text() for p in tmp_path.rglob("log.jsonl")}
    capsys.readouterr()
    assert conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1")) == res
    assert "pre-training: " not in capsys.readouterr().out  # the stage's line ("pre-training data:" is the plan)
    assert logs == {p: p.read_text() for p in tmp_path.rglob("log.jsonl")}  # no stage ran again
    with pytest.raises(C.DataError, match="--ft-lr 0.001 \\(now 0.1\\)"):
        conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1", "--ft-lr", "0.1"))
    # --no-resume starts the run folder afresh: only this script's files go, the shared stages are reused
    (out / "notes.txt").write_text("mine")
    again = conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1", "--no-resume"))
    assert again["rows"] == res["rows"] and again["pretrain"] == res["pretrain"]
    assert (out / "notes.txt").read_text() == "mine" and len(list(tmp_path.glob("pretrain-*"))) == 1


def test_ssl_killed_anywhere_resumes_bit_identical(tiny_root, tmp_path, one_thread):
    """Exact resume: SIGKILLed mid pre-training (resumes at the stream offset with the same masks), while
    writing a fine-tuning checkpoint (RNG states restored) and right after pretrain.pt (between the
    stages), then run again with the same command: the scores, the pre-training curve and every
    fine-tuning curve equal an uninterrupted run's bit for bit, and no temp file is left."""
    argv = lambda root: _ssl_argv(tiny_root, root / "run", "--fractions", "1", "--pt-lr", "0.01", "--ft-lr", "0.01",
                                  "--init-scale", "1", "--final-scale", "1")

    def facts(root: Path):
        res = json.loads((root / "run" / "results.json").read_text())
        cells = {p.parent.name.rsplit("-", 1)[0]: C.read_json(p)["curve"] for p in root.glob("finetune/*/result.json")}
        return res["rows"], res["pretrain"]["pretrained"]["first"], res["pretrain"]["pretrained"]["last"], cells
    conformer_ssl.main(argv(tmp_path / "ref"))  # uninterrupted, in this process (one thread, as the subprocesses)
    ref = facts(tmp_path / "ref")
    assert len(ref[3]) == 2 and all(len(c) == 2 for c in ref[3].values())
    # log_every 1: writes 1-3 are pre-training's last.pt, 4 pretrain.pt, 5-6 the scratch cell's last.pt
    for kill in ("step:2", "write:6", "saved:4"):
        root = tmp_path / kill.replace(":", "_")
        killed_then_resumed("conformer_ssl.py", argv(root), kill)
        assert facts(root) == ref, kill
        assert leftovers(root) == []
        lines = [json.loads(l) for l in next(root.glob("pretrain-*/log.jsonl")).read_text().splitlines()]
        assert [r["step"] for r in lines] == [1, 2, 3, 3], kill  # each log line once, the plateau line last
        assert "plateau/train/acc" in lines[-1] and not any("plateau/train/acc" in r for r in lines[:-1]), kill


SSL_SPY = '''"""Test spy, loaded by every process of the torchrun test: records each rank's file writes and deletes;
rank 0 publishes pretrain.pt late, so a rank that reads it without waiting at the barrier finds nothing."""
import builtins, io, os, time
if os.environ.get("RANK") is not None:
    _rank, _open, _replace, _unlink = os.environ["RANK"], builtins.open, os.replace, os.unlink

    def _note(what, path):
        with _open(os.path.join(os.environ["SPY_DIR"], f"rank{_rank}.txt"), "a") as f:
            f.write(f"{what} {path}\\n")

    def _open_spy(file, mode="r", *a, **k):
        if any(m in mode for m in "wax+"):
            _note("open", file)
        return _open(file, mode, *a, **k)

    def _replace_spy(src, dst, *a, **k):
        if _rank == "0" and str(dst).endswith("pretrain.pt"):
            time.sleep(3)
        _note("replace", dst)
        return _replace(src, dst, *a, **k)

    def _unlink_spy(path, *a, **k):
        _note("unlink", path)
        return _unlink(path, *a, **k)
    builtins.open = io.open = _open_spy
    os.replace, os.unlink = _replace_spy, _unlink_spy
'''


def test_ssl_torchrun_two_processes_rank0_writes_after_barriers(tiny_root, tmp_path):
    """DDP: pre-train -> fine-tune -> table under torchrun with 2 gloo processes. Rank 1 writes and deletes
    nothing; rank 0 publishes pretrain.pt 3 s late and rank 1 still reads the complete file (the barrier
    after pretrain.pt: without it rank 1 fails to read it); one set of outputs, each log line once."""
    spy = tmp_path / "spy"
    spy.mkdir()
    (spy / "sitecustomize.py").write_text(SSL_SPY)
    out = tmp_path / "ddp" / "run"
    run_cli("conformer_ssl.py", *_ssl_argv(tiny_root, out, "--fractions", "1"), nproc=2,
            env={"PYTHONPATH": str(spy), "SPY_DIR": str(spy)})
    assert not (spy / "rank1.txt").exists()  # rank 1 never wrote, published or deleted a file
    written = (spy / "rank0.txt").read_text()
    assert "pretrain.pt" in written and "results.json" in written and "result.json" in written
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"][0]["scores"]["pretrained"]) == 1 and res["pretrain"]["pretrained"]["steps"] == 3
    (stage,) = (tmp_path / "ddp").glob("pretrain-*")
    assert C.read_json(stage / "stage.json")["world"] == 2
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "ddp" / "finetune").iterdir()) == \
        ["corpus_f1_pretrained_s0", "corpus_f1_scratch_s0"]
    assert [json.loads(l)["step"] for l in (stage / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 3]  # + plateau
    assert leftovers(tmp_path / "ddp") == [] and not list((tmp_path / "ddp").rglob("last.pt"))


def test_ssl_ranks_draw_disjoint_shards_of_every_update(monkeypatch):
    """The stream's global order holds every process's clips of one update in turn; each rank's shard of
    what is left after a resume is disjoint from the other's, and together they are the update's clips."""
    args = conformer_ssl.resolve(conformer_ssl.parse_args(["--pt-steps", "4", "--pt-batch-size", "3"]), True)
    monkeypatch.setattr(C, "world_size", lambda: 2)
    _, order = conformer_ssl.unlabelled_data(args, None)
    assert len(order) == 4 * 3 * 2 and len(set(order)) == 24  # the unbounded stream: never a clip twice
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(C, "rank", lambda r=r: r)
        shares.append(C.shard(order[6:]))  # resumed after update 1: offset 6 clips
    for step in range(3):
        a, b = (set(s[3 * step: 3 * step + 3]) for s in shares)
        assert not a & b and a | b == set(order[6 + 6 * step: 12 + 6 * step])
    _, pool = conformer_ssl.unlabelled_data(args, 5)  # a finite pool (Fig. 2a): clip j % 5
    assert pool.tolist() == [j % 5 for j in range(24)]


def test_ssl_bf16_on_cpu_and_float32_scores(tiny_root, tmp_path, one_thread):
    """AMP: both stages' steps under --amp bf16 on CPU; the saved scores are float32."""
    out = tmp_path / "bf16"
    res = conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1", "--amp", "bf16", "--pt-steps", "2"))
    assert all(0 < s <= 1 for s in res["rows"][0]["scores"]["pretrained"] + res["rows"][0]["scores"]["scratch"])
    assert np.isfinite(res["pretrain"]["pretrained"]["last"]["train/loss"])
    (final,) = tmp_path.glob("finetune/corpus_f1_pretrained_s0-*/final.pt")
    args = conformer_ssl.resolve(conformer_ssl.parse_args(_ssl_argv(tiny_root, out, "--amp", "bf16")), True, 4.0)
    data = conformer_ssl.corpus_data(args, C.load_corpus(str(tiny_root), "full"), 1.0)
    probs = conformer_ssl.predict(conformer_ssl.build_classifier(C.load_checkpoint(final)), data, args,
                                  torch.device("cpu"))
    assert probs.dtype == np.float32
    assert conformer_ssl.score(data, probs)["score"] == res["rows"][0]["scores"]["pretrained"][0]


def test_ssl_bench_step_runs_both_steps(one_thread):
    b = conformer_ssl.bench_step(torch.device("cpu"), "none", batch_size=2)
    for k in ("step", "bare", "pretrain"):
        b[k]()
    assert b["clips"] == 2


def test_ssl_step_functions_do_not_sync_with_the_host():
    """GPU-ready step: no .item(), .cpu(), float(tensor), .numpy() or .tolist() in the per-step path."""
    import inspect
    sync = re.compile(r"\.item\(|\.cpu\(|(?<![.\w])float\((?![\"'])|\.numpy\(|\.tolist\(")
    assert sync.search("loss.item()") and sync.search("float(x)") and not sync.search("x.float() + float('inf')")
    fns = (conformer_ssl.train_loop, conformer_ssl.train_step, conformer_ssl.pretrain_step, conformer_ssl.augment,
           conformer_ssl.contrastive_loss, conformer_ssl.sample_negatives, conformer_ssl.task_loss,
           conformer_ssl.symmetric_kl, conformer_ssl.to_probs, C.optimizer_step, C.Mean.add, C.to_device)
    for fn in fns:
        assert not sync.search(inspect.getsource(fn)), fn.__name__


@pytest.mark.parametrize("argv", [
    ["--pt-steps", "0"], ["--pt-steps", "-3"], ["--ft-steps", "0"], ["--batch-size", "0"], ["--pt-batch-size", "0"],
    ["--pt-lr", "0"], ["--pt-lr", "nan"], ["--ft-lr", "-1"], ["--fractions", "1.5"], ["--fractions", "0"],
    ["--mask-prob", "1.5"], ["--temperature", "0"], ["--dropout", "1"], ["--num-negatives", "0"], ["--pools", "0"],
    ["--phase-ratio", "0.5", "0.5", "0.5"], ["--kernels", "4", "15"], ["--log-every", "0"], ["--pool-size", "0"],
    ["--pt-seconds", "nan"], ["--time-mask", "2"], ["--mixup-alpha", "-1"], ["--folds", "0"], ["--pt-warmup", "2"],
    ["--seeds", "-1"], ["--seed", "-1"], ["--task", "x", "--table", "1"], ["--fig", "2a", "--pretrain", "none"]])
def test_ssl_bad_flags_are_one_line_usage_errors(argv, tmp_path, capsys):
    """Bad input: every numeric flag is range-checked at parse time: exit 2, one line naming it, nothing written."""
    with pytest.raises(SystemExit) as e:
        conformer_ssl.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and ": error: argument " in err[-1] and argv[0] in err[-1], err
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


def _ssl_bad_inputs(tiny_root: Path, tmp: Path) -> list:
    """(argv, expected message) cases of bad files and folders (made here)."""
    torch.save({"model": {}, "state": {}}, tmp / "psl_final.pt")  # another script's checkpoint
    (tmp / "bytes.pt").write_bytes(os.urandom(300))
    cfg = conformer_ssl.model_config(conformer_ssl.resolve(conformer_ssl.parse_args(["--size", "S"]), True))
    torch.save({"script": "conformer_ssl", "encoder": {}, "config": cfg}, tmp / "pretrain_S.pt")
    (tmp / "a_file").write_text("mine")
    (tmp / "psl_run").mkdir()
    (tmp / "psl_run" / "config.json").write_text(json.dumps({"script": "psl", "identity": {}}))
    (tmp / "user_dir").mkdir()
    (tmp / "user_dir" / "results.json").write_text("mine")
    (tmp / "bad.tsv").write_text("filename\tlabels\nclip.wav no-tab-here\n")
    bad_root = tmp / "bad_root"
    bad_root.mkdir()
    for p in tiny_root.glob("*.*"):
        shutil.copy(p, bad_root / p.name)
    (bad_root / "balanced_train.tsv").write_text("filename\tlabels\nx.wav\t/m/unknown\n")
    ok = ["--data-root", str(tiny_root), "--out", str(tmp / "o")]
    return [(ok + ["--pretrained", str(tmp / "psl_final.pt")], "not a pre-trained encoder of conformer_ssl.py"),
            (ok + ["--pretrained", str(tmp / "bytes.pt")], "not readable as a checkpoint"),
            (ok + ["--pretrained", str(tmp / "missing.pt")], "not readable as a checkpoint"),
            (ok + ["--pretrained", str(tmp / "pretrain_S.pt")], "this run's flags"),
            (ok + ["--pretrain", str(tmp / "missing.tsv")], "manifest not found"),
            (ok + ["--pretrain", str(tmp / "bad.tsv")], "bad.tsv:2: expected"),
            (["--data-root", str(tmp / "nowhere"), "--out", str(tmp / "o")], "data root not found"),
            (["--data-root", str(bad_root), "--out", str(tmp / "o")], "row 1 (x.wav): unknown label id"),
            (["--task", "nope", "--task-root", str(bad_root), "--out", str(tmp / "o")], "tasks.json: task list not found"),
            (ok[:2] + ["--out", str(tmp / "a_file")], "exists and is not a folder"),
            (ok[:2] + ["--out", str(tmp / "a_file" / "sub")], "cannot write the run folder"),
            (ok[:2] + ["--out", "/proc/conformer_ssl_run"], "cannot write the run folder"),
            (ok[:2] + ["--out", str(tmp / "psl_run")], "a run folder of psl.py"),
            (ok[:2] + ["--out", str(tmp / "user_dir"), "--no-resume"], "holds results.json, not written by")]


def test_ssl_bad_inputs_are_one_line_errors_and_touch_no_user_file(tiny_root, tmp_path):
    """Bad input: foreign or broken checkpoints, missing / malformed metadata, --out a file, under a file,
    unwritable, another script's run or a user's folder: one line naming it, before any work; no file of
    the user's is changed or removed, no run or stage folder is made."""
    cases = _ssl_bad_inputs(tiny_root, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for argv, match in cases:
        with pytest.raises(C.DataError, match=re.escape(match)) as e:
            conformer_ssl.main(argv + ["--workers", "0", "--pt-steps", "1", "--ft-steps", "1"])
        assert "\n" not in str(e.value), argv
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("pretrain-*"))


def test_ssl_second_run_on_the_same_folder_is_refused(tiny_root, tmp_path):
    """Two runs on one folder: the second is refused with one line (the run folder's lock), writing nothing."""
    out = tmp_path / "locked"
    with C.RunLock(out):
        with pytest.raises(C.DataError, match="in use by another run"):
            conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1"))
    assert [p.name for p in out.iterdir()] == [".lock"] and not list(tmp_path.glob("pretrain-*"))


def test_ssl_downstream_task_through_the_task_reader(tiny_tasks, tmp_path, one_thread):
    """Table 3 style: a single-label k-fold task, mean pooling + linear, one fold, both inits."""
    out = tmp_path / "task"
    res = conformer_ssl.main(_ssl_argv(tiny_tasks, out, "--task", "sound_novel", "--task-root", str(tiny_tasks),
                                       "--folds", "1")[2:])
    assert res["task"] == "sound_novel" and res["metric"] == "accuracy" and len(res["rows"]) == 1
    scores = res["rows"][0]["scores"]
    assert all(0 <= s <= 1 for s in scores["scratch"] + scores["pretrained"]) and res["size"] == "cpu"
    ck = C.load_checkpoint(next(tmp_path.glob("finetune/sound_novel_*_pretrained_s0-*/final.pt")))
    assert ck["pooling"] == "mean" and ck["multi"] is False


# ---- issue 20: conformer_ssl on a user's own data (bug 2, presets, plateau lines, faithful recipe, scale) ----
def _ssl_real_corpus(root: Path) -> Path:
    """A tiny real-layout corpus written here (not by the synthetic generator): 3 classes of its own ids,
    1 s tones / noise at 16 kHz, balanced 6 + unbalanced 6 + eval 6 clips, no synth.json."""
    (root / "audio").mkdir(parents=True)
    (root / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/x/low,Low\n1,/x/high,High\n"
                                                   "2,/x/hiss,Hiss\n")
    rng, t = np.random.default_rng(0), np.arange(C.SR) / C.SR
    kinds = {"/x/low": lambda: np.sin(2 * np.pi * 220 * t), "/x/high": lambda: np.sin(2 * np.pi * 2000 * t),
             "/x/hiss": lambda: rng.standard_normal(C.SR)}
    for split in ("balanced_train", "unbalanced_train", "eval"):
        lines = ["filename\tlabels"]
        for i in range(6):
            mids = [list(kinds)[i % 3]] + (["/x/hiss"] if split == "unbalanced_train" and i % 2 else [])
            fn = f"audio/{split}_{i}.wav"
            sf.write(root / fn, (0.1 * sum(kinds[m]() for m in mids)).astype(np.float32), C.SR)
            lines.append(f"{fn}\t{','.join(mids)}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_ssl_data_root_pretrains_on_its_own_audio(tmp_path, capsys, one_thread):
    """Bug 2 (issue 20): with a real-layout --data-root, pre-training draws that corpus's clips (labels
    ignored), not the synthetic stream, and says so at start, in the stage's key and in results.json."""
    root = _ssl_real_corpus(tmp_path / "mine")
    res = conformer_ssl.main(_ssl_argv(root, tmp_path / "runs" / "run", "--fractions", "1", "--pt-seconds", "1"))
    out = capsys.readouterr().out
    assert f"pre-training data: {root} (--data full: 12 clips, labels ignored)" in out
    assert "synthetic stream" not in out
    pt = res["pretrain"]["pretrained"]
    assert pt["data"].startswith(str(root)) and pt["steps"] == 3 and pt["skipped"] == 0
    (stage,) = (tmp_path / "runs").glob("pretrain-*")
    key = C.read_json(stage / "stage.json")
    assert key["pretrain"] == "corpus" and key["source"][0] == "full"
    assert {Path(f[0]).name for f in key["source"][1:]} == {"balanced_train.tsv", "unbalanced_train.tsv", "eval.tsv"}
    _, order = conformer_ssl.unlabelled_data(*(lambda a: (a, None, conformer_ssl.unlabelled_source(
        a, C.load_corpus(str(root), "full"))))(conformer_ssl.resolve(conformer_ssl.parse_args(
            _ssl_argv(root, tmp_path / "o", "--pretrain", "corpus")), False)))
    assert len(order) == 3 * 2 and order.max() < 12  # indices into the corpus's 12 training clips
    # told otherwise: the stream, and --pretrain corpus without a corpus is one line
    a = conformer_ssl.load_data(conformer_ssl.parse_args(_ssl_argv(root, tmp_path / "o", "--pretrain", "synthetic")))
    assert a[2].rows is None and "synthetic stream" in capsys.readouterr().out
    with pytest.raises(C.DataError, match="--pretrain corpus: no --data-root"):
        conformer_ssl.unlabelled_source(SimpleNamespace(pretrain="corpus", data_root=None, seed=0), None)


def test_ssl_preset_by_device_not_by_corpus(capsys):
    """Bug 6's part (issue 20): a non-synthetic root alone no longer means cf_L with 300k + 40k updates:
    --preset auto is the CPU preset on a CPU whatever the corpus, the paper's on request; given flags win."""
    parse = lambda *a: conformer_ssl.parse_args(["--data-root", "/data/real", "--device", "cpu", *a])
    a = conformer_ssl.resolve(parse(), False)
    assert (a.preset, a.size, a.pt_steps, a.pt_batch_size, a.ft_steps, a.ft_lr, a.batch_size) == \
        ("cpu", "cpu", 250, 16, 300, 1e-3, 8)
    assert "conformer_ssl: preset cpu (auto: no CUDA GPU" in capsys.readouterr().out
    p = conformer_ssl.resolve(parse("--preset", "paper"), False)
    assert (p.size, p.dim, p.pt_steps, p.pt_batch_size, p.ft_steps, p.ft_lr, p.batch_size) == \
        ("L", 768, 300_000, 64, 40_000, 1e-4, 640)
    t = conformer_ssl.resolve(parse("--preset", "paper", "--task", "esc50", "--task-root", "/t", "--size", "S", "--ft-steps", "9"), False)
    assert (t.size, t.dim, t.batch_size, t.ft_steps, t.head_dropout) == ("S", 256, 64, 9, 0.1)
    assert "given flags kept: size, ft_steps" in capsys.readouterr().out
    s = conformer_ssl.resolve(conformer_ssl.parse_args(["--device", "cpu"]), True)  # the default command
    assert (s.size, s.pt_steps, s.ft_steps, s.batch_size, s.tag) == ("cpu", 250, 300, 8, "cpu_synth")


@pytest.mark.parametrize("size,exact", [("S", 18_428_416), ("L", 88_132_608)])
def test_ssl_latent_targets_sizes_and_shapes(size, exact):
    """--targets latent (Eq. 1: c_t against z_t itself): no target projection, the final linear maps the
    context to the 256-d latents: 18.4 M / 88.1 M as the paper; --no-final-proj only where d = 256."""
    cfg = conformer_ssl.SIZES[size]
    with torch.device("meta"):
        n = conformer_ssl.count_params(conformer_ssl.PretrainModel(**cfg, targets="latent"))
        no_proj = conformer_ssl.count_params(conformer_ssl.PretrainModel(**cfg, targets="latent", final_proj=False))
    assert n == exact and round(n / 1e6, 1) == conformer_ssl.PAPER_PARAMS[size] / 1e6
    if size == "S":
        assert no_proj == 18_362_624 and round(no_proj / 1e6, 1) == 18.4
    argv = ["--size", size, "--targets", "latent", "--no-final-proj", "--device", "cpu"]
    if size == "L":
        with pytest.raises(C.DataError, match="keep the final linear"):
            conformer_ssl.resolve(conformer_ssl.parse_args(argv), True)
    torch.manual_seed(0)
    cpu = dict(conformer_ssl.SIZES["cpu"], targets="latent")
    model = conformer_ssl.PretrainModel(**cpu)
    mask_fn = lambda b, t: torch.from_numpy(conformer_ssl.compute_mask_indices((b, t), 0.3, 3, np.random.default_rng(0)))
    c, y, mask = model(0.1 * torch.randn(2, C.SR), mask_fn)
    z, _ = model.encoder(model.encoder.frontend(0.1 * torch.randn(2, C.SR)))
    assert c.shape[-1] == y.shape[-1] == 256 and isinstance(model.target_proj, torch.nn.Identity)
    assert conformer_ssl.Classifier(3, "linsoft", **cpu).head.in_features == 256


def test_ssl_class_balance_only_on_the_full_training_set(tiny_root):
    """Sec. 4.1 balances full AudioSet: by default only fraction 1 of --data full is class-balanced
    (before issue 20: every fraction); --balance / --no-balance force it on / off everywhere."""
    corpus = C.load_corpus(str(tiny_root), "full")
    arg = lambda *a: conformer_ssl.resolve(conformer_ssl.parse_args(["--device", "cpu", *a]), True, 4.0)
    a = arg()
    assert [conformer_ssl.corpus_data(a, corpus, f).balance for f in (0.01, 0.1, 1.0)] == [False, False, True]
    assert not conformer_ssl.corpus_data(arg("--data", "balanced"), C.load_corpus(str(tiny_root)), 1.0).balance
    assert conformer_ssl.corpus_data(arg("--balance"), corpus, 0.1).balance
    assert not conformer_ssl.corpus_data(arg("--no-balance"), corpus, 1.0).balance


def _dense_label_fractions(targets, fractions=(0.01, 0.03, 0.1, 0.3, 1.0), seed=0):
    """The reference: label_fractions as first written, on dense (N, K) arrays (66 s and 12.9 GB on
    AudioSet), class by class and row by row."""
    t = np.asarray(targets) > 0
    rng = np.random.default_rng([seed, 1])
    cover = []
    for k in np.argsort(t.sum(0), kind="stable"):
        if t[:, k].any() and not t[cover, k].any():
            cover.append(int(rng.choice(np.flatnonzero(t[:, k]))))
    key = np.where(t.any(1), np.argmin(np.where(t, t.sum(0), np.inf), axis=1), -1)
    rng2, pos, first = np.random.default_rng(seed), np.empty(len(key)), set(cover)
    for k in np.unique(key):
        idx = rng2.permutation(np.flatnonzero(key == k))
        idx = np.array(sorted(idx, key=lambda i: i not in first), dtype=np.int64)
        pos[idx] = (np.arange(len(idx)) + rng2.random()) / len(idx)
    order = cover + [i for i in np.lexsort((rng2.random(len(key)), pos)).tolist() if i not in first]
    return {f: np.sort(np.array(order[: max(len(cover), int(round(f * len(t))))], dtype=np.int64))
            for f in sorted(fractions)}


def test_label_fractions_and_weighted_sampler_at_scale_equal_their_references(tiny_root):
    """AudioSet-scale start-up (issue 20): label_fractions (sparse, in row blocks) gives the dense
    reference's indices (random matrices with empty rows and classes, the tiny corpus); WeightedSampler's
    chunked draws are numpy's rng.choice(p=...) draws; uint8 targets give float64's sampling weights."""
    corpus = C.load_corpus(str(tiny_root), "full")
    mats = [corpus.targets(corpus.train, dtype=np.uint8)]
    for trial in range(12):
        rng = np.random.default_rng(trial)
        t = (rng.random((int(rng.integers(1, 300)), int(rng.integers(1, 15)))) < 0.2 * rng.random()).astype(np.uint8)
        t[:, int(rng.integers(t.shape[1]))] = 0
        mats.append(t)
    for i, t in enumerate(mats):
        a, b = C.label_fractions(t, seed=i % 3), _dense_label_fractions(t, seed=i % 3)
        assert list(a) == list(b) and all(np.array_equal(a[f], b[f]) for f in a), i
    y = mats[0]
    w = C.generate_sampling_weights(y)
    assert np.array_equal(w, C.generate_sampling_weights(y.astype(np.float64)))
    ref = np.random.default_rng([3, 0]).choice(len(w), 5000, replace=True, p=w / w.sum())
    assert np.array_equal(C.WeightedSampler(w, 5000, seed=3).epoch_indices(0, chunk=777), ref)


# ---- issue 21: conformer_ssl.py's figures (plot), a user's wav (embed, predict), --help of every parser ----
def _figure_spy(monkeypatch) -> dict:
    """common.figure as it is (the PNG is written), keeping each drawn Axes by its file name."""
    axes, real = {}, C.figure

    def spy(path, draw, **kw):
        return real(path, lambda ax: (draw(ax), axes.__setitem__(Path(path).name, ax)), **kw)
    monkeypatch.setattr(C, "figure", spy)
    return axes


def _line(ax, label: str):
    """(x, y) of the line labelled so: a plain line, or the data line of an errorbar (its container holds the label)."""
    (line,) = [l for l in ax.lines if l.get_label() == label] + [c.lines[0] for c in ax.containers
                                                                 if c.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def _same(got: tuple, x: list, y: list) -> bool:
    return np.allclose(got[0], x) and np.allclose(got[1], y) and len(got[1]) == len(y)


def _bars(ax, ys: list[float]) -> list[float]:
    """Half-lengths of the error bars of the points at heights ys (the vertical segments of ax.collections)."""
    segs = [s for c in ax.collections for s in c.get_segments()]
    return [next((s[1][1] - s[0][1]) / 2 for s in segs if abs((s[0][1] + s[1][1]) / 2 - y) < 1e-9) for y in ys]


def test_ssl_plot_draws_the_values_of_results_json(tmp_path, monkeypatch, capsys):
    """plot: Table 1 (a run folder with 2 seeds at 10 %, and several run folders pooled), a seeds folder
    (`common.py seeds`, fractions from the row names), Fig. 2a's pools; the drawn line data and error bars
    equal the values in results.json (mean, sample std), the paper's line equals PAPER_TABLE1."""
    axes = _figure_spy(monkeypatch)
    rows = [{"fraction": 0.1, "scores": {"scratch": [0.21, 0.25], "pretrained": [0.3, 0.36]}},
            {"fraction": 1.0, "scores": {"scratch": [0.4], "pretrained": [0.47]}}]
    for name, r in (("a", rows), ("b", [{"fraction": 1.0, "scores": {"scratch": [0.5], "pretrained": [0.53]}}])):
        (tmp_path / name).mkdir()
        C.write_json(tmp_path / name / "results.json", {"experiment": "table1", "rows": r})
    conformer_ssl.main(["plot", str(tmp_path / "a")])
    assert capsys.readouterr().out.splitlines() == [f"figure: {tmp_path / 'a' / 'table1.png'}",
                                                    f"(peak memory {C.peak_memory_gb():.1f} GB)"]
    ax = axes.pop("table1.png")
    assert (tmp_path / "a" / "table1.png").stat().st_size > 1000
    assert _same(_line(ax, "scratch (ours, n=1/2)"), [0.1, 1.0], [0.23, 0.4])
    assert _same(_line(ax, "pretrained (ours, n=1/2)"), [0.1, 1.0], [0.33, 0.47])
    assert np.allclose(_bars(ax, [0.23, 0.33]), [np.std([0.21, 0.25], ddof=1), np.std([0.3, 0.36], ddof=1)])
    assert _same(_line(ax, "pretrained (paper, cf_L on AudioSet)"), [0.01, 0.03, 0.1, 0.3, 1.0],
                 [0.276, 0.305, 0.337, 0.356, 0.415])
    assert _same(_line(ax, "scratch (paper, cf_L on AudioSet)"), [0.01, 1.0], [0.138, 0.366])
    # two run folders (seeds) pooled: 100 % has two values per init
    conformer_ssl.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ab.png")])
    assert _same(_line(axes.pop("ab.png"), "pretrained (ours, n=2)"), [0.1, 1.0], [0.33, 0.5])
    # a seeds folder whose runs are not here: the fraction is the row's name
    (tmp_path / "seeds").mkdir()
    C.write_json(tmp_path / "seeds" / "results.json", {
        "3%": {"rows.0.mean.scratch": [0.1, 0.2, 0.3], "rows.0.mean.pretrained": [0.2, 0.3, 0.7],
               "runs": ["gone/s0", "gone/s1", "gone/s2"], "minus_first": None}})
    conformer_ssl.main(["plot", str(tmp_path / "seeds"), "--out", str(tmp_path / "seeds.png")])
    ax = axes.pop("seeds.png")
    assert _same(_line(ax, "pretrained (ours, n=3)"), [0.03], [0.4]) and _same(_line(ax, "scratch (ours, n=3)"), [0.03], [0.2])
    assert np.allclose(_bars(ax, [0.4]), [np.std([0.2, 0.3, 0.7], ddof=1)])
    # Fig. 2a: the pools against their multiples, scratch as a level
    (tmp_path / "f").mkdir()
    pools = [{"init": "pool0_25x", "mult": 0.25}, {"init": "pool4x", "mult": 4}]
    C.write_json(tmp_path / "f" / "results.json", {"experiment": "fig2a", "pools": pools, "rows": [
        {"fraction": 0.1, "scores": {"scratch": [0.2], "pool0_25x": [0.22], "pool4x": [0.28]}},
        {"fraction": 1.0, "scores": {"scratch": [0.4], "pool0_25x": [0.41], "pool4x": [0.45]}}]})
    conformer_ssl.main(["plot", str(tmp_path / "f")])
    ax = axes.pop("fig2a.png")
    assert not axes and (tmp_path / "f" / "fig2a.png").is_file() and not (tmp_path / "f" / "table1.png").exists()
    assert _same(_line(ax, "pre-trained, 10 % labelled"), [0.25, 4], [0.22, 0.28])
    assert _same(_line(ax, "pre-trained, 100 % labelled"), [0.25, 4], [0.41, 0.45])
    assert np.allclose(_line(ax, "scratch, 10 % labelled")[1], 0.2)
    # not a run of this script: one line
    (tmp_path / "task").mkdir()
    C.write_json(tmp_path / "task" / "results.json", {"experiment": "task", "rows": []})
    for folder, msg in ((tmp_path / "task", "a downstream task run"), (tmp_path / "nope", "no results.json")):
        with pytest.raises(C.DataError, match=msg):
            conformer_ssl.main(["plot", str(folder)])


def test_ssl_every_parser_has_help_text_and_shows_defaults(capsys):
    """--help of the experiment and of each sub-command (its own, not the experiment's): every flag has help
    text, every flag with a default shows it."""
    parsers = {"": conformer_ssl.build_parser(), "plot": conformer_ssl.plot_parser(),
               "embed": conformer_ssl.audio_parser("embed"), "predict": conformer_ssl.audio_parser("predict")}
    for cmd, p in parsers.items():
        text = p.format_help()
        for act in p._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            assert act.help, (cmd, act.dest)
            if act.option_strings and act.default is not None:
                h = p._get_formatter()._get_help_string(act)
                assert "default" in h.lower(), (cmd, act.dest, h)
        assert "(default: " in text or cmd == "plot", cmd
        with pytest.raises(SystemExit) as e:
            conformer_ssl.main(([cmd] if cmd else []) + ["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: conformer_ssl.py {cmd}".rstrip()), cmd
        assert ("--temperature" in out) == (cmd == ""), cmd
    assert "(default: 5)" in parsers["predict"].format_help() and "sub-commands: plot, embed, predict" in \
        parsers[""].format_help()


def test_ssl_predict_and_embed_a_users_wav(tiny_root, tmp_path, capsys, one_thread):
    """predict: the fine-tuned model's top classes by name with the probabilities the test set's scoring
    gives that clip, and the synthetic-classes warning; embed: the mean over time of the encoder's context,
    one .npy per file, where the results went and the peak memory."""
    out = tmp_path / "run"
    conformer_ssl.main(_ssl_argv(tiny_root, out, "--fractions", "1", "--pretrain", "none"))
    (final,) = tmp_path.glob("finetune/corpus_f1_scratch_s0-*/final.pt")
    ck = C.load_checkpoint(final)
    labels = C.read_class_labels(tiny_root / "class_labels_indices.csv")
    assert ck["labels"] == {"mids": labels.mids, "names": labels.names}
    args = conformer_ssl.resolve(conformer_ssl.parse_args(_ssl_argv(tiny_root, out)), True, 4.0)
    data = conformer_ssl.corpus_data(args, C.load_corpus(str(tiny_root), "full"), 1.0)
    probs = conformer_ssl.predict(conformer_ssl.build_classifier(ck), data, args, torch.device("cpu"))
    wavs = [str(tiny_root / data.test_rows[i][0]) for i in (0, 1)]
    capsys.readouterr()
    tags = conformer_ssl.main(["predict", "--ckpt", str(final), "--top", "3", *wavs])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == C.synthetic_classes_warning(labels.mids) and "peak memory" in lines[-1]
    for i, w in enumerate(wavs):
        top = np.argsort(-probs[i])[:3]
        assert [n for n, _ in tags[w]] == [labels.names[k] for k in top]
        assert np.allclose([v for _, v in tags[w]], probs[i][top], atol=1e-5)
        assert lines[1 + i].startswith(f"{w}: {labels.names[top[0]]} ")
    # an older final.pt without its class names: read from the corpus it names
    old = {k: v for k, v in ck.items() if k != "labels"}
    torch.save(old, tmp_path / "old.pt")
    assert [n for n, _ in conformer_ssl.main(["predict", "--ckpt", str(tmp_path / "old.pt"), "--top", "3", wavs[0]])[
        wavs[0]]] == [n for n, _ in tags[wavs[0]]]
    # embed: <stem>.npy = mean over time of the context vectors of the fine-tuned encoder
    capsys.readouterr()
    res = conformer_ssl.main(["embed", "--ckpt", str(final), "--out", str(tmp_path / "emb"), *wavs])
    printed = capsys.readouterr().out
    model = conformer_ssl.build_classifier(ck).eval()
    for w in wavs:
        got = np.load(tmp_path / "emb" / f"{Path(w).stem}.npy")
        with torch.no_grad():
            wave = torch.from_numpy(C.load_audio(w))[None]
            ref = model.encoder(model.encoder.frontend(wave))[1][0].mean(0).numpy()
        assert got.shape == (64,) and np.allclose(got, ref, atol=1e-5)
    assert res["dim"] == 64 and f"results: {tmp_path / 'emb' / 'results.md'} (peak memory " in printed


def test_ssl_foreign_checkpoints_are_one_line(tiny_root, tmp_path):
    """predict / embed with another script's checkpoint, a random file, a wav, a tensor, a pre-trained encoder
    (predict only) or a missing file: one line naming it (a DataError, which common.cli prints as `error: ...`
    without a traceback), nothing written."""
    wav = str(next(tiny_root.glob("audio/eval/*.wav")))
    torch.save({"script": "psl", "model": {}}, tmp_path / "psl.pt")
    torch.save({"model": {}, "state": {}}, tmp_path / "noscript.pt")
    (tmp_path / "bytes.pt").write_bytes(os.urandom(300))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cfg = conformer_ssl.model_config(conformer_ssl.resolve(conformer_ssl.parse_args(["--size", "cpu"]), True))
    torch.save({"script": "conformer_ssl", "encoder": {"x": torch.zeros(1)}, "config": cfg}, tmp_path / "enc.pt")
    cases = [("psl.pt", "a checkpoint of psl, not of conformer_ssl"), ("noscript.pt", "not a "),
             ("bytes.pt", "not a PyTorch checkpoint"), ("tensor.pt", "not a checkpoint of this project"),
             ("missing.pt", "checkpoint not found")]
    for cmd in ("predict", "embed"):
        for name, msg in cases + [(wav, "not a PyTorch checkpoint"),
                                  ("enc.pt", "but a pre-trained encoder" if cmd == "predict" else "not a checkpoint of this model")]:
            with pytest.raises(C.DataError, match=re.escape(msg)) as e:
                out = ["--out", str(tmp_path / "o")] if cmd == "embed" else []
                conformer_ssl.main([cmd, "--ckpt", str(tmp_path / name), *out, wav])
            assert "\n" not in str(e.value) and not (tmp_path / "o").exists(), (cmd, name)


# =============================================================================================
# issue 20: your own data - every script on a corpus and a task this test writes itself
# =============================================================================================
def _users_corpus(root: Path) -> Path:
    """A real-layout corpus written here, not by the synthetic generator: 3 classes of its own ids under
    one parent in its own ontology, 2 s clips at 22.05 kHz stereo (mixed down and resampled on reading),
    balanced 9 + unbalanced 9 + valid 6 + eval 6 clips, a few with two labels."""
    (root / "audio").mkdir(parents=True)
    ids = ["/u/hum", "/u/chirp", "/u/hiss"]
    (root / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n" + "".join(f"{k},{m},{m[3:].title()}\n" for k, m in enumerate(ids)))
    node = lambda i, name, kids=(): {"id": i, "name": name, "description": "", "citation_uri": "",
                                     "positive_examples": [], "child_ids": list(kids), "restrictions": []}
    (root / "ontology.json").write_text(json.dumps([node("/u/sound", "Sound", ids)] + [node(m, m[3:]) for m in ids]))
    sr, rng = 22050, np.random.default_rng(0)
    t = np.arange(2 * sr) / sr
    make = {"/u/hum": lambda: np.sin(2 * np.pi * 150 * t), "/u/chirp": lambda: np.sin(2 * np.pi * (800 + 900 * t) * t),
            "/u/hiss": lambda: rng.standard_normal(len(t))}
    for split, n in (("balanced_train", 9), ("unbalanced_train", 9), ("valid", 6), ("eval", 6)):
        lines = ["filename\tlabels"]
        for i in range(n):
            mids = [ids[i % 3]] + ([ids[(i + 1) % 3]] if i % 4 == 3 else [])
            wave = 0.1 * sum(make[m]() for m in mids)
            sf.write(root / "audio" / f"{split}_{i}.wav", np.stack([wave, 0.5 * wave], 1).astype(np.float32), sr)
            lines.append(f"audio/{split}_{i}.wav\t{','.join(mids)}")
        (root / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_every_script_runs_on_a_users_own_corpus_and_task(tmp_path, one_thread):
    """Issue 20: a corpus and a task set made by a user (written here; the task from a plain csv table
    through `data/prepare.py csv`), every script end to end at tiny scale: psla (label enhancement from
    the user's ontology), psl (teacher -> relabel -> student), at_transfer --mode frozen alone in a fresh
    folder (upstream trained on the user's corpus), conformer_ssl pre-training on the corpus's own
    audio, ofa_aec; each on the CPU preset, with finite scores over the user's 3 classes."""
    root = _users_corpus(tmp_path / "mine")
    prep = C.load_data_module("prepare")
    (tmp_path / "table.csv").write_text("filename,label,split\n" + "".join(
        f"{fn},{lab[0][3:]},{['train', 'train', 'valid', 'test'][i % 4]}\n" for i, (fn, lab) in
        enumerate(C.read_manifest(root / "balanced_train.tsv") + C.read_manifest(root / "eval.tsv"))))
    prep.convert_csv(tmp_path / "table.csv", tmp_path / "tasks", root, "mine")
    runs = tmp_path / "runs"
    res = psla.main(["--data-root", str(root), "--out", str(runs / "psla"), *PSLA_TINY, "--target-length", "128",
                     "--workers", "0", "--label-enhance", "type12"])
    assert 0 <= res["wa"]["mAP"] <= 1 and len(res["classes"]) == 3 and res["config"]["preset"] == "cpu"
    res = psl.main(_argv(root, runs / "psl", "--teacher-epochs", "1", "--epochs", "1", "--segment", "1"))
    assert 0 <= res["mAP"] <= 1 and res["n"] == 6 and res["method"] == "psl"
    res = AT.main(["--data-root", str(root), "--task-root", str(tmp_path / "tasks"), "--task", "mine", "--mode",
                   "frozen", "--out", str(runs / "at" / "fresh"), "--workers", "0", "--preset", "cpu",
                   "--up-batch-size", "4", "--batch-size", "4", "--bn-batches", "1", "--max-steps", "2"])
    (cell,) = res["cells"]
    assert cell["task"] == "mine" and cell["mode"] == "frozen" and 0 <= cell["mean"] <= 1
    res = conformer_ssl.main(_ssl_argv(root, runs / "ssl" / "run", "--fractions", "1", "--pt-seconds", "1"))
    assert res["pretrain"]["pretrained"]["data"].startswith(str(root))
    res = ofa_aec.main(_ofa_argv(root, runs / "ofa", "--synth-clip-seconds", "2"))
    assert set(res["mAP"]) >= {"teacher", "OFA_800k"} and all(np.isfinite(v) for v in res["mAP"].values())


# =============================================================================================
# issue 13: psl.py / psla.py on real data (damaged clips, tail chunks, validation fallback,
# patience, precision, truth files, strong-label formats, run identity, bad input, resume)
# =============================================================================================
def _damage(root: Path, rows: list) -> dict:
    """Damage 10 training clips as the issue's root: 6 unreadable, 4 readable but odd (2 short)."""
    p = lambda i: root / rows[i][0]
    p(0).write_bytes(b"")  # zero-length
    p(1).write_bytes(p(1).read_bytes()[:20])  # truncated header
    p(2).write_bytes(np.random.default_rng(0).bytes(5000))  # random bytes
    p(3).unlink()  # missing
    nan = np.random.default_rng(1).standard_normal(4 * C.SR).astype(np.float32) * 0.1
    nan[100] = np.nan
    sf.write(p(4), nan, C.SR, subtype="FLOAT")  # float wav with a NaN sample
    inf = nan.copy()
    inf[100] = np.inf
    sf.write(p(5), inf, C.SR, subtype="FLOAT")
    sf.write(p(6), np.zeros(1, np.float32), C.SR)  # 1 sample
    sf.write(p(7), np.random.default_rng(2).standard_normal((44100 * 4, 2)) * 0.1, 44100)  # stereo 44.1 kHz
    sf.write(p(8), np.random.default_rng(3).standard_normal(int(0.3 * C.SR)) * 0.1, C.SR)  # 0.3 s
    sf.write(p(9), np.clip(np.random.default_rng(4).standard_normal(4 * C.SR), -1, 1), C.SR)  # clipped
    return {"unreadable": 6}


@pytest.fixture(scope="session")
def damaged_root(psl_tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged") / "corpus"
    shutil.copytree(psl_tiny, root)
    (root / "synth.json").unlink()  # a real-layout corpus (truth files stay)
    _damage(root, C.read_manifest(root / "balanced_train.tsv"))
    return root


def test_load_audio_rejects_non_finite_samples(tmp_path):
    x = np.zeros(1000, np.float32)
    x[5] = np.nan
    sf.write(tmp_path / "nan.wav", x, C.SR, subtype="FLOAT")
    with pytest.raises(C.DataError, match="non-finite"):
        C.load_audio(tmp_path / "nan.wav")


def test_damaged_clips_are_skipped_counted_and_reported(damaged_root, tmp_path):
    """Item 0: 6 unreadable (incl. NaN / Inf) of 10 damaged training clips: both scripts complete,
    never see a non-finite value, and report the skipped clips in log and results.json."""
    out = tmp_path / "psl"
    psl.main(_argv(damaged_root, out, "--segment", "2", "--max-steps", "1", "--teacher-epochs", "1",
                   "--epochs", "1", "--batch-size", "32", "--amp", "bf16"))  # + item 6: the CPU bf16 path
    res = json.loads((out / "results.json").read_text())
    assert np.isfinite(res["mAP"]) and res["skipped_clips"]["relabel_clips"] == 6
    # item 11: no synth.json, but *_true.tsv and strong_*.tsv are there: the truth checks run
    assert {"clip_vs_true", "chunk_vs_true_strong"} <= set(res["analysis"])
    teacher = json.loads(next(tmp_path.glob("teacher-*")).joinpath("results.json").read_text())
    assert np.isfinite(teacher["mAP"])
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert all("skipped" in r for r in log if "end" not in r) and log[-1]["end"]  # + the student's plateau line
    run = tmp_path / "psla"
    r = psla.main(["--data-root", str(damaged_root), "--out", str(run), "--effnet", "0", "--target-length", "128",
                   "--epochs", "1", "--batch-size", "24", "--workers", "0", "--amp", "bf16"])  # one step: every clip
    assert r["skipped_clips"]["train"] == 6 and np.isfinite(r["last_n"]["mAP"])
    assert all(np.isfinite(r["config"]["norm"]))
    assert json.loads((run / "log.jsonl").read_text().splitlines()[-1])["train/skipped"] == 6


def test_psl_tail_chunks_rounded_and_merged(tmp_path):
    """Item 2: a 160,001-sample clip is 10.0 s (no few-sample chunk at any segment length); a 3.3 s
    clip keeps its 1.3 s remainder; a remainder under MIN_CHUNK_S joins the previous chunk."""
    root = tmp_path / "root"
    root.mkdir()
    sf.write(root / "a.wav", np.zeros(160_001, np.float32), C.SR)
    sf.write(root / "b.wav", np.zeros(int(3.3 * C.SR), np.float32), C.SR)
    sf.write(root / "c.wav", np.zeros(int(4.3 * C.SR), np.float32), C.SR)
    corpus = C.Corpus(root, C.Labels(["x"], ["x"]), C.Ontology({}, {}, {}), [], None, [], synthetic=False)
    rows = [("a.wav", ["x"]), ("b.wav", ["x"]), ("c.wav", ["x"])]
    y = np.ones((3, 1), np.float32)
    for seg, n_a in ((10.0, 1), (5.0, 2), (2.0, 5)):
        ds = psl.chunk_dataset(corpus, rows, y, seg, 10.0)
        a = [c for c in ds.chunks if c[0] == 0]
        assert len(a) == n_a and a[-1][2] == 10.0
    ds = psl.chunk_dataset(corpus, rows, y, 2.0, 10.0)
    assert [c[1:] for c in ds.chunks if c[0] == 1] == [(0.0, 2.0), (2.0, 3.3)]
    assert [c[1:] for c in ds.chunks if c[0] == 2] == [(0.0, 2.0), (2.0, 4.3)]  # 0.3 s tail merged
    assert min(len(ds[i][0]) for i in range(len(ds))) >= 0.5 * C.SR


def test_psla_enhance_labels_ignores_unreadable_clips():
    """Item 1: an unreadable clip (ok False) neither moves any threshold nor gains labels."""
    mids = ["P", "C1", "C2"]
    labels = C.Labels(mids, mids)
    onto = C.Ontology({m: m for m in mids}, {"P": ["C1", "C2"], "C1": [], "C2": []}, {"C1": ["P"], "C2": ["P"]})
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    s = np.array([[.9, .8, .1], [.7, .6, .2], [.3, .3, .9], [0, 0, 0]], np.float32)
    ok = np.array([True, True, True, False])
    e, t = psla.enhance_labels(s, y, labels, onto, "type12", ok)
    e_ref, t_ref = psla.enhance_labels(s[:3], y[:3], labels, onto, "type12")
    np.testing.assert_allclose(t, t_ref)
    assert np.isfinite(t).all() and np.array_equal(e[:3], e_ref) and np.array_equal(e[3], y[3])
    s_bad = s.copy()
    s_bad[3] = -np.inf  # what the old code put there: thresholds unchanged all the same
    np.testing.assert_allclose(psla.enhance_labels(s_bad, y, labels, onto, "type12", ok)[1], t_ref)


def test_psl_validation_falls_back_to_the_balanced_subset(psl_tiny, tmp_path, capsys):
    """Item 3: without valid.tsv the MA trained on full validates on balanced_train, not on itself."""
    root = tmp_path / "novalid"
    shutil.copytree(psl_tiny, root)
    (root / "valid.tsv").unlink()
    corpus = C.load_corpus(str(root), "full")
    args = psl.parse_args(_argv(root, tmp_path / "o"))
    rows = psl.validation_split(corpus, args)
    assert rows == C.read_manifest(root / "balanced_train.tsv") and len(rows) < len(corpus.train)
    assert "balanced_train.tsv" in capsys.readouterr().out
    args.valid_on = "train"
    assert psl.validation_split(corpus, args) == corpus.train


class _ToyChunks(torch.utils.data.Dataset):
    short_clips = 0  # psl.train logs the dataset's count of short clips

    def __init__(self, n=8, k=2):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, C.SR // 2, generator=g) * 0.1, torch.rand(n, 2 * k, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def _toy_train_args(tmp_path, *extra):
    a = psl.parse_args(["--workers", "0", "--batch-size", "2", "--top-k", "1", "--out", str(tmp_path), *extra])
    a.lr, a.synthetic, a.device = 1e-3, False, "cpu"
    return a


def test_psl_patience_counts_epochs_and_stages_validate_separately(tmp_path):
    """Item 4: with a metric that never improves after the first validation, --patience 1 stops one
    epoch (4 steps) after the best step, not after one validation. Item 14: one interval per stage,
    10,000 batches or once per epoch when shorter."""
    a = _toy_train_args(tmp_path, "--patience", "1")
    torch.manual_seed(0)
    info = psl.train(psl.MobileNetV2(2), _ToyChunks(), 2, lambda e: np.arange(8), tmp_path / "s", tmp_path, a,
                     epochs=10, alpha=1.0, augment=False, poly_decay=False, validate=lambda m: 0.5, eval_every="1b")
    assert info["steps"] == 5
    assert psl.eval_interval(60_000, "10000b") == 10_000 and psl.eval_interval(3, "10000b") == 3
    p = psl.parse_args(["--eval-every", "7b", "--ma-eval-every", "0.25"])
    assert (p.eval_every, p.ma_eval_every) == ("7b", 0.25)


def test_psl_first_epoch_is_drawn_once(tmp_path, monkeypatch):
    """Issue 20, start-up at AudioSet scale: train() drew epoch 0's indices twice (once for the epoch length);
    a pseudo-balanced epoch of full AudioSet takes ~18 s. Every epoch is drawn once, the same indices."""
    calls, seen = [], []
    sample = lambda e: calls.append(e) or np.random.default_rng(e).permutation(8)
    loader = C.make_loader
    monkeypatch.setattr(C, "make_loader", lambda ds, bs, sampler=None, **k: seen.append(list(sampler)) or
                        loader(ds, bs, sampler, **k))
    torch.manual_seed(0)
    psl.train(psl.MobileNetV2(2), _ToyChunks(), 2, sample, tmp_path / "s", tmp_path, _toy_train_args(tmp_path), epochs=2,
              alpha=1.0, augment=False, poly_decay=False, validate=lambda m: 0.5, eval_every=1.0)
    assert calls == [0, 1] and seen == [list(sample(0)), list(sample(1))]


def test_psl_preset_is_decided_by_the_machine_not_the_corpus(psl_tiny, tmp_path, monkeypatch, capsys):
    """Issue 20, bug 6: a real corpus on a CPU took the paper's schedule (MA 30 epochs, students 300, lr 1e-4).
    Now --preset auto is cpu without a CUDA GPU and paper with one, whatever the corpus; the cpu preset is the
    former synthetic schedule (the default command's numbers are unchanged); a given flag wins; one line."""
    real = tmp_path / "real"  # the same files without synth.json: a user's corpus
    shutil.copytree(psl_tiny, real, ignore=shutil.ignore_patterns("synth.json", "audio"))
    (real / "audio").symlink_to(psl_tiny / "audio")
    sched = lambda a: (a.preset, a.teacher_epochs, a.epochs, a.lr, a.ma_eval_every, a.eval_every)
    cpu = ("cpu", 5, 6, 1e-3, 0.5, 0.5)
    for root in (psl_tiny, real):
        corpus = C.load_corpus(str(root), "balanced")
        assert corpus.synthetic == (root == psl_tiny)
        assert sched(psl.resolve(psl.parse_args(["--data-root", str(root), "--device", "cpu"]), corpus)) == cpu
        a = psl.resolve(psl.parse_args(["--data-root", str(root), "--preset", "paper", "--lr", "3e-4"]), corpus)
        assert sched(a) == ("paper", 30, 300, 3e-4, "10000b", "10000b")
    out = capsys.readouterr().out.splitlines()
    assert out.count("psl: preset cpu (auto: no CUDA GPU (cpu); --preset paper for the paper's schedule)") == 2
    assert out.count("psl: preset paper (--preset paper); given flags kept: lr") == 2
    monkeypatch.setattr(C, "pick_device", lambda name="auto": torch.device("cuda"))  # a GPU machine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "H100")
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    assert sched(psl.resolve(psl.parse_args([]), corpus))[:4] == ("paper", 30, 300, 1e-4)  # synthetic, on a GPU
    assert "psl: preset paper (auto: a GPU (H100))" in capsys.readouterr().out


def test_psl_validation_interval_is_relative_to_the_epoch():
    """Issue 20, bug 6: --eval-every / --ma-eval-every count epochs of the stage's own training set (the docs'
    direction run once said `--ma-eval-every 38`, one epoch of 1,188 clips only): 0.5 is half of any corpus's epoch,
    exactly the former synthetic rule (steps // 2); 'Nb' counts batches, at least once per epoch (deviation 8)."""
    assert all(psl.eval_interval(spe, 0.5) == max(1, spe // 2) for spe in range(1, 500))  # the former rule
    assert [psl.eval_interval(spe, 1.0) for spe in (38, 45, 18, 60_000)] == [38, 45, 18, 60_000]
    assert psl.eval_interval(100, 0.29) == 29 and psl.eval_interval(100, 2.0) == 200
    assert psl.eval_interval(60_000, "10000b") == 10_000 and psl.eval_interval(38, "10000b") == 38
    assert psl.parse_args(["--ma-eval-every", "1"]).ma_eval_every == 1.0  # epochs, not batches
    part = (HERE / "docs" / "psl.md").read_text()  # psl.py's page: its commands carry no corpus-specific batch counts
    given = re.findall(r"--(?:ma-)?eval-every (\S+)", "".join(re.findall(r"```(?:bash)?\n(.*?)```", part, re.S)))
    assert given and all(re.fullmatch(r"[0-9.]+", v) for v in given), given


def test_psl_every_stage_reports_its_plateau(tmp_path, capsys):
    """Issue 20: each training stage ends with a log line and a `convergence` entry saying whether validation
    mAP reached a plateau (common.plateau_report); a rerun of a finished stage does not log it twice."""
    curves = {"flat": [0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "rising": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
    for name, curve in curves.items():
        a = _toy_train_args(tmp_path / name, "--patience", "100")
        torch.manual_seed(0)
        vals = iter(curve)
        train = lambda: psl.train(psl.MobileNetV2(2), _ToyChunks(), 2, lambda e: np.arange(8), tmp_path / name / "student",
                                  tmp_path / name, a, epochs=2, alpha=1.0, augment=False, poly_decay=False,
                                  validate=lambda m: next(vals), eval_every=0.25)  # every step: 8 validations
        info = train()
        assert info["convergence"] == C.plateau_report(curve) and info["convergence"]["plateau"] == (name == "flat")
        lines = [json.loads(l) for l in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert len(lines) == 9 and lines[-1]["end"] and lines[-1]["plateau"] == (name == "flat")
        assert {k: lines[-1][k] for k in info["convergence"]} == info["convergence"]
        assert train()["convergence"] == info["convergence"]  # finished: resumed at its end, the same report
        assert len((tmp_path / name / "log.jsonl").read_text().splitlines()) == 9  # the end line once
    out = capsys.readouterr().out
    assert ("student: validation mAP reached a plateau (the last quarter of 8 validations gained +0.0000, at most "
            "0.005" in out)  # flat: 0.5 against 0.5 before
    assert ("student: validation mAP did NOT reach a plateau (the last quarter of 8 validations gained +0.2000, more "
            "than 0.005" in out)  # rising: 0.8 against 0.6 before


def test_scores_are_fp32_under_bf16_autocast():
    """Item 6: the backbone runs under autocast, the pooled scores (saved, ranked, averaged) in fp32;
    common.autocast is a real autocast for an explicit bf16 on CPU."""
    with torch.no_grad(), C.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        clip, frames = psl.MobileNetV2(5).eval()(torch.randn(2, C.SR))
        out = psla.PSLANet(5, effnet=0, target_length=64).eval()(torch.randn(2, C.SR))
    assert clip.dtype == frames.dtype == out.dtype == torch.float32
    assert not isinstance(C.autocast(torch.device("cpu"), None), torch.autocast)


def test_psl_unreadable_eval_clips_are_excluded(psl_tiny, tmp_path):
    """Item 5: an eval clip none of whose chunks can be read is left out of the metrics, not scored 0."""
    root = tmp_path / "c"
    shutil.copytree(psl_tiny, root)
    corpus = C.load_corpus(str(root), "balanced")
    (root / corpus.eval[0][0]).unlink()
    args = psl.resolve(psl.parse_args(_argv(root, tmp_path / "o")), corpus)
    torch.manual_seed(0)
    model = psl.MobileNetV2(len(corpus.labels))
    y = corpus.targets(corpus.eval)
    m = psl.evaluate(model, corpus, corpus.eval, y, 2.0, args)
    ref = psl.evaluate(model, corpus, corpus.eval[1:], y[1:], 2.0, args)
    assert m["skipped"] == 1 and m["n"] == 23 and m["mAP"] == pytest.approx(ref["mAP"], abs=1e-7)


def test_read_strong_audioset_format_and_match_by_youtube_id(tmp_path):
    """Item 12: AudioSet's own strong file (segment ids, comma or tab, with or without a header)
    matches manifest rows by YouTube id, as prepare matches clips; no event is lost."""
    rows = [("audio/eval/Yb0RFKhbpFJA_30.000_40.000.wav", ["/m/09x0r"]), ("audio/eval/abcdefghijk.flac", [])]
    (tmp_path / "as.tsv").write_text("segment_id\tstart_time_seconds\tend_time_seconds\tlabel\n"
                                     "b0RFKhbpFJA_30000\t0.000\t1.500\t/m/09x0r\n"
                                     "abcdefghijk_10000\t2.0\t3.0\t/m/05zppz\n")
    (tmp_path / "nohead.csv").write_text("b0RFKhbpFJA_30000,0.5,1.0,/m/09x0r\nunknownid12_0,0,1,/m/09x0r\n")
    got = C.match_strong(C.read_strong(tmp_path / "as.tsv"), rows)
    assert got == {rows[0][0]: [(0.0, 1.5, "/m/09x0r")], rows[1][0]: [(2.0, 3.0, "/m/05zppz")]}
    nohead = C.read_strong(tmp_path / "nohead.csv")
    assert len(nohead) == 2 and C.match_strong(nohead, rows) == {rows[0][0]: [(0.5, 1.0, "/m/09x0r")]}
    ours = {"audio/x/balanced_train_00001.wav": [(0.0, 1.0, "m")]}  # our own ids: exact match only
    assert C.match_strong(ours, [("audio/x/balanced_train_00001.wav", []), ("audio/x/balanced_train_00002.wav", [])]) == ours
    (tmp_path / "bad.tsv").write_text("a\t0\t1\tm\nb\tzero\t1\tm\n")
    with pytest.raises(C.DataError, match="bad.tsv:2"):
        C.read_strong(tmp_path / "bad.tsv")


def test_psl_chunk_truth_on_the_real_ontology(tmp_path):
    """Item 13: ancestors that are not classes (Human voice, Human sounds) are skipped, no KeyError;
    with true clip labels, only the ancestors among them are added."""
    labels = C.read_class_labels(C.AUDIOSET_META / "class_labels_indices.csv")
    onto = C.read_ontology(C.AUDIOSET_META / "ontology.json")
    rows = [("a.wav", ["/m/05zppz"]), ("b.wav", ["/m/05zppz"])]
    strong = {"a.wav": [(0.0, 1.0, "/m/05zppz")], "b.wav": [(0.0, 1.0, "/m/05zppz")]}
    corpus = C.Corpus(tmp_path, labels, onto, rows, None, [], synthetic=False, strong=strong,
                      true={"b.wav": ["/m/05zppz"]})  # b: truth without its parent Speech
    ds = C.SegmentDataset(tmp_path, rows, np.zeros((2, 1), np.float32), 2.0, durations=[4.0, 4.0])
    y = psl.chunk_truth(corpus, rows, ds)
    names = lambda r: sorted(labels.names[j] for j in np.flatnonzero(r))
    assert names(y[0]) == ["Male speech, man speaking", "Speech"] and names(y[1]) == []
    assert names(y[2]) == ["Male speech, man speaking"]


def test_psla_type2_ancestors_stop_at_abstract_nodes():
    """Item 7: on the real ontology, Type II candidates do not cross abstract nodes (official code):
    Music is a candidate parent of 81 classes, not 149 (68 were reached through abstract nodes)."""
    labels = C.read_class_labels(C.AUDIOSET_META / "class_labels_indices.csv")
    onto = C.read_ontology(C.AUDIOSET_META / "ontology.json")
    assert len(onto.abstract) == 22
    _, anc = psla.ontology_matrices(labels, onto)
    music = labels.mids.index("/m/04rlf")
    assert int(anc[:, music].sum()) == 81 and int(anc.sum()) == 767
    assert sum(music_mid == "/m/04rlf" for m in labels.mids for music_mid in onto.ancestors(m)) == 149


def test_paper_column_is_flagged_off_audioset(tiny_root):
    """Item 17: the paper's AudioSet numbers are headed 'not comparable' on any other corpus."""
    corpus = C.load_corpus(str(tiny_root))
    assert C.paper_heading(corpus, "paper mAP") == "paper mAP (AudioSet, not comparable)"
    real = C.Corpus(tiny_root, C.Labels([str(i) for i in range(527)], [""] * 527), C.Ontology({}, {}, {}),
                    [], None, [], synthetic=False)
    assert C.paper_heading(real, "paper mAP") == "paper mAP (AudioSet)"


def _psla_identity(root, argv):
    a = psla.parse_args(argv)
    corpus = C.load_corpus(str(root))
    psla.resolve_schedule(a, corpus.root)
    return a, psla.run_identity(a, corpus) | {"teacher": None}


def test_run_identity_refuses_other_settings_and_no_resume_is_fresh(tiny_root, tmp_path):
    """Run identity: a run folder made with other settings is refused with one line naming the flags
    (psla --no-mixup after psla); --no-resume removes what an earlier run wrote there (and only a
    folder this program made); the psl MA folder and relabel cache are keyed by their settings."""
    out = tmp_path / "run"
    base = ["--data-root", str(tiny_root), "--out", str(out), "--effnet", "0", "--workers", "0"]
    a, settings = _psla_identity(tiny_root, base)
    assert a.name == "synth_b0_balanced"  # item 15: the corpus is in the run name
    C.claim_run(out, "psla", settings, True, psla.OUTPUTS).__exit__()  # the folder of a run with these settings
    (out / "log.jsonl").write_text("stale\n")
    with pytest.raises(C.DataError, match=r"--mixup 0.5 \(now 0.0\)") as e:
        psla.main(base + ["--no-mixup"])
    assert "\n" not in str(e.value) and (out / "log.jsonl").read_text() == "stale\n"  # nothing written
    with pytest.raises(C.DataError, match="--lr"):
        psla.main(base + ["--lr", "0.5"])
    C.claim_run(out, "psla", settings, True, psla.OUTPUTS).__exit__()  # same settings: resumes
    C.claim_run(out, "psla", {"other": 1}, False, psla.OUTPUTS).__exit__()  # --no-resume: fresh
    assert not (out / "log.jsonl").exists()  # the earlier run's log went with it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    C.claim_run(mine, "psla", settings, False, psla.OUTPUTS).__exit__()
    assert (mine / "notes.txt").read_text() == "keep"  # never deletes what it did not make


def test_run_folder_lock_refuses_a_second_run(tiny_root, tmp_path):
    out = tmp_path / "locked"
    with C.RunLock(out):
        with pytest.raises(C.DataError, match="in use by another run"):
            psla.main(["--data-root", str(tiny_root), "--out", str(out), "--effnet", "0", "--workers", "0"])
        with pytest.raises(C.DataError, match="in use by another run"):
            psl.main(["--data-root", str(tiny_root), "--out", str(out), "--workers", "0"])
    with C.RunLock(out):  # released
        pass


@pytest.mark.parametrize("script,argv", [
    ("psl", ["--segment", "-1"]), ("psl", ["--segment", "0"]), ("psl", ["--epochs", "-1"]),
    ("psl", ["--batch-size", "0"]), ("psl", ["--lr", "nan"]), ("psl", ["--alpha", "2"]), ("psl", ["--top-k", "0"]),
    ("psla", ["--batch-size", "0"]), ("psla", ["--epochs", "-1"]), ("psla", ["--lr", "nan"]),
    ("psla", ["--mixup", "1.5"]), ("psla", ["--norm", "0", "0"]), ("psla", ["--workers", "-1"])])
def test_bad_flags_are_one_line_usage_errors(script, argv, tmp_path, capsys):
    """Bad input: every numeric flag is range-checked at parse time: exit 2, one error line, nothing written."""
    with pytest.raises(SystemExit) as e:
        {"psl": psl, "psla": psla}[script].main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and ": error: " in err[-1] and argv[0] in err[-1]  # names the flag
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "o").exists()


def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_root, tmp_path):
    """Bad input: the other script's checkpoints and runs are recognised; --out a file or under one."""
    psla_ckpt = tmp_path / "wa.pt"
    torch.save({"model": {}, "config": {}}, psla_ckpt)
    with pytest.raises(C.DataError, match="but psla.py.s$"):
        psl.main(["predict", "--ckpt", str(psla_ckpt), "x.wav"])
    psl_run = tmp_path / "pslrun"
    psl_run.mkdir()
    torch.save({"model": {}, "state": {}, "optimizer": {}}, psl_run / "last.pt")
    base = ["--data-root", str(tiny_root), "--effnet", "0", "--workers", "0"]
    with pytest.raises(C.DataError, match="not a psla.py checkpoint"):
        psla.main(base + ["--out", str(tmp_path / "le"), "--label-enhance", "type1", "--teacher", str(psl_run)])
    assert not (tmp_path / "le").exists()
    with pytest.raises(C.DataError, match="not a finished psla.py run"):
        psla.main(["ensemble", str(psl_run), "--out", str(tmp_path / "ens")])
    assert not (tmp_path / "ens").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for out in (a_file, a_file / "sub"):
        for main in (psl.main, psla.main):
            with pytest.raises(C.DataError) as e:
                main(base[:2] + ["--workers", "0", "--out", str(out)])
            assert "\n" not in str(e.value)
    assert a_file.read_text() == "mine"


def test_synth_root_never_deletes_a_users_files(tmp_path):
    """Data safety: generating into a non-empty folder that is not a generated corpus/task set is
    refused (one line) and its files stay."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(C.DataError, match="refusing to replace"):
        C.make_synthetic_corpus(mine, scale=0.05, clip_seconds=1.0, workers=1, quiet=True)
    synthetic = C.load_data_module("synthetic")
    with pytest.raises(C.DataError, match="refusing to replace"):
        synthetic.make_synthetic_tasks(mine, scale=0.05, workers=1, tasks=["sound_novel"])
    assert (mine / "thesis.tex").read_text() == "keep" and len(list(mine.iterdir())) == 1


def _kill_at(monkeypatch, obj, name, when):
    """Make obj.name raise KeyboardInterrupt (as a SIGKILL would stop the run) when when(*args) is true."""
    orig = getattr(obj, name)

    def wrapped(*a, **k):
        if when(*a, **k):
            raise KeyboardInterrupt
        return orig(*a, **k)
    monkeypatch.setattr(obj, name, wrapped)


def test_psl_relabel_cache_is_float16_memmap_read_per_item(psl_tiny, tmp_path):
    """Item 10: the relabel cache is a float16 .npy read back memory-mapped (exactly the float32 soft labels
    rounded to float16) in a shared stage keyed by the teacher file's content (a copy: the same cache; another
    MA: another) and the corpus files (an edited manifest: another), nothing written beside the MA's file; the
    student's dataset maps the file and builds float32 rows per item; weak labels stay per clip (uint8)."""
    corpus = C.load_corpus(str(psl_tiny), "balanced")
    args = psl.resolve(psl.parse_args(_argv(psl_tiny, tmp_path / "run", "--segment", "2")), corpus)
    torch.manual_seed(0)
    teacher = psl.MobileNetV2(30).eval()
    torch.nn.init.normal_(teacher.classifier[1].bias, 0, 3)  # probabilities spread over (0, 1)
    ma = tmp_path / "ma" / "final.pt"
    psl.save_final(ma, teacher, corpus, None, args, {})
    ds = psl.chunk_dataset(corpus, corpus.train, np.zeros((24, 0)), 2.0, 4.0)
    soft = psl.relabel_segments(ma, ds, args, torch.device("cpu"))
    assert isinstance(soft, np.memmap) and soft.dtype == np.float16 and soft.shape == (48, 30)
    ref = psl.predict_chunks(teacher, ds, args)
    assert np.array_equal(soft, ref.astype(np.float16)) and np.abs(soft - ref).max() <= 2 ** -11  # round to nearest
    assert 0.05 < soft.astype(np.float32).std() and os.listdir(ma.parent) == ["final.pt"]
    cache = Path(soft.filename)
    assert cache.name == "soft.npy" and cache.parent.parent == tmp_path and cache.parent.name.startswith("relabel-")
    shutil.copy(ma, tmp_path / "copy.pt")
    assert Path(psl.relabel_segments(tmp_path / "copy.pt", ds, args, "cpu").filename) == cache  # same content
    torch.nn.init.normal_(teacher.classifier[1].bias, 0, 1)
    psl.save_final(tmp_path / "other.pt", teacher, corpus, None, args, {})
    assert Path(psl.relabel_segments(tmp_path / "other.pt", ds, args, "cpu").filename) != cache
    root = tmp_path / "corpus"
    shutil.copytree(psl_tiny, root)
    key = psl.corpus_identity(root, corpus.train)
    os.utime(root / "balanced_train.tsv", ns=(1, 1))  # edited (or regenerated): another cache
    assert psl.corpus_identity(root, corpus.train) != key and psl.corpus_identity(root, corpus.train[1:]) != key
    ds.targets = t = psl.ChunkTargets(psl.weak_targets(corpus, corpus.train), ds.clip_index, cache)
    assert t.weak.dtype == np.uint8 and t.weak.shape == (24, 30)
    assert isinstance(t.soft, np.memmap) and t.soft.dtype == np.float16
    y = ds[5][1]
    assert y.dtype == torch.float32 and torch.equal(y[:30], torch.from_numpy(soft[5].astype(np.float32)))
    assert torch.equal(y[30:], torch.from_numpy(corpus.targets(corpus.train)[ds.clip_index[5]]))
    copy = pickle.loads(pickle.dumps(t))  # as a spawned DataLoader worker gets it: maps the file again
    assert copy._soft is None and torch.equal(copy[5], y) and isinstance(copy.soft, np.memmap)
    batch = next(iter(C.make_loader(ds, 8, workers=0)))
    assert batch[1].shape == (8, 60) and batch[1].dtype == torch.float32


def test_psl_short_clips_counted_in_every_stage(psl_tiny, tmp_path, capsys):
    """Clips shorter than SHORT_CLIP_S (1 s; here 1 sample and 0.3 s of training, 0.5 s of eval) are padded
    and counted: MA results.json, the student's line, student log lines, run results.json."""
    root = tmp_path / "corpus"
    shutil.copytree(psl_tiny, root)
    (root / "synth.json").unlink()  # a real-layout corpus: durations from the files
    train, ev = C.read_manifest(root / "balanced_train.tsv"), C.read_manifest(root / "eval.tsv")
    sf.write(root / train[0][0], np.zeros(1, np.float32), C.SR)
    sf.write(root / train[1][0], np.full(int(0.3 * C.SR), 0.1, np.float32), C.SR)
    sf.write(root / ev[0][0], np.full(int(0.5 * C.SR), 0.1, np.float32), C.SR)
    sf.write(root / ev[1][0], np.full(C.SR, 0.1, np.float32), C.SR)  # 1.0 s: not short
    out = tmp_path / "run"
    psl.main(_argv(root, out, "--segment", "2", "--max-steps", "1", "--teacher-epochs", "1", "--epochs", "1",
                   "--batch-size", "32"))
    assert f"short=2 clips under {psl.SHORT_CLIP_S:g} s" in capsys.readouterr().out  # the student's line
    res = json.loads((out / "results.json").read_text())
    assert res["short_clips"] == {"train": 2, "eval": 1} and res["skipped_clips"]["relabel_clips"] == 0
    (teacher,) = tmp_path.glob("teacher-*")
    assert json.loads((teacher / "results.json").read_text())["short_clips"] == {"train": 2, "eval": 1}
    for log in (teacher / "log.jsonl", out / "log.jsonl"):
        assert [json.loads(l)["short"] for l in log.read_text().splitlines() if "end" not in l] == [2]


def test_prepare_keeps_symlinked_clips_as_given(tmp_path):
    """Item 16: a clip that is a symlink is written as the path given, not as its resolved target."""
    csvs, clips, store = tmp_path / "csv", tmp_path / "clips", tmp_path / "store"
    for d in (csvs, clips, store):
        d.mkdir()
    (csvs / "eval_segments.csv").write_text('# h\nevalclip001, 0.000, 10.000, "/m/09x0r"\n')
    sf.write(store / "blob_1.wav", np.zeros(1600, np.float32), 16000)
    (clips / "evalclip001.wav").symlink_to(store / "blob_1.wav")
    C.load_data_module("prepare").prepare(csvs, clips, tmp_path / "out")
    (row,) = C.read_manifest(tmp_path / "out" / "eval.tsv")
    assert row[0] == "../clips/evalclip001.wav"


# =============================================================================================
# The docs: every command in README.md, docs/*.md and the scripts' docstrings parses as written
# =============================================================================================
HERE = Path(__file__).resolve().parent
COMMAND_SCRIPTS = ["psla.py", "psl.py", "at_transfer.py", "conformer_ssl.py", "ofa_aec.py", "common.py",
                   "data/synthetic.py", "data/prepare.py", "data/bench.py"]
RECORDER = r'''
record() { printf '%s\x1f' "$@" >> "$CALLS"; printf '\x1e' >> "$CALLS"; }
python() { record "$@"; }
python3() { record "$@"; }
torchrun() { while [[ "$1" == --* ]]; do shift; done; record "$@"; }
pip() { :; }
nice() { while [[ "$1" == -* ]]; do shift; shift; done; "$@"; }
bash() { :; }
'''


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _doc_commands(tmp_path: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(where, argv) of every python/torchrun command the docs' bash blocks run, by running each block in
    bash with python/torchrun replaced by a recorder (loops and variables expand as a user's shell would),
    and of every `python ...` line in the scripts' docstrings."""
    import subprocess
    out, bad = [], []
    for doc in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        for i, block in enumerate(_bash_blocks(doc.read_text())):
            calls = tmp_path / "calls"
            calls.write_bytes(b"")
            r = subprocess.run(["bash", "-c", RECORDER + "\nset -e\n" + block], cwd=tmp_path, capture_output=True,
                               text=True, env=dict(os.environ, CALLS=str(calls)), timeout=60)
            where = f"{doc.name} bash block {i + 1}"
            if r.returncode:
                bad.append(f"{where} does not run in bash: {r.stderr.strip()[-300:]}")
            for rec in calls.read_bytes().decode().split("\x1e")[:-1]:
                out.append((where, rec.split("\x1f")[:-1]))
    for script in COMMAND_SCRIPTS:
        text = (HERE / script).read_text()
        docstring = text[text.index('"""') + 3: text.index('"""', text.index('"""') + 3)]
        for line in docstring.replace("\\\n", " ").splitlines():  # continuation lines joined
            line = line.split("  #")[0].strip()
            if line.startswith(("python ", "torchrun ")):
                try:
                    argv = shlex.split(line)[1:]
                except ValueError as e:
                    bad.append(f"{script} docstring: {line}: {e}")
                    continue
                while argv and argv[0].startswith("--"):  # torchrun's own flags
                    argv.pop(0)
                out.append((f"{script} docstring", argv))
    return out, bad


class _Parsed(Exception):
    pass


def _parse_only(argv: list[str], monkeypatch) -> None:
    """Run the command's script up to its (sub-)parser's parse_args and stop there: flags, choices and
    types are checked by the script's own argparse, nothing is trained or written."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    script, args = argv[0], argv[1:]
    spec = importlib.util.spec_from_file_location("docs_" + script.replace("/", "_")[:-3], HERE / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    try:
        module.main(args)
    except _Parsed:
        pass


def test_every_command_in_the_docs_parses_as_written(tmp_path, monkeypatch, capsys):
    """Each python/torchrun command of README.md, docs/*.md and the docstrings (loops expanded by bash) names a
    script of the repository and parses with that script's own argparse (its sub-command's parser for a
    sub-command); `python -m pytest ...` lines are not script commands."""
    commands, bad = _doc_commands(tmp_path)
    assert len(commands) > 20
    for where, argv in commands:
        if not argv or argv[0] == "-m" or argv[0] == "-c":
            continue
        if argv[0] not in COMMAND_SCRIPTS:
            bad.append(f"{where}: {' '.join(argv)}: not a script of the repository")
            continue
        try:
            _parse_only(argv, monkeypatch)
        except SystemExit as e:
            if e.code not in (0, None):
                bad.append(f"{where}: {' '.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1:]}")
        except Exception as e:  # noqa: BLE001 - a command that fails before parsing is a docs bug too
            bad.append(f"{where}: {' '.join(argv)}: {type(e).__name__}: {e}")
        finally:
            monkeypatch.undo()
    assert not bad, "\n".join(bad)


def test_docs_parser_check_catches_a_wrong_flag(tmp_path, monkeypatch):
    """The check above fails on a flag the script does not have and passes a real one."""
    _parse_only(["psl.py", "--segment", "2", "--data", "balanced"], monkeypatch)
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:
        _parse_only(["psl.py", "--segmnet", "2"], monkeypatch)
    assert e.value.code == 2


# The main command's printed digits depend on the thread count (torch's CPU kernels sum in another order):
# each count is deterministic, and these are its digits at tiny scale on the CPU this suite runs on.
MAIN_COMMAND_DIGITS = {1: "17.81", 2: "18.02"}


def test_main_command_prints_the_same_digits_per_thread_count(psl_tiny, tmp_path):
    """README's main command (`python psl.py --segment 2 --data balanced`) at tiny scale, in a fresh process
    with 1 and with 2 threads: each prints its pinned student mAP to the printed digit. A change that moves
    the numbers (or makes a thread count non-deterministic) fails here, and README must be re-measured."""
    import subprocess
    procs = {}  # both thread counts at once (numerics depend on the thread count, not on the load)
    for threads in MAIN_COMMAND_DIGITS:
        out = tmp_path / f"t{threads}"
        procs[threads] = subprocess.Popen(
            [sys.executable, "psl.py", "--segment", "2", "--data", "balanced", "--data-root", str(psl_tiny),
             "--out", str(out), "--stages", str(tmp_path / f"stages{threads}"), "--workers", "0",
             "--batch-size", "8", "--max-steps", "3", "--teacher-epochs", "1", "--epochs", "1"],
            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)))
    printed = {}
    for threads, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-500:]
        (row,) = [l for l in stdout.splitlines() if l.startswith("| psl-2s |")]
        printed[threads] = row.split("|")[2].strip()
    assert printed == MAIN_COMMAND_DIGITS


def test_at_matrix_reports_paired_trial_differences():
    """frozen-scratch in results.md is the mean +- sample std of the per-trial differences when both columns have
    >= 2 trials (hand-computed: differences 10, 30, 20 points -> +20.00 +- 10.00), the difference of the means
    with one trial; a paired std differs from the unpaired one (trials move together here)."""
    scratch = {"trials": [0.50, 0.40, 0.60], "mean": 0.50}
    frozen = {"trials": [0.60, 0.70, 0.80], "mean": 0.70}
    assert AT.paired_difference(frozen, scratch) == "+20.00 +- 10.00"
    assert AT.paired_difference({"trials": [0.7], "mean": 0.7}, {"trials": [0.5], "mean": 0.5}) == "+20.00"
    cells = {("tagging", "scratch"): [0.50, 0.40, 0.60], ("tagging", "frozen"): [0.60, 0.70, 0.80]}
    results = {"upstreams": {}, "cells": [
        {"task": t, "domain": "sound", "mode": m, "arch": "mbv2", "metric": "mAP", "trials": v,
         "mean": float(np.mean(v)), "plateau": {"reached": 3, "runs": 3}} for (t, m), v in cells.items()]}
    args = SimpleNamespace(trials=3, folds=1, task_root=None, preset="cpu", lr=1e-3, epochs=24, patience=6,
                           frozen_epochs=500, frozen_patience=50)
    row = next(l for l in AT.at_markdown(results, args).splitlines() if l.startswith("| tagging"))
    assert "| +20.00 +- 10.00 |" in row and "paired" in AT.at_markdown(results, args)


def test_at_plot_each_draws_run_folders_side_by_side(tmp_path, monkeypatch):
    """`plot --each A B`: one group per (run folder, task) with that run's trials (mean +- std of its 3 trials),
    not one pooled bar of the two runs' means (the default, for seeds of one setting)."""
    a = _at_fake_run(tmp_path / "ma", {("tagging", "scratch"): [0.5, 0.6, 0.7], ("tagging", "frozen"): [0.2, 0.3, 0.4]})
    b = _at_fake_run(tmp_path / "ma3", {("tagging", "scratch"): [0.5, 0.6, 0.7], ("tagging", "frozen"): [0.4, 0.5, 0.9]})
    path, bars = _at_drawn(monkeypatch, ["--each", str(a), str(b), "--out", str(tmp_path / "f.png")])
    assert np.allclose([p.get_height() for p in bars["ours frozen"].patches], [30.0, 60.0])
    segs = bars["ours frozen"].errorbar.lines[2][0].get_segments()
    assert np.allclose([s[1, 1] - s[0, 1] for s in segs], [2 * 10.0, 2 * 100 * np.std([0.4, 0.5, 0.9], ddof=1)])
    _, pooled = _at_drawn(monkeypatch, [str(a), str(b), "--out", str(tmp_path / "g.png")])
    assert np.allclose([p.get_height() for p in pooled["ours frozen"].patches], [45.0])  # mean of the two means


def test_ssl_table1_gain_is_the_paired_per_seed_difference():
    """Table 1's gain column: with 3 seeds of both inits, mean +- sample std of pre-trained - scratch per seed
    (hand-computed: 0.1, 0.3, 0.2 -> +0.200 +- 0.100); one seed: the plain difference; no pre-trained: '-'."""
    assert conformer_ssl.gain([0.3, 0.2, 0.4], [0.4, 0.5, 0.6]) == "+0.200 +- 0.100"
    assert conformer_ssl.gain([0.3], [0.25]) == "-0.050"
    assert conformer_ssl.gain([0.3, 0.2], []) == "-"
