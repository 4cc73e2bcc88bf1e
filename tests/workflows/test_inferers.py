import os

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer, SlidingWindowInferer

from medfm.networks import GenesisUNet3D
from medfm.workflows import MethodInferer


def test_sliding_windows_stitch_every_named_output_at_its_scale():
    net = GenesisUNet3D(norm="batch").eval()
    inferer = MethodInferer(SlidingWindowInferer(roi_size=(32, 32, 16), sw_batch_size=2, overlap=0.25), "forward_with_bottleneck")
    x = torch.rand(1, 1, 48, 40, 24)
    with torch.no_grad():
        out = inferer(x, net)
    assert list(out) == ["restored", "bottleneck"]
    assert out["restored"].shape == (1, 1, 48, 40, 24)
    assert out["bottleneck"].shape == (1, 512, 6, 5, 3)


def test_single_window_equals_a_direct_call_and_ddp_wrapper_is_unwrapped():
    net = GenesisUNet3D(norm="batch").eval()
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        direct = net.forward_with_bottleneck(x)
        windowed = MethodInferer(SlidingWindowInferer(roi_size=(32, 32, 16)), "forward_with_bottleneck")(x, net)
        wrapped = MethodInferer(SimpleInferer(), "forward_with_bottleneck")(x, torch.nn.DataParallel(net))
    for key in direct:
        torch.testing.assert_close(windowed[key], direct[key])
        torch.testing.assert_close(wrapped[key], direct[key])


def test_unknown_method_is_reported():
    with pytest.raises(AttributeError, match="GenesisUNet3D has no method .forward_tokens."):
        MethodInferer(SimpleInferer(), "forward_tokens")(torch.rand(1, 1, 8, 8, 8), GenesisUNet3D())


def test_feature_tap_inferer_returns_pooled_features_beside_the_output_and_removes_its_hooks():
    from medfm.networks import vdt_resnet18
    from medfm.workflows import FeatureTapInferer

    network = vdt_resnet18(num_classes=3).eval()
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        outputs = FeatureTapInferer(taps={"embedding": "avgpool"}, output_key="logits")(x, network)
        reference = network(x)
    assert set(outputs) == {"logits", "embedding"} and outputs["embedding"].shape == (2, 512)
    torch.testing.assert_close(outputs["logits"], reference)
    torch.testing.assert_close(network.fc(outputs["embedding"]), reference)  # the tapped vector feeds the head
    assert not network.avgpool._forward_hooks
    assert set(FeatureTapInferer(taps={"embedding": "avgpool"}, output_key=None)(x, network)) == {"embedding"}


def test_tiled_embedding_is_the_voxel_weighted_mean_of_its_tiles_and_whole_when_it_fits():
    from medfm.workflows import TiledEmbeddingInferer

    tiles = []

    def mean_intensity(x, network):
        tiles.append(tuple(x.shape[2:]))
        return {"embedding": x.mean(dim=(2, 3, 4)), "other": x.sum()}

    volume = torch.rand(1, 2, 50, 33, 20)
    tiled = TiledEmbeddingInferer(mean_intensity, max_size=(20, 20, 20), output_key="embedding")
    result = tiled(volume, None)
    assert set(result) == {"embedding"} and len(tiles) == 3 * 2 * 1
    assert max(t[0] for t in tiles) <= 20 and max(t[1] for t in tiles) <= 20 and {t[2] for t in tiles} == {20}
    assert sum(a * b * c for a, b, c in tiles) == 50 * 33 * 20  # the tiles cover the volume once
    torch.testing.assert_close(result["embedding"], volume.mean(dim=(2, 3, 4)))  # exact for a linear pooling
    tiles.clear()
    small = torch.rand(1, 2, 20, 10, 5)
    assert set(tiled(small, None)) == {"embedding", "other"} and tiles == [(20, 10, 5)]


@pytest.mark.parametrize("shape, cells", [((48, 48, 8), (6, 6, 2)), ((20, 64, 3), (4, 8, 2)), ((64, 64, 12), (8, 8, 2))])
def test_inputs_smaller_than_the_window_keep_the_low_resolution_cells_that_cover_them(shape, cells):
    """MONAI's own pad-then-crop rounds the 1/8-resolution bottleneck of a scan of 8 or fewer slices to an empty map
    (whose average is NaN); every bottleneck cell that overlaps the scan is kept (a 48x48x8 scan padded by 8, 8 and
    12 voxels before it overlaps cells 1-6, 1-6 and 1-2), and the full-resolution output stays exactly MONAI's."""
    torch.manual_seed(0)
    net = GenesisUNet3D(norm="batch").eval()
    window = SlidingWindowInferer(roi_size=(64, 64, 32), sw_batch_size=1, overlap=0.25, mode="gaussian")
    x = torch.rand(1, 1, *shape)
    with torch.no_grad():
        ours = MethodInferer(window, "forward_with_bottleneck")(x, net)
        monai_restored = window(x, lambda w: tuple(net.forward_with_bottleneck(w).values()))[0]
        features = MethodInferer(window, "forward_features")(x, net)
    torch.testing.assert_close(ours["restored"], monai_restored)
    assert ours["bottleneck"].shape[2:] == features.shape[2:] == cells

    assert torch.isfinite(features).all()


def test_a_scan_smaller_than_the_window_is_reported_as_padded(caplog):
    window = SlidingWindowInferer(roi_size=(64, 64, 32))
    scan = MetaTensor(torch.rand(1, 1, 48, 48, 8), meta={"filename_or_obj": ["/data/thin.nii.gz"]})
    with caplog.at_level("WARNING", logger="medfm.contract"), torch.no_grad():
        MethodInferer(window, "forward_features")(scan, GenesisUNet3D(norm="batch").eval())
    assert "/data/thin.nii.gz: voxel grid 48 x 48 x 8 is smaller than the 64 x 64 x 32 window the network was trained on; " \
           "it is padded" in caplog.text


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.body(x)

    def doubled(self, x):
        return {"doubled": 2 * self.body(x)}


def _ddp_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    network = torch.nn.parallel.DistributedDataParallel(_TwoHeads())
    inputs = torch.full((2, 3), float(rank + 1))  # different data on each rank
    output = MethodInferer(SimpleInferer(), "doubled")(inputs, network)
    output["doubled"].sum().backward()
    # plain lists: a tensor would travel as shared memory that dies with this process
    queue.put((rank, network.module.body.weight.grad.tolist(), "forward" in vars(network.module)))
    dist.barrier()
    dist.destroy_process_group()
    queue.close()
    queue.join_thread()  # the result is in the pipe before the process ends
    # DDP's gloo threads outlive the group and can hang the interpreter's teardown (see end_distributed_run)
    os._exit(0)


def test_a_method_called_through_ddp_gets_its_gradients_averaged_across_ranks():
    """MethodInferer used to call the method on DDP's inner module, so DDP never synchronised the gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    # daemonic, and killed below: a hung worker fails this test instead of blocking pytest's exit
    processes = [context.Process(target=_ddp_worker, args=(rank, port, queue), daemon=True) for rank in range(2)]
    try:
        for process in processes:
            process.start()
        results = {rank: (torch.tensor(grad), patched) for rank, grad, patched in (queue.get(timeout=120) for _ in processes)}
        for process in processes:
            process.join(timeout=120)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    # local gradient of sum(2 * W x) w.r.t. W is 2 * sum over the batch of x: rank 0 (x = 1) 4, rank 1 (x = 2) 8
    torch.testing.assert_close(results[0][0], torch.full((3, 3), 6.0))  # averaged: (4 + 8) / 2
    torch.testing.assert_close(results[1][0], results[0][0])
    assert not results[0][1]  # the module's own forward is back
