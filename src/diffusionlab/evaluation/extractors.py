"""Feature extractors registered with torch-fidelity: InceptionV3 from a local file, and the
domain classifier trained on an embedded dataset (fully offline FID / KID / precision-recall)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from diffusionlab.errors import ConfigError

INCEPTION = "inception-v3-compat"
DOMAIN_PREFIX = "dl-domain-"
# v2: trained with outlier exposure (train_extractor.py), confident only on digits
DOMAIN_VERSION = "v2"


class DomainClassifier(nn.Module):
    """A small CNN for grey digits: three conv stages, global pooling, a 128-d feature layer."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dim: int = 128
    ):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "dim": dim,
        }
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * w, dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` float NCHW in [-1, 1] -> (features [B, dim], logits [B, num_classes])."""
        h = self.body(x)
        return h, self.head(h)


def uint8_to_unit(x: Tensor, channels: int, resolution: int) -> Tensor:
    """uint8 NCHW (1 or 3 channels) -> float in [-1, 1] with ``channels`` and ``resolution``."""
    x = x.float() / 127.5 - 1.0
    if x.shape[1] == 3 and channels == 1:
        x = x.mean(1, keepdim=True)
    elif x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != resolution:
        mode = "area" if x.shape[-1] > resolution else "bilinear"
        x = F.interpolate(x, size=(resolution, resolution), mode=mode)
    return x


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

    ``name`` is ``inception-v3-compat`` (``weights`` = local InceptionV3 file) or a domain
    extractor name from :func:`domain_name` (``weights`` = its cache file).
    """
    if name == INCEPTION:
        weights = _inception_weights(weights)
    elif name.startswith(DOMAIN_PREFIX):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, DomainFeatureExtractor)
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
