#!/usr/bin/env bash
# The checks of one lent-GPU session, as one prepared script (the lease is short: everything in one call).
# Run from the repo root on the GPU machine:  OUT=<folder> bash benchmarks/gpu_session.sh [gpu_decoding.py args]
#
# Expects beside the repo (both git-ignored, carried with the call):
#   .whl/      wheels of what the GPU image lacks (hydra-core, omegaconf, antlr4-python3-runtime);
#   .gpu/root/ the runs to time, mirrored at their recorded absolute paths (.gpu/root/work/main/outputs/...):
#              model.safetensors + config.yaml (+ metrics.json, neighbour tables) of each; linked into place here;
#   .gpu/aliases (optional) "<path> <real path>" lines: a run recorded under a symlink (benchmarks/gpu_carry.py writes both).
# SKIP_TESTS=1 / SKIP_GRIDS=1 leave out the CUDA tests / the grids; TEST_TIMEOUT, ROWS_TIMEOUT (s) bound those parts.
# Writes under $OUT: the CUDA test log, the decoding rows (JSON + log), the generator speed log, sample grids.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# tokar's top-level `tokenizers` package shadows Hugging Face's; torchmetrics imports transformers (which imports
# HF tokenizers) whenever it is installed, so on an image that has it, hide it (this machine is thrown away after).
python3 -m pip uninstall -y -q transformers sentence-transformers peft >/dev/null 2>&1
if [ -d .gpu/root ]; then  # each carried run at the absolute path its dependants' configs record
  for d in $(cd .gpu/root && find . -name config.yaml -printf '%h\n'); do
    target="/${d#./}"
    if [ ! -e "$target" ]; then mkdir -p "$(dirname "$target")" && ln -s "$PWD/.gpu/root/${d#./}" "$target"; fi
  done
  # .gpu/aliases: "<recorded path> <real path>" per line, for a run recorded under a symlink
  while read -r alias real; do
    if [ ! -e "$alias" ]; then mkdir -p "$(dirname "$alias")" && ln -s "$real" "$alias"; fi
  done < <(cat .gpu/aliases 2>/dev/null)
fi
GPT=/work/main/outputs/bench_gpt/generator
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"

if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1: the rows only
echo "== CUDA tests"
timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -rs \
  tests/test_decoding_registry.py::test_compiled_decode_step_gives_the_eager_tokens \
  tests/test_decoding_registry.py::test_compiled_var_scales_give_the_eager_maps_on_cuda \
  tests/test_sjd.py::test_compiled_window_gives_the_same_greedy_tokens_on_cuda \
  tests/test_flow_map.py::test_cuda_matches_cpu tests/test_lantern_accept.py::test_cuda_matches_cpu \
  2>&1 | tee "$OUT/cuda_tests.log" | tail -15
fi

echo "== decoding rows"
timeout ${ROWS_TIMEOUT:-270} python3 benchmarks/gpu_decoding.py --json "$OUT/gpu_decoding.json" "$@" 2>&1 \
  | tee "$OUT/gpu_decoding.log" | grep -v "^{" | tail -40

if [ -z "${SKIP_GRIDS:-}" ]; then  # SKIP_GRIDS=1: no sample.py grids
echo "== sample.py on CUDA (grids)"
for spec in "sjd compare_ar=true" "lantern decoding.drafter_ckpt=/work/runs/lantern/bench_drafter compare_ar=true"; do
  name=${spec%% *}
  timeout 45 python3 sample.py ckpt=$GPT decoding=$spec classes=[0,1,5,7,8,9] \
    hydra.run.dir=/tmp/sample_$name > "$OUT/sample_$name.log" 2>&1
  tail -3 "$OUT/sample_$name.log"; cp /tmp/sample_$name/grid.png "$OUT/grid_$name.png" 2>/dev/null
done
fi
echo "== done"
