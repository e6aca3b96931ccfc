"""Single-device model code: DRIP vision transformers and the model-config registry."""
from .boundary import BoundaryPredictor, boundary_rate_loss, expected_segments
from .drip import POOL_TYPES, DripVisionTransformer, capture_boundaries, drip_aux, drip_trunks, pinned_segments
from .registry import (
    CONFIG_DIR,
    create_model,
    get_drip_cfg,
    get_model_config,
    list_models,
    register_config,
    register_model_configs,
    register_model_file,
)

__all__ = [
    "CONFIG_DIR",
    "POOL_TYPES",
    "BoundaryPredictor",
    "DripVisionTransformer",
    "boundary_rate_loss",
    "capture_boundaries",
    "create_model",
    "drip_aux",
    "drip_trunks",
    "expected_segments",
    "get_drip_cfg",
    "get_model_config",
    "list_models",
    "pinned_segments",
    "register_config",
    "register_model_configs",
    "register_model_file",
]
