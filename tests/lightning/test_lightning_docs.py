"""docs/lightning.md's blocks, run as written (tests/_doc_blocks.py)."""

from __future__ import annotations

from pathlib import Path

from _doc_blocks import doc_block


def test_lightning_quick_start_and_posthoc(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ns: dict = {"__name__": "lightning_docs"}
    exec(compile(doc_block("lightning-quick-start"), "lightning-quick-start", "exec"), ns)
    ema, trainer = ns["ema"], ns["trainer"]
    assert ema.ema.step == trainer.global_step == 12  # 3 epochs of 8 batches, 2 per step
    assert {"val/loss", "val_ema/loss"} <= set(trainer.callback_metrics)
    assert any(Path("ckpt").glob("*.ckpt")) and Path("ema_weights.pth").is_file()
    exec(compile(doc_block("lightning-posthoc"), "lightning-posthoc", "exec"), ns)
    assert ns["ph"].choice in ns["ph"].scores
    assert Path("posthoc_selection.md").is_file() and Path("ema_best.pth").is_file()
