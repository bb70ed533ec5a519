#!/usr/bin/env bash
# Issue 7's GPU benchmark on a lent machine (device tool), from the repository root there:
#     bash bench/gpu.sh 125m [compare.py options]      # then 1b
# Installs the wheels of bench/gpu_wheels.sh (carried as .whl) into /tmp/site, runs bench/compare.py
# --gpu SCALE with the machine's python3 for both sides (cherrytop from src/, TRL 1.12.0 for every TRL
# task), and writes the results to $OUT (the device tool's folder that comes back) or bench/out.
set -euo pipefail
SCALE=${1:?usage: bench/gpu.sh 125m|1b [compare.py options]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
DEST=${OUT:-bench/out}
python3 bench/compare.py --gpu "$SCALE" --python python3 --repeats 1 --out "$DEST/gpu-$SCALE.json" "$@"
