#!/usr/bin/env bash
# The evaluation half of the demo: the demo run's stage-1 and stage-3 debug exports evaluated on the demo's val
# splits with `orchestrate/evaluate.py --export` (inference on Ray workers, then the metrics), each as a Ray job,
# next to an untrained model's stage-1 PQ: the learning figure.
#
#   scripts/eval_demo.sh DEMO_OUT        # DEMO_OUT holds datas/, shards/ and runs/demo/ from the demo
#
# Needs a running Ray head in RAY_ADDRESS (scripts/demo.sh starts one). Knobs: EVAL_WORKERS (default 2),
# EVAL_MAX_NEW_TOKENS (default 64: the generated GCG captions of a debug model). Results go to DEMO_OUT/eval/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(cd "${1:?usage: scripts/eval_demo.sh DEMO_OUT}" && pwd)"
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of a Ray head, e.g. http://127.0.0.1:8265}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" WANDB_MODE="${WANDB_MODE:-offline}"
WORKERS="${EVAL_WORKERS:-2}"
TOKENS="${EVAL_MAX_NEW_TOKENS:-64}"
RUN_ROOT="$OUT/runs/demo"
EVAL="$OUT/eval"
COMMON=(--shards "$OUT/shards" --data-root "$OUT/datas" --num-workers "$WORKERS" --max-new-tokens "$TOKENS")
source scripts/ray_jobs.sh

echo "== untrained baseline: the weights stage 1 starts from (same seed as training)"
python -m orchestrate.baseline --stage 1 --flavor debug --out "$OUT/runs/untrained/stage1/export" -q

echo "== evaluating the untrained and the trained stage-1 exports on coco_panoptic/val (Ray jobs)"
submit_job python orchestrate/evaluate.py --export "$OUT/runs/untrained/stage1/export" --sets coco_panoptic/val \
  --out "$EVAL/untrained_stage1" "${COMMON[@]}"
submit_job python orchestrate/evaluate.py --export "$RUN_ROOT/stage1/export" --sets coco_panoptic/val \
  --out "$EVAL/stage1" "${COMMON[@]}"

echo "== evaluating the stage-3 export on every scored val split of the demo (Ray job)"
submit_job python orchestrate/evaluate.py --export "$RUN_ROOT/stage3/export" --out "$EVAL/stage3" "${COMMON[@]}"

echo "== evaluation results"
python - "$EVAL" <<'PY'
import json, sys
from pathlib import Path

from orchestrate.evaluation.report import format_table

ev = Path(sys.argv[1])
for name in ("untrained_stage1", "stage1", "stage3"):
    results = json.loads((ev / name / "results.json").read_text())
    details = json.loads((ev / name / "details.json").read_text())["sets"]
    print(f"-- {name} ({ev / name})")
    print(format_table(results, details))
pq = {n: json.loads((ev / n / "results.json").read_text())["coco_panoptic/val"]["PQ"] for n in ("untrained_stage1", "stage1")}
print(f"learning: stage-1 PQ on coco_panoptic/val {pq['untrained_stage1']:.2f} untrained -> {pq['stage1']:.2f} trained")
PY
