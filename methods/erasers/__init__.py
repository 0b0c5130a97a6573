"""Erasers: one file per method with its paper's equation, its official defaults and every deviation from the
official code; `base.py` holds what they share (the request, the result, the registry, the optimisation loop)
and `xattn.py` the cross-attention projections the closed-form methods edit."""
