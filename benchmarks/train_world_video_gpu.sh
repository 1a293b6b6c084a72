#!/usr/bin/env bash
# One device call of the world video model's training (docs/quality.md lists the shipped run's calls).
#
# From scratch: resume runs/video (phases vae, dit) and, once the VAE is trained, refine its decoder in
# runs/decoder beside phase 2 (two processes on the one GPU).
#   TIME_BUDGET=350 VAE_STEPS=1200 DIT_STEPS=6900 MOMENTS=none bash benchmarks/train_world_video_gpu.sh
# Continuing from an export (INIT_FROM, e.g. the shipped model, and INIT_STEP, the steps it took): phase 2 only,
# no decoder refinement. With DIT_BATCH=auto the first call measures phase-2 throughput at batches 64/128/256
# (benchmarks/world_video_throughput.py) and keeps the batch with the most videos per second unless it is less
# than 1.25x the next smaller one; the choice (and its learning rate, 3e-4 * sqrt(batch / 64) capped at 4.5e-4)
# is saved in runs/video/hparams.env, which later calls read.
#   INIT_FROM=diffusers_attn_ext/shipped/world-video INIT_STEP=6192 DIT_STEPS=15000 DIT_BATCH=auto \
#     DIT_OBJECT_WEIGHT=4 TIME_BUDGET=480 MOMENTS=none bash benchmarks/train_world_video_gpu.sh
# Either way it then exports runs/export (the VAE of runs/decoder when refined), evaluates it, and packs the
# results into $OUT in parts of at most 15 MiB. carry: [".whl", "runs"].
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=python3; M=diffusers_attn_ext.world.train_video; B=${TIME_BUDGET:-350}; MOM=${MOMENTS:-bfloat16}
mkdir -p runs/video runs/decoder "$OUT"
phase() { $T -c "import json; print(json.load(open('$1/ckpt/state.json'))['phase'])" 2>/dev/null || echo none; }
EXTRA=()
if [ -n "${INIT_FROM:-}" ]; then
  if [ ! -f runs/video/hparams.env ]; then
    BATCH=${DIT_BATCH:-64}
    if [ "$BATCH" = auto ]; then
      $T benchmarks/world_video_throughput.py --batches 64 128 256 2>/dev/null | grep '^{' | tee runs/video/throughput.jsonl
      BATCH=$($T -c "
import json
rows = [json.loads(l) for l in open('runs/video/throughput.jsonl')]
best = rows[0]
for row in rows[1:]:
    if row['videos_per_s'] >= 1.25 * best['videos_per_s']:
        best = row
print(best['batch'])" 2>/dev/null || echo 64)
    fi
    LR=$($T -c "print(min(4.5e-4, 3e-4 * ($BATCH / 64) ** 0.5))")
    printf 'BATCH=%s\nLR=%s\n' "$BATCH" "$LR" > runs/video/hparams.env
  fi
  . runs/video/hparams.env
  echo "phase 2 from ${INIT_FROM} at step ${INIT_STEP:-0}: batch $BATCH lr $LR"
  EXTRA=(--init-from "$INIT_FROM" --init-step "${INIT_STEP:-0}" --dit-batch "$BATCH" --dit-lr "$LR"
         --dit-object-weight "${DIT_OBJECT_WEIGHT:-0}" --dit-straight-fraction "${DIT_STRAIGHT_FRACTION:-0}")
elif [ "$(phase runs/video)" != none ] && [ "$(phase runs/video)" != vae ] && [ "$(phase runs/decoder)" != done ]; then
  $T -m $M --workdir runs/decoder --refine-decoder-of runs/video --decoder-steps "${DECODER_STEPS:-4000}" \
    --time-budget "$B" --workers 5 --moment-dtype "$MOM" > runs/decoder/stdout.log 2>&1 &
  DECODER=$!
fi
$T -m $M --workdir runs/video --time-budget "$B" --vae-steps "${VAE_STEPS:-1200}" --dit-steps "${DIT_STEPS:-6900}" \
  --workers "${WORKERS:-9}" --moment-dtype "$MOM" "${EXTRA[@]}" 2>&1 | grep -E '^\{|^start|^resum|Error' \
  | tee -a runs/video/stdout.log | tail -8
[ -n "${DECODER:-}" ] && wait "$DECODER" && grep -E '^\{' runs/decoder/stdout.log | tail -3
VAE_FROM=(); [ "$(phase runs/decoder)" != none ] && VAE_FROM=(--vae-from runs/decoder)
if [ "$(phase runs/video)" = dit ] || [ "$(phase runs/video)" = done ]; then
  $T -m $M --workdir runs/video --export-only "${VAE_FROM[@]}" --export runs/export 2>&1 | tail -1
  $T -m diffusers_attn_ext.world.evaluate_video --model runs/export --prompts "${EVAL_PROMPTS:-32}" --output runs/eval \
    2>&1 | grep -E '^\{'
fi
tar cf - runs/export runs/eval runs/video/ckpt runs/video/log.jsonl runs/video/hparams.env runs/video/throughput.jsonl \
  runs/decoder/log.jsonl 2>/dev/null | split -b 15M - "$OUT/video.tar.part-"
ls -la "$OUT"
