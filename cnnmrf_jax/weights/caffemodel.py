"""Caffe .caffemodel files, decoded from the protobuf wire format.

A VGG caffemodel (e.g. VGG_ILSVRC_19_layers.caffemodel) is a NetParameter in
the new `layer` or the V1 `layers` form; each conv layer holds two
BlobProtos, weights [O, I, 3, 3] and bias [O]. Our own decoder walks the
fields without protobuf or caffe, and skips fc layers without decoding
their floats.
"""

import mmap
import os
import re
from typing import Any, Iterator, List, Tuple

import numpy as np

from cnnmrf_jax.weights import common

# Field numbers from caffe.proto.
_NET_LAYER, _NET_LAYERS_V1 = 100, 2
_LAYER_NAME, _LAYER_BLOBS = 1, 7  # LayerParameter
_V1_NAME, _V1_BLOBS, _V1_V0 = 4, 6, 1  # V1LayerParameter
_V0_NAME, _V0_BLOBS = 1, 50  # V0LayerParameter
_BLOB_DATA, _BLOB_SHAPE, _BLOB_DOUBLE = 5, 7, 8  # BlobProto
_BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
_UNPACKED_FLOAT_TAG = (_BLOB_DATA << 3) | 5
_CONV_NAME = re.compile(r"conv(\d+)_(\d+)$")


def _varint(buf, pos: int) -> Tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError(f"varint too long at offset {pos}")


def _field(buf, pos: int, end: int) -> Tuple[int, int, Any, int]:
  """Decodes one field at `pos`: (number, wire type, value, next pos).
  Varints come back as ints, everything else as a (start, stop) span."""
  key, pos = _varint(buf, pos)
  number, wire = key >> 3, key & 7
  if wire == 0:
    value, pos = _varint(buf, pos)
  elif wire == 1:
    value, pos = (pos, pos + 8), pos + 8
  elif wire == 2:
    length, pos = _varint(buf, pos)
    value, pos = (pos, pos + length), pos + length
  elif wire == 5:
    value, pos = (pos, pos + 4), pos + 4
  else:
    raise ValueError(f"unsupported wire type {wire} at offset {pos}")
  if pos > end:
    raise ValueError(f"field {number} runs past its message end {end} "
                     "(truncated file?)")
  return number, wire, value, pos


def _fields(buf, start: int, end: int) -> Iterator[Tuple[int, int, Any]]:
  pos = start
  while pos < end:
    number, wire, value, pos = _field(buf, pos, end)
    yield number, wire, value


def _packed_varints(buf, start: int, end: int) -> List[int]:
  values = []
  pos = start
  while pos < end:
    value, pos = _varint(buf, pos)
    values.append(value)
  return values


def _parse_blob(buf, start: int, end: int) -> np.ndarray:
  """A BlobProto -> float32 array shaped by `shape` or num/channels/h/w."""
  chunks = []
  legacy = {}
  dims = None
  pos = start
  while pos < end:
    tag_pos = pos
    number, wire, value, pos = _field(buf, pos, end)
    if number == _BLOB_DATA and wire == 5:
      # Unpacked floats: a run of 5-byte records (tag, float). Take the
      # whole run at once instead of one Python step per weight.
      count = (end - tag_pos) // 5
      tags = np.frombuffer(buf[tag_pos:tag_pos + 5 * count], np.uint8)[::5]
      bad = np.flatnonzero(tags != _UNPACKED_FLOAT_TAG)
      run = int(bad[0]) if bad.size else count
      records = np.frombuffer(buf[tag_pos:tag_pos + 5 * run], np.uint8)
      chunks.append(records.reshape(run, 5)[:, 1:].copy().view("<f4")
                    .reshape(-1))
      pos = tag_pos + 5 * run
    elif number == _BLOB_DATA and wire == 2:
      chunks.append(np.frombuffer(buf[value[0]:value[1]], "<f4").copy())
    elif number == _BLOB_DOUBLE and wire == 2:
      chunks.append(np.frombuffer(buf[value[0]:value[1]], "<f8")
                    .astype(np.float32))
    elif number == _BLOB_DOUBLE and wire == 1:
      chunks.append(np.frombuffer(buf[value[0]:value[1]], "<f8")
                    .astype(np.float32))
    elif number == _BLOB_SHAPE and wire == 2:
      dims = []
      for dim_number, dim_wire, dim in _fields(buf, *value):
        if dim_number == 1 and dim_wire == 2:
          dims += _packed_varints(buf, *dim)
        elif dim_number == 1 and dim_wire == 0:
          dims.append(dim)
    elif number in _BLOB_LEGACY_DIMS and wire == 0:
      legacy[number] = value
  data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
  if dims is None:
    dims = [legacy.get(n, 0) for n in _BLOB_LEGACY_DIMS]
  if int(np.prod(dims)) != data.size:
    raise ValueError(f"blob of shape {tuple(dims)} holds {data.size} values")
  return data.reshape(dims)


def _caffe_layers(buf, end: int) -> Iterator[Tuple[str, List[tuple]]]:
  """Yields (name, blob spans) for every layer in either encoding."""
  for number, wire, value in _fields(buf, 0, end):
    if wire != 2 or number not in (_NET_LAYER, _NET_LAYERS_V1):
      continue
    if number == _NET_LAYER:
      name_field, blob_field = _LAYER_NAME, _LAYER_BLOBS
    else:
      name_field, blob_field = _V1_NAME, _V1_BLOBS
    name, blobs = "", []
    for sub_number, sub_wire, sub in _fields(buf, *value):
      if sub_wire != 2:
        continue
      if sub_number == name_field:
        name = bytes(buf[sub[0]:sub[1]]).decode("utf-8", "replace")
      elif sub_number == blob_field:
        blobs.append(sub)
      elif number == _NET_LAYERS_V1 and sub_number == _V1_V0:
        # V0 layer nested in a V1 entry (the oldest Caffe files).
        for v0_number, v0_wire, v0 in _fields(buf, *sub):
          if v0_wire == 2 and v0_number == _V0_NAME:
            name = name or bytes(buf[v0[0]:v0[1]]).decode("utf-8", "replace")
          elif v0_wire == 2 and v0_number == _V0_BLOBS:
            blobs.append(v0)
    yield name, blobs


def _read_caffemodel_buffer(buf, where: Any) -> common.Converted:
  with common.reading(where, "Caffe model"):
    convs = {}
    for name, blob_spans in _caffe_layers(buf, len(buf)):
      match = _CONV_NAME.match(name)
      if not match or not blob_spans:
        continue  # fc, relu, pool, data layers.
      if len(blob_spans) != 2:
        raise common.WeightsError(
            f"{where}: layer {name} has {len(blob_spans)} "
            "blobs; expected weights and bias")
      weight, bias = (_parse_blob(buf, *span) for span in blob_spans)
      convs[(int(match[1]), int(match[2]))] = (
          common.oihw_to_hwio(weight, where, name), bias.reshape(-1))
  if not convs:
    raise common.WeightsError(
        f"{where}: no conv layers named like conv1_1 found; "
        "not a VGG caffemodel")
  params = {f"conv{b}_{i}": {"kernel": kernel, "bias": bias}
            for (b, i), (kernel, bias) in sorted(convs.items())}
  network = common.network_from_count(len(params), where)
  return params, network, "caffe"


def read_caffemodel(path: common.PathLike) -> common.Converted:
  """A Caffe VGG .caffemodel (new `layer` or V1 `layers` NetParameter;
  blobs [O, I, 3, 3] and bias) -> (params, network, 'caffe'). fc layers are
  skipped without decoding their ~120M floats."""
  with common.reading(path, "Caffe model"):
    with open(path, "rb") as f:
      if os.fstat(f.fileno()).st_size == 0:
        raise common.WeightsError(f"{path}: empty file")
      # Not closed explicitly: numpy views of it may outlive this call in
      # a traceback, and closing a mapping with live views raises. It goes
      # with its last reference; every array kept is a copy.
      mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _read_caffemodel_buffer(memoryview(mapped), path)

