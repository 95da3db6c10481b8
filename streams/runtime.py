"""Process-wide runtime settings that the pure core must not make itself."""

from __future__ import annotations

import os
import signal
import subprocess


def configure_threads(blas_threads: int = 1) -> None:
    """Pin BLAS to ``blas_threads`` threads.

    The kNN scan multiplies small matrices (a batch of 64-256 events against a
    few thousand reference vectors). OpenBLAS spreading those over threads costs
    far more than it gains: measured 5.5 ms instead of 0.17 ms per 64 x 2000 x 8
    product on the 2-core machine while other work ran. torch's thread count for
    the text model is set separately (``NWATCH_MODELS__THREADS``).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(blas_threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(blas_threads))
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=blas_threads, user_api="blas")


def stop_process_group(proc: subprocess.Popen, *, timeout: float = 20.0) -> int:
    """SIGTERM the child's process group, SIGKILL it after ``timeout``; returns the exit code.

    The child must have been started with ``start_new_session=True`` so that its
    group holds it and whatever it started, and nothing else.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
    return proc.returncode
