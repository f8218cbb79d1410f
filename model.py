"""
The whole architecture in one file, every variant behind a ModelConfig flag:

  GPT-2 (learned positions, LayerNorm, GELU, tied head)  ->  Llama-style (RoPE, RMSNorm, SwiGLU,
  grouped-query attention)  ->  DeepSeek-V3 / Kimi-K2 (Multi-head Latent Attention, DeepSeekMoE,
  multi-token prediction).

Read top to bottom: config, norms, positions, attention, MLP, block, model, generation.
Shapes in comments: B batch, T new tokens, L keys in view (cached + new), H query heads,
Hkv key/value heads, D head dim, C model width (n_embd), V vocabulary.
"""

import math
from dataclasses import dataclass, asdict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    # --- positions -------------------------------------------------------------------------
    pos_emb: str = 'learned'           # 'learned' | 'sinusoidal' | 'rope' | 'none'
    rope_theta: float = 10000.0
    # --- norm and MLP ----------------------------------------------------------------------
    norm: str = 'layernorm'            # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5
    mlp: str = 'gelu'                  # 'gelu' | 'swiglu'
    intermediate_size: Optional[int] = None   # None: 4*C for gelu, 8/3*C rounded up to 64 for swiglu

    def __post_init__(self):
        choices = {'attention': ('mha',), 'pos_emb': ('learned', 'sinusoidal', 'rope', 'none'),
                   'norm': ('layernorm', 'rmsnorm'), 'mlp': ('gelu', 'swiglu')}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r}; valid: {', '.join(valid)}")
        for key in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd'):
            if getattr(self, key) < 1:
                raise ValueError(f'ModelConfig.{key}={getattr(self, key)} must be positive')
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f'n_embd={self.n_embd} is not divisible by n_head={self.n_head}; '
                             f'set head_dim explicitly')
        if self.n_head % self.kv_heads:
            raise ValueError(f'n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}')
        if self.pos_emb == 'rope' and self.qk_head_dim % 2:
            raise ValueError(f'RoPE needs an even head_dim, got {self.qk_head_dim}')

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    @property
    def qk_head_dim(self):
        return self.head_dim or self.n_embd // self.n_head

    @property
    def ffn_size(self):
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == 'gelu':
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)   # SwiGLU: 2/3 of 4C, same FLOPs as GELU's

    def to_dict(self):
        return asdict(self)


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


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate each pair (x_2i, x_2i+1) of a query or key at position p by
    the angle p * theta_i, theta_i = base^(-2i/d), so q.k depends only on the distance between
    positions. Pairs are adjacent (interleaved) as in the paper and DeepSeek's reference code."""

    def __init__(self, dim, config):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer('inv_freq', inv_freq, persistent=False)

    def forward(self, positions):
        """positions: (T,) or (B, T) integer positions -> cos, sin of shape (..., T, dim/2)."""
        angles = positions.float()[..., None] * self.inv_freq    # p * theta_i
        return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (T, D/2) or (B, T, D/2).
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos) for each adjacent pair."""
    if cos.dim() == 3:                                  # per-row positions: add the head axis
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# -----------------------------------------------------------------------------
# Attention

class KVCache:
    """Past keys and values for incremental decoding, one set per layer, preallocated to
    `max_len` tokens. Rows of a batch are left-padded to a common length: `valid` marks the real
    tokens, and each row's positions start at 0 at its first real token."""

    def __init__(self, batch_size, max_len, device, valid=None):
        self.batch_size, self.max_len, self.device = batch_size, max_len, device
        self.pos = 0                                   # tokens written so far
        self.buffers = {}                              # (layer, name) -> preallocated tensor
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        if valid is not None:                          # (B, P) mask of the left-padded prompt
            self.valid[:, :valid.size(1)] = valid
            self.pad = (~valid).sum(1)
            self.padded = bool((~valid).any())

    def update(self, layer, name, x, dim):
        """Write x (T new entries along `dim`) after what is cached; return everything so far."""
        key = (layer, name)
        if key not in self.buffers:
            shape = list(x.shape)
            shape[dim] = self.max_len
            self.buffers[key] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        buf, T = self.buffers[key], x.size(dim)
        if self.pos + T > self.max_len:
            raise RuntimeError(f'KV cache overflow: {self.pos} + {T} > max_len {self.max_len}')
        buf.narrow(dim, self.pos, T).copy_(x)
        return buf.narrow(dim, 0, self.pos + T)

    def positions(self, T):
        """(B, T) position ids of the next T tokens: row b starts counting after its padding."""
        p = self.pos + torch.arange(T, device=self.device)
        return (p[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, T):
        """(attn_mask, is_causal) for scaled_dot_product_attention over the next T tokens."""
        if not self.padded:
            if self.pos == 0:
                return None, True                       # plain causal prefill
            if T == 1:
                return None, False                      # one new token sees every cached one
        L = self.pos + T
        q = self.pos + torch.arange(T, device=self.device)
        k = torch.arange(L, device=self.device)
        m = (k[None, :] <= q[:, None])[None] & self.valid[:, None, :L]       # (B, T, L)
        m = m | (k[None, :] == q[:, None])[None]      # a padding query sees itself, not nothing
        return m[:, None], False                        # (B, 1, T, L)

    def advance(self, T):
        self.pos += T


class CausalSelfAttention(nn.Module):
    """Multi-head attention; with n_kv_head < n_head each key/value head is shared by a group of
    n_head / n_kv_head query heads (GQA, Ainslie et al. 2023; MQA when n_kv_head = 1).
    softmax(q k^T / sqrt(D) + causal mask) v through F.scaled_dot_product_attention."""

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

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k = cache.update(self.layer_idx, 'k', k, dim=2)                             # (B, Hkv, L, D)
            v = cache.update(self.layer_idx, 'v', v, dim=2)
        attn_mask, is_causal = mask
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head)                                   # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


# -----------------------------------------------------------------------------
# Feed-forward

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
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate='tanh'))


# -----------------------------------------------------------------------------
# Transformer block and model

class Block(nn.Module):
    """Pre-norm residual block: x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, mask=(None, True)):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, cache, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


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
        self.rope = RotaryEmbedding(config.qk_head_dim, config) if config.pos_emb == 'rope' else None
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """N(0, init_std) for matrices; the projections that write into the residual stream get
        std / sqrt(2 n_layer) so the stream's variance does not grow with depth (GPT-2)."""
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, 'residual', False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # --- forward ------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None, last_only=False):
        """idx: (B, T) token ids. targets: (B, T) next-token ids, -1 where no loss is wanted.
        Returns (logits, loss): logits (B, T, V), or (B, 1, V) with last_only; loss is None
        without targets. With a KVCache, idx are the tokens after what the cache holds."""
        B, T = idx.shape
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f'sequence of {T} tokens exceeds block_size {self.config.block_size}')
            positions, mask = torch.arange(T, device=idx.device), (None, True)
        else:
            positions, mask = cache.positions(T), cache.mask(T)
        x = self.tok_emb(idx)                                                   # (B, T, C)
        if self.config.pos_emb == 'learned':
            x = x + self.pos_emb(positions)
        elif self.config.pos_emb == 'sinusoidal':
            x = x + self.pos_table[positions]
        rope = self.rope(positions) if self.rope is not None else None
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None
        logits = self.lm_head(x)                                                # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    # --- accounting -----------------------------------------------------------------------
    def num_params(self, exclude_embeddings=False):
        """Parameter count; shared (tied) tensors counted once."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel() if not self.config.tie_word_embeddings else 0
            n -= self.pos_emb.weight.numel() if self.config.pos_emb == 'learned' else 0
        return n

    def active_matmul_params(self):
        """Weights multiplied per token in a forward pass: every matrix but the embedding
        lookups (the tied head counts once, as the head)."""
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward = 3 x forward):
        6 N for the weights (2 per multiply-add, x3), plus attention's q.k and attn.v products,
        6 n_layer n_head (D_qk + D_v) T, counted over the full T x T square as in nanoGPT / PaLM."""
        c = self.config
        T = seq_len or c.block_size
        attn = 6 * c.n_layer * c.n_head * (2 * c.qk_head_dim) * T
        return 6 * self.active_matmul_params() + attn

    # --- generation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eot_id=None, vocab_limit=None, prompt_mask=None, generator=None):
        """Yield the next token of every row, (B,), max_new_tokens times (fewer if every row
        has emitted eot_id; finished rows then repeat eot_id). idx: (B, P) prompts, left-padded
        where prompt_mask (B, P) is False. Keys and values are cached, so each step feeds one
        token; when the cache reaches block_size, generation continues from the latest
        block_size/2 tokens (re-encoded), like nanoGPT's cropping but amortised."""
        B, P = idx.shape
        bs = self.config.block_size
        valid = prompt_mask if prompt_mask is not None else torch.ones_like(idx, dtype=torch.bool)
        if P > bs:                                        # keep the latest block_size tokens
            idx, valid, P = idx[:, -bs:], valid[:, -bs:], bs
        tokens, done = idx, torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = KVCache(B, min(bs, P + max_new_tokens), idx.device, valid)
        logits, _ = self(idx, cache=cache, last_only=True)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, vocab_limit, generator)
            if eot_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
                done = done | (nxt == eot_id)
            yield nxt
            if eot_id is not None and bool(done.all()):
                return
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            if cache.pos == cache.max_len:              # window full: restart from the latest half
                keep = max(1, bs // 2)
                tokens, valid = tokens[:, -keep:], valid[:, -keep:]
                cache = KVCache(B, bs, idx.device, valid)
                logits, _ = self(tokens, cache=cache, last_only=True)
            else:
                logits, _ = self(nxt[:, None], cache=cache, last_only=True)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kw):
        """(B, P) prompts -> (B, P + n) prompts followed by n <= max_new_tokens new tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, **kw))
        return torch.cat([idx, torch.stack(new, 1)], dim=1) if new else idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, vocab_limit=None, generator=None):
    """Pick the next token from (B, V) logits: greedy at temperature 0, else sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens and/or the
    smallest set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2019)."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits[:, vocab_limit:] = -float('inf')       # ids past the tokenizer (vocab padding)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
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
