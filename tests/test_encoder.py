import hashlib

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

from nh2st.devices import resolve_device
from nh2st.encoder import (IMAGENET_MEAN, IMAGENET_STD, FrozenEncoder, build_trunk, load_trunk_weights,
                           parse_random_seed)
from nh2st.errors import NH2STError
from checkpoint_fixtures import reference_resnet, write_checkpoint

torch.set_num_threads(2)


def _patches(n=3, size=224, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference_forward(net, patches):
    """The paper's path: ToTensor, Normalize(ImageNet), ResNet18 up to layer4, then avgpool."""
    x = torch.stack([TF.normalize(TF.to_tensor(p), IMAGENET_MEAN, IMAGENET_STD) for p in patches])
    with torch.no_grad():
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
    return x, net.avgpool(x).flatten(1)


def test_trunk_shape_and_frozen():
    trunk = build_trunk()
    assert not trunk.training
    assert not any(p.requires_grad for p in trunk.parameters())
    assert "fc.weight" not in trunk.state_dict() and "conv1.weight" in trunk.state_dict()
    with torch.no_grad():
        assert trunk(torch.zeros(2, 3, 224, 224)).shape == (2, 512, 7, 7)


def test_imagenet_normalisation_matches_torchvision():
    patches = _patches(2, size=32)
    encoder = FrozenEncoder("random", device="cpu")
    ours = encoder.preprocess(patches)
    theirs = torch.stack([TF.normalize(TF.to_tensor(p), IMAGENET_MEAN, IMAGENET_STD) for p in patches])
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", ["model.resnet.", "resnet.", "model.", "", "module.model.resnet."])
def test_loads_lightning_checkpoint_every_prefix(tmp_path, prefix):
    path = tmp_path / "tenpercent_resnet18.ckpt"
    net = write_checkpoint(path, seed=1, prefix=prefix)
    trunk = build_trunk()
    sha = load_trunk_weights(trunk, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    reference = net.state_dict()
    for key, value in trunk.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_encoder_output_equals_reference_network(tmp_path):
    path = tmp_path / "w.ckpt"
    net = write_checkpoint(path, seed=2)
    encoder = FrozenEncoder(path, device="cpu")
    assert (encoder.name, encoder.weights) == ("resnet18-trunk", str(path))
    assert encoder.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    patches = _patches(3)
    maps, pooled = encoder.encode(patches)
    assert maps.dtype == np.float16 and maps.shape == (3, 512, 7, 7)
    assert pooled.dtype == np.float32 and pooled.shape == (3, 512)
    ref_maps, ref_pooled = _reference_forward(net, patches)
    np.testing.assert_allclose(maps.astype(np.float32), ref_maps.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(pooled, ref_pooled.numpy(), rtol=1e-4, atol=1e-4)
    # a batch is encoded patch by patch: batching must not change a patch's features
    single_maps, _ = encoder.encode(patches[1:2])
    np.testing.assert_allclose(single_maps.astype(np.float32), maps[1:2].astype(np.float32), rtol=1e-2, atol=1e-3)


def test_checkpoint_with_namespace_hparams_loads(tmp_path):
    path = tmp_path / "old_lightning.ckpt"
    net = write_checkpoint(path, seed=3, hparams_namespace=True)
    trunk = build_trunk()
    load_trunk_weights(trunk, path)
    torch.testing.assert_close(trunk.state_dict()["layer4.1.conv2.weight"], net.state_dict()["layer4.1.conv2.weight"])


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    path = tmp_path / "w.ckpt"
    trunk_keys = [k for k in reference_resnet().state_dict() if k.endswith("num_batches_tracked")]
    write_checkpoint(path, drop=tuple(trunk_keys))
    load_trunk_weights(build_trunk(), path)


def test_missing_trunk_key_is_named(tmp_path):
    path = tmp_path / "w.ckpt"
    write_checkpoint(path, drop=("layer3.1.bn2.running_var", "conv1.weight"))
    with pytest.raises(NH2STError, match=r"missing 2 trunk keys.*conv1\.weight") as err:
        load_trunk_weights(build_trunk(), path)
    assert "layer3.1.bn2.running_var" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_unexpected_key_is_named(tmp_path):
    path = tmp_path / "w.ckpt"
    write_checkpoint(path, extra={"model.projector.weight": torch.zeros(3), "model.resnet.layer5.0.weight": torch.zeros(1)})
    with pytest.raises(NH2STError, match=r"unexpected 2 keys") as err:
        load_trunk_weights(build_trunk(), path)
    assert "projector.weight" in str(err.value) and "layer5.0.weight" in str(err.value)


def test_resnet50_like_checkpoint_is_refused(tmp_path):
    path = tmp_path / "w.ckpt"
    write_checkpoint(path, reshape={"layer1.0.conv1.weight": (64, 64, 1, 1)})
    with pytest.raises(NH2STError, match=r"wrong shape.*layer1\.0\.conv1\.weight \(64, 64, 1, 1\) != \(64, 64, 3, 3\)"):
        load_trunk_weights(build_trunk(), path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": {"conv1.weight": "not a tensor"}}, path)
    with pytest.raises(NH2STError, match="not a ResNet18 checkpoint"):
        load_trunk_weights(build_trunk(), path)


def test_missing_weights_file_says_where_to_get_it(tmp_path):
    path = tmp_path / "weights" / "tenpercent_resnet18.ckpt"
    with pytest.raises(NH2STError) as err:
        FrozenEncoder(path, device="cpu")
    message = str(err.value)
    assert str(path) in message and "Ciga" in message and "--weights random" in message
    assert "weights/tenpercent_resnet18.ckpt" in message and "--weights PATH" in message


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "w.ckpt"
    write_checkpoint(path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(NH2STError, match="corrupt or truncated"):
        load_trunk_weights(build_trunk(), path)


def test_random_weights_are_seeded_and_recorded():
    a, b, c = (FrozenEncoder(w, device="cpu") for w in ("random", "random:seed=0", "random:seed=5"))
    assert (a.weights, c.weights) == ("random:seed=0", "random:seed=5")
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    patches = _patches(2, size=64)
    np.testing.assert_array_equal(a.encode(patches)[1], b.encode(patches)[1])
    assert parse_random_seed("weights/x.ckpt") is None and parse_random_seed("random:7") == 7


def test_device_strings():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(NH2STError, match="--device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(NH2STError, match="no CUDA GPU"):
            resolve_device("cuda:0")
        assert resolve_device("auto").type == "cpu"


def test_encode_rejects_non_uint8():
    encoder = FrozenEncoder("random", device="cpu")
    with pytest.raises(NH2STError, match="uint8"):
        encoder.encode(np.zeros((1, 224, 224, 3), dtype=np.float32))


def test_submit_queues_a_batch_and_result_matches_encode():
    encoder = FrozenEncoder("random", device="cpu")
    assert not encoder.crops_on_device  # CPU: slides crop on the host
    batch = encoder.host_batch(4)
    assert tuple(batch.shape) == (4, 224, 224, 3) and batch.dtype == torch.uint8 and not batch.is_pinned()
    batch.numpy()[...] = _patches(4)  # crops are written through the numpy view
    pending = [encoder.submit(batch), encoder.submit(_patches(2, seed=1))]
    assert len(pending[0]) == 4
    maps, pooled = pending[0].result()
    ref_maps, ref_pooled = encoder.encode(_patches(4))
    assert maps.flags.c_contiguous and maps.dtype == np.float16 and pooled.dtype == np.float32
    np.testing.assert_array_equal(maps, ref_maps)
    np.testing.assert_array_equal(pooled, ref_pooled)
    assert pending[1].result()[0].shape == (2, 512, 7, 7)
    with pytest.raises(NH2STError, match="uint8"):
        encoder.submit(np.zeros((1, 224, 224, 3), dtype=np.float32))
