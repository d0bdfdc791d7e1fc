"""Logical-axis sharding: one rules table, (data, fsdp, tensor) meshes, parameter / batch / activation shardings.

Weights carry logical axis names in their `nnx.Param(..., axes=(...))` metadata (see `models.layers`); activations
are annotated with `constrain(x, (logical axes))` inside the model. `RULES` maps both to mesh axes, MaxText-style:

    batch -> (data, fsdp)       embed -> fsdp       vocab / mlp / heads / kv_heads -> tensor     the rest replicated

    mesh = make_mesh(MeshConfig(ici_data=2, ici_fsdp=4))   # -1 fills the remaining devices (at most one -1)
    params = shard_params(mesh, params)                      # NamedSharding per leaf from the rules
    with jax.set_mesh(mesh):                                 # activation constraints are active inside
        loss = jax.jit(loss_fn, ...)(params, jax.device_put(batch, batch_sharding(mesh)), ...)

A weight dimension the mapped mesh axes do not divide raises ValueError (naming the parameter, axis and sizes)
before anything compiles; activation constraints on a non-dividing dimension are simply left out.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from latent_jax.config import check_keys

MESH_AXES = ("data", "fsdp", "tensor")
# logical axis -> mesh axes (in order). Weight axes are those the model declares; act_* are activations.
RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("tensor",), "embed": ("fsdp",), "mlp": ("tensor",), "heads": ("tensor",), "kv_heads": ("tensor",),
    "head_dim": (), "norm": (), "layers": (),
    "batch": ("data", "fsdp"), "length": (), "act_embed": (), "act_mlp": ("tensor",), "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",), "act_vocab": ("tensor",),
}
ACT_BTD = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape: ici_* = devices within a slice / host group, dcn_* = across slices (hybrid mesh). -1 fills
    the remaining devices (at most one -1). ici_data None: -1 unless another axis is -1 (then 1), so the default
    is pure data parallelism over every device and {"ici_fsdp": -1} is pure FSDP."""

    ici_data: int | None = None
    ici_fsdp: int = 1
    ici_tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        if self.ici_data is None:
            others = [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ici_data"]
            object.__setattr__(self, "ici_data", 1 if -1 in others else -1)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"MeshConfig.{f.name}={v!r} must be an integer >= 1, or -1 (fill)")
        fills = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) == -1]
        if len(fills) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1 (fill), got {fills}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "MeshConfig" | None) -> "MeshConfig":
        if isinstance(d, MeshConfig):
            return d
        check_keys(cls, d or {}, "mesh config key(s)")
        return cls(**(d or {}))

    def resolve(self, n_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ici shape, dcn shape) over (data, fsdp, tensor) with the -1 filled in for `n_devices` devices."""
        sizes = [self.ici_data, self.ici_fsdp, self.ici_tensor, self.dcn_data, self.dcn_fsdp, self.dcn_tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ValueError(f"mesh {self._describe(sizes)}: the fixed axes ({known} devices) do not divide the"
                                 f" {n_devices} devices")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(f"mesh {self._describe(sizes)} needs {math.prod(sizes)} devices, but {n_devices} are"
                             " available")
        return tuple(sizes[:3]), tuple(sizes[3:])

    @staticmethod
    def _describe(sizes) -> str:
        return "data×fsdp×tensor = ici {}×{}×{} · dcn {}×{}×{}".format(*sizes)


def make_mesh(cfg: MeshConfig | dict | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) of `cfg` over `devices` (default: all). dcn > 1: hybrid mesh
    (slices on TPU, processes elsewhere), the dcn axes outermost."""
    cfg = MeshConfig.from_dict(cfg)
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = cfg.resolve(len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) == 1:
        return jax.make_mesh(ici, MESH_AXES, axis_types=auto, devices=devices)
    from jax.experimental import mesh_utils

    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    granule = n_slices < math.prod(dcn)  # fewer (TPU) slices than dcn groups: one granule per process
    try:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"cannot build the hybrid mesh ici {ici} × dcn {dcn} over {len(devices)} devices: {e}") from e
    return Mesh(arr, MESH_AXES, axis_types=auto)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int], *,
                 strict: bool = True, name: str = "array", rules: dict[str, tuple[str, ...]] = RULES) -> PartitionSpec:
    """PartitionSpec of an array with logical `axes`. strict: a mesh size that does not divide its dimension (or an
    unknown axis name) raises ValueError; otherwise that dimension stays replicated."""
    if len(axes) != len(shape):
        raise ValueError(f"{name}: {len(axes)} logical axes {tuple(axes)} for a {len(shape)}-d array {tuple(shape)}")
    used, spec = set(), []
    for logical, dim in zip(axes, shape):
        if logical is not None and logical not in rules:
            if strict:
                raise ValueError(f"{name}: unknown logical axis {logical!r}; the rules know {sorted(rules)}")
            logical = None
        mesh_axes = tuple(a for a in rules.get(logical, ()) if a in mesh_shape and a not in used)
        size = math.prod(mesh_shape[a] for a in mesh_axes)
        if dim % size:
            if strict:
                raise ValueError(f"{name}: axis {logical!r} has size {dim}, not divisible by mesh axes {mesh_axes} of"
                                 f" size {size} (mesh {dict(mesh_shape)})")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """NamedSharding per leaf of `tree` (params, optimizer state, gradients; arrays or ShapeDtypeStructs): an
    nnx.Variable with `axes` metadata by the rules, anything else replicated. Same tree structure as `tree`."""
    mesh_shape = dict(mesh.shape)

    def one(path, x):
        if _is_var(x):
            axes = x.get_metadata().get("axes")
            if axes is None:
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            spec = logical_spec(axes, x.shape, mesh_shape, name=f"param {jax.tree_util.keystr(path)}")
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_var)


param_shardings = tree_shardings


def put(tree: Any, shardings: Any) -> Any:
    """device_put onto `shardings` (same structure); works across processes (each host holds the full value)."""
    def one(x, s):
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def shard_params(mesh: Mesh, params: Any) -> Any:
    """`params` (or any tree of arrays with `axes` metadata) placed on `mesh` by the rules."""
    return put(params, tree_shardings(mesh, params))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays: first (batch) axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in RULES["batch"] if a in mesh.shape)))


def check_batch(mesh: Mesh, global_batch: int) -> None:
    n = math.prod(mesh.shape[a] for a in RULES["batch"] if a in mesh.shape)
    if global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by the mesh's batch axes (data×fsdp = {n},"
                         f" mesh {dict(mesh.shape)})")


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by the rules when a mesh with our axes is active (`jax.set_mesh`), else x."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) & set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, dict(mesh.shape), strict=False))


def jit_sharded(fn: Callable, mesh: Mesh, in_kinds: Sequence[str | None], out_kinds: Sequence[int | str], *,
                static_argnames: Sequence[str] = (), donate_argnums: Sequence[int] = ()) -> Callable:
    """jax.jit of `fn(*args, **static)` with in/out shardings on `mesh`, traced and run with the mesh active.
    in_kinds, one per positional argument: "tree" (by the rules), "batch" (batch_sharding) or None (unspecified);
    out_kinds, one per output: the index of the argument whose sharding it gets, or "replicated". The jit is built
    once per structure of the "tree" arguments."""
    cache: dict[Any, Callable] = {}
    rep = NamedSharding(mesh, PartitionSpec())

    def call(*args, **static):
        key = tuple(jax.tree.structure(a) for a, k in zip(args, in_kinds) if k == "tree")
        if key not in cache:
            ins = tuple(tree_shardings(mesh, a) if k == "tree" else batch_sharding(mesh) if k == "batch" else None
                        for a, k in zip(args, in_kinds))
            outs = tuple(rep if k == "replicated" else ins[k] for k in out_kinds)
            cache[key] = jax.jit(fn, in_shardings=ins, out_shardings=outs, static_argnames=tuple(static_argnames),
                                 donate_argnums=tuple(donate_argnums))
        with jax.set_mesh(mesh):
            return cache[key](*args, **static)

    call.jitted = cache  # for tests: the compiled variants
    return call


class Placement:
    """Where the trainer's state and batches live.

    mesh None: data parallel over all devices when the global micro-batch divides evenly (params replicated, batch
    split on its first axis), else everything on one device (single process only).
    mesh (`latent_jax.sharding.MeshConfig` keys, e.g. {"ici_fsdp": -1}): a (data, fsdp, tensor) mesh; params,
    optimizer state and gradients are sharded by the logical-axis rules, batches over (data, fsdp). `self.mesh` is
    then that Mesh (None otherwise), for `trainer.make_steps`."""

    def __init__(self, global_batch: int, mesh: Any = None):
        self.mesh = None
        if mesh is not None:
            self.mesh = make_mesh(MeshConfig.from_dict(mesh))
            check_batch(self.mesh, global_batch)
            self.replicated = NamedSharding(self.mesh, PartitionSpec())
            self.data = batch_sharding(self.mesh)
            return
        n = jax.device_count()
        if n > 1 and global_batch % n == 0:
            dp = Mesh(np.array(jax.devices()), ("data",))
            self.replicated = NamedSharding(dp, PartitionSpec())
            self.data = NamedSharding(dp, PartitionSpec("data"))
        elif jax.process_count() > 1:
            raise ValueError(f"batch_size * process_count = {global_batch} must be a multiple of the {n} devices"
                             " in multi-process training")
        else:
            self.replicated = self.data = SingleDeviceSharding(jax.local_devices()[0])

    def shardings(self, tree: Any) -> Any:
        """The sharding of every leaf of `tree` (same structure) as `tree()` places it."""
        if self.mesh is not None:
            return tree_shardings(self.mesh, tree)
        return jax.tree.map(lambda _: self.replicated, tree)

    def tree(self, tree: Any) -> Any:
        """A copy of `tree` on the devices (never aliases the input: the trainer donates its state)."""
        copy = jax.tree.map(jax.numpy.copy, tree)  # device_put may alias shard 0
        return put(copy, self.shardings(copy))

    def batch(self, batch) -> dict[str, jax.Array]:
        """A `layout.Batch`'s arrays on the devices, split over the data axes."""
        if jax.process_count() > 1:
            return {k: jax.make_array_from_process_local_data(self.data, a) for k, a in batch.arrays().items()}
        return jax.device_put(batch.arrays(), self.data)
