"""ledit-convert: turn pretrained DiTs into LEDiT models that generate at unseen resolutions."""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, LeditError, OutputExistsError
from .model import LEDiTTransformer2DModel

__all__ = [
    "__version__",
    "LEDiTTransformer2DModel",
    "LeditError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "OutputExistsError",
]
