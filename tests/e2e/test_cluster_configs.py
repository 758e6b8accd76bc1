"""cluster/: the Ray cluster launcher YAMLs pass Ray's own config validation, offline, and the
KubeRay manifests carry the fields they rely on.

The launcher check is what `ray up` runs before it contacts a cloud: `prepare_config` (the
provider's defaults merged in, node types filled out) and `validate_config` (ray-schema.json
plus the cross-field checks). The provider bootstrap that follows in `ray up` (IAM, subnets,
key pairs) needs credentials and is not run. Every `python <script>` these files and
cluster/README.md name must exist, and every `key=value` given to a pipeline must be a
dmdscale config key, checked with `load_config` against the pipeline's own YAML. The AWS IAM
policies and the KubeRay NetworkPolicy are read for what they grant, not applied.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from dmdscale.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
MANIFESTS = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/networkpolicy.yaml"]
DOCS = ["README.md"]
HEAD = "head"
GPUS_PER_MACHINE = {"p4d.24xlarge": 8, "p5.48xlarge": 8, "a2-highgpu-8g": 8, "a3-highgpu-8g": 8}
RAY_IMAGE = re.compile(rf"^rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu$")


def launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a config before the provider bootstrap."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- launcher YAMLs: Ray's validation ---------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_passes_ray_validation(name):
    prepared = ray_validate(launcher(name))
    assert prepared["head_node_type"] == HEAD
    assert prepared["available_node_types"][HEAD]["max_workers"] == 0


def _unknown_top_level_key(c):
    c["dashboard_port"] = 8265


def _worker_without_node_config(c):
    del c["available_node_types"]["gpu_h100_8x"]["node_config"]


def _gpu_count_as_string(c):
    c["available_node_types"]["gpu_h100_8x"]["resources"]["GPU"] = "8"


def _unknown_head_type(c):
    c["head_node_type"] = "ray_head_default"


def _min_workers_over_global_max(c):
    for node_type in c["available_node_types"].values():
        node_type["min_workers"] = c["max_workers"]


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("breakage, error", [
    (_unknown_top_level_key, jsonschema.ValidationError),
    (_worker_without_node_config, jsonschema.ValidationError),
    (_gpu_count_as_string, jsonschema.ValidationError),
    (_unknown_head_type, ValueError),
    (_min_workers_over_global_max, ValueError),
])
def test_ray_validation_rejects_a_broken_copy(name, breakage, error):
    config = launcher(name)
    breakage(config)
    with pytest.raises(error):
        ray_validate(config)


# --- launcher YAMLs: what dmdscale relies on --------------------------------------------------

def start_commands(config: dict[str, Any], key: str) -> list[str]:
    return [c for c in config[key] if "ray start" in c]


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_ray_start_gets_the_token_from_a_mounted_file(name, key):
    config = launcher(name)
    commands = start_commands(config, key)
    assert commands, f"{key} starts no Ray"
    for command in commands:
        before = command[:command.index("ray start")]
        assert re.search(r"\bRAY_AUTH_MODE=token\b", before), command
        token_file = re.search(r'RAY_AUTH_TOKEN="?\$\(cat ([^)\s]+)\)', before)
        assert token_file, f"RAY_AUTH_TOKEN is not exported before `ray start`: {command}"
        assert token_file.group(1) in config["file_mounts"], "the token file is not file-mounted"
        local = config["file_mounts"][token_file.group(1)]
        assert local.startswith("~/"), f"the token's local copy {local} must live outside the repository"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_auth_is_never_turned_off(name):
    text = (CLUSTER / name).read_text()
    assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*\"?disabled", text)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_dashboard_listens_on_loopback_only(name):
    config = launcher(name)
    (head,) = start_commands(config, "head_start_ray_commands")
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head)
    # `ray dashboard cluster.yaml` tunnels to localhost on the head: 127.0.0.1 serves it and
    # nothing else; 0.0.0.0 (Ray's default in these templates) would serve the VPC and beyond.
    assert hosts == ["127.0.0.1"], head
    for command in start_commands(config, "worker_start_ray_commands"):
        assert "0.0.0.0" not in command
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", -1), rule


@pytest.mark.parametrize("name", LAUNCHERS)
def test_head_is_cpu_only_and_gpu_types_are_8_gpu_machines(name):
    config = launcher(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "training must not land on the head"
    assert head.get("max_workers", 0) == 0
    gpu_types = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert len(gpu_types) >= 2
    for name_, node_type in gpu_types.items():
        machine = node_type["node_config"].get("InstanceType") or node_type["node_config"].get("machineType")
        assert GPUS_PER_MACHINE.get(machine) == 8, f"{name_}: {machine} is not a known 8-GPU machine"
        assert node_type["resources"]["GPU"] == 8, name_
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name_
        assert node_type["max_workers"] >= 1, name_
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert max(t["max_workers"] for t in gpu_types.values()) <= config["max_workers"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_setup_installs_dmdscale_with_the_constraints(name):
    config = launcher(name)
    mounts = config["file_mounts"]
    for remote, local in mounts.items():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"file_mounts[{remote!r}] = {local!r} is not in the repository"
    installs = [shlex.split(c) for c in config["setup_commands"] if "pip install" in c]
    assert len(installs) == 1
    args = installs[0]
    constraints, editable = args[args.index("-c") + 1], args[args.index("-e") + 1]
    assert Path(mounts[constraints]) == Path("constraints.txt")
    mounted_files = {Path(local) for local in mounts.values()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for needed in ("pyproject.toml", "constraints.txt", project["readme"], "dmdscale"):
        assert Path(needed) in mounted_files, f"the install in {editable} needs {needed}"
        remote = next(r for r, local in mounts.items() if Path(local) == Path(needed))
        assert remote == f"{editable}/{needed}"
    assert f"ray[default,train,data,tune]=={ray.__version__}" in args
    assert pyproject_requirements()["ray"].specifier.contains(ray.__version__), "pyproject.toml excludes this Ray"


def pyproject_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_docker_image_is_pinned_to_the_clients_ray(name):
    docker = launcher(name)["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert RAY_IMAGE.match(docker[key]), docker[key]


# --- AWS: the instance profiles' policies ----------------------------------------------------

AWS_POLICIES = ["aws-head-policy.json", "aws-worker-policy.json"]
STORAGE = "MY_BUCKET", "dmdscale"  # s3://MY_BUCKET/dmdscale, the storage path the docs use


def aws_policy(name: str) -> list[dict[str, Any]]:
    doc = json.loads((CLUSTER / name).read_text())
    assert doc["Version"] == "2012-10-17", name
    return doc["Statement"]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def granting(statements: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [s for s in statements if s["Effect"] == "Allow" and action in as_list(s["Action"])]


def test_aws_head_and_workers_run_under_named_instance_profiles():
    config = launcher("aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]
    workers = [t["node_config"]["IamInstanceProfile"] for n, t in types.items() if n != config["head_node_type"]]
    assert set(head) & {"Name", "Arn"}
    assert workers and all(w == {"Name": "dmdscale-ray-worker"} for w in workers)
    assert head != workers[0]
    # With the head's profile named, Ray's bootstrap (`_configure_iam_role`, which imports
    # boto3, hence read not run) leaves IAM alone instead of creating ray-autoscaler-v1 with
    # AmazonEC2FullAccess and AmazonS3FullAccess.
    bootstrap = (Path(ray.__file__).parent / "autoscaler/_private/aws/config.py").read_text()
    assert 'if "IamInstanceProfile" in head_node_config:' in bootstrap


@pytest.mark.parametrize("name", AWS_POLICIES)
def test_aws_policies_grant_no_wildcard_actions(name):
    for statement in aws_policy(name):
        assert "NotAction" not in statement and "NotResource" not in statement, statement.get("Sid")
        for action in as_list(statement["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{name}: {action}"


def test_the_head_passes_only_the_worker_role_to_ec2():
    (statement,) = granting(aws_policy("aws-head-policy.json"), "iam:PassRole")
    assert as_list(statement["Action"]) == ["iam:PassRole"]
    # README makes the worker role and its instance profile under one name.
    profile = launcher("aws.yaml")["available_node_types"]["gpu_h100_8x"]["node_config"]["IamInstanceProfile"]
    assert as_list(statement["Resource"]) == [f"arn:aws:iam::*:role/{profile['Name']}"]
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_the_head_manages_only_its_clusters_instances_of_the_worker_types():
    config = launcher("aws.yaml")
    statements = aws_policy("aws-head-policy.json")
    for action in ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances"):
        (statement,) = granting(statements, action)
        # Ray tags every instance it launches with ray-cluster-name.
        assert statement["Condition"] == {"StringEquals": {"aws:ResourceTag/ray-cluster-name": config["cluster_name"]}}
    (deny,) = [s for s in statements if s["Effect"] == "Deny"]
    assert as_list(deny["Action"]) == ["ec2:RunInstances"] and deny["Resource"].endswith(":instance/*")
    worker_types = {t["node_config"]["InstanceType"] for n, t in config["available_node_types"].items()
                    if n != config["head_node_type"]}
    assert set(deny["Condition"]["StringNotEquals"]["ec2:InstanceType"]) == worker_types
    region = config["provider"]["region"]
    for statement in statements:
        if any(a.startswith("ec2:") for a in as_list(statement["Action"])) and statement["Effect"] == "Allow":
            scoped = statement.get("Condition", {}).get("StringEquals", {}).get("aws:RequestedRegion")
            in_arn = all(f":{region}:" in r for r in as_list(statement["Resource"]))
            assert scoped == region or in_arn, f"{statement['Sid']} is not limited to {region}"


@pytest.mark.parametrize("name", AWS_POLICIES)
def test_s3_access_is_the_run_storage_prefix_only(name):
    bucket, prefix = STORAGE
    statements = aws_policy(name)
    s3 = [s for s in statements if any(a.startswith("s3:") for a in as_list(s["Action"]))]
    assert s3
    for statement in s3:
        for resource in as_list(statement["Resource"]):
            assert resource in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/{prefix}/*"), resource
    (listing,) = granting(statements, "s3:ListBucket")
    assert set(listing["Condition"]["StringLikeIfExists"]["s3:prefix"]) == {prefix, f"{prefix}/*"}
    if name == "aws-worker-policy.json":
        assert s3 == statements, "workers get storage access and nothing else"


# --- entry points and config keys named anywhere in cluster/ ----------------------------------

PY_CALL = re.compile(r"(?<![\w.-])python3?\s+(-m\s+[\w.]+|[\w./-]+\.py)(?![\w.])([^\n`]*)")
TAKES_VALUE = {"--out", "--config"}
SWEEPS_DEFAULT = "digits"  # pipelines/sweep.py sweeps the digits config unless --config says otherwise
SHELL_BREAK = {";", "&&", "||", "|", ">", ">>", "<"}


def python_calls(text: str) -> Iterator[tuple[str, list[str]]]:
    """(script or `-m module`, its arguments) for every `python ...` in a file's text, shell
    line continuations (also inside YAML comments) joined."""
    text = re.sub(r"\\\n\s*#?\s*", " ", text)
    for target, rest in PY_CALL.findall(text):
        args = []
        for token in shlex.split(rest, comments=True):
            if token in SHELL_BREAK:
                break
            args.append(token)
        yield target, args


def check_call(target: str, args: list[str]) -> None:
    """The script or module exists; for a pipeline, its overrides are valid config keys."""
    if target.startswith("-m"):
        module = target.split()[1]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        return
    script = ROOT / target
    assert script.is_file(), f"{target} does not exist in the repository"
    config = script.parent / "configs" / f"{SWEEPS_DEFAULT if script.stem == 'sweep' else script.stem}.yaml"
    overrides, quick, i = [], False, 0
    while i < len(args):
        if args[i] in TAKES_VALUE:
            if args[i] == "--config":
                config = ROOT / args[i + 1]
            i += 2
            continue
        if args[i] == "--quick":
            quick = True
        elif "=" in args[i] and not args[i].startswith("-"):
            overrides.append(args[i])
        i += 1
    assert config.is_file(), f"{target}: no config {config}"
    load_config(config, overrides, quick=quick)  # ConfigError names an unknown key or bad value


def rayjob() -> dict[str, Any]:
    (doc,) = yaml.safe_load_all((CLUSTER / "kuberay/rayjob.yaml").read_text())
    return doc


def all_calls() -> list[tuple[str, str, list[str]]]:
    calls = []
    for name in LAUNCHERS + MANIFESTS + DOCS:
        calls += [(name, target, args) for target, args in python_calls((CLUSTER / name).read_text())]
    calls += [("rayjob entrypoint", t, a) for t, a in python_calls(rayjob()["spec"]["entrypoint"])]
    return calls


def test_every_python_entry_point_exists_and_takes_valid_config_keys():
    calls = all_calls()
    named = {target for _, target, _ in calls}
    assert {"pipelines/sdxl.py", "pipelines/sweep.py", "-m dmdscale.memory"} <= {re.sub(r"\s+", " ", t) for t in named}
    for where, target, args in calls:
        try:
            check_call(target, args)
        except (AssertionError, ConfigError) as exc:
            raise AssertionError(f"{where}: python {target} {' '.join(args)}: {exc}") from None


@pytest.mark.parametrize("call, error", [
    ("python pipelines/sdxl.py --out /x scale.storage_pth=s3://b/p", ConfigError),
    ("python pipelines/sdxl.py --out /x scale.num_workers=0", ConfigError),
    ("python pipelines/sdxxl.py --out /x", AssertionError),
    ("python -m dmdscale.memoryy --family sdxl", AssertionError),
])
def test_entry_point_check_rejects(call, error):
    ((target, args),) = python_calls(call)
    with pytest.raises(error):
        check_call(target, args)


def test_rayjob_entrypoint_is_the_sdxl_pipeline_on_shared_storage():
    ((target, args),) = python_calls(rayjob()["spec"]["entrypoint"])
    assert target == "pipelines/sdxl.py"
    storage = [a.split("=", 1)[1] for a in args if a.startswith("scale.storage_path=")]
    assert storage and re.match(r"^(s3|gs)://", storage[0]), "checkpoints need storage every pod reaches"
    assert "scale.use_gpu=true" in args


# --- KubeRay manifests ------------------------------------------------------------------------

# The fields of KubeRay's ray.io/v1 API (v1.5/v1.6) these manifests may use: a misspelt key
# would otherwise only show when the API server rejects it.
KNOWN_KEYS = {
    "RayClusterSpec": {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions",
                       "headGroupSpec", "workerGroupSpecs", "suspend", "headServiceAnnotations"},
    "AuthOptions": {"mode", "secretName"},
    "AutoscalerOptions": {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy",
                          "env", "envFrom", "securityContext", "volumeMounts", "version"},
    "HeadGroupSpec": {"serviceType", "rayStartParams", "template", "headService", "enableIngress"},
    "WorkerGroupSpec": {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                        "idleTimeoutSeconds", "numOfHosts", "suspend", "scaleStrategy"},
    "RayJobSpec": {"entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                   "activeDeadlineSeconds", "submissionMode", "rayClusterSpec", "backoffLimit",
                   "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId",
                   "submitterPodTemplate", "clusterSelector", "suspend"},
}


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay/raycluster.yaml").read_text())
    return [("RayCluster", cluster["spec"]), ("RayJob", rayjob()["spec"]["rayClusterSpec"])]


def containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group, pod spec, container) for every container of the head and worker groups."""
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for group, g in groups:
        pod = g["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield group, pod, c


def has_token_auth(spec: dict[str, Any]) -> bool:
    """authOptions (the operator injects the token everywhere), or every container takes
    RAY_AUTH_TOKEN from a Secret with RAY_AUTH_MODE=token."""
    if spec.get("authOptions", {}).get("mode", "token" if "authOptions" in spec else None) == "token":
        return True
    for _, _, c in containers(spec):
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            return False
        if "secretKeyRef" not in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
            return False
    return True


def test_manifest_kinds():
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay/raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert set(job["spec"]) <= KNOWN_KEYS["RayJobSpec"]


@pytest.mark.parametrize("kind, spec", cluster_specs(), ids=["RayCluster", "RayJob"])
def test_cluster_spec_autoscales_with_token_auth_and_pinned_ray(kind, spec):
    assert set(spec) <= KNOWN_KEYS["RayClusterSpec"]
    assert set(spec["authOptions"]) <= KNOWN_KEYS["AuthOptions"]
    assert set(spec["autoscalerOptions"]) <= KNOWN_KEYS["AutoscalerOptions"]
    assert set(spec["headGroupSpec"]) <= KNOWN_KEYS["HeadGroupSpec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["upscalingMode"] in {"Default", "Conservative", "Aggressive"}
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0
    assert {"requests", "limits"} <= set(options["resources"])
    assert has_token_auth(spec)
    for group, pod, c in containers(spec):
        assert RAY_IMAGE.match(c["image"]), f"{group}: {c['image']}"
        for e in c.get("env", []):
            assert not (e["name"] == "RAY_AUTH_MODE" and e.get("value") != "token"), f"{group} turns auth off"
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{group}: mount {m['name']} has no volume"


@pytest.mark.parametrize("kind, spec", cluster_specs(), ids=["RayCluster", "RayJob"])
def test_head_is_cpu_only_and_in_cluster_only(kind, spec):
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert head["rayStartParams"]["num-cpus"] == "0"
    for c in head["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(part, {})


@pytest.mark.parametrize("kind, spec", cluster_specs(), ids=["RayCluster", "RayJob"])
def test_worker_groups_are_autoscaled_8_gpu_pods(kind, spec):
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    assert any(g["maxReplicas"] >= 1 for g in groups)
    for g in groups:
        assert set(g) <= KNOWN_KEYS["WorkerGroupSpec"], g["groupName"]
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
        (c,) = g["template"]["spec"]["containers"]
        resources = c["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) == 8, g["groupName"]
        assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
            resources["limits"]["nvidia.com/gpu"]


def test_token_auth_check_has_teeth():
    _, spec = cluster_specs()[0]
    spec = copy.deepcopy(spec)
    del spec["authOptions"]
    assert not has_token_auth(spec)
    secret_env = [{"name": "RAY_AUTH_MODE", "value": "token"},
                  {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "auth_token"}}}]
    for _, _, c in containers(spec):
        c["env"] = copy.deepcopy(secret_env)
    assert has_token_auth(spec)


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


@pytest.mark.parametrize("name", MANIFESTS)
def test_nothing_is_exposed_outside_the_cluster(name):
    for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
        for key, value in walk(doc):
            assert value not in ("LoadBalancer", "NodePort"), f"{name}: {key}: {value}"
            assert not (key == "enableIngress" and value), name
            assert not (key == "hostNetwork" and value), name


def test_rayjob_shuts_down_and_carries_a_valid_runtime_env():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) <= {"working_dir", "pip", "env_vars", "excludes", "py_modules"}
    RuntimeEnv(**env)  # Ray's own field validation, offline
    assert env["working_dir"].endswith(".zip")
    packages = env["pip"]["packages"]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    for name, version in pins.items():
        assert f"{name}=={version}" in packages, f"{name} is not pinned as constraints.txt says"
    assert f"ray[default,train,data,tune]=={ray.__version__}" in packages

    def norm(requirement: str) -> str:
        return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    needed = {norm(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    missing = needed - {norm(p) for p in packages}
    assert not missing, f"pyproject.toml dependencies missing from the RayJob's pip: {sorted(missing)}"


def test_rayjob_pip_keeps_pyprojects_version_bounds():
    packages = [Requirement(p) for p in yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["pip"]["packages"]]
    for name, requirement in pyproject_requirements().items():
        if name == "ray":  # pinned to the image's version, which the bounds must allow
            assert requirement.specifier.contains(ray.__version__)
        elif requirement.specifier:
            assert requirement in packages, f"the RayJob's pip lacks {requirement}"


def test_rayjob_cluster_matches_the_raycluster():
    """The RayJob repeats the RayCluster's spec (a RayJob cannot reference it); keep them equal."""
    (_, cluster), (_, job) = cluster_specs()
    for key in ("rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec"):
        assert job[key] == cluster[key], key
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for g in job["workerGroupSpecs"]:
        assert g == groups[g["groupName"]], g["groupName"]


# --- KubeRay: the head's NetworkPolicy --------------------------------------------------------

def network_policy() -> dict[str, Any]:
    (doc,) = yaml.safe_load_all((CLUSTER / "kuberay/networkpolicy.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    return doc


def reaches(policy: dict[str, Any], labels: dict[str, str], port: int) -> bool:
    """Whether a pod of the policy's namespace with these labels may connect to `port` on the
    selected pods (peers here are podSelectors; a rule without `from` admits everyone)."""
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if peers is None or any(p["podSelector"]["matchLabels"].items() <= labels.items() for p in peers):
            return True
    return False


RAY_PORTS = [6379, 8265, 10001, 8000, 52365]  # GCS, dashboard, client, serve, dashboard agent


def test_network_policy_selects_the_rayclusters_head_and_stays_in_the_namespace():
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay/raycluster.yaml").read_text())
    spec = network_policy()["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/cluster": cluster["metadata"]["name"],
                                                   "ray.io/node-type": "head"}}
    assert "Ingress" in spec["policyTypes"]
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod and address"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"} and set(peer["podSelector"]) == {"matchLabels"}, peer


def test_network_policy_opens_the_head_to_its_cluster_and_the_job_api_to_submitters():
    policy = network_policy()
    name = policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"]
    worker = {"ray.io/cluster": name, "ray.io/node-type": "worker", "ray.io/group": "gpu-h100-8x"}
    submitters = [{"app.kubernetes.io/component": "kuberay-operator", "app.kubernetes.io/name": "kuberay-operator"},
                  {"job-name": rayjob()["metadata"]["name"]},
                  {"dmdscale.io/ray-submitter": "true", "app": "ci"}]
    outsiders = [{}, {"app": "notebook"}, {"ray.io/cluster": "other", "ray.io/node-type": "worker"}]
    assert all(reaches(policy, worker, port) for port in RAY_PORTS)
    for labels in submitters:
        assert [p for p in RAY_PORTS if reaches(policy, labels, p)] == [8265], labels
    for labels in outsiders:
        assert not any(reaches(policy, labels, p) for p in RAY_PORTS), labels


def test_network_policy_check_has_teeth():
    policy = network_policy()
    policy["spec"]["ingress"].append({"ports": [{"port": 6379}]})
    assert reaches(policy, {"app": "notebook"}, 6379)
