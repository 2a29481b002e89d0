"""Changes the service makes to the bodies it passes on, one module per direction.

Kept apart from the ext_proc processor (which only routes messages) and from the
estimate (which only reads), as envoyproxy/ai-gateway keeps its body mutators:
:mod:`authz.mutate.request` for what goes upstream.
"""
