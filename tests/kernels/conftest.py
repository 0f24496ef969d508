"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when `kvkit.kernels` is first
imported, so it is set here, before any test module of this folder imports triton
(`test_interpreter_is_on` checks that it took effect). A GPU run sets TRITON_INTERPRET=0 and
the same tests run compiled on CUDA tensors; `@pytest.mark.gpu` tests run only then.
"""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def device() -> str:
    """Where kernel inputs live: CPU under the interpreter, else CUDA."""
    from kvkit.kernels._common import interpreted
    from kvkit.kernels._sparse_decode import _sparse_decode_kernel
    if interpreted(_sparse_decode_kernel):
        return "cpu"
    if not torch.cuda.is_available():  # fail, never skip: a kernel test that skips on CPU tests nothing
        pytest.fail("kvkit.kernels was imported before TRITON_INTERPRET=1 was set (or it is set to 0) and "
                    "there is no CUDA: the kernels cannot run. Import kvkit.kernels lazily elsewhere.")
    return "cuda"


def pytest_collection_modifyitems(config, items):
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("0", "", "false", "False")
    if torch.cuda.is_available() and not interp:
        return
    skip = pytest.mark.skip(reason="needs CUDA and compiled Triton (TRITON_INTERPRET=0)")
    here = Path(__file__).parent
    for item in items:  # this hook sees the whole session: touch only this folder's tests
        if "gpu" in item.keywords and Path(item.path).is_relative_to(here):
            item.add_marker(skip)
