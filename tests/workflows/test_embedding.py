"""EmbeddingRunner pieces that the end-to-end tests in tests/test_embed.py cannot see."""

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from medfm.errors import MedfmError
from medfm.workflows import EmbeddingRunner, MethodInferer
from medfm.workflows.cohort import window_count


def _runner(tmp_path, **kwargs):
    return EmbeddingRunner(inputs=[], preprocessing=lambda d: d, network=torch.nn.Identity(), output_dir=tmp_path,
                           device="cpu", **kwargs)


@pytest.mark.parametrize("shape", [(32, 32, 16), (40, 20, 4), (100, 70, 33)])
def test_window_count_is_what_monai_runs(shape):
    window = SlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=1, overlap=0.25)
    calls = []
    window(torch.zeros(1, 1, *shape), lambda x: calls.append(1) or x)
    assert window_count(shape, window) == len(calls)


def test_big_sliding_window_scans_get_a_per_window_bar(tmp_path):
    window = SlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=2, overlap=0.25)
    runner = _runner(tmp_path, inferer=MethodInferer(window, "forward"))
    runner._window_progress(torch.zeros(1, 1, 32, 32, 16))  # 3 x 3 x 3 windows: 13 batches
    assert window.progress is False
    runner._window_progress(torch.zeros(1, 1, 128, 128, 64))  # 11 x 11 x 11 windows
    assert window.progress is True
    _runner(tmp_path, inferer=MethodInferer(window, "forward"), progress=False)._window_progress(torch.zeros(1, 1, 128, 128, 64))
    assert window.progress is False


@pytest.mark.parametrize("index, message", [("emb.txt", "must be a file name"), ("../emb.csv", "must be a file name")])
def test_index_names_are_plain_csv_or_parquet_names(tmp_path, index, message):
    with pytest.raises(MedfmError, match=message):
        _runner(tmp_path, inferer=SlidingWindowInferer(8), index_file=index)


def test_mixed_precision_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(MedfmError, match="--amp True needs a CUDA device"):
        _runner(tmp_path, inferer=SlidingWindowInferer(8), amp=True)
