"""lumina/checkpoint.py: the .pth contract; lumina/device.py: the device rule."""
import os

import pytest
import torch

from lumina.checkpoint import (CheckpointError, FORMAT_VERSION, build_model, default_checkpoint, load_checkpoint,
                               save_checkpoint)
from lumina.device import pick_device
from lumina.vocab import render_chat
from conftest import tiny_checkpoint


def test_save_then_load_gives_identical_tensors_and_values(tmp_path):
    path = str(tmp_path / "Model.pth")
    net, vocab = tiny_checkpoint(path)
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["vocab"] == vocab.chars
    loaded, loaded_vocab = build_model(ckpt)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.config == net.config
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # runs at unpickling time if anything lets it


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", str(tmp_path / "evil.pth")
    torch.save({"format": "luminaai", "format_version": FORMAT_VERSION, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_corrupt_files_get_a_message(tmp_path):
    path = str(tmp_path / "Model.pth")
    tiny_checkpoint(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    open(path, "wb").write(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_foreign_and_newer_files_get_a_message(tmp_path):
    with pytest.raises(CheckpointError, match="python Train.py"):
        load_checkpoint(str(tmp_path / "Model.pth"))
    with pytest.raises(CheckpointError, match="python fine_tune.py"):
        load_checkpoint(str(tmp_path / "FineTuned_Model.pth"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a LuminaAI checkpoint"):
        load_checkpoint(str(tmp_path / "other.pth"))
    torch.save({"format": "luminaai", "format_version": 99}, tmp_path / "new.pth")
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(str(tmp_path / "new.pth"))


def test_older_format_and_misfit_weights_get_a_message(tmp_path):
    path = str(tmp_path / "Model.pth")
    tiny_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "format_version": 1}, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="older LuminaAI.*retrain"):
        load_checkpoint(str(tmp_path / "old.pth"))
    weights = dict(ckpt["model"])
    weights["blocks.0.mlp.up.weight"] = weights["blocks.0.mlp.up.weight"][:, :3]
    torch.save({**ckpt, "model": weights}, tmp_path / "misshapen.pth")
    with pytest.raises(CheckpointError, match="blocks.0.mlp.up.weight.*misshapen"):
        load_checkpoint(str(tmp_path / "misshapen.pth"))
    torch.save({**ckpt, "vocab": ckpt["vocab"][:-1]}, tmp_path / "short_vocab.pth")
    with pytest.raises(CheckpointError, match="vocabulary"):
        load_checkpoint(str(tmp_path / "short_vocab.pth"))
    torch.save({k: v for k, v in ckpt.items() if k != "model_config"}, tmp_path / "no_config.pth")
    with pytest.raises(CheckpointError, match="model config"):
        load_checkpoint(str(tmp_path / "no_config.pth"))


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "Model.pth")
    tiny_checkpoint(path, seed=0)
    before = open(path, "rb").read()

    def disk_full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(path, {"x": 1})
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["Model.pth"]


def test_an_unavailable_device_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="not available"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="device must be auto, cuda, cuda:N, mps or cpu"):
        pick_device("tpu")
    assert pick_device("auto").type in ("mps", "cpu")


def test_default_checkpoint_prefers_the_fine_tuned_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_checkpoint() == "Model.pth" and default_checkpoint("x.pth") == "x.pth"
    (tmp_path / "FineTuned_Model.pth").write_bytes(b"")
    assert default_checkpoint() == "FineTuned_Model.pth"


@pytest.mark.parametrize("release", ["d26845d", "be6ba01"])
def test_a_checkpoint_written_by_an_older_release_still_loads_and_gives_the_same_logits(release):
    """tests/data/RELEASE_Model.pth was written by that release's code, with its logits for one
    prompt: d26845d's is format 2; be6ba01's is format 3 with n-gram tables, from before QK-norm and
    the logit soft-cap existed (a file without them reads them as off)."""
    data = os.path.join(os.path.dirname(__file__), "data")
    net, vocab = build_model(load_checkpoint(os.path.join(data, f"{release}_Model.pth")))
    ids, _ = render_chat([{"role": "user", "content": "hello there"}], vocab, add_generation_prompt=True)
    with torch.no_grad():
        logits = net.eval()(torch.tensor([ids]))[0][0, -1]
    expected = torch.tensor([float(x) for x in open(os.path.join(data, f"{release}_logits.txt")).read().split()])
    assert torch.allclose(logits, expected, atol=1e-5)
