"""damvla: DAM-VLA, a routed dual-head diffusion vision-language-action policy."""

from damvla.config import ABLATIONS, PRESETS, PolicyConfig, preset

__version__ = "0.1.0"
__all__ = ["ABLATIONS", "PRESETS", "PolicyConfig", "preset", "__version__"]
