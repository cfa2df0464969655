"""``qlora generate``: answer prompts with a finished run's model (base in 4 bits + the run's adapter)."""

from __future__ import annotations

import argparse
import sys

HELP = "answer prompts with a finished run's model: its base in 4 bits plus its adapter, prompts formatted like its data"

EXIT_WORDS = ("exit", "quit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the folder `qlora run --output` wrote")
    parser.add_argument("--prompt", metavar="TEXT", help="the question, as a user would ask it (formatted like the "
                        "run's training data before it is given to the model)")
    parser.add_argument("--interactive", "-i", action="store_true",
                        help="read questions from stdin, one a line, until end of input, an empty line or `exit`")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                        help="stop after this many tokens if eos has not come (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 (default): greedy; above 0: sample with this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling when --temperature is above 0 (default: 1.0, off)")


def main(args: argparse.Namespace) -> int:
    from qlora_core.framework.errors import UsageError
    from qlora_core.loop.generation import generate
    from qlora_core.tools.inference import format_prompt, load_trained

    if args.prompt is None and not args.interactive:
        raise UsageError("give a question with --prompt TEXT, or --interactive to read them from stdin")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (got {args.temperature:g})")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1] (got {args.top_p:g})")
    _, model, tokenizer, fmt = load_trained(args.run_dir)

    def answer(question: str) -> None:
        prompt, special = format_prompt(fmt, tokenizer, question)
        generate(model, tokenizer, prompt, args.max_new_tokens, stream_to=sys.stdout, temperature=args.temperature,
                 top_p=args.top_p, add_special_tokens=special)

    if args.prompt is not None:
        answer(args.prompt)
    if args.interactive:
        tty = sys.stdin.isatty()
        while True:
            if tty:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            question = line.strip()
            if not line or not question or question.lower() in EXIT_WORDS:
                break
            answer(question)
    return 0
