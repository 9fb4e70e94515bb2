#!/usr/bin/env bash
# The README's demo: demo data -> a local Ray head -> the shard build as a Ray job -> what was written.
# Called by `make demo` with the venv first on PATH. Ports and output folder can be overridden:
#   DEMO_OUT=/tmp/x RAY_PORT=6390 RAY_DASHBOARD_PORT=8275 make demo
# DEMO_TRAIN=0 stops after the shard build.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(mkdir -p "${DEMO_OUT:-demo_out}" && cd "${DEMO_OUT:-demo_out}" && pwd)"
RAY_PORT="${RAY_PORT:-6390}"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8275}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # every Ray process must agree (stack_notes.md)
export RAY_ADDRESS="http://127.0.0.1:${RAY_DASHBOARD_PORT}"
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/xsam_ray}"

echo "== 1/3 demo data -> $OUT/datas"
python -m pipelines.demo_data --out "$OUT/datas"

echo "== 2/3 local Ray head (port $RAY_PORT, dashboard $RAY_DASHBOARD_PORT)"
# every port is explicit (offsets from RAY_PORT) so the demo never collides with another Ray on this machine;
# `--block` in its own session keeps the head in this script's hands: stopping it stops this head only
# (`ray stop` would stop every Ray instance of this user on the machine)
setsid ray start --head --block --num-cpus 2 --port "$RAY_PORT" --dashboard-port "$RAY_DASHBOARD_PORT" \
  --include-dashboard true --disable-usage-stats \
  --ray-client-server-port $((RAY_PORT + 1)) --node-manager-port $((RAY_PORT + 2)) \
  --object-manager-port $((RAY_PORT + 3)) --dashboard-agent-listen-port $((RAY_PORT + 4)) \
  --dashboard-agent-grpc-port $((RAY_PORT + 5)) --metrics-export-port $((RAY_PORT + 6)) \
  --runtime-env-agent-port $((RAY_PORT + 7)) --min-worker-port $((RAY_PORT + 100)) \
  --max-worker-port $((RAY_PORT + 400)) >"$OUT/ray_head.log" 2>&1 &
RAY_HEAD_PID=$!
stop_head() {  # SIGTERM: the head drains and stops what it started; its process group if it hangs
  echo "== stopping the Ray head"
  kill -TERM "$RAY_HEAD_PID" 2>/dev/null || return 0
  for _ in $(seq 1 60); do
    kill -0 "$RAY_HEAD_PID" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL -- "-$RAY_HEAD_PID" 2>/dev/null || true
}
trap stop_head EXIT
for _ in $(seq 1 90); do  # until the head answers (its log: $OUT/ray_head.log)
  if ray job list >/dev/null 2>&1; then break; fi
  if ! kill -0 "$RAY_HEAD_PID" 2>/dev/null; then
    echo "ray start failed; see $OUT/ray_head.log" >&2
    tail -n 20 "$OUT/ray_head.log" >&2
    exit 1
  fi
  sleep 2
done

echo "== 3/3 shard build as a Ray job (ray job submit --working-dir . -- python orchestrate/build_shards.py ...)"
source scripts/ray_jobs.sh
submit_job python orchestrate/build_shards.py --data-root "$OUT/datas" --out "$OUT/shards" --splits train,val,testA,testB,test,val_point,val_scribble,val_box,val_mask \
  --samples-per-shard 4

echo "== written under $OUT/shards:"
python -m pipelines.inspect.build_summary --out "$OUT/shards"
python -m pipelines.inspect.preview --out "$OUT/shards" --n 4
echo "   open $OUT/shards/preview/index.html to look at the samples"
if [ "${DEMO_TRAIN:-1}" = "1" ] && [ -x scripts/train_demo.sh ]; then
  scripts/train_demo.sh "$OUT"
  scripts/eval_demo.sh "$OUT"
fi
