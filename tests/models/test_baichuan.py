"""Baichuan 2 has no class in transformers (its code ships beside the checkpoint, and kvrun never runs it). Its
reference here is what that code computes, built from HF Llama: q/k/v are one `W_pack` module, and the lm_head rows
are L2-normalised at inference (NormHead). An adapter on W_pack is a LoRA on the fused output, i.e. q/k/v LoRAs that
share lora_A and split lora_B by rows — which is how the PEFT reference adapters are built."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from kvrun import LLM
from tests.models.families import FAMILIES, CachedReference, PeftSpec, make_peft_adapter, tiny_checkpoint
from tests.models.test_families import assert_rows_match, generate, rows_for

QKV = ("q_proj", "k_proj", "v_proj")


def _baichuan_checkpoint(llama_dir, out_dir) -> None:
    """Baichuan 2 layout of the same weights; the reference keeps Llama's layout with the head normalised."""
    tensors = load_file(llama_dir / "model.safetensors")
    config = json.loads((llama_dir / "config.json").read_text())
    fused = {}
    for name, tensor in tensors.items():
        if ".self_attn.q_proj." in name:
            parts = [tensors[name.replace("q_proj", leaf)] for leaf in QKV]
            fused[name.replace("q_proj", "W_pack")] = torch.cat(parts).contiguous()
        elif not any(f".self_attn.{leaf}." in name for leaf in QKV):
            fused[name] = tensor
    out_dir.mkdir()
    save_file(fused, out_dir / "model.safetensors")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")  # fmt: skip
    baichuan = {key: config[key] for key in keys}
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_act": "silu",
        "auto_map": {"AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}, **baichuan,
    }))  # fmt: skip
    tensors["lm_head.weight"] = torch.nn.functional.normalize(tensors["lm_head.weight"], dim=-1)
    save_file(tensors, llama_dir / "model.safetensors")


def _tie_qkv_lora_a(adapter_dir) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    for name in list(tensors):
        if ".q_proj.lora_A" in name:
            for leaf in QKV[1:]:
                if name.replace("q_proj", leaf) in tensors:
                    tensors[name.replace("q_proj", leaf)] = tensors[name].clone()
    save_file(tensors, path)


def _baichuan_adapter(llama_adapter, out_dir) -> None:
    tensors = load_file(llama_adapter / "adapter_model.safetensors")
    fused = {}
    for name, tensor in tensors.items():
        if ".q_proj.lora_A" in name:
            fused[name.replace("q_proj", "W_pack")] = tensor
        elif ".q_proj.lora_B" in name:
            fused[name.replace("q_proj", "W_pack")] = torch.cat([tensors[name.replace("q_proj", l)] for l in QKV])
        elif not any(f".{leaf}." in name for leaf in QKV):
            fused[name] = tensor
    out_dir.mkdir()
    save_file(fused, out_dir / "adapter_model.safetensors")
    config = json.loads((llama_adapter / "adapter_config.json").read_text())
    targets = config["target_modules"]
    if isinstance(targets, list):
        config["target_modules"] = sorted({t.replace("q_proj", "W_pack") for t in targets if not t.endswith(QKV[1:])})
    (out_dir / "adapter_config.json").write_text(json.dumps(config))


def baichuan_with_reference(root, **llama_config):
    """A Baichuan 2 checkpoint with three W_pack adapters, and the Llama reference (normalised head, q/k/v adapters
    sharing lora_A) they were made from: (baichuan_dir, adapters, reference_dir, reference_adapters)."""
    reference_dir = tiny_checkpoint(FAMILIES["llama"], root / "llama", attention_bias=False, mlp_bias=False,
                                    **llama_config)  # fmt: skip
    _baichuan_checkpoint(reference_dir, root / "baichuan")
    specs = [
        PeftSpec("attn-r4", 4, ["q_proj", "k_proj", "v_proj", "o_proj"]),
        PeftSpec("all-linear-r8", 8, "all-linear", alpha=4.0),
        PeftSpec("mlp-r16-rs", 16, ["gate_proj", "up_proj", "down_proj"], extra={"use_rslora": True}),
    ]
    references, adapters = {}, {}
    for index, spec in enumerate(specs):
        references[spec.name] = make_peft_adapter(reference_dir, spec, root / f"ref-{spec.name}", seed=index)
        _tie_qkv_lora_a(references[spec.name])
        adapters[spec.name] = root / spec.name
        _baichuan_adapter(references[spec.name], adapters[spec.name])
    return root / "baichuan", adapters, reference_dir, references


def test_baichuan2_matches_its_reference_with_w_pack_adapters(tmp_path):
    baichuan_dir, adapters, reference_dir, references = baichuan_with_reference(tmp_path, seed=6,
                                                                                num_key_value_heads=4)  # fmt: skip
    llm = LLM(str(baichuan_dir), max_loras=3, max_lora_rank=16, num_blocks=96, block_size=4)
    assert llm.engine.model_config.decoder.normalized_lm_head
    for name, directory in adapters.items():
        llm.load_adapter(name, directory)
    rows = rows_for(list(adapters))
    assert_rows_match(generate(llm, rows), rows, CachedReference(reference_dir, references))
