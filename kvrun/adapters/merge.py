"""Per-request adapter merging (LoRAX's `merged_adapters`): several LoRA adapters → one derived LoRA adapter.

The result is an ordinary PEFT LoRA (adapter_config.json + adapter_model.safetensors), so it is parsed, validated,
cached, slotted and evicted like any adapter. Every strategy works module by module, on the modules any component
adapts; a component that does not adapt a module adds nothing there (it is left out of that module's merge, as PEFT's
`add_weighted_adapter` leaves it out). Each component's own PEFT scaling `s_i` (alpha / r, rsLoRA, rank_pattern,
alpha_pattern) and the request's weight `w_i` are folded into its factors, split as PEFT splits them:
`A_i · sign(w_i s_i) √|w_i s_i|` and `B_i · √|w_i s_i|`, so every merged module has scaling 1.

- `linear`: the weighted sum of the components' deltas, exactly: Σ w_i s_i B_i A_i is the LoRA with A = concat(A_i)
  and B = concat(B_i) (the scaled factors above), of rank Σ r_i. PEFT calls this `combination_type="cat"`.
  (LoRAX instead averages A and B separately, which adds cross terms B_i A_j; kvrun computes the sum.)
- `ties`, `dare_linear`, `dare_ties`: PEFT's `add_weighted_adapter` with the same `combination_type`: the strategy
  (PEFT's `peft.utils.merge_utils`) is applied to the scaled A factors and to the scaled B factors separately, so
  the components must have the same rank at every module they share, and the result keeps that rank.
  `ties` keeps the `density` fraction of largest |values| of each factor, elects a sign per element
  (`majority_sign_method`: "total" = sign of the sum, "frequency" = the most frequent sign) and averages the values
  that agree with it; `dare_*` drops each value with probability 1 - density and rescales the rest by 1 / density,
  then sums (`dare_linear`) or elects and averages as `ties` does (`dare_ties`).
- One component: every strategy is `linear` (PEFT's rule), i.e. the adapter scaled by its weight.

DARE's random drops are seeded from the content (the components' identities, the merge parameters, the module and
the factor), so every replica computes the same merged adapter for the same request, and a re-pushed component
draws anew. Per factor, one `torch.Generator` seeded with `dare_seed(...)` draws one Bernoulli mask per component
in order, exactly as PEFT's `dare_linear` / `dare_ties` draw from torch's global generator after
`torch.manual_seed(dare_seed(...))`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import torch
from safetensors.torch import save

from kvrun.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, ParsedAdapter

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_COMPONENTS = 16
MERGE_FORMAT = 1  # part of every merged identity: bump it when what a merge computes changes
_PRUNED = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}
_ELECTS_SIGN = ("ties", "dare_ties")


class MergeError(ValueError):
    """A merge that cannot be computed or served; `field` names the request field at fault."""

    def __init__(self, message: str, field: str = "ids") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """How to merge; weights are one per component (LoRAX's default: all 1)."""

    weights: tuple[float, ...]
    strategy: str = "linear"
    density: float = 1.0
    majority_sign_method: str = "total"

    def check(self, count: int) -> None:
        if not 1 <= count <= MAX_COMPONENTS:
            raise MergeError(f"ids must name 1 to {MAX_COMPONENTS} adapters, got {count}")
        if len(self.weights) != count:
            raise MergeError(f"weights has {len(self.weights)} values for {count} ids; give one per id", "weights")
        if not all(math.isfinite(weight) for weight in self.weights):
            raise MergeError("weights must be finite numbers", "weights")
        if self.strategy not in STRATEGIES:
            raise MergeError(f"merge_strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
                             "merge_strategy")  # fmt: skip
        if not (0.0 <= self.density <= 1.0):  # also refuses NaN
            raise MergeError(f"density must be in [0, 1], got {self.density!r}", "density")
        if self.density == 0.0 and self.effective_strategy(count) != "linear":  # linear ignores it, as LoRAX does
            raise MergeError(f"density 0 keeps nothing of the adapters; {self.strategy} needs a density in (0, 1]",
                             "density")  # fmt: skip
        if self.majority_sign_method not in SIGN_METHODS:
            raise MergeError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got "
                             f"{self.majority_sign_method!r}", "majority_sign_method")  # fmt: skip

    def effective_strategy(self, count: int) -> str:
        return "linear" if count == 1 else self.strategy

    def canonical(self, count: int) -> dict:
        """The parameters the result depends on (what a linear merge ignores is left out, so equal merges share one
        identity)."""
        strategy = self.effective_strategy(count)
        values: dict = {"strategy": strategy, "weights": list(self.weights)}
        if strategy != "linear":
            values["density"] = self.density
        if strategy in _ELECTS_SIGN:
            values["majority_sign_method"] = self.majority_sign_method
        return values


def merge_identity(component_identities: list[str], spec: MergeSpec) -> str:
    """sha256 naming a merged adapter: the format, the components' content identities in order, the parameters."""
    payload = {"format": MERGE_FORMAT, "components": component_identities,
               "spec": spec.canonical(len(component_identities))}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def dare_seed(identity: str, module: str, factor: str) -> int:
    """The seed of the random drops of one factor ("lora_A" or "lora_B") of one module of a merge."""
    digest = hashlib.sha256(f"{identity}:{module}:{factor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def merge_adapters(components: list[ParsedAdapter], spec: MergeSpec, labels: list[str], max_rank: int,
                   base_model: str | None = None) -> dict[str, bytes]:  # fmt: skip
    """The merged adapter's PEFT files: {adapter_config.json: ..., adapter_model.safetensors: ...} (fp32 weights).

    labels name the components in errors (what the client wrote). Raises MergeError for what cannot be merged."""
    spec.check(len(components))
    for component, label in zip(components, labels):
        _check_mergeable(component, label)
    strategy = spec.effective_strategy(len(components))
    identity = merge_identity([component.ref.identity for component in components], spec)
    modules = sorted({module for component in components for module in component.weights})
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in modules:
        a, b = _merge_module(module, components, labels, spec, strategy, identity)
        if a.shape[0] > max_rank:
            parts = " + ".join(str(c.weights[module][0].shape[0]) for c in components if module in c.weights)
            raise MergeError(
                f"the merged adapter would have rank {a.shape[0]} at {module} (a linear merge adds the adapters' "
                f"ranks: {parts}), over this server's max_lora_rank {max_rank}; merge fewer adapters, or use ties, "
                "dare_linear or dare_ties, which keep the adapters' rank"
            )
        ranks[module] = a.shape[0]
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    config = _config(ranks, base_model)
    return {CONFIG_FILE: json.dumps(config, indent=1).encode(), WEIGHTS_FILE: save(tensors)}


def _check_mergeable(component: ParsedAdapter, label: str) -> None:
    if component.magnitudes:
        raise MergeError(f"adapter {label!r} is a DoRA adapter (use_dora); DoRA's per-feature magnitudes cannot be "
                         "merged with other adapters")  # fmt: skip
    if component.biases:
        raise MergeError(f"adapter {label!r} has LoRA biases (lora_bias); merging them is not supported")
    if component.token_rows or component.full_copies:
        raise MergeError(f"adapter {label!r} has trainable tokens or whole layer copies (trainable_token_indices, "
                         "modules_to_save); merging them is not supported")  # fmt: skip
    if component.ref.invocation_tokens is not None:
        raise MergeError(f"adapter {label!r} is an activated LoRA (alora_invocation_tokens), which applies from its "
                         "invocation tokens on; merging it with other adapters is not supported")  # fmt: skip


def _merge_module(module: str, components: list[ParsedAdapter], labels: list[str], spec: MergeSpec, strategy: str,
                  identity: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    factors_a, factors_b, weights_a, weights_b, present = [], [], [], [], []
    for component, weight, label in zip(components, spec.weights, labels):
        if module not in component.weights:
            continue
        a, b = component.weights[module]
        scaled = weight * component.scaling(module)
        root = math.sqrt(abs(scaled))
        factors_a.append(a.float())
        factors_b.append(b.float())
        weights_a.append(root if scaled >= 0 else -root)  # the sign on one side only, as PEFT puts it
        weights_b.append(root)
        present.append(label)
    if strategy == "linear":
        a = torch.cat([factor * weight for factor, weight in zip(factors_a, weights_a)], dim=0)
        b = torch.cat([factor * weight for factor, weight in zip(factors_b, weights_b)], dim=1)
        return a, b
    ranks = [factor.shape[0] for factor in factors_a]
    if len(set(ranks)) > 1:
        listed = ", ".join(f"{label} r={rank}" for label, rank in zip(present, ranks))
        raise MergeError(f"{strategy} merges lora_A and lora_B element by element, so the adapters must have the "
                         f"same rank at every module they share; at {module}: {listed} (linear merges any ranks)")
    a = merge_factor(factors_a, weights_a, strategy, spec, dare_seed(identity, module, "lora_A"))
    b = merge_factor(factors_b, weights_b, strategy, spec, dare_seed(identity, module, "lora_B"))
    return a, b


def merge_factor(tensors: list[torch.Tensor], weights: list[float], strategy: str, spec: MergeSpec,
                 seed: int) -> torch.Tensor:  # fmt: skip
    """One factor (all components' lora_A, or all their lora_B, at one module) merged by a pruning strategy.

    Semantics (PEFT's merge_utils):
        pruned_i = prune(t_i)                       # ties: top-density |values|; dare: keep w.p. density, / density
        dare_linear: Σ_i w_i pruned_i
        ties, dare_ties: sign = sign(Σ_i pruned_i)  ("total") or sign(Σ_i sign(pruned_i)) ("frequency"), 0 → +
                         Σ_i w_i pruned_i [sign(pruned_i) = sign] / max(1, #{i : sign(pruned_i) = sign})
    """
    generator = torch.Generator().manual_seed(seed)
    pruned = torch.stack([_prune(tensor, spec.density, _PRUNED[strategy], generator) for tensor in tensors])
    weight = torch.tensor(weights, dtype=pruned.dtype).view(-1, *([1] * (pruned.dim() - 1)))
    if strategy not in _ELECTS_SIGN:
        return (pruned * weight).sum(dim=0)
    signs = pruned.sign()
    votes = pruned.sum(dim=0) if spec.majority_sign_method == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(votes >= 0, 1.0, -1.0)
    return (pruned * weight * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)


def _prune(tensor: torch.Tensor, density: float, method: str, generator: torch.Generator) -> torch.Tensor:
    if density >= 1.0:  # nothing dropped (and, as in PEFT, nothing drawn)
        return tensor
    if method == "magnitude":
        keep = torch.zeros(tensor.numel(), dtype=tensor.dtype)
        keep[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True).indices] = 1
        return tensor * keep.view(tensor.shape)
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def _config(ranks: dict[str, int], base_model: str | None) -> dict:
    """A PEFT LoRA config with scaling 1 at every module: lora_alpha = r, per-module ranks by exact path."""
    rank = max(ranks.values())
    pattern = {re.escape(module): value for module, value in ranks.items() if value != rank}
    return {
        "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": sorted(ranks),
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "bias": "none", "use_rslora": False,
        "base_model_name_or_path": base_model,
    }  # fmt: skip
