"""Whether ``torch.autocast`` is on for a device type, in a form that
torch.compile traces on every supported torch release."""

from __future__ import annotations

import contextlib

import torch

# torch.amp.is_autocast_available per device type, looked up outside any
# trace: dynamo in torch 2.11 cannot trace the C function behind it (a graph
# break, an error under fullgraph=True), but it reads a dict.
_AVAILABLE: dict[str, bool] = {}


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device type
    autocast does not know (meta), where ``torch.is_autocast_enabled`` raises."""
    available = _AVAILABLE.get(device_type)
    if available is None:
        available = _AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    return available and torch.is_autocast_enabled(device_type)


for _device_type in ("cpu", "cuda", "meta", "xpu", "mps", "hpu", "mtia", "xla", "privateuseone",
                     "maia", "ipu", "lazy"):
    _AVAILABLE[_device_type] = torch.amp.is_autocast_available(_device_type)
del _device_type


def outside_autocast(device_type: str):
    """A context in which autocast is off for ``device_type`` (a null one
    where it is off already): for products that must keep their operands'
    dtype, such as a weight formed from factors, which autocast would
    otherwise round to its half type."""
    if autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
