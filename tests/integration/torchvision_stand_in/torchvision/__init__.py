"""Stand-in for torchvision in the MONAI Label test environment (PyPI has no CPU build of it).

MONAI Label imports ``torchvision.utils`` when it starts, for image grids that only its DeepEdit
and pathology visualisations draw. Nothing medfm serves calls it; a call fails loudly.
Real installations use the real torchvision.
"""
