"""
The whole architecture in one file, every variant behind a ModelConfig flag:

  GPT-2 (learned positions, LayerNorm, GELU, tied head)  ->  Llama-style (RoPE, RMSNorm, SwiGLU,
  grouped-query attention)  ->  DeepSeek-V3 / Kimi-K2 (Multi-head Latent Attention, DeepSeekMoE
  with auxiliary-loss-free balancing, multi-token prediction).

Read top to bottom: config and presets, norms, positions (RoPE and its long-context scalings),
the KV cache, attention (MHA/GQA, then MLA), feed-forward (dense, then MoE), the block, the model
(with MTP), accounting, generation.
Shapes in comments: B batch, T new tokens, L keys in view (cached + new), H query heads,
Hkv key/value heads, D head dim, C model width (n_embd), V vocabulary, N = B*T tokens,
E routed experts, K experts per token, I expert width.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:                                     # the two hand-written kernels (the experts' SwiGLU backward,
    import triton                        # the loss's row pass) are Triton; the CPU build of
    import triton.language as tl         # PyTorch comes without it, and takes the same math in
    HAVE_TRITON = True                   # PyTorch instead
except ImportError:
    HAVE_TRITON = False


@dataclass
class ModelConfig:
    # --- the core, in nanoGPT's names; the defaults are GPT-2 124M -------------------------
    vocab_size: int = 50304            # GPT-2's 50,257 ids padded to a multiple of 64
    block_size: int = 1024             # longest sequence trained on; the generation window
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True                  # biases in linear layers and LayerNorm
    tie_word_embeddings: bool = True   # the output head shares the token embedding matrix
    init_std: float = 0.02
    # --- attention -------------------------------------------------------------------------
    attention: str = 'mha'             # 'mha' (multi-head; grouped-query via n_kv_head) | 'mla'
    n_kv_head: Optional[int] = None    # key/value heads: None = n_head (MHA), 1 = MQA, else GQA
    head_dim: Optional[int] = None     # None = n_embd // n_head
    # Multi-head Latent Attention (DeepSeek-V2/V3), in DeepSeek-V3's names
    q_lora_rank: Optional[int] = None  # queries through a rank-q_lora_rank bottleneck; None: direct
    kv_lora_rank: int = 512            # width of the compressed key/value latent (what is cached)
    qk_nope_head_dim: int = 128        # per-head query/key dims without position information
    qk_rope_head_dim: int = 64         # per-head query dims with RoPE; one shared RoPE key per token
    v_head_dim: int = 128
    # sliding-window attention: each query sees the last `sliding_window` tokens plus the first
    # `n_sink_tokens` of the sequence (attention sinks, Xiao et al. 2023); None: full causal
    sliding_window: Optional[int] = None
    n_sink_tokens: int = 0
    # --- positions -------------------------------------------------------------------------
    pos_emb: str = 'learned'           # 'learned' | 'sinusoidal' | 'rope' | 'none'
    rope_theta: float = 10000.0
    # None, or a dict as in DeepSeek-V3's config: {'type': 'linear' | 'dynamic' | 'yarn',
    # 'factor', 'original_max_position_embeddings', and for yarn 'beta_fast', 'beta_slow',
    # 'mscale', 'mscale_all_dim'}
    rope_scaling: Optional[dict] = None
    # --- norm and MLP ----------------------------------------------------------------------
    norm: str = 'layernorm'            # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5
    mlp: str = 'gelu'                  # 'gelu' | 'swiglu'
    intermediate_size: Optional[int] = None   # dense MLP width; None: 4C (gelu), 8/3 C (swiglu)
    # --- mixture of experts (DeepSeekMoE); 0 routed experts = a dense model -----------------
    n_routed_experts: int = 0
    n_shared_experts: int = 0          # always-on experts, each moe_intermediate_size wide
    num_experts_per_tok: int = 2       # K: routed experts per token
    moe_intermediate_size: Optional[int] = None   # expert width; None: ffn width / K
    scoring_func: str = 'softmax'      # 'softmax' (Mixtral) | 'sigmoid' (DeepSeek-V3)
    norm_topk_prob: bool = True        # renormalise the K selected weights to sum to 1
    routed_scaling_factor: float = 1.0 # ... then multiply them by this (DeepSeek-V3: 2.5)
    n_group: int = 1                   # group-limited routing: experts in n_group groups,
    topk_group: int = 1                # tokens may use experts of the best topk_group groups only
    first_k_dense_replace: int = 0     # the first k layers keep a dense MLP
    bias_update_speed: float = 0.0     # auxiliary-loss-free balancing step (DeepSeek-V3: 0.001)
    aux_loss_alpha: float = 0.0        # weight of the balance loss (DeepSeek-V3: 0.0001)
    seq_aux: bool = True               # balance per sequence (DeepSeek-V3) or per batch (Switch)
    moe_impl: str = 'auto'             # 'loop' (reference) | 'grouped' (sorted, grouped GEMM) |
                                       # 'gathered' (few tokens) | 'auto' (see MoE.forward)
    # --- the training loss -----------------------------------------------------------------
    loss_impl: str = 'auto'            # 'plain' (logits, then F.cross_entropy) | 'fused' (output
                                       # layer + loss in chunks, gradients in the forward:
                                       # linear_cross_entropy) | 'auto': fused on CUDA when the
                                       # logits are not returned (the training step)
    # --- multi-token prediction (DeepSeek-V3) ----------------------------------------------
    mtp_depth: int = 0                 # extra modules predicting tokens 2..mtp_depth+1 ahead
    mtp_loss_weight: float = 0.3       # lambda: loss = main + lambda / depth * sum of MTP losses

    def __post_init__(self):
        choices = {'attention': ('mha', 'mla'), 'pos_emb': ('learned', 'sinusoidal', 'rope', 'none'),
                   'norm': ('layernorm', 'rmsnorm'), 'mlp': ('gelu', 'swiglu'),
                   'scoring_func': ('softmax', 'sigmoid'), 'moe_impl': ('auto', 'loop', 'grouped', 'gathered'),
                   'loss_impl': ('auto', 'plain', 'fused')}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        for key in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f'ModelConfig.{key}={getattr(self, key)} must be positive')
        if self.attention == 'mha':
            if self.head_dim is None and self.n_embd % self.n_head:
                raise ValueError(f'n_embd={self.n_embd} is not divisible by n_head={self.n_head}; '
                                 f'set head_dim explicitly')
            if self.n_head % self.kv_heads:
                raise ValueError(f'n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}')
        else:
            if self.pos_emb != 'rope':
                raise ValueError("attention='mla' carries positions in its RoPE key: set pos_emb='rope'")
            if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim < 2:
                raise ValueError(f'qk_rope_head_dim={self.qk_rope_head_dim} must be even and positive')
        if self.pos_emb == 'rope' and self.rope_dim % 2:
            raise ValueError(f'RoPE needs an even head_dim, got {self.rope_dim}')
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get('type', self.rope_scaling.get('rope_type'))
            if kind not in ('linear', 'dynamic', 'yarn', 'default'):
                raise ValueError(f"rope_scaling type {kind!r}; valid: linear, dynamic, yarn")
            if kind != 'default' and not self.rope_scaling.get('factor', 0) > 0:
                raise ValueError(f'rope_scaling needs a positive factor, got {self.rope_scaling}')
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f'sliding_window={self.sliding_window} must be positive (or None)')
        if self.n_routed_experts:
            E, K = self.n_routed_experts, self.num_experts_per_tok
            if not 1 <= K <= E:
                raise ValueError(f'num_experts_per_tok={K} must be between 1 and n_routed_experts={E}')
            if E % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f'n_routed_experts={E} must split into n_group={self.n_group} groups, '
                                 f'and 1 <= topk_group={self.topk_group} <= n_group')
            if self.n_group > 1 and (E // self.n_group < 2 or K > self.topk_group * E // self.n_group):
                raise ValueError(f'group-limited routing needs >= 2 experts per group and K={K} <= '
                                 f'topk_group * experts per group')

    # derived sizes
    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def qk_head_dim(self):
        """Width of one head's query (and key) vector."""
        if self.attention == 'mla':
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim or self.n_embd // self.n_head

    @property
    def v_dim(self):
        return self.v_head_dim if self.attention == 'mla' else self.qk_head_dim

    @property
    def rope_dim(self):
        return self.qk_rope_head_dim if self.attention == 'mla' else self.qk_head_dim

    @property
    def ffn_size(self):
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == 'gelu':
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)   # SwiGLU: 2/3 of 4C, same FLOPs as GELU's

    @property
    def expert_size(self):
        return self.moe_intermediate_size or max(1, self.ffn_size // self.num_experts_per_tok)

    def is_moe_layer(self, layer_idx):
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Published architectures at their real sizes (build them on the meta device to count).
_DEEPSEEK_COMMON = dict(
    attention='mla', pos_emb='rope', norm='rmsnorm', norm_eps=1e-6, mlp='swiglu', bias=False,
    tie_word_embeddings=False, n_embd=7168, n_layer=61, intermediate_size=18432,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    moe_intermediate_size=2048, n_shared_experts=1, num_experts_per_tok=8, scoring_func='sigmoid',
    norm_topk_prob=True, bias_update_speed=0.001, aux_loss_alpha=0.0001, seq_aux=True)
PRESETS = {
    'gpt2': dict(),                                                   # GPT-2 124M (the defaults)
    'llama3_8b': dict(vocab_size=128256, block_size=8192, n_layer=32, n_head=32, n_kv_head=8,
                      n_embd=4096, intermediate_size=14336, pos_emb='rope', rope_theta=500000.0,
                      norm='rmsnorm', mlp='swiglu', bias=False, tie_word_embeddings=False),
    'mixtral_8x7b': dict(vocab_size=32000, block_size=32768, n_layer=32, n_head=32, n_kv_head=8,
                         n_embd=4096, pos_emb='rope', rope_theta=1e6, norm='rmsnorm', mlp='swiglu',
                         bias=False, tie_word_embeddings=False, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=14336, scoring_func='softmax',
                         aux_loss_alpha=0.02, seq_aux=False),
    'deepseek_v3': dict(_DEEPSEEK_COMMON, vocab_size=129280, block_size=163840, n_head=128,
                        n_routed_experts=256, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        first_k_dense_replace=3, mtp_depth=1, rope_theta=10000.0,
                        rope_scaling=dict(type='yarn', factor=40.0, original_max_position_embeddings=4096,
                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    'kimi_k2': dict(_DEEPSEEK_COMMON, vocab_size=163840, block_size=131072, n_head=64,
                    n_routed_experts=384, routed_scaling_factor=2.827, n_group=1, topk_group=1,
                    first_k_dense_replace=1, rope_theta=50000.0,
                    rope_scaling=dict(type='yarn', factor=32.0, original_max_position_embeddings=4096,
                                      beta_fast=1, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
}


# -----------------------------------------------------------------------------
# Norms

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight     (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def make_norm(config, dim):
    if config.norm == 'rmsnorm':
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


# -----------------------------------------------------------------------------
# Positions

def sinusoidal_table(n_pos, dim):
    """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)),  PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table


def yarn_get_mscale(scale, mscale=1.0):
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_scaling_type(config):
    s = config.rope_scaling or {}
    return s.get('type', s.get('rope_type', 'default'))


def yarn_inv_freq(dim, base, factor, original_max, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023), as DeepSeek-V3's Hugging Face code and transformers compute it.
    Frequency i keeps its original value where it turns more than beta_fast times over the
    original context (high frequencies: extrapolate), is divided by `factor` where it turns less
    than beta_slow times (low frequencies: interpolate), and blends linearly in between."""
    def correction_dim(n_rotations):      # the dim index whose wavelength fits n_rotations
        return dim * math.log(original_max / (n_rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001                     # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp                # 1: keep the original frequency
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate


def softmax_scale(config):
    """1/sqrt(D_qk), times YaRN's mscale(factor, mscale_all_dim)^2 when that is set (DeepSeek)."""
    scale = config.qk_head_dim ** -0.5
    s = config.rope_scaling or {}
    if rope_scaling_type(config) != 'default' and s.get('mscale_all_dim'):
        scale *= yarn_get_mscale(s['factor'], s['mscale_all_dim']) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate each pair (x_2i, x_2i+1) of a query or key at position p by
    the angle p * theta_i, theta_i = base^(-2i/d), so q.k depends only on the distance between
    positions. Pairs are adjacent (interleaved) as in the paper and DeepSeek's reference code.
    Long-context scalings of theta_i (rope_scaling):
      linear:  theta_i / factor                                  (position interpolation)
      dynamic: base' = base * (factor * L / L0 - (factor - 1))^(d / (d - 2)) once the sequence
               length L exceeds the original L0                  (dynamic NTK)
      yarn:    see yarn_inv_freq; cos and sin are also multiplied by
               mscale(factor, mscale) / mscale(factor, mscale_all_dim)"""
    float32_buffers = ('inv_freq',)      # kept by GPT._apply: bf16 would shift angles by radians

    def __init__(self, dim, config):
        super().__init__()
        self.dim, self.base = dim, config.rope_theta
        self.kind = rope_scaling_type(config)
        s = config.rope_scaling or {}
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.attention_factor = 1.0
        if self.kind == 'linear':
            inv_freq = inv_freq / s['factor']
        elif self.kind == 'dynamic':
            self.factor = s['factor']
            self.original_max = s.get('original_max_position_embeddings', config.block_size)
        elif self.kind == 'yarn':
            original = s.get('original_max_position_embeddings', config.block_size)
            inv_freq = yarn_inv_freq(dim, self.base, s['factor'], original,
                                     s.get('beta_fast') or 32, s.get('beta_slow') or 1)
            if s.get('attention_factor'):
                self.attention_factor = s['attention_factor']
            elif s.get('mscale') and s.get('mscale_all_dim'):
                self.attention_factor = (yarn_get_mscale(s['factor'], s['mscale'])
                                         / yarn_get_mscale(s['factor'], s['mscale_all_dim']))
            else:
                self.attention_factor = yarn_get_mscale(s['factor'])
        self.register_buffer('inv_freq', inv_freq, persistent=False)


    def forward(self, positions):
        """positions: (T,) or (B, T) integer positions -> cos, sin of shape (..., T, dim/2)."""
        inv_freq = self.inv_freq
        if self.kind == 'dynamic':       # the base grows with the longest position in view
            seq_len = (positions.max() + 1).float().clamp(min=self.original_max)
            base = self.base * (self.factor * seq_len / self.original_max - (self.factor - 1)) \
                ** (self.dim / (self.dim - 2))
            inv_freq = 1.0 / base ** (torch.arange(0, self.dim, 2, device=positions.device,
                                                   dtype=torch.float32) / self.dim)
        angles = positions.float()[..., None] * inv_freq           # p * theta_i
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (T, D/2) or (B, T, D/2).
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) for each adjacent pair."""
    if cos.dim() == 3:                                  # per-row positions: add the head axis
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def attention_mask(q_pos, k_pos, window=None, n_sink=0):
    """Boolean mask, True where query position q may see key position k:
    causal (k <= q), and with a window: q - k < window or k < n_sink (an attention sink)."""
    allowed = (k_pos[..., None, :] <= q_pos[..., :, None]) & (k_pos[..., None, :] >= 0)
    if window is not None:
        near = (q_pos[..., :, None] - k_pos[..., None, :]) < window
        allowed = allowed & (near | (k_pos[..., None, :] < n_sink))
    return allowed


# -----------------------------------------------------------------------------
# The KV cache

class KVCache:
    """Past keys and values (or MLA latents) for incremental decoding, one set per layer.

    Rows of a batch are left-padded to a common length: each row's positions start at 0 at its
    first real token, and padding is never attended to. Without a sliding window the cache holds
    `max_len` tokens. With one it is a rolling buffer of n_sink + window slots: the first n_sink
    tokens stay, the rest overwrite the oldest slot, so memory stays bounded however long
    generation runs (positions keep counting, exactly as the masked full attention sees them).

    Per forward pass: begin(T) -> (positions, mask); each layer calls update(); then end().

    static=True (no rolling window): every tensor keeps its shape from step to step, and where the
    next token goes is a device tensor (pos_t), not a Python number, so one decode step can be
    captured as a CUDA graph and replayed (see DecodeGraph). Attention then runs over all
    `capacity` slots with the empty ones masked out, which costs a little more per step and
    nothing in launches."""

    def __init__(self, batch_size, max_len, device, valid=None, window=None, n_sink=0, static=False):
        self.batch_size, self.device = batch_size, device
        self.window, self.n_sink = window, n_sink if window is not None else 0
        self.capacity = max_len if window is None else min(max_len, self.n_sink + window)
        self.rolling = window is not None and self.capacity < max_len
        if static and self.rolling:
            raise ValueError('a static KV cache cannot be a rolling buffer (sliding window shorter '
                             'than the generation); use static=False')
        self.static = static
        self.pos = 0                                   # tokens written so far (padded index)
        self.buffers = {}                              # (layer, name) -> preallocated tensor
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.padded = False
        # the row position of the token in each slot; -1 marks an empty slot or padding
        self.slot_pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)   # = pos, on the device
        self.reset(valid)

    def reset(self, valid=None):
        """Empty the cache for a new (B, P) prompt whose left padding `valid` marks (None: none),
        keeping every buffer where it is in memory (a captured CUDA graph still points there)."""
        self.pos = 0
        self.pos_t.zero_()
        self.slot_pos.fill_(-1)
        self.pad.zero_()
        self.padded = False
        if valid is not None:                          # (B, P) mask of a left-padded prompt
            self.pad.copy_((~valid).sum(1))
            self.padded = bool((~valid).any())

    def begin(self, T):
        """Plan the next T tokens: (positions (B, T), (attn_mask, is_causal)) for the layers."""
        if self.static:
            return self._begin_static(T)
        q_pos = self.pos + torch.arange(T, device=self.device)[None, :] - self.pad[:, None]
        self.q_pos = q_pos                             # negative: left padding
        fits = self.window is None or self.pos + T <= self.window
        if not self.padded and fits and not self.rolling:
            mask = (None, self.pos == 0) if (self.pos == 0 or T == 1) else self._mask(T)
        else:
            mask = self._mask(T)
        if self.rolling:                               # which new tokens land in which slot
            p = self.pos + torch.arange(T)
            slot = torch.where(p < self.n_sink, p, self.n_sink + (p - self.n_sink) % self.window)
            keep = (p < self.n_sink) | (p + self.window >= self.pos + T)   # not overwritten in this chunk
            self.src = torch.arange(T)[keep].to(self.device)
            self.dst = slot[keep].to(self.device)
        elif self.pos + T > self.capacity:
            raise RuntimeError(f'KV cache overflow: {self.pos} + {T} > capacity {self.capacity}')
        return q_pos.clamp(min=0), mask

    def _begin_static(self, T):
        """begin() from device tensors only: the new tokens go to slots pos_t .. pos_t + T - 1,
        and every slot is a key, masked unless it holds a token this query may see."""
        if self.pos + T > self.capacity:
            raise RuntimeError(f'KV cache overflow: {self.pos} + {T} > capacity {self.capacity}')
        self.dst = self.pos_t + torch.arange(T, device=self.device)                   # (T,) slots
        self.q_pos = self.dst[None, :] - self.pad[:, None]                            # (B, T)
        q_pos = self.q_pos.masked_fill(self.q_pos < 0, -1)
        k_pos = self.slot_pos.index_copy(1, self.dst, q_pos)                          # (B, capacity)
        allowed = attention_mask(self.q_pos, k_pos, self.window, self.n_sink)        # (B, T, capacity)
        itself = torch.arange(self.capacity, device=self.device) == self.dst[:, None]  # (T, capacity)
        return self.q_pos.clamp(min=0), ((allowed | itself)[:, None], False)        # padding sees itself

    def _mask(self, T):
        cached = self.slot_pos if self.rolling else self.slot_pos[:, :self.pos]
        k_pos = torch.cat([cached, self.q_pos.masked_fill(self.q_pos < 0, -1)], dim=1)   # (B, L)
        allowed = attention_mask(self.q_pos, k_pos, self.window, self.n_sink)          # (B, T, L)
        L0 = cached.size(1)                            # a padding query sees itself, not nothing
        eye = torch.zeros_like(allowed)
        eye[:, torch.arange(T), L0 + torch.arange(T)] = True
        return (allowed | eye)[:, None], False                                          # (B,1,T,L)

    def update(self, layer, name, x, dim):
        """Add x (T new entries along `dim`) to what is cached; return the entries in view."""
        key = (layer, name)
        if key not in self.buffers:
            shape = list(x.shape)
            shape[dim] = self.capacity
            self.buffers[key] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        buf, T = self.buffers[key], x.size(dim)
        if self.static:                                # write at pos_t, attend over every slot
            buf.index_copy_(dim, self.dst, x.to(buf.dtype))
            return buf
        if not self.rolling:
            buf.narrow(dim, self.pos, T).copy_(x)
            return buf.narrow(dim, 0, self.pos + T)
        view = torch.cat([buf, x.to(buf.dtype)], dim=dim)          # every slot, then the new ones
        buf.index_copy_(dim, self.dst, x.index_select(dim, self.src).to(buf.dtype))
        return view

    def end(self):
        T = self.q_pos.size(1)
        q_pos = self.q_pos.masked_fill(self.q_pos < 0, -1)
        if self.static:
            self.slot_pos.index_copy_(1, self.dst, q_pos)
            self.pos_t += T
        elif self.rolling:
            self.slot_pos[:, self.dst] = q_pos[:, self.src]
        else:
            self.slot_pos[:, self.pos:self.pos + T] = q_pos
        self.pos += T

    def numel_per_token(self):
        """Numbers cached per token per layer (e.g. kv_lora_rank + qk_rope_head_dim for MLA)."""
        per_layer = {}
        for (layer, name), buf in self.buffers.items():
            per_layer[layer] = per_layer.get(layer, 0) + buf.numel() // (self.batch_size * self.capacity)
        return per_layer


# -----------------------------------------------------------------------------
# Attention

class QKClipStats:
    """What QK-Clip (Kimi-K2 report, section 2.1) needs from an attention module: with
    `track_max_logit` on, each training forward records per head the largest pre-softmax logit
    max_{t,l} q_t . k_l * scale over the batch (the masked entries excluded) into `max_logit`;
    `rescale_qk_(gamma)` multiplies head h's logits by gamma[h] by rescaling its weights."""
    track_max_logit = False
    float32_buffers = ('max_logit',)

    def _init_max_logit(self, n_head):
        self.register_buffer('max_logit', torch.full((n_head,), float('-inf')), persistent=False)

    @torch.no_grad()
    def _record_max_logit(self, q, k, attn_mask, is_causal):
        """q: (B, H, T, D), k: (B, H or Hkv, L, D): one extra q k^T, kept in the compute dtype."""
        if k.size(1) != q.size(1):
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        s = torch.matmul(q, k.transpose(-2, -1))                               # (B, H, T, L)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float('-inf'))
        elif is_causal:
            T, L = s.shape[-2:]
            keep = torch.ones(T, L, dtype=torch.bool, device=s.device).tril(L - T)
            s = s.masked_fill(~keep, float('-inf'))
        m = s.amax(dim=(0, 2, 3)).float() * self.scale                         # scale > 0
        self.max_logit.copy_(torch.maximum(self.max_logit, m))


class CausalSelfAttention(QKClipStats, nn.Module):
    """Multi-head attention; with n_kv_head < n_head each key/value head is shared by a group of
    n_head / n_kv_head query heads (GQA, Ainslie et al. 2023; MQA when n_kv_head = 1).
    softmax(q k^T / sqrt(D) + mask) v through F.scaled_dot_product_attention."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.qk_head_dim
        C, D = config.n_embd, self.head_dim
        self.q_proj = nn.Linear(C, self.n_head * D, bias=config.bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * D, bias=config.bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * D, bias=config.bias)
        self.o_proj = nn.Linear(self.n_head * D, C, bias=config.bias)
        self.o_proj.residual = True                     # scaled init (see GPT._init_weights)
        self.dropout = config.dropout
        self.scale = softmax_scale(config)
        self._init_max_logit(self.n_head)

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        B, T, _ = x.shape
        q, k, v = fused_linear(x, [self.q_proj, self.k_proj, self.v_proj])
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)                   # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)                # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k = cache.update(self.layer_idx, 'k', k, dim=2)                             # (B, Hkv, L, D)
            v = cache.update(self.layer_idx, 'v', v, dim=2)
        attn_mask, is_causal = mask
        if self.track_max_logit and self.training:
            self._record_max_logit(q, k, attn_mask, is_causal)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)                                   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    @torch.no_grad()
    def rescale_qk_(self, gamma):
        """Multiply head h's logits q_h . k by gamma[h] (<= 1). With GQA a key head serves a group
        of query heads, so it takes sqrt(min gamma of its group) and each query head the rest,
        gamma[h] / sqrt(min): every head's logits scale by exactly its own gamma, and heads of
        the group that did not exceed tau keep their logits."""
        from optim import scale_rows_                  # row by row: works on FSDP shards too
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        g = gamma.to(self.q_proj.weight.dtype).view(Hkv, H // Hkv)
        k_scale = g.min(dim=1).values.sqrt()                                  # (Hkv,)
        q_scale = (g / k_scale[:, None]).reshape(H)                           # (H,)
        for proj, scale in ((self.q_proj, q_scale), (self.k_proj, k_scale)):
            rows = scale.repeat_interleave(D)                                 # head h: rows hD..hD+D-1
            scale_rows_(proj.weight, rows)
            if proj.bias is not None:
                scale_rows_(proj.bias, rows)


class MLAttention(QKClipStats, nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, section 2.1; V3, section 2.1.1).

    Keys and values come from one small latent per token, c = RMSNorm(W_dkv x) (kv_lora_rank
    wide), expanded per head: k_nope = W_uk c, v = W_uv c. Position enters through a separate
    RoPE part: q_rope per head, and ONE k_rope per token shared by all heads. So the cache only
    needs c and k_rope: kv_lora_rank + qk_rope_head_dim numbers per token per layer.
        q = [q_nope ; RoPE(q_rope)]    k = [W_uk c ; RoPE(k_rope)]    v = W_uv c
    Training / no cache: expand k and v for every head and use fused attention.
    Decoding with a cache: absorb W_uk into the query and W_uv into the output,
        q_nope . (W_uk c) = (W_uk^T q_nope) . c      and      sum_t a_t W_uv c_t = W_uv (sum_t a_t c_t)
    so attention runs directly over the cached latents, as one shared key/value 'head'.
    Module names are DeepSeek-V3's."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        C, H = config.n_embd, config.n_head
        self.n_head, self.rank = H, config.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        d_qk = self.d_nope + self.d_rope
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(C, H * d_qk, bias=False)
        else:                                        # queries through a low-rank bottleneck too
            self.q_a_proj = nn.Linear(C, config.q_lora_rank, bias=config.bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * d_qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(C, self.rank + self.d_rope, bias=config.bias)   # [c ; k_rope]
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.d_nope + self.d_v), bias=False)     # [W_uk ; W_uv]
        self.o_proj = nn.Linear(H * self.d_v, C, bias=config.bias)
        self.o_proj.residual = True
        self.dropout = config.dropout
        self.scale = softmax_scale(config)
        self._init_max_logit(H)

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        B, T, _ = x.shape
        H = self.n_head
        low_rank_q = not hasattr(self, 'q_proj')      # x's two projections, one GEMM when fused
        q, ckv = fused_linear(x, [self.q_a_proj if low_rank_q else self.q_proj, self.kv_a_proj_with_mqa])
        if low_rank_q:
            q = self.q_b_proj(self.q_a_layernorm(q))
        # heads stay inside each token's row, (B, T, H, D), as the projections write them; attention
        # reads q, k, v as (B, H, T, D) through strides. Transposed copies (B, H, T, D) would make
        # the RoPE-and-concatenate kernels, and their backwards, move every row across the layout
        q = q.view(B, T, H, self.d_nope + self.d_rope)                               # (B, T, H, Dqk)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        c, k_rope = ckv.split([self.rank, self.d_rope], dim=-1)
        c = self.kv_a_layernorm(c)                                                     # (B, T, r)
        q_rope = apply_rope(q_rope.transpose(1, 2), *rope).transpose(1, 2)             # (B, T, H, Dr)
        k_rope = apply_rope(k_rope[:, None], *rope)[:, 0]                              # (B, T, Dr)
        attn_mask, is_causal = mask
        dropout = self.dropout if self.training else 0.0
        if cache is None:                                   # expand the latent for every head
            kv = self.kv_b_proj(c).view(B, T, H, self.d_nope + self.d_v)
            k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)                     # (B, T, H, .)
            k = torch.cat([k_nope, k_rope[:, :, None].expand(B, T, H, self.d_rope)], dim=-1)
            q = torch.cat([q_nope, q_rope], dim=-1)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)          # (B, H, T, .) views
            if self.track_max_logit and self.training:
                self._record_max_logit(q, k, attn_mask, is_causal)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               scale=self.scale, dropout_p=dropout)   # (B, H, T, Dv)
        else:                                               # absorb: attend over the latents
            c = cache.update(self.layer_idx, 'latent', c, dim=1)                       # (B, L, r)
            k_rope = cache.update(self.layer_idx, 'k_rope', k_rope, dim=1)             # (B, L, Dr)
            w = self.kv_b_proj.weight.view(H, self.d_nope + self.d_v, self.rank)
            w_uk, w_uv = w[:, :self.d_nope], w[:, self.d_nope:]                        # (H, D, r)
            q_latent = torch.einsum('bthd,hdr->bhtr', q_nope, w_uk.to(q_nope.dtype))  # W_uk^T q_nope
            q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)                  # (B, H, T, r+Dr)
            k = torch.cat([c, k_rope], dim=-1)[:, None]                                # (B, 1, L, r+Dr)
            y = F.scaled_dot_product_attention(q, k, c[:, None], attn_mask=attn_mask,
                                               is_causal=is_causal, scale=self.scale,
                                               dropout_p=dropout, enable_gqa=True)    # (B, H, T, r)
            y = torch.einsum('bhtr,hdr->bhtd', y, w_uv.to(y.dtype))                    # W_uv (a . c)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.d_v))

    @torch.no_grad()
    def rescale_qk_(self, gamma):
        """Multiply head h's logits by gamma[h] as the Kimi-K2 report does for MLA: the head's
        q_nope and k_nope rows by sqrt(gamma) (their product carries gamma), its q_rope rows by
        gamma, and the shared k_rope (used by every head) not at all."""
        from optim import scale_rows_                  # row by row: works on FSDP shards too
        H, dn, dr, dv = self.n_head, self.d_nope, self.d_rope, self.d_v
        g = gamma.to(self.kv_b_proj.weight.dtype).view(H, 1)
        # per head, q's rows are [q_nope (dn) ; q_rope (dr)] and kv_b's are [k_nope (dn) ; v (dv)]
        q_rows = torch.cat([g.sqrt().expand(H, dn), g.expand(H, dr)], 1).reshape(-1)
        kv_rows = torch.cat([g.sqrt().expand(H, dn), torch.ones_like(g).expand(H, dv)], 1).reshape(-1)
        scale_rows_((self.q_proj if hasattr(self, 'q_proj') else self.q_b_proj).weight, q_rows)
        scale_rows_(self.kv_b_proj.weight, kv_rows)


# -----------------------------------------------------------------------------
# Feed-forward: dense

def fused_linear(x, linears):
    """[l(x) for l in linears], as ONE matrix multiply over the stacked weights when autocast
    copies the weights anyway (float32 weights cast to bf16 at every training step: the cast
    writes them side by side, and under torch.compile that is one kernel). Weights already in
    the compute dtype (decoding in bf16) would be copied by the stacking, so then one each."""
    dev = x.device.type
    w = linears[0].weight
    if not (torch.is_autocast_enabled(dev) and w.dtype != torch.get_autocast_dtype(dev)):
        return [l(x) for l in linears]
    bias = None
    if any(l.bias is not None for l in linears):
        bias = torch.cat([l.bias if l.bias is not None else w.new_zeros(l.out_features) for l in linears])
    y = F.linear(x, torch.cat([l.weight for l in linears]), bias)
    return y.split([l.weight.size(0) for l in linears], dim=-1)


class MLP(nn.Module):
    """gelu:   down(gelu(up(x)))                       (GPT-2)
       swiglu: down(silu(gate(x)) * up(x))             (Shazeer 2020; Llama, DeepSeek)"""

    def __init__(self, config, hidden=None):
        super().__init__()
        C, Hd = config.n_embd, hidden or config.ffn_size
        self.swiglu = config.mlp == 'swiglu'
        if self.swiglu:
            self.gate_proj = nn.Linear(C, Hd, bias=config.bias)
        self.up_proj = nn.Linear(C, Hd, bias=config.bias)
        self.down_proj = nn.Linear(Hd, C, bias=config.bias)
        self.down_proj.residual = True

    def forward(self, x):
        if self.swiglu:
            gate, up = fused_linear(x, [self.gate_proj, self.up_proj])
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate='tanh'))


# -----------------------------------------------------------------------------
# Feed-forward: mixture of experts (DeepSeekMoE)

class Router(nn.Module):
    """Chooses K of E experts per token. Scores, selection and weights are float32; the logits'
    product runs in autocast's dtype under autocast (bf16 logits, as transformers' DeepseekV3 gets
    from the same F.linear of float32 inputs), in float32 without it.
    softmax (Mixtral): s = softmax(W x); top-K of s.
    sigmoid (DeepSeek-V3): s_i = sigmoid(w_i . x); experts are CHOSEN by s_i + b_i, where b is
      the auxiliary-loss-free balancing bias (moved after each optimizer step toward equal load,
      see GPT.update_router_bias); group-limited: experts are split into n_group groups, each
      group scored by the sum of its 2 best s_i + b_i, and only the topk_group best groups compete.
    The weights g of the chosen experts come from s without the bias: g = s_chosen, divided by
    their sum when norm_topk_prob, times routed_scaling_factor."""
    float32_buffers = ('e_score_correction_bias',)   # steps of 0.001 vanish in bf16

    def __init__(self, config):
        super().__init__()
        E = config.n_routed_experts
        self.E, self.K = E, config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func, self.norm_topk_prob = config.scoring_func, config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.randn(E, config.n_embd) * config.init_std)
        self.register_buffer('e_score_correction_bias', torch.zeros(E))      # b, not trained by SGD


    def forward(self, x):
        """x: (N, C) -> weights (N, K) float32, indices (N, K), scores (N, E) float32."""
        logits = F.linear(x.float(), self.weight.float()).float()            # (N, E)
        scores = logits.softmax(-1) if self.scoring_func == 'softmax' else logits.sigmoid()
        choice = scores + self.e_score_correction_bias                       # bias: selection only
        if self.n_group > 1:
            N = x.size(0)
            grouped = choice.view(N, self.n_group, self.E // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)            # (N, n_group)
            best = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float('-inf')).view(N, self.E)
        indices = top_k_indices(choice, self.K)                              # (N, K)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


def top_k_indices(choice, K, by_argmax=None):
    """choice.topk(K, dim=-1).indices for a few experts per row (E = 64: 32,768 rows of a batch).
    On a GPU, torch.topk is a radix select plus a sort per row, 0.13 ms per layer; K rounds of
    argmax, each masking the last pick, are row reductions that torch.compile fuses with the
    router's sigmoid and bias into one kernel. The same indices in the same order (the largest
    first; on ties the lower index, where topk's order is unspecified). by_argmax: None = on CUDA."""
    if not (choice.is_cuda if by_argmax is None else by_argmax):
        return choice.topk(K, dim=-1).indices
    choice = choice.detach()
    cols = torch.arange(choice.size(-1), device=choice.device)
    picks = []
    for _ in range(K):
        i = choice.argmax(-1, keepdim=True)                                  # (N, 1)
        picks.append(i)
        choice = torch.where(cols == i, float('-inf'), choice)               # not again
    return torch.cat(picks, -1)


class Experts(nn.Module):
    """E SwiGLU experts stored as three 3-D tensors (one matrix per expert, nn.Linear layout
    out x in), so that they can run as grouped matrix multiplies and be optimised per expert."""

    def __init__(self, E, C, I, std=0.02):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(E, I, C) * std)
        self.up_proj = nn.Parameter(torch.randn(E, I, C) * std)
        self.down_proj = nn.Parameter(torch.randn(E, C, I) * std)

    def forward_loop(self, x, weights, indices):
        """The reference: for each expert, gather its tokens, run it, add the weighted output.
        y_t = sum_k g_tk * down_e(silu(gate_e x_t) * up_e x_t), e = indices[t, k]."""
        y = torch.zeros_like(x)
        for e in range(self.gate_proj.size(0)):
            tok, slot = (indices == e).nonzero(as_tuple=True)      # data-dependent: a host sync
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
            y.index_add_(0, tok, (h @ self.down_proj[e].t()) * weights[tok, slot, None].to(x.dtype))
        return y

    def forward_grouped(self, x, weights, indices, fuse_gate_up=None):
        """The fast path: sort the N*K (token, expert) pairs by expert, run each projection as ONE
        grouped matrix multiply over the contiguous per-expert segments, then unsort and sum the
        K outputs of each token. No host syncs, no Python loop over experts.
        fuse_gate_up (None: whenever the weights are cast to the compute dtype anyway, i.e. float32
        weights under autocast): gate and up as one grouped GEMM over [gate ; up] (E, 2I, C),
        written side by side by that cast; with weights already in the compute dtype (decoding)
        the concatenation would be an extra copy of every expert per step, so two GEMMs."""
        N, K = indices.shape
        E = self.gate_proj.size(0)
        flat = indices.reshape(-1)                                            # (N*K,)
        # pairs by expert. The sort's keys in the narrowest integer that holds E: a GPU radix sort
        # makes one pass per byte of key (8 for int64); the stable order is the same
        order = flat.to(torch.uint8 if E <= 256 else torch.int16).argsort(stable=True)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=x.device))  # pair p is at inv[p]
        offs = expert_counts(indices, E).cumsum(0, dtype=torch.int32)         # segment ends
        dtype = _grouped_mm_dtype(x)
        xs = GatherRows.apply(x.to(dtype), order // K, inv, K)                # (N*K, C) sorted; cast
        # first (float32 x under autocast): the gather and its backward move bf16 rows, not float32
        if fuse_gate_up is None:
            fuse_gate_up = self.gate_proj.dtype != dtype
        # the gate weight enters before the down projection, which is linear: g W_down h = W_down (g h).
        # Then the combine is a plain gather-and-sum, and its backward a gather of dy: no read of
        # the experts' outputs for dg (that comes from h, in the SwiGLU's backward)
        g = GatherRows.apply(weights.reshape(-1, 1), order, inv, 1)         # (N*K, 1) sorted
        if fuse_gate_up:
            # cast, then concatenate: the backward's float32 gradients of gate and up are then
            # two contiguous tensors, not strided views of one (E, 2I, C) buffer that autograd
            # would have to copy into each parameter's layout
            w13 = torch.cat([self.gate_proj.to(dtype), self.up_proj.to(dtype)], 1)   # (E, 2I, C)
            h = WeightedSwiGLU.apply(torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs), g, dtype)
        else:
            gate = torch._grouped_mm(xs, self.gate_proj.to(dtype).transpose(1, 2), offs=offs)
            up = torch._grouped_mm(xs, self.up_proj.to(dtype).transpose(1, 2), offs=offs)
            h = (F.silu(gate) * up * g).to(dtype)                            # g h
        ys = torch._grouped_mm(h, self.down_proj.to(dtype).transpose(1, 2), offs=offs)
        # unsort and sum the K outputs of each token: y_t = sum_k g_tk y_tk (float32 sum, written
        # in the compute dtype like any autocast layer's output: its backward reads dy in bf16)
        return GatherRows.apply(ys, inv, order, 1).view(N, K, -1).sum(1, dtype=torch.float32).to(dtype)

    def forward_gathered(self, x, weights, indices):
        """For a few tokens (decoding at a small batch): every (token, k) pair reads its expert's
        matrices directly, as matrix-vector products over the gathered weights,
            h_tk = silu(W_gate[e] x_t) * (W_up[e] x_t),   y_t = sum_k g_tk W_down[e] h_tk,  e = indices[t, k]
        with no sort, no segment offsets and no host sync. Written as multiply-and-sum (float32
        accumulation) so that torch.compile makes each product one kernel that reads the chosen
        rows in place. It reads N*K expert matrices, no more than all E when N*K <= E (MoE's rule)."""
        xf = x.float()[:, None, None, :]                                      # (N, 1, 1, C)
        gate = (self.gate_proj[indices].float() * xf).sum(-1)                 # (N, K, I)
        up = (self.up_proj[indices].float() * xf).sum(-1)
        h = (F.silu(gate) * up)[:, :, None, :]                                # (N, K, 1, I)
        y = (self.down_proj[indices].float() * h).sum(-1)                     # (N, K, C)
        return (y * weights[..., None].float()).sum(1).to(x.dtype)


def expert_counts(indices, E):
    """(E,) int32: how many (token, expert) pairs in indices (N, K) went to each expert. A sum over
    the one-hot comparison, which torch.compile writes as one reduction over the indices; a
    scatter_add of N*K ones into E counters is atomic adds that queue on the same E addresses
    (0.13 ms per layer at 65,536 tokens on an H100, notes/performance.md, session 19)."""
    return (indices.reshape(-1, 1) == torch.arange(E, device=indices.device)).sum(0, dtype=torch.int32)


class WeightedSwiGLU(torch.autograd.Function):
    """h = g * silu(a) * b for the sorted (token, expert) rows: gate_up = [a ; b] (M, 2I) from the
    fused gate/up GEMM, g (M, 1) the gate weights, h (M, I) in dtype. Its backward,
        dh' = g dh,   da = dh' b sigmoid(a) (1 + a (1 - sigmoid(a))),   db = dh' silu(a),
        dg = sum_i dh_i silu(a_i) b_i,
    is one Triton kernel on CUDA: one read of gate_up and dh, one write of d gate_up, with dg
    from the same rows (torch.compile writes the reduction as a second kernel that reads gate_up
    again). The same math in PyTorch elsewhere."""

    @staticmethod
    def forward(ctx, gate_up, g, dtype):
        ctx.save_for_backward(gate_up, g)
        a, b = gate_up.chunk(2, dim=-1)
        return (F.silu(a) * b * g).to(dtype)

    @staticmethod
    def backward(ctx, dh):
        gate_up, g = ctx.saved_tensors
        if gate_up.is_cuda and HAVE_TRITON:
            d_gate_up, dg = swiglu_weighted_backward(gate_up, g, dh.contiguous())
            return d_gate_up, dg.view_as(g).to(g.dtype), None
        a, b = gate_up.float().chunk(2, dim=-1)
        dh = dh.float()
        sig = torch.sigmoid(a)
        dg = (dh * a * sig * b).sum(-1, keepdim=True)
        dh = dh * g
        da = dh * b * sig * (1 + a * (1 - sig))
        return torch.cat([da, dh * a * sig], -1).to(gate_up.dtype), dg.to(g.dtype), None


if HAVE_TRITON:
    @triton.jit
    def _swiglu_weighted_backward_kernel(gate_up_ptr, g_ptr, dh_ptr, d_gate_up_ptr, dg_ptr, M, I,
                                         BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
        """WeightedSwiGLU's backward for BLOCK_M rows (all I columns at once)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_I)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols < I)[None, :]
        at = rows[:, None].to(tl.int64) * (2 * I) + cols[None, :]           # a at [row, i], b at + I
        a = tl.load(gate_up_ptr + at, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(gate_up_ptr + at + I, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        sig = tl.sigmoid(a)
        silu = a * sig
        tl.store(dg_ptr + rows, tl.sum(dh * silu * b, 1), mask=row_ok)       # dg = sum_i dh silu(a) b
        dh = dh * g[:, None]
        da = dh * b * sig * (1 + a * (1 - sig))
        tl.store(d_gate_up_ptr + at, da.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(d_gate_up_ptr + at + I, (dh * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask)

    @torch.library.triton_op('nano_kimi::swiglu_weighted_backward', mutates_args=())
    def swiglu_weighted_backward(gate_up: torch.Tensor, g: torch.Tensor,
                                 dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d gate_up, dg (M,) float32) of WeightedSwiGLU; a custom op, so that torch.compile
        keeps the kernel inside its graph (no graph break)."""
        M, I = dh.shape
        d_gate_up = torch.empty_like(gate_up)
        dg = torch.empty(M, device=dh.device, dtype=torch.float32)
        block_i = triton.next_power_of_2(I)
        block_m = max(1, 4096 // block_i)
        torch.library.wrap_triton(_swiglu_weighted_backward_kernel)[(triton.cdiv(M, block_m),)](
            gate_up, g.reshape(-1).float(), dh, d_gate_up, dg, M, I, BLOCK_M=block_m, BLOCK_I=block_i,
            num_warps=4)
        return d_gate_up, dg


class GatherRows(torch.autograd.Function):
    """y = x[index], where index names every row of x exactly `copies` times, and inverse lists
    where those copies landed: row t of x is at y[inverse[t * copies + j]], j < copies. Autograd's
    own gradient of indexing is a scatter-add (atomic adds on a GPU); knowing the inverse makes
    it a gather and a sum: grad_x[t] = sum_j grad_y[inverse[t * copies + j]]."""

    @staticmethod
    def forward(ctx, x, index, inverse, copies):
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x[index]

    @staticmethod
    def backward(ctx, grad_y):
        inverse, = ctx.saved_tensors
        grad_x = grad_y[inverse].view(-1, ctx.copies, grad_y.size(-1)).sum(1)
        return grad_x, None, None, None


def _grouped_mm_dtype(x):
    """bf16 under CUDA autocast (the grouped GEMM kernels are bf16 on Hopper), else x's dtype."""
    if x.is_cuda and torch.is_autocast_enabled('cuda'):
        return torch.get_autocast_dtype('cuda')
    return x.dtype


def grouped_mm_supported(x, C, I):
    """torch._grouped_mm runs here: bf16 on CUDA compute capability >= 9.0 (Hopper), or float32
    / bf16 on CPU (float32 not under torch.compile), with 16-byte aligned rows."""
    if not hasattr(torch, '_grouped_mm'):
        return False
    dtype = _grouped_mm_dtype(x)
    align = 128 // torch.finfo(dtype).bits if dtype.is_floating_point else 0   # elements per 16 bytes
    if not align or C % align or I % align:
        return False
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return False                 # torch.compile's shape rule for _grouped_mm takes bf16 only
    if x.is_cuda:
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == 'cpu' and dtype in (torch.float32, torch.bfloat16)


class MoE(nn.Module):
    """DeepSeekMoE (Dai et al. 2024; DeepSeek-V3 section 2.1.2):
        y = sum_{shared i} FFN_i(x) + sum_{routed e in top-K} g_e FFN_e(x)
    with many small (fine-grained) routed experts and a few always-on shared experts. Keeps a
    count of the tokens sent to each expert, which drives the auxiliary-loss-free bias update
    and the load statistics, and returns the balance loss when aux_loss_alpha > 0."""
    float32_buffers = ('tokens_per_expert',)

    def __init__(self, config):
        super().__init__()
        self.E, self.K, I = config.n_routed_experts, config.num_experts_per_tok, config.expert_size
        self.router = Router(config)
        self.experts = Experts(self.E, config.n_embd, I, config.init_std)
        self.shared_experts = MLP(config, hidden=I * config.n_shared_experts) \
            if config.n_shared_experts else None
        self.impl, self.C, self.I = config.moe_impl, config.n_embd, I
        self.aux_loss_alpha, self.seq_aux = config.aux_loss_alpha, config.seq_aux
        self.register_buffer('tokens_per_expert', torch.zeros(self.E), persistent=False)


    def forward(self, x):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                               # (N, C)
        weights, indices, scores = self.router(flat)
        impl = self.impl
        if impl == 'auto':            # few (token, expert) pairs, as when decoding: no sort at all
            if flat.size(0) * self.K <= self.E:
                impl = 'gathered'
            else:
                impl = 'grouped' if grouped_mm_supported(flat, self.C, self.I) else 'loop'
        if impl == 'grouped':
            y = self.experts.forward_grouped(flat, weights, indices)
        elif impl == 'gathered':
            y = self.experts.forward_gathered(flat, weights, indices)
        else:
            y = self.experts.forward_loop(flat, weights, indices)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(indices, self.E)
        aux = None
        if self.training and self.aux_loss_alpha > 0:
            aux = self.aux_loss_alpha * balance_loss(scores, indices, self.K, B if self.seq_aux else 1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, C), aux


def balance_loss(scores, indices, K, n_seq):
    """sum_i f_i P_i averaged over n_seq groups of tokens (sequences, or 1 = the whole batch):
    f_i = E / (K T) * (tokens choosing expert i), P_i = mean over tokens of s_i / sum_j s_j.
    Equals 1 when load and affinity are uniform. DeepSeek-V3's complementary sequence-wise
    loss when grouped by sequence; the Switch Transformer / Mixtral loss over the whole batch."""
    N, E = scores.shape
    T = N // n_seq
    chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0).view(n_seq, T, E)
    f = chosen.sum(1) * E / (K * T)                                           # (n_seq, E)
    P = (scores / scores.sum(-1, keepdim=True)).view(n_seq, T, E).mean(1)
    return (f * P).sum(-1).mean()


# -----------------------------------------------------------------------------
# Transformer block and model

class Block(nn.Module):
    """Pre-norm residual block: x = x + attn(norm(x)); x = x + ffn(norm(x)).
    Returns (x, aux) where aux is the MoE balance loss (None without one)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = make_norm(config, config.n_embd)
        self.attn = (MLAttention if config.attention == 'mla' else CausalSelfAttention)(config, layer_idx)
        self.mlp_norm = make_norm(config, config.n_embd)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        B, T, C = x.shape
        # the residual stream as (B*T, C) rows inside the block. Under torch.compile each norm's
        # backward then also writes the bf16 copy of the stream's gradient that the sublayer before
        # it takes (fused into inductor's RMSNorm backward kernel); on (B, T, C) inductor writes
        # that copy in a kernel of its own, a second read of the float32 gradient per sublayer
        # (15 kernels, 0.97 ms of an H100's 72 ms step at batch 128; notes/performance.md, session 20)
        x = x.reshape(B * T, C)
        x = x + self.drop(self.attn(self.attn_norm(x).view(B, T, C), rope, cache, mask)).reshape(B * T, C)
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(self.mlp_norm(x).view(B, T, C))
        else:
            h, aux = self.mlp(self.mlp_norm(x)), None
        return (x + self.drop(h).reshape(B * T, C)).view(B, T, C), aux


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 section 2.2): from the previous depth's hidden
    state h_i and the embedding of token t_{i+k}, predict t_{i+k+1}:
        h'_i = Block(W [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i)]),   logits = Head(RMSNorm(h'_i))
    sharing the embedding and output head with the main model. (The paper writes the two
    halves in the other order; DeepSeek's released weights put the embedding first.)"""

    def __init__(self, config, layer_idx):
        super().__init__()
        C = config.n_embd
        self.enorm, self.hnorm = RMSNorm(C, config.norm_eps), RMSNorm(C, config.norm_eps)
        self.eh_proj = nn.Linear(2 * C, C, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(C, config.norm_eps)

    def forward(self, h, emb, rope, mask):
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(h, rope, None, mask)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_emb == 'learned':
            self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_emb == 'sinusoidal':
            self.register_buffer('pos_table', sinusoidal_table(config.block_size, config.n_embd),
                                 persistent=False)
        self.rope = RotaryEmbedding(config.rope_dim, config) if config.pos_emb == 'rope' else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.mtp = nn.ModuleList(MTPModule(config, config.n_layer + k) for k in range(config.mtp_depth))
        self.last_losses = {}
        self._decode_graphs = DecodeGraphs()   # captured decode steps kept between generate() calls
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """N(0, init_std) for matrices; the projections that write into the residual stream get
        std / sqrt(2 n_layer) so the stream's variance does not grow with depth (GPT-2)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            s = std / math.sqrt(2 * self.config.n_layer) if getattr(module, 'residual', False) else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_proj, mean=0.0, std=std)
            nn.init.normal_(module.up_proj, mean=0.0, std=std)
            nn.init.normal_(module.down_proj, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16), e.g. for fast decoding without autocast, keeps the buffers
        that must stay float32 (each module's `float32_buffers`: RoPE frequencies, router biases,
        statistics) in float32; they still follow the model to its device."""
        keep = [(m, name, m._buffers[name]) for m in self.modules()
                for name in getattr(m, 'float32_buffers', ()) if m._buffers.get(name) is not None]
        self._decode_graphs.clear()                  # they read the old tensors' memory
        super()._apply(fn, recurse)
        for m, name, old in keep:
            new = m._buffers[name]
            if new.dtype != old.dtype:
                m._buffers[name] = old.to(new.device)
        return self

    # --- forward ------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None, last_only=False, return_logits=True):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 where no loss is wanted.
        Returns (logits, loss): logits (B, T, V), or (B, 1, V) with last_only; loss is None
        without targets. return_logits=False (with targets): logits is None, for a training
        step that needs only the loss; under torch.compile a returned logits tensor is a graph
        output whose gradient the backward must materialise, as zeros of (B, T, V) when unused. With a KVCache, idx are the tokens after what the cache holds.
        The loss adds the MoE balance losses and the weighted MTP losses; the parts are left
        in self.last_losses ('lm', 'aux', 'mtp') for logging."""
        B, T = idx.shape
        c = self.config
        x, rope, aux_total = self.trunk(idx, cache)
        if targets is None:
            return self.lm_head(self.norm(x[:, -1:] if last_only else x)), None
        fused = self.fused_loss(x, return_logits)
        if fused:       # the (B, T, V) logits are never whole in memory (linear_cross_entropy)
            logits, lm_loss = None, linear_cross_entropy(self.norm(x), self.lm_head.weight, targets)
        else:
            logits = self.lm_head(self.norm(x))                                # (B, T, V)
            lm_loss = masked_cross_entropy(logits, targets)
        loss, parts = lm_loss, {'lm': lm_loss.detach()}
        if self.mtp and self.training and T > len(self.mtp):        # MTP is a training signal only
            h, mtp_losses = x, []
            for k, module in enumerate(self.mtp, start=1):          # depth k predicts t_{i+k+1}
                Tk = T - k
                emb = self.tok_emb(idx[:, k:])                      # t_{i+k} for i < T - k
                rope_k = (rope[0][:Tk], rope[1][:Tk]) if rope is not None else None
                h, aux = module(h[:, :Tk], emb, rope_k, self.causal_mask(Tk, idx.device))
                if aux is not None:
                    aux_total = aux if aux_total is None else aux_total + aux
                if fused:
                    mtp_losses.append(linear_cross_entropy(module.norm(h), self.lm_head.weight, targets[:, k:]))
                else:
                    mtp_losses.append(masked_cross_entropy(self.lm_head(module.norm(h)), targets[:, k:]))
            mtp_loss = torch.stack(mtp_losses).mean()
            loss = loss + c.mtp_loss_weight * mtp_loss
            parts['mtp'] = mtp_loss.detach()
        if aux_total is not None:
            loss = loss + aux_total
            parts['aux'] = aux_total.detach()
        self.last_losses = parts
        return (logits if return_logits else None), loss

    def fused_loss(self, x, return_logits):
        """Whether the loss goes through linear_cross_entropy (see ModelConfig.loss_impl): only
        when the caller does not want the logits back and a gradient is being taken ('auto' also
        needs CUDA, where the row kernel is a Triton one)."""
        impl = self.config.loss_impl
        if impl == 'plain' or return_logits or not torch.is_grad_enabled():
            return False
        return impl == 'fused' or (x.is_cuda and HAVE_TRITON)

    def trunk(self, idx, cache=None):
        """Embeddings and every block: (x (B, T, C) before the final norm, the RoPE cos/sin used,
        the summed MoE balance loss or None)."""
        B, T = idx.shape
        c = self.config
        if cache is None:
            if T > c.block_size and c.pos_emb in ('learned', 'sinusoidal'):
                raise ValueError(f'sequence of {T} tokens exceeds block_size {c.block_size}')
            positions = torch.arange(T, device=idx.device)
            mask = self.causal_mask(T, idx.device)
        else:
            positions, mask = cache.begin(T)
        x = self.tok_emb(idx)                                                   # (B, T, C)
        if c.pos_emb == 'learned':
            x = x + self.pos_emb(positions)
        elif c.pos_emb == 'sinusoidal':
            x = x + self.pos_table[positions]
        rope = self.rope(positions) if self.rope is not None else None
        x = self.drop(x)
        aux_total = None
        for layer in self.layers:
            x, aux = layer(x, rope, cache, mask)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.end()
        return x, rope, aux_total

    def causal_mask(self, T, device):
        """(attn_mask, is_causal) for a whole sequence: plain causal, or a sliding window."""
        c = self.config
        if c.sliding_window is None or c.sliding_window >= T:
            return None, True
        pos = torch.arange(T, device=device)
        return attention_mask(pos, pos, c.sliding_window, c.n_sink_tokens), False

    # --- mixture-of-experts bookkeeping ---------------------------------------------------
    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_router_bias(self, reduce=None):
        """Call after each optimizer step. Auxiliary-loss-free balancing (DeepSeek-V3, eq. 16):
        b_i <- b_i + bias_update_speed * sign(mean load - load_i) for each MoE layer, from the
        tokens counted since the last call (summed over ranks by `reduce`, e.g. an all-reduce).
        Returns the counts as an (n_moe_layers, E) tensor for logging, or None for dense models."""
        layers = self.moe_layers()
        if not layers:
            return None
        loads = torch.stack([m.tokens_per_expert for m in layers])
        if reduce is not None:
            reduce(loads)
        speed = self.config.bias_update_speed
        for m, load in zip(layers, loads):
            if speed > 0:
                m.router.e_score_correction_bias += speed * torch.sign(load.mean() - load)
            m.tokens_per_expert.zero_()
        return loads

    # --- QK-Clip bookkeeping ----------------------------------------------------------------
    def attention_modules(self):
        return [m for m in self.modules() if isinstance(m, QKClipStats)]

    def track_max_logits(self, on=True):
        """Record each head's largest attention logit in training forwards (costs one extra
        q k^T per layer). Set before torch.compile: the flag is read at trace time."""
        for m in self.attention_modules():
            m.track_max_logit = on

    @torch.no_grad()
    def resize_vocab(self, vocab_size):
        """Grow the token embedding and the output head to `vocab_size` rows (e.g. for new special
        tokens that do not fit in the padded vocabulary). Existing rows are kept; new embedding
        rows start at the mean of the old ones and new head rows at zero, so the new tokens start
        out neutral (Hewitt 2021)."""
        old = self.config.vocab_size
        if vocab_size <= old:
            return
        emb = nn.Embedding(vocab_size, self.config.n_embd).to(self.tok_emb.weight)
        emb.weight[:old] = self.tok_emb.weight
        emb.weight[old:] = self.tok_emb.weight.mean(0)
        self.tok_emb = emb
        head = nn.Linear(self.config.n_embd, vocab_size, bias=False).to(self.lm_head.weight)
        if self.config.tie_word_embeddings:
            head.weight = emb.weight
        else:
            head.weight[:old] = self.lm_head.weight
            head.weight[old:] = 0
        self.lm_head = head
        self.config.vocab_size = vocab_size

    # --- accounting -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings=False):
        """Parameter count; shared (tied) tensors counted once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() if not self.config.tie_word_embeddings else 0
            n -= self.pos_emb.weight.numel() if self.config.pos_emb == 'learned' else 0
        return n

    def mtp_params(self):
        return sum(p.numel() for p in self.mtp.parameters())

    def active_params(self, include_mtp=False):
        """Parameters a token passes through at inference: everything except the routed experts
        it does not use (a fraction 1 - K/E of them), the embedding tables (a lookup, not a
        multiplication; a tied table counts, as the head) and, by default, the MTP modules."""
        n = self.num_params(exclude_embeddings=True) - (0 if include_mtp else self.mtp_params())
        blocks = list(self.layers) + ([m.block for m in self.mtp] if include_mtp else [])
        for b in blocks:
            if isinstance(b.mlp, MoE):
                n -= sum(p.numel() for p in b.mlp.experts.parameters()) * (1 - b.mlp.K / b.mlp.E)
        return int(n)

    def active_matmul_params(self, include_mtp=True):
        """Weights multiplied per token in a forward pass (embedding lookups are not
        multiplications; the tied head counts once, as the head; routed experts count K/E)."""
        mtp_ids = {id(m) for m in self.mtp.modules()}
        n = 0
        for m in self.modules():
            if not include_mtp and id(m) in mtp_ids:
                continue
            if isinstance(m, nn.Linear):
                n += m.weight.numel()
            elif isinstance(m, Router):
                n += m.weight.numel()
            elif isinstance(m, MoE):
                n += sum(p.numel() for p in m.experts.parameters()) * m.K / m.E
        return int(n)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3 x forward):
        6 N for the weights (2 per multiply-add, x3; N = active_matmul_params, MTP included),
        plus attention's q.k and attn.v products, 6 n_layer n_head (D_qk + D_v) T, counted over
        the full T x T square as in nanoGPT / PaLM (T capped by a sliding window)."""
        c = self.config
        T = seq_len or c.block_size
        if c.sliding_window:
            T = min(T, c.sliding_window + c.n_sink_tokens)
        attn = 6 * (c.n_layer + c.mtp_depth) * c.n_head * (c.qk_head_dim + c.v_dim) * T
        return 6 * self.active_matmul_params() + attn

    # --- generation -----------------------------------------------------------------------
    def new_cache(self, batch_size, max_len, device, prompt_mask=None, static=False):
        c = self.config
        return KVCache(batch_size, max_len, device, prompt_mask, c.sliding_window, c.n_sink_tokens, static)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        stop_ids=None, vocab_limit=None, prompt_mask=None, generator=None,
                        cuda_graph=False, compile_step=False):
        """Yield the next token of every row, (B,), max_new_tokens times (fewer once every row
        has emitted one of stop_ids, an id or a list of ids; a finished row then repeats the
        first of them). idx: (B, P) prompts, left-padded
        where prompt_mask (B, P) is False. Keys and values are cached, so each step feeds one
        token. With a sliding window and relative positions (RoPE or none) the cache is a
        rolling buffer and generation runs on indefinitely in bounded memory; otherwise, when
        the cache reaches block_size, generation continues from the latest block_size/2 tokens
        (re-encoded), like nanoGPT's cropping but amortised.
        cuda_graph=True (not streaming): the cache is static and, on CUDA, the one-token step
        runs as a captured CUDA graph (DecodeGraph): one launch per token instead of hundreds (on
        the CPU the same static steps run eagerly; the tests check them there). For speed, put the
        weights in the compute dtype first, model.to(torch.bfloat16), rather than autocast.
        compile_step=True (with cuda_graph): the captured step is torch.compile's fused one.
        A captured step is kept for the next call with the same batch size and cache length
        (DecodeGraphs), so repeated calls (samples, evaluation batches, RL rollouts) capture once."""
        B, P = idx.shape
        c = self.config
        bs = c.block_size
        streaming = c.sliding_window is not None and c.pos_emb in ('rope', 'none')
        static = cuda_graph and not streaming         # on the CPU: the same static steps, no graph
        use_graph = static and idx.is_cuda and self.graph_capturable(B)
        valid = prompt_mask if prompt_mask is not None else torch.ones_like(idx, dtype=torch.bool)
        if P > bs and not streaming:                     # keep the latest block_size tokens
            idx, valid, P = idx[:, -bs:], valid[:, -bs:], bs
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, new = idx, []          # the window: tokens, then the new ones (joined at a restart)
        max_len = P + max_new_tokens if streaming else min(bs, P + max_new_tokens)
        graphs = key = signature = step = None
        if use_graph and max_new_tokens > 1:           # the graph of an earlier call of this shape
            graphs, key = self._decode_graphs, (idx.device, B, max_len, compile_step)
            signature = graphs.signature(self)
            step = graphs.take(key, signature)
        if step is not None:                           # its cache: the same buffers, emptied
            cache = step.cache
            cache.reset(valid)
        else:
            cache = self.new_cache(B, max_len, idx.device, valid, static=static)
        try:
            logits, _ = self(idx, cache=cache, last_only=True)
            if graphs is not None and step is None:    # captured after the prompt made the buffers
                step = DecodeGraph(self, cache, compile=compile_step)
            if stop_ids is not None:
                stop = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=idx.device)
            for i in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, vocab_limit, generator)
                if stop_ids is not None:
                    nxt = torch.where(done, stop[0], nxt)
                    done = done | torch.isin(nxt, stop)
                yield nxt
                if i == max_new_tokens - 1 or (stop_ids is not None and bool(done.all())):
                    return                               # no forward pass for a token never used
                if not streaming:
                    new.append(nxt)
                if not streaming and cache.pos == cache.capacity:   # window full: restart from the last half
                    keep = max(1, bs // 2)
                    tokens = torch.cat([tokens, torch.stack(new, 1)], dim=1)[:, -keep:]
                    valid = torch.cat([valid, valid.new_ones(B, len(new))], dim=1)[:, -keep:]
                    new = []
                    if static:                          # same buffers: a graph stays valid
                        cache.reset(valid)
                    else:
                        cache = self.new_cache(B, bs, idx.device, valid)
                    logits, _ = self(tokens, cache=cache, last_only=True)
                else:
                    if step is not None:
                        logits = step(nxt[:, None])
                    else:
                        logits, _ = self(nxt[:, None], cache=cache, last_only=True)
        finally:                                       # kept for the next call (not while in use)
            if step is not None:
                graphs.give_back(self, key, step, signature)

    def graph_capturable(self, batch_size=None):
        """Whether a decode step (batch_size tokens) can be a CUDA graph: nothing in it may wait
        for the host, and the MoE reference loop does (it asks which tokens each expert got);
        the grouped path runs where grouped_mm_supported (e.g. bf16 on Hopper), the gathered one
        (which 'auto' takes for batch_size * K <= E) everywhere."""
        w = self.tok_emb.weight

        def capturable(m):
            if m.impl == 'auto':
                return (batch_size is not None and batch_size * m.K <= m.E) or grouped_mm_supported(w[:1], m.C, m.I)
            return m.impl in ('grouped', 'gathered')
        return all(capturable(m) for m in self.moe_layers())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kw):
        """(B, P) prompts -> (B, P + n) prompts followed by n <= max_new_tokens new tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, **kw))
        return torch.cat([idx, torch.stack(new, 1)], dim=1) if new else idx


def decode_step(model, token, cache):
    """One token per row through the model and its cache: the (B, 1, V) logits."""
    return model(token, cache=cache, last_only=True)[0]


_compiled_decode_step = None


def compiled_decode_step():
    """decode_step through torch.compile, made once per process: every cache of the same shapes
    passes the same guards, so later generate() calls reuse the compiled code."""
    global _compiled_decode_step
    if _compiled_decode_step is None:
        _compiled_decode_step = torch.compile(decode_step, dynamic=False)
    return _compiled_decode_step


class DecodeGraph:
    """One decode step, (B, 1) tokens -> (B, 1, V) logits over a static KVCache, captured once as
    a CUDA graph and then replayed per token. At batch 1 a small model's step is hundreds of
    tiny kernels whose launches (and the Python that issues them) cost far more than their
    work; a replay launches them all at once. The graph reads the token from `self.token`,
    the position from cache.pos_t and the cache buffers in place, so every tensor it touches
    must stay at its address: the cache is reset in place, never rebuilt. (torch.compile's
    mode='reduce-overhead' does the same thing automatically; this is the explicit version.)"""

    def __init__(self, model, cache, warmup=2, compile=False):
        assert cache.static and cache.device.type == 'cuda'
        self.model, self.cache = model, cache
        # compile=True: the step is first fused by torch.compile (hundreds of small elementwise
        # kernels become a few dozen), then its kernels are captured the same way
        self.step_fn = compiled_decode_step() if compile else decode_step
        self.token = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        saved = (cache.pos, cache.pos_t.clone(), cache.slot_pos.clone())
        stream = torch.cuda.Stream(cache.device)          # warm up (lazy init, cuBLAS workspaces)
        stream.wait_stream(torch.cuda.current_stream(cache.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._park()
                self.step_fn(self.model, self.token, cache)
        torch.cuda.current_stream(cache.device).wait_stream(stream)
        self._park()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):                # records, does not run, the kernels
            self.logits = self.step_fn(self.model, self.token, cache)
        cache.pos = saved[0]                              # undo the warm-up steps
        cache.pos_t.copy_(saved[1])
        cache.slot_pos.copy_(saved[2])

    def _park(self):
        """Point the cache at its last slot for a warm-up or capture step: that slot is empty
        unless the cache is full (and then generation restarts from a fresh prompt before the
        next step), so these steps never overwrite a cached token or run past the buffers.
        (Outside the capture: a fill_ inside it would be replayed with every token.)"""
        self.cache.pos = self.cache.capacity - 1
        self.cache.pos_t.fill_(self.cache.capacity - 1)

    def __call__(self, token):
        if self.cache.pos + 1 > self.cache.capacity:
            raise RuntimeError(f'KV cache overflow: {self.cache.pos} + 1 > capacity {self.cache.capacity}')
        self.token.copy_(token)
        self.graph.replay()                               # advances cache.pos_t on the device
        self.cache.pos += 1                               # ... and here the host's count
        return self.logits


class DecodeGraphs:
    """The captured decode steps of one model, kept between generate_tokens() calls: making one
    (warm-up steps, torch.compile's guards, the capture) cost 13 to 24 ms on an H100, as much as 20
    to 45 replayed tokens of the default config at batch 1, so a caller that generates again with
    the same batch size and cache length (samples, evaluation batches, RL rollouts) should not pay
    it again.

    A step is keyed by (device, batch size, cache length, compiled or not), and is valid only for
    the tensors it was captured on: every parameter and buffer at the same address and dtype, under
    the same autocast setting. `take` checks that and hands a step out to one caller at a time
    (another caller of the same shape meanwhile captures its own); `give_back` keeps it, the most
    recent `max_steps` of them. Weights updated in place (an optimizer step) stay valid: the graph
    reads them where they are. model.to(...) drops them all (GPT._apply); so does clear(). Each
    kept step holds its KV cache and the graph's memory pool."""

    def __init__(self, max_steps=4):
        self.max_steps = max_steps
        self.steps = {}                  # key -> (signature, DecodeGraph), oldest first

    @staticmethod
    def signature(model):
        tensors = tuple((t.data_ptr(), t.dtype) for t in (*model.parameters(), *model.buffers()))
        return (tensors, model.training, torch.is_autocast_enabled('cuda'), torch.get_autocast_dtype('cuda'))

    def take(self, key, signature):
        """The step kept for `key`, removed while its caller decodes; None if none was kept for
        these tensors (signature(model) now)."""
        kept = self.steps.pop(key, None)
        return kept[1] if kept is not None and kept[0] == signature else None

    def give_back(self, model, key, step, signature):
        """Keep `step` (captured or taken with `signature`) unless the model changed meanwhile."""
        if self.signature(model) != signature:
            return
        self.steps.pop(key, None)
        self.steps[key] = (signature, step)
        while len(self.steps) > self.max_steps:
            self.steps.pop(next(iter(self.steps)))

    def clear(self):
        self.steps.clear()

    def __deepcopy__(self, memo):        # a copied model captures its own
        return DecodeGraphs(self.max_steps)


class ScalarModel(GPT):
    """A GPT with a scalar head on its final hidden states: the reward model (one score per
    sequence, read at its last real token) and the value model of PPO (one value per token).
    Built from a language model's checkpoint, it keeps every weight and adds `score_head`."""

    def __init__(self, config):
        super().__init__(config)
        self.score_head = nn.Linear(config.n_embd, 1, bias=True)
        nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.score_head.bias)

    def values(self, idx):
        """(B, T) scalar outputs, one per position; the balance loss goes to last_losses."""
        x, _, aux = self.trunk(idx)
        self.last_losses = {} if aux is None else {'aux': aux}
        return self.score_head(self.norm(x)).squeeze(-1).float()

    def score(self, idx, last):
        """(B,) the output at position last[b] of each row: the sequence's last real token
        (rows are right-padded)."""
        return self.values(idx).gather(1, last[:, None]).squeeze(1)

    def forward(self, idx, targets=None, cache=None, last_only=False, return_logits=True, last=None):
        """With last=: the scores (through forward, so torch.compile and DDP see the call);
        otherwise the language model's forward (the backbone keeps its head)."""
        if last is not None:
            return self.score(idx, last)
        return super().forward(idx, targets, cache, last_only, return_logits)


def token_logprobs(logits, targets):
    """(B, T) log p(target_t) under the logits, 0 where the target is -1 (prompt, padding)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets >= 0)


def masked_cross_entropy(logits, targets):
    """Mean cross entropy over the targets that are not -1, in float32; 0 (not NaN) when every
    target is masked, as can happen in a window of prompt tokens during fine-tuning."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=-1, reduction='sum')
    return total / (targets >= 0).sum().clamp(min=1)


# --- the output layer and the loss in one: no (B, T, V) logits (the training step's fast path) ---
#
# With V = 50,304 the logits are the largest tensor of a small model's step (64 x 512 tokens:
# 3.3 GB in bf16), and the plain path reads or writes them four times: the output GEMM writes
# them, the loss reads them, its backward reads them again and writes dlogits. Here, per chunk of
# rows (Liger-Kernel's FusedLinearCrossEntropy, Hsu et al. 2024), the loss and its gradient are
# taken together in the forward:
#     z = h W^T                       (n, V) bf16, one chunk at a time
#     loss_i = logsumexp(z_i) - z_i[y_i]        (0 where y_i = -1)
#     dz_i = softmax(z_i) - onehot(y_i)
#     dh = dz W,  dW += dz^T h                   the output layer's backward, done now
# and backward only scales dh and dW by the incoming gradient. Rows where y = -1 get dz = 0.
# The row pass reads each row of z once: the softmax's normaliser S_i is known only at the row's
# end, so it writes z_i <- P_i = exp(z_i - c_i) - S_i onehot(y_i), unnormalised (c_i: an offset
# near the row's max), and the division by S_i moves to the (n, C) side of the two GEMMs:
#     dz_i = P_i / S_i,   dh_i = (P_i W) / S_i,   dW += P^T (h / S)
# which costs two small (n, C) scalings instead of a second read of the (n, V) logits.

if HAVE_TRITON:
    @triton.jit
    def _cross_entropy_row(z_row, y, loss_at, inv_sum_at, V, BLOCK: tl.constexpr,
                           RESCALE_AT: tl.constexpr = 32.0):
        """One row of logits at z_row with target y, read once and written once:
        *loss_at = logsumexp(z) - z[y],  z <- exp(z - c) - S onehot(y),  *inv_sum_at = 1 / S,
        S = sum exp(z - c); loss and 1/S are 0 where y = -1. The offset c is the first block's
        max, raised (and the blocks already written rescaled by exp(c_old - c_new)) whenever a
        later block's max passes c + RESCALE_AT: exp(z - c) <= e^32 and S <= V e^32 stay far below
        float32's 3e38, and the entries that underflow (z < c - 87 <= max - 87) carry no
        probability to speak of."""
        valid = y >= 0
        z_y = tl.load(z_row + tl.maximum(y, 0)).to(tl.float32)
        c = float('-inf')                                # the offset
        s = 0.0                                          # sum of exp(z - c) so far
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=float('-inf')).to(tl.float32)
            m = tl.max(z, 0)
            if m > c + RESCALE_AT:                       # the first block, then rarely
                scale = tl.exp(c - m)
                tl.debug_barrier()                       # this row's earlier stores are visible
                for prev in range(0, start, BLOCK):
                    pcols = prev + tl.arange(0, BLOCK)
                    p = tl.load(z_row + pcols).to(tl.float32) * scale
                    tl.store(z_row + pcols, p.to(z_row.dtype.element_ty))
                s = s * scale
                c = m
            p = tl.exp(z - c)
            s += tl.sum(p, 0)
            tl.store(z_row + cols, p.to(z_row.dtype.element_ty), mask=cols < V)
        tl.store(loss_at, tl.where(valid, c + tl.log(s) - z_y, 0.0))
        tl.store(inv_sum_at, tl.where(valid, 1.0 / s, 0.0))
        tl.debug_barrier()                               # the block's store of P[y] lands first
        if valid:
            tl.store(z_row + y, (tl.exp(z_y - c) - s).to(z_row.dtype.element_ty))

    @triton.jit
    def _cross_entropy_rows_kernel(z_ptr, stride, targets_ptr, loss_ptr, inv_sum_ptr, V,
                                   BLOCK: tl.constexpr):
        """One program per row."""
        row = tl.program_id(0).to(tl.int64)
        _cross_entropy_row(z_ptr + row * stride, tl.load(targets_ptr + row), loss_ptr + row,
                           inv_sum_ptr + row, V, BLOCK)


def cross_entropy_rows_(z, targets):
    """The loss's row pass over logits z (n, V) with targets (n,), -1 = no loss. Returns the
    per-row loss (float32) and 1 / S (float32; both 0 where the target is -1), and overwrites z
    with P = exp(z - c) - S onehot(y), so that the gradient d loss_sum / dz = P / S (see above).
    Triton on CUDA; elsewhere the same contract in PyTorch with c = the row's max (the reference
    the CUDA test compares the kernel with)."""
    if z.is_cuda and HAVE_TRITON:
        loss = torch.empty(z.size(0), device=z.device, dtype=torch.float32)
        inv_sum = torch.empty_like(loss)
        _cross_entropy_rows_kernel[(z.size(0),)](z, z.stride(0), targets, loss, inv_sum, z.size(1),
                                                 BLOCK=4096, num_warps=8)
        return loss, inv_sum
    valid = targets >= 0
    y = targets.clamp(min=0)[:, None]
    zf = z.float()
    c = zf.max(-1, keepdim=True).values
    p = torch.exp(zf - c)
    s = p.sum(-1)
    loss = (c[:, 0] + torch.log(s) - zf.gather(1, y)[:, 0]) * valid
    p.scatter_add_(1, y, -s[:, None])                       # P[y] -= S
    z.copy_(p)
    return loss, valid / s


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, 'dtype')     # torch.mm(bf16, bf16, out_dtype=float32)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) with the gradients of h and W computed in the forward, chunk by chunk
    (see the comment above). Under autocast the products run in its dtype, as nn.Linear's would."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        with torch.autocast(h.device.type, enabled=False):
            hc, w = h.to(dtype), weight.to(dtype)
            dh = torch.empty_like(hc)
            dw = None
            total = torch.zeros((), device=h.device, dtype=torch.float32)
            n = h.size(0)
            chunk_rows = -(-n // -(-n // chunk_rows))                    # equal chunks, none tiny
            fp32_out = hc.is_cuda and dtype != torch.float32 and _MM_OUT_DTYPE
            for start in range(0, n, chunk_rows):
                h_c = hc[start:start + chunk_rows]
                z = h_c @ w.t()                                          # (n, V)
                loss, inv_sum = cross_entropy_rows_(z, targets[start:start + chunk_rows])  # z <- P
                total = total + loss.sum()
                dh_c = torch.mm(z, w, out=dh[start:start + chunk_rows])  # P W
                dh_c.mul_(inv_sum[:, None])                              # dh = dz W = (P W) / S
                h_s = (h_c * inv_sum[:, None]).to(dtype)                 # h / S
                if fp32_out:              # dW += dz^T h = P^T (h / S), accumulated in float32
                    dw = torch.mm(z.t(), h_s, out_dtype=torch.float32) if dw is None else \
                        torch.addmm(dw, z.t(), h_s, out_dtype=torch.float32, out=dw)
                else:
                    dw_c = z.t() @ h_s                                   # (V, C)
                    dw = dw_c.float() if dw is None else dw.add_(dw_c)
        ctx.save_for_backward(dh, dw)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        return (dh * grad_total).to(ctx.h_dtype), (dw * grad_total).to(ctx.w_dtype), None, None


@torch.compiler.disable       # eager between compiled graphs: dynamo does not trace the row kernel
def linear_cross_entropy(h, weight, targets, chunk_bytes=1 << 30):
    """masked_cross_entropy(h @ weight.T, targets) without the (.., V) logits held whole: h (B, T, C)
    or (N, C), weight (V, C), targets (B, T) or (N,) with -1 where no loss is wanted. Chunks of
    rows whose logits take at most chunk_bytes (1 GiB: 8 chunks at 128 x 512 tokens, V = 50,304)."""
    h2, t = h.reshape(-1, h.size(-1)), targets.reshape(-1).contiguous()
    rows = max(1, chunk_bytes // (weight.size(0) * 2))
    total = LinearCrossEntropy.apply(h2, weight, t, rows)
    return total / (t >= 0).sum().clamp(min=1)


# --- knowledge distillation (distill.py): the teacher's soft targets and the student's KL to them ---

def teacher_log_probs(teacher_logits, temperature=1.0, top_k=0, vocab=None):
    """The teacher's side of distillation, computed once per batch without gradient.
    log p = log_softmax(z_T / T) over the first `vocab` ids (the tokenizer's; ids past it are
    vocabulary padding and are dropped). Returns (log_p, ids):
      top_k = 0: log p over the whole vocabulary (..., V) and ids = None;
      top_k = k: O(k) numbers per position instead of O(V): the log-probabilities of the teacher's
        k most likely ids (..., k), and, when k < V, one more column: the rest of its mass as one
        bucket, log p_rest = log sum_{i not in top-k} p_i (so the k + 1 columns still sum to 1;
        nothing is renormalised); ids (..., k) are those k token ids."""
    z = teacher_logits.float()
    if vocab is not None:
        z = z[..., :vocab]
    logp = F.log_softmax(z / temperature, dim=-1)
    if not top_k:
        return logp, None
    top, ids = logp.topk(top_k, dim=-1)
    if top_k < logp.size(-1):
        rest = logp.scatter(-1, ids, float('-inf')).logsumexp(-1, keepdim=True)   # log p_rest
        top = torch.cat([top, rest], dim=-1)
    return top, ids


def distillation_kl(student_logits, targets, temperature=1.0, kind='forward', mask=None, vocab=None):
    """T^2 * KL between the teacher's softened distribution p (targets = teacher_log_probs(...))
    and the student's q = softmax(z_S / T) over the first `vocab` ids (default: the teacher's
    full width; ids past it are the student's vocabulary padding), averaged over the positions
    where mask is True:
        forward  KL(p || q) = sum_i p_i (log p_i - log q_i)   (Hinton et al. 2015: q covers all of p)
        reverse  KL(q || p) = sum_i q_i (log q_i - log p_i)   (mode-seeking: q avoids where p is small)
    The factor T^2 keeps the gradient's size independent of T: for the forward KL,
    d(T^2 KL)/dz_S = T (q - p), and as T grows, T^2 KL -> sum_i (a_i - b_i)^2 / 2V with a, b the
    mean-centred teacher and student logits (logit matching). With top-k targets, q is coarsened
    the same way as p: q at the teacher's k ids plus q_rest, the student's mass on all other ids;
    the KL between the two (k + 1)-outcome distributions is a lower bound of the full KL and equals
    it when k = V."""
    logp, ids = targets
    if vocab is None:
        if ids is not None:
            raise ValueError('top-k targets need vocab= (the size of the real vocabulary)')
        vocab = logp.size(-1)
    logq = F.log_softmax(student_logits.float()[..., :vocab] / temperature, dim=-1)
    if ids is not None:                                              # top-k targets
        logq_k = logq.gather(-1, ids)                                # log q at the teacher's k ids
        if logp.size(-1) > ids.size(-1):                             # and the teacher's rest bucket:
            logq_rest = logq.scatter(-1, ids, float('-inf')).logsumexp(-1, keepdim=True)  # log q_rest
            logq_k = torch.cat([logq_k, logq_rest], dim=-1)
        logq = logq_k
    if kind == 'forward':
        kl = (logp.exp() * (logp - logq)).sum(-1)                    # KL(p_T || q_S)
    elif kind == 'reverse':
        kl = (logq.exp() * (logq - logp)).sum(-1)                    # KL(q_S || p_T)
    else:
        raise ValueError(f"kind='{kind}'; valid: forward, reverse")
    kl = kl * temperature ** 2                                       # * T^2
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, vocab_limit=None, generator=None):
    """Pick the next token from (B, V) logits: greedy at temperature 0, else sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and/or the
    smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019)."""
    limited = vocab_limit is not None and vocab_limit < logits.size(-1)   # ids past the tokenizer
    if temperature == 0:                              # (vocab padding) are never chosen
        return (logits[:, :vocab_limit] if limited else logits).argmax(-1)   # in bf16: no float copy
    logits = logits.float() / temperature             # a new tensor: the caller's logits stay as they are
    if limited:                       # masked (slicing would change which tokens a seed draws)
        logits[:, vocab_limit:] = -float('inf')
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float('inf'))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p     # mass before this token already >= top_p
        sorted_logits = sorted_logits.masked_fill(outside, -float('inf'))
        logits = torch.full_like(logits, -float('inf')).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def pad_prompts(prompts, pad_id=0, device='cpu'):
    """Left-pad a list of token-id lists to one (B, P) tensor and its (B, P) validity mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError('every prompt needs at least one token (an empty one can start with EOT)')
    P = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    return idx.to(device), mask.to(device)


def count_params(config):
    """{'total', 'active', 'mtp'} for a config, built on the meta device (nothing allocated)."""
    with torch.device('meta'):
        model = GPT(config)
    return {'total': model.num_params() - model.mtp_params(), 'active': model.active_params(),
            'mtp': model.mtp_params()}


if __name__ == '__main__':
    # python model.py: parameter counts of the presets
    for name in PRESETS:
        n = count_params(ModelConfig.from_preset(name))
        print(f"{name:14s} total {n['total'] / 1e9:9.3f}B   active/token {n['active'] / 1e9:8.3f}B"
              + (f"   (+{n['mtp'] / 1e9:.2f}B MTP)" if n['mtp'] else ''))
