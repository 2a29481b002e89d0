"""``authz envoy-config``: Envoy config for this service, built from typed messages.

The typed messages (envoy-data-plane) check every field name and type as the config is
built; ``envoy --mode validate`` checks the rest in the tests. They are for building
config only, never on the request path (a parse costs ~200x xds-protos'), so nothing
outside this package imports them, and :mod:`authz.envoyconf.command` only on demand.
"""
