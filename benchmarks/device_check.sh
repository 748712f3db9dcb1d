#!/usr/bin/env bash
# GPU checks for issue 11, sized for a lent GPU (well under 4 minutes in all):
#   1. the CUDA tests (python -m pytest -m cuda),
#   2. a short GPU speed run: DeiT-S and DeiT-Ti (random weights), batch 1/8/32/128, eager,
#      ratios vs stock timm and original ToMe in interleaved rotated rounds,
#   3. the same compiled (torch.compile), DeiT-S at batch 1 and 32 only (compiling is the slow part).
# Results land in $OUT (default ./device-out). Run from the repository root:  bash benchmarks/device_check.sh
set -u
OUT="${OUT:-device-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" >> "$OUT/gpu.txt" 2>&1

timeout 90 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda_tests.txt" 2>&1
echo "cuda tests rc=$?" | tee -a "$OUT/gpu.txt"

timeout 60 "$PY" benchmarks/bench_vs_tome.py --device cuda --model deit_small_patch16_224 deit_tiny_patch16_224 \
    --batch-sizes 1 8 32 128 --r 0 16 --rounds 12 > "$OUT/speed_gpu_eager.md" 2>&1
echo "eager speed rc=$?" | tee -a "$OUT/gpu.txt"

timeout 150 "$PY" benchmarks/bench_vs_tome.py --device cuda --model deit_small_patch16_224 \
    --batch-sizes 1 32 --r 0 16 --rounds 12 --compiled > "$OUT/speed_gpu_compiled.md" 2>&1
echo "compiled speed rc=$?" | tee -a "$OUT/gpu.txt"
cat "$OUT/gpu.txt" "$OUT/cuda_tests.txt" | tail -20
