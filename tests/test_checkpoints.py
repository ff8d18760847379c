"""Readers: every format reproduces its source model; bad input gets one clear error."""
import json

import pytest
import torch
from safetensors.torch import save_file

from factories import CFG_TINY, diffusers_dit, facebook_state_dict, facebook_train_checkpoint, inputs, rel_err
from ledit_convert.conversion.checkpoints import build_model, read_checkpoint
from ledit_convert.errors import CheckpointError
from reference import reference_forward


def test_facebook_state_dict_reproduces_float64_reference(tmp_path):
    sd = facebook_state_dict(seed=3)
    torch.save(sd, tmp_path / "dit.pt")
    ckpt = read_checkpoint(str(tmp_path / "dit.pt"), num_heads=4)
    assert ckpt.format == "facebook-state-dict"
    assert ckpt.config["sample_size"] == 8 and ckpt.config["out_channels"] == 8 and ckpt.config["num_classes"] == 10
    assert "standard 2D sin/cos" in " ".join(ckpt.notes)
    model = build_model(ckpt)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y).sample
    ref = reference_forward(sd, CFG_TINY, x, t, y, pos_table=sd["pos_embed"][0].double().numpy())
    assert rel_err(ours, ref) <= 1e-5


def test_tensors_are_copied_bit_exactly(tmp_path):
    sd = facebook_state_dict(seed=4)
    torch.save(sd, tmp_path / "dit.pt")
    ckpt = read_checkpoint(str(tmp_path / "dit.pt"), num_heads=4)
    assert set(ckpt.state_dict) == set(sd) - {"pos_embed"}
    assert all(torch.equal(ckpt.state_dict[k], sd[k]) for k in ckpt.state_dict)


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_train_checkpoint_picks_requested_weights(tmp_path, weights):
    ckpt_obj = facebook_train_checkpoint(seed=5)
    torch.save(ckpt_obj, tmp_path / "0100000.pt")
    ckpt = read_checkpoint(str(tmp_path / "0100000.pt"), weights=weights, num_heads=4)
    assert ckpt.format == "facebook-train-checkpoint"
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(ckpt.state_dict[key], ckpt_obj[weights][key])


def test_safetensors_with_facebook_keys(tmp_path):
    sd = facebook_state_dict(seed=6)
    save_file(sd, str(tmp_path / "dit.safetensors"))
    ckpt = read_checkpoint(str(tmp_path / "dit.safetensors"), num_heads=4)
    assert ckpt.format == "facebook-safetensors"
    assert torch.equal(ckpt.state_dict["final_layer.linear.weight"], sd["final_layer.linear.weight"])


def test_missing_pos_embed_needs_image_size(tmp_path):
    sd = facebook_state_dict(seed=6)
    del sd["pos_embed"]
    save_file(sd, str(tmp_path / "dit.safetensors"))
    with pytest.raises(CheckpointError, match="--image-size"):
        read_checkpoint(str(tmp_path / "dit.safetensors"), num_heads=4)
    ckpt = read_checkpoint(str(tmp_path / "dit.safetensors"), num_heads=4, image_size=64)
    assert ckpt.config["sample_size"] == 8


def test_standard_widths_infer_heads(tmp_path):
    sd = facebook_state_dict(seed=0, hidden=384, depth=1, grid=2)
    torch.save(sd, tmp_path / "s.pt")
    assert read_checkpoint(str(tmp_path / "s.pt")).config["num_attention_heads"] == 6


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_diffusers_folder_reproduces_diffusers_forward(tmp_path, layout):
    peer = diffusers_dit(seed=7)
    folder = tmp_path / "dit"
    if layout == "pipeline":
        peer.save_pretrained(folder / "transformer")
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    else:
        peer.save_pretrained(folder)
    ckpt = read_checkpoint(str(folder))
    assert ckpt.format == "diffusers"
    assert ckpt.config["timestep_freq_shift"] == 1 and ckpt.config["mlp_norm_eps"] == 1e-5
    model = build_model(ckpt)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y).sample
        theirs = peer(x, timestep=t, class_labels=y).sample
    assert rel_err(ours, theirs) <= 1e-5


def test_diffusers_per_block_embedders_that_differ_are_reported(tmp_path):
    peer = diffusers_dit(seed=8)
    with torch.no_grad():
        peer.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight.add_(0.5)
    peer.save_pretrained(tmp_path / "dit")
    with pytest.raises(CheckpointError, match="block 2's copy of the embedder"):
        read_checkpoint(str(tmp_path / "dit"))


class _Payload:
    """Unpickling this would create a file."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _bad_files(tmp_path):
    good = facebook_state_dict(seed=9)
    torch.save(good, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.pt").write_text("this is not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"conv1.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "resnet.pt")
    missing = dict(good)
    del missing["blocks.1.mlp.fc2.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    extra = dict(good, **{"blocks.0.attn.lora.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")
    shapes = dict(good, **{"blocks.2.mlp.fc1.weight": torch.zeros(100, 64)})
    torch.save(shapes, tmp_path / "shapes.pt")
    torch.save({"weights": _Payload(str(tmp_path / "PWNED"))}, tmp_path / "evil.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return {
        "truncated.pt": "truncated or corrupt", "text.pt": "not a readable PyTorch checkpoint",
        "empty.pt": "empty file", "resnet.pt": "not a DiT state dict", "missing.pt": "missing",
        "extra.pt": "unexpected tensor", "shapes.pt": "has shape", "evil.pt": "refused to unpickle",
        "broken.safetensors": "not a readable safetensors file",
    }


def test_bad_inputs_get_one_clear_error(tmp_path):
    for name, expected in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(str(tmp_path / name), num_heads=4)
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name)), msg
        assert expected in msg, (name, msg)
        assert "\n" not in msg
    assert not (tmp_path / "PWNED").exists()


def test_nonexistent_and_non_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        read_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a model folder"):
        read_checkpoint(str(tmp_path / "empty_dir"))
