"""A tiny LightningModule and data for the Lightning front end's tests (CPU, a second each)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Tiny(pl.LightningModule):
    """Linear -> BatchNorm -> Linear regression; logs ``val/loss`` and returns it."""

    def __init__(self, lr: float = 0.1, dtype: torch.dtype = torch.float32, momentum: float = 0.9):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).to(dtype)
        self.lr, self.momentum = lr, momentum
        self.val_outputs: list[float] = []

    def forward(self, x):
        return self.model(x.to(next(self.parameters()).dtype))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y)
        self.log("val/loss", loss)
        return loss

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def data(n: int = 64, batch: int = 8, seed: int = 0, noise: float = 0.1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + noise * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, num_sanity_val_steps=0, deterministic=True)
    options.update(kwargs)
    return pl.Trainer(**options)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers by name, detached copies (what an EMA tracks)."""
    out = {n: p.detach().clone() for n, p in module.named_parameters()}
    out.update({n: b.detach().clone() for n, b in module.named_buffers()})
    return out


class Recorder(pl.Callback):
    """The weights after every optimizer step (``trainer.global_step`` moved), independently
    of the EMA callback."""

    def __init__(self):
        self.start: dict[str, torch.Tensor] = {}
        self.after_step: list[dict[str, torch.Tensor]] = []
        self._seen = 0

    def on_fit_start(self, trainer, pl_module):
        self.start = weights(pl_module)
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._seen:
            self._seen = trainer.global_step
            self.after_step.append(weights(pl_module))


def reference_ema(start: dict, history: list[dict], decay: float, every: int = 1,
                  begin: int = 0) -> dict[str, torch.Tensor]:
    """``ema = d * ema + (1 - d) * w`` per tensor in float64, a plain loop (integers copied);
    with ``every`` N, only at steps N, 2N, ... after ``begin`` and with ``d ** N`` (the same
    horizon); up to step ``begin`` the EMA is a copy of the weights."""
    ema = {n: t.double() if t.is_floating_point() else t.clone() for n, t in start.items()}
    d = decay**every
    for step, w in enumerate(history, 1):
        if step > begin and (step - begin) % every:
            continue
        keep = d if step > begin else 0.0
        for n, t in w.items():
            ema[n] = keep * ema[n] + (1 - keep) * t.double() if t.is_floating_point() else t
    return ema
