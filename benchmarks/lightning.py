"""d2ema's Lightning callback beside Lightning's own ``EMAWeightAveraging``, in one run.

Speed and memory: the same LightningModule (an MLP of about 17M parameters, CPU) trained for the
same steps with validation after every epoch, in a fresh process per variant: no EMA,
``d2ema.lightning.EMA(decay, schedule="constant")`` and ``EMAWeightAveraging(decay=decay)``.
Each reports the time of the hook that updates the EMA (``on_train_batch_end``, median per step)
and the process's peak resident memory (``ru_maxrss``), less the no-EMA process's.

Accuracy: a noisy regression trained with a large step size; on a held-out test set, the
model that ``EMAWeightAveraging`` leaves at the same fixed decay against the one d2ema's
``PostHocEMA`` chose on a separate validation set (raw weights a candidate too).

Run (about a minute on 2 CPU cores)::

    OMP_NUM_THREADS=1 python benchmarks/lightning.py      # writes benchmarks/results/lightning.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# this file's folder first on the path would make `import lightning` import this file
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent / "src"))

DECAY = 0.999


def _module(width: int, depth: int, lr: float, inputs: int):
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = [nn.Linear(inputs, width), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
            self.net = nn.Sequential(*layers, nn.Linear(width, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self(x), y)
            self.log("val_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return MLP()


def _data(n: int, inputs: int, batch: int, seed: int, noise: float = 1.0):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(inputs, 1, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, inputs, generator=g)
    y = torch.tanh(x @ w / inputs**0.5) * 3 + noise * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _trainer(root: str, callbacks: list, epochs: int):
    import lightning.pytorch as pl

    return pl.Trainer(default_root_dir=root, accelerator="cpu", devices=1, max_epochs=epochs,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)


def _timed(callback, times: list[float]):
    hook = callback.on_train_batch_end

    def timed(*args, **kwargs):
        start = time.perf_counter()
        hook(*args, **kwargs)
        times.append(time.perf_counter() - start)

    callback.on_train_batch_end = timed
    return callback


def speed_variant(variant: str) -> dict:
    """One variant in this process: update time per step and peak memory."""
    import torch

    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from d2ema.lightning import EMA

    times: list[float] = []
    callbacks = {"none": [], "d2ema": [EMA(DECAY, schedule="constant", final="raw")],
                 "lightning": [EMAWeightAveraging(decay=DECAY)]}[variant]
    callbacks = [_timed(c, times) for c in callbacks]
    module = _module(width=2048, depth=4, lr=0.01, inputs=256)
    params = sum(p.numel() for p in module.parameters())
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        _trainer(root, callbacks, epochs=2).fit(module, _data(384, 256, 32, 0),
                                                 _data(64, 256, 32, 1))
        wall = time.perf_counter() - start
    held = 0
    for c in callbacks:
        if getattr(c, "ema", None) is not None:
            held = c.ema.num_bytes
        elif getattr(c, "_average_model", None) is not None:
            avg = c._average_model
            held = sum(t.numel() * t.element_size()
                       for t in [*avg.parameters(), *avg.buffers()])
    return {"ema_mb": held / 2**20, "variant": variant, "params": params, "steps": len(times),
            "update_ms": 1e3 * statistics.median(times) if times else 0.0,
            "fit_s": wall, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def accuracy() -> dict:
    import torch

    torch.set_num_threads(1)
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from d2ema.lightning import PostHocEMA

    inputs = 32
    train, val, test = (_data(n, inputs, 16, s, noise=1.0) for n, s in
                        ((4096, 0), (512, 1), (4096, 2)))

    def test_loss(m) -> float:
        m.eval()
        with torch.no_grad():
            return statistics.fmean(torch.nn.functional.mse_loss(m(x), y).item()
                                    for x, y in test)

    out = {}
    with tempfile.TemporaryDirectory() as root:
        m = _module(width=128, depth=3, lr=0.05, inputs=inputs)
        _trainer(root, [], epochs=2).fit(m, train)
        out["raw weights"] = test_loss(m)
        m = _module(width=128, depth=3, lr=0.05, inputs=inputs)
        _trainer(root, [EMAWeightAveraging(decay=DECAY)], epochs=2).fit(m, train)
        out[f"EMAWeightAveraging, decay {DECAY}"] = test_loss(m)
        m = _module(width=128, depth=3, lr=0.05, inputs=inputs)
        ph = PostHocEMA(Path(root) / "snap", snapshot_every=32, select_on=val,
                        monitor="val_loss", validate_both=False)
        _trainer(root, [ph], epochs=2).fit(m, train)
        out[f"d2ema PostHocEMA, chosen on validation: {ph.choice}"] = test_loss(m)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["none", "d2ema", "lightning"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lightning.md")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(speed_variant(args.variant)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    load = os.getloadavg()[0]
    runs = {}
    for variant in ("none", "d2ema", "lightning"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant], env=env,
                              capture_output=True, text=True, check=True)
        runs[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    acc = accuracy()
    import lightning
    import torch

    base = runs["none"]["peak_mb"]
    d2, lt = runs["d2ema"], runs["lightning"]
    lines = [
        "# d2ema's Lightning callback vs Lightning's EMAWeightAveraging",
        "",
        f"`OMP_NUM_THREADS={env['OMP_NUM_THREADS']} python benchmarks/lightning.py`; torch "
        f"{torch.__version__}, lightning {lightning.__version__}, {platform.processor() or 'CPU'}, "
        f"1 thread. The same MLP ({d2['params'] / 1e6:.1f}M parameters, BatchNorm), "
        f"{d2['steps']} optimizer steps, validation after each of 2 epochs, decay {DECAY}, "
        f"a fresh process per variant; {os.cpu_count()} cores, load average {load:.1f} at the "
        "start (a shared machine: wall times move by a second from run to run, the per-step "
        "medians much less).",
        "",
        "| | update per step (median) | peak memory over no EMA | EMA storage | fit() wall time |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| no EMA | - | - | - | {runs['none']['fit_s']:.1f} s |",
        f"| d2ema.lightning.EMA | {d2['update_ms']:.2f} ms | {d2['peak_mb'] - base:+.0f} MB | "
        f"{d2['ema_mb']:.0f} MB | {d2['fit_s']:.1f} s |",
        f"| EMAWeightAveraging | {lt['update_ms']:.2f} ms | {lt['peak_mb'] - base:+.0f} MB | "
        f"{lt['ema_mb']:.0f} MB | {lt['fit_s']:.1f} s |",
        f"| ratio EMAWeightAveraging / d2ema | {lt['update_ms'] / d2['update_ms']:.2f}x | "
        f"{(lt['peak_mb'] - base) / max(d2['peak_mb'] - base, 1e-9):.2f}x | "
        f"{lt['ema_mb'] / d2['ema_mb']:.2f}x | {lt['fit_s'] / d2['fit_s']:.2f}x |",
        "",
        f"One fp32 copy of the model is {d2['params'] * 4 / 2**20:.0f} MB; peak memory is the "
        "process's ru_maxrss, so it also shows freed memory reused. d2ema validates raw "
        "and EMA weights (two passes, the EMA swapped in without a copy); EMAWeightAveraging "
        "validates the average only, swapping it in tensor by tensor through a temporary clone.",
        "",
        "## Accuracy: post-hoc choice vs a fixed decay",
        "",
        "Noisy regression (MLP, SGD lr 0.05 momentum 0.9, 512 steps); mean squared error on a "
        "held-out test set that neither run saw; PostHocEMA chose its length on a separate "
        "validation set (raw weights a candidate).",
        "",
        "| model at the end of fit() | test MSE |",
        "| --- | ---: |",
        *[f"| {k} | {v:.4f} |" for k, v in acc.items()],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
