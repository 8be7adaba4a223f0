"""SAM 2.1's tracking step: one object on one frame, given the object's memory bank.

What Meta's ``SAM2Base.track_step`` does at inference, for mask prompts and forward tracking, over a
:class:`sam.sam2.model.Sam2Model` (its image encoder, decoding steps, memory attention and encoder, and
the parameters ``maskmem_tpos_enc`` / ``no_obj_embed_spatial`` / ``obj_ptr_tpos_proj``):

* a frame with a mask (a conditioning frame) outputs the mask itself (logits +-10) and gets its object
  pointer from the decoder prompted with the mask on the frame's plain features;
* any other frame's features first attend to the memory: the conditioning frames' memories, the last
  ``num_maskmem - 1`` frames' memories (each with its learned time encoding) and the object pointers of
  the conditioning frames and of the last 15 frames (with a sine encoding of how far back they are);
  the decoder then gives three masks and the one with the best predicted IoU is kept;
* the frame's mask is then encoded into a memory (binarised on conditioning frames, as Meta's video
  predictor is built; a learned "no object" vector is added where the object score says it is absent).

The settings are SAM 2.1's (all four sizes share them). Memories are stored in bfloat16, as Meta's video
predictor stores them, so that the outputs stay the same. Left out, as SAM 2.1's config leaves them off or
they do not arise here: the non-overlap constraint between objects (each object is tracked on its own),
memory strides other than 1, reverse tracking, and click prompts on a tracked frame (a click becomes a
mask with the image predictor first; the first frame of an object is always given by a mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from sam.sam2.model import Sam2Model

HoleFilling = Optional[Callable[[torch.Tensor], torch.Tensor]]  # low-res logits -> the same, holes filled

__all__ = ["FrameFeatures", "MemoryBank", "MemoryEntry", "StepOutput", "TrackerSettings", "Sam2Tracker",
           "select_conditioning_frames", "sine_time_encoding"]


@dataclass(frozen=True)
class TrackerSettings:
    """SAM 2.1's tracking settings (Meta's config names in brackets).

    max_object_pointers [max_obj_ptrs_in_encoder]: pointers of the current frame's last N - 1 frames.
    max_conditioning_frames [max_cond_frames_in_attn]: conditioning frames attended to (None: all, SAM 2.1).
    binarize_conditioning_memory [binarize_mask_from_pts_for_mem_enc]: on, as Meta's video predictor builds it.
    """

    memory_scale: float = 20.0  # sigmoid_scale_for_mem_enc
    memory_bias: float = -10.0  # sigmoid_bias_for_mem_enc
    max_object_pointers: int = 16
    max_conditioning_frames: Optional[int] = None
    binarize_conditioning_memory: bool = True

    @classmethod
    def of_model(cls, model: Sam2Model, max_conditioning_frames: Optional[int] = None) -> "TrackerSettings":
        """The settings of `model`'s config, with a bound on the conditioning frames where one is given."""
        config = model.config
        if max_conditioning_frames is None and config.max_cond_frames_in_attn >= 0:
            max_conditioning_frames = config.max_cond_frames_in_attn
        return cls(memory_scale=config.sigmoid_scale_for_mem_enc, memory_bias=config.sigmoid_bias_for_mem_enc,
                   max_object_pointers=config.max_obj_ptrs_in_encoder, max_conditioning_frames=max_conditioning_frames,
                   binarize_conditioning_memory=config.binarize_mask_from_pts_for_mem_enc)


@dataclass
class FrameFeatures:
    """One frame's image features: the stride-16 embedding and its position encoding (1, 256, h, w),
    and the decoder's high-resolution features [(1, 32, 4h, 4w), (1, 64, 2h, 2w)]."""

    embedding: torch.Tensor
    position: torch.Tensor
    high_res: List[torch.Tensor]


@dataclass
class MemoryEntry:
    """What one frame leaves for later frames: its memory (1, 64, h, w) bfloat16, or None once it is too
    old to be attended to, its object pointer (1, 256) and its object-score logit (1, 1)."""

    features: Optional[torch.Tensor]
    object_pointer: torch.Tensor
    object_score: torch.Tensor


@dataclass
class StepOutput:
    """A tracking step's result: low-resolution mask logits (1, 1, S/4, S/4), object-score logit (1, 1),
    and the frame's memory entry."""

    low_res_logits: torch.Tensor
    object_score: torch.Tensor
    memory: MemoryEntry


@dataclass
class MemoryBank:
    """One object's memory, keyed by the frame's position in the stream (0, 1, 2, ... per processed frame).

    Conditioning frames (given a mask) are kept; other frames only while a later frame can use them.
    """

    conditioning: Dict[int, MemoryEntry] = field(default_factory=dict)
    recent: Dict[int, MemoryEntry] = field(default_factory=dict)

    def add(self, position: int, entry: MemoryEntry, conditioning: bool) -> None:
        (self.conditioning if conditioning else self.recent)[position] = entry
        if conditioning:
            self.recent.pop(position, None)

    def forget_before(self, next_position: int, num_maskmem: int, settings: TrackerSettings) -> None:
        """Drop what frame `next_position` and later ones can no longer use: memories older than
        num_maskmem - 1 frames, pointers older than max_object_pointers - 1 frames, and conditioning
        frames beyond the most recent max_conditioning_frames once they are out of both windows."""
        oldest_memory = next_position - (num_maskmem - 1)
        oldest_pointer = next_position - (settings.max_object_pointers - 1)
        for position in [p for p in self.recent if p < oldest_pointer]:
            del self.recent[position]
        for position, entry in self.recent.items():
            if position < oldest_memory:
                entry.features = None
        keep = settings.max_conditioning_frames
        if keep is not None and len(self.conditioning) > keep:
            newest = sorted(self.conditioning)[-keep:]
            for position in list(self.conditioning):
                if position not in newest and position < min(oldest_memory, oldest_pointer):
                    del self.conditioning[position]

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor the bank holds (to check that it stays bounded)."""
        held = []
        for entry in list(self.conditioning.values()) + list(self.recent.values()):
            held += [t for t in (entry.features, entry.object_pointer, entry.object_score) if t is not None]
        return held


def select_conditioning_frames(position: int, conditioning: Dict[int, MemoryEntry], limit: Optional[int]):
    """Meta's choice of conditioning frames to attend to: all, or the closest before, the closest after,
    then the temporally closest, up to `limit`. Returns (selected, unselected) dicts."""
    if limit is None or limit < 0 or len(conditioning) <= limit:
        return dict(conditioning), {}
    selected = {}
    before = max((t for t in conditioning if t < position), default=None)
    after = min((t for t in conditioning if t >= position), default=None)
    for t in (before, after):
        if t is not None:
            selected[t] = conditioning[t]
    rest = sorted((t for t in conditioning if t not in selected), key=lambda t: abs(t - position))
    selected.update((t, conditioning[t]) for t in rest[: limit - len(selected)])
    return selected, {t: e for t, e in conditioning.items() if t not in selected}


def sine_time_encoding(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """positions (N,) float -> (N, dim): sines of dim / 2 frequencies, then their cosines."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=positions.device)
    frequencies = temperature ** (2 * (steps // 2) / half)
    angles = positions.unsqueeze(-1) / frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Sam2Tracker:
    """The tracking step over a SAM 2.1 model; holds no per-video state (that is the MemoryBank)."""

    def __init__(self, model: Sam2Model, settings: Optional[TrackerSettings] = None) -> None:
        self.model = model
        self.settings = TrackerSettings.of_model(model) if settings is None else settings
        self.num_maskmem = int(model.maskmem_tpos_enc.shape[0])
        self.hidden_dim = int(model.no_obj_ptr.shape[-1])
        self.memory_dim = int(model.maskmem_tpos_enc.shape[-1])
        self.image_size = int(model.image_size)
        self._memory_position: Optional[torch.Tensor] = None

    # image features and the decoder (the model's own steps) ----------------------------------------
    def encode_image(self, image: torch.Tensor) -> FrameFeatures:
        """Normalised image (1, 3, S, S) -> its features (Meta's forward_image)."""
        encoded = self.model.forward_image(image)
        levels = encoded["backbone_fpn"]
        return FrameFeatures(embedding=levels[-1], position=encoded["vision_pos_enc"][-1], high_res=list(levels[:-1]))

    def mask_step(self, frame: FrameFeatures, mask: torch.Tensor, fill_holes: HoleFilling = None) -> StepOutput:
        """A conditioning frame: mask (1, 1, S, S) binary float at the model's input size."""
        heads = self.model.use_mask_as_output(frame.embedding, frame.high_res, mask)
        low_res, score = heads.low_res_masks, heads.object_score_logits
        if fill_holes is not None:
            low_res = fill_holes(low_res)
        # Meta's predictor encodes the conditioning memory from the low-resolution mask, upsampled back
        upsampled = F.interpolate(low_res, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        memory = self.encode_memory(frame, upsampled, score, binarize=self.settings.binarize_conditioning_memory)
        return StepOutput(low_res, score, MemoryEntry(memory, heads.obj_ptr, score))

    def track_step(self, frame: FrameFeatures, position: int, bank: MemoryBank,
                   video_length: Optional[int] = None, fill_holes: HoleFilling = None) -> StepOutput:
        """A frame without a prompt, at `position` in the stream, conditioned on `bank`: the best of three
        masks (by predicted IoU)."""
        embedding = self.condition_on_memory(frame, position, bank, video_length)
        heads = self.model.forward_sam_heads(embedding, high_res_features=frame.high_res, multimask_output=True)
        score = heads.object_score_logits
        memory = self.encode_memory(frame, heads.high_res_masks, score, binarize=False)
        low_res = heads.low_res_masks if fill_holes is None else fill_holes(heads.low_res_masks)
        return StepOutput(low_res, score, MemoryEntry(memory, heads.obj_ptr, score))

    # memory ----------------------------------------------------------------------------------------
    def encode_memory(self, frame: FrameFeatures, high_res_logits: torch.Tensor, object_score: torch.Tensor,
                      binarize: bool) -> torch.Tensor:
        """The frame's memory (1, 64, h, w) bfloat16 from its plain features and mask logits (1, 1, S, S)."""
        mask = (high_res_logits > 0).float() if binarize else torch.sigmoid(high_res_logits)
        mask = mask * self.settings.memory_scale + self.settings.memory_bias
        features, position = self.model.memory_encoder(frame.embedding, mask)
        if self._memory_position is None or self._memory_position.shape != position.shape:
            self._memory_position = position[0:1].clone()
        no_object_embedding = getattr(self.model, "no_obj_embed_spatial", None)
        if no_object_embedding is not None:
            absent = 1 - (object_score > 0).float()
            features = features + absent[..., None, None] * no_object_embedding[..., None, None]
        return features.to(torch.bfloat16)

    def _memory_tokens(self, entry: MemoryEntry, time_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A memory as tokens (1, h*w, 64) and their position encoding with the time encoding added."""
        tokens = entry.features.float().flatten(2).transpose(1, 2)
        position = self._memory_position.to(tokens.device).flatten(2).transpose(1, 2)
        return tokens, position + self.model.maskmem_tpos_enc[time_index].reshape(1, 1, -1)

    def condition_on_memory(self, frame: FrameFeatures, position: int, bank: MemoryBank,
                            video_length: Optional[int] = None) -> torch.Tensor:
        """The frame's embedding after attending to the memory bank: (1, 256, h, w).

        `video_length` (when known) caps the pointer window as Meta's predictor does with the video's
        frame count; a stream of unknown length uses the full window.
        """
        if not bank.conditioning:
            raise ValueError("track_step needs a conditioning frame (a mask) in the memory bank first")
        selected, unselected = select_conditioning_frames(position, bank.conditioning, self.settings.max_conditioning_frames)
        memories, positions = [], []
        for entry in selected.values():
            tokens, pos = self._memory_tokens(entry, self.num_maskmem - 1)
            memories.append(tokens)
            positions.append(pos)
        for time_position in range(1, self.num_maskmem):
            back = self.num_maskmem - time_position
            entry = bank.recent.get(position - back, unselected.get(position - back))
            if entry is None or entry.features is None:
                continue
            tokens, pos = self._memory_tokens(entry, self.num_maskmem - time_position - 1)
            memories.append(tokens)
            positions.append(pos)
        pointer_tokens, pointer_positions = self._pointer_tokens(position, selected, unselected, bank, video_length)
        memories.append(pointer_tokens)
        positions.append(pointer_positions)
        _, channels, height, width = frame.embedding.shape
        current = frame.embedding.flatten(2).transpose(1, 2)
        current_pos = frame.position.flatten(2).transpose(1, 2)
        conditioned = self.model.memory_attention(current, current_pos, torch.cat(memories, dim=1),
                                                  torch.cat(positions, dim=1),
                                                  num_object_pointer_tokens=pointer_tokens.shape[1])
        return conditioned.transpose(1, 2).reshape(1, channels, height, width)

    def _pointer_tokens(self, position: int, selected: Dict[int, MemoryEntry], unselected: Dict[int, MemoryEntry],
                        bank: MemoryBank, video_length: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Object pointers as memory tokens (1, 4 N, 64) (each 256-vector split in four) and positions."""
        window = self.settings.max_object_pointers
        if video_length is not None:
            window = min(video_length, window)
        offsets_and_pointers = [(position - t, entry.object_pointer) for t, entry in selected.items() if t <= position]
        for back in range(1, window):
            t = position - back
            if t < 0:
                break
            entry = bank.recent.get(t, unselected.get(t))
            if entry is not None:
                offsets_and_pointers.append((back, entry.object_pointer))
        offsets, pointers = zip(*offsets_and_pointers)
        pointers = torch.stack(pointers, dim=0)  # (N, 1, 256)
        device = pointers.device
        relative = torch.tensor(offsets, device=device) / max(window - 1, 1)
        time_code = self.model.obj_ptr_tpos_proj(sine_time_encoding(relative, self.hidden_dim))  # (N, 64)
        split = self.hidden_dim // self.memory_dim
        tokens = pointers.reshape(-1, 1, split, self.memory_dim).permute(1, 0, 2, 3).reshape(1, -1, self.memory_dim)
        return tokens, time_code.repeat_interleave(split, dim=0).unsqueeze(0)
