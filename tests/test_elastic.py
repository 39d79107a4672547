"""Elastic torchrun on CPU (gloo): a rank SIGKILLed mid-run makes the agent restart the group (--max-restarts)
and the ranks resume from the newest checkpoint to the weights of the uninterrupted run; two agents meeting in a
c10d rendezvous (two nodes, simulated on localhost) train like one agent with two processes."""
from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from tests.conftest import ROOT, free_port, run_like_torchrun
from tests.test_train import _args, _children, _run_dir
from utils.checkpoint import CheckpointManager, safe_load

# 2 ranks x batch 4 of 16 samples an epoch: 2 steps an epoch, 4 in all, a checkpoint after each.
OPTS = ('TRAIN.EPOCHS', '2', 'TRAIN.SAVE_STEPS', '1', 'DATA.BATCH_SIZE', '4', 'DATA.EPOCH_SAMPLES', '16')
STEPS = 4
ELASTIC = ('--standalone', '--nproc-per-node', '2', '--max-restarts', '2')
# torch >= 2.5 shares the agent's rendezvous TCPStore with the workers' init_process_group and keeps it across
# restarts without a per-attempt prefix: a restarted rank can read the gloo addresses of the group it replaces
# (the keys default_pg/0//cpu//0/<rank> are still there) and then hangs or fails with 'Connection refused'
# (pytorch/pytorch#135712). Each round gets a fresh store when the agent does not share its own.
FRESH_STORE = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}


class _Agent:
    """A torchrun agent in a session of its own (its workers too), its output in a file; `kill` ends them all."""

    def __init__(self, flags, data, out, log, env=None):
        self.log = log
        with open(log, 'w') as f:  # a file, not a pipe: nobody has to read it while the run goes on
            self.process = subprocess.Popen(
                [sys.executable, '-m', 'torch.distributed.run', *flags, os.path.join(ROOT, 'main.py'),
                 *_args(data, out, *OPTS)],
                cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1', LOGLEVEL='INFO', **(env or {})),
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)  # LOGLEVEL: the agent's log lines

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait(self, timeout=300):
        return self.process.wait(timeout=timeout), self.output()

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the agent and its workers are gone already
            pass
        self.process.wait()


def _final(out):
    return safe_load(CheckpointManager(_run_dir(out)).checkpoints()[-1])


def _assert_same_run(final, reference):
    assert final['progress'] == reference['progress'] and final['progress']['step'] == STEPS
    assert final['world_size'] == reference['world_size'] == 2
    worst = max((final['model'][k] - v).abs().max().item() for k, v in reference['model'].items())
    print(f'max |dW| {worst:.3g}')
    for key, value in reference['model'].items():
        assert torch.allclose(final['model'][key], value, atol=1e-6), (key, f'max |dW| {worst:.3g}')


def _seconds_after(start, log, pattern):
    """Seconds from `start` (a time.time()) to the agent's first log line ('I1201 02:26:37.738000 ...') that
    matches `pattern`, as text for a report; '?' without one."""
    match = re.search(r'^[IWE]\d{4} (\d\d:\d\d:\d\d\.\d+) .*' + pattern, log, re.M)
    if not match:
        return '?'
    clock = datetime.datetime.strptime(match.group(1), '%H:%M:%S.%f').time()
    return f'{datetime.datetime.combine(datetime.date.fromtimestamp(start), clock).timestamp() - start:.2f}'


@pytest.fixture(scope='module')
def uninterrupted(tiny_data, tmp_path_factory):
    """The final checkpoint of the same run in two ranks, nothing killed (forked ranks: no agent needed)."""
    out = str(tmp_path_factory.mktemp('uninterrupted'))
    run_like_torchrun(main.main, _args(tiny_data, out, *OPTS))
    return _final(out)


def _local_rank(pid):
    with open(f'/proc/{pid}/environ', 'rb') as f:
        return int(dict(v.split(b'=', 1) for v in f.read().split(b'\0') if b'=' in v)[b'LOCAL_RANK'])


def test_a_killed_rank_is_restarted_and_resumes_to_the_uninterrupted_weights(tiny_data, tmp_path, uninterrupted):
    """Rank 0 (the one that writes the checkpoints) is SIGKILLed once a checkpoint exists: the agent stops
    the group and starts it again, the new ranks resume from the newest checkpoint, the run ends with 0."""
    out = str(tmp_path / 'run')
    manager = CheckpointManager(_run_dir(out))
    agent = _Agent(ELASTIC, tiny_data, out, str(tmp_path / 'torchrun.log'), FRESH_STORE)
    try:
        deadline = time.time() + 240
        while not manager.checkpoints() and time.time() < deadline and agent.process.poll() is None:
            time.sleep(0.02)
        workers = {_local_rank(pid): pid for pid in _children(agent.process.pid)}
        assert sorted(workers) == [0, 1], (workers, agent.output())
        os.kill(workers[0], signal.SIGKILL)
        killed = time.time()
        code, log = agent.wait()
    finally:
        agent.kill()
    assert code == 0, log
    assert f'failed (exitcode: -9) local_rank: 0 (pid: {workers[0]})' in log, log
    assert 'Worker group FAILED. 2/2 attempts left; will restart worker group' in log, log
    assert 'restart_count=1' in log and 'restart_count=2' not in log, log
    resumed = [int(step) for step in re.findall(r'resuming from .*checkpoint_(\d+)\.pth', log)]
    assert len(resumed) == 1 and 1 <= resumed[0] < STEPS, log  # once, from a checkpoint before the end
    print(f'resumed from step {resumed[0]}; the agent saw the dead rank {_seconds_after(killed, log, "exitcode: -9")}'
          f's after the kill, had the group rendezvoused again {_seconds_after(killed, log, "restart_count=1")}s after')
    _assert_same_run(_final(out), uninterrupted)


def test_two_agents_rendezvous_like_one_agent_with_two_processes(tiny_data, tmp_path, uninterrupted):
    """Two agents of one process each (--nnodes 2) meet in a c10d rendezvous, the first hosting its store:
    both exit 0, the group was 2 nodes of ranks 0 and 1, and the run ends as with one agent of 2 processes."""
    out, port = str(tmp_path / 'run'), free_port()
    rdzv = ['--nnodes', '2', '--nproc-per-node', '1', '--rdzv-backend', 'c10d',
            '--rdzv-endpoint', f'localhost:{port}', '--rdzv-id', f'unicl-{os.getpid()}']
    agents = [_Agent([*rdzv, '--rdzv-conf', f'is_host={host}'], tiny_data, out, str(tmp_path / f'node{host}.log'))
              for host in (1, 0)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            codes = [agent.process.poll() for agent in agents]
            if None not in codes or any(codes):  # all done, or one failed: the other would wait 15 minutes
                break
            time.sleep(0.1)
    finally:
        for agent in agents:
            agent.kill()
    codes, logs = [agent.process.returncode for agent in agents], [agent.output() for agent in agents]
    assert codes == [0, 0], '\n\n'.join(logs)
    for log in logs:
        assert 'group_world_size=2' in log and 'restart_count=1' not in log, log
    assert sorted(int(re.search(r'group_rank=(\d)', log).group(1)) for log in logs) == [0, 1]
    _assert_same_run(_final(out), uninterrupted)
