"""The model registry: keygen, publish (checked, signed, immutable), list/show, on a directory and on real S3
(SeaweedFS), and what a camera downloads from it (file:// and a presigned URL)."""

from __future__ import annotations

import hashlib
import json
import stat
import urllib.request

import pytest

from contract.signature import SignatureError, load_public_key, verify_manifest
from models.registry import RegistryError, open_registry, publish, verify_entry
from models.signing import generate_keypair, load_private_key
from tests.ota_fixtures import classifier_model


def test_keygen_makes_a_private_key_only_its_owner_reads(tmp_path, model_cli):
    proc = model_cli("keygen", "--out", str(tmp_path / "keys"))
    assert proc.returncode == 0, proc.stderr
    private, public = tmp_path / "keys" / "signing.key", tmp_path / "keys" / "signing.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in public.read_bytes() and b"PRIVATE KEY" in private.read_bytes()
    again = model_cli("keygen", "--out", str(tmp_path / "keys"))  # never silently replaces a key
    assert again.returncode == 2 and "already exists" in again.stderr


def test_publish_list_show_on_a_directory(tmp_path, ota_model_a, ota_model_b, ota_keys, model_cli):
    reg = tmp_path / "reg"
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"labels": "l.json", "models": [
        {"model": ota_model_b.name, "path": str(ota_model_b), "ap50": 0.5, "ap50_95": 0.25, "imgsz": [256, 320]}]}))
    first = model_cli("publish", "--model", str(ota_model_a), "--registry", str(reg), "--signing-key", str(ota_keys[0]),
                "--name", "person")
    assert first.returncode == 0, first.stderr
    v1 = first.stdout.strip().splitlines()[-1]  # the version is the last line of standard output
    sha_a = hashlib.sha256(ota_model_a.read_bytes()).hexdigest()
    assert v1 == f"person-{sha_a[:12]}"
    second = model_cli("publish", "--model", str(ota_model_b), "--registry", str(reg), "--signing-key", str(ota_keys[0]),
                 "--name", "person", "--notes", "bigger input", "--conf", "0.3", "--eval", str(eval_json))
    assert second.returncode == 0, second.stderr
    v2 = second.stdout.strip().splitlines()[-1]

    registry = open_registry(reg)
    m2 = registry.entry(v2)["manifest"]
    assert m2["parent"] == v1 and m2["thresholds"]["conf"] == 0.3 and m2["notes"] == "bigger input"
    assert m2["imgsz"] == [256, 320] and m2["classes"] == ["person"] and m2["evaluation"]["ap50"] == 0.5
    assert m2["size"] == ota_model_b.stat().st_size and m2["input"]["shape"] == ["batch", 3, 256, 320]  # any batch (models.build)
    assert (reg / "models" / v2 / "model.onnx").read_bytes() == ota_model_b.read_bytes()
    verify_entry(registry.entry(v2), load_public_key(ota_keys[1]))  # signed with the publisher's key
    other = generate_keypair(tmp_path / "other")[1]
    with pytest.raises(SignatureError):
        verify_entry(registry.entry(v2), load_public_key(other))
    tampered = {**m2, "sha256": "0" * 64}
    with pytest.raises(SignatureError):
        verify_manifest(tampered, registry.entry(v2)["signature"], load_public_key(ota_keys[1]))

    listed = model_cli("registry", "list", "--registry", str(reg))
    assert listed.returncode == 0 and v1 in listed.stdout and v2 in listed.stdout and "bigger input" in listed.stdout
    shown = json.loads(model_cli("registry", "show", v2, "--registry", str(reg)).stdout)
    assert shown["manifest"]["version"] == v2 and shown["signature"]["alg"] == "ed25519"
    assert model_cli("registry", "show", "nope-123", "--registry", str(reg)).returncode == 2

    # immutable: the same file again stores nothing new and returns the same version, the manifest unchanged
    before = (reg / "models" / v2 / "manifest.json").read_bytes()
    again = publish(registry, ota_model_b, load_private_key(ota_keys[0]), name="person", notes="changed?")
    assert again["version"] == v2 and (reg / "models" / v2 / "manifest.json").read_bytes() == before
    # what a camera downloads for a directory registry: a file:// URL with the exact bytes
    with urllib.request.urlopen(registry.model_url(v1)) as resp:
        assert hashlib.sha256(resp.read()).hexdigest() == sha_a


def test_publish_refuses_what_the_edge_cannot_run(tmp_path, ota_keys, model_cli):
    reg = tmp_path / "reg"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    proc = model_cli("publish", "--model", str(junk), "--registry", str(reg), "--signing-key", str(ota_keys[0]))
    assert proc.returncode == 2 and "refused: cannot load model" in proc.stderr, proc.stderr
    layout = classifier_model(tmp_path / "classifier.onnx")
    proc = model_cli("publish", "--model", str(layout), "--registry", str(reg), "--signing-key", str(ota_keys[0]))
    assert proc.returncode == 2 and "unsupported model layout" in proc.stderr, proc.stderr
    assert open_registry(reg).versions() == []  # nothing broken entered the registry
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("nope")
    proc = model_cli("publish", "--model", str(layout), "--registry", str(reg), "--signing-key", str(bad_key))
    assert proc.returncode == 2 and "not an unencrypted PEM private key" in proc.stderr


@pytest.mark.slow
def test_registry_on_s3_with_a_presigned_download(seaweedfs, tmp_path, ota_model_a, ota_keys, model_cli):
    seaweedfs.client().create_bucket(Bucket="models")
    env = {"AWS_ACCESS_KEY_ID": seaweedfs.access_key, "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
           "SMARTCAM_S3_ENDPOINT": seaweedfs.endpoint}
    proc = model_cli("publish", "--model", str(ota_model_a), "--registry", "s3://models/fleet", "--signing-key",
               str(ota_keys[0]), "--name", "person", env=env)
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    listed = model_cli("registry", "list", "--registry", "s3://models/fleet", "--json", env=env)
    assert [m["version"] for m in json.loads(listed.stdout)] == [version]
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket="models")["Contents"]]
    assert sorted(keys) == [f"fleet/models/{version}/manifest.json", f"fleet/models/{version}/model.onnx"]

    # the environment (credentials, endpoint) is set for the rest of the test
    registry = open_registry("s3://models/fleet")
    url = registry.model_url(version, expires_s=600)
    # the camera has no credentials: the presigned URL alone fetches the exact bytes
    with urllib.request.urlopen(url) as resp:
        assert hashlib.sha256(resp.read()).hexdigest() == registry.entry(version)["manifest"]["sha256"]
    # immutable on S3 too: a second publish of the same file keeps the stored manifest
    etag = seaweedfs.client().head_object(Bucket="models", Key=f"fleet/models/{version}/manifest.json")["ETag"]
    publish(registry, ota_model_a, load_private_key(ota_keys[0]), name="person", notes="again")
    assert seaweedfs.client().head_object(Bucket="models",
                                          Key=f"fleet/models/{version}/manifest.json")["ETag"] == etag
    with pytest.raises(RegistryError, match="no-such-bucket.*(NoSuchBucket|404)"):
        open_registry("s3://no-such-bucket/x")
