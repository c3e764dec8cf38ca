"""Who may talk to whom: TLS for gRPC (tls.py), tokens and roles (auth.py) enforced per method
(access.py), the certificates (certs.py), Redis users (redis_acl.py) and the compose stack's
secrets (deploy_secrets.py). May import the base modules only.
"""
