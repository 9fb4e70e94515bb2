#!/usr/bin/env bash
# The training half of the demo: stages 1 -> 2 -> 3 of the debug flavor on CPU, two Ray Train workers each,
# a few steps per stage, each submitted as a Ray job; then a summary (final losses, exports, wandb folders).
#
#   scripts/train_demo.sh DEMO_OUT        # DEMO_OUT holds shards/ (with mixture.json) from the shard demo
#
# Needs a running Ray head in RAY_ADDRESS (scripts/demo.sh starts one and calls this script). Knobs:
# TRAIN_STEPS (default 4; stage 2), TRAIN_STEPS_STAGE1 (default 600), TRAIN_STEPS_STAGE3 (default 300),
# TRAIN_WORKERS (default 2). The run goes to DEMO_OUT/runs/demo; submitting a stage again continues from its
# latest checkpoint (delete that folder to start over). Stage 3 evaluates refcoco/val and coco_panoptic/val at
# its last step (--eval-every).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(cd "${1:?usage: scripts/train_demo.sh DEMO_OUT}" && pwd)"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of a Ray head, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" WANDB_MODE="${WANDB_MODE:-offline}"
STEPS="${TRAIN_STEPS:-4}"
STAGE1_STEPS="${TRAIN_STEPS_STAGE1:-600}"
STAGE3_STEPS="${TRAIN_STEPS_STAGE3:-300}"
WORKERS="${TRAIN_WORKERS:-2}"
SHARDS="$OUT/shards"
RUN_ROOT="$OUT/runs/demo"
MIXTURE="$SHARDS/mixture.json"
source scripts/ray_jobs.sh

# Stage 2 trains on LLaVA-Pretrain captions. If the demo shards have none, a demo-only mixture lets COCO
# panoptic's conversations stand in (stage 2 is LM loss on the projectors), so the chain still runs end to end.
STAGE2_DATASETS=$(python -c 'import sys; from pipelines.mixture_file import load; print(len(load(sys.argv[1]).stage(2).datasets))' "$MIXTURE")
if [ "$STAGE2_DATASETS" = "0" ]; then
  MIXTURE="$OUT/runs/mixture_demo.json"
  mkdir -p "$OUT/runs"
  python -c '
import json, sys
from pipelines.build.mixture_weights import STAGE_DATASETS, compute
stages = {k: list(v) for k, v in STAGE_DATASETS.items()}
stages[2] = ["coco_panoptic"]
mix = compute(sys.argv[1], stages=stages)
open(sys.argv[2], "w").write(json.dumps(mix.to_dict(), indent=1, sort_keys=True))
' "$SHARDS" "$MIXTURE"
  echo "note: no llava_pretrain shards, so stage 2 of the demo reads coco_panoptic instead: $MIXTURE"
fi

for stage in 1 2 3; do
  steps="$STEPS" every=2 extra=()
  if [ "$stage" = 1 ]; then
    # Long enough that the demo's segmentor learns (scripts/eval_demo.sh prints its PQ next to an untrained
    # one): the recipe's lr 1e-4, clip 0.01 and epoch milestones suit SAM-L's pretrained weights, not a random
    # debug model on six images, so the demo's stage 1 runs at lr 2e-3, clip 1, cosine.
    steps="$STAGE1_STEPS" every=$((STAGE1_STEPS / 2)) extra=(--lr 2e-3 --grad-clip 1 --lr-schedule cosine)
  elif [ "$stage" = 3 ]; then
    # Long enough that the answers are well formed ("Sure, it is <SEG>.", not byte soup) and refcoco/val's
    # cIoU rises above an untrained export's (scripts/eval_demo.sh prints both): the recipe's lr 4e-5 suits
    # Phi-3's pretrained weights, not the debug flavor's random LM, so the demo's stage 3 runs at lr 1e-3,
    # cosine. Evaluation while training, at the last step.
    steps="$STAGE3_STEPS" every=$((STAGE3_STEPS / 2))
    extra=(--lr 1e-3 --grad-clip 1 --lr-schedule cosine --eval-every "$STAGE3_STEPS"
      --eval-sets refcoco/val,coco_panoptic/val --eval-max-samples 4 --eval-data-root "$OUT/datas")
  fi
  echo "== training stage $stage (debug flavor, $WORKERS CPU workers, $steps steps) as a Ray job"
  submit_job python orchestrate/train.py --stage "$stage" --flavor debug --shards "$SHARDS" --mixture "$MIXTURE" \
    --run-root "$RUN_ROOT" --num-workers "$WORKERS" --max-steps "$steps" --checkpoint-every "$every" \
    ${extra[@]+"${extra[@]}"}
done

echo "== training summary"
python -m orchestrate.summary --run-root "$RUN_ROOT"
