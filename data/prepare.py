"""Real datasets -> our layout, from each dataset's own metadata; audio is never copied (manifests
point at the files where the user unpacked them).

    python data/prepare.py audioset --csv-dir CSVS --audio-dir CLIPS --out data/audioset
    python data/prepare.py esc50 PATH/ESC-50-master --out data/tasks
    python data/prepare.py --help                   # every dataset and its expected layout

AudioSet becomes a corpus (balanced_train/unbalanced_train/eval/300h_train tsvs, what psl.py and
psla.py read); every other dataset becomes a task (a manifest filename<TAB>labels<TAB>fold and an
entry in <out>/tasks.json, what common.read_task reads). A malformed row is a one-line error
naming the file and line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # common.py, when run as a script
from common import (AUDIOSET_META, HelpFormatter, METRICS, SR, DataError, TaskRow, multi_hot, read_class_labels, tasks_json,  # noqa: E402
                    sample_300h, write_json, write_manifest)


# =============================================================================================
# The task layout (read by common.read_task): <name>/<name>.tsv + an entry in tasks.json
# =============================================================================================
def write_task(task_root: str | Path, name: str, rows: list[TaskRow], classes: list[str], *, type: str,
               metric: str, kfold: bool, folds: list[str], sample_rate: int = SR, max_seconds: float = 10.0,
               audio_root: str | Path = ".", domain: str = "sound", **extra) -> dict:
    """Write <task_root>/<name>/<name>.tsv and add/replace the task's entry in <task_root>/tasks.json.
    audio_root: where the filenames are relative to (relative to task_root, or absolute); domain: sound,
    speech or music (the transfer tables mark speech rows by it)."""
    task_root = Path(task_root)
    bad = [c for c in classes if "," in c or "\t" in c]
    if bad or metric not in METRICS or type not in ("single", "multi"):
        raise DataError(f"task {name}: bad class name {bad[:1]}, metric {metric!r} or type {type!r}")
    index = task_root / "tasks.json"
    tasks = tasks_json(task_root) if index.exists() else {}
    manifest = task_root / name / f"{name}.tsv"
    if manifest.exists() and tasks.get(name, {}).get("manifest") != f"{name}/{name}.tsv":
        raise DataError(f"{manifest}: exists and is not a task written here (no entry in {index}); "
                        f"refusing to overwrite it: choose another --out")
    (task_root / name).mkdir(parents=True, exist_ok=True)
    with open(manifest, "w") as f:
        f.write("filename\tlabels\tfold\n")
        f.writelines(f"{fn}\t{','.join(labels)}\t{fold}\n" for fn, labels, fold in rows)
    entry = {"manifest": f"{name}/{name}.tsv", "audio_root": str(audio_root), "type": type, "metric": metric,
             "higher_is_better": METRICS[metric][1], "kfold": kfold, "folds": list(folds), "classes": list(classes),
             "sample_rate": sample_rate, "max_seconds": max_seconds, "clips": len(rows), "domain": domain, **extra}
    tasks[name] = entry
    write_json(index, tasks)
    return entry


# =============================================================================================
# AudioSet: official segment CSVs + a folder of clips -> a corpus
# =============================================================================================
def read_segments_csv(path: str | Path) -> list[tuple[str, float, float, list[str]]]:
    """Official *_segments.csv: '# ...' header lines, then YTID, start, end, "mid,mid"."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.reader((l for l in f if not l.startswith("#")), skipinitialspace=True):
            if len(r) >= 4:
                rows.append((r[0], float(r[1]), float(r[2]), [m for m in r[3].split(",") if m]))
    return rows


def index_clips(audio_dir: str | Path) -> dict[str, Path]:
    """YouTube id -> file. Accepts the usual namings: <id>.wav, Y<id>.wav, <id>_<start>_<end>.flac, ..."""
    index: dict[str, Path] = {}
    for path in sorted(Path(audio_dir).rglob("*")):
        if path.suffix.lower() not in (".wav", ".flac", ".ogg"):
            continue
        stem = path.stem
        for key in (stem, stem[:11], stem[1:12] if stem.startswith("Y") else None):
            if key:
                index.setdefault(key, path)
    return index


def prepare(csv_dir: str | Path, audio_dir: str | Path, out: str | Path, meta_dir: str | Path = AUDIOSET_META,
            seed: int = 0) -> dict:
    """Write balanced_train/unbalanced_train/eval/300h_train tsvs (paths relative to `out`) and copy
    class_labels_indices.csv + ontology.json; report the rows that have no audio."""
    out = Path(out)
    ours = [out / f for f in ("balanced_train.tsv", "unbalanced_train.tsv", "eval.tsv", "300h_train.tsv")]
    if not (out / "prepare_report.json").exists() and (user := [p for p in ours if p.exists()]):
        raise DataError(f"{user[0]}: exists and was not written by prepare; refusing to overwrite it: "
                        f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for f in ("class_labels_indices.csv", "ontology.json"):
        if not (out / f).exists() or not (out / f).samefile(Path(meta_dir) / f):  # --out data/audioset: keep
            shutil.copy(Path(meta_dir) / f, out / f)
    labels = read_class_labels(out / "class_labels_indices.csv")
    clips = index_clips(audio_dir)
    report = {}
    manifests = {}
    for split in ("balanced_train", "unbalanced_train", "eval"):
        path = Path(csv_dir) / f"{split}_segments.csv"
        if not path.exists():
            continue
        rows, missing = [], 0
        for ytid, *_, mids in read_segments_csv(path):
            clip = clips.get(ytid) or clips.get("Y" + ytid)
            if clip is None:
                missing += 1
                continue
            rows.append((os.path.relpath(os.path.abspath(clip), os.path.abspath(out)), mids))  # links kept as given
        multi_hot(rows, labels, str(path))
        write_manifest(out / f"{split}.tsv", rows)
        manifests[split] = rows
        report[split] = {"rows": len(rows) + missing, "with_audio": len(rows), "missing_audio": missing}
        print(f"prepare: {split}: {len(rows)} clips, {missing} rows without audio", flush=True)
    if "balanced_train" in manifests and "unbalanced_train" in manifests:
        rows = sample_300h(manifests["balanced_train"], manifests["unbalanced_train"], labels, seed=seed)
        write_manifest(out / "300h_train.tsv", rows)
        report["300h_train"] = {"with_audio": len(rows)}
    write_json(out / "prepare_report.json", report)
    return report



# =============================================================================================
# Downstream datasets -> tasks (manifest + tasks.json entry; filenames relative to the dataset folder)
# =============================================================================================
def _find(src: Path, names: list[str], what: str) -> Path:
    """The first of `names` found in src or one folder below it (datasets ship with a wrapper folder)."""
    for name in names:
        for cand in [src / name, *sorted(src.glob(f"*/{name}"))]:
            if cand.exists():
                return cand
    raise DataError(f"{src}: no {what} ({' or '.join(names)}) here or one folder below")


def _csv_rows(path: Path, required: list[str], header: bool = True):
    """(line number, row dict) of a CSV file; a short or malformed row is an error naming file and line."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        cols = next(reader, None) if header else required
        if cols is None or any(c not in cols for c in required):
            raise DataError(f"{path}:1: expected columns {required}, got {cols}")
        for row in reader:
            if not row:
                continue
            if len(row) != len(cols):
                raise DataError(f"{path}:{reader.line_num}: expected {len(cols)} fields, got {len(row)}: {row}")
            yield reader.line_num, dict(zip(cols, row))


def _bad(path: Path, line: int, msg: str) -> DataError:
    return DataError(f"{path}:{line}: {msg}")


def _int(path: Path, line: int, value: str, lo: int, hi: int, name: str) -> int:
    if not value.strip().isdigit() or not lo <= int(value) <= hi:
        raise _bad(path, line, f"{name} {value!r} is not an integer in {lo}..{hi}")
    return int(value)


def _write(out: Path, name: str, src: Path, rows, classes, **entry) -> dict:
    if not entry["kfold"]:  # the split names present (FSDKaggle has no valid split: task_splits makes one)
        entry["folds"] = [f for f in entry["folds"] if any(r[2] == f for r in rows)]
    entry = write_task(out, name, rows, classes, audio_root=str(src.resolve()), **entry)
    counts = " ".join(f"{f}={sum(r[2] == f for r in rows)}" for f in entry["folds"])
    print(f"{name}: {len(rows)} clips, {len(classes)} classes, {'folds' if entry['kfold'] else 'splits'} {counts}", flush=True)
    return entry


def convert_csv(table: str | Path, out: str | Path, audio_root: str | Path, name: str, metric: str | None = None,
                multilabel: bool = False, domain: str = "sound", sample_rate: int = SR,
                max_seconds: float = 10.0) -> dict:
    """A plain table of your own: filename,label(s),split-or-fold (a header row naming the columns: filename |
    file | path, label | labels, split | fold). Several labels in one field are separated by ';' or '|'
    (--multilabel). Splits train/valid/test (val, dev, eval read as valid/valid/test) make a split task;
    any other values are k folds. Filenames are relative to --audio-root; every file must exist."""
    table, audio_root = Path(table), Path(audio_root)
    if not audio_root.is_dir():
        raise DataError(f"--audio-root {audio_root}: not a folder")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise DataError(f"--name {name!r}: use letters, digits, '_', '.' and '-' only")
    try:
        text = table.read_text()
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        raise DataError(f"{table}: not a readable UTF-8 CSV ({type(e).__name__})") from None
    reader = csv.reader(text.splitlines())
    head = [c.strip().lower() for c in next(reader, [])]
    col = {k: next((head.index(c) for c in cands if c in head), None)
           for k, cands in (("file", ("filename", "file", "path")), ("label", ("labels", "label")),
                            ("fold", ("split", "fold")))}
    if None in col.values():
        raise DataError(f"{table}:1: expected a header with filename, label(s) and split or fold columns, got {head}")
    alias = {"val": "valid", "validation": "valid", "dev": "valid", "eval": "test"}
    rows, missing = [], []
    for line, r in enumerate(reader, 2):
        if not r or not "".join(r).strip():
            continue
        if len(r) != len(head):
            raise DataError(f"{table}:{line}: expected {len(head)} fields, got {len(r)}: {r}")
        labels = [x.strip() for x in re.split(r"[;|]" if multilabel else r"(?!)", r[col["label"]]) if x.strip()]
        if not labels or any("," in x or "\t" in x for x in labels):
            raise DataError(f"{table}:{line}: bad label field {r[col['label']]!r}")
        fold = r[col["fold"]].strip()
        fold = alias.get(fold.lower(), fold.lower() if fold.lower() in ("train", "valid", "test") else fold)
        if not fold:
            raise DataError(f"{table}:{line}: empty split/fold")
        if not (audio_root / r[col["file"]]).is_file():
            missing.append(f"{table}:{line}: {audio_root / r[col['file']]}")
        rows.append((r[col["file"]], labels, fold))
    if not rows:
        raise DataError(f"{table}: no rows")
    if missing:
        raise DataError(f"{missing[0]}: audio file not found ({len(missing)} of {len(rows)} rows)")
    folds = sorted({r[2] for r in rows})
    split = set(folds) <= {"train", "valid", "test"}
    if split and "test" not in folds:
        raise DataError(f"{table}: a split task needs 'test' rows (have {', '.join(folds)})")
    multi = multilabel and any(len(r[1]) > 1 for r in rows)
    classes = sorted({c for r in rows for c in r[1]})
    return _write(Path(out), name, audio_root, rows, classes, type="multi" if multi else "single",
                  metric=metric or ("mAP" if multi else "accuracy"), kfold=not split,
                  folds=["train", "valid", "test"] if split else folds, sample_rate=sample_rate,
                  max_seconds=max_seconds, domain=domain)


def convert_esc50(src: str | Path, out: str | Path) -> dict:
    """ESC-50: meta/esc50.csv (filename, fold, target, category, ...); 5 predefined folds, 50 classes
    ordered by target; audio/<filename>."""
    src = Path(src)
    path = _find(src, ["meta/esc50.csv"], "ESC-50 metadata")
    names, rows = {}, []
    for line, r in _csv_rows(path, ["filename", "fold", "target", "category"]):
        fold, target = _int(path, line, r["fold"], 1, 5, "fold"), _int(path, line, r["target"], 0, 49, "target")
        if names.setdefault(target, r["category"]) != r["category"]:
            raise _bad(path, line, f"target {target} is {names[target]!r} elsewhere, {r['category']!r} here")
        rows.append((os.path.relpath(path.parent.parent / "audio" / r["filename"], src), [r["category"]], str(fold)))
    classes = [names[k] for k in sorted(names)]
    return _write(Path(out), "esc50", src, rows, classes, type="single", metric="accuracy", kfold=True,
                  folds=[str(f) for f in range(1, 6)], sample_rate=44100, max_seconds=5.0)


def convert_urbansound8k(src: str | Path, out: str | Path) -> dict:
    """UrbanSound8K: metadata/UrbanSound8K.csv (slice_file_name, fold, classID, class, ...); the 10
    predefined folds (never reshuffled); audio/fold<k>/<slice_file_name>."""
    src = Path(src)
    path = _find(src, ["metadata/UrbanSound8K.csv"], "UrbanSound8K metadata")
    names, rows = {}, []
    for line, r in _csv_rows(path, ["slice_file_name", "fold", "classID", "class"]):
        fold, cid = _int(path, line, r["fold"], 1, 10, "fold"), _int(path, line, r["classID"], 0, 9, "classID")
        if names.setdefault(cid, r["class"]) != r["class"]:
            raise _bad(path, line, f"classID {cid} is {names[cid]!r} elsewhere, {r['class']!r} here")
        rel = os.path.relpath(path.parent.parent / "audio" / f"fold{fold}" / r["slice_file_name"], src)
        rows.append((rel, [r["class"]], str(fold)))
    return _write(Path(out), "urbansound8k", src, rows, [names[k] for k in sorted(names)], type="single",
                  metric="accuracy", kfold=True, folds=[str(f) for f in range(1, 11)], sample_rate=44100, max_seconds=4.0)


SC_WORDS_V1_11 = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]


def convert_speechcommands(src: str | Path, out: str | Path, version: int) -> dict:
    """Speech Commands: <word>/<file>.wav folders ([a-z]*: _background_noise_ excluded);
    validation_list.txt / testing_list.txt name the valid / test files, the rest is train.
    version 1 -> task scv1_11 (10 words + _unknown_, no silence; the paper's SCV1/11);
    version 2 -> task scv2_35 (every word folder: the 35 words)."""
    src = Path(src)
    root = _find(src, ["testing_list.txt"], "Speech Commands lists").parent
    files = sorted(str(p.relative_to(root)) for p in root.glob("[a-z]*/*.wav"))
    if not files:
        raise DataError(f"{root}: no <word>/<file>.wav folders")
    split = {}
    for name, lst in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        path = root / lst
        if not path.exists():
            raise DataError(f"{path}: not found")
        for line, entry in enumerate(path.read_text().splitlines(), 1):
            entry = entry.strip()
            if entry and (entry.count("/") != 1 or not entry.endswith(".wav") or not (root / entry).exists()):
                raise _bad(path, line, f"expected an existing <word>/<file>.wav, got {entry!r}")
            if entry:
                split[entry] = name
    words = sorted({f.split("/")[0] for f in files})
    if version == 1:
        missing = [w for w in SC_WORDS_V1_11 if w not in words]
        if missing:
            raise DataError(f"{root}: no folder for {missing} (is this Speech Commands?)")
        classes, label = SC_WORDS_V1_11 + ["_unknown_"], (lambda w: w if w in SC_WORDS_V1_11 else "_unknown_")
    else:
        classes, label = words, (lambda w: w)
    rows = [(os.path.relpath(root / f, src), [label(f.split("/")[0])], split.get(f, "train")) for f in files]
    name = "scv1_11" if version == 1 else f"scv2_{len(words)}"
    return _write(Path(out), name, src, rows, classes, type="single", metric="accuracy", kfold=False, domain="speech",
                  folds=["train", "valid", "test"], sample_rate=16000, max_seconds=1.0)


def convert_fsd50k(src: str | Path, out: str | Path) -> dict:
    """FSD50K: FSD50K.ground_truth/{dev.csv (fname, labels, mids, split in train|val), eval.csv,
    vocabulary.csv (no header: index, label, mid)}; audio in FSD50K.dev_audio/ and FSD50K.eval_audio/."""
    src = Path(src)
    gt = _find(src, ["FSD50K.ground_truth/vocabulary.csv"], "FSD50K ground truth").parent
    voc = gt / "vocabulary.csv"
    classes = {}
    for line, r in _csv_rows(voc, ["index", "label", "mid"], header=False):
        classes[_int(voc, line, r["index"], 0, 10**6, "index")] = r["label"]
    classes = [classes[k] for k in sorted(classes)]
    known, rows = set(classes), []
    for csv_name, audio in (("dev.csv", "FSD50K.dev_audio"), ("eval.csv", "FSD50K.eval_audio")):
        path = gt / csv_name
        for line, r in _csv_rows(path, ["fname", "labels", "mids"] + (["split"] if csv_name == "dev.csv" else [])):
            labels = r["labels"].split(",")
            if set(labels) - known or not r["fname"]:
                raise _bad(path, line, f"labels {sorted(set(labels) - known)} not in {voc.name}")
            fold = {"train": "train", "val": "valid"}.get(r.get("split", "test"), "test" if csv_name == "eval.csv" else None)
            if fold is None:
                raise _bad(path, line, f"split {r['split']!r}: expected train or val")
            rows.append((os.path.relpath(gt.parent / audio / f"{r['fname']}.wav", src), labels, fold))
    return _write(Path(out), "fsd50k", src, rows, classes, type="multi", metric="mAP", kfold=False,
                  folds=["train", "valid", "test"], sample_rate=44100, max_seconds=10.0)


NSYNTH_FAMILIES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string",
                   "synth_lead", "vocal"]  # instrument_family 0..10


def convert_nsynth(src: str | Path, out: str | Path) -> dict:
    """NSynth: nsynth-{train,valid,test}/examples.json (note_str -> fields incl. instrument_family_str)
    + audio/<note_str>.wav; the 11 instrument families."""
    src = Path(src)
    rows = []
    for split in ("train", "valid", "test"):
        path = _find(src, [f"nsynth-{split}/examples.json"], f"NSynth {split} examples.json")
        text = path.read_text()
        try:
            examples = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: {e.msg}") from None
        for key, ex in examples.items():
            fam = ex.get("instrument_family_str") if isinstance(ex, dict) else None
            if fam not in NSYNTH_FAMILIES:
                line = text.count("\n", 0, text.find(json.dumps(key))) + 1
                raise _bad(path, line, f"example {key!r}: instrument_family_str {fam!r} is not one of the 11 families")
            rows.append((os.path.relpath(path.parent / "audio" / f"{key}.wav", src), [fam], split))
    return _write(Path(out), "nsynth", src, rows, NSYNTH_FAMILIES, type="single", metric="accuracy",
                  kfold=False, folds=["train", "valid", "test"], sample_rate=16000, max_seconds=4.0)


def _labelled_csv(path: Path, column: str, known: set | None) -> list[tuple[int, str, list[str]]]:
    out = []
    for line, r in _csv_rows(path, ["fname", column]):
        labels = [l for l in r[column].split(",") if l]
        if not labels or not r["fname"] or (known is not None and set(labels) - known):
            raise _bad(path, line, f"{column} {r[column]!r} is empty or not in the vocabulary")
        out.append((line, r["fname"], labels))
    return out


def _audio_dir(src: Path, names: list[str]) -> Path:
    for name in names:
        for cand in [src / name, *sorted(src.glob(f"*/{name}"))]:
            if cand.is_dir():
                return cand
    return src / names[0]  # not unpacked yet: the documented name


def convert_fsdkaggle2018(src: str | Path, out: str | Path) -> dict:
    """FSDKaggle2018: FSDKaggle2018.meta/train_post_competition.csv (fname, label, ...; 41 classes)
    and test_post_competition_scoring_clips.csv (the 1,600 scored test clips). No validation split:
    task_splits holds out a stratified 10 % of train (the paper's 8,530 = 90 % of 9,473). mAP@3."""
    src = Path(src)
    train_csv = _find(src, ["train_post_competition.csv"], "FSDKaggle2018 train metadata")
    test_csv = _find(src, ["test_post_competition_scoring_clips.csv"], "FSDKaggle2018 test metadata")
    train = _labelled_csv(train_csv, "label", None)
    classes = sorted({l for _, _, labels in train for l in labels})
    test = _labelled_csv(test_csv, "label", set(classes))
    tr_dir = _audio_dir(src, ["FSDKaggle2018.audio_train", "audio_train"])
    te_dir = _audio_dir(src, ["FSDKaggle2018.audio_test", "audio_test"])
    rows = [(os.path.relpath(tr_dir / fn, src), labels, "train") for _, fn, labels in train]
    rows += [(os.path.relpath(te_dir / fn, src), labels, "test") for _, fn, labels in test]
    return _write(Path(out), "fsdkaggle2018", src, rows, classes, type="single", metric="mAP@3", kfold=False,
                  folds=["train", "valid", "test"], sample_rate=44100, max_seconds=10.0)


def convert_fsdkaggle2019(src: str | Path, out: str | Path) -> list[dict]:
    """FSDKaggle2019: train_curated.csv and train_noisy.csv (fname, labels: comma-joined), the test
    labels (test_post_competition.csv) and sample_submission.csv, whose 80 class columns fix the class
    order. Two tasks, fsdkaggle2019_curated and fsdkaggle2019_noisy, sharing the test set; no
    validation split (task_splits holds out a stratified 10 %). lwlrap."""
    src = Path(src)
    sub = _find(src, ["sample_submission.csv"], "FSDKaggle2019 sample_submission.csv (it fixes the class order)")
    with open(sub, newline="") as f:
        header = next(csv.reader(f), [])
    if len(header) < 2 or header[0] != "fname":
        raise DataError(f"{sub}:1: expected 'fname,<class>,...', got {header[:3]}")
    classes = header[1:]
    test_csv = _find(src, ["test_post_competition.csv", "test.csv"], "FSDKaggle2019 test labels")
    te_dir = _audio_dir(src, ["FSDKaggle2019.audio_test", "test"])
    test = [(os.path.relpath(te_dir / fn, src), labels, "test") for _, fn, labels in _labelled_csv(test_csv, "labels", set(classes))]
    entries = []
    for kind in ("curated", "noisy"):
        path = _find(src, [f"train_{kind}.csv", f"train_{kind}_post_competition.csv"], f"FSDKaggle2019 {kind} metadata")
        tr_dir = _audio_dir(src, [f"FSDKaggle2019.audio_train_{kind}", f"train_{kind}"])
        rows = [(os.path.relpath(tr_dir / fn, src), labels, "train") for _, fn, labels in _labelled_csv(path, "labels", set(classes))]
        entries.append(_write(Path(out), f"fsdkaggle2019_{kind}", src, rows + test, classes, type="multi",
                              metric="lwlrap", kfold=False, folds=["train", "valid", "test"], sample_rate=44100,
                              max_seconds=10.0))
    return entries


CONVERTERS = {"esc50": convert_esc50, "urbansound8k": convert_urbansound8k,
              "speechcommands_v1": lambda src, out: convert_speechcommands(src, out, 1),
              "speechcommands_v2": lambda src, out: convert_speechcommands(src, out, 2),
              "fsd50k": convert_fsd50k, "nsynth": convert_nsynth, "fsdkaggle2018": convert_fsdkaggle2018,
              "fsdkaggle2019": convert_fsdkaggle2019}


# =============================================================================================
# Command line
# =============================================================================================
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    s = sub.add_parser("audioset", help="official AudioSet segment CSVs + downloaded clips -> a corpus",
                       formatter_class=HelpFormatter)
    s.add_argument("--csv-dir", required=True, help="folder with balanced_train_segments.csv etc.")
    s.add_argument("--audio-dir", required=True, help="folder (searched recursively) with the clips")
    s.add_argument("--out", default="data/audioset", help="corpus folder (may be data/audioset itself)")
    for name, fn in CONVERTERS.items():
        doc = fn.__doc__ or convert_speechcommands.__doc__
        first = " ".join(doc.split("\n\n")[0].split())  # the first sentence of the first paragraph, whole
        first = re.split(r"(?<=\.) (?=[A-Z])", first)[0]
        if name.startswith("speechcommands"):
            first = f"Speech Commands v{name[-1]}: <word>/<file>.wav folders -> task " + ("scv1_11" if name[-1] == "1" else "scv2_35")
        s = sub.add_parser(name, help=first, description=doc, formatter_class=HelpFormatter)
        s.add_argument("src", help="the dataset folder as downloaded and unpacked (audio is not copied)")
        s.add_argument("--out", default="data/tasks", help="task root: <out>/tasks.json + <out>/<task>/<task>.tsv")
    s = sub.add_parser("csv", help="your own table: filename,label(s),split-or-fold -> a task",
                       description=convert_csv.__doc__, formatter_class=HelpFormatter)
    s.add_argument("table", help="the CSV file")
    s.add_argument("--audio-root", required=True, help="folder the filenames are relative to")
    s.add_argument("--name", required=True, help="task name (letters, digits, _ . -)")
    s.add_argument("--metric", default=None, choices=list(METRICS), help="default: mAP if multi-label, else accuracy")
    s.add_argument("--multilabel", action="store_true", help="labels separated by ';' or '|' within the field")
    s.add_argument("--domain", default="sound", choices=["sound", "speech", "music"], help="marks speech rows")
    s.add_argument("--sample-rate", type=int, default=SR, help="the audio's sample rate")
    s.add_argument("--max-seconds", type=float, default=10.0, help="longest training segment in seconds")
    s.add_argument("--out", default="data/tasks", help="task root: <out>/tasks.json + <out>/<name>/<name>.tsv")
    a = p.parse_args(argv)
    if a.dataset == "csv":
        convert_csv(a.table, a.out, a.audio_root, a.name, a.metric, a.multilabel, a.domain, a.sample_rate,
                    a.max_seconds)
    elif a.dataset == "audioset":
        print(json.dumps(prepare(a.csv_dir, a.audio_dir, a.out), indent=1))
    else:
        CONVERTERS[a.dataset](a.src, a.out)

if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
