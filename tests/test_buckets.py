"""--buckets: aspect-ratio buckets (ldm.data.buckets), their latent cache and batches (ldm.latent_cache)."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from PIL import Image

from ldm.data import open_dataset
from ldm.data.buckets import AREA_TOLERANCE, MAX_RATIO, BucketedFolder, bucket_sizes
from ldm.distributed import Dist
from ldm.latent_cache import Batches, BucketPositions, prepare_cache
from ldm.pretrained import load_vae
from t2i_helpers import VAE_CONFIG, make_vae

# (width, height) of the pictures: wide, tall and square ones
PICTURES = [(64, 32), (60, 40), (40, 40), (33, 50), (30, 64), (80, 40), (50, 50), (45, 30), (20, 40), (70, 40)]


def two_colour_folder(root, seed: int):
    """Pictures whose left half is red and right half blue: a square crop of a wide one loses most of
    both halves' width, a bucket keeps the split in the middle."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (w, h) in enumerate(PICTURES):
        a = np.zeros((h, w, 3), np.uint8)
        a[:, : w // 2] = (220, 30, 30)
        a[:, w // 2:] = (30, 30, 220)
        a += rng.integers(0, 20, a.shape, dtype=np.uint8)  # no two alike
        Image.fromarray(a).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_bucket_sizes():
    for resolution, step in ((32, 8), (512, 64), (768, 64), (256, 32)):
        sizes = bucket_sizes(resolution, step)
        assert (resolution, resolution) in sizes
        assert {(w, h) for h, w in sizes} == set(sizes)  # portrait and landscape alike
        for h, w in sizes:
            assert h % step == 0 and w % step == 0
            assert max(h, w) / min(h, w) <= MAX_RATIO
            assert abs(h * w - resolution ** 2) <= AREA_TOLERANCE * resolution ** 2
    assert len(bucket_sizes(512, 64)) >= 5


def test_pictures_keep_their_framing(tmp_path, seed):
    data = BucketedFolder(open_dataset(two_colour_folder(tmp_path / "d", seed), 32), step=8)
    for i, (w, h) in enumerate(PICTURES):
        bh, bw = data.sizes[data.bucket[i]]
        ratios = [s[1] / s[0] for s in data.sizes]
        assert min(abs(math.log(r) - math.log(w / h)) for r in ratios) == abs(math.log(bw / bh) - math.log(w / h))
        image = data[i]["image"]  # (3, bh, bw) in [-1, 1]
        assert image.shape == (3, bh, bw)
        red = image[0] > image[2]  # (bh, bw)
        # the red-blue edge stays in the middle, as in the picture (to a pixel or two of scaling)
        edge = red.float().mean(0).lt(0.5).float().argmax().item()
        assert abs(edge - bw / 2) <= 2, (i, w, h, bh, bw, edge)
    assert sum(n for *_, n in data.describe()["buckets"]) == len(PICTURES)


def test_bucketed_cache_and_batches(tmp_path, seed):
    data = BucketedFolder(open_dataset(two_colour_folder(tmp_path / "d", seed), 16), step=4)
    vae_dir = make_vae(tmp_path / "vae", seed)
    vae, _ = load_vae(vae_dir)
    cache = prepare_cache(tmp_path / "cache", Dist(), vae, vae_dir, data, len(data), None, [], torch.device("cpu"),
                          quiet=True)
    f = VAE_CONFIG.downsample_factor
    assert cache.bucket.tolist() == data.bucket.tolist()
    for i in range(len(data)):  # each latent in its corner, zeros round it
        h, w = cache.bucket_sizes[cache.bucket[i]].tolist()
        assert (h * f, w * f) == data.sizes[data.bucket[i]]
        with torch.no_grad():
            mean, _ = vae.latent_moments(data[i]["image"][None])
        torch.testing.assert_close(cache.mean[i, :, :h, :w].float(), mean[0], atol=2e-3, rtol=1e-2)
        assert not cache.mean[i, :, h:].any() and not cache.mean[i, :, :, w:].any()
    B = 3
    batches = Batches(cache, B, Dist(), seed, 0.0, 1000, torch.device("cpu"))
    per_epoch = batches.positions.per_epoch
    seen = set()
    for step in range(per_epoch):
        idx = batches.positions.take(step * B, B)
        assert len(set(cache.bucket[idx].tolist())) == 1  # one bucket a batch
        x0, t, noise, _ = batches(step)
        h, w = cache.bucket_sizes[cache.bucket[idx[0]]].tolist()
        assert x0.shape == noise.shape == (B, VAE_CONFIG.latent_channels, h, w)
        seen |= set(idx.tolist())
    assert seen == set(range(len(data)))  # an epoch shows every picture
    again = BucketPositions(cache.bucket, B, seed)  # a resumed run draws the same batches
    assert all(torch.equal(again.take(s * B, B), batches.positions.take(s * B, B)) for s in (0, 7, per_epoch + 2))
    for rank in range(3):  # three processes share each global batch row by row
        assert torch.equal(again.take(5 * B + rank, 1), batches.positions.take(5 * B, B)[rank:rank + 1])
