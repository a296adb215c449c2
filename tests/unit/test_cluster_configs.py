"""The shipped cluster configurations, checked with the tools of their own projects.

* Slurm: ``deployments/slurm/jobqueue.yaml`` loaded into dask's configuration; dask-jobqueue
  generates the job script (no Slurm needed), which must ask for one core and the memory, and
  start one single-threaded worker with oncoflow's worker environment.
* Kubernetes: ``deployments/kubernetes/daskcluster.yaml`` validated against the DaskCluster CRD
  schema shipped by dask-kubernetes in its operator's Helm chart (OpenAPI v3, with jsonschema)
  and its cluster-name rule.
"""

from pathlib import Path

import dask.config
import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "deployments" / "slurm" / "jobqueue.yaml"
DASKCLUSTER = REPO / "deployments" / "kubernetes" / "daskcluster.yaml"


def test_slurm_job_script_runs_one_pinned_worker_per_job():
    from dask_jobqueue.slurm import SLURMJob

    ours = yaml.safe_load(SLURM.read_text())["jobqueue"]["slurm"]
    with dask.config.set({f"jobqueue.slurm.{k}": v for k, v in ours.items()}):
        script = SLURMJob(scheduler="tcp://10.1.2.3:8786", name="oncoflow-worker").job_script()
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "#SBATCH -n 1" in lines
    assert "#SBATCH --cpus-per-task=1" in lines
    assert "#SBATCH --mem=4G" in lines
    assert "#SBATCH -t 08:00:00" in lines
    assert "#SBATCH --output=oncoflow-worker-%j.log" in lines
    assert any("MALLOC_MMAP_THRESHOLD_=16777216" in line for line in lines)
    assert any("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1" in line for line in lines)
    (worker,) = [line for line in lines if "distributed.cli.dask_worker" in line]
    assert "tcp://10.1.2.3:8786" in worker
    assert "--nthreads 1" in worker and "--nworkers" not in worker  # one single-threaded worker
    assert "--no-dashboard" in worker
    assert "--memory-limit 4.00GiB" in worker
    # the prologue runs before the worker starts
    assert lines.index(worker) > max(i for i, x in enumerate(lines) if "export" in x)


def _crd_schema(name: str) -> dict:
    import dask_kubernetes

    # the CRDs as the operator's Helm chart installs them (references resolved)
    operator = Path(dask_kubernetes.__file__).parent / "operator"
    root = operator / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    crd = yaml.safe_load((root / f"{name}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_daskcluster_manifest_is_valid_for_the_dask_kubernetes_operator():
    from dask_kubernetes.operator.validation import validate_cluster_name

    manifest = yaml.safe_load(DASKCLUSTER.read_text())
    assert manifest["apiVersion"] == "kubernetes.dask.org/v1"
    assert manifest["kind"] == "DaskCluster"
    validate_cluster_name(manifest["metadata"]["name"])
    jsonschema.validate(manifest["spec"], _crd_schema("daskcluster")["properties"]["spec"])
    worker = manifest["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["MALLOC_MMAP_THRESHOLD_"] == "16777216" and env["OMP_NUM_THREADS"] == "1"
    assert worker["args"][:2] == ["dask", "worker"] and "1" in worker["args"]
    # a broken manifest fails the same check
    broken = yaml.safe_load(DASKCLUSTER.read_text())["spec"]
    broken["worker"]["replicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _crd_schema("daskcluster")["properties"]["spec"])
