"""How `tandem` ends: a command's result or error as an exit code, the error as one line on stderr.

Bad input (ValueError, LookupError, OSError: an unknown preset or dataset, a
spec that cannot work, a missing or corrupt file) and a call a service
refuses (grpc.RpcError) are `tandem: error: ...` with exit code 2, like a
usage error, and without a traceback; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

EXIT_ERROR = 2  # the exit code argparse uses for usage errors
EXIT_JOB_UNSUCCESSFUL = 1  # a job watched to its end FAILED or was CANCELLED
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command (`args.run`); its exit code, with an error it may meet reported."""
    try:
        exit_code = args.run(args)  # None for success, as for most commands
    except BrokenPipeError:  # the reader went away, as in `tandem predict ... | head`
        # Point stdout at /dev/null, or Python fails again flushing it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    # SpecError, CheckpointError and DatasetError are ValueErrors; DatasetNotFound is a LookupError.
    except (ValueError, LookupError, OSError) as error:
        return report(error_message(error))
    except grpc.RpcError as error:  # from `jobs ...` (--trainer) or `predict --server`
        exit_code = report(f"{error.code().name}: {error.details()}")
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            print(unavailable_hint(args), file=sys.stderr)
        return exit_code
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return exit_code or 0


def report(message: str) -> int:
    """Print `tandem: error: message` on stderr; return the exit code for it."""
    print(f"tandem: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def error_message(error: Exception) -> str:
    """The error's message; for a file error, `path: reason` rather than `[Errno 2] ...`."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def unavailable_hint(args: argparse.Namespace) -> str:
    """What to try when the service a command called is UNAVAILABLE."""
    tls = (
        "If it serves TLS, trust its CA with --tls-ca (and, for mutual TLS, give "
        "--tls-cert and --tls-key); a TLS handshake that fails looks like this too."
    )
    if getattr(args, "server", None):
        return (
            f"tandem: is an inference service at {args.server}, with a version of "
            f"{args.model_name!r} loaded? Start one with `python -m infer_svc`, or name "
            f"another with --server HOST:PORT. {tls}"
        )
    return (
        f"tandem: no trainer answers at {args.trainer}? Start one with "
        f"`python -m trainer_svc`, or name another with --trainer HOST:PORT. {tls}"
    )
