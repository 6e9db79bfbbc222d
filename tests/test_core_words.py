"""The core speaks its own words (issue 22): each core message names the core's parameter
(``PostHocEMA(snapshot_every=...)``, ``ShardedEMA``, ``EMA(skip_nonfinite=True)``), never a
detectron2 key, and the detectron2 layer adds the key the user sets beside it
(``MODEL_EMA.POSTHOC.PERIOD``, or ``train.model_ema.posthoc.period`` for a LazyConfig)."""

from __future__ import annotations

import concurrent.futures
import shutil
import types
from collections import namedtuple

import pytest
from torch import nn

from d2ema import PostHocEMA
from d2ema.averaging.health import NONFINITE_FIX, nonfinite_message
from d2ema.d2.config.keys import core_words_named, named_in_config
from d2ema.d2.config.view import ConfigView
from d2ema.distributed import ShardedEMA
from d2ema.errors import D2EMAError
from d2ema.posthoc import PostHocError
from d2ema.posthoc.snapshots import read_index

YACS = ConfigView(None, lazy=False).key
LAZY = ConfigView(None, lazy=True).key


def _core_and_d2(raise_core, key=YACS) -> tuple[D2EMAError, D2EMAError]:
    """The error the core raises, and the one the detectron2 layer shows for it."""
    with pytest.raises(D2EMAError) as core:
        raise_core()
    with pytest.raises(D2EMAError) as d2, core_words_named(key):
        raise_core()
    assert type(d2.value) is type(core.value) and "\n" not in str(d2.value)
    return core.value, d2.value


def _posthoc(folder, sigma_rels=(0.05,), **kwargs) -> PostHocEMA:
    return PostHocEMA(nn.Linear(2, 2), folder, sigma_rels, snapshot_every=1, background=False,
                      **kwargs)


def _series(folder, sigma_rels=(0.05,), steps=2) -> None:
    model = nn.Linear(2, 2)
    tracker = PostHocEMA(model, folder, sigma_rels, snapshot_every=1, background=False)
    for step in range(1, steps + 1):
        tracker.update(model, step=step)
    tracker.close()


def test_no_snapshots_names_posthoc_ema_then_the_enabled_key(tmp_path):
    core, d2 = _core_and_d2(lambda: read_index(tmp_path))
    assert "d2ema.PostHocEMA" in str(core) and "MODEL_EMA" not in str(core)
    assert "MODEL_EMA.POSTHOC.ENABLED" in str(d2)


def test_disk_too_small_names_snapshot_every_then_the_period_key(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10, 10))
    writer = _posthoc(tmp_path / "s").writer
    core, d2 = _core_and_d2(lambda: writer.check_space(1, 10**6), key=LAZY)
    assert "snapshot_every" in str(core) and "MODEL_EMA" not in str(core)
    assert "train.model_ema.posthoc.period" in str(d2)
    assert "train.model_ema.posthoc.dtype" in str(d2) and "train.model_ema.posthoc.dir" in str(d2)


def test_other_series_kept_names_sigma_rels_then_the_key(tmp_path):
    _series(tmp_path, (0.05,))
    other = _posthoc(tmp_path, (0.2,))
    core, d2 = _core_and_d2(lambda: other.writer.sync(1))  # resumed at 1: 0.05 is foreign
    assert "PostHocEMA(sigma_rels=...)" in str(core) and "MODEL_EMA" not in str(core)
    assert "MODEL_EMA.POSTHOC.SIGMA_RELS" in str(d2)


def test_untracked_series_names_sigma_rels_and_folder_then_the_keys(tmp_path):
    _series(tmp_path, (0.05,))
    other = _posthoc(tmp_path, (0.2,))
    core, d2 = _core_and_d2(lambda: other.writer.sync(0))  # a new run: 0.05 would be deleted
    assert "PostHocEMA(sigma_rels=...)" in str(core) and "new folder" in str(core)
    assert "MODEL_EMA" not in str(core)
    assert "MODEL_EMA.POSTHOC.SIGMA_RELS" in str(d2) and "MODEL_EMA.POSTHOC.DIR" in str(d2)


def test_snapshot_write_failure_names_dtype_then_the_key(tmp_path):
    writer = _posthoc(tmp_path).writer

    def fail() -> None:
        pending: concurrent.futures.Future = concurrent.futures.Future()
        pending.set_exception(OSError(28, "No space left on device"))
        writer._pending = pending
        writer.flush()

    core, d2 = _core_and_d2(fail)
    assert isinstance(core, PostHocError)
    assert "dtype='float16'" in str(core) and "MODEL_EMA" not in str(core)
    assert "MODEL_EMA.POSTHOC.DTYPE" in str(d2) and "MODEL_EMA.POSTHOC.PERIOD" in str(d2)


def test_sharded_on_fsdp_shards_names_sharded_ema_then_the_key():
    shards = [types.SimpleNamespace(local=True)]
    core, d2 = _core_and_d2(lambda: ShardedEMA._select(None, shards))  # type: ignore[arg-type]
    assert str(core).startswith("ShardedEMA is for replicated models")
    assert "MODEL_EMA" not in str(core)
    assert "MODEL_EMA.SHARDED" in str(d2)


def test_nonfinite_message_names_skip_nonfinite_then_the_key():
    core = nonfinite_message(7)
    assert "EMA(skip_nonfinite=True)" in core and "MODEL_EMA" not in core
    assert "MODEL_EMA.SKIP_NONFINITE" in core + named_in_config(NONFINITE_FIX)
    assert "train.model_ema.skip_nonfinite" in core + named_in_config(NONFINITE_FIX, LAZY)


def test_an_error_without_core_parameters_passes_unchanged():
    error = PostHocError("plain")
    with pytest.raises(PostHocError) as seen, core_words_named(YACS):
        raise error
    assert seen.value is error
