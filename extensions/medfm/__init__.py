"""medfm: published 3D medical-imaging foundation models as MONAI bundles."""

__version__ = "0.1.0"

from ._lazy import lazy_attributes  # noqa: E402
from .errors import report_bundle_errors_in_one_line  # noqa: E402

# bundle configs use medfm.<sub>.<name>; each submodule loads on first use
__getattr__, __dir__ = lazy_attributes(__name__, ("bundles", "engines", "io", "networks", "samples", "transforms", "weights", "workflows"),
                                       {"embed": ".inference", "infer": ".inference", "load": ".model", "Model": ".model"})

__all__ = ["Model", "bundles", "embed", "engines", "infer", "io", "load", "networks", "samples", "transforms", "weights", "workflows", "__version__"]

report_bundle_errors_in_one_line()
