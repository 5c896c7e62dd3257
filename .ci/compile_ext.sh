#!/usr/bin/env bash
# Compile checks of the CUDA extension on a machine without a GPU or a CUDA build of torch:
#  1. no kernel source (cuda/*) includes PyTorch headers;
#  2. every cuda/*.cu compiles with nvcc for sm_75, sm_80 and sm_89, and cuobjdump --list-elf finds each
#     architecture's machine code in the object (sm_75 also proves no sm_80-only instruction slipped in);
#  3. when torch is importable, every ext_*.cpp binding file passes a syntax check against its headers.
# Exits non-zero on any failure. Needs nvcc (CUDA_HOME or /usr/local/cuda); installs cuobjdump from pip.
set -euo pipefail
cd "$(dirname "$0")/.."

EXT=exllamav2/exllamav2_ext
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
PYTHON=${PYTHON:-python3}
ARCHS=(75 80 89)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== kernel sources are torch-free"
if grep -nE '#include *[<"](torch|ATen|c10)/' "$EXT"/cuda/*; then
    echo "FAIL: the files above include PyTorch headers; keep them in the ext_*.cpp binding layer"
    exit 1
fi

echo "== cuobjdump"
CUOBJDUMP=$(command -v cuobjdump || true)
if [ -z "$CUOBJDUMP" ]; then
    "$PYTHON" -m pip install -q nvidia-cuda-cuobjdump
    CUOBJDUMP=$("$PYTHON" - <<'EOF'
import pathlib, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for r in roots for p in pathlib.Path(r).glob("nvidia/**/bin/cuobjdump")]
print(hits[0] if hits else "")
EOF
)
fi
if [ -z "$CUOBJDUMP" ]; then
    echo "FAIL: cuobjdump not found (pip install nvidia-cuda-cuobjdump)"
    exit 1
fi
echo "$CUOBJDUMP"

echo "== nvcc: $("$NVCC" --version | tail -1)"
GENCODE=()
for a in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_$a,code=sm_$a"); done
failed=0
for cu in "$EXT"/cuda/*.cu; do
    obj="$WORK/$(basename "${cu%.cu}").o"
    start=$SECONDS
    if ! "$NVCC" -c -O3 -std=c++17 --threads 2 "${GENCODE[@]}" "$cu" -o "$obj"; then
        echo "FAIL: $cu does not compile"
        failed=1
        continue
    fi
    elfs=$("$CUOBJDUMP" --list-elf "$obj")
    for a in "${ARCHS[@]}"; do
        if ! grep -q "sm_$a" <<<"$elfs"; then
            echo "FAIL: $cu has no sm_$a machine code"
            failed=1
        fi
    done
    echo "ok $cu ($((SECONDS - start)) s)"
done
[ "$failed" -eq 0 ] || exit 1

echo "== binding layer (ext_*.cpp) syntax check"
TORCH_INC=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" 2>/dev/null || true)
if [ -z "$TORCH_INC" ]; then
    echo "skipped: torch is not importable with $PYTHON"
    exit 0
fi
PY_INC=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# The CPU torch wheel lacks this generated header, which c10/cuda includes.
mkdir -p "$WORK/shim/c10/cuda/impl"
echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$WORK/shim/c10/cuda/impl/cuda_cmake_macros.h"
INCLUDES=(-I"$WORK/shim" -I"$PY_INC" -I"$CUDA_HOME/include" -I"$EXT")
for inc in $TORCH_INC; do INCLUDES+=(-I"$inc"); done
export INCLUDES_STR="${INCLUDES[*]}"
start=$SECONDS
if ! ls "$EXT"/ext_*.cpp | xargs -P 2 -I{} sh -c \
    'g++ -fsyntax-only -std=c++20 -w -DTORCH_EXTENSION_NAME=exllamav2_ext $INCLUDES_STR {} || { echo "FAIL: {}"; exit 255; }'; then
    exit 1
fi
echo "ok binding layer ($((SECONDS - start)) s)"
