"""Stop signals (diffusionlab.stopping) and the processes of one job (diffusionlab.distributed),
in one process: signals become Stopped at the next stop point, SLURM requeue, launch detection,
agreement and gathering without a process group."""

from __future__ import annotations

import os
import signal
import stat

import pytest
import torch

from diffusionlab.diffusion.schedules import get_schedule
from diffusionlab.distributed import (
    Launch,
    gather_rows,
    launch_of,
    lockstep,
    shard,
    together,
)
from diffusionlab.sampling.generator import DiffusionGenerator
from diffusionlab.sampling.spec import SamplerSpec
from diffusionlab.stopping import (
    Stopped,
    check,
    received,
    requested,
    requeue_slurm_job,
    slurm_job_id,
    stop_signals,
)


def test_a_signal_becomes_stopped_at_the_next_stop_point_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals():
        check()  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert requested() == "SIGTERM" and received() == ["SIGTERM"]
        with pytest.raises(Stopped) as stop:
            check()
    assert stop.value.signal == "SIGTERM" and stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before and requested() is None
    check()  # outside a session nothing is recorded


def test_handlers_installed_before_still_run_and_a_second_sigint_interrupts():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with stop_signals():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGINT)
            assert seen == [signal.SIGUSR1] and received() == ["SIGUSR1", "SIGINT"]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert Stopped("SIGUSR1").exit_code == 138 and Stopped("SIGINT").exit_code == 130
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sampling_stops_within_one_network_evaluation():
    """The generator's denoiser is a stop point: SIGTERM during evaluation 3 of 10 ends sampling
    before evaluation 4."""
    calls = []

    def denoise(x, sigma, cond):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.zeros_like(x)

    gen = DiffusionGenerator(
        denoise, get_schedule("edm"), (1, 4, 4), spec=SamplerSpec(name="euler", nfe=10)
    )
    with stop_signals(), pytest.raises(Stopped):
        gen.generate([0, 1])
    assert len(calls) == 3
    assert gen.generate([0]).shape == (1, 1, 4, 4) and len(calls) == 13  # no session: runs


def test_slurm_requeue_calls_scontrol_with_the_job_id(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NAME", "sample")
    assert requeue_slurm_job("SIGTERM") is None  # SLURM requeues a preempted job itself
    assert requeue_slurm_job("SIGUSR1") == "requeued SLURM job 4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job("SIGUSR1") == "requeued SLURM job 77_3"
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]
    assert slurm_job_id({"SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "interactive"}) is None


def test_launch_from_torchrun_srun_and_submitit_environments():
    assert launch_of({}) == Launch()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "x"}
    assert launch_of(torchrun) == Launch(3, 8, 1, "torchrun")
    srun = {
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODELIST": "gpu[12-13]",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NAME": "sample",
    }
    assert launch_of(srun) == Launch(9, 16, 1, "slurm", "gpu12", 15000 + 3456)
    assert not launch_of({**srun, "SLURM_NTASKS": "1"}).distributed  # one task, no group
    assert not launch_of({**srun, "SLURM_JOB_NAME": "interactive"}).distributed
    local = {
        "SUBMITIT_EXECUTOR": "local",
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "999",
    }
    one, other = launch_of(local), launch_of({**local, "SUBMITIT_LOCAL_GLOBALID": "0"})
    assert (one.rank, one.world_size, one.launcher, one.master_addr) == (
        1,
        2,
        "submitit",
        "127.0.0.1",
    )
    assert one.master_port == other.master_port  # both tasks derive the same port


def test_one_process_agrees_with_itself():
    with pytest.raises(ValueError, match="boom"), together():
        raise ValueError("boom")
    done = []
    lockstep(list(range(7)), 3, done.append)
    assert done == [[0, 1, 2], [3, 4, 5], [6]]
    with stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Stopped):
            lockstep(list(range(7)), 3, done.append)
    assert len(done) == 3  # the signal came before the first batch: none ran
    assert shard(7, 1, 3) == [1, 4]
    rows = torch.tensor([[1.0], [0.0], [2.0]])
    assert gather_rows(rows, torch.tensor([1, 0, 2]), 3).flatten().tolist() == [0.0, 1.0, 2.0]
