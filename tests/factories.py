"""Tiny random Llama checkpoints and PEFT adapters for parity tests, built with HF transformers + PEFT themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    targets: tuple[str, ...]
    alpha: float = 16.0
    use_rslora: bool = False
    dtype: torch.dtype = torch.float32


MIXED_ADAPTERS = (
    AdapterSpec("attn-r4", 4, ("q_proj", "v_proj")),
    AdapterSpec("all-r8", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    AdapterSpec("mlp-r16-rs", 16, ("gate_proj", "up_proj", "down_proj"), alpha=8.0, use_rslora=True),
    AdapterSpec("ko-r2-half", 2, ("k_proj", "o_proj"), alpha=4.0, dtype=torch.float16),
)


def tiny_llama(path: Path, *, num_heads: int, num_kv_heads: int, tie: bool, seed: int = 0, vocab: int = 256) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wider spread than the default init, so greedy choices are far from ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_adapter(base_dir: Path, spec: AdapterSpec, out_dir: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        use_rslora=spec.use_rslora,
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():  # keep deltas noticeable but bounded
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
                param.copy_(param.to(spec.dtype).float())
    model.save_pretrained(out_dir, safe_serialization=True)
    if spec.dtype != torch.float32:
        from safetensors.torch import load_file, save_file

        weights_file = out_dir / "adapter_model.safetensors"
        save_file({k: v.to(spec.dtype) for k, v in load_file(weights_file).items()}, weights_file)
    return out_dir


class HFReference:
    """HF transformers + PEFT, one row at a time: the numeric reference for every engine output."""

    def __init__(self, base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        self.model = None
        self.adapters = set(adapter_dirs)
        for name, directory in adapter_dirs.items():
            if self.model is None:
                self.model = PeftModel.from_pretrained(base, directory, adapter_name=name)
            else:
                self.model.load_adapter(directory, adapter_name=name)
        self.base = base if self.model is None else self.model
        self.base.eval()

    @torch.no_grad()
    def greedy(self, prompt: list[int], adapter: str | None, max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy tokens and each step's full log-probabilities, recomputing the whole sequence every step."""
        ids = list(prompt)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logits = self._logits(torch.tensor([ids]), adapter)[0, -1]
            step = torch.log_softmax(logits.float(), dim=-1)
            token = int(step.argmax())
            tokens.append(token)
            logprobs.append(step)
            ids.append(token)
        return tokens, logprobs

    def _logits(self, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
        if self.model is None:
            return self.base(ids).logits
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(ids).logits
        self.model.set_adapter(adapter)
        return self.model(ids).logits
