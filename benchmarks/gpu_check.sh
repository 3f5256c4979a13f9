#!/usr/bin/env bash
# One short benchmark run for a lent GPU machine (about 2-4 minutes on an H100 with 16 cores).
#
# Run from the repository root with the wheels carried (.whl/ is git-ignored):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# It writes $OUT/bench_gpu.md (OUT defaults to /tmp/gpu_out when unset).
#
# The GPU machine has torch, pillow, pyarrow, numpy, rich, typer, pyyaml, safetensors and psutil,
# but not orjson, ijson or taming-transformers: their cp312 wheels come from .whl/. cogalign
# itself is used from the working tree through PYTHONPATH (no install).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$SECONDS

echo "== machine"
nvidia-smi || echo "nvidia-smi failed"
echo "cores: $(nproc)"
python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
'| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"

echo "== wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: was .whl carried?"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD

echo "== imports"
python3 - <<'EOF'
import sys
import cogalign.executor  # noqa: F401
print("cogalign.executor imports datasets:", "datasets" in sys.modules)
print("cogalign.executor imports torch:", "torch" in sys.modules)
EOF

echo "== bench_expand on cuda (with the CPU-vs-GPU index agreement)"
timeout 420 python3 benchmarks/bench_expand.py --device cuda ${BENCH_ARGS:---records 96 --workers 12 --batch-size 64 --agreement} \
  | tee "$OUT/bench_gpu.md"
status=${PIPESTATUS[0]}

echo "== GPU indices independent of the caller's batching (spec 7)"
python3 - <<'EOF2' | tee -a "$OUT/bench_gpu.md"
import numpy as np
from pathlib import Path
from cogalign.images import load_image, to_working
from cogalign.tokenizers import load_tokenizer
tok = load_tokenizer("demo", device="cuda")
imgs = sorted(Path("examples/images").iterdir())
crops = np.stack([to_working(load_image(p), (672, 672))[y:y + 336, x:x + 336]
                  for p in imgs for y in (0, 336) for x in (0, 336)])
whole = tok.encode(crops)
ones = np.concatenate([tok.encode(crops[i:i + 1]) for i in range(len(crops))])
odd = np.concatenate([tok.encode(crops[i:i + 5]) for i in range(0, len(crops), 5)])
print(f"cuda, {len(crops)} regions: batch {len(crops)} vs 1: {(whole == ones).mean():.6f}, vs 5: {(whole == odd).mean():.6f} equal")
EOF2

if [ "${TRAIN_DEMO:-0}" = 1 ]; then
  echo "== demo tokenizer trained on the GPU"
  timeout 300 python3 -m cogalign vq train examples/images --out "$OUT/demo" --codes 4096 --steps "${TRAIN_STEPS:-2000}" \
    --batch-size 32 --crop 128 --decoder-dtype float16 --device cuda --seed 0 2>&1 | tail -4
fi
echo "== done in $((SECONDS - start)) s (bench exit $status)"
exit "$status"
