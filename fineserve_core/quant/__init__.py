"""Quantization formats of FineServe's precisions (bf16 | fp8 | w4a8kv4): torch references.

See `fineserve_core.quant.formats` for the exact numerics every kernel must reproduce.
"""
from fineserve_core.quant.formats import *  # noqa: F401,F403
from fineserve_core.quant.formats import __all__  # noqa: F401
