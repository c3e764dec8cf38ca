"""Connecting to Redis: the address from the environment, bounded retries, one clear error.

`REDIS_URL` names the server:

    redis://[[user]:password@]host[:port][/db]        TCP
    rediss://[[user]:password@]host[:port][/db]       TCP with TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]

A password may instead come from `REDIS_PASSWORD`, to keep it out of the URL;
one in the URL wins. Passwords (percent-encode special characters in a URL)
never appear in messages: `describe` rebuilds the address from the
connection's settings, without credentials.

A command that fails with a ConnectionError or TimeoutError is retried with
exponential backoff (0.1 s, 0.2 s, 0.4 s, … capped at 2 s, 6 retries: about 5 s
in all), which rides out a Redis restart. Once the retries are used up, the
code that called Redis raises `StoreUnavailable` (see `unavailable_on_error`).
Authentication failures are not retried: waiting does not fix a password.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import SSLConnection, UnixDomainSocketConnection
from redis.retry import Retry

DEFAULT_RETRIES = 6
DEFAULT_TIMEOUT = 10.0          # seconds, for connecting and for each reply
HEALTH_CHECK_INTERVAL = 15      # seconds idle before a pooled connection is PINGed
BACKOFF = ExponentialBackoff(base=0.05, cap=2.0)   # waits base * 2**failure


class StoreUnavailable(RuntimeError):
    """Redis could not be reached (or refused the command) after the client's retries."""


class TransientErrorRetry(Retry):
    """redis-py's Retry, except that it gives up at once on an AuthenticationError.

    redis-py counts authentication failures as ConnectionErrors, and retries
    them; without a password, its handshake even nests two retry loops
    (about 40 s before the error shows).
    """

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def transient(error: Exception) -> bool:
            return not isinstance(error, redis.AuthenticationError) and (
                is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, transient, with_failure_count)


def redis_url_from_env() -> str | None:
    return os.environ.get("REDIS_URL") or None


def connect(url: str | None = None, *, retries: int = DEFAULT_RETRIES,
            timeout: float = DEFAULT_TIMEOUT) -> redis.Redis:
    """A client for `url` (default: `REDIS_URL`); it connects lazily, on the first command.

    Replies are bytes (decode_responses=False): checkpoints are binary.
    """
    url = url or redis_url_from_env()
    if not url:
        raise ValueError("no Redis address: set REDIS_URL (redis://, rediss:// or unix://)")
    return redis.Redis.from_url(
        url,
        password=os.environ.get("REDIS_PASSWORD") or None,
        decode_responses=False,
        retry=TransientErrorRetry(BACKOFF, retries),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=HEALTH_CHECK_INTERVAL,
    )


def describe(client: redis.Redis) -> str:
    """The client's server address as a URL, without username or password."""
    pool = client.connection_pool
    settings = pool.connection_kwargs
    db = settings.get("db", 0)
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return f"unix://{settings['path']}" + (f"?db={db}" if db else "")
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    return f"{scheme}://{settings.get('host', 'localhost')}:{settings.get('port', 6379)}/{db}"


def read_timeout(client: redis.Redis) -> float | None:
    """How long the client waits for a reply; blocking commands must block for less."""
    return client.connection_pool.connection_kwargs.get("socket_timeout")


@contextmanager
def unavailable_on_error(client: redis.Redis):
    """Re-raise a Redis error that got past the client's retries as StoreUnavailable."""
    try:
        yield
    except redis.AuthenticationError as error:
        raise StoreUnavailable(f"Redis at {describe(client)} refused the credentials: {error}") from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        attempts = client.get_retry().get_retries() + 1
        raise StoreUnavailable(
            f"Redis at {describe(client)} unavailable after {attempts} attempts: {error}"
        ) from error
    except redis.RedisError as error:
        raise StoreUnavailable(f"Redis at {describe(client)} failed: {error}") from error
