#!/usr/bin/env bash
# Speed on a CUDA GPU in one command: the benchmark (training against its floor, both samplers of
# the uncertainty passes against theirs, JitTrace_ELBO) and a default 5-epoch run.
# For a machine with torch but without pyro-ppl and without network, prepare two git-ignored folders
# from the repository root first, on a machine that has them:
#
#   python -m pip download --no-deps --only-binary=:all: -d .whl pyro-ppl pyro-api
#   mkdir -p .gpu_data && cp -r DIR/MNIST .gpu_data/        # DIR: your MNIST folder
#
# then, on the GPU machine, from the repository root: bash docs/contributing/gpu_check.sh
# It prints (and leaves under $OUT, by default gpu_out/) the card, the benchmark and the run.
set -euo pipefail
if ! python3 -c "import pyro" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"
DATA="${DATA:-.gpu_data}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 benchmarks/bench.py --device cuda --full-epoch --rounds 3 --jit --data-dir "$DATA" 2>&1 | tee "$OUT/bench.txt"
python3 bnn_mnist.py --device cuda --data-dir "$DATA" --out-dir "$OUT/run" --ood noise 2>&1 | tee "$OUT/run.txt"
