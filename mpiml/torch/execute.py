"""Executing agreed responses: the data movement, done with mpiml.collectives on the engine's communicator.

Every rank runs the same responses in the same order (the coordinator's
plan), so each call below is matched on every rank.

* **allreduce** (a fused bucket): each tensor is copied (prescaled) into
  one fusion buffer per dtype, one ``collectives.allreduce`` runs on the
  buffer, and each result is copied out (postscaled; ``Average`` is a sum
  times 1/size). A rank that has joined fills its part of the buffer with
  the op's identity (0 for sums, 1 for products, +/-inf or the integer
  limits for min/max), so the others' results are unchanged; ``Average``
  still divides by the full size, as Horovod documents. A bucket of one
  in-place tensor skips the copies and reduces the tensor's own memory.
* **broadcast** (a fused bucket): the root packs, one
  ``collectives.broadcast``, everyone unpacks.
* **allgather**: ``collectives.allgather`` handles ranks' different first
  dimensions; a grouped allgather runs one per tensor, in list order.
* **reducescatter**: rank r gets rows ``[R_r, R_r+1)`` of the reduced tensor
  (the first ``rows % size`` ranks one row more, as Horovod). Each rank's
  rows are laid out in equal, zero-padded segments so that
  ``collectives.reduce_scatter``'s element split lands on row boundaries;
  a grouped reducescatter runs one per tensor, in list order.
* **alltoall**: MPI's own ``Alltoallv`` (mpiml.collectives has no
  all-to-all), on the bytes of the rows.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from .. import collectives
from ..timeline import Timeline
from .negotiation import Meta, Response
from .requests import MPIML_OPS, ReduceOp, Request, from_name, identity, wire_dtype, write_scaled

__all__ = ["Executor"]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class Executor:
    """Runs responses on one rank; keeps one growing fusion buffer per wire dtype."""

    def __init__(self, comm: MPI.Intracomm, algorithm: str, timeline: Timeline) -> None:
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.algorithm = algorithm
        self.timeline = timeline
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def buffer(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """The first ``n`` elements of the fusion buffer for ``dtype`` (contents undefined)."""
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < n:
            buf = self._buffers[dtype] = torch.empty(max(n, 1), dtype=dtype)
        return buf[:n]

    def run(self, response: Response, requests: list[Request | None]) -> list[Any]:
        """Execute one response; returns one result per request (None where this rank had none)."""
        kind = response.kind
        if kind == "allreduce":
            return self._allreduce(response, requests)
        if kind == "broadcast":
            return self._broadcast(response, requests)
        if kind == "barrier":
            return [None for _ in requests]
        request = requests[0]
        assert request is not None, f"{kind} without a local request"
        if kind == "allgather":
            return [[self._allgather(response.extra[i], t) for i, t in enumerate(request.inputs)]]
        if kind == "reducescatter":
            return [[self._reducescatter(request.meta, t) for t in request.inputs]]
        if kind == "alltoall":
            return [self._alltoall(response, request)]
        raise ValueError(f"unknown response kind {kind!r}")

    # ------------------------------------------------------------ allreduce
    def _allreduce(self, response: Response, requests: list[Request | None]) -> list[Any]:
        meta = response.metas[0]
        native = from_name(meta.dtype)
        wire = wire_dtype(native)
        op = ReduceOp(meta.op)
        post = meta.postscale / self.size if op == ReduceOp.Average else meta.postscale
        tl, row = self.timeline, "engine"
        first = requests[0]
        if (len(requests) == 1 and first is not None and len(first.inputs) == 1 and wire == native
                and first.outputs[0] is first.inputs[0]):
            flat = first.inputs[0].view(-1)  # in place on the caller's memory: no fusion-buffer copies
            write_scaled(flat, flat, meta.prescale, native)
            with tl.span("ALLREDUCE", "allreduce", row=row, tensors=1, bytes=flat.numel() * flat.element_size(),
                         algorithm=self.algorithm):
                collectives.allreduce(flat, op=MPIML_OPS[op], algorithm=self.algorithm, comm=self.comm)
            write_scaled(flat, flat, post, native)
            return [first.outputs]
        sizes = [[_numel(s) for s in m.shapes] for m in response.metas]
        total = sum(sum(s) for s in sizes)
        buf = self.buffer(wire, total)
        with tl.span("MEMCPY_IN_FUSION_BUFFER", "allreduce", row=row):
            offset = 0
            for request, counts in zip(requests, sizes, strict=True):
                for i, n in enumerate(counts):
                    part = buf[offset:offset + n]
                    if request is None:  # joined: contribute the op's identity
                        part.fill_(identity(op, wire))
                    else:
                        write_scaled(part, request.inputs[i].view(-1), meta.prescale, native)
                    offset += n
        with tl.span("ALLREDUCE", "allreduce", row=row, tensors=sum(map(len, sizes)), dtype=meta.dtype,
                     bytes=total * buf.element_size(), algorithm=self.algorithm):
            collectives.allreduce(buf, op=MPIML_OPS[op], algorithm=self.algorithm, comm=self.comm)
        result = buf if wire == native else buf.to(native)  # narrowing wraps like native arithmetic
        results: list[Any] = []
        with tl.span("MEMCPY_OUT_FUSION_BUFFER", "allreduce", row=row):
            offset = 0
            for request, counts in zip(requests, sizes, strict=True):
                for i, n in enumerate(counts):
                    if request is not None:
                        write_scaled(request.outputs[i].view(-1), result[offset:offset + n], post, native)
                    offset += n
                results.append(request.outputs if request is not None else None)
        return results

    # ------------------------------------------------------------ broadcast
    def _broadcast(self, response: Response, requests: list[Request | None]) -> list[Any]:
        meta = response.metas[0]
        native = from_name(meta.dtype)
        wire = wire_dtype(native)
        root, tl = meta.root, self.timeline
        first = requests[0]
        if len(requests) == 1 and first is not None and wire == native and first.outputs[0] is first.inputs[0]:
            flat = first.inputs[0].view(-1)
            with tl.span("BROADCAST", "broadcast", row="engine", tensors=1, root=root):
                collectives.broadcast(flat, root=root, algorithm=self.algorithm, comm=self.comm)
            return [first.outputs]
        pieces = [(r, i, r.inputs[i].numel()) for r in requests if r is not None for i in range(len(r.inputs))]
        total = sum(n for _, _, n in pieces)
        buf = self.buffer(wire, total)
        if self.rank == root:
            offset = 0
            for r, i, n in pieces:
                buf[offset:offset + n].copy_(r.inputs[i].view(-1))
                offset += n
        with tl.span("BROADCAST", "broadcast", row="engine", tensors=len(pieces), root=root,
                     bytes=total * buf.element_size()):
            collectives.broadcast(buf, root=root, algorithm=self.algorithm, comm=self.comm)
        result = buf if wire == native else buf.to(native)
        offset = 0
        for r, i, n in pieces:
            out = r.outputs[i]
            if not (self.rank == root and out is r.inputs[i]):
                out.view(-1).copy_(result[offset:offset + n])
            offset += n
        return [r.outputs if r is not None else None for r in requests]

    # ------------------------------------------------------------ allgather, reducescatter, alltoall
    def _allgather(self, rows: tuple[int, ...], tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated; ``rows``: each rank's first dimension."""
        native = tensor.dtype
        wire = wire_dtype(native)
        flat = tensor.view(-1) if wire == native else tensor.view(-1).to(wire)
        with self.timeline.span("ALLGATHER", "allgather", row="engine", bytes=flat.numel() * flat.element_size()):
            gathered = collectives.allgather(flat, algorithm=self.algorithm, comm=self.comm)
        if wire != native:
            gathered = gathered.to(native)
        return gathered.view(sum(rows), *tensor.shape[1:])

    def _reducescatter(self, meta: Meta, tensor: torch.Tensor) -> torch.Tensor:
        native = tensor.dtype
        wire = wire_dtype(native)
        op = ReduceOp(meta.op)
        rows, width, p = tensor.shape[0], _numel(tuple(tensor.shape[1:])), self.size
        counts = [rows // p + (1 if r < rows % p else 0) for r in range(p)]
        segment = counts[0] * width  # the largest share; every rank's share padded to it
        buf = self.buffer(wire, segment * p)
        source = tensor.view(-1)
        start = 0
        for r, n in enumerate(counts):
            part = buf[r * segment:(r + 1) * segment]
            write_scaled(part[:n * width], source[start:start + n * width], meta.prescale, native)
            part[n * width:].zero_()
            start += n * width
        with self.timeline.span("REDUCESCATTER", "reducescatter", row="engine", bytes=buf.numel() * buf.element_size()):
            mine = collectives.reduce_scatter(buf, op=MPIML_OPS[op], algorithm=self.algorithm, comm=self.comm)
        mine = mine[:counts[self.rank] * width]
        if wire != native:
            mine = mine.to(native)
        post = meta.postscale / p if op == ReduceOp.Average else meta.postscale
        out = torch.empty((counts[self.rank], *tensor.shape[1:]), dtype=native)
        write_scaled(out.view(-1), mine, post, native)
        return out

    def _alltoall(self, response: Response, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
        tensor = request.inputs[0]
        splits = response.extra  # splits[sender][receiver], in rows
        row_bytes = _numel(tuple(tensor.shape[1:])) * tensor.element_size()
        send_rows = splits[self.rank]
        recv_rows = [splits[q][self.rank] for q in range(self.size)]
        out = torch.empty((sum(recv_rows), *tensor.shape[1:]), dtype=tensor.dtype)
        send = _bytes(tensor)
        recv = _bytes(out)
        send_counts = [n * row_bytes for n in send_rows]
        recv_counts = [n * row_bytes for n in recv_rows]
        if max(send_counts + recv_counts, default=0) >= 2 ** 31:
            raise ValueError("alltoall: a single exchange between two ranks must be below 2 GiB")
        with self.timeline.span("ALLTOALL", "alltoall", row="engine", bytes=int(send.size)):
            self.comm.Alltoallv([send, (send_counts, _displacements(send_counts)), MPI.BYTE],
                                [recv, (recv_counts, _displacements(recv_counts)), MPI.BYTE])
        return out, torch.tensor(recv_rows, dtype=torch.int32)


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a uint8 numpy array (no copy)."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def _displacements(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts:
        out.append(total)
        total += c
    return out

