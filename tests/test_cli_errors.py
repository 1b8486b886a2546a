"""The CLI's failure paths that need no Podman: the exact message, the exit code, nothing kept.

Podman is pointed at a socket that does not exist, so any command that reached it would fail
loudly; the worker a successful `spaces add` would spawn is replaced by a recorder.
"""

import json
import subprocess

import click
import pytest
from click.testing import CliRunner

import appliance.cli.main as cli_module
from appliance import doctor
from appliance.cli.main import cli
from appliance.core import jobs

FORMS_HINT = (
    "Hint: give hf://spaces/owner/name, an https:// or ssh git URL (git@host:owner/name.git), "
    "or a local path such as /srv/spaces/name"
)


def git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


@pytest.fixture
def allowed(tmp_path):
    path = tmp_path / "allowed"
    path.mkdir()
    return path


@pytest.fixture
def runner(tmp_path, allowed):
    return CliRunner(env={
        "APPLIANCE_DATA_DIR": str(tmp_path / "data"),
        "APPLIANCE_LOCAL_SOURCES": str(allowed),
        "APPLIANCE_PODMAN_URL": "unix:///nonexistent.sock",
        "APPLIANCE_PODMAN_AUTOSTART": "false",
        "APPLIANCE_CONFIG_FILE": "/nonexistent",
    })


@pytest.fixture
def spawned(monkeypatch):
    """Record the workers commands would start instead of starting them."""
    calls = []
    monkeypatch.setattr(jobs, "spawn_job",
                        lambda ctx, space_id, job, factory=False: calls.append((space_id, job)))
    return calls


@pytest.fixture
def repo(allowed):
    """A real git repository with one commit on main, inside the allowed directory."""
    path = allowed / "my-space"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("---\nsdk: static\n---\n")
    (path / "index.html").write_text("<p>hi</p>\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "first")
    return path


def run(runner, *args, input=None):
    return runner.invoke(cli, list(args), obj={}, input=input, prog_name="appliance")


def assert_nothing_recorded(runner):
    listed = run(runner, "spaces", "list", "--json")
    assert (listed.exit_code, json.loads(listed.stdout)) == (0, [])
    events = run(runner, "events", "--json")
    assert (events.exit_code, json.loads(events.stdout)) == (0, [])


# -- spaces add: refused sources ------------------------------------------------------------


def test_add_refuses_a_remote_helper_source_and_runs_nothing(runner, tmp_path, spawned):
    pwned = tmp_path / "pwned"
    result = run(runner, "spaces", "add", f"ext::sh -c touch% {pwned}")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: Remote-helper sources (ext::...) are refused: 'ext::sh -c touch% {pwned}'\n"
        f"{FORMS_HINT}\n")
    assert not pwned.exists()
    assert spawned == []
    assert_nothing_recorded(runner)


@pytest.mark.parametrize("source", ["--upload-pack=touch /tmp/x", "-oProxyCommand=x"])
def test_add_refuses_a_source_git_would_read_as_an_option(runner, spawned, source):
    result = run(runner, "spaces", "add", "--", source)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: Source {source!r} starts with '-', which git would read as an option\n"
        f"{FORMS_HINT}\n")
    assert spawned == []
    assert_nothing_recorded(runner)


def test_add_refuses_a_local_path_outside_the_allowed_directories(runner, allowed, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = run(runner, "spaces", "add", str(outside))
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: Local source {outside} is outside the allowed directories {allowed}\n"
        "Hint: move it under one of them, or add its directory to APPLIANCE_LOCAL_SOURCES\n")
    assert_nothing_recorded(runner)


def test_add_refuses_a_path_that_climbs_out_of_the_allowed_directory(runner, allowed, tmp_path):
    result = run(runner, "spaces", "add", f"{allowed}/../elsewhere")
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"Error: Local source {allowed}/../elsewhere (resolves to {tmp_path}/elsewhere) is "
        f"outside the allowed directories {allowed}\n")
    assert_nothing_recorded(runner)


def test_add_refuses_local_paths_when_no_directory_is_allowed(runner, repo):
    runner.env["APPLIANCE_LOCAL_SOURCES"] = ""
    result = run(runner, "spaces", "add", str(repo))
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: Local paths are not allowed as Space sources: {repo}\n"
        "Hint: allow a directory with APPLIANCE_LOCAL_SOURCES=/path/to/dir\n")
    assert_nothing_recorded(runner)


def test_add_refuses_a_local_directory_that_is_not_a_git_repository(runner, allowed):
    plain = allowed / "plain"
    plain.mkdir()
    (plain / "app.py").write_text("print('hi')\n")
    result = run(runner, "spaces", "add", str(plain))
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: Local source {plain} is not a git repository\n"
        "Hint: run 'git init' there and commit the Space's files\n")
    assert_nothing_recorded(runner)


@pytest.mark.parametrize("form", ["file://{}", "{}"])
def test_add_refuses_a_missing_bare_repository_inside_the_allowed_directory(
        runner, allowed, spawned, form):
    missing = allowed / "missing.git"
    result = run(runner, "spaces", "add", form.format(missing))
    assert result.exit_code == 2
    assert result.stderr == f"Error: Local source {missing} is not a directory\n{FORMS_HINT}\n"
    assert spawned == []
    assert_nothing_recorded(runner)


def test_add_refuses_an_unknown_revision_and_records_nothing(runner, repo, spawned):
    result = run(runner, "spaces", "add", str(repo), "--revision", "no-such-branch")
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: Revision 'no-such-branch' not found in {repo}\n"
        "Hint: give a branch or tag that exists there (or a full 40-character commit sha)\n")
    assert spawned == []
    assert_nothing_recorded(runner)


def test_add_refuses_a_revision_git_would_misread(runner, repo):
    result = run(runner, "spaces", "add", str(repo), "--revision=--orphan")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: Invalid revision '--orphan'\n")
    assert_nothing_recorded(runner)


def test_add_refuses_an_invalid_space_name(runner, repo):
    result = run(runner, "spaces", "add", str(repo), "--name", "../etc")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: Invalid Space id '../etc'\n"
        "Hint: use owner/name, each up to 96 letters, digits, '.', '_' or '-'\n")
    assert_nothing_recorded(runner)


def test_add_refuses_a_hugging_face_flavor_name_with_the_request_to_use(runner, repo):
    result = run(runner, "spaces", "add", str(repo), "--hardware", "t4-small")
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "Error: Hardware 't4-small' is a Hugging Face flavor, not a request this box "
        "understands\nHint: use shared:16g (its GPU memory) or gpu")
    assert_nothing_recorded(runner)


def test_add_refuses_a_gpu_on_a_box_without_one(runner, repo):
    result = run(runner, "spaces", "add", str(repo), "--hardware", "gpu")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "Error: Hardware gpu is not available: This box has no NVIDIA GPU")
    assert_nothing_recorded(runner)


def test_adding_the_same_space_twice_says_it_already_exists(runner, repo, spawned):
    first = run(runner, "spaces", "add", str(repo), "--no-wait", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["stage"] == "BUILDING"
    assert spawned == [("local/my-space", "deploy")]
    second = run(runner, "spaces", "add", str(repo), "--no-wait")
    assert second.exit_code == 1
    assert second.stderr == (
        "Error: A Space named local/my-space already exists\n"
        "Hint: update it with 'appliance spaces update local/my-space', or pick another name "
        "with --name\n")
    assert spawned == [("local/my-space", "deploy")]
    listed = json.loads(run(runner, "spaces", "list", "--json").stdout)
    assert [s["id"] for s in listed] == ["local/my-space"]
    events = json.loads(run(runner, "events", "--json").stdout)
    assert [e["kind"] for e in events] == ["created"]


# -- other commands -------------------------------------------------------------------------


def test_show_of_an_unknown_space_says_so(runner):
    result = run(runner, "spaces", "show", "nope/nope")
    assert result.exit_code == 1
    assert result.stderr == "Error: No Space named nope/nope\nHint: see 'appliance spaces list'\n"


def test_secret_value_on_the_command_line_is_refused_with_the_stdin_hint(runner, repo, spawned):
    assert run(runner, "spaces", "add", str(repo)).exit_code == 0
    result = run(runner, "spaces", "secrets", "set", "local/my-space", "HF_TOKEN", "hf_s3cr3t")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: Secret values are read from stdin, not the command line\n"
        "Hint: printf %s VALUE | appliance spaces secrets set local/my-space HF_TOKEN\n")
    assert "hf_s3cr3t" not in result.output
    listed = run(runner, "spaces", "secrets", "list", "local/my-space", "--json")
    assert json.loads(listed.stdout) == []
    events = json.loads(run(runner, "events", "--json").stdout)
    assert [e["kind"] for e in events] == ["created"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("1TOKEN", "Error: Secret name '1TOKEN' is not valid\n"
                   "Hint: use letters, digits and _ (not starting with a digit)\n"),
        ("MY-TOKEN", "Error: Secret name 'MY-TOKEN' is not valid\n"
                     "Hint: use letters, digits and _ (not starting with a digit)\n"),
        ("SPACE_ID", "Error: SPACE_ID is set by the appliance itself and cannot be overridden\n"),
    ],
)
def test_invalid_secret_name_is_refused(runner, repo, spawned, key, message):
    assert run(runner, "spaces", "add", str(repo)).exit_code == 0
    result = run(runner, "spaces", "secrets", "set", "local/my-space", key, input="value\n")
    assert result.exit_code == 2
    assert result.stderr == message
    listed = run(runner, "spaces", "secrets", "list", "local/my-space", "--json")
    assert json.loads(listed.stdout) == []


def test_secret_for_an_unknown_space_is_not_found(runner):
    result = run(runner, "spaces", "secrets", "set", "nope/nope", "TOKEN", input="value\n")
    assert result.exit_code == 1
    assert result.stderr == "Error: No Space named nope/nope\nHint: see 'appliance spaces list'\n"
    assert_nothing_recorded(runner)


def test_deleting_a_missing_variable_says_so(runner, repo, spawned):
    assert run(runner, "spaces", "add", str(repo)).exit_code == 0
    result = run(runner, "spaces", "variables", "delete", "local/my-space", "MODE")
    assert result.exit_code == 1
    assert result.stderr == "Error: Space local/my-space has no variable named MODE\n"


def test_doctor_json_lists_every_check_and_fails_on_the_unreachable_socket(runner):
    result = run(runner, "doctor", "--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)
    assert [c["name"] for c in checks] == list(doctor.CHECK_NAMES)
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in checks)
    assert {c["status"] for c in checks} <= {"ok", "warn", "fail"}
    [socket] = [c for c in checks if c["name"] == "api-socket"]
    assert socket["status"] == "fail"
    assert socket["detail"].startswith("cannot reach Podman at unix:///nonexistent.sock: ")
    assert "podman system service" in socket["fix"] or "podman.socket" in socket["fix"]


# -- help -----------------------------------------------------------------------------------


def test_help_lists_the_spaces_and_doctor_commands(runner):
    result = run(runner, "--help")
    assert result.exit_code == 0
    assert result.stdout.startswith("Usage: appliance [OPTIONS] COMMAND [ARGS]...")
    commands = result.stdout.split("Commands:\n", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"spaces", "doctor"} <= listed
    assert "worker" not in listed


def spaces_commands(group=cli_module.spaces_group, path=("spaces",)):
    for name, command in sorted(group.commands.items()):
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from spaces_commands(command, (*path, name))


@pytest.mark.parametrize("path", list(spaces_commands()), ids=" ".join)
def test_every_spaces_command_help_ends_with_an_example(runner, path):
    result = run(runner, *path, "--help")
    assert result.exit_code == 0
    description = result.stdout.split("\nOptions:\n", 1)[0]
    last = [line.strip() for line in description.splitlines() if line.strip()][-1]
    assert last.startswith(f"Example: appliance {' '.join(path)} "), last
