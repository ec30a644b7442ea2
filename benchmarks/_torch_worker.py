"""PyTorch side of benchmarks/bench_peers.py, run in torch's own venv.

Reads one JSON request per line on stdin, answers one JSON line on stdout:

  {"cmd": "setup", "size": 384, "layer": "relu4_2", "channels_last": false}
      builds a VGG19 trunk (3x3 pad-1 convolutions, ReLU, 2x2 ceil-mode max
      pooling, the layer shapes of cnnmrf_jax.vgg) up to `layer`, random
      weights with requires_grad=False, and a [1, 3, size, size] input with
      requires_grad=True; answers {"ok": true, "key": ...}.
  {"cmd": "time", "key": ...}
      runs one forward to `layer`, the backward of the sum of that layer's
      activation to the input, and answers {"seconds": ...}.
  {"cmd": "setup_mrf", ...} / {"cmd": "setup_gatys", ...}
      one whole synthesis iteration as the PyTorch peers write it (below),
      on the weights, images and settings the request names (raw float32
      files, written by bench_peers.py: the same VGG weights and the same
      preprocessed images as our side); answers {"key": ..., "patches":
      ...} after the warm-up steps.
  {"cmd": "step", "key": ...}
      one `torch.optim.LBFGS(max_iter=1).step(closure)` of that setting:
      one closure (forward, losses, backward w.r.t. the image) and the
      L-BFGS direction and update; answers {"seconds": ..., "loss": ...}.
  {"cmd": "closure", "key": ...}
      that setting's closure alone (forward, losses, backward; no L-BFGS
      work), for profiling; answers {"seconds": ...}.
  {"cmd": "drop", "key": ...} frees a setting.
  {"cmd": "quit"}

The MRF iteration transcribes pystiche's li_wand_2016 (Meier & Lohweg,
pystiche; the authors' settings, impl_params=True): the encoder run once
to the deepest loss layer; per MRF layer (relu3_1, relu4_1) the input's
3x3 patches at stride 2 taken with Tensor.unfold (pystiche's
extract_patches2d), their cosine similarity to every target patch as one
matrix product of the normalised patches, argmax per input patch, the
chosen target patches gathered and the summed squared error to them; the
content loss at relu4_2 (mean squared error); a squared-difference total
variation; the weighted sum's backward to the image. The target patches
are extracted from every style copy's encoding at the same stride, once,
and normalised once (pystiche re-normalises them at every call; that work
is left out here, as our side does it once too).

The Gatys iteration transcribes neural-style-pt (ProGamerGov, the PyTorch
port of jcjohnson/neural-style): the net truncated after its last loss
layer (relu5_1), Gram matrices F F^T / numel on relu1_1..relu5_1 against
the style's, each style_weight * MSE; content relu4_2, content_weight *
MSE; TV as the sum of absolute differences times tv_weight.

Both use torch.optim.LBFGS(lr=1, max_iter=1, history_size=H,
tolerance_grad=-1, tolerance_change=-1), H the request's history (our
solver's), stepped once per iteration as pystiche does (neural-style-pt's
single step with max_iter=N runs the same per-iteration work). After the
warm-up steps the history is filled to H - 1 pairs (copies of the pairs
already there) so that every timed step does the two-loop recursion over
a full history, as our solver's fixed ring does.

Only torch is imported (no numpy), with torch.set_num_threads(os.cpu_count())
as the peer implementations run on CPU, and denormals flushed as XLA does.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

_BLOCKS = ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))


def _names():
  """VGG19 layer names in forward order, as cnnmrf_jax.vgg.layer_names."""
  names = []
  for block, (num_convs, _) in enumerate(_BLOCKS, start=1):
    for i in range(1, num_convs + 1):
      names += [f"conv{block}_{i}", f"relu{block}_{i}"]
    names.append(f"pool{block}")
  return names


def _trunk(layer: str) -> torch.nn.Sequential:
  """VGG19 conv/relu/pool modules up to and including `layer`."""
  modules = []
  in_channels = 3
  for block, (num_convs, channels) in enumerate(_BLOCKS, start=1):
    for i in range(1, num_convs + 1):
      modules.append(torch.nn.Conv2d(in_channels, channels, 3, padding=1))
      modules.append(torch.nn.ReLU(inplace=False))
      in_channels = channels
      if layer in (f"conv{block}_{i}", f"relu{block}_{i}"):
        if layer.startswith("conv"):
          modules.pop()
        return torch.nn.Sequential(*modules)
    modules.append(torch.nn.MaxPool2d(2, 2, ceil_mode=True))
    if layer == f"pool{block}":
      return torch.nn.Sequential(*modules)
  raise ValueError(f"unknown layer {layer!r}")


def _read(spec) -> torch.Tensor:
  """{"path": raw float32 file, "shape": [...]} -> a tensor."""
  with open(spec["path"], "rb") as f:
    data = bytearray(f.read())
  return torch.frombuffer(data, dtype=torch.float32).reshape(spec["shape"])


def _load_weights(model: torch.nn.Sequential, path: str) -> None:
  """The kernels (OIHW) and biases bench_peers.py wrote, conv by conv."""
  with open(path, "rb") as f:
    flat = torch.frombuffer(bytearray(f.read()), dtype=torch.float32)
  offset = 0
  for module in model:
    if isinstance(module, torch.nn.Conv2d):
      for tensor in (module.weight, module.bias):
        n = tensor.numel()
        with torch.no_grad():
          tensor.copy_(flat[offset:offset + n].reshape(tensor.shape))
        offset += n


class _Encoder:
  """The trunk to the deepest of `layers`; one pass returns those layers."""

  def __init__(self, layers, weights: str, channels_last: bool):
    names = _names()
    deepest = max(layers, key=names.index)
    self.model = _trunk(deepest).eval()
    _load_weights(self.model, weights)
    for parameter in self.model.parameters():
      parameter.requires_grad_(False)
    self.channels_last = channels_last
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    self.at = {names.index(l): l for l in layers}

  def prepare(self, image: torch.Tensor) -> torch.Tensor:
    if self.channels_last:
      return image.contiguous(memory_format=torch.channels_last)
    return image.contiguous()

  def __call__(self, image: torch.Tensor):
    out = {}
    # The optimised image stays NCHW-contiguous (torch's L-BFGS flattens
    # its gradient with view); channels-last starts at the first module.
    x = self.prepare(image)
    for index, module in enumerate(self.model):
      x = module(x)
      if index in self.at:
        out[self.at[index]] = x
    return out


def _patches(encoding: torch.Tensor, size: int, stride: int) -> torch.Tensor:
  """pystiche's extract_patches2d, flattened: [1, C, H, W] -> [P, C*k*k]."""
  channels = encoding.shape[1]
  patches = encoding.unfold(2, size, stride).unfold(3, size, stride)
  patches = patches.permute(0, 2, 3, 1, 4, 5)
  return patches.reshape(-1, channels * size * size)


def _normalise(patches: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
  return patches / torch.clamp(patches.norm(dim=-1, keepdim=True), min=eps)


def _lbfgs(image, history):
  return torch.optim.LBFGS([image], lr=1.0, max_iter=1,
                           history_size=history, tolerance_grad=-1,
                           tolerance_change=-1)


def _fill_history(optimizer, history: int) -> int:
  """Pads the L-BFGS history to history - 1 curvature pairs (copies of the
  ones there) so that the next steps run on a full history."""
  state = optimizer.state[optimizer._params[0]]  # pylint: disable=protected-access
  dirs = state.get("old_dirs") or []
  if not dirs:
    return 0
  stps, ro = state["old_stps"], state["ro"]
  k = 0
  while len(dirs) < history - 1:
    dirs.append(dirs[k].clone())
    stps.append(stps[k].clone())
    ro.append(ro[k].clone() if torch.is_tensor(ro[k]) else ro[k])
    k += 1
  if state.get("al") is None or len(state["al"]) < history:
    state["al"] = [None] * history
  return len(dirs)


class _Setting:
  """One iteration kind's image, optimiser and closure."""

  def __init__(self, image, closure, history, warmup, info):
    self.image = image
    self.closure = closure
    self.optimizer = _lbfgs(image, history)
    self.info = dict(info)
    for _ in range(max(1, warmup)):
      loss = self.optimizer.step(closure)
    self.info["history_filled"] = _fill_history(self.optimizer, history)
    self.info["warmup_loss"] = float(loss.detach())

  def step(self):
    start = time.perf_counter()
    loss = float(self.optimizer.step(self.closure).detach())
    return {"seconds": time.perf_counter() - start, "loss": loss}


def _setup_mrf(request) -> _Setting:
  """pystiche li_wand_2016's iteration (see the module docstring)."""
  mrf_layers = request["mrf_layers"]
  content_layer = request["content_layer"]
  size, stride = request["patch_size"], request["stride"]
  encoder = _Encoder(list(mrf_layers) + [content_layer], request["weights"],
                     request["channels_last"])
  with torch.no_grad():
    content = encoder(encoder.prepare(_read(request["content"])))
    content_target = content[content_layer].detach()
    banks = {layer: [] for layer in mrf_layers}
    for style in request["styles"]:
      encoding = encoder(encoder.prepare(_read(style)))
      for layer in mrf_layers:
        banks[layer].append(_patches(encoding[layer], size, stride))
    raw = {layer: torch.cat(b) for layer, b in banks.items()}
    normed = {layer: _normalise(b).t().contiguous()
              for layer, b in raw.items()}
  image = _read(request["init"]).clone().requires_grad_(True)
  mrf_weight = request["mrf_weight"]
  content_weight = request["content_weight"]
  tv_weight = request["tv_weight"]
  counts = {}

  def closure():
    image.grad = None
    encodings = encoder(image)
    loss = content_weight * F.mse_loss(encodings[content_layer],
                                       content_target)
    for layer in mrf_layers:
      patches = _patches(encodings[layer], size, stride)
      with torch.no_grad():
        similarity = torch.mm(_normalise(patches), normed[layer])
        indices = torch.argmax(similarity, dim=1)
      counts[layer] = [patches.shape[0], raw[layer].shape[0]]
      target = raw[layer][indices]
      loss = loss + mrf_weight * F.mse_loss(patches, target, reduction="sum")
    dy = image[:, :, 1:, :] - image[:, :, :-1, :]
    dx = image[:, :, :, 1:] - image[:, :, :, :-1]
    loss = loss + tv_weight * (torch.sum(dy * dy) + torch.sum(dx * dx))
    loss.backward()
    return loss

  setting = _Setting(image, closure, request["history"], request["warmup"],
                     {})
  setting.info["patches"] = counts
  return setting


def _setup_gatys(request) -> _Setting:
  """neural-style-pt's iteration (see the module docstring)."""
  style_layers = request["style_layers"]
  content_layer = request["content_layer"]
  encoder = _Encoder(list(style_layers) + [content_layer], request["weights"],
                     request["channels_last"])

  def gram(features):
    flat = features.reshape(features.shape[1], -1)
    return torch.mm(flat, flat.t()).div(features.nelement())

  with torch.no_grad():
    content_target = encoder(encoder.prepare(_read(request["content"])))[
        content_layer].detach()
    style = encoder(encoder.prepare(_read(request["style"])))
    gram_targets = {layer: gram(style[layer]) for layer in style_layers}
  image = _read(request["init"]).clone().requires_grad_(True)
  style_weight = request["style_weight"]
  content_weight = request["content_weight"]
  tv_weight = request["tv_weight"]

  def closure():
    image.grad = None
    dy = image[:, :, 1:, :] - image[:, :, :-1, :]
    dx = image[:, :, :, 1:] - image[:, :, :, :-1]
    loss = tv_weight * (torch.sum(torch.abs(dy)) + torch.sum(torch.abs(dx)))
    encodings = encoder(image)
    loss = loss + content_weight * F.mse_loss(encodings[content_layer],
                                              content_target)
    for layer in style_layers:
      loss = loss + style_weight * F.mse_loss(gram(encodings[layer]),
                                              gram_targets[layer])
    loss.backward()
    return loss

  return _Setting(image, closure, request["history"], request["warmup"], {})


def main() -> None:
  torch.set_num_threads(os.cpu_count())
  torch.set_flush_denormal(True)
  torch.manual_seed(0)
  setups, settings = {}, {}
  for line in sys.stdin:
    request = json.loads(line)
    if request["cmd"] == "quit":
      break
    try:
      answer = _answer(request, setups, settings)
    except Exception as e:  # pylint: disable=broad-except
      answer = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


def _answer(request, setups, settings) -> dict:
  """One request's answer (see the module docstring)."""
  cmd = request["cmd"]
  if cmd == "setup":
    model = _trunk(request["layer"]).eval()
    for parameter in model.parameters():
      parameter.requires_grad_(False)
    image = torch.randn(1, 3, request["size"], request["size"])
    if request.get("channels_last"):
      model = model.to(memory_format=torch.channels_last)
      image = image.contiguous(memory_format=torch.channels_last)
    image.requires_grad_(True)
    key = f"vgg{len(setups)}"
    setups[key] = (model, image)
    return {"ok": True, "key": key, "threads": torch.get_num_threads(),
            "torch": torch.__version__}
  if cmd == "time":
    model, image = setups[request["key"]]
    start = time.perf_counter()
    image.grad = None
    model(image).sum().backward()
    _ = float(image.grad[0, 0, 0, 0])  # the gradient exists and is read
    return {"seconds": time.perf_counter() - start}
  if cmd in ("setup_mrf", "setup_gatys"):
    setting = (_setup_mrf if cmd == "setup_mrf" else _setup_gatys)(request)
    key = f"it{len(settings)}"
    settings[key] = setting
    return dict(setting.info, key=key, threads=torch.get_num_threads(),
                torch=torch.__version__)
  if cmd == "step":
    return settings[request["key"]].step()
  if cmd == "closure":
    setting = settings[request["key"]]
    start = time.perf_counter()
    setting.closure()
    return {"seconds": time.perf_counter() - start}
  if cmd == "drop":
    settings.pop(request["key"], None)
    setups.pop(request["key"], None)
    return {"ok": True}
  return {"error": f"unknown command {cmd!r}"}


if __name__ == "__main__":
  main()
