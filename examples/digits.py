"""pomfx on real handwritten digits (scikit-learn's bundled ``load_digits``, no download).

A small BN CNN is trained twice with the same seed, epochs, schedule and hyperparameters:
once plain with ``torch.optim.SGD``, once converted with ``pomfx.convert(scheme="pio")`` and
trained with ``pomfx.FGSGD``. Both test errors are printed; the converted model is exported to
ONNX and checked with onnxruntime. Run: ``make demo`` (or ``python examples/digits.py``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import pomfx


@dataclass
class Config:
    epochs: int = 12
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """Digits as (N, 1, 8, 8) float tensors in [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def make_model() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def evaluate(model: nn.Module, data) -> float:
    """Test error in percent."""
    x, y = data
    model.eval()
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).sum().item()
    return 100.0 * wrong / len(y)


def train(model: nn.Module, optimizer_cls, data, cfg: Config, seed: int, on_epoch=None) -> nn.Module:
    """Train with a cosine schedule; ``pomfx.update_scales`` at the end of each epoch."""
    (x, y), test = data
    opt = optimizer_cls(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        pomfx.update_scales(model)
        if on_epoch is not None:
            on_epoch(epoch, model, total / len(x))
    return model


def run_pair(seed: int, cfg: Config, data=None, **convert_kwargs) -> tuple[float, float, nn.Module]:
    """(plain SGD test error, pomfx FGSGD test error, trained converted model) for one seed."""
    data = data or load_digits_split(seed)
    torch.manual_seed(seed)
    base = make_model()
    plain = train(_copy(base), torch.optim.SGD, data, cfg, seed)
    converted = pomfx.convert(base, **{"scheme": "pio", "seed": seed, **convert_kwargs})
    converted = train(converted, pomfx.FGSGD, data, cfg, seed)
    return evaluate(plain, data[1]), evaluate(converted, data[1]), converted


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=Config.epochs)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = Config(epochs=args.epochs)
    t0 = time.time()
    print(f"digits: plain SGD vs pomfx (pio, sp+ob+st) + FGSGD, {cfg.epochs} epochs, cosine lr {cfg.lr}, "
          f"momentum {cfg.momentum}, weight decay {cfg.weight_decay}")
    plain_err, pom_err = [], []
    for seed in range(args.seeds):
        data = load_digits_split(seed)
        p, c, model = run_pair(seed, cfg, data)
        plain_err.append(p)
        pom_err.append(c)
        print(f"  seed {seed}: test error plain SGD {p:5.2f} %   pomfx FGSGD {c:5.2f} %")
    mean = statistics.mean
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    print(f"mean test error: plain SGD {mean(plain_err):.2f} ± {sd(plain_err):.2f} %   "
          f"pomfx FGSGD {mean(pom_err):.2f} ± {sd(pom_err):.2f} %")
    print(f"constraint error after training: {max(pomfx.constraint_error(model).values()):.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = pomfx.export_onnx(model, args.out / "digits_pomfx.onnx", (data[1][0][:16],))
    print(f"ONNX export verified with onnxruntime: {report}")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
