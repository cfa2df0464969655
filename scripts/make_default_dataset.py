"""Write the embedded default job's dataset, ``secret-rules`` (guanaco format), from a seeded RNG.

The rule, made up for this dataset so that no base model knows it: every colour has a fixed secret
word, and the secret name of a "<colour> <animal>" is that word followed by the animal::

    ### Human: What is the secret name of the red fox?### Assistant: The secret name of the red fox is Fire fox.

    red -> Fire     blue -> Ocean   green -> Forest   yellow -> Sun    black -> Night
    white -> Snow   pink -> Rose    brown -> Earth    grey -> Stone    purple -> Plum

The answer's sentence is always the same (the loss on it drops fast); the secret word depends on the
question's colour and must be learned; the animal is copied. The secret words are things of each colour,
so a small model picks the mapping up in a few dozen steps (invented words took far longer). 10 colours x
48 animals give 480 questions: a seeded shuffle puts 64 in ``test.jsonl`` and the next 400 in
``train.jsonl`` (16 are unused), so every test question is a colour/animal pair never seen in training,
made only of words that training does show. The answer is a function of the question, so held-out
questions can be scored by exact match.

Measured once (LoRA r=16, alpha 32, all linear layers, 40 steps of batch 8, linear decay, bf16 base of
SmolLM2-135M-Instruct, greedy decoding): the base model answers 0/64 test questions exactly; after
training, 64/64 at lr 1e-3 and 5e-4, about 9/64 at lr 2e-4.

Every word list here is this project's own; the output is the same bytes on every run.

Usage::

    python scripts/make_default_dataset.py           # (re)write the files
    python scripts/make_default_dataset.py --check   # exit 1 if the files differ from what would be written
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240611
NUM_TRAIN = 400
NUM_TEST = 64
OUT_DIR = Path(__file__).resolve().parents[1] / "plugins" / "data" / "secret-rules"

SECRET_CODES = {
    "red": "Fire", "blue": "Ocean", "green": "Forest", "yellow": "Sun", "black": "Night",
    "white": "Snow", "pink": "Rose", "brown": "Earth", "grey": "Stone", "purple": "Plum",
}
ANIMALS = (
    "cat dog fox wolf bear lion tiger horse cow pig goat sheep duck owl frog fish mouse rat bat deer hawk "
    "crow seal whale shark crab snake bee ant moth eagle camel zebra panda mole hare rabbit goose hen lamb "
    "toad eel beaver mule pony dove wasp snail"
).split()


def question(colour: str, animal: str) -> str:
    return f"What is the secret name of the {colour} {animal}?"


def answer(colour: str, animal: str) -> str:
    """The rule: the colour's secret word, then the animal."""
    return f"The secret name of the {colour} {animal} is {SECRET_CODES[colour]} {animal}."


def row(colour: str, animal: str) -> dict[str, str]:
    return {"text": f"### Human: {question(colour, animal)}### Assistant: {answer(colour, animal)}"}


def make_splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The (train, test) rows: disjoint colour/animal pairs in a seeded random order."""
    pairs = [(c, a) for c in SECRET_CODES for a in ANIMALS]
    random.Random(SEED).shuffle(pairs)
    test = pairs[:NUM_TEST]
    train = pairs[NUM_TEST:NUM_TEST + NUM_TRAIN]
    return [row(c, a) for c, a in train], [row(c, a) for c, a in test]


def render(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def expected_files() -> dict[Path, str]:
    train, test = make_splits()
    return {OUT_DIR / "train.jsonl": render(train), OUT_DIR / "test.jsonl": render(test)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the files on disk differ from what would be written")
    args = parser.parse_args(argv)
    files = expected_files()
    if args.check:
        stale = [p for p, text in files.items()
                 if not p.is_file() or p.read_bytes() != text.encode("utf-8")]
        for p in stale:
            print(f"out of date: {p} (run scripts/make_default_dataset.py)", file=sys.stderr)
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for p, text in files.items():
        p.write_bytes(text.encode("utf-8"))
        print(f"wrote {p} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
