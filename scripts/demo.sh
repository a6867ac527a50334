#!/usr/bin/env bash
# Demo on a fresh machine: set up the venv if needed, make a tiny random Wan2.2 checkpoint,
# generate a short video with MagCache on 2 ranks (torchrun, gloo on CPU, Ulysses sequence
# parallel, skip decisions all-reduced), and print where it is.
# Usage: scripts/demo.sh [OUT_DIR]     (default: ./demo_out; DEMO_NPROC=1 for one process)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/demo_out}"
bash "$ROOT/scripts/setup.sh"
. "${MAGCACHE_VENV:-$ROOT/.venv}/bin/activate"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

CKPT="$OUT/tiny-t2v-A14B"
if [ ! -f "$CKPT/high_noise_model/config.json" ]; then
  rm -rf "$CKPT"
  python "$ROOT/scripts/make_tiny_checkpoint.py" --task t2v-A14B --layout official --out "$CKPT" >&2
fi

VIDEO="$OUT/demo.mp4"
NPROC="${DEMO_NPROC:-2}"
ARGS=(generate --task t2v-A14B --size 128*128 --frame_num 9 --ckpt_dir "$CKPT"
      --prompt "A red fox runs through fresh snow at dawn" --base_seed 42 --sample_steps 40
      --use_magcache --magcache_thresh 0.06 --retention_ratio 0.2 --save_file "$VIDEO" --overwrite)
if [ "$NPROC" -gt 1 ]; then
  echo "[demo] $NPROC ranks under torchrun, Ulysses sequence parallel, MagCache decisions all-reduced" >&2
  torchrun --standalone --nproc-per-node "$NPROC" --no-python magcache-launch "${ARGS[@]}" --ulysses_size "$NPROC"
else
  echo "[demo] one process" >&2
  magcache-launch "${ARGS[@]}"
fi
echo "[demo] the tiny checkpoint's weights are random, so the video is noise: it shows the pipeline runs end to end, not what Wan2.2 draws (real weights: README, \"Getting the Wan2.2 weights\")" >&2
echo "$VIDEO"
