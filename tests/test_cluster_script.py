"""cluster/unicl.sbatch: the README shows it as it is, bash parses it, and its decisions (requeue on 143 only,
forward a time-limit USR1 to the step, wait for the step's last output) hold with srun, scontrol and scancel
replaced by stubs. The real thing, on a real SLURM: `make test-slurm` (tests/cluster/run_slurm_test.sh)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, 'cluster', 'unicl.sbatch')


def _readme_block() -> str:
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        blocks = re.findall(r'```bash\n(#!/bin/bash\n.*?)```', f.read(), flags=re.S)
    sbatch = [block for block in blocks if '#SBATCH' in block]
    assert len(sbatch) == 1, f'{len(sbatch)} SLURM scripts in the README'
    return sbatch[0]


def test_readme_shows_the_script_as_it_is():
    with open(SCRIPT, encoding='utf-8') as f:
        assert _readme_block() == f.read(), 'README.md and cluster/unicl.sbatch differ: copy the file into the README'


def test_bash_parses_the_script_and_the_harness():
    for path in (SCRIPT, os.path.join(ROOT, 'tests', 'cluster', 'run_slurm_test.sh')):
        result = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


# srun: notes its call, then runs "the training": it exits with $FAKE_STATUS after $FAKE_POLLS x 0.05 s,
# or, once scancel has signalled the step, prints a save 1 s later and exits with $FAKE_STATUS (a real
# stop's save outlives the batch shell's first `wait`). scontrol and scancel note their calls; `scontrol
# show job` shows the job in $FAKE_STATE (RUNNING) after $FAKE_RESTARTS (0) restarts.
STUBS = {
    'srun': '''#!/bin/bash
echo "srun $*" >> "$CALLS"
for _ in $(seq "$FAKE_POLLS"); do [ -e "$STUB/stopped" ] && break; sleep 0.05; done
[ -e "$STUB/stopped" ] && { sleep 1; echo "saved at the signal"; }
exit "$FAKE_STATUS"
''',
    'scontrol': '''#!/bin/bash
echo "scontrol $*" >> "$CALLS"
[ "$1 $2" = "show hostnames" ] && echo node1
[ "$1 $2" = "show job" ] && printf '   JobState=%s Reason=None\n   Requeue=1 Restarts=%s BatchFlag=1\n' \
    "${FAKE_STATE:-RUNNING}" "${FAKE_RESTARTS:-0}"
exit 0
''',
    'scancel': '''#!/bin/bash
echo "scancel $*" >> "$CALLS"
touch "$STUB/stopped"
''',
}


@pytest.fixture
def stub(tmp_path):
    folder = tmp_path / 'bin'
    folder.mkdir()
    for name, text in STUBS.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def _run(stub, status, send=None, **variables):
    """Run the script with the stubs; `send`: a signal for the script once srun has started."""
    calls = stub.parent / 'calls'
    env = dict(os.environ, PATH=f'{stub}:{os.environ["PATH"]}', STUB=str(stub.parent), CALLS=str(calls),
               FAKE_STATUS=str(status), FAKE_POLLS='40' if send else '1', SLURM_JOB_ID='42',
               SLURM_JOB_NODELIST='node1', SLURM_NTASKS='2', **variables)
    process = subprocess.Popen(['bash', SCRIPT, '--opts', 'TRAIN.EPOCHS', '2'], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        deadline = time.time() + 10
        while not (calls.exists() and 'srun' in calls.read_text()) and time.time() < deadline:
            time.sleep(0.02)
        process.send_signal(send)
    output, _ = process.communicate(timeout=30)
    return process.returncode, output, calls.read_text()


def test_a_finished_run_is_not_requeued(stub):
    code, output, calls = _run(stub, 0)
    assert code == 0 and 'run finished' in output and 'requeue' not in calls
    assert 'srun --kill-on-bad-exit=1 bash -c' in calls and 'main.py --cfg' in calls
    assert '--opts TRAIN.EPOCHS 2' in calls  # the script's arguments reach main.py


def test_a_stopped_run_is_requeued(stub):
    code, output, calls = _run(stub, 143)
    assert code == 0 and 'requeued' in output and 'scontrol requeue 42' in calls


def test_a_failed_run_fails_the_job_without_requeue(stub):
    code, output, calls = _run(stub, 1)
    assert code == 1 and 'run failed (exit status 1): not requeued' in output and 'requeue' not in calls


def test_the_time_limit_signal_stops_the_step_and_waits_for_its_save(stub):
    code, output, calls = _run(stub, 143, send=signal.SIGUSR1)
    assert 'time limit near: stopping the run' in output and 'scancel --signal=TERM 42' in calls
    assert 'saved at the signal' in output, output  # the wait loop outlived the trap
    assert code == 0 and 'requeued' in output and 'scontrol requeue 42' in calls


def test_a_usr1_as_the_run_finishes_does_not_requeue(stub):
    code, output, calls = _run(stub, 0, send=signal.SIGUSR1)
    assert code == 0 and 'run finished' in output and 'requeue' not in calls


def test_sigterm_to_the_batch_shell_is_not_forwarded_and_slurm_requeues(stub):
    """`scontrol requeue` or a preemption: SLURM signals the step itself, and requeues the job (its restart
    count is already up when the step has ended); the script forwards nothing and does not requeue again."""
    code, output, calls = _run(stub, 143, send=signal.SIGTERM, FAKE_STATE='COMPLETING', FAKE_RESTARTS='1')
    assert 'SIGTERM (requeue, preemption or cancel)' in output and 'scancel' not in calls
    assert code == 0 and 'requeued by SLURM' in output and 'scontrol requeue' not in calls


def test_a_cancelled_job_is_not_requeued(stub):
    """A plain `scancel JOB`: the ranks save and exit with 143 while SLURM ends the job; requeueing it would
    bring it back."""
    code, output, calls = _run(stub, 143, send=signal.SIGTERM, FAKE_STATE='COMPLETING')
    assert code == 0 and 'job cancelled or out of time, not requeued' in output and 'scontrol requeue' not in calls
