"""The adapter file format: round trips, and every way a file can be wrong being refused clearly."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from adaclip.adapter_file import (
    MAX_HEADER_BYTES,
    AdapterMetadata,
    read_adapter_file,
    read_adapter_header,
    write_adapter_file,
)
from adaclip.errors import AdapterFileError, UsageError
from adaclip.identity import BackboneIdentity, PreprocessConfig


def metadata(**changes) -> AdapterMetadata:
    base = dict(
        created_at="2026-01-01T00:00:00Z",
        backbone=BackboneIdentity(name="tiny", pretrained="none", embed_dim=4, image_size=32),
        method="zeroshot",
        method_config={},
        class_names=["a", "b"],
        templates=["a photo of a {}."],
        preprocess=PreprocessConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        seed=0,
        trainable_params=0,
    )
    base.update(changes)
    return AdapterMetadata(**base)


TENSORS = {
    "head.weight": torch.arange(12, dtype=torch.float32).view(3, 4) / 7,
    "components.0.gate": torch.tensor([0.5], dtype=torch.bfloat16),
    "components.0.scale": torch.tensor(2.0),
}


def test_round_trip_is_bit_exact_and_standard_safetensors(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", TENSORS, metadata())
    meta, tensors = read_adapter_file(path)
    assert meta.class_names == ["a", "b"] and set(meta.tensors) == set(TENSORS)
    for name, tensor in TENSORS.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor)
    assert set(load_file(str(path))) == set(TENSORS)  # any safetensors reader can open it
    second = write_adapter_file(tmp_path / "b.adaclip", dict(reversed(TENSORS.items())), metadata())
    assert second.read_bytes() == path.read_bytes()  # same content -> same bytes, whatever the order


def test_zero_shot_file_without_tensors(tmp_path):
    path = write_adapter_file(tmp_path / "zs.adaclip", {}, metadata())
    meta, tensors = read_adapter_file(path)
    assert tensors == {} and meta.method == "zeroshot"


def test_missing_and_empty_and_folder(tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        read_adapter_header(tmp_path / "missing.adaclip")
    (tmp_path / "empty.adaclip").write_bytes(b"")
    with pytest.raises(AdapterFileError, match="truncated or empty"):
        read_adapter_header(tmp_path / "empty.adaclip")
    with pytest.raises(AdapterFileError, match="folder"):
        read_adapter_header(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", TENSORS, metadata())
    data = path.read_bytes()
    for cut in (len(data) - 3, 8 + 20):
        broken = tmp_path / f"cut{cut}.adaclip"
        broken.write_bytes(data[:cut])
        with pytest.raises(AdapterFileError, match="truncated"):
            read_adapter_file(broken)


def test_tampered_tensor_data_is_refused(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", TENSORS, metadata())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="digest"):
        read_adapter_file(path)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + n :])


def test_edited_metadata_is_refused(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", TENSORS, metadata())

    def rename_class(header):
        header["__metadata__"]["adaclip"] = header["__metadata__"]["adaclip"].replace('"a"', '"z"')

    _rewrite_header(path, rename_class)
    with pytest.raises(AdapterFileError, match="modified"):
        read_adapter_header(path)


def test_declared_shape_or_dtype_change_is_refused(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", TENSORS, metadata())

    def reshape(header):
        header["head.weight"]["shape"] = [4, 3]

    _rewrite_header(path, reshape)
    with pytest.raises(AdapterFileError, match="declared"):
        read_adapter_header(path)


def test_newer_format_version_is_refused_with_upgrade_hint(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", {}, metadata(format_version=99))
    with pytest.raises(AdapterFileError, match="newer.*upgrade adaclip"):
        read_adapter_header(path)


def test_huge_declared_header_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.adaclip"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    with pytest.raises(AdapterFileError, match="declares"):
        read_adapter_header(path)
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(AdapterFileError, match="declares"):
        read_adapter_header(path)


def test_plain_safetensors_and_garbage_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterFileError, match="not an adaclip adapter"):
        read_adapter_header(tmp_path / "plain.safetensors")
    (tmp_path / "junk.adaclip").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(AdapterFileError, match="unreadable header"):
        read_adapter_header(tmp_path / "junk.adaclip")


def test_nan_tensors_are_refused(tmp_path, monkeypatch):
    import adaclip.adapter_file as adapter_file

    with pytest.raises(adapter_file.AdaclipError, match="non-finite"):  # never written...
        write_adapter_file(tmp_path / "nan.adaclip", {"w": torch.tensor([1.0, float("nan")])}, metadata())
    monkeypatch.setattr(adapter_file, "check_finite", lambda *a, **k: None)
    path = write_adapter_file(tmp_path / "nan.adaclip", {"w": torch.tensor([1.0, float("nan")])}, metadata())
    monkeypatch.undo()
    with pytest.raises(AdapterFileError, match="NaN"):  # ...and refused when another writer made one
        read_adapter_file(path)


def test_pickle_payload_is_never_executed(tmp_path):
    """A .adaclip that is really a torch pickle must be refused as not-safetensors, not unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "evil.adaclip"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(AdapterFileError):
        read_adapter_file(path)


def test_write_refuses_overwrite_and_missing_folder(tmp_path):
    path = write_adapter_file(tmp_path / "a.adaclip", TENSORS, metadata())
    with pytest.raises(UsageError, match="already exists"):
        write_adapter_file(path, {}, metadata())
    with pytest.raises(UsageError, match="folder does not exist"):
        write_adapter_file(tmp_path / "nope" / "a.adaclip", {}, metadata())
    assert len(list(tmp_path.iterdir())) == 1
