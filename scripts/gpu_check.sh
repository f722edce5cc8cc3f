#!/usr/bin/env bash
# The GPU check of #12 in one start (see scripts/gpu_check.py): on a GPU machine that has torch,
# transformers, accelerate and peft, in the repository root, with .gpu-wheels/ from
# scripts/gpu_wheels.sh beside it. Everything lands in $OUT (a temporary folder when unset):
# gpu_check.log, summary.txt, summary.json, runs.log, bench.log.
#   bash scripts/gpu_check.sh                 # the check, within GPU_CHECK_BUDGET seconds (530)
#   bash scripts/gpu_check.sh --dry           # CPU, tiny, gloo, fp32, ddp + lora
# Extra arguments go to `gpu_check.py run`. Exit 0: passed; 1: a check failed; 3: cannot start.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
start=$SECONDS
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check-out.XXXXXX)}
mkdir -p "$OUT" || exit 3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

install_wheels() {  # .gpu-wheels/any and the folder of this Python's version, into a target dir
    local tag site=${GPU_CHECK_SITE:-/tmp/gpu-check-site}
    tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') || return 3
    if [ ! -d ".gpu-wheels/$tag" ]; then
        echo "error: .gpu-wheels has no $tag/ (it has: $(ls .gpu-wheels | tr '\n' ' ')); build them with" \
            "PY_VERSIONS=$("$PYTHON" -c 'import sys; print(*sys.version_info[:2], sep=".")') bash scripts/gpu_wheels.sh" >&2
        return 3
    fi
    rm -rf "$site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .gpu-wheels/any/*.whl ".gpu-wheels/$tag"/*.whl || { echo "error: installing .gpu-wheels failed" >&2; return 3; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: .gpu-wheels/any and $tag installed into $site in $((SECONDS - start)) s"
}

{
    echo "gpu_check: $("$PYTHON" -V 2>&1) ($(command -v "$PYTHON")), $(uname -m), out $OUT"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if [ -d .gpu-wheels ]; then
        install_wheels || exit 3
    else
        echo "gpu_check: no .gpu-wheels here: using the packages $PYTHON has"
    fi
    "$PYTHON" scripts/gpu_check.py run --out "$OUT" --budget $((${GPU_CHECK_BUDGET:-530} - (SECONDS - start))) "$@"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
