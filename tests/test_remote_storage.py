"""Sharing results: the default remote `storage`, push and pull into a fresh clone (a local folder, and S3 on
moto's server on loopback), and the exported SAE as the DVC artifact `sae`, fetched without the pipeline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dvc_projects import BIN, file_hashes, git_commit, make_project, ran_stages, recipe, run

pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="dvc is not installed")


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port, for the whole module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_endpoint, tmp_path_factory) -> dict[str, str]:
    """Any credentials do for moto; empty AWS config files keep the machine's own AWS setup out. The endpoint
    comes from the environment, so docs/sharing.md's S3 recipe runs as written."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_ENDPOINT_URL_S3": s3_endpoint}


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def s3_keys(endpoint: str, bucket: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def remote_url(root: Path) -> str:
    """The default remote's URL as configured (and that the default remote is `storage`)."""
    assert run(["dvc", "config", "core.remote"], root).strip() == "storage"
    return run(["dvc", "config", "remote.storage.url"], root).strip()


def data_repo(root: Path, repo_dir: Path) -> Path:
    """A git + DVC repo with the project's .dvc/config and a DVC-tracked folder (no pipeline to run)."""
    root.mkdir(parents=True)
    run(["git", "init", "-q", "-b", "main"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["dvc", "init", "-q"], root)
    shutil.copy(repo_dir / ".dvc/config", root / ".dvc/config")
    data = root / "data"
    (data / "nested").mkdir(parents=True)
    (data / "blob.bin").write_bytes(os.urandom(300_000))
    (data / "nested" / "notes.txt").write_text("activation cache stand-in\n")
    run(["dvc", "add", "data"], root)
    git_commit(root, "data")
    return root


def test_the_default_remote_is_a_folder_beside_the_checkout(tmp_path, repo_dir) -> None:
    root = data_repo(tmp_path / "work" / "project", repo_dir)
    storage = tmp_path / "work" / "saepipe-dvc-storage"
    assert remote_url(root) == str(storage)  # `../../saepipe-dvc-storage`, relative to .dvc/
    assert "Everything is up to date" not in run(["dvc", "push"], root)
    assert list((storage / "files" / "md5").iterdir())  # pushed without any setup

    clone = tmp_path / "work" / "copy"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert not (clone / "data").exists()
    run(["dvc", "pull"], clone)  # the clone's relative remote is the same folder
    assert file_hashes(clone, ["data"]) == file_hashes(root, ["data"])
    assert "Data and pipelines are up to date" in run(["dvc", "status"], clone)


def test_s3_recipe_pushes_to_s3_and_a_fresh_clone_pulls_identical_files(tmp_path, repo_dir, s3_endpoint,
                                                                         s3_env) -> None:
    root = data_repo(tmp_path / "project", repo_dir)
    s3_client(s3_endpoint).create_bucket(Bucket="my-bucket")
    run(recipe(repo_dir, "remote-s3"), root, env=s3_env)
    keys = s3_keys(s3_endpoint, "my-bucket")
    assert keys and all(key.startswith("saepipe/files/md5/") for key in keys)
    assert not (tmp_path / "saepipe-dvc-storage").exists()  # S3 replaced the local folder

    clone = tmp_path / "copy"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert remote_url(clone) == "s3://my-bucket/saepipe"  # the committed URL came along
    run(["dvc", "pull"], clone, env=s3_env)
    assert file_hashes(clone, ["data"]) == file_hashes(root, ["data"])
    assert "Cache and remote 'storage' are in sync" in run(["dvc", "status", "--cloud"], clone, env=s3_env)


@pytest.mark.parametrize(("name", "url"), [("remote-gcs", "gs://my-bucket/saepipe"),
                                           ("remote-ssh", "ssh://user@example.org/srv/saepipe-dvc-storage")])
def test_gcs_and_ssh_recipes_point_the_default_remote_elsewhere(tmp_path, repo_dir, name, url) -> None:
    root = data_repo(tmp_path / "project", repo_dir)
    run(recipe(repo_dir, name), root)
    assert remote_url(root) == url


def test_the_export_is_the_model_artifact_sae(tmp_path, repo_dir) -> None:
    artifacts = yaml.safe_load((repo_dir / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["sae"]["type"] == "model"
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(repo_dir / name, root)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    script = ("from dvc.repo import Repo\nrepo = Repo('.')\nprint(repo.artifacts.read()['dvc.yaml']['sae'].path)\n"
              "print(*[str(o) for s in repo.index.stages if s.name == 'export' for o in s.outs])")
    artifact_path, export_out = run([str(BIN / "python"), "-c", script], root).split()
    assert artifact_path == export_out == "models/sae/default"  # the export stage's output, resolved by DVC


# --- the tiny pipeline's outputs (one `dvc repro` shared by the module; slow) ----------------------------

@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, repo_dir, tiny_model_dir, tiny_training_text) -> Path:
    """The tiny project after one `dvc repro`, not yet committed (pipelines/ as shipped: its models never run)."""
    root = make_project(tmp_path_factory.mktemp("reproduced") / "project", repo_dir, tiny_model_dir,
                        tiny_training_text)
    ran = ran_stages(run(["dvc", "repro"], root))
    assert sorted(ran) == sorted(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])  # every stage, once
    return root


def fresh_copy(reproduced: Path, tmp_path: Path) -> Path:
    """A copy of the reproduced project in its own folder, so its default remote is a folder of its own."""
    copy = tmp_path / "work" / "project"
    shutil.copytree(reproduced, copy, symlinks=True)
    return copy


def outputs(root: Path) -> list[str]:
    """Every output path dvc.lock records (cached or not)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return sorted({out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])})


def assert_restored(original: Path, clone: Path) -> None:
    paths = outputs(original)
    assert len(paths) >= 15 and "models/sae/default" in paths
    expected = file_hashes(original, paths)
    assert file_hashes(clone, paths) == expected and len(expected) > len(paths)
    # clean, though pipelines/models/ (a DVC project of its own, shipped with the clone) never ran its models
    status = run(["dvc", "status"], clone)
    assert "Data and pipelines are up to date" in status, status
    assert ran_stages(run(["dvc", "repro"], clone)) == []


@pytest.mark.slow
def test_sharing_recipes_restore_every_output_and_fetch_the_sae_alone(reproduced, tmp_path, repo_dir) -> None:
    import saepipe

    project = fresh_copy(reproduced, tmp_path)
    output = run(recipe(repo_dir, "sharing"), project)
    assert "Data and pipelines are up to date" in output and "Running stage" not in output
    clone = tmp_path / "work" / "saepipe-copy"
    assert_restored(project, clone)

    output = run(recipe(repo_dir, "sharing-artifact"), project)
    assert "64 128 tiny-random-llama" in output.splitlines()
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    shutil.rmtree(project / ".dvc" / "cache")  # only the remote has the files now
    run(["dvc", "get", str(project), "models/sae/default", "-o", "by-path"], fetched)
    run(["dvc", "artifacts", "get", str(project), "sae", "-o", "by-name"], fetched)
    for name in ("by-path", "by-name"):
        assert file_hashes(fetched, [name]) == {p.replace("models/sae/default", name): h for p, h in
                                                file_hashes(project, ["models/sae/default"]).items()}
    original, copy = saepipe.load_sae(project / "models/sae/default"), saepipe.load_sae(fetched / "by-name")
    assert torch.equal(original.W_enc, copy.W_enc) and copy.provenance.model_name == "tiny-random-llama"


@pytest.mark.slow
def test_pipeline_outputs_round_trip_through_s3(reproduced, tmp_path, s3_endpoint, s3_env) -> None:
    project = fresh_copy(reproduced, tmp_path)
    s3_client(s3_endpoint).create_bucket(Bucket="saepipe-results")
    run(["dvc", "remote", "modify", "storage", "url", "s3://saepipe-results/tiny"], project)
    run(["dvc", "remote", "modify", "--local", "storage", "endpointurl", s3_endpoint], project)  # or the env var
    git_commit(project, "results on S3")
    run(["dvc", "push"], project, env=s3_env)
    assert len(s3_keys(s3_endpoint, "saepipe-results")) >= 20

    clone = tmp_path / "work" / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    run(["dvc", "pull"], clone, env=s3_env)
    assert_restored(project, clone)
