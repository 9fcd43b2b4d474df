"""The loss plot: training and validation loss against epochs, with tokens seen on a second axis.

    plot_losses(history, "runs/verdict/loss.png")
    plot_values(epochs, tokens_seen, train_accuracy, val_accuracy, "accuracy.png", label="accuracy")

As in *LLMs from Scratch* (figure 5.12): when the validation curve flattens while the training
curve keeps falling, the model has started to memorise the training text rather than learn
language -- expected here, with 5,000 tokens and 124M parameters.

Drawn with matplotlib's Agg canvas directly (no pyplot), so it works without a display and
does not change the backend of a notebook that imports it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import GPT2Error


def plot_losses(history, path, title: str | None = None) -> Path:
    """Save the loss curves of a History (or a dict with epochs, tokens_seen, train_losses and
    val_losses lists) as a PNG at `path`; returns the path."""
    h = history if isinstance(history, dict) else history.to_dict()
    return plot_values(h["epochs"], h["tokens_seen"], h["train_losses"], h["val_losses"], path,
                       label="loss", title=title)


def plot_values(epochs, seen, train, val, path, label: str = "loss", seen_label: str = "Tokens seen",
                title: str | None = None) -> Path:
    """Training and validation values of one quantity (the book's plot_values: loss, accuracy,
    reward margin) against epochs, with `seen` (tokens, examples) on a second axis; a PNG at
    `path`, whose path is returned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    if not epochs:
        raise GPT2Error("no evaluations to plot (the run was shorter than --eval-every steps)")

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax1 = fig.add_subplot()
    ax1.plot(epochs, train, label=f"Training {label}")
    ax1.plot(epochs, val, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label[:1].upper() + label[1:])
    ax1.legend(loc="best" if label != "loss" else "upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    # A second x-axis on top, sharing the y-axis: the same points placed by tokens seen. The
    # invisible plot only sets its limits so the two axes line up.
    ax2 = ax1.twiny()
    ax2.plot(seen, train, alpha=0)
    ax2.set_xlabel(seen_label)
    if title:
        fig.suptitle(title)   # above the top axis's label (an axes title would collide with it)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
