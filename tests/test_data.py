"""Tests for rlhf_lite.data and rlhf_lite.hh_rlhf: HH-RLHF transcript splitting and the JSONL loaders."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from rlhf_lite.data import (
    ASSISTANT,
    HUMAN,
    DataError,
    PreferencePair,
    load_preference_pairs,
    load_prompts,
    load_sft,
    read_jsonl,
    split_hh,
)
from rlhf_lite.hh_rlhf import hh_rows_to_prompts, load_hh_rlhf

# Hand-written rows in the real HH-RLHF format (turns joined by "\n\nHuman:" / "\n\nAssistant:").
SINGLE_PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
SINGLE_CHOSEN = SINGLE_PROMPT + " Put it in boiling water for about nine minutes, then cool it."
SINGLE_REJECTED = SINGLE_PROMPT + " Eggs are laid by hens."

MULTI_PROMPT = (
    "\n\nHuman: What is a good name for a cat?"
    "\n\nAssistant: Many people like names such as Luna, Milo or Oliver."
    "\n\nHuman: Something shorter?"
    "\n\nAssistant:"
)
MULTI_CHOSEN = MULTI_PROMPT + " How about Max, Pip or Tom?"
MULTI_REJECTED = MULTI_PROMPT + " No."


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Write rows as JSONL; a str row is written verbatim (for blank or broken lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def raises_data_error(fn: Callable[..., object], *args: object, **kwargs: object) -> str:
    """Call ``fn`` expecting a DataError; return its message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- split_hh


def test_split_single_turn_keeps_leading_space() -> None:
    assert split_hh(SINGLE_CHOSEN) == (
        "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        " Put it in boiling water for about nine minutes, then cool it.",
    )


def test_split_multi_turn_prompt_keeps_every_earlier_turn() -> None:
    prompt, response = split_hh(MULTI_CHOSEN)
    assert prompt == MULTI_PROMPT
    assert prompt.count(HUMAN) == 2 and prompt.count(ASSISTANT) == 2
    assert response == " How about Max, Pip or Tom?"


def test_split_cuts_at_the_last_assistant_marker() -> None:
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant: Anything else?"
    assert split_hh(text) == ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nAssistant:", " Anything else?")


def test_split_word_human_inside_response_stays_in_response() -> None:
    text = SINGLE_PROMPT + " In the transcript the speaker is labelled Human: and I answer.\nHuman: ok"
    assert split_hh(text) == (
        SINGLE_PROMPT,
        " In the transcript the speaker is labelled Human: and I answer.\nHuman: ok",
    )


def test_split_rejects_transcript_ending_with_human_turn() -> None:
    text = SINGLE_CHOSEN + "\n\nHuman: Thanks! And how long for a soft one?"
    with pytest.raises(ValueError) as info:
        split_hh(text)
    assert str(info.value) == (
        "transcript ends with a Human turn after the last '\\n\\nAssistant:', so there is no final "
        "assistant response: '\\n\\nHuman: Thanks! And how long for a soft one?'"
    )


def test_split_rejects_missing_assistant_turn() -> None:
    with pytest.raises(ValueError) as info:
        split_hh("\n\nHuman: Hello there")
    assert str(info.value) == (
        "transcript has no '\\n\\nAssistant:' turn, so there is no final response: '\\n\\nHuman: Hello there'"
    )


@pytest.mark.parametrize("response", ["", "   ", " \n\t "])
def test_split_rejects_empty_response(response: str) -> None:
    with pytest.raises(ValueError) as info:
        split_hh(SINGLE_PROMPT + response)
    assert str(info.value) == (
        f"the final response (after the last '\\n\\nAssistant:') is empty: {response!r}; "
        f"transcript ends {(SINGLE_PROMPT + response)!r}"
    )


@pytest.mark.parametrize(
    "text",
    [
        "Human: Hi\n\nAssistant: Hello.",
        " \n\nHuman: Hi\n\nAssistant: Hello.",
        "\nHuman: Hi\n\nAssistant: Hello.",
        "\n\nAssistant: Hello.",
        "",
    ],
)
def test_split_rejects_transcript_not_starting_with_human(text: str) -> None:
    with pytest.raises(ValueError) as info:
        split_hh(text)
    assert str(info.value) == f"transcript does not start with '\\n\\nHuman:'; it starts with {text!r}"


def test_split_error_excerpt_is_at_most_60_chars() -> None:
    long_text = "Hello " * 40 + "\n\nHuman: x\n\nAssistant: y"
    with pytest.raises(ValueError) as info:
        split_hh(long_text)
    expected_excerpt = repr(long_text[:57] + "...")
    assert (
        str(info.value) == f"transcript does not start with '\\n\\nHuman:'; it starts with {expected_excerpt}"
    )
    assert len(long_text[:57] + "...") == 60

    # The empty-response message quotes the END of a long transcript.
    long_prompt = "\n\nHuman: " + "why " * 30 + "\n\nAssistant:"
    with pytest.raises(ValueError) as info:
        split_hh(long_prompt + " ")
    assert str(info.value).endswith(f"transcript ends {('...' + (long_prompt + ' ')[-57:])!r}")


def test_split_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="transcript must be a str, got NoneType"):
        split_hh(None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- load_preference_pairs


def test_load_pairs_our_format_puts_extra_fields_in_meta(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "prompt": SINGLE_PROMPT,
                "chosen": SINGLE_CHOSEN,
                "rejected": SINGLE_REJECTED,
                "category": "cooking",
                "gold_chosen": 1.5,
                "gold_rejected": -0.25,
            },
            {"chosen": MULTI_CHOSEN, "rejected": MULTI_REJECTED, "category": "pets"},
        ],
    )
    assert load_preference_pairs(path) == [
        PreferencePair(
            prompt=SINGLE_PROMPT,
            chosen=" Put it in boiling water for about nine minutes, then cool it.",
            rejected=" Eggs are laid by hens.",
            meta={"prompt": SINGLE_PROMPT, "category": "cooking", "gold_chosen": 1.5, "gold_rejected": -0.25},
        ),
        PreferencePair(
            prompt=MULTI_PROMPT,
            chosen=" How about Max, Pip or Tom?",
            rejected=" No.",
            meta={"category": "pets"},
        ),
    ]


def test_load_pairs_real_hh_format_skips_blank_lines_and_honours_limit(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            "",
            {"chosen": MULTI_CHOSEN, "rejected": MULTI_REJECTED},
            "   ",
            {"chosen": SINGLE_CHOSEN, "rejected": SINGLE_REJECTED},
            "not json at all",  # beyond the limit: never read
        ],
    )
    pairs = load_preference_pairs(str(path), limit=2)
    assert [(p.prompt, p.chosen, p.rejected, p.meta) for p in pairs] == [
        (MULTI_PROMPT, " How about Max, Pip or Tom?", " No.", {}),
        (
            SINGLE_PROMPT,
            " Put it in boiling water for about nine minutes, then cool it.",
            " Eggs are laid by hens.",
            {},
        ),
    ]
    assert load_preference_pairs(path, limit=1) == pairs[:1]


def test_preference_pair_is_frozen_and_hashable() -> None:
    pair = PreferencePair(prompt="p", chosen=" a", rejected=" b", meta={"k": 1})
    with pytest.raises(AttributeError):
        pair.prompt = "q"  # type: ignore[misc]
    assert hash(pair) == hash(PreferencePair(prompt="p", chosen=" a", rejected=" b", meta={"k": 2}))
    assert PreferencePair(prompt="p", chosen=" a", rejected=" b").meta == {}


GOOD = {"chosen": SINGLE_CHOSEN, "rejected": SINGLE_REJECTED}


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        (
            '{"chosen": "x",',
            (
                "invalid JSON: Expecting property name enclosed in double quotes (column 16): "
                '\'{"chosen": "x",\''
            ),
        ),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"chosen": SINGLE_CHOSEN}), "missing required key 'rejected' (row has keys ['chosen'])"),
        (json.dumps({"chosen": SINGLE_CHOSEN, "rejected": 3}), "key 'rejected' must be str, got int: '3'"),
        (
            json.dumps({"chosen": None, "rejected": SINGLE_REJECTED}),
            "key 'chosen' must be str, got NoneType: 'null'",
        ),
        (
            json.dumps({"chosen": SINGLE_CHOSEN + "\n\nHuman: Thanks!", "rejected": SINGLE_REJECTED}),
            (
                "'chosen': transcript ends with a Human turn after the last '\\n\\nAssistant:', so there is "
                "no final assistant response: '\\n\\nHuman: Thanks!'"
            ),
        ),
        (
            json.dumps({"chosen": SINGLE_CHOSEN, "rejected": "\n\nHuman: How do I boil an egg?"}),
            (
                "'rejected': transcript has no '\\n\\nAssistant:' turn, so there is no final response: "
                "'\\n\\nHuman: How do I boil an egg?'"
            ),
        ),
        (
            json.dumps({"chosen": SINGLE_CHOSEN, "rejected": SINGLE_PROMPT + "  "}),
            (
                "'rejected': the final response (after the last '\\n\\nAssistant:') is empty: '  '; "
                "transcript ends '\\n\\nHuman: How do I boil an egg?\\n\\nAssistant:  '"
            ),
        ),
        (
            json.dumps(
                {"chosen": SINGLE_CHOSEN, "rejected": "Human: How do I boil an egg?\n\nAssistant: Hm."}
            ),
            (
                "'rejected': transcript does not start with '\\n\\nHuman:'; it starts with "
                "'Human: How do I boil an egg?\\n\\nAssistant: Hm.'"
            ),
        ),
        (
            json.dumps(
                {
                    "chosen": SINGLE_CHOSEN,
                    "rejected": "\n\nHuman: How do I fry an egg?\n\nAssistant: Hot pan.",
                }
            ),
            (
                "'chosen' and 'rejected' have different prompts; they differ at character 18: "
                "chosen 'boil an egg?\\n\\nAssistant:' vs rejected 'fry an egg?\\n\\nAssistant:'"
            ),
        ),
        (
            json.dumps({"chosen": SINGLE_CHOSEN, "rejected": SINGLE_CHOSEN}),
            (
                "'chosen' and 'rejected' responses are identical: "
                "' Put it in boiling water for about nine minutes, then coo...'"
            ),
        ),
    ],
)
def test_load_pairs_bad_row_names_file_and_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", bad_line, GOOD])
    message = raises_data_error(load_preference_pairs, path)
    assert message == f"{path}:3: {reason}"


def test_identical_response_excerpt_is_truncated(tmp_path: Path) -> None:
    long = SINGLE_PROMPT + " " + "very " * 30 + "long"
    path = write_jsonl(tmp_path / "same.jsonl", [{"chosen": long, "rejected": long}])
    message = raises_data_error(load_preference_pairs, path)
    assert (
        message
        == f"{path}:1: 'chosen' and 'rejected' responses are identical: {(' ' + 'very ' * 30)[:57] + '...'!r}"
    )


def test_data_error_fields_and_pickle(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", ["[]"])
    with pytest.raises(DataError) as info:
        load_preference_pairs(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.lineno, err.reason) == (str(path), 1, "expected a JSON object, got list")
    clone = pickle.loads(pickle.dumps(err))
    assert (str(clone), clone.path, clone.lineno) == (str(err), str(path), 1)
    assert str(DataError("bad", "f.jsonl")) == "f.jsonl: bad"
    assert str(DataError("bad")) == "bad"


def test_load_pairs_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        load_preference_pairs(missing)
    assert str(missing) in str(info.value)
    assert info.value.filename == str(missing)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_load_pairs_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert (
        raises_data_error(load_preference_pairs, path)
        == f"{path}: no rows (the data is empty or only blank lines)"
    )


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(tmp_path: Path, limit: object) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    with pytest.raises(ValueError, match="limit must be a positive int or None"):
        load_preference_pairs(path, limit=limit)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- read_jsonl


def test_read_jsonl_required_types_bom_gzip_and_utf8(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "n": 1, "score": 0.5}, {"prompt": "b", "n": 2, "score": 1}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    required = {"prompt": str, "n": int, "score": (int, float)}
    assert read_jsonl(path, required) == rows
    assert read_jsonl(path, required, limit=1) == rows[:1]

    gz = tmp_path / "rows.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_jsonl(gz, required) == rows

    bool_path = write_jsonl(tmp_path / "bool.jsonl", [{"n": 1}, {"n": True}])
    assert (
        raises_data_error(read_jsonl, bool_path, {"n": int})
        == f"{bool_path}:2: key 'n' must be int, got bool: 'true'"
    )
    assert raises_data_error(read_jsonl, bool_path, {"n": (int, float)}) == (
        f"{bool_path}:2: key 'n' must be int or float, got bool: 'true'"
    )

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    assert (
        raises_data_error(read_jsonl, latin)
        == f"{latin}:2: line is not valid UTF-8: invalid continuation byte at byte 15 of the line"
    )


# --------------------------------------------------------------------------- prompts, SFT, hh_rows_to_prompts


def test_load_prompts_keeps_other_fields(tmp_path: Path) -> None:
    rows = [{"prompt": SINGLE_PROMPT, "category": "cooking"}, {"prompt": MULTI_PROMPT}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert load_prompts(path) == rows
    assert load_prompts(path, limit=1) == rows[:1]


def test_load_prompts_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": SINGLE_PROMPT}, {"prompt": SINGLE_CHOSEN}])
    assert raises_data_error(load_prompts, path) == (
        f"{path}:2: 'prompt' must end with '\\n\\nAssistant:'; it ends "
        "'...it in boiling water for about nine minutes, then cool it.'"
    )
    path = write_jsonl(tmp_path / "prompts2.jsonl", [{"text": SINGLE_PROMPT}])
    assert (
        raises_data_error(load_prompts, path)
        == f"{path}:1: missing required key 'prompt' (row has keys ['text'])"
    )
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl")


def test_load_sft(tmp_path: Path) -> None:
    rows = [{"prompt": SINGLE_PROMPT, "response": " Boil it.", "source": "hand"}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert load_sft(path) == rows

    path = write_jsonl(tmp_path / "sft_bad.jsonl", [rows[0], {"prompt": SINGLE_PROMPT, "response": " \n"}])
    assert raises_data_error(load_sft, path) == f"{path}:2: 'response' is empty: ' \\n'"
    path = write_jsonl(tmp_path / "sft_bad2.jsonl", [{"prompt": SINGLE_PROMPT}])
    assert (
        raises_data_error(load_sft, path)
        == f"{path}:1: missing required key 'response' (row has keys ['prompt'])"
    )
    empty = tmp_path / "sft_empty.jsonl"
    empty.write_text("", encoding="utf-8")
    assert raises_data_error(load_sft, empty) == f"{empty}: no rows (the data is empty or only blank lines)"


def test_hh_rows_to_prompts_unique_in_first_seen_order() -> None:
    pairs = [
        PreferencePair(MULTI_PROMPT, " a", " b"),
        PreferencePair(SINGLE_PROMPT, " c", " d"),
        PreferencePair(MULTI_PROMPT, " e", " f"),
    ]
    assert hh_rows_to_prompts(pairs) == [{"prompt": MULTI_PROMPT}, {"prompt": SINGLE_PROMPT}]
    assert hh_rows_to_prompts([]) == []


# --------------------------------------------------------------------------- load_hh_rlhf


def test_load_hh_rlhf_from_file_and_directory(tmp_path: Path) -> None:
    rows = [{"chosen": MULTI_CHOSEN, "rejected": MULTI_REJECTED}, GOOD]
    file_path = write_jsonl(tmp_path / "hh.jsonl", rows)
    expected = load_preference_pairs(file_path)
    assert [p.prompt for p in expected] == [MULTI_PROMPT, SINGLE_PROMPT]
    assert load_hh_rlhf(file_path) == expected
    assert load_hh_rlhf(str(file_path), limit=1) == expected[:1]

    write_jsonl(tmp_path / "test.jsonl", rows[1:])
    assert load_hh_rlhf(tmp_path, split="test") == expected[1:]
    assert load_hh_rlhf(str(tmp_path), split="test") == expected[1:]

    gz_dir = tmp_path / "harmless-base"
    gz_dir.mkdir()
    with gzip.open(gz_dir / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_hh_rlhf(gz_dir) == expected

    with pytest.raises(FileNotFoundError) as info:
        load_hh_rlhf(tmp_path, split="validation")
    assert "validation.jsonl" in str(info.value) and str(tmp_path) in str(info.value)


def test_load_hh_rlhf_bad_row_in_local_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"chosen": SINGLE_CHOSEN, "rejected": SINGLE_CHOSEN}])
    assert raises_data_error(load_hh_rlhf, tmp_path).startswith(
        f"{path}:2: 'chosen' and 'rejected' responses are identical"
    )


@pytest.mark.parametrize("source", ["./missing.jsonl", "missing/train.jsonl", "/no/such/dir"])
def test_load_hh_rlhf_missing_path_like_source(source: str) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_hh_rlhf(source)
    assert source in str(info.value)


def test_load_hh_rlhf_hub_id_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = (
        "'Anthropic/hh-rlhf' is not a local file or directory, so it is treated as a Hugging Face hub "
        "dataset id, which needs the optional 'datasets' package: pip install datasets"
    )
    if importlib.util.find_spec("datasets") is None:  # the real environment, as shipped
        with pytest.raises(ImportError) as info:
            load_hh_rlhf("Anthropic/hh-rlhf")
        assert str(info.value) == expected
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail everywhere
    with pytest.raises(ImportError) as info:
        load_hh_rlhf("Anthropic/hh-rlhf")
    assert str(info.value) == expected


def test_load_hh_rlhf_hub_rows_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in ``datasets`` module: no network, same validation, index + 1 as the line."""
    hub_rows = {
        "train": [GOOD, {"chosen": MULTI_CHOSEN, "rejected": MULTI_REJECTED}],
        "test": [GOOD, {"chosen": SINGLE_CHOSEN, "rejected": SINGLE_CHOSEN}],
        "bad_type": [{"chosen": SINGLE_CHOSEN, "rejected": None}],
        "empty": [],
    }
    calls: list[tuple[str, str]] = []

    def load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return hub_rows[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    pairs = load_hh_rlhf("Anthropic/hh-rlhf", limit=2)
    assert [(p.prompt, p.chosen, p.rejected, p.meta) for p in pairs] == [
        (
            SINGLE_PROMPT,
            " Put it in boiling water for about nine minutes, then cool it.",
            " Eggs are laid by hens.",
            {},
        ),
        (MULTI_PROMPT, " How about Max, Pip or Tom?", " No.", {}),
    ]
    assert calls == [("Anthropic/hh-rlhf", "train")]
    assert raises_data_error(load_hh_rlhf, "Anthropic/hh-rlhf", split="test") == (
        "Anthropic/hh-rlhf[test]:2: 'chosen' and 'rejected' responses are identical: "
        "' Put it in boiling water for about nine minutes, then coo...'"
    )
    assert raises_data_error(load_hh_rlhf, "Anthropic/hh-rlhf", split="bad_type") == (
        "Anthropic/hh-rlhf[bad_type]:1: key 'rejected' must be str, got NoneType: 'null'"
    )
    assert raises_data_error(load_hh_rlhf, "Anthropic/hh-rlhf", split="empty") == (
        "Anthropic/hh-rlhf[empty]: no rows (the data is empty or only blank lines)"
    )
