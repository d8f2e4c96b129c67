"""NVlabs' samplers (their code, their ``StackedRandomGenerator``) against ours on one device, for
float32 and ``use_fp16`` networks (32x32, perturbed random weights, seeds 0-63).

    python tests/interop/gpu_parity.py edm|edm2 <checkout> <scratch dir> [cuda|cpu]

prints, per network and sampler, ``SELF``: their images at batch 16 against theirs at batch 64 (the
rounding noise of their own generator on this device) and ``RESULT``: ours against theirs at batch
64, as "max <levels> share <fraction of uint8 values that differ>". ``TF32=0`` turns TF32 off for
convolutions and matrix products on both sides. Run by ``test_nvlabs_parity.py`` on a GPU.
"""

from __future__ import annotations

import os
import pickle
import sys

import torch

WHICH, ROOT, TMP = sys.argv[1], sys.argv[2], sys.argv[3]
DEV = torch.device(sys.argv[4] if len(sys.argv) > 4 else "cuda")
if os.environ.get("TF32") == "0":
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
SEEDS = list(range(int(os.environ.get("NSEEDS", 64))))
RES = int(os.environ.get("RES", 32))
CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
sys.path.insert(0, ROOT)


def perturb(net, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False).to(DEV)


def uint8(x):
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()


def stats(a, b) -> str:
    d = (a.int() - b.int()).abs()
    return f"max {d.max().item()} share {(d > 0).float().mean().item():.3e}"


nets, guide = {}, None
if WHICH == "edm":
    import generate as G
    from training.networks import EDMPrecond, VPPrecond

    kw = dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16])
    song = dict(model_type="SongUNet", dropout=0, **kw)
    builders = {
        "edm_ddpmpp_cond_fp32": lambda: EDMPrecond(RES, 3, label_dim=10, augment_dim=9, **song),
        "edm_ddpmpp_cond_fp16": lambda: EDMPrecond(RES, 3, label_dim=10, use_fp16=True, **song),
        "vp_ddpmpp_fp32": lambda: VPPrecond(RES, 3, **song),
        "edm_adm_cond_fp16": lambda: EDMPrecond(
            RES, 3, label_dim=10, model_type="DhariwalUNet", use_fp16=True, dropout=0, **kw
        ),
    }
    for name, build in builders.items():
        torch.manual_seed(0)
        nets[name] = perturb(build(), 2, 0.05)
    runs = [(n, c) for n in nets for c in ("heun", "churn")]

    def theirs(net, case, seeds):
        rnd = G.StackedRandomGenerator(DEV, seeds)
        lat = rnd.randn([len(seeds), 3, RES, RES], device=DEV)
        lab = None
        if net.label_dim:
            lab = torch.eye(10, device=DEV)[rnd.randint(10, size=[len(seeds)], device=DEV)]
        kw = CHURN if case == "churn" else {}
        return uint8(G.edm_sampler(net, lat, lab, randn_like=rnd.randn_like, **kw))

else:
    import generate_images as G
    from training.networks_edm2 import Precond

    kw = dict(channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[16, 8], channels_per_head=32)
    for fp16 in (False, True):
        torch.manual_seed(0)
        net = Precond(RES, 3, 10, use_fp16=fp16, model_channels=64, **kw)
        nets[f"edm2_fp{16 if fp16 else 32}"] = perturb(net, 2, 0.3)
    torch.manual_seed(1)
    guide = perturb(Precond(RES, 3, 10, use_fp16=True, model_channels=32, **kw), 3, 0.3)
    with open(f"{TMP}/guide-0000512-0.050.pkl", "wb") as f:
        pickle.dump(dict(ema=guide), f)
    runs = [(n, c) for n in nets for c in ("heun", "autoguided", "churn")]

    def theirs(net, case, seeds):
        rnd = G.StackedRandomGenerator(DEV, seeds)
        noise = rnd.randn([len(seeds), 3, RES, RES], device=DEV)
        lab = torch.eye(10, device=DEV)[rnd.randint(10, size=[len(seeds)], device=DEV)]
        kw = {"churn": CHURN, "autoguided": dict(guidance=2.0)}.get(case, {})
        x = G.edm_sampler(net, noise, lab, gnet=guide, randn_like=rnd.randn_like, **kw)
        return uint8(x)


refs = {}
for name, case in runs:
    with open(f"{TMP}/{name}.pkl", "wb") as f:
        pickle.dump(dict(ema=nets[name]), f)
    refs[name, case] = theirs(nets[name], case, SEEDS)
    split = torch.cat(
        [theirs(nets[name], case, SEEDS[i : i + 16]) for i in range(0, len(SEEDS), 16)]
    )
    print(f"SELF {name} {case} {stats(split, refs[name, case])}", flush=True)

for mod in [m for m in sys.modules if m.split(".")[0] in ("training", "torch_utils", "dnnlib")]:
    del sys.modules[mod]
sys.path.remove(ROOT)
from diffusionlab.evaluation.images import to_uint8_rgb  # noqa: E402
from diffusionlab.sampling.checkpoint import load_guide, load_module  # noqa: E402
from diffusionlab.sampling.generator import DiffusionGenerator  # noqa: E402

for name, case in runs:
    module = load_module(f"{TMP}/{name}.pkl", DEV)
    nfe = 35 if WHICH == "edm" else 63
    smp, gd, w = {"name": "heun", "nfe": nfe}, None, 1.0
    if case == "churn":
        opts = dict(S_churn=40, S_tmin=0.05, S_tmax=50, S_noise=1.003)
        smp = {"name": "edm", "nfe": nfe, "options": {**opts, "noise_every_step": WHICH == "edm"}}
    if case == "autoguided":
        gd, w = load_guide(f"{TMP}/guide-0000512-0.050.pkl", module), 2.0
    ours = to_uint8_rgb(
        DiffusionGenerator.from_module(module, smp, w, True, gd).generate(SEEDS)
    ).cpu()
    print(f"RESULT {name} {case} {stats(ours, refs[name, case])}", flush=True)
