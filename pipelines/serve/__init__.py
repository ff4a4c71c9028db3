"""Online editing over HTTP: a Ray Serve app (FastAPI ingress + model deployment) and ``instdiff serve``.

Modules: :mod:`~pipelines.serve.config` (the app's ``args``), :mod:`~pipelines.serve.parsing` (request bodies),
:mod:`~pipelines.serve.engine` (edits without Ray), :mod:`~pipelines.serve.sessions` (FISEdit sessions),
:mod:`~pipelines.serve.model` and :mod:`~pipelines.serve.ingress` (the deployments), :mod:`~pipelines.serve.app`
(the application builder ``build_app`` and the routing choice), :mod:`~pipelines.serve.cli` (``instdiff serve``),
``static/`` (the web page). This ``__init__`` imports nothing, so ``instdiff --help`` does not load Ray Serve.
"""
