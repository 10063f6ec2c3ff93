"""The δ small models in a process of their own, beside the big model's.

In vLLM's worker process the small models' Python (transformers runs every layer eagerly) and the
big model's share one interpreter lock: with the small pair on a spare core they still took turns
with the big model's forward pass (δ at 0.77 of its ideal ratio on a bf16 machine before the
pair's weights were prepacked, 0.89 since: `offset.cpu_gemm`). A child
process has a lock of its own, so on a core that is really spare the pair's step runs while the
big model's does. Opt-in (`OBLIVIATE_DELTA_PROCESS=1`): on 2 cores it was slower, 0.72 of the
ideal ratio against 0.86 in process (docs/results/delta-bench.md).

`OffsetProcess` starts `python -m offset.offset_process` with one end of a socket pair, bound to
the given CPUs, and asks it, over `multiprocessing.connection`, to load pairs and to compute
offsets; `RemotePair` is the `OffsetPair` interface the logits processor uses (`offsets`,
`release`). Releases ride on the next request (no round trip of their own). Offsets come back as
raw bytes in the small models' dtype, so the sums the processor forms are those of the
in-process pair, bit for bit.

Failures are the caller's to fail closed: a child that errs answers with its traceback, and one
that dies, hangs past `timeout` or sends garbage raises `OffsetProcessError`; the process is then
stopped, and the next `pair()` starts a fresh one (pairs of the dead one keep raising).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Hashable, Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from .delta import DeltaSpec, OffsetModels

logger = logging.getLogger(__name__)

PairKey = tuple[str, str]
"""(unlearned folder, base folder): a pair inside the child."""


def _dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: how a dtype travels on the command line and the wire."""
    return str(dtype).removeprefix("torch.")


_DTYPES = {_dtype_name(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class OffsetProcessError(RuntimeError):
    """The child process failed, died or did not answer in time."""


class OffsetProcess:
    """A child process holding `OffsetModels` (one per client; see module doc)."""

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        cpus: set[int] | None = None,
        *,
        load_timeout: float = 600.0,
        timeout: float = 300.0,
    ) -> None:
        self.dtype = dtype
        self.cpus = set(cpus or ())
        self.load_timeout = load_timeout
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._generation = 0
        self._releases: list[tuple[PairKey, Hashable]] = []
        self._pairs: dict[PairKey, RemotePair] = {}
        """The current child's pairs: one object per pair, so callers batch its rows together."""

    # -- the child's lifetime -------------------------------------------------------------

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "offset.offset_process", "--fd", str(theirs.fileno())]
        command += ["--dtype", _dtype_name(self.dtype)]
        if self.cpus:
            command += ["--cpus", ",".join(str(c) for c in sorted(self.cpus))]
        try:
            self._child = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._generation += 1
        self._releases.clear()
        self._pairs.clear()
        logger.info("δ: small models run in process %d (CPUs %s)", self._child.pid,
                    sorted(self.cpus) or "any")  # fmt: skip

    def alive(self) -> bool:
        """Whether the child runs (it may not have been started yet)."""
        return self._child is not None and self._child.poll() is None

    def close(self) -> None:
        """Stop the child (it also exits on its own when this end closes)."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        conn, child, self._conn, self._child = self._conn, self._child, None, None
        if conn is not None:
            conn.close()
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def __del__(self) -> None:
        try:
            self._stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to tell
            pass

    # -- requests -------------------------------------------------------------------------

    def _ask(self, message: tuple[Any, ...], timeout: float) -> tuple[Any, list[bytes]]:
        """Send `message`, return the reply's header and its raw payloads; raise on failure."""
        conn = self._conn
        if conn is None or not self.alive():
            raise OffsetProcessError("the δ offset process is not running")
        try:
            conn.send(message)
            if not conn.poll(timeout):
                raise OffsetProcessError(f"the δ offset process did not answer in {timeout:.0f} s")
            status, header, count = conn.recv()
            payloads = [conn.recv_bytes() for _ in range(count)]
        except OffsetProcessError:
            self._stop()
            raise
        except Exception as error:  # broken pipe, EOF, a reply that does not unpickle, ...
            # The stream's state is unknown from here on: never read another reply from it.
            self._stop()
            raise OffsetProcessError(f"the δ offset process failed: {error!r}") from error
        if status != "ok":
            raise OffsetProcessError(f"the δ offset process raised:\n{header}")
        return header, payloads

    def pair(self, spec: DeltaSpec) -> RemotePair:
        """Load `spec`'s models in the child (starting it if needed); raise if they fail."""
        key = (spec.unlearned, spec.base)
        with self._lock:
            if not self.alive():
                self._stop()
                self._start()
            if key not in self._pairs:
                self._ask(("load", key), self.load_timeout)
                self._pairs[key] = RemotePair(self, key, self._generation)
            return self._pairs[key]

    def offsets(
        self, key: PairKey, generation: int, batch: Sequence[tuple[Hashable, Sequence[int]]]
    ) -> Tensor:
        """`OffsetPair.offsets` of the pair `key` in the child: (B, V) in the pair's dtype."""
        with self._lock:
            if generation != self._generation:
                raise OffsetProcessError("the δ offset process holding this pair has stopped")
            releases, self._releases = self._releases, []
            rows = [(seq_id, list(ids)) for seq_id, ids in batch]
            (shape, dtype), (payload,) = self._ask(("offsets", releases, key, rows), self.timeout)
        flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return flat.view(_DTYPES[dtype]).view(shape)

    def release(self, key: PairKey, generation: int, seq_id: Hashable) -> None:
        """Forget a finished sequence's caches (sent with the next request)."""
        with self._lock:
            if generation == self._generation:
                self._releases.append((key, seq_id))


class RemotePair:
    """A pair of small models inside an `OffsetProcess`; what `OffsetPair` offers the processor."""

    def __init__(self, process: OffsetProcess, key: PairKey, generation: int) -> None:
        self._process = process
        self._key = key
        self._generation = generation

    def offsets(self, batch: Sequence[tuple[Hashable, Sequence[int]]]) -> Tensor:
        """Offsets (B, V) for (seq_id, token_ids) pairs (see `OffsetPair.offsets`)."""
        return self._process.offsets(self._key, self._generation, batch)

    def release(self, seq_id: Hashable) -> None:
        """Forget the caches of a finished sequence."""
        self._process.release(self._key, self._generation, seq_id)


# -- the child ------------------------------------------------------------------------------


def _serve(conn: Connection, models: OffsetModels) -> None:
    """Answer requests until the other end closes: ("load", key), ("offsets", ...)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if message[0] == "load":
                unlearned, base = message[1]
                models.pair(DeltaSpec(unlearned, base))
                conn.send(("ok", None, 0))
            elif message[0] == "offsets":
                _, releases, key, rows = message
                for (unlearned, base), seq_id in releases:
                    models.pair(DeltaSpec(unlearned, base)).release(seq_id)
                with torch.inference_mode():
                    out = models.pair(DeltaSpec(*key)).offsets(rows).contiguous()  # (B, V)
                conn.send(("ok", (tuple(out.shape), _dtype_name(out.dtype)), 1))
                conn.send_bytes(out.view(torch.uint8).numpy().tobytes())
            else:
                raise ValueError(f"unknown request {message[0]!r}")
        except Exception:  # noqa: BLE001 - the parent fails its requests closed
            conn.send(("error", traceback.format_exc(), 0))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpus", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s δ-offsets %(message)s")
    cpus = {int(c) for c in args.cpus.split(",") if c}
    if cpus:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))
    conn = Connection(args.fd)
    _serve(conn, OffsetModels(args.device, _DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
