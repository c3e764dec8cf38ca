"""Who may talk to whom: TLS for gRPC and HTTP (tls.py), tokens and roles (auth.py) enforced per
method or route (access.py), the certificates (certs.py), Redis users (redis_acl.py) and the compose stack's
secrets (deploy_secrets.py). May import the base modules only.
"""
