"""Adapter names → immutable refs → model slots. The engine's one door to everything LoRA."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kvrun.adapters.host_cache import HostCache
from kvrun.adapters.layer_copies import LayerCopies
from kvrun.adapters.layers import LinearWithLoRA, SliceWeights
from kvrun.adapters.merge import MergeSpec, merge_adapters
from kvrun.adapters.peft_format import (
    CONFIG_FILE, WEIGHTS_FILE, AdapterError, ParsedAdapter, load_peft_adapter, parse_adapter,
)  # fmt: skip
from kvrun.adapters.ref import AdapterRef
from kvrun.adapters.slot_pool import SlotPool
from kvrun.adapters.vocab_layers import VocabWithLoRA
from kvrun.config import LoRAConfig
from kvrun.punica import select_ops
from kvrun.runtime.layers.linear import Projection
from kvrun.runtime.layers.vocab import EMBEDDING, HEAD, VocabParallelEmbedding
from kvrun.runtime.models.spec import ModelConfig
from kvrun.runtime.models.weights import projection_slices, vocab_layers

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,199}$")


class AdapterLoadError(RuntimeError):
    """An adapter version's weights could not be placed in a slot (e.g. its files vanished): its requests end."""


class UnknownAdapterError(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {name!r} is not loaded")
        self.name = name


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or ".." in name:
        raise ValueError(f"invalid adapter name {name!r}: use letters, digits and . _ - / : @ (at most 200)")
    return name


class LoRAManager:
    def __init__(self, model: nn.Module, model_config: ModelConfig, config: LoRAConfig, replicas=None) -> None:
        """replicas: the tensor-parallel workers (kvrun.runtime.distributed.executor.Workers), which hold the same
        wrappers over their shards and receive every slot write before the step that reads it."""
        self.model_config = model_config
        self.config = config
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.ops = select_ops(self.device)
        self.slots = SlotPool(config.max_loras)
        self.host = HostCache(config.max_cpu_loras)
        self._aliases: dict[str, AdapterRef] = {}
        self._sources: dict[AdapterRef, Callable[[], ParsedAdapter]] = {}
        self._holds: dict[AdapterRef, int] = {}  # live requests per version, running or waiting
        self._wrappers = self._wrap_projections(model)
        self.copies = LayerCopies(self._vocab, config.max_full_module_slots)  # whole vocabulary-layer copies
        self.replicas = replicas
        if replicas is not None:
            replicas.call(install_worker_lora, model_config, config)

    def _wrap_projections(self, model: nn.Module) -> list[nn.Module]:
        """Put a LoRA wrapper around every Projection of the model (found by type), and index each checkpoint
        module an adapter may target → (its wrapper, the slice of that wrapper's output)."""
        slices = projection_slices(model)
        wrappers: dict[str, LinearWithLoRA] = {}
        for path in dict.fromkeys(projection for projection, _ in slices.values()):
            base = model.get_submodule(path)
            assert isinstance(base, Projection)
            parent, _, attribute = path.rpartition(".")
            wrapper = LinearWithLoRA(base, self.config.max_loras, self.config.max_lora_rank, self.ops)
            setattr(model.get_submodule(parent), attribute, wrapper)
            wrappers[path] = wrapper
        self._targets = {module: (wrappers[path], name) for module, (path, name) in slices.items()}
        return [*wrappers.values(), *self._wrap_vocab(model)]

    def _wrap_vocab(self, model: nn.Module) -> list[nn.Module]:
        """Wrap every vocabulary matrix (found by type) with the LoRA of the roles it plays, and index its checkpoint
        module names: the token embedding's and the output layer's."""
        layers = vocab_layers(model)
        self._vocab: dict[str, tuple[VocabWithLoRA, str]] = {}  # checkpoint module → (its wrapper, its role there)
        parts = []
        for path in dict.fromkeys(path for path, _ in layers.values()):
            base = model.get_submodule(path)
            assert isinstance(base, VocabParallelEmbedding)
            roles = {role for where, role in layers.values() if where == path}
            wrapper = VocabWithLoRA(base, self.config.max_loras, self.config.max_lora_rank, self.ops,
                                    embedding=EMBEDDING in roles, head=HEAD in roles,
                                    max_tokens=self.config.max_trainable_tokens,
                                    num_copies=self.config.max_full_module_slots)  # fmt: skip
            parent, _, attribute = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attribute, wrapper)
            for module, (where, role) in layers.items():
                if where == path:
                    self._targets[module] = (wrapper.embedding if role == EMBEDDING else wrapper.head, role)
                    self._vocab[module] = (wrapper, role)
            parts.extend(part for part in (wrapper.embedding, wrapper.head) if part is not None)
        return parts

    def compile_kernels(self, max_tokens: int, max_segments: int) -> None:
        """Compile the Triton LoRA kernels for every step shape up to max_tokens tokens in max_segments segments (once
        per distinct projection shape), so no live step waits on a compile. Decode shapes compile when their CUDA
        graphs are captured; nothing to do for the torch reference."""
        if self.ops.name != "triton":
            return
        from kvrun.punica.triton.configs import warm_up_shapes

        shapes = warm_up_shapes(max_tokens, max_segments)
        started = time.perf_counter()
        projections = [wrapper for wrapper in self._wrappers if isinstance(wrapper, LinearWithLoRA)]
        for wrapper in {wrapper.shape_key(): wrapper for wrapper in projections}.values():
            wrapper.run_segment_shapes(shapes)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # the scratch tensors' memory goes back before the KV cache is allocated
        logger.info("LoRA kernels ready for %d step shapes in %.1f s", len(shapes), time.perf_counter() - started)

    # -- names ---------------------------------------------------------------------------------------------------
    def load_path(self, name: str, path: str | Path) -> AdapterRef:
        """Parse and validate a PEFT directory now (errors surface here), then serve it under name."""
        check_adapter_name(name)
        parsed = self.parse_path(name, path)
        self.add(parsed, lambda: self.parse_path(name, path, parsed.ref.version))
        return parsed.ref

    def merge(self, name: str, components: list[str], spec: MergeSpec) -> AdapterRef:
        """Serve under name the merge of loaded adapters (kvrun.adapters.merge), computed now from their weights
        (in the model's dtype); later changes to the components do not change it."""
        check_adapter_name(name)
        refs = [self.resolve(component) for component in components]
        parsed = [self.host.get(ref, self._sources[ref], keep=self._in_use) for ref in refs]
        files = merge_adapters(parsed, spec, components, self.config.max_lora_rank)

        def source() -> ParsedAdapter:
            config = json.loads(files[CONFIG_FILE])
            return parse_adapter(name, config, files[WEIGHTS_FILE], self.model_config, self.config.max_lora_rank,
                                 self.dtype)  # fmt: skip

        merged = source()
        self.add(merged, source)
        return merged.ref

    def parse_path(self, name: str, path: str | Path, version: int = 0) -> ParsedAdapter:
        parsed = load_peft_adapter(path, name, self.model_config, self.config.max_lora_rank, self.dtype, version)
        for (module, part), copy in parsed.base_copies.items():
            # PEFT's load writes the saved copy into the model: served only where that changes nothing.
            if not self._vocab[module][0].holds(part.rpartition(".")[2], copy):
                raise AdapterError(
                    f"adapter {name!r}: adapter_model.safetensors holds {module}.{part}, which differs from the base "
                    "model's (a resized or retrained layer); kvrun does not serve that"
                )
        return dataclasses.replace(parsed, base_copies={}) if parsed.base_copies else parsed

    def _check_vocab_features(self, name: str, parsed: ParsedAdapter) -> None:
        """Refuse trainable tokens and whole layer copies this engine cannot hold or PEFT would compute otherwise."""
        def fail(message: str) -> AdapterError:
            return AdapterError(f"adapter {name!r}: {message}")

        if parsed.full_copies and not self.config.max_full_module_slots:
            raise fail(
                f"modules_to_save ({', '.join(sorted(parsed.full_copies))}) needs a whole copy of the layer per "
                "adapter, and this engine has no full-module slots: start it with --max-full-module-slots N "
                "(LLM(max_full_module_slots=N))"
            )
        for module, copy in parsed.full_copies.items():
            has_bias = self._vocab[module][0].base.bias is not None
            if has_bias != ("bias" in copy):
                raise fail(f"the saved copy of {module} {'lacks' if has_bias else 'has'} a bias, which the base "
                           f"model's {'has' if has_bias else 'lacks'}")  # fmt: skip
        adapted = {(id(wrapper), role) for module in parsed.weights if module in self._vocab
                   for wrapper, role in [self._vocab[module]]}  # fmt: skip
        for module, (ids, _) in parsed.token_rows.items():
            wrapper, role = self._vocab[module]
            if len(ids) > self.config.max_trainable_tokens:
                raise fail(f"trainable_token_indices lists {len(ids)} tokens for {module}; this engine serves up to "
                           f"{self.config.max_trainable_tokens} per layer (--max-trainable-tokens, "
                           "LLM(max_trainable_tokens=N))")  # fmt: skip
            if (id(wrapper), role) in adapted:
                raise fail(f"trainable tokens and LoRA on {module} (one vocabulary matrix, tied embeddings "
                           "included) together are not served")  # fmt: skip
            if role == HEAD and wrapper.base.bias is not None:
                raise fail(f"trainable tokens on {module}, an output layer with a bias, are not served (PEFT "
                           "computes that layer without its bias then)")  # fmt: skip

    def add(self, parsed: ParsedAdapter, source: Callable[[], ParsedAdapter]) -> None:
        """Point parsed.ref.name at this version; requests already running keep the version they started with."""
        self._check_vocab_features(parsed.ref.name, parsed)
        self._sources[parsed.ref] = source
        self.copies.add(parsed)
        self.host.put(parsed, keep=self._in_use)
        previous = self._aliases.get(parsed.ref.name)
        self._aliases[parsed.ref.name] = parsed.ref
        if previous is not None and previous != parsed.ref:
            self._forget_if_idle(previous)
        logger.info("adapter %s ready (rank %d, %s)", parsed.ref, parsed.ref.rank, ",".join(parsed.ref.target_modules))

    def remove(self, name: str) -> AdapterRef:
        ref = self.resolve(name)
        del self._aliases[name]
        self._forget_if_idle(ref)
        return ref

    def resolve(self, name: str) -> AdapterRef:
        ref = self._aliases.get(name)
        if ref is None:
            raise UnknownAdapterError(name)
        return ref

    def names(self) -> dict[str, AdapterRef]:
        return dict(self._aliases)

    def hold(self, name: str) -> AdapterRef:
        """Resolve name for a new request and keep that version loadable until the request ends."""
        ref = self.resolve(name)
        self._holds[ref] = self._holds.get(ref, 0) + 1
        return ref

    def unhold(self, ref: AdapterRef) -> None:
        count = self._holds.pop(ref, 0) - 1
        if count > 0:
            self._holds[ref] = count
        else:
            self._forget_if_idle(ref)

    def holds(self, ref: AdapterRef) -> int:
        return self._holds.get(ref, 0)

    # -- slots ---------------------------------------------------------------------------------------------------
    def acquire(self, ref: AdapterRef) -> int | None:
        """Pin ref into a slot (and its whole layer copies into a full-module slot), loading its weights if needed;
        None when every slot it needs is pinned by running requests."""
        copied = self.copies.modules(ref)
        copy = None
        if copied is not None:
            copy = self._acquire_copy(ref)
            if copy is None:
                return None
        placed = self.slots.acquire(ref)
        if placed is None:
            self.copies.release(ref)
            return None
        slot, evicted, needs_load = placed
        if evicted is not None:
            self._forget_if_idle(evicted)
        try:
            if needs_load:
                self._write_slot(slot, self.host.get(ref, self._sources[ref], keep=self._in_use))
            if copy is not None:
                self._map_copies(slot, copy, copied)
        except Exception as error:
            self.slots.release(ref)
            self.slots.discard(ref)
            self.copies.release(ref)
            raise AdapterLoadError(f"adapter {ref} could not be loaded into a slot: {error}") from error
        return slot

    def release(self, ref: AdapterRef) -> None:
        self.slots.release(ref)
        self.copies.release(ref)

    def has_full_copies(self, slot: int) -> bool:
        """Whether the adapter in slot reads whole layer copies (its steps run eagerly: LoRABatchInfo.full_copies)."""
        return self.copies.is_mapped(slot)

    def _acquire_copy(self, ref: AdapterRef) -> int | None:
        placed = self.copies.slots.acquire(ref)
        if placed is None:
            return None
        copy, _, needs_load = placed  # an evicted owner's adapter slot is remapped when it next runs
        if needs_load:
            try:
                copies = self.host.get(ref, self._sources[ref], keep=self._in_use).full_copies
                self.copies.write(copy, copies)
                if self.replicas is not None:
                    host = {module: {part: tensor.cpu() for part, tensor in parts.items()}
                            for module, parts in copies.items()}  # fmt: skip
                    self.replicas.call(write_worker_copies, copy, host)
            except Exception as error:
                self.copies.release(ref)
                self.copies.slots.discard(ref)
                raise AdapterLoadError(f"adapter {ref}'s layer copies could not be loaded: {error}") from error
        return copy

    def _map_copies(self, slot: int, copy: int, modules: frozenset[str]) -> None:
        self.copies.map(slot, copy, modules)
        if self.replicas is not None:
            self.replicas.call(map_worker_copies, slot, copy, modules)

    def _write_slot(self, slot: int, parsed: ParsedAdapter) -> None:
        weights = {
            module: SliceWeights(a, b, parsed.scaling(module), parsed.biases.get(module), parsed.magnitudes.get(module))
            for module, (a, b) in parsed.weights.items()
        }
        self.write_slot(slot, weights, parsed.token_rows)
        if self.replicas is None:
            return
        # Then every rank takes its shard of the same full weights, before the next step: an adapter rank 0 cannot
        # place fails its requests alone and never reaches the workers. What needs every rank at once comes last.
        host_rows = {module: (ids, rows.cpu()) for module, (ids, rows) in parsed.token_rows.items()}
        self.replicas.call(write_worker_slot, slot, {module: _on_host(entry) for module, entry in weights.items()},
                           host_rows)  # fmt: skip
        if any(entry.magnitude is not None for entry in weights.values()):
            self.replicas.call(finish_worker_slot, slot, here=lambda: self.finish_slot(slot))

    def write_slot(self, slot: int, weights: dict[str, SliceWeights], token_rows: dict | None = None) -> None:
        """Place one adapter's full weights per checkpoint module in slot (each wrapper keeps its shard), and its
        trainable tokens' rows (ParsedAdapter.token_rows) per vocabulary role; no layer copy is mapped to the slot
        until acquire maps its adapter's."""
        per_wrapper: dict[int, dict[str, SliceWeights]] = {}
        for module, entry in weights.items():
            wrapper, slice_name = self._targets[module]
            per_wrapper.setdefault(id(wrapper), {})[slice_name] = entry
        for wrapper in self._wrappers:
            wrapper.set_slot(slot, per_wrapper.get(id(wrapper), {}))
        rows = {(id(wrapper), role): entry for module, entry in (token_rows or {}).items()
                for wrapper, role in [self._vocab[module]]}  # fmt: skip
        for wrapper in self.copies.wrappers:  # every vocabulary wrapper
            for role, tokens in wrapper.tokens.items():
                tokens.set_slot(slot, rows.get((id(wrapper), role)))
        self.copies.map(slot, None)

    def finish_slot(self, slot: int) -> None:
        """Sum the row-parallel DoRA norms of the adapter just written into slot over the ranks (one all-reduce
        that every rank makes at once, their wrappers holding the same partials in the same order)."""
        linear = [wrapper for wrapper in self._wrappers if isinstance(wrapper, LinearWithLoRA)]
        pending = [(wrapper, index) for wrapper in linear for index, at in wrapper.dora_partials if at == slot]
        if not pending:
            return
        squares = torch.cat([wrapper.dora_partials[index, slot][0] for wrapper, index in pending])
        pending[0][0].base.tp.all_reduce(squares)
        sizes = [wrapper.dora_partials[index, slot][0].numel() for wrapper, index in pending]
        for (wrapper, index), total in zip(pending, squares.split(sizes)):
            wrapper.finish_dora(index, slot, total)

    def _in_use(self, ref: AdapterRef) -> bool:
        return self.slots.pins(ref) > 0 or self._holds.get(ref, 0) > 0

    def _forget_if_idle(self, ref: AdapterRef) -> None:
        """Free what an adapter version holds once no name points at it and no request uses it."""
        if ref in self._aliases.values() or self._in_use(ref):
            return
        self.slots.discard(ref)
        self.copies.forget(ref)
        self.host.drop(ref)
        self._sources.pop(ref, None)


# -- tensor-parallel workers (called in each worker process with its ModelRunner) -------------------------------------
def install_worker_lora(runner, model_config: ModelConfig, config: LoRAConfig) -> None:
    runner.lora = LoRAManager(runner.model, model_config, config)


def write_worker_slot(runner, slot: int, weights: dict[str, SliceWeights], token_rows: dict) -> None:
    runner.lora.write_slot(slot, weights, token_rows)


def write_worker_copies(runner, copy: int, copies: dict[str, dict[str, torch.Tensor]]) -> None:
    runner.lora.copies.write(copy, copies)


def map_worker_copies(runner, slot: int, copy: int, modules: frozenset[str]) -> None:
    runner.lora.copies.map(slot, copy, modules)


def finish_worker_slot(runner, slot: int) -> None:
    runner.lora.finish_slot(slot)


def _on_host(entry: SliceWeights) -> SliceWeights:
    def host(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.cpu()

    return SliceWeights(host(entry.a), host(entry.b), entry.scaling, host(entry.bias), host(entry.magnitude))
