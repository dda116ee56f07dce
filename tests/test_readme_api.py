"""The README's "Python API" snippet, run as written on a trained run folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import SESSION_SEED
from PIL import Image
from t2i_helpers import RESOLUTION, shared_assets

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return shared_assets(tmp_path_factory, SESSION_SEED % 1000)  # the seed every test file shares


def test_the_python_api_snippet_runs_on_a_run_folder(assets, tmp_path):
    (tmp_path / "runs").mkdir()
    os.symlink(assets["unet"], tmp_path / "runs" / "unet")  # what make demo leaves, here the tests' tiny run
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(readme_snippet(), "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    images, first, latents, pipe = scope["images"], scope["first"], scope["latents"], scope["pipe"]
    assert images.shape == (8, 3, RESOLUTION, RESOLUTION) and images.abs().max() <= 1
    assert isinstance(first, Image.Image) and first.size == (RESOLUTION, RESOLUTION)
    assert latents.shape == (8, *pipe.latent_shape)
    with Image.open(tmp_path / "grid.png") as grid:  # 4 a row, 2 rows, 2-px gaps, scaled by 4
        assert grid.size == (4 * (4 * (RESOLUTION + 2) + 2), 4 * (2 * (RESOLUTION + 2) + 2))
    # the pipeline call is the library's generate: same seed, same images; another prompt, others
    again = pipe(scope["prompts"], n=4, seed=0, output="pt")
    assert torch.equal(again, images)
    assert not torch.equal(pipe(["a large green cross at the bottom on a gray background"], n=1, output="pt"),
                           images[:1])
