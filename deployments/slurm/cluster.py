"""Start oncoflow's Dask workers as Slurm jobs (dask-jobqueue) and print the scheduler address.

Run on a login node inside the oncoflow checkout (dask-jobqueue comes with ``uv sync``'s
development group; in a production install add it with ``uv pip install dask-jobqueue``)::

    export PREFECT_API_URL=http://prefect.hospital.example:4200/api
    uv run python deployments/slurm/cluster.py --jobs 8 &
    ADDR=$(cat ~/.oncoflow-dask-address)
    oncoflow run SOURCE --site site-a --store s3://bucket/stores --dask-address "$ADDR"

The scheduler runs in this process; the workers are Slurm jobs configured by
``deployments/slurm/jobqueue.yaml``. Stop with Ctrl-C (the jobs are cancelled).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask.config
import yaml

CONFIG = Path(__file__).with_name("jobqueue.yaml")


def load_config() -> None:
    """Merge ``jobqueue.yaml`` into Dask's configuration."""
    dask.config.update(dask.config.config, yaml.safe_load(CONFIG.read_text()), priority="new")


def main() -> None:
    """Start the cluster, scale it to ``--jobs`` Slurm jobs and wait until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="Slurm jobs (one worker each)")
    parser.add_argument(
        "--address-file", default=str(Path.home() / ".oncoflow-dask-address"),
        help="where to write the scheduler address",
    )
    args = parser.parse_args()
    load_config()
    from dask_jobqueue import SLURMCluster

    with SLURMCluster() as cluster:
        cluster.scale(jobs=args.jobs)
        Path(args.address_file).write_text(cluster.scheduler_address)
        print(cluster.scheduler_address, flush=True)
        try:
            while True:
                time.sleep(60)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
