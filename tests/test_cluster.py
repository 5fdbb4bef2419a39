"""raykd on Ray clusters.

Against a real multi-node cluster on 127.0.0.1 (cluster/local.py: a head and two worker nodes,
token auth on): a cache job submitted with JobSubmissionClient writes to S3 (moto on 127.0.0.1)
from both worker nodes; requests without the token are refused; every listening socket is on
127.0.0.1; a job submitted with `ray job submit` survives its client being killed and a worker
node being killed mid-run, and its cache equals the clean run's byte for byte; a two-node DDP
distillation that loses a training node resumes from its last checkpoint and finishes.
Without a cluster: every KubeRay manifest, the cluster-launcher YAML, the runtime env and the
Dockerfile are checked (required fields, entry points and recipes that exist and load).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from cluster import local
from pipeline.cache import store
from pipeline.config import load

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
RAY_VERSION = re.search(r"^ray\[[^\]]*\]==([\d.]+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
IMAGE_TAG = f"ray{RAY_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
GPU_FAMILIES = ("g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5")
TRAIN_ROWS, DEV_ROWS, SHARD_ROWS = 10000, 200, 100  # 100 train shards: time to kill a node mid-job
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------------ the YAML files


def one_doc(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    return docs[0]


def check_entrypoint(entrypoint: str, job: str):
    """`python -m jobs.<job> --config FILE overrides...`: the module and recipe exist, and the
    recipe + overrides load as a valid config whose outputs every node can reach."""
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", f"jobs.{job}"], argv
    assert (REPO / "jobs" / f"{job}.py").is_file(), f"entry point module jobs/{job}.py missing"
    recipe = argv[argv.index("--config") + 1]
    assert (REPO / recipe).is_file(), f"recipe {recipe} missing"
    cfg = load(REPO / recipe, [a for a in argv[3:] if "=" in a and not a.startswith("-")])
    assert os.path.isabs(cfg.run.output_dir), "run.output_dir must be a path every node shares"
    assert cfg.cache.root.startswith("s3://"), "the cache must live in object storage"
    assert cfg.ray.use_gpu
    return cfg


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def token_env_ok(container: dict) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    return (env.get("RAY_AUTH_MODE", {}).get("value") == "token"
            and "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}))


def test_raycluster_has_cpu_head_gpu_workers_and_token_auth():
    doc = one_doc(CLUSTER_DIR / "kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    spec = doc["spec"]
    assert spec["rayVersion"] == RAY_VERSION
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head.get("serviceType") == "ClusterIP"
    assert "nvidia.com/gpu" not in containers(head["template"])[0]["resources"].get("limits", {})
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no GPU worker group"
    assert spec["enableInTreeAutoscaling"] is True
    for g in spec["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > g["minReplicas"]
    for template in [head["template"], *(g["template"] for g in spec["workerGroupSpecs"])]:
        for c in containers(template):
            assert c["image"].endswith(":" + IMAGE_TAG), c["image"]
            assert token_env_ok(c), f"{c['name']}: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a secret"
            assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]


@pytest.mark.parametrize("job", ["cache", "distill", "sweep"])
def test_rayjob_manifest(job):
    cluster_name = one_doc(CLUSTER_DIR / "kuberay/raycluster.yaml")["metadata"]["name"]
    doc = one_doc(CLUSTER_DIR / f"kuberay/rayjob-{job}.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster_name}
    cfg = check_entrypoint(spec["entrypoint"], job)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert re.fullmatch(r"s3://[\w.-]+/.+\.zip", runtime_env["working_dir"]), runtime_env
    submitter = containers(spec["submitterPodTemplate"])[0]
    assert token_env_ok(submitter) and submitter["image"].endswith(":" + IMAGE_TAG)
    if job == "sweep":
        from pipeline.sweep_space import field_type

        assert cfg.sweep.storage_path.startswith("s3://")
        assert cfg.sweep.space and all(field_type(k) for k in cfg.sweep.space)  # keys exist


def launcher_errors(config: dict) -> str:
    """'' when Ray's cluster launcher accepts `config` (its JSON schema, then its own checks)."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
        validate_config(prepare_config(config))
    except (jsonschema.ValidationError, ValueError) as e:
        return str(e).splitlines()[0]
    return ""


def test_cluster_launcher_yaml_is_valid_gpu_autoscaling_and_token_auth():
    config = yaml.safe_load((CLUSTER_DIR / "aws-gpu.yaml").read_text())
    assert launcher_errors(config) == ""
    types = config["available_node_types"]
    gpu = {n: t for n, t in types.items() if t["node_config"]["InstanceType"].split(".")[0] in GPU_FAMILIES}
    assert gpu and all(t["min_workers"] < t["max_workers"] <= config["max_workers"] for t in gpu.values())
    assert config["head_node_type"] not in gpu and types[config["head_node_type"]]["resources"]["CPU"] == 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert config["docker"]["image"].endswith(":" + IMAGE_TAG)
    broken = {**config, "max_worker": 8}  # a typo must not pass
    assert "max_worker" in launcher_errors(broken)


def test_runtime_env_ships_the_code_but_not_venv_or_outputs():
    from ray._private.runtime_env.packaging import _get_excludes  # Ray's own matcher

    env = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())
    assert set(env) <= {"excludes", "env_vars"}  # the working dir comes from --working-dir
    excluded = _get_excludes(REPO, env["excludes"])
    for shipped in ("pipeline/cache/store.py", "jobs/cache.py", "cluster/local.py", "jobs/configs/smoke.yaml"):
        assert not excluded(REPO / shipped), f"{shipped} would not ship"
    for left_out in (".venv", "cache", "runs", ".git"):
        assert excluded(REPO / left_out), f"{left_out} would ship"


def test_dockerfile_matches_the_pinned_ray():
    base = re.search(r"^FROM (\S+)", (CLUSTER_DIR / "Dockerfile").read_text(), re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-gpu"


# ------------------------------------------------------------------------------ a live cluster


@pytest.fixture(scope="module")
def cluster():
    c = local.start(name=f"pytest-{os.getpid()}", workers=2, worker_cpus=1, head_cpus=0,
                    object_store_mb=150)
    try:
        yield c
    finally:
        local.stop(c, grace=5)


def cache_overrides(teacher: Path, glue: Path, root: str, out: Path, *more: str) -> list[str]:
    return [f"teacher.path={teacher}", f"data.glue_dir={glue}", f"data.train_limit={TRAIN_ROWS}",
            f"data.dev_limit={DEV_ROWS}", f"run.output_dir={out}", f"cache.root={root}",
            f"cache.rows_per_shard={SHARD_ROWS}", "cache.embeddings=true",
            "cache.hidden_layers=[1,2]", "cache.attn_layers=[1,2]", *more]


def job_client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers())


def wait_for(client, job_id: str, timeout: float = 480) -> str:
    deadline = time.monotonic() + timeout
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout:.0f} s"
        time.sleep(2)
    return status


def shard_markers(root: Path) -> int:
    return len(list(root.glob("sst2-train-*/set-*/shard-?????.json")))


def job_actor_nodes(cluster, submission_id: str, class_part: str, states=("ALIVE", "DEAD")) -> list[str]:
    """Node of each of the job's actors whose class name holds `class_part`, one entry per
    actor (Ray's state API keeps dead actors too); actors never placed (no node) are left out."""
    job_ids = {j["job_id"] for j in local.api(cluster, "/api/jobs/") if j["submission_id"] == submission_id}
    actors = local.api(cluster, "/api/v0/actors?limit=10000")["data"]["result"]["result"]
    return sorted(a["node_id"] for a in actors if class_part in a["class_name"] and a["job_id"] in job_ids
                  and a["node_id"] and a["state"] in states)


def actor_nodes(cluster, submission_id: str, states=("ALIVE", "DEAD")) -> set[str]:
    """Nodes the job's ShardWriter (teacher) actors ran on."""
    return set(job_actor_nodes(cluster, submission_id, "ShardWriter", states))


@pytest.fixture(scope="module")
def s3_cache_job(cluster, s3, tiny_teacher, glue_dir, tmp_path_factory):
    """A clean cache job submitted with JobSubmissionClient (token in its headers), cache in S3."""
    runtime_env = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env["env_vars"] = {**runtime_env["env_vars"], **s3.env}  # credentials for every node
    root = s3.uri("cache")
    out = tmp_path_factory.mktemp("runs")
    client = job_client(cluster)
    t0 = time.monotonic()
    job_id = client.submit_job(
        entrypoint="python -m jobs.cache " + shlex.join(cache_overrides(tiny_teacher, glue_dir, root, out,
                                                                         "cache.concurrency=2")),
        runtime_env=runtime_env)
    listening, placed, deadline = [], set(), time.monotonic() + 480
    while str(client.get_job_status(job_id).value) not in TERMINAL and time.monotonic() < deadline:
        alive = actor_nodes(cluster, job_id, ("ALIVE",))  # where teacher actors run
        placed |= alive
        if alive:  # the driver and the teacher actors are up: every socket they listen on
            listening += [s for s in local.listeners(cluster) if s not in listening]
        time.sleep(0.5)
    status = wait_for(client, job_id)
    return SimpleNamespace(job_id=job_id, status=status, logs=client.get_job_logs(job_id), root=root,
                           listening=listening, placed=placed, seconds=time.monotonic() - t0)


def test_cache_job_submitted_with_token_writes_s3_from_worker_nodes(cluster, s3_cache_job):
    job = s3_cache_job
    assert job.status == "SUCCEEDED", job.logs[-3000:]
    assert "[raykd cache] sst2/train:" in job.logs and "[raykd cache] sst2/dev:" in job.logs
    caches = {c["fields"]["split"]: c for c in store.list_caches(job.root)}
    assert caches["train"]["rows"] == TRAIN_ROWS and caches["dev"]["rows"] == DEV_ROWS
    for c in caches.values():
        assert store.verify(job.root, c["key"]) == []
    workers = {n.node_id for n in cluster.nodes if n.name != "head"}
    assert job.placed == workers, f"teacher actors ran on {job.placed}; worker nodes {workers}"
    print(f"\n[cluster] clean cache job to S3: {job.seconds:.0f} s (submit to SUCCEEDED)")


def test_requests_without_the_token_are_refused(cluster):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    body = json.dumps({"entrypoint": "echo must-not-run"}).encode()
    for headers, code in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):
        req = urllib.request.Request(cluster.dashboard_url + "/api/jobs/", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == code
    with pytest.raises(AuthenticationError):
        JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": "Bearer wrong"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    cli = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "list", "--address",
                          cluster.dashboard_url], env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "Missing authentication token" in cli.stdout + cli.stderr
    jobs = local.api(cluster, "/api/jobs/")  # with the token: answers, and nothing ran
    assert not any("must-not-run" in j["entrypoint"] for j in jobs)


def test_everything_listens_on_loopback_only(cluster, s3_cache_job):
    assert s3_cache_job.listening, "no snapshot was taken while the job ran"
    for snapshot in (s3_cache_job.listening, local.listeners(cluster)):
        assert local.off_loopback(snapshot) == [], snapshot
        ports = {port for _, port, _, _ in snapshot}
        assert {cluster.dashboard_port, cluster.gcs_port} <= ports
    if shutil.which("ss"):  # the kernel's view, for every pid of the cluster
        pids = {pid for *_, pid in local.listeners(cluster)}
        lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
        ours = [ln for ln in lines if any(f"pid={pid}," in ln for pid in pids)]
        assert ours and all(ln.split()[3].rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]")
                            for ln in ours), ours


def test_job_survives_its_client_and_a_lost_worker_node(cluster, s3_cache_job, tiny_teacher, glue_dir, tmp_path):
    """`ray job submit` (token from RAY_AUTH_TOKEN_PATH) is killed, and so is the worker node
    whose teacher actor (the default cache.concurrency=1: one actor, one node's CPUs) is writing
    shards; the other node finishes the shards, the job succeeds, and its cache equals the
    clean run's (written with two actors) byte for byte."""
    from ray.job_submission import JobSubmissionClient

    assert s3_cache_job.status == "SUCCEEDED"
    root = tmp_path / "cache"
    sid = f"raykd-fault-{os.getpid()}"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--submission-id", sid,
           "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--",
           "python", "-m", "jobs.cache", *cache_overrides(tiny_teacher, glue_dir, str(root), tmp_path / "runs")]
    log = tmp_path / "submit.log"
    with open(log, "wb") as out:
        submitter = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **cluster.client_env()},
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while (at_kill := shard_markers(root)) < 3 or not (busy := actor_nodes(cluster, sid, ("ALIVE",))):
        assert submitter.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no teacher actor wrote shards within 300 s"
        time.sleep(0.1)
    victim = next(n for n in cluster.nodes if n.node_id in busy)
    lost = victim.node_id
    killed = local.kill_node(cluster, victim.name)  # while its teacher actor writes shards
    submitter.kill()  # the client goes away (a closed laptop); the job lives on the cluster
    submitter.wait()
    n_shards = -(-TRAIN_ROWS // SHARD_ROWS)
    assert at_kill < n_shards, "the job finished before the node was killed; make it longer"
    assert "Tailing logs until the job exits" in log.read_text()  # it was the one following the job

    client = JobSubmissionClient(cluster.dashboard_url, headers=cluster.auth_headers())  # a new client
    status = wait_for(client, sid)
    logs = client.get_job_logs(sid)  # fetched after the submitter is gone
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[raykd cache] sst2/dev:" in logs
    assert lost not in {n["node_id"] for n in local.alive_nodes(cluster)}  # it stayed dead

    clean = {c["fields"]["split"]: c["key"] for c in store.list_caches(s3_cache_job.root)}
    for split, key in clean.items():
        ours = store.committed_sets(str(root), key)
        ref = store.committed_sets(s3_cache_job.root, key)
        assert [s.set_id for s in ours] == [s.set_id for s in ref]
        for a, b in zip(ours, ref):  # same rows, same bytes: shard by shard, checksums equal
            assert a.manifest["rows"] == b.manifest["rows"]
            assert [s["checksum"] for s in a.manifest["shards"]] == [s["checksum"] for s in b.manifest["shards"]]
        assert store.verify(str(root), key) == []
    print(f"\n[cluster] killed {victim.name} ({killed} processes) with {at_kill}/{n_shards} train shards "
          "written; the job finished on the remaining node with a cache identical to the clean run")


def test_distillation_resumes_after_losing_a_training_node(cluster, s3, s3_cache_job, tiny_teacher, glue_dir,
                                                           tmp_path):
    """Two DDP workers, one per worker node (SPREAD), read the S3 cache; in epoch 1 the node of
    one of them is killed. Ray Train restarts the group on the node left, from the epoch-0
    checkpoint (on the shared run dir), and the run finishes all epochs."""
    assert s3_cache_job.status == "SUCCEEDED"
    while len([n for n in cluster.nodes if n.name != "head"]) < 2:  # the previous test killed one
        local.add_worker(cluster)
    runtime_env = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env["env_vars"] = {**runtime_env["env_vars"], **s3.env}
    stages = [{"name": "kd", "losses": {"kd": 1, "hard": 1}, "optim": {"epochs": 3, "batch_size": 16, "lr": 1e-3}}]
    overrides = cache_overrides(tiny_teacher, glue_dir, s3_cache_job.root, tmp_path / "runs",
                                f"teacher.model={tiny_teacher}", "run.name=fault", "student.layers=2",
                                "student.hidden=32", "student.heads=4", "student.ffn=64", "ray.num_workers=2",
                                "ray.placement_strategy=SPREAD", "distill.stages=" + json.dumps(stages))
    client = job_client(cluster)
    sid = client.submit_job(entrypoint="python -m jobs.distill " + shlex.join(overrides), runtime_env=runtime_env)
    deadline = time.monotonic() + 480
    while "[raykd] epoch 0 step" not in (logs := client.get_job_logs(sid)):
        assert str(client.get_job_status(sid).value) not in TERMINAL, logs[-3000:]
        assert time.monotonic() < deadline, "no epoch-0 checkpoint within 480 s"
        time.sleep(0.5)
    t_checkpoint = time.monotonic()
    spread = job_actor_nodes(cluster, sid, "RayTrainWorker", ("ALIVE",))  # one entry per worker
    workers = {n.node_id: n for n in cluster.nodes if n.name != "head"}
    assert len(spread) == 2 and set(spread) <= set(workers) and len(set(spread)) == 2, spread
    time.sleep(5)  # Ray Train's controller registers a reported checkpoint when it next polls
    before_kill = client.get_job_logs(sid)
    victim = workers[spread[0]]
    local.kill_node(cluster, victim.name)
    t_kill = time.monotonic()
    assert "[raykd] epoch 1 step" not in before_kill, "epoch 1 had ended before the kill; make epochs longer"

    while "resumed from the epoch" not in (logs := client.get_job_logs(sid)):
        assert str(client.get_job_status(sid).value) not in TERMINAL, logs[-3000:]
        assert time.monotonic() < t_kill + 300, f"no resume within 300 s of the kill:\n{logs[-3000:]}"
        time.sleep(0.5)
    t_resumed = time.monotonic()
    status = wait_for(client, sid)
    logs = client.get_job_logs(sid)
    assert status == "SUCCEEDED", logs[-3000:]
    resumed = re.search(r"resumed from the epoch (\d+) checkpoint \(step (\d+)\) on (\d+) worker", logs)
    assert resumed and resumed.group(1) == "0", logs[-3000:]
    assert re.search(r"\[raykd\] epoch 2 step \d+ dev", logs) and "[raykd] student:" in logs
    assert victim.node_id not in {n["node_id"] for n in local.alive_nodes(cluster)}
    steps_per_epoch = int(resumed.group(2))
    print(f"\n[cluster] killed {victim.name} (one of 2 DDP workers) {t_kill - t_checkpoint:.1f} s into "
          f"epoch 1; resumed {t_resumed - t_kill:.1f} s later from the epoch-0 checkpoint (step "
          f"{steps_per_epoch}); work lost: at most epoch 1's first {t_kill - t_checkpoint:.1f} s "
          f"(< 1 epoch of {steps_per_epoch} steps) plus {t_resumed - t_kill:.1f} s of restart")
