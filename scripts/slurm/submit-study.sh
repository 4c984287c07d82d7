#!/usr/bin/env bash
# Submits a sharded study to Slurm: one job that computes the key statistics, then the array of
# LOCI_SHARDS tasks (scripts/slurm/study.sbatch), started only if the statistics job succeeds.
#
#   LOCI_OUT=runs/x LOCI_SHARDS=8 [LOCI_MODEL=... LOCI_N=... LOCI_STUDY_ARGS=...] \
#     scripts/slurm/submit-study.sh [sbatch options for both jobs, e.g. --partition=gpu --gres=gpu:1]
#
# The LOCI_* variables are study.sbatch's (see its header); they travel to the jobs in the
# environment, with the paths made absolute here. Extra, for this script only:
#   LOCI_SHARDS        number of shards = array tasks (default 8)
#   LOCI_MAX_RUNNING   at most this many tasks at once (sbatch --array=1-N%M; default no limit)
#   LOCI_WAIT=1        submit the array with `sbatch --wait`: return when every task has ended,
#                      with the highest exit code of its tasks (requeued tasks are waited for)
# Logs go to $LOCI_OUT/logs/ (stats-jobJOBID.out, shard-I-jobJOBID.out; each requeue appends).
# Prints `stats_job=ID` and `array_job=ID` on stdout (for scripts: eval), the rest on stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sbatch_file="$here/study.sbatch"
: "${LOCI_OUT:?set LOCI_OUT to the run folder}"
shards=${LOCI_SHARDS:-8}
case "$shards" in '' | *[!0-9]* | 0) echo "LOCI_SHARDS must be a positive number" >&2; exit 2 ;; esac

# Absolute paths: the jobs may start in another folder than this shell's.
abs() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
export LOCI_OUT
LOCI_OUT=$(abs "$LOCI_OUT")
for v in LOCI_STATS LOCI_DATASET LOCI_CORPUS LOCI_DATA LOCI_MODEL LOCI; do
  # Only paths that exist here: a bare `LOCI=loci` (from PATH) is left alone.
  if [ -n "${!v:-}" ] && [ -e "${!v}" ]; then export "$v=$(abs "${!v}")"; fi
done
export LOCI_SHARDS=$shards
export LOCI_ROOT=${LOCI_ROOT:-$(cd "$here/../.." && pwd)}

mkdir -p "$LOCI_OUT/logs"
if compgen -G "$LOCI_OUT/*.jsonl" >/dev/null && ! compgen -G "$LOCI_OUT/shard-*-of-$shards.jsonl" >/dev/null; then
  echo "$LOCI_OUT already holds results of another run (not shard-*-of-$shards.jsonl); use a new LOCI_OUT" >&2
  exit 2
fi

stats_job=$(sbatch --parsable --job-name=loci-stats --output="$LOCI_OUT/logs/stats-job%j.out" \
  "$@" "$sbatch_file" stats)
stats_job=${stats_job%%;*} # --parsable prints ID[;CLUSTER]
wait_flag=()
[ "${LOCI_WAIT:-}" != 1 ] || wait_flag=(--wait)
rc=0
array_job=$(sbatch --parsable ${wait_flag[@]+"${wait_flag[@]}"} --job-name=loci-study \
  --array="1-$shards${LOCI_MAX_RUNNING:+%$LOCI_MAX_RUNNING}" \
  --dependency="afterok:$stats_job" --kill-on-invalid-dep=yes \
  --output="$LOCI_OUT/logs/shard-%a-job%A.out" "$@" "$sbatch_file" shard) || rc=$?
array_job=${array_job%%;*}
array_job=${array_job%%$'\n'*}

cat >&2 <<EOF
statistics job $stats_job, then array job $array_job (tasks 1-$shards) into $LOCI_OUT
  watch:     squeue -j $stats_job,$array_job
  logs:      $LOCI_OUT/logs/
  rerun task I (it resumes), with the same LOCI_* variables:
             LOCI_SHARDS=$shards sbatch --array=I --output=$LOCI_OUT/logs/shard-%a-job%A.out $sbatch_file
  when done: ${LOCI:-loci} study analyze --json $LOCI_OUT
EOF
echo "stats_job=$stats_job"
echo "array_job=$array_job"
exit "$rc"
