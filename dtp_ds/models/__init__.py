"""Single-device model code: the shared ViT trunk, its token reducers and the model-config registry."""
from .boundary import BoundaryPredictor, boundary_rate_loss, expected_segments
from .protocol import ForwardState, TowerOutput
from .reducers import REDUCERS, TokenReducer, make_reducer, pinned_tokens, reducers_of, register_reducer
from .reducers.drip import capture_boundaries
from .registry import (
    CONFIG_DIR,
    create_model,
    get_model_config,
    get_reducer_cfg,
    list_models,
    register_config,
    register_model_configs,
    register_model_file,
    vision_tower,
)
from .vit import POOL_TYPES, VisionTransformer, record_forward, trunks

__all__ = [
    "CONFIG_DIR",
    "POOL_TYPES",
    "REDUCERS",
    "BoundaryPredictor",
    "ForwardState",
    "TokenReducer",
    "TowerOutput",
    "VisionTransformer",
    "boundary_rate_loss",
    "capture_boundaries",
    "create_model",
    "expected_segments",
    "get_model_config",
    "get_reducer_cfg",
    "list_models",
    "make_reducer",
    "pinned_tokens",
    "record_forward",
    "reducers_of",
    "register_config",
    "register_model_configs",
    "register_model_file",
    "register_reducer",
    "trunks",
    "vision_tower",
]
