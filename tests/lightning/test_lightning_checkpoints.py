"""The Lightning EMA in checkpoints: a bit-exact resume, saves that a kill cannot cut short,
and D2Go's ``model_ema`` both ways."""

from __future__ import annotations

import itertools

import pytest
import torch
from _tiny import Tiny, data, trainer, weights
from lightning.pytorch.callbacks import ModelCheckpoint

from d2ema.lightning import EMA, AtomicCheckpointIO, LightningEMAError


def _run(tmp_path, epochs, ckpt_path=None, save=True, accumulate=1):
    ema = EMA(final="raw")  # power EMA sigma_rel 0.05: the schedule's step matters
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    t = trainer(tmp_path, max_epochs=epochs, callbacks=[ema, ckpt], enable_checkpointing=save,
                plugins=[AtomicCheckpointIO()], limit_val_batches=2,
                accumulate_grad_batches=accumulate)
    module = Tiny(lr=0.02)
    t.fit(module, data(), data(seed=1), ckpt_path=ckpt_path)
    return module, ema, t


@pytest.mark.parametrize("accumulate", [1, 3])
def test_resume_is_bit_exact(tmp_path, accumulate):
    straight, ema_a, _ = _run(tmp_path / "a", 4, accumulate=accumulate)
    _run(tmp_path / "b", 2, accumulate=accumulate)
    resumed, ema_b, t = _run(tmp_path / "c", 4, ckpt_path=tmp_path / "b" / "ckpt" / "last.ckpt",
                             accumulate=accumulate)
    assert t.global_step == ema_b.ema.step == ema_a.ema.step == 4 * -(-8 // accumulate)
    for name, value in weights(straight).items():
        assert torch.equal(weights(resumed)[name], value), name
    a, b = ema_a.ema.tensors(), ema_b.ema.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert ema_b.ema.provenance == "updated"


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, 1)
    last = tmp_path / "ckpt" / "last.ckpt"
    before = last.read_bytes()
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):  # half a file, then the process "dies"
        real_save({"partial": torch.zeros(10)}, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temporary left
    loaded = AtomicCheckpointIO().load_checkpoint(last)
    assert "model_ema" in loaded


def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path):
    _run(tmp_path, 1)
    last = tmp_path / "ckpt" / "last.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(LightningEMAError, match="truncated") as e:
        _run(tmp_path / "resume", 2, ckpt_path=cut)
    assert "\n" not in str(e.value)


class D2GoLikeTask(Tiny):
    """What D2Go's DefaultTask does with its EMA: ``checkpoint["model_ema"]`` holds a plain
    name->tensor dict of ``self.model``'s parameters and buffers (D2Go's EMAState)."""

    def __init__(self):
        super().__init__(lr=0.02)
        self.ema_state: dict[str, torch.Tensor] = {}

    def on_save_checkpoint(self, checkpoint):
        self.ema_state = {n: t.detach().clone() * 0.5 + 1.0 if t.is_floating_point() else
                          t.detach().clone() for n, t in itertools.chain(
                              self.model.named_parameters(), self.model.named_buffers())}
        checkpoint["model_ema"] = self.ema_state

    def on_load_checkpoint(self, checkpoint):  # D2Go: EMAState.load_state_dict + apply_to
        state = checkpoint["model_ema"]
        names = [n for n, _ in itertools.chain(self.model.named_parameters(),
                                                self.model.named_buffers())]
        assert all(n in state for n in names)
        self.ema_state = {n: state[n] for n in names}


@pytest.mark.parametrize("module", ["model", None])
def test_a_d2go_checkpoint_loads(tmp_path, module):
    task = D2GoLikeTask()
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    t.fit(task, data())
    t.save_checkpoint(tmp_path / "d2go.ckpt")
    ema = EMA(module=module)
    t2 = trainer(tmp_path, callbacks=[ema])
    out = t2.validate(Tiny(), data(seed=1), ckpt_path=tmp_path / "d2go.ckpt", verbose=False)[0]
    assert "val_ema/loss" in out
    prefix = "" if module else "model."
    mine = ema.ema.tensors()
    for name, value in task.ema_state.items():
        assert torch.equal(mine[prefix + name], value), name


def test_our_checkpoint_loads_in_d2go(tmp_path):
    _run(tmp_path, 1)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert "state_dict" in ckpt  # D2Go's test for a Lightning checkpoint
    ema_state = ckpt["model_ema"]
    assert all(isinstance(v, torch.Tensor) for v in ema_state.values())
    task = D2GoLikeTask()
    task.on_load_checkpoint(ckpt | {"model_ema": {k[len("model."):]: v for k, v in
                                                  ema_state.items()}})
    ours = ckpt["callbacks"][EMA(final="raw").state_key]["ema_state"]
    assert ours.keys() == ema_state.keys()
    assert all(torch.equal(ours[k], ema_state[k]) for k in ours)
    # with module="model" the names are D2Go's own
    ema = EMA(module="model")
    t = trainer(tmp_path / "m", max_epochs=1, callbacks=[ema], limit_val_batches=0,
                enable_checkpointing=False)
    t.fit(Tiny(lr=0.02), data())
    t.save_checkpoint(tmp_path / "m.ckpt")
    D2GoLikeTask().on_load_checkpoint(torch.load(tmp_path / "m.ckpt", weights_only=True))


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of a save: the checkpoint before it is intact, and the next save
    removes the temporary file the killed process left."""
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()
    code = ("import sys, time, torch\n"
            "from d2ema.lightning import AtomicCheckpointIO\n"
            "def slow(obj, f, *a, **k):\n"
            "    f.write(b'x' * 4096); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            "torch.save = slow\n"
            "AtomicCheckpointIO().save_checkpoint({'state_dict': {}}, sys.argv[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert target.read_bytes() == before
    assert AtomicCheckpointIO().load_checkpoint(target)["state_dict"]["w"].tolist() == [1.0] * 3
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
