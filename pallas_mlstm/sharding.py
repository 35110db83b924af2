"""The chunkwise mLSTM on arrays sharded over a device mesh: batch, heads and sequence.

Every (batch, head) pair is independent, so batch / head sharding runs the whole op per shard.
A sharded sequence axis runs context-parallel (pallas_mlstm.context_parallel): each shard gets the
state it starts from out of one weighted matmul per shard and one exchange of states, then runs the
chunkwise forward on its steps; the backward gets each shard's end-state gradient the same way in
reverse, and runs the chunkwise backward of its steps. Only states move between devices.

The op is one `jax.custom_vjp` whose forward and backward are each a per-shard body, placed by
- `custom_partitioning` (Shardy) when the mesh axes are Auto (plain `jit` + `NamedSharding`):
  the shardings are only known when XLA partitions the program, which calls back into `partition`;
- `jax.shard_map` when the inputs' types carry Explicit mesh axes (known when tracing);
- nothing inside a `shard_map` where all axes are Manual: the op runs on the local arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_mlstm import context_parallel
from pallas_mlstm.chunkwise import Inputs
from pallas_mlstm.inputs import explicit_sharding, spec_axes
from pallas_mlstm.op import Residuals, chunkwise_backward, chunkwise_forward, first_order_only, run_chunkwise
from pallas_mlstm.plan import Plan
from pallas_mlstm.segments import segment_len_of
from pallas_mlstm.states import States, acc_dtype

_PRIMAL_KINDS = (("seq", 4), ("seq", 4), ("seq", 4), ("seq", 3), ("seq", 3), ("state", 4), ("state", 3), ("state", 2))


@dataclasses.dataclass(frozen=True)
class _Placement:
    """The mesh axes over which dims 0 (B), 1 (NH) and 2 (S) are split, and the sequence shard count."""

    batch: tuple[str, ...]
    heads: tuple[str, ...]
    seq: tuple[str, ...]
    seq_shards: int
    # placed by shard_map (Explicit axes) with S in segments of the plan's segment_len on every shard, too: each
    # sequence shard keeps its own segment starts for the backward
    keeps_segment_starts: bool

    def spec(self, kind: str, rank: int) -> P:
        """The spec of a per-sequence ("seq": B, NH, S, ...) or per-sequence-state ("state": B, NH, ...) array, or of
        states each sequence shard keeps of its own: "chunk_states" (B, NH, (NC+1)·DHQK, ...) and "segment_starts"
        (B, NH, NSEG, ...; whole unless `keeps_segment_starts`: else a shard recomputes its own)."""
        entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes
        per_shard = kind in ("seq", "chunk_states") or (kind == "segment_starts" and self.keeps_segment_starts)
        lead = (entry(self.batch), entry(self.heads)) + ((entry(self.seq),) if per_shard else ())
        return P(*lead, *(None,) * (rank - len(lead)))


def _placement(plan: Plan, spec, axis_sizes: dict[str, int], q_shape, explicit: bool) -> _Placement:
    """The placement that q's sharding asks for; ValueError when the shapes do not split evenly, or when chunk
    states are to be kept on a sequence shard of Auto mesh axes (`explicit` False): their global shape would
    depend on the shard count, which is unknown when the program is traced."""
    spec = tuple(spec) + (None,) * (3 - len(tuple(spec)))
    batch, heads, seq = (spec_axes(spec[dim]) for dim in range(3))
    shards = [math.prod(axis_sizes[a] for a in axes) for axes in (batch, heads, seq)]
    for dim, (name, count) in enumerate(zip(("batch B", "heads NH", "sequence S"), shards)):
        if q_shape[dim] % count:
            raise ValueError(
                f"q's {name} axis ({q_shape[dim]}) is split over mesh axes {spec[dim]} ({count} shards), which "
                f"does not divide it: pad it to a multiple of {count} or shard it over fewer devices."
            )
    local_seq = q_shape[2] // shards[2]
    chunking = plan.chunking
    if seq and local_seq % chunking.chunk_size:
        raise ValueError(
            f"q's sequence axis S={q_shape[2]} is split over mesh axes {spec[2]} into pieces of {local_seq}, "
            f"which chunk_size={chunking.chunk_size} does not divide: pass a chunk_size that divides {local_seq}."
        )
    if seq and not explicit and not chunking.recompute_states_in_bw and chunking.segment_len is None:
        raise ValueError(
            f"recompute_states_in_bw=False cannot be combined with a sequence axis sharded over Auto mesh axes "
            f"{spec[2]}: pass recompute_states_in_bw=True, or make the mesh axes Explicit "
            "(jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Explicit, ...)))."
        )
    keeps_segment_starts = (
        explicit
        and bool(seq)
        and chunking.segment_len is not None
        and segment_len_of(plan, local_seq) == chunking.segment_len
    )
    return _Placement(batch, heads, seq, shards[2], keeps_segment_starts)


_UNPLACED = _Placement((), (), (), 1, False)  # one device: the body as it is traced before partitioning


# ----------------------------------------------------------------------------- per-shard bodies


def _present(arrays) -> tuple[bool, ...]:
    return tuple(x is not None for x in arrays)


def _fill(present, arrays):
    """The flat present arrays back into their slots, None where absent."""
    arrays = iter(arrays)
    return [next(arrays) if here else None for here in present]


def _from_last_shard(x: jax.Array, seq: tuple[str, ...], shards: int) -> jax.Array:
    """x of the last sequence shard, on every sequence shard."""
    return lax.psum(jnp.where(lax.axis_index(seq) == shards - 1, x, jnp.zeros_like(x)), seq)


def _unsaved_segment_starts(plan: Plan, placement: _Placement, q, v) -> States:
    """Zeros in place of the segments' initial states on a sequence shard, shaped as the unsharded forward
    keeps them (B, NH, NSEG, ...): a shard cuts its own segments from its local length, so these do not split
    over the shards, and each shard's backward recomputes its own instead."""
    batch, heads, local_len, dhqk = q.shape
    seq_len = local_len * placement.seq_shards
    num_segments = seq_len // segment_len_of(plan, seq_len)
    return States.zeros(batch, heads, dhqk, v.shape[-1], acc_dtype(q.dtype), (num_segments,))


def _fwd_body(plan: Plan, present, placement, *arrays):
    """Per-shard forward: (h, [last states], [saved states: segment starts or all states], vecN_out, vecM_out).
    A sequence shard first gets the state it starts from (pallas_mlstm.context_parallel)."""
    q, k, v, i, f, c0, n0, m0 = _fill(present, arrays)
    gate = plan.cell.input_gate
    if placement.seq:
        end_state = context_parallel.shard_end_state(k, v, i, f, gate)
        c0, n0, m0 = context_parallel.incoming_states(
            placement.seq, placement.seq_shards, end_state, (c0, n0, m0), gate
        )
    out, residuals = chunkwise_forward(plan, Inputs(q, k, v, i, f), States(c0, n0, m0))
    saved_states, n_out, m_out = residuals.saved_states, residuals.n_out, residuals.m_out
    if placement.seq and plan.chunking.segment_len is not None and not placement.keeps_segment_starts:
        saved_states = _unsaved_segment_starts(plan, placement, q, v)
    h, last_states = out if plan.return_last_states else (out, ())
    if placement.seq:
        last_states = tuple(_from_last_shard(x, placement.seq, placement.seq_shards) for x in last_states)
    return (h, *last_states, *(saved_states or ()), n_out, m_out)


def _bwd_body(plan: Plan, present, placement, *arrays):
    """Per-shard backward: the gradients of the present primal arrays. A sequence shard recomputes the state it
    starts from and gets the gradient of the state it ends with (pallas_mlstm.context_parallel), then runs the
    chunkwise backward of its steps; the initial states' gradients are the first shard's."""
    num_primals, num_saved = sum(present), len(_saved_kinds(plan))
    primals = _fill(present, arrays[:num_primals])
    saved_states = arrays[num_primals : num_primals + num_saved] or None
    n_out, m_out, dh, *last = arrays[num_primals + num_saved :]  # last: dC, dN of the last states, and their m
    if not placement.seq:
        cotangents = (dh, States(*last[:2])) if plan.return_last_states else dh
        residuals = Residuals(Inputs(*primals[:5]), States(*primals[5:]), saved_states, n_out, m_out)
        return _present_gradients(chunkwise_backward(plan, residuals, cotangents))

    q, k, v, i, f, c0, n0, m0 = primals
    me = lax.axis_index(placement.seq)
    end_state = context_parallel.shard_end_state(k, v, i, f, plan.cell.input_gate)
    if saved_states is not None and (plan.chunking.segment_len is None or placement.keeps_segment_starts):
        # this shard's own chunk states or segment starts, from its start state
        states_in = (c0, n0, m0)  # read only for the initial states' gradients, which are the first shard's
    else:
        saved_states = None  # recomputed from the start state (Auto axes: `_unsaved_segment_starts`)
        states_in = context_parallel.incoming_states(
            placement.seq, placement.seq_shards, end_state, (c0, n0, m0), plan.cell.input_gate
        )
    dc_last, dn_last, m_last = last if plan.return_last_states else (None, None, None)
    # the frame of this shard's end-state gradient: its last step's m (the last shard's: the op's last m)
    frame = m_out[..., -1].astype(end_state[2].dtype)
    if m_last is not None:
        frame = jnp.where(me == placement.seq_shards - 1, m_last.astype(frame.dtype), frame)
    start_gradient = context_parallel.shard_start_state_gradient(
        q, f, n_out, m_out, dh, plan.call("parallel_bw_dQ").scale_for(q.shape[-1]), plan.cell.denominator_eps
    )
    d_end = context_parallel.outgoing_state_gradients(
        placement.seq,
        placement.seq_shards,
        start_gradient,
        end_state[3],
        frame,
        (dc_last, dn_last, frame if m_last is None else m_last),
    )
    residuals = Residuals(Inputs(q, k, v, i, f), States(*states_in), saved_states, n_out, m_out)
    d_inputs, d_initial = chunkwise_backward(
        dataclasses.replace(plan, return_last_states=True), residuals, (dh, States(*d_end)), frame
    )
    first = lambda d, x: lax.psum(jnp.where(me == 0, d, jnp.zeros_like(d)), placement.seq).astype(x.dtype)
    initial = States(*(None if x is None else first(d, x) for d, x in zip(d_initial, (c0, n0, m0))))
    return _present_gradients((d_inputs, initial))


def _present_gradients(gradients) -> tuple:
    """(d_inputs, d_initial) as the flat tuple of the present primals' gradients."""
    d_inputs, d_initial = gradients
    return tuple(g for g in (*d_inputs, *d_initial) if g is not None)


# ----------------------------------------------------------------------------- placement of the bodies


def _saved_kinds(plan: Plan) -> tuple:
    """(kind, rank) of the saved states the forward passes to the backward: each segment's initial states
    (B, NH, NSEG, ...) when the plan's segment_len is set (`run_partitioned` sets it only where S is cut into
    segments), else every chunk's states unless they are recomputed (on a sequence shard: its own chunks')."""
    if plan.chunking.segment_len is not None:
        return ("segment_starts", 5), ("segment_starts", 4), ("segment_starts", 3)
    return (
        () if plan.chunking.recompute_states_in_bw else (("chunk_states", 4), ("chunk_states", 3), ("chunk_states", 3))
    )


def _kinds(plan: Plan, present) -> tuple[tuple, tuple, tuple]:
    """(kind, rank) of every input and output of the forward and backward bodies."""
    primals = tuple(kind for kind, here in zip(_PRIMAL_KINDS, present) if here)
    last = (("state", 4), ("state", 3), ("state", 2)) if plan.return_last_states else ()
    saved = _saved_kinds(plan)
    fwd_out = (("seq", 4), *last, *saved, ("seq", 3), ("seq", 3))
    bwd_in = (*primals, *saved, ("seq", 3), ("seq", 3), ("seq", 4), *last)  # last: dC, dN of the last states, m
    return primals, fwd_out, bwd_in


def _sharding_rule(in_kinds, out_kinds) -> tuple[str, tuple[str, ...]]:
    """Shardy rule and its need-replication factors: B, NH and S are shared factors; every other
    dimension is a factor of its own, kept whole (chunk states are kept only where S is whole)."""
    counter, whole = itertools.count(), []

    def value(kind, rank):
        lead = ("b", "h", "s") if kind == "seq" else ("b", "h")
        rest = tuple(f"r{next(counter)}" for _ in range(rank - len(lead)))
        whole.extend(rest)
        return " ".join(lead + rest)

    rule = ", ".join(value(*x) for x in in_kinds) + " -> " + ", ".join(value(*x) for x in out_kinds)
    return rule, tuple(whole)


def _explicit_axes_only(x) -> bool:
    """True where the mesh of x's type (else the context's, as inside jax.set_mesh) has Explicit axes only: an x
    not split over any of them is whole on every device, and no partitioner runs for it."""
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty:
        mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and all(kind == AxisType.Explicit for kind in mesh.axis_types)


def _placed(body, plan: Plan, present, in_kinds, out_kinds):
    """`body` as a function of global arrays: partitioned per shard by custom_partitioning or shard_map."""

    def partition(mesh, arg_shapes, result_shape):
        del result_shape
        sharding = arg_shapes[0].sharding
        if isinstance(sharding, NamedSharding):
            placement = _placement(plan, sharding.spec, dict(mesh.shape), arg_shapes[0].shape, explicit=False)
        elif sharding.is_fully_replicated:  # e.g. an unsharded array inside jax.set_mesh
            placement = _UNPLACED
        else:
            raise ValueError(
                f"q must be sharded with a jax.sharding.NamedSharding over a Mesh; got {type(sharding).__name__}."
            )
        shardings = lambda kinds: tuple(NamedSharding(mesh, placement.spec(*kind)) for kind in kinds)
        return mesh, functools.partial(body, plan, present, placement), shardings(out_kinds), shardings(in_kinds)

    rule, replicated = _sharding_rule(in_kinds, out_kinds)
    partitioned = custom_partitioning(functools.partial(body, plan, present, _UNPLACED))
    partitioned.def_partition(partition=partition, sharding_rule=rule, need_replication_factors=replicated)

    def call(*arrays):
        sharding = explicit_sharding(arrays[0])
        if sharding is None and _explicit_axes_only(arrays[0]):  # whole on every device: nothing to place
            return body(plan, present, _UNPLACED, *arrays)
        if sharding is None:
            return partitioned(*arrays)
        mesh = sharding.mesh
        placement = _placement(plan, tuple(sharding.spec), dict(mesh.shape), arrays[0].shape, explicit=True)
        in_specs = tuple(placement.spec(*kind) for kind in in_kinds)
        arrays = tuple(jax.sharding.reshard(x, NamedSharding(mesh, s)) for x, s in zip(arrays, in_specs))
        out_specs = tuple(placement.spec(*kind) for kind in out_kinds)
        local = functools.partial(body, plan, present, placement)
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*arrays)

    return _fold_vmap(call)


def _fold_vmap(op):
    """op under jax.vmap: the mapped axis is folded into the batch axis as its minor part (every array
    leads with B), so a batch sharding of B carries over to B·V unchanged."""
    op_vmap = jax.custom_batching.custom_vmap(op)

    @op_vmap.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        def fold(x, batched):  # (V, B, ...) or (B, ...) -> (B·V, ...)
            x = (
                jnp.moveaxis(x, 0, 1)
                if batched
                else jnp.broadcast_to(x[:, None], (x.shape[0], axis_size, *x.shape[1:]))
            )
            return x.reshape(-1, *x.shape[2:])

        out = op_vmap(*(fold(x, batched) for x, batched in zip(arrays, in_batched)))
        unfold = lambda y: jnp.moveaxis(y.reshape(-1, axis_size, *y.shape[1:]), 1, 0)
        return tuple(unfold(y) for y in out), tuple(True for _ in out)

    return op_vmap


@functools.cache
def _ops(plan: Plan, present: tuple[bool, ...]):
    """The placed forward and backward bodies of one (plan, present-arrays) signature."""
    primals, fwd_out, bwd_in = _kinds(plan, present)
    return (_placed(_fwd_body, plan, present, primals, fwd_out), _placed(_bwd_body, plan, present, bwd_in, primals))


# ----------------------------------------------------------------------------- the differentiable op


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sharded_chunkwise(plan, q, k, v, i, f, c_initial, n_initial, m_initial):
    # not differentiated: no states to keep for a backward
    plan = plan.replace_chunking(recompute_states_in_bw=True)
    return _sharded_fwd(plan, q, k, v, i, f, c_initial, n_initial, m_initial)[0]


def _sharded_fwd(plan: Plan, *primals):
    present = _present(primals)
    outs = _ops(plan, present)[0](*(x for x in primals if x is not None))
    h, n_out, m_out = outs[0], outs[-2], outs[-1]
    num_last = 3 if plan.return_last_states else 0
    out = (h, States(*outs[1 : 1 + num_last])) if plan.return_last_states else h
    last_m = outs[num_last] if plan.return_last_states else None  # the frame of the last states' cotangents
    return out, (primals, tuple(outs[1 + num_last : -2]), n_out, m_out, last_m)


def _sharded_bwd(plan: Plan, residuals, cotangents):
    primals, saved_states, n_out, m_out, last_m = residuals
    present = _present(primals)
    dh, d_last = cotangents if plan.return_last_states else (cotangents, ())
    last = (*d_last[:2], last_m) if plan.return_last_states else ()  # m is held constant: its cotangent is unused
    grads = iter(_ops(plan, present)[1](*(x for x in primals if x is not None), *saved_states, n_out, m_out, dh, *last))
    return tuple(None if x is None else next(grads) for x in primals)


_sharded_chunkwise.defvjp(first_order_only(_sharded_fwd), first_order_only(_sharded_bwd))


def _nothing_to_partition(q) -> bool:
    """True inside a shard_map with all axes Manual, and where the context or q's mesh has one device."""
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and (context.size == 1 or all(kind == AxisType.Manual for kind in context.axis_types)):
        return True
    mesh = jax.typeof(q).sharding.mesh
    return not mesh.empty and mesh.size == 1


def _states_can_be_kept(q) -> bool:
    """True where the chunk states can pass from the forward to the backward: wherever q's sharding is known when
    tracing (one device, inside a shard_map with Manual axes, Explicit mesh axes), and on Auto mesh axes only
    while the sequence axis is known to be whole (no mesh and one device). Auto mesh axes are placed only when
    XLA partitions the program, and a sequence shard's states have a global shape that depends on the count."""
    if _nothing_to_partition(q) or explicit_sharding(q) is not None:
        return True
    no_mesh = jax.sharding.get_abstract_mesh().empty and jax.typeof(q).sharding.mesh.empty
    return no_mesh and jax.device_count() == 1


# Jitted, so that a call outside jit compiles once per plan and shapes instead of running (and, for the Pallas
# interpreter, compiling) operation by operation on every call.
_run_unpartitioned = jax.jit(run_chunkwise, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _run_jit(plan: Plan, q, k, v, i, f, c_initial, n_initial, m_initial):
    return _sharded_chunkwise(plan, q, k, v, i, f, c_initial, n_initial, m_initial)


def run_partitioned(plan: Plan, inputs: Inputs, initial: States):
    """`pallas_mlstm.op.run_chunkwise` for inputs that may be sharded over a mesh (B, NH and/or S).

    Runs as a jitted call, partitioned per shard by XLA unless there is nothing to partition: inside a `shard_map`
    whose axes are all Manual, or under a one-device mesh (e.g. deviceless lowering).
    The plan's segment_len becomes the one S is cut with (`segment_len_of`), None for one pass; a
    `recompute_states_in_bw` of None becomes False (keep the chunk states for the backward) where they can be
    kept (`_states_can_be_kept`), else True.
    """
    q = inputs.q
    plan = plan.replace_chunking(segment_len=segment_len_of(plan, q.shape[2]))
    if plan.chunking.recompute_states_in_bw is None:
        plan = plan.replace_chunking(recompute_states_in_bw=not _states_can_be_kept(q))
    if _nothing_to_partition(q):
        return _run_unpartitioned(plan, inputs, initial)
    if not plan.backend.partitionable:
        _check_one_device(plan.backend.name, q)
        return _run_unpartitioned(plan, inputs, initial)
    return _run_jit(plan, *inputs, *initial)


def _check_one_device(backend: str, q) -> None:
    """ValueError unless q lives on one device, outside any mesh: a backend XLA cannot partition runs only there."""
    mesh = jax.typeof(q).sharding.mesh
    if jax.device_count() > 1 or not mesh.empty or not jax.sharding.get_abstract_mesh().empty:
        raise ValueError(
            f"backend={backend!r} runs on one device, outside any mesh (XLA cannot partition its kernels), and "
            f"there are {jax.device_count()} devices here: use backend='interpret' or 'xla' for sharded inputs."
        )
