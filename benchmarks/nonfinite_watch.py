"""What the NaN watch costs: one EMA update with and without
`d2ema.averaging.health.NonfiniteWatch`.

With ``skip_nonfinite=False`` (the default) every 32nd update ends with one ``sum`` per
averaged group, kept on the device, so that the step at which the EMA first held NaN/Inf can
be reported (issue 10). This script times ``EMA.update`` round robin (the timing loop of
``update_speed.py``) in four variants on the same model:

* watch on: the default (a check every ``NonfiniteWatch.every`` = 32 updates);
* watch on every update: ``every = 1``, the exact step at the cost of one more read per update;
* watch off: the same EMA with the watch's ``observe`` replaced by a no-op (what the update
  cost before the watch existed);
* guard on: ``skip_nonfinite=True``, which checks the *model* weights before each update and
  needs a host sync (the watch is then off: nothing non-finite gets in).

Run ``python benchmarks/nonfinite_watch.py [--device cpu] [--seconds 20]``; it writes
``benchmarks/results/nonfinite_watch.md`` (ratios to "watch off", medians of per-repetition
ratios, so that a busy machine shifts all variants alike).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import d2ema
from d2ema.app.speed.methods import MODEL_TITLES, MODELS, _perturb
from d2ema.app.speed.timing import Method, environment, quantile, time_round_robin
from d2ema.averaging.health import NonfiniteWatch

OUT = Path(__file__).resolve().parent / "results" / "nonfinite_watch.md"


def _variants(model: torch.nn.Module) -> list[Method]:
    on = d2ema.EMA(model, decay=0.9998)
    exact = d2ema.EMA(model, decay=0.9998)
    exact._nonfinite.every = 1
    off = d2ema.EMA(model, decay=0.9998)
    off._nonfinite.observe = lambda *args, **kwargs: None
    guard = d2ema.EMA(model, decay=0.9998, skip_nonfinite=True)
    return [Method("watch off (update alone)", lambda: off.update(model)),
            Method(f"watch on (default, every {NonfiniteWatch.every})", lambda: on.update(model)),
            Method("watch on every update (every = 1)", lambda: exact.update(model)),
            Method("guard on (skip_nonfinite=True)", lambda: guard.update(model))]


def run(models: Sequence[str], device: torch.device, seconds: float) -> str:
    lines = ["# Cost of the NaN watch per EMA update", "",
             "Command: `python benchmarks/nonfinite_watch.py " + " ".join(sys.argv[1:]) + "`",
             "", *environment(torch.get_num_threads(), device), ""]
    for name in models:
        model = MODELS[name]().to(device)
        _perturb(model)
        methods = _variants(model)
        timing = time_round_robin(methods, None, device, seconds=seconds)
        base = timing.times[0]
        lines += [f"## {MODEL_TITLES[name]}", "",
                  "| variant | × watch off | median ms | p25–p75 × watch off |",
                  "|---|--:|--:|--:|"]
        for m, t in zip(methods, timing.times):
            ratio = [a / b for a, b in zip(t, base)]
            lines.append(f"| {m.name} | **{quantile(ratio, 0.5):.2f}** | "
                         f"{quantile(t, 0.5):.3f} | {quantile(ratio, 0.25):.2f}–"
                         f"{quantile(ratio, 0.75):.2f} |")
        lines += ["", f"{len(base)} repetitions kept of {timing.rounds}; other processes used "
                  f"{timing.others_share:.0%} of the CPU meanwhile.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,retinanet_r50_fpn")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per model")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    report = run(args.models.split(","), torch.device(args.device), args.seconds)
    args.out.write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
