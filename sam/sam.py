"""The Segment Anything model: image encoder, prompt encoder, mask decoder."""

from typing import List, Tuple

import torch
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transforms import pad_to_square, upscale_logits


class Sam(nn.Module):
    """Holds the three components and the input normalisation.

    The encoder is the expensive part and runs once per image; the prompt
    encoder and mask decoder are cheap and run once per prompt set.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: List[float] = (123.675, 116.28, 103.53),
        pixel_std: List[float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """Side of the square input frame (1024 for the official models)."""
        return self.image_encoder.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resized image B x 3 x h x w (0..255) -> normalised, zero-padded B x 3 x S x S."""
        x = (x - self.pixel_mean) / self.pixel_std
        return pad_to_square(x, self.img_size)

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: Tuple[int, int],
        original_size: Tuple[int, int],
    ) -> torch.Tensor:
        """Low-res logits B x M x 256 x 256 -> B x M x H x W logits at the original size."""
        return upscale_logits(masks, input_size, original_size, self.img_size)
