"""Time the Models Genesis corruptions per 64x64x32 cube: medfm's vectorised transforms against
straightforward per-block Python-loop versions (written here for comparison, same parameters).

    .venv/bin/python benchmarks/genesis_transforms.py [--repeats 30] [--threads 1]

Prints one row per transform: mean milliseconds per cube (the mean, because the full pipeline
applies each corruption only with its probability) for the loop version and for medfm, and the
speed-up. Nothing here is asserted; rerun it on your machine.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import numpy as np
import torch

from medfm.transforms import GenesisCorruptiond, RandInPaint, RandLocalPixelShuffle, RandNonlinearIntensity, RandOutPaint

SHAPE = (1, 64, 64, 32)


# ---- straightforward reference versions: one Python iteration per block / box / curve sample ----

def loop_local_shuffle(x: np.ndarray, blocks: int = 10_000) -> np.ndarray:
    out = x.copy()
    _, *dims = x.shape
    for _ in range(blocks):
        size = [random.randint(1, d // 10) for d in dims]
        start = [random.randint(0, d - s) for d, s in zip(dims, size)]
        region = (0,) + tuple(slice(a, a + s) for a, s in zip(start, size))
        values = x[region].flatten()
        np.random.shuffle(values)
        out[region] = values.reshape(size)
    return out


def loop_nonlinear(x: np.ndarray, samples: int = 100_000) -> np.ndarray:
    from math import comb

    points = [(0.0, 0.0), (random.random(), random.random()), (random.random(), random.random()), (1.0, 1.0)]
    t = np.linspace(0.0, 1.0, samples)
    basis = [comb(3, i) * t ** (3 - i) * (1 - t) ** i for i in range(4)]
    xs = sum(p[0] * b for p, b in zip(points, basis))
    ys = sum(p[1] * b for p, b in zip(points, basis))
    if random.random() < 0.5:
        xs = np.sort(xs)
    else:
        xs, ys = np.sort(xs), np.sort(ys)
    return np.interp(x, xs, ys)


def _loop_box(dims, low, high):
    size = [random.randint(lo, hi) for lo, hi in zip(low, high)]
    start = [random.randint(3, d - s - 3) for d, s in zip(dims, size)]
    return (slice(None),) + tuple(slice(a, a + s) for a, s in zip(start, size)), size


def loop_in_paint(x: np.ndarray) -> np.ndarray:
    out, dims, boxes = x.copy(), x.shape[1:], 5
    while boxes > 0 and random.random() < 0.95:
        region, size = _loop_box(dims, [d // 6 for d in dims], [d // 3 for d in dims])
        out[region] = np.random.rand(*size)
        boxes -= 1
    return out


def loop_out_paint(x: np.ndarray) -> np.ndarray:
    dims = x.shape[1:]
    out = np.random.rand(*x.shape)
    low, high = [d - 4 * d // 7 for d in dims], [d - 3 * d // 7 for d in dims]
    region, _ = _loop_box(dims, low, high)
    out[region] = x[region]
    windows = 4
    while windows > 0 and random.random() < 0.95:
        region, _ = _loop_box(dims, low, high)
        out[region] = x[region]
        windows -= 1
    return out


def loop_pipeline(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    target = x.copy()
    flips = 3
    while random.random() < 0.4 and flips > 0:
        axis = random.choice([1, 2, 3])
        x, target = np.flip(x, axis), np.flip(target, axis)
        flips -= 1
    if random.random() < 0.5:
        x = loop_local_shuffle(x)
    if random.random() < 0.9:
        x = loop_nonlinear(x)
    if random.random() < 0.9:
        x = loop_in_paint(x) if random.random() < 0.2 else loop_out_paint(x)
    return x, target


def mean_ms(function, cube: np.ndarray, repeats: int) -> float:
    function(cube)  # warm-up (allocations, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(cube)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.fmean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per row (the full pipeline: 4x)")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (1: a data-loader worker)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    np.random.seed(0)
    cube = np.random.RandomState(0).rand(*SHAPE).astype(np.float32)

    corruption = GenesisCorruptiond().set_random_state(0)
    rows = [
        ("local pixel shuffle (p=1)", loop_local_shuffle, RandLocalPixelShuffle(prob=1.0).set_random_state(0)),
        ("non-linear intensity (p=1)", loop_nonlinear, RandNonlinearIntensity(prob=1.0).set_random_state(0)),
        ("in-painting (p=1)", loop_in_paint, RandInPaint(prob=1.0).set_random_state(0)),
        ("out-painting (p=1)", loop_out_paint, RandOutPaint(prob=1.0).set_random_state(0)),
        ("full pipeline (upstream rates)", loop_pipeline, lambda c: corruption({"image": c})),
    ]
    print(f"# {platform.processor() or platform.machine()}, numpy {np.__version__}, torch threads {args.threads}, "
          f"{args.repeats} repeats, cube {SHAPE}")
    print(f"| {'transform':<32} | {'loop ms':>9} | {'medfm ms':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for name, loop_version, medfm_version in rows:
        repeats = 4 * args.repeats if "pipeline" in name else args.repeats
        loop_ms = mean_ms(loop_version, cube, repeats)
        fast_ms = mean_ms(medfm_version, cube, repeats)
        print(f"| {name:<32} | {loop_ms:9.2f} | {fast_ms:9.2f} | {loop_ms / fast_ms:7.1f}x |")


if __name__ == "__main__":
    main()
