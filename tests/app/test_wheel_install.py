"""A non-editable install runs the apps: the wheel built from this checkout ships conf/ inside the
package, and train / sample run from it in a folder that is not the checkout (their logs/ there).

The wheel goes into a fresh venv; by default its dependencies are those of the test
environment (a ``.pth`` file in the venv names their folder: nothing is downloaded again), with
``DL_WHEEL_VENV=1`` they are installed from the package index (a machine with network)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from diffusionlab.cli.vocabulary import APPS

from .helpers import ROOT

IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info")
CHECK = """
import sys
from pathlib import Path
import diffusionlab
from diffusionlab.config import CONF_DIR, project_root
from hydra import compose, initialize_config_dir
pkg = Path(diffusionlab.__file__).parent
assert Path(CONF_DIR) == pkg / "conf", (CONF_DIR, pkg)
assert project_root() == Path.cwd(), project_root()
for name in sys.argv[1:]:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        compose(config_name=name)
print("composed", len(sys.argv) - 1, "apps from", CONF_DIR)
"""


def _install(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """The wheel of this checkout, installed; the python to run and its environment."""
    dist, src = tmp_path / "dist", tmp_path / "src"  # built from a copy: no build/ in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "src", "conf"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": IGNORE} if copy is shutil.copytree else {}))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("diffusionlab-*.whl")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFUSIONLAB_ROOT")}
    env |= {"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    deps = os.environ.get("DL_WHEEL_VENV") == "1"
    if not deps:  # the test environment's packages, behind the venv's own
        (purelib,) = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        ours = [p for p in sys.path if p.endswith("site-packages")]
        Path(purelib, "test-environment.pth").write_text("\n".join(ours) + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", *([] if deps else ["--no-deps"]), str(wheel)],
        check=True,
        capture_output=True,
    )
    return python, env


def test_apps_run_from_an_installed_wheel(tmp_path):
    python, env = _install(tmp_path)
    work = tmp_path / "work"
    work.mkdir()

    def run_in(*cmd: str) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        return res

    def run(*args: str) -> subprocess.CompletedProcess:
        return run_in(python, *args)

    # every Hydra app (dl-train-extractor reads key=value itself)
    apps = sorted({a for a in APPS.values() if (ROOT / "conf" / f"{a}.yaml").is_file()})
    assert len(apps) == 14
    assert f"composed {len(apps)} apps" in run("-c", CHECK, *apps).stdout
    tiny = ["dataset=digits", "model=unet_tiny", "data.batch_size=8", "trainer.max_steps=2"]
    tiny += ["logger=csv", "sampler.nfe=2", "~callbacks.rich_progress_bar"]
    tiny += ["callbacks.sample_grid.num_samples=4", "trainer.enable_model_summary=false"]
    bin_dir = Path(python).parent  # the console scripts the wheel installed
    run_script = lambda name, *a: run_in(str(bin_dir / name), *a)  # noqa: E731
    run_script("dl-train", *tiny, "hydra.run.dir=logs/train/runs/wheel")
    ckpt = work / "logs" / "train" / "runs" / "wheel" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    run_script("dl-sample", f"ckpt={ckpt}", "num_samples=2", "outdir=out")
    assert sorted(p.name for p in (work / "out").iterdir()) == [
        "000000.png",
        "000001.png",
        "grid.png",
        "sampling.json",
    ]
