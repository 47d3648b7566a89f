#!/usr/bin/env bash
# GPU acceptance run on one H100/H200: the 125M model at 16K context trains (loss, tokens/s, MFU),
# resumes from its sharded checkpoint, exports, then generation and decoding are benchmarked.
# Every stage logs to $RESULTS/<stage>.log and a failing stage does not stop the others.
#   launch/gpu_acceptance.sh [train] [decode_tests] [decode] [token_read] [quality] [entry] [speed] [speed760] [bench_train] [overhead] [saved]
#                            [memory] [window] [window_ab] [profile] [cudagraphs] [step_options] [decode_options] [suite] [slow]
#   (default: train decode)
# entry: the trainer-through-the-launcher GPU test; speed: the 125M/16K run through launch/ with the
# blocks compiled beside the benchmark's row of the same shape (speed760: the same at 760M/16K); memory: what one block saves for
# backward, tttla beside the transformer (saved); memory: the step's peak with and without the recomputations;
# bench_train: one preset of `make bench-train` (PRESET, default 125m);
# window: the sliding window's kernel options and fla's window kernel beside full attention, then window_ab:
# the model's step with FlexAttention and with our window kernel in one process;
# overhead: the trainer's step split into its parts (benchmarks/trainer_overhead.py); profile: the 125M/16K
# step of tttla and the transformer with one profiled step each (kernels and their device time against the wall time);
# cudagraphs: the same step and the trainer's with Inductor's CUDA graphs over the blocks, after their equality test;
# step_options: the same rows once per option set in STEP_OPTIONS ('|' between sets; Inductor options and environment);
# decode_options: the TTT decoder's 4K steps once per set in DECODE_OPTIONS;
# suite: the GPU suite with test durations (SUITE_PATHS: only these files or cases; GPU_WORKERS processes, as
# `make test-gpu`); slow: its long cases.
# STAGE_TIMEOUT (seconds, default none) stops a stage that runs longer, so one hang does not cost the rest;
# DEADLINE (seconds since the script started) stops the stage running at that time and skips the rest,
# so a visit with a hard time limit ends with its archive written.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
RESULTS=${RESULTS:-runs/gpu_acceptance}
RUN=runs/125m_16k_gpu
STEPS=${STEPS:-40}
mkdir -p "$RESULTS"

stage() {  # stage NAME COMMAND...: run, log, report the exit code and the last lines, refresh the archive
  local name=$1; shift
  local limit=${STAGE_TIMEOUT:-0}
  if [ -n "${DEADLINE:-}" ]; then  # what is left of the visit bounds the stage; none left skips it
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -le 5 ]; then echo "== $name: skipped, ${DEADLINE} s deadline reached"; return; fi
    if [ "$limit" -eq 0 ] || [ "$limit" -gt "$left" ]; then limit=$left; fi
  fi
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - start)) s"
  tail -n 4 "$RESULTS/$name.log"
  archive
}

archive() {  # one tarball of everything so far ($ARCHIVE, default $RESULTS.tgz): a run cut short keeps its finished stages
  tar czf "${ARCHIVE:-$RESULTS.tgz}" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" 2>/dev/null || true
}

run_train() {
  local common=(train.grad_accum=2 train.warmup_steps=10 logging.log_every=5 checkpoint.every=20 "logging.run_dir=$RUN")
  stage train launch/h100_125m_16k.sh "train.steps=$STEPS" "${common[@]}"
  stage resume launch/h100_125m_16k.sh "train.steps=$((STEPS + 10))" "${common[@]}" train.resume=auto
  stage export "$PYTHON" -m train.generation.export "$RUN/checkpoints" "$RUN/export"
  stage generate "$PYTHON" -m train.generation.generate --model "$RUN/export" --prompt "def main(" --max-new-tokens 64
  cp -r "$RUN" "$RESULTS/run" && rm -rf "$RESULTS/run/checkpoints" "$RESULTS/run/export"
}

run_decode_tests() {
  stage decode_tests "$PYTHON" -m pytest -q -m gpu tests/gpu/test_token_step_gpu.py tests/gpu/test_ring_attention_gpu.py \
    tests/gpu/test_decode_graphs_gpu.py --durations=0
}

run_decode() {
  # DECODE_ARGS narrows the grid, e.g. "--variants parallel --contexts 4096 65536"
  stage bench_decode "$PYTHON" -m benchmarks.decode --out "$RESULTS/decode" ${DECODE_ARGS:-}
}

run_token_read() {  # the pending-token decoder's fast-weight read at each batch: kernel against torch (benchmarks/token_read.py)
  stage token_read "$PYTHON" -m benchmarks.token_read --out "$RESULTS/token_read.json"
}

run_quality() {
  stage quality "$PYTHON" -m train.evaluation.quality --tokens "${QUALITY_TOKENS:-3e6}" --out "$RESULTS/quality"
}

run_entry() {
  stage entry "$PYTHON" -m pytest -q -x -m gpu tests/gpu/test_train_entry_gpu.py -k zero2 --durations=0
}

speed_against_benchmark() {  # SIZE LAUNCHER STEPS LOG_EVERY SUFFIX [OVERRIDE...]: the run through launch/ with the
  # blocks compiled, then the benchmark's rows of its shape (the trainer should come within 10 % of them)
  local size=$1 launcher=$2 steps=$3 every=$4 suffix=$5; shift 5
  local run=runs/${size}_16k_speed
  rm -rf "$run"
  stage "trainer_speed$suffix" "$launcher" "train.steps=$steps" "$@" train.compile=true "logging.log_every=$every" \
    eval.every=0 checkpoint.every=100000 "logging.run_dir=$run"
  grep -E "^step " "$RESULTS/trainer_speed$suffix.log" | tail -n 3
  stage "bench_speed$suffix" "$PYTHON" -m benchmarks.step --configs "$size" --seqs 16384x1 --impls tttla sdpa \
    --checkpointing none --compile on --out "$RESULTS/train_step_${size}_16k"
}

run_speed() {  # SPEED_ARGS: more trainer overrides, e.g. train.compile_options.cpp_wrapper=true
  speed_against_benchmark 125m launch/h100_125m_16k.sh "${SPEED_STEPS:-30}" 10 "" train.activation_checkpointing=false ${SPEED_ARGS:-}
}

run_speed760() {
  speed_against_benchmark 760m launch/h100_760m_16k.sh "${SPEED_STEPS_760M:-12}" 4 _760m
}

run_bench_train() {  # PRESET=125m|760m|long|selective (benchmarks/step.py), ceiling columns included
  stage bench_train "$PYTHON" -m benchmarks.step --preset "${PRESET:-125m}" --out "$RESULTS/train_step"
}

run_window() {  # the window's kernel choices beside full attention (benchmarks/window_attention.py; WINDOW_ARGS)
  stage window_tests "$PYTHON" -m pytest -q -m "gpu and not gpu_slow" tests/gpu/test_window_attention_gpu.py --durations=0
  stage window "$PYTHON" -m benchmarks.window_attention --out "$RESULTS/window_attention.json" ${WINDOW_ARGS:-}
  run_window_ab
}

run_window_ab() {  # the model's step with each window kernel, one process: FlexAttention, then ours (window_kernel=triton)
  stage window_step "$PYTHON" -m benchmarks.step --configs 125m --seqs 16384x1 65536x1 --impls tttla sdpa \
    --checkpointing none --compile on --no-ceiling --also-with window_kernel=triton --out "$RESULTS/train_step_window"
}

run_profile() {  # PROFILE_SEQS (default 16384x1): whether the step is bound by its kernels or by the host launching
  # them (and which host operators take its time), then the same rows with less host time a kernel: Inductor's CUDA
  # graphs, then its C++ kernel launcher with Dynamo's guards no longer checked after the first step
  local common=(--configs 125m --seqs ${PROFILE_SEQS:-16384x1} --impls tttla sdpa --checkpointing none --compile on
                --no-ceiling --profile --out "$RESULTS/train_step_profile")
  stage step_profile "$PYTHON" -m benchmarks.step "${common[@]}"
  stage step_profile_cudagraphs "$PYTHON" -m benchmarks.step "${common[@]}" --inductor triton.cudagraphs=True
  stage step_profile_cpp_skip_guards "$PYTHON" -m benchmarks.step "${common[@]}" --inductor cpp_wrapper=True --skip-guards
  grep -E "kernels, " "$RESULTS/train_step_profile.md" || true
}

run_cudagraphs() {  # Inductor's CUDA graphs over the compiled blocks: the equality test (graphed steps against plain
  # compiled ones), the 125M/16K rows of both models with the graphs, then the trainer through launch/ with them
  stage cudagraphs_test "$PYTHON" -m pytest -q -m gpu tests/gpu/test_compile_gpu.py -k cuda_graphed --durations=0
  stage cudagraphs_step "$PYTHON" -m benchmarks.step --configs 125m --seqs ${PROFILE_SEQS:-16384x1} --impls tttla sdpa \
    --checkpointing none --compile on --no-ceiling --inductor triton.cudagraphs=True --out "$RESULTS/train_step_cudagraphs"
  SPEED_ARGS="train.compile_options.triton.cudagraphs=true ${SPEED_ARGS:-}" run_speed
}

option_words() {  # SET: split one option set into the arrays env (KEY in capitals) and inductor (the rest); `plain` is none
  env=() inductor=()
  local word words
  read -r -a words <<<"$1"
  for word in "${words[@]}"; do
    if [[ $word == plain ]]; then continue; fi
    if [[ $word =~ ^[A-Z_][A-Z0-9_]*= ]]; then env+=("$word"); else inductor+=("$word"); fi
  done
}

run_step_options() {  # STEP_OPTIONS: option sets separated by '|', each words of KEY=VALUE: Inductor options, or
  # environment variables where KEY is in capitals, or `plain` (e.g. "plain|TTTLA_INLINE_KERNELS=0|triton.cudagraphs=True"); the
  # 125M/16K rows of both models once per set, each in its own process
  local n=0 set sets env inductor
  IFS='|' read -r -a sets <<<"${STEP_OPTIONS:-combo_kernels=True}"
  for set in "${sets[@]}"; do
    n=$((n + 1))
    option_words "$set"
    stage "step_options_$n" env "${env[@]}" "$PYTHON" -m benchmarks.step --configs 125m --seqs ${PROFILE_SEQS:-16384x1} \
      --impls tttla sdpa --checkpointing none --compile on --no-ceiling ${inductor[@]:+--inductor "${inductor[@]}"} \
      --out "$RESULTS/train_step_options_$n"
    grep -E "^\|" "$RESULTS/train_step_options_$n.md" | tail -n 2 || true
  done
}

run_decode_options() {  # DECODE_OPTIONS: option sets as STEP_OPTIONS'; the TTT decoder's steps at 4K (batch 1 and the
  # throughput batch, from a random state: no prefill, no transformer) once per set, each in its own process. The
  # default sets weigh Inductor's matrix-vector products as reductions (coordinate_descent_tuning: a batch-1 step's
  # projections then fuse with the norms, gates and bias work around them) and its horizontal fusion (combo_kernels)
  local n=0 set sets env inductor
  IFS='|' read -r -a sets <<<"${DECODE_OPTIONS:-plain|coordinate_descent_tuning=True|coordinate_descent_tuning=True combo_kernels=True}"
  for set in "${sets[@]}"; do
    n=$((n + 1))
    option_words "$set"
    stage "decode_options_$n" env "${env[@]}" "$PYTHON" -m benchmarks.decode --variants parallel --contexts 4096 \
      --no-baseline --prefill-up-to 0 --steps 24 --warmup 6 ${inductor[@]:+--inductor "${inductor[@]}"} \
      --out "$RESULTS/decode_options_$n"
    grep -E "^\| ttt" "$RESULTS/decode_options_$n.md" || true
  done
}

run_overhead() {
  [ -f data/stdlib_16k/manifest.json ] || "$PYTHON" -m train.data.prepare --stdlib --out data/stdlib_16k --seq-len 16384
  stage trainer_overhead "$PYTHON" -m benchmarks.trainer_overhead configs/train/125m_16k.yaml \
    --out "$RESULTS/trainer_overhead_125m_16k.json" --profile "$RESULTS/trainer_overhead_profile" --syncs "$RESULTS/trainer_overhead_syncs.txt" ${OVERHEAD_ARGS:-}
  cat "$RESULTS/trainer_overhead.log" | grep '^{' || true
}

run_saved() {
  stage saved_tensors "$PYTHON" -m benchmarks.saved_tensors --config 125m --seq-len 16384 \
    --out "$RESULTS/saved_tensors_125m_16k.json"
  stage saved_tensors_recompute "$PYTHON" -m benchmarks.saved_tensors --config 125m --seq-len 16384 \
    --out "$RESULTS/saved_tensors_125m_16k_recompute.json" ttt.save_feature_projections=false
  stage saved_tensors_keep "$PYTHON" -m benchmarks.saved_tensors --config 125m --seq-len 16384 \
    --out "$RESULTS/saved_tensors_125m_16k_keep.json" ttt.recompute_features=false ttt.recompute_inputs=false
  stage saved_tensors_budget "$PYTHON" -m benchmarks.saved_tensors --config 125m --seq-len 16384 --memory-budget 0.8 \
    --out "$RESULTS/saved_tensors_125m_16k_budget.json"
}

run_memory() {  # the step's peak memory at the defaults (features and inputs recomputed) beside the transformer at 16K, 64K and 128K, then what the recomputations and the compiler's budget change at 16K (the saved-tensor breakdown is its own stage: saved)
  local common=(--configs 125m --checkpointing none --compile on --no-ceiling --out "$RESULTS/train_step_memory")
  stage bench_memory "$PYTHON" -m benchmarks.step --impls tttla sdpa --seqs 16384x1 65536x1 131072x1 "${common[@]}"
  stage bench_memory_keep "$PYTHON" -m benchmarks.step --impls tttla --seqs 16384x1 "${common[@]}" \
    --model-overrides ttt.recompute_features=false ttt.recompute_inputs=false
  stage bench_memory_budget "$PYTHON" -m benchmarks.step --impls tttla sdpa --seqs 16384x1 "${common[@]}" --memory-budget 0.8
  grep '^{' "$RESULTS"/bench_memory*.log || true
}

run_suite() {  # suite_times.tsv: each case's time as it ends, kept when the stage is stopped (tests/conftest.py); SUITE_PATHS narrows it
  TTTLA_TEST_TIMES="$RESULTS/suite_times.tsv" \
    stage suite "$PYTHON" -m pytest -q -m "gpu and not gpu_slow" -n "${GPU_WORKERS:-4}" ${SUITE_PATHS:-tests/gpu} --durations=0 --timeout=${SUITE_TIMEOUT:-300}
  grep -E "passed|failed|error" "$RESULTS/suite.log" | tail -n 3
}

run_slow() {
  TTTLA_TEST_TIMES="$RESULTS/suite_slow_times.tsv" \
    stage suite_slow "$PYTHON" -m pytest -q -m gpu_slow tests/gpu --durations=0 --timeout=${SUITE_TIMEOUT:-300}
}

for what in "${@:-train decode}"; do
  for s in $what; do "run_$s"; done
done
archive
exit 0
