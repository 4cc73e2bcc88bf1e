import pytest
import torch

from medfm.errors import MedfmError
from medfm.workflows import autocast_kwargs, mixed_precision


def test_mixed_precision_is_refused_on_the_cpu_in_one_line():
    with pytest.raises(MedfmError, match=r"--amp True needs a CUDA device; this run is on cpu"):
        mixed_precision(True, torch.device("cpu"))
    assert mixed_precision(False, "cpu") is False


def test_autocast_uses_bfloat16_only_where_the_gpu_has_it():
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    assert autocast_kwargs("cuda:0") == {"dtype": expected}
    assert autocast_kwargs("cpu") == {"dtype": torch.float16}
