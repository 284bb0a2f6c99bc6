"""Unit tests of the deployment spec (scheduler/spec.py): no server, no files but examples/deployments."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from meshserve.common.errors import InvalidArgument
from meshserve.scheduler.spec import (
    MAX_REPLICAS,
    DeploymentSpec,
    FrozenMap,
    ModelRef,
    Placement,
    Resources,
    SpecError,
    format_size,
    parse_deployments,
    parse_size,
    specs_to_yaml,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOYMENTS = REPO_ROOT / "examples" / "deployments"
MODELS = REPO_ROOT / "examples" / "models"

FULL = """\
kind: Deployment
name: add-sub
model:
  repository: examples/models
  name: add_sub
replicas: 2
resources: {gpus: 1, gpu_memory: 40GiB, cpu: 1, memory: 2GiB}
placement: {strategy: spread, node_selector: {gpu: h100}}
revision_history: 5
runtime_args: [--drain-delay, "2"]
env: {OMP_NUM_THREADS: "4"}
"""

MINIMAL = """\
kind: Deployment
name: m
model: {repository: /models, name: m}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_deployments(text)
    return list(caught.value.problems)


def one_problem(text: str) -> str:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


def with_field(extra: str) -> str:
    """MINIMAL plus some lines."""
    return MINIMAL + textwrap.dedent(extra)


# ---------------------------------------------------------------- valid specs


def test_full_spec_parses_to_its_fields():
    [spec] = parse_deployments(FULL)
    assert spec == DeploymentSpec(
        name="add-sub",
        model=ModelRef(repository="examples/models", name="add_sub"),
        replicas=2,
        resources=Resources(gpus=1, gpu_memory=40 * 2**30, cpu=1.0, memory=2 * 2**30),
        placement=Placement(strategy="spread", node_selector=FrozenMap({"gpu": "h100"})),
        revision_history=5,
        runtime_args=("--drain-delay", "2"),
        env=FrozenMap({"OMP_NUM_THREADS": "4"}),
    )
    assert spec.kind == "Deployment"
    assert spec.placement.node_selector["gpu"] == "h100"


def test_defaults():
    [spec] = parse_deployments(MINIMAL)
    assert spec.replicas == 1
    assert spec.resources == Resources(gpus=0, gpu_memory=0, cpu=1.0, memory=0)
    assert spec.placement == Placement(strategy="spread", node_selector=FrozenMap())
    assert spec.revision_history == 5
    assert spec.runtime_args == ()
    assert dict(spec.env) == {}


def test_null_fields_take_their_defaults():
    [spec] = parse_deployments(with_field("replicas:\nresources:\nplacement:\nenv:\n"))
    assert spec == parse_deployments(MINIMAL)[0]


def test_to_dict_is_complete_and_round_trips():
    [spec] = parse_deployments(FULL)
    data = spec.to_dict()
    assert list(data) == ["kind", "name", "model", "replicas", "resources", "placement", "revision_history",
                          "runtime_args", "env", "rollout"]
    assert data["rollout"] == {"strategy": "rolling", "canary_weight": 10, "canary_replicas": 1, "max_surge": 1,
                               "max_unavailable": 0, "resource_aware": False, "progress_deadline_s": 600,
                               "auto_rollback": True}
    assert data["resources"] == {"gpus": 1, "gpu_memory": "40GiB", "cpu": 1, "memory": "2GiB"}
    assert parse_deployments(spec.to_yaml()) == [spec]
    [minimal] = parse_deployments(MINIMAL)
    assert parse_deployments(minimal.to_yaml()) == [minimal]


def test_specs_are_frozen_and_hashable():
    [spec] = parse_deployments(FULL)
    with pytest.raises(AttributeError):
        spec.replicas = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["X"] = "1"  # type: ignore[index]
    assert len({spec, parse_deployments(FULL)[0]}) == 1
    assert spec.replace(replicas=3).replicas == 3 and spec.replicas == 2


def test_cpu_fractions_and_millicores():
    [spec] = parse_deployments(with_field("resources: {cpu: 500m}\n"))
    assert spec.resources.cpu == 0.5
    [spec] = parse_deployments(with_field("resources: {cpu: 0.25}\n"))
    assert spec.resources.cpu == 0.25
    assert spec.to_dict()["resources"]["cpu"] == 0.25


def test_pack_strategy_and_zero_replicas():
    [spec] = parse_deployments(with_field("replicas: 0\nplacement: {strategy: pack}\n"))
    assert spec.replicas == 0 and spec.placement.strategy == "pack"


# ---------------------------------------------------------------- multiple documents


def test_multiple_documents_and_empty_ones():
    text = FULL + "---\n" + MINIMAL + "---\n---\n"
    specs = parse_deployments(text)
    assert [s.name for s in specs] == ["add-sub", "m"]
    assert parse_deployments(specs_to_yaml(specs)) == specs


def test_problems_in_several_documents_are_all_reported_with_their_index():
    text = MINIMAL + "replicas: -1\n---\n" + FULL + "---\n" + MINIMAL.replace("name: m\n", "name: Bad_Name\n")
    problems = problems_of(text)
    assert problems[0] == "deployments[0].replicas: -1 is negative (use 0 or more)"
    assert problems[1].startswith('deployments[2].name: "Bad_Name" is not a valid name')
    assert len(problems) == 2


def test_duplicate_names_across_documents():
    assert one_problem(MINIMAL + "---\n" + MINIMAL) == 'deployments[1].name: "m" is already the name of deployments[0]'


def test_no_documents():
    for text in ("", "\n# only a comment\n", "---\n"):
        assert "no deployments in the spec" in one_problem(text)


def test_a_document_that_is_not_a_mapping():
    assert one_problem("- a\n- b\n") == ("deployments[0]: expected a mapping (kind: Deployment, name: ..., "
                                         "model: ...), got a list")
    assert one_problem("just words\n").startswith('deployments[0]: expected a mapping')


# ---------------------------------------------------------------- every kind of error, with its path


def test_the_documented_size_error():
    problem = one_problem(FULL.replace("gpu_memory: 40GiB", "gpu_memory: 40Gx"))
    assert problem == 'deployments[0].resources.gpu_memory: "40Gx" is not a size (use e.g. 40GiB, 512MiB)'


@pytest.mark.parametrize("extra, expected", [
    ("replica: 2\n", 'deployments[0].replica: unknown field (did you mean "replicas"?)'),
    ("shade: blue\n", "deployments[0].shade: unknown field (fields: kind, name, model, replicas, resources, "
                      "placement, revision_history, runtime_args, env, rollout, colocate, steps, autoscaling)"),
    ("rollout: {strategy: blue}\n",
     'deployments[0].rollout.strategy: "blue" is not a rollout strategy (use rolling or canary)'),
    ("rollout: {canary_weight: 100}\n", "deployments[0].rollout.canary_weight: 100 is more than 99"),
    ("resources: {gpu: 1}\n", 'deployments[0].resources.gpu: unknown field (did you mean "gpus"?)'),
    ("placement: {nodeSelector: {}}\n", 'deployments[0].placement.nodeSelector: unknown field '
                                        '(did you mean "node_selector"?)'),
    ("replicas: two\n", 'deployments[0].replicas: expected a whole number, got "two"'),
    ('replicas: "2"\n', 'deployments[0].replicas: "2" is a string (write the number without quotes)'),
    ("replicas: 1.5\n", "deployments[0].replicas: expected a whole number, got 1.5"),
    ("replicas: true\n", "deployments[0].replicas: expected a whole number, got true"),
    (f"replicas: {MAX_REPLICAS + 1}\n", f"deployments[0].replicas: {MAX_REPLICAS + 1} is more than {MAX_REPLICAS}"),
    ("revision_history: -2\n", "deployments[0].revision_history: -2 is negative (use 0 or more)"),
    ("resources: [1]\n", "deployments[0].resources: expected a mapping (gpus: 1, gpu_memory: 4GiB, cpu: 1, "
                         "memory: 2GiB), got a list"),
    ("resources: {gpus: -1}\n", "deployments[0].resources.gpus: -1 is negative (use 0 or more)"),
    ("resources: {gpus: 1}\n", "deployments[0].resources.gpu_memory: required when gpus > 0 (the memory one "
                               "replica needs on each GPU, e.g. 4GiB)"),
    ("resources: {gpus: 1, gpu_memory: 0}\n", "deployments[0].resources.gpu_memory: must be more than 0 when "
                                              "gpus > 0 (the memory one replica needs on each GPU, e.g. 4GiB)"),
    ("resources: {gpu_memory: 4GiB}\n", "deployments[0].resources.gpu_memory: set but gpus is 0 (set gpus: 1 "
                                        "or more, or remove gpu_memory)"),
    ("resources: {cpu: fast}\n", 'deployments[0].resources.cpu: "fast" is not a number of cores '
                                 '(e.g. 1, 0.5 or "500m")'),
    ("resources: {cpu: -1}\n", "deployments[0].resources.cpu: -1 is not a number of cores (0 or more)"),
    ("resources: {memory: 2G}\n", 'deployments[0].resources.memory: "2G" is ambiguous: write 2GiB (powers of 2) '
                                  'or 2GB (powers of 10)'),
    ("resources: {memory: -1}\n", "deployments[0].resources.memory: -1 is negative (a size is 0 or more)"),
    ("placement: {strategy: Spread}\n", 'deployments[0].placement.strategy: "Spread" is not a strategy '
                                        '(use spread or pack)'),
    ("placement: {node_selector: {cuda: 12}}\n", 'deployments[0].placement.node_selector.cuda: 12 is not a '
                                                 'string (quote it: "12")'),
    ("placement: {node_selector: {gpu: yes}}\n", 'deployments[0].placement.node_selector.gpu: true is not a '
                                                 'string (quote it: "true")'),
    ("placement: {node_selector: [gpu]}\n", "deployments[0].placement.node_selector: expected a mapping of "
                                            "strings (gpu: h100), got a list"),
    ("runtime_args: --strict\n", 'deployments[0].runtime_args: expected a list of strings '
                                 '(e.g. [--drain-delay, "2"]), got "--strict"'),
    ("runtime_args: [--drain-delay, 2]\n", 'deployments[0].runtime_args[1]: 2 is not a string (quote it: "2")'),
    ("runtime_args: [--listen=0.0.0.0:1]\n", 'deployments[0].runtime_args[0]: "--listen" is set by the node '
                                             'agent (to a free port on its node); remove it'),
    ("runtime_args: [--model-repository, /x]\n", 'deployments[0].runtime_args[0]: "--model-repository" is set '
                                                 'by the node agent (from model.repository); remove it'),
    ("env: {THREADS: 4}\n", 'deployments[0].env.THREADS: 4 is not a string (quote it: "4")'),
    ("env: {1BAD: x}\n", 'deployments[0].env: "1BAD" is not a valid key (letters, digits and \'_\', '
                         'not starting with a digit)'),
    ('env: {CUDA_VISIBLE_DEVICES: "0"}\n', "deployments[0].env.CUDA_VISIBLE_DEVICES: is set by the node agent "
                                           "(to the GPUs placement picks); remove it"),
])
def test_each_error_names_its_field(extra, expected):
    assert one_problem(with_field(extra)) == expected


@pytest.mark.parametrize("text, expected", [
    ("name: m\nmodel: {repository: r, name: m}\n", "deployments[0].kind: required (kind: Deployment)"),
    ("kind: Pipelines\nname: m\nmodel: {repository: r, name: m}\n",
     'deployments[0].kind: "Pipelines" is not a kind this version knows (use Deployment or Pipeline)'),
    ("kind: Pipeline\nname: m\nmodel: {repository: r, name: m}\n",
     "deployments[0].steps: required: a list of {model: NAME, resources: {...}}, one per step model"),
    ("kind: Pipeline\nname: m\nmodel: {repository: r, name: m}\ncolocate: always\nsteps: [{model: a}]\n",
     'deployments[0].colocate: "always" is not a mode (use required | preferred | none)'),
    ("kind: Pipeline\nname: m\nmodel: {repository: r, name: m}\nsteps: [{model: a}, {model: a}]\n",
     'deployments[0].steps[1].model: "a" is listed twice'),
    ("kind: Deployment\nmodel: {repository: r, name: m}\n",
     "deployments[0].name: required (a DNS label, e.g. add-sub)"),
    ("kind: Deployment\nname: 7\nmodel: {repository: r, name: m}\n", "deployments[0].name: expected a string, got 7"),
    ("kind: Deployment\nname: add_sub\nmodel: {repository: r, name: m}\n",
     'deployments[0].name: "add_sub" is not a valid name (lowercase letters, digits and \'-\', starting and ending '
     'with a letter or digit, at most 63 characters)'),
    (f"kind: Deployment\nname: {'a' * 64}\nmodel: {{repository: r, name: m}}\n",
     f'deployments[0].name: "{"a" * 64}" is not a valid name (lowercase letters, digits and \'-\', starting and '
     'ending with a letter or digit, at most 63 characters)'),
    ("kind: Deployment\nname: m\n", "deployments[0].model: required (model: {repository: PATH, name: MODEL})"),
    ("kind: Deployment\nname: m\nmodel: add_sub\n",
     'deployments[0].model: expected a mapping (repository: PATH, name: MODEL), got "add_sub"'),
    ("kind: Deployment\nname: m\nmodel: {name: m}\n",
     "deployments[0].model.repository: required (the model repository folder, e.g. examples/models)"),
    ("kind: Deployment\nname: m\nmodel: {repository: r, name: a/b}\n",
     'deployments[0].model.name: "a/b" is not a model name (a folder name in the repository)'),
])
def test_required_fields_and_names(text, expected):
    assert one_problem(text) == expected


def test_every_problem_is_collected_not_only_the_first():
    text = """\
kind: Deploymnt
name: Add_Sub
model: {repository: 3, nme: x}
replicas: -1
resources: {gpus: one, gpu_memory: 40Gx, cpu: fast}
placement: {strategy: Spread}
env: {CUDA_VISIBLE_DEVICES: "0"}
"""
    problems = problems_of(text)
    paths = [p.split(":", 1)[0] for p in problems]
    assert paths == [
        "deployments[0].kind", "deployments[0].name", "deployments[0].model.nme", "deployments[0].model.repository",
        "deployments[0].model.name", "deployments[0].replicas", "deployments[0].resources.gpus",
        "deployments[0].resources.gpu_memory", "deployments[0].resources.cpu", "deployments[0].placement.strategy",
        "deployments[0].env.CUDA_VISIBLE_DEVICES",
    ]
    with pytest.raises(SpecError) as caught:
        parse_deployments(text)
    assert str(caught.value) == "\n".join(problems)


def test_spec_error_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        parse_deployments("replicas: 2\n")
    assert SpecError("x").code.name == "INVALID_ARGUMENT"


def test_yaml_syntax_errors_carry_line_and_column():
    problem = one_problem("kind: Deployment\nname: [unclosed\n")
    assert problem.startswith("line 3, column 1: ") and problem.endswith("(not valid YAML)")
    duplicate = one_problem("kind: Deployment\nname: a\nname: b\n")
    assert duplicate == 'line 3, column 1: duplicate key "name" (first at line 2)'


def test_unsafe_yaml_is_refused_not_executed():
    problem = one_problem("!!python/object/apply:os.system [echo hi]\n")
    assert "not valid YAML" in problem


@pytest.mark.parametrize("text", [
    "{", "]", "\t", "kind: [", "? [a]\n: b\n", "{[1]: 2}", "&a [*a]", "kind: Deployment\n<<: 5\n", "x: !!binary ab",
    "- !!set {a, b}", "kind: Deployment\nname: m\nmodel: {repository: r, name: m}\nresources: {cpu: .nan}\n",
])
def test_odd_input_is_a_spec_error_never_a_traceback(text):
    problems_of(text)


def test_absurdly_deep_nesting_is_a_spec_error():
    assert "nested too deeply" in one_problem("[" * 5000 + "]" * 5000)


def test_non_text_is_refused():
    with pytest.raises(SpecError):
        parse_deployments(b"kind: Deployment")  # type: ignore[arg-type]


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text, size", [
    ("40GiB", 40 * 2**30), ("512MiB", 512 * 2**20), ("1KiB", 1024), ("2TiB", 2 * 2**40), ("7B", 7),
    ("1KB", 1000), ("1MB", 10**6), ("1.5GB", 1_500_000_000), ("3TB", 3 * 10**12),
    ("1.5GiB", 3 * 2**29), ("40Gi", 40 * 2**30), ("64Mi", 64 * 2**20), ("40gib", 40 * 2**30), (" 2 MiB ", 2 * 2**20),
    ("1024", 1024), (0, 0), (4096, 4096), ("0.5KiB", 512), ("0.3KiB", 308),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("value, message", [
    ("40Gx", '"40Gx" is not a size (use e.g. 40GiB, 512MiB)'),
    ("GiB", '"GiB" is not a size (use e.g. 40GiB, 512MiB)'),
    ("1e9", '"1e9" is not a size (use e.g. 40GiB, 512MiB)'),
    ("", '"" is not a size (use e.g. 40GiB, 512MiB)'),
    ("40G", '"40G" is ambiguous: write 40GiB (powers of 2) or 40GB (powers of 10)'),
    ("-1GiB", '"-1GiB" is negative (a size is 0 or more)'),
    (-5, "-5 is negative (a size is 0 or more)"),
    (1.5, "1.5 is not a size (use e.g. 40GiB, 512MiB)"),
    (True, "true is not a size (use e.g. 40GiB, 512MiB)"),
    ([1], "a list is not a size (use e.g. 40GiB, 512MiB)"),
])
def test_parse_size_refuses(value, message):
    with pytest.raises(SpecError) as caught:
        parse_size(value)
    assert caught.value.message == message


@pytest.mark.parametrize("size, text", [
    (0, 0), (40 * 2**30, "40GiB"), (3 * 2**29, "1536MiB"), (10**9, "1GB"), (1000, "1KB"), (1023, 1023), (2**40, "1TiB"),
])
def test_format_size_is_exact_and_parses_back(size, text):
    assert format_size(size) == text
    assert parse_size(text) == size


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_ignores_spelling_and_key_order():
    a = parse_deployments(FULL)[0]
    rewritten = """\
name: add-sub
kind: Deployment
env: {OMP_NUM_THREADS: "4"}
runtime_args: [--drain-delay, "2"]
resources: {memory: 2147483648, cpu: 1.0, gpu_memory: 40Gi, gpus: 1}
placement: {node_selector: {gpu: h100}}
model: {name: add_sub, repository: examples/models}
replicas: 2
"""
    b = parse_deployments(rewritten)[0]
    assert a == b
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 64


def test_fingerprint_is_stable_across_processes():
    """No hash() randomisation: another interpreter with another PYTHONHASHSEED computes the same digest."""
    code = ("import sys; from meshserve.scheduler.spec import parse_deployments; "
            "print(parse_deployments(sys.stdin.read())[0].fingerprint())")
    digests = set()
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], input=FULL, capture_output=True, text=True,
                                cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=30, check=True)
        digests.add(result.stdout.strip())
    assert digests == {parse_deployments(FULL)[0].fingerprint()}


def test_fingerprint_changes_with_any_field_and_revision_fingerprint_only_with_the_template():
    base = parse_deployments(FULL)[0]
    scaled = base.replace(replicas=5)
    history = base.replace(revision_history=1)
    assert len({base.fingerprint(), scaled.fingerprint(), history.fingerprint()}) == 3
    assert base.revision_fingerprint() == scaled.revision_fingerprint() == history.revision_fingerprint()
    for changed in (base.replace(env=FrozenMap({"OMP_NUM_THREADS": "8"})), base.replace(runtime_args=()),
                    base.replace(resources=Resources(gpus=1, gpu_memory=2**30)),
                    base.replace(model=ModelRef("examples/models", "textgen")),
                    base.replace(placement=Placement(strategy="pack"))):
        assert changed.fingerprint() != base.fingerprint()
        assert changed.revision_fingerprint() != base.revision_fingerprint()


# ---------------------------------------------------------------- paths and examples


def test_relative_repository_resolves_against_base_dir(tmp_path):
    text = MINIMAL.replace("/models", "../models")
    [spec] = parse_deployments(text, base_dir=tmp_path / "specs")
    assert spec.model.repository == str(tmp_path / "models")
    [kept] = parse_deployments(text)
    assert kept.model.repository == "../models"
    [absolute] = parse_deployments(MINIMAL, base_dir=tmp_path)
    assert absolute.model.repository == "/models"


EXAMPLE_FILES = sorted(DEPLOYMENTS.glob("*.yaml"))


def test_examples_exist_for_every_documented_model():
    names = {p.stem for p in EXAMPLE_FILES}
    assert {"add_sub", "textgen", "mlp_onnx", "resnet50_torch"} <= names
    readme = (DEPLOYMENTS / "README.md").read_text()
    for path in EXAMPLE_FILES:
        assert f"`{path.name}`" in readme


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_deployments_parse_and_point_at_real_models(path):
    [spec] = parse_deployments(path.read_text(), base_dir=path.parent)
    assert pathlib.Path(spec.model.repository) == MODELS
    assert (MODELS / spec.model.name / "config.pbtxt").is_file()
    assert parse_deployments(spec.to_yaml()) == [spec]


def test_example_specifics():
    specs = {p.stem: parse_deployments(p.read_text(), base_dir=p.parent)[0] for p in EXAMPLE_FILES}
    assert specs["add_sub"].replicas == 2 and specs["add_sub"].resources.gpus == 0
    assert specs["textgen"].replicas == 1
    assert specs["mlp_onnx"].resources.gpus == 0
    assert specs["resnet50_torch"].resources.gpus == 1
    assert specs["resnet50_torch"].resources.gpu_memory == 4 * 2**30


def test_a_pipeline_spec_lists_its_steps_and_round_trips():
    [spec] = parse_deployments("""kind: Pipeline
name: image
model: {repository: /repo, name: image_pipeline}
colocate: preferred
steps:
  - model: preprocess
    resources: {cpu: 250m}
  - model: classifier
    resources: {gpus: 1, gpu_memory: 2GiB, cpu: 500m}
""")
    assert spec.kind == "Pipeline" and spec.colocate == "preferred"
    assert [(s.model, s.resources.gpus, s.resources.cpu) for s in spec.steps] == [
        ("preprocess", 0, 0.25), ("classifier", 1, 0.5)]
    assert spec.to_dict()["steps"][1]["resources"]["gpu_memory"] == "2GiB"
    assert parse_deployments(spec.to_yaml()) == [spec]
    [plain] = parse_deployments(MINIMAL)
    assert "steps" not in plain.to_dict() and "colocate" not in plain.to_dict()
