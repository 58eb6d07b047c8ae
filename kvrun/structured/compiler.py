"""Grammars compiled against the model's tokenizer, one matcher per request, and a step's token bitmask."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar

from kvrun.runtime.sampler import TokenBitmask
from kvrun.structured.grammar import parse, reason
from kvrun.structured.spec import StructuredOutputParams

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (by spec); a compiled JSON schema for a 50k vocabulary is ~100 KB


class GrammarCompiler:
    """The model's tokenizer as xgrammar sees it, compiled grammars (LRU by spec) and matchers for requests.

    vocab_size is the logits' width: ids the tokenizer does not know (padding) are never allowed. stop_token_ids are
    the tokens that end a request (EOS); a grammar allows them where its language may end.

    A grammar not in the cache compiles on a worker thread (xgrammar releases the GIL) while the request's prompt
    is prefilled: the engine waits for it only at the request's first sampled token, and other rows never do."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        stops = sorted(set(stop_token_ids))
        self.vocab_size = vocab_size
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        threads = max(1, min(8, os.cpu_count() or 1))
        self._compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self._batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        self._cache: OrderedDict[str, xgrammar.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # the cache is shared by the engine thread and the compiling worker
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvrun-grammar")

    def compile(self, spec: StructuredOutputParams) -> xgrammar.CompiledGrammar:
        """Raises GrammarError (a ValueError) when the spec cannot be followed."""
        key = spec.key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compiler.compile_grammar(parse(spec))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def start(self, spec: StructuredOutputParams) -> RequestGrammar:
        """A fresh matcher for one request (n choices of one call each get their own), compiled or compiling."""
        with self._lock:
            compiled = self._cache.get(spec.key())
        if compiled is not None:
            return RequestGrammar(compiled)
        return RequestGrammar(self._worker.submit(self.compile, spec))

    def bitmask(self, by_row: dict[int, RequestGrammar]) -> TokenBitmask | None:
        """{step row: its grammar} → the allowed tokens at each grammar's next position (None: no row constrained).

        A grammar whose mask cannot be computed allows nothing, so its row alone ends with a sampling failure."""
        if not by_row:
            return None
        failed: dict[int, str] = {}
        for row, grammar in by_row.items():
            try:
                grammar.matcher  # noqa: B018 - waits for a grammar still compiling
            except Exception as error:  # noqa: BLE001 - this row fails alone
                failed[row] = f"the request's grammar could not be compiled: {reason(error)}"
        rows = sorted(row for row in by_row if row not in failed)
        bits = xgrammar.allocate_token_bitmask(len(rows), self.vocab_size)
        matchers = [by_row[row].matcher for row in rows]
        try:
            if matchers:
                self._batch.batch_fill_next_token_bitmask(matchers, bits)
        except Exception:  # noqa: BLE001 - find the row that failed; the others keep their masks
            logger.exception("filling %d grammar masks failed; filling each alone", len(matchers))
            for index, matcher in enumerate(matchers):
                try:
                    matcher.fill_next_token_bitmask(bits, index)
                except Exception:  # noqa: BLE001 - this row allows nothing, and fails alone
                    logger.exception("the grammar of step row %d cannot give its next tokens", rows[index])
                    bits[index].zero_()
        return TokenBitmask(rows, bits, failed)


class RequestGrammar:
    """One request's place in its grammar. accept() every token the request appends, in order."""

    __slots__ = ("_compiled", "_matcher")

    def __init__(self, compiled: xgrammar.CompiledGrammar | Future) -> None:
        self._compiled = compiled
        self._matcher: xgrammar.GrammarMatcher | None = None

    @property
    def ready(self) -> bool:
        """Compiled (or failed to): matcher no longer waits."""
        return not isinstance(self._compiled, Future) or self._compiled.done()

    def wait(self, timeout: float) -> None:
        """Wait up to timeout seconds for the grammar to compile (or fail)."""
        if isinstance(self._compiled, Future):
            futures.wait([self._compiled], timeout)

    @property
    def matcher(self) -> xgrammar.GrammarMatcher:
        """Waits for the grammar if it is still compiling; raises what compiling it raised."""
        if self._matcher is None:
            compiled = self._compiled.result() if isinstance(self._compiled, Future) else self._compiled
            self._matcher = xgrammar.GrammarMatcher(compiled)
            self._compiled = None
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """False: the grammar does not allow this token here (the request cannot go on)."""
        return self.matcher.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        """The grammar accepted a stop token: its language is complete and nothing may follow."""
        return self.matcher.is_terminated()

