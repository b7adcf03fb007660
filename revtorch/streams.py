"""The streams PaReprop's backward runs on, as a tiny abstraction over CUDA streams.

A pareprop step holds two independent pieces of work, the gradient of one half-layer and the
rebuild of the next (``core``). Autograd runs a backward op on its forward op's stream, so a
half's gradient runs on the stream where the half was rebuilt: every G half on stream 0,
every F half on stream 1 (they alternate in the walk), ``CALLER`` the caller's own stream.
The schedule is written once against ``InOrderStreams``' four calls: ``on`` (run work on a
stream), ``record`` and ``wait`` (an event and a device-side wait on it, never a host-side
synchronisation) and ``keep`` (``record_stream``: a tensor made on one stream is used on
another). On CUDA they map onto ``torch.cuda`` streams and events (``CudaStreams``);
elsewhere the same schedule runs in order. Tests replace ``streams_for`` with stand-ins that
record the schedule.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

CALLER = 2  # stream index of the caller's stream; 0 and 1 are pareprop's two work streams


class InOrderStreams:
    """Streams for devices without them: everything runs in order on the caller's thread."""

    def on(self, k: int, label: tuple[str, str, int]) -> contextlib.AbstractContextManager:
        """Run the enclosed work on stream k; ``label`` names it: ``("rebuild" | "grads",
        "G" | "F", layer)``."""
        return contextlib.nullcontext()

    def record(self, k: int) -> Any:
        """An event marking the work enqueued so far on stream k."""
        return None

    def wait(self, k: int, event: Any) -> None:
        """Stream k's later work waits for ``event`` (on the device, never on the host)."""

    def keep(self, tensor: Tensor, k: int) -> None:
        """``tensor``, allocated on another stream, is used on stream k (``record_stream``)."""


class CudaStreams(InOrderStreams):
    """Two fresh CUDA streams (0, 1) plus the caller's current stream (``CALLER``)."""

    def __init__(self, device: torch.device) -> None:
        caller = torch.cuda.current_stream(device)
        self.streams = (torch.cuda.Stream(device), torch.cuda.Stream(device), caller)

    def on(self, k, label):
        return torch.cuda.stream(self.streams[k])

    def record(self, k):
        return self.streams[k].record_event()

    def wait(self, k, event):
        self.streams[k].wait_event(event)

    def keep(self, tensor, k):
        tensor.record_stream(self.streams[k])


def streams_for(device: torch.device) -> InOrderStreams:
    """The streams PaReprop runs on for ``device``."""
    return CudaStreams(device) if device.type == "cuda" else InOrderStreams()
