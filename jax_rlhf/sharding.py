"""Mesh, logical-axis rules and placement: the one place where mesh axis names appear.

Mesh axes are `('data', 'fsdp', 'model')`. `fsdp` shards parameters and optimizer state (ZeRO-3 style),
`model` is tensor parallelism, batches are split over `('data', 'fsdp')`. Parameters carry logical names
(`vocab`, `embed`, `mlp`, `heads`, `kv`, `norm`, `layers`); one rules table maps each logical name to a mesh axis
(or None = replicated). A dimension that the mesh axis does not divide is replicated instead, so the same
rules serve 1 CPU, 8 fake CPU devices, a GPU or a TPU slice.

Activations: parameters are placed by their shardings, but nothing places the activations, and under fsdp the
SPMD partitioner may keep a layer's activations whole on every device and shard the matmul over the weights'
dims instead (Llama-3-8B PPO on 64 fsdp devices: 1.48 TiB of temporaries per device). `constrain(x, axes)`
pins an activation to logical axes (the model calls it on the residual stream at every block boundary with
('batch', None, None); the update loop on each gathered minibatch), so each device keeps its own rows and the
weights are gathered instead (36 GiB). It acts only under a context mesh (`jax.set_mesh`), which `mesh_jit`
sets around every call (and so every trace) of a stage's step functions; without one it is the identity. The
context is held only while a step is traced and run: nnx reads a context mesh when it builds abstract models
(`nnx.eval_shape` takes our logical names for mesh axes), so it must not be set while models are made.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'model')
BATCH_AXES = ('data', 'fsdp')

# logical name -> mesh axis (or None). Every logical name used by a parameter must appear here.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ('batch', BATCH_AXES),
    ('vocab', 'model'),
    ('embed', 'fsdp'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('kv', None),
    ('norm', None),
    ('layers', None),  # the stacked blocks' leading axis (TransformerConfig.scan_layers): never sharded
    ('lora', None),    # a LoRA adapter's rank axis (models.lora; r of 8-64 is too small to split)
)


def make_mesh(shape: dict[str, int] | Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh with Auto axes; one size may be -1 (= the remaining devices)."""
  if isinstance(shape, dict) or hasattr(shape, 'get'):
    shape = [int(shape.get(a, 1)) for a in MESH_AXES]
  shape = [int(s) for s in shape]
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape}: at most one axis may be -1')
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if n % known:
      raise ValueError(f'mesh shape {shape} does not divide the {n} devices')
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f'mesh shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {n}')
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> P:
  """PartitionSpec for a value of `shape` whose dims have logical names `axes`."""
  if not axes:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise KeyError(f'logical axis {name!r} has no sharding rule; rules cover {sorted(table)}')
    target = table[name]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and mesh.shape.get(t, 1) > 1)
    size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
    if not targets or dim % size:
      spec.append(None)
      continue
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else targets)
  return P(*spec)


def activation_mesh(mesh: Mesh):
  """Context manager (`jax.set_mesh`): `constrain` pins activations on this mesh's axes in the functions traced
  inside it. Not around model construction (see the module docstring)."""
  return jax.set_mesh(mesh)


class MeshJit:
  """A `jax.jit`-ed function that is traced, lowered and called under `activation_mesh(mesh)`. jit's cache
  keys on the context mesh, so a trace made elsewhere is never reused here."""

  def __init__(self, mesh: Mesh, fn, **jit_kwargs):
    self.mesh = mesh
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args, **kwargs):
    with activation_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with activation_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)

  def eval_shape(self, *args, **kwargs):
    with activation_mesh(self.mesh):
      return self.jitted.eval_shape(*args, **kwargs)


def mesh_jit(mesh: Mesh, fn, **jit_kwargs) -> MeshJit:
  """`jax.jit(fn, **jit_kwargs)` whose activations `constrain` pins on `mesh` (every stage's step functions)."""
  return MeshJit(mesh, fn, **jit_kwargs)


def constrain(x: jax.Array, axes: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
  """x under `with_sharding_constraint` to the logical `axes` (missing trailing axes: None = replicated), on the
  context mesh (`activation_mesh`). Identity without a context mesh, on one device, or when no named dimension
  is split by it (a batch the data x fsdp devices do not divide stays unconstrained, never gathered)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  axes = tuple(axes) + (None,) * (x.ndim - len(axes))
  spec = logical_to_spec(axes, x.shape, mesh, rules)
  if all(s is None for s in spec):
    return x
  return jax.lax.with_sharding_constraint(x, spec)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def shardings_of(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedSharding for every leaf of a (possibly abstract) pytree of nnx Variables and arrays.

  Variables with `out_sharding` logical names (parameters, and the optimizer moments optax builds
  from them, which keep the metadata) follow the rules; everything else (step counters, scalars) is
  replicated.
  """
  def one(x):
    if _is_var(x):
      axes = x.get_metadata().get('out_sharding')
      spec = logical_to_spec(axes, x.shape, mesh, rules) if axes else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=_is_var)


def unmatched_axes(tree: Any, rules=DEFAULT_RULES) -> set[str]:
  """Logical names used by parameters in `tree` that no rule covers (should be empty)."""
  names: set[str] = set()
  for x in jax.tree.leaves(tree, is_leaf=_is_var):
    if _is_var(x):
      names.update(a for a in (x.get_metadata().get('out_sharding') or ()) if a is not None)
  return names - set(dict(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over ('data', 'fsdp'), the rest replicated (valid for any rank >= 1)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(mesh: Mesh, global_rows: int) -> slice:
  """The rows of a global batch [global_rows, ...] that this process's devices hold (a contiguous block)."""
  idx = batch_sharding(mesh).addressable_devices_indices_map((global_rows,)).values()
  starts = sorted({i[0].indices(global_rows)[:2] for i in idx})
  lo, hi = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in starts) != hi - lo:
    raise ValueError(f'this process holds non-contiguous rows of the batch: {starts}')
  return slice(lo, hi)


def put_batch(batch: Any, mesh: Mesh, *, local: bool = False, batch_dim: int = 0) -> Any:
  """Place a host pytree of arrays on the mesh, dimension `batch_dim` (the batch) split over ('data', 'fsdp').

  Each process feeds only its own rows (`jax.make_array_from_process_local_data`): by default every process
  passes the same global batch and keeps `process_rows` of it; with `local=True` it passes just those rows
  (a loader that reads only its shard, e.g. `data.sources.GrainLoader`). Scalars are replicated.
  """
  lead = (None,) * batch_dim
  sharding = NamedSharding(mesh, P(*lead, BATCH_AXES))

  def put(x):
    x = np.asarray(x)
    if not x.ndim:
      return jax.make_array_from_callback(x.shape, replicated(mesh), lambda idx: x[idx])
    if local:
      return jax.make_array_from_process_local_data(sharding, x)
    rows = (slice(None),) * batch_dim + (process_rows(mesh, x.shape[batch_dim]),)
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)
  return jax.tree.map(put, batch)


def batch_divisor(mesh: Mesh) -> int:
  return int(mesh.shape['data'] * mesh.shape['fsdp'])


def to_host(x) -> np.ndarray:
  """A jax.Array as one numpy array, the same on every process: a value sharded over several processes'
  devices is gathered (`multihost_utils.process_allgather`); a process-local or replicated one is read."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
