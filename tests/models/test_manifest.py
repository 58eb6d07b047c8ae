"""The registry's push-time shape check and the engine's load-time check read the same table: the one the model's
own modules give (`kvrun model-manifest`), for any family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adapters_registry import errors, open_store
from tests.models.families import FAMILIES, PeftSpec, make_peft_adapter, tiny_checkpoint


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_manifest_from_the_cli_checks_pushes_for_a_fused_family(tmp_path):
    phi3 = tiny_checkpoint(FAMILIES["phi3"], tmp_path / "phi3")
    llama = tiny_checkpoint(FAMILIES["llama"], tmp_path / "llama")
    result = subprocess.run([sys.executable, "-m", "kvrun.cli", "model-manifest", str(phi3)],
                            capture_output=True, text=True, check=True)  # fmt: skip
    manifest = json.loads(result.stdout)
    assert manifest["architecture"] == "Phi3ForCausalLM"
    assert manifest["modules"]["model.layers.*.self_attn.qkv_proj"] == [64, 64 + 2 * 32]
    assert "model.layers.*.self_attn.q_proj" not in manifest["modules"]

    store = open_store(f"file://{tmp_path / 'registry'}")
    store.set_base_config("tiny/phi3", manifest)
    fits = make_peft_adapter(phi3, PeftSpec("all", 4, "all-linear"), tmp_path / "fits", seed=1)
    assert store.push(fits, "team/phi3-all", base_model="tiny/phi3").version == 1
    llama_shaped = make_peft_adapter(llama, PeftSpec("q", 4, ["q_proj"]), tmp_path / "misfit", seed=1)
    with pytest.raises(errors.BaseModelMismatchError, match="not a LoRA-targetable module"):
        store.push(llama_shaped, "team/llama-on-phi3", base_model="tiny/phi3")
