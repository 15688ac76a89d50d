"""`sgw model evaluate --data FILE`: how the edge design does on a user's own labelled recordings;
`sgw model import-csv`: a CSV recording into the native .npz. Formats: gateway/inference/dataset.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gateway.cli import model_deploy, model_fleet, model_release, model_rollout, plot
from gateway.errors import LocalError
from gateway.inference import dataset, evaluation, training
from gateway.inference.dataset import Dataset, load, load_csv
from gateway.inference.decision import UNKNOWN


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("model", help="evaluate, retrain, sign, verify and deploy the edge models",
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
    model_release.register(sub)
    model_deploy.register(sub)
    model_fleet.register(sub)
    model_rollout.register(sub)
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
    t.add_argument("--commission", type=int, default=300,
                   help="report machines: healthy windows each one's baseline learns from (as evaluate)")
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
                            hold_out=tuple(args.hold_out), commission=args.commission)
    quiet = args.json

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)  # noqa: T201 - progress of a minutes-long command

    r = training.train(ds, opts, progress=say)
    if args.json:
        print(json.dumps(r, indent=1))  # noqa: T201 - CLI output
        return 0
    m = r["machines"]
    out = [f"wrote and verified classifier ({', '.join(r['labels'])} + unknown) and prefilter in {r['out']}",
           (f"machines: train {', '.join(m['train'])}; calibration {', '.join(m['calibrate'])}; "
            f"report {', '.join(m['report'])}")]
    if r["not_learned"]:
        out.append("not learned (only on calibration/report machines): " + ", ".join(r["not_learned"]))
    q = r["report_machines"]
    if q:
        out.append("on the report machines, as in service:")
        out += ["  " + line for line in _evaluation_text(q["in_service"])]
        out.append("  the new global prefilter (agents that do not commission) forwards: "
                   + ", ".join(f"{k} {v:.1%}" for k, v in q["prefilter_forwarded"].items()))
    out.append(f"evaluate with: sgw model evaluate --manifest {r['manifest']} --data FILE")
    print("\n".join(out))  # noqa: T201 - CLI output
    return 0


def evaluate(args: argparse.Namespace) -> int:
    if args.plot is not None:
        plot.require()  # before any work: a missing extra fails fast and writes nothing
    r = evaluation.report(load(args.data), commission=args.commission, target=args.target,
                          manifest=args.manifest)
    if args.plot is not None:
        plot.write(r, args.plot)
    if args.json:
        print(json.dumps(r, indent=1))  # noqa: T201 - CLI output
        return 0
    print("\n".join(_evaluation_text(r)))  # noqa: T201 - CLI output
    return 0


def _evaluation_text(r: dict[str, Any]) -> list[str]:
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
    return out
