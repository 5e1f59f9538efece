"""The walkthrough's verifier: a user's own reward function, `task.reward: my_rewards:score`."""


def score(completion: str, example) -> float:
    """1.0 when the completion's first word is the answer (case and trailing punctuation aside)."""
    words = completion.split()
    return float(bool(words) and words[0].strip(".,!?").lower() == example.answer.lower())
