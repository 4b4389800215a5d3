"""Dialogue-memory tasks (SirLLM: DailyDialog, Grocery Shopping, Rock-Paper-Scissors): one endless
conversation per run, chat formatting, multiple-choice scoring and the items they play."""
