"""ledit-convert: turn pretrained DiTs into LEDiT models that generate at unseen resolutions."""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, LeditError, OutputExistsError
from .models.dit import LEDiTTransformer2DModel
from .models.pixart import LEDiTPixArtTransformer2DModel

__all__ = [
    "__version__",
    "LEDiTTransformer2DModel",
    "LEDiTPixArtTransformer2DModel",
    "LeditError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "OutputExistsError",
]
