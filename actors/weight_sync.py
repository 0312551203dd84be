"""Weights from policy rank 0 to every rollout engine, in buckets: through the Ray object store, or
a broadcast over gloo or NCCL.

Object store (the default on CPU, and for engines colocated with the policy on GPU): one
`ray.put` per bucket, the bucket's tensors handed to Ray as raw byte buffers, so Ray's one copy
into shared memory lays them out as one flat object (no pickling of tensors, no separate packing
copy); an engine on the same node maps the object and views its tensors without a copy.

    buckets = put_buckets(state, bucket_bytes=256 << 20)   # policy rank 0: [(entries, ref)]
    for named in fetch_buckets(buckets):                   # engine: (name, tensor) per bucket
        ...

Broadcast (GPU engines on devices of their own: NCCL; `gloo` runs the same protocol on CPU):
members of the "weight sync" process group are policy rank 0 (group rank 0, also the host of its
TCP store) and every engine (group rank 1 + engine index). The other policy ranks are not
members; they take part only in gathering the full weights (ZeRO-3 gathers are collectives of
the policy's own group), so one rank sends and nobody sends twice.

    # policy rank 0                                    # engine i (concurrently)
    tx = WeightBroadcast(addr, port, 1 + n, 0, "gloo")   rx = WeightBroadcast(addr, port, 1 + n,
    tx.send(full_state, bucket_bytes=64 << 20)                                1 + i, "gloo")
                                                         for named in rx.receive():
                                                             engine.update_weights(named)

Each broadcast bucket is one contiguous byte tensor (packed where the weights live: on the GPU
for NCCL) plus a JSON header (names, shapes, dtypes, byte offsets) broadcast before it; an empty
header ends the round. The header is JSON, never pickle: an engine does not unpickle what
arrives on a socket. Either way, buckets keep vLLM's fused groups (q/k/v, gate/up of one layer)
whole, so every bucket is loadable on its own.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch

from actors.rollout import FUSED_GROUPS

ALIGN = 16  # byte offsets of tensors in a bucket: any dtype can view its slice


def _unit_key(name: str) -> str:
    """Names of one fused group share a key (the name with the part replaced); others are own."""
    for group in FUSED_GROUPS:
        for part in group:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".<{'|'.join(group)}>.")
    return name


def plan_buckets(
    named_shapes: list[tuple[str, tuple[int, ...], torch.dtype]], bucket_bytes: int
) -> list[list[dict]]:
    """Split tensors into buckets of at most `bucket_bytes` (a fused group larger than that gets
    a bucket of its own); each entry is {name, shape, dtype, offset, nbytes}, in input order
    within a bucket, with 16-byte aligned offsets. A fused group is never split."""
    units: dict[str, list[tuple[str, tuple[int, ...], torch.dtype]]] = {}
    for item in named_shapes:
        units.setdefault(_unit_key(item[0]), []).append(item)
    buckets: list[list[dict]] = []
    current: list[dict] = []
    used = 0
    for members in units.values():
        sizes = [_nbytes(shape, dtype) for _, shape, dtype in members]
        need = sum(_aligned(s) for s in sizes)
        if current and used + need > bucket_bytes:
            buckets.append(current)
            current, used = [], 0
        for (name, shape, dtype), size in zip(members, sizes):
            current.append(
                {
                    "name": name,
                    "shape": list(shape),
                    "dtype": str(dtype).removeprefix("torch."),
                    "offset": used,
                    "nbytes": size,
                }
            )
            used += _aligned(size)
    if current:
        buckets.append(current)
    return buckets


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def bucket_size(entries: list[dict]) -> int:
    last = entries[-1]
    return _aligned(last["offset"] + last["nbytes"])


def pack_bucket(
    entries: list[dict], state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The bucket's tensors as one contiguous uint8 tensor on `device` (bit-exact copies, taken
    from wherever each tensor lives; alignment padding is zero)."""
    buf = torch.empty(bucket_size(entries), dtype=torch.uint8, device=device)
    end = 0
    for e in entries:
        buf[end : e["offset"]].zero_()
        end = e["offset"] + e["nbytes"]
        buf[e["offset"] : end].copy_(_bytes_of(state[e["name"]]))
    buf[end:].zero_()
    return buf


def unpack_bucket(entries: list[dict], buf: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs viewing `buf` (no copy: keep `buf` alive while they are used)."""
    out = []
    for e in entries:
        dtype = getattr(torch, e["dtype"])
        raw = buf[e["offset"] : e["offset"] + e["nbytes"]]
        out.append((e["name"], raw.view(dtype).reshape(e["shape"])))
    return out


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 view (a copy only when it is not contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


# ---- through the object store -------------------------------------------------------------------


def put_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> list[tuple[list[dict], Any]]:
    """Policy rank 0: `state` in the Ray object store as [(entries, ObjectRef)], one object per
    bucket of `plan_buckets`. An object is the bucket's tensors as uint8 numpy arrays, which Ray
    keeps out of band: `ray.put` copies their bytes once, side by side into one shared-memory
    object, with no pickling and no packing copy before it. CPU tensors go in as views; tensors
    on a GPU are packed there and cross to the host in one transfer per bucket."""
    import ray

    plan = plan_buckets([(k, tuple(v.shape), v.dtype) for k, v in state.items()], bucket_bytes)
    return [(entries, ray.put(_host_arrays(entries, state))) for entries in plan]


def _host_arrays(entries: list[dict], state: dict[str, torch.Tensor]) -> list:
    tensors = [state[e["name"]] for e in entries]
    away = [t.device for t in tensors if t.device.type != "cpu"]
    if not away:
        return [_bytes_of(t).numpy() for t in tensors]
    flat = pack_bucket(entries, state, away[0]).cpu()
    return [flat[e["offset"] : e["offset"] + e["nbytes"]].numpy() for e in entries]


def fetch_buckets(buckets: list[tuple[list[dict], Any]]) -> list[list[tuple[str, torch.Tensor]]]:
    """Engine: every bucket of `put_buckets` as (name, tensor) pairs. On the node that put them
    the tensors view the objects' shared memory (no copy; read-only: load them, never write)."""
    import ray

    objects = ray.get([ref for _, ref in buckets])
    return [bucket_tensors(entries, arrays) for (entries, _), arrays in zip(buckets, objects)]


def bucket_tensors(entries: list[dict], arrays: list) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs viewing one object of `put_buckets` (its uint8 arrays, in order)."""
    if len(arrays) != len(entries):
        raise ValueError(f"weight bucket: {len(arrays)} arrays for {len(entries)} entries")
    out = []
    with warnings.catch_warnings():  # shared memory is read-only; the engine only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for e, array in zip(entries, arrays):
            if array.nbytes != e["nbytes"]:
                raise ValueError(f"weight bucket: {e['name']} has {array.nbytes} bytes, not {e}")
            raw = torch.from_numpy(array)
            out.append((e["name"], raw.view(getattr(torch, e["dtype"])).reshape(e["shape"])))
    return out


# ---- broadcast over gloo / NCCL ----------------------------------------------------------------


class WeightBroadcast:
    """One member of the weight-sync process group (its own TCP store: independent of the
    policy's and the engines' other torch.distributed groups). Rank 0 sends, the rest receive.

    Creating it blocks until all `world_size` members have joined, so the driver starts every
    member's constructor before waiting on any (see `rlhf.rl.trainer.RLRun.init_weight_broadcast`)."""

    def __init__(
        self,
        address: str,
        port: int,
        world_size: int,
        rank: int,
        backend: str,
        timeout_s: float = 600.0,
    ) -> None:
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("weight_sync", store)
        self.rank, self.backend = rank, backend
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.group = dist.ProcessGroupNCCL(store, rank, world_size)
        elif backend == "gloo":
            self.device = torch.device("cpu")
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=_node_ip())]
            self.group = dist.ProcessGroupGloo(store, rank, world_size, opts)
        else:
            raise ValueError(f"weight sync backend {backend!r}: expected 'gloo' or 'nccl'")

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.group.broadcast([tensor], _root0()).wait()
        return tensor

    def _header(self, entries: list[dict] | None) -> list[dict]:
        """Rank 0's header (None from the others) to every member: its length, then its bytes."""
        data = json.dumps(entries).encode() if self.rank == 0 else b""
        length = self._broadcast(torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        buf = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return json.loads(bytes(self._broadcast(buf).cpu().numpy()))

    def send(self, state: dict[str, torch.Tensor], bucket_bytes: int) -> int:
        """Rank 0: every tensor of `state`, bucket by bucket, then the end mark. Returns the
        number of buckets."""
        plan = plan_buckets([(k, tuple(v.shape), v.dtype) for k, v in state.items()], bucket_bytes)
        for entries in plan:
            self._header(entries)
            self._broadcast(pack_bucket(entries, state, self.device))
        self._header([])
        return len(plan)

    def receive(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Ranks > 0: each bucket's (name, tensor) pairs as it arrives, until the end mark."""
        while entries := self._header(None):
            buf = torch.empty(bucket_size(entries), dtype=torch.uint8, device=self.device)
            yield unpack_bucket(entries, self._broadcast(buf))


def _root0():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    return opts


def _node_ip() -> str:
    """The address gloo binds on this node (Ray's view of it; loopback for a local cluster)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (unit tests): loopback
        return "127.0.0.1"
