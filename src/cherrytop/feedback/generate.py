"""Fill the ranking queue: sample candidate answers from a checkpoint for every item that is not
rankable yet (fewer than 2 responses: imported prompts, prompts from down-rated chat answers), up to
K per item, recording which model and which sampling settings produced each answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cherrytop.feedback.store import Store


def model_fingerprint(path: Path) -> str:
    """sha256 (first 16 hex digits) of the checkpoint's config and weight files' names and sizes plus the
    config's text: cheap, and different for different checkpoints."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update((path / "config.json").read_bytes())
    return h.hexdigest()[:16]


def fill(store: Store, checkpoint: str | Path, k: int = 4, *, temperature: float = 1.0, top_p: float = 1.0,
         max_new_tokens: int = 48, batch_size: int = 64, seed: int = 0, limit: int | None = None) -> int:
    """Sample answers for items with fewer than 2 responses until each has `k`; returns items filled.
    An item that chat ratings made rankable while the answers were sampled is left as it is."""
    from cherrytop.data.tokenizer import load_tokenizer
    from cherrytop.model.load import load_model
    from cherrytop.rollout.sampler import generate

    if not 2 <= k <= 9:
        raise ValueError(f"--k {k}: expected 2..9 answers per prompt (InstructGPT ranks K = 4..9)")
    todo = [i for i in store.items() if len(i.responses) < 2][:limit]
    if not todo:
        return 0
    path = Path(checkpoint)
    model, tok = load_model(path), load_tokenizer(path)
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    prompts, owners = [], []
    for item in todo:
        for _ in range(k - len(item.responses)):
            prompts.append(item.prompt)
            owners.append(item.id)
    answers = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       batch_size=batch_size, seed=seed, progress=len(prompts) > batch_size)
    prov = {"model": str(path), "model_fingerprint": model_fingerprint(path), "model_type": model.config.model_type,
            "settings": settings, "source": "generate"}
    filled = 0
    for item in todo:
        mine = [a for a, o in zip(answers, owners) if o == item.id]
        try:
            store.add_responses(item.id, mine, [prov] * len(mine), up_to=k)
        except ValueError:  # rankable by now: two chat ratings came in meanwhile
            continue
        filled += 1
    return filled
