"""Dask clients: a local cluster by default, a running scheduler, or SLURM jobs.

The ``[dask]`` section of a run config (:class:`flowmodel.config.DaskSection`)
chooses where raster zonal statistics and blockwise prediction run:

- ``cluster = "local"`` (default): a :class:`distributed.LocalCluster` on this
  machine, threaded workers in this process (``processes = false``) or worker
  processes, each with ``memory_limit``;
- ``scheduler = "tcp://host:8786"`` (or ``--scheduler`` on the command line):
  connect to a scheduler that is already running;
- ``cluster = "slurm"``: worker jobs submitted through
  :class:`dask_jobqueue.SLURMCluster` (``queue``, ``account``, ``cores``,
  ``memory``, ``walltime``), scaled to ``n_workers`` jobs;
- ``cluster = "none"``: no client; dask's default threaded scheduler.

While a client is open it is dask's default, so library code that computes
dask collections uses its workers without being handed the client.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from flowmodel.config import DaskSection, RunConfig
from flowmodel.exceptions import ConfigError

__all__ = ["dask_client", "get_client", "is_remote", "slurm_cluster_kwargs"]

logger = logging.getLogger("flowmodel.parallel")


def _section(config: DaskSection | RunConfig | None) -> DaskSection:
    if config is None:
        return DaskSection()
    if isinstance(config, RunConfig):
        return config.dask
    return config


def is_remote(config: DaskSection | RunConfig | None, scheduler: str | None = None) -> bool:
    """Whether the workers live outside this process's machine (scheduler address or SLURM)."""
    section = _section(config)
    return bool(scheduler or section.scheduler or section.cluster == "slurm")


def slurm_cluster_kwargs(config: DaskSection) -> dict[str, Any]:
    """Keyword arguments of :class:`dask_jobqueue.SLURMCluster` for a ``[dask]`` section."""
    kwargs: dict[str, Any] = {
        "cores": config.cores,
        "memory": config.memory,
        "walltime": config.walltime,
        "processes": 1,
    }
    if config.queue:
        kwargs["queue"] = config.queue
    if config.account:
        kwargs["account"] = config.account
    if config.job_extra_directives:
        kwargs["job_extra_directives"] = list(config.job_extra_directives)
    return kwargs


def get_client(
    config: DaskSection | RunConfig | None = None,
    *,
    scheduler: str | None = None,
    timeout: str = "10s",
) -> Any:
    """Start (or connect to) the dask cluster a config asks for and return its client.

    Parameters
    ----------
    config
        A run config or its ``[dask]`` section; None means the defaults (one
        local threaded worker using every core).
    scheduler
        Scheduler address; overrides ``config.scheduler`` and ``config.cluster``.
    timeout
        How long to try to reach a scheduler address.

    Returns
    -------
    distributed.Client or None
        The client (None for ``cluster = "none"``). Close it with
        ``client.close()``; a cluster started here is closed with it
        (``client.cluster.close()``), or use :func:`dask_client`.

    Raises
    ------
    ConfigError
        ``cluster = "slurm"`` without dask-jobqueue installed, or a scheduler
        that cannot be reached.
    """
    section = _section(config)
    address = scheduler or section.scheduler
    if address is None and section.cluster == "none":
        return None
    from distributed import Client

    if address is not None:
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as err:
            raise ConfigError(
                f"[dask] scheduler: cannot reach the dask scheduler at {address!r} ({err}). "
                "Fix: start it (dask scheduler) or correct the address."
            ) from None
        logger.info("dask: connected to scheduler %s", address)
        return client
    if section.cluster == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError:
            raise ConfigError(
                "[dask] cluster = 'slurm' needs dask-jobqueue. Fix: pip install 'flowmodel[hpc]' "
                "(or conda install -c conda-forge dask-jobqueue)."
            ) from None
        kwargs = slurm_cluster_kwargs(section)
        cluster = SLURMCluster(**kwargs)
        jobs = section.n_workers or 1
        cluster.scale(jobs=jobs)
        logger.info(
            "dask: SLURM cluster, %d worker job(s) of %s core(s), %s, walltime %s%s; "
            "scheduler %s (job script: %s)",
            jobs,
            kwargs["cores"],
            kwargs["memory"],
            kwargs["walltime"],
            f", partition {kwargs['queue']}" if "queue" in kwargs else "",
            cluster.scheduler_address,
            " ".join(line for line in cluster.job_header.splitlines() if "#SBATCH" in line),
        )
        return Client(cluster)
    from distributed import LocalCluster

    n_workers = section.n_workers or 1
    threads = section.threads_per_worker or max(1, (os.cpu_count() or 1) // n_workers)
    # A threaded worker lives in this process, and dask measures its memory as the
    # whole process's RSS: a limit there would pause the workers as soon as the
    # caller itself (PyMC, data) is large, and computations would hang. The limit
    # therefore only applies to worker processes.
    memory_limit = section.memory_limit if section.processes else None
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads,
        processes=section.processes,
        memory_limit=memory_limit,
        dashboard_address=None,
    )
    logger.info(
        "dask: local cluster, %d worker(s) x %d thread(s), %s, memory limit %s",
        n_workers,
        threads,
        "processes" if section.processes else "threads",
        memory_limit or "none (threads share this process)",
    )
    return Client(cluster)


@contextlib.contextmanager
def dask_client(
    config: DaskSection | RunConfig | None = None,
    *,
    scheduler: str | None = None,
) -> Iterator[Any]:
    """Context manager around :func:`get_client` that closes the client and any cluster it started.

    Examples
    --------
    >>> from flowmodel.config import DaskSection
    >>> with dask_client(DaskSection(n_workers=2)) as client:  # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    client = get_client(config, scheduler=scheduler)
    try:
        yield client
    finally:
        if client is not None:
            cluster = getattr(client, "cluster", None)
            owns = scheduler is None and _section(config).scheduler is None
            client.close()
            if cluster is not None and owns:
                cluster.close()
