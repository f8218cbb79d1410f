"""
Weight-only quantization for inference: every linear layer's and every routed expert's weights
stored in 8 or 4 bits, multiplied in the compute dtype after dequantizing (so memory, not time,
is what it saves; a fused low-bit matmul would be the fast path).

  int8: per output channel, symmetric:   q = round(w / s),  s = max |w_row| / 127,   w ~ q s
  int4: per group of group_size inputs:  q = round(w / s) in [-7, 7],  s = max |w_group| / 7,
        stored as q + 8, two 4-bit values packed in each byte (symmetric: 0, that is -8, is unused);
        where group_size does not divide a row, the whole row is one group

    quantize_model(model, 'int8')        # in place: nn.Linear -> QuantLinear, Experts -> QuantExperts
    python quantize.py --out_dir=out/sft --quantize=int4 --save_dir=out/sft_int4

Embeddings, norms and the router stay in their dtype (small, and the router decides which experts
run); a head tied to the embedding stays too. checkpoint.load_model(..., quantize=) quantizes at
load time, and a checkpoint saved quantized (its 'quantized' entry) loads quantized again.
A format of your own: the quantized weights are integer buffers, which model.to(torch.bfloat16)
(sample.py, serve.py) leaves alone; a floating-point one (fp8) would be cast unless its module lists
it in `float32_buffers` (GPT._apply keeps those buffers' dtype). Formats are keyed by bit count here
(BITS), so a second 8-bit format needs its own branches, not 8.
"""

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Experts

BITS = {'int8': 8, 'int4': 4}


def group_of(in_features, group_size):
    """The int4 group: group_size inputs, or the whole row where it does not divide the row."""
    return group_size if in_features % group_size == 0 else in_features


def quantize_weight(w, bits, group_size=128):
    """w (..., out, in) -> (q, scale): int8 q (..., out, in) with scale (..., out, 1); int4 q
    uint8 (..., out, in / 2), two values a byte, with scale (..., out, in / group)."""
    w = w.float()
    if bits == 8:
        scale = w.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
        return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale
    g = group_of(w.size(-1), group_size)
    groups = w.unflatten(-1, (-1, g))                                          # (..., out, in/g, g)
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7
    q = (torch.round(groups / scale).clamp(-8, 7) + 8).to(torch.uint8).flatten(-2)   # [0, 15]
    return q[..., 0::2] | (q[..., 1::2] << 4), scale.squeeze(-1)


def dequantize_weight(q, scale, bits, dtype):
    """The inverse of quantize_weight, in dtype."""
    if bits == 8:
        return (q.float() * scale).to(dtype)
    low, high = (q & 15).int() - 8, (q >> 4).int() - 8
    w = torch.stack([low, high], -1).flatten(-2).float()                      # (..., out, in)
    g = w.size(-1) // scale.size(-1)
    return (w.unflatten(-1, (-1, g)) * scale[..., None]).flatten(-2).to(dtype)


class QuantLinear(nn.Module):
    """nn.Linear with its weight stored quantized; .weight dequantizes it (model.py reads it in
    MLA's absorbed attention and in the fused projections)."""

    def __init__(self, in_features, out_features, bias, bits, group_size, dtype):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        q_shape = (out_features, in_features if bits == 8 else in_features // 2)
        s_shape = (out_features, 1 if bits == 8 else in_features // group_of(in_features, group_size))
        self.register_buffer('qweight', torch.zeros(q_shape, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer('scale', torch.zeros(s_shape, dtype=dtype))    # the compute dtype: follows model.to()
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @property
    def weight(self):
        return dequantize_weight(self.qweight, self.scale, self.bits, self.scale.dtype)

    def quantized_numel(self):
        """The weights it stands for (its buffers are not parameters: GPT.num_params adds these)."""
        return self.out_features * self.in_features

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantExperts(nn.Module):
    """Experts with the three (E, out, in) stacks stored quantized; gate_proj, up_proj and
    down_proj dequantize them, one MoE layer at a time, for model.py's and fast_paths.py's paths."""

    def __init__(self, E, C, I, bits, group_size, dtype):
        super().__init__()
        self.bits = bits
        for name, (out, inp) in (('gate_proj', (I, C)), ('up_proj', (I, C)), ('down_proj', (C, I))):
            q = torch.zeros(E, out, inp if bits == 8 else inp // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
            s = torch.zeros(E, out, 1 if bits == 8 else inp // group_of(inp, group_size), dtype=dtype)
            self.register_buffer(f'{name}_q', q)
            self.register_buffer(f'{name}_scale', s)

    def stack(self, name):
        scale = getattr(self, f'{name}_scale')
        return dequantize_weight(getattr(self, f'{name}_q'), scale, self.bits, scale.dtype)

    def gathered(self, name, indices):
        """stack(name)[indices], dequantizing only the experts indexed: a decoding token reads K of
        the E experts, and dequantizing all E at every step cost more than the matmuls."""
        scale = getattr(self, f'{name}_scale')
        return dequantize_weight(getattr(self, f'{name}_q')[indices], scale[indices], self.bits, scale.dtype)

    def quantized_numel(self):
        """The weights it stands for, the three (E, out, in) stacks (two int4 values a byte; its
        buffers are not parameters: GPT.num_params adds these)."""
        return sum(getattr(self, f'{name}_q').numel() * (1 if self.bits == 8 else 2)
                   for name in ('gate_proj', 'up_proj', 'down_proj'))

    gate_proj = property(lambda self: self.stack('gate_proj'))
    up_proj = property(lambda self: self.stack('up_proj'))
    down_proj = property(lambda self: self.stack('down_proj'))
    def forward(self, x, weights, indices):
        """The loop reference over the stacks dequantized once."""
        stacks = SimpleNamespace(gate_proj=self.gate_proj, up_proj=self.up_proj, down_proj=self.down_proj)
        return Experts.forward(stacks, x, weights, indices)


def quantize_model(model, kind, group_size=128, weights=True):
    """Replace, in place, every nn.Linear (the head too unless tied to the embedding) and every
    Experts of `model` by its quantized form, filled from the current weights (weights=False:
    empty, for loading a quantized state dict). Returns the model."""
    if getattr(model, 'quantized', None):   # its layers are QuantLinear already: they would keep their format
        raise ValueError(f"the model is quantized already ({model.quantized['kind']}); quantize its "
                         f"full-precision weights")
    bits = BITS[kind]
    tied = model.config.tie_word_embeddings
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not (tied and child is model.lm_head):
                dtype = child.weight.dtype
                if bits == 4 and child.in_features % 2:
                    continue                             # an odd row cannot be packed: kept as it is
                new = QuantLinear(child.in_features, child.out_features, child.bias is not None, bits, group_size, dtype)
                if weights:
                    q, scale = quantize_weight(child.weight.detach(), bits, group_size)
                    new.qweight, new.scale = q, scale.to(dtype)
                    if child.bias is not None:
                        new.bias.data.copy_(child.bias.detach())
            elif isinstance(child, Experts):
                E, I, C = child.gate_proj.shape
                if bits == 4 and (I % 2 or C % 2):
                    continue                             # odd rows cannot be packed: kept as they are
                dtype = child.gate_proj.dtype
                new = QuantExperts(E, C, I, bits, group_size, dtype)
                if weights:
                    for stack in ('gate_proj', 'up_proj', 'down_proj'):
                        q, scale = quantize_weight(getattr(child, stack).detach(), bits, group_size)
                        setattr(new, f'{stack}_q', q)
                        setattr(new, f'{stack}_scale', scale.to(dtype))
            else:
                continue
            setattr(parent, name, new.to(next(child.parameters()).device))
    model.quantized = {'kind': kind, 'group_size': group_size}
    return model


def weight_bytes(model):
    """Bytes of the model's parameters and saved buffers as stored (quantized ones at their width):
    not the buffers a model computes again and does not save (RoPE and sinusoidal tables)."""
    saved = [b for m in model.modules() for name, b in m._buffers.items()
             if b is not None and name not in m._non_persistent_buffers_set]
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + saved)
