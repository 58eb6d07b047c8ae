"""Tiny random HF checkpoints of every family kvrun serves, plus PEFT adapters and a KV-cached HF reference.

Every parameter is randomised (norm scales and biases included), so a missed bias, norm variant or scale shows up
as a wrong token. Configs are small enough that a whole family's parity test runs in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # transformers config class
    overrides: dict = field(default_factory=dict)
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # LoRA-targetable leaves (HF names)
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    attention_path: str = "model.layers.{i}.self_attn"  # HF module path of layer i's attention
    layers_pattern: str = "layers"


FAMILIES = {
    "llama": Family("llama", "LlamaConfig", dict(attention_bias=True, mlp_bias=True, head_dim=16)),
    "mistral": Family("mistral", "MistralConfig", dict(sliding_window=7)),
    "qwen2": Family("qwen2", "Qwen2Config", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": Family("qwen3", "Qwen3Config", dict(head_dim=16, attention_bias=True)),
    "gemma": Family("gemma", "GemmaConfig", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "gemma2": Family("gemma2", "Gemma2Config", dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
                                                    attn_logit_softcapping=4.0, final_logit_softcapping=8.0)),
    "gemma3": Family("gemma3", "Gemma3TextConfig", dict(head_dim=16, sliding_window=6, sliding_window_pattern=2,
                                                        query_pre_attn_scalar=24, rope_local_base_freq=500.0,
                                                        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "phi3": Family("phi3", "Phi3Config", dict(original_max_position_embeddings=16, partial_rotary_factor=0.5,
                                              rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3],
                                                            "long_factor": [1.5, 2.0, 2.5, 3.0]}),
                   attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj")),
    "starcoder2": Family("starcoder2", "Starcoder2Config", dict(sliding_window=7, use_bias=True),
                         mlp=("c_fc", "c_proj")),
    "cohere": Family("cohere", "CohereConfig", dict(use_qk_norm=True, logit_scale=0.5, attention_bias=True)),
    "gpt2": Family("gpt2", "GPT2Config", dict(n_inner=96), attention=("c_attn", "attn.c_proj"),
                   mlp=("c_fc", "mlp.c_proj"), attention_path="transformer.h.{i}.attn", layers_pattern="h"),
    "gpt_neox": Family("gpt_neox", "GPTNeoXConfig", dict(rotary_pct=0.5, rotary_emb_base=500.0),
                       attention=("query_key_value", "dense"), mlp=("dense_h_to_4h", "dense_4h_to_h"),
                       attention_path="gpt_neox.layers.{i}.attention"),
    "opt": Family("opt", "OPTConfig", dict(ffn_dim=96, word_embed_proj_dim=48),
                  attention=("q_proj", "k_proj", "v_proj", "out_proj"), mlp=("fc1", "fc2"),
                  attention_path="model.decoder.layers.{i}.self_attn"),
    "phi": Family("phi", "PhiConfig", dict(partial_rotary_factor=0.4, qk_layernorm=True),
                  attention=("q_proj", "k_proj", "v_proj", "dense"), mlp=("fc1", "fc2")),
    "gpt_bigcode": Family("gpt_bigcode", "GPTBigCodeConfig", dict(n_inner=96), attention=("c_attn", "attn.c_proj"),
                          mlp=("c_fc", "mlp.c_proj"), attention_path="transformer.h.{i}.attn", layers_pattern="h"),
    "falcon": Family("falcon", "FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2, bias=True,
                                                    ffn_hidden_size=96, rope_theta=500.0),
                     attention=("query_key_value", "self_attention.dense"), mlp=("dense_h_to_4h", "dense_4h_to_h"),
                     attention_path="transformer.h.{i}.self_attention", layers_pattern="h"),
    "bloom": Family("bloom", "BloomConfig", {}, attention=("query_key_value", "self_attention.dense"),
                    mlp=("dense_h_to_4h", "dense_4h_to_h"), attention_path="transformer.h.{i}.self_attention",
                    layers_pattern="h"),
    "mpt": Family("mpt", "MptConfig", dict(attn_config={"clip_qkv": 0.6}), attention=("Wqkv", "out_proj"),
                  mlp=("up_proj", "down_proj"), attention_path="transformer.blocks.{i}.attn", layers_pattern="blocks"),
}  # fmt: skip


def _randomise(model: torch.nn.Module, seed: int, std: float) -> None:
    """Every parameter random: norm scales in [1 - 5 std, 1 + 5 std], weights and biases N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name  # GPT-2's ln_1, Falcon's ln_attn, ...
            if is_norm and name.endswith("weight"):  # scales near 1 (or near 0 for (1 + w) norms: still random)
                param.copy_(1 + (torch.rand(param.shape, generator=generator) - 0.5) * 10 * std)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tiny_checkpoint(family: Family, path: Path, seed: int = 0, std: float = 0.1, **extra) -> Path:
    """std 0.1 spreads a tiny model's logits far from ties (CPU, fp32); wider models want HF's 0.02 so bf16 error
    stays comparable to real checkpoints'."""
    import transformers

    config = getattr(transformers, family.config_class)(**{**TINY, **family.overrides, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomise(model, seed, std)
    model.save_pretrained(path, safe_serialization=True)
    return path


@dataclass(frozen=True)
class PeftSpec:
    name: str
    rank: int
    targets: object  # list of names, or a pattern string
    alpha: float = 16.0
    extra: dict = field(default_factory=dict)


def standard_adapters(family: Family) -> list[PeftSpec]:
    """≥ 3 adapters as teams train them: all-linear, a list with exclude_modules, an MLP-only rsLoRA on layer 0."""
    first_attention = f"{family.attention_path.format(i=1)}.{family.attention[0]}"
    return [
        PeftSpec("all-linear-r8", 8, "all-linear"),
        PeftSpec("attn-r4-excl", 4, list(family.attention), alpha=8.0, extra={"exclude_modules": [first_attention]}),
        PeftSpec("mlp-r16-rs-l0", 16, list(family.mlp), alpha=8.0,
                 extra={"use_rslora": True, "layers_to_transform": [0],
                        "layers_pattern": family.layers_pattern}),  # fmt: skip
    ]


def make_peft_adapter(base_dir: Path, spec: PeftSpec, out_dir: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.targets, init_lora_weights=False,
                        lora_dropout=0.0, **spec.extra)  # fmt: skip
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
            elif "trainable_tokens_delta" in name or "modules_to_save" in name:  # trained away from the base copy
                param.add_(torch.randn_like(param), alpha=0.05)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


class SoloReferences:
    """HF + PEFT with one adapter loaded at a time (PEFT cannot load a second adapter with trainable tokens into one
    model): each row's reference is the base model with its adapter alone."""

    def __init__(self, base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
        self.base_dir, self.adapter_dirs, self.loaded = base_dir, adapter_dirs, {}

    def greedy(self, prompt: list[int], adapter: str | None, max_tokens: int):
        if adapter not in self.loaded:
            dirs = {} if adapter is None else {adapter: self.adapter_dirs[adapter]}
            self.loaded[adapter] = CachedReference(self.base_dir, dirs)
        return self.loaded[adapter].greedy(prompt, adapter, max_tokens)


class CachedReference:
    """HF transformers + PEFT generating with its KV cache, one row at a time (the reference for every family,
    including rotary schemes whose frequencies follow the sequence length)."""

    def __init__(self, base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
        self.model = base
        for index, (name, directory) in enumerate(adapter_dirs.items()):
            if index == 0:
                self.model = PeftModel.from_pretrained(base, directory, adapter_name=name)
            else:
                self.model.load_adapter(directory, adapter_name=name)
        self.peft = bool(adapter_dirs)
        self.model.eval()

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: str | None, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        if not self.peft:
            return self._greedy(prompt, max_tokens)
        if adapter is None:
            with self.model.disable_adapter():
                return self._greedy(prompt, max_tokens)
        self.model.set_adapter(adapter)
        return self._greedy(prompt, max_tokens)

    def _greedy(self, prompt: list[int], max_tokens: int):
        self._reset_rotary()
        out = self.model(torch.tensor([prompt]), use_cache=True)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            step = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            token = int(step.argmax())
            tokens.append(token)
            logprobs.append(step)
            out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return tokens, logprobs

    def _reset_rotary(self) -> None:
        # Dynamic NTK keeps state across calls in HF; every row starts from the pretrained frequencies.
        for module in self.model.modules():
            if hasattr(module, "original_inv_freq") and hasattr(module, "max_seq_len_cached"):
                module.inv_freq = module.original_inv_freq.clone()
                module.max_seq_len_cached = module.original_max_seq_len
