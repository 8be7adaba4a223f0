"""TinyViT image encoder of MobileSAM (model type "vit_t").

The encoder maps a normalised, padded B x 3 x 1024 x 1024 image to a
B x 256 x 64 x 64 embedding, the same interface as SAM's ``ImageEncoderViT``.
Module and parameter names follow the released ``mobile_sam.pt`` checkpoint
(keys under ``image_encoder.``), so that checkpoint loads with ``strict=True``.

Layout for the default (MobileSAM) configuration, 1024 x 1024 input:

    patch_embed   two 3x3 stride-2 Conv2d+BN, GELU between   -> B x  64 x 256 x 256
    layers.0      2 MBConv blocks, PatchMerging (stride 2)    -> B x 128^2 tokens x 128
    layers.1      2 TinyViT blocks (window 7), merge (s. 2)   -> B x  64^2 tokens x 160
    layers.2      6 TinyViT blocks (window 14), merge (s. 1)  -> B x  64^2 tokens x 320
    layers.3      2 TinyViT blocks (window 7)                 -> B x  64^2 tokens x 320
    neck          conv1x1, LayerNorm2d, conv3x3, LayerNorm2d  -> B x 256 x 64 x 64

Between the attention stages the features travel as tokens, B x L x C with
L = H * W in row-major order; the grid size (H, W) is passed alongside.
Inference only: dropout and stochastic depth of the original are left out
(they own no parameters, so the checkpoint keys are unaffected).
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, grid_to_windows, pad_grid, windows_to_grid

GridSize = Tuple[int, int]


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d: B x C_in x H x W -> B x C_out x H' x W'.

    Children are named ``c`` and ``bn`` to match the checkpoint.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: B x C_in x H x W -> B x C x H/4 x W/4."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, hidden, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            Conv2dBN(hidden, embed_dim, kernel_size=3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project).

    B x C x H x W -> B x C x H x W; GELU after each of the first two convs and
    after the residual sum.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, kernel_size=1)
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim, kernel_size=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        y = self.conv3(y)
        return self.act(y + x)


class PatchMerging(nn.Module):
    """Change width (and usually halve resolution) between stages.

    1x1 conv, GELU, depthwise 3x3 conv with ``stride``, GELU, 1x1 conv.
    Input B x C x H x W (image layout); output tokens B x (H' * W') x C_out
    together with the new grid size (H', W').
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim, kernel_size=1)
        self.conv2 = Conv2dBN(
            out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim
        )
        self.conv3 = Conv2dBN(out_dim, out_dim, kernel_size=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridSize]:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


def _tokens_to_image(x: torch.Tensor, grid: GridSize) -> torch.Tensor:
    """B x (H * W) x C tokens -> B x C x H x W."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])


class Attention(nn.Module):
    """Multi-head self-attention within windows, with learned relative-position biases.

    Input and output: tokens B x (H * W) x C on an H x W grid (passed alongside).
    The grid is zero-padded to a multiple of ``window_size`` and cut into windows
    of N = window_size ** 2 tokens; padded tokens take part as keys, as in the
    original, and their outputs are dropped. LayerNorm is applied inside, before
    the qkv projection.

    ``qkv`` is laid out per head: its output viewed as N x heads x (3 * d) holds
    [q | k | v] of each head in turn (unlike the [q | k | v] x heads layout of
    SAM's ViT). The bias added to the logits of head h for tokens i, j is
    ``attention_biases[h, |dy| * window_size + |dx|]`` with (dy, dx) the
    in-window offset between the two tokens.

    The projections run on the H x W tokens only: a padded token is zero, so its
    q, k and v are the projection of LayerNorm's bias, which is written into the
    padding. The same values as projecting the padded grid, with fewer products.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.scale = self.head_dim**-0.5

        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

        # One learned bias per head and per absolute offset (|dy|, |dx|).
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        coords = torch.arange(window_size)
        ys = coords.repeat_interleave(window_size)  # row of each of the N tokens
        xs = coords.repeat(window_size)  # column of each of the N tokens
        idxs = (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)  # N x N

    def attention_bias(self) -> torch.Tensor:
        """Dense bias added to the attention logits: heads x N x N."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor, grid: GridSize) -> torch.Tensor:
        B, L, C = x.shape
        ws = self.window_size
        x = self.norm(x)
        # Rows of qkv.weight per head [q | k | v]: heads x 3 x d x C.
        weight = self.qkv.weight.view(self.num_heads, 3, self.head_dim, C)
        bias = self.qkv.bias.view(self.num_heads, 3, self.head_dim)
        windows = []
        for i in range(3):  # q, k, v: (B * windows) x heads x N x d
            w, b = weight[:, i].reshape(C, C), bias[:, i].reshape(C)
            t = F.linear(x, w, b).view(B, grid[0], grid[1], C)
            t = pad_grid(t, ws, F.linear(self.norm.bias, w, b))  # a zero token, normed and projected
            windows.append(grid_to_windows(t, ws, self.num_heads))
        q, k, v = windows
        # A 4-D mask (1 x heads x N x N) lets CPU use the fused (flash) kernel.
        mask = self.attention_bias().to(q.dtype).unsqueeze(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(windows_to_grid(x, grid, ws).reshape(B, L, C))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU, Linear: B x L x C -> B x L x C."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention, depthwise local conv, MLP: tokens B x (H * W) x C -> same.

    x = x + Attention(x)         (in windows; grid zero-padded to a multiple of the window,
                                  padded tokens take part as keys, as in the original)
    x = LocalConv(x)             (depthwise k x k Conv2d+BN on the H x W grid, no residual)
    x = x + Mlp(x)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.local_conv = Conv2dBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, grid: GridSize) -> torch.Tensor:
        x = x + self.attn(x, grid)
        # The depthwise conv reads the tokens as a channels-last image: no copies around it.
        B, L, C = x.shape
        image = x.view(B, grid[0], grid[1], C).permute(0, 3, 1, 2)
        x = self.local_conv(image).permute(0, 2, 3, 1).reshape(B, L, C)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """First stage: MBConv blocks then PatchMerging.

    B x C x H x W -> tokens B x (H' * W') x C_out and the grid (H', W').
    """

    def __init__(
        self, dim: int, depth: int, expand_ratio: float, out_dim: int, stride: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, GridSize]:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """TinyViT blocks then an optional PatchMerging.

    Tokens B x (H * W) x C with grid (H, W) -> tokens B x (H' * W') x C_out and (H', W')
    (unchanged when there is no downsample).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int,
        stride: int,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size)
                for _ in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim, out_dim, stride) if downsample else None

    def forward(self, x: torch.Tensor, grid: GridSize) -> Tuple[torch.Tensor, GridSize]:
        for blk in self.blocks:
            x = blk(x, grid)
        if self.downsample is not None:
            x, grid = self.downsample(_tokens_to_image(x, grid))
        return x, grid


class TinyViT(nn.Module):
    """TinyViT-5M backbone with SAM's neck, as used by MobileSAM.

    forward: B x in_chans x img_size x img_size -> B x out_chans x img_size/16 x img_size/16.

    The overall stride is 16: 4 in ``patch_embed``, then 2 at every stage
    transition except the last, which keeps the resolution (MobileSAM's change
    to TinyViT, giving a 64 x 64 grid for a 1024 input). Any input whose sides
    are multiples of 16 works; ``img_size`` is only the nominal input size
    (read by the SAM wrapper for padding).

    ``norm_head`` / ``head`` are TinyViT's ImageNet classifier. They are unused
    in ``forward`` and exist only because ``mobile_sam.pt`` contains them
    (``num_classes=0`` drops them).
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Tuple[int, ...] = (64, 128, 160, 320),
        depths: Tuple[int, ...] = (2, 2, 6, 2),
        num_heads: Tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: Tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        num_classes: int = 1000,
    ) -> None:
        """
        Args:
            img_size (int): Nominal (square) input size.
            in_chans (int): Number of input image channels.
            embed_dims (tuple): Channel width of each stage.
            depths (tuple): Number of blocks in each stage (stage 0 is MBConv).
            num_heads (tuple): Attention heads per stage (entry 0 unused).
            window_sizes (tuple): Attention window size per stage (entry 0 unused).
            mlp_ratio (float): MLP hidden width / embedding width.
            mbconv_expand_ratio (float): MBConv hidden width / width in stage 0.
            local_conv_size (int): Kernel size of the depthwise conv in TinyViT blocks.
            out_chans (int): Channels of the output embedding (neck width).
            num_classes (int): Width of the unused classifier head kept for the checkpoint.
        """
        super().__init__()
        num_stages = len(depths)
        assert len(embed_dims) == len(num_heads) == len(window_sizes) == num_stages
        self.img_size = img_size

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])

        self.layers = nn.ModuleList()
        for i in range(num_stages):
            has_downsample = i < num_stages - 1
            out_dim = embed_dims[i + 1] if has_downsample else embed_dims[i]
            # The merge into the last stage keeps the resolution (stride 1).
            stride = 1 if i == num_stages - 2 else 2
            if i == 0:
                layer: nn.Module = ConvStage(
                    embed_dims[0], depths[0], mbconv_expand_ratio, out_dim, stride
                )
            else:
                layer = AttentionStage(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    out_dim,
                    stride,
                    has_downsample,
                )
            self.layers.append(layer)

        if num_classes > 0:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B x C0 x H/4 x W/4
        x, grid = self.layers[0](x)  # tokens B x L x C1
        for layer in self.layers[1:]:
            x, grid = layer(x, grid)
        return self.neck(_tokens_to_image(x, grid))  # B x out_chans x H/16 x W/16
