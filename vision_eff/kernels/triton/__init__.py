"""Triton kernels (imported lazily: ``import triton`` happens only when a kernel runs).

``flash``: flash attention forward/backward with an additive bias and key padding;
``match``: fused cosine-similarity row max/argmax for token merging.
On CPU they run only under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""
