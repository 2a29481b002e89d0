"""``python -m bench``: wrk -> the real Envoy -> a direct_response, with and without authz.

See docs/performance.md for what each configuration is and the figures measured here.
"""
