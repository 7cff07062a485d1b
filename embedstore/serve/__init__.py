"""``embedstore serve``: a prompt playground in the browser, on the cache.

- :mod:`embedstore.serve.variant`: what the page edits (aggregate, scale, drop, weights, the prompt
  list) and how it becomes an experiment config, a prompt-set file and a saved TOML.
- :mod:`embedstore.serve.playground`: the server's state: one :class:`~embedstore.score.session.Session`
  behind a lock, recent results, background jobs, the variants kept; every number comes from the
  library functions the CLI uses (classify's session, query, search, tune's objective).
- :mod:`embedstore.serve.app`: the HTTP API (FastAPI) and the static page (``static/``).

Nothing here imports torch, PIL or open_clip: the CLI passes in the prompt encoder, the image
encoder and the thumbnail loader.
"""
