"""mkdocs hook: the measured results (benchmarks/results/*.md and their plots) as site pages.

The docs cite their evidence (``[benchmarks/results/posthoc.md](results/posthoc.md)``); the files
live beside the code, outside ``docs/``, where ``make bench`` writes them. This adds them to the
site under ``results/`` at build time, so that the links resolve and ``mkdocs build --strict``
checks them, without a second copy in the repository. mkdocs.yml names it under ``hooks:``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).resolve().parent / "benchmarks"
    for path in sorted((root / "results").glob("*")):
        if path.suffix in (".md", ".png"):
            files.append(File(f"results/{path.name}", src_dir=str(root),
                              dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files
