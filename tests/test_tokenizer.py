"""Tests of the world's word-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_lite import world
from rlhf_lite.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
SMALL = world.WorldSizes(sft=150, prefs_train=300, prefs_test=50, prompts_train=50, prompts_test=16)

MULTI = ("\n\nHuman: hi there\n\nAssistant: hello , how can i help ?"
         "\n\nHuman: what is 3 plus 5 ?\n\nAssistant:")
RESPONSE = " 3 plus 5 is 8 . i hope this helps ."


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    world.generate_world(out, seed=0, sizes=SMALL)
    return out


def _texts(path: Path) -> list[str]:
    texts = []
    for name in ("sft", "prefs_train", "prefs_test", "prompts_train", "prompts_test"):
        for line in (path / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            texts += [r["prompt"]] + [r[k] for k in ("chosen", "rejected") if k in r]
            texts += [r["prompt"] + r["response"]] if "response" in r else []
    return texts


def test_special_ids_and_markers(world_dir: Path) -> None:
    tok = load_tokenizer(world_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "<eos>", "<unk>")
    assert tok.padding_side == "left"
    assert tok("\n\nHuman:", add_special_tokens=False)["input_ids"] == [3]
    assert tok("\n\nAssistant:", add_special_tokens=False)["input_ids"] == [4]
    ids = tok(MULTI, add_special_tokens=False)["input_ids"]
    assert ids.count(3) == 2 and ids.count(4) == 2 and ids[0] == 3 and ids[-1] == 4
    assert len(ids) == 4 + len(MULTI.replace("\n\nHuman:", " ").replace("\n\nAssistant:", " ").split())


def test_round_trip_multi_turn(world_dir: Path) -> None:
    tok = load_tokenizer(world_dir / "tokenizer.json")  # the file itself works as well as its directory
    text = MULTI + RESPONSE
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    p_ids = tok(MULTI, add_special_tokens=False)["input_ids"]
    r_ids = tok(RESPONSE, add_special_tokens=False)["input_ids"]
    assert p_ids + r_ids == ids  # prompt and response tokenize the same apart or together
    decoded = tok.decode(r_ids + [tok.eos_token_id], skip_special_tokens=True)
    assert decoded == RESPONSE
    assert world.gold_score(MULTI, decoded) == world.gold_score(MULTI, RESPONSE) == 0.85


def test_padding_is_left(world_dir: Path) -> None:
    tok = load_tokenizer(world_dir)
    batch = tok([MULTI, "\n\nHuman: hi\n\nAssistant:"], padding=True, add_special_tokens=False)
    short = batch["input_ids"][1]
    assert short[0] == 0 and short[-1] == 4 and batch["attention_mask"][1][0] == 0


def test_no_unk_over_generated_data(world_dir: Path) -> None:
    tok = load_tokenizer(world_dir)
    texts = _texts(world_dir) + [" " + " ".join(world.world_vocabulary())]
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        assert tok.unk_token_id not in ids
    assert tok(" zzzz", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert {f"▁{i}" for i in range(21)} <= set(tok.get_vocab())


@pytest.mark.skipif(not (DATA / "tokenizer.json").exists(), reason="data/ not generated")
def test_no_unk_over_committed_data() -> None:
    tok = load_tokenizer(DATA)
    for ids in tok(_texts(DATA), add_special_tokens=False)["input_ids"]:
        assert tok.unk_token_id not in ids


def test_training_is_deterministic_and_saves(tmp_path: Path) -> None:
    texts = [MULTI + RESPONSE, " " + " ".join(world.world_vocabulary())]
    a, b = train_tokenizer(texts), train_tokenizer(list(texts))
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 5 + len(world.world_vocabulary())
    path = save_tokenizer(a, tmp_path)
    assert path == tmp_path / "tokenizer.json"
    assert load_tokenizer(tmp_path).get_vocab() == a.get_vocab()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_batched_encoding_equals_one_by_one() -> None:
    from rlhf_lite.text import encode_pair_texts

    tok = load_tokenizer(DATA / "tokenizer.json")
    rows = [json.loads(line) for line in (DATA / "sft.jsonl").read_text().splitlines()[:50]]
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    for (ids, mask), p, r in zip(encode_pair_texts(tok, prompts, responses, 128), prompts, responses):
        pi = tok(p, add_special_tokens=False)["input_ids"]
        ri = tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == pi + ri and mask == [0] * len(pi) + [1] * len(ri)
        assert ids[:-1] == tok(p + r, add_special_tokens=False)["input_ids"]  # the boundary is exact
    with pytest.raises(ValueError, match="exceeds the limit of 20"):
        encode_pair_texts(tok, prompts, responses, 20)
