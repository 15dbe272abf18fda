"""BatchNorm in a small CNN (scikit-learn's 8x8 digits as 1x8x8 images).

Trains the same CNN without and with fused_bn.BatchNormReLU2d from the same
initial weights; plots training loss and test accuracy per epoch.

    python -m examples.cnn_batchnorm --out plots [--quick]
"""

import torch
from torch import nn

import fused_bn

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


def cnn(batch_norm_layers):
    def block(channels_in, channels_out):
        if batch_norm_layers:
            conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
            return [conv, fused_bn.BatchNormReLU2d(channels_out)]
        return [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def main():
    args = parse_args(__doc__.splitlines()[0], epochs=15, quick_epochs=2)
    torch.manual_seed(args.seed)
    data = load_digits(args.seed, image_shape=(1, 8, 8))
    plain, with_bn = cnn(batch_norm_layers=False), cnn(batch_norm_layers=True)
    copy_initial_weights(plain, with_bn)

    histories = {
        name: train_classifier(
            model, data, epochs=args.epochs, lr=LEARNING_RATE, seed=args.seed, name=name
        )
        for name, model in (("no BatchNorm", plain), ("fused BatchNormReLU2d", with_bn))
    }

    print(f"\nepochs: {args.epochs}, SGD lr={LEARNING_RATE} momentum=0.9, batch 32")
    for name, history in histories.items():
        reached = first_epoch_below(history["loss"], LOSS_TARGET)
        best = max(history["accuracy"])
        print(
            f"{name:>22}: training loss < {LOSS_TARGET} at epoch {reached}, final loss "
            f"{history['loss'][-1]:.4f}, test accuracy final {history['accuracy'][-1]:.3f} "
            f"best {best:.3f}"
        )

    plt = pyplot()
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, history in histories.items():
        epochs = range(1, len(history["loss"]) + 1)
        loss_axis.semilogy(epochs, history["loss"], label=name)
        accuracy_axis.plot(epochs, history["accuracy"], label=name)
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    accuracy_axis.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    loss_axis.legend()
    save_figure(figure, args.out, "cnn_batchnorm.png")


if __name__ == "__main__":
    main()
