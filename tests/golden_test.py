"""Pixel-identity checks: whole runs against results saved before a change.

Four small runs (64 px; augmented 96 px, texture 128 px; 2 levels x 5 iterations, random VGG19 weights) of the
example transfer, a transfer with style augmentation, a texture and a Gatys
run. Their float results (before stretch or clip) were saved by this file's
`__main__` and are compared here to float rounding: a refactor that changes
no behaviour must leave them as they are. A change that is meant to change
results (a new optimiser rule, say) regenerates them, from the repository
root, with

    python -m tests.golden_test

and says so in its commit message.
"""

import pathlib

import numpy as np
import pytest

from cnnmrf_jax import config as config_lib
from cnnmrf_jax import synthesize
from cnnmrf_jax import vgg

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"

_SMALL = dict(max_size=64, num_res=2, num_iter=(5,), print_every=5)

RUNS = {
    "example": config_lib.Config(
        mode="transfer", content_image="example:grace_hopper",
        style_image=("example:hubble_deep_field",), **_SMALL),
    "augmented": config_lib.Config(
        mode="transfer", content_image="example:astronaut",
        style_image=("example:coffee",), num_rotations=1, num_scales=1,
        **{**_SMALL, "max_size": 96}),
    "texture": config_lib.Config(
        mode="texture", style_image=("example:ihc",), init="noise",
        **{**_SMALL, "max_size": 128}),
    "gatys": config_lib.Config(
        mode="gatys", content_image="example:grace_hopper",
        style_image=("example:hubble_deep_field",), init="content",
        style_weight=1e3, **_SMALL),
}


def _run(name: str) -> synthesize.Result:
  params = vgg.init_params("vgg19", seed=0)
  return synthesize.run(RUNS[name], None, params=params, convention="caffe")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_result_is_unchanged(name):
  saved = np.load(GOLDEN_DIR / f"{name}.npz")
  result = _run(name)
  np.testing.assert_allclose(result.images, saved["images"], rtol=0,
                             atol=1e-5)
  np.testing.assert_allclose(result.history[-1]["loss"], saved["loss"],
                             rtol=1e-5)


if __name__ == "__main__":
  GOLDEN_DIR.mkdir(exist_ok=True)
  for run_name in sorted(RUNS):
    out = _run(run_name)
    np.savez(GOLDEN_DIR / f"{run_name}.npz", images=out.images,
             loss=np.asarray(out.history[-1]["loss"]))
    print(run_name, out.images.shape, out.history[-1]["loss"])
