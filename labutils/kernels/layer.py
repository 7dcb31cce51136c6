"""The packed layer: ``PackedBitLinear`` (a BitLinear on prepacked weights and the integer
kernels, for CPU inference) and ``pack_model``.
"""

from __future__ import annotations

import copy
import numbers

import numba
import numpy as np
import torch
from numba import njit
from torch import nn

from labutils import packing, quant
from labutils.bitlinear import BitLinear
from labutils.kernels.dispatch import fused_for
from labutils.kernels.layout import PackedWeights, _check_threads, prepack_w1a1, prepack_w1a8, prepack_w158a8
from labutils.kernels.matmul import packed_matmul

@njit(cache=True, boundscheck=False, error_model="numpy")
def _pack_signs(x):  # pragma: no cover - compiled
    """float [M, K] -> uint64 [M, ceil(K/64)]: bit k%64 of word k//64 is 1 where x >= 0.

    ``pack_binary_rows`` of ``sign(x)`` (0 -> +1) in one pass, for the W1A1 activations.
    """
    m, k = x.shape
    words = (k + 63) // 64
    out = np.empty((m, words), dtype=np.uint64)
    for r in range(m):
        for w in range(words):
            word = np.uint64(0)
            for b in range(min(64, k - 64 * w)):
                word |= np.uint64(x[r, 64 * w + b] >= 0) << np.uint64(b)
            out[r, w] = word
    return out


@njit(cache=True, boundscheck=False, error_model="numpy")
def _all_finite(values):  # pragma: no cover - compiled
    """True where every element of the float [M] array is finite (NumPy's isfinite().all()
    costs several microseconds a call, a one-token layer call about as much as its kernel)."""
    for i in range(values.shape[0]):
        if not np.isfinite(values[i]):
            return False
    return True


ACT_MODES = ("int8", "binary")


class PackedBitLinear(nn.Module):
    """Inference-only BitLinear on packed weights and integer kernels (CPU).

    The forward pass, for x ``[..., in_features]`` (float)::

        x -> norm (the BitLinear's, if any)
          -> act "int8":   codes_x, s_x = per-token absmax (quant.quantize_activations_absmax)
             act "binary": codes_x = sign(x) (0 -> +1), s_x = mean|x| per token      (W1A1)
                 elastic (BiT, ``act_shift`` β and ``act_scale`` α given):
                           codes_x = sign(x - β) (0 -> +1), s_x = α for every token
          -> y = kernel(codes_x, W_packed) * s_x * s_W + bias        (int32 dot, scaled once)

    With act "int8" this equals the BitLinear's fake-quantized forward up to float rounding
    (the integer matmul is exact; BitLinear multiplies the same codes in floating point).
    act "binary" needs binary weights and is the fully binary W1A1 layer: it is *not* what a
    BitLinear with 8-bit activations computes.

    Buffers: ``packed`` (the kernel tiles as bytes), ``weight_scale`` (float32 [] or [out]),
    ``bias`` (float32 [out] or None), ``act_shift`` (float32 [in] or None) and ``act_scale``
    (float32 [] or None): BiT's elastic binary activations, whose α (one per tensor) and β (one
    per input feature) keep the XNOR-popcount kernel: β is subtracted before the sign, α
    multiplies the integer dot once. Output dtype = input dtype.
    """

    def __init__(
        self,
        weights: PackedWeights,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        norm: nn.Module | None = None,
        act: str = "int8",
        act_bits: int = 8,
        eps: float = 1e-5,
        threads: int | None = None,
        act_shift: torch.Tensor | None = None,
        act_scale: torch.Tensor | None = None,
    ) -> None:
        """Args:
        weights: PackedWeights of W [out_features, in_features]: "w1a8" or "w1.58a8" for act
            "int8", "w1a1" for act "binary".
        weight_scale: s_W, float, one element (per tensor) or out_features (per channel).
        bias: float [out_features] or None.
        norm: applied to x before activation quantization (a copy of the BitLinear's), or None.
        act: "int8" (per-token absmax, ``act_bits`` bits, ``eps``) or "binary" (sign, mean|x|).
        threads: Numba threads for the kernel (None: Numba's current setting).
        act_shift, act_scale: β [in_features] and α (one element), both or neither, only with act
            "binary": elastic activations ``α · sign(x - β)`` instead of ``mean|x| · sign(x)``.
        """
        super().__init__()
        if not isinstance(weights, PackedWeights):
            raise TypeError(f"weights must be PackedWeights, got {type(weights).__name__}")
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
        schemes = ("w1a1",) if act == "binary" else ("w1a8", "w1.58a8")
        if weights.scheme not in schemes:
            raise ValueError(f"act={act!r} needs weights prepacked for {schemes}, got {weights.scheme!r}")
        if act == "int8" and (isinstance(act_bits, bool) or not isinstance(act_bits, numbers.Integral)
                              or not 2 <= act_bits <= 8):  # fmt: skip
            raise ValueError(f"act_bits must be an int in [2, 8] for the int8 kernels, got {act_bits!r}")
        _check_threads(threads)
        scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().cpu()
        if scale.numel() not in (1, weights.n):
            raise ValueError(f"weight_scale must have 1 or out_features={weights.n} elements, got {tuple(scale.shape)}")
        if bias is not None:
            bias = torch.as_tensor(bias, dtype=torch.float32).detach().cpu().reshape(-1).clone()
            if bias.numel() != weights.n:
                raise ValueError(f"bias must have out_features={weights.n} elements, got {bias.numel()}")
        self.in_features, self.out_features = weights.k, weights.n
        self.weights, self.act, self.act_bits, self.eps = weights, act, int(act_bits), float(eps)
        self.threads = threads
        self.norm = norm
        self.register_buffer("packed", torch.from_numpy(weights.data.view(np.uint8)))  # shares memory
        self.register_buffer("weight_scale", scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1))
        self.register_buffer("bias", bias)
        self.fused = True  # False: the unfused steps (torch quantization, kernel, torch rescale)
        self._qp, self._eps = np.float32(2 ** (self.act_bits - 1) - 1), np.float32(self.eps)
        if (act_shift is None) != (act_scale is None):
            raise ValueError("act_shift (β) and act_scale (α) of elastic activations go together: give both or neither")
        if act_shift is not None:
            if act != "binary":
                raise ValueError(f"elastic activations (act_shift, act_scale) need act 'binary', got {act!r}")
            act_shift = torch.as_tensor(act_shift, dtype=torch.float32).detach().cpu().reshape(-1).clone()
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).detach().cpu().reshape(-1).clone()
            if act_shift.numel() != weights.k:
                raise ValueError(f"act_shift must have in_features={weights.k} elements, got {act_shift.numel()}")
            if act_scale.numel() != 1 or not (torch.isfinite(act_scale).all() and (act_scale > 0).all()):
                raise ValueError(f"act_scale must be one finite number > 0, got {act_scale.tolist()}")
            act_scale = act_scale.reshape(())
            # a fused quantize+kernel+rescale path, where one exists, bakes in sign(x) and mean|x|:
            # elastic layers take the unfused steps (_quantize_input subtracts β, scales by α)
            self.fused = False
        self.register_buffer("act_shift", act_shift)
        self.register_buffer("act_scale", act_scale)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear, *, act: str | None = None, threads: int | None = None) -> PackedBitLinear:
        """Pack a trained BitLinear (weight_bits 1 or 1.58; act_bits 2..8, or 1 for W1A1).

        ``act`` None follows the layer: "binary" when its act_bits is 1 (then the packed layer
        equals the BitLinear's forward), else "int8". ``act="binary"`` on a layer trained with
        multi-bit activations is allowed (what-if: binarize a W1A8 model's inputs) but is *not* the
        function that layer computes."""
        if not isinstance(layer, BitLinear):
            raise TypeError(f"layer must be a BitLinear, got {type(layer).__name__}")
        cfg = layer.config
        if act is None:
            act = "binary" if cfg.act_bits == 1 else "int8"
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {ACT_MODES} or None, got {act!r}")
        if cfg.weight_bits not in (1, 1.58):
            raise ValueError(f"packed kernels need weight_bits 1 or 1.58, got {cfg.weight_bits!r}")
        if act == "int8" and (cfg.act_bits is None or not 2 <= cfg.act_bits <= 8):
            raise ValueError(f"act 'int8' needs a BitLinear with act_bits in [2, 8], got {cfg.act_bits!r}")
        if act == "binary" and cfg.weight_bits != 1:
            raise ValueError(f"act 'binary' (W1A1) needs binary weights (weight_bits 1), got {cfg.weight_bits!r}")
        if layer.quant_strength != 1:
            raise ValueError(f"packing needs a fully quantized layer (quant_strength 1), got {layer.quant_strength}")
        codes, scale = layer.quantized_weight()
        codes = codes.cpu()
        if cfg.weight_bits == 1.58:
            weights = prepack_w158a8(codes)
        else:
            rows = packing.pack_binary_rows(codes)
            weights = (prepack_w1a1 if act == "binary" else prepack_w1a8)(rows, layer.in_features)
        norm = copy.deepcopy(layer.norm).cpu().float() if layer.norm is not None else None
        bias = layer.bias.detach().float() if layer.bias is not None else None
        act_bits = cfg.act_bits if act == "int8" else 8
        shift = alpha = None
        if getattr(cfg, "act_binarizer", "sign_mean") == "elastic":  # act is "binary" here (act_bits 1)
            alpha, shift = layer.elastic_activation_params()
        return cls(weights, scale, bias, norm=norm, act=act, act_bits=act_bits, eps=cfg.eps, threads=threads,
                   act_shift=shift, act_scale=alpha)  # fmt: skip

    def _quantize_input(self, x: torch.Tensor, mark=None) -> tuple[np.ndarray, torch.Tensor]:
        """x float32 [M, K] -> (kernel input, scale float32 [M, 1])."""
        if self.act_shift is not None:  # elastic (BiT): sign(x - β), one scale α for every token
            signs = _pack_signs((x - self.act_shift).contiguous().numpy())
            return signs, self.act_scale.expand(x.shape[0], 1)
        if self.act == "binary":  # the bits and scale of quant.binarize_activations, in one pass
            return _pack_signs(x.contiguous().numpy()), x.abs().mean(dim=-1, keepdim=True)
        codes, scale = quant.quantize_activations_absmax(x, self.act_bits, eps=self.eps)
        mark and mark("activation_quantization")
        return np.ascontiguousarray(codes.numpy()), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] float -> [..., out_features] in x's dtype (CPU only, no autograd)."""
        if torch.is_grad_enabled():  # entering no_grad costs microseconds: only where grad is on
            with torch.no_grad():
                return self._forward(x, None)
        return self._forward(x, None)

    def _forward(self, x: torch.Tensor, mark) -> torch.Tensor:
        """The forward pass; ``mark(section)`` (profiling, ``kernels.profile``) is called after
        each step with the section the time since the previous mark belongs to."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}")
        if not x.is_cpu:
            raise ValueError(f"PackedBitLinear runs on the CPU, got x on {x.device}")
        if x.numel() == 0:  # an empty batch, as nn.Linear: [..., 0 tokens, out_features]
            return x.new_zeros(*x.shape[:-1], self.out_features)
        h = x.reshape(-1, self.in_features).float()
        mark and mark("conversions")
        if self.norm is not None:
            h = self.norm(h)
            mark and mark("norms_gelu")
        kernel = fused_for(self.weights.scheme, h.shape[0], self.weights, self.threads) if self.fused else None
        if kernel is not None:
            return self._fused_forward(kernel, x, h, mark)
        codes, x_scale = self._quantize_input(h, mark)
        if not torch.isfinite(x_scale).all():  # a NaN or inf anywhere in a token reaches its scale
            raise ValueError("x must be finite: it holds NaN or inf, which per-token scales cannot quantize")
        mark and mark("activation_quantization")
        dots = packed_matmul(codes, self.weights, threads=self.threads)
        mark and mark("kernel_call", (codes, self.weights, self.threads))
        dots = torch.from_numpy(dots)
        mark and mark("conversions")
        y = dots.float() * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        mark and mark("rescale_bias")
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        mark and mark("conversions")
        return y

    def _fused_forward(self, kernel, x: torch.Tensor, h: torch.Tensor, mark) -> torch.Tensor:
        """Quantization, kernel, rescale and bias in one compiled call on zero-copy views."""
        xf = h.contiguous().numpy()
        y = np.empty((h.shape[0], self.out_features), dtype=np.float32)
        w = self.weights
        ws, bias = self._fused_scale_bias()
        args = ((xf, w.data, w.k, ws, bias, y) if w.scheme == "w1a1"
                else (xf, w.data, ws, bias, y, self._qp, self._eps))  # fmt: skip
        mark and mark("conversions")
        if self.threads is None or self.threads == numba.get_num_threads():
            x_scale = kernel(*args)
        else:
            current = numba.get_num_threads()
            numba.set_num_threads(self.threads)
            try:
                x_scale = kernel(*args)
            finally:
                numba.set_num_threads(current)
        mark and mark("kernel_call", lambda: kernel(*args))
        if not _all_finite(x_scale):  # a NaN or inf anywhere in a token reaches its scale
            raise ValueError("x must be finite: it holds NaN or inf, which per-token scales cannot quantize")
        out = torch.from_numpy(y).reshape(*x.shape[:-1], self.out_features)
        out = out if x.dtype == torch.float32 else out.to(x.dtype)
        mark and mark("conversions")
        return out

    def _fused_scale_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """The fused kernels' scale per output and bias (zeros where the layer has none), float32
        [out_features] numpy arrays. Rebuilt only when a buffer was replaced (``load_state_dict``
        of a new tensor, ``.to``) or written in place (its version counter moved): building them
        costs more than the kernel of a one-token call."""
        scale, bias = self.weight_scale, self.bias
        versions = (scale._version, None if bias is None else bias._version)
        cached = self.__dict__.get("_fused_arrays")
        if cached is None or cached[0] is not scale or cached[1] is not bias or cached[2] != versions:
            ws = scale.detach().float().reshape(-1).expand(self.out_features).contiguous().numpy()
            b = (bias.detach().float() if bias is not None else torch.zeros(self.out_features)).contiguous().numpy()
            cached = self.__dict__["_fused_arrays"] = (scale, bias, versions, ws, b)
        return cached[3], cached[4]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.weights.scheme}, "
            f"act={self.act}{' (elastic)' if self.act_shift is not None else ''}, bias={self.bias is not None}, "
            f"{self.weights.nbytes:,} weight bytes"
        )


def pack_model(model: nn.Module, *, act: str | None = None, inplace: bool = False, threads: int | None = None) -> nn.Module:
    """Replace every BitLinear of a trained model by a PackedBitLinear, for CPU inference.

    By default works on a deep copy and returns it, so the trained model stays usable (and
    comparable); ``inplace=True`` converts ``model`` itself (and returns it). The model is put in
    eval mode. ``act`` None follows each layer (binary activations where its act_bits is 1, else
    int8 with its own act_bits: the packed model computes what the BitLinear model computes);
    "int8" or "binary" forces one mode (see ``PackedBitLinear.from_bitlinear``). A model that is
    itself a BitLinear comes back as a PackedBitLinear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if act is not None and act not in ACT_MODES:
        raise ValueError(f"act must be one of {ACT_MODES} or None, got {act!r}")
    if isinstance(model, BitLinear):
        return PackedBitLinear.from_bitlinear(model, act=act, threads=threads)
    target = model if inplace else copy.deepcopy(model)
    layers = [(name, m) for name, m in target.named_modules() if isinstance(m, BitLinear)]
    if not layers:
        raise ValueError(f"pack_model found no BitLinear in {type(model).__name__}")
    for name, layer in layers:
        parent, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent), child, PackedBitLinear.from_bitlinear(layer, act=act, threads=threads))
    return target.eval()


@njit(inline="always", cache=True, boundscheck=False, error_model="numpy")
def embedding_value(codes, scale, group, nibbles, r, j):  # pragma: no cover - compiled
    """Element j of row r of a PackedEmbedding's buffers, float32: code * scale of its group
    (codes stored as nibbles + 8, two per byte, low nibble first, when ``nibbles``; else as int8
    bytes). Inlined into every compiled caller (this module's lookup, the encoder engine's)."""
    if nibbles:
        code = np.int32((codes[r, j >> 1] >> np.uint8(4 * (j & 1))) & np.uint8(15)) - 8
    else:
        code = np.int32(np.int8(codes[r, j]))
    return np.float32(code) * scale[r, j // group]


@njit(cache=True, boundscheck=False, error_model="numpy")
def _embed_rows(ids, codes, scale, dim, group, nibbles, out):  # pragma: no cover - compiled
    """out[i] = the dequantized row ids[i] (``embedding_value``), float32."""
    for i in range(ids.shape[0]):
        for j in range(dim):
            out[i, j] = embedding_value(codes, scale, group, nibbles, ids[i], j)


class PackedEmbedding(nn.Module):
    """An embedding table that stays group-quantized in RAM: k-bit codes (two per byte for
    k <= 4) and one float32 scale per group of ``group_size`` values of a row; each looked-up
    row is dequantized when it is read (``code * scale``, the values ``packfile`` loads), so no
    float copy of the table is kept.

    Buffers: ``codes`` uint8 [rows, dim/2] (or [rows, dim]), ``scale`` float32 [rows, groups].
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, *, padding_idx: int | None = None) -> None:
        """codes: int8 [rows, dim] in [-8, 7] for nibbles (k <= 4), any int8 otherwise;
        scale: float32 [rows, groups] or [rows, groups, 1]."""
        super().__init__()
        codes = torch.as_tensor(codes).to(torch.int8)
        rows, dim = codes.shape
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(rows, -1).contiguous()
        if dim % scale.shape[1]:
            raise ValueError(f"dim {dim} is not a multiple of the {scale.shape[1]} groups")
        self.num_embeddings, self.embedding_dim, self.padding_idx = rows, dim, padding_idx
        self.group_size = dim // scale.shape[1]
        self.nibbles = bool(codes.min() >= -8 and codes.max() <= 7)
        if self.nibbles:
            biased = (codes.to(torch.int16) + 8).to(torch.uint8)
            if dim % 2:
                biased = torch.cat([biased, torch.full((rows, 1), 8, dtype=torch.uint8)], dim=1)
            packed = biased[:, 0::2] | (biased[:, 1::2] << 4)
        else:
            packed = codes.view(torch.uint8)
        self.register_buffer("codes", packed.contiguous())
        self.register_buffer("scale", scale)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"index out of range: ids must be in [0, {self.num_embeddings})")
        out = torch.empty(flat.numel(), self.embedding_dim)
        _embed_rows(flat.numpy(), self.codes.numpy(), self.scale.numpy(), self.embedding_dim, self.group_size,
                    self.nibbles, out.numpy())  # fmt: skip
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        bits = "int4" if self.nibbles else "int8"
        return f"{self.num_embeddings}, {self.embedding_dim}, {bits} groups of {self.group_size}"


def pack_embeddings_(model: nn.Module, contents) -> list[str]:
    """Replace every ``nn.Embedding`` of ``model`` whose weight a packed file holds group-quantized
    (``packfile.load_packed(path)``'s contents: codes and scales) by a PackedEmbedding, in place;
    return the names replaced. The rows it gives equal the float table ``load_packed`` fills in."""
    replaced = []
    for name, module in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        entry = contents.entries.get(key, {})
        if type(module) is not nn.Embedding or entry.get("kind") != "grouped" or key not in contents.codes:
            continue
        packed = PackedEmbedding(contents.codes[key], contents.scales[key], padding_idx=module.padding_idx)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
        replaced.append(name)
    return replaced
