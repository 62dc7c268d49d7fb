"""Epochs whose files repeat, planned lazily (training/epochs.py): bijective seeded orders, every read exactly once
per epoch, equal disjoint shares per rank, and memory in proportion to the files, not the repeats (a subprocess
under an address-space cap, as the bad-input battery ran it)."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training.datasets import EpochCounts, rounded
from training.epochs import Group, Permutation, RepeatedPlan

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permutation_is_a_seeded_bijection(n):
    order = [Permutation(n, seed=5)[i] for i in range(n)]
    assert sorted(order) == list(range(n))
    assert order == [Permutation(n, seed=5)[i] for i in range(n)]
    if n > 3:
        assert order != [Permutation(n, seed=6)[i] for i in range(n)] and order != list(range(n))
    with pytest.raises(IndexError):
        Permutation(n, seed=5)[n]


def test_repeated_plan_reads_every_copy_once_and_deals_equal_disjoint_shares():
    counts = [3, 0, 1, 5, 2, 2, 4]                       # 17 reads; file 1 not at all this epoch
    groups = [Group((32, 48), [0, 2, 4]), Group((48, 32), [1, 3, 5, 6])]
    plans = [RepeatedPlan(counts, groups, epoch=2, seed=9, batch_size=2, rank=r, world=2) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 4            # 6 // 2 + 11 // 2 = 8 full batches, 4 per rank
    reads = [read for plan in plans for batch in plan for read in batch]
    assert len(reads) == len(set(reads)) == 16
    for file, copy, size in reads:
        assert 0 <= copy < counts[file] and size == next(g.size for g in groups if file in g.files)
    for plan in plans:
        assert all(len({size for _, _, size in batch}) == 1 for batch in plan)  # one bucket per batch
    whole = RepeatedPlan(counts, [Group(None, list(range(7)))], epoch=2, seed=9, batch_size=17)
    assert sorted((f, c) for f, c, _ in whole[0]) == [(f, c) for f, n in enumerate(counts) for c in range(n)]
    with pytest.raises(ValueError, match="fewer than the 9 ranks"):
        RepeatedPlan(counts, groups, epoch=0, seed=9, batch_size=2, world=9)


def test_counts_are_floor_or_ceil_of_their_expectation():
    counts = EpochCounts(seed=1, files=6, expected=((0, 2.5), (1, 2.5), (2, 0.25), (3, 1.0)),
                         reg_weights=((4, 1), (5, 3)))
    totals = collections.Counter()
    for epoch in range(400):
        c = counts(epoch)
        assert c[0] in (2, 3) and c[1] in (2, 3) and c[2] in (0, 1) and c[3] == 1
        assert c[4] + c[5] == sum(c[:4])                 # the regularisation set fills as many places
        totals.update(dict(enumerate(c)))
    means = {i: totals[i] / 400 for i in range(6)}
    assert abs(means[0] - 2.5) < 0.12 and abs(means[2] - 0.25) < 0.08
    assert abs(means[5] / means[4] - 3) < 0.3            # in proportion to the folder's N
    g = torch.Generator().manual_seed(0)
    assert rounded([10, 10, 10], 3, g) in ([3, 3, 4], [3, 4, 3], [4, 3, 3])  # exactly the whole sum, 10


BOUNDED = textwrap.dedent("""
    import resource, sys, time
    from pathlib import Path
    from training.datasets import open_datasets
    from training.data import BatchPlan, FolderSource, SampleSpec
    from training.recipe import recipe_from_dict
    from training.toy_data import make_dataset

    root = Path(sys.argv[1])
    vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 1_500_000_000, resource.RLIM_INFINITY))  # 1.5 GB of room
    make_dataset(root / "10000_big", n=8, seed=0)                                # the largest folder count
    recipe = recipe_from_dict({"data": {"datasets": [{"path": str(root), "repeats": 10000.0}]},
                               "train": {"batch_size": 4, "seed": 0}})
    start = time.time()
    mix = open_datasets(recipe.data, SampleSpec(32, 1, recipe.data.captions), seed=0)
    source = FolderSource(mix, BatchPlan(0, 4), workers=0, counts=mix.counts)
    batch = next(iter(source))
    print(sum(mix.counts(0)), source.batches_per_epoch, len(batch.captions), round(time.time() - start, 1))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to set the address-space cap")
def test_an_epoch_of_800_million_reads_fits_in_bounded_memory(tmp_path):
    """8 images × folder repeats 10,000 × dataset repeats 10,000: an epoch of 8·10⁸ reads is planned and its first
    batch read under a 1.5 GB cap (a list of 20 million reads took 3.7 GB before)."""
    done = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    reads, batches, batch, seconds = done.stdout.split()
    assert int(reads) == 800_000_000 and int(batches) == 200_000_000 and int(batch) == 4 and float(seconds) < 30
