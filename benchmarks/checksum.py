"""What the snapshot checksum costs: one ResNet-18-sized EMA state (11.7M float32 values,
47 MB) saved as a snapshot is, read back and checksummed as ``SnapshotWriter`` does
(``zlib.crc32`` from the page cache), against ``hashlib.blake2b`` and the save itself.

    python benchmarks/checksum.py            # writes benchmarks/results/checksum.md
    python benchmarks/checksum.py --out -    # prints only
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _state() -> dict[str, torch.Tensor]:
    try:
        import torchvision

        model = torchvision.models.resnet18()
    except ImportError:  # the same number of values in one tensor per layer shape
        model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(11)])
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if v.is_floating_point()}


def _blake2b(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "checksum.md"))
    args = parser.parse_args(argv)
    from d2ema.io.atomic import atomic_save
    from d2ema.posthoc.snapshots import file_crc32

    torch.set_num_threads(1)
    state = _state()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sigma0.05_step00001000.pth"
        payload = {"tensors": state, "dtypes": {k: "float32" for k in state}}
        save = _time(lambda: atomic_save(payload, path), args.reps)
        size = path.stat().st_size
        crc = _time(lambda: file_crc32(path), args.reps)
        blake = _time(lambda: _blake2b(path), args.reps)
    mb = size / 1e6
    rows = [("atomic save (torch.save, fsync, rename)", save),
            ("zlib.crc32 of the file (page cache): what d2ema records", crc),
            ("hashlib.blake2b of the file (page cache)", blake)]
    text = "\n".join([
        "# Snapshot checksum cost",
        "",
        f"One ResNet-18-sized snapshot: {sum(v.numel() for v in state.values()) / 1e6:.1f}M "
        f"float32 values, {mb:.1f} MB on disk; median of {args.reps}; 1 thread; "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}. Command: "
        "`python benchmarks/checksum.py`.",
        "",
        "| step | seconds per snapshot | MB/s | vs the save |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {t:.4f} | {mb / t:.0f} | {t / save:.0%} |" for name, t in rows],
        "",
        "The checksum is read back from the page cache right after the save, before the file's "
        "pages are dropped, and checked once per snapshot when a rebuild reads it.",
        "",
    ])
    print(text)
    if args.out != "-":
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
