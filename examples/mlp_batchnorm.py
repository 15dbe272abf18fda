"""BatchNorm on an MLP 64-48-24-10 (scikit-learn's 8x8 digits).

Trains the same MLP without and with BatchNorm1d+ReLU from the same initial
weights and shows (1) training loss per epoch, (2) how the input of a hidden
unit in the last hidden layer is distributed over training (15th/50th/85th
percentiles, as in Ioffe & Szegedy 2015, Fig. 1). The BatchNorm network is
written with PyTorch's nn.BatchNorm1d + nn.ReLU and converted with
fused_bn.convert_model (BatchNormReLU1d). Both versions are also trained for a
few epochs in float64, to show that the fused modules train exactly like
PyTorch's (in float32, rounding differences grow over many SGD steps, as they
do between any two implementations).

    python -m examples.mlp_batchnorm --out plots [--quick]
"""

import copy

import torch
from torch import nn

import fused_bn
from fused_bn.functional import batch_norm

from ._common import (
    copy_initial_weights,
    first_epoch_below,
    load_digits,
    parse_args,
    pyplot,
    save_figure,
    train_classifier,
)

LEARNING_RATE = 0.01
LOSS_TARGET = 0.1
WATCHED_UNIT = 0  # unit of the 24-wide hidden layer whose input is tracked
TRACK_EVERY = 5  # training steps
EQUALITY_EPOCHS = 3  # fused vs PyTorch modules, in float64
PERCENTILES = (0.15, 0.50, 0.85)


def mlp(batch_norm_layers):
    def hidden(width_in, width_out):
        if batch_norm_layers:  # Linear bias is redundant before BatchNorm
            return [
                nn.Linear(width_in, width_out, bias=False), nn.BatchNorm1d(width_out), nn.ReLU()
            ]
        return [nn.Linear(width_in, width_out), nn.ReLU()]

    return nn.Sequential(*hidden(64, 48), *hidden(48, 24), nn.Linear(24, 10))


class HiddenInputTracker:
    """Percentiles of the watched unit's nonlinearity input on a fixed batch, per step."""

    def __init__(self, model, monitor_batch):
        self.model, self.monitor_batch = model, monitor_batch
        self.history = []
        self.steps = 0

    def nonlinearity_input(self):
        layers = list(self.model)
        last_linear = max(i for i, m in enumerate(layers[:-1]) if isinstance(m, nn.Linear))
        # A copy in training mode: BN layers normalize with the monitor batch's statistics,
        # as in training, without touching the model's running statistics.
        prefix = copy.deepcopy(nn.Sequential(*layers[: last_linear + 1]))
        with torch.no_grad():
            h = prefix(self.monitor_batch)
            bn = layers[last_linear + 1]
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                # What the ReLU sees: the fused module does not expose it, so compute it.
                h = batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        return h[:, WATCHED_UNIT]

    def __call__(self):
        self.steps += 1
        if self.steps % TRACK_EVERY == 1:
            self.history.append(
                torch.quantile(self.nonlinearity_input(), torch.tensor(PERCENTILES))
            )


def largest_loss_difference(pytorch_model, fused_model, data, epochs, seed):
    """Train float64 copies of both from the same state; largest difference of epoch losses."""
    data = [t.double() if t.is_floating_point() else t for t in data]
    losses = [
        train_classifier(
            copy.deepcopy(model).double(), data, epochs=epochs, lr=LEARNING_RATE, seed=seed,
            name=f"float64 {name}",
        )["loss"]
        for name, model in (("PyTorch BatchNorm1d+ReLU", pytorch_model), ("fused", fused_model))
    ]
    return (torch.tensor(losses[0]) - torch.tensor(losses[1])).abs().max().item()


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=30, quick_epochs=2)
    torch.manual_seed(args.seed)
    data = load_digits(args.seed)
    monitor_batch = data[2][:256]

    plain = mlp(batch_norm_layers=False)
    pytorch_bn = mlp(batch_norm_layers=True)
    copy_initial_weights(plain, pytorch_bn)
    fused, report = fused_bn.convert_model(pytorch_bn, return_report=True)
    print(report)

    equality_epochs = min(EQUALITY_EPOCHS, args.epochs)
    difference = largest_loss_difference(pytorch_bn, fused, data, equality_epochs, args.seed)
    histories, trackers = {}, {}
    for name, model in (("no BatchNorm", plain), ("fused BatchNormReLU1d", fused)):
        trackers[name] = HiddenInputTracker(model, monitor_batch)
        histories[name] = train_classifier(
            model, data, epochs=args.epochs, lr=LEARNING_RATE, seed=args.seed, name=name,
            on_step=trackers[name],
        )

    print(f"\nepochs: {args.epochs}, SGD lr={LEARNING_RATE} momentum=0.9, batch 32")
    for name, history in histories.items():
        reached = first_epoch_below(history["loss"], LOSS_TARGET)
        print(
            f"{name:>22}: training loss < {LOSS_TARGET} at epoch {reached}, "
            f"final loss {history['loss'][-1]:.4f}, test accuracy {history['accuracy'][-1]:.3f}"
        )
    print(
        f"fused vs PyTorch BatchNorm1d+ReLU, float64, {equality_epochs} epochs: "
        f"largest difference of epoch losses {difference:.1e}"
    )
    for name, tracker in trackers.items():
        spread = torch.stack(tracker.history)
        print(
            f"{name:>22}: watched unit's input, median first/last step "
            f"{spread[0, 1]:+.3f}/{spread[-1, 1]:+.3f}, 15-85% range first/last step "
            f"{spread[0, 2] - spread[0, 0]:.3f}/{spread[-1, 2] - spread[-1, 0]:.3f}"
        )
    plot(histories, trackers, args.out)


def plot(histories, trackers, out_dir):
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, history in histories.items():
        axes[0].semilogy(range(1, len(history["loss"]) + 1), history["loss"], label=name)
    axes[0].axhline(LOSS_TARGET, color="gray", lw=0.8, ls=":")
    axes[0].set(xlabel="epoch", ylabel="training loss", title="Training loss")
    axes[0].legend()
    for axis, (name, tracker) in zip(axes[1:], trackers.items()):
        spread = torch.stack(tracker.history)
        for column, percentile in enumerate(PERCENTILES):
            axis.plot(spread[:, column], lw=1, label=f"{percentile:.0%}")
        axis.set(
            xlabel=f"training step / {TRACK_EVERY}", title=f"{name}:\nReLU input of a hidden unit"
        )
        axis.legend(title="percentile", fontsize=8)
    save_figure(figure, out_dir, "mlp_batchnorm.png")


if __name__ == "__main__":
    main()
