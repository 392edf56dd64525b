"""Triton kernels for mage_fast's hot paths, one file per op.

Each file holds the kernels, their launcher, the ``torch.library`` custom ops (with fake
implementations, so they trace under ``torch.compile`` and CUDA graphs) and, where training
differentiates the op, an autograd Function. Importing a file imports ``triton``; the dispatcher
(:mod:`mage_fast.backends.triton`) does that lazily on the first call that selects Triton.

On a machine without a GPU the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is
set before the first kernel file is imported; that is how the CPU tests run them.
"""
