#!/usr/bin/env bash
# GPU check: build for this GPU, run the GPU tests and the benchmarks, write results to OUTDIR and bench/results/.
#   bench/gpu_check.sh OUTDIR
# For a machine with an NVIDIA GPU and no network (torch, Triton, nvcc, pytest and ninja preinstalled).
# Budget: under 8 minutes on an H200. Set FASTSEQ2SEQ_COMMIT when the tree is not a git checkout.
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
COMMIT=${FASTSEQ2SEQ_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
ARCH=$($PY -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')")
log() { echo "== $*" | tee -a "$OUT/gpu_check.log"; }

log "build for sm_$ARCH"
start=$(date +%s)
TORCH_CUDA_ARCH_LIST=$ARCH FASTSEQ2SEQ_CUDA=1 $PY -m pip install -q --no-deps --no-build-isolation -e . \
  >> "$OUT/gpu_check.log" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/gpu_check.log"; exit 1; }
log "build took $(( $(date +%s) - start )) s"
$PY -m fastseq2seq info | tee "$OUT/info.txt"

log "GPU tests"
timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.txt"
SUMMARY=$(grep -E "passed|failed|error" "$OUT/pytest_gpu.txt" | tail -1)

log "benchmarks"
for script in bench/bench_*.py; do
  name=$(basename "$script" .py)
  timeout 120 $PY "$script" --device cuda --quick --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt" || log "$name did not finish"
done

$PY - "$OUT" "$COMMIT" "$SUMMARY" <<'PYEOF'
import glob, json, os, sys
import torch
out, commit, summary = sys.argv[1:4]
env = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
       "commit": commit, "pytest_gpu": summary}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
tables = {}
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    with open(path) as f:
        tables[os.path.basename(path)[:-5]] = json.load(f)
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump({"environment": env, "benchmarks": tables}, f, indent=2)
lines = [f"# GPU check: {env['gpu']}", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
for name, data in tables.items():
    lines += [f"## {name}", "", data.get("table", ""), ""]
with open(os.path.join(out, "gpu_check.md"), "w") as f:
    f.write("\n".join(lines))
PYEOF
cp "$OUT/gpu_check.md" "$OUT/gpu_check.json" bench/results/ 2>/dev/null
log "done: $SUMMARY"
