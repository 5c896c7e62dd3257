#!/usr/bin/env bash
# The one-command GPU check (run it from the repository root on a machine with an NVIDIA GPU):
#  1. names the GPU, driver, torch and CUDA;
#  2. builds the CUDA extension just in time for this GPU's architecture only (seconds, not the minutes
#     of the five-architecture wheel build) and fails if it does not load;
#  3. runs the `cuda`-marked tests (kernels against their twins, models through the kernels, paged attention,
#     every attention backend this GPU can run);
#  4. runs the GPU benchmark: this package, EXL2 4.0 bpw (an 8-layer Llama-3-8B-shaped model), decode at batch 1
#     and the paged generator at batch 1 and 8, every backend the GPU can run. (bench_gpu.py has no FP16 model yet.)
# Budget: 9 minutes on an H100 in all; each step has its own time limit and reports what it ran out of.
# Results go to $OUT (default ./gpu_check_out): versions.txt, tests.log, bench_gpu.json and the bench logs.
# Uses the machine's python3 (PYTHON to override) and installs nothing: the image must hold torch with CUDA,
# transformers, safetensors, tokenizers, sentencepiece, pytest and ninja.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

step() { echo; echo "== $* ($(date +%T))"; }

step "device"
if ! "$PYTHON" - > "$OUT/versions.txt" <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: this check needs an NVIDIA GPU (torch %s, cuda %s)" % (torch.__version__, torch.version.cuda))
major, minor = torch.cuda.get_device_capability(0)
print(f"gpu: {torch.cuda.get_device_name(0)} (sm_{major}{minor}), {torch.cuda.device_count()} device(s)")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}")
print(f"arch {major}.{minor}")
EOF
then
    exit 2
fi
cat "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/versions.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(awk '/^arch /{print $2}' "$OUT/versions.txt")}

step "build the extension for $TORCH_CUDA_ARCH_LIST"
if ! timeout 240 "$PYTHON" - <<'EOF'
import sys, time
import exllamav2.ext as ext
start = time.time()
module = ext.load_extension()
if module is None:
    sys.exit(f"the extension did not load: {ext.unavailable_reason()}")
print(f"loaded {module.__name__} in {time.time() - start:.0f} s")
EOF
then
    echo "FAIL: extension build (see above); the tests and the benchmark need it"
    exit 1
fi

step "cuda tests"
timeout 180 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
rc=$?
tail -n 25 "$OUT/tests.log"
[ "$rc" -eq 0 ] || { echo "FAIL: cuda tests (exit $rc; 124 = over 180 s)"; status=1; }

step "GPU benchmark (EXL2 4.0 bpw, batch 1 and 8)"
timeout 240 "$PYTHON" benchmarks/bench_gpu.py --packages ours --layers 8 --batch-sizes 1,8 --repeats 3 \
    --json "$OUT/bench_gpu.json"
rc=$?
[ "$rc" -eq 0 ] || { echo "FAIL: benchmark (exit $rc; 124 = over 240 s)"; status=1; }

step "done: results in $OUT/"
exit "$status"
