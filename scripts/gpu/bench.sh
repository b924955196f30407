#!/usr/bin/env bash
# Runs on the GPU host (device tool): `run` with carry [".gpu"] and command `bash scripts/gpu/bench.sh`.
# Builds nothing: it unpacks the runtime packed by scripts/gpu/pack.sh, points TorchSharp at the host's PyTorch
# libtorch, runs `diffbir-lab bench pipeline` (full-size v2 pipeline, random weights, the issue's settings) and, when
# an export of the official code is carried as .gpu/diffbir (DIFFBIR_SRC), times it on the same card in the same run.
# Details go to $OUT; a short table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/dn && tar -C /tmp/dn -xJf .gpu/dotnet-rt.tar.xz
export DOTNET_ROOT=/tmp/dn
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')"):${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
timeout 480 /tmp/dn/dotnet .gpu/app/diffbir-lab.dll bench pipeline --device cuda --runs 3 --json "$OUT/ours.json" 2>&1 | tee "$OUT/ours.log"
if [ -d .gpu/diffbir ] && [ -f scripts/gpu/official_bench.py ]; then
  DIFFBIR_SRC=.gpu/diffbir timeout 300 python3 scripts/gpu/official_bench.py --json "$OUT/official.json" 2>&1 | tee "$OUT/official.log"
fi
echo "== summary ($(date -u +%F), $(cat "$OUT/card.txt"))"
grep -A12 "precision" "$OUT/ours.log" | tail -12
