#!/usr/bin/env bash
# One call on a lent GPU machine (see bench/RESULTS.md): install trpl_fast over the
# machine's own torch / triton, then run the phases named in the arguments, each under its
# own time limit, logs and JSON under $OUT (default ./gpu_out).
#   check   CUDA correctness: tests/test_cuda.py (with the CUDA-graph captures), and the
#           kernel / KL / fused-kernel / eager fast path tests (which run their Triton
#           kernels on the GPU when one is there)
#   host    host work per call, operators against the eager fast path, and CUDA-graph
#           replay (bench/host_overhead.py)
#   bench_kl, bench_diag, bench_full   pytest-benchmark suites on CUDA (KL; Frobenius / W2
#           diagonal; Frobenius / W2 full), JSON per suite
#   tune    sweep the row kernels' tile size and warps (bench/tune_rows.py)
#   train   the training loop's steps/s on this machine: bench/train_algos.py, CUDA and CPU
#   seeds   issue 11's GPU target: SEEDS (32) seeds of the KL throughput preset in one process,
#           networks on CUDA, evaluation after every iteration, aggregate env steps/s against
#           one single-seed run (bench/train_seeds.py)
# The MuJoCo / EnvPool packages come from ../shared/tools/device-site.sh, carried as .devsite.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -d .devsite/site ] && export PYTHONPATH="$PWD/.devsite/site${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc
} 2>&1 | tee "$OUT/env.txt"
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }

phase() {  # phase NAME SECONDS CMD...: run CMD under a limit, keep its log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}

for p in "$@"; do
  case "$p" in
    check)
      # --session-timeout (pytest-timeout) ends the run with its failure report printed; a
      # run killed by `timeout` prints none (the first H100 session lost its reports so)
      st=(); $PY -m pytest --help 2>/dev/null | grep -q -- --session-timeout && st=(--session-timeout "${CHECK_LIMIT:-240}")
      phase check "$(( ${CHECK_LIMIT:-240} + 60 ))" env OMP_NUM_THREADS=1 $PY -m pytest -q -p no:cacheprovider \
        -p no:benchmark -n 12 --tb=short -rf "${st[@]}" --junitxml "$OUT/check.xml" \
        tests/test_cuda.py tests/test_kernels.py tests/test_kl.py tests/test_deferred_checks.py tests/test_eager.py \
        tests/test_kl_full_kernel.py tests/test_check_kernel.py -k "cuda or kernel or triton or eager" ;;
    host)
      phase host "${HOST_LIMIT:-120}" $PY -m bench.host_overhead --device cuda --graph --checks --out "$OUT/host_overhead_cuda.json" ;;
    bench_kl)
      phase bench_kl "${BENCH_LIMIT:-200}" $PY -m pytest -q -p no:cacheprovider bench/test_bench_kl.py -k "cuda and ${KL_FILTER:-cuda}" \
        --benchmark-json "$OUT/cuda_kl.json" ;;
    bench_diag)
      phase bench_diag "${BENCH_LIMIT:-200}" $PY -m pytest -q -p no:cacheprovider bench/test_bench_projection.py \
        -k "cuda and diag" --benchmark-json "$OUT/cuda_frob_w2_diag.json" ;;
    bench_full)
      phase bench_full "${BENCH_LIMIT:-200}" $PY -m pytest -q -p no:cacheprovider bench/test_bench_projection.py \
        -k "cuda and full" --benchmark-json "$OUT/cuda_frob_w2_full.json" ;;
    tune)
      phase tune "${TUNE_LIMIT:-150}" $PY -m bench.tune_rows --out "$OUT/tune_rows.json" ;;
    train|train_cuda)
      phase train_cuda "${TRAIN_LIMIT:-150}" $PY -m bench.train_algos --env HalfCheetah-v5 --steps ${TRAIN_STEPS:-16384} \
        --algos kl ppo ppo-m --device cuda --out "$OUT/train_cuda.json"
      [ "$p" = train_cuda ] && continue
      phase train_cpu "${TRAIN_LIMIT:-150}" env OMP_NUM_THREADS=1 $PY -m bench.train_algos --env HalfCheetah-v5 \
        --steps 16384 --algos kl ppo ppo-m --device cpu --out "$OUT/train_cpu.json" ;;
    seeds)
      phase seeds_cuda "${SEEDS_LIMIT:-300}" $PY -m bench.train_seeds --preset throughput --algo kl \
        --env HalfCheetah-v5 --seeds "${SEEDS:-32}" --steps "${SEEDS_STEPS:-65536}" --device cuda \
        --threads "${SEEDS_THREADS:-4}" --out "$OUT/train_seeds_cuda.json" ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
