"""The moto S3 test server: objects round-trip through boto3 with path-style addressing."""

from __future__ import annotations

import urllib.request

import pytest

from tests.support.s3server import S3Server, s3_client
from watcher.config import S3Settings


class TestS3Server:
    def test_put_then_get_an_object_with_path_style_addressing(
        self, s3_server: S3Server, s3_settings: S3Settings
    ) -> None:
        client = s3_client(s3_server.endpoint_url)
        key = f"{s3_settings.prefix}/web/master-15eb13af.tar.gz"
        body = b"\x1f\x8b" + bytes(range(256)) * 64
        client.put_object(Bucket=s3_settings.bucket, Key=key, Body=body, Metadata={"sha256": "abc"})

        got = client.get_object(Bucket=s3_settings.bucket, Key=key)

        assert got["Body"].read() == body
        assert got["Metadata"] == {"sha256": "abc"}
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": s3_settings.bucket, "Key": key}
        )
        assert url.startswith(f"{s3_server.endpoint_url}/{s3_settings.bucket}/{key}?")

    def test_each_s3_settings_gets_its_own_empty_bucket(
        self, s3_server: S3Server, s3_settings: S3Settings
    ) -> None:
        client = s3_client(s3_server.endpoint_url)
        listed = client.list_objects_v2(Bucket=s3_settings.bucket)
        assert listed["KeyCount"] == 0
        assert s3_settings.endpoint_url == s3_server.endpoint_url
        assert s3_settings.prefix == "artifacts"

    def test_server_restart_keeps_its_endpoint_and_serves_again(self, s3_server: S3Server) -> None:
        endpoint = s3_server.endpoint_url
        s3_server.stop()
        try:
            with pytest.raises(OSError):
                urllib.request.urlopen(endpoint + "/", timeout=2)  # noqa: S310
        finally:
            s3_server.start()

        assert s3_server.endpoint_url == endpoint
        client = s3_client(endpoint)
        client.create_bucket(Bucket="after-restart")
        client.put_object(Bucket="after-restart", Key="k", Body=b"v")
        assert client.get_object(Bucket="after-restart", Key="k")["Body"].read() == b"v"
