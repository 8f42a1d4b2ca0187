#!/usr/bin/env bash
# Everything a lent GPU session should measure, as one command (about 6-8 minutes on one H100):
#   bash tools/gpu_checks.sh            # results in $OUT (the device tool's folder) or ./gpu_results
# 1. the fused attention kernels against the XLA reference (forward and gradients);
# 2. bench.py rows for BENCHMARKS.md: full SFT MFU at 4096 packed tokens (cuDNN and XLA attention),
#    LoRA vs full tokens/s, compile time for 2 vs 16 layers;
# 3. the MoE experts' grouped matmul: XLA's ragged_dot against jaxsft's blocked one (which moe.py uses off TPU).
# The step and the kernels need only jax, flax, optax, orbax, transformers, safetensors, pyyaml and tqdm,
# which the device image has; grain/datasets are not needed (--synthetic rows).
set -u -o pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=.95
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u;
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/machine.txt"

JAX_PLATFORMS=cuda $PY -m pytest -q -p no:cacheprovider tests/model/test_kernels.py 2>&1 | tee "$OUT/kernels.txt"

bench() {  # name, then bench.py arguments
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/bench.log"
  $PY tools/bench.py --config "${CONFIG:-configs/bench_llama1b.yaml}" --synthetic --random_init "$@" \
    2>>"$OUT/bench.log" \
    | tail -n 1 | sed "s/^{/{\"row\": \"$name\", /" | tee -a "$OUT/bench.jsonl"
}
bench full_cudnn --steps 10 --warmup 3 attention_impl=cudnn
bench full_pallas --steps 10 --warmup 3 attention_impl=pallas
bench full_xla --steps 10 --warmup 3 attention_impl=xla
bench lora_cudnn --steps 10 --warmup 3 attention_impl=cudnn finetuning_type=lora
bench full_cudnn_remat_full --steps 5 --warmup 2 attention_impl=cudnn remat_policy=full
bench compile_2_layers --compile_only --steps 1 --warmup 0 --layers 2
bench compile_16_layers --compile_only --steps 1 --warmup 0 --layers 16

echo "== MoE grouped matmul (one Qwen3-30B-A3B projection)" | tee -a "$OUT/bench.log"
$PY tools/bench_grouped.py 2>>"$OUT/bench.log" | tee -a "$OUT/grouped.jsonl"
