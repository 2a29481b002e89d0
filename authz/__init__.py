"""authz: token-budget authorization for AI gateways.

The gateway (Envoy ext_authz) asks :func:`authz.enforcer.Enforcer.check` whether a caller
may spend tokens; the response hook (Envoy ext_proc) settles the reservation from the
real usage the model reported.
"""

__version__ = "0.1.0"
