"""Loaders for SirLLM's files, the hub construction, and the seeded generators."""

import pytest

from streambench.errors import DataError
from streambench.tasks.dialogue.items import (
    build_dailydialog,
    generate_grocery,
    load_dailydialog,
    load_grocery,
    load_rps_moves,
    player_moves,
)


def test_shared_files_parse_completely(shared_data):
    root = shared_data / "sirllm" / "data"
    dialog = load_dailydialog(str(root / "dailydialog"))
    assert len(dialog) == 3700 and len({i.group for i in dialog[:2000]}) == 519
    assert dialog[0].question.startswith("Choose the best response for the input: Hey man")
    assert dialog[0].replies == ["A", "B", "C", "D"] and dialog[0].answer == 3
    grocery = load_grocery(str(root / "grocery_keys" / "keys.jsonl"))
    assert len(grocery) == 12056 and len({i.group for i in grocery}) == 548
    kinds = [i.kind for i in grocery[:22]]
    assert kinds == ["key"] + ["filler"] * 20 + ["recall"]
    assert grocery[0].replies == ["OK"] and grocery[21].replies == ["A", "B", "C", "D"]
    for player in ("rock", "paper", "scissors"):
        moves = load_rps_moves(str(root / "rock_paper_scissors" / f"rock_paper_scissors_dominant_{player}.jsonl"))
        assert len(moves) == 3000
    rock = load_rps_moves(str(root / "rock_paper_scissors" / "rock_paper_scissors_dominant_rock.jsonl"))[:2000]
    assert [rock.count(m) for m in range(3)] == [1000, 621, 379]  # SOURCE.md


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"id": "0_1", "question": {"stem": "hi"}', "bad.jsonl:2: invalid JSON"),
        ('{"id": "0_1", "question": {"stem": "hi"}}', "bad.jsonl:2: record lacks question.stem"),
        (
            '{"id": "0_1", "question": {"stem": "hi", "choices": [{"label": "A", "text": "x"}]}, "answerKey": "B"}',
            "bad.jsonl:2: answerKey 'B' is not one of the labels",
        ),
        ("[1, 2]", "bad.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    good = '{"id": "0_1", "question": {"stem": "hi", "choices": [{"label": "A", "text": "x"}]}, "answerKey": "A"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_dailydialog(str(bad))


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        load_grocery(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown player 'lizard'"):
        player_moves("lizard", 10)


def test_generators_are_deterministic_for_a_seed():
    assert generate_grocery(3, seed=7) == generate_grocery(3, seed=7)
    assert generate_grocery(3, seed=7) != generate_grocery(3, seed=8)
    assert player_moves("paper", 50, seed=1) == player_moves("paper", 50, seed=1)
    assert player_moves("switch", 50, seed=1) != player_moves("switch", 50, seed=2)


def test_generated_players_have_their_advertised_bias():
    moves = player_moves("rock", 20000, seed=0)
    freq = [moves.count(m) / len(moves) for m in range(3)]
    assert freq == pytest.approx([0.5, 0.3, 0.2], abs=0.015)
    switch = player_moves("switch", 20000, seed=0)
    first, second = switch[:10000], switch[10000:]
    assert first.count(0) / 10000 == pytest.approx(0.5, abs=0.02)
    assert second.count(2) / 10000 == pytest.approx(0.5, abs=0.02)
    mix = player_moves("mix:0,0,1", 100)
    assert set(mix) == {2}


def test_grocery_episodes_have_sirllm_shape():
    items = generate_grocery(2, seed=0)
    assert [i.kind for i in items[:22]] == ["key"] + ["filler"] * 20 + ["recall"]
    recall = items[21]
    wanted = items[0].question.split("[")[1].split("]")[0]
    assert f"({recall.replies[recall.answer]}) {wanted}" in recall.question


def test_dailydialog_construction_from_dialogues():
    dialogs = [["hello", "hi there", "how are you", "fine"], ["a", "b"], ["c", "d", "e"]]
    items = build_dailydialog(dialogs, seed=0)
    assert [i.id for i in items] == ["0_1", "0_3", "1_1", "2_1"]
    first = items[0]
    assert first.question.startswith("Choose the best response for the input: hello Choices: ")
    gold = "ABCD"[first.answer]
    assert f"({gold}) hi there" in first.question
    assert build_dailydialog(dialogs, seed=0) == items
