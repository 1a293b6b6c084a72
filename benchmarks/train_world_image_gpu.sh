#!/usr/bin/env bash
# One device call of the world image model's training (diffusers_attn_ext.world.train_image). Made to run in the
# background beside benchmarks/train_world_video_gpu.sh in the same call: its own workdirs (runs/image,
# runs/image-export, runs/image-eval, runs/judge), its own pip target, WORKERS (default 4) data workers, a few GiB
# of GPU memory.
#
#   TIME_BUDGET=480 bash benchmarks/train_world_image_gpu.sh > runs/image.log 2>&1 &
#   ... bash benchmarks/train_world_video_gpu.sh ...; wait; cat runs/image.log
#
# First call: phase 1 (VAE, VAE_STEPS), then phase 2 (transformer + text encoders). DIT_STEPS=0 (default) plans
# phase 2 from the throughput it measures after 200 steps, to end DIT_SECONDS after it started (default: the rest
# of this call's budget, less 45 s for saving); the plan is kept in the checkpoint. Over two calls give the first
# DIT_SECONDS = its own phase-2 seconds plus the second call's, e.g. TIME_BUDGET=480 DIT_SECONDS=780 (480 - ~60
# for start-up and the VAE - 45, plus 480 - ~30 - 45 in the second call); the second call resumes and finishes the
# plan (if it runs slower, a third short call does; DIT_STEPS=N fixes the length instead).
# JUDGE=1 also trains the judge on the GPU into runs/judge (about a minute; CPU-trained one ships already).
# Every call exports runs/image-export (bfloat16; from the latest checkpoint if phase 2 is unfinished), evaluates
# it with the judge on 64 held-out prompts (runs/image-eval: eval.json, eval.png), and packs runs/image-export,
# runs/image-eval, runs/image/ckpt (float32 weights, no moments by default: ~17 MB) and the logs into
# "$OUT/image.tar.part-*" (split at 15 MiB; 2 parts). carry: [".whl", "runs"].
# CHECK=1 (default) passes --check: before phase 2 trains, its first batch's ids are checked against every embedding
# table and its first step runs at batch 8 and DIT_BATCH, at 32 and 512 T5 tokens, the GPU synchronised around every
# module, so a device error names the module it came from (JSON lines {"check": ...}; CHECK=0 skips it).
# LONG_TEXT_FRACTION (default 0): the share of steps padded to 512 T5 tokens. On the H200 (torch 2.11+cu130) the
# backward of a batch of 256 at 512 T5 tokens fails in a bf16 cublasGemmEx (CUBLAS_STATUS_EXECUTION_FAILED; --check
# located it: batch 8 at 512 and batch 256 at 32 tokens pass), so the shipped run trains at 32 tokens only and is
# called with max_sequence_length=32 (image_models.WORLD_IMAGE_CALL).
# runs/image/stdout.log keeps the whole output of train_image, tracebacks included.
set -uo pipefail
SITE=/tmp/site_image  # not the video script's /tmp/site: both install at the same time
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  && export PYTHONPATH="$SITE:$PWD" || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
T=python3; M=diffusers_attn_ext.world.train_image; B=${TIME_BUDGET:-480}
mkdir -p runs/image "$OUT"
phase() { $T -c "import json; print(json.load(open('$1/ckpt/state.json'))['phase'])" 2>/dev/null || echo none; }
PLAN=(); [ -n "${DIT_SECONDS:-}" ] && PLAN=(--dit-seconds "$DIT_SECONDS")
if [ "${JUDGE:-0}" = 1 ]; then
  $T -m diffusers_attn_ext.world.judge --output runs/judge --steps "${JUDGE_STEPS:-3000}" --batch 128 2>&1 \
    | grep -E '^\{' | tail -2
fi
CHECKS=(); [ "${CHECK:-1}" = 1 ] && CHECKS=(--check)
# the whole output (tracebacks, warnings) goes to runs/image/stdout.log; the JSON lines and errors to the screen,
# and on a failure the end of the log
$T -m $M --workdir runs/image --time-budget "$B" --vae-steps "${VAE_STEPS:-2000}" --dit-steps "${DIT_STEPS:-0}" \
  "${PLAN[@]}" --dit-batch "${DIT_BATCH:-256}" --dit-lr "${DIT_LR:-5e-4}" --workers "${WORKERS:-4}" \
  --long-text-fraction "${LONG_TEXT_FRACTION:-0}" --moment-dtype "${MOMENTS:-none}" "${CHECKS[@]}" --export runs/image-export 2>&1 | tee -a runs/image/stdout.log \
  | grep -E '^\{|^resum|Error' | tail -12
TRAIN_STATUS=${PIPESTATUS[0]}
if [ "$TRAIN_STATUS" != 0 ] && [ "${FLOAT32_FALLBACK:-1}" = 1 ] && grep -q CUBLAS_STATUS_EXECUTION_FAILED runs/image/stdout.log; then
  echo "bf16 GEMM failed; again in float32 (TF32), budget ${FALLBACK_BUDGET:-$B}"
  $T -m $M --workdir runs/image --time-budget "${FALLBACK_BUDGET:-$B}" --vae-steps "${VAE_STEPS:-2000}" \
    --dit-steps "${DIT_STEPS:-0}" "${PLAN[@]}" --dit-batch "${DIT_BATCH:-256}" --dit-lr "${DIT_LR:-5e-4}" \
    --workers "${WORKERS:-4}" --long-text-fraction "${LONG_TEXT_FRACTION:-0}" --moment-dtype "${MOMENTS:-none}" \
    --float32 "${CHECKS[@]}" --export runs/image-export 2>&1 | tee -a runs/image/stdout.log | grep -E '^\{|^resum|Error' | tail -12
  TRAIN_STATUS=${PIPESTATUS[0]}
fi
if [ "$TRAIN_STATUS" != 0 ]; then
  echo "train_image exited with status $TRAIN_STATUS; the end of runs/image/stdout.log:"
  tail -60 runs/image/stdout.log
fi
if [ "$(phase runs/image)" = dit ]; then  # unfinished: export the latest weights to look at them
  $T -m $M --workdir runs/image --export-only --export runs/image-export 2>&1 | tail -1
fi
if [ -f runs/image-export/model_index.json ]; then
  $T -m diffusers_attn_ext.world.evaluate_image --model runs/image-export --prompts "${EVAL_PROMPTS:-64}" \
    --output runs/image-eval 2>&1 | grep -E '^\{|Error'
fi
tar cf - runs/image-export runs/image-eval runs/image/ckpt runs/image/log.jsonl runs/image/loss.png \
  runs/image/stdout.log runs/judge 2>/dev/null | split -b 15M - "$OUT/image.tar.part-"
ls -la "$OUT"
