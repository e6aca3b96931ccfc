"""dtp_ds: CLIP pretraining with DRIP (dynamic-token-pooling) vision encoders under DeepSpeed.

``import dtp_ds`` registers every dtp_ds model config with open_clip, so
``open_clip.create_model("DRIP-ViT-B-32-10x")`` works after it.
"""
from .models import create_model, list_models, register_model_configs

__version__ = "0.1.0"

register_model_configs()

__all__ = ["__version__", "create_model", "list_models"]
