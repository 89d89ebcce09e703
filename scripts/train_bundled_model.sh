#!/usr/bin/env bash
# Reproduce the bundled default model (llama2nb/checkpoints/) with the project's own pipeline.
#
#   scripts/train_bundled_model.sh [SCRATCH_DIR]      # default: out/bundled
#
# Run from a clone with ../shared beside it and the venv installed (`make install`). Writes into
# SCRATCH_DIR only (never over the committed files): data/ (vocabulary and shards), train/
# (ckpt.pt, model.bin, loss.csv, loss.png), checkpoints/ (model.bin, tokenizer.bin,
# tokenizer.model as they are committed) and eval.txt. Set ITERS to shorten the run (the
# schedule shortens with it, so losses are comparable only between runs of the same ITERS).
#
# Training on CPU is deterministic given the seed and the thread count: one thread here
# (OMP_NUM_THREADS=1; on a busy 2-core machine two threads are several times slower).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-out/bundled}"
SHARED="${SHARED:-$ROOT/../shared}"
LLAMA2NB="${LLAMA2NB:-$ROOT/.venv/bin/llama2nb}"
ITERS="${ITERS:-800}"
TRAIN_TEXT="$SHARED/data/tinystories-train-excerpt.txt"
VALID_TEXT="$SHARED/data/tinystories-valid-excerpt.txt"
VOCAB=4096

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NICE="nice -n ${NICE_LEVEL:-5}"
mkdir -p "$OUT"

$NICE "$LLAMA2NB" data train-vocab --vocab-size $VOCAB --text "$TRAIN_TEXT" --data-dir "$OUT/data"
$NICE "$LLAMA2NB" data pretokenize --vocab-size $VOCAB --text "$TRAIN_TEXT" --val-text "$VALID_TEXT" \
    --data-dir "$OUT/data"
start=$(date +%s)
$NICE "$LLAMA2NB" train --quiet --data "$OUT/data/tok$VOCAB" --out-dir "$OUT/train" --seed 1337 \
    --dim 128 --n-layers 5 --n-heads 4 --n-kv-heads 4 --multiple-of 32 \
    --max-seq-len 256 --batch-size 32 --gradient-accumulation-steps 1 --dropout 0.1 --weight-decay 0.1 \
    --learning-rate 2e-3 --warmup-iters 30 --min-lr 0 --eval-interval 100 --eval-iters 12 --dtype bfloat16 --max-iters "$ITERS"
echo "training took $(( $(date +%s) - start )) s"

mkdir -p "$OUT/checkpoints"
cp "$OUT/train/model.bin" "$OUT/checkpoints/model.bin"
cp "$OUT/data/tok$VOCAB.bin" "$OUT/checkpoints/tokenizer.bin"
cp "$OUT/data/tok$VOCAB.model" "$OUT/checkpoints/tokenizer.model"
$NICE "$LLAMA2NB" eval "$OUT/checkpoints/model.bin" --text "$VALID_TEXT" -z "$OUT/checkpoints/tokenizer.bin" \
    | tee "$OUT/eval.txt"
