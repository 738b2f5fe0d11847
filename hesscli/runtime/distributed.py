"""hesscli under ``torchrun``: one process per rank, joined by torch.distributed (SPEC.md, Distributed).

Data split (the default): every rank evaluates the *sum* of the loss terms of its part of the data
and its Hessian-vector products; products, counts and dense blocks are summed over the ranks
(all-reduce), and the mean divides once by the total count of loss terms, so

    H = (1/n) Σ_ranks Σ_{terms t of rank r} ∇²ℓ_t(θ),    n = Σ_ranks n_r

is the one-process Hessian on all the data, whatever the sizes of the parts (NOTES.md, Distributed
HVP). Column split: every rank holds all the data and computes every world-th chunk of columns.

Failures: a rank that fails posts its message in the rendezvous store and closes its connections, so
the others' next collective fails at once and reports "rank r failed: <message>"; where errors are
expected (loading, planning), all ranks first agree on success (:meth:`Comm.stage`). A rank that
stops answering is caught by the collective timeout (``HESSCLI_TIMEOUT`` seconds, default 1800).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import timedelta

import torch

from hesscli.errors import HesscliError, clean_message

__all__ = ["Comm", "PeerError", "from_env", "shutdown", "active"]

DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait for the other ranks
ACK_WAIT = 5.0  # seconds a failed rank waits for the others to take note before it exits

_ACTIVE: Comm | None = None
_GENERATION = 0  # communicators this process has made (the same sequence on every rank)


class PeerError(HesscliError):
    """Another rank failed; carries that rank's exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class _Recorder:
    """A stream proxy that remembers the last ``Error:`` line and whether anything was written."""

    def __init__(self, stream):
        self._stream = stream
        self.last_error: str | None = None
        self.written = False

    def write(self, s: str) -> int:
        if s:
            self.written = True
            for line in s.splitlines():
                if line.startswith("Error: "):
                    self.last_error = line[len("Error: ") :]
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _timeout_from_env() -> float:
    raw = os.environ.get("HESSCLI_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise HesscliError(f"HESSCLI_TIMEOUT='{raw}' is not a number of seconds") from None
    if value <= 0:
        raise HesscliError(f"HESSCLI_TIMEOUT='{raw}' must be positive")
    return value


def _int53(data: bytes) -> float:
    """A digest as a float64 that holds it exactly (52 bits), so that it survives a collective."""
    return float(int.from_bytes(hashlib.sha256(data).digest()[:7], "big") >> 4)


class Comm:
    """The ranks of a torchrun job: ``rank``, ``world``, ``all_reduce``, and agreement on failures."""

    def __init__(
        self,
        rank: int,
        world: int,
        local_rank: int,
        timeout: float,
        store=None,
        backend: str = "gloo",
        owns_group: bool = True,
        generation: int = 0,
    ):
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.timeout = timeout
        self.backend = backend
        self.store = store
        self.rank_samples: list[int] = []
        self.peer_failed = False  # this rank's error is a consequence of another's
        self.posted = False
        self.owns_group = owns_group  # made by from_env, so destroyed by shutdown
        self.generation = generation

    # ------------------------------------------------------------------ devices

    def device_for(self, spec: str | None) -> str:
        """Under torchrun with CUDA, ``auto`` and ``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``."""
        spec = (spec or "auto").strip()
        if spec in ("auto", "cuda") and torch.cuda.is_available():
            n = torch.cuda.device_count()
            if self.local_rank >= n:
                raise HesscliError(
                    f"rank {self.rank}: LOCAL_RANK {self.local_rank} but this machine has {n} CUDA device(s); "
                    f"start at most {n} processes per machine (--nproc-per-node), or pass --device cpu"
                )
            return f"cuda:{self.local_rank}"
        return spec

    def _supports(self, device: torch.device) -> bool:
        if device.type == "cpu":
            return "gloo" in self.backend
        if device.type == "cuda":
            return "nccl" in self.backend or self.backend == "gloo"
        return False

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) ``t`` over the ranks, in place; any device the backend or the CPU can carry."""
        import torch.distributed as dist

        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        work = t if t.is_contiguous() else t.contiguous()
        if not self._supports(work.device):  # e.g. a CPU count under an NCCL-only group
            cpu = torch.device("cpu")
            work = work.to(cpu if self._supports(cpu) else torch.device("cuda", torch.cuda.current_device()))
        try:
            dist.all_reduce(work, op=rop)
        except Exception as e:  # noqa: BLE001 - any backend failure becomes one clear error
            raise self._failure(e) from None
        if work is not t:
            t.copy_(work)
        return t

    def all_gather(self, row: torch.Tensor) -> torch.Tensor:
        """(world, n) float64 on the CPU: every rank's ``row`` of n numbers (sum of one-hot rows)."""
        rows = torch.zeros(self.world, row.numel(), dtype=torch.float64)
        rows[self.rank] = row.detach().to("cpu", torch.float64).reshape(-1)
        return self.all_reduce(rows)

    def maximum(self, value: float) -> float:
        """The largest ``value`` over the ranks (e.g. sizes every rank must plan with alike)."""
        return self.all_reduce(torch.tensor([float(value)], dtype=torch.float64), op="max").item()

    def minimum(self, value: float) -> float:
        """The smallest value over the ranks."""
        return -self.maximum(-float(value))

    # ------------------------------------------------------------------ failures

    def _key(self, kind: str, rank: int) -> str:
        return f"hesscli/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{self.generation}/{kind}/{rank}"

    def post(self, kind: str, value: str = "") -> None:
        """Tell the other ranks something (kind, value) through the store."""
        if self.store is None:
            return
        try:
            self.store.set(self._key(kind, self.rank), value)
        except Exception:  # noqa: BLE001 - the store may be gone; the timeout still ends the job
            pass

    def post_error(self, message: str, exit_code: int = 1) -> None:
        """Tell every rank that this one failed with message and exit_code."""
        if not self.posted:
            self.posted = True
            self.post("error", json.dumps({"code": int(exit_code), "message": message}))

    def _has(self, kind: str, rank: int) -> bool:
        try:
            return bool(self.store.check([self._key(kind, rank)]))
        except Exception:  # noqa: BLE001
            return False

    def peer_error(self, wait: float = 0.0) -> tuple[int, int, str] | None:
        """(rank, exit code, message) of the first other rank that posted an error, waiting up to ``wait`` s."""
        if self.store is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            for r in range(self.world):
                if r != self.rank and self._has("error", r):
                    try:
                        info = json.loads(self.store.get(self._key("error", r)).decode())
                        return r, int(info["code"]), str(info["message"])
                    except Exception:  # noqa: BLE001
                        return r, 1, "(its message could not be read)"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _peer(self, r: int, code: int, message: str) -> PeerError:
        self.peer_failed = True
        return PeerError(f"rank {r} failed: {message}", code)

    def _failure(self, e: Exception) -> HesscliError:
        peer = self.peer_error(wait=2.0)
        if peer is not None:
            return self._peer(*peer)
        text = clean_message(e)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return HesscliError(
                f"rank {self.rank}: the other ranks did not answer within {self.timeout:g} s (HESSCLI_TIMEOUT); "
                f"a rank is stuck or was killed without a message ({text[:200]})"
            )
        return HesscliError(
            f"rank {self.rank}: lost the connection to the other ranks (one crashed or was killed): {text[:200]}"
        )

    def agree(self, error: BaseException | None) -> None:
        """Every rank says whether it failed; a failure anywhere raises on every rank."""
        if error is not None:
            code = getattr(error, "exit_code", 1)
            msg = (
                error.message if isinstance(error, HesscliError) else f"{type(error).__name__}: {clean_message(error)}"
            )
            self.post_error(msg, code)
        flags = torch.zeros(self.world, dtype=torch.float64)
        flags[self.rank] = 1.0 if error is not None else 0.0
        self.all_reduce(flags)
        if error is not None:
            raise error
        failed = [r for r in range(self.world) if flags[r] > 0]
        if failed:
            peer = self.peer_error(wait=2.0) or (failed[0], 1, "(no message)")
            raise self._peer(*peer)

    @contextmanager
    def stage(self):
        """Run a step that may fail on some ranks only; then all ranks agree (no collectives inside)."""
        try:
            yield
        except Exception as e:
            self.agree(e)
            raise
        self.agree(None)

    # ------------------------------------------------------------------ start-of-run checks

    def check_setup(self, objective, n_local: int) -> None:
        """Gather each rank's sample count and refuse ranks that hold different weights or settings."""
        setup = json.dumps(
            [
                objective.names,
                [list(s) for s in objective.shapes],
                str(objective.dtype),
                objective.loss.name,
                objective.reduction,
            ]
        ).encode()
        h = hashlib.sha256()
        for t in objective.theta:
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        row = torch.tensor([float(n_local), _int53(setup), _int53(h.digest())], dtype=torch.float64)
        rows = self.all_gather(row)
        self.rank_samples = [int(round(v)) for v in rows[:, 0].tolist()]
        for col, what in ((1, "parameters, loss or dtype"), (2, "weights")):
            values = rows[:, col].tolist()
            if len(set(values)) > 1:
                groups: dict[float, list[int]] = {}
                for r, v in enumerate(values):
                    groups.setdefault(v, []).append(r)
                desc = "; ".join(f"rank(s) {','.join(map(str, rs))}: {int(v):013x}" for v, rs in groups.items())
                raise HesscliError(
                    f"the ranks hold different {what} (checksums {desc}); every rank must load the same model "
                    "file with the same options"
                )


def active() -> Comm | None:
    """The communicator of this process, if hesscli runs under torchrun."""
    return _ACTIVE


def from_env() -> Comm | None:
    """A :class:`Comm` when launched by torchrun with WORLD_SIZE > 1 (gloo on CPU, NCCL for CUDA
    tensors with each rank on ``cuda:LOCAL_RANK``), else None."""
    global _ACTIVE, _GENERATION
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if _ACTIVE is not None:
        return _ACTIVE
    import torch.distributed as dist

    if not dist.is_available():
        raise HesscliError("this torch build has no torch.distributed; run hesscli without torchrun")
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = _timeout_from_env()
    cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise HesscliError(
                f"rank {rank}: cannot join the other ranks at {where}: {clean_message(e)[:300]}"
            ) from None
    else:
        backend = str(dist.get_backend())
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:  # noqa: BLE001 - messages from failed ranks are then lost, the errors are not
        store = None
    _GENERATION += 1
    comm = Comm(dist.get_rank(), dist.get_world_size(), local_rank, timeout, store, backend, owns, _GENERATION)
    _ACTIVE = comm
    sys.stdout = _Recorder(sys.stdout)
    sys.stderr = _Recorder(sys.stderr)
    comm.all_reduce(torch.zeros(1))  # connect now, not in the middle of the work
    return comm


def shutdown(code: int, json_status: bool = False) -> None:
    """End this rank's part: post a failure for the others (and wait briefly until they have seen
    it), print rank 0's ``--json`` status on failure, and destroy the process group."""
    global _ACTIVE
    comm = _ACTIVE
    if comm is None:
        return
    _ACTIVE = None
    out, err = sys.stdout, sys.stderr
    if isinstance(out, _Recorder):
        sys.stdout = out._stream
    if isinstance(err, _Recorder):
        sys.stderr = err._stream
    message = err.last_error if isinstance(err, _Recorder) else None
    peer = None
    if code != 0:
        peer = None if comm.posted else comm.peer_error()
        if comm.peer_failed or (peer is not None and code in (130, 143)):
            comm.post("ack")  # this rank failed because another did
            if peer is not None and not comm.peer_failed:
                sys.stderr.write(f"note: rank {peer[0]} failed first: {peer[2]}\n")
                message = f"rank {peer[0]} failed: {peer[2]}"
        else:
            comm.post_error(message or f"exit code {code}", code)
    else:
        comm.post("done")
    if json_status and comm.rank == 0 and code != 0 and not (isinstance(out, _Recorder) and out.written):
        status = {"status": "error", "exit_code": code, "error": message, "rank": comm.rank, "world_size": comm.world}
        sys.stdout.write(json.dumps(status) + "\n")
        sys.stdout.flush()
    import torch.distributed as dist

    if code != 0 and not comm.peer_failed and comm.store is not None:
        # close the connections first: the others' pending collectives fail now, not at the timeout
        _destroy(dist)
        deadline = time.monotonic() + min(ACK_WAIT, comm.timeout)
        others = [r for r in range(comm.world) if r != comm.rank]
        while others and time.monotonic() < deadline:
            others = [r for r in others if not any(comm._has(k, r) for k in ("error", "ack", "done"))]
            time.sleep(0.05)
    if comm.owns_group or code != 0:
        _destroy(dist)


def _destroy(dist) -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
