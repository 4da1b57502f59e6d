#!/usr/bin/env bash
# Every GPU check in one call, under 8 minutes on one H100/H200, everything on stdout (the logs stay in OUT,
# and each one's tail is printed, so nothing depends on files coming back):
#   bash bench/gpu_check.sh [OUT]            PYTHON=python3 by default; OUT defaults to gpu-check/
# 1. check-env (versions, GPU, the dtype and Newton-Schulz format a run would use);
# 2. the T4 preset's llama model (6 x 384, context 256, batch 64): tokens/s, MFU, first-step (compile) time,
#    memory estimate vs torch.cuda.max_memory_allocated, in bf16 and fp16 + grad scaler, compile off and on,
#    and with Muon (its share of the step; bf16 and fp16 Newton-Schulz);
# 3. GPT-2-small's shape as llama (12 x 768, context 1024, batch 16): bf16, compile off and on (MFU target 45%);
# 4. the attention kernel scaled_dot_product_attention runs (flags, the op that ran, which backends can run);
# 5. Newton-Schulz alone in fp32 / bf16 / fp16 at widths 384-1024;
# 6. model.size=auto's plan for a 30 min budget on this GPU (a 100M-token corpus, 8,192-token vocabulary);
# 7. a short real fp16 run of the T4 preset (grad scaler; compile: auto says off for 200 steps): finite loss.
# A step that fails or runs out of time is reported and the script goes on; the exit code counts failures.
# The time limits add up to 475 s (the expected total is about 6 minutes on an H100).
set -euo pipefail
OUT=${1:-gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
FAILED=0
STARTED=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  local status=0
  echo "=== $name (limit ${limit}s, at $((SECONDS - STARTED))s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || status=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $status after $((SECONDS - STARTED))s"
  if [ "$status" -ne 0 ]; then FAILED=$((FAILED + 1)); fi
}

T4=(--config llm_kaggle_t4.yaml --shape preset)
step check-env 40 "$PYTHON" -m kernel check-env --config configs/llm_kaggle_t4.yaml
step t4-preset 120 "$PYTHON" bench/gpu.py "${T4[@]}" --steps 15 --warmup 3 \
  --settings bf16,fp16,bf16+muon,fp16+muon,bf16+compile,fp16+compile
step gpt2-small-llama 80 "$PYTHON" bench/gpu.py --arch llama --steps 10 --warmup 3 --settings bf16,bf16+compile
step sdpa 25 "$PYTHON" bench/gpu.py "${T4[@]}" --sdpa
step newton-schulz 25 "$PYTHON" bench/newton_schulz.py --widths 384,768,1024 --repeats 5 --steps 5
step plan-30min 105 "$PYTHON" bench/gpu.py --config llm_kaggle_t4.yaml --plan 1800 --plan-tokens 1e8
step fp16-run 70 "$PYTHON" -m kernel --config configs/llm_kaggle_t4.yaml --set train.dtype=float16 \
  --set train.max_steps=200 --set train.eval_interval=100 --set train.checkpoint_interval=100 \
  --set sample.max_new_tokens=50 --set train.resume=never --out "$OUT/run-float16"
step fp16-loss 10 "$PYTHON" -c "import json, math, sys
s = json.load(open('$OUT/run-float16/summary.json'))
print(json.dumps({k: s[k] for k in ('val_loss', 'train_loss', 'tokens_per_s', 'mfu', 'dtype', 'device', 'steps')}))
sys.exit(0 if math.isfinite(s['val_loss']) and s['val_loss'] < 3.0 else 1)"
echo "=== gpu_check: $FAILED step(s) failed, $((SECONDS - STARTED))s in all"
exit "$FAILED"
