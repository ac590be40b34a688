#!/usr/bin/env bash
# The checks and timings of a GPU machine in one command (bench/RESULTS.md, "TopK training on a GPU").
#
#   bash bench/gpu_check.sh CACHE [SHARD_COPIES]
#
# CACHE: an activation cache made elsewhere (`saescope cache --out CACHE --tokens 24000` fits the
# 64 MiB a session can carry to a lent GPU machine); its first shard is copied SHARD_COPIES times
# (default 32) into /tmp so that training reads several shuffle groups, as from a real cache.
# Runs: the tests (their CUDA cases included), `saescope train` on CUDA in fp32 and bf16, and
# bench/train_throughput.py --device cuda against eai-sparsify. Where the machine's Python has no
# peers or packages of ours, put their wheels in .whl/ (pip download there, as the device notes say).
set -o pipefail
export PYTHONUNBUFFERED=1
cache=${1:?usage: bash bench/gpu_check.sh CACHE [SHARD_COPIES]}
copies=${2:-32}
[ -f "$cache/cache.json" ] && [ -f "$cache/shard_00000.safetensors" ] || { echo "$cache is not an activation cache with a first shard (make one with saescope cache)" >&2; exit 2; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_sae.py tests/test_train.py tests/test_cache.py tests/test_stream.py 2>&1 | tail -3
python3 - "$cache" "$copies" <<'PY'
import json, shutil, sys
from pathlib import Path
src, copies, dst = Path(sys.argv[1]), int(sys.argv[2]), Path("/tmp/gpu-check-cache")
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir()
for i in range(copies):
    shutil.copy(src / "shard_00000.safetensors", dst / f"shard_{i:05d}.safetensors")
manifest = json.loads((src / "cache.json").read_text())
rows = manifest["config"]["context_size"] - manifest["config"]["skip_positions"]
from safetensors import safe_open
with safe_open(str(src / "shard_00000.safetensors"), "pt") as f:
    manifest["n_windows"] = copies * f.get_slice("activations").get_shape()[0] // rows
(dst / "cache.json").write_text(json.dumps(manifest))
PY
for extra in "" "--bf16"; do
  rm -rf /tmp/gpu-check-sae
  python3 -c 'from sae_core.cli import main; main()' train --activations /tmp/gpu-check-cache --out /tmp/gpu-check-sae \
    --n-latents 16384 --k 32 --batch-size 4096 --tokens 8000000 --device cuda $extra 2>&1 | tr '\r' '\n' | tail -1
done
python3 bench/train_throughput.py --device cuda --peers eai-sparsify --peers-here --steps 50
