#!/usr/bin/env bash
# Regenerates the committed tiny DiffBIR weights (weights/tiny/*.safetensors + recipe.json) with the project's own
# training code on the CPU: VAE -> UNet prior -> stage 1 (SwinIR) -> IRControlNet, on procedural images.
# Same seed and thread count on the same machine -> byte-identical safetensors (recipe.json also records the wall
# time, which differs). Usage: scripts/train-tiny.sh [-o DIR] [--seed N] [--threads N]   (defaults: the committed run)
set -euo pipefail
cd "$(dirname "$0")/.."
./lab setup >/dev/null
exec dotnet src/DiffBIR.Lab.Cli/bin/Release/net10.0/diffbir-lab.dll weights train-tiny "$@"
