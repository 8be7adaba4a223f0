"""SAM's mask decoder: a two-way transformer over prompt tokens and the image, then
hypernetwork MLPs that turn mask tokens into 4x-upscaled mask logits, and an IoU head."""

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, linear
from .transformer import TwoWayTransformer

# Image tokens upscaled together in MaskDecoder.mask_logits on a CPU (see there).
UPSCALE_ROWS = 1024


class MaskDecoder(nn.Module):
    """(image embedding, prompt embeddings) -> mask logits B x M x 4h x 4w and IoU scores B x M."""

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
        image_pe_tokens: Optional[torch.Tensor] = None,
        best_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompt sets against one image (or B images).

        image_embeddings: 1 x C x h x w or B x C x h x w; image_pe: 1 x C x h x w;
        sparse_prompt_embeddings: B x N x C; dense_prompt_embeddings: B x C x h x w.
        attention_similarity (B x hw or hw) and target_embedding (B x C or 1 x C) are
        PerSAM's hooks (see transformer.py); None gives plain SAM.
        image_pe_tokens: image_pe as contiguous 1 x hw x C tokens, when cached (saves a transpose).
        multimask_output: masks 1..3 if True, else mask 0.
        best_only: of those, only the one with the highest predicted IoU (the first of equals),
        M = 1: the mask a caller picking the best would pick, without upscaling the others.
        Returns masks B x M x 4h x 4w and iou_pred B x M.
        """
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            image_pe_tokens=image_pe_tokens,
            selected=selected,
            best_only=best_only,
        )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        attention_similarity: Optional[torch.Tensor] = None,
        target_embedding: Optional[torch.Tensor] = None,
        image_pe_tokens: Optional[torch.Tensor] = None,
        selected: slice = slice(None),
        best_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The `selected` mask tokens (default all four): masks B x M x 4h x 4w and iou_pred B x M;
        with `best_only`, the selected mask with the highest predicted IoU: B x 1 x 4h x 4w and B x 1.

        Only the selected (or best) masks are upscaled, and the final token-to-image attention runs for
        the IoU token and the selected mask tokens alone: no other token's last value is read.
        """
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        if image_embeddings.shape[0] != batch:
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        _, channels, height, width = src.shape

        indices = list(range(self.num_mask_tokens))[selected]
        hs, src = self.transformer(src, pos_src, tokens, attention_similarity, target_embedding, image_pe_tokens,
                                   output_tokens=[0] + [1 + i for i in indices])  # the IoU token, the masks'
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, selected]
        if best_only:
            best = iou_pred.argmax(dim=1, keepdim=True)  # B x 1, the first of equal scores
            iou_pred = iou_pred.gather(1, best)
        if best_only and batch == 1:  # only the best mask's hypernetwork (on one token, as it runs for all)
            n = int(best)
            hyper_in = self.output_hypernetworks_mlps[indices[n]](hs[:, 1 + n, :])[:, None]  # 1 x 1 x C/8
        else:
            hyper_in = torch.stack(
                [self.output_hypernetworks_mlps[i](hs[:, 1 + n, :]) for n, i in enumerate(indices)], dim=1
            )  # B x M x C/8
            if best_only:
                hyper_in = hyper_in.gather(1, best[..., None].expand(-1, -1, hyper_in.shape[-1]))
        return self.mask_logits(src, hyper_in, height, width), iou_pred

    def mask_logits(self, src: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Image tokens B x hw x C and mask weights B x M x C/8 -> mask logits B x M x 4h x 4w.

        `output_upscaling` (two 2 x 2, stride-2 transposed convolutions) applied in token layout:
        a stride-2 transposed convolution with a 2 x 2 kernel maps each pixel on its own to a
        2 x 2 block, so each is one matrix product over the tokens, with LayerNorm2d as a
        layer norm over the channels of each output pixel. The sub-pixels are put in place
        only once, on the M final maps. The same values as the convolutions in image layout
        to float rounding (tested); several times quicker on a CPU.
        """
        first, norm, act1, second, act2 = self.output_upscaling
        batch, tokens, channels = src.shape
        mid, out = first.out_channels, second.out_channels
        # (2 x 2 x mid) x C: the outputs ordered (row offset, column offset, channel)
        first_weight = first.weight.permute(2, 3, 1, 0).reshape(4 * mid, channels)
        first_bias = first.bias.repeat(4)
        second_weight = second.weight.permute(2, 3, 1, 0).reshape(4 * out, mid)
        second_bias = second.bias.repeat(4)
        exact_gelu = isinstance(act2, nn.GELU) and act2.approximate == "none"

        count = hyper_in.shape[1]

        def block(b: int, rows: slice) -> torch.Tensor:
            """Image b's tokens `rows` -> their M x (rows 4 4) logits."""
            x = linear(src[b, rows], first_weight, first_bias)  # rows x 4 mid
            x = act1(F.layer_norm(x.reshape(-1, mid), (mid,), norm.weight, norm.bias, norm.eps))  # (rows 4) x mid
            x = linear(x, second_weight, second_bias, gelu=exact_gelu)  # (rows 4) x 4 out
            if not exact_gelu:
                x = act2(x)
            x = x.reshape(-1, out)  # (rows 4 4) x C/8
            # one single-row product per mask (a batch of M against the same x), so that a mask's
            # logits do not depend on which other masks are made with it (`best_only` makes one)
            return torch.bmm(hyper_in[b, :, None], x.t()[None].expand(count, -1, -1))[:, 0]  # M x (rows 4 4)

        def one_image(b: int) -> torch.Tensor:
            # UPSCALE_ROWS tokens at a time on a CPU: their upscaled features (1 MB, then 2 MB for SAM)
            # stay in the cache between the steps. Every step works on each token (row) alone, so the values are those
            # of the whole image at once, bit for bit (tests/sam/test_fast_decode.py).
            # (blocks of one size only: a kernel may take another path for a short last block)
            step = UPSCALE_ROWS if src.device.type == "cpu" else tokens
            if step >= tokens or tokens % step:
                return block(b, slice(None))
            return torch.cat([block(b, slice(start, start + step)) for start in range(0, tokens, step)], dim=1)

        masks = torch.stack([one_image(b) for b in range(batch)])  # B x M x (hw 4 4)
        # token (i, j), first offset (a, b), second offset (c, d) -> pixel (4i + 2a + c, 4j + 2b + d)
        masks = masks.reshape(batch, -1, height, width, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return masks.reshape(batch, -1, 4 * height, 4 * width)


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        widths = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(widths[:-1], widths[1:]))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
