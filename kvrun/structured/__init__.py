"""Structured output: constrain a request's tokens to a language (a JSON schema, any JSON object, a regex, a choice
of strings, an EBNF grammar), with xgrammar as the grammar engine.

    StructuredOutputParams (spec.py: what the request asks for; checked when SamplingParams is built)
      → xgrammar Grammar (grammar.py: the spec parsed, with the reason when it cannot be)
      → CompiledGrammar (compiler.py: against the model's tokenizer, cached per spec)
      → RequestGrammar (one per request: the matcher state, advanced with every token the request appends)
      → TokenBitmask (GrammarCompiler.bitmask: one row per constrained request of a step; the sampler applies it on the logits'
                      device, and rows without a grammar are not touched)

xgrammar is imported on first use (grammar.py, compiler.py), so an engine that never sees a constrained request never
loads it.
"""

from kvrun.structured.spec import StructuredOutputParams

__all__ = ["StructuredOutputParams"]
