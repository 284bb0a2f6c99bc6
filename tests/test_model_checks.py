"""Checked before anything runs (issue 11).

- ``common/model_check.py`` on repositories built in tmp_path: a misspelt model, a bad config, a missing
  file, an ensemble step that is missing, a cycle, a step named by a path.
- ``scheduler ctl apply`` (and ``--dry-run``) against a real scheduler process: refused with the file and
  field named, nothing stored; ``--files-on-nodes`` leaves a repository this machine lacks to the hosts.
- The scheduler's own Apply, called directly (no ctl): INVALID_ARGUMENT for the files it sees.
- ``scheduler dev``'s dependency check per example.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import grpc
import pytest
from mesh_harness import Admin

from meshserve.common.model_check import check_model, missing_modules
from meshserve.protos.mesh import control_pb2 as mesh
from meshserve.scheduler.dev import missing_dependencies

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples" / "models"
LARGE_TENSOR = REPO_ROOT / "examples" / "pipelines" / "large_tensor"
# Bounds one ctl command (a Python start and one call), not a performance claim.
CTL_TIMEOUT_S = 60


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> pathlib.Path:
    """A repository with a copy of add_sub and mlp_onnx, to break one file at a time."""
    root = tmp_path / "models"
    for name in ("add_sub", "mlp_onnx"):
        shutil.copytree(EXAMPLES / name, root / name)
    return root


def _edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# ---------------------------------------------------------------- the checker


def test_every_example_passes():
    for name in ("add_sub", "echo_bytes", "mlp_onnx", "resnet50_torch", "textgen"):
        assert check_model(EXAMPLES, name) == [], name
    assert check_model(LARGE_TENSOR, "large_pipeline") == []
    assert check_model(REPO_ROOT / "examples" / "pipelines" / "image", "image_pipeline") == []


def test_a_misspelt_model_is_named_with_the_closest_names(repo):
    assert check_model(repo, "add_sbu", "s.yaml: deployments[0]") == [
        f"s.yaml: deployments[0].model.name: no model 'add_sbu' in the repository {repo} (did you mean 'add_sub'?)"]
    assert check_model(repo, "zzz") == [
        f"model.name: no model 'zzz' in the repository {repo} (it has add_sub, mlp_onnx)"]


def test_a_repository_that_is_not_a_folder(tmp_path, repo):
    assert check_model(tmp_path / "none", "add_sub", "d") == [f"d.model.repository: {tmp_path / 'none'}: no such folder"]
    (tmp_path / "file").write_text("x")
    assert check_model(tmp_path / "file", "add_sub", "d") == [f"d.model.repository: {tmp_path / 'file'}: is not a folder"]


def test_a_bad_config_names_its_file_and_field(repo):
    config = repo / "add_sub" / "config.pbtxt"
    _edit(config, 'backend: "python"', 'backend: "tensorrt"')
    [problem] = check_model(repo, "add_sub")
    assert problem.startswith(f"{config}: field 'backend' is not supported: 'tensorrt'")
    _edit(config, 'backend: "tensorrt"', 'backend: "python"\nmax_batch_sise: 3')
    [problem] = check_model(repo, "add_sub")
    assert problem.startswith(f"{config}:") and "max_batch_sise" in problem
    _edit(config, "max_batch_sise: 3", "")
    _edit(config, "max_batch_size: 64", "max_batch_size: -1")
    assert check_model(repo, "add_sub") == [f"{config}: field 'max_batch_size' must be >= 0, got -1"]


def test_an_oversized_or_binary_config_is_refused_without_reading_it_all(repo):
    config = repo / "add_sub" / "config.pbtxt"
    config.write_bytes(b"#" * (2 << 20))
    assert check_model(repo, "add_sub") == [f"{config}: larger than 1048576 bytes (not a model configuration)"]
    config.write_bytes(b"name: \xff\xfe")
    [problem] = check_model(repo, "add_sub")
    assert problem.startswith(f"{config}: not UTF-8 text")


def test_a_config_that_is_a_fifo_is_refused_without_blocking(repo):
    config = repo / "add_sub" / "config.pbtxt"
    config.unlink()
    os.mkfifo(config)
    assert check_model(repo, "add_sub") == [f"{config}: not a regular file"]


def test_a_missing_file_is_named(repo):
    model_py = repo / "add_sub" / "1" / "model.py"
    model_py.unlink()
    assert check_model(repo, "add_sub") == [
        f'{model_py}: backend: missing (backend "python" loads model.py from version 1)']
    onnx = repo / "mlp_onnx" / "1" / "model.onnx"
    shutil.move(onnx, repo / "mlp_onnx" / "1" / "other.onnx")
    assert check_model(repo, "mlp_onnx") == [
        f'{onnx}: platform: missing (platform "onnxruntime_onnx" loads model.onnx from version 1)']
    (repo / "mlp_onnx" / "2").mkdir()            # the latest version is the one served: it is checked
    assert check_model(repo, "mlp_onnx") == [
        f'{repo / "mlp_onnx" / "2" / "model.onnx"}: platform: missing '
        f'(platform "onnxruntime_onnx" loads model.onnx from version 2)']
    shutil.rmtree(repo / "add_sub" / "1")
    assert check_model(repo, "add_sub") == [
        f'{repo / "add_sub" / "1" / "model.py"}: backend: missing (backend "python" loads model.py from a '
        f'numbered version folder, and {repo / "add_sub"} has none)']


def test_a_missing_label_file_and_a_bad_requires_list(repo):
    config = repo / "add_sub" / "config.pbtxt"
    _edit(config, 'name: "OUTPUT0"', 'name: "OUTPUT0"\n    label_filename: "labels.txt"')
    config.write_text(config.read_text() + 'parameters {\n  key: "requires"\n  value { string_value: "torch, no/pe" }\n}\n')
    assert check_model(repo, "add_sub") == [
        f"{config}: output[0].label_filename: 'labels.txt' is not a file in {repo / 'add_sub'}",
        f"{config}: parameters.requires: 'no/pe' is not a module name (list importable names, "
        f'e.g. "torch, torchvision")']


def test_ensemble_steps_are_checked_too(tmp_path):
    root = tmp_path / "pipes"
    shutil.copytree(LARGE_TENSOR, root)
    ensemble = root / "large_pipeline" / "config.pbtxt"
    _edit(root / "reduce" / "config.pbtxt", 'backend: "python"', 'backend: "tensorflow"')
    [problem] = check_model(root, "large_pipeline")
    assert problem.startswith(f"{root / 'reduce' / 'config.pbtxt'}: field 'backend' is not supported")
    _edit(root / "reduce" / "config.pbtxt", 'backend: "tensorflow"', 'backend: "python"')
    _edit(ensemble, 'model_name: "reduce"', 'model_name: "reduse"')
    assert check_model(root, "large_pipeline") == [
        f"{ensemble}: ensemble_scheduling.step[1].model_name: no model 'reduse' in the repository {root} "
        "(did you mean 'reduce'?)"]
    _edit(ensemble, 'model_name: "reduse"', 'model_name: "../large_tensor/reduce"')
    [problem] = check_model(root, "large_pipeline")
    assert problem.startswith(f"{ensemble}: ensemble_scheduling.step[1].model_name: invalid model name")
    _edit(ensemble, 'model_name: "../large_tensor/reduce"', 'model_name: "large_pipeline"')
    assert check_model(root, "large_pipeline") == [
        f"{ensemble}: ensemble_scheduling.step[1].model_name: ensembles contain each other: "
        "large_pipeline -> large_pipeline"]


def test_pipeline_steps_of_the_spec_are_checked(repo):
    assert check_model(repo, "add_sub", "p", steps=["mlp_onnx", "mlp_onx"]) == [
        f"p.steps[1].model: no model 'mlp_onx' in the repository {repo} (did you mean 'mlp_onnx'?)"]


def test_missing_modules_reads_requires_and_the_backend(repo):
    config = repo / "add_sub" / "config.pbtxt"
    assert missing_modules(repo, "add_sub") == []
    config.write_text(config.read_text() + 'parameters {\n  key: "requires"\n'
                      '  value { string_value: "numpy, meshserve_test_no_such_module" }\n}\n')
    assert missing_modules(repo, "add_sub") == [("add_sub", "meshserve_test_no_such_module")]
    assert missing_modules(repo, "mlp_onnx") == []   # onnxruntime is a dev extra: installed here


def test_dev_skips_an_example_whose_dependencies_this_host_lacks(tmp_path, repo):
    _edit(repo / "add_sub" / "config.pbtxt", "max_batch_size: 64",
          'max_batch_size: 64\nparameters {\n  key: "requires"\n  value { string_value: "meshserve_test_nope" }\n}')
    spec = tmp_path / "d.yaml"
    spec.write_text("kind: Deployment\nname: a\nmodel: {repository: models, name: add_sub}\n---\n"
                    "kind: Deployment\nname: b\nmodel: {repository: models, name: mlp_onnx}\n")
    assert missing_dependencies(spec) == ("model add_sub needs meshserve_test_nope, which this host's Python lacks "
                                          "(pip install meshserve_test_nope)")
    torch_missing = missing_modules(EXAMPLES, "resnet50_torch") == [("resnet50_torch", "torch")]
    reason = missing_dependencies(REPO_ROOT / "examples" / "deployments" / "resnet50_torch.yaml")
    assert reason == ("model resnet50_torch needs torch, which this host's Python lacks (pip install torch)"
                      if torch_missing else "")
    assert missing_dependencies(REPO_ROOT / "examples" / "deployments" / "add_sub.yaml") == ""


# ---------------------------------------------------------------- ctl and the scheduler, real processes


@pytest.fixture
def scheduler(cluster, tmp_path):
    return cluster.scheduler(f"sqlite:///{tmp_path / 'state.db'}", "checks")


def _ctl(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshserve.scheduler", "ctl", "--server", address, *args],
                          capture_output=True, text=True, timeout=CTL_TIMEOUT_S, cwd=REPO_ROOT)


def _spec(path: pathlib.Path, model: str, repository: str = "models") -> pathlib.Path:
    path.write_text(f"kind: Deployment\nname: checked\nmodel: {{repository: {repository}, name: {model}}}\n")
    return path


def _deployments(address: str) -> list[str]:
    admin = Admin(address)
    try:
        return [d.name for d in admin.stub.Get(mesh.GetRequest(kind="deployments"), timeout=10).deployments]
    finally:
        admin.close()


def test_ctl_apply_refuses_a_misspelt_model_a_bad_config_and_a_missing_file(scheduler, tmp_path, repo):
    spec = _spec(tmp_path / "spec.yaml", "add_sbu")
    for dry_run in ([], ["--dry-run"]):
        run = _ctl(scheduler.address, "apply", "-f", str(spec), *dry_run)
        assert (run.returncode, run.stdout) == (1, "")
        assert run.stderr == (f"error: {spec}: deployments[0].model.name: no model 'add_sbu' in the repository "
                              f"{repo} (did you mean 'add_sub'?)\n")

    _spec(spec, "add_sub")
    config = repo / "add_sub" / "config.pbtxt"
    _edit(config, "max_batch_size: 64", "max_batch_size: -1")
    run = _ctl(scheduler.address, "apply", "-f", str(spec), "--dry-run")
    assert (run.returncode, run.stderr) == (1, f"error: {config}: field 'max_batch_size' must be >= 0, got -1\n")

    _edit(config, "max_batch_size: -1", "max_batch_size: 64")
    (repo / "add_sub" / "1" / "model.py").unlink()
    run = _ctl(scheduler.address, "apply", "-f", str(spec))
    assert (run.returncode, run.stderr) == (1, f"error: {repo / 'add_sub' / '1' / 'model.py'}: backend: missing "
                                               f'(backend "python" loads model.py from version 1)\n')
    assert _deployments(scheduler.address) == []     # nothing was stored

    shutil.copy(EXAMPLES / "add_sub" / "1" / "model.py", repo / "add_sub" / "1" / "model.py")
    run = _ctl(scheduler.address, "apply", "-f", str(spec))
    assert (run.returncode, run.stdout) == (0, "deployment/checked created\n"), run.stderr
    assert _deployments(scheduler.address) == ["checked"]


def test_a_repository_only_on_the_hosts_needs_files_on_nodes(scheduler, tmp_path):
    spec = _spec(tmp_path / "spec.yaml", "m", repository="/srv/meshserve-test-absent/models")
    run = _ctl(scheduler.address, "apply", "-f", str(spec), "--dry-run")
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: {spec}: deployments[0].model.repository: /srv/meshserve-test-absent/models: no such folder",
        "  (a repository that is only on the serving hosts: apply with --files-on-nodes; "
        "each host then checks it when the replica loads)"]
    run = _ctl(scheduler.address, "apply", "-f", str(spec), "--dry-run", "--files-on-nodes")
    assert (run.returncode, run.stdout) == (0, "deployment/checked created (dry run)\n"), run.stderr


def test_the_scheduler_refuses_what_it_sees_whoever_calls(scheduler, repo):
    """Apply called directly, as any admin client may: the scheduler checks the files on its host."""
    admin = Admin(scheduler.address)
    try:
        spec = f"kind: Deployment\nname: direct\nmodel: {{repository: {repo}, name: add_sbu}}\n"
        for dry_run in (True, False):
            with pytest.raises(grpc.RpcError) as refused:
                admin.stub.Apply(mesh.ApplyRequest(spec_yaml=spec, dry_run=dry_run), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == (f"deployments[0].model.name: no model 'add_sbu' in the repository "
                                               f"{repo} (did you mean 'add_sub'?)")
        # A repository the scheduler's host does not have is left to the hosts (documented).
        elsewhere = "kind: Deployment\nname: elsewhere\nmodel: {repository: /srv/meshserve-test-absent, name: m}\n"
        assert admin.apply(elsewhere) == ["deployment/elsewhere created"]
    finally:
        admin.close()
