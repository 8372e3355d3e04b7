#!/bin/bash
# The GPU checks of this project in one call on a lent GPU machine (see benchmarks/gpu_prepare.sh for what it
# needs and how to start it): the sharded engines' run tests (tests/test_continual_gpu.py: FSDP, DeepSpeed
# ZeRO-2/3 on one GPU) and the throughput/memory table of `graft train` against plain transformers + peft
# (benchmarks/bench_gpu_train.py). Everything lands in $OUT: machine.txt, tests.log, engines.jsonl, bench.log,
# bench_gpu_train.json and bench_gpu_train.md.
#   bash benchmarks/gpu_session.sh                      # both parts
#   PARTS=bench ONLY="full-gc" bash benchmarks/gpu_session.sh
#   PARTS=tests TESTS_K=fsdp bash benchmarks/gpu_session.sh
# Both parts take about 9 minutes on one H200 (tests ~5, bench ~5): run them in two calls.
set -u
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PARTS=${PARTS:-"tests bench"}
t0=$(date +%s)
if [ -f .whl/site.tgz ]; then mkdir -p /tmp/site && tar xzf .whl/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site; fi
rm -rf .gpu && mkdir -p .gpu && tar xzf .whl/gpu.tgz -C .gpu
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, peft, bitsandbytes, accelerate, deepspeed; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"
PYTHONPATH=tests python3 -c "from tiny_continual import make_tiny_base; make_tiny_base('.gpu/ws/base', '.gpu/ws/tok', old_vocab_size=32000, experts=8, layers=1)" > /dev/null 2>&1 || echo "building the tiny base failed"
echo "set-up took $(( $(date +%s) - t0 )) s"
for part in $PARTS; do
  s=$(date +%s)
  case $part in
    tests)
      # -v and a per-test timeout under the part's: each result (or a timed-out test's stacks) reaches the log
      GRAFT_TEST_WS=$PWD/.gpu/ws GRAFT_GPU_REPORT=$OUT/engines.jsonl timeout "${TESTS_S:-360}" \
        python3 -u -m pytest -v -rA -p no:cacheprovider --timeout "${TEST_TIMEOUT_S:-150}" \
        tests/test_continual_gpu.py ${TESTS_K:+-k "$TESTS_K"} > "$OUT/tests.log" 2>&1
      echo "tests rc=$? in $(( $(date +%s) - s )) s"; grep -E "passed|failed|^(PASSED|FAILED|ERROR)" "$OUT/tests.log" | tail -8
      cat "$OUT/engines.jsonl" 2>/dev/null ;;
    bench)
      timeout "${BENCH_S:-300}" python3 benchmarks/bench_gpu_train.py run --prepared .gpu/bench --out "$OUT" \
        ${ONLY:+--only $ONLY} > "$OUT/bench.log" 2>&1
      echo "bench rc=$? in $(( $(date +%s) - s )) s"; grep -v "^|" "$OUT/bench.log" | cut -c1-600 | tail -12
      cat "$OUT/bench_gpu_train.md" 2>/dev/null ;;
  esac
done
echo "total $(( $(date +%s) - t0 )) s"
