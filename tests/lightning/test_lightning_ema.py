"""The Lightning EMA callback: one update per optimizer step, fp32 master, both validations,
the chosen weights at the end of fit(), and the optional dependency."""

from __future__ import annotations

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from _tiny import Recorder, Tiny, data, reference_ema, trainer, weights
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from d2ema.errors import D2EMAError
from d2ema.lightning import EMA, LightningEMAError, ema_metric_name


def close(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for n in expected:
        if expected[n].is_floating_point():
            torch.testing.assert_close(actual[n].double(), expected[n].double(), rtol=0, atol=atol)
        else:
            assert torch.equal(actual[n], expected[n]), n


def test_accumulation_updates_once_per_optimizer_step(tmp_path):
    rec, ema = Recorder(), EMA(0.9, schedule="constant", final="raw")
    t = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=3, callbacks=[rec, ema],
                limit_val_batches=0)
    t.fit(Tiny(lr=0.02), data())  # 8 batches an epoch: steps after batches 3, 6, 8 (epoch end)
    assert t.global_step == len(rec.after_step) == 6
    assert ema.ema.step == 6
    close(ema.ema.tensors(), reference_ema(rec.start, rec.after_step, 0.9), atol=1e-6)


@pytest.mark.parametrize("options", [{"flat": True}, {"every": 2}, {"device": "cpu"},
                                     {"start": 5, "every": 3}])
def test_engine_options_pass_through(tmp_path, options):
    rec, ema = Recorder(), EMA(0.9, schedule="constant", final="raw", **options)
    t = trainer(tmp_path, max_epochs=2, callbacks=[rec, ema], limit_val_batches=0)
    t.fit(Tiny(lr=0.02), data())
    assert ema.ema.step == t.global_step == 16
    expected = reference_ema(rec.start, rec.after_step, 0.9, options.get("every", 1),
                             options.get("start", 0))
    close(ema.ema.tensors(), expected, atol=1e-6)


def test_a_second_fit_starts_a_new_ema(tmp_path):
    ema = EMA(0.9, schedule="constant")
    module = Tiny(lr=0.02)
    trainer(tmp_path, max_epochs=1, callbacks=[ema], limit_val_batches=0).fit(module, data())
    rec = Recorder()
    t = trainer(tmp_path, max_epochs=1, callbacks=[rec, ema], limit_val_batches=0)
    t.fit(module, data(seed=3))  # a new Trainer: a new run, from the weights fit() left
    assert ema.ema.step == t.global_step == 8
    expected = reference_ema(rec.start, rec.after_step, 0.9)
    close(weights(module), {n: v.float() if v.is_floating_point() else v
                            for n, v in expected.items()}, atol=1e-6)


class Manual(Tiny):
    """Manual optimization: one optimizer step every second batch."""

    def __init__(self):
        super().__init__(lr=0.02)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()


def test_manual_optimization_updates_per_optimizer_step(tmp_path):
    rec, ema = Recorder(), EMA(0.8, schedule="constant", final="raw")
    t = trainer(tmp_path, max_epochs=1, callbacks=[rec, ema], limit_val_batches=0)
    t.fit(Manual(), data())
    assert t.global_step == ema.ema.step == len(rec.after_step) == 4
    close(ema.ema.tensors(), reference_ema(rec.start, rec.after_step, 0.8), atol=1e-6)


def test_bf16_model_keeps_an_fp32_master(tmp_path):
    rec, ema = Recorder(), EMA(0.999, schedule="constant", final="raw")
    t = trainer(tmp_path, max_epochs=2, precision="bf16-true", callbacks=[rec, ema],
                limit_val_batches=0)
    module = Tiny(lr=0.05)
    t.fit(module, data())
    assert module.model[0].weight.dtype == torch.bfloat16
    tensors = ema.ema.tensors()
    assert tensors["model.0.weight"].dtype == torch.float32
    expected = reference_ema(rec.start, rec.after_step, 0.999)
    close(tensors, expected, atol=1e-6)
    # in bf16, (1 - d) * (w - ema) is below half an ulp: a bf16 EMA would not have moved
    moved = (expected["model.0.weight"] - rec.start["model.0.weight"].double()).abs().max()
    assert moved > 0


def test_both_validations_and_monitoring_the_ema(tmp_path):
    rec, ema = Recorder(), EMA(0.9, schedule="constant")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_ema/loss", mode="min")
    t = trainer(tmp_path, max_epochs=2, callbacks=[rec, ema, ckpt], enable_checkpointing=True,
                num_sanity_val_steps=2)  # the sanity check validates the raw weights only
    module = Tiny(lr=0.02)
    val = data(seed=1)
    t.fit(module, data(), val)
    raw_last = rec.after_step[-1]
    expected = reference_ema(rec.start, rec.after_step, 0.9)

    def loss_with(state):
        m = Tiny()
        with torch.no_grad():
            for n, v in m.named_parameters():
                v.copy_(state[n])
            for n, v in m.named_buffers():
                v.copy_(state[n])
        m.eval()
        with torch.no_grad():
            return sum(nn.functional.mse_loss(m(x), y).item() * len(x) for x, y in val) / 64

    metrics = t.callback_metrics
    assert metrics["val/loss"].item() == pytest.approx(loss_with(raw_last), rel=1e-5)
    assert metrics["val_ema/loss"].item() == pytest.approx(loss_with(expected), rel=1e-5)
    assert ckpt.best_model_path and ckpt.best_model_score is not None
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    close(saved["state_dict"], {k: raw_last[k] for k in saved["state_dict"]}, atol=0)  # raw
    # fit() ended: the model holds the EMA
    close(weights(module), {n: t.to(torch.float32) if t.is_floating_point() else t
                            for n, t in expected.items()}, atol=1e-6)


def test_final_raw_keeps_the_trained_weights_bit_exact(tmp_path):
    rec, ema = Recorder(), EMA(0.9, schedule="constant", final="raw")
    t = trainer(tmp_path, max_epochs=1, callbacks=[rec, ema])
    module = Tiny(lr=0.02)
    t.fit(module, data(), data(seed=1))
    close(weights(module), rec.after_step[-1], atol=0)
    out = t.validate(module, data(seed=1), verbose=False)[0]
    assert set(out) == {"val/loss", "val_ema/loss"}
    close(weights(module), rec.after_step[-1], atol=0)  # the swap gave them back
    assert set(t.test(module, data(seed=1), verbose=False)[0]) == {"val/loss", "val_ema/loss"}
    close(weights(module), rec.after_step[-1], atol=0)
    path = ema.export(tmp_path / "ema.pth")
    exported = torch.load(path, weights_only=True)
    close(exported, {n: v.to(torch.float32) if v.is_floating_point() else v
                     for n, v in ema.ema.tensors().items()}, atol=0)


def test_metric_names():
    assert ema_metric_name("val/loss") == "val_ema/loss"
    assert ema_metric_name("val_loss") == "val_loss_ema"
    assert ema_metric_name("test/acc/top1") == "test_ema/acc/top1"


def test_unsupported_strategy_is_refused_in_one_line():
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        strategy = FSDPStrategy()
        world_size = 2

    with pytest.raises(LightningEMAError, match="ModelParallelStrategy") as e:
        EMA()._check_strategy(FakeTrainer())  # type: ignore[arg-type]
    assert "\n" not in str(e.value) and isinstance(e.value, D2EMAError)
    with pytest.raises(LightningEMAError):
        EMA(final="best")


def test_import_d2ema_imports_no_lightning():
    code = ("import sys, d2ema, d2ema.ema, d2ema.posthoc, d2ema.distributed\n"
            "from d2ema import EMA, PostHocEMA\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'lightning_fabric'))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_without_lightning_one_line_says_how_to_install():
    code = ("import sys\nsys.modules['lightning'] = None\n"
            "from d2ema.errors import D2EMAError\n"
            "try:\n    import d2ema.lightning\n"
            "except D2EMAError as e:\n"
            "    assert isinstance(e, ImportError)\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert "\n" not in line and "pip install 'd2ema[lightning]'" in line


def test_trainer_module_types():
    assert issubclass(EMA, pl.Callback)
