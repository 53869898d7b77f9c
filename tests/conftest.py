import pytest
import torch

import lowrank_ext
from lowrank_ext import _backend

COMPILED = _backend.compiled
# Read as the package reads it (1/true/yes/on, any case): "off" is no forcing.
FORCED_FALLBACK = (_backend.fallback_reason is not None
                   and _backend.FORCE_FALLBACK_ENV in _backend.fallback_reason)
HAS_CUDA = torch.cuda.is_available()

# Tolerances against a float64 reference, per dtype (relative to the output's scale).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}
DTYPES = list(TOLERANCES)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_compiled = pytest.mark.skipif(not COMPILED, reason="needs the compiled extension")


def pytest_report_header(config):
    info = lowrank_ext.backend_info()
    return (f"lowrank_ext {info['version']}: compiled={info['compiled']} cpu={info['cpu']} "
            f"cuda={info['cuda']} fallback_reason={info['fallback_reason']}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def interrupt_swap(monkeypatch):
    """``interrupt_swap(n)``: the n-th module swap (``_modules.replace_module``,
    which every swap goes through) raises KeyboardInterrupt instead of
    swapping; returns the list of the names swaps were asked for."""
    import lowrank_ext._modules as modules

    replace = modules.replace_module

    def arm(n):
        calls = []

        def interrupted(*args):
            calls.append(args[1])
            if len(calls) == n:
                raise KeyboardInterrupt
            return replace(*args)

        monkeypatch.setattr(modules, "replace_module", interrupted)
        return calls

    return arm
