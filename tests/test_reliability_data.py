"""Reliability, class 4: every data row is checked before anything trains, and each error names the file and
the line: format, the world parse, the gold fields (NaN is an error, never dropped), token budgets, and the
files themselves (a folder, a truncated gzip, a corrupt tokenizer or stats.json). Duplicate rows are
counted, and reported with a warning where they are not expected. Nothing here loads a model.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from rlhf_lite import cli
from rlhf_lite.data import PreferencePair
from rlhf_lite.hh_rlhf import write_layout
from rlhf_lite.utils import DATA_DIR
from rlhf_lite.validate import DataWarning, check_data
from tests.reliability import (
    cli_error,
    copy_data,
    edit_line,
    no_models,
    one_line,
    small_world,
    write_rm,
    write_sft,
)

PIPELINE = ["--sft.batch-size", "8", "--sft.n-eval-prompts", "8", "--rm.batch-size", "8", "--rm.n-fresh-prompts", "4",
            "--ppo.rollout-batch", "8", "--ppo.minibatch-size", "4"]
EARLIER = "\n\nHuman: hi there\n\nAssistant: hello , how can i help ?"
LONG = " the zorb is blue ." * 30  # 150 world tokens
from tests.reliability import quiet_progress  # noqa: F401 (autouse: no progress bars on stderr)


def _set(key, value):
    return lambda row: {**row, key: value}


def _drop(key):
    return lambda row: {k: v for k, v in row.items() if k != key}


def _raw(text):
    return lambda row: text


def _replace(key, old, new):
    return lambda row: {**row, key: row[key].replace(old, new)}


def _longer_prompt(row):  # a world question after many earlier exchanges: in the world, but long
    return {**row, "prompt": EARLIER * 12 + row["prompt"]}


# (id, file, line, change of that line, the error after "file:line: ")
ROWS = [
    ("invalid-json", "sft.jsonl", 3, _raw('{"prompt": "x",'), r"invalid JSON: "),
    ("row-not-an-object", "prompts_train.jsonl", 2, _raw("[1, 2]"), r"expected a JSON object, got list"),
    ("missing-key", "prefs_train.jsonl", 4, _drop("rejected"), r"missing required key 'rejected'"),
    ("wrong-type", "prompts_test.jsonl", 5, _set("prompt", 5), r"key 'prompt' must be str, got int: '5'"),
    ("prompt-not-hh-start", "prompts_train.jsonl", 6, _replace("prompt", "\n\nHuman: ", "User: "),
     r"'prompt' must start with '\\n\\nHuman:'"),
    ("prompt-no-assistant-end", "prompts_train.jsonl", 7, _replace("prompt", "\n\nAssistant:", " ?"),
     r"'prompt' must end with '\\n\\nAssistant:'"),
    ("sft-prompt-not-hh", "sft.jsonl", 8, _set("prompt", "what is 2 plus 2 ?"), r"'prompt' must start with"),
    ("sft-response-empty", "sft.jsonl", 9, _set("response", "  "), r"'response' is empty: '  '"),
    ("sft-response-turn-marker", "sft.jsonl", 10, _replace("response", " .", " .\n\nHuman: and ?"),
     r"'response' holds a turn marker, so it is not one reply"),
    ("prefs-different-prompts", "prefs_test.jsonl", 2, _replace("rejected", "\n\nHuman: ", "\n\nHuman: so "),
     r"'chosen' and 'rejected' have different prompts; they differ at character"),
    ("prefs-identical-responses", "prefs_train.jsonl", 11, lambda r: {**r, "rejected": r["chosen"]},
     r"'chosen' and 'rejected' responses are identical"),
    ("prefs-ends-with-human-turn", "prefs_train.jsonl", 12, lambda r: {**r, "chosen": r["chosen"] + "\n\nHuman: ok"},
     r"'chosen': transcript ends with a Human turn"),
    ("prefs-no-assistant-turn", "prefs_test.jsonl", 3, _set("rejected", "\n\nHuman: hello"),
     r"'rejected': transcript has no '\\n\\nAssistant:' turn"),
    ("world-prompt-outside", "prompts_train.jsonl", 13, _set("prompt", "\n\nHuman: what is love ?\n\nAssistant:"),
     r"the prompt is not a question of the synthetic world \(not a world prompt: 'what is love \?'\)"),
    ("world-test-prompt-outside", "prompts_test.jsonl", 4, _set("prompt", "\n\nHuman: who are you\n\nAssistant:"),
     r"the prompt is not a question of the synthetic world"),
    ("world-sft-prompt-outside", "sft.jsonl", 14, _set("prompt", "\n\nHuman: tell me a joke .\n\nAssistant:"),
     r"the prompt is not a question of the synthetic world"),
    ("world-pair-prompt-outside", "prefs_train.jsonl", 15,
     lambda r: {**r, **{k: r[k].replace(r["prompt"], "\n\nHuman: sing .\n\nAssistant:") for k in ("chosen", "rejected")}},
     r"the prompt is not a question of the synthetic world"),
    ("gold-missing", "prefs_test.jsonl", 6, _drop("gold_chosen"),
     r"missing 'gold_chosen': world preference rows carry the gold judge's scores"),
    ("gold-nan", "prefs_test.jsonl", 7, _set("gold_rejected", float("nan")),
     r"'gold_rejected' must be a finite number, got nan"),
    ("gold-infinite", "prefs_train.jsonl", 16, _set("gold_chosen", float("inf")), r"'gold_chosen' must be a finite"),
    ("gold-text", "prefs_train.jsonl", 17, _set("gold_chosen", "0.5"), r"'gold_chosen' must be a finite number, got '0\.5'"),
    ("gold-bool", "prefs_test.jsonl", 8, _set("gold_rejected", True), r"'gold_rejected' must be a finite number, got True"),
]

# (id, how the folder is broken, the one-line error)
FILES = [
    ("data-file-missing", lambda d: (d / "sft.jsonl").unlink(), r"no such data file: '\S+/sft\.jsonl'"),
    ("data-file-is-a-folder", lambda d: ((d / "prompts_test.jsonl").unlink(), (d / "prompts_test.jsonl").mkdir()),
     r"\S+/prompts_test\.jsonl: is a folder, not a JSONL data file"),
    ("data-file-empty", lambda d: (d / "prefs_test.jsonl").write_text("\n\n"),
     r"\S+/prefs_test\.jsonl: no rows \(the data is empty or only blank lines\)"),
    ("data-file-not-utf8", lambda d: (d / "sft.jsonl").write_bytes(b'{"prompt": "\xff"}\n'),
     r"\S+/sft\.jsonl:1: line is not valid UTF-8"),
    ("stats-missing", lambda d: (d / "stats.json").unlink(), r"no stats\.json in the data folder"),
    ("stats-corrupt", lambda d: (d / "stats.json").write_text("{kind"), r"\S+/stats\.json: not valid JSON"),
    ("data-folder-missing", lambda d: shutil.rmtree(d), r"no stats\.json in the data folder .*: '\S+/stats\.json'"),
]

# (id, stage, file, line, change, the error after "file:line: ")
LENGTHS = [
    ("overlong-demonstration", "sft", "sft.jsonl", 18, _set("response", LONG),
     r"prompt and response \(with EOS\) of \d+ tokens exceeds the model's context = 128 tokens"),
    ("overlong-pretraining-pair", "sft", "prefs_train.jsonl", 19, lambda r: {**r, "chosen": r["chosen"] + LONG},
     r"prompt and response \(with EOS\) of \d+ tokens exceeds the model's context = 128 tokens"),
    ("overlong-test-pair", "rm", "prefs_test.jsonl", 9, lambda r: {**r, "rejected": r["rejected"] + LONG},
     r"prompt and response \(with EOS\) of \d+ tokens exceeds the model's context = 64 tokens"),
    ("overlong-prompt", "ppo", "prompts_train.jsonl", 20, _longer_prompt,
     r"prompt of \d+ tokens exceeds the model's context minus PPOConfig\.max_new_tokens \(6\) = 58 tokens"),
    ("overlong-ptx-demonstration", "ppo", "sft.jsonl", 21, _set("response", " the zorb is blue ." * 12),
     (r"prompt and response \(with EOS\) of \d+ tokens exceeds PPOConfig\.max_prompt_tokens plus "
     r"PPOConfig\.max_new_tokens = 46 tokens")),
]

CASES = ({f"data/{c[0]}": "error" for c in ROWS + FILES + LENGTHS} | {f"data/{n}": "error" for n in (
    "tokenizer-missing", "tokenizer-corrupt", "gzip-truncated", "gzip-not-gzip", "hh-folder-without-split",
    "hh-no-usable-rows")} | {"data/duplicates-warned": "warning", "data/world-duplicates-counted": "recovery",
                             "data/blank-lines-and-bom-accepted": "recovery"})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return small_world(tmp_path_factory.mktemp("data") / "world")


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory) -> tuple[Path, Path]:
    from dataclasses import replace

    from rlhf_lite.profiles import TINY
    from tests.conftest import SMALL, SMALL_LORA

    root = tmp_path_factory.mktemp("data_runs")
    profile = replace(TINY, lora=SMALL_LORA, model=replace(TINY.model, tiny=SMALL))
    sft = write_sft(root / "sft", world)
    return sft, write_rm(root / "rm", sft, world, TINY.rm, profile)


@pytest.mark.parametrize("file, line, change, reason", [pytest.param(*c[1:], id=c[0]) for c in ROWS])
def test_bad_row_names_file_and_line(file, line, change, reason, world, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    edit_line(data / file, line, change)
    code, err = cli_error(["pipeline", "--out", tmp_path / "out", "--data", data, *PIPELINE], capsys)
    assert code == 2 and re.search(f"^error: {re.escape(str(data / file))}:{line}: {reason}", one_line(err)), err


@pytest.mark.parametrize("breaks, message", [pytest.param(*c[1:], id=c[0]) for c in FILES])
def test_bad_file_is_named(breaks, message, world, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    breaks(data)
    code, err = cli_error(["pipeline", "--out", tmp_path / "out", "--data", data, *PIPELINE], capsys)
    assert code == 2 and re.search(message, one_line(err)), err


@pytest.mark.parametrize("stage, file, line, change, reason", [pytest.param(*c[1:], id=c[0]) for c in LENGTHS])
def test_overlong_row_names_file_and_line(stage, file, line, change, reason, world, folders, tmp_path, capsys,
                                          monkeypatch) -> None:
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    edit_line(data / file, line, change)
    sft, rm = folders
    argv = {"sft": ["sft", "--batch-size", "8", "--n-eval-prompts", "8"],
            "rm": ["rm", "--sft", sft, "--batch-size", "8", "--n-fresh-prompts", "4"],
            "ppo": ["ppo", "--sft", sft, "--rm", rm, "--rollout-batch", "8", "--minibatch-size", "4",
                    "--max-new-tokens", "6", "--lora.r", "4", "--lora.alpha", "8", "--model.tiny.max-positions", "64"]
            + (["--ptx-coef", "0.5", "--max-prompt-tokens", "40"] if file == "sft.jsonl" else [])}[stage]
    code, err = cli_error([*argv, "--out", tmp_path / "out", "--data", data], capsys)
    assert code == 2 and re.search(f"^error: {re.escape(str(data / file))}:{line}: {reason}", one_line(err)), err


@pytest.mark.parametrize("case", ["tokenizer-missing", "tokenizer-corrupt"])
def test_tokenizer_file_is_named(case, world, tmp_path, capsys, monkeypatch) -> None:
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    if case == "tokenizer-missing":
        (data / "tokenizer.json").unlink()
        expected = f"error: no tokenizer file at {data / 'tokenizer.json'}"
    else:
        (data / "tokenizer.json").write_text('{"model": ')
        expected = f"error: {data / 'tokenizer.json'} is not a valid tokenizer file (corrupt or truncated?)"
    code, err = cli_error(["sft", "--out", tmp_path / "out", "--data", data, "--batch-size", "8",
                           "--n-eval-prompts", "8"], capsys)
    assert code == 2 and one_line(err).startswith(expected), err


ROW = {"chosen": "\n\nHuman: hi\n\nAssistant: hello .", "rejected": "\n\nHuman: hi\n\nAssistant: go away ."}


@pytest.mark.parametrize("case", ["gzip-truncated", "gzip-not-gzip", "hh-folder-without-split", "hh-no-usable-rows"])
def test_hh_source_file_is_named(case, tmp_path, capsys) -> None:
    source = tmp_path / "train.jsonl.gz"
    if case == "gzip-truncated":  # random text compresses badly: the cut falls inside the stream
        rows = "".join(json.dumps({**ROW, "noise": os.urandom(64).hex()}) + "\n" for _ in range(200))
        packed = gzip.compress(rows.encode())
        source.write_bytes(packed[: len(packed) // 2])
        expected = rf"error: {re.escape(str(source))}: corrupt or truncated gzip after \d+ lines"
    elif case == "gzip-not-gzip":
        source.write_text(json.dumps(ROW) + "\n")
        expected = rf"error: {re.escape(str(source))}: corrupt or truncated gzip after 0 lines \(Not a gzipped file"
    elif case == "hh-folder-without-split":
        source = tmp_path / "hh"
        source.mkdir()
        expected = rf"error: \[Errno 2\] no train\.jsonl or train\.jsonl\.gz in HH-RLHF directory: '{re.escape(str(source))}'"
    else:
        source = tmp_path / "train.jsonl"
        source.write_text(json.dumps({**ROW, "rejected": ROW["chosen"]}) + "\n")
        expected = rf"error: {re.escape(str(source))}: no usable HH-RLHF rows \(skipped: \{{'identical responses': 1\}}\)"
    code, err = cli_error(["data", "--hh", source, "--out", tmp_path / "out"], capsys)
    assert code == 2 and re.search(expected, one_line(err)), err
    assert not (tmp_path / "out").exists()  # nothing written


def test_duplicates_warned(tmp_path) -> None:
    pair = PreferencePair("\n\nHuman: hi\n\nAssistant:", " hello .", " go away .")
    write_layout(tmp_path, [pair, pair, PreferencePair(pair.prompt, " hey .", " no .")], [pair], "test")
    with pytest.warns(DataWarning) as caught:
        check = check_data(tmp_path)
    assert sorted(str(w.message) for w in caught) == [
        f"{tmp_path / 'prefs_train.jsonl'}: 1 of 3 rows repeat an earlier row",
        f"{tmp_path / 'sft.jsonl'}: 1 of 3 rows repeat an earlier row"]
    assert check.duplicates == {"sft.jsonl": 1, "prefs_train.jsonl": 1, "prefs_test.jsonl": 0, "prompts_train.jsonl": 0,
                                "prompts_test.jsonl": 0}


def test_world_duplicates_counted(recwarn) -> None:
    """The world samples its questions with replacement: repeats are counted, not warned about."""
    check = check_data(DATA_DIR, ["prompts_train.jsonl"])
    prompts = [json.loads(line)["prompt"] for line in (DATA_DIR / "prompts_train.jsonl").read_text().splitlines()]
    assert check.duplicates["prompts_train.jsonl"] == len(prompts) - len(set(prompts)) == 1101
    assert not [w for w in recwarn if w.category is DataWarning]


def test_blank_lines_and_bom_accepted(world, tmp_path, monkeypatch) -> None:
    no_models(monkeypatch)
    data = copy_data(world, tmp_path / "data")
    text = (data / "sft.jsonl").read_text()
    (data / "sft.jsonl").write_text("\ufeff" + text.replace("\n", "\n\n", 3))
    assert check_data(data).rows["sft.jsonl"] == 64
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli.main(["pipeline", "--out", str(tmp_path / "out"), "--data", str(data), *PIPELINE])
