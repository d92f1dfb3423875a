#!/usr/bin/env bash
# The GPU suite: the GPU tests and the benchmarks, each step with its own time limit (one slow step cannot eat
# the whole call; a failing step is reported and the next one still runs). Logs, JSON and plots gather in
# bench/results/session/; where $OUT is set (the device tool), they come back as one $OUT/session.tgz.
#   bash bench/gpu_session.sh [STEP ...]
# Steps: tests tests_alloc tests_engine alloc stress elastic elastic8 elastic_layer elastic_grouped
#   elastic_grouped8 decode prefill hf_generate serve multimodel multimodel_768 multimodel_768_processes
#   multimodel_long multimodel_long_args multimodel_processes multimodel_skew
#   demo tp serve_compiled serve_capped serve_process serve_trace serve_trace_graphs
#   engine_steps engine_steps_compiled. With none: tests alloc elastic decode
#   prefill (over 10 minutes: split them over calls, e.g. `tests`, then `alloc elastic decode prefill`).
# The tuning sweeps and probes live in tools/ (tools/README.md) and run by hand.
set -u
LOGS=bench/results/session
mkdir -p "$LOGS"
STAMP=$(mktemp) && touch "$STAMP"  # results written after this are this call's
export PATH="$(dirname "$(python3 -c 'import sys; print(sys.executable)')"):$PATH" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
if [ -d .whl ]; then  # the serving extras the device lacks (fastapi, uvicorn, pydantic, ...), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "installing .whl failed"
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests alloc elastic decode prefill)
status=0
run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  [ $rc -eq 0 ] || { echo "== $name exited $rc"; status=1; }
}
shards() {  # shards NAME GROUP...: the GPU tests of each group in its own pytest process, all at once (Triton
  # compiles on the CPU; one GPU is shared), each limited to 420 s
  local name=$1 i=0 pids=() rc=0; shift
  for g in "$@"; do
    # shellcheck disable=SC2086
    timeout 420 pytest -m gpu -q -p no:cacheprovider --durations=5 $g >"$LOGS/$name-$i.log" 2>&1 &
    pids+=($!); i=$((i + 1))
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  for f in "$LOGS/$name"-*.log; do echo "-- $f"; grep -E "passed|failed|error|FAILED|ERROR" "$f" | tail -n 8; done
  return $rc
}
# tests: the kernels' tests and the rest. At VKV_GPU_SAMPLE=10 the extend shard takes ~270 s alone (two tile
# tables to compile): run `tests` with at most a short step after it in one call. tests_alloc: the rest only
# (allocator, cache, engine, server), in three shards.
tests() {
  shards tests "tests/kernels/test_decode.py" "tests/kernels/test_extend.py" \
    "tests/kernels/test_paged_decode.py tests/kernels/test_store.py tests/kernels/test_no_sync.py" \
    "$(ls tests/test_*.py | tr '\n' ' ')"
}
tests_alloc() {
  local files=(tests/test_*.py) groups=("" "" "") i=0
  for f in "${files[@]}"; do groups[$((i % 3))]+="$f "; i=$((i + 1)); done
  shards tests_alloc "${groups[@]}"
}
keep() {  # keep NAME: the rows an earlier call on this machine wrote (bench/results/session/ stays between calls
  # on a warm machine; bench/results/ is the working tree's copy again each call), for --keep to add to
  [ -f "$LOGS/$1" ] && cp "$LOGS/$1" bench/results/
}
for step in "${steps[@]}"; do
  case $step in
    tests) echo "== tests"; tests || { echo "== tests failed"; status=1; } ;;
    tests_alloc) echo "== tests_alloc"; tests_alloc || { echo "== tests_alloc failed"; status=1; } ;;
    alloc) run alloc 90 python3 bench/alloc.py ;;
    stress) run stress 150 python3 bench/stress.py --backend cuda ;;  # 8 processes x 60 s on one ledger
    elastic) run elastic 150 python3 bench/elastic.py ;;
    elastic8) run elastic8 150 python3 bench/elastic.py --page-mib 8 ;;  # the same with 8 MiB pages
    elastic_layer) run elastic_layer 150 python3 bench/elastic.py --layout layer ;;  # (a) layer-major
    elastic_grouped) run elastic_grouped 200 python3 bench/elastic.py --layout grouped --group-layers 8 ;;  # 4 planes
    elastic_grouped8) run elastic_grouped8 200 python3 bench/elastic.py --layout grouped --group-layers 8 --page-mib 8 ;;
    decode) run decode 250 python3 bench/decode.py ;;
    prefill) run prefill 150 python3 bench/prefill.py ;;
    hf_generate) run hf_generate 540 python3 bench/hf_generate.py --cases "${VKV_HF_CASES:-1x8192,8x512}" ;;  # JSON per case
    tests_engine) run tests_engine 300 pytest -m gpu -q -p no:cacheprovider tests/test_engine.py tests/test_hf.py \
      tests/test_slot_batch.py tests/test_attention.py tests/test_readme.py ;;  # the engine's CUDA graphs
    serve) run serve 540 python3 bench/serve.py ;;  # offline, decode steps, generate_batch, the server
    multimodel) keep multimodel.json; run multimodel 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} \
      ${VKV_STAGGER:+--stagger $VKV_STAGGER} --keep ;;  # one load point
      # a call (VKV_PEAKS=16, then 20: ~250 s each); --keep adds it to the other peaks' rows in multimodel.json.
      # Every multimodel step keeps the models' humps apart at its peak (2 x peak s); VKV_STAGGER=S sets S
    multimodel_long) keep multimodel-long.json; run multimodel_long 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} --prompt 2048 \
      --output 128 ${VKV_STAGGER:+--stagger $VKV_STAGGER} --out bench/results/multimodel-long.json --keep ;;  # long prompts,
      # humps that do not overlap (ramp 1: 2 x peak - 1 s each): memory binds a static share before compute does
    multimodel_768) keep multimodel-768.json; run multimodel_768 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} \
      --prompt 256 --output 768 ${VKV_STAGGER:+--stagger $VKV_STAGGER} --out bench/results/multimodel-768.json --keep ;;  # vkv
      # demo's GPU scenario (~240 s at peak 12 on an H100): a static share runs out at the peak, compute has room
    multimodel_768_processes) run multimodel_768_processes 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} \
      --prompt 256 --output 768 ${VKV_STAGGER:+--stagger $VKV_STAGGER} --mode processes \
      --out bench/results/multimodel-768-processes.json ;;  # the same, each model a `vkv serve` of its own, one ledger
    multimodel_long_args) run multimodel_long_args 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} \
      --prompt ${VKV_PROMPT:-2048} --output ${VKV_OUTPUT:-128} ${VKV_STAGGER:+--stagger $VKV_STAGGER} --out bench/results/multimodel-long-args.json \
      --serve-args="${VKV_SERVE_ARGS:---graph-tokens 0}" ;;  # the same load, the servers with other options
      # (default: the steps that prefill eager, not as CUDA graphs); VKV_PROMPT / VKV_OUTPUT change the lengths
    multimodel_processes) run multimodel_processes 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} --prompt 2048 \
      --output 128 ${VKV_STAGGER:+--stagger $VKV_STAGGER} --mode processes --out bench/results/multimodel-processes.json ;;
      # the long-prompt load, each model a `vkv serve` process of its own on one ledger
    multimodel_skew) run multimodel_skew 540 python3 bench/multimodel.py --peaks ${VKV_PEAKS:-12} --prompt 2048 \
      --output 128 ${VKV_STAGGER:+--stagger $VKV_STAGGER} --skew --out bench/results/multimodel-skew.json ;;  # popularity 1, 1/2, 1/4
    demo) run demo 540 vkv demo --out bench/results/demo.json ;;
    tp) run tp 560 python3 bench/tp.py --cases "${VKV_TP_CASES:-llama-3-8b@1,llama-3-8b@2,llama-3-70b@2}" \
      --timeout 240 ;;  # two GPUs or more: TP=1 against TP=2 (8B), 70B at TP=2 (VKV_TP_CASES: some of them a call)
    serve_compiled) run serve_compiled 540 python3 bench/serve.py --only steps --compile \
      --out bench/results/serve-compiled.json ;;  # the decode steps with the layers under torch.compile
    serve_capped) run serve_capped 540 python3 bench/serve.py --only server --prefill-with-decode 512 \
      --out bench/results/serve-capped.json ;;  # the server with short decoding steps
    serve_process) run serve_process 540 python3 bench/serve.py --only steps,baseline,server --both-servers --compile \
      --prefill-with-decode 256 --out bench/results/serve-process.json ;;  # compiled; generate_batch (the layers
      # eager for it); the server rows in-process, then from an engine process, each against its own offline run
    serve_trace) run serve_trace 300 python3 bench/serve.py --only server --compile --requests 192 \
      --prefill-with-decode 256 --graph-tokens 0 --out bench/results/serve-trace.json ;;  # ~80 s on a warm H100:
      # the in-process server rows alone, with their step trace ("tail"), the steps that prefill eager
    serve_trace_graphs) run serve_trace_graphs 300 python3 bench/serve.py --only server --compile --requests 192 \
      --prefill-with-decode 256 --graph-tokens 512 --out bench/results/serve-trace-graphs.json ;;  # serve_trace with
      # the steps that prefill (up to 512 tokens) as CUDA graphs (the default): run it beside serve_trace, in one call
    engine_steps) run engine_steps 300 python3 tools/engine_steps.py --batches 1,32 --steps 32 ;;
    engine_steps_compiled) run engine_steps_compiled 540 python3 tools/engine_steps.py --batches 1,32 --steps 32 \
      --compile ;;
    *) echo "unknown step $step"; status=2 ;;
  esac
  # what this call wrote (not the working tree's copies: they would replace an earlier call's in $LOGS)
  find bench/results tools/results -maxdepth 1 \( -name '*.json' -o -name '*.png' \) -newer "$STAMP" \
    -exec cp {} "$LOGS"/ \; 2>/dev/null
  [ -n "${OUT:-}" ] && (cd "$LOGS" && find . -type f -newer "$STAMP" -print0 | tar czf "$OUT/session.tgz" --null -T -)
  # after every step (a cut-off call keeps them), only this call's: $LOGS stays between calls on a warm machine
done
exit $status
