"""Fast inference paths for the TinyViT image encoder, and the choice of one for this machine.

`make_encoder(loaded, mode="auto")` returns a callable ``(B, 3, S, S) float32 -> (B, 256, 64, 64)``
(an `EncoderPath`), or None for the model's own fp32 eager encoder (models other than TinyViT).

The fast encoder is an inference-only re-implementation of `tiny_vit.TinyViT`'s forward over the
*same* weights (read from the loaded model, nothing duplicated on disk):

- every conv + BatchNorm pair is folded into one conv with a bias (exact up to rounding);
- activations stay channels-last ("NHWC") from the first conv to the neck, so the 1x1 convs are
  plain matmuls (`F.linear`), the depthwise convs run in oneDNN's channels-last kernels and the
  token <-> image changes between the attention blocks and their local convs cost no copy;
- the window attention's bias table is gathered once, not at every call;
- optionally bf16 weights and activations (``"bf16"``), where the CPU has native bf16 dot products
  (AVX512-BF16 or AMX) or on CUDA; matmuls accumulate in fp32 inside oneDNN / cuBLAS, the output
  is returned as float32.

Modes: ``"fp32"`` (the model's own encoder, the reference), ``"fp32-fast"`` (the rewrite in fp32),
``"bf16"`` (the rewrite in bf16), ``"openvino-f32"`` / ``"openvino-bf16"`` (OpenVINO CPU plugin,
when the optional ``openvino`` package is installed), ``"auto"``: the fastest path that keeps fp32
numerics (openvino-f32, else fp32-fast). bf16 paths are opt-in: 3.6-3.8x faster than fp32 eager
on an AVX512-BF16 CPU and 4.9x with AMX, but they moved one-box propagation Dice by up to 0.038
on the shared cases (4-5 of 10 objects past 0.005; docs/PERFORMANCE.md). The environment variable ``MEDSAM_ENCODER`` (same values) overrides the argument, so a user can force
``MEDSAM_ENCODER=fp32`` without touching code. The choice and its reason are logged at INFO level.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ENV_VAR = "MEDSAM_ENCODER"
PATHS = ("fp32", "fp32-fast", "bf16", "openvino-f32", "openvino-bf16")
MODES = ("auto", *PATHS)
# Bumped whenever a path's numerics change, so disk caches never serve embeddings of an older version.
PATH_VERSION = 3


# ---------------------------------------------------------------------------------------- machine
def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_support() -> tuple[bool, str]:
    """(True, why) when this CPU computes bf16 matmuls natively (AMX or AVX512-BF16), else (False, why).

    Without native bf16, oneDNN emulates it and bf16 is *slower* than fp32, so the fallback matters.
    """
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    flags = cpu_flags()
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = False
    if native and mkldnn_bf16:
        return True, f"CPU has {'+'.join(native)} (torch capability {capability}), oneDNN bf16 available"
    if not native:
        return False, f"CPU lacks amx_bf16/avx512_bf16 (torch capability {capability})"
    return False, f"CPU has {'+'.join(native)} but this torch's oneDNN has no bf16 support"


# ---------------------------------------------------------------------------------------- the rewrite
def _fold(convbn) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a `tiny_vit.ConvBN` with its BatchNorm folded in (eval statistics)."""
    conv, bn = convbn.c, convbn.bn
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    weight = conv.weight.detach() * scale[:, None, None, None]
    bias = bn.bias.detach() - bn.running_mean * scale
    return weight, bias


class _PW(nn.Module):
    """Folded 1x1 conv + BN as a matmul on (..., C_in) channels-last activations."""

    def __init__(self, convbn):
        super().__init__()
        w, b = _fold(convbn)
        self.weight = nn.Parameter(w[:, :, 0, 0].contiguous(), requires_grad=False)  # (C_out, C_in)
        self.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, x):  # (B, H, W, C_in) -> (B, H, W, C_out)
        return F.linear(x, self.weight, self.bias)


class _DW(nn.Module):
    """Folded depthwise 3x3 conv + BN on (B, H, W, C) activations (NCHW view, channels-last memory)."""

    def __init__(self, convbn):
        super().__init__()
        w, b = _fold(convbn)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)
        c = convbn.c
        self.stride, self.padding, self.groups = c.stride, c.padding, c.groups

    def forward(self, x):  # (B, H, W, C) -> (B, H', W', C)
        y = F.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return y.permute(0, 2, 3, 1)  # a view when oneDNN returned channels-last, a copy otherwise


class _MBConv(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = _PW(block.conv1), _DW(block.conv2), _PW(block.conv3)

    def forward(self, x):  # (B, H, W, C)
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class _Merge(nn.Module):
    def __init__(self, merge):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = _PW(merge.conv1), _DW(merge.conv2), _PW(merge.conv3)

    def forward(self, x):  # (B, H, W, C) -> (B, H', W', C_out)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class _Block(nn.Module):
    """TinyViT block on (B, H, W, C): windowed attention + residual, local conv, MLP + residual."""

    def __init__(self, block):
        super().__init__()
        attn = block.attn
        self.ws = block.window_size
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        self.norm1, self.qkv, self.proj = attn.norm, attn.qkv, attn.proj
        bias = attn.attention_biases.detach()[:, attn.attention_bias_idxs]  # (heads, N, N), gathered once
        self.register_buffer("attn_bias", bias[None].contiguous(), persistent=False)  # (1, heads, N, N)
        self.local_conv = _DW(block.local_conv)
        self.norm2, self.fc1, self.fc2 = block.mlp.norm, block.mlp.fc1, block.mlp.fc2

    def _attention(self, w):  # (nW, N, C) -> (nW, N, C)
        n_w, n, c = w.shape
        qkv = self.qkv(self.norm1(w)).view(n_w, n, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # (nW, heads, N, d) each, head-major [q|k|v]
        # A 4-D bias (1, heads, N, N) lets SDPA take its fused CPU kernel (flash attention); the
        # model's 3-D bias sends it down the unfused "math" path.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(n_w, n, c))

    def forward(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.ws
        if h == ws and w == ws:
            x = x + self._attention(x.reshape(b, h * w, c)).view(b, h, w, c)
        else:
            # Zero-pad before the attention's layer norm, as the published model does.
            pad_b, pad_r = (-h) % ws, (-w) % ws
            xp = F.pad(x, (0, 0, 0, pad_r, 0, pad_b)) if (pad_b or pad_r) else x
            ph, pw = h + pad_b, w + pad_r
            nh, nw = ph // ws, pw // ws
            windows = xp.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
            windows = self._attention(windows)
            y = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
            x = x + y[:, :h, :w]
        x = self.local_conv(x.contiguous())
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FastTinyViT(nn.Module):
    """Inference-only TinyViT: (B, 3, S, S) -> (B, 256, S/4, S/4), same weights, same maths.

    Built from a loaded `tiny_vit.TinyViT` (eval mode); the BatchNorms are folded, so changing the
    source model afterwards does not change this one: build it again.
    """

    def __init__(self, encoder):
        super().__init__()
        encoder = copy.deepcopy(encoder)  # its norms and linears are reused; never alias the source
        self.img_size = encoder.img_size
        seq = encoder.patch_embed.seq
        self.embed1, self.embed2 = _PW(seq[0]), _PW(seq[2])
        stages = []
        for i, stage in enumerate(encoder.layers):
            if i == 0:
                blocks = [_MBConv(b) for b in stage.blocks]
            else:
                blocks = [_Block(b) for b in stage.blocks]
            if stage.downsample is not None:
                blocks.append(_Merge(stage.downsample))
            stages.extend(blocks)
        self.stages = nn.Sequential(*stages)
        neck = encoder.neck
        self.neck_conv1 = neck[0].weight.detach()[:, :, 0, 0].contiguous()  # (256, C_last)
        self.neck_norm1 = neck[1]
        self.neck_conv2 = neck[2].weight.detach()
        self.neck_norm2 = neck[3]
        self.neck_conv1 = nn.Parameter(self.neck_conv1, requires_grad=False)
        self.neck_conv2 = nn.Parameter(self.neck_conv2, requires_grad=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _ln_channels_last(x, norm):  # LayerNorm2d over C of (B, H, W, C)
        return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)

    def forward(self, x):  # (B, 3, S, S) -> (B, 256, S/4, S/4), channels-last memory
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"TinyViT expects a {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        x = x.permute(0, 2, 3, 1)  # (B, S, S, 3); the first matmul makes it contiguous
        x = self.embed2(F.gelu(self.embed1(x)))
        x = self.stages(x)  # (B, 64, 64, C_last)
        x = self._ln_channels_last(F.linear(x, self.neck_conv1), self.neck_norm1)
        x = F.conv2d(x.permute(0, 3, 1, 2), self.neck_conv2, None, 1, 1)  # 3x3 dense conv
        x = self._ln_channels_last(x.permute(0, 2, 3, 1), self.neck_norm2)
        return x.permute(0, 3, 1, 2)  # (B, 256, 64, 64) as a view


# ---------------------------------------------------------------------------------------- the paths
@dataclass
class EncoderPath:
    """A callable encoder: (B, 3, S, S) float32 on the model's device -> (B, 256, 64, 64) float32.

    name: one of PATHS; key: what identifies its numerics in cache keys; reason: why it was chosen
    (logged); preferred_batch: the batch size `SlicePredictor.precompute` uses by default.
    """

    name: str
    module: nn.Module
    dtype: torch.dtype
    device: torch.device
    reason: str = ""
    preferred_batch: int = 1

    @property
    def key(self) -> str:
        return f"encoder={self.name}/v{PATH_VERSION}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.module(x.to(self.device, self.dtype))
            return out.float().contiguous()


class _EncoderBody(nn.Module):
    """TinyViT after its patch embedding, written for OpenVINO: (B, S, S, D0) -> (B, 256, S/4, S/4).

    The same modules and maths as `tiny_vit.TinyViT`, exported in a form OpenVINO's CPU plugin runs
    with fewer copies (measured: 441 -> 400 ms a slice on the Intel machine, 9% faster):
    - token <-> image changes are 4-D permutes (NHWC <-> NCHW), which the plugin turns into layout
      choices, instead of 3-D transposes it runs as generic copies (9 ms each at 128x128);
    - q, k and v come from three linears over the rows of the fused qkv weight, instead of one
      linear and a split along a permuted axis (a reference-kernel split: 14 ms a slice);
    - the input arrives channels-last, as the patch embedding produces it.
    """

    def __init__(self, encoder):
        super().__init__()
        self.layers, self.neck = encoder.layers, encoder.neck
        self.out_resolution = encoder.out_resolution

    @staticmethod
    def _attention(attn, x):  # WindowAttention on (nW, N, C)
        b, n, c = x.shape
        heads, d = attn.num_heads, attn.head_dim
        x = attn.norm(x)
        # The published qkv weight is laid out per head as [q | k | v].
        weight = attn.qkv.weight.view(heads, 3, d, c)
        bias = attn.qkv.bias.view(heads, 3, d)
        q, k, v = (F.linear(x, weight[:, i].reshape(heads * d, c), bias[:, i].reshape(heads * d))
                   .view(b, n, heads, d).transpose(1, 2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn.attention_biases[:, attn.attention_bias_idxs])
        return attn.proj(out.transpose(1, 2).reshape(b, n, c))

    def _block(self, block, x):  # TinyViTBlock on tokens (B, H*W, C)
        h, w = block.resolution
        b, n, c = x.shape
        x = x + block._windowed_attention(x, lambda windows: self._attention(block.attn, windows))
        x = block.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).reshape(b, n, c)
        return x + block.mlp(x)

    @staticmethod
    def _merge(merge, x):  # PatchMerging: image (B, C, H, W) or tokens (B, H*W, C) -> tokens
        if x.ndim == 3:
            h, w = merge.in_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = merge.act(merge.conv1(x))
        x = merge.act(merge.conv2(x))
        x = merge.conv3(x)
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)  # channels-last tokens -> the stage-0 convs' NCHW
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = block(x) if i == 0 else self._block(block, x)
            if stage.downsample is not None:
                x = self._merge(stage.downsample, x)
        h, w = self.out_resolution
        b, _, c = x.shape
        return self.neck(x.view(b, h, w, c).permute(0, 3, 1, 2))


class _Embed(nn.Module):
    """The patch embedding, BN folded, fp32: (B, 3, S, S) -> (B, S, S, D0) contiguous, channels-last."""

    def __init__(self, encoder):
        super().__init__()
        seq = encoder.patch_embed.seq
        self.embed1, self.embed2 = _PW(seq[0]), _PW(seq[2])

    def forward(self, x):
        return self.embed2(F.gelu(self.embed1(x.permute(0, 2, 3, 1)))).contiguous()


class OpenVINOPath:
    """The encoder run by OpenVINO's CPU plugin (f32 or bf16 inference precision).

    The patch embedding (two 1x1 conv+BN on the raw image, 0.3 GFLOP) stays in PyTorch fp32: with
    its BatchNorms folded, its weights and outputs are large and cancel, and rounding them to bf16
    alone caused about half of the bf16 path's embedding error. OpenVINO runs the rest. That part
    is converted from PyTorch once per weights and OpenVINO version and kept as IR in `cache_dir`
    (conversion exports the model with `torch.export`: 10-70 s on an idle 2-core machine, announced through
    `on_progress`; loading the IR takes about a second).
    """

    def __init__(self, loaded, precision: str, reason: str = "", cache_dir=None, on_progress=None):
        import threading
        import time

        ov = import_openvino()

        self.name = f"openvino-{precision}"
        self.reason = reason
        self.device = torch.device("cpu")
        # Measured on an idle 2-core machine (benchmarks/run_all.py section 4), batch 8 cost 0.87x to
        # 1.10x the time per slice of batch 1 (0.71x only under heavy load): no reliable gain on a
        # small CPU, and batch 1 gives the first embedding soonest.
        self.preferred_batch = 1
        self.precision = precision
        encoder = copy.deepcopy(loaded.sam.image_encoder).float().eval()
        size = int(loaded.spec.image_size)
        self.embed = _Embed(encoder).eval()
        body = _EncoderBody(encoder).eval()
        xml = openvino_ir_path(encoder, size, cache_dir)
        core = ov.Core()
        self.conversion_s = None
        if xml.is_file() and _ir_intact(xml):
            model = core.read_model(str(xml))
            self.converted = False
        else:
            estimate = conversion_estimate_s(cache_dir)
            _report(on_progress, f"Preparing the fast encoder (one time, about {estimate:.0f} s)...", estimate)
            started = time.perf_counter()
            model = _convert(ov, body, size, encoder.patch_embed.seq[2].c.out_channels)
            self.conversion_s = time.perf_counter() - started
            try:
                _save_ir(ov, model, xml)
                _record_conversion(xml.parent, self.conversion_s)
                kept = f"kept in {xml.parent} for later runs"
            except OSError as err:  # a read-only cache only costs the next start its conversion
                log.warning("could not keep the converted OpenVINO model in %s: %s", xml.parent, err)
                kept = "not kept: the cache folder is not writable, so the next run converts again"
            _report(on_progress, f"The fast encoder is ready ({self.conversion_s:.0f} s; {kept}).", None)
            self.converted = True
        self.compiled = core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls from several threads take turns

    @property
    def key(self) -> str:
        return f"encoder={self.name}/v{PATH_VERSION}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self.embed(x.detach().to("cpu", torch.float32))
        with self._lock:
            out = self._request.infer({0: tokens.numpy()})[0]
            return torch.from_numpy(out.copy())


# Seconds a first conversion is announced with when this machine has never converted one (an idle
# 2-core machine: 10-70 s; issue 21 saw 163 s under load). Afterwards the last measured time is used.
DEFAULT_CONVERSION_S = 60.0
_CONVERSIONS_FILE = "conversions.json"


def _report(on_progress, message: str, estimate_s: float | None) -> None:
    """Tell the caller about a slow one-time step (`on_progress(message, estimate_s)`), else log it."""
    if on_progress is not None:
        on_progress(message, estimate_s)
    else:
        log.info("%s", message)


def _convert(ov, body: nn.Module, size: int, channels: int):
    """The encoder body as an OpenVINO model, from `torch.export` (not TorchScript tracing, which
    torch deprecates): input (batch, S, S, D0) channels-last tokens, any batch."""
    import warnings

    example = torch.zeros(2, size, size, channels)  # batch 2: an example batch of 1 would be specialised
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pytree code builds a LeafSpec, which it deprecates, while the program is copied:
        # nothing this project calls, and nothing it could change.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        exported = torch.export.export(body, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        return ov.convert_model(exported)


def _record_conversion(folder, seconds: float) -> None:
    """Keep how long this machine took to convert, so that the next first conversion (new weights or
    a new OpenVINO) is announced with this machine's own time."""
    from ..io.atomic import atomic_write_json

    try:
        atomic_write_json(Path(folder) / _CONVERSIONS_FILE, {"last_seconds": round(float(seconds), 1)})
    except OSError:
        pass


def conversion_estimate_s(cache_dir=None) -> float:
    """Seconds the OpenVINO conversion is expected to take here: the last one measured on this machine
    (kept in the cache), else DEFAULT_CONVERSION_S."""
    import json

    from ..io.cache import OPENVINO, cache_root

    folder = (Path(cache_dir) if cache_dir else cache_root()) / OPENVINO
    try:
        seconds = float(json.loads((folder / _CONVERSIONS_FILE).read_text())["last_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_CONVERSION_S
    return seconds if 0 < seconds < 3600 else DEFAULT_CONVERSION_S


def pending_conversion_s(loaded, mode: str = "auto", cache_dir=None) -> float | None:
    """When `make_encoder(loaded, mode, cache_dir)` would convert the encoder for OpenVINO first (a
    one-time step of tens of seconds): the expected seconds (`conversion_estimate_s`); else None.
    Lets a caller say so before it starts (`SegmentationSession.prepare`)."""
    name, _ = choose_mode(loaded, mode)
    if not name.startswith("openvino") or not _is_tiny_vit(loaded):
        return None
    xml = openvino_ir_path(loaded.sam.image_encoder, int(loaded.spec.image_size), cache_dir)
    if xml.is_file() and _ir_sums_path(xml).is_file():
        return None
    return conversion_estimate_s(cache_dir)


def _ir_sums_path(xml):
    return xml.with_name(xml.stem + ".sha256.json")


def _save_ir(ov, model, xml) -> None:
    """Keep a converted model as IR at `xml` (+ .bin) with the checksums of both files, as one
    set (`io.atomic.atomic_write_set`): the three files are replaced together or not at all."""
    import json
    import tempfile
    from pathlib import Path

    from ..io.atomic import atomic_write_set, json_safe

    xml = Path(xml)
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{xml.stem}.", dir=xml.parent) as scratch:
        saved = Path(scratch) / xml.name
        ov.save_model(model, str(saved), compress_to_fp16=False)
        sums = _ir_checksums(saved)  # of what was written, recorded before the files go in place
        sums_text = json.dumps(json_safe(sums), indent=2, allow_nan=False) + "\n"
        atomic_write_set([
            (xml.with_suffix(".bin"), lambda tmp: os.replace(saved.with_suffix(".bin"), tmp), ".tmp.bin"),
            (xml, lambda tmp: os.replace(saved, tmp), ".tmp.xml"),
            (_ir_sums_path(xml), lambda tmp: tmp.write_text(sums_text), ".tmp"),
        ], clean_stale=False)


def _ir_checksums(xml) -> dict:
    import hashlib

    sums = {}
    for part in (xml, xml.with_suffix(".bin")):
        digest = hashlib.sha256()
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        sums[part.suffix.lstrip(".")] = digest.hexdigest()
    return sums


def _ir_intact(xml) -> bool:
    """True when the cached IR's .xml and .bin match the checksums recorded when they were written.
    A damaged, missing or planted file is removed (with a warning) so that the model is converted again."""
    import json

    sums_path = _ir_sums_path(xml)
    try:
        ok = json.loads(sums_path.read_text()) == _ir_checksums(xml)
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("the cached OpenVINO model %s is damaged or has no recorded checksum; converting it again", xml)
        for part in (xml, xml.with_suffix(".bin"), sums_path):
            try:
                part.unlink()
            except OSError:
                pass
    return ok


def disable_openvino_telemetry() -> None:
    """Make sure OpenVINO reports nothing from this process, whatever was imported first.

    Before `openvino` is imported: hide the `openvino_telemetry` package, so OpenVINO falls back to
    its own no-op stub (nothing is sent, no client-id file is written). When someone imported
    `openvino` earlier, its telemetry object already exists: it is switched off (consent False) and
    the converter's modules are pointed at the stub, so no later call (`convert_model`) sends anything.
    """
    from .._telemetry import hide_openvino_telemetry

    if hide_openvino_telemetry():
        return
    telemetry = sys.modules.get("openvino_telemetry")
    if telemetry is None:
        return
    try:
        instance = telemetry.Telemetry._SingletonMetaClass__single_instance
    except AttributeError:
        instance = None
    if instance is not None:
        instance.consent = False
    try:
        import openvino.tools.ovc.telemetry_stub as stub
    except ImportError:
        return
    for name in ("openvino.tools.ovc.telemetry_utils", "openvino.tools.ovc.convert_impl",
                 "openvino.tools.ovc.utils", "openvino.tools.ovc.main"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "tm", None) is telemetry:
            module.tm = stub


def import_openvino():
    """Import OpenVINO with its usage telemetry switched off (`disable_openvino_telemetry`).

    Importing `openvino` (and `ov.convert_model`) reports usage to Intel unless the user opted out;
    this tool never sends anything anywhere.
    """
    disable_openvino_telemetry()
    import openvino

    disable_openvino_telemetry()  # in case the import itself brought the telemetry package in
    return openvino


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_ir_path(encoder: nn.Module, image_size: int, cache_dir=None):
    """Where the converted IR of these encoder weights lives (keyed by weights and OpenVINO version)."""
    import hashlib
    from pathlib import Path

    ov = import_openvino()

    digest = hashlib.sha1(f"body-v4:{ov.__version__}:{torch.__version__}:{image_size}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    from ..io.cache import OPENVINO, cache_root

    root = Path(cache_dir) if cache_dir else cache_root()
    return root / OPENVINO / f"tiny_vit_{digest.hexdigest()[:16]}.xml"


def _is_tiny_vit(loaded) -> bool:
    from .tiny_vit import TinyViT

    return isinstance(getattr(loaded.sam, "image_encoder", None), TinyViT)


def build_path(loaded, name: str, reason: str = "", cache_dir=None, on_progress=None):
    """The encoder path `name` (one of PATHS) for a loaded model, without hardware checks.
    on_progress(message, estimate_s): told about a slow one-time step (the OpenVINO conversion)."""
    if name not in PATHS:
        raise ValueError(f"Unknown encoder path {name!r}; use one of {', '.join(PATHS)}.")
    device = torch.device(loaded.device)
    preferred_batch = 8 if device.type == "cuda" else 1
    if name == "fp32":
        return EncoderPath("fp32", loaded.sam.image_encoder, torch.float32, device, reason, preferred_batch)
    if not _is_tiny_vit(loaded):
        raise ValueError(f"The {name!r} encoder path exists for TinyViT models only, not {loaded.spec.family}.")
    if name.startswith("openvino"):
        if device.type != "cpu":
            raise ValueError(f"The {name!r} encoder path runs on the CPU only, not on {device}.")
        return OpenVINOPath(loaded, name.split("-", 1)[1], reason, cache_dir, on_progress)
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    module = FastTinyViT(loaded.sam.image_encoder).to(device=device, dtype=dtype)
    return EncoderPath(name, module, dtype, device, reason, preferred_batch)


def choose_mode(loaded, mode: str = "auto") -> tuple[str, str]:
    """(path name, reason) for `mode` on this machine; the MEDSAM_ENCODER variable overrides `mode`.

    auto: the fastest path with fp32 numerics: openvino-f32 on a CPU with OpenVINO installed,
    else fp32-fast (CPU and CUDA). bf16 paths only when asked for (they failed the 0.005 Dice
    budget on the shared cases); asking for one where bf16 is not native falls back with a log.
    Models other than TinyViT keep their own fp32 encoder.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    forced = ""
    if env:
        if env not in MODES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a known encoder mode; use one of {', '.join(MODES)}.")
        mode, forced = env, f"forced by {ENV_VAR}={env}"
    elif mode != "auto":
        forced = f"asked for {mode!r}"
    if mode not in MODES:
        raise ValueError(f"Unknown encoder mode {mode!r}; use one of {', '.join(MODES)}.")
    tiny = _is_tiny_vit(loaded)
    device = torch.device(loaded.device)
    if mode != "auto":
        if mode != "fp32" and not tiny:
            return "fp32", f"{forced}, but only TinyViT models have fast paths: the model's own fp32 encoder"
        if mode.startswith("openvino") and (device.type != "cpu" or not openvino_available()):
            why = "OpenVINO is not installed" if device.type == "cpu" else f"OpenVINO runs on the CPU, not {device}"
            fallback = "bf16" if mode == "openvino-bf16" and _bf16_ok(device)[0] else "fp32-fast"
            return fallback, f"{forced}, but {why}: {fallback} instead"
        if mode == "bf16" and not _bf16_ok(device)[0]:
            return "fp32-fast", f"{forced}, but {_bf16_ok(device)[1]}: bf16 would be emulated, fp32-fast instead"
        return mode, forced
    if not tiny:
        return "fp32", f"model family {loaded.spec.family} has no fast path"
    # bf16 is opt-in: measured on the shared cases, its rounding moved one-box propagation Dice by
    # up to 0.038 (5 of 10 objects past the 0.005 budget), so "auto" keeps fp32 numerics everywhere.
    ok, why = _bf16_ok(device)
    note = (f"{why}; bf16 is opt-in (MEDSAM_ENCODER=openvino-bf16 or bf16): "
            "it moved Dice by up to 0.038 on the shared cases")
    if device.type == "cpu":
        if openvino_available():
            return "openvino-f32", note + "; OpenVINO installed: f32 with fused kernels, fastest fp32-exact path"
        return "fp32-fast", note + "; OpenVINO not installed: fp32 rewrite (BN folded, channels-last, fused attention)"
    return "fp32-fast", note


def _bf16_ok(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(device)} supports bf16"
        return False, "CUDA device without bf16"
    if device.type == "cpu":
        return cpu_bf16_support()
    return False, f"device {device.type}: bf16 not tried there"


def make_encoder(loaded, mode: str = "auto", cache_dir=None, on_progress=None):
    """The fastest correct image-encoder path for this machine, or None for the model's own encoder.

    mode: "auto" (pick by hardware), "fp32" (the model's own eager encoder, the reference),
    "fp32-fast", "bf16", "openvino-f32" or "openvino-bf16". The environment variable
    MEDSAM_ENCODER overrides it (e.g. MEDSAM_ENCODER=fp32). The choice and why is logged (INFO).
    A path that fails to build (e.g. an OpenVINO conversion error) falls back to fp32, with a warning.
    on_progress(message, estimate_s): told before and after a slow one-time step (the first OpenVINO
    conversion: "Preparing the fast encoder (one time, about N s)..."); logged at INFO without it.
    """
    name, reason = choose_mode(loaded, mode)
    if name == "fp32":
        log.info("image encoder: fp32 eager (the model's own); %s", reason or "asked for fp32")
        return None
    try:
        path = build_path(loaded, name, reason, cache_dir, on_progress)
    except Exception as err:  # noqa: BLE001 - an optional fast path that fails must not stop the tool
        if not name.startswith("openvino"):
            log.warning("image encoder: the %s path failed to build (%s); using the model's own fp32 encoder",
                        name, err)
            return None
        fallback = "bf16" if name == "openvino-bf16" and _bf16_ok(torch.device(loaded.device))[0] else "fp32-fast"
        log.warning("image encoder: the %s path failed to build (%s); using %s", name, err, fallback)
        return make_encoder(loaded, fallback, cache_dir) if not os.environ.get(ENV_VAR) else \
            build_path(loaded, fallback, f"{name} failed: {err}")
    log.info("image encoder: %s (%s)", name, reason)
    return path
