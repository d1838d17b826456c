"""peftprof: memory and performance profiler for parameter-efficient fine-tuning.

Pipeline stages, one module (or package) each: scenario -> estimate -> run -> report -> gate.
Nothing here imports torch at import time; the CLI starts fast.
"""

__version__ = "0.1.0"
