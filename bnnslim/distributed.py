"""Running under ``torchrun``: process group, rank-aware output, rank agreement checks.

bnnslim uses PyTorch's own distributed engine. ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_from_env` then joins the process
group (NCCL on GPUs, Gloo on CPUs) and picks this process's device. The same
code runs unchanged in one process. ``--batch-size`` is per process: the global
batch is ``batch_size * WORLD_SIZE``.

A process that waits for the others longer than ``BNNSLIM_DIST_TIMEOUT``
seconds (default 600; PyTorch's own default is 30 minutes) stops with an error
saying so (:func:`stalled_error`), instead of blocking the job.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Join the process group if launched by torchrun; returns the device name for this process."""
    if not launched_by_torchrun() or is_distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    elif device == "auto":
        device = "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_seconds()))
    return device


TIMEOUT_ENV = "BNNSLIM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def timeout_seconds() -> float:
    """How long a process waits for the others in a collective (``BNNSLIM_DIST_TIMEOUT``, seconds)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 7 * 24 * 3600:
        from bnnslim.errors import BnnslimError

        raise BnnslimError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds", "set it to e.g. 600, or unset it")
    return value


def stalled_error(exc: BaseException) -> BaseException | None:
    """The error to show for a failed collective (another process stalled or died), or None for other errors."""
    text = str(exc)
    gloo_transport = (isinstance(exc, RuntimeError) and "gloo" in text
                      and any(w in text for w in ("Timed out", "Connection closed", "Connection reset", "Read error")))
    if not (isinstance(exc, dist.DistError) or (is_distributed() and gloo_transport)):
        return None
    from bnnslim.errors import BnnslimError

    detail = " ".join(str(exc).split())[:200]
    return BnnslimError(
        f"process {rank()} of the torchrun job waited more than {timeout_seconds():g} s for the others, or lost one "
        f"of them ({type(exc).__name__}: {detail})",
        f"look at the other processes' output for the cause; if a step is just slow, raise {TIMEOUT_ENV} (seconds)")


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks (a no-op in one process)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks (what DDP does, for partial training)."""
    if not is_distributed():
        return
    n = world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= n


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm statistics) over ranks."""
    if not is_distributed():
        return
    n = world_size()
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b /= n


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank.

    DDP broadcasts rank 0's buffers before each forward pass, but each rank then
    updates its own from its own batch; this makes them equal again.
    """
    if not is_distributed():
        return
    for b in module.buffers():
        dist.broadcast(b, src=src)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def check_same_on_all_ranks(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise if ``tensors`` differ between ranks (they must be identical after synchronised training)."""
    if not is_distributed():
        return
    mine = digest(tensors)
    gathered: list[str] = [""] * world_size()
    dist.all_gather_object(gathered, mine)
    if len(set(gathered)) != 1:
        from bnnslim.errors import BnnslimError

        raise BnnslimError(f"{what} differ between ranks after synchronised training",
                           "report this as a bug; rerun in one process meanwhile")
