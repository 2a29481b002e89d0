"""Mint a demo JWT signed with examples/dev/signing-key.pem (FOR LOCAL TRIALS ONLY).

    python examples/dev/mint_token.py --sub alice --org acme --department research --group team-nlp

The key pair in this folder is public: never trust examples/dev/jwks.json in production.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jwt

HERE = Path(__file__).parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sub", default="alice")
    p.add_argument("--org", default="acme")
    p.add_argument("--department", default="research")
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--client-id", help="mint an app (client-credentials) token instead")
    p.add_argument("--ttl", type=int, default=3600)
    a = p.parse_args()
    now = int(time.time())
    claims = {"iss": "https://idp.example.com/", "aud": "llm-gateway", "iat": now,
              "exp": now + a.ttl, "sub": a.sub, "org_id": a.org, "department": a.department,
              "groups": a.group or ["team-nlp"]}
    if a.client_id:
        claims["client_id"] = a.client_id
    key = (HERE / "signing-key.pem").read_bytes()
    print(jwt.encode(claims, key, algorithm="RS256", headers={"kid": "dev-1"}))


if __name__ == "__main__":
    main()
