import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import (
    GenesisCorruptiond,
    RandInPaint,
    RandInPaintd,
    RandLocalPixelShuffle,
    RandLocalPixelShuffled,
    RandNonlinearIntensity,
    RandNonlinearIntensityd,
    RandOutPaint,
    RandOutPaintd,
)
from medfm.transforms.genesis import bezier_intensity_map

SHAPE = (1, 64, 64, 32)


@pytest.fixture
def cube():
    return np.random.RandomState(7).rand(*SHAPE).astype(np.float32)


def _box_mask(boxes, shape=SHAPE):
    mask = np.zeros(shape[1:], dtype=bool)
    for box in boxes:
        mask[tuple(slice(s, s + n) for s, n in box)] = True
    return mask


def _assert_box_bounds(boxes, size_range):
    """Each box edge lies in ``size_range(dim)`` and keeps the upstream 3-voxel margin."""
    for box in boxes:
        for (start, size), dim in zip(box, SHAPE[1:]):
            low, high = size_range(dim)
            assert low <= size <= high and 3 <= start and start + size <= dim - 3


def test_shuffle_single_block_permutes_its_voxels_only(cube):
    for seed in range(20):
        shuffle = RandLocalPixelShuffle(prob=1.0, num_blocks=1)
        shuffle.set_random_state(seed)
        out = shuffle(cube)
        inside = np.zeros(SHAPE[1:], dtype=bool)
        inside.flat[shuffle._targets] = True
        coords = np.argwhere(inside)
        size = coords.max(0) - coords.min(0) + 1
        assert inside.sum() == size.prod(), "the shuffled voxels form one box"
        assert np.all(size >= 1) and np.all(size <= np.array(SHAPE[1:]) // 10)
        np.testing.assert_array_equal(np.sort(out[0][inside]), np.sort(cube[0][inside]))
        np.testing.assert_array_equal(out[0][~inside], cube[0][~inside])


def test_shuffle_later_blocks_win_and_uncovered_voxels_stay(cube):
    shuffle = RandLocalPixelShuffle(prob=1.0, num_blocks=10_000)
    shuffle.set_random_state(3)
    out = shuffle(cube)
    covered = _box_mask(zip(*(zip(shuffle.block_starts[:, a], shuffle.block_sizes[:, a]) for a in range(3))))
    np.testing.assert_array_equal(out[0][~covered], cube[0][~covered])
    assert 0.5 < covered.mean() < 0.99  # 10,000 upstream-sized blocks cover most but not all voxels
    # nothing is written after the last block, so it holds a permutation of its original voxels
    last = tuple(slice(s, s + n) for s, n in zip(shuffle.block_starts[-1], shuffle.block_sizes[-1]))
    np.testing.assert_array_equal(np.sort(out[0][last].ravel()), np.sort(cube[0][last].ravel()))
    # every voxel's new value comes from inside a block that covers it: the value exists in the input
    assert np.isin(out[0][covered], cube[0]).all()


def test_shuffle_block_size_and_position_statistics():
    shuffle = RandLocalPixelShuffle(prob=1.0, num_blocks=1)
    sizes, starts = [], []
    for seed in range(400):
        shuffle.set_random_state(seed)
        shuffle.randomize(SHAPE)
        coords = np.array(np.unravel_index(shuffle._targets, SHAPE[1:])).T
        np.testing.assert_array_equal(coords.max(0) - coords.min(0) + 1, shuffle.block_sizes[0])
        sizes.append(shuffle.block_sizes[0])
        starts.append(shuffle.block_starts[0])
    sizes, starts = np.array(sizes), np.array(starts)
    assert set(sizes[:, 0]) == set(range(1, 7)) and set(sizes[:, 2]) == set(range(1, 4))  # randint(1, dim // 10)
    assert starts.min() == 0 and np.all(starts + sizes <= np.array(SHAPE[1:]))


def test_shuffle_keeps_multiset_when_blocks_cannot_overlap():
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    shuffle = RandLocalPixelShuffle(prob=1.0, num_blocks=1)
    shuffle.set_random_state(11)
    out = shuffle(image)
    np.testing.assert_array_equal(np.sort(out.ravel()), np.sort(image.ravel()))
    assert not np.array_equal(out, image) or shuffle._targets.size == 1


def test_shuffle_is_reproducible_and_same_for_every_channel():
    image = np.random.RandomState(0).rand(2, 32, 32, 16).astype(np.float32)
    image[1] = image[0]
    a = RandLocalPixelShuffle(prob=1.0).set_random_state(5)(image)
    b = RandLocalPixelShuffle(prob=1.0).set_random_state(5)(image)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[0], a[1])


def test_shuffle_probability():
    shuffle = RandLocalPixelShuffle(num_blocks=10).set_random_state(0)
    image = np.random.rand(1, 32, 32, 16).astype(np.float32)
    applied = sum(not np.array_equal(shuffle(image), image) for _ in range(400))
    assert 160 < applied < 240  # upstream p = 0.5


@pytest.mark.parametrize("inverted", [False, True])
def test_bezier_map_is_monotone_with_fixed_end_points(inverted):
    rng = np.random.RandomState(1)
    for _ in range(50):
        xs, ys = bezier_intensity_map(rng.rand(4), inverted)
        assert np.all(np.diff(xs) >= 0)
        assert np.all(np.diff(ys) <= 0) if inverted else np.all(np.diff(ys) >= 0)
        assert (ys[0], ys[-1]) == ((1.0, 0.0) if inverted else (0.0, 1.0))


def test_nonlinear_intensity_is_monotone_or_inverted_half_the_time(cube):
    transform = RandNonlinearIntensity(prob=1.0).set_random_state(2)
    ramp = np.linspace(0, 1, 1000, dtype=np.float32)[None, :, None, None]
    inverted = 0
    for _ in range(200):
        out = transform(ramp)[0, :, 0, 0]
        steps = np.diff(out)
        assert np.all(steps >= -1e-6) or np.all(steps <= 1e-6)
        inverted += bool(out[0] > out[-1])
        assert out.dtype == np.float32
    assert 70 < inverted < 130


def test_in_paint_changes_only_its_boxes(cube):
    paint = RandInPaint(prob=1.0)
    for seed in range(30):
        paint.set_random_state(seed)
        out = paint(cube)
        mask = _box_mask(paint.boxes)
        np.testing.assert_array_equal(out[0][~mask], cube[0][~mask])
        if paint.boxes:
            assert not np.allclose(out[0][mask], cube[0][mask])
        assert len(paint.boxes) <= 5
        _assert_box_bounds(paint.boxes, lambda dim: (dim // 6, dim // 3))


def test_out_paint_keeps_only_its_windows(cube):
    paint = RandOutPaint(prob=1.0)
    for seed in range(30):
        paint.set_random_state(seed)
        out = paint(cube)
        mask = _box_mask(paint.windows)
        np.testing.assert_array_equal(out[0][mask], cube[0][mask])
        assert not np.allclose(out[0][~mask], cube[0][~mask])
        assert 1 <= len(paint.windows) <= 5
        assert 0 <= out.min() and out.max() <= 1
        _assert_box_bounds(paint.windows, lambda dim: (dim - 4 * dim // 7, dim - 3 * dim // 7))


def test_dictionary_versions_apply_one_draw_to_all_keys_and_match_array_versions(cube):
    pairs = [
        (RandLocalPixelShuffle(prob=1.0), RandLocalPixelShuffled(["a", "b"], prob=1.0)),
        (RandNonlinearIntensity(prob=1.0), RandNonlinearIntensityd(["a", "b"], prob=1.0)),
        (RandInPaint(prob=1.0), RandInPaintd(["a", "b"], prob=1.0)),
        (RandOutPaint(prob=1.0), RandOutPaintd(["a", "b"], prob=1.0)),
    ]
    for array_t, dict_t in pairs:
        dict_t.set_random_state(9)
        out = dict_t({"a": cube, "b": cube.copy()})
        np.testing.assert_array_equal(out["a"], out["b"])
        array_t.set_random_state(9)
        dict_t.set_random_state(9)
        dict_t.randomize(None)  # the dictionary wrapper draws its own p first
        array_t.R = dict_t.transform.R
        expected = array_t(cube)
        np.testing.assert_array_equal(dict_t.transform(cube, randomize=False), expected)


def test_transforms_keep_torch_and_meta_tensors(cube):
    image = MetaTensor(torch.from_numpy(cube), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    for transform in (RandLocalPixelShuffle(1.0), RandNonlinearIntensity(1.0), RandInPaint(1.0), RandOutPaint(1.0)):
        out = transform.set_random_state(0)(image)
        assert isinstance(out, MetaTensor) and out.dtype == torch.float32
        torch.testing.assert_close(out.affine, image.affine)


def test_genesis_corruption_pair_and_upstream_rates(cube):
    corruption = GenesisCorruptiond(keys="image", target_key="label", num_shuffle_blocks=50).set_random_state(0)
    painters, flips = {"RandInPaint": 0, "RandOutPaint": 0, None: 0}, 0
    small = cube[:, :32, :32, :16].copy()
    for _ in range(500):
        pair = corruption({"image": small})
        painters[type(corruption.painter).__name__ if corruption.painter else None] += 1
        flips += bool(corruption.flip_axes)
        expected = np.flip(small, axis=tuple(a + 1 for a in corruption.flip_axes)) if corruption.flip_axes else small
        np.testing.assert_array_equal(pair["label"], expected)
        assert pair["image"].shape == small.shape
    assert 60 < painters["RandInPaint"] < 120  # 0.9 * 0.2 = 0.18
    assert 320 < painters["RandOutPaint"] < 400  # 0.9 * 0.8 = 0.72
    assert 25 < painters[None] < 75  # 0.1
    assert 140 < flips < 260  # 1 - P(no flip) with odd-count cancellation: about 0.40


def test_genesis_corruption_is_reproducible(cube):
    a = GenesisCorruptiond().set_random_state(4)({"image": cube})
    b = GenesisCorruptiond().set_random_state(4)({"image": cube})
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert a["label"] is not a["image"]


def test_genesis_corruption_rejects_several_keys():
    with pytest.raises(ValueError, match="one image key"):
        GenesisCorruptiond(keys=["a", "b"])
