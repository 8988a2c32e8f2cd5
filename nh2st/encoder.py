"""The frozen ResNet18 trunk of stage one and its checkpoint loading.

The paper encodes each 224x224 patch with a torchvision ResNet18 cut before avgpool/fc and
initialised from the self-supervised histology checkpoint of Ciga et al. 2022
("Self supervised contrastive learning for digital histopathology", ``tenpercent_resnet18.ckpt``,
the one NH²2ST and TRIPLEX use). Its 512x7x7 map feeds the heads' 25088->512 projection.

    trunk = build_trunk()                               # conv1 .. layer4, eval, no grads
    sha = load_trunk_weights(trunk, "weights/tenpercent_resnet18.ckpt")
    encoder = FrozenEncoder("weights/tenpercent_resnet18.ckpt", device="auto")
    maps, pooled = encoder.encode(patches)              # (B,224,224,3) uint8 -> (B,512,7,7) f16, (B,512) f32

    buffer = encoder.host_batch(256)                    # pinned on CUDA: fill it, then submit it
    pending = encoder.submit(buffer)                    # copies and compute queued; returns at once on CUDA
    maps, pooled = pending.result()                     # waits for this batch only
"""

import hashlib
import logging
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18

from nh2st.devices import resolve_device
from nh2st.errors import NH2STError
from nh2st.paper import PATCH_SIZE
from nh2st.stages import stage

log = logging.getLogger(__name__)

BACKBONE = "resnet18-trunk"  # torchvision ResNet18 without avgpool/fc
FEATURE_SHAPE = (512, 7, 7)
DEFAULT_WEIGHTS = Path("weights/tenpercent_resnet18.ckpt")
# The paper's transform: ToTensor() then Normalize with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Lightning wraps the torchvision model as `model.resnet`; DDP checkpoints add `module.`.
_WRAPPER_PREFIXES = ("module.", "model.", "resnet.")
_HEAD_PREFIX = "fc."       # the SimCLR projection head replaces resnet.fc; not part of the trunk
_RANDOM_RE = re.compile(r"^random(?::(?:seed=)?(\d+))?$")

WEIGHTS_HELP = ("download the self-supervised ResNet18 'tenpercent_resnet18.ckpt' from the authors of "
                "'Self supervised contrastive learning for digital histopathology' (Ciga et al. 2022, "
                "github.com/ozanciga/self-supervised-histopathology; the checkpoint the paper and TRIPLEX use) "
                f"and place it at {DEFAULT_WEIGHTS} or pass --weights PATH, or use --weights random")


def build_trunk() -> nn.Sequential:
    """torchvision ResNet18 without avgpool/fc, randomly initialised, eval mode, no grads.

    (B, 3, 224, 224) float -> (B, 512, 7, 7). Submodule names match torchvision's
    (`conv1`, `layer1.0.bn1`, ...) so a ResNet18 state dict loads key for key.
    """
    net = resnet18(weights=None)
    trunk = nn.Sequential(OrderedDict((name, module) for name, module in net.named_children()
                                      if name not in ("avgpool", "fc")))
    trunk.eval()
    trunk.requires_grad_(False)
    return trunk


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """Checksum of a module's tensors (names, shapes, dtypes and bytes, in state-dict order)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Lightning checkpoints may pickle hyper-parameter objects the safe loader refuses; this is
        # the user's own checkpoint file, loaded the way Lightning itself loads it.
        log.debug("%s: safe load refused, loading with weights_only=False", path)
    except Exception as exc:  # zip/pickle corruption shows up as many exception types
        raise NH2STError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
                         "the file is corrupt or truncated, download it again") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise NH2STError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
                         "the file is corrupt or truncated, download it again") from exc


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> str:
    """Load the histology checkpoint at `path` into `trunk`; returns the file's sha256.

    Accepts a Lightning-style dict with `state_dict` (or a bare state dict) whose keys carry
    `model.` / `resnet.` prefixes. Every trunk tensor must be present with the right shape
    (BatchNorm's `num_batches_tracked` counters may be absent: they do not affect eval); the
    projection head `fc.*` is ignored; any other key is unexpected. Raises NH2STError otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise NH2STError(f"weights not found at {path}: {WEIGHTS_HELP}")
    checkpoint = _read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NH2STError(f"{path}: not a ResNet18 checkpoint (expected a dict of tensors under 'state_dict'); "
                         f"{WEIGHTS_HELP}")
    tensors = {}
    for key, value in state.items():
        name = _strip_prefixes(key)
        if name.startswith(_HEAD_PREFIX):
            continue
        if name in tensors:
            raise NH2STError(f"{path}: keys {key!r} and another both map to trunk tensor {name!r}; "
                             "the checkpoint holds more than one network")
        tensors[name] = value
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} trunk keys ({_short(missing)})"] if missing else []) + \
                ([f"unexpected {len(unexpected)} keys ({_short(unexpected)})"] if unexpected else [])
        raise NH2STError(f"{path}: checkpoint does not match the ResNet18 trunk: {'; '.join(parts)}; "
                         "pass the self-supervised tenpercent_resnet18.ckpt or --weights random")
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if wrong:
        raise NH2STError(f"{path}: checkpoint tensors have the wrong shape for ResNet18: {_short(wrong, 4)}; "
                         "pass the ResNet18 (not ResNet50) tenpercent checkpoint or --weights random")
    trunk.load_state_dict(tensors, strict=False)  # strict would demand num_batches_tracked
    return file_sha256(path)


def parse_random_seed(weights: str | Path) -> int | None:
    """`random` -> 0, `random:seed=7` / `random:7` -> 7; a path -> None."""
    match = _RANDOM_RE.match(str(weights))
    if match is None:
        return None
    return int(match.group(1) or 0)


class FrozenEncoder:
    """Frozen ResNet18 trunk: uint8 patches -> 512x7x7 float16 maps and 512-d pooled vectors.

    weights: path of the histology checkpoint, or `random` / `random:seed=N` (seeded random
    init, recorded as name `random:seed=N` with the checksum of the initial tensors).
    On CUDA the trunk runs channels-last in bfloat16 (float16 where bf16 is unsupported) under
    inference mode; on CPU channels-last float32.
    """

    def __init__(self, weights: str | Path = DEFAULT_WEIGHTS, device: str = "auto"):
        self.device = resolve_device(device)
        seed = parse_random_seed(weights)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                trunk = build_trunk()
            self.weights = f"random:seed={seed}"
            self.weights_sha256 = state_sha256(trunk)
        else:
            trunk = build_trunk()
            self.weights_sha256 = load_trunk_weights(trunk, weights)
            self.weights = str(weights)
        self.name = BACKBONE
        self.feature_shape = FEATURE_SHAPE
        self.patch_size = PATCH_SIZE
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = torch.float32
        self.trunk = trunk.to(self.device, dtype=self.dtype, memory_format=torch.channels_last)
        # Normalize((x/255 - mean) / std) folded into one multiply-add on the raw uint8 values.
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        self._streams = None  # CUDA: host->device, compute, device->host (created on first use)
        # whether the extract loop should have slides build crops on this device (GPU JPEG decoding)
        self.crops_on_device = self.device.type == "cuda"

    @property
    def default_batch_size(self) -> int:
        return 256 if self.device.type == "cuda" else 64

    def host_batch(self, n: int) -> torch.Tensor:
        """An empty (n, 224, 224, 3) uint8 host batch to crop into; page-locked on CUDA so its copy
        to the device is asynchronous. Fill it through ``.numpy()`` and pass the tensor itself to
        :meth:`submit` (the allocator then keeps it from reuse until the copy is done)."""
        return torch.empty((n, self.patch_size, self.patch_size, 3), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")

    def _check(self, patches) -> torch.Tensor:
        batch = torch.as_tensor(patches)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise NH2STError(f"patches must be (B, H, W, 3) uint8, got {tuple(batch.shape)} {batch.dtype}")
        return batch

    def _normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on the device -> (B, 3, H, W) normalised, channels-last, encoder dtype."""
        x = batch.permute(0, 3, 1, 2).float().mul_(self._scale).add_(self._shift)
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def preprocess(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) normalised, channels-last, on the encoder's device."""
        batch = self._check(patches)
        if self.device.type == "cuda" and not batch.is_cuda and not batch.is_pinned():
            batch = batch.pin_memory()
        return self._normalise(batch.to(self.device, non_blocking=True))

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 224, 224, 3) uint8 on the device -> (B, 512, 7, 7) float32 maps on the device."""
        return self.trunk(self._normalise(batch)).float()

    def encode(self, patches: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 224, 224, 3) uint8 -> maps (B, 512, 7, 7) float16, pooled (B, 512) float32 (numpy)."""
        return self.submit(patches).result()

    def submit(self, patches: np.ndarray | torch.Tensor) -> "EncodedBatch":
        """Queue a batch (host array/tensor, or a tensor already on the device); `.result()` gives
        what :meth:`encode` returns.

        On CUDA three streams overlap: the host->device copy of this batch (from pinned memory),
        the trunk on the previous one, and the device->host copy (into pinned memory) of the one
        before; `submit` returns once the work is queued. On CPU it computes before returning.
        """
        batch = self._check(patches)
        if self.device.type != "cuda":
            with torch.inference_mode():
                with stage("encode"):
                    maps = self._forward(batch.to(self.device))
                    pooled = maps.mean(dim=(2, 3))
                    maps = maps.to(torch.float16).contiguous()
            return EncodedBatch(maps.numpy(), pooled.numpy())
        return self._submit_cuda(batch)

    def _submit_cuda(self, batch: torch.Tensor) -> "EncodedBatch":
        if self._streams is None:
            self._streams = tuple(torch.cuda.Stream(self.device) for _ in range(3))
        copy_in, compute, copy_out = self._streams
        with torch.inference_mode():
            with stage("host -> device"):
                if batch.is_cuda:  # cropped on the device, on the caller's current stream
                    compute.wait_stream(torch.cuda.current_stream(self.device))
                    x = batch
                else:
                    if not batch.is_pinned():
                        batch = batch.pin_memory()
                    with torch.cuda.stream(copy_in):
                        x = batch.to(self.device, non_blocking=True)
                    compute.wait_stream(copy_in)
                x.record_stream(compute)  # freed only after the trunk has read it
            with stage("encode (queue)"), torch.cuda.stream(compute):
                maps = self._forward(x)
                pooled = maps.mean(dim=(2, 3))
                maps = maps.to(torch.float16).contiguous()  # NCHW, as the store keeps it
            with stage("device -> host (queue)"):
                copy_out.wait_stream(compute)
                maps.record_stream(copy_out)
                pooled.record_stream(copy_out)
                with torch.cuda.stream(copy_out):
                    host_maps = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
                    host_pooled = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
                    host_maps.copy_(maps, non_blocking=True)
                    host_pooled.copy_(pooled, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy_out)
        return EncodedBatch(host_maps, host_pooled, done)


class EncodedBatch:
    """A submitted batch; `result()` -> (maps (B, 512, 7, 7) float16, pooled (B, 512) float32) numpy."""

    def __init__(self, maps, pooled, done=None):
        self._maps, self._pooled, self._done = maps, pooled, done

    def __len__(self) -> int:
        return len(self._maps)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self._done is not None:
            with stage("device -> host (wait)"):
                self._done.synchronize()
            self._done = None
        maps, pooled = self._maps, self._pooled
        # numpy views of the (pinned) host tensors keep them alive as long as they are used
        return (maps.numpy() if isinstance(maps, torch.Tensor) else maps,
                pooled.numpy() if isinstance(pooled, torch.Tensor) else pooled)
