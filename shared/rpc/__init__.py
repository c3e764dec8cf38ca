"""gRPC plumbing both servers share: generated stubs (stubs/), domain <-> message conversions
(convert.py), the error -> status tables (errors.py), server set-up and graceful stop (server.py), health, and
the guard for unparsable requests. May import the base modules only; knows no service's domain.
"""
