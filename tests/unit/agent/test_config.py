"""agent/config.py: defaults, TOML, refusals."""

from __future__ import annotations

import tomllib

import pytest

from micropatch.agent.config import AgentConfig, default_config_text, load_config
from micropatch.errors import ConfigError


def test_defaults_are_the_cautious_ones():
    c = AgentConfig()
    assert c.default_state == "enabled"
    assert (c.crash_limit, c.crash_window) == (3, 600.0)
    assert c.metrics_port is None and c.metrics_address == "127.0.0.1"
    assert c.read_only_group is None
    assert c.rescan_interval > 0


def test_missing_file_means_defaults(tmp_path):
    assert load_config(tmp_path / "absent.toml") == AgentConfig()
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", missing_ok=False)


def test_values_from_toml(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('default_state = "disabled"\ncrash_limit = 5\nread_only_group = "adm"\n')
    c = load_config(path)
    assert (c.default_state, c.crash_limit, c.read_only_group) == ("disabled", 5, "adm")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('default_state = "on"', "default_state"),
        ("crash_limit = 0", "crash_limit"),
        ("metrics_port = 70000", "metrics_port"),
        ("no_such_key = 1", "no_such_key"),
        ("crash_limit = ", "not valid TOML"),
        ("workers = 0", "workers"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path, text, problem):
    path = tmp_path / "agent.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_the_installed_default_file_parses_to_the_defaults():
    assert AgentConfig.model_validate(tomllib.loads(default_config_text())) == AgentConfig()


def test_workers_default_to_two_per_cpu_the_agent_may_run_on_at_most_8():
    import os

    assert AgentConfig().worker_count() == max(2, min(8, len(os.sched_getaffinity(0))))
    assert AgentConfig(workers=7).worker_count() == 7


def test_a_huge_or_endless_file_is_refused_after_the_bound(tmp_path):
    with pytest.raises(ConfigError, match=r"/dev/zero: cannot read: larger than 1 MiB"):
        load_config("/dev/zero")
