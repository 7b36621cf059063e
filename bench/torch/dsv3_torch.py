"""DeepSeek-V3 in plain PyTorch (float32, nn.Module + autograd): the peer of our C++ training benchmark.

Reads a `deepseek_v3` config.json (default: configs/kjv.json) and builds the same architecture our C++
model trains: embedding; RMSNorm; MLA (q LoRA or plain q_proj; kv_a_proj_with_mqa -> kv_a_layernorm ->
kv_b_proj; interleaved RoPE on the rope part); dense SwiGLU for the first `first_k_dense_replace` layers,
then DeepSeekMoE (sigmoid router, e_score_correction_bias for the choice, group-limited top-k, shared
experts; experts run in a loop with index_select / index_add_, as transformers' DeepseekV3MoE does); final
norm; lm head; MTP modules (enorm, hnorm, eh_proj, one decoder layer, their own shared_head.norm, the main
model's embedding and head). Training loss = CE + lambda/D * sum_k MTP CE_k + sequence-wise balance loss.

Written the way a user would write it; nothing here is tuned for speed. YaRN (rope_scaling) is not
implemented: a config with rope_scaling is rejected.
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Config:
    def __init__(self, path):
        with open(path) as f:
            c = json.load(f)
        if c.get("model_type") != "deepseek_v3":
            raise ValueError(f"{path}: model_type must be deepseek_v3")
        if c.get("rope_scaling"):
            raise ValueError(f"{path}: rope_scaling (YaRN) is not implemented in the torch peer")
        if c.get("scoring_func", "sigmoid") != "sigmoid" or c.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"{path}: only scoring_func sigmoid / topk_method noaux_tc are supported")
        if c.get("moe_layer_freq", 1) != 1 or c.get("attention_bias", False):
            raise ValueError(f"{path}: moe_layer_freq != 1 / attention_bias are not supported")
        self.vocab_size = c["vocab_size"]
        self.hidden_size = c["hidden_size"]
        self.intermediate_size = c["intermediate_size"]
        self.moe_intermediate_size = c["moe_intermediate_size"]
        self.num_hidden_layers = c["num_hidden_layers"]
        self.first_k_dense_replace = c.get("first_k_dense_replace", 0)
        self.num_attention_heads = c["num_attention_heads"]
        self.n_shared_experts = c.get("n_shared_experts") or 0
        self.n_routed_experts = c.get("n_routed_experts") or 0
        self.num_experts_per_tok = c.get("num_experts_per_tok", 1)
        self.n_group = c.get("n_group") or 1
        self.topk_group = c.get("topk_group") or 1
        self.routed_scaling_factor = c.get("routed_scaling_factor", 1.0)
        self.norm_topk_prob = c.get("norm_topk_prob", True)
        self.q_lora_rank = c.get("q_lora_rank") or 0
        self.kv_lora_rank = c["kv_lora_rank"]
        self.qk_nope_head_dim = c["qk_nope_head_dim"]
        self.qk_rope_head_dim = c["qk_rope_head_dim"]
        self.v_head_dim = c["v_head_dim"]
        self.rms_norm_eps = c.get("rms_norm_eps", 1e-6)
        self.rope_theta = c.get("rope_theta", 10000.0)
        self.num_nextn_predict_layers = c.get("num_nextn_predict_layers", 0) or 0
        self.tie_word_embeddings = c.get("tie_word_embeddings", False)
        self.initializer_range = c.get("initializer_range", 0.02)

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer):  # MTP layers (index >= num_hidden_layers) too
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(cfg, T, device=None):
    d = cfg.qk_rope_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    ang = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)  # [T, d/2]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotates the interleaved pairs (x[2i], x[2i+1]) of x [..., T, d] by position."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def causal_attention(q, k, v, scale):
    """q, k [B, h, T, dqk], v [B, h, T, dv] -> [B, h, T, dv]."""
    sdpa = getattr(F, "scaled_dot_product_attention", None)  # torch >= 2.0; its default scale is 1/sqrt(dqk)
    if sdpa is not None and scale == 1.0 / math.sqrt(q.shape[-1]):
        return sdpa(q, k, v, is_causal=True)
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, nh = cfg.hidden_size, cfg.num_attention_heads
        self.cfg, self.nh = cfg, nh
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(H, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, H, bias=False)

    def forward(self, x, cos, sin):
        c, nh = self.cfg, self.nh
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if c.q_lora_rank > 0 else self.q_proj(x)
        q = q.view(B, T, nh, c.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, nh, c.qk_nope_head_dim + c.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).expand(B, nh, T, c.qk_rope_head_dim)  # shared by all heads
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        o = causal_attention(q, k, v, 1.0 / math.sqrt(c.qk_head_dim))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, nh * c.v_head_dim))


class MLP(nn.Module):  # SwiGLU: down(silu(gate(x)) * up(x))
    def __init__(self, H, inter):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        E, H = cfg.n_routed_experts, cfg.hidden_size
        self.experts = nn.ModuleList(MLP(H, cfg.moe_intermediate_size) for _ in range(E))
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(E, H))
        # Auxiliary-loss-free balancing bias: used for the choice only, not a gradient parameter.
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.shared_experts = MLP(H, cfg.n_shared_experts * cfg.moe_intermediate_size) if cfg.n_shared_experts else None

    def route(self, x):
        """x [N, H] -> (expert indices [N, K], weights [N, K], sigmoid scores [N, E])."""
        c = self.cfg
        N, E, K = x.shape[0], c.n_routed_experts, c.num_experts_per_tok
        s = torch.sigmoid(F.linear(x, self.gate.weight))
        with torch.no_grad():
            choice = s + self.gate.e_score_correction_bias
            if c.n_group > 1:
                group = choice.view(N, c.n_group, E // c.n_group).topk(2, dim=-1).values.sum(-1)  # [N, G]
                keep = torch.zeros_like(group).scatter_(1, group.topk(c.topk_group, dim=-1).indices, 1.0)
                keep = keep.unsqueeze(-1).expand(N, c.n_group, E // c.n_group).reshape(N, E)
                choice = choice.masked_fill(keep == 0, float("-inf"))
            idx = choice.topk(K, dim=-1).indices
        w = s.gather(1, idx)
        if c.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * c.routed_scaling_factor, s

    def forward(self, x):
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        idx, w, s = self.route(flat)
        out = torch.zeros_like(flat)
        expert_mask = F.one_hot(idx, self.cfg.n_routed_experts).permute(2, 0, 1)  # [E, N, K]
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(expert_mask[e])
            if tok.numel() == 0:
                continue
            y = expert(flat.index_select(0, tok)) * w[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        self.last_routing = (idx, s, T)  # for the balance loss and load statistics
        return out.view(B, T, H)

    def balance_loss(self, alpha):
        """Sequence-wise balance loss (paper 2.3.3): alpha * mean over sequences of sum_e f_e * P_e."""
        idx, s, T = self.last_routing
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        B = idx.shape[0] // T
        with torch.no_grad():
            counts = F.one_hot(idx.view(B, T * K), E).sum(1).float()  # [B, E]
            f = counts * (E / (K * T))
        P = (s / s.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # [B, E]
        return alpha * (f * P).sum(-1).mean()


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class MTPModule(nn.Module):
    """h' = layer(eh_proj([enorm(embed(t_{i+k})); hnorm(h_i)])); logits = head(shared_head.norm(h'))."""

    def __init__(self, cfg, layer):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.layer = DecoderLayer(cfg, layer)
        self.shared_head_norm = RMSNorm(H, cfg.rms_norm_eps)  # embedding and head: the main model's

    def forward(self, h_prev, emb, cos, sin):
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.layer(h, cos, sin)


class DeepseekV3(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, l) for l in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=cfg.initializer_range)
            elif isinstance(m, MoE):
                nn.init.normal_(m.gate.weight, std=cfg.initializer_range)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, ids):
        """ids [B, T] -> (logits [B, T, V], final hidden [B, T, H] after the norm)."""
        cos, sin = rope_tables(self.cfg, ids.shape[1], ids.device)
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        h = self.norm(h)
        return self.lm_head(h), h

    def loss(self, ids, mtp_lambda=0.3, balance_alpha=1e-4):
        """Next-token CE + mtp_lambda/D * sum_k MTP CE_k (+ the balance loss of every MoE layer when alpha > 0).
        Returns (total, main CE, mean MTP CE)."""
        B, T = ids.shape
        V = self.cfg.vocab_size
        logits, h = self(ids)
        main = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        total, mtp_mean = main, torch.zeros(())
        D = min(len(self.mtp), T - 2)
        for k in range(1, D + 1):  # depth k: position i reads h^{k-1}_i and token i+k, predicts token i+k+1
            n = T - k
            cos, sin = rope_tables(self.cfg, n, ids.device)
            h = self.mtp[k - 1](h[:, :n], self.embed_tokens(ids[:, k:]), cos, sin)
            mtp_logits = self.lm_head(self.mtp[k - 1].shared_head_norm(h))
            ce = F.cross_entropy(mtp_logits[:, : n - 1].reshape(-1, V), ids[:, k + 1 :].reshape(-1))
            total = total + mtp_lambda / D * ce
            mtp_mean = mtp_mean + ce.detach() / D
        if balance_alpha > 0:
            for moe in self.moe_layers():
                total = total + moe.balance_loss(balance_alpha)
        return total, main.detach(), mtp_mean


def count_params(model):
    """Unique parameters (a tied/shared tensor counted once); buffers (e_score_correction_bias) excluded."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def official_name(cfg, name):
    """Our module path -> the official checkpoint name (MTP module k lives at model.layers.{L+k})."""
    if name.startswith("lm_head."):
        return name
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        prefix = f"model.layers.{cfg.num_hidden_layers + int(k)}."
        if rest.startswith("layer."):
            return prefix + rest[len("layer."):]
        return prefix + rest.replace("shared_head_norm.", "shared_head.norm.")
    return "model." + name
