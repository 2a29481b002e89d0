"""The only package that imports Envoy's protos (the project's own, :mod:`authz.proto`)."""
