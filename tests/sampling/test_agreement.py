"""Two gloo processes in step (diffusionlab.distributed.lockstep): a failure in one ends both
after the same batch, with the failed process's message in the other; a stop signal in one
stops both; uneven shares take part in every round; rows gathered back in index order."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffusionlab.distributed import PeerFailed, gather_rows, lockstep, shard
from diffusionlab.stopping import Stopped, record, stop_signals


def _worker(rank: int, port: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    report: dict = {}
    try:
        mine = shard(7, rank, 2)  # 4 and 3 items: the second process sits out the last round
        done: list[list[int]] = []
        lockstep(mine, 1, done.append)
        report["even"] = list(done)
        rows = torch.tensor([[float(i)] for i in mine])
        report["gathered"] = gather_rows(rows, torch.tensor(mine), 7).flatten().tolist()

        def fail(batch: list[int]) -> None:
            if rank == 1 and batch == [3]:
                raise ValueError("boom on the second batch")
            done.append(batch)

        done.clear()
        try:
            lockstep(mine, 1, fail)
        except (ValueError, PeerFailed) as e:
            report["failure"] = [type(e).__name__, str(e), list(done)]

        done.clear()
        with stop_signals():

            def stop(batch: list[int]) -> None:
                done.append(batch)
                if rank == 0 and len(done) == 2:
                    record(signal.SIGTERM)  # as the handler does when SIGTERM arrives

            try:
                lockstep(mine, 1, stop)
            except Stopped as e:
                report["stop"] = [e.signal, list(done)]
    finally:
        (out / f"{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def test_a_failure_or_a_stop_in_one_process_ends_both_after_the_same_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, (port, tmp_path), nprocs=2, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["even"] == [[0], [2], [4], [6]] and r1["even"] == [[1], [3], [5]]
    assert r0["gathered"] == r1["gathered"] == [float(i) for i in range(7)]
    assert r1["failure"] == ["ValueError", "boom on the second batch", [[1]]]
    assert r0["failure"] == [
        "PeerFailed",
        "process 1 of 2 failed: ValueError: boom on the second batch",
        [[0], [2]],  # its second batch ran, in the same round; no third
    ]
    assert r0["stop"] == ["SIGTERM", [[0], [2]]] and r1["stop"] == ["SIGTERM", [[1], [3]]]
