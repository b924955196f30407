#!/usr/bin/env bash
# Packs what the GPU host needs into .gpu/ (git-ignored, ~35 MB): the published app without the CPU libtorch, and a
# .NET runtime. The GPU host has PyTorch (whose libtorch TorchSharp 0.107 loads) but no .NET. See ../shared/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu
dotnet publish src/DiffBIR.Lab.Cli -c Release -r linux-x64 --self-contained false -o .gpu/app -v quiet
# keep only TorchSharp's own native library: the host's libtorch replaces the CPU one
find .gpu/app -name 'libtorch*.so*' -delete
find .gpu/app -name 'libc10*.so*' -delete
find .gpu/app -name 'libgomp*.so*' -delete
rm -rf .gpu/app/runtimes/{win,osx}* 2>/dev/null || true
tar -C /usr/share/dotnet -cJf .gpu/dotnet-rt.tar.xz dotnet host shared/Microsoft.NETCore.App
du -sh .gpu
