#!/usr/bin/env bash
# Times full-size stage-2 training steps (IRControlNet on SD 2.1, 512×512 crops, fp32) on the GPU host.
# Prepared, not yet run (no GPU was lent when it was written). Runs like bench.sh: first `bash scripts/gpu/pack.sh`
# here (publishes the CLI into .gpu/, ~35 MB, git-ignored), then the device tool's `run` with carry [".gpu"] and
# command `bash scripts/gpu/train_stage2_step.sh`. The GPU host has PyTorch (whose libtorch TorchSharp 0.107 loads)
# but no .NET, no weights and no network: the networks are full-size with seeded random weights (--random-init), the
# data are synthetic 640×576 PNGs written here with the Python standard library. Budget: ~2 min start + ~3 min run.
# Prints, per batch size and variant, the median wall time of steps 3..N (loader wait shown separately) and peak memory.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-6}
BATCHES=${BATCHES:-"1 4"}
VARIANTS=${VARIANTS:-"irc"}
mkdir -p /tmp/dn && tar -C /tmp/dn -xJf .gpu/dotnet-rt.tar.xz
export DOTNET_ROOT=/tmp/dn
export LD_LIBRARY_PATH=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')"):${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"

python3 - <<'EOF'
import os, struct, zlib, math
os.makedirs('/tmp/hq', exist_ok=True)
def png(path, w, h, k):
    rows = []
    for y in range(h):
        rows.append(b'\x00' + bytes(v for x in range(w) for v in (
            int(127 + 127 * math.sin((x + 13 * k) / 9.0)), int(255 * (((x >> 4) + (y >> 4) + k) & 1)), (y * 3 + 40 * k) & 255)))
    def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(b''.join(rows))) + chunk(b'IEND', b''))
for k in range(8): png(f'/tmp/hq/hq{k}.png', 640, 576, k)
EOF

for v in $VARIANTS; do
  for b in $BATCHES; do
    run=/tmp/run_${v}_b$b
    rm -rf "$run"
    # peak GPU memory by polling nvidia-smi (TorchSharp exposes no max_memory_allocated)
    ( while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done ) > "$OUT/mem_${v}_b$b.txt" &
    poll=$!
    timeout 240 /tmp/dn/dotnet .gpu/app/diffbir-lab.dll train stage2 --random-init --variant "$v" --data /tmp/hq -o "$run" \
      --steps "$STEPS" --batch-size "$b" --device cuda --threads 16 --queue 32 --log-every 1 --ckpt-every 0 \
      --val-every 0 --sample-every 0 2>&1 | tee "$OUT/train_${v}_b$b.log"
    kill $poll 2>/dev/null
    cp "$run/metrics.csv" "$OUT/metrics_${v}_b$b.csv" 2>/dev/null
    rm -rf "$run/checkpoints"   # the final ControlNet checkpoint (~1.4 GB) is not needed
  done
done

echo "== summary ($(date -u +%F), $(cat "$OUT/card.txt"))"
python3 - "$OUT" <<'EOF'
import csv, glob, os, statistics, sys
out = sys.argv[1]
for f in sorted(glob.glob(os.path.join(out, 'metrics_*.csv'))):
    rows = list(csv.DictReader(open(f)))[2:]   # steps 1-2: warm-up (cuDNN autotune, allocator)
    if not rows: print(os.path.basename(f), 'no timed steps'); continue
    sec = statistics.median(float(r['seconds']) for r in rows)
    data = statistics.median(float(r['data_seconds']) for r in rows)
    tag = os.path.basename(f)[len('metrics_'):-4]
    mem = [int(x) for x in open(os.path.join(out, f'mem_{tag}.txt')).read().split() if x.isdigit()]
    print(f'{tag}: {sec:.3f} s/step (loader wait {data:.3f} s), steps {rows[0]["step"]}..{rows[-1]["step"]}, '
          f'peak GPU memory {max(mem) if mem else "?"} MiB, last loss {rows[-1]["loss"]}')
EOF
