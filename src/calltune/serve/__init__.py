"""Serving: an OpenAI-compatible HTTP server for tuned models (`calltune serve`).

`create_app` builds the FastAPI app for ``{name: model}``; `run` serves it with uvicorn. The engine
(`calltune.infer.engine`) is shared with `calltune chat`.
"""

from calltune.serve.app import create_app, run

__all__ = ["create_app", "run"]
