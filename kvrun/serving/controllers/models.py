"""GET /v1/models and /v1/models/{id} (OpenAI / vLLM), and vLLM's /tokenize, /detokenize and /version.

/v1/models lists what a request can name and this server can serve: the base model, adapters loaded by path, and
registry adapters (and their tags) whose rank fits `--max-lora-rank` and whose recorded base model, when the push
named one, is this one. /v1/adapters lists the rest too, with the reason (`why_not_servable`).
"""

from __future__ import annotations

import logging

from adapters_registry import AdapterSummary, RegistryError
from adapters_registry.records import VersionRecord
from litestar import Controller, Request, get, post

from kvrun.serving import errors
from kvrun.serving.auth import require_api_key
from kvrun.serving.decoding import decode
from kvrun.serving.openai_format import chat_messages, render_chat
from kvrun.serving.registry_client import RegistryUnavailable
from kvrun.serving.responses import DetokenizeResponse, ModelCard, ModelList, TokenizeResponse
from kvrun.serving.schemas import DetokenizeRequest, TokenizeRequest
from kvrun.serving.state import Serving
from kvrun.serving.tools import template_renders_tools, tool_dicts

logger = logging.getLogger(__name__)


async def registry_adapters(serving: Serving) -> list[AdapterSummary] | None:
    """Every registry adapter; None when the registry does not answer (in bounded time, on its own pool)."""
    if serving.registry is None:
        return []
    try:
        return await serving.registry.call(serving.registry.store.list_adapters)
    except (RegistryUnavailable, RegistryError) as error:
        logger.warning("cannot list the registry: %s", error)
        return None


def why_not_servable(serving: Serving, record: VersionRecord) -> str | None:
    """Why this server cannot serve a registry version, as far as its record tells (None: it can, as far as
    anything short of fetching it tells; shapes are checked when it is fetched)."""
    config = serving.config
    if record.rank > config.max_lora_rank:
        return f"rank {record.rank} exceeds this server's --max-lora-rank {config.max_lora_rank}"
    if record.modules_to_save and not config.max_full_module_slots:
        return (f"holds whole copies of {', '.join(record.modules_to_save)} (modules_to_save); this server has no "
                "--max-full-module-slots")  # fmt: skip
    # Names of one model differ by where it lives (`org/Model` on a hub, `/models/Model` here): compare last parts.
    bases = {_last_part(name) for name in (*serving.resolver.base_names, config.model or "")}
    if record.base_model and _last_part(record.base_model) not in bases:
        return f"pushed for base model {record.base_model!r}; this server serves {serving.model_name!r}"
    return None


def _last_part(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf").lower()


def _cards(serving: Serving, summaries: list[AdapterSummary]) -> list[ModelCard]:
    base = serving.model_name
    created = serving.started
    cards = [ModelCard(base, created, "kvrun", serving.config.model or base, None, serving.service.max_model_len)]
    for name, path in sorted(serving.resolver.local.items()):
        cards.append(ModelCard(name, created, "kvrun", path, base))
    for summary in summaries:
        latest_servable = why_not_servable(serving, summary.latest) is None
        if latest_servable:
            cards.append(ModelCard(summary.name, created, "kvrun", summary.latest.ref, base))
        for tag, version in sorted(summary.tags.items()):
            # Only the latest version's record comes with the listing; a tag on another version is checked on fetch.
            if tag != "latest" and (version != summary.latest.version or latest_servable):
                cards.append(ModelCard(f"{summary.name}:{tag}", created, "kvrun", f"{summary.name}@{version}", base))
    return cards


class ModelsController(Controller):
    path = "/"
    guards = [require_api_key]

    @get("/v1/models", tags=["OpenAI"], summary="The base model and the adapters this server can serve")
    async def models(self, request: Request) -> ModelList:
        serving: Serving = request.app.state.serving
        return ModelList(_cards(serving, await registry_adapters(serving) or []))

    @get("/v1/models/{model_id:path}", tags=["OpenAI"], summary="One model or adapter (a registry ref resolves)")
    async def model(self, request: Request, model_id: str) -> ModelCard:
        serving: Serving = request.app.state.serving
        model_id = model_id.lstrip("/")
        for card in _cards(serving, await registry_adapters(serving) or []):
            if card.id == model_id:
                return card
        resolution = await serving.resolver.resolve(model_id)  # `ns/name@3` and other refs not listed: 404 if none
        if resolution.record is not None:
            why = why_not_servable(serving, resolution.record)
            if why is not None:
                raise errors.unknown_model(model_id, f"This server cannot serve it: {why}.")
            return ModelCard(model_id, serving.started, "kvrun", resolution.record.ref, serving.model_name)
        raise errors.unknown_model(model_id)

    @post("/tokenize", status_code=200, tags=["vLLM"], summary="Token ids of a prompt or chat, as generation sees them")
    async def tokenize(self, request: Request) -> TokenizeResponse:
        serving: Serving = request.app.state.serving
        data = decode(await request.body(), TokenizeRequest)
        await serving.resolver.resolve(data.model)  # an unknown model is a 404, as on the generating routes
        if (data.prompt is None) == (data.messages is None):
            raise errors.invalid("give exactly one of prompt or messages", "prompt")
        if serving.tokenizer is None:
            raise errors.invalid("this model has no tokenizer", "prompt")
        if data.messages is not None:
            rendered_tools = tool_dicts(data) if template_renders_tools(serving.tokenizer) else None
            text = render_chat(serving.tokenizer, chat_messages(data.messages), data.add_generation_prompt,
                               data.continue_final_message, data.chat_template_kwargs, rendered_tools,
                               serving.config.trust_request_chat_template)  # fmt: skip
            token_ids = serving.service.encode(text)
        else:
            token_ids = serving.tokenizer.encode(data.prompt, add_special_tokens=data.add_special_tokens)
        strings = [serving.token_text(token_id) for token_id in token_ids] if data.return_token_strs else None
        return TokenizeResponse(len(token_ids), serving.service.max_model_len, token_ids, strings)

    @post("/detokenize", status_code=200, tags=["vLLM"], summary="Text of token ids")
    async def detokenize(self, request: Request) -> DetokenizeResponse:
        serving: Serving = request.app.state.serving
        data = decode(await request.body(), DetokenizeRequest)
        await serving.resolver.resolve(data.model)
        vocab = serving.service.vocab_size
        if any(not 0 <= token < vocab for token in data.tokens):
            raise errors.invalid(f"tokens must be in [0, {vocab})", "tokens")
        if serving.tokenizer is None:
            raise errors.invalid("this model has no tokenizer", "tokens")
        return DetokenizeResponse(serving.tokenizer.decode(data.tokens))
