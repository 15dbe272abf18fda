"""BatchNorm on an MLP 64-48-24-10 (scikit-learn's 8x8 digits).

Trains the same MLP without and with BatchNorm1d+ReLU from the same initial
weights and shows (1) training loss per epoch, (2) how the input of a hidden
unit in the last hidden layer is distributed over training (15th/50th/85th
percentiles, as in Ioffe & Szegedy 2015, Fig. 1). The BatchNorm network is
written with PyTorch's nn.BatchNorm1d + nn.ReLU and converted with
fused_bn.convert_model (BatchNormReLU1d); the unconverted PyTorch network is
trained too, to show that the fused modules train exactly like PyTorch's.

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

LEARNING_RATE = 0.02
LOSS_TARGET = 0.1
WATCHED_UNIT = 0  # unit of the 24-wide hidden layer whose input is tracked
PERCENTILES = (0.15, 0.50, 0.85)


def mlp(batch_norm_layers):
    def hidden(width_in, width_out):
        if batch_norm_layers:  # Linear bias is redundant before BatchNorm
            return [nn.Linear(width_in, width_out, bias=False), nn.BatchNorm1d(width_out), nn.ReLU()]
        return [nn.Linear(width_in, width_out), nn.ReLU()]

    return nn.Sequential(*hidden(64, 48), *hidden(48, 24), nn.Linear(24, 10))


class HiddenInputTracker:
    """Percentiles of the watched unit's nonlinearity input on a fixed batch, per step."""

    def __init__(self, model, monitor_batch):
        self.model, self.monitor_batch = model, monitor_batch
        self.history = []

    def nonlinearity_input(self):
        layers = list(self.model)
        last_linear = max(i for i, m in enumerate(layers[:-1]) if isinstance(m, nn.Linear))
        with torch.no_grad():
            h = nn.Sequential(*layers[: last_linear + 1])(self.monitor_batch)
            bn = layers[last_linear + 1]
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                # What the ReLU sees in training: normalized with the batch's statistics.
                h = batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        return h[:, WATCHED_UNIT]

    def __call__(self):
        self.history.append(torch.quantile(self.nonlinearity_input(), torch.tensor(PERCENTILES)))


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=40, quick_epochs=3)
    torch.manual_seed(args.seed)
    data = load_digits(args.seed)
    monitor_batch = data[2][:256]

    plain = mlp(batch_norm_layers=False)
    pytorch_bn = mlp(batch_norm_layers=True)
    copy_initial_weights(plain, pytorch_bn)
    fused, report = fused_bn.convert_model(pytorch_bn, return_report=True)
    print(report)

    histories, trackers = {}, {}
    for name, model in (("no BatchNorm", plain), ("fused BatchNormReLU1d", fused)):
        trackers[name] = HiddenInputTracker(model, monitor_batch)
        histories[name] = train_classifier(
            model, data, epochs=args.epochs, lr=LEARNING_RATE, seed=args.seed, name=name,
            on_step=trackers[name],
        )
    reference = train_classifier(
        copy.deepcopy(pytorch_bn), data, epochs=args.epochs, lr=LEARNING_RATE, seed=args.seed,
        name="PyTorch BatchNorm1d+ReLU",
    )

    print(f"\nepochs: {args.epochs}, SGD lr={LEARNING_RATE} momentum=0.9, batch 32")
    for name, history in histories.items():
        reached = first_epoch_below(history["loss"], LOSS_TARGET)
        print(
            f"{name:>22}: training loss < {LOSS_TARGET} at epoch {reached}, "
            f"final loss {history['loss'][-1]:.4f}, test accuracy {history['accuracy'][-1]:.3f}"
        )
    fused_losses = torch.tensor(histories["fused BatchNormReLU1d"]["loss"])
    difference = (fused_losses - torch.tensor(reference["loss"])).abs().max().item()
    print(f"fused vs PyTorch BatchNorm1d+ReLU: largest difference of epoch losses {difference:.2e}")
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
        axis.set(xlabel="training step", title=f"{name}: input of a hidden unit")
        axis.legend(title="percentile", fontsize=8)
    save_figure(figure, out_dir, "mlp_batchnorm.png")


if __name__ == "__main__":
    main()
