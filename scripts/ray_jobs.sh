# Sourced by the demo scripts: submit a Ray job, stream its logs, fail if it fails.
# The head's job agent needs a few seconds after `ray start` before it accepts jobs ("No available agent"),
# so submission is retried for that error alone; any other error, or a failed job, stops the script.

submit_job() {  # usage: submit_job python orchestrate/xxx.py --args...
  local out job_id i
  for i in $(seq 1 60); do
    if out=$(ray job submit --no-wait --working-dir . -- "$@" 2>&1); then
      break
    fi
    if ! grep -q "No available agent" <<<"$out"; then
      echo "$out" >&2
      return 1
    fi
    sleep 2
  done
  job_id=$(grep -o 'raysubmit_[A-Za-z0-9]*' <<<"$out" | head -n 1 || true)
  [ -n "$job_id" ] || { echo "$out" >&2; return 1; }
  echo "submitted $job_id: $*"
  ray job logs --follow "$job_id"
  local status
  status=$(ray job status "$job_id" 2>&1 | grep -io 'succeeded\|failed\|stopped' | tail -n 1 | tr '[:lower:]' '[:upper:]' || true)
  echo "job $job_id: $status"
  [ "$status" = "SUCCEEDED" ]
}
