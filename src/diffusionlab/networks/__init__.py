"""diffusionlab.networks: the raw networks ``F(x, c_noise, class_labels, augment_labels)``."""

from diffusionlab.networks.autoencoder import AutoencoderKL
from diffusionlab.networks.dit import DiT
from diffusionlab.networks.mlp import MLP
from diffusionlab.networks.unet_adm import DhariwalUNet
from diffusionlab.networks.unet_edm2 import EDM2UNet
from diffusionlab.networks.unet_song import SongUNet

__all__ = ["MLP", "AutoencoderKL", "DhariwalUNet", "DiT", "EDM2UNet", "SongUNet"]
