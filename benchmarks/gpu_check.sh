#!/usr/bin/env bash
# One short benchmark run for a lent GPU machine (about 3-5 minutes on an H100 with 16 cores).
#
# Run from the repository root with the wheels carried (.whl/ is git-ignored):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# It writes $OUT/bench_gpu.md (OUT defaults to /tmp/gpu_out when unset).
#   bash benchmarks/gpu_check.sh --smoke    # every step on the CPU, tiny sizes (under a minute)
# Env: BENCH_ARGS (bench_expand.py), PRECISION_ARGS (bench_precision.py, e.g. --compile), TRAIN_DEMO=1.
# `cogalign train` (bf16 + gradient checkpointing + ZeRO-2) runs when transformers, accelerate, peft and
# deepspeed are importable (their wheels in .whl/); otherwise it says it was skipped.
#
# The GPU machine has torch, pillow, pyarrow, numpy, rich, typer, pyyaml, safetensors and psutil,
# but not orjson, ijson or taming-transformers: their cp312 wheels come from .whl/. cogalign
# itself is used from the working tree through PYTHONPATH (no install).
set -uo pipefail
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
DEVICE=cuda
[ "$SMOKE" = 1 ] && DEVICE=cpu
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$SECONDS

echo "== machine (device $DEVICE)"
[ "$SMOKE" = 1 ] || nvidia-smi || echo "nvidia-smi failed"
echo "cores: $(nproc)"
python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
'| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"

echo "== wheels"
if [ "$SMOKE" = 1 ] && python3 -c "import orjson, ijson, taming.modules" 2>/dev/null; then
  echo "smoke: orjson, ijson and taming already importable; no wheels installed"
  export PYTHONPATH=$PWD
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: was .whl carried?"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
fi

echo "== imports"
python3 - <<'EOF'
import sys
import cogalign.expand.executor  # noqa: F401
print("cogalign.expand.executor imports datasets:", "datasets" in sys.modules)
print("cogalign.expand.executor imports torch:", "torch" in sys.modules)
EOF

if [ "$SMOKE" = 1 ]; then
  DEFAULT_BENCH="--records 4 --resolution 64 --workers 1 --batch-size 4 --skip-baseline --renderer-reps 1"
  DEFAULT_PRECISION="--smoke"
else
  # issue 16: whole call vs the naive loop and pipeline efficiency need >= 2,000 records
  # (the CPU-vs-GPU index agreement of earlier runs: BENCH_ARGS="--records 96 --workers 12 --batch-size 64 --agreement")
  DEFAULT_BENCH="--records 2000 --workers $(( $(nproc) - 1 )) --batch-size 64"
  DEFAULT_PRECISION="--device cuda --regions 256"
fi
echo "== bench_expand on $DEVICE (whole call vs the naive loop, pipeline efficiency)"
timeout 420 python3 benchmarks/bench_expand.py --device "$DEVICE" ${BENCH_ARGS:-$DEFAULT_BENCH} \
  | tee "$OUT/bench_gpu.md"
status=${PIPESTATUS[0]}

echo "== main-process CPU per record, records/s and the tree's memory with shard workers (bench_scale.py)"
if [ "$SMOKE" = 1 ]; then SCALE="--records 8 --base-records 4 --workers 1 --targets vq,px"
else SCALE="--records 2000 --base-records 200 --workers $(( $(nproc) - 1 )) --targets px;vq,px --batch-size 64"; fi
timeout 300 python3 benchmarks/bench_scale.py $SCALE | tee -a "$OUT/bench_gpu.md"

echo "== encoder modes: regions/s, FLOPs/region, share of the bf16 matmul rate, indices equal to fp32"
timeout 300 python3 benchmarks/bench_precision.py $DEFAULT_PRECISION ${PRECISION_ARGS:-} | tee -a "$OUT/bench_gpu.md"
pstatus=${PIPESTATUS[0]}
[ "$status" = 0 ] && status=$pstatus

echo "== indices independent of the caller's batching (spec 7)"
DEVICE=$DEVICE SIZE=$([ "$SMOKE" = 1 ] && echo 64 || echo 336) python3 - <<'EOF2' | tee -a "$OUT/bench_gpu.md"
import os
import numpy as np
from pathlib import Path
from cogalign.inputs.images import load_image, to_working
from cogalign.tokenizers import load_tokenizer
device, s = os.environ["DEVICE"], int(os.environ["SIZE"])
tok = load_tokenizer("demo", device=device)
imgs = sorted(Path("examples/images").iterdir())
crops = np.stack([to_working(load_image(p), (2 * s, 2 * s))[y:y + s, x:x + s]
                  for p in imgs for y in (0, s) for x in (0, s)])
whole = tok.encode(crops)
ones = np.concatenate([tok.encode(crops[i:i + 1]) for i in range(len(crops))])
odd = np.concatenate([tok.encode(crops[i:i + 5]) for i in range(0, len(crops), 5)])
print(f"{device}, {len(crops)} regions: batch {len(crops)} vs 1: {(whole == ones).mean():.6f}, vs 5: {(whole == odd).mean():.6f} equal")
EOF2

echo "== cogalign train: bf16 + gradient checkpointing + ZeRO-2 on one GPU, tiny model"
# Needs transformers, accelerate, tokenizers, peft (+ deepspeed on the GPU) importable: carry their wheels in .whl/.
if python3 -c "import transformers, accelerate, peft" 2>/dev/null; then
  TD=$(mktemp -d)
  python3 -m cogalign expand examples/llava_mini.json --out "$TD/data" --vq-resolution 64 --px-resolution 16 \
    --workers 0 --no-progress 2>&1 | tail -1
  TRAIN_ARGS="--model tiny --data $TD/data --max-steps 8 --global-batch-size 4 --per-device-batch-size 2
    --max-length 512 --lr projector=3e-3 --lr vision_tower=3e-3 --lr language_model=3e-3 --no-progress
    --bf16 --gradient-checkpointing"
  if [ "$SMOKE" = 1 ]; then
    echo "smoke: bf16 + gradient checkpointing on the CPU, no DeepSpeed"
    timeout 300 python3 -m cogalign train $TRAIN_ARGS --out "$TD/run" 2>&1 | tail -4
  elif python3 -c "import deepspeed" 2>/dev/null; then
    cat > "$TD/zero2.json" <<'EOF3'
{"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
EOF3
    timeout 420 python3 -m torch.distributed.run --nproc-per-node 1 --standalone -m cogalign train $TRAIN_ARGS \
      --deepspeed "$TD/zero2.json" --out "$TD/run" 2>&1 | tail -4 | tee -a "$OUT/bench_gpu.md"
  else
    echo "deepspeed is not importable: ZeRO-2 skipped (carry its wheel in .whl/)" | tee -a "$OUT/bench_gpu.md"
    timeout 300 python3 -m cogalign train $TRAIN_ARGS --out "$TD/run" 2>&1 | tail -4 | tee -a "$OUT/bench_gpu.md"
  fi
  if ! python3 -c "import json; s = json.load(open('$TD/run/train_summary.json')); print('train_summary:', s['steps'], 'steps,', s['seen'], 'records')" >> "$OUT/bench_gpu.md"; then
    echo "cogalign train failed" | tee -a "$OUT/bench_gpu.md"; status=1
  fi
  tail -1 "$OUT/bench_gpu.md"
  [ "$SMOKE" = 1 ] || timeout 300 python3 benchmarks/bench_train.py --device cuda --repeats 1 | tee -a "$OUT/bench_gpu.md"
  rm -rf "$TD"
else
  echo "transformers/accelerate/peft not importable: cogalign train checks skipped" | tee -a "$OUT/bench_gpu.md"
fi

if [ "${TRAIN_DEMO:-0}" = 1 ]; then
  echo "== demo tokenizer trained on the GPU"
  timeout 300 python3 -m cogalign vq train examples/images --out "$OUT/demo" --codes 4096 --steps "${TRAIN_STEPS:-2000}" \
    --batch-size 32 --crop 128 --decoder-dtype float16 --device cuda --seed 0 2>&1 | tail -4
fi
echo "== done in $((SECONDS - start)) s (bench exit $status)"
exit "$status"
