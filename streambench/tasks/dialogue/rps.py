"""rps: Rock-Paper-Scissors against players with a preference (SirLLM, Sec. 4).

Each round the model commits to a move before the player's is revealed; the next round's prompt
reveals it ("I chose [paper]. Analyze my preferences ..."), so a model that remembers the history
can exploit the player's bias. The move is chosen by first-token log-probability, as SirLLM does.
Reference points, printed beside the result: random play wins 1/3; the best fixed move against
the player's actual frequencies (about 50% for SirLLM's 50/30/20 players).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.engine.meter import subsample
from streambench.tasks import register_task
from streambench.tasks.base import TaskResult
from streambench.tasks.dialogue.base import DialogueTask, conversation_for, memory_curves, play_lanes
from streambench.tasks.dialogue.items import MOVES, check_local, load_rps_moves, player_moves, provenance

FIRST = "Let's play a game of Rock-Paper-Scissors. Choose one option from: (A) rock (B) paper (C) scissors."
FIRST_RELEASED = FIRST + " "  # the released code's round 0 ends with a space (moved onto the answer)
NEXT = (
    "I chose [{move}]. Analyze my preferences to maximize your winning rate and proceed to the next "
    "round. Choices: (A) rock (B) paper (C) scissors. You choose:"
)
REPLIES = ["A", "B", "C"]
ROLLING = 50


def outcome(model: int, user: int) -> str:
    if model == user:
        return "tie"
    return "win" if model == (user + 1) % 3 else "loss"


@register_task("rps")
@dataclass
class RockPaperScissorsTask(DialogueTask):
    """`players`: comma-separated rock, paper, scissors (50/30/20 players), switch (rock-dominant,
    then scissors-dominant: tests decay), mix:R,P,S, or paths/URLs of SirLLM's player files.
    `limit`: rounds per player (SirLLM plays 2,000).

    Additions beside SirLLM's win rates: the user's move word in each "I chose [...]" turn is
    tagged; `move_retention` is the mean, over rounds, of the share of the revealed moves (all of
    them so far, each move weighted alike) the cache holds when the model chooses; `beat_logprob`
    the mean log-probability (first token, full vocabulary) of the move that beats the player's
    most frequent move so far (ties: the first of rock, paper, scissors), from round 2 on: what a
    model that remembers the history should prefer, however rarely it is the argmax. `format`:
    see DialogueTask."""

    version = 1
    summary = "Rock-Paper-Scissors against biased players (win/tie/loss, rolling win rate)"
    higher_is_better = {
        "win_rate": True,
        "loss_rate": False,
        "best_fixed_gap": False,
        "beat_logprob": True,
        "move_retention": True,
    }
    columns = (
        ("rounds", "rounds"),
        ("win", "win_rate"),
        ("tie", "tie_rate"),
        ("loss", "loss_rate"),
        ("best fixed", "best_fixed_win"),
        ("model moves R/P/S", "model_moves"),
        ("beat logprob", "beat_logprob"),
        ("move retention", "move_retention"),
    )
    quality = "win_rate"

    players: str = "rock,paper,scissors"
    limit: int | None = 2000

    def check_data(self) -> None:
        self._require(bool(self.player_list()), "needs at least one player")
        for player in self.player_list():  # fail before the model loads
            if not (player.endswith(".jsonl") or player.startswith(("http://", "https://"))):
                player_moves(player, 1)
            else:
                check_local(player)

    def conversations(self) -> int | None:
        return len(self.player_list())

    def player_list(self) -> list[str]:
        return [p.strip() for p in str(self.players).split(",") if p.strip()]

    def moves(self, player: str, index: int) -> list[int]:
        if player.endswith(".jsonl") or player.startswith(("http://", "https://")):
            moves = load_rps_moves(player)
            return moves[: self.limit] if self.limit else moves
        return player_moves(player, self.limit or 2000, seed=self.seed + 1000 * index)

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        games = {p: self.moves(p, i) for i, p in enumerate(self.player_list())}
        progress.total(sum(len(m) for m in games.values()), "round")
        conversation = conversation_for(session, tokenizer, self.format)
        records, metrics, curves, info = (
            [],
            {},
            {},
            {"model_moves": {}, "facts": "the user's move in each 'I chose [...]' turn", "format": self.format},
        )
        beat, kept = [], []
        files = {p: provenance(p) for p in games if p.endswith(".jsonl") or p.startswith(("http://", "https://"))}
        if files:
            info["player_files"] = files
        if session.group is None:
            meter.start(session)
            played = [self._play(conversation, player, moves, meter, progress) for player, moves in games.items()]
        else:  # the players as the ragged streams of one batch (engine/lanes.py)
            played = play_lanes(
                session,
                conversation,
                meter,
                [lambda game, c: self._play(c, *game, meter, progress) for _ in games],
                list(games.items()),
            )
        for (player, user_moves), (rounds, results, beats, shares) in zip(games.items(), played):
            records += rounds
            beat += beats
            kept += shares
            tag = player.rsplit("/", 1)[-1].removesuffix(".jsonl")
            played_moves = [rec["model"] for rec in rounds]
            metrics.update(_rates(results, tag))
            metrics[f"best_fixed_win_{tag}"] = best_fixed_win(user_moves)
            info["model_moves"][tag] = {m: played_moves.count(m) / len(played_moves) for m in MOVES}
            wins = np.array([o == "win" for o in results], dtype=float)
            rolling = (
                np.convolve(wins, np.ones(ROLLING) / ROLLING, mode="valid")
                if len(wins) >= ROLLING
                else wins.cumsum() / np.arange(1, len(wins) + 1)
            )
            curves[f"rolling_win_rate_{tag}"] = subsample(rolling.tolist(), 512)
        every = [rec["outcome"] for rec in records]
        metrics.update(_rates(every))
        metrics["rounds"] = len(every)
        metrics["random_win"] = 1 / 3
        metrics["best_fixed_win"] = float(np.mean([metrics[k] for k in metrics if k.startswith("best_fixed_win_")]))
        metrics["best_fixed_gap"] = metrics["best_fixed_win"] - metrics["win_rate"]
        moves = [rec["model"] for rec in records]
        metrics["model_moves"] = "/".join(f"{100 * moves.count(m) / len(moves):.0f}" for m in MOVES)
        metrics["beat_logprob"] = float(np.mean(beat)) if beat else float("nan")
        metrics["move_retention"] = float(np.mean(kept)) if kept else float("nan")
        curves.update(memory_curves(conversation))
        return TaskResult(metrics=metrics, curves=curves, records=records, info=info)

    def _play(self, conversation, player: str, user_moves: list[int], meter, progress):
        """One player's game, on its own conversation: (records, outcomes, beat log-probs, move retention)."""
        conversation.reset()
        first = FIRST if self.format == "template" else FIRST_RELEASED
        records, results, beat, kept = [], [], [], []
        counts = np.zeros(3, dtype=int)
        for r, user in enumerate(user_moves):
            question = first if r == 0 else NEXT.format(move=MOVES[user_moves[r - 1]])
            facts = () if r == 0 else ((f"move {r - 1}", MOVES[user_moves[r - 1]]),)
            model, scored = conversation.ask(question, REPLIES, by_greedy=False, facts=facts)
            meter.step()
            share = None
            if r:
                counts[user_moves[r - 1]] += 1
                beat.append(scored[(int(counts.argmax()) + 1) % 3].logprob)
                share = float(conversation.retention.shares().mean())
                kept.append(share)
            progress(1)
            results.append(outcome(model, user))
            records.append(
                {
                    "player": player,
                    "round": r,
                    "user": MOVES[user],
                    "model": MOVES[model],
                    "outcome": results[-1],
                    "logprobs": [round(c.logprob, 4) for c in scored],
                    **({"move_retention": round(share, 4)} if share is not None else {}),
                }
            )
        return records, results, beat, kept

    @classmethod
    def notes(cls, results: list[dict]) -> str:
        from tabulate import tabulate

        rows = []
        for r in results:
            m, moves = r["metrics"], r.get("info", {}).get("model_moves", {})
            for tag, dist in moves.items():
                rows.append(
                    [
                        r.get("label"),
                        tag,
                        m.get(f"win_rate_{tag}"),
                        m.get(f"tie_rate_{tag}"),
                        m.get(f"loss_rate_{tag}"),
                        m.get(f"best_fixed_win_{tag}"),
                        "/".join(f"{100 * dist[mv]:.0f}" for mv in MOVES),
                    ]
                )
        table = tabulate(
            rows, headers=["policy", "player", "win", "tie", "loss", "best fixed", "model moves R/P/S"], floatfmt=".3f"
        )
        return (
            f"Per player:\n{table}\nReference points: random play wins 0.333; the best fixed move wins "
            "'best fixed' (about 0.5 against a 50/30/20 player)."
        )


def _rates(outcomes: list[str], tag: str | None = None) -> dict[str, float]:
    n = len(outcomes)
    suffix = f"_{tag}" if tag else ""
    return {f"{name}_rate{suffix}": outcomes.count(name) / n for name in ("win", "tie", "loss")}


def best_fixed_win(user_moves: list[int]) -> float:
    """Win rate of the best single move played every round against these moves."""
    counts = np.bincount(user_moves, minlength=3) / len(user_moves)
    return float(max(counts[(m - 1) % 3] for m in range(3)))
