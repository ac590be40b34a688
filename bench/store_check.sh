#!/usr/bin/env bash
# The pipeline on fixed settings with one tree's code, for bench/compare_stores.py: does a refactor change
# any stored result? Run it with the commit before and after (a `git worktree add` of each), then compare:
#
#   bash bench/store_check.sh /path/to/before OUT_BEFORE; bash bench/store_check.sh /path/to/after OUT_AFTER
#   python bench/compare_stores.py sqlite:///OUT_BEFORE/store.db sqlite:///OUT_AFTER/store.db
#
# CACHE: an activation cache (default: the demo's); PYTHON: the interpreter of the venv.
set -euo pipefail
tree=$1; out=$2; mkdir -p $out
export PYTHONPATH=$tree MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 SAESCOPE_HOME=${SAESCOPE_HOME:-$HOME/.saescope}
# the CLI moved from sae_core/ to saescope/ in issue 32
if [ -f $tree/saescope/cli.py ]; then entry="from saescope.cli import main; main()"; else entry="from sae_core.cli import main; main()"; fi
run() { (cd $tree && nice ${PYTHON:-python3} -c "$entry" "$@"); }
db=sqlite:///$out/store.db
run train --activations ${CACHE:-$SAESCOPE_HOME/runs/demo/cache} --out $out/sae --n-latents 4096 --k 32 --tokens 200000 --device cpu
run eval --sae $out/sae --tokens 4096 --probe-per-class 256 --ablation-positions 0 --device cpu || true
run mine --sae $out/sae --db $db --tokens 65536 --coactivation 8 --device cpu --name check-4k
run explain --db $db --sae check-4k
run map --db $db --sae check-4k
echo finished > $out/done
