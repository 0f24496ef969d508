"""Set before any test module imports triton (which reads it when `kvkit.kernels` is first
imported): Triton kernels run through the interpreter on CPU. A GPU run sets TRITON_INTERPRET=0."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
