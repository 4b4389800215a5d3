"""Items for the dialogue-memory and Rock-Paper-Scissors tasks.

- Loaders for SirLLM's files (Zoeyyao27/SirLLM `data/`, formats in ../shared/data/sirllm/SOURCE.md),
  from a path or URL; a malformed record fails with the file and line named.
- DailyDialog from the hub (`li2017dailydialog/daily_dialog`) with SirLLM's construction.
- Seeded generators that ship with the package, so `--task grocery` and `--task rps` run with
  nothing downloaded: groceries with filler questions of our own, and RPS players of any mix,
  including players who switch preference mid-game.

Prompts follow SirLLM's `sir_llm/utils.py` and `eval_utils.py` word for word (trailing spaces
stripped: inside a chat turn they only move onto the next token).
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streambench.errors import DataError

MOVES = ("rock", "paper", "scissors")
LABELS = "ABCDEFGH"


@dataclass
class MCItem:
    """One user turn answered by choosing a reply."""

    id: str
    group: str  # the conversation it belongs to: the cache is reset when it changes
    question: str  # the user turn's text
    replies: list[str]  # what the model may answer (SirLLM: choice labels)
    answer: int  # index of the gold reply
    kind: str = "question"  # dailydialog: question; grocery: key, filler, recall
    meta: dict = field(default_factory=dict)


# ---- files --------------------------------------------------------------------------------------
def fetch(source: str) -> Path:
    """A local path, or a URL downloaded once into the streambench cache. The cache is keyed by a
    hash of the whole URL (two URLs ending in the same file name are two files), and the file's
    URL and sha256 are what `provenance` records in results."""
    if source.startswith(("http://", "https://")):
        import hashlib

        from streambench.models.loading import cache_root
        from streambench.sanitize import slug

        name = slug(source.rsplit("/", 1)[-1].split("?")[0], 80)
        target = cache_root() / "data" / hashlib.sha256(source.encode()).hexdigest()[:16] / name
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with urllib.request.urlopen(source, timeout=60) as response:
                    data = response.read()
                tmp = target.with_suffix(target.suffix + f".part{os.getpid()}")
                tmp.write_bytes(data)
                tmp.replace(target)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot download {source}: {exc}") from None
        return target
    path = Path(source)
    if not path.exists():
        raise DataError(f"data not found: {source}")
    return path


def check_local(source: str | None) -> None:
    """A local data path that does not exist fails when the task is configured, before any model
    loads (URLs are fetched when the run starts)."""
    if source and not source.startswith(("http://", "https://")) and not Path(source).exists():
        raise DataError(f"data not found: {source}")


def provenance(source: str | None, default_name: str | None = None) -> dict:
    """Where a task's data came from: the path or URL as given, and the sha256 of the file read."""
    if not source:
        return {}
    import hashlib

    path = fetch(source)
    if path.is_dir() and default_name:
        path = path / default_name
    out = {"source": source}
    if path.is_file():
        out["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_constant=_not_json)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: invalid JSON (nested too deeply)") from None
        except ValueError as exc:  # NaN, Infinity
            raise DataError(f"{path}:{number}: invalid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _choices(path, number, record) -> tuple[str, list[dict], str]:
    try:
        stem = record["question"]["stem"]
        choices = record["question"]["choices"]
        answer = record["answerKey"]
        labels = [c["label"] for c in choices]
        [c["text"] for c in choices]
    except (KeyError, TypeError):
        raise DataError(
            f"{path}:{number}: record lacks question.stem, question.choices[label, text] or answerKey"
        ) from None
    if answer not in labels:
        raise DataError(f"{path}:{number}: answerKey {answer!r} is not one of the labels {labels}")
    return stem.strip(), choices, answer


def _listing(choices) -> str:
    return "".join(f" ({c['label']}) {c['text']}" for c in choices)


def _resolve(source: str, default_name: str) -> Path:
    path = fetch(source)
    return path / default_name if path.is_dir() else path


def load_dailydialog(source: str) -> list[MCItem]:
    path = _resolve(source, "dailydialog.jsonl")
    items = []
    for number, record in read_jsonl(path):
        stem, choices, answer = _choices(path, number, record)
        rid = str(record.get("id", number))
        items.append(
            MCItem(
                id=rid,
                group=rid.split("_")[0],
                question=f"Choose the best response for the input: {stem} Choices: {_listing(choices)}",
                replies=[c["label"] for c in choices],
                answer=[c["label"] for c in choices].index(answer),
            )
        )
    return items


def load_grocery(source: str) -> list[MCItem]:
    path = _resolve(source, "keys.jsonl")
    items = []
    for number, record in read_jsonl(path):
        stem, choices, answer = _choices(path, number, record)
        rid = str(record.get("id", number))
        kind = "key" if rid.startswith("key") else "recall" if rid.startswith("answer") else "filler"
        meta = {}
        if kind == "key":
            question, replies, gold = stem, ["OK"], 0
            meta = grocery_key_meta(stem)
        else:
            question = f"{stem} Choices: {_listing(choices)}"
            replies, gold = [c["label"] for c in choices], [c["label"] for c in choices].index(answer)
            if kind == "recall":
                meta = {"free": stem.strip(), "answer_text": str(choices[gold]["text"]).strip()}
        items.append(
            MCItem(
                id=rid, group=rid.split("_")[-1], question=question, replies=replies, answer=gold, kind=kind, meta=meta
            )
        )
    return items


def load_rps_moves(source: str) -> list[int]:
    """The user's moves (0 rock, 1 paper, 2 scissors) from a SirLLM RPS file."""
    path = fetch(source)
    if path.is_dir():
        raise DataError(f"{source} is a folder: name one rock_paper_scissors_dominant_*.jsonl file")
    moves = []
    for number, record in read_jsonl(path):
        _, choices, _ = _choices(path, number, record)
        by_label = {c["label"]: c["text"].strip().lower() for c in choices}
        move = by_label.get(record.get("user_choice"))
        if move not in MOVES:
            raise DataError(f"{path}:{number}: user_choice {record.get('user_choice')!r} names no move")
        moves.append(MOVES.index(move))
    return moves


# ---- DailyDialog from the hub -------------------------------------------------------------------
def dailydialog_from_hub(
    split: str = "test", seed: int = 0, name: str = "li2017dailydialog/daily_dialog"
) -> list[MCItem]:
    """SirLLM's construction: for each odd turn t of each dialogue, the stem is utterance t-1, the
    gold reply utterance t, and three distractors are utterances of other dialogues (seeded)."""
    try:
        import datasets

        dialogs = [row["dialog"] for row in datasets.load_dataset(name, split=split)]
    except Exception as exc:  # offline, renamed, or a datasets error
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load {name} from the hub (offline? pass --data FILE): {first}") from None
    return build_dailydialog(dialogs, seed)


def build_dailydialog(dialogs: list[list[str]], seed: int = 0) -> list[MCItem]:
    rng = np.random.default_rng(seed)
    items = []
    for d, turns in enumerate(dialogs):
        for t in range(1, len(turns), 2):
            distractors = []
            while len(distractors) < 3:
                other = int(rng.integers(len(dialogs)))
                if other != d and dialogs[other]:
                    distractors.append(dialogs[other][int(rng.integers(len(dialogs[other])))])
            gold = int(rng.integers(4))
            texts = distractors[:gold] + [turns[t]] + distractors[gold:]
            choices = [{"label": LABELS[i], "text": text.strip()} for i, text in enumerate(texts)]
            items.append(
                MCItem(
                    id=f"{d}_{t}",
                    group=str(d),
                    question=f"Choose the best response for the input: {turns[t - 1].strip()} Choices: {_listing(choices)}",
                    replies=list(LABELS[:4]),
                    answer=gold,
                )
            )
    return items


# ---- generators shipped with the package --------------------------------------------------------
GROCERIES = (
    "apples",
    "bananas",
    "blueberries",
    "bread",
    "butter",
    "carrots",
    "cheddar",
    "cherries",
    "chicken",
    "chickpeas",
    "chocolate",
    "cinnamon",
    "coffee",
    "cucumbers",
    "eggs",
    "flour",
    "garlic",
    "ginger",
    "grapes",
    "honey",
    "lemons",
    "lentils",
    "lettuce",
    "milk",
    "mushrooms",
    "mustard",
    "oats",
    "olive oil",
    "onions",
    "oranges",
    "pasta",
    "peanut butter",
    "pears",
    "peppers",
    "pineapple",
    "potatoes",
    "rice",
    "salmon",
    "salt",
    "spinach",
    "strawberries",
    "sugar",
    "tea",
    "tofu",
    "tomatoes",
    "tuna",
    "vanilla extract",
    "vinegar",
    "walnuts",
    "yogurt",
)
_CAPITALS = (
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Spain", "Madrid"),
    ("Chile", "Santiago"),
    ("Greece", "Athens"),
    ("India", "New Delhi"),
)


def grocery_key_meta(stem: str) -> dict:
    """The requested item of a key statement ("... GROCERY: [chocolate]."), tagged as the fact."""
    found = re.search(r"\[([^\]]+)\]", stem)
    return {"facts": [("key", found.group(1))]} if found else {}


def generate_grocery(episodes: int, seed: int = 0, fillers: int = 20) -> list[MCItem]:
    """Episodes shaped like SirLLM's: the request, `fillers` questions of our own (arithmetic and
    capitals, five choices each), then the recall question with four groceries."""
    rng = np.random.default_rng(seed)
    items = []
    for e in range(episodes):
        group = str(e)
        picks = rng.choice(len(GROCERIES), size=4, replace=False)
        wanted = GROCERIES[picks[0]]
        key = f"I want you to buy the GROCERY: [{wanted}]."
        items.append(MCItem(f"key_{e}", group, key, ["OK"], 0, "key", grocery_key_meta(key)))
        for q in range(fillers):
            stem, texts, gold = _filler(rng)
            choices = [{"label": LABELS[i], "text": t} for i, t in enumerate(texts)]
            items.append(
                MCItem(f"{e}_{q}", group, f"{stem} Choices: {_listing(choices)}", list(LABELS[:5]), gold, "filler")
            )
        order = rng.permutation(4)
        texts = [GROCERIES[picks[i]] for i in order]
        choices = [{"label": LABELS[i], "text": t} for i, t in enumerate(texts)]
        stem = "Which one is the GROCERY that I want you to buy earlier?"
        items.append(
            MCItem(
                f"answer_{e}",
                group,
                f"{stem} Choices: {_listing(choices)}",
                list(LABELS[:4]),
                int(np.flatnonzero(order == 0)[0]),
                "recall",
                {"free": stem, "answer_text": wanted},
            )
        )
    return items


def _filler(rng) -> tuple[str, list[str], int]:
    if rng.random() < 0.5:
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        right = a + b
        wrong = {right + d for d in (-10, -2, -1, 1, 2, 10)} - {right}
        options = [right] + [int(x) for x in rng.choice(sorted(wrong), size=4, replace=False)]
        stem = f"What is {a} plus {b}?"
    else:
        country, capital = _CAPITALS[int(rng.integers(len(_CAPITALS)))]
        others = [c for _, c in _CAPITALS if c != capital]
        options = [capital] + [str(x) for x in rng.choice(others, size=4, replace=False)]
        stem = f"What is the capital of {country}?"
    order = rng.permutation(5)
    texts = [str(options[i]) for i in order]
    return stem, texts, int(np.flatnonzero(order == 0)[0])


def player_moves(player: str, rounds: int, seed: int = 0) -> list[int]:
    """User moves for a named player (0 rock, 1 paper, 2 scissors), i.i.d. per round.

    `rock`, `paper`, `scissors`: that move 50%, the next 30%, the last 20% (SirLLM's players);
    `switch`: rock-dominant for the first half, scissors-dominant after (a test of decay);
    `mix:R,P,S`: any probabilities."""
    rng = np.random.default_rng(seed)
    if player in MOVES:
        d = MOVES.index(player)
        probs = np.zeros(3)
        probs[[d, (d + 1) % 3, (d + 2) % 3]] = (0.5, 0.3, 0.2)
        return [int(x) for x in rng.choice(3, size=rounds, p=probs)]
    if player == "switch":
        half = rounds // 2
        return player_moves("rock", half, seed) + player_moves("scissors", rounds - half, seed + 1)
    if player.startswith("mix:"):
        try:
            probs = np.array([float(x) for x in player[4:].split(",")])
        except ValueError:
            probs = np.array([])
        if probs.shape != (3,) or (probs < 0).any() or probs.sum() <= 0:
            raise DataError(f"player {player!r}: expected mix:R,P,S with three non-negative weights")
        return [int(x) for x in rng.choice(3, size=rounds, p=probs / probs.sum())]
    raise DataError(f"unknown player {player!r} (rock, paper, scissors, switch, mix:R,P,S or a SirLLM .jsonl file)")
