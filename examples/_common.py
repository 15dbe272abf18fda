"""What the examples share: command line, data, progress bars, training loop, plots."""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F


def parse_args(description, epochs, quick_epochs):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default="example-out", help="folder for the PNG plots")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--quick", action="store_true", help=f"{quick_epochs} epochs (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.epochs = quick_epochs
    os.makedirs(args.out, exist_ok=True)
    return args


def progress(iterable, description):
    """tqdm when it is installed, else one line per tenth of the way."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(iterable, description)
    return tqdm(iterable, desc=description, leave=True, dynamic_ncols=True)


class _PlainProgress:
    def __init__(self, iterable, description):
        self.items = list(iterable)
        self.description = description
        self.postfix = ""

    def set_postfix_str(self, text):
        self.postfix = text

    def __iter__(self):
        start, total = time.perf_counter(), len(self.items)
        for index, item in enumerate(self.items):
            yield item
            if (index + 1) % max(1, total // 10) == 0 or index + 1 == total:
                elapsed = time.perf_counter() - start
                print(f"{self.description}: {index + 1}/{total} [{elapsed:.1f}s] {self.postfix}")
                sys.stdout.flush()


def load_digits(seed, image_shape=(64,)):
    """scikit-learn's bundled 8x8 digits (no download): pixel values scaled to [0, 1].

    Returns (x_train, y_train, x_test, y_test), a seeded 75/25 split.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).div_(16).view(-1, *image_shape)
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = len(y) * 3 // 4
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def batches(x, y, batch_size, generator):
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def train_classifier(model, data, *, epochs, lr, seed, name, batch_size=32, on_step=None):
    """SGD with momentum; returns per-epoch mean training loss and test accuracy."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    history = {"loss": [], "accuracy": []}
    bar = progress(range(epochs), name)
    for _ in bar:
        total = 0.0
        for x, y in batches(x_train, y_train, batch_size, generator):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            if on_step is not None:
                on_step()
        history["loss"].append(total / len(y_train))
        history["accuracy"].append(accuracy(model, x_test, y_test))
        bar.set_postfix_str(f"loss {history['loss'][-1]:.3f} acc {history['accuracy'][-1]:.3f}")
    return history


def first_epoch_below(losses, threshold):
    """1-based epoch at which the loss first drops below threshold, or None."""
    return next((epoch for epoch, loss in enumerate(losses, 1) if loss < threshold), None)


def copy_initial_weights(source, target):
    """Give target's Linear/Conv layers source's initial weights (biases differ: with
    BatchNorm the layers before it have none)."""
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    sources = [m for m in source.modules() if isinstance(m, layers)]
    targets = [m for m in target.modules() if isinstance(m, layers)]
    for mine, theirs in zip(targets, sources, strict=True):
        mine.weight.data.copy_(theirs.weight.data)


def save_figure(figure, out_dir, name):
    path = os.path.join(out_dir, name)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
