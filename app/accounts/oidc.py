"""Sign-in through an OpenID Connect provider (the team's single sign-on), with Authlib.

The authorization code flow with PKCE (S256) and a nonce: /account/oidc sends the browser to the
provider, which sends it back to /account/oidc/callback with a code; Authlib exchanges it for tokens,
checks the ID token (signature from the provider's JWKS, issuer, audience, nonce) and the state kept in
the signed session. The user is found by (issuer, subject), the provider's stable id, never by name or
e-mail; someone new gets an account with --oidc-role (or none: only users an admin linked with
`saescope user add NAME --oidc-subject SUB`). Tested against npm's oidc-provider (tests/test_accounts_oidc.py).
"""

from __future__ import annotations

import os

from authlib.integrations.starlette_client import OAuth

from sae_core.config import AuthConfig
from sae_core.errors import SaescopeError

ENV_CLIENT_SECRET = "SAESCOPE_OIDC_CLIENT_SECRET"


class OIDC:
    def __init__(self, config: AuthConfig, client_secret: str | None = None):
        assert config.oidc_issuer
        if not config.oidc_client_id:
            raise SaescopeError("--oidc-issuer needs --oidc-client-id (and the secret in $SAESCOPE_OIDC_CLIENT_SECRET)")
        secret = client_secret or os.environ.get(ENV_CLIENT_SECRET)
        self.issuer = config.oidc_issuer.rstrip("/")
        self.name = config.oidc_name
        self.new_user_role = config.oidc_role
        self.oauth = OAuth()
        self.client = self.oauth.register(
            "oidc",
            server_metadata_url=f"{self.issuer}/.well-known/openid-configuration",
            client_id=config.oidc_client_id,
            client_secret=secret,
            client_kwargs={"scope": "openid profile email", "code_challenge_method": "S256"},
        )
