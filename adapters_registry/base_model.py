"""Expected LoRA shapes of a base model, from the manifest kvrun writes for it (`kvrun model-manifest MODEL`).

The manifest lists every module of the model a LoRA may target, by its checkpoint path with layer indices as `*`,
with (in_features, out_features): the serving engine derives it from the model it builds, so the registry checks
pushes against exactly what a server will accept, for any architecture kvrun serves, without knowing any of them.
The registry stores manifests by base-model name (`kvrun-adapters base set NAME manifest.json`); a push naming a
known base model must fit it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from adapters_registry.errors import BaseModelMismatchError, UsageError

MANIFEST_KEY = "kvrun_manifest"
MANIFEST_VERSION = 1
_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def generic_path(module: str) -> str:
    """`model.layers.3.mlp.up_proj` → `model.layers.*.mlp.up_proj`."""
    return _INDEX.sub(".*", module)


@dataclass(frozen=True, slots=True)
class BaseShapes:
    name: str
    architecture: str
    num_layers: int
    features: dict[str, tuple[int, int]]  # generic module path -> (in_features, out_features)

    def check_adapter(self, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        for module, (a_shape, b_shape) in shapes.items():
            self.check(module, a_shape, b_shape)

    def check(self, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
        """Raise BaseModelMismatchError if `module`'s lora_A [r, in] / lora_B [out, r] do not fit."""
        indices = [int(index) for index in _INDEX.findall(module)]
        if indices and indices[0] >= self.num_layers:
            raise BaseModelMismatchError(
                f"module {module!r}: layer {indices[0]} does not exist in base model {self.name!r} "
                f"({self.num_layers} layers)"
            )
        features = self.features.get(generic_path(module))
        if features is None:
            leaves = sorted({path.rsplit(".", 1)[-1] for path in self.features})
            raise BaseModelMismatchError(
                f"module {module!r} is not a LoRA-targetable module of base model {self.name!r} "
                f"({self.architecture}: {', '.join(leaves)})"
            )
        in_features, out_features = features
        if a_shape[1] != in_features or b_shape[0] != out_features:
            raise BaseModelMismatchError(
                f"module {module!r}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not fit base model "
                f"{self.name!r} (expected lora_A [r, {in_features}], lora_B [{out_features}, r])"
            )


def parse_base_config(data: bytes | dict[str, object], name: str) -> dict[str, object]:
    """Load a base-model manifest (bytes or a dict) and check its form."""
    if isinstance(data, bytes):
        try:
            data = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise UsageError(f"base model manifest for {name!r} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise UsageError(f"base model manifest for {name!r} must be a JSON object")
    if MANIFEST_KEY not in data:
        hint = " (this looks like a model's config.json)" if "architectures" in data or "hidden_size" in data else ""
        raise UsageError(
            f"base model manifest for {name!r} is not a kvrun manifest{hint}: write one with "
            f"`kvrun model-manifest MODEL_DIR > manifest.json` and pass that file"
        )
    if data[MANIFEST_KEY] != MANIFEST_VERSION:
        raise UsageError(f"base model manifest for {name!r} has version {data[MANIFEST_KEY]!r}; expected {MANIFEST_VERSION}")
    modules = data.get("modules")
    layers = data.get("num_layers")
    if type(layers) is not int or layers < 1 or not isinstance(modules, dict) or not modules:
        raise UsageError(f"base model manifest for {name!r} needs num_layers and a non-empty modules table")
    for path, features in modules.items():
        if not (isinstance(features, list) and len(features) == 2 and all(type(f) is int and f > 0 for f in features)):
            raise UsageError(f"base model manifest for {name!r}: module {path!r} needs [in_features, out_features]")
    return data


def base_shapes(manifest: dict[str, object], name: str) -> BaseShapes:
    modules = {path: (int(f[0]), int(f[1])) for path, f in manifest["modules"].items()}
    return BaseShapes(name, str(manifest.get("architecture", "?")), int(manifest["num_layers"]), modules)
