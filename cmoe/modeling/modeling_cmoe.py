"""Modeling of a carved (CMoE) causal LM: the dense decoder with some MLPs replaced by MoE blocks.

Self-contained on purpose (torch and transformers only): this file is copied next to every carved
checkpoint so that `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works
without cmoe installed.
"""

import inspect
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_cmoe import CMoEConfig, MoELayerSpec


class SwiGLU(nn.Module):
    """One gated MLP: `down(act(gate(x)) * up(x))`, the shape of the dense FFN and of every expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Routing(NamedTuple):
    """What a router decides for T tokens: `indices` (T, k) experts, `weights` (T, k) gate values,
    `probs` (T, E) fp32 router probabilities (for balancing and analysis)."""

    indices: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


def routing_probabilities(logits: torch.Tensor, gating: str) -> torch.Tensor:
    """(T, E) fp32 scores the selection reads: sigmoid of the logits for `sigmoid-renorm`, softmax otherwise."""
    logits = logits.float()
    return logits.sigmoid() if gating == "sigmoid-renorm" else logits.softmax(dim=-1)


def select_experts(logits: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, top_k: int, gating: str) -> Routing:
    """Top-k of `p + bias` (the bias only steers selection), then the gate values of the rule:
    `cmoe`: 1 + p * scale (CMoE; exactly 1 while the scale is zero); `softmax-renorm` (Qwen2-MoE, Mixtral,
    Ernie) and `sigmoid-renorm` (GLM4-MoE, DeepSeek-V3): the selected p renormalised to sum to 1."""
    probs = routing_probabilities(logits, gating)
    indices = (probs + bias.float()).topk(top_k, dim=-1).indices
    chosen = probs.gather(-1, indices)
    if gating == "cmoe":
        weights = 1.0 + chosen * scale.float()[indices]
    elif gating == "softmax-renorm":
        weights = chosen / chosen.sum(dim=-1, keepdim=True)
    else:  # sigmoid scores can all vanish: the 1e-20 is GLM4-MoE's and DeepSeek-V3's, kept for exactness
        weights = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(indices, weights, probs)


class Router(nn.Module):
    """What every router shares: `top_k`, the gating rule `gating` (see select_experts; set from the
    layer's spec), the gate scale `scale` (u in the paper, trained by `cmoe finetune`) and the balancing
    bias `bias` (b, a buffer that only steers selection), both zero at the start, and the selection. A
    subclass says how it scores tokens (`logits`); one that selects differently overrides `forward`.

    `FINETUNED` names the parameters `cmoe finetune` trains at the router learning rate under the `cmoe`
    rule; under a renormalising rule the scale has no effect, and its scoring weights train instead.
    """

    FINETUNED = ("scale",)

    def finetuned_names(self) -> tuple[str, ...]:
        if self.gating == "cmoe":
            return self.FINETUNED
        return tuple(name for name, _ in self.named_parameters() if name != "scale")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__()
        self.top_k = top_k
        self.gating = "cmoe"
        self.scale = nn.Parameter(torch.zeros(num_experts))
        self.register_buffer("bias", torch.zeros(num_experts))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) routing scores before the rule's softmax or sigmoid."""
        raise NotImplementedError

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) fp32 routing probabilities (what selection ranks, before the bias)."""
        return routing_probabilities(self.logits(x), self.gating)

    def forward(self, x: torch.Tensor) -> Routing:
        return select_experts(self.logits(x), self.bias, self.scale, self.top_k, self.gating)


class AnalyticRouter(Router):
    """CMoE's training-free router: scores `s = |act(g . x) * (u . x)|` with `g`, `u` the normalised
    gate/up rows of each expert's representative neuron, `p = softmax(s)` in fp32. With zero scale and
    bias, a training-free model weights every selected expert by exactly 1."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__(hidden_size, num_experts, top_k, hidden_act)
        self.gate_proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.up_proj = nn.Linear(hidden_size, num_experts, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self.act_fn(self.gate_proj(x)) * self.up_proj(x)).abs()


class LinearRouter(Router):
    """A linear router (`proj`, with intercept) fitted in closed form to predict how much output each
    expert carries for a token, then softmax in fp32."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__(hidden_size, num_experts, top_k, hidden_act)
        self.proj = nn.Linear(hidden_size, num_experts, bias=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LinearGateRouter(Router):
    """A linear gate without intercept (`gate`), fitted in closed form like LinearRouter: the router every
    standard MoE format holds (Qwen2-MoE's `mlp.gate`, Mixtral's `block_sparse_moe.gate`, ...)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__(hidden_size, num_experts, top_k, hidden_act)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (variance / mean^2): zero when the values are all equal."""
    values = values.float()
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean().square() + 1e-10)


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_k: int) -> torch.Tensor:
    """Shazeer et al. (2017)'s differentiable load per expert: the sum over tokens of the probability
    that expert i stays in the top-k when only its own noise is redrawn,
    `Phi((clean_i - threshold_i) / std_i)`, the threshold being the k-th largest noisy logit of the
    others: the (k+1)-th largest overall when i is selected, the k-th otherwise."""
    top = noisy.topk(top_k + 1, dim=-1).values
    selected = noisy >= top[:, top_k - 1 : top_k]
    threshold = torch.where(selected, top[:, top_k : top_k + 1], top[:, top_k - 1 : top_k])
    normal = torch.distributions.Normal(0.0, 1.0)
    return normal.cdf((clean - threshold) / noise_std).sum(dim=0)


class NoisyTopKRouter(Router):
    """Shazeer et al. (2017)'s noisy top-k gate, randomly initialised and meant for `cmoe finetune`.

    Logits `gate(x)`; in training mode plus Gaussian noise of std `softplus(noise(x))`. Selection =
    top-k of the logits plus `bias` (bias only steers selection); gate = softmax over the selected
    logits, times `1 + scale`. Each training forward stores `balance_loss` = CV^2 of the experts'
    summed gates (importance) + CV^2 of their smooth load, for the trainer to add; evaluation adds no
    noise and stores no loss.
    """

    NOISE_FLOOR = 1e-2
    FINETUNED = ("scale", "gate.weight", "noise.weight")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, hidden_act: str):
        super().__init__(hidden_size, num_experts, top_k, hidden_act)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False)
        self.balance_loss: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> Routing:
        clean = self.gate(x).float() + self.bias.float()
        noise_std = None
        logits = clean
        if self.training:
            noise_std = nn.functional.softplus(self.noise(x).float()) + self.NOISE_FLOOR
            logits = clean + torch.randn_like(clean) * noise_std
        indices = logits.topk(self.top_k, dim=-1).indices
        unbiased = logits - self.bias.float()
        selected = unbiased.gather(-1, indices).softmax(dim=-1)
        weights = selected * (1.0 + self.scale.float()[indices])
        self.balance_loss = None
        if self.training:
            importance = torch.zeros_like(logits).scatter(-1, indices, selected).sum(dim=0)
            self.balance_loss = cv_squared(importance)
            if self.top_k < logits.shape[-1]:
                self.balance_loss = self.balance_loss + cv_squared(smooth_load(clean, logits, noise_std, self.top_k))
        return Routing(indices, weights, unbiased.softmax(dim=-1))


# The router classes a carved config may name. cmoe's router registry (cmoe.routers) adds to it when a
# router is registered; this table keeps the file self-contained for `trust_remote_code` users.
ROUTER_CLASSES: dict[str, type[Router]] = {
    "analytic": AnalyticRouter,
    "linear": LinearRouter,
    "linear-gate": LinearGateRouter,
    "noisy-topk": NoisyTopKRouter,
}


def finetuned_router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What `cmoe finetune` trains as router parameters (at --router-lr): each router's `finetuned_names`,
    i.e. every scale u (plus the gate and noise weights of a router that starts random) under the `cmoe`
    rule, the scoring weights under a renormalising rule."""
    routers = [module for module in model.modules() if isinstance(module, Router)]
    return [
        parameter
        for router in routers
        for name, parameter in router.named_parameters()
        if name in router.finetuned_names()
    ]


class CMoEBlock(nn.Module):
    """An MoE FFN: an always-on shared SwiGLU block plus routed SwiGLU experts.

    Tokens are grouped by expert with one sort per call and each expert runs one batched matmul
    chain over its tokens; there is no per-token Python loop.
    """

    def __init__(self, hidden_size: int, hidden_act: str, spec: MoELayerSpec):
        super().__init__()
        if spec.router not in ROUTER_CLASSES:
            raise ValueError(f"unknown router {spec.router!r}: expected one of {', '.join(ROUTER_CLASSES)}")
        self.num_experts = spec.num_experts
        self.shared = SwiGLU(hidden_size, spec.shared_size, hidden_act) if spec.shared_size > 0 else None
        self.experts = nn.ModuleList(SwiGLU(hidden_size, spec.expert_size, hidden_act) for _ in range(self.num_experts))
        self.router = ROUTER_CLASSES[spec.router](hidden_size, self.num_experts, spec.top_k, hidden_act)
        self.router.gating = spec.gating

    @property
    def top_k(self) -> int:
        """Routed experts per token: the router's, so there is one value to set."""
        return self.router.top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self.router.top_k = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.shared(x) if self.shared is not None else torch.zeros_like(x)
        if self.top_k:
            out = out.index_add(0, *self._routed(x, self.router(x)))
        return out.view(shape)

    def _routed(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every routed expert on its tokens; return (token index, weighted output) per assignment."""
        flat = routing.indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_index = order // self.top_k
        chunks = x.index_select(0, token_index).split(counts)
        outputs = torch.cat([expert(chunk) for expert, chunk, count in zip(self.experts, chunks, counts) if count])
        weights = routing.weights.reshape(-1)[order].to(outputs.dtype).unsqueeze(-1)
        return token_index, outputs * weights


class CMoEPreTrainedModel(PreTrainedModel):
    config_class = CMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
        elif isinstance(module, Router):
            module.scale.zero_()
            module.bias.zero_()
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            module.weight.fill_(1.0)


# The cache field of model outputs, under this transformers version's name.
_OUTPUT_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_argument(decoder: nn.Module) -> str:
    """The decoder forward's name for the key/value cache in this transformers version."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


class CMoEForCausalLM(CMoEPreTrainedModel, GenerationMixin):
    """The dense model's own decoder (attention untouched) with MoE blocks in the carved layers."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CMoEConfig):
        super().__init__(config)
        text_config = config.text_config
        self.model = AutoModel.from_config(text_config)
        for layer, spec in zip(self.model.layers, config.layer_specs):
            if spec is not None:
                layer.mlp = CMoEBlock(text_config.hidden_size, text_config.hidden_act, spec)
        self._no_split_modules = [type(self.model.layers[0]).__name__]
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        # transformers renamed `past_key_values` to `cache` (5.2x, the old name goes in 5.40): accept either
        # and hand the decoder the one its forward declares, so every supported version runs warning-free.
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{_cache_argument(self.model): cache},
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_OUTPUT_CACHE: getattr(outputs, _OUTPUT_CACHE)},
        )


# save_pretrained (and cmoe.io.carved) then map AutoModelForCausalLM to this class in `auto_map` and copy
# this file, with configuration_cmoe.py that it imports relatively, next to the weights.
CMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "CMoEForCausalLM",
    "CMoEPreTrainedModel",
    "CMoEBlock",
    "AnalyticRouter",
    "LinearRouter",
    "LinearGateRouter",
    "NoisyTopKRouter",
    "Router",
    "SwiGLU",
    "ROUTER_CLASSES",
]
