"""Distributed settings from flags / environment (the multi-process runs themselves are tested
in tests/train/test_multiprocess.py)."""

import pytest

from nvlm_jax import distributed


def test_off_without_an_address():
    cfg = distributed.from_settings(environ={})
    assert cfg.mode == "off"
    assert distributed.initialize(cfg) is False


def test_environment_fills_unset_fields():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "JAX_LOCAL_DEVICE_IDS": "0,1"}
    cfg = distributed.from_settings(environ=env)
    assert cfg == distributed.DistributedConfig("explicit", "10.0.0.1:1234", 4, 3, (0, 1))


def test_flags_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    cfg = distributed.from_settings("", "host:99", 2, 0, "", environ=env)
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("host:99", 2, 0)


def test_auto_mode_needs_nothing_else():
    assert distributed.from_settings("auto", environ={}).mode == "auto"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(coordinator_address="nohost", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), "num_processes"),
        (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id"),
        (dict(mode="explicit", num_processes=2, process_id=0), "host:port"),
        (dict(mode="cluster"), "mode"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distributed.from_settings(environ={}, **kwargs)


def test_non_integer_environment_is_named():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.from_settings(environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})
