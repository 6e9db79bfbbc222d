#!/usr/bin/env bash
# The GPU checks in one command, under 8 minutes on one H100 or H200:
#   1. the tests marked `cuda` (tests/test_cuda.py),
#   2. the update benchmark on the GPU: every peer and the floor, GB/s against the card,
#   3. the training-step benchmark: RetinaNet R50-FPN with EMA off, default, every 4 steps and
#      held on the CPU (the background path),
# and writes benchmarks/results/gpu.md (also copied, with the logs, to $OUT when set, which is
# where the device tool collects files). Without CUDA the same steps run as a short dry run on
# the CPU and the report says the CUDA parts were skipped.
#
# Sets up nothing from the network: it uses $PYTHON, else .venv/bin/python, else python3 (the
# first that imports torch); where that Python lacks detectron2, the packages that
# benchmarks/gpu_prepare.sh put in .whl/ are installed into a temporary folder.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in .venv/bin/python python3; do
        if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$c; break; fi
    done
fi
[ -n "$PY" ] || { echo "[gpu_check] no Python with torch found (set PYTHON=...)" >&2; exit 1; }
WORK=$(mktemp -d)
if ! "$PY" -c "import detectron2, fvcore" 2>/dev/null; then
    [ -d .whl/site ] || { echo "[gpu_check] detectron2 missing and no .whl/ (run benchmarks/gpu_prepare.sh where pip works)" >&2; exit 1; }
    SITE=$WORK/site
    mkdir -p "$SITE"
    cp -r .whl/site/. "$SITE"/
    ls .whl/*.whl >/dev/null 2>&1 && "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --target "$SITE" .whl/*.whl
    # detectron2 v0.6 names Image.LINEAR in a default argument; Pillow 10 removed that alias.
    printf 'import PIL.Image as I\nif not hasattr(I, "LINEAR"):\n    I.LINEAR = I.BILINEAR\n' \
        > "$SITE/sitecustomize.py"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
REPORT=${GPU_MD:-benchmarks/results/gpu.md}
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DEVICE=cuda
    UPDATE_ARGS=(--device cuda --threads 8 --seconds 12)
    STEP_ARGS=(--device cuda --arch r50 --size 640 --batch 4 --iters 4 --rounds 10 --threads 8)
else
    DEVICE=cpu
    UPDATE_ARGS=(--device cpu --quick --models tiny500)
    STEP_ARGS=(--device cpu --arch r18 --iters 1 --rounds 2)
fi
echo "[gpu_check] python: $PY; device: $DEVICE; work: $WORK"
start=$(date +%s)

timeout 240 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda.py \
    > "$WORK/tests.log" 2>&1
tests_rc=$?
echo "[gpu_check] tests: rc $tests_rc ($(( $(date +%s) - start )) s)"
timeout 240 "$PY" benchmarks/update_speed.py "${UPDATE_ARGS[@]}" --out "$WORK/update_speed.md" \
    > "$WORK/update_speed.log" 2>&1
update_rc=$?
echo "[gpu_check] update benchmark: rc $update_rc ($(( $(date +%s) - start )) s)"
timeout 180 "$PY" benchmarks/train_step.py "${STEP_ARGS[@]}" --out "$WORK/train_step.md" \
    > "$WORK/train_step.log" 2>&1
step_rc=$?
echo "[gpu_check] train-step benchmark: rc $step_rc ($(( $(date +%s) - start )) s)"

section() {  # title, markdown file, log, exit status
    echo "## $1"
    echo
    if [ "$4" -eq 0 ] && [ -s "$2" ]; then
        sed -e '1{/^# /d}' -e 's/^## /### /' "$2"
    else
        echo "**Failed (exit status $4; 124 = timed out).** End of its log:"
        echo
        echo '```'
        tail -n 30 "$3"
        echo '```'
    fi
    echo
}
{
    echo "# GPU check (benchmarks/gpu_check.sh)"
    echo
    if [ "$DEVICE" = cpu ]; then
        echo "**Dry run on a machine without CUDA: the GPU table is pending.** The cuda-marked"
        echo "tests were skipped and the benchmarks ran briefly on the CPU, to check the script."
        echo
    fi
    echo "- card: $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU only)')")"
    command -v nvidia-smi >/dev/null && echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
    echo "- total time: $(( $(date +%s) - start )) s"
    echo
    echo "## Tests marked cuda (tests/test_cuda.py)"
    echo
    echo '```'
    grep -E "passed|failed|skipped|error" "$WORK/tests.log" | tail -n 5
    echo '```'
    echo
    section "Update speed" "$WORK/update_speed.md" "$WORK/update_speed.log" "$update_rc"
    section "Training step" "$WORK/train_step.md" "$WORK/train_step.log" "$step_rc"
} > "$REPORT"
echo "[gpu_check] wrote $REPORT ($(( $(date +%s) - start )) s)"
if [ -n "${OUT:-}" ]; then cp "$REPORT" "$WORK"/*.log "$OUT"/ 2>/dev/null; fi
[ "$tests_rc" -eq 0 ] || [ "$tests_rc" -eq 5 ] && [ "$update_rc" -eq 0 ] && [ "$step_rc" -eq 0 ]
