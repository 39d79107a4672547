#!/bin/bash
# cluster/unicl.sbatch on a real SLURM: a single-node cluster (munge, slurmctld, slurmd from Debian's packages)
# on this machine runs the script adapted to CPU (2 processes, the tiny config), stops it four ways, each
# followed by the requeued job resuming, and checks that every stop saved at the signal, that no step was
# redone, that the output file kept every restart, and that the final weights equal an uninterrupted run's.
#
# Needs: root, Debian 12 (installs munge, slurmctld, slurmd and slurm-client with apt-get when missing), the
# project's venv (.venv), no other SLURM running. Takes 7-10 minutes on 2 CPU cores (plus the install):
# 1-3 for the uninterrupted reference, 5-6 for the SLURM job (4 restarts). Run: `make test-slurm`.
#
# The cluster: a slurm.conf generated in a temp folder (this machine's CPUs and memory), proctrack/linuxproc
# (no cgroups needed), KillWait=120 (the time a stopped run has to save), and AuthInfo=cred_expire=10: a
# requeued job waits cred_expire seconds before it may start again (SLURM's default is 120 s, which with
# the scheduler's cycle makes the ~2-3 min a real cluster's requeued job waits). All daemons started here
# are stopped on exit; the temp folder (logs, job output, runs) is kept and printed.
#
# The stops: (a) the time limit: the job's TimeLimit is brought to 5 minutes ahead (scontrol update), so the
# script's own `--signal=B:USR1@300` fires within SLURM's 30-second check; (b) `scontrol requeue JOB`;
# (c) a preemption (PreemptMode=REQUEUE: a job in a partition of a higher PriorityTier takes the node);
# (d) `scancel --signal=TERM JOB`. Then the job runs to its end.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d /tmp/unicl-slurm.XXXXXX)
export SLURM_CONF=$WORK/slurm.conf
DAEMONS=()
JOB=

say() { echo "[$(date '+%F %T')] $*"; }
fail() {
    say "FAIL: $*"
    [ -f "$WORK/job.out" ] && { echo "--- tail of $WORK/job.out"; tail -n 30 "$WORK/job.out"; }
    exit 1
}

teardown() {
    [ -n "$JOB" ] && scancel "$JOB" 2>/dev/null || true
    for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null || true; done
    say "SLURM stopped; logs, job output and runs kept in $WORK"
}
trap teardown EXIT

[ "$(id -u)" = 0 ] || fail "needs root (it starts munged, slurmctld and slurmd)"
[ -x "$PY" ] || fail "no $PY: run 'make test-slurm' (it builds the venv)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    say "installing munge and SLURM (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client
fi
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then fail "a SLURM daemon is already running"; fi

# -- the run: the tiny built-in data, the tiny config at 32 px, 2 processes x batch 4, 8 steps an epoch ---------
"$PY" -m data.builtin --out "$WORK/data" --scale tiny >/dev/null
SOURCES="[{'TYPE':'imagefolder','PATH':'labels','NAME':'shapes'},"
SOURCES+="{'TYPE':'tsv','PATH':'captions/captions.tsv','NAME':'table'}]"
OPTS=(--opts DATA.IMG_SIZE 32 MODEL.IMAGE_ENCODER.IMG_SIZE 32 DATA.BATCH_SIZE 4 DATA.NUM_WORKERS 2
      DATA.EPOCH_SAMPLES 64 AUG.AUTO_AUGMENT none AUG.REPROB 0.0 AUG.COLOR_JITTER 0.0 TRAIN.WARMUP_EPOCHS 0
      TRAIN.BASE_LR 0.02 PRINT_FREQ 1 TRAIN.EPOCHS 20 DATA.SOURCES "$SOURCES")
CFG=configs/unicl_tiny.yaml
RUN_DIR=unicl_tiny/default  # OUTPUT/MODEL.NAME/TAG

say "uninterrupted reference: torchrun, 2 processes"
(cd "$ROOT" && OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 main.py \
    --cfg "$CFG" --data-path "$WORK/data" --output "$WORK/reference" "${OPTS[@]}") > "$WORK/reference.log" 2>&1 \
    || fail "the reference run failed: see $WORK/reference.log"

# -- a one-node cluster ----------------------------------------------------------------------------------------
HOST=$(hostname)
MEM_MB=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1024 ))
mkdir -p "$WORK/state" "$WORK/spool" /run/munge
cat > "$SLURM_CONF" <<EOF
ClusterName=unicltest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=120
MinJobAge=120
NodeName=$HOST CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=10
EOF
if ! munge -n >/dev/null 2>&1; then
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    DAEMONS+=("$(cat /run/munge/munged.pid)")
fi
slurmctld -f "$SLURM_CONF"
for _ in $(seq 50); do [ -s "$WORK/slurmctld.pid" ] && break; sleep 0.2; done
DAEMONS+=("$(cat "$WORK/slurmctld.pid")")
slurmd -f "$SLURM_CONF"
for _ in $(seq 50); do [ -s "$WORK/slurmd.pid" ] && break; sleep 0.2; done
DAEMONS+=("$(cat "$WORK/slurmd.pid")")
for _ in $(seq 60); do sinfo -h -o %T 2>/dev/null | grep -qx idle && break; sleep 0.5; done
sinfo -h -o %T | grep -qx idle || fail "the node did not come up: see $WORK/slurmd.log and slurmctld.log"
say "SLURM up: $(sinfo -h -o '%N %c CPUs %T')"

# -- the job: the script adapted to CPU (its GPU request removed), 2 processes on the node ---------------------
sed 's/ --gpus-per-node=[0-9]*//' "$ROOT/cluster/unicl.sbatch" > "$WORK/unicl-cpu.sbatch"
JOB=$(cd "$ROOT" && CFG=$CFG DATA=$WORK/data OUT=$WORK/run PYTHON=$PY OMP_NUM_THREADS=1 sbatch --parsable \
    --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=60 --output="$WORK/job.out" \
    "$WORK/unicl-cpu.sbatch" "${OPTS[@]}")
say "submitted job $JOB"
STOPS=$WORK/stops.tsv
: > "$STOPS"

count() { local n; n=$(grep -c -- "$1" "$WORK/job.out" 2>/dev/null) || true; echo "${n:-0}"; }
wait_for() {  # PATTERN COUNT SECONDS: until the output file has COUNT lines matching PATTERN
    local deadline=$((SECONDS + $3))
    until [ "$(count "$1")" -ge "$2" ]; do
        [ $SECONDS -lt $deadline ] || fail "waited $3 s for $2 line(s) matching '$1'"
        sleep 0.5
    done
}
state() { scontrol show job "$JOB" | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
trained() {  # RESTART: wait for 4 more training steps after restart RESTART started
    wait_for "job $JOB: restart $1:" 1 300
    local before
    before=$(count 'Train:')
    wait_for 'Train:' $((before + 4)) 300
}
stop() {  # KIND: note when the harness acted
    printf '%s\t%s\n' "$1" "$(date +%s)" >> "$STOPS"
    say "stop $(wc -l < "$STOPS"): $1"
}

trained 0
elapsed=$(scontrol show job "$JOB" | grep -o 'RunTime=[0-9:-]*' | cut -d= -f2)
minutes=$(( $(echo "$elapsed" | awk -F: '{print $(NF-1) + 60 * (NF > 2 ? $(NF-2) : 0)}') + 5 ))
stop "time limit"
scontrol update JobId="$JOB" TimeLimit="$minutes"  # 4-5 minutes left: under --signal=B:USR1@300
wait_for 'time limit near: stopping the run' 1 120
scontrol update JobId="$JOB" TimeLimit=60  # the restarts get the whole hour again
trained 1
stop "requeue"
scontrol requeue "$JOB"
trained 2
stop "preemption"
sbatch --parsable --partition=urgent --ntasks=2 --output=/dev/null --wrap "sleep 2" >/dev/null
trained 3
stop "scancel TERM"
scancel --signal=TERM "$JOB"
wait_for 'run finished' 1 600
for _ in $(seq 120); do [ "$(state)" = COMPLETED ] && break; sleep 0.5; done
scontrol show job "$JOB" | grep -E 'JobState|Restarts' | sed 's/^ */  /'
[ "$(state)" = COMPLETED ] || fail "job $JOB ended $(state), not COMPLETED"

"$PY" "$ROOT/tests/cluster/check_weights.py" --log "$WORK/job.out" --job "$JOB" --stops "$STOPS" \
    --run "$WORK/run/$RUN_DIR" --reference "$WORK/reference/$RUN_DIR"
