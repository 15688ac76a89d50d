"""`sgw model evaluate --plot FILE.png`: the evaluation report as one picture.

matplotlib is an optional extra (`pip install 'sgw[plot]'`, also in `[dev]`): nothing else in sgw needs
it, so a gateway or agent install does not carry it. Without it --plot fails with one line before any
work is done, and no file is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import LocalError


def require() -> Any:
    """matplotlib.pyplot with a non-interactive backend, or LocalError saying how to install it."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional extra, only for --plot
        mpl.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise LocalError("--plot needs matplotlib, which is not installed: pip install 'sgw[plot]'") from None
    return plt


def write(report: dict[str, Any], path: Path) -> None:
    """Left: the classifier's confusion matrix, each row normalised to its true label's windows, counts
    written in the cells. Right: the share of each label's judged windows the baseline forwarded."""
    plt = require()
    c = report["classifier"]
    rows, cols = list(c["confusion"]), list(c["labels"])
    counts = np.array([[c["confusion"][r][k] for k in cols] for r in rows], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    try:
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("answered")
        ax.set_ylabel("true label")
        bal = c["balanced_accuracy"]
        ax.set_title("classifier" + (f": balanced accuracy {bal:.1%}" if bal is not None else ""))
        for i in range(len(rows)):
            for j in range(len(cols)):
                if counts[i, j]:
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
        fwd = report["forwarded"]
        labels = list(fwd)
        bx.barh(range(len(labels)), [100 * fwd[k] for k in labels],
                color=["tab:green" if k == "healthy" else "tab:red" for k in labels])
        bx.set_yticks(range(len(labels)), labels)
        bx.invert_yaxis()
        bx.set_xlim(0, 100)
        bx.set_xlabel("% of judged windows forwarded")
        bx.axvline(100 * report["target"], color="grey", linestyle=":", label="target false-forward rate")
        bx.legend(loc="lower right", fontsize=8)
        bx.set_title(f"per-device baseline ({report['judged_windows']} windows judged)")
        fig.tight_layout()
        try:
            fig.savefig(path, format="png", dpi=100)
        except OSError as exc:
            raise LocalError(f"--plot {path}: cannot write: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
