"""A reward model as the judge where no grader exists (your own prompts): its score of each
(prompt, answer), read as PPO reads it, and the win rate of one model's answers against another's.

The score is the scalar head at the answer's EOS plus the normalising bias, plus c · log π_ref of
the answer where the reward model has that term (`rm.ref_loglik`): the reward PPO optimises and
`serve`'s moderation classifier thresholds. Prompt and answer are tokenised as the reward model was
trained (`stages/reward.encode_answer`: the chat template's rendering, cut after the answer's EOS,
within the context window by `heads.fit_answer`, for the head and log π_ref alike; `cut` counts the
answers that lost tokens).

A judge is a proxy: PPO optimises this same score, so its win rate against the SFT model is an upper
bound of what people would say [IG §4; Gao et al. 2022]. For a human verdict, `cherrytop eval
--pairs FILE` writes the two models' answers for `cherrytop label import-prompts`, and `cherrytop
label stats` gives the labelers' win rate per pair of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cherrytop.data.collate import pad_batch
from cherrytop.data.tokenizer import load_tokenizer, split_response
from cherrytop.model.heads import fit_answer, loglik_term, scalar_model_from
from cherrytop.model.load import CheckpointError, context_window, load_model
from cherrytop.rollout.episodes import response_loglik, reward


class Judge:
    """A reward-model checkpoint (with its π_ref, if its reward has the log π_ref term), frozen."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 32):
        path = Path(checkpoint)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no such reward model; expected the folder `cherrytop rm` writes")
        self.tok = load_tokenizer(path)
        self.model = scalar_model_from(path, self.tok.pad_token_id, require_head=True).eval()
        self.coef, ref, self.excess = loglik_term(self.model.config)
        self.ref = load_model(ref).eval() if self.coef else None
        windows = [w for w in (context_window(m.config) for m in (self.model, self.ref) if m is not None) if w]
        self.seq_len = min(windows, default=2048)
        self.batch_size = batch_size
        self.cut = 0
        """Answers scored so far that lost tokens to the window (`heads.fit_answer`)."""

    @torch.no_grad()
    def scores(self, prompts: Sequence[Sequence[dict]], answers: Sequence[str]) -> list[float]:
        """The reward of each answer to its prompt (messages ending with a user turn)."""
        split = [fit_answer(*split_response(self.tok, list(p), a, self.seq_len), self.seq_len)
                 for p, a in zip(prompts, answers, strict=True)]
        self.cut += sum(c for *_, c in split)
        out: list[float] = []
        for i in range(0, len(split), self.batch_size):
            part = [(head, resp) for head, resp, _ in split[i: i + self.batch_size]]
            rows = [head + resp for head, resp in part]
            enc = pad_batch([(r, r) for r in rows], self.tok.pad_token_id)  # right-padded (B, T)
            r = reward(self.model, enc["input_ids"], enc["attention_mask"])  # (B,)
            if self.ref is not None:
                r = r + self.coef * response_loglik(self.ref, [h for h, _ in part], [s for _, s in part],
                                                    self.tok.pad_token_id, excess=self.excess)
            out += r.tolist()
        return out


def judged_win_rate(scores_a: Sequence[float], scores_b: Sequence[float], answers_a: Sequence[str],
                    answers_b: Sequence[str], tie_margin: float = 0.0) -> dict:
    """P(A beats B) by score over paired answers; identical answers and |score difference| ≤ tie_margin
    are ties, counted half (as the grader's win rate counts them)."""
    wins = ties = 0
    for sa, sb, a, b in zip(scores_a, scores_b, answers_a, answers_b, strict=True):
        if a == b or abs(sa - sb) <= tie_margin:
            ties += 1
        elif sa > sb:
            wins += 1
    n = len(scores_a)
    return {"win_rate": (wins + 0.5 * ties) / n if n else 0.0, "n": n, "wins": wins, "ties": ties,
            "losses": n - wins - ties}
