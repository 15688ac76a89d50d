"""`sgw model evaluate --data FILE`: how the edge design does on a user's own labelled recordings;
`sgw model import-csv`: a CSV recording into the native .npz. Formats: gateway/inference/dataset.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cli import plot
from gateway.core import baseline
from gateway.errors import LocalError
from gateway.inference import dataset, features, load_model, training
from gateway.inference.dataset import Dataset, load, load_csv
from gateway.inference.decision import UNKNOWN, Gate, decide


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("model", help="evaluate the edge models on your own labelled recordings",
                              description="Model tools. Data format: gateway/inference/dataset.py.")
    sub = p.add_subparsers(title="model commands", metavar="SUBCOMMAND")
    e = sub.add_parser("evaluate", help="forward rates after per-machine commissioning, classifier recall",
                       description="Per machine: commission on its first --commission healthy windows (file "
                                   "order), then judge every later window. Prints forwarded fraction per "
                                   "label, per-class recall and the confusion matrix of the classifier "
                                   "(gated by the baseline's verdict where judged, as in service).")
    e.add_argument("--data", type=Path, required=True,
                   help=".npz with windows, labels, machine_ids, or a .csv (format: sgw model import-csv -h)")
    e.add_argument("--commission", type=int, default=300, help="healthy windows per machine to learn from")
    e.add_argument("--target", type=float, default=0.01, help="target false-forward rate (default 0.01)")
    e.add_argument("--manifest", type=Path, default=None, help="model manifest (default: the shipped one)")
    e.add_argument("--plot", type=Path, default=None, metavar="FILE.png",
                   help="also draw the confusion matrix and forward rates (needs the plot extra: matplotlib)")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=evaluate)
    c = sub.add_parser("import-csv", help="convert a CSV recording into the .npz that --data reads",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="CSV format:\n" + _csv_format())
    c.add_argument("csv", type=Path, help="input .csv")
    c.add_argument("out", type=Path, help="output .npz (refused if it exists, unless --force)")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=import_csv)
    t = sub.add_parser("train", help="retrain the model set from your recordings (needs the train extra)",
                       description=training.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", type=Path, required=True, help=".npz or .csv, as for evaluate")
    t.add_argument("--out", type=Path, required=True,
                   help="folder for the model files and manifest.json (use it with --manifest)")
    t.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    t.add_argument("--seed", type=int, default=1, help="training seed (default 1)")
    t.add_argument("--unknown-budget", type=float, default=0.01,
                   help="share of known-fault windows of calibration machines allowed to be unknown")
    t.add_argument("--hold-out", action="append", default=[], metavar="LABEL",
                   help="a fault label not to train on (repeatable): how is an unseen fault type answered?")
    t.add_argument("--version", default="user-1", help="model version (names the files; default user-1)")
    t.add_argument("--force", action="store_true", help="replace a classifier/prefilter already in --out")
    t.add_argument("--json", action="store_true", help="machine-readable output")
    t.set_defaults(func=train)

    def usage(_args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2
    p.set_defaults(func=usage)


def _csv_format() -> str:
    """The CSV part of the format's one description (gateway/inference/dataset.py), for --help."""
    doc = dataset.__doc__ or ""
    return doc[doc.find(".csv (`load_csv`"):].strip()


def summary(ds: Dataset) -> dict[str, Any]:
    labels, counts = np.unique(ds.labels, return_counts=True)
    return {"windows": len(ds.labels), "machines": len(set(ds.machine_ids.tolist())),
            "labels": {str(k): int(n) for k, n in zip(labels, counts, strict=True)},
            "dropped_samples": ds.dropped_samples}


def import_csv(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise LocalError(f"{args.out} exists; pass --force to replace it")
    ds = load_csv(args.csv)
    tmp = args.out.with_name(args.out.name + ".tmp")
    ds.save(tmp)
    tmp.replace(args.out)  # a half-written file never has the output's name
    s = {"out": str(args.out), **summary(ds)}
    if args.json:
        print(json.dumps(s, indent=1))  # noqa: T201 - CLI output
    else:
        print(f"{s['windows']} windows from {s['machines']} machines written to {args.out} "  # noqa: T201
              f"({', '.join(f'{k} {n}' for k, n in s['labels'].items())}; "
              f"{s['dropped_samples']} samples in no whole window dropped)")
    return 0


def train(args: argparse.Namespace) -> int:
    from gateway.inference import keras_models  # noqa: PLC0415 - the optional train extra

    existing = args.out / "manifest.json"
    if existing.exists() and not args.force:
        raise LocalError(f"{existing} exists; pass --force to replace its classifier and prefilter")
    keras_models.load_tf()  # before any work: a missing extra fails fast and writes nothing
    ds = load(args.data)
    opts = training.Options(out=args.out, epochs=args.epochs, seed=args.seed, version=args.version,
                            unknown_budget=args.unknown_budget, data_name=str(args.data),
                            hold_out=tuple(args.hold_out))
    quiet = args.json

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)  # noqa: T201 - progress of a minutes-long command

    r = training.train(ds, opts, progress=say)
    if args.json:
        print(json.dumps(r, indent=1))  # noqa: T201 - CLI output
        return 0
    q = r["report_machines"]
    bal = q["classifier"]["balanced_accuracy"]
    m = r["machines"]

    def rates(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.1%}" for k, v in d.items())
    out = [f"wrote and verified classifier ({', '.join(r['labels'])} + unknown) and prefilter in {r['out']}",
           (f"machines: train {', '.join(m['train'])}; calibration {', '.join(m['calibrate'])}; "
            f"report {', '.join(m['report'])}"),
           (f"on the report machines ({q['classifier']['report_windows']} windows, classifier alone): "
            f"balanced accuracy {bal:.1%}" if bal is not None else "no report windows"),
           "  unknown: " + rates(q["classifier"]["unknown_rate"]),
           "  prefilter forwarded: " + rates(q["prefilter"]["forwarded"]),
           f"evaluate with: sgw model evaluate --manifest {r['manifest']} --data {args.data}"]
    if r["not_learned"]:
        out.insert(1, "not learned (only on calibration/report machines): " + ", ".join(r["not_learned"]))
    print("\n".join(out))  # noqa: T201 - CLI output
    return 0


def report(ds: Dataset, *, commission: int, target: float, manifest: Path | None) -> dict[str, Any]:
    if commission < 20:
        raise LocalError("--commission: must be at least 20 windows")
    fwd: dict[str, list[bool]] = {}
    skipped: list[str] = []
    judged = np.zeros(len(ds.labels), dtype=bool)
    gates: list[Gate] = [None] * len(ds.labels)  # as in service: the machine's baseline says normal or fault
    for mid in sorted(set(ds.machine_ids.tolist())):
        idx = np.nonzero(ds.machine_ids == mid)[0]
        healthy = idx[ds.labels[idx] == "healthy"]
        if healthy.size < commission:
            skipped.append(mid)
            continue
        learn = healthy[:commission]
        rest = idx[idx > learn[-1]]
        b = baseline.fit(features.extract_for_baseline(ds.windows[learn]), features.ORDER_SET,
                         target_rate=target)
        d = b.distance(features.extract_for_baseline(ds.windows[rest])) if rest.size else np.zeros(0)
        for i, lab, flag in zip(rest, ds.labels[rest], d > b.threshold, strict=True):
            fwd.setdefault(str(lab), []).append(bool(flag))
            gates[i] = "anomaly" if flag else "normal"
        judged[rest] = True
    clf = load_model("classifier", manifest=manifest, accelerator="cpu")
    names = list(clf.labels)  # its learned classes, then "unknown" if it has an open-set rule
    # the classifier's labels first in its order, then labels it does not know
    rows = sorted(set(ds.labels.tolist()),
                  key=lambda s: (s not in names, names.index(s) if s in names else 0, s))
    pred = np.asarray(decide(names, clf.predict(ds.windows), gates))
    confusion = {r: {c: int(((ds.labels == r) & (pred == k)).sum()) for k, c in enumerate(names)}
                 for r in rows}
    # an `unknown` answer counts as a miss for a known class, and as right for a label it never learned
    recall = {r: confusion[r][r] / max(1, sum(confusion[r].values())) for r in rows
              if r in names and r != UNKNOWN}
    unknown_rate = {r: confusion[r].get(UNKNOWN, 0) / max(1, sum(confusion[r].values())) for r in rows}
    return {"data_windows": len(ds.labels), "machines": len(set(ds.machine_ids.tolist())),
            "machines_skipped_too_few_healthy": skipped, "commission_windows": commission, "target": target,
            "judged_windows": int(judged.sum()),
            "forwarded": {lab: float(np.mean(v)) for lab, v in sorted(fwd.items())},
            "classifier": {"labels": names, "per_class_recall": recall,
                           "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else None,
                           "unknown_rate": unknown_rate, "confusion": confusion}}


def evaluate(args: argparse.Namespace) -> int:
    if args.plot is not None:
        plot.require()  # before any work: a missing extra fails fast and writes nothing
    r = report(load(args.data), commission=args.commission, target=args.target, manifest=args.manifest)
    if args.plot is not None:
        plot.write(r, args.plot)
    if args.json:
        print(json.dumps(r, indent=1))  # noqa: T201 - CLI output
        return 0
    out = [(f"{r['data_windows']} windows from {r['machines']} machines; {r['judged_windows']} judged after "
            f"commissioning on {r['commission_windows']} healthy windows each (target {r['target']:.1%})")]
    if r["machines_skipped_too_few_healthy"]:
        out.append("skipped (too few healthy windows): " + ", ".join(r["machines_skipped_too_few_healthy"]))
    out.append("forwarded by the per-device baseline:")
    out += [f"  {lab:<14} {v:7.2%}" for lab, v in r["forwarded"].items()]
    c = r["classifier"]
    out.append(f"classifier: balanced accuracy {c['balanced_accuracy'] or 0:.2%} over its labels present "
               "(judged windows gated by their machine's baseline, as in service)")
    if UNKNOWN in c["labels"]:
        out.append("  reported unknown: " + ", ".join(f"{r} {v:.1%}" for r, v in c["unknown_rate"].items()))
    out.append("  confusion (rows: true label, columns: predicted): " + " ".join(c["labels"]))
    out += [f"  {row:<14} " + " ".join(f"{n:>6d}" for n in cols.values())
            for row, cols in c["confusion"].items()]
    print("\n".join(out))  # noqa: T201 - CLI output
    return 0
