"""Dropout against overfitting: a small noisy 1-D regression (synthetic, seeded).

An MLP 1-256-256-1 is trained on 32 noisy samples of a sine, without and with
fused_bn.Dropout (p=0.5 after the first Linear+ReLU, p=0.2 after the second),
from the same initial weights. Plots training and test loss over the epochs (both
measured in eval mode) and the fitted functions.

    python -m examples.dropout_regression --out plots [--quick]
"""

import torch
import torch.nn.functional as F
from torch import nn

import fused_bn

from ._common import parse_args, progress, pyplot, save_figure

TRAIN_SAMPLES, TEST_SAMPLES, NOISE = 32, 1000, 0.3
WIDTH, LEARNING_RATE = 256, 3e-3
EVALUATE_EVERY = 5  # epochs


def noisy_sine(samples, generator):
    x = torch.rand(samples, 1, generator=generator) * 2 - 1
    return x, torch.sin(3 * x) + NOISE * torch.randn(samples, 1, generator=generator)


def mlp(dropout):
    def maybe_dropout(p):
        return [fused_bn.Dropout(p)] if dropout else []

    return nn.Sequential(
        nn.Linear(1, WIDTH), nn.ReLU(), *maybe_dropout(0.5),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(), *maybe_dropout(0.2),
        nn.Linear(WIDTH, 1),
    )  # fmt: skip


def evaluate(model, x, y):
    model.eval()
    with torch.no_grad():
        loss = F.mse_loss(model(x), y).item()
    model.train()
    return loss


def train(model, train_data, test_data, epochs, name):
    """Full-batch Adam; training and test loss every EVALUATE_EVERY epochs."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    history = {"epoch": [], "train": [], "test": []}
    bar = progress(range(1, epochs + 1), name)
    for epoch in bar:
        loss = F.mse_loss(model(train_data[0]), train_data[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if epoch % EVALUATE_EVERY == 0 or epoch == epochs:
            history["epoch"].append(epoch)
            history["train"].append(evaluate(model, *train_data))
            history["test"].append(evaluate(model, *test_data))
            bar.set_postfix_str(f"train {history['train'][-1]:.3f} test {history['test'][-1]:.3f}")
    return history


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=2000, quick_epochs=100)
    generator = torch.Generator().manual_seed(args.seed)
    train_data = noisy_sine(TRAIN_SAMPLES, generator)
    test_data = noisy_sine(TEST_SAMPLES, generator)
    torch.manual_seed(args.seed)
    without = mlp(dropout=False)
    with_dropout = mlp(dropout=True)
    linears = [[m for m in model if isinstance(m, nn.Linear)] for model in (without, with_dropout)]
    for source, target in zip(*linears):  # same initial weights
        target.load_state_dict(source.state_dict())

    models = {"no dropout": without, "fused_bn.Dropout": with_dropout}
    histories = {
        name: train(m, train_data, test_data, args.epochs, name) for name, m in models.items()
    }

    print(f"\n{TRAIN_SAMPLES} training samples, noise std {NOISE} (noise floor MSE {NOISE**2:.3f})")
    for name, history in histories.items():
        best = min(range(len(history["test"])), key=history["test"].__getitem__)
        print(
            f"{name:>16}: final train MSE {history['train'][-1]:.4f}, final test MSE "
            f"{history['test'][-1]:.4f} (best {history['test'][best]:.4f} "
            f"at epoch {history['epoch'][best]})"
        )
    plot(models, histories, train_data, args.out)


def plot(models, histories, train_data, out_dir):
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (name, history) in zip(axes[:2], histories.items()):
        axis.semilogy(history["epoch"], history["train"], label="train")
        axis.semilogy(history["epoch"], history["test"], label="test")
        axis.axhline(NOISE**2, color="gray", lw=0.8, ls=":", label="noise floor")
        axis.set(xlabel="epoch", ylabel="MSE", title=name)
        axis.legend()
    grid = torch.linspace(-1, 1, 400).unsqueeze(1)
    axes[2].scatter(*train_data, s=10, color="black", label="training samples")
    axes[2].plot(grid, torch.sin(3 * grid), color="gray", ls=":", label="sin(3x)")
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            axes[2].plot(grid, model(grid), label=name)
    axes[2].set(xlabel="x", title="Fitted functions")
    axes[2].legend(fontsize=8)
    save_figure(figure, out_dir, "dropout_regression.png")


if __name__ == "__main__":
    main()
