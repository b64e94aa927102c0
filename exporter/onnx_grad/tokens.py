"""A vision transformer's explained tensor: the token grid of its last attention block.

ViT and DeiT classify from the class token of the last block's output, so the patch
tokens of that output carry no gradient. The tensor explained is the one the last
attention reads (its LayerNorm's output, pytorch-grad-cam's `blocks[-1].norm1`):
the last token tensor [N, T, C] that both the queries and the keys of the last
attention come from. Its patch tokens are laid back on the patch grid (class,
distillation and register tokens dropped), the grid read from the patch embedding's
4-D output, where the tokens come from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from exporter.errors import ExportError
from exporter.onnx_grad.graph import GraphInfo, attr_int

MAX_EXTRA_TOKENS = 8  # class, distillation and register tokens beside the patches
Reach = Callable[[GraphInfo, str], set[str]]


@dataclass(frozen=True)
class TokenGrid:
    """Where the patch tokens lie in a token tensor [N, T, C]: `height` x `width` of
    them in row-major order from token `offset`."""

    offset: int
    height: int
    width: int

    @property
    def count(self) -> int:
        return self.height * self.width

    def to_tokens(self, grid: np.ndarray, tokens: int) -> np.ndarray:
        """A grid [N, h, w, C] back in a token tensor [N, T, C], zeros elsewhere."""
        out = np.zeros((grid.shape[0], tokens, grid.shape[-1]), grid.dtype)
        out[:, self.offset:self.offset + self.count] = grid.reshape(grid.shape[0], self.count, -1)
        return out


def last_attention(info: GraphInfo, relevant: set[str],
                   live_inputs: Callable[[onnx.NodeProto], list[str]]) -> onnx.NodeProto | None:
    """The scores MatMul (q kᵀ) of the last attention on the image -> score path: a
    MatMul of two image-dependent operands that a Softmax over a rank >= 3 tensor
    reads, through scaling, bias and mask arithmetic."""
    for node in reversed(info.nodes):
        if node.op_type != "Softmax" or node.output[0] not in relevant:
            continue
        if len(info.shapes.get(node.input[0], [])) < 3:
            continue
        tensor = node.input[0]
        for _ in range(8):
            producer = info.producer.get(tensor)
            if producer is None:
                break
            live = [i for i in live_inputs(producer) if i in relevant]
            if producer.op_type == "MatMul" and len(live) == 2:
                return producer
            if len(live) != 1:
                break
            tensor = live[0]
    return None


def attention_input(info: GraphInfo, scores: onnx.NodeProto, relevant: set[str],
                    backward_reach: Reach, width: int | None) -> str:
    """The last token tensor [N, T, C] both operands of `scores` come from, C the token
    width (the patch embedding's channels) where known, else a LayerNorm's output."""
    common = (backward_reach(info, scores.input[0]) & backward_reach(info, scores.input[1])
              & relevant)
    order = {o: i for i, n in enumerate(info.nodes) for o in n.output}
    tokens = [t for t in common if _is_tokens(info.shapes.get(t))]
    if width is not None:
        tokens = [t for t in tokens if info.shapes[t][2] == width]
    else:
        normed = [t for t in tokens if t in info.producer
                  and info.producer[t].op_type == "LayerNormalization"]
        tokens = normed or tokens
    if not tokens:
        raise ExportError("the last attention's queries and keys come from no token tensor "
                          "[N, T, C]: name the tensor to explain with --layer")
    return max(tokens, key=lambda t: order.get(t, -1))


def _is_tokens(shape: list[int | None] | None) -> bool:
    return shape is not None and len(shape) == 3 and shape[0] is None and shape[1] is not None


def token_grid(info: GraphInfo, tokens: str, patches: tuple[str, int, int] | None,
               relevant: set[str], forward_reach: Reach) -> TokenGrid:
    """Where the patch tokens of `tokens` lie. `patches`: the patch embedding's 4-D
    output and its grid (h, w), if the model has one before the tokens."""
    shape = info.shapes.get(tokens)
    if not _is_tokens(shape):
        raise ExportError(f"tensor {tokens!r} has shape {shape}: a token tensor [N, T, C] "
                          "(batch first) is expected")
    assert shape is not None and shape[1] is not None
    total = int(shape[1])
    if patches is not None:
        _, h, w = patches
    else:  # no patch embedding seen: a square grid and a few extra tokens
        h = w = int(np.sqrt(total))
    extra = total - h * w
    if not 0 <= extra <= MAX_EXTRA_TOKENS:
        raise ExportError(f"tensor {tokens!r} has {total} tokens: not a {h}x{w} patch grid and "
                          f"at most {MAX_EXTRA_TOKENS} class/register tokens")
    if extra == 0:
        return TokenGrid(0, h, w)
    offset = _patch_offset(info, tokens, patches[0] if patches else None, total, relevant,
                           forward_reach)
    if offset is None:
        raise ExportError(f"cannot tell where the {h * w} patch tokens lie among the {total} "
                          f"of {tokens!r}: no concatenation of class and patch tokens found")
    return TokenGrid(offset, h, w)


def _patch_offset(info: GraphInfo, tokens: str, patch_map: str | None, total: int,
                  relevant: set[str], forward_reach: Reach) -> int | None:
    """The token index the patches start at, from the Concat that put the class
    (distillation, register) tokens beside them: the tokens of its inputs before the
    one that carries the image."""
    from_patches = forward_reach(info, patch_map) if patch_map else relevant
    for node in info.nodes:
        out = node.output[0] if node.output else ""
        shape = info.shapes.get(out)
        if node.op_type != "Concat" or out not in relevant or not _is_tokens(shape):
            continue
        assert shape is not None
        if attr_int(node, "axis", 0) % 3 != 1 or shape[1] != total:
            continue
        offset = 0
        for inp in node.input:
            if inp in from_patches:
                return offset
            size = info.shapes.get(inp, [None, None])[1]
            if size is None:
                return None
            offset += int(size)
    return None
