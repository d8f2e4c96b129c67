"""Feature extractors registered with torch-fidelity: InceptionV3 from a local file, the domain
classifier trained on an embedded dataset (fully offline FID / KID / precision-recall), and
DINOv2 from a local file for FD-DINOv2 (Stein et al. 2023; reported by EDM2 beside FID)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from diffusionlab.errors import ConfigError
from diffusionlab.files import file_sha256
from diffusionlab.networks.dinov2 import load_dinov2
from diffusionlab.networks.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DomainClassifier,
    adapt_images,
)

INCEPTION = "inception-v3-compat"
DOMAIN_PREFIX = "dl-domain-"
# v2: trained with outlier exposure (train_extractor.py), confident only on digits
DOMAIN_VERSION = "v2"
DINOV2_PREFIX = "dl-dinov2-"
DINOV2_LAYER = "dinov2"
# the preprocessing (EDM2's resize_mode='torch'), part of the cache name of reference features
DINOV2_VERSION = "edm2"


def uint8_to_unit(x: Tensor, channels: int, resolution: int) -> Tensor:
    """uint8 NCHW (1 or 3 channels) -> float in [-1, 1] with ``channels`` and ``resolution``."""
    return adapt_images(x.float() / 127.5 - 1.0, channels, resolution)


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity wrapper of a trained :class:`DomainClassifier` read from
    ``feature_extractor_weights_path`` (written by ``scripts/train_feature_extractor.py``).

    Features: ``features`` (128-d, for FID / KID / PR), ``logits_unbiased`` and ``logits`` (IS).
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path=None, **kwargs
    ):
        super().__init__(name, features_list)
        if (
            feature_extractor_weights_path is None
            or not Path(feature_extractor_weights_path).is_file()
        ):
            raise ConfigError(
                f"domain feature extractor weights {feature_extractor_weights_path!r} not found; "
                "train them with scripts/train_feature_extractor.py"
            )
        try:
            ckpt = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(
                f"domain feature extractor weights {feature_extractor_weights_path!r} are "
                f"unreadable ({type(e).__name__}); delete the file to retrain them"
            ) from None
        self.resolution = int(ckpt["resolution"])
        self.net = DomainClassifier(**ckpt["config"])
        self.net.load_state_dict(ckpt["state_dict"])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        x = uint8_to_unit(x, self.net.config["in_channels"], self.resolution)
        h, logits = self.net(x)
        out = {"features": h, "logits_unbiased": logits - self.net.head.bias, "logits": logits}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("features", "logits_unbiased", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "logits_unbiased" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


class DINOv2FeatureExtractor(FeatureExtractorDinoV2):
    """FD-DINOv2's extractor as EDM2 defines it (``calculate_metrics.py`` DINOv2Detector, modeled
    after dgm-eval, Stein et al. 2023): uint8 RGB resized to 224 px (bicubic, antialiased: EDM2's
    ``resize_mode='torch'``), scaled to [0, 1], ImageNet-normalised, and the network's normalised
    class token as the feature ``dinov2``. The network is read from
    ``feature_extractor_weights_path``, an official DINOv2 file (networks/dinov2.py), instead of
    fetched through torch.hub. torch-fidelity's own DINOv2 extractor resizes bilinearly (TF1
    style) and gives other numbers; EDM2's tables are the ones users compare with."""

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path=None, **kwargs
    ):
        FeatureExtractorBase.__init__(self, name, features_list)
        self.feature_extractor_internal_dtype = torch.float32
        self.model = load_dinov2(feature_extractor_weights_path, "eval.dinov2_weights")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {x.dtype} {tuple(x.shape)}")
        size = (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE)
        x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True)
        x = (x / 255 - self.mean) / self.std
        features = {"dinov2": self.model(x).float()}
        return tuple(features[f] for f in self.features_list)

    @staticmethod
    def can_be_compiled() -> bool:
        return False


def dinov2_name(weights: str | Path) -> str:
    """Registry name of the DINOv2 extractor of a weights file: its stem and content hash, so
    reference features are cached per file
    (``dl-dinov2-edm2-dinov2_vitl14_pretrain-1a2b3c4d``)."""
    if weights is None or not Path(weights).expanduser().is_file():
        load_dinov2(weights, "eval.dinov2_weights")  # the one message naming key and file
    path = Path(weights).expanduser()
    return f"{DINOV2_PREFIX}{DINOV2_VERSION}-{path.stem}-{file_sha256(path)[:8]}"


class CombinedExtractor(FeatureExtractorBase):
    """Several extractors run on the same images; the features of all of them (their layer names
    must differ), e.g. the FID extractor's and DINOv2's for FD-DINOv2 in one sampling pass."""

    def __init__(self, extractors: list[FeatureExtractorBase]) -> None:
        names = [f for e in extractors for f in e.features_list]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names clash: {names}")
        object.__setattr__(self, "_provided", tuple(names))  # read by the base's __init__
        super().__init__("+".join(e.get_name() for e in extractors), names)
        self.parts = torch.nn.ModuleList(extractors)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(f for e in self.parts for f in e(x))

    def get_provided_features_list(self) -> tuple[str, ...]:
        return self._provided

    @staticmethod
    def can_be_compiled() -> bool:
        return False


def domain_name(dataset: str, resolution: int) -> str:
    """Registry name of the domain extractor for ``dataset`` at ``resolution`` (``DOMAIN_VERSION``
    names the training recipe, so features cached by an older classifier are not reused)."""
    return f"{DOMAIN_PREFIX}{dataset}-{resolution}-{DOMAIN_VERSION}"


def domain_weights_path(cache_dir: str | Path, dataset: str, resolution: int) -> Path:
    """Where the trained domain classifier for (dataset, resolution) lives in the cache."""
    return Path(cache_dir) / "extractors" / f"{dataset}-{resolution}-{DOMAIN_VERSION}.pt"


def default_layers(name: str) -> dict[str, str]:
    """Feature layer per metric (``fid``, ``kid``, ``prc``, ``isc``) of a registered extractor."""
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "kid", "prc", "isc")}


def create_extractor(
    name: str, weights: str | Path | None, device: torch.device | str = "cpu"
) -> FeatureExtractorBase:
    """An eval-mode extractor computing every layer any metric needs.

    ``name`` is ``inception-v3-compat`` (``weights`` = local InceptionV3 file), a domain
    extractor name from :func:`domain_name` (``weights`` = its cache file) or a DINOv2 name from
    :func:`dinov2_name` (``weights`` = the DINOv2 file).
    """
    if name == INCEPTION:
        weights = _inception_weights(weights)
    elif name.startswith(DOMAIN_PREFIX) or name.startswith(DINOV2_PREFIX):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            kind = (
                DomainFeatureExtractor if name.startswith(DOMAIN_PREFIX) else DINOv2FeatureExtractor
            )
            register_feature_extractor(name, kind)
    else:
        raise ConfigError(f"eval.extractor={name!r}: use 'inception' or 'domain'")
    layers = sorted(set(default_layers(name).values()))
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    extractor = cls(name, layers, feature_extractor_weights_path=str(weights), verbose=False)
    return extractor.requires_grad_(False).eval().to(device)


def _inception_weights(path: str | Path | None) -> Path:
    """The local InceptionV3 file; when missing, one try to download it, else one clear message."""
    if path is None:
        raise ConfigError(
            f"eval.inception_weights is not set: download {URL_INCEPTION_V3} and pass its path "
            "as eval.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth"
        )
    path = Path(path).expanduser()
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), progress=False)
    except Exception as e:  # no network: any failure means the user must fetch the file
        raise ConfigError(
            f"eval.inception_weights={str(path)!r} does not exist and it could not be downloaded "
            f"({type(e).__name__}). Fetch {URL_INCEPTION_V3} on a machine with internet and put it "
            f"at {path}"
        ) from None
    return path
