"""llmlab: build a decoder-only LLM step by step, with the infrastructure lens.

The course in ``course/`` teaches each module; the package is what the
notebooks import, extend and finally run as a text generator.
"""

from llmlab import calc
from llmlab.config import ModelConfig, get_config
from llmlab.model import Transformer
from llmlab.notebook import check, check_function, figures_dir, save_figure, show
from llmlab.runtime import device, environment_report, fast_mode, pick, seed_everything, triton_available

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ModelConfig",
    "Transformer",
    "calc",
    "get_config",
    "check",
    "check_function",
    "device",
    "environment_report",
    "fast_mode",
    "figures_dir",
    "pick",
    "save_figure",
    "seed_everything",
    "show",
    "triton_available",
]
