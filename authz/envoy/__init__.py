"""The only package that imports Envoy's protos (from ``xds-protos``, upb-backed)."""
