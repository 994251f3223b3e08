"""The embedded demo: synthetic dice, a small CNN trained in the C++ core, test accuracy.

Run with ``make demo`` or ``python -m dicebox.demo``; it needs no download and no setup.
"""

from __future__ import annotations

import sys
import time

import dicebox

DEMO_GENOME = {
    "optimizer": {"name": "adam", "learning_rate": 0.002},
    "layers": [
        {"type": "conv2d", "filters": 16, "kernel": [3, 3], "padding": "same", "activation": "relu"},
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "conv2d", "filters": 32, "kernel": [3, 3], "padding": "same", "activation": "relu"},
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "dropout", "rate": 0.25},
        {"type": "dense", "size": 64, "activation": "relu"},
    ],
}


def main(count: int = 3000, size: int = 32, epochs: int = 12) -> int:
    started = time.monotonic()
    dice = dicebox.datasets.make_dice(count=count, size=size, seed=0)
    train, val, test = dice.split([0.8, 0.1, 0.1], seed=0)
    print(f"dice: {len(dice)} images {size}x{size}, categories {dice.categories}; "
          f"train {len(train)}, validation {len(val)}, test {len(test)}")

    def progress(record: dict) -> None:
        print(f"  epoch {record['epoch']:2d}  loss {record['loss']:.3f}  "
              f"val_accuracy {record['val_accuracy']:.3f}  {record['samples_per_second']:.0f} samples/s")

    model = dicebox.train(DEMO_GENOME, train, val=val, epochs=epochs, batch_size=64, patience=4,
                          augment=0.3, seed=0, callback=progress)
    metrics = model.evaluate(test)
    print(f"test accuracy {metrics['accuracy']:.4f} (macro F1 {metrics['f1']:.4f}) "
          f"after {len(model.history)} epochs, {time.monotonic() - started:.1f} s in all")
    new = dicebox.datasets.make_dice(count=6, size=size, seed=12345)
    guesses = model.classify(new.images)
    truth = [new.categories[i] for i in new.labels]
    print("new dice:", ", ".join(f"{t}->{g}" for t, g in zip(truth, guesses)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
