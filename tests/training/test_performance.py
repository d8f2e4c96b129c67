"""Precision, torch.compile fallback, channels_last, optimizer kernels and logging-step gating."""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from app.helpers import compose_train, fast_overrides, run_app
from diffusionlab.cli.train import build, train
from diffusionlab.errors import ConfigError
from diffusionlab.networks import MLP
from diffusionlab.training import performance
from diffusionlab.training.module import DiffusionModule
from diffusionlab.training.performance import (
    check_precision,
    compile_network,
    fast_optimizer_options,
)


def _params(device: str) -> list:
    return [SimpleNamespace(device=torch.device(device))]


def test_optimizer_kernel_choice():
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    assert fast_optimizer_options(adam, _params("cuda")) == {"fused": True}
    assert fast_optimizer_options(torch.optim.AdamW, _params("cpu")) == {"fused": True}
    # RMSprop has no fused kernel; mixed devices or no parameters: foreach
    assert fast_optimizer_options(torch.optim.RMSprop, _params("cuda")) == {"foreach": True}
    assert fast_optimizer_options(torch.optim.SGD, _params("cuda")) == {"fused": True}
    assert fast_optimizer_options(adam, _params("cpu") + _params("cuda")) == {"foreach": True}
    assert fast_optimizer_options(adam, []) == {"foreach": True}
    assert fast_optimizer_options(adam, _params("cuda"), allow_fused=False) == {"foreach": True}
    # optimizer.fused / optimizer.foreach set by the user win
    assert fast_optimizer_options(functools.partial(adam, foreach=False), _params("cuda")) == {}
    assert fast_optimizer_options(functools.partial(adam, fused=False), _params("cuda")) == {}


def test_module_optimizer_uses_fused_kernel_on_cpu(tmp_path):
    module, _ = build(compose_train(fast_overrides(tmp_path, callbacks=False), tmp_path))
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_float16_refused_on_cpu(precision):
    with pytest.raises(ConfigError, match=f"trainer.precision={precision}.*CUDA"):
        check_precision(precision, "cpu")
    check_precision("bf16-mixed", "cpu")
    check_precision("32-true", "cpu")
    check_precision(precision, "gpu")


def test_train_app_stops_on_float16_cpu(tmp_path):
    overrides = [*fast_overrides(tmp_path, callbacks=False), "trainer.precision=16-mixed"]
    overrides.append("trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed needs a CUDA GPU"):
        train(compose_train(overrides, tmp_path))


class ClipCheck(L.Callback):
    """Test-only: records the optimizer kind and the gradient norm after clipping."""

    seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        ClipCheck.seen.setdefault("norms", []).append(float(norm))
        ClipCheck.seen["fused"] = trainer.optimizers[0].defaults["fused"]


def test_bf16_mixed_trains_on_cpu(tmp_path):
    """bf16 autocast with gradient clipping trains on CPU with the fused Adam: the module clips
    itself (Lightning refuses to clip a fused optimizer under any autocast), to the same norm."""
    overrides = [*fast_overrides(tmp_path, callbacks=False), "trainer.precision=bf16-mixed"]
    overrides += [
        "trainer.gradient_clip_val=0.01",
        "+callbacks.clip={_target_:test_performance.ClipCheck}",
    ]
    ClipCheck.seen.clear()
    metrics = train(compose_train(overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["train/grad_norm"] > 0.01  # logged before clipping
    assert ClipCheck.seen["fused"] is True
    assert max(ClipCheck.seen["norms"]) == pytest.approx(0.01, rel=1e-4)


def _mlp() -> MLP:
    """A small MLP with every weight moved off its (partly zero) initialisation."""
    torch.manual_seed(0)
    net = MLP(in_dim=2, hidden_dim=16, num_blocks=2, emb_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C compiler\nsecond line")

        return call

    net = _mlp()
    x, c_noise = torch.randn(4, 2), torch.randn(4)
    expected = net(x, c_noise)
    monkeypatch.setattr(performance.torch, "compile", broken)
    compile_network(net)
    with caplog.at_level(logging.WARNING):
        out = net(x, c_noise)
        net(x, c_noise)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("compile=true")
    assert "RuntimeError: no C compiler" in warnings[0] and "second line" not in warnings[0]
    assert set(net.state_dict()) == set(_mlp().state_dict())


def test_compile_routes_through_torch_compile(monkeypatch):
    seen = []

    def spy(fn, **kwargs):
        seen.append(kwargs)
        return lambda *a, **k: fn(*a, **k) * 0

    net = _mlp()
    x, c_noise = torch.randn(3, 2), torch.randn(3)
    assert net(x, c_noise).abs().sum() > 0
    monkeypatch.setattr(performance.torch, "compile", spy)
    compile_network(net, mode="max-autotune")
    assert seen == [{"mode": "max-autotune"}]
    assert net(x, c_noise).abs().sum() == 0  # the network now runs what torch.compile returned


def test_compile_key_compiles_the_training_network_at_fit_start(tmp_path, monkeypatch):
    compiled = []

    def spy(fn, **kwargs):
        compiled.append(fn.__self__)
        return fn

    monkeypatch.setattr(performance.torch, "compile", spy)
    overrides = [*fast_overrides(tmp_path, callbacks=False), "compile=true"]
    metrics = train(compose_train(overrides, tmp_path))
    assert [type(net).__name__ for net in compiled] == ["SongUNet"]
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_channels_last_same_denoiser_output(tmp_path):
    base = fast_overrides(tmp_path, callbacks=False)
    torch.manual_seed(0)
    plain, _ = build(compose_train(base, tmp_path))
    torch.manual_seed(0)
    nhwc, _ = build(compose_train([*base, "channels_last=true"], tmp_path))
    convs = [p for p in nhwc.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not any(p.is_contiguous() for p in convs)
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(
            nhwc.denoiser(x, sigma), plain.denoiser(x, sigma), rtol=1e-5, atol=1e-5
        )


def test_diagnostics_only_on_logging_steps(tmp_path, monkeypatch):
    """Sigma buckets and the gradient norm run on steps 3, 6 of 7 and on the last step."""
    calls = []
    real = DiffusionModule._log_buckets

    def counted(self, per_sample, sigma):
        calls.append(self.global_step)
        real(self, per_sample, sigma)

    monkeypatch.setattr(DiffusionModule, "_log_buckets", counted)
    overrides = [*fast_overrides(tmp_path, callbacks=False), "trainer.max_steps=7"]
    overrides.append("trainer.log_every_n_steps=3")
    train(compose_train(overrides, tmp_path))
    assert calls == [2, 5, 6]
    with open(Path(tmp_path) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    norms = [r["train/grad_norm"] for r in rows if r.get("train/grad_norm")]
    assert len(norms) == 2 and all(float(n) > 0 for n in norms)


def test_doc_command_bf16_channels_last(tmp_path):
    """docs/performance.md: python train.py trainer.precision=bf16-mixed channels_last=true"""
    args = ["trainer.precision=bf16-mixed", "channels_last=true", *fast_overrides(tmp_path)]
    proc = run_app("train.py", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(Path(tmp_path).rglob("metrics.csv"))


def test_doc_command_float16_on_cpu_stops_with_one_message(tmp_path):
    """docs/performance.md: 16-mixed on a CPU-only machine stops before training."""
    args = [*fast_overrides(tmp_path), "trainer.precision=16-mixed", "trainer.accelerator=cpu"]
    proc = run_app("train.py", args)
    assert proc.returncode != 0
    assert "error: trainer.precision=16-mixed needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_doc_command_compile(tmp_path):
    """docs/performance.md: python train.py compile=true (the real compiler; minutes on CPU)."""
    proc = run_app("train.py", [*fast_overrides(tmp_path), "compile=true"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "running it eagerly" not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_doc_command_checkpointing_large_preset(tmp_path):
    """docs/performance.md: python train.py model=unet_ddpmpp model.checkpointing=true"""
    args = [*fast_overrides(tmp_path), "model=unet_ddpmpp", "model.checkpointing=true"]
    proc = run_app("train.py", [*args, "data.batch_size=2", "trainer.max_steps=1"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
