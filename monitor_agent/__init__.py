"""channelscope's training-side agent: ``init -> log -> finish`` and ``watch``.

Importing this package is light: it needs msgpack and redis, not torch, FastAPI, Dash or
plotly. torch is imported when a model is watched.
"""

from monitor_agent.run import Run, init

__all__ = ["Run", "__version__", "init"]
__version__ = "0.1.0"
