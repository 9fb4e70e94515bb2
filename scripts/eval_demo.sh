#!/usr/bin/env bash
# The evaluation half of the demo: the demo run's stage-1 and stage-3 debug exports evaluated on the demo's val
# splits with `orchestrate/evaluate.py --export` (inference on Ray workers, then the metrics), each as a Ray job,
# next to untrained exports (stage-1 PQ, stage-3 refcoco cIoU: the learning figures); the stage-3 export on every
# set of the paper's table the demo built, printed beside X-SAM's published numbers (--compare-paper); then one
# predict.py call on a demo image, whose overlay PNG the last line names.
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

echo "== untrained baselines (same seed as training): stage 1's start, stage 3 before its parents' weights load"
python -m orchestrate.baseline --stage 1 --flavor debug --out "$OUT/runs/untrained/stage1/export" -q
python -m orchestrate.baseline --stage 3 --flavor debug --out "$OUT/runs/untrained/stage3/export" -q

echo "== evaluating the untrained and the trained stage-1 exports on coco_panoptic/val (Ray jobs)"
submit_job python orchestrate/evaluate.py --export "$OUT/runs/untrained/stage1/export" --sets coco_panoptic/val \
  --out "$EVAL/untrained_stage1" "${COMMON[@]}"
submit_job python orchestrate/evaluate.py --export "$RUN_ROOT/stage1/export" --sets coco_panoptic/val \
  --out "$EVAL/stage1" "${COMMON[@]}"

echo "== evaluating the untrained stage-3 export on refcoco/val (Ray job)"
submit_job python orchestrate/evaluate.py --export "$OUT/runs/untrained/stage3/export" --sets refcoco/val \
  --out "$EVAL/untrained_stage3" "${COMMON[@]}"

echo "== evaluating the stage-3 export on the paper's sets that the demo built, beside the paper (Ray job)"
submit_job python orchestrate/evaluate.py --export "$RUN_ROOT/stage3/export" --sets paper --compare-paper \
  --out "$EVAL/stage3" "${COMMON[@]}"

echo "== evaluation results"
python - "$EVAL" <<'PY'
import json, sys
from pathlib import Path

from orchestrate.evaluation.paper_table import RUNBOOK_EVALUATE, read_eval_folder
from orchestrate.evaluation.report import format_table

ev = Path(sys.argv[1])
for name in ("untrained_stage1", "stage1", "untrained_stage3", "stage3"):
    results = json.loads((ev / name / "results.json").read_text())
    details = json.loads((ev / name / "details.json").read_text())["sets"]
    print(f"-- {name} ({ev / name})")
    print(format_table(results, details))


def metric(name: str, set_name: str, key: str) -> float:
    return json.loads((ev / name / "results.json").read_text())[set_name][key]


print(f"-- the paper's table beside the demo's stage-3 export ({ev / 'stage3' / 'results.json'})")
print(read_eval_folder(str(ev / "stage3" / "results.json")).table())
print("   the same comparison for X-SAM's released weights on the real val sets (a GPU; the runbook,")
print("   docs/evaluation.md#reproducing-the-papers-table):")
print("\n".join("     " + line for line in RUNBOOK_EVALUATE.splitlines()))
pq = [metric(n, "coco_panoptic/val", "PQ") for n in ("untrained_stage1", "stage1")]
ciou = [metric(n, "refcoco/val", "cIoU") for n in ("untrained_stage3", "stage3")]
print(f"learning: stage-1 PQ on coco_panoptic/val {pq[0]:.2f} untrained -> {pq[1]:.2f} trained")
print(f"learning: stage-3 cIoU on refcoco/val {ciou[0]:.2f} untrained -> {ciou[1]:.2f} trained")
PY

# one image of refcoco/val and one of its referring expressions, as a newcomer would ask the model
IMAGE="$OUT/datas/img_refseg/refcocos/images/train2014/COCO_train2014_000000000016.jpg"
echo "== predict.py: the stage-3 export on one demo image (refcoco/val), one referring prompt"
python orchestrate/predict.py --export "$RUN_ROOT/stage3/export" --image "$IMAGE" \
  --prompt "Please segment <p>the red dog</p> in this image." --max-new-tokens "$TOKENS" --out "$OUT/predict" -q
echo "   open $OUT/predict/$(basename "$IMAGE" .jpg).png to see the mask and the answer"
