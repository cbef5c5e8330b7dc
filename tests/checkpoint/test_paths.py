"""The path layer: local paths and file:// URLs are local; remote schemes need their backend;
an unknown scheme or a collapsed URL is an error, never a local folder named "gs:"."""

import pathlib

import pytest

from nvlm_jax.checkpoint import paths


def test_local_paths_and_file_urls_are_the_same_local_path(tmp_path):
    (tmp_path / "a").mkdir()
    for given in (tmp_path / "a", str(tmp_path / "a"), f"file://{tmp_path}/a"):
        p = paths.as_path(given)
        assert p.is_dir() and str(p) == str(tmp_path / "a") and not paths.is_remote(p)
    assert paths.local_path(f"file://{tmp_path}/a") == tmp_path / "a"


def test_a_relative_file_url_is_refused():
    with pytest.raises(ValueError, match="file:// URL needs an absolute path"):
        paths.as_path("file://relative/dir")


def test_an_unknown_scheme_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"unknown path scheme memory://"):
        paths.as_path("memory://bucket/run")
    assert list(tmp_path.iterdir()) == []


def test_a_remote_scheme_without_its_backend_names_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(paths, "backend_available", lambda scheme: False)
    with pytest.raises(ValueError, match=r"gs://bucket/run: gs:// paths need the gcsfs package"):
        paths.as_path("gs://bucket/run")
    assert not (tmp_path / "gs:").exists()


def test_a_remote_scheme_with_its_backend_stays_remote(monkeypatch):
    monkeypatch.setattr(paths, "backend_available", lambda scheme: True)
    p = paths.as_path("gs://bucket/run")
    assert paths.is_remote(p) and str(p / "checkpoints") == "gs://bucket/run/checkpoints"
    with pytest.raises(ValueError, match="must be on a local"):
        paths.local_path(p, "the workdir")


def test_a_url_whose_slashes_pathlib_collapsed_is_refused():
    with pytest.raises(ValueError, match="gs:// URL whose '//' was lost"):
        paths.as_path(pathlib.Path("gs://bucket/run"))


def test_orbax_dir_is_absolute_for_local_paths_and_keeps_remote_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.orbax_dir("run/params") == paths.as_path(tmp_path / "run" / "params")
    assert paths.orbax_dir("run/params").is_absolute()
    assert paths.orbax_dir(tmp_path / "x") == paths.as_path(tmp_path / "x")
    assert paths.orbax_dir("file:///data/ckpt") == paths.as_path("/data/ckpt")


def test_a_relative_orbax_folder_restores_like_an_absolute_one(tmp_path, monkeypatch):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from nvlm_jax.checkpoint.restore import restore_params

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "params", {"llm": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}})
    monkeypatch.chdir(tmp_path)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"llm": {"w": jax.ShapeDtypeStruct((2, 3), np.float32, sharding=device)}}
    restored, missing = restore_params("params", target)
    assert missing == [] and np.asarray(restored["llm"]["w"]).tolist() == [[0, 1, 2], [3, 4, 5]]
