#!/usr/bin/env bash
# The GPU check of the speed issue, as one prepared script for the `device` tool's `run`
# (a lent H100/H200; it has torch but not pyro-ppl, and no network). Prepare here first,
# from the repository root (both folders are git-ignored):
#
#   python -m pip download --no-deps --only-binary=:all: -d .whl pyro-ppl pyro-api
#   mkdir -p .gpu_data && cp -r ../shared/data/MNIST .gpu_data/
#
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=480)
# It prints (and leaves under $OUT) the card, the benchmark and a default 5-epoch run.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 benchmarks/bench.py --device cuda --full-epoch --rounds 3 --data-dir .gpu_data 2>&1 | tee "$OUT/bench.txt"
python3 bnn_mnist.py --device cuda --data-dir .gpu_data --out-dir "$OUT/run" --ood noise 2>&1 | tee "$OUT/run.txt"
