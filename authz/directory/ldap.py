"""ldap3, imported once with pyasn1's rename warnings silenced.

ldap3 2.9.1 (its latest release) imports ``tagMap`` and ``typeMap`` from pyasn1, which
pyasn1 0.6.1 renamed and now warns about (DeprecationWarning) at import. The names still
work; the warning is pyasn1's note to ldap3, not to us, and under ``-W error`` (our test
suite) it would stop the import. Every module of ours imports ldap3 from here.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r".* is deprecated\. Please use .* instead\.", category=DeprecationWarning
    )
    import ldap3
    from ldap3.core.exceptions import LDAPException
    from ldap3.operation.search import MATCH_EQUAL, parse_filter

__all__ = ["MATCH_EQUAL", "LDAPException", "ldap3", "parse_filter"]
