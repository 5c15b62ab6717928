#!/usr/bin/env bash
# The one prepared GPU check. Whoever is lent GPU time runs this first, as ONE command (<= 6 minutes):
#
#     bash tools/device_check.sh                 # the default parts, in order, within DEVICE_CHECK_BUDGET s
#     bash tools/device_check.sh compile cuda    # only these parts (to rerun a failed one in the minutes left)
#     DEVICE_CHECK_SMOKE=1 bash tools/device_check.sh env kernel   # CPU dry run of the script itself
#     bash -n tools/device_check.sh              # syntax check
#
# It needs python3 with torch (CUDA), triton and transformers; not datasets, gguf or a hub (it makes its
# models with random weights). It writes, under $OUT (default ./device_check_out):
#   device_report.md   the markdown report to paste into BENCHMARKS.md (device, date, one section per part)
#   device_check.log   every part's full output
#   *.json             the raw numbers of the kernel, e2e, compress and offload parts
#   tuned_tables/*.json  the tuned kernel table of this GPU: copy it into gift_quant/kernels/tuned_tables/
# Default parts (most valuable first): env kernel compile tests. A part is skipped, and says so, when
# less budget is left than its estimate; each part also has a hard timeout. The others run by name.
#   env       GPU, driver, torch/triton/transformers versions
#   kernel    kernel table: every Triton candidate (split-K, tl.dot GEMM, dequant + cuBLAS) vs fp16
#             F.linear, 4096x4096, 4096x11008, 11008x4096, tokens 1/2/4/8/16/64, 2/3/4 bits, k = 128,
#             CUDA-graph timing, weights rotated past L2, copy bandwidth; writes the tuned table
#   tests     the GPU tests of the kernels (Triton, the PyTorch path, torch.compile + CUDA graphs)
#   hostprof  host time per eager call: dense F.linear, the layer, its parts, the bare Triton launch
#   e2e       LLaMA-2-7B-shaped decode (random weights), FP16 vs gift 4/3/2-bit, eager
#   compress  `gift-quant compress --bits 2 --recipe post` on a SmolLM2-shaped random model on the GPU:
#             wall time and peak GPU memory
#   offload   peak GPU memory of compressing the 7B shape with the model on CPU (4 layers: the peak is
#             one layer's)
#   compile   the 7B-shaped decode under torch.compile (CUDA graphs), FP16 vs gift 4-bit and 2-bit, batch
#             1 and 16
#   cublas    cuBLAS alone on the C++ prefill path's exact operands: is its bf16 bound failure the bias
#             epilogue? (tools/diag_cublas_bound.py, no C++ build)
#   cuda      the opt-in C++ kernel: JIT build, its GPU tests, and its kernel table beside Triton's
#   vllm      decode tokens/s through vLLM (only if vllm is importable there)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/device_check_out}
mkdir -p "$OUT"
REPORT=$OUT/device_report.md
LOG=$OUT/device_check.log
BUDGET=${DEVICE_CHECK_BUDGET:-345}
PY=${PYTHON:-python3}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
# DEVICE_CHECK_SMOKE=1: tiny shapes on CPU, to check this script itself without a GPU (numbers meaningless)
SMOKE=${DEVICE_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  KSHAPE="--shapes 128x96 --batches 1,20 --bits 4 --salient 8 --device cpu --sweep="
  export TRITON_INTERPRET=1
  E2E="--layers 1 --hidden 128 --intermediate 256 --heads 4 --vocab 512 --device cpu --prompt-len 8 --new-tokens 4"
  SMOL="64 128 2 4 2 512"; DEV=cpu
  OFFL="--device cpu --layers 2 --hidden 256 --intermediate 512 --heads 4 --vocab 1000 --samples 4 --seq-len 64"
else
  KSHAPE=""; E2E="--new-tokens 64"; SMOL="576 1536 30 9 3 49152"; DEV=cuda; OFFL="--layers 2 --samples 32"
fi
# (plain strings, split on purpose: the parts run in `bash -c` under `timeout`, and arrays do not export)
WORK=$(mktemp -d)

ALL=(env kernel tests hostprof e2e compress offload compile cublas cuda vllm)
DEFAULT=(env kernel compile tests)
PARTS=("$@")
if [ ${#PARTS[@]} -eq 0 ]; then PARTS=("${DEFAULT[@]}"); fi
for p in "${PARTS[@]}"; do
  case " ${ALL[*]} " in *" $p "*) ;; *) echo "device_check: unknown part '$p' (parts: ${ALL[*]})" >&2; exit 2;; esac
done

{
  echo "# Device check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Command: \`bash tools/device_check.sh ${*:-}\` (budget ${BUDGET} s), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
} >"$REPORT"

section() { printf '\n## %s\n\n' "$1" >>"$REPORT"; }
note() { printf '%s\n' "$*" >>"$REPORT"; }
elapsed() { echo $(($(date +%s) - START)); }

# run_part NAME ESTIMATE_S TIMEOUT_S COMMAND...: runs COMMAND with a hard timeout when the budget allows,
# appends its output to the log, records status and seconds in the report.
run_part() {
  local name=$1 est=$2 limit=$3; shift 3
  local left=$((BUDGET - $(elapsed)))
  if [ "$left" -lt "$est" ]; then
    note "*${name}: skipped, ${left} s of budget left, needs about ${est} s. Rerun: \`bash tools/device_check.sh ${name}\`.*"
    echo "[device_check] skip $name (left ${left}s < est ${est}s)" | tee -a "$LOG"
    return 0
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "[device_check $(date +%H:%M:%S)] part $name (timeout ${limit}s)" | tee -a "$LOG"
  local t0 rc=0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$1" >>"$LOG" 2>&1 || rc=$?
  local dt=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then
    note ""; note "*${name}: ok in ${dt} s.*"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note ""; note "*${name}: TIMED OUT after ${dt} s (limit ${limit} s); partial results above if any.*"
  else
    note ""; note "*${name}: FAILED (exit ${rc}) after ${dt} s; see device_check.log.*"
  fi
  echo "[device_check] part $name rc=$rc ${dt}s" | tee -a "$LOG"
  return 0
}

part_env() {
  section "Environment"
  { echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    $PY - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton: unavailable:", e)
try:
    import transformers; print("transformers", transformers.__version__)
except Exception as e: print("transformers: unavailable:", e)
for m in ("datasets", "gguf", "vllm"):
    try:
        __import__(m); print(m, "present")
    except Exception: print(m, "absent")
import gift_quant; print("gift_quant imports from", gift_quant.__file__)
EOF
    echo '```'; } >>"$REPORT"
}

part_kernel() {
  section "Kernel table (Triton vs fp16 F.linear)"
  $PY tools/bench_kernel.py --backends triton $KSHAPE --out "$WORK/kernel" --md "$WORK/kernel.md" \
      --json "$OUT/kernel.json" --tuned-out "$OUT/tuned_tables" && cat "$WORK/kernel.md" >>"$REPORT"
}

part_tests() {
  section "GPU tests"
  # the split-K tests first (every new kernel variant compiles once here); an inner timeout so the
  # report still gets the tail when the part runs out of time
  local files=(tests/kernels/test_splitk.py tests/kernels/test_triton.py tests/kernels)
  [ -d tests/nn ] && files+=(tests/nn)
  timeout 105 $PY -m pytest -q -p no:cacheprovider -x "${files[@]}" \
      -k "not nvcc and not cuda_kernel and not wheel and not compile_for_sm90" 2>&1 | tee "$WORK/tests.txt" | tail -n 25
  local rc=${PIPESTATUS[0]}
  { echo '```'; tail -n 8 "$WORK/tests.txt"; echo '```'; } >>"$REPORT"
  return "$rc"
}

part_hostprof() {
  section "Host time per eager call (tools/bench_dispatch_overhead.py)"
  $PY tools/bench_dispatch_overhead.py --calls 2000 --md "$WORK/host.md" && cat "$WORK/host.md" >>"$REPORT"
}

part_e2e() {
  section "End-to-end decode, LLaMA-2-7B shape, random weights, eager"
  GIFT_QUANT_KERNEL=auto $PY tools/bench_e2e.py --part b --out "$WORK/e2e" --modes eager --batch 1,16 \
      --bits 4,3,2 $E2E --repeats 2 --time-budget 200 && cp "$WORK/e2e/"*.json "$OUT/e2e.json" 2>/dev/null
  cat "$WORK/e2e/"*.md >>"$REPORT" 2>/dev/null
}

part_compile() {
  section "End-to-end decode, LLaMA-2-7B shape, torch.compile (CUDA graphs)"
  GIFT_QUANT_KERNEL=auto $PY tools/bench_e2e.py --part b --out "$WORK/e2e_compile" --modes compile --batch 1,16 \
      --bits 4,2 $E2E --repeats 2 --time-budget 140 && cp "$WORK/e2e_compile/"*.json "$OUT/e2e_compile.json" 2>/dev/null
  cat "$WORK/e2e_compile/"*.md >>"$REPORT" 2>/dev/null
}

part_compress() {
  section "compress --bits 2 --recipe post on the GPU (SmolLM2-shaped, random weights)"
  $PY - "$WORK/smollm2_random" $SMOL <<'EOF' || return 1
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tools._common import char_tokenizer
d = sys.argv[1]
h, i, n, heads, kv, vocab = map(int, sys.argv[2:8])
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192,
                  tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(d)
char_tokenizer().save_pretrained(d)
print("random SmolLM2-shaped model written to", d)
EOF
  $PY - "$WORK/smollm2_random" "$WORK/ckpt" "$OUT/compress.json" "$DEV" <<'EOF'
import json, sys, time, torch, resource
from gift_quant.cli import main
src, dst, js, dev = sys.argv[1:5]
cuda = dev == "cuda"
if cuda:
    torch.cuda.reset_peak_memory_stats()
t = time.time()
rc = main(["compress", "--model", src, "--bits", "2", "--recipe", "post", "--steps", "60",
           "--device", dev, "--output", dst, "--eval-dataset", "topics-heldout"] + ([] if cuda else ["--calib-samples", "4", "--steps", "2"]))
r = {"rc": rc, "wall_s": round(time.time() - t, 1),
     "peak_gpu_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
     "peak_gpu_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
     "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
     "note": "random weights: the perplexity printed is meaningless; time and memory only",
     "steps": 60 if cuda else 2, "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)"}
json.dump(r, open(js, "w"), indent=1)
print(json.dumps(r))
sys.exit(rc)
EOF
  local rc=$?
  { echo '```json'; cat "$OUT/compress.json" 2>/dev/null; echo '```'; } >>"$REPORT"
  return $rc
}

part_offload() {
  section "Offload memory: compressing the 7B shape with the model on CPU (4 layers)"
  # streamed (no --quiet, no tail in the pipe): a run killed by its timeout still leaves its progress in the log
  $PY tools/bench_offload_memory.py $OFFL --json "$OUT/offload.json" 2>&1 | tee "$WORK/offload.txt"
  local rc=${PIPESTATUS[0]}
  tail -n 5 "$WORK/offload.txt" >>"$REPORT"
  return "$rc"
}

part_cuda() {
  section "Opt-in C++ kernel (JIT build, tests, table beside Triton)"
  GIFT_QUANT_KERNEL=cuda $PY -m pytest -q -p no:cacheprovider -x tests -k "cuda_kernel" 2>&1 | tee "$WORK/cuda_tests.txt" | tail -n 20
  { echo '```'; tail -n 5 "$WORK/cuda_tests.txt"; echo '```'; } >>"$REPORT"
  $PY tools/bench_kernel.py --backends cuda,triton,torch --shapes 4096x11008,11008x4096 --batches 1,16 \
      --out "$WORK/kernel_cuda" --md "$WORK/kernel_cuda.md" --json "$OUT/kernel_cuda.json" \
      && cat "$WORK/kernel_cuda.md" >>"$REPORT"
}

part_cublas() {
  section "cuBLAS on the C++ prefill path's operands (tools/diag_cublas_bound.py)"
  $PY tools/diag_cublas_bound.py 2>&1 | tee "$WORK/cublas.md" | tail -n 25
  local rc=${PIPESTATUS[0]}
  grep '^|\|^device' "$WORK/cublas.md" >>"$REPORT"
  return "$rc"
}

part_vllm() {
  section "vLLM"
  if ! $PY -c "import vllm" 2>/dev/null; then note "vllm is not installed on this machine: no vLLM row."; return 0; fi
  $PY tools/bench_vllm.py --md "$WORK/vllm.md" && cat "$WORK/vllm.md" >>"$REPORT"
}

export ROOT OUT REPORT LOG PY WORK SMOKE DEV KSHAPE E2E SMOL OFFL
export -f section note part_env part_kernel part_tests part_hostprof part_e2e part_compile part_compress part_offload part_cublas part_cuda part_vllm
declare -A EST=([env]=5 [kernel]=100 [tests]=30 [hostprof]=20 [e2e]=60 [compress]=60 [offload]=45 [compile]=90 [cublas]=30 [cuda]=150 [vllm]=90)
declare -A LIMIT=([env]=30 [kernel]=170 [tests]=120 [hostprof]=90 [e2e]=200 [compress]=200 [offload]=150 [compile]=150 [cublas]=120 [cuda]=300 [vllm]=200)
for p in "${PARTS[@]}"; do
  run_part "$p" "${EST[$p]}" "${LIMIT[$p]}" "part_$p"
done
note ""
note "Total: $(elapsed) s."
echo "==== report ($REPORT) ===="
cat "$REPORT"
