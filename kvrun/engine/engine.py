"""LLMEngine: requests in, one scheduled step at a time, RequestOutputs back."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrun.adapters.manager import LoRAManager, UnknownAdapterError
from kvrun.adapters.merge import MergeSpec
from kvrun.adapters.ref import AdapterRef
from kvrun.config import EngineConfig
from kvrun.engine.block_manager import BlockManager
from kvrun.engine.detokenizer import IncrementalDetokenizer
from kvrun.engine.request import Request, RequestOutput
from kvrun.engine.sampling_params import SamplingParams
from kvrun.engine.scheduler import Scheduler
from kvrun.engine.stop import check_stop, text_delta
from kvrun.engine.tokenizer import load_tokenizer
from kvrun.runtime.distributed import create_runner
from kvrun.runtime.loader import BUNDLED_NAME, resolve_model
from kvrun.runtime.memory_profile import device_start, size_engine
from kvrun.runtime.sampler import SampledBatch, SampledToken, SamplingFailure, SamplingRow, launch_sample

logger = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.01  # how long a step with nothing to run waits for a compiling grammar


class LLMEngine:
    """detokenize=False: outputs carry token ids only (their text and new_text stay empty), for a caller that makes
    the text itself from the token ids (the server's side of an engine core process, so the core's steps spend no
    time on text). Requests with stop strings are still detokenized here, since they must stop where a stop string
    appears; kvrun.engine.stop's functions let the caller reproduce the same text."""

    def __init__(self, config: EngineConfig, *, detokenize: bool = True) -> None:
        self.detokenize = detokenize
        model_dir = resolve_model(config.model, needs_weights=config.load_format != "dummy")
        self.model_name = BUNDLED_NAME if config.model is None else Path(config.model).name.removesuffix(".gguf")
        start = device_start(config.torch_device())
        self.runner = create_runner(model_dir, config, self.model_name)
        self.model_config = self.runner.model_config
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = load_tokenizer(Path(config.tokenizer) if config.tokenizer else model_dir)
        # Every automatic setting (max_num_seqs, max_num_batched_tokens, max_loras, the KV pool) is chosen here.
        self.config, self.memory_plan = size_engine(self.runner, config, start)
        self._init_pools(self.config)
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self._eos.add(self.tokenizer.eos_token_id)
        self._grammars = None  # GrammarCompiler, made for the first request with structured output
        # A step launched on the device whose sampled tokens are not settled yet (async scheduling; see step)
        self._in_flight: _InFlight | None = None
        self.async_scheduling = self.config.resolved_async_scheduling()

    def _init_pools(self, config: EngineConfig) -> None:
        self.adapters = None
        if config.lora.max_loras > 0:
            self.adapters = LoRAManager(self.runner.model, self.model_config, config.lora, self.runner.workers)
        if self.adapters is not None:  # before the KV cache takes the memory its scratch tensors use
            self.adapters.compile_kernels(config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs)
        self.runner.init_kv_cache(config.cache.num_blocks)
        if config.cuda_graphs and self.runner.device.type == "cuda":
            reserved = torch.cuda.memory_reserved(self.runner.device)
            self.runner.capture_graphs(
                config.scheduler.max_num_seqs, config.graph_step_tokens(), with_lora=self.adapters is not None
            )
            if self.memory_plan is not None:
                used = torch.cuda.memory_reserved(self.runner.device) - reserved
                logger.info("CUDA graphs took %.2f GiB (planned %.2f GiB)", used / 2**30, self.memory_plan.graphs / 2**30)
        cache = config.cache
        self.blocks = BlockManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching)
        length_regime = self.runner.model.length_regime if self.runner.needs_token_seq_lens else None
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.adapters, length_regime)

    def shutdown(self) -> None:
        """Stop what runs beside this process (tensor-parallel workers); the engine takes no more steps."""
        self.runner.shutdown()

    # -- adapters ------------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> AdapterRef:
        return self._lora().load_path(name, path)

    def unload_adapter(self, name: str) -> AdapterRef:
        return self._lora().remove(name)

    def merge_adapters(self, name: str, components: list[str], spec: MergeSpec) -> AdapterRef:
        return self._lora().merge(name, components, spec)

    def _lora(self) -> LoRAManager:
        if self.adapters is None:
            raise ValueError("LoRA is disabled (max_loras=0)")
        return self.adapters

    # -- requests ------------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be a non-empty list of ints in [0, {self.model_config.vocab_size})")
        return list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request. params: every SamplingParams field is honoured (see its docstring for the meanings,
        ranges and the order the sampler applies them in). Raises ValueError for what this engine cannot serve
        (too long, a logit_bias id outside the vocabulary, an invalid structured-output spec) and
        UnknownAdapterError for an adapter that is not loaded; nothing is queued then."""
        params = params or SamplingParams()
        token_ids = self.tokenize(prompt)
        self._check_length(len(token_ids), params.max_tokens)
        self._check_sampling(params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        grammar = None if params.structured_output is None else self.grammars().start(params.structured_output)
        ref = None
        if adapter is not None:
            if self.adapters is None:
                raise UnknownAdapterError(adapter)
            ref = self.adapters.hold(adapter)
        # A seeded request draws from its own generator, so its tokens never depend on its batch; the others share
        # the device's default generator (one draw per step for all of them).
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        detokenizer = None
        if self.tokenizer is not None and (self.detokenize or params.stop):
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        request = Request(request_id, token_ids, params, ref, detokenizer, generator)
        if ref is not None:
            request.adapter_start = ref.start_position(token_ids)
        request.grammar = grammar
        request.sampling = SamplingRow(
            params, generator, request.prompt_token_ids, request.output_token_ids, self._held_token_ids(params)
        )
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request

    def _check_sampling(self, params: SamplingParams) -> None:
        vocab_size = self.model_config.vocab_size
        outside = sorted(token for token in params.logit_bias or () if token >= vocab_size)
        if outside:
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {vocab_size}, got {outside[:5]}")

    def grammars(self):
        """The GrammarCompiler for this model's tokenizer, made on first use (it loads xgrammar and reads the
        vocabulary). A grammar not in its cache compiles on its worker thread while the request's prompt prefills."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer, and this model has none")
            from kvrun.structured.compiler import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self._eos)
        return self._grammars

    def _check_length(self, prompt_len: int, max_tokens: int) -> None:
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds the model's context "
                f"length {self.max_model_len}"
            )
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if total > capacity:
            raise ValueError(f"prompt + max_tokens = {total} tokens exceeds the KV cache's {capacity} tokens")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self._requests.get(request_id)
        if request is None:
            return None
        request.finish_reason = "abort"
        return self._finish(request)

    def has_unfinished(self) -> bool:
        """Requests wait, run, or have a token on its way to the host (rows of requests ended since are dropped)."""
        flying = self._in_flight is not None and any(request.pending_row >= 0 for request in self._in_flight.requests)
        return self.scheduler.has_unfinished() or flying

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def _held_token_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """The tokens min_tokens holds back: every token that would end the request."""
        if params.min_tokens == 0:
            return ()
        held = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos)
        return tuple(sorted(token for token in held if token < self.model_config.vocab_size))

    # -- the loop --------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled step. Never raises for one row: a row that fails ends alone with finish_reason "error".

        With async scheduling the outputs are those of the step before: this step is scheduled and launched on the
        device first, its decode rows reading their last token from the previous step's sampled tokens on the
        device, and only then are the previous step's tokens read on the host and settled (stops, text, grammar). So
        the host's work for one step runs while the device computes the last one. A row whose request ended with the
        previous step's token has run one token too many: it is dropped. Sampling itself waits for the settling, so
        penalties, grammars and stop conditions always see every token before them."""
        batch = self.scheduler.schedule()
        outputs = [self._end_with_error(request, reason) for request, reason in self.scheduler.take_failed()]
        in_flight, self._in_flight = self._in_flight, None
        if batch is not None:
            requests = [self._requests[scheduled.request_id] for scheduled in batch.sampling_requests()]
            try:
                logits = self.runner.execute(batch, in_flight.sampled.tokens if in_flight is not None else None)
            except BaseException:
                self.scheduler.abandon_step()
                for request in in_flight.requests if in_flight is not None else ():
                    request.pending_row = -1  # that step's tokens are lost with this one
                raise
        if in_flight is not None:
            outputs += self._settle_step(in_flight)
        if batch is not None:
            self._in_flight = self._launch_sampling(requests, logits)
            if not self.async_scheduling and self._in_flight is not None:
                outputs += self._settle_step(self._in_flight)
                self._in_flight = None
        elif in_flight is None and not outputs:
            # Nothing could run: what is left waits for grammars to compile. Wait a moment for one rather than spin
            # (a caller steps again at once), leaving the compile the CPU.
            for grammar in self.scheduler.compiling_grammars()[:1]:
                grammar.wait(GRAMMAR_WAIT_S)
        return outputs

    def _launch_sampling(self, requests: list[Request], logits: torch.Tensor) -> _InFlight | None:
        """Queue the sampling of a launched step's rows; the requests that have not ended meanwhile count the token
        they will get (pending_row), so the next step can be scheduled before it reaches the host."""
        live = [row for row, request in enumerate(requests) if not request.is_finished]
        if not live:
            return None
        # Filled while the device computes the logits (the forward pass was only launched): rows without a
        # grammar are neither masked nor waited for.
        constrained = {row: requests[row].grammar for row in live if requests[row].grammar is not None}
        allowed = self._grammars.bitmask(constrained) if constrained else None
        sampled = launch_sample(logits, [request.sampling for request in requests], allowed, self.async_scheduling)
        for row in live:
            requests[row].pending_row = row
        return _InFlight(requests, sampled)

    def _settle_step(self, in_flight: _InFlight) -> list[RequestOutput]:
        outputs = []
        for request, result in zip(in_flight.requests, in_flight.sampled.results()):
            if request.pending_row < 0:
                continue  # it ended (aborted, or by its previous token) after this step was launched
            request.pending_row = -1
            outputs.append(self._settle(request, result))
        return outputs

    def _end_with_error(self, request: Request, reason: str) -> RequestOutput:
        logger.warning("request %s failed: %s", request.request_id, reason)
        request.finish_reason, request.stop_reason, request.error = "error", None, reason
        return self._finish(request)

    def _settle(self, request: Request, result: SampledToken | SamplingFailure) -> RequestOutput:
        """Append the row's token, or end the request with the reason it has none; either way one output."""
        num_tokens, previous_text = len(request.output_token_ids), request.text
        try:
            if isinstance(result, SamplingFailure):
                raise RowError(result.reason)
            return self._append(request, result)
        except Exception as error:  # noqa: BLE001 - this request ends; the batch and every other request go on
            if isinstance(error, RowError):
                logger.warning("request %s failed: %s", request.request_id, error)
            else:
                logger.exception("request %s failed", request.request_id)
            # The failed step adds nothing: the request ends with what it had before it.
            del request.output_token_ids[num_tokens:], request.logprobs[num_tokens:]
            request.text = previous_text
            request.finish_reason, request.stop_reason = "error", None
            request.error = str(error) if isinstance(error, RowError) else f"{type(error).__name__}: {error}"
            return self._finish(request, previous_text)

    def _append(self, request: Request, token: SampledToken) -> RequestOutput:
        if request.grammar is not None and not request.grammar.accept(token.token_id):
            raise RowError(f"token {token.token_id} does not continue the request's structured output")
        request.output_token_ids.append(token.token_id)
        if request.params.logprobs is not None:
            request.logprobs.append({token.token_id: token.logprob, **(token.top_logprobs or {})})
        previous_text = request.text
        if request.detokenizer is not None:
            request.text += request.detokenizer.step(request.output_token_ids)
        check_stop(request, self._eos, len(previous_text))
        if request.finish_reason is None and request.grammar is not None and request.grammar.terminated:
            request.finish_reason = "stop"  # the grammar is complete and ended (ignore_eos cannot extend it)
        if request.finish_reason is not None:
            return self._finish(request, previous_text, [token.token_id])
        return self._output(request, previous_text, [token.token_id])

    def _finish(self, request: Request, previous_text: str | None = None, new_ids: list[int] = ()) -> RequestOutput:
        self.scheduler.finish(request)
        request.pending_row = -1  # a token still on its way (async scheduling) is dropped
        if request.adapter is not None:
            self.adapters.unhold(request.adapter)
        del self._requests[request.request_id]
        return self._output(request, request.text if previous_text is None else previous_text, list(new_ids))

    def _output(self, request: Request, previous_text: str, new_ids: list[int]) -> RequestOutput:
        shown, new_text = "", ""
        if self.detokenize:
            shown, new_text = text_delta(request.params.stop, previous_text, request.text, request.is_finished)
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=shown,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            adapter=None if request.adapter is None else request.adapter.name,
            logprobs=list(request.logprobs) if request.params.logprobs is not None else None,
            error=request.error,
            queue_time=request.queue_time,
        )


@dataclass(slots=True)
class _InFlight:
    """A launched step's sampling: its rows' requests (in sampled-token order) and the tokens on their way."""

    requests: list[Request]
    sampled: SampledBatch


class RowError(Exception):
    """One request cannot go on (its sampling, grammar or text failed); it ends alone."""
