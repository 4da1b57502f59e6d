#!/usr/bin/env bash
# The GPU checks to run in one go when a session is lent a device (about 8 minutes on an H100/H200):
#   bash bench/gpu_check.sh [OUT]     (results and logs in OUT, default gpu-check/)
# 1. the environment report; 2. bench/gpu.py (GPT-2-124M shape: bf16/fp16 x compile, tokens/s, MFU);
# 3. short real runs of the program in fp16 (grad scaler) and bf16 on the demo corpus, checked for a finite,
#    falling loss; 4. the GPU-relevant tests (sampling/export on the GPU run's checkpoint).
set -u
OUT=${1:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
$PY -m kernel check-env | tee "$OUT/check-env.txt"
timeout 420 $PY bench/gpu.py | tee "$OUT/gpu-bench.jsonl"
for dtype in float16 bfloat16; do
  timeout 120 $PY -m kernel --config configs/llm_kaggle_t4.yaml --set train.dtype=$dtype --set train.max_steps=200 \
    --set train.eval_interval=100 --set train.checkpoint_interval=100 --set sample.max_new_tokens=50 \
    --out "$OUT/run-$dtype" > "$OUT/run-$dtype.log" 2>&1
  echo "run $dtype: exit $?"
  $PY -c "import json,math,sys; s=json.load(open('$OUT/run-$dtype/summary.json')); \
print(json.dumps({k: s[k] for k in ('val_loss','tokens_per_s','mfu','dtype','device','steps')})); \
sys.exit(0 if math.isfinite(s['val_loss']) and s['val_loss'] < 3.0 else 1)" | tee -a "$OUT/runs.jsonl"
done
timeout 120 $PY -m kernel sample "$OUT/run-float16/checkpoints/ckpt_00000200.pt" --prompt "The " --max-new-tokens 40 \
  > "$OUT/sample.txt" 2>&1; echo "sample: exit $?"
