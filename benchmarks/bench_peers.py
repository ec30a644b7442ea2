"""Our VGG value-and-gradient and whole iterations against PyTorch's.

For each --sizes (the long side; content example:astronaut, square, style
example:coffee) it times, round-robin in one run, per --benches:

  vgg: jit(value_and_grad) of the sum of relu4_2 (--layer) of
    cnnmrf_jax.vgg.VGG with random weights (vgg.init_params, the kernel
    forms made once by vgg.prepare_params), w.r.t. the image only, once per
    --convs method ('xla', 'matmul', 'winograd'), against the same VGG19
    trunk written in PyTorch (benchmarks/_torch_worker.py: Conv2d 3x3 pad
    1, ReLU, ceil-mode MaxPool2d, weights requires_grad=False, the input
    requires_grad=True, backward of the sum of relu4_2), NCHW and
    channels_last.
  mrf1, mrf9: one L-BFGS iteration of CNNMRF at the finest level, the
    reference transfer settings (configs/transfer.flags: MRF on relu3_1 and
    relu4_1, 3x3 patches at stride 2, content relu4_2, TV, history 25), with
    1 style copy (no augmentation) and 9 (one rotation and one scale step
    each way). Ours: one compiled update of the Synthesizer's solver (VGG,
    matching, folding, losses, gradient, L-BFGS step), chained, with
    --conv. Torch: pystiche's li_wand_2016 iteration (the authors'
    settings) as _torch_worker.py transcribes it, one
    torch.optim.LBFGS(max_iter=1).step(closure).
  gatys: one L-BFGS iteration of the Gram baseline (configs/gatys.flags:
    relu1_1..relu5_1 Gram, content relu4_2, TV, noise init), ours against
    neural-style-pt's iteration as _torch_worker.py transcribes it.

Both sides of an iteration get the same VGG19 weights (random, He-normal:
vgg.init_params), the same preprocessed content, style copies and starting
image (raw float32 files in a temporary folder), the same L-BFGS history
size, and run their warm-up steps before the timing; torch's history is
then filled (see _torch_worker.py) so that both run the two-loop recursion
over a full history. The pystiche transcription takes its patches on the
stride grid, ours on the stride-plus-tail grid of the reference; the
patch counts of both are printed.

Each figure is the median over --repeats of one call, printed one per line
with its unit, and the ratio torch / ours (above 1: ours is faster)
against the faster torch memory format, with the median of the per-round
ratios (a burst of load hits both sides of a round alike).

torch is never a dependency of cnnmrf_jax: it runs in its own virtual
environment, in a subprocess speaking JSON lines, with as many threads as
cores. --torch_python points at that environment's python; without it the
script creates --torch_venv (CPU torch pinned to --torch_version; an
unpinned torch pulls a CUDA build) on first use. --notorch times ours only.

    python benchmarks/bench_peers.py                       # everything
    python benchmarks/bench_peers.py --sizes 384 --benches mrf1 gatys \\
        --repeats 3
    python benchmarks/bench_peers.py --benches vgg --convs xla winograd
    python benchmarks/bench_peers.py --benches mrf1 mrf9 \\
        --matchings matmul winograd    # the exact scan's forms, same rounds
    python benchmarks/bench_peers.py --torch_python /work/torch_venv/bin/python
    python benchmarks/bench_peers.py --notorch --sizes 256

The `bench` extra of setup.py pins the same torch for a venv made by hand:
  python3 -m venv /work/torch_venv && /work/torch_venv/bin/pip install \
      torch==2.13.0
"""

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from cnnmrf_jax import augment
from cnnmrf_jax import config as config_lib
from cnnmrf_jax import conv as conv_lib
from cnnmrf_jax import image_io
from cnnmrf_jax import patches as patches_lib
from cnnmrf_jax import plan as plan_lib
from cnnmrf_jax import synthesize
from cnnmrf_jax import targets as targets_lib
from cnnmrf_jax import terms
from cnnmrf_jax import vgg

_WORKER = _ROOT / "benchmarks" / "_torch_worker.py"
_TORCH_PIN = "2.13.0"  # the CPU wheel; keep in step with setup.py's bench
_DEFAULT_VENV = pathlib.Path.home() / ".cache" / "cnnmrf_jax" / "torch_venv"
_BENCHES = ("vgg", "mrf1", "mrf9", "gatys")
_FORMATS = ("nchw", "nhwc")


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 384, 512])
  parser.add_argument("--benches", nargs="+", default=list(_BENCHES),
                      choices=_BENCHES)
  parser.add_argument("--convs", nargs="+", default=["xla", "matmul",
                                                     "winograd"],
                      choices=conv_lib.CONVS, help="the vgg bench's methods")
  parser.add_argument("--conv", default="auto", choices=conv_lib.CONVS,
                      help="our convolutions in the iteration benches")
  parser.add_argument("--matchings", nargs="+", default=["exact"],
                      choices=["exact", *patches_lib.MATCHINGS],
                      help="our --matching in the MRF benches; several are "
                      "timed in the same rounds")
  parser.add_argument("--layer", default="relu4_2")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pause", type=float, default=0.5,
                      help="seconds of idle before each timed call")
  parser.add_argument("--warmup", type=int, default=2,
                      help="iterations each side runs before the timing")
  parser.add_argument("--compilation_cache", default="",
                      help="a folder keeping our compiled programs for "
                      "reruns (the --compilation_cache of a run)")
  parser.add_argument("--content", default="example:astronaut")
  parser.add_argument("--style", default="example:coffee")
  parser.add_argument("--torch_formats", nargs="+", default=list(_FORMATS),
                      choices=_FORMATS,
                      help="torch memory formats the iterations run in")
  parser.add_argument("--torch", dest="torch", action="store_true",
                      default=True)
  parser.add_argument("--notorch", dest="torch", action="store_false")
  parser.add_argument("--torch_python", default=None,
                      help="python of a venv with torch installed")
  parser.add_argument("--torch_venv", default=str(_DEFAULT_VENV),
                      help="venv created when --torch_python is not given")
  parser.add_argument("--torch_version", default=_TORCH_PIN)
  args = parser.parse_args(argv)
  vgg.check_layers([args.layer], flag="layer")
  if args.repeats < 1 or args.warmup < 1 or any(s < 64 for s in args.sizes):
    parser.error("--repeats and --warmup must be >= 1 and --sizes >= 64")
  if args.torch_python and not os.access(args.torch_python, os.X_OK):
    parser.error(f"--torch_python: {args.torch_python} is not an executable")
  return args


def _settle(args: argparse.Namespace) -> None:
  """Waits --pause seconds before a timed call: the previous call's thread
  pool (torch's OpenMP threads, XLA's Eigen threads) may still spin on the
  cores for a moment after it returns, which would tax whichever side runs
  next in the round."""
  time.sleep(args.pause)


def _torch_python(args: argparse.Namespace) -> str:
  """The python of torch's venv, created with pinned CPU torch if needed."""
  if args.torch_python:
    return args.torch_python
  venv = pathlib.Path(args.torch_venv)
  python = venv / "bin" / "python"
  if not python.exists():
    print(f"creating {venv} with torch=={args.torch_version}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q",
                    f"torch=={args.torch_version}"], check=True)
  return str(python)


class _TorchWorker:
  """benchmarks/_torch_worker.py in a subprocess, one JSON line each way."""

  def __init__(self, python: str):
    self.process = subprocess.Popen(
        [python, str(_WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)

  def ask(self, **request) -> dict:
    self.process.stdin.write(json.dumps(request) + "\n")
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError("the torch worker exited; see its stderr above")
    answer = json.loads(line)
    if "error" in answer:
      raise RuntimeError(f"torch worker: {answer['error']}")
    return answer

  def close(self) -> None:
    self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    self.process.stdin.flush()
    self.process.wait(timeout=60)


# --------------------------------------------------------------------------
# The VGG's value and gradient.


def _our_step(method: str, layer: str, size: int):
  """A zero-argument callable running one value-and-grad, compiled."""
  # The kernels' forms for `method` are made once, as a synthesis would.
  params = vgg.prepare_params(
      jax.tree.map(jnp.asarray, vgg.init_params("vgg19")), method,
      layers=[layer])
  model = vgg.VGG(conv=method)

  def loss(params, image):
    features = model.apply({"params": params}, image, outputs=[layer])
    return jnp.sum(features[layer])

  step = jax.jit(jax.value_and_grad(loss, argnums=1))
  # A preprocessed-image scale (Caffe convention: about +-128).
  image = 64.0 * jax.random.normal(jax.random.key(0), (1, size, size, 3))
  result = jax.block_until_ready(step(params, image))

  def run() -> float:
    start = time.perf_counter()
    jax.block_until_ready(step(params, image))
    return time.perf_counter() - start
  return run, result


def _differences(ours, ref) -> str:
  """Max abs and max abs / max |ref| of value and gradient vs the ref."""
  parts = []
  for what, a, b in (("value", ours[0], ref[0]), ("grad", ours[1], ref[1])):
    diff = float(jnp.max(jnp.abs(a - b)))
    parts.append(f"{what} max abs {diff:.3g} rel "
                 f"{diff / float(jnp.max(jnp.abs(b))):.3g}")
  return ", ".join(parts)


def _flops(layer: str, size: int) -> float:
  """Multiply-adds x 2 of the forward convolutions up to `layer`, x 2 for
  the input gradient (the weights get none)."""
  names = vgg.layer_names()
  shapes = vgg.conv_shapes()
  total, side = 0.0, size
  for name in names[:names.index(layer) + 1]:
    if name.startswith("pool"):
      side = -(-side // 2)
    elif name.startswith("conv"):
      _, _, c_in, c_out = shapes[name]["kernel"]
      grad = 0 if name == "conv1_1" else 1  # no gradient below the image
      total += 2.0 * side * side * 9 * c_in * c_out * (1 + grad)
  return total


def _bench_vgg(args, size, worker) -> None:
  runners, results = {}, {}
  for method in args.convs:
    start = time.perf_counter()
    runners[f"ours_{method}"], results[method] = _our_step(
        method, args.layer, size)
    print(f"{size}px compile+first ours_{method}: "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    if "xla" in results and method != "xla":
      print(f"{size}px ours_{method} vs ours_xla: "
            f"{_differences(results[method], results['xla'])}", flush=True)
  keys = []
  if worker is not None:
    for channels_last in (False, True):
      key = worker.ask(cmd="setup", size=size, layer=args.layer,
                       channels_last=channels_last)["key"]
      keys.append(key)
      name = "torch_" + ("nhwc" if channels_last else "nchw")
      runners[name] = (
          lambda key=key: worker.ask(cmd="time", key=key)["seconds"])
      runners[name]()  # warm-up
  times = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, run in runners.items():
      _settle(args)
      times[name].append(run())
  medians = {name: statistics.median(t) for name, t in times.items()}
  flops = _flops(args.layer, size)
  torch_best = min((t for n, t in medians.items()
                    if n.startswith("torch")), default=None)
  for name, seconds in medians.items():
    line = (f"{size}px {args.layer} value+grad {name}: "
            f"{seconds * 1e3:.1f} ms ({flops / seconds / 1e9:.0f} GFLOP/s"
            f" of direct convolution)")
    if torch_best is not None and name.startswith("ours"):
      line += f", torch_best/ours {torch_best / seconds:.2f}x"
    print(line, flush=True)
  for key in keys:
    worker.ask(cmd="drop", key=key)


# --------------------------------------------------------------------------
# Whole iterations.


def _config(bench: str, size: int, args,
            matching: str = "exact") -> config_lib.Config:
  """One level of the reference settings (configs/transfer.flags or
  configs/gatys.flags) at `size`, the level the benchmark times."""
  common = dict(max_size=size, num_res=1, num_iter=(1,), conv=args.conv,
                tile_size="0", check_memory=False, history_size=25,
                content_image=args.content, style_image=(args.style,),
                content_layers=("relu4_2",), tv_weight=1e-3,
                optimizer="lbfgs", compilation_cache=args.compilation_cache)
  if bench == "gatys":
    return config_lib.Config(
        mode="gatys", style_layers=("relu1_1", "relu2_1", "relu3_1",
                                    "relu4_1", "relu5_1"),
        style_weight=100.0, content_weight=5.0, init="noise", **common)
  augment_steps = {"mrf1": 0, "mrf9": 1}[bench]
  return config_lib.Config(
      mode="transfer", mrf_layers=("relu3_1", "relu4_1"), mrf_weight=(1e-4,),
      patch_size=3, style_stride=2, synth_stride=2,
      num_rotations=augment_steps, num_scales=augment_steps,
      confidence_threshold=0.0, content_weight=20.0, matching=matching,
      **common)


def _nchw(rgb: np.ndarray) -> np.ndarray:
  """[H, W, 3] RGB in [0, 1] -> [1, 3, H, W] preprocessed (Caffe)."""
  x = np.asarray(vgg.preprocess(np.asarray(rgb, np.float32), "caffe"))
  return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)


def _write(folder: pathlib.Path, name: str, array: np.ndarray) -> dict:
  path = folder / f"{name}.f32"
  np.ascontiguousarray(array, np.float32).tofile(path)
  return {"path": str(path), "shape": list(array.shape)}


def _write_weights(folder: pathlib.Path, params) -> str:
  """Every conv's kernel (OIHW, torch's layout) and bias, in layer order."""
  path = folder / "vgg19.f32"
  with open(path, "wb") as f:
    for name in vgg.conv_shapes():
      kernel = np.asarray(params[name]["kernel"], np.float32)
      f.write(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)).tobytes())
      f.write(np.asarray(params[name]["bias"], np.float32).tobytes())
  return str(path)


class _Ours:
  """One compiled update of our solver at the level, chained."""

  def __init__(self, config, params):
    self.synth = synthesize.Synthesizer(config, params=params,
                                        convention="caffe")
    self.inputs = synthesize.load_inputs(config)
    self.plan = plan_lib.make(config, self.inputs.sizes())
    self.level = self.plan.levels[-1]
    self.synth.set_tiling(self.level.size, None)
    self.targets = jax.block_until_ready(targets_lib.level_targets(
        config, self.plan, self.level, self.inputs, self.synth.features))
    self.x0 = targets_lib.initial_images(config, self.inputs,
                                         self.level.size, "caffe")
    self.x = self.x0
    self.state = jax.block_until_ready(self.synth.init(self.x, self.targets))

  def __call__(self) -> float:
    start = time.perf_counter()
    self.x, self.state = jax.block_until_ready(
        self.synth.update(self.x, self.state, self.targets))
    return time.perf_counter() - start

  def loss(self) -> float:
    return float(np.sum(self.synth.value(self.state)))

  def patch_counts(self, config) -> dict:
    """{layer: [synthesis patches, bank patches]} of the MRF term."""
    counts = {}
    for layer in config.mrf_layers:
      h, w = self.synth.features(np.zeros(self.level.size + (3,),
                                          np.float32))[layer].shape[:2]
      counts[layer] = [patches_lib.num_patches(h, w, config.patch_size,
                                               config.synth_stride),
                       int(self.targets["mrf"][layer].patches.shape[1])]
    return counts

  def torch_inputs(self, config, folder: pathlib.Path) -> dict:
    """The same images for the torch side: content, start, style(s)."""
    size = self.level.size
    content = image_io.resize(self.inputs.contents[0], *size, method="torch")
    out = {"content": _write(folder, "content", _nchw(content)),
           "init": _write(folder, "init", np.asarray(
               self.x0[0]).transpose(2, 0, 1)[None])}
    styles = [np.asarray(image_io.resize(s, *z, method="torch"))
              for s, z in zip(self.inputs.styles[0], self.level.styles[0])]
    if config.mode == "gatys":
      out["style"] = _write(folder, "style", _nchw(styles[0]))
      return out
    copies = [c for s in styles for c in augment.augment_style(
        s, num_rotations=config.num_rotations, num_scales=config.num_scales)]
    out["styles"] = [_write(folder, f"style{i}", _nchw(c))
                     for i, c in enumerate(copies)]
    return out


def _bench_iteration(bench, size, args, worker, params, weights_path,
                     folder) -> None:
  label = f"{size}px {bench}"
  # One of ours per --matchings (the MRF benches), timed in the same rounds.
  matchings = args.matchings if bench != "gatys" else ["exact"]
  runners = {}
  for matching in matchings:
    config = _config(bench, size, args, matching)
    name = "ours" if len(matchings) == 1 else f"ours_{matching}"
    start = time.perf_counter()
    ours = runners[name] = _Ours(config, params)
    for _ in range(args.warmup):
      ours()
    described = (f", matching {terms.chunk_kwargs(config)['matching']}"
                 if bench != "gatys" else "")
    print(f"{label} {name} ({ours.level.size[0]}x{ours.level.size[1]}, "
          f"conv={conv_lib.resolve(config.conv)}{described}): targets, "
          f"compile and {args.warmup} warm-up iterations "
          f"{time.perf_counter() - start:.1f} s", flush=True)
  keys = []
  if worker is not None:
    images = ours.torch_inputs(config, folder)
    request = dict(images, weights=weights_path, history=config.history_size,
                   warmup=args.warmup, tv_weight=config.tv_weight,
                   content_layer=config.content_layers[0],
                   content_weight=config.content_weight)
    if bench == "gatys":
      request.update(cmd="setup_gatys", style_layers=config.style_layers,
                     style_weight=config.style_weight)
    else:
      request.update(cmd="setup_mrf", mrf_layers=config.mrf_layers,
                     mrf_weight=config.mrf_weight[0],
                     patch_size=config.patch_size, stride=config.synth_stride)
    for fmt in args.torch_formats:
      start = time.perf_counter()
      answer = worker.ask(channels_last=fmt == "nhwc", **request)
      keys.append(answer["key"])
      runners[f"torch_{fmt}"] = (
          lambda key=answer["key"]: worker.ask(cmd="step", key=key))
      print(f"{label} torch_{fmt}: targets and {args.warmup} warm-up "
            f"iterations {time.perf_counter() - start:.1f} s, history "
            f"filled to {answer['history_filled']}, loss "
            f"{answer['warmup_loss']:.4g}", flush=True)
      if "patches" in answer:
        print(f"{label} patches (synthesis, style bank): ours "
              f"{ours.patch_counts(config)}, torch {answer['patches']}",
              flush=True)
  times = {name: [] for name in runners}
  losses = {}
  for _ in range(args.repeats):
    for name, run in runners.items():
      _settle(args)
      out = run()
      if isinstance(out, dict):
        times[name].append(out["seconds"])
        losses[name] = out["loss"]
      else:
        times[name].append(out)
  ours_names = [name for name in runners if name.startswith("ours")]
  for name in ours_names:
    losses[name] = runners[name].loss()
  medians = {name: statistics.median(t) for name, t in times.items()}
  for name, seconds in medians.items():
    print(f"{label} {name}: {seconds:.3f} s / iteration (rounds "
          f"{' '.join(f'{t:.3f}' for t in times[name])} s; loss after "
          f"{losses[name]:.4g}, finite {np.isfinite(losses[name])})",
          flush=True)
  torch_names = [n for n in medians if n.startswith("torch")]
  if torch_names:
    best = min(torch_names, key=medians.get)
    for name in ours_names:
      per_round = statistics.median(
          t / o for t, o in zip(times[best], times[name]))
      print(f"{label} ratio {best} / {name}: "
            f"{medians[best] / medians[name]:.2f}x (per-round median "
            f"{per_round:.2f}x)", flush=True)
  for key in keys:
    worker.ask(cmd="drop", key=key)


def _load() -> str:
  try:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
  except OSError:
    return "load average n/a"


def main(argv=None) -> None:
  args = _parse_args(argv)
  print("command: python " + " ".join(
      shlex.quote(a) for a in [sys.argv[0]] + (argv or sys.argv[1:])))
  print(f"jax {jax.__version__} backend {jax.default_backend()}, "
        f"{os.cpu_count()} cpus; auto -> "
        f"{conv_lib.resolve('auto')}; {_load()}", flush=True)
  worker = _TorchWorker(_torch_python(args)) if args.torch else None
  params = vgg.init_params("vgg19")
  start = time.perf_counter()
  try:
    with tempfile.TemporaryDirectory() as tmp:
      folder = pathlib.Path(tmp)
      weights_path = _write_weights(folder, params)
      for size in args.sizes:
        for bench in args.benches:
          if bench == "vgg":
            _bench_vgg(args, size, worker)
          else:
            _bench_iteration(bench, size, args, worker, params, weights_path,
                             folder)
          print(f"{size}px {bench} done at {time.perf_counter() - start:.0f}"
                f" s; {_load()}", flush=True)
  finally:
    if worker is not None:
      worker.close()


if __name__ == "__main__":
  main()
