#!/usr/bin/env bash
# The GPU checks and timings of issue 26 in one command, for a lent GPU machine (bench/RESULTS.md,
# "TopK training on a GPU"). Two steps:
#
#   bash bench/gpu_check.sh --fetch-wheels     here, once: eai-sparsify and its packages that the GPU
#                                              image lacks, as wheels in .whl/ (git ignores it)
#   bash bench/gpu_check.sh [CACHE]            there, with .whl carried: device run, timeout_s 600
#
# There, in order, each stage under a time limit so that the whole ends within 9.5 minutes and what
# finished is kept (compiling takes most of the time: each new shape of the step compiles once):
#   1. the compiled step against the eager one on CUDA (tests/test_compiled_step.py -k cuda, 3 min at most)
#                                                                                      -> $OUT/tests.log
#   2. bench/train_throughput.py --device cuda --compiled against eai-sparsify, all five cells, eager
#      and compiled side by side (about 5 min)                                        -> $OUT/throughput.md
#   3. where time is left: the floor of any step (the encoder GEMM, torch.topk and a two-stage top-k),
#      the compiled step with the two-stage top-k (B fp32, A fp32, B bf16: compare with step 2's
#      compiled column), and the compiled step of config A fp32 under torch.profiler  -> $OUT/profile.txt
#   4. where time is left: the CUDA cases of tests/test_sae.py (the eager step)       -> $OUT/tests.log
#   5. with CACHE (an activation cache made here: `saescope cache --out CACHE --tokens 24000` fits what a
#      call carries) and time left: `saescope train` on CUDA, eager and --compile, fp32 and bf16; the
#      cache's first shard is copied 32 times so that training reads several shuffle groups -> $OUT/train.log
# $OUT is the device tool's folder of files that come back; elsewhere they go to bench/out/gpu_check.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
  # The versions are pinned because --no-deps installs them unchecked (the image has torch, transformers,
  # accelerate, einops, safetensors, huggingface-hub, pyarrow, pandas, xxhash, fsspec).
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude; }
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    eai-sparsify==1.3.3 datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16 natsort==8.4.0 schedulefree==1.4.1 \
    simple-parsing==0.1.7 docstring-parser==0.16
fi

cache=${1:-}
if [ -n "$cache" ] && ! { [ -f "$cache/cache.json" ] && [ -f "$cache/shard_00000.safetensors" ]; }; then
  echo "$cache is not an activation cache with a first shard (make one with saescope cache)" >&2
  exit 2
fi
out=${OUT:-bench/out/gpu_check}
mkdir -p "$out"
budget=570   # seconds for all stages: a device run may take 600 (the machine's start is not counted in it)
left() { echo $((budget - SECONDS)); }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c 'import torch; assert torch.cuda.is_available(), "this torch sees no CUDA GPU"; print("torch", torch.__version__, torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== 1. the compiled step's CUDA tests"
timeout 180 python3 -m pytest -v --tb=short -p no:cacheprovider -k cuda tests/test_compiled_step.py 2>&1 | tee "$out/tests.log" | tail -5

echo "== 2. throughput, eager and compiled against eai-sparsify ($(left) s left)"
timeout $(($(left) - 40)) python3 bench/train_throughput.py --device cuda --peers eai-sparsify --peers-here --steps 50 --compiled 2>&1 \
  | tee "$out/throughput.md"

if [ "$(left)" -gt 40 ]; then
  # The floor of any step: the encoder GEMM and the top-k over its [batch, n] output. Two-stage top-k (the top
  # k of each of C column chunks, then the top k of those C * k: sae/compiled.py chunked_topk) selects the same set.
  echo "== 3. the GEMM and top-k floor; two-stage top-k in the compiled step; its profile ($(left) s left)"
  timeout 40 python3 - <<'PY' 2>&1 | tee "$out/profile.txt"
import torch
from sae_core.sae.compiled import chunked_topk
def ms(fn, reps=50):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps): fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
for name, d, n in (("A", 576, 16384), ("B", 768, 32768)):
    for dtype in (torch.float32, torch.bfloat16):
        x, W = torch.randn(4096, d, device="cuda", dtype=dtype), torch.randn(d, n, device="cuda", dtype=dtype)
        pre = x @ W
        row = [f"{name} {str(dtype)[6:]}: GEMM {ms(lambda: x @ W):.3f} ms, topk {ms(lambda: pre.topk(32, dim=1, sorted=False)):.3f}"]
        want = pre.topk(32, dim=1, sorted=False)[1].sort(1)[0]
        for chunks in (8, 16, 32, 64):
            same = torch.equal(chunked_topk(pre, 32, False, chunks)[1].sort(1)[0], want)
            row.append(f"{chunks} chunks {ms(lambda: chunked_topk(pre, 32, False, chunks)):.3f}{'' if same else ' (another set: ties)'}")
        print(", ".join(row))
PY
  for cell in "B fp32 16" "A fp32 8" "B bf16 16"; do
    set -- $cell
    [ "$(left)" -gt 70 ] || break
    echo "compiled step, $1 $2 AuxK on, top-k over $3 chunks:" | tee -a "$out/profile.txt"
    timeout 60 python3 bench/peers/saescope_step.py --device cuda --config $1 --dtype $2 --auxk on --steps 50 --compile --topk-chunks $3 2>&1 \
      | grep '^{' | tee -a "$out/profile.txt"
  done
  if [ "$(left)" -gt 60 ]; then
    # perf_hints: inductor says there if it skipped the CUDA graph (and why), which would leave the launches in
    TORCH_LOGS=perf_hints timeout $(($(left) - 30)) python3 bench/peers/saescope_step.py --device cuda --config A --dtype fp32 --auxk on \
      --steps 20 --compile --profile 10 >> "$out/profile.txt" 2>&1
  fi
fi

if [ "$(left)" -gt 30 ]; then
  echo "== 4. the eager step's CUDA tests ($(left) s left)"
  timeout $(($(left) - 5)) python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_sae.py 2>&1 | tee -a "$out/tests.log" | tail -3
fi

if [ -n "$cache" ] && [ "$(left)" -gt 90 ]; then
  echo "== 5. saescope train on CUDA ($(left) s left)"
  python3 - "$cache" 32 <<'PY'
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
  for extra in "" "--bf16" "--compile" "--compile --bf16"; do
    [ "$(left)" -gt 40 ] || break
    rm -rf /tmp/gpu-check-sae
    echo "train $extra" | tee -a "$out/train.log"
    timeout $(($(left) - 10)) python3 -c 'from saescope.cli import main; main()' train --activations /tmp/gpu-check-cache --out /tmp/gpu-check-sae \
      --n-latents 16384 --k 32 --batch-size 4096 --tokens 8000000 --device cuda $extra 2>&1 | tr '\r' '\n' | tail -1 | tee -a "$out/train.log"
  done
fi
echo "== done in ${SECONDS} s; figures in $out"
