"""GF-SAM's graph steps (Zhang et al., NeurIPS 2024): from one SAM mask per prompt point to the
kept masks.

    masks_on_grid         each point's mask sampled on the DINOv2 patch grid (nearest, bilinear)
    point_mask_graph      edge i -> j where mask i covers point j's cell
    weak_components       the graph's weakly connected components: the candidate objects
    grow_masks            per component, masks added best first while they add more positive
                          than negative area ("mask growth")
    point_consistency     per point, is the component it belongs to the one whose region is most
                          similar to it (distance-weighted)? majority vote per component
    select_masks          the masks to keep: consistent and grown (label 1), else one fallback

Each works on small tensors (n points, a gh x gw grid of about 37 x 37 cells); the official
code's quirks that change results are kept and named where they happen ("quirk:"), so that the
published numbers carry over. tests/method/test_gfsam_parity.py checks the whole against the
official class.
"""

from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# the label point_consistency gives each prompt point (the official code's 0 / 1 / 2)
DROPPED, KEPT, CANDIDATE = 0, 1, 2


def masks_on_grid(masks: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masks n x h x w (bool, SAM's input frame) -> (nearest n x gh x gw bool, bilinear n x gh x gw float).

    Nearest sampling builds the graph; the bilinear values (align_corners=False, no antialias: a
    2 x 2 neighbourhood per cell, as the official code downsamples) weigh areas on the grid.
    """
    as_float = masks[:, None].float()
    nearest = F.interpolate(as_float, grid, mode="nearest")[:, 0] > 0
    bilinear = F.interpolate(as_float, grid, mode="bilinear", align_corners=False)[:, 0]
    return nearest, bilinear


def point_mask_graph(nearest: torch.Tensor, cells: np.ndarray) -> np.ndarray:
    """Adjacency n x n (bool): [i, j] where mask i (nearest grid n x gh x gw) covers point j's cell.

    cells: n x 2 (column, row) grid cells of the points, in the order of the masks.
    """
    columns = torch.as_tensor(cells[:, 0], dtype=torch.long)
    rows = torch.as_tensor(cells[:, 1], dtype=torch.long)
    return nearest[:, rows, columns].cpu().numpy()


def weak_components(adjacency: np.ndarray) -> Tuple[int, np.ndarray]:
    """(count, label per point) of the directed graph's weakly connected components, numbered in
    the order of each component's first point (as scipy's ``connected_components``, the original's
    call, numbers them: the numbering breaks ties later)."""
    count = len(adjacency)
    linked = adjacency | adjacency.T | np.eye(count, dtype=bool)
    labels = np.arange(count)
    while True:  # each point takes the smallest label among its neighbours until none changes
        spread = np.where(linked, labels[None, :], count).min(axis=1)
        if np.array_equal(spread, labels):
            break
        labels = spread
    firsts, numbered = np.unique(labels, return_inverse=True)
    return len(firsts), numbered.astype(np.int64)


def grow_masks(bilinear: torch.Tensor, labels: np.ndarray, count: int, positive_score: torch.Tensor,
               positive_region: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask growth per component -> (grown n bool, last score n float).

    bilinear: n x gh x gw masks on the grid; positive_score gh x gw (the official
    ``mean_sim_map**2 - neg_mean_sim_map * half``) ranks each component's masks by their mean
    score; positive_region gh x gw (score > 0) decides. Best first, the part of a mask outside the
    masks already grown joins (grown) when it covers more positive than negative area.
    Quirk: a component's "last score" (the official ``cls_scores``, used only by the fallback in
    select_masks) is positive minus negative area of the LAST mask tried, not of the best one.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    grown = torch.zeros(len(labels), dtype=torch.bool)
    last_score = torch.zeros(len(labels), dtype=torch.float32)
    region = positive_region.float()[None]
    score_map = positive_score[None, None]
    for component in range(count):
        members = torch.where(labels_t == component)[0]
        masks = bilinear[members][:, None]  # k x 1 x gh x gw
        mean_scores = (masks * score_map).sum(dim=(-1, -2, -3)) / (masks.sum(dim=(-1, -2, -3)) + 1e-6)
        inner = torch.zeros_like(region)
        for index in mean_scores.argsort(descending=True):
            added = masks[index] * (1 - inner)
            positive = (region * added).sum()
            negative = ((1 - region) * added).sum()
            if positive > negative:
                inner += added
                grown[members[index]] = True
        last_score[members] = positive - negative
    return grown, last_score


def component_unions(masks: torch.Tensor, labels: np.ndarray, count: int, grid: Tuple[int, int]) -> torch.Tensor:
    """Each component's union of masks (n x h x w bool) on the grid: count x gh x gw float
    (bilinear, align_corners=False, from the full-resolution union)."""
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=masks.device)
    unions = torch.stack([masks[labels_t == c].any(dim=0) for c in range(count)])
    return F.interpolate(unions[:, None].float(), grid, mode="bilinear", align_corners=False)[:, 0].cpu()


def region_similarity(self_similarity: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Each token's mean similarity to a region's tokens: regions k x gh x gw (weights) -> k x N.

    self_similarity: N x N cosine similarities of the target's tokens (token_similarity).
    As the official prior: the weighted mean over all N tokens, divided by the weights' mean.
    """
    count = self_similarity.shape[0]
    rows = []
    for region in regions.flatten(1):
        weighted = self_similarity * region[:, None]
        rows.append(weighted.mean(0) / (region.sum() / count + 1e-7))
    return torch.stack(rows)


def point_consistency(self_similarity: torch.Tensor, unions: torch.Tensor, cells: np.ndarray, labels: np.ndarray,
                      count: int, grown: torch.Tensor) -> np.ndarray:
    """Label each point KEPT (1), CANDIDATE (2) or DROPPED (0) -> n int64.

    A point is consistent when, among the components, the one most similar to it (the mean
    similarity of its union region at the point's cell, divided by the grid distance from the
    point to the component's nearest point, a distance of 0 counted as 1) is its own; a component
    where fewer than half of the points are consistent has none. KEPT: consistent and grown;
    CANDIDATE: one of the two; DROPPED: neither.
    """
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    cells_t = torch.as_tensor(cells, dtype=torch.long)
    similarity = region_similarity(self_similarity, unions)  # count x N
    width = unions.shape[-1]
    at_points = similarity[:, cells_t[:, 1] * width + cells_t[:, 0]]  # count x n
    distance = torch.cdist(cells_t.float(), cells_t.float())  # n x n, in cells
    to_component = torch.stack([distance[:, labels_t == c].min(dim=1).values for c in range(count)])
    to_component[to_component == 0] = 1
    nearest_component = (at_points / to_component).max(dim=0).indices
    consistent = (nearest_component == labels_t).long()
    for component in range(count):
        members = torch.where(labels_t == component)[0]
        agreeing = consistent[members].sum()
        if agreeing < len(members) - agreeing:
            consistent[members] = 0
    grown_t = grown.long()
    point_labels = ((consistent + grown_t) > 0).long() * CANDIDATE
    point_labels[(consistent * grown_t) > 0] = KEPT
    return point_labels.numpy()


def select_masks(point_labels: np.ndarray, last_score: torch.Tensor, nonempty: np.ndarray) -> List[int]:
    """Indices of the masks to keep: every KEPT point's; when there is none, or their masks are all
    empty (nonempty: n bool), the one mask of the highest last score among CANDIDATE points.

    Quirk: the official fallback sets the other points' scores to 0 before its argmax, so where
    every candidate scores below 0 (or there is no candidate) it takes the first non-candidate
    point with score 0 instead; kept, since it decides the mask the published numbers count.
    """
    kept = [int(i) for i in np.flatnonzero(point_labels == KEPT)]
    if any(nonempty[i] for i in kept):
        return kept
    scores = last_score.clone()
    scores[torch.as_tensor(point_labels != CANDIDATE)] = 0
    return [int(scores.max(dim=0).indices)]
