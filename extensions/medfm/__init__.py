"""medfm: published 3D medical-imaging foundation models as MONAI bundles."""

__version__ = "0.1.0"
