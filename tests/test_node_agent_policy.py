"""The host policy alone (node_agent/policy.py): every attack of issue 9 refused with its reason, the
mesh's own assignments admitted, and a wrong policy file refused at start."""

from __future__ import annotations

import asyncio
import os
import pathlib

import pytest

from meshserve.node_agent.policy import HostPolicy, PolicyError, Refused, development_policy_yaml
from meshserve.node_agent.process import SubprocessLauncher
from meshserve.node_agent.replica import ReplicaSpec
from meshserve.node_agent.runtime_flags import SAFE_RUNTIME_FLAGS
from meshserve.runtime.__main__ import parse_args as parse_runtime_args

ROOT_EUID, USER_EUID = 0, 1000


@pytest.fixture
def roots(tmp_path):
    """root/models/add_sub (allowed), outside/add_sub (not), root/evil -> outside (a symlink out)."""
    for repository in (tmp_path / "root" / "models", tmp_path / "outside"):
        (repository / "add_sub" / "1").mkdir(parents=True)
        (repository / "add_sub" / "config.pbtxt").write_text('name: "add_sub"\n')
    (tmp_path / "root" / "evil").symlink_to(tmp_path / "outside")
    return tmp_path


def _policy(roots: pathlib.Path, **keys) -> HostPolicy:
    return HostPolicy.from_mapping({"repository_roots": [str(roots / "root")], **keys}, source="test policy")


def _spec(roots: pathlib.Path, *, repository: str | None = None, env=None, runtime_args=(), model="add_sub",
          gpu_indices=()) -> ReplicaSpec:
    return ReplicaSpec.create("r1", deployment="d", revision=1, model_name=model, gpu_indices=gpu_indices,
                              model_repository=str(roots / "root" / "models") if repository is None else repository,
                              env={"MESHSERVE_GPU_MEMORY_BYTES": "0", "MESHSERVE_CPU_CORES": "0.25", **(env or {})},
                              runtime_args=runtime_args)


def _refusal(policy: HostPolicy, spec: ReplicaSpec, euid: int = USER_EUID) -> str:
    with pytest.raises(Refused) as info:
        policy.admit(spec, agent_euid=euid)
    assert str(info.value).startswith("refused by host policy: ")
    return info.value.reason


def test_an_ordinary_assignment_of_the_mesh_is_admitted_with_its_resolved_repository(roots):
    spec = _spec(roots, repository=str(roots / "root" / "models") + "/", env={"OMP_NUM_THREADS": "1"},
                 runtime_args=["--drain-delay", "2", "--grace-period=5", "--model", "pre",
                               "--remote-model", "post=127.0.0.1:9001", "--strict"])
    assert _policy(roots).admit(spec, agent_euid=USER_EUID) == str((roots / "root" / "models").resolve())


@pytest.mark.parametrize("env, refused", [
    ({"PYTHONWARNINGS": "all:0:antigravity.x:0:0", "BROWSER": "/bin/sh -c 'id > /tmp/x' #%s"},
     "env 'BROWSER', 'PYTHONWARNINGS' are not allowed"),
    ({"LD_PRELOAD": "/tmp/evil.so"}, "env 'LD_PRELOAD' is not allowed"),
    ({"PYTHONPATH": "/tmp/evil"}, "env 'PYTHONPATH' is not allowed"),
    ({"PYTHONSTARTUP": "/tmp/x.py"}, "env 'PYTHONSTARTUP' is not allowed"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "env 'CUDA_VISIBLE_DEVICES' is not allowed"),
    ({"MESHSERVE_ANYTHING": "1"}, "env 'MESHSERVE_ANYTHING' is not allowed"),   # no blanket prefix
    ({"OMP_NUM_THREADS": "1\0"}, "env 'OMP_NUM_THREADS' contains a NUL character"),
])
def test_environment_outside_the_allowlist_is_refused(roots, env, refused):
    assert refused in _refusal(_policy(roots), _spec(roots, env=env))


def test_the_policy_file_extends_the_environment_allowlist_by_name_and_prefix(roots):
    policy = _policy(roots, env=["HF_HOME", "MYAPP_*"])
    policy.admit(_spec(roots, env={"HF_HOME": "/srv/hf", "MYAPP_MODE": "fast"}), agent_euid=USER_EUID)
    assert "'PYTHONPATH'" in _refusal(policy, _spec(roots, env={"PYTHONPATH": "/x"}))


@pytest.mark.parametrize("repository, refused", [
    ("/", "outside every allowed root"),
    ("{root}/evil", "outside every allowed root"),                       # a symlink out of the root
    ("{root}/models/../../outside", "outside every allowed root"),       # '..' out of the root
    ("{root}/../outside", "outside every allowed root"),
    ("{root}", None),                                                     # the root itself is inside
    ("models", "is not an absolute path"),
    ("", "is not an absolute path"),
])
def test_repository_is_resolved_and_must_be_inside_a_root(roots, repository, refused):
    spec = _spec(roots, repository=repository.format(root=roots / "root"))
    if refused is None:
        _policy(roots).admit(spec, agent_euid=USER_EUID)
    else:
        reason = _refusal(_policy(roots), spec)
        assert refused in reason
        if "outside" in refused:
            assert "(resolved " in reason


def test_without_a_policy_file_nothing_may_run(roots):
    assert "start the node agent with --policy FILE" in _refusal(HostPolicy(), _spec(roots))


@pytest.mark.parametrize("args, refused", [
    (["--lis", "0.0.0.0:0"], "runtime flag '--lis' is not allowed"),            # argparse would expand it
    (["--listen", "0.0.0.0:0"], "runtime flag --listen is never allowed"),
    (["--listen=0.0.0.0:0"], "runtime flag --listen is never allowed"),
    (["--model-repository", "/"], "runtime flag --model-repository is never allowed"),
    (["--model-repo", "/"], "runtime flag '--model-repo' is not allowed"),
    (["--model-control", "explicit"], "runtime flag --model-control is not allowed"),
    (["--model-control=explicit"], "runtime flag --model-control is not allowed"),
    (["--drain", "2"], "runtime flag '--drain' is not allowed"),
    (["-h"], "runtime argument '-h' is not a flag"),
    (["--drain-delay"], "runtime flag --drain-delay needs a value"),
    (["--drain-delay", "soon"], "runtime flag --drain-delay 'soon': expected a non-negative number"),
    (["--strict=yes"], "runtime flag --strict takes no value"),
    (["--model", "../x"], "runtime flag --model '../x': invalid model name"),
    (["--remote-model", "post"], "runtime flag --remote-model 'post': expected NAME=HOST:PORT"),
])
def test_runtime_flags_are_matched_exactly_and_their_values_checked(roots, args, refused):
    assert refused in _refusal(_policy(roots), _spec(roots, runtime_args=args))


@pytest.mark.parametrize("args", [
    ["--insecure"], ["--tls-cert", "/tmp/c.pem"], ["--tls-key=/tmp/k.pem"], ["--tls-ca", "/tmp/ca.pem"],
    ["--tls-client-cert", "/tmp/c.pem"], ["--tls-require-client-cert"], ["--tls-anything-new"],
    ["--shared-memory", "system"],
])
def test_tls_insecure_and_shared_memory_flags_are_never_a_specs_to_pass(roots, args):
    """TLS comes from the agent, shared memory from the host policy: refused even by a policy listing every
    safe flag and allowing model control."""
    reason = _refusal(_policy(roots, allow_model_control=True), _spec(roots, runtime_args=args))
    assert "is never allowed" in reason
    assert ("host policy's shared_memory" if args[0] == "--shared-memory" else "TLS settings come from the node agent") \
        in reason


def test_shared_memory_is_the_host_policys_choice_and_off_by_default(roots):
    assert _policy(roots).shared_memory == "none"
    assert _policy(roots, shared_memory="system").shared_memory == "system"
    with pytest.raises(PolicyError, match="shared_memory: expected one of none, system"):
        _policy(roots, shared_memory="cuda")


def test_model_control_only_where_the_policy_allows_it(roots):
    spec = _spec(roots, runtime_args=["--model-control", "explicit"])
    _policy(roots, allow_model_control=True).admit(spec, agent_euid=USER_EUID)
    assert "expected one of none, explicit" in _refusal(
        _policy(roots, allow_model_control=True), _spec(roots, runtime_args=["--model-control", "poll"]))


def test_a_policy_may_narrow_the_runtime_flags(roots):
    policy = _policy(roots, runtime_flags=["--drain-delay"])
    policy.admit(_spec(roots, runtime_args=["--drain-delay", "1"]), agent_euid=USER_EUID)
    assert "'--grace-period' is not allowed" in _refusal(policy, _spec(roots, runtime_args=["--grace-period", "1"]))


@pytest.mark.parametrize("model", ["../add_sub", "a/b", ".hidden", ""])
def test_model_name_must_be_a_plain_name(roots, model):
    assert "model name" in _refusal(_policy(roots), _spec(roots, model=model))


def test_replicas_never_run_as_root_unless_the_policy_says_so(roots):
    reason = _refusal(_policy(roots), _spec(roots), euid=ROOT_EUID)
    assert "replicas would run as root: set run_as in the host policy" in reason
    _policy(roots, allow_root=True).admit(_spec(roots), agent_euid=ROOT_EUID)
    _policy(roots).admit(_spec(roots), agent_euid=USER_EUID)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_run_as_names_an_unprivileged_user_so_a_root_agent_may_run_replicas(roots):
    policy = _policy(roots, run_as="nobody")
    assert policy.run_as.name == "nobody" and policy.run_as.uid != 0
    policy.admit(_spec(roots), agent_euid=ROOT_EUID)


def test_caps_on_what_one_replica_may_ask_for(roots):
    policy = _policy(roots, limits={"gpus": 1, "gpu_memory": "8GiB", "cpu": 2})
    policy.admit(_spec(roots, gpu_indices=[0], env={"MESHSERVE_GPU_MEMORY_BYTES": "8GiB"}), agent_euid=USER_EUID)
    assert "2 GPUs asked for, at most 1 per replica" in _refusal(policy, _spec(roots, gpu_indices=[0, 1]))
    assert "at most 8GiB per GPU" in _refusal(policy, _spec(roots, env={"MESHSERVE_GPU_MEMORY_BYTES": "80GiB"}))
    assert "4 CPU cores asked for, at most 2 per replica" in _refusal(
        policy, _spec(roots, env={"MESHSERVE_CPU_CORES": "4"}))


def test_every_problem_is_named_in_one_reason(roots):
    reason = _refusal(_policy(roots), _spec(roots, repository="/", env={"LD_PRELOAD": "x"},
                                           runtime_args=["--lis", "0.0.0.0:0"]))
    assert "outside every allowed root" in reason and "LD_PRELOAD" in reason and "--lis" in reason


@pytest.mark.parametrize("text, problem", [
    ("repository_roots: [/]\n", "would allow every file of the host"),
    ("repository_roots: [models]\n", "is not an absolute path"),
    ("repository_root: [/srv]\n", "unknown key(s) repository_root"),
    ("env: ['*']\n", "neither a variable name nor a PREFIX_* pattern"),
    ("runtime_flags: [--listen]\n", "--listen is never allowed"),
    ("runtime_flags: [--lis]\n", "--lis is not one of"),
    ("allow_root: yes please\n", "allow_root: expected true or false"),
    ("run_as: no-such-user-here\n", "no user 'no-such-user-here'"),
    ("limits: {gpus: -1}\n", "limits.gpus"),
    ("limits: {gpu_memory: lots}\n", "limits.gpu_memory"),
    ("limits: {cpus: 2}\n", "limits: expected a mapping of"),
    ("- a list\n", "expected a mapping"),
])
def test_a_wrong_policy_file_is_refused_naming_the_key(tmp_path, text, problem):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        HostPolicy.load(path)


def test_the_development_policy_reads_back(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(development_policy_yaml(tmp_path))
    policy = HostPolicy.load(path)
    assert policy.repository_roots == (tmp_path.resolve(),)
    assert policy.allow_root == (os.geteuid() == 0)


SAMPLE_VALUES = {"--model": "m", "--remote-model": "m=127.0.0.1:1", "--drain-delay": "1", "--grace-period": "1",
                 "--max-message-bytes": "1024", "--event-loop": "asyncio", "--log-level": "INFO"}


@pytest.mark.parametrize("flag", sorted(SAFE_RUNTIME_FLAGS))
def test_every_safe_runtime_flag_is_a_runtime_flag_taking_a_value_exactly_when_the_policy_expects_one(flag):
    takes_value = SAFE_RUNTIME_FLAGS[flag] is not None
    base = ["--model-repository", "/srv/models"]
    parse_runtime_args([*base, flag, *([SAMPLE_VALUES[flag]] if takes_value else [])])  # exits 2 if unknown
    with pytest.raises(SystemExit):  # a value-taking flag without its value, or a stray value after a switch
        parse_runtime_args([*base, flag] if takes_value else [*base, flag, "stray-value"])


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_the_launcher_starts_replicas_as_the_run_as_user():
    run_as = HostPolicy.from_mapping({"run_as": "nobody"}).run_as

    async def launch() -> list[str]:
        launcher = SubprocessLauncher(die_with_parent=False, run_as=run_as)
        child = await launcher.launch(["/bin/sh", "-c", "id -u; id -G; echo $HOME $USER"], {"PATH": "/usr/bin:/bin"})
        lines = [line async for _, line in child.lines()]
        assert await child.wait() == 0
        return lines

    uid, groups, env = asyncio.run(launch())
    assert uid == str(run_as.uid) and groups == str(run_as.gid)   # no supplementary groups of the agent
    assert env == f"{run_as.home} nobody"
