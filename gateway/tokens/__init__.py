"""Access tokens: the issuer's key set (``jwks``) and JWT validation (``validator``)."""
