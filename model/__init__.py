"""petvit's model library: our ViT, torchvision weight conversion, attention rollout and safe artifacts.

Usable without the service: nothing here imports `app`.
"""

from model.artifact import ArtifactError, ArtifactMetadata, Preprocessing, load_artifact, read_metadata, save_artifact
from model.config import VARIANTS, ViTConfig, get_config
from model.convert.pretrained import PretrainedWeightsUnavailable, from_torchvision, load_pretrained
from model.rollout import attention_rollout, gradient_rollout, upsample_heatmap
from model.vit import ViT

__all__ = [
    "VARIANTS",
    "ArtifactError",
    "ArtifactMetadata",
    "Preprocessing",
    "PretrainedWeightsUnavailable",
    "ViT",
    "ViTConfig",
    "attention_rollout",
    "from_torchvision",
    "get_config",
    "gradient_rollout",
    "load_artifact",
    "load_pretrained",
    "read_metadata",
    "save_artifact",
    "upsample_heatmap",
]
