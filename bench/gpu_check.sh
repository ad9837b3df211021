#!/usr/bin/env bash
# GPU check: build for this GPU, run the GPU tests and the full benchmark suite, write results to OUTDIR and
# bench/results/<gpu>/.
#   bench/gpu_check.sh OUTDIR [PHASES]
# PHASES: any of build, tests, bench (default all three). One command on the lent H200 may run 10 minutes, less than
# all three together: run "build tests" and then "bench" as two commands on the warm machine (the build stays).
# For a machine with an NVIDIA GPU and no network (torch, Triton, nvcc, pytest and ninja preinstalled).
# Budget on an H200: the build, the GPU tests (at most 4 minutes), then the suite (at most 6 minutes: it starts no
# case after 5.5 and is stopped at 6; what it measured by then is in OUTDIR/bench). Set FASTSEQ2SEQ_COMMIT when the
# tree is not a git checkout.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [PHASES]}
PHASES=" ${2:-build tests bench} "
runs() { [[ "$PHASES" == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
COMMIT=${FASTSEQ2SEQ_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
log() { echo "== $*" | tee -a "$OUT/gpu_check.log"; }

if runs build; then
  log "build for sm_$ARCH"
  start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=$ARCH FASTSEQ2SEQ_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e . \
    >> "$OUT/gpu_check.log" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/gpu_check.log"; exit 1; }
  log "build took $(( $(date +%s) - start )) s"
  $PY -m fastseq2seq info | tee "$OUT/info.txt"
fi

SUMMARY="GPU tests not run in this call"
if runs tests; then
  log "GPU tests"
  timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt"
  SUMMARY=$(grep -E "passed|failed|error" "$OUT/pytest_gpu.txt" | tail -1)
fi

if runs bench; then
  log "benchmark suite"
  start=$(date +%s)
  FASTSEQ2SEQ_COMMIT=$COMMIT timeout 360 $PY -m fastseq2seq bench --device cuda --out "$OUT/bench" \
    --max-minutes 5.5 2>&1 | tee "$OUT/bench.txt" || log "the suite did not finish (see $OUT/bench.txt)"
  log "suite took $(( $(date +%s) - start )) s"
fi

$PY - "$OUT" "$COMMIT" "$SUMMARY" <<'PYEOF'
import json, os, sys
import torch
out, commit, summary = sys.argv[1:4]
env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
       "commit": commit, "pytest_gpu": summary, "benchmarks": "bench/results.md, bench/results.json"}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump({"environment": env}, f, indent=2)
with open(os.path.join(out, "gpu_check.md"), "w") as f:
    f.write("\n".join([f"# GPU check: {env['gpu']}", "", *(f"- {k}: {v}" for k, v in env.items()), ""]))
PYEOF
RESULTS=bench/results/$($PY -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
mkdir -p "$RESULTS" && cp "$OUT"/gpu_check.* "$RESULTS"/ && cp -r "$OUT"/bench/. "$RESULTS"/ 2>/dev/null
log "done: $SUMMARY"
