# Sourced by the demo scripts: submit a Ray job, stream its logs, fail if it fails.
# The head's job agent needs a few seconds after `ray start` before it accepts jobs ("No available agent"),
# so submission is retried for that error alone; any other error, or a failed job, stops the script.

# Lines of Ray's job CLI around the job's own output, left out of what the demo shows (RAY_JOB_RAW_LOGS=1 keeps
# them): its INFO/SUCC status lines (server address, runtime-env set-up, "WebSocket closed", the success
# banner; the job's status is printed below), the entrypoint it repeats, and the Ray Train controller's
# core-worker notice about its PreemptionWatcher actor, logged at error level on every run although nothing
# failed. The job's output and every other warning or error of Ray pass through.
RAY_JOB_CLI_NOISE='^[0-9-]+ [0-9:,]+[[:space:]]+(INFO|SUCC) (cli|sdk|job_manager)\.py:[0-9]+ -- |^Running entrypoint for job |core_worker\.cc:[0-9]+: Actor with class name: .PreemptionWatcher. .* has constructor arguments in the object store'

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
  if [ "${RAY_JOB_RAW_LOGS:-0}" = "1" ]; then
    ray job logs --follow "$job_id"
  else
    ray job logs --follow "$job_id" 2>&1 | { grep -Ev "$RAY_JOB_CLI_NOISE" || true; }
  fi
  local status
  status=$(ray job status "$job_id" 2>&1 | grep -io 'succeeded\|failed\|stopped' | tail -n 1 | tr '[:lower:]' '[:upper:]' || true)
  echo "job $job_id: $status"
  [ "$status" = "SUCCEEDED" ]
}
