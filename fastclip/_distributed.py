"""Global norms over torch.distributed: one fused local pass, then one
``all_reduce`` of a few scalars per process group.

Two ways gradients are spread over processes, which can be combined:

* DTensor gradients (FSDP2 ``fully_shard``, tensor parallel): each rank
  holds local shards. A tensor's full norm is the sum of its shards' power
  sums over the mesh dimensions that *shard* it; on the dimensions that
  *replicate* it every rank holds the same values, which must be counted
  once. The local power sums go into a small vector (one entry per class of
  tensors sharded on the same mesh dimensions, or one per tensor for
  per-tensor norms) that is all-reduced once per mesh dimension that shards
  anything; entries replicated on that dimension are kept only on the rank
  at coordinate 0 of it and zeroed elsewhere, so the sum counts them once,
  exactly. A tensor with ``Partial`` placements (a pending sum, average,
  maximum or minimum over some mesh dimensions) is measured by its
  reduction, all such tensors of a list in one float64 collective per
  mesh dimension, and each rank scales its own part.
* ``process_group=``: each rank holds a different part of the parameter
  list (data, pipeline or expert parallel pieces). The total is all-reduced
  over each group given, one after the other.

Orders 1 and 2 all-reduce float64 sums of the float64 local norms (order
2: their squares, also scaled down and up by 2^1200 in the same
collective, for norms whose squares leave the double range); inf all-reduces the
maximum with a NaN flag (MAX does not propagate NaN reliably in every
backend); any other order first all-reduces the maximum to scale by, so
that no power overflows, at the cost of a second all_reduce per group.
Nothing here reads a value back to the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._fallback import ratio_pow, root

__all__ = [
    "Sharding", "any_rank", "collective_device", "groups_of", "has_dtensor", "reduce_norms", "reduce_partials",
    "refuse_partial_clamp", "replicate_like", "unwrap",
]


def _dist():
    import torch.distributed as dist

    return dist


def _dtensor_type():
    """The DTensor class, or None when torch.distributed is unavailable."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


# ------------------------------------------------------------------ groups
def groups_of(process_group) -> list:
    """The process groups to reduce over, validated; [] for None."""
    if process_group is None:
        return []
    if not torch.distributed.is_available():
        raise RuntimeError("process_group was given but this torch build has no torch.distributed")
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but the default process group is not initialized; "
            "call torch.distributed.init_process_group first"
        )
    several = isinstance(process_group, (list, tuple))
    groups = list(process_group) if several else [process_group]
    if several and not groups:
        raise ValueError("process_group is an empty sequence; pass None for no reduction")
    for i, group in enumerate(groups):
        name = f"process_group[{i}]" if several else "process_group"
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group"
            )
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{name} must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
        if dist.get_rank(group) < 0:
            raise ValueError(f"{name}: this process (global rank {dist.get_rank()}) is not a member of the group")
    if len(groups) > 1:
        # Groups reduced in turn must meet in this process only: another
        # process in two of them would be counted twice (found in review).
        seen = {}
        for i, group in enumerate(groups):
            for rank in dist.get_process_group_ranks(group):
                if rank != dist.get_rank() and rank in seen:
                    raise ValueError(
                        f"process_group[{seen[rank]}] and process_group[{i}] both hold global rank {rank}: the "
                        "groups must share no process but this one (one per parallel dimension)"
                    )
                seen.setdefault(rank, i)
    return groups


def check_mesh_apart(sharding: Optional[Sharding], groups: list) -> None:
    """DTensor norms are reduced over their mesh already: a group holding
    another process of the mesh would count that process twice (found in
    review: FSDP2 gradients with the mesh's own group, or WORLD, as
    process_group gave sqrt(2) times the norm, and clipped by it). The same
    rule as between groups; every rank of such a setup sees the clash."""
    if sharding is None or not groups:
        return
    # Decided once per mesh and groups (reading the mesh's ranks took 30 us
    # a call in torch 2.13; found in review). The key's objects are kept
    # with the verdict, so that no id is reused meanwhile. Not while
    # tracing: torch 2.11's dynamo cannot take id() of a mesh (found running
    # the suite there), and the traced graph decides once anyway.
    if torch.compiler.is_compiling():
        clash = _mesh_clash(sharding.mesh, groups)
    else:
        key = (id(sharding.mesh), *map(id, groups))
        if key not in _MESH_CLASHES:
            _MESH_CLASHES[key] = (_mesh_clash(sharding.mesh, groups), sharding.mesh, tuple(groups))
        clash = _MESH_CLASHES[key][0]
    if clash is not None:
        i, rank = clash
        name = f"process_group[{i}]" if len(groups) > 1 else "process_group"
        raise ValueError(
            f"{name} holds global rank {rank}, which is in the DTensors' device mesh too: their "
            "norms are reduced over the mesh already and would count it twice; pass only the groups "
            "of the other parallel dimensions (none for FSDP2 or tensor parallelism alone)"
        )


_MESH_CLASHES: dict = {}


@torch.compiler.assume_constant_result
def _mesh_clash(mesh, groups: list) -> Optional[tuple[int, int]]:
    """(group index, global rank) of a process other than this one in the
    mesh and a group, or None. A constant to dynamo, which runs it when it
    traces (found in review: the mesh's ranks, read from its tensor, were
    data-dependent to it, and fullgraph failed on a fresh cache)."""
    dist = _dist()
    me = dist.get_rank()
    mesh_ranks = set(mesh.mesh.flatten().tolist())
    for i, group in enumerate(groups):
        for rank in dist.get_process_group_ranks(group):
            if rank != me and rank in mesh_ranks:
                return i, rank
    return None


def collective_device(groups: list) -> torch.device:
    """Where a rank with no local tensors keeps its (zero) contribution: a
    GPU where a group reduces CUDA tensors with NCCL (the others' gradients
    are there), its bound device if it has one, else the CPU."""
    index = _nccl_device(tuple(groups))
    if index is None:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if index < 0 else index)


@torch.compiler.assume_constant_result
def _nccl_device(groups: tuple) -> Optional[int]:
    """The CUDA device index of the first group whose backends include NCCL
    (-1: the current device), or None. From each group's backend config:
    a group made without a backend reports "undefined" as its backend
    (found in review; torch 2.13). A constant to dynamo."""
    dist = _dist()
    for group in groups:
        config = dist.get_backend_config(group) if hasattr(dist, "get_backend_config") else dist.get_backend(group)
        if "nccl" in str(config):
            bound = getattr(group, "bound_device_id", None)
            return bound.index if bound is not None and bound.type == "cuda" and bound.index is not None else -1
    return None


# ---------------------------------------------------------------- DTensors
@dataclass
class Sharding:
    """Where the local shards of a list of DTensors come from.

    ``keys[i]`` is the tuple of mesh dimensions that shard tensor ``i``;
    ``partial`` maps the index of each tensor with ``Partial`` placements
    to its ``((mesh dim, reduce op), ...)`` (empty for most lists).
    """

    mesh: object
    keys: list
    partial: dict = field(default_factory=dict)


def _placement_types() -> tuple[tuple, type, type]:
    """(the placement types that shard a mesh dimension, Replicate, Partial).

    ``_StridedShard`` (FSDP2's placement on the data-parallel dimension of
    tensor-parallel weights) is not a ``Shard`` subclass and its
    ``is_shard()`` is False, but its shards hold disjoint elements as
    ``Shard``'s do (found in review: it was counted as replicated, so the
    norm was wrong and differed between ranks).
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    shards: tuple = (Shard,)
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # a torch without it
        _StridedShard = None
    if _StridedShard is not None and not issubclass(_StridedShard, Shard):
        shards += (_StridedShard,)
    return shards, Replicate, Partial


def _element(name: str, i: int) -> str:
    """How an error names element ``i``: the parameter lists reach here as
    their non-None gradients, which is what ``i`` counts then."""
    return f"gradient {i} (counting non-None gradients)" if name == "parameters" else f"{name}[{i}]"


def has_dtensor(tensors: Sequence[Tensor]) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def unwrap(tensors: Sequence[Tensor], name: str = "tensors") -> tuple[list[Tensor], Optional[Sharding]]:
    """Local tensors and their sharding, or the tensors themselves and None."""
    if not has_dtensor(tensors):
        return list(tensors), None
    DTensor = _dtensor_type()
    # A DTensor's spec and local tensor, read as the slots they are: the
    # public properties cost ~1 us more per tensor (10 ms on 10,000
    # tensors); to_local() under no_grad returns the same local tensor.
    direct = {"_spec", "_local_tensor"} <= set(getattr(DTensor, "__slots__", ()))
    if direct and not torch.compiler.is_compiling():
        # The common list (DTensors on one mesh, no Partial) read in C++:
        # ~1 us per DTensor less, most of it hashing placements in Python.
        # Not while tracing: the C++ function is opaque to dynamo.
        from . import _ops

        shards, replicate, partial = _placement_types()
        items = tensors if isinstance(tensors, list) else list(tensors)
        fast = _ops.unwrap_dtensors(items, DTensor, shards, replicate, partial)
        if fast is not None:
            locals_, keys, mesh = fast
            if mesh.get_coordinate() is None:
                raise ValueError(f"{name}: this process is not part of the DTensors' device mesh {mesh}")
            return locals_, Sharding(mesh, keys)
    shards, replicate, _ = _placement_types()
    mesh = None
    locals_, keys, partial = [], [], {}
    # placements -> (sharded mesh dims, pending Partial reductions): lists
    # repeat a few placements. Not
    # while tracing: torch 2.6's dynamo cannot store under such keys.
    key_of: Optional[dict] = None if torch.compiler.is_compiling() else {}
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            raise ValueError(
                f"{_element(name, i)} is a plain tensor among DTensor gradients: pass plain tensors in a "
                "separate call (with process_group=) or make them DTensors on the same mesh"
            )
        if direct:
            spec = t._spec
            t_mesh, placements, local = spec.mesh, spec.placements, t._local_tensor
        else:
            t_mesh, placements, local = t.device_mesh, t.placements, t.to_local()
        if mesh is None:
            mesh = t_mesh
        elif t_mesh is not mesh and t_mesh != mesh:
            raise ValueError(
                f"{_element(name, i)} is a DTensor on mesh {t_mesh}, but {_element(name, 0)} is on {mesh}: "
                "clip the gradients of each mesh in its own call, or pass the other mesh's "
                "group through process_group"
            )
        # Keyed with the types too: a Partial subclass equals a Partial of
        # the same reduce op (found in review: one after a plain Partial was
        # taken from the cache, where alone it is refused).
        cache_key = (placements, *map(type, placements)) if key_of is not None else None
        known = key_of.get(cache_key) if key_of is not None else None
        if known is None:
            known = _placement_key(placements, shards, replicate, _element(name, i))
            if key_of is not None:
                key_of[cache_key] = known
        key, pending = known
        if pending:
            if local.is_complex() and pending[0][1] in ("max", "min"):
                raise ValueError(
                    f"{_element(name, i)} is a complex DTensor with placements {placements}: a maximum or minimum "
                    "of complex values is not defined; redistribute it to Shard or Replicate first"
                )
            partial[i] = pending
        locals_.append(local)
        keys.append(key)
    if mesh.get_coordinate() is None:
        raise ValueError(f"{name}: this process is not part of the DTensors' device mesh {mesh}")
    return locals_, Sharding(mesh, keys, partial)


# Partial reductions whose pending result scales with its summands (for a
# coefficient >= 0, as a clip's is), so each rank scales its own part. sum
# and avg are linear and commute; max and min commute with themselves only.
_LINEAR_PARTIALS = ("sum", "avg")
_PARTIAL_FAMILIES = {"sum": "sum", "avg": "sum", "max": "max", "min": "min"}


def _exactly(placement, cls: type) -> bool:
    """``type(placement) is cls``. While tracing, by the class's module and
    name: torch 2.12's dynamo cannot compare placement classes (found
    running the suite on 2.12.1)."""
    if torch.compiler.is_compiling():
        kind = type(placement)
        return kind.__qualname__ == cls.__qualname__ and kind.__module__ == cls.__module__
    return type(placement) is cls


def _reduce_op_of(placement) -> Optional[str]:
    """A Partial's reduce op as our own constant, or None for one fastclip
    does not take. Compared one by one: while tracing, torch 2.6's dynamo
    answers ``in`` on a dict wrongly for the placement's attribute, and
    2.11's cannot hash it (reduce_partials batches by it)."""
    for op in _PARTIAL_FAMILIES:
        if placement.reduce_op == op:
            return op
    return None


def _placement_key(placements, shards: tuple, replicate: type, what: str) -> tuple[tuple, tuple]:
    """(the mesh dims that shard a tensor, its ``((dim, reduce op), ...)``
    pending Partial reductions) for one placements tuple, validated."""
    from torch.distributed.tensor import Partial

    pending = []
    for d, p in enumerate(placements):
        if isinstance(p, shards + (replicate,)):
            continue
        # Exactly Partial: its subclasses (the norm's, the embedding's mask)
        # reduce otherwise, and a product does not scale with one summand.
        op = _reduce_op_of(p) if _exactly(p, Partial) else None
        if op is None:
            raise ValueError(
                f"{what} has a placement fastclip does not know, {p!r} (in {placements}): "
                "it cannot tell how its shards make up the tensor; redistribute it to "
                "Shard or Replicate first"
            )
        pending.append((d, op))
    if len({_PARTIAL_FAMILIES[op] for _, op in pending}) > 1:
        raise ValueError(
            f"{what} has placements {placements} that mix a sum with a maximum or minimum over "
            "different mesh dimensions: the result depends on their order; redistribute it first"
        )
    return tuple(d for d, p in enumerate(placements) if isinstance(p, shards)), tuple(pending)


def refuse_partial_clamp(sharding: Optional[Sharding], name: str) -> None:
    """Clamping each rank's summand of a pending sum does not clamp the sum
    (torch's DTensor refuses the in-place clamp too); a pending maximum or
    minimum commutes with a clamp, so each rank clamps its own part."""
    if sharding is None:
        return
    for i, pending in sharding.partial.items():
        if pending[0][1] in _LINEAR_PARTIALS:
            raise ValueError(
                f"{_element(name, i)} has a pending Partial({pending[0][1]}) reduction over mesh dimension "
                f"{pending[0][0]}: clamping each rank's part does not clamp their "
                f"{'sum' if pending[0][1] == 'sum' else 'average'}; redistribute it to Replicate "
                "(or Shard) first"
            )


def signed_parts(sharding: Optional[Sharding]) -> list[int]:
    """Indices of the tensors whose pending reduction (max or min) scales
    with its parts only for a coefficient >= 0."""
    if sharding is None:
        return []
    return [i for i, pending in sharding.partial.items() if pending[0][1] not in _LINEAR_PARTIALS]


def finished() -> None:
    """Nothing left to wait for (``reduce_partials``' ``finish`` when nothing runs)."""


def reduce_partials(locals_: list[Tensor], sharding: Optional[Sharding]):
    """``(tensors, finish)``: ``locals_`` with each tensor that has Partial
    placements replaced by its pending reduction, a flat float64
    (complex128) copy, so that their norms add up over the mesh as the
    others' do. One collective per mesh dim and kind of tensor for the
    whole list (torch's DTensor norm all-reduces each tensor alone).
    float64, so that parts whose sum leaves their dtype's range still give
    the finite norm the clip needs (the scaled parts are in range again).
    A pending sum runs in the background (gloo's thread, NCCL's stream)
    until ``finish()``: call it before reading a replaced entry, and
    before any other collective. Nothing else is read or written."""
    if sharding is None or not sharding.partial:
        return locals_, finished
    batches: dict = {}  # (pending reductions, device, dtype) -> indices
    for i, pending in sharding.partial.items():
        wide = torch.complex128 if locals_[i].is_complex() else torch.float64
        batches.setdefault((pending, locals_[i].device, wide), []).append(i)
    out = list(locals_)
    # dynamo traces only synchronous collectives (remapped to functional ones).
    background = not torch.compiler.is_compiling()
    flats = []  # (buffer, pending reductions, run in the background)
    for (pending, device, wide), indices in batches.items():
        sizes = [locals_[i].numel() for i in indices]
        # cat into a float64 buffer converts as it copies: 5 us a tensor on
        # the CPU, where converting each first and cat took 22 (10,000 tensors).
        flat = torch.empty(sum(sizes), dtype=wide, device=device)
        torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in (locals_[i] for i in indices)], out=flat)
        flats.append((flat, pending, background and pending[0][1] in _LINEAR_PARTIALS))
        for i, part in zip(indices, flat.split(sizes)):
            out[i] = part
    # The synchronous batches first: NCCL runs async_op collectives on the
    # group's own stream, which then overlaps no other communicator's work.
    for flat, pending, later in flats:
        if not later:
            _reduce_in_place(flat, pending, sharding.mesh, begun=False)
    started: list = []  # (work, buffer, pending) still running
    dist = _dist()
    for flat, pending, later in flats:
        if later:
            # A failure here leaves what started to complete on every rank;
            # nothing more is issued.
            started.append((dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=sharding.mesh.get_group(pending[0][0]),
                                            async_op=True), flat, pending))
    if not started:
        return out, finished

    def finish() -> None:
        # Batches in the order started, so that every rank issues the
        # later steps' collectives in the same order.
        try:
            while started:
                work, flat, pending = started[0]
                work.wait()
                del started[0]
                _reduce_in_place(flat, pending, sharding.mesh, begun=True)
        except BaseException:
            started.clear()  # a failed collective: issue nothing more on its communicators
            raise

    return out, finish


def _reduce_in_place(flat: Tensor, pending: tuple, mesh, begun: bool) -> None:
    """Apply the ``pending`` reductions to ``flat`` in place (its split
    views are the reduced entries); ``begun``: the first, a sum, is done."""
    for step, (dim, op) in enumerate(pending):
        group = mesh.get_group(dim)
        if op == "max":
            flat.copy_(_all_reduce(flat, True, group))
        elif op == "min":
            flat.copy_(_all_reduce(-flat, True, group).neg_())
        else:
            if not (begun and step == 0):
                _all_reduce(flat, False, group)
            if op == "avg":
                flat.div_(mesh.size(dim))


def replicate_like(total: Tensor, sharding: Sharding):
    """``total`` as a replicated DTensor on the mesh (what torch returns for DTensors)."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(total, sharding.mesh, [Replicate()] * sharding.mesh.ndim, run_check=False)


# --------------------------------------------------------------- reduction
def _all_reduce(values: Tensor, op_max: bool, group) -> Tensor:
    dist = _dist()
    if not op_max:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values
    # MAX with the NaN flags in the same buffer: one collective.
    # nan_to_num would also turn +-inf into the largest finite double: keep them.
    finite_nan = torch.nan_to_num(values, nan=0.0, posinf=math.inf, neginf=-math.inf)
    flagged = torch.cat([finite_nan, torch.isnan(values).to(values.dtype)])
    dist.all_reduce(flagged, op=dist.ReduceOp.MAX, group=group)
    count = values.numel()
    return torch.where(flagged[count:] > 0, torch.full_like(values, math.nan), flagged[:count])


# Pinned host tensors copied to a GPU inside a CUDA graph capture: every
# replay copies them again, so they are kept for the life of the process
# (as the C++ glue keeps its tables; whether torch's host allocator holds
# a block used during a capture depends on its version; found in review).
_CAPTURED_HOST: list = []


def to_device_async(host: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on ``device``, copied from pinned memory on a GPU (a copy
    from pageable memory would wait for the stream)."""
    if device.type != "cuda":
        return host.to(device)
    pinned = host.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_HOST.append(pinned)
    return pinned.to(device, non_blocking=True)


def _over_mesh(values: Tensor, keys: list, sharding: Optional[Sharding], op_max: bool, every_dim: bool = False) -> Tensor:
    """Reduce entry-wise over every mesh dimension that shards some entry
    (``every_dim``: over all of them, for values that may differ between
    copies of a replicated or reduced tensor: per-rank flags and divisors)."""
    if sharding is None:
        return values
    coordinate = sharding.mesh.get_coordinate()
    dims = range(sharding.mesh.ndim) if every_dim else sorted({d for key in keys for d in key})
    for dim in dims:
        if not op_max and coordinate[dim] != 0:
            # Replicated on this dimension: the copy at coordinate 0 counts for all.
            kept = [dim in key for key in keys]
            if not all(kept):  # decided on the host list (no tensor read, no graph break when compiled)
                keep = to_device_async(torch.tensor(kept, device="cpu"), values.device)
                # A copy's NaN or inf still counts, as torch's sum of every
                # copy counts it (found in review: a replica out of step with
                # a NaN on one rank passed error_if_nonfinite). In step,
                # the copy at coordinate 0 holds the same value already.
                values = torch.where(keep | ~torch.isfinite(values), values, torch.zeros_like(values))
        values = _all_reduce(values, op_max, sharding.mesh.get_group(dim))
    return values


def any_rank(flag: Tensor, sharding: Optional[Sharding], groups: list) -> Tensor:
    """The largest value of a (NaN-free) 0-dim ``flag`` over the processes
    the norm was reduced over (the mesh dimensions that shard some tensor,
    and the groups); every one of them gets the same."""
    dist = _dist()
    flag = flag.reshape(1).clone()
    if sharding is not None:
        # Every mesh dimension: the ranks holding copies of a replicated or
        # reduced tensor step the same parameters, and their flags are
        # their own (found in review: with Partial gradients alone, one
        # rank skipped a step the other took, and gloo then failed on the
        # mismatched collectives of the fused step).
        for dim in range(sharding.mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sharding.mesh.get_group(dim))
    for group in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag.reshape(())


def _over_groups(total: Tensor, groups: list, op_max: bool) -> Tensor:
    for group in groups:
        total = _all_reduce(total.reshape(-1), op_max, group).reshape(total.shape)
    return total


# Order 2 all-reduces each square three times in one collective: as is,
# scaled down and scaled up by this factor squared. A norm above 2^512
# (1.3e154) has a square beyond the double range and one below 2^-511 a
# square that loses bits or vanishes; the scaled copies keep them. The terms
# a scaled copy loses are below 2^-898 of the total where it is used.
_SQUARES_SCALE = 2.0**600
# Below this the plain sum of squares may have lost bits (subnormal range
# 2^-1022 and under, with margin): the up-scaled copy is used instead.
_SQUARES_TINY = 2.0**-900


def _squares(values: Tensor) -> Tensor:
    """Plain, down-scaled and up-scaled squares of ``values``, side by side."""
    return torch.cat([values.square(), (values / _SQUARES_SCALE).square(), (values * _SQUARES_SCALE).square()])


def _root_of_squares(sums: Tensor) -> Tensor:
    """Norms from sums of ``_squares``: the plain copy unless it overflowed
    or is tiny (NaN and inf stay as they are)."""
    plain, down, up = sums.chunk(3)
    norm = torch.where(torch.isinf(plain) & torch.isfinite(down), down.sqrt() * _SQUARES_SCALE, plain.sqrt())
    return torch.where((plain < _SQUARES_TINY) & (up > 0), up.sqrt() / _SQUARES_SCALE, norm)


def reduce_norms(
    local: Tensor, keys: list, sharding: Optional[Sharding], groups: list, ord: float, per_entry: bool = True,
    every_dim: bool = False,
) -> tuple[Tensor, Tensor]:
    """Global norms from local ones.

    ``local`` holds float64 local norms, one entry per class or tensor, with
    ``keys`` their sharded mesh dimensions. Returns ``(total, entries)``: the
    norm over everything (all entries, the mesh and ``groups``) and each
    entry's norm over the mesh (``groups`` hold different tensors, so they
    do not enter per-entry norms), both float64. Without ``per_entry``
    the entries' norms may be left out (order 2 then skips their roots, a
    dozen small ops per call). ``every_dim``: reduced over every mesh
    dimension (the local norms hold per-rank flags or divisors).
    """
    def over_mesh(values: Tensor, op_max: bool, entry_keys: Optional[list] = None) -> Tensor:
        return _over_mesh(values, keys if entry_keys is None else entry_keys, sharding, op_max, every_dim)

    if ord == math.inf:
        entries = over_mesh(local, True)
        total = entries.max() if entries.numel() else torch.zeros((), dtype=torch.float64, device=local.device)
        total = torch.where(torch.isnan(entries).any(), torch.full_like(total, math.nan), total)
        return _over_groups(total, groups, op_max=True), entries
    if ord == 2.0:
        squares = over_mesh(_squares(local), False, list(keys) * 3)
        sums = torch.stack([part.sum() for part in squares.chunk(3)])
        total = _root_of_squares(_over_groups(sums, groups, op_max=False)).reshape(())
        return total, _root_of_squares(squares) if per_entry else local[:0]
    if ord == 1.0:  # a sum of norms overflows only where the norm itself does
        entries = over_mesh(local, False)
        return _over_groups(entries.sum(), groups, op_max=False), entries
    # Any other order: scale by the maximum so that no power overflows (a
    # ratio under the double range still counts, and a root beyond it is
    # taken in logarithms; found in review: at order 0.01 a rank's 1e-300
    # next to another's 1 vanished, a norm 4.9% low).
    peak = over_mesh(local, True)
    entries = over_mesh(ratio_pow(local, peak, ord), False)
    entries = root(peak, entries, ord)
    top = entries.max() if entries.numel() else torch.zeros((), dtype=torch.float64, device=local.device)
    top = torch.where(torch.isnan(entries).any(), torch.full_like(top, math.nan), top)
    top = _over_groups(top, groups, op_max=True)
    total = _over_groups(ratio_pow(entries, top, ord).sum(), groups, op_max=False)
    return root(top, total, ord), entries
