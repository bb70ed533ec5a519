#!/usr/bin/env bash
# The wheels bench/gpu.sh installs on a lent GPU machine (device tool), which has python3.12, torch 2.11,
# transformers 5.17, accelerate, tokenizers, huggingface-hub and pandas / pyarrow but no internet:
# downloaded here into .whl/ (ignored by git; the device tool carries it with `carry: [".whl"]`, ~16 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && (grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude)
for pkg in trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tomli-w==1.2.0 transformers==5.23.0 peft==0.21.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg"
done
du -sh .whl
