#!/usr/bin/env bash
# Here, where pip reaches PyPI: the wheels the GPU image lacks, into .gpu-wheels/ (git-ignored).
#   bash scripts/gpu_wheels.sh                  # for Python 3.11, 3.12 and 3.13
#   PY_VERSIONS=3.12 bash scripts/gpu_wheels.sh # the GPU image's Python only
# The list is what `python scripts/gpu_check.py wheels` finds the worker program loading, less
# what the image has. Universal wheels go to any/, the rest to cpXY/ per Python version; the
# GPU side (scripts/gpu_check.sh) installs any/ and its own cpXY/ with --no-deps --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=.gpu-wheels
PY_VERSIONS=${PY_VERSIONS:-"3.11 3.12 3.13"}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip_get() { "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "$@"; }

spec=$(HF_HUB_OFFLINE=1 "$PYTHON" scripts/gpu_check.py wheels)
# strategy.liger's kernels: transformers imports them only in a GPU run, so the CPU venv here neither
# loads nor has them (py3-none-any; its triton comes with the image's CUDA torch).
spec+=$'\nliger-kernel 0.8.5 any'
echo "$spec"
rm -rf "$DEST"
mkdir -p "$DEST/any"
while read -r name version kind; do
    if [ "$kind" = any ]; then
        if ! pip_get -d "$DEST/any" "$name==$version" 2>/dev/null; then
            # DeepSpeed is an sdist only: its pure-Python wheel (no ops) is built with this venv's torch.
            echo "building $name $version from its sdist"
            DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST/any" "$name==$version"
        fi
        continue
    fi
    for version_xy in $PY_VERSIONS; do
        tag="cp${version_xy/./}"
        mkdir -p "$DEST/$tag"
        pip_get --python-version "$version_xy" --implementation cp "${PLATFORMS[@]}" -d "$DEST/$tag" "$name==$version"
    done
done <<<"$spec"

for folder in "$DEST"/cp*/; do
    missing=$(comm -23 <(cut -d' ' -f1 <<<"$spec" | sort) <(ls "$DEST/any" "$folder" |
        sed -n 's/^\([^-]*\)-.*\.whl$/\1/p' | tr '_.' '--' | tr 'A-Z' 'a-z' | sort -u))
    if [ -n "$missing" ]; then
        echo "error: no wheel in $folder (or any/) for: $missing" >&2
        exit 1
    fi
done
ls -l "$DEST"/*/*.whl | awk '{ printf "%9.2f MiB  %s\n", $5 / 1048576, $9 }'
total=$(du -cb "$DEST"/*/*.whl | tail -1 | cut -f1)
echo "total: $(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }') MiB in $DEST"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "error: over 60 MiB; the device tool carries 64 MiB with the repository (try PY_VERSIONS=3.12)" >&2
    exit 1
fi
