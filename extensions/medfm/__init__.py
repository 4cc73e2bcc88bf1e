"""medfm: published 3D medical-imaging foundation models as MONAI bundles."""

__version__ = "0.1.0"

from . import io, networks, samples, transforms, weights, workflows  # noqa: E402  (bundle configs use medfm.<sub>)
from .errors import report_bundle_errors_in_one_line  # noqa: E402
from .inference import embed, infer  # noqa: E402

report_bundle_errors_in_one_line()

__all__ = ["embed", "infer", "io", "networks", "samples", "transforms", "weights", "workflows", "__version__"]
