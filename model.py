"""
The whole architecture in one file, every variant behind a ModelConfig flag:

  GPT-2 (learned positions, LayerNorm, GELU, tied head)  ->  Llama-style (RoPE, RMSNorm, SwiGLU,
  grouped-query attention)  ->  DeepSeek-V3 / Kimi-K2 (Multi-head Latent Attention, DeepSeekMoE
  with auxiliary-loss-free balancing, multi-token prediction).

Read top to bottom: config and presets, norms, positions (RoPE and its long-context scalings),
attention (MHA/GQA, then MLA with its naive and absorbed paths), feed-forward (dense, then the
router, the experts and the MoE), the losses (cross entropy, and distillation's soft targets and
KL), the block and the MTP module, the model (forward with its loss, router-bias balancing,
accounting, a plain generate), the scalar-head model, and count_params for the presets.

This file is the reference. Where a faster way to compute the same thing exists, the line that
uses it is a call into fast_paths.py (Triton kernels, grouped GEMMs, the fused output layer + loss),
each kernel equal to the code here; generate.py holds the inference engine (KV cache, batched and
CUDA-graph decoding); optim.py holds Muon and QK-Clip, whose max-logit statistic the attention
modules record.
Shapes in comments: B batch, T new tokens, L keys in view (cached + new), H query heads,
Hkv key/value heads, D head dim, C model width (n_embd), V vocabulary, N = B*T tokens,
E routed experts, K experts per token, I expert width; MLA: r the latent (kv_lora_rank), Dn / Dr
the query and key dims without / with RoPE (qk_nope_head_dim, qk_rope_head_dim), Dqk = Dn + Dr a
query head's width, Dv v_head_dim.
"""

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import fast_paths
from optim import record_max_logit


@dataclass
class ModelConfig:
    # --- the core, in nanoGPT's names; the defaults are GPT-2 124M -------------------------
    vocab_size: int = 50304            # GPT-2's 50,257 ids padded to a multiple of 64
    block_size: int = 1024             # longest sequence trained on; the generation window (HF:
                                       # max_position_embeddings; every HF name: convert_hf.to_hf_config)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True                  # biases in linear layers and LayerNorm (HF: attention_bias)
    tie_word_embeddings: bool = True   # the output head shares the token embedding matrix
    init_std: float = 0.02             # HF: initializer_range
    # --- attention -------------------------------------------------------------------------
    attention: str = 'mha'             # 'mha' (multi-head; grouped-query via n_kv_head) | 'mla'
    n_kv_head: Optional[int] = None    # key/value heads (HF: num_key_value_heads): None = n_head (MHA),
                                       # 1 = MQA, else GQA
    head_dim: Optional[int] = None     # None = n_embd // n_head
    # Multi-head Latent Attention (DeepSeek-V2/V3), in DeepSeek-V3's names
    q_lora_rank: Optional[int] = None  # queries through a rank-q_lora_rank bottleneck; None (or 0,
                                       # DeepSeek's spelling): direct
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
    # None, or a dict as in DeepSeek-V3's config: {'type' (or 'rope_type'): 'default' | 'linear' |
    # 'dynamic' | 'yarn', 'factor', 'original_max_position_embeddings', and for yarn 'beta_fast',
    # 'beta_slow', 'mscale', 'mscale_all_dim', optionally 'attention_factor'}
    rope_scaling: Optional[dict] = None
    # --- norm and MLP ----------------------------------------------------------------------
    norm: str = 'layernorm'            # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5             # HF: rms_norm_eps (MLA's two inner norms keep DeepSeek's 1e-6)
    mlp: str = 'gelu'                  # 'gelu' | 'swiglu': the dense MLPs and the shared experts; the
                                       # routed experts are always SwiGLU (Experts)
    intermediate_size: Optional[int] = None   # dense MLP width; None: 4C (gelu), 8/3 C rounded up to 64 (swiglu)
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
                                       # 'gathered' (few tokens) | 'auto' (see MoE.expert_impl)
    # --- the training loss -----------------------------------------------------------------
    loss_impl: str = 'auto'            # 'plain' (logits, then F.cross_entropy) | 'fused' (output
                                       # layer + loss in chunks, gradients in the forward:
                                       # linear_cross_entropy) | 'auto': fused on CUDA when the
                                       # logits are not returned (the training step); either way
                                       # plain in float16 (GPT.use_fused_loss)
    # --- multi-token prediction (DeepSeek-V3) ----------------------------------------------
    mtp_depth: int = 0                 # extra modules predicting tokens 2..mtp_depth+1 ahead (HF:
                                       # num_nextn_predict_layers)
    mtp_loss_weight: float = 0.3       # lambda: loss = main + lambda / depth * sum of MTP losses
    # --- the scalar head (ScalarModel: the reward model) ----------------------------------------
    score_pooling: str = 'last'        # a sequence's score: 'last' (the head at its last token) |
                                       # 'last+mean' (+ the mean of the head over every token to it)
    score_reread: bool = False         # the reward model reads prompt + answer + the prompt again and
                                       # scores at the end of the reread (rl.reward_input)

    def __post_init__(self):
        choices = {'attention': ('mha', 'mla'), 'pos_emb': ('learned', 'sinusoidal', 'rope', 'none'),
                   'norm': ('layernorm', 'rmsnorm'), 'mlp': ('gelu', 'swiglu'),
                   'scoring_func': ('softmax', 'sigmoid'), 'moe_impl': ('auto', 'loop', 'grouped', 'gathered'),
                   'loss_impl': ('auto', 'plain', 'fused'), 'score_pooling': ('last', 'last+mean')}
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
            for key in ('kv_lora_rank', 'v_head_dim'):
                if getattr(self, key) < 1:
                    raise ValueError(f'ModelConfig.{key}={getattr(self, key)} must be positive')
            if self.qk_nope_head_dim < 0 or (self.q_lora_rank or 0) < 0:
                raise ValueError('qk_nope_head_dim and q_lora_rank cannot be negative')
        if self.q_lora_rank == 0:       # DeepSeek's configs write 0 for "no query bottleneck"
            self.q_lora_rank = None
        if self.pos_emb == 'rope' and self.rope_dim % 2:
            raise ValueError(f'RoPE needs an even head_dim, got {self.rope_dim}')
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get('type', self.rope_scaling.get('rope_type'))   # no type: refused
            if kind not in ('linear', 'dynamic', 'yarn', 'default'):
                raise ValueError(f"rope_scaling type {kind!r}; valid: default, linear, dynamic, yarn")
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
            if K == 1 and self.norm_topk_prob:    # weight = s / s = 1 for every token
                warnings.warn('num_experts_per_tok=1 with norm_topk_prob=True: the chosen expert\'s weight '
                              'is always 1, so the router gets no gradient from the loss and only the '
                              'balancing moves its choices; set norm_topk_prob=False (weight = its score)',
                              stacklevel=3)

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
                         aux_loss_alpha=0.02 * 2 / 32, seq_aux=False),   # HF's coefficient 0.02
                                                                           # (balance_loss says why)
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


def padded_vocab_size(n):
    """A tokenizer's n ids padded up to a multiple of 64 for the model's embedding and output
    layer (GPT-2's 50,257 -> 50,304): the output layer's matmul then runs on whole tiles. The
    padding ids are never sampled (generate.py's vocab_limit) and are left out of the softmax of
    every log-probability a stage computes (token_logprobs' and teacher_log_probs' vocab); the
    training loss keeps them, as nanoGPT does: their targets never occur, so training only drives
    their logits down."""
    return 64 * math.ceil(n / 64)


# -----------------------------------------------------------------------------
# Norms

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight     (Zhang & Sennrich 2019), computed in float32 and
    returned in x's dtype (under autocast, a bf16 MLA latent stays bf16, and so does its cache)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (F.rms_norm(x.float(), (x.size(-1),), eps=self.eps) * self.weight).type_as(x)


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


def yarn_attention_factor(rope_scaling):
    """The factor YaRN multiplies cos and sin by: the config's attention_factor, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) where both are given, else
    mscale(factor). q and k both carry it, so the RoPE part of q.k gains its square; softmax_scale
    multiplies every logit by mscale(factor, mscale_all_dim)^2 besides. Net, with both mscales set:
    the RoPE part x mscale(factor, mscale)^2, MLA's nope part x mscale(factor, mscale_all_dim)^2
    (V3: mscale = mscale_all_dim = 1, and every logit x (0.1 ln 40 + 1)^2 = 1.87)."""
    s = rope_scaling
    if s.get('attention_factor'):
        return s['attention_factor']
    if s.get('mscale') and s.get('mscale_all_dim'):
        return yarn_get_mscale(s['factor'], s['mscale']) / yarn_get_mscale(s['factor'], s['mscale_all_dim'])
    return yarn_get_mscale(s['factor'])


def rope_inv_freq(dim, base, device=None):
    """RoPE's angular frequencies theta_i = base^(-2i/d), i = 0 .. d/2 - 1, in float32: (d/2,) for a
    number base, (..., d/2) for a (..., 1) tensor of bases (dynamic NTK: one base per row)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def rope_scaling_type(config):
    s = config.rope_scaling or {}
    return s.get('type', s.get('rope_type', 'default'))


def yarn_inv_freq(dim, base, factor, original_max, beta_fast=32, beta_slow=1):
    """YaRN (Peng et al. 2023), as DeepSeek-V3's Hugging Face code and transformers compute it.
    Frequency i keeps its original value where it turns more than beta_fast times over the
    original context (high frequencies: extrapolate), is divided by `factor` where it turns less
    than beta_slow times (low frequencies: interpolate), and blends linearly in between."""
    def correction_dim(n_rotations):
        # the pair index i (0..dim/2-1) of theta_i = base^(-2i/dim) that turns n_rotations times over
        # the original context L0: L0 theta_i / (2 pi) = n  =>  i = dim ln(L0 / (2 pi n)) / (2 ln base)
        return dim * math.log(original_max / (n_rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001                     # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp                # 1: keep the original frequency
    # theta'_i = theta_i / factor * ramp_i + theta_i * (1 - ramp_i), ramp_i = clamp((i - low) / (high - low), 0, 1);
    # written as the reference writes it, 1 / (factor base^(2i/d)) and (1 - extrapolate) rather than
    # ramp, so that it rounds the same, bit for bit (for a factor not a power of 2, such as V3's 40, too)
    base_powers = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)       # base^(2i/d) = 1 / theta_i
    return 1.0 / (factor * base_powers) * (1 - extrapolate) + 1.0 / base_powers * extrapolate


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
      yarn:    see yarn_inv_freq; cos and sin are also multiplied by yarn_attention_factor"""
    float32_buffers = ('inv_freq',)      # kept by GPT._apply: bf16 would shift angles by radians

    def __init__(self, dim, config):
        super().__init__()
        self.dim, self.base = dim, config.rope_theta
        self.kind = rope_scaling_type(config)
        s = config.rope_scaling or {}
        inv_freq = rope_inv_freq(dim, self.base)                    # theta_i
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
            self.attention_factor = yarn_attention_factor(s)
        self.register_buffer('inv_freq', inv_freq, persistent=False)


    def forward(self, positions):
        """positions: (T,) or (B, T) integer positions -> cos, sin of shape (..., T, dim/2)."""
        inv_freq = self.inv_freq
        if self.kind == 'dynamic':       # the base grows with the longest position in view: each
            # row's own (a batch of requests must not change one another's angles). With a KV cache
            # only the new queries and keys get the new base; the cached keys keep the angles they
            # were written with (as in transformers; so generate.py refuses it for speculative decoding)
            seq_len = (positions.amax(-1, keepdim=True) + 1).float().clamp(min=self.original_max)  # (..., 1)
            base = self.base * (self.factor * seq_len / self.original_max - (self.factor - 1)) \
                ** (self.dim / (self.dim - 2))
            inv_freq = rope_inv_freq(self.dim, base, positions.device)       # (..., dim/2)
            if positions.dim() == 2:
                inv_freq = inv_freq[:, None, :]                              # (B, 1, dim/2)
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
    """Boolean mask, True where query position q may see key position k: causal (k <= q), never
    a negative k (how a KV cache marks its empty slots and left padding), and with a window:
    q - k < window or k < n_sink (an attention sink)."""
    allowed = (k_pos[..., None, :] <= q_pos[..., :, None]) & (k_pos[..., None, :] >= 0)
    if window is not None:
        near = (q_pos[..., :, None] - k_pos[..., None, :]) < window
        allowed = allowed & (near | (k_pos[..., None, :] < n_sink))
    return allowed


# -----------------------------------------------------------------------------
# Attention
#
# Both attention modules take (x, rope, cache, mask): rope the (cos, sin) of the positions, cache
# a generate.KVCache or engine.PagedCache (None in training) whose update() returns the keys and
# values in view, mask
# (attn_mask, is_causal) for F.scaled_dot_product_attention. For QK-Clip (optim.py) each keeps
# `max_logit`, the largest pre-softmax logit per head seen in training forwards while
# `track_max_logit` is on (GPT.track_max_logits).

class CausalSelfAttention(nn.Module):
    """Multi-head attention; with n_kv_head < n_head each key/value head is shared by a group of
    n_head / n_kv_head query heads (GQA, Ainslie et al. 2023; MQA when n_kv_head = 1).
    softmax(q k^T * scale + mask) v through F.scaled_dot_product_attention, scale = 1 / sqrt(D)
    (times YaRN's mscale^2 where it applies: softmax_scale)."""
    float32_buffers = ('max_logit',)

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
        self.track_max_logit = False
        self.register_buffer('max_logit', torch.full((self.n_head,), float('-inf')), persistent=False)

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        B, T, _ = x.shape
        q, k, v = fast_paths.fused_linear(x, [self.q_proj, self.k_proj, self.v_proj])   # one GEMM when fused
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
            record_max_logit(self, q, k, attn_mask, is_causal)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)                                   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, section 2.1; V3, section 2.1.1).

    Keys and values come from one small latent per token, c = RMSNorm(W_dkv x) (kv_lora_rank
    wide), expanded per head: k_nope = W_uk c, v = W_uv c. Position enters through a separate
    RoPE part: q_rope per head, and ONE k_rope per token shared by all heads. So the cache only
    needs c and k_rope: kv_lora_rank + qk_rope_head_dim numbers per token per layer.
        q = [q_nope ; RoPE(q_rope)]    k = [W_uk c ; RoPE(k_rope)]    v = W_uv c
    Training / no cache: expand k and v for every head and use fused attention.
    With a cache (prefill and decoding): absorb W_uk into the query and W_uv into the output,
        q_nope . (W_uk c) = (W_uk^T q_nope) . c      and      sum_t a_t W_uv c_t = W_uv (sum_t a_t c_t)
    so attention runs directly over the cached latents, as one shared key/value 'head'
    (attend_naive and attend_absorbed below compute the same attention both ways; the tests hold
    them equal). Module names are DeepSeek-V3's."""
    float32_buffers = ('max_logit',)

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        C, H = config.n_embd, config.n_head
        self.n_head, self.kv_lora_rank = H, config.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = config.qk_nope_head_dim, config.qk_rope_head_dim   # Dn, Dr
        self.v_head_dim, self.q_lora_rank = config.v_head_dim, config.q_lora_rank                          # Dv
        d_qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(C, H * d_qk, bias=False)
        else:                                        # queries through a low-rank bottleneck too
            self.q_a_proj = nn.Linear(C, config.q_lora_rank, bias=config.bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * d_qk, bias=False)   # rows: head h's [q_nope ; q_rope]
        r = self.kv_lora_rank
        self.kv_a_proj_with_mqa = nn.Linear(C, r + self.qk_rope_head_dim, bias=config.bias)   # [c ; k_rope]
        self.kv_a_layernorm = RMSNorm(r, 1e-6)      # 1e-6: DeepSeek's, whatever norm_eps is
        # rows: head h's [W_uk_h ; W_uv_h]
        self.kv_b_proj = nn.Linear(r, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, C, bias=config.bias)
        self.o_proj.residual = True
        self.dropout = config.dropout
        self.scale = softmax_scale(config)
        self.track_max_logit = False
        self.register_buffer('max_logit', torch.full((H,), float('-inf')), persistent=False)

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        B, T, _ = x.shape
        H = self.n_head
        # x's two projections (queries, or their low-rank part; the latent and RoPE key), one GEMM when fused
        # q: (B, T, H*Dqk), or (B, T, q_lora_rank) before q_b_proj; ckv: (B, T, r+Dr) = [W_dkv x ; W_kr x],
        # not yet normed or rotated
        q_first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, ckv = fast_paths.fused_linear(x, [q_first, self.kv_a_proj_with_mqa])
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        # q_nope, c and k_rope stay inside each token's row, (B, T, H, D), as the projections write
        # them, and attention reads them as (B, H, T, D) through strides: no transposed copy for the
        # concatenations and their backwards to move across the layout. (q_rope's rotation comes
        # back laid out (B, H, T, Dr); it is the small part, Dr of Dqk.)
        q = q.view(B, T, H, self.qk_nope_head_dim + self.qk_rope_head_dim)                 # (B, T, H, Dqk)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c, k_rope = ckv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c)                                                     # (B, T, r)
        q_rope = apply_rope(q_rope.transpose(1, 2), *rope).transpose(1, 2)             # (B, T, H, Dr)
        k_rope = apply_rope(k_rope[:, None], *rope)[:, 0]                              # (B, T, Dr)
        if cache is None:
            y = self.attend_naive(q_nope, q_rope, c, k_rope, mask)                     # (B, H, T, Dv)
        else:
            # the cache keeps [c ; k_rope] as one row per token, the absorbed attention's key: the
            # step joins its T new rows, never the L cached ones (and a paged cache gathers once)
            kv_rows = cache.update(self.layer_idx, 'latent_rope', torch.cat([c, k_rope], dim=-1), dim=1)  # (B, L, r+Dr)
            y = self.attend_absorbed(q_nope, q_rope, kv_rows, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def attend_naive(self, q_nope, q_rope, c, k_rope, mask):
        """Training and prefill without a cache: expand the latent c into every head's key and
        value, then fused attention. q_nope (B, T, H, Dn), q_rope (B, T, H, Dr), c (B, T, r),
        k_rope (B, T, Dr) -> (B, H, T, Dv)."""
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)             # (B, T, H, .)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, T, H, self.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # (B, H, T, .) views
        attn_mask, is_causal = mask
        if self.track_max_logit and self.training:
            record_max_logit(self, q, k, attn_mask, is_causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                              dropout_p=self.dropout if self.training else 0.0)

    def attend_absorbed(self, q_nope, q_rope, kv_rows, mask):
        """Attention over cached latents (prefill and decoding through a cache): W_uk moves into
        the query and W_uv onto the output, so the L cached tokens are read as kv_rows =
        [c ; k_rope] (B, L, r+Dr) (normed and rotated), the key, whose first r numbers c are the
        value, never expanded per head.
        q_nope (B, T, H, Dn), q_rope (B, T, H, Dr) -> (B, H, T, Dv)."""
        H = self.n_head
        w = self.kv_b_proj.weight.view(H, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]     # (H, Dn, r), (H, Dv, r)
        q_latent = torch.einsum('bthd,hdr->bhtr', q_nope, w_uk.to(q_nope.dtype))      # W_uk^T q_nope
        q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)                      # (B, H, T, r+Dr)
        k, c = kv_rows[:, None], kv_rows[:, None, :, :self.kv_lora_rank]              # (B, 1, L, r+Dr), (B, 1, L, r)
        attn_mask, is_causal = mask
        # scale: still 1/sqrt(Dn + Dr) (softmax_scale), not SDPA's default 1/sqrt(r + Dr): the
        # logits q_latent . c + q_rope . k_rope are the same numbers as attend_naive's q . k
        y = F.scaled_dot_product_attention(q, k, c, attn_mask=attn_mask, is_causal=is_causal,
                                           scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=True)                            # (B, H, T, r)
        return torch.einsum('bhtr,hdr->bhtd', y, w_uv.to(y.dtype))                     # W_uv (a . c)


# -----------------------------------------------------------------------------
# Feed-forward: dense

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
            gate, up = fast_paths.fused_linear(x, [self.gate_proj, self.up_proj])   # one GEMM when fused
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.gelu(self.up_proj(x), approximate='tanh'))


# -----------------------------------------------------------------------------
# Feed-forward: mixture of experts (DeepSeekMoE)

class Router(nn.Module):
    """Chooses K of E experts per token. Scores, selection and weights are float32; the logits'
    product runs in autocast's dtype under autocast (bf16 logits, as transformers' DeepseekV3 gets
    from the same F.linear of float32 inputs), in float32 without it.
    softmax (Mixtral): s = softmax(W x); experts chosen by s + b (b = 0 unless bias_update_speed > 0).
    sigmoid (DeepSeek-V3): s_i = sigmoid(w_i . x); experts are CHOSEN by s_i + b_i, where b is
      the auxiliary-loss-free balancing bias (moved after each optimizer step toward equal load,
      see GPT.update_router_bias); group-limited: experts are split into n_group groups, each
      group scored by the sum of its 2 best s_i + b_i, and only the topk_group best groups compete
      (with softmax scores a group is scored by its best expert, as DeepSeek-V2 routes).
    The weights g of the chosen experts come from s without the bias: g = s_chosen, divided by
    their sum when norm_topk_prob, times routed_scaling_factor.
    forward returns (weights (N, K), indices (N, K), scores (N, E)); a routing rule of your own
    returns the same, with every index a real expert, 0 <= i < E (the fast expert paths gather by
    index and do not check: drop a slot with weight 0, not with an index past E; such a slot still
    counts as load for the bias and the balance loss, which count by index), and scores >= 0
    (balance_loss divides each row by its sum)."""
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
        # b shifts which experts are chosen, never their weights (those come from s below). With
        # softmax scores (mean 1/E: 0.016 at E = 64, against sigmoid's near 0.5 at the start) the same
        # bias_update_speed is about 30x larger relative to the scores: scale it when you switch.
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            N = x.size(0)
            grouped = choice.view(N, self.n_group, self.E // self.n_group)   # experts grouped by index
            # a group's score G_g (N, n_group): the sum of its 2 largest choices (V3) | its largest (V2)
            if self.scoring_func == 'sigmoid':
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)        # V3: its 2 best
            else:
                group_scores = grouped.amax(-1)                              # V2: its best
            best = group_scores.topk(self.topk_group, dim=-1).indices
            # (N, n_group) bool: the topk_group best groups; the other groups' experts -> -inf
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float('-inf')).view(N, self.E)
        indices = fast_paths.top_k_indices(choice, self.K)                      # (N, K): choice.topk
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)   # g_i / sum_j g_j (V3's 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


class Experts(nn.Module):
    """E SwiGLU experts stored as three 3-D tensors (one matrix per expert, nn.Linear layout
    out x in), so that they can run as grouped matrix multiplies and be optimised per expert."""

    def __init__(self, E, C, I, std=0.02):
        super().__init__()
        # in a GPT, _init_weights draws these again (down_proj at std / sqrt(2 n_layer), as for
        # every projection into the residual stream)
        self.gate_proj = nn.Parameter(torch.randn(E, I, C) * std)
        self.up_proj = nn.Parameter(torch.randn(E, I, C) * std)
        self.down_proj = nn.Parameter(torch.randn(E, C, I) * std)

    def gathered(self, name, indices):
        """The matrices of stack `name` of the experts `indices` (any shape): stack[indices]
        (quant.QuantExperts dequantizes only these)."""
        return getattr(self, name)[indices]

    def forward(self, x, weights, indices):
        """The reference: for each expert, gather its tokens, run it, add the weighted output.
        y_t = sum_k g_tk * down_e(silu(gate_e x_t) * up_e x_t), e = indices[t, k].
        MoE.routed_experts takes fast_paths.experts_grouped or experts_gathered instead where they run."""
        y = torch.zeros_like(x)
        for e in range(self.gate_proj.size(0)):
            tok, slot = (indices == e).nonzero(as_tuple=True)      # data-dependent: a host sync
            if tok.numel() == 0:
                continue
            xe = x[tok]
            h = F.silu(xe @ self.gate_proj[e].t()) * (xe @ self.up_proj[e].t())
            y.index_add_(0, tok, (h @ self.down_proj[e].t()) * weights[tok, slot, None].to(x.dtype))
        return y


def balance_loss(scores, indices, K, n_seq, counted=None):
    """sum_i f_i P_i averaged over n_seq groups of tokens (sequences, or 1 = the whole batch):
    f_i = E / (K T) * (tokens choosing expert i), P_i = mean over tokens of s_i / sum_j s_j,
    over the T tokens of a group that count (counted (B, T) bool: not a right-padded batch's padding).
    Equals 1 when load and affinity are uniform. DeepSeek-V3's complementary sequence-wise
    loss when grouped by sequence; over the whole batch the Switch Transformer's loss (which is
    the same at K = 1). Per layer, and the layers' losses are added. HF's Mixtral loss pools every
    layer's tokens and is K at uniform load, about K times the mean over layers: its
    router_aux_loss_coef a is about aux_loss_alpha = a K / n_layer here."""
    N, E = scores.shape
    w = (torch.ones(N, 1, device=scores.device) if counted is None
         else counted.reshape(N, 1).to(scores.dtype)).view(n_seq, -1, 1)      # (n_seq, N / n_seq, 1)
    T = w.sum(1).clamp(min=1)                                                 # (n_seq, 1): tokens that count
    chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0).view(n_seq, -1, E)   # (n_seq, N / n_seq, E)
    f = (chosen * w).sum(1) * E / (K * T)                                     # (n_seq, E)
    P = ((scores / scores.sum(-1, keepdim=True)).view(n_seq, -1, E) * w).sum(1) / T  # (n_seq, E)
    return (f * P).sum(-1).mean()


class MoE(nn.Module):
    """DeepSeekMoE (Dai et al. 2024; DeepSeek-V3 section 2.1.2):
        y = sum_{shared i} FFN_i(x) + sum_{routed e in top-K} g_e FFN_e(x)
    with many small (fine-grained) routed experts and a few always-on shared experts. Keeps a
    count of the tokens sent to each expert, which drives the auxiliary-loss-free bias update
    and the load statistics, and returns the balance loss in training when aux_loss_alpha > 0."""
    float32_buffers = ('tokens_per_expert',)

    def __init__(self, config):
        super().__init__()
        self.E, self.K, I = config.n_routed_experts, config.num_experts_per_tok, config.expert_size
        self.router = Router(config)
        self.experts = Experts(self.E, config.n_embd, I, config.init_std)
        # n_shared_experts always-on experts of width I as one MLP of width n_shared_experts * I
        # (their hidden units side by side, their outputs summed by its down projection)
        self.shared_experts = MLP(config, hidden=I * config.n_shared_experts) \
            if config.n_shared_experts else None
        self.impl, self.C, self.I = config.moe_impl, config.n_embd, I
        self.aux_loss_alpha, self.seq_aux = config.aux_loss_alpha, config.seq_aux
        self.register_buffer('tokens_per_expert', torch.zeros(self.E), persistent=False)


    def forward(self, x, counted=None):
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                               # (N, C)
        weights, indices, scores = self.router(flat)
        y = self.routed_experts(flat, weights, indices)                       # (N, C)
        self.count_load(indices, counted)
        aux = None
        if self.training and self.aux_loss_alpha > 0:
            aux = self.aux_loss_alpha * balance_loss(scores, indices, self.K, B if self.seq_aux else 1, counted)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(B, T, C), aux

    def routed_experts(self, flat, weights, indices):
        """sum_k g_tk FFN_e(x_t) over each token's K chosen experts: (N, C). (Expert parallelism
        replaces this alone: parallel.ExpertParallelMoE.)"""
        impl = self.expert_impl(flat)
        if impl == 'grouped':         # tokens sorted by expert, one grouped GEMM per projection
            return fast_paths.experts_grouped(self.experts, flat, weights, indices)
        if impl == 'gathered':        # each token reads its experts' rows: no sort at all
            return fast_paths.experts_gathered(self.experts, flat, weights, indices)
        return self.experts(flat, weights, indices)                           # the loop

    @torch.no_grad()
    def count_load(self, indices, counted=None):
        """In training, add each expert's (token, expert) pairs to tokens_per_expert. counted (B, T)
        bool: the tokens that count (a right-padded batch's padding does not); None: all."""
        if not self.training:
            return
        if counted is not None:   # an uncounted token's choices go to index E, which no expert has
            indices = indices.masked_fill(~counted.reshape(-1, 1), self.E)
        self.tokens_per_expert += fast_paths.expert_counts(indices, self.E)

    def expert_impl(self, flat):
        """moe_impl, with 'auto' resolved: 'gathered' for few (token, expert) pairs (decoding),
        'grouped' where torch._grouped_mm runs (bf16 on Hopper, the CPU), else 'loop'."""
        if self.impl != 'auto':
            return self.impl
        if flat.size(0) * self.K <= self.E:
            return 'gathered'
        return 'grouped' if fast_paths.grouped_mm_supported(flat, self.C, self.I) else 'loop'


# -----------------------------------------------------------------------------
# Losses (and through_last, which tells a right-padded batch's tokens from its padding)

def token_logprobs(logits, targets, vocab=None):
    """(B, T) log p(target_t) under the logits, 0 where the target is -1 (prompt, padding). vocab:
    the softmax runs over the first `vocab` ids only (the tokenizer's; the rest is the padding of
    padded_vocab_size, which generation never samples)."""
    logp = torch.log_softmax(logits[..., :vocab].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets >= 0)


def through_last(mask):
    """(B, T) bool: True at and before each row's last True. From the positions a right-padded
    batch scores (its targets), the tokens that are not padding, for MoE load counts."""
    return mask.flip(1).cummax(1).values.flip(1)


def masked_cross_entropy(logits, targets):
    """Mean cross entropy over the targets that are not -1, in float32; 0 (not NaN) when every
    target is masked, as can happen in a window of prompt tokens during fine-tuning.
    To change the training loss here (label smoothing, a z-loss), note that a CUDA training step
    computes it in fast_paths.linear_cross_entropy instead (GPT.use_fused_loss): set
    loss_impl='plain' in the ModelConfig, or ask for the logits (return_logits=True)."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=-1, reduction='sum')
    return total / (targets >= 0).sum().clamp(min=1)


# knowledge distillation (distill.py): the teacher's soft targets and the student's KL to them

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


def chunked_distillation_kl(student_logits, teacher_logits, temperature=1.0, kind='forward', mask=None,
                            vocab=None, top_k=0, chunk=4096):
    """distillation_kl(student_logits, teacher_log_probs(teacher_logits, temperature, top_k, vocab),
    ...): the same value and gradient, computed `chunk` positions at a time. Each chunk's float32
    (chunk, V) tensors (both log-softmaxes, p, p (log p - log q)) are recomputed in the backward
    pass instead of kept (activation checkpointing), so the loss holds O(chunk x V) floats instead
    of several (B, T, V) ones (5 x 6.6 GB at B 64, T 512 and GPT-2's vocabulary). The mean over the
    masked positions is the sum of each chunk's masked mean x its count, over the total count."""
    Vs, Vt = student_logits.size(-1), teacher_logits.size(-1)
    s, t = student_logits.reshape(-1, Vs), teacher_logits.reshape(-1, Vt)
    m = (mask.reshape(-1) if mask is not None else torch.ones(s.size(0), dtype=torch.bool, device=s.device))
    vocab = vocab or Vt

    def masked_sum(s_c, t_c, m_c):
        targets = teacher_log_probs(t_c, temperature, top_k, vocab)
        return distillation_kl(s_c, targets, temperature, kind, m_c, vocab) * m_c.sum()

    total = sum(torch.utils.checkpoint.checkpoint(masked_sum, s[i:i + chunk], t[i:i + chunk], m[i:i + chunk],
                                                  use_reentrant=False) for i in range(0, s.size(0), chunk))
    return total / m.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# Transformer block and model

class Block(nn.Module):
    """Pre-norm residual block: x = x + attn(norm(x)); x = x + ffn(norm(x)).
    Returns (x, aux) where aux is the MoE balance loss (None without one). counted (B, T) bool:
    the tokens whose expert choices count as load (MoE.count_load); None: all."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = make_norm(config, config.n_embd)
        self.attn = (MLAttention if config.attention == 'mla' else CausalSelfAttention)(config, layer_idx)
        self.mlp_norm = make_norm(config, config.n_embd)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, mask=(None, True), counted=None):
        B, T, C = x.shape
        # the residual stream as (B*T, C) rows inside the block: under torch.compile each norm's
        # backward then also writes the bf16 copy of the stream's gradient that the sublayer before
        # it takes (on (B, T, C) inductor writes that copy in a kernel of its own)
        x = x.reshape(B * T, C)
        x = x + self.drop(self.attn(self.attn_norm(x).view(B, T, C), rope, cache, mask)).reshape(B * T, C)
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(self.mlp_norm(x).view(B, T, C), counted)
        else:
            h, aux = self.mlp(self.mlp_norm(x)), None
        return (x + self.drop(h).reshape(B * T, C)).view(B, T, C), aux


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 section 2.2): from the previous depth's hidden
    state h_i^{k-1} (depth 0: the main model's, before its final norm) and the embedding of token
    t_{i+k}, predict t_{i+k+1}:
        h'_i^k = eh_proj [enorm(Emb(t_{i+k})) ; hnorm(h_i^{k-1})]     (eq. 21)
        h_i^k  = Block(h'_i^k)                                        (eq. 22: what forward returns)
        logits = lm_head(norm(h_i^k))                                 (eq. 23: in GPT.mtp_loss)
    sharing the embedding and output head with the main model. (The paper writes the two
    halves of eq. 21 in the other order; DeepSeek's released weights put the embedding first.)"""

    def __init__(self, config, layer_idx):
        super().__init__()
        C = config.n_embd
        # RMSNorm whatever config.norm says, as in V3 (and as every saved MTP checkpoint has them: a
        # LayerNorm here would need weights these never learned)
        self.enorm, self.hnorm = RMSNorm(C, config.norm_eps), RMSNorm(C, config.norm_eps)
        self.eh_proj = nn.Linear(2 * C, C, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(C, config.norm_eps)

    def forward(self, h, emb, rope, mask, counted=None):
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(h, rope, None, mask, counted)


def weight_numel(module):
    """The numbers a module's weights hold: its parameters, and its weights stored quantized
    (quant.py's QuantLinear / QuantExperts keep them in buffers) as the numbers they stand for."""
    return (sum(p.numel() for p in module.parameters())
            + sum(m.quantized_numel() for m in module.modules() if hasattr(m, 'quantized_numel')))


class GPT(nn.Module):
    """The language model: token embedding, n_layer Blocks (attention + MLP or MoE), the final
    norm and the output head, and mtp_depth MTP modules. Read forward first: trunk() runs the
    embedding and the blocks, head_loss() the output head and its loss, mtp_loss() the MTP modules'
    extra losses; the sections after it hold the router-bias update, QK-Clip's statistics, the
    vocabulary's resize, the parameter and FLOP counts, and generate() (the reference decoder)."""

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
        self.last_losses = {}                # the loss's parts of the last forward, for logging
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
        if '_decode_graphs' in self.__dict__:        # generate.py's captured decode steps read the
            self.__dict__['_decode_graphs'].clear()  # old tensors' memory
        # counted, so that a graph keeper (engine.py) sees every move, even one whose new tensors the
        # allocator happens to place at the old addresses (the buffers are not compared there)
        self.__dict__['tensor_moves'] = self.__dict__.get('tensor_moves', 0) + 1
        super()._apply(fn, recurse)
        for m, name, old in keep:
            new = m._buffers[name]
            if new.dtype != old.dtype:
                m._buffers[name] = old.to(new.device)
        return self

    # --- forward ------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None, last_only=False, return_logits=True, segments=None,
                counted=None):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 where no loss is wanted.
        Returns (logits, loss): logits (B, T, V), or (B, 1, V) with last_only and no targets
        (last_only is ignored with targets); loss is None without targets. return_logits=False
        (with targets): logits is None, for a training step that needs only the loss; under
        torch.compile a returned logits tensor is a graph output whose gradient the backward must
        materialise, as zeros of (B, T, V) when unused.
        With a KVCache (generate.py), idx are the tokens after what the cache holds.
        segments (B, T): rows that pack several examples (sft.py), each token numbered by its
        example: a token attends to its own example only, at positions counted from the example's
        start, as if each example were alone in its row (see packed_mask). counted (B, T) bool: the
        tokens whose expert choices count as expert load (not a right-padded batch's padding).
        The loss adds the MoE balance losses and the weighted MTP losses; the parts are left
        in self.last_losses ('lm', 'aux', 'mtp') for logging."""
        T = idx.size(1)
        c = self.config
        x, rope, aux_total = self.trunk(idx, cache, segments, counted)
        if targets is None:                  # no loss: nothing to log (last_losses) either
            self.last_losses = {}
            return self.lm_head(self.norm(x[:, -1:] if last_only else x)), None
        fused = self.use_fused_loss(x, return_logits)
        logits, lm_loss = self.head_loss(self.norm(x), targets, fused)
        loss, parts = lm_loss, {'lm': lm_loss.detach()}
        if self.mtp and self.training and T > len(self.mtp):        # MTP is a training signal only
            mtp_loss, aux = self.mtp_loss(x, idx, targets, rope, segments, counted, fused)
            loss = loss + c.mtp_loss_weight * mtp_loss   # L = L_main + lambda * (1/D) sum_k L_MTP^k (V3 eq. 25)
            parts['mtp'] = mtp_loss.detach()
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if aux_total is not None:        # + every MoE layer's alpha * L_Bal (the MTP blocks' not scaled by lambda)
            loss = loss + aux_total
            parts['aux'] = aux_total.detach()
        self.last_losses = parts
        return (logits if return_logits else None), loss

    def mtp_loss(self, x, idx, targets, rope, segments, counted, fused):
        """Multi-token prediction (DeepSeek-V3 sec. 2.2): module k combines the previous depth's
        hidden state at position i with the embedding of token t_{i+k} and predicts t_{i+k+1},
        through the shared output head. Returns (the mean cross entropy over the depths, their
        MoE balance loss or None)."""
        T = idx.size(1)
        h, losses, aux_total = x, [], None
        for k, module in enumerate(self.mtp, start=1):              # depth k predicts t_{i+k+1}
            Tk = T - k
            emb = self.tok_emb(idx[:, k:])                          # t_{i+k} for i < T - k
            rope_k = (rope[0][..., :Tk, :], rope[1][..., :Tk, :]) if rope is not None else None
            mask_k = (self.causal_mask(Tk, idx.device) if segments is None
                      else self.packed_mask(segments[:, :Tk])[1])
            # h[:, i] for i < T - k: the previous depth's state at position i, beside Emb(t_{i+k}): (B, T-k, C)
            h, aux = module(h[:, :Tk], emb, rope_k, mask_k, None if counted is None else counted[:, :Tk])
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
            targets_k = targets[:, k:]                              # targets[:, i+k] = t_{i+k+1}: (B, T-k)
            if segments is not None:                                # t_{i+k} of another example: no loss
                targets_k = targets_k.masked_fill(segments[:, :Tk] != segments[:, k:], -1)
            losses.append(self.head_loss(module.norm(h), targets_k, fused)[1])
        return torch.stack(losses).mean(), aux_total

    def head_loss(self, h, targets, fused):
        """(logits, mean cross entropy) of the output head on normed hidden states h. fused: the
        same loss through fast_paths.linear_cross_entropy, which never holds the (B, T, V) logits
        whole and takes the head's gradients in the forward (logits is then None)."""
        if fused:
            return None, fast_paths.linear_cross_entropy(h, self.lm_head.weight, targets)
        logits = self.lm_head(h)                                               # (B, T, V)
        return logits, masked_cross_entropy(logits, targets)

    def use_fused_loss(self, x, return_logits):
        """Whether the loss goes through linear_cross_entropy (see ModelConfig.loss_impl): only
        when the caller does not want the logits back and a gradient is being taken ('auto' also
        needs CUDA, where the row kernel is a Triton one). Never in float16: the row pass keeps
        unnormalised exp(z - running max) values in the logits' dtype, which pass float16's largest
        number (65,504) where a logit lies 11 above its row's first block (bf16 and float32 hold them)."""
        impl = self.config.loss_impl
        if impl == 'plain' or return_logits or not torch.is_grad_enabled():
            return False
        device = x.device.type
        if x.dtype == torch.float16 or (torch.is_autocast_enabled(device)
                                        and torch.get_autocast_dtype(device) == torch.float16):
            return False
        return impl == 'fused' or (x.is_cuda and fast_paths.HAVE_TRITON)

    def trunk(self, idx, cache=None, segments=None, counted=None):
        """Embeddings and every block: (x (B, T, C) before the final norm, the RoPE cos/sin used,
        the summed MoE balance loss or None)."""
        T = idx.size(1)
        c = self.config
        if cache is not None and segments is not None:
            raise ValueError('segments (packed documents) are for training passes, not with a cache')
        if cache is not None:
            positions, mask = cache.begin(T)
        elif T > c.block_size and c.pos_emb in ('learned', 'sinusoidal'):
            raise ValueError(f'sequence of {T} tokens exceeds block_size {c.block_size}')
        elif segments is not None:
            positions, mask = self.packed_mask(segments)
        else:
            positions = torch.arange(T, device=idx.device)
            mask = self.causal_mask(T, idx.device)
        x = self.tok_emb(idx)                                                   # (B, T, C)
        if c.pos_emb == 'learned':
            x = x + self.pos_emb(positions)
        elif c.pos_emb == 'sinusoidal':
            x = x + self.pos_table[positions]
        rope = self.rope(positions) if self.rope is not None else None
        x = self.drop(x)
        aux_total = None
        for layer in self.layers:
            x, aux = layer(x, rope, cache, mask, counted)
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

    def packed_mask(self, segments):
        """(positions (B, T), (attn_mask (B, 1, T, T), False)) for rows packing several examples:
        segments (B, T) gives each token's example (equal along an example, changing where the
        next begins). Position p of a token = its column - the column where its example starts;
        it may attend to key j iff j is in its example and causal (and in the window): a
        block-diagonal causal mask, so each example is computed as if alone in its row."""
        B, T = segments.shape
        cols = torch.arange(T, device=segments.device).expand(B, T)
        first = torch.ones_like(segments, dtype=torch.bool)
        first[:, 1:] = segments[:, 1:] != segments[:, :-1]                  # an example's first token
        start = torch.where(first, cols, 0).cummax(-1).values               # its example's first column
        positions = cols - start
        c = self.config
        allowed = attention_mask(positions, positions, c.sliding_window, c.n_sink_tokens)   # (B, T, T)
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
        return positions, (allowed[:, None], False)

    # --- mixture-of-experts bookkeeping ---------------------------------------------------
    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_router_bias(self, reduce=None):
        """Call after each optimizer step. Auxiliary-loss-free balancing (DeepSeek-V3 section
        2.1.2: the selection by s + b is its eq. 16, in Router.forward; the update is the text after
        it, gamma = bias_update_speed):
            b_i <- b_i + bias_update_speed * sign(mean load - load_i)
        for each MoE layer, from the tokens counted since the last call (summed over ranks by
        `reduce`, e.g. an all-reduce).
        Returns the counts as an (n_moe_layers, E) tensor for logging, or None for dense models.
        The balancing's pieces: b is Router.e_score_correction_bias, the counts are
        MoE.tokens_per_expert (MoE.count_load); training.Run.optimizer_step calls this, and
        training.Run.log_line turns the counts into the log's moe/load_cv and moe/max_imbalance
        (and expert_load.png)."""
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
        return [m for m in self.modules() if isinstance(m, (CausalSelfAttention, MLAttention))]

    def track_max_logits(self, on=True):
        """Record each head's largest attention logit in training forwards (costs one extra
        q k^T per layer). Set before torch.compile: the flag is read at trace time."""
        for m in self.attention_modules():
            m.track_max_logit = on

    # --- the vocabulary ---------------------------------------------------------------------
    @torch.no_grad()
    def resize_vocab(self, vocab_size):
        """Grow the token embedding and the output head to `vocab_size` rows (e.g. for new special
        tokens that do not fit in the padded vocabulary). Existing rows are kept; new embedding
        rows start at the mean of the old ones and new head rows at zero (with a tied head, they
        are the new embedding rows), so the new tokens start out neutral (Hewitt 2021)."""
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
        """Parameter count; shared (tied) tensors counted once; weights stored quantized counted as
        the numbers they stand for (weight_numel)."""
        n = weight_numel(self)
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() if not self.config.tie_word_embeddings else 0
            n -= self.pos_emb.weight.numel() if self.config.pos_emb == 'learned' else 0
        return n

    def mtp_params(self):
        return weight_numel(self.mtp)

    def active_params(self):
        """Parameters a token passes through at inference, the number model cards quote: every
        parameter except the routed experts it does not use (a fraction 1 - K/E of them), the
        embedding tables (a lookup, not a multiplication; a tied table counts, as the head) and
        the MTP modules (a training signal; speculative decoding's drafts aside)."""
        n = self.num_params(exclude_embeddings=True) - self.mtp_params()
        for b in self.layers:
            if isinstance(b.mlp, MoE):
                n -= weight_numel(b.mlp.experts) * (1 - b.mlp.K / b.mlp.E)
        return int(n)

    def active_matmul_params(self, mtp=True):
        """Weights multiplied per token in a training forward pass, for flops_per_token: unlike
        active_params, the MTP modules count (training runs them; mtp=False leaves them out, e.g.
        for a model run without them) and norms and biases do not (not multiplications); embedding
        lookups do not either, the tied head counts once, as the head, plus once per MTP depth
        (each depth's logits go through it again), and routed experts count K/E."""
        n = self.config.mtp_depth * self.lm_head.weight.numel() if mtp else 0
        for name, m in self.named_modules():
            if not mtp and name.startswith('mtp.'):
                continue
            if isinstance(m, nn.Linear):
                n += m.weight.numel()
            elif isinstance(m, Router):
                n += m.weight.numel()
            elif isinstance(m, MoE):
                n += sum(p.numel() for p in m.experts.parameters()) * m.K / m.E
        return int(n)

    def flops_per_token(self, seq_len=None, mtp=True):
        """Training FLOPs per token (forward + backward = 3 x forward):
        6 N for the weights (2 per multiply-add, x3; N = active_matmul_params, MTP included unless
        mtp=False; each depth runs on T - k of the T tokens, counted as T),
        plus attention's q.k and attn.v products, 6 (n_layer + mtp_depth) n_head (D_qk + D_v) T
        (each MTP depth is one more block), counted over the full T x T square as in nanoGPT / PaLM
        (T capped by a sliding window)."""
        c = self.config
        T = seq_len or c.block_size
        if c.sliding_window:
            T = min(T, c.sliding_window + c.n_sink_tokens)
        attn = 6 * (c.n_layer + (c.mtp_depth if mtp else 0)) * c.n_head * (c.qk_head_dim + c.v_dim) * T
        return 6 * self.active_matmul_params(mtp) + attn

    # --- generation: the reference ---------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab_limit=None):
        """nanoGPT's generate, the reference for generate.generate_tokens (the KV-cache engine):
        no cache, every new token runs the last block_size tokens through the whole model.
        idx (B, P) -> (B, P + max_new_tokens); temperature 0 is greedy; ids from vocab_limit on (the
        vocabulary's padding, padded_vocab_size) are never chosen."""
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size:]
            logits = self(window, last_only=True)[0][:, -1, :vocab_limit].float()   # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float('inf'))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx



class ScalarModel(GPT):
    """A GPT with a scalar head on its final hidden states: the reward model (one score per
    sequence, read at its last real token) and the value model of PPO (one value per token).
    Built from a language model's checkpoint, it keeps every weight and adds `score_head`."""

    def __init__(self, config):
        super().__init__(config)
        self.score_head = nn.Linear(config.n_embd, 1, bias=True)
        # std 1/sqrt(C + 1), as OpenAI's lm-human-preferences initialises its reward head
        nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.score_head.bias)

    def active_matmul_params(self, mtp=True):
        """GPT's, less the language-model head and the MTP modules: a scalar model runs neither
        (its score_head, one more Linear, counts)."""
        return super().active_matmul_params(mtp=False) - self.lm_head.weight.numel()

    def flops_per_token(self, seq_len=None, mtp=False):
        """GPT's, without the MTP modules' blocks (a scalar model never runs them)."""
        return super().flops_per_token(seq_len, mtp=False)

    def values(self, idx, counted=None):
        """(B, T) scalar outputs, one per position, in float32. An MoE backbone's balance loss is
        only logged (last_losses): the reward and value losses leave it out. counted: as in
        GPT.forward."""
        x, _, aux = self.trunk(idx, counted=counted)
        self.last_losses = {} if aux is None else {'aux': aux.detach()}
        h = self.norm(x)
        # the head outside autocast: in bf16 a score near 2.5 has steps of 1/64, and two answers
        # a pair compares would often get the same one
        with torch.autocast(h.device.type, enabled=False):
            return self.score_head(h.to(self.score_head.weight.dtype)).squeeze(-1).float()

    def score(self, idx, last, at=None):
        """(B,) the output at position last[b] of each row: the sequence's last real token
        (rows are right-padded, and their padding is not counted as expert load). With
        score_pooling='last+mean', plus the mean of the outputs at positions 0..last[b]: a judgement
        each token can make where it stands ("this word is one the prompt asked for"), summed,
        instead of one the last token must gather from the whole sequence. at (B, K): also the
        outputs at those positions of each row, (B, K) (reward.py's per-word checks)."""
        counted = torch.arange(idx.size(1), device=idx.device) <= last[:, None]   # (B, T)
        v = self.values(idx, counted)
        s = v.gather(1, last[:, None]).squeeze(1)
        if self.config.score_pooling == 'last+mean':
            s = s + (v * counted).sum(1) / counted.sum(1)
        return s if at is None else (s, v.gather(1, at))

    def forward(self, idx, targets=None, cache=None, last_only=False, return_logits=True, segments=None,
                counted=None, *, last=None, at=None, values=False):
        """GPT.forward's arguments, and: with last=, the scores (with at=, and the outputs at those
        positions); with values=True, values(idx) (through forward, so that torch.compile and DDP
        see the call); otherwise the language model's forward (the backbone keeps its head)."""
        if last is not None:
            return self.score(idx, last, at)
        if values:
            return self.values(idx, counted)
        return super().forward(idx, targets, cache, last_only, return_logits, segments, counted)


def count_params(config):
    """{'total', 'active', 'mtp'} for a config, built on the meta device (nothing allocated):
    'total' leaves the MTP modules out (num_params() counts them), 'mtp' is theirs."""
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
