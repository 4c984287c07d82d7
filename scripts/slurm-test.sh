#!/usr/bin/env bash
# The study's Slurm array job on a real (one-node, localhost) Slurm: the shipped
# scripts/slurm/submit-study.sh and study.sbatch run a tiny study (tiny-gpt2, 30 cases) as a
# statistics job and an array of 3 shards (submitted with `sbatch --wait`); one task is requeued
# in the middle of its shard (as preemption would: SIGTERM, then it runs again) and must resume,
# not restart; and
# `loci study analyze` of the shard folder must equal, exactly, that of one unsharded run made
# here without Slurm.
#
# Installs slurm-wlm and munge (apt, --no-install-recommends) when missing; needs root. The
# cluster (scripts/slurm/local-cluster.sh) lives in a temporary folder, on free ports, and is
# always stopped, even on failure or Ctrl-C. About 60 s on 2 cores (plus ~6 s to install once).
# Uses $LOCI, else $CARGO_TARGET_DIR/release/loci, else `loci` on PATH; data from LOCI_DATA
# (default ../shared/data). KEEP=1 keeps the temporary folder.
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME and awk below: a decimal point, not a comma
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
t_start=$EPOCHREALTIME

say() { printf '[slurm-test %s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { say "FAIL: $*"; exit 1; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

if [ -n "${LOCI:-}" ]; then
  loci=$LOCI
elif [ -x "$CARGO_TARGET_DIR/release/loci" ]; then
  loci=$CARGO_TARGET_DIR/release/loci
else
  loci=$(command -v loci) || fail "no loci binary: set LOCI or build it (cargo build --release)"
fi
loci=$(cd "$(dirname "$loci")" && pwd)/$(basename "$loci")
[ -x "$loci" ] || fail "$loci is not an executable"
data="${LOCI_DATA:-$root/../shared/data}"
dataset=$data/counterfact/counterfact_rome_format_sample500.json
corpus=$data/wikipedia/enwiki_2015_wikiextractor_AA_00-19.jsonl
{ [ -f "$dataset" ] && [ -f "$corpus" ]; } || fail "no data in $data (set LOCI_DATA)"

# --- Slurm itself ---------------------------------------------------------------------------
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null ||
  ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  [ "$(id -u)" = 0 ] || fail "Slurm is not installed and this is not root"
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }
  # The package lists only when the install cannot do without them.
  apt_install || { apt-get update -qq && apt_install; } || fail "apt-get install slurm-wlm munge failed"
fi
[ "$(id -u)" = 0 ] || fail "the local cluster runs its daemons and jobs as root; run as root"

# --- the cluster, always stopped ------------------------------------------------------------
# Short path: unix sockets live under it.
work=$(mktemp -d /tmp/loci-slurm.XXXXXX)
chmod 0755 "$work" # munged wants every folder above its socket open to all (mktemp: 0700)
cluster=$work/c
out=$work/shards
dump() {
  say "--- logs (kept in $work) ---"
  local f
  for f in "$cluster/log/slurmctld.log" "$cluster/log/slurmd.log" "$cluster/munge/munged.log" "$out"/logs/*; do
    [ -f "$f" ] || continue
    echo "=== $f" >&2
    tail -n 60 "$f" >&2
  done
  [ -z "${SLURM_CONF:-}" ] || scontrol -o show job >&2 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  [ "$rc" -eq 0 ] || dump
  "$root/scripts/slurm/local-cluster.sh" stop "$cluster" || { say "FAIL: the cluster did not stop cleanly"; rc=1; }
  if [ "$rc" -eq 0 ] && [ -z "${KEEP:-}" ]; then rm -rf "$work"; else say "files kept in $work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t=$EPOCHREALTIME
# (A failure inside "$(...)" given straight to eval would go unnoticed: assign first.)
cluster_env=$("$root/scripts/slurm/local-cluster.sh" start "$cluster") || fail "the cluster did not start"
eval "$cluster_env"
t_cluster=$(since "$t")

# --- the reference: one process, no shards --------------------------------------------------
# The study's settings, kept tiny; the same for the reference and the array. One thread
# everywhere, as each task gets one CPU.
model=$root/tests/fixtures/tiny-gpt2
n=30
shards=3
study_args="--methods rome,ft-1 --layers 0,2 --all-cases --samples 2 --v-steps 2 --no-essence"
t=$EPOCHREALTIME
# shellcheck disable=SC2086 # study_args is a list of flags
"$loci" study run --model "$model" --dataset "$dataset" --corpus "$corpus" --stats-tokens 2000 \
  --n "$n" --min-prob 0 --threads 1 $study_args --stats "$work/ref-stats" --out "$work/whole.jsonl" \
  >/dev/null 2>"$work/whole.log" || { cat "$work/whole.log" >&2; fail "the reference run failed"; }
t_ref=$(since "$t")

# --- the array job, through the shipped scripts ---------------------------------------------
export LOCI="$loci" LOCI_MODEL="$model" LOCI_DATASET="$dataset" LOCI_CORPUS="$corpus"
export LOCI_OUT="$out" LOCI_N="$n" LOCI_SHARDS="$shards" LOCI_MIN_PROB=0 LOCI_STATS_TOKENS=2000
export LOCI_STUDY_ARGS="$study_args"
t_submit=$EPOCHREALTIME
# One CPU per task (so 2 of the 3 tasks run at once on 2 cores); the sbatch file's defaults
# (4 CPUs, 16G) are for real runs. LOCI_WAIT=1: the array goes in with `sbatch --wait`, which
# returns (in the background here) once every task has ended, requeued ones included.
LOCI_WAIT=1 "$root/scripts/slurm/submit-study.sh" --cpus-per-task=1 --mem=1G --time=10:00 \
  >"$work/submitted" 2>"$work/submit.log" &
submit_pid=$!
# The jobs' IDs, by name (ours are the only jobs of this cluster).
job_id() { squeue -h -n "$1" -o %F 2>/dev/null | head -n 1; }
submitted() { [ -n "$(job_id loci-study)" ]; }
state() { squeue -h -j "$1" -o %T 2>/dev/null | head -n 1; }
cases_in() { grep -c '"record":"case"' "$1" 2>/dev/null || true; }
wait_until() { # seconds description command...
  local limit=$1 what=$2 i
  shift 2
  for ((i = 0; i < limit * 10; i++)); do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  fail "waited ${limit}s for: $what"
}

wait_until 30 "the array job to be submitted" submitted
array_job=$(job_id loci-study)
stats_job=$(job_id loci-stats)
[ -n "$stats_job" ] || stats_job=$array_job # the statistics job may already be done
say "statistics job $stats_job, array job $array_job"

# --- requeue task 1 in the middle of its shard ----------------------------------------------
# Each shard has 10 cases of ~0.3 s: once the first is written, the task is surely mid-way.
victim=${array_job}_1
part1=$out/shard-1-of-$shards.jsonl
first_case_written() {
  [ -n "$(squeue -h -j "$stats_job,$array_job" 2>/dev/null)" ] || fail "the jobs ended before task 1 could be requeued"
  [ "$(state "$victim")" = RUNNING ] && [ "$(cases_in "$part1")" -ge 1 ]
}
wait_until 90 "task 1 running with a case written" first_case_written
scontrol requeue "$victim" || fail "scontrol requeue $victim failed"
t_requeue=$EPOCHREALTIME
# Requeued: SIGTERM to the task, then back to PENDING until its credential expires.
requeued() { case "$(state "$victim")" in PENDING | REQUEUE*) return 0 ;; *) return 1 ;; esac; }
wait_until 30 "task 1 back in the queue" requeued
killed_at=$(cases_in "$part1")
per_shard=$((n / shards))
{ [ "$killed_at" -ge 1 ] && [ "$killed_at" -lt "$per_shard" ]; } ||
  fail "task 1 had $killed_at of $per_shard cases when it was stopped: not mid-way"
say "task 1 requeued with $killed_at of $per_shard cases done"
running_again() { [ "$(state "$victim")" = RUNNING ] || [ -z "$(state "$victim")" ]; }
wait_until 60 "task 1 to run again" running_again
requeue_delay=$(since "$t_requeue")

# --- all done -------------------------------------------------------------------------------
submit_rc=0
wait "$submit_pid" || submit_rc=$?
[ "$submit_rc" = 0 ] || { cat "$work/submit.log" >&2; fail "sbatch --wait of the array returned $submit_rc"; }
t_array=$(since "$t_submit")
[ "$(sed -n 's/^array_job=//p' "$work/submitted")" = "$array_job" ] ||
  fail "submit-study.sh printed another array job: $(cat "$work/submitted")"
stats_job=$(sed -n 's/^stats_job=//p' "$work/submitted")
show() { scontrol -o show job "$1"; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p"; }
[ "$(show "$stats_job" | field JobState)" = COMPLETED ] || fail "the statistics job did not complete"
for ((i = 1; i <= shards; i++)); do
  line=$(show "${array_job}_$i")
  { [ "$(field JobState <<<"$line")" = COMPLETED ] && [ "$(field ExitCode <<<"$line")" = 0:0 ]; } ||
    fail "task $i: $(field JobState <<<"$line") exit $(field ExitCode <<<"$line")"
done
[ "$(show "$victim" | field Restarts)" = 1 ] || fail "task 1 did not restart once (Restarts=$(show "$victim" | field Restarts))"

# The task's log (appended by each run): two starts, the stop, and the resume from the file.
log1=$out/logs/shard-1-job$array_job.out
{ [ "$(grep -c 'shard start .* restart 0 ' "$log1")" = 1 ] && [ "$(grep -c 'shard start .* restart 1 ' "$log1")" = 1 ]; } ||
  fail "$log1 does not show a first run and one rerun"
grep -q 'stopped by SIGTERM' "$log1" || fail "$log1 does not show the SIGTERM of the requeue"
resumed=$(sed -n 's/.*study: \([0-9]*\) cases (\([0-9]*\) already in.*/\2/p' "$log1" | tail -n 1)
[ "$resumed" = "$killed_at" ] ||
  fail "the rerun found ${resumed:-?} cases in its file, not the $killed_at there when it was stopped"
[ "$(cases_in "$part1")" = "$per_shard" ] || fail "shard 1 holds $(cases_in "$part1") cases, not $per_shard"

# --- the same analysis ----------------------------------------------------------------------
"$loci" study analyze --json "$work/whole.jsonl" >"$work/whole.json" || fail "analyze whole.jsonl failed"
"$loci" study analyze --json "$out" >"$work/shards.json" || fail "analyze of the shard folder failed"
python3 - "$work/whole.json" "$work/shards.json" "$n" <<'PY' || fail "the shards' analysis differs from the unsharded run's"
import json, sys
whole, shards = (json.load(open(p)) for p in sys.argv[1:3])
if whole.get("cases") != int(sys.argv[3]):
    sys.exit(f"the reference has {whole.get('cases')} cases, not {sys.argv[3]}")
if whole != shards:
    for k in sorted(set(whole) | set(shards)):
        if whole.get(k) != shards.get(k):
            print(f"differs: {k}\n  whole:  {json.dumps(whole.get(k))[:400]}\n  shards: {json.dumps(shards.get(k))[:400]}", file=sys.stderr)
    sys.exit(1)
PY

say "PASS: $shards shards analyse exactly as the unsharded run; task 1 was requeued after" \
  "$killed_at/$per_shard cases and resumed from its file"
say "times: cluster start ${t_cluster}s, reference run ${t_ref}s, submit to array done ${t_array}s" \
  "(requeue to rerun ${requeue_delay}s), total $(since "$t_start")s before stop"
