#!/bin/bash
# Packs what benchmarks/gpu_session.sh needs on a lent GPU machine, which has no network and its own Python 3.12
# with torch, accelerate and pytest but other versions of transformers/peft and no bitsandbytes, deepspeed or test
# data. Run here (CPU, network for pip), from the repo root; writes the ignored folder .whl/:
#   .whl/site.tgz  the pinned packages (transformers 4.57.6, peft 0.21.2, bitsandbytes 0.50.2 with only its
#                  CUDA 13 and CPU libraries, tokenizers, hub, datasets, deepspeed 0.19.8 and what they need)
#   .whl/gpu.tgz   the prepared inputs: the tiny test workspace's tokenizer and blocks (tests/test_continual_gpu.py),
#                  the 57,000-token tokenizer and 2048-token blocks of benchmarks/bench_gpu_train.py
# Then, with the device tool: run(command="bash benchmarks/gpu_session.sh", carry=[".whl/site.tgz", ".whl/gpu.tgz"])
set -euo pipefail
PY=${PY:-.venv/bin/python}
W=.whl; mkdir -p $W/wheels; grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
plat="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for p in transformers==4.57.6 peft==0.21.2 bitsandbytes==0.50.2 tokenizers==0.22.2 huggingface_hub==0.36.2 \
         datasets==5.0.1 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
         annotated-types==0.8.0 typing-inspection==0.4.5 tomli_w==1.2.0; do
  $PY -m pip download -q --no-deps $plat -d $W/wheels "$p"
done
$PY -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w $W/wheels   # sdist only on PyPI
rm -rf $W/site && $PY -m pip install -q --no-deps --no-compile --target $W/site $plat $W/wheels/*.whl
# bitsandbytes ships a library per CUDA version (120 MB); the machine's torch is built for CUDA 13
find $W/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
rm -rf $W/site/bin && tar czf $W/site.tgz -C $W/site .
rm -rf .gpu && $PY benchmarks/bench_gpu_train.py prepare --out .gpu/bench
$PY - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")  # tests/tiny_continual.py
from tiny_continual import make_blocks, make_tokenizer
root = Path(".gpu/ws")  # the base model is built on the machine (tests/test_continual_gpu.py's gpu_ws layout)
make_tokenizer(root / "tok", n_added=64)
make_blocks(root / "data", root / "tok", block_len=8, n_train=64, n_dev=5)
PY
tar czf $W/gpu.tgz -C .gpu . && rm -rf .gpu
ls -la $W/site.tgz $W/gpu.tgz
