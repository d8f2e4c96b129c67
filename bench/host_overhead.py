"""Host overhead of the training step: what the framework adds around a network that costs
nothing, against a bare EDM-style step on the same pieces, side by side.

    python bench/host_overhead.py [--device cuda] [--batch 512] [--steps 100] [--rounds 3]

The network is replaced by ``F(x) = w x + b`` (two parameters), so what is timed is the
step's own work on a 3x32x32 batch:

- framework: the batch moved with ``non_blocking`` (as Lightning moves it), ``batch_loss``
  (per-sample sigma and noise from each sample's seed, the EDM loss), mean, backward, the
  non-finite guard, gradient clipping, the module's optimizer and LR schedule, ``ema_update``;
  ``framework + augment``: the same with EDM's augmentation (``augment=edm``, p = 0.12).
- bare: ``torch.randn`` for sigma (log-normal) and noise, the same denoiser and loss weight,
  backward, clipping, optimizer, EMA: what a hand-written EDM loop does.

Host time per step: steps are issued back to back and timed without waiting for the device
(``--device cuda``: wall clock; a host-device synchronisation inside a step shows up as host
time). Wall time per step adds the final synchronisation. On the CPU both are process CPU time
(one torch thread by default). Sides alternate over ``--rounds``; each reports its fastest
round. Then one step per side and batch size (``--profile-batches``, default 64 and 512) runs
under ``torch.profiler``: random-number operator calls (``normal_``, ``uniform_``,
``bernoulli_``, ``random_``, ...) and all ATen operator calls, to show what grows with the
batch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from benchlib import compose_train, machine, markdown_table, sync, write_results
from omegaconf import OmegaConf
from torch import nn

from diffusionlab.data.sampler import sample_seed
from diffusionlab.training.ema import ema_update
from diffusionlab.training.module import DiffusionModule
from diffusionlab.training.nonfinite import NonFiniteGuard

SHAPE = (3, 32, 32)
RNG_OPS = (
    "aten::normal_",
    "aten::uniform_",
    "aten::bernoulli_",
    "aten::random_",
    "aten::exponential_",
    "aten::cauchy_",
    "aten::geometric_",
    "aten::log_normal_",
    "aten::randperm",
    "aten::multinomial",
    "aten::native_dropout",
)
CLIP = 1.0


class TrivialNet(nn.Module):
    """``F(x, c_noise) = w x + b``: a network that costs (almost) nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        return x * self.w + self.b


def build(augment: bool) -> DiffusionModule:
    """The default run's module (EDM schedule, preconditioning and loss, Adam, plain EMA) on
    3x32x32 data, its network replaced by :class:`TrivialNet`."""
    overrides = ["dataset=cifar10", "model=unet_tiny", *(["augment=edm"] if augment else [])]
    plain = OmegaConf.to_container(compose_train(overrides, Path("/tmp/unused")), resolve=True)
    module = DiffusionModule(
        model=plain["model"],
        schedule=plain["schedule"],
        parameterization=plain["parameterization"],
        loss=plain["loss"],
        optimizer=plain["optimizer"],
        ema=plain["ema"],
        data_shape=list(SHAPE),
        lr_warmup_steps=plain["lr_warmup_steps"],
        augment=plain.get("augment"),
    )
    module.denoiser.net = TrivialNet()
    module.ema = type(module.denoiser)(TrivialNet(), module.denoiser.parameterization)
    module.ema.load_state_dict(module.denoiser.state_dict())
    module.ema.requires_grad_(False).eval()
    return module


def host_batches(batch: int, device: str, count: int = 4) -> list[tuple[torch.Tensor, ...]]:
    """``count`` data batches ``(x0, labels, seeds)`` in host memory (pinned for CUDA), with the
    seeds of consecutive global positions, as the data stream yields them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(count):
        x0 = torch.rand(batch, *SHAPE, generator=g) * 2 - 1
        labels = torch.zeros(batch, dtype=torch.long)
        seeds = torch.tensor([sample_seed(0, k * batch + i) for i in range(batch)])
        if device.startswith("cuda"):
            x0, labels, seeds = x0.pin_memory(), labels.pin_memory(), seeds.pin_memory()
        out.append((x0, labels, seeds))
    return out


def not_logging(step: int) -> SimpleNamespace:
    """A trainer as the guard sees it on a step that does not log."""
    return SimpleNamespace(
        max_steps=10**9,
        global_step=step,
        precision="32-true",
        _logger_connector=SimpleNamespace(should_update_logs=False),
    )


class Side:
    """One kind of step, its module and optimizer; ``step(i)`` runs optimizer step ``i``."""

    def __init__(self, kind: str, batch: int, device: str) -> None:
        self.kind, self.batch, self.device = kind, batch, device
        self.module = build(augment=kind == "framework + augment").to(device).train()
        opt = self.module.configure_optimizers()
        self.optimizer = opt["optimizer"]
        self.scheduler = opt["lr_scheduler"]["scheduler"]
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard()
        self.batches = host_batches(batch, device)

    def step(self, i: int) -> None:
        m, dev = self.module, self.device
        host = self.batches[i % len(self.batches)]
        if self.kind == "bare":
            x0 = host[0].to(dev, non_blocking=True)
            sigma = (torch.randn(self.batch, device=dev) * 1.2 - 1.2).exp()
            noise = torch.randn_like(x0)
            s = sigma.view(-1, 1, 1, 1)
            d = m.denoiser(x0 + s * noise, sigma)
            weight = (s**2 + 0.25) / (s * 0.5) ** 2  # EDM's lambda, sigma_data = 0.5
            loss = (weight * (d - x0) ** 2).mean()
            loss.backward()
        else:
            batch = tuple(t.to(dev, non_blocking=True) for t in host)
            per_sample, _ = m.batch_loss(batch)
            per_sample.mean().backward()
            self.guard.on_before_optimizer_step(not_logging(i), m, self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.kind != "bare":
            self.scheduler.step()
        ema_update(m.ema, m.denoiser, m.ema_schedule.beta(i, self.batch))


def time_side(side: Side, warmup: int, steps: int, clock: Callable[[], float]) -> tuple:
    """(host ms per step, wall ms per step) over ``steps`` steps after ``warmup``."""
    for i in range(warmup):
        side.step(i)
    sync(side.device)
    t0 = clock()
    for i in range(warmup, warmup + steps):
        side.step(i)
    t1 = clock()
    sync(side.device)
    t2 = clock()
    return (t1 - t0) / steps * 1e3, (t2 - t0) / steps * 1e3


def profile_counts(side: Side) -> dict[str, int]:
    """Random-number and all ATen operator calls of one step (after 3 warm-up steps)."""
    for i in range(3):
        side.step(i)
    sync(side.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        side.step(3)
        sync(side.device)
    names = [e.name for e in prof.events()]
    return {
        "rng_calls": sum(n in RNG_OPS for n in names),
        "aten_calls": sum(n.startswith("aten::") for n in names),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-batches", type=int, nargs="*", default=[64, 512])
    ap.add_argument("--no-augment", action="store_true", help="leave out the augment side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--label", default="", help="a name for the code measured (in the JSON)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: batch 32, 3 steps")
    ap.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.steps, args.warmup, args.rounds = 32, 3, 2, 1
        args.profile_batches = [8, 16]
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = torch.device(args.device).type == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter
    kinds = ["bare", "framework"] + ([] if args.no_augment else ["framework + augment"])
    sides = {k: Side(k, args.batch, args.device) for k in kinds}
    host: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k, side in sides.items():
            h, w = time_side(side, args.warmup, args.steps, clock)
            host[k].append(h)
            wall[k].append(w)
            print(f"round {r} {k}: host {h:.3f} ms/step, wall {w:.3f} ms/step", flush=True)
    counts = {
        k: {str(b): profile_counts(Side(k, b, args.device)) for b in args.profile_batches}
        for k in kinds
    }
    best = {k: min(v) for k, v in host.items()}
    best_wall = {k: min(v) for k, v in wall.items()}
    rows = []
    for k in kinds:
        rng = " / ".join(str(counts[k][str(b)]["rng_calls"]) for b in args.profile_batches)
        aten = " / ".join(str(counts[k][str(b)]["aten_calls"]) for b in args.profile_batches)
        extra = best[k] - best["bare"]
        rows.append((k, f"{best[k]:.3f}", f"{extra:+.3f}", f"{best_wall[k]:.3f}", rng, aten))
    at = "/".join(str(b) for b in args.profile_batches)
    header = (
        "step",
        f"host ms/step (batch {args.batch})",
        "extra vs bare",
        "wall ms/step",
        f"RNG op calls @ batch {at}",
        f"ATen op calls @ batch {at}",
    )
    payload = {
        "machine": machine(args.device),
        "label": args.label,
        "clock": "process" if on_cpu else "wall",
        "batch": args.batch,
        "shape": list(SHAPE),
        "steps": args.steps,
        "warmup": args.warmup,
        "host_ms": host,
        "wall_ms": wall,
        "best_host_ms": best,
        "best_wall_ms": best_wall,
        "extra_host_ms": {k: best[k] - best["bare"] for k in kinds},
        "median_host_ms": {k: statistics.median(v) for k, v in host.items()},
        "counts": counts,
    }
    write_results("host_overhead", args.out, payload, markdown_table(header, rows))


if __name__ == "__main__":
    main()
