"""Serving: an OpenAI-compatible HTTP server (`python -m nvlm_jax.serve`) over a
continuous-batching engine built on the one KV-cache decoder (`nvlm_jax.generate`).

engine.py: slots, prefill/decode scheduling, stop handling, events; requests.py: parsing and
validation of chat-completions requests and their images; image_cache.py: projected image
tokens by content hash; app.py: the Starlette routes; __main__.py: the CLI.
"""
