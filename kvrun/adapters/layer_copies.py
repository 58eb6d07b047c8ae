"""Full-module slots: adapters' whole copies of the vocabulary layers (PEFT's modules_to_save), pinned while requests
use them and evicted least recently used first, as adapter slots are (kvrun.adapters.slot_pool). The copies live in
each vocabulary wrapper's FullCopies (kvrun.adapters.vocab_layers); this keeps which adapter version holds which
full-module slot, and which adapter slots read one."""

from __future__ import annotations

import torch

from kvrun.adapters.peft_format import ParsedAdapter
from kvrun.adapters.ref import AdapterRef
from kvrun.adapters.slot_pool import SlotPool
from kvrun.adapters.vocab_layers import VocabWithLoRA


class LayerCopies:
    def __init__(self, vocab: dict[str, tuple[VocabWithLoRA, str]], num_slots: int) -> None:
        """vocab: checkpoint module → (its wrapper, its role there), as LoRAManager indexes them."""
        self.vocab = vocab
        self.wrappers = list({id(wrapper): wrapper for wrapper, _ in vocab.values()}.values())
        self.slots = SlotPool(num_slots)
        self._modules: dict[AdapterRef, frozenset[str]] = {}  # versions with copies → the modules copied
        self._mapped: set[int] = set()  # adapter slots whose adapter's copies the next step reads

    def add(self, parsed: ParsedAdapter) -> None:
        if parsed.full_copies:
            self._modules[parsed.ref] = frozenset(parsed.full_copies)

    def modules(self, ref: AdapterRef) -> frozenset[str] | None:
        """The modules ref holds copies of; None for an adapter without copies."""
        return self._modules.get(ref)

    def release(self, ref: AdapterRef) -> None:
        if ref in self._modules:
            self.slots.release(ref)

    def forget(self, ref: AdapterRef) -> None:
        """Drop an idle version (LoRAManager._forget_if_idle)."""
        if self._modules.pop(ref, None) is not None:
            self.slots.discard(ref)

    def is_mapped(self, slot: int) -> bool:
        return slot in self._mapped

    def write(self, copy: int, copies: dict[str, dict[str, torch.Tensor]]) -> None:
        """Place ParsedAdapter.full_copies in full-module slot `copy` (each rank keeps its vocabulary rows)."""
        for module, parts in copies.items():
            wrapper, role = self.vocab[module]
            wrapper.copies[role].write(copy, parts)

    def map(self, slot: int, copy: int | None, modules: frozenset[str] = frozenset()) -> None:
        """Point adapter slot at full-module slot `copy` in the roles of `modules`, at none in the others (copy None:
        at none at all, for an adapter without copies)."""
        roles = {(id(wrapper), role) for module in modules for wrapper, role in [self.vocab[module]]}
        for wrapper in self.wrappers:
            for role, copies in wrapper.copies.items():
                copies.of_slot[slot] = copy if copy is not None and (id(wrapper), role) in roles else -1
        if copy is None:
            self._mapped.discard(slot)
        else:
            self._mapped.add(slot)
