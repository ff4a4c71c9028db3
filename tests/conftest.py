"""Shared fixtures: one local Ray cluster and one moto S3 server per test session (started on first use), and
fresh micro-config models for the training tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A private local 2-CPU Ray cluster on 127.0.0.1, without dashboard or token auth, shared by the session's
    Ray tests (``address="local"``: never another user's cluster from Ray's address file)."""
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.delenv("RAY_ADDRESS", raising=False)
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            log_to_driver=False,
        )
    yield
    if started:
        ray.shutdown()
    mp.undo()


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 with the AWS environment variables pointing at it (fake credentials)."""
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(endpoint_url=f"http://{host}:{port}")
    mp = pytest.MonkeyPatch()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    env = {
        "AWS_ENDPOINT_URL": info.endpoint_url,
        "AWS_ACCESS_KEY_ID": info.access_key_id,
        "AWS_SECRET_ACCESS_KEY": info.secret_access_key,
        "AWS_REGION": info.region,
        "AWS_DEFAULT_REGION": info.region,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in env.items():
        mp.setenv(name, value)
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    yield info
    mp.undo()
    server.stop()


@pytest.fixture
def micro_training():  # type: ignore[no-untyped-def]
    """Fresh models of ``configs/train/micro.yaml`` (seed 0) and 16 rendered scenes: ``(cfg, models, data)``."""
    from pathlib import Path

    import torch

    from instdiff.training import TrainConfig, build_models, render_training_data

    cfg = TrainConfig.from_yaml(Path(__file__).parent.parent / "configs" / "train" / "micro.yaml")
    torch.manual_seed(0)
    return cfg, build_models(cfg), render_training_data(16, size=cfg.image_size, workers=1)
