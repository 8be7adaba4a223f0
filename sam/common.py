"""Small building blocks shared by the SAM components."""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn


class MLPBlock(nn.Module):
    """Two linear layers with an activation between: (..., C) -> (..., C)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a B x C x H x W tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            # channels last: the channels of each pixel are contiguous, a plain layer norm (one pass)
            pixels = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
            return pixels.permute(0, 3, 1, 2)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _onednn_inference(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN's CPU matrix products may run on these fp32 tensors: on a CPU, in inference
    (no autograd through them), outside an export or compilation, in a torch with oneDNN."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None or not torch.backends.mkldnn.is_available():
        return False
    grad = torch.is_grad_enabled()
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not (grad and t.requires_grad) for t in tensors)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool = False) -> torch.Tensor:
    """x (N x K) @ weight^T (weight N_out x K) + bias, then the exact GELU if `gelu`: N x N_out.

    On a CPU, in fp32 inference, this is oneDNN's fused linear (the operator PyTorch's own
    compiler emits for linear + activation): the bias and the GELU are applied as the product
    is written, instead of as passes of their own over the output, which for the decoder's
    image-sized products took as long as the product itself. Elsewhere (GPU, autograd, an
    export or compilation, a torch without oneDNN) it is F.linear and F.gelu.
    """
    if x.dim() == 2 and _onednn_inference(x, weight, *([] if bias is None else [bias])):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "gelu" if gelu else "none",
                                                  [], "none" if gelu else "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B x M x K) @ b (B x K x N) -> B x M x N, as torch.matmul.

    For the decoder's lopsided products (4096 image tokens by 256 channels against some 72
    head-token pairs, either way round) oneDNN's CPU kernel, called as a linear layer whose
    weights are b^T read in place whatever its strides, is 15-35 % quicker than bmm's; it runs
    one image of the batch at a time (each image's operands stay in the cache). Elsewhere (see
    `linear`) and for other shapes this is torch.matmul.
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or not _onednn_inference(a, b):
        return torch.matmul(a, b)
    def one(i: int) -> torch.Tensor:
        weight = b[i].t()  # N x K: b itself (K x N row-major) read column by column, no copy
        if not (weight.is_contiguous() or weight.t().is_contiguous()):
            weight = weight.contiguous()
        return torch.ops.mkldnn._linear_pointwise(a[i].contiguous(), weight, None, "none", [], "")

    if a.shape[0] == 1:
        return one(0)[None]
    return torch.stack([one(i) for i in range(a.shape[0])])


def pad_grid(x: torch.Tensor, multiple: int, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """B x H x W x C -> B x H' x W' x C with H', W' the next multiples of `multiple`.

    The new cells hold zeros, or `value` (C) when given: the padded grid of tokens whose
    padding is what a zero token becomes after a projection (its bias). The cells of the
    grid keep their values exactly (they get + 0).
    """
    height, width = x.shape[1], x.shape[2]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    if not (pad_h or pad_w):
        return x
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if value is not None:
        padding = F.pad(x.new_zeros(1, height, width, 1), (0, 0, 0, pad_w, 0, pad_h), value=1.0)  # 1 on the padding
        x = x + padding * value.to(x.dtype)
    return x


def grid_to_windows(x: torch.Tensor, window_size: int, num_heads: int) -> torch.Tensor:
    """A padded grid B x H x W x C (H, W multiples of window_size) -> its windows split into heads,
    (B * windows) x heads x window_size^2 x C/heads, windows in row-major order: one copy."""
    batch, height, width, channels = x.shape
    rows, cols = height // window_size, width // window_size
    x = x.view(batch, rows, window_size, cols, window_size, num_heads, channels // num_heads)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(batch * rows * cols, num_heads, window_size**2, -1)


def windows_to_grid(x: torch.Tensor, size: Tuple[int, int], window_size: int) -> torch.Tensor:
    """The inverse of grid_to_windows, cropped: (B * windows) x heads x window_size^2 x d ->
    B x H x W x (heads d) for the grid size (H, W) before padding (a view when nothing is cropped)."""
    height, width = size
    # windows down and across (no negative floor division: exports trace it as truncation)
    rows, cols = (height + window_size - 1) // window_size, (width + window_size - 1) // window_size
    windows, heads, _, head_dim = x.shape
    x = x.view(windows // (rows * cols), rows, cols, heads, window_size, window_size, head_dim)
    x = x.permute(0, 1, 4, 2, 5, 3, 6).reshape(-1, rows * window_size, cols * window_size, heads * head_dim)
    return x[:, :height, :width]
