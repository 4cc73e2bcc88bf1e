"""The two names MONAI Label imports from ``torchvision.utils``; both fail loudly when called."""


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("torchvision is not installed in this test environment (stand-in module); "
                       "install torchvision to use MONAI Label's image-grid visualisations")


make_grid = _unavailable
save_image = _unavailable
