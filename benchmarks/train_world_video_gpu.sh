#!/usr/bin/env bash
# One device call of the world video model's training (docs/quality.md has the shipped run's calls): resume
# runs/video (phases vae, dit) and, once the VAE is trained, refine its decoder in runs/decoder beside phase 2
# (two processes on the one GPU); then export runs/export (transformer + text encoder of runs/video, VAE of
# runs/decoder), evaluate it, and pack the results into $OUT in parts of at most 15 MiB.
#   TIME_BUDGET=350 VAE_STEPS=1200 DIT_STEPS=6900 MOMENTS=none bash benchmarks/train_world_video_gpu.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=python3; M=diffusers_attn_ext.world.train_video; B=${TIME_BUDGET:-350}; MOM=${MOMENTS:-bfloat16}
mkdir -p runs/video runs/decoder "$OUT"
phase() { $T -c "import json; print(json.load(open('$1/ckpt/state.json'))['phase'])" 2>/dev/null || echo none; }
if [ "$(phase runs/video)" != none ] && [ "$(phase runs/video)" != vae ] && [ "$(phase runs/decoder)" != done ]; then
  $T -m $M --workdir runs/decoder --refine-decoder-of runs/video --decoder-steps "${DECODER_STEPS:-4000}" \
    --time-budget "$B" --workers 5 --moment-dtype "$MOM" > runs/decoder/stdout.log 2>&1 &
  DECODER=$!
fi
$T -m $M --workdir runs/video --time-budget "$B" --vae-steps "${VAE_STEPS:-1200}" --dit-steps "${DIT_STEPS:-6900}" \
  --workers 9 --moment-dtype "$MOM" 2>&1 | grep -E '^\{' | tee -a runs/video/stdout.log | tail -6
[ -n "${DECODER:-}" ] && wait "$DECODER"; grep -E '^\{' runs/decoder/stdout.log | tail -3
if [ "$(phase runs/decoder)" != none ]; then
  $T -m $M --workdir runs/video --export-only --vae-from runs/decoder --export runs/export 2>&1 | tail -1
  $T -m diffusers_attn_ext.world.evaluate_video --model runs/export --prompts "${EVAL_PROMPTS:-32}" --output runs/eval \
    2>&1 | grep -E '^\{'
fi
tar cf - runs/export runs/eval runs/video/ckpt runs/video/log.jsonl runs/decoder/log.jsonl 2>/dev/null \
  | split -b 15M - "$OUT/video.tar.part-"
ls -la "$OUT"
