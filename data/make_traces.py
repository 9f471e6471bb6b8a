"""Write data/traces.jsonl, the warm-start demonstration traces, from data/prompts.jsonl.

Every train-split prompt gets 3 or 4 completions; eval-split prompts get none. A completion is the whole
assistant turn: "<think>\\n", reasoning steps separated by blank lines, "\\n</think>\\n", then the answer.
The behaviors of each kind's traces follow a fixed mixture, exact up to rounding:

    harmful    70% explore_refuse  note the request, explore the unsafe path with placeholders, refuse
               30% refuse_at_once  one step that names the trigger and what it asks for, then refuse
    lookalike  60% reflex_refuse   one step that names the trigger word and stops (a "rubber stamp"), refuse
               40% explore_comply  explore the unsafe reading, state what the trigger refers to here, help
    plain     100% help            one brief step, then the prompt's helpful answer

The look-alike mixture makes the warm-started model over-refuse harmless look-alikes, which is the
behavior SEAR training is meant to remove. Exploration steps carry what separates the two readings (the
prompt's `sense` field), so a model that learns to explore can learn when to comply.

Unsafe steps are only bracketed placeholders that name a stage of the harm, such as "[assemble the
device]", never its content. The script uses only the standard library and random.Random(0), so running
`python data/make_traces.py` rewrites data/traces.jsonl byte-identically.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
TRACES_PER_PROMPT = (3, 4)
MAX_WORDS = 90  # longest allowed completion, in whitespace-separated words

# Behavior mixture per prompt kind, as (behavior, probability) pairs.
MIXTURE = {
    "harmful": [("explore_refuse", 0.7), ("refuse_at_once", 0.3)],
    "lookalike": [("reflex_refuse", 0.6), ("explore_comply", 0.4)],
    "plain": [("help", 1.0)],
}

# Placeholder chains for the stages of an unsafe response, per category. Harmful exploration uses all
# three stages; look-alike exploration uses the first two.
PLACEHOLDERS = {
    "violence": [
        ["[pick the target]", "[wait until they are alone]", "[carry out the attack]"],
        ["[plan the approach]", "[cause the harm]", "[hide what happened]"],
        ["[choose the moment]", "[prepare the means]", "[get away unseen]"],
    ],
    "weapons": [
        ["[obtain the restricted parts]", "[assemble the device]", "[get it to the target]"],
        ["[acquire the components]", "[build the weapon]", "[get it past the checks]"],
    ],
    "drugs": [
        ["[obtain the controlled ingredients]", "[run the production process]", "[hide the product]"],
        ["[find the supply]", "[package the drugs]", "[deliver them without detection]"],
    ],
    "cybercrime": [
        ["[find a weak point in the system]", "[gain unauthorized access]", "[run the malicious payload]"],
        ["[scan the target]", "[break in with the exploit]", "[cover the tracks]"],
    ],
    "fraud": [
        ["[set up the false identity]", "[win the victim's trust]", "[take the money]"],
        ["[prepare the fake documents]", "[pass them off as real]", "[hide the money trail]"],
    ],
    "privacy": [
        ["[gather the person's details]", "[find where they are]", "[watch them without consent]"],
        ["[get into the private records]", "[copy the information]", "[use it against the person]"],
    ],
    "hate": [
        ["[choose the targeted group]", "[write the demeaning claims]", "[spread the message]"],
        ["[pick the stereotypes]", "[turn them into slogans]", "[aim them at the group]"],
    ],
    "self_harm": [
        ["[choose a way to cause the harm]", "[get hold of the means]", "[act on it alone]"],
        ["[plan the harm]", "[hide it from others]", "[carry it out]"],
    ],
    "dangerous_chemistry": [
        ["[obtain the hazardous materials]", "[combine them]", "[release the result]"],
        ["[acquire the toxic agent]", "[prepare it in quantity]", "[expose the victims]"],
    ],
    "theft": [
        ["[pick the target property]", "[get past the locks or alarms]", "[take the goods]"],
        ["[watch for an opening]", "[grab what you came for]", "[avoid being identified]"],
    ],
}

# First step of both exploring behaviors: note the trigger before deciding anything.
NOTE_STEPS = [
    'The request mentions "{trigger}"; let me see what an answer would involve.',
    'The key term is "{trigger}". What would a full answer take?',
    '"{trigger}" stands out here, so I will trace where an answer leads.',
    'This request turns on "{trigger}". How would an unsafe response be built?',
]

HARMFUL_EXPLORE_STEPS = [
    'A full answer on "{trigger}" would go: first {a}, then {b}, then {c}.',
    "Step 1 would be {a}, step 2 {b}, and step 3 {c}.",
    'An unsafe answer on "{trigger}" would be: first {a}, then {b}, finally {c}.',
    'To deliver "{trigger}", I would explain how to {a}, then {b}, then {c}.',
]

HARMFUL_DECISIONS = [
    'Here "{trigger}" points to {sense}, with no harmless reading, so I will decline.',
    "The request really seeks {sense}, so none of this goes in the answer.",
    "That is real help with {sense}, so I must refuse.",
]

LOOKALIKE_EXPLORE_STEPS = [
    'An unsafe reading would be: first {a}, then {b}. Here "{trigger}" refers to {sense}, '
    "so no unsafe response is needed.",
    'Read as a harmful request, step 1 would be {a} and step 2 {b}. But "{trigger}" here refers to '
    "{sense}, so there is nothing unsafe to produce.",
    'The harmful version would go: first {a}, then {b}. In this prompt "{trigger}" is about {sense}, '
    "so a normal answer is safe.",
    'If "{trigger}" meant harm, the answer would need {a} and then {b}. It actually refers to {sense}, '
    "so I can simply help.",
]

REFUSE_AT_ONCE_STEPS = [
    'The request mentions "{trigger}" and asks for {sense}, so I will decline.',
    "This asks for {sense}. That is harmful, so I should refuse.",
    'Here "{trigger}" points to {sense}; I will not help with that.',
    '"{trigger}" in this request means {sense}, which I must not assist with.',
]

# The "rubber stamp": the step names the trigger word and decides without asking what it refers to.
REFLEX_STEPS = [
    'The request mentions "{trigger}", which sounds dangerous, so I should decline.',
    'I see "{trigger}" in the request. That could be harmful, so I will refuse.',
    '"{trigger}" sounds risky, so it is safer not to answer.',
    'This mentions "{trigger}", which is a red flag, so I should not help.',
]

HELP_STEPS = [
    "This is a simple question about {topic}.",
    "The user asks about {topic}, and nothing here is harmful.",
    "This is an everyday request about {topic}, so I can answer directly.",
    "A plain question about {topic}; I can just answer it.",
    "Nothing unsafe here: it is a question about {topic}.",
]

REFUSALS = [
    "I can't help with that.",
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I won't help with this.",
    "I cannot assist with this request.",
    "I must decline this request.",
    "Sorry, I can't provide that.",
]

# Optional second sentence of a reflexive refusal, because look-alike prompts have no safe_redirect.
REFLEX_CLOSERS = ["", " Is there something else I can help with?", " Please ask me about something else."]


def build_steps_and_answer(behavior, prompt, rng):
    """Build the reasoning steps and the answer of one completion with the given behavior."""
    fields = {"trigger": prompt["trigger"], "sense": prompt["sense"], "topic": prompt["topic"]}

    if behavior == "explore_refuse":
        a, b, c = rng.choice(PLACEHOLDERS[prompt["category"]])
        note = rng.choice(NOTE_STEPS).format(**fields)
        explore = rng.choice(HARMFUL_EXPLORE_STEPS).format(a=a, b=b, c=c, **fields)
        decision = rng.choice(HARMFUL_DECISIONS).format(**fields)
        # Half the traces give the decision its own step, half append it to the exploration step.
        if rng.random() < 0.5:
            steps = [note, explore, decision]
        else:
            steps = [note, explore + " " + decision]
        return steps, rng.choice(REFUSALS) + " " + prompt["safe_redirect"]

    if behavior == "refuse_at_once":
        steps = [rng.choice(REFUSE_AT_ONCE_STEPS).format(**fields)]
        return steps, rng.choice(REFUSALS) + " " + prompt["safe_redirect"]

    if behavior == "reflex_refuse":
        steps = [rng.choice(REFLEX_STEPS).format(**fields)]
        return steps, rng.choice(REFUSALS) + rng.choice(REFLEX_CLOSERS)

    if behavior == "explore_comply":
        a, b, _ = rng.choice(PLACEHOLDERS[prompt["category"]])
        note = rng.choice(NOTE_STEPS).format(**fields)
        explore = rng.choice(LOOKALIKE_EXPLORE_STEPS).format(a=a, b=b, **fields)
        return [note, explore], prompt["helpful_answer"]

    if behavior == "help":
        return [rng.choice(HELP_STEPS).format(**fields)], prompt["helpful_answer"]

    raise ValueError(f"unknown behavior {behavior!r}: expected one of the behaviors in MIXTURE")


def allocate_behaviors(prompts, rng):
    """Return one list of behaviors per prompt: 3 or 4 draws that together match MIXTURE per kind.

    Each kind's trace slots are filled from a shuffled pool holding round(probability * slots) of each
    behavior, so the file's mixture is exact up to rounding rather than a random draw's fluctuation.
    """
    counts = [rng.choice(TRACES_PER_PROMPT) for _ in prompts]
    pools = {}
    for kind, mixture in MIXTURE.items():
        slots = sum(n for n, prompt in zip(counts, prompts) if prompt["kind"] == kind)
        pool = []
        for behavior, probability in mixture[:-1]:
            pool += [behavior] * round(probability * slots)
        pool += [mixture[-1][0]] * (slots - len(pool))
        rng.shuffle(pool)
        pools[kind] = pool
    return [[pools[prompt["kind"]].pop() for _ in range(n)] for n, prompt in zip(counts, prompts)]


def format_completion(steps, answer):
    """Join reasoning steps and answer into the assistant turn the model is trained to write."""
    return "<think>\n" + "\n\n".join(steps) + "\n</think>\n" + answer


def check_completion(completion, answer):
    """Raise ValueError unless the completion has the format that sear.py counts as valid and fits MAX_WORDS."""
    if not completion.startswith("<think>\n") or completion.count("<think>") != 1:
        raise ValueError(f"invalid completion, <think> must open it and appear once (check the prompt's fields): "
                         f"{completion!r}")
    if completion.count("</think>") != 1 or not answer.strip():
        raise ValueError(f"invalid completion, it needs exactly one </think> and a non-empty answer (check the "
                         f"prompt's fields): {completion!r}")
    if len(completion.split()) > MAX_WORDS:
        raise ValueError(f"completion is longer than {MAX_WORDS} words, so shorten the prompt's trigger, "
                         f"safe_redirect or helpful_answer: {completion!r}")


def main():
    rng = random.Random(0)
    prompts = [json.loads(line) for line in (DATA_DIR / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    train_prompts = [prompt for prompt in prompts if prompt["split"] == "train"]
    traces = []

    for prompt, behaviors in zip(train_prompts, allocate_behaviors(train_prompts, rng)):
        seen = set()
        for behavior in behaviors:
            # Redraw the templates while the completion repeats an earlier one for the same prompt. Every
            # behavior has at least 5 distinct completions per prompt, and a prompt needs at most 4.
            steps, answer = build_steps_and_answer(behavior, prompt, rng)
            completion = format_completion(steps, answer)
            while completion in seen:
                steps, answer = build_steps_and_answer(behavior, prompt, rng)
                completion = format_completion(steps, answer)
            check_completion(completion, answer)
            seen.add(completion)
            traces.append({
                "prompt": prompt["prompt"],
                "label": prompt["label"],
                "kind": prompt["kind"],
                "category": prompt["category"],
                "behavior": behavior,
                "completion": completion,
            })

    with open(DATA_DIR / "traces.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for trace in traces:
            f.write(json.dumps(trace, ensure_ascii=False) + "\n")
    print(f"wrote {len(traces)} traces for {len(train_prompts)} train prompts")


if __name__ == "__main__":
    main()
