"""Configuration from the environment (MESHSERVE_<DAEMON>_<FLAG>, what /etc/meshserve/DAEMON.env holds) and
the shared logging set-up (--log-format text|json, no timestamps under journald). The daemons are real
processes; journald's stream is a real file whose device and inode the daemon is told."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from meshserve.common.daemon_logging import JsonFormatter, add_logging_arguments, formatter, under_journald
from meshserve.common.env_flags import env_name, environment_arguments, parse_with_environment

WAIT_S = 60.0
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sample")
    parser.add_argument("--listen", default="127.0.0.1:7070")
    parser.add_argument("--report-interval", type=float, default=1.0)
    parser.add_argument("--strict", action="store_true")
    parser.add_argument("--remote-model", action="append", default=[])
    parser.add_argument("--name", required=True)
    add_logging_arguments(parser)
    return parser


def test_flag_names_map_to_one_variable_each():
    assert env_name("node-agent", "--fake-gpus") == "MESHSERVE_NODE_AGENT_FAKE_GPUS"
    assert env_name("scheduler", "--store") == "MESHSERVE_SCHEDULER_STORE"


def test_the_environment_sets_flags_and_the_command_line_wins():
    env = {"MESHSERVE_SAMPLE_LISTEN": "0.0.0.0:9", "MESHSERVE_SAMPLE_REPORT_INTERVAL": "2.5",
           "MESHSERVE_SAMPLE_STRICT": "yes", "MESHSERVE_SAMPLE_NAME": "a",
           "MESHSERVE_SAMPLE_REMOTE_MODEL": "m1=h:1 'm2=h:2'", "MESHSERVE_SAMPLE_LOG_FORMAT": "json",
           "MESHSERVE_OTHER_LISTEN": "not ours", "PATH": "/usr/bin"}
    args = parse_with_environment(sample_parser(), "sample", ["--listen", "127.0.0.1:1"], env)
    assert args.listen == "127.0.0.1:1"                  # the command line wins
    assert args.report_interval == 2.5 and args.strict and args.name == "a" and args.log_format == "json"
    assert args.remote_model == ["m1=h:1", "m2=h:2"]
    off = parse_with_environment(sample_parser(), "sample", [], {"MESHSERVE_SAMPLE_STRICT": "false",
                                                                  "MESHSERVE_SAMPLE_NAME": "-dash"})
    assert not off.strict and off.name == "-dash"          # a value starting with "-" stays a value


@pytest.mark.parametrize("env, message", [
    ({"MESHSERVE_SAMPLE_LISTN": "x"}, "unknown setting MESHSERVE_SAMPLE_LISTN in the environment "
                                      "(or /etc/meshserve/sample.env); did you mean MESHSERVE_SAMPLE_LISTEN?"),
    ({"MESHSERVE_SAMPLE_STRICT": "maybe"}, "MESHSERVE_SAMPLE_STRICT='maybe': use true or false"),
    ({"MESHSERVE_SAMPLE_REPORT_INTERVAL": "soon"}, "argument --report-interval: invalid float value: 'soon'"),
    ({"MESHSERVE_SAMPLE_LOG_LEVEL": "loud"}, "'loud' is not a log level"),
    ({"MESHSERVE_SAMPLE_LOG_FORMAT": "xml"}, "argument --log-format: invalid choice: 'xml'"),
])
def test_bad_settings_are_refused_naming_them(capsys, env, message):
    with pytest.raises(SystemExit) as exit_:
        parse_with_environment(sample_parser(), "sample", ["--name", "a"], env)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_no_variables_no_words():
    assert environment_arguments(sample_parser(), "sample", {"HOME": "/root"}) == []


def test_json_lines_carry_time_level_logger_message_and_the_traceback():
    import logging

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("meshserve.x", logging.ERROR, "", 0, "failed %s", ("once",), sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "ERROR" and entry["logger"] == "meshserve.x" and entry["message"] == "failed once"
    assert entry["time"].endswith("+00:00") and "ValueError: boom" in entry["exception"]
    text = logging.LogRecord("meshserve.x", logging.INFO, "", 0, "hi", None, None)
    assert formatter("text", journald=True).format(text) == "INFO meshserve.x: hi"
    assert TIMESTAMP.match(formatter("text", journald=False).format(text))


def test_journald_is_recognised_only_for_the_stream_it_names(tmp_path):
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        stat = os.fstat(stream.fileno())
        assert under_journald({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, stream)
        assert not under_journald({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"}, stream)
        assert not under_journald({"JOURNAL_STREAM": "garbage"}, stream)
        assert not under_journald({}, stream)


# ---------------------------------------------------------------- real daemons


def run_scheduler(tmp_path, env_extra: dict[str, str], stderr_path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MESHSERVE_")}
    env.update({"PYTHONUNBUFFERED": "1", **env_extra})
    with open(stderr_path, "a") as stderr:
        return subprocess.Popen([sys.executable, "-m", "meshserve.scheduler", "serve"], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)


def wait_listening(process: subprocess.Popen) -> str:
    line = process.stdout.readline()
    assert "listening on" in line, line
    return line


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_a_scheduler_configured_only_by_its_environment_logs_json(tmp_path):
    stderr = tmp_path / "stderr"
    process = run_scheduler(tmp_path, {"MESHSERVE_SCHEDULER_LISTEN": "127.0.0.1:0",
                                       "MESHSERVE_SCHEDULER_STORE": f"sqlite:///{tmp_path / 'state.db'}",
                                       "MESHSERVE_SCHEDULER_ID": "from-env",
                                       "MESHSERVE_SCHEDULER_LOG_FORMAT": "json"}, stderr)
    try:
        wait_listening(process)
    finally:
        stop(process)
    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    assert lines
    entries = [json.loads(line) for line in lines]          # every line is one JSON object
    assert {entry["level"] for entry in entries} <= {"DEBUG", "INFO", "WARNING", "ERROR"}, entries
    assert (tmp_path / "state.db").exists()


def test_under_journald_a_daemon_logs_without_timestamps(tmp_path):
    """JOURNAL_STREAM names the daemon's stderr (a real file here, as journald's socket is under systemd)."""
    stderr = tmp_path / "journal"
    stderr.touch()
    stat = os.stat(stderr)
    process = run_scheduler(tmp_path, {"MESHSERVE_SCHEDULER_LISTEN": "127.0.0.1:0",
                                       "MESHSERVE_SCHEDULER_STORE": f"sqlite:///{tmp_path / 'state.db'}",
                                       "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, stderr)
    try:
        wait_listening(process)
    finally:
        stop(process)
    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    assert lines and not any(TIMESTAMP.match(line) for line in lines), lines
    assert any(line.startswith("INFO ") for line in lines), lines


def test_an_unknown_setting_stops_the_daemon_with_a_message(tmp_path):
    env = {**os.environ, "MESHSERVE_NODE_AGENT_SCHEDULERS": "127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "meshserve.node_agent"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2
    assert "unknown setting MESHSERVE_NODE_AGENT_SCHEDULERS" in done.stderr
    assert "did you mean MESHSERVE_NODE_AGENT_SCHEDULER?" in done.stderr
    assert "Traceback" not in done.stderr
