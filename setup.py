"""Packaging for cnnmrf_jax (pip install -e .[test,examples,video])."""

import setuptools

setuptools.setup(
    name="cnnmrf_jax",
    version="0.1.0",
    description=("CNNMRF image synthesis (Li & Wand, CVPR 2016) and the Gatys "
                 "baseline in JAX/Flax"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=setuptools.find_packages(include=["cnnmrf_jax", "cnnmrf_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "jaxlib>=0.4.30",
        "flax>=0.8",
        "optax>=0.2",
        "jaxopt>=0.8",
        "pillow>=10",
        "numpy>=1.24",
        "absl-py>=1.0",
    ],
    extras_require={
        # Built-in example images (example:astronaut, example:grace_hopper...).
        "examples": ["scikit-image>=0.21", "matplotlib>=3.7"],
        # Optional readers for weight files users bring.
        "converters": ["h5py>=3.8"],
        # benchmarks/bench_peers.py's peer; the script puts it in a venv of
        # its own (pinned: the CPU wheel, an unpinned torch pulls CUDA).
        "bench": ["torch==2.13.0"],
        # Video: OpenCV reads clips and computes DIS optical flow; the
        # imageio-ffmpeg wheel bundles an ffmpeg binary that writes H.264.
        "video": ["opencv-python-headless>=4.5", "imageio-ffmpeg>=0.4.9"],
        "test": ["pytest>=7", "scikit-image>=0.21", "matplotlib>=3.7",
                 "h5py>=3.8", "opencv-python-headless>=4.5",
                 "imageio-ffmpeg>=0.4.9"],
    },
    entry_points={
        "console_scripts": [
            "cnnmrf_jax=cnnmrf_jax.main:run_main",
        ],
    },
)
