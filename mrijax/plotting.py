"""Figures: loss curves (paper Figs. 3, 9-11, 14), error maps (Fig. 15) and slice comparisons (Fig. 2)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curves(histories: dict, path, baseline_mse: float | None = None, baseline_label="MIMECS",
                     title: str | None = None) -> Path:
    """Train (dashed) and validation (solid) MSE per epoch for each named run; optional baseline line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for i, (name, rows) in enumerate(histories.items()):
        color = f"C{i}"
        epochs = [r["epoch"] + 1 for r in rows]
        ax.plot(epochs, [r["train_mse"] for r in rows], "--", color=color, label=f"{name} train")
        ax.plot(epochs, [r["val_mse"] for r in rows], "-", color=color, marker="o", ms=3, label=f"{name} validation")
    if baseline_mse is not None:
        ax.axhline(baseline_mse, color="k", ls=":", label=f"{baseline_label} (validation)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (normalised units)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _mid_slices(volume, centre):
    c = centre
    return [np.rot90(volume[:, :, c[2]]), np.rot90(volume[:, c[1], :]), np.rot90(volume[c[0], :, :])]


def plot_comparison(images: dict, mask, path, vmax: float = 1.0, error_of: str | None = None) -> Path:
    """Axial/coronal/sagittal slices through the brain centre, one column per named image (canonical RAS).

    With `error_of` = the name of the ground truth, the other images are shown as absolute error maps on a
    fixed 0-0.2 scale (paper Fig. 15).
    """
    centre = [int(np.mean(ix)) for ix in np.nonzero(mask)]
    names = list(images)
    fig, axes = plt.subplots(3, len(names), figsize=(2.2 * len(names), 6.6), dpi=110, squeeze=False)
    for j, name in enumerate(names):
        image = images[name]
        is_error = error_of is not None and name != error_of
        if is_error:
            image = np.abs(image - images[error_of]) * mask
        for i, sl in enumerate(_mid_slices(image, centre)):
            ax = axes[i, j]
            im = ax.imshow(sl, cmap="inferno" if is_error else "gray", vmin=0, vmax=0.2 if is_error else vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"|{name} - truth|" if is_error else name, fontsize=8)
    if error_of is not None:
        fig.colorbar(im, ax=axes[:, -1], fraction=0.05, label="absolute error")
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
