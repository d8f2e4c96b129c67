"""Ships the checkout's ``conf/`` inside the package as ``diffusionlab/conf`` (every app finds its
configs in an installed wheel); everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

CONF = Path(__file__).parent / "conf"
conf_packages = [
    "diffusionlab.conf" + "".join("." + part for part in d.relative_to(CONF).parts)
    for d in sorted([CONF, *(p for p in CONF.rglob("*") if p.is_dir())])
]
setup(
    packages=[*find_packages("src"), *conf_packages],
    package_dir={"": "src", **{p: "/".join(["conf", *p.split(".")[2:]]) for p in conf_packages}},
    package_data={p: ["*.yaml"] for p in conf_packages},
)
