"""Settings: defaults, APPLIANCE_* variables, the TOML config file, and their validation."""

import os
from pathlib import Path

import pytest

from appliance.config import SETTINGS, Config, load_config
from appliance.errors import InvalidInput

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def no_file(tmp_path):
    """An environment whose config file does not exist (so the host's /etc is never read)."""
    return {"APPLIANCE_CONFIG_FILE": str(tmp_path / "absent.toml")}


def write_config(tmp_path, text):
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return {"APPLIANCE_CONFIG_FILE": str(path)}


def test_settings_are_declared_once_with_help():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.help.strip(), setting.name
        assert setting.name == setting.name.lower()
        assert isinstance(setting.default, setting.kind), setting.name


def test_load_config_without_overrides_gives_the_defaults(no_file):
    config = load_config(no_file)
    for setting in SETTINGS:
        if setting.name != "config_file":
            assert getattr(config, setting.name) == setting.default, setting.name
    assert config.data_dir == "/var/lib/appliance"
    assert config.db_path == Path("/var/lib/appliance/appliance.db")
    assert config.podman_autostart is True
    assert config.port_bounds == (17000, 17999)
    assert config.local_source_roots == []


def test_unknown_attribute_is_an_attribute_error(no_file):
    with pytest.raises(AttributeError):
        load_config(no_file).no_such_setting  # noqa: B018


@pytest.mark.parametrize(
    ("variable", "raw", "name", "value"),
    [
        ("APPLIANCE_DATA_DIR", "/srv/appliance", "data_dir", "/srv/appliance"),
        ("APPLIANCE_GIT_TIMEOUT", "42", "git_timeout", 42),
        ("APPLIANCE_MAX_CHECKOUT_MB", " 10 ", "max_checkout_mb", 10),
        ("APPLIANCE_DRAIN_SECONDS", "2.5", "drain_seconds", 2.5),
        ("APPLIANCE_SPACE_CPUS", "4", "space_cpus", 4.0),
        ("APPLIANCE_PODMAN_AUTOSTART", "false", "podman_autostart", False),
        ("APPLIANCE_PODMAN_AUTOSTART", "0", "podman_autostart", False),
        ("APPLIANCE_PODMAN_AUTOSTART", "no", "podman_autostart", False),
        ("APPLIANCE_PODMAN_AUTOSTART", "Off", "podman_autostart", False),
        ("APPLIANCE_PODMAN_AUTOSTART", "TRUE", "podman_autostart", True),
        ("APPLIANCE_PODMAN_AUTOSTART", "yes", "podman_autostart", True),
        ("APPLIANCE_PODMAN_AUTOSTART", "1", "podman_autostart", True),
    ],
)
def test_environment_variable_overrides_the_default_with_its_type(
        no_file, variable, raw, name, value):
    config = load_config({**no_file, variable: raw})
    assert getattr(config, name) == value
    assert type(getattr(config, name)) is type(value)


def test_variables_without_the_appliance_prefix_are_ignored(no_file):
    config = load_config({**no_file, "DATA_DIR": "/elsewhere", "appliance_data_dir": "/x"})
    assert config.data_dir == "/var/lib/appliance"


def test_keyword_overrides_win_over_the_environment(no_file):
    config = load_config({**no_file, "APPLIANCE_GIT_TIMEOUT": "5"}, git_timeout="7")
    assert config.git_timeout == 7


def test_with_values_returns_a_new_config_and_coerces(no_file):
    config = load_config(no_file)
    changed = config.with_values(max_checkout_mb="5", podman_autostart="off")
    assert (changed.max_checkout_mb, changed.podman_autostart) == (5, False)
    assert (config.max_checkout_mb, config.podman_autostart) == (2048, True)


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("APPLIANCE_GIT_TIMEOUT", "soon", "Setting git_timeout must be int, got 'soon'"),
        ("APPLIANCE_GIT_TIMEOUT", "1.5", "Setting git_timeout must be int, got '1.5'"),
        ("APPLIANCE_SPACE_CPUS", "two", "Setting space_cpus must be float, got 'two'"),
        ("APPLIANCE_PODMAN_AUTOSTART", "maybe",
         "Setting podman_autostart must be true or false, got 'maybe'"),
    ],
)
def test_bad_environment_value_is_refused_naming_the_setting(no_file, variable, raw, message):
    with pytest.raises(InvalidInput) as caught:
        load_config({**no_file, variable: raw})
    assert caught.value.message == message
    assert variable in caught.value.hint


def test_config_file_sets_values_and_the_environment_wins_over_it(tmp_path):
    env = write_config(tmp_path, 'data_dir = "/srv/a"\ngit_timeout = 30\n'
                                 'podman_autostart = false\nspace_cpus = 1.5\n')
    config = load_config(env)
    assert (config.data_dir, config.git_timeout, config.podman_autostart, config.space_cpus) \
        == ("/srv/a", 30, False, 1.5)
    assert load_config({**env, "APPLIANCE_GIT_TIMEOUT": "60"}).git_timeout == 60


def test_config_file_with_an_unknown_key_is_refused_naming_it(tmp_path):
    env = write_config(tmp_path, 'data_dir = "/srv/a"\ndata_directory = "/srv/b"\n')
    with pytest.raises(InvalidInput) as caught:
        load_config(env)
    assert caught.value.message == (
        f"Unknown setting 'data_directory' in {env['APPLIANCE_CONFIG_FILE']}")
    assert caught.value.hint == "see the configuration table in the README"


def test_config_file_with_a_bad_value_is_refused_naming_the_setting(tmp_path):
    env = write_config(tmp_path, 'max_checkout_mb = "many"\n')
    with pytest.raises(InvalidInput, match="Setting max_checkout_mb must be int, got 'many'"):
        load_config(env)


def test_config_file_that_is_not_toml_is_refused_naming_the_file(tmp_path):
    env = write_config(tmp_path, "data_dir = /srv/a  # unquoted\n")
    with pytest.raises(InvalidInput) as caught:
        load_config(env)
    assert caught.value.message.startswith(
        f"Cannot read config file {env['APPLIANCE_CONFIG_FILE']}: ")
    assert caught.value.hint == "fix or remove the file"


def test_missing_config_file_is_not_an_error(no_file):
    assert load_config(no_file).data_dir == "/var/lib/appliance"


@pytest.mark.parametrize(
    ("port_range", "bounds"),
    [("17000-17999", (17000, 17999)), ("1025-1025", (1025, 1025)), ("20000-65535", (20000, 65535))],
)
def test_port_bounds_parse_a_range(no_file, port_range, bounds):
    assert load_config(no_file, port_range=port_range).port_bounds == bounds


@pytest.mark.parametrize("port_range", ["17000", "abc", "17000-", "-17999", "17000:17999", ""])
def test_port_bounds_refuse_a_malformed_range(no_file, port_range):
    config = load_config(no_file, port_range=port_range)
    with pytest.raises(InvalidInput) as caught:
        config.port_bounds  # noqa: B018
    assert caught.value.message == (
        f"Setting port_range must look like 17000-17999, got {port_range!r}")
    assert caught.value.hint == "fix APPLIANCE_PORT_RANGE"


@pytest.mark.parametrize("port_range", ["80-1000", "1024-2000", "60000-65536"])
def test_port_bounds_refuse_a_range_outside_unprivileged_ports(no_file, port_range):
    config = load_config(no_file, port_range=port_range)
    with pytest.raises(InvalidInput) as caught:
        config.port_bounds  # noqa: B018
    assert caught.value.message == (
        f"Setting port_range {port_range!r} is outside 1025-65535")


def test_port_bounds_refuse_a_reversed_range(no_file):
    config = load_config(no_file, port_range="17999-17000")
    with pytest.raises(InvalidInput, match="port_range '17999-17000'"):
        config.port_bounds  # noqa: B018


def test_local_source_roots_split_on_colons_resolve_and_skip_empties(no_file, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = load_config(
        {**no_file, "APPLIANCE_LOCAL_SOURCES": f"{tmp_path}/a::{tmp_path}/link:  :"})
    assert config.local_source_roots == [(tmp_path / "a").resolve(), (tmp_path / "real").resolve()]


def test_podman_socket_url_defaults_to_the_service_users_runtime_dir(no_file):
    config = load_config({**no_file, "APPLIANCE_SERVICE_USER": "no-such-user-here"})
    assert config.podman_socket_url == f"unix:///run/user/{os.getuid()}/podman/podman.sock"
    explicit = load_config({**no_file, "APPLIANCE_PODMAN_URL": "unix:///tmp/p.sock"})
    assert explicit.podman_socket_url == "unix:///tmp/p.sock"


def test_config_is_immutable(no_file):
    config = load_config(no_file)
    with pytest.raises(AttributeError):
        config.values = {}
    assert isinstance(config, Config)


def test_every_setting_is_documented_in_readme():
    text = README.read_text()
    missing = [s.name for s in SETTINGS if f"APPLIANCE_{s.name.upper()}" not in text]
    assert not missing, f"README.md's configuration table lacks: {missing}"
