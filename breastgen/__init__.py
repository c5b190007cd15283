"""breastgen: generative models for breast imaging, shipped as MONAI bundles."""

from .errors import BreastGenError, install_excepthook

__version__ = "0.1.0"

# configs do `"imports": ["$import breastgen"]`: from then on a user mistake ends a
# `python -m monai.bundle run ...` with one line instead of a traceback
install_excepthook()

from . import data, engines, io, metrics, networks, prompts, schedulers  # noqa: E402  (configs reach everything as breastgen.<module>.<name>)
