"""Models Genesis pretext corruptions (Zhou et al. 2019) as seedable MONAI transforms.

All transforms take channel-first arrays ``(C, H, W, D)`` scaled to [0, 1] (numpy or torch,
MetaTensor meta is kept) and draw their parameters from ``self.R``, so ``set_random_state``
makes them reproducible. Probabilities and parameter ranges default to the upstream ones.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import Flip, MapTransform, Randomizable, RandomizableTransform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_data_type, convert_to_dst_type

from .wrapping import SeedsWrappedTransform

__all__ = [
    "RandLocalPixelShuffle",
    "RandNonlinearIntensity",
    "RandInPaint",
    "RandOutPaint",
    "RandLocalPixelShuffled",
    "RandNonlinearIntensityd",
    "RandInPaintd",
    "RandOutPaintd",
    "GenesisCorruptiond",
    "bezier_intensity_map",
]

Box = tuple[tuple[int, int], ...]  # per spatial axis: (start, size)


class _GenesisArrayTransform(RandomizableTransform):
    """Shared plumbing: draw parameters for a shape, then apply them to a numpy copy."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def randomize(self, shape: Sequence[int]) -> None:  # type: ignore[override]
        """Draw whether to apply and, if so, all parameters for an image of ``shape`` (C, ...)."""
        super().randomize(None)
        if self._do_transform:
            self._draw(tuple(int(s) for s in shape))

    def _draw(self, shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _apply(self, img: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, img, randomize: bool = True):
        """Apply to ``img`` (C, H, W, D); ``randomize=False`` re-applies the previous draw."""
        if randomize:
            self.randomize(img.shape)
        if not self._do_transform:
            return img
        array = convert_data_type(img, np.ndarray)[0]
        return convert_to_dst_type(self._apply(array), img)[0]


@functools.lru_cache(maxsize=8)
def _box_offset_table(max_size: tuple[int, ...], strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Linear offsets of the voxels of every box shape up to ``max_size``, row-major, concatenated.

    Returns ``(table, start)``: the offsets of box shape ``i`` (``np.ravel_multi_index`` of
    ``size - 1``) are ``table[start[i]:start[i] + volume]``.
    """
    chunks = []
    for size in np.ndindex(*max_size):
        grid = np.indices(np.asarray(size) + 1).reshape(len(size), -1)
        chunks.append(np.asarray(strides) @ grid)
    start = np.cumsum([0] + [c.size for c in chunks[:-1]])
    return np.concatenate(chunks).astype(np.int64), start.astype(np.int64)


class RandLocalPixelShuffle(_GenesisArrayTransform):
    """Permute the voxels inside many small random blocks (upstream: 10,000 blocks, p=0.5).

    Block edge lengths are drawn per axis from ``[1, dim // 10]`` and block origins from
    ``[0, dim - size]`` (both inclusive, as upstream). Each block is read from the *unshuffled*
    input; where blocks overlap the later block wins. All blocks are drawn, permuted and written
    in a few vectorised numpy calls (no Python loop over blocks); every channel gets the same
    permutation. ``block_starts`` and ``block_sizes`` hold the last draw.
    """

    def __init__(self, prob: float = 0.5, num_blocks: int = 10_000, max_block_fraction: float = 0.1) -> None:
        super().__init__(prob)
        self.num_blocks = num_blocks
        self.max_block_fraction = max_block_fraction
        self.block_starts: np.ndarray = np.zeros((0, 3), dtype=np.int64)  # (num_blocks, spatial dims)
        self.block_sizes: np.ndarray = np.zeros((0, 3), dtype=np.int64)
        self._sources: np.ndarray | None = None
        self._targets: np.ndarray | None = None

    def _draw(self, shape: tuple[int, ...]) -> None:
        spatial = np.asarray(shape[1:])
        max_size = np.clip((spatial * self.max_block_fraction).astype(int), 1, spatial)
        sizes = (self.R.random_sample((self.num_blocks, spatial.size)) * max_size).astype(np.int64) + 1
        starts = (self.R.random_sample(sizes.shape) * (spatial - sizes + 1)).astype(np.int64)
        strides = np.cumprod(np.r_[spatial[1:], 1][::-1])[::-1]
        box_shapes = np.ravel_multi_index(tuple((sizes - 1).T), tuple(max_size))
        table, table_start = _box_offset_table(tuple(int(m) for m in max_size), tuple(int(s) for s in strides))
        volumes = sizes.prod(axis=1)
        total = int(volumes.sum())
        # np.repeat expands per-block values to per-voxel ones sequentially (cheaper than gathers)
        offset_index = np.repeat(table_start[box_shapes] - (np.cumsum(volumes) - volumes), volumes) + np.arange(total)
        targets = np.repeat(starts @ strides, volumes) + table[offset_index]
        # sorting by (block, random 32-bit key) gives an independent uniform permutation inside each
        # block (a tie, which keeps two voxels in order, has odds of at most 1.4e-6 per block)
        random_keys = np.frombuffer(self.R.bytes(4 * total), dtype=np.uint32).astype(np.int64)
        keys = (np.repeat(np.arange(self.num_blocks, dtype=np.int64), volumes) << 32) | random_keys
        self.block_starts, self.block_sizes = starts, sizes
        self._targets = targets
        self._sources = targets[np.argsort(keys, kind="stable")]

    def _apply(self, img: np.ndarray) -> np.ndarray:
        flat = img.reshape(img.shape[0], -1)
        out = flat.copy()
        # numpy assigns repeated indices in order, so the last block written wins as upstream
        out[:, self._targets] = flat[:, self._sources]
        return out.reshape(img.shape)


def bezier_intensity_map(control: Sequence[float], inverted: bool, num_points: int = 1001) -> tuple[np.ndarray, np.ndarray]:
    """Sample the cubic Bezier intensity curve through (0,0), (c0,c1), (c2,c3), (1,1).

    Returns increasing ``xs`` and the matching ``ys``; with ``inverted`` the y samples are
    reversed, giving a decreasing map from 1 to 0 (upstream's "only x sorted" half).
    Both coordinates are monotone in the curve parameter for control values in [0, 1].
    """
    t = np.linspace(0.0, 1.0, num_points)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
    xs = b1 * control[0] + b2 * control[2] + b3
    ys = b1 * control[1] + b2 * control[3] + b3
    return xs, (ys[::-1] if inverted else ys)


class RandNonlinearIntensity(_GenesisArrayTransform):
    """Map intensities through a random monotone cubic Bezier curve (upstream p=0.9).

    Half of the draws give an increasing map with f(0)=0, f(1)=1; the other half the inverted,
    decreasing map with f(0)=1, f(1)=0. Expects intensities in [0, 1]; values outside are clamped
    to the curve's end points, as ``np.interp`` does. The curve is applied through a 16384-entry
    table: within 1e-5 of the exact curve for 99.9% of voxels, at most 1e-3 where a curve is
    nearly vertical at an end point.
    """

    def __init__(self, prob: float = 0.9, inverted_prob: float = 0.5) -> None:
        super().__init__(prob)
        self.inverted_prob = inverted_prob
        self.control: np.ndarray = np.zeros(4)
        self.inverted = False

    def _draw(self, shape: tuple[int, ...]) -> None:
        self.control = self.R.random_sample(4)
        self.inverted = bool(self.R.random_sample() < self.inverted_prob)

    #: the curve is tabulated on this many evenly spaced intensities, then interpolated linearly
    table_size = 16384

    def _apply(self, img: np.ndarray) -> np.ndarray:
        xs, ys = bezier_intensity_map(self.control, self.inverted)
        table = np.interp(np.linspace(0.0, 1.0, self.table_size), xs, ys).astype(np.float32)
        # an even grid turns each voxel's curve look-up into arithmetic instead of a binary search
        position = np.clip(img, 0.0, 1.0, dtype=np.float32) * np.float32(self.table_size - 1)
        index = np.minimum(position.astype(np.int32), self.table_size - 2)
        fraction = position - index
        low = table[index]
        return (low + fraction * (table[index + 1] - low)).astype(img.dtype, copy=False)


def _draw_box(rand: np.random.RandomState, spatial: Sequence[int], size_range, margin: int) -> Box:
    """One box per upstream recipe: inclusive size range per axis, origin kept ``margin`` from edges."""
    box = []
    for dim, (low, high) in zip(spatial, size_range):
        size = int(rand.randint(low, max(high, low) + 1))
        start = int(rand.randint(margin, max(dim - size - margin, margin) + 1))
        box.append((start, size))
    return tuple(box)


def _draw_count(rand: np.random.RandomState, max_count: int, prob: float) -> int:
    """Number of successes before the first failure of p=``prob`` trials, at most ``max_count``."""
    count = 0
    while count < max_count and rand.random_sample() < prob:
        count += 1
    return count


def _box_slices(box: Box) -> tuple[slice, ...]:
    return (slice(None),) + tuple(slice(start, start + size) for start, size in box)


class RandInPaint(_GenesisArrayTransform):
    """Fill up to ``max_boxes`` random boxes with U(0, 1) noise (upstream: 5 boxes, each p=0.95).

    Box edges are ``randint(dim // 6, dim // 3)`` (inclusive) and at least ``margin`` voxels
    from the border; voxels outside the boxes are left untouched.
    """

    def __init__(self, prob: float = 1.0, max_boxes: int = 5, box_prob: float = 0.95, margin: int = 3) -> None:
        super().__init__(prob)
        self.max_boxes = max_boxes
        self.box_prob = box_prob
        self.margin = margin
        self.boxes: list[Box] = []
        self._noise: list[np.ndarray] = []

    def _draw(self, shape: tuple[int, ...]) -> None:
        spatial = shape[1:]
        size_range = [(d // 6, d // 3) for d in spatial]
        count = _draw_count(self.R, self.max_boxes, self.box_prob)
        self.boxes = [_draw_box(self.R, spatial, size_range, self.margin) for _ in range(count)]
        self._noise = [self.R.random_sample((shape[0],) + tuple(s for _, s in b)) for b in self.boxes]

    def _apply(self, img: np.ndarray) -> np.ndarray:
        out = img.copy()
        for box, noise in zip(self.boxes, self._noise):
            out[_box_slices(box)] = noise
        return out


class RandOutPaint(_GenesisArrayTransform):
    """Replace the image with U(0, 1) noise except inside 1 + up to ``max_extra_windows`` windows.

    Window edges are ``dim - randint(3 * dim // 7, 4 * dim // 7)`` (inclusive), at least
    ``margin`` voxels from the border; extra windows are each kept with p=``window_prob``.
    """

    def __init__(
        self, prob: float = 1.0, max_extra_windows: int = 4, window_prob: float = 0.95, margin: int = 3
    ) -> None:
        super().__init__(prob)
        self.max_extra_windows = max_extra_windows
        self.window_prob = window_prob
        self.margin = margin
        self.windows: list[Box] = []
        self._noise: np.ndarray | None = None

    def _draw(self, shape: tuple[int, ...]) -> None:
        spatial = shape[1:]
        size_range = [(d - 4 * d // 7, d - 3 * d // 7) for d in spatial]
        count = 1 + _draw_count(self.R, self.max_extra_windows, self.window_prob)
        self.windows = [_draw_box(self.R, spatial, size_range, self.margin) for _ in range(count)]
        self._noise = self.R.random_sample(shape)

    def _apply(self, img: np.ndarray) -> np.ndarray:
        out = self._noise.astype(img.dtype)
        for window in self.windows:
            index = _box_slices(window)
            out[index] = img[index]
        return out


class _KeyedGenesisTransform(SeedsWrappedTransform, RandomizableTransform, MapTransform):
    """Dictionary wrapper: one draw per call, applied with the same parameters to every key."""

    backend = _GenesisArrayTransform.backend

    def __init__(self, keys: KeysCollection, prob: float, transform: _GenesisArrayTransform, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        transform.prob = 1.0  # this wrapper's own ``prob`` decides
        self.transform = transform

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        first = self.first_key(d)
        if first == ():
            return d
        self.transform.randomize(d[first].shape)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandLocalPixelShuffled(_KeyedGenesisTransform):
    """Dictionary version of :class:`RandLocalPixelShuffle`."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, num_blocks: int = 10_000,
                 max_block_fraction: float = 0.1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, RandLocalPixelShuffle(1.0, num_blocks, max_block_fraction), allow_missing_keys)


class RandNonlinearIntensityd(_KeyedGenesisTransform):
    """Dictionary version of :class:`RandNonlinearIntensity`."""

    def __init__(self, keys: KeysCollection, prob: float = 0.9, inverted_prob: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, RandNonlinearIntensity(1.0, inverted_prob), allow_missing_keys)


class RandInPaintd(_KeyedGenesisTransform):
    """Dictionary version of :class:`RandInPaint`."""

    def __init__(self, keys: KeysCollection, prob: float = 1.0, max_boxes: int = 5, box_prob: float = 0.95,
                 margin: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, RandInPaint(1.0, max_boxes, box_prob, margin), allow_missing_keys)


class RandOutPaintd(_KeyedGenesisTransform):
    """Dictionary version of :class:`RandOutPaint`."""

    def __init__(self, keys: KeysCollection, prob: float = 1.0, max_extra_windows: int = 4,
                 window_prob: float = 0.95, margin: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, RandOutPaint(1.0, max_extra_windows, window_prob, margin), allow_missing_keys)


class GenesisCorruptiond(Randomizable, MapTransform):
    """The full Models Genesis pretext: ``d[target_key]`` = original, ``d[key]`` = corrupted.

    Steps and upstream probabilities: up to ``max_flips`` flips of a random *spatial* axis, each
    with p=``flip_prob`` (applied to input and target alike; upstream drew from axes 0..2 of the
    (C, H, W, D) array, flipping the channel axis instead of depth, which we do not reproduce);
    local pixel shuffling p=0.5; non-linear intensity p=0.9; painting p=0.9, of which in-painting
    ``inpaint_fraction`` = 0.2 of the time and out-painting otherwise.

    Example (a pre-training sample)::

        pair = GenesisCorruptiond(keys="image", target_key="label")({"image": cube})
        pair["image"], pair["label"]   # corrupted input, original target, both (1, 64, 64, 32)
    """

    backend = _GenesisArrayTransform.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        target_key: str = "label",
        flip_prob: float = 0.4,
        max_flips: int = 3,
        shuffle_prob: float = 0.5,
        nonlinear_prob: float = 0.9,
        paint_prob: float = 0.9,
        inpaint_fraction: float = 0.2,
        num_shuffle_blocks: int = 10_000,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"GenesisCorruptiond corrupts one image key, got {self.keys}")
        self.target_key = target_key
        self.flip_prob = flip_prob
        self.max_flips = max_flips
        self.paint_prob = paint_prob
        self.inpaint_fraction = inpaint_fraction
        self.shuffle = RandLocalPixelShuffle(shuffle_prob, num_shuffle_blocks)
        self.nonlinear = RandNonlinearIntensity(nonlinear_prob)
        self.inpaint = RandInPaint(1.0)
        self.outpaint = RandOutPaint(1.0)
        self.flip_axes: tuple[int, ...] = ()
        self.painter: _GenesisArrayTransform | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for transform in (self.shuffle, self.nonlinear, self.inpaint, self.outpaint):
            transform.set_random_state(seed=int(self.R.randint(np.iinfo(np.uint32).max, dtype=np.uint32)))
        return self

    def randomize(self, spatial_dims: int) -> None:  # type: ignore[override]
        """Draw the flip axes and which painting (if any) to apply."""
        flips = [int(self.R.randint(spatial_dims)) for _ in range(_draw_count(self.R, self.max_flips, self.flip_prob))]
        self.flip_axes = tuple(a for a in range(spatial_dims) if flips.count(a) % 2)
        self.painter = None
        if self.R.random_sample() < self.paint_prob:
            self.painter = self.inpaint if self.R.random_sample() < self.inpaint_fraction else self.outpaint

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            self.randomize(len(image.shape) - 1)
            if self.flip_axes:
                image = Flip(spatial_axis=self.flip_axes)(image)
            d[self.target_key] = image.clone() if hasattr(image, "clone") else image.copy()
            corrupted = self.nonlinear(self.shuffle(image))
            d[key] = self.painter(corrupted) if self.painter is not None else corrupted
        return d
