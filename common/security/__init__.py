"""Security shared by every component: TLS transport (``tls``) and certificate identities (``identity``)."""
