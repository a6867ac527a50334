#!/usr/bin/env bash
# Demo on a fresh machine: set up the venv if needed, then generate one video with the trained
# tiny-shapes Wan2.2 (models/tiny-shapes, t2v-A14B layout, 64x64, 9 frames) twice: without MagCache
# on one process, and with MagCache on 2 ranks (torchrun, gloo on CPU, Ulysses sequence parallel,
# skip decisions all-reduced; the ratio table shipped with the model drives the skips). Then
# `compare` says how far the cached video is from the uncached one.
# Usage: scripts/demo.sh [OUT_DIR] ["PROMPT"]  (default ./demo_out; DEMO_NPROC=1 for one process;
# DEMO_SEED=N for another seed, default 40)
# The model knows "a <red|green|blue|yellow> <circle|square|triangle> moving <left|right|up|down>
# on a <black|white|blue|green> background" (models/tiny-shapes/README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/demo_out}"
PROMPT="${2:-a red square moving down on a blue background}"
SEED="${DEMO_SEED:-40}"
bash "$ROOT/scripts/setup.sh"
. "${MAGCACHE_VENV:-$ROOT/.venv}/bin/activate"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

CKPT="$ROOT/models/tiny-shapes"
mkdir -p "$OUT"
ARGS=(generate --task t2v-A14B --size 64*64 --frame_num 9 --ckpt_dir "$CKPT" --prompt "$PROMPT" --base_seed "$SEED"
      --overwrite)
echo "[demo] uncached, one process" >&2
magcache-launch "${ARGS[@]}" --save_file "$OUT/uncached.mp4"
NPROC="${DEMO_NPROC:-2}"
CACHED=("${ARGS[@]}" --use_magcache --save_file "$OUT/magcache.mp4")
if [ "$NPROC" -gt 1 ]; then
  echo "[demo] MagCache, $NPROC ranks under torchrun, Ulysses sequence parallel, decisions all-reduced" >&2
  torchrun --standalone --nproc-per-node "$NPROC" --no-python magcache-launch "${CACHED[@]}" --ulysses_size "$NPROC"
else
  echo "[demo] MagCache, one process" >&2
  magcache-launch "${CACHED[@]}"
fi
magcache-launch compare "$OUT/uncached.mp4" "$OUT/magcache.mp4"
echo "[demo] tiny-shapes draws a blob of the prompt's colour moving the prompt's way for this prompt and seed; over 24 prompts/seeds it gets the colour right in 20 and colour and direction both in 6 (BENCHMARKS.md \"tiny-shapes\"); its shapes are rounded blobs, not yet clean squares or triangles (models/tiny-shapes/README.md)" >&2
echo "$OUT/uncached.mp4"
echo "$OUT/magcache.mp4"
