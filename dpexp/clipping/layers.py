"""Per-layer per-sample gradient math from a layer's input ``x`` and output gradient ``g``.

Shared by every fast engine (``bk``, ``mixed_ghost``, ``ghost``, ``auto``). For a layer and one
of its parameters a :class:`LayerMath` gives

- ``per_sample``: the instantiated per-sample gradients (B × parameter shape),
- ``ghost_sq_norm``: the per-sample squared norm of the weight gradient without instantiating it
  (Gram matrices of the unfolded input and of the output gradient, T × T per sample),
- ``summed``: Σ_i of the per-sample gradients, with native kernels (pass ``c_i·g_i`` as ``g`` to
  get the clipped sum),
- ``dims``: (T, p, D, groups) for the layer rule, and ``reference``: the layer's defining
  functional form, used once per input shape to check that a subclass computes the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpexp.clipping.base import squared_norms


@dataclass(frozen=True)
class Dims:
    """Sizes deciding ghost vs instantiation: T positions per sample, p outputs, D inputs
    (per group), ``groups`` independent blocks."""

    T: int
    p: int
    D: int
    groups: int = 1


def mixed_rule(dims: Dims) -> bool:
    """The seed's rule (Bu, Mao, Xu 2022): ghost norm iff 2T² ≤ p·D (memory of the two T × T
    Gram matrices against the per-sample gradient)."""
    return dims.p * dims.D >= 2 * dims.T**2


def instantiation_fits(dims: Dims) -> bool:
    """Per-sample gradients (p·D per sample) at most twice the layer's unfolded input and
    output gradient (T·(groups·D + p)): beyond that only the ghost norm is considered."""
    return dims.p * dims.D <= 2 * dims.T * (dims.groups * dims.D + dims.p)


def _gram_product(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_{t,s} (a aᵀ)_{ts} (g gᵀ)_{ts} over the last two dims, summed over all but the first."""
    if a.shape[-2] == 1:  # rank one: ‖g‖²‖a‖²
        sq = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(g, dim=-1)).square()
    else:
        sq = (a @ a.transpose(-1, -2) * (g @ g.transpose(-1, -2))).sum((-1, -2))
    return sq.reshape(len(sq), -1).sum(1)


class LayerMath:
    """Math of one layer type; subclasses list the parameters they know in ``params``, those
    with a ghost norm in ``ghost_params`` and the ways to instantiate in ``methods``."""

    base: type[nn.Module]
    params: tuple[str, ...] = ("weight", "bias")
    ghost_params: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("default",)

    def dims(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> Dims | None:
        return None

    def reference(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.base.forward(module, x)

    def per_sample(self, module, x, g, name: str, method: str = "default") -> torch.Tensor:
        raise NotImplementedError

    def ghost_sq_norm(self, module, x, g) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no ghost norm")

    def per_sample_sq_norm(self, module, x, g, name: str, method: str = "default"):
        """Per-sample squared gradient norms of ``name`` by an instantiation ``method``,
        for when the gradients themselves are not kept."""
        return squared_norms(self.per_sample(module, x, g, name, method))

    def summed(self, module, x, g, name: str) -> torch.Tensor:
        return self.per_sample(module, x, g, name).sum(0)

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this module cannot be handled (None when it can)."""
        return None


class LinearMath(LayerMath):
    """y = x Wᵀ + b over any leading dims: T = positions per sample (1 for 2-D inputs)."""

    base = nn.Linear
    ghost_params = ("weight",)

    @staticmethod
    def _flat(x, g):
        return x.reshape(len(x), -1, x.shape[-1]), g.reshape(len(g), -1, g.shape[-1])

    def dims(self, module, x, g):
        return Dims(T=x[0].numel() // x.shape[-1], p=g.shape[-1], D=x.shape[-1])

    def per_sample(self, module, x, g, name, method="default"):
        x, g = self._flat(x, g)
        return g.transpose(1, 2) @ x if name == "weight" else g.sum(1)

    def ghost_sq_norm(self, module, x, g):
        return _gram_product(*self._flat(x, g))

    def summed(self, module, x, g, name):
        x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        return g.t() @ x if name == "weight" else g.sum(0)


class ConvMath(LayerMath):
    """Conv1d/Conv2d with stride, padding (any mode), dilation and groups, via unfolding."""

    base = nn.Conv2d
    ghost_params = ("weight",)
    methods = ("unfold", "conv", "loop")

    def reference(self, module, x):
        return type(self)._base_of(module).forward(module, x)

    @staticmethod
    def _base_of(module):
        return nn.Conv1d if isinstance(module, nn.Conv1d) else nn.Conv2d

    def unsupported(self, module):
        if not isinstance(module, nn.Conv1d | nn.Conv2d):
            return "only Conv1d and Conv2d have a fast path"
        return None

    @staticmethod
    def _padded(module, x) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Input padded as the layer pads it, and the padding left to the kernel."""
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return x, tuple(module.padding)
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * (x.dim() - 2)

    def _unfold(self, module, x) -> torch.Tensor:
        """B × groups × (C_in/groups · kernel) × T."""
        x, padding = self._padded(module, x)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if x.dim() == 3:  # Conv1d as a 1 × L image
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
            padding = (0, *padding)
        if any(padding):
            x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        # strided views and one copy: faster than F.unfold's im2col on CPU
        patches = x
        for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride, strict=True), start=2):
            patches = patches.unfold(dim, (k - 1) * d + 1, s)  # B C H' W' (kh) (kw)
        patches = patches[..., :: dilation[0], :: dilation[1]].permute(0, 1, 4, 5, 2, 3)
        return patches.reshape(len(x), module.groups, -1, patches[0, 0, 0, 0].numel())

    @staticmethod
    def _grouped(module, g) -> torch.Tensor:
        return g.reshape(len(g), module.groups, -1, g[0, 0].numel())

    def dims(self, module, x, g):
        D = module.in_channels // module.groups * math.prod(module.kernel_size)
        return Dims(T=g[0, 0].numel(), p=module.out_channels, D=D, groups=module.groups)

    def per_sample(self, module, x, g, name, method: str = "unfold"):
        """``unfold``: batched matmul of output gradients and unfolded input patches;
        ``conv``: one grouped convolution (groups = B·groups) correlating each sample's
        input with its own output gradient (stride and dilation swap roles); ``loop``: the
        native weight-gradient kernel once per sample (no unfolded copy: large T)."""
        if name == "bias":
            return g.reshape(len(g), g.shape[1], -1).sum(2)
        if method == "conv":
            return self._per_sample_by_conv(module, x, g)
        if method == "loop":
            return torch.stack(
                [self.summed(module, x[i : i + 1], g[i : i + 1], name) for i in range(len(x))]
            )
        cols, gg = self._unfold(module, x), self._grouped(module, g)
        return (gg @ cols.transpose(-1, -2)).reshape(len(g), *module.weight.shape)

    def per_sample_sq_norm(self, module, x, g, name, method="unfold"):
        if name == "weight" and method == "loop":  # one sample's gradient at a time
            return torch.stack(
                [
                    torch.linalg.vector_norm(self.summed(module, x[i : i + 1], g[i : i + 1], name))
                    for i in range(len(x))
                ]
            ).square()
        return super().per_sample_sq_norm(module, x, g, name, method)

    def _per_sample_by_conv(self, module, x, g):
        x, padding = self._padded(module, x)
        batch, groups, kernel = len(x), module.groups, module.kernel_size
        per_group = module.in_channels // groups
        inputs = x.reshape(batch * groups, per_group, *x.shape[2:]).transpose(0, 1)
        kernels = g.reshape(batch * module.out_channels, 1, *g.shape[2:])
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        out = conv(
            inputs,
            kernels,
            padding=padding,
            stride=module.dilation,
            dilation=module.stride,
            groups=batch * groups,
        )
        out = out[(..., *(slice(0, k) for k in kernel))]
        out = out.reshape(per_group, batch, module.out_channels, *kernel)
        return out.transpose(0, 1).transpose(1, 2)

    def ghost_sq_norm(self, module, x, g):
        cols, gg = self._unfold(module, x), self._grouped(module, g)
        return _gram_product(cols.transpose(-1, -2), gg.transpose(-1, -2))

    def summed(self, module, x, g, name):
        if name == "bias":
            return g.transpose(0, 1).reshape(g.shape[1], -1).sum(1)
        x, padding = self._padded(module, x)
        weight_grad = torch.nn.grad.conv1d_weight if x.dim() == 3 else torch.nn.grad.conv2d_weight
        return weight_grad(
            x, module.weight.shape, g, module.stride, padding, module.dilation, module.groups
        )


class GroupNormMath(LayerMath):
    """Affine of the normalised input: per-sample γ-grad = Σ_positions g·x̂, β-grad = Σ g."""

    base = nn.GroupNorm

    def reference(self, module, x):
        return F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)

    def per_sample(self, module, x, g, name, method="default"):
        if name == "weight":
            g = g * F.group_norm(x, module.num_groups, None, None, module.eps)
        return g.reshape(len(g), g.shape[1], -1).sum(2)


class LayerNormMath(LayerMath):
    """Same as GroupNorm over the trailing ``normalized_shape`` dims."""

    base = nn.LayerNorm

    def reference(self, module, x):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)

    def per_sample(self, module, x, g, name, method="default"):
        shape = module.normalized_shape
        if name == "weight":
            g = g * F.layer_norm(x, shape, None, None, module.eps)
        return g.reshape(len(g), -1, *shape).sum(1)


class EmbeddingMath(LayerMath):
    """Rows picked by indices: ghost norm Σ_{t,s} [i_t = i_s] ⟨g_t, g_s⟩, no B × V × d tensor."""

    base = nn.Embedding
    params = ("weight",)
    ghost_params = ("weight",)

    def reference(self, module, x):
        return F.embedding(x, module.weight, module.padding_idx)

    def unsupported(self, module):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return "max_norm, scale_grad_by_freq and sparse embeddings are not supported"
        return None

    @staticmethod
    def _flat(module, x, g):
        idx, g = x.reshape(len(x), -1), g.reshape(len(x), -1, g.shape[-1])
        if module.padding_idx is not None:  # the padding row never gets a gradient
            g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return idx, g

    def dims(self, module, x, g):
        return Dims(T=x[0].numel(), p=module.embedding_dim, D=module.num_embeddings)

    def per_sample(self, module, x, g, name, method="default"):
        idx, g = self._flat(module, x, g)
        rows = idx + module.num_embeddings * torch.arange(len(idx), device=idx.device)[:, None]
        out = g.new_zeros(len(idx) * module.num_embeddings, g.shape[-1])
        out.index_add_(0, rows.flatten(), g.reshape(-1, g.shape[-1]))
        return out.view(len(idx), *module.weight.shape)

    def ghost_sq_norm(self, module, x, g):
        idx, g = self._flat(module, x, g)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)
        return (same * (g @ g.transpose(1, 2))).sum((1, 2))

    def summed(self, module, x, g, name):
        idx, g = self._flat(module, x, g)
        out = g.new_zeros(module.weight.shape)
        return out.index_add_(0, idx.flatten(), g.reshape(-1, g.shape[-1]))


# Dispatch on isinstance, most specific first (subclasses are checked against ``reference``).
MATHS: tuple[tuple[type[nn.Module], LayerMath], ...] = (
    (nn.Linear, LinearMath()),
    (nn.modules.conv._ConvNd, ConvMath()),
    (nn.GroupNorm, GroupNormMath()),
    (nn.LayerNorm, LayerNormMath()),
    (nn.Embedding, EmbeddingMath()),
)
EXACT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def math_for(module: nn.Module) -> LayerMath | None:
    for kind, layer_math in MATHS:
        if isinstance(module, kind):
            return layer_math
    return None
